#include "distval/launcher_env.h"

#include <charconv>

namespace distval {

namespace {

constexpr size_t kMaxHosts = 100000;

StatusOr<int> ParseNonNegative(const char* name, const std::string& text) {
  int v = 0;
  const char* b = text.data();
  const char* e = b + text.size();
  auto [p, ec] = std::from_chars(b, e, v);
  if (text.empty() || ec != std::errc() || p != e || v < 0)
    return InvalidArgumentError(std::string(name) + "='" + text +
                                "' is not a non-negative integer");
  return v;
}

// Expands one host pattern (bracket groups) into `out`.
Status ExpandHost(std::string_view host, std::string_view whole, std::vector<std::string>& out) {
  const std::string quoted = "node list '" + std::string(whole) + "'";
  if (host.empty()) return InvalidArgumentError(quoted + ": empty host name");
  std::vector<std::string> partial = {""};
  size_t i = 0;
  while (i < host.size()) {
    const size_t open = host.find('[', i);
    const size_t close_before = host.find(']', i);
    if (close_before != std::string_view::npos &&
        (open == std::string_view::npos || close_before < open))
      return InvalidArgumentError(quoted + ": ']' without '['");
    const std::string_view literal =
        host.substr(i, open == std::string_view::npos ? host.npos : open - i);
    for (auto& p : partial) p += literal;
    if (open == std::string_view::npos) break;
    const size_t close = host.find(']', open);
    if (close == std::string_view::npos) return InvalidArgumentError(quoted + ": '[' without ']'");
    const std::string_view group = host.substr(open + 1, close - open - 1);
    if (group.empty() || group.find('[') != std::string_view::npos)
      return InvalidArgumentError(quoted + ": bad bracket group '[" + std::string(group) + "]'");
    // The numbers of the group, as strings (with padding).
    std::vector<std::string> numbers;
    size_t j = 0;
    while (j <= group.size()) {
      size_t comma = group.find(',', j);
      if (comma == std::string_view::npos) comma = group.size();
      const std::string_view item = group.substr(j, comma - j);
      const size_t dash = item.find('-');
      const std::string_view lo = item.substr(0, dash);
      const std::string_view hi = dash == std::string_view::npos ? lo : item.substr(dash + 1);
      auto digits = [](std::string_view s) {
        return !s.empty() && s.size() <= 9 &&
               s.find_first_not_of("0123456789") == std::string_view::npos;
      };
      if (!digits(lo) || !digits(hi))
        return InvalidArgumentError(quoted + ": bad range '" + std::string(item) + "'");
      const int a = std::stoi(std::string(lo)), b = std::stoi(std::string(hi));
      if (b < a)
        return InvalidArgumentError(quoted + ": range '" + std::string(item) +
                                    "' ends below its start");
      if (static_cast<size_t>(b - a) + numbers.size() >= kMaxHosts)
        return InvalidArgumentError(quoted + ": more than " + std::to_string(kMaxHosts) + " hosts");
      for (int n = a; n <= b; ++n) {
        std::string s = std::to_string(n);
        if (s.size() < lo.size()) s.insert(0, lo.size() - s.size(), '0');
        numbers.push_back(std::move(s));
      }
      j = comma + 1;
    }
    if (partial.size() * numbers.size() > kMaxHosts)
      return InvalidArgumentError(quoted + ": more than " + std::to_string(kMaxHosts) + " hosts");
    std::vector<std::string> next;
    next.reserve(partial.size() * numbers.size());
    for (const auto& p : partial)
      for (const auto& n : numbers) next.push_back(p + n);
    partial = std::move(next);
    i = close + 1;
  }
  if (out.size() + partial.size() > kMaxHosts)
    return InvalidArgumentError(quoted + ": more than " + std::to_string(kMaxHosts) + " hosts");
  out.insert(out.end(), partial.begin(), partial.end());
  return OkStatus();
}

}  // namespace

StatusOr<std::vector<std::string>> ExpandSlurmNodelist(std::string_view nodelist) {
  if (nodelist.empty()) return InvalidArgumentError("the node list is empty");
  std::vector<std::string> out;
  // Split on commas outside brackets.
  int depth = 0;
  size_t start = 0;
  for (size_t i = 0; i <= nodelist.size(); ++i) {
    const char c = i < nodelist.size() ? nodelist[i] : ',';
    if (c == '[') ++depth;
    if (c == ']') --depth;
    if (depth < 0)
      return InvalidArgumentError("node list '" + std::string(nodelist) + "': ']' without '['");
    if (c == ',' && depth == 0) {
      DV_RETURN_IF_ERROR(ExpandHost(nodelist.substr(start, i - start), nodelist, out));
      start = i + 1;
    }
  }
  if (depth != 0)
    return InvalidArgumentError("node list '" + std::string(nodelist) + "': '[' without ']'");
  return out;
}

StatusOr<LauncherRank> RankFromEnvironment(const EnvLookup& env) {
  struct Source {
    const char* name;
    const char* rank;
    const char* size;
  };
  static constexpr Source kSources[] = {
      {"openmpi", "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE"},
      {"mpich", "PMI_RANK", "PMI_SIZE"},
      {"slurm", "SLURM_PROCID", "SLURM_NTASKS"},
  };
  for (const Source& s : kSources) {
    std::optional<std::string> rank_text = env(s.rank);
    if (!rank_text) continue;
    std::optional<std::string> size_text = env(s.size);
    if (!size_text)
      return InvalidArgumentError(std::string(s.rank) + " is set but " + s.size + " is not");
    LauncherRank r;
    r.source = s.name;
    DV_ASSIGN_OR_RETURN(r.rank, ParseNonNegative(s.rank, *rank_text));
    DV_ASSIGN_OR_RETURN(r.size, ParseNonNegative(s.size, *size_text));
    if (r.size < 1) return InvalidArgumentError(std::string(s.size) + " must be >= 1");
    if (r.rank >= r.size)
      return InvalidArgumentError(std::string(s.rank) + "=" + *rank_text + " is not below " +
                                  s.size + "=" + *size_text);
    if (r.source == "slurm") {
      std::optional<std::string> nodes = env("SLURM_JOB_NODELIST");
      if (!nodes) nodes = env("SLURM_STEP_NODELIST");
      if (nodes) {
        auto hosts = ExpandSlurmNodelist(*nodes);
        if (!hosts.ok()) return hosts.status().WithContext("SLURM_JOB_NODELIST");
        r.hosts = std::move(*hosts);
      }
    }
    return r;
  }
  return NotFoundError(
      "no launcher rank in the environment (tried OMPI_COMM_WORLD_RANK/OMPI_COMM_WORLD_SIZE, "
      "PMI_RANK/PMI_SIZE, SLURM_PROCID/SLURM_NTASKS): start the process with mpirun or srun, "
      "or give the role with flags");
}

StatusOr<TaskAssignment> AssignTask(const LauncherRank& rank, int num_ps) {
  if (num_ps < 1 || num_ps >= rank.size)
    return InvalidArgumentError("--num-ps " + std::to_string(num_ps) + " must be in [1, " +
                                std::to_string(rank.size) + ") for a job of " +
                                std::to_string(rank.size) +
                                " ranks (the first num-ps ranks serve, the rest work)");
  TaskAssignment t;
  t.num_ps = num_ps;
  t.num_workers = rank.size - num_ps;
  if (rank.rank < num_ps) {
    t.type = TaskType::kPs;
    t.index = rank.rank;
  } else {
    t.type = TaskType::kWorker;
    t.index = rank.rank - num_ps;
  }
  return t;
}

}  // namespace distval
