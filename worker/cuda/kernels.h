// Host-callable launchers of the CUDA kernels behind CudaBackend (compiled by
// nvcc in kernels.cu; everything else in worker/cuda/ is host C++).
//
// Every launcher enqueues its kernel(s) on `stream` and returns immediately
// with the launch status (cudaGetLastError() after the launch: a bad
// configuration, a missing kernel image for this GPU, ...). Errors raised
// while a kernel runs surface later, at a synchronizing call.
//
// Pointers are device addresses (or peer-device addresses where peer access
// is enabled), sizes are in elements, matrices are row-major with a leading
// dimension. The callers (CudaBackend) have validated sizes; the launchers
// only require what each comment says.
//
// Determinism: every reduction here sums in a fixed order that depends only
// on the sizes (per-thread strided loops, then fixed trees; no atomics), so
// the same inputs give bitwise the same outputs on the same GPU model.
//
// Thread-safety: the launchers are stateless; the stream orders the work.
#ifndef DISTVAL_WORKER_CUDA_KERNELS_H_
#define DISTVAL_WORKER_CUDA_KERNELS_H_

#include <cuda_runtime_api.h>

#include <cstdint>

namespace distval::cuda {

// x[i] = value for i < n (n >= 1).
cudaError_t LaunchFill(float* x, int64_t n, float value, cudaStream_t stream);

// For the rows x cols matrix c with leading dimension ld (rows, cols >= 1):
// c = beta * c, or c = 0 without reading c when beta == 0 (GEMM with k == 0).
// Elements beyond `cols` in each row (padding) are not touched.
cudaError_t LaunchScaleMatrix(float* c, int rows, int cols, int ld, float beta,
                              cudaStream_t stream);

// x[r, c] += bias[c] (rows, cols >= 1; leading dimension cols).
cudaError_t LaunchBiasAdd(float* x, const float* bias, int rows, int cols, cudaStream_t stream);

// Scratch elements LaunchBiasGrad needs for these sizes.
int64_t BiasGradScratchElements(int rows, int cols);
// bias_grad[c] = sum over r of dy[r, c] (cols >= 1, rows >= 0; rows == 0
// writes zeros). Two passes: per-slice column sums into `scratch`
// (BiasGradScratchElements elements), then one ordered sum per column.
cudaError_t LaunchBiasGrad(const float* dy, int rows, int cols, float* scratch, float* bias_grad,
                           cudaStream_t stream);

// y[i] = x[i] > 0 ? x[i] : 0 (y may equal x; n >= 1).
cudaError_t LaunchReluForward(const float* x, float* y, int64_t n, cudaStream_t stream);
// dx[i] = y[i] > 0 ? dy[i] : 0 (dx may equal dy; n >= 1).
cudaError_t LaunchReluBackward(const float* y, const float* dy, float* dx, int64_t n,
                               cudaStream_t stream);

// Softmax cross-entropy forward (batch, classes >= 1): one warp per row
// (max-subtracted), probs may equal logits. row_loss (batch elements of
// scratch) receives each row's -log p[label] (NaN for a label outside
// [0, classes), which is never used as an index); then one block sums
// row_loss in a fixed order, in double, into loss[0] = sum / batch.
cudaError_t LaunchSoftmaxCrossEntropyForward(const float* logits, const int32_t* labels, int batch,
                                             int classes, float* probs, float* row_loss,
                                             float* loss, cudaStream_t stream);

// dlogits[r, c] = scale * probs[r, c] - (c == labels[r] ? scale : 0);
// dlogits may equal probs. An out-of-range label skips the one-hot term.
cudaError_t LaunchSoftmaxCrossEntropyBackward(const float* probs, const int32_t* labels, int batch,
                                              int classes, float scale, float* dlogits,
                                              cudaStream_t stream);

// correct[0] = number of rows whose argmax (ties: lowest index) equals the
// label (batch, classes >= 1). One warp per row writes 0/1 into row_flags
// (batch elements of scratch; NaN for an out-of-range label, so the count
// becomes NaN), then an ordered sum.
cudaError_t LaunchCountCorrect(const float* logits, const int32_t* labels, int batch, int classes,
                               float* row_flags, float* correct, cudaStream_t stream);

// y[i] += alpha * x[i] (n >= 1).
cudaError_t LaunchAxpy(float alpha, const float* x, float* y, int64_t n, cudaStream_t stream);
// x[i] *= alpha (n >= 1).
cudaError_t LaunchScale(float alpha, float* x, int64_t n, cudaStream_t stream);

// Inputs one ReduceSum kernel launch reads; more take several launches.
inline constexpr int kReduceInputsPerLaunch = 32;
// Scratch elements LaunchReduceSum needs (0 when one launch suffices).
int64_t ReduceSumScratchElements(int num_inputs, int64_t n);
// out[i] = scale * (inputs[0][i] + inputs[1][i] + ... ) summed in input
// order, like CpuBackend (num_inputs >= 1, n >= 1). `inputs` is a host array
// of device pointers; `out` may be one of them. More than
// kReduceInputsPerLaunch inputs accumulate through `scratch`
// (ReduceSumScratchElements elements).
cudaError_t LaunchReduceSum(const float* const* inputs, int num_inputs, float scale, float* out,
                            int64_t n, float* scratch, cudaStream_t stream);

}  // namespace distval::cuda

#endif  // DISTVAL_WORKER_CUDA_KERNELS_H_
