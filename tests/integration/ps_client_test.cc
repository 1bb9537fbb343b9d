// Integration tests of distval-ps with the worker Client: real server
// processes on 127.0.0.1, several clients (one per simulated worker, each
// in its own thread with its own sockets).
//
// GCC 12 reports a false -Wmaybe-uninitialized inside avx512fintrin.h when
// Eigen's GEMM packing is inlined with -march=native on AVX-512 machines
// (see worker/cpu/cpu_backend.cc); silence it for this file only.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif
#include <gtest/gtest.h>

#include <Eigen/Core>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstring>
#include <random>
#include <thread>

#include "distval/client.h"
#include "distval/partitioner.h"
#include "distval/protocol.h"
#include "distval/transport.h"
#include "local_cluster.h"

namespace distval {
namespace {

using testing::LocalCluster;
using testing::LocalClusterOptions;

std::unique_ptr<Client> ConnectWorker(const LocalCluster& c, int index, int num_workers) {
  ClientOptions o;
  o.ps_endpoints = c.endpoints();
  o.worker_index = index;
  o.num_workers = num_workers;
  o.connect_timeout = std::chrono::milliseconds(20000);
  o.heartbeat_interval = std::chrono::milliseconds(200);
  auto client = Client::Connect(o);
  EXPECT_TRUE(client.ok()) << client.status();
  return client.ok() ? std::move(*client) : nullptr;
}

std::unique_ptr<Client> ConnectControl(const LocalCluster& c) {
  ClientOptions o;
  o.ps_endpoints = c.endpoints();
  o.role = protocol::Role::kControl;
  auto client = Client::Connect(o);
  EXPECT_TRUE(client.ok()) << client.status();
  return client.ok() ? std::move(*client) : nullptr;
}

// ---------------------------------------------------------------------------
// Linear regression y = x W + b on fixed synthetic data.
constexpr int kIn = 8, kOut = 4;
using Mat = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;

struct Data {
  Mat x, t;
};

Data MakeData(int n) {
  std::mt19937 rng(1234);
  std::uniform_real_distribution<float> u(-1.f, 1.f);
  Data d{Mat(n, kIn), Mat(n, kOut)};
  for (int i = 0; i < n; ++i) {
    for (int j = 0; j < kIn; ++j) d.x(i, j) = u(rng);
    for (int j = 0; j < kOut; ++j) d.t(i, j) = u(rng);
  }
  return d;
}

std::vector<float> InitW() {
  std::vector<float> w(kIn * kOut);
  for (size_t i = 0; i < w.size(); ++i) w[i] = 0.01f * static_cast<float>(i % 7) - 0.03f;
  return w;
}

// Mean-squared-error gradients over rows [begin, begin + n).
void Gradients(const Data& d, int begin, int n, const std::vector<float>& w,
               const std::vector<float>& b, std::vector<float>* gw, std::vector<float>* gb) {
  Eigen::Map<const Mat> W(w.data(), kIn, kOut);
  Eigen::Map<const Eigen::RowVectorXf> B(b.data(), kOut);
  Mat x = d.x.middleRows(begin, n), t = d.t.middleRows(begin, n);
  Mat y = (x * W).rowwise() + B;
  Mat e = (y - t) / static_cast<float>(n);
  gw->resize(kIn * kOut);
  gb->resize(kOut);
  Eigen::Map<Mat>(gw->data(), kIn, kOut) = x.transpose() * e;
  Eigen::Map<Eigen::RowVectorXf>(gb->data(), kOut) = e.colwise().sum();
}

struct Params {
  std::vector<float> w, b;
};

VariableOptions SgdOptions(double lr) {
  VariableOptions v;
  v.optimizer.kind = protocol::OptimizerKind::kSgd;
  v.optimizer.learning_rate = lr;
  return v;
}

// Two workers, each batch b per step, BSP, `steps` steps. Returns final params.
Params RunBsp(int steps, int b) {
  LocalClusterOptions co;
  co.num_shards = 2;
  co.num_workers = 2;
  co.staleness = "0";
  auto cluster = LocalCluster::Start(co);
  EXPECT_TRUE(cluster.ok()) << cluster.status();
  if (!cluster.ok()) return {};
  Data data = MakeData(steps * 2 * b);
  std::vector<float> w0 = InitW();
  Params out;
  auto worker = [&](int index) {
    auto client = ConnectWorker(*cluster, index, 2);
    ASSERT_NE(client, nullptr);
    VariableOptions wo = SgdOptions(0.1);
    wo.initial_values = w0;
    wo.partitioner = Partitioner::FixedShards(2);  // W is split over both shards
    ASSERT_TRUE(client->CreateVariable("w", DType::kF32, Shape{kIn, kOut}, wo).ok());
    VariableOptions bo = SgdOptions(0.1);
    bo.initializer.kind = protocol::InitZeros{};
    ASSERT_TRUE(client->CreateVariable("b", DType::kF32, Shape{kOut}, bo).ok());
    std::vector<float> w(kIn * kOut), bias(kOut), gw, gb;
    for (int step = 0; step < steps; ++step) {
      ASSERT_TRUE(client->Pull({{"w", w}, {"b", bias}}).Wait().ok());
      Gradients(data, step * 2 * b + index * b, b, w, bias, &gw, &gb);
      Status s = client->Push({{"w", gw}, {"b", gb}}, true).Wait();
      ASSERT_TRUE(s.ok()) << s;
    }
    if (index == 0) {
      ASSERT_TRUE(client->Pull({{"w", w}, {"b", bias}}).Wait().ok());
      out = {w, bias};
    }
  };
  std::thread t0(worker, 0), t1(worker, 1);
  t0.join();
  t1.join();
  return out;
}

double RelativeError(const std::vector<float>& a, const std::vector<float>& ref) {
  double num = 0, den = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    num += (double(a[i]) - ref[i]) * (double(a[i]) - ref[i]);
    den += double(ref[i]) * ref[i];
  }
  return std::sqrt(num / std::max(den, 1e-30));
}

TEST(PsClientTest, BspEqualsSingleProcessAtTheGlobalBatchAndIsRepeatable) {
  constexpr int kSteps = 50, kB = 16;
  Params dist = RunBsp(kSteps, kB);
  ASSERT_EQ(dist.w.size(), size_t{kIn * kOut});

  // Single process, SGD at batch 2b on the same data in the same order.
  Data data = MakeData(kSteps * 2 * kB);
  std::vector<float> w = InitW(), b(kOut, 0.f), gw, gb;
  for (int step = 0; step < kSteps; ++step) {
    Gradients(data, step * 2 * kB, 2 * kB, w, b, &gw, &gb);
    for (size_t i = 0; i < w.size(); ++i) w[i] -= 0.1f * gw[i];
    for (size_t i = 0; i < b.size(); ++i) b[i] -= 0.1f * gb[i];
  }
  EXPECT_LT(RelativeError(dist.w, w), 1e-6);
  EXPECT_LT(RelativeError(dist.b, b), 1e-6);
  // The parameters moved: the comparison is not trivially true.
  EXPECT_GT(RelativeError(InitW(), w), 1e-2);

  Params again = RunBsp(kSteps, kB);
  ASSERT_EQ(again.w.size(), dist.w.size());
  EXPECT_EQ(0, std::memcmp(again.w.data(), dist.w.data(), dist.w.size() * sizeof(float)));
  EXPECT_EQ(0, std::memcmp(again.b.data(), dist.b.data(), dist.b.size() * sizeof(float)));
}

TEST(PsClientTest, SspNeverReturnsAPullBeyondTheBoundAndTheFastWorkerBlocks) {
  LocalClusterOptions co;
  co.num_shards = 1;
  co.num_workers = 2;
  co.staleness = "2";
  auto cluster = LocalCluster::Start(co);
  ASSERT_TRUE(cluster.ok()) << cluster.status();
  constexpr int kSteps = 15;
  std::atomic<int> violations{0};
  std::atomic<int64_t> fast_pull_us{0};
  auto worker = [&](int index) {
    auto client = ConnectWorker(*cluster, index, 2);
    ASSERT_NE(client, nullptr);
    VariableOptions vo = SgdOptions(0.01);
    vo.initializer.kind = protocol::InitZeros{};
    ASSERT_TRUE(client->CreateVariable("v", DType::kF32, Shape{16}, vo).ok());
    std::vector<float> v(16), g(16, 1.f);
    for (int step = 0; step < kSteps; ++step) {
      auto t0 = std::chrono::steady_clock::now();
      ASSERT_TRUE(client->Pull({{"v", v}}).Wait().ok());
      auto waited = std::chrono::steady_clock::now() - t0;
      if (index == 0)
        fast_pull_us += std::chrono::duration_cast<std::chrono::microseconds>(waited).count();
      // The reply's min clock is the slowest live worker's clock.
      if (client->clock() - client->last_min_clock() > 2) ++violations;
      if (index == 1) std::this_thread::sleep_for(std::chrono::milliseconds(30));
      ASSERT_TRUE(client->Push({{"v", g}}, true).Wait().ok());
    }
  };
  std::thread t0(worker, 0), t1(worker, 1);
  t0.join();
  t1.join();
  EXPECT_EQ(violations.load(), 0);
  // The slow worker sleeps 15 x 30 ms; a fast worker that never blocked would
  // finish its pulls in a few ms. It must have waited for most of that.
  EXPECT_GT(fast_pull_us.load(), 200000);
}

TEST(PsClientTest, AsyncLosesNothing) {
  LocalClusterOptions co;
  co.num_shards = 2;
  co.num_workers = 4;
  co.staleness = "async";
  auto cluster = LocalCluster::Start(co);
  ASSERT_TRUE(cluster.ok()) << cluster.status();
  constexpr int kWorkers = 4, kPushes = 1000, kRows = 32, kCols = 4;
  auto worker = [&](int index) {
    auto client = ConnectWorker(*cluster, index, kWorkers);
    ASSERT_NE(client, nullptr);
    VariableOptions vo = SgdOptions(1.0);
    vo.initializer.kind = protocol::InitZeros{};
    vo.partitioner = Partitioner::FixedShards(2);
    ASSERT_TRUE(client->CreateVariable("sum", DType::kF32, Shape{kRows, kCols}, vo).ok());
    std::vector<float> g(kRows * kCols);
    for (int step = 0; step < kPushes; ++step) {
      for (int i = 0; i < kRows * kCols; ++i)
        g[i] = static_cast<float>((i + step + index) % 3);  // integers 0..2
      Status s = client->Push({{"sum", g}}, true).Wait();
      ASSERT_TRUE(s.ok()) << s;
    }
  };
  std::vector<std::thread> threads;
  for (int w = 0; w < kWorkers; ++w) threads.emplace_back(worker, w);
  for (auto& t : threads) t.join();

  auto control = ConnectControl(*cluster);
  ASSERT_NE(control, nullptr);
  VariableOptions vo = SgdOptions(1.0);
  vo.initializer.kind = protocol::InitZeros{};
  vo.partitioner = Partitioner::FixedShards(2);
  ASSERT_TRUE(control->CreateVariable("sum", DType::kF32, Shape{kRows, kCols}, vo).ok());
  std::vector<float> v(kRows * kCols);
  ASSERT_TRUE(control->Pull({{"sum", v}}).Wait().ok());
  for (int i = 0; i < kRows * kCols; ++i) {
    double expect = 0;
    for (int w = 0; w < kWorkers; ++w)
      for (int s = 0; s < kPushes; ++s) expect -= (i + s + w) % 3;
    ASSERT_EQ(v[i], static_cast<float>(expect)) << "element " << i;
  }
  auto stats = control->Stats();
  ASSERT_TRUE(stats.ok());
  uint64_t versions = 0;
  for (const auto& s : *stats)
    for (const auto& var : s.variables) versions += var.version;
  EXPECT_EQ(versions, uint64_t{2} * kWorkers * kPushes);  // every push applied once per shard
}

TEST(PsClientTest, PartitionedVariableLivesWhereThePartitionerSaysAndReassembles) {
  LocalClusterOptions co;
  co.num_shards = 2;
  co.num_workers = 1;
  auto cluster = LocalCluster::Start(co);
  ASSERT_TRUE(cluster.ok()) << cluster.status();
  auto client = ConnectWorker(*cluster, 0, 1);
  ASSERT_NE(client, nullptr);
  constexpr int kRows = 13, kCols = 64;  // 3328 bytes
  std::vector<float> init(kRows * kCols);
  for (size_t i = 0; i < init.size(); ++i) init[i] = static_cast<float>(i);
  VariableOptions vo = SgdOptions(0.1);
  vo.initial_values = init;
  vo.partitioner = Partitioner::MinSize(1024, 4);  // ceil(3328/1024)=4, capped at 2 shards
  ASSERT_TRUE(client->CreateVariable("emb", DType::kF32, Shape{kRows, kCols}, vo).ok());
  auto info = client->Find("emb");
  ASSERT_TRUE(info.ok());
  const VariablePlacement& placement = (*info)->placement;
  ASSERT_EQ(placement.slices.size(), 2u);

  auto stats = client->Stats();
  ASSERT_TRUE(stats.ok()) << stats.status();
  for (const auto& shard : *stats) {
    ASSERT_EQ(shard.variables.size(), 1u);
    const auto& held = shard.variables[0];
    const ShardSlice* slice = placement.SliceOnShard(shard.shard_index);
    ASSERT_NE(slice, nullptr);
    EXPECT_EQ(held.rows.begin, slice->row_begin);
    EXPECT_EQ(held.rows.end, slice->row_end);
    for (int64_t r = held.rows.begin; r < held.rows.end; ++r)
      EXPECT_EQ(placement.ShardOfRow(r), shard.shard_index);
  }
  std::vector<float> pulled(kRows * kCols, -1.f);
  ASSERT_TRUE(client->Pull({{"emb", pulled}}).Wait().ok());
  EXPECT_EQ(pulled, init);

  // Sparse rows across both shards, and a row range that straddles them.
  std::vector<int64_t> rows = {12, 0, 7, 6};
  std::vector<float> got(rows.size() * kCols);
  ASSERT_TRUE(client->PullRows("emb", rows, got).Wait().ok());
  for (size_t i = 0; i < rows.size(); ++i)
    EXPECT_EQ(got[i * kCols], static_cast<float>(rows[i] * kCols));
  std::vector<float> range(5 * kCols);
  ASSERT_TRUE(client->PullRange("emb", {4, 9}, range).Wait().ok());
  EXPECT_EQ(range[0], static_cast<float>(4 * kCols));
  EXPECT_EQ(range.back(), static_cast<float>(9 * kCols - 1));

  // A sparse push changes only the listed rows. The job is BSP: the
  // gradient is applied when the worker finishes its step (clock).
  std::vector<float> g(2 * kCols, 1.f);
  std::vector<int64_t> touched = {1, 11};
  ASSERT_TRUE(client->PushRows("emb", touched, g).Wait().ok());
  ASSERT_TRUE(client->Pull({{"emb", pulled}}).Wait().ok());
  EXPECT_EQ(pulled, init) << "applied before the clock completed";
  ASSERT_TRUE(client->AdvanceClock().ok());
  ASSERT_TRUE(client->Pull({{"emb", pulled}}).Wait().ok());
  for (int r = 0; r < kRows; ++r) {
    bool hit = r == 1 || r == 11;
    EXPECT_FLOAT_EQ(pulled[r * kCols + 3], init[r * kCols + 3] - (hit ? 0.1f : 0.f)) << r;
  }
}

// ---------------------------------------------------------------------------
// Bad requests, sent with a raw DEALER socket.
class RawPeer {
 public:
  explicit RawPeer(const std::string& endpoint) : ctx_(1) {
    auto s = transport::Socket::Create(ctx_, transport::SocketType::kDealer);
    EXPECT_TRUE(s.ok());
    socket_ = std::move(*s);
    EXPECT_TRUE(socket_->Connect(endpoint).ok());
  }
  ~RawPeer() { socket_.reset(); }

  // Sends frames and returns the decoded reply.
  protocol::Reply Exchange(std::vector<std::vector<std::byte>> frames) {
    transport::OutMessage out;
    for (auto& f : frames) out.push_back(transport::Payload::Copy(std::move(f)));
    EXPECT_TRUE(socket_->Send(std::move(out)).ok());
    auto in = socket_->Receive(std::chrono::milliseconds(10000));
    EXPECT_TRUE(in.ok()) << in.status();
    if (!in.ok()) return {};
    std::vector<size_t> sizes;
    for (size_t i = 1; i < in->size(); ++i) sizes.push_back((*in)[i].size());
    auto r = protocol::DecodeReply((*in)[0].bytes(), sizes);
    EXPECT_TRUE(r.ok()) << r.status();
    return r.ok() ? *r : protocol::Reply{};
  }
  protocol::Reply Send(const protocol::Request& req,
                       std::vector<std::vector<std::byte>> payloads = {}) {
    payloads.insert(payloads.begin(), protocol::EncodeRequest(req));
    return Exchange(std::move(payloads));
  }

 private:
  transport::Context ctx_;
  std::unique_ptr<transport::Socket> socket_;
};

std::vector<std::byte> Floats(size_t n, float v = 1.f) {
  std::vector<float> f(n, v);
  std::vector<std::byte> b(n * sizeof(float));
  std::memcpy(b.data(), f.data(), b.size());
  return b;
}

protocol::Request PushOne(const std::string& var, std::vector<int64_t> shape,
                          protocol::RowRange rows, DType dtype = DType::kF32) {
  protocol::Request r;
  r.request_id = 77;
  r.worker_id = -1;
  protocol::Update u;
  u.variable = var;
  u.values.frame = 1;
  u.values.dtype = dtype;
  u.values.shape = std::move(shape);
  u.rows = rows;
  r.body = protocol::Push{{u}, false};
  return r;
}

TEST(PsClientTest, BadRequestsGetTheRightErrorAndTheServerKeepsServing) {
  LocalClusterOptions co;
  auto cluster = LocalCluster::Start(co);
  ASSERT_TRUE(cluster.ok()) << cluster.status();
  auto control = ConnectControl(*cluster);
  ASSERT_NE(control, nullptr);
  VariableOptions vo = SgdOptions(1.0);
  vo.initializer.kind = protocol::InitConstant{2.0};
  ASSERT_TRUE(control->CreateVariable("v", DType::kF32, Shape{4, 3}, vo).ok());

  RawPeer peer(cluster->endpoints()[0]);
  auto expect_code = [&](const protocol::Reply& r, StatusCode code, const char* what) {
    EXPECT_EQ(r.code, code) << what << ": " << r.message;
    EXPECT_FALSE(r.message.empty()) << what;
  };
  expect_code(peer.Send(PushOne("nope", {4, 3}, {0, 4}), {Floats(12)}), StatusCode::kNotFound,
              "unknown variable");
  expect_code(peer.Send(PushOne("v", {4, 2}, {0, 4}), {Floats(8)}), StatusCode::kInvalidArgument,
              "wrong shape");
  expect_code(peer.Send(PushOne("v", {4, 3}, {0, 4}, DType::kI32), {Floats(12)}),
              StatusCode::kInvalidArgument, "wrong dtype");
  expect_code(peer.Send(PushOne("v", {4, 3}, {2, 6}), {Floats(12)}), StatusCode::kOutOfRange,
              "rows out of range");
  expect_code(peer.Send(PushOne("v", {4, 3}, {0, 4}), {Floats(11)}), StatusCode::kInvalidArgument,
              "truncated payload frame");
  expect_code(peer.Send(PushOne("v", {4, 3}, {0, 4}), {Floats(12), Floats(3)}),
              StatusCode::kInvalidArgument, "extra frame");
  expect_code(peer.Send(PushOne("v", {4, 3}, {0, 4}), {}), StatusCode::kInvalidArgument,
              "missing frame");
  {
    auto header = protocol::EncodeRequest(PushOne("v", {4, 3}, {0, 4}));
    header.resize(header.size() / 2);
    expect_code(peer.Exchange({header, Floats(12)}), StatusCode::kInvalidArgument,
                "truncated header");
  }
  std::mt19937 rng(7);
  for (int i = 0; i < 50; ++i) {
    std::vector<std::byte> junk(1 + rng() % 200);
    for (auto& b : junk) b = static_cast<std::byte>(rng());
    expect_code(peer.Exchange({junk}), StatusCode::kInvalidArgument, "random bytes");
  }
  protocol::Request pull;
  pull.request_id = 5;
  pull.worker_id = -1;
  pull.body = protocol::Pull{{protocol::Read{"v", protocol::Encoding::kRaw,
                                             protocol::RowRange{3, 5}}}};
  expect_code(peer.Send(pull), StatusCode::kOutOfRange, "pull rows out of range");

  // Nothing above changed the variable, and a good request still works.
  std::vector<float> v(12);
  ASSERT_TRUE(control->Pull({{"v", v}}).Wait().ok());
  for (float x : v) EXPECT_EQ(x, 2.0f);
  auto ok = peer.Send(PushOne("v", {4, 3}, {0, 4}), {Floats(12, 0.5f)});
  EXPECT_EQ(ok.code, StatusCode::kOk) << ok.message;
  EXPECT_EQ(ok.request_id, 77u);
  ASSERT_TRUE(control->Pull({{"v", v}}).Wait().ok());
  for (float x : v) EXPECT_EQ(x, 1.5f);

  // Creating the same name with another shape is refused, naming both.
  Status clash = control->CreateVariable("v", DType::kF32, Shape{5, 3}, vo);
  EXPECT_EQ(clash.code(), StatusCode::kAlreadyExists) << clash;
  EXPECT_NE(clash.message().find("[4,3]"), std::string::npos) << clash;
  EXPECT_NE(clash.message().find("[5,3]"), std::string::npos) << clash;
}

TEST(PsClientTest, MismatchedSettingsAreRefusedAtHello) {
  LocalClusterOptions co;
  co.num_shards = 1;
  co.num_workers = 2;
  co.staleness = "0";
  auto cluster = LocalCluster::Start(co);
  ASSERT_TRUE(cluster.ok()) << cluster.status();
  ClientOptions o;
  o.ps_endpoints = cluster->endpoints();
  o.worker_index = 0;
  o.num_workers = 2;
  o.expected_staleness = protocol::kStalenessAsync;
  auto c = Client::Connect(o);
  ASSERT_FALSE(c.ok());
  EXPECT_EQ(c.status().code(), StatusCode::kFailedPrecondition);
  EXPECT_NE(c.status().message().find("async"), std::string::npos) << c.status();
  EXPECT_NE(c.status().message().find("bsp"), std::string::npos) << c.status();
  o.expected_staleness = protocol::kStalenessDontCheck;
  o.num_workers = 3;
  o.worker_index = 0;
  c = Client::Connect(o);
  ASSERT_FALSE(c.ok());
  EXPECT_NE(c.status().message().find("3"), std::string::npos) << c.status();
}

}  // namespace
}  // namespace distval
