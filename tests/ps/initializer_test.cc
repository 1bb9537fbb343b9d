#include "initializer.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <string>
#include <vector>

namespace distval::ps {
namespace {

using protocol::Initializer;
using protocol::RowRange;

Initializer Make(decltype(Initializer::kind) kind, uint64_t seed = 1234) {
  Initializer init;
  init.seed = seed;
  init.kind = kind;
  return init;
}

std::vector<float> Fill(const Initializer& init, const Shape& shape, RowRange rows) {
  std::vector<float> out(static_cast<size_t>(rows.size() * shape.row_elements()), -999.0f);
  Status s = InitializeRows(init, shape, rows, out);
  EXPECT_TRUE(s.ok()) << s;
  return out;
}

// Concatenation of the shards' values for the given row boundaries.
std::vector<float> FillSharded(const Initializer& init, const Shape& shape,
                               const std::vector<int64_t>& bounds) {
  std::vector<float> all;
  for (size_t i = 0; i + 1 < bounds.size(); ++i) {
    std::vector<float> part = Fill(init, shape, RowRange{bounds[i], bounds[i + 1]});
    all.insert(all.end(), part.begin(), part.end());
  }
  return all;
}

struct Moments {
  double mean = 0, stddev = 0, min = 0, max = 0;
};
Moments Measure(const std::vector<float>& v) {
  Moments m;
  double sum = 0, sq = 0;
  m.min = m.max = v[0];
  for (float x : v) {
    sum += x;
    m.min = std::min(m.min, double{x});
    m.max = std::max(m.max, double{x});
  }
  m.mean = sum / static_cast<double>(v.size());
  for (float x : v) sq += (x - m.mean) * (x - m.mean);
  m.stddev = std::sqrt(sq / static_cast<double>(v.size()));
  return m;
}

TEST(InitializerTest, ShardedEqualsUnpartitionedForEveryKind) {
  const Shape shape{10, 7};
  const std::vector<Initializer> inits = {
      Make(protocol::InitZeros{}),
      Make(protocol::InitConstant{0.75}),
      Make(protocol::InitUniform{-1.0, 2.0}),
      Make(protocol::InitNormal{0.5, 3.0}),
      Make(protocol::InitGlorotUniform{}),
  };
  for (const Initializer& init : inits) {
    const std::vector<float> one = FillSharded(init, shape, {0, 10});
    const std::vector<float> two = FillSharded(init, shape, {0, 5, 10});
    const std::vector<float> three = FillSharded(init, shape, {0, 4, 7, 10});
    const std::vector<float> uneven = FillSharded(init, shape, {0, 1, 2, 9, 10});
    ASSERT_EQ(one.size(), 70u);
    EXPECT_EQ(one, two) << "kind " << init.kind.index();
    EXPECT_EQ(one, three) << "kind " << init.kind.index();
    EXPECT_EQ(one, uneven) << "kind " << init.kind.index();
  }
}

TEST(InitializerTest, RandomKindsDependOnSeedAndIndex) {
  const Shape shape{1000};
  const auto a = Fill(Make(protocol::InitUniform{0, 1}, 1), shape, {0, 1000});
  const auto a2 = Fill(Make(protocol::InitUniform{0, 1}, 1), shape, {0, 1000});
  const auto b = Fill(Make(protocol::InitUniform{0, 1}, 2), shape, {0, 1000});
  EXPECT_EQ(a, a2);
  int same = 0;
  for (size_t i = 0; i < a.size(); ++i) same += a[i] == b[i];
  EXPECT_LT(same, 5);
  // Values vary along the index (not a constant).
  EXPECT_GT(Measure(a).stddev, 0.2);
  // Neighbouring indices are not correlated.
  double corr = 0;
  for (size_t i = 0; i + 1 < a.size(); ++i) corr += (a[i] - 0.5) * (a[i + 1] - 0.5);
  corr /= (a.size() - 1) * (1.0 / 12.0);
  EXPECT_LT(std::abs(corr), 0.1);
}

TEST(InitializerTest, UniformDistribution) {
  const Shape shape{100000};
  const auto v = Fill(Make(protocol::InitUniform{-2.0, 3.0}, 7), shape, {0, 100000});
  const Moments m = Measure(v);
  EXPECT_NEAR(m.mean, 0.5, 0.03);
  EXPECT_NEAR(m.stddev, 5.0 / std::sqrt(12.0), 0.02);
  EXPECT_GE(m.min, -2.0);
  EXPECT_LE(m.max, 3.0);
  EXPECT_LT(m.min, -1.99);
  EXPECT_GT(m.max, 2.99);
  // Each fifth of the interval gets about a fifth of the samples.
  std::vector<int> bins(5, 0);
  for (float x : v) ++bins[std::min(4, static_cast<int>((x + 2.0) / 1.0))];
  for (int b : bins) EXPECT_NEAR(b, 20000, 600);
}

TEST(InitializerTest, NormalDistribution) {
  const Shape shape{400, 250};  // 100k
  const auto v = Fill(Make(protocol::InitNormal{1.0, 2.0}, 99), shape, {0, 400});
  const Moments m = Measure(v);
  EXPECT_NEAR(m.mean, 1.0, 0.03);
  EXPECT_NEAR(m.stddev, 2.0, 0.03);
  // Shape of the bell: ~68.3% within one sigma, ~95.4% within two.
  int one = 0, two = 0;
  for (float x : v) {
    one += std::abs(x - 1.0) < 2.0;
    two += std::abs(x - 1.0) < 4.0;
  }
  EXPECT_NEAR(one / 1e5, 0.6827, 0.01);
  EXPECT_NEAR(two / 1e5, 0.9545, 0.005);
}

TEST(InitializerTest, GlorotUniformLimitAndFans) {
  const Shape dense{300, 200};
  EXPECT_DOUBLE_EQ(GlorotUniformLimit(dense), std::sqrt(6.0 / 500.0));
  const Fans f1 = ComputeFans(Shape{64});
  EXPECT_EQ(f1.fan_in, 64);
  EXPECT_EQ(f1.fan_out, 64);
  const Fans conv = ComputeFans(Shape{3, 3, 16, 32});
  EXPECT_EQ(conv.fan_in, 9 * 16);
  EXPECT_EQ(conv.fan_out, 9 * 32);
  EXPECT_DOUBLE_EQ(GlorotUniformLimit(Shape{3, 3, 16, 32}), std::sqrt(6.0 / (144 + 288)));
  const Fans scalar = ComputeFans(Shape{});
  EXPECT_EQ(scalar.fan_in, 1);
  EXPECT_EQ(scalar.fan_out, 1);

  const double limit = std::sqrt(6.0 / 500.0);
  const auto v = Fill(Make(protocol::InitGlorotUniform{}, 5), dense, {0, 300});
  const Moments m = Measure(v);
  EXPECT_GE(m.min, -limit);
  EXPECT_LE(m.max, limit);
  EXPECT_GT(m.max, 0.99 * limit);
  EXPECT_LT(m.min, -0.99 * limit);
  EXPECT_NEAR(m.mean, 0.0, 0.01 * limit);
  EXPECT_NEAR(m.stddev, limit / std::sqrt(3.0), 0.01 * limit);
  // The limit comes from the whole variable's shape, not the shard's.
  const auto shard = Fill(Make(protocol::InitGlorotUniform{}, 5), dense, {100, 110});
  EXPECT_TRUE(std::equal(shard.begin(), shard.end(), v.begin() + 100 * 200));
}

TEST(InitializerTest, ConstantZerosAndValues) {
  const Shape shape{3, 2};
  EXPECT_EQ(Fill(Make(protocol::InitZeros{}), shape, {1, 3}), std::vector<float>(4, 0.0f));
  EXPECT_EQ(Fill(Make(protocol::InitConstant{-1.5}), shape, {0, 3}), std::vector<float>(6, -1.5f));
  protocol::InitValues values;
  values.values.shape = {2, 2};
  const std::vector<float> given{1, 2, 3, 4};
  std::vector<float> out(4);
  ASSERT_TRUE(InitializeRows(Make(values), shape, {1, 3}, out, given).ok());
  EXPECT_EQ(out, given);
  // Scalar: one row.
  std::vector<float> scalar(1);
  ASSERT_TRUE(InitializeRows(Make(protocol::InitConstant{2.0}), Shape{}, {0, 1}, scalar).ok());
  EXPECT_EQ(scalar[0], 2.0f);
}

TEST(InitializerTest, Errors) {
  const Shape shape{4, 3};
  std::vector<float> out(6);
  auto expect_invalid = [&](const Initializer& init, RowRange rows, std::span<float> o,
                            std::span<const float> vals, const std::string& needle) {
    Status s = InitializeRows(init, shape, rows, o, vals);
    EXPECT_EQ(s.code(), StatusCode::kInvalidArgument) << needle;
    EXPECT_NE(s.message().find(needle), std::string::npos) << s;
  };
  expect_invalid(Make(protocol::InitZeros{}), {3, 5}, out, {}, "rows [3, 5)");
  expect_invalid(Make(protocol::InitZeros{}), {2, 1}, out, {}, "rows [2, 1)");
  expect_invalid(Make(protocol::InitZeros{}), {0, 1}, out, {}, "output has 6 elements");
  expect_invalid(Make(protocol::InitUniform{1.0, -1.0}), {0, 2}, out, {}, "low");
  expect_invalid(Make(protocol::InitNormal{0.0, -1.0}), {0, 2}, out, {}, "stddev");
  expect_invalid(Make(protocol::InitConstant{INFINITY}), {0, 2}, out, {}, "value");
  // Finite doubles that are Inf as floats.
  expect_invalid(Make(protocol::InitConstant{1e39}), {0, 2}, out, {}, "fit a float");
  expect_invalid(Make(protocol::InitUniform{-1e39, 0.0}), {0, 2}, out, {}, "fit a float");
  expect_invalid(Make(protocol::InitNormal{0.0, 1e300}), {0, 2}, out, {}, "stddev");
  // Mean and stddev fit, but the tail would not: it could draw Inf.
  expect_invalid(Make(protocol::InitNormal{3e38, 1e37}), {0, 2}, out, {}, "|mean| + 8.5717");
  expect_invalid(Make(protocol::InitNormal{0.0, 1e38}), {0, 2}, out, {}, "must fit a float");
  EXPECT_TRUE(InitializeRows(Make(protocol::InitNormal{-1e38, 2.5e37}), shape, {0, 2}, out, {}).ok());
  for (float x : out) EXPECT_TRUE(std::isfinite(x)) << x;
  protocol::InitValues values;
  values.values.shape = {2, 3};
  std::vector<float> given(5);
  expect_invalid(Make(values), {0, 2}, out, given, "got 5 values");
  values.values.shape = {3, 3};
  expect_invalid(Make(values), {0, 2}, out, {}, "shape [3,3]");
  values.values.shape = {2, 3};
  values.values.dtype = DType::kF16;
  expect_invalid(Make(values), {0, 2}, out, {}, "f16");
}

}  // namespace
}  // namespace distval::ps
