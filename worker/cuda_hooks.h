// What the CUDA backend provides to the rest of the worker library. Exactly
// one of two files defines these functions, chosen by meson:
//   worker/cuda/...   when the build has CUDA (cuda_enabled);
//   worker/no_cuda.cc otherwise (no GPUs, CUDA backend unavailable).
// Internal header: only worker/devices.cc and worker/cuda/ include it.
#ifndef DISTVAL_WORKER_CUDA_HOOKS_H_
#define DISTVAL_WORKER_CUDA_HOOKS_H_

#include <memory>

#include "distval/backend.h"
#include "distval/status.h"

namespace distval::internal {

// True when this library was built with the CUDA backend.
bool CudaBuilt();

// Number of CUDA devices the runtime shows (it applies CUDA_VISIBLE_DEVICES
// itself). Never fails: a machine without a GPU or driver (cudaGetDeviceCount
// returning an error such as cudaErrorInsufficientDriver (35) or
// cudaErrorNoDevice) counts as 0. Thread-safe.
int CudaDeviceCount();

// A backend for CUDA device `index` (0 <= index < CudaDeviceCount(), checked
// by the caller). Errors: FailedPrecondition when built without CUDA (naming
// the device), or the CUDA error that prevented initialization.
StatusOr<std::unique_ptr<Backend>> CreateCudaBackend(int index);

}  // namespace distval::internal

#endif  // DISTVAL_WORKER_CUDA_HOOKS_H_
