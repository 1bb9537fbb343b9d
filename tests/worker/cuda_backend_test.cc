// CUDA-only tests: CPU vs CUDA parity of the layers (Dense, ReLU, softmax
// cross-entropy, the 784-256-128-10 MLP) and of SGD steps, CUDA error
// reporting, and ReduceSum across GPUs. The conformance suite
// (backend_conformance_test.cc) checks each backend against references; this
// file checks that both backends compute the same model.
//
// Without a visible CUDA device (no GPU or driver, or a build without CUDA)
// the binary prints why and exits 77, which meson reports as skipped.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "distval/backend.h"
#include "distval/devices.h"
#include "distval/float_env.h"
#include "distval/layers.h"

namespace distval {
namespace {

constexpr DeviceSpec kCpu{DeviceKind::kCpu, 0};
constexpr DeviceSpec kGpu{DeviceKind::kCuda, 0};

std::vector<float> RandomVector(size_t n, uint32_t seed, float lo = -1.0f, float hi = 1.0f) {
  std::mt19937 rng(seed);
  std::uniform_real_distribution<float> dist(lo, hi);
  std::vector<float> v(n);
  for (float& x : v) x = dist(rng);
  return v;
}

std::vector<int32_t> RandomLabels(int n, int classes, uint32_t seed) {
  std::mt19937 rng(seed);
  std::uniform_int_distribution<int32_t> dist(0, classes - 1);
  std::vector<int32_t> v(static_cast<size_t>(n));
  for (int32_t& x : v) x = dist(rng);
  return v;
}

// max_i |got[i] - want[i]| <= tol * max_i |want[i]|: the error relative to
// the tensor's scale (an element-wise relative error is meaningless where a
// sum cancels to ~0). The reference must not be all zeros.
::testing::AssertionResult CloseRelative(const std::vector<float>& got,
                                         const std::vector<float>& want, double tol,
                                         const std::string& what) {
  if (got.size() != want.size())
    return ::testing::AssertionFailure()
           << what << ": sizes differ (" << got.size() << " vs " << want.size() << ")";
  double scale = 0.0, worst = -1.0;
  size_t worst_i = 0;
  for (size_t i = 0; i < want.size(); ++i) {
    scale = std::max(scale, std::abs(double{want[i]}));
    const double err = std::abs(double{got[i]} - double{want[i]});
    if (!(err <= worst)) {  // also catches NaN
      worst = err;
      worst_i = i;
    }
  }
  if (!(scale > 0.0)) return ::testing::AssertionFailure() << what << ": reference is all zeros";
  if (worst <= tol * scale) return ::testing::AssertionSuccess();
  return ::testing::AssertionFailure()
         << what << ": element " << worst_i << " is " << got[worst_i] << " (cuda) vs "
         << want[worst_i] << " (cpu); error " << worst << " > " << tol << " * scale " << scale;
}

class CudaParityTest : public ::testing::Test {
 protected:
  void SetUp() override {
    SetFlushDenormalsToZero();
    if (ProbeDevices().num_cuda_devices == 0) GTEST_SKIP() << "no CUDA device";
    auto cpu = CreateBackend(kCpu);
    ASSERT_TRUE(cpu.ok()) << cpu.status();
    auto gpu = CreateBackend(kGpu);
    ASSERT_TRUE(gpu.ok()) << gpu.status();
    cpu_ = std::move(*cpu);
    gpu_ = std::move(*gpu);
  }

  static DeviceBuffer Upload(Backend& b, const std::vector<float>& host) {
    auto buf = b.Allocate(static_cast<int64_t>(host.size()));
    EXPECT_TRUE(buf.ok()) << buf.status();
    Status s = b.CopyToDevice(host.data(), *buf, static_cast<int64_t>(host.size()));
    EXPECT_TRUE(s.ok()) << s;
    return std::move(*buf);
  }
  static DeviceBuffer UploadLabels(Backend& b, const std::vector<int32_t>& host) {
    auto buf = b.Allocate(static_cast<int64_t>(host.size()), DType::kI32);
    EXPECT_TRUE(buf.ok()) << buf.status();
    Status s = b.CopyToDevice(host.data(), *buf, static_cast<int64_t>(host.size()));
    EXPECT_TRUE(s.ok()) << s;
    return std::move(*buf);
  }
  static std::vector<float> Download(Backend& b, const DeviceBuffer& buf, int64_t n) {
    std::vector<float> host(static_cast<size_t>(n));
    Status s = b.CopyToHost(buf, host.data(), n);
    EXPECT_TRUE(s.ok()) << s;
    return host;
  }
  static std::vector<float> ToVector(const Tensor& t) {
    return std::vector<float>(t.data_as<float>(), t.data_as<float>() + t.num_elements());
  }

  std::unique_ptr<Backend> cpu_, gpu_;
};

TEST_F(CudaParityTest, DenseForwardAndBackwardMatchCpu) {
  const int in = 784, out = 256, batch = 64;
  const auto x = RandomVector(static_cast<size_t>(batch) * in, 1, 0.0f, 1.0f);
  const auto dy = RandomVector(static_cast<size_t>(batch) * out, 2);
  Dense proto(in, out);
  proto.set_name("dense_0");
  std::vector<Tensor> init = proto.InitialValues(3);
  const auto bias = RandomVector(out, 4, -0.1f, 0.1f);
  std::copy(bias.begin(), bias.end(), init[1].data_as<float>());

  struct Result {
    std::vector<float> y, kernel_grad, bias_grad, input_grad;
  };
  auto run = [&](Backend& b) {
    Result r;
    Dense dense(in, out);
    dense.set_name("dense_0");
    EXPECT_TRUE(dense.Build(&b, batch, in).ok());
    std::vector<Parameter> p = dense.Parameters();
    EXPECT_TRUE(b.CopyToDevice(init[0].data_as<float>(), *p[0].value, in * out).ok());
    EXPECT_TRUE(b.CopyToDevice(init[1].data_as<float>(), *p[1].value, out).ok());
    DeviceBuffer dx = Upload(b, x), ddy = Upload(b, dy);
    EXPECT_TRUE(dense.Forward(dx, batch).ok());
    EXPECT_TRUE(dense.Backward(dx, ddy, batch, /*need_input_grad=*/true).ok());
    r.y = Download(b, dense.output(), int64_t{batch} * out);
    r.kernel_grad = Download(b, *p[0].grad, int64_t{in} * out);
    r.bias_grad = Download(b, *p[1].grad, out);
    r.input_grad = Download(b, dense.input_grad(), int64_t{batch} * in);
    return r;
  };
  const Result c = run(*cpu_), g = run(*gpu_);
  EXPECT_TRUE(CloseRelative(g.y, c.y, 1e-4, "output"));
  EXPECT_TRUE(CloseRelative(g.kernel_grad, c.kernel_grad, 1e-4, "kernel grad"));
  EXPECT_TRUE(CloseRelative(g.bias_grad, c.bias_grad, 1e-4, "bias grad"));
  EXPECT_TRUE(CloseRelative(g.input_grad, c.input_grad, 1e-4, "input grad"));
}

TEST_F(CudaParityTest, ReluForwardAndBackwardMatchCpuExactly) {
  const int features = 256, batch = 64;
  const auto x = RandomVector(static_cast<size_t>(batch) * features, 5);
  const auto dy = RandomVector(static_cast<size_t>(batch) * features, 6);
  auto run = [&](Backend& b) {
    ReLU relu;
    relu.set_name("relu_0");
    EXPECT_TRUE(relu.Build(&b, batch, features).ok());
    DeviceBuffer dx = Upload(b, x), ddy = Upload(b, dy);
    EXPECT_TRUE(relu.Forward(dx, batch).ok());
    EXPECT_TRUE(relu.Backward(dx, ddy, batch, true).ok());
    return std::make_pair(Download(b, relu.output(), int64_t{batch} * features),
                          Download(b, relu.input_grad(), int64_t{batch} * features));
  };
  const auto c = run(*cpu_), g = run(*gpu_);
  EXPECT_EQ(g.first, c.first);
  EXPECT_EQ(g.second, c.second);
}

TEST_F(CudaParityTest, SoftmaxCrossEntropyMatchesCpu) {
  const int batch = 64, classes = 10;
  const auto logits = RandomVector(static_cast<size_t>(batch) * classes, 7, -4.0f, 4.0f);
  const auto labels = RandomLabels(batch, classes, 8);
  struct Result {
    float loss = 0;
    int64_t correct = 0;
    std::vector<float> probs, grad;
  };
  auto run = [&](Backend& b) {
    Result r;
    SoftmaxCrossEntropy head;
    EXPECT_TRUE(head.Build(&b, batch, classes).ok());
    DeviceBuffer dl = Upload(b, logits), dlab = UploadLabels(b, labels);
    EXPECT_TRUE(head.Forward(dl, dlab, batch).ok());
    EXPECT_TRUE(head.Backward(dlab, batch).ok());
    EXPECT_TRUE(head.CountCorrect(dl, dlab, batch).ok());
    r.loss = head.LossValue().value_or(-1.0f);
    r.correct = head.CorrectValue().value_or(-1);
    r.probs = Download(b, head.probs(), int64_t{batch} * classes);
    r.grad = Download(b, head.grad(), int64_t{batch} * classes);
    return r;
  };
  const Result c = run(*cpu_), g = run(*gpu_);
  EXPECT_NEAR(g.loss, c.loss, 1e-5 * std::abs(c.loss));
  EXPECT_EQ(g.correct, c.correct);
  EXPECT_GT(c.correct, 0);
  EXPECT_TRUE(CloseRelative(g.probs, c.probs, 1e-5, "probs"));
  EXPECT_TRUE(CloseRelative(g.grad, c.grad, 1e-5, "logit grad"));
}

Sequential ReferenceMlp() {
  Sequential model;
  model.Add(std::make_unique<Dense>(784, 256))
      .Add(std::make_unique<ReLU>())
      .Add(std::make_unique<Dense>(256, 128))
      .Add(std::make_unique<ReLU>())
      .Add(std::make_unique<Dense>(128, 10));
  return model;
}

// One replica of the reference MLP with its loss head and a batch.
struct MlpReplica {
  std::unique_ptr<Sequential> model;
  SoftmaxCrossEntropy head;
  DeviceBuffer x, y;
};

class CudaMlpParityTest : public CudaParityTest {
 protected:
  static constexpr int kIn = 784, kClasses = 10;

  void Make(Backend& b, MlpReplica& r, int max_batch, const std::vector<Tensor>& init) {
    r.model = ReferenceMlp().Clone();
    ASSERT_TRUE(r.model->Build(&b, max_batch, kIn).ok());
    ASSERT_TRUE(r.model->SetParameters(init).ok());
    ASSERT_TRUE(r.head.Build(&b, max_batch, kClasses).ok());
    auto x = b.Allocate(int64_t{max_batch} * kIn);
    auto y = b.Allocate(max_batch, DType::kI32);
    ASSERT_TRUE(x.ok() && y.ok());
    r.x = std::move(*x);
    r.y = std::move(*y);
  }
  // Forward + backward on `batch` rows of xs/ys; returns the loss.
  static float Step(Backend& b, MlpReplica& r, int batch, const std::vector<float>& xs,
                    const std::vector<int32_t>& ys) {
    EXPECT_TRUE(b.CopyToDevice(xs.data(), r.x, int64_t{batch} * kIn).ok());
    EXPECT_TRUE(b.CopyToDevice(ys.data(), r.y, batch).ok());
    EXPECT_TRUE(r.model->Forward(r.x, batch).ok());
    EXPECT_TRUE(r.head.Forward(r.model->output(), r.y, batch).ok());
    EXPECT_TRUE(r.head.Backward(r.y, batch).ok());
    EXPECT_TRUE(r.model->Backward(r.x, r.head.grad(), batch).ok());
    auto loss = r.head.LossValue();
    EXPECT_TRUE(loss.ok()) << loss.status();
    return loss.value_or(-1.0f);
  }

  void ExpectSameForwardAndBackward(int batch) {
    const std::vector<Tensor> init = ReferenceMlp().InitialValues(21);
    const auto xs = RandomVector(static_cast<size_t>(batch) * kIn, 22, 0.0f, 1.0f);
    const auto ys = RandomLabels(batch, kClasses, 23);
    MlpReplica c, g;
    Make(*cpu_, c, batch, init);
    Make(*gpu_, g, batch, init);
    const float loss_c = Step(*cpu_, c, batch, xs, ys);
    const float loss_g = Step(*gpu_, g, batch, xs, ys);
    EXPECT_NEAR(loss_g, loss_c, 1e-4 * std::abs(loss_c)) << "batch " << batch;
    EXPECT_TRUE(CloseRelative(Download(*gpu_, g.model->output(), int64_t{batch} * kClasses),
                              Download(*cpu_, c.model->output(), int64_t{batch} * kClasses), 1e-4,
                              "logits"));
    auto gc = c.model->GetGradients();
    auto gg = g.model->GetGradients();
    ASSERT_TRUE(gc.ok() && gg.ok());
    const std::vector<ParameterSpec> specs = c.model->ParameterSpecs();
    ASSERT_EQ(gc->size(), specs.size());
    for (size_t i = 0; i < specs.size(); ++i)
      EXPECT_TRUE(CloseRelative(ToVector((*gg)[i]), ToVector((*gc)[i]), 1e-4,
                                specs[i].name + " grad (batch " + std::to_string(batch) + ")"));
  }
};

TEST_F(CudaMlpParityTest, ForwardAndBackwardMatchCpuAtBatch64) { ExpectSameForwardAndBackward(64); }

// A batch that is not a multiple of any block size.
TEST_F(CudaMlpParityTest, ForwardAndBackwardMatchCpuAtBatch1000) {
  ExpectSameForwardAndBackward(1000);
}

// Plain SGD on both devices from the same start: parameters stay within
// float rounding of each other after several steps.
TEST_F(CudaMlpParityTest, SgdStepsStayClose) {
  const int batch = 64, steps = 8;
  const float lr = 0.1f;
  const std::vector<Tensor> init = ReferenceMlp().InitialValues(31);
  MlpReplica c, g;
  Make(*cpu_, c, batch, init);
  Make(*gpu_, g, batch, init);
  float first_loss = 0, last_loss = 0;
  for (int s = 0; s < steps; ++s) {
    const auto xs = RandomVector(static_cast<size_t>(batch) * kIn, 100 + s, 0.0f, 1.0f);
    std::vector<int32_t> ys(batch);
    for (int i = 0; i < batch; ++i) ys[i] = i % kClasses;  // learnable: label = row % 10
    const float loss_c = Step(*cpu_, c, batch, xs, ys);
    const float loss_g = Step(*gpu_, g, batch, xs, ys);
    ASSERT_NEAR(loss_g, loss_c, 1e-4 * std::abs(loss_c)) << "step " << s;
    if (s == 0) first_loss = loss_c;
    last_loss = loss_c;
    for (auto* rep : {&c, &g}) {
      Backend& b = rep == &c ? *cpu_ : *gpu_;
      for (const Parameter& p : rep->model->Parameters())
        ASSERT_TRUE(b.Axpy(-lr, *p.grad, *p.value, p.shape.num_elements()).ok());
    }
  }
  EXPECT_NE(first_loss, last_loss);  // the parameters did move
  auto pc = c.model->GetParameters();
  auto pg = g.model->GetParameters();
  ASSERT_TRUE(pc.ok() && pg.ok());
  const std::vector<ParameterSpec> specs = c.model->ParameterSpecs();
  for (size_t i = 0; i < specs.size(); ++i)
    EXPECT_TRUE(CloseRelative(ToVector((*pg)[i]), ToVector((*pc)[i]), 1e-4, specs[i].name));
}

TEST_F(CudaParityTest, OutOfMemoryIsResourceExhaustedAndTheBackendStaysUsable) {
  // 2^40 floats = 4 TiB: more than any GPU has.
  auto huge = gpu_->Allocate(int64_t{1} << 40);
  ASSERT_FALSE(huge.ok());
  EXPECT_EQ(huge.status().code(), StatusCode::kResourceExhausted) << huge.status();
  EXPECT_NE(huge.status().message().find("Allocate on cuda:0"), std::string::npos) << huge.status();
  EXPECT_NE(huge.status().message().find("cudaMalloc"), std::string::npos) << huge.status();
  // The error was not sticky: later work succeeds and reports no stale error.
  auto small = gpu_->Allocate(8);
  ASSERT_TRUE(small.ok()) << small.status();
  ASSERT_TRUE(gpu_->Fill(*small, 3.0f).ok());
  EXPECT_TRUE(gpu_->Synchronize().ok());
  EXPECT_EQ(Download(*gpu_, *small, 8), std::vector<float>(8, 3.0f));
}

TEST(CudaMultiGpuTest, ReduceSumReadsPeerGpuBuffers) {
  SetFlushDenormalsToZero();
  if (ProbeDevices().num_cuda_devices < 2) GTEST_SKIP() << "needs 2 CUDA devices";
  auto g0 = CreateBackend({DeviceKind::kCuda, 0});
  auto g1 = CreateBackend({DeviceKind::kCuda, 1});
  ASSERT_TRUE(g0.ok() && g1.ok());
  const int64_t n = 3000;
  const auto a = RandomVector(n, 41), b = RandomVector(n, 42);
  auto b0 = (*g0)->Allocate(n);
  auto b1 = (*g1)->Allocate(n);
  ASSERT_TRUE(b0.ok() && b1.ok());
  ASSERT_TRUE((*g0)->CopyToDevice(a.data(), *b0, n).ok());
  ASSERT_TRUE((*g1)->CopyToDevice(b.data(), *b1, n).ok());
  // Work of another backend must be finished before this one reads it.
  ASSERT_TRUE((*g1)->Synchronize().ok());
  const DeviceBuffer* inputs[] = {&*b0, &*b1};
  if (!(*g0)->CanAccess(*b1)) {
    Status s = (*g0)->ReduceSum(inputs, 0.5f, *b0, n);
    EXPECT_EQ(s.code(), StatusCode::kInvalidArgument) << s;
    GTEST_SKIP() << "cuda:0 has no peer access to cuda:1";
  }
  ASSERT_TRUE((*g0)->ReduceSum(inputs, 0.5f, *b0, n).ok());
  std::vector<float> got(n);
  ASSERT_TRUE((*g0)->CopyToHost(*b0, got.data(), n).ok());
  for (int64_t i = 0; i < n; ++i) ASSERT_NEAR(got[i], (a[i] + b[i]) * 0.5f, 1e-6f) << i;
}

}  // namespace
}  // namespace distval

int main(int argc, char** argv) {
  ::testing::InitGoogleTest(&argc, argv);
  if (distval::ProbeDevices().num_cuda_devices == 0) {
    std::printf(
        "cuda_backend_test: no CUDA device visible (no GPU or driver, or built without "
        "CUDA): skipped\n");
    return 77;  // meson: skipped
  }
  return RUN_ALL_TESTS();
}
