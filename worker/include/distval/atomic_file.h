// Writing a file so that readers see either the old content or the whole new
// content, never a torn file: write a temporary file beside it, fsync it,
// rename it over the destination, fsync the directory.
//
// Thread-safety: thread-safe (concurrent writers of the same path each
// publish a whole file; the last rename wins).
#ifndef DISTVAL_ATOMIC_FILE_H_
#define DISTVAL_ATOMIC_FILE_H_

#include <span>
#include <string>
#include <string_view>

#include "distval/status.h"

namespace distval {

// Replaces `path` with the concatenation of `parts`. The temporary file is
// "<path>.tmp.XXXXXX" (mkstemp) in the same directory, removed on failure;
// the file ends up with mode 0644.
// Errors (naming the path and the system's reason): NotFound when the
// directory does not exist, PermissionDenied, DataLoss for a failed write,
// fsync or rename.
Status WriteFileAtomically(const std::string& path, std::span<const std::string_view> parts);
inline Status WriteFileAtomically(const std::string& path, std::string_view content) {
  return WriteFileAtomically(path, std::span<const std::string_view>(&content, 1));
}

}  // namespace distval

#endif  // DISTVAL_ATOMIC_FILE_H_
