#include "distval/client.h"

#include <poll.h>
#include <sys/eventfd.h>
#include <sys/timerfd.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstring>
#include <deque>
#include <functional>
#include <limits>
#include <map>
#include <mutex>
#include <random>
#include <set>
#include <thread>
#include <unordered_map>

#include "distval/logging.h"
#include "distval/malloc_tuning.h"
#include "distval/range_pool.h"
#include "distval/shared_memory.h"

namespace distval {

using protocol::Reply;
using protocol::Request;
using transport::Frame;
using transport::InMessage;
using transport::Payload;
using Clock = std::chrono::steady_clock;

// ---------------------------------------------------------------------------
// The I/O lease: which thread may use the sockets (and the bookkeeping of
// requests in flight) right now. ZeroMQ sockets may move between threads
// with a full memory barrier in between, which the lease's mutex provides.
//
// The holder is the background I/O thread, or a caller thread that sends its
// own request directly (Submit) or receives its own reply (RequestHandle::
// Wait). A caller that finds the lease free does the socket work itself, so a
// synchronous request costs no thread hand-off at all: the same wake-ups as a
// plain ZeroMQ request/reply. Requests nobody waits for are picked up by the
// background thread after kTakeoverDelay, or at once when work is queued for
// a held lease (the holder polls the wake-up eventfd with its sockets). The
// delay is a timer (a timerfd) started when a caller leaves a request and
// left running when a caller comes back to wait: the background thread then
// wakes at most once per kTakeoverDelay, instead of once per request as a
// notification at every submission would have it (on a small machine a
// wake-up costs as much as a tenth of a 4 KiB round trip, and stopping the
// timer at every wait, a system call, cost a pipeline of small requests a
// third of its rate).
struct IoLease {
  std::mutex mu;
  std::condition_variable cv;    // a stopping background thread waits here for the lease
  bool held = false;             // Guarded by mu.
  bool background = false;       // held by the background thread; Guarded by mu.
  bool alive = true;             // false once the client stops; Guarded by mu.
  Client::Impl* impl = nullptr;  // valid while alive or held (Stop waits for !held)
};

// RequestHandle state: shared by the caller's handle and the lease holder.
struct RequestHandle::State {
  std::mutex mu;
  std::condition_variable cv;
  int outstanding_replies = 0;   // Guarded by mu.
  int outstanding_releases = 0;  // Guarded by mu.
  Status status;                 // first error; Guarded by mu.
  bool abandoned = false;        // the waiter gave up: never touch its buffers; Guarded by mu.
  std::set<int> pending_shards;  // Guarded by mu.
  // Endpoints, for messages; set before submission.
  std::shared_ptr<const std::vector<std::string>> shard_names;
  // Lets Wait() drive the sockets itself; null for a handle that failed
  // before submission.
  std::shared_ptr<IoLease> lease;
  // Deadline of Wait() without an argument: ClientOptions::request_timeout.
  std::chrono::milliseconds default_timeout{120000};

  void Fail(const Status& s) {  // REQUIRES: mu held
    if (status.ok()) status = s;
  }
  bool DoneLocked() const { return outstanding_replies == 0 && outstanding_releases == 0; }
};

bool RequestHandle::Done() const {
  if (!state_) return true;
  std::lock_guard<std::mutex> lock(state_->mu);
  return state_->DoneLocked() || state_->abandoned;
}

Status PulledVariable::CopyTo(std::span<float> out) const {
  size_t needed = 0;
  for (const auto& s : slices) needed += s.values.size();
  if (out.size() != needed)
    return InvalidArgumentError("variable '" + name + "': buffer has " +
                                std::to_string(out.size()) + " floats, variable has " +
                                std::to_string(needed));
  size_t offset = 0;
  for (const auto& s : slices) {
    std::memcpy(out.data() + offset, s.values.data(), s.values.size_bytes());
    offset += s.values.size();
  }
  return OkStatus();
}

namespace {

RequestHandle FailedHandle(Status status) {
  auto state = std::make_shared<RequestHandle::State>();
  state->status = std::move(status);
  return RequestHandle(state);
}

}  // namespace

// ---------------------------------------------------------------------------
class Client::Impl {
 public:
  // Called on the I/O thread with the decoded reply and the received frames
  // (frame 0 is the header), while the request's State mutex is held and the
  // waiter has not abandoned the request. Returns an error to fail the
  // request.
  using OnReply = std::function<Status(const Reply&, const InMessage&)>;

  // Copies `bytes` from src to dst, split over options_.copy_threads
  // threads when it is large (see ClientOptions::copy_threads).
  void CopyBytes(void* dst, const void* src, size_t bytes) {
    constexpr size_t kLine = 64;
    constexpr size_t kSplitBytes = size_t{8} << 20;
    if (bytes < kSplitBytes || options_.copy_threads <= 1) {
      std::memcpy(dst, src, bytes);
      return;
    }
    std::call_once(copy_pool_once_, [this] {
      RangePool::Options o;  // in lines of kLine bytes
      o.threads = options_.copy_threads;
      o.min_split = static_cast<int64_t>(kSplitBytes / kLine);
      o.min_chunk = (int64_t{256} << 10) / static_cast<int64_t>(kLine);
      o.align = 1;
      copy_pool_ = std::make_unique<RangePool>(std::move(o));
    });
    auto* d = static_cast<std::byte*>(dst);
    const auto* from = static_cast<const std::byte*>(src);
    // In whole lines; the last one takes the bytes left over.
    const auto lines = static_cast<int64_t>(bytes / kLine);
    copy_pool_->Run(lines, [&](int64_t b, int64_t e) {
      const size_t begin = static_cast<size_t>(b) * kLine;
      const size_t end = e == lines ? bytes : static_cast<size_t>(e) * kLine;
      std::memcpy(d + begin, from + begin, end - begin);
    });
  }

  // CopyBytes as a callable (for CopyFrame in reply handlers).
  auto Copier() {
    return [this](void* dst, const void* src, size_t bytes) { CopyBytes(dst, src, bytes); };
  }

  struct Outgoing {
    int shard = 0;
    Request request;
    std::vector<Payload> payloads;  // frames after the header
    OnReply on_reply;
    // A Pull that asked for a chunked reply (Pull::chunk_bytes): where the
    // values of each read go, in read order. Empty otherwise.
    std::vector<std::span<float>> pull_into;
    // A Push whose one payload goes in PushChunk pieces of this many bytes
    // (Push::chunks set); 0: whole.
    size_t push_chunk_bytes = 0;
  };

  Impl(const ClientOptions& options, Client* owner) : options_(options), owner_(owner) {}
  ~Impl() { Stop(); }

  Status Start();
  void Stop();

  // Encodes and hands the messages to the I/O thread. `state` gets one
  // outstanding reply per message.
  RequestHandle Submit(std::vector<Outgoing> messages, std::shared_ptr<RequestHandle::State> state,
                       bool zero_copy_payloads);
  std::shared_ptr<RequestHandle::State> NewState() {
    auto s = std::make_shared<RequestHandle::State>();
    s->shard_names = shard_names_;
    s->default_timeout = options_.request_timeout;
    return s;
  }

  // Runs the I/O for `state` on the calling thread until its replies are in,
  // `deadline` passes or the client stops, if the lease is free; returns at
  // once otherwise (the holder completes the request). Called by Wait().
  static void DriveUntilAnswered(RequestHandle::State& state, Clock::time_point deadline);
  uint64_t NextId() { return next_id_.fetch_add(1); }
  // Whether tensors to and from shard likely travel through shared memory
  // (co-located, and offered): then nothing is sent in pieces.
  bool SharedMemoryShard(int shard) const {
    return socket_options_.shared_memory &&
           transport::IsLocalEndpoint(options_.ps_endpoints[shard]);
  }
  // The segments this client lends without copying (AllocatePushBuffer).
  transport::SharedMemoryRegistry& shared_memory() { return context_->shared_memory(); }
  // The piece size to ask shard for in a Pull (0: whole replies); see
  // ClientOptions::pull_chunk_bytes.
  size_t PullChunkBytes(int shard) const {
    return SharedMemoryShard(shard) ? 0 : options_.pull_chunk_bytes;
  }
  // The piece size of a large dense push to shard (0: whole); see
  // ClientOptions::push_chunk_bytes.
  size_t PushChunkBytes(int shard) const {
    if (SharedMemoryShard(shard) || options_.push_chunk_bytes == 0) return 0;
    return (std::max<size_t>(options_.push_chunk_bytes, 64 * 1024) + 63) / 64 * 64;
  }
  // The hello of this client (Connect, and again after a lost connection).
  protocol::Hello MakeHello() const;
  // Records the server process that answered shard's hello. REQUIRES: the
  // lease is held (called from a reply callback).
  void SetIncarnation(int shard, uint64_t incarnation) {
    links_[static_cast<size_t>(shard)].incarnation = incarnation;
  }
  // Aborted while a rollback waits for AcceptRollback; OK otherwise.
  Status RollbackPending() const {
    if (rollback_clock_.load() < 0) return OkStatus();
    std::lock_guard<std::mutex> lock(stats_mu_);
    return AbortedError(rollback_reason_ + " (not yet accepted: Client::AcceptRollback)");
  }
  int64_t AcceptRollback() {
    const int64_t c = rollback_clock_.exchange(-1);
    if (c >= 0) {
      owner_->set_clock(c);
      acked_clock_.store(c);
    }
    return owner_->clock();
  }
  // The clock the shards acknowledged for this worker (the steps they have).
  std::atomic<int64_t> acked_clock_{0};
  Request NewRequest() {
    Request r;
    r.request_id = NextId();
    r.worker_id = options_.role == protocol::Role::kWorker ? options_.worker_index : -1;
    r.clock = owner_->clock();
    return r;
  }

  // Variables (guarded by vars_mu_).
  mutable std::mutex vars_mu_;
  std::map<std::string, VariableInfo> vars_;   // Guarded by vars_mu_.
  std::unique_ptr<PlacementPlanner> planner_;  // Guarded by vars_mu_.

  mutable std::mutex stats_mu_;
  ClientStats stats_;                // Guarded by stats_mu_.
  std::vector<int64_t> min_clocks_;  // per shard; Guarded by stats_mu_.

  void RecordReply(int shard, const Reply& reply, bool is_pull) {
    std::lock_guard<std::mutex> lock(stats_mu_);
    if (shard < static_cast<int>(min_clocks_.size())) min_clocks_[shard] = reply.min_clock;
    if (is_pull && options_.role == protocol::Role::kWorker) {
      int64_t st = std::max<int64_t>(0, owner_->clock() - reply.min_clock);
      stats_.staleness_sum += st;
      stats_.staleness_max = std::max(stats_.staleness_max, st);
      stats_.staleness_samples += 1;
    }
  }

 private:
  struct Command {
    std::vector<Outgoing> messages;
    std::vector<std::vector<std::byte>> headers;
    std::shared_ptr<RequestHandle::State> state;
  };
  struct Pending {
    int shard = -1;
    OnReply on_reply;
    std::shared_ptr<RequestHandle::State> state;
    bool is_pull = false;
    // The message, to send it again after a lost connection: the encoded
    // header and duplicates of the payloads (a Borrow keeps the caller's
    // buffer borrowed until the reply).
    std::vector<std::byte> header;
    std::vector<Payload> frames;
    bool sent = true;  // false while its shard's connection is being rebuilt
    // A push that advances the clock (or an AdvanceClock): the clock this
    // worker has on the shard once it is acknowledged; -1 otherwise.
    int64_t advances_to = -1;
    // Chunked pull replies (Outgoing::pull_into): PullChunk messages still
    // to come (-1 until the PullReply), value bytes not yet received, and
    // the first error (the request fails with it once every piece is in).
    std::vector<std::span<float>> pull_into;
    int64_t chunks_left = -1;
    size_t bytes_left = 0;
    Status chunk_status;
    // A chunked push (Outgoing::push_chunk_bytes): the piece size, and the
    // request whose id, worker and clock the pieces' headers repeat.
    size_t push_chunk_bytes = 0;
    Request piece;
  };
  // Sends p's message to `shard`: its header and `payloads`, or for a
  // chunked push the header alone and then one PushChunk message per piece
  // of its one payload. `observed`: the request, shown to the observer
  // (null: not shown). The socket's error, if any.
  Status SendMessage(int shard, const Pending& p, std::vector<Payload> payloads,
                     const Request* observed);
  // The connection to one shard, as the lease holder sees it.
  struct Link {
    std::unique_ptr<transport::Socket> monitor;  // its socket's connection events
    bool lost = false;                           // rebuilding; requests wait
    bool gave_up = false;                        // lost for longer than retry_timeout
    Clock::time_point lost_since;
    uint64_t incarnation = 0;  // of the server process last greeted (0: none yet)
    uint64_t rejoin_id = 0;    // the hello that will end the rebuilding
  };

  // A caller that submitted a request and released the lease has this long
  // to come back and wait for it (taking the lease again) before the
  // background thread takes over its reply.
  static constexpr std::chrono::microseconds kTakeoverDelay{500};
  // How long Submit waits for the background thread to give the lease back
  // before handing its request over instead.
  static constexpr std::chrono::microseconds kLeaseSpin{50};

  // Background thread: takes the lease whenever work would otherwise be left
  // unattended (queued commands, replies nobody waits for, heartbeats).
  void Run();
  // The messages of a chunked pull reply (the PullReply with the shapes,
  // then its PullChunk pieces, copied into Pending::pull_into as they come).
  // False when `reply` is not one of them. REQUIRES: the lease is held.
  bool HandleChunked(int shard, std::unordered_map<uint64_t, Pending>::iterator it,
                     const Reply& reply, const InMessage& msg);
  // One round of socket work. REQUIRES: the lease is held.
  void IoStep(std::chrono::milliseconds poll_timeout);
  // Sends everything queued by threads that found the lease held.
  // REQUIRES: the lease is held.
  void SendQueued();
  void SendCommand(Command& cmd);
  void HandleMessage(int shard, InMessage& msg);
  void CompleteOne(Pending& p, const Status& s);
  void SendHeartbeats();
  // (Re)creates shard i's DEALER socket and its connection monitor.
  Status OpenShard(size_t i);
  void RebuildPollList();
  // Shard `shard`'s connection dropped: rebuild it and say hello again;
  // requests wait (Pending::sent false) until the hello is answered.
  void OnConnectionLost(int shard);
  // The rebuilt connection's hello was answered: resend, roll back or fail.
  void OnRejoined(int shard, const Reply& reply);
  // Sends shard's requests again (those still waited for), in id order.
  void Resend(int shard);
  // Fails the pending requests of `shard` (all shards: -1) with `status`.
  void FailPending(int shard, const Status& status);
  // Fails the requests of shards lost for longer than retry_timeout.
  void CheckRetryDeadlines();
  bool ShardHoldsVariables(int shard) const;
  // Copies the sockets' shared-memory counters into stats_. REQUIRES: the
  // lease is held.
  void UpdateSharedMemoryStats();
  // Gives the lease back and wakes the background thread when work is left:
  // at once when commands are queued or `leave_now` (a waiter left while
  // other requests are in flight), else after kTakeoverDelay (the takeover
  // timer) unless a caller takes the lease again first.
  void ReleaseLease(bool leave_now);
  // Starts the takeover timer to fire `after` from now. Callers start it
  // only when it is not running (the background thread starts it again for
  // the rest when it fired early): no system call for most requests of a
  // pipeline. REQUIRES: lease_->mu is held.
  void StartTakeoverTimer(std::chrono::nanoseconds after);
  // REQUIRES: lease_->mu is held (or the client is stopping).
  void WakeBackground() {
    if (!background_sleeping_ && !stop_.load()) return;  // it looks again before sleeping
    uint64_t one = 1;
    ssize_t n = ::write(background_fd_, &one, sizeof(one));
    (void)n;
  }
  bool QueueEmpty() {
    std::lock_guard<std::mutex> lock(queue_mu_);
    return queue_.empty();
  }
  void Wake() {
    uint64_t one = 1;
    ssize_t n = ::write(wake_fd_, &one, sizeof(one));
    (void)n;
  }

  ClientOptions options_;
  Client* owner_;
  std::once_flag copy_pool_once_;
  std::unique_ptr<RangePool> copy_pool_;
  std::shared_ptr<const std::vector<std::string>> shard_names_;
  // Request ids start at a random point: unique per sender across client
  // instances and restarts, so a server's dedupe of retried pushes (keyed
  // by worker and request id) never mistakes a new push for a retry.
  static uint64_t FirstRequestId() {
    std::random_device rd;
    const uint64_t r = (uint64_t{rd()} << 32) ^ uint64_t { rd() };
    return (r >> 1) | 1;  // non-zero, far from wrapping
  }
  std::atomic<uint64_t> next_id_{FirstRequestId()};
  std::unique_ptr<transport::Context> context_;
  transport::SocketOptions socket_options_;
  std::vector<std::unique_ptr<transport::Socket>> sockets_;  // lease holder only after Start()
  std::vector<transport::Socket*> socket_ptrs_;
  std::vector<Link> links_;                    // lease holder only after Start()
  std::vector<transport::Socket*> poll_ptrs_;  // sockets, then their monitors
  int wake_fd_ = -1;
  // The background thread sleeps in poll() on these: an eventfd that wakes it
  // at once, and the takeover timer (a timerfd).
  int background_fd_ = -1;
  int takeover_fd_ = -1;
  std::thread thread_;
  std::atomic<bool> stop_{false};

  std::shared_ptr<IoLease> lease_ = std::make_shared<IoLease>();
  // Requests sent and not yet answered (pending_.size(), readable without
  // the lease).
  std::atomic<int> outstanding_{0};
  // When a request was last left unattended with the lease free.
  Clock::time_point unattended_since_;  // Guarded by lease_->mu.
  bool takeover_now_ = false;           // Guarded by lease_->mu.
  bool takeover_timer_set_ = false;     // Guarded by lease_->mu.
  // The background thread is (about to be) asleep in poll(): only then does
  // waking it take a write to background_fd_.
  bool background_sleeping_ = false;  // Guarded by lease_->mu.

  std::mutex queue_mu_;        // Acquired after lease_->mu when both are held.
  std::deque<Command> queue_;  // Guarded by queue_mu_.

  // Clock of the checkpoint a restarted shard rolled the job back to, until
  // the caller accepts it (Client::AcceptRollback); -1: none.
  std::atomic<int64_t> rollback_clock_{-1};
  std::string rollback_reason_;  // Guarded by stats_mu_.

  // Lease holder only:
  std::unordered_map<uint64_t, Pending> pending_;
  std::vector<Clock::time_point> last_send_;
};

Status Client::Impl::Start() {
  if (options_.ps_endpoints.empty()) return InvalidArgumentError("no parameter servers given");
  if (options_.tune_malloc) TuneMallocForLargeMessages();
  shard_names_ = std::make_shared<const std::vector<std::string>>(options_.ps_endpoints);
  context_ = std::make_unique<transport::Context>(1);
  if (options_.retry_timeout.count() < 0 || options_.reconnect_backoff_max.count() < 0 ||
      options_.connection_timeout.count() <= 0)
    return InvalidArgumentError(
        "retry_timeout and reconnect_backoff_max must be >= 0 and connection_timeout > 0");
  transport::SocketOptions& so = socket_options_;
  so.max_message_bytes = options_.max_message_bytes;
  so.linger_ms = 0;
  so.shared_memory = options_.shared_memory;
  if (!options_.curve_server_key.empty()) {
    so.shared_memory = false;  // tensors must not bypass the encrypted connection
    so.curve_public_key = options_.curve_public_key;
    so.curve_secret_key = options_.curve_secret_key;
    so.curve_server_key = options_.curve_server_key;
  }
  so.reconnect_ivl_ms = 100;
  so.reconnect_ivl_max_ms = static_cast<int>(
      std::max<int64_t>(options_.reconnect_backoff_max.count(), so.reconnect_ivl_ms));
  so.heartbeat_ivl_ms = static_cast<int>(std::max<int64_t>(options_.heartbeat_interval.count(), 1));
  so.heartbeat_timeout_ms = static_cast<int>(options_.connection_timeout.count());
  sockets_.resize(options_.ps_endpoints.size());
  socket_ptrs_.resize(options_.ps_endpoints.size());
  links_.resize(options_.ps_endpoints.size());
  for (size_t i = 0; i < options_.ps_endpoints.size(); ++i) DV_RETURN_IF_ERROR(OpenShard(i));
  min_clocks_.assign(sockets_.size(), 0);
  last_send_.assign(sockets_.size(), Clock::now());
  planner_ = std::make_unique<PlacementPlanner>(static_cast<int>(sockets_.size()));
  wake_fd_ = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
  if (wake_fd_ < 0) return InternalError(std::string("eventfd: ") + std::strerror(errno));
  background_fd_ = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
  if (background_fd_ < 0) return InternalError(std::string("eventfd: ") + std::strerror(errno));
  takeover_fd_ = timerfd_create(CLOCK_MONOTONIC, TFD_NONBLOCK | TFD_CLOEXEC);
  if (takeover_fd_ < 0)
    return InternalError(std::string("timerfd_create: ") + std::strerror(errno));
  lease_->impl = this;
  thread_ = std::thread([this] { Run(); });
  return OkStatus();
}

void Client::Impl::Stop() {
  if (thread_.joinable()) {
    {
      std::lock_guard<std::mutex> lock(lease_->mu);
      stop_.store(true);
      lease_->alive = false;  // no caller takes the lease from now on
      lease_->cv.notify_all();
    }
    WakeBackground();
    Wake();  // a holder blocked in poll
    thread_.join();
  }
  poll_ptrs_.clear();
  links_.clear();  // the monitors go before their sockets
  socket_ptrs_.clear();
  sockets_.clear();
  context_.reset();
  for (int* fd : {&wake_fd_, &background_fd_, &takeover_fd_}) {
    if (*fd >= 0) ::close(*fd);
    *fd = -1;
  }
}

RequestHandle Client::Impl::Submit(std::vector<Outgoing> messages,
                                   std::shared_ptr<RequestHandle::State> state,
                                   bool zero_copy_payloads) {
  (void)zero_copy_payloads;
  if (Status rb = RollbackPending(); !rb.ok()) return FailedHandle(std::move(rb));
  Command cmd;
  {
    std::lock_guard<std::mutex> lock(state->mu);
    state->outstanding_replies += static_cast<int>(messages.size());
    for (const auto& m : messages) state->pending_shards.insert(m.shard);
    state->lease = lease_;
  }
  cmd.headers.reserve(messages.size());
  for (auto& m : messages) cmd.headers.push_back(protocol::EncodeRequest(m.request));
  cmd.messages = std::move(messages);
  cmd.state = state;
  bool direct = false;
  const auto spin_until = Clock::now() + kLeaseSpin;
  for (;;) {
    std::unique_lock<std::mutex> lock(lease_->mu);
    if (!lease_->held && lease_->alive) {
      lease_->held = true;
      direct = true;
      break;
    }
    // With nothing in flight, the background thread gives the lease back
    // within microseconds (it is finishing the drive whose last reply this
    // caller may be coming back from): waiting that long beats handing this
    // request to it (two thread wake-ups per request, and the next request
    // would find it holding the lease again).
    if (!lease_->alive || !lease_->background || outstanding_.load() > 0 ||
        Clock::now() >= spin_until) {
      std::lock_guard<std::mutex> queue_lock(queue_mu_);
      queue_.push_back(std::move(cmd));
      break;
    }
    lock.unlock();
    std::this_thread::yield();
  }
  if (direct) {
    // Send on this thread: no hand-off to the I/O thread. Anything other
    // threads queued meanwhile goes first.
    SendQueued();
    SendCommand(cmd);
    ReleaseLease(/*leave_now=*/false);
  } else {
    Wake();  // the holder polls the eventfd with its sockets
  }
  return RequestHandle(std::move(state));
}

void Client::Impl::ReleaseLease(bool leave_now) {
  std::lock_guard<std::mutex> lock(lease_->mu);
  lease_->held = false;
  if (!lease_->alive) lease_->cv.notify_all();  // Stop waits for the lease
  const bool queued = !QueueEmpty();
  if (!queued && outstanding_.load() == 0) return;
  if (queued || leave_now) {
    takeover_now_ = true;
    WakeBackground();
    return;
  }
  // Our own request is in flight; its caller normally comes back to Wait()
  // within microseconds and takes the lease again. Only if it does not does
  // the background thread take over, when the timer fires.
  unattended_since_ = Clock::now();
  if (!takeover_timer_set_) StartTakeoverTimer(kTakeoverDelay);
}

void Client::Impl::StartTakeoverTimer(std::chrono::nanoseconds after) {
  itimerspec when{};
  const int64_t ns = std::max<int64_t>(after.count(), 1);  // 0 would stop it
  when.it_value.tv_sec = static_cast<time_t>(ns / 1000000000);
  when.it_value.tv_nsec = static_cast<long>(ns % 1000000000);
  if (timerfd_settime(takeover_fd_, 0, &when, nullptr) != 0) {
    // Cannot happen with a valid fd; fall back to a wake-up now.
    WakeBackground();
    return;
  }
  takeover_timer_set_ = true;
}

void Client::Impl::DriveUntilAnswered(RequestHandle::State& state, Clock::time_point deadline) {
  IoLease& lease = *state.lease;
  {
    std::lock_guard<std::mutex> lock(lease.mu);
    if (!lease.alive || lease.held) return;
    lease.held = true;
  }
  Impl* impl = lease.impl;
  for (;;) {
    {
      std::lock_guard<std::mutex> lock(state.mu);
      if (state.outstanding_replies == 0 || state.abandoned) break;
    }
    const auto now = Clock::now();
    if (now >= deadline || impl->stop_.load()) break;
    // Poll in slices so that heartbeats keep going during a long wait.
    auto slice = std::chrono::ceil<std::chrono::milliseconds>(deadline - now);
    slice = std::min(slice, std::max(std::chrono::milliseconds(1),
                                     std::chrono::duration_cast<std::chrono::milliseconds>(
                                         impl->options_.heartbeat_interval / 2)));
    impl->IoStep(slice);
  }
  impl->ReleaseLease(/*leave_now=*/true);
}

void Client::Impl::CompleteOne(Pending& p, const Status& s) {
  std::lock_guard<std::mutex> lock(p.state->mu);
  if (!s.ok()) p.state->Fail(s);
  p.state->outstanding_replies -= 1;
  p.state->pending_shards.erase(p.shard);
  if (p.state->DoneLocked()) p.state->cv.notify_all();
}

void Client::Impl::SendQueued() {
  std::deque<Command> batch;
  {
    std::lock_guard<std::mutex> lock(queue_mu_);
    if (queue_.empty()) return;
    batch.swap(queue_);
  }
  for (auto& cmd : batch) SendCommand(cmd);
}

void Client::Impl::SendCommand(Command& cmd) {
  for (size_t i = 0; i < cmd.messages.size(); ++i) {
    Outgoing& m = cmd.messages[i];
    uint64_t id = m.request.request_id;
    bool is_pull = std::holds_alternative<protocol::Pull>(m.request.body);
    Pending pending;
    pending.shard = m.shard;
    pending.on_reply = std::move(m.on_reply);
    pending.state = cmd.state;
    pending.is_pull = is_pull;
    pending.pull_into = std::move(m.pull_into);
    pending.push_chunk_bytes = m.push_chunk_bytes;
    pending.piece.request_id = id;
    pending.piece.worker_id = m.request.worker_id;
    pending.piece.clock = m.request.clock;
    if (const auto* push = std::get_if<protocol::Push>(&m.request.body);
        (push != nullptr && push->advance_clock) ||
        std::holds_alternative<protocol::AdvanceClock>(m.request.body))
      pending.advances_to = m.request.clock + 1;
    pending.header = std::move(cmd.headers[i]);
    pending.frames.reserve(m.payloads.size());
    for (const Payload& p : m.payloads) pending.frames.push_back(p.Duplicate());
    const Link& link = links_[static_cast<size_t>(m.shard)];
    if (link.lost) {
      if (link.gave_up) {
        CompleteOne(pending, UnavailableError("shard " + std::to_string(m.shard) + " (" +
                                              options_.ps_endpoints[m.shard] +
                                              "): connection lost and not back (retrying)"));
        continue;
      }
      // Sent once the rebuilt connection's hello is answered.
      pending.sent = false;
      pending_[id] = std::move(pending);
      outstanding_.fetch_add(1);
      continue;
    }
    Pending& stored = pending_[id];
    stored = std::move(pending);
    outstanding_.fetch_add(1);
    Status s = SendMessage(m.shard, stored, std::move(m.payloads), &m.request);
    if (!s.ok()) {
      // The DEALER queue is full or the socket failed: report it now.
      Pending p = std::move(pending_[id]);
      pending_.erase(id);
      outstanding_.fetch_sub(1);
      CompleteOne(p, UnavailableError("shard " + std::to_string(m.shard) + " (" +
                                      options_.ps_endpoints[m.shard] + "): " + s.message()));
      continue;
    }
    last_send_[m.shard] = Clock::now();
  }
}

Status Client::Impl::SendMessage(int shard, const Pending& p, std::vector<Payload> payloads,
                                 const Request* observed) {
  transport::Socket& socket = *sockets_[static_cast<size_t>(shard)];
  const bool chunked = p.push_chunk_bytes > 0 && payloads.size() == 1;
  transport::OutMessage out;
  out.reserve(1 + payloads.size());
  out.push_back(Payload::Copy(std::span<const std::byte>(p.header)));
  if (!chunked)
    for (auto& x : payloads) out.push_back(std::move(x));
  if (options_.observer && observed) options_.observer->OnSend(shard, *observed, out);
  DV_RETURN_IF_ERROR(socket.Send(std::move(out), std::chrono::milliseconds(0)));
  if (!chunked) return OkStatus();
  // The pieces, front to back, each a message of its own (zero-copy slices
  // of the caller's gradient).
  const Payload& whole = payloads[0];
  Request piece = p.piece;
  for (size_t offset = 0; offset < whole.size(); offset += p.push_chunk_bytes) {
    piece.body = protocol::PushChunk{offset};
    transport::OutMessage m;
    m.reserve(2);
    m.push_back(Payload::Copy(protocol::EncodeRequest(piece)));
    m.push_back(whole.Slice(offset, std::min(p.push_chunk_bytes, whole.size() - offset)));
    if (options_.observer && observed) options_.observer->OnSend(shard, piece, m);
    DV_RETURN_IF_ERROR(socket.Send(std::move(m), std::chrono::milliseconds(0)));
  }
  return OkStatus();
}

void Client::Impl::HandleMessage(int shard, InMessage& msg) {
  if (msg.empty()) return;
  std::vector<size_t> sizes;
  sizes.reserve(msg.size() - 1);
  for (size_t i = 1; i < msg.size(); ++i) sizes.push_back(msg[i].size());
  auto reply = protocol::DecodeReply(msg[0].bytes(), sizes);
  if (!reply.ok()) {
    DV_LOG(kWarning) << "dropping malformed reply from shard " << shard << ": " << reply.status();
    return;
  }
  if (options_.observer) options_.observer->OnReply(shard, *reply, msg);
  if (reply->request_id != 0 && reply->request_id == links_[static_cast<size_t>(shard)].rejoin_id) {
    OnRejoined(shard, *reply);
    return;
  }
  auto it = pending_.find(reply->request_id);
  if (it == pending_.end()) {
    // Heartbeat replies and replies to abandoned requests.
    std::lock_guard<std::mutex> lock(stats_mu_);
    min_clocks_[shard] = reply->min_clock;
    return;
  }
  if (HandleChunked(shard, it, *reply, msg)) return;
  Pending p = std::move(it->second);
  pending_.erase(it);
  outstanding_.fetch_sub(1);
  RecordReply(shard, *reply, p.is_pull);
  if (reply->code == StatusCode::kOk && p.advances_to > acked_clock_.load())
    acked_clock_.store(p.advances_to);
  Status s = OkStatus();
  {
    std::lock_guard<std::mutex> lock(p.state->mu);
    if (p.state->abandoned) {
      s = CancelledError("abandoned");
    } else if (reply->code != StatusCode::kOk) {
      s = Status(reply->code, "shard " + std::to_string(shard) + " (" +
                                  options_.ps_endpoints[shard] + "): " + reply->message);
    } else if (p.on_reply) {
      s = p.on_reply(*reply, msg);
    }
  }
  CompleteOne(p, s);
}

bool Client::Impl::HandleChunked(int shard, std::unordered_map<uint64_t, Pending>::iterator it,
                                 const Reply& reply, const InMessage& msg) {
  Pending& p = it->second;
  const std::string from =
      "shard " + std::to_string(shard) + " (" + options_.ps_endpoints[shard] + "): ";
  if (const auto* piece = std::get_if<protocol::PullChunk>(&reply.body)) {
    if (p.chunks_left <= 0) {
      DV_LOG(kWarning) << from << "dropping a pull piece for request " << reply.request_id
                       << ", which expects none";
      return true;
    }
    if (p.chunk_status.ok()) {
      std::lock_guard<std::mutex> lock(p.state->mu);
      if (p.state->abandoned) {
        // Its waiter left: the buffer may be reused already.
        p.chunk_status = CancelledError("abandoned");
      } else {
        const Frame& f = msg[1];  // the decoder checked there is exactly one
        if (piece->tensor >= p.pull_into.size() ||
            piece->offset > p.pull_into[piece->tensor].size_bytes() ||
            f.size() > p.pull_into[piece->tensor].size_bytes() - piece->offset) {
          p.chunk_status =
              InternalError(from + "pull piece of " + std::to_string(f.size()) +
                            " bytes at offset " + std::to_string(piece->offset) + " of tensor " +
                            std::to_string(piece->tensor) + " lies outside the reply");
        } else {
          if (f.size() > 0)
            std::memcpy(
                reinterpret_cast<std::byte*>(p.pull_into[piece->tensor].data()) + piece->offset,
                f.data(), f.size());
          p.bytes_left -= std::min(p.bytes_left, f.size());
        }
      }
    }
    if (--p.chunks_left > 0) return true;
    if (p.chunk_status.ok() && p.bytes_left != 0)
      p.chunk_status = InternalError(from + "chunked pull reply ended " +
                                     std::to_string(p.bytes_left) + " bytes short");
  } else if (const auto* pr = std::get_if<protocol::PullReply>(&reply.body);
             reply.code == StatusCode::kOk && pr != nullptr && pr->chunks > 0) {
    // The shapes; the values follow in pr->chunks pieces.
    RecordReply(shard, reply, p.is_pull);
    p.chunks_left = pr->chunks;
    p.bytes_left = 0;
    p.chunk_status = OkStatus();
    if (pr->tensors.size() != p.pull_into.size()) {
      p.chunk_status = InternalError(from + "chunked pull reply with " +
                                     std::to_string(pr->tensors.size()) + " tensors to a request " +
                                     (p.pull_into.empty()
                                          ? std::string("that asked for none")
                                          : "of " + std::to_string(p.pull_into.size()) + " reads"));
    }
    for (size_t i = 0; i < pr->tensors.size() && p.chunk_status.ok(); ++i) {
      const protocol::TensorRef& ref = pr->tensors[i];
      if (ref.encoding != protocol::Encoding::kRaw || ref.dtype != DType::kF32)
        p.chunk_status = UnimplementedError("only raw f32 pull replies are supported");
      else if (ref.num_bytes() != p.pull_into[i].size_bytes())
        p.chunk_status = InternalError(from + "pull reply tensor " + std::to_string(i) + " has " +
                                       std::to_string(ref.num_bytes()) + " bytes, expected " +
                                       std::to_string(p.pull_into[i].size_bytes()));
      else
        p.bytes_left += ref.num_bytes();
    }
    return true;
  } else {
    return false;
  }
  // The last piece: done.
  Pending done = std::move(p);
  pending_.erase(it);
  outstanding_.fetch_sub(1);
  CompleteOne(done, done.chunk_status);
  return true;
}

void Client::Impl::SendHeartbeats() {
  if (options_.role != protocol::Role::kWorker) return;
  auto now = Clock::now();
  for (size_t i = 0; i < sockets_.size(); ++i) {
    if (links_[i].lost || now - last_send_[i] < options_.heartbeat_interval) continue;
    Request r = NewRequest();
    r.body = protocol::Heartbeat{};
    transport::OutMessage out;
    out.push_back(Payload::Copy(protocol::EncodeRequest(r)));
    // Heartbeats are best effort: a full queue means the shard is gone or
    // slow, and the next request will say so.
    sockets_[i]->Send(std::move(out), std::chrono::milliseconds(0)).IgnoreError();
    last_send_[i] = now;
  }
}

void Client::Impl::UpdateSharedMemoryStats() {
  if (!options_.shared_memory) return;
  int shards = 0;
  int64_t bytes = 0, lent = 0;
  for (transport::Socket* s : socket_ptrs_) {
    const transport::SharedMemoryStats st = s->shared_memory_stats();
    shards += st.active ? 1 : 0;
    bytes += st.bytes_sent + st.bytes_received;
    lent += st.frames_lent;
  }
  std::lock_guard<std::mutex> lock(stats_mu_);
  stats_.shared_memory_shards = shards;
  stats_.shared_memory_bytes = bytes;
  stats_.shared_memory_frames_lent = lent;
}

void Client::Impl::IoStep(std::chrono::milliseconds poll_timeout) {
  SendQueued();
  const int fds[1] = {wake_fd_};
  auto ready = transport::PollReadableWithFds(poll_ptrs_, fds, poll_timeout);
  if (!ready.ok()) {
    // Only a terminated context makes zmq_poll fail; Stop() follows.
    DV_LOG(kError) << "client I/O poll failed: " << ready.status();
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
    return;
  }
  const size_t n = socket_ptrs_.size();
  std::vector<int> lost;
  for (size_t idx : *ready) {
    if (idx < n) {
      // Drain everything that is waiting on this socket.
      for (;;) {
        auto msg = socket_ptrs_[idx]->Receive(std::chrono::milliseconds(0));
        if (!msg.ok()) break;
        HandleMessage(static_cast<int>(idx), *msg);
      }
    } else if (idx < 2 * n) {
      const size_t shard = idx - n;
      bool dropped = false;
      for (;;) {
        auto event = transport::ReadConnectionEvent(*links_[shard].monitor);
        if (!event.ok()) break;
        dropped = dropped || event->event == transport::ConnectionEvent::kDisconnected;
      }
      if (dropped) lost.push_back(static_cast<int>(shard));
    } else {
      uint64_t v;
      ssize_t n = ::read(wake_fd_, &v, sizeof(v));
      (void)n;
    }
  }
  // After the replies that were already in (they are answers, not losses).
  for (int shard : lost)
    if (!stop_.load()) OnConnectionLost(shard);
  CheckRetryDeadlines();
  SendQueued();
  SendHeartbeats();
  UpdateSharedMemoryStats();
}

Status Client::Impl::OpenShard(size_t i) {
  // The monitor goes before its socket.
  links_[i].monitor.reset();
  sockets_[i].reset();
  DV_ASSIGN_OR_RETURN(auto sock, transport::Socket::Create(
                                     *context_, transport::SocketType::kDealer, socket_options_));
  DV_ASSIGN_OR_RETURN(links_[i].monitor, transport::WatchConnections(*context_, *sock));
  DV_RETURN_IF_ERROR(
      sock->Connect(options_.ps_endpoints[i]).WithContext("shard " + std::to_string(i)));
  socket_ptrs_[i] = sock.get();
  sockets_[i] = std::move(sock);
  RebuildPollList();
  return OkStatus();
}

void Client::Impl::RebuildPollList() {
  poll_ptrs_.clear();
  for (transport::Socket* s : socket_ptrs_) poll_ptrs_.push_back(s);
  for (const Link& l : links_) poll_ptrs_.push_back(l.monitor.get());
}

protocol::Hello Client::Impl::MakeHello() const {
  protocol::Hello h;
  h.role = options_.role;
  h.worker_index = options_.worker_index;
  h.num_workers = options_.num_workers;
  h.num_shards = static_cast<int32_t>(options_.ps_endpoints.size());
  h.staleness = options_.expected_staleness;
  return h;
}

void Client::Impl::OnConnectionLost(int shard) {
  Link& link = links_[static_cast<size_t>(shard)];
  const std::string who =
      "shard " + std::to_string(shard) + " (" + options_.ps_endpoints[shard] + ")";
  if (!link.lost) {
    link.lost = true;
    link.gave_up = false;
    link.lost_since = Clock::now();
    DV_LOG(kWarning) << who << " unavailable: connection lost; reconnecting (backoff up to "
                     << options_.reconnect_backoff_max.count() << " ms) for up to "
                     << options_.retry_timeout.count() / 1000 << " s (retry timeout)";
  }
  // Whatever was sent on the old connection may be lost: everything not
  // answered goes again once the new one is greeted.
  for (auto& [id, p] : pending_)
    if (p.shard == shard) p.sent = false;
  // A new socket: a fresh connection (and shared-memory handshake) to
  // whatever process serves the endpoint now.
  Status opened = OpenShard(static_cast<size_t>(shard));
  if (!opened.ok()) {
    DV_LOG(kError) << who << ": cannot rebuild the connection: " << opened;
    link.gave_up = true;
    FailPending(shard,
                UnavailableError(who + ": cannot rebuild the connection: " + opened.message()));
    return;
  }
  Request r = NewRequest();
  r.body = MakeHello();
  link.rejoin_id = r.request_id;
  transport::OutMessage out;
  out.push_back(Payload::Copy(protocol::EncodeRequest(r)));
  // Queued by ZeroMQ until the connection is up.
  sockets_[static_cast<size_t>(shard)]
      ->Send(std::move(out), std::chrono::milliseconds(0))
      .IgnoreError();
  last_send_[static_cast<size_t>(shard)] = Clock::now();
}

bool Client::Impl::ShardHoldsVariables(int shard) const {
  std::lock_guard<std::mutex> lock(vars_mu_);
  for (const auto& [name, info] : vars_)
    if (info.placement.SliceOnShard(shard) != nullptr) return true;
  return false;
}

void Client::Impl::OnRejoined(int shard, const Reply& reply) {
  Link& link = links_[static_cast<size_t>(shard)];
  const std::string who =
      "shard " + std::to_string(shard) + " (" + options_.ps_endpoints[shard] + ")";
  link.rejoin_id = 0;
  link.lost = false;
  link.gave_up = false;
  const auto* hr = std::get_if<protocol::HelloReply>(&reply.body);
  if (reply.code != StatusCode::kOk || hr == nullptr) {
    const Status s =
        reply.code != StatusCode::kOk
            ? Status(reply.code, who + " refused the hello after reconnecting: " + reply.message)
            : InternalError(who + ": hello reply without body");
    DV_LOG(kError) << s;
    FailPending(shard, s);
    return;
  }
  {
    std::lock_guard<std::mutex> lock(stats_mu_);
    stats_.reconnects += 1;
    min_clocks_[static_cast<size_t>(shard)] = reply.min_clock;
  }
  const bool restarted = link.incarnation != 0 && hr->incarnation != link.incarnation;
  link.incarnation = hr->incarnation;
  const auto down =
      std::chrono::duration_cast<std::chrono::milliseconds>(Clock::now() - link.lost_since);
  if (restarted && hr->num_variables == 0 && ShardHoldsVariables(shard)) {
    const Status s = FailedPreconditionError(
        who +
        " restarted without its variables (start it with --restore latest and its "
        "--checkpoint-dir to continue the job)");
    DV_LOG(kError) << s;
    FailPending(shard, s);
    return;
  }
  // What the shard must still have: the steps it acknowledged. Requests not
  // yet answered are resent, so a shard back at that clock loses nothing.
  const int64_t mine = acked_clock_.load();
  if (restarted && options_.role == protocol::Role::kWorker && hr->clock < mine) {
    const std::string why = who + " restarted from its checkpoint at clock " +
                            std::to_string(hr->clock) + "; this worker was at clock " +
                            std::to_string(mine) + ": roll back to clock " +
                            std::to_string(hr->clock);
    DV_LOG(kWarning) << why << " (down for " << down.count() << " ms)";
    {
      std::lock_guard<std::mutex> lock(stats_mu_);
      stats_.rollbacks += 1;
      rollback_reason_ = why;
    }
    rollback_clock_.store(hr->clock);
    FailPending(-1, AbortedError(why));
    return;
  }
  size_t waiting = 0;
  for (const auto& [id, p] : pending_) waiting += p.shard == shard ? 1 : 0;
  DV_LOG(kWarning) << who << " is back after " << down.count() << " ms"
                   << (restarted ? " (a new process, at clock " + std::to_string(hr->clock) + ")"
                                 : std::string())
                   << "; resending " << waiting << " request(s)";
  Resend(shard);
}

void Client::Impl::Resend(int shard) {
  std::vector<uint64_t> ids;
  for (const auto& [id, p] : pending_)
    if (p.shard == shard && !p.sent) ids.push_back(id);
  std::sort(ids.begin(), ids.end());
  for (uint64_t id : ids) {
    auto it = pending_.find(id);
    Pending& p = it->second;
    bool abandoned;
    {
      std::lock_guard<std::mutex> lock(p.state->mu);
      abandoned = p.state->abandoned;
    }
    if (abandoned) {
      // Its waiter left: the caller's buffers may be reused already.
      Pending gone = std::move(p);
      pending_.erase(it);
      outstanding_.fetch_sub(1);
      CompleteOne(gone, CancelledError("abandoned"));
      continue;
    }
    std::vector<Payload> frames;
    frames.reserve(p.frames.size());
    for (const Payload& f : p.frames) frames.push_back(f.Duplicate());
    Status s = SendMessage(shard, p, std::move(frames), nullptr);
    if (!s.ok()) {
      Pending failed = std::move(p);
      pending_.erase(it);
      outstanding_.fetch_sub(1);
      CompleteOne(failed, UnavailableError("shard " + std::to_string(shard) + " (" +
                                           options_.ps_endpoints[shard] + "): " + s.message()));
      continue;
    }
    p.sent = true;
    // A chunked reply starts over (pieces of the lost one never come).
    p.chunks_left = -1;
    p.chunk_status = OkStatus();
  }
  last_send_[static_cast<size_t>(shard)] = Clock::now();
}

void Client::Impl::FailPending(int shard, const Status& status) {
  std::vector<uint64_t> ids;
  for (const auto& [id, p] : pending_)
    if (shard < 0 || p.shard == shard) ids.push_back(id);
  for (uint64_t id : ids) {
    auto it = pending_.find(id);
    Pending p = std::move(it->second);
    pending_.erase(it);
    outstanding_.fetch_sub(1);
    CompleteOne(p, status);
  }
}

void Client::Impl::CheckRetryDeadlines() {
  const auto now = Clock::now();
  for (size_t i = 0; i < links_.size(); ++i) {
    Link& link = links_[i];
    if (!link.lost || link.gave_up || now - link.lost_since < options_.retry_timeout) continue;
    link.gave_up = true;
    const Status s =
        UnavailableError("shard " + std::to_string(i) + " (" + options_.ps_endpoints[i] +
                         "): connection lost and not back within the retry timeout of " +
                         std::to_string(options_.retry_timeout.count()) + " ms");
    DV_LOG(kError) << s;
    FailPending(static_cast<int>(i), s);
  }
}

void Client::Impl::Run() {
  const auto idle_poll = std::chrono::duration_cast<std::chrono::milliseconds>(
      std::max(options_.heartbeat_interval / 2, std::chrono::milliseconds(1)));
  std::unique_lock<std::mutex> lock(lease_->mu);
  auto next_heartbeat_check = Clock::now();
  while (!stop_.load()) {
    const auto now = Clock::now();
    bool take = false;
    auto wake = next_heartbeat_check;
    if (lease_->held) {
      // The holder sends the heartbeats and wakes this thread when it leaves
      // work behind: sleep (a heartbeat check that fell due while a caller
      // held the lease used to make this loop spin until it was free).
      wake = std::max(wake, now + idle_poll);
    } else {
      if (takeover_now_ || now >= next_heartbeat_check || !QueueEmpty()) {
        take = true;
      } else if (outstanding_.load() > 0) {
        const auto due = unattended_since_ + kTakeoverDelay;
        if (now >= due) {
          take = true;
        } else if (!takeover_timer_set_) {
          // Fired for an earlier request; the newest one is due later.
          StartTakeoverTimer(due - now);
        }
      }
    }
    if (!take) {
      background_sleeping_ = true;
      lock.unlock();
      pollfd fds[2] = {{background_fd_, POLLIN, 0}, {takeover_fd_, POLLIN, 0}};
      const auto ms = std::chrono::ceil<std::chrono::milliseconds>(wake - Clock::now()).count();
      const int n = ::poll(fds, 2, static_cast<int>(std::clamp<int64_t>(ms, 0, 60000)));
      bool fired = false;
      if (n > 0) {
        uint64_t v;
        for (const pollfd& f : fds)
          if (f.revents & POLLIN) {
            ssize_t r = ::read(f.fd, &v, sizeof(v));
            fired = fired || (f.fd == takeover_fd_ && r == sizeof(v));
          }
      }
      lock.lock();
      background_sleeping_ = false;
      if (fired) takeover_timer_set_ = false;
      continue;
    }
    lease_->held = true;
    lease_->background = true;
    takeover_now_ = false;
    lock.unlock();
    // Drive until nothing is left that nobody else would attend to.
    do {
      IoStep(idle_poll);
    } while (!stop_.load() && (outstanding_.load() > 0 || !QueueEmpty()));
    lock.lock();
    lease_->held = false;
    lease_->background = false;
    next_heartbeat_check = Clock::now() + idle_poll;
  }
  // Stopping: wait for a caller that holds the lease to give it back, then
  // fail whatever is still outstanding.
  lease_->cv.wait(lock, [&] { return !lease_->held; });
  lease_->held = true;
  lock.unlock();
  for (auto& [id, p] : pending_) CompleteOne(p, CancelledError("client shut down"));
  pending_.clear();
  outstanding_.store(0);
  std::lock_guard<std::mutex> queue_lock(queue_mu_);
  for (auto& cmd : queue_)
    for (auto& m : cmd.messages) {
      Pending p;
      p.shard = m.shard;
      p.state = cmd.state;
      CompleteOne(p, CancelledError("client shut down"));
    }
  queue_.clear();
}

// ---------------------------------------------------------------------------
Status RequestHandle::Wait(std::optional<std::chrono::milliseconds> timeout) {
  if (!state_) return OkStatus();
  const auto limit = timeout.value_or(state_->default_timeout);
  const auto deadline = Clock::now() + limit;
  if (state_->lease) Client::Impl::DriveUntilAnswered(*state_, deadline);
  std::unique_lock<std::mutex> lock(state_->mu);
  if (!state_->cv.wait_until(lock, deadline, [&] { return state_->DoneLocked(); })) {
    if (state_->outstanding_replies > 0) {
      state_->abandoned = true;
      std::string who;
      for (int s : state_->pending_shards) {
        if (!who.empty()) who += ", ";
        who += "shard " + std::to_string(s);
        if (state_->shard_names && s < static_cast<int>(state_->shard_names->size()))
          who += " (" + (*state_->shard_names)[s] + ")";
      }
      state_->Fail(DeadlineExceededError("no reply from " + who + " after " +
                                         std::to_string(limit.count()) + " ms"));
    } else {
      state_->Fail(DeadlineExceededError("ZeroMQ did not release the pushed buffer in time"));
    }
  }
  return state_->status;
}

// ---------------------------------------------------------------------------
Client::Client(const ClientOptions& options)
    : options_(options), impl_(std::make_unique<Impl>(options, this)) {}

Client::~Client() { impl_->Stop(); }

StatusOr<std::unique_ptr<Client>> Client::Connect(const ClientOptions& options) {
  if (options.num_workers < 1) return InvalidArgumentError("num_workers must be >= 1");
  if (options.role == protocol::Role::kWorker &&
      (options.worker_index < 0 || options.worker_index >= options.num_workers))
    return InvalidArgumentError("worker index " + std::to_string(options.worker_index) +
                                " out of range for " + std::to_string(options.num_workers) +
                                " workers");
  std::unique_ptr<Client> client(new Client(options));
  DV_RETURN_IF_ERROR(client->impl_->Start());

  const int n = static_cast<int>(options.ps_endpoints.size());
  auto state = client->impl_->NewState();
  auto replies = std::make_shared<std::vector<protocol::HelloReply>>(n);
  std::vector<Impl::Outgoing> msgs;
  for (int s = 0; s < n; ++s) {
    Impl::Outgoing m;
    m.shard = s;
    m.request = client->impl_->NewRequest();
    m.request.body = client->impl_->MakeHello();
    Impl* impl = client->impl_.get();
    m.on_reply = [replies, s, impl](const Reply& r, const InMessage&) -> Status {
      auto* hr = std::get_if<protocol::HelloReply>(&r.body);
      if (!hr) return InternalError("hello reply without body");
      (*replies)[s] = *hr;
      // On the lease holder: the process a lost connection must find again.
      impl->SetIncarnation(s, hr->incarnation);
      return OkStatus();
    };
    msgs.push_back(std::move(m));
  }
  RequestHandle h = client->impl_->Submit(std::move(msgs), state, false);
  auto start = Clock::now();
  auto step = std::chrono::milliseconds(5000);
  for (;;) {
    auto left = options.connect_timeout -
                std::chrono::duration_cast<std::chrono::milliseconds>(Clock::now() - start);
    if (left <= std::chrono::milliseconds(0)) left = std::chrono::milliseconds(1);
    {
      std::unique_lock<std::mutex> lock(state->mu);
      state->cv.wait_for(lock, std::min(step, left), [&] { return state->DoneLocked(); });
      if (state->DoneLocked()) break;
      if (Clock::now() - start >= options.connect_timeout) break;
      std::string who;
      for (int s : state->pending_shards) who += " " + options.ps_endpoints[s];
      DV_LOG(kInfo)
          << "waiting for parameter server(s)" << who << " ("
          << std::chrono::duration_cast<std::chrono::seconds>(Clock::now() - start).count()
          << " s so far, giving up after " << options.connect_timeout.count() / 1000 << " s)";
    }
  }
  Status s = h.Wait(std::chrono::milliseconds(1));
  if (s.code() == StatusCode::kDeadlineExceeded)
    return UnavailableError("could not reach every parameter server within " +
                            std::to_string(options.connect_timeout.count()) +
                            " ms: " + s.message());
  DV_RETURN_IF_ERROR(s);
  int64_t join_clock = 0;
  for (int i = 0; i < n; ++i) {
    const auto& r = (*replies)[i];
    if (r.num_shards != n)
      return FailedPreconditionError("shard " + std::to_string(i) + " (" + options.ps_endpoints[i] +
                                     ") says the job has " + std::to_string(r.num_shards) +
                                     " shards, this worker has " + std::to_string(n));
    join_clock = std::max(join_clock, r.clock);
  }
  if (options.role == protocol::Role::kWorker) {
    client->set_clock(join_clock);
    client->impl_->acked_clock_.store(join_clock);
  }
  return client;
}

int64_t Client::AcceptRollback() { return impl_->AcceptRollback(); }

int Client::num_shards() const { return static_cast<int>(options_.ps_endpoints.size()); }

ClientStats Client::stats() const {
  std::lock_guard<std::mutex> lock(impl_->stats_mu_);
  return impl_->stats_;
}

int64_t Client::last_min_clock() const {
  std::lock_guard<std::mutex> lock(impl_->stats_mu_);
  if (impl_->min_clocks_.empty()) return 0;
  return *std::min_element(impl_->min_clocks_.begin(), impl_->min_clocks_.end());
}

Status Client::CreateVariable(const std::string& name, DType dtype, const Shape& shape,
                              const VariableOptions& options) {
  if (name.empty()) return InvalidArgumentError("variable name is empty");
  VariableInfo info;
  info.spec.name = name;
  info.spec.dtype = dtype;
  info.spec.shape = shape.dims();
  info.spec.initializer = options.initializer;
  info.spec.optimizer = options.optimizer;
  info.spec.aggregation = options.aggregation;
  info.spec.staleness = options.staleness;
  info.shape = shape;
  if (!options.initial_values.empty()) {
    if (static_cast<int64_t>(options.initial_values.size()) != shape.num_elements())
      return InvalidArgumentError("variable '" + name +
                                  "': " + std::to_string(options.initial_values.size()) +
                                  " initial values for shape " + shape.ToString());
    if (dtype != DType::kF32)
      return InvalidArgumentError("variable '" + name + "': initial values need dtype f32");
  }
  {
    std::lock_guard<std::mutex> lock(impl_->vars_mu_);
    DV_ASSIGN_OR_RETURN(info.placement,
                        impl_->planner_->Place(name, dtype, shape, options.partitioner));
  }
  const int64_t row_elems = shape.row_elements();
  auto state = impl_->NewState();
  std::vector<Impl::Outgoing> msgs;
  for (const ShardSlice& slice : info.placement.slices) {
    Impl::Outgoing m;
    m.shard = slice.shard;
    m.request = impl_->NewRequest();
    protocol::CreateVariable cv;
    cv.spec = info.spec;
    cv.rows = {slice.row_begin, slice.row_end};
    if (!options.initial_values.empty()) {
      protocol::TensorRef ref;
      ref.frame = 1;
      ref.dtype = DType::kF32;
      ref.shape = shape.dims();
      if (!ref.shape.empty()) ref.shape[0] = slice.row_end - slice.row_begin;
      cv.spec.initializer.kind = protocol::InitValues{ref};
      const float* base = options.initial_values.data() + slice.row_begin * row_elems;
      size_t bytes = static_cast<size_t>((slice.row_end - slice.row_begin) * row_elems) * 4;
      m.payloads.push_back(Payload::Copy(
          std::span<const std::byte>(reinterpret_cast<const std::byte*>(base), bytes)));
    }
    m.request.body = cv;
    msgs.push_back(std::move(m));
  }
  DV_RETURN_IF_ERROR(impl_->Submit(std::move(msgs), state, false)
                         .Wait(options_.request_timeout)
                         .WithContext("creating variable '" + name + "'"));
  std::lock_guard<std::mutex> lock(impl_->vars_mu_);
  impl_->vars_[name] = std::move(info);
  return OkStatus();
}

StatusOr<const VariableInfo*> Client::Find(const std::string& name) const {
  std::lock_guard<std::mutex> lock(impl_->vars_mu_);
  auto it = impl_->vars_.find(name);
  if (it == impl_->vars_.end())
    return NotFoundError("variable '" + name + "' is not known to this client");
  return &it->second;  // map nodes are stable; entries are never erased
}

std::vector<std::string> Client::VariableNames() const {
  std::lock_guard<std::mutex> lock(impl_->vars_mu_);
  std::vector<std::string> names;
  for (const auto& [n, v] : impl_->vars_) names.push_back(n);
  return names;
}

StatusOr<PushBuffer> Client::AllocatePushBuffer(int64_t num_floats) {
  if (num_floats < 1 ||
      static_cast<uint64_t>(num_floats) > std::numeric_limits<size_t>::max() / sizeof(float))
    return InvalidArgumentError("push buffer of " + std::to_string(num_floats) +
                                " floats: must be at least 1 (and its bytes fit a size_t)");
  const size_t bytes = static_cast<size_t>(num_floats) * sizeof(float);
  PushBuffer b;
  bool colocated = false;
  for (int s = 0; s < num_shards(); ++s) colocated = colocated || impl_->SharedMemoryShard(s);
  if (colocated) {
    auto segment = transport::SharedSegment::Create(bytes);
    if (segment.ok()) {
      // Registered: the transport lends bytes inside it instead of copying.
      impl_->shared_memory().Add(*segment);
      b.values = std::span<float>(reinterpret_cast<float*>((*segment)->data()),
                                  static_cast<size_t>(num_floats));
      b.owner = std::move(*segment);
      b.shared_memory = true;
      return b;
    }
    DV_LOG(kWarning) << "push buffer of " << bytes
                     << " bytes stays out of shared memory (its pushes copy once more): "
                     << segment.status();
  }
  auto heap = std::shared_ptr<std::byte[]>(AlignedAlloc(bytes).release(), AlignedFree{});
  std::memset(heap.get(), 0, bytes);
  b.values =
      std::span<float>(reinterpret_cast<float*>(heap.get()), static_cast<size_t>(num_floats));
  b.owner = std::move(heap);
  return b;
}

namespace {

std::vector<int64_t> SliceShape(const VariableInfo& v, int64_t rows) {
  std::vector<int64_t> s = v.shape.dims();
  if (s.empty()) return {};
  s[0] = rows;
  return s;
}

// Copies a received float payload into `out`, which must have exactly the
// frame's element count, with `copy` (Impl::CopyBytes).
template <typename Copy>
Status CopyFrame(const protocol::TensorRef& ref, const InMessage& msg, std::span<float> out,
                 const Copy& copy) {
  if (ref.frame >= msg.size()) return InternalError("reply references a missing frame");
  const Frame& f = msg[ref.frame];
  if (ref.encoding != protocol::Encoding::kRaw || ref.dtype != DType::kF32)
    return UnimplementedError("only raw f32 pull replies are supported");
  if (f.size() != out.size_bytes())
    return InternalError("reply frame has " + std::to_string(f.size()) + " bytes, expected " +
                         std::to_string(out.size_bytes()));
  if (f.size()) copy(out.data(), f.data(), f.size());
  return OkStatus();
}

}  // namespace

RequestHandle Client::Pull(std::vector<PullTarget> targets) {
  // Group reads by shard: one message per shard.
  std::map<int, Impl::Outgoing> by_shard;
  for (const PullTarget& t : targets) {
    auto info_or = Find(t.variable);
    if (!info_or.ok()) return FailedHandle(info_or.status());
    const VariableInfo& v = **info_or;
    if (static_cast<int64_t>(t.out.size()) != v.num_elements())
      return FailedHandle(InvalidArgumentError(
          "pull of '" + t.variable + "': buffer has " + std::to_string(t.out.size()) +
          " floats, variable " + v.shape.ToString() + " has " + std::to_string(v.num_elements())));
    const int64_t row_elems = v.shape.row_elements();
    for (const ShardSlice& slice : v.placement.slices) {
      auto& m = by_shard[slice.shard];
      m.shard = slice.shard;
      if (!std::holds_alternative<protocol::Pull>(m.request.body)) {
        m.request = impl_->NewRequest();
        m.request.body = protocol::Pull{};
      }
      auto& pull = std::get<protocol::Pull>(m.request.body);
      protocol::Read r;
      r.variable = t.variable;
      r.rows = protocol::RowRange{slice.row_begin, slice.row_end};
      pull.reads.push_back(std::move(r));
      std::span<float> dst =
          t.out.subspan(static_cast<size_t>(slice.row_begin * row_elems),
                        static_cast<size_t>((slice.row_end - slice.row_begin) * row_elems));
      size_t read_index = pull.reads.size() - 1;
      m.pull_into.push_back(dst);
      auto prev = std::move(m.on_reply);
      m.on_reply = [copy = impl_->Copier(), prev = std::move(prev), dst, read_index](
                       const Reply& reply, const InMessage& msg) -> Status {
        if (prev) DV_RETURN_IF_ERROR(prev(reply, msg));
        auto* pr = std::get_if<protocol::PullReply>(&reply.body);
        if (!pr || read_index >= pr->tensors.size())
          return InternalError("pull reply lacks tensor " + std::to_string(read_index));
        return CopyFrame(pr->tensors[read_index], msg, dst, copy);
      };
    }
  }
  std::vector<Impl::Outgoing> msgs;
  int64_t bytes = 0;
  for (auto& [s, m] : by_shard) {
    // Large enough to gain from overlapping the copy with the transfer:
    // ask for pieces (the server may still answer whole; on_reply copes).
    const size_t chunk = impl_->PullChunkBytes(s);
    size_t total = 0;
    for (const auto& d : m.pull_into) total += d.size_bytes();
    if (chunk > 0 && total >= 2 * chunk) {
      std::get<protocol::Pull>(m.request.body).chunk_bytes = chunk;
    } else {
      m.pull_into.clear();
    }
    msgs.push_back(std::move(m));
  }
  for (const auto& t : targets) bytes += static_cast<int64_t>(t.out.size_bytes());
  {
    std::lock_guard<std::mutex> lock(impl_->stats_mu_);
    impl_->stats_.pulls += 1;
    impl_->stats_.bytes_pulled += bytes;
  }
  return impl_->Submit(std::move(msgs), impl_->NewState(), false);
}

RequestHandle Client::PullViews(std::vector<std::string> variables,
                                std::shared_ptr<std::vector<PulledVariable>> out) {
  out->clear();
  out->resize(variables.size());
  std::map<int, Impl::Outgoing> by_shard;
  for (size_t vi = 0; vi < variables.size(); ++vi) {
    auto info_or = Find(variables[vi]);
    if (!info_or.ok()) return FailedHandle(info_or.status());
    const VariableInfo& v = **info_or;
    (*out)[vi].name = variables[vi];
    (*out)[vi].slices.resize(v.placement.slices.size());
    (*out)[vi].version = UINT64_MAX;
    for (size_t si = 0; si < v.placement.slices.size(); ++si) {
      const ShardSlice& slice = v.placement.slices[si];
      auto& m = by_shard[slice.shard];
      m.shard = slice.shard;
      if (!std::holds_alternative<protocol::Pull>(m.request.body)) {
        m.request = impl_->NewRequest();
        m.request.body = protocol::Pull{};
      }
      auto& pull = std::get<protocol::Pull>(m.request.body);
      protocol::Read r;
      r.variable = variables[vi];
      r.rows = protocol::RowRange{slice.row_begin, slice.row_end};
      pull.reads.push_back(std::move(r));
      size_t read_index = pull.reads.size() - 1;
      int64_t expect = (slice.row_end - slice.row_begin) * v.shape.row_elements();
      PulledSlice* dst = &(*out)[vi].slices[si];
      dst->row_begin = slice.row_begin;
      dst->row_end = slice.row_end;
      uint64_t* version = &(*out)[vi].version;
      auto prev = std::move(m.on_reply);
      m.on_reply = [prev = std::move(prev), dst, version, read_index, expect, out](
                       const Reply& reply, const InMessage& msg) -> Status {
        if (prev) DV_RETURN_IF_ERROR(prev(reply, msg));
        auto* pr = std::get_if<protocol::PullReply>(&reply.body);
        if (!pr || read_index >= pr->tensors.size())
          return InternalError("pull reply lacks tensor " + std::to_string(read_index));
        const auto& ref = pr->tensors[read_index];
        if (ref.frame >= msg.size()) return InternalError("reply references a missing frame");
        const Frame& f = msg[ref.frame];
        if (ref.encoding != protocol::Encoding::kRaw ||
            f.size() != static_cast<size_t>(expect) * sizeof(float))
          return InternalError("pull reply frame has an unexpected size");
        dst->values = std::span<const float>(f.as<float>(), static_cast<size_t>(expect));
        dst->owner = f.owner();
        if (read_index < pr->versions.size())
          *version = std::min(*version, pr->versions[read_index]);
        return OkStatus();
      };
    }
  }
  std::vector<Impl::Outgoing> msgs;
  for (auto& [s, m] : by_shard) msgs.push_back(std::move(m));
  {
    std::lock_guard<std::mutex> lock(impl_->stats_mu_);
    impl_->stats_.pulls += 1;
  }
  return impl_->Submit(std::move(msgs), impl_->NewState(), false);
}

namespace {

// Releases one outstanding "buffer borrowed by ZeroMQ" count when the last
// payload referencing it is freed.
std::shared_ptr<const void> MakeReleaseToken(std::shared_ptr<RequestHandle::State> state) {
  {
    std::lock_guard<std::mutex> lock(state->mu);
    state->outstanding_releases += 1;
  }
  return std::shared_ptr<const void>(static_cast<const void*>(state.get()), [state](const void*) {
    std::lock_guard<std::mutex> lock(state->mu);
    state->outstanding_releases -= 1;
    if (state->DoneLocked()) state->cv.notify_all();
  });
}

Payload BorrowFloats(const float* data, size_t count, const std::shared_ptr<const void>& token) {
  return Payload::Borrow(data, count * sizeof(float), token);
}

}  // namespace

RequestHandle Client::Push(std::vector<PushSource> sources, bool advance_clock) {
  auto state = impl_->NewState();
  std::map<int, Impl::Outgoing> by_shard;
  if (advance_clock) {
    for (int s = 0; s < num_shards(); ++s) {
      auto& m = by_shard[s];
      m.shard = s;
      m.request = impl_->NewRequest();
      m.request.body = protocol::Push{{}, true};
    }
  }
  std::shared_ptr<const void> token;
  int64_t bytes = 0;
  for (const PushSource& src : sources) {
    auto info_or = Find(src.variable);
    if (!info_or.ok()) return FailedHandle(info_or.status());
    const VariableInfo& v = **info_or;
    if (static_cast<int64_t>(src.grad.size()) != v.num_elements())
      return FailedHandle(InvalidArgumentError(
          "push of '" + src.variable + "': gradient has " + std::to_string(src.grad.size()) +
          " floats, variable " + v.shape.ToString() + " has " + std::to_string(v.num_elements())));
    if (!token) token = MakeReleaseToken(state);
    bytes += static_cast<int64_t>(src.grad.size_bytes());
    const int64_t row_elems = v.shape.row_elements();
    for (const ShardSlice& slice : v.placement.slices) {
      auto& m = by_shard[slice.shard];
      m.shard = slice.shard;
      if (!std::holds_alternative<protocol::Push>(m.request.body)) {
        m.request = impl_->NewRequest();
        m.request.body = protocol::Push{{}, advance_clock};
      }
      auto& push = std::get<protocol::Push>(m.request.body);
      protocol::Update u;
      u.variable = src.variable;
      u.values.frame = static_cast<uint32_t>(m.payloads.size() + 1);
      u.values.dtype = DType::kF32;
      u.values.shape = SliceShape(v, slice.row_end - slice.row_begin);
      u.rows = protocol::RowRange{slice.row_begin, slice.row_end};
      push.updates.push_back(std::move(u));
      m.payloads.push_back(
          BorrowFloats(src.grad.data() + slice.row_begin * row_elems,
                       static_cast<size_t>((slice.row_end - slice.row_begin) * row_elems), token));
    }
  }
  token.reset();  // the payloads hold it now
  std::vector<Impl::Outgoing> msgs;
  for (auto& [s, m] : by_shard) {
    // One large dense gradient: in pieces, each checked and applied by the
    // server while the next is on its way.
    auto& push = std::get<protocol::Push>(m.request.body);
    const size_t chunk = impl_->PushChunkBytes(s);
    if (chunk > 0 && push.updates.size() == 1 && m.payloads.size() == 1 &&
        m.payloads[0].size() >= 2 * chunk) {
      push.chunks = static_cast<uint32_t>((m.payloads[0].size() + chunk - 1) / chunk);
      push.updates[0].values.frame = 0;
      m.push_chunk_bytes = chunk;
    }
    msgs.push_back(std::move(m));
  }
  if (advance_clock) clock_.fetch_add(1);
  {
    std::lock_guard<std::mutex> lock(impl_->stats_mu_);
    impl_->stats_.pushes += 1;
    impl_->stats_.bytes_pushed += bytes;
  }
  return impl_->Submit(std::move(msgs), state, true);
}

namespace {

// OutOfRange unless `rows` lies within the variable; InvalidArgument unless
// `values` floats hold exactly those rows.
Status CheckRowRange(const VariableInfo& v, protocol::RowRange rows, size_t values,
                     const char* what) {
  const std::string name = std::string(what) + " of '" + v.spec.name + "'";
  if (rows.begin < 0 || rows.end > v.shape.rows() || rows.begin > rows.end)
    return OutOfRangeError(name + ": rows [" + std::to_string(rows.begin) + ", " +
                           std::to_string(rows.end) + ") outside [0, " +
                           std::to_string(v.shape.rows()) + ")");
  const int64_t need = rows.size() * v.shape.row_elements();
  if (static_cast<int64_t>(values) != need)
    return InvalidArgumentError(name + ": " + std::to_string(values) + " floats given, rows need " +
                                std::to_string(need));
  return OkStatus();
}

}  // namespace

RequestHandle Client::PullRange(const std::string& variable, protocol::RowRange rows,
                                std::span<float> out) {
  auto info_or = Find(variable);
  if (!info_or.ok()) return FailedHandle(info_or.status());
  const VariableInfo& v = **info_or;
  const int64_t row_elems = v.shape.row_elements();
  if (Status bad = CheckRowRange(v, rows, out.size(), "pull"); !bad.ok()) return FailedHandle(bad);
  std::vector<Impl::Outgoing> msgs;
  for (const ShardSlice& slice : v.placement.slices) {
    int64_t b = std::max(rows.begin, slice.row_begin), e = std::min(rows.end, slice.row_end);
    if (b >= e) continue;
    Impl::Outgoing m;
    m.shard = slice.shard;
    m.request = impl_->NewRequest();
    protocol::Pull pull;
    pull.reads.push_back(
        protocol::Read{variable, protocol::Encoding::kRaw, protocol::RowRange{b, e}});
    m.request.body = std::move(pull);
    std::span<float> dst = out.subspan(static_cast<size_t>((b - rows.begin) * row_elems),
                                       static_cast<size_t>((e - b) * row_elems));
    m.on_reply = [copy = impl_->Copier(), dst](const Reply& reply, const InMessage& msg) -> Status {
      auto* pr = std::get_if<protocol::PullReply>(&reply.body);
      if (!pr || pr->tensors.empty()) return InternalError("pull reply lacks its tensor");
      return CopyFrame(pr->tensors[0], msg, dst, copy);
    };
    msgs.push_back(std::move(m));
  }
  return impl_->Submit(std::move(msgs), impl_->NewState(), false);
}

RequestHandle Client::PushRange(const std::string& variable, protocol::RowRange rows,
                                std::span<const float> grad) {
  auto info_or = Find(variable);
  if (!info_or.ok()) return FailedHandle(info_or.status());
  const VariableInfo& v = **info_or;
  const int64_t row_elems = v.shape.row_elements();
  if (Status bad = CheckRowRange(v, rows, grad.size(), "push"); !bad.ok()) return FailedHandle(bad);
  auto state = impl_->NewState();
  auto token = MakeReleaseToken(state);
  std::vector<Impl::Outgoing> msgs;
  for (const ShardSlice& slice : v.placement.slices) {
    int64_t b = std::max(rows.begin, slice.row_begin), e = std::min(rows.end, slice.row_end);
    if (b >= e) continue;
    Impl::Outgoing m;
    m.shard = slice.shard;
    m.request = impl_->NewRequest();
    protocol::Update u;
    u.variable = variable;
    u.values.frame = 1;
    u.values.shape = SliceShape(v, e - b);
    u.rows = protocol::RowRange{b, e};
    m.request.body = protocol::Push{{std::move(u)}, false};
    m.payloads.push_back(BorrowFloats(grad.data() + (b - rows.begin) * row_elems,
                                      static_cast<size_t>((e - b) * row_elems), token));
    msgs.push_back(std::move(m));
  }
  token.reset();
  return impl_->Submit(std::move(msgs), state, true);
}

namespace {

struct RowGroup {
  std::vector<int64_t> indices;   // global rows for this shard
  std::vector<size_t> positions;  // where each row sits in the caller's order
};

Status GroupRows(const VariableInfo& v, std::span<const int64_t> indices,
                 std::map<int, RowGroup>* groups) {
  const int64_t rows = v.shape.rows();
  for (size_t i = 0; i < indices.size(); ++i) {
    int64_t r = indices[i];
    if (r < 0 || r >= rows)
      return OutOfRangeError("variable '" + v.spec.name + "': row " + std::to_string(r) +
                             " outside [0, " + std::to_string(rows) + ")");
    auto& g = (*groups)[v.placement.ShardOfRow(r)];
    g.indices.push_back(r);
    g.positions.push_back(i);
  }
  return OkStatus();
}

// Checks that `values` floats hold indices.size() rows of `v`, then groups the
// rows by the shard that holds them.
StatusOr<std::map<int, RowGroup>> GroupRowsChecked(const VariableInfo& v,
                                                   std::span<const int64_t> indices, size_t values,
                                                   const char* what) {
  const size_t need = indices.size() * static_cast<size_t>(v.shape.row_elements());
  if (values != need)
    return InvalidArgumentError(
        std::string(what) + " of '" + v.spec.name + "': " + std::to_string(values) +
        " floats given, " + std::to_string(indices.size()) + " rows need " + std::to_string(need));
  std::map<int, RowGroup> groups;
  DV_RETURN_IF_ERROR(GroupRows(v, indices, &groups));
  return groups;
}

// The TensorRef of n i64 row indices in payload frame 1.
protocol::TensorRef IndexRef(size_t n) {
  protocol::TensorRef idx;
  idx.frame = 1;
  idx.dtype = DType::kI64;
  idx.shape = {static_cast<int64_t>(n)};
  return idx;
}

Payload IndexPayload(std::vector<int64_t> indices) {
  auto holder = std::make_shared<std::vector<int64_t>>(std::move(indices));
  return Payload::Borrow(holder->data(), holder->size() * sizeof(int64_t), holder);
}

}  // namespace

RequestHandle Client::PullRows(const std::string& variable, std::span<const int64_t> indices,
                               std::span<float> out) {
  auto info_or = Find(variable);
  if (!info_or.ok()) return FailedHandle(info_or.status());
  const VariableInfo& v = **info_or;
  const int64_t row_elems = v.shape.row_elements();
  auto groups = GroupRowsChecked(v, indices, out.size(), "sparse pull");
  if (!groups.ok()) return FailedHandle(groups.status());
  std::vector<Impl::Outgoing> msgs;
  for (auto& [shard, g] : *groups) {
    Impl::Outgoing m;
    m.shard = shard;
    m.request = impl_->NewRequest();
    const protocol::TensorRef idx = IndexRef(g.indices.size());
    protocol::Pull pull;
    pull.reads.push_back(protocol::Read{variable, protocol::Encoding::kRaw, idx});
    m.request.body = std::move(pull);
    m.payloads.push_back(IndexPayload(g.indices));
    m.on_reply = [positions = g.positions, out, row_elems](const Reply& reply,
                                                           const InMessage& msg) -> Status {
      auto* pr = std::get_if<protocol::PullReply>(&reply.body);
      if (!pr || pr->tensors.empty()) return InternalError("pull reply lacks its tensor");
      const auto& ref = pr->tensors[0];
      if (ref.frame >= msg.size()) return InternalError("reply references a missing frame");
      const Frame& f = msg[ref.frame];
      size_t row_bytes = static_cast<size_t>(row_elems) * sizeof(float);
      if (f.size() != positions.size() * row_bytes)
        return InternalError("sparse pull reply has an unexpected size");
      for (size_t i = 0; i < positions.size(); ++i)
        std::memcpy(out.data() + positions[i] * static_cast<size_t>(row_elems),
                    f.data() + i * row_bytes, row_bytes);
      return OkStatus();
    };
    msgs.push_back(std::move(m));
  }
  return impl_->Submit(std::move(msgs), impl_->NewState(), false);
}

RequestHandle Client::PushRows(const std::string& variable, std::span<const int64_t> indices,
                               std::span<const float> grad) {
  auto info_or = Find(variable);
  if (!info_or.ok()) return FailedHandle(info_or.status());
  const VariableInfo& v = **info_or;
  const int64_t row_elems = v.shape.row_elements();
  auto groups = GroupRowsChecked(v, indices, grad.size(), "sparse push");
  if (!groups.ok()) return FailedHandle(groups.status());
  std::vector<Impl::Outgoing> msgs;
  for (auto& [shard, g] : *groups) {
    Impl::Outgoing m;
    m.shard = shard;
    m.request = impl_->NewRequest();
    const protocol::TensorRef idx = IndexRef(g.indices.size());
    protocol::Update u;
    u.variable = variable;
    u.values.frame = 2;
    u.values.shape = SliceShape(v, static_cast<int64_t>(g.indices.size()));
    u.rows = idx;
    m.request.body = protocol::Push{{std::move(u)}, false};
    m.payloads.push_back(IndexPayload(g.indices));
    // Gather this shard's rows into one contiguous buffer.
    auto rows =
        std::make_shared<std::vector<float>>(g.indices.size() * static_cast<size_t>(row_elems));
    for (size_t i = 0; i < g.positions.size(); ++i)
      std::memcpy(rows->data() + i * static_cast<size_t>(row_elems),
                  grad.data() + g.positions[i] * static_cast<size_t>(row_elems),
                  static_cast<size_t>(row_elems) * sizeof(float));
    m.payloads.push_back(Payload::Borrow(rows->data(), rows->size() * sizeof(float), rows));
    msgs.push_back(std::move(m));
  }
  return impl_->Submit(std::move(msgs), impl_->NewState(), false);
}

namespace {
// Builds one message per shard with the same body.
template <typename Body>
std::vector<Client::Impl::Outgoing> ToEveryShard(Client::Impl* impl, int shards, const Body& body) {
  std::vector<Client::Impl::Outgoing> msgs;
  for (int s = 0; s < shards; ++s) {
    Client::Impl::Outgoing m;
    m.shard = s;
    m.request = impl->NewRequest();
    m.request.body = body;
    msgs.push_back(std::move(m));
  }
  return msgs;
}
}  // namespace

Status Client::AdvanceClock() {
  auto msgs = ToEveryShard(impl_.get(), num_shards(), protocol::AdvanceClock{-1});
  clock_.fetch_add(1);
  return impl_->Submit(std::move(msgs), impl_->NewState(), false).Wait(options_.request_timeout);
}

Status Client::Barrier(const std::string& name) {
  // Shard 0 coordinates barriers.
  Impl::Outgoing m;
  m.shard = 0;
  m.request = impl_->NewRequest();
  m.request.body = protocol::Barrier{name};
  std::vector<Impl::Outgoing> msgs;
  msgs.push_back(std::move(m));
  return impl_->Submit(std::move(msgs), impl_->NewState(), false).Wait(options_.request_timeout);
}

Status Client::SetStaleness(int32_t staleness, const std::string& variable, bool stale_aware_lr,
                            int64_t at_clock) {
  protocol::SetMode body{staleness, variable, stale_aware_lr, at_clock};
  return impl_->Submit(ToEveryShard(impl_.get(), num_shards(), body), impl_->NewState(), false)
      .Wait(options_.request_timeout);
}

Status Client::SetLearningRate(double learning_rate, const std::string& variable) {
  protocol::SetLearningRate body{variable, learning_rate};
  auto msgs = ToEveryShard(impl_.get(), num_shards(), body);
  if (!variable.empty()) {
    // Only the shards that hold the variable know it: its placement when
    // this client created or found it, else the shards' own reports.
    std::vector<bool> holds(static_cast<size_t>(num_shards()), false);
    if (auto info = Find(variable); info.ok()) {
      for (const ShardSlice& slice : (*info)->placement.slices)
        holds[static_cast<size_t>(slice.shard)] = true;
    } else {
      DV_ASSIGN_OR_RETURN(std::vector<protocol::StatsReply> stats, Stats());
      for (size_t i = 0; i < stats.size(); ++i)
        for (const auto& v : stats[i].variables) holds[i] = holds[i] || v.name == variable;
    }
    std::erase_if(msgs, [&](const auto& m) { return !holds[static_cast<size_t>(m.shard)]; });
    if (msgs.empty()) return NotFoundError("variable '" + variable + "' is on no shard");
  }
  return impl_->Submit(std::move(msgs), impl_->NewState(), false).Wait(options_.request_timeout);
}

StatusOr<std::vector<protocol::StatsReply>> Client::Stats() {
  auto msgs = ToEveryShard(impl_.get(), num_shards(), protocol::Stats{});
  auto out = std::make_shared<std::vector<protocol::StatsReply>>(msgs.size());
  for (auto& m : msgs) {
    int s = m.shard;
    m.on_reply = [out, s](const Reply& r, const InMessage&) -> Status {
      auto* sr = std::get_if<protocol::StatsReply>(&r.body);
      if (!sr) return InternalError("stats reply without body");
      (*out)[s] = *sr;
      return OkStatus();
    };
  }
  DV_RETURN_IF_ERROR(
      impl_->Submit(std::move(msgs), impl_->NewState(), false).Wait(options_.request_timeout));
  return std::move(*out);
}

StatusOr<std::vector<protocol::CheckpointReply>> Client::Checkpoint(const std::string& directory) {
  auto msgs = ToEveryShard(impl_.get(), num_shards(), protocol::Checkpoint{directory});
  auto out = std::make_shared<std::vector<protocol::CheckpointReply>>(msgs.size());
  for (auto& m : msgs) {
    int s = m.shard;
    m.on_reply = [out, s](const Reply& r, const InMessage&) -> Status {
      auto* cr = std::get_if<protocol::CheckpointReply>(&r.body);
      if (!cr) return InternalError("checkpoint reply without body");
      (*out)[s] = *cr;
      return OkStatus();
    };
  }
  DV_RETURN_IF_ERROR(
      impl_->Submit(std::move(msgs), impl_->NewState(), false).Wait(options_.request_timeout));
  return std::move(*out);
}

Status Client::ShutdownServers(bool checkpoint_first) {
  return impl_
      ->Submit(ToEveryShard(impl_.get(), num_shards(), protocol::Shutdown{checkpoint_first}),
               impl_->NewState(), false)
      .Wait(options_.request_timeout);
}

}  // namespace distval
