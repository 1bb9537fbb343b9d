// The Keras pattern with distval: strategy, scope, create the model, compile,
// fit, evaluate, save, load, evaluate again.
//
// TensorFlow:                                      distval:
//   strategy = tf.distribute....Strategy(...)        ParameterServerStrategy::Create(options)
//   with strategy.scope():                           Model::Create(*strategy, net, {...})
//     model = create_model()
//     model.compile(optimizer, loss, metrics)        model->Compile(Adam(1e-3), loss, {Accuracy()})
//   model.fit(train, epochs, validation_data,        model->Fit(train, fit_options)
//             callbacks=[EarlyStopping, LRScheduler])
//   model.evaluate(test)                             model->Evaluate(*test)
//   model.save(path); tf.keras.models.load_model     model->Save(path); LoadModel(path, {...})
//
// Run it against a local cluster (2 parameter servers, 2 workers):
//   tools/launch --ps 2 --workers 2 -- build/examples/keras_style_fit --epochs 3
// or give --ps / --worker-index / --num-workers yourself. Every worker runs
// the same program; worker 0 saves, every worker loads the saved model.
#include <CLI/CLI.hpp>
#include <cstdio>
#include <memory>
#include <string>
#include <vector>

#include "distval/callbacks.h"
#include "distval/cluster_spec.h"
#include "distval/dataset.h"
#include "distval/layers.h"
#include "distval/model.h"
#include "distval/model_saving.h"
#include "distval/parameter_server_strategy.h"

namespace {

using namespace distval;

Status Main(const WorkerOptions& options, const std::string& data_dir, int64_t train_limit,
            int epochs, const std::string& save_dir) {
  DV_ASSIGN_OR_RETURN(std::unique_ptr<ParameterServerStrategy> strategy,
                      ParameterServerStrategy::Create(options));
  std::printf("%s\n", strategy->Describe().c_str());
  DV_ASSIGN_OR_RETURN(Examples train_examples,
                      LoadFashionMnist(data_dir, Split::kTrain, train_limit));
  DV_ASSIGN_OR_RETURN(Examples test_examples, LoadFashionMnist(data_dir, Split::kTest));
  auto train = std::make_shared<const Examples>(std::move(train_examples));
  auto test = std::make_shared<const Examples>(std::move(test_examples));

  // ---- "with strategy.scope(): model = create_model(); model.compile(...)"
  Sequential net;
  net.Add(std::make_unique<Dense>(784, 128))
      .Add(std::make_unique<ReLU>())
      .Add(std::make_unique<Dense>(128, 10));
  ModelBuildOptions build;
  build.input_features = 784;
  build.seed = 42;
  DV_ASSIGN_OR_RETURN(std::unique_ptr<Model> model, Model::Create(*strategy, net, build));
  DV_RETURN_IF_ERROR(model->Compile(optimizers::Adam(1e-3), Loss::SparseCategoricalCrossentropy(),
                                    {Metric::Accuracy()}));

  // ---- model.fit: a progress bar per epoch, validation on the test set
  // (every worker evaluates its share), early stopping, and a learning
  // rate halved after the first epoch, on the servers.
  EarlyStoppingOptions stopping;
  stopping.monitor = "val_loss";
  stopping.patience = 2;
  EarlyStopping early_stopping(stopping);
  LearningRateScheduler schedule([](int epoch, double lr) { return epoch == 0 ? lr : lr * 0.5; });
  FitOptions fit;
  fit.epochs = epochs;
  fit.validation_data = test;
  fit.callbacks = {&early_stopping, &schedule};
  DV_ASSIGN_OR_RETURN(History history, model->Fit(train, fit));
  std::printf("worker %d trained %zu epoch(s), final loss %.4f, learning rate %g\n",
              strategy->worker_index(), history.epochs.size(), history.Last("loss").value_or(0),
              model->learning_rate());

  // ---- model.evaluate: each worker evaluates half the test set; the totals
  // are added up through the servers, so every worker prints the same.
  DV_ASSIGN_OR_RETURN(EvaluateResult result, model->Evaluate(*test));
  std::printf("evaluate: test loss %.4f, test accuracy %.4f over %lld examples\n", result.loss,
              result.accuracy(), static_cast<long long>(result.examples));

  // ---- model.save (the chief), then load_model under the same strategy:
  // the saved values become the initial values of new variables on the
  // servers ("restored/..."). LoadModel(save_dir) without a strategy would
  // load it for local inference instead.
  if (strategy->worker_index() == 0) {
    DV_RETURN_IF_ERROR(model->Save(save_dir));
    std::printf("saved the model to %s\n", save_dir.c_str());
  }
  DV_RETURN_IF_ERROR(model->SyncWorkers());  // the files are there for every worker
  LoadOptions load;
  load.strategy = strategy.get();
  load.name_prefix = "restored/";
  DV_ASSIGN_OR_RETURN(std::unique_ptr<Model> restored, LoadModel(save_dir, load));
  DV_ASSIGN_OR_RETURN(EvaluateResult again, restored->Evaluate(*test));
  std::printf("restored model: test loss %.4f, test accuracy %.4f over %lld examples\n", again.loss,
              again.accuracy(), static_cast<long long>(again.examples));
  std::fflush(stdout);
  return OkStatus();
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"Keras-style training with distval: compile, fit, evaluate, save, load."};
  std::string ps, devices = "cpu:0", data_dir(kDefaultFashionMnistDir);
  std::string save_dir = "keras_style_fit_model";
  distval::WorkerOptions options;
  int64_t train_limit = -1;
  int epochs = 3;
  options.global_batch_size = 64;
  app.add_option("--ps", ps, "comma-separated parameter-server endpoints")->required();
  app.add_option("--worker-index", options.worker_index, "this worker's index");
  app.add_option("--num-workers", options.num_workers, "workers in the job");
  app.add_option("--devices", devices, "comma-separated devices (cpu:N, cuda:N)");
  app.add_option("--global-batch", options.global_batch_size, "examples per step, all replicas");
  app.add_option("--data", data_dir, "Fashion-MNIST directory");
  app.add_option("--train-limit", train_limit, "use the first N training examples");
  app.add_option("--epochs", epochs, "passes over the data");
  app.add_option("--save", save_dir, "directory the model is saved to (worker 0)");
  CLI11_PARSE(app, argc, argv);

  auto cluster = distval::ClusterSpec::Make(CLI::detail::split(ps, ','), options.num_workers);
  if (cluster.ok()) cluster = cluster->WithTask("worker", options.worker_index);
  distval::Status s = cluster.ok() ? options.SetCluster(*cluster) : cluster.status();
  if (!s.ok()) {
    std::fprintf(stderr, "keras_style_fit: %s\n", s.ToString().c_str());
    return 2;
  }
  options.devices = CLI::detail::split(devices, ',');
  s = Main(options, data_dir, train_limit, epochs, save_dir);
  if (!s.ok()) {
    std::fprintf(stderr, "keras_style_fit: %s\n", s.ToString().c_str());
    return 1;
  }
  return 0;
}
