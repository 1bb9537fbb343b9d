// Figure 5: server-side optimizer applies in memory (the store's ApplyDense
// on one thread, as the server's dispatcher runs it with --threads 1)
// against a STREAM-style triad over arrays of the same length, same thread.
#include <xmmintrin.h>

#include <memory>
#include <random>

#include "distval/tensor.h"
#include "figures.h"
#include "variable_store.h"

namespace distval::bench {
namespace {

// a = b + s * c (STREAM's triad: 3 arrays counted, 2 read and 1 written).
// Kept out of line so that every call really streams the arrays.
[[gnu::noinline]] void Triad(float* __restrict a, const float* __restrict b,
                             const float* __restrict c, float s, int64_t n) {
  for (int64_t i = 0; i < n; ++i) a[i] = b[i] + s * c[i];
}

struct Rule {
  const char* name;
  protocol::OptimizerKind kind;
  int arrays;  // arrays read or written per element (bytes counted: arrays * 4 * n)
  std::optional<Floor> floor_at_16m;
};

std::string FloatsLabel(int64_t n) {
  if (n % (int64_t{1} << 20) == 0) return std::to_string(n >> 20) + "M floats";
  return std::to_string(n) + " floats";
}

}  // namespace

Status RunApplyFigures(const BenchConfig& config, const std::vector<int64_t>& num_floats,
                       Report* report) {
  _mm_setcsr(_mm_getcsr() | 0x8040);  // FTZ/DAZ, as on the server's apply threads
  const std::vector<Rule> rules = {
      // sgd: read p, g; write p.
      {"sgd", protocol::OptimizerKind::kSgd, 3, std::nullopt},
      // momentum: read p, g, v; write v, p.
      {"momentum", protocol::OptimizerKind::kMomentum, 5, std::nullopt},
      // adam: read p, g, m, v; write m, v, p.
      {"adam", protocol::OptimizerKind::kAdam, 7, Floor{Floor::Kind::kAtLeast, 0.60}},
  };
  for (int64_t n : num_floats) {
    const Shape shape({n});
    Tensor a(DType::kF32, shape), b(DType::kF32, shape), c(DType::kF32, shape);
    Tensor grad(DType::kF32, shape);
    {
      std::mt19937 rng(1);
      std::uniform_real_distribution<float> u(-1e-3f, 1e-3f);
      float* g = grad.data_as<float>();
      for (int64_t i = 0; i < n; ++i) g[i] = u(rng);
      for (int64_t i = 0; i < n; ++i) b.data_as<float>()[i] = 1.f;
      for (int64_t i = 0; i < n; ++i) c.data_as<float>()[i] = 2.f;
      for (int64_t i = 0; i < n; ++i) a.data_as<float>()[i] = 0.f;
    }
    ps::VariableStore store;
    std::vector<ps::Variable*> vars;
    for (const Rule& r : rules) {
      protocol::VariableSpec spec;
      spec.name = std::string(r.name) + std::to_string(n);
      spec.shape = {n};
      spec.initializer.kind = protocol::InitConstant{0.5};
      spec.optimizer.kind = r.kind;
      spec.optimizer.learning_rate = 1e-3;
      DV_ASSIGN_OR_RETURN(ps::Variable * v, store.Create(spec, protocol::RowRange{0, n}, nullptr));
      vars.push_back(v);
    }
    std::vector<Measure> measures;
    measures.push_back([&]() -> StatusOr<double> {
      return SecondsPerIteration(
          [&] {
            Triad(a.data_as<float>(), b.data_as<float>(), c.data_as<float>(), 3.f, n);
            return OkStatus();
          },
          config.timing);
    });
    for (ps::Variable* v : vars) {
      measures.push_back([&, v]() -> StatusOr<double> {
        return SecondsPerIteration(
            [&] {
              return ps::VariableStore::ApplyDense(*v, protocol::RowRange{0, n},
                                                   grad.data_as<float>(), 1.f, 1.f);
            },
            config.timing);
      });
    }
    DV_ASSIGN_OR_RETURN(std::vector<double> t, AlternateMedians(measures, config.reps));
    const double bytes = 4.0 * static_cast<double>(n);
    const double triad = 3 * bytes / t[0] / 1e9;
    for (size_t i = 0; i < rules.size(); ++i) {
      const Rule& r = rules[i];
      std::optional<Floor> floor = n == (int64_t{16} << 20) ? r.floor_at_16m : std::nullopt;
      report->Add(Row{.name = std::string("apply_") + r.name,
                      .figure = std::string("apply ") + r.name + ", " + FloatsLabel(n),
                      .size_bytes = static_cast<int64_t>(bytes),
                      .value = r.arrays * bytes / t[i + 1] / 1e9,
                      .unit = "GB/s",
                      .limit = triad,
                      .limit_name = "triad",
                      .floor = floor});
    }
  }
  return OkStatus();
}

}  // namespace distval::bench
