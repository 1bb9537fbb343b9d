// LocalCluster: starts real distval-ps processes on 127.0.0.1 with
// OS-chosen ports for integration tests, and stops them on destruction.
//
// The binary comes from the DISTVAL_PS_BIN environment variable that meson
// sets for the integration tests.
#ifndef DISTVAL_TESTS_INTEGRATION_LOCAL_CLUSTER_H_
#define DISTVAL_TESTS_INTEGRATION_LOCAL_CLUSTER_H_

#include <sys/types.h>

#include <chrono>
#include <string>
#include <vector>

#include "distval/status.h"

namespace distval::testing {

struct LocalClusterOptions {
  int num_shards = 1;
  int num_workers = 1;
  std::string staleness = "0";  // "0", "N" or "async"
  double worker_timeout_s = 10;
  std::vector<std::string> extra_args;
  // Arguments for shard i only (per_shard_args[i], when present).
  std::vector<std::vector<std::string>> per_shard_args;
};

class LocalCluster {
 public:
  // Starts the servers and waits (up to 20 s) for their endpoints.
  static StatusOr<LocalCluster> Start(const LocalClusterOptions& options);
  LocalCluster(LocalCluster&& other) noexcept;
  LocalCluster& operator=(LocalCluster&&) = delete;
  ~LocalCluster();

  const std::vector<std::string>& endpoints() const { return endpoints_; }
  // Sends SIGKILL to shard i (for failure tests).
  void Kill(int shard);
  // Kills shard i if it runs, then starts it again on the same endpoint
  // with the same arguments plus `more_args` (e.g. --restore latest); its
  // log goes on in the same file. Waits (up to 20 s) for it to serve.
  Status Restart(int shard, const std::vector<std::string>& more_args);
  // Waits for every server to exit (after a shutdown request); true when all
  // exited with status 0 within the timeout.
  bool WaitExit(double timeout_s);
  // Path of the combined stderr log of shard i.
  std::string LogPath(int shard) const;

 private:
  LocalCluster() = default;
  StatusOr<pid_t> Spawn(int shard, const std::string& bind,
                        const std::vector<std::string>& more_args);
  Status WaitForEndpoint(int shard, std::chrono::steady_clock::time_point deadline);
  LocalClusterOptions options_;
  std::string bin_;
  std::string dir_;
  std::vector<pid_t> pids_;
  std::vector<std::string> endpoints_;
};

// Path of a binary built by meson (from an environment variable set by the
// test definition), or empty.
std::string BinaryFromEnv(const char* name);

}  // namespace distval::testing

#endif  // DISTVAL_TESTS_INTEGRATION_LOCAL_CLUSTER_H_
