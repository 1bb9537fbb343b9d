// InputContext, auto-sharding, epoch plans, gather.
#include "distval/input_pipeline.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <memory>
#include <set>
#include <vector>

#include "distval/devices.h"

namespace distval {
namespace {

bool Contains(const Status& s, const std::string& text) {
  return s.message().find(text) != std::string::npos;
}

// n examples with 3 features (i, i + 0.5, -i) and label i % 10.
std::shared_ptr<const Examples> Synthetic(int64_t n, std::vector<int64_t> file_sizes = {}) {
  auto ex = std::make_shared<Examples>();
  ex->features = Tensor(DType::kF32, Shape{n, 3});
  float* f = ex->features.data_as<float>();
  for (int64_t i = 0; i < n; ++i) {
    f[i * 3] = static_cast<float>(i);
    f[i * 3 + 1] = static_cast<float>(i) + 0.5f;
    f[i * 3 + 2] = -static_cast<float>(i);
    ex->labels.push_back(static_cast<int32_t>(i % 10));
  }
  ex->file_sizes = file_sizes.empty() ? std::vector<int64_t>{n} : file_sizes;
  ex->num_classes = 10;
  return ex;
}

DistributedDataset MustCreate(std::shared_ptr<const Examples> ex, InputContext ctx,
                              InputOptions opt) {
  auto ds = DistributedDataset::Create(std::move(ex), ctx, opt);
  EXPECT_TRUE(ds.ok()) << ds.status();
  return std::move(*ds);
}

// Every index a worker uses in an epoch, by walking the plan step by step.
std::vector<int64_t> Walk(const EpochPlan& plan) {
  std::vector<int64_t> all;
  for (int64_t s = 0; s < plan.num_steps(); ++s)
    for (int r = 0; r < plan.num_local_replicas(); ++r)
      for (int64_t i : plan.ReplicaBatch(s, r)) all.push_back(i);
  return all;
}

TEST(InputContextTest, PerReplicaBatch) {
  InputContext ctx{/*num_input_pipelines=*/2, /*input_pipeline_id=*/1,
                   /*num_replicas_in_sync=*/4};
  ASSERT_TRUE(ctx.Validate().ok());
  EXPECT_EQ(ctx.num_local_replicas(), 2);
  auto b = ctx.GetPerReplicaBatchSize(64);
  ASSERT_TRUE(b.ok());
  EXPECT_EQ(*b, 16);
  auto bad = ctx.GetPerReplicaBatchSize(66);
  ASSERT_FALSE(bad.ok());
  EXPECT_EQ(bad.status().code(), StatusCode::kInvalidArgument);
  EXPECT_TRUE(Contains(bad.status(),
                       "global batch size 66 does not divide evenly across 4 "
                       "replicas"))
      << bad.status();
  EXPECT_FALSE(ctx.GetPerReplicaBatchSize(0).ok());
}

TEST(InputContextTest, ValidateNamesTheProblem) {
  EXPECT_TRUE(Contains(InputContext{2, 2, 4}.Validate(), "input_pipeline_id 2 is outside [0, 2)"));
  EXPECT_TRUE(Contains(InputContext{2, 0, 3}.Validate(), "num_replicas_in_sync (3)"));
  EXPECT_EQ((InputContext{0, 0, 1}.Validate().code()), StatusCode::kInvalidArgument);
}

TEST(AutoShardPolicyTest, ParsesNames) {
  EXPECT_EQ(*ParseAutoShardPolicy("data"), AutoShardPolicy::kData);
  EXPECT_EQ(*ParseAutoShardPolicy("file"), AutoShardPolicy::kFile);
  EXPECT_EQ(*ParseAutoShardPolicy("off"), AutoShardPolicy::kOff);
  EXPECT_TRUE(Contains(ParseAutoShardPolicy("auto").status(), "\"auto\""));
}

TEST(DistributedDatasetTest, DataShardsOfTwoWorkersAreDisjointAndCoverTheData) {
  auto ex = Synthetic(1000);
  InputOptions opt;
  opt.global_batch_size = 40;  // 2 workers x 2 replicas x 10
  opt.seed = 5;
  for (int64_t epoch : {0, 1}) {
    std::set<int64_t> seen;
    size_t total = 0;
    for (int w = 0; w < 2; ++w) {
      DistributedDataset ds = MustCreate(ex, InputContext{2, w, 4}, opt);
      EXPECT_EQ(ds.per_replica_batch(), 10);
      EXPECT_EQ(ds.steps_per_epoch(), 25);
      const auto idx = Walk(ds.PlanEpoch(epoch));
      EXPECT_EQ(idx.size(), 500u);
      total += idx.size();
      seen.insert(idx.begin(), idx.end());
    }
    EXPECT_EQ(total, 1000u);
    EXPECT_EQ(seen.size(), 1000u);  // disjoint and covering
  }
}

TEST(DistributedDatasetTest, DataShardsMatchSingleProcessStepsAsSets) {
  auto ex = Synthetic(997);
  InputOptions opt;
  opt.global_batch_size = 24;
  opt.seed = 17;
  DistributedDataset single = MustCreate(ex, InputContext{1, 0, 1}, opt);
  DistributedDataset w0 = MustCreate(ex, InputContext{2, 0, 4}, opt);
  DistributedDataset w1 = MustCreate(ex, InputContext{2, 1, 4}, opt);
  ASSERT_EQ(single.steps_per_epoch(), 41);  // 997 / 24, tail dropped
  ASSERT_EQ(w0.steps_per_epoch(), 41);
  ASSERT_EQ(w1.steps_per_epoch(), 41);
  const EpochPlan ps = single.PlanEpoch(2), p0 = w0.PlanEpoch(2), p1 = w1.PlanEpoch(2);
  for (int64_t s = 0; s < ps.num_steps(); ++s) {
    std::multiset<int64_t> want, got;
    for (int64_t i : ps.ReplicaBatch(s, 0)) want.insert(i);
    for (const EpochPlan* p : {&p0, &p1})
      for (int r = 0; r < 2; ++r) {
        EXPECT_EQ(p->ReplicaBatch(s, r).size(), 6u);
        for (int64_t i : p->ReplicaBatch(s, r)) got.insert(i);
      }
    ASSERT_EQ(got, want) << "step " << s;
  }
}

TEST(DistributedDatasetTest, OrderIsAPureFunctionOfSeedAndEpoch) {
  auto ex = Synthetic(500);
  InputOptions opt;
  opt.global_batch_size = 20;
  opt.seed = 3;
  const InputContext ctx{2, 1, 2};
  const auto a = MustCreate(ex, ctx, opt).PlanEpoch(4).order();
  const auto b = MustCreate(Synthetic(500), ctx, opt).PlanEpoch(4).order();
  EXPECT_EQ(a, b);
  EXPECT_NE(a, MustCreate(ex, ctx, opt).PlanEpoch(5).order());
  opt.seed = 4;
  EXPECT_NE(a, MustCreate(ex, ctx, opt).PlanEpoch(4).order());
  // Without shuffling: every N-th example in file order.
  opt.shuffle = false;
  const auto plain = MustCreate(ex, ctx, opt).PlanEpoch(0).order();
  ASSERT_GE(plain.size(), 3u);
  EXPECT_EQ(plain[0], 1);
  EXPECT_EQ(plain[1], 3);
  EXPECT_EQ(plain[2], 5);
}

TEST(DistributedDatasetTest, FilePolicySplitsFilesAcrossWorkers) {
  auto ex = Synthetic(1000, {300, 300, 400});
  InputOptions opt;
  opt.global_batch_size = 20;
  opt.shard_policy = AutoShardPolicy::kFile;
  DistributedDataset w0 = MustCreate(ex, InputContext{2, 0, 2}, opt);
  DistributedDataset w1 = MustCreate(ex, InputContext{2, 1, 2}, opt);
  // Worker 0 has files 0 and 2 (700), worker 1 file 1 (300); 10 per worker
  // step: both stop after 30 steps.
  EXPECT_EQ(w0.steps_per_epoch(), 30);
  EXPECT_EQ(w1.steps_per_epoch(), 30);
  opt.drop_remainder = false;
  const auto all0 = MustCreate(ex, InputContext{2, 0, 2}, opt).PlanEpoch(0).order();
  const auto all1 = MustCreate(ex, InputContext{2, 1, 2}, opt).PlanEpoch(0).order();
  EXPECT_EQ(all0.size(), 700u);
  EXPECT_EQ(all1.size(), 300u);
  for (int64_t i : all1) EXPECT_TRUE(i >= 300 && i < 600) << i;
  std::set<int64_t> seen(all0.begin(), all0.end());
  seen.insert(all1.begin(), all1.end());
  EXPECT_EQ(seen.size(), 1000u);

  auto too_few = DistributedDataset::Create(Synthetic(1000), InputContext{2, 0, 2}, opt);
  ASSERT_FALSE(too_few.ok());
  EXPECT_EQ(too_few.status().code(), StatusCode::kInvalidArgument);
  EXPECT_TRUE(Contains(too_few.status(), "1 file(s) for 2 workers")) << too_few.status();
}

TEST(DistributedDatasetTest, OffPolicyGivesEveryWorkerEverything) {
  auto ex = Synthetic(100);
  InputOptions opt;
  opt.global_batch_size = 10;
  opt.shard_policy = AutoShardPolicy::kOff;
  const auto a = MustCreate(ex, InputContext{2, 0, 2}, opt).PlanEpoch(1).order();
  const auto b = MustCreate(ex, InputContext{2, 1, 2}, opt).PlanEpoch(1).order();
  EXPECT_EQ(a, b);
  EXPECT_EQ(std::set<int64_t>(a.begin(), a.end()).size(), 100u);
}

TEST(DistributedDatasetTest, LimitAndRemainder) {
  auto ex = Synthetic(1000);
  InputOptions opt;
  opt.global_batch_size = 8;
  opt.limit = 100;
  DistributedDataset ds = MustCreate(ex, InputContext{1, 0, 2}, opt);
  EXPECT_EQ(ds.num_examples(), 100);
  EXPECT_EQ(ds.steps_per_epoch(), 12);  // 96 used, 4 dropped
  auto idx = Walk(ds.PlanEpoch(0));
  EXPECT_EQ(idx.size(), 96u);
  for (int64_t i : idx) EXPECT_LT(i, 100);

  opt.drop_remainder = false;
  ds = MustCreate(ex, InputContext{1, 0, 2}, opt);
  EXPECT_EQ(ds.steps_per_epoch(), 13);
  const EpochPlan plan = ds.PlanEpoch(0);
  EXPECT_EQ(plan.ReplicaBatch(12, 0).size(), 4u);
  EXPECT_EQ(plan.ReplicaBatch(12, 1).size(), 0u);
  EXPECT_EQ(Walk(plan).size(), 100u);

  opt.limit = 7;
  opt.drop_remainder = true;
  auto none = DistributedDataset::Create(ex, InputContext{1, 0, 2}, opt);
  EXPECT_EQ(none.status().code(), StatusCode::kInvalidArgument);
  EXPECT_TRUE(Contains(none.status(), "7 examples (after limit 7)")) << none.status();

  opt.global_batch_size = 9;
  auto odd = DistributedDataset::Create(ex, InputContext{1, 0, 2}, opt);
  EXPECT_TRUE(Contains(odd.status(), "global batch size 9 does not divide evenly")) << odd.status();
}

TEST(GatherTest, GathersRowsAndLabelsAndLoadsADeviceBatch) {
  auto ex = Synthetic(50);
  const std::vector<int64_t> idx = {7, 2, 49};
  std::vector<float> f(9);
  std::vector<int32_t> l(3);
  ASSERT_TRUE(GatherExamples(*ex, idx, f.data(), l.data()).ok());
  EXPECT_EQ(f, (std::vector<float>{7, 7.5f, -7, 2, 2.5f, -2, 49, 49.5f, -49}));
  EXPECT_EQ(l, (std::vector<int32_t>{7, 2, 9}));
  const std::vector<float> want_f = f;
  const std::vector<int32_t> want_l = l;
  const std::vector<int64_t> bad = {1, 50};
  Status s = GatherExamples(*ex, bad, f.data(), l.data());
  EXPECT_TRUE(Contains(s, "index 50 (position 1) is outside [0, 50)")) << s;

  auto backend = CreateBackend({DeviceKind::kCpu, 0});
  ASSERT_TRUE(backend.ok());
  auto batch = DeviceBatch::Create(backend->get(), 4, 3);
  ASSERT_TRUE(batch.ok()) << batch.status();
  ASSERT_TRUE(batch->Load(*ex, idx).ok());
  EXPECT_EQ(batch->size(), 3);
  std::vector<float> df(9);
  std::vector<int32_t> dl(3);
  ASSERT_TRUE((*backend)->CopyToHost(batch->features(), df.data(), 9).ok());
  ASSERT_TRUE((*backend)->CopyToHost(batch->labels(), dl.data(), 3).ok());
  EXPECT_EQ(df, want_f);
  EXPECT_EQ(dl, want_l);
  const std::vector<int64_t> five = {0, 1, 2, 3, 4};
  EXPECT_EQ(batch->Load(*ex, five).code(), StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace distval
