// Tests of the launcher environment (distval/launcher_env.h): Slurm node
// list expansion, rank and size from Open MPI / MPICH / Slurm variables,
// and the rank-to-role rule.
#include "distval/launcher_env.h"

#include <gtest/gtest.h>

#include <map>

namespace distval {
namespace {

using Hosts = std::vector<std::string>;

EnvLookup Env(std::map<std::string, std::string> vars) {
  return [vars](const char* name) -> std::optional<std::string> {
    auto it = vars.find(name);
    if (it == vars.end()) return std::nullopt;
    return it->second;
  };
}

TEST(SlurmNodelistTest, Expands) {
  EXPECT_EQ(*ExpandSlurmNodelist("node[01-03,07],gpu5"),
            (Hosts{"node01", "node02", "node03", "node07", "gpu5"}));
  EXPECT_EQ(*ExpandSlurmNodelist("a"), (Hosts{"a"}));
  EXPECT_EQ(*ExpandSlurmNodelist("a,b,c"), (Hosts{"a", "b", "c"}));
  EXPECT_EQ(*ExpandSlurmNodelist("n[8-11]"), (Hosts{"n8", "n9", "n10", "n11"}));
  EXPECT_EQ(*ExpandSlurmNodelist("n[098-101]"), (Hosts{"n098", "n099", "n100", "n101"}));
  EXPECT_EQ(*ExpandSlurmNodelist("rack[1-2]-n[1,3]"),
            (Hosts{"rack1-n1", "rack1-n3", "rack2-n1", "rack2-n3"}));
  EXPECT_EQ(*ExpandSlurmNodelist("x[5]y,z[1-2]"), (Hosts{"x5y", "z1", "z2"}));
  EXPECT_EQ(*ExpandSlurmNodelist("cn-[1-2].cluster"), (Hosts{"cn-1.cluster", "cn-2.cluster"}));
}

TEST(SlurmNodelistTest, RejectsMalformedLists) {
  for (const char* bad :
       {"", "a,,b", "n[1-", "n]1[", "n[]", "n[3-1]", "n[a-b]", "n[1-2", "n[1[2]]", ",a", "n[-3]"}) {
    auto r = ExpandSlurmNodelist(bad);
    EXPECT_EQ(r.status().code(), StatusCode::kInvalidArgument) << "'" << bad << "'";
  }
  auto big = ExpandSlurmNodelist("n[0-999999]");
  EXPECT_EQ(big.status().code(), StatusCode::kInvalidArgument);
  EXPECT_NE(big.status().message().find("100000"), std::string::npos);
  auto msg = ExpandSlurmNodelist("n[3-1]");
  EXPECT_NE(msg.status().message().find("n[3-1]"), std::string::npos) << msg.status();
}

TEST(LauncherRankTest, OpenMpi) {
  auto r = RankFromEnvironment(Env({{"OMPI_COMM_WORLD_RANK", "3"},
                                    {"OMPI_COMM_WORLD_SIZE", "4"},
                                    {"SLURM_PROCID", "0"},
                                    {"SLURM_NTASKS", "9"}}));
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->source, "openmpi");  // mpirun inside a Slurm allocation: MPI's rank wins
  EXPECT_EQ(r->rank, 3);
  EXPECT_EQ(r->size, 4);
  EXPECT_TRUE(r->hosts.empty());
}

TEST(LauncherRankTest, Mpich) {
  auto r = RankFromEnvironment(Env({{"PMI_RANK", "0"}, {"PMI_SIZE", "2"}}));
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->source, "mpich");
  EXPECT_EQ(r->size, 2);
}

TEST(LauncherRankTest, SlurmWithHosts) {
  auto r = RankFromEnvironment(
      Env({{"SLURM_PROCID", "5"}, {"SLURM_NTASKS", "6"}, {"SLURM_JOB_NODELIST", "gpu[1-3]"}}));
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->source, "slurm");
  EXPECT_EQ(r->rank, 5);
  EXPECT_EQ(r->hosts, (Hosts{"gpu1", "gpu2", "gpu3"}));
  auto step = RankFromEnvironment(
      Env({{"SLURM_PROCID", "0"}, {"SLURM_NTASKS", "1"}, {"SLURM_STEP_NODELIST", "a,b"}}));
  ASSERT_TRUE(step.ok());
  EXPECT_EQ(step->hosts, (Hosts{"a", "b"}));
}

TEST(LauncherRankTest, Errors) {
  auto none = RankFromEnvironment(Env({}));
  EXPECT_EQ(none.status().code(), StatusCode::kNotFound);
  EXPECT_NE(none.status().message().find("OMPI_COMM_WORLD_RANK"), std::string::npos);
  EXPECT_NE(none.status().message().find("SLURM_PROCID"), std::string::npos);
  auto nosize = RankFromEnvironment(Env({{"OMPI_COMM_WORLD_RANK", "0"}}));
  EXPECT_EQ(nosize.status().code(), StatusCode::kInvalidArgument);
  EXPECT_NE(nosize.status().message().find("OMPI_COMM_WORLD_SIZE"), std::string::npos);
  auto text = RankFromEnvironment(Env({{"SLURM_PROCID", "x"}, {"SLURM_NTASKS", "2"}}));
  EXPECT_EQ(text.status().code(), StatusCode::kInvalidArgument);
  EXPECT_NE(text.status().message().find("SLURM_PROCID='x'"), std::string::npos);
  auto high = RankFromEnvironment(Env({{"PMI_RANK", "2"}, {"PMI_SIZE", "2"}}));
  EXPECT_EQ(high.status().code(), StatusCode::kInvalidArgument);
  auto zero = RankFromEnvironment(Env({{"PMI_RANK", "0"}, {"PMI_SIZE", "0"}}));
  EXPECT_EQ(zero.status().code(), StatusCode::kInvalidArgument);
  auto badlist = RankFromEnvironment(
      Env({{"SLURM_PROCID", "0"}, {"SLURM_NTASKS", "1"}, {"SLURM_JOB_NODELIST", "n[2-1]"}}));
  EXPECT_EQ(badlist.status().code(), StatusCode::kInvalidArgument);
  EXPECT_NE(badlist.status().message().find("SLURM_JOB_NODELIST"), std::string::npos);
}

TEST(AssignTaskTest, FirstRanksServe) {
  LauncherRank r;
  r.size = 5;
  std::vector<std::pair<TaskType, int>> got;
  for (r.rank = 0; r.rank < 5; ++r.rank) {
    auto t = AssignTask(r, 2);
    ASSERT_TRUE(t.ok()) << t.status();
    EXPECT_EQ(t->num_ps, 2);
    EXPECT_EQ(t->num_workers, 3);
    got.emplace_back(t->type, t->index);
  }
  EXPECT_EQ(got, (std::vector<std::pair<TaskType, int>>{{TaskType::kPs, 0},
                                                        {TaskType::kPs, 1},
                                                        {TaskType::kWorker, 0},
                                                        {TaskType::kWorker, 1},
                                                        {TaskType::kWorker, 2}}));
  r.rank = 0;
  EXPECT_EQ(AssignTask(r, 0).status().code(), StatusCode::kInvalidArgument);
  auto all = AssignTask(r, 5);
  EXPECT_EQ(all.status().code(), StatusCode::kInvalidArgument);
  EXPECT_NE(all.status().message().find("--num-ps 5"), std::string::npos);
}

}  // namespace
}  // namespace distval
