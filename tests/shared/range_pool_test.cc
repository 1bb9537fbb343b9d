#include "distval/range_pool.h"

#include <gtest/gtest.h>

#include <atomic>
#include <memory>
#include <set>
#include <thread>
#include <vector>

namespace distval {
namespace {

RangePool::Options Small(int threads) {
  RangePool::Options o;
  o.threads = threads;
  o.min_split = 100;
  o.min_chunk = 7;
  o.align = 3;
  return o;
}

// Runs one job over [0, n) and checks that every unit was covered exactly
// once; returns the set of threads that took part.
std::set<std::thread::id> RunOnce(RangePool& pool, int64_t n) {
  std::vector<std::atomic<int>> seen(static_cast<size_t>(n));
  std::mutex mu;
  std::set<std::thread::id> who;
  pool.Run(n, [&](int64_t b, int64_t e) {
    EXPECT_LE(0, b);
    EXPECT_LT(b, e);
    EXPECT_LE(e, n);
    for (int64_t i = b; i < e; ++i) seen[static_cast<size_t>(i)].fetch_add(1);
    // Long enough for the other threads to wake and take chunks too.
    std::this_thread::sleep_for(std::chrono::microseconds(200));
    std::lock_guard<std::mutex> lock(mu);
    who.insert(std::this_thread::get_id());
  });
  for (int64_t i = 0; i < n; ++i) EXPECT_EQ(seen[static_cast<size_t>(i)].load(), 1) << i;
  return who;
}

TEST(RangePoolTest, EveryUnitOnceWhateverTheThreadsAndSizes) {
  for (int threads : {1, 2, 4}) {
    RangePool pool(Small(threads));
    EXPECT_EQ(pool.threads(), threads);
    for (int64_t n :
         {int64_t{0}, int64_t{1}, int64_t{99}, int64_t{100}, int64_t{1001}, int64_t{4097}}) {
      const auto who = RunOnce(pool, n);
      if (n < 100) {
        // Too small to split: the caller alone.
        EXPECT_LE(who.size(), 1u) << n;
        if (n > 0) {
          EXPECT_EQ(*who.begin(), std::this_thread::get_id());
        }
      }
      EXPECT_LE(who.size(), static_cast<size_t>(threads)) << n;
    }
  }
}

TEST(RangePoolTest, LargeJobsUseThePoolThreads) {
  RangePool pool(Small(2));
  // The caller's first chunk waits (up to 10 s) for the helper to take a
  // chunk of its own; a pool that left the job to its caller would time out.
  std::atomic<bool> helped{false};
  const auto caller = std::this_thread::get_id();
  std::vector<std::atomic<int>> seen(4096);
  pool.Run(4096, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) seen[static_cast<size_t>(i)].fetch_add(1);
    if (std::this_thread::get_id() != caller) {
      helped.store(true);
      return;
    }
    const auto until = std::chrono::steady_clock::now() + std::chrono::seconds(10);
    while (!helped.load() && std::chrono::steady_clock::now() < until)
      std::this_thread::sleep_for(std::chrono::microseconds(100));
  });
  EXPECT_TRUE(helped.load());
  for (const auto& s : seen) EXPECT_EQ(s.load(), 1);
}

TEST(RangePoolTest, ARunWhileAnotherRunsDoesItsJobItself) {
  RangePool pool(Small(2));
  std::atomic<int64_t> sum_a{0}, sum_b{0};
  auto job = [&pool](std::atomic<int64_t>& sum) {
    for (int r = 0; r < 50; ++r)
      pool.Run(1000, [&](int64_t b, int64_t e) {
        for (int64_t i = b; i < e; ++i) sum.fetch_add(i, std::memory_order_relaxed);
      });
  };
  std::thread other([&] { job(sum_b); });
  job(sum_a);
  other.join();
  EXPECT_EQ(sum_a.load(), 50 * 999 * 1000 / 2);
  EXPECT_EQ(sum_b.load(), 50 * 999 * 1000 / 2);
}

TEST(RangePoolTest, ThreadInitRunsOnEveryPoolThread) {
  std::atomic<int> inits{0};
  {
    RangePool::Options o = Small(4);
    o.thread_init = [&inits] { inits.fetch_add(1); };
    RangePool pool(std::move(o));
    RunOnce(pool, 1000);
  }                            // joined
  EXPECT_EQ(inits.load(), 3);  // the pool's threads, not the caller
}

}  // namespace
}  // namespace distval
