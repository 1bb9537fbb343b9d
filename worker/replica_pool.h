// ReplicaPool: one persistent thread per local replica (internal).
//
// Each thread sets flush-to-zero / denormals-are-zero when it starts and then
// waits for work. RunAll(fn) runs fn(r) on every thread r at once and returns
// when all are done; RunOn(r, fn) runs fn on thread r alone. A replica's
// Backend is only ever used from its thread during strategy work, so
// backends that care about the calling thread (CUDA) see one thread.
//
// Thread-safety: RunAll/RunOn may be called from any thread, one call at a
// time (the strategy serializes them); fn must not call back into the pool.
#ifndef DISTVAL_WORKER_REPLICA_POOL_H_
#define DISTVAL_WORKER_REPLICA_POOL_H_

#include <condition_variable>
#include <cstdint>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

namespace distval::internal {

class ReplicaPool {
 public:
  // Starts `num_replicas` (>= 1) threads.
  explicit ReplicaPool(int num_replicas);
  // Stops and joins the threads (waits for work in progress).
  ~ReplicaPool();
  ReplicaPool(const ReplicaPool&) = delete;
  ReplicaPool& operator=(const ReplicaPool&) = delete;

  int size() const { return static_cast<int>(threads_.size()); }
  // Runs fn(r) on thread r for every r, in parallel; returns when all
  // returned. fn is borrowed for the call.
  void RunAll(const std::function<void(int)>& fn);
  // Runs fn(r) on thread r only and waits for it.
  void RunOn(int replica, const std::function<void(int)>& fn);
  // The id of replica r's thread.
  std::thread::id thread_id(int replica) const { return ids_[static_cast<size_t>(replica)]; }
  // Index of the calling thread in this pool, or -1.
  int CurrentReplica() const;

 private:
  void Loop(int replica);
  void Dispatch(const std::function<void(int)>* fn, int only);

  std::vector<std::thread> threads_;
  std::vector<std::thread::id> ids_;  // Written before the constructor returns.

  std::mutex mu_;
  std::condition_variable work_cv_;
  std::condition_variable done_cv_;
  uint64_t generation_ = 0;                         // Guarded by mu_.
  const std::function<void(int)>* task_ = nullptr;  // Guarded by mu_.
  int only_ = -1;                                   // Guarded by mu_ (-1: all).
  int remaining_ = 0;                               // Guarded by mu_.
  int started_ = 0;                                 // Guarded by mu_.
  bool stop_ = false;                               // Guarded by mu_.
};

}  // namespace distval::internal

#endif  // DISTVAL_WORKER_REPLICA_POOL_H_
