#include "optimizer.h"

#include <Eigen/Core>
#include <algorithm>
#include <cassert>
#include <cfloat>
#include <cmath>
#include <numeric>
#include <sstream>
#include <vector>

// ---- Exact square root for Eigen array expressions.
//
// Eigen 3.4's own float sqrt packet is an rsqrt approximation (a few ulp,
// EIGEN_FAST_MATH) on SSE/AVX/AVX-512, while the scalar path of the same
// expression (unaligned heads, tails) uses the exact std::sqrt; and with
// EIGEN_FAST_MATH=0 AVX-512 builds stop vectorizing sqrt altogether (10x
// slower). This functor uses the IEEE (correctly rounded) sqrt instruction in
// both paths, so an element's result never depends on where a range split or
// chunk boundary falls, nor on the vector width.
namespace distval::ps::detail {

struct ExactSqrtOp {
  float operator()(float x) const { return std::sqrt(x); }
#if defined(EIGEN_VECTORIZE_AVX512)
  Eigen::internal::Packet16f packetOp(const Eigen::internal::Packet16f& x) const {
    // The maskz form with every lane set is the same vsqrtps; it avoids GCC
    // 12's false -Wmaybe-uninitialized on _mm512_sqrt_ps (GCC bug 105593).
    return _mm512_maskz_sqrt_ps(static_cast<__mmask16>(0xFFFF), x);
  }
#endif
#if defined(EIGEN_VECTORIZE_AVX)
  Eigen::internal::Packet8f packetOp(const Eigen::internal::Packet8f& x) const {
    return _mm256_sqrt_ps(x);
  }
#endif
#if defined(EIGEN_VECTORIZE_SSE)
  Eigen::internal::Packet4f packetOp(const Eigen::internal::Packet4f& x) const {
    return _mm_sqrt_ps(x);
  }
#endif
};

}  // namespace distval::ps::detail

template <>
struct Eigen::internal::functor_traits<distval::ps::detail::ExactSqrtOp> {
  enum {
    Cost = 5 * NumTraits<float>::MulCost,
#if defined(EIGEN_VECTORIZE_SSE)
    PacketAccess = 1,
#else
    PacketAccess = 0,  // Other architectures: scalar std::sqrt.
#endif
  };
};

namespace distval::ps {
namespace {

template <typename Derived>
auto ExactSqrt(const Eigen::ArrayBase<Derived>& a) {
  return a.unaryExpr(detail::ExactSqrtOp());
}

using protocol::OptimizerKind;
using protocol::OptimizerSpec;
using ArrayMap = Eigen::Map<Eigen::ArrayXf>;
using ConstArrayMap = Eigen::Map<const Eigen::ArrayXf>;

std::string Num(double v) {
  std::ostringstream os;
  os << v;
  return os.str();
}

Status FieldError(const OptimizerSpec& spec, std::string_view field, double value,
                  std::string_view requirement) {
  return InvalidArgumentError("optimizer " + std::string(OptimizerName(spec.kind)) + ": " +
                              std::string(field) + " = " + Num(value) + " " +
                              std::string(requirement));
}

// ---- The rules. Each ApplyChunk is a handful of array statements over
// n <= kChunk elements, so every buffer stays in L1/L2 between statements.

class SgdOptimizer final : public Optimizer {
 public:
  SgdOptimizer(const OptimizerSpec& spec, const Shape& shape) : Optimizer(spec, shape) {}

 protected:
  void ApplyChunk(const float* p_in, float* p_out, const float* g, int64_t, int64_t n,
                  float grad_scale, double lr) override {
    const float a = static_cast<float>(lr * grad_scale);
    ArrayMap(p_out, n) = ConstArrayMap(p_in, n) - a * ConstArrayMap(g, n);
  }
};

class MomentumOptimizer final : public Optimizer {
 public:
  MomentumOptimizer(const OptimizerSpec& spec, const Shape& shape)
      : Optimizer(spec, shape), velocity_(AddSlot("velocity", 0.0f)) {}

 protected:
  void ApplyChunk(const float* p_in, float* p_out, const float* g, int64_t offset, int64_t n,
                  float grad_scale, double lr) override {
    const float a = static_cast<float>(lr * grad_scale);
    const float m = static_cast<float>(spec_.momentum);
    ArrayMap v(velocity_ + offset, n);
    ConstArrayMap grad(g, n);
    v = m * v - a * grad;
    if (spec_.nesterov) {
      ArrayMap(p_out, n) = ConstArrayMap(p_in, n) + (m * v - a * grad);
    } else {
      ArrayMap(p_out, n) = ConstArrayMap(p_in, n) + v;
    }
  }

 private:
  float* velocity_;
};

class AdagradOptimizer final : public Optimizer {
 public:
  AdagradOptimizer(const OptimizerSpec& spec, const Shape& shape)
      : Optimizer(spec, shape),
        accumulator_(AddSlot("accumulator", static_cast<float>(spec.initial_accumulator))) {}

 protected:
  void ApplyChunk(const float* p_in, float* p_out, const float* g, int64_t offset, int64_t n,
                  float grad_scale, double lr) override {
    const float gs = grad_scale;
    const float a = static_cast<float>(lr);
    const float eps = static_cast<float>(spec_.epsilon);
    ArrayMap acc(accumulator_ + offset, n);
    ConstArrayMap grad(g, n);
    acc += (gs * grad).square();
    ArrayMap(p_out, n) = ConstArrayMap(p_in, n) - a * (gs * grad) / (ExactSqrt(acc) + eps);
  }

 private:
  float* accumulator_;
};

// Adam, and AdamW when decoupled_decay is set.
class AdamOptimizer final : public Optimizer {
 public:
  AdamOptimizer(const OptimizerSpec& spec, const Shape& shape)
      : Optimizer(spec, shape), m_(AddSlot("m", 0.0f)), v_(AddSlot("v", 0.0f)) {
    OnStepChanged();
  }

 protected:
  void ApplyChunk(const float* p_in, float* p_out, const float* g, int64_t offset, int64_t n,
                  float grad_scale, double lr) override {
    assert(step_ >= 1 && "BeginStep() must precede an adam apply");
    const float b1 = static_cast<float>(spec_.beta1);
    const float b2 = static_cast<float>(spec_.beta2);
    const float c1 = static_cast<float>((1.0 - spec_.beta1) * grad_scale);
    const float c2 =
        static_cast<float>((1.0 - spec_.beta2) * double{grad_scale} * double{grad_scale});
    const float alpha = static_cast<float>(lr * bias_correction_);
    const float eps = static_cast<float>(spec_.epsilon);
    ArrayMap m(m_ + offset, n);
    ArrayMap v(v_ + offset, n);
    ConstArrayMap grad(g, n);
    m = b1 * m + c1 * grad;
    v = b2 * v + c2 * grad.square();
    if (spec_.kind == OptimizerKind::kAdamW && spec_.weight_decay != 0.0) {
      // p - (lr * wd) * p rather than (1 - lr * wd) * p: the float rounding
      // of a factor close to 1 would compound over the steps.
      const float decay = static_cast<float>(lr * spec_.weight_decay);
      ConstArrayMap p(p_in, n);
      ArrayMap(p_out, n) = p - decay * p - alpha * m / (ExactSqrt(v) + eps);
    } else {
      ArrayMap(p_out, n) = ConstArrayMap(p_in, n) - alpha * m / (ExactSqrt(v) + eps);
    }
  }

  void OnStepChanged() override {
    // sqrt(1 - beta2^t) / (1 - beta1^t); step 0 is never applied (see the
    // assert above), use t = 1 so the value stays finite.
    const double t = static_cast<double>(std::max<int64_t>(step_, 1));
    bias_correction_ = std::sqrt(1.0 - std::pow(spec_.beta2, t)) / (1.0 - std::pow(spec_.beta1, t));
  }

 private:
  float* m_;
  float* v_;
  double bias_correction_ = 1.0;
};

}  // namespace

std::string_view OptimizerName(OptimizerKind kind) {
  switch (kind) {
    case OptimizerKind::kSgd:
      return "sgd";
    case OptimizerKind::kMomentum:
      return "momentum";
    case OptimizerKind::kAdagrad:
      return "adagrad";
    case OptimizerKind::kAdam:
      return "adam";
    case OptimizerKind::kAdamW:
      return "adamw";
  }
  return "unknown";
}

namespace {

// Hyperparameters arrive as doubles and are applied as floats: a finite
// double above FLT_MAX becomes Inf (and then NaN in the parameters), and
// with flush-to-zero a positive one below FLT_MIN becomes 0.
bool FitsFloat(double x) { return std::isfinite(x) && std::fabs(x) <= FLT_MAX; }

}  // namespace

Status ValidateOptimizerSpec(const OptimizerSpec& spec) {
  switch (spec.kind) {
    case OptimizerKind::kSgd:
    case OptimizerKind::kMomentum:
    case OptimizerKind::kAdagrad:
    case OptimizerKind::kAdam:
    case OptimizerKind::kAdamW:
      break;
    default:
      return InvalidArgumentError("optimizer kind " + std::to_string(static_cast<int>(spec.kind)) +
                                  " is unknown (expected sgd, momentum, adagrad, adam or adamw)");
  }
  if (!FitsFloat(spec.learning_rate) || spec.learning_rate < 0)
    return FieldError(spec, "learning_rate", spec.learning_rate,
                      "must be >= 0 and fit a float (<= 3.4e38)");
  if (!FitsFloat(spec.weight_decay) || spec.weight_decay < 0)
    return FieldError(spec, "weight_decay", spec.weight_decay,
                      "must be >= 0 and fit a float (<= 3.4e38)");
  if (spec.weight_decay != 0 && spec.kind != OptimizerKind::kAdamW)
    return FieldError(spec, "weight_decay", spec.weight_decay,
                      "is only supported by adamw (decoupled decay); use 0");
  const bool uses_epsilon = spec.kind == OptimizerKind::kAdagrad ||
                            spec.kind == OptimizerKind::kAdam || spec.kind == OptimizerKind::kAdamW;
  if (uses_epsilon && (!FitsFloat(spec.epsilon) || spec.epsilon < FLT_MIN))
    return FieldError(spec, "epsilon", spec.epsilon,
                      "must be a normal float (in [1.2e-38, 3.4e38]): a smaller one is 0 "
                      "under flush-to-zero");
  if (spec.kind == OptimizerKind::kMomentum && !(spec.momentum >= 0 && spec.momentum < 1))
    return FieldError(spec, "momentum", spec.momentum, "must be in [0, 1)");
  if (spec.kind == OptimizerKind::kAdagrad &&
      (!FitsFloat(spec.initial_accumulator) || spec.initial_accumulator < 0))
    return FieldError(spec, "initial_accumulator", spec.initial_accumulator,
                      "must be >= 0 and fit a float (<= 3.4e38)");
  if (spec.kind == OptimizerKind::kAdam || spec.kind == OptimizerKind::kAdamW) {
    if (!(spec.beta1 >= 0 && spec.beta1 < 1))
      return FieldError(spec, "beta1", spec.beta1, "must be in [0, 1)");
    if (!(spec.beta2 >= 0 && spec.beta2 < 1))
      return FieldError(spec, "beta2", spec.beta2, "must be in [0, 1)");
  }
  return OkStatus();
}

StatusOr<std::unique_ptr<Optimizer>> Optimizer::Create(const OptimizerSpec& spec,
                                                       const Shape& shard_shape) {
  DV_RETURN_IF_ERROR(ValidateOptimizerSpec(spec));
  switch (spec.kind) {
    case OptimizerKind::kSgd:
      return std::unique_ptr<Optimizer>(std::make_unique<SgdOptimizer>(spec, shard_shape));
    case OptimizerKind::kMomentum:
      return std::unique_ptr<Optimizer>(std::make_unique<MomentumOptimizer>(spec, shard_shape));
    case OptimizerKind::kAdagrad:
      return std::unique_ptr<Optimizer>(std::make_unique<AdagradOptimizer>(spec, shard_shape));
    case OptimizerKind::kAdam:
    case OptimizerKind::kAdamW:
      return std::unique_ptr<Optimizer>(std::make_unique<AdamOptimizer>(spec, shard_shape));
  }
  return InternalError("unreachable optimizer kind");
}

Optimizer::Optimizer(const OptimizerSpec& spec, const Shape& shard_shape)
    : spec_(spec),
      learning_rate_(spec.learning_rate),
      num_elements_(shard_shape.num_elements()),
      row_elements_(shard_shape.row_elements()),
      shard_shape_(shard_shape) {}

float* Optimizer::AddSlot(std::string name, float fill) {
  Tensor t(DType::kF32, shard_shape_);
  float* data = t.data_as<float>();
  if (fill != 0.0f && num_elements_ > 0) ArrayMap(data, num_elements_).setConstant(fill);
  slots_.emplace_back(std::move(name), std::move(t));
  return data;  // The buffer does not move with the Tensor.
}

void Optimizer::BeginStep() {
  ++step_;
  OnStepChanged();
}

void Optimizer::set_step(int64_t step) {
  step_ = std::max<int64_t>(step, 0);
  OnStepChanged();
}

Status Optimizer::SetLearningRate(double learning_rate) {
  if (!FitsFloat(learning_rate) || learning_rate < 0)
    return InvalidArgumentError("learning_rate = " + Num(learning_rate) +
                                " must be >= 0 and fit a float (<= 3.4e38)");
  learning_rate_ = learning_rate;
  return OkStatus();
}

void Optimizer::ApplyDense(const float* params_in, float* params_out, const float* grad,
                           int64_t begin, int64_t end, float grad_scale, float lr_scale) {
  assert(0 <= begin && begin <= end && end <= num_elements_);
  const double lr = learning_rate_ * static_cast<double>(lr_scale);
  for (int64_t offset = begin; offset < end; offset += kChunk) {
    const int64_t n = std::min(kChunk, end - offset);
    ApplyChunk(params_in + offset, params_out + offset, grad + (offset - begin), offset, n,
               grad_scale, lr);
  }
}

void Optimizer::ApplyRows(float* params, std::span<const int64_t> local_rows,
                          const float* grad_rows, float grad_scale, float lr_scale) {
  const int64_t re = row_elements_;
  const size_t k = local_rows.size();
  // Order the positions by row so duplicates become neighbours; a stable
  // sort keeps the summation order (and so the rounding) deterministic.
  std::vector<size_t> order(k);
  std::iota(order.begin(), order.end(), size_t{0});
  std::stable_sort(order.begin(), order.end(),
                   [&](size_t a, size_t b) { return local_rows[a] < local_rows[b]; });
  std::vector<float> summed;  // Only used for rows that appear more than once.
  for (size_t i = 0; i < k;) {
    const int64_t row = local_rows[order[i]];
    assert(row >= 0 && row < num_rows());
    size_t j = i + 1;
    while (j < k && local_rows[order[j]] == row) ++j;
    const float* g = grad_rows + static_cast<int64_t>(order[i]) * re;
    if (j - i > 1) {
      summed.resize(static_cast<size_t>(re));
      ArrayMap sum(summed.data(), re);
      sum = ConstArrayMap(g, re);
      for (size_t d = i + 1; d < j; ++d)
        sum += ConstArrayMap(grad_rows + static_cast<int64_t>(order[d]) * re, re);
      g = summed.data();
    }
    ApplyDense(params, params, g, row * re, (row + 1) * re, grad_scale, lr_scale);
    i = j;
  }
}

std::vector<std::pair<std::string, Tensor*>> Optimizer::Slots() {
  std::vector<std::pair<std::string, Tensor*>> out;
  for (auto& [name, t] : slots_) out.emplace_back(name, &t);
  return out;
}

std::vector<std::pair<std::string, const Tensor*>> Optimizer::Slots() const {
  std::vector<std::pair<std::string, const Tensor*>> out;
  for (const auto& [name, t] : slots_) out.emplace_back(name, &t);
  return out;
}

size_t Optimizer::SlotBytes() const {
  size_t bytes = 0;
  for (const auto& [name, t] : slots_) bytes += t.num_bytes();
  return bytes;
}

}  // namespace distval::ps
