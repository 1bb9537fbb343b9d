#include "distval/distributed_values.h"

#include <Eigen/Core>
#include <string>

namespace distval {

std::string_view ReduceOpName(ReduceOp op) {
  switch (op) {
    case ReduceOp::kSum:
      return "sum";
    case ReduceOp::kMean:
      return "mean";
  }
  return "unknown";
}

std::string_view VariableAggregationName(VariableAggregation aggregation) {
  switch (aggregation) {
    case VariableAggregation::kNone:
      return "none";
    case VariableAggregation::kSum:
      return "sum";
    case VariableAggregation::kMean:
      return "mean";
    case VariableAggregation::kOnlyFirstReplica:
      return "only_first_replica";
  }
  return "unknown";
}

namespace internal {

StatusOr<Tensor> ReduceTensors(ReduceOp op, std::span<const Tensor* const> values) {
  if (values.empty()) return InvalidArgumentError("reduce: no replica values to combine");
  const Tensor& first = *values[0];
  for (size_t r = 0; r < values.size(); ++r) {
    const Tensor& t = *values[r];
    if (t.dtype() != DType::kF32)
      return InvalidArgumentError("reduce: replica " + std::to_string(r) + " has a " +
                                  std::string(DTypeName(t.dtype())) +
                                  " tensor; only f32 tensors are reduced");
    if (t.shape() != first.shape())
      return InvalidArgumentError("reduce: replica " + std::to_string(r) + " has shape " +
                                  t.shape().ToString() + ", replica 0 has " +
                                  first.shape().ToString());
  }
  Tensor out(DType::kF32, first.shape());
  const Eigen::Index n = first.num_elements();
  Eigen::Map<Eigen::ArrayXf> acc(out.data_as<float>(), n);
  acc = Eigen::Map<const Eigen::ArrayXf>(first.data_as<float>(), n);
  for (size_t r = 1; r < values.size(); ++r)
    acc += Eigen::Map<const Eigen::ArrayXf>(values[r]->data_as<float>(), n);
  if (op == ReduceOp::kMean) acc /= static_cast<float>(values.size());
  return out;
}

}  // namespace internal
}  // namespace distval
