#include "optimizer.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <ostream>
#include <random>
#include <string>
#include <thread>
#include <vector>

namespace distval::ps {
namespace {

using protocol::OptimizerKind;
using protocol::OptimizerSpec;

// A plain double-precision implementation of the documented rules (Keras
// form), written element by element. `mask` selects the elements an update
// touches (lazy sparse semantics); nullptr: all.
class Reference {
 public:
  Reference(const OptimizerSpec& spec, std::vector<double> params)
      : spec_(spec), lr_(spec.learning_rate), p_(std::move(params)) {
    const size_t n = p_.size();
    a_.assign(n, spec.kind == OptimizerKind::kAdagrad ? spec.initial_accumulator : 0.0);
    b_.assign(n, 0.0);
  }

  void set_learning_rate(double lr) { lr_ = lr; }
  const std::vector<double>& params() const { return p_; }

  void Step(const std::vector<double>& grad, double grad_scale, double lr_scale,
            const std::vector<bool>* mask = nullptr) {
    ++t_;
    const double lr = lr_ * lr_scale;
    for (size_t i = 0; i < p_.size(); ++i) {
      if (mask && !(*mask)[i]) continue;
      const double g = grad[i] * grad_scale;
      double& p = p_[i];
      switch (spec_.kind) {
        case OptimizerKind::kSgd:
          p -= lr * g;
          break;
        case OptimizerKind::kMomentum: {
          double& v = a_[i];
          v = spec_.momentum * v - lr * g;
          p += spec_.nesterov ? spec_.momentum * v - lr * g : v;
          break;
        }
        case OptimizerKind::kAdagrad: {
          double& acc = a_[i];
          acc += g * g;
          p -= lr * g / (std::sqrt(acc) + spec_.epsilon);
          break;
        }
        case OptimizerKind::kAdam:
        case OptimizerKind::kAdamW: {
          double& m = a_[i];
          double& v = b_[i];
          if (spec_.kind == OptimizerKind::kAdamW) p -= lr * spec_.weight_decay * p;
          m = spec_.beta1 * m + (1 - spec_.beta1) * g;
          v = spec_.beta2 * v + (1 - spec_.beta2) * g * g;
          const double alpha =
              lr * std::sqrt(1 - std::pow(spec_.beta2, t_)) / (1 - std::pow(spec_.beta1, t_));
          p -= alpha * m / (std::sqrt(v) + spec_.epsilon);
          break;
        }
      }
    }
  }

 private:
  OptimizerSpec spec_;
  double lr_;
  int t_ = 0;
  std::vector<double> p_, a_, b_;
};

struct Case {
  std::string name;
  OptimizerSpec spec;
  float grad_scale;
  float lr_scale;
};
void PrintTo(const Case& c, std::ostream* os) { *os << c.name; }

OptimizerSpec Spec(OptimizerKind kind, double lr) {
  OptimizerSpec s;
  s.kind = kind;
  s.learning_rate = lr;
  return s;
}

std::vector<Case> Cases() {
  std::vector<Case> cases;
  cases.push_back({"sgd", Spec(OptimizerKind::kSgd, 0.05), 1.0f, 1.0f});
  cases.push_back({"sgd_scaled", Spec(OptimizerKind::kSgd, 0.05), 0.25f, 0.5f});
  OptimizerSpec m = Spec(OptimizerKind::kMomentum, 0.01);
  m.momentum = 0.9;
  cases.push_back({"momentum", m, 1.0f, 1.0f});
  m.nesterov = true;
  cases.push_back({"nesterov_scaled", m, 0.5f, 0.75f});
  OptimizerSpec ag = Spec(OptimizerKind::kAdagrad, 0.1);
  ag.initial_accumulator = 0.1;
  ag.epsilon = 1e-7;
  cases.push_back({"adagrad", ag, 1.0f, 1.0f});
  cases.push_back({"adagrad_scaled", ag, 0.25f, 0.5f});
  OptimizerSpec adam = Spec(OptimizerKind::kAdam, 0.01);
  cases.push_back({"adam", adam, 1.0f, 1.0f});
  adam.beta1 = 0.8;
  adam.beta2 = 0.99;
  adam.epsilon = 1e-6;
  cases.push_back({"adam_scaled", adam, 0.5f, 0.5f});
  OptimizerSpec adamw = Spec(OptimizerKind::kAdamW, 0.01);
  adamw.weight_decay = 0.05;
  cases.push_back({"adamw", adamw, 1.0f, 1.0f});
  cases.push_back({"adamw_scaled", adamw, 0.25f, 2.0f});
  return cases;
}

// max |a - ref| / max |ref| (infinity-norm relative error).
double RelativeError(const std::vector<float>& a, const std::vector<double>& ref) {
  double diff = 0, scale = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    diff = std::max(diff, std::abs(double{a[i]} - ref[i]));
    scale = std::max(scale, std::abs(ref[i]));
  }
  return diff / scale;
}

std::vector<float> RandomVector(std::mt19937_64& rng, size_t n, double stddev) {
  std::normal_distribution<double> dist(0.0, stddev);
  std::vector<float> v(n);
  for (float& x : v) x = static_cast<float>(dist(rng));
  return v;
}

std::vector<double> ToDouble(const std::vector<float>& v) { return {v.begin(), v.end()}; }

class OptimizerCaseTest : public ::testing::TestWithParam<Case> {};

// 200 steps of seeded random gradients against the double reference, with a
// learning-rate change at step 100. Shape [61, 17]: 1037 elements, not a
// multiple of any vector width, and more than one chunk.
TEST_P(OptimizerCaseTest, MatchesDoubleReference) {
  const Case& c = GetParam();
  const Shape shape{61, 17};
  const size_t n = static_cast<size_t>(shape.num_elements());
  std::mt19937_64 rng(42);
  std::vector<float> params = RandomVector(rng, n, 1.0);
  Reference ref(c.spec, ToDouble(params));
  auto opt = Optimizer::Create(c.spec, shape);
  ASSERT_TRUE(opt.ok()) << opt.status();
  for (int step = 0; step < 200; ++step) {
    if (step == 100) {
      const double lr = c.spec.learning_rate * 0.3;
      ASSERT_TRUE((*opt)->SetLearningRate(lr).ok());
      ref.set_learning_rate(lr);
      EXPECT_EQ((*opt)->learning_rate(), lr);
    }
    std::vector<float> grad = RandomVector(rng, n, 1.0);
    (*opt)->BeginStep();
    (*opt)->ApplyDense(params.data(), grad.data(), 0, static_cast<int64_t>(n), c.grad_scale,
                       c.lr_scale);
    ref.Step(ToDouble(grad), c.grad_scale, c.lr_scale);
  }
  EXPECT_EQ((*opt)->step(), 200);
  EXPECT_LT(RelativeError(params, ref.params()), 1e-5) << c.name;
  // The update really moved the parameters (a no-op optimizer must fail).
  std::mt19937_64 rng2(42);
  std::vector<float> initial = RandomVector(rng2, n, 1.0);
  double moved = 0;
  for (size_t i = 0; i < n; ++i) moved = std::max(moved, double{std::abs(params[i] - initial[i])});
  EXPECT_GT(moved, 0.05) << c.name;
}

// Two threads applying disjoint halves (one logical step) give exactly the
// result of one whole apply; so does an out-of-place apply.
TEST_P(OptimizerCaseTest, ConcurrentRangesEqualWholeApply) {
  const Case& c = GetParam();
  const Shape shape{123, 45};
  const int64_t n = shape.num_elements();
  const int64_t half = 2777;  // Not chunk- or vector-aligned.
  std::mt19937_64 rng(7);
  std::vector<float> whole = RandomVector(rng, static_cast<size_t>(n), 1.0);
  std::vector<float> split = whole;
  std::vector<float> out_of_place_in = whole;
  std::vector<float> out_of_place_out(whole.size(), -1.0f);
  auto a = Optimizer::Create(c.spec, shape);
  auto b = Optimizer::Create(c.spec, shape);
  auto o = Optimizer::Create(c.spec, shape);
  ASSERT_TRUE(a.ok() && b.ok() && o.ok());
  for (int step = 0; step < 5; ++step) {
    std::vector<float> grad = RandomVector(rng, static_cast<size_t>(n), 1.0);
    (*a)->BeginStep();
    (*a)->ApplyDense(whole.data(), grad.data(), 0, n, c.grad_scale, c.lr_scale);
    (*b)->BeginStep();
    std::thread t1(
        [&] { (*b)->ApplyDense(split.data(), grad.data(), 0, half, c.grad_scale, c.lr_scale); });
    std::thread t2([&] {
      (*b)->ApplyDense(split.data(), grad.data() + half, half, n, c.grad_scale, c.lr_scale);
    });
    t1.join();
    t2.join();
    (*o)->BeginStep();
    (*o)->ApplyDense(out_of_place_in.data(), out_of_place_out.data(), grad.data(), 0, n,
                     c.grad_scale, c.lr_scale);
    std::swap(out_of_place_in, out_of_place_out);
  }
  EXPECT_EQ(whole, split) << c.name;
  EXPECT_EQ(whole, out_of_place_in) << c.name;
  auto sa = (*a)->Slots();
  auto sb = (*b)->Slots();
  ASSERT_EQ(sa.size(), sb.size());
  for (size_t i = 0; i < sa.size(); ++i) {
    const float* x = sa[i].second->data_as<float>();
    const float* y = sb[i].second->data_as<float>();
    EXPECT_TRUE(std::equal(x, x + n, y)) << c.name << " slot " << sa[i].first;
  }
}

// Sparse updates with duplicate rows: gradients of a repeated row are summed
// and the row is updated once; rows not listed keep params and slots.
TEST_P(OptimizerCaseTest, SparseRowsWithDuplicatesMatchLazyReference) {
  const Case& c = GetParam();
  const int64_t rows = 20, cols = 7;
  const Shape shape{rows, cols};
  const size_t n = static_cast<size_t>(rows * cols);
  std::mt19937_64 rng(99);
  std::vector<float> params = RandomVector(rng, n, 1.0);
  Reference ref(c.spec, ToDouble(params));
  auto opt = Optimizer::Create(c.spec, shape);
  ASSERT_TRUE(opt.ok());
  std::uniform_int_distribution<int64_t> pick(0, rows - 2);  // Row 19 is never touched.
  for (int step = 0; step < 50; ++step) {
    std::vector<int64_t> idx;
    for (int k = 0; k < 5; ++k) idx.push_back(pick(rng));
    idx.push_back(idx[1]);  // Always at least one duplicate.
    idx.push_back(idx[1]);
    std::vector<float> grad_rows = RandomVector(rng, idx.size() * cols, 1.0);
    std::vector<double> dense(n, 0.0);
    std::vector<bool> mask(n, false);
    for (size_t k = 0; k < idx.size(); ++k)
      for (int64_t j = 0; j < cols; ++j) {
        dense[static_cast<size_t>(idx[k] * cols + j)] += grad_rows[k * cols + j];
        mask[static_cast<size_t>(idx[k] * cols + j)] = true;
      }
    (*opt)->BeginStep();
    (*opt)->ApplyRows(params.data(), idx, grad_rows.data(), c.grad_scale, c.lr_scale);
    ref.Step(dense, c.grad_scale, c.lr_scale, &mask);
  }
  EXPECT_LT(RelativeError(params, ref.params()), 1e-5) << c.name;
  // Row 19 never appeared: its params equal the initial ones, its slots their
  // initial value.
  std::mt19937_64 rng2(99);
  std::vector<float> initial = RandomVector(rng2, n, 1.0);
  for (int64_t j = 0; j < cols; ++j) {
    const size_t i = static_cast<size_t>(19 * cols + j);
    EXPECT_EQ(params[i], initial[i]);
    for (auto& [name, t] : (*opt)->Slots()) {
      const float expect = c.spec.kind == OptimizerKind::kAdagrad
                               ? static_cast<float>(c.spec.initial_accumulator)
                               : 0.0f;
      EXPECT_EQ(t->data_as<float>()[i], expect) << name;
    }
  }
}

INSTANTIATE_TEST_SUITE_P(AllKinds, OptimizerCaseTest, ::testing::ValuesIn(Cases()),
                         [](const auto& info) { return info.param.name; });

TEST(OptimizerTest, SlotsAreNamedShapedAndInitialized) {
  const Shape shape{4, 3};
  struct Expect {
    OptimizerKind kind;
    std::vector<std::string> names;
  };
  for (const Expect& e : std::vector<Expect>{{OptimizerKind::kSgd, {}},
                                             {OptimizerKind::kMomentum, {"velocity"}},
                                             {OptimizerKind::kAdagrad, {"accumulator"}},
                                             {OptimizerKind::kAdam, {"m", "v"}},
                                             {OptimizerKind::kAdamW, {"m", "v"}}}) {
    OptimizerSpec s = Spec(e.kind, 0.1);
    s.initial_accumulator = 0.25;
    auto opt = Optimizer::Create(s, shape);
    ASSERT_TRUE(opt.ok());
    auto slots = (*opt)->Slots();
    ASSERT_EQ(slots.size(), e.names.size());
    EXPECT_EQ((*opt)->SlotBytes(), e.names.size() * 12 * sizeof(float));
    for (size_t i = 0; i < slots.size(); ++i) {
      EXPECT_EQ(slots[i].first, e.names[i]);
      EXPECT_EQ(slots[i].second->shape(), shape);
      EXPECT_EQ(reinterpret_cast<uintptr_t>(slots[i].second->data()) % kTensorAlignment, 0u);
      const float fill = e.kind == OptimizerKind::kAdagrad ? 0.25f : 0.0f;
      for (int64_t k = 0; k < 12; ++k) EXPECT_EQ(slots[i].second->data_as<float>()[k], fill);
    }
  }
}

TEST(OptimizerTest, StepCounterRestoreSetsBiasCorrection) {
  // An adam restored at step 10 makes the same update as one that ran 10
  // steps with the same state.
  OptimizerSpec s = Spec(OptimizerKind::kAdam, 0.1);
  const Shape shape{8};
  auto a = Optimizer::Create(s, shape);
  auto b = Optimizer::Create(s, shape);
  ASSERT_TRUE(a.ok() && b.ok());
  std::vector<float> pa(8, 1.0f), grad(8, 0.5f);
  for (int i = 0; i < 10; ++i) {
    (*a)->BeginStep();
    (*a)->ApplyDense(pa.data(), grad.data(), 0, 8, 1.0f, 1.0f);
  }
  std::vector<float> pb = pa;
  auto sa = (*a)->Slots();
  auto sb = (*b)->Slots();
  for (size_t i = 0; i < sa.size(); ++i)
    std::copy_n(sa[i].second->data_as<float>(), 8, sb[i].second->data_as<float>());
  (*b)->set_step(10);
  EXPECT_EQ((*b)->step(), 10);
  (*a)->BeginStep();
  (*a)->ApplyDense(pa.data(), grad.data(), 0, 8, 1.0f, 1.0f);
  (*b)->BeginStep();
  (*b)->ApplyDense(pb.data(), grad.data(), 0, 8, 1.0f, 1.0f);
  EXPECT_EQ(pa, pb);
  EXPECT_EQ((*b)->step(), 11);
}

TEST(OptimizerTest, InvalidSpecsNameTheField) {
  struct Bad {
    OptimizerSpec spec;
    std::string field;
  };
  std::vector<Bad> bad;
  auto with = [](OptimizerKind kind, auto mutate) {
    OptimizerSpec s = Spec(kind, 0.1);
    mutate(s);
    return s;
  };
  bad.push_back(
      {with(OptimizerKind::kSgd, [](auto& s) { s.learning_rate = -0.1; }), "learning_rate"});
  bad.push_back(
      {with(OptimizerKind::kAdam, [](auto& s) { s.learning_rate = NAN; }), "learning_rate"});
  bad.push_back({with(OptimizerKind::kMomentum, [](auto& s) { s.momentum = 1.0; }), "momentum"});
  bad.push_back({with(OptimizerKind::kMomentum, [](auto& s) { s.momentum = -0.5; }), "momentum"});
  bad.push_back({with(OptimizerKind::kAdam, [](auto& s) { s.beta1 = 1.0; }), "beta1"});
  bad.push_back({with(OptimizerKind::kAdamW, [](auto& s) { s.beta2 = -0.1; }), "beta2"});
  bad.push_back({with(OptimizerKind::kAdam, [](auto& s) { s.epsilon = 0; }), "epsilon"});
  bad.push_back({with(OptimizerKind::kAdagrad, [](auto& s) { s.epsilon = -1e-7; }), "epsilon"});
  bad.push_back({with(OptimizerKind::kAdagrad, [](auto& s) { s.initial_accumulator = -1; }),
                 "initial_accumulator"});
  bad.push_back(
      {with(OptimizerKind::kAdamW, [](auto& s) { s.weight_decay = -0.01; }), "weight_decay"});
  bad.push_back(
      {with(OptimizerKind::kAdam, [](auto& s) { s.weight_decay = 0.01; }), "weight_decay"});
  bad.push_back(
      {with(OptimizerKind::kSgd, [](auto& s) { s.kind = static_cast<OptimizerKind>(9); }), "kind"});
  // Finite doubles that do not survive the conversion to float (the server
  // fuzzer found parameters turned -Inf by a learning rate of 1e39): above
  // FLT_MAX they become Inf, an epsilon below FLT_MIN is 0 under FTZ.
  bad.push_back(
      {with(OptimizerKind::kMomentum, [](auto& s) { s.learning_rate = 1e39; }), "learning_rate"});
  bad.push_back({with(OptimizerKind::kAdam, [](auto& s) { s.epsilon = 1e-300; }), "epsilon"});
  bad.push_back({with(OptimizerKind::kAdagrad, [](auto& s) { s.epsilon = 1e-40; }), "epsilon"});
  bad.push_back(
      {with(OptimizerKind::kAdamW, [](auto& s) { s.weight_decay = 1e300; }), "weight_decay"});
  bad.push_back({with(OptimizerKind::kAdagrad, [](auto& s) { s.initial_accumulator = 1e39; }),
                 "initial_accumulator"});
  for (const Bad& b : bad) {
    auto opt = Optimizer::Create(b.spec, Shape{2});
    ASSERT_FALSE(opt.ok()) << b.field;
    EXPECT_EQ(opt.status().code(), StatusCode::kInvalidArgument) << b.field;
    EXPECT_NE(opt.status().message().find(b.field), std::string::npos) << opt.status();
  }
  // Fields a kind does not use are not checked: sgd ignores beta1.
  OptimizerSpec s = Spec(OptimizerKind::kSgd, 0.1);
  s.beta1 = 5;
  EXPECT_TRUE(Optimizer::Create(s, Shape{2}).ok());
  EXPECT_TRUE(Optimizer::Create(Spec(OptimizerKind::kSgd, 0.0), Shape{2}).ok());
}

TEST(OptimizerTest, SetLearningRateRejectsNegative) {
  auto opt = Optimizer::Create(Spec(OptimizerKind::kSgd, 0.1), Shape{2});
  ASSERT_TRUE(opt.ok());
  Status s = (*opt)->SetLearningRate(-1);
  EXPECT_EQ(s.code(), StatusCode::kInvalidArgument);
  EXPECT_NE(s.message().find("learning_rate"), std::string::npos);
  EXPECT_EQ((*opt)->learning_rate(), 0.1);
  s = (*opt)->SetLearningRate(1e39);  // finite, but Inf as a float
  EXPECT_EQ(s.code(), StatusCode::kInvalidArgument);
  EXPECT_NE(s.message().find("fit a float"), std::string::npos) << s;
  EXPECT_EQ((*opt)->learning_rate(), 0.1);
  // The new rate is what the next apply uses.
  ASSERT_TRUE((*opt)->SetLearningRate(0.5).ok());
  std::vector<float> p{1, 2}, g{1, 1};
  (*opt)->BeginStep();
  (*opt)->ApplyDense(p.data(), g.data(), 0, 2, 1.0f, 1.0f);
  EXPECT_FLOAT_EQ(p[0], 0.5f);
  EXPECT_FLOAT_EQ(p[1], 1.5f);
}

TEST(OptimizerTest, MomentumKerasForm) {
  // Hand-computed: lr 0.1, momentum 0.5, g = 1 twice, p0 = 0.
  //   v1 = -0.1, p1 = -0.1; v2 = -0.15, p2 = -0.25.
  // Nesterov: p1 = 0.5 * -0.1 - 0.1 = -0.15; p2 = -0.15 + 0.5 * -0.15 - 0.1 = -0.325.
  for (bool nesterov : {false, true}) {
    OptimizerSpec s = Spec(OptimizerKind::kMomentum, 0.1);
    s.momentum = 0.5;
    s.nesterov = nesterov;
    auto opt = Optimizer::Create(s, Shape{1});
    ASSERT_TRUE(opt.ok());
    float p = 0, g = 1;
    for (int i = 0; i < 2; ++i) {
      (*opt)->BeginStep();
      (*opt)->ApplyDense(&p, &g, 0, 1, 1.0f, 1.0f);
    }
    EXPECT_NEAR(p, nesterov ? -0.325f : -0.25f, 1e-6);
  }
}

TEST(OptimizerTest, AdamFirstStepIsLearningRateTimesSign) {
  // After one bias-corrected step m/sqrt(v) = sign(g): p moves by ~lr.
  OptimizerSpec s = Spec(OptimizerKind::kAdam, 0.01);
  auto opt = Optimizer::Create(s, Shape{3});
  ASSERT_TRUE(opt.ok());
  std::vector<float> p{0, 0, 0}, g{3, -0.2f, 100};
  (*opt)->BeginStep();
  (*opt)->ApplyDense(p.data(), g.data(), 0, 3, 1.0f, 1.0f);
  EXPECT_NEAR(p[0], -0.01f, 1e-6);
  EXPECT_NEAR(p[1], 0.01f, 1e-6);
  EXPECT_NEAR(p[2], -0.01f, 1e-6);
}

}  // namespace
}  // namespace distval::ps
