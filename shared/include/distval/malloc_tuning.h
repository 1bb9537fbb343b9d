// Heap settings for processes that receive large ZeroMQ messages.
//
// libzmq allocates a fresh buffer (malloc) for every message it receives
// that does not fit its 8 KiB batch buffer, and the receiver frees it once
// read. With glibc's defaults that buffer is mapped anew, or carved from a
// heap top that free() has just trimmed, often enough that every page of it
// is faulted in (and zeroed by the kernel) again: measured in distval-bench,
// 130-300 minor faults per 4 MiB pull received in 1 MiB pieces, which made
// the pull 40-80 % slower than with the heap kept.
#ifndef DISTVAL_MALLOC_TUNING_H_
#define DISTVAL_MALLOC_TUNING_H_

namespace distval {

// Once per process (later calls do nothing and return the first result):
// with glibc, sets M_MMAP_THRESHOLD to 32 MiB and M_TRIM_THRESHOLD to 64 MiB
// (mallopt), the values glibc's own dynamic policy reaches once the process
// has freed a 32 MiB block, so buffers up to 32 MiB come from the heap and
// up to 64 MiB of freed heap stays mapped for reuse. Returns false (changing
// nothing) without glibc or when mallopt refuses. Thread-safe.
bool TuneMallocForLargeMessages();

}  // namespace distval

#endif  // DISTVAL_MALLOC_TUNING_H_
