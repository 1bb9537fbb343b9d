#include "raw_zmq.h"

#include <zmq.h>

#include <algorithm>
#include <cerrno>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <span>
#include <vector>

#include "distval/encoding.h"

namespace distval::bench {
namespace {

Status ZmqFailure(const std::string& what) {
  const int err = errno;
  if (err == EAGAIN) return DeadlineExceededError(what + ": timed out");
  return InternalError(what + ": " + zmq_strerror(err));
}

// Receives and drops every remaining frame of the current message.
void DrainMessage(void* socket, zmq_msg_t* msg) {
  while (zmq_msg_more(msg)) {
    zmq_msg_close(msg);
    zmq_msg_init(msg);
    if (zmq_msg_recv(msg, socket, 0) < 0) break;
  }
}

// The work distval-ps does with each piece of a plain SGD push: count the
// non-finite values (before the reply, which carries the verdict), and
// compute the new values out of place (all or nothing: they replace the
// parameters only once every piece came finite), with the same check
// (protocol::CountNonFinite). `g` is n floats as received: ZeroMQ may hand
// small messages at any address, hence memcpy.
__attribute__((noinline)) void SgdOutOfPlace(float* __restrict out, const float* __restrict w,
                                             const std::byte* __restrict g, size_t n) {
  constexpr float kLearningRate = 1e-6f;
  for (size_t i = 0; i < n; ++i) {
    float gi;
    std::memcpy(&gi, g + i * sizeof(gi), sizeof(gi));
    out[i] = w[i] - kLearningRate * gi;
  }
}

struct PieceHeader {
  uint64_t offset;
  uint64_t total;
};

}  // namespace

Status RunRawEchoServer(const std::string& bind, const std::string& port_file, bool push_work) {
  // With push_work: the parameters and the buffer of the next values, one
  // float per 4 bytes of the largest request so far (grown, never shrunk, so
  // no sample pays for allocation).
  std::vector<float> params, next;
  size_t non_finite = 0;
  void* ctx = zmq_ctx_new();
  if (ctx == nullptr) return ZmqFailure("zmq_ctx_new");
  void* socket = zmq_socket(ctx, ZMQ_ROUTER);
  if (socket == nullptr) return ZmqFailure("zmq_socket");
  const int linger = 0;
  zmq_setsockopt(socket, ZMQ_LINGER, &linger, sizeof(linger));
  if (zmq_bind(socket, bind.c_str()) != 0) return ZmqFailure("bind " + bind);
  char endpoint[256];
  size_t length = sizeof(endpoint);
  if (zmq_getsockopt(socket, ZMQ_LAST_ENDPOINT, endpoint, &length) != 0)
    return ZmqFailure("ZMQ_LAST_ENDPOINT");
  {
    const std::string tmp = port_file + ".tmp";
    std::ofstream f(tmp);
    f << endpoint << "\n";
    if (!f) return InternalError("cannot write " + tmp);
    f.close();
    if (std::rename(tmp.c_str(), port_file.c_str()) != 0)
      return InternalError("cannot rename " + tmp + " to " + port_file);
  }
  for (;;) {
    zmq_msg_t identity;
    zmq_msg_init(&identity);
    if (zmq_msg_recv(&identity, socket, 0) < 0) {
      zmq_msg_close(&identity);
      if (errno == EINTR) continue;
      return ZmqFailure("receive");
    }
    // Frames after the routing id: the bytes, or a piece header (offset and
    // total, RoundTripInPieces) and the bytes.
    zmq_msg_t first, second;
    zmq_msg_init(&first);
    zmq_msg_init(&second);
    bool piece = false;
    if (zmq_msg_more(&identity) && zmq_msg_recv(&first, socket, 0) >= 0 && zmq_msg_more(&first) &&
        zmq_msg_recv(&second, socket, 0) >= 0) {
      piece = zmq_msg_size(&first) == sizeof(PieceHeader);
      if (zmq_msg_more(&second)) {
        zmq_msg_t rest;
        zmq_msg_init(&rest);
        if (zmq_msg_recv(&rest, socket, 0) >= 0) DrainMessage(socket, &rest);
        zmq_msg_close(&rest);
      }
    }
    zmq_msg_t* data = piece ? &second : &first;
    PieceHeader header{0, zmq_msg_size(data)};
    if (piece) std::memcpy(&header, zmq_msg_data(&first), sizeof(header));
    const size_t size = zmq_msg_size(data);
    const bool complete = header.offset + size >= header.total;
    const bool apply =
        push_work && header.offset <= header.total && size <= header.total - header.offset;
    const auto* g = static_cast<const std::byte*>(zmq_msg_data(data));
    if (apply)
      non_finite += protocol::CountNonFinite(std::span(g, size - size % sizeof(float)),
                                             protocol::Encoding::kRaw);
    // The reply (the peer's routing id, then one empty frame) once all of
    // a request is in.
    if (!complete) {
      zmq_msg_close(&identity);
    } else if (zmq_msg_send(&identity, socket, ZMQ_SNDMORE) < 0) {
      zmq_msg_close(&identity);
    } else {
      zmq_msg_t empty;
      zmq_msg_init(&empty);
      if (zmq_msg_send(&empty, socket, 0) < 0) zmq_msg_close(&empty);
    }
    if (apply) {
      // As each piece arrives; the last (or only) one after the reply: the
      // verdict is known, and the apply need not delay it.
      if (params.size() < header.total / sizeof(float)) {
        params.resize(header.total / sizeof(float));
        next.resize(params.size());
      }
      const size_t at = header.offset / sizeof(float);
      SgdOutOfPlace(next.data() + at, params.data() + at, g, size / sizeof(float));
      if (complete) {
        if (non_finite == 0) params.swap(next);
        non_finite = 0;
      }
    }
    zmq_msg_close(&first);
    zmq_msg_close(&second);
  }
}

StatusOr<std::unique_ptr<RawClient>> RawClient::Connect(const std::vector<std::string>& endpoints) {
  std::unique_ptr<RawClient> client(new RawClient());
  client->context_ = zmq_ctx_new();
  if (client->context_ == nullptr) return ZmqFailure("zmq_ctx_new");
  for (const std::string& endpoint : endpoints) {
    void* socket = zmq_socket(client->context_, ZMQ_DEALER);
    if (socket == nullptr) return ZmqFailure("zmq_socket");
    client->sockets_.push_back(socket);
    const int linger = 0, timeout_ms = 10000;
    zmq_setsockopt(socket, ZMQ_LINGER, &linger, sizeof(linger));
    zmq_setsockopt(socket, ZMQ_RCVTIMEO, &timeout_ms, sizeof(timeout_ms));
    if (zmq_connect(socket, endpoint.c_str()) != 0) return ZmqFailure("connect " + endpoint);
  }
  return client;
}

RawClient::~RawClient() {
  for (void* s : sockets_) zmq_close(s);
  if (context_ != nullptr) zmq_ctx_term(context_);
}

Status RawClient::Send(void* socket, const void* data, size_t bytes) {
  zmq_msg_t msg;
  // Zero-copy: ZeroMQ reads the caller's bytes in place. No free function:
  // the caller keeps them until the reply shows they have arrived.
  if (zmq_msg_init_data(&msg, const_cast<void*>(data), bytes, nullptr, nullptr) != 0)
    return ZmqFailure("zmq_msg_init_data");
  if (zmq_msg_send(&msg, socket, 0) < 0) {
    zmq_msg_close(&msg);
    return ZmqFailure("send");
  }
  return OkStatus();
}

Status RawClient::ReceiveReply(void* socket) {
  zmq_msg_t msg;
  zmq_msg_init(&msg);
  if (zmq_msg_recv(&msg, socket, 0) < 0) {
    zmq_msg_close(&msg);
    return ZmqFailure("receive reply");
  }
  DrainMessage(socket, &msg);
  zmq_msg_close(&msg);
  return OkStatus();
}

Status RawClient::RoundTrip(const void* data, size_t bytes) {
  for (void* s : sockets_) DV_RETURN_IF_ERROR(Send(s, data, bytes));
  for (void* s : sockets_) DV_RETURN_IF_ERROR(ReceiveReply(s));
  return OkStatus();
}

Status RawClient::RoundTripInPieces(const void* data, size_t bytes, size_t piece_bytes) {
  if (bytes == 0 || piece_bytes == 0) return InvalidArgumentError("pieces of no bytes");
  void* s = sockets_.at(0);
  const auto* p = static_cast<const std::byte*>(data);
  for (size_t offset = 0; offset < bytes; offset += piece_bytes) {
    const PieceHeader header{offset, bytes};
    zmq_msg_t head;
    zmq_msg_init_size(&head, sizeof(header));
    std::memcpy(zmq_msg_data(&head), &header, sizeof(header));
    if (zmq_msg_send(&head, s, ZMQ_SNDMORE) < 0) {
      zmq_msg_close(&head);
      return ZmqFailure("send");
    }
    DV_RETURN_IF_ERROR(Send(s, p + offset, std::min(piece_bytes, bytes - offset)));
  }
  return ReceiveReply(s);
}

Status RawClient::Pipelined(const void* data, size_t bytes, int count, int window) {
  void* s = sockets_.at(0);
  int sent = 0, received = 0;
  while (sent < count && sent < window) {
    DV_RETURN_IF_ERROR(Send(s, data, bytes));
    ++sent;
  }
  while (received < count) {
    DV_RETURN_IF_ERROR(ReceiveReply(s));
    ++received;
    if (sent < count) {
      DV_RETURN_IF_ERROR(Send(s, data, bytes));
      ++sent;
    }
  }
  return OkStatus();
}

}  // namespace distval::bench
