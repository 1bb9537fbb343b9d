// Shared memory between co-located processes: POSIX shared-memory segments,
// and the registry of the segments a process created (so that the transport
// can send bytes that already live in one without copying them).
//
// Segments are named "/distval-<pid>-<counter>-<random>" and created with
// mode 0600: only processes of the same user can map them. A peer that maps
// a segment must trust its creator (same user): the creator could shrink the
// object under it. Names are unlinked when the creating process destroys the
// segment; RemoveStaleSharedSegments() cleans up after crashed processes.
//
// Thread-safety: SharedSegment is immutable after creation (its bytes are
// the users' business); SharedMemoryRegistry is thread-safe.
#ifndef DISTVAL_SHARED_MEMORY_H_
#define DISTVAL_SHARED_MEMORY_H_

#include <cstddef>
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <string_view>

#include "distval/status.h"

namespace distval::transport {

class SharedSegment {
 public:
  // Creates and maps (read-write) a new zero-filled segment of at least
  // `bytes` bytes (rounded up to whole pages; `bytes` > 0), its memory
  // reserved up front (so a full /dev/shm fails here, not later). Its data()
  // is page aligned. ResourceExhausted when /dev/shm or the address space is
  // full; InvalidArgument for 0 bytes; Internal for other failures.
  static StatusOr<std::shared_ptr<SharedSegment>> Create(size_t bytes);
  // Maps (read-write) the existing segment `name`, made by Create in another
  // process; its size is the object's size. InvalidArgument when `name` is
  // not a distval segment name; NotFound when no such object exists here
  // (e.g. the creator runs on another host); Internal for other failures.
  static StatusOr<std::shared_ptr<SharedSegment>> Open(const std::string& name);

  // Unmaps; a segment this process created is also unlinked.
  ~SharedSegment();
  SharedSegment(const SharedSegment&) = delete;
  SharedSegment& operator=(const SharedSegment&) = delete;

  std::byte* data() const { return data_; }
  size_t size() const { return size_; }
  const std::string& name() const { return name_; }
  // True when [p, p + n) lies inside the mapping.
  bool Contains(const void* p, size_t n) const {
    const auto a = reinterpret_cast<uintptr_t>(p), b = reinterpret_cast<uintptr_t>(data_);
    return a >= b && n <= size_ && a - b <= size_ - n;
  }
  // Removes the name now (mappings stay valid; later Opens fail).
  // Idempotent.
  void Unlink();

  // Whether `name` has the form Create gives names (checked before Open
  // touches the file system).
  static bool IsSegmentName(std::string_view name);

 private:
  SharedSegment() = default;
  std::byte* data_ = nullptr;
  size_t size_ = 0;
  std::string name_;
  bool owner_ = false;   // created here: unlink on destruction
  bool linked_ = false;  // Guarded by being touched only by Unlink/~ (creator's thread)
};

// Removes the /dev/shm objects of distval segments whose creating process no
// longer runs (left by a crash). Returns how many were removed. Call from a
// main() at start-up.
int RemoveStaleSharedSegments();

// The segments this process created whose bytes may be lent to a peer as
// they are (the transport sends a reference instead of the bytes). Holds weak
// references: a segment leaves the registry when it is destroyed.
class SharedMemoryRegistry {
 public:
  void Add(const std::shared_ptr<SharedSegment>& segment);
  // The live registered segment that contains [p, p + n), or null.
  std::shared_ptr<SharedSegment> Find(const void* p, size_t n) const;

 private:
  mutable std::mutex mu_;
  // Keyed by start address. Guarded by mu_.
  mutable std::map<uintptr_t, std::weak_ptr<SharedSegment>> by_address_;
};

}  // namespace distval::transport

#endif  // DISTVAL_SHARED_MEMORY_H_
