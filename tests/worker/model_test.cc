// Model (Compile / Fit / Evaluate / Predict), callbacks and Save / LoadModel
// on in-process strategies (the local parameter store: the servers'
// optimizer code without the network), on synthetic data.
#include "distval/model.h"

#include <gtest/gtest.h>

#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <nlohmann/json.hpp>
#include <numeric>

#include "distval/callbacks.h"
#include "distval/devices.h"
#include "distval/evaluate.h"
#include "distval/local_parameter_store.h"
#include "distval/model_saving.h"
#include "distval/safetensors.h"
#include "strategy_training.h"

namespace distval {
namespace {

using testing::kSyntheticClasses;
using testing::kSyntheticFeatures;
using testing::SyntheticExamples;
using testing::SyntheticModel;

// An in-process strategy with `replicas` CPU replicas.
std::unique_ptr<ParameterServerStrategy> LocalStrategy(int replicas, int global_batch,
                                                       const protocol::OptimizerSpec& optimizer) {
  WorkerOptions o;
  o.devices.clear();
  for (int r = 0; r < replicas; ++r) o.devices.push_back("cpu:" + std::to_string(r));
  o.inventory = DeviceInventory{4, 0};
  o.global_batch_size = global_batch;
  o.optimizer = optimizer;
  auto s = ParameterServerStrategy::Create(o, NewLocalParameterStore());
  EXPECT_TRUE(s.ok()) << s.status();
  return s.ok() ? std::move(*s) : nullptr;
}

ModelBuildOptions SyntheticOptions(uint64_t seed = 3) {
  ModelBuildOptions mo;
  mo.input_features = kSyntheticFeatures;
  mo.seed = seed;
  return mo;
}

bool SameBits(const Tensor& a, const Tensor& b) {
  return a.shape() == b.shape() && a.dtype() == b.dtype() &&
         std::memcmp(a.data_as<float>(), b.data_as<float>(), a.num_bytes()) == 0;
}

// The first n rows of the examples' features.
Tensor Rows(const Examples& ex, int64_t n) {
  Tensor t(DType::kF32, Shape{n, ex.feature_size()});
  std::memcpy(t.data_as<float>(), ex.features.data_as<float>(), t.num_bytes());
  return t;
}

class TempDir {
 public:
  TempDir() {
    char tmpl[] = "/tmp/distval-model-test-XXXXXX";
    path_ = mkdtemp(tmpl);
  }
  ~TempDir() {
    std::error_code ec;
    std::filesystem::remove_all(path_, ec);
  }
  std::string operator/(const std::string& name) const { return path_ + "/" + name; }

 private:
  std::string path_;
};

// Records what Fit reports, and runs an optional hook per batch.
class Recorder final : public Callback {
 public:
  Status OnTrainBegin(Model&) override {
    ++train_begin;
    return OkStatus();
  }
  Status OnEpochBegin(Model&, int epoch) override {
    epoch_begins.push_back(epoch);
    return OkStatus();
  }
  Status OnBatchEnd(Model& model, const BatchLogs& logs) override {
    batches.push_back(logs);
    if (on_batch) on_batch(model, logs);
    return OkStatus();
  }
  Status OnEpochEnd(Model& model, const EpochLogs& logs) override {
    epochs.push_back(logs);
    auto w = model.GetWeights();
    if (!w.ok()) return w.status();
    weights.push_back(std::move(*w));
    return OkStatus();
  }
  Status OnTrainEnd(Model&, const History& h) override {
    ++train_end;
    history_epochs = h.epochs.size();
    return OkStatus();
  }

  int train_begin = 0, train_end = 0;
  size_t history_epochs = 0;
  std::vector<int> epoch_begins;
  std::vector<BatchLogs> batches;
  std::vector<EpochLogs> epochs;
  std::vector<std::vector<Tensor>> weights;  // after each epoch
  std::function<void(Model&, const BatchLogs&)> on_batch;
};

FitOptions Quiet() {
  FitOptions f;
  f.verbose = Verbosity::kSilent;
  return f;
}

// ---- Fit -----------------------------------------------------------------------

TEST(ModelFitTest, FitIsExactlyTheCustomTrainingLoop) {
  auto examples = SyntheticExamples(640, 5);
  const protocol::OptimizerSpec adam = optimizers::Adam(0.01);
  auto loop_strategy = LocalStrategy(2, 32, adam);
  auto fit_strategy = LocalStrategy(2, 32, adam);
  ASSERT_TRUE(loop_strategy && fit_strategy);
  auto reference = testing::TrainSteps(*loop_strategy, examples, 10, /*seed=*/3);
  ASSERT_TRUE(reference.ok()) << reference.status();

  auto model = Model::Create(*fit_strategy, SyntheticModel(), SyntheticOptions(3));
  ASSERT_TRUE(model.ok()) << model.status();
  ASSERT_TRUE(
      (*model)->Compile(adam, Loss::SparseCategoricalCrossentropy(), {Metric::Accuracy()}).ok());
  FitOptions fit = Quiet();
  fit.steps_per_epoch = 10;
  fit.input.seed = 3;
  auto history = (*model)->Fit(examples, fit);
  ASSERT_TRUE(history.ok()) << history.status();
  auto weights = (*model)->GetWeights();
  ASSERT_TRUE(weights.ok()) << weights.status();
  ASSERT_EQ(weights->size(), reference->size());
  for (size_t i = 0; i < weights->size(); ++i)
    EXPECT_TRUE(SameBits((*weights)[i], (*reference)[i])) << "parameter " << i;
  EXPECT_EQ(fit_strategy->stats().steps, 10);
}

TEST(ModelFitTest, CallbacksLogsAndHistory) {
  auto train = SyntheticExamples(512, 7);
  auto val = SyntheticExamples(300, 8);
  auto strategy = LocalStrategy(2, 32, optimizers::Adam(0.01));
  ASSERT_TRUE(strategy);
  auto model = Model::Create(*strategy, SyntheticModel(), SyntheticOptions());
  ASSERT_TRUE(model.ok()) << model.status();
  Model& m = **model;
  EXPECT_EQ(m.Fit(train, Quiet()).status().code(), StatusCode::kFailedPrecondition);
  ASSERT_TRUE(m.Compile(optimizers::Adam(0.01), Loss::SparseCategoricalCrossentropy(),
                        {Metric::Accuracy(), Metric::Mean("mean_loss")})
                  .ok());
  Recorder rec;
  FitOptions fit = Quiet();
  fit.epochs = 3;
  fit.validation_data = val;
  fit.callbacks = {&rec};
  auto history = m.Fit(train, fit);
  ASSERT_TRUE(history.ok()) << history.status();

  const int64_t steps = 512 / 32;  // 16 per epoch, 32 examples a step
  EXPECT_EQ(rec.train_begin, 1);
  EXPECT_EQ(rec.train_end, 1);
  EXPECT_EQ(rec.history_epochs, 3u);
  EXPECT_EQ(rec.epoch_begins, (std::vector<int>{0, 1, 2}));
  ASSERT_EQ(rec.batches.size(), static_cast<size_t>(3 * steps));
  for (size_t i = 0; i < rec.batches.size(); ++i) {
    const BatchLogs& b = rec.batches[i];
    EXPECT_EQ(b.epoch, static_cast<int>(i / steps));
    EXPECT_EQ(b.step, static_cast<int64_t>(i % steps));
    EXPECT_EQ(b.steps, steps);
    EXPECT_EQ(b.total_steps, static_cast<int64_t>(i + 1));
    EXPECT_EQ(b.examples, 32);
    EXPECT_EQ(b.epoch_examples, (b.step + 1) * 32);
    EXPECT_TRUE(std::isfinite(b.loss));
    EXPECT_EQ(b.stats.clock, static_cast<int64_t>(i + 1));
  }
  ASSERT_EQ(rec.epochs.size(), 3u);
  for (const EpochLogs& e : rec.epochs) {
    for (const char* key :
         {"loss", "accuracy", "mean_loss", "val_loss", "val_accuracy", "val_mean_loss"})
      EXPECT_TRUE(e.Get(key).has_value()) << key;
    EXPECT_EQ(e.values.size(), 6u);
    EXPECT_EQ(e.steps, steps);
    EXPECT_EQ(e.examples, steps * 32);
    // The Mean metric tracks the loss.
    EXPECT_DOUBLE_EQ(*e.Get("mean_loss"), *e.Get("loss"));
    EXPECT_GE(*e.Get("accuracy"), 0.0);
    EXPECT_LE(*e.Get("accuracy"), 1.0);
  }
  // The epoch's loss is the running loss at its last batch.
  EXPECT_DOUBLE_EQ(rec.batches.back().metrics.at("loss"), *rec.epochs.back().Get("loss"));
  // The history holds the epochs' logs; the training loss goes down.
  EXPECT_EQ(history->epochs, (std::vector<int>{0, 1, 2}));
  ASSERT_EQ(history->values.at("loss").size(), 3u);
  EXPECT_LT(history->values.at("loss")[2], history->values.at("loss")[0]);
  EXPECT_GE(*history->Last("val_accuracy"), 0.0);
  EXPECT_LE(*history->Last("val_accuracy"), 1.0);
  // Validation ran on the weights the model has after the last epoch.
  auto eval = m.Evaluate(*val);
  ASSERT_TRUE(eval.ok()) << eval.status();
  EXPECT_EQ(eval->examples, 300);
  EXPECT_DOUBLE_EQ(eval->loss, *history->Last("val_loss"));
  EXPECT_DOUBLE_EQ(eval->accuracy(), *history->Last("val_accuracy"));
  EXPECT_DOUBLE_EQ(eval->metrics.at("accuracy"), eval->accuracy());
}

TEST(ModelFitTest, FitChecksItsOptionsAndData) {
  auto strategy = LocalStrategy(1, 32, optimizers::Sgd(0.1));
  ASSERT_TRUE(strategy);
  auto model = Model::Create(*strategy, SyntheticModel(), SyntheticOptions());
  ASSERT_TRUE(model.ok());
  ASSERT_TRUE((*model)->Compile(optimizers::Sgd(0.1)).ok());
  auto train = SyntheticExamples(256, 1);
  FitOptions fit = Quiet();
  fit.epochs = 0;
  EXPECT_EQ((*model)->Fit(train, fit).status().code(), StatusCode::kInvalidArgument);
  fit.epochs = 1;
  fit.steps_per_epoch = 9;  // 256 / 32 = 8 steps
  Status s = (*model)->Fit(train, fit).status();
  EXPECT_EQ(s.code(), StatusCode::kInvalidArgument);
  EXPECT_NE(s.message().find("steps_per_epoch 9"), std::string::npos) << s;
  // Data with another feature size.
  Examples wide;
  wide.features = Tensor(DType::kF32, Shape{64, kSyntheticFeatures + 1});
  wide.labels.assign(64, 0);
  wide.file_sizes = {64};
  wide.num_classes = 1;
  s = (*model)->Fit(std::make_shared<const Examples>(std::move(wide)), Quiet()).status();
  EXPECT_EQ(s.code(), StatusCode::kInvalidArgument);
  EXPECT_NE(s.message().find("21 features, the model takes 20"), std::string::npos) << s;
}

TEST(ModelFitTest, StopTrainingFromABatchCallbackStopsAfterThatStep) {
  auto strategy = LocalStrategy(1, 32, optimizers::Sgd(0.1));
  ASSERT_TRUE(strategy);
  auto model = Model::Create(*strategy, SyntheticModel(), SyntheticOptions());
  ASSERT_TRUE(model.ok());
  ASSERT_TRUE((*model)->Compile(optimizers::Sgd(0.1)).ok());
  Recorder rec;
  rec.on_batch = [](Model& m, const BatchLogs& logs) {
    if (logs.step == 4) m.StopTraining();
  };
  FitOptions fit = Quiet();
  fit.epochs = 5;
  fit.callbacks = {&rec};
  auto history = (*model)->Fit(SyntheticExamples(512, 2), fit);
  ASSERT_TRUE(history.ok()) << history.status();
  EXPECT_EQ(rec.batches.size(), 5u);
  ASSERT_EQ(rec.epochs.size(), 1u);  // the epoch still ends (Keras)
  EXPECT_EQ(rec.epochs[0].steps, 5);
  EXPECT_EQ(history->epochs.size(), 1u);
  EXPECT_EQ(strategy->stats().steps, 5);
}

// ---- Callbacks ------------------------------------------------------------------

TEST(EarlyStoppingTest, StopsWhenTheMonitoredValueStopsImproving) {
  for (int patience : {1, 3}) {
    auto strategy = LocalStrategy(1, 32, optimizers::Sgd(0.1));
    ASSERT_TRUE(strategy);
    auto model = Model::Create(*strategy, SyntheticModel(), SyntheticOptions());
    ASSERT_TRUE(model.ok());
    ASSERT_TRUE((*model)->Compile(optimizers::Sgd(0.1)).ok());
    EarlyStoppingOptions eo;
    eo.monitor = "loss";
    eo.min_delta = 100;  // no epoch improves on the first by that much
    eo.patience = patience;
    EarlyStopping stop(eo);
    FitOptions fit = Quiet();
    fit.epochs = 10;
    fit.callbacks = {&stop};
    auto history = (*model)->Fit(SyntheticExamples(256, 2), fit);
    ASSERT_TRUE(history.ok()) << history.status();
    EXPECT_EQ(history->epochs.size(), static_cast<size_t>(patience + 1)) << patience;
    EXPECT_EQ(stop.stopped_epoch(), patience);
    EXPECT_TRUE((*model)->stop_training());
    EXPECT_EQ(strategy->stats().steps, (patience + 1) * 8);
  }
}

TEST(EarlyStoppingTest, ABaselineMustBeBeaten) {
  auto strategy = LocalStrategy(1, 32, optimizers::Sgd(0.1));
  ASSERT_TRUE(strategy);
  auto model = Model::Create(*strategy, SyntheticModel(), SyntheticOptions());
  ASSERT_TRUE(model.ok());
  ASSERT_TRUE((*model)->Compile(optimizers::Sgd(0.1)).ok());
  EarlyStoppingOptions eo;
  eo.monitor = "loss";
  eo.patience = 2;
  eo.baseline = 0.0;  // a cross-entropy is never below 0
  EarlyStopping stop(eo);
  FitOptions fit = Quiet();
  fit.epochs = 10;
  fit.callbacks = {&stop};
  auto history = (*model)->Fit(SyntheticExamples(256, 2), fit);
  ASSERT_TRUE(history.ok()) << history.status();
  EXPECT_EQ(history->epochs.size(), 2u);
  EXPECT_EQ(stop.stopped_epoch(), 1);
}

TEST(EarlyStoppingTest, KeepsTrainingWhileTheValueImproves) {
  auto strategy = LocalStrategy(1, 32, optimizers::Sgd(0.1));
  ASSERT_TRUE(strategy);
  auto model = Model::Create(*strategy, SyntheticModel(), SyntheticOptions());
  ASSERT_TRUE(model.ok());
  ASSERT_TRUE((*model)->Compile(optimizers::Sgd(0.1)).ok());
  EarlyStoppingOptions eo;
  eo.monitor = "loss";
  eo.patience = 2;
  EarlyStopping keep(eo);
  FitOptions fit = Quiet();
  fit.epochs = 4;
  fit.callbacks = {&keep};
  auto history = (*model)->Fit(SyntheticExamples(256, 2), fit);
  ASSERT_TRUE(history.ok()) << history.status();
  EXPECT_EQ(history->epochs.size(), 4u);
  EXPECT_EQ(keep.stopped_epoch(), -1);
  EXPECT_FALSE((*model)->stop_training());
}

TEST(EarlyStoppingTest, AMissingMonitorIsAnError) {
  auto strategy = LocalStrategy(1, 32, optimizers::Sgd(0.1));
  ASSERT_TRUE(strategy);
  auto model = Model::Create(*strategy, SyntheticModel(), SyntheticOptions());
  ASSERT_TRUE(model.ok());
  ASSERT_TRUE((*model)->Compile(optimizers::Sgd(0.1)).ok());
  EarlyStopping stop;  // val_loss, but no validation data
  FitOptions fit = Quiet();
  fit.callbacks = {&stop};
  Status s = (*model)->Fit(SyntheticExamples(256, 2), fit).status();
  EXPECT_EQ(s.code(), StatusCode::kInvalidArgument);
  EXPECT_NE(s.message().find("no 'val_loss' (they have: loss)"), std::string::npos) << s;
}

TEST(LearningRateSchedulerTest, TheNewRateReachesTheStoreAndItsOptimizer) {
  // SGD at 0.1 for epoch 0, then 0: the parameters must not move any more.
  auto strategy = LocalStrategy(2, 32, optimizers::Sgd(0.1));
  ASSERT_TRUE(strategy);
  auto model = Model::Create(*strategy, SyntheticModel(), SyntheticOptions());
  ASSERT_TRUE(model.ok());
  ASSERT_TRUE((*model)->Compile(optimizers::Sgd(0.1)).ok());
  auto initial = (*model)->GetWeights();
  ASSERT_TRUE(initial.ok());
  std::vector<std::pair<int, double>> calls;
  LearningRateScheduler schedule([&](int epoch, double lr) {
    calls.emplace_back(epoch, lr);
    return epoch == 0 ? lr : 0.0;
  });
  Recorder rec;
  FitOptions fit = Quiet();
  fit.epochs = 3;
  fit.callbacks = {&schedule, &rec};
  auto history = (*model)->Fit(SyntheticExamples(256, 4), fit);
  ASSERT_TRUE(history.ok()) << history.status();
  EXPECT_EQ(calls, (std::vector<std::pair<int, double>>{{0, 0.1}, {1, 0.1}, {2, 0.0}}));
  EXPECT_EQ((*model)->learning_rate(), 0.0);
  ASSERT_EQ(rec.weights.size(), 3u);
  for (size_t i = 0; i < initial->size(); ++i) {
    EXPECT_FALSE(SameBits(rec.weights[0][i], (*initial)[i])) << "epoch 0 trains, parameter " << i;
    EXPECT_TRUE(SameBits(rec.weights[1][i], rec.weights[0][i])) << "rate 0, parameter " << i;
    EXPECT_TRUE(SameBits(rec.weights[2][i], rec.weights[0][i])) << "rate 0, parameter " << i;
  }
  EXPECT_EQ(strategy->stats().steps, 24);  // the steps still ran

  LearningRateScheduler bad([](int, double) { return -1.0; });
  fit.callbacks = {&bad};
  EXPECT_EQ((*model)->Fit(SyntheticExamples(256, 4), fit).status().code(),
            StatusCode::kInvalidArgument);
}

// ---- Evaluate and Predict ---------------------------------------------------------

TEST(ModelEvaluateTest, MatchesAPlainForwardPassOverEveryExample) {
  auto strategy = LocalStrategy(2, 32, optimizers::Adam(0.01));
  ASSERT_TRUE(strategy);
  auto model = Model::Create(*strategy, SyntheticModel(), SyntheticOptions());
  ASSERT_TRUE(model.ok());
  ASSERT_TRUE((*model)
                  ->Compile(optimizers::Adam(0.01), Loss::SparseCategoricalCrossentropy(),
                            {Metric::Accuracy()})
                  .ok());
  ASSERT_TRUE((*model)->Fit(SyntheticExamples(256, 9), Quiet()).ok());
  auto test = SyntheticExamples(1001, 10);  // 4 chunks of 256, the last short
  auto eval = (*model)->Evaluate(*test);
  ASSERT_TRUE(eval.ok()) << eval.status();

  auto weights = (*model)->GetWeights();
  ASSERT_TRUE(weights.ok());
  auto backend = CreateBackend({DeviceKind::kCpu, 0});
  ASSERT_TRUE(backend.ok());
  Sequential net = SyntheticModel();
  ASSERT_TRUE(net.Build(backend->get(), 256, kSyntheticFeatures).ok());
  ASSERT_TRUE(net.SetParameters(*weights).ok());
  auto plain = Evaluate(net, *test, 256);
  ASSERT_TRUE(plain.ok()) << plain.status();
  EXPECT_EQ(eval->examples, 1001);
  EXPECT_EQ(eval->correct, plain->correct);
  EXPECT_NEAR(eval->loss, plain->mean_loss, 1e-9);
  EXPECT_DOUBLE_EQ(eval->metrics.at("accuracy"), plain->accuracy());

  EvaluateOptions limited;
  limited.limit = 300;
  limited.batch_size = 64;
  auto part = (*model)->Evaluate(*test, limited);
  ASSERT_TRUE(part.ok());
  EXPECT_EQ(part->examples, 300);
  limited.batch_size = 1000;  // above max_batch (256)
  EXPECT_EQ((*model)->Evaluate(*test, limited).status().code(), StatusCode::kInvalidArgument);
}

TEST(ModelPredictTest, DoesNotDependOnTheNumberOfReplicas) {
  auto test = SyntheticExamples(700, 11);
  const Tensor x = Rows(*test, 700);
  std::vector<Tensor> outs;
  std::vector<EvaluateResult> evals;
  for (int replicas : {1, 2}) {
    auto strategy = LocalStrategy(replicas, 32, optimizers::Sgd(0.1));
    ASSERT_TRUE(strategy);
    auto model = Model::Create(*strategy, SyntheticModel(), SyntheticOptions(21));
    ASSERT_TRUE(model.ok());
    auto y = (*model)->Predict(x);  // uncompiled: inference
    ASSERT_TRUE(y.ok()) << y.status();
    EXPECT_EQ(y->shape(), (Shape{700, kSyntheticClasses}));
    outs.push_back(std::move(*y));
    auto e = (*model)->Evaluate(*test);
    ASSERT_TRUE(e.ok()) << e.status();
    evals.push_back(*e);
  }
  EXPECT_TRUE(SameBits(outs[0], outs[1]));
  EXPECT_EQ(evals[0].correct, evals[1].correct);
  EXPECT_EQ(evals[0].examples, 700);
  EXPECT_NEAR(evals[0].loss, evals[1].loss, 1e-12);

  // The rows are the model's forward pass of the seeded initial values.
  auto backend = CreateBackend({DeviceKind::kCpu, 0});
  ASSERT_TRUE(backend.ok());
  Sequential net = SyntheticModel();
  ASSERT_TRUE(net.Build(backend->get(), 256, kSyntheticFeatures).ok());
  ASSERT_TRUE(net.SetParameters(net.InitialValues(21)).ok());
  auto in = (*backend)->Allocate(256 * kSyntheticFeatures);
  ASSERT_TRUE(in.ok());
  ASSERT_TRUE((*backend)->CopyToDevice(x.data_as<float>(), *in, 256 * kSyntheticFeatures).ok());
  ASSERT_TRUE(net.Forward(*in, 256).ok());
  std::vector<float> first(256 * kSyntheticClasses);
  ASSERT_TRUE((*backend)->CopyToHost(net.output(), first.data(), 256 * kSyntheticClasses).ok());
  EXPECT_EQ(std::memcmp(first.data(), outs[0].data_as<float>(), first.size() * 4), 0);
}

TEST(ModelPredictTest, ChecksItsInput) {
  auto model = Model::CreateLocal(SyntheticModel(), SyntheticOptions());
  ASSERT_TRUE(model.ok()) << model.status();
  Status s = (*model)->Predict(Tensor(DType::kF32, Shape{3, 7})).status();
  EXPECT_EQ(s.code(), StatusCode::kInvalidArgument);
  EXPECT_NE(s.message().find("f32[n, 20]"), std::string::npos) << s;
  auto empty = (*model)->Predict(Tensor(DType::kF32, Shape{0, kSyntheticFeatures}));
  ASSERT_TRUE(empty.ok()) << empty.status();
  EXPECT_EQ(empty->shape(), (Shape{0, kSyntheticClasses}));
}

// ---- Compile -----------------------------------------------------------------------------

TEST(ModelCompileTest, ValidatesAndKeepsTheServersOptimizer) {
  auto model = Model::CreateLocal(SyntheticModel(), SyntheticOptions());
  ASSERT_TRUE(model.ok()) << model.status();
  Model& m = **model;
  EXPECT_EQ(m.Compile(optimizers::Sgd(0.1), Loss::SparseCategoricalCrossentropy(false)).code(),
            StatusCode::kUnimplemented);
  EXPECT_EQ(m.Compile(optimizers::Sgd(0.1), Loss(), {Metric::Accuracy("loss")}).code(),
            StatusCode::kInvalidArgument);
  EXPECT_EQ(m.Compile(optimizers::Sgd(0.1), Loss(), {Metric::Accuracy("val_acc")}).code(),
            StatusCode::kInvalidArgument);
  EXPECT_EQ(
      m.Compile(optimizers::Sgd(0.1), Loss(), {Metric::Accuracy(), Metric::Accuracy()}).code(),
      StatusCode::kInvalidArgument);
  EXPECT_EQ(m.SetLearningRate(0.5).code(), StatusCode::kFailedPrecondition);  // not compiled
  ASSERT_TRUE(m.Compile(optimizers::Adam(0.002)).ok());
  // Before Build a new rate is the one the variables are created with.
  ASSERT_TRUE(m.SetLearningRate(0.003).ok());
  EXPECT_EQ(m.compile_options()->optimizer.learning_rate, 0.003);
  ASSERT_TRUE(m.Build().ok());
  EXPECT_EQ(m.Compile(optimizers::Sgd(0.1)).code(), StatusCode::kFailedPrecondition);
  // The same optimizer with other metrics is fine after Build.
  EXPECT_TRUE(m.Compile(m.compile_options()->optimizer, Loss(), {Metric::Accuracy()}).ok());
  EXPECT_EQ(m.SetLearningRate(-1).code(), StatusCode::kInvalidArgument);
}

// ---- Saving and loading ------------------------------------------------------------------------

// y = factor * x: a user layer without parameters.
class ScaleLayer final : public Layer {
 public:
  explicit ScaleLayer(float factor, bool describable = true)
      : factor_(factor), describable_(describable) {}
  std::string_view type() const override { return "scale"; }
  std::unique_ptr<Layer> Clone() const override {
    auto c = std::make_unique<ScaleLayer>(factor_, describable_);
    c->set_name(name());
    return c;
  }
  std::optional<std::string> GetConfig() const override {
    if (!describable_) return std::nullopt;
    return nlohmann::json{{"factor", factor_}}.dump();
  }
  StatusOr<int> OutputFeatures(int input_features) const override { return input_features; }
  std::vector<ParameterSpec> ParameterSpecs() const override { return {}; }
  std::vector<Tensor> InitialValues(uint64_t) const override { return {}; }
  Status Build(Backend* backend, int max_batch, int input_features) override {
    DV_RETURN_IF_ERROR(BeginBuild(backend, max_batch));
    features_ = input_features;
    DV_ASSIGN_OR_RETURN(output_, backend->Allocate(int64_t{max_batch} * features_));
    DV_ASSIGN_OR_RETURN(input_grad_, backend->Allocate(int64_t{max_batch} * features_));
    return OkStatus();
  }
  Status Forward(const DeviceBuffer& input, int batch) override {
    DV_RETURN_IF_ERROR(CheckBatch("scale", batch));
    DV_RETURN_IF_ERROR(backend_->Copy(input, output_, int64_t{batch} * features_));
    return backend_->Scale(factor_, output_, int64_t{batch} * features_);
  }
  const DeviceBuffer& output() const override { return output_; }
  Status Backward(const DeviceBuffer&, const DeviceBuffer& grad_output, int batch,
                  bool need_input_grad) override {
    if (!need_input_grad) return OkStatus();
    DV_RETURN_IF_ERROR(backend_->Copy(grad_output, input_grad_, int64_t{batch} * features_));
    return backend_->Scale(factor_, input_grad_, int64_t{batch} * features_);
  }
  const DeviceBuffer& input_grad() const override { return input_grad_; }
  std::vector<Parameter> Parameters() override { return {}; }

 private:
  float factor_;
  bool describable_;
  int features_ = 0;
  DeviceBuffer output_, input_grad_;
};

Sequential ScaledModel(bool describable) {
  Sequential net;
  net.Add(std::make_unique<Dense>(kSyntheticFeatures, 8))
      .Add(std::make_unique<ScaleLayer>(0.5f, describable))
      .Add(std::make_unique<ReLU>())
      .Add(std::make_unique<Dense>(8, kSyntheticClasses));
  return net;
}

TEST(ModelSavingTest, SaveAndLoadGiveTheSamePredictionsBitForBit) {
  TempDir dir;
  auto train = SyntheticExamples(512, 12);
  const Tensor x = Rows(*SyntheticExamples(300, 13), 300);
  auto strategy = LocalStrategy(2, 32, optimizers::Adam(0.01));
  ASSERT_TRUE(strategy);
  auto model = Model::Create(*strategy, SyntheticModel(), SyntheticOptions());
  ASSERT_TRUE(model.ok());
  ASSERT_TRUE((*model)->Compile(optimizers::Adam(0.01), Loss(), {Metric::Accuracy()}).ok());
  LearningRateScheduler halve([](int epoch, double lr) { return epoch == 0 ? lr : lr / 2; });
  FitOptions fit = Quiet();
  fit.epochs = 2;
  fit.callbacks = {&halve};
  ASSERT_TRUE((*model)->Fit(train, fit).ok());
  auto before = (*model)->Predict(x);
  ASSERT_TRUE(before.ok());
  auto weights = (*model)->GetWeights();
  ASSERT_TRUE(weights.ok());
  const std::string path = dir / "saved";
  ASSERT_TRUE((*model)->Save(path).ok());

  // model.json: the architecture, the compile settings, the current rate.
  std::ifstream f(path + "/model.json");
  const nlohmann::json arch = nlohmann::json::parse(f);
  EXPECT_EQ(arch["format"], "distval.model");
  EXPECT_EQ(arch["version"], 1);
  EXPECT_EQ(arch["input_features"], kSyntheticFeatures);
  EXPECT_EQ(arch["layers"].size(), 3u);
  EXPECT_EQ(arch["layers"][0]["config"], (nlohmann::json{{"in", 20}, {"out", 16}}));
  EXPECT_EQ(arch["layers"][1]["type"], "relu");
  EXPECT_EQ(arch["compile"]["optimizer"]["kind"], "adam");
  EXPECT_EQ(arch["compile"]["metrics"][0]["kind"], "accuracy");
  EXPECT_DOUBLE_EQ(arch["learning_rate"].get<double>(), 0.005);
  // variables.safetensors: every parameter as the store held it.
  auto file = ReadSafetensors(path + "/variables.safetensors");
  ASSERT_TRUE(file.ok()) << file.status();
  ASSERT_EQ(file->tensors.size(), 4u);
  EXPECT_EQ(file->tensors[0].first, "dense_0/kernel");
  for (size_t i = 0; i < 4; ++i) EXPECT_TRUE(SameBits(file->tensors[i].second, (*weights)[i]));
  EXPECT_EQ(nlohmann::json::parse(file->metadata.at("model")), arch);
  // No temporary files are left behind.
  int files = 0;
  for (const auto& e : std::filesystem::directory_iterator(path)) files += e.is_regular_file();
  EXPECT_EQ(files, 2);

  // Local inference (its own in-process strategy, one replica).
  auto local = LoadModel(path);
  ASSERT_TRUE(local.ok()) << local.status();
  auto after = (*local)->Predict(x);
  ASSERT_TRUE(after.ok());
  EXPECT_TRUE(SameBits(*after, *before));
  ASSERT_TRUE((*local)->compiled());
  EXPECT_EQ((*local)->compile_options()->optimizer.kind, protocol::OptimizerKind::kAdam);
  EXPECT_DOUBLE_EQ((*local)->learning_rate(), 0.005);
  ASSERT_EQ((*local)->compile_options()->metrics.size(), 1u);
  // The safetensors file alone describes the model.
  auto single = LoadModel(path + "/variables.safetensors");
  ASSERT_TRUE(single.ok()) << single.status();
  auto single_out = (*single)->Predict(x);
  ASSERT_TRUE(single_out.ok());
  EXPECT_TRUE(SameBits(*single_out, *before));
  // Under a strategy: new variables with the saved initial values; trains on.
  LoadOptions lo;
  lo.strategy = strategy.get();
  lo.name_prefix = "restored/";
  auto restored = LoadModel(path, lo);
  ASSERT_TRUE(restored.ok()) << restored.status();
  auto restored_out = (*restored)->Predict(x);
  ASSERT_TRUE(restored_out.ok());
  EXPECT_TRUE(SameBits(*restored_out, *before));
  auto more = (*restored)->Fit(train, Quiet());
  ASSERT_TRUE(more.ok()) << more.status();
  auto moved = (*restored)->Predict(x);
  ASSERT_TRUE(moved.ok());
  EXPECT_FALSE(SameBits(*moved, *before));
  // The original model's variables were not touched by the restored one.
  auto original = (*model)->Predict(x);
  ASSERT_TRUE(original.ok());
  EXPECT_TRUE(SameBits(*original, *before));
}

TEST(ModelSavingTest, UserLayersLoadThroughARegistry) {
  TempDir dir;
  auto model = Model::CreateLocal(ScaledModel(true), SyntheticOptions());
  ASSERT_TRUE(model.ok()) << model.status();
  const Tensor x = Rows(*SyntheticExamples(50, 14), 50);
  auto before = (*model)->Predict(x);
  ASSERT_TRUE(before.ok()) << before.status();
  ASSERT_TRUE((*model)->Save(dir / "m").ok());
  auto missing = LoadModel(dir / "m");
  EXPECT_EQ(missing.status().code(), StatusCode::kNotFound);
  EXPECT_NE(missing.status().message().find("no layer type 'scale'"), std::string::npos)
      << missing.status();
  LayerRegistry registry = LayerRegistry::Builtins();
  ASSERT_TRUE(registry
                  .Register("scale",
                            [](const nlohmann::json& c) -> StatusOr<std::unique_ptr<Layer>> {
                              return std::unique_ptr<Layer>(
                                  std::make_unique<ScaleLayer>(c.at("factor").get<float>()));
                            })
                  .ok());
  EXPECT_EQ(registry.Register("dense", nullptr).code(), StatusCode::kInvalidArgument);
  LoadOptions lo;
  lo.layers = &registry;
  auto loaded = LoadModel(dir / "m", lo);
  ASSERT_TRUE(loaded.ok()) << loaded.status();
  EXPECT_FALSE((*loaded)->compiled());  // saved uncompiled
  auto after = (*loaded)->Predict(x);
  ASSERT_TRUE(after.ok());
  EXPECT_TRUE(SameBits(*after, *before));
  EXPECT_EQ((*loaded)->layers().layer(1).name(), "scale_0");
}

TEST(ModelSavingTest, ALayerWithoutConfigCannotBeSaved) {
  TempDir dir;
  auto model = Model::CreateLocal(ScaledModel(false), SyntheticOptions());
  ASSERT_TRUE(model.ok()) << model.status();
  Status s = (*model)->Save(dir / "m");
  EXPECT_EQ(s.code(), StatusCode::kUnimplemented);
  EXPECT_NE(s.message().find("layer 'scale_0'"), std::string::npos) << s;
}

TEST(ModelSavingTest, LoadRejectsMissingAndMalformedFiles) {
  TempDir dir;
  EXPECT_EQ(LoadModel(dir / "nothing").status().code(), StatusCode::kNotFound);
  auto model = Model::CreateLocal(SyntheticModel(), SyntheticOptions());
  ASSERT_TRUE(model.ok());
  const std::string path = dir / "m";
  ASSERT_TRUE((*model)->Save(path).ok());
  const std::string st_path = path + "/variables.safetensors";
  const std::string bytes = [&] {
    std::ifstream f(st_path, std::ios::binary);
    return std::string(std::istreambuf_iterator<char>(f), {});
  }();
  auto write = [](const std::string& p, const std::string& content) {
    std::ofstream f(p, std::ios::binary | std::ios::trunc);
    f << content;
  };
  // A truncated variables file.
  write(st_path, bytes.substr(0, bytes.size() - 4));
  EXPECT_EQ(LoadModel(path).status().code(), StatusCode::kDataLoss);
  write(st_path, bytes);
  ASSERT_TRUE(LoadModel(path).ok());
  // model.json that is not a distval model / not JSON / of another version.
  std::ifstream jf(path + "/model.json");
  nlohmann::json arch = nlohmann::json::parse(jf);
  nlohmann::json other = arch;
  other["format"] = "keras";
  write(path + "/model.json", other.dump());
  EXPECT_EQ(LoadModel(path).status().code(), StatusCode::kInvalidArgument);
  other = arch;
  other["version"] = 99;
  write(path + "/model.json", other.dump());
  Status s = LoadModel(path).status();
  EXPECT_EQ(s.code(), StatusCode::kInvalidArgument);
  EXPECT_NE(s.message().find("unsupported version 99"), std::string::npos) << s;
  write(path + "/model.json", "{ not json");
  EXPECT_EQ(LoadModel(path).status().code(), StatusCode::kDataLoss);
  // A layer whose shapes no longer match the saved tensors.
  other = arch;
  other["layers"][0]["config"]["out"] = 17;
  other["layers"][2]["config"]["in"] = 17;
  other["parameters"][0]["shape"] = {20, 17};
  write(path + "/model.json", other.dump());
  s = LoadModel(path).status();
  EXPECT_EQ(s.code(), StatusCode::kDataLoss);
  EXPECT_NE(s.message().find("tensor 'dense_0/kernel' is [20,16]"), std::string::npos) << s;
  // A field of the wrong type.
  other = arch;
  other["input_features"] = "twenty";
  write(path + "/model.json", other.dump());
  EXPECT_EQ(LoadModel(path).status().code(), StatusCode::kDataLoss);
}

}  // namespace
}  // namespace distval
