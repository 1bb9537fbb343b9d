// ParameterServerStrategy: data-parallel training of one worker's local
// replicas against the parameter servers (tf.distribute's
// ParameterServerStrategy with a MirroredStrategy on each worker).
//
//   WorkerOptions opt;
//   opt.ps_endpoints = {"tcp://10.0.0.1:2222"};
//   opt.worker_index = 0;  opt.num_workers = 2;
//   opt.devices = {"cpu:0", "cpu:1"};
//   opt.global_batch_size = 64;                    // 16 per replica (4 in sync)
//   DV_ASSIGN_OR_RETURN(auto strategy, ParameterServerStrategy::Create(opt));
//   DV_ASSIGN_OR_RETURN(MirroredModel* model, strategy->CreateModel(net, {.input_features = 784}));
//   for (each step) {
//     auto losses = strategy->Run([&](ReplicaContext& ctx) -> StatusOr<float> {
//       ... forward/backward on model->replica(ctx) with this replica's batch ...
//       DV_RETURN_IF_ERROR(ctx.ApplyGradients());   // reduce locally, ONE push
//       return loss;
//     });
//     DV_ASSIGN_OR_RETURN(float loss, strategy->Reduce(ReduceOp::kMean, *losses));
//   }
//
// One training step (the data path of the design):
//   pull every variable once (when the worker's clock moved since the last
//   pull) -> each replica thread copies the pulled frames into its mirrored
//   copies -> step_fn on every replica IN PARALLEL (one persistent thread per
//   replica, flush-to-zero / denormals-are-zero set) -> ApplyGradients:
//   gradients reduced across the local replicas (Backend::ReduceSum on
//   replica 0's device) -> one push for the worker -> its clock advances.
//   The servers apply the optimizer; BSP / SSP / async is their setting.
//   The next step's pull is sent right behind the push (before its
//   acknowledgement), and the next Run waits for it.
//
// Contexts. Code inside a step function runs in REPLICA context; everything
// else (and the body of ReplicaContext::MergeCall) is CROSS-REPLICA
// context. Creating variables, Reduce and reading SyncOnRead variables are
// cross-replica operations; the ReplicaContext collectives are replica
// operations.
//
// Replicas in sync: num_replicas_in_sync() counts the replicas of ALL
// workers (num_workers x local devices; every worker must list the same
// number of devices). Reductions (Reduce, AllReduce, SyncOnRead reads)
// combine this worker's replicas; workers meet through the servers.
//
// Thread-safety: the strategy's methods are called from one thread (the
// "cross-replica" thread) at a time; Run's step functions run on the replica
// threads. The strategy owns its backends, variables, models and threads.
#ifndef DISTVAL_PARAMETER_SERVER_STRATEGY_H_
#define DISTVAL_PARAMETER_SERVER_STRATEGY_H_

#include <atomic>
#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <span>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "distval/backend.h"
#include "distval/client.h"
#include "distval/dataset.h"
#include "distval/device_spec.h"
#include "distval/distributed_values.h"
#include "distval/input_pipeline.h"
#include "distval/layers.h"
#include "distval/mirrored_model.h"
#include "distval/mirrored_variable.h"
#include "distval/parameter_store.h"
#include "distval/replica_context.h"
#include "distval/status.h"
#include "distval/sync_on_read_variable.h"
#include "distval/tensor.h"
#include "distval/variable_initializer.h"
#include "distval/worker_options.h"
#include "distval/worker_telemetry.h"

namespace distval {

namespace internal {
class ReplicaPool;
class ReplicaGroup;
class PushBufferAllocator;

// The argument a replica gets for one Run argument: its element of a
// PerReplica / Mirrored, anything else as it is.
template <typename T>
const T& ForReplica(const T& arg, int) {
  return arg;
}
template <typename T>
const T& ForReplica(const PerReplica<T>& arg, int replica) {
  return arg[replica];
}
template <typename T>
const T& ForReplica(const Mirrored<T>& arg, int replica) {
  return arg[replica];
}

// What Run returns for a step function returning R.
template <typename R>
struct RunResult {
  using Value = R;
  using Returned = StatusOr<PerReplica<R>>;
};
template <>
struct RunResult<void> {
  using Value = void;
  using Returned = Status;
};
template <>
struct RunResult<Status> {
  using Value = void;
  using Returned = Status;
};
template <typename X>
struct RunResult<StatusOr<X>> {
  using Value = X;
  using Returned = StatusOr<PerReplica<X>>;
};
}  // namespace internal

// Timing and staleness of one training step (a Run that pushed).
struct StepStats {
  // The worker's clock after the step (steps completed).
  int64_t clock = 0;
  // Seconds spent waiting for pulls since the previous step (BSP/SSP pulls
  // wait for slower workers) and for the step's push acknowledgement.
  double pull_wait_s = 0;
  double push_wait_s = 0;
  // Seconds of local work: the Run's wall time minus the push wait (copying
  // pulled values into the replicas, the step functions, the local
  // reduction).
  double compute_s = 0;
  // This worker's clock minus the smallest live clock the servers reported
  // on the pull that preceded the step (0 in BSP).
  int64_t staleness = 0;
  double blocked_s() const { return pull_wait_s + push_wait_s; }
};

// Totals over the strategy's life.
struct StrategyStats {
  int64_t steps = 0;
  int64_t pulls = 0;
  double pull_wait_s = 0;
  double push_wait_s = 0;
  double compute_s = 0;
  int64_t staleness_sum = 0;
  int64_t staleness_max = 0;
  // staleness_histogram[k]: steps whose staleness was k.
  std::vector<int64_t> staleness_histogram;
  double blocked_s() const { return pull_wait_s + push_wait_s; }
  double mean_staleness() const {
    return steps == 0 ? 0.0 : static_cast<double>(staleness_sum) / static_cast<double>(steps);
  }
};

class ParameterServerStrategy {
 public:
  // Validates the options (devices, batch), creates one backend and one
  // thread per device, connects to the parameter servers in
  // options.ps_endpoints (hello with the expected staleness). Errors:
  // InvalidArgument for bad devices (naming the device and listing what
  // exists) or a batch that does not divide across the replicas (giving the
  // numbers), no ps endpoints; the Client's errors (Unavailable,
  // FailedPrecondition for a staleness or shard-count mismatch); backend
  // creation errors. Devices and the batch are checked before connecting.
  static StatusOr<std::unique_ptr<ParameterServerStrategy>> Create(const WorkerOptions& options);
  // Same on another store (e.g. NewLocalParameterStore() for the
  // single-process baseline); options.ps_endpoints are ignored.
  static StatusOr<std::unique_ptr<ParameterServerStrategy>> Create(
      const WorkerOptions& options, std::unique_ptr<ParameterStore> store);

  // Stops the replica threads, then releases the models, variables and
  // backends (and the connection).
  ~ParameterServerStrategy();
  ParameterServerStrategy(const ParameterServerStrategy&) = delete;
  ParameterServerStrategy& operator=(const ParameterServerStrategy&) = delete;

  // ---- Topology ------------------------------------------------------------
  int num_replicas_in_sync() const { return num_workers_ * num_local_replicas(); }
  int num_local_replicas() const { return static_cast<int>(devices_.size()); }
  int worker_index() const { return worker_index_; }
  int num_workers() const { return num_workers_; }
  const std::vector<DeviceSpec>& devices() const { return devices_; }
  // Replica r's backend (for cross-replica work use RunOnReplica).
  Backend& backend(int local_replica) { return *backends_[static_cast<size_t>(local_replica)]; }
  int global_batch_size() const { return global_batch_size_; }
  // WorkerOptions::optimizer: the optimizer of variables that name none.
  const protocol::OptimizerSpec& default_optimizer() const { return default_optimizer_; }
  // WorkerOptions::variable_partitioner.
  const Partitioner& variable_partitioner() const { return variable_partitioner_; }
  int per_replica_batch_size() const { return per_replica_batch_size_; }
  // tf's InputContext for this worker: num_input_pipelines = workers,
  // input_pipeline_id = worker index, num_replicas_in_sync.
  InputContext input_context() const {
    return InputContext{num_workers_, worker_index_, num_replicas_in_sync()};
  }
  // This worker's share of `examples` (tf's experimental_distribute_dataset):
  // a DistributedDataset with input_context() and the strategy's global
  // batch (when it has one; otherwise options.global_batch_size). Errors:
  // DistributedDataset::Create's.
  StatusOr<DistributedDataset> DistributeDataset(std::shared_ptr<const Examples> examples,
                                                 InputOptions options) const;

  // ---- Variables (cross-replica context) -----------------------------------

  // Creates the variable on the servers (idempotent across workers: every
  // worker creates the same variables in the same order) and one copy plus
  // one gradient buffer per replica on the replica's device. Errors:
  // FailedPrecondition inside a Run; InvalidArgument for an empty name, a
  // name this strategy already created, a bad aggregation (see
  // CreateVariableOptions), initial values whose count differs from the
  // shape; the store's errors (AlreadyExists for a different spec on the
  // servers, the optimizer's validation); allocation errors.
  StatusOr<MirroredVariable*> CreateVariable(const std::string& name, const Shape& shape,
                                             const VariableInitializer& initializer,
                                             const CreateVariableOptions& options = {});
  // Per-replica accumulators (metrics), never sent to the servers. Errors:
  // FailedPrecondition inside a Run; InvalidArgument for an empty or
  // repeated name.
  StatusOr<SyncOnReadVariable*> CreateSyncOnReadVariable(const std::string& name,
                                                         const Shape& shape,
                                                         VariableAggregation aggregation);
  // Builds one copy of `model` per replica (on its thread and device) and a
  // MirroredVariable per parameter bound to those copies (see
  // distval/mirrored_model.h). Errors: InvalidArgument for bad options
  // (input features, max_batch when the strategy has no batch, initial
  // values whose count, dtype or shapes differ from the parameters'), the
  // model's Build errors, CreateVariable's errors.
  StatusOr<MirroredModel*> CreateModel(const Sequential& model, const ModelOptions& options);

  // Every MirroredVariable, in creation order.
  const std::vector<MirroredVariable*>& variables() const { return variable_list_; }

  // ---- Running -------------------------------------------------------------

  // Calls step_fn(ctx, args...) once per local replica, in parallel, each on
  // its replica's thread with its ReplicaContext (tf's strategy.run). An
  // argument that is a PerReplica<T> or Mirrored<T> is passed as the
  // replica's element; any other argument is passed as it is (const&) to
  // every replica. If the worker's clock moved since the last pull (or a
  // variable was created since), every variable is pulled first, once, and
  // mirrored into every replica before step_fn runs.
  // step_fn may return void or Status (Run returns Status), or a value X or
  // StatusOr<X> (Run returns StatusOr<PerReplica<X>>).
  // Errors: FailedPrecondition when called from a step function (no nested
  // Run); the pull's errors; the first failing replica's error (a replica
  // whose step function fails aborts the others' collectives).
  template <typename Fn, typename... Args>
  auto Run(Fn&& step_fn, const Args&... args) -> typename internal::RunResult<std::invoke_result_t<
      Fn&, ReplicaContext&, decltype(internal::ForReplica(args, 0))...>>::Returned;

  // Combines the replicas' values (cross-replica context: after Run, or
  // inside MergeCall). See ReduceValues for the types. Errors:
  // FailedPrecondition in replica context; ReduceValues' errors.
  template <typename T>
  StatusOr<T> Reduce(ReduceOp op, const PerReplica<T>& per_replica) const;

  // The local replicas' values, in replica order (tf's
  // experimental_local_results).
  template <typename T>
  const std::vector<T>& ExperimentalLocalResults(const PerReplica<T>& value) const {
    return value.values();
  }
  template <typename T>
  const std::vector<T>& ExperimentalLocalResults(const Mirrored<T>& value) const {
    return value.values();
  }

  // True outside step functions and inside a MergeCall body.
  bool InCrossReplicaContext() const;

  // Runs fn(backend of replica r) on replica r's thread and waits (for
  // cross-replica device work such as evaluating one replica's model copy).
  // Errors: FailedPrecondition inside a Run, InvalidArgument for a bad
  // index, fn's error.
  Status RunOnReplica(int local_replica, const std::function<Status(Backend&)>& fn);

  // Pulls and mirrors every variable now if the clock moved since the last
  // pull (what Run does first). Errors: as Run's pull.
  Status RefreshVariables();

  // ---- Statistics and access -------------------------------------------------
  const StepStats& last_step() const { return last_step_; }
  const StrategyStats& stats() const { return stats_; }
  // The worker's clock (steps completed).
  int64_t clock() const { return store_->clock(); }
  // After a step failed with Aborted (a parameter server restarted from a
  // checkpoint behind this worker's clock; the status says which and where):
  // drops the mirrored values and any prefetched pull, moves the clock back
  // to the checkpoint's and returns it. The caller redoes its steps from
  // there (the next Run pulls the restored parameters first); Model::Fit
  // does so itself.
  int64_t AcceptRollback();
  ParameterStore& store() { return *store_; }
  // The connected client when the store is remote, else null.
  Client* client() { return store_->client(); }
  // "worker 0/2, 2 replica(s) cpu:0,cpu:1 (4 in sync), global batch 64 (16
  // per replica), parameter servers tcp://...".
  std::string Describe() const;

 private:
  friend class ReplicaContext;
  friend class MirroredVariable;
  friend class SyncOnReadVariable;
  friend class MirroredModel;

  ParameterServerStrategy() = default;

  Status RunImpl(const std::function<Status(ReplicaContext&)>& fn);
  // Common check of cross-replica-only operations.
  Status CheckCrossReplica(const char* op) const;
  bool InsideRun() const;
  Status PullIfStale();
  Status MirrorInto(int replica);
  // ApplyGradients' merge (replica 0's thread).
  Status PushGradients(std::span<MirroredVariable* const> variables, bool only_trainable);
  StatusOr<std::span<const float>> ReducedGradient(MirroredVariable& v);
  // With a co-located parameter server and gradients in host memory: puts
  // the buffer that ApplyGradients pushes for v in shared memory
  // (Client::AllocatePushBuffer), so that pushes lend it instead of copying
  // it. Leaves it where it is otherwise (or when that fails).
  void PlaceGradientForPush(MirroredVariable& v);
  Status Collective(int replica, const void* mine, const internal::MergeFunction& merge,
                    std::shared_ptr<const void>* result);
  // ApplyGradients on replica `replica` entered its collective at `enter`
  // and left it now: records the blocked time (telemetry).
  void RecordApplyGradients(int replica, std::chrono::steady_clock::time_point enter);
  StatusOr<MirroredVariable*> CreateVariableImpl(const std::string& name, const Shape& shape,
                                                 const VariableInitializer& initializer,
                                                 const CreateVariableOptions& options,
                                                 const std::vector<Parameter>* bind_to);

  // Declaration order is destruction order in reverse: models and variables
  // go before the threads, the threads before the backends.
  int worker_index_ = 0;
  int num_workers_ = 1;
  int global_batch_size_ = 0;
  int per_replica_batch_size_ = 0;
  protocol::OptimizerSpec default_optimizer_;
  Partitioner variable_partitioner_;
  std::vector<DeviceSpec> devices_;
  std::vector<std::unique_ptr<Backend>> backends_;
  std::shared_ptr<internal::PushBufferAllocator> push_allocator_;  // PlaceGradientForPush
  std::unique_ptr<ParameterStore> store_;
  std::unique_ptr<internal::ReplicaPool> pool_;
  std::unique_ptr<internal::ReplicaGroup> group_;
  std::vector<std::unique_ptr<MirroredVariable>> variables_;
  std::vector<MirroredVariable*> variable_list_;
  std::vector<std::string> pull_names_;
  std::vector<std::unique_ptr<SyncOnReadVariable>> sync_on_read_;
  std::vector<std::unique_ptr<MirroredModel>> models_;

  // Mirroring state (cross-replica thread).
  std::vector<PulledVariable> pulled_;
  int64_t mirrored_clock_ = -1;
  bool mirror_stale_ = true;
  // The pull started right behind the last push (the next step's values),
  // or null. Written on replica 0's thread during a Run, read after it.
  std::shared_ptr<std::vector<PulledVariable>> prefetch_;
  RequestHandle prefetch_done_;
  int64_t prefetch_clock_ = -1;
  size_t prefetch_variables_ = 0;

  // Run state.
  std::mutex run_mu_;                             // one Run (or RunOnReplica) at a time
  std::unique_ptr<std::atomic<bool>[]> in_step_;  // per replica: inside step_fn
  std::atomic<bool> merging_{false};              // replica 0 runs a merge
  std::atomic<bool> running_{false};
  // Written on replica 0's thread during a Run, read after it.
  double push_wait_in_run_ = 0;
  bool pushed_in_run_ = false;
  std::vector<PushSource> push_sources_;

  // Telemetry (WorkerOptions::telemetry; borrowed, may be null) and the
  // step phases it is told. Written on replica 0's thread during a Run (the
  // merge), read after it; collective_enter_[r] on replica r's thread.
  WorkerTelemetry* telemetry_ = nullptr;
  int64_t run_step_ = 0;
  double blocked_in_run_ = 0;
  double reduce_in_run_ = 0;
  std::chrono::steady_clock::time_point merge_begin_{};
  std::unique_ptr<std::chrono::steady_clock::time_point[]> collective_enter_;

  // Statistics (cross-replica thread).
  double pending_pull_wait_s_ = 0;
  int64_t pending_staleness_ = 0;
  StepStats last_step_;
  StrategyStats stats_;
};

// ---- Implementation of the templates ---------------------------------------

template <typename Fn, typename... Args>
auto ParameterServerStrategy::Run(Fn&& step_fn, const Args&... args) ->
    typename internal::RunResult<std::invoke_result_t<
        Fn&, ReplicaContext&, decltype(internal::ForReplica(args, 0))...>>::Returned {
  using R = std::invoke_result_t<Fn&, ReplicaContext&, decltype(internal::ForReplica(args, 0))...>;
  using Value = typename internal::RunResult<R>::Value;
  using Returned = typename internal::RunResult<R>::Returned;
  if constexpr (std::is_void_v<Value>) {
    return RunImpl([&](ReplicaContext& ctx) -> Status {
      const int r = ctx.local_replica_id();
      if constexpr (std::is_void_v<R>) {
        step_fn(ctx, internal::ForReplica(args, r)...);
        return OkStatus();
      } else {
        return step_fn(ctx, internal::ForReplica(args, r)...);
      }
    });
  } else {
    std::vector<std::optional<Value>> results(static_cast<size_t>(num_local_replicas()));
    Status s = RunImpl([&](ReplicaContext& ctx) -> Status {
      const int r = ctx.local_replica_id();
      if constexpr (std::is_same_v<R, StatusOr<Value>>) {
        R out = step_fn(ctx, internal::ForReplica(args, r)...);
        if (!out.ok()) return std::move(out).status();
        results[static_cast<size_t>(r)].emplace(std::move(out).value());
      } else {
        results[static_cast<size_t>(r)].emplace(step_fn(ctx, internal::ForReplica(args, r)...));
      }
      return OkStatus();
    });
    if (!s.ok()) return Returned(s);
    std::vector<Value> values;
    values.reserve(results.size());
    for (auto& v : results) values.push_back(std::move(*v));
    return Returned(PerReplica<Value>(std::move(values)));
  }
}

template <typename T>
StatusOr<T> ParameterServerStrategy::Reduce(ReduceOp op, const PerReplica<T>& per_replica) const {
  Status s = CheckCrossReplica("Reduce");
  if (!s.ok()) return s;
  return ReduceValues(op, per_replica);
}

}  // namespace distval

#endif  // DISTVAL_PARAMETER_SERVER_STRATEGY_H_
