#include "distval/backend.h"

#include <string>
#include <string_view>

namespace distval {

DeviceBuffer& DeviceBuffer::operator=(DeviceBuffer&& other) noexcept {
  if (this != &other) {
    Reset();
    allocator_ = std::move(other.allocator_);
    device_ = other.device_;
    dtype_ = other.dtype_;
    data_ = other.data_;
    size_ = other.size_;
    other.allocator_.reset();
    other.data_ = nullptr;
    other.size_ = 0;
  }
  return *this;
}

DeviceBuffer DeviceBuffer::Adopt(std::shared_ptr<DeviceAllocator> allocator, DeviceSpec device,
                                 DType dtype, void* data, int64_t num_elements) {
  DeviceBuffer b;
  b.allocator_ = std::move(allocator);
  b.device_ = device;
  b.dtype_ = dtype;
  b.data_ = data;
  b.size_ = num_elements;
  return b;
}

void DeviceBuffer::Reset() noexcept {
  if (data_ != nullptr && allocator_ != nullptr) allocator_->Free(data_);
  data_ = nullptr;
  size_ = 0;
  allocator_.reset();
}

namespace {

std::string Num(int64_t v) { return std::to_string(v); }

// Elements a row-major rows x cols matrix with leading dimension ld spans.
int64_t MatrixSpan(int64_t rows, int64_t cols, int64_t ld) {
  if (rows <= 0 || cols <= 0) return 0;
  return (rows - 1) * ld + cols;
}

class Checker {
 public:
  Checker(const Backend& backend, std::string_view op) : backend_(backend), op_(op) {}

  Status Error(const std::string& what) const {
    return InvalidArgumentError(std::string(op_) + " on " + backend_.Name() + ": " + what);
  }

  // The buffer is accessible, has `dtype` and at least `needed` elements.
  Status Buffer(std::string_view arg, const DeviceBuffer& b, DType dtype, int64_t needed,
                std::string_view why = {}) const {
    if (!backend_.CanAccess(b))
      return Error("buffer '" + std::string(arg) + "' lives on " + b.device().ToString() +
                   ", which this backend cannot access");
    if (b.dtype() != dtype && !(b.empty() && needed == 0))
      return Error("buffer '" + std::string(arg) + "' has dtype " +
                   std::string(DTypeName(b.dtype())) + ", needs " + std::string(DTypeName(dtype)));
    if (b.size() < needed) {
      std::string msg = "buffer '" + std::string(arg) + "' holds " + Num(b.size()) +
                        " elements, needs " + Num(needed);
      if (!why.empty()) msg += " (" + std::string(why) + ")";
      return Error(msg);
    }
    return OkStatus();
  }

  Status NonNegative(std::string_view arg, int64_t v) const {
    if (v < 0) return Error(std::string(arg) + " is negative (" + Num(v) + ")");
    return OkStatus();
  }
  Status Positive(std::string_view arg, int64_t v) const {
    if (v < 1) return Error(std::string(arg) + " must be >= 1 (got " + Num(v) + ")");
    return OkStatus();
  }

 private:
  const Backend& backend_;
  std::string_view op_;
};

}  // namespace

bool Backend::CanAccess(const DeviceBuffer& buffer) const {
  return buffer.empty() || buffer.device() == device_;
}

StatusOr<DeviceBuffer> Backend::Allocate(int64_t num_elements, DType dtype) {
  Checker ck(*this, "Allocate");
  DV_RETURN_IF_ERROR(ck.NonNegative("num_elements", num_elements));
  if (dtype != DType::kF32 && dtype != DType::kI32)
    return ck.Error("dtype " + std::string(DTypeName(dtype)) + " is not supported (f32 or i32)");
  return DoAllocate(num_elements, dtype);
}

namespace {
Status CheckRange(const Checker& ck, std::string_view arg, const DeviceBuffer& b, DType dtype,
                  int64_t n, int64_t offset, std::string_view offset_name) {
  DV_RETURN_IF_ERROR(ck.NonNegative("n", n));
  DV_RETURN_IF_ERROR(ck.NonNegative(offset_name, offset));
  std::string why = std::string(offset_name) + "=" + Num(offset) + ", n=" + Num(n);
  return ck.Buffer(arg, b, dtype, n == 0 ? 0 : offset + n, why);
}
}  // namespace

Status Backend::CopyToDevice(const float* host, DeviceBuffer& dst, int64_t n, int64_t dst_offset) {
  Checker ck(*this, "CopyToDevice");
  DV_RETURN_IF_ERROR(CheckRange(ck, "dst", dst, DType::kF32, n, dst_offset, "dst_offset"));
  if (n == 0) return OkStatus();
  if (host == nullptr) return ck.Error("host pointer is null");
  return DoCopyToDevice(host, dst, static_cast<size_t>(dst_offset) * sizeof(float),
                        static_cast<size_t>(n) * sizeof(float));
}

Status Backend::CopyToDevice(const int32_t* host, DeviceBuffer& dst, int64_t n,
                             int64_t dst_offset) {
  Checker ck(*this, "CopyToDevice");
  DV_RETURN_IF_ERROR(CheckRange(ck, "dst", dst, DType::kI32, n, dst_offset, "dst_offset"));
  if (n == 0) return OkStatus();
  if (host == nullptr) return ck.Error("host pointer is null");
  return DoCopyToDevice(host, dst, static_cast<size_t>(dst_offset) * sizeof(int32_t),
                        static_cast<size_t>(n) * sizeof(int32_t));
}

Status Backend::CopyToHost(const DeviceBuffer& src, float* host, int64_t n, int64_t src_offset) {
  Checker ck(*this, "CopyToHost");
  DV_RETURN_IF_ERROR(CheckRange(ck, "src", src, DType::kF32, n, src_offset, "src_offset"));
  if (n == 0) return OkStatus();
  if (host == nullptr) return ck.Error("host pointer is null");
  return DoCopyToHost(src, static_cast<size_t>(src_offset) * sizeof(float), host,
                      static_cast<size_t>(n) * sizeof(float));
}

Status Backend::CopyToHost(const DeviceBuffer& src, int32_t* host, int64_t n, int64_t src_offset) {
  Checker ck(*this, "CopyToHost");
  DV_RETURN_IF_ERROR(CheckRange(ck, "src", src, DType::kI32, n, src_offset, "src_offset"));
  if (n == 0) return OkStatus();
  if (host == nullptr) return ck.Error("host pointer is null");
  return DoCopyToHost(src, static_cast<size_t>(src_offset) * sizeof(int32_t), host,
                      static_cast<size_t>(n) * sizeof(int32_t));
}

Status Backend::Copy(const DeviceBuffer& src, DeviceBuffer& dst, int64_t n) {
  Checker ck(*this, "Copy");
  DV_RETURN_IF_ERROR(ck.NonNegative("n", n));
  DV_RETURN_IF_ERROR(ck.Buffer("src", src, src.dtype(), n));
  DV_RETURN_IF_ERROR(ck.Buffer("dst", dst, src.dtype(), n));
  if (n == 0) return OkStatus();
  if (&src == &dst) return ck.Error("src and dst are the same buffer");
  return DoCopy(src, dst, static_cast<size_t>(n) * DTypeSize(src.dtype()));
}

Status Backend::Fill(DeviceBuffer& buffer, float value) {
  Checker ck(*this, "Fill");
  DV_RETURN_IF_ERROR(ck.Buffer("buffer", buffer, DType::kF32, 0));
  if (buffer.empty()) return OkStatus();
  return DoFill(buffer, value);
}

Status Backend::Zero(DeviceBuffer& buffer) {
  Checker ck(*this, "Zero");
  DV_RETURN_IF_ERROR(ck.Buffer("buffer", buffer, buffer.dtype(), 0));
  if (buffer.empty()) return OkStatus();
  return DoZero(buffer);
}

Status Backend::Gemm(bool trans_a, bool trans_b, int m, int n, int k, float alpha,
                     const DeviceBuffer& a, int lda, const DeviceBuffer& b, int ldb, float beta,
                     DeviceBuffer& c, int ldc) {
  Checker ck(*this, "Gemm");
  DV_RETURN_IF_ERROR(ck.NonNegative("m", m));
  DV_RETURN_IF_ERROR(ck.NonNegative("n", n));
  DV_RETURN_IF_ERROR(ck.NonNegative("k", k));
  // Stored shapes.
  const int64_t a_rows = trans_a ? k : m, a_cols = trans_a ? m : k;
  const int64_t b_rows = trans_b ? n : k, b_cols = trans_b ? k : n;
  auto check_ld = [&](std::string_view name, int64_t ld, int64_t cols) -> Status {
    const int64_t min_ld = cols > 1 ? cols : 1;
    if (ld < min_ld)
      return ck.Error(std::string(name) + "=" + Num(ld) + " is less than the stored row length " +
                      Num(min_ld));
    return OkStatus();
  };
  DV_RETURN_IF_ERROR(check_ld("lda", lda, a_cols));
  DV_RETURN_IF_ERROR(check_ld("ldb", ldb, b_cols));
  DV_RETURN_IF_ERROR(check_ld("ldc", ldc, n));
  const std::string dims = std::string("trans_a=") + (trans_a ? "true" : "false") +
                           ", trans_b=" + (trans_b ? "true" : "false") + ", m=" + Num(m) +
                           ", n=" + Num(n) + ", k=" + Num(k);
  const bool empty = m == 0 || n == 0;
  DV_RETURN_IF_ERROR(ck.Buffer("a", a, DType::kF32, empty ? 0 : MatrixSpan(a_rows, a_cols, lda),
                               dims + ", lda=" + Num(lda)));
  DV_RETURN_IF_ERROR(ck.Buffer("b", b, DType::kF32, empty ? 0 : MatrixSpan(b_rows, b_cols, ldb),
                               dims + ", ldb=" + Num(ldb)));
  DV_RETURN_IF_ERROR(
      ck.Buffer("c", c, DType::kF32, MatrixSpan(m, n, ldc), dims + ", ldc=" + Num(ldc)));
  if (empty) return OkStatus();
  if (&c == &a || &c == &b) return ck.Error("c aliases a or b");
  return DoGemm(trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}

Status Backend::BiasAdd(DeviceBuffer& x, const DeviceBuffer& bias, int rows, int cols) {
  Checker ck(*this, "BiasAdd");
  DV_RETURN_IF_ERROR(ck.NonNegative("rows", rows));
  DV_RETURN_IF_ERROR(ck.NonNegative("cols", cols));
  const std::string dims = "rows=" + Num(rows) + ", cols=" + Num(cols);
  DV_RETURN_IF_ERROR(ck.Buffer("x", x, DType::kF32, int64_t{rows} * cols, dims));
  DV_RETURN_IF_ERROR(ck.Buffer("bias", bias, DType::kF32, rows == 0 ? 0 : cols, dims));
  if (rows == 0 || cols == 0) return OkStatus();
  if (&x == &bias) return ck.Error("x and bias are the same buffer");
  return DoBiasAdd(x, bias, rows, cols);
}

Status Backend::BiasGrad(const DeviceBuffer& dy, int rows, int cols, DeviceBuffer& bias_grad) {
  Checker ck(*this, "BiasGrad");
  DV_RETURN_IF_ERROR(ck.NonNegative("rows", rows));
  DV_RETURN_IF_ERROR(ck.NonNegative("cols", cols));
  const std::string dims = "rows=" + Num(rows) + ", cols=" + Num(cols);
  DV_RETURN_IF_ERROR(ck.Buffer("dy", dy, DType::kF32, int64_t{rows} * cols, dims));
  DV_RETURN_IF_ERROR(ck.Buffer("bias_grad", bias_grad, DType::kF32, cols, dims));
  if (cols == 0) return OkStatus();
  if (&dy == &bias_grad) return ck.Error("dy and bias_grad are the same buffer");
  return DoBiasGrad(dy, rows, cols, bias_grad);
}

Status Backend::ReluForward(const DeviceBuffer& x, DeviceBuffer& y, int64_t n) {
  Checker ck(*this, "ReluForward");
  DV_RETURN_IF_ERROR(ck.NonNegative("n", n));
  DV_RETURN_IF_ERROR(ck.Buffer("x", x, DType::kF32, n));
  DV_RETURN_IF_ERROR(ck.Buffer("y", y, DType::kF32, n));
  if (n == 0) return OkStatus();
  return DoReluForward(x, y, n);
}

Status Backend::ReluBackward(const DeviceBuffer& y, const DeviceBuffer& dy, DeviceBuffer& dx,
                             int64_t n) {
  Checker ck(*this, "ReluBackward");
  DV_RETURN_IF_ERROR(ck.NonNegative("n", n));
  DV_RETURN_IF_ERROR(ck.Buffer("y", y, DType::kF32, n));
  DV_RETURN_IF_ERROR(ck.Buffer("dy", dy, DType::kF32, n));
  DV_RETURN_IF_ERROR(ck.Buffer("dx", dx, DType::kF32, n));
  if (n == 0) return OkStatus();
  return DoReluBackward(y, dy, dx, n);
}

Status Backend::SoftmaxCrossEntropyForward(const DeviceBuffer& logits, const DeviceBuffer& labels,
                                           int batch, int classes, DeviceBuffer& probs,
                                           DeviceBuffer& loss) {
  Checker ck(*this, "SoftmaxCrossEntropyForward");
  DV_RETURN_IF_ERROR(ck.Positive("batch", batch));
  DV_RETURN_IF_ERROR(ck.Positive("classes", classes));
  const std::string dims = "batch=" + Num(batch) + ", classes=" + Num(classes);
  DV_RETURN_IF_ERROR(ck.Buffer("logits", logits, DType::kF32, int64_t{batch} * classes, dims));
  DV_RETURN_IF_ERROR(ck.Buffer("labels", labels, DType::kI32, batch, dims));
  DV_RETURN_IF_ERROR(ck.Buffer("probs", probs, DType::kF32, int64_t{batch} * classes, dims));
  DV_RETURN_IF_ERROR(ck.Buffer("loss", loss, DType::kF32, 1));
  if (&loss == &logits || &loss == &probs) return ck.Error("loss aliases logits or probs");
  return DoSoftmaxCrossEntropyForward(logits, labels, batch, classes, probs, loss);
}

Status Backend::SoftmaxCrossEntropyBackward(const DeviceBuffer& probs, const DeviceBuffer& labels,
                                            int batch, int classes, float scale,
                                            DeviceBuffer& dlogits) {
  Checker ck(*this, "SoftmaxCrossEntropyBackward");
  DV_RETURN_IF_ERROR(ck.Positive("batch", batch));
  DV_RETURN_IF_ERROR(ck.Positive("classes", classes));
  const std::string dims = "batch=" + Num(batch) + ", classes=" + Num(classes);
  DV_RETURN_IF_ERROR(ck.Buffer("probs", probs, DType::kF32, int64_t{batch} * classes, dims));
  DV_RETURN_IF_ERROR(ck.Buffer("labels", labels, DType::kI32, batch, dims));
  DV_RETURN_IF_ERROR(ck.Buffer("dlogits", dlogits, DType::kF32, int64_t{batch} * classes, dims));
  return DoSoftmaxCrossEntropyBackward(probs, labels, batch, classes, scale, dlogits);
}

Status Backend::CountCorrect(const DeviceBuffer& logits, const DeviceBuffer& labels, int batch,
                             int classes, DeviceBuffer& correct) {
  Checker ck(*this, "CountCorrect");
  DV_RETURN_IF_ERROR(ck.NonNegative("batch", batch));
  DV_RETURN_IF_ERROR(ck.Positive("classes", classes));
  const std::string dims = "batch=" + Num(batch) + ", classes=" + Num(classes);
  DV_RETURN_IF_ERROR(ck.Buffer("logits", logits, DType::kF32, int64_t{batch} * classes, dims));
  DV_RETURN_IF_ERROR(ck.Buffer("labels", labels, DType::kI32, batch, dims));
  DV_RETURN_IF_ERROR(ck.Buffer("correct", correct, DType::kF32, 1));
  if (&correct == &logits) return ck.Error("correct and logits are the same buffer");
  if (batch == 0) return DoFill(correct, 0.0f);
  return DoCountCorrect(logits, labels, batch, classes, correct);
}

Status Backend::Axpy(float alpha, const DeviceBuffer& x, DeviceBuffer& y, int64_t n) {
  Checker ck(*this, "Axpy");
  DV_RETURN_IF_ERROR(ck.NonNegative("n", n));
  DV_RETURN_IF_ERROR(ck.Buffer("x", x, DType::kF32, n));
  DV_RETURN_IF_ERROR(ck.Buffer("y", y, DType::kF32, n));
  if (n == 0) return OkStatus();
  if (&x == &y) return ck.Error("x and y are the same buffer");
  return DoAxpy(alpha, x, y, n);
}

Status Backend::Scale(float alpha, DeviceBuffer& x, int64_t n) {
  Checker ck(*this, "Scale");
  DV_RETURN_IF_ERROR(ck.NonNegative("n", n));
  DV_RETURN_IF_ERROR(ck.Buffer("x", x, DType::kF32, n));
  if (n == 0) return OkStatus();
  return DoScale(alpha, x, n);
}

Status Backend::ReduceSum(std::span<const DeviceBuffer* const> inputs, float scale,
                          DeviceBuffer& out, int64_t n) {
  Checker ck(*this, "ReduceSum");
  DV_RETURN_IF_ERROR(ck.NonNegative("n", n));
  if (inputs.empty()) return ck.Error("no inputs");
  for (size_t i = 0; i < inputs.size(); ++i) {
    const std::string name = "inputs[" + std::to_string(i) + "]";
    if (inputs[i] == nullptr) return ck.Error(name + " is null");
    DV_RETURN_IF_ERROR(ck.Buffer(name, *inputs[i], DType::kF32, n));
  }
  DV_RETURN_IF_ERROR(ck.Buffer("out", out, DType::kF32, n));
  if (n == 0) return OkStatus();
  return DoReduceSum(inputs, scale, out, n);
}

Status Backend::Synchronize() { return DoSynchronize(); }

}  // namespace distval
