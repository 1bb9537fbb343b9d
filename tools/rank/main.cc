// distval-rank: runs distval-ps or a worker command according to this
// process's rank, so that one command line starts a whole job under a
// cluster launcher:
//
//   mpirun -np 6 distval-rank --num-ps 2 --rendezvous /shared/rdv/JOB -- distval-worker
//   srun distval-rank --num-ps 2 --rendezvous /shared/rdv/$SLURM_JOB_ID -- distval-worker
//
// Rank (distval/launcher_env.h): Open MPI, MPICH/Hydra or Slurm variables.
// Ranks 0..N-1 become `distval-ps --from-env --num-ps N --rendezvous DIR
// <--ps-arg ...>` (exec: the server is this process). The other ranks wait
// for every server's endpoint in DIR, then run the worker command with
// {index}, {num_workers}, {num_ps}, {ps_endpoints} and {rank} substituted in
// its arguments, `--ps E --worker-index I --num-workers M` appended (unless
// --no-worker-flags) and TF_CONFIG, DISTVAL_PS_ENDPOINTS,
// DISTVAL_WORKER_INDEX and DISTVAL_NUM_WORKERS set. When the command ends,
// the rank writes DIR/worker-<i>.done; worker 0's rank waits for every
// worker's file and then asks the servers to shut down (unless
// --keep-servers), so the launcher sees every rank exit. The exit status is
// the worker command's (128 + signal when a signal ended it).
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <CLI/CLI.hpp>
#include <cerrno>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <string>
#include <thread>
#include <vector>

#include "distval/client.h"
#include "distval/cluster_spec.h"
#include "distval/launcher_env.h"
#include "distval/logging.h"
#include "distval/rendezvous.h"

namespace {

using namespace distval;

constexpr int kUsageError = 2;

int Fail(int code, const std::string& message) {
  std::cerr << "distval-rank: " << message << "\n";
  return code;
}

std::vector<char*> Argv(std::vector<std::string>& args) {
  std::vector<char*> out;
  for (auto& a : args) out.push_back(a.data());
  out.push_back(nullptr);
  return out;
}

// distval-ps beside this binary (installed: bin/), in the build tree
// (build/tools/rank -> build/ps), else from PATH.
std::string DefaultPsBinary() {
  std::error_code ec;
  const auto self = std::filesystem::read_symlink("/proc/self/exe", ec);
  if (!ec) {
    const auto dir = self.parent_path();
    for (const auto& candidate : {dir / "distval-ps", dir / ".." / ".." / "ps" / "distval-ps"})
      if (std::filesystem::exists(candidate, ec)) return candidate.lexically_normal().string();
  }
  return "distval-ps";
}

std::string Replace(std::string text, const std::string& from, const std::string& to) {
  for (size_t pos = text.find(from); pos != std::string::npos;
       pos = text.find(from, pos + to.size()))
    text.replace(pos, from.size(), to);
  return text;
}

pid_t g_child = -1;
void ForwardSignal(int sig) {
  if (g_child > 0) ::kill(g_child, sig);
}

std::string DonePath(const std::string& dir, int worker) {
  return dir + "/worker-" + std::to_string(worker) + ".done";
}

}  // namespace

int main(int argc, char** argv) {
  // Everything after "--" is the worker command (CLI11 would parse it).
  std::vector<std::string> command;
  int own_argc = argc;
  for (int i = 1; i < argc; ++i) {
    if (std::string(argv[i]) == "--") {
      own_argc = i;
      for (int j = i + 1; j < argc; ++j) command.push_back(argv[j]);
      break;
    }
  }
  CLI::App app{
      "distval-rank: runs distval-ps on the first --num-ps ranks of an mpirun/srun job and the "
      "worker command (after `--`) on the others, meeting through a rendezvous directory."};
  app.get_formatter()->column_width(36);
  int num_ps = 0;
  std::string rendezvous_dir, ps_bin = DefaultPsBinary(), log_level = "info";
  std::vector<std::string> ps_args;
  double timeout_s = 300;
  bool no_worker_flags = false, keep_servers = false;
  app.add_option("--num-ps", num_ps, "number of parameter servers (the first ranks)")->required();
  app.add_option("--rendezvous", rendezvous_dir,
                 "directory every rank can read (shared file system, fresh per job)")
      ->required();
  app.add_option("--ps-bin", ps_bin, "the distval-ps binary")->capture_default_str();
  app.add_option("--ps-arg", ps_args,
                 "extra argument for every server (repeatable), e.g. --ps-arg=--staleness=2");
  app.add_option("--rendezvous-timeout", timeout_s,
                 "seconds a worker rank waits for every server's endpoint")
      ->capture_default_str();
  app.add_flag("--no-worker-flags", no_worker_flags,
               "don't append --ps/--worker-index/--num-workers to the worker command");
  app.add_flag("--keep-servers", keep_servers,
               "leave the servers running when every worker has finished");
  app.add_option("--log-level", log_level, "debug, info, warning or error")->capture_default_str();
  try {
    app.parse(own_argc, argv);
  } catch (const CLI::ParseError& e) {
    return app.exit(e);
  }
  auto level = ParseLogLevel(log_level);
  if (!level.ok()) return Fail(kUsageError, "--log-level: " + level.status().message());

  auto rank = RankFromEnvironment([](const char* name) -> std::optional<std::string> {
    const char* v = std::getenv(name);
    return v ? std::optional<std::string>(v) : std::nullopt;
  });
  if (!rank.ok()) return Fail(kUsageError, rank.status().message());
  auto task = AssignTask(*rank, num_ps);
  if (!task.ok()) return Fail(kUsageError, task.status().message());
  const std::string where =
      rank->source + " rank " + std::to_string(rank->rank) + "/" + std::to_string(rank->size);

  if (task->type == TaskType::kPs) {
    std::vector<std::string> args = {
        ps_bin, "--from-env", "--num-ps", std::to_string(num_ps), "--rendezvous", rendezvous_dir};
    args.insert(args.end(), ps_args.begin(), ps_args.end());
    std::cerr << "distval-rank: " << where << ": role=ps index=" << task->index << " exec";
    for (const auto& a : args) std::cerr << " " << a;
    std::cerr << std::endl;
    auto av = Argv(args);
    ::execvp(av[0], av.data());
    return Fail(127, "cannot run " + ps_bin + ": " + std::strerror(errno));
  }

  // ---- A worker rank.
  if (command.empty()) return Fail(kUsageError, "no worker command after `--`");
  const int index = task->index, num_workers = task->num_workers;
  ConfigureLogging({*level, "rank:" + std::to_string(rank->rank), false});
  auto endpoints = WaitForEndpoints(
      rendezvous_dir, num_ps, std::chrono::milliseconds(static_cast<int64_t>(timeout_s * 1000)),
      [&](const std::vector<int>& missing, std::chrono::seconds waited) {
        std::string who;
        for (int i : missing)
          who += (who.empty() ? "" : ", ") + std::string("ps ") + std::to_string(i) + " (" +
                 RendezvousPath(rendezvous_dir, i) + ")";
        DV_LOG(kInfo) << "worker " << index << " waiting for " << who << " for " << waited.count()
                      << " s";
      });
  if (!endpoints.ok()) return Fail(1, endpoints.status().message());
  auto spec = ClusterSpec::Make(*endpoints, num_workers);
  if (spec.ok()) spec = spec->WithTask(TaskType::kWorker, index);
  if (!spec.ok()) return Fail(1, spec.status().message());
  std::string ps_list;
  for (const auto& e : *endpoints) ps_list += (ps_list.empty() ? "" : ",") + e;

  std::vector<std::string> args;
  for (const auto& a : command) {
    std::string s = Replace(a, "{index}", std::to_string(index));
    s = Replace(s, "{num_workers}", std::to_string(num_workers));
    s = Replace(s, "{num_ps}", std::to_string(num_ps));
    s = Replace(s, "{ps_endpoints}", ps_list);
    s = Replace(s, "{rank}", std::to_string(rank->rank));
    args.push_back(s);
  }
  if (!no_worker_flags)
    args.insert(args.end(), {"--ps", ps_list, "--worker-index", std::to_string(index),
                             "--num-workers", std::to_string(num_workers)});
  std::cerr << "distval-rank: " << where << ": role=worker index=" << index
            << " num_workers=" << num_workers << " ps=" << ps_list << " run";
  for (const auto& a : args) std::cerr << " " << a;
  std::cerr << std::endl;

  const std::string tf_config = spec->ToTfConfigJson();
  g_child = ::fork();
  if (g_child < 0) return Fail(1, std::string("fork: ") + std::strerror(errno));
  if (g_child == 0) {
    ::setenv("TF_CONFIG", tf_config.c_str(), 1);
    ::setenv("DISTVAL_PS_ENDPOINTS", ps_list.c_str(), 1);
    ::setenv("DISTVAL_WORKER_INDEX", std::to_string(index).c_str(), 1);
    ::setenv("DISTVAL_NUM_WORKERS", std::to_string(num_workers).c_str(), 1);
    auto av = Argv(args);
    ::execvp(av[0], av.data());
    std::cerr << "distval-rank: cannot run " << args[0] << ": " << std::strerror(errno) << "\n";
    ::_exit(127);
  }
  ::signal(SIGTERM, ForwardSignal);
  ::signal(SIGINT, ForwardSignal);
  int status = 0;
  while (::waitpid(g_child, &status, 0) < 0 && errno == EINTR) {
  }
  const int code = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);

  // ---- Done: tell the others; worker 0 stops the servers once all are done.
  {
    std::ofstream f(DonePath(rendezvous_dir, index));
    f << code << "\n";
  }
  if (index == 0 && !keep_servers) {
    auto last_report = std::chrono::steady_clock::now();
    for (;;) {
      std::vector<int> running;
      for (int w = 0; w < num_workers; ++w)
        if (!std::filesystem::exists(DonePath(rendezvous_dir, w))) running.push_back(w);
      if (running.empty()) break;
      if (std::chrono::steady_clock::now() - last_report > std::chrono::seconds(30)) {
        std::string who;
        for (int w : running) who += " " + std::to_string(w);
        DV_LOG(kInfo) << "waiting for worker(s)" << who << " to finish before stopping the servers";
        last_report = std::chrono::steady_clock::now();
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(200));
    }
    ClientOptions co;
    co.ps_endpoints = *endpoints;
    co.role = protocol::Role::kControl;
    co.num_workers = num_workers;
    auto control = Client::Connect(co);
    Status s = control.ok() ? (*control)->ShutdownServers() : control.status();
    if (!s.ok()) {
      DV_LOG(kWarning) << "could not stop the servers: " << s;
    } else {
      std::cerr << "distval-rank: every worker finished; servers stopped" << std::endl;
    }
  }
  return code;
}
