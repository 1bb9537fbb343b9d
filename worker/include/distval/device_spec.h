// DeviceKind and DeviceSpec: the name of one compute device of a worker
// ("cpu:0", "cuda:1"). Parsing and validating lists of them against what the
// machine has lives in distval/devices.h.
//
// Thread-safety: values; copy freely.
#ifndef DISTVAL_DEVICE_SPEC_H_
#define DISTVAL_DEVICE_SPEC_H_

#include <string>
#include <string_view>

namespace distval {

enum class DeviceKind : int {
  // A CPU replica: one thread, host memory.
  kCpu = 0,
  // One CUDA GPU (the index counts the GPUs the CUDA runtime shows, after
  // CUDA_VISIBLE_DEVICES).
  kCuda = 1,
};

// "cpu" or "cuda".
std::string_view DeviceKindName(DeviceKind kind);

struct DeviceSpec {
  DeviceKind kind = DeviceKind::kCpu;
  int index = 0;

  // "cpu:0", "cuda:1".
  std::string ToString() const;

  friend bool operator==(const DeviceSpec& a, const DeviceSpec& b) {
    return a.kind == b.kind && a.index == b.index;
  }
  friend bool operator!=(const DeviceSpec& a, const DeviceSpec& b) { return !(a == b); }
};

}  // namespace distval

#endif  // DISTVAL_DEVICE_SPEC_H_
