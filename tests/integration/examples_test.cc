// The examples in examples/ run against a local cluster (2 servers, 2
// workers, BSP) on the first 10k Fashion-MNIST examples and learn.
#include <gtest/gtest.h>

#include <filesystem>
#include <regex>
#include <string>
#include <vector>

#include "child_process.h"
#include "distval/dataset.h"
#include "local_cluster.h"

namespace distval {
namespace {

using testing::ChildProcess;
using testing::LocalCluster;
using testing::LocalClusterOptions;
using testing::ProcessResult;

// Runs `bin` as worker 0 and 1 of a fresh 2-server BSP cluster; returns
// worker 0's output.
std::string RunTwoWorkers(const std::string& bin, const std::vector<std::string>& extra) {
  LocalClusterOptions co;
  co.num_shards = 2;
  co.num_workers = 2;
  co.staleness = "0";
  auto cluster = LocalCluster::Start(co);
  EXPECT_TRUE(cluster.ok()) << cluster.status();
  if (!cluster.ok()) return "";
  std::string ps;
  for (const auto& e : cluster->endpoints()) ps += (ps.empty() ? "" : ",") + e;
  char tmpl[] = "/tmp/distval-examples-XXXXXX";
  if (mkdtemp(tmpl) == nullptr) return "";
  const std::string dir = tmpl;
  std::vector<ChildProcess> procs;
  for (int i = 0; i < 2; ++i) {
    std::vector<std::string> args = {
        bin, "--ps", ps, "--worker-index", std::to_string(i), "--num-workers", "2"};
    args.insert(args.end(), extra.begin(), extra.end());
    auto p = ChildProcess::Start(args, dir + "/worker-" + std::to_string(i) + ".log");
    EXPECT_TRUE(p.ok()) << p.status();
    if (!p.ok()) return "";
    procs.push_back(std::move(*p));
  }
  std::string out0;
  for (int i = 0; i < 2; ++i) {
    ProcessResult r = procs[static_cast<size_t>(i)].Wait(90);
    EXPECT_FALSE(r.timed_out) << r.output;
    EXPECT_EQ(r.exit_code, 0) << "worker " << i << ":\n" << r.output;
    if (i == 0) out0 = r.output;
  }
  std::error_code ec;
  std::filesystem::remove_all(dir, ec);
  return out0;
}

// The last "test accuracy X" in `output`, or -1.
double LastAccuracy(const std::string& output) {
  static const std::regex re("test accuracy ([0-9.]+)");
  double acc = -1;
  for (auto it = std::sregex_iterator(output.begin(), output.end(), re);
       it != std::sregex_iterator(); ++it)
    acc = std::stod((*it)[1].str());
  return acc;
}

bool HaveData() {
  return std::filesystem::exists(FashionMnistFiles(kDefaultFashionMnistDir, Split::kTest).images);
}

TEST(ExamplesTest, CustomTrainingLoopLearnsAgainstTwoServers) {
  if (!HaveData()) GTEST_SKIP() << "Fashion-MNIST not installed";
  const std::string bin = testing::BinaryFromEnv("DISTVAL_EXAMPLE_CUSTOM_LOOP_BIN");
  ASSERT_FALSE(bin.empty());
  const std::string out = RunTwoWorkers(bin, {"--train-limit", "10000", "--epochs", "1"});
  EXPECT_NE(out.find("worker 0 epoch 1: train loss"), std::string::npos) << out;
  const double acc = LastAccuracy(out);
  EXPECT_GE(acc, 0.72) << out;
}

TEST(ExamplesTest, BringYourOwnModelLearnsWithRawPullAndPush) {
  if (!HaveData()) GTEST_SKIP() << "Fashion-MNIST not installed";
  const std::string bin = testing::BinaryFromEnv("DISTVAL_EXAMPLE_BYOM_BIN");
  ASSERT_FALSE(bin.empty());
  const std::string out = RunTwoWorkers(bin, {"--train-limit", "10000", "--steps", "200"});
  EXPECT_NE(out.find("after 200 steps of worker 0"), std::string::npos) << out;
  const double acc = LastAccuracy(out);
  EXPECT_GE(acc, 0.72) << out;
}

TEST(ExamplesTest, KerasStyleFitTrainsEvaluatesSavesAndLoads) {
  if (!HaveData()) GTEST_SKIP() << "Fashion-MNIST not installed";
  const std::string bin = testing::BinaryFromEnv("DISTVAL_EXAMPLE_KERAS_FIT_BIN");
  ASSERT_FALSE(bin.empty());
  char tmpl[] = "/tmp/distval-keras-fit-XXXXXX";
  ASSERT_NE(mkdtemp(tmpl), nullptr);
  const std::string save = std::string(tmpl) + "/model";
  const std::string out =
      RunTwoWorkers(bin, {"--train-limit", "10000", "--epochs", "2", "--save", save});
  std::error_code ec;
  EXPECT_TRUE(std::filesystem::exists(save + "/variables.safetensors", ec)) << out;
  std::filesystem::remove_all(tmpl, ec);
  // Fit's progress bar and validation, the learning-rate schedule (halved
  // after the first epoch, on the servers).
  EXPECT_NE(out.find("Epoch 2/2"), std::string::npos) << out;
  EXPECT_NE(out.find("val_accuracy: "), std::string::npos) << out;
  EXPECT_NE(out.find("worker 0 trained 2 epoch(s)"), std::string::npos) << out;
  EXPECT_NE(out.find("learning rate 0.0005"), std::string::npos) << out;
  EXPECT_NE(out.find("saved the model to " + save), std::string::npos) << out;
  // Evaluate counts every test example once across the two workers, and the
  // restored model (new variables from the saved values) scores the same.
  static const std::regex eval_re(
      "evaluate: test loss ([0-9.]+), test accuracy ([0-9.]+) over 10000 examples");
  static const std::regex restored_re(
      "restored model: test loss ([0-9.]+), test accuracy ([0-9.]+) over 10000 examples");
  std::smatch eval, restored;
  ASSERT_TRUE(std::regex_search(out, eval, eval_re)) << out;
  ASSERT_TRUE(std::regex_search(out, restored, restored_re)) << out;
  EXPECT_GE(std::stod(eval[2].str()), 0.72) << out;
  EXPECT_EQ(eval[1].str(), restored[1].str());
  EXPECT_EQ(eval[2].str(), restored[2].str());
}

}  // namespace
}  // namespace distval
