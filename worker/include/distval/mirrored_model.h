// MirroredModel: a Sequential model with one built copy per local replica,
// whose parameters are MirroredVariables (tf: a Keras model created under
// strategy.scope()).
//
//   Sequential net;
//   net.Add(std::make_unique<Dense>(784, 256)).Add(std::make_unique<ReLU>())
//      .Add(std::make_unique<Dense>(256, 10));
//   DV_ASSIGN_OR_RETURN(MirroredModel* model,
//                       strategy->CreateModel(net, {.input_features = 784, .seed = 1}));
//   ... in a step function:
//   Sequential& replica = model->replica(ctx);
//   replica.Forward(x, b); ... replica.Backward(x, dy, b);   // writes the gradients
//   ctx.ApplyGradients();
//
// Every parameter ("dense_0/kernel", ...) becomes a variable on the servers,
// created with the model's seeded initial values (Sequential::InitialValues),
// so every worker creates the same variables. Each replica's copy of the
// model owns its parameter and gradient buffers on its device; the
// MirroredVariables are bound to them: the pull refreshes the parameters in
// place, ApplyGradients reads the gradients Backward wrote.
//
// Created and owned by the strategy (pointers valid for its life).
// Thread-safety: replica r's copy is used by replica r's thread in a Run, or
// through ParameterServerStrategy::RunOnReplica.
#ifndef DISTVAL_MIRRORED_MODEL_H_
#define DISTVAL_MIRRORED_MODEL_H_

#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "distval/layers.h"
#include "distval/mirrored_variable.h"
#include "distval/worker_options.h"

namespace distval {

class ReplicaContext;

struct ModelOptions {
  // Features of one input row (784 for Fashion-MNIST). Required.
  int input_features = 0;
  // Rows a replica's copy can process at once; 0: the strategy's
  // per-replica batch. Evaluation with larger batches needs a larger value.
  int max_batch = 0;
  // Seed of the initial values.
  uint64_t seed = 0;
  // Prefix of the variable names ("" gives "dense_0/kernel", ...).
  std::string name_prefix;
  // Settings of every parameter variable.
  CreateVariableOptions variables;
  // The parameters' initial values, in Sequential::ParameterSpecs() order
  // (f32, the specs' shapes; e.g. a saved model's weights); empty: the
  // model's seeded InitialValues(seed). Borrowed for the call.
  std::span<const Tensor> initial_values;
};

class MirroredModel {
 public:
  MirroredModel(const MirroredModel&) = delete;
  MirroredModel& operator=(const MirroredModel&) = delete;

  // The calling replica's built copy / replica r's copy.
  Sequential& replica(const ReplicaContext& ctx);
  Sequential& replica(int local_replica) { return *replicas_[static_cast<size_t>(local_replica)]; }
  int num_replicas() const { return static_cast<int>(replicas_.size()); }

  // The parameter variables, in Sequential::ParameterSpecs() order.
  const std::vector<MirroredVariable*>& variables() const { return variables_; }
  int max_batch() const { return max_batch_; }
  int input_features() const { return input_features_; }
  int output_features() const { return output_features_; }

 private:
  friend class ParameterServerStrategy;
  MirroredModel() = default;

  std::vector<std::unique_ptr<Sequential>> replicas_;
  std::vector<MirroredVariable*> variables_;  // Owned by the strategy.
  int max_batch_ = 0;
  int input_features_ = 0;
  int output_features_ = 0;
};

}  // namespace distval

#endif  // DISTVAL_MIRRORED_MODEL_H_
