#include "distval/atomic_file.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <filesystem>

namespace distval {

namespace {

Status ErrnoError(const std::string& what, const std::string& path, int err) {
  const std::string message = what + " " + path + ": " + std::strerror(err);
  if (err == ENOENT || err == ENOTDIR) return NotFoundError(message);
  if (err == EACCES || err == EPERM || err == EROFS) return PermissionDeniedError(message);
  return DataLossError(message);
}

// Closes the descriptor and removes the temporary file unless released.
class TempFile {
 public:
  TempFile(int fd, std::string path) : fd_(fd), path_(std::move(path)) {}
  ~TempFile() {
    if (fd_ >= 0) ::close(fd_);
    if (!path_.empty()) ::unlink(path_.c_str());
  }
  TempFile(const TempFile&) = delete;
  TempFile& operator=(const TempFile&) = delete;
  int fd() const { return fd_; }
  // Closes the descriptor; errno on failure.
  int Close() {
    const int rc = ::close(fd_);
    fd_ = -1;
    return rc;
  }
  void Keep() { path_.clear(); }

 private:
  int fd_;
  std::string path_;
};

}  // namespace

Status WriteFileAtomically(const std::string& path, std::span<const std::string_view> parts) {
  std::string tmp = path + ".tmp.XXXXXX";
  const int fd = ::mkstemp(tmp.data());
  if (fd < 0) return ErrnoError("cannot create", tmp, errno);
  TempFile file(fd, tmp);
  // mkstemp creates 0600; a saved model is meant to be read by others.
  if (::fchmod(file.fd(), 0644) != 0) return ErrnoError("cannot chmod", tmp, errno);
  for (std::string_view part : parts) {
    const char* p = part.data();
    size_t left = part.size();
    while (left > 0) {
      const ssize_t n = ::write(file.fd(), p, left);
      if (n < 0) {
        if (errno == EINTR) continue;
        return ErrnoError("cannot write", tmp, errno);
      }
      p += n;
      left -= static_cast<size_t>(n);
    }
  }
  if (::fsync(file.fd()) != 0) return ErrnoError("cannot fsync", tmp, errno);
  if (file.Close() != 0) return ErrnoError("cannot close", tmp, errno);
  if (::rename(tmp.c_str(), path.c_str()) != 0) return ErrnoError("cannot rename to", path, errno);
  file.Keep();
  // Make the rename itself durable.
  std::filesystem::path parent = std::filesystem::path(path).parent_path();
  const std::string dir = parent.empty() ? std::string(".") : parent.string();
  const int dfd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (dfd < 0) return ErrnoError("cannot open directory", dir, errno);
  const int rc = ::fsync(dfd);
  const int err = errno;
  ::close(dfd);
  if (rc != 0) return ErrnoError("cannot fsync directory", dir, err);
  return OkStatus();
}

}  // namespace distval
