// Model: the Keras-style API over a ParameterServerStrategy. A model is a
// few lines, not a training loop:
//
//   auto strategy = ParameterServerStrategy::Create(options);   // tf.distribute strategy
//   ModelBuildOptions build;                                    // "with strategy.scope():"
//   build.input_features = 784;
//   auto model = Model::Create(**strategy, net, build);         //   model = create_model()
//   (*model)->Compile(optimizers::Adam(1e-3),                   //   model.compile(...)
//                     Loss::SparseCategoricalCrossentropy(), {Metric::Accuracy()});
//   FitOptions fit;
//   fit.epochs = 5;
//   fit.validation_data = test;
//   fit.callbacks = {&early_stopping, &lr_schedule};
//   auto history = (*model)->Fit(train, fit);                   // model.fit(...)
//   auto result = (*model)->Evaluate(*test);                    // model.evaluate(test)
//   auto logits = (*model)->Predict(x);                         // model.predict(x)
//   (*model)->Save(path);                                       // model.save(path)
//   auto loaded = LoadModel(path, load_options);                // tf.keras.models.load_model
//
// (model_saving.h declares LoadModel.)
//
// Variables. The model's parameters ("dense_0/kernel", ...) are variables on
// the parameter servers, created with the model's seeded initial values,
// split over the servers by the strategy's variable_partitioner, and
// mirrored on every local replica (distval/mirrored_model.h). They are
// created by Build(), which Compile / Fit / Evaluate / Predict / Save call
// when needed: the optimizer the servers run is part of a variable's spec,
// so Compile (which names it) comes first for training; an uncompiled model
// (inference) gets the strategy's default optimizer.
//
// Training (Fit): each step is one strategy Run: pull once, every local
// replica computes the gradients of its share of the global batch
// (auto-sharded input: this worker's shard of the data, split across its
// replicas), the gradients are reduced locally and pushed once per worker,
// the servers apply the optimizer, the clock advances. Metrics are
// SyncOnReadVariables: per-replica accumulators summed when read.
//
// Several workers. Every worker of the job runs the same program: it creates
// the same model (same seed), compiles it the same way and calls Fit with the
// same options on the same data (each trains on its shard). Evaluate with
// EvaluateOptions::across_workers (the default) is a collective: every
// worker must call it with the same data; each evaluates a disjoint share
// (chunk c of the data goes to worker c mod workers) and the totals are
// summed through the servers (ParameterStore::SumAcrossWorkers), so every
// example is counted once and every worker gets the job-wide result.
//
// Ownership and thread-safety: a Model borrows its strategy (which must
// outlive it) unless it owns one (CreateLocal, LoadModel without a
// strategy). Its methods are called from one thread at a time, the
// strategy's cross-replica thread, never from a step function.
#ifndef DISTVAL_MODEL_H_
#define DISTVAL_MODEL_H_

#include <cstdint>
#include <map>
#include <memory>
#include <optional>
#include <ostream>
#include <span>
#include <string>
#include <vector>

#include "distval/callbacks.h"
#include "distval/dataset.h"
#include "distval/input_pipeline.h"
#include "distval/layers.h"
#include "distval/mirrored_model.h"
#include "distval/parameter_server_strategy.h"
#include "distval/partitioner.h"
#include "distval/protocol.h"
#include "distval/status.h"
#include "distval/sync_on_read_variable.h"
#include "distval/tensor.h"

namespace distval {

// Server-side optimizers (tf.keras.optimizers), as the spec the servers run.
namespace optimizers {
// Plain SGD, or momentum SGD when momentum > 0 (Nesterov when asked).
protocol::OptimizerSpec Sgd(double learning_rate = 0.01, double momentum = 0.0,
                            bool nesterov = false);
protocol::OptimizerSpec Adam(double learning_rate = 0.001, double beta1 = 0.9, double beta2 = 0.999,
                             double epsilon = 1e-7);
protocol::OptimizerSpec AdamW(double learning_rate = 0.001, double weight_decay = 0.004,
                              double beta1 = 0.9, double beta2 = 0.999, double epsilon = 1e-7);
protocol::OptimizerSpec Adagrad(double learning_rate = 0.001, double initial_accumulator = 0.1,
                                double epsilon = 1e-7);
}  // namespace optimizers

// The loss of a classifier.
struct Loss {
  enum class Kind { kSparseCategoricalCrossentropy };
  Kind kind = Kind::kSparseCategoricalCrossentropy;
  // The model outputs logits (softmax inside the loss). Only true is
  // implemented (Compile returns Unimplemented otherwise).
  bool from_logits = true;

  // tf.keras.losses.SparseCategoricalCrossentropy: integer labels, mean
  // over the batch.
  static Loss SparseCategoricalCrossentropy(bool from_logits = true) {
    return Loss{Kind::kSparseCategoricalCrossentropy, from_logits};
  }
  // "sparse_categorical_crossentropy".
  std::string name() const;
};

// A metric tracked during Fit and Evaluate. Each is a pair of
// SyncOnReadVariables (a total and a count, summed over the replicas on
// read).
struct Metric {
  enum class Kind {
    // Fraction of examples whose argmax equals the label
    // (SparseCategoricalAccuracy).
    kAccuracy,
    // Mean of the per-example loss (tf.keras.metrics.Mean fed the loss, as
    // the custom training loop's train_loss).
    kMean,
  };
  Kind kind = Kind::kAccuracy;
  // The log key ("accuracy"); "loss" and names starting with "val_" are
  // reserved.
  std::string name;

  static Metric Accuracy(std::string name = "accuracy") {
    return Metric{Kind::kAccuracy, std::move(name)};
  }
  static Metric Mean(std::string name = "mean_loss") {
    return Metric{Kind::kMean, std::move(name)};
  }
};

// How a Model is created.
struct ModelBuildOptions {
  // Features of one input row (784 for Fashion-MNIST). Required.
  int input_features = 0;
  // Rows a replica processes at once; 0: max(the strategy's per-replica
  // batch, 256). Training batches and evaluation chunks must fit.
  int max_batch = 0;
  // Seed of the initial values (every worker must use the same).
  uint64_t seed = 0;
  // Prefix of the variable names on the servers (two models in one job
  // need different prefixes). Saved files do not include it.
  std::string name_prefix;
  // How the variables are split over the servers; unset: the strategy's
  // variable_partitioner.
  std::optional<Partitioner> partitioner;
  // The parameters' initial values (f32, Sequential::ParameterSpecs() order
  // and shapes; e.g. a saved model's weights, pushed to the servers as the
  // variables' initial values); null: the seeded initial values. The model
  // drops its reference once Build created the variables.
  std::shared_ptr<const std::vector<Tensor>> initial_values;
};

// Evaluation settings.
struct EvaluateOptions {
  // Rows per forward pass (chunk); 0: min(256, max_batch). At most
  // max_batch.
  int batch_size = 0;
  // Evaluate only the first `limit` examples; negative: all.
  int64_t limit = -1;
  // true (collective when the job has several workers): this worker
  // evaluates chunks worker, worker + W, ... and the totals are summed over
  // the workers through the servers. false: this worker evaluates every
  // example alone (no other worker takes part).
  bool across_workers = true;
};

// What Evaluate returns: over every example evaluated (job-wide when across
// workers).
struct EvaluateResult {
  int64_t examples = 0;
  int64_t correct = 0;
  // Mean per-example loss.
  double loss = 0;
  // "loss" and the compiled metrics by name.
  std::map<std::string, double> metrics;

  double accuracy() const {
    return examples == 0 ? 0.0 : static_cast<double>(correct) / static_cast<double>(examples);
  }
};

// Progress display of Fit.
enum class Verbosity {
  kSilent,
  // A progress bar per epoch (step/total, loss, metrics, examples/s, ETA),
  // redrawn with \r on a terminal, a line at each quarter otherwise; then
  // the epoch's line with the validation values.
  kProgressBar,
  // Only the epoch's line.
  kOneLinePerEpoch,
};

struct FitOptions {
  int epochs = 1;
  // Epoch to start from (numbering of logs, data order and schedules).
  int initial_epoch = 0;
  // Steps per epoch: the first steps_per_epoch batches of each epoch's
  // order; 0: the whole epoch. More than the epoch has is InvalidArgument.
  int64_t steps_per_epoch = 0;
  // Evaluated after every epoch ("val_loss", "val_<metric>"); null: none.
  // With validation.across_workers (the default) this is a collective in a
  // job with several workers: every worker passes the same validation data
  // and gets the job-wide values.
  std::shared_ptr<const Examples> validation_data;
  EvaluateOptions validation;
  // Called in order; borrowed for the call.
  std::vector<Callback*> callbacks;
  // How the training data is shuffled and sharded when Fit is given
  // Examples (global_batch_size is the strategy's when it has one).
  InputOptions input;
  Verbosity verbose = Verbosity::kProgressBar;
  // Start where the job is: at the strategy's clock (the parameter servers'
  // clock when this worker joined), read as a global step: epoch clock /
  // steps per epoch, step clock % steps per epoch (initial_epoch ignored).
  // A worker that joins a running job, or is restarted, then continues the
  // job's data order. Off: start at initial_epoch, step 0, whatever the
  // clock. Either way, when a parameter server restarts from a checkpoint
  // behind this worker (Aborted), Fit moves back to the checkpoint's clock
  // and redoes the steps from there.
  bool resume_at_job_clock = false;
  // Where the progress goes; null: std::cout.
  std::ostream* out = nullptr;
  // \r redraws; unset: when `out` is std::cout and stdout is a terminal.
  std::optional<bool> interactive;
};

// The model's compile settings (see Model::Compile).
struct CompileOptions {
  protocol::OptimizerSpec optimizer;
  Loss loss;
  std::vector<Metric> metrics;
};

class Model {
 public:
  // The model of `layers` under `strategy` (tf: created inside
  // strategy.scope()). Checks the architecture (the features chain from
  // options.input_features; Sequential::OutputFeatures' errors) and the
  // options (InvalidArgument: input_features < 1, max_batch < 0, a
  // max_batch below the strategy's per-replica batch). Nothing is created on
  // the servers yet (see Build). `strategy` is borrowed.
  static StatusOr<std::unique_ptr<Model>> Create(ParameterServerStrategy& strategy,
                                                 const Sequential& layers,
                                                 const ModelBuildOptions& options);
  // The same without parameter servers: the model owns an in-process
  // strategy (NewLocalParameterStore, the servers' optimizer code) on
  // `devices` (one replica each). For local training and inference.
  // Errors: Create's, the strategy's (bad devices).
  static StatusOr<std::unique_ptr<Model>> CreateLocal(const Sequential& layers,
                                                      const ModelBuildOptions& options,
                                                      const std::vector<std::string>& devices = {
                                                          "cpu:0"});

  ~Model();
  Model(const Model&) = delete;
  Model& operator=(const Model&) = delete;

  // tf's model.compile: the optimizer (run by the servers), the loss and the
  // metrics. May be called again before Build; after Build only with the
  // optimizer the variables were created with. Errors: InvalidArgument for
  // a bad optimizer spec (the servers' validation message), a repeated or
  // reserved metric name; Unimplemented for a loss with from_logits =
  // false; FailedPrecondition for another optimizer after Build.
  Status Compile(const protocol::OptimizerSpec& optimizer,
                 Loss loss = Loss::SparseCategoricalCrossentropy(),
                 std::vector<Metric> metrics = {});
  Status Compile(const CompileOptions& options) {
    return Compile(options.optimizer, options.loss, options.metrics);
  }
  bool compiled() const { return compiled_.has_value(); }
  // The compile settings, or nullopt.
  const std::optional<CompileOptions>& compile_options() const { return compiled_; }

  // Creates the variables on the servers (with the compiled optimizer, or
  // the strategy's default when not compiled), one copy of the model per
  // replica, the metric variables and the replicas' batch buffers. Idempotent.
  // Errors: ParameterServerStrategy::CreateModel's (AlreadyExists when the
  // servers hold these names with another spec: use another name_prefix).
  Status Build();
  bool built() const { return mirrored_ != nullptr; }

  // tf's model.fit: trains on this worker's shard of `train` (auto-sharded
  // by the strategy's InputContext, options.input), epoch after epoch, with
  // the callbacks, the progress display and validation after each epoch.
  // Returns the per-epoch logs. Errors: FailedPrecondition when not
  // compiled; InvalidArgument for options (epochs < 1, initial_epoch < 0,
  // steps_per_epoch beyond the epoch, a per-replica batch above max_batch)
  // or data that does not fit the model (feature size, more classes than
  // outputs, DistributedDataset::Create's); Internal when the loss becomes
  // NaN or infinite (naming the epoch and step: lower the learning rate);
  // the strategy's, the callbacks' and Evaluate's errors.
  StatusOr<History> Fit(std::shared_ptr<const Examples> train, const FitOptions& options = {});
  // Same on an already distributed dataset (strategy->DistributeDataset).
  StatusOr<History> Fit(const DistributedDataset& train, const FitOptions& options = {});

  // tf's model.evaluate: the mean loss and the metrics over `data` (see
  // EvaluateOptions for the multi-worker scheme). The local replicas share
  // the work (chunk j of this worker goes to replica j mod replicas); the
  // results are reduced across them. Errors: InvalidArgument for a bad batch
  // size or data that does not fit the model; Build's, the strategy's and
  // SumAcrossWorkers' errors.
  StatusOr<EvaluateResult> Evaluate(const Examples& data, const EvaluateOptions& options = {});

  // tf's model.predict: the model's outputs (logits) for the rows of
  // `inputs` (f32 [n, input_features]; [n, output_features] out), computed
  // on the local replicas in chunks of min(256, max_batch) rows (chunk j on
  // replica j mod replicas), so the result does not depend on the number of
  // replicas. Errors: InvalidArgument for a dtype or shape that does not
  // fit; Build's and the strategy's errors.
  StatusOr<Tensor> Predict(const Tensor& inputs);

  // Saves the model to the directory `path` (created if needed): the
  // architecture and compile settings as JSON (model.json) and every
  // parameter's current value, read from the servers, as safetensors
  // (variables.safetensors, which also carries model.json in its metadata),
  // each file written atomically. The optimizer's state (slots, step) is
  // not saved: it lives on the servers and is not readable over the wire.
  // Any worker may save; in a job, save from one (worker 0). Errors:
  // Unimplemented for a layer without GetConfig (naming it); Build's and the
  // pull's errors; file errors naming the path.
  Status Save(const std::string& path);

  // Sets the learning rate of the optimizer on the servers (every variable
  // the servers hold: ParameterStore::SetLearningRate); learning_rate()
  // reports it. Not a collective. Errors: InvalidArgument for a negative or
  // non-finite rate, FailedPrecondition before Compile, the servers' errors.
  Status SetLearningRate(double learning_rate);
  // The rate last set (the compiled optimizer's at first; 0 when not
  // compiled).
  double learning_rate() const { return learning_rate_; }

  // Asks Fit to stop after the current step (Keras's model.stop_training =
  // True). In a job with several workers, stop every worker at the same
  // step (e.g. from OnEpochEnd on a job-wide value), or the others wait for
  // the missing pushes.
  void StopTraining() { stop_training_ = true; }
  bool stop_training() const { return stop_training_; }

  // Sums `values` over every worker of the job (a collective; see
  // ParameterStore::SumAcrossWorkers); one worker: the values.
  StatusOr<std::vector<double>> SumAcrossWorkers(std::span<const double> values);
  // Waits until every worker of the job got here (a collective).
  Status SyncWorkers();

  // The parameter values, read from the servers (in Sequential order).
  // Errors: Build's and the pull's.
  StatusOr<std::vector<Tensor>> GetWeights();

  // A table of the layers, their output features and parameter counts.
  std::string Summary() const;

  const Sequential& layers() const { return layers_; }
  const ModelBuildOptions& build_options() const { return options_; }
  int input_features() const { return options_.input_features; }
  int output_features() const { return output_features_; }
  int max_batch() const { return max_batch_; }
  ParameterServerStrategy& strategy() { return *strategy_; }
  // The replicated model (null before Build).
  MirroredModel* mirrored() { return mirrored_; }

 private:
  struct ReplicaState;
  struct MetricState;

  Model() = default;
  static StatusOr<std::unique_ptr<Model>> CreateImpl(ParameterServerStrategy* strategy,
                                                     std::unique_ptr<ParameterServerStrategy> owned,
                                                     const Sequential& layers,
                                                     const ModelBuildOptions& options);
  Status CreateMetricVariables();
  Status CheckData(const Examples& data, const char* op) const;
  Status ResetMetrics(std::vector<MetricState>& metrics);
  StatusOr<std::map<std::string, double>> ReadMetrics(
      const std::vector<MetricState>& metrics) const;
  std::string NextCollectiveKey(const char* what);
  int EvalChunk(int batch_size) const;

  // Declaration order: the owned strategy (if any) outlives everything that
  // borrows it.
  std::unique_ptr<ParameterServerStrategy> owned_strategy_;
  ParameterServerStrategy* strategy_ = nullptr;  // Borrowed (or owned_strategy_).
  Sequential layers_;
  ModelBuildOptions options_;
  int output_features_ = 0;
  int max_batch_ = 0;
  std::optional<CompileOptions> compiled_;
  // The optimizer the variables were created with (set by Build).
  std::optional<protocol::OptimizerSpec> built_optimizer_;
  MirroredModel* mirrored_ = nullptr;  // Owned by the strategy.
  std::vector<std::unique_ptr<ReplicaState>> replicas_;
  // Per metric (index 0: the loss tracker), for training and evaluation.
  std::vector<MetricState> train_metrics_, eval_metrics_;
  // Every metric variable pair created so far, by "<set>/<name>".
  std::map<std::string, std::pair<SyncOnReadVariable*, SyncOnReadVariable*>> metric_variables_;
  double learning_rate_ = 0;
  bool stop_training_ = false;
  int64_t collectives_ = 0;
};

}  // namespace distval

#endif  // DISTVAL_MODEL_H_
