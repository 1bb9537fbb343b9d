// WorkerTelemetry: what a worker reports about its training steps, as
// Prometheus metrics (distval/metrics.h; serve them with
// distval/http_endpoint.h) and as a Chrome trace (distval/timeline.h).
//
//   MetricRegistry registry;
//   DV_ASSIGN_OR_RETURN(auto timeline, Timeline::Open("worker0.json", "worker 0"));
//   DV_ASSIGN_OR_RETURN(auto telemetry, WorkerTelemetry::Create(&registry, timeline.get(), 0));
//   WorkerOptions options;  ...;  options.telemetry = telemetry.get();
//   DV_ASSIGN_OR_RETURN(auto strategy, ParameterServerStrategy::Create(options));
//   ... each step: strategy->Run(...); telemetry->RecordBatch(examples, loss);
//
// The strategy reports every step's phases; the Client (through
// ClientObserver) every request to a shard. A step's wall time splits into
// (as seen by replica 0, which runs the merge):
//   pull     waiting for the step's pulled values (BSP/SSP pulls wait for
//            slower workers)
//   compute  mirroring the values into the replica and the step function's
//            own work
//   blocked  waiting in ApplyGradients for the other local replicas
//   reduce   the local reduction of the replicas' gradients
//   push     waiting for the push's acknowledgement
//
// Metrics (prefixed distval_worker_, labelled worker="<index>"):
//   steps_total, step_seconds (histogram of the step's wall time),
//   step_phase_seconds{phase} (histogram per phase above), clock,
//   examples_total, examples_per_second (over the last second or more),
//   loss (last RecordBatch), staleness (histogram and last value: this
//   worker's clock minus the smallest live clock the servers reported),
//   requests_total{type}, request_seconds{type} (send to reply, per shard
//   request), sent_bytes_total{type}, received_bytes_total{type},
//   request_errors_total.
//
// Timeline tracks: "steps" ("step" spans with "pull" inside), "replica R"
// ("mirror", then "compute" with "blocked", "reduce", "push" inside), and
// per parameter-server connection "ps S" (each request from send to reply,
// named by its type; a second lane "ps S #2" holds requests that overlap,
// e.g. the next step's pull sent behind a push). Every span has the step
// number in args.step.
//
// Thread-safety: all methods are thread-safe. The strategy calls the step
// hooks from its threads, the client the observer methods from its I/O
// thread; RecordBatch from the training loop.
#ifndef DISTVAL_WORKER_TELEMETRY_H_
#define DISTVAL_WORKER_TELEMETRY_H_

#include <array>
#include <atomic>
#include <chrono>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <unordered_map>
#include <variant>
#include <vector>

#include "distval/client_observer.h"
#include "distval/metrics.h"
#include "distval/status.h"
#include "distval/timeline.h"

namespace distval {

// Phases of a step (see the file comment).
enum class StepPhase : int { kPull = 0, kCompute, kBlocked, kReduce, kPush, kMirror };

// One finished step, as the strategy measured it.
struct StepTiming {
  int64_t step = 0;  // the clock the step pushed for (0-based)
  std::chrono::steady_clock::time_point begin, end;
  double pull_s = 0, compute_s = 0, blocked_s = 0, reduce_s = 0, push_s = 0;
  int64_t staleness = 0;
};

class WorkerTelemetry final : public ClientObserver {
 public:
  using Clock = std::chrono::steady_clock;

  // `registry` (null: no metrics) and `timeline` (null: no timeline) are
  // borrowed and must outlive this object (and the strategy and client that
  // report to it). Errors: the registry's InvalidArgument (a name clash).
  static StatusOr<std::unique_ptr<WorkerTelemetry>> Create(MetricRegistry* registry,
                                                           Timeline* timeline, int worker_index);
  ~WorkerTelemetry() override;

  // ---- Training loop ----
  // Examples processed by this worker in the step just run, and its loss.
  void RecordBatch(int64_t examples, double loss);

  // ---- Strategy hooks ----
  // A pull waited from `begin` to `end` for step `step`.
  void OnPull(int64_t step, Clock::time_point begin, Clock::time_point end);
  // Replica `replica` spent [begin, end] in `phase` of step `step`
  // (timeline only; the metrics come from OnStep).
  void OnReplicaSpan(int replica, StepPhase phase, int64_t step, Clock::time_point begin,
                     Clock::time_point end);
  // A step finished.
  void OnStep(const StepTiming& timing);

  // ---- ClientObserver ----
  void OnSend(int shard, const protocol::Request& request,
              const transport::OutMessage& message) override;
  void OnReply(int shard, const protocol::Reply& reply,
               const transport::InMessage& message) override;

  static const char* PhaseName(StepPhase phase);

 private:
  WorkerTelemetry() = default;
  int Track(const std::string& name, int sort_index);

  MetricRegistry* registry_ = nullptr;
  Timeline* timeline_ = nullptr;

  std::mutex tracks_mu_;
  std::map<std::string, int> tracks_;  // Guarded by tracks_mu_.

  static constexpr size_t kRequestTypes = std::variant_size_v<protocol::RequestBody>;
  static constexpr int kPhases = 5;  // kPull .. kPush (metrics)

  Counter* steps_ = nullptr;
  Histogram* step_seconds_ = nullptr;
  std::array<Histogram*, kPhases> phase_seconds_{};
  Gauge* clock_ = nullptr;
  Counter* examples_ = nullptr;
  Gauge* examples_per_second_ = nullptr;
  Gauge* loss_ = nullptr;
  Histogram* staleness_ = nullptr;
  Gauge* last_staleness_ = nullptr;
  std::array<Counter*, kRequestTypes> requests_{};
  std::array<Histogram*, kRequestTypes> request_seconds_{};
  std::array<Counter*, kRequestTypes> sent_bytes_{};
  std::array<Counter*, kRequestTypes> received_bytes_{};
  Counter* request_errors_ = nullptr;

  // RecordBatch's rate window.
  std::mutex rate_mu_;
  Clock::time_point window_start_{};  // Guarded by rate_mu_.
  int64_t window_examples_ = 0;       // Guarded by rate_mu_.

  // Requests in flight (I/O thread only).
  struct InFlight {
    int shard = 0;
    int lane = 0;
    size_t type = 0;
    int64_t step = 0;
    Clock::time_point sent;
    // A chunked pull reply: pieces still to come (the request ends with
    // the last one), and the bytes received so far.
    int64_t chunks_left = 0;
    size_t bytes = 0;
  };
  std::unordered_map<uint64_t, InFlight> in_flight_;
  // lanes_[shard][lane]: the request id occupying the lane (0: free).
  std::vector<std::vector<uint64_t>> lanes_;
};

}  // namespace distval

#endif  // DISTVAL_WORKER_TELEMETRY_H_
