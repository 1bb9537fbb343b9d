// Timeline: writes Chrome trace-event JSON (the "JSON Object Format" that
// chrome://tracing and Perfetto's UI open) for one process:
//
//   {"traceEvents":[
//     {"ph":"M","pid":P,"name":"process_name","args":{"name":"worker 0"}},
//     {"ph":"M","pid":P,"tid":1,"name":"thread_name","args":{"name":"replica 0"}},
//     {"ph":"X","pid":P,"tid":1,"name":"compute","ts":...,"dur":...,"args":{"step":3}},
//     ...],
//    "displayTimeUnit":"ms"}
//
// A track is one row of the viewer (a trace "thread"); spans ("X" complete
// events) on one track nest by time. Timestamps are microseconds of the
// system clock (CLOCK_REALTIME) measured with the steady clock from the
// moment the timeline opened, so that timelines of several processes on one
// machine line up when loaded together; pid is the process id.
//
// Events are formatted at once and written in chunks as they accumulate, so
// memory stays bounded on long runs; Close() (or the destructor) writes the
// rest and the closing brackets. A timeline that was not closed (the process
// was killed) lacks the closing "]}"; Chrome and Perfetto still load it.
//
// Thread-safety: AddTrack and Span may be called from any thread (a mutex
// guards the buffer; a span costs about a microsecond). Close from one
// thread, after the other threads stopped recording.
#ifndef DISTVAL_TIMELINE_H_
#define DISTVAL_TIMELINE_H_

#include <chrono>
#include <cstdint>
#include <cstdio>
#include <initializer_list>
#include <memory>
#include <mutex>
#include <string>
#include <string_view>
#include <utility>

#include "distval/status.h"

namespace distval {

class Timeline {
 public:
  using Clock = std::chrono::steady_clock;
  // Integer arguments of a span, e.g. {{"step", 3}, {"shard", 1}}.
  using Args = std::initializer_list<std::pair<std::string_view, int64_t>>;

  // Creates (truncates) `path` and writes the header and the process name.
  // NotFound when the file cannot be created (naming the path).
  static StatusOr<std::unique_ptr<Timeline>> Open(const std::string& path,
                                                  const std::string& process_name);
  // Close()s, logging a write error.
  ~Timeline();
  Timeline(const Timeline&) = delete;
  Timeline& operator=(const Timeline&) = delete;

  // Adds a track named `name`; tracks are shown sorted by `sort_index`.
  // Returns its id for Span.
  int AddTrack(const std::string& name, int sort_index);

  // Records the span [begin, end] named `name` on `track`. Spans ending
  // before they begin are recorded with duration 0. After Close: ignored.
  void Span(int track, std::string_view name, Clock::time_point begin, Clock::time_point end,
            Args args = {});

  // Writes everything and closes the file. DataLoss when a write failed
  // (naming the path). Later calls return the first result.
  Status Close();

  const std::string& path() const { return path_; }

 private:
  Timeline(std::string path, std::FILE* file);
  // REQUIRES: mu_ held.
  void AppendEvent(const std::string& json);
  void FlushLocked();

  const std::string path_;
  const int pid_;
  const Clock::time_point steady_origin_;
  const int64_t origin_us_;  // system clock at steady_origin_, microseconds since the epoch

  std::mutex mu_;
  std::FILE* file_;            // Guarded by mu_; null once closed.
  std::string buffer_;         // Guarded by mu_.
  bool first_event_ = true;    // Guarded by mu_.
  bool write_failed_ = false;  // Guarded by mu_.
  int next_track_ = 1;         // Guarded by mu_.
  Status close_status_;        // Guarded by mu_.
};

}  // namespace distval

#endif  // DISTVAL_TIMELINE_H_
