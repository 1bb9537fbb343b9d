#include "replica_pool.h"

#include "distval/float_env.h"

namespace distval::internal {

ReplicaPool::ReplicaPool(int num_replicas) {
  const int n = num_replicas < 1 ? 1 : num_replicas;
  ids_.resize(static_cast<size_t>(n));
  threads_.reserve(static_cast<size_t>(n));
  for (int r = 0; r < n; ++r) threads_.emplace_back([this, r] { Loop(r); });
  std::unique_lock<std::mutex> lock(mu_);
  done_cv_.wait(lock, [&] { return started_ == n; });
}

ReplicaPool::~ReplicaPool() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    stop_ = true;
  }
  work_cv_.notify_all();
  for (auto& t : threads_) t.join();
}

int ReplicaPool::CurrentReplica() const {
  const std::thread::id me = std::this_thread::get_id();
  for (size_t r = 0; r < ids_.size(); ++r) {
    if (ids_[r] == me) return static_cast<int>(r);
  }
  return -1;
}

void ReplicaPool::Loop(int replica) {
  SetFlushDenormalsToZero();
  uint64_t seen = 0;
  {
    std::lock_guard<std::mutex> lock(mu_);
    ids_[static_cast<size_t>(replica)] = std::this_thread::get_id();
    ++started_;
    seen = generation_;
  }
  done_cv_.notify_all();
  for (;;) {
    const std::function<void(int)>* task = nullptr;
    {
      std::unique_lock<std::mutex> lock(mu_);
      work_cv_.wait(lock, [&] { return stop_ || generation_ != seen; });
      if (stop_) return;
      seen = generation_;
      if (only_ >= 0 && only_ != replica) continue;
      task = task_;
    }
    (*task)(replica);
    bool last = false;
    {
      std::lock_guard<std::mutex> lock(mu_);
      last = --remaining_ == 0;
    }
    if (last) done_cv_.notify_all();
  }
}

void ReplicaPool::Dispatch(const std::function<void(int)>* fn, int only) {
  std::unique_lock<std::mutex> lock(mu_);
  task_ = fn;
  only_ = only;
  remaining_ = only >= 0 ? 1 : size();
  ++generation_;
  work_cv_.notify_all();
  done_cv_.wait(lock, [&] { return remaining_ == 0; });
  task_ = nullptr;
}

void ReplicaPool::RunAll(const std::function<void(int)>& fn) { Dispatch(&fn, -1); }

void ReplicaPool::RunOn(int replica, const std::function<void(int)>& fn) { Dispatch(&fn, replica); }

}  // namespace distval::internal
