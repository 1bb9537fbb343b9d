// Transport: multipart ZeroMQ messaging with zero-copy payloads.
//
// A message is a list of frames. Outgoing frames are Payloads: small ones
// (headers) are copied into ZeroMQ; large ones are handed to ZeroMQ without a
// copy (zmq_msg_init_data) together with an owner that is released, exactly
// once, by ZeroMQ's free callback when the bytes have left. Incoming frames
// are Frames: a view over the received zmq message that keeps it alive, so a
// tensor can be read in place (e.g. through an Eigen::Map) for as long as the
// Frame (or a copy of it) exists.
//
// ZeroMQ errors stop here: every call returns Status (the libzmq C API is
// used underneath, so no zmq::error_t can escape). errno mapping: EAGAIN on a
// timed send/receive -> DeadlineExceeded; EHOSTUNREACH (ROUTER_MANDATORY) ->
// Unavailable naming the peer; EINVAL / EPROTONOSUPPORT / ENOCOMPATPROTO on
// bind/connect -> InvalidArgument naming the endpoint; EADDRINUSE /
// EADDRNOTAVAIL / ENODEV -> Unavailable; ETERM (context shut down) ->
// Cancelled; ENOENT on disconnect -> NotFound; EMFILE / ENOMEM ->
// ResourceExhausted; EFSM -> FailedPrecondition; anything else -> Internal.
//
// Thread-safety: a Context is thread-safe. A Socket is NOT: exactly one thread
// may use it at a time (DESIGN.md: one I/O thread owns each socket). Frames
// and Payloads may move between threads freely.
#ifndef DISTVAL_TRANSPORT_H_
#define DISTVAL_TRANSPORT_H_

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <utility>
#include <vector>

#include "distval/shared_memory.h"
#include "distval/status.h"

namespace distval::transport {

namespace internal {
class SocketShm;
class Deadline;
}  // namespace internal

// Owns the ZeroMQ context (I/O threads). Create one per process in main() or
// per component; sockets borrow it and must be closed before it is destroyed.
//
// The context is created with ZMQ_BLOCKY off (sockets default to linger 0)
// and with ZMQ_ZERO_COPY_RECV off, so that every frame received over tcp gets
// its own allocation (8-byte aligned) instead of pointing at an arbitrary
// byte offset inside a shared 8 KiB decoder buffer; see Frame::AlignedFor.
// Frames larger than that buffer are read straight into their allocation in
// both modes, so large tensors are still received without a copy.
class Context {
 public:
  // `io_threads`: ZeroMQ I/O threads (ZMQ_IO_THREADS); 0 is valid for an
  // inproc-only context, negative values are treated as 1. If ZeroMQ cannot
  // create the context (fd or memory exhaustion) raw() is null and
  // Socket::Create fails with ResourceExhausted.
  explicit Context(int io_threads = 1);
  // zmq_ctx_term. Every Socket created from this context must already be
  // destroyed: ZeroMQ blocks here until they are closed (call Shutdown()
  // first to wake threads that are blocked in them).
  ~Context();
  Context(const Context&) = delete;
  Context& operator=(const Context&) = delete;

  // Makes every blocking call (Send, Receive, PollReadable) on this
  // context's sockets, current and future, return Cancelled, and makes
  // Socket::Create fail with Cancelled. The sockets must still be destroyed
  // by their owning threads before ~Context. Idempotent; thread-safe.
  void Shutdown();

  // Borrowed pointer to the underlying zmq context (void*), for Socket.
  void* raw() const { return ctx_; }

  // The shared-memory segments of this process that this context's sockets
  // may lend to co-located peers without copying (see SocketOptions::
  // shared_memory). Register a segment here and a Payload::Borrow of bytes
  // inside it travels as a reference. Thread-safe.
  SharedMemoryRegistry& shared_memory() const { return *shared_memory_; }

 private:
  void* ctx_;
  std::shared_ptr<SharedMemoryRegistry> shared_memory_;
};

// An outgoing frame. Movable, not copyable; may move between threads.
class Payload {
 public:
  // Copies `bytes` (for headers and small frames).
  static Payload Copy(std::span<const std::byte> bytes);
  // Takes the vector, no copy. When sent, small vectors (<= 1 KiB) are copied
  // into the ZeroMQ message; larger ones are handed to ZeroMQ as they are.
  static Payload Copy(std::vector<std::byte> bytes);
  // Zero-copy: ZeroMQ reads `data` directly (zmq_msg_init_data); `owner`
  // keeps it alive and is released exactly once when ZeroMQ no longer needs
  // the bytes: once its I/O thread has copied them into its write batch or
  // written them to the kernel (tcp), after the receiver dropped the last
  // Frame over them (inproc: the receiver sees the very same bytes), or when
  // the send failed or the message was dropped.
  // The release can run on any thread, including a ZeroMQ I/O thread, so
  // the owner's deleter must be thread-safe and must not block. The bytes
  // must not be modified until then. `owner` may be null when the caller
  // guarantees the bytes outlive the send (e.g. static data). Send fails with
  // InvalidArgument when `data` is null and `size` is not 0.
  static Payload Borrow(const void* data, size_t size, std::shared_ptr<const void> owner);

  size_t size() const { return size_; }
  const std::byte* data() const { return data_; }
  // Another payload over the same bytes, to send the frame again: a Borrow
  // shares the owner (released once both are done), a Copy is copied.
  Payload Duplicate() const;
  // Bytes [offset, offset + size) of this payload as a payload of their own
  // (a Borrow shares the owner, a Copy is copied), e.g. to send a large
  // frame in pieces. Precondition: offset + size <= this->size().
  Payload Slice(size_t offset, size_t size) const;

  Payload(Payload&&) noexcept = default;
  Payload& operator=(Payload&&) noexcept = default;

 private:
  Payload() = default;
  friend class Socket;
  friend class internal::SocketShm;
  const std::byte* data_ = nullptr;
  size_t size_ = 0;
  std::shared_ptr<const void> owner_;  // null for Copy-less static borrows
  std::vector<std::byte> copy_;        // used by Copy
  bool borrowed_ = false;
};

// An incoming frame: a read-only view that keeps the received message alive.
// Copies share the same bytes (no copy of the payload on receive or on copy).
// Thread-safety: a Frame is immutable; copies may be used and destroyed on
// different threads.
class Frame {
 public:
  Frame() = default;
  // An in-memory frame holding a copy of `bytes` in 64-byte aligned storage
  // (for tests, fakes and in-process loopback).
  static Frame FromBytes(std::span<const std::byte> bytes);
  // A frame over `size` bytes at `data`, kept alive by `owner` (no copy):
  // e.g. a buffer a receiver assembled from several messages.
  static Frame Adopt(std::shared_ptr<const void> owner, const std::byte* data, size_t size);

  // Null for an empty frame.
  const std::byte* data() const { return data_; }
  size_t size() const { return size_; }
  std::span<const std::byte> bytes() const { return {data_, size_}; }

  // True when data() is a multiple of `alignment` (a power of two); true for
  // an empty frame. What libzmq 4.3 delivers (measured, see transport.cc):
  //  - tcp/ipc, with this Context (ZMQ_ZERO_COPY_RECV off): every frame is
  //    8-byte aligned (frames <= 33 bytes sit inside the zmq_msg_t, larger
  //    ones after a 40-byte header in a malloc block), i.e. 8 mod 16: never
  //    assume 16 or more.
  //  - with ZMQ_ZERO_COPY_RECV on (libzmq's default, not used here) frames
  //    that fit in the 8 KiB read batch point into it at arbitrary offsets.
  //  - inproc: a Payload::Borrow frame arrives at the sender's address (its
  //    alignment); a Payload::Copy one is 8-byte aligned or better.
  bool AlignedFor(size_t alignment) const {
    return (reinterpret_cast<uintptr_t>(data_) & (alignment - 1)) == 0;
  }
  // *this when AlignedFor(alignment), otherwise a FromBytes copy (64-byte
  // aligned). Precondition: alignment is a power of two <= 64.
  Frame Realigned(size_t alignment) const;

  // The bytes as an array of T, read in place. Preconditions:
  // size() % sizeof(T) == 0 and AlignedFor(alignof(T)). Received frames are
  // 8-byte aligned (see AlignedFor), which covers float/double/int64, but
  // check AlignedFor (or use Realigned / memcpy) before relying on it, and
  // never build an Eigen::Map with Aligned16 or stricter over a received
  // frame (the default Unaligned map is fine). Returns nullptr for an empty
  // frame.
  template <typename T>
  const T* as() const {
    return reinterpret_cast<const T*>(data_);
  }
  // Keeps the underlying message alive while shared (e.g. behind a tensor
  // view handed to user code).
  std::shared_ptr<const void> owner() const { return holder_; }

  // A frame a co-located sender is still writing (shared memory, received on
  // a socket with SocketOptions::shared_memory_early_receive): its bytes
  // arrive in order, front to back. False for every other frame, which is
  // complete when received.
  bool streaming() const { return progress_ != nullptr; }
  // A frame over a co-located sender's own memory (shared memory it
  // registered, sent without a copy; not a copy into its pool or ring): the
  // sender gets the memory back only when every copy of this Frame is gone,
  // and whoever waits for that request to finish waits for that too. A
  // server copies what it must keep and drops such frames before it
  // answers the request.
  bool lent() const { return lent_; }
  // A streaming frame whose bytes pass through a small ring (so that they
  // stay in cache): data() is null, and the bytes can only be read once, in
  // order, through Window() (or all at once through Materialized()).
  bool ring() const { return ring_ != nullptr; }
  // Waits until the first `bytes` bytes (capped at size()) are there;
  // returns at once for a frame that is not streaming. DeadlineExceeded
  // after `timeout`, Unavailable when the sender's process is gone (the rest
  // will never come). For a ring frame this only says the bytes were
  // written; read them with Window().
  Status WaitReady(size_t bytes,
                   std::chrono::milliseconds timeout = std::chrono::milliseconds(60000)) const;
  // Bytes [offset, offset + length) once they are there: data() + offset
  // for an ordinary or contiguous streaming frame; for a ring frame a view
  // into the ring, valid until the next Window call, and only for windows
  // that move forward and do not cross a multiple of window_limit() (asking
  // for `offset` gives the ring the bytes before it back). Errors: those of
  // WaitReady; OutOfRange for a window outside the frame, FailedPrecondition
  // for a ring window that goes back or crosses window_limit().
  StatusOr<const std::byte*> Window(
      size_t offset, size_t length,
      std::chrono::milliseconds timeout = std::chrono::milliseconds(60000)) const;
  // The largest window a ring frame gives at once (windows must not cross
  // its multiples); size() for other frames.
  size_t window_limit() const { return ring_ != nullptr ? ring_slot_ : size_; }
  // A complete frame with the same bytes: *this for a frame that is not
  // streaming or once WaitReady(size()) returned; a ring frame is read
  // through (once) into new 64-byte aligned storage. Errors: those of
  // WaitReady.
  StatusOr<Frame> Materialized(
      std::chrono::milliseconds timeout = std::chrono::milliseconds(60000)) const;

 private:
  friend class Socket;
  friend class internal::SocketShm;
  std::shared_ptr<const void> holder_;
  const std::byte* data_ = nullptr;
  size_t size_ = 0;
  // Streaming frames: bytes written so far (in the sender's shared memory,
  // kept mapped by holder_) and the sender's pid. Ring frames: the ring, its
  // size and window size, and where the reader reports what it consumed.
  const uint64_t* progress_ = nullptr;
  uint32_t* waiters_ = nullptr;  // who sleeps on the counters (see socket_shm.h)
  int stream_pid_ = 0;
  const std::byte* ring_ = nullptr;
  size_t ring_bytes_ = 0;
  size_t ring_slot_ = 0;
  uint64_t* consumed_ = nullptr;
  bool lent_ = false;
};

using OutMessage = std::vector<Payload>;
using InMessage = std::vector<Frame>;

// Builds an OutMessage from Payloads (a braced initializer list cannot hold
// the move-only Payload):
//   socket.Send(MakeMessage(Payload::Copy(header), Payload::Borrow(p, n, owner)));
template <typename... Payloads>
OutMessage MakeMessage(Payloads&&... payloads) {
  OutMessage message;
  message.reserve(sizeof...(payloads));
  (message.push_back(std::forward<Payloads>(payloads)), ...);
  return message;
}

enum class SocketType { kRouter, kDealer, kPair, kPush, kPull, kReq, kRep };

struct SocketOptions {
  // ZMQ_MAXMSGSIZE: largest inbound message accepted (-1: unlimited). Peers
  // that exceed it are disconnected by ZeroMQ.
  int64_t max_message_bytes = -1;
  // ZMQ_SNDHWM / ZMQ_RCVHWM (messages); 0 means unlimited.
  int send_hwm = 0;
  int recv_hwm = 0;
  // ZMQ_LINGER on close, milliseconds.
  int linger_ms = 0;
  // ZMQ_ROUTING_ID for DEALER sockets (empty: ZeroMQ picks one).
  std::string routing_id;
  // ZMQ_ROUTER_MANDATORY for ROUTER sockets: sending to an unknown peer fails
  // with Unavailable instead of being dropped silently.
  bool router_mandatory = false;
  // TCP keepalive, so that a silently dead peer is noticed by the OS.
  bool tcp_keepalive = true;
  // Reconnection of connect()ed endpoints after a refused or lost connection
  // (ZMQ_RECONNECT_IVL / ZMQ_RECONNECT_IVL_MAX, milliseconds): the first
  // retry after reconnect_ivl_ms, each next one after twice the previous
  // wait, capped at reconnect_ivl_max_ms (0: no backoff, always
  // reconnect_ivl_ms).
  int reconnect_ivl_ms = 100;
  int reconnect_ivl_max_ms = 0;
  // ZMTP heartbeats (ZMQ_HEARTBEAT_IVL / ZMQ_HEARTBEAT_TIMEOUT, milliseconds;
  // 0: off): a PING every heartbeat_ivl_ms, answered by the peer's ZeroMQ
  // I/O thread (not by its application thread); a connection with no
  // traffic for heartbeat_timeout_ms is closed, which a connection monitor
  // (WatchConnections) reports as kDisconnected. Catches a peer whose host
  // died or whose network vanished without a TCP reset.
  int heartbeat_ivl_ms = 0;
  int heartbeat_timeout_ms = 0;
  // Co-located peers: tensor bytes through POSIX shared memory, ZeroMQ
  // carrying only the small frames and a reference. DEALER: on Connect to a
  // local endpoint (IsLocalEndpoint) the socket offers it to the peer; it is
  // used once the peer has proved, through a shared-memory handshake, that
  // it runs on this host and accepts. ROUTER: accept such offers (refused
  // when false). Frames of at least shared_memory_min_bytes then travel as a
  // reference: bytes inside a segment registered with the Context without a
  // copy, others copied once into a pooled segment. The receiver sees
  // ordinary Frames (page aligned) that view the sender's memory; the sender
  // gets the memory back when the receiver drops its last Frame over it.
  // Both sides must run as the same user. Off: plain ZeroMQ frames only.
  bool shared_memory = false;
  size_t shared_memory_min_bytes = 64 * 1024;
  // Copies into pooled segments stop (frames go through ZeroMQ) once the
  // pool holds this many bytes lent to peers.
  size_t shared_memory_pool_bytes = size_t{1} << 30;
  // A sender copying into a pooled segment sends the message first and then
  // copies, publishing its progress, so that the receiver can work on the
  // front of a large frame while the back is still being copied. By default
  // Receive waits until such frames are complete. With early receive it
  // returns at once, and the caller must call Frame::WaitReady before
  // reading the bytes of any frame (Frame::streaming() tells which may not
  // be complete yet).
  bool shared_memory_early_receive = false;

  // CURVE encryption and authentication (ZMQ_CURVE_*); keys are 40-character
  // Z85 text (distval/curve_keys.h). All empty: no CURVE (ZeroMQ's NULL
  // mechanism, plain text, anyone may connect).
  // Server (curve_server): curve_secret_key is this server's secret key;
  // clients are admitted by the ZAP handler of the Context (see
  // distval/zap_authenticator.h), asked with zap_domain.
  // Client (curve_server_key set): curve_public_key/curve_secret_key are its
  // own pair, curve_server_key the server's public key.
  // CURVE and shared_memory exclude each other (the tensor bytes would
  // bypass the encrypted, authenticated connection): Create fails with
  // InvalidArgument when both are set.
  bool curve_server = false;
  std::string curve_public_key;
  std::string curve_secret_key;
  std::string curve_server_key;
  std::string zap_domain;
};

// What went through shared memory on one socket (for tests and benchmarks).
struct SharedMemoryStats {
  bool active = false;      // DEALER: the peer accepted; ROUTER: some peer did
  int64_t frames_sent = 0;  // frames sent as a reference
  int64_t bytes_sent = 0;
  int64_t frames_lent = 0;      // of those, lent without a copy (registered memory)
  int64_t frames_received = 0;  // frames received as a reference
  int64_t bytes_received = 0;
};

// True for endpoints that can only reach this host: ipc://, inproc://, and
// tcp:// to a loopback address, "localhost" or an address of one of this
// host's interfaces.
bool IsLocalEndpoint(const std::string& endpoint);

// A ZeroMQ socket. Not thread-safe: one thread at a time (normally the I/O
// thread that created it). Destroying it closes it (pending outgoing messages
// are kept for linger_ms, then dropped).
//
// ROUTER sockets: Receive returns the peer's routing id as frame 0, followed
// by the frames the peer sent (a DEALER peer sends no empty delimiter frame).
// To reply, Send a message whose frame 0 is that routing id
// (Payload::Copy(frame.bytes())). DEALER sockets see no routing id frame.
class Socket {
 public:
  // Creates a socket with `options` applied. InvalidArgument when an option
  // is out of range or does not apply to `type` (router_mandatory on a
  // non-ROUTER socket, a routing_id longer than 255 bytes, a CURVE key that
  // is not 40-character Z85, a CURVE setting that is incomplete or combined
  // with shared_memory), Unimplemented when libzmq lacks CURVE, Cancelled after
  // Context::Shutdown, ResourceExhausted when out of sockets/fds, Internal
  // for anything else ZeroMQ refuses.
  static StatusOr<std::unique_ptr<Socket>> Create(Context& context, SocketType type,
                                                  const SocketOptions& options = {});
  ~Socket();
  Socket(const Socket&) = delete;
  Socket& operator=(const Socket&) = delete;

  // Binds and returns the endpoint actually bound (ZMQ_LAST_ENDPOINT): a
  // "tcp://host:0" or "tcp://host:*" endpoint comes back with the port the
  // OS chose (":0" is rewritten to ZeroMQ's wildcard ":*" before binding).
  // InvalidArgument for a malformed endpoint or unknown transport,
  // Unavailable when the address is in use or not local.
  StatusOr<std::string> Bind(const std::string& endpoint);
  // Connects (asynchronously: success does not mean the peer is up; messages
  // queue until it is). InvalidArgument for a malformed endpoint.
  Status Connect(const std::string& endpoint);
  // NotFound when `endpoint` is not connected (use the string given to
  // Connect).
  Status Disconnect(const std::string& endpoint);

  // Sends all frames as one message (ZMQ_SNDMORE on all but the last).
  // Waits at most `timeout` for the socket to accept the first frame
  // (nullopt: block; zero: try once); ZeroMQ then accepts the rest of the
  // message at once. DeadlineExceeded when it did not (e.g. HWM reached, or a
  // DEALER with no connection); Unavailable naming the peer for an
  // unroutable ROUTER peer (with router_mandatory); InvalidArgument for an
  // empty message or a null non-empty Payload (nothing is sent then).
  // Whatever happens, every Borrow owner in `message` is released exactly
  // once (immediately for frames that were not handed to ZeroMQ).
  Status Send(OutMessage message, std::optional<std::chrono::milliseconds> timeout = std::nullopt);
  // Receives one whole message (all its frames). DeadlineExceeded after
  // `timeout` (nullopt: block; zero: poll once); Cancelled after
  // Context::Shutdown.
  StatusOr<InMessage> Receive(std::optional<std::chrono::milliseconds> timeout = std::nullopt);

  // Borrowed zmq socket handle (void*), for zmq_poll with other sockets.
  void* raw() const { return socket_; }

  // Shared-memory counters (all zero when SocketOptions::shared_memory is
  // off).
  SharedMemoryStats shared_memory_stats() const;

  // ZMQ_LINGER from now on: how long closing the socket (and terminating
  // its Context) waits for queued outgoing messages; -1 forever, 0 drop
  // them. E.g. a server that answers a shutdown request and then exits.
  Status SetLinger(std::chrono::milliseconds linger);

 private:
  Socket(void* socket, SocketType type);
  // Sends the frames of `message` (after the shared-memory layer's changes).
  Status SendFrames(OutMessage& message, std::optional<std::chrono::milliseconds> timeout);
  // One whole message, before the shared-memory layer looks at it.
  StatusOr<InMessage> ReceiveOne(const internal::Deadline& deadline,
                                 std::optional<std::chrono::milliseconds> timeout);
  void* socket_;
  SocketType type_;
  std::unique_ptr<internal::SocketShm> shm_;  // null unless shared_memory is on
};

// Connection events of a socket, from a ZeroMQ socket monitor.
enum class ConnectionEvent {
  kConnected,     // a connection to a peer is up (ZMTP handshake done)
  kDisconnected,  // a connection closed (peer gone, reset, heartbeat timeout)
  kOther,
};
struct ConnectionEventInfo {
  ConnectionEvent event = ConnectionEvent::kOther;
  std::string endpoint;
};

// Starts a monitor of `socket`'s connections and returns the PAIR socket on
// which its events arrive (poll it with the others, then ReadConnectionEvent).
// Destroy the monitor socket before `socket`. Internal when ZeroMQ refuses
// the monitor.
StatusOr<std::unique_ptr<Socket>> WatchConnections(Context& context, Socket& socket);
// The next event waiting on a WatchConnections socket, without blocking;
// DeadlineExceeded when there is none.
StatusOr<ConnectionEventInfo> ReadConnectionEvent(Socket& monitor);

// Waits until one of `sockets` is readable (a whole message can be received
// without blocking) or `timeout` passes (nullopt: forever; zero: check once).
// Returns the indices of the readable ones, ascending (empty after the
// timeout). InvalidArgument for an empty list or a null socket; Cancelled
// after Context::Shutdown. The sockets must all be owned by the calling
// thread.
StatusOr<std::vector<size_t>> PollReadable(std::span<Socket* const> sockets,
                                           std::optional<std::chrono::milliseconds> timeout);

// Like PollReadable, and also watches plain file descriptors (e.g. an
// eventfd used to wake an I/O thread). Returned indices number the sockets
// first (0 .. sockets.size()-1), then the fds.
StatusOr<std::vector<size_t>> PollReadableWithFds(std::span<Socket* const> sockets,
                                                  std::span<const int> fds,
                                                  std::optional<std::chrono::milliseconds> timeout);

}  // namespace distval::transport

#endif  // DISTVAL_TRANSPORT_H_
