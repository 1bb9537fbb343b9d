#include "distval/tensor.h"

#include <gtest/gtest.h>

#include <cstdint>

namespace distval {
namespace {

TEST(DTypeTest, SizesAndNames) {
  EXPECT_EQ(DTypeSize(DType::kF32), 4u);
  EXPECT_EQ(DTypeSize(DType::kF16), 2u);
  EXPECT_EQ(DTypeSize(DType::kBF16), 2u);
  EXPECT_EQ(DTypeSize(DType::kF64), 8u);
  EXPECT_EQ(DTypeSize(DType::kI32), 4u);
  EXPECT_EQ(DTypeSize(DType::kI64), 8u);
  for (int i = 0; i < kNumDTypes; ++i) {
    auto d = static_cast<DType>(i);
    auto parsed = ParseDType(DTypeName(d));
    ASSERT_TRUE(parsed.ok());
    EXPECT_EQ(*parsed, d);
  }
  auto bad = ParseDType("f8");
  ASSERT_FALSE(bad.ok());
  EXPECT_NE(bad.status().message().find("f8"), std::string::npos);
  EXPECT_FALSE(DTypeFromInt(6).ok());
}

TEST(ShapeTest, Basics) {
  Shape s{13, 4, 2};
  EXPECT_EQ(s.rank(), 3u);
  EXPECT_EQ(s.num_elements(), 104);
  EXPECT_EQ(s.rows(), 13);
  EXPECT_EQ(s.row_elements(), 8);
  EXPECT_EQ(s.ToString(), "[13,4,2]");
  EXPECT_EQ(Shape{}.num_elements(), 1);
  EXPECT_FALSE(Shape::Make({3, -1}).ok());
  EXPECT_FALSE(Shape::Make({INT64_MAX, 4}).ok());
}

TEST(TensorTest, AlignedZeroedAndMapped) {
  Tensor t(DType::kF32, Shape{3, 5});
  EXPECT_EQ(reinterpret_cast<uintptr_t>(t.data()) % kTensorAlignment, 0u);
  EXPECT_EQ(t.num_bytes(), 60u);
  auto m = AsEigenMatrix(t);
  EXPECT_EQ(m.rows(), 3);
  EXPECT_EQ(m.cols(), 5);
  EXPECT_EQ(m.sum(), 0.0f);
  m(1, 2) = 4.5f;
  EXPECT_EQ(t.data_as<float>()[1 * 5 + 2], 4.5f);
  Tensor c = t.Clone();
  EXPECT_EQ(c.data_as<float>()[7], 4.5f);
  EXPECT_NE(c.data(), t.data());
  auto v = AsEigenVector(c);
  EXPECT_EQ(v.size(), 15);
  EXPECT_FLOAT_EQ(v.sum(), 4.5f);
}

}  // namespace
}  // namespace distval
