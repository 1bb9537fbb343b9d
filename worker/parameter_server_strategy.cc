#include "distval/parameter_server_strategy.h"

#include <Eigen/Core>
#include <algorithm>
#include <chrono>
#include <mutex>
#include <string>
#include <unordered_map>
#include <utility>

#include "distval/devices.h"
#include "replica_group.h"
#include "replica_pool.h"

namespace distval {

namespace internal {

// Host memory for gradients that a co-located parameter server reads where
// it is (Client::AllocatePushBuffer): keeps each block's owner until the
// DeviceBuffer over it is freed.
class PushBufferAllocator final : public DeviceAllocator {
 public:
  void Keep(void* data, std::shared_ptr<const void> owner) {
    std::lock_guard<std::mutex> lock(mu_);
    owners_[data] = std::move(owner);
  }
  void Free(void* data) noexcept override {
    std::lock_guard<std::mutex> lock(mu_);
    owners_.erase(data);
  }

 private:
  std::mutex mu_;
  std::unordered_map<void*, std::shared_ptr<const void>> owners_;  // Guarded by mu_.
};

}  // namespace internal

namespace {

using Clock = std::chrono::steady_clock;

double Seconds(Clock::duration d) { return std::chrono::duration<double>(d).count(); }

std::string Num(int64_t v) { return std::to_string(v); }

std::string Join(const std::vector<std::string>& items, const char* sep) {
  std::string s;
  for (size_t i = 0; i < items.size(); ++i) s += (i ? sep : "") + items[i];
  return s;
}

struct ValidatedOptions {
  std::vector<DeviceSpec> devices;
  int global_batch = 0;
  int per_replica_batch = 0;
};

// Everything that can be checked without touching a device or the network.
StatusOr<ValidatedOptions> Validate(const WorkerOptions& o) {
  if (o.num_workers < 1)
    return InvalidArgumentError("WorkerOptions.num_workers must be >= 1 (got " +
                                Num(o.num_workers) + ")");
  if (o.worker_index < 0 || o.worker_index >= o.num_workers)
    return InvalidArgumentError("worker index " + Num(o.worker_index) + " is outside [0, " +
                                Num(o.num_workers) + ")");
  ValidatedOptions v;
  const DeviceInventory inventory = o.inventory ? *o.inventory : ProbeDevices();
  auto devices = ParseDevices(Join(o.devices, ","), inventory);
  if (!devices.ok()) return devices.status().WithContext("devices");
  v.devices = std::move(*devices);
  const int local = static_cast<int>(v.devices.size());
  const int in_sync = o.num_workers * local;
  const std::string replicas = Num(in_sync) + " replicas in sync (" + Num(o.num_workers) +
                               " worker(s) x " + Num(local) + " device(s))";
  if (o.global_batch_size < 0 || o.per_replica_batch_size < 0)
    return InvalidArgumentError("batch sizes must be >= 1 (global " + Num(o.global_batch_size) +
                                ", per replica " + Num(o.per_replica_batch_size) + ")");
  if (o.global_batch_size > 0) {
    if (o.global_batch_size % in_sync != 0)
      return InvalidArgumentError("global batch size " + Num(o.global_batch_size) +
                                  " does not divide evenly across " + replicas +
                                  "; choose a multiple of " + Num(in_sync));
    v.global_batch = o.global_batch_size;
    v.per_replica_batch = o.global_batch_size / in_sync;
    if (o.per_replica_batch_size > 0 && o.per_replica_batch_size != v.per_replica_batch)
      return InvalidArgumentError("per-replica batch size " + Num(o.per_replica_batch_size) +
                                  " contradicts global batch size " + Num(o.global_batch_size) +
                                  " over " + replicas + " (" + Num(v.per_replica_batch) +
                                  " per replica)");
  } else if (o.per_replica_batch_size > 0) {
    v.per_replica_batch = o.per_replica_batch_size;
    v.global_batch = o.per_replica_batch_size * in_sync;
  }
  return v;
}

}  // namespace

// ---- Creation ---------------------------------------------------------------

StatusOr<std::unique_ptr<ParameterServerStrategy>> ParameterServerStrategy::Create(
    const WorkerOptions& options) {
  DV_ASSIGN_OR_RETURN(ValidatedOptions v, Validate(options));
  (void)v;
  if (options.ps_endpoints.empty())
    return InvalidArgumentError(
        "no parameter servers: WorkerOptions.ps_endpoints is empty (for a single-process run "
        "pass NewLocalParameterStore() to Create)");
  ClientOptions co = options.client;
  co.ps_endpoints = options.ps_endpoints;
  co.worker_index = options.worker_index;
  co.num_workers = options.num_workers;
  co.role = protocol::Role::kWorker;
  co.expected_staleness = options.staleness;
  if (co.observer == nullptr) co.observer = options.telemetry;
  DV_ASSIGN_OR_RETURN(std::unique_ptr<Client> client, Client::Connect(co));
  return Create(options, NewRemoteParameterStore(std::move(client)));
}

StatusOr<std::unique_ptr<ParameterServerStrategy>> ParameterServerStrategy::Create(
    const WorkerOptions& options, std::unique_ptr<ParameterStore> store) {
  DV_ASSIGN_OR_RETURN(ValidatedOptions v, Validate(options));
  if (store == nullptr) return InvalidArgumentError("ParameterServerStrategy: no parameter store");
  std::unique_ptr<ParameterServerStrategy> s(new ParameterServerStrategy());
  s->worker_index_ = options.worker_index;
  s->num_workers_ = options.num_workers;
  s->global_batch_size_ = v.global_batch;
  s->per_replica_batch_size_ = v.per_replica_batch;
  s->default_optimizer_ = options.optimizer;
  s->variable_partitioner_ = options.variable_partitioner;
  s->devices_ = std::move(v.devices);
  const int n = static_cast<int>(s->devices_.size());
  s->store_ = std::move(store);
  s->pool_ = std::make_unique<internal::ReplicaPool>(n);
  s->group_ = std::make_unique<internal::ReplicaGroup>(n);
  s->in_step_ = std::make_unique<std::atomic<bool>[]>(static_cast<size_t>(n));
  s->telemetry_ = options.telemetry;
  s->collective_enter_ = std::make_unique<Clock::time_point[]>(static_cast<size_t>(n));
  // Each backend is created on its replica's thread (the only thread that
  // uses it during training).
  s->backends_.resize(static_cast<size_t>(n));
  std::vector<Status> statuses(static_cast<size_t>(n));
  s->pool_->RunAll([&](int r) {
    auto b = CreateBackend(s->devices_[static_cast<size_t>(r)]);
    if (b.ok()) {
      s->backends_[static_cast<size_t>(r)] = std::move(*b);
    } else {
      statuses[static_cast<size_t>(r)] = b.status();
    }
  });
  for (const Status& st : statuses) DV_RETURN_IF_ERROR(st);
  return s;
}

ParameterServerStrategy::~ParameterServerStrategy() {
  // Models and variables hold device buffers and borrow the backends: drop
  // them first, then the threads, then the backends; the store (and its
  // connection) last of the rest. Device work still queued (asynchronous
  // backends) finishes first, each on its replica's thread.
  if (pool_ != nullptr) {
    pool_->RunAll([&](int r) {
      if (backends_[static_cast<size_t>(r)] != nullptr)
        backends_[static_cast<size_t>(r)]->Synchronize().IgnoreError();
    });
  }
  models_.clear();
  variables_.clear();
  sync_on_read_.clear();
  pool_.reset();
  backends_.clear();
}

StatusOr<DistributedDataset> ParameterServerStrategy::DistributeDataset(
    std::shared_ptr<const Examples> examples, InputOptions options) const {
  if (global_batch_size_ > 0) options.global_batch_size = global_batch_size_;
  return DistributedDataset::Create(std::move(examples), input_context(), options);
}

std::string ParameterServerStrategy::Describe() const {
  std::vector<std::string> names;
  for (const DeviceSpec& d : devices_) names.push_back(d.ToString());
  std::string s = "worker " + Num(worker_index_) + "/" + Num(num_workers_) + ", " +
                  Num(num_local_replicas()) + " replica(s) " + Join(names, ",") + " (" +
                  Num(num_replicas_in_sync()) + " in sync)";
  if (global_batch_size_ > 0)
    s += ", global batch " + Num(global_batch_size_) + " (" + Num(per_replica_batch_size_) +
         " per replica)";
  return s + ", " + store_->Describe();
}

// ---- Contexts -----------------------------------------------------------------

bool ParameterServerStrategy::InCrossReplicaContext() const {
  const int r = pool_->CurrentReplica();
  if (r < 0) return true;
  if (!in_step_[static_cast<size_t>(r)].load()) return true;
  return r == 0 && merging_.load();
}

Status ParameterServerStrategy::CheckCrossReplica(const char* op) const {
  if (InCrossReplicaContext()) return OkStatus();
  return FailedPreconditionError(
      std::string(op) +
      " is a cross-replica operation: call it outside step functions (after Run) or inside "
      "ReplicaContext::MergeCall; in a step function use ReplicaContext::AllReduce or the "
      "replica's own value");
}

bool ParameterServerStrategy::InsideRun() const {
  return running_.load() || pool_->CurrentReplica() >= 0;
}

// ---- Variables -----------------------------------------------------------------

StatusOr<MirroredVariable*> ParameterServerStrategy::CreateVariable(
    const std::string& name, const Shape& shape, const VariableInitializer& initializer,
    const CreateVariableOptions& options) {
  return CreateVariableImpl(name, shape, initializer, options, nullptr);
}

StatusOr<MirroredVariable*> ParameterServerStrategy::CreateVariableImpl(
    const std::string& name, const Shape& shape, const VariableInitializer& initializer,
    const CreateVariableOptions& options, const std::vector<Parameter>* bind_to) {
  const std::string who = "CreateVariable('" + name + "')";
  if (InsideRun())
    return FailedPreconditionError(who + " inside a Run: create variables before running steps");
  if (name.empty()) return InvalidArgumentError("CreateVariable: the variable name is empty");
  for (const auto& v : variables_) {
    if (v->name() == name)
      return InvalidArgumentError(who + ": this strategy already has a variable of that name");
  }
  for (const auto& v : sync_on_read_) {
    if (v->name() == name)
      return InvalidArgumentError(who + ": a SyncOnReadVariable already has that name");
  }
  if (options.trainable && options.aggregation != VariableAggregation::kMean &&
      options.aggregation != VariableAggregation::kSum)
    return InvalidArgumentError(
        who + ": aggregation " + std::string(VariableAggregationName(options.aggregation)) +
        " is not supported for a trainable variable (its gradients are reduced across replicas "
        "and pushed: use mean or sum)");
  const int64_t n = shape.num_elements();
  if (!initializer.values().empty() && static_cast<int64_t>(initializer.values().size()) != n)
    return InvalidArgumentError(
        who + ": " + Num(static_cast<int64_t>(initializer.values().size())) +
        " initial values for shape " + shape.ToString() + " (" + Num(n) + " elements)");
  const int replicas = num_local_replicas();
  if (bind_to != nullptr) {
    if (static_cast<int>(bind_to->size()) != replicas)
      return InternalError(who + ": bound to " + Num(static_cast<int64_t>(bind_to->size())) +
                           " replicas, the strategy has " + Num(replicas));
    for (int r = 0; r < replicas; ++r) {
      const Parameter& p = (*bind_to)[static_cast<size_t>(r)];
      if (p.value == nullptr || p.grad == nullptr || p.shape != shape || p.value->size() < n ||
          p.grad->size() < n)
        return InvalidArgumentError(who + ": replica " + Num(r) +
                                    " parameter buffers do not match shape " + shape.ToString());
    }
  }

  VariableOptions vo;
  vo.initializer = initializer.spec();
  vo.initial_values = initializer.values();
  vo.optimizer = options.optimizer.value_or(default_optimizer_);
  vo.aggregation = options.aggregation == VariableAggregation::kSum ? protocol::Aggregation::kSum
                                                                    : protocol::Aggregation::kMean;
  vo.staleness = options.staleness.value_or(protocol::kStalenessInherit);
  vo.partitioner = options.partitioner.value_or(variable_partitioner_);
  DV_RETURN_IF_ERROR(store_->CreateVariable(name, shape, vo));

  std::unique_ptr<MirroredVariable> var(
      new MirroredVariable(this, name, shape, options.aggregation, options.trainable, replicas));
  if (bind_to != nullptr) {
    for (int r = 0; r < replicas; ++r) {
      const Parameter& p = (*bind_to)[static_cast<size_t>(r)];
      var->replicas_[static_cast<size_t>(r)].value = p.value;
      var->replicas_[static_cast<size_t>(r)].grad = p.grad;
    }
  } else {
    std::lock_guard<std::mutex> lock(run_mu_);
    std::vector<Status> statuses(static_cast<size_t>(replicas));
    pool_->RunAll([&](int r) {
      Backend& b = *backends_[static_cast<size_t>(r)];
      MirroredVariable::ReplicaCopy& copy = var->replicas_[static_cast<size_t>(r)];
      auto value = b.Allocate(n);
      auto grad = b.Allocate(n);
      if (!value.ok() || !grad.ok()) {
        statuses[static_cast<size_t>(r)] = value.ok() ? grad.status() : value.status();
        return;
      }
      copy.own_value = std::move(*value);
      copy.own_grad = std::move(*grad);
      copy.value = &copy.own_value;
      copy.grad = &copy.own_grad;
    });
    for (const Status& s : statuses) DV_RETURN_IF_ERROR(s.WithContext(who));
  }
  if (options.trainable) PlaceGradientForPush(*var);
  MirroredVariable* raw = var.get();
  variables_.push_back(std::move(var));
  variable_list_.push_back(raw);
  pull_names_.push_back(name);
  mirror_stale_ = true;
  return raw;
}

void ParameterServerStrategy::PlaceGradientForPush(MirroredVariable& v) {
  Client* client = store_->client();
  if (client == nullptr || devices_[0].kind != DeviceKind::kCpu) return;
  // The buffer ApplyGradients pushes: the replica's own gradient with one
  // replica, else the sum of the replicas' (ReducedGradient).
  const bool one = num_local_replicas() == 1;
  const int64_t n = one ? v.replicas_[0].grad->size() : v.shape().num_elements();
  // Smaller tensors go as ZeroMQ frames anyway (the transport's threshold).
  if (n * static_cast<int64_t>(sizeof(float)) < 64 * 1024) return;
  auto buffer = client->AllocatePushBuffer(n);
  if (!buffer.ok() || !buffer->shared_memory) return;  // pushes copy, as before
  if (push_allocator_ == nullptr)
    push_allocator_ = std::make_shared<internal::PushBufferAllocator>();
  push_allocator_->Keep(buffer->values.data(), buffer->owner);
  DeviceBuffer lent = DeviceBuffer::Adopt(push_allocator_, backends_[0]->device(), DType::kF32,
                                          buffer->values.data(), n);
  if (one) {
    *v.replicas_[0].grad = std::move(lent);  // backward writes it from now on
  } else {
    v.reduced_ = std::move(lent);
  }
}

StatusOr<SyncOnReadVariable*> ParameterServerStrategy::CreateSyncOnReadVariable(
    const std::string& name, const Shape& shape, VariableAggregation aggregation) {
  const std::string who = "CreateSyncOnReadVariable('" + name + "')";
  if (InsideRun())
    return FailedPreconditionError(who + " inside a Run: create variables before running steps");
  if (name.empty()) return InvalidArgumentError("CreateSyncOnReadVariable: the name is empty");
  for (const auto& v : sync_on_read_) {
    if (v->name() == name)
      return InvalidArgumentError(who + ": this strategy already has a variable of that name");
  }
  for (const auto& v : variables_) {
    if (v->name() == name)
      return InvalidArgumentError(who + ": a MirroredVariable already has that name");
  }
  std::unique_ptr<SyncOnReadVariable> var(
      new SyncOnReadVariable(this, name, shape, aggregation, num_local_replicas()));
  SyncOnReadVariable* raw = var.get();
  sync_on_read_.push_back(std::move(var));
  return raw;
}

StatusOr<MirroredModel*> ParameterServerStrategy::CreateModel(const Sequential& model,
                                                              const ModelOptions& options) {
  if (InsideRun())
    return FailedPreconditionError("CreateModel inside a Run: create models before running steps");
  if (options.input_features < 1)
    return InvalidArgumentError("CreateModel: ModelOptions.input_features must be >= 1 (got " +
                                Num(options.input_features) + ")");
  const int max_batch = options.max_batch > 0 ? options.max_batch : per_replica_batch_size_;
  if (max_batch < 1)
    return InvalidArgumentError(
        "CreateModel: ModelOptions.max_batch is " + Num(options.max_batch) +
        " and the strategy has no per-replica batch (set WorkerOptions.global_batch_size or "
        "ModelOptions.max_batch)");
  DV_ASSIGN_OR_RETURN(const int out_features, model.OutputFeatures(options.input_features));
  std::unique_ptr<MirroredModel> mm(new MirroredModel());
  mm->max_batch_ = max_batch;
  mm->input_features_ = options.input_features;
  mm->output_features_ = out_features;
  const int replicas = num_local_replicas();
  for (int r = 0; r < replicas; ++r) mm->replicas_.push_back(model.Clone());
  {
    std::lock_guard<std::mutex> lock(run_mu_);
    std::vector<Status> statuses(static_cast<size_t>(replicas));
    pool_->RunAll([&](int r) {
      statuses[static_cast<size_t>(r)] = mm->replicas_[static_cast<size_t>(r)]->Build(
          backends_[static_cast<size_t>(r)].get(), max_batch, options.input_features);
    });
    for (int r = 0; r < replicas; ++r)
      DV_RETURN_IF_ERROR(statuses[static_cast<size_t>(r)].WithContext(
          "CreateModel: building replica " + Num(r) + " on " +
          devices_[static_cast<size_t>(r)].ToString()));
  }
  std::vector<std::vector<Parameter>> params;
  for (auto& replica : mm->replicas_) params.push_back(replica->Parameters());
  const std::vector<ParameterSpec> specs = model.ParameterSpecs();
  std::vector<Tensor> seeded;
  if (options.initial_values.empty()) {
    seeded = model.InitialValues(options.seed);
  } else if (options.initial_values.size() != specs.size()) {
    return InvalidArgumentError(
        "CreateModel: " + Num(static_cast<int64_t>(options.initial_values.size())) +
        " initial values for " + Num(static_cast<int64_t>(specs.size())) + " parameters");
  }
  const std::span<const Tensor> init =
      options.initial_values.empty() ? std::span<const Tensor>(seeded) : options.initial_values;
  for (size_t i = 0; i < specs.size(); ++i) {
    if (init[i].dtype() != DType::kF32 || init[i].shape() != specs[i].shape)
      return InvalidArgumentError("CreateModel: the initial value of '" + specs[i].name + "' is " +
                                  std::string(DTypeName(init[i].dtype())) +
                                  init[i].shape().ToString() + ", the parameter is f32" +
                                  specs[i].shape.ToString());
  }
  for (size_t i = 0; i < specs.size(); ++i) {
    std::vector<Parameter> bind;
    for (int r = 0; r < replicas; ++r) bind.push_back(params[static_cast<size_t>(r)][i]);
    DV_ASSIGN_OR_RETURN(
        MirroredVariable * v,
        CreateVariableImpl(options.name_prefix + specs[i].name, specs[i].shape,
                           VariableInitializer::Values(init[i]), options.variables, &bind));
    mm->variables_.push_back(v);
  }
  MirroredModel* raw = mm.get();
  models_.push_back(std::move(mm));
  return raw;
}

// ---- Pull and mirror -------------------------------------------------------

int64_t ParameterServerStrategy::AcceptRollback() {
  prefetch_.reset();
  mirror_stale_ = true;
  return store_->AcceptRollback();
}

Status ParameterServerStrategy::PullIfStale() {
  if (variables_.empty()) return OkStatus();
  if (!mirror_stale_ && mirrored_clock_ == store_->clock()) return OkStatus();
  const auto t0 = Clock::now();
  Status s;
  if (prefetch_ != nullptr && prefetch_clock_ == store_->clock() &&
      prefetch_variables_ == pull_names_.size()) {
    // Started right behind this worker's last push.
    s = prefetch_done_.Wait();
    if (s.ok()) pulled_.swap(*prefetch_);
  } else {
    s = store_->Pull(pull_names_, &pulled_);
  }
  // A failed prefetch's vector may still be written by a late reply: drop it.
  prefetch_.reset();
  const auto t1 = Clock::now();
  const double wait = Seconds(t1 - t0);
  if (!s.ok()) return s.WithContext("pull at clock " + Num(store_->clock()));
  if (telemetry_ != nullptr) telemetry_->OnPull(store_->clock(), t0, t1);
  pending_pull_wait_s_ += wait;
  stats_.pulls += 1;
  stats_.pull_wait_s += wait;
  pending_staleness_ = std::max<int64_t>(0, store_->clock() - store_->min_clock());
  if (pulled_.size() != variables_.size())
    return InternalError("pull returned " + Num(static_cast<int64_t>(pulled_.size())) +
                         " variables for " + Num(static_cast<int64_t>(variables_.size())));
  for (size_t i = 0; i < variables_.size(); ++i) {
    variables_[i]->version_ = pulled_[i].version;
    variables_[i]->pulled_ = true;
  }
  mirrored_clock_ = store_->clock();
  mirror_stale_ = false;
  return OkStatus();
}

Status ParameterServerStrategy::MirrorInto(int replica) {
  Backend& b = *backends_[static_cast<size_t>(replica)];
  for (size_t i = 0; i < variables_.size(); ++i) {
    MirroredVariable& v = *variables_[i];
    const int64_t row_elements = v.shape().row_elements();
    DeviceBuffer& dst = *v.replicas_[static_cast<size_t>(replica)].value;
    for (const PulledSlice& slice : pulled_[i].slices) {
      const int64_t count = (slice.row_end - slice.row_begin) * row_elements;
      if (static_cast<int64_t>(slice.values.size()) != count)
        return InternalError("pulled slice of '" + v.name() + "' has " +
                             Num(static_cast<int64_t>(slice.values.size())) + " values for rows [" +
                             Num(slice.row_begin) + ", " + Num(slice.row_end) + ")");
      if (count > 0)
        DV_RETURN_IF_ERROR(
            b.CopyToDevice(slice.values.data(), dst, count, slice.row_begin * row_elements));
    }
  }
  return OkStatus();
}

Status ParameterServerStrategy::RefreshVariables() {
  if (InsideRun())
    return FailedPreconditionError("RefreshVariables inside a Run (Run refreshes by itself)");
  std::lock_guard<std::mutex> lock(run_mu_);
  const int64_t before = stats_.pulls;
  DV_RETURN_IF_ERROR(PullIfStale());
  if (stats_.pulls == before) return OkStatus();
  std::vector<Status> statuses(static_cast<size_t>(num_local_replicas()));
  pool_->RunAll([&](int r) { statuses[static_cast<size_t>(r)] = MirrorInto(r); });
  pulled_.clear();
  for (const Status& s : statuses) {
    if (!s.ok()) {
      mirror_stale_ = true;
      return s;
    }
  }
  return OkStatus();
}

// ---- Run ---------------------------------------------------------------------

Status ParameterServerStrategy::RunImpl(const std::function<Status(ReplicaContext&)>& fn) {
  if (pool_->CurrentReplica() >= 0)
    return FailedPreconditionError("Run called from a step function: Runs do not nest");
  std::lock_guard<std::mutex> lock(run_mu_);
  const auto step_begin = Clock::now();
  const int64_t pulls_before = stats_.pulls;
  DV_RETURN_IF_ERROR(PullIfStale());
  const bool mirror = stats_.pulls != pulls_before;
  group_->Reset();
  push_wait_in_run_ = 0;
  pushed_in_run_ = false;
  run_step_ = store_->clock();
  blocked_in_run_ = 0;
  reduce_in_run_ = 0;
  const int n = num_local_replicas();
  std::vector<Status> statuses(static_cast<size_t>(n));
  std::atomic<bool> mirror_failed{false};
  running_.store(true);
  const auto t0 = Clock::now();
  pool_->RunAll([&](int r) {
    Status s;
    if (mirror) {
      const auto m0 = Clock::now();
      s = MirrorInto(r);
      if (!s.ok()) mirror_failed.store(true);
      if (telemetry_ != nullptr)
        telemetry_->OnReplicaSpan(r, StepPhase::kMirror, run_step_, m0, Clock::now());
    }
    if (s.ok()) {
      ReplicaContext ctx(this, backends_[static_cast<size_t>(r)].get(), r, n, worker_index_,
                         num_workers_);
      const auto c0 = Clock::now();
      in_step_[static_cast<size_t>(r)].store(true);
      s = fn(ctx);
      in_step_[static_cast<size_t>(r)].store(false);
      if (telemetry_ != nullptr)
        telemetry_->OnReplicaSpan(r, StepPhase::kCompute, run_step_, c0, Clock::now());
    }
    group_->Leave(r, s);
    statuses[static_cast<size_t>(r)] = std::move(s);
  });
  const auto run_end = Clock::now();
  const double run_s = Seconds(run_end - t0);
  running_.store(false);
  if (mirror) pulled_.clear();  // releases the received frames
  if (mirror_failed.load()) mirror_stale_ = true;
  if (pushed_in_run_) {
    last_step_.clock = store_->clock();
    last_step_.pull_wait_s = pending_pull_wait_s_;
    last_step_.push_wait_s = push_wait_in_run_;
    last_step_.compute_s = std::max(0.0, run_s - push_wait_in_run_);
    last_step_.staleness = pending_staleness_;
    pending_pull_wait_s_ = 0;
    stats_.steps += 1;
    stats_.push_wait_s += last_step_.push_wait_s;
    stats_.compute_s += last_step_.compute_s;
    stats_.staleness_sum += last_step_.staleness;
    stats_.staleness_max = std::max(stats_.staleness_max, last_step_.staleness);
    const size_t k = static_cast<size_t>(last_step_.staleness);
    if (stats_.staleness_histogram.size() <= k) stats_.staleness_histogram.resize(k + 1, 0);
    stats_.staleness_histogram[k] += 1;
    if (telemetry_ != nullptr) {
      StepTiming t;
      t.step = run_step_;
      t.begin = step_begin;
      t.end = run_end;
      t.pull_s = last_step_.pull_wait_s;
      t.push_s = push_wait_in_run_;
      t.blocked_s = blocked_in_run_;
      t.reduce_s = reduce_in_run_;
      t.compute_s = std::max(0.0, run_s - push_wait_in_run_ - blocked_in_run_ - reduce_in_run_);
      t.staleness = last_step_.staleness;
      telemetry_->OnStep(t);
    }
  }
  DV_RETURN_IF_ERROR(group_->first_failure());
  for (const Status& s : statuses) DV_RETURN_IF_ERROR(s);
  return OkStatus();
}

Status ParameterServerStrategy::RunOnReplica(int local_replica,
                                             const std::function<Status(Backend&)>& fn) {
  if (local_replica < 0 || local_replica >= num_local_replicas())
    return InvalidArgumentError("RunOnReplica: replica " + Num(local_replica) + " is outside [0, " +
                                Num(num_local_replicas()) + ")");
  if (InsideRun()) return FailedPreconditionError("RunOnReplica inside a Run");
  std::lock_guard<std::mutex> lock(run_mu_);
  Status result;
  pool_->RunOn(local_replica, [&](int r) { result = fn(*backends_[static_cast<size_t>(r)]); });
  return result;
}

Status ParameterServerStrategy::Collective(int replica, const void* mine,
                                           const internal::MergeFunction& merge,
                                           std::shared_ptr<const void>* result) {
  return group_->Collective(
      replica, mine, merge, [this](bool on) { merging_.store(on); }, result);
}

// ---- Gradients -----------------------------------------------------------------

StatusOr<std::span<const float>> ParameterServerStrategy::ReducedGradient(MirroredVariable& v) {
  const int replicas = num_local_replicas();
  const int64_t n = v.num_elements();
  const size_t count = static_cast<size_t>(n);
  Backend& b0 = *backends_[0];
  const bool host_memory = devices_[0].kind == DeviceKind::kCpu;
  const float scale =
      v.aggregation() == VariableAggregation::kMean ? 1.0f / static_cast<float>(replicas) : 1.0f;
  auto host_staging = [&]() -> float* {
    if (v.host_gradient_.num_elements() != n) v.host_gradient_ = Tensor(DType::kF32, v.shape());
    return v.host_gradient_.data_as<float>();
  };
  if (replicas == 1) {
    DeviceBuffer& g = v.gradient(0);
    // CPU memory is host memory: push the replica's gradient buffer as it is.
    if (host_memory) return std::span<const float>(g.data_as<float>(), count);
    float* host = host_staging();
    DV_RETURN_IF_ERROR(b0.CopyToHost(g, host, n));
    return std::span<const float>(host, count);
  }
  std::vector<const DeviceBuffer*> inputs;
  bool accessible = true;
  for (int r = 0; r < replicas; ++r) {
    inputs.push_back(&v.gradient(r));
    accessible = accessible && b0.CanAccess(v.gradient(r));
  }
  if (accessible) {
    // On replica 0's device.
    if (v.reduced_.size() != n) {
      DV_ASSIGN_OR_RETURN(v.reduced_, b0.Allocate(n));
    }
    DV_RETURN_IF_ERROR(b0.ReduceSum(inputs, scale, v.reduced_, n));
    if (host_memory) return std::span<const float>(v.reduced_.data_as<float>(), count);
    float* host = host_staging();
    DV_RETURN_IF_ERROR(b0.CopyToHost(v.reduced_, host, n));
    return std::span<const float>(host, count);
  }
  // Devices that cannot read each other (e.g. cpu and cuda replicas): sum
  // on the host. The other replicas' threads wait in the collective, so
  // their backends are free to use from here.
  float* host = host_staging();
  Eigen::Map<Eigen::ArrayXf> acc(host, n);
  std::vector<float> scratch(count);
  for (int r = 0; r < replicas; ++r) {
    DV_RETURN_IF_ERROR(
        backends_[static_cast<size_t>(r)]->CopyToHost(v.gradient(r), scratch.data(), n));
    if (r == 0) {
      acc = Eigen::Map<const Eigen::ArrayXf>(scratch.data(), n);
    } else {
      acc += Eigen::Map<const Eigen::ArrayXf>(scratch.data(), n);
    }
  }
  acc *= scale;
  return std::span<const float>(host, count);
}

Status ParameterServerStrategy::PushGradients(std::span<MirroredVariable* const> variables,
                                              bool only_trainable) {
  const auto merge_begin = Clock::now();
  merge_begin_ = merge_begin;
  push_sources_.clear();
  for (MirroredVariable* v : variables) {
    if (v == nullptr || v->strategy_ != this)
      return InvalidArgumentError("ApplyGradients: a variable does not belong to this strategy");
    if (!v->trainable()) {
      if (only_trainable) continue;
      return InvalidArgumentError("ApplyGradients: variable '" + v->name() + "' is not trainable");
    }
    DV_ASSIGN_OR_RETURN(std::span<const float> g, ReducedGradient(*v));
    push_sources_.push_back(PushSource{v->name(), g});
  }
  const int64_t clock = store_->clock();
  const auto t0 = Clock::now();
  reduce_in_run_ += Seconds(t0 - merge_begin);
  const int replica = pool_->CurrentReplica();
  if (telemetry_ != nullptr)
    telemetry_->OnReplicaSpan(replica, StepPhase::kReduce, run_step_, merge_begin, t0);
  prefetch_.reset();  // from an earlier push of this Run: out of date
  RequestHandle pushed;
  Status s = store_->StartPush(push_sources_, &pushed);
  if (s.ok()) {
    // The next step's pull goes out right behind the push, before its
    // acknowledgement: the servers answer it as soon as the consistency
    // model allows (read-my-writes: it sees this push). The next Run (or
    // RefreshVariables) waits for it.
    auto prefetch = std::make_shared<std::vector<PulledVariable>>();
    if (store_->StartPull(pull_names_, prefetch, &prefetch_done_).ok()) {
      prefetch_ = std::move(prefetch);
      prefetch_clock_ = store_->clock();
      prefetch_variables_ = pull_names_.size();
    }
    s = pushed.Wait();
  }
  const auto t1 = Clock::now();
  push_wait_in_run_ += Seconds(t1 - t0);
  pushed_in_run_ = true;
  if (telemetry_ != nullptr)
    telemetry_->OnReplicaSpan(replica, StepPhase::kPush, run_step_, t0, t1);
  return s.WithContext("push of step " + Num(clock));
}

// ---- ReplicaContext ------------------------------------------------------------

Status ReplicaContext::Collective(const void* mine, const internal::MergeFunction& merge,
                                  std::shared_ptr<const void>* result) {
  return strategy_->Collective(local_replica_id_, mine, merge, result);
}

void ParameterServerStrategy::RecordApplyGradients(int replica, Clock::time_point enter) {
  const auto now = Clock::now();
  // The replica that ran the merge was blocked until the merge began; the
  // others until the collective ended.
  const bool merged_here = replica == 0 && merge_begin_ >= enter && merge_begin_ <= now;
  const auto blocked_end = merged_here ? merge_begin_ : now;
  if (replica == 0) blocked_in_run_ += Seconds(blocked_end - enter);
  if (telemetry_ != nullptr)
    telemetry_->OnReplicaSpan(replica, StepPhase::kBlocked, run_step_, enter, blocked_end);
}

Status ReplicaContext::ApplyGradients() {
  // Asynchronous backends (CUDA) may still be writing this replica's
  // gradients; replica 0 reads them all once everyone is in.
  DV_RETURN_IF_ERROR(backend_->Synchronize());
  const auto enter = std::chrono::steady_clock::now();
  ParameterServerStrategy* s = strategy_;
  internal::MergeFunction merge =
      [s](std::span<const void* const>) -> StatusOr<std::shared_ptr<const void>> {
    DV_RETURN_IF_ERROR(s->PushGradients(s->variable_list_, /*only_trainable=*/true));
    return std::shared_ptr<const void>();
  };
  std::shared_ptr<const void> unused;
  Status st = Collective(nullptr, merge, &unused);
  s->RecordApplyGradients(local_replica_id_, enter);
  return st;
}

Status ReplicaContext::ApplyGradients(std::span<MirroredVariable* const> variables) {
  DV_RETURN_IF_ERROR(backend_->Synchronize());
  const auto enter = std::chrono::steady_clock::now();
  ParameterServerStrategy* s = strategy_;
  internal::MergeFunction merge =
      [s, variables](std::span<const void* const>) -> StatusOr<std::shared_ptr<const void>> {
    DV_RETURN_IF_ERROR(s->PushGradients(variables, /*only_trainable=*/false));
    return std::shared_ptr<const void>();
  };
  std::shared_ptr<const void> unused;
  Status st = Collective(nullptr, merge, &unused);
  s->RecordApplyGradients(local_replica_id_, enter);
  return st;
}

// ---- Variables' and models' context-dependent accessors -------------------------

const DeviceBuffer& MirroredVariable::value(const ReplicaContext& ctx) const {
  return value(ctx.local_replica_id());
}

DeviceBuffer& MirroredVariable::gradient(const ReplicaContext& ctx) {
  return gradient(ctx.local_replica_id());
}

StatusOr<Tensor> MirroredVariable::Read() const {
  const std::string who = "MirroredVariable('" + name_ + "')::Read";
  DV_RETURN_IF_ERROR(strategy_->CheckCrossReplica(who.c_str()));
  Tensor out(DType::kF32, shape_);
  auto copy = [&](Backend& b) {
    return b.CopyToHost(*replicas_[0].value, out.data_as<float>(), num_elements());
  };
  if (strategy_->pool_->CurrentReplica() == 0) {
    // Inside a MergeCall on replica 0's thread: the mirror is current.
    DV_RETURN_IF_ERROR(copy(*strategy_->backends_[0]));
    return out;
  }
  DV_RETURN_IF_ERROR(strategy_->RefreshVariables());
  if (!pulled_) return FailedPreconditionError(who + ": the variable has not been pulled yet");
  DV_RETURN_IF_ERROR(strategy_->RunOnReplica(0, copy));
  return out;
}

Sequential& MirroredModel::replica(const ReplicaContext& ctx) {
  return replica(ctx.local_replica_id());
}

std::span<double> SyncOnReadVariable::local(const ReplicaContext& ctx) {
  return values_[static_cast<size_t>(ctx.local_replica_id())];
}

std::span<const double> SyncOnReadVariable::local(const ReplicaContext& ctx) const {
  return values_[static_cast<size_t>(ctx.local_replica_id())];
}

Status SyncOnReadVariable::CheckCrossReplica(const char* op) const {
  return strategy_->CheckCrossReplica(("SyncOnReadVariable('" + name_ + "')::" + op).c_str());
}

}  // namespace distval
