#include "variable_store.h"

#include <gtest/gtest.h>

#include <atomic>
#include <cstring>
#include <limits>
#include <string>
#include <thread>
#include <vector>

#include "initializer.h"

namespace distval::ps {
namespace {

using protocol::OptimizerKind;
using protocol::RowRange;
using protocol::VariableSpec;

VariableSpec SgdSpec(std::string name, std::vector<int64_t> shape, double lr = 0.5) {
  VariableSpec s;
  s.name = std::move(name);
  s.shape = std::move(shape);
  s.optimizer.kind = OptimizerKind::kSgd;
  s.optimizer.learning_rate = lr;
  s.initializer.kind = protocol::InitConstant{1.0};
  return s;
}

std::vector<float> ReadAll(const Variable& v) {
  std::vector<float> out(static_cast<size_t>(v.num_elements()));
  EXPECT_TRUE(VariableStore::ReadDense(v, v.rows(), out.data()).ok());
  return out;
}

void ExpectError(const Status& s, StatusCode code, const std::vector<std::string>& needles) {
  EXPECT_EQ(s.code(), code) << s;
  for (const std::string& n : needles)
    EXPECT_NE(s.message().find(n), std::string::npos) << "'" << n << "' not in: " << s;
}

TEST(VariableStoreTest, CreateIsIdempotentAndFindable) {
  VariableStore store;
  VariableSpec spec = SgdSpec("w", {10, 4});
  auto a = store.Create(spec, {2, 6}, nullptr);
  ASSERT_TRUE(a.ok()) << a.status();
  auto b = store.Create(spec, {2, 6}, nullptr);
  ASSERT_TRUE(b.ok()) << b.status();
  EXPECT_EQ(*a, *b);
  EXPECT_EQ(store.size(), 1u);
  Variable* v = *a;
  EXPECT_EQ(v->shape(), Shape({10, 4}));
  EXPECT_EQ(v->shard_shape(), Shape({4, 4}));
  EXPECT_EQ(v->rows(), (RowRange{2, 6}));
  EXPECT_EQ(v->version(), 0u);
  EXPECT_EQ(ReadAll(*v), std::vector<float>(16, 1.0f));
  auto f = store.Find("w");
  ASSERT_TRUE(f.ok());
  EXPECT_EQ(*f, v);
  auto snap = VariableStore::Snapshot(*v);
  EXPECT_EQ(reinterpret_cast<uintptr_t>(snap.params->data()) % kTensorAlignment, 0u);
}

TEST(VariableStoreTest, SecondCreateDoesNotReinitialize) {
  VariableStore store;
  auto v = store.Create(SgdSpec("w", {3}), {0, 3}, nullptr);
  ASSERT_TRUE(v.ok());
  std::vector<float> g{1, 1, 1};
  ASSERT_TRUE(VariableStore::ApplyDense(**v, {0, 3}, g.data(), 1.0f, 1.0f).ok());
  auto again = store.Create(SgdSpec("w", {3}), {0, 3}, nullptr);
  ASSERT_TRUE(again.ok());
  EXPECT_EQ(ReadAll(**again), std::vector<float>(3, 0.5f));
  EXPECT_EQ((*again)->version(), 1u);
}

TEST(VariableStoreTest, AlreadyExistsNamesBothShapesAndTheField) {
  VariableStore store;
  ASSERT_TRUE(store.Create(SgdSpec("w", {10, 4}), {0, 10}, nullptr).ok());
  auto s = store.Create(SgdSpec("w", {10, 5}), {0, 10}, nullptr);
  ASSERT_FALSE(s.ok());
  ExpectError(s.status(), StatusCode::kAlreadyExists, {"'w'", "[10,4]", "[10,5]", "shape differs"});

  s = store.Create(SgdSpec("w", {10, 4}, 0.1), {0, 10}, nullptr);
  ExpectError(s.status(), StatusCode::kAlreadyExists,
              {"[10,4]", "optimizer.learning_rate differs"});

  VariableSpec other_init = SgdSpec("w", {10, 4});
  other_init.initializer.seed = 77;
  s = store.Create(other_init, {0, 10}, nullptr);
  ExpectError(s.status(), StatusCode::kAlreadyExists, {"initializer.seed differs"});

  s = store.Create(SgdSpec("w", {10, 4}), {0, 5}, nullptr);
  ExpectError(s.status(), StatusCode::kAlreadyExists,
              {"rows [0, 10)", "rows [0, 5)", "shard rows"});

  VariableSpec agg = SgdSpec("w", {10, 4});
  agg.aggregation = protocol::Aggregation::kSum;
  s = store.Create(agg, {0, 10}, nullptr);
  ExpectError(s.status(), StatusCode::kAlreadyExists, {"aggregation differs"});
  EXPECT_EQ(store.size(), 1u);
}

TEST(VariableStoreTest, FindUnknownIsNotFound) {
  VariableStore store;
  auto f = store.Find("nope");
  ASSERT_FALSE(f.ok());
  ExpectError(f.status(), StatusCode::kNotFound, {"'nope'"});
}

TEST(VariableStoreTest, CreateValidation) {
  VariableStore store;
  ExpectError(store.Create(SgdSpec("", {3}), {0, 3}, nullptr).status(),
              StatusCode::kInvalidArgument, {"name is empty"});
  VariableSpec f16 = SgdSpec("h", {3});
  f16.dtype = DType::kF16;
  ExpectError(store.Create(f16, {0, 3}, nullptr).status(), StatusCode::kUnimplemented,
              {"'h'", "f16", "only f32 variables are trainable"});
  ExpectError(store.Create(SgdSpec("neg", {3, -1}), {0, 3}, nullptr).status(),
              StatusCode::kInvalidArgument, {"'neg'", "negative"});
  ExpectError(store.Create(SgdSpec("r", {3, 2}), {1, 4}, nullptr).status(),
              StatusCode::kInvalidArgument, {"'r'", "[1, 4)", "[3,2]"});
  ExpectError(store.Create(SgdSpec("r", {3, 2}), {-1, 2}, nullptr).status(),
              StatusCode::kInvalidArgument, {"[-1, 2)"});
  ExpectError(store.Create(SgdSpec("r", {3, 2}), {2, 1}, nullptr).status(),
              StatusCode::kInvalidArgument, {"[2, 1)"});
  ExpectError(store.Create(SgdSpec("s", {}), {0, 2}, nullptr).status(),
              StatusCode::kInvalidArgument, {"scalar", "[0, 2)"});
  ExpectError(store.Create(SgdSpec("lr", {3}, -1.0), {0, 3}, nullptr).status(),
              StatusCode::kInvalidArgument, {"'lr'", "learning_rate"});
  VariableSpec bad_init = SgdSpec("i", {3});
  bad_init.initializer.kind = protocol::InitNormal{0.0, -2.0};
  ExpectError(store.Create(bad_init, {0, 3}, nullptr).status(), StatusCode::kInvalidArgument,
              {"'i'", "stddev"});
  VariableSpec values = SgdSpec("vals", {3, 2});
  protocol::InitValues iv;
  iv.values.shape = {3, 2};
  values.initializer.kind = iv;
  ExpectError(store.Create(values, {0, 3}, nullptr).status(), StatusCode::kInvalidArgument,
              {"'vals'", "initial values"});
  iv.values.shape = {2, 2};  // Not the shard's shape.
  values.initializer.kind = iv;
  std::vector<float> init(6, 0.0f);
  ExpectError(store.Create(values, {0, 3}, init.data()).status(), StatusCode::kInvalidArgument,
              {"'vals'", "[2,2]", "[3,2]"});
  VariableSpec stale = SgdSpec("st", {3});
  stale.staleness = -3;
  ExpectError(store.Create(stale, {0, 3}, nullptr).status(), StatusCode::kInvalidArgument,
              {"'st'", "staleness"});
  EXPECT_EQ(store.size(), 0u);
  EXPECT_EQ(store.TotalBytes(), 0u);
}

TEST(VariableStoreTest, ValuesInitializerAndScalar) {
  VariableStore store;
  VariableSpec spec = SgdSpec("emb", {5, 2});
  protocol::InitValues iv;
  iv.values.frame = 3;
  iv.values.shape = {2, 2};
  spec.initializer.kind = iv;
  std::vector<float> init{1, 2, 3, 4};
  auto v = store.Create(spec, {3, 5}, init.data());
  ASSERT_TRUE(v.ok()) << v.status();
  EXPECT_EQ(ReadAll(**v), init);
  // Another request of the same spec with a different frame index is the same.
  std::get<protocol::InitValues>(spec.initializer.kind).values.frame = 1;
  auto again = store.Create(spec, {3, 5}, init.data());
  ASSERT_TRUE(again.ok()) << again.status();
  EXPECT_EQ(*again, *v);

  auto s = store.Create(SgdSpec("scalar", {}), {0, 1}, nullptr);
  ASSERT_TRUE(s.ok()) << s.status();
  EXPECT_EQ((*s)->num_elements(), 1);
  float g = 2.0f;
  ASSERT_TRUE(VariableStore::ValidateDensePayload(**s, {0, 1}, DType::kF32, {}).ok());
  ASSERT_TRUE(VariableStore::ApplyDense(**s, {0, 1}, &g, 1.0f, 1.0f).ok());
  EXPECT_EQ(ReadAll(**s), std::vector<float>{0.0f});  // 1 - 0.5 * 2
  // A scalar's only rows are [0, 1), and it has none to address sparsely
  // (the server fuzzer found both answered with a frame no client decodes).
  ExpectError(VariableStore::ValidateDenseRange(**s, {1, 1}), StatusCode::kInvalidArgument,
              {"'scalar'", "is a scalar", "[1, 1)"});
  ExpectError(VariableStore::ValidateDenseRange(**s, {0, 0}), StatusCode::kInvalidArgument,
              {"[0, 0)"});
  const std::vector<int64_t> two{2};
  ExpectError(VariableStore::ValidateSparseIndices(**s, DType::kI64, two),
              StatusCode::kInvalidArgument, {"'scalar'", "is a scalar"});
  EXPECT_TRUE(VariableStore::ValidateSparseIndices(**v, DType::kI64, two).ok());
}

TEST(VariableStoreTest, DenseApplyOnSubrangeBumpsVersion) {
  VariableStore store;
  auto v = store.Create(SgdSpec("w", {10, 2}), {4, 8}, nullptr);
  ASSERT_TRUE(v.ok());
  std::vector<float> g{1, 2, 3, 4};  // Rows 5 and 6.
  ASSERT_TRUE(VariableStore::ApplyDense(**v, {5, 7}, g.data(), 0.5f, 2.0f).ok());
  EXPECT_EQ((*v)->version(), 1u);
  // lr 0.5 * lr_scale 2 * grad_scale 0.5 = 0.5 per unit of gradient.
  EXPECT_EQ(ReadAll(**v), (std::vector<float>{1, 1, 0.5f, 0, -0.5f, -1, 1, 1}));
  std::vector<float> row(2);
  uint64_t version = 0;
  ASSERT_TRUE(VariableStore::ReadDense(**v, {6, 7}, row.data(), &version).ok());
  EXPECT_EQ(row, (std::vector<float>{-0.5f, -1}));
  EXPECT_EQ(version, 1u);
  ASSERT_TRUE(VariableStore::ApplyDense(**v, {4, 8}, std::vector<float>(8, 0).data(), 1, 1).ok());
  EXPECT_EQ((*v)->version(), 2u);
}

TEST(VariableStoreTest, DenseValidationErrors) {
  VariableStore store;
  auto v = store.Create(SgdSpec("w", {10, 3}), {4, 8}, nullptr);
  ASSERT_TRUE(v.ok());
  const Variable& w = **v;
  const std::vector<int64_t> good{2, 3};
  EXPECT_TRUE(VariableStore::ValidateDensePayload(w, {5, 7}, DType::kF32, good).ok());
  ExpectError(VariableStore::ValidateDenseRange(w, {3, 6}), StatusCode::kOutOfRange,
              {"'w'", "[3, 6)", "[4, 8)"});
  ExpectError(VariableStore::ValidateDenseRange(w, {7, 9}), StatusCode::kOutOfRange,
              {"[7, 9)", "[4, 8)"});
  ExpectError(VariableStore::ValidateDenseRange(w, {6, 5}), StatusCode::kInvalidArgument,
              {"[6, 5)"});
  ExpectError(VariableStore::ValidateDensePayload(w, {5, 7}, DType::kF16, good),
              StatusCode::kInvalidArgument, {"'w'", "f16", "f32"});
  const std::vector<int64_t> bad_rows{3, 3};
  ExpectError(VariableStore::ValidateDensePayload(w, {5, 7}, DType::kF32, bad_rows),
              StatusCode::kInvalidArgument, {"'w'", "[3,3]", "[2,3]", "[5, 7)"});
  const std::vector<int64_t> flat{6};
  ExpectError(VariableStore::ValidateDensePayload(w, {5, 7}, DType::kF32, flat),
              StatusCode::kInvalidArgument, {"[6]", "[2,3]"});
  ExpectError(VariableStore::ValidateDensePayload(w, {0, 2}, DType::kF32, good),
              StatusCode::kOutOfRange, {"[0, 2)"});
  // ApplyDense and ReadDense reject the same ranges, touching nothing.
  std::vector<float> g(12, 1.0f), out(12, -7.0f);
  ExpectError(VariableStore::ApplyDense(**v, {3, 7}, g.data(), 1, 1), StatusCode::kOutOfRange,
              {"[3, 7)"});
  ExpectError(VariableStore::ReadDense(w, {3, 7}, out.data()), StatusCode::kOutOfRange, {"[3, 7)"});
  EXPECT_EQ(out, std::vector<float>(12, -7.0f));
  EXPECT_EQ(w.version(), 0u);
  EXPECT_EQ(ReadAll(w), std::vector<float>(12, 1.0f));
}

TEST(VariableStoreTest, SparseApplyAndRejectedApplyLeavesStateUnchanged) {
  VariableStore store;
  VariableSpec spec = SgdSpec("emb", {100, 2});
  spec.optimizer.kind = OptimizerKind::kAdam;
  spec.optimizer.learning_rate = 0.1;
  auto v = store.Create(spec, {10, 20}, nullptr);
  ASSERT_TRUE(v.ok());
  Variable& emb = **v;

  const std::vector<int64_t> idx_shape{3};
  EXPECT_TRUE(VariableStore::ValidateSparseIndices(emb, DType::kI64, idx_shape).ok());
  ExpectError(VariableStore::ValidateSparseIndices(emb, DType::kI32, idx_shape),
              StatusCode::kInvalidArgument, {"'emb'", "i32", "i64"});
  const std::vector<int64_t> idx_2d{3, 1};
  ExpectError(VariableStore::ValidateSparseIndices(emb, DType::kI64, idx_2d),
              StatusCode::kInvalidArgument, {"[3,1]", "rank 1"});
  const std::vector<int64_t> payload{3, 2};
  EXPECT_TRUE(VariableStore::ValidateSparsePayload(emb, 3, DType::kF32, payload).ok());
  ExpectError(VariableStore::ValidateSparsePayload(emb, 4, DType::kF32, payload),
              StatusCode::kInvalidArgument, {"'emb'", "[3,2]", "[4,2]"});
  ExpectError(VariableStore::ValidateSparsePayload(emb, 3, DType::kBF16, payload),
              StatusCode::kInvalidArgument, {"bf16"});

  // A good sparse apply: rows 12 and 15 (12 twice: summed).
  const std::vector<int64_t> rows{12, 15, 12};
  const std::vector<float> g{1, 1, -1, -1, 1, 1};
  ASSERT_TRUE(VariableStore::ApplySparse(emb, rows, g.data(), 1, 1).ok());
  EXPECT_EQ(emb.version(), 1u);
  std::vector<float> got(6);
  uint64_t version = 0;
  ASSERT_TRUE(
      VariableStore::ReadRows(emb, std::vector<int64_t>{12, 15, 11}, got.data(), &version).ok());
  EXPECT_EQ(version, 1u);
  // Adam's first step moves by lr against the sign of the (summed) gradient.
  EXPECT_NEAR(got[0], 0.9f, 1e-6);
  EXPECT_NEAR(got[1], 0.9f, 1e-6);
  EXPECT_NEAR(got[2], 1.1f, 1e-6);
  EXPECT_NEAR(got[3], 1.1f, 1e-6);
  EXPECT_EQ(got[4], 1.0f);  // Row 11: untouched.
  EXPECT_EQ(got[5], 1.0f);

  // Record the whole state, then send bad requests.
  auto state = [&] {
    std::vector<float> all;
    int64_t step = -1;
    EXPECT_TRUE(VariableStore::VisitState(emb, [&](const Tensor& p, const Optimizer& o, uint64_t) {
                  const float* d = p.data_as<float>();
                  all.assign(d, d + p.num_elements());
                  for (auto& [name, t] : o.Slots()) {
                    const float* s = t->data_as<float>();
                    all.insert(all.end(), s, s + t->num_elements());
                  }
                  step = o.step();
                  return OkStatus();
                }).ok());
    all.push_back(static_cast<float>(step));
    return all;
  };
  const std::vector<float> before = state();
  // The bad index is last: nothing before it may have been applied.
  const std::vector<int64_t> bad{12, 13, 20};
  ExpectError(VariableStore::ApplySparse(emb, bad, g.data(), 1, 1), StatusCode::kOutOfRange,
              {"'emb'", "row index 20", "position 2", "[10, 20)"});
  const std::vector<int64_t> negative{-1};
  ExpectError(VariableStore::ApplySparse(emb, negative, g.data(), 1, 1), StatusCode::kOutOfRange,
              {"row index -1"});
  std::vector<float> out(6, -3.0f);
  ExpectError(VariableStore::ReadRows(emb, bad, out.data()), StatusCode::kOutOfRange,
              {"row index 20"});
  EXPECT_EQ(out, std::vector<float>(6, -3.0f));
  ExpectError(VariableStore::ApplyDense(emb, {9, 12}, g.data(), 1, 1), StatusCode::kOutOfRange,
              {"[9, 12)"});
  EXPECT_EQ(state(), before);
  EXPECT_EQ(emb.version(), 1u);
}

TEST(VariableStoreTest, SnapshotIsCopyOnWrite) {
  VariableStore store;
  auto v = store.Create(SgdSpec("w", {4}, 1.0), {0, 4}, nullptr);
  ASSERT_TRUE(v.ok());
  std::vector<float> g(4, 1.0f);
  ParamsSnapshot s1 = VariableStore::Snapshot(**v);
  EXPECT_EQ(s1.version, 0u);
  const void* lent = s1.params->data();
  ASSERT_TRUE(VariableStore::ApplyDense(**v, {0, 4}, g.data(), 1, 1).ok());
  // The lent buffer is unchanged; the store moved on to another buffer.
  EXPECT_EQ(std::vector<float>(s1.params->data_as<float>(), s1.params->data_as<float>() + 4),
            std::vector<float>(4, 1.0f));
  ParamsSnapshot s2 = VariableStore::Snapshot(**v);
  EXPECT_EQ(s2.version, 1u);
  EXPECT_NE(s2.params->data(), lent);
  EXPECT_EQ(s2.params->data_as<float>()[0], 0.0f);
  // Partial apply while s2 is lent: untouched rows are carried over.
  ASSERT_TRUE(VariableStore::ApplyDense(**v, {1, 2}, g.data(), 1, 1).ok());
  EXPECT_EQ(ReadAll(**v), (std::vector<float>{0, -1, 0, 0}));
  EXPECT_EQ(s2.params->data_as<float>()[1], 0.0f);
  // Sparse apply while lent.
  ParamsSnapshot s3 = VariableStore::Snapshot(**v);
  ASSERT_TRUE(VariableStore::ApplySparse(**v, std::vector<int64_t>{3}, g.data(), 1, 1).ok());
  EXPECT_EQ(ReadAll(**v), (std::vector<float>{0, -1, 0, -1}));
  EXPECT_EQ(s3.params->data_as<float>()[3], 0.0f);
  // With no borrower left the apply is in place.
  s1 = {};
  s2 = {};
  s3 = {};
  const void* current = VariableStore::Snapshot(**v).params->data();
  ASSERT_TRUE(VariableStore::ApplyDense(**v, {0, 4}, g.data(), 1, 1).ok());
  EXPECT_EQ(VariableStore::Snapshot(**v).params->data(), current);
  EXPECT_EQ(ReadAll(**v), (std::vector<float>{-1, -2, -1, -2}));
}

// Snapshots taken while another thread applies are always consistent: with
// sgd, lr 1 and a gradient of 1 everywhere, every element equals 1 - version.
TEST(VariableStoreTest, ConcurrentSnapshotsAreConsistent) {
  VariableStore store;
  auto v = store.Create(SgdSpec("w", {64, 64}, 1.0), {0, 64}, nullptr);
  ASSERT_TRUE(v.ok());
  const int64_t n = (*v)->num_elements();
  std::vector<float> g(static_cast<size_t>(n), 1.0f);
  std::atomic<bool> started{false}, done{false};
  std::atomic<int> bad{0}, checked{0}, held_across_apply{0};
  auto consistent = [&](const ParamsSnapshot& s) {
    const float expect = 1.0f - static_cast<float>(s.version);
    const float* d = s.params->data_as<float>();
    for (int64_t i = 0; i < n; ++i)
      if (d[i] != expect) return false;
    return true;
  };
  std::thread writer([&] {
    while (!started) std::this_thread::yield();
    for (int i = 0; i < 300; ++i)
      if (!VariableStore::ApplyDense(**v, {0, 64}, g.data(), 1, 1).ok()) ++bad;
    done = true;
  });
  std::thread reader([&] {
    do {
      ParamsSnapshot s = VariableStore::Snapshot(**v);
      started = true;
      if (!consistent(s)) ++bad;
      // Check again once the writer has moved on: a lent buffer stays put.
      while (!done && (*v)->version() == s.version) std::this_thread::yield();
      if ((*v)->version() != s.version) ++held_across_apply;
      if (!consistent(s)) ++bad;
      ++checked;
    } while (!done);
  });
  writer.join();
  reader.join();
  EXPECT_EQ(bad.load(), 0);
  EXPECT_GT(checked.load(), 0);
  EXPECT_GT(held_across_apply.load(), 0);
  EXPECT_EQ((*v)->version(), 300u);
  EXPECT_EQ(ReadAll(**v), std::vector<float>(static_cast<size_t>(n), -299.0f));
}

TEST(VariableStoreTest, RangeRunnerSplitsOneApply) {
  VariableStore store;
  VariableSpec spec = SgdSpec("a", {100, 30});
  spec.optimizer.kind = OptimizerKind::kAdam;
  spec.initializer.kind = protocol::InitUniform{-1, 1};
  auto a = store.Create(spec, {0, 100}, nullptr);
  spec.name = "b";
  auto b = store.Create(spec, {0, 100}, nullptr);
  ASSERT_TRUE(a.ok() && b.ok());
  std::vector<float> g(3000);
  for (size_t i = 0; i < g.size(); ++i) g[i] = std::sin(static_cast<float>(i));
  int calls = 0;
  VariableStore::RangeRunner two_threads = [&](int64_t n, const auto& body) {
    ++calls;
    std::thread t([&] { body(0, n / 3); });
    body(n / 3, n);
    t.join();
  };
  for (int step = 0; step < 3; ++step) {
    ASSERT_TRUE(VariableStore::ApplyDense(**a, {0, 100}, g.data(), 0.5f, 1.0f).ok());
    ASSERT_TRUE(VariableStore::ApplyDense(**b, {0, 100}, g.data(), 0.5f, 1.0f, two_threads).ok());
  }
  EXPECT_EQ(calls, 3);
  EXPECT_EQ(ReadAll(**a), ReadAll(**b));
  EXPECT_EQ((*b)->version(), 3u);
}

TEST(VariableStoreTest, SetLearningRate) {
  VariableStore store;
  auto a = store.Create(SgdSpec("a", {2}, 0.5), {0, 2}, nullptr);
  auto b = store.Create(SgdSpec("b", {2}, 0.5), {0, 2}, nullptr);
  ASSERT_TRUE(a.ok() && b.ok());
  ASSERT_TRUE(store.SetLearningRate("a", 0.25).ok());
  EXPECT_EQ((*a)->learning_rate(), 0.25);
  EXPECT_EQ((*b)->learning_rate(), 0.5);
  ExpectError(store.SetLearningRate("c", 0.1), StatusCode::kNotFound, {"'c'"});
  ExpectError(store.SetLearningRate("", -0.1), StatusCode::kInvalidArgument, {"learning_rate"});
  EXPECT_EQ((*a)->learning_rate(), 0.25);
  ASSERT_TRUE(store.SetLearningRate("", 0.125).ok());
  EXPECT_EQ((*a)->learning_rate(), 0.125);
  EXPECT_EQ((*b)->learning_rate(), 0.125);
  // The new rate is the one applied.
  std::vector<float> g{1, 1};
  ASSERT_TRUE(VariableStore::ApplyDense(**b, {0, 2}, g.data(), 1, 1).ok());
  EXPECT_EQ(ReadAll(**b), std::vector<float>(2, 0.875f));
  // The creation spec is what idempotent creation compares against.
  EXPECT_TRUE(store.Create(SgdSpec("b", {2}, 0.5), {0, 2}, nullptr).ok());
}

TEST(VariableStoreTest, CreationOrderAndBytes) {
  VariableStore store;
  VariableSpec adam = SgdSpec("z", {10, 4});
  adam.optimizer.kind = OptimizerKind::kAdam;
  ASSERT_TRUE(store.Create(adam, {0, 10}, nullptr).ok());              // 40 + 80 floats
  ASSERT_TRUE(store.Create(SgdSpec("a", {5}), {0, 5}, nullptr).ok());  // 5 floats
  auto all = store.All();
  ASSERT_EQ(all.size(), 2u);
  EXPECT_EQ(all[0]->name(), "z");
  EXPECT_EQ(all[1]->name(), "a");
  EXPECT_EQ(all[0]->bytes(), 120u * 4);
  EXPECT_EQ(store.TotalBytes(), 125u * 4);
}

TEST(VariableStoreTest, RestoreState) {
  VariableStore store;
  VariableSpec spec = SgdSpec("w", {3});
  spec.optimizer.kind = OptimizerKind::kMomentum;
  auto v = store.Create(spec, {0, 3}, nullptr);
  ASSERT_TRUE(v.ok());
  ParamsSnapshot lent = VariableStore::Snapshot(**v);
  ASSERT_TRUE(VariableStore::RestoreState(**v, 42, [](Tensor& p, Optimizer& o) {
                for (int i = 0; i < 3; ++i) p.data_as<float>()[i] = 7;
                o.Slots()[0].second->data_as<float>()[0] = 0.5f;
                o.set_step(9);
                return o.SetLearningRate(0.01);
              }).ok());
  EXPECT_EQ((*v)->version(), 42u);
  EXPECT_EQ((*v)->learning_rate(), 0.01);
  EXPECT_EQ(ReadAll(**v), std::vector<float>(3, 7.0f));
  EXPECT_EQ(lent.params->data_as<float>()[0], 1.0f);  // The borrower kept its copy.
  float velocity = 0;
  int64_t step = 0;
  ASSERT_TRUE(
      VariableStore::VisitState(**v, [&](const Tensor&, const Optimizer& o, uint64_t version) {
        velocity = o.Slots()[0].second->data_as<float>()[0];
        step = o.step();
        EXPECT_EQ(version, 42u);
        return OkStatus();
      }).ok());
  EXPECT_EQ(velocity, 0.5f);
  EXPECT_EQ(step, 9);
  // A failing restore keeps the version and returns the error.
  Status s = VariableStore::RestoreState(
      **v, 50, [](Tensor&, Optimizer&) { return DataLossError("truncated checkpoint"); });
  EXPECT_EQ(s.code(), StatusCode::kDataLoss);
  EXPECT_EQ((*v)->version(), 42u);
}

// Two threads creating the same variable concurrently get the same pointer.
TEST(VariableStoreTest, ConcurrentCreateOfTheSameVariable) {
  for (int round = 0; round < 20; ++round) {
    VariableStore store;
    VariableSpec spec = SgdSpec("w", {256, 64});
    spec.initializer.kind = protocol::InitNormal{0, 1};
    Variable* got[2] = {nullptr, nullptr};
    std::thread t([&] { got[0] = store.Create(spec, {0, 256}, nullptr).value_or(nullptr); });
    got[1] = store.Create(spec, {0, 256}, nullptr).value_or(nullptr);
    t.join();
    ASSERT_NE(got[0], nullptr);
    EXPECT_EQ(got[0], got[1]);
    EXPECT_EQ(store.size(), 1u);
    EXPECT_EQ(store.TotalBytes(), 256u * 64 * 4);
  }
}

// The checked streaming apply: all or nothing. A NaN in any piece, or a
// fetch that fails half way, leaves parameters, version and optimizer step
// as they were; a finite gradient gives what ApplyDense gives.
TEST(VariableStoreTest, CheckedStreamingApplyIsAllOrNothing) {
  VariableStore store;
  VariableSpec spec = SgdSpec("w", {10, 4});
  auto created = store.Create(spec, {0, 10}, nullptr);
  ASSERT_TRUE(created.ok()) << created.status();
  Variable& v = **created;
  ASSERT_TRUE(VariableStore::SupportsCheckedStreaming(v));
  std::vector<float> before(40), after(40), grad(40, 0.25f);
  ASSERT_TRUE(VariableStore::ReadDense(v, {0, 10}, before.data()).ok());
  auto fetch_from = [](const std::vector<float>& g, int64_t fail_at) {
    return [&g, fail_at](int64_t begin, int64_t n) -> StatusOr<const float*> {
      if (fail_at >= 0 && begin + n > fail_at) return UnavailableError("sender gone");
      return g.data() + begin;
    };
  };
  auto unchanged = [&](const char* what) {
    SCOPED_TRACE(what);
    EXPECT_EQ(v.version(), 0u);
    ASSERT_TRUE(VariableStore::ReadDense(v, {0, 10}, after.data()).ok());
    EXPECT_EQ(after, before);
  };
  size_t bad = 0;
  // NaN in the last piece (pieces of 8 elements).
  grad[39] = std::numeric_limits<float>::quiet_NaN();
  ASSERT_TRUE(
      VariableStore::ApplyDenseStreaming(v, {0, 10}, 8, fetch_from(grad, -1), 1.0f, 1.0f, {}, &bad)
          .ok());
  EXPECT_EQ(bad, 1u);
  unchanged("nan");
  grad[39] = 0.25f;
  // The sender goes away after two pieces.
  Status gone =
      VariableStore::ApplyDenseStreaming(v, {0, 10}, 8, fetch_from(grad, 20), 1.0f, 1.0f, {}, &bad);
  EXPECT_EQ(gone.code(), StatusCode::kUnavailable) << gone;
  unchanged("fetch failed");
  // A snapshot lent meanwhile keeps its values.
  ParamsSnapshot lent = VariableStore::Snapshot(v);
  ASSERT_TRUE(
      VariableStore::ApplyDenseStreaming(v, {2, 6}, 8, fetch_from(grad, -1), 1.0f, 1.0f, {}, &bad)
          .ok());
  EXPECT_EQ(bad, 0u);
  EXPECT_EQ(v.version(), 1u);
  ASSERT_TRUE(VariableStore::ReadDense(v, {0, 10}, after.data()).ok());
  for (int i = 0; i < 40; ++i) {
    const bool in_range = i >= 8 && i < 24;
    EXPECT_EQ(after[i], in_range ? before[i] - 0.5f * 0.25f : before[i]) << i;
    EXPECT_EQ(lent.params->data_as<float>()[i], before[i]) << i;
  }
}

}  // namespace
}  // namespace distval::ps
