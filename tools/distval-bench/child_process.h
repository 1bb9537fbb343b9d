// ChildProcess: a helper process started by distval-bench (a parameter
// server, a raw ZeroMQ echo server, a worker), with its output in a log file.
//
// Thread-safety: a ChildProcess is used by one thread at a time.
#ifndef DISTVAL_TOOLS_BENCH_CHILD_PROCESS_H_
#define DISTVAL_TOOLS_BENCH_CHILD_PROCESS_H_

#include <sys/types.h>

#include <chrono>
#include <string>
#include <vector>

#include "distval/status.h"

namespace distval::bench {

class ChildProcess {
 public:
  // Starts argv[0] (a path) with `argv`, stdout and stderr appended to
  // `log_path`. Internal when fork fails; a failed exec shows up as exit
  // status 127 (see Wait / WaitForLine).
  static StatusOr<ChildProcess> Spawn(const std::vector<std::string>& argv,
                                      const std::string& log_path);
  ChildProcess() = default;
  ChildProcess(ChildProcess&& other) noexcept;
  ChildProcess& operator=(ChildProcess&& other) noexcept;
  ChildProcess(const ChildProcess&) = delete;
  ChildProcess& operator=(const ChildProcess&) = delete;
  // Stop().
  ~ChildProcess();

  // Waits up to `timeout` for the process to exit and returns its exit
  // status (128 + signal when killed). DeadlineExceeded when it is still
  // running; FailedPrecondition when there is no process.
  StatusOr<int> Wait(std::chrono::milliseconds timeout);
  // SIGTERM, up to 2 s for it to exit, then SIGKILL. Idempotent.
  void Stop();
  // True while the process has not exited (reaps it when it has).
  bool Running();

  pid_t pid() const { return pid_; }
  const std::string& log_path() const { return log_path_; }
  // The last `max_bytes` of the log (for error messages).
  std::string LogTail(size_t max_bytes = 2000) const;

 private:
  pid_t pid_ = -1;
  int exit_status_ = -1;
  std::string log_path_;
};

// Waits until the file `path` holds a complete first line and returns it
// (e.g. the endpoint a server wrote to its --port-file). Fails with Internal
// (quoting the log) when `child` exits first, DeadlineExceeded after
// `timeout`.
StatusOr<std::string> WaitForLine(const std::string& path, ChildProcess& child,
                                  std::chrono::milliseconds timeout);

// A fresh directory for logs and port files, removed (with its contents) on
// destruction.
class ScratchDir {
 public:
  // Creates `parent`/`prefix`-XXXXXX. Internal when mkdtemp fails.
  static StatusOr<ScratchDir> Create(const std::string& parent, const std::string& prefix);
  ScratchDir() = default;
  ScratchDir(ScratchDir&& other) noexcept : path_(std::move(other.path_)) { other.path_.clear(); }
  ScratchDir& operator=(ScratchDir&&) = delete;
  ~ScratchDir();
  const std::string& path() const { return path_; }
  std::string File(const std::string& name) const { return path_ + "/" + name; }

 private:
  std::string path_;
};

}  // namespace distval::bench

#endif  // DISTVAL_TOOLS_BENCH_CHILD_PROCESS_H_
