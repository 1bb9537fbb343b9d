// CudaBackend: a Backend for one CUDA GPU (cuda:N).
//
// Work is queued on one CUDA stream per backend (created non-blocking, so it
// never waits for the legacy default stream) and runs asynchronously with
// respect to the calling thread, as the Backend contract allows:
//   - Gemm: cublasSgemm on a cuBLAS handle bound to the stream. Row-major
//     operands are passed as their column-major transposes,
//     C^T = op(B)^T op(A)^T, i.e. sgemm(op_b, op_a, n, m, k, B, ldb, A, lda,
//     C, ldc). The handle keeps cuBLAS's default math mode (full FP32, no
//     TF32), so results match the CPU backend to FP32 rounding.
//   - Everything else: small kernels (kernels.h) with deterministic
//     reductions (fixed summation order, no atomics).
//   - CopyToDevice / CopyToHost of at least kStagingThresholdBytes go through
//     the backend's pinned staging buffers (pinned_staging.h), pipelined in
//     4 MiB chunks; smaller ones use cudaMemcpyAsync on pageable memory
//     (which returns once the source has been staged by the driver) and,
//     for CopyToHost, a stream synchronization.
//   - Errors of queued work surface at the next synchronizing call
//     (CopyToHost, Synchronize, or a scratch reallocation), named by that call.
//     A label outside [0, classes) yields NaN in loss / correct (it is never
//     used as an index) instead of an error.
//
// Device selection: every public operation first calls cudaSetDevice(N) on
// the calling thread, so one thread may drive several backends in turn.
// CUDA_VISIBLE_DEVICES is applied by the CUDA runtime: N counts the visible
// GPUs.
//
// Memory: DeviceBuffers are cudaMalloc'd (zero-filled by a cudaMemsetAsync on
// this backend's stream) and cudaFree'd by a shared allocator, so a buffer
// may outlive the backend. A buffer is ready for this backend's later work at
// once; another backend (another stream) may use it only after this
// backend's Synchronize(). CanAccess() accepts buffers of this GPU and of
// peer GPUs for which peer access could be enabled
// (cudaDeviceEnablePeerAccess at creation); ReduceSum over replicas on
// several GPUs requires every peer backend to have been synchronized first.
// The backend owns, besides the stream and cuBLAS handle, a device scratch
// buffer (grown on demand) and the pinned staging chunks.
//
// Thread-safety: as Backend (one thread at a time per object). Objects for
// the same or different GPUs may be used from different threads.
#ifndef DISTVAL_WORKER_CUDA_CUDA_BACKEND_H_
#define DISTVAL_WORKER_CUDA_CUDA_BACKEND_H_

#include <cublas_v2.h>
#include <cuda_runtime_api.h>

#include <cstddef>
#include <memory>
#include <string_view>
#include <vector>

#include "distval/backend.h"
#include "pinned_staging.h"

namespace distval {

class CudaBackend final : public Backend {
  // Only members can name this type, so only Create() can construct.
  struct PrivateKey {
    explicit PrivateKey() = default;
  };

 public:
  // Host copies of at least this many bytes use the pinned staging buffers.
  static constexpr size_t kStagingThresholdBytes = size_t{1} << 20;

  // A backend for visible GPU `index`. Errors: InvalidArgument when index is
  // not in [0, number of visible GPUs); the CUDA or cuBLAS error (device,
  // stream or handle creation) otherwise.
  static StatusOr<std::unique_ptr<CudaBackend>> Create(int index);

  // For Create() only (the key type is private).
  CudaBackend(PrivateKey, int index);

  // Waits for queued work, then releases the stream, the cuBLAS handle, the
  // scratch buffer and the staging chunks. Buffers allocated by this backend
  // stay valid.
  ~CudaBackend() override;

  bool CanAccess(const DeviceBuffer& buffer) const override;

 protected:
  StatusOr<DeviceBuffer> DoAllocate(int64_t num_elements, DType dtype) override;
  Status DoCopyToDevice(const void* host, DeviceBuffer& dst, size_t byte_offset,
                        size_t bytes) override;
  Status DoCopyToHost(const DeviceBuffer& src, size_t byte_offset, void* host,
                      size_t bytes) override;
  Status DoCopy(const DeviceBuffer& src, DeviceBuffer& dst, size_t bytes) override;
  Status DoFill(DeviceBuffer& buffer, float value) override;
  Status DoZero(DeviceBuffer& buffer) override;
  Status DoGemm(bool trans_a, bool trans_b, int m, int n, int k, float alpha, const DeviceBuffer& a,
                int lda, const DeviceBuffer& b, int ldb, float beta, DeviceBuffer& c,
                int ldc) override;
  Status DoBiasAdd(DeviceBuffer& x, const DeviceBuffer& bias, int rows, int cols) override;
  Status DoBiasGrad(const DeviceBuffer& dy, int rows, int cols, DeviceBuffer& bias_grad) override;
  Status DoReluForward(const DeviceBuffer& x, DeviceBuffer& y, int64_t n) override;
  Status DoReluBackward(const DeviceBuffer& y, const DeviceBuffer& dy, DeviceBuffer& dx,
                        int64_t n) override;
  Status DoSoftmaxCrossEntropyForward(const DeviceBuffer& logits, const DeviceBuffer& labels,
                                      int batch, int classes, DeviceBuffer& probs,
                                      DeviceBuffer& loss) override;
  Status DoSoftmaxCrossEntropyBackward(const DeviceBuffer& probs, const DeviceBuffer& labels,
                                       int batch, int classes, float scale,
                                       DeviceBuffer& dlogits) override;
  Status DoCountCorrect(const DeviceBuffer& logits, const DeviceBuffer& labels, int batch,
                        int classes, DeviceBuffer& correct) override;
  Status DoAxpy(float alpha, const DeviceBuffer& x, DeviceBuffer& y, int64_t n) override;
  Status DoScale(float alpha, DeviceBuffer& x, int64_t n) override;
  Status DoReduceSum(std::span<const DeviceBuffer* const> inputs, float scale, DeviceBuffer& out,
                     int64_t n) override;
  Status DoSynchronize() override;

 private:
  Status Init(int device_count);

  // OK, or the CUDA error as "<op> on cuda:N: <call> failed: ...".
  Status Check(cudaError_t err, std::string_view op, std::string_view call) const;
  // cudaSetDevice(index) on the calling thread.
  Status Activate(std::string_view op) const;
  // Makes scratch_ hold at least n floats (waits for queued work before
  // replacing a smaller one, which that work may still use).
  Status EnsureScratch(std::string_view op, int64_t n);
  float* Scratch() { return scratch_.data_as<float>(); }

  const int index_;
  cudaStream_t stream_ = nullptr;    // Owned.
  cublasHandle_t cublas_ = nullptr;  // Owned; bound to stream_.
  std::shared_ptr<DeviceAllocator> allocator_;
  std::unique_ptr<cuda::PinnedStaging> staging_;
  DeviceBuffer scratch_;  // kF32 work space of the kernels; only this stream uses it.
  // peer_access_[j]: kernels on this GPU may read and write memory of GPU j.
  std::vector<bool> peer_access_;
};

}  // namespace distval

#endif  // DISTVAL_WORKER_CUDA_CUDA_BACKEND_H_
