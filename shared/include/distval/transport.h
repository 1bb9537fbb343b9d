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
// ZeroMQ exceptions stop here: every call returns Status.
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
#include <vector>

#include "distval/status.h"

namespace distval::transport {

// Owns the ZeroMQ context (I/O threads). Create one per process in main() or
// per component; sockets borrow it and must be closed before it is destroyed.
class Context {
 public:
  explicit Context(int io_threads = 1);
  ~Context();
  Context(const Context&) = delete;
  Context& operator=(const Context&) = delete;

  // Borrowed pointer to the underlying zmq context (void*), for Socket.
  void* raw() const { return ctx_; }

 private:
  void* ctx_;
};

// An outgoing frame.
class Payload {
 public:
  // Copies `bytes` (for headers and small frames).
  static Payload Copy(std::span<const std::byte> bytes);
  static Payload Copy(std::vector<std::byte> bytes);  // takes the vector, no copy
  // Zero-copy: ZeroMQ reads `data` directly; `owner` keeps it alive and is
  // released exactly once when ZeroMQ no longer needs the bytes (possibly on
  // a ZeroMQ I/O thread). `owner` may be null when the caller guarantees the
  // bytes outlive the send (e.g. static data).
  static Payload Borrow(const void* data, size_t size, std::shared_ptr<const void> owner);

  size_t size() const { return size_; }
  const std::byte* data() const { return data_; }

  Payload(Payload&&) noexcept = default;
  Payload& operator=(Payload&&) noexcept = default;

 private:
  Payload() = default;
  friend class Socket;
  const std::byte* data_ = nullptr;
  size_t size_ = 0;
  std::shared_ptr<const void> owner_;  // null for Copy-less static borrows
  std::vector<std::byte> copy_;        // used by Copy
  bool borrowed_ = false;
};

// An incoming frame: a read-only view that keeps the received message alive.
// Copies share the same bytes.
class Frame {
 public:
  Frame() = default;
  const std::byte* data() const { return data_; }
  size_t size() const { return size_; }
  std::span<const std::byte> bytes() const { return {data_, size_}; }
  // The bytes as an array of T. Precondition: size() % sizeof(T) == 0 and the
  // data is suitably aligned (ZeroMQ frames larger than 33 bytes are
  // heap-allocated and 16-byte aligned or better). Returns nullptr for an
  // empty frame.
  template <typename T>
  const T* as() const {
    return reinterpret_cast<const T*>(data_);
  }
  // Keeps the underlying message alive while shared (e.g. behind a tensor
  // view handed to user code).
  std::shared_ptr<const void> owner() const { return holder_; }

 private:
  friend class Socket;
  std::shared_ptr<const void> holder_;
  const std::byte* data_ = nullptr;
  size_t size_ = 0;
};

using OutMessage = std::vector<Payload>;
using InMessage = std::vector<Frame>;

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
};

class Socket {
 public:
  // InvalidArgument / Internal when ZeroMQ refuses the options.
  static StatusOr<std::unique_ptr<Socket>> Create(Context& context, SocketType type,
                                                  const SocketOptions& options = {});
  ~Socket();
  Socket(const Socket&) = delete;
  Socket& operator=(const Socket&) = delete;

  // Binds and returns the endpoint actually bound (a "tcp://host:0" endpoint
  // comes back with the port the OS chose). InvalidArgument for a malformed
  // endpoint, Unavailable when the address is in use or not local.
  StatusOr<std::string> Bind(const std::string& endpoint);
  // Connects (asynchronously: success does not mean the peer is up).
  Status Connect(const std::string& endpoint);
  Status Disconnect(const std::string& endpoint);

  // Sends all frames as one message. Waits at most `timeout` for the socket
  // to accept it (nullopt: block). DeadlineExceeded when it did not;
  // Unavailable for an unroutable ROUTER peer (with router_mandatory).
  Status Send(OutMessage message,
              std::optional<std::chrono::milliseconds> timeout = std::nullopt);
  // Receives one whole message. DeadlineExceeded after `timeout` (nullopt:
  // block; zero: poll once).
  StatusOr<InMessage> Receive(std::optional<std::chrono::milliseconds> timeout = std::nullopt);

  // Borrowed zmq socket handle (void*), for zmq_poll with other sockets.
  void* raw() const { return socket_; }

 private:
  explicit Socket(void* socket) : socket_(socket) {}
  void* socket_;
};

// Waits until one of `sockets` is readable or `timeout` passes (nullopt:
// forever). Returns the indices of the readable ones (possibly empty).
StatusOr<std::vector<size_t>> PollReadable(std::span<Socket* const> sockets,
                                           std::optional<std::chrono::milliseconds> timeout);

// Like PollReadable, and also watches plain file descriptors (e.g. an
// eventfd used to wake an I/O thread). Returned indices number the sockets
// first (0 .. sockets.size()-1), then the fds.
StatusOr<std::vector<size_t>> PollReadableWithFds(
    std::span<Socket* const> sockets, std::span<const int> fds,
    std::optional<std::chrono::milliseconds> timeout);

}  // namespace distval::transport

#endif  // DISTVAL_TRANSPORT_H_
