// Conversion of CUDA runtime and cuBLAS error codes into distval Status.
//
// Internal to worker/cuda/: this is the boundary where CUDA types stop. Every
// message names where the failure happened (the backend operation and
// device, e.g. "Gemm on cuda:0"), the CUDA or cuBLAS call, the error's name
// and its description:
//
//   "Gemm on cuda:0: cublasSgemm failed: CUBLAS_STATUS_EXECUTION_FAILED (...)"
//
// Codes: out-of-memory (cudaErrorMemoryAllocation, CUBLAS_STATUS_ALLOC_FAILED)
// is ResourceExhausted; a missing or unusable device or driver is
// FailedPrecondition; anything else is Internal.
//
// Thread-safety: pure functions.
#ifndef DISTVAL_WORKER_CUDA_CUDA_STATUS_H_
#define DISTVAL_WORKER_CUDA_CUDA_STATUS_H_

#include <cublas_v2.h>
#include <cuda_runtime_api.h>

#include <string_view>

#include "distval/status.h"

namespace distval::cuda {

// OK when err == cudaSuccess; otherwise "<where>: <call> failed: <name>: <text>".
Status CudaStatus(cudaError_t err, std::string_view where, std::string_view call);

// OK when status == CUBLAS_STATUS_SUCCESS; otherwise
// "<where>: <call> failed: <name> (<text>)".
Status CublasStatus(cublasStatus_t status, std::string_view where, std::string_view call);

}  // namespace distval::cuda

#endif  // DISTVAL_WORKER_CUDA_CUDA_STATUS_H_
