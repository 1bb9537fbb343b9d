#include "child_process.h"

#include <fcntl.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <sstream>
#include <thread>
#include <utility>

namespace distval::bench {
namespace {

int DecodeWaitStatus(int status) {
  if (WIFEXITED(status)) return WEXITSTATUS(status);
  if (WIFSIGNALED(status)) return 128 + WTERMSIG(status);
  return -1;
}

}  // namespace

StatusOr<ChildProcess> ChildProcess::Spawn(const std::vector<std::string>& argv,
                                           const std::string& log_path) {
  if (argv.empty()) return InvalidArgumentError("ChildProcess::Spawn: empty argv");
  // Build everything the child needs before fork (no allocation after it).
  std::vector<std::string> args = argv;
  std::vector<char*> raw;
  for (auto& a : args) raw.push_back(a.data());
  raw.push_back(nullptr);
  const int log_fd = open(log_path.c_str(), O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0644);
  if (log_fd < 0) return InternalError("cannot open log file " + log_path);
  const pid_t pid = fork();
  if (pid < 0) {
    close(log_fd);
    return InternalError("fork failed for " + argv[0]);
  }
  if (pid == 0) {
    dup2(log_fd, STDOUT_FILENO);
    dup2(log_fd, STDERR_FILENO);
    // The parent may block SIGINT/SIGTERM in its threads; the child starts clean.
    sigset_t none;
    sigemptyset(&none);
    sigprocmask(SIG_SETMASK, &none, nullptr);
    execv(raw[0], raw.data());
    _exit(127);
  }
  close(log_fd);
  ChildProcess child;
  child.pid_ = pid;
  child.log_path_ = log_path;
  return child;
}

ChildProcess::ChildProcess(ChildProcess&& other) noexcept
    : pid_(std::exchange(other.pid_, -1)),
      exit_status_(other.exit_status_),
      log_path_(std::move(other.log_path_)) {}

ChildProcess& ChildProcess::operator=(ChildProcess&& other) noexcept {
  if (this != &other) {
    Stop();
    pid_ = std::exchange(other.pid_, -1);
    exit_status_ = other.exit_status_;
    log_path_ = std::move(other.log_path_);
  }
  return *this;
}

ChildProcess::~ChildProcess() { Stop(); }

bool ChildProcess::Running() {
  if (pid_ <= 0) return false;
  int status = 0;
  const pid_t r = waitpid(pid_, &status, WNOHANG);
  if (r == pid_) {
    exit_status_ = DecodeWaitStatus(status);
    pid_ = -1;
    return false;
  }
  return r == 0;
}

StatusOr<int> ChildProcess::Wait(std::chrono::milliseconds timeout) {
  if (pid_ <= 0) {
    if (exit_status_ >= 0) return exit_status_;
    return FailedPreconditionError("no child process");
  }
  const auto deadline = std::chrono::steady_clock::now() + timeout;
  while (Running()) {
    if (std::chrono::steady_clock::now() >= deadline)
      return DeadlineExceededError("process " + std::to_string(pid_) + " still running after " +
                                   std::to_string(timeout.count()) + " ms");
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
  return exit_status_;
}

void ChildProcess::Stop() {
  if (pid_ <= 0) return;
  kill(pid_, SIGTERM);
  if (Wait(std::chrono::milliseconds(2000)).ok()) return;
  if (pid_ > 0) {
    kill(pid_, SIGKILL);
    int status = 0;
    waitpid(pid_, &status, 0);
    exit_status_ = DecodeWaitStatus(status);
    pid_ = -1;
  }
}

std::string ChildProcess::LogTail(size_t max_bytes) const {
  std::ifstream f(log_path_);
  std::stringstream ss;
  ss << f.rdbuf();
  std::string s = ss.str();
  if (s.size() > max_bytes) s = "..." + s.substr(s.size() - max_bytes);
  return s;
}

StatusOr<std::string> WaitForLine(const std::string& path, ChildProcess& child,
                                  std::chrono::milliseconds timeout) {
  const auto deadline = std::chrono::steady_clock::now() + timeout;
  for (;;) {
    {
      std::ifstream f(path);
      std::string line;
      // Only a line with its newline is complete (writers write a temporary
      // file and rename it, but be safe against a plain write).
      if (f && std::getline(f, line) && !f.eof() && !line.empty()) return line;
    }
    if (!child.Running()) {
      auto status = child.Wait(std::chrono::milliseconds(0));
      return InternalError("process exited (status " + std::to_string(status.ok() ? *status : -1) +
                           ") before writing " + path + "; log: " + child.LogTail());
    }
    if (std::chrono::steady_clock::now() > deadline)
      return DeadlineExceededError("no line in " + path + " after " +
                                   std::to_string(timeout.count()) +
                                   " ms; log: " + child.LogTail());
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
}

StatusOr<ScratchDir> ScratchDir::Create(const std::string& parent, const std::string& prefix) {
  std::string tmpl = parent + "/" + prefix + "-XXXXXX";
  if (mkdtemp(tmpl.data()) == nullptr) return InternalError("mkdtemp failed for " + tmpl);
  ScratchDir d;
  d.path_ = tmpl;
  return d;
}

ScratchDir::~ScratchDir() {
  if (path_.empty()) return;
  std::error_code ec;
  std::filesystem::remove_all(path_, ec);
}

}  // namespace distval::bench
