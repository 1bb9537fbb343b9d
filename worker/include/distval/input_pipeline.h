// Input pipeline of a worker: which examples each worker and each local
// replica trains on, step by step (tf.distribute's InputContext,
// auto-sharding and per-replica batches).
//
// Vocabulary: the job has num_input_pipelines workers; worker
// input_pipeline_id has num_local_replicas replicas (the same on every
// worker); num_replicas_in_sync = num_input_pipelines * num_local_replicas.
// A step consumes one global batch across the job: each replica gets
// per_replica_batch = global_batch / num_replicas_in_sync examples.
//
// Data order is a pure function of (seed, epoch) and the shard policy:
//   kData: every worker shuffles the indices [0, n) with (seed, epoch), the
//          same permutation everywhere; worker i keeps positions i, i + N,
//          i + 2N, ... Shards are disjoint and cover the data, and the
//          examples that all workers use in step s are exactly the examples
//          a single process with the same seed uses in its step s at the
//          global batch size (BSP equivalence).
//   kFile: worker i takes the non-empty source files i, i + N, ... (file
//          order of Examples::file_sizes) and shuffles its examples with
//          (seed, epoch). InvalidArgument when there are fewer non-empty
//          files than workers.
//   kOff:  every worker sees every example, in the same (seed, epoch) order.
// Within a worker, step s gives local replica r the next per_replica_batch
// examples of the worker's order: positions [(s * L + r) * b, ... + b).
//
// Steps per epoch are the same on every worker. With drop_remainder (the
// default) every batch is full and the tail of the epoch is dropped;
// without it the last step may give some replicas a short or empty batch.
//
// Thread-safety: DistributedDataset and EpochPlan are immutable after
// creation and may be shared by all replica threads. A DeviceBatch is used by
// one thread (its replica's).
#ifndef DISTVAL_INPUT_PIPELINE_H_
#define DISTVAL_INPUT_PIPELINE_H_

#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "distval/backend.h"
#include "distval/dataset.h"
#include "distval/status.h"
#include "distval/tensor.h"

namespace distval {

// Where this worker's input pipeline sits in the job (tf.distribute's
// InputContext).
struct InputContext {
  int num_input_pipelines = 1;
  int input_pipeline_id = 0;
  int num_replicas_in_sync = 1;

  // InvalidArgument unless num_input_pipelines >= 1, 0 <= input_pipeline_id
  // < num_input_pipelines, and num_replicas_in_sync is a positive multiple of
  // num_input_pipelines.
  Status Validate() const;
  // Replicas of this worker: num_replicas_in_sync / num_input_pipelines.
  int num_local_replicas() const { return num_replicas_in_sync / num_input_pipelines; }
  // global_batch / num_replicas_in_sync. InvalidArgument giving both numbers
  // when global_batch < 1 or does not divide evenly.
  StatusOr<int> GetPerReplicaBatchSize(int global_batch) const;
};

enum class AutoShardPolicy { kOff, kFile, kData };

// "off", "file", "data".
std::string_view AutoShardPolicyName(AutoShardPolicy policy);
// Inverse of AutoShardPolicyName; InvalidArgument naming the text.
StatusOr<AutoShardPolicy> ParseAutoShardPolicy(std::string_view text);

struct InputOptions {
  // Examples per step across all workers and replicas.
  int global_batch_size = 64;
  AutoShardPolicy shard_policy = AutoShardPolicy::kData;
  // Shuffle each epoch with (seed, epoch); false keeps file order.
  bool shuffle = true;
  uint64_t seed = 0;
  // Use only the first `limit` examples (file order, before sharding);
  // negative: all (a --train-limit flag).
  int64_t limit = -1;
  bool drop_remainder = true;
};

// The index plan of one epoch for one worker.
class EpochPlan {
 public:
  int64_t epoch() const { return epoch_; }
  int64_t num_steps() const { return num_steps_; }
  int num_local_replicas() const { return num_local_replicas_; }
  int per_replica_batch() const { return per_replica_batch_; }
  // Example indices (into the Examples) of local replica `replica` in
  // `step`, 0 <= step < num_steps. Full-size unless !drop_remainder and this
  // is the last step (then possibly short or empty). Out-of-range arguments
  // give an empty span.
  std::span<const int64_t> ReplicaBatch(int64_t step, int replica) const;
  // Every index this worker uses in the epoch, in order.
  const std::vector<int64_t>& order() const { return order_; }

 private:
  friend class DistributedDataset;
  int64_t epoch_ = 0;
  int64_t num_steps_ = 0;
  int num_local_replicas_ = 1;
  int per_replica_batch_ = 1;
  std::vector<int64_t> order_;
};

// A worker's view of a dataset: its shard, split into per-replica batches.
class DistributedDataset {
 public:
  // Validates ctx and options against the examples. Errors (InvalidArgument,
  // with the numbers): a bad InputContext, a global batch that does not
  // divide evenly across replicas, fewer files than workers for kFile, or
  // not a single step per epoch (fewer examples than one global batch, with
  // drop_remainder).
  static StatusOr<DistributedDataset> Create(std::shared_ptr<const Examples> examples,
                                             const InputContext& ctx, const InputOptions& options);

  const Examples& examples() const { return *examples_; }
  const InputContext& context() const { return ctx_; }
  const InputOptions& options() const { return options_; }
  int per_replica_batch() const { return per_replica_batch_; }
  int num_local_replicas() const { return ctx_.num_local_replicas(); }
  // Examples in use after `limit`.
  int64_t num_examples() const { return num_examples_; }
  // The same on every worker of the job.
  int64_t steps_per_epoch() const { return steps_per_epoch_; }

  // The plan of `epoch` (>= 0): a pure function of the options, the context
  // and epoch. Cost: O(n) (one shuffle); make it once per epoch.
  EpochPlan PlanEpoch(int64_t epoch) const;

 private:
  DistributedDataset() = default;
  // Indices (before shuffling) of worker `worker`'s files under kFile.
  std::vector<int64_t> FileShard(int worker) const;

  std::shared_ptr<const Examples> examples_;
  InputContext ctx_;
  InputOptions options_;
  int per_replica_batch_ = 1;
  int64_t num_examples_ = 0;
  int64_t steps_per_epoch_ = 0;
  // Effective file sizes after limit (kFile).
  std::vector<int64_t> file_sizes_;
};

// Copies the examples at `indices` into contiguous row-major host memory:
// features [indices.size(), feature_size], labels [indices.size()].
// InvalidArgument naming the first index out of range. Thread-safe.
Status GatherExamples(const Examples& examples, std::span<const int64_t> indices, float* features,
                      int32_t* labels);

// One replica's batch on its device: features (kF32 [max_batch,
// feature_size]) and labels (kI32 [max_batch]), filled by Load through a host
// staging buffer.
class DeviceBatch {
 public:
  // Allocates on `backend` (borrowed; must outlive this object).
  static StatusOr<DeviceBatch> Create(Backend* backend, int max_batch, int64_t feature_size);

  // Gathers `indices` (at most max_batch; feature sizes must match) and
  // copies them to the device. size() becomes indices.size().
  Status Load(const Examples& examples, std::span<const int64_t> indices);

  const DeviceBuffer& features() const { return features_; }
  const DeviceBuffer& labels() const { return labels_; }
  int size() const { return size_; }
  int max_batch() const { return max_batch_; }

 private:
  DeviceBatch() = default;
  Backend* backend_ = nullptr;  // Borrowed.
  int max_batch_ = 0;
  int64_t feature_size_ = 0;
  int size_ = 0;
  Tensor host_features_;
  std::vector<int32_t> host_labels_;
  DeviceBuffer features_, labels_;
};

}  // namespace distval

#endif  // DISTVAL_INPUT_PIPELINE_H_
