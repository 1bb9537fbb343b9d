// <utility> before Boost.Asio: with g++ 12 in C++20 mode Asio's headers use
// std::exchange without including it.
#include <utility>
// clang-format off
#include "distval/http_endpoint.h"
// clang-format on

#include <boost/asio/ip/tcp.hpp>
#include <boost/asio/strand.hpp>
#include <boost/beast/core.hpp>
#include <boost/beast/http.hpp>
#include <chrono>
#include <thread>

#include "distval/logging.h"

namespace distval {

namespace net = boost::asio;
namespace beast = boost::beast;
namespace http = beast::http;
using tcp = net::ip::tcp;

namespace {

constexpr auto kIdleTimeout = std::chrono::seconds(30);
constexpr size_t kMaxRequestBytes = 64 * 1024;

struct Handlers {
  const MetricRegistry* registry;
  HealthFunction health;
};

http::response<http::string_body> Respond(const Handlers& h,
                                          const http::request<http::string_body>& req) {
  http::response<http::string_body> res;
  res.version(req.version());
  res.keep_alive(req.keep_alive());
  res.set(http::field::server, "distval");
  const bool head = req.method() == http::verb::head;
  std::string_view target(req.target().data(), req.target().size());
  const size_t q = target.find('?');
  if (q != std::string_view::npos) target = target.substr(0, q);
  std::string body;
  std::string_view type = "text/plain; charset=utf-8";
  if (req.method() != http::verb::get && !head) {
    res.result(http::status::method_not_allowed);
    res.set(http::field::allow, "GET, HEAD");
    body = "only GET and HEAD are served\n";
  } else if (target == "/metrics") {
    res.result(http::status::ok);
    body = h.registry->Render();
    type = MetricRegistry::kContentType;
  } else if (target == "/healthz") {
    std::string why = h.health ? h.health() : std::string();
    res.result(why.empty() ? http::status::ok : http::status::service_unavailable);
    body = why.empty() ? "ok\n" : why + "\n";
  } else {
    res.result(http::status::not_found);
    body = "not found: try /metrics or /healthz\n";
  }
  res.set(http::field::content_type, beast::string_view(type.data(), type.size()));
  res.body() = std::move(body);
  res.prepare_payload();
  if (head) res.body().clear();  // Content-Length stays that of the GET
  return res;
}

// One connection: read a request, answer, repeat while kept alive.
class Session : public std::enable_shared_from_this<Session> {
 public:
  Session(tcp::socket socket, const Handlers* handlers)
      : stream_(std::move(socket)), handlers_(handlers) {}

  void Start() {
    net::dispatch(stream_.get_executor(), [self = shared_from_this()] { self->Read(); });
  }

 private:
  void Read() {
    parser_.emplace();
    parser_->body_limit(kMaxRequestBytes);
    parser_->header_limit(static_cast<uint32_t>(kMaxRequestBytes));
    stream_.expires_after(kIdleTimeout);
    http::async_read(
        stream_, buffer_, *parser_,
        [self = shared_from_this()](beast::error_code ec, size_t) { self->OnRead(ec); });
  }

  void OnRead(beast::error_code ec) {
    if (ec) {
      Close();
      return;
    }
    response_ = Respond(*handlers_, parser_->get());
    http::async_write(stream_, response_,
                      [self = shared_from_this()](beast::error_code wec, size_t) {
                        if (wec || !self->response_.keep_alive()) {
                          self->Close();
                          return;
                        }
                        self->Read();
                      });
  }

  void Close() {
    beast::error_code ignored;
    stream_.socket().shutdown(tcp::socket::shutdown_send, ignored);
    stream_.close();
  }

  beast::tcp_stream stream_;
  const Handlers* handlers_;
  beast::flat_buffer buffer_;
  std::optional<http::request_parser<http::string_body>> parser_;
  http::response<http::string_body> response_;
};

}  // namespace

class HttpEndpoint::Impl {
 public:
  Impl(const MetricRegistry* registry, HealthFunction health)
      : handlers_{registry, std::move(health)}, acceptor_(io_) {}

  ~Impl() {
    io_.stop();
    if (thread_.joinable()) thread_.join();
  }

  Status Start(const HttpEndpointOptions& o) {
    if (o.port < 0 || o.port > 65535)
      return InvalidArgumentError("metrics port " + std::to_string(o.port) +
                                  " is outside [0, 65535]");
    beast::error_code ec;
    auto address = net::ip::make_address(o.address, ec);
    if (ec) return InvalidArgumentError("metrics address '" + o.address + "' is not an IP address");
    const tcp::endpoint ep(address, static_cast<uint16_t>(o.port));
    const std::string where = o.address + ":" + std::to_string(o.port);
    acceptor_.open(ep.protocol(), ec);
    if (!ec) acceptor_.set_option(net::socket_base::reuse_address(true), ec);
    if (!ec) acceptor_.bind(ep, ec);
    if (!ec) acceptor_.listen(net::socket_base::max_listen_connections, ec);
    if (ec) return UnavailableError("cannot listen for metrics on " + where + ": " + ec.message());
    port_ = acceptor_.local_endpoint().port();
    Accept();
    thread_ = std::thread([this] {
      for (;;) {
        try {
          io_.run();
          return;
        } catch (const std::exception& e) {
          // A handler threw (e.g. bad_alloc): keep serving.
          DV_LOG(kWarning) << "metrics endpoint: " << e.what();
        }
      }
    });
    return OkStatus();
  }

  int port() const { return port_; }

 private:
  void Accept() {
    acceptor_.async_accept(net::make_strand(io_), [this](beast::error_code ec, tcp::socket s) {
      if (ec == net::error::operation_aborted) return;
      if (!ec) std::make_shared<Session>(std::move(s), &handlers_)->Start();
      Accept();
    });
  }

  Handlers handlers_;
  net::io_context io_{1};
  tcp::acceptor acceptor_;
  int port_ = 0;
  std::thread thread_;
};

HttpEndpoint::HttpEndpoint(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
HttpEndpoint::~HttpEndpoint() = default;

StatusOr<std::unique_ptr<HttpEndpoint>> HttpEndpoint::Start(const HttpEndpointOptions& options,
                                                            const MetricRegistry* registry,
                                                            HealthFunction health) {
  if (registry == nullptr) return InvalidArgumentError("HttpEndpoint: no metric registry");
  auto impl = std::make_unique<Impl>(registry, std::move(health));
  DV_RETURN_IF_ERROR(impl->Start(options));
  return std::unique_ptr<HttpEndpoint>(new HttpEndpoint(std::move(impl)));
}

int HttpEndpoint::port() const { return impl_->port(); }

}  // namespace distval
