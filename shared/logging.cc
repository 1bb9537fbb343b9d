#include "distval/logging.h"

#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstring>
#include <ctime>
#include <mutex>

#include <nlohmann/json.hpp>

namespace distval {
namespace {

std::atomic<int> g_level{static_cast<int>(LogLevel::kInfo)};
std::mutex g_config_mu;
std::string g_tag;  // Guarded by g_config_mu.
bool g_json = false;  // Guarded by g_config_mu.

const char* LevelName(LogLevel level) {
  switch (level) {
    case LogLevel::kDebug: return "debug";
    case LogLevel::kInfo: return "info";
    case LogLevel::kWarning: return "warning";
    case LogLevel::kError: return "error";
  }
  return "info";
}

}  // namespace

void ConfigureLogging(const LogConfig& config) {
  std::lock_guard<std::mutex> lock(g_config_mu);
  g_level.store(static_cast<int>(config.level));
  g_tag = config.tag;
  g_json = config.json;
}

StatusOr<LogLevel> ParseLogLevel(std::string_view text) {
  if (text == "debug") return LogLevel::kDebug;
  if (text == "info") return LogLevel::kInfo;
  if (text == "warning" || text == "warn") return LogLevel::kWarning;
  if (text == "error") return LogLevel::kError;
  return InvalidArgumentError("unknown log level '" + std::string(text) +
                              "' (expected debug, info, warning or error)");
}

bool LogEnabled(LogLevel level) { return static_cast<int>(level) >= g_level.load(); }

namespace internal {

LogMessage::LogMessage(LogLevel level, const char* file, int line)
    : level_(level), file_(file), line_(line) {}

LogMessage::~LogMessage() {
  auto now = std::chrono::system_clock::now();
  std::time_t t = std::chrono::system_clock::to_time_t(now);
  int ms = static_cast<int>(
      std::chrono::duration_cast<std::chrono::milliseconds>(now.time_since_epoch()).count() %
      1000);
  std::tm tm{};
  localtime_r(&t, &tm);
  char ts[32];
  std::strftime(ts, sizeof(ts), "%H:%M:%S", &tm);
  const char* base = std::strrchr(file_, '/');
  base = base ? base + 1 : file_;
  std::string tag;
  bool json;
  {
    std::lock_guard<std::mutex> lock(g_config_mu);
    tag = g_tag;
    json = g_json;
  }
  std::string out;
  if (json) {
    nlohmann::json j = {{"time", std::string(ts) + "." + std::to_string(ms)},
                        {"level", LevelName(level_)},
                        {"process", tag},
                        {"source", std::string(base) + ":" + std::to_string(line_)},
                        {"message", stream_.str()}};
    out = j.dump() + "\n";
  } else {
    char head[96];
    std::snprintf(head, sizeof(head), "%s.%03d %c ", ts, ms,
                  static_cast<char>(std::toupper(LevelName(level_)[0])));
    out = head;
    if (!tag.empty()) out += "[" + tag + "] ";
    out += stream_.str();
    out += "\n";
  }
  const char* p = out.data();
  size_t left = out.size();
  while (left > 0) {
    ssize_t n = ::write(STDERR_FILENO, p, left);
    if (n <= 0) break;
    p += n;
    left -= static_cast<size_t>(n);
  }
}

}  // namespace internal
}  // namespace distval
