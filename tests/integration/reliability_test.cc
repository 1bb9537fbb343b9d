// Reliability of distval-ps with real processes on 127.0.0.1: checkpoints
// (periodic, on request, at shutdown), restore, refusal of corrupted
// checkpoints, and crashes in the middle of checkpoint writes.
#include <gtest/gtest.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <limits>
#include <random>
#include <set>
#include <thread>

#include "child_process.h"
#include "distval/client.h"
#include "distval/dataset.h"
#include "distval/protocol.h"
#include "distval/safetensors.h"
#include "distval/transport.h"
#include "http_get.h"
#include "local_cluster.h"
#include "prometheus_text.h"

namespace distval {
namespace {

namespace fs = std::filesystem;
using testing::LocalCluster;
using testing::LocalClusterOptions;

std::string MakeTempDir() {
  char tmpl[] = "/tmp/distval-rel-XXXXXX";
  EXPECT_NE(::mkdtemp(tmpl), nullptr);
  return tmpl;
}

std::unique_ptr<Client> Connect(
    const LocalCluster& c, protocol::Role role = protocol::Role::kWorker,
    std::chrono::milliseconds request_timeout = std::chrono::milliseconds(20000)) {
  ClientOptions o;
  o.ps_endpoints = c.endpoints();
  o.role = role;
  o.connect_timeout = std::chrono::milliseconds(20000);
  o.request_timeout = request_timeout;
  o.heartbeat_interval = std::chrono::milliseconds(200);
  auto client = Client::Connect(o);
  EXPECT_TRUE(client.ok()) << client.status();
  return client.ok() ? std::move(*client) : nullptr;
}

VariableOptions Sgd(double lr, protocol::OptimizerKind kind = protocol::OptimizerKind::kSgd) {
  VariableOptions vo;
  vo.initializer = {0, protocol::InitZeros{}};
  vo.optimizer.kind = kind;
  vo.optimizer.learning_rate = lr;
  return vo;
}

std::vector<std::string> Checkpoints(const std::string& root) {
  std::vector<std::string> out;
  for (const auto& e : fs::directory_iterator(root)) out.push_back(e.path().filename());
  std::sort(out.begin(), out.end());
  return out;
}

// Periodic checkpoints, a requested one, --keep, and a restart with
// --restore latest that serves exactly the saved values and clock.
TEST(ReliabilityTest, CheckpointAndRestoreAcrossARestart) {
  const std::string root = MakeTempDir();
  LocalClusterOptions co;
  co.num_shards = 2;
  co.extra_args = {"--checkpoint-dir", root, "--checkpoint-every", "2", "--keep", "2"};
  std::vector<float> w(64), b(16), m(16);
  int64_t saved_clock = 0;
  {
    auto cluster = LocalCluster::Start(co);
    ASSERT_TRUE(cluster.ok()) << cluster.status();
    auto client = Connect(*cluster);
    ASSERT_NE(client, nullptr);
    ASSERT_TRUE(client->CreateVariable("w", DType::kF32, Shape({16, 4}), Sgd(0.1)).ok());
    ASSERT_TRUE(client
                    ->CreateVariable("b", DType::kF32, Shape({16}),
                                     Sgd(0.1, protocol::OptimizerKind::kAdam))
                    .ok());
    ASSERT_TRUE(client
                    ->CreateVariable("m", DType::kF32, Shape({16}),
                                     Sgd(0.1, protocol::OptimizerKind::kMomentum))
                    .ok());
    std::vector<float> gw(64), gb(16);
    for (int step = 0; step < 5; ++step) {
      for (size_t i = 0; i < gw.size(); ++i) gw[i] = 0.01f * static_cast<float>(i + step);
      for (size_t i = 0; i < gb.size(); ++i) gb[i] = 0.1f * static_cast<float>(i) - 0.5f;
      ASSERT_TRUE(client->Push({{"w", gw}, {"b", gb}, {"m", gb}}, true).Wait().ok());
    }
    auto written = client->Checkpoint();
    ASSERT_TRUE(written.ok()) << written.status();
    ASSERT_EQ(written->size(), 2u);
    for (const auto& r : *written) {
      EXPECT_EQ(r.clock, 5);
      EXPECT_EQ(r.path, root + "/ckpt-000000000005");
    }
    saved_clock = (*written)[0].clock;
    ASSERT_TRUE(client->Pull({{"w", w}, {"b", b}, {"m", m}}).Wait().ok());
    // --keep 2: the periodic ones at clocks 2 and 4, then 5: 2 is gone.
    EXPECT_EQ(Checkpoints(root),
              (std::vector<std::string>{"ckpt-000000000004", "ckpt-000000000005"}));
    auto stats = client->Stats();
    ASSERT_TRUE(stats.ok());
    EXPECT_EQ((*stats)[1].last_checkpoint, root + "/ckpt-000000000005");
    cluster->Kill(0);
    cluster->Kill(1);
  }
  co.extra_args.push_back("--restore");
  co.extra_args.push_back("latest");
  auto cluster = LocalCluster::Start(co);
  ASSERT_TRUE(cluster.ok()) << cluster.status();
  auto client = Connect(*cluster);
  ASSERT_NE(client, nullptr);
  EXPECT_EQ(client->clock(), saved_clock);
  // The worker's own spec matches what was restored.
  ASSERT_TRUE(client->CreateVariable("w", DType::kF32, Shape({16, 4}), Sgd(0.1)).ok());
  ASSERT_TRUE(
      client
          ->CreateVariable("b", DType::kF32, Shape({16}), Sgd(0.1, protocol::OptimizerKind::kAdam))
          .ok());
  ASSERT_TRUE(client
                  ->CreateVariable("m", DType::kF32, Shape({16}),
                                   Sgd(0.1, protocol::OptimizerKind::kMomentum))
                  .ok());
  // A different spec under a restored name is refused.
  EXPECT_EQ(client->CreateVariable("w", DType::kF32, Shape({16, 5}), Sgd(0.1)).code(),
            StatusCode::kAlreadyExists);
  std::vector<float> w2(64), b2(16), m2(16);
  ASSERT_TRUE(client->Pull({{"w", w2}, {"b", b2}, {"m", m2}}).Wait().ok());
  EXPECT_EQ(w, w2);
  EXPECT_EQ(b, b2);
  EXPECT_EQ(m, m2);
  // Training resumes.
  std::vector<float> gw(64, 1.0f), gb(16, 1.0f);
  ASSERT_TRUE(client->Push({{"w", gw}, {"b", gb}, {"m", gb}}, true).Wait().ok());
  EXPECT_EQ(client->clock(), saved_clock + 1);
  ASSERT_TRUE(client->ShutdownServers(/*checkpoint_first=*/true).ok());
  EXPECT_TRUE(cluster->WaitExit(20));
  EXPECT_TRUE(fs::exists(root + "/ckpt-000000000006/manifest-1-of-2.json"));
  fs::remove_all(root);
}

// A corrupted or incomplete checkpoint: the server refuses to start and
// names the file.
TEST(ReliabilityTest, CorruptedCheckpointIsRefused) {
  const std::string root = MakeTempDir();
  LocalClusterOptions co;
  co.num_shards = 2;
  co.extra_args = {"--checkpoint-dir", root};
  {
    auto cluster = LocalCluster::Start(co);
    ASSERT_TRUE(cluster.ok()) << cluster.status();
    auto client = Connect(*cluster);
    ASSERT_NE(client, nullptr);
    ASSERT_TRUE(client->CreateVariable("w", DType::kF32, Shape({256}), Sgd(0.1)).ok());
    ASSERT_TRUE(client->CreateVariable("v", DType::kF32, Shape({256}), Sgd(0.1)).ok());
    ASSERT_TRUE(client->Checkpoint().ok());
  }
  const std::string dir = root + "/ckpt-000000000000";
  auto run = [&](int shard, const std::string& restore) {
    return testing::RunProcess(
        {testing::BinaryFromEnv("DISTVAL_PS_BIN"), "--bind", "tcp://127.0.0.1:0", "--shard-index",
         std::to_string(shard), "--num-shards", "2", "--checkpoint-dir", root, "--restore",
         restore},
        root + "/ps.log", 20);
  };
  const std::string data = dir + "/shard-1-of-2.dvckpt";
  {
    std::fstream f(data, std::ios::in | std::ios::out | std::ios::binary);
    f.seekg(-5, std::ios::end);
    char c = 0;
    f.get(c);
    f.seekp(-5, std::ios::end);
    f.put(static_cast<char>(c ^ 0x40));
  }
  auto r = run(1, "latest");
  EXPECT_NE(r.exit_code, 0);
  EXPECT_FALSE(r.timed_out);
  EXPECT_NE(r.output.find(data), std::string::npos) << r.output;
  EXPECT_NE(r.output.find("checksum mismatch"), std::string::npos) << r.output;
  // Shard 0's part is intact.
  fs::remove(dir + "/manifest-1-of-2.json");
  r = run(0, dir);
  EXPECT_NE(r.exit_code, 0);
  EXPECT_NE(r.output.find(dir + "/manifest-1-of-2.json"), std::string::npos) << r.output;
  EXPECT_NE(r.output.find("missing shard 1"), std::string::npos) << r.output;
  fs::remove_all(root);
}

// kill -9 at random moments while checkpoints are written (one per clock,
// 1 MB each): every restart with --restore latest loads a complete
// checkpoint whose values match its clock exactly.
TEST(ReliabilityTest, KillDuringCheckpointWritesAlwaysLeavesALoadableOne) {
  const std::string root = MakeTempDir();
  constexpr int64_t kN = 1 << 18;
  std::mt19937 rng(20261126);
  std::uniform_int_distribution<int> delay_ms(20, 250);
  int restored = 0, killed_mid_write = 0;
  for (int round = 0; round < 20; ++round) {
    LocalClusterOptions co;
    co.extra_args = {"--checkpoint-dir", root, "--checkpoint-every", "1", "--keep", "3"};
    bool have = false;
    for (const auto& e : fs::directory_iterator(root))
      have |= fs::exists(e.path() / "manifest-0-of-1.json");
    if (have) {
      co.extra_args.push_back("--restore");
      co.extra_args.push_back("latest");
    }
    auto cluster = LocalCluster::Start(co);
    ASSERT_TRUE(cluster.ok()) << "round " << round << ": " << cluster.status();
    // A push in flight when the server dies fails after this long.
    auto client = Connect(*cluster, protocol::Role::kWorker, std::chrono::milliseconds(400));
    ASSERT_NE(client, nullptr) << "round " << round;
    ASSERT_TRUE(client->CreateVariable("big", DType::kF32, Shape({kN}), Sgd(0.5)).ok());
    // SGD with lr 0.5 and a gradient of 0.25 per step: every value is
    // exactly -0.125 * clock.
    const int64_t clock = client->clock();
    std::vector<float> p(kN);
    ASSERT_TRUE(client->Pull({{"big", p}}).Wait().ok());
    const float want = -0.125f * static_cast<float>(clock);
    size_t bad = 0;
    for (float x : p) bad += x != want;
    EXPECT_EQ(bad, 0u) << "round " << round << " restored clock " << clock;
    if (clock > 0) ++restored;
    std::atomic<bool> stop{false};
    std::thread trainer([&] {
      std::vector<float> g(kN, 0.25f);
      while (!stop.load()) {
        if (!client->Push({{"big", g}}, true).Wait().ok()) break;
      }
    });
    std::this_thread::sleep_for(std::chrono::milliseconds(delay_ms(rng)));
    cluster->Kill(0);
    stop.store(true);
    trainer.join();
    for (const auto& e : fs::recursive_directory_iterator(root))
      if (e.path().extension() == ".tmp") {
        ++killed_mid_write;
        break;
      }
  }
  // How many kills hit a write is up to timing: reported, not asserted.
  std::cout << "rounds restored from a checkpoint: " << restored
            << ", kills that left a partial write: " << killed_mid_write << "\n";
  EXPECT_GE(restored, 1);
  fs::remove_all(root);
}

// NaN / Inf gradients: rejected by default (parameters unchanged, the clock
// not advanced), skipped per variable with --nan-policy skip.
// A co-located worker's large gradient streams in through shared memory;
// for a plain SGD variable applied at once (async) the server checks it
// piece by piece as it arrives and applies it out of place: a NaN or Inf
// anywhere, even in the last piece, leaves the parameters untouched.
TEST(ReliabilityTest, CoLocatedStreamedGradientsAreCheckedAllOrNothing) {
  const float nan = std::numeric_limits<float>::quiet_NaN();
  const float inf = std::numeric_limits<float>::infinity();
  constexpr int64_t kN = int64_t{1} << 20;  // 4 MiB: more than one ring's worth
  for (const std::string policy : {"reject", "skip"}) {
    SCOPED_TRACE(policy);
    LocalClusterOptions co;
    co.staleness = "async";
    co.extra_args = {"--nan-policy", policy};
    auto cluster = LocalCluster::Start(co);
    ASSERT_TRUE(cluster.ok()) << cluster.status();
    auto client = Connect(*cluster);
    ASSERT_NE(client, nullptr);
    VariableOptions vo = Sgd(0.5);
    vo.initializer = {0, protocol::InitConstant{1.0}};
    ASSERT_TRUE(client->CreateVariable("big", DType::kF32, Shape({kN}), vo).ok());
    std::vector<float> g(static_cast<size_t>(kN), 1.0f), w(static_cast<size_t>(kN));
    int refused = 0;
    for (int64_t at : {kN - 1, int64_t{0}, kN / 2}) {
      g[static_cast<size_t>(at)] = at == 0 ? inf : nan;
      Status st = client->Push({{"big", g}}, true).Wait();
      g[static_cast<size_t>(at)] = 1.0f;
      if (policy == "reject") {
        EXPECT_EQ(st.code(), StatusCode::kInvalidArgument) << st;
        EXPECT_NE(st.message().find("'big'"), std::string::npos) << st;
        client->set_clock(client->clock() - 1);  // not advanced on the server
      } else {
        EXPECT_TRUE(st.ok()) << st;
      }
      ++refused;
      ASSERT_TRUE(client->Pull({{"big", w}}).Wait().ok());
      for (int64_t i = 0; i < kN; ++i) ASSERT_EQ(w[static_cast<size_t>(i)], 1.0f) << "at " << i;
    }
    ASSERT_TRUE(client->Push({{"big", g}}, true).Wait().ok());
    ASSERT_TRUE(client->Pull({{"big", w}}).Wait().ok());
    for (int64_t i = 0; i < kN; ++i) ASSERT_EQ(w[static_cast<size_t>(i)], 0.5f) << "at " << i;
    auto stats = client->Stats();
    ASSERT_TRUE(stats.ok()) << stats.status();
    EXPECT_EQ(stats->front().nan_updates, static_cast<uint64_t>(refused));
    // It did go through shared memory.
    EXPECT_GT(client->stats().shared_memory_bytes, 4 * kN * 4);
  }
}

TEST(ReliabilityTest, NanGradientsNeverPoisonParameters) {
  const float nan = std::numeric_limits<float>::quiet_NaN();
  const float inf = std::numeric_limits<float>::infinity();
  // The shard's counter of refused / skipped updates, as Stats, the
  // Prometheus endpoint and distval-ctl status report it.
  auto nan_updates = [](Client& client) -> uint64_t {
    auto stats = client.Stats();
    EXPECT_TRUE(stats.ok()) << stats.status();
    return stats.ok() && stats->size() == 1 ? stats->front().nan_updates : 999;
  };
  for (const std::string policy : {"reject", "skip"}) {
    SCOPED_TRACE(policy);
    LocalClusterOptions co;
    const int metrics_port = testing::FreeTcpPort();
    co.extra_args = {"--nan-policy",      policy,
                     "--metrics-port",    std::to_string(metrics_port),
                     "--metrics-address", "127.0.0.1"};
    auto cluster = LocalCluster::Start(co);
    ASSERT_TRUE(cluster.ok()) << cluster.status();
    auto client = Connect(*cluster);
    ASSERT_NE(client, nullptr);
    EXPECT_EQ(nan_updates(*client), 0u);
    VariableOptions vo = Sgd(0.5);
    vo.initializer = {0, protocol::InitConstant{1.0}};
    ASSERT_TRUE(client->CreateVariable("w", DType::kF32, Shape({1000}), vo).ok());
    ASSERT_TRUE(client->CreateVariable("b", DType::kF32, Shape({10}), vo).ok());
    std::vector<float> gw(1000, 1.0f), gb(10, 1.0f);
    gw[123] = nan;
    gw[999] = inf;
    Status s = client->Push({{"w", gw}, {"b", gb}}, true).Wait();
    // The Client advanced its clock when it sent the push; a rejected push
    // did not advance it on the server: redo the step at the same clock.
    if (!s.ok()) client->set_clock(client->clock() - 1);
    std::vector<float> w(1000), b(10);
    ASSERT_TRUE(client->Pull({{"w", w}, {"b", b}}).Wait().ok());
    for (float x : w) ASSERT_EQ(x, 1.0f);
    // One update (w's) of one push refused or skipped.
    EXPECT_EQ(nan_updates(*client), 1u);
    if (policy == "reject") {
      EXPECT_EQ(s.code(), StatusCode::kInvalidArgument) << s;
      EXPECT_NE(s.message().find("'w' (2 of 1000 values)"), std::string::npos) << s;
      for (float x : b) EXPECT_EQ(x, 1.0f);
      // A clean push from the same clock goes through, and is not counted.
      gw[123] = gw[999] = 1.0f;
      ASSERT_TRUE(client->Push({{"w", gw}, {"b", gb}}, true).Wait().ok());
      ASSERT_TRUE(client->Pull({{"w", w}, {"b", b}}).Wait().ok());
      for (float x : w) ASSERT_EQ(x, 0.5f);
      EXPECT_EQ(nan_updates(*client), 1u);
      // A second poisoned push, this time in b: refused, counted.
      gb[0] = -inf;
      Status s2 = client->Push({{"w", gw}, {"b", gb}}, true).Wait();
      EXPECT_EQ(s2.code(), StatusCode::kInvalidArgument) << s2;
      client->set_clock(client->clock() - 1);
      EXPECT_EQ(nan_updates(*client), 2u);
    } else {
      EXPECT_TRUE(s.ok()) << s;
      for (float x : b) EXPECT_EQ(x, 0.5f);
      // Both variables poisoned: both updates skipped, both counted.
      gb[0] = nan;
      ASSERT_TRUE(client->Push({{"w", gw}, {"b", gb}}, true).Wait().ok());
      ASSERT_TRUE(client->Pull({{"w", w}, {"b", b}}).Wait().ok());
      for (float x : w) ASSERT_EQ(x, 1.0f);
      for (float x : b) ASSERT_EQ(x, 0.5f);
      EXPECT_EQ(nan_updates(*client), 3u);
    }
    // Parameters never start poisoned either: initial values with NaN/Inf
    // are refused (and not counted: they are not gradients).
    std::vector<float> init(4, 0.5f);
    init[2] = inf;
    VariableOptions iv = Sgd(0.1);
    iv.initial_values = init;
    Status created = client->CreateVariable("poisoned_init", DType::kF32, Shape({4}), iv);
    EXPECT_EQ(created.code(), StatusCode::kInvalidArgument) << created;
    EXPECT_NE(created.message().find("1 of 4 initial values are NaN/Inf"), std::string::npos)
        << created;
    init[2] = 0.5f;
    ASSERT_TRUE(client->CreateVariable("poisoned_init", DType::kF32, Shape({4}), iv).ok());
    const uint64_t expected = policy == "reject" ? 2 : 3;
    // The Prometheus counter (published as it changes) ...
    testing::HttpResponse m = testing::HttpRequest(metrics_port, "/metrics");
    ASSERT_EQ(m.status, 200);
    auto prom = testing::ParsePrometheusText(m.body);
    EXPECT_EQ(prom.Value("distval_ps_nan_updates_total", {{"shard", "0"}}),
              std::optional<double>(static_cast<double>(expected)))
        << m.body;
    // ... and distval-ctl status.
    auto r = testing::RunProcess(
        {testing::BinaryFromEnv("DISTVAL_CTL_BIN"), "--ps", cluster->endpoints()[0], "status"},
        cluster->LogPath(0) + ".ctl", 30);
    ASSERT_EQ(r.exit_code, 0) << r.output;
    EXPECT_NE(r.output.find("nan/inf updates refused or skipped: " + std::to_string(expected)),
              std::string::npos)
        << r.output;
    const std::string log = testing::ReadFile(cluster->LogPath(0));
    EXPECT_NE(log.find("gradient with NaN/Inf from worker 0 at clock 0 for 'w'"), std::string::npos)
        << log;
  }
}

// distval-ctl against a live 2-shard job: status, set-lr, set-staleness,
// checkpoint, shutdown (with its checkpoint).
TEST(ReliabilityTest, CtlCommands) {
  const std::string root = MakeTempDir();
  LocalClusterOptions co;
  co.num_shards = 2;
  co.extra_args = {"--checkpoint-dir", root};
  auto cluster = LocalCluster::Start(co);
  ASSERT_TRUE(cluster.ok()) << cluster.status();
  auto client = Connect(*cluster);
  ASSERT_NE(client, nullptr);
  ASSERT_TRUE(client->CreateVariable("w", DType::kF32, Shape({8}), Sgd(0.1)).ok());
  ASSERT_TRUE(client->CreateVariable("b", DType::kF32, Shape({8}), Sgd(0.1)).ok());
  std::vector<float> g(8, 1.0f);
  for (int i = 0; i < 3; ++i) ASSERT_TRUE(client->Push({{"w", g}, {"b", g}}, true).Wait().ok());
  const std::string eps = cluster->endpoints()[0] + "," + cluster->endpoints()[1];
  auto ctl = [&](std::vector<std::string> args) {
    args.insert(args.begin(), {testing::BinaryFromEnv("DISTVAL_CTL_BIN"), "--ps", eps});
    return testing::RunProcess(args, root + "/ctl.log", 30);
  };
  auto r = ctl({"status"});
  ASSERT_EQ(r.exit_code, 0) << r.output;
  EXPECT_NE(r.output.find("2 shard(s)"), std::string::npos) << r.output;
  EXPECT_NE(r.output.find("worker 0 clock 3 live"), std::string::npos) << r.output;
  EXPECT_NE(r.output.find("    w rows [0, 8)"), std::string::npos) << r.output;

  r = ctl({"set-lr", "w", "0.5"});
  ASSERT_EQ(r.exit_code, 0) << r.output;
  r = ctl({"set-lr", "nope", "0.5"});
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_NE(r.output.find("nope"), std::string::npos) << r.output;
  r = ctl({"set-staleness", "2"});
  ASSERT_EQ(r.exit_code, 0) << r.output;
  auto stats = client->Stats();
  ASSERT_TRUE(stats.ok());
  for (const auto& s : *stats) {
    EXPECT_EQ(s.staleness, 2);
    for (const auto& v : s.variables) EXPECT_EQ(v.learning_rate, v.name == "w" ? 0.5 : 0.1);
  }
  r = ctl({"checkpoint"});
  ASSERT_EQ(r.exit_code, 0) << r.output;
  EXPECT_NE(r.output.find("checkpoint at clock 3 in " + root + "/ckpt-000000000003"),
            std::string::npos)
      << r.output;
  r = ctl({"shutdown"});
  ASSERT_EQ(r.exit_code, 0) << r.output;
  EXPECT_TRUE(cluster->WaitExit(20));
  EXPECT_TRUE(fs::exists(root + "/ckpt-000000000003/manifest-1-of-2.json"));
  fs::remove_all(root);
}

// A push retried with the same request id (its reply was lost) is
// acknowledged again but applied once; a new hello (a restarted worker)
// forgets the ids.
TEST(ReliabilityTest, RetriedPushIsAppliedOnce) {
  LocalClusterOptions co;
  co.staleness = "async";
  auto cluster = LocalCluster::Start(co);
  ASSERT_TRUE(cluster.ok()) << cluster.status();
  {
    auto control = Connect(*cluster, protocol::Role::kControl);
    ASSERT_NE(control, nullptr);
    VariableOptions vo = Sgd(1.0);
    ASSERT_TRUE(control->CreateVariable("v", DType::kF32, Shape({4}), vo).ok());
  }
  transport::Context ctx(1);
  transport::SocketOptions so;
  so.shared_memory = false;
  so.linger_ms = 0;
  auto sock = transport::Socket::Create(ctx, transport::SocketType::kDealer, so);
  ASSERT_TRUE(sock.ok()) << sock.status();
  ASSERT_TRUE((*sock)->Connect(cluster->endpoints()[0]).ok());
  auto call = [&](protocol::Request req, std::vector<std::byte> payload = {}) -> protocol::Reply {
    req.worker_id = 0;
    transport::OutMessage out;
    out.push_back(transport::Payload::Copy(protocol::EncodeRequest(req)));
    if (!payload.empty()) out.push_back(transport::Payload::Copy(std::move(payload)));
    EXPECT_TRUE((*sock)->Send(std::move(out), std::chrono::milliseconds(2000)).ok());
    auto in = (*sock)->Receive(std::chrono::milliseconds(5000));
    EXPECT_TRUE(in.ok()) << in.status();
    if (!in.ok()) return {};
    std::vector<size_t> sizes;
    for (size_t i = 1; i < in->size(); ++i) sizes.push_back((*in)[i].size());
    auto reply = protocol::DecodeReply((*in)[0].bytes(), sizes);
    EXPECT_TRUE(reply.ok()) << reply.status();
    return reply.ok() ? *reply : protocol::Reply{};
  };
  auto hello = [&](uint64_t id) {
    protocol::Request r;
    r.request_id = id;
    protocol::Hello h;
    h.worker_index = 0;
    h.num_workers = 1;
    h.num_shards = 1;
    r.body = h;
    EXPECT_EQ(call(r).code, StatusCode::kOk);
  };
  auto push = [&](uint64_t id) {
    protocol::Request r;
    r.request_id = id;
    protocol::Push p;
    protocol::TensorRef values;
    values.frame = 1;
    values.shape = {4};
    p.updates.push_back({"v", values, protocol::RowRange{0, 4}});
    r.body = p;
    std::vector<float> g(4, 1.0f);
    std::vector<std::byte> bytes(16);
    std::memcpy(bytes.data(), g.data(), 16);
    protocol::Reply reply = call(r, bytes);
    EXPECT_EQ(reply.code, StatusCode::kOk) << reply.message;
    EXPECT_EQ(reply.request_id, id);
  };
  auto value = [&]() -> float {
    auto control = Connect(*cluster, protocol::Role::kControl);
    if (control == nullptr) return 0;
    std::vector<float> v(4);
    VariableOptions vo = Sgd(1.0);
    EXPECT_TRUE(control->CreateVariable("v", DType::kF32, Shape({4}), vo).ok());
    EXPECT_TRUE(control->Pull({{"v", v}}).Wait().ok());
    return v[0];
  };
  hello(1);
  push(77);
  push(77);  // the retry
  EXPECT_EQ(value(), -1.0f);
  push(78);
  EXPECT_EQ(value(), -2.0f);
  // A client whose connection dropped says hello again and resends what was
  // not answered: the dedupe outlives the hello.
  hello(2);
  push(78);
  EXPECT_EQ(value(), -2.0f);
  push(79);
  EXPECT_EQ(value(), -3.0f);
  const std::string log = testing::ReadFile(cluster->LogPath(0));
  EXPECT_NE(log.find("push 77 from worker 0 is a retry"), std::string::npos) << log;
}

// The client side of a server restart, request by request: requests made
// while the server is down wait and go through once it is back (a restart
// at this worker's clock needs no rollback), a push is applied once, a
// server that comes back empty is refused, and a server that stays away
// fails the requests with Unavailable after the retry timeout.
// One BSP shard that checkpoints into `root`.
StatusOr<LocalCluster> StartCheckpointingShard(const std::string& root) {
  LocalClusterOptions co;
  co.staleness = "0";
  co.extra_args = {"--checkpoint-dir", root};
  return LocalCluster::Start(co);
}

// A worker of `cluster` that heartbeats every 200 ms (a restart is noticed
// quickly) and waits up to 30 s for a request.
ClientOptions RestartClientOptions(const LocalCluster& cluster) {
  ClientOptions o;
  o.ps_endpoints = cluster.endpoints();
  o.connect_timeout = std::chrono::milliseconds(20000);
  o.request_timeout = std::chrono::milliseconds(30000);
  o.heartbeat_interval = std::chrono::milliseconds(200);
  return o;
}

TEST(ReliabilityTest, ClientRidesOutAServerRestart) {
  const std::string root = MakeTempDir();
  auto cluster = StartCheckpointingShard(root);
  ASSERT_TRUE(cluster.ok()) << cluster.status();
  ClientOptions o = RestartClientOptions(*cluster);
  o.retry_timeout = std::chrono::milliseconds(1500);
  auto connected = Client::Connect(o);
  ASSERT_TRUE(connected.ok()) << connected.status();
  Client& client = **connected;
  ASSERT_TRUE(client.CreateVariable("v", DType::kF32, Shape({8}), Sgd(1.0)).ok());
  std::vector<float> g(8, 1.0f), v(8);
  ASSERT_TRUE(client.Push({{"v", g}}, true).Wait().ok());
  ASSERT_TRUE(client.Push({{"v", g}}, true).Wait().ok());
  auto written = client.Checkpoint();
  ASSERT_TRUE(written.ok()) << written.status();
  ASSERT_EQ((*written)[0].clock, 2);

  // 1. Down, then back from the checkpoint at this worker's clock: the push
  // and pull made meanwhile complete, the push applied once.
  cluster->Kill(0);
  std::this_thread::sleep_for(std::chrono::milliseconds(100));
  RequestHandle push = client.Push({{"v", g}}, true);
  std::this_thread::sleep_for(std::chrono::milliseconds(300));
  EXPECT_FALSE(push.Done());  // waiting for the server, not failed
  ASSERT_TRUE(cluster->Restart(0, {"--restore", "latest"}).ok());
  ASSERT_TRUE(push.Wait().ok());
  ASSERT_TRUE(client.Pull({{"v", v}}).Wait().ok());
  EXPECT_EQ(v, std::vector<float>(8, -3.0f));
  EXPECT_EQ(client.clock(), 3);
  EXPECT_EQ(client.stats().reconnects, 1);
  EXPECT_EQ(client.stats().rollbacks, 0);

  // 2. Back as an empty server (no --restore): refused, not trained on.
  cluster->Kill(0);
  ASSERT_TRUE(cluster->Restart(0, {}).ok());
  Status empty = client.Pull({{"v", v}}).Wait();
  EXPECT_EQ(empty.code(), StatusCode::kFailedPrecondition) << empty;
  EXPECT_NE(empty.message().find("restarted without its variables"), std::string::npos) << empty;

  // 3. Gone for good: Unavailable after the retry timeout, naming the shard.
  cluster->Kill(0);
  std::this_thread::sleep_for(std::chrono::milliseconds(200));
  Status gone = client.Pull({{"v", v}}).Wait();
  EXPECT_EQ(gone.code(), StatusCode::kUnavailable) << gone;
  EXPECT_NE(gone.message().find(cluster->endpoints()[0]), std::string::npos) << gone;
  EXPECT_NE(gone.message().find("retry timeout"), std::string::npos) << gone;
  fs::remove_all(root);
}

// The same for a push sent in pieces (over TCP, 4 MiB in 1 MiB pieces): the
// server dies while it is waiting, the client resends the header and every
// piece to the restored server, and the push is applied exactly once.
TEST(ReliabilityTest, APushInPiecesRidesOutAServerRestart) {
  const std::string root = MakeTempDir();
  auto cluster = StartCheckpointingShard(root);
  ASSERT_TRUE(cluster.ok()) << cluster.status();
  ClientOptions o = RestartClientOptions(*cluster);
  o.shared_memory = false;  // pieces are for the network path
  auto connected = Client::Connect(o);
  ASSERT_TRUE(connected.ok()) << connected.status();
  Client& client = **connected;
  constexpr int64_t kN = 1 << 20;
  ASSERT_TRUE(client.CreateVariable("big", DType::kF32, Shape({kN}), Sgd(1.0)).ok());
  std::vector<float> g(kN), v(kN);
  for (int64_t i = 0; i < kN; ++i) g[i] = static_cast<float>(i % 5);
  ASSERT_TRUE(client.Push({{"big", g}}, true).Wait().ok());
  auto written = client.Checkpoint();
  ASSERT_TRUE(written.ok()) << written.status();
  cluster->Kill(0);
  std::this_thread::sleep_for(std::chrono::milliseconds(100));
  RequestHandle push = client.Push({{"big", g}}, true);
  std::this_thread::sleep_for(std::chrono::milliseconds(300));
  EXPECT_FALSE(push.Done());
  ASSERT_TRUE(cluster->Restart(0, {"--restore", "latest"}).ok());
  Status s = push.Wait();
  ASSERT_TRUE(s.ok()) << s;
  ASSERT_TRUE(client.Pull({{"big", v}}).Wait().ok());
  for (int64_t i = 0; i < kN; ++i) ASSERT_EQ(v[i], -2.0f * static_cast<float>(i % 5)) << i;
  EXPECT_EQ(client.stats().reconnects, 1);
  fs::remove_all(root);
}

// A parameter server killed with SIGKILL in the middle of a BSP job and
// restarted with --restore latest: the workers see the connection drop,
// reconnect with backoff, roll back to the checkpoint's clock and redo the
// steps after it (the data order is a function of the step), so the job
// ends with exactly the parameters of an uninterrupted run.
TEST(ReliabilityTest, ServerKilledAndRestoredEndsLikeAnUninterruptedRun) {
  if (!fs::exists(FashionMnistFiles(kDefaultFashionMnistDir, Split::kTrain).images))
    GTEST_SKIP() << "Fashion-MNIST not installed";
  const std::string worker_bin = testing::BinaryFromEnv("DISTVAL_WORKER_BIN");
  ASSERT_FALSE(worker_bin.empty()) << "DISTVAL_WORKER_BIN is not set";
  constexpr int kWorkers = 2;
  constexpr int kClocks = 3 * 40;  // 3 epochs of 3840 examples, global batch 96
  auto run = [&](const std::string& tag, bool kill_server) -> std::string {
    const std::string dir = MakeTempDir();
    LocalClusterOptions co;
    co.num_workers = kWorkers;
    co.staleness = "0";
    co.extra_args = {"--checkpoint-dir", dir + "/ckpt", "--checkpoint-every", "8"};
    auto cluster = LocalCluster::Start(co);
    EXPECT_TRUE(cluster.ok()) << cluster.status();
    if (!cluster.ok()) return "";
    std::vector<testing::ChildProcess> workers;
    for (int i = 0; i < kWorkers; ++i) {
      std::vector<std::string> args = {worker_bin,
                                       "--model",
                                       "mlp",
                                       "--train-limit",
                                       "3840",
                                       "--global-batch",
                                       "96",
                                       "--epochs",
                                       "3",
                                       "--optimizer",
                                       "adam",
                                       "--lr",
                                       "0.001",
                                       "--seed",
                                       "7",
                                       "--ps",
                                       cluster->endpoints()[0],
                                       "--worker-index",
                                       std::to_string(i),
                                       "--num-workers",
                                       std::to_string(kWorkers),
                                       "--staleness",
                                       "0",
                                       "--slowdown",
                                       "4",
                                       "--retry-timeout",
                                       "60"};
      if (i == 0) args.insert(args.end(), {"--save", dir + "/model"});
      auto p = testing::ChildProcess::Start(args, dir + "/worker-" + std::to_string(i) + ".log");
      EXPECT_TRUE(p.ok()) << p.status();
      if (!p.ok()) return "";
      workers.push_back(std::move(*p));
    }
    int64_t killed_after = -1;
    if (kill_server) {
      // Kill once a checkpoint past the first is written: well into the run,
      // with steps after the checkpoint already applied.
      const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(60);
      while (!fs::exists(dir + "/ckpt/ckpt-000000000024") &&
             std::chrono::steady_clock::now() < deadline)
        std::this_thread::sleep_for(std::chrono::milliseconds(2));
      EXPECT_TRUE(fs::exists(dir + "/ckpt/ckpt-000000000024")) << "the job never got there";
      cluster->Kill(0);
      killed_after = 24;
      // Down for a while: the workers keep retrying.
      std::this_thread::sleep_for(std::chrono::milliseconds(500));
      Status restarted = cluster->Restart(0, {"--restore", "latest"});
      EXPECT_TRUE(restarted.ok()) << restarted;
    }
    for (int i = 0; i < kWorkers; ++i) {
      testing::ProcessResult r = workers[static_cast<size_t>(i)].Wait(120);
      EXPECT_FALSE(r.timed_out) << tag << " worker " << i << " timed out:\n" << r.output;
      EXPECT_EQ(r.exit_code, 0) << tag << " worker " << i << ":\n" << r.output;
      EXPECT_NE(r.output.find("done: "), std::string::npos) << r.output;
      if (kill_server) {
        // It lost the server, found it again and went back to the checkpoint.
        EXPECT_NE(r.output.find("unavailable: connection lost"), std::string::npos) << r.output;
        EXPECT_NE(r.output.find("parameter servers rolled back to clock"), std::string::npos)
            << r.output;
      }
    }
    if (kill_server) {
      const std::string log = testing::ReadFile(cluster->LogPath(0));
      EXPECT_NE(log.find("restored "), std::string::npos) << log;
      EXPECT_GE(killed_after, 24);
    }
    // The servers' clock is the job's end: every step applied once.
    auto control = Connect(*cluster, protocol::Role::kControl);
    if (control != nullptr) {
      auto stats = control->Stats();
      EXPECT_TRUE(stats.ok()) << stats.status();
      if (stats.ok()) {
        for (const auto& w : (*stats)[0].workers) EXPECT_EQ(w.clock, kClocks) << tag;
      }
    }
    return dir;
  };
  const std::string uninterrupted = run("uninterrupted", false);
  const std::string restarted = run("restarted", true);
  ASSERT_FALSE(uninterrupted.empty());
  ASSERT_FALSE(restarted.empty());
  auto a = ReadSafetensors(uninterrupted + "/model/variables.safetensors");
  auto b = ReadSafetensors(restarted + "/model/variables.safetensors");
  ASSERT_TRUE(a.ok()) << a.status();
  ASSERT_TRUE(b.ok()) << b.status();
  ASSERT_EQ(a->tensors.size(), b->tensors.size());
  ASSERT_FALSE(a->tensors.empty());
  size_t differing = 0;
  for (size_t t = 0; t < a->tensors.size(); ++t) {
    const Tensor& x = a->tensors[t].second;
    const Tensor* y = b->Find(a->tensors[t].first);
    ASSERT_NE(y, nullptr) << a->tensors[t].first;
    ASSERT_EQ(x.num_elements(), y->num_elements());
    const float* px = x.data_as<float>();
    const float* py = y->data_as<float>();
    for (int64_t i = 0; i < x.num_elements(); ++i) {
      // BSP sums the workers' gradients in worker order on one thread per
      // range: the same steps give the same bits; allow float rounding.
      EXPECT_NEAR(px[i], py[i], 1e-6f + 1e-5f * std::fabs(px[i]))
          << a->tensors[t].first << "[" << i << "]";
      differing += px[i] != py[i] ? 1 : 0;
    }
  }
  std::cout << "restarted run vs uninterrupted: " << differing << " parameters differ in their bits"
            << std::endl;
  fs::remove_all(uninterrupted);
  fs::remove_all(restarted);
}

// Valid requests whose mutations the hostile-input test sends (worker id -1:
// a control client, so none of them can move the real worker's clock).
struct Valid {
  protocol::Request request;
  std::vector<std::vector<std::byte>> payloads;
};
std::vector<Valid> ValidRequests() {
  std::vector<Valid> out;
  auto add = [&](protocol::RequestBody body, std::vector<std::vector<std::byte>> payloads = {}) {
    Valid v;
    v.request.request_id = out.size() + 1;
    v.request.worker_id = -1;
    v.request.body = std::move(body);
    v.payloads = std::move(payloads);
    out.push_back(std::move(v));
  };
  protocol::TensorRef values;
  values.frame = 1;
  values.shape = {64, 4};
  protocol::Push dense;
  dense.updates.push_back({"w", values, protocol::RowRange{0, 64}});
  add(dense, {std::vector<std::byte>(64 * 4 * 4)});
  protocol::TensorRef idx;
  idx.frame = 1;
  idx.dtype = DType::kI64;
  idx.shape = {2};
  protocol::TensorRef rows = values;
  rows.frame = 2;
  rows.shape = {2, 4};
  protocol::Push sparse;
  sparse.updates.push_back({"w", rows, idx});
  std::vector<std::byte> idx_bytes(16);
  const int64_t two[2] = {3, 60};
  std::memcpy(idx_bytes.data(), two, 16);
  add(sparse, {idx_bytes, std::vector<std::byte>(2 * 4 * 4)});
  protocol::Pull pull;
  pull.reads.push_back({"w", protocol::Encoding::kRaw, protocol::RowRange{0, 64}});
  add(pull);
  protocol::Pull pull_rows;
  pull_rows.reads.push_back({"w", protocol::Encoding::kRaw, idx});
  add(pull_rows, {idx_bytes});
  protocol::CreateVariable cv;
  cv.spec.name = "w";
  cv.spec.shape = {64, 4};
  cv.rows = {0, 64};
  add(cv);
  add(protocol::Stats{});
  add(protocol::Heartbeat{});
  protocol::Hello hello;
  hello.role = protocol::Role::kControl;
  add(hello);
  return out;
}

// Requests a hostile client could send that change the job itself (not
// malformed, just powerful): the test does not send those.
bool Disruptive(const protocol::Request& r) {
  return r.worker_id == 0 || std::holds_alternative<protocol::Shutdown>(r.body) ||
         std::holds_alternative<protocol::SetMode>(r.body) ||
         std::holds_alternative<protocol::SetLearningRate>(r.body) ||
         std::holds_alternative<protocol::Checkpoint>(r.body);
}

// 10,000 random and mutated requests to a live server: it answers each with
// an error (or drops it), never OK for one that does not decode, keeps
// running, and a worker then trains exactly.
TEST(ReliabilityTest, HostileFramesNeitherCrashNorPoisonTheServer) {
  LocalClusterOptions co;
  co.extra_args = {"--max-frames", "8", "--max-variables", "64", "--max-variable-bytes", "4096"};
  auto cluster = LocalCluster::Start(co);
  ASSERT_TRUE(cluster.ok()) << cluster.status();
  {
    auto control = Connect(*cluster, protocol::Role::kControl);
    ASSERT_NE(control, nullptr);
    ASSERT_TRUE(control->CreateVariable("w", DType::kF32, Shape({64, 4}), Sgd(0.1)).ok());
  }
  transport::Context ctx(1);
  transport::SocketOptions so;
  so.shared_memory = false;
  so.linger_ms = 0;
  auto sock = transport::Socket::Create(ctx, transport::SocketType::kDealer, so);
  ASSERT_TRUE(sock.ok()) << sock.status();
  ASSERT_TRUE((*sock)->Connect(cluster->endpoints()[0]).ok());

  const std::vector<Valid> valid = ValidRequests();
  std::mt19937 rng(77);
  auto rand = [&](size_t n) { return static_cast<size_t>(rng() % n); };
  int sent = 0, sent_valid = 0, skipped = 0, replies = 0, ok_replies = 0, too_many_frames = 0;
  std::set<uint64_t> valid_ids;  // ids of sent requests that decode
  auto drain = [&](std::chrono::milliseconds wait) {
    for (;;) {
      auto in = (*sock)->Receive(wait);
      if (!in.ok()) return;
      ++replies;
      ASSERT_GE(in->size(), 1u);
      std::vector<size_t> sizes;
      for (size_t i = 1; i < in->size(); ++i) sizes.push_back((*in)[i].size());
      auto reply = protocol::DecodeReply((*in)[0].bytes(), sizes);
      ASSERT_TRUE(reply.ok()) << reply.status();
      if (reply->code == StatusCode::kOk) {
        ++ok_replies;
        EXPECT_TRUE(valid_ids.count(reply->request_id)) << reply->request_id;
      } else {
        EXPECT_FALSE(reply->message.empty());
        if (reply->message.find("(--max-frames)") != std::string::npos) ++too_many_frames;
      }
    }
  };
  while (sent < 10000) {
    std::vector<std::vector<std::byte>> frames;
    if (rand(4) == 0) {
      // Random garbage: 1..10 frames of 0..300 random bytes.
      const size_t n = 1 + rand(10);
      for (size_t f = 0; f < n; ++f) {
        std::vector<std::byte> b(rand(301));
        for (auto& x : b) x = static_cast<std::byte>(rng());
        frames.push_back(std::move(b));
      }
    } else {
      const Valid& v = valid[rand(valid.size())];
      Valid m = v;
      m.request.request_id = 1000 + static_cast<uint64_t>(sent);
      frames.push_back(protocol::EncodeRequest(m.request));
      for (const auto& p : m.payloads) frames.push_back(p);
      // 1..4 mutations.
      for (size_t k = 1 + rand(4); k > 0; --k) {
        auto& f = frames[rand(frames.size())];
        switch (rand(6)) {
          case 0:
          case 1:  // flip a byte
            if (!f.empty()) f[rand(f.size())] ^= static_cast<std::byte>(1 + rand(255));
            break;
          case 2:  // truncate
            f.resize(rand(f.size() + 1));
            break;
          case 3:  // extend
            f.resize(f.size() + 1 + rand(64), static_cast<std::byte>(rng()));
            break;
          case 4:  // drop or duplicate a frame
            if (frames.size() > 1 && rand(2) == 0)
              frames.pop_back();
            else
              frames.push_back(frames.back());
            break;
          case 5:  // many frames (beyond --max-frames)
            frames.resize(frames.size() + rand(12));
            break;
        }
      }
    }
    std::vector<size_t> sizes;
    for (size_t i = 1; i < frames.size(); ++i) sizes.push_back(frames[i].size());
    auto decoded = protocol::DecodeRequest(frames[0], sizes);
    if (decoded.ok() && Disruptive(*decoded)) {
      ++skipped;
      continue;
    }
    if (decoded.ok()) {
      ++sent_valid;
      valid_ids.insert(decoded->request_id);
    }
    transport::OutMessage out;
    for (auto& f : frames) out.push_back(transport::Payload::Copy(std::move(f)));
    ASSERT_TRUE((*sock)->Send(std::move(out), std::chrono::milliseconds(2000)).ok());
    ++sent;
    if (sent % 64 == 0) drain(std::chrono::milliseconds(0));
  }
  drain(std::chrono::milliseconds(500));
  std::cout << "sent " << sent << " (" << sent_valid << " decodable), skipped " << skipped
            << ", replies " << replies << " (" << ok_replies << " OK)\n";
  EXPECT_LE(replies, sent);
  EXPECT_LE(ok_replies, sent_valid);
  EXPECT_GT(too_many_frames, 0);
  EXPECT_GE(replies, sent / 2);  // almost all are answered (no reply: no frames to answer)

  // The server is up and a worker trains exactly on a fresh variable.
  auto client = Connect(*cluster);
  ASSERT_NE(client, nullptr);
  VariableOptions vo = Sgd(0.5);
  ASSERT_TRUE(client->CreateVariable("fresh", DType::kF32, Shape({32}), vo).ok());
  std::vector<float> g(32, 0.25f), p(32);
  for (int step = 0; step < 20; ++step) ASSERT_TRUE(client->Push({{"fresh", g}}, true).Wait().ok());
  ASSERT_TRUE(client->Pull({{"fresh", p}}).Wait().ok());
  for (float x : p) EXPECT_EQ(x, -2.5f);
  // --max-variable-bytes 4096: a larger variable is refused before it is
  // allocated (so that no request can make the server allocate at will).
  Status big = client->CreateVariable("big", DType::kF32, Shape({1025}), vo);
  EXPECT_EQ(big.code(), StatusCode::kResourceExhausted) << big;
  EXPECT_NE(big.message().find("--max-variable-bytes"), std::string::npos) << big;
  ASSERT_TRUE(client->CreateVariable("not_big", DType::kF32, Shape({1024}), vo).ok());
  auto stats = client->Stats();
  ASSERT_TRUE(stats.ok()) << stats.status();
  const size_t held = (*stats)[0].variables.size();
  ASSERT_LE(held, 64u);
  // --max-variables 64: the shard creates no more.
  for (size_t i = held; i < 64; ++i)
    ASSERT_TRUE(
        client->CreateVariable("extra" + std::to_string(i), DType::kF32, Shape({2}), vo).ok());
  Status s = client->CreateVariable("one_too_many", DType::kF32, Shape({2}), vo);
  EXPECT_EQ(s.code(), StatusCode::kResourceExhausted) << s;
  EXPECT_NE(s.message().find("--max-variables"), std::string::npos) << s;
}

}  // namespace
}  // namespace distval
