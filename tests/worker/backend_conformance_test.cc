// Conformance suite: every Backend implementation must pass these tests.
// Each test runs once per device in ConformanceDevices(); devices that are
// not present are skipped.
#include <gtest/gtest.h>

#include <cmath>
#include <limits>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "backend_test_util.h"
#include "distval/backend.h"

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

bool Contains(const Status& s, const std::string& text) {
  return s.message().find(text) != std::string::npos;
}

// Host memory labelled as living on another device, to check that backends
// refuse buffers they cannot access.
class HostAllocator final : public DeviceAllocator {
 public:
  void Free(void* data) noexcept override { AlignedFree()(data); }
};
DeviceBuffer ForeignBuffer(DeviceSpec device, int64_t n) {
  AlignedBuffer mem = AlignedAlloc(static_cast<size_t>(n) * sizeof(float));
  return DeviceBuffer::Adopt(std::make_shared<HostAllocator>(), device, DType::kF32, mem.release(),
                             n);
}

TEST_P(BackendTest, AllocateIsZeroFilledAndCopiesRoundTripWithOffsets) {
  auto buf = be().Allocate(10);
  ASSERT_TRUE(buf.ok()) << buf.status();
  EXPECT_EQ(buf->size(), 10);
  EXPECT_EQ(buf->dtype(), DType::kF32);
  EXPECT_EQ(buf->device(), GetParam());
  EXPECT_EQ(Download(*buf), std::vector<float>(10, 0.0f));

  const std::vector<float> three = {1.5f, -2.0f, 3.25f};
  ASSERT_TRUE(be().CopyToDevice(three.data(), *buf, 3, /*dst_offset=*/4).ok());
  std::vector<float> expect(10, 0.0f);
  expect[4] = 1.5f;
  expect[5] = -2.0f;
  expect[6] = 3.25f;
  EXPECT_EQ(Download(*buf), expect);

  std::vector<float> two(2);
  ASSERT_TRUE(be().CopyToHost(*buf, two.data(), 2, /*src_offset=*/5).ok());
  EXPECT_EQ(two, (std::vector<float>{-2.0f, 3.25f}));

  auto empty = be().Allocate(0);
  ASSERT_TRUE(empty.ok());
  EXPECT_TRUE(empty->empty());
}

TEST_P(BackendTest, Int32BuffersRoundTripAndDtypesAreChecked) {
  auto labels = be().Allocate(4, DType::kI32);
  ASSERT_TRUE(labels.ok()) << labels.status();
  const std::vector<int32_t> in = {3, -1, 7, 0};
  ASSERT_TRUE(be().CopyToDevice(in.data(), *labels, 4).ok());
  std::vector<int32_t> out(4);
  ASSERT_TRUE(be().CopyToHost(*labels, out.data(), 4).ok());
  EXPECT_EQ(out, in);

  const std::vector<float> f = {1, 2, 3, 4};
  Status s = be().CopyToDevice(f.data(), *labels, 4);
  EXPECT_EQ(s.code(), StatusCode::kInvalidArgument);
  EXPECT_TRUE(Contains(s, "dtype i32")) << s;

  auto bad = be().Allocate(4, DType::kF64);
  EXPECT_EQ(bad.status().code(), StatusCode::kInvalidArgument);
}

TEST_P(BackendTest, CopiesOutOfRangeAreRejected) {
  DeviceBuffer buf = Zeros(8);
  std::vector<float> host(8, 1.0f);
  Status s = be().CopyToDevice(host.data(), buf, 4, /*dst_offset=*/5);
  EXPECT_EQ(s.code(), StatusCode::kInvalidArgument);
  EXPECT_TRUE(Contains(s, "holds 8 elements, needs 9")) << s;
  s = be().CopyToHost(buf, host.data(), 9);
  EXPECT_EQ(s.code(), StatusCode::kInvalidArgument);
  EXPECT_TRUE(Contains(s, "CopyToHost")) << s;
  EXPECT_EQ(Download(buf), std::vector<float>(8, 0.0f));  // untouched
}

TEST_P(BackendTest, FillZeroAndCopy) {
  DeviceBuffer a = Zeros(5);
  ASSERT_TRUE(be().Fill(a, 2.5f).ok());
  EXPECT_EQ(Download(a), std::vector<float>(5, 2.5f));
  DeviceBuffer b = Zeros(5);
  ASSERT_TRUE(be().Copy(a, b, 3).ok());
  EXPECT_EQ(Download(b), (std::vector<float>{2.5f, 2.5f, 2.5f, 0.0f, 0.0f}));
  ASSERT_TRUE(be().Zero(a).ok());
  EXPECT_EQ(Download(a), std::vector<float>(5, 0.0f));
  EXPECT_EQ(be().Copy(a, a, 2).code(), StatusCode::kInvalidArgument);
}

TEST_P(BackendTest, BuffersOfTheOtherDeviceKindAreRejected) {
  const DeviceSpec other{GetParam().kind == DeviceKind::kCpu ? DeviceKind::kCuda : DeviceKind::kCpu,
                         0};
  DeviceBuffer foreign = ForeignBuffer(other, 4);
  DeviceBuffer mine = Zeros(4);
  Status s = be().Axpy(1.0f, foreign, mine, 4);
  EXPECT_EQ(s.code(), StatusCode::kInvalidArgument);
  EXPECT_TRUE(Contains(s, "lives on " + other.ToString())) << s;
  std::vector<float> host(4);
  EXPECT_EQ(be().CopyToHost(foreign, host.data(), 4).code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(be().Fill(foreign, 1.0f).code(), StatusCode::kInvalidArgument);
}

// Reference: C = alpha * op(A) op(B) + beta * C in double, row-major with
// leading dimensions.
void ReferenceGemm(bool ta, bool tb, int m, int n, int k, float alpha, const std::vector<float>& a,
                   int lda, const std::vector<float>& b, int ldb, float beta, std::vector<float>& c,
                   int ldc) {
  for (int i = 0; i < m; ++i) {
    for (int j = 0; j < n; ++j) {
      double sum = 0.0;
      for (int p = 0; p < k; ++p) {
        const double av = ta ? a[p * lda + i] : a[i * lda + p];
        const double bv = tb ? b[j * ldb + p] : b[p * ldb + j];
        sum += av * bv;
      }
      const double old = beta == 0.0f ? 0.0 : beta * static_cast<double>(c[i * ldc + j]);
      c[i * ldc + j] = static_cast<float>(alpha * sum + old);
    }
  }
}

TEST_P(BackendTest, GemmMatchesReferenceForAllTransposesWithPaddedLeadingDims) {
  const int m = 7, n = 5, k = 9;
  for (int variant = 0; variant < 4; ++variant) {
    const bool ta = variant & 1, tb = variant & 2;
    const int a_rows = ta ? k : m, a_cols = ta ? m : k;
    const int b_rows = tb ? n : k, b_cols = tb ? k : n;
    const int lda = a_cols + 3, ldb = b_cols + 1, ldc = n + 2;
    const auto a = RandomVector(static_cast<size_t>(a_rows * lda), 1 + variant);
    const auto b = RandomVector(static_cast<size_t>(b_rows * ldb), 11 + variant);
    auto c = RandomVector(static_cast<size_t>(m * ldc), 21 + variant);
    DeviceBuffer da = Upload(a), db = Upload(b), dc = Upload(c);
    ASSERT_TRUE(be().Gemm(ta, tb, m, n, k, 0.7f, da, lda, db, ldb, 0.3f, dc, ldc).ok());
    ReferenceGemm(ta, tb, m, n, k, 0.7f, a, lda, b, ldb, 0.3f, c, ldc);
    const auto got = Download(dc);
    for (size_t i = 0; i < c.size(); ++i) {
      // Padding columns (j >= n) must be untouched: the reference leaves them.
      EXPECT_NEAR(got[i], c[i], 1e-5f) << "variant " << variant << " element " << i;
    }
  }
}

TEST_P(BackendTest, GemmWithBetaZeroIgnoresNaNInC) {
  const int m = 3, n = 4, k = 2;
  const auto a = RandomVector(m * k, 5), b = RandomVector(k * n, 6);
  std::vector<float> c(m * n, std::numeric_limits<float>::quiet_NaN());
  DeviceBuffer da = Upload(a), db = Upload(b), dc = Upload(c);
  ASSERT_TRUE(be().Gemm(false, false, m, n, k, 1.0f, da, k, db, n, 0.0f, dc, n).ok());
  std::vector<float> ref(m * n, 0.0f);
  ReferenceGemm(false, false, m, n, k, 1.0f, a, k, b, n, 0.0f, ref, n);
  const auto got = Download(dc);
  for (size_t i = 0; i < ref.size(); ++i) EXPECT_NEAR(got[i], ref[i], 1e-6f);
}

TEST_P(BackendTest, GemmWithKZeroScalesC) {
  DeviceBuffer a = Zeros(1), b = Zeros(1);
  DeviceBuffer c = Upload({1.0f, 2.0f, 3.0f, 4.0f});
  ASSERT_TRUE(be().Gemm(false, false, 2, 2, 0, 1.0f, a, 1, b, 2, 0.5f, c, 2).ok());
  EXPECT_EQ(Download(c), (std::vector<float>{0.5f, 1.0f, 1.5f, 2.0f}));
}

TEST_P(BackendTest, GemmRejectsShortBuffersAndLeadingDims) {
  DeviceBuffer a = Zeros(6), b = Zeros(6), c = Zeros(3);
  Status s = be().Gemm(false, false, 2, 2, 3, 1.0f, a, 3, b, 2, 0.0f, c, 2);
  EXPECT_EQ(s.code(), StatusCode::kInvalidArgument);
  EXPECT_TRUE(Contains(s, "'c' holds 3 elements, needs 4")) << s;
  s = be().Gemm(false, false, 2, 2, 3, 1.0f, a, 2, b, 2, 0.0f, c, 2);
  EXPECT_EQ(s.code(), StatusCode::kInvalidArgument);
  EXPECT_TRUE(Contains(s, "lda=2")) << s;
  s = be().Gemm(false, false, -1, 2, 3, 1.0f, a, 3, b, 2, 0.0f, c, 2);
  EXPECT_EQ(s.code(), StatusCode::kInvalidArgument);
}

TEST_P(BackendTest, GemmOfALargerProductMatchesReference) {
  // Large enough for the blocked/vectorized paths.
  const int m = 64, n = 96, k = 130;
  const auto a = RandomVector(m * k, 31), b = RandomVector(k * n, 32);
  std::vector<float> ref(m * n, 0.0f);
  DeviceBuffer da = Upload(a), db = Upload(b), dc = Zeros(m * n);
  ASSERT_TRUE(be().Gemm(false, false, m, n, k, 1.0f, da, k, db, n, 0.0f, dc, n).ok());
  ReferenceGemm(false, false, m, n, k, 1.0f, a, k, b, n, 0.0f, ref, n);
  const auto got = Download(dc);
  for (size_t i = 0; i < ref.size(); ++i) ASSERT_NEAR(got[i], ref[i], 1e-4f) << i;
}

TEST_P(BackendTest, BiasAddAndBiasGrad) {
  DeviceBuffer x = Upload({1, 2, 3, 4, 5, 6});
  DeviceBuffer bias = Upload({10, 20, 30});
  ASSERT_TRUE(be().BiasAdd(x, bias, 2, 3).ok());
  EXPECT_EQ(Download(x), (std::vector<float>{11, 22, 33, 14, 25, 36}));

  DeviceBuffer grad = Upload({9, 9, 9});  // overwritten, not accumulated
  ASSERT_TRUE(be().BiasGrad(x, 2, 3, grad).ok());
  EXPECT_EQ(Download(grad), (std::vector<float>{25, 47, 69}));
  ASSERT_TRUE(be().BiasGrad(x, 0, 3, grad).ok());
  EXPECT_EQ(Download(grad), (std::vector<float>{0, 0, 0}));

  Status s = be().BiasAdd(x, bias, 1, 4);
  EXPECT_EQ(s.code(), StatusCode::kInvalidArgument);
  EXPECT_TRUE(Contains(s, "'bias' holds 3 elements, needs 4")) << s;
}

TEST_P(BackendTest, ReluForwardAndBackward) {
  DeviceBuffer x = Upload({-2, -0.0f, 0.5f, 3, -1e-30f, 7});
  DeviceBuffer y = Zeros(6);
  ASSERT_TRUE(be().ReluForward(x, y, 6).ok());
  EXPECT_EQ(Download(y), (std::vector<float>{0, 0, 0.5f, 3, 0, 7}));
  DeviceBuffer dy = Upload({1, 2, 3, 4, 5, 6});
  DeviceBuffer dx = Zeros(6);
  ASSERT_TRUE(be().ReluBackward(y, dy, dx, 6).ok());
  EXPECT_EQ(Download(dx), (std::vector<float>{0, 0, 3, 4, 0, 6}));
  // In place.
  ASSERT_TRUE(be().ReluForward(x, x, 6).ok());
  EXPECT_EQ(Download(x), Download(y));
  ASSERT_TRUE(be().ReluBackward(y, dy, dy, 6).ok());
  EXPECT_EQ(Download(dy), Download(dx));
}

TEST_P(BackendTest, SoftmaxCrossEntropyMatchesReferenceAndIsStable) {
  const int batch = 3, classes = 4;
  const std::vector<float> logits = {1, 2, 3, 4, -1, 0, 0.5f, 2, 1000, 999, -1000, 998};
  const std::vector<int32_t> labels = {3, 0, 1};
  DeviceBuffer dl = Upload(logits), dlab = UploadLabels(labels);
  DeviceBuffer probs = Zeros(batch * classes), loss = Zeros(1);
  ASSERT_TRUE(be().SoftmaxCrossEntropyForward(dl, dlab, batch, classes, probs, loss).ok());

  std::vector<double> ref_probs(batch * classes);
  double ref_loss = 0.0;
  for (int r = 0; r < batch; ++r) {
    double mx = -1e300, sum = 0.0;
    for (int c = 0; c < classes; ++c) mx = std::max(mx, double{logits[r * classes + c]});
    for (int c = 0; c < classes; ++c) sum += std::exp(logits[r * classes + c] - mx);
    for (int c = 0; c < classes; ++c)
      ref_probs[r * classes + c] = std::exp(logits[r * classes + c] - mx) / sum;
    ref_loss += -std::log(ref_probs[r * classes + labels[r]]);
  }
  ref_loss /= batch;
  const auto p = Download(probs);
  for (int i = 0; i < batch * classes; ++i) EXPECT_NEAR(p[i], ref_probs[i], 1e-6) << i;
  EXPECT_TRUE(std::isfinite(Scalar(loss)));
  EXPECT_NEAR(Scalar(loss), ref_loss, 1e-5 * ref_loss);

  DeviceBuffer dlogits = Zeros(batch * classes);
  ASSERT_TRUE(be().SoftmaxCrossEntropyBackward(probs, dlab, batch, classes, 0.5f, dlogits).ok());
  const auto g = Download(dlogits);
  for (int r = 0; r < batch; ++r)
    for (int c = 0; c < classes; ++c)
      EXPECT_NEAR(g[r * classes + c],
                  0.5 * (ref_probs[r * classes + c] - (c == labels[r] ? 1.0 : 0.0)), 1e-6);
  // In place into probs.
  ASSERT_TRUE(be().SoftmaxCrossEntropyBackward(probs, dlab, batch, classes, 0.5f, probs).ok());
  EXPECT_EQ(Download(probs), g);
}

TEST_P(BackendTest, SoftmaxCrossEntropyNeverIndexesWithABadLabel) {
  DeviceBuffer dl = Upload({1, 2, 3, 4});
  DeviceBuffer dlab = UploadLabels({0, 5});
  DeviceBuffer probs = Zeros(4), loss = Zeros(1);
  Status s = be().SoftmaxCrossEntropyForward(dl, dlab, 2, 2, probs, loss);
  if (s.ok()) {
    ASSERT_TRUE(be().Synchronize().ok());
    EXPECT_TRUE(std::isnan(Scalar(loss))) << "a bad label must give InvalidArgument or NaN";
  } else {
    EXPECT_EQ(s.code(), StatusCode::kInvalidArgument);
    EXPECT_TRUE(Contains(s, "label 5 of row 1")) << s;
  }
}

TEST_P(BackendTest, CountCorrectUsesArgmaxWithLowestIndexOnTies) {
  const std::vector<float> logits = {0.1f,  0.9f,  0.0f,   // argmax 1
                                     0.5f,  0.5f,  0.2f,   // tie -> 0
                                     -3.0f, -2.0f, -1.0f,  // argmax 2
                                     2.0f,  1.0f,  2.0f};  // tie -> 0
  DeviceBuffer dl = Upload(logits);
  DeviceBuffer dlab = UploadLabels({1, 1, 2, 0});
  DeviceBuffer correct = Zeros(1);
  ASSERT_TRUE(be().CountCorrect(dl, dlab, 4, 3, correct).ok());
  EXPECT_EQ(Scalar(correct), 3.0f);
  ASSERT_TRUE(be().CountCorrect(dl, dlab, 2, 3, correct).ok());
  EXPECT_EQ(Scalar(correct), 1.0f);
}

TEST_P(BackendTest, AxpyScaleAndReduceSum) {
  DeviceBuffer x = Upload({1, 2, 3}), y = Upload({10, 20, 30});
  ASSERT_TRUE(be().Axpy(2.0f, x, y, 3).ok());
  EXPECT_EQ(Download(y), (std::vector<float>{12, 24, 36}));
  ASSERT_TRUE(be().Scale(0.5f, y, 2).ok());
  EXPECT_EQ(Download(y), (std::vector<float>{6, 12, 36}));

  // Long enough to cross chunk boundaries of chunked implementations.
  const size_t n = 5000;
  const auto a = RandomVector(n, 41), b = RandomVector(n, 42), c = RandomVector(n, 43);
  DeviceBuffer da = Upload(a), db = Upload(b), dc = Upload(c), out = Zeros(n);
  const DeviceBuffer* inputs[] = {&da, &db, &dc};
  ASSERT_TRUE(be().ReduceSum(inputs, 1.0f / 3.0f, out, n).ok());
  auto got = Download(out);
  for (size_t i = 0; i < n; ++i) ASSERT_NEAR(got[i], (a[i] + b[i] + c[i]) / 3.0f, 1e-6f) << i;
  // Output aliasing an input.
  const DeviceBuffer* aliased[] = {&db, &da};
  ASSERT_TRUE(be().ReduceSum(aliased, 1.0f, da, n).ok());
  got = Download(da);
  for (size_t i = 0; i < n; ++i) ASSERT_NEAR(got[i], a[i] + b[i], 1e-6f) << i;

  EXPECT_EQ(be().ReduceSum({}, 1.0f, out, n).code(), StatusCode::kInvalidArgument);
  const DeviceBuffer* with_null[] = {&da, nullptr};
  EXPECT_EQ(be().ReduceSum(with_null, 1.0f, out, n).code(), StatusCode::kInvalidArgument);
}

TEST_P(BackendTest, SynchronizeSucceedsAfterWork) {
  DeviceBuffer x = Zeros(100);
  ASSERT_TRUE(be().Fill(x, 1.0f).ok());
  EXPECT_TRUE(be().Synchronize().ok());
}

// Copies larger than an asynchronous backend's staging chunks (CUDA: 4 MiB,
// double-buffered), at odd offsets and sizes. The host source is
// overwritten as soon as CopyToDevice returns: the contract says it may be.
TEST_P(BackendTest, LargeCopiesRoundTripAndReleaseTheHostSourceOnReturn) {
  const int64_t n = 2'621'447;  // ~10 MiB of floats: 3 chunks of 4 MiB
  std::vector<float> host = RandomVector(static_cast<size_t>(n), 51);
  const std::vector<float> first = host;
  DeviceBuffer a = Zeros(n + 5), b = Zeros(n + 5);
  ASSERT_TRUE(be().CopyToDevice(host.data(), a, n, /*dst_offset=*/3).ok());
  for (float& v : host) v = -v;  // reuse the source at once
  ASSERT_TRUE(be().CopyToDevice(host.data(), b, n, /*dst_offset=*/0).ok());
  host.assign(host.size(), 7.0f);

  std::vector<float> back(static_cast<size_t>(n));
  ASSERT_TRUE(be().CopyToHost(a, back.data(), n, /*src_offset=*/3).ok());
  ASSERT_EQ(back, first);
  ASSERT_TRUE(be().CopyToHost(b, back.data(), n).ok());
  for (int64_t i = 0; i < n; ++i) ASSERT_EQ(back[i], -first[i]) << i;
  // The untouched ends stay zero.
  const auto a_all = Download(a);
  EXPECT_EQ(a_all[0], 0.0f);
  EXPECT_EQ(a_all[2], 0.0f);
  EXPECT_EQ(a_all[static_cast<size_t>(n) + 3], 0.0f);
  EXPECT_EQ(a_all[static_cast<size_t>(n) + 4], 0.0f);
}

TEST_P(BackendTest, GemmWithKZeroAndBetaZeroWritesZerosAndKeepsPadding) {
  DeviceBuffer a = Zeros(1), b = Zeros(1);
  const float nan = std::numeric_limits<float>::quiet_NaN();
  DeviceBuffer c = Upload({nan, nan, 9.0f, nan, nan, 9.0f});  // 2 x 2, ldc 3
  ASSERT_TRUE(be().Gemm(false, false, 2, 2, 0, 1.0f, a, 1, b, 2, 0.0f, c, 3).ok());
  EXPECT_EQ(Download(c), (std::vector<float>{0, 0, 9, 0, 0, 9}));
}

// Shapes of the reference MLP (784-256-128-10) at batch 64, every transpose
// combination a Dense layer uses, against the double reference.
TEST_P(BackendTest, GemmAtMlpShapesMatchesReference) {
  struct Case {
    bool ta, tb;
    int m, n, k;
  };
  const Case cases[] = {
      {false, false, 64, 256, 784},  // forward: x [64,784] * W [784,256]
      {true, false, 784, 256, 64},   // kernel grad: x^T * dy
      {false, true, 64, 784, 256},   // input grad: dy * W^T
      {true, true, 10, 128, 64},
  };
  uint32_t seed = 60;
  for (const Case& t : cases) {
    const int lda = t.ta ? t.m : t.k, ldb = t.tb ? t.k : t.n;
    const auto a = RandomVector(static_cast<size_t>(t.m) * t.k, ++seed);
    const auto b = RandomVector(static_cast<size_t>(t.k) * t.n, ++seed);
    std::vector<float> ref(static_cast<size_t>(t.m) * t.n, 0.0f);
    DeviceBuffer da = Upload(a), db = Upload(b), dc = Zeros(t.m * t.n);
    ASSERT_TRUE(be().Gemm(t.ta, t.tb, t.m, t.n, t.k, 1.0f, da, lda, db, ldb, 0.0f, dc, t.n).ok());
    ReferenceGemm(t.ta, t.tb, t.m, t.n, t.k, 1.0f, a, lda, b, ldb, 0.0f, ref, t.n);
    const auto got = Download(dc);
    for (size_t i = 0; i < ref.size(); ++i)
      ASSERT_NEAR(got[i], ref[i], 5e-4f) << "ta " << t.ta << " tb " << t.tb << " element " << i;
  }
}

// Many rows (several row slices in chunked implementations) and more
// columns than one block of 32.
TEST_P(BackendTest, BiasGradOverManyRowsAndColumns) {
  const int rows = 5000, cols = 70;
  const auto dy = RandomVector(static_cast<size_t>(rows) * cols, 71);
  DeviceBuffer ddy = Upload(dy), grad = Zeros(cols);
  ASSERT_TRUE(be().BiasGrad(ddy, rows, cols, grad).ok());
  const auto got = Download(grad);
  for (int c = 0; c < cols; ++c) {
    double ref = 0.0;
    for (int r = 0; r < rows; ++r) ref += dy[static_cast<size_t>(r) * cols + c];
    ASSERT_NEAR(got[c], ref, 1e-3) << "column " << c;
  }
  // Deterministic: the same input gives bitwise the same sums.
  DeviceBuffer again = Zeros(cols);
  ASSERT_TRUE(be().BiasGrad(ddy, rows, cols, again).ok());
  EXPECT_EQ(Download(again), got);
}

// Wider than a warp (1000 classes) and more rows than one block handles.
TEST_P(BackendTest, SoftmaxCrossEntropyOverManyClassesIsDeterministic) {
  const int batch = 37, classes = 1000;
  const auto logits = RandomVector(static_cast<size_t>(batch) * classes, 81, -5.0f, 5.0f);
  std::vector<int32_t> labels(batch);
  for (int r = 0; r < batch; ++r) labels[r] = (r * 131) % classes;
  DeviceBuffer dl = Upload(logits), dlab = UploadLabels(labels);
  DeviceBuffer probs = Zeros(batch * classes), loss = Zeros(1);
  ASSERT_TRUE(be().SoftmaxCrossEntropyForward(dl, dlab, batch, classes, probs, loss).ok());
  double ref_loss = 0.0;
  const auto p = Download(probs);
  for (int r = 0; r < batch; ++r) {
    const float* x = logits.data() + static_cast<size_t>(r) * classes;
    double mx = x[0], sum = 0.0;
    for (int c = 1; c < classes; ++c) mx = std::max(mx, double{x[c]});
    for (int c = 0; c < classes; ++c) sum += std::exp(x[c] - mx);
    ref_loss += std::log(sum) - (x[labels[r]] - mx);
    for (int c = 0; c < classes; ++c)
      ASSERT_NEAR(p[static_cast<size_t>(r) * classes + c], std::exp(x[c] - mx) / sum, 1e-6)
          << "row " << r << " class " << c;
  }
  const float first = Scalar(loss);
  EXPECT_NEAR(first, ref_loss / batch, 1e-5 * ref_loss / batch);
  ASSERT_TRUE(be().SoftmaxCrossEntropyForward(dl, dlab, batch, classes, probs, loss).ok());
  EXPECT_EQ(Scalar(loss), first);
}

TEST_P(BackendTest, CountCorrectTiesAcrossWideRowsGoToTheLowestIndex) {
  const int classes = 100;
  std::vector<float> logits(3 * classes, 0.0f);
  // Row 0: maximum at 40 and 7 (different lanes of a warp-wide argmax).
  logits[40] = 2.0f;
  logits[7] = 2.0f;
  // Row 1: maximum at 35 and 3 (the same lane of a 32-wide stride).
  logits[classes + 35] = 1.0f;
  logits[classes + 3] = 1.0f;
  // Row 2: single maximum at 99.
  logits[2 * classes + 99] = 0.5f;
  DeviceBuffer dl = Upload(logits), correct = Zeros(1);
  DeviceBuffer right = UploadLabels({7, 3, 99}), wrong = UploadLabels({40, 35, 98});
  ASSERT_TRUE(be().CountCorrect(dl, right, 3, classes, correct).ok());
  EXPECT_EQ(Scalar(correct), 3.0f);
  ASSERT_TRUE(be().CountCorrect(dl, wrong, 3, classes, correct).ok());
  EXPECT_EQ(Scalar(correct), 0.0f);
}

// More inputs than one kernel launch of a GPU backend takes (32), with the
// output aliasing an input that is read by the last launch.
TEST_P(BackendTest, ReduceSumOfManyInputs) {
  const int count = 70;
  const int64_t n = 1000;
  std::vector<std::vector<float>> host;
  std::vector<DeviceBuffer> bufs;
  for (int j = 0; j < count; ++j) {
    host.push_back(RandomVector(n, 100 + j));
    bufs.push_back(Upload(host.back()));
  }
  std::vector<const DeviceBuffer*> inputs;
  for (const DeviceBuffer& b : bufs) inputs.push_back(&b);
  std::vector<float> expect(n);
  for (int64_t i = 0; i < n; ++i) {
    float sum = 0.0f;
    for (int j = 0; j < count; ++j) sum += host[j][i];
    expect[i] = sum * 0.25f;
  }
  DeviceBuffer out = Zeros(n);
  ASSERT_TRUE(be().ReduceSum(inputs, 0.25f, out, n).ok());
  auto got = Download(out);
  for (int64_t i = 0; i < n; ++i) ASSERT_NEAR(got[i], expect[i], 1e-5f) << i;
  ASSERT_TRUE(be().ReduceSum(inputs, 0.25f, bufs[5], n).ok());
  got = Download(bufs[5]);
  for (int64_t i = 0; i < n; ++i) ASSERT_NEAR(got[i], expect[i], 1e-5f) << i;
}

// A buffer may outlive the backend that allocated it; another backend of
// the same device reads it.
TEST_P(BackendTest, BuffersOutliveTheirBackend) {
  DeviceBuffer kept;
  {
    auto other = CreateBackend(GetParam());
    ASSERT_TRUE(other.ok()) << other.status();
    auto buf = (*other)->Allocate(4);
    ASSERT_TRUE(buf.ok());
    const std::vector<float> v = {1, 2, 3, 4};
    ASSERT_TRUE((*other)->CopyToDevice(v.data(), *buf, 4).ok());
    ASSERT_TRUE((*other)->Synchronize().ok());
    kept = std::move(*buf);
  }
  EXPECT_EQ(Download(kept), (std::vector<float>{1, 2, 3, 4}));
  kept.Reset();
  EXPECT_TRUE(be().Synchronize().ok());
}

// Backends of the same device used from several threads at once (each
// thread its own backend), as replica threads do.
TEST_P(BackendTest, SeparateBackendsWorkConcurrentlyFromThreads) {
  constexpr int kThreads = 3;
  std::vector<std::thread> threads;
  std::vector<std::vector<float>> results(kThreads);
  std::vector<std::string> errors(kThreads);
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&, t] {
      SetFlushDenormalsToZero();
      auto backend = CreateBackend(GetParam());
      if (!backend.ok()) {
        errors[t] = backend.status().ToString();
        return;
      }
      Backend& b = **backend;
      const int m = 32, n = 16, k = 24;
      std::vector<float> a(m * k, 1.0f + t), bb(k * n, 0.5f);
      auto da = b.Allocate(m * k), db = b.Allocate(k * n), dc = b.Allocate(m * n);
      if (!da.ok() || !db.ok() || !dc.ok()) {
        errors[t] = "allocation failed";
        return;
      }
      Status s = b.CopyToDevice(a.data(), *da, m * k);
      if (s.ok()) s = b.CopyToDevice(bb.data(), *db, k * n);
      for (int rep = 0; s.ok() && rep < 20; ++rep)
        s = b.Gemm(false, false, m, n, k, 1.0f, *da, k, *db, n, 0.0f, *dc, n);
      results[t].resize(m * n);
      if (s.ok()) s = b.CopyToHost(*dc, results[t].data(), m * n);
      if (!s.ok()) errors[t] = s.ToString();
    });
  }
  for (std::thread& th : threads) th.join();
  for (int t = 0; t < kThreads; ++t) {
    ASSERT_EQ(errors[t], "") << "thread " << t;
    for (float v : results[t]) ASSERT_EQ(v, 24 * 0.5f * (1.0f + t)) << "thread " << t;
  }
}

INSTANTIATE_TEST_SUITE_P(AllBackends, BackendTest,
                         ::testing::ValuesIn(testing::ConformanceDevices()),
                         testing::DeviceParamName);

}  // namespace
}  // namespace distval
