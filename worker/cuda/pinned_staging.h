// PinnedStaging: page-locked host buffers through which one CudaBackend moves
// large host<->device copies.
//
// Why: the caller's host memory is ordinary pageable memory, which the DMA
// engines cannot read directly. This class owns two pinned chunks
// (cudaHostAlloc, kChunkBytes each) and pipelines a transfer through them:
// while the GPU copies chunk i out of one of them, the CPU fills (or drains)
// the other with memcpy. Host-to-device copies return as soon as the
// caller's memory has been read (the last chunk may still be in flight on the
// stream); device-to-host copies return once the data is in the caller's
// memory.
//
// Ownership: the chunks and their events belong to this object (created
// lazily by the first transfer, on the device current at that time, which
// must be the backend's; freed by the destructor after their pending copies
// are done). The stream is borrowed from the backend and must outlive this
// object.
//
// Reuse safety: before the CPU writes a chunk, it waits for the event
// recorded after the last copy that read that chunk; device-to-host copies
// into a chunk are queued on the same stream after everything issued
// earlier, so they never overtake a pending host-to-device read of it.
//
// Thread-safety: none; used by its backend's thread only.
#ifndef DISTVAL_WORKER_CUDA_PINNED_STAGING_H_
#define DISTVAL_WORKER_CUDA_PINNED_STAGING_H_

#include <cuda_runtime_api.h>

#include <cstddef>
#include <string>
#include <string_view>

#include "distval/status.h"

namespace distval::cuda {

class PinnedStaging {
 public:
  // Bytes per chunk.
  static constexpr size_t kChunkBytes = size_t{4} << 20;

  // device_name ("cuda:0") appears in the allocation warning; `stream` is
  // the owning backend's (borrowed).
  PinnedStaging(std::string device_name, cudaStream_t stream);
  ~PinnedStaging();
  PinnedStaging(const PinnedStaging&) = delete;
  PinnedStaging& operator=(const PinnedStaging&) = delete;

  // Allocates the chunks on first use. False when pinned memory could not be
  // allocated (then callers copy directly from pageable memory; the failure
  // is logged once and not retried).
  bool Available();

  // Copies `bytes` from host memory to the device address `dst`, queued on
  // the stream after earlier work. Returns once `host` may be reused.
  // `where` ("CopyToDevice on cuda:0") prefixes error messages.
  // Precondition: Available().
  Status ToDevice(const void* host, void* dst, size_t bytes, std::string_view where);
  // Copies `bytes` from the device address `src` into host memory, after
  // earlier work on the stream. Returns once `host` holds the data.
  // Precondition: Available().
  Status ToHost(const void* src, void* host, size_t bytes, std::string_view where);

 private:
  struct Chunk {
    void* host = nullptr;        // cudaHostAlloc'd, kChunkBytes
    cudaEvent_t done = nullptr;  // recorded after the last copy using `host`
  };

  void Release() noexcept;

  std::string device_name_;
  cudaStream_t stream_;  // Borrowed.
  bool tried_ = false;
  bool available_ = false;
  Chunk chunks_[2];
};

}  // namespace distval::cuda

#endif  // DISTVAL_WORKER_CUDA_PINNED_STAGING_H_
