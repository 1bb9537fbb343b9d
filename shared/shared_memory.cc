#include "distval/shared_memory.h"

#include <dirent.h>
#include <fcntl.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <cstring>
#include <random>

namespace distval::transport {
namespace {

constexpr std::string_view kPrefix = "/distval-";

size_t PageSize() {
  static const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
  return page;
}

std::string ErrnoText(int err) { return std::string(std::strerror(err)); }

Status MapError(int err, const std::string& what) {
  if (err == ENOSPC || err == ENOMEM || err == EMFILE || err == ENFILE)
    return ResourceExhaustedError(what + ": " + ErrnoText(err));
  if (err == ENOENT) return NotFoundError(what + ": " + ErrnoText(err));
  return InternalError(what + ": " + ErrnoText(err));
}

std::string NewName() {
  static std::atomic<uint64_t> counter{0};
  thread_local std::mt19937_64 rng(std::random_device{}());
  char buf[96];
  std::snprintf(buf, sizeof(buf), "/distval-%d-%llu-%016llx", static_cast<int>(getpid()),
                static_cast<unsigned long long>(counter.fetch_add(1)),
                static_cast<unsigned long long>(rng()));
  return buf;
}

}  // namespace

bool SharedSegment::IsSegmentName(std::string_view name) {
  if (name.size() <= kPrefix.size() || name.size() > 80 ||
      name.substr(0, kPrefix.size()) != kPrefix)
    return false;
  for (char c : name.substr(kPrefix.size()))
    if (!((c >= '0' && c <= '9') || (c >= 'a' && c <= 'f') || c == '-')) return false;
  return true;
}

StatusOr<std::shared_ptr<SharedSegment>> SharedSegment::Create(size_t bytes) {
  if (bytes == 0) return InvalidArgumentError("shared segment of 0 bytes");
  const size_t size = (bytes + PageSize() - 1) / PageSize() * PageSize();
  std::shared_ptr<SharedSegment> seg(new SharedSegment());
  seg->name_ = NewName();
  const int fd = shm_open(seg->name_.c_str(), O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
  if (fd < 0) return MapError(errno, "shm_open " + seg->name_);
  seg->owner_ = true;
  seg->linked_ = true;  // from here on the destructor unlinks it
  // Reserve the pages now: /dev/shm is a tmpfs that may be small (64 MiB in
  // a default container), and a sparse object would only fail later, with
  // SIGBUS on first touch. posix_fallocate fails cleanly (ENOSPC) instead.
  if (const int err = posix_fallocate(fd, 0, static_cast<off_t>(size)); err != 0) {
    close(fd);
    return MapError(err, "reserving " + std::to_string(size) + " bytes for " + seg->name_);
  }
  void* p = mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  const int err = errno;
  close(fd);
  if (p == MAP_FAILED) return MapError(err, "mmap " + seg->name_);
  seg->data_ = static_cast<std::byte*>(p);
  seg->size_ = size;
  return seg;
}

StatusOr<std::shared_ptr<SharedSegment>> SharedSegment::Open(const std::string& name) {
  if (!IsSegmentName(name))
    return InvalidArgumentError("'" + name + "' is not a distval shared-memory segment name");
  const int fd = shm_open(name.c_str(), O_RDWR | O_CLOEXEC, 0);
  if (fd < 0) return MapError(errno, "shm_open " + name);
  struct stat st;
  if (fstat(fd, &st) != 0 || st.st_size <= 0) {
    const int err = errno;
    close(fd);
    return InternalError("shared segment " + name + " has no size: " + ErrnoText(err));
  }
  void* p =
      mmap(nullptr, static_cast<size_t>(st.st_size), PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  const int err = errno;
  close(fd);
  if (p == MAP_FAILED) return MapError(err, "mmap " + name);
  std::shared_ptr<SharedSegment> seg(new SharedSegment());
  seg->name_ = name;
  seg->data_ = static_cast<std::byte*>(p);
  seg->size_ = static_cast<size_t>(st.st_size);
  return seg;
}

SharedSegment::~SharedSegment() {
  if (data_ != nullptr) munmap(data_, size_);
  Unlink();
}

void SharedSegment::Unlink() {
  if (owner_ && linked_) {
    shm_unlink(name_.c_str());
    linked_ = false;
  }
}

int RemoveStaleSharedSegments() {
  DIR* dir = opendir("/dev/shm");
  if (dir == nullptr) return 0;
  int removed = 0;
  while (dirent* e = readdir(dir)) {
    const std::string name = std::string("/") + e->d_name;
    if (!SharedSegment::IsSegmentName(name)) continue;
    const long pid = std::strtol(name.c_str() + kPrefix.size(), nullptr, 10);
    if (pid <= 0) continue;
    if (kill(static_cast<pid_t>(pid), 0) == 0 || errno != ESRCH) continue;
    if (shm_unlink(name.c_str()) == 0) ++removed;
  }
  closedir(dir);
  return removed;
}

void SharedMemoryRegistry::Add(const std::shared_ptr<SharedSegment>& segment) {
  std::lock_guard<std::mutex> lock(mu_);
  // Drop entries of destroyed segments (their addresses may be reused).
  for (auto it = by_address_.begin(); it != by_address_.end();)
    it = it->second.expired() ? by_address_.erase(it) : std::next(it);
  by_address_[reinterpret_cast<uintptr_t>(segment->data())] = segment;
}

std::shared_ptr<SharedSegment> SharedMemoryRegistry::Find(const void* p, size_t n) const {
  std::lock_guard<std::mutex> lock(mu_);
  if (by_address_.empty()) return nullptr;
  auto it = by_address_.upper_bound(reinterpret_cast<uintptr_t>(p));
  if (it == by_address_.begin()) return nullptr;
  --it;
  std::shared_ptr<SharedSegment> seg = it->second.lock();
  if (seg == nullptr || !seg->Contains(p, n)) return nullptr;
  return seg;
}

}  // namespace distval::transport
