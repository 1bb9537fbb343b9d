#include "distval/partitioner.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <set>
#include <string>
#include <vector>

namespace distval {
namespace {

// Checks the VariablePlacement invariants: sorted, contiguous, covering
// [0, rows), no shard twice, every row on exactly one shard (via ShardOfRow).
void ExpectWellFormed(const VariablePlacement& p, int64_t rows, int num_shards) {
  ASSERT_FALSE(p.slices.empty());
  EXPECT_EQ(p.slices.front().row_begin, 0);
  EXPECT_EQ(p.slices.back().row_end, rows);
  EXPECT_EQ(p.rows(), rows);
  std::set<int> shards;
  for (size_t i = 0; i < p.slices.size(); ++i) {
    const ShardSlice& s = p.slices[i];
    EXPECT_GE(s.shard, 0);
    EXPECT_LT(s.shard, num_shards);
    EXPECT_TRUE(shards.insert(s.shard).second) << "shard " << s.shard << " holds two ranges";
    EXPECT_LE(s.row_begin, s.row_end);
    if (i > 0) {
      EXPECT_EQ(s.row_begin, p.slices[i - 1].row_end) << "gap or overlap at slice " << i;
    }
  }
  for (int64_t r = 0; r < rows; ++r) {
    const int shard = p.ShardOfRow(r);
    const ShardSlice* s = p.SliceOnShard(shard);
    ASSERT_NE(s, nullptr) << "row " << r;
    EXPECT_GE(r, s->row_begin);
    EXPECT_LT(r, s->row_end);
    int holders = 0;
    for (const ShardSlice& t : p.slices) holders += (r >= t.row_begin && r < t.row_end);
    EXPECT_EQ(holders, 1) << "row " << r;
  }
  EXPECT_EQ(p.ShardOfRow(-1), -1);
  EXPECT_EQ(p.ShardOfRow(rows), -1);
}

std::vector<int64_t> SliceSizes(const VariablePlacement& p) {
  std::vector<int64_t> sizes;
  for (const ShardSlice& s : p.slices) sizes.push_back(s.rows());
  return sizes;
}

TEST(SplitRowsTest, FirstPartsGetTheExtraRows) {
  EXPECT_EQ(SplitRows(13, 5), (std::vector<int64_t>{3, 3, 3, 2, 2}));
  EXPECT_EQ(SplitRows(10, 2), (std::vector<int64_t>{5, 5}));
  EXPECT_EQ(SplitRows(7, 1), (std::vector<int64_t>{7}));
  EXPECT_EQ(SplitRows(2, 4), (std::vector<int64_t>{1, 1, 0, 0}));
  EXPECT_TRUE(SplitRows(5, 0).empty());
  EXPECT_TRUE(SplitRows(-1, 2).empty());
}

TEST(PartitionerTest, FixedShards) {
  // TF doc example: FixedShardsPartitioner(num_shards=2) on [10, 3] -> [2, 1].
  EXPECT_EQ(Partitioner::FixedShards(2).NumPartitions(Shape{10, 3}, DType::kF32), 2);
  EXPECT_EQ(Partitioner::FixedShards(5).NumPartitions(Shape{13, 4}, DType::kF32), 5);
  // min(num_shards, rows): fewer rows than shards.
  EXPECT_EQ(Partitioner::FixedShards(8).NumPartitions(Shape{3, 2}, DType::kF32), 3);
  EXPECT_EQ(Partitioner::FixedShards(4).NumPartitions(Shape{9}, DType::kF64), 4);
}

TEST(PartitionerTest, MinSize) {
  // TF doc examples, [6, 1] f32 = 24 bytes:
  //   MinSize(4, 2):  min(6 rows, 2, ceil(24 / 4) = 6) = 2
  //   MinSize(4, 10): min(6 rows, 10, 6) = 6
  EXPECT_EQ(Partitioner::MinSize(4, 2).NumPartitions(Shape{6, 1}, DType::kF32), 2);
  EXPECT_EQ(Partitioner::MinSize(4, 10).NumPartitions(Shape{6, 1}, DType::kF32), 6);
  // TF rounds the size quotient up: [10] f32 = 40 bytes, 40 / 16 = 2.5 -> 3.
  EXPECT_EQ(Partitioner::MinSize(16, 10).NumPartitions(Shape{10}, DType::kF32), 3);
  // Defaults (256 KiB, max_shards 1) never split: [1000000] f32 = 4 MB.
  EXPECT_EQ(Partitioner::MinSize().NumPartitions(Shape{1000000}, DType::kF32), 1);
  // [1024, 1024] f32 = 4 MiB; 4 MiB / 256 KiB = 16; min(1024, 4, 16) = 4.
  EXPECT_EQ(Partitioner::MinSize(256 << 10, 4).NumPartitions(Shape{1024, 1024}, DType::kF32), 4);
  // [100, 1000] f32 = 400000 bytes; 400000 / 262144 = 1.53 -> 2.
  EXPECT_EQ(Partitioner::MinSize(256 << 10, 4).NumPartitions(Shape{100, 1000}, DType::kF32), 2);
  // Smaller than min_shard_bytes: max(1, ...) = 1. [10] f16 = 20 bytes.
  EXPECT_EQ(Partitioner::MinSize(1024, 8).NumPartitions(Shape{10}, DType::kF16), 1);
}

TEST(PartitionerTest, MaxSize) {
  // TF doc examples, [6, 1] f32 (4 bytes per row):
  //   MaxSize(4):       rows_per_shard = floor(4 / 4) = 1 -> ceil(6 / 1) = 6
  //   MaxSize(4, 2):    min(2, 6) = 2
  //   MaxSize(1024):    rows_per_shard = 256 -> ceil(6 / 256) = 1
  EXPECT_EQ(Partitioner::MaxSize(4).NumPartitions(Shape{6, 1}, DType::kF32), 6);
  EXPECT_EQ(Partitioner::MaxSize(4, 2).NumPartitions(Shape{6, 1}, DType::kF32), 2);
  EXPECT_EQ(Partitioner::MaxSize(1024).NumPartitions(Shape{6, 1}, DType::kF32), 1);
  // Rows that do not divide evenly: [10, 3] f32, 12 bytes per row,
  // MaxSize(30): rows_per_shard = floor(30 / 12) = 2 -> ceil(10 / 2) = 5
  // (ceil(120 / 30) = 4 would give 3-row shards of 36 bytes > 30).
  EXPECT_EQ(Partitioner::MaxSize(30).NumPartitions(Shape{10, 3}, DType::kF32), 5);
  // A row larger than max_shard_bytes: one row per shard, bounded by rows.
  // [4, 100] f32, 400 bytes per row, MaxSize(100) -> 4.
  EXPECT_EQ(Partitioner::MaxSize(100).NumPartitions(Shape{4, 100}, DType::kF32), 4);
  // [1000, 256] f64 = 2 MiB, 2 KiB per row; MaxSize(1 MiB): 512 rows per
  // shard -> ceil(1000 / 512) = 2.
  EXPECT_EQ(Partitioner::MaxSize(1 << 20).NumPartitions(Shape{1000, 256}, DType::kF64), 2);
}

TEST(PartitionerTest, ScalarsEmptyAndNoneAreNeverSplit) {
  const Partitioner all[] = {Partitioner::None(), Partitioner::FixedShards(4),
                             Partitioner::MinSize(1, 4), Partitioner::MaxSize(1)};
  for (const Partitioner& p : all) {
    SCOPED_TRACE(p.ToString());
    EXPECT_EQ(p.NumPartitions(Shape{}, DType::kF32), 1);
    EXPECT_EQ(p.NumPartitions(Shape{0, 5}, DType::kF32), 1);
    EXPECT_EQ(p.NumPartitions(Shape{5, 0}, DType::kF32), 1);
  }
  EXPECT_EQ(Partitioner::None().NumPartitions(Shape{1 << 20, 64}, DType::kF32), 1);
  EXPECT_EQ(Partitioner(), Partitioner::None());
}

TEST(PartitionerTest, ValidateNamesTheParameter) {
  EXPECT_TRUE(Partitioner::None().Validate().ok());
  EXPECT_TRUE(Partitioner::MaxSize(10, 0).Validate().ok());
  Status s = Partitioner::FixedShards(0).Validate();
  EXPECT_EQ(s.code(), StatusCode::kInvalidArgument);
  EXPECT_NE(s.message().find("num_shards"), std::string::npos) << s;
  s = Partitioner::MinSize(0, 2).Validate();
  EXPECT_NE(s.message().find("min_shard_bytes"), std::string::npos) << s;
  s = Partitioner::MinSize(10, 0).Validate();
  EXPECT_NE(s.message().find("max_shards"), std::string::npos) << s;
  s = Partitioner::MaxSize(0).Validate();
  EXPECT_NE(s.message().find("max_shard_bytes"), std::string::npos) << s;
  s = Partitioner::MaxSize(10, -1).Validate();
  EXPECT_NE(s.message().find("max_shards"), std::string::npos) << s;
}

TEST(PlacementPlannerTest, ThirteenRowsOverFiveShards) {
  PlacementPlanner planner(5);
  StatusOr<VariablePlacement> p =
      planner.Place("emb", DType::kF32, Shape{13, 4}, Partitioner::FixedShards(5));
  ASSERT_TRUE(p.ok()) << p.status();
  EXPECT_EQ(SliceSizes(*p), (std::vector<int64_t>{3, 3, 3, 2, 2}));
  // All shards empty: ties broken by index, so slice i goes to shard i.
  for (int i = 0; i < 5; ++i) EXPECT_EQ(p->slices[static_cast<size_t>(i)].shard, i);
  ExpectWellFormed(*p, 13, 5);
  EXPECT_EQ(planner.shard_bytes(), (std::vector<int64_t>{48, 48, 48, 32, 32}));
  EXPECT_TRUE(p->partitioned());
}

TEST(PlacementPlannerTest, LeastLoadedShardsInOrder) {
  // Hand-worked sequence over 3 shards (bytes in parentheses):
  PlacementPlanner planner(3);
  const Partitioner none = Partitioner::None();
  auto place = [&](const char* name, Shape shape, const Partitioner& part) {
    StatusOr<VariablePlacement> p = planner.Place(name, DType::kF32, shape, part);
    EXPECT_TRUE(p.ok()) << p.status();
    return p.ok() ? *p : VariablePlacement{};
  };
  // a (100): all empty -> shard 0.          loads 100, 0, 0
  EXPECT_EQ(place("a", Shape{25}, none).slices[0].shard, 0);
  // b (60): shards 1 and 2 tie at 0 -> 1.   loads 100, 60, 0
  EXPECT_EQ(place("b", Shape{15}, none).slices[0].shard, 1);
  // c (60): shard 2.                        loads 100, 60, 60
  EXPECT_EQ(place("c", Shape{3, 5}, none).slices[0].shard, 2);
  // d (12): shards 1 and 2 tie at 60 -> 1.  loads 100, 72, 60
  EXPECT_EQ(place("d", Shape{3}, none).slices[0].shard, 1);
  // e: [6, 1] split in 3 (8 bytes each); least loaded first: 2 (60),
  // 1 (72), 0 (100). Rows 0-2 -> shard 2, 2-4 -> shard 1, 4-6 -> shard 0.
  VariablePlacement e = place("e", Shape{6, 1}, Partitioner::FixedShards(3));
  ASSERT_EQ(e.slices.size(), 3u);
  EXPECT_EQ(e.slices[0], (ShardSlice{2, 0, 2}));
  EXPECT_EQ(e.slices[1], (ShardSlice{1, 2, 4}));
  EXPECT_EQ(e.slices[2], (ShardSlice{0, 4, 6}));
  EXPECT_EQ(e.ShardOfRow(3), 1);
  EXPECT_EQ(planner.shard_bytes(), (std::vector<int64_t>{108, 80, 68}));
  EXPECT_EQ(planner.size(), 5u);
}

TEST(PlacementPlannerTest, PartitionsAreCappedAtNumShards) {
  // FixedShards(8) over 4 shards: 4 slices (3,3,2,2), one per shard.
  PlacementPlanner planner(4);
  StatusOr<VariablePlacement> p =
      planner.Place("w", DType::kF32, Shape{10, 1}, Partitioner::FixedShards(8));
  ASSERT_TRUE(p.ok()) << p.status();
  EXPECT_EQ(SliceSizes(*p), (std::vector<int64_t>{3, 3, 2, 2}));
  ExpectWellFormed(*p, 10, 4);
  // MaxSize(4) wants 100 one-row partitions; capped at 4 as well.
  p = planner.Place("v", DType::kF32, Shape{100}, Partitioner::MaxSize(4));
  ASSERT_TRUE(p.ok()) << p.status();
  EXPECT_EQ(SliceSizes(*p), (std::vector<int64_t>{25, 25, 25, 25}));
  ExpectWellFormed(*p, 100, 4);
}

TEST(PlacementPlannerTest, FewerRowsThanShards) {
  PlacementPlanner planner(8);
  StatusOr<VariablePlacement> p =
      planner.Place("small", DType::kF32, Shape{3, 2}, Partitioner::FixedShards(8));
  ASSERT_TRUE(p.ok()) << p.status();
  EXPECT_EQ(SliceSizes(*p), (std::vector<int64_t>{1, 1, 1}));
  ExpectWellFormed(*p, 3, 8);
}

TEST(PlacementPlannerTest, ScalarGoesWholeToOneShard) {
  PlacementPlanner planner(3);
  ASSERT_TRUE(planner.Place("big", DType::kF32, Shape{100}, Partitioner::None()).ok());
  StatusOr<VariablePlacement> p =
      planner.Place("step", DType::kI64, Shape{}, Partitioner::FixedShards(3));
  ASSERT_TRUE(p.ok()) << p.status();
  ASSERT_EQ(p->slices.size(), 1u);
  EXPECT_EQ(p->slices[0], (ShardSlice{1, 0, 1}));
  EXPECT_EQ(planner.shard_bytes(), (std::vector<int64_t>{400, 8, 0}));
  // An empty variable also goes whole: one empty slice.
  p = planner.Place("empty", DType::kF32, Shape{0, 4}, Partitioner::FixedShards(3));
  ASSERT_TRUE(p.ok()) << p.status();
  ASSERT_EQ(p->slices.size(), 1u);
  EXPECT_EQ(p->slices[0], (ShardSlice{2, 0, 0}));
  EXPECT_EQ(p->ShardOfRow(0), -1);
}

struct VarSpec {
  std::string name;
  DType dtype;
  Shape shape;
  Partitioner partitioner;
};

std::vector<VarSpec> MixedModel() {
  return {
      {"embedding", DType::kF32, Shape{1000, 64}, Partitioner::MinSize(16 << 10, 8)},
      {"dense1/kernel", DType::kF32, Shape{784, 256}, Partitioner::MaxSize(256 << 10)},
      {"dense1/bias", DType::kF32, Shape{256}, Partitioner::MaxSize(256 << 10)},
      {"dense2/kernel", DType::kF32, Shape{256, 128}, Partitioner::None()},
      {"dense2/bias", DType::kF32, Shape{128}, Partitioner::None()},
      {"out/kernel", DType::kF64, Shape{128, 10}, Partitioner::FixedShards(2)},
      {"out/bias", DType::kF32, Shape{10}, Partitioner::None()},
      {"step", DType::kI64, Shape{}, Partitioner::None()},
      {"table", DType::kF16, Shape{13, 7}, Partitioner::FixedShards(5)},
  };
}

TEST(PlacementPlannerTest, DeterministicAcrossPlanners) {
  PlacementPlanner a(3);
  PlacementPlanner b(3);
  for (const VarSpec& v : MixedModel()) {
    StatusOr<VariablePlacement> pa = a.Place(v.name, v.dtype, v.shape, v.partitioner);
    StatusOr<VariablePlacement> pb = b.Place(v.name, v.dtype, v.shape, v.partitioner);
    ASSERT_TRUE(pa.ok()) << pa.status();
    ASSERT_TRUE(pb.ok()) << pb.status();
    EXPECT_EQ(*pa, *pb) << v.name;
    ExpectWellFormed(*pa, v.shape.rows(), 3);
  }
  EXPECT_EQ(a.shard_bytes(), b.shard_bytes());
  for (const VarSpec& v : MixedModel()) {
    ASSERT_NE(a.Find(v.name), nullptr);
    EXPECT_EQ(*a.Find(v.name), *b.Find(v.name));
  }
  // The bytes held add up to the model size.
  int64_t total = 0;
  for (const VarSpec& v : MixedModel())
    total += v.shape.num_elements() * static_cast<int64_t>(DTypeSize(v.dtype));
  int64_t held = 0;
  for (int64_t x : a.shard_bytes()) held += x;
  EXPECT_EQ(held, total);
}

TEST(PlacementPlannerTest, WholeVariablesAreBalancedByBytes) {
  // 10 variables of assorted sizes (elements, f32) over 3 shards, unsplit.
  const std::vector<int64_t> sizes = {1000, 17, 4096, 300, 2500, 64, 999, 1, 3000, 750};
  PlacementPlanner planner(3);
  int64_t largest = 0;
  for (size_t i = 0; i < sizes.size(); ++i) {
    ASSERT_TRUE(planner
                    .Place(std::string("v").append(std::to_string(i)), DType::kF32, Shape{sizes[i]},
                           Partitioner::None())
                    .ok());
    largest = std::max(largest, sizes[i] * 4);
  }
  const auto& bytes = planner.shard_bytes();
  const int64_t spread =
      *std::max_element(bytes.begin(), bytes.end()) - *std::min_element(bytes.begin(), bytes.end());
  EXPECT_LE(spread, largest);
  for (int64_t b : bytes) EXPECT_GT(b, 0);
}

TEST(PlacementPlannerTest, EveryRowOnExactlyOneShard) {
  for (int shards : {1, 2, 3, 7}) {
    for (int64_t rows : {1, 2, 5, 13, 64, 101}) {
      for (const Partitioner& part :
           {Partitioner::FixedShards(5), Partitioner::MaxSize(40), Partitioner::MinSize(8, 16)}) {
        SCOPED_TRACE(std::to_string(shards) + " shards, " + std::to_string(rows) + " rows, " +
                     part.ToString());
        PlacementPlanner planner(shards);
        ASSERT_TRUE(planner.Place("pad", DType::kF32, Shape{7}, Partitioner::None()).ok());
        StatusOr<VariablePlacement> p = planner.Place("x", DType::kF32, Shape{rows, 3}, part);
        ASSERT_TRUE(p.ok()) << p.status();
        EXPECT_LE(static_cast<int>(p->slices.size()), shards);
        ExpectWellFormed(*p, rows, shards);
      }
    }
  }
}

TEST(PlacementPlannerTest, IdempotentAndAlreadyExists) {
  PlacementPlanner planner(2);
  StatusOr<VariablePlacement> first =
      planner.Place("w", DType::kF32, Shape{10, 4}, Partitioner::FixedShards(2));
  ASSERT_TRUE(first.ok()) << first.status();
  const std::vector<int64_t> bytes = planner.shard_bytes();

  StatusOr<VariablePlacement> again =
      planner.Place("w", DType::kF32, Shape{10, 4}, Partitioner::FixedShards(2));
  ASSERT_TRUE(again.ok()) << again.status();
  EXPECT_EQ(*again, *first);
  EXPECT_EQ(planner.shard_bytes(), bytes);
  EXPECT_EQ(planner.size(), 1u);

  StatusOr<VariablePlacement> other =
      planner.Place("w", DType::kF32, Shape{12, 4}, Partitioner::FixedShards(2));
  ASSERT_FALSE(other.ok());
  EXPECT_EQ(other.status().code(), StatusCode::kAlreadyExists);
  const std::string& msg = other.status().message();
  EXPECT_NE(msg.find("\"w\""), std::string::npos) << msg;
  EXPECT_NE(msg.find("[10,4]"), std::string::npos) << msg;
  EXPECT_NE(msg.find("[12,4]"), std::string::npos) << msg;

  other = planner.Place("w", DType::kF64, Shape{10, 4}, Partitioner::FixedShards(2));
  ASSERT_FALSE(other.ok());
  EXPECT_EQ(other.status().code(), StatusCode::kAlreadyExists);
  EXPECT_EQ(planner.shard_bytes(), bytes);
  EXPECT_EQ(planner.Find("nope"), nullptr);
}

TEST(PlacementPlannerTest, InvalidArguments) {
  PlacementPlanner none(0);
  StatusOr<VariablePlacement> p = none.Place("w", DType::kF32, Shape{4}, Partitioner::None());
  ASSERT_FALSE(p.ok());
  EXPECT_EQ(p.status().code(), StatusCode::kInvalidArgument);
  EXPECT_NE(p.status().message().find("num_shards"), std::string::npos) << p.status();
  EXPECT_TRUE(none.shard_bytes().empty());

  PlacementPlanner planner(2);
  p = planner.Place("neg", DType::kF32, Shape{4, -1}, Partitioner::None());
  ASSERT_FALSE(p.ok());
  EXPECT_EQ(p.status().code(), StatusCode::kInvalidArgument);
  EXPECT_NE(p.status().message().find("\"neg\""), std::string::npos) << p.status();
  EXPECT_NE(p.status().message().find("negative"), std::string::npos) << p.status();

  p = planner.Place("", DType::kF32, Shape{4}, Partitioner::None());
  EXPECT_EQ(p.status().code(), StatusCode::kInvalidArgument);

  p = planner.Place("bad_part", DType::kF32, Shape{4}, Partitioner::FixedShards(0));
  ASSERT_FALSE(p.ok());
  EXPECT_EQ(p.status().code(), StatusCode::kInvalidArgument);
  EXPECT_NE(p.status().message().find("\"bad_part\""), std::string::npos) << p.status();

  // 2^61 f64 elements = 2^64 bytes: overflows int64.
  p = planner.Place("huge", DType::kF64, Shape{int64_t{1} << 61}, Partitioner::None());
  EXPECT_EQ(p.status().code(), StatusCode::kInvalidArgument);

  // Failed placements leave the planner unchanged.
  EXPECT_EQ(planner.size(), 0u);
  EXPECT_EQ(planner.shard_bytes(), (std::vector<int64_t>{0, 0}));
}

}  // namespace
}  // namespace distval
