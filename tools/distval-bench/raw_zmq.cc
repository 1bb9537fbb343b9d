#include "raw_zmq.h"

#include <zmq.h>

#include <cerrno>
#include <cstdio>
#include <cstring>
#include <fstream>

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

}  // namespace

Status RunRawEchoServer(const std::string& bind, const std::string& port_file) {
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
    zmq_msg_t body;
    zmq_msg_init(&body);
    if (zmq_msg_more(&identity) && zmq_msg_recv(&body, socket, 0) >= 0) DrainMessage(socket, &body);
    zmq_msg_close(&body);
    // The reply: the peer's routing id, then one empty frame.
    if (zmq_msg_send(&identity, socket, ZMQ_SNDMORE) < 0) {
      zmq_msg_close(&identity);
      continue;
    }
    zmq_msg_t empty;
    zmq_msg_init(&empty);
    if (zmq_msg_send(&empty, socket, 0) < 0) zmq_msg_close(&empty);
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
