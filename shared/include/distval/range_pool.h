#ifndef DISTVAL_RANGE_POOL_H_
#define DISTVAL_RANGE_POOL_H_

// A fixed pool of threads that splits one range job at a time over itself
// and its caller: the server's optimizer applies and NaN checks
// (`distval-ps --threads`), and a client's large copies out of shared memory.

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

namespace distval {

class RangePool {
 public:
  struct Options {
    // Threads that work on a job, the caller included (1: the caller alone,
    // no thread is started).
    int threads = 1;
    // Jobs of fewer units run on the caller alone: waking a thread costs
    // tens of microseconds in a virtual machine.
    int64_t min_split = int64_t{1} << 16;
    // Units per chunk: at least this many, and a multiple of `align` (e.g.
    // whole 64-byte lines); about 8 chunks per thread otherwise.
    int64_t min_chunk = int64_t{1} << 16;
    int64_t align = 16;
    // Runs first on every pool thread (e.g. SetFlushDenormalsToZero).
    std::function<void()> thread_init;
  };
  using Body = std::function<void(int64_t begin, int64_t end)>;

  explicit RangePool(Options options);
  ~RangePool();
  RangePool(const RangePool&) = delete;
  RangePool& operator=(const RangePool&) = delete;

  // Runs body over disjoint chunks covering [0, n), on the caller and every
  // pool thread, and returns when all are done. Chunks are handed out as
  // threads come (an atomic counter), so a thread that wakes late takes
  // fewer of them instead of making the others wait. Thread-safe: while one
  // job runs, a Run from another thread does its whole job itself.
  void Run(int64_t n, const Body& body);

  int threads() const { return parts_; }

 private:
  void Work(int64_t n, int64_t chunk, const Body& body);
  void Loop();

  Options options_;
  int parts_ = 1;
  std::vector<std::thread> threads_;
  std::mutex run_mu_;  // one job at a time
  std::mutex mu_;
  std::condition_variable cv_, done_cv_;
  bool stop_ = false;  // Guarded by mu_.
  // Written under mu_; read without it while spinning.
  std::atomic<uint64_t> generation_{0};
  const Body* body_ = nullptr;    // Guarded by mu_.
  int64_t n_ = 0;                 // Guarded by mu_.
  int64_t chunk_ = 0;             // Guarded by mu_.
  bool open_ = false;             // the job takes more threads; Guarded by mu_.
  std::atomic<int64_t> next_{0};  // start of the next chunk to take
  std::atomic<int> active_{0};    // pool threads inside the current job
};

}  // namespace distval

#endif  // DISTVAL_RANGE_POOL_H_
