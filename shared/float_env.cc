#include "distval/float_env.h"

#include <cstdint>

#if defined(__x86_64__) || defined(__i386__)
#include <xmmintrin.h>
#endif

namespace distval {

namespace {
#if defined(__x86_64__) || defined(__i386__)
constexpr unsigned kFtz = 1u << 15;  // MXCSR flush-to-zero
constexpr unsigned kDaz = 1u << 6;   // MXCSR denormals-are-zero
#endif
}  // namespace

bool SetFlushDenormalsToZero() {
#if defined(__x86_64__) || defined(__i386__)
  _mm_setcsr(_mm_getcsr() | kFtz | kDaz);
  return true;
#elif defined(__aarch64__)
  uint64_t fpcr;
  __asm__ __volatile__("mrs %0, fpcr" : "=r"(fpcr));
  fpcr |= (uint64_t{1} << 24);  // FZ
  __asm__ __volatile__("msr fpcr, %0" : : "r"(fpcr));
  return true;
#else
  return false;
#endif
}

bool FlushDenormalsToZeroEnabled() {
#if defined(__x86_64__) || defined(__i386__)
  return (_mm_getcsr() & kFtz) != 0;
#elif defined(__aarch64__)
  uint64_t fpcr;
  __asm__ __volatile__("mrs %0, fpcr" : "=r"(fpcr));
  return (fpcr & (uint64_t{1} << 24)) != 0;
#else
  return false;
#endif
}

}  // namespace distval
