// ReplicaGroup: the rendezvous behind ReplicaContext's collectives
// (AllReduce, MergeCall, ApplyGradients) within one Run (internal).
//
// A collective is two steps: every replica posts a pointer to its value and
// waits; once all have posted, replica 0's thread runs the merge function
// once over all posted pointers (in cross-replica context) and publishes its
// result; then every replica returns with that result. The posted values are
// only read while their owners wait, so they may live on the callers' stacks.
//
// Failure handling, so that a Run never deadlocks: when a replica's step
// function fails, or returns while others wait in a collective, or a replica
// enters a collective after another has already returned, the group is
// aborted: every waiting and later collective returns the first failure.
//
// Thread-safety: Collective and Leave are called from the replica threads
// concurrently; Reset between Runs.
#ifndef DISTVAL_WORKER_REPLICA_GROUP_H_
#define DISTVAL_WORKER_REPLICA_GROUP_H_

#include <condition_variable>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <span>
#include <vector>

#include "distval/replica_context.h"
#include "distval/status.h"

namespace distval::internal {

class ReplicaGroup {
 public:
  explicit ReplicaGroup(int num_replicas);

  // Prepares for a new Run: clears the abort state and the counters.
  // Precondition: no replica is inside the group.
  void Reset();

  // Replica `replica` joins the next collective with `mine`. `merge`
  // (MergeFunction, distval/replica_context.h) runs once over every
  // replica's posted pointer, in replica order, and only replica 0's is
  // called. set_merging(true) / set_merging(false) bracket the merge on
  // replica 0's thread (the strategy marks cross-replica context with them).
  // On OK, *result is the merge's result.
  Status Collective(int replica, const void* mine, const MergeFunction& merge,
                    const std::function<void(bool)>& set_merging,
                    std::shared_ptr<const void>* result);

  // Replica `replica` returned from its step function with `status`.
  void Leave(int replica, const Status& status);

  // The first failure of this Run (OK when none).
  Status first_failure() const;

 private:
  void AbortLocked(const Status& status);

  const int n_;
  mutable std::mutex mu_;
  std::condition_variable cv_;
  std::vector<const void*> posted_;                                               // Guarded by mu_.
  int arrived_ = 0;                                                               // Guarded by mu_.
  int left_ = 0;                                                                  // Guarded by mu_.
  int collectives_done_ = 0;                                                      // Guarded by mu_.
  uint64_t generation_ = 0;                                                       // Guarded by mu_.
  bool aborted_ = false;                                                          // Guarded by mu_.
  Status failure_;                                                                // Guarded by mu_.
  StatusOr<std::shared_ptr<const void>> result_ = std::shared_ptr<const void>();  // Guarded by mu_.
};

}  // namespace distval::internal

#endif  // DISTVAL_WORKER_REPLICA_GROUP_H_
