#include "cuda_backend.h"

#include <algorithm>
#include <cstddef>
#include <string>
#include <utility>

#include "cuda_hooks.h"
#include "cuda_status.h"
#include "distval/logging.h"
#include "kernels.h"

namespace distval {

namespace {

// Releases cudaMalloc'd memory of one GPU. Free() may run on any thread: it
// selects the buffer's GPU for the cudaFree and restores the thread's
// current device afterwards.
class CudaAllocator final : public DeviceAllocator {
 public:
  explicit CudaAllocator(int device) : device_(device) {}

  void Free(void* data) noexcept override {
    int previous = -1;
    const bool restore = cudaGetDevice(&previous) == cudaSuccess && previous != device_;
    cudaError_t err = cudaSetDevice(device_);
    if (err == cudaSuccess) err = cudaFree(data);
    if (restore) (void)cudaSetDevice(previous);
    if (err == cudaSuccess) return;
    (void)cudaGetLastError();  // do not leave the error to a later launch check
    // At process exit the runtime may already be gone; nothing to report.
    if (err == cudaErrorCudartUnloading || err == cudaErrorContextIsDestroyed) return;
    DV_LOG(kError) << "freeing device memory of cuda:" << device_
                   << ": cudaFree failed: " << cudaGetErrorName(err) << ": "
                   << cudaGetErrorString(err);
  }

 private:
  const int device_;
};

const float* F(const DeviceBuffer& b) { return b.data_as<float>(); }
float* F(DeviceBuffer& b) { return b.data_as<float>(); }
const int32_t* I(const DeviceBuffer& b) { return b.data_as<int32_t>(); }

}  // namespace

CudaBackend::CudaBackend(PrivateKey, int index)
    : Backend(DeviceSpec{DeviceKind::kCuda, index}),
      index_(index),
      allocator_(std::make_shared<CudaAllocator>(index)) {}

StatusOr<std::unique_ptr<CudaBackend>> CudaBackend::Create(int index) {
  const int count = internal::CudaDeviceCount();
  if (index < 0 || index >= count)
    return InvalidArgumentError("device \"cuda:" + std::to_string(index) +
                                "\" does not exist; this machine shows " + std::to_string(count) +
                                " CUDA device(s)");
  auto backend = std::make_unique<CudaBackend>(PrivateKey(), index);
  DV_RETURN_IF_ERROR(backend->Init(count));
  return backend;
}

Status CudaBackend::Init(int device_count) {
  constexpr std::string_view kOp = "creating the backend";
  DV_RETURN_IF_ERROR(Activate(kOp));
  DV_RETURN_IF_ERROR(Check(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking), kOp,
                           "cudaStreamCreateWithFlags"));
  const std::string where = std::string(kOp) + " on " + Name();
  DV_RETURN_IF_ERROR(cuda::CublasStatus(cublasCreate(&cublas_), where, "cublasCreate"));
  DV_RETURN_IF_ERROR(
      cuda::CublasStatus(cublasSetStream(cublas_, stream_), where, "cublasSetStream"));
  DV_RETURN_IF_ERROR(cuda::CublasStatus(cublasSetPointerMode(cublas_, CUBLAS_POINTER_MODE_HOST),
                                        where, "cublasSetPointerMode"));
  // Full FP32 products (no TF32 tensor-core rounding).
  DV_RETURN_IF_ERROR(cuda::CublasStatus(cublasSetMathMode(cublas_, CUBLAS_DEFAULT_MATH), where,
                                        "cublasSetMathMode"));
  staging_ = std::make_unique<cuda::PinnedStaging>(Name(), stream_);

  // Peer access lets ReduceSum (and the other operations) read the buffers of
  // replicas on other GPUs. It is a property of this GPU's context, so a
  // second backend for the same GPU finds it already enabled.
  peer_access_.assign(static_cast<size_t>(device_count), false);
  for (int peer = 0; peer < device_count; ++peer) {
    if (peer == index_) continue;
    int can = 0;
    if (cudaDeviceCanAccessPeer(&can, index_, peer) != cudaSuccess || can == 0) {
      (void)cudaGetLastError();
      continue;
    }
    const cudaError_t err = cudaDeviceEnablePeerAccess(peer, 0);
    if (err == cudaSuccess || err == cudaErrorPeerAccessAlreadyEnabled) {
      peer_access_[static_cast<size_t>(peer)] = true;
    } else {
      DV_LOG(kWarning) << Name() << ": cannot enable peer access to cuda:" << peer << ": "
                       << cudaGetErrorName(err) << "; its buffers are not accessible from here";
    }
    (void)cudaGetLastError();  // the non-sticky "already enabled" must not linger
  }
  return OkStatus();
}

CudaBackend::~CudaBackend() {
  // Nothing here may fail loudly: wait for queued work (it may use the
  // scratch buffer and the staging chunks), then release in reverse order.
  // The destroying thread's current device is restored afterwards.
  int previous = -1;
  const bool restore = cudaGetDevice(&previous) == cudaSuccess && previous != index_;
  if (cudaSetDevice(index_) == cudaSuccess && stream_ != nullptr)
    (void)cudaStreamSynchronize(stream_);
  staging_.reset();
  scratch_.Reset();
  if (cublas_ != nullptr) (void)cublasDestroy(cublas_);
  if (stream_ != nullptr) (void)cudaStreamDestroy(stream_);
  if (restore) (void)cudaSetDevice(previous);
  (void)cudaGetLastError();
}

Status CudaBackend::Check(cudaError_t err, std::string_view op, std::string_view call) const {
  if (err == cudaSuccess) return OkStatus();
  return cuda::CudaStatus(err, std::string(op) + " on " + Name(), call);
}

Status CudaBackend::Activate(std::string_view op) const {
  return Check(cudaSetDevice(index_), op, "cudaSetDevice");
}

bool CudaBackend::CanAccess(const DeviceBuffer& buffer) const {
  if (buffer.empty()) return true;
  const DeviceSpec& d = buffer.device();
  if (d.kind != DeviceKind::kCuda) return false;
  if (d.index == index_) return true;
  return d.index >= 0 && static_cast<size_t>(d.index) < peer_access_.size() &&
         peer_access_[static_cast<size_t>(d.index)];
}

Status CudaBackend::EnsureScratch(std::string_view op, int64_t n) {
  if (scratch_.size() >= n) return OkStatus();
  // Kernels queued earlier may still read or write the old scratch buffer.
  DV_RETURN_IF_ERROR(Check(cudaStreamSynchronize(stream_), op, "cudaStreamSynchronize"));
  const int64_t elements = std::max<int64_t>(n, 2 * scratch_.size());
  scratch_.Reset();
  void* p = nullptr;
  const cudaError_t err = cudaMalloc(&p, static_cast<size_t>(elements) * sizeof(float));
  if (err != cudaSuccess) {
    (void)cudaGetLastError();
    return Check(err, op, "cudaMalloc (scratch of " + std::to_string(elements) + " floats)");
  }
  scratch_ = DeviceBuffer::Adopt(allocator_, device(), DType::kF32, p, elements);
  return OkStatus();
}

StatusOr<DeviceBuffer> CudaBackend::DoAllocate(int64_t num_elements, DType dtype) {
  if (num_elements == 0) return DeviceBuffer::Adopt(allocator_, device(), dtype, nullptr, 0);
  constexpr std::string_view kOp = "Allocate";
  DV_RETURN_IF_ERROR(Activate(kOp));
  const size_t bytes = static_cast<size_t>(num_elements) * DTypeSize(dtype);
  void* p = nullptr;
  const cudaError_t err = cudaMalloc(&p, bytes);
  if (err != cudaSuccess) {
    (void)cudaGetLastError();  // out of memory is not sticky; clear it
    return Check(err, kOp,
                 "cudaMalloc of " + std::to_string(num_elements) + " elements (" +
                     std::to_string(bytes) + " bytes)");
  }
  DeviceBuffer buffer = DeviceBuffer::Adopt(allocator_, device(), dtype, p, num_elements);
  DV_RETURN_IF_ERROR(Check(cudaMemsetAsync(p, 0, bytes, stream_), kOp, "cudaMemsetAsync"));
  return buffer;
}

Status CudaBackend::DoCopyToDevice(const void* host, DeviceBuffer& dst, size_t byte_offset,
                                   size_t bytes) {
  constexpr std::string_view kOp = "CopyToDevice";
  DV_RETURN_IF_ERROR(Activate(kOp));
  void* to = static_cast<std::byte*>(dst.data()) + byte_offset;
  if (bytes >= kStagingThresholdBytes && staging_->Available())
    return staging_->ToDevice(host, to, bytes, std::string(kOp) + " on " + Name());
  // Pageable source: the runtime stages it before returning, so `host` may
  // be reused at once.
  return Check(cudaMemcpyAsync(to, host, bytes, cudaMemcpyHostToDevice, stream_), kOp,
               "cudaMemcpyAsync (host to device)");
}

Status CudaBackend::DoCopyToHost(const DeviceBuffer& src, size_t byte_offset, void* host,
                                 size_t bytes) {
  constexpr std::string_view kOp = "CopyToHost";
  DV_RETURN_IF_ERROR(Activate(kOp));
  const void* from = static_cast<const std::byte*>(src.data()) + byte_offset;
  if (bytes >= kStagingThresholdBytes && staging_->Available())
    return staging_->ToHost(from, host, bytes, std::string(kOp) + " on " + Name());
  DV_RETURN_IF_ERROR(Check(cudaMemcpyAsync(host, from, bytes, cudaMemcpyDeviceToHost, stream_), kOp,
                           "cudaMemcpyAsync (device to host)"));
  // Also reports errors of earlier asynchronous work.
  return Check(cudaStreamSynchronize(stream_), kOp, "cudaStreamSynchronize");
}

Status CudaBackend::DoCopy(const DeviceBuffer& src, DeviceBuffer& dst, size_t bytes) {
  constexpr std::string_view kOp = "Copy";
  DV_RETURN_IF_ERROR(Activate(kOp));
  // cudaMemcpyDefault: the runtime infers the direction from the unified
  // addresses, which also covers a peer GPU's buffer.
  return Check(cudaMemcpyAsync(dst.data(), src.data(), bytes, cudaMemcpyDefault, stream_), kOp,
               "cudaMemcpyAsync");
}

Status CudaBackend::DoFill(DeviceBuffer& buffer, float value) {
  constexpr std::string_view kOp = "Fill";
  DV_RETURN_IF_ERROR(Activate(kOp));
  return Check(cuda::LaunchFill(F(buffer), buffer.size(), value, stream_), kOp, "kernel Fill");
}

Status CudaBackend::DoZero(DeviceBuffer& buffer) {
  constexpr std::string_view kOp = "Zero";
  DV_RETURN_IF_ERROR(Activate(kOp));
  return Check(cudaMemsetAsync(buffer.data(), 0, buffer.num_bytes(), stream_), kOp,
               "cudaMemsetAsync");
}

Status CudaBackend::DoGemm(bool trans_a, bool trans_b, int m, int n, int k, float alpha,
                           const DeviceBuffer& a, int lda, const DeviceBuffer& b, int ldb,
                           float beta, DeviceBuffer& c, int ldc) {
  constexpr std::string_view kOp = "Gemm";
  DV_RETURN_IF_ERROR(Activate(kOp));
  if (k == 0) {
    // C = beta * C (without reading C when beta == 0); A and B are not read.
    return Check(cuda::LaunchScaleMatrix(F(c), m, n, ldc, beta, stream_), kOp,
                 "kernel ScaleMatrix");
  }
  // Row-major C (m x n, ldc) is column-major C^T (n x m, ldc); likewise for A
  // and B. C^T = op(B)^T op(A)^T, where the column-major view of a stored
  // row-major matrix already is its transpose: op_b = trans_b ? T : N, and
  // the same for A.
  const cublasOperation_t op_a = trans_a ? CUBLAS_OP_T : CUBLAS_OP_N;
  const cublasOperation_t op_b = trans_b ? CUBLAS_OP_T : CUBLAS_OP_N;
  const cublasStatus_t status =
      cublasSgemm(cublas_, op_b, op_a, n, m, k, &alpha, F(b), ldb, F(a), lda, &beta, F(c), ldc);
  if (status == CUBLAS_STATUS_SUCCESS) return OkStatus();
  return cuda::CublasStatus(status, std::string(kOp) + " on " + Name(), "cublasSgemm");
}

Status CudaBackend::DoBiasAdd(DeviceBuffer& x, const DeviceBuffer& bias, int rows, int cols) {
  constexpr std::string_view kOp = "BiasAdd";
  DV_RETURN_IF_ERROR(Activate(kOp));
  return Check(cuda::LaunchBiasAdd(F(x), F(bias), rows, cols, stream_), kOp, "kernel BiasAdd");
}

Status CudaBackend::DoBiasGrad(const DeviceBuffer& dy, int rows, int cols,
                               DeviceBuffer& bias_grad) {
  constexpr std::string_view kOp = "BiasGrad";
  DV_RETURN_IF_ERROR(Activate(kOp));
  DV_RETURN_IF_ERROR(EnsureScratch(kOp, cuda::BiasGradScratchElements(rows, cols)));
  return Check(cuda::LaunchBiasGrad(F(dy), rows, cols, Scratch(), F(bias_grad), stream_), kOp,
               "kernel BiasGrad");
}

Status CudaBackend::DoReluForward(const DeviceBuffer& x, DeviceBuffer& y, int64_t n) {
  constexpr std::string_view kOp = "ReluForward";
  DV_RETURN_IF_ERROR(Activate(kOp));
  return Check(cuda::LaunchReluForward(F(x), F(y), n, stream_), kOp, "kernel ReluForward");
}

Status CudaBackend::DoReluBackward(const DeviceBuffer& y, const DeviceBuffer& dy, DeviceBuffer& dx,
                                   int64_t n) {
  constexpr std::string_view kOp = "ReluBackward";
  DV_RETURN_IF_ERROR(Activate(kOp));
  return Check(cuda::LaunchReluBackward(F(y), F(dy), F(dx), n, stream_), kOp,
               "kernel ReluBackward");
}

Status CudaBackend::DoSoftmaxCrossEntropyForward(const DeviceBuffer& logits,
                                                 const DeviceBuffer& labels, int batch, int classes,
                                                 DeviceBuffer& probs, DeviceBuffer& loss) {
  constexpr std::string_view kOp = "SoftmaxCrossEntropyForward";
  DV_RETURN_IF_ERROR(Activate(kOp));
  DV_RETURN_IF_ERROR(EnsureScratch(kOp, batch));
  return Check(cuda::LaunchSoftmaxCrossEntropyForward(F(logits), I(labels), batch, classes,
                                                      F(probs), Scratch(), F(loss), stream_),
               kOp, "kernel SoftmaxCrossEntropyForward");
}

Status CudaBackend::DoSoftmaxCrossEntropyBackward(const DeviceBuffer& probs,
                                                  const DeviceBuffer& labels, int batch,
                                                  int classes, float scale, DeviceBuffer& dlogits) {
  constexpr std::string_view kOp = "SoftmaxCrossEntropyBackward";
  DV_RETURN_IF_ERROR(Activate(kOp));
  return Check(cuda::LaunchSoftmaxCrossEntropyBackward(F(probs), I(labels), batch, classes, scale,
                                                       F(dlogits), stream_),
               kOp, "kernel SoftmaxCrossEntropyBackward");
}

Status CudaBackend::DoCountCorrect(const DeviceBuffer& logits, const DeviceBuffer& labels,
                                   int batch, int classes, DeviceBuffer& correct) {
  constexpr std::string_view kOp = "CountCorrect";
  DV_RETURN_IF_ERROR(Activate(kOp));
  DV_RETURN_IF_ERROR(EnsureScratch(kOp, batch));
  return Check(cuda::LaunchCountCorrect(F(logits), I(labels), batch, classes, Scratch(), F(correct),
                                        stream_),
               kOp, "kernel CountCorrect");
}

Status CudaBackend::DoAxpy(float alpha, const DeviceBuffer& x, DeviceBuffer& y, int64_t n) {
  constexpr std::string_view kOp = "Axpy";
  DV_RETURN_IF_ERROR(Activate(kOp));
  return Check(cuda::LaunchAxpy(alpha, F(x), F(y), n, stream_), kOp, "kernel Axpy");
}

Status CudaBackend::DoScale(float alpha, DeviceBuffer& x, int64_t n) {
  constexpr std::string_view kOp = "Scale";
  DV_RETURN_IF_ERROR(Activate(kOp));
  return Check(cuda::LaunchScale(alpha, F(x), n, stream_), kOp, "kernel Scale");
}

Status CudaBackend::DoReduceSum(std::span<const DeviceBuffer* const> inputs, float scale,
                                DeviceBuffer& out, int64_t n) {
  constexpr std::string_view kOp = "ReduceSum";
  DV_RETURN_IF_ERROR(Activate(kOp));
  const int count = static_cast<int>(inputs.size());
  DV_RETURN_IF_ERROR(EnsureScratch(kOp, cuda::ReduceSumScratchElements(count, n)));
  std::vector<const float*> pointers;
  pointers.reserve(inputs.size());
  for (const DeviceBuffer* in : inputs) pointers.push_back(F(*in));
  return Check(cuda::LaunchReduceSum(pointers.data(), count, scale, F(out), n, Scratch(), stream_),
               kOp, "kernel ReduceSum");
}

Status CudaBackend::DoSynchronize() {
  constexpr std::string_view kOp = "Synchronize";
  DV_RETURN_IF_ERROR(Activate(kOp));
  return Check(cudaStreamSynchronize(stream_), kOp, "cudaStreamSynchronize");
}

}  // namespace distval
