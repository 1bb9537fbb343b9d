// A strict parser of the Prometheus text exposition format (0.0.4) for the
// tests: it accepts what a Prometheus server accepts and checks the rules a
// scrape depends on, so that a test fails when distval's /metrics would be
// rejected or misread.
//
// Checked: comment lines ("# HELP name text", "# TYPE name type", other
// comments ignored); sample lines "name{label="value",...} value
// [timestamp]"; metric and label names; label value escapes (\\, \", \n);
// values (floats, +Inf, -Inf, NaN); every sample belongs to a family whose
// TYPE came first (histogram samples as name_bucket/_sum/_count, with an
// "le" label on buckets); HELP and TYPE at most once per family; no
// duplicate samples; histograms: buckets in increasing "le" order, counts
// non-decreasing, a final le="+Inf" bucket equal to _count; counters >= 0.
#ifndef DISTVAL_TESTS_SHARED_PROMETHEUS_TEXT_H_
#define DISTVAL_TESTS_SHARED_PROMETHEUS_TEXT_H_

#include <cmath>
#include <cstdlib>
#include <map>
#include <optional>
#include <set>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

namespace distval::testing {

struct PromSample {
  std::string name;  // as written (with _bucket/_sum/_count)
  std::map<std::string, std::string> labels;
  double value = 0;
};

struct PromFamily {
  std::string type;  // counter, gauge, histogram, summary, untyped
  std::string help;
  std::vector<PromSample> samples;
};

struct PromText {
  std::map<std::string, PromFamily> families;
  std::string error;  // empty when the text parsed and passed every check

  // The value of the sample `name` whose labels include `labels`; nullopt
  // if there is none.
  std::optional<double> Value(const std::string& name,
                              const std::map<std::string, std::string>& labels = {}) const {
    for (const auto& [fname, f] : families) {
      for (const PromSample& s : f.samples) {
        if (s.name != name) continue;
        bool match = true;
        for (const auto& [k, v] : labels) {
          auto it = s.labels.find(k);
          if (it == s.labels.end() || it->second != v) match = false;
        }
        if (match) return s.value;
      }
    }
    return std::nullopt;
  }
  // Sum of every sample named `name` whose labels include `labels`.
  double Sum(const std::string& name, const std::map<std::string, std::string>& labels = {}) const {
    double total = 0;
    for (const auto& [fname, f] : families)
      for (const PromSample& s : f.samples) {
        if (s.name != name) continue;
        bool match = true;
        for (const auto& [k, v] : labels) {
          auto it = s.labels.find(k);
          if (it == s.labels.end() || it->second != v) match = false;
        }
        if (match) total += s.value;
      }
    return total;
  }
};

namespace prom_internal {

inline bool MetricNameChar(char c, bool first) {
  return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || c == '_' || c == ':' ||
         (!first && c >= '0' && c <= '9');
}
inline bool LabelNameChar(char c, bool first) {
  return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || c == '_' ||
         (!first && c >= '0' && c <= '9');
}
inline bool ValidMetricName(const std::string& n) {
  if (n.empty()) return false;
  for (size_t i = 0; i < n.size(); ++i)
    if (!MetricNameChar(n[i], i == 0)) return false;
  return true;
}

inline bool ParseValue(const std::string& t, double* out) {
  if (t == "+Inf" || t == "Inf") {
    *out = INFINITY;
    return true;
  }
  if (t == "-Inf") {
    *out = -INFINITY;
    return true;
  }
  if (t == "NaN") {
    *out = NAN;
    return true;
  }
  if (t.empty()) return false;
  char* end = nullptr;
  *out = std::strtod(t.c_str(), &end);
  return end == t.c_str() + t.size() && std::isfinite(*out);
}

// The family a sample name belongs to, given the declared families.
inline std::string FamilyOf(const std::string& name, const std::map<std::string, PromFamily>& fams,
                            std::string* suffix) {
  suffix->clear();
  if (fams.count(name)) return name;
  for (const char* s : {"_bucket", "_sum", "_count"}) {
    const std::string sfx = s;
    if (name.size() > sfx.size() && name.compare(name.size() - sfx.size(), sfx.size(), sfx) == 0) {
      const std::string base = name.substr(0, name.size() - sfx.size());
      auto it = fams.find(base);
      if (it != fams.end() && (it->second.type == "histogram" || it->second.type == "summary")) {
        *suffix = sfx;
        return base;
      }
    }
  }
  return "";
}

}  // namespace prom_internal

inline PromText ParsePrometheusText(const std::string& text) {
  using namespace prom_internal;
  PromText out;
  std::set<std::string> helped, typed, seen_samples;
  std::istringstream in(text);
  std::string line;
  int line_no = 0;
  auto fail = [&](const std::string& why) {
    out.error = "line " + std::to_string(line_no) + ": " + why + ": '" + line + "'";
    return out;
  };
  if (!text.empty() && text.back() != '\n') {
    out.error = "the text does not end with a newline";
    return out;
  }
  while (std::getline(in, line)) {
    ++line_no;
    if (line.empty()) continue;
    if (line[0] == '#') {
      std::istringstream c(line.substr(1));
      std::string kw, name;
      c >> kw >> name;
      if (kw != "HELP" && kw != "TYPE") continue;  // a plain comment
      if (!ValidMetricName(name)) return fail("bad metric name in " + kw);
      std::string rest;
      std::getline(c, rest);
      if (!rest.empty() && rest[0] == ' ') rest.erase(0, 1);
      if (kw == "HELP") {
        if (!helped.insert(name).second) return fail("second HELP for " + name);
        std::string unescaped;
        for (size_t i = 0; i < rest.size(); ++i) {
          if (rest[i] == '\\' && i + 1 < rest.size()) {
            const char n = rest[++i];
            if (n == 'n') {
              unescaped += '\n';
            } else if (n == '\\') {
              unescaped += '\\';
            } else {
              return fail("bad escape in HELP");
            }
          } else {
            unescaped += rest[i];
          }
        }
        out.families[name].help = unescaped;
      } else {
        if (!typed.insert(name).second) return fail("second TYPE for " + name);
        if (rest != "counter" && rest != "gauge" && rest != "histogram" && rest != "summary" &&
            rest != "untyped")
          return fail("unknown type '" + rest + "'");
        if (out.families.count(name) && !out.families[name].samples.empty())
          return fail("TYPE after samples of " + name);
        out.families[name].type = rest;
      }
      continue;
    }
    // A sample.
    size_t i = 0;
    while (i < line.size() && MetricNameChar(line[i], i == 0)) ++i;
    PromSample s;
    s.name = line.substr(0, i);
    if (s.name.empty()) return fail("no metric name");
    if (i < line.size() && line[i] == '{') {
      ++i;
      while (true) {
        while (i < line.size() && line[i] == ' ') ++i;
        if (i < line.size() && line[i] == '}') {
          ++i;
          break;
        }
        const size_t b = i;
        while (i < line.size() && LabelNameChar(line[i], i == b)) ++i;
        const std::string lname = line.substr(b, i - b);
        if (lname.empty()) return fail("bad label name");
        if (i + 1 >= line.size() || line[i] != '=' || line[i + 1] != '"')
          return fail("expected =\" after label " + lname);
        i += 2;
        std::string value;
        bool closed = false;
        while (i < line.size()) {
          const char c = line[i++];
          if (c == '"') {
            closed = true;
            break;
          }
          if (c == '\\') {
            if (i >= line.size()) return fail("dangling escape");
            const char n = line[i++];
            if (n == 'n') {
              value += '\n';
            } else if (n == '\\' || n == '"') {
              value += n;
            } else {
              return fail("bad escape in label value");
            }
          } else {
            value += c;
          }
        }
        if (!closed) return fail("unterminated label value");
        if (!s.labels.emplace(lname, value).second) return fail("label " + lname + " repeated");
        if (i < line.size() && line[i] == ',') {
          ++i;
          continue;
        }
        if (i < line.size() && line[i] == '}') {
          ++i;
          break;
        }
        return fail("expected , or } in labels");
      }
    }
    if (i >= line.size() || line[i] != ' ') return fail("expected a space before the value");
    std::istringstream v(line.substr(i + 1));
    std::string value_text, ts_text, extra;
    v >> value_text >> ts_text >> extra;
    if (!ParseValue(value_text, &s.value)) return fail("bad value '" + value_text + "'");
    if (!ts_text.empty()) {
      char* end = nullptr;
      std::strtoll(ts_text.c_str(), &end, 10);
      if (end != ts_text.c_str() + ts_text.size()) return fail("bad timestamp");
    }
    if (!extra.empty()) return fail("trailing text");
    std::string suffix;
    const std::string fam = FamilyOf(s.name, out.families, &suffix);
    if (fam.empty() || out.families[fam].type.empty())
      return fail("sample without a TYPE line before it");
    PromFamily& f = out.families[fam];
    if (f.type == "histogram" && suffix.empty()) return fail("histogram sample without a suffix");
    if (suffix == "_bucket" && !s.labels.count("le")) return fail("bucket without le");
    if (f.type == "counter" && !(s.value >= 0)) return fail("negative counter");
    std::ostringstream key;
    key << s.name;
    for (const auto& [k, val] : s.labels) key << '\x1f' << k << '=' << val;
    if (!seen_samples.insert(key.str()).second) return fail("duplicate sample");
    f.samples.push_back(std::move(s));
  }
  // Histogram consistency.
  for (const auto& [name, f] : out.families) {
    if (f.type != "histogram") continue;
    // Group by the labels other than le.
    std::map<std::string, std::vector<std::pair<double, double>>> buckets;
    std::map<std::string, double> counts;
    auto key_of = [](const PromSample& s) {
      std::string k;
      for (const auto& [lk, lv] : s.labels)
        if (lk != "le") k += lk + "=" + lv + ";";
      return k;
    };
    for (const PromSample& s : f.samples) {
      if (s.name == name + "_bucket") {
        double le = 0;
        if (!ParseValue(s.labels.at("le"), &le) && s.labels.at("le") != "+Inf") {
          out.error = name + ": bad le '" + s.labels.at("le") + "'";
          return out;
        }
        buckets[key_of(s)].push_back({le, s.value});
      } else if (s.name == name + "_count") {
        counts[key_of(s)] = s.value;
      }
    }
    for (const auto& [k, list] : buckets) {
      for (size_t j = 1; j < list.size(); ++j) {
        if (!(list[j].first > list[j - 1].first) || list[j].second < list[j - 1].second) {
          out.error = name + "{" + k + "}: buckets out of order or decreasing";
          return out;
        }
      }
      if (list.empty() || !std::isinf(list.back().first)) {
        out.error = name + "{" + k + "}: no +Inf bucket";
        return out;
      }
      if (!counts.count(k) || counts[k] != list.back().second) {
        out.error = name + "{" + k + "}: _count differs from the +Inf bucket";
        return out;
      }
    }
  }
  return out;
}

}  // namespace distval::testing

#endif  // DISTVAL_TESTS_SHARED_PROMETHEUS_TEXT_H_
