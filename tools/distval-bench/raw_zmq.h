// The transport limit: plain libzmq (C API, library defaults), no distval
// code on the path. A ROUTER echo server answers every message with an empty
// frame; a DEALER client sends S bytes zero-copy (zmq_msg_init_data) and
// waits for the reply. This is what distval's push and pull are measured
// against (tools/bench, issue 6).
#ifndef DISTVAL_TOOLS_BENCH_RAW_ZMQ_H_
#define DISTVAL_TOOLS_BENCH_RAW_ZMQ_H_

#include <cstddef>
#include <memory>
#include <string>
#include <vector>

#include "distval/status.h"

namespace distval::bench {

// Serves on `bind` (e.g. "tcp://127.0.0.1:*") until the process is
// terminated: every request (any number of frames) gets one empty frame back.
// Writes the bound endpoint and a newline to `port_file` (atomically: a
// temporary file renamed). Returns only on a setup error (with its status).
// A request may also come in pieces (RawClient::RoundTripInPieces): the
// reply then follows the last piece.
// `push_work`: also do with every request (or piece, as it comes) the work
// distval-ps does with a plain SGD push: count its non-finite values and
// compute the new parameters out of place, swapped in once all of a request
// came finite; after the reply where there is one. For the reference "raw
// ZeroMQ + the server's work": the same work without distval's protocol.
Status RunRawEchoServer(const std::string& bind, const std::string& port_file,
                        bool push_work = false);

// A DEALER socket per echo server, in its own ZeroMQ context (one I/O thread).
// Not thread-safe: one thread uses a RawClient.
class RawClient {
 public:
  // Connects to every endpoint (asynchronously; the first round trip waits
  // for the connections). Internal on a ZeroMQ error.
  static StatusOr<std::unique_ptr<RawClient>> Connect(const std::vector<std::string>& endpoints);
  ~RawClient();
  RawClient(const RawClient&) = delete;
  RawClient& operator=(const RawClient&) = delete;

  // Sends `bytes` bytes from `data` to every server at once (zero-copy: the
  // bytes are read by ZeroMQ in place; they must stay unchanged until this
  // returns), then waits for every reply. DeadlineExceeded after 10 s without
  // a reply.
  Status RoundTrip(const void* data, size_t bytes);
  // Sends `bytes` bytes to server 0 as messages of `piece_bytes` (the last
  // may be shorter), each a header frame and the bytes, then waits for the
  // one reply the server sends once the last piece is in. For the apply
  // server (push_work), which applies each piece as it comes.
  Status RoundTripInPieces(const void* data, size_t bytes, size_t piece_bytes);
  // Sends `count` requests of `bytes` bytes to server 0, keeping `window` of
  // them in flight, and waits for every reply.
  Status Pipelined(const void* data, size_t bytes, int count, int window);

 private:
  RawClient() = default;
  Status Send(void* socket, const void* data, size_t bytes);
  Status ReceiveReply(void* socket);

  void* context_ = nullptr;
  std::vector<void*> sockets_;
};

}  // namespace distval::bench

#endif  // DISTVAL_TOOLS_BENCH_RAW_ZMQ_H_
