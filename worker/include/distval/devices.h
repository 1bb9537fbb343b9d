// The devices a worker trains on: parsing `--devices cpu:0,cpu:1,cuda:0`,
// checking the list against what the machine has, and creating a Backend
// for each.
//
// Names: "cpu:N" is CPU replica N (a thread; N < the number of CPU replicas
// allowed, by default the hardware threads); "cuda:N" is the N-th GPU the CUDA
// runtime shows. The CUDA runtime applies CUDA_VISIBLE_DEVICES itself, so with
// CUDA_VISIBLE_DEVICES=2,3 "cuda:0" is physical GPU 2; distval never reads
// that variable.
//
// Thread-safety: all functions are thread-safe (no shared state).
#ifndef DISTVAL_DEVICES_H_
#define DISTVAL_DEVICES_H_

#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "distval/backend.h"
#include "distval/device_spec.h"
#include "distval/status.h"

namespace distval {

// What a worker may use.
struct DeviceInventory {
  // cpu:0 .. cpu:(num_cpu_replicas_allowed - 1) exist.
  int num_cpu_replicas_allowed = 1;
  // cuda:0 .. cuda:(num_cuda_devices - 1) exist.
  int num_cuda_devices = 0;

  // Every existing device, CPUs first.
  std::vector<DeviceSpec> All() const;
  // "cpu:0, cpu:1, cuda:0" (or "none").
  std::string ToString() const;
};

// The machine's inventory: CPU replicas = hardware threads (at least 1), CUDA
// devices = what the CUDA backend reports (0 when built without CUDA or when
// the machine has no usable GPU or driver).
DeviceInventory ProbeDevices();

// Parses one name ("cpu:0", "cuda:1"; no spaces, decimal index). Checks the
// syntax only. InvalidArgument naming the text otherwise.
StatusOr<DeviceSpec> ParseDeviceName(std::string_view name);

// Parses a comma-separated list (spaces around names are ignored) and checks
// it against `available`. Errors (InvalidArgument), each naming the offending
// entry and listing what exists ("available: cpu:0, cpu:1, cuda:0"):
// an empty list or empty entry, a malformed name, a device that does not
// exist, a device named twice. The order of the list is kept (it is the
// replica order).
StatusOr<std::vector<DeviceSpec>> ParseDevices(std::string_view list,
                                               const DeviceInventory& available);

// A new backend for `device`. The caller owns it. Errors: InvalidArgument for
// a negative index or a CUDA index beyond the GPUs present;
// FailedPrecondition naming the device when this library was built without
// CUDA; a CUDA initialization error as the CUDA backend reports it.
StatusOr<std::unique_ptr<Backend>> CreateBackend(const DeviceSpec& device);

}  // namespace distval

#endif  // DISTVAL_DEVICES_H_
