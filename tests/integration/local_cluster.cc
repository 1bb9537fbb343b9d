#include "local_cluster.h"

#include <fcntl.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <thread>

namespace distval::testing {

std::string BinaryFromEnv(const char* name) {
  const char* v = std::getenv(name);
  return v ? std::string(v) : std::string();
}

StatusOr<pid_t> LocalCluster::Spawn(int i, const std::string& bind,
                                    const std::vector<std::string>& more_args) {
  const LocalClusterOptions& options = options_;
  std::vector<std::string> args = {bin_,
                                   "--bind",
                                   bind,
                                   "--port-file",
                                   dir_ + "/ps-" + std::to_string(i) + ".endpoint",
                                   "--shard-index",
                                   std::to_string(i),
                                   "--num-shards",
                                   std::to_string(options.num_shards),
                                   "--num-workers",
                                   std::to_string(options.num_workers),
                                   "--staleness",
                                   options.staleness,
                                   "--worker-timeout",
                                   std::to_string(options.worker_timeout_s)};
  args.insert(args.end(), options.extra_args.begin(), options.extra_args.end());
  if (static_cast<size_t>(i) < options.per_shard_args.size())
    args.insert(args.end(), options.per_shard_args[i].begin(), options.per_shard_args[i].end());
  args.insert(args.end(), more_args.begin(), more_args.end());
  std::string log = LogPath(i);
  pid_t pid = fork();
  if (pid < 0) return InternalError("fork failed");
  if (pid == 0) {
    // A restarted shard appends to its log.
    int fd = open(log.c_str(), O_WRONLY | O_CREAT | O_APPEND, 0644);
    if (fd >= 0) {
      dup2(fd, 1);
      dup2(fd, 2);
    }
    std::vector<char*> argv;
    for (auto& a : args) argv.push_back(a.data());
    argv.push_back(nullptr);
    execv(argv[0], argv.data());
    _exit(127);
  }
  return pid;
}

Status LocalCluster::WaitForEndpoint(int i, std::chrono::steady_clock::time_point deadline) {
  std::string path = dir_ + "/ps-" + std::to_string(i) + ".endpoint";
  for (;;) {
    std::ifstream f(path);
    std::string line;
    if (f && std::getline(f, line) && !line.empty()) {
      endpoints_[i] = line;
      return OkStatus();
    }
    int status;
    if (waitpid(pids_[i], &status, WNOHANG) == pids_[i]) {
      pids_[i] = -1;
      std::ifstream l(LogPath(i));
      std::stringstream ss;
      ss << l.rdbuf();
      return InternalError("distval-ps " + std::to_string(i) + " exited at start: " + ss.str());
    }
    if (std::chrono::steady_clock::now() > deadline)
      return DeadlineExceededError("distval-ps " + std::to_string(i) +
                                   " did not report its endpoint");
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
}

StatusOr<LocalCluster> LocalCluster::Start(const LocalClusterOptions& options) {
  LocalCluster c;
  c.bin_ = BinaryFromEnv("DISTVAL_PS_BIN");
  if (c.bin_.empty()) return FailedPreconditionError("DISTVAL_PS_BIN is not set");
  c.options_ = options;
  char tmpl[] = "/tmp/distval-test-XXXXXX";
  if (!mkdtemp(tmpl)) return InternalError("mkdtemp failed");
  c.dir_ = tmpl;
  for (int i = 0; i < options.num_shards; ++i) {
    ::unlink(c.LogPath(i).c_str());
    DV_ASSIGN_OR_RETURN(pid_t pid, c.Spawn(i, "tcp://127.0.0.1:0", {}));
    c.pids_.push_back(pid);
  }
  c.endpoints_.assign(options.num_shards, "");
  auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(20);
  for (int i = 0; i < options.num_shards; ++i) DV_RETURN_IF_ERROR(c.WaitForEndpoint(i, deadline));
  return c;
}

Status LocalCluster::Restart(int shard, const std::vector<std::string>& more_args) {
  Kill(shard);
  const std::string endpoint = endpoints_[shard];
  ::unlink((dir_ + "/ps-" + std::to_string(shard) + ".endpoint").c_str());
  DV_ASSIGN_OR_RETURN(pids_[shard], Spawn(shard, endpoint, more_args));
  return WaitForEndpoint(shard, std::chrono::steady_clock::now() + std::chrono::seconds(20));
}

LocalCluster::LocalCluster(LocalCluster&& other) noexcept
    : options_(std::move(other.options_)),
      bin_(std::move(other.bin_)),
      dir_(std::move(other.dir_)),
      pids_(std::move(other.pids_)),
      endpoints_(std::move(other.endpoints_)) {
  other.pids_.clear();
  other.dir_.clear();
}

std::string LocalCluster::LogPath(int shard) const {
  return dir_ + "/ps-" + std::to_string(shard) + ".log";
}

void LocalCluster::Kill(int shard) {
  if (pids_[shard] > 0) {
    kill(pids_[shard], SIGKILL);
    waitpid(pids_[shard], nullptr, 0);
    pids_[shard] = -1;
  }
}

bool LocalCluster::WaitExit(double timeout_s) {
  auto deadline = std::chrono::steady_clock::now() +
                  std::chrono::milliseconds(static_cast<int64_t>(timeout_s * 1000));
  bool all_ok = true;
  for (auto& pid : pids_) {
    if (pid <= 0) continue;
    int status = 0;
    for (;;) {
      pid_t r = waitpid(pid, &status, WNOHANG);
      if (r == pid) {
        if (!WIFEXITED(status) || WEXITSTATUS(status) != 0) all_ok = false;
        pid = -1;
        break;
      }
      if (std::chrono::steady_clock::now() > deadline) return false;
      std::this_thread::sleep_for(std::chrono::milliseconds(10));
    }
  }
  return all_ok;
}

LocalCluster::~LocalCluster() {
  for (pid_t pid : pids_) {
    if (pid > 0) {
      kill(pid, SIGTERM);
    }
  }
  for (pid_t pid : pids_) {
    if (pid <= 0) continue;
    for (int i = 0; i < 200; ++i) {
      if (waitpid(pid, nullptr, WNOHANG) == pid) {
        pid = -1;
        break;
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(10));
    }
    if (pid > 0) {
      kill(pid, SIGKILL);
      waitpid(pid, nullptr, 0);
    }
  }
  if (!dir_.empty()) {
    std::error_code ec;
    std::filesystem::remove_all(dir_, ec);
  }
}

}  // namespace distval::testing
