#include "distval/callbacks.h"

#include <cmath>
#include <string>

#include "distval/model.h"

namespace distval {

std::optional<double> EpochLogs::Get(const std::string& name) const {
  auto it = values.find(name);
  if (it == values.end()) return std::nullopt;
  return it->second;
}

std::optional<double> History::Last(const std::string& name) const {
  auto it = values.find(name);
  if (it == values.end() || it->second.empty()) return std::nullopt;
  return it->second.back();
}

void History::Append(const EpochLogs& logs) {
  epochs.push_back(logs.epoch);
  for (const auto& [name, v] : logs.values) values[name].push_back(v);
}

Status Callback::OnTrainBegin(Model&) { return OkStatus(); }
Status Callback::OnEpochBegin(Model&, int) { return OkStatus(); }
Status Callback::OnBatchEnd(Model&, const BatchLogs&) { return OkStatus(); }
Status Callback::OnEpochEnd(Model&, const EpochLogs&) { return OkStatus(); }
Status Callback::OnTrainEnd(Model&, const History&) { return OkStatus(); }

// ---- EarlyStopping ----------------------------------------------------------------

EarlyStopping::EarlyStopping(EarlyStoppingOptions options) : options_(std::move(options)) {}

Status EarlyStopping::OnTrainBegin(Model&) {
  best_ = options_.baseline;
  wait_ = 0;
  stopped_epoch_ = -1;
  return OkStatus();
}

Status EarlyStopping::OnEpochEnd(Model& model, const EpochLogs& logs) {
  bool maximize;
  if (options_.mode == "min") {
    maximize = false;
  } else if (options_.mode == "max") {
    maximize = true;
  } else if (options_.mode == "auto") {
    maximize = options_.monitor.find("acc") != std::string::npos;
  } else {
    return InvalidArgumentError("EarlyStopping: mode '" + options_.mode +
                                "' is not min, max or auto");
  }
  const std::optional<double> current = logs.Get(options_.monitor);
  if (!current.has_value()) {
    std::string keys;
    for (const auto& [k, v] : logs.values) keys += (keys.empty() ? "" : ", ") + k;
    return InvalidArgumentError("EarlyStopping: the logs have no '" + options_.monitor +
                                "' (they have: " + keys + ")");
  }
  const double delta = std::abs(options_.min_delta);
  const bool improved =
      !best_.has_value() || (maximize ? *current - delta > *best_ : *current + delta < *best_);
  bool stop = false;
  if (improved) {
    best_ = current;
    wait_ = 0;
  } else {
    ++wait_;
    stop = wait_ >= options_.patience;
  }
  if (model.strategy().num_workers() > 1) {
    // Every worker decides; all stop when one does (the others would wait
    // for its pushes otherwise).
    const double vote = stop ? 1.0 : 0.0;
    DV_ASSIGN_OR_RETURN(std::vector<double> votes,
                        model.SumAcrossWorkers(std::span<const double>(&vote, 1)));
    stop = votes[0] > 0.5;
  }
  if (stop) {
    stopped_epoch_ = logs.epoch;
    model.StopTraining();
  }
  return OkStatus();
}

// ---- LearningRateScheduler -------------------------------------------------------------

Status LearningRateScheduler::OnEpochBegin(Model& model, int epoch) {
  const double current = model.learning_rate();
  const double next = schedule_(epoch, current);
  if (!std::isfinite(next) || next < 0)
    return InvalidArgumentError("LearningRateScheduler: the schedule gave " + std::to_string(next) +
                                " for epoch " + std::to_string(epoch) +
                                " (must be finite and >= 0)");
  if (next == current) return OkStatus();
  // Every push of the previous epoch reached the servers before the rate
  // changes (each worker sets the same rate; the servers apply it as they
  // receive it).
  DV_RETURN_IF_ERROR(model.SyncWorkers());
  return model.SetLearningRate(next);
}

}  // namespace distval
