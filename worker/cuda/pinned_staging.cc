#include "pinned_staging.h"

#include <algorithm>
#include <cstring>
#include <utility>

#include "cuda_status.h"
#include "distval/logging.h"

namespace distval::cuda {

PinnedStaging::PinnedStaging(std::string device_name, cudaStream_t stream)
    : device_name_(std::move(device_name)), stream_(stream) {}

PinnedStaging::~PinnedStaging() { Release(); }

void PinnedStaging::Release() noexcept {
  for (Chunk& c : chunks_) {
    // Wait for the last copy that uses the chunk before freeing it. Errors
    // are ignored: there is nobody to report them to, and the memory is
    // released either way.
    if (c.done != nullptr) {
      (void)cudaEventSynchronize(c.done);
      (void)cudaEventDestroy(c.done);
      c.done = nullptr;
    }
    if (c.host != nullptr) {
      (void)cudaFreeHost(c.host);
      c.host = nullptr;
    }
  }
  (void)cudaGetLastError();  // leave no error behind for later launch checks
  available_ = false;
}

bool PinnedStaging::Available() {
  if (tried_) return available_;
  tried_ = true;
  Status s;
  for (Chunk& c : chunks_) {
    s = CudaStatus(cudaHostAlloc(&c.host, kChunkBytes, cudaHostAllocDefault),
                   "pinned staging on " + device_name_, "cudaHostAlloc");
    if (!s.ok()) break;
    s = CudaStatus(cudaEventCreateWithFlags(&c.done, cudaEventDisableTiming),
                   "pinned staging on " + device_name_, "cudaEventCreateWithFlags");
    if (!s.ok()) break;
  }
  if (!s.ok()) {
    Release();
    DV_LOG(kWarning) << s.message() << "; large copies use pageable memory instead";
    return false;
  }
  available_ = true;
  return true;
}

Status PinnedStaging::ToDevice(const void* host, void* dst, size_t bytes, std::string_view where) {
  const auto* from = static_cast<const std::byte*>(host);
  auto* to = static_cast<std::byte*>(dst);
  for (size_t done = 0, i = 0; done < bytes; done += kChunkBytes, ++i) {
    const size_t len = std::min(kChunkBytes, bytes - done);
    Chunk& c = chunks_[i % 2];
    // The previous copy out of this chunk must be finished before the CPU
    // overwrites it (an event never recorded counts as complete).
    DV_RETURN_IF_ERROR(CudaStatus(cudaEventSynchronize(c.done), where, "cudaEventSynchronize"));
    std::memcpy(c.host, from + done, len);
    DV_RETURN_IF_ERROR(
        CudaStatus(cudaMemcpyAsync(to + done, c.host, len, cudaMemcpyHostToDevice, stream_), where,
                   "cudaMemcpyAsync (host to device)"));
    DV_RETURN_IF_ERROR(CudaStatus(cudaEventRecord(c.done, stream_), where, "cudaEventRecord"));
  }
  return OkStatus();
}

Status PinnedStaging::ToHost(const void* src, void* host, size_t bytes, std::string_view where) {
  const auto* from = static_cast<const std::byte*>(src);
  auto* to = static_cast<std::byte*>(host);
  const size_t num_chunks = (bytes + kChunkBytes - 1) / kChunkBytes;
  auto issue = [&](size_t i) -> Status {
    const size_t offset = i * kChunkBytes;
    const size_t len = std::min(kChunkBytes, bytes - offset);
    Chunk& c = chunks_[i % 2];
    // Queued after any earlier host-to-device copy that reads this chunk.
    DV_RETURN_IF_ERROR(
        CudaStatus(cudaMemcpyAsync(c.host, from + offset, len, cudaMemcpyDeviceToHost, stream_),
                   where, "cudaMemcpyAsync (device to host)"));
    return CudaStatus(cudaEventRecord(c.done, stream_), where, "cudaEventRecord");
  };
  DV_RETURN_IF_ERROR(issue(0));
  if (num_chunks > 1) DV_RETURN_IF_ERROR(issue(1));
  for (size_t i = 0; i < num_chunks; ++i) {
    Chunk& c = chunks_[i % 2];
    // Also reports errors of earlier asynchronous work on the stream.
    DV_RETURN_IF_ERROR(CudaStatus(cudaEventSynchronize(c.done), where, "cudaEventSynchronize"));
    const size_t offset = i * kChunkBytes;
    std::memcpy(to + offset, c.host, std::min(kChunkBytes, bytes - offset));
    // The chunk is drained: refill it with chunk i + 2 while the CPU copies
    // chunk i + 1 out of the other one.
    if (i + 2 < num_chunks) DV_RETURN_IF_ERROR(issue(i + 2));
  }
  return OkStatus();
}

}  // namespace distval::cuda
