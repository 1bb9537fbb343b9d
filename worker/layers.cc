#include "distval/layers.h"

#include <cmath>
#include <map>
#include <set>
#include <string>

#include "random.h"

namespace distval {

namespace {

std::string Num(int64_t v) { return std::to_string(v); }

// Host copy of a device parameter.
StatusOr<Tensor> ToHost(Backend& backend, const DeviceBuffer& buffer, const Shape& shape) {
  Tensor t(DType::kF32, shape);
  DV_RETURN_IF_ERROR(backend.CopyToHost(buffer, t.data_as<float>(), t.num_elements()));
  return t;
}

}  // namespace

// ---- Layer --------------------------------------------------------------

Status Layer::BeginBuild(Backend* backend, int max_batch) {
  const std::string who = "layer '" + name() + "'";
  if (backend == nullptr) return InvalidArgumentError(who + ": Build got a null backend");
  if (built())
    return FailedPreconditionError(who + " is already built on " + backend_->Name() +
                                   " (Clone() it for another replica)");
  if (max_batch < 1)
    return InvalidArgumentError(who + ": max_batch must be >= 1 (got " + Num(max_batch) + ")");
  backend_ = backend;
  max_batch_ = max_batch;
  return OkStatus();
}

Status Layer::CheckBatch(std::string_view op, int batch) const {
  if (!built())
    return FailedPreconditionError("layer '" + name() + "': " + std::string(op) + " before Build");
  if (batch < 1 || batch > max_batch_)
    return InvalidArgumentError("layer '" + name() + "': " + std::string(op) + " batch " +
                                Num(batch) + " is outside [1, " + Num(max_batch_) + "]");
  return OkStatus();
}

// ---- Dense --------------------------------------------------------------

std::unique_ptr<Layer> Dense::Clone() const {
  auto copy = std::make_unique<Dense>(in_, out_);
  copy->set_name(name());
  return copy;
}

std::optional<std::string> Dense::GetConfig() const {
  return "{\"in\":" + Num(in_) + ",\"out\":" + Num(out_) + "}";
}

StatusOr<int> Dense::OutputFeatures(int input_features) const {
  if (in_ < 1 || out_ < 1)
    return InvalidArgumentError("layer '" + name() + "': Dense(" + Num(in_) + ", " + Num(out_) +
                                ") needs in, out >= 1");
  if (input_features != in_)
    return InvalidArgumentError("layer '" + name() + "' expects " + Num(in_) +
                                " input features, got " + Num(input_features));
  return out_;
}

std::vector<ParameterSpec> Dense::ParameterSpecs() const {
  return {{name() + "/kernel", Shape{in_, out_}}, {name() + "/bias", Shape{out_}}};
}

std::vector<Tensor> Dense::InitialValues(uint64_t seed) const {
  std::vector<Tensor> values;
  Tensor kernel(DType::kF32, Shape{in_, out_});
  const std::string kernel_name = name() + "/kernel";
  internal::SplitMix64 rng(internal::DeriveSeed(seed, internal::HashName(kernel_name)));
  const float limit = std::sqrt(6.0f / static_cast<float>(in_ + out_));
  float* k = kernel.data_as<float>();
  for (int64_t i = 0; i < kernel.num_elements(); ++i)
    k[i] = limit * (2.0f * rng.NextFloat() - 1.0f);
  values.push_back(std::move(kernel));
  values.emplace_back(DType::kF32, Shape{out_});  // zeros
  return values;
}

Status Dense::Build(Backend* backend, int max_batch, int input_features) {
  DV_RETURN_IF_ERROR(OutputFeatures(input_features));
  DV_RETURN_IF_ERROR(BeginBuild(backend, max_batch));
  const int64_t kernel_n = int64_t{in_} * out_;
  DV_ASSIGN_OR_RETURN(kernel_, backend->Allocate(kernel_n));
  DV_ASSIGN_OR_RETURN(bias_, backend->Allocate(out_));
  DV_ASSIGN_OR_RETURN(kernel_grad_, backend->Allocate(kernel_n));
  DV_ASSIGN_OR_RETURN(bias_grad_, backend->Allocate(out_));
  DV_ASSIGN_OR_RETURN(output_, backend->Allocate(int64_t{max_batch} * out_));
  DV_ASSIGN_OR_RETURN(input_grad_, backend->Allocate(int64_t{max_batch} * in_));
  return OkStatus();
}

Status Dense::Forward(const DeviceBuffer& input, int batch) {
  DV_RETURN_IF_ERROR(CheckBatch("Forward", batch));
  // output[batch, out] = input[batch, in] * kernel[in, out] + bias.
  DV_RETURN_IF_ERROR(backend_->Gemm(false, false, batch, out_, in_, 1.0f, input, in_, kernel_, out_,
                                    0.0f, output_, out_));
  return backend_->BiasAdd(output_, bias_, batch, out_);
}

Status Dense::Backward(const DeviceBuffer& input, const DeviceBuffer& grad_output, int batch,
                       bool need_input_grad) {
  DV_RETURN_IF_ERROR(CheckBatch("Backward", batch));
  // kernel_grad[in, out] = input^T[in, batch] * grad_output[batch, out].
  DV_RETURN_IF_ERROR(backend_->Gemm(true, false, in_, out_, batch, 1.0f, input, in_, grad_output,
                                    out_, 0.0f, kernel_grad_, out_));
  DV_RETURN_IF_ERROR(backend_->BiasGrad(grad_output, batch, out_, bias_grad_));
  if (!need_input_grad) return OkStatus();
  // input_grad[batch, in] = grad_output[batch, out] * kernel^T[out, in].
  return backend_->Gemm(false, true, batch, in_, out_, 1.0f, grad_output, out_, kernel_, out_, 0.0f,
                        input_grad_, in_);
}

std::vector<Parameter> Dense::Parameters() {
  if (!built()) return {};
  return {{name() + "/kernel", Shape{in_, out_}, &kernel_, &kernel_grad_},
          {name() + "/bias", Shape{out_}, &bias_, &bias_grad_}};
}

// ---- ReLU ---------------------------------------------------------------

std::unique_ptr<Layer> ReLU::Clone() const {
  auto copy = std::make_unique<ReLU>();
  copy->set_name(name());
  return copy;
}

StatusOr<int> ReLU::OutputFeatures(int input_features) const {
  if (input_features < 1)
    return InvalidArgumentError("layer '" + name() + "' needs >= 1 input features, got " +
                                Num(input_features));
  return input_features;
}

Status ReLU::Build(Backend* backend, int max_batch, int input_features) {
  DV_ASSIGN_OR_RETURN(features_, OutputFeatures(input_features));
  DV_RETURN_IF_ERROR(BeginBuild(backend, max_batch));
  const int64_t n = int64_t{max_batch} * features_;
  DV_ASSIGN_OR_RETURN(output_, backend->Allocate(n));
  DV_ASSIGN_OR_RETURN(input_grad_, backend->Allocate(n));
  return OkStatus();
}

Status ReLU::Forward(const DeviceBuffer& input, int batch) {
  DV_RETURN_IF_ERROR(CheckBatch("Forward", batch));
  return backend_->ReluForward(input, output_, int64_t{batch} * features_);
}

Status ReLU::Backward(const DeviceBuffer& /*input*/, const DeviceBuffer& grad_output, int batch,
                      bool need_input_grad) {
  DV_RETURN_IF_ERROR(CheckBatch("Backward", batch));
  if (!need_input_grad) return OkStatus();
  return backend_->ReluBackward(output_, grad_output, input_grad_, int64_t{batch} * features_);
}

// ---- SoftmaxCrossEntropy -----------------------------------------------

Status SoftmaxCrossEntropy::Build(Backend* backend, int max_batch, int classes) {
  if (backend == nullptr) return InvalidArgumentError("SoftmaxCrossEntropy: null backend");
  if (backend_ != nullptr)
    return FailedPreconditionError("SoftmaxCrossEntropy is already built on " + backend_->Name());
  if (max_batch < 1 || classes < 1)
    return InvalidArgumentError("SoftmaxCrossEntropy: max_batch (" + Num(max_batch) +
                                ") and classes (" + Num(classes) + ") must be >= 1");
  const int64_t n = int64_t{max_batch} * classes;
  DV_ASSIGN_OR_RETURN(probs_, backend->Allocate(n));
  DV_ASSIGN_OR_RETURN(grad_, backend->Allocate(n));
  DV_ASSIGN_OR_RETURN(loss_, backend->Allocate(1));
  DV_ASSIGN_OR_RETURN(correct_, backend->Allocate(1));
  backend_ = backend;
  max_batch_ = max_batch;
  classes_ = classes;
  return OkStatus();
}

Status SoftmaxCrossEntropy::Check(std::string_view op, int batch) const {
  if (backend_ == nullptr)
    return FailedPreconditionError("SoftmaxCrossEntropy: " + std::string(op) + " before Build");
  if (batch < 1 || batch > max_batch_)
    return InvalidArgumentError("SoftmaxCrossEntropy: " + std::string(op) + " batch " + Num(batch) +
                                " is outside [1, " + Num(max_batch_) + "]");
  return OkStatus();
}

Status SoftmaxCrossEntropy::Forward(const DeviceBuffer& logits, const DeviceBuffer& labels,
                                    int batch) {
  DV_RETURN_IF_ERROR(Check("Forward", batch));
  return backend_->SoftmaxCrossEntropyForward(logits, labels, batch, classes_, probs_, loss_);
}

Status SoftmaxCrossEntropy::Backward(const DeviceBuffer& labels, int batch) {
  return BackwardScaled(labels, batch, 1.0f / static_cast<float>(batch));
}

Status SoftmaxCrossEntropy::BackwardScaled(const DeviceBuffer& labels, int batch, float scale) {
  DV_RETURN_IF_ERROR(Check("Backward", batch));
  return backend_->SoftmaxCrossEntropyBackward(probs_, labels, batch, classes_, scale, grad_);
}

Status SoftmaxCrossEntropy::CountCorrect(const DeviceBuffer& logits, const DeviceBuffer& labels,
                                         int batch) {
  DV_RETURN_IF_ERROR(Check("CountCorrect", batch));
  return backend_->CountCorrect(logits, labels, batch, classes_, correct_);
}

StatusOr<float> SoftmaxCrossEntropy::LossValue() {
  if (backend_ == nullptr) return FailedPreconditionError("SoftmaxCrossEntropy: not built");
  float v = 0.0f;
  DV_RETURN_IF_ERROR(backend_->CopyToHost(loss_, &v, 1));
  return v;
}

StatusOr<int64_t> SoftmaxCrossEntropy::CorrectValue() {
  if (backend_ == nullptr) return FailedPreconditionError("SoftmaxCrossEntropy: not built");
  float v = 0.0f;
  DV_RETURN_IF_ERROR(backend_->CopyToHost(correct_, &v, 1));
  return static_cast<int64_t>(std::llround(v));
}

// ---- Sequential ---------------------------------------------------------

Sequential& Sequential::Add(std::unique_ptr<Layer> layer) {
  if (layer->name().empty()) {
    int same_type = 0;
    for (const auto& l : layers_) same_type += l->type() == layer->type() ? 1 : 0;
    layer->set_name(std::string(layer->type()) + "_" + Num(same_type));
  }
  layers_.push_back(std::move(layer));
  return *this;
}

std::unique_ptr<Sequential> Sequential::Clone() const {
  auto copy = std::make_unique<Sequential>();
  for (const auto& l : layers_) copy->layers_.push_back(l->Clone());
  return copy;
}

StatusOr<int> Sequential::OutputFeatures(int input_features) const {
  if (layers_.empty()) return InvalidArgumentError("Sequential model has no layers");
  int features = input_features;
  for (const auto& l : layers_) {
    DV_ASSIGN_OR_RETURN(features, l->OutputFeatures(features));
  }
  return features;
}

std::vector<ParameterSpec> Sequential::ParameterSpecs() const {
  std::vector<ParameterSpec> specs;
  for (const auto& l : layers_) {
    for (ParameterSpec& s : l->ParameterSpecs()) specs.push_back(std::move(s));
  }
  return specs;
}

int64_t Sequential::NumParameters() const {
  int64_t n = 0;
  for (const ParameterSpec& s : ParameterSpecs()) n += s.shape.num_elements();
  return n;
}

std::vector<Tensor> Sequential::InitialValues(uint64_t seed) const {
  std::vector<Tensor> values;
  for (const auto& l : layers_) {
    for (Tensor& t : l->InitialValues(seed)) values.push_back(std::move(t));
  }
  return values;
}

Status Sequential::Build(Backend* backend, int max_batch, int input_features) {
  if (backend == nullptr) return InvalidArgumentError("Sequential: Build got a null backend");
  if (built()) return FailedPreconditionError("Sequential is already built on " + backend_->Name());
  DV_RETURN_IF_ERROR(OutputFeatures(input_features));
  std::set<std::string> names;
  for (const ParameterSpec& s : ParameterSpecs()) {
    if (!names.insert(s.name).second)
      return InvalidArgumentError("Sequential: parameter name '" + s.name +
                                  "' is used twice (give the layers distinct names)");
  }
  int features = input_features;
  for (const auto& l : layers_) {
    DV_RETURN_IF_ERROR(l->Build(backend, max_batch, features));
    DV_ASSIGN_OR_RETURN(features, l->OutputFeatures(features));
  }
  backend_ = backend;
  return OkStatus();
}

Status Sequential::Forward(const DeviceBuffer& x, int batch) {
  if (!built()) return FailedPreconditionError("Sequential: Forward before Build");
  const DeviceBuffer* input = &x;
  for (const auto& l : layers_) {
    DV_RETURN_IF_ERROR(l->Forward(*input, batch));
    input = &l->output();
  }
  return OkStatus();
}

Status Sequential::Backward(const DeviceBuffer& x, const DeviceBuffer& grad_output, int batch) {
  if (!built()) return FailedPreconditionError("Sequential: Backward before Build");
  const DeviceBuffer* grad = &grad_output;
  for (size_t i = layers_.size(); i-- > 0;) {
    const DeviceBuffer& input = i == 0 ? x : layers_[i - 1]->output();
    DV_RETURN_IF_ERROR(layers_[i]->Backward(input, *grad, batch, /*need_input_grad=*/i > 0));
    grad = &layers_[i]->input_grad();
  }
  return OkStatus();
}

std::vector<Parameter> Sequential::Parameters() {
  std::vector<Parameter> params;
  for (const auto& l : layers_) {
    for (Parameter& p : l->Parameters()) params.push_back(std::move(p));
  }
  return params;
}

Status Sequential::SetParameters(std::span<const Tensor> values) {
  if (!built()) return FailedPreconditionError("Sequential: SetParameters before Build");
  std::vector<Parameter> params = Parameters();
  if (values.size() != params.size())
    return InvalidArgumentError("Sequential: SetParameters got " + Num(values.size()) +
                                " tensors for " + Num(params.size()) + " parameters");
  for (size_t i = 0; i < params.size(); ++i) {
    if (values[i].dtype() != DType::kF32 || values[i].shape() != params[i].shape)
      return InvalidArgumentError("Sequential: value " + Num(i) + " for '" + params[i].name +
                                  "' is " + std::string(DTypeName(values[i].dtype())) +
                                  values[i].shape().ToString() + ", expected f32" +
                                  params[i].shape.ToString());
  }
  for (size_t i = 0; i < params.size(); ++i) {
    DV_RETURN_IF_ERROR(backend_->CopyToDevice(values[i].data_as<float>(), *params[i].value,
                                              values[i].num_elements()));
  }
  return OkStatus();
}

StatusOr<std::vector<Tensor>> Sequential::GetParameters() {
  if (!built()) return FailedPreconditionError("Sequential: GetParameters before Build");
  std::vector<Tensor> out;
  for (const Parameter& p : Parameters()) {
    DV_ASSIGN_OR_RETURN(Tensor t, ToHost(*backend_, *p.value, p.shape));
    out.push_back(std::move(t));
  }
  return out;
}

StatusOr<std::vector<Tensor>> Sequential::GetGradients() {
  if (!built()) return FailedPreconditionError("Sequential: GetGradients before Build");
  std::vector<Tensor> out;
  for (const Parameter& p : Parameters()) {
    DV_ASSIGN_OR_RETURN(Tensor t, ToHost(*backend_, *p.grad, p.shape));
    out.push_back(std::move(t));
  }
  return out;
}

}  // namespace distval
