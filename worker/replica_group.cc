#include "replica_group.h"

#include <string>

namespace distval::internal {

ReplicaGroup::ReplicaGroup(int num_replicas)
    : n_(num_replicas), posted_(static_cast<size_t>(num_replicas), nullptr) {}

void ReplicaGroup::Reset() {
  std::lock_guard<std::mutex> lock(mu_);
  arrived_ = 0;
  left_ = 0;
  collectives_done_ = 0;
  aborted_ = false;
  failure_ = OkStatus();
  result_ = std::shared_ptr<const void>();
}

void ReplicaGroup::AbortLocked(const Status& status) {
  if (!aborted_) {
    aborted_ = true;
    failure_ = status;
  }
  cv_.notify_all();
}

Status ReplicaGroup::first_failure() const {
  std::lock_guard<std::mutex> lock(mu_);
  return failure_;
}

Status ReplicaGroup::Collective(int replica, const void* mine, const MergeFunction& merge,
                                const std::function<void(bool)>& set_merging,
                                std::shared_ptr<const void>* result) {
  std::unique_lock<std::mutex> lock(mu_);
  if (aborted_) return failure_;
  if (left_ > 0) {
    AbortLocked(FailedPreconditionError(
        "replica " + std::to_string(replica) + " entered collective #" +
        std::to_string(collectives_done_ + 1) +
        " after another replica returned from its step function: AllReduce, MergeCall and "
        "ApplyGradients must be called by every replica, the same number of times"));
    return failure_;
  }
  posted_[static_cast<size_t>(replica)] = mine;
  ++arrived_;
  const uint64_t my_generation = generation_;
  if (arrived_ == n_) cv_.notify_all();
  if (replica == 0) {
    cv_.wait(lock, [&] { return aborted_ || arrived_ == n_; });
    if (aborted_) return failure_;
    std::vector<const void*> values(posted_);
    lock.unlock();
    set_merging(true);
    StatusOr<std::shared_ptr<const void>> r = merge(values);
    set_merging(false);
    lock.lock();
    result_ = std::move(r);
    arrived_ = 0;
    ++collectives_done_;
    ++generation_;
    cv_.notify_all();
    if (aborted_) return failure_;
  } else {
    cv_.wait(lock, [&] { return aborted_ || generation_ != my_generation; });
    if (generation_ == my_generation) return failure_;  // aborted while waiting
  }
  if (!result_.ok()) return result_.status();
  *result = *result_;
  return OkStatus();
}

void ReplicaGroup::Leave(int replica, const Status& status) {
  std::lock_guard<std::mutex> lock(mu_);
  ++left_;
  if (!status.ok()) {
    AbortLocked(status);
  } else if (arrived_ > 0) {
    AbortLocked(FailedPreconditionError(
        "replica " + std::to_string(replica) +
        " returned from its step function while other replicas wait in collective #" +
        std::to_string(collectives_done_ + 1) +
        ": AllReduce, MergeCall and ApplyGradients must be called by every replica, the same "
        "number of times"));
  }
}

}  // namespace distval::internal
