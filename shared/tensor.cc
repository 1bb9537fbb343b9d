#include "distval/tensor.h"

#include <cstdlib>
#include <cstring>
#include <limits>
#include <new>

namespace distval {

size_t DTypeSize(DType dtype) {
  switch (dtype) {
    case DType::kF16:
    case DType::kBF16: return 2;
    case DType::kF32:
    case DType::kI32: return 4;
    case DType::kF64:
    case DType::kI64: return 8;
  }
  return 0;
}

std::string_view DTypeName(DType dtype) {
  switch (dtype) {
    case DType::kF32: return "f32";
    case DType::kF16: return "f16";
    case DType::kBF16: return "bf16";
    case DType::kF64: return "f64";
    case DType::kI32: return "i32";
    case DType::kI64: return "i64";
  }
  return "invalid";
}

StatusOr<DType> ParseDType(std::string_view name) {
  for (int i = 0; i < kNumDTypes; ++i) {
    auto d = static_cast<DType>(i);
    if (DTypeName(d) == name) return d;
  }
  if (name == "float32" || name == "float") return DType::kF32;
  if (name == "float64" || name == "double") return DType::kF64;
  return InvalidArgumentError("unknown dtype '" + std::string(name) +
                              "' (expected f32, f16, bf16, f64, i32 or i64)");
}

StatusOr<DType> DTypeFromInt(int value) {
  if (value < 0 || value >= kNumDTypes)
    return InvalidArgumentError("dtype value " + std::to_string(value) + " is out of range");
  return static_cast<DType>(value);
}

StatusOr<Shape> Shape::Make(std::vector<int64_t> dims) {
  int64_t n = 1;
  for (size_t i = 0; i < dims.size(); ++i) {
    if (dims[i] < 0)
      return InvalidArgumentError("shape dimension " + std::to_string(i) + " is negative (" +
                                  std::to_string(dims[i]) + ")");
    if (dims[i] != 0 && n > std::numeric_limits<int64_t>::max() / dims[i])
      return InvalidArgumentError("shape element count overflows at dimension " +
                                  std::to_string(i));
    n *= dims[i];
  }
  return Shape(std::move(dims));
}

int64_t Shape::num_elements() const {
  int64_t n = 1;
  for (int64_t d : dims_) n *= d;
  return n;
}

int64_t Shape::row_elements() const {
  if (dims_.size() <= 1) return 1;
  int64_t n = 1;
  for (size_t i = 1; i < dims_.size(); ++i) n *= dims_[i];
  return n;
}

std::string Shape::ToString() const {
  std::string s = "[";
  for (size_t i = 0; i < dims_.size(); ++i) {
    if (i) s += ",";
    s += std::to_string(dims_[i]);
  }
  return s + "]";
}

void AlignedFree::operator()(void* p) const noexcept { std::free(p); }

AlignedBuffer AlignedAlloc(size_t bytes) {
  if (bytes == 0) return AlignedBuffer(nullptr);
  size_t rounded = (bytes + kTensorAlignment - 1) / kTensorAlignment * kTensorAlignment;
  void* p = std::aligned_alloc(kTensorAlignment, rounded);
  if (p == nullptr) throw std::bad_alloc();
  std::memset(p, 0, rounded);
  return AlignedBuffer(static_cast<std::byte*>(p));
}

Tensor::Tensor(DType dtype, Shape shape)
    : dtype_(dtype), shape_(std::move(shape)), buffer_(AlignedAlloc(num_bytes())) {
  data_ = buffer_.get();
}

Tensor::Tensor(DType dtype, Shape shape, std::byte* data, std::shared_ptr<void> owner)
    : dtype_(dtype), shape_(std::move(shape)), external_(std::move(owner)), data_(data) {}

Tensor Tensor::Clone() const {
  Tensor t(dtype_, shape_);
  if (num_bytes()) std::memcpy(t.data(), data(), num_bytes());
  return t;
}

}  // namespace distval
