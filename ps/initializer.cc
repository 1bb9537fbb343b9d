#include "initializer.h"

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstring>
#include <numbers>
#include <sstream>
#include <type_traits>
#include <variant>

namespace distval::ps {
namespace {

using protocol::RowRange;

std::string Num(double v) {
  std::ostringstream os;
  os << v;
  return os.str();
}

// splitmix64's output function: a bijective 64-bit mixer.
inline uint64_t Mix64(uint64_t z) {
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
  return z ^ (z >> 31);
}

constexpr uint64_t kGolden = 0x9e3779b97f4a7c15ULL;

// The counter-th output of a splitmix64 stream whose start is derived from
// the seed (mixing the seed first keeps nearby seeds' streams apart).
inline uint64_t CounterHash(uint64_t seed, uint64_t counter) {
  const uint64_t key = Mix64(seed + kGolden);
  return Mix64(key + (counter + 1) * kGolden);
}

inline double ToUnit(uint64_t h) {  // [0, 1), 53 bits
  return static_cast<double>(h >> 11) * 0x1.0p-53;
}

template <typename Fn>
void FillGenerated(std::span<float> out, int64_t first_index, Fn fn) {
  for (size_t i = 0; i < out.size(); ++i)
    out[i] = static_cast<float>(fn(static_cast<uint64_t>(first_index) + i));
}

std::string KindName(const protocol::Initializer& init) {
  static constexpr const char* kNames[] = {"zeros",  "constant",       "uniform",
                                           "normal", "glorot_uniform", "values"};
  return kNames[init.kind.index()];
}

}  // namespace

double CounterUniform(uint64_t seed, uint64_t index) {
  return ToUnit(CounterHash(seed, 2 * index));
}

double CounterNormal(uint64_t seed, uint64_t index) {
  // Box-Muller over two independent counter outputs; u1 in (0, 1].
  const double u1 = static_cast<double>((CounterHash(seed, 2 * index) >> 11) + 1) * 0x1.0p-53;
  const double u2 = ToUnit(CounterHash(seed, 2 * index + 1));
  return std::sqrt(-2.0 * std::log(u1)) * std::cos(2.0 * std::numbers::pi * u2);
}

Fans ComputeFans(const Shape& shape) {
  const size_t r = shape.rank();
  if (r == 0) return {1, 1};
  if (r == 1) return {static_cast<double>(shape.dim(0)), static_cast<double>(shape.dim(0))};
  double receptive = 1;
  for (size_t i = 0; i + 2 < r; ++i) receptive *= static_cast<double>(shape.dim(i));
  return {static_cast<double>(shape.dim(r - 2)) * receptive,
          static_cast<double>(shape.dim(r - 1)) * receptive};
}

double GlorotUniformLimit(const Shape& shape) {
  const Fans f = ComputeFans(shape);
  return std::sqrt(6.0 / std::max(2.0, f.fan_in + f.fan_out));
}

namespace {

// Initial values are written as floats: a finite double above FLT_MAX
// would start the parameters at Inf.
bool FitsFloat(double x) { return std::isfinite(x) && std::fabs(x) <= FLT_MAX; }

}  // namespace

Status ValidateInitializer(const protocol::Initializer& init, const Shape& shard_shape) {
  return std::visit(
      [&](const auto& k) -> Status {
        using K = std::decay_t<decltype(k)>;
        if constexpr (std::is_same_v<K, protocol::InitConstant>) {
          if (!FitsFloat(k.value))
            return InvalidArgumentError("initializer constant: value = " + Num(k.value) +
                                        " must fit a float (|value| <= 3.4e38)");
        } else if constexpr (std::is_same_v<K, protocol::InitUniform>) {
          if (!FitsFloat(k.low) || !FitsFloat(k.high) || k.low > k.high)
            return InvalidArgumentError("initializer uniform: low = " + Num(k.low) + ", high = " +
                                        Num(k.high) +
                                        " must fit a float (|x| <= 3.4e38) with low <= high");
        } else if constexpr (std::is_same_v<K, protocol::InitNormal>) {
          if (!FitsFloat(k.mean))
            return InvalidArgumentError("initializer normal: mean = " + Num(k.mean) +
                                        " must fit a float (|mean| <= 3.4e38)");
          if (!FitsFloat(k.stddev) || k.stddev < 0)
            return InvalidArgumentError("initializer normal: stddev = " + Num(k.stddev) +
                                        " must be >= 0 and fit a float (<= 3.4e38)");
          // Every value drawn, not only the mean, must be a finite float.
          if (!FitsFloat(std::fabs(k.mean) + kNormalMaxDeviations * k.stddev))
            return InvalidArgumentError(
                "initializer normal: mean = " + Num(k.mean) + ", stddev = " + Num(k.stddev) +
                ": values up to |mean| + " + Num(kNormalMaxDeviations) +
                " * stddev can be drawn, which must fit a float (<= 3.4e38)");
        } else if constexpr (std::is_same_v<K, protocol::InitValues>) {
          if (k.values.dtype != DType::kF32)
            return InvalidArgumentError("initializer values: dtype " +
                                        std::string(DTypeName(k.values.dtype)) +
                                        " is not supported, expected f32");
          if (k.values.encoding != protocol::Encoding::kRaw)
            return InvalidArgumentError(
                "initializer values: encoding must be raw (f32), got encoding " +
                std::to_string(static_cast<int>(k.values.encoding)));
          if (Shape(k.values.shape) != shard_shape)
            return InvalidArgumentError(
                "initializer values: shape " + Shape(k.values.shape).ToString() +
                " does not match the shard's shape " + shard_shape.ToString());
        }
        return OkStatus();
      },
      init.kind);
}

Status InitializeRows(const protocol::Initializer& init, const Shape& shape, RowRange rows,
                      std::span<float> out, std::span<const float> values) {
  if (rows.begin < 0 || rows.begin > rows.end || rows.end > shape.rows())
    return InvalidArgumentError("initializer " + KindName(init) + ": rows [" +
                                std::to_string(rows.begin) + ", " + std::to_string(rows.end) +
                                ") are outside [0, " + std::to_string(shape.rows()) +
                                ") of shape " + shape.ToString());
  const int64_t re = shape.row_elements();
  const int64_t n = rows.size() * re;
  if (static_cast<int64_t>(out.size()) != n)
    return InvalidArgumentError("initializer " + KindName(init) + ": output has " +
                                std::to_string(out.size()) + " elements, rows [" +
                                std::to_string(rows.begin) + ", " + std::to_string(rows.end) +
                                ") of shape " + shape.ToString() + " need " + std::to_string(n));
  std::vector<int64_t> shard_dims = shape.dims();
  if (!shard_dims.empty()) shard_dims[0] = rows.size();
  DV_RETURN_IF_ERROR(ValidateInitializer(init, Shape(shard_dims)));

  const int64_t first = rows.begin * re;
  const uint64_t seed = init.seed;
  return std::visit(
      [&](const auto& k) -> Status {
        using K = std::decay_t<decltype(k)>;
        if constexpr (std::is_same_v<K, protocol::InitZeros>) {
          std::fill(out.begin(), out.end(), 0.0f);
        } else if constexpr (std::is_same_v<K, protocol::InitConstant>) {
          std::fill(out.begin(), out.end(), static_cast<float>(k.value));
        } else if constexpr (std::is_same_v<K, protocol::InitUniform>) {
          const double low = k.low, width = k.high - k.low;
          FillGenerated(out, first,
                        [&](uint64_t i) { return low + width * CounterUniform(seed, i); });
        } else if constexpr (std::is_same_v<K, protocol::InitNormal>) {
          const double mean = k.mean, stddev = k.stddev;
          FillGenerated(out, first,
                        [&](uint64_t i) { return mean + stddev * CounterNormal(seed, i); });
        } else if constexpr (std::is_same_v<K, protocol::InitGlorotUniform>) {
          const double limit = GlorotUniformLimit(shape);
          FillGenerated(out, first,
                        [&](uint64_t i) { return -limit + 2.0 * limit * CounterUniform(seed, i); });
        } else if constexpr (std::is_same_v<K, protocol::InitValues>) {
          if (values.size() != out.size())
            return InvalidArgumentError("initializer values: got " + std::to_string(values.size()) +
                                        " values for rows [" + std::to_string(rows.begin) + ", " +
                                        std::to_string(rows.end) + ") of shape " +
                                        shape.ToString() + ", expected " + std::to_string(n));
          if (n > 0) std::memcpy(out.data(), values.data(), out.size() * sizeof(float));
        }
        return OkStatus();
      },
      init.kind);
}

}  // namespace distval::ps
