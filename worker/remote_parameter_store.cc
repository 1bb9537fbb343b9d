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
  explicit RemoteParameterStore(std::unique_ptr<Client> client) : client_(std::move(client)) {
    pulled_ = std::make_shared<std::vector<PulledVariable>>();
  }

  Status CreateVariable(const std::string& name, const Shape& shape,
                        const VariableOptions& options) override {
    return client_->CreateVariable(name, DType::kF32, shape, options);
  }

  Status Pull(const std::vector<std::string>& variables,
              std::vector<PulledVariable>* out) override {
    // PullViews fills a shared vector (its reply callbacks point into it);
    // hand the views over afterwards. The frames stay alive through the
    // slices' owners.
    Status s = client_->PullViews(variables, pulled_).Wait();
    if (!s.ok()) {
      // A reply that still arrives may write into the old vector (its
      // callbacks keep it alive); never reuse it.
      pulled_ = std::make_shared<std::vector<PulledVariable>>();
      return s;
    }
    out->swap(*pulled_);
    pulled_->clear();
    return OkStatus();
  }

  Status Push(std::span<const PushSource> gradients) override {
    std::vector<PushSource> sources(gradients.begin(), gradients.end());
    return client_->Push(std::move(sources), /*advance_clock=*/true).Wait();
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
  std::shared_ptr<std::vector<PulledVariable>> pulled_;
};

}  // namespace

std::unique_ptr<ParameterStore> NewRemoteParameterStore(std::unique_ptr<Client> client) {
  return std::make_unique<RemoteParameterStore>(std::move(client));
}

}  // namespace distval
