// CUDA kernels of CudaBackend and their launchers (see kernels.h).
#include <math_constants.h>

#include <algorithm>
#include <cstdint>

#include "kernels.h"

namespace distval::cuda {

namespace {

constexpr int kThreads = 256;          // elementwise kernels
constexpr int64_t kMaxBlocks = 65536;  // grid-stride loops cover the rest
constexpr int kWarpSize = 32;
constexpr unsigned kFullMask = 0xffffffffu;

// Blocks for a grid-stride loop over n elements (n >= 1).
unsigned BlocksFor(int64_t n, int threads = kThreads) {
  const int64_t blocks = (n + threads - 1) / threads;
  return static_cast<unsigned>(std::clamp<int64_t>(blocks, 1, kMaxBlocks));
}

__device__ __forceinline__ int64_t GlobalThread() {
  return static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
}
__device__ __forceinline__ int64_t GridThreads() {
  return static_cast<int64_t>(gridDim.x) * blockDim.x;
}

// Butterfly reductions: every lane ends with the same, bitwise identical
// value (IEEE addition and max are commutative, and each level combines the
// same pairs on every lane).
__device__ __forceinline__ float WarpMax(float v) {
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2)
    v = fmaxf(v, __shfl_xor_sync(kFullMask, v, offset));
  return v;
}
__device__ __forceinline__ float WarpSum(float v) {
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2)
    v += __shfl_xor_sync(kFullMask, v, offset);
  return v;
}

// ---- Elementwise ----------------------------------------------------------

__global__ void FillKernel(float* x, int64_t n, float value) {
  for (int64_t i = GlobalThread(); i < n; i += GridThreads()) x[i] = value;
}

__global__ void ScaleMatrixKernel(float* c, int rows, int cols, int ld, float beta) {
  const int64_t n = static_cast<int64_t>(rows) * cols;
  for (int64_t i = GlobalThread(); i < n; i += GridThreads()) {
    const int64_t r = i / cols, col = i % cols;
    float* p = c + r * ld + col;
    *p = beta == 0.0f ? 0.0f : beta * *p;
  }
}

__global__ void BiasAddKernel(float* x, const float* bias, int rows, int cols) {
  const int64_t n = static_cast<int64_t>(rows) * cols;
  for (int64_t i = GlobalThread(); i < n; i += GridThreads()) x[i] += bias[i % cols];
}

__global__ void ReluForwardKernel(const float* x, float* y, int64_t n) {
  for (int64_t i = GlobalThread(); i < n; i += GridThreads()) {
    const float v = x[i];
    y[i] = v > 0.0f ? v : 0.0f;
  }
}

__global__ void ReluBackwardKernel(const float* y, const float* dy, float* dx, int64_t n) {
  for (int64_t i = GlobalThread(); i < n; i += GridThreads()) dx[i] = y[i] > 0.0f ? dy[i] : 0.0f;
}

__global__ void AxpyKernel(float alpha, const float* x, float* y, int64_t n) {
  for (int64_t i = GlobalThread(); i < n; i += GridThreads()) y[i] += alpha * x[i];
}

__global__ void ScaleKernel(float alpha, float* x, int64_t n) {
  for (int64_t i = GlobalThread(); i < n; i += GridThreads()) x[i] *= alpha;
}

// ---- Column sums (BiasGrad) -------------------------------------------------

constexpr int kBiasCols = 32;        // columns per block (one warp across a row)
constexpr int kBiasRowThreads = 8;   // row groups per block
constexpr int kBiasSliceRows = 256;  // rows per block, grown for huge batches
constexpr int64_t kMaxGridY = 65535;

// Rows per slice so that the number of slices fits gridDim.y.
int BiasSliceRows(int rows) {
  int64_t slice = kBiasSliceRows;
  while ((rows + slice - 1) / slice > kMaxGridY) slice *= 2;
  return static_cast<int>(slice);
}
int BiasSlices(int rows) {
  if (rows == 0) return 0;
  const int slice = BiasSliceRows(rows);
  return (rows + slice - 1) / slice;
}

// partial[s, c] = sum of dy[r, c] over the rows of slice s. A warp reads 32
// consecutive columns of one row (coalesced); each thread sums every
// kBiasRowThreads-th row of the slice, then one thread per column adds the
// kBiasRowThreads partial sums in order.
__global__ void BiasGradPartialKernel(const float* dy, int rows, int cols, int slice_rows,
                                      float* partial) {
  __shared__ float sums[kBiasRowThreads][kBiasCols + 1];
  const int c = blockIdx.x * kBiasCols + threadIdx.x;
  const int64_t r0 = static_cast<int64_t>(blockIdx.y) * slice_rows;
  const int64_t r1 = min(r0 + slice_rows, static_cast<int64_t>(rows));
  float acc = 0.0f;
  if (c < cols) {
#pragma unroll 4
    for (int64_t r = r0 + threadIdx.y; r < r1; r += kBiasRowThreads) acc += dy[r * cols + c];
  }
  sums[threadIdx.y][threadIdx.x] = acc;
  __syncthreads();
  if (threadIdx.y == 0 && c < cols) {
    float total = sums[0][threadIdx.x];
    for (int k = 1; k < kBiasRowThreads; ++k) total += sums[k][threadIdx.x];
    partial[static_cast<int64_t>(blockIdx.y) * cols + c] = total;
  }
}

// out[c] = sum over s < slices of partial[s, c], in order (0 when slices == 0).
__global__ void BiasGradFinalKernel(const float* partial, int slices, int cols, float* out) {
  for (int64_t c = GlobalThread(); c < cols; c += GridThreads()) {
    float total = 0.0f;
    for (int s = 0; s < slices; ++s) total += partial[static_cast<int64_t>(s) * cols + c];
    out[c] = total;
  }
}

// ---- Ordered sum of a vector (loss mean, correct count) ---------------------

constexpr int kSumThreads = 256;

// out[0] = (sum of v[0, n)) / divisor, accumulated in double: each thread
// sums a fixed strided subset in order, then a fixed tree combines them.
__global__ void OrderedSumKernel(const float* v, int n, double divisor, float* out) {
  __shared__ double sums[kSumThreads];
  double acc = 0.0;
  for (int i = threadIdx.x; i < n; i += kSumThreads) acc += v[i];
  sums[threadIdx.x] = acc;
  __syncthreads();
  for (int stride = kSumThreads / 2; stride > 0; stride /= 2) {
    if (threadIdx.x < stride) sums[threadIdx.x] += sums[threadIdx.x + stride];
    __syncthreads();
  }
  if (threadIdx.x == 0) out[0] = static_cast<float>(sums[0] / divisor);
}

// ---- Softmax cross-entropy and accuracy: one warp per row -------------------

constexpr int kRowThreads = 256;  // 8 rows (warps) per block
constexpr int kRowsPerBlock = kRowThreads / kWarpSize;

__device__ __forceinline__ int64_t GlobalWarp() { return GlobalThread() / kWarpSize; }
__device__ __forceinline__ int64_t GridWarps() { return GridThreads() / kWarpSize; }

__global__ void SoftmaxCrossEntropyForwardKernel(const float* logits, const int32_t* labels,
                                                 int batch, int classes, float* probs,
                                                 float* row_loss) {
  const int lane = threadIdx.x % kWarpSize;
  // The loop bound is the same for all lanes of a warp, so whole warps run
  // the shuffles below.
  for (int64_t r = GlobalWarp(); r < batch; r += GridWarps()) {
    const float* x = logits + r * classes;
    float* p = probs + r * classes;
    float mx = -CUDART_INF_F;
    for (int c = lane; c < classes; c += kWarpSize) mx = fmaxf(mx, x[c]);
    mx = WarpMax(mx);
    const int32_t label = labels[r];
    const bool valid = label >= 0 && label < classes;
    // Read the target logit before probs (which may be the logits buffer) is
    // written; an invalid label is never used as an index.
    const float target = valid ? x[label] - mx : CUDART_NAN_F;
    float sum = 0.0f;
    for (int c = lane; c < classes; c += kWarpSize) sum += expf(x[c] - mx);
    sum = WarpSum(sum);
    __syncwarp();  // every lane has read x[label] before any lane writes p
    for (int c = lane; c < classes; c += kWarpSize) p[c] = expf(x[c] - mx) / sum;
    if (lane == 0) row_loss[r] = logf(sum) - target;
  }
}

__global__ void SoftmaxCrossEntropyBackwardKernel(const float* probs, const int32_t* labels,
                                                  int batch, int classes, float scale,
                                                  float* dlogits) {
  const int64_t n = static_cast<int64_t>(batch) * classes;
  for (int64_t i = GlobalThread(); i < n; i += GridThreads()) {
    const int64_t r = i / classes;
    const int c = static_cast<int>(i % classes);
    float v = probs[i] * scale;
    if (c == labels[r]) v -= scale;  // never true for an out-of-range label
    dlogits[i] = v;
  }
}

__global__ void CountCorrectKernel(const float* logits, const int32_t* labels, int batch,
                                   int classes, float* row_flags) {
  const int lane = threadIdx.x % kWarpSize;
  for (int64_t r = GlobalWarp(); r < batch; r += GridWarps()) {
    const float* x = logits + r * classes;
    // Per lane: the first maximum among its columns (ascending, strict >).
    float best = 0.0f;
    int best_index = -1;
    for (int c = lane; c < classes; c += kWarpSize) {
      const float v = x[c];
      if (best_index < 0 || v > best) {
        best = v;
        best_index = c;
      }
    }
    // Across lanes: larger value wins; equal values go to the lower index.
    for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {
      const float other = __shfl_xor_sync(kFullMask, best, offset);
      const int other_index = __shfl_xor_sync(kFullMask, best_index, offset);
      const bool take = other_index >= 0 && (best_index < 0 || other > best ||
                                             (other == best && other_index < best_index));
      if (take) {
        best = other;
        best_index = other_index;
      }
    }
    if (lane == 0) {
      const int32_t label = labels[r];
      row_flags[r] =
          (label < 0 || label >= classes) ? CUDART_NAN_F : (best_index == label ? 1.0f : 0.0f);
    }
  }
}

// ---- ReduceSum ----------------------------------------------------------------

struct ReduceInputs {
  const float* ptr[kReduceInputsPerLaunch];
};

// out[i] = scale * (acc[i] + in[0][i] + ... + in[count-1][i]), or without the
// acc term when acc is null; summed left to right like CpuBackend.
__global__ void ReduceSumKernel(ReduceInputs in, int count, const float* acc, float scale,
                                float* out, int64_t n) {
  for (int64_t i = GlobalThread(); i < n; i += GridThreads()) {
    float a;
    int j = 0;
    if (acc != nullptr) {
      a = acc[i];
    } else {
      a = in.ptr[0][i];
      j = 1;
    }
    for (; j < count; ++j) a += in.ptr[j][i];
    out[i] = a * scale;
  }
}

}  // namespace

cudaError_t LaunchFill(float* x, int64_t n, float value, cudaStream_t stream) {
  FillKernel<<<BlocksFor(n), kThreads, 0, stream>>>(x, n, value);
  return cudaGetLastError();
}

cudaError_t LaunchScaleMatrix(float* c, int rows, int cols, int ld, float beta,
                              cudaStream_t stream) {
  ScaleMatrixKernel<<<BlocksFor(static_cast<int64_t>(rows) * cols), kThreads, 0, stream>>>(
      c, rows, cols, ld, beta);
  return cudaGetLastError();
}

cudaError_t LaunchBiasAdd(float* x, const float* bias, int rows, int cols, cudaStream_t stream) {
  BiasAddKernel<<<BlocksFor(static_cast<int64_t>(rows) * cols), kThreads, 0, stream>>>(x, bias,
                                                                                       rows, cols);
  return cudaGetLastError();
}

int64_t BiasGradScratchElements(int rows, int cols) {
  return static_cast<int64_t>(BiasSlices(rows)) * cols;
}

cudaError_t LaunchBiasGrad(const float* dy, int rows, int cols, float* scratch, float* bias_grad,
                           cudaStream_t stream) {
  const int slices = BiasSlices(rows);
  if (slices > 0) {
    const dim3 grid((cols + kBiasCols - 1) / kBiasCols, slices);
    const dim3 block(kBiasCols, kBiasRowThreads);
    BiasGradPartialKernel<<<grid, block, 0, stream>>>(dy, rows, cols, BiasSliceRows(rows), scratch);
    const cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  BiasGradFinalKernel<<<BlocksFor(cols), kThreads, 0, stream>>>(scratch, slices, cols, bias_grad);
  return cudaGetLastError();
}

cudaError_t LaunchReluForward(const float* x, float* y, int64_t n, cudaStream_t stream) {
  ReluForwardKernel<<<BlocksFor(n), kThreads, 0, stream>>>(x, y, n);
  return cudaGetLastError();
}

cudaError_t LaunchReluBackward(const float* y, const float* dy, float* dx, int64_t n,
                               cudaStream_t stream) {
  ReluBackwardKernel<<<BlocksFor(n), kThreads, 0, stream>>>(y, dy, dx, n);
  return cudaGetLastError();
}

cudaError_t LaunchSoftmaxCrossEntropyForward(const float* logits, const int32_t* labels, int batch,
                                             int classes, float* probs, float* row_loss,
                                             float* loss, cudaStream_t stream) {
  SoftmaxCrossEntropyForwardKernel<<<BlocksFor(batch, kRowsPerBlock), kRowThreads, 0, stream>>>(
      logits, labels, batch, classes, probs, row_loss);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  OrderedSumKernel<<<1, kSumThreads, 0, stream>>>(row_loss, batch, static_cast<double>(batch),
                                                  loss);
  return cudaGetLastError();
}

cudaError_t LaunchSoftmaxCrossEntropyBackward(const float* probs, const int32_t* labels, int batch,
                                              int classes, float scale, float* dlogits,
                                              cudaStream_t stream) {
  SoftmaxCrossEntropyBackwardKernel<<<BlocksFor(static_cast<int64_t>(batch) * classes), kThreads, 0,
                                      stream>>>(probs, labels, batch, classes, scale, dlogits);
  return cudaGetLastError();
}

cudaError_t LaunchCountCorrect(const float* logits, const int32_t* labels, int batch, int classes,
                               float* row_flags, float* correct, cudaStream_t stream) {
  CountCorrectKernel<<<BlocksFor(batch, kRowsPerBlock), kRowThreads, 0, stream>>>(
      logits, labels, batch, classes, row_flags);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  OrderedSumKernel<<<1, kSumThreads, 0, stream>>>(row_flags, batch, 1.0, correct);
  return cudaGetLastError();
}

cudaError_t LaunchAxpy(float alpha, const float* x, float* y, int64_t n, cudaStream_t stream) {
  AxpyKernel<<<BlocksFor(n), kThreads, 0, stream>>>(alpha, x, y, n);
  return cudaGetLastError();
}

cudaError_t LaunchScale(float alpha, float* x, int64_t n, cudaStream_t stream) {
  ScaleKernel<<<BlocksFor(n), kThreads, 0, stream>>>(alpha, x, n);
  return cudaGetLastError();
}

int64_t ReduceSumScratchElements(int num_inputs, int64_t n) {
  return num_inputs > kReduceInputsPerLaunch ? n : 0;
}

cudaError_t LaunchReduceSum(const float* const* inputs, int num_inputs, float scale, float* out,
                            int64_t n, float* scratch, cudaStream_t stream) {
  const float* acc = nullptr;
  for (int first = 0; first < num_inputs; first += kReduceInputsPerLaunch) {
    const int count = std::min(kReduceInputsPerLaunch, num_inputs - first);
    const bool last = first + count == num_inputs;
    ReduceInputs in{};
    for (int j = 0; j < count; ++j) in.ptr[j] = inputs[first + j];
    // `out` is written only by the last launch, after every earlier launch
    // (stream order) has read its inputs, so `out` may be one of them.
    ReduceSumKernel<<<BlocksFor(n), kThreads, 0, stream>>>(in, count, acc, last ? scale : 1.0f,
                                                           last ? out : scratch, n);
    const cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
    acc = scratch;
  }
  return cudaSuccess;
}

}  // namespace distval::cuda
