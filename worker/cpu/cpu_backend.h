// CpuBackend: a Backend for one CPU replica (cpu:N).
//
// A CPU replica is a thread with its own buffers: every operation runs on the
// calling thread, synchronously, with Eigen over row-major maps of host
// memory. Eigen's own threading stays off (the library is not built with
// OpenMP, so Eigen products run on the calling thread): the replica is the
// unit of parallelism, and N replicas on N threads use N cores without
// oversubscription. The calling thread should have called
// SetFlushDenormalsToZero().
//
// Buffers are 64-byte aligned host memory. CanAccess() accepts the buffers of
// every CPU device (all CPU replicas share host memory), so ReduceSum on one
// CPU replica can read the gradients of the others directly. CUDA buffers are
// rejected.
//
// Thread-safety: as Backend (one thread at a time per object).
#ifndef DISTVAL_WORKER_CPU_CPU_BACKEND_H_
#define DISTVAL_WORKER_CPU_CPU_BACKEND_H_

#include <memory>

#include "distval/backend.h"

namespace distval {

class CpuBackend final : public Backend {
 public:
  // Backend for cpu:<index>. index >= 0 (not checked against the hardware;
  // see ParseDevices for that).
  explicit CpuBackend(int index);
  ~CpuBackend() override;

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
  std::shared_ptr<DeviceAllocator> allocator_;
};

}  // namespace distval

#endif  // DISTVAL_WORKER_CPU_CPU_BACKEND_H_
