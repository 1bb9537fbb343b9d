// Micro-benchmarks of the protocol codec (shared/protocol.cc) and the
// payload encodings (shared/encoding.cc).
#include <benchmark/benchmark.h>

#include <vector>

#include "distval/encoding.h"
#include "distval/protocol.h"

namespace distval::protocol {
namespace {

// A push of `updates` dense updates, as a worker sends for a model with
// that many variables.
Request MakePush(int updates) {
  Request r;
  r.request_id = 12345;
  r.worker_id = 3;
  r.clock = 1000;
  Push p;
  p.advance_clock = true;
  for (int i = 0; i < updates; ++i) {
    Update u;
    u.variable = "dense_" + std::to_string(i) + "/kernel";
    u.values.frame = static_cast<uint32_t>(i + 1);
    u.values.shape = {256, 128};
    u.rows = RowRange{0, 256};
    p.updates.push_back(u);
  }
  r.body = p;
  return r;
}

void BM_EncodePush(benchmark::State& state) {
  const Request r = MakePush(static_cast<int>(state.range(0)));
  for (auto _ : state) benchmark::DoNotOptimize(EncodeRequest(r));
}
BENCHMARK(BM_EncodePush)->Arg(1)->Arg(8)->Arg(64);

void BM_DecodePush(benchmark::State& state) {
  const int n = static_cast<int>(state.range(0));
  const auto bytes = EncodeRequest(MakePush(n));
  const std::vector<size_t> sizes(static_cast<size_t>(n), 256 * 128 * 4);
  for (auto _ : state) benchmark::DoNotOptimize(DecodeRequest(bytes, sizes));
}
BENCHMARK(BM_DecodePush)->Arg(1)->Arg(8)->Arg(64);

void BM_EncodeDecodePullReply(benchmark::State& state) {
  Reply r;
  r.request_id = 7;
  PullReply pr;
  TensorRef t;
  t.frame = 1;
  t.shape = {1 << 20};
  pr.tensors.push_back(t);
  pr.versions.push_back(99);
  r.body = pr;
  const std::vector<size_t> sizes = {size_t{4} << 20};
  for (auto _ : state) {
    auto bytes = EncodeReply(r);
    benchmark::DoNotOptimize(DecodeReply(bytes, sizes));
  }
}
BENCHMARK(BM_EncodeDecodePullReply);

void BM_EncodeFloats(benchmark::State& state) {
  const auto encoding = static_cast<Encoding>(state.range(0));
  const size_t n = 1 << 20;
  std::vector<float> in(n, 0.37f);
  std::vector<std::byte> out(n * 2);
  for (auto _ : state) {
    EncodeFloats(in, encoding, out);
    benchmark::ClobberMemory();
  }
  state.SetBytesProcessed(static_cast<int64_t>(state.iterations() * n * sizeof(float)));
  state.SetLabel(std::string(EncodingName(encoding)));
}
BENCHMARK(BM_EncodeFloats)
    ->Arg(static_cast<int>(Encoding::kF16))
    ->Arg(static_cast<int>(Encoding::kBF16));

void BM_DecodeFloats(benchmark::State& state) {
  const auto encoding = static_cast<Encoding>(state.range(0));
  const size_t n = 1 << 20;
  std::vector<std::byte> in(n * 2, std::byte{0x3c});
  std::vector<float> out(n);
  for (auto _ : state) {
    DecodeFloats(in, encoding, out);
    benchmark::ClobberMemory();
  }
  state.SetBytesProcessed(static_cast<int64_t>(state.iterations() * n * sizeof(float)));
  state.SetLabel(std::string(EncodingName(encoding)));
}
BENCHMARK(BM_DecodeFloats)
    ->Arg(static_cast<int>(Encoding::kF16))
    ->Arg(static_cast<int>(Encoding::kBF16));

}  // namespace
}  // namespace distval::protocol

BENCHMARK_MAIN();
