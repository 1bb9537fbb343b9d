#include "distval/rendezvous.h"

#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <thread>

namespace distval {

std::string RendezvousPath(const std::string& dir, int shard) {
  return dir + "/ps-" + std::to_string(shard) + ".endpoint";
}

Status PublishEndpoint(const std::string& dir, int shard, const std::string& endpoint) {
  if (dir.empty()) return InvalidArgumentError("the rendezvous directory is empty");
  std::error_code ec;
  std::filesystem::create_directories(dir, ec);
  if (ec)
    return UnavailableError("cannot create the rendezvous directory " + dir + ": " + ec.message());
  const std::string path = RendezvousPath(dir, shard);
  const std::string tmp = path + ".tmp." + std::to_string(::getpid());
  {
    std::ofstream f(tmp, std::ios::out | std::ios::trunc);
    f << endpoint << "\n";
    f.flush();
    if (!f) return UnavailableError("cannot write " + tmp);
  }
  std::filesystem::rename(tmp, path, ec);
  if (ec) return UnavailableError("cannot rename " + tmp + " to " + path + ": " + ec.message());
  return OkStatus();
}

StatusOr<std::vector<std::string>> WaitForEndpoints(const std::string& dir, int num_ps,
                                                    std::chrono::milliseconds timeout,
                                                    const RendezvousProgress& progress,
                                                    std::chrono::milliseconds progress_every) {
  using Clock = std::chrono::steady_clock;
  if (num_ps < 1) return InvalidArgumentError("the job needs at least one parameter server");
  std::vector<std::string> endpoints(static_cast<size_t>(num_ps));
  const auto start = Clock::now();
  auto next_progress = start + progress_every;
  auto poll = std::chrono::milliseconds(10);
  for (;;) {
    std::vector<int> missing;
    for (int i = 0; i < num_ps; ++i) {
      if (!endpoints[static_cast<size_t>(i)].empty()) continue;
      std::ifstream f(RendezvousPath(dir, i));
      std::string line;
      if (f && std::getline(f, line)) {
        while (!line.empty() && (line.back() == '\r' || line.back() == ' ')) line.pop_back();
        if (line.empty()) return InvalidArgumentError(RendezvousPath(dir, i) + " is empty");
        endpoints[static_cast<size_t>(i)] = line;
      } else {
        missing.push_back(i);
      }
    }
    if (missing.empty()) return endpoints;
    const auto now = Clock::now();
    const auto waited = std::chrono::duration_cast<std::chrono::seconds>(now - start);
    if (now - start >= timeout) {
      std::string who;
      for (int i : missing) who += (who.empty() ? "" : ", ") + RendezvousPath(dir, i);
      return DeadlineExceededError(
          "waited " + std::to_string(waited.count()) + " s for " + std::to_string(missing.size()) +
          " of " + std::to_string(num_ps) +
          " parameter server(s) to publish their endpoints; missing " + who);
    }
    if (progress && now >= next_progress) {
      progress(missing, waited);
      next_progress = now + progress_every;
    }
    std::this_thread::sleep_for(poll);
    poll = std::min(poll * 2, std::chrono::milliseconds(200));
  }
}

StatusOr<std::string> AdvertisedEndpoint(std::string_view bound, std::string_view host) {
  constexpr std::string_view kTcp = "tcp://";
  if (bound.substr(0, kTcp.size()) != kTcp) return std::string(bound);
  const std::string_view rest = bound.substr(kTcp.size());
  const size_t colon = rest.rfind(':');
  if (colon == std::string_view::npos) return std::string(bound);
  const std::string_view addr = rest.substr(0, colon);
  if (addr != "*" && addr != "0.0.0.0" && addr != "[::]" && addr != "::") return std::string(bound);
  if (host.empty())
    return InvalidArgumentError("the server listens on every address (" + std::string(bound) +
                                "): give the host name or address workers should use");
  const bool v6 = host.find(':') != std::string_view::npos && host.front() != '[';
  std::string out(kTcp);
  if (v6) out += '[';
  out.append(host);
  if (v6) out += ']';
  out.append(rest.substr(colon));
  return out;
}

}  // namespace distval
