// Layers: gradients against finite differences on every backend
// (conformance style), initialization, naming, build errors, and replicas
// training in parallel threads.
#include "distval/layers.h"

#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <functional>
#include <random>
#include <thread>
#include <vector>

#include "backend_test_util.h"

namespace distval {
namespace {

using testing::BackendTest;

std::vector<float> RandomVector(size_t n, uint32_t seed, float lo = -1.0f, float hi = 1.0f) {
  std::mt19937 rng(seed);
  std::uniform_real_distribution<float> dist(lo, hi);
  std::vector<float> v(n);
  for (float& x : v) x = dist(rng);
  return v;
}

class LayerGradientTest : public BackendTest {
 protected:
  // Central differences of `loss` with respect to every element of `buffer`
  // (a device buffer of n floats), perturbing through host copies.
  std::vector<double> NumericGradient(DeviceBuffer& buffer, int64_t n,
                                      const std::function<double()>& loss, float eps) {
    std::vector<float> values = Download(buffer, n);
    std::vector<double> grad(static_cast<size_t>(n));
    for (int64_t i = 0; i < n; ++i) {
      const float saved = values[i];
      values[i] = saved + eps;
      EXPECT_TRUE(be().CopyToDevice(values.data(), buffer, n).ok());
      const double plus = loss();
      values[i] = saved - eps;
      EXPECT_TRUE(be().CopyToDevice(values.data(), buffer, n).ok());
      const double minus = loss();
      values[i] = saved;
      EXPECT_TRUE(be().CopyToDevice(values.data(), buffer, n).ok());
      grad[i] = (plus - minus) / (2.0 * eps);
    }
    return grad;
  }

  void ExpectGradientsClose(const std::vector<float>& analytic, const std::vector<double>& numeric,
                            const std::string& what) {
    ASSERT_EQ(analytic.size(), numeric.size()) << what;
    double max_abs = 0.0;
    for (size_t i = 0; i < numeric.size(); ++i) {
      max_abs = std::max(max_abs, std::abs(numeric[i]));
      EXPECT_NEAR(analytic[i], numeric[i], 2e-3 + 1e-2 * std::abs(numeric[i]))
          << what << " element " << i;
    }
    // The check is only meaningful when the gradient is not ~zero.
    EXPECT_GT(max_abs, 1e-2) << what;
  }

  // sum(y[0:n] * r) in double, y downloaded from the device.
  double Dot(const DeviceBuffer& y, const std::vector<float>& r) {
    const auto yh = Download(y, static_cast<int64_t>(r.size()));
    double s = 0.0;
    for (size_t i = 0; i < r.size(); ++i) s += double{yh[i]} * r[i];
    return s;
  }
};

TEST_P(LayerGradientTest, DenseMatchesFiniteDifferences) {
  const int in = 5, out = 4, batch = 3;
  Dense dense(in, out);
  dense.set_name("dense_0");
  ASSERT_TRUE(dense.Build(&be(), /*max_batch=*/4, in).ok());
  std::vector<Parameter> params = dense.Parameters();
  ASSERT_EQ(params.size(), 2u);
  ASSERT_TRUE(be().CopyToDevice(RandomVector(in * out, 1).data(), *params[0].value, in * out).ok());
  ASSERT_TRUE(be().CopyToDevice(RandomVector(out, 2).data(), *params[1].value, out).ok());
  DeviceBuffer x = Upload(RandomVector(batch * in, 3));
  // L = sum(y * r): dL/dy = r.
  const auto r = RandomVector(batch * out, 4);
  DeviceBuffer dy = Upload(r);
  auto loss = [&] {
    EXPECT_TRUE(dense.Forward(x, batch).ok());
    return Dot(dense.output(), r);
  };
  ASSERT_TRUE(dense.Forward(x, batch).ok());
  ASSERT_TRUE(dense.Backward(x, dy, batch, /*need_input_grad=*/true).ok());
  const auto kernel_grad = Download(*params[0].grad);
  const auto bias_grad = Download(*params[1].grad);
  const auto input_grad = Download(dense.input_grad(), batch * in);

  ExpectGradientsClose(kernel_grad, NumericGradient(*params[0].value, in * out, loss, 1e-2f),
                       "kernel");
  ExpectGradientsClose(bias_grad, NumericGradient(*params[1].value, out, loss, 1e-2f), "bias");
  ExpectGradientsClose(input_grad, NumericGradient(x, batch * in, loss, 1e-2f), "input");
}

TEST_P(LayerGradientTest, ReluMatchesFiniteDifferences) {
  const int features = 6, batch = 2;
  ReLU relu;
  relu.set_name("relu_0");
  ASSERT_TRUE(relu.Build(&be(), batch, features).ok());
  // Inputs away from the kink at 0 (|x| >= 0.1 > eps), both signs.
  auto xs = RandomVector(batch * features, 5, 0.1f, 1.0f);
  for (size_t i = 0; i < xs.size(); i += 2) xs[i] = -xs[i];
  DeviceBuffer x = Upload(xs);
  const auto r = RandomVector(batch * features, 6);
  DeviceBuffer dy = Upload(r);
  auto loss = [&] {
    EXPECT_TRUE(relu.Forward(x, batch).ok());
    return Dot(relu.output(), r);
  };
  ASSERT_TRUE(relu.Forward(x, batch).ok());
  ASSERT_TRUE(relu.Backward(x, dy, batch, true).ok());
  const auto dx = Download(relu.input_grad(), batch * features);
  ExpectGradientsClose(dx, NumericGradient(x, batch * features, loss, 1e-2f), "relu input");
  for (size_t i = 0; i < xs.size(); i += 2) EXPECT_EQ(dx[i], 0.0f) << "negative input " << i;
}

TEST_P(LayerGradientTest, SoftmaxCrossEntropyMatchesFiniteDifferences) {
  const int batch = 4, classes = 5;
  SoftmaxCrossEntropy head;
  ASSERT_TRUE(head.Build(&be(), batch, classes).ok());
  DeviceBuffer logits = Upload(RandomVector(batch * classes, 7, -2.0f, 2.0f));
  DeviceBuffer labels = UploadLabels({0, 3, 4, 3});
  auto loss = [&]() -> double {
    EXPECT_TRUE(head.Forward(logits, labels, batch).ok());
    auto v = head.LossValue();
    EXPECT_TRUE(v.ok());
    return *v;
  };
  ASSERT_TRUE(head.Forward(logits, labels, batch).ok());
  ASSERT_TRUE(head.Backward(labels, batch).ok());
  const auto grad = Download(head.grad(), batch * classes);
  ExpectGradientsClose(grad, NumericGradient(logits, batch * classes, loss, 1e-2f), "logits");
}

TEST_P(LayerGradientTest, TwoLayerSequentialMatchesFiniteDifferences) {
  const int in = 6, hidden = 5, classes = 3, batch = 4;
  Sequential model;
  model.Add(std::make_unique<Dense>(in, hidden))
      .Add(std::make_unique<ReLU>())
      .Add(std::make_unique<Dense>(hidden, classes));
  ASSERT_TRUE(model.Build(&be(), batch, in).ok());
  std::vector<Tensor> init = model.InitialValues(/*seed=*/11);
  // Non-zero biases so their gradients are exercised on a generic point.
  for (size_t i = 1; i < init.size(); i += 2) {
    const auto b = RandomVector(static_cast<size_t>(init[i].num_elements()), 20 + i, -0.3f, 0.3f);
    std::copy(b.begin(), b.end(), init[i].data_as<float>());
  }
  ASSERT_TRUE(model.SetParameters(init).ok());
  SoftmaxCrossEntropy head;
  ASSERT_TRUE(head.Build(&be(), batch, classes).ok());
  DeviceBuffer x = Upload(RandomVector(batch * in, 8, -2.0f, 2.0f));
  DeviceBuffer labels = UploadLabels({2, 0, 1, 2});
  auto loss = [&]() -> double {
    EXPECT_TRUE(model.Forward(x, batch).ok());
    EXPECT_TRUE(head.Forward(model.output(), labels, batch).ok());
    return *head.LossValue();
  };
  loss();
  ASSERT_TRUE(head.Backward(labels, batch).ok());
  ASSERT_TRUE(model.Backward(x, head.grad(), batch).ok());
  auto grads = model.GetGradients();
  ASSERT_TRUE(grads.ok()) << grads.status();
  std::vector<Parameter> params = model.Parameters();
  ASSERT_EQ(params.size(), 4u);
  for (size_t i = 0; i < params.size(); ++i) {
    const Tensor& g = (*grads)[i];
    std::vector<float> analytic(g.data_as<float>(), g.data_as<float>() + g.num_elements());
    ExpectGradientsClose(analytic, NumericGradient(*params[i].value, g.num_elements(), loss, 1e-3f),
                         params[i].name);
  }
}

INSTANTIATE_TEST_SUITE_P(AllBackends, LayerGradientTest,
                         ::testing::ValuesIn(testing::ConformanceDevices()),
                         testing::DeviceParamName);

Sequential Mlp() {
  Sequential model;
  model.Add(std::make_unique<Dense>(784, 32))
      .Add(std::make_unique<ReLU>())
      .Add(std::make_unique<Dense>(32, 16))
      .Add(std::make_unique<ReLU>())
      .Add(std::make_unique<Dense>(16, 10));
  return model;
}

TEST(SequentialTest, NamesShapesAndCounts) {
  Sequential model = Mlp();
  EXPECT_EQ(model.layer(0).name(), "dense_0");
  EXPECT_EQ(model.layer(1).name(), "relu_0");
  EXPECT_EQ(model.layer(3).name(), "relu_1");
  EXPECT_EQ(model.layer(4).name(), "dense_2");
  std::vector<ParameterSpec> specs = model.ParameterSpecs();
  ASSERT_EQ(specs.size(), 6u);
  EXPECT_EQ(specs[0].name, "dense_0/kernel");
  EXPECT_EQ(specs[0].shape, (Shape{784, 32}));
  EXPECT_EQ(specs[1].name, "dense_0/bias");
  EXPECT_EQ(specs[1].shape, (Shape{32}));
  EXPECT_EQ(specs[5].name, "dense_2/bias");
  EXPECT_EQ(model.NumParameters(), 784 * 32 + 32 + 32 * 16 + 16 + 16 * 10 + 10);
  auto out = model.OutputFeatures(784);
  ASSERT_TRUE(out.ok());
  EXPECT_EQ(*out, 10);
  // The reference MLP of the design notes has 235,146 parameters.
  Sequential big;
  big.Add(std::make_unique<Dense>(784, 256))
      .Add(std::make_unique<ReLU>())
      .Add(std::make_unique<Dense>(256, 128))
      .Add(std::make_unique<ReLU>())
      .Add(std::make_unique<Dense>(128, 10));
  EXPECT_EQ(big.NumParameters(), 235146);
}

TEST(SequentialTest, InitialValuesAreDeterministicGlorotUniform) {
  Sequential model = Mlp();
  std::vector<Tensor> a = model.InitialValues(42), b = model.Clone()->InitialValues(42),
                      c = model.InitialValues(43);
  ASSERT_EQ(a.size(), 6u);
  for (size_t i = 0; i < a.size(); ++i) {
    ASSERT_EQ(a[i].shape(), b[i].shape());
    EXPECT_EQ(std::memcmp(a[i].data(), b[i].data(), a[i].num_bytes()), 0) << i;
  }
  EXPECT_NE(std::memcmp(a[0].data(), c[0].data(), a[0].num_bytes()), 0);
  // Kernels of different layers are not the same stream.
  EXPECT_NE(a[0].data_as<float>()[0], a[2].data_as<float>()[0]);
  const float limit = std::sqrt(6.0f / (784 + 32));
  const float* k = a[0].data_as<float>();
  float lo = 1, hi = -1;
  double mean = 0;
  for (int64_t i = 0; i < a[0].num_elements(); ++i) {
    lo = std::min(lo, k[i]);
    hi = std::max(hi, k[i]);
    mean += k[i];
  }
  mean /= a[0].num_elements();
  EXPECT_GE(lo, -limit);
  EXPECT_LE(hi, limit);
  EXPECT_LT(lo, -0.99f * limit);  // fills the range
  EXPECT_GT(hi, 0.99f * limit);
  EXPECT_NEAR(mean, 0.0, 0.01 * limit);
  for (int64_t i = 0; i < a[1].num_elements(); ++i) EXPECT_EQ(a[1].data_as<float>()[i], 0.0f);
}

TEST(SequentialTest, BuildErrorsNameTheProblem) {
  auto backend = CreateBackend({DeviceKind::kCpu, 0});
  ASSERT_TRUE(backend.ok());
  Sequential model = Mlp();
  Status s = model.Build(backend->get(), 8, 780);
  EXPECT_EQ(s.code(), StatusCode::kInvalidArgument);
  EXPECT_NE(s.message().find("'dense_0' expects 784 input features, got 780"), std::string::npos)
      << s;

  Sequential dup;
  dup.Add(std::make_unique<Dense>(4, 4)).Add(std::make_unique<Dense>(4, 4));
  dup.layer(1).set_name("dense_0");
  s = dup.Build(backend->get(), 8, 4);
  EXPECT_EQ(s.code(), StatusCode::kInvalidArgument);
  EXPECT_NE(s.message().find("'dense_0/kernel' is used twice"), std::string::npos) << s;

  Sequential empty;
  EXPECT_EQ(empty.Build(backend->get(), 8, 4).code(), StatusCode::kInvalidArgument);

  ASSERT_TRUE(model.Build(backend->get(), 8, 784).ok());
  EXPECT_EQ(model.Build(backend->get(), 8, 784).code(), StatusCode::kFailedPrecondition);
  auto x = (*backend)->Allocate(16 * 784);
  ASSERT_TRUE(x.ok());
  s = model.Forward(*x, 9);
  EXPECT_EQ(s.code(), StatusCode::kInvalidArgument);
  EXPECT_NE(s.message().find("batch 9 is outside [1, 8]"), std::string::npos) << s;

  std::vector<Tensor> wrong = model.InitialValues(1);
  wrong[2] = Tensor(DType::kF32, Shape{32, 15});
  s = model.SetParameters(wrong);
  EXPECT_EQ(s.code(), StatusCode::kInvalidArgument);
  EXPECT_NE(s.message().find("'dense_1/kernel'"), std::string::npos) << s;
}

// Two CPU replicas with mirrored parameters run forward/backward on halves
// of a batch in two threads. The mean of their gradients must equal the
// gradient of one model on the whole batch (the local reduction is right),
// and parameters must be untouched by the other replica.
TEST(ReplicaTest, ParallelReplicasReduceToTheFullBatchGradient) {
  SetFlushDenormalsToZero();
  const int half = 16, batch = 2 * half, in = 784, classes = 10;
  Sequential proto = Mlp();
  const std::vector<Tensor> init = proto.InitialValues(7);
  const auto xs = RandomVector(static_cast<size_t>(batch) * in, 9, 0.0f, 1.0f);
  std::vector<int32_t> ys(batch);
  for (int i = 0; i < batch; ++i) ys[i] = (i * 7) % classes;

  struct Replica {
    std::unique_ptr<Backend> backend;
    std::unique_ptr<Sequential> model;
    SoftmaxCrossEntropy head;
    DeviceBuffer x, y;
  };
  auto make = [&](int index, int rows, int first_row) {
    Replica r;
    r.backend = std::move(*CreateBackend({DeviceKind::kCpu, index}));
    r.model = proto.Clone();
    EXPECT_TRUE(r.model->Build(r.backend.get(), rows, in).ok());
    EXPECT_TRUE(r.model->SetParameters(init).ok());
    EXPECT_TRUE(r.head.Build(r.backend.get(), rows, classes).ok());
    r.x = std::move(*r.backend->Allocate(int64_t{rows} * in));
    r.y = std::move(*r.backend->Allocate(rows, DType::kI32));
    EXPECT_TRUE(
        r.backend->CopyToDevice(xs.data() + int64_t{first_row} * in, r.x, int64_t{rows} * in).ok());
    EXPECT_TRUE(r.backend->CopyToDevice(ys.data() + first_row, r.y, rows).ok());
    return r;
  };
  auto step = [&](Replica& r, int rows) {
    SetFlushDenormalsToZero();
    EXPECT_TRUE(r.model->Forward(r.x, rows).ok());
    EXPECT_TRUE(r.head.Forward(r.model->output(), r.y, rows).ok());
    EXPECT_TRUE(r.head.Backward(r.y, rows).ok());
    EXPECT_TRUE(r.model->Backward(r.x, r.head.grad(), rows).ok());
  };

  Replica r0 = make(0, half, 0), r1 = make(1, half, half), whole = make(0, batch, 0);
  std::thread t0([&] { step(r0, half); });
  std::thread t1([&] { step(r1, half); });
  t0.join();
  t1.join();
  step(whole, batch);

  // Reduce on replica 0: mean of both replicas' gradients, into r0's grads.
  std::vector<Parameter> p0 = r0.model->Parameters(), p1 = r1.model->Parameters();
  for (size_t i = 0; i < p0.size(); ++i) {
    const DeviceBuffer* inputs[] = {p0[i].grad, p1[i].grad};
    ASSERT_TRUE(r0.backend->ReduceSum(inputs, 0.5f, *p0[i].grad, p0[i].shape.num_elements()).ok());
  }
  auto reduced = r0.model->GetGradients();
  auto expected = whole.model->GetGradients();
  ASSERT_TRUE(reduced.ok() && expected.ok());
  for (size_t i = 0; i < reduced->size(); ++i) {
    const float* a = (*reduced)[i].data_as<float>();
    const float* b = (*expected)[i].data_as<float>();
    float max_abs = 0;
    for (int64_t j = 0; j < (*expected)[i].num_elements(); ++j) {
      ASSERT_NEAR(a[j], b[j], 1e-5f + 1e-4f * std::abs(b[j])) << "param " << i << " elem " << j;
      max_abs = std::max(max_abs, std::abs(b[j]));
    }
    EXPECT_GT(max_abs, 0.0f) << "param " << i;
  }
  auto params1 = r1.model->GetParameters();
  ASSERT_TRUE(params1.ok());
  for (size_t i = 0; i < init.size(); ++i)
    EXPECT_EQ(std::memcmp((*params1)[i].data(), init[i].data(), init[i].num_bytes()), 0);
}

}  // namespace
}  // namespace distval
