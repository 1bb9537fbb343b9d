// ParameterServerStrategy and the replica API on CPU replicas, with the
// in-process parameter store (no servers needed): parallel Run, replica ids,
// collectives (AllReduce, MergeCall, ApplyGradients), SyncOnRead
// aggregation, mirrored variables, validation errors, and the equivalence
// of 2 replicas with 1 replica at twice the per-replica batch.
#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <mutex>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "distval/float_env.h"
#include "distval/local_parameter_store.h"
#include "distval/parameter_server_strategy.h"
#include "strategy_training.h"

namespace distval {
namespace {

WorkerOptions CpuReplicas(int n, int worker_index = 0, int num_workers = 1) {
  WorkerOptions o;
  o.devices.clear();
  for (int i = 0; i < n; ++i) o.devices.push_back("cpu:" + std::to_string(i));
  o.inventory = DeviceInventory{/*num_cpu_replicas_allowed=*/4, /*num_cuda_devices=*/0};
  o.worker_index = worker_index;
  o.num_workers = num_workers;
  return o;
}

std::unique_ptr<ParameterServerStrategy> Local(const WorkerOptions& o) {
  auto s = ParameterServerStrategy::Create(o, NewLocalParameterStore());
  EXPECT_TRUE(s.ok()) << s.status();
  return s.ok() ? std::move(*s) : nullptr;
}

// Waits until `count` reaches `target` (all replicas inside the step at the
// same time); false after 20 s, which only happens if replicas ran one
// after another.
bool Rendezvous(std::atomic<int>& count, int target) {
  count.fetch_add(1);
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(20);
  while (count.load() < target) {
    if (std::chrono::steady_clock::now() > deadline) return false;
    std::this_thread::yield();
  }
  return true;
}

struct ReplicaInfo {
  int id_in_sync = -1;
  int local_id = -1;
  int in_sync = 0;
  std::string device;
  std::thread::id thread;
  bool ftz = false;
  bool cross_replica = true;
  bool met_others = false;
};

TEST(StrategyTest, RunCallsEveryReplicaInParallelWithItsIds) {
  // Worker 1 of 2, 4 replicas each: ids 4..7 of 8 in sync.
  auto s = Local(CpuReplicas(4, /*worker_index=*/1, /*num_workers=*/2));
  ASSERT_NE(s, nullptr);
  EXPECT_EQ(s->num_replicas_in_sync(), 8);
  EXPECT_EQ(s->num_local_replicas(), 4);
  std::atomic<int> arrived{0};
  auto step = [&](ReplicaContext& ctx) {
    ReplicaInfo info;
    info.id_in_sync = ctx.replica_id_in_sync_group();
    info.local_id = ctx.local_replica_id();
    info.in_sync = ctx.num_replicas_in_sync();
    info.device = ctx.device().ToString();
    info.thread = std::this_thread::get_id();
    info.ftz = FlushDenormalsToZeroEnabled();
    info.cross_replica = ctx.strategy().InCrossReplicaContext();
    info.met_others = Rendezvous(arrived, 4);
    return info;
  };
  auto first = s->Run(step);
  ASSERT_TRUE(first.ok()) << first.status();
  ASSERT_EQ(first->num_replicas(), 4);
  std::set<std::thread::id> threads;
  for (int r = 0; r < 4; ++r) {
    const ReplicaInfo& info = (*first)[r];
    EXPECT_EQ(info.local_id, r);
    EXPECT_EQ(info.id_in_sync, 4 + r);
    EXPECT_EQ(info.in_sync, 8);
    EXPECT_EQ(info.device, "cpu:" + std::to_string(r));
    EXPECT_TRUE(info.ftz) << "replica " << r << " thread lacks FTZ/DAZ";
    EXPECT_FALSE(info.cross_replica);
    EXPECT_TRUE(info.met_others) << "replica " << r << " never ran beside the others";
    EXPECT_NE(info.thread, std::this_thread::get_id());
    threads.insert(info.thread);
  }
  EXPECT_EQ(threads.size(), 4u);
  EXPECT_TRUE(s->InCrossReplicaContext());

  // The same persistent threads serve the next Run.
  arrived = 0;
  auto second = s->Run(step);
  ASSERT_TRUE(second.ok()) << second.status();
  for (int r = 0; r < 4; ++r) EXPECT_EQ((*second)[r].thread, (*first)[r].thread);
}

TEST(StrategyTest, AllReduceCombinesEveryReplicasValue) {
  auto s = Local(CpuReplicas(4));
  ASSERT_NE(s, nullptr);
  struct Out {
    int sum_int = 0;
    double mean_double = 0;
    std::vector<float> sum_vec;
    std::vector<float> tensor_mean;
  };
  auto result = s->Run([](ReplicaContext& ctx) -> StatusOr<Out> {
    const int r = ctx.local_replica_id();
    Out out;
    DV_ASSIGN_OR_RETURN(out.sum_int, ctx.AllReduce(ReduceOp::kSum, r + 1));
    DV_ASSIGN_OR_RETURN(out.mean_double, ctx.AllReduce(ReduceOp::kMean, double(r + 1)));
    DV_ASSIGN_OR_RETURN(out.sum_vec,
                        ctx.AllReduce(ReduceOp::kSum, std::vector<float>{float(r), 2.f * r}));
    Tensor t(DType::kF32, Shape{2});
    t.data_as<float>()[0] = static_cast<float>(r);
    t.data_as<float>()[1] = 1.f;
    DV_ASSIGN_OR_RETURN(Tensor mean, ctx.AllReduce(ReduceOp::kMean, t));
    out.tensor_mean = {mean.data_as<float>()[0], mean.data_as<float>()[1]};
    return out;
  });
  ASSERT_TRUE(result.ok()) << result.status();
  for (int r = 0; r < 4; ++r) {
    const Out& o = (*result)[r];
    EXPECT_EQ(o.sum_int, 10) << "replica " << r;
    EXPECT_DOUBLE_EQ(o.mean_double, 2.5);
    EXPECT_EQ(o.sum_vec, (std::vector<float>{6.f, 12.f}));
    EXPECT_EQ(o.tensor_mean, (std::vector<float>{1.5f, 1.f}));
  }
  // Mismatched vector lengths are an error for every replica.
  Status bad = s->Run([](ReplicaContext& ctx) -> Status {
    std::vector<float> v(static_cast<size_t>(ctx.local_replica_id() == 2 ? 3 : 2), 1.f);
    return ctx.AllReduce(ReduceOp::kSum, v).status();
  });
  EXPECT_EQ(bad.code(), StatusCode::kInvalidArgument);
  EXPECT_NE(bad.message().find("replica 2 has 3 elements"), std::string::npos) << bad;
}

TEST(StrategyTest, MergeCallRunsOnceInCrossReplicaContext) {
  auto s = Local(CpuReplicas(4));
  ASSERT_NE(s, nullptr);
  std::atomic<int> merges{0};
  std::atomic<int> merges_in_cross_replica{0};
  std::atomic<int> replica_context_reduce_errors{0};
  auto result = s->Run([&](ReplicaContext& ctx) -> StatusOr<int> {
    // Reduce is a cross-replica operation: refused in the step function.
    PerReplica<int> dummy({1, 2});
    if (ctx.strategy().Reduce(ReduceOp::kSum, dummy).status().code() ==
        StatusCode::kFailedPrecondition)
      replica_context_reduce_errors.fetch_add(1);
    auto merged = ctx.MergeCall(
        [&](ParameterServerStrategy& strategy, const PerReplica<int>& values) -> StatusOr<int> {
          merges.fetch_add(1);
          if (strategy.InCrossReplicaContext()) merges_in_cross_replica.fetch_add(1);
          if (values.num_replicas() != 4) return InternalError("wrong replica count");
          return strategy.Reduce(ReduceOp::kSum, values);
        },
        10 * ctx.local_replica_id());
    if (!merged.ok()) return merged.status();
    // The second form: no value, returns Status.
    DV_RETURN_IF_ERROR(ctx.MergeCall([&](ParameterServerStrategy&) { merges.fetch_add(1); }));
    return *merged;
  });
  ASSERT_TRUE(result.ok()) << result.status();
  EXPECT_EQ(merges.load(), 2);  // once per MergeCall, not once per replica
  EXPECT_EQ(merges_in_cross_replica.load(), 1);
  EXPECT_EQ(replica_context_reduce_errors.load(), 4);
  for (int r = 0; r < 4; ++r) EXPECT_EQ((*result)[r], 60) << "replica " << r;
  // Cross-replica Reduce of the results, and the local results.
  auto total = s->Reduce(ReduceOp::kMean, *result);
  ASSERT_TRUE(total.ok());
  EXPECT_EQ(*total, 60);
  EXPECT_EQ(s->ExperimentalLocalResults(*result), (std::vector<int>{60, 60, 60, 60}));
}

TEST(StrategyTest, SyncOnReadVariableAggregatesPerVariableAggregation) {
  auto s = Local(CpuReplicas(4));
  ASSERT_NE(s, nullptr);
  std::vector<SyncOnReadVariable*> vars;
  for (VariableAggregation a :
       {VariableAggregation::kNone, VariableAggregation::kSum, VariableAggregation::kMean,
        VariableAggregation::kOnlyFirstReplica}) {
    auto v = s->CreateSyncOnReadVariable("metric_" + std::string(VariableAggregationName(a)),
                                         Shape{2}, a);
    ASSERT_TRUE(v.ok()) << v.status();
    vars.push_back(*v);
  }
  std::atomic<int> replica_context_read_errors{0};
  auto accumulate = [&](ReplicaContext& ctx) -> Status {
    const double r = ctx.local_replica_id();
    const double delta[2] = {r + 1, 10 * (r + 1)};
    for (SyncOnReadVariable* v : vars) {
      DV_RETURN_IF_ERROR(v->AssignAdd(ctx, delta));
      if (v->Read().status().code() == StatusCode::kFailedPrecondition)
        replica_context_read_errors.fetch_add(1);
    }
    return OkStatus();
  };
  ASSERT_TRUE(s->Run(accumulate).ok());
  ASSERT_TRUE(s->Run(accumulate).ok());  // accumulates over Runs
  EXPECT_EQ(replica_context_read_errors.load(), 2 * 4 * 4);

  auto none = vars[0]->Read();
  EXPECT_EQ(none.status().code(), StatusCode::kFailedPrecondition);
  EXPECT_NE(none.status().message().find("aggregation none"), std::string::npos);
  EXPECT_EQ(*vars[1]->Read(), (std::vector<double>{20, 200}));  // sum
  EXPECT_EQ(*vars[2]->Read(), (std::vector<double>{5, 50}));    // mean
  EXPECT_EQ(*vars[3]->Read(), (std::vector<double>{2, 20}));    // only first replica
  for (int r = 0; r < 4; ++r) {
    auto local = vars[0]->replica_value(r);
    EXPECT_EQ(local[0], 2.0 * (r + 1));  // every variable kept its own copies
  }
  EXPECT_EQ(vars[1]->ReadScalar().status().code(), StatusCode::kInvalidArgument);
  ASSERT_TRUE(vars[1]->Reset().ok());
  EXPECT_EQ(*vars[1]->Read(), (std::vector<double>{0, 0}));
  // Reading inside MergeCall is cross-replica context.
  auto scalar = s->CreateSyncOnReadVariable("count", Shape{}, VariableAggregation::kSum);
  ASSERT_TRUE(scalar.ok());
  auto merged = s->Run([&](ReplicaContext& ctx) -> StatusOr<double> {
    DV_RETURN_IF_ERROR((*scalar)->AssignAdd(ctx, 1.0));
    return ctx.MergeCall([&](ParameterServerStrategy&) { return (*scalar)->ReadScalar(); });
  });
  ASSERT_TRUE(merged.ok()) << merged.status();
  EXPECT_EQ((*merged)[3], 4.0);
}

TEST(StrategyTest, AFailingReplicaAbortsTheRunInsteadOfDeadlocking) {
  auto s = Local(CpuReplicas(4));
  ASSERT_NE(s, nullptr);
  Status st = s->Run([](ReplicaContext& ctx) -> Status {
    if (ctx.local_replica_id() == 2) return InvalidArgumentError("replica 2 cannot go on");
    return ctx.AllReduce(ReduceOp::kSum, 1).status();
  });
  EXPECT_EQ(st.code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(st.message(), "replica 2 cannot go on");
  // A replica that skips a collective the others enter.
  st = s->Run([](ReplicaContext& ctx) -> Status {
    if (ctx.local_replica_id() == 3) return OkStatus();
    return ctx.AllReduce(ReduceOp::kSum, 1).status();
  });
  EXPECT_EQ(st.code(), StatusCode::kFailedPrecondition);
  EXPECT_NE(st.message().find("collective"), std::string::npos) << st;
  // The strategy is usable afterwards.
  auto ok = s->Run([](ReplicaContext& ctx) { return ctx.AllReduce(ReduceOp::kSum, 2); });
  ASSERT_TRUE(ok.ok()) << ok.status();
  EXPECT_EQ((*ok)[0], 8);
}

TEST(StrategyTest, RunPassesPerReplicaArgumentsAndRefusesNesting) {
  auto s = Local(CpuReplicas(2));
  ASSERT_NE(s, nullptr);
  PerReplica<int> per({5, 7});
  Mirrored<std::string> mirrored("m", 2);
  const int shared = 100;
  auto out = s->Run([](ReplicaContext&, const int& mine, const std::string& m,
                       const int& all) { return m + std::to_string(mine + all); },
                    per, mirrored, shared);
  ASSERT_TRUE(out.ok());
  EXPECT_EQ((*out)[0], "m105");
  EXPECT_EQ((*out)[1], "m107");
  Status nested = s->Run([&](ReplicaContext&) -> Status { return s->Run([](ReplicaContext&) {}); });
  EXPECT_EQ(nested.code(), StatusCode::kFailedPrecondition);
}

// Copies replica r's copy of `v` to the host on its thread.
std::vector<float> ReplicaValue(ParameterServerStrategy& s, MirroredVariable& v, int r) {
  std::vector<float> out(static_cast<size_t>(v.num_elements()));
  EXPECT_TRUE(s.RunOnReplica(r, [&](Backend& b) {
                 return b.CopyToHost(v.value(r), out.data(), v.num_elements());
               }).ok());
  return out;
}

TEST(StrategyTest, ApplyGradientsReducesAcrossReplicasAndPushesOncePerStep) {
  WorkerOptions o = CpuReplicas(2);
  o.optimizer.kind = protocol::OptimizerKind::kSgd;
  o.optimizer.learning_rate = 0.5;
  auto s = Local(o);
  ASSERT_NE(s, nullptr);
  CreateVariableOptions sum_opts;
  sum_opts.aggregation = VariableAggregation::kSum;
  CreateVariableOptions frozen_opts;
  frozen_opts.trainable = false;
  auto mean = s->CreateVariable("mean", Shape{3}, VariableInitializer::Constant(1.0));
  auto sum = s->CreateVariable("sum", Shape{3}, VariableInitializer::Constant(1.0), sum_opts);
  const std::vector<float> init = {1, 2, 3};
  auto frozen =
      s->CreateVariable("frozen", Shape{3}, VariableInitializer::Values(init), frozen_opts);
  ASSERT_TRUE(mean.ok() && sum.ok() && frozen.ok());

  // Replica r's gradient is r + 1 everywhere: mean 1.5, sum 3.
  auto step = [&](ReplicaContext& ctx) -> Status {
    for (MirroredVariable* v : s->variables())
      DV_RETURN_IF_ERROR(ctx.backend().Fill(v->gradient(ctx), 1.0f + ctx.local_replica_id()));
    return ctx.ApplyGradients();
  };
  EXPECT_EQ(s->clock(), 0);
  ASSERT_TRUE(s->Run(step).ok());
  EXPECT_EQ(s->clock(), 1);  // one push for both replicas
  EXPECT_EQ(s->stats().steps, 1);
  // The next Run pulls and mirrors the new values into both replicas.
  ASSERT_TRUE(s->Run([](ReplicaContext&) {}).ok());
  EXPECT_EQ(s->clock(), 1);
  for (int r = 0; r < 2; ++r) {
    EXPECT_EQ(ReplicaValue(*s, **mean, r), (std::vector<float>{0.25f, 0.25f, 0.25f}));
    EXPECT_EQ(ReplicaValue(*s, **sum, r), (std::vector<float>{-0.5f, -0.5f, -0.5f}));
    EXPECT_EQ(ReplicaValue(*s, **frozen, r), init);
  }
  auto read = (*mean)->Read();
  ASSERT_TRUE(read.ok()) << read.status();
  EXPECT_EQ(read->data_as<float>()[2], 0.25f);
  // Explicit lists: only the named variable moves; a frozen one is refused.
  MirroredVariable* just_sum[] = {*sum};
  ASSERT_TRUE(s->Run([&](ReplicaContext& ctx) -> Status {
                 DV_RETURN_IF_ERROR(ctx.backend().Fill((*sum)->gradient(ctx), 1.0f));
                 return ctx.ApplyGradients(just_sum);
               }).ok());
  EXPECT_EQ((*sum)->Read()->data_as<float>()[0], -1.5f);
  EXPECT_EQ((*mean)->Read()->data_as<float>()[0], 0.25f);
  MirroredVariable* just_frozen[] = {*frozen};
  Status refused = s->Run([&](ReplicaContext& ctx) { return ctx.ApplyGradients(just_frozen); });
  EXPECT_EQ(refused.code(), StatusCode::kInvalidArgument);
  EXPECT_NE(refused.message().find("not trainable"), std::string::npos);
}

TEST(StrategyTest, TheNextRunSeesEveryPushAndEveryNewVariable) {
  WorkerOptions o = CpuReplicas(2);
  o.optimizer.kind = protocol::OptimizerKind::kSgd;
  o.optimizer.learning_rate = 0.5;
  auto s = Local(o);
  ASSERT_NE(s, nullptr);
  auto a = s->CreateVariable("a", Shape{2}, VariableInitializer::Constant(1.0));
  ASSERT_TRUE(a.ok());
  // Two pushes in one Run: the values pulled behind the first are stale.
  ASSERT_TRUE(s->Run([&](ReplicaContext& ctx) -> Status {
                 DV_RETURN_IF_ERROR(ctx.backend().Fill((*a)->gradient(ctx), 1.0f));
                 DV_RETURN_IF_ERROR(ctx.ApplyGradients());
                 return ctx.ApplyGradients();
               }).ok());
  EXPECT_EQ(s->clock(), 2);
  // A variable created after the push is pulled too.
  auto b = s->CreateVariable("b", Shape{2}, VariableInitializer::Constant(7.0));
  ASSERT_TRUE(b.ok());
  ASSERT_TRUE(s->Run([](ReplicaContext&) {}).ok());
  for (int r = 0; r < 2; ++r) {
    EXPECT_EQ(ReplicaValue(*s, **a, r), (std::vector<float>{0.0f, 0.0f})) << "replica " << r;
    EXPECT_EQ(ReplicaValue(*s, **b, r), (std::vector<float>{7.0f, 7.0f})) << "replica " << r;
  }
}

TEST(StrategyTest, TwoReplicasMatchOneReplicaWithTwiceTheBatch) {
  auto examples = testing::SyntheticExamples(640, 3);
  constexpr int kSteps = 15;
  auto train = [&](int replicas) -> std::vector<Tensor> {
    WorkerOptions o = CpuReplicas(replicas);
    o.global_batch_size = 32;  // 2 x 16 or 1 x 32
    o.optimizer.kind = protocol::OptimizerKind::kMomentum;
    o.optimizer.learning_rate = 0.2;
    auto s = Local(o);
    if (s == nullptr) return {};
    auto params = testing::TrainSteps(*s, examples, kSteps, /*seed=*/11);
    EXPECT_TRUE(params.ok()) << params.status();
    EXPECT_EQ(s->clock(), kSteps);
    return params.ok() ? std::move(*params) : std::vector<Tensor>{};
  };
  std::vector<Tensor> one = train(1), two = train(2);
  ASSERT_EQ(one.size(), 4u);
  ASSERT_EQ(two.size(), 4u);
  const std::vector<Tensor> init = testing::SyntheticModel().InitialValues(11);
  for (size_t i = 0; i < one.size(); ++i) {
    EXPECT_LT(testing::RelativeError(two[i], one[i]), 1e-5) << "parameter " << i;
    if (i % 2 == 0) {  // kernels: training moved them, the comparison means something
      EXPECT_GT(testing::RelativeError(init[i], one[i]), 1e-3) << "parameter " << i;
    }
  }
}

TEST(StrategyTest, DeviceAndBatchErrorsNameTheProblem) {
  WorkerOptions o = CpuReplicas(2);
  o.inventory = DeviceInventory{2, 0};
  o.devices = {"cpu:0", "cuda:3"};
  auto missing = ParameterServerStrategy::Create(o, NewLocalParameterStore());
  ASSERT_EQ(missing.status().code(), StatusCode::kInvalidArgument);
  EXPECT_NE(missing.status().message().find("\"cuda:3\" does not exist"), std::string::npos)
      << missing.status();
  EXPECT_NE(missing.status().message().find("available: cpu:0, cpu:1"), std::string::npos);

  o.devices = {"cpu:1", "cpu:1"};
  auto repeated = ParameterServerStrategy::Create(o, NewLocalParameterStore());
  ASSERT_EQ(repeated.status().code(), StatusCode::kInvalidArgument);
  EXPECT_NE(repeated.status().message().find("\"cpu:1\" is listed more than once"),
            std::string::npos)
      << repeated.status();

  o.devices = {};
  EXPECT_EQ(ParameterServerStrategy::Create(o, NewLocalParameterStore()).status().code(),
            StatusCode::kInvalidArgument);

  o = CpuReplicas(4, 0, 2);  // 8 in sync
  o.global_batch_size = 60;
  auto batch = ParameterServerStrategy::Create(o, NewLocalParameterStore());
  ASSERT_EQ(batch.status().code(), StatusCode::kInvalidArgument);
  EXPECT_NE(batch.status().message().find("global batch size 60 does not divide evenly across 8 "
                                          "replicas in sync (2 worker(s) x 4 device(s))"),
            std::string::npos)
      << batch.status();

  // Checked before connecting: no server listens on port 1, yet the answer
  // is the device error, at once.
  o = CpuReplicas(1);
  o.devices = {"cuda:3"};
  o.ps_endpoints = {"tcp://127.0.0.1:1"};
  auto before_connect = ParameterServerStrategy::Create(o);
  EXPECT_EQ(before_connect.status().code(), StatusCode::kInvalidArgument);
}

TEST(StrategyTest, VariableCreationErrors) {
  auto s = Local(CpuReplicas(2));
  ASSERT_NE(s, nullptr);
  ASSERT_TRUE(s->CreateVariable("w", Shape{2, 2}, VariableInitializer::GlorotUniform(1)).ok());
  EXPECT_EQ(s->CreateVariable("w", Shape{2, 2}, {}).status().code(), StatusCode::kInvalidArgument);
  CreateVariableOptions none;
  none.aggregation = VariableAggregation::kNone;
  EXPECT_EQ(s->CreateVariable("x", Shape{2}, {}, none).status().code(),
            StatusCode::kInvalidArgument);
  const std::vector<float> three = {1, 2, 3};
  EXPECT_EQ(s->CreateVariable("y", Shape{2}, VariableInitializer::Values(three)).status().code(),
            StatusCode::kInvalidArgument);
  Status inside = s->Run([&](ReplicaContext& ctx) -> Status {
    if (ctx.local_replica_id() != 0) return OkStatus();
    return s->CreateVariable("z", Shape{1}, {}).status();
  });
  EXPECT_EQ(inside.code(), StatusCode::kFailedPrecondition);
  // A pulled value that was never trained is the initializer's.
  auto w = s->variables()[0]->Read();
  ASSERT_TRUE(w.ok()) << w.status();
  EXPECT_NE(w->data_as<float>()[0], 0.0f);
}

}  // namespace
}  // namespace distval
