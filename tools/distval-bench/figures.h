// The figures of tools/bench (issue 6). Each Run* function measures one
// group of rows, alternating every distval figure with its limit in the same
// run, and adds the rows to the report.
#ifndef DISTVAL_TOOLS_BENCH_FIGURES_H_
#define DISTVAL_TOOLS_BENCH_FIGURES_H_

#include <cstdint>
#include <string>
#include <vector>

#include "child_process.h"
#include "distval/status.h"
#include "harness.h"

namespace distval::bench {

struct BenchConfig {
  bool quick = false;
  int reps = 7;                          // samples per figure (median of these)
  SampleTiming timing;                   // per sample
  std::string self_bin;                  // this binary (for the raw echo server)
  std::string ps_bin;                    // distval-ps
  std::string worker_bin;                // distval-worker (may not exist)
  std::vector<std::string> worker_args;  // extra arguments for every distval-worker run
  std::vector<std::string> ps_args;      // extra arguments for every distval-ps started
  int64_t train_limit = 60000;           // examples per end-to-end run
  const ScratchDir* scratch = nullptr;
  bool verbose = false;
};

// 1-3: transport limit, push and pull (1 ps + 1 worker) at every size.
Status RunTransferFigures(const BenchConfig& config, const std::vector<int64_t>& sizes,
                          Report* report);
// 2-3, aggregate: 2 ps + 2 workers against two raw pairs at once.
Status RunAggregateFigures(const BenchConfig& config, const std::vector<int64_t>& sizes,
                           Report* report);
// 4: 4 KiB push round trip, and requests/s with many in flight.
Status RunSmallRequestFigures(const BenchConfig& config, Report* report);
// 5: server-side optimizers in memory against a STREAM triad.
Status RunApplyFigures(const BenchConfig& config, const std::vector<int64_t>& num_floats,
                       Report* report);
// 6: distval-worker MLP, 1 ps + 1 worker (BSP) against --local.
Status RunEndToEndFigures(const BenchConfig& config, const std::vector<int>& batches,
                          Report* report);
// 7: co-located push and pull (shared memory) against memcpy.
Status RunColocatedFigures(const BenchConfig& config, const std::vector<int64_t>& sizes,
                           Report* report);

// ---- Helpers shared by the figures.

// Parameter servers started for one figure; stopped on destruction.
struct PsCluster {
  std::vector<ChildProcess> processes;
  std::vector<std::string> endpoints;
};
// Starts `num_shards` distval-ps on tcp://127.0.0.1 (OS-chosen ports).
// `tag` names the log and port files.
StatusOr<PsCluster> StartPs(const BenchConfig& config, const std::string& tag, int num_shards,
                            int num_workers, const std::string& staleness,
                            const std::vector<std::string>& extra_args = {});
// Starts `count` raw ZeroMQ echo servers (this binary, --serve-raw);
// `push_work`: servers that also apply each request as an SGD gradient
// (--serve-raw-work).
StatusOr<PsCluster> StartRawEcho(const BenchConfig& config, const std::string& tag, int count,
                                 bool push_work = false);

}  // namespace distval::bench

#endif  // DISTVAL_TOOLS_BENCH_FIGURES_H_
