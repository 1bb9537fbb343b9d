#include "distval/encoding.h"

#include <Eigen/Core>
#include <algorithm>
#include <cassert>
#include <cstring>

namespace distval::protocol {
namespace {

// Values converted per step of the unaligned path.
constexpr size_t kBounceValues = 1024;

template <typename T>
bool IsAligned(const void* p) {
  return reinterpret_cast<uintptr_t>(p) % alignof(T) == 0;
}

// f32 -> Half (Eigen::half or Eigen::bfloat16) over aligned arrays.
template <typename Half>
void Narrow(const float* in, Half* out, size_t n) {
  Eigen::Map<const Eigen::ArrayXf> src(in, static_cast<Eigen::Index>(n));
  Eigen::Map<Eigen::Array<Half, Eigen::Dynamic, 1>> dst(out, static_cast<Eigen::Index>(n));
  dst = src.template cast<Half>();
}

// Half -> f32 over aligned arrays.
template <typename Half>
void Widen(const Half* in, float* out, size_t n) {
  Eigen::Map<const Eigen::Array<Half, Eigen::Dynamic, 1>> src(in, static_cast<Eigen::Index>(n));
  Eigen::Map<Eigen::ArrayXf> dst(out, static_cast<Eigen::Index>(n));
  dst = src.template cast<float>();
}

template <typename Half>
void EncodeAs(std::span<const float> in, std::span<std::byte> out) {
  if (IsAligned<float>(in.data()) && IsAligned<Half>(out.data())) {
    Narrow(in.data(), reinterpret_cast<Half*>(out.data()), in.size());
    return;
  }
  alignas(64) float values[kBounceValues];
  alignas(64) Half halves[kBounceValues];
  for (size_t i = 0; i < in.size(); i += kBounceValues) {
    const size_t n = std::min(kBounceValues, in.size() - i);
    std::memcpy(values, reinterpret_cast<const std::byte*>(in.data()) + i * sizeof(float),
                n * sizeof(float));
    Narrow(values, halves, n);
    std::memcpy(out.data() + i * sizeof(Half), halves, n * sizeof(Half));
  }
}

template <typename Half>
void DecodeAs(std::span<const std::byte> in, std::span<float> out) {
  if (IsAligned<Half>(in.data()) && IsAligned<float>(out.data())) {
    Widen(reinterpret_cast<const Half*>(in.data()), out.data(), out.size());
    return;
  }
  alignas(64) Half halves[kBounceValues];
  alignas(64) float values[kBounceValues];
  for (size_t i = 0; i < out.size(); i += kBounceValues) {
    const size_t n = std::min(kBounceValues, out.size() - i);
    std::memcpy(halves, in.data() + i * sizeof(Half), n * sizeof(Half));
    Widen(halves, values, n);
    std::memcpy(reinterpret_cast<std::byte*>(out.data()) + i * sizeof(float), values,
                n * sizeof(float));
  }
}

}  // namespace

void EncodeFloats(std::span<const float> in, Encoding encoding, std::span<std::byte> out) {
  assert(out.size() == in.size() * EncodedElementSize(DType::kF32, encoding));
  switch (encoding) {
    case Encoding::kRaw:
      if (!in.empty()) std::memcpy(out.data(), in.data(), in.size_bytes());
      return;
    case Encoding::kF16:
      EncodeAs<Eigen::half>(in, out);
      return;
    case Encoding::kBF16:
      EncodeAs<Eigen::bfloat16>(in, out);
      return;
  }
}

void DecodeFloats(std::span<const std::byte> in, Encoding encoding, std::span<float> out) {
  assert(in.size() == out.size() * EncodedElementSize(DType::kF32, encoding));
  switch (encoding) {
    case Encoding::kRaw:
      if (!out.empty()) std::memcpy(out.data(), in.data(), out.size_bytes());
      return;
    case Encoding::kF16:
      DecodeAs<Eigen::half>(in, out);
      return;
    case Encoding::kBF16:
      DecodeAs<Eigen::bfloat16>(in, out);
      return;
  }
}

uint16_t FloatToHalfBits(float value) {
  return Eigen::numext::bit_cast<uint16_t>(Eigen::half(value));
}
float HalfBitsToFloat(uint16_t bits) {
  return static_cast<float>(Eigen::numext::bit_cast<Eigen::half>(bits));
}
uint16_t FloatToBFloat16Bits(float value) {
  return Eigen::numext::bit_cast<uint16_t>(Eigen::bfloat16(value));
}
float BFloat16BitsToFloat(uint16_t bits) {
  return static_cast<float>(Eigen::numext::bit_cast<Eigen::bfloat16>(bits));
}

}  // namespace distval::protocol
