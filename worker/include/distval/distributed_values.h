// Distributed values (tf.distribute's DistributedValues): one value per local
// replica, and the reductions that combine them.
//
//   PerReplica<T>  a (possibly different) value on every replica of this
//                  worker, e.g. what ParameterServerStrategy::Run returns;
//   Mirrored<T>    the same value on every replica;
//   ReduceOp       how replica values combine (Sum, Mean);
//   VariableAggregation  how a variable's per-replica updates or values
//                  combine (None, Sum, Mean, OnlyFirstReplica).
//
//   StatusOr<PerReplica<float>> losses = strategy->Run(step_fn);
//   StatusOr<float> loss = strategy->Reduce(ReduceOp::kMean, *losses);
//
// Index i of a PerReplica / Mirrored is LOCAL replica i (the i-th device in
// WorkerOptions::devices); ReplicaContext::replica_id_in_sync_group() gives
// the job-wide id.
//
// Reductions (ReduceValues, Strategy::Reduce, ReplicaContext::AllReduce)
// support: arithmetic types (sum in replica order; floating point values are
// accumulated in double; Mean of integers truncates toward zero),
// std::vector<U> of an arithmetic U (element-wise; every replica's vector
// must have the same length), and f32 Tensors (element-wise; same shape).
//
// Thread-safety: values; the usual rules for std::vector apply.
#ifndef DISTVAL_DISTRIBUTED_VALUES_H_
#define DISTVAL_DISTRIBUTED_VALUES_H_

#include <cstddef>
#include <span>
#include <string>
#include <string_view>
#include <type_traits>
#include <utility>
#include <vector>

#include "distval/status.h"
#include "distval/tensor.h"

namespace distval {

// How replica values are combined (tf.distribute.ReduceOp).
enum class ReduceOp {
  kSum,
  // Sum divided by the number of values combined.
  kMean,
};

// How the per-replica values or updates of a variable are combined
// (tf.VariableAggregation).
enum class VariableAggregation {
  // Not combined: a cross-replica read of a SyncOnReadVariable is an error.
  kNone,
  kSum,
  kMean,
  // The first replica's value is taken as it is.
  kOnlyFirstReplica,
};

// "sum", "mean".
std::string_view ReduceOpName(ReduceOp op);
// "none", "sum", "mean", "only_first_replica".
std::string_view VariableAggregationName(VariableAggregation aggregation);

// One value per local replica. Copyable and movable when T is.
template <typename T>
class PerReplica {
 public:
  PerReplica() = default;
  explicit PerReplica(std::vector<T> values) : values_(std::move(values)) {}

  int num_replicas() const { return static_cast<int>(values_.size()); }
  // Precondition: 0 <= local_replica < num_replicas().
  T& operator[](int local_replica) { return values_[static_cast<size_t>(local_replica)]; }
  const T& operator[](int local_replica) const {
    return values_[static_cast<size_t>(local_replica)];
  }
  // The values in local replica order (tf's `.values`).
  const std::vector<T>& values() const& { return values_; }
  std::vector<T>&& values() && { return std::move(values_); }

  auto begin() { return values_.begin(); }
  auto end() { return values_.end(); }
  auto begin() const { return values_.begin(); }
  auto end() const { return values_.end(); }

 private:
  std::vector<T> values_;
};

// The same value on every local replica (each replica holds its own copy).
template <typename T>
class Mirrored {
 public:
  Mirrored() = default;
  // `num_replicas` copies of `value`.
  Mirrored(const T& value, int num_replicas)
      : values_(static_cast<size_t>(num_replicas > 0 ? num_replicas : 0), value) {}

  int num_replicas() const { return static_cast<int>(values_.size()); }
  // Replica `local_replica`'s copy. Precondition: in range.
  const T& operator[](int local_replica) const {
    return values_[static_cast<size_t>(local_replica)];
  }
  // The copy of replica 0 (tf's `.primary`). Precondition: num_replicas() > 0.
  const T& primary() const { return values_.front(); }
  const std::vector<T>& values() const { return values_; }

 private:
  std::vector<T> values_;
};

namespace internal {

template <typename T>
struct IsStdVector : std::false_type {};
template <typename U, typename A>
struct IsStdVector<std::vector<U, A>> : std::true_type {};

// Copies a value; Tensors (move-only) are cloned.
template <typename T>
T CloneValue(const T& value) {
  if constexpr (std::is_same_v<T, Tensor>) {
    return value.Clone();
  } else {
    return value;
  }
}

// Element-wise reduction of f32 tensors (defined in distributed_values.cc).
StatusOr<Tensor> ReduceTensors(ReduceOp op, std::span<const Tensor* const> values);

}  // namespace internal

// Combines `values` (one per replica, in replica order) with `op`; see the
// file comment for the supported types. Errors: InvalidArgument for no
// values, vectors of different lengths or tensors of different shapes or a
// dtype other than f32 (the message gives the replica and both sizes).
template <typename T>
StatusOr<T> ReduceValues(ReduceOp op, std::span<const T* const> values) {
  if (values.empty()) return InvalidArgumentError("reduce: no replica values to combine");
  const size_t n = values.size();
  if constexpr (std::is_arithmetic_v<T>) {
    using Acc = std::conditional_t<std::is_floating_point_v<T>, double, T>;
    Acc sum = Acc{};
    for (const T* v : values) sum += static_cast<Acc>(*v);
    if (op == ReduceOp::kMean) {
      if constexpr (std::is_floating_point_v<T>) {
        sum /= static_cast<double>(n);
      } else {
        sum = static_cast<Acc>(sum / static_cast<Acc>(n));
      }
    }
    return static_cast<T>(sum);
  } else if constexpr (internal::IsStdVector<T>::value) {
    using U = typename T::value_type;
    static_assert(std::is_arithmetic_v<U>, "reduce: std::vector elements must be arithmetic");
    using Acc = std::conditional_t<std::is_floating_point_v<U>, double, U>;
    const size_t len = values[0]->size();
    for (size_t r = 1; r < n; ++r) {
      if (values[r]->size() != len)
        return InvalidArgumentError("reduce: replica " + std::to_string(r) + " has " +
                                    std::to_string(values[r]->size()) +
                                    " elements, replica 0 has " + std::to_string(len));
    }
    T out(len);
    for (size_t i = 0; i < len; ++i) {
      Acc sum = Acc{};
      for (const T* v : values) sum += static_cast<Acc>((*v)[i]);
      if (op == ReduceOp::kMean) sum = static_cast<Acc>(sum / static_cast<Acc>(n));
      out[i] = static_cast<U>(sum);
    }
    return out;
  } else if constexpr (std::is_same_v<T, Tensor>) {
    return internal::ReduceTensors(op, values);
  } else {
    static_assert(sizeof(T) == 0, "reduce: unsupported value type");
  }
}

// Convenience overload over a PerReplica.
template <typename T>
StatusOr<T> ReduceValues(ReduceOp op, const PerReplica<T>& per_replica) {
  std::vector<const T*> ptrs;
  ptrs.reserve(per_replica.values().size());
  for (const T& v : per_replica.values()) ptrs.push_back(&v);
  return ReduceValues<T>(op, std::span<const T* const>(ptrs));
}

}  // namespace distval

#endif  // DISTVAL_DISTRIBUTED_VALUES_H_
