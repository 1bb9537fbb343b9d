// The safetensors file format (https://github.com/huggingface/safetensors),
// written and read here without a library, for f32 tensors:
//
//   bytes 0..7   N, the header length: unsigned 64-bit little-endian
//   bytes 8..    the header: N bytes of UTF-8 JSON, an object
//                  {"__metadata__": {"key": "value", ...},        (optional)
//                   "name": {"dtype": "F32", "shape": [d0, d1, ...],
//                            "data_offsets": [begin, end]}, ...}
//                padded with spaces so that the data starts 8-byte aligned
//   bytes 8+N..  the data: every tensor's elements, row-major,
//                little-endian; offsets are relative to the start of the
//                data, end - begin = 4 * elements, the tensors cover the
//                data exactly with neither holes nor overlap.
//
// PyTorch (safetensors.torch.load_file), NumPy (safetensors.numpy) and
// others read what WriteSafetensors writes; a reader needs nothing but a
// JSON parser (tests/integration/safetensors_test.py uses Python's json and
// struct).
//
// Thread-safety: functions are thread-safe; the values are plain values.
#ifndef DISTVAL_SAFETENSORS_H_
#define DISTVAL_SAFETENSORS_H_

#include <cstdint>
#include <map>
#include <span>
#include <string>
#include <utility>
#include <vector>

#include "distval/status.h"
#include "distval/tensor.h"

namespace distval {

// A tensor to write: its name and borrowed values (kF32).
struct SafetensorsEntry {
  std::string name;
  const Tensor* tensor = nullptr;
};

// The content of a file.
struct SafetensorsFile {
  // "__metadata__" (string values only).
  std::map<std::string, std::string> metadata;
  // The tensors in the order of their data offsets.
  std::vector<std::pair<std::string, Tensor>> tensors;

  // The tensor named `name`, or null.
  const Tensor* Find(const std::string& name) const;
};

// Largest header a reader accepts (the format's own reader also limits it).
inline constexpr uint64_t kSafetensorsMaxHeaderBytes = uint64_t{100} << 20;

// The bytes of a safetensors file holding `entries` (in that order) and
// `metadata`. Errors: InvalidArgument for an empty or repeated name, the
// name "__metadata__", a null tensor or a dtype other than f32.
StatusOr<std::string> EncodeSafetensors(std::span<const SafetensorsEntry> entries,
                                        const std::map<std::string, std::string>& metadata);

// Writes EncodeSafetensors(entries, metadata) to `path` atomically
// (distval/atomic_file.h). Errors: EncodeSafetensors' and
// WriteFileAtomically's.
Status WriteSafetensors(const std::string& path, std::span<const SafetensorsEntry> entries,
                        const std::map<std::string, std::string>& metadata = {});

// Parses the bytes of a safetensors file; every length, offset and shape is
// checked before it is used. Errors: DataLoss (naming the problem and the
// numbers) for a truncated file, a header length beyond the file or
// kSafetensorsMaxHeaderBytes, a header that is not a JSON object, a tensor
// entry without dtype / shape / data_offsets, negative or overflowing
// shapes, offsets outside the data, a size that does not match the shape,
// holes or overlaps between tensors, non-string metadata; Unimplemented for
// a dtype other than F32 (naming the tensor and the dtype).
StatusOr<SafetensorsFile> DecodeSafetensors(std::string_view bytes);

// Reads and decodes `path`. Errors: NotFound when it cannot be opened,
// DecodeSafetensors' (prefixed with the path).
StatusOr<SafetensorsFile> ReadSafetensors(const std::string& path);

}  // namespace distval

#endif  // DISTVAL_SAFETENSORS_H_
