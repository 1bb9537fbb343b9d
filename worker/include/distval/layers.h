// Layers of a small MLP, written once against Backend (distval/backend.h) so
// that they run on CPU and CUDA replicas alike.
//
// Model: one model object per replica. The user describes the architecture
// once (a Sequential of Dense and ReLU layers); the strategy makes one
// unbuilt copy per replica with Clone() and Build()s each copy on its
// replica's backend. A built model owns, on its device, its parameter values,
// its parameter gradients and its activations for up to max_batch rows, so N
// replicas run forward/backward in N threads at once without sharing
// anything; the strategy keeps their parameter values equal (mirrored) by
// copying the same pulled values into each.
//
//   Sequential model;
//   model.Add(std::make_unique<Dense>(784, 256))     // "dense_0"
//        .Add(std::make_unique<ReLU>())              // "relu_0"
//        .Add(std::make_unique<Dense>(256, 10));     // "dense_1"
//   // Variables to create on the parameter servers:
//   std::vector<ParameterSpec> specs = model.ParameterSpecs();
//   std::vector<Tensor> init = model.InitialValues(seed);
//   // Per replica:
//   std::unique_ptr<Sequential> replica = model.Clone();
//   DV_RETURN_IF_ERROR(replica->Build(backend, max_batch, 784));
//   DV_RETURN_IF_ERROR(replica->SetParameters(pulled_values));
//   SoftmaxCrossEntropy head;
//   DV_RETURN_IF_ERROR(head.Build(backend, max_batch, 10));
//   // Step:
//   DV_RETURN_IF_ERROR(replica->Forward(x, batch));
//   DV_RETURN_IF_ERROR(head.Forward(replica->output(), labels, batch));
//   DV_RETURN_IF_ERROR(head.Backward(labels, batch));
//   DV_RETURN_IF_ERROR(replica->Backward(x, head.grad(), batch));
//   for (const Parameter& p : replica->Parameters()) ... *p.grad ...
//
// Parameters are exposed as named tensors: "dense_0/kernel" [in, out] and
// "dense_0/bias" [out], in layer order, kernel before bias. Gradients are
// overwritten (not accumulated) by each Backward.
//
// Thread-safety: a layer or model object is used by one thread at a time
// (its replica's). Unbuilt methods that are const (ParameterSpecs,
// InitialValues, Clone, OutputFeatures) may be called concurrently.
// Lifetime: a built layer borrows its Backend, which must outlive it.
#ifndef DISTVAL_LAYERS_H_
#define DISTVAL_LAYERS_H_

#include <cstdint>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "distval/backend.h"
#include "distval/status.h"
#include "distval/tensor.h"

namespace distval {

// Name and shape of one parameter (a variable on the parameter servers).
struct ParameterSpec {
  std::string name;  // "dense_0/kernel"
  Shape shape;       // [in, out]
};

// One parameter of a built model on its device. The buffers are owned by the
// layer and stay valid (same address) for the life of the built layer.
struct Parameter {
  std::string name;
  Shape shape;
  DeviceBuffer* value = nullptr;  // kF32, shape.num_elements() elements
  DeviceBuffer* grad = nullptr;   // same size; written by Backward
};

// A layer of a feed-forward network over row-major [batch, features]
// activations.
class Layer {
 public:
  virtual ~Layer() = default;

  // "dense_0". Empty until set (Sequential::Add names unnamed layers).
  const std::string& name() const { return name_; }
  void set_name(std::string name) { name_ = std::move(name); }
  // "dense", "relu": the prefix of automatic names.
  virtual std::string_view type() const = 0;

  // An unbuilt copy with the same configuration and name.
  virtual std::unique_ptr<Layer> Clone() const = 0;

  // Keras's get_config(): the layer's constructor arguments as the text of
  // a JSON object (Dense: {"in":784,"out":256}; ReLU: {}), from which a
  // factory registered under type() rebuilds an equal layer (see
  // distval/model_saving.h). nullopt (the default) when the layer cannot be
  // described: Model::Save then fails naming the layer.
  virtual std::optional<std::string> GetConfig() const { return std::nullopt; }

  // Output features for `input_features` inputs; InvalidArgument (naming the
  // layer and both numbers) when the layer does not accept that many.
  virtual StatusOr<int> OutputFeatures(int input_features) const = 0;
  // Parameters, names prefixed with name() + "/". Known before Build.
  virtual std::vector<ParameterSpec> ParameterSpecs() const = 0;
  // Host initial values, in ParameterSpecs() order: a pure function of
  // `seed` and the parameter names (the same on every machine and device).
  virtual std::vector<Tensor> InitialValues(uint64_t seed) const = 0;

  // Allocates parameters (zero), gradients and activations on `backend` for
  // up to `max_batch` rows. Errors: InvalidArgument (bad sizes, input
  // features), FailedPrecondition when already built, allocation errors.
  virtual Status Build(Backend* backend, int max_batch, int input_features) = 0;
  bool built() const { return backend_ != nullptr; }
  // The backend given to Build (null before).
  Backend* backend() const { return backend_; }

  // output()[0, batch * out) = f(input), 1 <= batch <= max_batch. The input
  // stays borrowed until Backward returns.
  virtual Status Forward(const DeviceBuffer& input, int batch) = 0;
  virtual const DeviceBuffer& output() const = 0;
  // Given the same input and dL/d(output), writes the parameter gradients and,
  // when need_input_grad, input_grad() = dL/d(input).
  virtual Status Backward(const DeviceBuffer& input, const DeviceBuffer& grad_output, int batch,
                          bool need_input_grad) = 0;
  virtual const DeviceBuffer& input_grad() const = 0;

  // Parameters on the device (empty before Build and for layers without
  // parameters).
  virtual std::vector<Parameter> Parameters() = 0;

 protected:
  // Checks the common Build/Forward preconditions; sets backend_ on Build.
  Status BeginBuild(Backend* backend, int max_batch);
  Status CheckBatch(std::string_view op, int batch) const;

  Backend* backend_ = nullptr;  // Borrowed.
  int max_batch_ = 0;

 private:
  std::string name_;
};

// y = x * kernel + bias. kernel [in, out] Glorot-uniform initialized
// (limit sqrt(6 / (in + out))), bias [out] zeros.
class Dense final : public Layer {
 public:
  // in, out >= 1 (checked at Build).
  Dense(int in, int out) : in_(in), out_(out) {}

  std::string_view type() const override { return "dense"; }
  std::unique_ptr<Layer> Clone() const override;
  std::optional<std::string> GetConfig() const override;
  StatusOr<int> OutputFeatures(int input_features) const override;
  std::vector<ParameterSpec> ParameterSpecs() const override;
  std::vector<Tensor> InitialValues(uint64_t seed) const override;
  Status Build(Backend* backend, int max_batch, int input_features) override;
  Status Forward(const DeviceBuffer& input, int batch) override;
  const DeviceBuffer& output() const override { return output_; }
  Status Backward(const DeviceBuffer& input, const DeviceBuffer& grad_output, int batch,
                  bool need_input_grad) override;
  const DeviceBuffer& input_grad() const override { return input_grad_; }
  std::vector<Parameter> Parameters() override;

  int in() const { return in_; }
  int out() const { return out_; }

 private:
  int in_, out_;
  DeviceBuffer kernel_, bias_, kernel_grad_, bias_grad_;
  DeviceBuffer output_, input_grad_;
};

// y = max(x, 0) elementwise. No parameters.
class ReLU final : public Layer {
 public:
  ReLU() = default;

  std::string_view type() const override { return "relu"; }
  std::unique_ptr<Layer> Clone() const override;
  std::optional<std::string> GetConfig() const override { return std::string("{}"); }
  StatusOr<int> OutputFeatures(int input_features) const override;
  std::vector<ParameterSpec> ParameterSpecs() const override { return {}; }
  std::vector<Tensor> InitialValues(uint64_t) const override { return {}; }
  Status Build(Backend* backend, int max_batch, int input_features) override;
  Status Forward(const DeviceBuffer& input, int batch) override;
  const DeviceBuffer& output() const override { return output_; }
  Status Backward(const DeviceBuffer& input, const DeviceBuffer& grad_output, int batch,
                  bool need_input_grad) override;
  const DeviceBuffer& input_grad() const override { return input_grad_; }
  std::vector<Parameter> Parameters() override { return {}; }

 private:
  int features_ = 0;
  DeviceBuffer output_, input_grad_;
};

// Loss head: softmax cross-entropy of logits [batch, classes] against kI32
// labels [batch], mean over the batch. Owns probs, loss, grad and an accuracy
// counter on its device.
class SoftmaxCrossEntropy {
 public:
  SoftmaxCrossEntropy() = default;

  // Allocates for up to max_batch rows of `classes` logits. Errors as
  // Layer::Build.
  Status Build(Backend* backend, int max_batch, int classes);

  // probs() = softmax(logits), loss() = mean cross-entropy (device scalar).
  // Errors: those of Backend::SoftmaxCrossEntropyForward.
  Status Forward(const DeviceBuffer& logits, const DeviceBuffer& labels, int batch);
  // grad() = dLoss/dlogits of the last Forward = (probs - one_hot) / batch.
  Status Backward(const DeviceBuffer& labels, int batch);
  // Same with an explicit scale instead of 1 / batch (e.g. 1 / global batch
  // when replica gradients are summed rather than averaged).
  Status BackwardScaled(const DeviceBuffer& labels, int batch, float scale);
  // correct() = rows whose argmax matches the label (device scalar, float).
  Status CountCorrect(const DeviceBuffer& logits, const DeviceBuffer& labels, int batch);

  const DeviceBuffer& probs() const { return probs_; }
  const DeviceBuffer& loss() const { return loss_; }
  const DeviceBuffer& grad() const { return grad_; }
  const DeviceBuffer& correct() const { return correct_; }
  // Copies loss() / correct() to the host (waits for the device).
  StatusOr<float> LossValue();
  StatusOr<int64_t> CorrectValue();

 private:
  Status Check(std::string_view op, int batch) const;

  Backend* backend_ = nullptr;  // Borrowed.
  int max_batch_ = 0;
  int classes_ = 0;
  DeviceBuffer probs_, loss_, grad_, correct_;
};

// A stack of layers applied in order.
class Sequential {
 public:
  Sequential() = default;
  Sequential(Sequential&&) = default;
  Sequential& operator=(Sequential&&) = default;

  // Appends `layer` (not yet built). An unnamed layer is named
  // "<type>_<k>", k = number of layers of that type already added.
  Sequential& Add(std::unique_ptr<Layer> layer);

  // An unbuilt copy (same layers, names and configuration).
  std::unique_ptr<Sequential> Clone() const;

  size_t num_layers() const { return layers_.size(); }
  Layer& layer(size_t i) { return *layers_[i]; }
  const Layer& layer(size_t i) const { return *layers_[i]; }

  // Output features of the whole stack; errors name the layer.
  StatusOr<int> OutputFeatures(int input_features) const;
  std::vector<ParameterSpec> ParameterSpecs() const;
  // Sum of parameter elements.
  int64_t NumParameters() const;
  std::vector<Tensor> InitialValues(uint64_t seed) const;

  // Builds every layer on `backend`. InvalidArgument when the model is empty,
  // a parameter name repeats, or the feature sizes do not chain.
  Status Build(Backend* backend, int max_batch, int input_features);
  bool built() const { return backend_ != nullptr; }

  // output() = model(x) for x [batch, input_features] on the model's device.
  Status Forward(const DeviceBuffer& x, int batch);
  const DeviceBuffer& output() const { return layers_.back()->output(); }
  // Backward pass for the same x and batch as the last Forward, given
  // dL/d(output); writes every parameter gradient (the first layer's input
  // gradient is not computed).
  Status Backward(const DeviceBuffer& x, const DeviceBuffer& grad_output, int batch);

  // Every parameter, in ParameterSpecs() order (empty before Build).
  std::vector<Parameter> Parameters();
  // Copies host values into the parameters (order and shapes of
  // ParameterSpecs(); InvalidArgument naming the first mismatch).
  Status SetParameters(std::span<const Tensor> values);
  // Host copies of the parameter values / gradients.
  StatusOr<std::vector<Tensor>> GetParameters();
  StatusOr<std::vector<Tensor>> GetGradients();

 private:
  std::vector<std::unique_ptr<Layer>> layers_;
  Backend* backend_ = nullptr;  // Borrowed; set by Build.
};

}  // namespace distval

#endif  // DISTVAL_LAYERS_H_
