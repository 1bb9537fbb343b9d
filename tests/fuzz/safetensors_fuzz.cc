// Fuzz target for DecodeSafetensors (distval/safetensors.h), which reads
// saved models: files that may come from anywhere. Besides "no crash, no
// sanitizer report", it checks two properties and aborts when one fails:
//  - a rejection is DataLoss or Unimplemented (an unsupported dtype);
//  - whatever decodes re-encodes into bytes that decode to the same
//    tensors (names, shapes, bits) and metadata.
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string_view>
#include <vector>

#include "distval/safetensors.h"

namespace {

[[noreturn]] void Fail(const char* what, const distval::Status& status) {
  std::fprintf(stderr, "safetensors_fuzz: %s: %s\n", what, status.ToString().c_str());
  std::abort();
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string_view bytes(reinterpret_cast<const char*>(data), size);
  const distval::StatusOr<distval::SafetensorsFile> file = distval::DecodeSafetensors(bytes);
  if (!file.ok()) {
    const distval::StatusCode code = file.status().code();
    if (code != distval::StatusCode::kDataLoss && code != distval::StatusCode::kUnimplemented)
      Fail("rejection is neither DataLoss nor Unimplemented", file.status());
    return 0;
  }
  std::vector<distval::SafetensorsEntry> entries;
  for (const auto& [name, tensor] : file->tensors) entries.push_back({name, &tensor});
  const distval::StatusOr<std::string> again = distval::EncodeSafetensors(entries, file->metadata);
  if (!again.ok()) Fail("a decoded file does not encode", again.status());
  const distval::StatusOr<distval::SafetensorsFile> round = distval::DecodeSafetensors(*again);
  if (!round.ok()) Fail("a re-encoded file does not decode", round.status());
  if (round->metadata != file->metadata) Fail("metadata changed", distval::OkStatus());
  if (round->tensors.size() != file->tensors.size())
    Fail("tensor count changed", distval::OkStatus());
  for (size_t i = 0; i < file->tensors.size(); ++i) {
    const auto& [n1, t1] = file->tensors[i];
    const auto& [n2, t2] = round->tensors[i];
    if (n1 != n2 || t1.shape() != t2.shape() ||
        std::memcmp(t1.data_as<float>(), t2.data_as<float>(), t1.num_bytes()) != 0)
      Fail("a tensor changed", distval::OkStatus());
  }
  return 0;
}
