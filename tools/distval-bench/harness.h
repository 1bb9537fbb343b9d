// Measurement and reporting for distval-bench: timed repetitions, the
// alternation of a distval figure with its limit, medians, the table and the
// JSON file.
//
// Thread-safety: Report is used by one thread. The timing helpers are
// reentrant.
#ifndef DISTVAL_TOOLS_BENCH_HARNESS_H_
#define DISTVAL_TOOLS_BENCH_HARNESS_H_

#include <cstdint>
#include <functional>
#include <optional>
#include <string>
#include <vector>

#include "distval/status.h"

namespace distval::bench {

// How long one sample runs: at least `min_seconds` and `min_iterations`
// timed iterations, after `warmup_iterations` untimed ones.
struct SampleTiming {
  double min_seconds = 0.25;
  int min_iterations = 5;
  int warmup_iterations = 2;
};

// Runs `op` per `timing` and returns the mean seconds per timed iteration.
// The first error of `op` is returned as is.
StatusOr<double> SecondsPerIteration(const std::function<Status()>& op, const SampleTiming& timing);

// One measured quantity: returns one sample (a rate or a time).
using Measure = std::function<StatusOr<double>()>;

// Takes `reps` samples of every measure, interleaved: repetition r runs the
// measures starting at index r % n, so a slow phase of a noisy machine hits
// every measure alike. Returns the median of each measure's samples (same
// order as `measures`). The first error is returned as is. When `samples`
// is not null it receives every sample (samples[i]: those of measure i).
StatusOr<std::vector<double>> AlternateMedians(const std::vector<Measure>& measures, int reps,
                                               std::vector<std::vector<double>>* samples = nullptr);

double Median(std::vector<double> values);

// A floor from the issue: the ratio distval / limit must be >= (kAtLeast) or
// <= (kAtMost) `ratio`.
struct Floor {
  enum class Kind { kAtLeast, kAtMost };
  Kind kind = Kind::kAtLeast;
  double ratio = 0;
  bool Passes(double measured_ratio) const {
    return kind == Kind::kAtLeast ? measured_ratio >= ratio : measured_ratio <= ratio;
  }
  std::string ToString() const;
};

// One line of the table and one object of the JSON list.
struct Row {
  std::string name;             // machine name, e.g. "push" (JSON "name")
  std::string figure;           // what the table shows, e.g. "push, 1 ps + 1 worker"
  int64_t size_bytes = 0;       // 0: not size-specific
  double value = 0;             // the distval figure
  std::string unit;             // "GB/s", "us", "req/s", "examples/s"
  std::optional<double> limit;  // the limit measured in the same run
  std::string limit_name;       // e.g. "raw ZeroMQ", "triad", "memcpy"
  std::optional<Floor> floor;
  std::string skipped;  // non-empty: the row was not measured, and why

  // distval / limit, when there is a limit.
  std::optional<double> ratio() const;
  // "PASS" / "FAIL" against the floor, "-" without a floor, "skipped".
  std::string Verdict() const;
};

class Report {
 public:
  void Add(Row row);
  const std::vector<Row>& rows() const { return rows_; }
  // The table: figure, size, distval, limit, ratio, floor, verdict.
  std::string Table() const;
  // Writes the rows as a JSON list of {"name", "size_bytes", "value", "unit",
  // "limit", "ratio"} objects (plus "figure", "limit_name", "floor",
  // "verdict"; limit and ratio are null where there is none). Internal when
  // the file cannot be written.
  Status WriteJson(const std::string& path) const;
  // Rows whose verdict is FAIL.
  int Failures() const;

 private:
  std::vector<Row> rows_;
};

// "4 KiB", "16 MiB", "1M floats" style labels.
std::string SizeLabel(int64_t bytes);
// Formats a value with 3 significant digits ("2.95", "43.1", "12300").
std::string FormatValue(double value);

}  // namespace distval::bench

#endif  // DISTVAL_TOOLS_BENCH_HARNESS_H_
