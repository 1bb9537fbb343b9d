// Variable placement across parameter-server shards.
//
// Placement is a pure function of (variable specs in creation order, number
// of shards): every worker runs the same PlacementPlanner over the same
// sequence of variables and gets the same map without asking anyone.
//
// Two steps decide where a variable lives:
//  1. A Partitioner says into how many row ranges (partitions) a variable is
//     split along axis 0. The factories mirror TensorFlow's
//     tf.distribute.experimental.partitioners (FixedShardsPartitioner,
//     MinSizePartitioner, MaxSizePartitioner) and use their formulas.
//  2. The PlacementPlanner assigns each partition to a shard, balancing the
//     bytes held per shard.
//
// Thread-safety: Partitioner, ShardSlice and VariablePlacement are values.
// A PlacementPlanner is not internally synchronized.
#ifndef DISTVAL_PARTITIONER_H_
#define DISTVAL_PARTITIONER_H_

#include <cstdint>
#include <map>
#include <string>
#include <string_view>
#include <vector>

#include "distval/status.h"
#include "distval/tensor.h"

namespace distval {

// Splits `rows` rows into `parts` contiguous ranges and returns their sizes,
// in order. TensorFlow's semantics: the first rows % parts ranges get one row
// more than the others (13 rows over 5 parts: 3,3,3,2,2). The sizes sum to
// `rows`; when parts > rows the trailing sizes are 0.
// Returns an empty vector when parts < 1 or rows < 0.
std::vector<int64_t> SplitRows(int64_t rows, int parts);

// Decides how many row ranges (partitions) a variable is split into along
// axis 0. A value type; copy freely.
//
// A scalar (rank 0), a variable with no rows, or one with no elements is
// never split (1 partition). Every result is in [1, max(1, rows)].
class Partitioner {
 public:
  enum class Kind { kNone, kFixedShards, kMinSize, kMaxSize };

  // None(): never split.
  Partitioner() = default;

  // Never split: every variable is 1 partition, placed whole on one shard.
  static Partitioner None();

  // TF FixedShardsPartitioner(num_shards): partitions = min(num_shards, rows).
  // Validate() rejects num_shards < 1.
  static Partitioner FixedShards(int num_shards);

  // TF MinSizePartitioner(min_shard_bytes, max_shards), which calls
  // partitioned_variables.min_max_variable_partitioner:
  //   partitions = max(1, min(rows, max_shards,
  //                           ceil(total_bytes / min_shard_bytes)))
  // (TF rounds the quotient UP: sharded_variable.py / partitioned_variables.py,
  // `int(math.ceil(partitions))`). Validate() rejects min_shard_bytes < 1 and
  // max_shards < 1.
  static Partitioner MinSize(int64_t min_shard_bytes = int64_t{256} << 10, int max_shards = 1);

  // TF MaxSizePartitioner(max_shard_bytes, max_shards), which calls
  // partitioned_variables.variable_axis_size_partitioner:
  //   rows_per_shard = max(1, floor(max_shard_bytes / bytes_per_row))
  //   partitions     = ceil(rows / rows_per_shard), then min(max_shards, .)
  //                    when max_shards > 0 (0: unbounded, TF's None).
  // So a shard never exceeds max_shard_bytes unless one row alone does, or
  // the max_shards bound is hit. This is a little more than
  // ceil(total_bytes / max_shard_bytes) when rows do not divide evenly.
  // Validate() rejects max_shard_bytes < 1 and max_shards < 0.
  static Partitioner MaxSize(int64_t max_shard_bytes, int max_shards = 0);

  // InvalidArgument naming the bad parameter (see the factories).
  Status Validate() const;

  // Number of partitions for a variable of `shape` and `dtype` (formulas
  // above, axis 0). Never fails: an invalid partitioner or shape (negative
  // dimension) yields 1; call Validate() to detect those.
  int NumPartitions(const Shape& shape, DType dtype) const;

  Kind kind() const { return kind_; }
  // FixedShards: num_shards; MinSize/MaxSize: max_shards (0 for MaxSize: no
  // bound); None: 0.
  int max_shards() const { return shards_; }
  // MinSize: min_shard_bytes; MaxSize: max_shard_bytes; otherwise 0.
  int64_t shard_bytes() const { return bytes_; }

  // "None", "FixedShards(5)", "MinSize(262144, 1)", "MaxSize(1024, 0)".
  std::string ToString() const;

  friend bool operator==(const Partitioner& a, const Partitioner& b) {
    return a.kind_ == b.kind_ && a.shards_ == b.shards_ && a.bytes_ == b.bytes_;
  }

 private:
  Partitioner(Kind kind, int shards, int64_t bytes) : kind_(kind), shards_(shards), bytes_(bytes) {}

  Kind kind_ = Kind::kNone;
  int shards_ = 0;
  int64_t bytes_ = 0;
};

// One contiguous row range [row_begin, row_end) of a variable, held by shard
// `shard`.
struct ShardSlice {
  int shard = 0;
  int64_t row_begin = 0;
  int64_t row_end = 0;

  int64_t rows() const { return row_end - row_begin; }
  friend bool operator==(const ShardSlice&, const ShardSlice&) = default;
};

// Where the rows of one variable live.
//
// Invariants (established by PlacementPlanner): `slices` is non-empty,
// sorted by row_begin, contiguous and covers exactly [0, rows) (a scalar
// counts as 1 row; a variable with 0 rows has one empty slice [0, 0)); no
// shard appears twice, so each shard holds at most ONE contiguous row range
// of a variable (the wire protocol's RowRange relies on that).
struct VariablePlacement {
  std::vector<ShardSlice> slices;

  // The shard holding global row `row`; -1 when row is outside [0, rows).
  // O(log slices).
  int ShardOfRow(int64_t row) const;
  // The slice held by `shard`, or nullptr when that shard holds no rows of
  // this variable. The pointer is borrowed from this placement.
  const ShardSlice* SliceOnShard(int shard) const;
  // Total rows covered (row_end of the last slice).
  int64_t rows() const { return slices.empty() ? 0 : slices.back().row_end; }
  bool partitioned() const { return slices.size() > 1; }

  friend bool operator==(const VariablePlacement&, const VariablePlacement&) = default;
};

// Assigns variables to shards, in creation order.
//
// - A variable the partitioner leaves in 1 partition goes whole to the shard
//   holding the fewest bytes so far (ties: lowest shard index), so whole
//   variables are balanced by bytes.
// - A variable with k > 1 partitions: k is first capped at num_shards, so a
//   shard holds at most one contiguous row range of any variable (the wire
//   protocol addresses a shard's part of a variable by one RowRange). Rows are
//   split with SplitRows(rows, k) and slice i (in row order) goes to the i-th
//   least-loaded shard at that moment (ordered by bytes, then shard index).
//
// The result depends only on the sequence of Place() calls, so two planners
// fed the same sequence produce identical maps.
//
// Not thread-safe: synchronize externally if shared.
class PlacementPlanner {
 public:
  // num_shards < 1 is reported by every Place() call (InvalidArgument).
  explicit PlacementPlanner(int num_shards);

  // Places variable `name` and returns its placement.
  // Idempotent: placing a name again with the same dtype and shape returns
  // the placement decided the first time (whatever partitioner is passed)
  // and changes nothing.
  // Errors:
  //  - InvalidArgument: num_shards < 1, empty name, a negative dimension, a
  //    size that overflows int64 bytes, or an invalid partitioner (the
  //    message names the variable);
  //  - AlreadyExists: `name` was placed before with a different shape or
  //    dtype (the message names both).
  StatusOr<VariablePlacement> Place(std::string_view name, DType dtype, const Shape& shape,
                                    const Partitioner& partitioner);

  // The placement of `name`, or nullptr when it was never placed. Borrowed;
  // valid until this planner is destroyed (later Place() calls do not move it).
  const VariablePlacement* Find(std::string_view name) const;

  int num_shards() const { return num_shards_; }
  // Bytes assigned to each shard so far (num_shards entries; empty when
  // num_shards < 1).
  const std::vector<int64_t>& shard_bytes() const { return shard_bytes_; }
  // Number of distinct variables placed.
  size_t size() const { return entries_.size(); }

 private:
  struct Entry {
    DType dtype;
    Shape shape;
    VariablePlacement placement;
  };

  // Shard indices ordered by (bytes held, index).
  std::vector<int> ShardsByLoad() const;

  int num_shards_;
  std::vector<int64_t> shard_bytes_;
  std::map<std::string, Entry, std::less<>> entries_;
};

}  // namespace distval

#endif  // DISTVAL_PARTITIONER_H_
