#include "distval/zap_authenticator.h"

#include <zmq.h>

#include <algorithm>
#include <chrono>
#include <cstring>
#include <map>
#include <sstream>
#include <string_view>

#include "distval/curve_keys.h"
#include "distval/logging.h"

namespace distval {
namespace {

constexpr char kZapEndpoint[] = "inproc://zeromq.zap.01";
constexpr auto kPollInterval = std::chrono::milliseconds(100);
constexpr auto kLogEvery = std::chrono::seconds(10);

std::string AsString(const transport::Frame& f) {
  return std::string(reinterpret_cast<const char*>(f.data()), f.size());
}

transport::Payload Text(std::string_view s) {
  return transport::Payload::Copy(std::as_bytes(std::span(s.data(), s.size())));
}

}  // namespace

StatusOr<std::unique_ptr<ZapAuthenticator>> ZapAuthenticator::Start(
    transport::Context& context, std::vector<std::string> authorized_public_keys) {
  if (authorized_public_keys.empty())
    return InvalidArgumentError("ZapAuthenticator: no authorized public keys");
  for (const auto& key : authorized_public_keys) {
    if (!IsCurveKeyZ85(key))
      return InvalidArgumentError("ZapAuthenticator: authorized key '" + key +
                                  "' is not a 40-character Z85 CURVE key");
  }
  std::sort(authorized_public_keys.begin(), authorized_public_keys.end());
  DV_ASSIGN_OR_RETURN(auto socket, transport::Socket::Create(context, transport::SocketType::kRep));
  auto bound = socket->Bind(kZapEndpoint);
  if (!bound.ok()) {
    return UnavailableError(
        "cannot bind the ZAP handler at " + std::string(kZapEndpoint) +
        " (is another one running in this context?): " + std::string(bound.status().message()));
  }
  std::unique_ptr<ZapAuthenticator> auth(
      new ZapAuthenticator(&context, std::move(socket), std::move(authorized_public_keys)));
  auth->thread_ = std::thread([a = auth.get()] { a->Loop(); });
  return auth;
}

ZapAuthenticator::ZapAuthenticator(transport::Context* context,
                                   std::unique_ptr<transport::Socket> socket,
                                   std::vector<std::string> keys)
    : socket_(std::move(socket)), context_(context), keys_(std::move(keys)) {}

Status ZapAuthenticator::WatchHandshakeFailures(transport::Socket& socket) {
  static std::atomic<int> next_id{0};
  const std::string endpoint = "inproc://distval-zap-monitor-" + std::to_string(next_id++);
  if (zmq_socket_monitor(
          socket.raw(), endpoint.c_str(),
          ZMQ_EVENT_HANDSHAKE_FAILED_PROTOCOL | ZMQ_EVENT_HANDSHAKE_FAILED_NO_DETAIL) != 0) {
    return InternalError("zmq_socket_monitor " + endpoint + ": " + zmq_strerror(errno));
  }
  DV_ASSIGN_OR_RETURN(auto monitor,
                      transport::Socket::Create(*context_, transport::SocketType::kPair));
  DV_RETURN_IF_ERROR(monitor->Connect(endpoint));
  std::lock_guard<std::mutex> lock(mu_);
  pending_monitor_ = std::move(monitor);
  return OkStatus();
}

ZapAuthenticator::~ZapAuthenticator() {
  stop_.store(true);
  if (thread_.joinable()) thread_.join();
}

void ZapAuthenticator::Loop() {
  using Clock = std::chrono::steady_clock;
  struct Refusals {
    bool logged = false;
    Clock::time_point last_logged;
    int64_t since_logged = 0;  // refusals not logged yet
  };
  std::map<std::string, Refusals> refusals;  // by key, mechanism or failure
  // Logs a refusal of `who` unless one was logged less than kLogEvery ago.
  auto log_refusal = [&refusals](const std::string& who, const std::string& what) {
    if (refusals.size() > 1024) refusals.clear();
    Refusals& r = refusals[who];
    ++r.since_logged;
    const auto now = Clock::now();
    if (r.logged && now - r.last_logged < kLogEvery) return;
    DV_LOG(kWarning) << what
                     << (r.since_logged > 1 ? " (" + std::to_string(r.since_logged - 1) +
                                                  " more refused since last logged)"
                                            : std::string());
    r.logged = true;
    r.last_logged = now;
    r.since_logged = 0;
  };
  std::unique_ptr<transport::Socket> monitor;
  while (!stop_.load()) {
    if (!monitor) {
      std::lock_guard<std::mutex> lock(mu_);
      monitor = std::move(pending_monitor_);
    }
    if (monitor) {
      transport::Socket* both[] = {socket_.get(), monitor.get()};
      auto ready = transport::PollReadable(both, kPollInterval);
      if (!ready.ok()) {
        if (ready.status().code() != StatusCode::kCancelled)
          DV_LOG(kError) << "ZAP handler stopped: " << ready.status();
        break;
      }
      if (ready->empty()) continue;
      // Monitor events: [uint16 event, uint32 value] then the endpoint.
      auto event = monitor->Receive(std::chrono::milliseconds(0));
      if (event.ok() && event->size() == 2 && (*event)[0].size() == 6) {
        uint16_t id = 0;
        uint32_t value = 0;
        std::memcpy(&id, (*event)[0].data(), sizeof(id));
        std::memcpy(&value, (*event)[0].data() + 2, sizeof(value));
        const std::string on = AsString((*event)[1]);
        const bool mismatch = id == ZMQ_EVENT_HANDSHAKE_FAILED_PROTOCOL &&
                              value == ZMQ_PROTOCOL_ERROR_ZMTP_MECHANISM_MISMATCH;
        std::ostringstream code;
        code << std::hex << value;
        const std::string reason = mismatch ? "not a CURVE client (security mechanism mismatch)"
                                            : "handshake failed (event 0x" + code.str() + ")";
        refused_.fetch_add(1, std::memory_order_relaxed);
        log_refusal(on + reason, "refused connection on " + on + ": " + reason);
        continue;
      }
    }
    auto request = socket_->Receive(monitor ? std::chrono::milliseconds(0) : kPollInterval);
    if (!request.ok()) {
      if (request.status().code() == StatusCode::kDeadlineExceeded) continue;
      if (request.status().code() != StatusCode::kCancelled)
        DV_LOG(kError) << "ZAP handler stopped: " << request.status();
      break;
    }
    // version, request id, domain, address, identity, mechanism, credentials.
    const transport::InMessage& m = *request;
    std::string version = m.size() > 0 ? AsString(m[0]) : "";
    std::string request_id = m.size() > 1 ? AsString(m[1]) : "";
    std::string address = m.size() > 3 ? AsString(m[3]) : "?";
    std::string mechanism = m.size() > 5 ? AsString(m[5]) : "";
    std::string key;
    if (mechanism == "CURVE" && m.size() > 6 && m[6].size() == 32) {
      char z85[41] = {};
      if (zmq_z85_encode(z85, reinterpret_cast<const uint8_t*>(m[6].data()), 32) != nullptr)
        key = z85;
    }
    const bool ok =
        version == "1.0" && !key.empty() && std::binary_search(keys_.begin(), keys_.end(), key);
    if (ok) {
      accepted_.fetch_add(1, std::memory_order_relaxed);
    } else {
      refused_.fetch_add(1, std::memory_order_relaxed);
      const std::string who = key.empty() ? "mechanism " + mechanism : key;
      log_refusal(who, "refused connection from " + address + ": " +
                           (key.empty() ? "not a CURVE client (" + who + ")"
                                        : "CURVE key " + key + " is not authorized"));
    }
    Status s = socket_->Send(
        transport::MakeMessage(Text("1.0"), Text(request_id), Text(ok ? "200" : "400"),
                               Text(ok ? "OK" : "not authorized"), Text(ok ? key : ""), Text("")));
    if (!s.ok() && s.code() == StatusCode::kCancelled) break;
    if (!s.ok()) DV_LOG(kError) << "ZAP reply: " << s;
  }
  monitor.reset();
  socket_.reset();
}

}  // namespace distval
