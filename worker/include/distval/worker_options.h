// WorkerOptions: everything a ParameterServerStrategy is built from (the
// cluster, the local devices, the consistency this worker expects and the
// batch), and CreateVariableOptions, the per-variable settings.
//
// main() fills WorkerOptions from flags, a cluster file or TF_CONFIG
// (SetCluster takes a parsed distval/cluster_spec.h ClusterSpec); libraries
// never read the environment.
//
// Thread-safety: plain values.
#ifndef DISTVAL_WORKER_OPTIONS_H_
#define DISTVAL_WORKER_OPTIONS_H_

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "distval/client.h"
#include "distval/cluster_spec.h"
#include "distval/devices.h"
#include "distval/distributed_values.h"
#include "distval/partitioner.h"
#include "distval/protocol.h"
#include "distval/status.h"

namespace distval {

class WorkerTelemetry;

struct WorkerOptions {
  // The parameter servers (ZeroMQ endpoints; shard i is ps_endpoints[i]),
  // this worker's index and the number of workers in the job. Ignored by a
  // strategy built on another ParameterStore, except worker_index and
  // num_workers (which still define the replicas in sync and the data shard).
  std::vector<std::string> ps_endpoints;
  int worker_index = 0;
  int num_workers = 1;

  // The local devices, one replica each, in replica order ("cpu:0",
  // "cuda:1"). Validated against `inventory`: an empty list, a device that
  // does not exist or a repeated device is InvalidArgument naming it and
  // listing what exists.
  std::vector<std::string> devices = {"cpu:0"};
  // What this machine has; unset: ProbeDevices() (CPU replicas up to the
  // hardware threads, the GPUs the CUDA runtime shows).
  std::optional<DeviceInventory> inventory;

  // Staleness this worker expects: 0 (BSP), N > 0 (SSP), or
  // protocol::kStalenessAsync. Every server compares it with its own setting
  // at hello and refuses a mismatch (FailedPrecondition giving both).
  // protocol::kStalenessDontCheck accepts whatever the servers run.
  int32_t staleness = protocol::kStalenessDontCheck;

  // The batch: give the global batch (examples per step across all
  // replicas of all workers) or the per-replica batch; the other follows.
  // A global batch that does not divide evenly across num_replicas_in_sync
  // is InvalidArgument giving the numbers; both given must agree. Neither:
  // the program batches on its own (per_replica_batch_size() is 0).
  int global_batch_size = 0;
  int per_replica_batch_size = 0;

  // The optimizer of variables that do not name one (applied on the
  // servers).
  protocol::OptimizerSpec optimizer;

  // How variables that do not name a partitioner are split over the servers
  // (tf's ParameterServerStrategy(variable_partitioner=...)): e.g.
  // Partitioner::MinSize(256 << 10, 2). Default: never split.
  Partitioner variable_partitioner = Partitioner::None();

  // Connection settings (timeouts, heartbeats). ps_endpoints, worker_index,
  // num_workers, role and expected_staleness are taken from the fields
  // above.
  ClientOptions client;

  // Metrics and timeline of the steps and requests
  // (distval/worker_telemetry.h); null: none. Borrowed: must outlive the
  // strategy. Also becomes client.observer when that is unset.
  WorkerTelemetry* telemetry = nullptr;

  // Copies the ps endpoints, the worker count and, when the spec has a
  // worker task, the worker index from `cluster`. InvalidArgument when the
  // spec's task is a ps, or when it has no ps.
  Status SetCluster(const ClusterSpec& cluster);
};

// Per-variable settings of ParameterServerStrategy::CreateVariable.
struct CreateVariableOptions {
  // How the variable is split over the servers; unset: the strategy's
  // WorkerOptions::variable_partitioner (by default, whole on one server).
  std::optional<Partitioner> partitioner;
  // The server-side optimizer; unset: WorkerOptions::optimizer.
  std::optional<protocol::OptimizerSpec> optimizer;
  // How replicas' gradients combine: kMean (default: the mean over the
  // local replicas, then the servers average the workers' pushes) or kSum
  // (summed locally and on the servers). kNone and kOnlyFirstReplica are
  // InvalidArgument for a trainable variable.
  VariableAggregation aggregation = VariableAggregation::kMean;
  // Per-variable staleness override (0, N or protocol::kStalenessAsync);
  // unset: the job's.
  std::optional<int32_t> staleness;
  // Non-trainable variables are pulled and mirrored but never pushed by
  // ApplyGradients().
  bool trainable = true;
};

}  // namespace distval

#endif  // DISTVAL_WORKER_OPTIONS_H_
