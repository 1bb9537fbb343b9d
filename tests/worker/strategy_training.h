// Test helpers: a small classifier trained for K steps with a
// ParameterServerStrategy on synthetic data, for comparisons between replica
// layouts (used by tests/worker and tests/integration).
#ifndef DISTVAL_TESTS_WORKER_STRATEGY_TRAINING_H_
#define DISTVAL_TESTS_WORKER_STRATEGY_TRAINING_H_

#include <cmath>
#include <cstdint>
#include <memory>
#include <optional>
#include <random>
#include <vector>

#include "distval/input_pipeline.h"
#include "distval/layers.h"
#include "distval/parameter_server_strategy.h"

namespace distval::testing {

constexpr int kSyntheticFeatures = 20;
constexpr int kSyntheticClasses = 4;

// n examples with uniform features in [0, 1) and labels that depend on them
// (so that training moves the parameters in a consistent direction).
inline std::shared_ptr<const Examples> SyntheticExamples(int n, uint32_t seed) {
  Examples ex;
  ex.features = Tensor(DType::kF32, Shape{n, kSyntheticFeatures});
  std::mt19937 rng(seed);
  std::uniform_real_distribution<float> u(0.f, 1.f);
  float* f = ex.features.data_as<float>();
  for (int i = 0; i < n; ++i) {
    float score = 0;
    for (int j = 0; j < kSyntheticFeatures; ++j) {
      f[i * kSyntheticFeatures + j] = u(rng);
      score += f[i * kSyntheticFeatures + j] * static_cast<float>(j % 5);
    }
    ex.labels.push_back(static_cast<int32_t>(score) % kSyntheticClasses);
  }
  ex.file_sizes = {n};
  ex.num_classes = kSyntheticClasses;
  return std::make_shared<const Examples>(std::move(ex));
}

// 20-16-4 MLP.
inline Sequential SyntheticModel() {
  Sequential net;
  net.Add(std::make_unique<Dense>(kSyntheticFeatures, 16))
      .Add(std::make_unique<ReLU>())
      .Add(std::make_unique<Dense>(16, kSyntheticClasses));
  return net;
}

// Trains SyntheticModel() for `steps` steps of epoch 0 (one Run each: every
// replica computes the gradient of its batch, ApplyGradients pushes) and
// returns the parameters (cross-replica reads, after the last update).
inline StatusOr<std::vector<Tensor>> TrainSteps(ParameterServerStrategy& strategy,
                                                std::shared_ptr<const Examples> examples, int steps,
                                                uint64_t seed) {
  ModelOptions mo;
  mo.input_features = kSyntheticFeatures;
  mo.seed = seed;
  DV_ASSIGN_OR_RETURN(MirroredModel * model, strategy.CreateModel(SyntheticModel(), mo));
  struct State {
    std::optional<DeviceBatch> batch;
    SoftmaxCrossEntropy head;
  };
  std::vector<std::unique_ptr<State>> states;
  for (int r = 0; r < strategy.num_local_replicas(); ++r) {
    auto st = std::make_unique<State>();
    DV_RETURN_IF_ERROR(strategy.RunOnReplica(r, [&](Backend& b) -> Status {
      DV_ASSIGN_OR_RETURN(DeviceBatch batch,
                          DeviceBatch::Create(&b, model->max_batch(), kSyntheticFeatures));
      st->batch.emplace(std::move(batch));
      return st->head.Build(&b, model->max_batch(), kSyntheticClasses);
    }));
    states.push_back(std::move(st));
  }
  InputOptions io;
  io.seed = seed;
  DV_ASSIGN_OR_RETURN(DistributedDataset data, strategy.DistributeDataset(examples, io));
  const EpochPlan plan = data.PlanEpoch(0);
  if (plan.num_steps() < steps)
    return InvalidArgumentError("TrainSteps: only " + std::to_string(plan.num_steps()) +
                                " steps in an epoch");
  for (int step = 0; step < steps; ++step) {
    DV_RETURN_IF_ERROR(strategy.Run([&](ReplicaContext& ctx) -> Status {
      State& st = *states[static_cast<size_t>(ctx.local_replica_id())];
      DV_RETURN_IF_ERROR(
          st.batch->Load(*examples, plan.ReplicaBatch(step, ctx.local_replica_id())));
      const int b = st.batch->size();
      Sequential& net = model->replica(ctx);
      DV_RETURN_IF_ERROR(net.Forward(st.batch->features(), b));
      DV_RETURN_IF_ERROR(st.head.Forward(net.output(), st.batch->labels(), b));
      DV_RETURN_IF_ERROR(st.head.Backward(st.batch->labels(), b));
      DV_RETURN_IF_ERROR(net.Backward(st.batch->features(), st.head.grad(), b));
      return ctx.ApplyGradients();
    }));
  }
  std::vector<Tensor> params;
  for (MirroredVariable* v : model->variables()) {
    DV_ASSIGN_OR_RETURN(Tensor t, v->Read());
    params.push_back(std::move(t));
  }
  return params;
}

// sqrt(sum (a - b)^2 / sum b^2).
inline double RelativeError(const Tensor& a, const Tensor& b) {
  double num = 0, den = 0;
  const float* x = a.data_as<float>();
  const float* y = b.data_as<float>();
  for (int64_t i = 0; i < b.num_elements(); ++i) {
    num += (double(x[i]) - y[i]) * (double(x[i]) - y[i]);
    den += double(y[i]) * y[i];
  }
  return std::sqrt(num / std::max(den, 1e-30));
}

}  // namespace distval::testing

#endif  // DISTVAL_TESTS_WORKER_STRATEGY_TRAINING_H_
