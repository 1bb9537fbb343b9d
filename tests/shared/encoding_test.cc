#include "distval/encoding.h"

#include <gtest/gtest.h>

#include <bit>
#include <cmath>
#include <cstring>
#include <limits>
#include <random>
#include <vector>

namespace distval::protocol {
namespace {

// Reference decoding of binary16 bits, written from the IEEE 754 definition.
double HalfReference(uint16_t bits) {
  const int sign = bits >> 15;
  const int exponent = (bits >> 10) & 0x1f;
  const int mantissa = bits & 0x3ff;
  double magnitude;
  if (exponent == 0) {
    magnitude = std::ldexp(mantissa, -24);  // subnormal
  } else if (exponent == 31) {
    magnitude = mantissa == 0 ? std::numeric_limits<double>::infinity()
                              : std::numeric_limits<double>::quiet_NaN();
  } else {
    magnitude = std::ldexp(1024 + mantissa, exponent - 25);
  }
  return sign ? -magnitude : magnitude;
}

// Reference decoding of bfloat16 bits: the upper half of a binary32.
float BFloat16Reference(uint16_t bits) { return std::bit_cast<float>(uint32_t{bits} << 16); }

std::vector<uint16_t> EncodeToBits(const std::vector<float>& values, Encoding encoding) {
  std::vector<uint16_t> bits(values.size());
  EncodeFloats(values, encoding, std::as_writable_bytes(std::span(bits)));
  return bits;
}

std::vector<float> DecodeBits(const std::vector<uint16_t>& bits, Encoding encoding) {
  std::vector<float> values(bits.size());
  DecodeFloats(std::as_bytes(std::span(bits)), encoding, values);
  return values;
}

std::vector<uint16_t> AllBitPatterns() {
  std::vector<uint16_t> all(65536);
  for (uint32_t i = 0; i < all.size(); ++i) all[i] = static_cast<uint16_t>(i);
  return all;
}

TEST(EncodingTest, CountNonFiniteFindsNanAndInfInEveryEncoding) {
  std::vector<float> v(1001, 1.5f);
  v[0] = std::numeric_limits<float>::quiet_NaN();
  v[500] = std::numeric_limits<float>::infinity();
  v[1000] = -std::numeric_limits<float>::infinity();
  v[7] = std::numeric_limits<float>::max();         // finite (inf in f16, bf16)
  v[8] = std::numeric_limits<float>::denorm_min();  // finite
  for (Encoding e : {Encoding::kRaw, Encoding::kF16, Encoding::kBF16}) {
    std::vector<std::byte> bytes(v.size() * EncodedElementSize(DType::kF32, e));
    EncodeFloats(v, e, bytes);
    // f16 and bf16 round max() to inf.
    EXPECT_EQ(CountNonFinite(bytes, e), e == Encoding::kRaw ? 3u : 4u) << static_cast<int>(e);
    // Misaligned view: still reads every value.
    std::vector<std::byte> shifted(bytes.size() + 1);
    std::memcpy(shifted.data() + 1, bytes.data(), bytes.size());
    EXPECT_EQ(CountNonFinite(std::span(shifted).subspan(1), e), CountNonFinite(bytes, e));
  }
  std::vector<float> fine(64, -2.0f);
  EXPECT_EQ(CountNonFinite(std::as_bytes(std::span(fine)), Encoding::kRaw), 0u);
}

TEST(EncodingTest, CountNonFiniteCountsAcrossBlocks) {
  // Long enough for several of the blocks the check goes through, with bad
  // values at their edges, next to the largest finite values and -0.
  std::vector<float> v(3 * 1024 + 77, -0.0f);
  for (size_t i = 0; i < v.size(); i += 3) v[i] = std::numeric_limits<float>::max();
  for (size_t i = 1; i < v.size(); i += 5) v[i] = -std::numeric_limits<float>::max();
  const size_t bad[] = {0, 1023, 1024, 2047, 2048, 2049, 3 * 1024 + 76};
  for (size_t i : bad)
    v[i] =
        i % 2 ? std::numeric_limits<float>::quiet_NaN() : -std::numeric_limits<float>::infinity();
  EXPECT_EQ(CountNonFinite(std::as_bytes(std::span(v)), Encoding::kRaw), std::size(bad));
  // A signalling NaN with only the lowest mantissa bit set counts too.
  v[3000] = std::bit_cast<float>(0x7F800001u);
  EXPECT_EQ(CountNonFinite(std::as_bytes(std::span(v)), Encoding::kRaw), std::size(bad) + 1);
  // No bad value: 0, whatever the length (the tail of the last block).
  for (size_t n : {size_t{0}, size_t{1}, size_t{1023}, size_t{1025}}) {
    std::vector<float> ok(n, 3.0f);
    EXPECT_EQ(CountNonFinite(std::as_bytes(std::span(ok)), Encoding::kRaw), 0u) << n;
  }
  // f16: 0x7C00 is inf, 0x7BFF the largest finite value.
  std::vector<uint16_t> h(2500, uint16_t{0x7BFF});
  h[2048] = 0x7C00;
  h[2499] = 0xFE01;
  EXPECT_EQ(CountNonFinite(std::as_bytes(std::span(h)), Encoding::kF16), 2u);
}

TEST(EncodingTest, RawIsBitExact) {
  std::mt19937 rng(1);
  std::vector<float> in(1000);
  for (auto& v : in) v = std::bit_cast<float>(static_cast<uint32_t>(rng()));
  std::vector<std::byte> wire(in.size() * 4);
  EncodeFloats(in, Encoding::kRaw, wire);
  EXPECT_EQ(std::memcmp(wire.data(), in.data(), wire.size()), 0);
  std::vector<float> out(in.size());
  DecodeFloats(wire, Encoding::kRaw, out);
  EXPECT_EQ(std::memcmp(out.data(), in.data(), wire.size()), 0);
}

TEST(EncodingTest, F16DecodesEveryBitPatternExactly) {
  const auto all = AllBitPatterns();
  const auto values = DecodeBits(all, Encoding::kF16);
  for (size_t i = 0; i < all.size(); ++i) {
    const double expected = HalfReference(all[i]);
    if (std::isnan(expected)) {
      EXPECT_TRUE(std::isnan(values[i])) << i;
    } else {
      ASSERT_EQ(static_cast<double>(values[i]), expected) << "bits " << i;
      ASSERT_EQ(std::signbit(values[i]), std::signbit(expected)) << "bits " << i;
    }
    if (!std::isnan(expected)) {
      ASSERT_EQ(static_cast<double>(HalfBitsToFloat(all[i])), expected) << i;
    }
  }
}

TEST(EncodingTest, BF16DecodesEveryBitPatternExactly) {
  const auto all = AllBitPatterns();
  const auto values = DecodeBits(all, Encoding::kBF16);
  for (size_t i = 0; i < all.size(); ++i) {
    const float expected = BFloat16Reference(all[i]);
    if (std::isnan(expected)) {
      EXPECT_TRUE(std::isnan(values[i])) << i;
    } else {
      ASSERT_EQ(std::bit_cast<uint32_t>(values[i]), std::bit_cast<uint32_t>(expected)) << i;
      ASSERT_EQ(std::bit_cast<uint32_t>(BFloat16BitsToFloat(all[i])),
                std::bit_cast<uint32_t>(expected));
    }
  }
}

// Every representable value survives f32 -> encoding -> f32 -> encoding
// unchanged (bit for bit, signed zeros included); NaNs stay NaN.
TEST(EncodingTest, RepresentableValuesRoundTripExactly) {
  for (Encoding encoding : {Encoding::kF16, Encoding::kBF16}) {
    SCOPED_TRACE(EncodingName(encoding));
    const auto all = AllBitPatterns();
    const auto values = DecodeBits(all, encoding);
    const auto bits = EncodeToBits(values, encoding);
    for (size_t i = 0; i < all.size(); ++i) {
      if (std::isnan(values[i])) {
        EXPECT_TRUE(std::isnan(DecodeBits({bits[i]}, encoding)[0])) << i;
      } else {
        ASSERT_EQ(bits[i], all[i]) << "value " << values[i];
      }
    }
  }
}

// Checks that `bits` is the encoding of `x` nearest to it, ties to even,
// using the decoded neighbours of `bits`.
void ExpectNearestEven(float x, uint16_t bits, Encoding encoding) {
  auto decode = [&](uint16_t b) -> double {
    return encoding == Encoding::kF16 ? HalfReference(b) : BFloat16Reference(b);
  };
  const double got = decode(bits);
  ASSERT_FALSE(std::isnan(got)) << x;
  const double error = std::abs(static_cast<double>(x) - got);
  // Neighbours in magnitude (same sign): one step up and one down.
  for (int step : {-1, 1}) {
    const int magnitude = (bits & 0x7fff) + step;
    const int max_finite = encoding == Encoding::kF16 ? 0x7bff : 0x7f7f;
    if (magnitude < 0 || magnitude > max_finite) continue;
    const uint16_t neighbour = static_cast<uint16_t>((bits & 0x8000) | magnitude);
    const double other = std::abs(static_cast<double>(x) - decode(neighbour));
    ASSERT_LE(error, other) << "x=" << x << " bits=" << bits << " neighbour=" << neighbour;
    if (error == other) {
      EXPECT_EQ(bits & 1, 0) << "tie not to even: x=" << x;
    }
  }
}

TEST(EncodingTest, RoundsToNearestEven) {
  std::mt19937 rng(2);
  for (Encoding encoding : {Encoding::kF16, Encoding::kBF16}) {
    SCOPED_TRACE(EncodingName(encoding));
    std::vector<float> values;
    // Random values across the finite range of the encoding, both signs.
    std::uniform_real_distribution<float> exponent(encoding == Encoding::kF16 ? -26.f : -130.f,
                                                   encoding == Encoding::kF16 ? 15.9f : 127.f);
    for (int i = 0; i < 20000; ++i) {
      const float v = std::exp2(exponent(rng)) * (1 + static_cast<float>(rng() % 1000) / 1000);
      values.push_back(i % 2 ? -v : v);
    }
    // Exact ties: odd multiples of half an ulp.
    for (int i = 1; i < 2000; i += 2)
      values.push_back(1.0f +
                       std::ldexp(static_cast<float>(i), encoding == Encoding::kF16 ? -11 : -8));
    const auto bits = EncodeToBits(values, encoding);
    for (size_t i = 0; i < values.size(); ++i) {
      if (encoding == Encoding::kF16 && std::abs(values[i]) >= 65504.0f) continue;
      ExpectNearestEven(values[i], bits[i], encoding);
      ASSERT_EQ(bits[i], encoding == Encoding::kF16 ? FloatToHalfBits(values[i])
                                                    : FloatToBFloat16Bits(values[i]))
          << "vector and scalar paths differ for " << values[i];
    }
  }
}

TEST(EncodingTest, KnownRoundingCases) {
  const std::vector<float> f16_in = {
      1.0f + std::ldexp(1.0f, -11),      // tie between 1 and 1+2^-10: to even (1)
      1.0f + 3 * std::ldexp(1.0f, -11),  // tie: to even (1 + 2^-9)
      65519.0f,                          // below the midpoint: 65504
      65520.0f,                          // midpoint to 65536: to even, i.e. overflow to inf
      -1e6f,                             // beyond the range: -inf
      std::ldexp(1.0f, -25),             // tie between 0 and the smallest subnormal: 0
      3 * std::ldexp(1.0f, -25),         // tie between 2^-24 and 2^-23: 2^-23
      std::ldexp(1.0f, -24),             // smallest subnormal, exact
      -0.0f,
  };
  const std::vector<uint16_t> f16_expected = {0x3c00, 0x3c02, 0x7bff, 0x7c00, 0xfc00,
                                              0x0000, 0x0002, 0x0001, 0x8000};
  EXPECT_EQ(EncodeToBits(f16_in, Encoding::kF16), f16_expected);

  const std::vector<float> bf16_in = {
      1.0f + std::ldexp(1.0f, -8),                          // tie: to even (1)
      1.0f + 3 * std::ldexp(1.0f, -8),                      // tie: to even (1 + 2^-6)
      std::numeric_limits<float>::max(),                    // rounds up to inf
      1.0f + std::ldexp(1.0f, -8) + std::ldexp(1.0f, -20),  // just above a tie: up
      std::numeric_limits<float>::denorm_min(),             // to 0
  };
  const std::vector<uint16_t> bf16_expected = {0x3f80, 0x3f82, 0x7f80, 0x3f81, 0x0000};
  EXPECT_EQ(EncodeToBits(bf16_in, Encoding::kBF16), bf16_expected);
}

TEST(EncodingTest, InfinityAndNanArePreserved) {
  const float inf = std::numeric_limits<float>::infinity();
  const std::vector<float> in = {inf,
                                 -inf,
                                 std::numeric_limits<float>::quiet_NaN(),
                                 -std::numeric_limits<float>::quiet_NaN(),
                                 std::numeric_limits<float>::signaling_NaN(),
                                 std::bit_cast<float>(0x7f800001u),   // NaN, low payload only
                                 std::bit_cast<float>(0xff800100u)};  // NaN, negative
  for (Encoding encoding : {Encoding::kF16, Encoding::kBF16}) {
    SCOPED_TRACE(EncodingName(encoding));
    const auto out = DecodeBits(EncodeToBits(in, encoding), encoding);
    EXPECT_EQ(out[0], inf);
    EXPECT_EQ(out[1], -inf);
    for (size_t i = 2; i < in.size(); ++i) EXPECT_TRUE(std::isnan(out[i])) << i;
  }
}

TEST(EncodingTest, UnalignedBuffersGiveTheSameResult) {
  std::mt19937 rng(3);
  std::normal_distribution<float> normal(0, 10);
  std::vector<float> in(2500);  // more than one bounce buffer
  for (auto& v : in) v = normal(rng);
  for (Encoding encoding : {Encoding::kF16, Encoding::kBF16}) {
    SCOPED_TRACE(EncodingName(encoding));
    const auto aligned_bits = EncodeToBits(in, encoding);
    const auto aligned_values = DecodeBits(aligned_bits, encoding);
    for (size_t offset : {1, 3}) {
      std::vector<std::byte> buffer(in.size() * 2 + offset);
      auto wire = std::span(buffer).subspan(offset);
      EncodeFloats(in, encoding, wire);
      EXPECT_EQ(std::memcmp(wire.data(), aligned_bits.data(), wire.size()), 0);
      std::vector<float> out(in.size());
      DecodeFloats(wire, encoding, out);
      EXPECT_EQ(out, aligned_values);
    }
  }
}

TEST(EncodingTest, EmptySpansAreFine) {
  for (Encoding encoding : {Encoding::kRaw, Encoding::kF16, Encoding::kBF16}) {
    EncodeFloats({}, encoding, {});
    DecodeFloats({}, encoding, {});
  }
}

}  // namespace
}  // namespace distval::protocol
