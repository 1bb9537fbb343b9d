// In-process ParameterStore: ps::Optimizer and ps::InitializeRows over
// variables held in this process.
#include "distval/local_parameter_store.h"

#include <cmath>
#include <map>
#include <string>
#include <utility>
#include <vector>

#include "initializer.h"
#include "optimizer.h"

namespace distval {

namespace {

class LocalParameterStore final : public ParameterStore {
 public:
  Status CreateVariable(const std::string& name, const Shape& shape,
                        const VariableOptions& options) override {
    if (name.empty()) return InvalidArgumentError("variable name is empty");
    protocol::VariableSpec spec;
    spec.name = name;
    spec.dtype = DType::kF32;
    spec.shape = shape.dims();
    spec.initializer = options.initializer;
    spec.optimizer = options.optimizer;
    spec.aggregation = options.aggregation;
    spec.staleness = options.staleness;
    if (!options.initial_values.empty()) {
      if (static_cast<int64_t>(options.initial_values.size()) != shape.num_elements())
        return InvalidArgumentError("variable '" + name +
                                    "': " + std::to_string(options.initial_values.size()) +
                                    " initial values for shape " + shape.ToString());
      // What a server stores for a variable created with initial values.
      protocol::TensorRef ref;
      ref.frame = 1;
      ref.dtype = DType::kF32;
      ref.shape = shape.dims();
      spec.initializer.kind = protocol::InitValues{ref};
    }
    auto it = vars_.find(name);
    if (it != vars_.end()) {
      if (it->second.spec == spec) return OkStatus();
      return AlreadyExistsError("variable '" + name +
                                "' already exists with a different spec (shape, initializer, "
                                "optimizer, aggregation or staleness)");
    }
    Variable v;
    v.spec = spec;
    v.shape = shape;
    v.params = Tensor(DType::kF32, shape);
    std::span<float> out(v.params.data_as<float>(), static_cast<size_t>(shape.num_elements()));
    if (!options.initial_values.empty()) {
      std::copy(options.initial_values.begin(), options.initial_values.end(), out.begin());
    } else {
      const int64_t rows = shape.dims().empty() ? 1 : shape.rows();
      DV_RETURN_IF_ERROR(ps::InitializeRows(options.initializer, shape, {0, rows}, out)
                             .WithContext("variable '" + name + "'"));
    }
    DV_ASSIGN_OR_RETURN(v.optimizer, ps::Optimizer::Create(options.optimizer, shape));
    vars_.emplace(name, std::move(v));
    return OkStatus();
  }

  // Both complete before they return (*done stays an empty, OK handle).
  Status StartPull(const std::vector<std::string>& variables,
                   std::shared_ptr<std::vector<PulledVariable>> out, RequestHandle* done) override {
    *done = RequestHandle();
    out->clear();
    out->reserve(variables.size());
    for (const std::string& name : variables) {
      DV_ASSIGN_OR_RETURN(Variable * v, Find(name));
      PulledVariable pv;
      pv.name = name;
      pv.version = static_cast<uint64_t>(v->optimizer->step());
      PulledSlice slice;
      slice.row_begin = 0;
      slice.row_end = v->shape.dims().empty() ? 1 : v->shape.rows();
      slice.values = std::span<const float>(v->params.data_as<float>(),
                                            static_cast<size_t>(v->params.num_elements()));
      pv.slices.push_back(std::move(slice));
      out->push_back(std::move(pv));
    }
    return OkStatus();
  }

  Status StartPush(std::span<const PushSource> gradients, RequestHandle* done) override {
    *done = RequestHandle();
    // Validate everything first, as a server does.
    std::vector<Variable*> targets;
    targets.reserve(gradients.size());
    for (const PushSource& g : gradients) {
      DV_ASSIGN_OR_RETURN(Variable * v, Find(g.variable));
      if (static_cast<int64_t>(g.grad.size()) != v->params.num_elements())
        return InvalidArgumentError("push of '" + g.variable + "': gradient has " +
                                    std::to_string(g.grad.size()) + " floats, variable " +
                                    v->shape.ToString() + " has " +
                                    std::to_string(v->params.num_elements()));
      targets.push_back(v);
    }
    for (size_t i = 0; i < gradients.size(); ++i) {
      Variable& v = *targets[i];
      // One contributor: mean and sum aggregation both scale by 1.
      v.optimizer->BeginStep();
      v.optimizer->ApplyDense(v.params.data_as<float>(), gradients[i].grad.data(), 0,
                              v.params.num_elements(), /*grad_scale=*/1.0f, /*lr_scale=*/1.0f);
    }
    ++clock_;
    return OkStatus();
  }

  Status SetLearningRate(double learning_rate) override {
    if (!std::isfinite(learning_rate) || learning_rate < 0)
      return InvalidArgumentError("learning rate " + std::to_string(learning_rate) +
                                  " must be finite and >= 0");
    for (auto& [name, v] : vars_) {
      DV_RETURN_IF_ERROR(v.optimizer->SetLearningRate(learning_rate).WithContext(name));
    }
    return OkStatus();
  }

  // One process is the whole job.
  Status Barrier(const std::string&) override { return OkStatus(); }
  StatusOr<std::vector<double>> SumAcrossWorkers(const std::string& key,
                                                 std::span<const double> values) override {
    if (key.empty()) return InvalidArgumentError("SumAcrossWorkers: the key is empty");
    return std::vector<double>(values.begin(), values.end());
  }

  int64_t clock() const override { return clock_; }
  int64_t min_clock() const override { return clock_; }
  std::string Describe() const override { return "local (in-process variables)"; }

 private:
  struct Variable {
    protocol::VariableSpec spec;
    Shape shape;
    Tensor params;
    std::unique_ptr<ps::Optimizer> optimizer;
  };

  StatusOr<Variable*> Find(const std::string& name) {
    auto it = vars_.find(name);
    if (it == vars_.end()) return NotFoundError("variable '" + name + "' does not exist");
    return &it->second;
  }

  std::map<std::string, Variable> vars_;
  int64_t clock_ = 0;
};

}  // namespace

std::unique_ptr<ParameterStore> NewLocalParameterStore() {
  return std::make_unique<LocalParameterStore>();
}

}  // namespace distval
