// distval-bench: measures distval against the machine's limits, each figure
// alternated with its limit in the same run (issue 6). tools/bench is the
// entry point; see docs/performance.md for what each figure means.
//
//   distval-bench [--quick] [--json bench.json] [--only transfer,apply,...]
//
// Internal mode (started by the bench itself): --serve-raw PORT_FILE runs
// the raw ZeroMQ echo server the transport limit is measured against.
#include <unistd.h>

#include <CLI/CLI.hpp>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <ctime>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <set>
#include <sstream>
#include <thread>

#include "distval/logging.h"
#include "distval/malloc_tuning.h"
#include "figures.h"
#include "raw_zmq.h"

namespace {

using namespace distval;
using namespace distval::bench;

constexpr int64_t kKiB = 1024, kMiB = 1024 * 1024;

std::string SelfPath() {
  std::error_code ec;
  auto p = std::filesystem::read_symlink("/proc/self/exe", ec);
  return ec ? std::string() : p.string();
}

std::string CpuModel() {
  std::ifstream f("/proc/cpuinfo");
  std::string line;
  while (std::getline(f, line)) {
    if (line.rfind("model name", 0) == 0) {
      auto colon = line.find(':');
      if (colon != std::string::npos) return line.substr(colon + 2);
    }
  }
  return "unknown CPU";
}

std::string Now() {
  std::time_t t = std::time(nullptr);
  char buf[64];
  std::strftime(buf, sizeof(buf), "%Y-%m-%d %H:%M:%S %Z", std::localtime(&t));
  return buf;
}

const std::set<std::string> kGroups = {"transfer", "aggregate", "small",
                                       "apply",    "e2e",       "colocated"};

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{
      "distval-bench: distval's push, pull, apply and training throughput, each measured "
      "alternately with the machine's limit (raw ZeroMQ, STREAM triad, memcpy, --local "
      "training) in the same run; prints a table and writes a JSON list."};
  app.get_formatter()->column_width(34);
  BenchConfig config;
  std::string json_path = "bench.json", only, tmp_dir, serve_raw;
  bool serve_raw_work = false;
  double seconds = 0;
  int reps = 0;
  const std::string self = SelfPath();
  const std::string build_root =
      std::filesystem::path(self).parent_path().parent_path().parent_path();
  config.self_bin = self;
  config.ps_bin = build_root + "/ps/distval-ps";
  config.worker_bin = build_root + "/worker/distval-worker";
  app.add_flag("--quick", config.quick, "reduced set of sizes and shorter samples (< 1 minute)");
  app.add_option("--json", json_path, "write the rows to this JSON file")->capture_default_str();
  app.add_option("--only", only,
                 "comma-separated groups to run: transfer (1-3), aggregate (2 ps + 2 workers), "
                 "small (4), apply (5), e2e (6), colocated (7); default all");
  app.add_option("--reps", reps, "samples per figure, median reported (>= 5; default 7, 5 quick)");
  app.add_option("--seconds", seconds, "minimum length of one sample in seconds");
  app.add_option("--ps-bin", config.ps_bin, "distval-ps binary")->capture_default_str();
  app.add_option("--worker-bin", config.worker_bin, "distval-worker binary")->capture_default_str();
  app.add_option("--worker-arg", config.worker_args,
                 "extra argument for every distval-worker run (repeatable)");
  app.add_option("--ps-arg", config.ps_args,
                 "extra argument for every distval-ps the benchmark starts (repeatable; e.g. "
                 "--ps-arg=--nan-policy --ps-arg=allow to see what the NaN check costs)");
  app.add_option("--train-limit", config.train_limit,
                 "training examples per end-to-end run (default 60000, 12000 with --quick)");
  app.add_option("--tmp-dir", tmp_dir, "where logs and port files go (default $TMPDIR or /tmp)");
  app.add_flag("--verbose", config.verbose,
               "print every sample, and the CPU time and minor page faults per operation of client "
               "and server, on stderr");
  app.add_option("--serve-raw", serve_raw, "internal: run the raw ZeroMQ echo server")->group("");
  app.add_flag("--serve-raw-work", serve_raw_work,
               "internal: with --serve-raw, also do the work distval-ps does with a push")
      ->group("");
  CLI11_PARSE(app, argc, argv);

  if (!serve_raw.empty()) {
    // The same heap settings as distval-ps and every distval client (this
    // process's clients get them from Client::Connect), so the limit is not
    // weakened by page faults distval avoids.
    TuneMallocForLargeMessages();
    Status s = RunRawEchoServer("tcp://127.0.0.1:*", serve_raw, serve_raw_work);
    std::cerr << "distval-bench --serve-raw: " << s << "\n";
    return 1;
  }
  ConfigureLogging({LogLevel::kWarning, "bench", false});

  std::set<std::string> groups = kGroups;
  if (!only.empty()) {
    groups.clear();
    std::stringstream ss(only);
    std::string g;
    while (std::getline(ss, g, ',')) {
      if (!kGroups.count(g)) {
        std::cerr << "distval-bench: --only: unknown group '" << g << "'\n";
        return 2;
      }
      groups.insert(g);
    }
  }
  config.reps = reps > 0 ? reps : (config.quick ? 5 : 7);
  if (config.reps < 5) {
    std::cerr << "distval-bench: --reps must be >= 5 (medians of at least 5 samples)\n";
    return 2;
  }
  config.timing = config.quick ? SampleTiming{0.1, 3, 1} : SampleTiming{0.3, 5, 2};
  if (seconds > 0) config.timing.min_seconds = seconds;
  if (config.quick && !app.count("--train-limit")) config.train_limit = 12000;
  if (access(config.ps_bin.c_str(), X_OK) != 0) {
    std::cerr << "distval-bench: distval-ps not found at " << config.ps_bin
              << " (build it, or pass --ps-bin)\n";
    return 2;
  }
  if (tmp_dir.empty()) {
    const char* t = std::getenv("TMPDIR");
    tmp_dir = t && *t ? t : "/tmp";
  }
  auto scratch = ScratchDir::Create(tmp_dir, "distval-bench");
  if (!scratch.ok()) {
    std::cerr << "distval-bench: " << scratch.status() << "\n";
    return 1;
  }
  config.scratch = &*scratch;

  const std::vector<int64_t> transfer_sizes =
      config.quick ? std::vector<int64_t>{4 * kKiB, 1 * kMiB, 4 * kMiB, 16 * kMiB}
                   : std::vector<int64_t>{4 * kKiB, 64 * kKiB, 1 * kMiB, 4 * kMiB, 16 * kMiB};
  const std::vector<int64_t> aggregate_sizes =
      config.quick ? std::vector<int64_t>{16 * kMiB} : std::vector<int64_t>{1 * kMiB, 16 * kMiB};
  const std::vector<int64_t> apply_floats = {int64_t{1} << 20, int64_t{16} << 20};
  const std::vector<int> batches = {64, 256};
  const std::vector<int64_t> colocated_sizes =
      config.quick ? std::vector<int64_t>{16 * kMiB} : std::vector<int64_t>{4 * kMiB, 16 * kMiB};

  std::cout << "distval-bench " << (config.quick ? "--quick " : "") << "on " << CpuModel() << ", "
            << std::thread::hardware_concurrency() << " CPUs, " << Now() << "\n"
            << "median of " << config.reps << " samples per figure, each alternated with its "
            << "limit\n"
            << std::flush;
  Report report;
  int errors = 0;
  auto run = [&](const std::string& group, const std::function<Status()>& fn) {
    if (!groups.count(group)) return;
    const auto start = std::chrono::steady_clock::now();
    Status s = fn();
    const double secs =
        std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    if (!s.ok()) {
      ++errors;
      std::cerr << "distval-bench: " << group << " failed: " << s << "\n";
      report.Add(Row{.name = group, .figure = group, .skipped = "failed: " + s.message()});
    }
    if (config.verbose) std::cerr << "[bench] " << group << ": " << secs << " s\n";
  };
  run("transfer", [&] { return RunTransferFigures(config, transfer_sizes, &report); });
  run("aggregate", [&] { return RunAggregateFigures(config, aggregate_sizes, &report); });
  run("small", [&] { return RunSmallRequestFigures(config, &report); });
  run("apply", [&] { return RunApplyFigures(config, apply_floats, &report); });
  run("e2e", [&] { return RunEndToEndFigures(config, batches, &report); });
  run("colocated", [&] { return RunColocatedFigures(config, colocated_sizes, &report); });

  std::cout << "\n" << report.Table();
  Status js = report.WriteJson(json_path);
  if (!js.ok()) {
    std::cerr << "distval-bench: " << js << "\n";
    return 1;
  }
  std::cout << "\n"
            << report.Failures() << " floor(s) failed; rows written to " << json_path << "\n";
  return errors > 0 ? 1 : 0;
}
