// MirroredVariable: a parameter-server variable with one copy per local
// replica (tf.distribute's MirroredVariable under a parameter-server
// strategy).
//
// The variable itself lives on the parameter servers (or in a local store).
// At the start of every ParameterServerStrategy::Run after the worker's clock
// moved (i.e. once per training step) the strategy pulls every variable once
// and each replica thread copies the pulled bytes straight from the received
// frames (zero-copy views) into its own copy on its device. Step functions
// read value(ctx) and write gradient(ctx); ReplicaContext::ApplyGradients
// reduces the replicas' gradients and pushes them.
//
// Created by ParameterServerStrategy::CreateVariable / CreateModel, owned by
// the strategy; pointers stay valid for the strategy's life.
//
// Thread-safety: replica r's buffers are used by replica r's thread inside a
// Run; cross-replica methods (Read) must not overlap a Run except from
// inside MergeCall.
#ifndef DISTVAL_MIRRORED_VARIABLE_H_
#define DISTVAL_MIRRORED_VARIABLE_H_

#include <cstdint>
#include <string>
#include <vector>

#include "distval/backend.h"
#include "distval/distributed_values.h"
#include "distval/status.h"
#include "distval/tensor.h"

namespace distval {

class ParameterServerStrategy;
class ReplicaContext;

class MirroredVariable {
 public:
  MirroredVariable(const MirroredVariable&) = delete;
  MirroredVariable& operator=(const MirroredVariable&) = delete;

  const std::string& name() const { return name_; }
  const Shape& shape() const { return shape_; }
  int64_t num_elements() const { return shape_.num_elements(); }
  // How the replicas' gradients combine before the push (kMean or kSum).
  VariableAggregation aggregation() const { return aggregation_; }
  // Trainable variables are pushed by ReplicaContext::ApplyGradients().
  bool trainable() const { return trainable_; }
  int num_replicas() const { return static_cast<int>(replicas_.size()); }

  // Replica copies (kF32, num_elements() values on the replica's device),
  // refreshed by the pull at the start of a Run. The ReplicaContext form
  // picks the calling replica's copy.
  const DeviceBuffer& value(const ReplicaContext& ctx) const;
  const DeviceBuffer& value(int local_replica) const {
    return *replicas_[static_cast<size_t>(local_replica)].value;
  }
  // The replica's gradient buffer (same size and device), written by the
  // step function and read by ApplyGradients.
  DeviceBuffer& gradient(const ReplicaContext& ctx);
  DeviceBuffer& gradient(int local_replica) {
    return *replicas_[static_cast<size_t>(local_replica)].grad;
  }

  // The version of the values in the copies: the smallest per-shard update
  // counter of the last pull (0 before the first pull).
  uint64_t version() const { return version_; }

  // Cross-replica read: a host copy of replica 0's (the primary's) value.
  // FailedPrecondition when called in replica context (outside MergeCall),
  // or before the first pull; device errors.
  StatusOr<Tensor> Read() const;

 private:
  friend class ParameterServerStrategy;
  struct ReplicaCopy {
    DeviceBuffer own_value, own_grad;  // unless bound to a model's buffers
    DeviceBuffer* value = nullptr;
    DeviceBuffer* grad = nullptr;
  };
  MirroredVariable(ParameterServerStrategy* strategy, std::string name, Shape shape,
                   VariableAggregation aggregation, bool trainable, int num_replicas)
      : strategy_(strategy),
        name_(std::move(name)),
        shape_(std::move(shape)),
        aggregation_(aggregation),
        trainable_(trainable),
        replicas_(static_cast<size_t>(num_replicas)) {}

  ParameterServerStrategy* strategy_;  // Borrowed; owns this.
  std::string name_;
  Shape shape_;
  VariableAggregation aggregation_;
  bool trainable_;
  std::vector<ReplicaCopy> replicas_;  // Never resized (value/grad may point into it).
  // Used on replica 0's thread by ApplyGradients: the reduced gradient on
  // replica 0's device, and a host copy of it when that device's memory is
  // not host memory.
  DeviceBuffer reduced_;
  Tensor host_gradient_;
  uint64_t version_ = 0;
  bool pulled_ = false;
};

}  // namespace distval

#endif  // DISTVAL_MIRRORED_VARIABLE_H_
