// Fuzz target for the decoders of frame 0 (protocol::DecodeRequest and
// protocol::DecodeReply), the code that reads untrusted bytes on both sides.
// Input format: fuzz_input.h. Besides "no crash, no sanitizer report", it
// checks two properties and aborts when one fails:
//  - a rejection is always InvalidArgument;
//  - whatever decodes re-encodes into a message that decodes again (with the
//    same payload sizes) and re-encodes to the same bytes.
#include <cstdio>
#include <cstdlib>

#include "distval/protocol.h"
#include "fuzz_input.h"

namespace {

using distval::StatusCode;
namespace protocol = distval::protocol;

[[noreturn]] void Fail(const char* what, const distval::Status& status) {
  std::fprintf(stderr, "request_decoder_fuzz: %s: %s\n", what, status.ToString().c_str());
  std::abort();
}

template <typename Message, typename Decode, typename Encode>
void Check(const distval::StatusOr<Message>& decoded, std::span<const size_t> sizes, Decode decode,
           Encode encode) {
  if (!decoded.ok()) {
    if (decoded.status().code() != StatusCode::kInvalidArgument)
      Fail("rejection is not InvalidArgument", decoded.status());
    return;
  }
  const std::vector<std::byte> once = encode(*decoded);
  const distval::StatusOr<Message> again = decode(once, sizes);
  if (!again.ok()) Fail("re-encoded message does not decode", again.status());
  if (encode(*again) != once) Fail("re-encoding is not stable", distval::OkStatus());
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  distval::fuzz::FuzzInput input;
  if (!distval::fuzz::ParseFuzzInput(data, size, &input)) return 0;
  const std::span<const size_t> sizes = input.payload_sizes;
  Check(
      protocol::DecodeRequest(input.header, sizes), sizes,
      [](std::span<const std::byte> h, std::span<const size_t> s) {
        return protocol::DecodeRequest(h, s);
      },
      [](const protocol::Request& r) { return protocol::EncodeRequest(r); });
  Check(
      protocol::DecodeReply(input.header, sizes), sizes,
      [](std::span<const std::byte> h, std::span<const size_t> s) {
        return protocol::DecodeReply(h, s);
      },
      [](const protocol::Reply& r) { return protocol::EncodeReply(r); });
  return 0;
}
