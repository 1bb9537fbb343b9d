// HttpEndpoint: a small HTTP/1.1 server (Boost.Asio + Boost.Beast) on its
// own thread, for the metrics and health endpoints of distval-ps and
// distval-worker:
//
//   GET /metrics   the registry's Prometheus text (MetricRegistry::Render)
//   GET /healthz   200 "ok" while `health` returns "", else 503 and the text
//   anything else  404; methods other than GET and HEAD: 405
//
//   HttpEndpointOptions o;
//   o.port = 9100;
//   DV_ASSIGN_OR_RETURN(auto http, HttpEndpoint::Start(o, &registry, health));
//   ... http->port() ...   // stops when destroyed
//
// The endpoint thread only calls MetricRegistry::Render (which reads
// atomics) and the health function, so serving a scrape never touches the
// data path. Connections are kept alive when the client asks; a connection
// idle for 30 s is closed.
//
// Thread-safety: Start and the destructor from one thread; port() from any.
#ifndef DISTVAL_HTTP_ENDPOINT_H_
#define DISTVAL_HTTP_ENDPOINT_H_

#include <functional>
#include <memory>
#include <string>

#include "distval/metrics.h"
#include "distval/status.h"

namespace distval {

struct HttpEndpointOptions {
  // Address to listen on ("0.0.0.0": every IPv4 interface, "::" every
  // interface, "127.0.0.1": this machine only).
  std::string address = "0.0.0.0";
  // TCP port; 0 lets the OS choose (see HttpEndpoint::port()).
  int port = 0;
};

// Returns "" when healthy, else the reason (served with status 503). Called
// on the endpoint's thread: must be thread-safe and quick (read atomics).
using HealthFunction = std::function<std::string()>;

class HttpEndpoint {
 public:
  // Binds and starts serving on a new thread. `registry` is borrowed and
  // must outlive the endpoint; `health` may be empty (always healthy).
  // InvalidArgument for a bad address or port, Unavailable when the port
  // cannot be bound (the message names address and port).
  static StatusOr<std::unique_ptr<HttpEndpoint>> Start(const HttpEndpointOptions& options,
                                                       const MetricRegistry* registry,
                                                       HealthFunction health = {});
  // Stops accepting, closes connections and joins the thread.
  ~HttpEndpoint();
  HttpEndpoint(const HttpEndpoint&) = delete;
  HttpEndpoint& operator=(const HttpEndpoint&) = delete;

  // The port actually bound.
  int port() const;

  class Impl;

 private:
  explicit HttpEndpoint(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace distval

#endif  // DISTVAL_HTTP_ENDPOINT_H_
