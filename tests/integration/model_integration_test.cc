// The Keras-style Model against real distval-ps processes: the learning-rate
// schedule reaches the servers, two workers agree on early stopping and
// evaluate every example exactly once, and a model trained on the servers
// (variables partitioned over both) and saved predicts the same bits in a
// fresh process without servers.
#include <gtest/gtest.h>

#include <cstring>
#include <filesystem>
#include <set>
#include <thread>

#include "child_process.h"
#include "distval/callbacks.h"
#include "distval/model.h"
#include "distval/model_saving.h"
#include "distval/safetensors.h"
#include "local_cluster.h"
#include "strategy_training.h"

namespace distval {
namespace {

using testing::LocalCluster;
using testing::LocalClusterOptions;
using testing::SyntheticExamples;
using testing::SyntheticModel;

StatusOr<std::unique_ptr<ParameterServerStrategy>> Connect(const LocalCluster& cluster, int worker,
                                                           int workers,
                                                           Partitioner partitioner = {}) {
  WorkerOptions o;
  o.ps_endpoints = cluster.endpoints();
  o.worker_index = worker;
  o.num_workers = workers;
  o.devices = {"cpu:0"};
  o.global_batch_size = 32;
  o.staleness = 0;
  o.variable_partitioner = partitioner;
  return ParameterServerStrategy::Create(o);
}

ModelBuildOptions Options() {
  ModelBuildOptions mo;
  mo.input_features = testing::kSyntheticFeatures;
  mo.seed = 5;
  return mo;
}

FitOptions Quiet(int epochs) {
  FitOptions f;
  f.epochs = epochs;
  f.verbose = Verbosity::kSilent;
  return f;
}

// The learning rate every shard reports for the model's variables
// ("dense_*"); -1 when they disagree or none was found.
double ServerLearningRate(Client& client) {
  auto stats = client.Stats();
  EXPECT_TRUE(stats.ok()) << stats.status();
  if (!stats.ok()) return -1;
  std::set<double> rates;
  for (const auto& shard : *stats) {
    for (const auto& v : shard.variables) {
      if (v.name.rfind("dense_", 0) == 0) rates.insert(v.learning_rate);
    }
  }
  return rates.size() == 1 ? *rates.begin() : -1;
}

TEST(ModelOnServersTest, TheLearningRateScheduleReachesTheServers) {
  LocalClusterOptions co;
  co.num_shards = 2;
  auto cluster = LocalCluster::Start(co);
  ASSERT_TRUE(cluster.ok()) << cluster.status();
  auto strategy = Connect(*cluster, 0, 1);
  ASSERT_TRUE(strategy.ok()) << strategy.status();
  auto model = Model::Create(**strategy, SyntheticModel(), Options());
  ASSERT_TRUE(model.ok()) << model.status();
  ASSERT_TRUE((*model)->Compile(optimizers::Sgd(0.05, 0.9)).ok());
  ASSERT_TRUE((*model)->Build().ok());
  Client* client = (*strategy)->client();
  ASSERT_NE(client, nullptr);
  EXPECT_DOUBLE_EQ(ServerLearningRate(*client), 0.05);
  std::vector<double> seen_by_servers;
  class Probe final : public Callback {
   public:
    Probe(Client* c, std::vector<double>* out) : c_(c), out_(out) {}
    Status OnEpochEnd(Model&, const EpochLogs&) override {
      out_->push_back(ServerLearningRate(*c_));
      return OkStatus();
    }

   private:
    Client* c_;
    std::vector<double>* out_;
  } probe(client, &seen_by_servers);
  LearningRateScheduler schedule([](int epoch, double) { return 0.05 / (1 << epoch); });
  FitOptions fit = Quiet(3);
  fit.callbacks = {&schedule, &probe};
  auto history = (*model)->Fit(SyntheticExamples(320, 1), fit);
  ASSERT_TRUE(history.ok()) << history.status();
  EXPECT_EQ(seen_by_servers, (std::vector<double>{0.05, 0.025, 0.0125}));
  EXPECT_DOUBLE_EQ((*model)->learning_rate(), 0.0125);
}

TEST(ModelOnServersTest, TwoWorkersStopTogetherAndEvaluateEveryExampleOnce) {
  LocalClusterOptions co;
  co.num_shards = 2;
  co.num_workers = 2;
  co.staleness = "0";
  auto cluster = LocalCluster::Start(co);
  ASSERT_TRUE(cluster.ok()) << cluster.status();
  auto train = SyntheticExamples(640, 5);
  auto test = SyntheticExamples(997, 6);  // 20 chunks of 50, the last one short
  struct Result {
    Status status;
    size_t epochs = 0;
    int stopped_epoch = -1;
    EvaluateResult eval;
    EvaluateResult alone;  // worker 0, every example by itself
    std::vector<Tensor> weights;
  };
  Result results[2];
  auto worker = [&](int w) {
    Result& r = results[w];
    auto run = [&]() -> Status {
      DV_ASSIGN_OR_RETURN(auto strategy, Connect(*cluster, w, 2));
      DV_ASSIGN_OR_RETURN(auto model, Model::Create(*strategy, SyntheticModel(), Options()));
      DV_RETURN_IF_ERROR(model->Compile(optimizers::Sgd(0.1), Loss(), {Metric::Accuracy()}));
      // Worker 0 wants to stop after the second epoch, worker 1 never: they
      // must agree (otherwise worker 1 would wait for worker 0's pushes).
      EarlyStoppingOptions eo;
      eo.monitor = "loss";
      eo.min_delta = 100;
      eo.patience = w == 0 ? 1 : 100;
      EarlyStopping stop(eo);
      FitOptions fit = Quiet(6);
      fit.callbacks = {&stop};
      DV_ASSIGN_OR_RETURN(History history, model->Fit(train, fit));
      r.epochs = history.epochs.size();
      r.stopped_epoch = stop.stopped_epoch();
      EvaluateOptions eo2;
      eo2.batch_size = 50;
      DV_ASSIGN_OR_RETURN(r.eval, model->Evaluate(*test, eo2));
      DV_ASSIGN_OR_RETURN(r.weights, model->GetWeights());
      DV_RETURN_IF_ERROR(model->SyncWorkers());
      if (w == 0) {
        eo2.across_workers = false;
        DV_ASSIGN_OR_RETURN(r.alone, model->Evaluate(*test, eo2));
      }
      return model->SyncWorkers();
    };
    r.status = run();
  };
  std::thread t1(worker, 1);
  worker(0);
  t1.join();
  ASSERT_TRUE(results[0].status.ok()) << results[0].status;
  ASSERT_TRUE(results[1].status.ok()) << results[1].status;
  for (const Result& r : results) {
    EXPECT_EQ(r.epochs, 2u);
    EXPECT_EQ(r.stopped_epoch, 1);
    EXPECT_EQ(r.eval.examples, 997);
  }
  // Job-wide totals, the same on both workers.
  EXPECT_EQ(results[0].eval.correct, results[1].eval.correct);
  EXPECT_EQ(results[0].eval.loss, results[1].eval.loss);
  EXPECT_EQ(results[0].alone.examples, 997);
  EXPECT_EQ(results[0].alone.correct, results[0].eval.correct);
  EXPECT_NEAR(results[0].alone.loss, results[0].eval.loss, 1e-5);
  // BSP: both workers read the same parameters.
  for (size_t i = 0; i < results[0].weights.size(); ++i)
    EXPECT_EQ(
        std::memcmp(results[0].weights[i].data_as<float>(), results[1].weights[i].data_as<float>(),
                    results[0].weights[i].num_bytes()),
        0);
  // One process with the same parameters over every example.
  ModelBuildOptions mo = Options();
  auto values = std::make_shared<std::vector<Tensor>>();
  for (const Tensor& t : results[0].weights) values->push_back(t.Clone());
  mo.initial_values = values;
  auto local = Model::CreateLocal(SyntheticModel(), mo);
  ASSERT_TRUE(local.ok()) << local.status();
  EvaluateOptions eo;
  eo.batch_size = 50;
  auto reference = (*local)->Evaluate(*test, eo);
  ASSERT_TRUE(reference.ok()) << reference.status();
  EXPECT_EQ(reference->examples, 997);
  EXPECT_EQ(reference->correct, results[0].eval.correct);
  EXPECT_NEAR(reference->loss, results[0].eval.loss, 1e-5);
}

TEST(ModelOnServersTest, ASavedModelPredictsTheSameBitsInAFreshProcessWithoutServers) {
  const std::string tool = testing::BinaryFromEnv("DISTVAL_PREDICT_SAVED_MODEL_BIN");
  ASSERT_FALSE(tool.empty());
  char tmpl[] = "/tmp/distval-model-it-XXXXXX";
  ASSERT_NE(mkdtemp(tmpl), nullptr);
  const std::string dir = tmpl;
  LocalClusterOptions co;
  co.num_shards = 2;
  auto cluster = LocalCluster::Start(co);
  ASSERT_TRUE(cluster.ok()) << cluster.status();
  auto strategy = Connect(*cluster, 0, 1, Partitioner::FixedShards(2));
  ASSERT_TRUE(strategy.ok()) << strategy.status();
  auto model = Model::Create(**strategy, SyntheticModel(), Options());
  ASSERT_TRUE(model.ok());
  ASSERT_TRUE((*model)->Compile(optimizers::Adam(0.01), Loss(), {Metric::Accuracy()}).ok());
  auto history = (*model)->Fit(SyntheticExamples(640, 7), Quiet(2));
  ASSERT_TRUE(history.ok()) << history.status();
  // The kernels are split over both servers (the strategy's partitioner).
  auto stats = (*strategy)->client()->Stats();
  ASSERT_TRUE(stats.ok());
  int shards_with_kernel = 0;
  for (const auto& shard : *stats)
    for (const auto& v : shard.variables) shards_with_kernel += v.name == "dense_0/kernel";
  EXPECT_EQ(shards_with_kernel, 2);

  auto examples = SyntheticExamples(300, 8);
  Tensor x(DType::kF32, Shape{300, testing::kSyntheticFeatures});
  std::memcpy(x.data_as<float>(), examples->features.data_as<float>(), x.num_bytes());
  auto mine = (*model)->Predict(x);
  ASSERT_TRUE(mine.ok()) << mine.status();
  ASSERT_TRUE((*model)->Save(dir + "/model").ok());
  const std::vector<SafetensorsEntry> in = {{"inputs", &x}};
  ASSERT_TRUE(WriteSafetensors(dir + "/inputs.safetensors", in).ok());
  testing::ProcessResult r = testing::RunProcess(
      {tool, dir + "/model", dir + "/inputs.safetensors", dir + "/outputs.safetensors"},
      dir + "/tool.log", 60);
  ASSERT_EQ(r.exit_code, 0) << r.output;
  auto out = ReadSafetensors(dir + "/outputs.safetensors");
  ASSERT_TRUE(out.ok()) << out.status();
  const Tensor* theirs = out->Find("outputs");
  ASSERT_NE(theirs, nullptr);
  ASSERT_EQ(theirs->shape(), mine->shape());
  EXPECT_EQ(std::memcmp(theirs->data_as<float>(), mine->data_as<float>(), mine->num_bytes()), 0);
  std::error_code ec;
  std::filesystem::remove_all(dir, ec);
}

// With co-located servers (shared memory on, the default) the gradients
// ApplyGradients pushes live in shared memory that the servers read where
// it is (Client::AllocatePushBuffer): one replica's own gradient buffer, or
// the sum of two replicas'. Training gives the same bits as without shared
// memory.
TEST(ModelOnServersTest, CoLocatedGradientsAreLentAndTrainTheSameBits) {
  auto examples = SyntheticExamples(300, 8);
  Tensor x(DType::kF32, Shape{300, testing::kSyntheticFeatures});
  std::memcpy(x.data_as<float>(), examples->features.data_as<float>(), x.num_bytes());
  for (int replicas : {1, 2}) {
    SCOPED_TRACE(std::to_string(replicas) + " replica(s)");
    std::vector<Tensor> predictions;
    for (bool shared_memory : {true, false}) {
      LocalClusterOptions co;  // BSP
      auto cluster = LocalCluster::Start(co);
      ASSERT_TRUE(cluster.ok()) << cluster.status();
      WorkerOptions o;
      o.ps_endpoints = cluster->endpoints();
      o.devices = {"cpu:0"};
      if (replicas == 2) o.devices.push_back("cpu:1");
      o.global_batch_size = 32;
      o.staleness = 0;
      o.client.shared_memory = shared_memory;
      auto strategy = ParameterServerStrategy::Create(o);
      ASSERT_TRUE(strategy.ok()) << strategy.status();
      // A 20 x 1024 kernel (80 KiB): large enough to go through shared
      // memory; the 1024 x 4 one (16 KiB) is not.
      Sequential net;
      net.Add(std::make_unique<Dense>(testing::kSyntheticFeatures, 1024))
          .Add(std::make_unique<ReLU>())
          .Add(std::make_unique<Dense>(1024, testing::kSyntheticClasses));
      auto model = Model::Create(**strategy, std::move(net), Options());
      ASSERT_TRUE(model.ok()) << model.status();
      ASSERT_TRUE((*model)->Compile(optimizers::Adam(0.01), Loss(), {Metric::Accuracy()}).ok());
      auto history = (*model)->Fit(SyntheticExamples(320, 7), Quiet(1));
      ASSERT_TRUE(history.ok()) << history.status();
      const int64_t lent = (*strategy)->client()->stats().shared_memory_frames_lent;
      if (shared_memory) {
        EXPECT_EQ(lent, 10);  // one kernel gradient per step, 320 / 32 steps
      } else {
        EXPECT_EQ(lent, 0);
      }
      auto out = (*model)->Predict(x);
      ASSERT_TRUE(out.ok()) << out.status();
      predictions.push_back(std::move(*out));
    }
    ASSERT_EQ(predictions[0].shape(), predictions[1].shape());
    EXPECT_EQ(std::memcmp(predictions[0].data_as<float>(), predictions[1].data_as<float>(),
                          predictions[0].num_bytes()),
              0);
  }
}

}  // namespace
}  // namespace distval
