#include "distval/devices.h"

#include <algorithm>
#include <charconv>
#include <thread>

#include "cpu/cpu_backend.h"
#include "cuda_hooks.h"

namespace distval {

namespace {

std::string_view Trim(std::string_view s) {
  while (!s.empty() && (s.front() == ' ' || s.front() == '\t')) s.remove_prefix(1);
  while (!s.empty() && (s.back() == ' ' || s.back() == '\t')) s.remove_suffix(1);
  return s;
}

bool Exists(const DeviceSpec& d, const DeviceInventory& inv) {
  if (d.index < 0) return false;
  switch (d.kind) {
    case DeviceKind::kCpu:
      return d.index < inv.num_cpu_replicas_allowed;
    case DeviceKind::kCuda:
      return d.index < inv.num_cuda_devices;
  }
  return false;
}

}  // namespace

std::vector<DeviceSpec> DeviceInventory::All() const {
  std::vector<DeviceSpec> all;
  for (int i = 0; i < num_cpu_replicas_allowed; ++i) all.push_back({DeviceKind::kCpu, i});
  for (int i = 0; i < num_cuda_devices; ++i) all.push_back({DeviceKind::kCuda, i});
  return all;
}

std::string DeviceInventory::ToString() const {
  std::string s;
  for (const DeviceSpec& d : All()) {
    if (!s.empty()) s += ", ";
    s += d.ToString();
  }
  return s.empty() ? "none" : s;
}

DeviceInventory ProbeDevices() {
  DeviceInventory inv;
  inv.num_cpu_replicas_allowed = std::max(1u, std::thread::hardware_concurrency());
  inv.num_cuda_devices = std::max(0, internal::CudaDeviceCount());
  return inv;
}

StatusOr<DeviceSpec> ParseDeviceName(std::string_view name) {
  auto bad = [&](std::string_view why) {
    return InvalidArgumentError("malformed device name \"" + std::string(name) +
                                "\": " + std::string(why) + " (expected cpu:N or cuda:N)");
  };
  const size_t colon = name.find(':');
  if (colon == std::string_view::npos) return bad("no ':'");
  const std::string_view kind = name.substr(0, colon);
  const std::string_view index = name.substr(colon + 1);
  DeviceSpec spec;
  if (kind == "cpu") {
    spec.kind = DeviceKind::kCpu;
  } else if (kind == "cuda") {
    spec.kind = DeviceKind::kCuda;
  } else if (kind == "gpu") {
    return bad("unknown kind \"gpu\" (GPUs are named cuda:N)");
  } else {
    return bad("unknown kind \"" + std::string(kind) + "\"");
  }
  if (index.empty()) return bad("no index after ':'");
  if (index.size() > 1 && index[0] == '0') return bad("index has a leading zero");
  const char* end = index.data() + index.size();
  auto [ptr, ec] = std::from_chars(index.data(), end, spec.index);
  if (ec != std::errc() || ptr != end || spec.index < 0)
    return bad("index \"" + std::string(index) + "\" is not a non-negative integer");
  return spec;
}

StatusOr<std::vector<DeviceSpec>> ParseDevices(std::string_view list,
                                               const DeviceInventory& available) {
  const std::string avail = "available: " + available.ToString();
  if (Trim(list).empty()) return InvalidArgumentError("device list is empty; " + avail);
  std::vector<DeviceSpec> out;
  size_t pos = 0;
  while (true) {
    const size_t comma = list.find(',', pos);
    const std::string_view item = Trim(
        list.substr(pos, comma == std::string_view::npos ? std::string_view::npos : comma - pos));
    if (item.empty())
      return InvalidArgumentError("device list \"" + std::string(list) + "\" has an empty entry; " +
                                  avail);
    StatusOr<DeviceSpec> spec = ParseDeviceName(item);
    if (!spec.ok()) return InvalidArgumentError(spec.status().message() + "; " + avail);
    if (!Exists(*spec, available))
      return InvalidArgumentError("device \"" + std::string(item) + "\" does not exist; " + avail);
    if (std::find(out.begin(), out.end(), *spec) != out.end())
      return InvalidArgumentError("device \"" + std::string(item) +
                                  "\" is listed more than once; " + avail);
    out.push_back(*spec);
    if (comma == std::string_view::npos) break;
    pos = comma + 1;
  }
  return out;
}

StatusOr<std::unique_ptr<Backend>> CreateBackend(const DeviceSpec& device) {
  if (device.index < 0)
    return InvalidArgumentError("device " + device.ToString() + " has a negative index");
  switch (device.kind) {
    case DeviceKind::kCpu:
      return std::unique_ptr<Backend>(std::make_unique<CpuBackend>(device.index));
    case DeviceKind::kCuda: {
      if (!internal::CudaBuilt()) return internal::CreateCudaBackend(device.index);
      const int count = internal::CudaDeviceCount();
      if (device.index >= count)
        return InvalidArgumentError("device \"" + device.ToString() +
                                    "\" does not exist; this machine shows " +
                                    std::to_string(count) + " CUDA device(s)");
      return internal::CreateCudaBackend(device.index);
    }
  }
  return InvalidArgumentError("unknown device kind");
}

}  // namespace distval
