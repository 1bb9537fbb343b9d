// Launching by rank: distval-rank under an emulated mpirun (Open MPI
// variables), distval-ps / distval-worker --from-env under an emulated srun
// (Slurm variables), both meeting through a rendezvous directory, and the
// start-up errors (no launcher, a rank of the wrong role, servers that never
// publish).
#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "child_process.h"
#include "distval/dataset.h"
#include "local_cluster.h"

namespace distval {
namespace {

using nlohmann::json;
using testing::ChildProcess;
using testing::ProcessResult;
using Env = std::vector<std::pair<std::string, std::string>>;

bool HaveData() {
  return std::filesystem::exists(FashionMnistFiles(kDefaultFashionMnistDir, Split::kTest).images);
}

class LauncherTest : public ::testing::Test {
 protected:
  void SetUp() override {
    ps_bin_ = testing::BinaryFromEnv("DISTVAL_PS_BIN");
    worker_bin_ = testing::BinaryFromEnv("DISTVAL_WORKER_BIN");
    rank_bin_ = testing::BinaryFromEnv("DISTVAL_RANK_BIN");
    ASSERT_FALSE(ps_bin_.empty() || worker_bin_.empty() || rank_bin_.empty());
    char tmpl[] = "/tmp/distval-launcher-test-XXXXXX";
    ASSERT_NE(mkdtemp(tmpl), nullptr);
    dir_ = tmpl;
  }
  void TearDown() override {
    std::error_code ec;
    std::filesystem::remove_all(dir_, ec);
  }
  std::string Path(const std::string& name) const { return dir_ + "/" + name; }

  std::string ps_bin_, worker_bin_, rank_bin_, dir_;
};

TEST_F(LauncherTest, MpirunStyleDistvalRankTrainsAndStops) {
  if (!HaveData()) GTEST_SKIP() << "Fashion-MNIST not installed";
  constexpr int kSize = 4;
  std::vector<ChildProcess> ranks;
  // Started in reverse order: workers first, so that they really wait.
  for (int r = kSize - 1; r >= 0; --r) {
    std::vector<std::string> args = {
        rank_bin_,  "--num-ps", "2",  "--rendezvous",   Path("rdv"),
        "--ps-bin", ps_bin_,    "--", worker_bin_,      "--train-limit",
        "3000",     "--epochs", "1",  "--summary-json", Path("summary-{index}.json")};
    auto p = ChildProcess::Start(
        args, Path("rank-" + std::to_string(r) + ".log"),
        {{"OMPI_COMM_WORLD_RANK", std::to_string(r)}, {"OMPI_COMM_WORLD_SIZE", "4"}});
    ASSERT_TRUE(p.ok()) << p.status();
    ranks.push_back(std::move(*p));
  }
  std::vector<ProcessResult> results;
  for (auto& p : ranks) results.push_back(p.Wait(120));
  // ranks[i] is rank kSize - 1 - i.
  for (int i = 0; i < kSize; ++i) {
    const int r = kSize - 1 - i;
    ASSERT_FALSE(results[i].timed_out) << "rank " << r << ":\n" << results[i].output;
    EXPECT_EQ(results[i].exit_code, 0) << "rank " << r << ":\n" << results[i].output;
  }
  // Ranks 0 and 1 served (their start lines name the launcher and what they
  // published), 2 and 3 trained as workers 0 and 1.
  const std::string& ps0 = results[3].output;
  EXPECT_NE(ps0.find("role=ps index=0 num_shards=2"), std::string::npos) << ps0;
  EXPECT_NE(ps0.find("launcher=openmpi:0/4"), std::string::npos) << ps0;
  EXPECT_NE(ps0.find("published tcp://127.0.0.1:"), std::string::npos) << ps0;
  EXPECT_NE(ps0.find("shutdown requested"), std::string::npos) << ps0;
  EXPECT_NE(results[0].output.find("role=worker index=1 num_workers=2"), std::string::npos);
  EXPECT_NE(results[1].output.find("every worker finished; servers stopped"), std::string::npos)
      << results[1].output;
  for (int w = 0; w < 2; ++w) {
    std::ifstream f(Path("summary-" + std::to_string(w) + ".json"));
    ASSERT_TRUE(f.good()) << "worker " << w << " wrote no summary";
    json s = json::parse(f);
    EXPECT_EQ(s.at("worker"), w);
    EXPECT_EQ(s.at("num_workers"), 2);
    EXPECT_EQ(s.at("steps"), 3000 / 64) << s.dump();  // whole global batches
  }
}

TEST_F(LauncherTest, SrunStyleFromEnv) {
  if (!HaveData()) GTEST_SKIP() << "Fashion-MNIST not installed";
  const Env slurm = {{"SLURM_NTASKS", "3"}, {"SLURM_JOB_NODELIST", "node[1-3]"}};
  auto with_rank = [&](int r) {
    Env e = slurm;
    e.emplace_back("SLURM_PROCID", std::to_string(r));
    return e;
  };
  auto ps =
      ChildProcess::Start({ps_bin_, "--from-env", "--num-ps", "1", "--rendezvous", Path("rdv"),
                           "--bind", "tcp://*:0", "--advertise-host", "127.0.0.1"},
                          Path("ps.log"), with_rank(0));
  ASSERT_TRUE(ps.ok());
  std::vector<ChildProcess> workers;
  for (int r = 1; r <= 2; ++r) {
    auto w = ChildProcess::Start({worker_bin_, "--from-env", "--num-ps", "1", "--rendezvous",
                                  Path("rdv"), "--train-limit", "2000", "--epochs", "1"},
                                 Path("w" + std::to_string(r) + ".log"), with_rank(r));
    ASSERT_TRUE(w.ok());
    workers.push_back(std::move(*w));
  }
  for (int i = 0; i < 2; ++i) {
    ProcessResult res = workers[i].Wait(120);
    ASSERT_FALSE(res.timed_out) << res.output;
    EXPECT_EQ(res.exit_code, 0) << res.output;
    EXPECT_NE(res.output.find("role=worker index=" + std::to_string(i) + " num_workers=2"),
              std::string::npos)
        << res.output;
    EXPECT_NE(res.output.find("launcher=slurm:" + std::to_string(i + 1) + "/3"), std::string::npos)
        << res.output;
    // The wildcard bind was advertised with the given host.
    EXPECT_NE(res.output.find("ps=tcp://127.0.0.1:"), std::string::npos) << res.output;
    EXPECT_NE(res.output.find("done: "), std::string::npos) << res.output;
  }
  ProcessResult ps_res = ps->Wait(0.1);  // still serving: killed
  EXPECT_NE(ps_res.output.find("launcher=slurm:0/3"), std::string::npos) << ps_res.output;
  EXPECT_NE(ps_res.output.find("endpoint=tcp://0.0.0.0:"), std::string::npos) << ps_res.output;
}

TEST_F(LauncherTest, StartupErrorsNameTheProblem) {
  // No launcher variables.
  ProcessResult none =
      testing::RunProcess({ps_bin_, "--from-env", "--num-ps", "1"}, Path("none.log"), 30);
  EXPECT_EQ(none.exit_code, 2) << none.output;
  EXPECT_NE(none.output.find("OMPI_COMM_WORLD_RANK"), std::string::npos) << none.output;

  // A worker rank given to distval-ps, a server rank given to distval-worker.
  auto ps = ChildProcess::Start({ps_bin_, "--from-env", "--num-ps", "1"}, Path("ps1.log"),
                                {{"PMI_RANK", "1"}, {"PMI_SIZE", "3"}});
  ASSERT_TRUE(ps.ok());
  ProcessResult ps_res = ps->Wait(30);
  EXPECT_EQ(ps_res.exit_code, 2) << ps_res.output;
  EXPECT_NE(ps_res.output.find("rank 1 of 3 is worker 0 under --num-ps 1"), std::string::npos)
      << ps_res.output;
  auto w =
      ChildProcess::Start({worker_bin_, "--from-env", "--num-ps", "2", "--rendezvous", Path("rdv")},
                          Path("w0.log"), {{"PMI_RANK", "1"}, {"PMI_SIZE", "3"}});
  ASSERT_TRUE(w.ok());
  ProcessResult w_res = w->Wait(30);
  EXPECT_EQ(w_res.exit_code, 2) << w_res.output;
  EXPECT_NE(w_res.output.find("is parameter server 1 under --num-ps 2"), std::string::npos)
      << w_res.output;
  auto all = ChildProcess::Start({worker_bin_, "--from-env", "--num-ps", "3", "--ps", "a:1"},
                                 Path("w1.log"), {{"PMI_RANK", "1"}, {"PMI_SIZE", "3"}});
  ASSERT_TRUE(all.ok());
  ProcessResult all_res = all->Wait(30);
  EXPECT_EQ(all_res.exit_code, 2) << all_res.output;
  EXPECT_NE(all_res.output.find("--num-ps 3 must be in [1, 3)"), std::string::npos)
      << all_res.output;

  // Servers that never publish: the worker gives up naming the files.
  ProcessResult late = testing::RunProcess(
      {worker_bin_, "--rendezvous", Path("empty"), "--num-ps", "2", "--rendezvous-timeout", "1"},
      Path("late.log"), 30);
  EXPECT_EQ(late.exit_code, 1) << late.output;
  EXPECT_NE(late.output.find(Path("empty") + "/ps-0.endpoint"), std::string::npos) << late.output;
  EXPECT_NE(late.output.find(Path("empty") + "/ps-1.endpoint"), std::string::npos) << late.output;
}

}  // namespace
}  // namespace distval
