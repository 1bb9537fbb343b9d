#include "distval/metrics.h"

#include <algorithm>
#include <charconv>
#include <cmath>
#include <limits>

namespace distval {

// ---- Histogram -----------------------------------------------------------------

Histogram::Histogram(std::vector<double> upper_bounds)
    : bounds_(std::move(upper_bounds)),
      counts_(std::make_unique<std::atomic<uint64_t>[]>(bounds_.size() + 1)) {
  for (size_t i = 0; i <= bounds_.size(); ++i) counts_[i].store(0, std::memory_order_relaxed);
}

void Histogram::Observe(double value) {
  // First bound >= value: "le" semantics. NaN lands in +Inf.
  const size_t i = static_cast<size_t>(std::lower_bound(bounds_.begin(), bounds_.end(), value) -
                                       bounds_.begin());
  counts_[i].fetch_add(1, std::memory_order_relaxed);
  if (!std::isnan(value)) sum_.fetch_add(value, std::memory_order_relaxed);
}

Histogram::Snapshot Histogram::Read() const {
  Snapshot s;
  s.upper_bounds = bounds_;
  s.cumulative.resize(bounds_.size() + 1);
  uint64_t total = 0;
  for (size_t i = 0; i <= bounds_.size(); ++i) {
    total += counts_[i].load(std::memory_order_relaxed);
    s.cumulative[i] = total;
  }
  s.count = total;
  s.sum = sum_.load(std::memory_order_relaxed);
  return s;
}

StatusOr<std::vector<double>> ExponentialBuckets(double start, double factor, int count) {
  if (!(start > 0) || !(factor > 1) || count < 1)
    return InvalidArgumentError("exponential buckets need start > 0, factor > 1, count >= 1 (got " +
                                FormatMetricValue(start) + ", " + FormatMetricValue(factor) + ", " +
                                std::to_string(count) + ")");
  std::vector<double> b;
  double v = start;
  for (int i = 0; i < count; ++i, v *= factor) b.push_back(v);
  return b;
}

StatusOr<std::vector<double>> LinearBuckets(double start, double width, int count) {
  if (!(width > 0) || count < 1)
    return InvalidArgumentError("linear buckets need width > 0, count >= 1 (got " +
                                FormatMetricValue(width) + ", " + std::to_string(count) + ")");
  std::vector<double> b;
  for (int i = 0; i < count; ++i) b.push_back(start + width * i);
  return b;
}

// ---- Formatting -----------------------------------------------------------------

std::string FormatMetricValue(double value) {
  if (std::isnan(value)) return "NaN";
  if (std::isinf(value)) return value > 0 ? "+Inf" : "-Inf";
  if (value == std::trunc(value) && std::fabs(value) < 1e15) {
    return std::to_string(static_cast<int64_t>(value));
  }
  char buf[64];
  auto [end, ec] = std::to_chars(buf, buf + sizeof(buf), value);
  if (ec != std::errc()) return "NaN";
  return std::string(buf, end);
}

namespace {

bool ValidMetricName(std::string_view name) {
  if (name.empty()) return false;
  for (size_t i = 0; i < name.size(); ++i) {
    const char c = name[i];
    const bool alpha = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || c == '_' || c == ':';
    if (!alpha && !(i > 0 && c >= '0' && c <= '9')) return false;
  }
  return true;
}

bool ValidLabelName(std::string_view name) {
  if (name.empty() || name.rfind("__", 0) == 0) return false;
  for (size_t i = 0; i < name.size(); ++i) {
    const char c = name[i];
    const bool alpha = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || c == '_';
    if (!alpha && !(i > 0 && c >= '0' && c <= '9')) return false;
  }
  return true;
}

// Label values: backslash, double quote and newline escaped.
void AppendLabelValue(std::string& out, std::string_view v) {
  for (char c : v) {
    if (c == '\\') {
      out += "\\\\";
    } else if (c == '"') {
      out += "\\\"";
    } else if (c == '\n') {
      out += "\\n";
    } else {
      out += c;
    }
  }
}

// HELP text: backslash and newline escaped.
void AppendHelp(std::string& out, std::string_view v) {
  for (char c : v) {
    if (c == '\\') {
      out += "\\\\";
    } else if (c == '\n') {
      out += "\\n";
    } else {
      out += c;
    }
  }
}

// {a="x",b="y"} plus an optional extra label (le) last; "" without labels.
std::string LabelText(const MetricLabels& labels, std::string_view extra_name = {},
                      std::string_view extra_value = {}) {
  if (labels.empty() && extra_name.empty()) return "";
  std::string out = "{";
  bool first = true;
  for (const auto& [k, v] : labels) {
    if (!first) out += ',';
    first = false;
    out += k;
    out += "=\"";
    AppendLabelValue(out, v);
    out += '"';
  }
  if (!extra_name.empty()) {
    if (!first) out += ',';
    out += extra_name;
    out += "=\"";
    AppendLabelValue(out, extra_value);
    out += '"';
  }
  out += '}';
  return out;
}

}  // namespace

// ---- Registry -----------------------------------------------------------------

struct MetricRegistry::Family {
  Type type;
  std::string name;
  std::string help;
  std::vector<double> upper_bounds;  // histograms
  struct Member {
    MetricLabels labels;
    std::unique_ptr<Counter> counter;
    std::unique_ptr<Gauge> gauge;
    std::unique_ptr<Histogram> histogram;
  };
  std::vector<Member> members;
};

MetricRegistry::MetricRegistry() = default;
MetricRegistry::~MetricRegistry() = default;

StatusOr<void*> MetricRegistry::Add(Type type, const std::string& name, const std::string& help,
                                    const MetricLabels& labels,
                                    const std::vector<double>* upper_bounds) {
  if (!ValidMetricName(name))
    return InvalidArgumentError("metric name '" + name +
                                "' does not match [a-zA-Z_:][a-zA-Z0-9_:]*");
  for (size_t i = 0; i < labels.size(); ++i) {
    if (!ValidLabelName(labels[i].first) || (type == Type::kHistogram && labels[i].first == "le"))
      return InvalidArgumentError("metric '" + name + "': label name '" + labels[i].first +
                                  "' is not allowed");
    for (size_t j = 0; j < i; ++j)
      if (labels[j].first == labels[i].first)
        return InvalidArgumentError("metric '" + name + "': label '" + labels[i].first +
                                    "' given twice");
  }
  if (upper_bounds != nullptr) {
    if (upper_bounds->empty())
      return InvalidArgumentError("histogram '" + name + "' has no buckets");
    for (size_t i = 0; i < upper_bounds->size(); ++i) {
      if (!std::isfinite((*upper_bounds)[i]) ||
          (i > 0 && (*upper_bounds)[i] <= (*upper_bounds)[i - 1]))
        return InvalidArgumentError("histogram '" + name +
                                    "': bucket bounds must be finite and strictly increasing");
    }
  }
  std::lock_guard<std::mutex> lock(mu_);
  Family* family = nullptr;
  for (auto& f : families_)
    if (f->name == name) family = f.get();
  if (family == nullptr) {
    families_.push_back(std::make_unique<Family>());
    family = families_.back().get();
    family->type = type;
    family->name = name;
    family->help = help;
    if (upper_bounds != nullptr) family->upper_bounds = *upper_bounds;
  } else {
    if (family->type != type || family->help != help ||
        (upper_bounds != nullptr && family->upper_bounds != *upper_bounds))
      return InvalidArgumentError("metric '" + name +
                                  "' is already registered with another type, help or buckets");
  }
  for (auto& m : family->members) {
    if (m.labels != labels) continue;
    switch (type) {
      case Type::kCounter:
        return static_cast<void*>(m.counter.get());
      case Type::kGauge:
        return static_cast<void*>(m.gauge.get());
      case Type::kHistogram:
        return static_cast<void*>(m.histogram.get());
    }
  }
  Family::Member m;
  m.labels = labels;
  void* out = nullptr;
  switch (type) {
    case Type::kCounter:
      m.counter = std::make_unique<Counter>();
      out = m.counter.get();
      break;
    case Type::kGauge:
      m.gauge = std::make_unique<Gauge>();
      out = m.gauge.get();
      break;
    case Type::kHistogram:
      m.histogram = std::make_unique<Histogram>(*upper_bounds);
      out = m.histogram.get();
      break;
  }
  family->members.push_back(std::move(m));
  return out;
}

StatusOr<Counter*> MetricRegistry::AddCounter(const std::string& name, const std::string& help,
                                              const MetricLabels& labels) {
  DV_ASSIGN_OR_RETURN(void* p, Add(Type::kCounter, name, help, labels, nullptr));
  return static_cast<Counter*>(p);
}

StatusOr<Gauge*> MetricRegistry::AddGauge(const std::string& name, const std::string& help,
                                          const MetricLabels& labels) {
  DV_ASSIGN_OR_RETURN(void* p, Add(Type::kGauge, name, help, labels, nullptr));
  return static_cast<Gauge*>(p);
}

StatusOr<Histogram*> MetricRegistry::AddHistogram(const std::string& name, const std::string& help,
                                                  const std::vector<double>& upper_bounds,
                                                  const MetricLabels& labels) {
  DV_ASSIGN_OR_RETURN(void* p, Add(Type::kHistogram, name, help, labels, &upper_bounds));
  return static_cast<Histogram*>(p);
}

std::string MetricRegistry::Render() const {
  std::lock_guard<std::mutex> lock(mu_);
  std::string out;
  out.reserve(4096);
  for (const auto& f : families_) {
    out += "# HELP " + f->name + " ";
    AppendHelp(out, f->help);
    out += "\n# TYPE " + f->name + " ";
    out += f->type == Type::kCounter ? "counter" : f->type == Type::kGauge ? "gauge" : "histogram";
    out += '\n';
    for (const auto& m : f->members) {
      switch (f->type) {
        case Type::kCounter:
          out += f->name + LabelText(m.labels) + " " + FormatMetricValue(m.counter->value()) + "\n";
          break;
        case Type::kGauge:
          out += f->name + LabelText(m.labels) + " " + FormatMetricValue(m.gauge->value()) + "\n";
          break;
        case Type::kHistogram: {
          const Histogram::Snapshot s = m.histogram->Read();
          for (size_t i = 0; i <= s.upper_bounds.size(); ++i) {
            const std::string le = i < s.upper_bounds.size() ? FormatMetricValue(s.upper_bounds[i])
                                                             : std::string("+Inf");
            out += f->name + "_bucket" + LabelText(m.labels, "le", le) + " " +
                   std::to_string(s.cumulative[i]) + "\n";
          }
          out += f->name + "_sum" + LabelText(m.labels) + " " + FormatMetricValue(s.sum) + "\n";
          out += f->name + "_count" + LabelText(m.labels) + " " + std::to_string(s.count) + "\n";
          break;
        }
      }
    }
  }
  return out;
}

}  // namespace distval
