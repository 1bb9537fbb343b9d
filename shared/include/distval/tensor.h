// Tensor basics: element types, shapes, a non-owning view and an owning,
// 64-byte aligned buffer, and conversion to Eigen maps.
//
// Thread-safety: Shape and TensorView are values. A Tensor is not internally
// synchronized; concurrent reads are fine, writes need external locking.
#ifndef DISTVAL_TENSOR_H_
#define DISTVAL_TENSOR_H_

#include <Eigen/Core>
#include <cstddef>
#include <cstdint>
#include <initializer_list>
#include <memory>
#include <span>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "distval/status.h"

namespace distval {

// Element type. Numeric values travel on the wire: never renumber.
enum class DType : uint8_t {
  kF32 = 0,
  kF16 = 1,
  kBF16 = 2,
  kF64 = 3,
  kI32 = 4,
  kI64 = 5,
};
inline constexpr int kNumDTypes = 6;

// Bytes per element (2, 4 or 8).
size_t DTypeSize(DType dtype);
// "f32", "f16", "bf16", "f64", "i32", "i64".
std::string_view DTypeName(DType dtype);
// Inverse of DTypeName; InvalidArgument naming the text otherwise.
StatusOr<DType> ParseDType(std::string_view name);
// InvalidArgument unless 0 <= value < kNumDTypes.
StatusOr<DType> DTypeFromInt(int value);

// A tensor shape: dimensions, outermost first. A scalar has no dimensions.
class Shape {
 public:
  Shape() = default;
  Shape(std::initializer_list<int64_t> dims) : dims_(dims) {}
  explicit Shape(std::vector<int64_t> dims) : dims_(std::move(dims)) {}

  // InvalidArgument (naming the index) when a dimension is negative or the
  // element count overflows int64.
  static StatusOr<Shape> Make(std::vector<int64_t> dims);

  size_t rank() const { return dims_.size(); }
  int64_t dim(size_t i) const { return dims_[i]; }
  const std::vector<int64_t>& dims() const { return dims_; }
  // Product of the dimensions (1 for a scalar).
  int64_t num_elements() const;
  // Rows along axis 0 (1 for a scalar).
  int64_t rows() const { return dims_.empty() ? 1 : dims_[0]; }
  // Elements per row along axis 0 (num_elements / rows; 1 for rank <= 1).
  int64_t row_elements() const;
  // "[13,4]".
  std::string ToString() const;

  friend bool operator==(const Shape& a, const Shape& b) { return a.dims_ == b.dims_; }
  friend bool operator!=(const Shape& a, const Shape& b) { return !(a == b); }

 private:
  std::vector<int64_t> dims_;
};

// Non-owning view of typed, contiguous, row-major data. The owner must keep
// the bytes alive for as long as the view is used.
struct TensorView {
  void* data = nullptr;
  DType dtype = DType::kF32;
  Shape shape;

  size_t num_bytes() const {
    return static_cast<size_t>(shape.num_elements()) * DTypeSize(dtype);
  }
  template <typename T>
  std::span<T> as_span() const {
    return {static_cast<T*>(data), static_cast<size_t>(shape.num_elements())};
  }
};

// Alignment of every Tensor buffer (cache line; AVX-512 friendly).
inline constexpr size_t kTensorAlignment = 64;

// Deleter for buffers from AlignedAlloc.
struct AlignedFree {
  void operator()(void* p) const noexcept;
};
using AlignedBuffer = std::unique_ptr<std::byte[], AlignedFree>;
// Allocates `bytes` (rounded up to the alignment) aligned to kTensorAlignment,
// zero-filled. Never returns null for bytes > 0 (throws std::bad_alloc).
AlignedBuffer AlignedAlloc(size_t bytes);

// An owning, 64-byte aligned, zero-initialized tensor. Movable, not copyable
// (use Clone()).
class Tensor {
 public:
  Tensor() = default;
  Tensor(DType dtype, Shape shape);
  // A tensor over memory it does not allocate (e.g. a shared-memory segment,
  // so that a co-located process can read it): `data` must be
  // kTensorAlignment aligned and hold num_bytes() bytes, and `owner` keeps
  // it valid for the tensor's lifetime (the tensor holds `owner`). The bytes
  // are used as they are, not zero-filled.
  Tensor(DType dtype, Shape shape, std::byte* data, std::shared_ptr<void> owner);

  Tensor(Tensor&& other) noexcept { *this = std::move(other); }
  Tensor& operator=(Tensor&& other) noexcept {
    dtype_ = other.dtype_;
    shape_ = std::move(other.shape_);
    buffer_ = std::move(other.buffer_);
    external_ = std::move(other.external_);
    data_ = std::exchange(other.data_, nullptr);
    return *this;
  }
  Tensor(const Tensor&) = delete;
  Tensor& operator=(const Tensor&) = delete;

  Tensor Clone() const;

  DType dtype() const { return dtype_; }
  const Shape& shape() const { return shape_; }
  int64_t num_elements() const { return shape_.num_elements(); }
  size_t num_bytes() const { return static_cast<size_t>(num_elements()) * DTypeSize(dtype_); }
  void* data() { return data_; }
  const void* data() const { return data_; }
  template <typename T>
  T* data_as() {
    return reinterpret_cast<T*>(data_);
  }
  template <typename T>
  const T* data_as() const {
    return reinterpret_cast<const T*>(data_);
  }
  TensorView view() { return TensorView{data(), dtype_, shape_}; }
  TensorView view() const { return TensorView{const_cast<void*>(data()), dtype_, shape_}; }

 private:
  DType dtype_ = DType::kF32;
  Shape shape_;
  AlignedBuffer buffer_;            // owned storage, or null
  std::shared_ptr<void> external_;  // keeps external storage alive, or null
  std::byte* data_ = nullptr;       // buffer_.get() or the external bytes
};

// Eigen maps over contiguous float data. Vector: all elements. Matrix: rows
// along axis 0 by row_elements, row-major.
using FloatVectorMap = Eigen::Map<Eigen::VectorXf>;
using ConstFloatVectorMap = Eigen::Map<const Eigen::VectorXf>;
using RowMajorMatrixXf = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
using FloatMatrixMap = Eigen::Map<RowMajorMatrixXf>;
using ConstFloatMatrixMap = Eigen::Map<const RowMajorMatrixXf>;

inline FloatVectorMap AsEigenVector(const TensorView& v) {
  return FloatVectorMap(static_cast<float*>(v.data), v.shape.num_elements());
}
inline FloatMatrixMap AsEigenMatrix(const TensorView& v) {
  return FloatMatrixMap(static_cast<float*>(v.data), v.shape.rows(), v.shape.row_elements());
}
inline FloatVectorMap AsEigenVector(Tensor& t) { return AsEigenVector(t.view()); }
inline ConstFloatVectorMap AsEigenVector(const Tensor& t) {
  return ConstFloatVectorMap(t.data_as<float>(), t.num_elements());
}
inline FloatMatrixMap AsEigenMatrix(Tensor& t) { return AsEigenMatrix(t.view()); }
inline ConstFloatMatrixMap AsEigenMatrix(const Tensor& t) {
  return ConstFloatMatrixMap(t.data_as<float>(), t.shape().rows(), t.shape().row_elements());
}

}  // namespace distval

#endif  // DISTVAL_TENSOR_H_
