// distval-worker: trains a built-in model (mlp, logreg) on Fashion-MNIST
// against the parameter servers, or in one process with --local.
#include <unistd.h>

#include <CLI/CLI.hpp>
#include <cstdlib>
#include <iostream>
#include <sstream>
#include <string>
#include <vector>

#include "classifier_trainer.h"
#include "distval/cluster_spec.h"
#include "distval/curve_keys.h"
#include "distval/dataset.h"
#include "distval/http_endpoint.h"
#include "distval/launcher_env.h"
#include "distval/local_parameter_store.h"
#include "distval/logging.h"
#include "distval/metrics.h"
#include "distval/parameter_server_strategy.h"
#include "distval/protocol.h"
#include "distval/rendezvous.h"
#include "distval/timeline.h"
#include "distval/worker_telemetry.h"

namespace {

using namespace distval;

// Exit codes: 0 done, 1 failed while running, 2 bad settings.
constexpr int kRuntimeError = 1;
constexpr int kUsageError = 2;

int Fail(int code, const std::string& message) {
  std::cerr << "distval-worker: " << message << "\n";
  return code;
}

std::vector<std::string> SplitList(const std::string& text) {
  std::vector<std::string> out;
  std::stringstream ss(text);
  std::string item;
  while (std::getline(ss, item, ',')) {
    const size_t b = item.find_first_not_of(" \t");
    const size_t e = item.find_last_not_of(" \t");
    out.push_back(b == std::string::npos ? "" : item.substr(b, e - b + 1));
  }
  if (out.empty()) out.push_back("");
  return out;
}

// "0" -> 0 (BSP), "N" -> N (SSP), "async" -> kStalenessAsync.
StatusOr<int32_t> ParseStaleness(const std::string& text) {
  if (text == "async") return protocol::kStalenessAsync;
  if (!text.empty() && text.find_first_not_of("0123456789") == std::string::npos &&
      text.size() < 10)
    return static_cast<int32_t>(std::stoi(text));
  return InvalidArgumentError("--staleness must be 0 (BSP), a positive N (SSP) or async, not '" +
                              text + "'");
}

std::string ModeName(int32_t staleness) {
  if (staleness == protocol::kStalenessAsync) return "async";
  if (staleness == 0) return "bsp";
  return "ssp:" + std::to_string(staleness);
}

StatusOr<protocol::OptimizerSpec> MakeOptimizer(const std::string& name, double lr) {
  protocol::OptimizerSpec spec;
  DV_ASSIGN_OR_RETURN(spec.kind, protocol::ParseOptimizerKind(name));
  double default_lr = 0.01;
  switch (spec.kind) {
    case protocol::OptimizerKind::kSgd:
      default_lr = 0.1;
      break;
    case protocol::OptimizerKind::kMomentum:
      default_lr = 0.01;
      spec.momentum = 0.9;
      break;
    case protocol::OptimizerKind::kAdagrad:
      default_lr = 0.05;
      break;
    case protocol::OptimizerKind::kAdam:
      default_lr = 0.001;
      break;
    case protocol::OptimizerKind::kAdamW:
      default_lr = 0.001;
      spec.weight_decay = 0.004;
      break;
  }
  spec.learning_rate = lr > 0 ? lr : default_lr;
  return spec;
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{
      "distval-worker: trains a built-in model on Fashion-MNIST with the parameter servers "
      "(one pull and one push per step; the servers run the optimizer), or in one process "
      "with --local (the baseline)."};
  app.get_formatter()->column_width(40);
  std::string model = "mlp", data_dir(kDefaultFashionMnistDir), optimizer = "momentum";
  std::string devices = "cpu:0", staleness_text = "0", ps, cluster_file, log_level = "info";
  std::string summary_json, metrics_out, save_path, log_format = "text";
  std::string metrics_address = "0.0.0.0", timeline_path, rendezvous_dir;
  int metrics_port = 0, num_ps = 0;
  double rendezvous_timeout_s = 300;
  bool from_env = false;
  int epochs = 1, global_batch = 64, worker_index = 0, num_workers = 1;
  double lr = 0, slowdown = 1.0;
  uint64_t seed = 1;
  int64_t train_limit = -1;
  bool local = false, use_tf_config = false;
  app.add_option("--model", model, "mlp (784-256-128-10, ReLU) or logreg (784-10)")
      ->check(CLI::IsMember({"mlp", "logreg"}))
      ->capture_default_str();
  app.add_option("--data", data_dir, "directory with the Fashion-MNIST IDX files")
      ->capture_default_str();
  app.add_option("--epochs", epochs, "passes over the training data")
      ->check(CLI::PositiveNumber)
      ->capture_default_str();
  app.add_option("--global-batch", global_batch,
                 "examples per step across all replicas of all workers")
      ->check(CLI::PositiveNumber)
      ->capture_default_str();
  app.add_option("--lr", lr,
                 "learning rate (default per optimizer: sgd 0.1, momentum 0.01, adagrad 0.05, "
                 "adam 0.001, adamw 0.001)");
  app.add_option("--optimizer", optimizer,
                 "server-side optimizer: sgd, momentum (0.9), adam, adamw (weight decay "
                 "0.004), adagrad")
      ->check(CLI::IsMember({"sgd", "momentum", "adam", "adamw", "adagrad"}))
      ->capture_default_str();
  app.add_option("--devices", devices,
                 "comma-separated local devices, one replica each "
                 "(cpu:N, cuda:N)")
      ->capture_default_str();
  app.add_option("--staleness", staleness_text,
                 "consistency this worker expects: 0 (BSP), N (SSP) or async; the servers "
                 "refuse a worker whose setting differs from theirs")
      ->capture_default_str();
  app.add_option("--seed", seed, "seed of the initial values and the data order")
      ->capture_default_str();
  app.add_option("--train-limit", train_limit, "use only the first N training examples");
  app.add_option("--ps", ps, "comma-separated parameter-server endpoints (host:port or tcp://...)");
  app.add_option("--worker-index", worker_index, "this worker's index, 0-based")
      ->capture_default_str();
  app.add_option("--num-workers", num_workers, "number of workers in the job")
      ->capture_default_str();
  app.add_option("--cluster", cluster_file, "JSON cluster file (TF_CONFIG format)");
  app.add_flag("--tf-config", use_tf_config,
               "take the cluster and this task from the TF_CONFIG environment variable");
  app.add_flag("--local", local,
               "train in this process without parameter servers (same strategy, same "
               "optimizer code): the baseline");
  app.add_option("--summary-json", summary_json, "write a JSON summary here at the end");
  app.add_option("--metrics-out", metrics_out, "write one JSON line per step and per epoch here");
  app.add_option("--save", save_path,
                 "after training, save the model to this directory (model.json and "
                 "variables.safetensors; worker 0 and --local save, other workers skip)");
  app.add_option("--slowdown", slowdown,
                 "straggler simulation: each step's compute takes this factor longer (>= 1)")
      ->check(CLI::Range(1.0, 1000.0))
      ->capture_default_str();
  app.add_option("--log-level", log_level, "debug, info, warning or error")->capture_default_str();
  app.add_option("--log-format", log_format, "text or json")
      ->check(CLI::IsMember({"text", "json"}))
      ->capture_default_str();
  app.add_option("--metrics-port", metrics_port,
                 "serve GET /metrics (Prometheus text) and GET /healthz on this HTTP port "
                 "(0: off)")
      ->check(CLI::Range(0, 65535))
      ->capture_default_str();
  app.add_option("--metrics-address", metrics_address, "address the metrics endpoint listens on")
      ->capture_default_str();
  app.add_option("--timeline", timeline_path,
                 "write a Chrome trace (chrome://tracing, Perfetto) of every step here: pull, "
                 "compute, blocked, reduce, push per replica, requests per server");
  app.add_flag("--from-env", from_env,
               "take this worker's index and the job's size from the launcher (mpirun: "
               "OMPI_COMM_WORLD_RANK/SIZE or PMI_RANK/SIZE; srun: SLURM_PROCID/NTASKS) with "
               "--num-ps: ranks below it serve, the rest work");
  app.add_option("--num-ps", num_ps,
                 "with --from-env or --rendezvous: the number of parameter servers");
  app.add_option("--rendezvous", rendezvous_dir,
                 "wait for the servers' endpoints in DIR/ps-<i>.endpoint (see distval-ps "
                 "--rendezvous) instead of --ps");
  app.add_option("--rendezvous-timeout", rendezvous_timeout_s,
                 "seconds to wait for every server to publish its endpoint")
      ->capture_default_str();
  double retry_timeout_s = 60, request_timeout_s = 120;
  app.add_option("--retry-timeout", retry_timeout_s,
                 "seconds to keep reconnecting to a parameter server whose connection dropped "
                 "(capped exponential backoff); requests wait and are resent once it is back "
                 "(a server restarted with --restore rolls the job back to its checkpoint)")
      ->capture_default_str();
  app.add_option("--request-timeout", request_timeout_s,
                 "seconds a pull or push may wait for its reply (BSP waits for the slowest "
                 "worker; a hit is DeadlineExceeded naming the server)")
      ->capture_default_str();
  std::string curve_secret, server_key;
  app.add_option("--curve-secret", curve_secret,
                 "CURVE: this worker's key pair (NAME.key_secret from distval-keygen); needs "
                 "--server-key, and the servers' --authorized-keys must list its NAME.key");
  app.add_option("--server-key", server_key, "CURVE: the servers' public key file (NAME.key)");
  CLI11_PARSE(app, argc, argv);

  auto level = ParseLogLevel(log_level);
  if (!level.ok()) return Fail(kUsageError, "--log-level: " + level.status().message());
  ConfigureLogging({*level, "worker", log_format == "json"});

  // ---- Launcher rank (--from-env) and rendezvous (--rendezvous).
  std::string launcher = "none";
  if (from_env) {
    if (local) return Fail(kUsageError, "--from-env and --local exclude each other");
    auto rank = RankFromEnvironment([](const char* name) -> std::optional<std::string> {
      const char* v = std::getenv(name);
      return v ? std::optional<std::string>(v) : std::nullopt;
    });
    if (!rank.ok()) return Fail(kUsageError, "--from-env: " + rank.status().message());
    auto task = AssignTask(*rank, num_ps);
    if (!task.ok()) return Fail(kUsageError, "--from-env: " + task.status().message());
    if (task->type != TaskType::kWorker)
      return Fail(kUsageError, "--from-env: rank " + std::to_string(rank->rank) + " of " +
                                   std::to_string(rank->size) + " is parameter server " +
                                   std::to_string(task->index) + " under --num-ps " +
                                   std::to_string(num_ps) +
                                   " (start distval-ps there, or use distval-rank)");
    worker_index = task->index;
    num_workers = task->num_workers;
    launcher = rank->source + ":" + std::to_string(rank->rank) + "/" + std::to_string(rank->size);
    if (rendezvous_dir.empty() && ps.empty())
      return Fail(kUsageError, "--from-env needs --rendezvous DIR or --ps ENDPOINTS");
    if (!cluster_file.empty() || use_tf_config)
      return Fail(kUsageError, "--from-env excludes --cluster and --tf-config");
    if (rendezvous_dir.empty() && static_cast<int>(SplitList(ps).size()) != num_ps)
      return Fail(kUsageError, "--from-env: --ps lists " + std::to_string(SplitList(ps).size()) +
                                   " endpoint(s) but --num-ps is " + std::to_string(num_ps));
  }
  if (!rendezvous_dir.empty() && !local) {
    if (num_ps < 1) return Fail(kUsageError, "--rendezvous needs --num-ps N");
    ConfigureLogging({*level, "worker:" + std::to_string(worker_index), log_format == "json"});
    auto endpoints = WaitForEndpoints(
        rendezvous_dir, num_ps,
        std::chrono::milliseconds(static_cast<int64_t>(rendezvous_timeout_s * 1000)),
        [&](const std::vector<int>& missing, std::chrono::seconds waited) {
          std::string who;
          for (int i : missing)
            who += (who.empty() ? "" : ", ") + std::string("ps ") + std::to_string(i) + " (" +
                   RendezvousPath(rendezvous_dir, i) + ")";
          DV_LOG(kInfo) << "waiting for " << who << " for " << waited.count()
                        << " s (giving up after " << rendezvous_timeout_s << " s)";
        });
    if (!endpoints.ok())
      return Fail(kRuntimeError, "--rendezvous: " + endpoints.status().message());
    ps.clear();
    for (const auto& e : *endpoints) ps += (ps.empty() ? "" : ",") + e;
  }

  // ---- Cluster and settings.
  auto staleness = ParseStaleness(staleness_text);
  if (!staleness.ok()) return Fail(kUsageError, staleness.status().message());
  auto opt_spec = MakeOptimizer(optimizer, lr);
  if (!opt_spec.ok()) return Fail(kUsageError, "--optimizer: " + opt_spec.status().message());

  WorkerOptions wo;
  wo.devices = SplitList(devices);
  wo.global_batch_size = global_batch;
  wo.optimizer = *opt_spec;
  wo.staleness = *staleness;
  std::string mode = local ? "local" : ModeName(*staleness);
  if (!local) {
    StatusOr<ClusterSpec> cluster = InvalidArgumentError(
        "no parameter servers: give --ps ENDPOINTS, --cluster FILE or --tf-config (or --local)");
    if (!cluster_file.empty()) {
      cluster = ClusterSpecFromFile(cluster_file);
      if (cluster.ok() && app.count("--worker-index"))
        cluster = cluster->WithTask(TaskType::kWorker, worker_index);
    } else if (use_tf_config) {
      const char* tf = std::getenv("TF_CONFIG");
      if (tf == nullptr) return Fail(kUsageError, "--tf-config given but TF_CONFIG is not set");
      cluster = ClusterSpecFromTfConfig(tf);
    } else if (!ps.empty()) {
      cluster = ClusterSpec::Make(SplitList(ps), num_workers);
      if (cluster.ok()) cluster = cluster->WithTask(TaskType::kWorker, worker_index);
    }
    if (!cluster.ok()) return Fail(kUsageError, cluster.status().message());
    if (!cluster->is_worker())
      return Fail(kUsageError, "the cluster spec does not make this task a worker (" +
                                   cluster->ToString() + "); pass --worker-index");
    Status s = wo.SetCluster(*cluster);
    if (!s.ok()) return Fail(kUsageError, s.message());
  }
  ConfigureLogging({*level, "worker:" + std::to_string(wo.worker_index), log_format == "json"});
  if (!(retry_timeout_s >= 0) || !(request_timeout_s > 0))
    return Fail(kUsageError, "--retry-timeout must be >= 0 and --request-timeout > 0");
  wo.client.retry_timeout = std::chrono::milliseconds(static_cast<int64_t>(retry_timeout_s * 1000));
  wo.client.request_timeout =
      std::chrono::milliseconds(static_cast<int64_t>(request_timeout_s * 1000));
  auto curve = ReadCurveClientKeys(curve_secret, server_key);
  if (!curve.ok()) return Fail(kUsageError, curve.status().message());
  if (*curve) {
    wo.client.curve_public_key = (*curve)->own.public_key;
    wo.client.curve_secret_key = (*curve)->own.secret_key;
    wo.client.curve_server_key = (*curve)->server_public_key;
  }

  // ---- Metrics and timeline (borrowed by the strategy: declared before it).
  MetricRegistry registry;
  std::unique_ptr<Timeline> timeline;
  if (!timeline_path.empty()) {
    auto t = Timeline::Open(timeline_path, "worker " + std::to_string(wo.worker_index));
    if (!t.ok()) return Fail(kUsageError, "--timeline: " + t.status().message());
    timeline = std::move(*t);
  }
  auto telemetry = WorkerTelemetry::Create(metrics_port > 0 ? &registry : nullptr, timeline.get(),
                                           wo.worker_index);
  if (!telemetry.ok()) return Fail(kRuntimeError, telemetry.status().ToString());
  if (metrics_port > 0 || timeline) wo.telemetry = telemetry->get();
  std::unique_ptr<HttpEndpoint> http;
  if (metrics_port > 0) {
    auto h = HttpEndpoint::Start({metrics_address, metrics_port}, &registry);
    if (!h.ok()) return Fail(kRuntimeError, "--metrics-port: " + h.status().message());
    http = std::move(*h);
  }

  std::string ps_list;
  for (const auto& e : wo.ps_endpoints) ps_list += (ps_list.empty() ? "" : ",") + e;
  std::cout << "distval-worker: role=" << (local ? "local" : "worker")
            << " index=" << wo.worker_index << " num_workers=" << wo.num_workers
            << " ps=" << (local ? "none" : ps_list) << " mode=" << mode << " model=" << model
            << " optimizer=" << optimizer << " lr=" << opt_spec->learning_rate
            << " global_batch=" << global_batch << " devices=" << devices << " epochs=" << epochs
            << " seed=" << seed
            << " train_limit=" << (train_limit >= 0 ? std::to_string(train_limit) : "all")
            << " data=" << data_dir << " slowdown=" << slowdown << " metrics="
            << (http ? "http://" + metrics_address + ":" + std::to_string(http->port()) + "/metrics"
                     : std::string("off"))
            << " timeline=" << (timeline ? timeline_path : std::string("off"))
            << " launcher=" << launcher
            << " rendezvous=" << (rendezvous_dir.empty() ? std::string("none") : rendezvous_dir)
            << std::endl;

  // ---- Strategy (devices and batch are validated before connecting).
  auto strategy = local ? ParameterServerStrategy::Create(wo, NewLocalParameterStore())
                        : ParameterServerStrategy::Create(wo);
  if (!strategy.ok()) {
    const Status& s = strategy.status();
    return Fail(s.code() == StatusCode::kInvalidArgument ? kUsageError : kRuntimeError,
                s.ToString());
  }
  DV_LOG(kInfo) << (*strategy)->Describe();

  TrainerOptions to;
  to.model = model;
  to.data_dir = data_dir;
  to.epochs = epochs;
  to.train_limit = train_limit;
  to.seed = seed;
  to.slowdown = slowdown;
  to.evaluate = local || wo.worker_index == 0;
  to.metrics_out = metrics_out;
  to.summary_json = summary_json;
  to.mode = mode;
  to.optimizer = optimizer;
  to.learning_rate = opt_spec->learning_rate;
  to.devices = devices;
  to.interactive = isatty(STDOUT_FILENO) != 0;
  to.save_path = save_path;
  to.telemetry = wo.telemetry;
  Status s = TrainClassifier(**strategy, to, std::cout);
  strategy->reset();  // no more spans: the timeline can be closed
  if (timeline) {
    Status ts = timeline->Close();
    if (s.ok() && !ts.ok()) s = ts.WithContext("--timeline");
  }
  if (!s.ok()) return Fail(kRuntimeError, s.ToString());
  return 0;
}
