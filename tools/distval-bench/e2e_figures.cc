// Figure 6: end to end. distval-worker trains the MLP on Fashion-MNIST with
// 1 ps + 1 worker (BSP) and, alternately, with --local (no parameter server,
// same global batch); both report examples/s in their --summary-json.
#include <unistd.h>

#include <chrono>
#include <fstream>
#include <nlohmann/json.hpp>

#include "figures.h"

namespace distval::bench {
namespace {

constexpr std::chrono::milliseconds kRunTimeout{600000};

// Runs distval-worker with `args` (plus the common flags) and returns the
// examples_per_second of its summary.
StatusOr<double> RunWorker(const BenchConfig& config, const std::string& tag, int batch,
                           const std::vector<std::string>& args) {
  const std::string summary = config.scratch->File(tag + ".summary.json");
  std::remove(summary.c_str());
  std::vector<std::string> argv = {config.worker_bin,
                                   "--model",
                                   "mlp",
                                   "--global-batch",
                                   std::to_string(batch),
                                   "--epochs",
                                   "1",
                                   "--train-limit",
                                   std::to_string(config.train_limit),
                                   "--summary-json",
                                   summary};
  argv.insert(argv.end(), args.begin(), args.end());
  argv.insert(argv.end(), config.worker_args.begin(), config.worker_args.end());
  DV_ASSIGN_OR_RETURN(ChildProcess worker,
                      ChildProcess::Spawn(argv, config.scratch->File(tag + ".log")));
  DV_ASSIGN_OR_RETURN(int status, worker.Wait(kRunTimeout));
  if (status != 0)
    return InternalError("distval-worker (" + tag + ") exited with status " +
                         std::to_string(status) + "; log: " + worker.LogTail());
  std::ifstream f(summary);
  if (!f) return InternalError("distval-worker (" + tag + ") wrote no summary " + summary);
  nlohmann::json j = nlohmann::json::parse(f, nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded() || !j.contains("examples_per_second") ||
      !j["examples_per_second"].is_number())
    return InternalError("summary " + summary + " has no numeric examples_per_second");
  return j["examples_per_second"].get<double>();
}

}  // namespace

Status RunEndToEndFigures(const BenchConfig& config, const std::vector<int>& batches,
                          Report* report) {
  const bool built = access(config.worker_bin.c_str(), X_OK) == 0;
  for (int batch : batches) {
    std::optional<Floor> floor;
    if (batch == 256) floor = Floor{Floor::Kind::kAtLeast, 0.85};
    Row row{.name = "e2e_batch" + std::to_string(batch),
            .figure = "end to end MLP, global batch " + std::to_string(batch) + ", 1 ps + 1 worker",
            .unit = "examples/s",
            .limit_name = "--local",
            .floor = floor};
    if (!built) {
      row.skipped = "skipped (distval-worker not built)";
      report->Add(row);
      continue;
    }
    const std::vector<Measure> measures = {
        [&]() { return RunWorker(config, "e2e-local", batch, {"--local"}); },
        [&]() -> StatusOr<double> {
          DV_ASSIGN_OR_RETURN(PsCluster ps, StartPs(config, "e2e", 1, 1, "0"));
          return RunWorker(config, "e2e-ps", batch,
                           {"--ps", ps.endpoints[0], "--worker-index", "0", "--num-workers", "1"});
        },
    };
    DV_ASSIGN_OR_RETURN(std::vector<double> eps, AlternateMedians(measures, config.reps));
    row.value = eps[1];
    row.limit = eps[0];
    report->Add(row);
  }
  return OkStatus();
}

}  // namespace distval::bench
