// Figures 1-4 and 7: transport limit, push, pull, small requests, the
// aggregate of 2 ps + 2 workers, and the co-located path.
#include <sys/resource.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstring>
#include <deque>
#include <fstream>
#include <memory>
#include <sstream>
#include <thread>

#include "distval/client.h"
#include "figures.h"
#include "raw_zmq.h"

namespace distval::bench {
namespace {

using Clock = std::chrono::steady_clock;

constexpr int64_t kMiB = int64_t{1} << 20;

double GBps(int64_t bytes, double seconds) { return static_cast<double>(bytes) / seconds / 1e9; }

// The floor of push and pull: 1 MiB to 16 MiB, >= 0.90 x raw.
std::optional<Floor> TransferFloor(int64_t size) {
  if (size >= kMiB && size <= 16 * kMiB) return Floor{Floor::Kind::kAtLeast, 0.90};
  return std::nullopt;
}

// One SGD step in place (w -= lr * g): the least work a server that applies
// a pushed gradient does, for the co-located reference row.
__attribute__((noinline)) void SgdInPlace(float* __restrict w, const float* __restrict g,
                                          size_t n) {
  constexpr float kLearningRate = 1e-6f;
  for (size_t i = 0; i < n; ++i) w[i] -= kLearningRate * g[i];
}

// A row of `size` bytes in GB/s against a limit in GB/s measured in the
// same run.
Row GBpsRow(std::string name, std::string figure, int64_t size, double gbps, double limit_gbps,
            std::string limit_name, std::optional<Floor> floor = std::nullopt) {
  return Row{.name = std::move(name),
             .figure = std::move(figure),
             .size_bytes = size,
             .value = gbps,
             .unit = "GB/s",
             .limit = limit_gbps,
             .limit_name = std::move(limit_name),
             .floor = floor};
}

// `shared_memory`: the co-located path (figure 7); off for the figures that
// measure the network path against raw ZeroMQ over TCP.
StatusOr<std::unique_ptr<Client>> ConnectClient(const std::vector<std::string>& endpoints,
                                                int worker_index, int num_workers,
                                                bool shared_memory = false) {
  ClientOptions o;
  o.ps_endpoints = endpoints;
  o.worker_index = worker_index;
  o.num_workers = num_workers;
  o.shared_memory = shared_memory;
  o.connect_timeout = std::chrono::milliseconds(20000);
  return Client::Connect(o);
}

// A dense f32 variable of `bytes` bytes, zeros, plain SGD.
Status CreateBenchVariable(Client& client, const std::string& name, int64_t bytes,
                           Partitioner partitioner = Partitioner::None()) {
  VariableOptions vo;
  vo.initializer.kind = protocol::InitZeros{};
  vo.optimizer.kind = protocol::OptimizerKind::kSgd;
  vo.optimizer.learning_rate = 1e-6;
  vo.partitioner = partitioner;
  return client.CreateVariable(name, DType::kF32, Shape({bytes / 4}), vo);
}

std::string VarName(const std::string& prefix, int64_t bytes) {
  return prefix + std::to_string(bytes);
}

// Buffers for one size: a gradient (small non-zero values) and a pull target.
struct Buffers {
  explicit Buffers(int64_t bytes)
      : grad(static_cast<size_t>(bytes / 4), 1e-3f), out(static_cast<size_t>(bytes / 4), 0.f) {}
  std::vector<float> grad;
  std::vector<float> out;
};

// Runs the ops concurrently, one thread each, for about `timing.min_seconds`
// (after warm-up), and returns the operations per second of all together.
StatusOr<double> ConcurrentOpsPerSecond(const std::vector<std::function<Status()>>& ops,
                                        const SampleTiming& timing) {
  const size_t n = ops.size();
  std::vector<Status> status(n);
  std::vector<int64_t> count(n, 0);
  std::vector<double> elapsed(n, 0);
  std::atomic<size_t> ready{0};
  std::vector<std::thread> threads;
  for (size_t i = 0; i < n; ++i) {
    threads.emplace_back([&, i] {
      for (int w = 0; w < timing.warmup_iterations && status[i].ok(); ++w) status[i] = ops[i]();
      ready.fetch_add(1);
      while (ready.load() < n) std::this_thread::yield();
      const auto start = Clock::now();
      while (status[i].ok()) {
        status[i] = ops[i]();
        ++count[i];
        elapsed[i] = std::chrono::duration<double>(Clock::now() - start).count();
        if (count[i] >= timing.min_iterations && elapsed[i] >= timing.min_seconds) break;
      }
    });
  }
  for (auto& t : threads) t.join();
  double total = 0, longest = 0;
  for (size_t i = 0; i < n; ++i) {
    DV_RETURN_IF_ERROR(status[i]);
    total += static_cast<double>(count[i]);
    longest = std::max(longest, elapsed[i]);
  }
  return total / longest;
}

// --verbose: every sample, in microseconds per operation.
void PrintSamples(const BenchConfig& config, const std::string& label,
                  const std::vector<const char*>& names,
                  const std::vector<std::vector<double>>& samples) {
  if (!config.verbose) return;
  for (size_t i = 0; i < samples.size() && i < names.size(); ++i) {
    std::string line;
    for (double x : samples[i]) {
      line += ' ';
      line += FormatValue(x * 1e6);
    }
    std::fprintf(stderr, "[bench] %s %s us:%s\n", label.c_str(), names[i], line.c_str());
  }
}

// CPU seconds and minor page faults of a process so far: this process
// (getrusage, all threads) or a child (/proc/PID/stat).
struct CpuUse {
  double cpu_seconds = 0;
  double minor_faults = 0;
};

CpuUse ReadCpuUse(pid_t pid) {
  CpuUse use;
  if (pid == 0) {
    rusage ru{};
    getrusage(RUSAGE_SELF, &ru);
    use.cpu_seconds = static_cast<double>(ru.ru_utime.tv_sec + ru.ru_stime.tv_sec) +
                      static_cast<double>(ru.ru_utime.tv_usec + ru.ru_stime.tv_usec) * 1e-6;
    use.minor_faults = static_cast<double>(ru.ru_minflt);
    return use;
  }
  std::ifstream f("/proc/" + std::to_string(pid) + "/stat");
  std::string text((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
  // Fields after the command name (which may hold spaces, hence the last ')').
  const size_t close = text.rfind(')');
  if (close == std::string::npos) return use;
  std::istringstream in(text.substr(close + 2));
  std::vector<std::string> field;
  for (std::string x; in >> x;) field.push_back(x);
  // man 5 proc: state is field 3; minflt 10, utime 14, stime 15 (1-based).
  if (field.size() < 13) return use;
  const double tick = static_cast<double>(sysconf(_SC_CLK_TCK));
  use.minor_faults = std::stod(field[10 - 3]);
  use.cpu_seconds = (std::stod(field[14 - 3]) + std::stod(field[15 - 3])) / tick;
  return use;
}

// --verbose: wraps a measure that returns seconds per operation so that it
// also prints the CPU time and minor page faults per operation of this
// process (the client) and of `server` (a child), e.g. to see where a gap
// to the raw round trip goes.
Measure WithCpuUse(const BenchConfig& config, Measure measure, pid_t server, std::string label) {
  if (!config.verbose) return measure;
  return [measure = std::move(measure), server, label = std::move(label)]() -> StatusOr<double> {
    const CpuUse c0 = ReadCpuUse(0), s0 = ReadCpuUse(server);
    const auto start = Clock::now();
    DV_ASSIGN_OR_RETURN(double per_op, measure());
    const double wall = std::chrono::duration<double>(Clock::now() - start).count();
    const CpuUse c1 = ReadCpuUse(0), s1 = ReadCpuUse(server);
    // Operations in this sample, warm-up included (it ran inside `wall`).
    const double ops = wall / per_op;
    std::fprintf(stderr,
                 "[bench] %s: %.1f us/op; cpu us/op client %.1f server %.1f; minor faults/op "
                 "client %.1f server %.1f\n",
                 label.c_str(), per_op * 1e6, (c1.cpu_seconds - c0.cpu_seconds) / ops * 1e6,
                 (s1.cpu_seconds - s0.cpu_seconds) / ops * 1e6,
                 (c1.minor_faults - c0.minor_faults) / ops,
                 (s1.minor_faults - s0.minor_faults) / ops);
    return per_op;
  };
}

// The measure of one operation: seconds per `op` (per config.timing), and
// with --verbose its CPU use and that of `server` (see WithCpuUse).
Measure TimedOp(const BenchConfig& config, std::function<Status()> op, pid_t server,
                std::string label) {
  return WithCpuUse(
      config,
      [&config, op = std::move(op)]() -> StatusOr<double> {
        return SecondsPerIteration(op, config.timing);
      },
      server, std::move(label));
}

}  // namespace

Status RunTransferFigures(const BenchConfig& config, const std::vector<int64_t>& sizes,
                          Report* report) {
  DV_ASSIGN_OR_RETURN(PsCluster raw, StartRawEcho(config, "transfer", 1));
  // Not a floor's limit: raw ZeroMQ with the work distval-ps does for a
  // push (NaN check, out-of-place SGD), to tell the cost of that work from
  // the cost of distval's own machinery.
  DV_ASSIGN_OR_RETURN(PsCluster raw_work,
                      StartRawEcho(config, "transfer-work", 1, /*push_work=*/true));
  DV_ASSIGN_OR_RETURN(PsCluster ps, StartPs(config, "transfer", 1, 1, "async"));
  DV_ASSIGN_OR_RETURN(auto raw_client, RawClient::Connect(raw.endpoints));
  DV_ASSIGN_OR_RETURN(auto raw_work_client, RawClient::Connect(raw_work.endpoints));
  DV_ASSIGN_OR_RETURN(auto client, ConnectClient(ps.endpoints, 0, 1));
  for (int64_t size : sizes) {
    const std::string name = VarName("t", size);
    DV_RETURN_IF_ERROR(CreateBenchVariable(*client, name, size));
    Buffers buf(size);
    const pid_t raw_pid = raw.processes.at(0).pid(), ps_pid = ps.processes.at(0).pid();
    const pid_t raw_work_pid = raw_work.processes.at(0).pid();
    const std::string label = SizeLabel(size);
    const std::vector<Measure> measures = {
        TimedOp(
            config, [&] { return raw_client->RoundTrip(buf.grad.data(), size); }, raw_pid,
            label + " raw"),
        TimedOp(
            config,
            [&] {
              return client->Push({{name, buf.grad}}).Wait();
            },
            ps_pid, label + " push"),
        TimedOp(
            config,
            [&] {
              return client->Pull({{name, buf.out}}).Wait();
            },
            ps_pid, label + " pull"),
        TimedOp(
            config,
            [&] {
              // In pieces where distval's client sends pieces (the same
              // threshold and size), each applied as it arrives.
              const size_t piece = ClientOptions{}.push_chunk_bytes;
              const auto bytes = static_cast<size_t>(size);
              if (bytes >= 2 * piece)
                return raw_work_client->RoundTripInPieces(buf.grad.data(), bytes, piece);
              return raw_work_client->RoundTrip(buf.grad.data(), bytes);
            },
            raw_work_pid, label + " raw+work"),
    };
    std::vector<std::vector<double>> samples;
    DV_ASSIGN_OR_RETURN(std::vector<double> t, AlternateMedians(measures, config.reps, &samples));
    const double raw_gbps = GBps(size, t[0]);
    const double raw_work_gbps = GBps(size, t[3]);
    report->Add(Row{.name = "transport",
                    .figure = "transport: raw ZeroMQ round trip",
                    .size_bytes = size,
                    .value = raw_gbps,
                    .unit = "GB/s"});
    report->Add(Row{.name = "transport_rtt",
                    .figure = "transport: raw ZeroMQ round trip",
                    .size_bytes = size,
                    .value = t[0] * 1e6,
                    .unit = "us"});
    report->Add(GBpsRow("push", "push, 1 ps + 1 worker (SGD)", size, GBps(size, t[1]), raw_gbps,
                        "raw", TransferFloor(size)));
    report->Add(GBpsRow("pull", "pull, 1 ps + 1 worker", size, GBps(size, t[2]), raw_gbps, "raw",
                        TransferFloor(size)));
    report->Add(GBpsRow("transport_work", "raw ZeroMQ + the server's work (reference)", size,
                        raw_work_gbps, raw_gbps, "raw"));
    report->Add(GBpsRow("push_vs_work", "push against raw + the server's work", size,
                        GBps(size, t[1]), raw_work_gbps, "raw+work"));
    PrintSamples(config, SizeLabel(size), {"raw", "push", "pull", "raw+work"}, samples);
  }
  return OkStatus();
}

Status RunAggregateFigures(const BenchConfig& config, const std::vector<int64_t>& sizes,
                           Report* report) {
  DV_ASSIGN_OR_RETURN(PsCluster raw, StartRawEcho(config, "aggregate", 2));
  DV_ASSIGN_OR_RETURN(PsCluster ps, StartPs(config, "aggregate", 2, 2, "async"));
  std::vector<std::unique_ptr<RawClient>> raw_clients;
  std::vector<std::unique_ptr<Client>> clients;
  for (int w = 0; w < 2; ++w) {
    DV_ASSIGN_OR_RETURN(auto rc, RawClient::Connect(raw.endpoints));
    raw_clients.push_back(std::move(rc));
    DV_ASSIGN_OR_RETURN(auto c, ConnectClient(ps.endpoints, w, 2));
    clients.push_back(std::move(c));
  }
  for (int64_t size : sizes) {
    const std::string name = VarName("a", size);
    for (auto& c : clients)
      DV_RETURN_IF_ERROR(CreateBenchVariable(*c, name, size, Partitioner::FixedShards(2)));
    std::vector<std::unique_ptr<Buffers>> buf;
    for (int w = 0; w < 2; ++w) buf.push_back(std::make_unique<Buffers>(size));
    // Raw: each client sends half of S to each of the two servers at once,
    // as a worker pushing a variable split over two shards does.
    std::vector<std::function<Status()>> raw_ops, push_ops, pull_ops;
    for (int w = 0; w < 2; ++w) {
      RawClient* rc = raw_clients[w].get();
      Client* c = clients[w].get();
      Buffers* b = buf[w].get();
      raw_ops.push_back([rc, b, size] { return rc->RoundTrip(b->grad.data(), size / 2); });
      push_ops.push_back([c, b, name] { return c->Push({{name, b->grad}}).Wait(); });
      pull_ops.push_back([c, b, name] { return c->Pull({{name, b->out}}).Wait(); });
    }
    const std::vector<Measure> measures = {
        [&]() { return ConcurrentOpsPerSecond(raw_ops, config.timing); },
        [&]() { return ConcurrentOpsPerSecond(push_ops, config.timing); },
        [&]() { return ConcurrentOpsPerSecond(pull_ops, config.timing); },
    };
    DV_ASSIGN_OR_RETURN(std::vector<double> ops, AlternateMedians(measures, config.reps));
    const double s = static_cast<double>(size) / 1e9;
    report->Add(GBpsRow("push_2x2", "push, 2 ps + 2 workers (aggregate)", size, ops[1] * s,
                        ops[0] * s, "2 raw pairs"));
    report->Add(GBpsRow("pull_2x2", "pull, 2 ps + 2 workers (aggregate)", size, ops[2] * s,
                        ops[0] * s, "2 raw pairs"));
  }
  return OkStatus();
}

Status RunSmallRequestFigures(const BenchConfig& config, Report* report) {
  constexpr int64_t kSize = 4096;
  constexpr int kWindow = 64;
  DV_ASSIGN_OR_RETURN(PsCluster raw, StartRawEcho(config, "small", 1));
  DV_ASSIGN_OR_RETURN(PsCluster ps, StartPs(config, "small", 1, 1, "async"));
  DV_ASSIGN_OR_RETURN(auto raw_client, RawClient::Connect(raw.endpoints));
  DV_ASSIGN_OR_RETURN(auto client, ConnectClient(ps.endpoints, 0, 1));
  const std::string name = VarName("s", kSize);
  DV_RETURN_IF_ERROR(CreateBenchVariable(*client, name, kSize));
  Buffers buf(kSize);
  SampleTiming latency = config.timing;
  latency.warmup_iterations = 50;
  // Many in flight: `batch` requests per timed iteration, kWindow at a time.
  const int batch = config.quick ? 2000 : 5000;
  SampleTiming throughput = config.timing;
  throughput.min_iterations = 1;
  throughput.warmup_iterations = 1;
  auto distval_pipelined = [&]() -> Status {
    std::deque<RequestHandle> in_flight;
    for (int i = 0; i < batch; ++i) {
      if (static_cast<int>(in_flight.size()) == kWindow) {
        DV_RETURN_IF_ERROR(in_flight.front().Wait());
        in_flight.pop_front();
      }
      in_flight.push_back(client->Push({{name, buf.grad}}, /*advance_clock=*/false));
    }
    for (auto& h : in_flight) DV_RETURN_IF_ERROR(h.Wait());
    return OkStatus();
  };
  const std::vector<Measure> measures = {
      [&]() -> StatusOr<double> {
        return SecondsPerIteration([&] { return raw_client->RoundTrip(buf.grad.data(), kSize); },
                                   latency);
      },
      [&]() -> StatusOr<double> {
        return SecondsPerIteration(
            [&] {
              return client->Push({{name, buf.grad}}).Wait();
            },
            latency);
      },
      [&]() -> StatusOr<double> {
        return SecondsPerIteration(
            [&] { return raw_client->Pipelined(buf.grad.data(), kSize, batch, kWindow); },
            throughput);
      },
      [&]() -> StatusOr<double> { return SecondsPerIteration(distval_pipelined, throughput); },
  };
  DV_ASSIGN_OR_RETURN(std::vector<double> t, AlternateMedians(measures, config.reps));
  report->Add(Row{.name = "push_rtt_4k",
                  .figure = "4 KiB push round trip",
                  .size_bytes = kSize,
                  .value = t[1] * 1e6,
                  .unit = "us",
                  .limit = t[0] * 1e6,
                  .limit_name = "raw",
                  .floor = Floor{Floor::Kind::kAtMost, 1.25}});
  report->Add(Row{.name = "push_rps",
                  .figure = "4 KiB pushes, " + std::to_string(kWindow) + " in flight",
                  .size_bytes = kSize,
                  .value = batch / t[3],
                  .unit = "req/s",
                  .limit = batch / t[2],
                  .limit_name = "raw"});
  return OkStatus();
}

Status RunColocatedFigures(const BenchConfig& config, const std::vector<int64_t>& sizes,
                           Report* report) {
  // Two apply threads: the worker waits for its push while the server
  // checks and applies it, so the server may use both cores.
  DV_ASSIGN_OR_RETURN(PsCluster ps,
                      StartPs(config, "colocated", 1, 1, "async", {"--threads", "2"}));
  DV_ASSIGN_OR_RETURN(auto client, ConnectClient(ps.endpoints, 0, 1, /*shared_memory=*/true));
  const pid_t ps_pid = ps.processes.at(0).pid();
  for (int64_t size : sizes) {
    const std::string name = VarName("c", size);
    DV_RETURN_IF_ERROR(CreateBenchVariable(*client, name, size));
    Buffers buf(size);
    std::vector<float> dst(buf.grad.size(), 0.f), params(buf.grad.size(), 0.f);
    // The gradient in memory the server reads where it is (a worker that
    // computes its gradients into such a buffer pushes without a copy).
    DV_ASSIGN_OR_RETURN(PushBuffer lent, client->AllocatePushBuffer(size / 4));
    if (!lent.shared_memory)
      return InternalError("co-located figures: the push buffer is not in shared memory");
    std::fill(lent.values.begin(), lent.values.end(), 1e-3f);
    const std::span<const float> lent_grad(lent.values);
    const std::vector<Measure> measures = {
        [&]() -> StatusOr<double> {
          return SecondsPerIteration(
              [&] {
                std::memcpy(dst.data(), buf.grad.data(), static_cast<size_t>(size));
                return OkStatus();
              },
              config.timing);
        },
        TimedOp(
            config,
            [&] {
              return client->Push({{name, lent_grad}}).Wait();
            },
            ps_pid, "co-located " + SizeLabel(size) + " push"),
        TimedOp(
            config,
            [&] {
              return client->Pull({{name, buf.out}}).Wait();
            },
            ps_pid, "co-located " + SizeLabel(size) + " pull"),
        // Not a floor's limit: the SGD step alone, on one thread, as the
        // server applies a push (no transfer, no check). A push that
        // includes it cannot be faster than it.
        [&]() -> StatusOr<double> {
          return SecondsPerIteration(
              [&] {
                SgdInPlace(params.data(), buf.grad.data(), params.size());
                return OkStatus();
              },
              config.timing);
        },
        TimedOp(
            config,
            [&] {
              return client->Push({{name, buf.grad}}).Wait();
            },
            ps_pid, "co-located " + SizeLabel(size) + " push from ordinary memory"),
    };
    std::vector<std::vector<double>> samples;
    DV_ASSIGN_OR_RETURN(std::vector<double> t, AlternateMedians(measures, config.reps, &samples));
    PrintSamples(config, "co-located " + SizeLabel(size),
                 {"memcpy", "push", "pull", "sgd", "push copied"}, samples);
    const double memcpy_gbps = GBps(size, t[0]);
    std::optional<Floor> floor;
    if (size == 16 * kMiB) floor = Floor{Floor::Kind::kAtLeast, 0.70};
    report->Add(GBpsRow("colocated_push", "co-located push (shared memory, lent)", size,
                        GBps(size, t[1]), memcpy_gbps, "memcpy", floor));
    report->Add(GBpsRow("colocated_pull", "co-located pull (shared memory)", size, GBps(size, t[2]),
                        memcpy_gbps, "memcpy", floor));
    report->Add(GBpsRow("colocated_push_copied", "co-located push, gradient copied in (reference)",
                        size, GBps(size, t[4]), memcpy_gbps, "memcpy"));
    report->Add(GBpsRow("colocated_sgd", "SGD step alone, in place (reference)", size,
                        GBps(size, t[3]), memcpy_gbps, "memcpy"));
  }
  return OkStatus();
}

}  // namespace distval::bench
