#include "classifier_trainer.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <fstream>
#include <iomanip>
#include <memory>
#include <nlohmann/json.hpp>
#include <optional>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "distval/dataset.h"
#include "distval/input_pipeline.h"
#include "distval/logging.h"

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

// A replica's input batch and loss head, on its device.
struct ReplicaState {
  std::optional<DeviceBatch> batch;
  SoftmaxCrossEntropy head;
};

// One progress line while an epoch runs.
class Progress {
 public:
  Progress(std::ostream& out, bool interactive, int epoch, int epochs, int64_t steps)
      : out_(out), interactive_(interactive), epoch_(epoch), epochs_(epochs), steps_(steps) {}

  void Update(int64_t step_done, double loss, double examples_per_s) {
    const auto now = Clock::now();
    if (interactive_) {
      if (step_done != steps_ && now - last_ < std::chrono::milliseconds(200)) return;
      last_ = now;
      constexpr int kWidth = 24;
      const int filled = static_cast<int>(kWidth * step_done / std::max<int64_t>(1, steps_));
      std::ostringstream line;
      line << "\repoch " << epoch_ + 1 << "/" << epochs_ << " ["
           << std::string(static_cast<size_t>(filled), '#')
           << std::string(static_cast<size_t>(kWidth - filled), '.') << "] " << step_done << "/"
           << steps_ << " loss " << std::fixed << std::setprecision(4) << loss << " "
           << std::setprecision(0) << examples_per_s << " ex/s   ";
      out_ << line.str() << std::flush;
      shown_ = true;
    } else {
      // Plain lines at each quarter of the epoch.
      const int64_t quarter = std::max<int64_t>(1, steps_ / 4);
      if (step_done % quarter != 0 || step_done == steps_) return;
      out_ << "epoch " << epoch_ + 1 << "/" << epochs_ << ": step " << step_done << "/" << steps_
           << ", loss " << std::fixed << std::setprecision(4) << loss << ", "
           << std::setprecision(0) << examples_per_s << " examples/s" << std::endl;
    }
  }
  // Clears the \r line before the epoch's summary line.
  void Finish() {
    if (interactive_ && shown_) out_ << "\r" << std::string(78, ' ') << "\r" << std::flush;
  }

 private:
  std::ostream& out_;
  bool interactive_;
  int epoch_, epochs_;
  int64_t steps_;
  Clock::time_point last_{};
  bool shown_ = false;
};

// Test accuracy and loss with every local replica evaluating its share of
// the test set (chunks r, r + L, ...), reduced with Reduce(kSum).
StatusOr<std::vector<double>> EvaluateOnTest(ParameterServerStrategy& strategy,
                                             MirroredModel& model,
                                             std::vector<std::unique_ptr<ReplicaState>>& states,
                                             const Examples& test) {
  const int replicas = strategy.num_local_replicas();
  const int chunk = std::min(model.max_batch(), kEvalBatch);
  const int64_t n = test.size();
  auto eval = [&](ReplicaContext& ctx) -> StatusOr<std::vector<double>> {
    const int r = ctx.local_replica_id();
    ReplicaState& st = *states[static_cast<size_t>(r)];
    Sequential& net = model.replica(ctx);
    std::vector<int64_t> indices;
    double correct = 0, loss_sum = 0, count = 0;
    for (int64_t start = int64_t{r} * chunk; start < n; start += int64_t{replicas} * chunk) {
      const int64_t rows = std::min<int64_t>(chunk, n - start);
      indices.resize(static_cast<size_t>(rows));
      for (int64_t i = 0; i < rows; ++i) indices[static_cast<size_t>(i)] = start + i;
      DV_RETURN_IF_ERROR(st.batch->Load(test, indices));
      const int b = static_cast<int>(rows);
      DV_RETURN_IF_ERROR(net.Forward(st.batch->features(), b));
      DV_RETURN_IF_ERROR(st.head.Forward(net.output(), st.batch->labels(), b));
      DV_RETURN_IF_ERROR(st.head.CountCorrect(net.output(), st.batch->labels(), b));
      DV_ASSIGN_OR_RETURN(const float loss, st.head.LossValue());
      DV_ASSIGN_OR_RETURN(const int64_t right, st.head.CorrectValue());
      correct += static_cast<double>(right);
      loss_sum += static_cast<double>(loss) * static_cast<double>(rows);
      count += static_cast<double>(rows);
    }
    return std::vector<double>{correct, loss_sum, count};
  };
  DV_ASSIGN_OR_RETURN(PerReplica<std::vector<double>> parts, strategy.Run(eval));
  return strategy.Reduce(ReduceOp::kSum, parts);
}

json NullableNumber(std::optional<double> v) { return v ? json(*v) : json(nullptr); }

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

  // ---- Model: one copy per replica, parameters on the servers.
  DV_ASSIGN_OR_RETURN(Sequential net, BuiltinModel(options.model));
  ModelOptions mo;
  mo.input_features = kFeatures;
  mo.max_batch = std::max(strategy.per_replica_batch_size(), kEvalBatch);
  mo.seed = options.seed;
  DV_ASSIGN_OR_RETURN(MirroredModel * model, strategy.CreateModel(net, mo));
  const int replicas = strategy.num_local_replicas();
  std::vector<std::unique_ptr<ReplicaState>> states;
  for (int r = 0; r < replicas; ++r) {
    auto st = std::make_unique<ReplicaState>();
    DV_RETURN_IF_ERROR(strategy.RunOnReplica(r, [&](Backend& backend) -> Status {
      DV_ASSIGN_OR_RETURN(DeviceBatch batch,
                          DeviceBatch::Create(&backend, model->max_batch(), kFeatures));
      st->batch.emplace(std::move(batch));
      return st->head.Build(&backend, model->max_batch(), kClasses);
    }));
    states.push_back(std::move(st));
  }

  // ---- Outputs.
  std::ofstream metrics;
  if (!options.metrics_out.empty()) {
    metrics.open(options.metrics_out, std::ios::out | std::ios::trunc);
    if (!metrics)
      return NotFoundError("cannot open --metrics-out " + options.metrics_out + " for writing");
  }
  const int worker = strategy.worker_index();
  const int64_t steps_per_epoch = dataset.steps_per_epoch();
  const int64_t examples_per_step = int64_t{replicas} * dataset.per_replica_batch();
  out << "training " << options.model << " (" << model->variables().size() << " variables, "
      << net.NumParameters() << " parameters) on " << dataset.num_examples()
      << " examples: " << steps_per_epoch << " steps per epoch, " << examples_per_step
      << " examples per step on this worker" << std::endl;

  // ---- Training.
  int64_t examples = 0, steps = 0;
  double final_train_loss = 0;
  std::optional<double> test_accuracy;
  std::vector<json> accuracy_by_epoch;
  const auto start = Clock::now();
  for (int epoch = 0; epoch < options.epochs; ++epoch) {
    const EpochPlan plan = dataset.PlanEpoch(epoch);
    Progress progress(out, options.interactive, epoch, options.epochs, plan.num_steps());
    double loss_sum = 0;
    const auto epoch_start = Clock::now();
    for (int64_t step = 0; step < plan.num_steps(); ++step) {
      auto step_fn = [&](ReplicaContext& ctx) -> StatusOr<float> {
        ReplicaState& st = *states[static_cast<size_t>(ctx.local_replica_id())];
        DV_RETURN_IF_ERROR(st.batch->Load(*train, plan.ReplicaBatch(step, ctx.local_replica_id())));
        const int b = st.batch->size();
        Sequential& replica = model->replica(ctx);
        DV_RETURN_IF_ERROR(replica.Forward(st.batch->features(), b));
        DV_RETURN_IF_ERROR(st.head.Forward(replica.output(), st.batch->labels(), b));
        DV_RETURN_IF_ERROR(st.head.Backward(st.batch->labels(), b));
        DV_RETURN_IF_ERROR(replica.Backward(st.batch->features(), st.head.grad(), b));
        DV_RETURN_IF_ERROR(ctx.ApplyGradients());
        return st.head.LossValue();
      };
      DV_ASSIGN_OR_RETURN(PerReplica<float> losses, strategy.Run(step_fn));
      DV_ASSIGN_OR_RETURN(const float loss, strategy.Reduce(ReduceOp::kMean, losses));
      if (!std::isfinite(loss))
        return InternalError("training diverged: loss " + std::to_string(loss) + " at epoch " +
                             std::to_string(epoch) + " step " + std::to_string(step) +
                             " (lower --lr)");
      StepStats st = strategy.last_step();
      if (options.slowdown > 1.0) {
        const double extra = st.compute_s * (options.slowdown - 1.0);
        std::this_thread::sleep_for(std::chrono::duration<double>(extra));
        st.compute_s += extra;
      }
      examples += examples_per_step;
      ++steps;
      loss_sum += loss;
      const double wall = Seconds(Clock::now() - start);
      if (metrics.is_open()) {
        metrics << json{{"type", "step"},
                        {"worker", worker},
                        {"step", steps - 1},
                        {"epoch", epoch},
                        {"wall_s", wall},
                        {"loss", loss},
                        {"staleness", st.staleness},
                        {"blocked_s", st.blocked_s()},
                        {"compute_s", st.compute_s},
                        {"examples", examples}}
                       .dump()
                << "\n";
      }
      const double epoch_s = Seconds(Clock::now() - epoch_start);
      progress.Update(
          step + 1, loss,
          epoch_s > 0 ? static_cast<double>((step + 1) * examples_per_step) / epoch_s : 0.0);
    }
    progress.Finish();
    final_train_loss = loss_sum / static_cast<double>(std::max<int64_t>(1, plan.num_steps()));
    std::optional<double> accuracy;
    std::ostringstream line;
    line << std::fixed << "epoch " << epoch + 1 << "/" << options.epochs << ": train loss "
         << std::setprecision(4) << final_train_loss;
    if (options.evaluate) {
      DV_ASSIGN_OR_RETURN(std::vector<double> eval,
                          EvaluateOnTest(strategy, *model, states, *test));
      accuracy = eval[2] > 0 ? eval[0] / eval[2] : 0.0;
      test_accuracy = accuracy;
      line << ", test accuracy " << *accuracy << ", test loss "
           << (eval[2] > 0 ? eval[1] / eval[2] : 0.0);
    }
    accuracy_by_epoch.push_back(NullableNumber(accuracy));
    const double wall = Seconds(Clock::now() - start);
    line << std::setprecision(1) << " (" << wall << " s, " << std::setprecision(0)
         << static_cast<double>(examples) / std::max(wall, 1e-9) << " examples/s)";
    out << line.str() << std::endl;
    if (metrics.is_open()) {
      metrics << json{{"type", "epoch"},
                      {"worker", worker},
                      {"epoch", epoch},
                      {"wall_s", wall},
                      {"train_loss", final_train_loss},
                      {"test_accuracy", NullableNumber(accuracy)},
                      {"examples", examples}}
                     .dump()
              << std::endl;  // flushed: tools follow the epochs live
      if (!metrics)
        return DataLossError("writing --metrics-out " + options.metrics_out + " failed");
    }
  }
  const double wall = Seconds(Clock::now() - start);
  const StrategyStats& stats = strategy.stats();

  if (!options.summary_json.empty()) {
    json summary = {
        {"test_accuracy", NullableNumber(test_accuracy)},
        {"test_accuracy_by_epoch", accuracy_by_epoch},
        {"final_train_loss", final_train_loss},
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
  if (test_accuracy) out << ", test accuracy " << std::setprecision(4) << *test_accuracy;
  out << std::endl;
  return OkStatus();
}

}  // namespace distval
