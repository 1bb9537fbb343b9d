// Initial values of a variable shard.
//
// Every generated value is a pure function of (initializer kind, its
// parameters, seed, GLOBAL element index): element i of the whole variable
// (row-major, i = row * row_elements + column) always gets the same value, no
// matter how the variable is split over shards. Random kinds use a
// counter-based generator (splitmix64 finalizer over the mixed seed and the
// element index), so there is no sequential state to advance.
//
//   zeros           0
//   constant        value
//   uniform         low + (high - low) * u,  u in [0, 1)
//   normal          mean + stddev * z,       z standard normal (Box-Muller)
//   glorot_uniform  uniform in [-limit, limit), limit = sqrt(6 / (fan_in + fan_out))
//   values          copied from the caller's buffer (this shard's rows only)
//
// The seed is used as given: two variables with the same random initializer
// and seed get the same values at the same indices, so callers derive a
// distinct seed per variable (e.g. from the job seed and the name).
//
// Thread-safety: pure functions; concurrent calls are fine.
#ifndef DISTVAL_PS_INITIALIZER_H_
#define DISTVAL_PS_INITIALIZER_H_

#include <cstdint>
#include <span>

#include "distval/protocol.h"
#include "distval/status.h"
#include "distval/tensor.h"

namespace distval::ps {

// Keras-style fans of a variable shape: rank 0: (1, 1); rank 1: (dim, dim);
// rank 2 [in, out]: (in, out); rank > 2 (convolution kernels [..., in, out]):
// receptive field = product of the leading dims, fan_in = in * receptive,
// fan_out = out * receptive.
struct Fans {
  double fan_in = 1;
  double fan_out = 1;
};
Fans ComputeFans(const Shape& shape);

// sqrt(6 / (fan_in + fan_out)), with the fan sum clamped to >= 2 so that an
// empty shape gives a finite limit (Keras clamps the average fan to >= 1).
double GlorotUniformLimit(const Shape& shape);

// Checks the initializer's parameters for a variable of `shape`: constant
// value finite; uniform low <= high, both finite; normal mean finite, stddev
// finite and >= 0. For `values`, the TensorRef must be f32, raw encoding,
// shaped like the shard (`shard_shape`). InvalidArgument naming the field.
Status ValidateInitializer(const protocol::Initializer& init, const Shape& shard_shape);

// Writes the initial values of rows [rows.begin, rows.end) of a variable of
// shape `shape` into `out` (rows.size() * shape.row_elements() floats,
// caller-owned). For a scalar, rows is [0, 1). `values` is required for the
// `values` kind (this shard's rows, same size as out) and ignored otherwise.
// Errors: InvalidArgument for an invalid initializer (see
// ValidateInitializer), rows outside [0, shape.rows()], `out` or `values` of
// the wrong size.
Status InitializeRows(const protocol::Initializer& init, const Shape& shape,
                      protocol::RowRange rows, std::span<float> out,
                      std::span<const float> values = {});

// The uniform value in [0, 1) and the standard normal value that the
// generator assigns to (seed, index). Exposed for tests and for workers that
// want to reproduce an initialization locally.
double CounterUniform(uint64_t seed, uint64_t index);
double CounterNormal(uint64_t seed, uint64_t index);
// The largest |CounterNormal| there is: its uniform input is at least 2^-53,
// so |z| <= sqrt(-2 ln 2^-53) = 8.5717.
inline constexpr double kNormalMaxDeviations = 8.5717;

}  // namespace distval::ps

#endif  // DISTVAL_PS_INITIALIZER_H_
