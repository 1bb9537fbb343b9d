// PollReadableWithFds: zmq_poll over sockets and plain file descriptors.
#include <zmq.h>

#include <cerrno>
#include <cstring>

#include "distval/transport.h"

namespace distval::transport {

StatusOr<std::vector<size_t>> PollReadableWithFds(
    std::span<Socket* const> sockets, std::span<const int> fds,
    std::optional<std::chrono::milliseconds> timeout) {
  std::vector<zmq_pollitem_t> items;
  items.reserve(sockets.size() + fds.size());
  for (Socket* s : sockets) items.push_back(zmq_pollitem_t{s->raw(), 0, ZMQ_POLLIN, 0});
  for (int fd : fds) items.push_back(zmq_pollitem_t{nullptr, fd, ZMQ_POLLIN, 0});
  long ms = timeout ? static_cast<long>(timeout->count()) : -1L;
  int rc = zmq_poll(items.data(), static_cast<int>(items.size()), ms);
  if (rc < 0) {
    if (errno == EINTR) return std::vector<size_t>{};
    if (errno == ETERM) return CancelledError("poll: context terminated");
    return InternalError(std::string("zmq_poll: ") + zmq_strerror(errno));
  }
  std::vector<size_t> ready;
  for (size_t i = 0; i < items.size(); ++i)
    if (items[i].revents & ZMQ_POLLIN) ready.push_back(i);
  return ready;
}

}  // namespace distval::transport
