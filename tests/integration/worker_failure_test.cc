// Worker failures with real processes on 127.0.0.1: a distval-worker killed
// with SIGKILL in the middle of a job, under BSP and SSP.
//
// BSP: 3 workers train the MLP on one server that checkpoints every clock;
// worker 2 is killed after a few steps. The server drops it after
// --worker-timeout (its log names the clock), workers 0 and 1 finish, and
// worker 0's saved model equals (to float rounding) the one of a reference
// run restored from the checkpoint at the drop clock in which only workers 0
// and 1 ever train: the steps after the drop are averaged over the two
// workers that pushed, applied once.
// The arithmetic of such a step, with clients in this process: the clock a
// dead worker did not push for is applied once, the mean of the gradients of
// the two that pushed; a worker connecting again rejoins at the job's clock.
// SSP (staleness 2): the same kill; the two others finish, and worker 2
// started again after its drop rejoins the job at the current clock and
// finishes too.
#include <gtest/gtest.h>

#include <chrono>
#include <cmath>
#include <cstdint>
#include <filesystem>
#include <functional>
#include <iostream>
#include <map>
#include <optional>
#include <regex>
#include <string>
#include <thread>
#include <vector>

#include "child_process.h"
#include "distval/client.h"
#include "distval/dataset.h"
#include "distval/safetensors.h"
#include "local_cluster.h"

namespace distval {
namespace {

namespace fs = std::filesystem;
using testing::ChildProcess;
using testing::LocalCluster;
using testing::LocalClusterOptions;
using testing::ProcessResult;

// Generous: these bound a hung process, they are not what is tested.
constexpr double kProcessTimeoutS = 120;
constexpr double kWaitTimeoutS = 60;
// Short enough to keep the test quick, long enough that the live workers'
// heartbeats (every second) keep them in while they wait for the dead one.
constexpr double kWorkerTimeoutS = 2.5;
// 3072 examples at a global batch of 96: 32 steps per epoch, 2 epochs.
constexpr int kStepsPerEpoch = 32;
constexpr int kEpochs = 2;
constexpr int64_t kTotalSteps = int64_t{kStepsPerEpoch} * kEpochs;

bool HaveData() {
  return fs::exists(FashionMnistFiles(kDefaultFashionMnistDir, Split::kTest).images);
}

// Polls `done` every 5 ms for at most timeout_s.
bool WaitFor(const std::function<bool()>& done, double timeout_s) {
  const auto deadline = std::chrono::steady_clock::now() +
                        std::chrono::milliseconds(static_cast<int64_t>(timeout_s * 1000));
  while (!done()) {
    if (std::chrono::steady_clock::now() > deadline) return false;
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
  return true;
}

// The clock of the first "worker W dropped from the live set at clock N"
// line of a server log.
std::optional<int64_t> DropClock(const std::string& log, int worker) {
  const std::regex re("worker " + std::to_string(worker) +
                      " dropped from the live set at clock ([0-9]+)");
  std::smatch m;
  if (!std::regex_search(log, m, re)) return std::nullopt;
  return std::stoll(m[1].str());
}

// Every N of "joining the job at clock N" in a worker's output.
std::vector<int64_t> JoinClocks(const std::string& output) {
  const std::regex re("joining the job at clock ([0-9]+)");
  std::vector<int64_t> out;
  for (auto it = std::sregex_iterator(output.begin(), output.end(), re);
       it != std::sregex_iterator(); ++it)
    out.push_back(std::stoll((*it)[1].str()));
  return out;
}

// The complete one-shard checkpoints under `root` (ckpt-<clock, 12
// digits>/ with its manifest): clock -> directory.
std::map<int64_t, std::string> Checkpoints(const std::string& root) {
  std::map<int64_t, std::string> out;
  std::error_code ec;
  for (const auto& e : fs::directory_iterator(root, ec)) {
    const std::string name = e.path().filename().string();
    if (name.rfind("ckpt-", 0) != 0 || name.size() <= 5 || name.size() > 5 + 18 ||
        name.find_first_not_of("0123456789", 5) != std::string::npos)
      continue;
    if (fs::exists(e.path() / "manifest-0-of-1.json", ec))
      out[std::stoll(name.substr(5))] = e.path().string();
  }
  return out;
}

// Largest clock of a complete one-shard checkpoint under `root`; -1: none.
int64_t LatestCheckpointClock(const std::string& root) {
  const auto all = Checkpoints(root);
  return all.empty() ? -1 : all.rbegin()->first;
}

class WorkerFailureTest : public ::testing::Test {
 protected:
  void SetUp() override {
    bin_ = testing::BinaryFromEnv("DISTVAL_WORKER_BIN");
    ASSERT_FALSE(bin_.empty()) << "DISTVAL_WORKER_BIN is not set";
    ASSERT_FALSE(testing::BinaryFromEnv("DISTVAL_PS_BIN").empty()) << "DISTVAL_PS_BIN is not set";
    ASSERT_FALSE(dir_.path().empty()) << "cannot make a temporary directory";
  }

  std::string Path(const std::string& name) const { return dir_.Path(name); }

  // Worker `index` of 3 training the MLP on the first 3072 examples for 2
  // epochs (global batch 96, Adam 1e-3, seed 1) against `cluster`.
  std::vector<std::string> WorkerArgs(const LocalCluster& cluster, int index,
                                      const std::string& staleness) const {
    return {bin_,
            "--ps",
            cluster.endpoints()[0],
            "--worker-index",
            std::to_string(index),
            "--num-workers",
            "3",
            "--staleness",
            staleness,
            "--model",
            "mlp",
            "--train-limit",
            std::to_string(kStepsPerEpoch * 96),
            "--global-batch",
            "96",
            "--epochs",
            std::to_string(kEpochs),
            "--optimizer",
            "adam",
            "--lr",
            "0.001",
            "--seed",
            "1"};
  }

  StatusOr<ChildProcess> StartWorker(std::vector<std::string> args, const std::string& tag,
                                     const std::vector<std::string>& extra = {}) const {
    args.insert(args.end(), extra.begin(), extra.end());
    return ChildProcess::Start(args, Path(tag + ".log"));
  }

  std::string bin_;
  testing::TempDir dir_{"distval-worker-failure"};
};

// Element-wise comparison of two saved models. Sets *bitwise when every
// value is bit-for-bit the same.
void ExpectSameModel(const std::string& a_path, const std::string& b_path, bool* bitwise) {
  *bitwise = false;
  auto a = ReadSafetensors(a_path);
  auto b = ReadSafetensors(b_path);
  ASSERT_TRUE(a.ok()) << a.status();
  ASSERT_TRUE(b.ok()) << b.status();
  ASSERT_EQ(a->tensors.size(), b->tensors.size());
  ASSERT_FALSE(a->tensors.empty());
  bool same_bits = true;
  for (const auto& [name, ta] : a->tensors) {
    const Tensor* tb = b->Find(name);
    ASSERT_NE(tb, nullptr) << "tensor '" << name << "' missing from " << b_path;
    ASSERT_EQ(ta.shape(), tb->shape()) << name;
    const float* x = ta.data_as<float>();
    const float* y = tb->data_as<float>();
    const int64_t n = ta.shape().num_elements();
    double max_diff = 0;
    int64_t worst = -1, differing = 0;
    for (int64_t i = 0; i < n; ++i) {
      ASSERT_TRUE(std::isfinite(x[i]) && std::isfinite(y[i])) << name << "[" << i << "]";
      const double d = std::fabs(static_cast<double>(x[i]) - static_cast<double>(y[i]));
      if (x[i] != y[i]) ++differing;
      // Float rounding of a few dozen steps: relative 1e-5 of the value,
      // absolute 1e-6 near zero.
      if (d > 1e-6 + 1e-5 * std::fabs(static_cast<double>(x[i])) && d > max_diff) {
        max_diff = d;
        worst = i;
      }
    }
    EXPECT_EQ(worst, -1) << "tensor '" << name << "': element " << worst << " is "
                         << (worst >= 0 ? x[worst] : 0.0f) << " vs "
                         << (worst >= 0 ? y[worst] : 0.0f) << " (" << differing << " of " << n
                         << " values differ)";
    if (differing > 0) {
      same_bits = false;
      std::cout << "tensor '" << name << "': " << differing << " of " << n
                << " values differ in their bits (within float rounding)\n";
    }
  }
  *bitwise = same_bits;
}

TEST_F(WorkerFailureTest, BspKilledWorkerIsDroppedAndTheRestEqualsTwoWorkersFromItsClock) {
  if (!HaveData()) GTEST_SKIP() << "Fashion-MNIST not installed";
  const auto start = std::chrono::steady_clock::now();
  const std::string ckpt_root = Path("ckpt");
  ASSERT_TRUE(fs::create_directories(ckpt_root));

  // ---- Run A: 3 workers; worker 2 is killed mid-run.
  int64_t drop_clock = -1;
  std::string ps_log_a;
  {
    LocalClusterOptions co;
    co.num_workers = 3;
    co.staleness = "0";
    co.worker_timeout_s = kWorkerTimeoutS;
    co.extra_args = {"--checkpoint-dir", ckpt_root, "--checkpoint-every", "1", "--keep", "0"};
    auto cluster = LocalCluster::Start(co);
    ASSERT_TRUE(cluster.ok()) << cluster.status();
    // Worker 2 is the straggler that sets the pace (BSP) until it dies, so
    // that the kill lands mid-run; once it is gone the others run at full
    // speed.
    auto w0 = StartWorker(WorkerArgs(*cluster, 0, "0"), "a-0", {"--save", Path("model-a")});
    auto w1 = StartWorker(WorkerArgs(*cluster, 1, "0"), "a-1");
    std::optional<ChildProcess> w2;
    {
      auto p = StartWorker(WorkerArgs(*cluster, 2, "0"), "a-2", {"--slowdown", "40"});
      ASSERT_TRUE(p.ok()) << p.status();
      w2.emplace(std::move(*p));
    }
    ASSERT_TRUE(w0.ok()) << w0.status();
    ASSERT_TRUE(w1.ok()) << w1.status();
    // Kill it once clock 8 of 64 is applied (every worker pushed 8 steps).
    const bool progressed =
        WaitFor([&] { return LatestCheckpointClock(ckpt_root) >= 8; }, kWaitTimeoutS);
    ASSERT_TRUE(progressed) << "no checkpoint at clock >= 8; server log:\n"
                            << testing::ReadFile(cluster->LogPath(0)) << "\nworker 2:\n"
                            << testing::ReadFile(Path("a-2.log"));
    w2.reset();  // SIGKILL, then reaped
    const auto killed = std::chrono::steady_clock::now();

    ProcessResult r0 = w0->Wait(kProcessTimeoutS);
    ProcessResult r1 = w1->Wait(kProcessTimeoutS);
    ps_log_a = testing::ReadFile(cluster->LogPath(0));
    ASSERT_FALSE(r0.timed_out) << r0.output << "\nserver:\n" << ps_log_a;
    ASSERT_FALSE(r1.timed_out) << r1.output << "\nserver:\n" << ps_log_a;
    ASSERT_EQ(r0.exit_code, 0) << r0.output << "\nserver:\n" << ps_log_a;
    ASSERT_EQ(r1.exit_code, 0) << r1.output << "\nserver:\n" << ps_log_a;
    std::cout << "run A: workers 0 and 1 finished "
              << std::chrono::duration<double>(std::chrono::steady_clock::now() - killed).count()
              << " s after the kill\n";
  }
  // The server says when it dropped worker 2, and at which clock: the
  // number of steps it had completed, all of which count.
  std::optional<int64_t> dropped = DropClock(ps_log_a, 2);
  ASSERT_TRUE(dropped.has_value()) << "no drop of worker 2 in the server log:\n" << ps_log_a;
  drop_clock = *dropped;
  EXPECT_NE(ps_log_a.find("worker 2 dropped from the live set at clock " +
                          std::to_string(drop_clock) + " (silent for "),
            std::string::npos)
      << ps_log_a;
  // It was killed after clock 8 was applied, and before the end.
  ASSERT_GE(drop_clock, 8) << ps_log_a;
  ASSERT_LT(drop_clock, kTotalSteps) << "worker 2 was not killed mid-run:\n" << ps_log_a;
  // The live workers stayed in throughout.
  EXPECT_FALSE(DropClock(ps_log_a, 0).has_value()) << ps_log_a;
  EXPECT_FALSE(DropClock(ps_log_a, 1).has_value()) << ps_log_a;
  std::cout << "run A: worker 2 dropped at clock " << drop_clock << " of " << kTotalSteps << "\n";
  const std::string restore_dir = Checkpoints(ckpt_root)[drop_clock];
  ASSERT_FALSE(restore_dir.empty())
      << "no checkpoint at clock " << drop_clock << " in " << ckpt_root;

  // ---- Run B (reference): the state at the drop clock; only workers 0 and
  // 1 ever train from there (still 3 workers in the job, so the data shards
  // are the same); worker 2 never comes and is dropped at start-up.
  {
    LocalClusterOptions co;
    co.num_workers = 3;
    co.staleness = "0";
    co.worker_timeout_s = kWorkerTimeoutS;
    co.extra_args = {"--restore", restore_dir};
    auto cluster = LocalCluster::Start(co);
    ASSERT_TRUE(cluster.ok()) << cluster.status();
    auto w0 = StartWorker(WorkerArgs(*cluster, 0, "0"), "b-0", {"--save", Path("model-b")});
    auto w1 = StartWorker(WorkerArgs(*cluster, 1, "0"), "b-1");
    ASSERT_TRUE(w0.ok()) << w0.status();
    ASSERT_TRUE(w1.ok()) << w1.status();
    ProcessResult r0 = w0->Wait(kProcessTimeoutS);
    ProcessResult r1 = w1->Wait(kProcessTimeoutS);
    const std::string ps_log_b = testing::ReadFile(cluster->LogPath(0));
    ASSERT_FALSE(r0.timed_out) << r0.output << "\nserver:\n" << ps_log_b;
    ASSERT_FALSE(r1.timed_out) << r1.output << "\nserver:\n" << ps_log_b;
    ASSERT_EQ(r0.exit_code, 0) << r0.output << "\nserver:\n" << ps_log_b;
    ASSERT_EQ(r1.exit_code, 0) << r1.output << "\nserver:\n" << ps_log_b;
    // Both started at the restored clock.
    EXPECT_EQ(JoinClocks(r0.output), std::vector<int64_t>{drop_clock}) << r0.output;
    EXPECT_EQ(JoinClocks(r1.output), std::vector<int64_t>{drop_clock}) << r1.output;
    EXPECT_EQ(DropClock(ps_log_b, 2), drop_clock) << ps_log_b;
    EXPECT_NE(ps_log_b.find("never said hello"), std::string::npos) << ps_log_b;
  }

  bool bitwise = false;
  ExpectSameModel(Path("model-a/variables.safetensors"), Path("model-b/variables.safetensors"),
                  &bitwise);
  std::cout << "run A vs run B from clock " << drop_clock << ": worker 0's saved models are "
            << (bitwise ? "bitwise equal" : "equal to float rounding, not bitwise") << "\n";
  RecordProperty("drop_clock", std::to_string(drop_clock));
  RecordProperty("bitwise_equal", bitwise ? "true" : "false");
  std::cout << "BSP test: "
            << std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count()
            << " s\n";
}

// The step arithmetic behind the BSP test, exactly: SGD with learning rate
// 1 on a zero-initialized variable, so the parameters are minus the sum of
// the applied means.
TEST(WorkerFailureStepTest, AClockADeadWorkerMissedIsTheMeanOfThosePushedAppliedOnce) {
  LocalClusterOptions co;
  co.num_workers = 3;
  co.staleness = "0";
  co.worker_timeout_s = 1.0;
  auto cluster = LocalCluster::Start(co);
  ASSERT_TRUE(cluster.ok()) << cluster.status();
  auto connect = [&](int index) -> std::unique_ptr<Client> {
    ClientOptions o;
    o.ps_endpoints = cluster->endpoints();
    o.worker_index = index;
    o.num_workers = 3;
    o.expected_staleness = 0;
    o.heartbeat_interval = std::chrono::milliseconds(200);
    o.connect_timeout = std::chrono::milliseconds(20000);
    o.request_timeout = std::chrono::milliseconds(30000);
    auto c = Client::Connect(o);
    EXPECT_TRUE(c.ok()) << c.status();
    if (!c.ok()) return nullptr;
    VariableOptions vo;
    vo.initializer = {0, protocol::InitZeros{}};
    vo.optimizer.kind = protocol::OptimizerKind::kSgd;
    vo.optimizer.learning_rate = 1.0;
    Status s = (*c)->CreateVariable("v", DType::kF32, Shape({4}), vo);
    EXPECT_TRUE(s.ok()) << s;
    return s.ok() ? std::move(*c) : nullptr;
  };
  // Reads v through `c` (a pull at c's clock: held until that clock may be
  // read) with its version (the number of updates applied).
  auto read = [](Client& c, std::vector<float>* values, uint64_t* version) {
    auto out = std::make_shared<std::vector<PulledVariable>>();
    Status s = c.PullViews({"v"}, out).Wait();
    ASSERT_TRUE(s.ok()) << s;
    ASSERT_EQ(out->size(), 1u);
    values->assign(4, 0.0f);
    ASSERT_TRUE((*out)[0].CopyTo(*values).ok());
    *version = (*out)[0].version;
  };
  std::unique_ptr<Client> w0 = connect(0), w1 = connect(1), w2 = connect(2);
  ASSERT_TRUE(w0 && w1 && w2);

  // Clock 0: all three push; the mean of (1, 2, 3) x (1, 2, 3, 4).
  const std::vector<float> g0 = {1, 2, 3, 4}, g1 = {2, 4, 6, 8}, g2 = {3, 6, 9, 12};
  ASSERT_TRUE(w0->Push({{"v", g0}}, true).Wait().ok());
  ASSERT_TRUE(w1->Push({{"v", g1}}, true).Wait().ok());
  ASSERT_TRUE(w2->Push({{"v", g2}}, true).Wait().ok());
  // Worker 2 dies (no more requests, no heartbeats) at clock 1.
  w2.reset();
  // Clock 1: only workers 0 and 1 push; it completes once worker 2 is
  // dropped, as their mean (a mean over 3 would be 4/3).
  const std::vector<float> h0 = {1, 1, 1, 1}, h1 = {3, 3, 3, 3};
  ASSERT_TRUE(w0->Push({{"v", h0}}, true).Wait().ok());
  ASSERT_TRUE(w1->Push({{"v", h1}}, true).Wait().ok());
  std::vector<float> v;
  uint64_t version = 0;
  read(*w0, &v, &version);  // at clock 2: waits for the drop
  if (HasFatalFailure()) return;
  const std::vector<float> after_two = {-4, -6, -8, -10};
  for (size_t i = 0; i < 4; ++i) EXPECT_FLOAT_EQ(v[i], after_two[i]) << "element " << i;
  EXPECT_EQ(version, 2u) << "clocks 0 and 1 must be applied once each";
  const std::string log = testing::ReadFile(cluster->LogPath(0));
  EXPECT_EQ(DropClock(log, 2), 1) << log;

  // Worker 2 connects again: it rejoins at the job's clock (2), not at the
  // clock it left (1), and the next clock waits for it again.
  w2 = connect(2);
  ASSERT_NE(w2, nullptr);
  EXPECT_EQ(w2->clock(), 2);
  const std::vector<float> k = {3, 3, 3, 3}, k2 = {6, 6, 6, 6};
  ASSERT_TRUE(w0->Push({{"v", k}}, true).Wait().ok());
  ASSERT_TRUE(w1->Push({{"v", k}}, true).Wait().ok());
  ASSERT_TRUE(w2->Push({{"v", k2}}, true).Wait().ok());
  read(*w0, &v, &version);
  if (HasFatalFailure()) return;
  const std::vector<float> after_three = {-8, -10, -12, -14};
  for (size_t i = 0; i < 4; ++i) EXPECT_FLOAT_EQ(v[i], after_three[i]) << "element " << i;
  EXPECT_EQ(version, 3u);
  EXPECT_NE(testing::ReadFile(cluster->LogPath(0)).find("worker 2 joined at clock 2"),
            std::string::npos);
}

TEST_F(WorkerFailureTest, SspKilledWorkerIsDroppedAndARestartRejoinsAtTheCurrentClock) {
  if (!HaveData()) GTEST_SKIP() << "Fashion-MNIST not installed";
  const auto start = std::chrono::steady_clock::now();
  const std::string ckpt_root = Path("ckpt-ssp");
  ASSERT_TRUE(fs::create_directories(ckpt_root));
  LocalClusterOptions co;
  co.num_workers = 3;
  co.staleness = "2";
  co.worker_timeout_s = kWorkerTimeoutS;
  // Checkpoints only to watch the job's progress (SSP: the largest clock).
  co.extra_args = {"--checkpoint-dir", ckpt_root, "--checkpoint-every", "1", "--keep", "2"};
  auto cluster = LocalCluster::Start(co);
  ASSERT_TRUE(cluster.ok()) << cluster.status();
  // Everyone slowed down so that the job is still running when worker 2
  // comes back after its drop.
  const std::vector<std::string> slow = {"--slowdown", "25"};
  auto w0 = StartWorker(WorkerArgs(*cluster, 0, "2"), "ssp-0", slow);
  auto w1 = StartWorker(WorkerArgs(*cluster, 1, "2"), "ssp-1", slow);
  std::optional<ChildProcess> w2;
  {
    auto p = StartWorker(WorkerArgs(*cluster, 2, "2"), "ssp-2", slow);
    ASSERT_TRUE(p.ok()) << p.status();
    w2.emplace(std::move(*p));
  }
  ASSERT_TRUE(w0.ok()) << w0.status();
  ASSERT_TRUE(w1.ok()) << w1.status();
  const bool progressed =
      WaitFor([&] { return LatestCheckpointClock(ckpt_root) >= 4; }, kWaitTimeoutS);
  ASSERT_TRUE(progressed) << "no checkpoint at clock >= 4; server log:\n"
                          << testing::ReadFile(cluster->LogPath(0));
  w2.reset();  // SIGKILL, then reaped

  // The server drops it after --worker-timeout (the others are held by the
  // staleness bound meanwhile) ...
  std::string ps_log;
  const bool dropped = WaitFor(
      [&] {
        ps_log = testing::ReadFile(cluster->LogPath(0));
        return DropClock(ps_log, 2).has_value();
      },
      kWaitTimeoutS);
  ASSERT_TRUE(dropped) << "worker 2 never dropped; server log:\n" << ps_log;
  const int64_t drop_clock = *DropClock(ps_log, 2);
  EXPECT_GE(drop_clock, 1) << ps_log;
  // ... and worker 2 started again rejoins at the current clock.
  auto again = StartWorker(WorkerArgs(*cluster, 2, "2"), "ssp-2-again", slow);
  ASSERT_TRUE(again.ok()) << again.status();

  ProcessResult r0 = w0->Wait(kProcessTimeoutS);
  ProcessResult r1 = w1->Wait(kProcessTimeoutS);
  ProcessResult r2 = again->Wait(kProcessTimeoutS);
  ps_log = testing::ReadFile(cluster->LogPath(0));
  for (const ProcessResult* r : {&r0, &r1, &r2}) {
    ASSERT_FALSE(r->timed_out) << r->output << "\nserver:\n" << ps_log;
    ASSERT_EQ(r->exit_code, 0) << r->output << "\nserver:\n" << ps_log;
  }
  EXPECT_FALSE(DropClock(ps_log, 0).has_value()) << ps_log;
  EXPECT_FALSE(DropClock(ps_log, 1).has_value()) << ps_log;
  const std::vector<int64_t> joins = JoinClocks(r2.output);
  ASSERT_EQ(joins.size(), 1u) << "the restarted worker did not join the running job:\n"
                              << r2.output << "\nserver:\n"
                              << ps_log;
  // Not from the start, and not behind where it left off.
  EXPECT_GT(joins[0], 0);
  EXPECT_GE(joins[0], drop_clock);
  EXPECT_LT(joins[0], kTotalSteps);
  EXPECT_NE(ps_log.find("worker 2 joined at clock " + std::to_string(joins[0])), std::string::npos)
      << ps_log;
  EXPECT_NE(r2.output.find("done: " + std::to_string(kTotalSteps - joins[0]) + " steps"),
            std::string::npos)
      << r2.output;
  std::cout << "SSP: worker 2 dropped at clock " << drop_clock << ", rejoined at clock " << joins[0]
            << "; test "
            << std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count()
            << " s\n";
}

}  // namespace
}  // namespace distval
