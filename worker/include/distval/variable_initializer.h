// VariableInitializer: how a new MirroredVariable gets its first value
// (tf.keras.initializers). Random kinds are counter-based and computed by the
// parameter servers (ps/initializer.h): element i of the whole variable gets
// the same value however the variable is split over shards, on every
// machine. Values() sends the caller's values.
//
//   strategy->CreateVariable("w", Shape{784, 10}, VariableInitializer::GlorotUniform(7));
//
// Thread-safety: a value; copy freely.
#ifndef DISTVAL_VARIABLE_INITIALIZER_H_
#define DISTVAL_VARIABLE_INITIALIZER_H_

#include <cstdint>
#include <memory>
#include <span>
#include <vector>

#include "distval/protocol.h"
#include "distval/tensor.h"

namespace distval {

class VariableInitializer {
 public:
  // Zeros (the default).
  VariableInitializer() = default;

  static VariableInitializer Zeros() { return VariableInitializer(); }
  static VariableInitializer Constant(double value) {
    return VariableInitializer({0, protocol::InitConstant{value}});
  }
  // Uniform in [low, high).
  static VariableInitializer Uniform(double low, double high, uint64_t seed) {
    return VariableInitializer({seed, protocol::InitUniform{low, high}});
  }
  static VariableInitializer Normal(double mean, double stddev, uint64_t seed) {
    return VariableInitializer({seed, protocol::InitNormal{mean, stddev}});
  }
  // Uniform in [-limit, limit), limit = sqrt(6 / (fan_in + fan_out)).
  static VariableInitializer GlorotUniform(uint64_t seed) {
    return VariableInitializer({seed, protocol::InitGlorotUniform{}});
  }
  // The whole variable's values, row-major (copied). CreateVariable checks
  // the count against the shape.
  static VariableInitializer Values(std::span<const float> values) {
    VariableInitializer init;
    init.values_ = std::make_shared<const std::vector<float>>(values.begin(), values.end());
    return init;
  }
  static VariableInitializer Values(const Tensor& values) {
    return Values(std::span<const float>(values.data_as<float>(),
                                         static_cast<size_t>(values.num_elements())));
  }

  // The wire form (ignored when values() is non-empty).
  const protocol::Initializer& spec() const { return spec_; }
  // Explicit values (empty unless made by Values()).
  std::span<const float> values() const {
    return values_ ? std::span<const float>(*values_) : std::span<const float>();
  }

 private:
  explicit VariableInitializer(protocol::Initializer spec) : spec_(std::move(spec)) {}
  protocol::Initializer spec_;
  std::shared_ptr<const std::vector<float>> values_;
};

}  // namespace distval

#endif  // DISTVAL_VARIABLE_INITIALIZER_H_
