// Client: a worker's connection to every parameter-server shard.
//
// The client owns one DEALER socket per shard (ZeroMQ sockets are not
// thread-safe: one thread at a time drives them all). Any thread may call the
// client and gets a RequestHandle to Wait() on. A caller that finds the
// sockets free sends its request and, in Wait(), receives the reply itself,
// so a synchronous request costs no thread hand-off; a background thread
// takes over requests nobody waits for (after 0.5 ms) and sends the
// heartbeats. Requests to different shards are in flight at the same time.
//
//   DV_ASSIGN_OR_RETURN(auto client, Client::Connect(options));
//   DV_RETURN_IF_ERROR(client->CreateVariable("w", DType::kF32, {784, 10}, {}));
//   DV_RETURN_IF_ERROR(client->Pull({{"w", params}}).Wait());
//   ... compute grads ...
//   DV_RETURN_IF_ERROR(client->Push({{"w", grads}}).Wait());   // also advances the clock
//
// Data path: a pull copies each received frame once, straight into the
// caller's buffer (or hands out zero-copy views, PullViews). A push sends the
// caller's gradient buffer zero-copy: the buffer must stay unchanged until the
// push's Wait() returns (Wait also waits for ZeroMQ to release it).
//
// Clocks: the client's clock counts completed steps. Push(..., advance_clock
// = true) sends the gradient for the current clock to every shard and then
// advances the clock; AdvanceClock() does so without a gradient.
//
// Thread-safety: all methods are thread-safe. Pull/Push destinations and
// sources are borrowed until the returned handle's Wait() returns OK or
// fails; do not touch them before.
#ifndef DISTVAL_CLIENT_H_
#define DISTVAL_CLIENT_H_

#include <atomic>
#include <chrono>
#include <cstdint>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "distval/client_observer.h"
#include "distval/partitioner.h"
#include "distval/protocol.h"
#include "distval/status.h"
#include "distval/tensor.h"
#include "distval/transport.h"

namespace distval {

struct ClientOptions {
  // ZeroMQ endpoints of the shards; shard i is ps_endpoints[i].
  std::vector<std::string> ps_endpoints;
  // This worker's index and the number of workers in the job.
  int worker_index = 0;
  int num_workers = 1;
  // Worker (waited for by BSP/SSP, has a clock) or control client (tools).
  protocol::Role role = protocol::Role::kWorker;
  // Job staleness this worker expects; a shard configured differently
  // refuses the hello (-3: don't check).
  int32_t expected_staleness = protocol::kStalenessDontCheck;
  // How long Connect waits for every shard to answer its hello.
  std::chrono::milliseconds connect_timeout{30000};
  // Heartbeat period (keeps this worker in the live set).
  std::chrono::milliseconds heartbeat_interval{1000};
  // Default deadline of RequestHandle::Wait() when none is given.
  std::chrono::milliseconds request_timeout{120000};
  // Largest message accepted from a server (ZMQ_MAXMSGSIZE; -1 unlimited).
  int64_t max_message_bytes = -1;
  // Co-located servers (an ipc:// endpoint, or tcp:// to loopback or an
  // address of this host): offer POSIX shared memory, and once the server
  // has accepted, tensors move through it with ZeroMQ carrying only the
  // headers (a push is one copy into a shared buffer the server applies
  // from, or none from a buffer of AllocatePushBuffer; a pull one copy from
  // the server's parameters into the caller's buffer, or none with
  // PullViews). False: ZeroMQ frames only.
  bool shared_memory = true;
  // Pulls into a caller's buffer (Pull) of at least twice this many bytes
  // from one shard ask that shard for the values in pieces of this size,
  // each a message of its own, and copy each piece into the buffer as soon
  // as it is in, while the next ones are still arriving (the one copy then
  // overlaps the transfer instead of following it). 0: whole replies. Not
  // asked of co-located shards when shared_memory is on (no transfer to
  // overlap there) nor by PullViews (its views are the received frames).
  size_t pull_chunk_bytes = size_t{1} << 20;
  // Pushes to one shard whose only update is a dense gradient of at least
  // twice this many bytes send it in pieces of this size, each a message of
  // its own (Push::chunks, PushChunk), so that the server checks and applies
  // each piece while the next is still arriving (the push is acknowledged,
  // all or nothing, after the last). 0: whole. Rounded up to 64 KiB at
  // least. Not used toward co-located shards when shared_memory is on.
  size_t push_chunk_bytes = size_t{1} << 20;
  // A copy of at least 8 MiB into the caller's buffer (a Pull from a
  // co-located shard copies the server's parameters out of shared memory)
  // is split over this many threads: the caller and copy_threads - 1 helper
  // threads, started on the first such copy. They sleep otherwise. 1: the
  // caller alone.
  int copy_threads = 2;
  // Keep freed heap memory for reuse (distval/malloc_tuning.h: glibc's
  // M_MMAP_THRESHOLD 32 MiB, M_TRIM_THRESHOLD 64 MiB, process-wide, set once
  // by the first client that asks): every message ZeroMQ receives is a fresh
  // malloc, and with glibc's defaults a large one is often faulted in page
  // by page again (a 4 MiB pull in 1 MiB pieces measured 40-80 % slower).
  // False: leave the process's malloc settings alone.
  bool tune_malloc = true;
  // CURVE encryption and authentication (distval/curve_keys.h, Z85 text):
  // this client's key pair and the servers' public key (every shard uses
  // the same server key). All empty: plain ZeroMQ. With CURVE the
  // shared-memory path is not used, whatever shared_memory says. A server
  // that does not admit the key (or a plain server) never answers: Connect
  // fails with Unavailable after connect_timeout.
  std::string curve_public_key;
  std::string curve_secret_key;
  std::string curve_server_key;
  // Lost connections. A shard whose connection drops (its process died, or
  // its host or network went away: ZeroMQ heartbeats every
  // heartbeat_interval notice a silent one after connection_timeout) is
  // reconnected with capped exponential backoff (100 ms doubling up to
  // reconnect_backoff_max between attempts). Requests to it wait, and once
  // it answers a new hello they are resent with their original request ids
  // (a server acknowledges a push it already applied without applying it
  // again). When it is not back within retry_timeout they fail with
  // Unavailable naming the shard, and so do new requests to it until it is.
  // A shard that comes back as a new process restored from a checkpoint
  // behind this worker's clock fails every request in flight with Aborted,
  // and every new one until AcceptRollback() (see there); one that comes
  // back without its variables (restarted without --restore) fails them
  // with FailedPrecondition.
  std::chrono::milliseconds retry_timeout{60000};
  std::chrono::milliseconds reconnect_backoff_max{2000};
  std::chrono::milliseconds connection_timeout{10000};
  // Sees every request and reply (metrics, timelines); null: none.
  // Borrowed: must outlive the client. Called on the I/O thread.
  ClientObserver* observer = nullptr;
};

// Per-variable settings for CreateVariable.
struct VariableOptions {
  protocol::Initializer initializer = {0, protocol::InitGlorotUniform{}};
  protocol::OptimizerSpec optimizer;
  protocol::Aggregation aggregation = protocol::Aggregation::kMean;
  // Per-variable staleness override (kStalenessInherit: the job's).
  int32_t staleness = protocol::kStalenessInherit;
  // How the variable is split over shards (default: never split).
  Partitioner partitioner = Partitioner::None();
  // Initial values for InitValues (the whole variable, row-major); when set,
  // it overrides `initializer`. Borrowed for the duration of the call.
  std::span<const float> initial_values;
};

// What the client knows of a variable: its spec and where its rows live.
struct VariableInfo {
  protocol::VariableSpec spec;
  Shape shape;
  VariablePlacement placement;
  int64_t num_elements() const { return shape.num_elements(); }
};

// Completion of an asynchronous request (one or several shards).
class RequestHandle {
 public:
  RequestHandle() = default;  // an empty handle: Wait() returns OK
  // Blocks until every shard answered (and, for pushes, ZeroMQ released the
  // borrowed buffers) or `timeout` passed (nullopt: the client's
  // request_timeout). Returns the first error: the server's Status (with the
  // shard named), Unavailable when a shard could not be reached,
  // DeadlineExceeded naming the shards still outstanding. Calling Wait again
  // returns the same result.
  Status Wait(std::optional<std::chrono::milliseconds> timeout = std::nullopt);
  // True once Wait would not block.
  bool Done() const;

  struct State;  // implementation detail
  explicit RequestHandle(std::shared_ptr<State> state) : state_(std::move(state)) {}

 private:
  std::shared_ptr<State> state_;
};

// A pulled slice, zero-copy: the bytes stay valid while the view lives.
struct PulledSlice {
  int64_t row_begin = 0;  // global rows held by this slice
  int64_t row_end = 0;
  std::span<const float> values;      // (row_end - row_begin) * row_elements values
  std::shared_ptr<const void> owner;  // keeps the received frame alive
};
struct PulledVariable {
  std::string name;
  std::vector<PulledSlice> slices;  // sorted by row_begin, covering all rows
  uint64_t version = 0;             // smallest version among the slices
  // Copies the whole variable into `out` (num_elements values).
  Status CopyTo(std::span<float> out) const;
};

// A destination for Pull: the whole variable lands in `out`.
struct PullTarget {
  std::string variable;
  std::span<float> out;
};
// A source for Push: the gradient of the whole variable.
struct PushSource {
  std::string variable;
  std::span<const float> grad;
};

// Memory for values to push, from Client::AllocatePushBuffer.
struct PushBuffer {
  std::span<float> values;            // 64-byte aligned, zero-filled
  std::shared_ptr<const void> owner;  // keeps the memory alive (copies share it)
  bool shared_memory = false;         // in shared memory: lent to co-located servers
                                      // that accepted it, without a copy
};

// Statistics of what this client saw (for summaries and metrics).
struct ClientStats {
  int64_t pulls = 0;
  int64_t pushes = 0;
  int64_t bytes_pulled = 0;
  int64_t bytes_pushed = 0;
  // Staleness observed by pulls: this worker's clock minus the smallest live
  // clock the shard reported.
  int64_t staleness_sum = 0;
  int64_t staleness_max = 0;
  int64_t staleness_samples = 0;
  // Co-located servers: how many accepted shared memory, and the tensor
  // bytes that moved through it (both directions) instead of ZeroMQ.
  int shared_memory_shards = 0;
  int64_t shared_memory_bytes = 0;
  // Of the tensors sent, those lent without a copy (AllocatePushBuffer).
  int64_t shared_memory_frames_lent = 0;
  // Lost connections that came back (a hello answered again), and restarts
  // of a shard from a checkpoint behind this worker's clock.
  int64_t reconnects = 0;
  int64_t rollbacks = 0;
};

class Client {
 public:
  // Connects to every shard and says hello; fails with Unavailable naming the
  // shards that did not answer within connect_timeout, or FailedPrecondition
  // when a shard's settings (number of shards, staleness, protocol version)
  // differ from ours (both values in the message). Starts the I/O thread.
  static StatusOr<std::unique_ptr<Client>> Connect(const ClientOptions& options);
  // Stops the I/O thread; outstanding handles complete with Cancelled.
  ~Client();
  Client(const Client&) = delete;
  Client& operator=(const Client&) = delete;

  // Creates the variable on the shards that hold its rows (placement from the
  // partitioner, computed locally: every worker that creates the same
  // variables in the same order gets the same map). Idempotent across
  // workers; a different spec under the same name is AlreadyExists.
  Status CreateVariable(const std::string& name, DType dtype, const Shape& shape,
                        const VariableOptions& options);
  // NotFound if this client has not created (or looked up) the variable.
  StatusOr<const VariableInfo*> Find(const std::string& name) const;
  std::vector<std::string> VariableNames() const;

  // Dense pull of whole variables into caller buffers (one copy each, from
  // the received frame). InvalidArgument (immediately, in the handle) when a
  // buffer's size differs from the variable's element count; NotFound for
  // an unknown variable.
  RequestHandle Pull(std::vector<PullTarget> targets);
  // Zero-copy pull: `*out` is filled when the handle completes OK.
  RequestHandle PullViews(std::vector<std::string> variables,
                          std::shared_ptr<std::vector<PulledVariable>> out);
  // Dense push of whole-variable gradients, sent zero-copy; with
  // advance_clock, every shard also advances this worker's clock (shards
  // holding none of the variables get an empty push).
  RequestHandle Push(std::vector<PushSource> sources, bool advance_clock = true);
  // Memory for `num_floats` values to push (gradients) that co-located
  // servers read where it is. When this client may use shared memory and
  // some shard is co-located, the buffer is a POSIX shared-memory segment
  // this client registered: a push of values inside it sends a reference
  // instead of copying them, the server applies from it (or copies what a
  // BSP clock keeps), gives it back, then acknowledges, so Wait() returns
  // once the server is done with it (write the buffer again only after
  // that, as for any push). Otherwise (no co-located shard, shared memory
  // off, /dev/shm full) ordinary heap memory, and pushes copy as usual.
  // InvalidArgument for num_floats < 1.
  StatusOr<PushBuffer> AllocatePushBuffer(int64_t num_floats);
  // Pull / push of a contiguous row range [rows.begin, rows.end) of one
  // variable (values: rows.size() x row_elements).
  RequestHandle PullRange(const std::string& variable, protocol::RowRange rows,
                          std::span<float> out);
  RequestHandle PushRange(const std::string& variable, protocol::RowRange rows,
                          std::span<const float> grad);
  // Sparse pull / push of rows (embeddings); `indices` are global row
  // numbers; values are indices.size() x row_elements. The indices are
  // copied; `out` / `grad` are borrowed until Wait returns.
  RequestHandle PullRows(const std::string& variable, std::span<const int64_t> indices,
                         std::span<float> out);
  RequestHandle PushRows(const std::string& variable, std::span<const int64_t> indices,
                         std::span<const float> grad);

  // Advances this worker's clock on every shard without a gradient.
  Status AdvanceClock();
  // Steps this worker has completed.
  int64_t clock() const { return clock_.load(); }
  // Sets the clock (used when a worker rejoins: Connect sets it to the
  // clock the shards report).
  void set_clock(int64_t clock) { clock_.store(clock); }
  // After an Aborted request (a shard restarted from a checkpoint whose
  // clock is behind this worker's): sets the clock to the checkpoint's and
  // returns it. The gradients of the steps after it are lost; the caller
  // redoes them from there, pulling first (in BSP every worker rolls back to
  // the same clock, so with the data order a function of the step, the run
  // ends where an uninterrupted one would). Requests fail with Aborted until
  // this is called. Without a pending rollback, returns clock().
  int64_t AcceptRollback();

  // Waits until every live worker reached the same named barrier.
  Status Barrier(const std::string& name);
  // Control requests, sent to every shard.
  Status SetStaleness(int32_t staleness, const std::string& variable = "",
                      bool stale_aware_lr = false, int64_t at_clock = -1);
  // Sets the learning rate of `variable` (empty: every variable) on the
  // shards that hold it (found from its placement, or from the shards'
  // stats when this client has not created it). NotFound when no shard
  // holds it; a shard's error otherwise.
  Status SetLearningRate(double learning_rate, const std::string& variable = "");
  StatusOr<std::vector<protocol::StatsReply>> Stats();
  // Asks every shard to write its part of a checkpoint now, under
  // `directory` (empty: each server's --checkpoint-dir); returns each
  // shard's reply (the checkpoint directory and the clock it holds), by
  // shard. FailedPrecondition when a shard has no directory; the server's
  // error (naming the path) when a write fails.
  StatusOr<std::vector<protocol::CheckpointReply>> Checkpoint(const std::string& directory = "");
  // Stops every shard; with checkpoint_first, each writes a checkpoint first
  // (when it has a --checkpoint-dir) and refuses to stop if that fails.
  Status ShutdownServers(bool checkpoint_first = false);

  int num_shards() const;
  const ClientOptions& options() const { return options_; }
  ClientStats stats() const;
  // Smallest live clock reported by the last replies (min over shards).
  int64_t last_min_clock() const;

  class Impl;

 private:
  explicit Client(const ClientOptions& options);
  ClientOptions options_;
  std::atomic<int64_t> clock_{0};
  std::unique_ptr<Impl> impl_;
};

}  // namespace distval

#endif  // DISTVAL_CLIENT_H_
