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

StatusOr<LocalCluster> LocalCluster::Start(const LocalClusterOptions& options) {
  std::string bin = BinaryFromEnv("DISTVAL_PS_BIN");
  if (bin.empty()) return FailedPreconditionError("DISTVAL_PS_BIN is not set");
  LocalCluster c;
  char tmpl[] = "/tmp/distval-test-XXXXXX";
  if (!mkdtemp(tmpl)) return InternalError("mkdtemp failed");
  c.dir_ = tmpl;
  for (int i = 0; i < options.num_shards; ++i) {
    std::vector<std::string> args = {bin,
                                     "--bind",
                                     "tcp://127.0.0.1:0",
                                     "--port-file",
                                     c.dir_ + "/ps-" + std::to_string(i) + ".endpoint",
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
    std::string log = c.LogPath(i);
    pid_t pid = fork();
    if (pid < 0) return InternalError("fork failed");
    if (pid == 0) {
      int fd = open(log.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
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
    c.pids_.push_back(pid);
  }
  c.endpoints_.assign(options.num_shards, "");
  auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(20);
  for (int i = 0; i < options.num_shards; ++i) {
    std::string path = c.dir_ + "/ps-" + std::to_string(i) + ".endpoint";
    while (c.endpoints_[i].empty()) {
      std::ifstream f(path);
      std::string line;
      if (f && std::getline(f, line) && !line.empty()) {
        c.endpoints_[i] = line;
        break;
      }
      int status;
      if (waitpid(c.pids_[i], &status, WNOHANG) == c.pids_[i]) {
        c.pids_[i] = -1;
        std::ifstream l(c.LogPath(i));
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
  return c;
}

LocalCluster::LocalCluster(LocalCluster&& other) noexcept
    : dir_(std::move(other.dir_)),
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
