// Input format of the request_decoder fuzz target (and its seed corpus):
//
//   byte 0              n = input[0] % 17: the number of payload frames (0..16)
//   bytes 1 .. 4n       n frame sizes, little-endian uint32 each
//   bytes 4n+1 ..       frame 0, the header, as on the wire
//
// Inputs shorter than 1 + 4n bytes are ignored. The header starts at an odd
// offset in the input, so the decoder's realignment path is always exercised.
#ifndef DISTVAL_TESTS_FUZZ_FUZZ_INPUT_H_
#define DISTVAL_TESTS_FUZZ_FUZZ_INPUT_H_

#include <cstddef>
#include <cstdint>
#include <span>
#include <vector>

namespace distval::fuzz {

inline constexpr size_t kMaxPayloadFrames = 16;

struct FuzzInput {
  std::vector<size_t> payload_sizes;
  std::span<const std::byte> header;
};

// Splits `data` per the format above; false when it is too short.
inline bool ParseFuzzInput(const uint8_t* data, size_t size, FuzzInput* out) {
  if (size < 1) return false;
  const size_t n = data[0] % (kMaxPayloadFrames + 1);
  if (size < 1 + 4 * n) return false;
  out->payload_sizes.resize(n);
  for (size_t i = 0; i < n; ++i) {
    const uint8_t* p = data + 1 + 4 * i;
    out->payload_sizes[i] =
        uint32_t{p[0]} | uint32_t{p[1]} << 8 | uint32_t{p[2]} << 16 | uint32_t{p[3]} << 24;
  }
  out->header = std::span(reinterpret_cast<const std::byte*>(data) + 1 + 4 * n, size - 1 - 4 * n);
  return true;
}

// The inverse of ParseFuzzInput (sizes must fit uint32, at most 16 frames).
inline std::vector<uint8_t> MakeFuzzInput(std::span<const size_t> payload_sizes,
                                          std::span<const std::byte> header) {
  std::vector<uint8_t> out;
  out.push_back(static_cast<uint8_t>(payload_sizes.size()));
  for (size_t s : payload_sizes)
    for (int b = 0; b < 4; ++b) out.push_back(static_cast<uint8_t>(s >> (8 * b)));
  for (std::byte b : header) out.push_back(static_cast<uint8_t>(b));
  return out;
}

}  // namespace distval::fuzz

#endif  // DISTVAL_TESTS_FUZZ_FUZZ_INPUT_H_
