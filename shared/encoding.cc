#include "distval/encoding.h"

#include <Eigen/Core>
#include <algorithm>
#include <cassert>
#include <cstring>

#if defined(__F16C__)
#include <immintrin.h>
#endif

namespace distval::protocol {
namespace {

// Elements are read and written through memcpy (or unaligned vector
// loads/stores): payload frames may sit at any offset of a receive buffer.

float LoadF32(const std::byte* p) {
  float v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
void StoreF32(std::byte* p, float v) { std::memcpy(p, &v, sizeof(v)); }
uint16_t LoadU16(const std::byte* p) {
  uint16_t v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
void StoreU16(std::byte* p, uint16_t v) { std::memcpy(p, &v, sizeof(v)); }

// bfloat16 with round to nearest even; NaN stays NaN (quiet, sign kept).
uint16_t ToBFloat16(float value) {
  uint32_t bits;
  std::memcpy(&bits, &value, sizeof(bits));
  if ((bits & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((bits >> 16) | 0x0040u);
  return static_cast<uint16_t>((bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16);
}
float FromBFloat16(uint16_t bits) {
  const uint32_t wide = uint32_t{bits} << 16;
  float value;
  std::memcpy(&value, &wide, sizeof(value));
  return value;
}

void EncodeF16(const std::byte* in, std::byte* out, size_t n) {
  size_t i = 0;
#if defined(__F16C__)
  for (; i + 8 <= n; i += 8) {
    const __m256 v = _mm256_loadu_ps(reinterpret_cast<const float*>(in + 4 * i));
    const __m128i h = _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out + 2 * i), h);
  }
#endif
  for (; i < n; ++i) StoreU16(out + 2 * i, FloatToHalfBits(LoadF32(in + 4 * i)));
}

void DecodeF16(const std::byte* in, std::byte* out, size_t n) {
  size_t i = 0;
#if defined(__F16C__)
  for (; i + 8 <= n; i += 8) {
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(in + 2 * i));
    _mm256_storeu_ps(reinterpret_cast<float*>(out + 4 * i), _mm256_cvtph_ps(h));
  }
#endif
  for (; i < n; ++i) StoreF32(out + 4 * i, HalfBitsToFloat(LoadU16(in + 2 * i)));
}

// Plain loops: the compiler vectorizes them (integer arithmetic only).
void EncodeBF16(const std::byte* in, std::byte* out, size_t n) {
  for (size_t i = 0; i < n; ++i) StoreU16(out + 2 * i, ToBFloat16(LoadF32(in + 4 * i)));
}
void DecodeBF16(const std::byte* in, std::byte* out, size_t n) {
  for (size_t i = 0; i < n; ++i) StoreF32(out + 4 * i, FromBFloat16(LoadU16(in + 2 * i)));
}

}  // namespace

void EncodeFloats(std::span<const float> in, Encoding encoding, std::span<std::byte> out) {
  assert(out.size() == in.size() * EncodedElementSize(DType::kF32, encoding));
  const auto* src = reinterpret_cast<const std::byte*>(in.data());
  switch (encoding) {
    case Encoding::kRaw:
      if (!in.empty()) std::memcpy(out.data(), src, in.size_bytes());
      return;
    case Encoding::kF16:
      EncodeF16(src, out.data(), in.size());
      return;
    case Encoding::kBF16:
      EncodeBF16(src, out.data(), in.size());
      return;
  }
}

void DecodeFloats(std::span<const std::byte> in, Encoding encoding, std::span<float> out) {
  assert(in.size() == out.size() * EncodedElementSize(DType::kF32, encoding));
  auto* dst = reinterpret_cast<std::byte*>(out.data());
  switch (encoding) {
    case Encoding::kRaw:
      if (!out.empty()) std::memcpy(dst, in.data(), out.size_bytes());
      return;
    case Encoding::kF16:
      DecodeF16(in.data(), dst, out.size());
      return;
    case Encoding::kBF16:
      DecodeBF16(in.data(), dst, out.size());
      return;
  }
}

namespace {
// Counts the words of type W whose bits under `mask` are all ones. A loop
// without early exit: the compiler vectorizes it.
template <typename W>
size_t CountExponentAllOnes(const std::byte* p, size_t n, W mask) {
  size_t count = 0;
  for (size_t i = 0; i < n; ++i) {
    W w;
    std::memcpy(&w, p + i * sizeof(W), sizeof(W));
    count += (w & mask) == mask;
  }
  return count;
}

// Whether any word of type W has all the bits under `mask` set: a word has
// them all set exactly when ~(w | ~mask) is 0, so one running minimum
// answers, without widening a count per element (20-25 % faster than
// counting with AVX-512, 1 MiB in cache and 16 MiB from memory alike).
template <typename W>
bool AnyExponentAllOnes(const std::byte* p, size_t n, W mask) {
  const W others = static_cast<W>(~mask);
  W least = static_cast<W>(~W{0});
  for (size_t i = 0; i < n; ++i) {
    W w;
    std::memcpy(&w, p + i * sizeof(W), sizeof(W));
    least = std::min(least, static_cast<W>(~(w | others)));
  }
  return least == 0;
}

template <typename W>
size_t CountNonFiniteWords(const std::byte* p, size_t n, W mask) {
  // Checked in blocks that stay in the L1 cache, so that the exact count
  // (after a hit) reads them from there.
  constexpr size_t kBlock = 4096 / sizeof(W);
  size_t count = 0;
  for (size_t at = 0; at < n; at += kBlock) {
    const size_t k = std::min(kBlock, n - at);
    const std::byte* q = p + at * sizeof(W);
    if (AnyExponentAllOnes<W>(q, k, mask)) count += CountExponentAllOnes<W>(q, k, mask);
  }
  return count;
}
}  // namespace

size_t CountNonFinite(std::span<const std::byte> in, Encoding encoding) {
  switch (encoding) {
    case Encoding::kRaw:
      return CountNonFiniteWords<uint32_t>(in.data(), in.size() / 4, 0x7F800000u);
    case Encoding::kF16:
      return CountNonFiniteWords<uint16_t>(in.data(), in.size() / 2, uint16_t{0x7C00});
    case Encoding::kBF16:
      return CountNonFiniteWords<uint16_t>(in.data(), in.size() / 2, uint16_t{0x7F80});
  }
  return 0;
}

uint16_t FloatToHalfBits(float value) {
  return Eigen::numext::bit_cast<uint16_t>(Eigen::half(value));
}
float HalfBitsToFloat(uint16_t bits) {
  return static_cast<float>(Eigen::numext::bit_cast<Eigen::half>(bits));
}
uint16_t FloatToBFloat16Bits(float value) { return ToBFloat16(value); }
float BFloat16BitsToFloat(uint16_t bits) { return FromBFloat16(bits); }

}  // namespace distval::protocol
