#include "distval/cluster_spec.h"

#include <cerrno>
#include <cstring>
#include <fstream>
#include <functional>
#include <limits>
#include <nlohmann/json.hpp>
#include <sstream>
#include <utility>

namespace distval {
namespace {

using Json = nlohmann::json;

constexpr std::string_view kExpectedForms =
    "expected host:port, tcp://host:port, ipc://path or inproc://name";

// Built by appending: `"\"" + std::string(s)` trips a GCC 12 -Wrestrict
// false positive.
std::string Quoted(std::string_view s) {
  std::string out;
  out.reserve(s.size() + 2);
  out.push_back('"');
  out.append(s);
  out.push_back('"');
  return out;
}

bool IsAsciiSpaceOrControl(char c) {
  const auto u = static_cast<unsigned char>(c);
  return u <= 0x20 || u == 0x7f;
}

bool IsAlnum(char c) {
  return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9');
}

bool IsHex(char c) {
  return (c >= '0' && c <= '9') || (c >= 'a' && c <= 'f') || (c >= 'A' && c <= 'F');
}

// Checks "host:port" (host may be a bracketed IPv6 address). Returns OK or
// InvalidArgument describing what is wrong with `endpoint` (the full text,
// for the message).
Status CheckHostPort(std::string_view host_port, std::string_view endpoint) {
  auto bad = [&](const std::string& why) {
    return InvalidArgumentError("endpoint " + Quoted(endpoint) + ": " + why);
  };
  std::string_view host;
  std::string_view port;
  if (!host_port.empty() && host_port.front() == '[') {
    const size_t close = host_port.find(']');
    if (close == std::string_view::npos) return bad("unterminated '[' in IPv6 address");
    host = host_port.substr(1, close - 1);
    std::string_view after = host_port.substr(close + 1);
    if (after.empty() || after.front() != ':')
      return bad(std::string("missing port (") + std::string(kExpectedForms) + ")");
    port = after.substr(1);
    if (host.empty()) return bad("empty host");
    for (char c : host)
      if (!IsHex(c) && c != ':' && c != '.' && c != '%')
        return bad(std::string("IPv6 address contains invalid character '") + c + "'");
  } else {
    const size_t colon = host_port.rfind(':');
    if (colon == std::string_view::npos)
      return bad(std::string("missing port (") + std::string(kExpectedForms) + ")");
    host = host_port.substr(0, colon);
    port = host_port.substr(colon + 1);
    if (host.empty()) return bad("empty host");
    if (host.find(':') != std::string_view::npos)
      return bad("IPv6 addresses must be in brackets, e.g. [::1]:2222");
    for (char c : host)
      if (!IsAlnum(c) && c != '.' && c != '-' && c != '_' && c != '*')
        return bad(std::string("host contains invalid character '") + c + "'");
  }
  if (port.empty()) return bad("empty port");
  if (port.size() > 5) return bad("port " + Quoted(port) + " is not a number in [0, 65535]");
  int value = 0;
  for (char c : port) {
    if (c < '0' || c > '9') return bad("port " + Quoted(port) + " is not a number in [0, 65535]");
    value = value * 10 + (c - '0');
  }
  if (value > 65535) return bad("port " + Quoted(port) + " is not a number in [0, 65535]");
  return OkStatus();
}

std::string_view JsonTypeName(const Json& j) { return j.type_name(); }

std::string Plural(int64_t n, std::string_view noun) {
  return std::to_string(n) + " " + std::string(noun) + (n == 1 ? "" : "s");
}

}  // namespace

std::string_view TaskTypeName(TaskType type) {
  switch (type) {
    case TaskType::kNone:
      return "none";
    case TaskType::kPs:
      return "ps";
    case TaskType::kWorker:
      return "worker";
  }
  return "invalid";
}

StatusOr<std::string> NormalizeEndpoint(std::string_view endpoint) {
  if (endpoint.empty()) return InvalidArgumentError("endpoint is empty");
  for (char c : endpoint)
    if (IsAsciiSpaceOrControl(c))
      return InvalidArgumentError("endpoint " + Quoted(endpoint) +
                                  ": contains whitespace or a control character");
  const size_t sep = endpoint.find("://");
  if (sep == std::string_view::npos) {
    DV_RETURN_IF_ERROR(CheckHostPort(endpoint, endpoint));
    return "tcp://" + std::string(endpoint);
  }
  const std::string_view scheme = endpoint.substr(0, sep);
  const std::string_view rest = endpoint.substr(sep + 3);
  if (scheme == "tcp") {
    DV_RETURN_IF_ERROR(CheckHostPort(rest, endpoint));
    return std::string(endpoint);
  }
  if (scheme == "ipc" || scheme == "inproc") {
    if (rest.empty())
      return InvalidArgumentError("endpoint " + Quoted(endpoint) + ": empty " +
                                  (scheme == "ipc" ? "path" : "name"));
    return std::string(endpoint);
  }
  return InvalidArgumentError("endpoint " + Quoted(endpoint) + ": unsupported transport " +
                              Quoted(scheme) + " (" + std::string(kExpectedForms) + ")");
}

// Builds ClusterSpecs from every source; the friend of ClusterSpec that sets
// its fields. Field names in messages come from the caller, so that flags,
// JSON and Make() report errors in their own vocabulary.
class ClusterSpecParser {
 public:
  // How a source names things in messages.
  struct Naming {
    std::string prefix;                        // "TF_CONFIG: ", "" ...
    std::string ps_list;                       // "\"cluster.ps\"", "--ps"
    std::function<std::string(size_t)> ps_at;  // "\"cluster.ps[1]\"", "--ps entry 1"
    std::string task_type;                     // "\"task.type\"", "--task-type"
    std::string task_index;                    // "\"task.index\"", "--task-index"
  };

  // Normalizes and checks the ps list into spec->ps_endpoints_.
  static Status SetPs(const std::vector<std::string>& raw, const Naming& n, ClusterSpec* spec) {
    if (raw.empty())
      return InvalidArgumentError(n.prefix + n.ps_list + " must list at least one ps endpoint");
    std::vector<std::string> out;
    out.reserve(raw.size());
    for (size_t i = 0; i < raw.size(); ++i) {
      if (raw[i].empty()) return InvalidArgumentError(n.prefix + n.ps_at(i) + " is empty");
      StatusOr<std::string> e = NormalizeEndpoint(raw[i]);
      if (!e.ok()) return e.status().WithContext(n.prefix + n.ps_at(i));
      for (size_t j = 0; j < out.size(); ++j)
        if (out[j] == *e)
          return InvalidArgumentError(n.prefix + n.ps_at(i) + " " + Quoted(raw[i]) +
                                      " duplicates " + n.ps_at(j) + " " + Quoted(raw[j]) + " (" +
                                      *e + ")");
      out.push_back(std::move(*e));
    }
    spec->ps_endpoints_ = std::move(out);
    return OkStatus();
  }

  // Sets the task from (type, index). `tf_numbering`: TF's "worker" index
  // is shifted by one when the spec has a chief, and "chief" requires one
  // to be listed; otherwise distval numbering ("chief" = worker 0).
  static Status SetTask(std::string_view type, int64_t index, bool tf_numbering, const Naming& n,
                        ClusterSpec* spec) {
    auto bad = [&](const std::string& msg) { return InvalidArgumentError(n.prefix + msg); };
    if (type == "evaluator")
      return bad(n.task_type + " \"evaluator\" is not supported (distval has no evaluator tasks)");
    if (type != "ps" && type != "worker" && type != "chief")
      return bad(n.task_type + " " + Quoted(type) +
                 " is not a task type (expected ps, worker or chief)");
    if (index < 0) return bad(n.task_index + " " + std::to_string(index) + " is negative");
    auto out_of_range = [&](int64_t count, std::string_view noun) {
      return bad(n.task_index + " " + std::to_string(index) +
                 " out of range: " + Plural(count, noun));
    };
    if (type == "ps") {
      if (index >= spec->num_ps()) return out_of_range(spec->num_ps(), "ps task");
      spec->task_type_ = TaskType::kPs;
      spec->task_index_ = static_cast<int>(index);
      return OkStatus();
    }
    if (type == "chief") {
      if (tf_numbering && !spec->has_chief_)
        return bad(n.task_type + " is \"chief\" but \"cluster.chief\" lists no chief");
      if (index != 0) return out_of_range(1, "chief task");
      spec->task_type_ = TaskType::kWorker;
      spec->task_index_ = 0;
      return OkStatus();
    }
    // "worker"
    const int shift = (tf_numbering && spec->has_chief_) ? 1 : 0;
    const int64_t count = spec->num_workers_ - shift;
    if (index >= count) return out_of_range(count, "worker task");
    spec->task_type_ = TaskType::kWorker;
    spec->task_index_ = static_cast<int>(index) + shift;
    return OkStatus();
  }

  static StatusOr<ClusterSpec> FromJson(std::string_view text, std::string_view source,
                                        bool task_required) {
    const std::string prefix = std::string(source) + ": ";
    auto bad = [&](const std::string& msg) { return InvalidArgumentError(prefix + msg); };

    Json root;
    try {
      root = Json::parse(text.begin(), text.end());
    } catch (const Json::exception& e) {
      return bad(std::string("invalid JSON: ") + e.what());
    }
    if (!root.is_object())
      return bad("top level must be a JSON object, got " + std::string(JsonTypeName(root)));

    auto cluster_it = root.find("cluster");
    if (cluster_it == root.end()) return bad("\"cluster\" is required");
    const Json& cluster = *cluster_it;
    if (!cluster.is_object())
      return bad("\"cluster\" must be an object, got " + std::string(JsonTypeName(cluster)));

    std::vector<std::string> ps;
    std::vector<std::string> workers;
    std::vector<std::string> chief;
    bool have_ps = false;
    for (auto it = cluster.begin(); it != cluster.end(); ++it) {
      const std::string& job = it.key();
      const std::string field = "\"cluster." + job + "\"";
      std::vector<std::string>* dest = nullptr;
      if (job == "ps") {
        dest = &ps;
        have_ps = true;
      } else if (job == "worker") {
        dest = &workers;
      } else if (job == "chief") {
        dest = &chief;
      } else if (job == "evaluator") {
        return bad(field + ": evaluator tasks are not supported");
      } else {
        return bad(field + " is not a known job (expected ps, worker or chief)");
      }
      const Json& list = it.value();
      if (!list.is_array())
        return bad(field + " must be a list of strings, got " + std::string(JsonTypeName(list)));
      for (size_t i = 0; i < list.size(); ++i) {
        const std::string entry = "\"cluster." + job + "[" + std::to_string(i) + "]\"";
        if (!list[i].is_string())
          return bad(entry + " must be a string, got " + std::string(JsonTypeName(list[i])));
        std::string value = list[i].get<std::string>();
        // ps entries are checked by SetPs (same message form).
        if (job != "ps" && value.empty()) return bad(entry + " is empty");
        dest->push_back(std::move(value));
      }
    }
    if (!have_ps) return bad("\"cluster.ps\" is required");
    if (chief.size() > 1)
      return bad("\"cluster.chief\" must list at most one chief, got " +
                 std::to_string(chief.size()));

    Naming naming{prefix, "\"cluster.ps\"",
                  [](size_t i) { return "\"cluster.ps[" + std::to_string(i) + "]\""; },
                  "\"task.type\"", "\"task.index\""};
    ClusterSpec spec;
    DV_RETURN_IF_ERROR(SetPs(ps, naming, &spec));
    const size_t total_workers = chief.size() + workers.size();
    if (total_workers == 0)
      return bad("\"cluster.worker\" must list at least one worker (or \"cluster.chief\" a chief)");
    if (total_workers > static_cast<size_t>(std::numeric_limits<int>::max()))
      return bad("\"cluster.worker\" lists too many workers");
    spec.has_chief_ = !chief.empty();
    spec.num_workers_ = static_cast<int>(total_workers);
    spec.worker_addresses_ = std::move(chief);
    spec.worker_addresses_.insert(spec.worker_addresses_.end(), workers.begin(), workers.end());

    auto task_it = root.find("task");
    if (task_it == root.end()) {
      if (task_required) return bad("\"task\" is required");
      return spec;
    }
    const Json& task = *task_it;
    if (!task.is_object())
      return bad("\"task\" must be an object, got " + std::string(JsonTypeName(task)));
    auto type_it = task.find("type");
    if (type_it == task.end()) return bad("\"task.type\" is required");
    if (!type_it->is_string())
      return bad("\"task.type\" must be a string, got " + std::string(JsonTypeName(*type_it)));
    int64_t index = 0;  // TF's default when "index" is absent.
    if (auto index_it = task.find("index"); index_it != task.end()) {
      if (!index_it->is_number_integer())
        return bad("\"task.index\" must be an integer, got " +
                   std::string(JsonTypeName(*index_it)) + " " + index_it->dump());
      if (index_it->is_number_unsigned()) {
        const uint64_t u = index_it->get<uint64_t>();
        index = u > static_cast<uint64_t>(std::numeric_limits<int64_t>::max())
                    ? std::numeric_limits<int64_t>::max()
                    : static_cast<int64_t>(u);
      } else {
        index = index_it->get<int64_t>();
      }
    }
    DV_RETURN_IF_ERROR(
        SetTask(type_it->get<std::string>(), index, /*tf_numbering=*/true, naming, &spec));
    return spec;
  }

  static StatusOr<ClusterSpec> Make(const std::vector<std::string>& ps, int num_workers,
                                    const Naming& naming, const std::string& workers_field) {
    ClusterSpec spec;
    DV_RETURN_IF_ERROR(SetPs(ps, naming, &spec));
    if (num_workers < 1)
      return InvalidArgumentError(naming.prefix + workers_field + " " +
                                  std::to_string(num_workers) +
                                  ": at least one worker is required");
    spec.num_workers_ = num_workers;
    return spec;
  }
};

// ---------------------------------------------------------------------------
// ClusterSpec

StatusOr<ClusterSpec> ClusterSpec::Make(const std::vector<std::string>& ps_endpoints,
                                        int num_workers) {
  ClusterSpecParser::Naming naming{"", "ps",
                                   [](size_t i) { return "ps[" + std::to_string(i) + "]"; },
                                   "task type", "task index"};
  return ClusterSpecParser::Make(ps_endpoints, num_workers, naming, "num_workers");
}

StatusOr<ClusterSpec> ClusterSpec::WithTask(std::string_view type, int index) const {
  ClusterSpecParser::Naming naming{"", "ps", nullptr, "task type", "task index"};
  ClusterSpec copy = *this;
  DV_RETURN_IF_ERROR(
      ClusterSpecParser::SetTask(type, index, /*tf_numbering=*/false, naming, &copy));
  return copy;
}

StatusOr<ClusterSpec> ClusterSpec::WithTask(TaskType type, int index) const {
  if (type == TaskType::kNone) {
    ClusterSpec copy = *this;
    copy.task_type_ = TaskType::kNone;
    copy.task_index_ = 0;
    return copy;
  }
  return WithTask(TaskTypeName(type), index);
}

std::string ClusterSpec::ToString() const {
  std::string s = "ps=[";
  for (size_t i = 0; i < ps_endpoints_.size(); ++i) {
    if (i) s += ",";
    s += ps_endpoints_[i];
  }
  s += "] workers=" + std::to_string(num_workers_);
  if (has_chief_) s += " (chief)";
  s += " task=";
  if (has_task())
    s += std::string(TaskTypeName(task_type_)) + ":" + std::to_string(task_index_);
  else
    s += "none";
  return s;
}

std::string ClusterSpec::ToTfConfigJson() const {
  Json cluster = Json::object();
  Json ps = Json::array();
  for (const std::string& e : ps_endpoints_) {
    constexpr std::string_view kTcp = "tcp://";
    ps.push_back(e.compare(0, kTcp.size(), kTcp) == 0 ? e.substr(kTcp.size()) : e);
  }
  cluster["ps"] = std::move(ps);

  std::vector<std::string> addresses = worker_addresses_;
  if (addresses.size() != static_cast<size_t>(num_workers_)) {
    addresses.clear();
    for (int i = 0; i < num_workers_; ++i)
      addresses.push_back("distval-worker-" + std::to_string(i) + ":0");
  }
  const bool chief = has_chief_ && !addresses.empty();
  Json workers = Json::array();
  for (size_t i = chief ? 1 : 0; i < addresses.size(); ++i) workers.push_back(addresses[i]);
  if (chief) cluster["chief"] = Json::array({addresses[0]});
  if (!workers.empty() || !chief) cluster["worker"] = std::move(workers);

  Json root = Json::object();
  root["cluster"] = std::move(cluster);
  if (task_type_ == TaskType::kPs) {
    root["task"] = Json{{"type", "ps"}, {"index", task_index_}};
  } else if (task_type_ == TaskType::kWorker) {
    if (chief && task_index_ == 0)
      root["task"] = Json{{"type", "chief"}, {"index", 0}};
    else
      root["task"] = Json{{"type", "worker"}, {"index", task_index_ - (chief ? 1 : 0)}};
  }
  return root.dump();
}

// ---------------------------------------------------------------------------
// Sources

StatusOr<ClusterSpec> ClusterSpecFromFlags(const ClusterFlags& flags) {
  // Split --ps on commas, trimming spaces around each entry.
  std::vector<std::string> ps;
  if (flags.ps.find_first_not_of(" \t") != std::string::npos) {
    size_t start = 0;
    while (true) {
      const size_t comma = flags.ps.find(',', start);
      std::string item =
          flags.ps.substr(start, comma == std::string::npos ? std::string::npos : comma - start);
      const size_t b = item.find_first_not_of(" \t");
      const size_t e = item.find_last_not_of(" \t");
      ps.push_back(b == std::string::npos ? std::string() : item.substr(b, e - b + 1));
      if (comma == std::string::npos) break;
      start = comma + 1;
    }
  }
  const std::string ps_text = flags.ps;
  ClusterSpecParser::Naming naming{"", "--ps",
                                   [ps_text](size_t i) {
                                     return "--ps entry " + std::to_string(i + 1) + " of " +
                                            Quoted(ps_text);
                                   },
                                   "--task-type", "--task-index"};
  DV_ASSIGN_OR_RETURN(ClusterSpec spec,
                      ClusterSpecParser::Make(ps, flags.num_workers, naming, "--num-workers"));
  if (flags.task_type.empty())
    return InvalidArgumentError("--task-type is required (ps, worker or chief)");
  DV_RETURN_IF_ERROR(ClusterSpecParser::SetTask(flags.task_type, flags.task_index,
                                                /*tf_numbering=*/false, naming, &spec));
  return spec;
}

StatusOr<ClusterSpec> ClusterSpecFromJson(std::string_view text, std::string_view source_name) {
  return ClusterSpecParser::FromJson(text, source_name, /*task_required=*/false);
}

StatusOr<ClusterSpec> ClusterSpecFromFile(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in.is_open())
    return NotFoundError("cannot open cluster file " + path + ": " + std::strerror(errno));
  std::ostringstream buffer;
  buffer << in.rdbuf();
  if (in.bad()) return DataLossError("error reading cluster file " + path);
  return ClusterSpecParser::FromJson(buffer.str(), "cluster file " + path,
                                     /*task_required=*/false);
}

StatusOr<ClusterSpec> ClusterSpecFromTfConfig(std::string_view value) {
  return ClusterSpecParser::FromJson(value, "TF_CONFIG", /*task_required=*/true);
}

}  // namespace distval
