// ReplicaContext: what a step function sees while it runs on one replica
// (tf.distribute.ReplicaContext).
//
//   auto step = [&](ReplicaContext& ctx) -> StatusOr<float> {
//     Sequential& net = model->replica(ctx);          // this replica's copy
//     ... forward / backward on ctx.backend() ...
//     DV_RETURN_IF_ERROR(ctx.ApplyGradients());       // one push per worker
//     DV_ASSIGN_OR_RETURN(float total, ctx.AllReduce(ReduceOp::kSum, my_loss));
//     return my_loss;
//   };
//   auto losses = strategy->Run(step);                // PerReplica<float>
//
// Collectives. AllReduce, MergeCall and ApplyGradients are collectives: every
// replica of the Run must call the same ones in the same order (as in
// TensorFlow). They combine the values of THIS worker's replicas (the ones
// that run together in one Run); replicas of other workers meet only through
// the parameter servers. A replica whose step function fails, or returns
// while the others wait in a collective, aborts the Run: the waiting
// collectives return that error (never a deadlock).
//
// Thread-safety: a ReplicaContext belongs to its replica's thread for the
// duration of the step function; do not keep it after the function returns.
#ifndef DISTVAL_REPLICA_CONTEXT_H_
#define DISTVAL_REPLICA_CONTEXT_H_

#include <functional>
#include <memory>
#include <span>
#include <type_traits>
#include <utility>
#include <vector>

#include "distval/backend.h"
#include "distval/device_spec.h"
#include "distval/distributed_values.h"
#include "distval/status.h"

namespace distval {

class ParameterServerStrategy;
class MirroredVariable;

namespace internal {

// The type-erased merge of a collective (see worker/replica_group.h).
using MergeFunction =
    std::function<StatusOr<std::shared_ptr<const void>>(std::span<const void* const>)>;

// What MergeCall returns for a merge function returning R.
template <typename R>
struct MergeResult {
  using Value = R;
  using Returned = StatusOr<R>;
};
template <>
struct MergeResult<void> {
  using Value = void;
  using Returned = Status;
};
template <>
struct MergeResult<Status> {
  using Value = void;
  using Returned = Status;
};
template <typename X>
struct MergeResult<StatusOr<X>> {
  using Value = X;
  using Returned = StatusOr<X>;
};

// Calls f() (returning R) and packs its result for the other replicas.
template <typename R, typename F>
StatusOr<std::shared_ptr<const void>> InvokeMerge(F&& f) {
  if constexpr (std::is_void_v<R>) {
    f();
    return std::shared_ptr<const void>();
  } else if constexpr (std::is_same_v<R, Status>) {
    Status s = f();
    if (!s.ok()) return s;
    return std::shared_ptr<const void>();
  } else if constexpr (std::is_same_v<typename MergeResult<R>::Returned, R>) {
    using X = typename MergeResult<R>::Value;
    R r = f();
    if (!r.ok()) return std::move(r).status();
    return std::shared_ptr<const void>(std::make_shared<const X>(std::move(r).value()));
  } else {
    return std::shared_ptr<const void>(std::make_shared<const R>(f()));
  }
}

}  // namespace internal

class ReplicaContext {
 public:
  ReplicaContext(const ReplicaContext&) = delete;
  ReplicaContext& operator=(const ReplicaContext&) = delete;

  // Job-wide replica id: worker_index * num_local_replicas + local id.
  int replica_id_in_sync_group() const {
    return worker_index_ * num_local_replicas_ + local_replica_id_;
  }
  // Replicas across ALL workers of the job.
  int num_replicas_in_sync() const { return num_workers_ * num_local_replicas_; }
  // This replica's index among the worker's devices (PerReplica index).
  int local_replica_id() const { return local_replica_id_; }
  int num_local_replicas() const { return num_local_replicas_; }

  // This replica's device and backend (used by this thread only).
  Backend& backend() const { return *backend_; }
  const DeviceSpec& device() const { return backend_->device(); }
  ParameterServerStrategy& strategy() const { return *strategy_; }

  // Combines `value` with the values the other local replicas pass (see
  // ReduceValues for the types and errors); every replica gets the same
  // result. Collective. Errors: the reduction's, or the Run's abort.
  template <typename T>
  StatusOr<T> AllReduce(ReduceOp op, const T& value);

  // Runs merge_fn ONCE, on replica 0's thread, in cross-replica context,
  // after every local replica reached this call, and gives its result to
  // every replica (tf's merge_call). The first form passes the strategy; the
  // second also passes each replica's `value` as a PerReplica<T>:
  //   merge_fn(ParameterServerStrategy&) -> R
  //   merge_fn(ParameterServerStrategy&, const PerReplica<T>&) -> R
  // R may be void or Status (MergeCall returns Status), StatusOr<X>
  // (returns StatusOr<X>) or any copyable value X (returns StatusOr<X>).
  // Collective.
  template <typename Fn>
  auto MergeCall(Fn&& merge_fn) ->
      typename internal::MergeResult<std::invoke_result_t<Fn&, ParameterServerStrategy&>>::Returned;
  template <typename Fn, typename T>
  auto MergeCall(Fn&& merge_fn, const T& value) -> typename internal::MergeResult<
      std::invoke_result_t<Fn&, ParameterServerStrategy&, const PerReplica<T>&>>::Returned;

  // The optimizer step of a parameter-server job (tf's
  // optimizer.apply_gradients): reduces every trainable MirroredVariable's
  // per-replica gradients across the local replicas (a sum or a mean as the
  // variable's aggregation says; with Backend::ReduceSum on replica 0's
  // device when it can read every replica's buffer), pushes them to the
  // parameter servers in ONE push for the worker, and advances the worker's
  // clock. The servers apply the optimizer. The replicas' value copies are
  // refreshed by the pull at the start of the next Run (sent right behind
  // this push). Returns once the servers acknowledged the push; the
  // gradient buffers must not change before. Collective. Errors:
  // the push's (Unavailable, DeadlineExceeded, the servers' messages),
  // device errors.
  Status ApplyGradients();
  // Same for the listed variables only.
  Status ApplyGradients(std::span<MirroredVariable* const> variables);

 private:
  friend class ParameterServerStrategy;
  ReplicaContext(ParameterServerStrategy* strategy, Backend* backend, int local_replica_id,
                 int num_local_replicas, int worker_index, int num_workers)
      : strategy_(strategy),
        backend_(backend),
        local_replica_id_(local_replica_id),
        num_local_replicas_(num_local_replicas),
        worker_index_(worker_index),
        num_workers_(num_workers) {}

  // Joins the next collective with `mine` (defined in the strategy).
  Status Collective(const void* mine, const internal::MergeFunction& merge,
                    std::shared_ptr<const void>* result);

  ParameterServerStrategy* strategy_;
  Backend* backend_;
  int local_replica_id_;
  int num_local_replicas_;
  int worker_index_;
  int num_workers_;
};

// ---- Implementation of the templates ---------------------------------------

template <typename T>
StatusOr<T> ReplicaContext::AllReduce(ReduceOp op, const T& value) {
  internal::MergeFunction merge =
      [op](std::span<const void* const> posted) -> StatusOr<std::shared_ptr<const void>> {
    std::vector<const T*> values;
    values.reserve(posted.size());
    for (const void* p : posted) values.push_back(static_cast<const T*>(p));
    StatusOr<T> reduced = ReduceValues<T>(op, std::span<const T* const>(values));
    if (!reduced.ok()) return std::move(reduced).status();
    return std::shared_ptr<const void>(std::make_shared<const T>(std::move(reduced).value()));
  };
  std::shared_ptr<const void> result;
  Status s = Collective(&value, merge, &result);
  if (!s.ok()) return s;
  return internal::CloneValue(*static_cast<const T*>(result.get()));
}

template <typename Fn>
auto ReplicaContext::MergeCall(Fn&& merge_fn) ->
    typename internal::MergeResult<std::invoke_result_t<Fn&, ParameterServerStrategy&>>::Returned {
  using R = std::invoke_result_t<Fn&, ParameterServerStrategy&>;
  using Value = typename internal::MergeResult<R>::Value;
  using Returned = typename internal::MergeResult<R>::Returned;
  ParameterServerStrategy* strategy = strategy_;
  internal::MergeFunction merge =
      [&merge_fn, strategy](std::span<const void* const>) -> StatusOr<std::shared_ptr<const void>> {
    return internal::InvokeMerge<R>([&]() -> R { return merge_fn(*strategy); });
  };
  std::shared_ptr<const void> result;
  Status s = Collective(nullptr, merge, &result);
  if constexpr (std::is_void_v<Value>) {
    return s;
  } else {
    if (!s.ok()) return Returned(s);
    return Returned(internal::CloneValue(*static_cast<const Value*>(result.get())));
  }
}

template <typename Fn, typename T>
auto ReplicaContext::MergeCall(Fn&& merge_fn, const T& value) -> typename internal::MergeResult<
    std::invoke_result_t<Fn&, ParameterServerStrategy&, const PerReplica<T>&>>::Returned {
  using R = std::invoke_result_t<Fn&, ParameterServerStrategy&, const PerReplica<T>&>;
  using Value = typename internal::MergeResult<R>::Value;
  using Returned = typename internal::MergeResult<R>::Returned;
  ParameterServerStrategy* strategy = strategy_;
  internal::MergeFunction merge =
      [&merge_fn,
       strategy](std::span<const void* const> posted) -> StatusOr<std::shared_ptr<const void>> {
    std::vector<T> copies;
    copies.reserve(posted.size());
    for (const void* p : posted) copies.push_back(internal::CloneValue(*static_cast<const T*>(p)));
    const PerReplica<T> values(std::move(copies));
    return internal::InvokeMerge<R>([&]() -> R { return merge_fn(*strategy, values); });
  };
  std::shared_ptr<const void> result;
  Status s = Collective(&value, merge, &result);
  if constexpr (std::is_void_v<Value>) {
    return s;
  } else {
    if (!s.ok()) return Returned(s);
    return Returned(internal::CloneValue(*static_cast<const Value*>(result.get())));
  }
}

}  // namespace distval

#endif  // DISTVAL_REPLICA_CONTEXT_H_
