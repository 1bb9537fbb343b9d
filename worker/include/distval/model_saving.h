// Saving and loading models (tf's model.save / tf.keras.models.load_model).
//
// Model::Save(path) writes a directory:
//   path/model.json            the architecture and the compile settings:
//     {"format": "distval.model", "version": 1, "name": ..., "input_features": 784,
//      "output_features": 10, "max_batch": 256, "seed": 1,
//      "layers": [{"type": "dense", "name": "dense_0", "config": {"in": 784, "out": 256}},
//                 {"type": "relu", "name": "relu_0", "config": {}}, ...],
//      "parameters": [{"name": "dense_0/kernel", "shape": [784, 256]}, ...],
//      "compile": {"optimizer": {"kind": "adam", "learning_rate": 0.001, ...},
//                  "loss": {"name": "sparse_categorical_crossentropy", "from_logits": true},
//                  "metrics": [{"kind": "accuracy", "name": "accuracy"}]} | null,
//      "learning_rate": 0.001, "optimizer_state": "not saved"}
//   path/variables.safetensors every parameter (the names of "parameters",
//     without the model's name_prefix), f32, as the servers held them; its
//     __metadata__ holds "format": "distval.model" and "model": the text of
//     model.json, so the file alone describes the model.
// Each file is written atomically (temp file, fsync, rename). The optimizer
// state (slots, step counter) stays on the servers and is not saved: a
// loaded model trains on with fresh optimizer state.
//
// LoadModel(path, options) rebuilds the model: under a strategy (its
// variables are created on the servers with the saved values as initial
// values), or without one (an in-process strategy: local inference or
// training). Compile settings are restored, so the model trains on without
// a new Compile.
//
// Layers are rebuilt from their type and config (Layer::GetConfig) by a
// LayerRegistry: the built-in one knows "dense" and "relu"; register your
// own layer types to load models that use them.
//
// Thread-safety: LayerRegistry is a value; const methods may be called
// concurrently. LoadModel is thread-safe for different strategies.
#ifndef DISTVAL_MODEL_SAVING_H_
#define DISTVAL_MODEL_SAVING_H_

#include <functional>
#include <map>
#include <memory>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "distval/layers.h"
#include "distval/model.h"
#include "distval/parameter_server_strategy.h"
#include "distval/status.h"

namespace distval {

// File names inside a saved model's directory.
inline constexpr const char* kModelJsonFile = "model.json";
inline constexpr const char* kModelVariablesFile = "variables.safetensors";

// Builds layers from (type, config).
class LayerRegistry {
 public:
  // Makes an unbuilt layer from its GetConfig() JSON object; errors are
  // InvalidArgument naming the bad field.
  using Factory = std::function<StatusOr<std::unique_ptr<Layer>>(const nlohmann::json& config)>;

  // An empty registry.
  LayerRegistry() = default;
  // A registry that knows "dense" ({"in": N, "out": M}) and "relu" ({}).
  static LayerRegistry Builtins();

  // AlreadyExists when `type` is registered; InvalidArgument for an empty
  // type or factory.
  Status Register(const std::string& type, Factory factory);
  // The layer of `type` built from `config`. NotFound naming the type and
  // listing the registered ones; the factory's errors.
  StatusOr<std::unique_ptr<Layer>> Create(const std::string& type,
                                          const nlohmann::json& config) const;

 private:
  std::map<std::string, Factory> factories_;
};

struct LoadOptions {
  // Load under this strategy (borrowed; must outlive the model): the saved
  // values become the variables' initial values on its servers. Null: the
  // model gets its own in-process strategy on `devices`.
  ParameterServerStrategy* strategy = nullptr;
  std::vector<std::string> devices = {"cpu:0"};
  // Prefix of the variable names (under a strategy that already has a model
  // with the same names, e.g. "restored/").
  std::string name_prefix;
  // 0: the saved max_batch, raised to the strategy's per-replica batch.
  int max_batch = 0;
  // Builds the layers; null: LayerRegistry::Builtins().
  const LayerRegistry* layers = nullptr;
};

// Loads the model saved in the directory `path` (or, when `path` names a
// file, that variables.safetensors alone, whose metadata holds the
// architecture). The model is compiled as it was saved (when it was),
// with the saved learning rate, and built (its variables exist). Errors:
// NotFound (naming the file) when the files are missing; DataLoss for a
// malformed file (the safetensors reader's errors, bad JSON, a parameter
// missing from the tensors or of another shape, naming it); InvalidArgument
// for an unknown format or version; the registry's, Model::Create's,
// Compile's and Build's errors.
StatusOr<std::unique_ptr<Model>> LoadModel(const std::string& path,
                                           const LoadOptions& options = {});

// The architecture and compile settings of `model` as model.json holds them.
// Errors: Unimplemented for a layer whose GetConfig() is nullopt or not a
// JSON object (naming the layer).
StatusOr<nlohmann::json> ModelToJson(const Model& model);

}  // namespace distval

#endif  // DISTVAL_MODEL_SAVING_H_
