// Evaluation of a built model on a dataset: mean loss and accuracy.
//
// Thread-safety: uses the model (and its backend) from the calling thread;
// the model must not be used concurrently.
#ifndef DISTVAL_EVALUATE_H_
#define DISTVAL_EVALUATE_H_

#include <cstdint>

#include "distval/dataset.h"
#include "distval/layers.h"
#include "distval/status.h"

namespace distval {

struct EvalResult {
  int64_t examples = 0;
  int64_t correct = 0;
  // Mean softmax cross-entropy over all examples.
  double mean_loss = 0.0;

  double accuracy() const {
    return examples == 0 ? 0.0 : static_cast<double>(correct) / static_cast<double>(examples);
  }
};

// Runs `model` (built, classifier over examples.num_classes classes) over
// every example in order, batch_size rows at a time (batch_size must not
// exceed the max_batch the model was built with). limit >= 0 evaluates only
// the first `limit` examples. Errors: InvalidArgument for a bad batch size or
// a feature/class mismatch; backend errors.
StatusOr<EvalResult> Evaluate(Sequential& model, const Examples& examples, int batch_size,
                              int64_t limit = -1);

}  // namespace distval

#endif  // DISTVAL_EVALUATE_H_
