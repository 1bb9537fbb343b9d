#include "harness.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>

namespace distval::bench {

StatusOr<double> SecondsPerIteration(const std::function<Status()>& op,
                                     const SampleTiming& timing) {
  for (int i = 0; i < timing.warmup_iterations; ++i) DV_RETURN_IF_ERROR(op());
  using Clock = std::chrono::steady_clock;
  const auto start = Clock::now();
  int64_t iterations = 0;
  double elapsed = 0;
  do {
    DV_RETURN_IF_ERROR(op());
    ++iterations;
    elapsed = std::chrono::duration<double>(Clock::now() - start).count();
  } while (iterations < timing.min_iterations || elapsed < timing.min_seconds);
  return elapsed / static_cast<double>(iterations);
}

StatusOr<std::vector<double>> AlternateMedians(const std::vector<Measure>& measures, int reps,
                                               std::vector<std::vector<double>>* samples_out) {
  const size_t n = measures.size();
  std::vector<std::vector<double>> samples(n);
  for (int r = 0; r < reps; ++r) {
    for (size_t k = 0; k < n; ++k) {
      const size_t i = (static_cast<size_t>(r) + k) % n;
      DV_ASSIGN_OR_RETURN(double v, measures[i]());
      samples[i].push_back(v);
    }
  }
  std::vector<double> medians;
  for (const auto& s : samples) medians.push_back(Median(s));
  if (samples_out != nullptr) *samples_out = std::move(samples);
  return medians;
}

double Median(std::vector<double> values) {
  if (values.empty()) return 0;
  std::sort(values.begin(), values.end());
  const size_t m = values.size() / 2;
  return values.size() % 2 == 1 ? values[m] : 0.5 * (values[m - 1] + values[m]);
}

std::string Floor::ToString() const {
  std::ostringstream os;
  os << (kind == Kind::kAtLeast ? ">= " : "<= ") << ratio;
  return os.str();
}

std::optional<double> Row::ratio() const {
  if (!limit || *limit == 0 || !skipped.empty()) return std::nullopt;
  return value / *limit;
}

std::string Row::Verdict() const {
  if (!skipped.empty()) return "skipped";
  if (!floor) return "-";
  const auto r = ratio();
  if (!r) return "-";
  return floor->Passes(*r) ? "PASS" : "FAIL";
}

void Report::Add(Row row) { rows_.push_back(std::move(row)); }

int Report::Failures() const {
  return static_cast<int>(std::count_if(rows_.begin(), rows_.end(),
                                        [](const Row& r) { return r.Verdict() == "FAIL"; }));
}

std::string SizeLabel(int64_t bytes) {
  if (bytes <= 0) return "-";
  if (bytes % (int64_t{1} << 20) == 0) return std::to_string(bytes >> 20) + " MiB";
  if (bytes % (int64_t{1} << 10) == 0) return std::to_string(bytes >> 10) + " KiB";
  return std::to_string(bytes) + " B";
}

std::string FormatValue(double value) {
  char buf[64];
  const double a = std::fabs(value);
  if (a >= 1000) {
    std::snprintf(buf, sizeof(buf), "%.0f", value);
  } else if (a >= 100) {
    std::snprintf(buf, sizeof(buf), "%.1f", value);
  } else if (a >= 10) {
    std::snprintf(buf, sizeof(buf), "%.2f", value);
  } else {
    std::snprintf(buf, sizeof(buf), "%.3f", value);
  }
  return buf;
}

std::string Report::Table() const {
  const std::vector<std::string> header = {"figure", "size",  "distval", "limit",
                                           "ratio",  "floor", "verdict"};
  std::vector<std::vector<std::string>> cells;
  for (const Row& r : rows_) {
    std::vector<std::string> c;
    c.push_back(r.figure);
    c.push_back(SizeLabel(r.size_bytes));
    if (!r.skipped.empty()) {
      c.push_back(r.skipped);
      c.insert(c.end(), {"", "", "", ""});
      cells.push_back(std::move(c));
      continue;
    }
    c.push_back(FormatValue(r.value) + " " + r.unit);
    c.push_back(r.limit ? FormatValue(*r.limit) + " " + r.unit +
                              (r.limit_name.empty() ? "" : " (" + r.limit_name + ")")
                        : "-");
    const auto ratio = r.ratio();
    c.push_back(ratio ? FormatValue(*ratio) : "-");
    c.push_back(r.floor ? r.floor->ToString() : "-");
    c.push_back(r.Verdict());
    cells.push_back(std::move(c));
  }
  std::vector<size_t> width(header.size());
  for (size_t i = 0; i < header.size(); ++i) width[i] = header[i].size();
  for (const auto& c : cells) {
    if (c.size() == header.size() && c[3].empty() && c[0].size() + c[1].size() > 0) {
      // Skipped rows span the remaining columns; size only the first two.
      width[0] = std::max(width[0], c[0].size());
      width[1] = std::max(width[1], c[1].size());
      continue;
    }
    for (size_t i = 0; i < c.size(); ++i) width[i] = std::max(width[i], c[i].size());
  }
  std::ostringstream os;
  auto line = [&](const std::vector<std::string>& c) {
    std::string s;
    for (size_t i = 0; i < c.size(); ++i) {
      s += c[i];
      if (i + 1 < c.size()) s += std::string(width[i] - std::min(width[i], c[i].size()) + 2, ' ');
    }
    while (!s.empty() && s.back() == ' ') s.pop_back();
    os << s << "\n";
  };
  line(header);
  std::vector<std::string> rule;
  for (size_t w : width) rule.push_back(std::string(w, '-'));
  line(rule);
  for (const auto& c : cells) line(c);
  return os.str();
}

Status Report::WriteJson(const std::string& path) const {
  nlohmann::json list = nlohmann::json::array();
  for (const Row& r : rows_) {
    nlohmann::json o;
    o["name"] = r.name;
    o["figure"] = r.figure;
    o["size_bytes"] = r.size_bytes;
    if (r.skipped.empty()) {
      o["value"] = r.value;
    } else {
      o["value"] = nullptr;
      o["skipped"] = r.skipped;
    }
    o["unit"] = r.unit;
    o["limit"] = r.limit && r.skipped.empty() ? nlohmann::json(*r.limit) : nlohmann::json();
    o["limit_name"] = r.limit_name;
    const auto ratio = r.ratio();
    o["ratio"] = ratio ? nlohmann::json(*ratio) : nlohmann::json();
    o["floor"] = r.floor ? nlohmann::json(r.floor->ToString()) : nlohmann::json();
    o["verdict"] = r.Verdict();
    list.push_back(std::move(o));
  }
  std::ofstream f(path);
  f << list.dump(2) << "\n";
  if (!f) return InternalError("cannot write " + path);
  return OkStatus();
}

}  // namespace distval::bench
