#include "distval/status.h"

#include <gtest/gtest.h>

#include <memory>
#include <string>

namespace distval {
namespace {

TEST(StatusTest, OkByDefault) {
  Status s;
  EXPECT_TRUE(s.ok());
  EXPECT_EQ(s.code(), StatusCode::kOk);
  EXPECT_EQ(s.ToString(), "OK");
}

TEST(StatusTest, ErrorCarriesCodeAndMessage) {
  Status s = NotFoundError("variable 'w' not found");
  EXPECT_FALSE(s.ok());
  EXPECT_EQ(s.code(), StatusCode::kNotFound);
  EXPECT_EQ(s.ToString(), "NotFound: variable 'w' not found");
  EXPECT_EQ(s.WithContext("shard 1").message(), "shard 1: variable 'w' not found");
}

TEST(StatusTest, EveryCanonicalCodeHasAName) {
  EXPECT_EQ(StatusCodeName(InvalidArgumentError("x").code()), "InvalidArgument");
  EXPECT_EQ(StatusCodeName(AlreadyExistsError("x").code()), "AlreadyExists");
  EXPECT_EQ(StatusCodeName(FailedPreconditionError("x").code()), "FailedPrecondition");
  EXPECT_EQ(StatusCodeName(UnavailableError("x").code()), "Unavailable");
  EXPECT_EQ(StatusCodeName(DeadlineExceededError("x").code()), "DeadlineExceeded");
  EXPECT_EQ(StatusCodeName(ResourceExhaustedError("x").code()), "ResourceExhausted");
  EXPECT_EQ(StatusCodeName(InternalError("x").code()), "Internal");
  EXPECT_EQ(StatusCodeName(UnimplementedError("x").code()), "Unimplemented");
  EXPECT_EQ(StatusCodeFromInt(999), StatusCode::kUnknown);
  EXPECT_EQ(StatusCodeFromInt(5), StatusCode::kNotFound);
}

StatusOr<int> Half(int x) {
  if (x % 2) return InvalidArgumentError("odd: " + std::to_string(x));
  return x / 2;
}

Status Quarter(int x, int* out) {
  DV_ASSIGN_OR_RETURN(int h, Half(x));
  DV_ASSIGN_OR_RETURN(*out, Half(h));
  return OkStatus();
}

Status Check(int x) {
  DV_RETURN_IF_ERROR(Half(x));
  DV_RETURN_IF_ERROR(OkStatus());
  return OkStatus();
}

TEST(StatusOrTest, ValueAndError) {
  StatusOr<int> v = Half(8);
  ASSERT_TRUE(v.ok());
  EXPECT_EQ(*v, 4);
  StatusOr<int> e = Half(3);
  ASSERT_FALSE(e.ok());
  EXPECT_EQ(e.status().code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(e.value_or(-1), -1);
}

TEST(StatusOrTest, OkStatusIsNotAValue) {
  StatusOr<int> v(OkStatus());
  EXPECT_FALSE(v.ok());
  EXPECT_EQ(v.status().code(), StatusCode::kInternal);
}

TEST(StatusOrTest, MoveOnlyValues) {
  StatusOr<std::unique_ptr<int>> p = std::make_unique<int>(7);
  ASSERT_TRUE(p.ok());
  std::unique_ptr<int> q = std::move(p).value();
  EXPECT_EQ(*q, 7);
}

TEST(StatusMacrosTest, PropagateErrors) {
  int out = 0;
  EXPECT_TRUE(Quarter(8, &out).ok());
  EXPECT_EQ(out, 2);
  Status s = Quarter(6, &out);
  EXPECT_EQ(s.code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(s.message(), "odd: 3");
  EXPECT_TRUE(Check(2).ok());
  EXPECT_FALSE(Check(1).ok());
}

}  // namespace
}  // namespace distval
