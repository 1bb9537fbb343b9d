// Logging with levels and a process tag (role and index), to stderr.
//
//   DV_LOG(kInfo) << "bound " << endpoint;
//
// Each message is written as one line with a single write(2), so lines from
// several threads never interleave. The configuration is process-wide and is
// set once by main() (ConfigureLogging); libraries only log, they never
// configure. Thread-safe.
#ifndef DISTVAL_LOGGING_H_
#define DISTVAL_LOGGING_H_

#include <sstream>
#include <string>
#include <string_view>

#include "distval/status.h"

namespace distval {

enum class LogLevel : int { kDebug = 0, kInfo = 1, kWarning = 2, kError = 3 };

struct LogConfig {
  LogLevel level = LogLevel::kInfo;
  // Printed on every line, e.g. "ps:0" or "worker:1".
  std::string tag;
  // One JSON object per line instead of text (for log shippers).
  bool json = false;
};

// Called by main(). Safe to call again (e.g. after parsing flags).
void ConfigureLogging(const LogConfig& config);
// "debug", "info", "warning", "error" -> level; InvalidArgument otherwise.
StatusOr<LogLevel> ParseLogLevel(std::string_view text);
bool LogEnabled(LogLevel level);

namespace internal {
// Turns the streamed expression into void for the ?: in DV_LOG.
struct LogVoidify {
  void operator&(std::ostream&) {}
};

class LogMessage {
 public:
  LogMessage(LogLevel level, const char* file, int line);
  ~LogMessage();
  std::ostream& stream() { return stream_; }

 private:
  LogLevel level_;
  const char* file_;
  int line_;
  std::ostringstream stream_;
};
}  // namespace internal

}  // namespace distval

// Safe inside an unbraced if/else; the message is only built when enabled.
#define DV_LOG(level)                                      \
  !::distval::LogEnabled(::distval::LogLevel::level)       \
      ? (void)0                                            \
      : ::distval::internal::LogVoidify() &                \
            ::distval::internal::LogMessage(::distval::LogLevel::level, __FILE__, __LINE__).stream()

#endif  // DISTVAL_LOGGING_H_
