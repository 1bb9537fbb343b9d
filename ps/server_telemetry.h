// ServerTelemetry: what a parameter-server shard reports about itself, as
// Prometheus metrics (distval/metrics.h, served by distval/http_endpoint.h)
// and as a Chrome trace (distval/timeline.h).
//
// The server's dispatcher thread calls the On* hooks at a handful of points
// of the request path (ps/server.cc); each hook updates atomics (and, with a
// timeline, appends a span). Publish() copies the consistency controller's
// and the store's state into gauges, at most every 100 ms, on the same
// thread, so that the metrics endpoint's thread reads only atomics.
//
// Metrics (all prefixed distval_ps_, labelled shard="<index>"):
//   requests_total{type}            requests received, by request type (the
//                                   pieces of a chunked push as push_chunk)
//   request_bytes_total{type}       bytes received (header + payload frames)
//   reply_bytes_total{type}         bytes sent, by reply type (ack, hello,
//                                   pull, checkpoint, stats, and pull_chunk
//                                   for the pieces of a chunked pull reply)
//   errors_total{code}              error replies, by status code
//   apply_seconds                   histogram: one async/SSP push's apply, or
//                                   one BSP clock's aggregated apply
//   pull_wait_seconds               histogram: a worker pull's arrival to its
//                                   answer (held by BSP/SSP)
//   push_staleness                  histogram: measured staleness of pushes
//   nan_updates_total               updates (one variable of one push)
//                                   refused or skipped for NaN/Inf gradients
//   workers / live_workers          expected / live workers
//   min_worker_clock / max_worker_clock   over live workers
//   held_pulls                      pulls waiting for slower workers
//   staleness_bound                 the job's bound (-1 async)
//   variables / variable_bytes      held by this shard (params + slots)
//   last_checkpoint_timestamp_seconds     0 until this server writes one
//   dispatcher_heartbeat_timestamp_seconds  last turn of the request loop
//
// Timeline tracks: "apply" (apply spans, args clock and worker; worker -1
// for an aggregated BSP clock) and "worker N" (each pull from arrival to
// answer, args clock).
//
// Thread-safety: hooks and Publish on the dispatcher thread only; Health()
// from any thread.
#ifndef DISTVAL_PS_SERVER_TELEMETRY_H_
#define DISTVAL_PS_SERVER_TELEMETRY_H_

#include <array>
#include <atomic>
#include <chrono>
#include <map>
#include <memory>
#include <string>
#include <variant>

#include "consistency_controller.h"
#include "distval/metrics.h"
#include "distval/protocol.h"
#include "distval/status.h"
#include "distval/timeline.h"
#include "distval/transport.h"
#include "variable_store.h"

namespace distval::ps {

class ServerTelemetry {
 public:
  // Registers the metrics in `registry` (null: no metrics) and the tracks of
  // `timeline` (null: no timeline); both are borrowed and must outlive this
  // object. Errors: the registry's InvalidArgument (a name clash).
  static StatusOr<std::unique_ptr<ServerTelemetry>> Create(MetricRegistry* registry,
                                                           Timeline* timeline, int shard_index,
                                                           int num_workers);

  // A decoded request; `msg` is the whole message (identity first).
  void OnRequest(const protocol::Request& request, const transport::InMessage& msg);
  // A reply about to be sent; `out` is the whole message (identity first).
  void OnReply(const protocol::Reply& reply, const transport::OutMessage& out);
  void OnError(StatusCode code);
  void OnPushStaleness(int64_t staleness);
  // `count` updates of a push were refused or skipped for NaN/Inf values.
  void OnNonFiniteUpdates(uint64_t count);
  // A pull is answered; `arrived` is when it was received.
  void OnPullAnswered(const protocol::Request& request, ControllerClock::time_point arrived);
  // An apply ran from `begin` to now.
  void OnApply(ControllerClock::time_point begin, int64_t clock, int32_t worker);
  // Copies the controller's and the store's state into the gauges (at most
  // every 100 ms; `force` always).
  void Publish(const ConsistencyController& controller, const VariableStore& store,
               bool force = false);

  // "" while the request loop turned within the last 10 s, else why not.
  std::string Health() const;

 private:
  ServerTelemetry() = default;
  int WorkerTrack(int32_t worker);

  Timeline* timeline_ = nullptr;
  int apply_track_ = 0;
  std::map<int32_t, int> worker_tracks_;

  static constexpr size_t kRequestTypes = std::variant_size_v<protocol::RequestBody>;
  static constexpr size_t kReplyTypes = std::variant_size_v<protocol::ReplyBody>;
  static constexpr size_t kCodes = 16;
  std::array<Counter*, kRequestTypes> requests_{};
  std::array<Counter*, kRequestTypes> request_bytes_{};
  std::array<Counter*, kReplyTypes> reply_bytes_{};
  std::array<Counter*, kCodes> errors_{};
  Histogram* apply_seconds_ = nullptr;
  Histogram* pull_wait_seconds_ = nullptr;
  Histogram* push_staleness_ = nullptr;
  Counter* nan_updates_ = nullptr;
  Gauge* workers_ = nullptr;
  Gauge* live_workers_ = nullptr;
  Gauge* min_clock_ = nullptr;
  Gauge* max_clock_ = nullptr;
  Gauge* held_pulls_ = nullptr;
  Gauge* staleness_bound_ = nullptr;
  Gauge* variables_ = nullptr;
  Gauge* variable_bytes_ = nullptr;
  Gauge* last_checkpoint_ = nullptr;
  Gauge* heartbeat_ = nullptr;

  ControllerClock::time_point last_publish_{};
  // Steady-clock nanoseconds of the last Publish call (Health reads it).
  std::atomic<int64_t> last_turn_ns_{0};
};

// Times an apply: reports it to `telemetry` (if not null) on destruction
// when armed.
class ApplyTimer {
 public:
  ApplyTimer(ServerTelemetry* telemetry, int64_t clock, int32_t worker, bool armed = false)
      : telemetry_(telemetry), clock_(clock), worker_(worker), armed_(armed) {}
  ~ApplyTimer() {
    if (telemetry_ != nullptr && armed_) telemetry_->OnApply(begin_, clock_, worker_);
  }
  ApplyTimer(const ApplyTimer&) = delete;
  ApplyTimer& operator=(const ApplyTimer&) = delete;
  void Arm() { armed_ = true; }

 private:
  ServerTelemetry* telemetry_;
  int64_t clock_;
  int32_t worker_;
  bool armed_;
  ControllerClock::time_point begin_ = ControllerClock::now();
};

}  // namespace distval::ps

#endif  // DISTVAL_PS_SERVER_TELEMETRY_H_
