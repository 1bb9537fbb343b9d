// Metrics and timelines of a running job: 2 distval-ps (each with
// --metrics-port and --timeline) and 2 distval-worker processes (2 replicas
// each, --metrics-port and --timeline) training the MLP under BSP. While the
// job runs, every /metrics endpoint is scraped repeatedly: the text must
// parse as Prometheus exposition format and the counters must move (steps,
// bytes, requests). After the job, the servers' request counts must match
// the workers' steps, and the timelines must load as JSON, nest on every
// track, and cover every step with its phases.
#include <gtest/gtest.h>

#include <algorithm>
#include <chrono>
#include <filesystem>
#include <fstream>
#include <map>
#include <nlohmann/json.hpp>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "child_process.h"
#include "distval/client.h"
#include "distval/dataset.h"
#include "http_get.h"
#include "local_cluster.h"
#include "prometheus_text.h"

namespace distval {
namespace {

using nlohmann::json;
using testing::ChildProcess;
using testing::HttpRequest;
using testing::LocalCluster;
using testing::LocalClusterOptions;
using testing::ParsePrometheusText;
using testing::ProcessResult;
using testing::PromText;

bool HaveData() {
  return std::filesystem::exists(FashionMnistFiles(kDefaultFashionMnistDir, Split::kTest).images);
}

// Scrapes /metrics and parses it (error in .error; empty families when the
// endpoint did not answer 200).
PromText Scrape(int port) {
  testing::HttpResponse r = HttpRequest(port, "/metrics");
  if (r.status != 200) {
    PromText p;
    p.error = "HTTP status " + std::to_string(r.status);
    return p;
  }
  return ParsePrometheusText(r.body);
}

struct Span {
  std::string name;
  int64_t ts = 0, dur = 0;
  int64_t step = -1;
  int64_t end() const { return ts + dur; }
};

// Spans by track name, sorted by start (longer first on ties).
std::map<std::string, std::vector<Span>> LoadTimeline(const std::string& path) {
  std::ifstream f(path);
  EXPECT_TRUE(f.good()) << "missing " << path;
  json doc = json::parse(f);  // throws (test failure) on invalid JSON
  std::map<int, std::string> names;
  for (const json& e : doc.at("traceEvents"))
    if (e.at("ph") == "M" && e.at("name") == "thread_name")
      names[e.at("tid").get<int>()] = e.at("args").at("name").get<std::string>();
  std::map<std::string, std::vector<Span>> tracks;
  for (const json& e : doc.at("traceEvents")) {
    if (e.at("ph") != "X") continue;
    Span s;
    s.name = e.at("name").get<std::string>();
    s.ts = e.at("ts").get<int64_t>();
    s.dur = e.at("dur").get<int64_t>();
    if (e.contains("args") && e["args"].contains("step")) s.step = e["args"]["step"].get<int64_t>();
    tracks[names.at(e.at("tid").get<int>())].push_back(s);
  }
  for (auto& [name, spans] : tracks)
    std::stable_sort(spans.begin(), spans.end(), [](const Span& a, const Span& b) {
      return a.ts != b.ts ? a.ts < b.ts : a.dur > b.dur;
    });
  return tracks;
}

// On one track, spans either nest or are disjoint (what the viewers draw
// as a stack). Returns "" or the first violation.
std::string CheckNesting(const std::string& track, const std::vector<Span>& spans) {
  std::vector<const Span*> stack;
  for (const Span& s : spans) {
    while (!stack.empty() && stack.back()->end() <= s.ts) stack.pop_back();
    if (!stack.empty() && s.end() > stack.back()->end())
      return track + ": '" + s.name + "' (step " + std::to_string(s.step) + ") overlaps '" +
             stack.back()->name + "' (step " + std::to_string(stack.back()->step) +
             ") without nesting";
    stack.push_back(&s);
  }
  return "";
}

bool Inside(const Span& inner, const Span& outer) {
  return inner.ts >= outer.ts && inner.end() <= outer.end();
}

// The span `name` of step `step` (inside `within` when given).
const Span* Find(const std::vector<Span>& spans, const std::string& name, int64_t step,
                 const Span* within = nullptr) {
  for (const Span& s : spans)
    if (s.name == name && s.step == step && (within == nullptr || Inside(s, *within))) return &s;
  return nullptr;
}

class ObservabilityTest : public ::testing::Test {
 protected:
  void SetUp() override {
    worker_bin_ = testing::BinaryFromEnv("DISTVAL_WORKER_BIN");
    ASSERT_FALSE(worker_bin_.empty()) << "DISTVAL_WORKER_BIN is not set";
    char tmpl[] = "/tmp/distval-observability-test-XXXXXX";
    ASSERT_NE(mkdtemp(tmpl), nullptr);
    dir_ = tmpl;
  }
  void TearDown() override {
    std::error_code ec;
    std::filesystem::remove_all(dir_, ec);
  }
  std::string Path(const std::string& name) const { return dir_ + "/" + name; }

  std::string worker_bin_;
  std::string dir_;
};

TEST_F(ObservabilityTest, MetricsMoveAndTimelinesCoverTheSteps) {
  if (!HaveData()) GTEST_SKIP() << "Fashion-MNIST not installed";
  constexpr int kShards = 2, kWorkers = 2;
  std::vector<int> ps_ports, worker_ports;
  LocalClusterOptions co;
  co.num_shards = kShards;
  co.num_workers = kWorkers;
  for (int i = 0; i < kShards; ++i) {
    ps_ports.push_back(testing::FreeTcpPort());
    co.per_shard_args.push_back({"--metrics-port", std::to_string(ps_ports.back()),
                                 "--metrics-address", "127.0.0.1", "--timeline",
                                 Path("ps-" + std::to_string(i) + ".json")});
  }
  auto cluster = LocalCluster::Start(co);
  ASSERT_TRUE(cluster.ok()) << cluster.status();
  std::string ps;
  for (const auto& e : cluster->endpoints()) ps += (ps.empty() ? "" : ",") + e;

  // The workers: the MLP on 6000 examples for 2 epochs, each step's compute
  // stretched (--slowdown) so that the job runs long enough to scrape.
  std::vector<ChildProcess> workers;
  for (int w = 0; w < kWorkers; ++w) {
    worker_ports.push_back(testing::FreeTcpPort());
    const std::string tag = "worker-" + std::to_string(w);
    std::vector<std::string> args = {worker_bin_,
                                     "--model",
                                     "mlp",
                                     "--train-limit",
                                     "6000",
                                     "--epochs",
                                     "2",
                                     "--devices",
                                     "cpu:0,cpu:1",
                                     "--global-batch",
                                     "64",
                                     "--slowdown",
                                     "8",
                                     "--ps",
                                     ps,
                                     "--worker-index",
                                     std::to_string(w),
                                     "--num-workers",
                                     std::to_string(kWorkers),
                                     "--metrics-port",
                                     std::to_string(worker_ports.back()),
                                     "--metrics-address",
                                     "127.0.0.1",
                                     "--timeline",
                                     Path(tag + ".json"),
                                     "--summary-json",
                                     Path(tag + "-summary.json")};
    auto p = ChildProcess::Start(args, Path(tag + ".log"));
    ASSERT_TRUE(p.ok()) << p.status();
    workers.push_back(std::move(*p));
  }

  // ---- While the job runs: scrape until each value moved.
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(60);
  for (int w = 0; w < kWorkers; ++w) {
    const std::map<std::string, std::string> me = {{"worker", std::to_string(w)}};
    PromText first;
    for (;;) {
      first = Scrape(worker_ports[static_cast<size_t>(w)]);
      if (first.error.empty() && first.Value("distval_worker_steps_total", me).value_or(0) >= 1)
        break;
      ASSERT_LT(std::chrono::steady_clock::now(), deadline)
          << "worker " << w << " never reported a step: " << first.error;
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
    }
    // Scrape until every value moved: a step, the bytes of its push and of
    // the next pull, its examples (reported after the step).
    auto moved = [&](const PromText& a, const PromText& b) {
      return *b.Value("distval_worker_steps_total", me) >
                 *a.Value("distval_worker_steps_total", me) &&
             b.Sum("distval_worker_sent_bytes_total", {{"type", "push"}}) >
                 a.Sum("distval_worker_sent_bytes_total", {{"type", "push"}}) &&
             b.Sum("distval_worker_received_bytes_total", {{"type", "pull"}}) >
                 a.Sum("distval_worker_received_bytes_total", {{"type", "pull"}}) &&
             *b.Value("distval_worker_examples_total", me) >
                 *a.Value("distval_worker_examples_total", me);
    };
    PromText second;
    for (;;) {
      second = Scrape(worker_ports[static_cast<size_t>(w)]);
      ASSERT_TRUE(second.error.empty()) << "worker " << w << ": " << second.error;
      if (moved(first, second)) break;
      ASSERT_LT(std::chrono::steady_clock::now(), deadline) << "worker " << w << " values stuck";
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
    }
    // Every step reports each phase once. A scrape reads the metrics one
    // after the other while steps go on: steps_total (read first, counted
    // last) never runs ahead of the phase histograms.
    const double steps = *second.Value("distval_worker_steps_total", me);
    for (const char* phase : {"pull", "compute", "blocked", "reduce", "push"}) {
      const double n = *second.Value("distval_worker_step_phase_seconds_count", {{"phase", phase}});
      EXPECT_GE(n, steps) << phase;
      EXPECT_LE(n, steps + 2) << phase;
    }
    EXPECT_GE(*second.Value("distval_worker_step_seconds_count", me), steps);
    EXPECT_GT(*second.Value("distval_worker_step_phase_seconds_sum", {{"phase", "compute"}}), 0);
    EXPECT_EQ(second.families["distval_worker_step_seconds"].type, "histogram");
    EXPECT_EQ(second.families["distval_worker_loss"].type, "gauge");
    EXPECT_EQ(HttpRequest(worker_ports[static_cast<size_t>(w)], "/healthz").status, 200);
  }
  for (int i = 0; i < kShards; ++i) {
    const int port = ps_ports[static_cast<size_t>(i)];
    PromText a = Scrape(port);
    ASSERT_TRUE(a.error.empty()) << "ps " << i << ": " << a.error;
    const std::map<std::string, std::string> push = {{"type", "push"}};
    PromText b;
    for (;;) {
      b = Scrape(port);
      ASSERT_TRUE(b.error.empty()) << "ps " << i << ": " << b.error;
      if (*b.Value("distval_ps_requests_total", push) > *a.Value("distval_ps_requests_total", push))
        break;
      ASSERT_LT(std::chrono::steady_clock::now(), deadline) << "ps " << i << " pushes stuck";
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
    }
    EXPECT_GT(*b.Value("distval_ps_request_bytes_total", push),
              *a.Value("distval_ps_request_bytes_total", push));
    EXPECT_GE(*b.Value("distval_ps_reply_bytes_total", {{"type", "pull"}}),
              *a.Value("distval_ps_reply_bytes_total", {{"type", "pull"}}));
    EXPECT_EQ(b.Value("distval_ps_workers"), kWorkers);
    EXPECT_EQ(b.Value("distval_ps_live_workers"), kWorkers);
    EXPECT_GT(*b.Value("distval_ps_variables"), 0);
    EXPECT_GT(*b.Value("distval_ps_variable_bytes"), 0);
    EXPECT_EQ(b.Value("distval_ps_staleness_bound"), 0);
    EXPECT_EQ(b.Value("distval_ps_last_checkpoint_timestamp_seconds"), 0);
    EXPECT_EQ(b.families["distval_ps_apply_seconds"].type, "histogram");
    EXPECT_EQ(HttpRequest(port, "/healthz").status, 200);
  }

  // ---- After the job.
  int64_t steps = -1;
  for (int w = 0; w < kWorkers; ++w) {
    ProcessResult r = workers[static_cast<size_t>(w)].Wait(120);
    ASSERT_FALSE(r.timed_out) << "worker " << w << " timed out:\n" << r.output;
    ASSERT_EQ(r.exit_code, 0) << "worker " << w << ":\n" << r.output;
    // The start line names the endpoint.
    EXPECT_NE(r.output.find("metrics=http://127.0.0.1:" +
                            std::to_string(worker_ports[static_cast<size_t>(w)]) + "/metrics"),
              std::string::npos)
        << r.output;
    std::ifstream f(Path("worker-" + std::to_string(w) + "-summary.json"));
    const int64_t s = json::parse(f).at("steps").get<int64_t>();
    if (steps >= 0) {
      EXPECT_EQ(s, steps);  // BSP: every worker ran the same steps
    }
    steps = s;
  }
  ASSERT_GT(steps, 10);
  for (int i = 0; i < kShards; ++i) {
    PromText p = Scrape(ps_ports[static_cast<size_t>(i)]);
    ASSERT_TRUE(p.error.empty()) << p.error;
    // One push per worker per step reaches every shard.
    EXPECT_EQ(p.Value("distval_ps_requests_total", {{"type", "push"}}), kWorkers * steps);
    EXPECT_EQ(p.Value("distval_ps_push_staleness_count"), kWorkers * steps);
    // BSP: a worker's push for clock c comes at most one clock behind the
    // fastest worker (which cannot pass c + 1 before everyone pushed c).
    EXPECT_EQ(p.Value("distval_ps_push_staleness_bucket", {{"le", "1"}}), kWorkers * steps);
    EXPECT_GE(*p.Value("distval_ps_pull_wait_seconds_count"), kWorkers * steps);
    EXPECT_EQ(p.Value("distval_ps_errors_total", {{"code", "InvalidArgument"}}), 0);
  }

  // ---- Stop the servers (they close their timelines) and read everything.
  {
    ClientOptions o;
    o.ps_endpoints = cluster->endpoints();
    o.role = protocol::Role::kControl;
    auto control = Client::Connect(o);
    ASSERT_TRUE(control.ok()) << control.status();
    ASSERT_TRUE((*control)->ShutdownServers().ok());
  }
  ASSERT_TRUE(cluster->WaitExit(30));

  for (int w = 0; w < kWorkers; ++w) {
    auto tracks = LoadTimeline(Path("worker-" + std::to_string(w) + ".json"));
    for (const char* t : {"steps", "replica 0", "replica 1", "ps 0", "ps 1"})
      ASSERT_TRUE(tracks.count(t)) << "worker " << w << " has no track '" << t << "'";
    for (const auto& [name, spans] : tracks) {
      const std::string bad = CheckNesting(name, spans);
      EXPECT_TRUE(bad.empty()) << "worker " << w << ": " << bad;
    }
    for (int64_t s = 0; s < steps; ++s) {
      SCOPED_TRACE("worker " + std::to_string(w) + " step " + std::to_string(s));
      const Span* step = Find(tracks["steps"], "step", s);
      ASSERT_NE(step, nullptr);
      // The step's values were pulled inside the step, or before it (worker
      // 0 evaluates at the end of an epoch: that pull serves the next step).
      const Span* pull = Find(tracks["steps"], "pull", s, step);
      ASSERT_NE(Find(tracks["steps"], "pull", s), nullptr);
      int64_t children = pull != nullptr ? pull->dur : 0;
      for (const char* rep : {"replica 0", "replica 1"}) {
        const Span* compute = Find(tracks[rep], "compute", s, step);
        ASSERT_NE(compute, nullptr) << rep;
        ASSERT_NE(Find(tracks[rep], "blocked", s, compute), nullptr) << rep;
      }
      const Span* compute0 = Find(tracks["replica 0"], "compute", s, step);
      children += compute0->dur;
      if (const Span* mirror = Find(tracks["replica 0"], "mirror", s, step))
        children += mirror->dur;
      int64_t grandchildren = 0;
      for (const char* phase : {"blocked", "reduce", "push"}) {
        const Span* p = Find(tracks["replica 0"], phase, s, compute0);
        ASSERT_NE(p, nullptr) << phase;
        grandchildren += p->dur;
      }
      EXPECT_LE(grandchildren, compute0->dur + 3);  // microsecond rounding
      EXPECT_LE(children, step->dur + 3);
      for (const char* shard : {"ps 0", "ps 1"}) {
        bool pushed = false;
        for (const auto& [name, spans] : tracks)
          if (name.rfind(shard, 0) == 0 && Find(spans, "push", s) != nullptr) pushed = true;
        EXPECT_TRUE(pushed) << "no push of step " << s << " on " << shard;
      }
    }
  }
  for (int i = 0; i < kShards; ++i) {
    auto tracks = LoadTimeline(Path("ps-" + std::to_string(i) + ".json"));
    ASSERT_TRUE(tracks.count("apply")) << "ps " << i;
    for (const auto& [name, spans] : tracks) {
      const std::string bad = CheckNesting(name, spans);
      EXPECT_TRUE(bad.empty()) << "ps " << i << ": " << bad;
    }
    std::set<int64_t> applied;
    for (const Span& s : tracks["apply"]) applied.insert(s.step);
    for (int64_t s = 0; s < steps; ++s)
      EXPECT_TRUE(applied.count(s)) << "ps " << i << " step " << s;
    for (int w = 0; w < kWorkers; ++w) {
      const std::string t = "worker " + std::to_string(w);
      ASSERT_TRUE(tracks.count(t)) << "ps " << i << " has no track '" << t << "'";
      EXPECT_GE(static_cast<int64_t>(tracks[t].size()), steps);
    }
  }
}

}  // namespace
}  // namespace distval
