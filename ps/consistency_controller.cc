#include "consistency_controller.h"

#include <algorithm>
#include <limits>
#include <set>
#include <string>
#include <utility>

#include "distval/protocol.h"

namespace distval::ps {
namespace {

using protocol::kStalenessAsync;
using protocol::kStalenessInherit;

// Strictness order: 0 (BSP) < 1 < 2 < ... < async.
int64_t Rank(int32_t bound) {
  return bound == kStalenessAsync ? std::numeric_limits<int64_t>::max() : bound;
}

std::string BoundName(int32_t bound) {
  if (bound == kStalenessAsync) return "async";
  if (bound == kStalenessInherit) return "inherit";
  if (bound == 0) return "BSP (0)";
  return "SSP (" + std::to_string(bound) + ")";
}

// Value of a schedule at `clock`, or nullopt before its first entry.
std::optional<int32_t> Lookup(const std::map<int64_t, int32_t>& schedule, int64_t clock) {
  auto it = schedule.upper_bound(clock);
  if (it == schedule.begin()) return std::nullopt;
  return std::prev(it)->second;
}

void InsertSorted(std::vector<int32_t>* ids, int32_t id) {
  auto it = std::lower_bound(ids->begin(), ids->end(), id);
  if (it == ids->end() || *it != id) ids->insert(it, id);
}

}  // namespace

int32_t ConsistencyController::StricterBound(int32_t a, int32_t b) {
  return Rank(a) <= Rank(b) ? a : b;
}

StatusOr<std::unique_ptr<ConsistencyController>> ConsistencyController::Create(
    ConsistencyOptions options) {
  if (options.num_workers < 1) {
    return InvalidArgumentError("consistency controller: num_workers must be >= 1, got " +
                                std::to_string(options.num_workers));
  }
  if (options.staleness < kStalenessAsync) {
    return InvalidArgumentError(
        "consistency controller: staleness must be -1 (async), 0 (BSP) or > 0 (SSP), got " +
        std::to_string(options.staleness));
  }
  if (options.worker_timeout <= Duration::zero()) {
    return InvalidArgumentError("consistency controller: worker_timeout must be > 0");
  }
  if (options.startup_grace < Duration::zero()) {
    return InvalidArgumentError("consistency controller: startup_grace must be >= 0");
  }
  if (options.startup_grace == Duration::zero()) options.startup_grace = options.worker_timeout;
  if (!options.now) options.now = [] { return ControllerClock::now(); };
  return std::unique_ptr<ConsistencyController>(new ConsistencyController(std::move(options)));
}

ConsistencyController::ConsistencyController(ConsistencyOptions options)
    : options_(std::move(options)), start_(options_.now()) {
  workers_.resize(static_cast<size_t>(options_.num_workers));
  for (Worker& w : workers_) w.last_seen = start_;
  job_schedule_[0] = options_.staleness;
}

TimePoint ConsistencyController::Now() const { return options_.now(); }

Status ConsistencyController::CheckWorkerId(int32_t worker) const {
  if (worker < 0 || worker >= num_workers()) {
    return InvalidArgumentError("worker id " + std::to_string(worker) + " is outside [0, " +
                                std::to_string(num_workers()) + ") (num_workers of this job)");
  }
  return OkStatus();
}

Status ConsistencyController::CheckLiveWorker(int32_t worker) const {
  DV_RETURN_IF_ERROR(CheckWorkerId(worker));
  const Worker& w = workers_[static_cast<size_t>(worker)];
  if (!w.live) {
    return FailedPreconditionError("worker " + std::to_string(worker) + " (clock " +
                                   std::to_string(w.clock) +
                                   ") was dropped from the live set after being silent; send "
                                   "Hello to rejoin");
  }
  return OkStatus();
}

void ConsistencyController::Touch(int32_t worker) {
  Worker& w = workers_[static_cast<size_t>(worker)];
  w.last_seen = Now();
  w.seen = true;
}

std::optional<int64_t> ConsistencyController::MinLiveClock() const {
  std::optional<int64_t> min;
  for (const Worker& w : workers_) {
    if (w.live && (!min || w.clock < *min)) min = w.clock;
  }
  return min;
}

std::optional<int64_t> ConsistencyController::MaxLiveClock() const {
  std::optional<int64_t> max;
  for (const Worker& w : workers_) {
    if (w.live && (!max || w.clock > *max)) max = w.clock;
  }
  return max;
}

int32_t ConsistencyController::EffectiveWith(const Schedule& job, const Schedule* var,
                                             int64_t clock) const {
  if (var != nullptr) {
    std::optional<int32_t> own = Lookup(*var, clock);
    if (own && *own != kStalenessInherit) return *own;
  }
  // The job schedule always has an entry at clock 0; clocks are >= 0.
  return Lookup(job, std::max<int64_t>(clock, 0)).value_or(options_.staleness);
}

int32_t ConsistencyController::EffectiveStaleness(std::string_view variable, int64_t clock) const {
  const Schedule* var = nullptr;
  if (!variable.empty()) {
    auto it = var_schedules_.find(variable);
    if (it != var_schedules_.end()) var = &it->second;
  }
  return EffectiveWith(job_schedule_, var, clock);
}

int32_t ConsistencyController::JobStaleness(int64_t clock) const {
  return EffectiveWith(job_schedule_, nullptr, clock);
}

int32_t ConsistencyController::CurrentStaleness() const { return JobStaleness(MinClock()); }

template <typename Names>
int32_t ConsistencyController::PullBound(int64_t clock, const Names& variables) const {
  if (variables.empty()) return JobStaleness(clock);
  int32_t bound = kStalenessAsync;
  for (const auto& name : variables) {
    bound = StricterBound(bound, EffectiveStaleness(name, clock));
  }
  return bound;
}

bool ConsistencyController::GateOpen(int64_t clock, int32_t bound,
                                     std::optional<int64_t> min_live) {
  if (bound == kStalenessAsync || !min_live) return true;
  return *min_live >= clock - bound;
}

bool ConsistencyController::CanAnswerPull(int64_t clock,
                                          std::span<const std::string_view> variables) const {
  return GateOpen(clock, PullBound(clock, variables), MinLiveClock());
}

int64_t ConsistencyController::MinClock() const { return MinLiveClock().value_or(floor_); }

int64_t ConsistencyController::MaxClock() const {
  if (std::optional<int64_t> max = MaxLiveClock()) return *max;
  int64_t max = 0;
  for (const Worker& w : workers_) max = std::max(max, w.clock);
  return max;
}

int64_t ConsistencyController::ShardClock() const {
  return CurrentStaleness() == 0 ? MinClock() : MaxClock();
}

int64_t ConsistencyController::StalenessOf(int64_t clock) const {
  return std::max<int64_t>(0, MaxClock() - clock);
}

Status ConsistencyController::RestoreClocks(std::span<const int64_t> clocks, int32_t staleness) {
  if (max_seen_clock_ != -1 || !held_.empty() || !pending_.empty())
    return FailedPreconditionError("worker clocks can only be restored before serving");
  for (const Worker& w : workers_)
    if (w.seen) return FailedPreconditionError("worker clocks can only be restored before serving");
  if (clocks.size() != workers_.size())
    return InvalidArgumentError("checkpoint has " + std::to_string(clocks.size()) +
                                " worker clocks, this job has num_workers " +
                                std::to_string(workers_.size()));
  if (staleness < kStalenessAsync)
    return InvalidArgumentError("checkpoint staleness " + std::to_string(staleness) +
                                " is invalid");
  for (size_t i = 0; i < clocks.size(); ++i)
    if (clocks[i] < 0)
      return InvalidArgumentError("checkpoint clock of worker " + std::to_string(i) +
                                  " is negative: " + std::to_string(clocks[i]));
  const TimePoint now = Now();
  int64_t min = clocks.empty() ? 0 : clocks[0];
  for (size_t i = 0; i < clocks.size(); ++i) {
    workers_[i].clock = clocks[i];
    workers_[i].live = true;
    workers_[i].last_seen = now;
    min = std::min(min, clocks[i]);
  }
  floor_ = min;
  job_schedule_.clear();
  job_schedule_[0] = staleness;
  return OkStatus();
}

StatusOr<int64_t> ConsistencyController::OnHello(int32_t worker) {
  DV_RETURN_IF_ERROR(CheckWorkerId(worker));
  Worker& w = workers_[static_cast<size_t>(worker)];
  if (!w.live) {
    // Rejoin where the job is; never behind the steps it already finished
    // here (its pushes for them were counted).
    w.clock = std::max(w.clock, MinClock());
    w.live = true;
  }
  Touch(worker);
  return w.clock;
}

Status ConsistencyController::OnHeartbeat(int32_t worker) {
  DV_RETURN_IF_ERROR(CheckLiveWorker(worker));
  Touch(worker);
  return OkStatus();
}

Status ConsistencyController::CheckPush(int32_t worker, int64_t clock) const {
  DV_RETURN_IF_ERROR(CheckLiveWorker(worker));
  const Worker& w = workers_[static_cast<size_t>(worker)];
  if (clock < 0) {
    return InvalidArgumentError("push from worker " + std::to_string(worker) +
                                " has a negative clock " + std::to_string(clock));
  }
  if (clock < w.clock) {
    return FailedPreconditionError("push from worker " + std::to_string(worker) + " is for clock " +
                                   std::to_string(clock) + " but its clock is already " +
                                   std::to_string(w.clock) + " (that step is finished)");
  }
  return OkStatus();
}

StatusOr<PushPlan> ConsistencyController::OnPush(int32_t worker, int64_t clock,
                                                 std::span<const std::string_view> variables,
                                                 bool advance_clock) {
  DV_RETURN_IF_ERROR(CheckPush(worker, clock));
  Worker& w = workers_[static_cast<size_t>(worker)];
  Touch(worker);
  w.clock = clock;  // >= its previous clock
  max_seen_clock_ = std::max(max_seen_clock_, clock);

  PushPlan plan;
  plan.staleness = StalenessOf(clock);
  plan.routes.reserve(variables.size());
  bool applies_now = false;
  for (std::string_view name : variables) {
    if (EffectiveStaleness(name, clock) == 0) {
      plan.routes.push_back(PushRoute::kAccumulate);
      auto& by_var = pending_[clock];
      auto it = by_var.find(name);
      if (it == by_var.end()) it = by_var.emplace(std::string(name), std::vector<int32_t>{}).first;
      InsertSorted(&it->second, worker);
    } else {
      plan.routes.push_back(PushRoute::kApplyNow);
      applies_now = true;
    }
  }
  if (applies_now) {
    size_t bucket = static_cast<size_t>(
        std::min<int64_t>(plan.staleness, static_cast<int64_t>(kHistogramBuckets) - 1));
    ++histogram_[bucket];
  }
  if (advance_clock) w.clock = clock + 1;
  Settle(&plan.events);
  return plan;
}

StatusOr<Events> ConsistencyController::OnClock(int32_t worker, int64_t new_clock) {
  DV_RETURN_IF_ERROR(CheckLiveWorker(worker));
  Worker& w = workers_[static_cast<size_t>(worker)];
  if (new_clock < w.clock) {
    return InvalidArgumentError("worker " + std::to_string(worker) + " asked to set its clock to " +
                                std::to_string(new_clock) + ", below its clock " +
                                std::to_string(w.clock) + " (clocks never go back)");
  }
  Touch(worker);
  w.clock = new_clock;
  Events events;
  Settle(&events);
  return events;
}

StatusOr<PullDecision> ConsistencyController::OnPull(uint64_t ticket, int32_t worker, int64_t clock,
                                                     std::span<const std::string_view> variables,
                                                     TimePoint deadline) {
  DV_RETURN_IF_ERROR(CheckLiveWorker(worker));
  if (clock < 0) {
    return InvalidArgumentError("pull from worker " + std::to_string(worker) +
                                " has a negative clock " + std::to_string(clock));
  }
  for (const HeldPull& h : held_) {
    if (h.ticket == ticket) {
      return InvalidArgumentError("pull ticket " + std::to_string(ticket) + " is already held");
    }
  }
  Touch(worker);
  max_seen_clock_ = std::max(max_seen_clock_, clock);
  if (CanAnswerPull(clock, variables)) return PullDecision::kAnswerNow;
  HeldPull held;
  held.ticket = ticket;
  held.worker = worker;
  held.clock = clock;
  held.variables.assign(variables.begin(), variables.end());
  held.deadline = deadline;
  held.parked_at = Now();
  held_.push_back(std::move(held));
  return PullDecision::kHeld;
}

bool ConsistencyController::CancelPull(uint64_t ticket) {
  auto it = std::find_if(held_.begin(), held_.end(),
                         [ticket](const HeldPull& h) { return h.ticket == ticket; });
  if (it == held_.end()) return false;
  held_.erase(it);
  return true;
}

TimePoint ConsistencyController::DropTime(const Worker& w) const {
  return w.seen ? w.last_seen + options_.worker_timeout : start_ + options_.startup_grace;
}

void ConsistencyController::Settle(Events* events) {
  std::optional<int64_t> min = MinLiveClock();
  if (min) floor_ = std::max(floor_, *min);
  // Accumulated clocks every live worker has finished (all of them when
  // nobody is live), lowest first.
  while (!pending_.empty()) {
    auto it = pending_.begin();
    if (min && it->first >= *min) break;
    CompletedClock done;
    done.clock = it->first;
    for (auto& [name, contributors] : it->second) {
      done.updates.push_back(CompletedUpdate{name, std::move(contributors)});
    }
    events->completed.push_back(std::move(done));
    pending_.erase(it);
  }
  // Held pulls whose gate opened, in parking order.
  auto keep = held_.begin();
  for (auto it = held_.begin(); it != held_.end(); ++it) {
    if (GateOpen(it->clock, PullBound(it->clock, it->variables), min)) {
      events->released.push_back(it->ticket);
    } else {
      if (keep != it) *keep = std::move(*it);
      ++keep;
    }
  }
  held_.erase(keep, held_.end());
}

Events ConsistencyController::Tick() {
  Events events;
  const TimePoint now = Now();
  for (size_t i = 0; i < workers_.size(); ++i) {
    Worker& w = workers_[i];
    if (!w.live || now < DropTime(w)) continue;
    w.live = false;
    DroppedWorker d;
    d.worker = static_cast<int32_t>(i);
    d.clock = w.clock;
    d.never_seen = !w.seen;
    d.silent_for = now - (w.seen ? w.last_seen : start_);
    events.dropped.push_back(d);
  }
  Settle(&events);
  auto keep = held_.begin();
  for (auto it = held_.begin(); it != held_.end(); ++it) {
    if (it->deadline <= now) {
      ExpiredPull e;
      e.ticket = it->ticket;
      e.worker = it->worker;
      e.clock = it->clock;
      e.bound = PullBound(it->clock, it->variables);
      e.held_for = now - it->parked_at;
      for (size_t i = 0; i < workers_.size(); ++i) {
        const Worker& w = workers_[i];
        if (w.live && w.clock < it->clock - e.bound) {
          e.waiting_for.push_back(static_cast<int32_t>(i));
          e.their_clocks.push_back(w.clock);
        }
      }
      events.expired.push_back(std::move(e));
    } else {
      if (keep != it) *keep = std::move(*it);
      ++keep;
    }
  }
  held_.erase(keep, held_.end());
  return events;
}

TimePoint ConsistencyController::NextWakeup() const {
  TimePoint next = TimePoint::max();
  for (const Worker& w : workers_) {
    if (w.live) next = std::min(next, DropTime(w));
  }
  for (const HeldPull& h : held_) next = std::min(next, h.deadline);
  return next;
}

StatusOr<ModeChange> ConsistencyController::SetStaleness(int32_t staleness, int64_t at_clock,
                                                         std::string_view variable) {
  const bool job = variable.empty();
  const int32_t lowest = job ? kStalenessAsync : kStalenessInherit;
  const std::string what =
      job ? "job staleness" : "staleness of variable '" + std::string(variable) + "'";
  if (staleness < lowest) {
    return InvalidArgumentError(
        what + " must be " + (job ? std::string("") : std::string("-2 (inherit), ")) +
        "-1 (async), 0 (BSP) or > 0 (SSP), got " + std::to_string(staleness));
  }
  if (at_clock < -1) {
    return InvalidArgumentError("at_clock must be -1 (next clock boundary) or >= 0, got " +
                                std::to_string(at_clock));
  }
  if (at_clock == -1) at_clock = max_seen_clock_ + 1;

  // The schedules after the switch: s from at_clock on, later switches gone.
  Schedule new_job = job_schedule_;
  const Schedule* old_var = nullptr;
  Schedule new_var;
  if (job) {
    new_job.erase(new_job.lower_bound(at_clock), new_job.end());
    new_job[at_clock] = staleness;
  } else {
    auto it = var_schedules_.find(variable);
    if (it != var_schedules_.end()) {
      old_var = &it->second;
      new_var = it->second;
    }
    new_var.erase(new_var.lower_bound(at_clock), new_var.end());
    new_var[at_clock] = staleness;
  }

  // Clocks already judged may only get looser.
  if (at_clock <= max_seen_clock_) {
    std::set<int64_t> points = {at_clock};
    auto add_points = [&](const Schedule& s) {
      for (auto it = s.upper_bound(at_clock); it != s.end() && it->first <= max_seen_clock_; ++it) {
        points.insert(it->first);
      }
    };
    add_points(job_schedule_);
    if (old_var != nullptr) add_points(*old_var);
    for (int64_t c : points) {
      const int32_t before = EffectiveWith(job_schedule_, old_var, c);
      const int32_t after =
          job ? EffectiveWith(new_job, nullptr, c) : EffectiveWith(job_schedule_, &new_var, c);
      if (Rank(after) < Rank(before)) {
        return FailedPreconditionError(
            "cannot switch " + what + " from " + BoundName(before) + " to " + BoundName(after) +
            " at clock " + std::to_string(c) + ": requests up to clock " +
            std::to_string(max_seen_clock_) +
            " were already answered under the looser bound; use at_clock >= " +
            std::to_string(max_seen_clock_ + 1) + " or -1");
      }
    }
  }

  if (job) {
    job_schedule_ = std::move(new_job);
  } else {
    var_schedules_.insert_or_assign(std::string(variable), std::move(new_var));
  }

  ModeChange change;
  change.at_clock = at_clock;
  // Flush accumulations that are no longer BSP under the new schedule.
  for (auto it = pending_.lower_bound(at_clock); it != pending_.end();) {
    CompletedClock flushed;
    flushed.clock = it->first;
    flushed.flushed = true;
    auto& by_var = it->second;
    for (auto v = by_var.begin(); v != by_var.end();) {
      if (EffectiveStaleness(v->first, it->first) != 0) {
        flushed.updates.push_back(CompletedUpdate{v->first, std::move(v->second)});
        v = by_var.erase(v);
      } else {
        ++v;
      }
    }
    if (!flushed.updates.empty()) change.events.completed.push_back(std::move(flushed));
    it = by_var.empty() ? pending_.erase(it) : std::next(it);
  }
  Settle(&change.events);
  return change;
}

Status ConsistencyController::RegisterVariable(std::string_view variable, int32_t staleness) {
  if (variable.empty()) return InvalidArgumentError("RegisterVariable: empty variable name");
  if (staleness < kStalenessInherit) {
    return InvalidArgumentError("staleness of variable '" + std::string(variable) +
                                "' must be -2 (inherit), -1 (async), 0 (BSP) or > 0 (SSP), got " +
                                std::to_string(staleness));
  }
  if (var_schedules_.find(variable) != var_schedules_.end()) return OkStatus();
  var_schedules_.emplace(std::string(variable), Schedule{{0, staleness}});
  return OkStatus();
}

ControllerSnapshot ConsistencyController::Snapshot() const {
  ControllerSnapshot s;
  s.workers.reserve(workers_.size());
  for (size_t i = 0; i < workers_.size(); ++i) {
    const Worker& w = workers_[i];
    s.workers.push_back(
        WorkerSnapshot{static_cast<int32_t>(i), w.clock, w.live, w.seen, w.last_seen});
  }
  s.min_clock = MinClock();
  s.shard_clock = ShardClock();
  s.staleness = CurrentStaleness();
  s.max_seen_clock = max_seen_clock_;
  s.held_pulls = held_.size();
  s.pending_clocks = pending_.size();
  return s;
}

}  // namespace distval::ps
