#include "server_harness.h"

#include <unistd.h>

#include <cfloat>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <map>
#include <optional>

#include "distval/encoding.h"
#include "distval/logging.h"
#include "distval/metrics.h"
#include "fuzz_input.h"
#include "server_telemetry.h"

namespace distval::fuzz {

namespace {

using protocol::Reply;
using protocol::Request;

// Finite values above these can overflow float parameters legitimately
// (after enough steps); values that do not fit a float at all must be
// refused by the server, so they do not count.
constexpr double kLargeLearningRate = 1e3;
constexpr double kLargeValue = 1e15;

// Request ids of the harness's own requests (fuzz inputs rarely hit them;
// see Await for what happens when one does).
constexpr uint64_t kHarnessIdBase = uint64_t{0xD157} << 48;

[[noreturn]] void Fail(const std::string& what) {
  std::fprintf(stderr, "server_request_fuzz: %s\n", what.c_str());
  std::fflush(stderr);
  std::abort();
}

// Large but finite as a float: can overflow parameters after some steps.
bool Large(double x, double limit) {
  const double a = std::fabs(x);
  return a > limit && a <= FLT_MAX;
}

protocol::CreateVariable MakeVariable(std::string name, std::vector<int64_t> shape,
                                      protocol::RowRange rows, protocol::OptimizerKind kind,
                                      protocol::Initializer init, int32_t staleness) {
  protocol::CreateVariable cv;
  cv.spec.name = std::move(name);
  cv.spec.dtype = DType::kF32;
  cv.spec.shape = std::move(shape);
  cv.spec.initializer = init;
  cv.spec.optimizer.kind = kind;
  cv.spec.optimizer.learning_rate = kind == protocol::OptimizerKind::kSgd ? 0.1 : 0.01;
  if (kind == protocol::OptimizerKind::kAdamW) cv.spec.optimizer.weight_decay = 0.01;
  cv.spec.staleness = staleness;
  cv.rows = rows;
  return cv;
}

// The float values of `ref`'s frame (decoded from f16 / bf16), or nothing
// when the frame does not match the ref (undecodable requests).
std::optional<std::vector<float>> Floats(const protocol::TensorRef& ref,
                                         const std::vector<std::vector<std::byte>>& payloads) {
  if (ref.dtype != DType::kF32 || ref.frame < 1 || ref.frame > payloads.size()) return {};
  const auto& frame = payloads[ref.frame - 1];
  const size_t n = static_cast<size_t>(ref.num_elements());
  if (frame.size() != n * protocol::EncodedElementSize(DType::kF32, ref.encoding)) return {};
  std::vector<float> out(n);
  protocol::DecodeFloats(frame, ref.encoding, out);
  return out;
}

struct Received {
  Reply reply;
  transport::InMessage frames;  // payload frames (frame 0 dropped)
};

}  // namespace

std::vector<protocol::CreateVariable> HarnessVariables() {
  using protocol::OptimizerKind;
  protocol::Initializer uniform{1, protocol::InitUniform{-0.5, 0.5}};
  protocol::Initializer normal{2, protocol::InitNormal{0.0, 0.1}};
  protocol::Initializer glorot{3, protocol::InitGlorotUniform{}};
  protocol::Initializer one{0, protocol::InitConstant{1.0}};
  protocol::Initializer zeros{0, protocol::InitZeros{}};
  return {
      MakeVariable("dense/w", {16, 8}, {0, 16}, OptimizerKind::kMomentum, uniform,
                   protocol::kStalenessInherit),
      MakeVariable("dense/b", {8}, {0, 8}, OptimizerKind::kAdam, zeros,
                   protocol::kStalenessInherit),
      // Rows [16, 48) of a 64-row variable: this shard's part of it.
      MakeVariable("part/w", {64, 4}, {16, 48}, OptimizerKind::kAdagrad, glorot,
                   protocol::kStalenessInherit),
      MakeVariable("emb", {256, 8}, {0, 256}, OptimizerKind::kSgd, normal,
                   protocol::kStalenessInherit),
      MakeVariable("scale", {}, {0, 1}, OptimizerKind::kAdamW, one, protocol::kStalenessInherit),
      MakeVariable("async/v", {32}, {0, 32}, OptimizerKind::kSgd, one, protocol::kStalenessAsync),
  };
}

WireRequest ToWire(const protocol::Request& request, std::vector<std::vector<std::byte>> payloads) {
  WireRequest w;
  w.header = protocol::EncodeRequest(request);
  w.payloads = std::move(payloads);
  return w;
}

// ---------------------------------------------------------------------------
// One server, its thread, and the DEALER that talks to it.
class ServerHarness::Instance {
 public:
  Instance(ps::NanPolicy policy, std::string checkpoint_dir)
      : policy_(policy), checkpoint_dir_(std::move(checkpoint_dir)) {}
  ~Instance() { Stop(); }

  ps::NanPolicy policy() const { return policy_; }

  Status Start() {
    ps::ServerOptions o;
    o.bind = "tcp://127.0.0.1:0";
    o.num_workers = kHarnessWorkers;
    o.num_shards = kHarnessShards;
    o.staleness = 0;
    // Worker 0 speaks only when a fuzz input speaks for it.
    o.worker_timeout = std::chrono::hours(24);
    o.pull_deadline = std::chrono::milliseconds(500);
    o.threads = 1;
    o.max_frames = 64;
    o.max_variables = 32;
    o.max_variable_bytes = kMaxFramedPayloadBytes;
    o.shared_memory = false;
    o.nan_policy = policy_;
    o.checkpoint_dir = checkpoint_dir_;
    o.checkpoint_every_clocks = 64;
    o.keep_checkpoints = 2;
    // Metrics hooks run on the request path too.
    if (!telemetry_) {
      DV_ASSIGN_OR_RETURN(telemetry_,
                          ps::ServerTelemetry::Create(&registry_, nullptr, 0, kHarnessWorkers));
    }
    o.telemetry = telemetry_.get();
    DV_ASSIGN_OR_RETURN(server_, ps::Server::Create(o));
    exited_.store(false);
    thread_ = std::thread([this] {
      run_status_ = server_->Run();
      exited_.store(true);
    });
    transport::SocketOptions so;
    so.linger_ms = 0;
    DV_ASSIGN_OR_RETURN(dealer_,
                        transport::Socket::Create(context_, transport::SocketType::kDealer, so));
    DV_RETURN_IF_ERROR(dealer_->Connect(server_->endpoint()));

    Request hello;
    hello.worker_id = 0;
    hello.body = protocol::Hello{
        protocol::kProtocolVersion,   protocol::Role::kWorker, 0, kHarnessWorkers, kHarnessShards,
        protocol::kStalenessDontCheck};
    DV_RETURN_IF_ERROR(Call(hello).WithContext("hello"));
    for (const auto& cv : HarnessVariables()) {
      Request r;
      r.body = cv;
      DV_RETURN_IF_ERROR(Call(r).WithContext("creating " + cv.spec.name));
    }
    acked_pushes_.clear();
    return OkStatus();
  }

  void Stop() {
    if (!server_) return;
    server_->Stop();
    thread_.join();
    dealer_.reset();
    server_.reset();
  }

  // What one request did to this server.
  struct Outcome {
    bool exited = false;    // the server stopped (Run returned)
    SentReply sent;         // its reply to the request
    std::string nonfinite;  // "'name' row r holds x" for the first bad value
  };

  // Sends `request`, then the check pull and a Stats request; Finish()
  // waits for them (so that both servers work on a request at once).
  void Begin(const WireRequest& request) {
    transport::OutMessage msg;
    msg.push_back(transport::Payload::Copy(request.header));
    for (const auto& p : request.payloads) msg.push_back(transport::Payload::Copy(p));
    SendOrFail(std::move(msg), "the request");
    pull_ = CheckPull(HarnessVariables());
    stats_ = StatsRequest();
    SendOrFail(Frames(pull_), "the check pull");
    SendOrFail(Frames(stats_), "the stats request");
  }

  // Waits for what Begin sent (`id`: the request's id when it decoded, 0
  // when not), then with `checkpoint` asks for a checkpoint (whose reply may
  // be an error), and with `full_check` pulls every variable.
  Outcome Finish(std::optional<uint64_t> id, bool full_check, bool checkpoint) {
    Outcome out;
    const Request pull = std::move(pull_);
    const Request stats = std::move(stats_);
    std::map<uint64_t, Received> got;
    if (!Await({pull.request_id, stats.request_id}, &got, id, &out.sent)) {
      out.exited = true;
      return out;
    }
    out.nonfinite = NonFinite(pull, got[pull.request_id]);
    if (checkpoint) {
      Request c;
      c.request_id = NextId();
      c.body = protocol::Checkpoint{};
      const Request stats_after = StatsRequest();
      SendOrFail(Frames(c), "the checkpoint request");
      SendOrFail(Frames(stats_after), "the stats request");
      if (!Await({c.request_id, stats_after.request_id}, &got, id, &out.sent, c.request_id)) {
        out.exited = true;
        return out;
      }
    }
    if (!out.nonfinite.empty() || !full_check) return out;

    // Every variable the server holds, as Stats lists them.
    const auto* sr = std::get_if<protocol::StatsReply>(&got[stats.request_id].reply.body);
    if (sr == nullptr) Fail("the stats reply has no stats body");
    std::vector<protocol::CreateVariable> all;
    for (const auto& v : sr->variables) {
      protocol::CreateVariable cv;
      cv.spec.name = v.name;
      cv.rows = v.rows;
      all.push_back(cv);
    }
    const Request pull_all = CheckPull(all);
    const Request stats2 = StatsRequest();
    SendOrFail(Frames(pull_all), "the full check pull");
    SendOrFail(Frames(stats2), "the stats request");
    got.clear();
    if (!Await({pull_all.request_id, stats2.request_id}, &got, id, &out.sent)) {
      out.exited = true;
      return out;
    }
    out.nonfinite = NonFinite(pull_all, got[pull_all.request_id]);
    return out;
  }

  // Pushes (worker, id) this server acknowledged.
  std::set<std::pair<int32_t, uint64_t>>& acked_pushes() { return acked_pushes_; }

 private:
  uint64_t NextId() { return kHarnessIdBase + next_id_++; }

  Request StatsRequest() {
    Request r;
    r.request_id = NextId();
    r.body = protocol::Stats{};
    return r;
  }

  // A control client's pull of every row this shard holds of `vars`.
  Request CheckPull(const std::vector<protocol::CreateVariable>& vars) {
    Request r;
    r.request_id = NextId();
    protocol::Pull p;
    for (const auto& cv : vars) {
      protocol::Read read;
      read.variable = cv.spec.name;
      read.rows = cv.rows;
      p.reads.push_back(read);
    }
    r.body = std::move(p);
    return r;
  }

  static transport::OutMessage Frames(const Request& r) {
    transport::OutMessage m;
    m.push_back(transport::Payload::Copy(protocol::EncodeRequest(r)));
    return m;
  }

  void SendOrFail(transport::OutMessage msg, const char* what) {
    Status s = dealer_->Send(std::move(msg), std::chrono::milliseconds(5000));
    if (!s.ok()) Fail(std::string("sending ") + what + " failed: " + s.ToString());
  }

  // Receives until every id of `ids` has its reply (into `got`; only
  // `may_fail` may be an error); a reply with `fuzz_id` on the way is the
  // request's own (the first one counts).
  // False when the server stopped; aborts after kReplyTimeout.
  bool Await(std::vector<uint64_t> ids, std::map<uint64_t, Received>* got,
             std::optional<uint64_t> fuzz_id, SentReply* sent,
             std::optional<uint64_t> may_fail = std::nullopt) {
    const auto deadline = std::chrono::steady_clock::now() + kReplyTimeout;
    size_t missing = ids.size();
    while (missing > 0) {
      auto msg = dealer_->Receive(std::chrono::milliseconds(2));
      if (!msg.ok()) {
        if (msg.status().code() != StatusCode::kDeadlineExceeded)
          Fail("receiving failed: " + msg.status().ToString());
        if (exited_.load()) {
          if (!run_status_.ok()) Fail("the server's Run failed: " + run_status_.ToString());
          return false;
        }
        if (std::chrono::steady_clock::now() > deadline)
          Fail("no reply from the server within " + std::to_string(kReplyTimeout.count()) + " s");
        continue;
      }
      if (msg->empty()) Fail("an empty reply message");
      std::vector<size_t> sizes;
      for (size_t i = 1; i < msg->size(); ++i) sizes.push_back((*msg)[i].size());
      auto reply = protocol::DecodeReply((*msg)[0].bytes(), sizes);
      if (!reply.ok())
        Fail("the server sent a reply that does not decode: " + reply.status().ToString());
      const uint64_t rid = reply->request_id;
      bool ours = false;
      for (uint64_t id : ids) ours |= id == rid;
      if (ours && !got->count(rid)) {
        if (!reply->status().ok() && rid != may_fail)
          Fail("the harness's request " + std::to_string(rid) +
               " failed: " + reply->status().ToString());
        (*got)[rid] =
            Received{std::move(*reply), transport::InMessage(msg->begin() + 1, msg->end())};
        --missing;
      } else if (fuzz_id && rid == *fuzz_id && !sent->answered) {
        sent->answered = true;
        sent->reply = std::move(*reply);
      }
    }
    return true;
  }

  // "" when every value of the pull reply is finite, else the first bad one.
  static std::string NonFinite(const Request& pull, const Received& r) {
    const auto& reads = std::get<protocol::Pull>(pull.body).reads;
    const auto* pr = std::get_if<protocol::PullReply>(&r.reply.body);
    if (pr == nullptr || pr->tensors.size() != reads.size())
      Fail("the check pull's reply does not hold one tensor per read");
    for (size_t i = 0; i < reads.size(); ++i) {
      const protocol::TensorRef& t = pr->tensors[i];
      const transport::Frame& f = r.frames[t.frame - 1];
      const size_t n = f.size() / sizeof(float);
      for (size_t k = 0; k < n; ++k) {
        float x;
        std::memcpy(&x, f.data() + k * sizeof(float), sizeof(float));
        if (!std::isfinite(x))
          return "'" + reads[i].variable + "' element " + std::to_string(k) + " is " +
                 std::to_string(x);
      }
    }
    return "";
  }

  // A setup request; its status.
  Status Call(Request r) {
    r.request_id = NextId();
    SendOrFail(Frames(r), "a setup request");
    std::map<uint64_t, Received> got;
    const auto deadline = std::chrono::steady_clock::now() + kReplyTimeout;
    while (std::chrono::steady_clock::now() < deadline) {
      auto msg = dealer_->Receive(std::chrono::milliseconds(100));
      if (!msg.ok()) continue;
      std::vector<size_t> sizes;
      for (size_t i = 1; i < msg->size(); ++i) sizes.push_back((*msg)[i].size());
      auto reply = protocol::DecodeReply((*msg)[0].bytes(), sizes);
      if (reply.ok() && reply->request_id == r.request_id) return reply->status();
    }
    return DeadlineExceededError("no reply to a setup request");
  }

  ps::NanPolicy policy_;
  std::string checkpoint_dir_;
  transport::Context context_{1};
  MetricRegistry registry_;
  std::unique_ptr<ps::ServerTelemetry> telemetry_;  // outlives server_
  std::unique_ptr<ps::Server> server_;
  std::thread thread_;
  std::atomic<bool> exited_{false};
  Status run_status_;  // written by thread_ before exited_ is set
  std::unique_ptr<transport::Socket> dealer_;
  uint64_t next_id_ = 0;
  std::set<std::pair<int32_t, uint64_t>> acked_pushes_;
  Request pull_, stats_;  // sent by Begin, awaited by Finish
};

// ---------------------------------------------------------------------------
StatusOr<std::unique_ptr<ServerHarness>> ServerHarness::Create() {
  std::unique_ptr<ServerHarness> h(new ServerHarness());
  // Checkpoints go to tmpfs when there is one: fsync there costs nothing
  // (on a disk, a checkpoint request took ~45 ms instead of ~1).
  std::error_code ec;
  const std::filesystem::path base =
      std::filesystem::is_directory("/dev/shm", ec) && ::access("/dev/shm", W_OK) == 0
          ? std::filesystem::path("/dev/shm")
          : std::filesystem::temp_directory_path();
  std::string tmpl = (base / "distval-fuzz-XXXXXX").string();
  if (::mkdtemp(tmpl.data()) == nullptr)
    return InternalError("mkdtemp " + tmpl + ": " + std::strerror(errno));
  h->root_ = tmpl;
  for (ps::NanPolicy p : {ps::NanPolicy::kReject, ps::NanPolicy::kSkip}) {
    const std::string dir = h->root_ + (p == ps::NanPolicy::kReject ? "/reject" : "/skip");
    h->instances_.push_back(std::make_unique<Instance>(p, dir));
    DV_RETURN_IF_ERROR(h->instances_.back()->Start());
  }
  return h;
}

ServerHarness::~ServerHarness() {
  instances_.clear();
  std::error_code ec;
  if (!root_.empty()) std::filesystem::remove_all(root_, ec);
}

std::vector<SentReply> ServerHarness::Send(const WireRequest& in) {
  const WireRequest* request = &in;
  WireRequest rewritten;
  std::vector<size_t> sizes;
  for (const auto& p : in.payloads) sizes.push_back(p.size());
  auto decoded = protocol::DecodeRequest(in.header, sizes);
  bool shutdown = false, nonfinite_push = false;
  if (decoded.ok()) {
    Request& r = *decoded;
    if (auto* c = std::get_if<protocol::Checkpoint>(&r.body); c && !c->directory.empty()) {
      // Never write where an input says.
      c->directory = root_ + "/named";
      rewritten = ToWire(r, in.payloads);
      request = &rewritten;
    }
    shutdown = std::holds_alternative<protocol::Shutdown>(r.body);
    // Finite values that can make parameters overflow (see the header).
    if (const auto* push = std::get_if<protocol::Push>(&r.body)) {
      for (const auto& u : push->updates) {
        auto values = Floats(u.values, in.payloads);
        if (!values) continue;
        for (float x : *values) {
          if (!std::isfinite(x))
            nonfinite_push = true;
          else if (Large(x, kLargeValue))
            unsafe_ = true;
        }
      }
    } else if (const auto* lr = std::get_if<protocol::SetLearningRate>(&r.body)) {
      if (Large(lr->learning_rate, kLargeLearningRate)) unsafe_ = true;
    } else if (const auto* cv = std::get_if<protocol::CreateVariable>(&r.body)) {
      const auto& o = cv->spec.optimizer;
      if (Large(o.learning_rate, kLargeLearningRate)) unsafe_ = true;
      if (o.weight_decay * o.learning_rate > 1 && o.weight_decay <= FLT_MAX) unsafe_ = true;
      std::visit(
          [&](const auto& k) {
            using K = std::decay_t<decltype(k)>;
            if constexpr (std::is_same_v<K, protocol::InitConstant>) {
              unsafe_ |= Large(k.value, kLargeValue);
            } else if constexpr (std::is_same_v<K, protocol::InitUniform>) {
              unsafe_ |= Large(k.low, kLargeValue) || Large(k.high, kLargeValue);
            } else if constexpr (std::is_same_v<K, protocol::InitNormal>) {
              unsafe_ |= Large(k.mean, kLargeValue) || Large(k.stddev, kLargeValue / 16);
            } else if constexpr (std::is_same_v<K, protocol::InitValues>) {
              if (auto values = Floats(k.values, in.payloads))
                for (float x : *values) unsafe_ |= Large(x, kLargeValue);
            }
          },
          cv->spec.initializer.kind);
    }
  }

  ++requests_;
  const bool full_check = requests_ % kFullCheckEvery == 0;
  // What a create accepts must also be checkpointable.
  const bool checkpoint =
      decoded.ok() && std::holds_alternative<protocol::CreateVariable>(decoded->body);
  // A request that does not decode is answered with id 0.
  const std::optional<uint64_t> id = decoded.ok() ? decoded->request_id : 0;
  std::vector<SentReply> replies;
  bool restart = requests_ % kRestartEvery == 0;
  for (auto& inst : instances_) inst->Begin(*request);
  for (auto& inst : instances_) {
    const char* name = inst->policy() == ps::NanPolicy::kReject ? "reject" : "skip";
    Instance::Outcome o = inst->Finish(id, full_check, checkpoint);
    replies.push_back(o.sent);
    if (o.exited) {
      if (!shutdown)
        Fail(std::string("the ") + name + " server stopped on a request that is not a shutdown");
      restart = true;
      continue;
    }
    const bool acked = o.sent.answered && o.sent.reply.code == StatusCode::kOk &&
                       std::holds_alternative<protocol::NoBody>(o.sent.reply.body);
    if (decoded.ok() && std::holds_alternative<protocol::Push>(decoded->body)) {
      const auto key = std::make_pair(decoded->worker_id, decoded->request_id);
      if (nonfinite_push && acked && inst->policy() == ps::NanPolicy::kReject &&
          !inst->acked_pushes().count(key))
        Fail("the reject server acknowledged push " + std::to_string(decoded->request_id) +
             " whose gradient holds NaN/Inf");
      if (acked && decoded->worker_id >= 0) inst->acked_pushes().insert(key);
    }
    if (!o.nonfinite.empty()) {
      if (!unsafe_)
        Fail(std::string("a parameter of the ") + name + " server is not finite: " + o.nonfinite);
      restart = true;  // legitimately overflowed: start afresh
    }
  }
  if (restart) {
    for (auto& inst : instances_) {
      inst->Stop();
      Status s = inst->Start();
      if (!s.ok()) Fail("restarting a server failed: " + s.ToString());
    }
    unsafe_ = false;
    ++restarts_;
  }
  return replies;
}

}  // namespace distval::fuzz
