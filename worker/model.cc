#include "distval/model.h"

#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <iomanip>
#include <iostream>
#include <numeric>
#include <optional>
#include <set>
#include <sstream>
#include <utility>

#include "distval/local_parameter_store.h"
#include "progress_bar.h"

namespace distval {

namespace {

using Clock = std::chrono::steady_clock;

double Seconds(Clock::duration d) { return std::chrono::duration<double>(d).count(); }

std::string Num(int64_t v) { return std::to_string(v); }

// Rows per evaluation / prediction chunk unless asked otherwise.
constexpr int kDefaultChunk = 256;

bool SameContext(const InputContext& a, const InputContext& b) {
  return a.num_input_pipelines == b.num_input_pipelines &&
         a.input_pipeline_id == b.input_pipeline_id &&
         a.num_replicas_in_sync == b.num_replicas_in_sync;
}

}  // namespace

// ---- Optimizers, loss ---------------------------------------------------------

namespace optimizers {

protocol::OptimizerSpec Sgd(double learning_rate, double momentum, bool nesterov) {
  protocol::OptimizerSpec s;
  s.kind = momentum > 0 ? protocol::OptimizerKind::kMomentum : protocol::OptimizerKind::kSgd;
  s.learning_rate = learning_rate;
  s.momentum = momentum;
  s.nesterov = nesterov;
  return s;
}

protocol::OptimizerSpec Adam(double learning_rate, double beta1, double beta2, double epsilon) {
  protocol::OptimizerSpec s;
  s.kind = protocol::OptimizerKind::kAdam;
  s.learning_rate = learning_rate;
  s.beta1 = beta1;
  s.beta2 = beta2;
  s.epsilon = epsilon;
  return s;
}

protocol::OptimizerSpec AdamW(double learning_rate, double weight_decay, double beta1, double beta2,
                              double epsilon) {
  protocol::OptimizerSpec s = Adam(learning_rate, beta1, beta2, epsilon);
  s.kind = protocol::OptimizerKind::kAdamW;
  s.weight_decay = weight_decay;
  return s;
}

protocol::OptimizerSpec Adagrad(double learning_rate, double initial_accumulator, double epsilon) {
  protocol::OptimizerSpec s;
  s.kind = protocol::OptimizerKind::kAdagrad;
  s.learning_rate = learning_rate;
  s.initial_accumulator = initial_accumulator;
  s.epsilon = epsilon;
  return s;
}

}  // namespace optimizers

std::string Loss::name() const { return "sparse_categorical_crossentropy"; }

// ---- Model internals ---------------------------------------------------------

// A replica's batch buffers and loss head, on its device.
struct Model::ReplicaState {
  std::optional<DeviceBatch> batch;
  SoftmaxCrossEntropy head;
  DeviceBuffer input;  // Predict's rows
};

// One metric's accumulators: total / count is its value.
struct Model::MetricState {
  Metric spec;
  SyncOnReadVariable* total = nullptr;  // Owned by the strategy.
  SyncOnReadVariable* count = nullptr;
};

// ---- Creation -------------------------------------------------------------------

StatusOr<std::unique_ptr<Model>> Model::Create(ParameterServerStrategy& strategy,
                                               const Sequential& layers,
                                               const ModelBuildOptions& options) {
  return CreateImpl(&strategy, nullptr, layers, options);
}

StatusOr<std::unique_ptr<Model>> Model::CreateLocal(const Sequential& layers,
                                                    const ModelBuildOptions& options,
                                                    const std::vector<std::string>& devices) {
  WorkerOptions wo;
  wo.devices = devices;
  DV_ASSIGN_OR_RETURN(std::unique_ptr<ParameterServerStrategy> strategy,
                      ParameterServerStrategy::Create(wo, NewLocalParameterStore()));
  ParameterServerStrategy* raw = strategy.get();
  return CreateImpl(raw, std::move(strategy), layers, options);
}

StatusOr<std::unique_ptr<Model>> Model::CreateImpl(ParameterServerStrategy* strategy,
                                                   std::unique_ptr<ParameterServerStrategy> owned,
                                                   const Sequential& layers,
                                                   const ModelBuildOptions& options) {
  if (options.input_features < 1)
    return InvalidArgumentError("Model: ModelBuildOptions.input_features must be >= 1 (got " +
                                Num(options.input_features) + ")");
  if (options.max_batch < 0)
    return InvalidArgumentError("Model: ModelBuildOptions.max_batch must be >= 0 (got " +
                                Num(options.max_batch) + ")");
  const int per_replica = strategy->per_replica_batch_size();
  if (options.max_batch > 0 && options.max_batch < per_replica)
    return InvalidArgumentError("Model: max_batch " + Num(options.max_batch) +
                                " is below the strategy's per-replica batch " + Num(per_replica));
  DV_ASSIGN_OR_RETURN(const int out_features, layers.OutputFeatures(options.input_features));
  if (options.initial_values != nullptr) {
    const std::vector<ParameterSpec> specs = layers.ParameterSpecs();
    const std::vector<Tensor>& init = *options.initial_values;
    if (init.size() != specs.size())
      return InvalidArgumentError("Model: " + Num(static_cast<int64_t>(init.size())) +
                                  " initial values for " + Num(static_cast<int64_t>(specs.size())) +
                                  " parameters");
    for (size_t i = 0; i < specs.size(); ++i) {
      if (init[i].dtype() != DType::kF32 || init[i].shape() != specs[i].shape)
        return InvalidArgumentError("Model: the initial value of '" + specs[i].name + "' is " +
                                    std::string(DTypeName(init[i].dtype())) +
                                    init[i].shape().ToString() + ", the parameter is f32" +
                                    specs[i].shape.ToString());
    }
  }
  std::unique_ptr<Model> m(new Model());
  m->owned_strategy_ = std::move(owned);
  m->strategy_ = strategy;
  m->layers_ = std::move(*layers.Clone());
  m->options_ = options;
  m->output_features_ = out_features;
  m->max_batch_ = options.max_batch > 0 ? options.max_batch : std::max(per_replica, kDefaultChunk);
  return m;
}

Model::~Model() {
  // Device buffers are released on their replica's thread, after its queued
  // work.
  for (size_t r = 0; r < replicas_.size(); ++r) {
    strategy_
        ->RunOnReplica(static_cast<int>(r),
                       [&](Backend& b) -> Status {
                         b.Synchronize().IgnoreError();
                         replicas_[r].reset();
                         return OkStatus();
                       })
        .IgnoreError();
  }
  replicas_.clear();
}

// ---- Compile and Build -------------------------------------------------------------

Status Model::Compile(const protocol::OptimizerSpec& optimizer, Loss loss,
                      std::vector<Metric> metrics) {
  if (!loss.from_logits)
    return UnimplementedError(
        "Compile: SparseCategoricalCrossentropy(from_logits=false) is not implemented; end the "
        "model with a Dense layer (logits) and use from_logits=true");
  if (!std::isfinite(optimizer.learning_rate) || optimizer.learning_rate < 0)
    return InvalidArgumentError("Compile: the learning rate " +
                                std::to_string(optimizer.learning_rate) +
                                " must be finite and >= 0");
  std::set<std::string> names;
  for (const Metric& m : metrics) {
    if (m.name.empty()) return InvalidArgumentError("Compile: a metric has no name");
    if (m.name == "loss" || m.name.rfind("val_", 0) == 0)
      return InvalidArgumentError("Compile: the metric name '" + m.name +
                                  "' is reserved (\"loss\", \"val_*\")");
    if (!names.insert(m.name).second)
      return InvalidArgumentError("Compile: the metric name '" + m.name + "' is repeated");
  }
  if (built() && built_optimizer_.has_value() && !(*built_optimizer_ == optimizer))
    return FailedPreconditionError(
        "Compile: the model's variables were already created on the servers with the " +
        std::string(protocol::OptimizerKindName(built_optimizer_->kind)) +
        " optimizer; compile before Build / Fit / Evaluate / Predict, or load the model with "
        "another name_prefix");
  if (built() && !built_optimizer_.has_value() && !(strategy_->default_optimizer() == optimizer))
    return FailedPreconditionError(
        "Compile: the model's variables were already created (uncompiled) with the strategy's "
        "default optimizer; compile before Build / Fit / Evaluate / Predict");
  compiled_ = CompileOptions{optimizer, loss, std::move(metrics)};
  learning_rate_ = optimizer.learning_rate;
  if (built()) DV_RETURN_IF_ERROR(CreateMetricVariables());
  return OkStatus();
}

Status Model::Build() {
  if (built()) return train_metrics_.empty() ? CreateMetricVariables() : OkStatus();
  // The replicas' buffers first: nothing is registered with the strategy
  // or the servers if they cannot be allocated.
  const int replicas = strategy_->num_local_replicas();
  for (int r = static_cast<int>(replicas_.size()); r < replicas; ++r) {
    auto st = std::make_unique<ReplicaState>();
    DV_RETURN_IF_ERROR(strategy_->RunOnReplica(r, [&](Backend& backend) -> Status {
      DV_ASSIGN_OR_RETURN(DeviceBatch batch,
                          DeviceBatch::Create(&backend, max_batch_, options_.input_features));
      st->batch.emplace(std::move(batch));
      DV_RETURN_IF_ERROR(st->head.Build(&backend, max_batch_, output_features_));
      DV_ASSIGN_OR_RETURN(st->input,
                          backend.Allocate(int64_t{max_batch_} * options_.input_features));
      return OkStatus();
    }));
    replicas_.push_back(std::move(st));
  }
  ModelOptions mo;
  mo.input_features = options_.input_features;
  mo.max_batch = max_batch_;
  mo.seed = options_.seed;
  mo.name_prefix = options_.name_prefix;
  if (options_.partitioner.has_value()) mo.variables.partitioner = *options_.partitioner;
  if (compiled_.has_value()) mo.variables.optimizer = compiled_->optimizer;
  if (options_.initial_values != nullptr) mo.initial_values = *options_.initial_values;
  DV_ASSIGN_OR_RETURN(mirrored_, strategy_->CreateModel(layers_, mo));
  if (compiled_.has_value()) built_optimizer_ = compiled_->optimizer;
  // The values are on the servers now.
  options_.initial_values.reset();
  return CreateMetricVariables();
}

Status Model::CreateMetricVariables() {
  std::vector<Metric> specs = {Metric::Mean("loss")};
  if (compiled_.has_value()) {
    specs.insert(specs.end(), compiled_->metrics.begin(), compiled_->metrics.end());
  }
  for (const char* set : {"train", "eval"}) {
    std::vector<MetricState> states;
    for (const Metric& m : specs) {
      const std::string key = std::string(set) + "/" + m.name;
      auto it = metric_variables_.find(key);
      if (it == metric_variables_.end()) {
        const std::string base = options_.name_prefix + "metrics/" + key;
        DV_ASSIGN_OR_RETURN(SyncOnReadVariable * total,
                            strategy_->CreateSyncOnReadVariable(base + "/total", Shape{},
                                                                VariableAggregation::kSum));
        DV_ASSIGN_OR_RETURN(SyncOnReadVariable * count,
                            strategy_->CreateSyncOnReadVariable(base + "/count", Shape{},
                                                                VariableAggregation::kSum));
        it = metric_variables_.emplace(key, std::make_pair(total, count)).first;
      }
      states.push_back(MetricState{m, it->second.first, it->second.second});
    }
    (std::string(set) == "train" ? train_metrics_ : eval_metrics_) = std::move(states);
  }
  return OkStatus();
}

Status Model::ResetMetrics(std::vector<MetricState>& metrics) {
  for (MetricState& m : metrics) {
    DV_RETURN_IF_ERROR(m.total->Reset());
    DV_RETURN_IF_ERROR(m.count->Reset());
  }
  return OkStatus();
}

StatusOr<std::map<std::string, double>> Model::ReadMetrics(
    const std::vector<MetricState>& metrics) const {
  std::map<std::string, double> out;
  for (const MetricState& m : metrics) {
    DV_ASSIGN_OR_RETURN(const double total, m.total->ReadScalar());
    DV_ASSIGN_OR_RETURN(const double count, m.count->ReadScalar());
    out[m.spec.name] = count > 0 ? total / count : 0.0;
  }
  return out;
}

Status Model::CheckData(const Examples& data, const char* op) const {
  if (data.feature_size() != options_.input_features)
    return InvalidArgumentError(std::string(op) + ": the examples have " +
                                Num(data.feature_size()) + " features, the model takes " +
                                Num(options_.input_features));
  if (data.num_classes > output_features_)
    return InvalidArgumentError(std::string(op) + ": the examples have " + Num(data.num_classes) +
                                " classes, the model outputs " + Num(output_features_));
  return OkStatus();
}

int Model::EvalChunk(int batch_size) const {
  return batch_size > 0 ? batch_size : std::min(kDefaultChunk, max_batch_);
}

std::string Model::NextCollectiveKey(const char* what) {
  return options_.name_prefix + "model/" + what + "/" + Num(collectives_++);
}

// ---- Fit -----------------------------------------------------------------------------

StatusOr<History> Model::Fit(std::shared_ptr<const Examples> train, const FitOptions& options) {
  if (train == nullptr) return InvalidArgumentError("Fit: no training data");
  DV_RETURN_IF_ERROR(CheckData(*train, "Fit"));
  DV_ASSIGN_OR_RETURN(DistributedDataset dataset,
                      strategy_->DistributeDataset(std::move(train), options.input));
  return Fit(dataset, options);
}

StatusOr<History> Model::Fit(const DistributedDataset& dataset, const FitOptions& options) {
  if (!compiled_.has_value())
    return FailedPreconditionError(
        "Fit before Compile: call Compile(optimizer, loss, metrics) first (the optimizer runs on "
        "the servers)");
  if (options.epochs < 1)
    return InvalidArgumentError("Fit: epochs must be >= 1 (got " + Num(options.epochs) + ")");
  if (options.initial_epoch < 0)
    return InvalidArgumentError("Fit: initial_epoch must be >= 0 (got " +
                                Num(options.initial_epoch) + ")");
  if (options.steps_per_epoch < 0 || options.steps_per_epoch > dataset.steps_per_epoch())
    return InvalidArgumentError("Fit: steps_per_epoch " + Num(options.steps_per_epoch) +
                                " outside [0, " + Num(dataset.steps_per_epoch()) +
                                "] (the steps of one epoch of this data)");
  if (!SameContext(dataset.context(), strategy_->input_context()))
    return InvalidArgumentError(
        "Fit: the dataset was distributed for another input context (workers, worker index or "
        "replicas); use strategy->DistributeDataset");
  const Examples& examples = dataset.examples();
  DV_RETURN_IF_ERROR(CheckData(examples, "Fit"));
  if (dataset.per_replica_batch() > max_batch_)
    return InvalidArgumentError("Fit: the per-replica batch " + Num(dataset.per_replica_batch()) +
                                " exceeds the model's max_batch " + Num(max_batch_));
  if (options.validation_data != nullptr)
    DV_RETURN_IF_ERROR(CheckData(*options.validation_data, "Fit validation"));
  DV_RETURN_IF_ERROR(Build());

  std::ostream& out = options.out != nullptr ? *options.out : std::cout;
  const bool interactive =
      options.interactive.value_or(options.out == nullptr && ::isatty(STDOUT_FILENO) != 0);
  bool need_correct = false;
  for (const MetricState& m : train_metrics_)
    need_correct = need_correct || m.spec.kind == Metric::Kind::kAccuracy;

  stop_training_ = false;
  History history;
  for (Callback* cb : options.callbacks) DV_RETURN_IF_ERROR(cb->OnTrainBegin(*this));
  int64_t total_steps = 0;
  struct StepOut {
    double loss = 0;
    int64_t rows = 0;
  };
  // Where in the data each clock is: step s of epoch e is global step
  // e * steps_per_epoch + s, and global step g runs at clock g + offset.
  // resume_at_job_clock: the job's clock is the global step (a worker that
  // joins a running job, or restarts, continues its data order).
  const int64_t epoch_steps =
      options.steps_per_epoch > 0 ? options.steps_per_epoch : dataset.steps_per_epoch();
  int first_epoch = options.initial_epoch;
  int64_t first_step = 0;  // of the first epoch run
  int64_t clock_offset = strategy_->clock() - int64_t{options.initial_epoch} * epoch_steps;
  if (options.resume_at_job_clock && epoch_steps > 0) {
    clock_offset = 0;
    first_epoch = static_cast<int>(strategy_->clock() / epoch_steps);
    first_step = strategy_->clock() % epoch_steps;
    if (first_epoch >= options.epochs) {
      out << "the job is at clock " << strategy_->clock() << ", past its " << options.epochs
          << " epoch(s) of " << epoch_steps << " steps: nothing left to train" << std::endl;
    } else if (strategy_->clock() > 0) {
      out << "joining the job at clock " << strategy_->clock() << ": epoch " << first_epoch
          << ", step " << first_step << std::endl;
    }
  }
  for (int epoch = first_epoch; epoch < options.epochs && !stop_training_; ++epoch) {
    for (Callback* cb : options.callbacks) DV_RETURN_IF_ERROR(cb->OnEpochBegin(*this, epoch));
    DV_RETURN_IF_ERROR(ResetMetrics(train_metrics_));
    const EpochPlan plan = dataset.PlanEpoch(epoch);
    const int64_t steps = options.steps_per_epoch > 0 ? options.steps_per_epoch : plan.num_steps();
    // Set when the parameter servers rolled the job back to another epoch.
    std::optional<int64_t> rolled_back_to;
    std::optional<internal::ProgressBar> bar;
    if (options.verbose != Verbosity::kSilent)
      bar.emplace(out, interactive, options.verbose == Verbosity::kProgressBar, epoch,
                  options.epochs, steps);
    const auto epoch_start = Clock::now();
    int64_t epoch_examples = 0, done = 0;
    for (int64_t step = first_step; step < steps; ++step) {
      auto step_fn = [&](ReplicaContext& ctx) -> StatusOr<StepOut> {
        const int r = ctx.local_replica_id();
        ReplicaState& st = *replicas_[static_cast<size_t>(r)];
        Sequential& net = mirrored_->replica(ctx);
        const std::span<const int64_t> rows = plan.ReplicaBatch(step, r);
        const int b = static_cast<int>(rows.size());
        double correct = 0;
        if (b == 0) {
          // A short last batch left this replica nothing: it contributes
          // zero gradients to the collective push.
          for (const Parameter& p : net.Parameters())
            DV_RETURN_IF_ERROR(ctx.backend().Zero(*p.grad));
        } else {
          DV_RETURN_IF_ERROR(st.batch->Load(examples, rows));
          DV_RETURN_IF_ERROR(net.Forward(st.batch->features(), b));
          DV_RETURN_IF_ERROR(st.head.Forward(net.output(), st.batch->labels(), b));
          DV_RETURN_IF_ERROR(st.head.Backward(st.batch->labels(), b));
          DV_RETURN_IF_ERROR(net.Backward(st.batch->features(), st.head.grad(), b));
          if (need_correct) {
            DV_RETURN_IF_ERROR(st.head.CountCorrect(net.output(), st.batch->labels(), b));
            DV_ASSIGN_OR_RETURN(const int64_t right, st.head.CorrectValue());
            correct = static_cast<double>(right);
          }
        }
        // This model's variables only (the strategy may hold other models).
        DV_RETURN_IF_ERROR(ctx.ApplyGradients(mirrored_->variables()));
        StepOut o;
        o.rows = b;
        if (b > 0) {
          DV_ASSIGN_OR_RETURN(const float loss, st.head.LossValue());
          o.loss = loss;
        }
        for (MetricState& m : train_metrics_) {
          const double total = m.spec.kind == Metric::Kind::kAccuracy ? correct : o.loss * b;
          DV_RETURN_IF_ERROR(m.total->AssignAdd(ctx, total));
          DV_RETURN_IF_ERROR(m.count->AssignAdd(ctx, static_cast<double>(b)));
        }
        return o;
      };
      StatusOr<PerReplica<StepOut>> ran = strategy_->Run(step_fn);
      if (!ran.ok() && ran.status().code() == StatusCode::kAborted) {
        // A parameter server restarted from a checkpoint behind this
        // worker: redo the steps after it (pulling the restored values).
        const int64_t clock = strategy_->AcceptRollback();
        const int64_t global = clock - clock_offset;
        if (global < 0 || epoch_steps <= 0)
          return ran.status().WithContext("rolled back to clock " + Num(clock) +
                                          ", before this Fit began");
        out << "parameter servers rolled back to clock " << clock << " (" << ran.status()
            << "): redoing from epoch " << global / epoch_steps << ", step " << global % epoch_steps
            << std::endl;
        if (global / epoch_steps == epoch) {
          step = global % epoch_steps - 1;  // the loop's ++step lands on it
          continue;
        }
        rolled_back_to = global;
        break;
      }
      DV_ASSIGN_OR_RETURN(PerReplica<StepOut> outs, std::move(ran));
      double loss_sum = 0;
      int64_t rows = 0;
      for (const StepOut& o : outs) {
        loss_sum += o.loss * static_cast<double>(o.rows);
        rows += o.rows;
      }
      const double loss = rows > 0 ? loss_sum / static_cast<double>(rows) : 0.0;
      if (!std::isfinite(loss))
        return InternalError("training diverged: loss " + std::to_string(loss) + " at epoch " +
                             Num(epoch) + " step " + Num(step) + " (lower the learning rate)");
      ++total_steps;
      ++done;
      epoch_examples += rows;
      BatchLogs logs;
      logs.epoch = epoch;
      logs.step = step;
      logs.steps = steps;
      logs.total_steps = total_steps;
      logs.loss = loss;
      logs.examples = rows;
      logs.epoch_examples = epoch_examples;
      DV_ASSIGN_OR_RETURN(logs.metrics, ReadMetrics(train_metrics_));
      logs.stats = strategy_->last_step();
      for (Callback* cb : options.callbacks) DV_RETURN_IF_ERROR(cb->OnBatchEnd(*this, logs));
      if (bar.has_value()) {
        internal::ProgressValues values;
        for (const MetricState& m : train_metrics_)
          values.emplace_back(m.spec.name, logs.metrics[m.spec.name]);
        const double s = Seconds(Clock::now() - epoch_start);
        bar->Update(done, values, s > 0 ? static_cast<double>(epoch_examples) / s : 0.0);
      }
      if (stop_training_) break;
    }
    first_step = 0;
    if (rolled_back_to.has_value()) {
      // Begin the epoch it landed in again (this one did not end).
      epoch = static_cast<int>(*rolled_back_to / epoch_steps) - 1;
      first_step = *rolled_back_to % epoch_steps;
      continue;
    }
    EpochLogs logs;
    logs.epoch = epoch;
    logs.steps = done;
    logs.examples = epoch_examples;
    DV_ASSIGN_OR_RETURN(logs.values, ReadMetrics(train_metrics_));
    const double train_s = Seconds(Clock::now() - epoch_start);
    internal::ProgressValues values;
    for (const MetricState& m : train_metrics_)
      values.emplace_back(m.spec.name, logs.values[m.spec.name]);
    if (options.validation_data != nullptr) {
      DV_ASSIGN_OR_RETURN(EvaluateResult val,
                          Evaluate(*options.validation_data, options.validation));
      for (const MetricState& m : eval_metrics_) {
        const std::string key = "val_" + m.spec.name;
        logs.values[key] = val.metrics[m.spec.name];
        values.emplace_back(key, logs.values[key]);
      }
    }
    logs.seconds = Seconds(Clock::now() - epoch_start);
    if (bar.has_value())
      bar->Finish(done, values, train_s > 0 ? static_cast<double>(epoch_examples) / train_s : 0.0);
    for (Callback* cb : options.callbacks) DV_RETURN_IF_ERROR(cb->OnEpochEnd(*this, logs));
    history.Append(logs);
  }
  for (Callback* cb : options.callbacks) DV_RETURN_IF_ERROR(cb->OnTrainEnd(*this, history));
  return history;
}

// ---- Evaluate and Predict -----------------------------------------------------------

StatusOr<EvaluateResult> Model::Evaluate(const Examples& data, const EvaluateOptions& options) {
  DV_RETURN_IF_ERROR(CheckData(data, "Evaluate"));
  if (options.batch_size < 0 || options.batch_size > max_batch_)
    return InvalidArgumentError("Evaluate: batch_size " + Num(options.batch_size) +
                                " outside [0, max_batch " + Num(max_batch_) + "]");
  DV_RETURN_IF_ERROR(Build());
  const int chunk = EvalChunk(options.batch_size);
  const int64_t n = options.limit >= 0 ? std::min(options.limit, data.size()) : data.size();
  const int64_t chunks = (n + chunk - 1) / chunk;
  const bool across = options.across_workers && strategy_->num_workers() > 1;
  const int64_t workers = across ? strategy_->num_workers() : 1;
  const int64_t worker = across ? strategy_->worker_index() : 0;
  const int64_t replicas = strategy_->num_local_replicas();
  DV_RETURN_IF_ERROR(ResetMetrics(eval_metrics_));
  auto eval_fn = [&](ReplicaContext& ctx) -> StatusOr<int64_t> {
    const int r = ctx.local_replica_id();
    ReplicaState& st = *replicas_[static_cast<size_t>(r)];
    Sequential& net = mirrored_->replica(ctx);
    std::vector<int64_t> indices;
    int64_t correct = 0;
    // This worker's chunks are worker, worker + W, ...; its j-th goes to
    // replica j mod L.
    for (int64_t j = r;; j += replicas) {
      const int64_t c = worker + j * workers;
      if (c >= chunks) break;
      const int64_t start = c * chunk;
      const int b = static_cast<int>(std::min<int64_t>(chunk, n - start));
      indices.resize(static_cast<size_t>(b));
      std::iota(indices.begin(), indices.end(), start);
      DV_RETURN_IF_ERROR(st.batch->Load(data, indices));
      DV_RETURN_IF_ERROR(net.Forward(st.batch->features(), b));
      DV_RETURN_IF_ERROR(st.head.Forward(net.output(), st.batch->labels(), b));
      DV_RETURN_IF_ERROR(st.head.CountCorrect(net.output(), st.batch->labels(), b));
      DV_ASSIGN_OR_RETURN(const float loss, st.head.LossValue());
      DV_ASSIGN_OR_RETURN(const int64_t right, st.head.CorrectValue());
      correct += right;
      for (MetricState& m : eval_metrics_) {
        const double total = m.spec.kind == Metric::Kind::kAccuracy ? static_cast<double>(right)
                                                                    : static_cast<double>(loss) * b;
        DV_RETURN_IF_ERROR(m.total->AssignAdd(ctx, total));
        DV_RETURN_IF_ERROR(m.count->AssignAdd(ctx, static_cast<double>(b)));
      }
    }
    return correct;
  };
  DV_ASSIGN_OR_RETURN(PerReplica<int64_t> corrects, strategy_->Run(eval_fn));
  DV_ASSIGN_OR_RETURN(const int64_t correct, strategy_->Reduce(ReduceOp::kSum, corrects));
  // [correct, then total and count of every metric (the loss tracker first)]
  std::vector<double> totals = {static_cast<double>(correct)};
  for (const MetricState& m : eval_metrics_) {
    DV_ASSIGN_OR_RETURN(const double total, m.total->ReadScalar());
    DV_ASSIGN_OR_RETURN(const double count, m.count->ReadScalar());
    totals.push_back(total);
    totals.push_back(count);
  }
  if (across) {
    DV_ASSIGN_OR_RETURN(totals, SumAcrossWorkers(totals));
  }
  EvaluateResult result;
  result.correct = std::llround(totals[0]);
  result.examples = std::llround(totals[2]);
  for (size_t i = 0; i < eval_metrics_.size(); ++i) {
    const double total = totals[1 + 2 * i], count = totals[2 + 2 * i];
    result.metrics[eval_metrics_[i].spec.name] = count > 0 ? total / count : 0.0;
  }
  result.loss = result.metrics["loss"];
  return result;
}

StatusOr<Tensor> Model::Predict(const Tensor& inputs) {
  if (inputs.dtype() != DType::kF32 || inputs.shape().rank() != 2 ||
      inputs.shape().dim(1) != options_.input_features)
    return InvalidArgumentError("Predict: the inputs are " +
                                std::string(DTypeName(inputs.dtype())) + inputs.shape().ToString() +
                                ", the model takes f32[n, " + Num(options_.input_features) + "]");
  DV_RETURN_IF_ERROR(Build());
  const int64_t n = inputs.shape().dim(0);
  const int64_t in_f = options_.input_features, out_f = output_features_;
  Tensor out(DType::kF32, Shape{n, out_f});
  const int chunk = EvalChunk(0);
  const int64_t chunks = (n + chunk - 1) / chunk;
  const int64_t replicas = strategy_->num_local_replicas();
  auto predict_fn = [&](ReplicaContext& ctx) -> Status {
    const int r = ctx.local_replica_id();
    ReplicaState& st = *replicas_[static_cast<size_t>(r)];
    Sequential& net = mirrored_->replica(ctx);
    Backend& backend = ctx.backend();
    for (int64_t c = r; c < chunks; c += replicas) {
      const int64_t start = c * chunk;
      const int b = static_cast<int>(std::min<int64_t>(chunk, n - start));
      DV_RETURN_IF_ERROR(
          backend.CopyToDevice(inputs.data_as<float>() + start * in_f, st.input, b * in_f));
      DV_RETURN_IF_ERROR(net.Forward(st.input, b));
      DV_RETURN_IF_ERROR(
          backend.CopyToHost(net.output(), out.data_as<float>() + start * out_f, b * out_f));
    }
    return OkStatus();
  };
  DV_RETURN_IF_ERROR(strategy_->Run(predict_fn));
  return out;
}

// ---- Servers and workers -------------------------------------------------------------

Status Model::SetLearningRate(double learning_rate) {
  if (!compiled_.has_value())
    return FailedPreconditionError("SetLearningRate before Compile: the model has no optimizer");
  if (!std::isfinite(learning_rate) || learning_rate < 0)
    return InvalidArgumentError("SetLearningRate: " + std::to_string(learning_rate) +
                                " must be finite and >= 0");
  if (built()) {
    DV_RETURN_IF_ERROR(strategy_->store().SetLearningRate(learning_rate));
  } else {
    // The variables will be created with it.
    compiled_->optimizer.learning_rate = learning_rate;
  }
  learning_rate_ = learning_rate;
  return OkStatus();
}

StatusOr<std::vector<double>> Model::SumAcrossWorkers(std::span<const double> values) {
  if (strategy_->num_workers() == 1) return std::vector<double>(values.begin(), values.end());
  return strategy_->store().SumAcrossWorkers(NextCollectiveKey("sum"), values);
}

Status Model::SyncWorkers() {
  if (strategy_->num_workers() == 1) return OkStatus();
  return strategy_->store().Barrier("__distval/barrier/" + NextCollectiveKey("sync"));
}

StatusOr<std::vector<Tensor>> Model::GetWeights() {
  DV_RETURN_IF_ERROR(Build());
  std::vector<Tensor> out;
  for (MirroredVariable* v : mirrored_->variables()) {
    DV_ASSIGN_OR_RETURN(Tensor t, v->Read());
    out.push_back(std::move(t));
  }
  return out;
}

std::string Model::Summary() const {
  std::ostringstream s;
  s << "Model (" << options_.input_features << " input features)\n";
  s << std::left << std::setw(20) << "layer" << std::setw(10) << "type" << std::setw(10) << "output"
    << "parameters\n";
  int features = options_.input_features;
  int64_t total = 0;
  for (size_t i = 0; i < layers_.num_layers(); ++i) {
    const Layer& l = layers_.layer(i);
    StatusOr<int> next = l.OutputFeatures(features);
    features = next.ok() ? *next : 0;
    int64_t params = 0;
    for (const ParameterSpec& p : l.ParameterSpecs()) params += p.shape.num_elements();
    total += params;
    s << std::setw(20) << l.name() << std::setw(10) << l.type() << std::setw(10) << features
      << params << "\n";
  }
  s << "total parameters: " << total << "\n";
  return s.str();
}

}  // namespace distval
