// ZapAuthenticator: the ZeroMQ Authentication Protocol (ZAP, RFC 27) handler
// of one transport::Context, admitting CURVE clients by public key.
//
// ZeroMQ asks the handler bound at inproc://zeromq.zap.01 of a socket's
// context whenever a peer completes a CURVE handshake with a CURVE server
// socket (SocketOptions::curve_server). This handler answers 200 for the
// public keys it was given and 400 for every other key or mechanism, so a
// refused peer's connection is closed before any message of it reaches the
// application. Refusals are logged (warning) with the key's Z85 text and
// the peer's address, at most once per key every 10 seconds (a refused
// client keeps reconnecting), with the number refused since.
//
// Start it before binding the CURVE socket: a CURVE server whose context
// has no ZAP handler accepts every client that knows its public key.
//
// Thread-safety: the handler runs on its own thread; the counters may be
// read from any thread. Destroy it before the Context (it stops and joins
// its thread); Context::Shutdown also ends the thread.
#ifndef DISTVAL_ZAP_AUTHENTICATOR_H_
#define DISTVAL_ZAP_AUTHENTICATOR_H_

#include <atomic>
#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "distval/status.h"
#include "distval/transport.h"

namespace distval {

class ZapAuthenticator {
 public:
  // Binds inproc://zeromq.zap.01 on `context` (borrowed: must outlive the
  // authenticator) and starts answering. `authorized_public_keys`: Z85
  // (40 characters each). InvalidArgument for an empty list or a malformed
  // key; Unavailable when the context already has a ZAP handler; the
  // transport's errors otherwise.
  static StatusOr<std::unique_ptr<ZapAuthenticator>> Start(
      transport::Context& context, std::vector<std::string> authorized_public_keys);
  ~ZapAuthenticator();
  ZapAuthenticator(const ZapAuthenticator&) = delete;
  ZapAuthenticator& operator=(const ZapAuthenticator&) = delete;

  // Also logs (warning, at most once every 10 seconds per reason, with the
  // number since) the handshakes that fail on `socket` before any ZAP
  // request: clients without CURVE (mechanism mismatch) and malformed
  // handshakes. `socket` is borrowed and must be a CURVE server socket of
  // this authenticator's context that outlives it; call once, from the
  // thread that owns `socket`. Errors: the transport's (monitor setup).
  Status WatchHandshakeFailures(transport::Socket& socket);

  // Handshakes answered 200 / 400 so far.
  int64_t accepted() const { return accepted_.load(std::memory_order_relaxed); }
  int64_t refused() const { return refused_.load(std::memory_order_relaxed); }

 private:
  ZapAuthenticator(transport::Context* context, std::unique_ptr<transport::Socket> socket,
                   std::vector<std::string> keys);
  void Loop();

  std::unique_ptr<transport::Socket> socket_;  // used by thread_ only
  transport::Context* context_;                // borrowed
  std::mutex mu_;
  // Handed to thread_ by WatchHandshakeFailures. Guarded by mu_.
  std::unique_ptr<transport::Socket> pending_monitor_;
  const std::vector<std::string> keys_;  // sorted Z85
  std::atomic<bool> stop_{false};
  std::atomic<int64_t> accepted_{0};
  std::atomic<int64_t> refused_{0};
  std::thread thread_;
};

}  // namespace distval

#endif  // DISTVAL_ZAP_AUTHENTICATOR_H_
