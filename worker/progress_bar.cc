#include "progress_bar.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <sstream>

namespace distval::internal {

namespace {

using Clock = std::chrono::steady_clock;

double Seconds(Clock::duration d) { return std::chrono::duration<double>(d).count(); }

std::string FormatValue(double v) {
  char buf[32];
  std::snprintf(buf, sizeof(buf), "%.4f", v);
  return buf;
}

}  // namespace

ProgressBar::ProgressBar(std::ostream& out, bool interactive, bool show_bar, int epoch, int epochs,
                         int64_t steps)
    : out_(out),
      interactive_(interactive),
      show_bar_(show_bar),
      steps_(std::max<int64_t>(steps, 1)),
      start_(Clock::now()) {
  out_ << "Epoch " << epoch + 1 << "/" << epochs << "\n";
  if (!interactive_) out_.flush();
}

std::string ProgressBar::FormatDuration(double seconds) {
  char buf[32];
  if (seconds < 60) {
    std::snprintf(buf, sizeof(buf), "%.1fs", seconds);
  } else if (seconds < 3600) {
    const int s = static_cast<int>(seconds);
    std::snprintf(buf, sizeof(buf), "%dm%02ds", s / 60, s % 60);
  } else {
    const int m = static_cast<int>(seconds / 60);
    std::snprintf(buf, sizeof(buf), "%dh%02dm", m / 60, m % 60);
  }
  return buf;
}

std::string ProgressBar::FormatValues(const ProgressValues& values) {
  std::string s;
  for (const auto& [name, v] : values) s += " - " + name + ": " + FormatValue(v);
  return s;
}

std::string ProgressBar::Bar(int64_t done) const {
  constexpr size_t kWidth = 30;
  std::string bar;
  if (done >= steps_) {
    bar = std::string(kWidth, '=');
  } else {
    const size_t filled = static_cast<size_t>(kWidth * std::max<int64_t>(done, 0) / steps_);
    if (filled > 0) bar = std::string(filled - 1, '=') + ">";
    bar.append(kWidth - bar.size(), '.');
  }
  return "[" + bar + "]";
}

void ProgressBar::Update(int64_t done, const ProgressValues& values, double examples_per_s) {
  if (!show_bar_ || done >= steps_) return;
  const auto now = Clock::now();
  // Interactive: redraw at most every 100 ms. Otherwise: a line at each
  // quarter of the epoch.
  const int64_t quarter = std::max<int64_t>(1, steps_ / 4);
  if (interactive_) {
    if (now - last_draw_ < std::chrono::milliseconds(100)) return;
    last_draw_ = now;
  } else {
    if (done < next_quarter_ * quarter) return;
    while (next_quarter_ * quarter <= done) ++next_quarter_;
  }
  const double elapsed = Seconds(now - start_);
  const double eta =
      done > 0 ? elapsed / static_cast<double>(done) * static_cast<double>(steps_ - done) : 0.0;
  std::ostringstream line;
  line << done << "/" << steps_ << " ";
  if (interactive_) line << Bar(done) << " ";
  line << "- ETA " << FormatDuration(eta) << FormatValues(values) << " - "
       << static_cast<int64_t>(examples_per_s) << " ex/s";
  std::string text = line.str();
  if (interactive_) {
    const size_t width = text.size();
    if (width < last_width_) text.append(last_width_ - width, ' ');
    last_width_ = width;
    out_ << "\r" << text << std::flush;
  } else {
    out_ << text << std::endl;
  }
}

void ProgressBar::Finish(int64_t done, const ProgressValues& values, double examples_per_s) {
  const double elapsed = Seconds(Clock::now() - start_);
  std::ostringstream line;
  line << done << "/" << steps_ << " " << Bar(done) << " - " << FormatDuration(elapsed) << " "
       << static_cast<int64_t>(
              std::lround(elapsed * 1000.0 / static_cast<double>(std::max<int64_t>(done, 1))))
       << "ms/step" << FormatValues(values) << " - " << static_cast<int64_t>(examples_per_s)
       << " ex/s";
  std::string text = line.str();
  if (interactive_) {
    if (text.size() < last_width_) text.append(last_width_ - text.size(), ' ');
    out_ << "\r";
  }
  out_ << text << std::endl;
}

}  // namespace distval::internal
