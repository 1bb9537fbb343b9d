// ConsistencyController: decides when a parameter-server request may be
// answered and when a synchronous step is complete (Horovod's split: this
// class DECIDES, the server's handlers DO the work: store gradients, apply the
// optimizer, send replies).
//
// It is a pure state machine: no sockets, no threads, no sleeping. Time comes
// from an injectable clock (ConsistencyOptions::now), so tests drive it
// deterministically. Every call that can change what may be answered returns
// an Events value the caller must act on.
//
// Thread-safety: NOT thread-safe. The server calls it from its one dispatcher
// thread (externally serialized); const methods may not run concurrently with
// non-const ones either.
//
// ---------------------------------------------------------------------------
// Semantics
//
// Clocks. Worker w's clock is the number of steps it has completed on this
// shard. A push for clock c (the request's clock field) with advance_clock, or
// an AdvanceClock request, moves it to c + 1. Clocks never go back.
//
// Bounds ("staleness"): -1 async, 0 BSP, s > 0 SSP (distval::protocol's
// kStalenessAsync; kStalenessInherit = -2 is a per-variable "use the job's").
// Every variable has an EFFECTIVE bound at every clock: its override if one
// is set for that clock, else the job's. Each push and pull is judged by the
// effective bounds at the request's clock.
//
// Live set. Workers 0 .. num_workers-1 are expected. Until its first request,
// an expected worker counts as live at clock 0, so the job cannot run ahead of
// a worker that is still starting; if it says nothing for `startup_grace`
// after the controller was created, Tick() drops it like a silent worker. A
// seen worker is dropped when it has been silent for `worker_timeout` (any
// request counts as a heartbeat; a parked pull does NOT, so clients keep
// sending Heartbeat while they wait). A dropped worker is no longer waited
// for (its pushes already accumulated still count); its next request fails
// with FailedPrecondition until it says Hello; its own held pulls stay held
// under the usual rules. If no worker is live, nothing is waited for: pending
// accumulations are reported and held pulls released.
//
// Pull gate. A pull from a worker at clock c reading variables V is answered
// when, for every variable of V with effective bound b >= 0 at clock c, every
// live worker has clock >= c - b. Async variables never wait. For BSP (b = 0)
// that is "every live worker finished clock c-1", and the accumulated clock
// c-1 is reported complete in the SAME Events value, before the release.
//
// Pushes. A variable whose effective bound at the push's clock is 0 is
// ACCUMULATED for that clock (PushRoute::kAccumulate); otherwise it is
// applied now (kApplyNow). An accumulated (clock, variable) is reported in
// Events::completed once every live worker's clock is > clock (or when it is
// flushed by a mode switch, below), with the ids of the workers that pushed
// it (including ones dropped since). Clocks complete in increasing order; a
// worker may push for c+1 before c completes (it runs ahead) and the server
// must keep one accumulation per clock.
//
// Measured staleness of a push (for the staleness-aware learning rate
// lr / (1 + staleness)): (max clock among live workers) - (push's clock),
// >= 0, taken before the push's own advance_clock.
//
// Mode switch. SetStaleness(s, at_clock, variable) gives the job (or one
// variable) bound s for every clock >= at_clock, replacing any switch
// scheduled at or after at_clock. at_clock = -1 means the next clock
// boundary: (largest clock of any push or pull seen so far) + 1, so no
// request already judged changes rule. An explicit at_clock at or below a
// clock already seen is accepted only when it LOOSENS the bound there (BSP ->
// SSP/async, s -> larger s, anything -> async): then accumulated gradients of
// clocks >= at_clock that are no longer BSP are flushed (reported as
// completed with flushed = true) and held pulls are re-evaluated. Tightening
// (e.g. into BSP at t) must name a clock nobody has used yet, so clocks >= t
// are synchronous from their first request. For every shard to switch at the
// same step, the control tool should pass the same explicit at_clock to all.
//
// Read-my-writes (SSP/async) is the server's half of the contract: pushes
// from one connection are applied in arrival order, and a pull is answered
// only after every push that arrived before it on the same connection has
// been applied (or, for BSP, accumulated).
//
// ---------------------------------------------------------------------------
// Bit-exact BSP: recommended server design
//
// Keep one gradient buffer per (clock, variable, worker). A worker's second
// push for the same (clock, variable) adds into its own buffer (one
// connection delivers in order, so that is deterministic). When
// Events::completed reports (clock, variable, contributors), sum the buffers
// in the order of `contributors` (ascending worker index), divide by
// contributors.size() for kMean, apply the optimizer once, and free the
// buffers. Do NOT accumulate into a single buffer in arrival order: float
// addition is not associative and arrival order changes from run to run.
// The memory cost is (workers pushing) x (variable bytes) per clock in flight.
//
// ---------------------------------------------------------------------------
// How the server drives it (one dispatcher thread)
//
//   Hello(w)         -> OnHello(w): put the returned clock in HelloReply.clock.
//   Heartbeat(w)     -> OnHeartbeat(w).
//   Push(w, c, upd)  -> OnPush(w, c, names, advance_clock): for each update,
//                       route[i] says apply now (queue it in arrival order;
//                       scale lr by plan.staleness if stale-aware) or store it
//                       in w's buffer for (c, name); then act on plan.events.
//   AdvanceClock     -> OnClock(w, to); act on the events.
//   Pull(w, c)       -> OnPull(ticket, w, c, names, deadline): kAnswerNow ->
//                       answer (after w's earlier pushes are applied); kHeld
//                       -> keep the request under `ticket` until Events
//                       releases or expires it.
//   SetMode          -> SetStaleness(...); act on the events.
//   CreateVariable   -> RegisterVariable(name, spec.staleness).
//   periodically     -> Tick() at NextWakeup() at the latest (poll timeout).
//   Acting on Events, in this order: log `dropped`; apply `completed` in
//   order; answer `released` pulls; answer `expired` pulls with
//   DeadlineExceeded naming `waiting_for`.
//   Every reply: min_clock = MinClock(), shard_clock = ShardClock().
//   Control clients (worker_id -1) never reach the controller.
#ifndef DISTVAL_PS_CONSISTENCY_CONTROLLER_H_
#define DISTVAL_PS_CONSISTENCY_CONTROLLER_H_

#include <array>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "distval/status.h"

namespace distval::ps {

using ControllerClock = std::chrono::steady_clock;
using TimePoint = ControllerClock::time_point;
using Duration = ControllerClock::duration;

struct ConsistencyOptions {
  // Expected workers, ids 0 .. num_workers-1. Must be >= 1.
  int32_t num_workers = 1;
  // Job bound: -1 async, 0 BSP, s > 0 SSP.
  int32_t staleness = 0;
  // A seen worker silent this long is dropped. Must be > 0.
  Duration worker_timeout = std::chrono::seconds(10);
  // An expected worker never seen this long after creation is dropped.
  // Zero: worker_timeout.
  Duration startup_grace = Duration::zero();
  // The clock. Empty: ControllerClock::now.
  std::function<TimePoint()> now;
};

// One variable's accumulated gradients for one clock, ready to apply.
struct CompletedUpdate {
  std::string variable;
  // Workers that pushed it, ascending index (the reduction order). Never
  // empty. Its size is the divisor of a mean.
  std::vector<int32_t> contributors;
};

struct CompletedClock {
  int64_t clock = 0;
  // True when released early by a mode switch away from BSP rather than by
  // every live worker finishing the clock.
  bool flushed = false;
  // Sorted by variable name.
  std::vector<CompletedUpdate> updates;
};

// A held pull whose deadline passed before it could be answered.
struct ExpiredPull {
  uint64_t ticket = 0;
  int32_t worker = 0;
  int64_t clock = 0;
  // The bound that held it (>= 0).
  int32_t bound = 0;
  // Live workers whose clock is below clock - bound, ascending index.
  std::vector<int32_t> waiting_for;
  // Each one's clock, same order.
  std::vector<int64_t> their_clocks;
  Duration held_for{};
};

struct DroppedWorker {
  int32_t worker = 0;
  int64_t clock = 0;
  // True when it never sent a request (dropped by the start-up rule).
  bool never_seen = false;
  Duration silent_for{};
};

// What the server must do after a call, in field order.
struct Events {
  std::vector<DroppedWorker> dropped;
  // In the order to apply; a (clock, variable) appears once over the
  // controller's life (unless pushed again after a flush).
  std::vector<CompletedClock> completed;
  // Tickets of held pulls to answer now, in the order they were parked.
  std::vector<uint64_t> released;
  std::vector<ExpiredPull> expired;

  bool empty() const {
    return dropped.empty() && completed.empty() && released.empty() && expired.empty();
  }
};

enum class PushRoute : uint8_t {
  kApplyNow = 0,    // apply in arrival order (async/SSP)
  kAccumulate = 1,  // keep in the worker's buffer for the push's clock (BSP)
};

struct PushPlan {
  // One per variable passed to OnPush, same order.
  std::vector<PushRoute> routes;
  // Measured staleness of this push (>= 0).
  int64_t staleness = 0;
  Events events;
};

enum class PullDecision : uint8_t { kAnswerNow = 0, kHeld = 1 };

struct ModeChange {
  // The clock from which the new bound applies (at_clock resolved).
  int64_t at_clock = 0;
  Events events;
};

struct WorkerSnapshot {
  int32_t worker = 0;
  int64_t clock = 0;
  bool live = true;
  bool seen = false;
  TimePoint last_seen{};  // creation time until seen
};

struct ControllerSnapshot {
  std::vector<WorkerSnapshot> workers;  // by index
  int64_t min_clock = 0;
  int64_t shard_clock = 0;
  int32_t staleness = 0;        // job bound at min_clock
  int64_t max_seen_clock = -1;  // largest clock of a push or pull, -1 if none
  size_t held_pulls = 0;
  size_t pending_clocks = 0;  // clocks with accumulated, unreported gradients
};

class ConsistencyController {
 public:
  // Buckets of StalenessHistogram(): 0 .. kHistogramBuckets-2 exactly, the
  // last one counts every larger staleness.
  static constexpr size_t kHistogramBuckets = 65;

  // InvalidArgument for num_workers < 1, staleness < -1, or a non-positive
  // worker_timeout / negative startup_grace.
  static StatusOr<std::unique_ptr<ConsistencyController>> Create(ConsistencyOptions options);

  ConsistencyController(const ConsistencyController&) = delete;
  ConsistencyController& operator=(const ConsistencyController&) = delete;

  // ---- Checkpoint restore ----
  // Sets every worker's clock (clocks[w] for worker w; all live, none seen
  // yet, their timeouts counted from now) and the job staleness (from clock
  // 0 on, per-variable overrides kept), as read from a checkpoint. Only
  // before any request has been handled: FailedPrecondition otherwise;
  // InvalidArgument when clocks.size() != num_workers (naming both), for a
  // negative clock or an invalid staleness.
  Status RestoreClocks(std::span<const int64_t> clocks, int32_t staleness);

  // ---- Requests (each one is also a heartbeat of `worker`) ----
  // Errors common to all: InvalidArgument for a worker id outside
  // [0, num_workers); FailedPrecondition for a worker that was dropped and
  // has not said Hello since (OnHello excepted).

  // Registers `worker` (or re-registers it) and returns the clock at which it
  // (re)joins: a live worker keeps its own clock; a dropped one rejoins at
  // max(its last clock, MinClock()) and becomes live again. Never releases
  // or completes anything.
  StatusOr<int64_t> OnHello(int32_t worker);

  Status OnHeartbeat(int32_t worker);

  // A push from `worker` for `clock` carrying one update per entry of
  // `variables` (duplicates allowed). A clock above the worker's raises its
  // clock first (it advanced without telling this shard); then, with
  // advance_clock, its clock becomes clock + 1. The caller stores or queues
  // the updates per plan.routes BEFORE acting on plan.events (they may
  // complete `clock` itself). FailedPrecondition if clock is below the
  // worker's clock (a step already finished); InvalidArgument if negative.
  // The errors OnPush(worker, clock, ...) would return, without changing
  // anything (so that a push can be applied before it is routed).
  Status CheckPush(int32_t worker, int64_t clock) const;
  StatusOr<PushPlan> OnPush(int32_t worker, int64_t clock,
                            std::span<const std::string_view> variables, bool advance_clock);

  // Sets the worker's clock to `new_clock` (AdvanceClock; resolve to = -1 to
  // request clock + 1 before calling). Equal: no-op. InvalidArgument if
  // below the worker's clock.
  StatusOr<Events> OnClock(int32_t worker, int64_t new_clock);

  // A pull from `worker` at `clock` reading `variables` (empty: judged by the
  // job bound). kAnswerNow: answer it. kHeld: the controller keeps `ticket`
  // (a caller-chosen id, unique among held pulls) until it appears in some
  // Events::released, or Events::expired once `deadline` has passed (checked
  // by Tick). InvalidArgument for a negative clock or a ticket already held.
  StatusOr<PullDecision> OnPull(uint64_t ticket, int32_t worker, int64_t clock,
                                std::span<const std::string_view> variables, TimePoint deadline);

  // Forgets a held pull (its connection went away). False if not held.
  bool CancelPull(uint64_t ticket);

  // Drops silent workers, then releases what that allows, then expires held
  // pulls whose deadline is <= now. Call it at NextWakeup() at the latest.
  Events Tick();

  // Earliest time at which Tick() could change something (a worker timeout
  // or a held pull's deadline); TimePoint::max() if none.
  TimePoint NextWakeup() const;

  // ---- Mode ----

  // Gives the job (variable empty) or `variable` the bound `staleness` for
  // every clock >= at_clock (see "Mode switch" above). A variable accepts
  // kStalenessInherit (-2) to fall back to the job's. Returns the resolved
  // at_clock and the flushes / releases the switch caused. Errors:
  // InvalidArgument for a bound out of range or at_clock < -1;
  // FailedPrecondition for a tightening switch at a clock already seen (the
  // message names the first clock that would be accepted).
  StatusOr<ModeChange> SetStaleness(int32_t staleness, int64_t at_clock,
                                    std::string_view variable = {});

  // Gives a new variable its creation-time bound (VariableSpec.staleness)
  // for all clocks. No-op if `variable` already has a bound (created before
  // or switched by SetStaleness). InvalidArgument for staleness < -2.
  Status RegisterVariable(std::string_view variable, int32_t staleness);

  // ---- Queries ----

  // Effective bound of `variable` (unknown or empty: the job's) at `clock`:
  // -1 async, 0 BSP, s > 0 SSP.
  int32_t EffectiveStaleness(std::string_view variable, int64_t clock) const;
  // The job bound at `clock`.
  int32_t JobStaleness(int64_t clock) const;
  // The job bound at MinClock() (what HelloReply/StatsReply report).
  int32_t CurrentStaleness() const;

  // Whether a pull at `clock` reading `variables` could be answered now
  // (the test OnPull applies; no heartbeat, nothing recorded).
  bool CanAnswerPull(int64_t clock, std::span<const std::string_view> variables) const;

  // Smallest clock among live workers (the last such value while none is
  // live). Never decreases.
  int64_t MinClock() const;
  // BSP job: number of clocks fully applied (= MinClock(), once the caller
  // has applied the reported completions). Otherwise the largest worker
  // clock.
  int64_t ShardClock() const;
  // Largest clock among live workers (among all workers while none is live).
  int64_t MaxClock() const;
  // max(0, MaxClock() - clock): the staleness a push for `clock` would have.
  int64_t StalenessOf(int64_t clock) const;

  // Counts of measured staleness of pushes that had at least one kApplyNow
  // update; bucket i counts staleness i, the last bucket everything larger.
  std::span<const uint64_t> StalenessHistogram() const { return histogram_; }

  ControllerSnapshot Snapshot() const;

  size_t num_held_pulls() const { return held_.size(); }
  int32_t num_workers() const { return static_cast<int32_t>(workers_.size()); }

  // The stricter of two bounds (async = -1 is the loosest).
  static int32_t StricterBound(int32_t a, int32_t b);

 private:
  struct Worker {
    int64_t clock = 0;
    TimePoint last_seen{};
    bool live = true;
    bool seen = false;
  };
  struct HeldPull {
    uint64_t ticket = 0;
    int32_t worker = 0;
    int64_t clock = 0;
    std::vector<std::string> variables;
    TimePoint deadline{};
    TimePoint parked_at{};
  };
  using Schedule = std::map<int64_t, int32_t>;  // from clock -> bound
  // clock -> variable -> contributors (ascending)
  using Pending = std::map<int64_t, std::map<std::string, std::vector<int32_t>, std::less<>>>;

  explicit ConsistencyController(ConsistencyOptions options);

  TimePoint Now() const;
  // InvalidArgument / FailedPrecondition as documented above.
  Status CheckLiveWorker(int32_t worker) const;
  Status CheckWorkerId(int32_t worker) const;
  void Touch(int32_t worker);
  std::optional<int64_t> MinLiveClock() const;
  std::optional<int64_t> MaxLiveClock() const;
  template <typename Names>
  int32_t PullBound(int64_t clock, const Names& variables) const;
  // Whether a pull at `clock` held by `bound` may be answered when the
  // smallest live clock is `min_live` (nullopt: nobody is live, nothing to
  // wait for).
  static bool GateOpen(int64_t clock, int32_t bound, std::optional<int64_t> min_live);
  int32_t EffectiveWith(const Schedule& job, const Schedule* var, int64_t clock) const;
  TimePoint DropTime(const Worker& w) const;
  // Reports accumulations every live worker has passed and releases held
  // pulls whose gate opened.
  void Settle(Events* events);

  ConsistencyOptions options_;
  TimePoint start_;
  std::vector<Worker> workers_;
  int64_t floor_ = 0;            // last MinLiveClock()
  int64_t max_seen_clock_ = -1;  // largest clock of a push or pull
  Schedule job_schedule_;
  std::map<std::string, Schedule, std::less<>> var_schedules_;
  Pending pending_;
  std::vector<HeldPull> held_;  // in parking order
  std::array<uint64_t, kHistogramBuckets> histogram_{};
};

}  // namespace distval::ps

#endif  // DISTVAL_PS_CONSISTENCY_CONTROLLER_H_
