#include "cuda_status.h"

#include <string>

namespace distval::cuda {

namespace {

StatusCode CodeFor(cudaError_t err) {
  switch (err) {
    case cudaErrorMemoryAllocation:
      return StatusCode::kResourceExhausted;
    case cudaErrorNoDevice:
    case cudaErrorInsufficientDriver:
    case cudaErrorInvalidDevice:
    case cudaErrorDevicesUnavailable:
    case cudaErrorNoKernelImageForDevice:
    case cudaErrorUnsupportedPtxVersion:
    case cudaErrorSystemDriverMismatch:
      return StatusCode::kFailedPrecondition;
    default:
      return StatusCode::kInternal;
  }
}

}  // namespace

Status CudaStatus(cudaError_t err, std::string_view where, std::string_view call) {
  if (err == cudaSuccess) return OkStatus();
  std::string msg(where);
  msg += ": ";
  msg += call;
  msg += " failed: ";
  msg += cudaGetErrorName(err);
  msg += ": ";
  msg += cudaGetErrorString(err);
  return Status(CodeFor(err), std::move(msg));
}

Status CublasStatus(cublasStatus_t status, std::string_view where, std::string_view call) {
  if (status == CUBLAS_STATUS_SUCCESS) return OkStatus();
  std::string msg(where);
  msg += ": ";
  msg += call;
  msg += " failed: ";
  msg += cublasGetStatusName(status);
  msg += " (";
  msg += cublasGetStatusString(status);
  msg += ")";
  const StatusCode code =
      status == CUBLAS_STATUS_ALLOC_FAILED ? StatusCode::kResourceExhausted
      : status == CUBLAS_STATUS_NOT_INITIALIZED || status == CUBLAS_STATUS_ARCH_MISMATCH
          ? StatusCode::kFailedPrecondition
          : StatusCode::kInternal;
  return Status(code, std::move(msg));
}

}  // namespace distval::cuda
