// Input formats of the fuzz targets (and of their seed corpora).
//
// request_decoder (ParseFuzzInput): frame 0 only, payload frames by size.
//
//   byte 0              n = input[0] % 17: the number of payload frames (0..16)
//   bytes 1 .. 4n       n frame sizes, little-endian uint32 each
//   bytes 4n+1 ..       frame 0, the header, as on the wire
//
// Inputs shorter than 1 + 4n bytes are ignored. The header starts at an odd
// offset in the input, so the decoder's realignment path is always exercised.
//
// server_request (ParseFramedFuzzInput): a whole request, payload bytes too.
//
//   byte 0              n = input[0] % 17: the number of payload frames (0..16)
//   bytes 1 .. 4n       n frame sizes, little-endian uint32 each, taken
//                       modulo kMaxFramedPayloadBytes + 1
//   next 4 bytes        h: the header size, little-endian uint32 (capped at
//                       what is left)
//   next h bytes        frame 0, the header, as on the wire
//   the rest            the payload bytes: frame k takes the next size_k
//                       bytes; once they run out, frames are filled by
//                       repeating the payload bytes from their start (zeros
//                       when there are none), so that a short input can
//                       declare a large frame.
//
// Inputs shorter than 5 + 4n bytes are ignored.
#ifndef DISTVAL_TESTS_FUZZ_FUZZ_INPUT_H_
#define DISTVAL_TESTS_FUZZ_FUZZ_INPUT_H_

#include <algorithm>
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

// 64 KiB: every variable of the server harness fits (its servers refuse
// larger ones), and mutated sizes stay cheap to fill and send.
inline constexpr size_t kMaxFramedPayloadBytes = size_t{64} << 10;

struct FramedFuzzInput {
  std::span<const std::byte> header;
  std::vector<std::vector<std::byte>> payloads;
};

namespace internal {
inline uint32_t ReadU32(const uint8_t* p) {
  return uint32_t{p[0]} | uint32_t{p[1]} << 8 | uint32_t{p[2]} << 16 | uint32_t{p[3]} << 24;
}
inline void AppendU32(std::vector<uint8_t>* out, size_t v) {
  for (int b = 0; b < 4; ++b) out->push_back(static_cast<uint8_t>(v >> (8 * b)));
}
}  // namespace internal

// Splits `data` per the server_request format above; false when it is too
// short. `out->header` points into `data`.
inline bool ParseFramedFuzzInput(const uint8_t* data, size_t size, FramedFuzzInput* out) {
  if (size < 1) return false;
  const size_t n = data[0] % (kMaxPayloadFrames + 1);
  if (size < 5 + 4 * n) return false;
  std::vector<size_t> sizes(n);
  for (size_t i = 0; i < n; ++i)
    sizes[i] = internal::ReadU32(data + 1 + 4 * i) % (kMaxFramedPayloadBytes + 1);
  size_t pos = 1 + 4 * n;
  const size_t h = std::min<size_t>(internal::ReadU32(data + pos), size - pos - 4);
  pos += 4;
  out->header = std::span(reinterpret_cast<const std::byte*>(data) + pos, h);
  pos += h;
  const std::span<const std::byte> rest(reinterpret_cast<const std::byte*>(data) + pos, size - pos);
  out->payloads.assign(n, {});
  size_t used = 0;
  for (size_t i = 0; i < n; ++i) {
    std::vector<std::byte>& frame = out->payloads[i];
    frame.resize(sizes[i]);  // zeros
    if (rest.empty()) continue;
    for (size_t b = 0; b < frame.size();) {
      const size_t from = (used + b) % rest.size();
      const size_t n = std::min(frame.size() - b, rest.size() - from);
      std::copy_n(rest.begin() + static_cast<std::ptrdiff_t>(from), n,
                  frame.begin() + static_cast<std::ptrdiff_t>(b));
      b += n;
    }
    used += frame.size();
  }
  return true;
}

// The inverse of ParseFramedFuzzInput (at most 16 payload frames, each at
// most kMaxFramedPayloadBytes).
inline std::vector<uint8_t> MakeFramedFuzzInput(
    std::span<const std::byte> header, const std::vector<std::vector<std::byte>>& payloads) {
  std::vector<uint8_t> out;
  out.push_back(static_cast<uint8_t>(payloads.size()));
  for (const auto& p : payloads) internal::AppendU32(&out, p.size());
  internal::AppendU32(&out, header.size());
  for (std::byte b : header) out.push_back(static_cast<uint8_t>(b));
  for (const auto& p : payloads)
    for (std::byte b : p) out.push_back(static_cast<uint8_t>(b));
  return out;
}

}  // namespace distval::fuzz

#endif  // DISTVAL_TESTS_FUZZ_FUZZ_INPUT_H_
