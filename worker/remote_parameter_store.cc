// ParameterStore over the parameter servers (a connected Client).
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "distval/parameter_store.h"

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

  int64_t clock() const override { return client_->clock(); }
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
