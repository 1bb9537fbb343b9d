// Writes the seed corpus of the request_decoder fuzz target into the
// directory given as argv[1] (tests/fuzz/corpus/request_decoder is its
// committed output): every sample request and reply of
// tests/shared/protocol_samples.h in the format of fuzz_input.h, plus broken
// variants (truncated, missing / extra / wrongly sized frames, trailing bytes,
// garbage). Checks that each valid seed decodes and each broken one does not.
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include "fuzz_input.h"
#include "protocol_samples.h"

namespace {

namespace protocol = distval::protocol;

bool Write(const std::filesystem::path& dir, const std::string& name,
           const std::vector<size_t>& sizes, const std::vector<std::byte>& header,
           bool expect_valid) {
  const bool valid =
      protocol::DecodeRequest(header, sizes).ok() || protocol::DecodeReply(header, sizes).ok();
  if (valid != expect_valid) {
    std::fprintf(stderr, "seed %s: expected %s\n", name.c_str(),
                 expect_valid ? "a valid message" : "a rejection");
    return false;
  }
  const auto bytes = distval::fuzz::MakeFuzzInput(sizes, header);
  std::ofstream out(dir / name, std::ios::binary | std::ios::trunc);
  out.write(reinterpret_cast<const char*>(bytes.data()),
            static_cast<std::streamsize>(bytes.size()));
  return out.good();
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 2) {
    std::fprintf(stderr, "usage: %s OUTPUT_DIR\n", argv[0]);
    return 2;
  }
  const std::filesystem::path dir = argv[1];
  std::filesystem::create_directories(dir);
  bool ok = true;
  int count = 0;
  for (const auto& s : protocol::samples::SampleRequests()) {
    ok &=
        Write(dir, "request_" + s.name, s.payload_sizes, protocol::EncodeRequest(s.request), true);
    ++count;
  }
  for (const auto& s : protocol::samples::SampleReplies()) {
    ok &= Write(dir, s.name, s.payload_sizes, protocol::EncodeReply(s.reply), true);
    ++count;
  }

  // Broken variants of a sparse push (5 payload frames).
  const auto requests = protocol::samples::SampleRequests();
  for (const auto& s : requests) {
    if (s.name != "push_sparse") continue;
    const auto header = protocol::EncodeRequest(s.request);
    std::vector<std::byte> truncated(header.begin(), header.end() - 16);
    ok &= Write(dir, "broken_truncated", s.payload_sizes, truncated, false);
    std::vector<size_t> missing(s.payload_sizes.begin(), s.payload_sizes.end() - 1);
    ok &= Write(dir, "broken_missing_frame", missing, header, false);
    std::vector<size_t> extra = s.payload_sizes;
    extra.push_back(12);
    ok &= Write(dir, "broken_extra_frame", extra, header, false);
    std::vector<size_t> wrong = s.payload_sizes;
    wrong[0] += 4;
    ok &= Write(dir, "broken_frame_size", wrong, header, false);
    std::vector<std::byte> trailing = header;
    trailing.resize(trailing.size() + 8);
    ok &= Write(dir, "broken_trailing_bytes", s.payload_sizes, trailing, false);
    std::vector<std::byte> flipped = header;
    flipped[12] ^= std::byte{0x40};  // root pointer: points past the segment
    ok &= Write(dir, "broken_root_pointer", s.payload_sizes, flipped, false);
    count += 6;
  }
  std::vector<std::byte> garbage(64);
  for (size_t i = 0; i < garbage.size(); ++i) garbage[i] = static_cast<std::byte>(i * 37 + 11);
  ok &= Write(dir, "broken_garbage", {}, garbage, false);
  ++count;
  if (!ok) return 1;
  std::printf("wrote %d seeds to %s\n", count, dir.c_str());
  return 0;
}
