#include "distval/malloc_tuning.h"

#include <mutex>

#if defined(__GLIBC__)
#include <malloc.h>
#endif

namespace distval {

bool TuneMallocForLargeMessages() {
  static std::once_flag once;
  static bool applied = false;
  std::call_once(once, [] {
#if defined(__GLIBC__)
    constexpr int kMmapThreshold = 32 << 20, kTrimThreshold = 64 << 20;
    applied = mallopt(M_MMAP_THRESHOLD, kMmapThreshold) == 1 &&
              mallopt(M_TRIM_THRESHOLD, kTrimThreshold) == 1;
#endif
  });
  return applied;
}

}  // namespace distval
