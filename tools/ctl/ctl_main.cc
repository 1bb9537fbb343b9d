// distval-ctl: operator commands for a running distval job, sent to every
// parameter-server shard as a control client (it has no clock and is never
// waited for).
//
//   distval-ctl --ps tcp://h:p[,tcp://h:p...] status
//   distval-ctl --cluster cluster.json checkpoint [--dir DIR]
//   distval-ctl --ps ... set-staleness 0|N|async [--variable NAME] [--at-clock C]
//   distval-ctl --ps ... set-lr VARIABLE|all VALUE
//   distval-ctl --ps ... shutdown [--no-checkpoint]
//
// Exit status: 0 on success, 1 when a shard refused or did not answer (the
// message names it), 2 for bad arguments.
#include <CLI/CLI.hpp>
#include <algorithm>
#include <cstdio>
#include <iostream>
#include <sstream>

#include "distval/client.h"
#include "distval/cluster_spec.h"
#include "distval/curve_keys.h"

namespace {

using namespace distval;

std::vector<std::string> Split(const std::string& s) {
  std::vector<std::string> out;
  std::stringstream in(s);
  std::string part;
  while (std::getline(in, part, ','))
    if (!part.empty()) out.push_back(part);
  return out;
}

std::string StalenessText(int32_t s) {
  if (s < 0) return "async";
  if (s == 0) return "bsp";
  return "ssp:" + std::to_string(s);
}

StatusOr<int32_t> ParseStalenessArg(const std::string& t) {
  if (t == "async") return protocol::kStalenessAsync;
  if (t == "bsp" || t == "sync") return 0;
  if (!t.empty() && t.size() <= 9 && std::all_of(t.begin(), t.end(), ::isdigit))
    return static_cast<int32_t>(std::stol(t));
  return InvalidArgumentError("staleness '" + t + "' is not 0 (BSP), N > 0 (SSP) or async");
}

int Fail(const Status& s) {
  std::cerr << "distval-ctl: " << s << "\n";
  return 1;
}

void PrintStatus(const std::vector<protocol::StatsReply>& shards) {
  std::printf("%zu shard(s)\n", shards.size());
  for (const auto& s : shards) {
    std::printf("shard %d: staleness %s, last checkpoint %s\n", s.shard_index,
                StalenessText(s.staleness).c_str(),
                s.last_checkpoint.empty() ? "(none)" : s.last_checkpoint.c_str());
    std::printf("  nan/inf updates refused or skipped: %llu\n",
                static_cast<unsigned long long>(s.nan_updates));
    int live = 0;
    for (const auto& w : s.workers) live += w.live;
    std::printf("  workers: %d live of %zu\n", live, s.workers.size());
    for (const auto& w : s.workers)
      std::printf("    worker %d clock %lld %s\n", w.worker_id, static_cast<long long>(w.clock),
                  w.live ? "live" : "dropped");
    std::printf("  variables: %zu\n", s.variables.size());
    for (const auto& v : s.variables)
      std::printf("    %s rows [%lld, %lld) %llu bytes version %llu lr %g\n", v.name.c_str(),
                  static_cast<long long>(v.rows.begin), static_cast<long long>(v.rows.end),
                  static_cast<unsigned long long>(v.bytes),
                  static_cast<unsigned long long>(v.version), v.learning_rate);
  }
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"distval-ctl: status and control of a running distval job"};
  app.require_subcommand(1);
  std::string ps, cluster_file;
  double timeout_s = 30;
  app.add_option("--ps", ps, "comma-separated endpoints of the shards, in shard order");
  app.add_option("--cluster", cluster_file, "JSON cluster file (TF_CONFIG format)");
  app.add_option("--timeout", timeout_s, "seconds to wait for the shards")->capture_default_str();
  std::string curve_secret, server_key;
  app.add_option("--curve-secret", curve_secret,
                 "CURVE: this client's key pair (NAME.key_secret from distval-keygen)");
  app.add_option("--server-key", server_key, "CURVE: the servers' public key file (NAME.key)");

  auto* status_cmd = app.add_subcommand("status",
                                        "shards, variables, workers and their clocks, "
                                        "staleness, last checkpoint");
  std::string dir;
  auto* ckpt_cmd = app.add_subcommand("checkpoint", "write a checkpoint now");
  ckpt_cmd->add_option("--dir", dir, "checkpoint root (default: each server's --checkpoint-dir)");
  std::string staleness, variable;
  int64_t at_clock = -1;
  auto* stale_cmd = app.add_subcommand("set-staleness", "change the staleness bound");
  stale_cmd->add_option("value", staleness, "0 (BSP), N > 0 (SSP) or async")->required();
  stale_cmd->add_option("--variable", variable, "only this variable (default: the job)");
  stale_cmd->add_option("--at-clock", at_clock, "from this clock (default: the next one)");
  std::string lr_variable;
  double lr = 0;
  auto* lr_cmd = app.add_subcommand("set-lr", "change a learning rate on the servers");
  lr_cmd->add_option("variable", lr_variable, "a variable name, or all")->required();
  lr_cmd->add_option("value", lr, "the new learning rate")->required();
  bool no_checkpoint = false;
  auto* shutdown_cmd = app.add_subcommand(
      "shutdown", "stop the servers (each checkpoints first when it has a --checkpoint-dir)");
  shutdown_cmd->add_flag("--no-checkpoint", no_checkpoint, "stop without a checkpoint");
  CLI11_PARSE(app, argc, argv);

  ClientOptions o;
  o.role = protocol::Role::kControl;
  o.shared_memory = false;
  auto curve = ReadCurveClientKeys(curve_secret, server_key);
  if (!curve.ok()) {
    std::cerr << "distval-ctl: " << curve.status().message() << "\n";
    return 2;
  }
  if (*curve) {
    o.curve_public_key = (*curve)->own.public_key;
    o.curve_secret_key = (*curve)->own.secret_key;
    o.curve_server_key = (*curve)->server_public_key;
  }
  if (!cluster_file.empty()) {
    auto c = ClusterSpecFromFile(cluster_file);
    if (!c.ok()) {
      std::cerr << "distval-ctl: " << c.status().message() << "\n";
      return 2;
    }
    o.ps_endpoints = c->ps_endpoints();
  } else {
    o.ps_endpoints = Split(ps);
  }
  if (o.ps_endpoints.empty()) {
    std::cerr << "distval-ctl: give the shards with --ps or --cluster\n";
    return 2;
  }
  const auto timeout = std::chrono::milliseconds(static_cast<int64_t>(timeout_s * 1000));
  o.connect_timeout = timeout;
  o.request_timeout = timeout;
  auto client = Client::Connect(o);
  if (!client.ok()) return Fail(client.status());
  Client& c = **client;

  if (*status_cmd) {
    auto stats = c.Stats();
    if (!stats.ok()) return Fail(stats.status());
    PrintStatus(*stats);
  } else if (*ckpt_cmd) {
    auto written = c.Checkpoint(dir);
    if (!written.ok()) return Fail(written.status());
    for (size_t i = 0; i < written->size(); ++i)
      std::printf("shard %zu: checkpoint at clock %lld in %s\n", i,
                  static_cast<long long>((*written)[i].clock), (*written)[i].path.c_str());
  } else if (*stale_cmd) {
    auto s = ParseStalenessArg(staleness);
    if (!s.ok()) {
      std::cerr << "distval-ctl: " << s.status().message() << "\n";
      return 2;
    }
    Status st = c.SetStaleness(*s, variable, false, at_clock);
    if (!st.ok()) return Fail(st);
    std::printf("staleness of %s set to %s\n",
                variable.empty() ? "the job" : ("'" + variable + "'").c_str(),
                StalenessText(*s).c_str());
  } else if (*lr_cmd) {
    Status st = c.SetLearningRate(lr, lr_variable == "all" ? "" : lr_variable);
    if (!st.ok()) return Fail(st);
    std::printf("learning rate of %s set to %g\n",
                lr_variable == "all" ? "every variable" : ("'" + lr_variable + "'").c_str(), lr);
  } else if (*shutdown_cmd) {
    Status st = c.ShutdownServers(!no_checkpoint);
    if (!st.ok()) return Fail(st);
    std::printf("shutdown requested from %zu shard(s)\n", o.ps_endpoints.size());
  }
  return 0;
}
