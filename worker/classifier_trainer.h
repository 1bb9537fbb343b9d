// ClassifierTrainer: what distval-worker runs. Trains a built-in classifier
// (mlp, logreg) on an MNIST-format dataset with the Keras-style API
// (distval/model.h): Model::Create under the strategy, Compile with the
// strategy's optimizer, Model::Fit. Every step is one strategy Run (pull ->
// mirror -> per-replica forward / backward -> ApplyGradients: local
// reduction, one push, clock), so a distributed run and the --local baseline
// go through exactly the same code. Fit callbacks write the per-step /
// per-epoch metrics (JSON lines), the per-epoch line with the test accuracy
// (evaluating workers, Model::Evaluate on this worker alone); then the
// summary JSON and, with save_path, the saved model (worker 0).
//
// Internal to the distval-worker binary (not part of libdistval-worker).
// Thread-safety: one thread.
#ifndef DISTVAL_WORKER_CLASSIFIER_TRAINER_H_
#define DISTVAL_WORKER_CLASSIFIER_TRAINER_H_

#include <cstdint>
#include <memory>
#include <ostream>
#include <string>

#include "distval/layers.h"
#include "distval/parameter_server_strategy.h"
#include "distval/status.h"
#include "distval/worker_telemetry.h"

namespace distval {

struct TrainerOptions {
  // "mlp" (784-256-128-10, ReLU) or "logreg" (784-10).
  std::string model = "mlp";
  std::string data_dir;
  int epochs = 1;
  // Use only the first N training examples (< 0: all).
  int64_t train_limit = -1;
  uint64_t seed = 1;
  // Straggler simulation: after each step sleep compute time x (slowdown - 1).
  double slowdown = 1.0;
  // Evaluate on the test split after every epoch (worker 0, --local).
  bool evaluate = true;
  // Outputs ("" = none).
  std::string metrics_out;
  std::string summary_json;
  // Settings echoed into the summary.
  std::string mode;  // "bsp", "ssp:N", "async", "local"
  std::string optimizer;
  double learning_rate = 0;
  std::string devices;
  // Progress display: \r updates when true (a TTY), else occasional lines.
  bool interactive = false;
  // Model::Save the trained model here (worker 0 and --local; "" = no).
  std::string save_path;
  // Told each batch's examples and loss (metrics); null: none. Borrowed.
  WorkerTelemetry* telemetry = nullptr;
};

// The built-in model `name` (InvalidArgument naming it otherwise).
StatusOr<Sequential> BuiltinModel(const std::string& name);

// Trains as described above, printing to `out`. Errors: data loading,
// strategy and device errors, file errors for the outputs (naming the path).
Status TrainClassifier(ParameterServerStrategy& strategy, const TrainerOptions& options,
                       std::ostream& out);

}  // namespace distval

#endif  // DISTVAL_WORKER_CLASSIFIER_TRAINER_H_
