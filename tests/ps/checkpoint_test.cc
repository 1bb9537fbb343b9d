#include "checkpoint.h"

#include <fcntl.h>
#include <gtest/gtest.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <random>
#include <string>
#include <vector>

#include "server.h"

namespace distval::ps {
namespace {

namespace fs = std::filesystem;
using protocol::OptimizerKind;
using protocol::VariableSpec;

VariableSpec Spec(std::string name, std::vector<int64_t> shape, OptimizerKind kind) {
  VariableSpec s;
  s.name = std::move(name);
  s.shape = std::move(shape);
  s.optimizer.kind = kind;
  s.optimizer.learning_rate = 0.1;
  s.initializer.kind = protocol::InitUniform{-1.0, 1.0};
  s.initializer.seed = 3;
  return s;
}

std::vector<float> Params(const Variable& v) {
  std::vector<float> out(static_cast<size_t>(v.num_elements()));
  EXPECT_TRUE(VariableStore::ReadDense(v, v.rows(), out.data()).ok());
  return out;
}

// (slot name, values) of every optimizer slot, plus the step.
struct OptState {
  int64_t step = 0;
  std::vector<std::pair<std::string, std::vector<float>>> slots;
};
OptState Opt(const Variable& v) {
  OptState out;
  EXPECT_TRUE(VariableStore::VisitState(v, [&](const Tensor&, const Optimizer& o, uint64_t) {
                out.step = o.step();
                for (const auto& [name, t] : o.Slots())
                  out.slots.emplace_back(
                      name, std::vector<float>(t->data_as<float>(),
                                               t->data_as<float>() + t->num_elements()));
                return OkStatus();
              }).ok());
  return out;
}

class CheckpointTest : public ::testing::Test {
 protected:
  void SetUp() override {
    char tmpl[] = "/tmp/distval-ckpt-XXXXXX";
    ASSERT_NE(::mkdtemp(tmpl), nullptr);
    root_ = tmpl;
  }
  void TearDown() override { fs::remove_all(root_); }

  // Two variables with optimizer state after a few steps.
  void Fill(VariableStore& store, int shard = 0) {
    auto w =
        store.Create(Spec("w", {10, 4}, OptimizerKind::kAdam), {shard * 5, shard * 5 + 5}, nullptr);
    ASSERT_TRUE(w.ok()) << w.status();
    auto b = store.Create(Spec("b", {4}, OptimizerKind::kMomentum), {0, 4}, nullptr);
    ASSERT_TRUE(b.ok()) << b.status();
    std::mt19937 rng(11);
    std::normal_distribution<float> g;
    for (int step = 0; step < 3; ++step) {
      std::vector<float> gw(20), gb(4);
      for (float& x : gw) x = g(rng);
      for (float& x : gb) x = g(rng);
      ASSERT_TRUE(VariableStore::ApplyDense(**w, (*w)->rows(), gw.data(), 1, 1).ok());
      ASSERT_TRUE(VariableStore::ApplyDense(**b, (*b)->rows(), gb.data(), 1, 1).ok());
    }
    ASSERT_TRUE(store.SetLearningRate("b", 0.25).ok());
  }

  CheckpointShardInfo Info(int64_t clock, int shard = 0, int shards = 1) {
    CheckpointShardInfo info;
    info.shard_index = shard;
    info.num_shards = shards;
    info.clock = clock;
    info.staleness = 2;
    info.worker_clocks = {clock, clock + 1, clock + 2};
    return info;
  }

  static void ExpectError(const Status& s, StatusCode code,
                          const std::vector<std::string>& needles) {
    EXPECT_EQ(s.code(), code) << s;
    for (const std::string& n : needles)
      EXPECT_NE(s.message().find(n), std::string::npos) << "'" << n << "' not in: " << s;
  }

  std::string root_;
};

TEST_F(CheckpointTest, RoundTripKeepsValuesSlotsStepVersionAndClocks) {
  VariableStore store;
  Fill(store);
  auto dir = WriteCheckpoint(root_, Info(7), store);
  ASSERT_TRUE(dir.ok()) << dir.status();
  EXPECT_EQ(*dir, root_ + "/ckpt-000000000007");

  VariableStore restored;
  auto r = RestoreCheckpoint(*dir, 0, 1, restored);
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->info.clock, 7);
  EXPECT_EQ(r->info.staleness, 2);
  EXPECT_EQ(r->info.worker_clocks, (std::vector<int64_t>{7, 8, 9}));
  ASSERT_EQ(r->variables.size(), 2u);
  for (const char* name : {"w", "b"}) {
    Variable* a = *store.Find(name);
    auto found = restored.Find(name);
    ASSERT_TRUE(found.ok()) << name;
    Variable* b = *found;
    EXPECT_EQ(a->spec(), b->spec()) << name;
    EXPECT_EQ(a->rows(), b->rows()) << name;
    EXPECT_EQ(Params(*a), Params(*b)) << name;
    EXPECT_EQ(a->version(), b->version()) << name;
    EXPECT_EQ(a->version(), 3u);
    EXPECT_EQ(a->learning_rate(), b->learning_rate()) << name;
    OptState oa = Opt(*a), ob = Opt(*b);
    EXPECT_EQ(oa.step, 3);
    EXPECT_EQ(oa.step, ob.step) << name;
    ASSERT_FALSE(oa.slots.empty()) << name;
    EXPECT_EQ(oa.slots, ob.slots) << name;
  }
  EXPECT_EQ((*restored.Find("b"))->learning_rate(), 0.25);
  // Training goes on identically from the restored state.
  std::vector<float> g(20, 0.5f);
  Variable* wa = *store.Find("w");
  Variable* wb = *restored.Find("w");
  ASSERT_TRUE(VariableStore::ApplyDense(*wa, wa->rows(), g.data(), 1, 1).ok());
  ASSERT_TRUE(VariableStore::ApplyDense(*wb, wb->rows(), g.data(), 1, 1).ok());
  EXPECT_EQ(Params(*wa), Params(*wb));
}

TEST_F(CheckpointTest, CorruptionIsRefusedNamingTheFile) {
  VariableStore store;
  Fill(store);
  auto dir = WriteCheckpoint(root_, Info(4), store);
  ASSERT_TRUE(dir.ok()) << dir.status();
  const std::string data = *dir + "/shard-0-of-1.dvckpt";
  std::vector<char> orig;
  {
    std::ifstream f(data, std::ios::binary);
    orig.assign(std::istreambuf_iterator<char>(f), {});
  }
  auto write = [&](const std::vector<char>& bytes) {
    std::ofstream f(data, std::ios::binary | std::ios::trunc);
    f.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
  };
  auto restore = [&] {
    VariableStore s;
    return RestoreCheckpoint(*dir, 0, 1, s).status();
  };
  ASSERT_TRUE(restore().ok());
  // A flipped byte in the last tensor.
  std::vector<char> bad = orig;
  bad[bad.size() - 3] ^= 0x01;
  write(bad);
  ExpectError(restore(), StatusCode::kDataLoss, {data, "checksum mismatch", "crc32c"});
  // A flipped byte in the header.
  bad = orig;
  bad[40] ^= 0x20;
  write(bad);
  ExpectError(restore(), StatusCode::kDataLoss, {data, "header"});
  // Truncated.
  bad.assign(orig.begin(), orig.begin() + static_cast<long>(orig.size() / 2));
  write(bad);
  ExpectError(restore(), StatusCode::kDataLoss, {data, "truncated", "bytes"});
  // The data file missing.
  fs::remove(data);
  ExpectError(restore(), StatusCode::kNotFound, {data});
}

TEST_F(CheckpointTest, MissingShardAndShardCountMismatchAreRefused) {
  VariableStore s0, s1;
  Fill(s0, 0);
  Fill(s1, 1);
  ASSERT_TRUE(WriteCheckpoint(root_, Info(5, 0, 2), s0).ok());
  const std::string dir = root_ + "/ckpt-000000000005";
  {
    VariableStore s;
    ExpectError(RestoreCheckpoint(dir, 0, 2, s).status(), StatusCode::kNotFound,
                {"missing shard 1", dir + "/manifest-1-of-2.json"});
  }
  // Not complete: "latest" does not pick it.
  EXPECT_EQ(FindLatestCheckpoint(root_, 2).status().code(), StatusCode::kNotFound);
  ASSERT_TRUE(WriteCheckpoint(root_, Info(5, 1, 2), s1).ok());
  auto latest = FindLatestCheckpoint(root_, 2);
  ASSERT_TRUE(latest.ok()) << latest.status();
  EXPECT_EQ(*latest, dir);
  for (int shard : {0, 1}) {
    VariableStore s;
    auto r = RestoreCheckpoint(dir, shard, 2, s);
    ASSERT_TRUE(r.ok()) << r.status();
    EXPECT_EQ((*s.Find("w"))->rows().begin, shard * 5);
  }
  {
    VariableStore s;
    ExpectError(RestoreCheckpoint(dir, 0, 3, s).status(), StatusCode::kFailedPrecondition,
                {"num_shards", "manifest-0-of-2.json"});
  }
}

TEST_F(CheckpointTest, LatestSkipsIncompleteAndKeepPrunes) {
  VariableStore store;
  Fill(store);
  for (int64_t c : {2, 4, 6, 8}) ASSERT_TRUE(WriteCheckpoint(root_, Info(c), store).ok());
  // An interrupted write of clock 10: data file, no manifest.
  fs::create_directories(root_ + "/ckpt-000000000010");
  std::ofstream(root_ + "/ckpt-000000000010/shard-0-of-1.dvckpt.tmp") << "partial";
  // And an older interrupted one (clock 3).
  fs::create_directories(root_ + "/ckpt-000000000003");
  std::ofstream(root_ + "/ckpt-000000000003/shard-0-of-1.dvckpt.tmp") << "partial";
  auto latest = FindLatestCheckpoint(root_, 1);
  ASSERT_TRUE(latest.ok());
  EXPECT_EQ(*latest, root_ + "/ckpt-000000000008");
  ASSERT_TRUE(PruneCheckpoints(root_, 0, 1, 2).ok());
  EXPECT_FALSE(fs::exists(root_ + "/ckpt-000000000002"));
  EXPECT_FALSE(fs::exists(root_ + "/ckpt-000000000003"));
  EXPECT_FALSE(fs::exists(root_ + "/ckpt-000000000004"));
  EXPECT_TRUE(fs::exists(root_ + "/ckpt-000000000010"));  // newer than the kept ones
  EXPECT_TRUE(fs::exists(root_ + "/ckpt-000000000006/manifest-0-of-1.json"));
  EXPECT_TRUE(fs::exists(root_ + "/ckpt-000000000008/manifest-0-of-1.json"));
  // Rewriting at the same clock replaces the checkpoint and it still loads.
  ASSERT_TRUE(WriteCheckpoint(root_, Info(8), store).ok());
  VariableStore s;
  EXPECT_TRUE(RestoreCheckpoint(root_ + "/ckpt-000000000008", 0, 1, s).ok());
}

TEST_F(CheckpointTest, ValuesInitializedVariableRoundTrips) {
  VariableStore store;
  VariableSpec spec = Spec("e", {3, 2}, OptimizerKind::kSgd);
  protocol::InitValues iv;
  iv.values.frame = 4;
  iv.values.dtype = DType::kF32;
  iv.values.shape = {3, 2};
  spec.initializer.kind = iv;
  const float init[6] = {1, 2, 3, 4, 5, 6};
  ASSERT_TRUE(store.Create(spec, {0, 3}, init).ok());
  auto dir = WriteCheckpoint(root_, Info(1), store);
  ASSERT_TRUE(dir.ok()) << dir.status();
  VariableStore restored;
  auto r = RestoreCheckpoint(*dir, 0, 1, restored);
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(Params(**restored.Find("e")), (std::vector<float>{1, 2, 3, 4, 5, 6}));
  // A worker creating it again with its spec finds the same variable.
  EXPECT_TRUE(restored.Create(spec, {0, 3}, init).ok());
}

TEST(CheckpointOptionsTest, ParseCheckpointEveryAndNanPolicy) {
  ServerOptions o;
  ASSERT_TRUE(ParseCheckpointEvery("10", &o).ok());
  EXPECT_EQ(o.checkpoint_every_clocks, 10);
  EXPECT_EQ(o.checkpoint_every_seconds, 0);
  ASSERT_TRUE(ParseCheckpointEvery("30s", &o).ok());
  EXPECT_EQ(o.checkpoint_every_clocks, 0);
  EXPECT_EQ(o.checkpoint_every_seconds, 30);
  for (const char* bad : {"", "s", "0", "0s", "-3", "3m", "1.5s", "x10"})
    EXPECT_EQ(ParseCheckpointEvery(bad, &o).code(), StatusCode::kInvalidArgument) << bad;
  EXPECT_EQ(*ParseNanPolicy("reject"), NanPolicy::kReject);
  EXPECT_EQ(*ParseNanPolicy("skip"), NanPolicy::kSkip);
  EXPECT_EQ(*ParseNanPolicy("allow"), NanPolicy::kAllow);
  EXPECT_EQ(ParseNanPolicy("ignore").status().code(), StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace distval::ps
