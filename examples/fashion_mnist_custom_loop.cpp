// The tf.distribute custom training loop, in C++ with distval.
//
// TensorFlow:                                   distval:
//   strategy = tf.distribute....Strategy(...)     ParameterServerStrategy::Create(options)
//   with strategy.scope(): model = ...            strategy->CreateModel(net, ...)
//   train_loss = tf.keras.metrics.Sum()           strategy->CreateSyncOnReadVariable(...)
//   strategy.experimental_distribute_dataset(d)   strategy->DistributeDataset(examples, ...)
//   strategy.run(train_step, args=(batch,))       strategy->Run(train_step, plan)
//   optimizer.apply_gradients(zip(g, v))          ctx.ApplyGradients()   (optimizer on the servers)
//   strategy.reduce(SUM, per_replica, axis=None)  strategy->Reduce(ReduceOp::kSum, per_replica)
//
// Run it against a local cluster (2 parameter servers, 2 workers):
//   tools/launch --ps 2 --workers 2 -- build/examples/fashion_mnist_custom_loop --epochs 2
// or give --ps / --worker-index / --num-workers yourself.
#include <CLI/CLI.hpp>
#include <cstdio>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "distval/cluster_spec.h"
#include "distval/dataset.h"
#include "distval/input_pipeline.h"
#include "distval/layers.h"
#include "distval/parameter_server_strategy.h"

namespace {

using namespace distval;

// What each replica keeps between steps: its input batch and loss head on its
// device.
struct ReplicaState {
  std::optional<DeviceBatch> batch;
  SoftmaxCrossEntropy head;
};

Status Main(const WorkerOptions& options, const std::string& data_dir, int64_t train_limit,
            int epochs) {
  // ---- The strategy: one replica per device, connected to the servers.
  DV_ASSIGN_OR_RETURN(std::unique_ptr<ParameterServerStrategy> strategy,
                      ParameterServerStrategy::Create(options));
  std::printf("%s\n", strategy->Describe().c_str());

  // ---- Data: this worker's shard, split into per-replica batches.
  DV_ASSIGN_OR_RETURN(Examples train, LoadFashionMnist(data_dir, Split::kTrain, train_limit));
  DV_ASSIGN_OR_RETURN(Examples test, LoadFashionMnist(data_dir, Split::kTest));
  auto train_examples = std::make_shared<const Examples>(std::move(train));
  DV_ASSIGN_OR_RETURN(DistributedDataset dataset,
                      strategy->DistributeDataset(train_examples, InputOptions{}));

  // ---- The model "under the strategy's scope": its parameters become
  // variables on the parameter servers, mirrored into every replica.
  Sequential net;
  net.Add(std::make_unique<Dense>(784, 128))
      .Add(std::make_unique<ReLU>())
      .Add(std::make_unique<Dense>(128, 10));
  constexpr int kEvalBatch = 200;
  ModelOptions model_options;
  model_options.input_features = 784;
  model_options.max_batch = std::max(strategy->per_replica_batch_size(), kEvalBatch);
  model_options.seed = 42;
  DV_ASSIGN_OR_RETURN(MirroredModel * model, strategy->CreateModel(net, model_options));

  // Metrics: per-replica accumulators, summed when read after Run.
  DV_ASSIGN_OR_RETURN(
      SyncOnReadVariable * loss_sum,
      strategy->CreateSyncOnReadVariable("train_loss_sum", Shape{}, VariableAggregation::kSum));
  DV_ASSIGN_OR_RETURN(
      SyncOnReadVariable * seen,
      strategy->CreateSyncOnReadVariable("train_examples", Shape{}, VariableAggregation::kSum));

  std::vector<std::unique_ptr<ReplicaState>> replicas;
  for (int r = 0; r < strategy->num_local_replicas(); ++r) {
    auto state = std::make_unique<ReplicaState>();
    DV_RETURN_IF_ERROR(strategy->RunOnReplica(r, [&](Backend& backend) -> Status {
      DV_ASSIGN_OR_RETURN(DeviceBatch batch,
                          DeviceBatch::Create(&backend, model->max_batch(), 784));
      state->batch.emplace(std::move(batch));
      return state->head.Build(&backend, model->max_batch(), 10);
    }));
    replicas.push_back(std::move(state));
  }

  // ---- The step function: runs on every replica in parallel.
  auto train_step = [&](ReplicaContext& ctx, const EpochPlan& plan, int64_t step) -> Status {
    ReplicaState& my = *replicas[static_cast<size_t>(ctx.local_replica_id())];
    DV_RETURN_IF_ERROR(
        my.batch->Load(*train_examples, plan.ReplicaBatch(step, ctx.local_replica_id())));
    const int b = my.batch->size();
    Sequential& replica = model->replica(ctx);
    DV_RETURN_IF_ERROR(replica.Forward(my.batch->features(), b));
    DV_RETURN_IF_ERROR(my.head.Forward(replica.output(), my.batch->labels(), b));
    DV_RETURN_IF_ERROR(my.head.Backward(my.batch->labels(), b));
    DV_RETURN_IF_ERROR(replica.Backward(my.batch->features(), my.head.grad(), b));
    // Gradients: mean over this worker's replicas, one push; the servers run
    // the optimizer.
    DV_RETURN_IF_ERROR(ctx.ApplyGradients());
    DV_ASSIGN_OR_RETURN(const float loss, my.head.LossValue());
    DV_RETURN_IF_ERROR(loss_sum->AssignAdd(ctx, static_cast<double>(loss) * b));
    return seen->AssignAdd(ctx, b);
  };

  // ---- Evaluation: each replica counts the correct predictions of its share
  // of the test set; Reduce(kSum) adds them up.
  const int replica_count = strategy->num_local_replicas();
  auto eval_step = [&](ReplicaContext& ctx) -> StatusOr<int64_t> {
    ReplicaState& my = *replicas[static_cast<size_t>(ctx.local_replica_id())];
    Sequential& replica = model->replica(ctx);
    int64_t correct = 0;
    std::vector<int64_t> rows;
    for (int64_t start = int64_t{ctx.local_replica_id()} * kEvalBatch; start < test.size();
         start += int64_t{replica_count} * kEvalBatch) {
      rows.clear();
      for (int64_t i = start; i < std::min<int64_t>(start + kEvalBatch, test.size()); ++i)
        rows.push_back(i);
      DV_RETURN_IF_ERROR(my.batch->Load(test, rows));
      const int b = my.batch->size();
      DV_RETURN_IF_ERROR(replica.Forward(my.batch->features(), b));
      DV_RETURN_IF_ERROR(my.head.CountCorrect(replica.output(), my.batch->labels(), b));
      DV_ASSIGN_OR_RETURN(const int64_t right, my.head.CorrectValue());
      correct += right;
    }
    return correct;
  };

  // ---- The custom training loop.
  for (int epoch = 0; epoch < epochs; ++epoch) {
    const EpochPlan plan = dataset.PlanEpoch(epoch);
    for (int64_t step = 0; step < plan.num_steps(); ++step) {
      DV_RETURN_IF_ERROR(strategy->Run(train_step, plan, step));
    }
    DV_ASSIGN_OR_RETURN(const double total_loss, loss_sum->ReadScalar());
    DV_ASSIGN_OR_RETURN(const double total_seen, seen->ReadScalar());
    DV_RETURN_IF_ERROR(loss_sum->Reset());
    DV_RETURN_IF_ERROR(seen->Reset());
    std::printf("worker %d epoch %d: train loss %.4f over %.0f examples\n",
                strategy->worker_index(), epoch + 1, total_loss / total_seen, total_seen);
    if (strategy->worker_index() == 0) {
      DV_ASSIGN_OR_RETURN(PerReplica<int64_t> correct, strategy->Run(eval_step));
      DV_ASSIGN_OR_RETURN(const int64_t total, strategy->Reduce(ReduceOp::kSum, correct));
      std::printf("epoch %d: test accuracy %.4f\n", epoch + 1,
                  static_cast<double>(total) / static_cast<double>(test.size()));
    }
    std::fflush(stdout);
  }
  return OkStatus();
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"The tf.distribute custom training loop with distval (Fashion-MNIST MLP)."};
  std::string ps, devices = "cpu:0", data_dir(kDefaultFashionMnistDir);
  distval::WorkerOptions options;
  int64_t train_limit = -1;
  int epochs = 1;
  options.global_batch_size = 64;
  app.add_option("--ps", ps, "comma-separated parameter-server endpoints")->required();
  app.add_option("--worker-index", options.worker_index, "this worker's index");
  app.add_option("--num-workers", options.num_workers, "workers in the job");
  app.add_option("--devices", devices, "comma-separated devices (cpu:N, cuda:N)");
  app.add_option("--global-batch", options.global_batch_size, "examples per step, all replicas");
  app.add_option("--data", data_dir, "Fashion-MNIST directory");
  app.add_option("--train-limit", train_limit, "use the first N training examples");
  app.add_option("--epochs", epochs, "passes over the data");
  CLI11_PARSE(app, argc, argv);

  // "host:port" or tcp://... endpoints, checked and normalized.
  auto cluster = distval::ClusterSpec::Make(CLI::detail::split(ps, ','), options.num_workers);
  if (cluster.ok()) cluster = cluster->WithTask("worker", options.worker_index);
  distval::Status s = cluster.ok() ? options.SetCluster(*cluster) : cluster.status();
  if (!s.ok()) {
    std::fprintf(stderr, "fashion_mnist_custom_loop: %s\n", s.ToString().c_str());
    return 2;
  }
  options.devices = CLI::detail::split(devices, ',');
  options.optimizer.kind = distval::protocol::OptimizerKind::kAdam;
  options.optimizer.learning_rate = 0.001;
  s = Main(options, data_dir, train_limit, epochs);
  if (!s.ok()) {
    std::fprintf(stderr, "fashion_mnist_custom_loop: %s\n", s.ToString().c_str());
    return 1;
  }
  return 0;
}
