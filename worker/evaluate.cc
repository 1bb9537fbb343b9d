#include "distval/evaluate.h"

#include <algorithm>
#include <numeric>
#include <string>
#include <vector>

#include "distval/input_pipeline.h"

namespace distval {

StatusOr<EvalResult> Evaluate(Sequential& model, const Examples& examples, int batch_size,
                              int64_t limit) {
  if (!model.built()) return FailedPreconditionError("Evaluate: the model is not built");
  if (batch_size < 1)
    return InvalidArgumentError("Evaluate: batch_size must be >= 1 (got " +
                                std::to_string(batch_size) + ")");
  const int64_t n = limit >= 0 ? std::min(limit, examples.size()) : examples.size();
  DV_ASSIGN_OR_RETURN(const int classes,
                      model.OutputFeatures(static_cast<int>(examples.feature_size())));
  if (examples.num_classes > classes)
    return InvalidArgumentError("Evaluate: the examples have " +
                                std::to_string(examples.num_classes) +
                                " classes, the model outputs " + std::to_string(classes));
  Backend* backend = model.layer(0).backend();
  const int rows = static_cast<int>(std::min<int64_t>(batch_size, std::max<int64_t>(n, 1)));
  DV_ASSIGN_OR_RETURN(DeviceBatch batch,
                      DeviceBatch::Create(backend, rows, examples.feature_size()));
  SoftmaxCrossEntropy head;
  DV_RETURN_IF_ERROR(head.Build(backend, rows, classes));
  std::vector<int64_t> indices(static_cast<size_t>(rows));
  EvalResult result;
  double loss_sum = 0.0;
  for (int64_t start = 0; start < n; start += rows) {
    const int64_t count = std::min<int64_t>(rows, n - start);
    indices.resize(static_cast<size_t>(count));
    std::iota(indices.begin(), indices.end(), start);
    DV_RETURN_IF_ERROR(batch.Load(examples, indices));
    const int b = static_cast<int>(count);
    DV_RETURN_IF_ERROR(model.Forward(batch.features(), b));
    DV_RETURN_IF_ERROR(head.Forward(model.output(), batch.labels(), b));
    DV_RETURN_IF_ERROR(head.CountCorrect(model.output(), batch.labels(), b));
    DV_ASSIGN_OR_RETURN(const float loss, head.LossValue());
    DV_ASSIGN_OR_RETURN(const int64_t correct, head.CorrectValue());
    loss_sum += static_cast<double>(loss) * static_cast<double>(count);
    result.correct += correct;
    result.examples += count;
  }
  result.mean_loss = result.examples == 0 ? 0.0 : loss_sum / static_cast<double>(result.examples);
  return result;
}

}  // namespace distval
