// ZeroMQ transport on the libzmq C API (no exceptions can escape).
//
// Alignment of received frames, measured on libzmq 4.3.4 (Debian 12, glibc,
// x86-64) by printing zmq_msg_data() % 64 for frames of 10 B .. 1 MiB sent
// DEALER -> ROUTER:
//  - ZMQ_ZERO_COPY_RECV on (libzmq default): a frame that fits in the
//    stream engine's current 8 KiB read batch becomes a view into that
//    batch buffer, at whatever offset the wire put it (observed: 13, 35, 42,
//    63 mod 64: not even 4-byte aligned), and holding it pins the whole
//    batch. Larger frames are read directly into a msg_t allocation.
//  - ZMQ_ZERO_COPY_RECV off (what Context sets): every frame gets its own
//    msg_t; frames <= 33 bytes live inside the zmq_msg_t (offset 8), larger
//    ones at malloc() + 40 (the content_t header): always 8 mod 16. Frames
//    larger than the batch are still read from the socket straight into
//    that allocation, so only frames < 8 KiB pay one extra memcpy.
//  - inproc passes the msg_t through: a zero-copy (Borrow) frame arrives at
//    the sender's pointer, a copied one at malloc() + 40.
// Frame::AlignedFor reports the truth for each frame; nothing here promises
// more than 8 bytes.
#include "distval/transport.h"

#include <signal.h>
#include <zmq.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cstring>
#include <limits>
#include <string_view>
#include <thread>
#include <utility>

#include "distval/tensor.h"
#include "socket_shm.h"

namespace distval::transport {
namespace {

using Clock = std::chrono::steady_clock;

// Context option ZMQ_ZERO_COPY_RECV; zmq.h declares it only under
// ZMQ_BUILD_DRAFT_API, but libzmq 4.3 accepts it in every build.
constexpr int kZmqZeroCopyRecv = 10;

// Copy payloads up to this size are copied into the zmq message (a VSM or a
// small malloc); larger ones are handed over without a copy.
constexpr size_t kInlineCopyMax = 1024;

// Human-readable description of a ZeroMQ errno.
std::string ErrnoText(int err) {
  return std::string(zmq_strerror(err)) + " (errno " + std::to_string(err) + ")";
}

// Maps a ZeroMQ errno to a canonical Status. `what` names the operation and
// its subject, e.g. "bind tcp://127.0.0.1:5555".
Status ZmqError(int err, std::string_view what) {
  std::string message = std::string(what) + ": " + ErrnoText(err);
  switch (err) {
    case EAGAIN:
      return DeadlineExceededError(std::move(message));
    case EHOSTUNREACH:
    case EADDRINUSE:
    case EADDRNOTAVAIL:
    case ENODEV:
    case ECONNREFUSED:
      return UnavailableError(std::move(message));
    case EINVAL:
    case EPROTONOSUPPORT:
    case ENOCOMPATPROTO:
    case ENOTSUP:
    case EFAULT:
      return InvalidArgumentError(std::move(message));
    case ETERM:
      return CancelledError(std::move(message));
    case ENOENT:
      return NotFoundError(std::move(message));
    case EMFILE:
    case ENOMEM:
    case EMTHREAD:
      return ResourceExhaustedError(std::move(message));
    case EFSM:
      return FailedPreconditionError(std::move(message));
    default:
      return InternalError(std::move(message));
  }
}

// A routing id for messages: printable ASCII as is, anything else as hex.
std::string PeerName(std::span<const std::byte> id) {
  bool printable = !id.empty();
  for (std::byte b : id) {
    const auto c = static_cast<unsigned char>(b);
    if (c < 0x20 || c > 0x7e) printable = false;
  }
  if (printable) {
    std::string out;
    out.reserve(id.size() + 2);
    out.push_back('\'');
    out.append(reinterpret_cast<const char*>(id.data()), id.size());
    out.push_back('\'');
    return out;
  }
  static constexpr char kHex[] = "0123456789abcdef";
  std::string out = "0x";
  for (std::byte b : id) {
    const auto c = static_cast<unsigned char>(b);
    out += kHex[c >> 4];
    out += kHex[c & 0xf];
  }
  return out;
}

}  // namespace

namespace internal {

// Absolute deadline for an optional relative timeout.
class Deadline {
 public:
  explicit Deadline(std::optional<std::chrono::milliseconds> timeout)
      : infinite_(!timeout.has_value()),
        at_(infinite_ ? Clock::time_point::max()
                      : Clock::now() + std::max(*timeout, std::chrono::milliseconds(0))) {}
  bool infinite() const { return infinite_; }
  // Milliseconds left for zmq_poll: -1 when infinite, >= 0 otherwise
  // (rounded up so that a poll never returns before the deadline).
  long RemainingMs() const {
    if (infinite_) return -1;
    const auto left = at_ - Clock::now();
    if (left <= Clock::duration::zero()) return 0;
    const auto ms = std::chrono::ceil<std::chrono::milliseconds>(left).count();
    return static_cast<long>(std::min<int64_t>(ms, std::numeric_limits<int>::max()));
  }
  bool Expired() const { return !infinite_ && Clock::now() >= at_; }

 private:
  bool infinite_;
  Clock::time_point at_;
};

}  // namespace internal

namespace {

using internal::Deadline;

// Polls one socket for `events` until ready, the deadline passes or an error.
// Returns true when ready, false on timeout.
StatusOr<bool> PollOne(void* socket, short events, const Deadline& deadline,
                       std::string_view what) {
  for (;;) {
    zmq_pollitem_t item{socket, 0, events, 0};
    const int rc = zmq_poll(&item, 1, deadline.RemainingMs());
    if (rc < 0) {
      if (errno == EINTR) continue;
      return ZmqError(errno, what);
    }
    if (rc > 0 && (item.revents & events) != 0) return true;
    if (deadline.Expired()) return false;
  }
}

// Keeps a Borrow owner alive inside ZeroMQ; deleted by ReleaseOwner.
struct OwnerHolder {
  std::shared_ptr<const void> owner;
};
void ReleaseOwner(void* /*data*/, void* hint) {
  std::unique_ptr<OwnerHolder> holder(static_cast<OwnerHolder*>(hint));
}

// Keeps a large Copy payload's vector alive inside ZeroMQ.
struct VectorHolder {
  std::vector<std::byte> bytes;
};
void ReleaseVector(void* /*data*/, void* hint) {
  std::unique_ptr<VectorHolder> holder(static_cast<VectorHolder*>(hint));
}

// A received zmq message, kept alive by the Frames that view it.
struct ReceivedMessage {
  ReceivedMessage() { zmq_msg_init(&msg); }
  ~ReceivedMessage() { zmq_msg_close(&msg); }
  ReceivedMessage(const ReceivedMessage&) = delete;
  ReceivedMessage& operator=(const ReceivedMessage&) = delete;
  zmq_msg_t msg;
};

// Closes a zmq message on scope exit unless released (after a successful
// send ZeroMQ owns it and the msg is empty, so closing is harmless either
// way; this only matters on failure).
class MsgGuard {
 public:
  MsgGuard() { zmq_msg_init(&msg_); }
  ~MsgGuard() { zmq_msg_close(&msg_); }
  MsgGuard(const MsgGuard&) = delete;
  MsgGuard& operator=(const MsgGuard&) = delete;
  zmq_msg_t* get() { return &msg_; }

 private:
  zmq_msg_t msg_;
};

int ToZmqType(SocketType type) {
  switch (type) {
    case SocketType::kRouter:
      return ZMQ_ROUTER;
    case SocketType::kDealer:
      return ZMQ_DEALER;
    case SocketType::kPair:
      return ZMQ_PAIR;
    case SocketType::kPush:
      return ZMQ_PUSH;
    case SocketType::kPull:
      return ZMQ_PULL;
    case SocketType::kReq:
      return ZMQ_REQ;
    case SocketType::kRep:
      return ZMQ_REP;
  }
  return -1;
}

template <typename T>
Status SetOption(void* socket, int option, const T& value, std::string_view name) {
  if (zmq_setsockopt(socket, option, &value, sizeof(value)) != 0) {
    return ZmqError(errno, "set socket option " + std::string(name));
  }
  return OkStatus();
}

Status SetStringOption(void* socket, int option, const std::string& value, std::string_view name) {
  if (zmq_setsockopt(socket, option, value.data(), value.size()) != 0) {
    return ZmqError(errno, "set socket option " + std::string(name));
  }
  return OkStatus();
}

Status CheckCurveKey(const std::string& key, std::string_view field) {
  uint8_t decoded[32];
  if (key.size() != 40 || zmq_z85_decode(decoded, key.c_str()) == nullptr) {
    return InvalidArgumentError("SocketOptions." + std::string(field) +
                                " must be a 40-character Z85 CURVE key, got " +
                                std::to_string(key.size()) + " characters");
  }
  return OkStatus();
}

// ZMQ_CURVE_SERVER / _SECRETKEY / _PUBLICKEY / _SERVERKEY and ZMQ_ZAP_DOMAIN.
Status ApplyCurveOptions(void* socket, const SocketOptions& options) {
  const bool client = !options.curve_server_key.empty();
  if (!options.curve_server && !client) {
    if (!options.curve_secret_key.empty() || !options.curve_public_key.empty())
      return InvalidArgumentError(
          "SocketOptions: CURVE keys given without curve_server or curve_server_key");
    if (options.zap_domain.empty()) return OkStatus();
    return SetStringOption(socket, ZMQ_ZAP_DOMAIN, options.zap_domain, "ZMQ_ZAP_DOMAIN");
  }
  if (options.curve_server && client)
    return InvalidArgumentError(
        "SocketOptions: curve_server and curve_server_key exclude each other");
  if (options.shared_memory)
    return InvalidArgumentError(
        "SocketOptions: CURVE and shared_memory exclude each other (turn shared_memory off)");
  if (zmq_has("curve") == 0) return UnimplementedError("libzmq was built without CURVE support");
  DV_RETURN_IF_ERROR(CheckCurveKey(options.curve_secret_key, "curve_secret_key"));
  if (client) {
    DV_RETURN_IF_ERROR(CheckCurveKey(options.curve_public_key, "curve_public_key"));
    DV_RETURN_IF_ERROR(CheckCurveKey(options.curve_server_key, "curve_server_key"));
    DV_RETURN_IF_ERROR(SetStringOption(socket, ZMQ_CURVE_SERVERKEY, options.curve_server_key,
                                       "ZMQ_CURVE_SERVERKEY"));
    DV_RETURN_IF_ERROR(SetStringOption(socket, ZMQ_CURVE_PUBLICKEY, options.curve_public_key,
                                       "ZMQ_CURVE_PUBLICKEY"));
  } else {
    const int on = 1;
    DV_RETURN_IF_ERROR(SetOption(socket, ZMQ_CURVE_SERVER, on, "ZMQ_CURVE_SERVER"));
  }
  DV_RETURN_IF_ERROR(SetStringOption(socket, ZMQ_CURVE_SECRETKEY, options.curve_secret_key,
                                     "ZMQ_CURVE_SECRETKEY"));
  if (!options.zap_domain.empty())
    DV_RETURN_IF_ERROR(
        SetStringOption(socket, ZMQ_ZAP_DOMAIN, options.zap_domain, "ZMQ_ZAP_DOMAIN"));
  return OkStatus();
}

Status ApplyOptions(void* socket, SocketType type, const SocketOptions& options) {
  if (options.max_message_bytes < -1) {
    return InvalidArgumentError("SocketOptions.max_message_bytes must be >= -1, got " +
                                std::to_string(options.max_message_bytes));
  }
  if (options.send_hwm < 0 || options.recv_hwm < 0) {
    return InvalidArgumentError("SocketOptions.send_hwm/recv_hwm must be >= 0, got " +
                                std::to_string(options.send_hwm) + "/" +
                                std::to_string(options.recv_hwm));
  }
  if (options.linger_ms < -1) {
    return InvalidArgumentError("SocketOptions.linger_ms must be >= -1, got " +
                                std::to_string(options.linger_ms));
  }
  if (options.routing_id.size() > 255) {
    return InvalidArgumentError("SocketOptions.routing_id must be at most 255 bytes, got " +
                                std::to_string(options.routing_id.size()));
  }
  if (options.router_mandatory && type != SocketType::kRouter) {
    return InvalidArgumentError("SocketOptions.router_mandatory applies to ROUTER sockets only");
  }
  DV_RETURN_IF_ERROR(SetOption(socket, ZMQ_LINGER, options.linger_ms, "ZMQ_LINGER"));
  DV_RETURN_IF_ERROR(SetOption(socket, ZMQ_SNDHWM, options.send_hwm, "ZMQ_SNDHWM"));
  DV_RETURN_IF_ERROR(SetOption(socket, ZMQ_RCVHWM, options.recv_hwm, "ZMQ_RCVHWM"));
  const int64_t max_message = options.max_message_bytes;
  DV_RETURN_IF_ERROR(SetOption(socket, ZMQ_MAXMSGSIZE, max_message, "ZMQ_MAXMSGSIZE"));
  const int keepalive = options.tcp_keepalive ? 1 : 0;
  DV_RETURN_IF_ERROR(SetOption(socket, ZMQ_TCP_KEEPALIVE, keepalive, "ZMQ_TCP_KEEPALIVE"));
  if (options.reconnect_ivl_ms < 0 || options.reconnect_ivl_max_ms < 0 ||
      options.heartbeat_ivl_ms < 0 || options.heartbeat_timeout_ms < 0) {
    return InvalidArgumentError(
        "SocketOptions.reconnect_ivl_ms/reconnect_ivl_max_ms/heartbeat_ivl_ms/"
        "heartbeat_timeout_ms must be >= 0");
  }
  DV_RETURN_IF_ERROR(
      SetOption(socket, ZMQ_RECONNECT_IVL, options.reconnect_ivl_ms, "ZMQ_RECONNECT_IVL"));
  DV_RETURN_IF_ERROR(SetOption(socket, ZMQ_RECONNECT_IVL_MAX, options.reconnect_ivl_max_ms,
                               "ZMQ_RECONNECT_IVL_MAX"));
  if (options.heartbeat_ivl_ms > 0) {
    DV_RETURN_IF_ERROR(
        SetOption(socket, ZMQ_HEARTBEAT_IVL, options.heartbeat_ivl_ms, "ZMQ_HEARTBEAT_IVL"));
    DV_RETURN_IF_ERROR(SetOption(socket, ZMQ_HEARTBEAT_TIMEOUT, options.heartbeat_timeout_ms,
                                 "ZMQ_HEARTBEAT_TIMEOUT"));
  }
  if (!options.routing_id.empty()) {
    if (zmq_setsockopt(socket, ZMQ_ROUTING_ID, options.routing_id.data(),
                       options.routing_id.size()) != 0) {
      return ZmqError(errno, "set socket option ZMQ_ROUTING_ID to " +
                                 PeerName(std::as_bytes(std::span(options.routing_id))));
    }
  }
  if (options.router_mandatory) {
    const int on = 1;
    DV_RETURN_IF_ERROR(SetOption(socket, ZMQ_ROUTER_MANDATORY, on, "ZMQ_ROUTER_MANDATORY"));
  }
  DV_RETURN_IF_ERROR(ApplyCurveOptions(socket, options));
  return OkStatus();
}

// "tcp://host:0" -> "tcp://host:*" (ZeroMQ's wildcard port).
std::string NormalizeBindEndpoint(const std::string& endpoint) {
  constexpr std::string_view kTcp = "tcp://";
  if (endpoint.size() > kTcp.size() + 2 && endpoint.compare(0, kTcp.size(), kTcp) == 0 &&
      endpoint.compare(endpoint.size() - 2, 2, ":0") == 0) {
    return endpoint.substr(0, endpoint.size() - 1) + "*";
  }
  return endpoint;
}

// Turns `payload` into `msg` (initialized and empty on entry). On success
// the payload's owner or vector has moved into the msg; on failure the
// payload still holds them and releases them when destroyed.
Status FillMessage(const std::byte* data, size_t size, bool borrowed,
                   std::shared_ptr<const void>& owner, std::vector<std::byte>& copy,
                   zmq_msg_t* msg) {
  if (size == 0) {
    owner.reset();
    return OkStatus();  // The empty message stays as it is.
  }
  void* bytes = const_cast<std::byte*>(data);
  if (borrowed) {
    if (owner == nullptr) {
      if (zmq_msg_init_data(msg, bytes, size, nullptr, nullptr) != 0) {
        return ZmqError(errno, "zmq_msg_init_data");
      }
      return OkStatus();
    }
    auto holder = std::make_unique<OwnerHolder>();
    holder->owner = std::move(owner);
    if (zmq_msg_init_data(msg, bytes, size, &ReleaseOwner, holder.get()) != 0) {
      const int err = errno;
      owner = std::move(holder->owner);
      return ZmqError(err, "zmq_msg_init_data");
    }
    static_cast<void>(holder.release());  // ReleaseOwner deletes it.
    return OkStatus();
  }
  if (size <= kInlineCopyMax) {
    if (zmq_msg_init_size(msg, size) != 0) return ZmqError(errno, "zmq_msg_init_size");
    std::memcpy(zmq_msg_data(msg), data, size);
    return OkStatus();
  }
  auto holder = std::make_unique<VectorHolder>();
  holder->bytes = std::move(copy);
  if (zmq_msg_init_data(msg, holder->bytes.data(), holder->bytes.size(), &ReleaseVector,
                        holder.get()) != 0) {
    const int err = errno;
    copy = std::move(holder->bytes);
    return ZmqError(err, "zmq_msg_init_data");
  }
  static_cast<void>(holder.release());  // ReleaseVector deletes it.
  return OkStatus();
}

}  // namespace

// ---------------------------------------------------------------- Context

Context::Context(int io_threads)
    : ctx_(zmq_ctx_new()), shared_memory_(std::make_shared<SharedMemoryRegistry>()) {
  if (ctx_ == nullptr) return;
  // These can only fail for an invalid option value; the defaults then stay.
  zmq_ctx_set(ctx_, ZMQ_IO_THREADS, io_threads < 0 ? 1 : io_threads);
  zmq_ctx_set(ctx_, ZMQ_BLOCKY, 0);
  zmq_ctx_set(ctx_, kZmqZeroCopyRecv, 0);
}

Context::~Context() {
  if (ctx_ == nullptr) return;
  while (zmq_ctx_term(ctx_) != 0 && errno == EINTR) {
  }
}

void Context::Shutdown() {
  if (ctx_ != nullptr) zmq_ctx_shutdown(ctx_);
}

// ---------------------------------------------------------------- Payload

Payload Payload::Copy(std::span<const std::byte> bytes) {
  return Copy(std::vector<std::byte>(bytes.begin(), bytes.end()));
}

Payload Payload::Copy(std::vector<std::byte> bytes) {
  Payload p;
  p.copy_ = std::move(bytes);
  p.data_ = p.copy_.data();
  p.size_ = p.copy_.size();
  return p;
}

Payload Payload::Borrow(const void* data, size_t size, std::shared_ptr<const void> owner) {
  Payload p;
  p.data_ = static_cast<const std::byte*>(data);
  p.size_ = size;
  p.owner_ = std::move(owner);
  p.borrowed_ = true;
  return p;
}

Payload Payload::Duplicate() const {
  if (borrowed_) return Borrow(data_, size_, owner_);
  return Copy(std::vector<std::byte>(copy_));
}

Payload Payload::Slice(size_t offset, size_t size) const {
  if (borrowed_) return Borrow(data_ + offset, size, owner_);
  return Copy(std::span<const std::byte>(copy_.data() + offset, size));
}

// ---------------------------------------------------------------- Frame

Frame Frame::FromBytes(std::span<const std::byte> bytes) {
  Frame frame;
  if (bytes.empty()) return frame;
  AlignedBuffer buffer = AlignedAlloc(bytes.size());
  std::memcpy(buffer.get(), bytes.data(), bytes.size());
  frame.data_ = buffer.get();
  frame.size_ = bytes.size();
  frame.holder_ = std::shared_ptr<std::byte[]>(std::move(buffer));
  return frame;
}

Frame Frame::Adopt(std::shared_ptr<const void> owner, const std::byte* data, size_t size) {
  Frame frame;
  if (size == 0) return frame;
  frame.data_ = data;
  frame.size_ = size;
  frame.holder_ = std::move(owner);
  return frame;
}

Status Frame::WaitReady(size_t bytes, std::chrono::milliseconds timeout) const {
  if (progress_ == nullptr) return OkStatus();
  bytes = std::min(bytes, size_);
  uint64_t* counter = const_cast<uint64_t*>(progress_);
  auto ready = [&] {
    return std::atomic_ref<uint64_t>(*counter).load(std::memory_order_acquire) >= bytes;
  };
  if (ready()) return OkStatus();
  bool gone = false;
  const int pid = stream_pid_;
  if (internal::Await(counter, waiters_, internal::kReaderWaits, ready, Clock::now() + timeout,
                      [&gone, pid] {
                        gone = pid > 0 && kill(pid, 0) != 0 && errno == ESRCH;
                        return !gone;
                      }))
    return OkStatus();
  const uint64_t have = std::atomic_ref<uint64_t>(*counter).load();
  if (gone)
    return UnavailableError("shared-memory frame: the sending process " + std::to_string(pid) +
                            " is gone after " + std::to_string(have) + " of " +
                            std::to_string(size_) + " bytes");
  return DeadlineExceededError("shared-memory frame: " + std::to_string(have) + " of " +
                               std::to_string(size_) + " bytes after " +
                               std::to_string(timeout.count()) + " ms");
}

StatusOr<const std::byte*> Frame::Window(size_t offset, size_t length,
                                         std::chrono::milliseconds timeout) const {
  if (offset > size_ || length > size_ - offset)
    return OutOfRangeError("window [" + std::to_string(offset) + ", +" + std::to_string(length) +
                           ") outside a frame of " + std::to_string(size_) + " bytes");
  if (ring_ == nullptr) {
    DV_RETURN_IF_ERROR(WaitReady(offset + length, timeout));
    return data_ + offset;
  }
  std::atomic_ref<uint64_t> consumed(*consumed_);
  if (offset < consumed.load(std::memory_order_relaxed) ||
      offset / ring_slot_ != (offset + std::max<size_t>(length, 1) - 1) / ring_slot_)
    return FailedPreconditionError("ring window [" + std::to_string(offset) + ", +" +
                                   std::to_string(length) + ") goes back or crosses a " +
                                   std::to_string(ring_slot_) + "-byte boundary");
  // Everything before `offset` is done with: the sender may overwrite it.
  if (offset > consumed.load(std::memory_order_relaxed))
    internal::Publish(consumed_, offset, waiters_, internal::kWriterWaits);
  DV_RETURN_IF_ERROR(WaitReady(offset + length, timeout));
  return ring_ + offset % ring_bytes_;
}

StatusOr<Frame> Frame::Materialized(std::chrono::milliseconds timeout) const {
  if (ring_ == nullptr) {
    DV_RETURN_IF_ERROR(WaitReady(size_, timeout));
    Frame f = *this;
    f.progress_ = nullptr;
    return f;
  }
  AlignedBuffer buffer = AlignedAlloc(size_);
  for (size_t offset = 0; offset < size_; offset += ring_slot_) {
    const size_t n = std::min(ring_slot_, size_ - offset);
    DV_ASSIGN_OR_RETURN(const std::byte* p, Window(offset, n, timeout));
    std::memcpy(buffer.get() + offset, p, n);
  }
  internal::Publish(consumed_, size_, waiters_, internal::kWriterWaits);
  Frame f;
  f.data_ = buffer.get();
  f.size_ = size_;
  f.holder_ = std::shared_ptr<std::byte[]>(std::move(buffer));
  return f;
}

Frame Frame::Realigned(size_t alignment) const {
  if (AlignedFor(alignment)) return *this;
  return FromBytes(bytes());
}

// ---------------------------------------------------------------- Socket

StatusOr<std::unique_ptr<Socket>> Socket::Create(Context& context, SocketType type,
                                                 const SocketOptions& options) {
  if (context.raw() == nullptr) {
    return ResourceExhaustedError("ZeroMQ context could not be created (zmq_ctx_new failed)");
  }
  void* raw = zmq_socket(context.raw(), ToZmqType(type));
  if (raw == nullptr) return ZmqError(errno, "create socket");
  std::unique_ptr<Socket> socket(new Socket(raw, type));
  DV_RETURN_IF_ERROR(ApplyOptions(raw, type, options));
  // A ROUTER always understands the shared-memory handshake (to refuse it
  // when the option is off); a DEALER only takes part when asked to.
  if (type == SocketType::kRouter || (type == SocketType::kDealer && options.shared_memory))
    socket->shm_ = std::make_unique<internal::SocketShm>(type, options, &context.shared_memory());
  return socket;
}

Socket::Socket(void* socket, SocketType type) : socket_(socket), type_(type) {}

Socket::~Socket() {
  if (socket_ != nullptr) zmq_close(socket_);
}

Status Socket::SetLinger(std::chrono::milliseconds linger) {
  const int ms = static_cast<int>(std::max<int64_t>(linger.count(), -1));
  if (zmq_setsockopt(socket_, ZMQ_LINGER, &ms, sizeof(ms)) != 0)
    return ZmqError(errno, "ZMQ_LINGER");
  return OkStatus();
}

SharedMemoryStats Socket::shared_memory_stats() const {
  return shm_ ? shm_->stats() : SharedMemoryStats{};
}

StatusOr<std::string> Socket::Bind(const std::string& endpoint) {
  const std::string normalized = NormalizeBindEndpoint(endpoint);
  if (zmq_bind(socket_, normalized.c_str()) != 0) {
    return ZmqError(errno, "bind '" + endpoint + "'");
  }
  char buffer[1024];
  size_t length = sizeof(buffer);
  if (zmq_getsockopt(socket_, ZMQ_LAST_ENDPOINT, buffer, &length) != 0) {
    return ZmqError(errno, "ZMQ_LAST_ENDPOINT after binding '" + endpoint + "'");
  }
  // The option value is NUL-terminated and `length` counts the NUL.
  return std::string(buffer, strnlen(buffer, std::min(length, sizeof(buffer))));
}

Status Socket::Connect(const std::string& endpoint) {
  if (zmq_connect(socket_, endpoint.c_str()) != 0) {
    return ZmqError(errno, "connect '" + endpoint + "'");
  }
  if (shm_) {
    // Offer shared memory to a co-located peer; it answers before anything
    // we send later (ZeroMQ keeps the order), and until then plain frames go.
    if (std::optional<OutMessage> hello = shm_->Offer(endpoint))
      Send(std::move(*hello), std::chrono::milliseconds(0)).IgnoreError();
  }
  return OkStatus();
}

Status Socket::Disconnect(const std::string& endpoint) {
  if (zmq_disconnect(socket_, endpoint.c_str()) != 0) {
    return ZmqError(errno, "disconnect '" + endpoint + "'");
  }
  return OkStatus();
}

Status Socket::Send(OutMessage message, std::optional<std::chrono::milliseconds> timeout) {
  if (message.empty()) return InvalidArgumentError("send: message has no frames");
  for (size_t i = 0; i < message.size(); ++i) {
    if (message[i].data_ == nullptr && message[i].size_ != 0) {
      return InvalidArgumentError("send: frame " + std::to_string(i) + " has null data and size " +
                                  std::to_string(message[i].size_));
    }
  }
  internal::SocketShm::SendPlan plan;
  if (shm_) plan = shm_->PrepareSend(message);
  Status sent = SendFrames(message, timeout);
  if (shm_) {
    if (sent.ok()) {
      shm_->FinishCopies(plan);
    } else {
      shm_->AbandonSend(plan);
    }
  }
  return sent;
}

Status Socket::SendFrames(OutMessage& message, std::optional<std::chrono::milliseconds> timeout) {
  const Deadline deadline(timeout);
  // Frames are turned into zmq messages one at a time, right before they are
  // sent: a failure leaves the unsent Payloads (and their owners) in
  // `message`, released once when it goes out of scope.
  for (size_t i = 0; i < message.size(); ++i) {
    Payload& p = message[i];
    const bool last = i + 1 == message.size();
    MsgGuard msg;
    DV_RETURN_IF_ERROR(FillMessage(p.data_, p.size_, p.borrowed_, p.owner_, p.copy_, msg.get()));
    const int more = last ? 0 : ZMQ_SNDMORE;
    // Only the first frame can block: the high-water mark counts whole
    // messages, so once it is accepted ZeroMQ takes the rest at once.
    const bool first = i == 0;
    bool waited_ready = false;
    for (;;) {
      const int flags = more | (first && !deadline.infinite() ? ZMQ_DONTWAIT : 0);
      if (zmq_msg_send(msg.get(), socket_, flags) >= 0) break;
      const int err = errno;
      if (err == EINTR) continue;
      if (err == EHOSTUNREACH && first) {
        const std::span<const std::byte> peer(
            static_cast<const std::byte*>(zmq_msg_data(msg.get())), zmq_msg_size(msg.get()));
        return UnavailableError("send: no connected peer with routing id " + PeerName(peer) +
                                " (ROUTER_MANDATORY): " + ErrnoText(err));
      }
      if (err != EAGAIN || !first || deadline.infinite()) {
        return ZmqError(
            err, "send frame " + std::to_string(i) + " of " + std::to_string(message.size()));
      }
      if (deadline.Expired()) {
        return DeadlineExceededError("send: socket did not accept the message within " +
                                     std::to_string(timeout->count()) + " ms");
      }
      if (waited_ready) {
        // The socket polled writable but this message's pipe is full (ROUTER
        // to one slow peer): back off briefly instead of spinning.
        std::this_thread::sleep_for(std::chrono::milliseconds(
            std::min<long>(1, std::max<long>(deadline.RemainingMs(), 0))));
      }
      DV_ASSIGN_OR_RETURN(waited_ready, PollOne(socket_, ZMQ_POLLOUT, deadline, "send: poll"));
    }
    // ZeroMQ owns the message now; `msg` is empty and its close is a no-op.
  }
  return OkStatus();
}

StatusOr<InMessage> Socket::Receive(std::optional<std::chrono::milliseconds> timeout) {
  const Deadline deadline(timeout);
  if (shm_) shm_->Reclaim();
  for (;;) {
    DV_ASSIGN_OR_RETURN(InMessage frames, ReceiveOne(deadline, timeout));
    if (shm_) {
      std::optional<OutMessage> reply;
      if (shm_->Intercept(frames, &reply)) {
        // A shared-memory handshake message: answer it, then wait on for a
        // message for the caller.
        if (reply) Send(std::move(*reply), std::chrono::milliseconds(0)).IgnoreError();
        continue;
      }
      shm_->Resolve(frames);
    }
    return frames;
  }
}

StatusOr<InMessage> Socket::ReceiveOne(const Deadline& deadline,
                                       std::optional<std::chrono::milliseconds> timeout) {
  InMessage frames;
  for (;;) {
    auto holder = std::make_shared<ReceivedMessage>();
    const bool first = frames.empty();
    for (;;) {
      // Later frames of a message are already there (ZeroMQ delivers
      // messages atomically), so only the first can block.
      const int flags = first && !deadline.infinite() ? ZMQ_DONTWAIT : 0;
      if (zmq_msg_recv(&holder->msg, socket_, flags) >= 0) break;
      const int err = errno;
      if (err == EINTR) continue;
      if (err != EAGAIN || !first || deadline.infinite()) {
        return ZmqError(err, "receive frame " + std::to_string(frames.size()));
      }
      if (deadline.Expired()) {
        return DeadlineExceededError("receive: no message within " +
                                     std::to_string(timeout->count()) + " ms");
      }
      DV_ASSIGN_OR_RETURN(bool ready, PollOne(socket_, ZMQ_POLLIN, deadline, "receive: poll"));
      static_cast<void>(ready);  // Either way: try again, then check the deadline.
    }
    Frame frame;
    frame.size_ = zmq_msg_size(&holder->msg);
    frame.data_ =
        frame.size_ == 0 ? nullptr : static_cast<const std::byte*>(zmq_msg_data(&holder->msg));
    const bool more = zmq_msg_more(&holder->msg) != 0;
    frame.holder_ = std::move(holder);
    frames.push_back(std::move(frame));
    if (!more) return frames;
  }
}

// ---------------------------------------------------------------- polling

StatusOr<std::vector<size_t>> PollReadable(std::span<Socket* const> sockets,
                                           std::optional<std::chrono::milliseconds> timeout) {
  if (sockets.empty()) return InvalidArgumentError("PollReadable: no sockets given");
  std::vector<zmq_pollitem_t> items(sockets.size());
  for (size_t i = 0; i < sockets.size(); ++i) {
    if (sockets[i] == nullptr) {
      return InvalidArgumentError("PollReadable: socket " + std::to_string(i) + " is null");
    }
    items[i] = zmq_pollitem_t{sockets[i]->raw(), 0, ZMQ_POLLIN, 0};
  }
  const Deadline deadline(timeout);
  std::vector<size_t> ready;
  for (;;) {
    const int rc = zmq_poll(items.data(), static_cast<int>(items.size()), deadline.RemainingMs());
    if (rc < 0) {
      if (errno == EINTR) continue;
      return ZmqError(errno, "PollReadable");
    }
    for (size_t i = 0; i < items.size(); ++i) {
      if ((items[i].revents & ZMQ_POLLIN) != 0) ready.push_back(i);
    }
    if (!ready.empty() || deadline.Expired()) return ready;
  }
}

StatusOr<std::unique_ptr<Socket>> WatchConnections(Context& context, Socket& socket) {
  static std::atomic<uint64_t> next_id{0};
  const std::string endpoint =
      "inproc://distval-connection-monitor-" + std::to_string(next_id.fetch_add(1));
  if (zmq_socket_monitor(socket.raw(), endpoint.c_str(),
                         ZMQ_EVENT_HANDSHAKE_SUCCEEDED | ZMQ_EVENT_DISCONNECTED) != 0) {
    return InternalError("zmq_socket_monitor " + endpoint + ": " + zmq_strerror(errno));
  }
  DV_ASSIGN_OR_RETURN(auto monitor, Socket::Create(context, SocketType::kPair));
  DV_RETURN_IF_ERROR(monitor->Connect(endpoint));
  return monitor;
}

StatusOr<ConnectionEventInfo> ReadConnectionEvent(Socket& monitor) {
  DV_ASSIGN_OR_RETURN(InMessage event, monitor.Receive(std::chrono::milliseconds(0)));
  ConnectionEventInfo info;
  // Monitor events: [uint16 event, uint32 value] then the endpoint.
  if (event.size() != 2 || event[0].size() != 6) return info;
  uint16_t id = 0;
  std::memcpy(&id, event[0].data(), sizeof(id));
  if (id == ZMQ_EVENT_HANDSHAKE_SUCCEEDED) info.event = ConnectionEvent::kConnected;
  if (id == ZMQ_EVENT_DISCONNECTED) info.event = ConnectionEvent::kDisconnected;
  info.endpoint.assign(reinterpret_cast<const char*>(event[1].data()), event[1].size());
  return info;
}

}  // namespace distval::transport
