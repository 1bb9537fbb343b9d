// Writes the seed corpus of the server_request fuzz target into the
// directory given as argv[1] (tests/fuzz/corpus/server_request is its
// committed output): requests of every kind against the variables of
// server_harness.h (hello, heartbeat, create with every initializer and
// optimizer, dense / partitioned / sparse / scalar pushes in raw, f16 and
// bf16, pushes with NaN and Inf, pulls, clock advances, barriers, mode and
// learning-rate changes, checkpoints, stats, shutdowns), plus refused
// variants, in the format of fuzz_input.h (ParseFramedFuzzInput).
//
// Each seed is sent to freshly started harness servers and must get the
// reply code listed here from the reject server, so the corpus stays a set
// of requests that reach the handlers they are named after. Seeds named
// regress_* are the fuzzer's findings, rebuilt as requests; files named
// crash-* in the corpus are inputs the fuzzer found, kept as they were (this
// program does not write or remove them).
#include <cmath>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <limits>
#include <string>
#include <vector>

#include "distval/encoding.h"
#include "distval/logging.h"
#include "fuzz_input.h"
#include "server_harness.h"

namespace {

namespace protocol = distval::protocol;
namespace fuzz = distval::fuzz;
using distval::DType;
using distval::StatusCode;
using protocol::Encoding;
using protocol::Request;
using Bytes = std::vector<std::byte>;

struct Seed {
  std::string name;
  Request request;
  std::vector<Bytes> payloads;
  StatusCode expect = StatusCode::kOk;
  // False for requests answered later or never (held pulls, barriers
  // waiting for others, shutdowns).
  bool answered_now = true;
};

Bytes Encode(const std::vector<float>& v, Encoding e) {
  Bytes out(v.size() * protocol::EncodedElementSize(DType::kF32, e));
  protocol::EncodeFloats(v, e, out);
  return out;
}

Bytes Indices(const std::vector<int64_t>& idx) {
  Bytes out(idx.size() * sizeof(int64_t));
  if (!idx.empty()) std::memcpy(out.data(), idx.data(), out.size());
  return out;
}

std::vector<float> Ramp(size_t n, float scale = 0.01f) {
  std::vector<float> v(n);
  for (size_t i = 0; i < n; ++i) v[i] = scale * static_cast<float>(static_cast<int>(i % 7) - 3);
  return v;
}

protocol::TensorRef Ref(uint32_t frame, std::vector<int64_t> shape, Encoding e = Encoding::kRaw,
                        DType dtype = DType::kF32) {
  protocol::TensorRef r;
  r.frame = frame;
  r.dtype = dtype;
  r.encoding = e;
  r.shape = std::move(shape);
  return r;
}

Request Make(protocol::RequestBody body, int32_t worker = 0, int64_t clock = 0) {
  static uint64_t next_id = 1;
  Request r;
  r.request_id = next_id++;
  r.worker_id = worker;
  r.clock = clock;
  r.body = std::move(body);
  return r;
}

std::vector<Seed> Seeds() {
  using protocol::OptimizerKind;
  std::vector<Seed> s;
  auto add = [&](std::string name, Request r, std::vector<Bytes> payloads = {},
                 StatusCode expect = StatusCode::kOk, bool answered_now = true) {
    s.push_back({std::move(name), std::move(r), std::move(payloads), expect, answered_now});
  };
  const int32_t kDontCheck = protocol::kStalenessDontCheck;

  // ---- hello, heartbeat
  add("hello_worker",
      Make(protocol::Hello{protocol::kProtocolVersion, protocol::Role::kWorker, 0, 1, 1, 0}));
  add("hello_control", Make(protocol::Hello{protocol::kProtocolVersion, protocol::Role::kControl,
                                            -1, 0, 1, kDontCheck},
                            -1));
  add("hello_bad_version", Make(protocol::Hello{7, protocol::Role::kWorker, 0, 1, 1, kDontCheck}),
      {}, StatusCode::kFailedPrecondition);
  add("hello_unknown_worker",
      Make(
          protocol::Hello{protocol::kProtocolVersion, protocol::Role::kWorker, 3, 1, 1, kDontCheck},
          3),
      {}, StatusCode::kInvalidArgument);
  add("heartbeat", Make(protocol::Heartbeat{}));

  // ---- create: every initializer and optimizer
  auto spec = [](std::string name, std::vector<int64_t> shape, OptimizerKind kind,
                 protocol::Initializer init) {
    protocol::CreateVariable cv;
    cv.spec.name = std::move(name);
    cv.spec.shape = std::move(shape);
    cv.spec.optimizer.kind = kind;
    cv.spec.initializer = std::move(init);
    cv.rows = {0, cv.spec.shape.empty() ? 1 : cv.spec.shape[0]};
    return cv;
  };
  add("create_zeros_sgd", Make(spec("new/a", {4, 3}, OptimizerKind::kSgd, {}), -1));
  add("create_constant_momentum",
      Make(spec("new/b", {5}, OptimizerKind::kMomentum, {0, protocol::InitConstant{0.5}}), -1));
  {
    auto cv = spec("new/c", {6, 2}, OptimizerKind::kAdagrad, {7, protocol::InitUniform{-1, 1}});
    cv.spec.aggregation = protocol::Aggregation::kSum;
    add("create_uniform_adagrad_sum", Make(cv, -1));
  }
  {
    auto cv = spec("new/d", {8}, OptimizerKind::kAdam, {9, protocol::InitNormal{0, 0.2}});
    cv.spec.optimizer.beta1 = 0.8;
    cv.spec.optimizer.beta2 = 0.99;
    add("create_normal_adam", Make(cv, -1));
  }
  {
    auto cv = spec("new/e", {4, 4}, OptimizerKind::kAdamW, {1, protocol::InitGlorotUniform{}});
    cv.spec.optimizer.weight_decay = 0.1;
    cv.spec.staleness = 2;
    add("create_glorot_adamw_ssp", Make(cv, -1));
  }
  {
    auto cv = spec("new/f", {3, 2}, OptimizerKind::kSgd, {});
    cv.spec.initializer.kind = protocol::InitValues{Ref(1, {3, 2})};
    add("create_values", Make(cv, -1), {Encode(Ramp(6, 0.5f), Encoding::kRaw)});
  }
  {
    auto cv = spec("new/g", {10, 2}, OptimizerKind::kSgd, {});
    cv.rows = {4, 7};  // a partition
    cv.spec.initializer.kind = protocol::InitValues{Ref(1, {3, 2})};
    add("create_values_partition", Make(cv, -1), {Encode(Ramp(6), Encoding::kRaw)});
  }
  {
    auto cv = spec("new/h", {3}, OptimizerKind::kSgd, {});
    cv.spec.initializer.kind = protocol::InitValues{Ref(1, {3})};
    add("create_values_nan", Make(cv, -1),
        {Encode({1.0f, std::numeric_limits<float>::quiet_NaN(), 2.0f}, Encoding::kRaw)},
        StatusCode::kInvalidArgument);
  }
  {
    auto cv = spec("new/i", {}, OptimizerKind::kMomentum, {0, protocol::InitConstant{2}});
    cv.spec.optimizer.nesterov = true;
    cv.spec.staleness = protocol::kStalenessAsync;
    add("create_scalar_nesterov_async", Make(cv, -1));
  }
  // Found by the fuzzer: a name that is not UTF-8 was accepted, and the next
  // checkpoint (JSON manifest) threw and stopped the server. Now refused.
  add("regress_create_name_not_utf8", Make(spec("w\xff\xff", {2}, OptimizerKind::kSgd, {}), -1), {},
      StatusCode::kInvalidArgument);
  {
    auto cv = spec("new/eps", {4}, OptimizerKind::kAdam, {});
    cv.spec.optimizer.epsilon = 1e-300;  // 0 as a float: 0 / 0 on a zero gradient
    add("regress_create_epsilon_below_float", Make(cv, -1), {}, StatusCode::kInvalidArgument);
    add("regress_create_constant_beyond_float",
        Make(spec("new/inf", {4}, OptimizerKind::kSgd, {0, protocol::InitConstant{1e39}}), -1), {},
        StatusCode::kInvalidArgument);
  }
  add("create_existing_same", Make(fuzz::HarnessVariables()[0], -1));
  {
    auto cv = fuzz::HarnessVariables()[0];
    cv.spec.optimizer.learning_rate = 0.5;
    add("create_existing_different", Make(cv, -1), {}, StatusCode::kAlreadyExists);
  }
  add("create_too_large", Make(spec("new/huge", {int64_t{1} << 40}, OptimizerKind::kSgd, {}), -1),
      {}, StatusCode::kResourceExhausted);
  {
    auto cv = spec("new/bad_momentum", {2}, OptimizerKind::kMomentum, {});
    cv.spec.optimizer.momentum = 1.0;
    add("create_bad_momentum", Make(cv, -1), {}, StatusCode::kInvalidArgument);
  }

  // ---- push: dense, partitioned, sparse, scalar; raw, f16, bf16
  auto update = [](std::string var, protocol::TensorRef values, protocol::RowSelection rows) {
    protocol::Update u;
    u.variable = std::move(var);
    u.values = std::move(values);
    u.rows = std::move(rows);
    return u;
  };
  for (Encoding e : {Encoding::kRaw, Encoding::kF16, Encoding::kBF16}) {
    const std::string en(protocol::EncodingName(e));
    protocol::Push p;
    p.updates = {update("dense/w", Ref(1, {16, 8}, e), protocol::RowRange{0, 16})};
    add("push_dense_" + en, Make(p), {Encode(Ramp(128), e)});
    protocol::Push sp;
    sp.updates = {update("emb", Ref(2, {3, 8}, e), Ref(1, {3}, Encoding::kRaw, DType::kI64))};
    add("push_sparse_" + en, Make(sp), {Indices({5, 200, 5}), Encode(Ramp(24), e)});
  }
  {
    protocol::Push p;
    p.updates = {update("part/w", Ref(1, {32, 4}), protocol::RowRange{16, 48})};
    add("push_partition_all", Make(p), {Encode(Ramp(128), Encoding::kRaw)});
    p.updates = {update("part/w", Ref(1, {5, 4}), protocol::RowRange{20, 25})};
    add("push_partition_rows", Make(p), {Encode(Ramp(20), Encoding::kRaw)});
    p.updates = {update("part/w", Ref(1, {5, 4}), protocol::RowRange{10, 15})};
    add("push_partition_outside", Make(p), {Encode(Ramp(20), Encoding::kRaw)},
        StatusCode::kOutOfRange);
    protocol::Push sp;
    sp.updates = {update("part/w", Ref(2, {2, 4}), Ref(1, {2}, Encoding::kRaw, DType::kI64))};
    add("push_partition_sparse", Make(sp), {Indices({16, 47}), Encode(Ramp(8), Encoding::kRaw)});
    add("push_partition_sparse_outside", Make(sp),
        {Indices({3, 47}), Encode(Ramp(8), Encoding::kRaw)}, StatusCode::kOutOfRange);
  }
  {
    protocol::Push p;
    p.advance_clock = true;
    p.updates = {update("dense/w", Ref(1, {16, 8}), protocol::RowRange{0, 16}),
                 update("dense/b", Ref(2, {8}, Encoding::kF16), protocol::RowRange{0, 8}),
                 update("scale", Ref(3, {}), protocol::RowRange{0, 1}),
                 update("async/v", Ref(4, {32}, Encoding::kBF16), protocol::RowRange{0, 32})};
    add("push_all_advance", Make(p),
        {Encode(Ramp(128), Encoding::kRaw), Encode(Ramp(8), Encoding::kF16),
         Encode({0.25f}, Encoding::kRaw), Encode(Ramp(32), Encoding::kBF16)});
    add("push_control", Make(p, -1),
        {Encode(Ramp(128), Encoding::kRaw), Encode(Ramp(8), Encoding::kF16),
         Encode({0.25f}, Encoding::kRaw), Encode(Ramp(32), Encoding::kBF16)},
        StatusCode::kInvalidArgument);  // advance_clock needs a worker id
    p.advance_clock = false;
    add("push_control_apply", Make(p, -1),
        {Encode(Ramp(128), Encoding::kRaw), Encode(Ramp(8), Encoding::kF16),
         Encode({0.25f}, Encoding::kRaw), Encode(Ramp(32), Encoding::kBF16)});
  }
  {
    const float nan = std::numeric_limits<float>::quiet_NaN();
    const float inf = std::numeric_limits<float>::infinity();
    std::vector<float> g = Ramp(128);
    g[17] = nan;
    protocol::Push p;
    p.updates = {update("dense/w", Ref(1, {16, 8}), protocol::RowRange{0, 16}),
                 update("dense/b", Ref(2, {8}), protocol::RowRange{0, 8})};
    add("push_nan_raw", Make(p), {Encode(g, Encoding::kRaw), Encode(Ramp(8), Encoding::kRaw)},
        StatusCode::kInvalidArgument);
    // A chunked push: the header (answered once its pieces are in), and a
    // piece of a push that is not arriving.
    protocol::Push chunked;
    chunked.updates = {update("dense/w", Ref(0, {16, 8}), protocol::RowRange{0, 16})};
    chunked.chunks = 2;
    add("push_chunked_header", Make(chunked), {}, StatusCode::kOk, /*answered_now=*/false);
    add("push_chunk_orphan", Make(protocol::PushChunk{256}), {Encode(Ramp(64), Encoding::kRaw)},
        StatusCode::kNotFound);
    std::vector<float> b = Ramp(8);
    b[3] = -inf;
    p.updates[1].values.encoding = Encoding::kF16;
    add("push_inf_f16", Make(p), {Encode(Ramp(128), Encoding::kRaw), Encode(b, Encoding::kF16)},
        StatusCode::kInvalidArgument);
    protocol::Push sp;
    sp.updates = {
        update("emb", Ref(2, {2, 8}, Encoding::kBF16), Ref(1, {2}, Encoding::kRaw, DType::kI64))};
    std::vector<float> e = Ramp(16);
    e[9] = nan;
    add("push_nan_sparse_bf16", Make(sp), {Indices({1, 2}), Encode(e, Encoding::kBF16)},
        StatusCode::kInvalidArgument);
  }
  {
    protocol::Push p;
    p.updates = {update("nope", Ref(1, {4}), protocol::RowRange{0, 4})};
    add("push_unknown_variable", Make(p), {Encode(Ramp(4), Encoding::kRaw)}, StatusCode::kNotFound);
    protocol::Push sp;
    sp.updates = {update("emb", Ref(2, {1, 8}), Ref(1, {1}, Encoding::kRaw, DType::kI64))};
    add("push_sparse_out_of_range", Make(sp), {Indices({256}), Encode(Ramp(8), Encoding::kRaw)},
        StatusCode::kOutOfRange);
    protocol::Push wp;
    wp.updates = {update("dense/w", Ref(1, {16, 8}), protocol::RowRange{0, 16})};
    add("push_unknown_worker", Make(wp, 5), {Encode(Ramp(128), Encoding::kRaw)},
        StatusCode::kInvalidArgument);
    add("push_future_clock", Make(wp, 0, 3), {Encode(Ramp(128), Encoding::kRaw)});
  }

  // ---- pull
  auto read = [](std::string var, protocol::RowSelection rows, Encoding e = Encoding::kRaw) {
    protocol::Read r;
    r.variable = std::move(var);
    r.encoding = e;
    r.rows = std::move(rows);
    return r;
  };
  {
    protocol::Pull p;
    p.reads = {read("dense/w", protocol::RowRange{0, 16}),
               read("dense/b", protocol::RowRange{0, 8}), read("scale", protocol::RowRange{0, 1}),
               read("async/v", protocol::RowRange{3, 9})};
    add("pull_dense", Make(p));
    add("pull_control", Make(p, -1));
    add("pull_held_future_clock", Make(p, 0, 5), {}, StatusCode::kOk, false);
    protocol::Pull sp;
    sp.reads = {read("emb", Ref(1, {4}, Encoding::kRaw, DType::kI64)),
                read("part/w", protocol::RowRange{16, 40})};
    add("pull_sparse", Make(sp), {Indices({0, 255, 7, 7})});
    protocol::Pull bad;
    bad.reads = {read("dense/w", protocol::RowRange{0, 16}, Encoding::kF16)};
    add("pull_f16", Make(bad), {}, StatusCode::kUnimplemented);
    // Found by the fuzzer: an empty row range of a scalar was answered with
    // a 0-byte frame for shape [] (a reply no client decodes). Now refused.
    bad.reads = {read("dense/b", protocol::RowRange{0, 8}),
                 read("scale", protocol::RowRange{1, 1})};
    add("regress_pull_scalar_empty_rows", Make(bad, -1), {}, StatusCode::kInvalidArgument);
    protocol::Pull scalar_rows;
    scalar_rows.reads = {read("scale", Ref(1, {2}, Encoding::kRaw, DType::kI64))};
    add("regress_pull_scalar_sparse", Make(scalar_rows, -1), {Indices({0, 0})},
        StatusCode::kInvalidArgument);
    bad.reads = {read("part/w", protocol::RowRange{0, 20})};
    add("pull_outside_partition", Make(bad), {}, StatusCode::kOutOfRange);
  }

  // ---- clocks, barriers, modes, learning rates
  add("advance_clock", Make(protocol::AdvanceClock{-1}));
  add("advance_clock_to", Make(protocol::AdvanceClock{9}));
  add("advance_clock_control", Make(protocol::AdvanceClock{-1}, -1), {},
      StatusCode::kInvalidArgument);
  add("barrier", Make(protocol::Barrier{"epoch-1"}));
  add("barrier_control", Make(protocol::Barrier{"epoch-1"}, -1), {}, StatusCode::kInvalidArgument);
  add("set_mode_ssp", Make(protocol::SetMode{2, "", false, -1}, -1));
  add("set_mode_async_stale_aware", Make(protocol::SetMode{-1, "", true, 3}, -1));
  add("set_mode_variable", Make(protocol::SetMode{1, "dense/w", false, -1}, -1));
  add("set_mode_bsp", Make(protocol::SetMode{0, "", false, -1}, -1));
  add("set_mode_invalid", Make(protocol::SetMode{-7, "", false, -1}, -1), {},
      StatusCode::kInvalidArgument);
  add("set_lr_all", Make(protocol::SetLearningRate{"", 0.05}, -1));
  add("set_lr_one", Make(protocol::SetLearningRate{"emb", 0.2}, -1));
  add("set_lr_negative", Make(protocol::SetLearningRate{"emb", -1}, -1), {},
      StatusCode::kInvalidArgument);
  // Found by the fuzzer: a learning rate of 1e39 (a finite double, Inf as a
  // float) was accepted and turned parameters into -Inf. Now refused, as are
  // other hyperparameters and initial values that do not fit a float.
  add("regress_set_lr_beyond_float", Make(protocol::SetLearningRate{"", 1e39}, -1), {},
      StatusCode::kInvalidArgument);
  add("set_lr_unknown", Make(protocol::SetLearningRate{"nope", 0.1}, -1), {},
      StatusCode::kNotFound);

  // ---- checkpoints, stats, shutdown
  add("checkpoint", Make(protocol::Checkpoint{""}, -1));
  add("checkpoint_named", Make(protocol::Checkpoint{"/tmp/anywhere"}, -1));
  add("stats", Make(protocol::Stats{}, -1));
  add("stats_worker", Make(protocol::Stats{}));
  add("shutdown", Make(protocol::Shutdown{false}, -1), {}, StatusCode::kOk, false);
  add("shutdown_checkpoint", Make(protocol::Shutdown{true}, -1), {}, StatusCode::kOk, false);
  return s;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 2) {
    std::fprintf(stderr, "usage: %s OUTPUT_DIR\n", argv[0]);
    return 2;
  }
  distval::ConfigureLogging({distval::LogLevel::kError, "corpus", false});
  const std::filesystem::path dir = argv[1];
  std::filesystem::create_directories(dir);
  bool ok = true;
  int count = 0;
  for (const Seed& seed : Seeds()) {
    const fuzz::WireRequest wire = fuzz::ToWire(seed.request, seed.payloads);
    auto harness = fuzz::ServerHarness::Create();
    if (!harness.ok()) {
      std::fprintf(stderr, "starting the servers failed: %s\n",
                   harness.status().ToString().c_str());
      return 1;
    }
    const std::vector<fuzz::SentReply> replies = (*harness)->Send(wire);
    const fuzz::SentReply& r = replies.front();  // the reject server
    if (seed.answered_now && (!r.answered || r.reply.code != seed.expect)) {
      std::fprintf(stderr, "seed %s: expected %s, got %s\n", seed.name.c_str(),
                   distval::StatusCodeName(seed.expect).c_str(),
                   r.answered ? r.reply.status().ToString().c_str() : "no reply");
      ok = false;
    }
    const auto bytes = fuzz::MakeFramedFuzzInput(wire.header, wire.payloads);
    std::ofstream out(dir / seed.name, std::ios::binary | std::ios::trunc);
    out.write(reinterpret_cast<const char*>(bytes.data()),
              static_cast<std::streamsize>(bytes.size()));
    ok &= out.good();
    ++count;
  }
  if (!ok) return 1;
  std::printf("wrote %d seeds to %s\n", count, dir.c_str());
  return 0;
}
