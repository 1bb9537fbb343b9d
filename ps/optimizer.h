// Server-side optimizers: the update rules a parameter-server shard applies to
// a pushed gradient, with their state ("slots") kept beside the parameters.
//
// Every rule is written as Eigen array expressions over contiguous float
// buffers (processed in cache-sized chunks), never as element-by-element
// loops. The definitions follow Keras / TensorFlow 2. With g = grad_scale *
// grad and lr = learning_rate * lr_scale:
//
//   sgd:       p -= lr * g
//   momentum:  v = momentum * v - lr * g
//              p += v                                (nesterov = false)
//              p += momentum * v - lr * g            (nesterov = true, new v)
//   adagrad:   a += g^2                              (a starts at initial_accumulator)
//              p -= lr * g / (sqrt(a) + epsilon)
//   adam:      t = step (advanced by BeginStep(), first step is 1)
//              m = beta1 * m + (1 - beta1) * g
//              v = beta2 * v + (1 - beta2) * g^2
//              p -= lr * sqrt(1 - beta2^t) / (1 - beta1^t) * m / (sqrt(v) + epsilon)
//   adamw:     p -= lr * weight_decay * p   (decoupled decay, before the Adam step,
//              using the value of p before this update), then adam as above.
//
// epsilon is added outside the square root and is not bias-corrected (the
// Keras / TF kernel form). weight_decay is only meaningful for adamw and is
// rejected (InvalidArgument) for the other kinds, so that "adam with weight
// decay" cannot silently mean either L2 regularization or decoupled decay.
//
// Sparse (row) updates are "lazy": only the rows named in the update change,
// both in the parameters and in the slots (as TensorFlow's LazyAdam /
// PyTorch's SparseAdam). Rows that appear several times in one update have
// their gradients summed first and are updated once. For sgd and adagrad lazy
// and dense updates of a zero gradient are the same; for momentum, adam and
// adamw the untouched rows simply keep their state until they next appear.
// The step counter t is per optimizer (per variable shard), shared by dense
// and sparse applies.
//
// Thread-safety: an Optimizer is not internally synchronized. ApplyDense and
// ApplyRows calls may run concurrently with each other when they touch
// disjoint elements (disjoint [begin, end) ranges, disjoint row sets), because
// they only read the optimizer's scalars and write the params and slot
// elements they are given. BeginStep, SetLearningRate, set_step and writes
// through Slots() must not overlap any apply (the VariableStore holds the
// variable's exclusive lock around all of them).
#ifndef DISTVAL_PS_OPTIMIZER_H_
#define DISTVAL_PS_OPTIMIZER_H_

#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <utility>
#include <vector>

#include "distval/protocol.h"
#include "distval/status.h"
#include "distval/tensor.h"

namespace distval::ps {

// "sgd", "momentum", "adagrad", "adam", "adamw".
std::string_view OptimizerName(protocol::OptimizerKind kind);

// Checks the fields of `spec` that its kind uses: learning_rate finite and
// >= 0; momentum in [0, 1) (momentum); beta1, beta2 in [0, 1) (adam, adamw);
// epsilon finite and > 0 (adagrad, adam, adamw); initial_accumulator finite
// and >= 0 (adagrad); weight_decay finite and >= 0, and 0 unless adamw.
// Returns InvalidArgument naming the field and its value; an unknown kind is
// InvalidArgument as well.
Status ValidateOptimizerSpec(const protocol::OptimizerSpec& spec);

class Optimizer {
 public:
  // Creates the optimizer for one shard of a variable whose shard-local
  // parameter buffer has shape `shard_shape` (row-major; rows along axis 0).
  // Slots are allocated with that same shape (64-byte aligned, zeroed; the
  // adagrad accumulator filled with initial_accumulator). Errors: those of
  // ValidateOptimizerSpec.
  static StatusOr<std::unique_ptr<Optimizer>> Create(const protocol::OptimizerSpec& spec,
                                                     const Shape& shard_shape);

  virtual ~Optimizer() = default;
  Optimizer(const Optimizer&) = delete;
  Optimizer& operator=(const Optimizer&) = delete;

  // Starts one logical update: advances the step counter (used by adam's
  // bias correction) by one. Call it exactly once per update, before the
  // ApplyDense / ApplyRows calls (possibly several, possibly concurrent) that
  // make up that update. Not thread-safe against applies.
  void BeginStep();

  // Applies the update to elements [begin, end) of the shard-local buffer,
  // reading parameters from `params_in` and writing them to `params_out`
  // (both point at element 0 of the shard buffer; they may be the same
  // pointer for an in-place update, but must not otherwise overlap).
  // `grad` points at the gradient of element `begin` (end - begin floats).
  // grad_scale multiplies the gradient (1 / contributors for mean
  // aggregation); lr_scale multiplies the learning rate (staleness-aware
  // factor, 1 by default). Preconditions: 0 <= begin <= end <= num_elements(),
  // BeginStep() called at least once. Safe to call concurrently on disjoint
  // ranges.
  void ApplyDense(const float* params_in, float* params_out, const float* grad, int64_t begin,
                  int64_t end, float grad_scale, float lr_scale);
  // In-place form of the above.
  void ApplyDense(float* params, const float* grad, int64_t begin, int64_t end, float grad_scale,
                  float lr_scale) {
    ApplyDense(params, params, grad, begin, end, grad_scale, lr_scale);
  }

  // Sparse update of whole rows of the shard-local buffer `params` (in place):
  // grad_rows holds local_rows.size() rows of row_elements() floats, row i
  // being the gradient of local row local_rows[i]. Duplicate rows: their
  // gradients are summed and the row is updated once. Only the listed rows
  // (params and slots) change. Preconditions: every local row in
  // [0, num_rows()) (the VariableStore validates), BeginStep() called. Safe to
  // call concurrently with other applies on disjoint rows.
  void ApplyRows(float* params, std::span<const int64_t> local_rows, const float* grad_rows,
                 float grad_scale, float lr_scale);

  // The base learning rate (before lr_scale). SetLearningRate returns
  // InvalidArgument (state unchanged) for a negative or non-finite value.
  double learning_rate() const { return learning_rate_; }
  [[nodiscard]] Status SetLearningRate(double learning_rate);

  // Number of BeginStep() calls so far (or the value restored by set_step).
  int64_t step() const { return step_; }
  // Restores the step counter from a checkpoint (>= 0).
  void set_step(int64_t step);

  // The optimizer state, for checkpoints: (name, tensor) pairs in a fixed
  // order, tensors shaped like the shard's parameters and owned by the
  // optimizer. Names: momentum "velocity"; adagrad "accumulator"; adam and
  // adamw "m", "v"; sgd none. A checkpoint restore may overwrite the tensors'
  // contents (not their shape).
  std::vector<std::pair<std::string, Tensor*>> Slots();
  std::vector<std::pair<std::string, const Tensor*>> Slots() const;
  // Bytes held by the slots.
  size_t SlotBytes() const;

  const protocol::OptimizerSpec& spec() const { return spec_; }
  protocol::OptimizerKind kind() const { return spec_.kind; }
  int64_t num_elements() const { return num_elements_; }
  int64_t row_elements() const { return row_elements_; }
  int64_t num_rows() const { return row_elements_ == 0 ? 0 : num_elements_ / row_elements_; }

 protected:
  Optimizer(const protocol::OptimizerSpec& spec, const Shape& shard_shape);

  // Adds a slot tensor shaped like the parameters, filled with `fill`.
  float* AddSlot(std::string name, float fill);

  // The rule itself over n contiguous elements: p_in/p_out/g/slots already
  // offset to the first element `offset`. `lr` is learning_rate * lr_scale,
  // g must be multiplied by grad_scale. Called on chunks of at most kChunk
  // elements so that the several array statements of a rule stay in cache.
  virtual void ApplyChunk(const float* p_in, float* p_out, const float* g, int64_t offset,
                          int64_t n, float grad_scale, double lr) = 0;

  // Recomputes step-dependent constants (after BeginStep / set_step).
  virtual void OnStepChanged() {}

  static constexpr int64_t kChunk = 2048;

  protocol::OptimizerSpec spec_;
  double learning_rate_;
  int64_t step_ = 0;
  int64_t num_elements_;
  int64_t row_elements_;
  Shape shard_shape_;
  std::vector<std::pair<std::string, Tensor>> slots_;
};

}  // namespace distval::ps

#endif  // DISTVAL_PS_OPTIMIZER_H_
