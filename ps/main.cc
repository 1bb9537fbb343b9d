// distval-ps: one parameter-server shard.
#include <signal.h>
#include <unistd.h>

#include <CLI/CLI.hpp>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <iostream>
#include <thread>

#include "distval/cluster_spec.h"
#include "distval/curve_keys.h"
#include "distval/http_endpoint.h"
#include "distval/launcher_env.h"
#include "distval/logging.h"
#include "distval/malloc_tuning.h"
#include "distval/metrics.h"
#include "distval/rendezvous.h"
#include "distval/shared_memory.h"
#include "distval/timeline.h"
#include "distval/transport.h"
#include "server.h"
#include "server_telemetry.h"

namespace {

sigset_t StopSignals() {
  sigset_t set;
  sigemptyset(&set);
  sigaddset(&set, SIGINT);
  sigaddset(&set, SIGTERM);
  return set;
}

// Stops the server from a thread that waits for SIGINT/SIGTERM. main() blocks
// them before any thread (ZeroMQ's included) exists, so only this one sees them.
void StopOnSignals(distval::ps::Server* server) {
  sigset_t set = StopSignals();
  std::thread([server, set] {
    int sig = 0;
    sigwait(&set, &sig);
    DV_LOG(kInfo) << "signal " << sig << ": stopping";
    server->Stop();
  }).detach();
}

}  // namespace

int main(int argc, char** argv) {
  using namespace distval;
  // Every pushed gradient arrives in a buffer ZeroMQ mallocs: keep freed
  // heap for reuse rather than faulting it in again (malloc_tuning.h).
  TuneMallocForLargeMessages();
  CLI::App app{
      "distval-ps: a parameter-server shard. Holds its share of the distributed variables, "
      "applies the optimizer to pushed gradients, and answers pulls under the job's "
      "consistency setting (BSP, SSP or async)."};
  app.get_formatter()->column_width(36);
  ps::ServerOptions opt;
  std::string port_file, staleness = "0", cluster_file, log_level = "info", log_format = "text";
  std::string metrics_address = "0.0.0.0", timeline_path, rendezvous_dir, advertise_host;
  int metrics_port = 0, num_ps = 0;
  bool from_env = false;
  double worker_timeout_s = 10, pull_deadline_s = 600;
  bool use_tf_config = false;
  app.add_option("--bind", opt.bind,
                 "ZeroMQ endpoint to listen on; port 0 lets the OS choose (see --port-file)")
      ->capture_default_str();
  app.add_option("--port-file", port_file,
                 "write the endpoint actually bound to this file (for launchers and tests)");
  app.add_option("--shard-index", opt.shard_index, "index of this shard, 0-based")
      ->capture_default_str();
  app.add_option("--num-shards", opt.num_shards, "number of shards in the job")
      ->capture_default_str();
  app.add_option("--num-workers", opt.num_workers, "number of workers in the job")
      ->capture_default_str();
  app.add_option("--staleness", staleness,
                 "consistency: 0 = synchronous (BSP), N > 0 = bounded staleness (SSP), "
                 "async = fully asynchronous")
      ->capture_default_str();
  app.add_flag("--stale-aware-lr", opt.stale_aware_lr,
               "async: scale the learning rate by 1 / (1 + staleness of the gradient)");
  app.add_option("--worker-timeout", worker_timeout_s,
                 "seconds of silence after which a worker is dropped from the live set")
      ->capture_default_str();
  app.add_option("--pull-timeout", pull_deadline_s,
                 "seconds a held pull may wait before it is answered DeadlineExceeded")
      ->capture_default_str();
  app.add_option("--threads", opt.threads,
                 "threads applying optimizer updates and checking whole gradients for NaN/Inf")
      ->capture_default_str();
  bool no_shared_memory = false;
  app.add_flag("--no-shared-memory", no_shared_memory,
               "never move tensors through shared memory with co-located workers (by default "
               "a worker on this host that offers it gets parameters and gradients through "
               "POSIX shared memory, ZeroMQ carrying only the headers)");
  std::string curve_secret, authorized_keys;
  app.add_option("--curve-secret", curve_secret,
                 "CURVE: this server's key pair (NAME.key_secret from distval-keygen); encrypts "
                 "the traffic and admits only clients listed in --authorized-keys (turns shared "
                 "memory off)");
  app.add_option("--authorized-keys", authorized_keys,
                 "CURVE: directory of the public keys (NAME.key files) of the admitted clients");
  app.add_option("--max-message-bytes", opt.max_message_bytes,
                 "largest request accepted (ZMQ_MAXMSGSIZE)")
      ->capture_default_str();
  app.add_option("--max-frames", opt.max_frames, "most payload frames in one request")
      ->capture_default_str();
  app.add_option("--max-variables", opt.max_variables,
                 "most variables this shard holds, and most updates/reads in one request")
      ->capture_default_str();
  app.add_option("--max-variable-bytes", opt.max_variable_bytes,
                 "largest variable shard (parameter bytes) a create request may ask for; "
                 "0: no limit")
      ->capture_default_str();
  std::string nan_policy = "reject";
  app.add_option("--nan-policy", nan_policy,
                 "gradients with NaN/Inf: reject (error reply, nothing applied), skip (drop "
                 "those variables' updates, apply the rest) or allow")
      ->capture_default_str();
  std::string checkpoint_every;
  app.add_option("--checkpoint-dir", opt.checkpoint_dir,
                 "directory of this job's checkpoints (ckpt-<clock>/ per checkpoint)");
  app.add_option("--checkpoint-every", checkpoint_every,
                 "write a checkpoint every N clocks, or every N seconds with Ns (e.g. 30s); "
                 "needs --checkpoint-dir");
  app.add_option("--keep", opt.keep_checkpoints, "keep the newest K checkpoints (0: keep all)")
      ->capture_default_str();
  app.add_option("--restore", opt.restore,
                 "load this checkpoint directory (or 'latest' under --checkpoint-dir) before "
                 "serving; the server refuses to start when it does not verify");
  app.add_option("--cluster", cluster_file,
                 "JSON cluster file (TF_CONFIG format); gives the shard endpoints and counts");
  app.add_flag("--tf-config", use_tf_config,
               "take the cluster and this task from the TF_CONFIG environment variable (also "
               "the default when TF_CONFIG is set and no --cluster/--shard-index/--num-shards "
               "is given)");
  app.add_option("--log-level", log_level, "debug, info, warning or error")->capture_default_str();
  app.add_option("--log-format", log_format, "text or json")->capture_default_str();
  app.add_option("--metrics-port", metrics_port,
                 "serve GET /metrics (Prometheus text) and GET /healthz on this HTTP port "
                 "(0: off)")
      ->check(CLI::Range(0, 65535))
      ->capture_default_str();
  app.add_option("--metrics-address", metrics_address, "address the metrics endpoint listens on")
      ->capture_default_str();
  app.add_option("--timeline", timeline_path,
                 "write a Chrome trace (chrome://tracing, Perfetto) of pulls and applies here");
  app.add_flag("--from-env", from_env,
               "take this shard's index and the job's size from the launcher (mpirun: "
               "OMPI_COMM_WORLD_RANK/SIZE or PMI_RANK/SIZE; srun: SLURM_PROCID/NTASKS) with "
               "--num-ps: ranks below it serve, the rest work");
  app.add_option("--num-ps", num_ps, "with --from-env: the number of parameter servers");
  app.add_option("--rendezvous", rendezvous_dir,
                 "publish the bound endpoint as DIR/ps-<index>.endpoint for workers to find "
                 "(a directory every process of the job can read; fresh per job)");
  app.add_option("--advertise-host", advertise_host,
                 "with --rendezvous and a wildcard --bind (tcp://*:P, tcp://0.0.0.0:P): the "
                 "host workers should connect to (default: this machine's host name)");
  CLI11_PARSE(app, argc, argv);

  auto level = ParseLogLevel(log_level);
  if (!level.ok()) {
    std::cerr << "distval-ps: --log-level: " << level.status().message() << "\n";
    return 2;
  }
  if (log_format != "text" && log_format != "json") {
    std::cerr << "distval-ps: --log-format must be text or json, not '" << log_format << "'\n";
    return 2;
  }

  // --from-env: the launcher's rank decides the shard.
  std::optional<LauncherRank> launcher;
  if (from_env) {
    auto rank = RankFromEnvironment([](const char* name) -> std::optional<std::string> {
      const char* v = std::getenv(name);
      return v ? std::optional<std::string>(v) : std::nullopt;
    });
    if (!rank.ok()) {
      std::cerr << "distval-ps: --from-env: " << rank.status().message() << "\n";
      return 2;
    }
    auto task = AssignTask(*rank, num_ps);
    if (!task.ok()) {
      std::cerr << "distval-ps: --from-env: " << task.status().message() << "\n";
      return 2;
    }
    if (task->type != TaskType::kPs) {
      std::cerr << "distval-ps: --from-env: rank " << rank->rank << " of " << rank->size
                << " is worker " << task->index << " under --num-ps " << num_ps << " (ranks 0.."
                << num_ps - 1 << " serve); start a worker there, or use "
                << "distval-rank\n";
      return 2;
    }
    opt.shard_index = task->index;
    opt.num_shards = task->num_ps;
    opt.num_workers = task->num_workers;
    launcher = *rank;
  }

  // The cluster file or TF_CONFIG, when given, fix the endpoints and counts.
  std::optional<ClusterSpec> cluster;
  if (from_env) {
    // Taken from the launcher above.
  } else if (!cluster_file.empty()) {
    auto c = ClusterSpecFromFile(cluster_file);
    if (!c.ok()) {
      std::cerr << "distval-ps: " << c.status().message() << "\n";
      return 2;
    }
    cluster = *c;
  } else if (use_tf_config || (std::getenv("TF_CONFIG") != nullptr && !app.count("--shard-index") &&
                               !app.count("--num-shards"))) {
    const char* tf = std::getenv("TF_CONFIG");
    if (tf == nullptr) {
      std::cerr << "distval-ps: --tf-config given but TF_CONFIG is not set\n";
      return 2;
    }
    auto c = ClusterSpecFromTfConfig(tf);
    if (!c.ok()) {
      std::cerr << "distval-ps: " << c.status().message() << "\n";
      return 2;
    }
    cluster = *c;
  }
  if (cluster) {
    if (app.count("--shard-index")) {
      auto with = cluster->WithTask(TaskType::kPs, opt.shard_index);
      if (!with.ok()) {
        std::cerr << "distval-ps: " << with.status().message() << "\n";
        return 2;
      }
      cluster = *with;
    }
    if (!cluster->is_ps()) {
      std::cerr << "distval-ps: the cluster spec does not make this task a ps ("
                << cluster->ToString() << "); pass --shard-index\n";
      return 2;
    }
    opt.shard_index = cluster->task_index();
    opt.num_shards = cluster->num_ps();
    opt.num_workers = cluster->num_workers();
    // Listen on the address the cluster spec gives this shard.
    if (!app.count("--bind")) opt.bind = cluster->ps_endpoint(opt.shard_index);
  }
  ConfigureLogging({*level, "ps:" + std::to_string(opt.shard_index), log_format == "json"});

  auto st = ps::ParseStaleness(staleness);
  if (!st.ok()) {
    std::cerr << "distval-ps: --staleness: " << st.status().message() << "\n";
    return 2;
  }
  opt.staleness = *st;
  opt.shared_memory = !no_shared_memory;
  if (curve_secret.empty() != authorized_keys.empty()) {
    std::cerr << "distval-ps: --curve-secret and --authorized-keys go together\n";
    return 2;
  }
  if (!curve_secret.empty()) {
    auto pair = ReadCurveSecretKeyFile(curve_secret);
    if (!pair.ok()) {
      std::cerr << "distval-ps: --curve-secret: " << pair.status().message() << "\n";
      return 2;
    }
    auto keys = ReadAuthorizedKeysDir(authorized_keys);
    if (!keys.ok()) {
      std::cerr << "distval-ps: --authorized-keys: " << keys.status().message() << "\n";
      return 2;
    }
    opt.curve_secret_key = pair->secret_key;
    opt.curve_authorized_keys = std::move(*keys);
    opt.shared_memory = false;  // tensors must not bypass the authenticated connection
  }
  if (auto np = ps::ParseNanPolicy(nan_policy); np.ok()) {
    opt.nan_policy = *np;
  } else {
    std::cerr << "distval-ps: --nan-policy: " << np.status().message() << "\n";
    return 2;
  }
  if (!checkpoint_every.empty()) {
    Status ce = ps::ParseCheckpointEvery(checkpoint_every, &opt);
    if (!ce.ok() || opt.checkpoint_dir.empty() || opt.keep_checkpoints < 0) {
      std::cerr << "distval-ps: --checkpoint-every: "
                << (ce.ok() ? "needs --checkpoint-dir and --keep >= 0" : ce.message()) << "\n";
      return 2;
    }
  }
  // Shared-memory segments left in /dev/shm by crashed distval processes.
  if (int stale = transport::RemoveStaleSharedSegments(); stale > 0) {
    DV_LOG(kInfo) << "removed " << stale << " stale shared-memory segment(s)";
  }
  if (worker_timeout_s <= 0 || pull_deadline_s <= 0) {
    std::cerr << "distval-ps: --worker-timeout and --pull-timeout must be > 0\n";
    return 2;
  }
  opt.worker_timeout = std::chrono::milliseconds(static_cast<int64_t>(worker_timeout_s * 1000));
  opt.pull_deadline = std::chrono::milliseconds(static_cast<int64_t>(pull_deadline_s * 1000));

  sigset_t signals = StopSignals();
  pthread_sigmask(SIG_BLOCK, &signals, nullptr);

  // Metrics and timeline (before the server, which borrows them).
  MetricRegistry registry;
  std::unique_ptr<Timeline> timeline;
  if (!timeline_path.empty()) {
    auto t = Timeline::Open(timeline_path, "ps " + std::to_string(opt.shard_index));
    if (!t.ok()) {
      std::cerr << "distval-ps: --timeline: " << t.status().message() << "\n";
      return 2;
    }
    timeline = std::move(*t);
  }
  auto telemetry = ps::ServerTelemetry::Create(metrics_port > 0 ? &registry : nullptr,
                                               timeline.get(), opt.shard_index, opt.num_workers);
  if (!telemetry.ok()) {
    std::cerr << "distval-ps: " << telemetry.status() << "\n";
    return 1;
  }
  if (metrics_port > 0 || timeline) opt.telemetry = telemetry->get();

  auto server = ps::Server::Create(opt);
  if (!server.ok()) {
    std::cerr << "distval-ps: " << server.status() << "\n";
    return 1;
  }
  std::unique_ptr<HttpEndpoint> http;
  if (metrics_port > 0) {
    ps::ServerTelemetry* t = telemetry->get();
    auto h = HttpEndpoint::Start({metrics_address, metrics_port}, &registry,
                                 [t] { return t->Health(); });
    if (!h.ok()) {
      std::cerr << "distval-ps: --metrics-port: " << h.status().message() << "\n";
      return 1;
    }
    http = std::move(*h);
  }
  std::string advertised = (*server)->endpoint();
  if (!rendezvous_dir.empty()) {
    if (advertise_host.empty()) {
      char host[256] = {};
      if (gethostname(host, sizeof(host) - 1) == 0) advertise_host = host;
    }
    auto a = AdvertisedEndpoint((*server)->endpoint(), advertise_host);
    Status ps = a.ok() ? PublishEndpoint(rendezvous_dir, opt.shard_index, *a) : a.status();
    if (!ps.ok()) {
      std::cerr << "distval-ps: --rendezvous: " << ps.message() << "\n";
      return 1;
    }
    advertised = *a;
  }
  DV_LOG(kInfo) << "distval-ps role=ps index=" << opt.shard_index
                << " num_shards=" << opt.num_shards << " endpoint=" << (*server)->endpoint()
                << " num_workers=" << opt.num_workers
                << " staleness=" << ps::StalenessName(opt.staleness)
                << " stale_aware_lr=" << (opt.stale_aware_lr ? "on" : "off")
                << " worker_timeout_s=" << worker_timeout_s << " pull_timeout_s=" << pull_deadline_s
                << " threads=" << opt.threads << " curve="
                << (opt.curve_secret_key.empty()
                        ? std::string("off")
                        : "on (" + std::to_string(opt.curve_authorized_keys.size()) +
                              " authorized keys, shared memory off)")
                << " metrics="
                << (http ? "http://" + metrics_address + ":" + std::to_string(http->port()) +
                               "/metrics"
                         : std::string("off"))
                << " timeline=" << (timeline ? timeline_path : std::string("off")) << " launcher="
                << (launcher ? launcher->source + ":" + std::to_string(launcher->rank) + "/" +
                                   std::to_string(launcher->size)
                             : std::string("none"))
                << " rendezvous="
                << (rendezvous_dir.empty() ? std::string("none")
                                           : rendezvous_dir + " (published " + advertised + ")");
  if (opt.curve_secret_key.empty() && !transport::IsLocalEndpoint((*server)->endpoint())) {
    DV_LOG(kWarning) << "listening on " << (*server)->endpoint()
                     << " without CURVE: anyone who can reach it may read and change the "
                        "parameters (see --curve-secret)";
  }
  if (!port_file.empty()) {
    std::string tmp = port_file + ".tmp";
    {
      std::ofstream f(tmp);
      f << (*server)->endpoint() << "\n";
      if (!f) {
        std::cerr << "distval-ps: cannot write --port-file " << port_file << "\n";
        return 1;
      }
    }
    if (std::rename(tmp.c_str(), port_file.c_str()) != 0) {
      std::cerr << "distval-ps: cannot write --port-file " << port_file << "\n";
      return 1;
    }
  }
  StopOnSignals(server->get());
  Status s = (*server)->Run();
  if (timeline) {
    Status ts = timeline->Close();
    if (!ts.ok()) DV_LOG(kError) << "--timeline: " << ts;
  }
  if (!s.ok()) {
    DV_LOG(kError) << "server stopped: " << s;
    return 1;
  }
  DV_LOG(kInfo) << "stopped";
  return 0;
}
