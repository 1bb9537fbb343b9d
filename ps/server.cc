#include "server.h"

#include <sys/eventfd.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <condition_variable>
#include <cstring>
#include <deque>
#include <map>
#include <mutex>
#include <random>
#include <set>
#include <thread>
#include <unordered_map>
#include <unordered_set>

#include "checkpoint.h"
#include "consistency_controller.h"
#include "distval/encoding.h"
#include "distval/float_env.h"
#include "distval/logging.h"
#include "distval/range_pool.h"
#include "distval/transport.h"
#include "distval/zap_authenticator.h"
#include "server_telemetry.h"
#include "variable_store.h"

namespace distval::ps {

using protocol::Reply;
using protocol::Request;
using transport::Frame;
using transport::InMessage;
using transport::Payload;

StatusOr<int32_t> ParseStaleness(const std::string& text) {
  if (text == "async") return protocol::kStalenessAsync;
  if (text == "bsp" || text == "sync") return 0;
  std::string t = text.rfind("ssp:", 0) == 0 ? text.substr(4) : text;
  if (t.empty() || t.size() > 9 || !std::all_of(t.begin(), t.end(), ::isdigit))
    return InvalidArgumentError("staleness '" + text +
                                "' is not 0 (BSP), a positive number (SSP) or 'async'");
  return static_cast<int32_t>(std::stol(t));
}

std::string StalenessName(int32_t staleness) {
  if (staleness < 0) return "async";
  if (staleness == 0) return "bsp";
  return "ssp:" + std::to_string(staleness);
}

StatusOr<NanPolicy> ParseNanPolicy(const std::string& text) {
  if (text == "reject") return NanPolicy::kReject;
  if (text == "skip") return NanPolicy::kSkip;
  if (text == "allow") return NanPolicy::kAllow;
  return InvalidArgumentError("nan policy '" + text + "' is not reject, skip or allow");
}

Status ParseCheckpointEvery(const std::string& text, ServerOptions* options) {
  const bool seconds = !text.empty() && text.back() == 's';
  const std::string number = seconds ? text.substr(0, text.size() - 1) : text;
  const Status bad = InvalidArgumentError("checkpoint interval '" + text +
                                          "' is not N (clocks) or Ns (seconds) with N > 0");
  if (number.empty() || number.size() > 12 || !std::all_of(number.begin(), number.end(), ::isdigit))
    return bad;
  const int64_t n = std::stoll(number);
  if (n <= 0) return bad;
  options->checkpoint_every_clocks = seconds ? 0 : n;
  options->checkpoint_every_seconds = seconds ? static_cast<double>(n) : 0;
  return OkStatus();
}

namespace {

// One worker's gradient for one (clock, variable) in BSP, kept until the
// clock completes. Frames are kept alive (no copy) when they are raw f32.
struct Contribution {
  bool sparse = false;
  protocol::RowRange rows;            // dense
  std::vector<int64_t> indices;       // sparse (global rows)
  std::span<const float> values;      // gradient values
  std::shared_ptr<const void> owner;  // keeps `values` alive
  bool lent = false;                  // `values` are a co-located worker's memory
};

// Gradient values of an update as f32: the received frame itself when it is
// raw and aligned, else a decoded / realigned copy.
struct FloatPayload {
  std::span<const float> values;
  std::shared_ptr<const void> owner;
};

// Drops the frames co-located senders lent (Frame::lent): the sender gets
// its memory back, and its request completes, once the last copy is gone.
void ReleaseLentFrames(InMessage& msg) {
  for (Frame& f : msg)
    if (f.lent()) f = Frame();
}

// protocol::CountNonFinite, spread over the apply threads for raw floats.
size_t CountNonFiniteOn(const VariableStore::RangeRunner& runner, std::span<const std::byte> bytes,
                        protocol::Encoding encoding) {
  if (encoding != protocol::Encoding::kRaw || bytes.size() % sizeof(float) != 0)
    return protocol::CountNonFinite(bytes, encoding);
  std::atomic<size_t> bad{0};
  runner(static_cast<int64_t>(bytes.size() / sizeof(float)), [&](int64_t begin, int64_t end) {
    const auto from = static_cast<size_t>(begin) * sizeof(float);
    const auto to = static_cast<size_t>(end) * sizeof(float);
    bad.fetch_add(protocol::CountNonFinite(bytes.subspan(from, to - from), encoding),
                  std::memory_order_relaxed);
  });
  return bad.load();
}

bool AnyLent(const InMessage& msg) {
  return std::any_of(msg.begin(), msg.end(), [](const Frame& f) { return f.lent(); });
}

FloatPayload ToFloats(const protocol::TensorRef& ref, const Frame& frame) {
  FloatPayload out;
  const size_t n = static_cast<size_t>(ref.num_elements());
  if (ref.encoding == protocol::Encoding::kRaw) {
    Frame f = frame.Realigned(alignof(float));
    out.values = std::span<const float>(f.as<float>(), n);
    out.owner = f.owner();
    return out;
  }
  auto buf = std::make_shared<std::vector<float>>(n);
  protocol::DecodeFloats(frame.bytes(), ref.encoding, *buf);
  out.values = *buf;
  out.owner = buf;
  return out;
}

// The piece size of a chunked pull reply of `total` bytes, for a sender that
// asked for pieces of `asked` bytes (Pull::chunk_bytes); 0: reply whole (not
// asked, or it would be a single piece). Pieces are at least 64 KiB, a
// multiple of 64 bytes, and at most 1024 per reply.
size_t PullChunkBytes(uint64_t asked, size_t total) {
  if (asked == 0) return 0;
  constexpr size_t kMin = 64 * 1024, kMaxPieces = 1024;
  size_t chunk =
      std::max<size_t>(kMin, static_cast<size_t>(std::min<uint64_t>(asked, SIZE_MAX / 2)));
  chunk = std::max(chunk, (total + kMaxPieces - 1) / kMaxPieces);
  chunk = (chunk + 63) / 64 * 64;
  return total > chunk ? chunk : 0;
}

// Makes every frame of `msg` complete (see transport::Frame::streaming):
// waits for streaming ones, reads ring ones through into owned storage.
Status WaitComplete(InMessage& msg) {
  for (Frame& f : msg) {
    if (!f.streaming()) continue;
    DV_ASSIGN_OR_RETURN(f, f.Materialized());
  }
  return OkStatus();
}

std::vector<int64_t> ToIndices(const protocol::TensorRef& ref, const Frame& frame) {
  std::vector<int64_t> idx(static_cast<size_t>(ref.num_elements()));
  if (!idx.empty()) std::memcpy(idx.data(), frame.data(), idx.size() * sizeof(int64_t));
  return idx;
}

}  // namespace

// ---------------------------------------------------------------------------
class Server::Impl {
 public:
  explicit Impl(const ServerOptions& options) : options_(options), pool_(PoolOptions(options)) {}
  ~Impl() {
    socket_.reset();
    zap_.reset();
    context_.reset();
    if (wake_fd_ >= 0) ::close(wake_fd_);
  }

  Status Init();
  Status Run();
  void Stop() {
    stop_.store(true);
    uint64_t one = 1;
    ssize_t n = ::write(wake_fd_, &one, sizeof(one));
    (void)n;
  }
  const std::string& endpoint() const { return endpoint_; }

 private:
  // A request waiting for the controller (a held pull or a barrier).
  struct Held {
    Frame identity;
    Request request;
    InMessage frames;  // the whole message (payload frames for sparse indices)
    TimePoint arrived = ControllerClock::now();
  };

  void HandleMessage(InMessage& msg);
  void Dispatch(const Frame& identity, Request& request, InMessage& msg);
  void SendReply(const Frame& identity, Reply reply, std::vector<Payload> payloads = {});
  void SendError(const Frame& identity, uint64_t request_id, const Status& status);
  Reply NewReply(uint64_t request_id) const;

  Status HandleHello(const Frame& identity, const Request& req);
  Status HandleCreate(const Request& req, const InMessage& msg);
  // Validates and routes a push. On success it acknowledges the push first
  // and then applies it (the reply is on its way while the optimizer runs,
  // so the apply overlaps the client's next transfer; requests behind it in
  // the socket are handled after the apply, so a later pull reflects it).
  // On error nothing is applied and nothing is sent: the caller replies.
  // What a chunked push did while its pieces arrived (see PushStream):
  // checked them for NaN/Inf (`checked`, `non_finite`), and, for a plain SGD
  // variable, applied them out of place (`fused`: HandlePush commits it
  // instead of applying; when something else changed the variable
  // meanwhile it applies `assemble()`'s contiguous gradient instead).
  struct PushPrep {
    bool checked = false;
    size_t non_finite = 0;
    VariableStore::CheckedUpdate* fused = nullptr;
    // The values were kept as the pieces they came in (frame 1 is empty):
    // assemble() copies them into one frame; apply_pieces (when set) applies
    // them from where they are, as ApplyDense would.
    std::function<StatusOr<Frame>()> assemble;
    std::function<Status(Variable&, protocol::RowRange, float lr_scale)> apply_pieces;
  };
  Status HandlePush(const Frame& identity, const Request& req, InMessage& msg,
                    PushPrep* prep = nullptr);
  // Chunked pushes (protocol::Push::chunks): the header opens a PushStream,
  // each PushChunk feeds it, the last one hands it to HandlePush. Errors of
  // the header are answered at once (its pieces are then dropped quietly);
  // later ones once the last piece is in.
  Status OpenPushStream(const Frame& identity, const Request& req);
  void OnPushChunk(const Frame& identity, const Request& req, const InMessage& msg);
  // Answers and drops streams whose pieces stopped coming (a sender that died).
  void ExpirePushStreams();
  void HandlePull(const Frame& identity, Request& req, InMessage& msg);
  Status ValidatePull(const protocol::Pull& pull, const InMessage& msg);
  void AnswerPull(const Held& held);
  void HandleBarrier(const Frame& identity, const Request& req);
  void CheckBarriers();
  Status HandleSetMode(const Request& req);
  protocol::StatsReply MakeStats() const;

  void Act(Events events);
  void ApplyCompleted(const CompletedClock& done);
  // VariableStore::ApplyDenseStreaming of a gradient a co-located worker is
  // still copying in (a streaming frame), in pieces of at most 256 KiB read
  // through Frame::Window as they arrive.
  Status ApplyStreamed(Variable& v, protocol::RowRange rows, const Frame& frame, float lr_scale,
                       size_t* non_finite);

  // Checkpoints: restores options_.restore (Init), writes one under `root`
  // now (state is consistent between two messages), or when the interval
  // set by the options has passed.
  Status RestoreFromCheckpoint();
  StatusOr<protocol::CheckpointReply> WriteCheckpointNow(const std::string& root);
  void MaybeCheckpoint();
  int64_t last_checkpoint_clock_ = 0;
  std::chrono::steady_clock::time_point last_checkpoint_time_ = std::chrono::steady_clock::now();
  std::string last_checkpoint_;
  // Push updates with NaN/Inf rejected or skipped (--nan-policy).
  uint64_t nan_updates_ = 0;
  // Request ids of the pushes each worker had acknowledged lately (the last
  // kDedupeWindow), so that a push it retries after a lost reply is
  // acknowledged again but not applied twice. Kept across the worker's
  // hellos: a client that lost its connection says hello again and then
  // resends what was not answered (request ids start at a random point, so
  // a restarted worker's ids do not collide with its predecessor's).
  static constexpr size_t kDedupeWindow = 4096;
  struct RecentPushes {
    std::deque<uint64_t> order;
    std::unordered_set<uint64_t> ids;
  };
  std::unordered_map<int32_t, RecentPushes> recent_pushes_;
  bool SeenPush(int32_t worker, uint64_t request_id) const {
    auto it = recent_pushes_.find(worker);
    return it != recent_pushes_.end() && it->second.ids.count(request_id) > 0;
  }
  void RecordPush(int32_t worker, uint64_t request_id) {
    RecentPushes& r = recent_pushes_[worker];
    if (!r.ids.insert(request_id).second) return;
    r.order.push_back(request_id);
    if (r.order.size() > kDedupeWindow) {
      r.ids.erase(r.order.front());
      r.order.pop_front();
    }
  }

  ServerOptions options_;
  // Random id of this process, in every HelloReply (clients tell a restarted
  // shard from a reconnection to the same one).
  const uint64_t incarnation_ = [] {
    std::random_device rd;
    const uint64_t r = (uint64_t{rd()} << 32) ^ uint64_t { rd() };
    return r == 0 ? 1 : r;
  }();
  // Clock of the checkpoint restored at start; -1: none.
  int64_t restored_clock_ = -1;
  // Applies and whole-gradient checks over the --threads cores; units are
  // floats (the defaults: whole 64-byte lines per chunk, at least 256 KiB).
  static RangePool::Options PoolOptions(const ServerOptions& options) {
    RangePool::Options o;
    o.threads = options.threads;
    o.thread_init = [] { SetFlushDenormalsToZero(); };
    return o;
  }
  RangePool pool_;
  VariableStore::RangeRunner runner_ =
      [this](int64_t n, const std::function<void(int64_t, int64_t)>& body) { pool_.Run(n, body); };
  std::unique_ptr<transport::Context> context_;
  std::unique_ptr<ZapAuthenticator> zap_;  // with CURVE only
  std::unique_ptr<transport::Socket> socket_;
  std::string endpoint_;
  int wake_fd_ = -1;
  std::atomic<bool> stop_{false};
  bool shutdown_requested_ = false;
  bool stale_aware_lr_ = false;

  // Parameter buffers: in shared memory when co-located workers may read
  // them (ServerOptions::shared_memory), else ordinary Tensors.
  std::shared_ptr<Tensor> AllocateParams(const Shape& shape);

  VariableStore store_{[this](const Shape& shape) { return AllocateParams(shape); }};
  bool shm_warned_ = false;
  std::unique_ptr<ConsistencyController> controller_;
  uint64_t next_ticket_ = 1;
  std::unordered_map<uint64_t, Held> held_pulls_;
  // Chunked pushes whose pieces are arriving, by (sender identity, request
  // id); variables with a fused (checked out-of-place) stream open.
  struct PushStream {
    Frame identity;
    Request request;  // the header
    uint32_t chunks_left = 0;
    size_t total = 0, received = 0;
    bool answered = false;  // the header failed and was answered: drop the pieces
    Status error;           // the first problem with a piece
    bool check = false;     // count NaN/Inf as pieces come
    size_t non_finite = 0;
    std::optional<VariableStore::CheckedUpdate> fused;
    std::string fused_variable;
    std::vector<Frame> pieces;            // fused: kept in case the commit is refused
    std::shared_ptr<std::byte[]> values;  // otherwise: the values, copied in as they come
    TimePoint started = ControllerClock::now();
  };
  std::map<std::pair<std::string, uint64_t>, PushStream> push_streams_;
  static constexpr size_t kMaxPushStreams = 1024;
  static constexpr std::chrono::seconds kPushStreamTimeout{60};
  std::unordered_set<std::string> fused_streams_;
  // BSP accumulations: clock -> variable -> worker -> contributions.
  std::map<int64_t, std::map<std::string, std::map<int32_t, std::vector<Contribution>>>> accum_;
  // BSP: per-variable buffers the contributions of a clock are summed in.
  std::unordered_map<std::string, std::unique_ptr<Tensor>> sum_buffers_;
  // Barriers (shard 0): name -> waiting workers.
  std::map<std::string, std::map<int32_t, Held>> barriers_;
};

Status Server::Impl::Init() {
  const auto& o = options_;
  if (o.num_shards < 1) return InvalidArgumentError("--num-shards must be >= 1");
  if (o.shard_index < 0 || o.shard_index >= o.num_shards)
    return InvalidArgumentError("--shard-index " + std::to_string(o.shard_index) +
                                " out of range for " + std::to_string(o.num_shards) + " shards");
  if (o.num_workers < 1) return InvalidArgumentError("--num-workers must be >= 1");
  if (o.staleness < protocol::kStalenessAsync)
    return InvalidArgumentError("staleness " + std::to_string(o.staleness) + " is invalid");
  if (o.max_frames < 1 || o.max_variables < 1)
    return InvalidArgumentError("--max-frames and --max-variables must be >= 1");
  if (o.threads < 1 || o.threads > 256)
    return InvalidArgumentError("--threads must be in [1, 256], got " + std::to_string(o.threads));
  stale_aware_lr_ = o.stale_aware_lr;
  ConsistencyOptions co;
  co.num_workers = o.num_workers;
  co.staleness = o.staleness;
  co.worker_timeout = o.worker_timeout;
  DV_ASSIGN_OR_RETURN(controller_, ConsistencyController::Create(co));

  context_ = std::make_unique<transport::Context>(1);
  transport::SocketOptions so;
  so.max_message_bytes = o.max_message_bytes;
  so.router_mandatory = true;
  so.linger_ms = 0;
  if (!o.curve_secret_key.empty()) {
    if (o.curve_authorized_keys.empty())
      return InvalidArgumentError("CURVE: a server secret key needs at least one authorized key");
    // The handler first: a CURVE socket without one admits any client.
    DV_ASSIGN_OR_RETURN(zap_, ZapAuthenticator::Start(*context_, o.curve_authorized_keys));
    options_.shared_memory = false;
    so.curve_server = true;
    so.curve_secret_key = o.curve_secret_key;
    so.zap_domain = "distval";
  }
  so.shared_memory = o.shared_memory;
  so.shared_memory_min_bytes = o.shared_memory_min_bytes;
  // A co-located worker's gradient may still be arriving when its push is
  // handled: dense applies consume it as it comes (ApplyDenseStreaming);
  // everything else waits for its frames first (WaitComplete).
  so.shared_memory_early_receive = true;
  DV_ASSIGN_OR_RETURN(socket_,
                      transport::Socket::Create(*context_, transport::SocketType::kRouter, so));
  if (zap_) DV_RETURN_IF_ERROR(zap_->WatchHandshakeFailures(*socket_));
  DV_ASSIGN_OR_RETURN(endpoint_, socket_->Bind(o.bind));
  wake_fd_ = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
  if (wake_fd_ < 0) return InternalError(std::string("eventfd: ") + std::strerror(errno));
  if (!o.restore.empty()) DV_RETURN_IF_ERROR(RestoreFromCheckpoint());
  return OkStatus();
}

Status Server::Impl::RestoreFromCheckpoint() {
  const auto& o = options_;
  std::string dir = o.restore;
  if (dir == "latest") {
    if (o.checkpoint_dir.empty())
      return InvalidArgumentError("--restore latest needs --checkpoint-dir");
    DV_ASSIGN_OR_RETURN(dir, FindLatestCheckpoint(o.checkpoint_dir, o.num_shards));
  }
  DV_ASSIGN_OR_RETURN(RestoredCheckpoint r,
                      RestoreCheckpoint(dir, o.shard_index, o.num_shards, store_));
  for (const auto& [name, staleness] : r.variables)
    DV_RETURN_IF_ERROR(controller_->RegisterVariable(name, staleness));
  // BSP: gradients of clocks past the checkpoint's were not applied, so every
  // worker resumes at its clock. Otherwise each worker keeps its own clock
  // (its pushes were applied as they came).
  std::vector<int64_t> clocks = r.info.worker_clocks;
  if (r.info.staleness == 0)
    for (int64_t& c : clocks) c = std::min(c, r.info.clock);
  Status s = controller_->RestoreClocks(clocks, r.info.staleness);
  if (!s.ok()) return Status(s.code(), dir + ": " + s.message());
  last_checkpoint_clock_ = r.info.clock;
  last_checkpoint_ = dir;
  restored_clock_ = r.info.clock;
  DV_LOG(kInfo) << "restored " << r.variables.size() << " variable(s) at clock " << r.info.clock
                << " from " << dir;
  return OkStatus();
}

StatusOr<protocol::CheckpointReply> Server::Impl::WriteCheckpointNow(const std::string& root) {
  if (root.empty())
    return FailedPreconditionError(
        "no checkpoint directory: start distval-ps with --checkpoint-dir or name one");
  CheckpointShardInfo info;
  info.shard_index = options_.shard_index;
  info.num_shards = options_.num_shards;
  info.clock = controller_->ShardClock();
  info.staleness = controller_->CurrentStaleness();
  for (const auto& w : controller_->Snapshot().workers) info.worker_clocks.push_back(w.clock);
  DV_ASSIGN_OR_RETURN(std::string path, WriteCheckpoint(root, info, store_));
  last_checkpoint_clock_ = info.clock;
  last_checkpoint_time_ = std::chrono::steady_clock::now();
  last_checkpoint_ = path;
  DV_LOG(kInfo) << "checkpoint at clock " << info.clock << " written to " << path;
  if (options_.keep_checkpoints > 0) {
    Status s = PruneCheckpoints(root, options_.shard_index, options_.num_shards,
                                options_.keep_checkpoints);
    if (!s.ok()) DV_LOG(kWarning) << "pruning old checkpoints failed: " << s;
  }
  protocol::CheckpointReply reply;
  reply.path = path;
  reply.clock = info.clock;
  return reply;
}

void Server::Impl::MaybeCheckpoint() {
  const auto& o = options_;
  if (o.checkpoint_dir.empty()) return;
  const int64_t clock = controller_->ShardClock();
  bool due = false;
  // At multiples of N (the same clocks on every shard, whatever the clock of
  // a requested or restored checkpoint was).
  if (o.checkpoint_every_clocks > 0)
    due = clock / o.checkpoint_every_clocks > last_checkpoint_clock_ / o.checkpoint_every_clocks;
  if (o.checkpoint_every_seconds > 0 && clock != last_checkpoint_clock_)
    due |= std::chrono::steady_clock::now() - last_checkpoint_time_ >=
           std::chrono::duration<double>(o.checkpoint_every_seconds);
  if (!due) return;
  auto written = WriteCheckpointNow(o.checkpoint_dir);
  if (!written.ok()) {
    DV_LOG(kError) << "checkpoint at clock " << clock << " failed: " << written.status();
    // Try again at the next interval, not on every loop turn.
    last_checkpoint_clock_ = clock;
    last_checkpoint_time_ = std::chrono::steady_clock::now();
  }
}

std::shared_ptr<Tensor> Server::Impl::AllocateParams(const Shape& shape) {
  const size_t bytes = static_cast<size_t>(shape.num_elements()) * sizeof(float);
  if (!options_.shared_memory || bytes < options_.shared_memory_min_bytes || !context_)
    return nullptr;  // an ordinary Tensor
  auto segment = transport::SharedSegment::Create(bytes);
  if (!segment.ok()) {
    if (!shm_warned_) {
      DV_LOG(kWarning) << "parameters stay out of shared memory (co-located pulls copy once "
                       << "more): " << segment.status();
      shm_warned_ = true;
    }
    return nullptr;
  }
  context_->shared_memory().Add(*segment);
  std::byte* data = (*segment)->data();
  return std::make_shared<Tensor>(DType::kF32, shape, data, std::move(*segment));
}

Reply Server::Impl::NewReply(uint64_t request_id) const {
  Reply r;
  r.request_id = request_id;
  r.min_clock = controller_->MinClock();
  r.shard_clock = controller_->ShardClock();
  return r;
}

void Server::Impl::SendReply(const Frame& identity, Reply reply, std::vector<Payload> payloads) {
  transport::OutMessage out;
  out.reserve(2 + payloads.size());
  out.push_back(Payload::Copy(identity.bytes()));
  out.push_back(Payload::Copy(protocol::EncodeReply(reply)));
  for (auto& p : payloads) out.push_back(std::move(p));
  if (options_.telemetry) options_.telemetry->OnReply(reply, out);
  Status s = socket_->Send(std::move(out), std::chrono::milliseconds(1000));
  if (!s.ok()) {
    DV_LOG(kWarning) << "reply to request " << reply.request_id << " lost: " << s;
  }
}

void Server::Impl::SendError(const Frame& identity, uint64_t request_id, const Status& status) {
  Reply r = NewReply(request_id);
  r.code = status.code();
  r.message = status.message();
  if (options_.telemetry) options_.telemetry->OnError(status.code());
  DV_LOG(kDebug) << "request " << request_id << " failed: " << status;
  SendReply(identity, std::move(r));
}

Status Server::Impl::Run() {
  SetFlushDenormalsToZero();
  std::vector<transport::Socket*> socks = {socket_.get()};
  const int fds[1] = {wake_fd_};
  while (!stop_.load() && !shutdown_requested_) {
    auto now = ControllerClock::now();
    auto wake = controller_->NextWakeup();
    auto wait = std::chrono::milliseconds(200);
    if (wake != TimePoint::max()) {
      auto until = std::chrono::duration_cast<std::chrono::milliseconds>(wake - now) +
                   std::chrono::milliseconds(1);
      wait = std::clamp(until, std::chrono::milliseconds(0), wait);
    }
    auto ready = transport::PollReadableWithFds(socks, fds, wait);
    if (!ready.ok()) return ready.status();
    for (size_t idx : *ready) {
      if (idx == 0) {
        // Serve a bounded batch, then let Tick run.
        for (int i = 0; i < 256 && !shutdown_requested_; ++i) {
          auto msg = socket_->Receive(std::chrono::milliseconds(0));
          if (!msg.ok()) break;
          HandleMessage(*msg);
          // After each message: in BSP a clock completes one at a time, so
          // every shard checkpoints at the same clocks.
          MaybeCheckpoint();
        }
      } else {
        uint64_t v;
        ssize_t n = ::read(wake_fd_, &v, sizeof(v));
        (void)n;
      }
    }
    Act(controller_->Tick());
    ExpirePushStreams();
    MaybeCheckpoint();
    if (options_.telemetry) options_.telemetry->Publish(*controller_, store_);
  }
  if (shutdown_requested_) {
    // The acknowledgement of the shutdown is still queued: let closing the
    // socket send it (with linger 0 it could be dropped, and the client
    // would wait for a reconnection that never comes).
    Status s = socket_->SetLinger(std::chrono::milliseconds(2000));
    if (!s.ok()) DV_LOG(kWarning) << "cannot keep the last replies on exit: " << s;
  }
  return OkStatus();
}

void Server::Impl::HandleMessage(InMessage& msg) {
  if (msg.size() < 2) {
    // Nothing to answer: a ROUTER message always starts with the identity,
    // and without a header there is no request id.
    DV_LOG(kDebug) << "dropping a message of " << msg.size() << " frame(s)";
    return;
  }
  const Frame& identity = msg[0];
  if (msg.size() - 2 > static_cast<size_t>(options_.max_frames)) {
    SendError(identity, 0,
              InvalidArgumentError("request with " + std::to_string(msg.size() - 2) +
                                   " payload frames; the limit is " +
                                   std::to_string(options_.max_frames) + " (--max-frames)"));
    return;
  }
  std::vector<size_t> sizes;
  sizes.reserve(msg.size() - 2);
  for (size_t i = 2; i < msg.size(); ++i) sizes.push_back(msg[i].size());
  auto req = protocol::DecodeRequest(msg[1].bytes(), sizes);
  if (!req.ok()) {
    SendError(identity, 0, req.status());
    return;
  }
  if (options_.telemetry) options_.telemetry->OnRequest(*req, msg);
  // Payload frame k of the request is msg[k + 1]; drop the identity so that
  // TensorRef::frame indexes `payloads` directly.
  // Moved, not copied: a frame a co-located sender lent must be dropped
  // before the answer (see Frame::lent), so only `payloads` may hold it.
  InMessage payloads(std::make_move_iterator(msg.begin() + 1), std::make_move_iterator(msg.end()));
  Dispatch(identity, *req, payloads);
}

void Server::Impl::Dispatch(const Frame& identity, Request& req, InMessage& msg) {
  const bool is_worker = req.worker_id >= 0;
  if (is_worker && !std::holds_alternative<protocol::Hello>(req.body)) {
    // Every request from a worker is a heartbeat; a dropped worker must say
    // hello again before anything else.
    Status hb = controller_->OnHeartbeat(req.worker_id);
    if (!hb.ok()) {
      SendError(identity, req.request_id, hb);
      return;
    }
  }
  if (!std::holds_alternative<protocol::Push>(req.body)) {
    // Only pushes read their frames as they arrive.
    Status complete = WaitComplete(msg);
    if (!complete.ok()) {
      SendError(identity, req.request_id, complete);
      return;
    }
  }
  Status s = OkStatus();
  bool answered = false;  // the handler replied (or holds the request) itself
  std::visit(
      [&](auto& body) {
        using T = std::decay_t<decltype(body)>;
        if constexpr (std::is_same_v<T, protocol::Hello>) {
          s = HandleHello(identity, req);
          answered = s.ok();
        } else if constexpr (std::is_same_v<T, protocol::Heartbeat>) {
        } else if constexpr (std::is_same_v<T, protocol::CreateVariable>) {
          s = HandleCreate(req, msg);
        } else if constexpr (std::is_same_v<T, protocol::Push>) {
          s = body.chunks > 0 ? OpenPushStream(identity, req) : HandlePush(identity, req, msg);
          answered = s.ok();
        } else if constexpr (std::is_same_v<T, protocol::PushChunk>) {
          OnPushChunk(identity, req, msg);
          answered = true;
        } else if constexpr (std::is_same_v<T, protocol::Pull>) {
          HandlePull(identity, req, msg);
          answered = true;
        } else if constexpr (std::is_same_v<T, protocol::AdvanceClock>) {
          if (!is_worker) {
            s = InvalidArgumentError("advance_clock needs a worker id");
          } else {
            int64_t to = body.to;
            if (to < 0) to = std::max<int64_t>(req.clock, 0) + 1;
            auto ev = controller_->OnClock(req.worker_id, to);
            if (!ev.ok()) {
              s = ev.status();
            } else {
              Act(std::move(*ev));
            }
          }
        } else if constexpr (std::is_same_v<T, protocol::Barrier>) {
          HandleBarrier(identity, req);
          answered = true;
        } else if constexpr (std::is_same_v<T, protocol::SetMode>) {
          s = HandleSetMode(req);
        } else if constexpr (std::is_same_v<T, protocol::SetLearningRate>) {
          s = store_.SetLearningRate(body.variable, body.learning_rate);
          if (s.ok()) {
            DV_LOG(kInfo) << "learning rate of "
                          << (body.variable.empty() ? "every variable" : "'" + body.variable + "'")
                          << " set to " << body.learning_rate;
          }
        } else if constexpr (std::is_same_v<T, protocol::Checkpoint>) {
          auto written =
              WriteCheckpointNow(body.directory.empty() ? options_.checkpoint_dir : body.directory);
          if (written.ok()) {
            Reply r = NewReply(req.request_id);
            r.body = *written;
            SendReply(identity, std::move(r));
            answered = true;
          } else {
            s = written.status();
          }
        } else if constexpr (std::is_same_v<T, protocol::Stats>) {
          Reply r = NewReply(req.request_id);
          r.body = MakeStats();
          SendReply(identity, std::move(r));
          answered = true;
        } else if constexpr (std::is_same_v<T, protocol::Shutdown>) {
          DV_LOG(kInfo) << "shutdown requested by "
                        << (is_worker ? "worker " + std::to_string(req.worker_id)
                                      : std::string("a control client"));
          if (body.checkpoint_first && !options_.checkpoint_dir.empty()) {
            // Refuse to stop without the checkpoint that was asked for.
            auto written = WriteCheckpointNow(options_.checkpoint_dir);
            if (!written.ok()) s = written.status();
          }
          if (s.ok()) shutdown_requested_ = true;
        }
      },
      req.body);
  if (answered) return;
  ReleaseLentFrames(msg);
  if (!s.ok()) {
    SendError(identity, req.request_id, s);
    return;
  }
  SendReply(identity, NewReply(req.request_id));
}

Status Server::Impl::HandleHello(const Frame& identity, const Request& req) {
  const auto& h = std::get<protocol::Hello>(req.body);
  if (h.protocol_version != protocol::kProtocolVersion)
    return FailedPreconditionError("protocol version mismatch: client " +
                                   std::to_string(h.protocol_version) + ", server " +
                                   std::to_string(protocol::kProtocolVersion));
  if (h.num_shards != options_.num_shards)
    return FailedPreconditionError(
        "number of shards mismatch: worker expects " + std::to_string(h.num_shards) + ", shard " +
        std::to_string(options_.shard_index) + " is one of " + std::to_string(options_.num_shards));
  int32_t current = controller_->CurrentStaleness();
  if (h.staleness != protocol::kStalenessDontCheck && h.staleness != current)
    return FailedPreconditionError("staleness mismatch: worker expects " +
                                   StalenessName(h.staleness) + ", server runs " +
                                   StalenessName(current));
  protocol::HelloReply hr;
  hr.shard_index = options_.shard_index;
  hr.num_shards = options_.num_shards;
  hr.num_workers = options_.num_workers;
  hr.staleness = current;
  hr.incarnation = incarnation_;
  hr.num_variables = static_cast<int32_t>(store_.size());
  hr.restored_clock = restored_clock_;
  if (h.role == protocol::Role::kWorker) {
    if (h.num_workers != options_.num_workers)
      return FailedPreconditionError("number of workers mismatch: worker expects " +
                                     std::to_string(h.num_workers) + ", server expects " +
                                     std::to_string(options_.num_workers));
    if (req.worker_id != h.worker_index)
      return InvalidArgumentError("hello: worker id " + std::to_string(req.worker_id) +
                                  " differs from worker_index " + std::to_string(h.worker_index));
    DV_ASSIGN_OR_RETURN(hr.clock, controller_->OnHello(req.worker_id));
    DV_LOG(kInfo) << "worker " << req.worker_id << " joined at clock " << hr.clock;
  }
  Reply r = NewReply(req.request_id);
  r.body = hr;
  SendReply(identity, std::move(r));
  return OkStatus();
}

Status Server::Impl::HandleCreate(const Request& req, const InMessage& msg) {
  const auto& cv = std::get<protocol::CreateVariable>(req.body);
  if (store_.size() >= static_cast<size_t>(options_.max_variables) &&
      !store_.Find(cv.spec.name).ok())
    return ResourceExhaustedError("variable '" + cv.spec.name + "' not created: shard " +
                                  std::to_string(options_.shard_index) + " already holds " +
                                  std::to_string(store_.size()) + " variables (--max-variables)");
  if (options_.max_variable_bytes > 0) {
    // The decoder checked that the whole shape's byte size fits int64.
    int64_t bytes = static_cast<int64_t>(sizeof(float)) * (cv.rows.end - cv.rows.begin);
    for (size_t i = 1; i < cv.spec.shape.size(); ++i) bytes *= cv.spec.shape[i];
    if (bytes > options_.max_variable_bytes)
      return ResourceExhaustedError(
          "variable '" + cv.spec.name + "' not created: its " + std::to_string(bytes) +
          " bytes on shard " + std::to_string(options_.shard_index) + " exceed " +
          std::to_string(options_.max_variable_bytes) + " (--max-variable-bytes)");
  }
  const float* init = nullptr;
  FloatPayload values;
  if (auto* iv = std::get_if<protocol::InitValues>(&cv.spec.initializer.kind)) {
    if (iv->values.dtype != DType::kF32)
      return InvalidArgumentError("variable '" + cv.spec.name + "': initial values must be f32");
    int64_t rows = cv.rows.end - cv.rows.begin;
    int64_t row_elems = 1;
    for (size_t i = 1; i < cv.spec.shape.size(); ++i) row_elems *= cv.spec.shape[i];
    if (iv->values.num_elements() != rows * row_elems)
      return InvalidArgumentError(
          "variable '" + cv.spec.name + "': " + std::to_string(iv->values.num_elements()) +
          " initial values for " + std::to_string(rows) + " rows of " + std::to_string(row_elems));
    if (options_.nan_policy != NanPolicy::kAllow) {
      // Parameters never start poisoned either.
      const size_t bad =
          protocol::CountNonFinite(msg[iv->values.frame].bytes(), iv->values.encoding);
      if (bad > 0)
        return InvalidArgumentError("variable '" + cv.spec.name + "': " + std::to_string(bad) +
                                    " of " + std::to_string(iv->values.num_elements()) +
                                    " initial values are NaN/Inf (--nan-policy)");
    }
    values = ToFloats(iv->values, msg[iv->values.frame]);
    init = values.values.data();
  }
  DV_ASSIGN_OR_RETURN(Variable * v, store_.Create(cv.spec, cv.rows, init));
  DV_RETURN_IF_ERROR(controller_->RegisterVariable(v->name(), cv.spec.staleness));
  return OkStatus();
}

Status Server::Impl::HandlePush(const Frame& identity, const Request& req, InMessage& msg,
                                PushPrep* prep) {
  const auto& push = std::get<protocol::Push>(req.body);
  if (req.worker_id < 0 && push.advance_clock)
    return InvalidArgumentError("push with advance_clock needs a worker id");
  if (req.worker_id >= 0 && SeenPush(req.worker_id, req.request_id)) {
    DV_LOG(kInfo) << "push " << req.request_id << " from worker " << req.worker_id
                  << " is a retry of one already acknowledged: acknowledged again, not applied";
    ReleaseLentFrames(msg);
    SendReply(identity, NewReply(req.request_id));
    return OkStatus();
  }
  if (push.updates.size() > static_cast<size_t>(options_.max_variables))
    return InvalidArgumentError("push with " + std::to_string(push.updates.size()) +
                                " updates; the limit is " + std::to_string(options_.max_variables) +
                                " (--max-variables)");
  // 1. Validate everything before touching anything.
  std::vector<Variable*> vars;
  vars.reserve(push.updates.size());
  std::vector<std::vector<int64_t>> sparse_rows(push.updates.size());
  std::vector<bool> poisoned(push.updates.size(), false);
  std::string poisoned_names;
  size_t num_poisoned = 0;
  // A co-located worker's gradient still being copied in, for a plain SGD
  // variable applied at once: checked piece by piece as it arrives and
  // applied out of place, all or nothing (below), instead of waiting for all
  // of it, checking it, then applying it (three passes over memory, one).
  const protocol::Update* checked_streaming = nullptr;
  if (prep != nullptr && prep->fused != nullptr) {
    // A chunked push already applied out of place, piece by piece.
    checked_streaming = &push.updates[0];
  } else if (options_.nan_policy != NanPolicy::kAllow && push.updates.size() == 1 &&
             !stale_aware_lr_) {
    const auto& u = push.updates[0];
    const Frame& frame = msg[u.values.frame];
    auto found = store_.Find(u.variable);
    if (found.ok() && frame.streaming() && u.values.encoding == protocol::Encoding::kRaw &&
        u.values.dtype == DType::kF32 && std::holds_alternative<protocol::RowRange>(u.rows) &&
        frame.window_limit() >= sizeof(float) && VariableStore::SupportsCheckedStreaming(**found) &&
        (req.worker_id < 0 || controller_->EffectiveStaleness(u.variable, req.clock) != 0))
      checked_streaming = &u;
  }
  for (size_t i = 0; i < push.updates.size(); ++i) {
    const auto& u = push.updates[i];
    if (prep != nullptr && prep->checked) {
      // A chunked push: checked as its pieces came.
      if (prep->non_finite > 0) {
        poisoned[i] = true;
        ++num_poisoned;
        poisoned_names = "'" + u.variable + "' (" + std::to_string(prep->non_finite) + " of " +
                         std::to_string(u.values.num_elements()) + " values)";
      }
    } else if (options_.nan_policy != NanPolicy::kAllow && checked_streaming != &u) {
      // The whole gradient must be here to be checked.
      DV_ASSIGN_OR_RETURN(msg[u.values.frame], msg[u.values.frame].Materialized());
      const size_t bad = CountNonFiniteOn(runner_, msg[u.values.frame].bytes(), u.values.encoding);
      if (bad > 0) {
        poisoned[i] = true;
        ++num_poisoned;
        if (!poisoned_names.empty()) poisoned_names += ", ";
        poisoned_names += "'" + u.variable + "' (" + std::to_string(bad) + " of " +
                          std::to_string(u.values.num_elements()) + " values)";
      }
    }
    DV_ASSIGN_OR_RETURN(Variable * v, store_.Find(u.variable));
    std::span<const int64_t> shape(u.values.shape);
    if (auto* range = std::get_if<protocol::RowRange>(&u.rows)) {
      DV_RETURN_IF_ERROR(VariableStore::ValidateDensePayload(*v, *range, u.values.dtype, shape));
    } else {
      const auto& idx = std::get<protocol::TensorRef>(u.rows);
      DV_RETURN_IF_ERROR(
          VariableStore::ValidateSparseIndices(*v, idx.dtype, std::span<const int64_t>(idx.shape)));
      DV_ASSIGN_OR_RETURN(msg[idx.frame], msg[idx.frame].Materialized());
      sparse_rows[i] = ToIndices(idx, msg[idx.frame]);
      DV_RETURN_IF_ERROR(VariableStore::ValidateSparseRows(*v, sparse_rows[i]));
      DV_RETURN_IF_ERROR(VariableStore::ValidateSparsePayload(
          *v, static_cast<int64_t>(sparse_rows[i].size()), u.values.dtype, shape));
    }
    vars.push_back(v);
  }
  bool applied_early = false;
  if (checked_streaming != nullptr) {
    // The controller's errors first (nothing may be applied for a push it
    // refuses); it routes the push after the apply.
    if (req.worker_id >= 0) DV_RETURN_IF_ERROR(controller_->CheckPush(req.worker_id, req.clock));
    const auto& u = *checked_streaming;
    Frame& frame = msg[u.values.frame];
    const auto range = std::get<protocol::RowRange>(u.rows);
    size_t bad = 0;
    ApplyTimer timer(options_.telemetry, req.clock, req.worker_id);
    timer.Arm();
    Status s;
    if (prep != nullptr && prep->fused != nullptr) {
      bad = prep->non_finite;
      if (bad == 0) {
        s = prep->fused->Commit();
        if (s.code() == StatusCode::kAborted) {
          // Another update got in while the pieces arrived: this one goes
          // after it, applied the ordinary way (from its pieces, below).
          if (!prep->apply_pieces) {
            DV_ASSIGN_OR_RETURN(frame, prep->assemble());
          }
          checked_streaming = nullptr;
          s = OkStatus();
        }
      }
    } else {
      s = ApplyStreamed(*vars[0], range, frame, 1.0f, &bad);
    }
    // The sender died mid-copy: nothing was applied.
    if (!s.ok()) return s.WithContext("gradient for '" + u.variable + "' (nothing of it applied)");
    if (bad > 0) {
      if (!poisoned[0]) {
        poisoned[0] = true;
        ++num_poisoned;
        poisoned_names = "'" + u.variable + "' (" + std::to_string(bad) + " of " +
                         std::to_string(u.values.num_elements()) + " values, or more)";
      }
    } else if (checked_streaming != nullptr) {
      applied_early = true;
    }
  }
  if (num_poisoned > 0) {
    nan_updates_ += num_poisoned;
    if (options_.telemetry) options_.telemetry->OnNonFiniteUpdates(num_poisoned);
    const std::string what = "gradient with NaN/Inf from " +
                             (req.worker_id < 0 ? std::string("a control client")
                                                : "worker " + std::to_string(req.worker_id)) +
                             " at clock " + std::to_string(req.clock) + " for " + poisoned_names;
    if (options_.nan_policy == NanPolicy::kReject) {
      DV_LOG(kWarning) << what << ": push rejected (" << nan_updates_
                       << " poisoned update(s) so far)";
      return InvalidArgumentError(what + ": push rejected (--nan-policy reject)");
    }
    DV_LOG(kWarning) << what << ": skipped (" << nan_updates_ << " poisoned update(s) so far)";
  }
  // 2. Route: apply now (async / SSP, control clients) or keep for the
  // clock (BSP). The controller decides before the acknowledgement, so its
  // errors (a stale clock, a dropped worker) still reach the sender.
  // Updates that go on (all but those skipped for NaN/Inf).
  std::vector<size_t> kept;
  kept.reserve(push.updates.size());
  for (size_t i = 0; i < push.updates.size(); ++i)
    if (!poisoned[i]) kept.push_back(i);
  PushPlan plan;
  float lr_scale = 1.0f;
  if (req.worker_id < 0) {
    // A control client's push applies at once (e.g. a tool loading values).
    plan.routes.assign(kept.size(), PushRoute::kApplyNow);
  } else {
    // Routing a BSP update makes its worker a contributor of the clock (the
    // mean's divisor), so its bytes must all be here first: a co-located
    // worker that dies while still copying its gradient must not count
    // without it (with --nan-policy reject or skip, step 1 waited already).
    // Its push fails instead, and the worker is dropped at its clock.
    for (size_t i : kept) {
      Frame& frame = msg[push.updates[i].values.frame];
      if (!frame.streaming() || controller_->EffectiveStaleness(vars[i]->name(), req.clock) != 0)
        continue;
      auto complete = frame.Materialized();
      if (!complete.ok())
        return complete.status().WithContext("gradient for '" + vars[i]->name() + "' from worker " +
                                             std::to_string(req.worker_id) + " at clock " +
                                             std::to_string(req.clock));
      frame = std::move(*complete);
    }
    std::vector<std::string_view> names;
    names.reserve(kept.size());
    for (size_t i : kept) names.push_back(vars[i]->name());
    DV_ASSIGN_OR_RETURN(plan,
                        controller_->OnPush(req.worker_id, req.clock, names, push.advance_clock));
    if (stale_aware_lr_) lr_scale = 1.0f / (1.0f + static_cast<float>(plan.staleness));
    if (options_.telemetry) options_.telemetry->OnPushStaleness(plan.staleness);
  }
  ApplyTimer apply_timer(options_.telemetry, req.clock, req.worker_id);
  // 3. Acknowledge: the push is validated and queued in arrival order. A
  // co-located worker that lent its gradient's memory (no copy) waits until
  // the server is done reading it anyway: applied (or copied) first, the
  // memory given back, then acknowledged.
  const bool lent = AnyLent(msg);
  if (req.worker_id >= 0) RecordPush(req.worker_id, req.request_id);
  if (!lent) SendReply(identity, NewReply(req.request_id));
  // 4. Apply (or keep) it, then act on what the push completed.
  for (size_t k = 0; k < kept.size(); ++k) {
    const size_t i = kept[k];
    if (applied_early) continue;  // the one update, applied above
    const auto& u = push.updates[i];
    Variable* v = vars[i];
    Frame& frame = msg[u.values.frame];
    const auto* range = std::get_if<protocol::RowRange>(&u.rows);
    if (plan.routes[k] == PushRoute::kApplyNow && range != nullptr && frame.streaming() &&
        u.values.encoding == protocol::Encoding::kRaw && frame.window_limit() >= sizeof(float)) {
      // A co-located worker is still copying this gradient into shared
      // memory: apply each piece as soon as it is there, while it is hot in
      // cache.
      Status s = ApplyStreamed(*v, *range, frame, lr_scale, nullptr);
      if (!s.ok()) {
        DV_LOG(kError) << "gradient for '" << v->name() << "' from worker " << req.worker_id
                       << " stopped arriving; the rest of the step is lost: " << s;
      }
      continue;
    }
    if (prep != nullptr && prep->assemble && frame.size() == 0 && u.values.num_bytes() > 0) {
      // A chunked push kept as its pieces.
      if (plan.routes[k] == PushRoute::kApplyNow && range != nullptr && prep->apply_pieces) {
        apply_timer.Arm();
        Status s = prep->apply_pieces(*v, *range, lr_scale);
        if (!s.ok()) {
          DV_LOG(kError) << "applying an acknowledged push to '" << v->name() << "' failed: " << s;
        }
        continue;
      }
      auto assembled = prep->assemble();
      if (!assembled.ok()) {
        DV_LOG(kError) << "gradient for '" << v->name() << "' from worker " << req.worker_id
                       << " could not be assembled: " << assembled.status();
        continue;
      }
      frame = std::move(*assembled);
    }
    if (auto complete = frame.Materialized(); complete.ok()) {
      frame = std::move(*complete);
    } else {
      DV_LOG(kError) << "gradient for '" << v->name() << "' from worker " << req.worker_id
                     << " never arrived: " << complete.status();
      continue;
    }
    FloatPayload g = ToFloats(u.values, frame);
    if (plan.routes[k] == PushRoute::kApplyNow) {
      apply_timer.Arm();
      Status s;
      if (range != nullptr) {
        s = VariableStore::ApplyDense(*v, *range, g.values.data(), 1.0f, lr_scale, runner_);
      } else {
        s = VariableStore::ApplySparse(*v, sparse_rows[i], g.values.data(), 1.0f, lr_scale);
      }
      // Validated above, so this cannot fail; say so loudly if it ever does.
      if (!s.ok()) {
        DV_LOG(kError) << "applying an acknowledged push to '" << v->name() << "' failed: " << s;
      }
    } else {
      Contribution c;
      if (auto* range = std::get_if<protocol::RowRange>(&u.rows)) {
        c.rows = *range;
      } else {
        c.sparse = true;
        c.indices = std::move(sparse_rows[i]);
      }
      c.values = g.values;
      c.owner = g.owner;
      // The worker's memory: used as it is if this push completes the clock
      // (below), else copied before the answer.
      c.lent = frame.lent() && u.values.encoding == protocol::Encoding::kRaw;
      accum_[req.clock][v->name()][req.worker_id].push_back(std::move(c));
    }
  }
  Act(std::move(plan.events));
  if (!lent) return OkStatus();
  // What this push completed was applied just now, from the worker's memory;
  // what waits for other workers is copied out of it.
  if (auto clock_it = accum_.find(req.clock); clock_it != accum_.end()) {
    for (auto& [name, by_worker] : clock_it->second) {
      auto mine = by_worker.find(req.worker_id);
      if (mine == by_worker.end()) continue;
      for (Contribution& c : mine->second) {
        if (!c.lent) continue;
        const Frame copy = Frame::FromBytes(std::as_bytes(c.values));
        c.values = std::span<const float>(copy.as<float>(), c.values.size());
        c.owner = copy.owner();
        c.lent = false;
      }
    }
  }
  ReleaseLentFrames(msg);
  SendReply(identity, NewReply(req.request_id));
  return OkStatus();
}

Status Server::Impl::OpenPushStream(const Frame& identity, const Request& req) {
  const auto& push = std::get<protocol::Push>(req.body);
  const protocol::Update& u = push.updates[0];  // the decoder checked: one, dense
  const auto range = std::get<protocol::RowRange>(u.rows);
  auto key = std::make_pair(
      std::string(reinterpret_cast<const char*>(identity.data()), identity.size()), req.request_id);
  if (push_streams_.count(key) > 0)
    return InvalidArgumentError("chunked push " + std::to_string(req.request_id) +
                                " is already arriving");
  PushStream st;
  st.identity = identity;
  st.request = req;
  st.chunks_left = push.chunks;
  // Errors of the header are answered now; its pieces are dropped quietly.
  Status header = [&]() -> Status {
    if (push_streams_.size() >= kMaxPushStreams)
      return ResourceExhaustedError("too many chunked pushes arriving at once (" +
                                    std::to_string(kMaxPushStreams) + ")");
    if (u.values.dtype != DType::kF32 || u.values.encoding != protocol::Encoding::kRaw)
      return InvalidArgumentError("chunked push of '" + u.variable + "': values must be raw f32");
    DV_ASSIGN_OR_RETURN(Variable * v, store_.Find(u.variable));
    DV_RETURN_IF_ERROR(VariableStore::ValidateDensePayload(
        *v, range, u.values.dtype, std::span<const int64_t>(u.values.shape)));
    st.total = u.values.num_bytes();
    if (push.chunks > st.total)
      return InvalidArgumentError("chunked push of '" + u.variable +
                                  "': " + std::to_string(push.chunks) + " pieces for " +
                                  std::to_string(st.total) + " bytes");
    if (req.worker_id >= 0) DV_RETURN_IF_ERROR(controller_->CheckPush(req.worker_id, req.clock));
    st.check = options_.nan_policy != NanPolicy::kAllow;
    // Checked and applied out of place as the pieces come, when the push
    // will be applied at once (not kept for a BSP clock) by a rule without
    // state; one such stream per variable at a time.
    const bool applied_now =
        req.worker_id < 0 || controller_->EffectiveStaleness(u.variable, req.clock) != 0;
    if (st.check && applied_now && !stale_aware_lr_ &&
        VariableStore::SupportsCheckedStreaming(*v) && fused_streams_.count(u.variable) == 0) {
      DV_ASSIGN_OR_RETURN(auto fused, VariableStore::BeginCheckedUpdate(*v, range, 1.0f));
      st.fused.emplace(std::move(fused));
      st.fused_variable = u.variable;
    }
    // Applied at once: the pieces are kept and applied from where they are
    // (no copy); kept for a BSP clock: copied into one buffer as they come.
    if (applied_now) {
      st.pieces.reserve(push.chunks);
    } else {
      st.values = std::shared_ptr<std::byte[]>(AlignedAlloc(st.total).release(), AlignedFree{});
    }
    return OkStatus();
  }();
  if (!header.ok()) {
    SendError(identity, req.request_id, header);
    st.answered = true;
    st.fused.reset();
  }
  if (st.fused) fused_streams_.insert(st.fused_variable);
  push_streams_.emplace(std::move(key), std::move(st));
  return OkStatus();
}

void Server::Impl::OnPushChunk(const Frame& identity, const Request& req, const InMessage& msg) {
  auto it = push_streams_.find(
      std::make_pair(std::string(reinterpret_cast<const char*>(identity.data()), identity.size()),
                     req.request_id));
  if (it == push_streams_.end()) {
    SendError(identity, req.request_id,
              NotFoundError("push piece for request " + std::to_string(req.request_id) +
                            ", which has no chunked push arriving"));
    return;
  }
  PushStream& st = it->second;
  const uint64_t offset = std::get<protocol::PushChunk>(req.body).offset;
  const Frame& piece = msg[1];  // the decoder checked: exactly one payload frame
  if (!st.answered && st.error.ok()) {
    if (offset != st.received || piece.size() > st.total - st.received ||
        piece.size() % sizeof(float) != 0) {
      st.error = InvalidArgumentError(
          "push piece of " + std::to_string(piece.size()) + " bytes at offset " +
          std::to_string(offset) + ": expected the next piece of whole floats from offset " +
          std::to_string(st.received) + " of " + std::to_string(st.total));
    } else if (!piece.AlignedFor(alignof(float))) {
      st.error = InternalError("push piece is not aligned for floats");
    } else {
      const auto* g = piece.as<float>();
      const auto n = static_cast<int64_t>(piece.size() / sizeof(float));
      if (st.fused) {
        st.error = st.fused->Piece(g, n, &st.non_finite, runner_);
      } else if (st.check) {
        st.non_finite += protocol::CountNonFinite(piece.bytes(), protocol::Encoding::kRaw);
      }
      if (st.values) {
        if (!piece.bytes().empty())
          std::memcpy(st.values.get() + offset, piece.data(), piece.size());
      } else {
        st.pieces.push_back(piece);
      }
      st.received += piece.size();
    }
  }
  if (--st.chunks_left > 0) return;
  // The last piece: the push itself.
  PushStream done = std::move(st);
  push_streams_.erase(it);
  if (done.fused) fused_streams_.erase(done.fused_variable);
  if (done.answered) return;
  if (done.error.ok() && done.received != done.total)
    done.error = InvalidArgumentError("chunked push ended " +
                                      std::to_string(done.total - done.received) + " bytes short");
  if (!done.error.ok()) {
    SendError(done.identity, done.request.request_id,
              done.error.WithContext("chunked push (nothing of it applied)"));
    return;
  }
  // A plain push with the values as frame 1.
  auto& push = std::get<protocol::Push>(done.request.body);
  push.chunks = 0;
  push.updates[0].values.frame = 1;
  InMessage frames(2);
  PushPrep prep;
  prep.checked = done.check;
  prep.non_finite = done.non_finite;
  if (done.fused) prep.fused = &*done.fused;
  if (done.values) {
    frames[1] = Frame::Adopt(done.values, done.values.get(), done.total);
  } else {
    prep.assemble = [&done]() -> StatusOr<Frame> {
      auto values = std::shared_ptr<std::byte[]>(AlignedAlloc(done.total).release(), AlignedFree{});
      size_t at = 0;
      for (const Frame& f : done.pieces) {
        if (!f.bytes().empty()) std::memcpy(values.get() + at, f.data(), f.size());
        at += f.size();
      }
      return Frame::Adopt(values, values.get(), done.total);
    };
    // Pieces of one size (the last may be shorter) are applied from where
    // they are, one piece at a time, as one optimizer step.
    const size_t size = done.pieces.empty() ? 0 : done.pieces.front().size();
    bool regular = size > 0;
    for (size_t i = 0; regular && i + 1 < done.pieces.size(); ++i)
      regular = done.pieces[i].size() == size;
    if (regular) {
      prep.apply_pieces = [this, &done, size](Variable& v, protocol::RowRange rows,
                                              float lr_scale) {
        return VariableStore::ApplyDenseStreaming(
            v, rows, static_cast<int64_t>(size / sizeof(float)),
            [&done, size](int64_t begin, int64_t) -> StatusOr<const float*> {
              return done.pieces[static_cast<size_t>(begin) * sizeof(float) / size].as<float>();
            },
            1.0f, lr_scale, runner_);
      };
    }
  }
  Status s = HandlePush(done.identity, done.request, frames, &prep);
  if (!s.ok()) SendError(done.identity, done.request.request_id, s);
}

void Server::Impl::ExpirePushStreams() {
  if (push_streams_.empty()) return;
  const TimePoint now = ControllerClock::now();
  for (auto it = push_streams_.begin(); it != push_streams_.end();) {
    PushStream& st = it->second;
    if (now - st.started < kPushStreamTimeout) {
      ++it;
      continue;
    }
    DV_LOG(kWarning) << "chunked push " << st.request.request_id << " from worker "
                     << st.request.worker_id << ": " << st.chunks_left
                     << " piece(s) never came; dropped (nothing of it applied)";
    if (!st.answered)
      SendError(st.identity, st.request.request_id,
                DeadlineExceededError("chunked push: " + std::to_string(st.chunks_left) +
                                      " piece(s) did not come within " +
                                      std::to_string(kPushStreamTimeout.count()) +
                                      " s (nothing of it applied)"));
    if (st.fused) fused_streams_.erase(st.fused_variable);
    it = push_streams_.erase(it);
  }
}

Status Server::Impl::ApplyStreamed(Variable& v, protocol::RowRange rows, const Frame& frame,
                                   float lr_scale, size_t* non_finite) {
  const int64_t piece =
      static_cast<int64_t>(std::min<size_t>(frame.window_limit(), 256 * 1024) / sizeof(float));
  return VariableStore::ApplyDenseStreaming(
      v, rows, piece,
      [&frame](int64_t begin, int64_t n) -> StatusOr<const float*> {
        DV_ASSIGN_OR_RETURN(const std::byte* p,
                            frame.Window(static_cast<size_t>(begin) * sizeof(float),
                                         static_cast<size_t>(n) * sizeof(float)));
        return reinterpret_cast<const float*>(p);
      },
      // One thread: the pieces come as fast as the co-located sender copies
      // them, on the other core; waking apply threads per piece made it
      // slower (a 16 MiB push 0.19-0.20 x memcpy with two threads, 0.41 with
      // one).
      1.0f, lr_scale, VariableStore::RangeRunner{}, non_finite);
}

void Server::Impl::ApplyCompleted(const CompletedClock& done) {
  ApplyTimer apply_timer(options_.telemetry, done.clock, -1, /*armed=*/true);
  auto clock_it = accum_.find(done.clock);
  for (const CompletedUpdate& cu : done.updates) {
    if (clock_it == accum_.end()) break;
    auto var_it = clock_it->second.find(cu.variable);
    if (var_it == clock_it->second.end()) continue;
    auto found = store_.Find(cu.variable);
    if (!found.ok()) continue;
    Variable& v = **found;
    const auto& by_worker = var_it->second;
    const float grad_scale = v.spec().aggregation == protocol::Aggregation::kMean
                                 ? 1.0f / static_cast<float>(cu.contributors.size())
                                 : 1.0f;
    bool any_dense = false;
    for (const auto& [w, list] : by_worker)
      for (const auto& c : list) any_dense |= !c.sparse;
    Status s;
    // The common case of one worker (or one contributor) whose gradient
    // covers the whole shard: apply straight from the received frame.
    const Contribution* lone = nullptr;
    size_t count = 0;
    for (int32_t w : cu.contributors) {
      auto it = by_worker.find(w);
      if (it == by_worker.end()) continue;
      count += it->second.size();
      if (!it->second.empty()) lone = &it->second.front();
    }
    if (count == 1 && !lone->sparse && lone->rows == v.rows()) {
      s = VariableStore::ApplyDense(v, v.rows(), lone->values.data(), grad_scale, 1.0f, runner_);
    } else if (any_dense) {
      // Sum every contribution into one shard-sized gradient, in worker
      // index order (then arrival order): bit-for-bit repeatable. The sum
      // buffer is kept per variable (no allocation per clock).
      std::unique_ptr<Tensor>& sum = sum_buffers_[cu.variable];
      if (!sum || sum->shape() != v.shard_shape())
        sum = std::make_unique<Tensor>(DType::kF32, v.shard_shape());
      float* dst = sum->data_as<float>();
      if (v.num_elements() > 0)
        std::memset(dst, 0, static_cast<size_t>(v.num_elements()) * sizeof(float));
      for (int32_t w : cu.contributors) {
        auto it = by_worker.find(w);
        if (it == by_worker.end()) continue;
        for (const Contribution& c : it->second) {
          const int64_t re = v.row_elements();
          if (!c.sparse) {
            int64_t off = v.LocalOffset(c.rows.begin);
            Eigen::Map<Eigen::ArrayXf>(dst + off, c.rows.size() * re) +=
                Eigen::Map<const Eigen::ArrayXf>(c.values.data(), c.rows.size() * re);
          } else {
            for (size_t r = 0; r < c.indices.size(); ++r)
              Eigen::Map<Eigen::ArrayXf>(dst + v.LocalOffset(c.indices[r]), re) +=
                  Eigen::Map<const Eigen::ArrayXf>(c.values.data() + r * re, re);
          }
        }
      }
      s = VariableStore::ApplyDense(v, v.rows(), dst, grad_scale, 1.0f, runner_);
    } else {
      std::vector<int64_t> rows;
      std::vector<float> vals;
      for (int32_t w : cu.contributors) {
        auto it = by_worker.find(w);
        if (it == by_worker.end()) continue;
        for (const Contribution& c : it->second) {
          rows.insert(rows.end(), c.indices.begin(), c.indices.end());
          vals.insert(vals.end(), c.values.begin(), c.values.end());
        }
      }
      s = VariableStore::ApplySparse(v, rows, vals.data(), grad_scale, 1.0f);
    }
    if (!s.ok()) {
      DV_LOG(kError) << "applying clock " << done.clock << " of '" << cu.variable
                     << "' failed: " << s;
    }
    clock_it->second.erase(var_it);
  }
  if (clock_it != accum_.end() && clock_it->second.empty()) accum_.erase(clock_it);
}

void Server::Impl::Act(Events events) {
  for (const DroppedWorker& d : events.dropped) {
    DV_LOG(kWarning)
        << "worker " << d.worker << " dropped from the live set at clock " << d.clock << " ("
        << (d.never_seen ? "never said hello"
                         : "silent for " +
                               std::to_string(std::chrono::duration_cast<std::chrono::milliseconds>(
                                                  d.silent_for)
                                                  .count()) +
                               " ms")
        << ")";
  }
  for (const CompletedClock& c : events.completed) ApplyCompleted(c);
  for (uint64_t t : events.released) {
    auto it = held_pulls_.find(t);
    if (it == held_pulls_.end()) continue;
    Held h = std::move(it->second);
    held_pulls_.erase(it);
    AnswerPull(h);
  }
  for (const ExpiredPull& e : events.expired) {
    auto it = held_pulls_.find(e.ticket);
    if (it == held_pulls_.end()) continue;
    std::string who;
    for (size_t i = 0; i < e.waiting_for.size(); ++i) {
      if (i) who += ", ";
      who += "worker " + std::to_string(e.waiting_for[i]) + " (clock " +
             std::to_string(e.their_clocks[i]) + ")";
    }
    SendError(
        it->second.identity, it->second.request.request_id,
        DeadlineExceededError(
            "pull at clock " + std::to_string(e.clock) + " held for " +
            std::to_string(std::chrono::duration_cast<std::chrono::seconds>(e.held_for).count()) +
            " s waiting for " + who));
    held_pulls_.erase(it);
  }
  if (!events.dropped.empty()) CheckBarriers();
}

Status Server::Impl::ValidatePull(const protocol::Pull& pull, const InMessage& msg) {
  if (pull.reads.size() > static_cast<size_t>(options_.max_variables))
    return InvalidArgumentError("pull with " + std::to_string(pull.reads.size()) +
                                " reads; the limit is " + std::to_string(options_.max_variables) +
                                " (--max-variables)");
  for (const auto& r : pull.reads) {
    DV_ASSIGN_OR_RETURN(Variable * v, store_.Find(r.variable));
    if (r.encoding != protocol::Encoding::kRaw)
      return UnimplementedError("pull of '" + r.variable + "': only raw encoding is served");
    if (auto* range = std::get_if<protocol::RowRange>(&r.rows)) {
      DV_RETURN_IF_ERROR(VariableStore::ValidateDenseRange(*v, *range));
    } else {
      const auto& idx = std::get<protocol::TensorRef>(r.rows);
      DV_RETURN_IF_ERROR(
          VariableStore::ValidateSparseIndices(*v, idx.dtype, std::span<const int64_t>(idx.shape)));
      DV_RETURN_IF_ERROR(VariableStore::ValidateSparseRows(*v, ToIndices(idx, msg[idx.frame])));
    }
  }
  return OkStatus();
}

void Server::Impl::HandlePull(const Frame& identity, Request& req, InMessage& msg) {
  const auto& pull = std::get<protocol::Pull>(req.body);
  Status s = ValidatePull(pull, msg);
  if (!s.ok()) {
    SendError(identity, req.request_id, s);
    return;
  }
  Held h{identity, std::move(req), std::move(msg)};
  if (h.request.worker_id < 0) {  // control clients never wait
    AnswerPull(h);
    return;
  }
  std::vector<std::string_view> names;
  for (const auto& r : std::get<protocol::Pull>(h.request.body).reads) names.push_back(r.variable);
  uint64_t ticket = next_ticket_++;
  auto decision = controller_->OnPull(ticket, h.request.worker_id, h.request.clock, names,
                                      ControllerClock::now() + options_.pull_deadline);
  if (!decision.ok()) {
    SendError(h.identity, h.request.request_id, decision.status());
    return;
  }
  if (*decision == PullDecision::kAnswerNow) {
    AnswerPull(h);
  } else {
    held_pulls_.emplace(ticket, std::move(h));
  }
}

void Server::Impl::AnswerPull(const Held& held) {
  const auto& pull = std::get<protocol::Pull>(held.request.body);
  if (options_.telemetry) options_.telemetry->OnPullAnswered(held.request, held.arrived);
  Reply reply = NewReply(held.request.request_id);
  protocol::PullReply pr;
  // The values of each read: bytes, and what keeps them alive.
  struct Values {
    const std::byte* data;
    size_t bytes;
    std::shared_ptr<const void> owner;
  };
  std::vector<Values> values;
  values.reserve(pull.reads.size());
  size_t total = 0;
  for (const auto& r : pull.reads) {
    auto found = store_.Find(r.variable);
    if (!found.ok()) {  // cannot happen: validated and variables are never removed
      SendError(held.identity, held.request.request_id, found.status());
      return;
    }
    Variable& v = **found;
    protocol::TensorRef ref;
    ref.frame = static_cast<uint32_t>(values.size() + 1);
    ref.dtype = DType::kF32;
    if (auto* range = std::get_if<protocol::RowRange>(&r.rows)) {
      // Zero-copy: lend the parameter buffer itself; the store never writes
      // a buffer while a snapshot of it is held.
      ParamsSnapshot snap = VariableStore::Snapshot(v);
      const float* base = snap.params->data_as<float>() + v.LocalOffset(range->begin);
      size_t count = static_cast<size_t>(range->size() * v.row_elements());
      ref.shape = v.shape().dims();
      if (!ref.shape.empty()) ref.shape[0] = range->size();
      values.push_back(
          {reinterpret_cast<const std::byte*>(base), count * sizeof(float), snap.params});
      pr.versions.push_back(snap.version);
    } else {
      const auto& idx = std::get<protocol::TensorRef>(r.rows);
      std::vector<int64_t> rows = ToIndices(idx, held.frames[idx.frame]);
      auto buf =
          std::make_shared<std::vector<float>>(rows.size() * static_cast<size_t>(v.row_elements()));
      uint64_t version = 0;
      Status s = VariableStore::ReadRows(v, rows, buf->data(), &version);
      if (!s.ok()) {
        SendError(held.identity, held.request.request_id, s);
        return;
      }
      ref.shape = v.shape().dims();
      if (!ref.shape.empty()) ref.shape[0] = static_cast<int64_t>(rows.size());
      values.push_back(
          {reinterpret_cast<const std::byte*>(buf->data()), buf->size() * sizeof(float), buf});
      pr.versions.push_back(version);
    }
    total += values.back().bytes;
    pr.tensors.push_back(std::move(ref));
  }
  const size_t chunk = PullChunkBytes(pull.chunk_bytes, total);
  if (chunk == 0) {
    std::vector<Payload> payloads;
    payloads.reserve(values.size());
    for (Values& x : values)
      payloads.push_back(Payload::Borrow(x.data, x.bytes, std::move(x.owner)));
    reply.body = std::move(pr);
    SendReply(held.identity, std::move(reply), std::move(payloads));
    return;
  }
  // In pieces: the reply with the shapes, then one message per piece, so the
  // worker copies a piece into its buffer while the next one is arriving.
  uint32_t chunks = 0;
  for (const Values& x : values) chunks += static_cast<uint32_t>((x.bytes + chunk - 1) / chunk);
  pr.chunks = chunks;
  for (auto& ref : pr.tensors) ref.frame = 0;
  reply.body = std::move(pr);
  SendReply(held.identity, std::move(reply));
  for (size_t t = 0; t < values.size(); ++t) {
    for (size_t offset = 0; offset < values[t].bytes; offset += chunk) {
      Reply piece = NewReply(held.request.request_id);
      piece.body = protocol::PullChunk{static_cast<uint32_t>(t), offset};
      std::vector<Payload> payload;
      payload.push_back(Payload::Borrow(
          values[t].data + offset, std::min(chunk, values[t].bytes - offset), values[t].owner));
      SendReply(held.identity, std::move(piece), std::move(payload));
    }
  }
}

void Server::Impl::HandleBarrier(const Frame& identity, const Request& req) {
  if (req.worker_id < 0) {
    SendError(identity, req.request_id, InvalidArgumentError("barrier needs a worker id"));
    return;
  }
  const auto& b = std::get<protocol::Barrier>(req.body);
  barriers_[b.name][req.worker_id] = Held{identity, req, {}};
  CheckBarriers();
}

void Server::Impl::CheckBarriers() {
  ControllerSnapshot snap = controller_->Snapshot();
  for (auto it = barriers_.begin(); it != barriers_.end();) {
    bool all = true;
    for (const auto& w : snap.workers)
      if (w.live && !it->second.count(w.worker)) all = false;
    if (!all) {
      ++it;
      continue;
    }
    for (auto& [w, h] : it->second) SendReply(h.identity, NewReply(h.request.request_id));
    it = barriers_.erase(it);
  }
}

Status Server::Impl::HandleSetMode(const Request& req) {
  const auto& m = std::get<protocol::SetMode>(req.body);
  DV_ASSIGN_OR_RETURN(ModeChange change,
                      controller_->SetStaleness(m.staleness, m.at_clock, m.variable));
  stale_aware_lr_ = m.stale_aware_lr;
  DV_LOG(kInfo) << "staleness of " << (m.variable.empty() ? "the job" : "'" + m.variable + "'")
                << " set to " << StalenessName(m.staleness) << " from clock " << change.at_clock
                << (m.stale_aware_lr ? " (staleness-aware learning rate)" : "");
  Act(std::move(change.events));
  return OkStatus();
}

protocol::StatsReply Server::Impl::MakeStats() const {
  protocol::StatsReply s;
  s.shard_index = options_.shard_index;
  s.staleness = controller_->CurrentStaleness();
  s.last_checkpoint = last_checkpoint_;
  s.nan_updates = nan_updates_;
  for (const auto& w : controller_->Snapshot().workers)
    s.workers.push_back(protocol::WorkerState{w.worker, w.clock, w.live});
  for (Variable* v : store_.All())
    s.variables.push_back(protocol::VariableState{v->name(), v->rows(), v->bytes(), v->version(),
                                                  v->learning_rate()});
  return s;
}

// ---------------------------------------------------------------------------
Server::Server(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
Server::~Server() = default;

StatusOr<std::unique_ptr<Server>> Server::Create(const ServerOptions& options) {
  auto impl = std::make_unique<Impl>(options);
  DV_RETURN_IF_ERROR(impl->Init());
  return std::unique_ptr<Server>(new Server(std::move(impl)));
}

const std::string& Server::endpoint() const { return impl_->endpoint(); }
Status Server::Run() { return impl_->Run(); }
void Server::Stop() { impl_->Stop(); }

}  // namespace distval::ps
