// GCC 12 reports a false -Wmaybe-uninitialized inside avx512fintrin.h when
// Eigen's GEMM packing (ptranspose of __m512) is inlined with -march=native on
// AVX-512 machines. The warning is in the compiler's intrinsic header, not in
// this code; silence it for this file only.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif

#include "cpu_backend.h"

#include <Eigen/Core>
#include <algorithm>
#include <cmath>
#include <cstring>
#include <new>
#include <string>

namespace distval {

namespace {

// Host memory from AlignedAlloc (64-byte aligned, zero-filled).
class CpuAllocator final : public DeviceAllocator {
 public:
  void Free(void* data) noexcept override { AlignedFree()(data); }
};

using Stride = Eigen::OuterStride<>;
using ConstStridedMap = Eigen::Map<const RowMajorMatrixXf, Eigen::Unaligned, Stride>;
using StridedMap = Eigen::Map<RowMajorMatrixXf, Eigen::Unaligned, Stride>;
using ConstArrayMap = Eigen::Map<const Eigen::ArrayXf>;
using ArrayMap = Eigen::Map<Eigen::ArrayXf>;

const float* F(const DeviceBuffer& b) { return b.data_as<float>(); }
float* F(DeviceBuffer& b) { return b.data_as<float>(); }
const int32_t* I(const DeviceBuffer& b) { return b.data_as<int32_t>(); }

template <typename OpA, typename OpB>
void GemmImpl(const OpA& a, const OpB& b, int k, float alpha, float beta, StridedMap& c) {
  if (k == 0) {
    if (beta == 0.0f) {
      c.setZero();
    } else {
      c *= beta;
    }
    return;
  }
  if (beta == 0.0f) {
    c.noalias() = alpha * a * b;
  } else {
    if (beta != 1.0f) c *= beta;
    c.noalias() += alpha * a * b;
  }
}

Status BadLabel(std::string_view op, int row, int32_t label, int classes) {
  return InvalidArgumentError(std::string(op) + ": label " + std::to_string(label) + " of row " +
                              std::to_string(row) + " is outside [0, " + std::to_string(classes) +
                              ")");
}

}  // namespace

CpuBackend::CpuBackend(int index)
    : Backend(DeviceSpec{DeviceKind::kCpu, index}), allocator_(std::make_shared<CpuAllocator>()) {}

CpuBackend::~CpuBackend() = default;

bool CpuBackend::CanAccess(const DeviceBuffer& buffer) const {
  return buffer.empty() || buffer.device().kind == DeviceKind::kCpu;
}

StatusOr<DeviceBuffer> CpuBackend::DoAllocate(int64_t num_elements, DType dtype) {
  if (num_elements == 0) return DeviceBuffer::Adopt(allocator_, device(), dtype, nullptr, 0);
  const size_t bytes = static_cast<size_t>(num_elements) * DTypeSize(dtype);
  AlignedBuffer memory;
  try {
    memory = AlignedAlloc(bytes);
  } catch (const std::bad_alloc&) {
    return ResourceExhaustedError("Allocate on " + Name() + ": out of host memory for " +
                                  std::to_string(num_elements) + " elements (" +
                                  std::to_string(bytes) + " bytes)");
  }
  return DeviceBuffer::Adopt(allocator_, device(), dtype, memory.release(), num_elements);
}

Status CpuBackend::DoCopyToDevice(const void* host, DeviceBuffer& dst, size_t byte_offset,
                                  size_t bytes) {
  std::memcpy(static_cast<std::byte*>(dst.data()) + byte_offset, host, bytes);
  return OkStatus();
}

Status CpuBackend::DoCopyToHost(const DeviceBuffer& src, size_t byte_offset, void* host,
                                size_t bytes) {
  std::memcpy(host, static_cast<const std::byte*>(src.data()) + byte_offset, bytes);
  return OkStatus();
}

Status CpuBackend::DoCopy(const DeviceBuffer& src, DeviceBuffer& dst, size_t bytes) {
  std::memcpy(dst.data(), src.data(), bytes);
  return OkStatus();
}

Status CpuBackend::DoFill(DeviceBuffer& buffer, float value) {
  ArrayMap(F(buffer), buffer.size()).setConstant(value);
  return OkStatus();
}

Status CpuBackend::DoZero(DeviceBuffer& buffer) {
  std::memset(buffer.data(), 0, buffer.num_bytes());
  return OkStatus();
}

Status CpuBackend::DoGemm(bool trans_a, bool trans_b, int m, int n, int k, float alpha,
                          const DeviceBuffer& a, int lda, const DeviceBuffer& b, int ldb,
                          float beta, DeviceBuffer& c, int ldc) {
  // Stored shapes; with k == 0 the operands are never read.
  const int a_rows = trans_a ? k : m, a_cols = trans_a ? m : k;
  const int b_rows = trans_b ? n : k, b_cols = trans_b ? k : n;
  ConstStridedMap am(F(a), a_rows, a_cols, Stride(lda));
  ConstStridedMap bm(F(b), b_rows, b_cols, Stride(ldb));
  StridedMap cm(F(c), m, n, Stride(ldc));
  if (!trans_a && !trans_b) {
    GemmImpl(am, bm, k, alpha, beta, cm);
  } else if (!trans_a && trans_b) {
    GemmImpl(am, bm.transpose(), k, alpha, beta, cm);
  } else if (trans_a && !trans_b) {
    GemmImpl(am.transpose(), bm, k, alpha, beta, cm);
  } else {
    GemmImpl(am.transpose(), bm.transpose(), k, alpha, beta, cm);
  }
  return OkStatus();
}

Status CpuBackend::DoBiasAdd(DeviceBuffer& x, const DeviceBuffer& bias, int rows, int cols) {
  FloatMatrixMap xm(F(x), rows, cols);
  Eigen::Map<const Eigen::RowVectorXf> bv(F(bias), cols);
  xm.rowwise() += bv;
  return OkStatus();
}

Status CpuBackend::DoBiasGrad(const DeviceBuffer& dy, int rows, int cols, DeviceBuffer& bias_grad) {
  // Row by row: contiguous, vectorized adds over the row-major matrix.
  Eigen::Map<Eigen::RowVectorXf> g(F(bias_grad), cols);
  g.setZero();
  ConstFloatMatrixMap d(F(dy), rows, cols);
  for (int r = 0; r < rows; ++r) g += d.row(r);
  return OkStatus();
}

Status CpuBackend::DoReluForward(const DeviceBuffer& x, DeviceBuffer& y, int64_t n) {
  ArrayMap(F(y), n) = ConstArrayMap(F(x), n).max(0.0f);
  return OkStatus();
}

Status CpuBackend::DoReluBackward(const DeviceBuffer& y, const DeviceBuffer& dy, DeviceBuffer& dx,
                                  int64_t n) {
  ConstArrayMap ya(F(y), n), dya(F(dy), n);
  ArrayMap(F(dx), n) = (ya > 0.0f).select(dya, 0.0f);
  return OkStatus();
}

Status CpuBackend::DoSoftmaxCrossEntropyForward(const DeviceBuffer& logits,
                                                const DeviceBuffer& labels, int batch, int classes,
                                                DeviceBuffer& probs, DeviceBuffer& loss) {
  ConstFloatMatrixMap lg(F(logits), batch, classes);
  FloatMatrixMap pr(F(probs), batch, classes);
  const int32_t* lab = I(labels);
  for (int r = 0; r < batch; ++r) {
    if (lab[r] < 0 || lab[r] >= classes)
      return BadLabel("SoftmaxCrossEntropyForward", r, lab[r], classes);
  }
  double total = 0.0;
  for (int r = 0; r < batch; ++r) {
    const float mx = lg.row(r).maxCoeff();
    // Read before writing: probs may be the logits buffer.
    const float target = lg(r, lab[r]) - mx;
    auto p = pr.row(r);
    p.array() = (lg.row(r).array() - mx).exp();
    const float sum = p.sum();
    p /= sum;
    total += static_cast<double>(std::log(sum)) - target;
  }
  F(loss)[0] = static_cast<float>(total / batch);
  return OkStatus();
}

Status CpuBackend::DoSoftmaxCrossEntropyBackward(const DeviceBuffer& probs,
                                                 const DeviceBuffer& labels, int batch, int classes,
                                                 float scale, DeviceBuffer& dlogits) {
  const int32_t* lab = I(labels);
  for (int r = 0; r < batch; ++r) {
    if (lab[r] < 0 || lab[r] >= classes)
      return BadLabel("SoftmaxCrossEntropyBackward", r, lab[r], classes);
  }
  const int64_t n = int64_t{batch} * classes;
  ArrayMap(F(dlogits), n) = ConstArrayMap(F(probs), n) * scale;
  float* d = F(dlogits);
  for (int r = 0; r < batch; ++r) d[int64_t{r} * classes + lab[r]] -= scale;
  return OkStatus();
}

Status CpuBackend::DoCountCorrect(const DeviceBuffer& logits, const DeviceBuffer& labels, int batch,
                                  int classes, DeviceBuffer& correct) {
  const float* lg = F(logits);
  const int32_t* lab = I(labels);
  int64_t count = 0;
  for (int r = 0; r < batch; ++r) {
    if (lab[r] < 0 || lab[r] >= classes) return BadLabel("CountCorrect", r, lab[r], classes);
    const float* row = lg + int64_t{r} * classes;
    int best = 0;
    for (int c = 1; c < classes; ++c) {
      if (row[c] > row[best]) best = c;  // strict: ties keep the lowest index
    }
    if (best == lab[r]) ++count;
  }
  F(correct)[0] = static_cast<float>(count);
  return OkStatus();
}

Status CpuBackend::DoAxpy(float alpha, const DeviceBuffer& x, DeviceBuffer& y, int64_t n) {
  ArrayMap(F(y), n) += alpha * ConstArrayMap(F(x), n);
  return OkStatus();
}

Status CpuBackend::DoScale(float alpha, DeviceBuffer& x, int64_t n) {
  ArrayMap(F(x), n) *= alpha;
  return OkStatus();
}

Status CpuBackend::DoReduceSum(std::span<const DeviceBuffer* const> inputs, float scale,
                               DeviceBuffer& out, int64_t n) {
  // One pass over memory in L1-sized chunks; every chunk is read from all
  // inputs before it is written, so `out` may be one of the inputs.
  constexpr int64_t kChunk = 2048;
  alignas(64) float acc[kChunk];
  float* o = F(out);
  for (int64_t start = 0; start < n; start += kChunk) {
    const int64_t len = std::min(kChunk, n - start);
    Eigen::Map<Eigen::ArrayXf, Eigen::Aligned64> a(acc, len);
    a = ConstArrayMap(F(*inputs[0]) + start, len);
    for (size_t j = 1; j < inputs.size(); ++j) a += ConstArrayMap(F(*inputs[j]) + start, len);
    ArrayMap(o + start, len) = a * scale;
  }
  return OkStatus();
}

Status CpuBackend::DoSynchronize() { return OkStatus(); }

}  // namespace distval
