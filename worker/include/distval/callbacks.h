// Callbacks of Model::Fit (tf.keras.callbacks) and what they receive: the
// per-batch and per-epoch logs, the History Fit returns, EarlyStopping and
// LearningRateScheduler.
//
//   EarlyStoppingOptions stopping;
//   stopping.monitor = "val_loss";
//   stopping.patience = 2;
//   EarlyStopping stop(stopping);
//   LearningRateScheduler schedule([](int epoch, double lr) {
//     return epoch < 3 ? lr : lr * 0.5;
//   });
//   FitOptions fit;
//   fit.callbacks = {&stop, &schedule};
//   DV_ASSIGN_OR_RETURN(History history, model->Fit(train, fit));
//
// Several workers. Every worker of a job runs the same Fit with the same
// callbacks. Training logs ("loss", "accuracy") are this worker's; "val_*"
// logs are job-wide when validation runs across workers (the default), so a
// callback that stops training or changes the learning rate decides the
// same way on every worker. EarlyStopping also makes the workers agree
// (training stops on all when one wants to stop), and LearningRateScheduler
// waits for every worker at the epoch boundary before it changes the rate
// on the servers.
//
// Thread-safety: callbacks are called on the thread that called Fit, one at
// a time, in the order of FitOptions::callbacks.
#ifndef DISTVAL_CALLBACKS_H_
#define DISTVAL_CALLBACKS_H_

#include <cstdint>
#include <functional>
#include <map>
#include <optional>
#include <string>
#include <vector>

#include "distval/parameter_server_strategy.h"
#include "distval/status.h"

namespace distval {

class Model;

// What OnBatchEnd receives after each training step.
struct BatchLogs {
  int epoch = 0;
  // Step within the epoch (0-based) and steps in this epoch.
  int64_t step = 0;
  int64_t steps = 0;
  // Training steps this worker completed in this Fit, including this one.
  int64_t total_steps = 0;
  // This step's loss: the mean over this worker's replicas of their batch
  // mean loss (example-weighted when the batches differ in size).
  double loss = 0;
  // Examples this worker trained on in this step / in the epoch so far.
  int64_t examples = 0;
  int64_t epoch_examples = 0;
  // Running values of the epoch's metrics on this worker ("loss",
  // "accuracy", ...).
  std::map<std::string, double> metrics;
  // The strategy's timing and staleness of the step.
  StepStats stats;
};

// What OnEpochEnd receives (Keras's logs dict).
struct EpochLogs {
  int epoch = 0;
  // "loss" and the compiled metrics over the epoch (this worker), then
  // "val_loss", "val_<metric>" when Fit has validation data.
  std::map<std::string, double> values;
  int64_t steps = 0;
  // Examples this worker trained on in the epoch.
  int64_t examples = 0;
  // Wall time of the epoch, validation included.
  double seconds = 0;

  // values[name] or nullopt.
  std::optional<double> Get(const std::string& name) const;
};

// Per-epoch values of a Fit (Keras's History.history).
struct History {
  std::vector<int> epochs;
  // name -> one value per entry of `epochs`.
  std::map<std::string, std::vector<double>> values;

  // The last value of `name`, or nullopt.
  std::optional<double> Last(const std::string& name) const;
  void Append(const EpochLogs& logs);
};

// Hooks into Model::Fit. Every method may fail: Fit stops and returns the
// error. Override what you need; the defaults do nothing.
class Callback {
 public:
  virtual ~Callback() = default;
  virtual Status OnTrainBegin(Model& model);
  virtual Status OnEpochBegin(Model& model, int epoch);
  virtual Status OnBatchEnd(Model& model, const BatchLogs& logs);
  virtual Status OnEpochEnd(Model& model, const EpochLogs& logs);
  virtual Status OnTrainEnd(Model& model, const History& history);
};

// Stops training when a monitored value stopped improving
// (tf.keras.callbacks.EarlyStopping without restore_best_weights).
struct EarlyStoppingOptions {
  // A key of EpochLogs::values ("val_loss", "loss", "val_accuracy", ...).
  std::string monitor = "val_loss";
  // An improvement smaller than this does not count.
  double min_delta = 0;
  // Training stops after this many epochs in a row without improvement
  // (0 or 1: the first).
  int patience = 0;
  // "min", "max", or "auto" (max for names containing "acc", else min).
  std::string mode = "auto";
  // When set, the value to beat from the first epoch on (epochs that do
  // not beat it count as epochs without improvement).
  std::optional<double> baseline;
};

class EarlyStopping final : public Callback {
 public:
  explicit EarlyStopping(EarlyStoppingOptions options = {});

  // Resets the state.
  Status OnTrainBegin(Model& model) override;
  // Compares the monitored value with the best so far; after `patience`
  // epochs without improvement calls model.StopTraining(). With several
  // workers, the workers' decisions are combined (Model::SumAcrossWorkers):
  // all stop when any wants to. Errors: InvalidArgument when the logs lack
  // the monitored value (listing the keys there are) or the mode is
  // unknown; SumAcrossWorkers' errors.
  Status OnEpochEnd(Model& model, const EpochLogs& logs) override;

  // The epoch after which training was stopped, or -1.
  int stopped_epoch() const { return stopped_epoch_; }
  std::optional<double> best() const { return best_; }

 private:
  EarlyStoppingOptions options_;
  std::optional<double> best_;
  int wait_ = 0;
  int stopped_epoch_ = -1;
};

// Sets the learning rate on the servers at the start of every epoch
// (tf.keras.callbacks.LearningRateScheduler): rate = schedule(epoch,
// current rate). The new rate reaches every variable's optimizer on the
// servers (Model::SetLearningRate), never only the worker.
class LearningRateScheduler final : public Callback {
 public:
  using Schedule = std::function<double(int epoch, double learning_rate)>;
  explicit LearningRateScheduler(Schedule schedule) : schedule_(std::move(schedule)) {}

  // When the rate changes: with several workers waits for all of them
  // (Model::SyncWorkers, so that no update of the previous epoch is still
  // on its way), then sets it. Errors: InvalidArgument for a negative or
  // non-finite rate; the servers' errors.
  Status OnEpochBegin(Model& model, int epoch) override;

 private:
  Schedule schedule_;
};

}  // namespace distval

#endif  // DISTVAL_CALLBACKS_H_
