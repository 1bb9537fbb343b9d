#include "distval/safetensors.h"

#include <algorithm>
#include <bit>
#include <cstring>
#include <fstream>
#include <limits>
#include <nlohmann/json.hpp>
#include <set>
#include <sstream>

#include "distval/atomic_file.h"

namespace distval {

namespace {

using nlohmann::json;
using nlohmann::ordered_json;

constexpr std::string_view kMetadataKey = "__metadata__";

std::string Num(uint64_t v) { return std::to_string(v); }

void PutU64Le(uint64_t v, char* out) {
  for (int i = 0; i < 8; ++i) out[i] = static_cast<char>((v >> (8 * i)) & 0xff);
}

uint64_t GetU64Le(const char* in) {
  uint64_t v = 0;
  for (int i = 0; i < 8; ++i) v |= uint64_t{static_cast<unsigned char>(in[i])} << (8 * i);
  return v;
}

// Copies n floats between host order and little-endian bytes.
void FloatsToLe(const float* in, int64_t n, char* out) {
  if constexpr (std::endian::native == std::endian::little) {
    std::memcpy(out, in, static_cast<size_t>(n) * sizeof(float));
  } else {
    for (int64_t i = 0; i < n; ++i) {
      uint32_t u;
      std::memcpy(&u, &in[i], 4);
      for (int b = 0; b < 4; ++b) out[4 * i + b] = static_cast<char>((u >> (8 * b)) & 0xff);
    }
  }
}

void LeToFloats(const char* in, int64_t n, float* out) {
  if constexpr (std::endian::native == std::endian::little) {
    std::memcpy(out, in, static_cast<size_t>(n) * sizeof(float));
  } else {
    for (int64_t i = 0; i < n; ++i) {
      uint32_t u = 0;
      for (int b = 0; b < 4; ++b)
        u |= uint32_t{static_cast<unsigned char>(in[4 * i + b])} << (8 * b);
      std::memcpy(&out[i], &u, 4);
    }
  }
}

// A JSON number that is a non-negative integer, as uint64.
bool AsUnsigned(const json& v, uint64_t* out) {
  if (v.is_number_unsigned()) {
    *out = v.get<uint64_t>();
    return true;
  }
  if (v.is_number_integer()) {
    const int64_t i = v.get<int64_t>();
    if (i < 0) return false;
    *out = static_cast<uint64_t>(i);
    return true;
  }
  return false;
}

}  // namespace

const Tensor* SafetensorsFile::Find(const std::string& name) const {
  for (const auto& [n, t] : tensors) {
    if (n == name) return &t;
  }
  return nullptr;
}

StatusOr<std::string> EncodeSafetensors(std::span<const SafetensorsEntry> entries,
                                        const std::map<std::string, std::string>& metadata) {
  ordered_json header = ordered_json::object();
  if (!metadata.empty()) {
    ordered_json meta = ordered_json::object();
    for (const auto& [k, v] : metadata) meta[k] = v;
    header[std::string(kMetadataKey)] = std::move(meta);
  }
  std::set<std::string> names;
  uint64_t offset = 0;
  for (const SafetensorsEntry& e : entries) {
    if (e.name.empty()) return InvalidArgumentError("safetensors: a tensor name is empty");
    if (e.name == kMetadataKey)
      return InvalidArgumentError("safetensors: \"__metadata__\" cannot name a tensor");
    if (!names.insert(e.name).second)
      return InvalidArgumentError("safetensors: tensor name '" + e.name + "' is repeated");
    if (e.tensor == nullptr)
      return InvalidArgumentError("safetensors: tensor '" + e.name + "' is null");
    if (e.tensor->dtype() != DType::kF32)
      return InvalidArgumentError("safetensors: tensor '" + e.name + "' is " +
                                  std::string(DTypeName(e.tensor->dtype())) +
                                  "; only f32 is written");
    const uint64_t bytes = static_cast<uint64_t>(e.tensor->num_elements()) * sizeof(float);
    header[e.name] = {{"dtype", "F32"},
                      {"shape", e.tensor->shape().dims()},
                      {"data_offsets", {offset, offset + bytes}}};
    offset += bytes;
  }
  std::string text = header.dump(-1, ' ', false, ordered_json::error_handler_t::replace);
  // The data starts 8-byte aligned (spaces are valid JSON whitespace).
  text.append((8 - (8 + text.size()) % 8) % 8, ' ');
  std::string out(8 + text.size() + offset, '\0');
  PutU64Le(text.size(), out.data());
  std::memcpy(out.data() + 8, text.data(), text.size());
  char* data = out.data() + 8 + text.size();
  for (const SafetensorsEntry& e : entries) {
    FloatsToLe(e.tensor->data_as<float>(), e.tensor->num_elements(), data);
    data += e.tensor->num_elements() * static_cast<int64_t>(sizeof(float));
  }
  return out;
}

Status WriteSafetensors(const std::string& path, std::span<const SafetensorsEntry> entries,
                        const std::map<std::string, std::string>& metadata) {
  DV_ASSIGN_OR_RETURN(std::string bytes, EncodeSafetensors(entries, metadata));
  return WriteFileAtomically(path, bytes);
}

StatusOr<SafetensorsFile> DecodeSafetensors(std::string_view bytes) {
  if (bytes.size() < 8)
    return DataLossError("safetensors: " + Num(bytes.size()) +
                         " bytes, shorter than the 8-byte header length");
  const uint64_t n = GetU64Le(bytes.data());
  if (n > kSafetensorsMaxHeaderBytes)
    return DataLossError("safetensors: header length " + Num(n) + " exceeds the limit of " +
                         Num(kSafetensorsMaxHeaderBytes) + " bytes");
  if (n > bytes.size() - 8)
    return DataLossError("safetensors: header length " + Num(n) + " but only " +
                         Num(bytes.size() - 8) + " bytes follow");
  const std::string_view text = bytes.substr(8, n);
  if (text.empty() || text.front() != '{')
    return DataLossError("safetensors: the header does not start with '{'");
  const json header = json::parse(text, nullptr, /*allow_exceptions=*/false);
  if (header.is_discarded() || !header.is_object())
    return DataLossError("safetensors: the header is not a JSON object");
  const std::string_view data = bytes.substr(8 + n);
  const uint64_t data_size = data.size();

  SafetensorsFile file;
  struct Placed {
    uint64_t begin, end;
    std::string name;
    Shape shape;
  };
  std::vector<Placed> placed;
  for (const auto& [name, entry] : header.items()) {
    if (name == kMetadataKey) {
      if (!entry.is_object())
        return DataLossError("safetensors: \"__metadata__\" is not an object");
      for (const auto& [k, v] : entry.items()) {
        if (!v.is_string())
          return DataLossError("safetensors: metadata value '" + k + "' is not a string");
        file.metadata[k] = v.get<std::string>();
      }
      continue;
    }
    const std::string who = "safetensors: tensor '" + name + "'";
    if (!entry.is_object()) return DataLossError(who + " is not an object");
    const auto dtype = entry.find("dtype");
    const auto shape = entry.find("shape");
    const auto offsets = entry.find("data_offsets");
    if (dtype == entry.end() || shape == entry.end() || offsets == entry.end())
      return DataLossError(who + " lacks dtype, shape or data_offsets");
    if (!dtype->is_string()) return DataLossError(who + ": dtype is not a string");
    if (dtype->get<std::string>() != "F32")
      return UnimplementedError(who + " has dtype " + dtype->get<std::string>() +
                                "; only F32 is supported");
    if (!shape->is_array()) return DataLossError(who + ": shape is not an array");
    std::vector<int64_t> dims;
    uint64_t elements = 1;
    for (const json& d : *shape) {
      uint64_t v = 0;
      if (!AsUnsigned(d, &v) || v > static_cast<uint64_t>(std::numeric_limits<int64_t>::max()))
        return DataLossError(who + ": shape " + shape->dump() +
                             " has a dimension that is not a non-negative integer");
      if (v != 0 && elements > std::numeric_limits<uint64_t>::max() / 4 / v)
        return DataLossError(who + ": shape " + shape->dump() + " overflows");
      elements *= v;
      dims.push_back(static_cast<int64_t>(v));
    }
    uint64_t begin = 0, end = 0;
    if (!offsets->is_array() || offsets->size() != 2 || !AsUnsigned((*offsets)[0], &begin) ||
        !AsUnsigned((*offsets)[1], &end))
      return DataLossError(who + ": data_offsets " + offsets->dump() +
                           " is not a pair of non-negative integers");
    if (begin > end || end > data_size)
      return DataLossError(who + ": data_offsets [" + Num(begin) + ", " + Num(end) +
                           "] outside the " + Num(data_size) + " data bytes");
    if (end - begin != elements * 4)
      return DataLossError(who + ": data_offsets [" + Num(begin) + ", " + Num(end) + "] hold " +
                           Num(end - begin) + " bytes, shape " + shape->dump() + " needs " +
                           Num(elements * 4));
    placed.push_back(Placed{begin, end, name, Shape(std::move(dims))});
  }
  std::sort(placed.begin(), placed.end(), [](const Placed& a, const Placed& b) {
    return a.begin != b.begin ? a.begin < b.begin : a.end < b.end;
  });
  uint64_t expect = 0;
  for (const Placed& p : placed) {
    if (p.begin != expect)
      return DataLossError("safetensors: tensor '" + p.name + "' starts at data byte " +
                           Num(p.begin) + ", expected " + Num(expect) +
                           (p.begin < expect ? " (overlap)" : " (hole)"));
    expect = p.end;
  }
  if (expect != data_size)
    return DataLossError("safetensors: the tensors cover " + Num(expect) + " of " + Num(data_size) +
                         " data bytes");
  for (Placed& p : placed) {
    Tensor t(DType::kF32, p.shape);
    LeToFloats(data.data() + p.begin, t.num_elements(), t.data_as<float>());
    file.tensors.emplace_back(std::move(p.name), std::move(t));
  }
  return file;
}

StatusOr<SafetensorsFile> ReadSafetensors(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return NotFoundError("cannot open " + path);
  std::ostringstream buffer;
  buffer << in.rdbuf();
  if (in.bad()) return DataLossError("cannot read " + path);
  const std::string bytes = std::move(buffer).str();
  StatusOr<SafetensorsFile> file = DecodeSafetensors(bytes);
  if (!file.ok()) return file.status().WithContext(path);
  return file;
}

}  // namespace distval
