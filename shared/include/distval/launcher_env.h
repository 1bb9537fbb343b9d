// LauncherEnv: a process's rank in a job started by a cluster launcher
// (mpirun, srun), and the rank-to-role rule of distval's --from-env.
//
//   auto rank = RankFromEnvironment([](const char* name) -> std::optional<std::string> {
//     const char* v = std::getenv(name);     // main() reads the environment;
//     return v ? std::optional<std::string>(v) : std::nullopt;  // libraries never do
//   });
//   DV_ASSIGN_OR_RETURN(TaskAssignment task, AssignTask(*rank, /*num_ps=*/2));
//
// Sources, in this order (the first one whose rank variable is set wins):
//   Open MPI    OMPI_COMM_WORLD_RANK, OMPI_COMM_WORLD_SIZE
//   MPICH/Hydra PMI_RANK, PMI_SIZE (also Intel MPI)
//   Slurm       SLURM_PROCID, SLURM_NTASKS; hosts from SLURM_JOB_NODELIST
//               (or SLURM_STEP_NODELIST), expanded ("node[01-03]" ->
//               node01 node02 node03)
//
// Rank to role (--num-ps N): ranks 0..N-1 are parameter servers (shard =
// rank), ranks N..size-1 are workers (worker index = rank - N); the job has
// N shards and size - N workers.
//
// Thread-safety: pure functions.
#ifndef DISTVAL_LAUNCHER_ENV_H_
#define DISTVAL_LAUNCHER_ENV_H_

#include <functional>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "distval/cluster_spec.h"
#include "distval/status.h"

namespace distval {

// Looks up an environment variable (nullopt: unset). main() passes one that
// calls std::getenv; tests pass a map.
using EnvLookup = std::function<std::optional<std::string>(const char* name)>;

struct LauncherRank {
  int rank = 0;
  int size = 1;
  // "openmpi", "mpich" or "slurm".
  std::string source;
  // Hosts of the allocation in order (Slurm's node list), else empty.
  std::vector<std::string> hosts;
};

// Reads the rank and size as described in the file comment. NotFound naming
// every variable tried when no launcher variable is set; InvalidArgument
// naming the variable for a value that is not a number, a size < 1, a rank
// outside [0, size), or a malformed node list.
StatusOr<LauncherRank> RankFromEnvironment(const EnvLookup& env);

// Expands a Slurm host list: comma-separated hosts, each with any number of
// bracket groups of comma-separated numbers and ranges, e.g.
// "node[01-03,07],gpu5" -> node01 node02 node03 node07 gpu5 and
// "rack[1-2]-n[1,3]" -> rack1-n1 rack1-n3 rack2-n1 rack2-n3. A range keeps
// the zero padding of its first number. InvalidArgument (quoting the text)
// for an empty list or host, unbalanced brackets, a bad range (non-digits,
// end below start) or more than 100000 hosts.
StatusOr<std::vector<std::string>> ExpandSlurmNodelist(std::string_view nodelist);

// This process's task under the rank-to-role rule.
struct TaskAssignment {
  TaskType type = TaskType::kNone;  // kPs or kWorker
  int index = 0;                    // shard index or worker index
  int num_ps = 0;
  int num_workers = 0;
};

// InvalidArgument when num_ps < 1 or num_ps >= size (no rank would work;
// the message gives both numbers).
StatusOr<TaskAssignment> AssignTask(const LauncherRank& rank, int num_ps);

}  // namespace distval

#endif  // DISTVAL_LAUNCHER_ENV_H_
