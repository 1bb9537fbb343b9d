#include "distval/input_pipeline.h"

#include <algorithm>
#include <cstring>
#include <numeric>
#include <string>

#include "random.h"

namespace distval {

namespace {

std::string Num(int64_t v) { return std::to_string(v); }

int64_t CeilDiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Stream id that separates data shuffles from other uses of the seed.
constexpr uint64_t kShuffleStream = 0x73687566666c6531ULL;  // "shuffle1"

void ShuffleForEpoch(std::vector<int64_t>& indices, uint64_t seed, int64_t epoch) {
  internal::SplitMix64 rng(internal::DeriveSeed(internal::DeriveSeed(seed, kShuffleStream),
                                                static_cast<uint64_t>(epoch)));
  internal::Shuffle(std::span<int64_t>(indices), rng);
}

}  // namespace

// ---- InputContext -------------------------------------------------------

Status InputContext::Validate() const {
  if (num_input_pipelines < 1)
    return InvalidArgumentError("num_input_pipelines must be >= 1 (got " +
                                Num(num_input_pipelines) + ")");
  if (input_pipeline_id < 0 || input_pipeline_id >= num_input_pipelines)
    return InvalidArgumentError("input_pipeline_id " + Num(input_pipeline_id) + " is outside [0, " +
                                Num(num_input_pipelines) + ")");
  if (num_replicas_in_sync < 1 || num_replicas_in_sync % num_input_pipelines != 0)
    return InvalidArgumentError("num_replicas_in_sync (" + Num(num_replicas_in_sync) +
                                ") must be a positive multiple of num_input_pipelines (" +
                                Num(num_input_pipelines) +
                                "): every worker needs the same number of replicas");
  return OkStatus();
}

StatusOr<int> InputContext::GetPerReplicaBatchSize(int global_batch) const {
  if (num_replicas_in_sync < 1)
    return InvalidArgumentError("num_replicas_in_sync must be >= 1 (got " +
                                Num(num_replicas_in_sync) + ")");
  if (global_batch < 1 || global_batch % num_replicas_in_sync != 0)
    return InvalidArgumentError("global batch size " + Num(global_batch) +
                                " does not divide evenly across " + Num(num_replicas_in_sync) +
                                " replicas in sync (choose a multiple of " +
                                Num(num_replicas_in_sync) + ")");
  return global_batch / num_replicas_in_sync;
}

// ---- AutoShardPolicy ----------------------------------------------------

std::string_view AutoShardPolicyName(AutoShardPolicy policy) {
  switch (policy) {
    case AutoShardPolicy::kOff:
      return "off";
    case AutoShardPolicy::kFile:
      return "file";
    case AutoShardPolicy::kData:
      return "data";
  }
  return "unknown";
}

StatusOr<AutoShardPolicy> ParseAutoShardPolicy(std::string_view text) {
  for (AutoShardPolicy p :
       {AutoShardPolicy::kOff, AutoShardPolicy::kFile, AutoShardPolicy::kData}) {
    if (AutoShardPolicyName(p) == text) return p;
  }
  return InvalidArgumentError("unknown auto-shard policy \"" + std::string(text) +
                              "\" (expected off, file or data)");
}

// ---- EpochPlan ----------------------------------------------------------

std::span<const int64_t> EpochPlan::ReplicaBatch(int64_t step, int replica) const {
  if (step < 0 || step >= num_steps_ || replica < 0 || replica >= num_local_replicas_) return {};
  const int64_t size = static_cast<int64_t>(order_.size());
  const int64_t start = (step * num_local_replicas_ + replica) * per_replica_batch_;
  if (start >= size) return {};
  const int64_t end = std::min(start + per_replica_batch_, size);
  return std::span<const int64_t>(order_.data() + start, static_cast<size_t>(end - start));
}

// ---- DistributedDataset -------------------------------------------------

StatusOr<DistributedDataset> DistributedDataset::Create(std::shared_ptr<const Examples> examples,
                                                        const InputContext& ctx,
                                                        const InputOptions& options) {
  if (examples == nullptr) return InvalidArgumentError("DistributedDataset: no examples");
  DV_RETURN_IF_ERROR(ctx.Validate());
  DistributedDataset ds;
  DV_ASSIGN_OR_RETURN(ds.per_replica_batch_, ctx.GetPerReplicaBatchSize(options.global_batch_size));
  ds.examples_ = std::move(examples);
  ds.ctx_ = ctx;
  ds.options_ = options;
  const int64_t n_all = ds.examples_->size();
  ds.num_examples_ = options.limit >= 0 ? std::min(options.limit, n_all) : n_all;

  // File sizes after the limit (a single implicit file when none recorded).
  std::vector<int64_t> sizes = ds.examples_->file_sizes;
  if (sizes.empty()) sizes.push_back(n_all);
  int64_t left = ds.num_examples_;
  for (int64_t& s : sizes) {
    s = std::min(s, left);
    left -= s;
  }
  ds.file_sizes_ = sizes;

  const int workers = ctx.num_input_pipelines;
  const int64_t per_worker_step = int64_t{ctx.num_local_replicas()} * ds.per_replica_batch_;
  const bool drop = options.drop_remainder;
  switch (options.shard_policy) {
    case AutoShardPolicy::kData: {
      const int64_t global = per_worker_step * workers;
      ds.steps_per_epoch_ = drop ? ds.num_examples_ / global : CeilDiv(ds.num_examples_, global);
      break;
    }
    case AutoShardPolicy::kOff:
      ds.steps_per_epoch_ =
          drop ? ds.num_examples_ / per_worker_step : CeilDiv(ds.num_examples_, per_worker_step);
      break;
    case AutoShardPolicy::kFile: {
      const int64_t files =
          std::count_if(sizes.begin(), sizes.end(), [](int64_t s) { return s > 0; });
      if (files < workers)
        return InvalidArgumentError(
            "auto-shard policy 'file' needs at least one non-empty file "
            "per worker: " +
            Num(files) + " file(s) for " + Num(workers) + " workers (use policy 'data')");
      int64_t steps = drop ? INT64_MAX : 0;
      for (int w = 0; w < workers; ++w) {
        const int64_t count = static_cast<int64_t>(ds.FileShard(w).size());
        steps = drop ? std::min(steps, count / per_worker_step)
                     : std::max(steps, CeilDiv(count, per_worker_step));
      }
      ds.steps_per_epoch_ = steps;
      break;
    }
  }
  if (ds.steps_per_epoch_ < 1)
    return InvalidArgumentError(
        "no complete step per epoch: " + Num(ds.num_examples_) + " examples" +
        (options.limit >= 0 ? " (after limit " + Num(options.limit) + ")" : "") +
        " under auto-shard policy '" + std::string(AutoShardPolicyName(options.shard_policy)) +
        "' give no full batch of " + Num(per_worker_step) + " per worker (global batch " +
        Num(options.global_batch_size) + ", " + Num(workers) + " worker(s))");
  return ds;
}

std::vector<int64_t> DistributedDataset::FileShard(int worker) const {
  std::vector<int64_t> indices;
  int64_t offset = 0;
  int nonempty = 0;
  for (int64_t size : file_sizes_) {
    if (size > 0) {
      if (nonempty % ctx_.num_input_pipelines == worker) {
        for (int64_t i = 0; i < size; ++i) indices.push_back(offset + i);
      }
      ++nonempty;
    }
    offset += size;
  }
  return indices;
}

EpochPlan DistributedDataset::PlanEpoch(int64_t epoch) const {
  EpochPlan plan;
  plan.epoch_ = epoch;
  plan.num_steps_ = steps_per_epoch_;
  plan.num_local_replicas_ = ctx_.num_local_replicas();
  plan.per_replica_batch_ = per_replica_batch_;
  std::vector<int64_t>& order = plan.order_;
  switch (options_.shard_policy) {
    case AutoShardPolicy::kData: {
      std::vector<int64_t> perm(static_cast<size_t>(num_examples_));
      std::iota(perm.begin(), perm.end(), int64_t{0});
      if (options_.shuffle) ShuffleForEpoch(perm, options_.seed, epoch);
      for (size_t p = static_cast<size_t>(ctx_.input_pipeline_id); p < perm.size();
           p += static_cast<size_t>(ctx_.num_input_pipelines))
        order.push_back(perm[p]);
      break;
    }
    case AutoShardPolicy::kFile:
      order = FileShard(ctx_.input_pipeline_id);
      if (options_.shuffle) ShuffleForEpoch(order, options_.seed, epoch);
      break;
    case AutoShardPolicy::kOff:
      order.resize(static_cast<size_t>(num_examples_));
      std::iota(order.begin(), order.end(), int64_t{0});
      if (options_.shuffle) ShuffleForEpoch(order, options_.seed, epoch);
      break;
  }
  const int64_t used = steps_per_epoch_ * plan.num_local_replicas_ * per_replica_batch_;
  if (static_cast<int64_t>(order.size()) > used) order.resize(static_cast<size_t>(used));
  return plan;
}

// ---- Gather -------------------------------------------------------------

Status GatherExamples(const Examples& examples, std::span<const int64_t> indices, float* features,
                      int32_t* labels) {
  const int64_t n = examples.size();
  const int64_t d = examples.feature_size();
  const float* src = examples.features.data_as<float>();
  for (size_t i = 0; i < indices.size(); ++i) {
    const int64_t idx = indices[i];
    if (idx < 0 || idx >= n)
      return InvalidArgumentError("GatherExamples: index " + Num(idx) + " (position " +
                                  Num(static_cast<int64_t>(i)) + ") is outside [0, " + Num(n) +
                                  ")");
    std::memcpy(features + static_cast<int64_t>(i) * d, src + idx * d,
                static_cast<size_t>(d) * sizeof(float));
    labels[i] = examples.labels[static_cast<size_t>(idx)];
  }
  return OkStatus();
}

// ---- DeviceBatch --------------------------------------------------------

StatusOr<DeviceBatch> DeviceBatch::Create(Backend* backend, int max_batch, int64_t feature_size) {
  if (backend == nullptr) return InvalidArgumentError("DeviceBatch: null backend");
  if (max_batch < 1 || feature_size < 1)
    return InvalidArgumentError("DeviceBatch: max_batch (" + Num(max_batch) +
                                ") and feature_size (" + Num(feature_size) + ") must be >= 1");
  DeviceBatch b;
  b.backend_ = backend;
  b.max_batch_ = max_batch;
  b.feature_size_ = feature_size;
  b.host_features_ = Tensor(DType::kF32, Shape{max_batch, feature_size});
  b.host_labels_.resize(static_cast<size_t>(max_batch));
  DV_ASSIGN_OR_RETURN(b.features_, backend->Allocate(int64_t{max_batch} * feature_size));
  DV_ASSIGN_OR_RETURN(b.labels_, backend->Allocate(max_batch, DType::kI32));
  return b;
}

Status DeviceBatch::Load(const Examples& examples, std::span<const int64_t> indices) {
  if (static_cast<int64_t>(indices.size()) > max_batch_)
    return InvalidArgumentError("DeviceBatch: " + Num(static_cast<int64_t>(indices.size())) +
                                " examples exceed max_batch " + Num(max_batch_));
  if (examples.feature_size() != feature_size_ && !indices.empty())
    return InvalidArgumentError("DeviceBatch: examples have " + Num(examples.feature_size()) +
                                " features, the batch was made for " + Num(feature_size_));
  DV_RETURN_IF_ERROR(
      GatherExamples(examples, indices, host_features_.data_as<float>(), host_labels_.data()));
  const int64_t n = static_cast<int64_t>(indices.size());
  DV_RETURN_IF_ERROR(
      backend_->CopyToDevice(host_features_.data_as<float>(), features_, n * feature_size_));
  DV_RETURN_IF_ERROR(backend_->CopyToDevice(host_labels_.data(), labels_, n));
  size_ = static_cast<int>(n);
  return OkStatus();
}

}  // namespace distval
