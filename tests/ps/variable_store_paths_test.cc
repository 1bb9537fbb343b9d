// The VariableStore paths the performance work added: a dense apply of a
// gradient that arrives piece by piece (ApplyDenseStreaming, and the checked
// update fed over several calls, CheckedUpdate) and parameter buffers from a
// caller's allocator (shared memory on the server).
#include <gtest/gtest.h>

#include <algorithm>
#include <limits>
#include <memory>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "variable_store.h"

namespace distval::ps {
namespace {

using protocol::OptimizerKind;
using protocol::RowRange;
using protocol::VariableSpec;

VariableSpec AdamSpec(std::string name, int64_t n) {
  VariableSpec s;
  s.name = std::move(name);
  s.shape = {n};
  s.optimizer.kind = OptimizerKind::kAdam;
  s.optimizer.learning_rate = 0.01;
  s.initializer.kind = protocol::InitUniform{-1, 1};
  s.initializer.seed = 7;
  return s;
}

std::vector<float> ReadAll(const Variable& v) {
  std::vector<float> out(static_cast<size_t>(v.num_elements()));
  EXPECT_TRUE(VariableStore::ReadDense(v, v.rows(), out.data()).ok());
  return out;
}

std::vector<float> RandomGradient(int64_t n, uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> d(0, 1);
  std::vector<float> g(static_cast<size_t>(n));
  for (float& x : g) x = d(rng);
  return g;
}

TEST(ApplyDenseStreamingTest, PieceByPieceEqualsOneApplyBitForBit) {
  constexpr int64_t kN = 100003;  // not a multiple of any piece
  VariableStore store;
  auto a = store.Create(AdamSpec("a", kN), {0, kN}, nullptr);
  auto b = store.Create(AdamSpec("b", kN), {0, kN}, nullptr);
  ASSERT_TRUE(a.ok() && b.ok());
  ASSERT_EQ(ReadAll(**a), ReadAll(**b));
  for (int step = 0; step < 4; ++step) {
    const auto g = RandomGradient(kN, static_cast<uint32_t>(step));
    // Step 2 holds a snapshot: the apply goes out of place (copy-on-write).
    ParamsSnapshot held_a, held_b;
    if (step == 2) {
      held_a = VariableStore::Snapshot(**a);
      held_b = VariableStore::Snapshot(**b);
    }
    ASSERT_TRUE(VariableStore::ApplyDense(**a, {0, kN}, g.data(), 0.5f, 1.0f).ok());
    std::vector<int64_t> asked;
    Status s = VariableStore::ApplyDenseStreaming(
        **b, {0, kN}, 4096,
        [&](int64_t begin, int64_t n) -> StatusOr<const float*> {
          asked.push_back(begin);
          EXPECT_LE(n, 4096);
          return g.data() + begin;
        },
        0.5f, 1.0f);
    ASSERT_TRUE(s.ok()) << s;
    // In order, front to back, every piece once.
    ASSERT_EQ(asked.size(), static_cast<size_t>((kN + 4095) / 4096));
    for (size_t k = 0; k < asked.size(); ++k) EXPECT_EQ(asked[k], static_cast<int64_t>(k) * 4096);
    ASSERT_EQ(ReadAll(**a), ReadAll(**b)) << "step " << step;
    EXPECT_EQ((*a)->version(), (*b)->version());
  }
}

TEST(ApplyDenseStreamingTest, AFailedFetchKeepsWhatWasAppliedAndTheRestUnchanged) {
  constexpr int64_t kN = 10000;
  VariableStore store;
  auto v = store.Create(AdamSpec("v", kN), {0, kN}, nullptr);
  ASSERT_TRUE(v.ok());
  const auto before = ReadAll(**v);
  const auto g = RandomGradient(kN, 3);
  int calls = 0;
  Status s = VariableStore::ApplyDenseStreaming(
      **v, {0, kN}, 1000,
      [&](int64_t begin, int64_t) -> StatusOr<const float*> {
        if (++calls == 3) return UnavailableError("the sender is gone");
        return g.data() + begin;
      },
      1.0f, 1.0f);
  EXPECT_EQ(s.code(), StatusCode::kUnavailable);
  const auto after = ReadAll(**v);
  for (int64_t i = 0; i < 2000; ++i) EXPECT_NE(after[i], before[i]) << i;
  for (int64_t i = 2000; i < kN; ++i) ASSERT_EQ(after[i], before[i]) << i;
  EXPECT_EQ((*v)->version(), 1u);  // the step happened
  EXPECT_EQ(VariableStore::ApplyDenseStreaming(**v, {0, kN}, 0, nullptr, 1.0f, 1.0f).code(),
            StatusCode::kInvalidArgument);
}

VariableSpec SgdSpec(std::string name, int64_t n) {
  VariableSpec s = AdamSpec(std::move(name), n);
  s.optimizer.kind = OptimizerKind::kSgd;
  s.optimizer.learning_rate = 0.25;
  return s;
}

// Feeds g to `u` in pieces of `piece` elements.
void FeedPieces(VariableStore::CheckedUpdate& u, const std::vector<float>& g, int64_t piece,
                size_t* non_finite, const VariableStore::RangeRunner& runner = {}) {
  const auto n = static_cast<int64_t>(g.size());
  for (int64_t b = 0; b < n; b += piece)
    ASSERT_TRUE(u.Piece(g.data() + b, std::min(piece, n - b), non_finite, runner).ok());
}

TEST(CheckedUpdateTest, PiecesOverSeveralCallsEqualOneApplyBitForBit) {
  constexpr int64_t kN = 100003;
  VariableStore store;
  auto a = store.Create(SgdSpec("a", kN), {0, kN}, nullptr);
  auto b = store.Create(SgdSpec("b", kN), {0, kN}, nullptr);
  ASSERT_TRUE(a.ok() && b.ok());
  for (int step = 0; step < 3; ++step) {
    const auto g = RandomGradient(kN, static_cast<uint32_t>(10 + step));
    ASSERT_TRUE(VariableStore::ApplyDense(**a, {0, kN}, g.data(), 1.0f, 1.0f).ok());
    auto u = VariableStore::BeginCheckedUpdate(**b, {0, kN}, 1.0f);
    ASSERT_TRUE(u.ok()) << u.status();
    size_t bad = 0;
    // Readers in between see the old values, and a snapshot keeps them.
    const auto before = ReadAll(**b);
    FeedPieces(*u, std::vector<float>(g.begin(), g.begin() + 50000), 4096, &bad);
    ParamsSnapshot held = VariableStore::Snapshot(**b);
    EXPECT_EQ(ReadAll(**b), before);
    FeedPieces(*u, std::vector<float>(g.begin() + 50000, g.end()), 4096, &bad);
    EXPECT_EQ(bad, 0u);
    ASSERT_TRUE(u->Commit().ok());
    ASSERT_EQ(ReadAll(**a), ReadAll(**b)) << "step " << step;
    EXPECT_EQ((*b)->version(), static_cast<uint64_t>(step + 1));
    EXPECT_EQ(std::vector<float>(held.params->data_as<float>(), held.params->data_as<float>() + kN),
              before);
  }
}

TEST(CheckedUpdateTest, ANonFiniteValueOrAMissingPieceChangesNothing) {
  constexpr int64_t kN = 10000;
  VariableStore store;
  auto v = store.Create(SgdSpec("v", kN), {0, kN}, nullptr);
  ASSERT_TRUE(v.ok());
  const auto before = ReadAll(**v);
  auto g = RandomGradient(kN, 5);
  g[kN - 1] = std::numeric_limits<float>::infinity();
  auto u = VariableStore::BeginCheckedUpdate(**v, {0, kN}, 1.0f);
  ASSERT_TRUE(u.ok());
  size_t bad = 0;
  FeedPieces(*u, g, 1000, &bad);
  EXPECT_EQ(bad, 1u);
  EXPECT_EQ(u->Commit().code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(ReadAll(**v), before);
  EXPECT_EQ((*v)->version(), 0u);
  // Half the gradient, then Commit: nothing either.
  g[kN - 1] = 0;
  auto half = VariableStore::BeginCheckedUpdate(**v, {0, kN}, 1.0f);
  ASSERT_TRUE(half.ok());
  ASSERT_TRUE(half->Piece(g.data(), kN / 2, &bad).ok());
  EXPECT_EQ(half->Piece(g.data(), kN, &bad).code(), StatusCode::kOutOfRange);
  EXPECT_EQ(half->Commit().code(), StatusCode::kFailedPrecondition);
  EXPECT_EQ(ReadAll(**v), before);
  EXPECT_EQ((*v)->version(), 0u);
  // Only for rules without state.
  auto adam = store.Create(AdamSpec("adam", kN), {0, kN}, nullptr);
  ASSERT_TRUE(adam.ok());
  EXPECT_EQ(VariableStore::BeginCheckedUpdate(**adam, {0, kN}, 1.0f).status().code(),
            StatusCode::kFailedPrecondition);
}

// The check and the apply go block by block; the count of bad values must
// stay exact across blocks, pieces and the runner's threads, and the values
// must equal one whole apply.
TEST(CheckedUpdateTest, CountsEveryBadValueAcrossBlocksAndThreads) {
  constexpr int64_t kN = 100000;
  VariableStore store;
  auto v = store.Create(SgdSpec("v", kN), {0, kN}, nullptr);
  auto w = store.Create(SgdSpec("w", kN), {0, kN}, nullptr);
  ASSERT_TRUE(v.ok() && w.ok());
  const VariableStore::RangeRunner two_threads = [](int64_t n, const auto& body) {
    std::thread other([&] { body(n / 2, n); });
    body(0, n / 2);
    other.join();
  };
  const auto before = ReadAll(**v);
  auto g = RandomGradient(kN, 7);
  const float nan = std::numeric_limits<float>::quiet_NaN();
  for (int64_t at : {int64_t{5}, int64_t{4095}, int64_t{4096}, int64_t{70000}, kN - 1}) g[at] = nan;
  for (const auto& runner : {VariableStore::RangeRunner{}, two_threads}) {
    auto u = VariableStore::BeginCheckedUpdate(**v, {0, kN}, 1.0f);
    ASSERT_TRUE(u.ok());
    size_t bad = 0;
    FeedPieces(*u, g, 30000, &bad, runner);
    EXPECT_EQ(bad, 5u);
    EXPECT_EQ(u->Commit().code(), StatusCode::kInvalidArgument);
    EXPECT_EQ(ReadAll(**v), before);
  }
  // Finite, over two threads: the same bits as one apply.
  const auto finite = RandomGradient(kN, 8);
  ASSERT_TRUE(VariableStore::ApplyDense(**w, {0, kN}, finite.data(), 1.0f, 1.0f).ok());
  auto u = VariableStore::BeginCheckedUpdate(**v, {0, kN}, 1.0f);
  ASSERT_TRUE(u.ok());
  size_t bad = 0;
  FeedPieces(*u, finite, 30000, &bad, two_threads);
  EXPECT_EQ(bad, 0u);
  ASSERT_TRUE(u->Commit().ok());
  EXPECT_EQ(ReadAll(**v), ReadAll(**w));
}

// Every buffer the store makes goes through its allocator: an update ended
// without a commit (refused, abandoned or dropped) gives its buffer back as
// the spare, and the next one takes that instead of allocating.
TEST(CheckedUpdateTest, OneEndedWithoutACommitGivesItsBufferBack) {
  constexpr int64_t kN = 5000;
  int allocations = 0;
  VariableStore store([&allocations](const Shape& shape) {
    ++allocations;
    return std::make_shared<Tensor>(DType::kF32, shape);
  });
  auto v = store.Create(SgdSpec("v", kN), {0, kN}, nullptr);
  VariableStore plain;
  auto w = plain.Create(SgdSpec("v", kN), {0, kN}, nullptr);  // the same initial values
  ASSERT_TRUE(v.ok() && w.ok());
  const int made = allocations;  // the parameters
  const auto g = RandomGradient(kN, 3);
  {
    auto dropped = VariableStore::BeginCheckedUpdate(**v, {0, kN}, 1.0f);
    ASSERT_TRUE(dropped.ok());
    size_t bad = 0;
    FeedPieces(*dropped, std::vector<float>(g.begin(), g.begin() + 1000), 1000, &bad);
  }
  EXPECT_EQ(allocations, made + 1);
  auto abandoned = VariableStore::BeginCheckedUpdate(**v, {0, kN}, 1.0f);
  ASSERT_TRUE(abandoned.ok());
  abandoned->Abandon();
  EXPECT_EQ(abandoned->Commit().code(), StatusCode::kFailedPrecondition);
  auto moved = VariableStore::BeginCheckedUpdate(**v, {0, kN}, 1.0f);
  ASSERT_TRUE(moved.ok());
  VariableStore::CheckedUpdate u = std::move(*moved);
  size_t bad = 0;
  FeedPieces(u, g, 1000, &bad);
  EXPECT_TRUE(u.Current());
  ASSERT_TRUE(u.Commit().ok());
  EXPECT_FALSE(u.Current());
  EXPECT_EQ(allocations, made + 1);  // no update allocated another buffer
  ASSERT_TRUE(VariableStore::ApplyDense(**w, {0, kN}, g.data(), 1.0f, 1.0f).ok());
  EXPECT_EQ(ReadAll(**v), ReadAll(**w));
}

TEST(CheckedUpdateTest, AnUpdateInBetweenMakesTheCommitStepAside) {
  constexpr int64_t kN = 10000;
  VariableStore store;
  auto v = store.Create(SgdSpec("v", kN), {0, kN}, nullptr);
  ASSERT_TRUE(v.ok());
  const auto g1 = RandomGradient(kN, 1), g2 = RandomGradient(kN, 2);
  auto u = VariableStore::BeginCheckedUpdate(**v, {0, kN}, 1.0f);
  ASSERT_TRUE(u.ok());
  size_t bad = 0;
  FeedPieces(*u, std::vector<float>(g1.begin(), g1.begin() + 5000), 1000, &bad);
  // Another push gets in: the checked update must not overwrite it.
  ASSERT_TRUE(VariableStore::ApplyDense(**v, {0, kN}, g2.data(), 1.0f, 1.0f).ok());
  const auto after_other = ReadAll(**v);
  FeedPieces(*u, std::vector<float>(g1.begin() + 5000, g1.end()), 1000, &bad);
  EXPECT_EQ(u->Commit().code(), StatusCode::kAborted);
  EXPECT_EQ(ReadAll(**v), after_other);
  EXPECT_EQ((*v)->version(), 1u);
  // So does a new learning rate (the pieces so far used the old one).
  auto w = VariableStore::BeginCheckedUpdate(**v, {0, kN}, 1.0f);
  ASSERT_TRUE(w.ok());
  FeedPieces(*w, std::vector<float>(g1.begin(), g1.begin() + 5000), 1000, &bad);
  ASSERT_TRUE(store.SetLearningRate("v", 0.5).ok());
  FeedPieces(*w, std::vector<float>(g1.begin() + 5000, g1.end()), 1000, &bad);
  EXPECT_EQ(w->Commit().code(), StatusCode::kAborted);
  EXPECT_EQ(ReadAll(**v), after_other);
  EXPECT_EQ(bad, 0u);
}

TEST(VariableStoreAllocatorTest, ParametersAndSparesComeFromTheAllocator) {
  int calls = 0;
  std::vector<const void*> made;
  VariableStore store([&](const Shape& shape) -> std::shared_ptr<Tensor> {
    ++calls;
    auto owner = std::make_shared<Tensor>(DType::kF32, shape);  // stands in for a segment
    std::byte* data = static_cast<std::byte*>(owner->data());
    made.push_back(data);
    return std::make_shared<Tensor>(DType::kF32, shape, data, owner);
  });
  VariableSpec spec = AdamSpec("w", 64);
  spec.initializer.kind = protocol::InitConstant{2.0};
  auto v = store.Create(spec, {0, 64}, nullptr);
  ASSERT_TRUE(v.ok());
  EXPECT_EQ(calls, 1);
  ParamsSnapshot snap = VariableStore::Snapshot(**v);
  EXPECT_EQ(snap.params->data(), made[0]);
  EXPECT_EQ(snap.params->data_as<float>()[63], 2.0f);  // initialized in place
  // Lent: the next apply writes a spare, also from the allocator.
  std::vector<float> g(64, 1.0f);
  ASSERT_TRUE(VariableStore::ApplyDense(**v, {0, 64}, g.data(), 1.0f, 1.0f).ok());
  EXPECT_EQ(calls, 2);
  EXPECT_EQ(VariableStore::Snapshot(**v).params->data(), made[1]);
  EXPECT_EQ(snap.params->data_as<float>()[0], 2.0f);  // the snapshot is untouched
}

}  // namespace
}  // namespace distval::ps
