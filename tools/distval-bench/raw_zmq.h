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
Status RunRawEchoServer(const std::string& bind, const std::string& port_file);

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
