#include "server_telemetry.h"

#include <algorithm>
#include <limits>

namespace distval::ps {

namespace {

double SecondsSince(ControllerClock::time_point t) {
  return std::chrono::duration<double>(ControllerClock::now() - t).count();
}

int64_t SteadyNanos() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(
             ControllerClock::now().time_since_epoch())
      .count();
}

// Names of the reply bodies, in ReplyBody's order.
constexpr const char* kReplyNames[] = {"ack", "hello", "pull", "checkpoint", "stats", "pull_chunk"};
static_assert(std::size(kReplyNames) == std::variant_size_v<protocol::ReplyBody>);

// A request body of each type, to ask protocol::RequestTypeName for its name.
template <size_t... I>
std::array<std::string, sizeof...(I)> RequestNames(std::index_sequence<I...>) {
  return {std::string(protocol::RequestTypeName(protocol::RequestBody(std::in_place_index<I>)))...};
}

}  // namespace

StatusOr<std::unique_ptr<ServerTelemetry>> ServerTelemetry::Create(MetricRegistry* registry,
                                                                   Timeline* timeline,
                                                                   int shard_index,
                                                                   int num_workers) {
  std::unique_ptr<ServerTelemetry> t(new ServerTelemetry());
  t->last_turn_ns_.store(SteadyNanos());
  t->timeline_ = timeline;
  if (timeline != nullptr) t->apply_track_ = timeline->AddTrack("apply", 0);
  if (registry == nullptr) return t;

  MetricRegistry& r = *registry;
  const std::string shard = std::to_string(shard_index);
  const auto names = RequestNames(std::make_index_sequence<kRequestTypes>());
  for (size_t i = 0; i < kRequestTypes; ++i) {
    const MetricLabels labels = {{"shard", shard}, {"type", names[i]}};
    DV_ASSIGN_OR_RETURN(t->requests_[i], r.AddCounter("distval_ps_requests_total",
                                                      "Requests received, by type.", labels));
    DV_ASSIGN_OR_RETURN(
        t->request_bytes_[i],
        r.AddCounter("distval_ps_request_bytes_total",
                     "Bytes received in requests (header and payload frames), by type.", labels));
  }
  for (size_t i = 0; i < kReplyTypes; ++i) {
    DV_ASSIGN_OR_RETURN(
        t->reply_bytes_[i],
        r.AddCounter("distval_ps_reply_bytes_total",
                     "Bytes sent in replies (header and payload frames), by reply type.",
                     {{"shard", shard}, {"type", kReplyNames[i]}}));
  }
  for (size_t c = 1; c < kCodes; ++c) {
    DV_ASSIGN_OR_RETURN(
        t->errors_[c],
        r.AddCounter("distval_ps_errors_total", "Error replies sent, by status code.",
                     {{"shard", shard}, {"code", StatusCodeName(static_cast<StatusCode>(c))}}));
  }
  const MetricLabels labels = {{"shard", shard}};
  DV_ASSIGN_OR_RETURN(std::vector<double> time_buckets, ExponentialBuckets(1e-5, 4, 12));
  DV_ASSIGN_OR_RETURN(
      t->apply_seconds_,
      r.AddHistogram("distval_ps_apply_seconds",
                     "Time to apply one async/SSP push, or one BSP clock's summed gradients.",
                     time_buckets, labels));
  DV_ASSIGN_OR_RETURN(
      t->pull_wait_seconds_,
      r.AddHistogram("distval_ps_pull_wait_seconds",
                     "Time from a worker pull's arrival to its answer (BSP/SSP hold pulls "
                     "for slower workers).",
                     time_buckets, labels));
  DV_ASSIGN_OR_RETURN(
      t->push_staleness_,
      r.AddHistogram("distval_ps_push_staleness",
                     "Measured staleness of pushes: the largest live worker clock minus the "
                     "push's clock.",
                     {0, 1, 2, 3, 4, 6, 8, 12, 16, 32, 64}, labels));
  DV_ASSIGN_OR_RETURN(
      t->nan_updates_,
      r.AddCounter("distval_ps_nan_updates_total",
                   "Updates (one variable of one push) refused or skipped because their "
                   "gradient held NaN or Inf (--nan-policy).",
                   labels));
  auto gauge = [&](const char* name, const char* help) { return r.AddGauge(name, help, labels); };
  DV_ASSIGN_OR_RETURN(t->workers_, gauge("distval_ps_workers", "Workers the job expects."));
  DV_ASSIGN_OR_RETURN(
      t->live_workers_,
      gauge("distval_ps_live_workers", "Workers in the live set (heartbeating, not dropped)."));
  DV_ASSIGN_OR_RETURN(t->min_clock_, gauge("distval_ps_min_worker_clock",
                                           "Smallest clock (steps completed) of a live worker."));
  DV_ASSIGN_OR_RETURN(t->max_clock_, gauge("distval_ps_max_worker_clock",
                                           "Largest clock (steps completed) of a live worker."));
  DV_ASSIGN_OR_RETURN(t->held_pulls_,
                      gauge("distval_ps_held_pulls", "Pulls waiting for slower workers."));
  DV_ASSIGN_OR_RETURN(
      t->staleness_bound_,
      gauge("distval_ps_staleness_bound", "The job's staleness bound: 0 BSP, N SSP, -1 async."));
  DV_ASSIGN_OR_RETURN(t->variables_,
                      gauge("distval_ps_variables", "Variables (or variable shards) held."));
  DV_ASSIGN_OR_RETURN(t->variable_bytes_,
                      gauge("distval_ps_variable_bytes",
                            "Bytes held by the variables: parameters and optimizer slots."));
  DV_ASSIGN_OR_RETURN(t->last_checkpoint_,
                      gauge("distval_ps_last_checkpoint_timestamp_seconds",
                            "Unix time of the last checkpoint written (0: none yet)."));
  DV_ASSIGN_OR_RETURN(t->heartbeat_, gauge("distval_ps_dispatcher_heartbeat_timestamp_seconds",
                                           "Unix time of the request loop's last turn."));
  t->workers_->Set(num_workers);
  return t;
}

void ServerTelemetry::OnRequest(const protocol::Request& request, const transport::InMessage& msg) {
  const size_t i = request.body.index();
  if (requests_[i] == nullptr) return;
  size_t bytes = 0;
  for (size_t f = 1; f < msg.size(); ++f) bytes += msg[f].size();
  requests_[i]->Increment();
  request_bytes_[i]->Increment(static_cast<double>(bytes));
}

void ServerTelemetry::OnReply(const protocol::Reply& reply, const transport::OutMessage& out) {
  Counter* c = reply_bytes_[reply.body.index()];
  if (c == nullptr) return;
  size_t bytes = 0;
  for (size_t f = 1; f < out.size(); ++f) bytes += out[f].size();
  c->Increment(static_cast<double>(bytes));
}

void ServerTelemetry::OnError(StatusCode code) {
  const size_t c = static_cast<size_t>(code);
  if (c == 0 || c >= kCodes || errors_[c] == nullptr) {
    if (errors_[static_cast<size_t>(StatusCode::kUnknown)] != nullptr)
      errors_[static_cast<size_t>(StatusCode::kUnknown)]->Increment();
    return;
  }
  errors_[c]->Increment();
}

void ServerTelemetry::OnPushStaleness(int64_t staleness) {
  if (push_staleness_ != nullptr) push_staleness_->Observe(static_cast<double>(staleness));
}

void ServerTelemetry::OnNonFiniteUpdates(uint64_t count) {
  if (nan_updates_ != nullptr) nan_updates_->Increment(static_cast<double>(count));
}

int ServerTelemetry::WorkerTrack(int32_t worker) {
  auto it = worker_tracks_.find(worker);
  if (it != worker_tracks_.end()) return it->second;
  const int track = timeline_->AddTrack("worker " + std::to_string(worker), 1 + worker);
  worker_tracks_.emplace(worker, track);
  return track;
}

void ServerTelemetry::OnPullAnswered(const protocol::Request& request,
                                     ControllerClock::time_point arrived) {
  if (request.worker_id < 0) return;  // control clients never wait
  if (pull_wait_seconds_ != nullptr) pull_wait_seconds_->Observe(SecondsSince(arrived));
  if (timeline_ != nullptr)
    timeline_->Span(WorkerTrack(request.worker_id), "pull", arrived, ControllerClock::now(),
                    {{"step", request.clock}, {"worker", request.worker_id}});
}

void ServerTelemetry::OnApply(ControllerClock::time_point begin, int64_t clock, int32_t worker) {
  if (apply_seconds_ != nullptr) apply_seconds_->Observe(SecondsSince(begin));
  if (timeline_ != nullptr)
    timeline_->Span(apply_track_, "apply", begin, ControllerClock::now(),
                    {{"step", clock}, {"worker", worker}});
}

void ServerTelemetry::Publish(const ConsistencyController& controller, const VariableStore& store,
                              bool force) {
  const auto now = ControllerClock::now();
  last_turn_ns_.store(SteadyNanos(), std::memory_order_relaxed);
  if (workers_ == nullptr) return;
  if (!force && now - last_publish_ < std::chrono::milliseconds(100)) return;
  last_publish_ = now;
  const ControllerSnapshot snap = controller.Snapshot();
  int live = 0;
  int64_t lo = std::numeric_limits<int64_t>::max(), hi = 0;
  for (const WorkerSnapshot& w : snap.workers) {
    if (!w.live) continue;
    ++live;
    lo = std::min(lo, w.clock);
    hi = std::max(hi, w.clock);
  }
  live_workers_->Set(live);
  min_clock_->Set(live > 0 ? static_cast<double>(lo) : 0.0);
  max_clock_->Set(static_cast<double>(hi));
  held_pulls_->Set(static_cast<double>(snap.held_pulls));
  staleness_bound_->Set(controller.CurrentStaleness());
  variables_->Set(static_cast<double>(store.size()));
  variable_bytes_->Set(static_cast<double>(store.TotalBytes()));
  heartbeat_->Set(
      std::chrono::duration<double>(std::chrono::system_clock::now().time_since_epoch()).count());
}

std::string ServerTelemetry::Health() const {
  const int64_t idle_ns = SteadyNanos() - last_turn_ns_.load(std::memory_order_relaxed);
  if (idle_ns > int64_t{10} * 1000 * 1000 * 1000)
    return "the request loop has not turned for " + std::to_string(idle_ns / 1000000000) + " s";
  return "";
}

}  // namespace distval::ps
