// ChildProcess: runs a program (a distval binary or an example) for
// integration tests, with its stdout and stderr in a log file.
#ifndef DISTVAL_TESTS_INTEGRATION_CHILD_PROCESS_H_
#define DISTVAL_TESTS_INTEGRATION_CHILD_PROCESS_H_

#include <sys/types.h>

#include <string>
#include <utility>
#include <vector>

#include "distval/status.h"

namespace distval::testing {

struct ProcessResult {
  // The exit status, or -signal when a signal ended the process.
  int exit_code = -1;
  bool timed_out = false;
  // Everything the process wrote to stdout and stderr.
  std::string output;
};

class ChildProcess {
 public:
  // Starts args[0] with args[1..] (no shell), stdout and stderr to
  // `log_path`, with `env` added to this process's environment.
  static StatusOr<ChildProcess> Start(
      const std::vector<std::string>& args, const std::string& log_path,
      const std::vector<std::pair<std::string, std::string>>& env = {});
  ChildProcess(ChildProcess&& other) noexcept;
  ChildProcess& operator=(ChildProcess&&) = delete;
  // Kills the process (SIGKILL) if it still runs.
  ~ChildProcess();

  // Waits for the exit, at most timeout_s (then kills it: timed_out).
  ProcessResult Wait(double timeout_s);

 private:
  ChildProcess() = default;
  pid_t pid_ = -1;
  std::string log_path_;
};

// Starts, waits and returns the result in one call.
ProcessResult RunProcess(const std::vector<std::string>& args, const std::string& log_path,
                         double timeout_s);

// The whole content of a file ("" when it cannot be read).
std::string ReadFile(const std::string& path);

// A fresh directory /tmp/<prefix>-XXXXXX for a test's files, removed with its
// contents on destruction. path() is empty when it could not be made.
class TempDir {
 public:
  explicit TempDir(const std::string& prefix);
  ~TempDir();
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;
  const std::string& path() const { return path_; }
  // path()/name.
  std::string Path(const std::string& name) const { return path_ + "/" + name; }

 private:
  std::string path_;
};

}  // namespace distval::testing

#endif  // DISTVAL_TESTS_INTEGRATION_CHILD_PROCESS_H_
