#include "distval/timeline.h"

#include <unistd.h>

#include <cerrno>
#include <cstring>

#include "distval/logging.h"

namespace distval {

namespace {

constexpr size_t kFlushBytes = 256 * 1024;

void AppendJsonString(std::string& out, std::string_view s) {
  out += '"';
  for (unsigned char c : s) {
    if (c == '"' || c == '\\') {
      out += '\\';
      out += static_cast<char>(c);
    } else if (c < 0x20) {
      char buf[8];
      std::snprintf(buf, sizeof(buf), "\\u%04x", c);
      out += buf;
    } else {
      out += static_cast<char>(c);
    }
  }
  out += '"';
}

int64_t Micros(std::chrono::steady_clock::duration d) {
  return std::chrono::duration_cast<std::chrono::microseconds>(d).count();
}

}  // namespace

Timeline::Timeline(std::string path, std::FILE* file)
    : path_(std::move(path)),
      pid_(static_cast<int>(::getpid())),
      steady_origin_(Clock::now()),
      origin_us_(std::chrono::duration_cast<std::chrono::microseconds>(
                     std::chrono::system_clock::now().time_since_epoch())
                     .count()),
      file_(file) {}

StatusOr<std::unique_ptr<Timeline>> Timeline::Open(const std::string& path,
                                                   const std::string& process_name) {
  std::FILE* f = std::fopen(path.c_str(), "w");
  if (f == nullptr)
    return NotFoundError("cannot create the timeline " + path + ": " + std::strerror(errno));
  std::unique_ptr<Timeline> t(new Timeline(path, f));
  bool failed = false;
  {
    std::lock_guard<std::mutex> lock(t->mu_);
    t->buffer_ = "{\"traceEvents\":[\n";
    std::string ev = "{\"ph\":\"M\",\"pid\":" + std::to_string(t->pid_) +
                     ",\"tid\":0,\"name\":\"process_name\",\"args\":{\"name\":";
    AppendJsonString(ev, process_name);
    ev += "}}";
    t->AppendEvent(ev);
    t->FlushLocked();
    failed = t->write_failed_;
  }
  if (failed) return DataLossError("writing the timeline " + path + " failed");
  return t;
}

Timeline::~Timeline() {
  Status s = Close();
  if (!s.ok()) DV_LOG(kError) << s;
}

void Timeline::AppendEvent(const std::string& json) {
  if (!first_event_) buffer_ += ",\n";
  first_event_ = false;
  buffer_ += json;
  if (buffer_.size() >= kFlushBytes) FlushLocked();
}

void Timeline::FlushLocked() {
  if (file_ == nullptr || buffer_.empty()) return;
  if (std::fwrite(buffer_.data(), 1, buffer_.size(), file_) != buffer_.size() ||
      std::fflush(file_) != 0)
    write_failed_ = true;
  buffer_.clear();
}

int Timeline::AddTrack(const std::string& name, int sort_index) {
  std::lock_guard<std::mutex> lock(mu_);
  const int tid = next_track_++;
  if (file_ == nullptr) return tid;
  const std::string head =
      "{\"ph\":\"M\",\"pid\":" + std::to_string(pid_) + ",\"tid\":" + std::to_string(tid);
  std::string ev = head + ",\"name\":\"thread_name\",\"args\":{\"name\":";
  AppendJsonString(ev, name);
  ev += "}}";
  AppendEvent(ev);
  AppendEvent(head + ",\"name\":\"thread_sort_index\",\"args\":{\"sort_index\":" +
              std::to_string(sort_index) + "}}");
  return tid;
}

void Timeline::Span(int track, std::string_view name, Clock::time_point begin,
                    Clock::time_point end, Args args) {
  // Both ends rounded the same way, so that spans nested in time stay
  // nested in microseconds.
  const int64_t ts = origin_us_ + Micros(begin - steady_origin_);
  const int64_t dur = end > begin ? origin_us_ + Micros(end - steady_origin_) - ts : 0;
  std::string ev;
  ev.reserve(128);
  ev += "{\"ph\":\"X\",\"pid\":";
  ev += std::to_string(pid_);
  ev += ",\"tid\":";
  ev += std::to_string(track);
  ev += ",\"name\":";
  AppendJsonString(ev, name);
  ev += ",\"ts\":";
  ev += std::to_string(ts);
  ev += ",\"dur\":";
  ev += std::to_string(dur);
  if (args.size() > 0) {
    ev += ",\"args\":{";
    bool first = true;
    for (const auto& [k, v] : args) {
      if (!first) ev += ',';
      first = false;
      AppendJsonString(ev, k);
      ev += ':';
      ev += std::to_string(v);
    }
    ev += '}';
  }
  ev += '}';
  std::lock_guard<std::mutex> lock(mu_);
  if (file_ == nullptr) return;
  AppendEvent(ev);
}

Status Timeline::Close() {
  std::lock_guard<std::mutex> lock(mu_);
  if (file_ == nullptr) return close_status_;
  buffer_ += "\n],\"displayTimeUnit\":\"ms\"}\n";
  FlushLocked();
  if (std::fclose(file_) != 0) write_failed_ = true;
  file_ = nullptr;
  if (write_failed_) close_status_ = DataLossError("writing the timeline " + path_ + " failed");
  return close_status_;
}

}  // namespace distval
