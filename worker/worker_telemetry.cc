#include "distval/worker_telemetry.h"

#include <utility>

namespace distval {

namespace {

constexpr int kMaxLanes = 8;

double Seconds(std::chrono::steady_clock::duration d) {
  return std::chrono::duration<double>(d).count();
}

template <size_t... I>
std::array<std::string, sizeof...(I)> RequestNames(std::index_sequence<I...>) {
  return {std::string(protocol::RequestTypeName(protocol::RequestBody(std::in_place_index<I>)))...};
}

// The name of request type `index` (RequestBody's alternative).
const std::string& RequestName(size_t index) {
  static const auto names =
      RequestNames(std::make_index_sequence<std::variant_size_v<protocol::RequestBody>>());
  return names[index];
}

size_t MessageBytes(const transport::OutMessage& m) {
  size_t n = 0;
  for (const auto& p : m) n += p.size();
  return n;
}

size_t MessageBytes(const transport::InMessage& m) {
  size_t n = 0;
  for (const auto& f : m) n += f.size();
  return n;
}

}  // namespace

const char* WorkerTelemetry::PhaseName(StepPhase phase) {
  switch (phase) {
    case StepPhase::kPull:
      return "pull";
    case StepPhase::kCompute:
      return "compute";
    case StepPhase::kBlocked:
      return "blocked";
    case StepPhase::kReduce:
      return "reduce";
    case StepPhase::kPush:
      return "push";
    case StepPhase::kMirror:
      return "mirror";
  }
  return "unknown";
}

StatusOr<std::unique_ptr<WorkerTelemetry>> WorkerTelemetry::Create(MetricRegistry* registry,
                                                                   Timeline* timeline,
                                                                   int worker_index) {
  std::unique_ptr<WorkerTelemetry> t(new WorkerTelemetry());
  t->registry_ = registry;
  t->timeline_ = timeline;
  if (timeline != nullptr) t->Track("steps", 0);
  if (registry == nullptr) return t;
  MetricRegistry& r = *registry;
  const std::string worker = std::to_string(worker_index);
  const MetricLabels labels = {{"worker", worker}};
  DV_ASSIGN_OR_RETURN(std::vector<double> time_buckets, ExponentialBuckets(1e-5, 4, 12));
  DV_ASSIGN_OR_RETURN(t->steps_, r.AddCounter("distval_worker_steps_total",
                                              "Training steps completed (pushes).", labels));
  DV_ASSIGN_OR_RETURN(
      t->step_seconds_,
      r.AddHistogram("distval_worker_step_seconds", "Wall time of a training step, pull to push.",
                     time_buckets, labels));
  for (int p = 0; p < kPhases; ++p) {
    DV_ASSIGN_OR_RETURN(
        t->phase_seconds_[static_cast<size_t>(p)],
        r.AddHistogram("distval_worker_step_phase_seconds",
                       "Time of each step spent in one phase: pull (waiting for values), "
                       "compute, blocked (waiting for local replicas), reduce (local), push "
                       "(waiting for the acknowledgement).",
                       time_buckets,
                       {{"worker", worker}, {"phase", PhaseName(static_cast<StepPhase>(p))}}));
  }
  DV_ASSIGN_OR_RETURN(t->clock_, r.AddGauge("distval_worker_clock",
                                            "This worker's clock: steps completed.", labels));
  DV_ASSIGN_OR_RETURN(t->examples_, r.AddCounter("distval_worker_examples_total",
                                                 "Training examples processed.", labels));
  DV_ASSIGN_OR_RETURN(
      t->examples_per_second_,
      r.AddGauge("distval_worker_examples_per_second",
                 "Training examples per second over the last second or more.", labels));
  DV_ASSIGN_OR_RETURN(t->loss_,
                      r.AddGauge("distval_worker_loss", "Training loss of the last step.", labels));
  DV_ASSIGN_OR_RETURN(
      t->staleness_,
      r.AddHistogram("distval_worker_staleness",
                     "Staleness of each step: this worker's clock minus the smallest live clock "
                     "the servers reported.",
                     {0, 1, 2, 3, 4, 6, 8, 12, 16, 32, 64}, labels));
  DV_ASSIGN_OR_RETURN(t->last_staleness_, r.AddGauge("distval_worker_last_staleness",
                                                     "Staleness of the last step.", labels));
  for (size_t i = 0; i < kRequestTypes; ++i) {
    const MetricLabels tl = {{"worker", worker}, {"type", RequestName(i)}};
    DV_ASSIGN_OR_RETURN(
        t->requests_[i],
        r.AddCounter("distval_worker_requests_total",
                     "Requests sent to the parameter servers (one per shard).", tl));
    DV_ASSIGN_OR_RETURN(
        t->request_seconds_[i],
        r.AddHistogram("distval_worker_request_seconds",
                       "Time from sending a request to a shard to its reply.", time_buckets, tl));
    DV_ASSIGN_OR_RETURN(t->sent_bytes_[i],
                        r.AddCounter("distval_worker_sent_bytes_total",
                                     "Bytes sent to the parameter servers, by request type.", tl));
    DV_ASSIGN_OR_RETURN(
        t->received_bytes_[i],
        r.AddCounter("distval_worker_received_bytes_total",
                     "Bytes received from the parameter servers, by request type.", tl));
  }
  DV_ASSIGN_OR_RETURN(t->request_errors_,
                      r.AddCounter("distval_worker_request_errors_total",
                                   "Requests a shard answered with an error.", labels));
  return t;
}

WorkerTelemetry::~WorkerTelemetry() = default;

int WorkerTelemetry::Track(const std::string& name, int sort_index) {
  std::lock_guard<std::mutex> lock(tracks_mu_);
  auto it = tracks_.find(name);
  if (it != tracks_.end()) return it->second;
  const int id = timeline_->AddTrack(name, sort_index);
  tracks_.emplace(name, id);
  return id;
}

void WorkerTelemetry::RecordBatch(int64_t examples, double loss) {
  if (examples_ == nullptr) return;
  examples_->Increment(static_cast<double>(examples));
  loss_->Set(loss);
  const auto now = Clock::now();
  std::lock_guard<std::mutex> lock(rate_mu_);
  if (window_start_ == Clock::time_point{}) {
    window_start_ = now;
    window_examples_ = 0;
    return;  // the first batch started before the window
  }
  window_examples_ += examples;
  const double elapsed = Seconds(now - window_start_);
  if (elapsed >= 1.0) {
    examples_per_second_->Set(static_cast<double>(window_examples_) / elapsed);
    window_start_ = now;
    window_examples_ = 0;
  }
}

void WorkerTelemetry::OnPull(int64_t step, Clock::time_point begin, Clock::time_point end) {
  if (timeline_ != nullptr)
    timeline_->Span(Track("steps", 0), "pull", begin, end, {{"step", step}});
}

void WorkerTelemetry::OnReplicaSpan(int replica, StepPhase phase, int64_t step,
                                    Clock::time_point begin, Clock::time_point end) {
  if (timeline_ == nullptr) return;
  timeline_->Span(Track("replica " + std::to_string(replica), 100 + replica), PhaseName(phase),
                  begin, end, {{"step", step}});
}

void WorkerTelemetry::OnStep(const StepTiming& t) {
  if (timeline_ != nullptr)
    timeline_->Span(Track("steps", 0), "step", t.begin, t.end, {{"step", t.step}});
  if (steps_ == nullptr) return;
  step_seconds_->Observe(Seconds(t.end - t.begin));
  const double phases[kPhases] = {t.pull_s, t.compute_s, t.blocked_s, t.reduce_s, t.push_s};
  for (int p = 0; p < kPhases; ++p) phase_seconds_[static_cast<size_t>(p)]->Observe(phases[p]);
  staleness_->Observe(static_cast<double>(t.staleness));
  last_staleness_->Set(static_cast<double>(t.staleness));
  clock_->Set(static_cast<double>(t.step + 1));
  // Last: a scrape reads steps_total before the histograms (registration
  // order), so it never sees more steps than phase observations.
  steps_->Increment();
}

void WorkerTelemetry::OnSend(int shard, const protocol::Request& request,
                             const transport::OutMessage& message) {
  if (std::holds_alternative<protocol::PushChunk>(request.body)) {
    // A piece of a chunked push (sent after it): its bytes are the push's.
    const size_t push = protocol::RequestBody(protocol::Push{}).index();
    if (sent_bytes_[push] != nullptr)
      sent_bytes_[push]->Increment(static_cast<double>(MessageBytes(message)));
    return;
  }
  const size_t type = request.body.index();
  if (requests_[type] != nullptr) {
    requests_[type]->Increment();
    sent_bytes_[type]->Increment(static_cast<double>(MessageBytes(message)));
  }
  InFlight f;
  f.shard = shard;
  f.type = type;
  f.step = request.clock;
  f.sent = Clock::now();
  if (shard >= static_cast<int>(lanes_.size())) lanes_.resize(static_cast<size_t>(shard) + 1);
  auto& lanes = lanes_[static_cast<size_t>(shard)];
  int lane = 0;
  while (lane < static_cast<int>(lanes.size()) && lanes[static_cast<size_t>(lane)] != 0) ++lane;
  if (lane == static_cast<int>(lanes.size())) {
    if (lane < kMaxLanes) {
      lanes.push_back(0);
    } else {
      lane = kMaxLanes - 1;  // requests that never got a reply: share the last lane
    }
  }
  lanes[static_cast<size_t>(lane)] = request.request_id;
  f.lane = lane;
  in_flight_[request.request_id] = f;
}

void WorkerTelemetry::OnReply(int shard, const protocol::Reply& reply,
                              const transport::InMessage& message) {
  auto it = in_flight_.find(reply.request_id);
  if (it == in_flight_.end()) return;  // a heartbeat's reply
  it->second.bytes += MessageBytes(message);
  if (const auto* pr = std::get_if<protocol::PullReply>(&reply.body);
      pr != nullptr && pr->chunks > 0 && reply.code == StatusCode::kOk) {
    it->second.chunks_left = pr->chunks;  // it ends with its last piece
    return;
  }
  if (std::holds_alternative<protocol::PullChunk>(reply.body) && --it->second.chunks_left > 0)
    return;
  const InFlight f = it->second;
  in_flight_.erase(it);
  const auto now = Clock::now();
  auto& lanes = lanes_[static_cast<size_t>(f.shard)];
  if (lanes[static_cast<size_t>(f.lane)] == reply.request_id)
    lanes[static_cast<size_t>(f.lane)] = 0;
  if (requests_[f.type] != nullptr) {
    request_seconds_[f.type]->Observe(Seconds(now - f.sent));
    received_bytes_[f.type]->Increment(static_cast<double>(f.bytes));
    if (reply.code != StatusCode::kOk) request_errors_->Increment();
  }
  if (timeline_ != nullptr) {
    std::string track = "ps " + std::to_string(shard);
    if (f.lane > 0) track += " #" + std::to_string(f.lane + 1);
    timeline_->Span(Track(track, 1000 + 10 * shard + f.lane), RequestName(f.type), f.sent, now,
                    {{"step", f.step}, {"shard", shard}});
  }
}

}  // namespace distval
