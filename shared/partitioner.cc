#include "distval/partitioner.h"

#include <algorithm>
#include <limits>
#include <numeric>
#include <utility>

namespace distval {
namespace {

constexpr int64_t kInt64Max = std::numeric_limits<int64_t>::max();
constexpr int kIntMax = std::numeric_limits<int>::max();

// Product of the dimensions as a 128-bit integer; false when a dimension is
// negative or the product does not fit in int64.
bool CheckedElements(const Shape& shape, __int128* out) {
  __int128 n = 1;
  for (int64_t d : shape.dims()) {
    if (d < 0) return false;
    n *= d;
    if (n > kInt64Max) return false;
  }
  *out = n;
  return true;
}

int ClampToInt(__int128 v) { return v > kIntMax ? kIntMax : static_cast<int>(v); }

__int128 CeilDiv(__int128 a, __int128 b) { return (a + b - 1) / b; }

// Built by appending: `"\"" + std::string(s)` trips a GCC 12 -Wrestrict
// false positive.
std::string Quoted(std::string_view s) {
  std::string out;
  out.reserve(s.size() + 2);
  out.push_back('"');
  out.append(s);
  out.push_back('"');
  return out;
}

std::string Describe(DType dtype, const Shape& shape) {
  return std::string(DTypeName(dtype)) + shape.ToString();
}

}  // namespace

std::vector<int64_t> SplitRows(int64_t rows, int parts) {
  if (parts < 1 || rows < 0) return {};
  const int64_t base = rows / parts;
  const int64_t extra = rows % parts;
  std::vector<int64_t> sizes(static_cast<size_t>(parts), base);
  for (int64_t i = 0; i < extra; ++i) ++sizes[static_cast<size_t>(i)];
  return sizes;
}

// ---------------------------------------------------------------------------
// Partitioner

Partitioner Partitioner::None() { return Partitioner(); }

Partitioner Partitioner::FixedShards(int num_shards) {
  return Partitioner(Kind::kFixedShards, num_shards, 0);
}

Partitioner Partitioner::MinSize(int64_t min_shard_bytes, int max_shards) {
  return Partitioner(Kind::kMinSize, max_shards, min_shard_bytes);
}

Partitioner Partitioner::MaxSize(int64_t max_shard_bytes, int max_shards) {
  return Partitioner(Kind::kMaxSize, max_shards, max_shard_bytes);
}

Status Partitioner::Validate() const {
  switch (kind_) {
    case Kind::kNone:
      return OkStatus();
    case Kind::kFixedShards:
      if (shards_ < 1)
        return InvalidArgumentError("FixedShards partitioner: num_shards must be >= 1, got " +
                                    std::to_string(shards_));
      return OkStatus();
    case Kind::kMinSize:
      if (bytes_ < 1)
        return InvalidArgumentError("MinSize partitioner: min_shard_bytes must be >= 1, got " +
                                    std::to_string(bytes_));
      if (shards_ < 1)
        return InvalidArgumentError("MinSize partitioner: max_shards must be >= 1, got " +
                                    std::to_string(shards_));
      return OkStatus();
    case Kind::kMaxSize:
      if (bytes_ < 1)
        return InvalidArgumentError("MaxSize partitioner: max_shard_bytes must be >= 1, got " +
                                    std::to_string(bytes_));
      if (shards_ < 0)
        return InvalidArgumentError(
            "MaxSize partitioner: max_shards must be >= 0 (0: unbounded), got " +
            std::to_string(shards_));
      return OkStatus();
  }
  return InvalidArgumentError("partitioner has an invalid kind");
}

int Partitioner::NumPartitions(const Shape& shape, DType dtype) const {
  if (shape.rank() == 0 || !Validate().ok()) return 1;
  __int128 elements = 0;
  if (!CheckedElements(shape, &elements)) return 1;
  const int64_t rows = shape.dim(0);
  if (rows <= 0 || elements == 0) return 1;
  const __int128 element_bytes = static_cast<__int128>(DTypeSize(dtype));
  const __int128 total_bytes = elements * element_bytes;

  switch (kind_) {
    case Kind::kNone:
      return 1;
    case Kind::kFixedShards:
      // TF FixedShardsPartitioner.__call__: min(num_shards, shape[axis]).
      return ClampToInt(std::min<__int128>(shards_, rows));
    case Kind::kMinSize: {
      // TF min_max_variable_partitioner:
      //   max(1, min(shape[axis], max_partitions,
      //              ceil(total_size_bytes / min_slice_size)))
      const __int128 by_size = CeilDiv(total_bytes, bytes_);
      __int128 p = std::min<__int128>({static_cast<__int128>(rows), shards_, by_size});
      return ClampToInt(std::max<__int128>(1, p));
    }
    case Kind::kMaxSize: {
      // TF variable_axis_size_partitioner:
      //   bytes_per_slice  = num_elements / shape[axis] * element_size
      //   slices_per_shard = max(1, floor(max_shard_bytes / bytes_per_slice))
      //   axis_shards      = ceil(shape[axis] / slices_per_shard)
      //   if max_shards: axis_shards = min(max_shards, axis_shards)
      const __int128 bytes_per_row = (elements / rows) * element_bytes;
      const __int128 rows_per_shard = std::max<__int128>(1, bytes_ / bytes_per_row);
      __int128 p = CeilDiv(rows, rows_per_shard);
      if (shards_ > 0) p = std::min<__int128>(p, shards_);
      return ClampToInt(std::max<__int128>(1, p));
    }
  }
  return 1;
}

std::string Partitioner::ToString() const {
  switch (kind_) {
    case Kind::kNone:
      return "None";
    case Kind::kFixedShards:
      return "FixedShards(" + std::to_string(shards_) + ")";
    case Kind::kMinSize:
      return "MinSize(" + std::to_string(bytes_) + ", " + std::to_string(shards_) + ")";
    case Kind::kMaxSize:
      return "MaxSize(" + std::to_string(bytes_) + ", " + std::to_string(shards_) + ")";
  }
  return "Invalid";
}

// ---------------------------------------------------------------------------
// VariablePlacement

int VariablePlacement::ShardOfRow(int64_t row) const {
  if (slices.empty() || row < 0 || row >= slices.back().row_end) return -1;
  // First slice whose row_begin > row, then step back one.
  auto it = std::upper_bound(slices.begin(), slices.end(), row,
                             [](int64_t r, const ShardSlice& s) { return r < s.row_begin; });
  if (it == slices.begin()) return -1;
  --it;
  return row < it->row_end ? it->shard : -1;
}

const ShardSlice* VariablePlacement::SliceOnShard(int shard) const {
  for (const ShardSlice& s : slices)
    if (s.shard == shard) return &s;
  return nullptr;
}

// ---------------------------------------------------------------------------
// PlacementPlanner

PlacementPlanner::PlacementPlanner(int num_shards)
    : num_shards_(num_shards), shard_bytes_(num_shards > 0 ? static_cast<size_t>(num_shards) : 0) {}

std::vector<int> PlacementPlanner::ShardsByLoad() const {
  std::vector<int> order(shard_bytes_.size());
  std::iota(order.begin(), order.end(), 0);
  std::sort(order.begin(), order.end(), [this](int a, int b) {
    const int64_t ba = shard_bytes_[static_cast<size_t>(a)];
    const int64_t bb = shard_bytes_[static_cast<size_t>(b)];
    return ba != bb ? ba < bb : a < b;
  });
  return order;
}

StatusOr<VariablePlacement> PlacementPlanner::Place(std::string_view name, DType dtype,
                                                    const Shape& shape,
                                                    const Partitioner& partitioner) {
  if (num_shards_ < 1)
    return InvalidArgumentError("cannot place variable " + Quoted(name) +
                                ": num_shards must be >= 1, got " + std::to_string(num_shards_));
  if (name.empty()) return InvalidArgumentError("cannot place a variable with an empty name");
  const std::string context = "variable " + Quoted(name);

  // Negative dimensions and element-count overflow.
  {
    StatusOr<Shape> checked = Shape::Make(shape.dims());
    if (!checked.ok()) return checked.status().WithContext(context + " " + shape.ToString());
  }
  __int128 elements = 0;
  if (!CheckedElements(shape, &elements) ||
      elements * static_cast<__int128>(DTypeSize(dtype)) > kInt64Max)
    return InvalidArgumentError(context + " " + Describe(dtype, shape) +
                                ": size in bytes overflows int64");

  if (auto it = entries_.find(name); it != entries_.end()) {
    const Entry& e = it->second;
    if (e.dtype == dtype && e.shape == shape) return e.placement;
    return AlreadyExistsError(context + " was already placed as " + Describe(e.dtype, e.shape) +
                              "; cannot place it again as " + Describe(dtype, shape));
  }

  DV_RETURN_IF_ERROR(partitioner.Validate().WithContext(context));

  const int64_t element_bytes = static_cast<int64_t>(DTypeSize(dtype));
  const int64_t rows = shape.rank() == 0 ? 1 : shape.dim(0);
  const int64_t row_bytes = shape.row_elements() * element_bytes;
  const int k = std::min(partitioner.NumPartitions(shape, dtype), num_shards_);
  const std::vector<int> order = ShardsByLoad();

  VariablePlacement placement;
  if (k <= 1) {
    placement.slices.push_back(ShardSlice{order[0], 0, rows});
  } else {
    const std::vector<int64_t> sizes = SplitRows(rows, k);
    int64_t begin = 0;
    for (int i = 0; i < k; ++i) {
      const int64_t end = begin + sizes[static_cast<size_t>(i)];
      placement.slices.push_back(ShardSlice{order[static_cast<size_t>(i)], begin, end});
      begin = end;
    }
  }
  for (const ShardSlice& s : placement.slices) {
    int64_t& held = shard_bytes_[static_cast<size_t>(s.shard)];
    // The whole variable fits in int64 bytes (checked above); saturate the
    // per-shard running total rather than overflow.
    const int64_t add = shape.rank() == 0 ? element_bytes : s.rows() * row_bytes;
    held = (held > kInt64Max - add) ? kInt64Max : held + add;
  }

  auto [it, inserted] = entries_.emplace(std::string(name), Entry{dtype, shape, placement});
  (void)inserted;
  return it->second.placement;
}

const VariablePlacement* PlacementPlanner::Find(std::string_view name) const {
  auto it = entries_.find(name);
  return it == entries_.end() ? nullptr : &it->second.placement;
}

}  // namespace distval
