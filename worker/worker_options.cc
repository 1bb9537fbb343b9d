#include "distval/worker_options.h"

#include <string>

namespace distval {

Status WorkerOptions::SetCluster(const ClusterSpec& cluster) {
  if (cluster.num_ps() < 1)
    return InvalidArgumentError("the cluster spec has no parameter servers (" + cluster.ToString() +
                                ")");
  if (cluster.is_ps())
    return InvalidArgumentError(
        "the cluster spec makes this task ps:" + std::to_string(cluster.task_index()) +
        ", not a worker (" + cluster.ToString() + ")");
  ps_endpoints = cluster.ps_endpoints();
  num_workers = cluster.num_workers();
  if (cluster.is_worker()) worker_index = cluster.task_index();
  return OkStatus();
}

}  // namespace distval
