#include "distval/device_spec.h"

namespace distval {

std::string_view DeviceKindName(DeviceKind kind) {
  switch (kind) {
    case DeviceKind::kCpu:
      return "cpu";
    case DeviceKind::kCuda:
      return "cuda";
  }
  return "unknown";
}

std::string DeviceSpec::ToString() const {
  return std::string(DeviceKindName(kind)) + ":" + std::to_string(index);
}

}  // namespace distval
