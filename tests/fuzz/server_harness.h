// ServerHarness: real parameter servers (ps::Server, each on its own thread,
// bound to an OS-chosen loopback port) that the server_request fuzz target
// and its corpus generator send whole requests to, exactly as a worker would.
//
// Every server starts in the same state: BSP, one expected worker (worker 0,
// registered with a hello), and the variables of HarnessVariables() (dense,
// a partition of a larger variable, an embedding for sparse pushes, a
// scalar, and one with an async per-variable override), with every optimizer
// kind. Two servers run side by side, one with --nan-policy reject and one
// with skip, and every request goes to both. Their metrics hooks
// (ps/server_telemetry.h) are on.
//
// Send() sends one request (frame 0 and payload frames, as given: nothing is
// validated first) from a DEALER, then, on the same connection, a pull of
// every harness variable and a Stats request, to both servers at once, and
// waits for their replies;
// the server handles one connection's messages in order, so the Stats reply
// proves that the request was fully handled and the server still serves.
// Every kFullCheckEvery requests every variable the server holds is pulled
// as well, and after a create request the harness asks for a checkpoint
// (what a server accepts, it must be able to checkpoint). It aborts (with a
// message on stderr) when
//  - no reply comes within kReplyTimeout, or the server stops for a request
//    that is not a shutdown;
//  - a parameter holds NaN or Inf, unless a request since the server started
//    made that possible with finite values (a learning rate above 1e3, a
//    gradient or initial value above 1e15 in magnitude, AdamW decay with
//    lr * decay > 1): then the server is restarted instead. Values that do
//    not fit a float at all do not count: the server must refuse them;
//  - the reject server acknowledges a push whose gradient holds NaN or Inf.
// A shutdown request does stop a server: it is restarted. A checkpoint
// request naming a directory is rewritten to name one under the harness's
// temporary directory (where the servers' --checkpoint-dir also points; in
// /dev/shm when it exists, so that checkpoints cost no disk syncs).
// Servers are restarted every kRestartEvery requests, which bounds what
// requests accumulate (e.g. BSP contributions of a clock that never ends).
//
// Thread-safety: none; one thread calls Send().
#ifndef DISTVAL_TESTS_FUZZ_SERVER_HARNESS_H_
#define DISTVAL_TESTS_FUZZ_SERVER_HARNESS_H_

#include <atomic>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <set>
#include <span>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "distval/protocol.h"
#include "distval/status.h"
#include "distval/transport.h"
#include "server.h"

namespace distval::fuzz {

// The variables every harness server is created with (rows: the part this
// shard holds), in creation order.
std::vector<protocol::CreateVariable> HarnessVariables();

// The number of workers the harness servers expect, and their shards.
inline constexpr int kHarnessWorkers = 1;
inline constexpr int kHarnessShards = 1;

// A request as it goes on the wire: frame 0 and the payload frames.
struct WireRequest {
  std::vector<std::byte> header;
  std::vector<std::vector<std::byte>> payloads;
};

// Encodes `request` with these payload frames.
WireRequest ToWire(const protocol::Request& request,
                   std::vector<std::vector<std::byte>> payloads = {});

// What one server answered to the request itself: its first reply with the
// request's id (0 for a request that does not decode) that arrived before
// the harness's checks were answered; none for held pulls and barriers.
struct SentReply {
  bool answered = false;
  protocol::Reply reply;
};

class ServerHarness {
 public:
  static constexpr std::chrono::seconds kReplyTimeout{10};
  static constexpr uint64_t kRestartEvery = 20000;
  static constexpr uint64_t kFullCheckEvery = 8;

  // Starts both servers. Errors: whatever starting a server, creating the
  // variables or the hello returned.
  static StatusOr<std::unique_ptr<ServerHarness>> Create();
  ~ServerHarness();
  ServerHarness(const ServerHarness&) = delete;
  ServerHarness& operator=(const ServerHarness&) = delete;

  // Sends `request` to every server and checks them (see above; aborts on a
  // failed check). Returns each server's reply to it (reject server first).
  std::vector<SentReply> Send(const WireRequest& request);

  // Counters, for the corpus generator and for logs.
  uint64_t requests() const { return requests_; }
  uint64_t restarts() const { return restarts_; }

 private:
  class Instance;
  ServerHarness() = default;

  std::string root_;  // temporary directory (checkpoints)
  std::vector<std::unique_ptr<Instance>> instances_;
  bool unsafe_ = false;  // finite values that can overflow were sent
  // (worker, request id) of pushes acknowledged since the servers started:
  // a retried id is acknowledged again without being applied.
  std::set<std::pair<int32_t, uint64_t>> acked_pushes_;
  uint64_t requests_ = 0;
  uint64_t restarts_ = 0;
};

}  // namespace distval::fuzz

#endif  // DISTVAL_TESTS_FUZZ_SERVER_HARNESS_H_
