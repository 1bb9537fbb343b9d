#include "distval/range_pool.h"

#include <algorithm>

namespace distval {
namespace {

// How long a thread looks for what it waits for before it sleeps on a
// condition variable: a wake-up from a futex costs tens of microseconds in
// a virtual machine, and jobs often come back to back (a push's check and
// apply within microseconds). Spent at most once per job and thread.
constexpr std::chrono::microseconds kSpin{30};

template <typename Ready>
void SpinUntil(const Ready& ready) {
  const auto until = std::chrono::steady_clock::now() + kSpin;
  while (!ready() && std::chrono::steady_clock::now() < until) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#endif
  }
}

}  // namespace

RangePool::RangePool(Options options) : options_(std::move(options)) {
  parts_ = std::max(1, options_.threads);
  options_.align = std::max<int64_t>(1, options_.align);
  options_.min_chunk = std::max<int64_t>(1, options_.min_chunk);
  for (int i = 1; i < parts_; ++i) threads_.emplace_back([this] { Loop(); });
}

RangePool::~RangePool() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    stop_ = true;
  }
  cv_.notify_all();
  for (auto& t : threads_) t.join();
}

void RangePool::Run(int64_t n, const Body& body) {
  if (n <= 0) return;
  std::unique_lock<std::mutex> running(run_mu_, std::try_to_lock);
  if (threads_.empty() || n < options_.min_split || !running.owns_lock()) {
    body(0, n);
    return;
  }
  const int64_t a = options_.align;
  const int64_t chunk = std::max(options_.min_chunk, (n / (parts_ * 8) + a - 1) / a * a);
  {
    std::lock_guard<std::mutex> lock(mu_);
    body_ = &body;
    n_ = n;
    chunk_ = chunk;
    next_.store(0, std::memory_order_relaxed);
    open_ = true;
    generation_.fetch_add(1, std::memory_order_release);
  }
  cv_.notify_all();
  Work(n, chunk, body);
  {
    // No chunk left: threads that have not joined yet stay out (they would
    // only find nothing to do), those that did finish their last.
    std::lock_guard<std::mutex> lock(mu_);
    open_ = false;
  }
  SpinUntil([&] { return active_.load(std::memory_order_acquire) == 0; });
  std::unique_lock<std::mutex> lock(mu_);
  done_cv_.wait(lock, [&] { return active_.load(std::memory_order_acquire) == 0; });
  body_ = nullptr;
}

void RangePool::Work(int64_t n, int64_t chunk, const Body& body) {
  for (;;) {
    const int64_t b = next_.fetch_add(chunk, std::memory_order_relaxed);
    if (b >= n) return;
    body(b, std::min(n, b + chunk));
  }
}

void RangePool::Loop() {
  if (options_.thread_init) options_.thread_init();
  uint64_t seen = 0;
  for (;;) {
    const Body* body;
    int64_t n, chunk;
    SpinUntil([&] { return generation_.load(std::memory_order_acquire) != seen; });
    {
      std::unique_lock<std::mutex> lock(mu_);
      cv_.wait(lock, [&] { return stop_ || generation_.load(std::memory_order_relaxed) != seen; });
      if (stop_) return;
      seen = generation_.load(std::memory_order_relaxed);
      if (!open_) continue;  // came too late: all taken
      active_.fetch_add(1, std::memory_order_relaxed);
      body = body_;
      n = n_;
      chunk = chunk_;
    }
    Work(n, chunk, *body);
    if (active_.fetch_sub(1, std::memory_order_acq_rel) == 1) {
      // Under the lock: Run may be between its check and its sleep.
      std::lock_guard<std::mutex> lock(mu_);
      done_cv_.notify_all();
    }
  }
}

}  // namespace distval
