// The worker Client's I/O under concurrency, against a real distval-ps: the
// sockets move between the background I/O thread and caller threads (the
// I/O lease, worker/client.cc), so every request must complete whoever
// drives the sockets: requests waited for on the submitting thread, on
// another thread, or by nobody; several threads sharing one client; and a
// client destroyed with requests in flight. Also: a push is acknowledged
// before the server applies it, yet every later pull reflects it.
#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <functional>
#include <limits>
#include <memory>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "distval/client.h"
#include "distval/client_observer.h"
#include "local_cluster.h"

namespace distval {
namespace {

using testing::LocalCluster;
using testing::LocalClusterOptions;

// Worker `index` of `num_workers` on c's shards; `adjust` may change the
// options before connecting.
std::unique_ptr<Client> Connect(const LocalCluster& c, int index, int num_workers,
                                bool shared_memory = true,
                                const std::function<void(ClientOptions&)>& adjust = {}) {
  ClientOptions o;
  o.shared_memory = shared_memory;
  o.ps_endpoints = c.endpoints();
  o.worker_index = index;
  o.num_workers = num_workers;
  o.connect_timeout = std::chrono::milliseconds(20000);
  o.heartbeat_interval = std::chrono::milliseconds(200);
  if (adjust) adjust(o);
  auto client = Client::Connect(o);
  EXPECT_TRUE(client.ok()) << client.status();
  return client.ok() ? std::move(*client) : nullptr;
}

// SGD with learning rate 1 from zeros: after pushes of gradients g1..gk the
// parameters are -(g1 + ... + gk), exactly, for small integer gradients.
VariableOptions Accumulator() {
  VariableOptions vo;
  vo.initializer.kind = protocol::InitZeros{};
  vo.optimizer.kind = protocol::OptimizerKind::kSgd;
  vo.optimizer.learning_rate = 1.0;
  return vo;
}

// Glorot-initialized variables (seed 3): plain SGD at `sgd_learning_rate`,
// and Adam at 1e-3.
std::pair<VariableOptions, VariableOptions> GlorotSgdAndAdam(double sgd_learning_rate) {
  VariableOptions sgd;
  sgd.initializer = {3, protocol::InitGlorotUniform{}};
  sgd.optimizer.kind = protocol::OptimizerKind::kSgd;
  sgd.optimizer.learning_rate = sgd_learning_rate;
  VariableOptions adam = sgd;
  adam.optimizer.kind = protocol::OptimizerKind::kAdam;
  adam.optimizer.learning_rate = 1e-3;
  return {sgd, adam};
}

LocalClusterOptions AsyncCluster(int shards, int workers) {
  LocalClusterOptions co;
  co.num_shards = shards;
  co.num_workers = workers;
  co.staleness = "async";
  return co;
}

TEST(ClientIoTest, ThreadsSharingOneClientEachReadTheirOwnWrites) {
  auto cluster = LocalCluster::Start(AsyncCluster(2, 1));
  ASSERT_TRUE(cluster.ok()) << cluster.status();
  auto client = Connect(*cluster, 0, 1);
  ASSERT_NE(client, nullptr);
  constexpr int kThreads = 4, kSteps = 200, kElems = 64;
  for (int t = 0; t < kThreads; ++t) {
    VariableOptions vo = Accumulator();
    vo.partitioner = Partitioner::FixedShards(2);
    // (Not "v" + to_string(t): g++ 12 -O3 gives a false -Wrestrict on it here.)
    std::string name = std::to_string(t);
    name.insert(name.begin(), 'v');
    ASSERT_TRUE(client->CreateVariable(name, DType::kF32, Shape{kElems}, vo).ok());
  }
  auto body = [&](int t) {
    const std::string name = "v" + std::to_string(t);
    std::vector<float> g(kElems, static_cast<float>(t + 1)), p(kElems);
    for (int step = 1; step <= kSteps; ++step) {
      Status s = client->Push({{name, g}}, /*advance_clock=*/false).Wait();
      ASSERT_TRUE(s.ok()) << s;
      s = client->Pull({{name, p}}).Wait();
      ASSERT_TRUE(s.ok()) << s;
      // The acknowledged push is visible to the very next pull.
      for (int i = 0; i < kElems; ++i)
        ASSERT_EQ(p[i], -static_cast<float>((t + 1) * step)) << name << " step " << step;
    }
  };
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) threads.emplace_back(body, t);
  for (auto& th : threads) th.join();
}

TEST(ClientIoTest, RequestsNobodyWaitsForComplete) {
  auto cluster = LocalCluster::Start(AsyncCluster(1, 1));
  ASSERT_TRUE(cluster.ok()) << cluster.status();
  // Heartbeats so rare that the background thread's periodic look cannot
  // come before the test gives up: only the takeover timer that a caller
  // starts when it leaves a request can get the reply picked up.
  auto client = Connect(*cluster, 0, 1, /*shared_memory=*/true, [](ClientOptions& o) {
    o.heartbeat_interval = std::chrono::minutes(10);
  });
  ASSERT_NE(client, nullptr);
  ASSERT_TRUE(client->CreateVariable("w", DType::kF32, Shape{1000}, Accumulator()).ok());
  std::vector<float> g(1000, 2.f), p(1000, 0.f);
  ASSERT_TRUE(client->Push({{"w", g}}, false).Wait().ok());
  // Submit and never call Wait: the background thread must take the reply
  // over, land it in the buffer and complete the handle.
  RequestHandle h = client->Pull({{"w", p}});
  const auto give_up = std::chrono::steady_clock::now() + std::chrono::seconds(10);
  while (!h.Done() && std::chrono::steady_clock::now() < give_up)
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  ASSERT_TRUE(h.Done());
  for (float x : p) ASSERT_EQ(x, -2.f);
  EXPECT_TRUE(h.Wait(std::chrono::milliseconds(0)).ok());
}

TEST(ClientIoTest, AHandleCanBeWaitedForOnAnotherThread) {
  auto cluster = LocalCluster::Start(AsyncCluster(1, 1));
  ASSERT_TRUE(cluster.ok()) << cluster.status();
  auto client = Connect(*cluster, 0, 1);
  ASSERT_NE(client, nullptr);
  ASSERT_TRUE(client->CreateVariable("w", DType::kF32, Shape{256}, Accumulator()).ok());
  std::vector<float> g(256, 1.f), p(256, 0.f);
  for (int round = 1; round <= 100; ++round) {
    RequestHandle push = client->Push({{"w", g}}, false);
    Status push_status;
    std::thread waiter([&] { push_status = push.Wait(); });
    waiter.join();
    ASSERT_TRUE(push_status.ok()) << push_status;
    RequestHandle pull = client->Pull({{"w", p}});
    Status pull_status;
    std::thread other([&] { pull_status = pull.Wait(); });
    other.join();
    ASSERT_TRUE(pull_status.ok()) << pull_status;
    ASSERT_EQ(p[0], -static_cast<float>(round));
    ASSERT_EQ(p[255], -static_cast<float>(round));
  }
}

TEST(ClientIoTest, ManyRequestsInFlightAllComplete) {
  auto cluster = LocalCluster::Start(AsyncCluster(2, 1));
  ASSERT_TRUE(cluster.ok()) << cluster.status();
  auto client = Connect(*cluster, 0, 1);
  ASSERT_NE(client, nullptr);
  VariableOptions vo = Accumulator();
  vo.partitioner = Partitioner::FixedShards(2);
  ASSERT_TRUE(client->CreateVariable("w", DType::kF32, Shape{128}, vo).ok());
  std::vector<float> g(128, 1.f);
  constexpr int kInFlight = 500;
  std::vector<RequestHandle> handles;
  for (int i = 0; i < kInFlight; ++i) handles.push_back(client->Push({{"w", g}}, false));
  // Wait in reverse order: the last handle's waiter drives every reply.
  for (int i = kInFlight - 1; i >= 0; --i) ASSERT_TRUE(handles[i].Wait().ok()) << i;
  std::vector<float> p(128);
  ASSERT_TRUE(client->Pull({{"w", p}}).Wait().ok());
  for (float x : p) ASSERT_EQ(x, -static_cast<float>(kInFlight));
}

TEST(ClientIoTest, AnotherClientSeesAnAcknowledgedPush) {
  auto cluster = LocalCluster::Start(AsyncCluster(1, 2));
  ASSERT_TRUE(cluster.ok()) << cluster.status();
  auto a = Connect(*cluster, 0, 2);
  auto b = Connect(*cluster, 1, 2);
  ASSERT_NE(a, nullptr);
  ASSERT_NE(b, nullptr);
  constexpr int kElems = 1 << 20;  // large enough that the apply takes a while
  ASSERT_TRUE(a->CreateVariable("big", DType::kF32, Shape{kElems}, Accumulator()).ok());
  ASSERT_TRUE(b->CreateVariable("big", DType::kF32, Shape{kElems}, Accumulator()).ok());
  std::vector<float> g(kElems, 1.f), p(kElems);
  for (int step = 1; step <= 5; ++step) {
    ASSERT_TRUE(a->Push({{"big", g}}, false).Wait().ok());
    ASSERT_TRUE(b->Pull({{"big", p}}).Wait().ok());
    ASSERT_EQ(p[0], -static_cast<float>(step));
    ASSERT_EQ(p[kElems - 1], -static_cast<float>(step));
  }
}

TEST(ClientIoTest, DestroyingTheClientCancelsARequestInFlight) {
  LocalClusterOptions co;
  co.num_shards = 1;
  co.num_workers = 2;
  co.staleness = "0";
  co.worker_timeout_s = 60;  // worker 1 never shows up, and is not dropped
  auto cluster = LocalCluster::Start(co);
  ASSERT_TRUE(cluster.ok()) << cluster.status();
  auto client = Connect(*cluster, 0, 2);
  ASSERT_NE(client, nullptr);
  ASSERT_TRUE(client->CreateVariable("w", DType::kF32, Shape{16}, Accumulator()).ok());
  std::vector<float> g(16, 1.f), p(16);
  ASSERT_TRUE(client->Push({{"w", g}}, /*advance_clock=*/true).Wait().ok());
  // BSP: the pull for clock 1 waits for worker 1, which never comes.
  RequestHandle held = client->Pull({{"w", p}});
  std::this_thread::sleep_for(std::chrono::milliseconds(50));
  EXPECT_FALSE(held.Done());
  client.reset();
  Status s = held.Wait(std::chrono::milliseconds(5000));
  EXPECT_EQ(s.code(), StatusCode::kCancelled) << s;
}

// A client over TCP (pieces are for transfers over the network) that sends
// pushes and asks for pulls in pieces of the given sizes (0: whole).
std::unique_ptr<Client> ConnectPieces(const LocalCluster& c, int index, int num_workers,
                                      size_t push_chunk_bytes, size_t pull_chunk_bytes,
                                      ClientObserver* observer) {
  return Connect(c, index, num_workers, /*shared_memory=*/false, [&](ClientOptions& o) {
    o.push_chunk_bytes = push_chunk_bytes;
    o.pull_chunk_bytes = pull_chunk_bytes;
    o.observer = observer;
  });
}

// Counts the pieces of chunked pull replies a client receives.
class ChunkCounter : public ClientObserver {
 public:
  void OnSend(int, const protocol::Request&, const transport::OutMessage&) override {}
  void OnReply(int, const protocol::Reply& reply, const transport::InMessage& message) override {
    if (std::holds_alternative<protocol::PullChunk>(reply.body)) {
      pieces.fetch_add(1);
      // One frame of values after the header, never more than asked for
      // (the server's lower bound is 64 KiB).
      if (message.size() != 2 || message[1].size() > 64 * 1024) malformed.fetch_add(1);
    }
  }
  std::atomic<int> pieces{0}, malformed{0};
};

// A large pull into the caller's buffer comes back in pieces (one message
// each, copied in as they arrive): every byte lands where it belongs, for
// variables split over shards, sizes that are not a multiple of the piece,
// and small reads answered whole beside them; the same pull with pieces off
// gives the same bytes.
TEST(ClientIoTest, ChunkedPullsLandEveryByteInTheCallersBuffer) {
  auto cluster = LocalCluster::Start(AsyncCluster(2, 1));
  ASSERT_TRUE(cluster.ok()) << cluster.status();
  ChunkCounter chunked_counter, whole_counter;
  auto chunked = ConnectPieces(*cluster, 0, 1, 0, 64 * 1024, &chunked_counter);
  auto whole = ConnectPieces(*cluster, 0, 1, 0, 0, &whole_counter);
  ASSERT_NE(chunked, nullptr);
  ASSERT_NE(whole, nullptr);
  // 300001 floats over two shards (~600 KB each: 10 pieces, the last one
  // short), 50000 on one shard (3-4 pieces), 10 (whole).
  const std::vector<std::pair<std::string, int64_t>> vars = {
      {"big", 300001}, {"mid", 50000}, {"tiny", 10}};
  for (const auto& [name, n] : vars) {
    VariableOptions vo = Accumulator();
    if (name == "big") vo.partitioner = Partitioner::FixedShards(2);
    ASSERT_TRUE(chunked->CreateVariable(name, DType::kF32, Shape{n}, vo).ok());
    ASSERT_TRUE(whole->CreateVariable(name, DType::kF32, Shape{n}, vo).ok());
    std::vector<float> g(static_cast<size_t>(n));
    for (int64_t i = 0; i < n; ++i) g[i] = static_cast<float>(i % 1999) - 999.f;
    ASSERT_TRUE(chunked->Push({{name, g}}, /*advance_clock=*/false).Wait().ok());
  }
  std::vector<std::vector<float>> a, b;
  for (const auto& [name, n] : vars) {
    a.emplace_back(static_cast<size_t>(n), 12345.f);
    b.emplace_back(static_cast<size_t>(n), 12345.f);
  }
  for (int round = 0; round < 3; ++round) {
    Status s = chunked->Pull({{"big", a[0]}, {"mid", a[1]}, {"tiny", a[2]}}).Wait();
    ASSERT_TRUE(s.ok()) << s;
    s = whole->Pull({{"big", b[0]}, {"mid", b[1]}, {"tiny", b[2]}}).Wait();
    ASSERT_TRUE(s.ok()) << s;
  }
  for (size_t v = 0; v < vars.size(); ++v) {
    for (int64_t i = 0; i < vars[v].second; ++i)
      ASSERT_EQ(a[v][i], 999.f - static_cast<float>(i % 1999)) << vars[v].first << "[" << i << "]";
    EXPECT_EQ(a[v], b[v]) << vars[v].first;
  }
  // Shard 0 holds half of big and (by bytes) mid or tiny: each round at
  // least the two halves of big came in pieces, about ten each.
  EXPECT_GE(chunked_counter.pieces.load(), 3 * 2 * 9);
  EXPECT_EQ(chunked_counter.malformed.load(), 0);
  EXPECT_EQ(whole_counter.pieces.load(), 0);
}

// Counts the pieces of chunked pushes a client sends.
class PushPieceCounter : public ClientObserver {
 public:
  void OnSend(int, const protocol::Request& request, const transport::OutMessage&) override {
    if (std::holds_alternative<protocol::PushChunk>(request.body)) pieces.fetch_add(1);
  }
  void OnReply(int, const protocol::Reply&, const transport::InMessage&) override {}
  std::atomic<int> pieces{0};
};

// Gradient `step` of a test: small integers, different at every element.
std::vector<float> TestGradient(int64_t n, int step) {
  std::vector<float> g(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) g[i] = static_cast<float>((i * 7 + step * 3) % 11) - 5.f;
  return g;
}

// A large dense push sent in pieces (each checked and, for plain SGD,
// applied out of place as it arrives; for other rules assembled and applied
// after the last) changes the parameters exactly as the same push sent
// whole: SGD and Adam, async and BSP, sizes that are not a multiple of the
// piece. A NaN in the last piece rejects the whole push and changes nothing.
TEST(ClientIoTest, PushesInPiecesApplyExactlyWhatWholePushesApply) {
  for (const std::string staleness : {"async", "0"}) {
    SCOPED_TRACE("staleness " + staleness);
    LocalClusterOptions co = AsyncCluster(1, 1);
    co.staleness = staleness;
    auto pieces_cluster = LocalCluster::Start(co);
    auto whole_cluster = LocalCluster::Start(co);
    ASSERT_TRUE(pieces_cluster.ok()) << pieces_cluster.status();
    ASSERT_TRUE(whole_cluster.ok()) << whole_cluster.status();
    PushPieceCounter counter;
    auto pieces = ConnectPieces(*pieces_cluster, 0, 1, 64 * 1024, 0, &counter);
    auto whole = ConnectPieces(*whole_cluster, 0, 1, 0, 0, nullptr);
    ASSERT_NE(pieces, nullptr);
    ASSERT_NE(whole, nullptr);
    constexpr int64_t kN = 300001;  // 19 pieces of 64 KiB, the last one short
    for (Client* c : {pieces.get(), whole.get()}) {
      const auto [sgd, adam] = GlorotSgdAndAdam(0.125);
      ASSERT_TRUE(c->CreateVariable("sgd", DType::kF32, Shape{kN}, sgd).ok());
      ASSERT_TRUE(c->CreateVariable("adam", DType::kF32, Shape{kN}, adam).ok());
    }
    for (int step = 0; step < 3; ++step) {
      const std::vector<float> g = TestGradient(kN, step);
      for (Client* c : {pieces.get(), whole.get()}) {
        // One variable per push, so that each one goes in pieces.
        Status s = c->Push({{"sgd", g}}, /*advance_clock=*/false).Wait();
        ASSERT_TRUE(s.ok()) << s;
        s = c->Push({{"adam", g}}).Wait();
        ASSERT_TRUE(s.ok()) << s;
      }
    }
    EXPECT_GE(counter.pieces.load(), 3 * 2 * 19);
    std::vector<float> a(kN), b(kN);
    for (const std::string name : {"sgd", "adam"}) {
      ASSERT_TRUE(pieces->Pull({{name, a}}).Wait().ok());
      ASSERT_TRUE(whole->Pull({{name, b}}).Wait().ok());
      ASSERT_EQ(a, b) << name;
    }
    // A NaN in the last piece: rejected, and nothing of it applied.
    std::vector<float> poisoned = TestGradient(kN, 7);
    poisoned[kN - 2] = std::numeric_limits<float>::quiet_NaN();
    for (const std::string name : {"sgd", "adam"}) {
      ASSERT_TRUE(pieces->Pull({{name, a}}).Wait().ok());
      Status s = pieces->Push({{name, poisoned}}, /*advance_clock=*/false).Wait();
      EXPECT_EQ(s.code(), StatusCode::kInvalidArgument) << s;
      EXPECT_NE(s.message().find("NaN"), std::string::npos) << s;
      ASSERT_TRUE(pieces->Pull({{name, b}}).Wait().ok());
      EXPECT_EQ(a, b) << name;
    }
    auto stats = pieces->Stats();
    ASSERT_TRUE(stats.ok()) << stats.status();
    for (const auto& var : (*stats)[0].variables) EXPECT_EQ(var.version, 3u) << var.name;
  }
}

// Two workers pushing pieces of the same plain SGD variable at the same
// time: their pieces interleave on the server, so at most one push at a time
// is applied out of place as it arrives, and one whose variable changed
// meanwhile is applied after the other. Nothing is lost: with learning rate
// 1 from zeros the parameters are minus the sum of every gradient, exactly.
TEST(ClientIoTest, InterleavedPushesInPiecesLoseNothing) {
  auto cluster = LocalCluster::Start(AsyncCluster(1, 2));
  ASSERT_TRUE(cluster.ok()) << cluster.status();
  constexpr int64_t kN = 200000;
  constexpr int kSteps = 20;
  std::vector<std::unique_ptr<Client>> clients;
  PushPieceCounter counter;
  for (int w = 0; w < 2; ++w) {
    clients.push_back(ConnectPieces(*cluster, w, 2, 64 * 1024, 0, &counter));
    ASSERT_NE(clients.back(), nullptr);
    ASSERT_TRUE(clients.back()->CreateVariable("v", DType::kF32, Shape{kN}, Accumulator()).ok());
  }
  std::vector<std::thread> threads;
  for (int w = 0; w < 2; ++w) {
    threads.emplace_back([&, w] {
      const std::vector<float> g(static_cast<size_t>(kN), static_cast<float>(w + 1));
      for (int step = 0; step < kSteps; ++step) {
        Status s = clients[w]->Push({{"v", g}}, /*advance_clock=*/false).Wait();
        ASSERT_TRUE(s.ok()) << s;
      }
    });
  }
  for (auto& t : threads) t.join();
  // 800 KB gradients: 13 pieces each.
  EXPECT_GE(counter.pieces.load(), 2 * kSteps * 13);
  std::vector<float> p(kN);
  ASSERT_TRUE(clients[0]->Pull({{"v", p}}).Wait().ok());
  for (int64_t i = 0; i < kN; ++i) ASSERT_EQ(p[i], -3.f * kSteps) << i;
}

// The co-located path (shared memory, gradients streamed into the server's
// apply) computes exactly what the ZeroMQ path computes.
TEST(ClientIoTest, SharedMemoryAndTcpGiveTheSameParametersBitForBit) {
  LocalClusterOptions co = AsyncCluster(1, 1);
  auto with_shm = LocalCluster::Start(co);
  co.extra_args = {"--no-shared-memory"};
  auto without = LocalCluster::Start(co);
  ASSERT_TRUE(with_shm.ok()) << with_shm.status();
  ASSERT_TRUE(without.ok()) << without.status();
  auto a = Connect(*with_shm, 0, 1, /*shared_memory=*/true);
  auto b = Connect(*without, 0, 1, /*shared_memory=*/true);  // offers, is refused
  ASSERT_NE(a, nullptr);
  ASSERT_NE(b, nullptr);
  constexpr int64_t kBig = 3 << 20, kSmall = 1000;  // 12 MiB (ring), 4 KB (ZeroMQ)
  VariableOptions vo;
  vo.initializer = {5, protocol::InitGlorotUniform{}};
  vo.optimizer.kind = protocol::OptimizerKind::kAdam;
  vo.optimizer.learning_rate = 1e-3;
  for (Client* c : {a.get(), b.get()}) {
    ASSERT_TRUE(c->CreateVariable("big", DType::kF32, Shape{kBig}, vo).ok());
    ASSERT_TRUE(c->CreateVariable("small", DType::kF32, Shape{kSmall}, vo).ok());
  }
  std::vector<float> g_big(kBig), g_small(kSmall);
  for (int step = 0; step < 4; ++step) {
    for (int64_t i = 0; i < kBig; ++i) g_big[i] = static_cast<float>((i * 7 + step) % 13) - 6.f;
    for (int64_t i = 0; i < kSmall; ++i) g_small[i] = static_cast<float>(i % 5) - 2.f;
    for (Client* c : {a.get(), b.get()})
      ASSERT_TRUE(c->Push({{"big", g_big}, {"small", g_small}}).Wait().ok());
  }
  std::vector<float> pa(kBig), pb(kBig), sa(kSmall), sb(kSmall);
  ASSERT_TRUE(a->Pull({{"big", pa}, {"small", sa}}).Wait().ok());
  ASSERT_TRUE(b->Pull({{"big", pb}, {"small", sb}}).Wait().ok());
  ASSERT_EQ(pa, pb);
  ASSERT_EQ(sa, sb);
  // One optimizer step per push, whichever path the bytes took.
  for (Client* c : {a.get(), b.get()}) {
    auto stats = c->Stats();
    ASSERT_TRUE(stats.ok());
    for (const auto& var : (*stats)[0].variables) EXPECT_EQ(var.version, 4u) << var.name;
  }
  // The first really went through shared memory, the second did not.
  EXPECT_EQ(a->stats().shared_memory_shards, 1);
  EXPECT_GE(a->stats().shared_memory_bytes, 4 * kBig * 4 + kBig * 4);
  EXPECT_EQ(b->stats().shared_memory_shards, 0);
  EXPECT_EQ(b->stats().shared_memory_bytes, 0);
}

// A co-located pull of 8 MiB or more copies out of shared memory on
// ClientOptions::copy_threads threads: every byte lands, the odd tail
// included, whole (Pull) and by rows (PullRange), with one thread or four.
TEST(ClientIoTest, LargeCoLocatedPullsSplitTheirCopyAndLandEveryByte) {
  auto cluster = LocalCluster::Start(AsyncCluster(1, 1));
  ASSERT_TRUE(cluster.ok()) << cluster.status();
  constexpr int64_t kRows = (2 << 20) + 5, kCols = 1;  // 8 MiB and 20 bytes
  std::vector<float> init(kRows * kCols);
  for (int64_t i = 0; i < kRows * kCols; ++i) init[i] = static_cast<float>(i % 100003) * 0.5f;
  VariableOptions vo;
  vo.initial_values = init;
  for (int threads : {1, 4}) {
    auto c = Connect(*cluster, 0, 1, /*shared_memory=*/true,
                     [threads](ClientOptions& o) { o.copy_threads = threads; });
    ASSERT_NE(c, nullptr);
    ASSERT_TRUE(c->CreateVariable("v", DType::kF32, Shape{kRows, kCols}, vo).ok());
    std::vector<float> whole(kRows * kCols, -1.f);
    ASSERT_TRUE(c->Pull({{"v", whole}}).Wait().ok());
    ASSERT_EQ(whole, init) << threads << " thread(s)";
    // Rows 3.. (a shifted source and destination) by PullRange.
    std::vector<float> rows((kRows - 3) * kCols, -1.f);
    ASSERT_TRUE(c->PullRange("v", {3, kRows}, rows).Wait().ok());
    ASSERT_TRUE(std::equal(rows.begin(), rows.end(), init.begin() + 3 * kCols))
        << threads << " thread(s)";
    EXPECT_EQ(c->stats().shared_memory_shards, 1);
  }
}

// A gradient in a push buffer (Client::AllocatePushBuffer) goes to a
// co-located server without a copy: the server reads the worker's memory,
// gives it back before it answers, and Wait() returns once it has. The
// client's heartbeats are 10 minutes apart, so nothing but the answer makes
// the client look at its lent memory again: a server that answered before
// giving the memory back would leave Wait() to run into its deadline.
std::unique_ptr<Client> ConnectQuiet(const LocalCluster& c, int index, int num_workers) {
  return Connect(c, index, num_workers, /*shared_memory=*/true,
                 [](ClientOptions& o) { o.heartbeat_interval = std::chrono::minutes(10); });
}

TEST(ClientIoTest, PushBufferIsLentToACoLocatedServerAndBackWhenWaitReturns) {
  auto cluster = LocalCluster::Start(AsyncCluster(1, 1));
  ASSERT_TRUE(cluster.ok()) << cluster.status();
  auto client = ConnectQuiet(*cluster, 0, 1);
  ASSERT_NE(client, nullptr);
  constexpr int64_t kN = 1 << 20;  // 4 MiB
  ASSERT_TRUE(client->CreateVariable("w", DType::kF32, Shape{kN}, Accumulator()).ok());
  auto buffer = client->AllocatePushBuffer(kN);
  ASSERT_TRUE(buffer.ok()) << buffer.status();
  ASSERT_TRUE(buffer->shared_memory);
  ASSERT_EQ(buffer->values.size(), static_cast<size_t>(kN));
  EXPECT_EQ(reinterpret_cast<uintptr_t>(buffer->values.data()) % 64, 0u);
  std::vector<float> expected(kN, 0.f);
  for (int step = 0; step < 3; ++step) {
    for (int64_t i = 0; i < kN; ++i) {
      buffer->values[i] = static_cast<float>((i * 5 + step) % 11) - 5.f;
      expected[i] -= buffer->values[i];
    }
    ASSERT_TRUE(client->Push({{"w", buffer->values}}).Wait(std::chrono::milliseconds(20000)).ok());
  }
  // Written over at once: the server is done with it.
  std::fill(buffer->values.begin(), buffer->values.end(), 1e6f);
  std::vector<float> got(kN);
  ASSERT_TRUE(client->Pull({{"w", got}}).Wait().ok());
  EXPECT_EQ(got, expected);
  EXPECT_EQ(client->stats().shared_memory_frames_lent, 3);

  // A refused push (NaN, --nan-policy reject by default) gives it back too.
  buffer->values[kN / 2] = std::numeric_limits<float>::quiet_NaN();
  Status refused = client->Push({{"w", buffer->values}}).Wait(std::chrono::milliseconds(20000));
  EXPECT_EQ(refused.code(), StatusCode::kInvalidArgument) << refused;
  EXPECT_NE(refused.message().find("NaN"), std::string::npos) << refused;
  ASSERT_TRUE(client->Pull({{"w", got}}).Wait().ok());
  EXPECT_EQ(got, expected);  // nothing of it applied
}

// In BSP a push waits in the server for the clock to complete; from a push
// buffer it is copied there, so the worker has its buffer back (and its
// push acknowledged) before the other workers pushed. The push that
// completes the clock is applied from the worker's memory itself, before
// its acknowledgement.
TEST(ClientIoTest, BspKeepsACopyOfALentGradient) {
  LocalClusterOptions co;
  co.num_workers = 2;
  co.staleness = "0";
  auto cluster = LocalCluster::Start(co);
  ASSERT_TRUE(cluster.ok()) << cluster.status();
  auto a = ConnectQuiet(*cluster, 0, 2);
  auto b = ConnectQuiet(*cluster, 1, 2);
  ASSERT_NE(a, nullptr);
  ASSERT_NE(b, nullptr);
  constexpr int64_t kN = 1 << 18;  // 1 MiB
  VariableOptions vo = Accumulator();
  ASSERT_TRUE(a->CreateVariable("w", DType::kF32, Shape{kN}, vo).ok());
  ASSERT_TRUE(b->CreateVariable("w", DType::kF32, Shape{kN}, vo).ok());
  auto buffer = a->AllocatePushBuffer(kN);
  ASSERT_TRUE(buffer.ok()) << buffer.status();
  ASSERT_TRUE(buffer->shared_memory);
  for (int64_t i = 0; i < kN; ++i) buffer->values[i] = static_cast<float>(i % 7);
  ASSERT_TRUE(a->Push({{"w", buffer->values}}).Wait(std::chrono::milliseconds(20000)).ok());
  std::fill(buffer->values.begin(), buffer->values.end(), -1e6f);
  auto b_buffer = b->AllocatePushBuffer(kN);
  ASSERT_TRUE(b_buffer.ok()) << b_buffer.status();
  ASSERT_TRUE(b_buffer->shared_memory);
  for (int64_t i = 0; i < kN; ++i) b_buffer->values[i] = static_cast<float>(i % 3);
  ASSERT_TRUE(b->Push({{"w", b_buffer->values}}).Wait(std::chrono::milliseconds(20000)).ok());
  std::fill(b_buffer->values.begin(), b_buffer->values.end(), 1e6f);
  EXPECT_EQ(a->stats().shared_memory_frames_lent, 1);
  EXPECT_EQ(b->stats().shared_memory_frames_lent, 1);
  std::vector<float> got(kN);
  ASSERT_TRUE(a->Pull({{"w", got}}).Wait().ok());  // after clock 0 completed
  for (int64_t i = 0; i < kN; ++i)
    ASSERT_EQ(got[i], -(static_cast<float>(i % 7) + static_cast<float>(i % 3)) / 2.f) << i;
}

// Without a co-located shard (or with shared memory off) a push buffer is
// heap memory, and pushes from it copy as usual.
TEST(ClientIoTest, PushBufferWithoutSharedMemoryIsOrdinaryMemory) {
  auto cluster = LocalCluster::Start(AsyncCluster(1, 1));
  ASSERT_TRUE(cluster.ok()) << cluster.status();
  auto client = Connect(*cluster, 0, 1, /*shared_memory=*/false);
  ASSERT_NE(client, nullptr);
  EXPECT_EQ(client->AllocatePushBuffer(0).status().code(), StatusCode::kInvalidArgument);
  auto buffer = client->AllocatePushBuffer(1000);
  ASSERT_TRUE(buffer.ok()) << buffer.status();
  EXPECT_FALSE(buffer->shared_memory);
  ASSERT_TRUE(client->CreateVariable("w", DType::kF32, Shape{1000}, Accumulator()).ok());
  std::fill(buffer->values.begin(), buffer->values.end(), 2.f);
  ASSERT_TRUE(client->Push({{"w", buffer->values}}).Wait().ok());
  std::vector<float> got(1000);
  ASSERT_TRUE(client->Pull({{"w", got}}).Wait().ok());
  EXPECT_EQ(got, std::vector<float>(1000, -2.f));
  EXPECT_EQ(client->stats().shared_memory_frames_lent, 0);
}

// A server with two apply threads (--threads 2: chunks of one apply and
// of its NaN check taken by whichever thread comes first) computes exactly
// what one thread computes, by either path: a push buffer lent to a
// co-located server, and plain ZeroMQ in pieces.
TEST(ClientIoTest, TwoApplyThreadsGiveTheSameParametersBitForBit) {
  LocalClusterOptions co = AsyncCluster(1, 1);
  auto one = LocalCluster::Start(co);
  co.extra_args = {"--threads", "2"};
  auto two = LocalCluster::Start(co);
  ASSERT_TRUE(one.ok()) << one.status();
  ASSERT_TRUE(two.ok()) << two.status();
  constexpr int64_t kN = 3 << 20;  // 12 MiB
  for (bool shared_memory : {true, false}) {
    SCOPED_TRACE(shared_memory ? "lent through shared memory" : "ZeroMQ in pieces");
    auto a = Connect(*one, 0, 1, shared_memory);
    auto b = Connect(*two, 0, 1, shared_memory);
    ASSERT_NE(a, nullptr);
    ASSERT_NE(b, nullptr);
    const std::string sgd = shared_memory ? "sgd_shm" : "sgd_tcp";
    const std::string adam = shared_memory ? "adam_shm" : "adam_tcp";
    const auto [vo, vadam] = GlorotSgdAndAdam(0.1);
    for (Client* c : {a.get(), b.get()}) {
      ASSERT_TRUE(c->CreateVariable(sgd, DType::kF32, Shape{kN}, vo).ok());
      ASSERT_TRUE(c->CreateVariable(adam, DType::kF32, Shape{kN}, vadam).ok());
    }
    auto ga = a->AllocatePushBuffer(kN);
    auto gb = b->AllocatePushBuffer(kN);
    ASSERT_TRUE(ga.ok() && gb.ok());
    EXPECT_EQ(ga->shared_memory, shared_memory);
    for (int step = 0; step < 3; ++step) {
      for (int64_t i = 0; i < kN; ++i)
        ga->values[i] = gb->values[i] = static_cast<float>((i * 3 + step) % 17) * 0.25f - 2.f;
      for (const std::string& name : {sgd, adam}) {
        ASSERT_TRUE(a->Push({{name, ga->values}}).Wait().ok());
        ASSERT_TRUE(b->Push({{name, gb->values}}).Wait().ok());
      }
    }
    // A NaN near the end: counted by the second thread's chunks, refused.
    gb->values[kN - 5] = std::numeric_limits<float>::infinity();
    EXPECT_EQ(b->Push({{sgd, gb->values}}).Wait().code(), StatusCode::kInvalidArgument);
    for (const std::string& name : {sgd, adam}) {
      std::vector<float> pa(kN), pb(kN);
      ASSERT_TRUE(a->Pull({{name, pa}}).Wait().ok());
      ASSERT_TRUE(b->Pull({{name, pb}}).Wait().ok());
      EXPECT_TRUE(pa == pb) << name;
    }
  }
}

}  // namespace
}  // namespace distval
