// Backend: one compute device of a worker (cpu:N or cuda:N), the memory it
// owns and the math a small MLP needs. Layers (distval/layers.h) are written
// once against this interface and run on every implementation:
//
//   worker/cpu/   CpuBackend  (Eigen; the calling thread does the work)
//   worker/cuda/  CudaBackend (cuBLAS + small kernels; only that folder sees
//                              CUDA types)
//
// One conformance suite (tests/worker/backend_conformance_test.cc) runs
// against every implementation.
//
// Structure (non-virtual interface): the public methods below are
// non-virtual. They validate every argument (buffer accessible from this
// backend, element type, sizes, leading dimensions) and return
// InvalidArgument naming the operation, the argument and the numbers; only
// then do they call the protected Do* hook of the implementation. A Do* hook
// may therefore assume its arguments are in bounds, and only reports device
// failures (a CUDA error becomes a Status with the CUDA message).
//
// Memory: DeviceBuffer is an owning handle to device memory, allocated by a
// backend. It carries the DeviceSpec it lives on; a backend accepts only the
// buffers it CanAccess() (by default: the same device; CpuBackend: any CPU
// buffer, since every CPU replica shares host memory). A CUDA buffer given to
// a CPU backend, or the reverse, is InvalidArgument, never a wild pointer.
//
// Ordering: calls are ordered as issued. An implementation may run them
// asynchronously with respect to the calling thread (CUDA: one stream per
// backend), with these exceptions: CopyToDevice returns once the host
// source may be reused, CopyToHost returns once the host destination holds
// the data, and Synchronize() returns once all issued work is done. An error
// of asynchronous work may be reported by a later call or by Synchronize().
//
// Thread-safety: a Backend is NOT thread-safe; it is used by one thread at a
// time (the replica's thread). Different Backend objects may be used from
// different threads concurrently. A DeviceBuffer may be destroyed from any
// thread once no work that uses it is pending.
//
// Float environment: a thread that runs CPU math should call
// SetFlushDenormalsToZero() (distval/float_env.h) first; the strategy's
// replica threads do.
#ifndef DISTVAL_BACKEND_H_
#define DISTVAL_BACKEND_H_

#include <cstddef>
#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <utility>

#include "distval/device_spec.h"
#include "distval/status.h"
#include "distval/tensor.h"

namespace distval {

// Releases the memory behind DeviceBuffers. Each backend implementation
// provides one; every buffer holds a shared reference to its allocator, so a
// buffer may outlive the Backend object that allocated it (the device itself
// must stay usable, which it does for the life of the process).
class DeviceAllocator {
 public:
  virtual ~DeviceAllocator() = default;
  // Frees `data`, which this allocator handed out. Must not fail or throw
  // (a CUDA error here may only be logged).
  virtual void Free(void* data) noexcept = 0;
};

// An owning handle to `size()` elements of `dtype()` (kF32 or kI32) in the
// memory of device `device()`. Move-only; the memory is released when the
// handle is destroyed or assigned over. A default-constructed buffer is empty
// (size 0, no memory).
//
// data() is a device address: only a backend that CanAccess() this buffer may
// dereference it (for CPU buffers that is ordinary host memory; tests and CPU
// code must still go through CopyToHost so that the same code works on CUDA).
class DeviceBuffer {
 public:
  DeviceBuffer() = default;
  ~DeviceBuffer() { Reset(); }
  DeviceBuffer(DeviceBuffer&& other) noexcept { *this = std::move(other); }
  DeviceBuffer& operator=(DeviceBuffer&& other) noexcept;
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;

  // For Backend implementations only: takes ownership of `data`, which holds
  // `num_elements` elements of `dtype` on `device` and is released with
  // allocator->Free(data). `data` may be null only when num_elements is 0.
  static DeviceBuffer Adopt(std::shared_ptr<DeviceAllocator> allocator, DeviceSpec device,
                            DType dtype, void* data, int64_t num_elements);

  bool empty() const { return size_ == 0; }
  // Number of elements.
  int64_t size() const { return size_; }
  DType dtype() const { return dtype_; }
  size_t num_bytes() const { return static_cast<size_t>(size_) * DTypeSize(dtype_); }
  const DeviceSpec& device() const { return device_; }

  // Device address of element 0 (null when empty).
  void* data() { return data_; }
  const void* data() const { return data_; }
  template <typename T>
  T* data_as() {
    return static_cast<T*>(data_);
  }
  template <typename T>
  const T* data_as() const {
    return static_cast<const T*>(data_);
  }

  // Releases the memory now; the buffer becomes empty.
  void Reset() noexcept;

 private:
  std::shared_ptr<DeviceAllocator> allocator_;
  DeviceSpec device_;
  DType dtype_ = DType::kF32;
  void* data_ = nullptr;
  int64_t size_ = 0;
};

// One device. See the file comment for the contract every method follows.
// Matrices are row-major: element (r, c) of a matrix with leading dimension
// ld is at offset r * ld + c. Sizes that describe a matrix operand are checked
// against the buffer's size: a buffer may be larger than needed (a batch
// buffer sized for the largest batch serves smaller batches).
class Backend {
 public:
  virtual ~Backend() = default;
  Backend(const Backend&) = delete;
  Backend& operator=(const Backend&) = delete;

  // The device this backend runs on.
  const DeviceSpec& device() const { return device_; }
  // "cpu:0" / "cuda:1".
  std::string Name() const { return device_.ToString(); }

  // True when this backend's operations may read and write `buffer`.
  // Default: the buffer lives on device(). Empty buffers are accessible.
  virtual bool CanAccess(const DeviceBuffer& buffer) const;

  // ---- Memory -------------------------------------------------------------

  // A zero-filled buffer of `num_elements` (>= 0) elements of `dtype`
  // (kF32 or kI32; others are InvalidArgument). ResourceExhausted when the
  // device is out of memory.
  StatusOr<DeviceBuffer> Allocate(int64_t num_elements, DType dtype = DType::kF32);

  // Copies n elements from host memory into dst[dst_offset, dst_offset + n).
  // The float overload needs a kF32 buffer, the int32 overload a kI32 one.
  // Returns once `host` may be reused.
  Status CopyToDevice(const float* host, DeviceBuffer& dst, int64_t n, int64_t dst_offset = 0);
  Status CopyToDevice(const int32_t* host, DeviceBuffer& dst, int64_t n, int64_t dst_offset = 0);
  // Copies src[src_offset, src_offset + n) into host memory. Returns once
  // `host` holds the data (waits for earlier work that writes src).
  Status CopyToHost(const DeviceBuffer& src, float* host, int64_t n, int64_t src_offset = 0);
  Status CopyToHost(const DeviceBuffer& src, int32_t* host, int64_t n, int64_t src_offset = 0);
  // dst[0, n) = src[0, n). Same dtype; both accessible from this backend;
  // src and dst must be different buffers.
  Status Copy(const DeviceBuffer& src, DeviceBuffer& dst, int64_t n);
  // Sets every element of a kF32 buffer to `value`.
  Status Fill(DeviceBuffer& buffer, float value);
  // Sets every element (any dtype) to zero.
  Status Zero(DeviceBuffer& buffer);

  // ---- Dense math (all kF32) ----------------------------------------------

  // C = alpha * op(A) * op(B) + beta * C, with op(A) m x k, op(B) k x n,
  // C m x n, all row-major (BLAS GEMM with row-major storage).
  //   trans_a false: A is stored m x k, lda >= max(1, k);
  //   trans_a true:  A is stored k x m, lda >= max(1, m);  op(A) = A^T.
  //   trans_b false: B is stored k x n, ldb >= max(1, n);
  //   trans_b true:  B is stored n x k, ldb >= max(1, k);  op(B) = B^T.
  //   ldc >= max(1, n).
  // m, n, k >= 0; m == 0 or n == 0 does nothing; k == 0 gives C = beta * C.
  // When beta == 0, C is not read (NaN/Inf in C do not propagate).
  // C must not alias A or B.
  // (A column-major BLAS computes this as C^T = op(B)^T op(A)^T, i.e.
  //  sgemm(op_b, op_a, n, m, k, alpha, B, ldb, A, lda, beta, C, ldc).)
  Status Gemm(bool trans_a, bool trans_b, int m, int n, int k, float alpha, const DeviceBuffer& a,
              int lda, const DeviceBuffer& b, int ldb, float beta, DeviceBuffer& c, int ldc);

  // x[r, c] += bias[c] for a rows x cols row-major x (leading dim cols).
  Status BiasAdd(DeviceBuffer& x, const DeviceBuffer& bias, int rows, int cols);
  // bias_grad[c] = sum over r of dy[r, c] (overwrites), dy rows x cols.
  // rows == 0 gives zeros.
  Status BiasGrad(const DeviceBuffer& dy, int rows, int cols, DeviceBuffer& bias_grad);

  // y[i] = max(x[i], 0) for i < n. y may be the same buffer as x.
  Status ReluForward(const DeviceBuffer& x, DeviceBuffer& y, int64_t n);
  // dx[i] = y[i] > 0 ? dy[i] : 0 for i < n, where y is the forward output
  // (the forward input gives the same mask). dx may be the same buffer as dy.
  Status ReluBackward(const DeviceBuffer& y, const DeviceBuffer& dy, DeviceBuffer& dx, int64_t n);

  // Softmax cross-entropy over a batch x classes logits matrix and kI32
  // labels[batch] in [0, classes):
  //   probs[r, :] = softmax(logits[r, :])   (max-subtracted, stable)
  //   loss[0]     = mean over r of -log(probs[r, labels[r]])
  // batch >= 1, classes >= 1. loss is a kF32 buffer of at least 1 element,
  // left on the device (copy it to the host when needed). A label outside
  // [0, classes) is never used as an index: CpuBackend returns
  // InvalidArgument naming the row and label; an asynchronous backend may
  // instead write NaN into loss[0].
  Status SoftmaxCrossEntropyForward(const DeviceBuffer& logits, const DeviceBuffer& labels,
                                    int batch, int classes, DeviceBuffer& probs,
                                    DeviceBuffer& loss);
  // dlogits[r, c] = scale * (probs[r, c] - (c == labels[r] ? 1 : 0)).
  // scale = 1 / batch gives the gradient of the mean loss above. dlogits may
  // be the same buffer as probs. Out-of-range labels: as above (the one-hot
  // term is skipped on asynchronous backends).
  Status SoftmaxCrossEntropyBackward(const DeviceBuffer& probs, const DeviceBuffer& labels,
                                     int batch, int classes, float scale, DeviceBuffer& dlogits);
  // correct[0] = number of rows r whose argmax over logits[r, :] equals
  // labels[r], as a float (exact up to 2^24). Ties go to the lowest index.
  Status CountCorrect(const DeviceBuffer& logits, const DeviceBuffer& labels, int batch,
                      int classes, DeviceBuffer& correct);

  // y[i] += alpha * x[i] for i < n. x and y must be different buffers.
  Status Axpy(float alpha, const DeviceBuffer& x, DeviceBuffer& y, int64_t n);
  // x[i] *= alpha for i < n.
  Status Scale(float alpha, DeviceBuffer& x, int64_t n);
  // out[i] = scale * sum over j of inputs[j][i], for i < n: the reduction of
  // gradients across local replicas (scale 1 for a sum, 1/replicas for a
  // mean). inputs must be non-empty, non-null and accessible from this
  // backend (CpuBackend reads the buffers of every CPU replica; a CUDA
  // backend may accept buffers of peer GPUs). `out` may be one of the inputs.
  Status ReduceSum(std::span<const DeviceBuffer* const> inputs, float scale, DeviceBuffer& out,
                   int64_t n);

  // Waits until all work issued on this backend has finished; returns the
  // first error of that work, if any.
  Status Synchronize();

 protected:
  explicit Backend(DeviceSpec device) : device_(device) {}

  // ---- Hooks for implementations. Called only with validated arguments
  // (see the public method of the same name); sizes are in elements unless
  // the name says bytes. ----
  virtual StatusOr<DeviceBuffer> DoAllocate(int64_t num_elements, DType dtype) = 0;
  virtual Status DoCopyToDevice(const void* host, DeviceBuffer& dst, size_t byte_offset,
                                size_t bytes) = 0;
  virtual Status DoCopyToHost(const DeviceBuffer& src, size_t byte_offset, void* host,
                              size_t bytes) = 0;
  virtual Status DoCopy(const DeviceBuffer& src, DeviceBuffer& dst, size_t bytes) = 0;
  virtual Status DoFill(DeviceBuffer& buffer, float value) = 0;
  virtual Status DoZero(DeviceBuffer& buffer) = 0;
  // m, n >= 1 here; k may be 0.
  virtual Status DoGemm(bool trans_a, bool trans_b, int m, int n, int k, float alpha,
                        const DeviceBuffer& a, int lda, const DeviceBuffer& b, int ldb, float beta,
                        DeviceBuffer& c, int ldc) = 0;
  // rows, cols >= 1 for BiasAdd; BiasGrad may get rows == 0 (write zeros).
  virtual Status DoBiasAdd(DeviceBuffer& x, const DeviceBuffer& bias, int rows, int cols) = 0;
  virtual Status DoBiasGrad(const DeviceBuffer& dy, int rows, int cols,
                            DeviceBuffer& bias_grad) = 0;
  virtual Status DoReluForward(const DeviceBuffer& x, DeviceBuffer& y, int64_t n) = 0;
  virtual Status DoReluBackward(const DeviceBuffer& y, const DeviceBuffer& dy, DeviceBuffer& dx,
                                int64_t n) = 0;
  virtual Status DoSoftmaxCrossEntropyForward(const DeviceBuffer& logits,
                                              const DeviceBuffer& labels, int batch, int classes,
                                              DeviceBuffer& probs, DeviceBuffer& loss) = 0;
  virtual Status DoSoftmaxCrossEntropyBackward(const DeviceBuffer& probs,
                                               const DeviceBuffer& labels, int batch, int classes,
                                               float scale, DeviceBuffer& dlogits) = 0;
  virtual Status DoCountCorrect(const DeviceBuffer& logits, const DeviceBuffer& labels, int batch,
                                int classes, DeviceBuffer& correct) = 0;
  virtual Status DoAxpy(float alpha, const DeviceBuffer& x, DeviceBuffer& y, int64_t n) = 0;
  virtual Status DoScale(float alpha, DeviceBuffer& x, int64_t n) = 0;
  // n >= 1; inputs non-empty and non-null.
  virtual Status DoReduceSum(std::span<const DeviceBuffer* const> inputs, float scale,
                             DeviceBuffer& out, int64_t n) = 0;
  virtual Status DoSynchronize() = 0;

 private:
  DeviceSpec device_;
};

}  // namespace distval

#endif  // DISTVAL_BACKEND_H_
