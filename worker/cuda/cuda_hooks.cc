// Definitions of worker/cuda_hooks.h for builds with CUDA.
#include "cuda_hooks.h"

#include <cuda_runtime_api.h>

#include "cuda_backend.h"

namespace distval::internal {

bool CudaBuilt() { return true; }

int CudaDeviceCount() {
  // Probed once per process (thread-safe static initialization). Any error,
  // e.g. cudaErrorInsufficientDriver (35) or cudaErrorNoDevice (100) on a
  // machine without a usable GPU, means "no GPUs"; it is cleared so that it
  // does not resurface in a later launch check on this thread.
  static const int count = [] {
    int n = 0;
    if (cudaGetDeviceCount(&n) != cudaSuccess) {
      (void)cudaGetLastError();
      return 0;
    }
    return n;
  }();
  return count;
}

StatusOr<std::unique_ptr<Backend>> CreateCudaBackend(int index) {
  DV_ASSIGN_OR_RETURN(std::unique_ptr<CudaBackend> backend, CudaBackend::Create(index));
  return std::unique_ptr<Backend>(std::move(backend));
}

}  // namespace distval::internal
