// SyncOnReadVariable: per-replica accumulators that are combined only when
// read in cross-replica context (tf's VariableSynchronization.ON_READ), e.g.
// metrics: each replica adds its own loss sum and correct count while it
// runs, the worker reads the total after Run.
//
//   SyncOnReadVariable* correct = *strategy->CreateSyncOnReadVariable(
//       "correct", Shape{}, VariableAggregation::kSum);
//   ... in the step function: correct->AssignAdd(ctx, n_correct);
//   ... after Run:            double total = *correct->ReadScalar();
//
// Values are host doubles (exact counts up to 2^53), never sent to the
// parameter servers; the aggregation covers this worker's local replicas.
// Cross-replica reads aggregate per VariableAggregation:
//   kSum: the sum of the replicas' values; kMean: their mean;
//   kOnlyFirstReplica: replica 0's value;
//   kNone: FailedPrecondition (nothing says how to combine them; read a
//          replica's own value with local() / replica_value()).
//
// Created and owned by the strategy; pointers stay valid for its life.
// Thread-safety: in a Run, replica r touches only its own copy (lock-free);
// cross-replica methods must not overlap a Run except from inside MergeCall.
#ifndef DISTVAL_SYNC_ON_READ_VARIABLE_H_
#define DISTVAL_SYNC_ON_READ_VARIABLE_H_

#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include "distval/distributed_values.h"
#include "distval/status.h"
#include "distval/tensor.h"

namespace distval {

class ParameterServerStrategy;
class ReplicaContext;

class SyncOnReadVariable {
 public:
  SyncOnReadVariable(const SyncOnReadVariable&) = delete;
  SyncOnReadVariable& operator=(const SyncOnReadVariable&) = delete;

  const std::string& name() const { return name_; }
  const Shape& shape() const { return shape_; }
  int64_t num_elements() const { return shape_.num_elements(); }
  VariableAggregation aggregation() const { return aggregation_; }
  int num_replicas() const { return static_cast<int>(values_.size()); }

  // Replica context: the calling replica's own copy.
  std::span<double> local(const ReplicaContext& ctx);
  std::span<const double> local(const ReplicaContext& ctx) const;
  // Replica context: adds `delta` (num_elements() values) to / sets the
  // calling replica's copy. InvalidArgument when the size differs.
  Status AssignAdd(const ReplicaContext& ctx, std::span<const double> delta);
  Status AssignAdd(const ReplicaContext& ctx, double delta);  // scalar variables
  Status Assign(const ReplicaContext& ctx, std::span<const double> value);

  // Cross-replica context: the aggregated value (see the file comment).
  // FailedPrecondition in replica context or for kNone.
  StatusOr<std::vector<double>> Read() const;
  // Read() of a one-element variable; InvalidArgument otherwise.
  StatusOr<double> ReadScalar() const;
  // Cross-replica context: zeroes every replica's copy (Keras reset_state).
  Status Reset();

  // Replica `local_replica`'s own copy, in any context (tf's
  // experimental_local_results). Precondition: index in range.
  std::span<const double> replica_value(int local_replica) const {
    return values_[static_cast<size_t>(local_replica)];
  }

 private:
  friend class ParameterServerStrategy;
  SyncOnReadVariable(ParameterServerStrategy* strategy, std::string name, Shape shape,
                     VariableAggregation aggregation, int num_replicas)
      : strategy_(strategy),
        name_(std::move(name)),
        shape_(std::move(shape)),
        aggregation_(aggregation),
        values_(static_cast<size_t>(num_replicas),
                std::vector<double>(static_cast<size_t>(shape_.num_elements()), 0.0)) {}
  Status CheckCrossReplica(const char* op) const;

  ParameterServerStrategy* strategy_;  // Borrowed; owns this.
  std::string name_;
  Shape shape_;
  VariableAggregation aggregation_;
  std::vector<std::vector<double>> values_;  // one per replica
};

}  // namespace distval

#endif  // DISTVAL_SYNC_ON_READ_VARIABLE_H_
