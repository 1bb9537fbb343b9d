// Metrics: counters, gauges and histograms on atomics, collected in a
// registry that renders the Prometheus text exposition format (0.0.4).
//
//   MetricRegistry registry;
//   DV_ASSIGN_OR_RETURN(Counter* pulls, registry.AddCounter(
//       "distval_ps_requests_total", "Requests received.", {{"type", "pull"}}));
//   pulls->Increment();
//   std::string text = registry.Render();   // what GET /metrics returns
//
// Updating a metric (Increment, Set, Observe) is lock-free: relaxed atomic
// operations only, so the data path can update metrics from any thread.
// Render() may run on another thread at the same time (e.g. the HTTP
// endpoint's thread); it reads the atomics and never blocks an update.
// Registration takes the registry's mutex; do it at start-up.
//
// Naming follows Prometheus conventions: names match
// [a-zA-Z_:][a-zA-Z0-9_:]*, counters end in "_total", units are seconds and
// bytes. One name is one family: every metric registered under it has the
// same type, help and (for histograms) buckets, and differs in its labels.
#ifndef DISTVAL_METRICS_H_
#define DISTVAL_METRICS_H_

#include <atomic>
#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "distval/status.h"

namespace distval {

// Label pairs of one metric, e.g. {{"type", "pull"}}. Label names match
// [a-zA-Z_][a-zA-Z0-9_]* and do not start with "__"; values are any UTF-8.
using MetricLabels = std::vector<std::pair<std::string, std::string>>;

// A monotonically increasing value. Thread-safe, lock-free.
class Counter {
 public:
  // Adds `delta` (must be >= 0; negative deltas are ignored, a counter
  // never goes down).
  void Increment(double delta = 1.0) {
    if (delta > 0) value_.fetch_add(delta, std::memory_order_relaxed);
  }
  double value() const { return value_.load(std::memory_order_relaxed); }

 private:
  std::atomic<double> value_{0.0};
};

// A value that goes up and down. Thread-safe, lock-free.
class Gauge {
 public:
  void Set(double value) { value_.store(value, std::memory_order_relaxed); }
  void Add(double delta) { value_.fetch_add(delta, std::memory_order_relaxed); }
  double value() const { return value_.load(std::memory_order_relaxed); }

 private:
  std::atomic<double> value_{0.0};
};

// Counts observations in buckets with fixed upper bounds (Prometheus
// histogram: bucket i counts observations <= bounds[i]; the +Inf bucket
// counts all). Thread-safe, lock-free.
class Histogram {
 public:
  // `upper_bounds` must be strictly increasing and finite (checked by
  // MetricRegistry::AddHistogram).
  explicit Histogram(std::vector<double> upper_bounds);

  void Observe(double value);

  // A copy of the state. Taken while others observe, `count` equals the
  // last cumulative bucket (both come from the same bucket reads); `sum`
  // may lag or lead by the observations in flight.
  struct Snapshot {
    std::vector<double> upper_bounds;
    std::vector<uint64_t> cumulative;  // per bound, then +Inf (bounds + 1)
    double sum = 0;
    uint64_t count = 0;
  };
  Snapshot Read() const;
  const std::vector<double>& upper_bounds() const { return bounds_; }

 private:
  std::vector<double> bounds_;
  std::unique_ptr<std::atomic<uint64_t>[]> counts_;  // bounds_.size() + 1 (last: > all bounds)
  std::atomic<double> sum_{0.0};
};

// `count` bounds start, start*factor, start*factor^2, ... InvalidArgument
// unless start > 0, factor > 1, count >= 1.
StatusOr<std::vector<double>> ExponentialBuckets(double start, double factor, int count);
// `count` bounds start, start+width, ... InvalidArgument unless width > 0,
// count >= 1.
StatusOr<std::vector<double>> LinearBuckets(double start, double width, int count);

// Owns metrics and renders them. Thread-safety: see the file comment.
class MetricRegistry {
 public:
  MetricRegistry();
  ~MetricRegistry();
  MetricRegistry(const MetricRegistry&) = delete;
  MetricRegistry& operator=(const MetricRegistry&) = delete;

  // Registers a metric and returns it (owned by the registry, valid for its
  // lifetime). Registering the same name and labels again returns the same
  // metric. InvalidArgument for a bad metric or label name, a repeated label
  // name, or a name already registered with another type, help text or
  // buckets (the message names the metric).
  StatusOr<Counter*> AddCounter(const std::string& name, const std::string& help,
                                const MetricLabels& labels = {});
  StatusOr<Gauge*> AddGauge(const std::string& name, const std::string& help,
                            const MetricLabels& labels = {});
  StatusOr<Histogram*> AddHistogram(const std::string& name, const std::string& help,
                                    const std::vector<double>& upper_bounds,
                                    const MetricLabels& labels = {});

  // Every family in registration order, in the Prometheus text exposition
  // format 0.0.4: "# HELP" and "# TYPE" lines, then one sample per line
  // (histograms: name_bucket{...,le="..."}, name_sum, name_count).
  std::string Render() const;

  // Content-Type of Render()'s text.
  static constexpr std::string_view kContentType = "text/plain; version=0.0.4; charset=utf-8";

 private:
  enum class Type { kCounter, kGauge, kHistogram };
  struct Family;
  StatusOr<void*> Add(Type type, const std::string& name, const std::string& help,
                      const MetricLabels& labels, const std::vector<double>* upper_bounds);

  mutable std::mutex mu_;
  std::vector<std::unique_ptr<Family>> families_;  // Guarded by mu_.
};

// Formats a sample value as Prometheus expects: integers without a decimal
// point ("42"), other values in the shortest exact form, "+Inf", "-Inf",
// "NaN".
std::string FormatMetricValue(double value);

}  // namespace distval

#endif  // DISTVAL_METRICS_H_
