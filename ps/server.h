// Server: one parameter-server shard. Owns the ROUTER socket, the variable
// store and the consistency controller, and runs the request loop.
//
//   ps request: recv frames -> decode (shared/protocol) -> handler
//               -> store / optimizer / consistency -> reply
//
// Threading: Run() is the dispatcher thread; it owns the socket, the store
// and the controller, so handlers need no locks. Stop() may be called from
// any thread (e.g. a signal-watching thread).
#ifndef DISTVAL_PS_SERVER_H_
#define DISTVAL_PS_SERVER_H_

#include <chrono>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "distval/protocol.h"
#include "distval/status.h"

namespace distval::ps {

class ServerTelemetry;

// What a push whose gradient holds NaN or +-Inf values gets.
enum class NanPolicy {
  // The whole push is refused with InvalidArgument naming the variables;
  // nothing of it is applied (nor its clock advanced).
  kReject,
  // The poisoned variables' updates are dropped (in BSP the worker does not
  // count as a contributor of that variable for that clock); the rest applies.
  kSkip,
  // Applied as they are (no check, no cost).
  kAllow,
};

struct ServerOptions {
  // ZeroMQ endpoint to bind ("tcp://127.0.0.1:0": OS-chosen port).
  std::string bind = "tcp://127.0.0.1:0";
  int shard_index = 0;
  int num_shards = 1;
  // Workers the job expects (BSP/SSP wait for the live ones).
  int num_workers = 1;
  // -1 async, 0 BSP, s > 0 SSP.
  int32_t staleness = 0;
  // Async: scale the learning rate by 1 / (1 + measured staleness).
  bool stale_aware_lr = false;
  // A worker silent this long is dropped from the live set.
  std::chrono::milliseconds worker_timeout{10000};
  // A pull held longer than this is answered with DeadlineExceeded.
  std::chrono::milliseconds pull_deadline{600000};
  // Threads that apply optimizer updates (1: the dispatcher alone).
  int threads = 1;
  // Largest accepted message (ZMQ_MAXMSGSIZE); -1: unlimited.
  int64_t max_message_bytes = int64_t{4} << 30;
  // Most payload frames in one request; a longer one is answered with
  // InvalidArgument before it is decoded.
  int max_frames = 4096;
  // Most variables this shard creates (ResourceExhausted beyond), and most
  // updates or reads in one push or pull (InvalidArgument beyond).
  int max_variables = 100000;
  // Largest variable shard (its parameters, without optimizer slots) a
  // CreateVariable may ask for, in bytes; a larger one is refused with
  // ResourceExhausted before anything is allocated. 0: no limit.
  int64_t max_variable_bytes = 0;
  // Co-located workers: accept their shared-memory offer (transport::
  // SocketOptions::shared_memory) and keep parameter buffers of at least
  // shared_memory_min_bytes in shared memory, so that a pull is one copy
  // straight from them into the worker's buffer. Off: ZeroMQ frames only.
  bool shared_memory = true;
  size_t shared_memory_min_bytes = 64 * 1024;
  // CURVE encryption and authentication: this server's secret key (Z85,
  // distval/curve_keys.h) and the public keys of the clients it admits (a
  // ZapAuthenticator on the server's context refuses all others, and logs
  // it). Empty secret: plain ZeroMQ, anyone who can reach `bind` may
  // connect. CURVE turns shared_memory off (the tensor bytes would bypass
  // the authenticated connection). Create() fails with InvalidArgument for a
  // secret without keys or a malformed key.
  std::string curve_secret_key;
  std::vector<std::string> curve_authorized_keys;
  // Metrics and timeline hooks (ps/server_telemetry.h); null: none.
  // Borrowed: must outlive the server. Called on the dispatcher thread.
  ServerTelemetry* telemetry = nullptr;

  // Gradients with NaN / Inf. A checked gradient is acknowledged only once
  // all of it has arrived and been checked. A co-located worker's gradient
  // for a plain SGD variable applied at once (async / SSP) is checked piece
  // by piece as it streams in and applied out of place, all or nothing;
  // other co-located gradients are read in completely, checked, then
  // applied.
  NanPolicy nan_policy = NanPolicy::kReject;

  // ---- Checkpoints (see checkpoint.h for the format).
  // Root directory of this job's checkpoints; empty: none written
  // periodically (a Checkpoint request may still name one).
  std::string checkpoint_dir;
  // Write one every this many clocks (0: never) ...
  int64_t checkpoint_every_clocks = 0;
  // ... or every this many seconds, at the next loop turn (0: never).
  double checkpoint_every_seconds = 0;
  // Keep the newest K checkpoints of this shard (0: keep all).
  int keep_checkpoints = 0;
  // Restore before serving: a checkpoint directory, or "latest" (the newest
  // complete one under checkpoint_dir). Empty: start empty. Create() fails
  // (naming the file and field) when it cannot be verified and loaded.
  std::string restore;
};

// "reject", "skip", "allow"; InvalidArgument otherwise.
StatusOr<NanPolicy> ParseNanPolicy(const std::string& text);

// "10" -> every 10 clocks, "30s" -> every 30 seconds. InvalidArgument
// otherwise (zero or negative included).
Status ParseCheckpointEvery(const std::string& text, ServerOptions* options);

class Server {
 public:
  // Validates the options and binds. InvalidArgument for bad options,
  // Unavailable when the endpoint cannot be bound.
  static StatusOr<std::unique_ptr<Server>> Create(const ServerOptions& options);
  ~Server();
  Server(const Server&) = delete;
  Server& operator=(const Server&) = delete;

  // The endpoint actually bound (with the OS-chosen port).
  const std::string& endpoint() const;
  // Serves until a shutdown request or Stop(). Returns OK on a clean stop.
  Status Run();
  // Makes Run() return soon. Thread-safe, async-signal-unsafe.
  void Stop();

  class Impl;

 private:
  explicit Server(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

// "0" -> 0 (BSP), "3" -> 3 (SSP), "async" -> -1. InvalidArgument otherwise.
StatusOr<int32_t> ParseStaleness(const std::string& text);
// Inverse: "bsp", "ssp:3", "async".
std::string StalenessName(int32_t staleness);

}  // namespace distval::ps

#endif  // DISTVAL_PS_SERVER_H_
