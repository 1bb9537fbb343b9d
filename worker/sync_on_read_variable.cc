#include "distval/sync_on_read_variable.h"

#include <algorithm>
#include <string>

namespace distval {

namespace {
std::string Num(int64_t v) { return std::to_string(v); }
}  // namespace

Status SyncOnReadVariable::AssignAdd(const ReplicaContext& ctx, std::span<const double> delta) {
  std::span<double> mine = local(ctx);
  if (delta.size() != mine.size())
    return InvalidArgumentError("SyncOnReadVariable('" + name_ +
                                "')::AssignAdd: " + Num(static_cast<int64_t>(delta.size())) +
                                " values for shape " + shape_.ToString());
  for (size_t i = 0; i < mine.size(); ++i) mine[i] += delta[i];
  return OkStatus();
}

Status SyncOnReadVariable::AssignAdd(const ReplicaContext& ctx, double delta) {
  return AssignAdd(ctx, std::span<const double>(&delta, 1));
}

Status SyncOnReadVariable::Assign(const ReplicaContext& ctx, std::span<const double> value) {
  std::span<double> mine = local(ctx);
  if (value.size() != mine.size())
    return InvalidArgumentError("SyncOnReadVariable('" + name_ +
                                "')::Assign: " + Num(static_cast<int64_t>(value.size())) +
                                " values for shape " + shape_.ToString());
  std::copy(value.begin(), value.end(), mine.begin());
  return OkStatus();
}

StatusOr<std::vector<double>> SyncOnReadVariable::Read() const {
  DV_RETURN_IF_ERROR(CheckCrossReplica("Read"));
  switch (aggregation_) {
    case VariableAggregation::kNone:
      return FailedPreconditionError(
          "SyncOnReadVariable('" + name_ +
          "') has aggregation none, so a cross-replica read cannot combine its replicas' "
          "values (create it with sum, mean or only_first_replica, or read one replica's value "
          "with replica_value())");
    case VariableAggregation::kOnlyFirstReplica:
      return values_.front();
    case VariableAggregation::kSum:
    case VariableAggregation::kMean: {
      std::vector<double> out(values_.front().size(), 0.0);
      for (const auto& v : values_) {
        for (size_t i = 0; i < out.size(); ++i) out[i] += v[i];
      }
      if (aggregation_ == VariableAggregation::kMean) {
        for (double& x : out) x /= static_cast<double>(values_.size());
      }
      return out;
    }
  }
  return InternalError("SyncOnReadVariable: unknown aggregation");
}

StatusOr<double> SyncOnReadVariable::ReadScalar() const {
  if (num_elements() != 1)
    return InvalidArgumentError("SyncOnReadVariable('" + name_ + "')::ReadScalar: shape " +
                                shape_.ToString() + " has " + Num(num_elements()) +
                                " elements, not 1");
  DV_ASSIGN_OR_RETURN(std::vector<double> v, Read());
  return v[0];
}

Status SyncOnReadVariable::Reset() {
  DV_RETURN_IF_ERROR(CheckCrossReplica("Reset"));
  for (auto& v : values_) std::fill(v.begin(), v.end(), 0.0);
  return OkStatus();
}

}  // namespace distval
