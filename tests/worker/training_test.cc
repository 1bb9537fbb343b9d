// End-to-end sanity of data + layers + CPU backend: a small MLP trained with
// plain local SGD (no parameter server) on the first 2000 Fashion-MNIST
// training examples must beat chance by far on the 10000 test examples.
#include <gtest/gtest.h>

#include <cstdio>
#include <filesystem>
#include <memory>

#include "distval/dataset.h"
#include "distval/devices.h"
#include "distval/evaluate.h"
#include "distval/float_env.h"
#include "distval/input_pipeline.h"
#include "distval/layers.h"

namespace distval {
namespace {

TEST(TrainingTest, MlpLearnsFashionMnistWithLocalSgd) {
  if (!std::filesystem::exists(FashionMnistFiles(kDefaultFashionMnistDir, Split::kTest).images))
    GTEST_SKIP() << "Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)";
  SetFlushDenormalsToZero();
  auto train = LoadFashionMnist(kDefaultFashionMnistDir, Split::kTrain, /*limit=*/2000);
  ASSERT_TRUE(train.ok()) << train.status();
  auto test = LoadFashionMnist(kDefaultFashionMnistDir, Split::kTest);
  ASSERT_TRUE(test.ok()) << test.status();
  auto examples = std::make_shared<const Examples>(std::move(*train));

  InputOptions opt;
  opt.global_batch_size = 32;
  opt.seed = 1;
  auto data = DistributedDataset::Create(examples, InputContext{}, opt);
  ASSERT_TRUE(data.ok()) << data.status();
  ASSERT_EQ(data->steps_per_epoch(), 62);

  auto backend = CreateBackend({DeviceKind::kCpu, 0});
  ASSERT_TRUE(backend.ok());
  Backend& be = **backend;
  Sequential model;
  model.Add(std::make_unique<Dense>(784, 128))
      .Add(std::make_unique<ReLU>())
      .Add(std::make_unique<Dense>(128, 10));
  const int eval_batch = 500;
  ASSERT_TRUE(model.Build(&be, eval_batch, 784).ok());
  ASSERT_TRUE(model.SetParameters(model.InitialValues(/*seed=*/1)).ok());
  SoftmaxCrossEntropy head;
  ASSERT_TRUE(head.Build(&be, data->per_replica_batch(), 10).ok());
  auto batch = DeviceBatch::Create(&be, data->per_replica_batch(), 784);
  ASSERT_TRUE(batch.ok());

  auto before = Evaluate(model, *test, eval_batch);
  ASSERT_TRUE(before.ok()) << before.status();
  EXPECT_EQ(before->examples, 10000);
  EXPECT_LT(before->accuracy(), 0.3);

  const float lr = 0.1f;
  const EpochPlan plan = data->PlanEpoch(0);
  double first_loss = 0, last_loss = 0;
  for (int64_t step = 0; step < plan.num_steps(); ++step) {
    ASSERT_TRUE(batch->Load(*examples, plan.ReplicaBatch(step, 0)).ok());
    const int b = batch->size();
    ASSERT_TRUE(model.Forward(batch->features(), b).ok());
    ASSERT_TRUE(head.Forward(model.output(), batch->labels(), b).ok());
    ASSERT_TRUE(head.Backward(batch->labels(), b).ok());
    ASSERT_TRUE(model.Backward(batch->features(), head.grad(), b).ok());
    for (const Parameter& p : model.Parameters())
      ASSERT_TRUE(be.Axpy(-lr, *p.grad, *p.value, p.shape.num_elements()).ok());
    const double loss = *head.LossValue();
    if (step < 5) first_loss += loss / 5;
    if (step >= plan.num_steps() - 5) last_loss += loss / 5;
  }
  EXPECT_LT(last_loss, 0.7 * first_loss);

  auto after = Evaluate(model, *test, eval_batch);
  ASSERT_TRUE(after.ok()) << after.status();
  EXPECT_GT(after->accuracy(), 0.6) << "loss " << after->mean_loss;
  EXPECT_LT(after->mean_loss, before->mean_loss);
  RecordProperty("test_accuracy", std::to_string(after->accuracy()));
  std::printf("test accuracy after 1 epoch on 2000 examples: %.4f (before %.4f), loss %.4f\n",
              after->accuracy(), before->accuracy(), after->mean_loss);
}

}  // namespace
}  // namespace distval
