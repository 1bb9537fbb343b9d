// Micro-benchmarks of variable placement (shared/partitioner.cc): what every
// worker computes locally for each variable it creates.
#include <benchmark/benchmark.h>

#include <string>
#include <vector>

#include "distval/partitioner.h"

namespace distval {
namespace {

// Places `vars` variables of mixed sizes over `shards` shards, the large
// ones split by MinSize.
void BM_PlaceModel(benchmark::State& state) {
  const int vars = static_cast<int>(state.range(0));
  const int shards = static_cast<int>(state.range(1));
  const Partitioner p = Partitioner::MinSize(256 << 10, shards);
  std::vector<std::string> names;
  for (int i = 0; i < vars; ++i) names.push_back(std::to_string(i));
  for (auto _ : state) {
    PlacementPlanner planner(shards);
    for (int i = 0; i < vars; ++i) {
      const int64_t rows = 64 << (i % 8);  // 64 .. 8192 rows of 128
      auto placed =
          planner.Place(names[static_cast<size_t>(i)], DType::kF32, Shape({rows, 128}), p);
      benchmark::DoNotOptimize(placed);
    }
  }
  state.SetItemsProcessed(state.iterations() * vars);
}
BENCHMARK(BM_PlaceModel)->Args({16, 2})->Args({256, 4})->Args({1024, 16});

void BM_ShardOfRow(benchmark::State& state) {
  PlacementPlanner planner(static_cast<int>(state.range(0)));
  auto placed = planner.Place("embedding", DType::kF32, Shape({1 << 20, 64}),
                              Partitioner::FixedShards(static_cast<int>(state.range(0))));
  if (!placed.ok()) {
    state.SkipWithError("placement failed");
    return;
  }
  int64_t row = 0;
  for (auto _ : state) {
    benchmark::DoNotOptimize(placed->ShardOfRow(row));
    row = (row + 7919) & ((1 << 20) - 1);
  }
}
BENCHMARK(BM_ShardOfRow)->Arg(2)->Arg(16);

void BM_SplitRows(benchmark::State& state) {
  for (auto _ : state)
    benchmark::DoNotOptimize(SplitRows(1 << 20, static_cast<int>(state.range(0))));
}
BENCHMARK(BM_SplitRows)->Arg(4)->Arg(64);

}  // namespace
}  // namespace distval
