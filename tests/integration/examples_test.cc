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

}  // namespace
}  // namespace distval
