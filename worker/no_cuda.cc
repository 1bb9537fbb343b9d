// Definitions of worker/cuda_hooks.h for builds without CUDA.
#include <string>

#include "cuda_hooks.h"

namespace distval::internal {

bool CudaBuilt() { return false; }

int CudaDeviceCount() { return 0; }

StatusOr<std::unique_ptr<Backend>> CreateCudaBackend(int index) {
  return FailedPreconditionError("device cuda:" + std::to_string(index) +
                                 ": this distval was built without CUDA (reconfigure with "
                                 "-Dcuda=enabled on a machine with the CUDA toolkit)");
}

}  // namespace distval::internal
