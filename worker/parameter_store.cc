#include "distval/parameter_store.h"

#include <memory>
#include <vector>

namespace distval {

Status ParameterStore::Pull(const std::vector<std::string>& variables,
                            std::vector<PulledVariable>* out) {
  // A fresh vector per pull: after a failure a late reply may still write
  // into the old one (its callbacks keep it alive).
  auto pulled = std::make_shared<std::vector<PulledVariable>>();
  RequestHandle done;
  DV_RETURN_IF_ERROR(StartPull(variables, pulled, &done));
  DV_RETURN_IF_ERROR(done.Wait());
  out->swap(*pulled);
  return OkStatus();
}

Status ParameterStore::Push(std::span<const PushSource> gradients) {
  RequestHandle done;
  DV_RETURN_IF_ERROR(StartPush(gradients, &done));
  return done.Wait();
}

}  // namespace distval
