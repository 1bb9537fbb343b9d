// Micro-benchmarks of the optimizer kernels (ps/optimizer.cc), in place,
// one thread; bytes counted as the arrays each rule reads and writes.
#include <benchmark/benchmark.h>
#include <xmmintrin.h>

#include <vector>

#include "optimizer.h"

namespace distval::ps {
namespace {

void BM_ApplyDense(benchmark::State& state) {
  _mm_setcsr(_mm_getcsr() | 0x8040);
  const auto kind = static_cast<protocol::OptimizerKind>(state.range(0));
  const int64_t n = state.range(1);
  protocol::OptimizerSpec spec;
  spec.kind = kind;
  spec.learning_rate = 1e-3;
  auto opt = Optimizer::Create(spec, Shape({n}));
  if (!opt.ok()) {
    state.SkipWithError("Optimizer::Create failed");
    return;
  }
  std::vector<float> params(static_cast<size_t>(n), 0.5f), grad(static_cast<size_t>(n), 1e-3f);
  int arrays = 3;  // sgd: p, g read; p written
  switch (kind) {
    case protocol::OptimizerKind::kMomentum:
    case protocol::OptimizerKind::kAdagrad:
      arrays = kind == protocol::OptimizerKind::kMomentum ? 5 : 4;
      break;
    case protocol::OptimizerKind::kAdam:
    case protocol::OptimizerKind::kAdamW:
      arrays = 7;
      break;
    default:
      break;
  }
  for (auto _ : state) {
    (*opt)->BeginStep();
    (*opt)->ApplyDense(params.data(), grad.data(), 0, n, 1.f, 1.f);
    benchmark::ClobberMemory();
  }
  state.SetBytesProcessed(state.iterations() * n * 4 * arrays);
  state.SetLabel(std::string(OptimizerName(kind)));
}
BENCHMARK(BM_ApplyDense)
    ->ArgsProduct({{static_cast<int>(protocol::OptimizerKind::kSgd),
                    static_cast<int>(protocol::OptimizerKind::kMomentum),
                    static_cast<int>(protocol::OptimizerKind::kAdagrad),
                    static_cast<int>(protocol::OptimizerKind::kAdam)},
                   {1 << 16, 1 << 20}});

void BM_ApplyRows(benchmark::State& state) {
  const int64_t rows = 1 << 16, cols = 64, k = state.range(0);
  protocol::OptimizerSpec spec;
  spec.kind = protocol::OptimizerKind::kAdam;
  auto opt = Optimizer::Create(spec, Shape({rows, cols}));
  if (!opt.ok()) {
    state.SkipWithError("Optimizer::Create failed");
    return;
  }
  std::vector<float> params(static_cast<size_t>(rows * cols), 0.5f);
  std::vector<float> grad(static_cast<size_t>(k * cols), 1e-3f);
  std::vector<int64_t> idx(static_cast<size_t>(k));
  for (int64_t i = 0; i < k; ++i) idx[static_cast<size_t>(i)] = (i * 7919) % rows;
  for (auto _ : state) {
    (*opt)->BeginStep();
    (*opt)->ApplyRows(params.data(), idx, grad.data(), 1.f, 1.f);
    benchmark::ClobberMemory();
  }
  state.SetItemsProcessed(state.iterations() * k);
}
BENCHMARK(BM_ApplyRows)->Arg(128)->Arg(4096);

}  // namespace
}  // namespace distval::ps
