#include "consistency_controller.h"

#include <gtest/gtest.h>

#include <chrono>
#include <initializer_list>
#include <memory>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "distval/protocol.h"

namespace distval::ps {
namespace {

using std::chrono::milliseconds;
using std::chrono::seconds;

constexpr int32_t kAsync = protocol::kStalenessAsync;
constexpr int32_t kInherit = protocol::kStalenessInherit;

// (clock, variable, contributors, flushed) flattened out of Events::completed.
struct Done {
  int64_t clock;
  std::string variable;
  std::vector<int32_t> contributors;
  bool flushed;
  friend bool operator==(const Done&, const Done&) = default;
};

std::ostream& operator<<(std::ostream& os, const Done& d) {
  os << "{clock " << d.clock << " " << d.variable << " [";
  for (int32_t w : d.contributors) os << w << " ";
  return os << "]" << (d.flushed ? " flushed" : "") << "}";
}

std::vector<Done> Flatten(const Events& events) {
  std::vector<Done> out;
  for (const CompletedClock& c : events.completed) {
    for (const CompletedUpdate& u : c.updates) {
      out.push_back(Done{c.clock, u.variable, u.contributors, c.flushed});
    }
  }
  return out;
}

class ControllerTest : public ::testing::Test {
 protected:
  // Starts a controller at fake time t0 and says Hello for every worker.
  void Start(int32_t num_workers, int32_t staleness, bool hello_all = true,
             Duration timeout = seconds(10), Duration grace = Duration::zero()) {
    ConsistencyOptions options;
    options.num_workers = num_workers;
    options.staleness = staleness;
    options.worker_timeout = timeout;
    options.startup_grace = grace;
    options.now = [this] { return now_; };
    auto created = ConsistencyController::Create(std::move(options));
    ASSERT_TRUE(created.ok()) << created.status();
    ctl_ = std::move(created).value();
    if (hello_all) {
      for (int32_t w = 0; w < num_workers; ++w) {
        auto clock = ctl_->OnHello(w);
        ASSERT_TRUE(clock.ok()) << clock.status();
        ASSERT_EQ(*clock, 0);
      }
    }
  }

  PushPlan Push(int32_t worker, int64_t clock, std::vector<std::string_view> vars = {"w"},
                bool advance = true) {
    auto plan = ctl_->OnPush(worker, clock, vars, advance);
    EXPECT_TRUE(plan.ok()) << plan.status();
    return plan.ok() ? std::move(plan).value() : PushPlan{};
  }

  PullDecision Pull(uint64_t ticket, int32_t worker, int64_t clock,
                    std::vector<std::string_view> vars = {"w"}, Duration wait = seconds(3600)) {
    auto d = ctl_->OnPull(ticket, worker, clock, vars, now_ + wait);
    EXPECT_TRUE(d.ok()) << d.status();
    return d.ok() ? *d : PullDecision::kHeld;
  }

  Events Clock(int32_t worker, int64_t to) {
    auto e = ctl_->OnClock(worker, to);
    EXPECT_TRUE(e.ok()) << e.status();
    return e.ok() ? std::move(e).value() : Events{};
  }

  void HeartbeatAll(std::initializer_list<int32_t> workers) {
    for (int32_t w : workers) ASSERT_TRUE(ctl_->OnHeartbeat(w).ok());
  }

  TimePoint t0_ = TimePoint{} + seconds(1000);
  TimePoint now_ = t0_;
  std::unique_ptr<ConsistencyController> ctl_;
};

// ---------------------------------------------------------------- options

TEST_F(ControllerTest, CreateRejectsBadOptions) {
  ConsistencyOptions o;
  o.num_workers = 0;
  EXPECT_EQ(ConsistencyController::Create(o).status().code(), StatusCode::kInvalidArgument);
  o.num_workers = 2;
  o.staleness = -2;
  EXPECT_EQ(ConsistencyController::Create(o).status().code(), StatusCode::kInvalidArgument);
  o.staleness = 0;
  o.worker_timeout = Duration::zero();
  EXPECT_EQ(ConsistencyController::Create(o).status().code(), StatusCode::kInvalidArgument);
  o.worker_timeout = seconds(1);
  EXPECT_TRUE(ConsistencyController::Create(o).ok());
}

TEST_F(ControllerTest, RestoreClocksSetsClocksAndStalenessOnlyBeforeServing) {
  ConsistencyOptions o;
  o.num_workers = 3;
  o.staleness = 0;
  auto c = ConsistencyController::Create(o);
  ASSERT_TRUE(c.ok());
  const std::vector<int64_t> wrong = {1, 2};
  EXPECT_EQ((*c)->RestoreClocks(wrong, 0).code(), StatusCode::kInvalidArgument);
  const std::vector<int64_t> negative = {1, -2, 3};
  EXPECT_EQ((*c)->RestoreClocks(negative, 0).code(), StatusCode::kInvalidArgument);
  const std::vector<int64_t> clocks = {5, 7, 6};
  ASSERT_TRUE((*c)->RestoreClocks(clocks, 2).ok());
  EXPECT_EQ((*c)->MinClock(), 5);
  EXPECT_EQ((*c)->CurrentStaleness(), 2);
  auto hello = (*c)->OnHello(1);
  ASSERT_TRUE(hello.ok());
  EXPECT_EQ(*hello, 7);
  EXPECT_EQ((*c)->RestoreClocks(clocks, 2).code(), StatusCode::kFailedPrecondition);
}

TEST_F(ControllerTest, RejectsUnknownWorkersAndBackwardClocks) {
  Start(2, 0);
  auto bad = ctl_->OnHello(2);
  EXPECT_EQ(bad.status().code(), StatusCode::kInvalidArgument);
  EXPECT_NE(bad.status().message().find("worker id 2"), std::string::npos);
  EXPECT_EQ(ctl_->OnHeartbeat(-1).code(), StatusCode::kInvalidArgument);

  Push(0, 0);  // worker 0 now at clock 1
  std::vector<std::string_view> vars = {"w"};
  auto stale = ctl_->OnPush(0, 0, vars, true);
  EXPECT_EQ(stale.status().code(), StatusCode::kFailedPrecondition);
  EXPECT_EQ(ctl_->OnClock(0, 0).status().code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(ctl_->OnPull(1, 0, -1, vars, now_).status().code(), StatusCode::kInvalidArgument);
}

// ---------------------------------------------------------------- BSP

TEST_F(ControllerTest, BspHoldsPullUntilEveryWorkerPushedAndListsContributorsInIndexOrder) {
  Start(3, 0);
  // Arrival order 2, 0, 1: contributors must still be 0, 1, 2.
  PushPlan p2 = Push(2, 0);
  ASSERT_EQ(p2.routes.size(), 1u);
  EXPECT_EQ(p2.routes[0], PushRoute::kAccumulate);
  EXPECT_TRUE(p2.events.empty());
  EXPECT_EQ(Pull(7, 2, 1), PullDecision::kHeld);

  PushPlan p0 = Push(0, 0);
  EXPECT_TRUE(p0.events.empty());
  EXPECT_EQ(ctl_->num_held_pulls(), 1u);
  EXPECT_EQ(ctl_->MinClock(), 0);
  EXPECT_EQ(ctl_->ShardClock(), 0);

  PushPlan p1 = Push(1, 0);  // the last one
  EXPECT_EQ(Flatten(p1.events), (std::vector<Done>{{0, "w", {0, 1, 2}, false}}));
  EXPECT_EQ(p1.events.released, (std::vector<uint64_t>{7}));
  EXPECT_EQ(ctl_->num_held_pulls(), 0u);
  EXPECT_EQ(ctl_->MinClock(), 1);
  EXPECT_EQ(ctl_->ShardClock(), 1);
  // Clock 1 pulls are answered without waiting now.
  EXPECT_EQ(Pull(8, 0, 1), PullDecision::kAnswerNow);
  // ... but clock 2 pulls wait for clock 1.
  EXPECT_EQ(Pull(9, 0, 2), PullDecision::kHeld);
}

TEST_F(ControllerTest, BspPushWithoutAdvanceDoesNotCompleteUntilClockRequest) {
  Start(2, 0);
  Push(0, 0);
  PushPlan p = Push(1, 0, {"w"}, /*advance=*/false);
  EXPECT_TRUE(p.events.completed.empty());
  Events e = Clock(1, 1);
  EXPECT_EQ(Flatten(e), (std::vector<Done>{{0, "w", {0, 1}, false}}));
}

TEST_F(ControllerTest, BspWorkerRunningAheadCompletesClocksInOrder) {
  Start(2, 0);
  // Worker 0 (a raw client) pushes for clocks 0 and 1 before worker 1 does
  // anything; its pull at 2 waits.
  EXPECT_EQ(Push(0, 0).routes[0], PushRoute::kAccumulate);
  EXPECT_EQ(Push(0, 1).routes[0], PushRoute::kAccumulate);
  EXPECT_EQ(Pull(1, 0, 2), PullDecision::kHeld);
  EXPECT_EQ(ctl_->Snapshot().pending_clocks, 2u);

  // Worker 1 pushes 0 without advancing, then jumps to clock 2 with an
  // AdvanceClock: both clocks complete in one go, in order; clock 1 had
  // only worker 0's gradient.
  PushPlan p = Push(1, 0, {"w"}, false);
  EXPECT_TRUE(p.events.empty());
  Events e = Clock(1, 2);
  EXPECT_EQ(Flatten(e), (std::vector<Done>{{0, "w", {0, 1}, false}, {1, "w", {0}, false}}));
  EXPECT_EQ(e.released, (std::vector<uint64_t>{1}));
  EXPECT_EQ(ctl_->MinClock(), 2);
}

TEST_F(ControllerTest, BspClockCompletesOneAtATimeWhenTheLaggardCatchesUp) {
  Start(2, 0);
  Push(0, 0);
  Push(0, 1);
  EXPECT_EQ(Pull(1, 0, 2), PullDecision::kHeld);
  PushPlan a = Push(1, 0);
  EXPECT_EQ(Flatten(a.events), (std::vector<Done>{{0, "w", {0, 1}, false}}));
  EXPECT_TRUE(a.events.released.empty());  // clock 1 not complete yet
  PushPlan b = Push(1, 1);
  EXPECT_EQ(Flatten(b.events), (std::vector<Done>{{1, "w", {0, 1}, false}}));
  EXPECT_EQ(b.events.released, (std::vector<uint64_t>{1}));
}

// ---------------------------------------------------------------- SSP / async

TEST_F(ControllerTest, SspGateOpensExactlyAtClockMinusStaleness) {
  Start(3, 2);
  // Worker 0 runs ahead: pushes apply immediately.
  for (int64_t c = 0; c < 5; ++c) EXPECT_EQ(Push(0, c).routes[0], PushRoute::kApplyNow);
  Clock(2, 3);
  // Worker 1 is at 0. A pull at 2 needs everyone >= 0: answered.
  EXPECT_EQ(Pull(1, 0, 2), PullDecision::kAnswerNow);
  // A pull at 5 needs everyone >= 3: worker 1 at 0 (c-s-3) holds it.
  EXPECT_EQ(Pull(2, 0, 5), PullDecision::kHeld);
  EXPECT_TRUE(Clock(1, 1).released.empty());
  // At c - s - 1 = 2 it is still held...
  EXPECT_TRUE(Clock(1, 2).released.empty());
  EXPECT_EQ(ctl_->num_held_pulls(), 1u);
  // ... and at exactly c - s = 3 it is released.
  Events e = Clock(1, 3);
  EXPECT_EQ(e.released, (std::vector<uint64_t>{2}));
  EXPECT_TRUE(e.completed.empty());  // nothing accumulates under SSP
  EXPECT_EQ(ctl_->MinClock(), 3);
  EXPECT_EQ(ctl_->ShardClock(), 5);  // not BSP: the largest worker clock
}

TEST_F(ControllerTest, AsyncNeverWaits) {
  Start(2, kAsync);
  for (int64_t c = 0; c < 50; ++c) {
    PushPlan p = Push(0, c);
    EXPECT_EQ(p.routes[0], PushRoute::kApplyNow);
    EXPECT_TRUE(p.events.empty());
  }
  EXPECT_EQ(Pull(1, 0, 50), PullDecision::kAnswerNow);
  EXPECT_TRUE(ctl_->CanAnswerPull(1000000, {}));
  EXPECT_EQ(ctl_->num_held_pulls(), 0u);
  EXPECT_EQ(ctl_->MinClock(), 0);
}

TEST_F(ControllerTest, MeasuresStalenessAgainstTheFastestLiveWorker) {
  Start(3, kAsync);
  // A single push and its own advance: staleness 0, not 1.
  EXPECT_EQ(Push(0, 0).staleness, 0);
  Clock(0, 5);
  Clock(2, 4);
  EXPECT_EQ(ctl_->StalenessOf(2), 3);
  PushPlan p = Push(1, 2);  // worker 0 is at 5
  EXPECT_EQ(p.staleness, 3);
  EXPECT_EQ(Push(0, 5).staleness, 0);
  EXPECT_EQ(ctl_->StalenessOf(7), 0);  // never negative

  auto hist = ctl_->StalenessHistogram();
  ASSERT_EQ(hist.size(), ConsistencyController::kHistogramBuckets);
  EXPECT_EQ(hist[0], 2u);
  EXPECT_EQ(hist[3], 1u);
  uint64_t total = 0;
  for (uint64_t n : hist) total += n;
  EXPECT_EQ(total, 3u);

  // Huge staleness lands in the last bucket.
  Clock(0, 1000);
  EXPECT_EQ(Push(2, 4).staleness, 996);
  EXPECT_EQ(ctl_->StalenessHistogram().back(), 1u);

  // A dropped worker no longer counts as the fastest: silence worker 0.
  now_ += seconds(9);
  HeartbeatAll({1, 2});
  now_ += seconds(2);
  Events e = ctl_->Tick();
  ASSERT_EQ(e.dropped.size(), 1u);
  EXPECT_EQ(e.dropped[0].worker, 0);
  EXPECT_EQ(ctl_->StalenessOf(3), 2);  // max live clock is worker 2's 5
}

TEST_F(ControllerTest, BspPushesAreNotCountedInTheStalenessHistogram) {
  Start(1, 0);
  Push(0, 0);
  for (uint64_t n : ctl_->StalenessHistogram()) EXPECT_EQ(n, 0u);
}

// ---------------------------------------------------------------- membership

TEST_F(ControllerTest, SilentWorkerIsDroppedAfterTimeoutAndItsDropCompletesTheBspClock) {
  Start(3, 0, true, seconds(10));
  now_ += seconds(1);
  Push(0, 0);
  Push(1, 0);
  EXPECT_EQ(Pull(5, 0, 1), PullDecision::kHeld);
  EXPECT_EQ(Pull(6, 1, 1), PullDecision::kHeld);

  // Worker 2 was last heard at t0: not dropped 1 ms before t0 + 10 s.
  now_ = t0_ + seconds(10) - milliseconds(1);
  Events before = ctl_->Tick();
  EXPECT_TRUE(before.empty());
  EXPECT_EQ(ctl_->NextWakeup(), t0_ + seconds(10));

  now_ = t0_ + seconds(10);
  Events e = ctl_->Tick();
  ASSERT_EQ(e.dropped.size(), 1u);
  EXPECT_EQ(e.dropped[0].worker, 2);
  EXPECT_EQ(e.dropped[0].clock, 0);
  EXPECT_FALSE(e.dropped[0].never_seen);
  EXPECT_EQ(e.dropped[0].silent_for, seconds(10));
  // Averaged over the two that did push.
  EXPECT_EQ(Flatten(e), (std::vector<Done>{{0, "w", {0, 1}, false}}));
  EXPECT_EQ(e.released, (std::vector<uint64_t>{5, 6}));
  EXPECT_EQ(ctl_->MinClock(), 1);

  ControllerSnapshot s = ctl_->Snapshot();
  ASSERT_EQ(s.workers.size(), 3u);
  EXPECT_TRUE(s.workers[0].live);
  EXPECT_FALSE(s.workers[2].live);
  EXPECT_TRUE(s.workers[2].seen);

  // The next clock does not wait for the dropped worker.
  Push(0, 1);
  PushPlan p = Push(1, 1);
  EXPECT_EQ(Flatten(p.events), (std::vector<Done>{{1, "w", {0, 1}, false}}));
}

TEST_F(ControllerTest, DroppedPusherStillCountsAsContributor) {
  Start(3, 0, true, seconds(10));
  Push(2, 0);  // worker 2 pushes, then falls silent
  now_ += seconds(6);
  Push(0, 0);
  HeartbeatAll({1});
  now_ += seconds(5);
  Events e = ctl_->Tick();
  ASSERT_EQ(e.dropped.size(), 1u);
  EXPECT_EQ(e.dropped[0].worker, 2);
  EXPECT_TRUE(e.completed.empty());  // worker 1 has not pushed clock 0
  PushPlan p = Push(1, 0);
  EXPECT_EQ(Flatten(p.events), (std::vector<Done>{{0, "w", {0, 1, 2}, false}}));
}

TEST_F(ControllerTest, DroppedWorkerMustSayHelloAndRejoinsAtTheJobClock) {
  Start(3, 0, true, seconds(10));
  for (int64_t c = 0; c < 3; ++c) {
    now_ += seconds(4);
    Push(0, c);
    Push(1, c);
    if (c == 0) Push(2, 0);  // worker 2 finishes step 0, then dies
    EXPECT_TRUE(ctl_->Tick().dropped.empty());
  }
  now_ += seconds(4);  // 12 s after worker 2's last request
  HeartbeatAll({0, 1});
  Events drop = ctl_->Tick();
  ASSERT_EQ(drop.dropped.size(), 1u);
  EXPECT_EQ(Flatten(drop), (std::vector<Done>{{1, "w", {0, 1}, false}, {2, "w", {0, 1}, false}}));
  EXPECT_FALSE(ctl_->Snapshot().workers[2].live);
  EXPECT_EQ(ctl_->MinClock(), 3);

  // Requests from a dropped worker fail until it says Hello.
  Status hb = ctl_->OnHeartbeat(2);
  EXPECT_EQ(hb.code(), StatusCode::kFailedPrecondition);
  EXPECT_NE(hb.message().find("Hello"), std::string::npos);
  std::vector<std::string_view> vars = {"w"};
  EXPECT_EQ(ctl_->OnPush(2, 1, vars, true).status().code(), StatusCode::kFailedPrecondition);

  auto join = ctl_->OnHello(2);
  ASSERT_TRUE(join.ok());
  EXPECT_EQ(*join, 3);  // the job's clock, not its own 1
  EXPECT_TRUE(ctl_->Snapshot().workers[2].live);
  // It is waited for again.
  Push(0, 3);
  PushPlan p1 = Push(1, 3);
  EXPECT_TRUE(p1.events.completed.empty());
  PushPlan p2 = Push(2, 3);
  EXPECT_EQ(Flatten(p2.events), (std::vector<Done>{{3, "w", {0, 1, 2}, false}}));

  // A live worker that says Hello again keeps its own clock.
  Push(0, 4);
  auto again = ctl_->OnHello(0);
  ASSERT_TRUE(again.ok());
  EXPECT_EQ(*again, 5);
}

TEST_F(ControllerTest, RejoinNeverGoesBehindTheWorkersOwnClock) {
  Start(2, kAsync, true, seconds(10));
  Clock(1, 7);
  now_ += seconds(6);
  HeartbeatAll({0});
  now_ += seconds(5);
  Events e = ctl_->Tick();
  ASSERT_EQ(e.dropped.size(), 1u);
  auto join = ctl_->OnHello(1);
  ASSERT_TRUE(join.ok());
  EXPECT_EQ(*join, 7);  // worker 0 is at 0, but worker 1 finished 7 steps
}

TEST_F(ControllerTest, WorkerThatNeverSaysHelloBlocksOnlyUntilTheStartupGrace) {
  Start(3, 0, /*hello_all=*/false, seconds(10));
  ASSERT_TRUE(ctl_->OnHello(0).ok());
  ASSERT_TRUE(ctl_->OnHello(1).ok());
  now_ += seconds(2);
  Push(0, 0);
  Push(1, 0);
  // Worker 2 never said hello but is expected: clock 0 waits for it.
  EXPECT_EQ(Pull(1, 0, 1), PullDecision::kHeld);
  EXPECT_EQ(ctl_->MinClock(), 0);

  now_ = t0_ + seconds(10) - milliseconds(1);
  EXPECT_TRUE(ctl_->Tick().empty());
  now_ = t0_ + seconds(10);
  Events e = ctl_->Tick();
  ASSERT_EQ(e.dropped.size(), 1u);
  EXPECT_EQ(e.dropped[0].worker, 2);
  EXPECT_TRUE(e.dropped[0].never_seen);
  EXPECT_EQ(Flatten(e), (std::vector<Done>{{0, "w", {0, 1}, false}}));
  EXPECT_EQ(e.released, (std::vector<uint64_t>{1}));

  // Late arrival: joins at the job's clock.
  auto join = ctl_->OnHello(2);
  ASSERT_TRUE(join.ok());
  EXPECT_EQ(*join, 1);
}

TEST_F(ControllerTest, StartupGraceCanBeLongerThanTheWorkerTimeout) {
  Start(2, 0, false, seconds(10), seconds(60));
  ASSERT_TRUE(ctl_->OnHello(0).ok());
  for (int i = 0; i < 5; ++i) {
    now_ += seconds(9);
    HeartbeatAll({0});
    EXPECT_TRUE(ctl_->Tick().dropped.empty());
  }
  now_ = t0_ + seconds(60);
  HeartbeatAll({0});
  Events e = ctl_->Tick();
  ASSERT_EQ(e.dropped.size(), 1u);
  EXPECT_EQ(e.dropped[0].worker, 1);
}

TEST_F(ControllerTest, WhenEveryWorkerIsGoneAccumulationsAreReported) {
  Start(2, 0, true, seconds(10));
  Push(0, 0, {"w"}, false);
  now_ += seconds(10);
  Events e = ctl_->Tick();
  EXPECT_EQ(e.dropped.size(), 2u);
  EXPECT_EQ(Flatten(e), (std::vector<Done>{{0, "w", {0}, false}}));
  EXPECT_EQ(ctl_->MinClock(), 0);
  EXPECT_EQ(ctl_->NextWakeup(), TimePoint::max());
}

// ---------------------------------------------------------------- deadlines

TEST_F(ControllerTest, HeldPullExpiresAtItsDeadlineNamingTheLaggards) {
  Start(4, 1, true, seconds(60));
  Clock(0, 3);
  Clock(1, 1);
  Clock(2, 2);
  Clock(3, 0);
  // Pull at 3 with bound 1 needs everyone >= 2: workers 1 and 3 lag.
  EXPECT_EQ(Pull(42, 0, 3, {"w"}, seconds(5)), PullDecision::kHeld);
  EXPECT_EQ(ctl_->NextWakeup(), t0_ + seconds(5));

  now_ = t0_ + seconds(5) - milliseconds(1);
  EXPECT_TRUE(ctl_->Tick().empty());
  now_ = t0_ + seconds(5);
  Events e = ctl_->Tick();
  EXPECT_TRUE(e.released.empty());
  ASSERT_EQ(e.expired.size(), 1u);
  EXPECT_EQ(e.expired[0].ticket, 42u);
  EXPECT_EQ(e.expired[0].worker, 0);
  EXPECT_EQ(e.expired[0].clock, 3);
  EXPECT_EQ(e.expired[0].bound, 1);
  EXPECT_EQ(e.expired[0].waiting_for, (std::vector<int32_t>{1, 3}));
  EXPECT_EQ(e.expired[0].their_clocks, (std::vector<int64_t>{1, 0}));
  EXPECT_EQ(e.expired[0].held_for, seconds(5));
  EXPECT_EQ(ctl_->num_held_pulls(), 0u);
  // Expired means forgotten: advancing the laggards releases nothing.
  Clock(1, 2);
  EXPECT_TRUE(Clock(3, 2).released.empty());
}

TEST_F(ControllerTest, PullThatBecomesAnswerableOnItsDeadlineTickIsReleasedNotExpired) {
  Start(2, 0, true, seconds(10));
  Push(0, 0);
  EXPECT_EQ(Pull(1, 0, 1, {"w"}, seconds(10)), PullDecision::kHeld);
  now_ = t0_ + seconds(10);
  HeartbeatAll({0});
  Events e = ctl_->Tick();  // drops worker 1 and reaches the deadline
  EXPECT_EQ(e.released, (std::vector<uint64_t>{1}));
  EXPECT_TRUE(e.expired.empty());
}

TEST_F(ControllerTest, CancelAndDuplicateTickets) {
  Start(2, 0);
  Push(0, 0);
  EXPECT_EQ(Pull(1, 0, 1), PullDecision::kHeld);
  std::vector<std::string_view> vars = {"w"};
  EXPECT_EQ(ctl_->OnPull(1, 0, 1, vars, now_).status().code(), StatusCode::kInvalidArgument);
  EXPECT_TRUE(ctl_->CancelPull(1));
  EXPECT_FALSE(ctl_->CancelPull(1));
  PushPlan p = Push(1, 0);
  EXPECT_EQ(p.events.completed.size(), 1u);
  EXPECT_TRUE(p.events.released.empty());
}

// ---------------------------------------------------------------- mode switch

TEST_F(ControllerTest, ScheduledSwitchesBspSspAsyncBspApplyFromTheirClock) {
  Start(2, 0);
  auto a = ctl_->SetStaleness(2, 2);
  ASSERT_TRUE(a.ok()) << a.status();
  EXPECT_EQ(a->at_clock, 2);
  ASSERT_TRUE(ctl_->SetStaleness(kAsync, 4).ok());
  ASSERT_TRUE(ctl_->SetStaleness(0, 6).ok());
  const std::vector<int32_t> expected = {0, 0, 2, 2, kAsync, kAsync, 0, 0};
  for (int64_t c = 0; c < 8; ++c) EXPECT_EQ(ctl_->JobStaleness(c), expected[c]) << c;

  // Worker 0 runs through all modes while worker 1 sits at clock 0.
  EXPECT_EQ(Push(0, 0).routes[0], PushRoute::kAccumulate);  // BSP
  EXPECT_EQ(Pull(10, 0, 1), PullDecision::kHeld);           // BSP: waits for 0
  EXPECT_EQ(Push(0, 1).routes[0], PushRoute::kAccumulate);  // BSP
  EXPECT_EQ(Pull(11, 0, 2), PullDecision::kAnswerNow);      // SSP 2: needs >= 0
  EXPECT_EQ(Push(0, 2).routes[0], PushRoute::kApplyNow);    // SSP
  EXPECT_EQ(Pull(12, 0, 3), PullDecision::kHeld);           // SSP 2: needs >= 1
  EXPECT_EQ(Push(0, 3).routes[0], PushRoute::kApplyNow);
  EXPECT_EQ(Pull(13, 0, 4), PullDecision::kAnswerNow);  // async
  EXPECT_EQ(Push(0, 4).routes[0], PushRoute::kApplyNow);
  EXPECT_EQ(Push(0, 5).routes[0], PushRoute::kApplyNow);
  EXPECT_EQ(Pull(14, 0, 6), PullDecision::kHeld);           // BSP: needs >= 6
  EXPECT_EQ(Push(0, 6).routes[0], PushRoute::kAccumulate);  // BSP again

  PushPlan b0 = Push(1, 0);
  EXPECT_EQ(Flatten(b0.events), (std::vector<Done>{{0, "w", {0, 1}, false}}));
  // Clock 1 under BSP, clock 3 under SSP 2 (needs everyone >= 1).
  EXPECT_EQ(b0.events.released, (std::vector<uint64_t>{10, 12}));
  PushPlan b1 = Push(1, 1);
  EXPECT_EQ(Flatten(b1.events), (std::vector<Done>{{1, "w", {0, 1}, false}}));
  EXPECT_TRUE(b1.events.released.empty());
  for (int64_t c = 2; c < 5; ++c) {
    PushPlan p = Push(1, c);
    EXPECT_EQ(p.routes[0], PushRoute::kApplyNow);
    EXPECT_TRUE(p.events.empty());
  }
  PushPlan b5 = Push(1, 5);
  EXPECT_TRUE(b5.events.completed.empty());  // clocks 2..5 accumulated nothing
  EXPECT_EQ(b5.events.released, (std::vector<uint64_t>{14}));
  PushPlan b6 = Push(1, 6);
  EXPECT_EQ(Flatten(b6.events), (std::vector<Done>{{6, "w", {0, 1}, false}}));
}

TEST_F(ControllerTest, SwitchAtNextBoundaryLeavesJudgedClocksAlone) {
  Start(2, 0);
  Push(0, 0);
  Push(1, 0);
  Push(0, 1);
  EXPECT_EQ(Pull(1, 0, 2), PullDecision::kHeld);  // max clock seen: 2
  auto m = ctl_->SetStaleness(kAsync, -1);
  ASSERT_TRUE(m.ok()) << m.status();
  EXPECT_EQ(m->at_clock, 3);
  EXPECT_TRUE(m->events.empty());  // the held pull at 2 stays under BSP
  EXPECT_EQ(ctl_->JobStaleness(2), 0);
  EXPECT_EQ(ctl_->JobStaleness(3), kAsync);
  EXPECT_EQ(Push(0, 2).routes[0], PushRoute::kAccumulate);
  EXPECT_EQ(Push(0, 3).routes[0], PushRoute::kApplyNow);
  PushPlan p = Push(1, 1);
  EXPECT_EQ(Flatten(p.events), (std::vector<Done>{{1, "w", {0, 1}, false}}));
  EXPECT_EQ(p.events.released, (std::vector<uint64_t>{1}));
}

TEST_F(ControllerTest, LooseningSwitchAtAJudgedClockFlushesAndReleases) {
  Start(3, 0);
  Push(0, 0);
  Push(0, 1);  // runs ahead
  Push(1, 0);
  EXPECT_EQ(Pull(1, 0, 2), PullDecision::kHeld);
  EXPECT_EQ(Pull(2, 1, 1), PullDecision::kHeld);
  // Switch to async from clock 1 on: clock 0 stays BSP (worker 2 still owes
  // it), clock 1's gradients must not be stranded, and both pulls are
  // answerable under async.
  auto m = ctl_->SetStaleness(kAsync, 1);
  ASSERT_TRUE(m.ok()) << m.status();
  EXPECT_EQ(Flatten(m->events), (std::vector<Done>{{1, "w", {0}, true}}));
  EXPECT_EQ(m->events.released, (std::vector<uint64_t>{1, 2}));
  EXPECT_EQ(ctl_->Snapshot().pending_clocks, 1u);
  // Later pushes for clock 1 apply now; clock 0 still completes as BSP.
  EXPECT_EQ(Push(1, 1).routes[0], PushRoute::kApplyNow);
  PushPlan p = Push(2, 0);
  EXPECT_EQ(Flatten(p.events), (std::vector<Done>{{0, "w", {0, 1, 2}, false}}));
}

TEST_F(ControllerTest, SwitchFromBspToSspAtTheCurrentClockReevaluatesHeldPulls) {
  Start(2, 0);
  Push(0, 0);
  Push(0, 1);
  EXPECT_EQ(Pull(1, 0, 1), PullDecision::kHeld);
  EXPECT_EQ(Pull(2, 0, 2), PullDecision::kHeld);
  auto m = ctl_->SetStaleness(1, 0);
  ASSERT_TRUE(m.ok()) << m.status();
  // SSP 1: a pull at 1 needs everyone >= 0 (released), at 2 >= 1 (held).
  EXPECT_EQ(m->events.released, (std::vector<uint64_t>{1}));
  EXPECT_EQ(Flatten(m->events), (std::vector<Done>{{0, "w", {0}, true}, {1, "w", {0}, true}}));
  EXPECT_EQ(ctl_->num_held_pulls(), 1u);
  Events e = Clock(1, 1);
  EXPECT_EQ(e.released, (std::vector<uint64_t>{2}));
  EXPECT_TRUE(e.completed.empty());
}

TEST_F(ControllerTest, TighteningSwitchMustNameAnUnusedClock) {
  Start(2, kAsync);
  Push(0, 0);
  Push(0, 1);
  EXPECT_EQ(Pull(1, 0, 2), PullDecision::kAnswerNow);  // max seen: 2
  auto bad = ctl_->SetStaleness(0, 2);
  EXPECT_EQ(bad.status().code(), StatusCode::kFailedPrecondition);
  EXPECT_NE(bad.status().message().find("at_clock >= 3"), std::string::npos) << bad.status();
  EXPECT_EQ(ctl_->JobStaleness(2), kAsync);  // unchanged
  EXPECT_EQ(ctl_->SetStaleness(3, 1).status().code(), StatusCode::kFailedPrecondition);
  EXPECT_EQ(ctl_->SetStaleness(-3, -1).status().code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(ctl_->SetStaleness(0, -5).status().code(), StatusCode::kInvalidArgument);

  // Into BSP at 3: clocks >= 3 are synchronous.
  auto ok = ctl_->SetStaleness(0, -1);
  ASSERT_TRUE(ok.ok()) << ok.status();
  EXPECT_EQ(ok->at_clock, 3);
  EXPECT_EQ(Push(0, 2).routes[0], PushRoute::kApplyNow);
  EXPECT_EQ(Push(0, 3).routes[0], PushRoute::kAccumulate);
  EXPECT_EQ(Pull(2, 0, 4), PullDecision::kHeld);
  Clock(1, 3);
  PushPlan p = Push(1, 3);
  EXPECT_EQ(Flatten(p.events), (std::vector<Done>{{3, "w", {0, 1}, false}}));
  EXPECT_EQ(p.events.released, (std::vector<uint64_t>{2}));
}

TEST_F(ControllerTest, LaterSwitchReplacesSwitchesScheduledAfterIt) {
  Start(1, 0);
  ASSERT_TRUE(ctl_->SetStaleness(kAsync, 10).ok());
  ASSERT_TRUE(ctl_->SetStaleness(3, 5).ok());
  EXPECT_EQ(ctl_->JobStaleness(4), 0);
  EXPECT_EQ(ctl_->JobStaleness(5), 3);
  EXPECT_EQ(ctl_->JobStaleness(12), 3);
}

// ---------------------------------------------------------------- per variable

TEST_F(ControllerTest, PerVariableOverrideGatesEachVariableByItsOwnBound) {
  Start(2, kAsync);
  ASSERT_TRUE(ctl_->RegisterVariable("emb", 0).ok());  // BSP in an async job
  ASSERT_TRUE(ctl_->RegisterVariable("w", kInherit).ok());
  ASSERT_TRUE(ctl_->RegisterVariable("emb", 5).ok());  // already known: no-op
  EXPECT_EQ(ctl_->EffectiveStaleness("emb", 0), 0);
  EXPECT_EQ(ctl_->EffectiveStaleness("w", 0), kAsync);
  EXPECT_EQ(ctl_->EffectiveStaleness("unknown", 0), kAsync);

  PushPlan p = Push(0, 0, {"w", "emb"});
  EXPECT_EQ(p.routes, (std::vector<PushRoute>{PushRoute::kApplyNow, PushRoute::kAccumulate}));
  EXPECT_EQ(Pull(1, 0, 1, {"w"}), PullDecision::kAnswerNow);
  EXPECT_EQ(Pull(2, 0, 1, {"emb"}), PullDecision::kHeld);
  EXPECT_EQ(Pull(3, 0, 1, {"w", "emb"}), PullDecision::kHeld);  // the stricter bound
  PushPlan q = Push(1, 0, {"w", "emb"});
  // Only the BSP variable was accumulated.
  EXPECT_EQ(Flatten(q.events), (std::vector<Done>{{0, "emb", {0, 1}, false}}));
  EXPECT_EQ(q.events.released, (std::vector<uint64_t>{2, 3}));
}

TEST_F(ControllerTest, VariableSwitchFlushesOnlyThatVariable) {
  Start(2, 0);
  Push(0, 0, {"a", "b"});
  EXPECT_EQ(Pull(1, 0, 1, {"a"}), PullDecision::kHeld);
  EXPECT_EQ(Pull(2, 0, 1, {"b"}), PullDecision::kHeld);
  auto m = ctl_->SetStaleness(kAsync, 0, "a");
  ASSERT_TRUE(m.ok()) << m.status();
  EXPECT_EQ(Flatten(m->events), (std::vector<Done>{{0, "a", {0}, true}}));
  EXPECT_EQ(m->events.released, (std::vector<uint64_t>{1}));
  EXPECT_EQ(ctl_->EffectiveStaleness("a", 0), kAsync);
  EXPECT_EQ(ctl_->EffectiveStaleness("b", 0), 0);
  PushPlan p = Push(1, 0, {"a", "b"});
  EXPECT_EQ(p.routes, (std::vector<PushRoute>{PushRoute::kApplyNow, PushRoute::kAccumulate}));
  EXPECT_EQ(Flatten(p.events), (std::vector<Done>{{0, "b", {0, 1}, false}}));
  EXPECT_EQ(p.events.released, (std::vector<uint64_t>{2}));

  // Inherit again from clock 3: "a" follows the job (BSP) from there.
  ASSERT_TRUE(ctl_->SetStaleness(kInherit, 3, "a").ok());
  EXPECT_EQ(ctl_->EffectiveStaleness("a", 2), kAsync);
  EXPECT_EQ(ctl_->EffectiveStaleness("a", 3), 0);
  // A job-level async value is not allowed to be "inherit".
  EXPECT_EQ(ctl_->SetStaleness(kInherit, 5).status().code(), StatusCode::kInvalidArgument);
}

TEST_F(ControllerTest, SspVariableInBspJob) {
  Start(2, 0);
  ASSERT_TRUE(ctl_->SetStaleness(3, 0, "fast").ok());
  for (int64_t c = 0; c < 4; ++c) {
    PushPlan p = Push(0, c, {"fast"});
    EXPECT_EQ(p.routes[0], PushRoute::kApplyNow);
  }
  EXPECT_EQ(Pull(1, 0, 3, {"fast"}), PullDecision::kAnswerNow);  // needs >= 0
  EXPECT_EQ(Pull(2, 0, 4, {"fast"}), PullDecision::kHeld);       // needs >= 1
  EXPECT_EQ(Pull(3, 0, 4, {}), PullDecision::kHeld);             // job bound: BSP
  Events e = Clock(1, 1);
  EXPECT_EQ(e.released, (std::vector<uint64_t>{2}));
}

// ---------------------------------------------------------------- reporting

TEST_F(ControllerTest, SnapshotAndShardClock) {
  Start(3, 0);
  Push(0, 0);
  Push(1, 0);
  ControllerSnapshot s = ctl_->Snapshot();
  EXPECT_EQ(s.min_clock, 0);
  EXPECT_EQ(s.shard_clock, 0);
  EXPECT_EQ(s.staleness, 0);
  EXPECT_EQ(s.max_seen_clock, 0);
  EXPECT_EQ(s.pending_clocks, 1u);
  ASSERT_EQ(s.workers.size(), 3u);
  EXPECT_EQ(s.workers[0].clock, 1);
  EXPECT_EQ(s.workers[2].clock, 0);
  EXPECT_TRUE(s.workers[2].seen);
  Push(2, 0);
  EXPECT_EQ(ctl_->ShardClock(), 1);
  EXPECT_EQ(ctl_->Snapshot().pending_clocks, 0u);
  ASSERT_TRUE(ctl_->SetStaleness(4, -1).ok());
  Clock(0, 4);
  EXPECT_EQ(ctl_->CurrentStaleness(), 4);
  EXPECT_EQ(ctl_->ShardClock(), 4);  // SSP: the largest worker clock
  EXPECT_EQ(ctl_->MinClock(), 1);
}

TEST(StricterBoundTest, AsyncIsLoosest) {
  EXPECT_EQ(ConsistencyController::StricterBound(kAsync, 3), 3);
  EXPECT_EQ(ConsistencyController::StricterBound(0, 3), 0);
  EXPECT_EQ(ConsistencyController::StricterBound(kAsync, kAsync), kAsync);
  EXPECT_EQ(ConsistencyController::StricterBound(5, 2), 2);
}

}  // namespace
}  // namespace distval::ps
