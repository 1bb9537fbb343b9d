// Payload encodings of f32 tensors: raw little-endian binary32, or lossy
// binary16 (f16) / bfloat16 (bf16) to halve the bytes of a gradient or a
// pulled parameter on the wire. f32 -> f16/bf16 rounds to nearest, ties to
// even; values beyond the f16 range become +-inf; inf and NaN stay inf and
// NaN (NaN payloads are not preserved). Decoding into f32 is exact.
//
// The conversions are vectorized (F16C conversion instructions for f16
// where the build targets them, compiler-vectorized integer code for
// bf16). Spans may have any alignment: payload frames can sit at any offset
// of a receive buffer, so elements are accessed with unaligned loads.
//
// Thread-safety: pure functions. The caller owns every span.
#ifndef DISTVAL_ENCODING_H_
#define DISTVAL_ENCODING_H_

#include <cstddef>
#include <cstdint>
#include <span>

#include "distval/protocol.h"

namespace distval::protocol {

// Writes `in` encoded as `encoding` into `out`.
// Precondition (checked by the caller, asserted in debug builds):
// out.size() == in.size() * EncodedElementSize(DType::kF32, encoding), i.e.
// 4 bytes per value for kRaw and 2 for kF16 / kBF16. `in` and `out` must not
// overlap.
void EncodeFloats(std::span<const float> in, Encoding encoding, std::span<std::byte> out);

// Reads `in`, encoded as `encoding`, into the f32 values `out`.
// Precondition (checked by the caller, asserted in debug builds):
// in.size() == out.size() * EncodedElementSize(DType::kF32, encoding).
// `in` and `out` must not overlap.
void DecodeFloats(std::span<const std::byte> in, Encoding encoding, std::span<float> out);

// Number of values of `in` (encoded as `encoding`; a trailing partial value
// is ignored) that are NaN or +-Inf, read without decoding: the exponent
// bits all ones. Any alignment.
size_t CountNonFinite(std::span<const std::byte> in, Encoding encoding);

// Single values, for tests and scalar code: the bit patterns of binary16 and
// bfloat16, with the same rounding as EncodeFloats.
uint16_t FloatToHalfBits(float value);
float HalfBitsToFloat(uint16_t bits);
uint16_t FloatToBFloat16Bits(float value);
float BFloat16BitsToFloat(uint16_t bits);

}  // namespace distval::protocol

#endif  // DISTVAL_ENCODING_H_
