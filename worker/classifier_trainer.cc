#include "classifier_trainer.h"

#include <algorithm>
#include <chrono>
#include <fstream>
#include <iomanip>
#include <memory>
#include <nlohmann/json.hpp>
#include <optional>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "distval/callbacks.h"
#include "distval/dataset.h"
#include "distval/input_pipeline.h"
#include "distval/model.h"

namespace distval {

namespace {

using Clock = std::chrono::steady_clock;
using nlohmann::json;

double Seconds(Clock::duration d) { return std::chrono::duration<double>(d).count(); }

constexpr int kFeatures = 784;
constexpr int kClasses = 10;
// Rows per evaluation chunk (a replica's model copy is built for at least
// this many rows).
constexpr int kEvalBatch = 256;

json NullableNumber(std::optional<double> v) { return v ? json(*v) : json(nullptr); }

// The binary's outputs, written from Fit's callbacks: the --metrics-out
// lines, the straggler's extra time, the per-epoch line with the test
// accuracy.
class TrainerCallback final : public Callback {
 public:
  TrainerCallback(const TrainerOptions& options, std::ostream& out, std::ofstream* metrics,
                  const Examples* test, int worker)
      : options_(options), out_(out), metrics_(metrics), test_(test), worker_(worker) {}

  Status OnTrainBegin(Model&) override {
    start_ = Clock::now();
    return OkStatus();
  }

  Status OnBatchEnd(Model&, const BatchLogs& logs) override {
    StepStats st = logs.stats;
    if (options_.slowdown > 1.0) {
      const double extra = st.compute_s * (options_.slowdown - 1.0);
      std::this_thread::sleep_for(std::chrono::duration<double>(extra));
      st.compute_s += extra;
    }
    examples_ += logs.examples;
    ++steps_;
    if (options_.telemetry != nullptr) options_.telemetry->RecordBatch(logs.examples, logs.loss);
    if (metrics_ != nullptr) {
      *metrics_ << json{{"type", "step"},
                        {"worker", worker_},
                        {"step", steps_ - 1},
                        {"epoch", logs.epoch},
                        {"wall_s", Seconds(Clock::now() - start_)},
                        {"loss", logs.loss},
                        {"staleness", st.staleness},
                        {"blocked_s", st.blocked_s()},
                        {"compute_s", st.compute_s},
                        {"examples", examples_}}
                       .dump()
                << "\n";
    }
    return OkStatus();
  }

  Status OnEpochEnd(Model& model, const EpochLogs& logs) override {
    final_train_loss_ = logs.Get("loss").value_or(0.0);
    std::optional<double> accuracy;
    std::ostringstream line;
    line << std::fixed << "epoch " << logs.epoch + 1 << "/" << options_.epochs << ": train loss "
         << std::setprecision(4) << final_train_loss_;
    if (logs.epoch + 1 == options_.epochs) {
      // The job's final model: wait until every worker finished its last
      // step (under SSP/async a fast worker gets here first), so that the
      // last evaluation sees every update of the job.
      DV_RETURN_IF_ERROR(model.SyncWorkers());
    }
    if (test_ != nullptr) {
      // This worker alone evaluates the whole test set (the other workers
      // train on).
      EvaluateOptions eo;
      eo.across_workers = false;
      DV_ASSIGN_OR_RETURN(EvaluateResult eval, model.Evaluate(*test_, eo));
      accuracy = eval.accuracy();
      test_accuracy_ = accuracy;
      line << ", test accuracy " << *accuracy << ", test loss " << eval.loss;
    }
    accuracy_by_epoch_.push_back(NullableNumber(accuracy));
    const double wall = Seconds(Clock::now() - start_);
    line << std::setprecision(1) << " (" << wall << " s, " << std::setprecision(0)
         << static_cast<double>(examples_) / std::max(wall, 1e-9) << " examples/s)";
    out_ << line.str() << std::endl;
    if (metrics_ != nullptr) {
      *metrics_ << json{{"type", "epoch"},
                        {"worker", worker_},
                        {"epoch", logs.epoch},
                        {"wall_s", wall},
                        {"train_loss", final_train_loss_},
                        {"test_accuracy", NullableNumber(accuracy)},
                        {"examples", examples_}}
                       .dump()
                << std::endl;  // flushed: tools follow the epochs live
      if (!*metrics_)
        return DataLossError("writing --metrics-out " + options_.metrics_out + " failed");
    }
    return OkStatus();
  }

  double wall_s() const { return Seconds(Clock::now() - start_); }
  int64_t examples() const { return examples_; }
  int64_t steps() const { return steps_; }
  double final_train_loss() const { return final_train_loss_; }
  std::optional<double> test_accuracy() const { return test_accuracy_; }
  const std::vector<json>& accuracy_by_epoch() const { return accuracy_by_epoch_; }

 private:
  const TrainerOptions& options_;
  std::ostream& out_;
  std::ofstream* metrics_;  // Borrowed; null: no --metrics-out.
  const Examples* test_;    // Borrowed; null: this worker does not evaluate.
  int worker_;
  Clock::time_point start_ = Clock::now();
  int64_t examples_ = 0, steps_ = 0;
  double final_train_loss_ = 0;
  std::optional<double> test_accuracy_;
  std::vector<json> accuracy_by_epoch_;
};

}  // namespace

StatusOr<Sequential> BuiltinModel(const std::string& name) {
  Sequential net;
  if (name == "mlp") {
    net.Add(std::make_unique<Dense>(kFeatures, 256))
        .Add(std::make_unique<ReLU>())
        .Add(std::make_unique<Dense>(256, 128))
        .Add(std::make_unique<ReLU>())
        .Add(std::make_unique<Dense>(128, kClasses));
  } else if (name == "logreg") {
    net.Add(std::make_unique<Dense>(kFeatures, kClasses));
  } else {
    return InvalidArgumentError("unknown model '" + name + "' (expected mlp or logreg)");
  }
  return net;
}

Status TrainClassifier(ParameterServerStrategy& strategy, const TrainerOptions& options,
                       std::ostream& out) {
  // ---- Data.
  DV_ASSIGN_OR_RETURN(Examples train_examples,
                      LoadFashionMnist(options.data_dir, Split::kTrain, options.train_limit));
  auto train = std::make_shared<const Examples>(std::move(train_examples));
  std::shared_ptr<const Examples> test;
  if (options.evaluate) {
    DV_ASSIGN_OR_RETURN(Examples t, LoadFashionMnist(options.data_dir, Split::kTest));
    test = std::make_shared<const Examples>(std::move(t));
  }
  InputOptions input;
  input.shard_policy = AutoShardPolicy::kData;
  input.seed = options.seed;
  DV_ASSIGN_OR_RETURN(DistributedDataset dataset, strategy.DistributeDataset(train, input));

  // ---- Model: under the strategy, compiled with its optimizer (run by the
  // servers).
  DV_ASSIGN_OR_RETURN(Sequential net, BuiltinModel(options.model));
  ModelBuildOptions mo;
  mo.input_features = kFeatures;
  mo.max_batch = std::max(strategy.per_replica_batch_size(), kEvalBatch);
  mo.seed = options.seed;
  DV_ASSIGN_OR_RETURN(std::unique_ptr<Model> model, Model::Create(strategy, net, mo));
  DV_RETURN_IF_ERROR(model->Compile(strategy.default_optimizer()));
  DV_RETURN_IF_ERROR(model->Build());

  // ---- Outputs.
  std::ofstream metrics;
  if (!options.metrics_out.empty()) {
    metrics.open(options.metrics_out, std::ios::out | std::ios::trunc);
    if (!metrics)
      return NotFoundError("cannot open --metrics-out " + options.metrics_out + " for writing");
  }
  const int worker = strategy.worker_index();
  const int replicas = strategy.num_local_replicas();
  out << "training " << options.model << " (" << model->mirrored()->variables().size()
      << " variables, " << net.NumParameters() << " parameters) on " << dataset.num_examples()
      << " examples: " << dataset.steps_per_epoch() << " steps per epoch, "
      << int64_t{replicas} * dataset.per_replica_batch() << " examples per step on this worker"
      << std::endl;

  // ---- Training.
  TrainerCallback outputs(options, out, metrics.is_open() ? &metrics : nullptr, test.get(), worker);
  FitOptions fit;
  fit.epochs = options.epochs;
  // The job's clock decides where in the data this worker is: a restarted
  // worker continues the job's data order, and a rollback to a checkpoint
  // redoes the very same batches.
  fit.resume_at_job_clock = true;
  fit.callbacks = {&outputs};
  fit.verbose = Verbosity::kProgressBar;
  fit.out = &out;
  fit.interactive = options.interactive;
  DV_RETURN_IF_ERROR(model->Fit(dataset, fit).status());
  const double wall = outputs.wall_s();
  const int64_t examples = outputs.examples(), steps = outputs.steps();
  const StrategyStats& stats = strategy.stats();

  if (!options.summary_json.empty()) {
    json summary = {
        {"test_accuracy", NullableNumber(outputs.test_accuracy())},
        {"test_accuracy_by_epoch", outputs.accuracy_by_epoch()},
        {"final_train_loss", outputs.final_train_loss()},
        {"epochs", options.epochs},
        {"examples_seen", examples},
        {"wall_seconds", wall},
        {"examples_per_second", wall > 0 ? static_cast<double>(examples) / wall : 0.0},
        {"steps", steps},
        {"mean_staleness", stats.mean_staleness()},
        {"max_staleness", stats.staleness_max},
        {"blocked_seconds", stats.blocked_s()},
        {"pull_wait_seconds", stats.pull_wait_s},
        {"push_wait_seconds", stats.push_wait_s},
        {"compute_seconds", stats.compute_s},
        {"staleness_histogram", stats.staleness_histogram},
        {"worker", worker},
        {"num_workers", strategy.num_workers()},
        {"mode", options.mode},
        {"global_batch", strategy.global_batch_size()},
        {"per_replica_batch", strategy.per_replica_batch_size()},
        {"local_replicas", replicas},
        {"model", options.model},
        {"optimizer", options.optimizer},
        {"lr", options.learning_rate},
        {"devices", options.devices},
        {"slowdown", options.slowdown},
    };
    std::ofstream f(options.summary_json, std::ios::out | std::ios::trunc);
    if (!f) return NotFoundError("cannot open --summary-json " + options.summary_json);
    f << summary.dump(2) << "\n";
    if (!f) return DataLossError("writing --summary-json " + options.summary_json + " failed");
  }
  out << "done: " << steps << " steps, " << examples << " examples in " << std::fixed
      << std::setprecision(1) << wall << " s (" << std::setprecision(0)
      << static_cast<double>(examples) / std::max(wall, 1e-9) << " examples/s), blocked "
      << std::setprecision(2) << stats.blocked_s() << " s (pulls " << stats.pull_wait_s
      << ", pushes " << stats.push_wait_s << "), mean staleness " << std::setprecision(2)
      << stats.mean_staleness() << ", max " << stats.staleness_max;
  if (outputs.test_accuracy())
    out << ", test accuracy " << std::setprecision(4) << *outputs.test_accuracy();
  out << std::endl;

  if (!options.save_path.empty()) {
    if (worker == 0) {
      DV_RETURN_IF_ERROR(model->Save(options.save_path).WithContext("--save"));
      out << "saved the model to " << options.save_path << " (model.json, variables.safetensors)"
          << std::endl;
    } else {
      out << "--save: worker " << worker << " leaves saving to worker 0" << std::endl;
    }
  }
  return OkStatus();
}

}  // namespace distval
