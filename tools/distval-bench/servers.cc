// Starting the servers the figures measure against (figures.h).
#include <chrono>
#include <cstdio>

#include "figures.h"

namespace distval::bench {
namespace {

constexpr std::chrono::milliseconds kStartTimeout{20000};

}  // namespace

StatusOr<PsCluster> StartPs(const BenchConfig& config, const std::string& tag, int num_shards,
                            int num_workers, const std::string& staleness,
                            const std::vector<std::string>& extra_args) {
  PsCluster cluster;
  std::vector<std::string> port_files;
  for (int i = 0; i < num_shards; ++i) {
    const std::string name = tag + "-ps" + std::to_string(i);
    port_files.push_back(config.scratch->File(name + ".endpoint"));
    // A tag is reused across repetitions: never read the last server's file.
    std::remove(port_files.back().c_str());
    std::vector<std::string> argv = {config.ps_bin,
                                     "--bind",
                                     "tcp://127.0.0.1:0",
                                     "--port-file",
                                     port_files.back(),
                                     "--shard-index",
                                     std::to_string(i),
                                     "--num-shards",
                                     std::to_string(num_shards),
                                     "--num-workers",
                                     std::to_string(num_workers),
                                     "--staleness",
                                     staleness,
                                     "--log-level",
                                     "warning"};
    argv.insert(argv.end(), extra_args.begin(), extra_args.end());
    argv.insert(argv.end(), config.ps_args.begin(), config.ps_args.end());
    DV_ASSIGN_OR_RETURN(ChildProcess p,
                        ChildProcess::Spawn(argv, config.scratch->File(name + ".log")));
    cluster.processes.push_back(std::move(p));
  }
  for (int i = 0; i < num_shards; ++i) {
    DV_ASSIGN_OR_RETURN(std::string endpoint,
                        WaitForLine(port_files[i], cluster.processes[i], kStartTimeout));
    cluster.endpoints.push_back(endpoint);
  }
  return cluster;
}

StatusOr<PsCluster> StartRawEcho(const BenchConfig& config, const std::string& tag, int count,
                                 bool push_work) {
  PsCluster cluster;
  std::vector<std::string> port_files;
  for (int i = 0; i < count; ++i) {
    const std::string name = tag + "-raw" + std::to_string(i);
    port_files.push_back(config.scratch->File(name + ".endpoint"));
    std::remove(port_files.back().c_str());
    std::vector<std::string> argv = {config.self_bin, "--serve-raw", port_files.back()};
    if (push_work) argv.push_back("--serve-raw-work");
    DV_ASSIGN_OR_RETURN(ChildProcess p,
                        ChildProcess::Spawn(argv, config.scratch->File(name + ".log")));
    cluster.processes.push_back(std::move(p));
  }
  for (int i = 0; i < count; ++i) {
    DV_ASSIGN_OR_RETURN(std::string endpoint,
                        WaitForLine(port_files[i], cluster.processes[i], kStartTimeout));
    cluster.endpoints.push_back(endpoint);
  }
  return cluster;
}

}  // namespace distval::bench
