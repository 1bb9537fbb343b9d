// ParameterStore over the parameter servers (a connected Client).
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "distval/parameter_store.h"
#include "distval/partitioner.h"
#include "distval/protocol.h"

namespace distval {

namespace {

class RemoteParameterStore final : public ParameterStore {
 public:
  explicit RemoteParameterStore(std::unique_ptr<Client> client) : client_(std::move(client)) {}

  Status CreateVariable(const std::string& name, const Shape& shape,
                        const VariableOptions& options) override {
    return client_->CreateVariable(name, DType::kF32, shape, options);
  }

  Status StartPull(const std::vector<std::string>& variables,
                   std::shared_ptr<std::vector<PulledVariable>> out, RequestHandle* done) override {
    // The reply callbacks write into *out (they keep it alive).
    *done = client_->PullViews(variables, std::move(out));
    return OkStatus();
  }

  Status StartPush(std::span<const PushSource> gradients, RequestHandle* done) override {
    std::vector<PushSource> sources(gradients.begin(), gradients.end());
    *done = client_->Push(std::move(sources), /*advance_clock=*/true);
    return OkStatus();
  }

  Status SetLearningRate(double learning_rate) override {
    return client_->SetLearningRate(learning_rate);
  }

  Status Barrier(const std::string& name) override { return client_->Barrier(name); }

  StatusOr<std::vector<double>> SumAcrossWorkers(const std::string& key,
                                                 std::span<const double> values) override {
    if (key.empty()) return InvalidArgumentError("SumAcrossWorkers: the key is empty");
    if (values.empty()) return std::vector<double>();
    const std::string name = "__distval/sum/" + key;
    const int shards = client_->num_shards();
    const int64_t k = static_cast<int64_t>(values.size());
    const Shape shape{shards, k};
    VariableOptions vo;
    vo.initializer = {0, protocol::InitZeros{}};
    vo.optimizer.kind = protocol::OptimizerKind::kSgd;
    vo.optimizer.learning_rate = 1.0;
    vo.aggregation = protocol::Aggregation::kSum;
    vo.staleness = protocol::kStalenessAsync;           // pushes apply at once, pulls never wait
    vo.partitioner = Partitioner::FixedShards(shards);  // one row on every shard
    const std::string who = "SumAcrossWorkers('" + key + "')";
    DV_RETURN_IF_ERROR(client_->CreateVariable(name, DType::kF32, shape, vo).WithContext(who));
    // The rate may have been changed by a SetLearningRate for every variable
    // (servers kept from an earlier job): one worker sets it back before the
    // first barrier.
    if (client_->options().worker_index == 0)
      DV_RETURN_IF_ERROR(client_->SetLearningRate(1.0, name).WithContext(who));
    const size_t n = static_cast<size_t>(shape.num_elements());
    std::vector<float> before(n), after(n), grad(n, 0.0f);
    DV_RETURN_IF_ERROR(client_->Barrier(name + "#read").WithContext(who));
    DV_RETURN_IF_ERROR(client_->Pull({{name, before}}).Wait().WithContext(who));
    DV_RETURN_IF_ERROR(client_->Barrier(name + "#push").WithContext(who));
    // SGD with rate 1: p -= g, so g = -values adds the values.
    for (size_t i = 0; i < values.size(); ++i) grad[i] = -static_cast<float>(values[i]);
    DV_RETURN_IF_ERROR(
        client_->Push({{name, grad}}, /*advance_clock=*/false).Wait().WithContext(who));
    DV_RETURN_IF_ERROR(client_->Barrier(name + "#sum").WithContext(who));
    DV_RETURN_IF_ERROR(client_->Pull({{name, after}}).Wait().WithContext(who));
    std::vector<double> sum(values.size());
    for (size_t i = 0; i < values.size(); ++i)
      sum[i] = static_cast<double>(after[i]) - static_cast<double>(before[i]);
    return sum;
  }

  int64_t clock() const override { return client_->clock(); }
  int64_t AcceptRollback() override { return client_->AcceptRollback(); }
  int64_t min_clock() const override { return client_->last_min_clock(); }
  Client* client() override { return client_.get(); }

  std::string Describe() const override {
    std::string s = "parameter servers ";
    const auto& eps = client_->options().ps_endpoints;
    for (size_t i = 0; i < eps.size(); ++i) s += (i ? "," : "") + eps[i];
    return s;
  }

 private:
  std::unique_ptr<Client> client_;
};

}  // namespace

std::unique_ptr<ParameterStore> NewRemoteParameterStore(std::unique_ptr<Client> client) {
  return std::make_unique<RemoteParameterStore>(std::move(client));
}

}  // namespace distval
