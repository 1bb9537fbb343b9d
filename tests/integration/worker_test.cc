// Integration tests of distval-worker and the strategy against real
// distval-ps processes on 127.0.0.1: 2 servers + 2 worker processes training
// the MLP on the first 10k Fashion-MNIST examples (BSP and async), the
// --local baseline, the output files, device validation through the binary,
// the staleness check at hello, and 2 replicas = 1 replica at twice the
// per-replica batch under BSP on a server.
#include <gtest/gtest.h>

#include <cmath>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "child_process.h"
#include "distval/dataset.h"
#include "distval/parameter_server_strategy.h"
#include "local_cluster.h"
#include "strategy_training.h"

namespace distval {
namespace {

using nlohmann::json;
using testing::ChildProcess;
using testing::LocalCluster;
using testing::LocalClusterOptions;
using testing::ProcessResult;

constexpr double kTimeoutS = 90;

bool HaveData() {
  return std::filesystem::exists(FashionMnistFiles(kDefaultFashionMnistDir, Split::kTest).images);
}

class WorkerTest : public ::testing::Test {
 protected:
  void SetUp() override {
    bin_ = testing::BinaryFromEnv("DISTVAL_WORKER_BIN");
    ASSERT_FALSE(bin_.empty()) << "DISTVAL_WORKER_BIN is not set";
    char tmpl[] = "/tmp/distval-worker-test-XXXXXX";
    ASSERT_NE(mkdtemp(tmpl), nullptr);
    dir_ = tmpl;
  }
  void TearDown() override {
    std::error_code ec;
    std::filesystem::remove_all(dir_, ec);
  }

  // The common training flags: MLP, first 10k examples, 1 epoch, Adam 1e-3.
  std::vector<std::string> TrainArgs(const std::string& tag) const {
    return {bin_,
            "--model",
            "mlp",
            "--train-limit",
            "10000",
            "--epochs",
            "1",
            "--optimizer",
            "adam",
            "--seed",
            "1",
            "--summary-json",
            Path(tag + ".json"),
            "--metrics-out",
            Path(tag + ".jsonl")};
  }
  std::string Path(const std::string& name) const { return dir_ + "/" + name; }

  // Runs `n` workers against `cluster` and waits for all of them.
  void RunWorkers(const LocalCluster& cluster, int n, const std::string& staleness,
                  const std::string& tag) {
    std::string ps;
    for (const auto& e : cluster.endpoints()) ps += (ps.empty() ? "" : ",") + e;
    std::vector<ChildProcess> procs;
    for (int i = 0; i < n; ++i) {
      std::vector<std::string> args = TrainArgs(tag + "-" + std::to_string(i));
      args.insert(args.end(), {"--ps", ps, "--worker-index", std::to_string(i), "--num-workers",
                               std::to_string(n), "--staleness", staleness});
      auto p = ChildProcess::Start(args, Path(tag + "-" + std::to_string(i) + ".log"));
      ASSERT_TRUE(p.ok()) << p.status();
      procs.push_back(std::move(*p));
    }
    for (int i = 0; i < n; ++i) {
      ProcessResult r = procs[static_cast<size_t>(i)].Wait(kTimeoutS);
      ASSERT_FALSE(r.timed_out) << "worker " << i << " timed out:\n" << r.output;
      ASSERT_EQ(r.exit_code, 0) << "worker " << i << ":\n" << r.output;
    }
  }

  json ReadJson(const std::string& name) const {
    std::ifstream f(Path(name));
    EXPECT_TRUE(f.good()) << "missing " << name;
    return f ? json::parse(f) : json();
  }
  std::vector<json> ReadJsonLines(const std::string& name) const {
    std::ifstream f(Path(name));
    EXPECT_TRUE(f.good()) << "missing " << name;
    std::vector<json> out;
    std::string line;
    while (std::getline(f, line)) {
      if (!line.empty()) out.push_back(json::parse(line));
    }
    return out;
  }

  // Checks one worker's metrics file: `steps` step records then one epoch
  // record, with the documented fields.
  void CheckMetrics(const std::string& name, int worker, int64_t steps, int64_t per_step,
                    bool bsp) const {
    std::vector<json> recs = ReadJsonLines(name);
    ASSERT_EQ(static_cast<int64_t>(recs.size()), steps + 1) << name;
    double last_wall = 0;
    for (int64_t s = 0; s < steps; ++s) {
      const json& r = recs[static_cast<size_t>(s)];
      ASSERT_EQ(r.at("type"), "step");
      EXPECT_EQ(r.at("worker"), worker);
      EXPECT_EQ(r.at("step"), s);
      EXPECT_EQ(r.at("epoch"), 0);
      EXPECT_EQ(r.at("examples"), (s + 1) * per_step);
      EXPECT_GE(r.at("wall_s").get<double>(), last_wall);
      last_wall = r.at("wall_s").get<double>();
      EXPECT_TRUE(std::isfinite(r.at("loss").get<double>()));
      EXPECT_GE(r.at("blocked_s").get<double>(), 0.0);
      EXPECT_GT(r.at("compute_s").get<double>(), 0.0);
      if (bsp) {
        EXPECT_EQ(r.at("staleness"), 0) << "step " << s;
      }
    }
    const json& e = recs.back();
    EXPECT_EQ(e.at("type"), "epoch");
    EXPECT_EQ(e.at("epoch"), 0);
    EXPECT_EQ(e.at("examples"), steps * per_step);
    EXPECT_TRUE(e.contains("train_loss"));
    EXPECT_TRUE(e.contains("test_accuracy"));
    EXPECT_EQ(e.at("test_accuracy").is_null(), worker != 0);
  }

  std::string bin_;
  std::string dir_;
};

TEST_F(WorkerTest, BspTwoServersTwoWorkersLearnAndMatchTheLocalBaseline) {
  if (!HaveData()) GTEST_SKIP() << "Fashion-MNIST not installed";
  // The single-process baseline.
  ProcessResult local = testing::RunProcess(
      [&] {
        auto a = TrainArgs("local");
        a.push_back("--local");
        return a;
      }(),
      Path("local.log"), kTimeoutS);
  ASSERT_EQ(local.exit_code, 0) << local.output;
  EXPECT_NE(local.output.find("distval-worker: role=local index=0"), std::string::npos);
  EXPECT_NE(local.output.find("epoch 1/1: train loss"), std::string::npos) << local.output;
  json ls = ReadJson("local.json");
  EXPECT_EQ(ls.at("mode"), "local");
  EXPECT_EQ(ls.at("steps"), 156);  // 10000 / 64
  EXPECT_EQ(ls.at("examples_seen"), 156 * 64);
  EXPECT_GE(ls.at("test_accuracy").get<double>(), 0.75);
  CheckMetrics("local.jsonl", 0, 156, 64, /*bsp=*/true);

  LocalClusterOptions co;
  co.num_shards = 2;
  co.num_workers = 2;
  co.staleness = "0";
  auto cluster = LocalCluster::Start(co);
  ASSERT_TRUE(cluster.ok()) << cluster.status();
  RunWorkers(*cluster, 2, "0", "bsp");
  if (HasFatalFailure()) return;
  json s0 = ReadJson("bsp-0.json"), s1 = ReadJson("bsp-1.json");
  const double acc = s0.at("test_accuracy").get<double>();
  EXPECT_GE(acc, 0.75);
  EXPECT_TRUE(s1.at("test_accuracy").is_null());  // only worker 0 evaluates
  for (const json* s : {&s0, &s1}) {
    EXPECT_EQ(s->at("mode"), "bsp");
    EXPECT_EQ(s->at("steps"), 156);
    EXPECT_EQ(s->at("examples_seen"), 156 * 32);
    EXPECT_EQ(s->at("num_workers"), 2);
    EXPECT_EQ(s->at("global_batch"), 64);
    EXPECT_EQ(s->at("max_staleness"), 0);
    EXPECT_EQ(s->at("staleness_histogram"), json::array({156}));
    for (const char* key :
         {"final_train_loss", "epochs", "wall_seconds", "examples_per_second", "mean_staleness",
          "blocked_seconds", "compute_seconds", "worker", "model", "optimizer", "lr", "devices"})
      EXPECT_TRUE(s->contains(key)) << key;
  }
  // BSP over 2 workers at global batch 64 is the baseline's training (same
  // data order, same optimizer code), up to float rounding.
  EXPECT_NEAR(acc, ls.at("test_accuracy").get<double>(), 0.01);
  EXPECT_NEAR(s0.at("final_train_loss").get<double>() + s1.at("final_train_loss").get<double>(),
              2 * ls.at("final_train_loss").get<double>(), 0.02);
  CheckMetrics("bsp-0.jsonl", 0, 156, 32, /*bsp=*/true);
  CheckMetrics("bsp-1.jsonl", 1, 156, 32, /*bsp=*/true);
}

TEST_F(WorkerTest, AsyncTwoServersTwoWorkersLearn) {
  if (!HaveData()) GTEST_SKIP() << "Fashion-MNIST not installed";
  LocalClusterOptions co;
  co.num_shards = 2;
  co.num_workers = 2;
  co.staleness = "async";
  auto cluster = LocalCluster::Start(co);
  ASSERT_TRUE(cluster.ok()) << cluster.status();
  RunWorkers(*cluster, 2, "async", "async");
  if (HasFatalFailure()) return;
  json s0 = ReadJson("async-0.json");
  EXPECT_EQ(s0.at("mode"), "async");
  // Async is not deterministic (arrival order); one epoch lands near 0.76.
  EXPECT_GE(s0.at("test_accuracy").get<double>(), 0.70);
  EXPECT_EQ(s0.at("steps"), 156);
  CheckMetrics("async-0.jsonl", 0, 156, 32, /*bsp=*/false);
  CheckMetrics("async-1.jsonl", 1, 156, 32, /*bsp=*/false);
}

TEST_F(WorkerTest, DeviceAndBatchErrorsAreClearAndComeBeforeConnecting) {
  // No server listens on port 1: the settings are refused before the worker
  // would wait for one.
  struct Case {
    std::vector<std::string> args;
    std::string expect;
  };
  const std::vector<Case> cases = {
      {{"--devices", "cuda:3"}, "\"cuda:3\" does not exist; available: cpu:0"},
      {{"--devices", "cpu:0,cpu:0"}, "\"cpu:0\" is listed more than once"},
      {{"--devices", "cpu:0", "--global-batch", "63", "--num-workers", "2"},
       "global batch size 63 does not divide evenly across 2 replicas in sync"},
  };
  int i = 0;
  for (const Case& c : cases) {
    std::vector<std::string> args = {bin_, "--ps", "tcp://127.0.0.1:1"};
    args.insert(args.end(), c.args.begin(), c.args.end());
    ProcessResult r = testing::RunProcess(args, Path("err" + std::to_string(i++) + ".log"), 20);
    EXPECT_FALSE(r.timed_out) << r.output;
    EXPECT_EQ(r.exit_code, 2) << r.output;
    EXPECT_NE(r.output.find(c.expect), std::string::npos) << r.output;
  }
}

TEST_F(WorkerTest, AWorkerExpectingAnotherStalenessIsRefused) {
  LocalClusterOptions co;
  co.num_shards = 1;
  co.num_workers = 1;
  co.staleness = "0";
  auto cluster = LocalCluster::Start(co);
  ASSERT_TRUE(cluster.ok()) << cluster.status();
  ProcessResult r = testing::RunProcess(
      {bin_, "--ps", cluster->endpoints()[0], "--staleness", "async", "--train-limit", "640"},
      Path("mismatch.log"), 30);
  EXPECT_EQ(r.exit_code, 1) << r.output;
  EXPECT_NE(r.output.find("staleness mismatch"), std::string::npos) << r.output;
}

TEST_F(WorkerTest, TheClusterComesFromTfConfigOrAClusterFile) {
  if (!HaveData()) GTEST_SKIP() << "Fashion-MNIST not installed";
  LocalClusterOptions co;
  co.num_shards = 1;
  co.num_workers = 1;
  auto cluster = LocalCluster::Start(co);
  ASSERT_TRUE(cluster.ok()) << cluster.status();
  const std::string endpoint = cluster->endpoints()[0];  // tcp://127.0.0.1:PORT
  const std::string host_port = endpoint.substr(std::string("tcp://").size());
  const std::string cluster_json =
      R"({"cluster": {"ps": [")" + host_port + R"("], "worker": ["127.0.0.1:0"]})";
  const std::vector<std::string> common = {bin_, "--train-limit", "640", "--global-batch", "64"};

  auto args = common;
  args.push_back("--tf-config");
  auto p = ChildProcess::Start(
      args, Path("tf.log"),
      {{"TF_CONFIG", cluster_json + R"(, "task": {"type": "worker", "index": 0}})"}});
  ASSERT_TRUE(p.ok());
  ProcessResult r = p->Wait(kTimeoutS);
  ASSERT_EQ(r.exit_code, 0) << r.output;
  EXPECT_NE(r.output.find("role=worker index=0 num_workers=1 ps=" + endpoint), std::string::npos)
      << r.output;
  EXPECT_NE(r.output.find("done: 10 steps"), std::string::npos) << r.output;

  {
    std::ofstream f(Path("cluster.json"));
    f << cluster_json << "}";
  }
  // The servers are at clock 10 now: a worker joining the job continues it
  // (epoch 2 of 2), its data order a function of the clock.
  args = common;
  args.insert(args.end(),
              {"--cluster", Path("cluster.json"), "--worker-index", "0", "--epochs", "2"});
  r = testing::RunProcess(args, Path("file.log"), kTimeoutS);
  ASSERT_EQ(r.exit_code, 0) << r.output;
  EXPECT_NE(r.output.find("ps=" + endpoint), std::string::npos) << r.output;
  EXPECT_NE(r.output.find("joining the job at clock 10: epoch 1, step 0"), std::string::npos)
      << r.output;
  EXPECT_NE(r.output.find("done: 10 steps"), std::string::npos) << r.output;
}

// The strategy in this process against a real server: 2 replicas with
// per-replica batch 16 against 1 replica with 32, BSP, same data order.
TEST(StrategyOnServersTest, TwoReplicasMatchOneReplicaWithTwiceTheBatch) {
  auto examples = testing::SyntheticExamples(640, 5);
  constexpr int kSteps = 12;
  auto train = [&](int replicas) -> std::vector<Tensor> {
    LocalClusterOptions co;
    co.num_shards = 2;
    co.num_workers = 1;
    co.staleness = "0";
    auto cluster = LocalCluster::Start(co);
    EXPECT_TRUE(cluster.ok()) << cluster.status();
    if (!cluster.ok()) return {};
    WorkerOptions o;
    o.ps_endpoints = cluster->endpoints();
    o.devices = replicas == 1 ? std::vector<std::string>{"cpu:0"}
                              : std::vector<std::string>{"cpu:0", "cpu:1"};
    o.inventory = DeviceInventory{2, 0};
    o.global_batch_size = 32;
    o.staleness = 0;
    o.optimizer.kind = protocol::OptimizerKind::kAdam;
    o.optimizer.learning_rate = 0.01;
    auto s = ParameterServerStrategy::Create(o);
    EXPECT_TRUE(s.ok()) << s.status();
    if (!s.ok()) return {};
    auto params = testing::TrainSteps(**s, examples, kSteps, /*seed=*/3);
    EXPECT_TRUE(params.ok()) << params.status();
    EXPECT_EQ((*s)->stats().steps, kSteps);
    return params.ok() ? std::move(*params) : std::vector<Tensor>{};
  };
  std::vector<Tensor> one = train(1), two = train(2);
  ASSERT_EQ(one.size(), 4u);
  ASSERT_EQ(two.size(), 4u);
  const std::vector<Tensor> init = testing::SyntheticModel().InitialValues(3);
  for (size_t i = 0; i < one.size(); ++i) {
    EXPECT_LT(testing::RelativeError(two[i], one[i]), 1e-5) << "parameter " << i;
    EXPECT_GT(testing::RelativeError(init[i], one[i]), 1e-3) << "parameter " << i;
  }
}

}  // namespace
}  // namespace distval
