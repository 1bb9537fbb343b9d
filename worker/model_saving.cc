#include "distval/model_saving.h"

#include <filesystem>
#include <fstream>
#include <sstream>
#include <system_error>
#include <utility>

#include "distval/atomic_file.h"
#include "distval/safetensors.h"

namespace distval {

namespace {

using nlohmann::json;

constexpr const char* kFormat = "distval.model";
constexpr int kVersion = 1;

std::string Num(int64_t v) { return std::to_string(v); }

json OptimizerToJson(const protocol::OptimizerSpec& o) {
  return json{{"kind", std::string(protocol::OptimizerKindName(o.kind))},
              {"learning_rate", o.learning_rate},
              {"momentum", o.momentum},
              {"nesterov", o.nesterov},
              {"beta1", o.beta1},
              {"beta2", o.beta2},
              {"epsilon", o.epsilon},
              {"weight_decay", o.weight_decay},
              {"initial_accumulator", o.initial_accumulator}};
}

// Throws nlohmann::json::exception for missing fields or wrong types (the
// caller turns it into DataLoss).
StatusOr<protocol::OptimizerSpec> OptimizerFromJson(const json& j) {
  protocol::OptimizerSpec o;
  DV_ASSIGN_OR_RETURN(o.kind, protocol::ParseOptimizerKind(j.at("kind").get<std::string>()));
  o.learning_rate = j.at("learning_rate").get<double>();
  o.momentum = j.at("momentum").get<double>();
  o.nesterov = j.at("nesterov").get<bool>();
  o.beta1 = j.at("beta1").get<double>();
  o.beta2 = j.at("beta2").get<double>();
  o.epsilon = j.at("epsilon").get<double>();
  o.weight_decay = j.at("weight_decay").get<double>();
  o.initial_accumulator = j.at("initial_accumulator").get<double>();
  return o;
}

std::string MetricKindName(Metric::Kind kind) {
  return kind == Metric::Kind::kAccuracy ? "accuracy" : "mean";
}

StatusOr<std::string> ReadText(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return NotFoundError("cannot open " + path);
  std::ostringstream s;
  s << in.rdbuf();
  if (in.bad()) return DataLossError("cannot read " + path);
  return std::move(s).str();
}

// The model described by `arch` with the tensors of `file`.
StatusOr<std::unique_ptr<Model>> BuildFromJson(const json& arch, SafetensorsFile file,
                                               const LoadOptions& options,
                                               const std::string& where) {
  if (!arch.is_object() || !arch.contains("format") || arch["format"] != kFormat)
    return InvalidArgumentError(where + ": not a distval model (\"format\" is not \"" + kFormat +
                                "\")");
  if (!arch.contains("version") || arch["version"] != kVersion)
    return InvalidArgumentError(where + ": unsupported version " +
                                (arch.contains("version") ? arch["version"].dump() : "none") +
                                " (this build reads version " + Num(kVersion) + ")");
  const LayerRegistry builtins = LayerRegistry::Builtins();
  const LayerRegistry& registry = options.layers != nullptr ? *options.layers : builtins;
  Sequential net;
  for (const json& l : arch.at("layers")) {
    const std::string type = l.at("type").get<std::string>();
    DV_ASSIGN_OR_RETURN(std::unique_ptr<Layer> layer, registry.Create(type, l.at("config")));
    layer->set_name(l.at("name").get<std::string>());
    net.Add(std::move(layer));
  }
  const int input_features = arch.at("input_features").get<int>();
  const std::vector<ParameterSpec> specs = net.ParameterSpecs();
  const json& saved = arch.at("parameters");
  if (saved.size() != specs.size())
    return DataLossError(where + ": " + Num(static_cast<int64_t>(saved.size())) +
                         " parameters listed, the layers have " +
                         Num(static_cast<int64_t>(specs.size())));
  auto values = std::make_shared<std::vector<Tensor>>();
  for (size_t i = 0; i < specs.size(); ++i) {
    const std::string& name = specs[i].name;
    if (saved[i].at("name").get<std::string>() != name)
      return DataLossError(where + ": parameter " + Num(static_cast<int64_t>(i)) + " is '" +
                           saved[i].at("name").get<std::string>() + "', the layers give '" + name +
                           "'");
    bool found = false;
    for (auto& [tname, tensor] : file.tensors) {
      if (tname != name) continue;
      if (tensor.shape() != specs[i].shape)
        return DataLossError(where + ": tensor '" + name + "' is " + tensor.shape().ToString() +
                             ", the layer needs " + specs[i].shape.ToString());
      values->push_back(std::move(tensor));
      found = true;
      break;
    }
    if (!found) return DataLossError(where + ": no tensor '" + name + "' in the variables file");
  }
  ModelBuildOptions mo;
  mo.input_features = input_features;
  mo.seed = arch.value("seed", uint64_t{0});
  mo.name_prefix = options.name_prefix;
  mo.initial_values = std::move(values);
  const int saved_max_batch = arch.value("max_batch", 0);
  mo.max_batch = options.max_batch;
  if (mo.max_batch == 0 && saved_max_batch > 0) {
    const int per_replica =
        options.strategy != nullptr ? options.strategy->per_replica_batch_size() : 0;
    mo.max_batch = std::max(saved_max_batch, per_replica);
  }
  std::unique_ptr<Model> model;
  if (options.strategy != nullptr) {
    DV_ASSIGN_OR_RETURN(model, Model::Create(*options.strategy, net, mo));
  } else {
    DV_ASSIGN_OR_RETURN(model, Model::CreateLocal(net, mo, options.devices));
  }
  const json& compile = arch.at("compile");
  if (!compile.is_null()) {
    DV_ASSIGN_OR_RETURN(protocol::OptimizerSpec optimizer,
                        OptimizerFromJson(compile.at("optimizer")));
    // Train on at the rate the model had when it was saved.
    optimizer.learning_rate = arch.value("learning_rate", optimizer.learning_rate);
    const json& loss = compile.at("loss");
    if (loss.at("name").get<std::string>() != Loss().name())
      return InvalidArgumentError(where + ": unknown loss " + loss.at("name").dump());
    std::vector<Metric> metrics;
    for (const json& m : compile.at("metrics")) {
      const std::string kind = m.at("kind").get<std::string>();
      if (kind != "accuracy" && kind != "mean")
        return InvalidArgumentError(where + ": unknown metric kind '" + kind + "'");
      metrics.push_back(Metric{kind == "accuracy" ? Metric::Kind::kAccuracy : Metric::Kind::kMean,
                               m.at("name").get<std::string>()});
    }
    DV_RETURN_IF_ERROR(model->Compile(
        optimizer, Loss::SparseCategoricalCrossentropy(loss.at("from_logits").get<bool>()),
        std::move(metrics)));
  }
  DV_RETURN_IF_ERROR(model->Build());
  return model;
}

}  // namespace

// ---- LayerRegistry ------------------------------------------------------------------

LayerRegistry LayerRegistry::Builtins() {
  LayerRegistry r;
  r.factories_["dense"] = [](const json& c) -> StatusOr<std::unique_ptr<Layer>> {
    if (!c.is_object() || !c.contains("in") || !c.contains("out") || !c["in"].is_number_integer() ||
        !c["out"].is_number_integer())
      return InvalidArgumentError("dense layer config " + c.dump() +
                                  " needs integers \"in\" and \"out\"");
    const int64_t in = c["in"].get<int64_t>(), out = c["out"].get<int64_t>();
    if (in < 1 || out < 1 || in > (int64_t{1} << 30) || out > (int64_t{1} << 30))
      return InvalidArgumentError("dense layer config " + c.dump() + ": sizes out of range");
    return std::unique_ptr<Layer>(
        std::make_unique<Dense>(static_cast<int>(in), static_cast<int>(out)));
  };
  r.factories_["relu"] = [](const json&) -> StatusOr<std::unique_ptr<Layer>> {
    return std::unique_ptr<Layer>(std::make_unique<ReLU>());
  };
  return r;
}

Status LayerRegistry::Register(const std::string& type, Factory factory) {
  if (type.empty()) return InvalidArgumentError("LayerRegistry: empty layer type");
  if (!factory) return InvalidArgumentError("LayerRegistry: no factory for '" + type + "'");
  if (!factories_.emplace(type, std::move(factory)).second)
    return AlreadyExistsError("LayerRegistry: layer type '" + type + "' is already registered");
  return OkStatus();
}

StatusOr<std::unique_ptr<Layer>> LayerRegistry::Create(const std::string& type,
                                                       const json& config) const {
  auto it = factories_.find(type);
  if (it == factories_.end()) {
    std::string known;
    for (const auto& [k, f] : factories_) known += (known.empty() ? "" : ", ") + k;
    return NotFoundError("no layer type '" + type + "' is registered (known: " + known +
                         "); register it in a LayerRegistry passed to LoadModel");
  }
  StatusOr<std::unique_ptr<Layer>> layer = it->second(config);
  if (layer.ok() && *layer == nullptr)
    return InternalError("the factory of layer type '" + type + "' returned null");
  return layer;
}

// ---- Save -------------------------------------------------------------------------------

StatusOr<json> ModelToJson(const Model& model) {
  json layers = json::array();
  const Sequential& net = model.layers();
  for (size_t i = 0; i < net.num_layers(); ++i) {
    const Layer& l = net.layer(i);
    const std::optional<std::string> config = l.GetConfig();
    if (!config.has_value())
      return UnimplementedError("layer '" + l.name() + "' (type '" + std::string(l.type()) +
                                "') has no GetConfig(): the model cannot be saved");
    json c = json::parse(*config, nullptr, /*allow_exceptions=*/false);
    if (c.is_discarded() || !c.is_object())
      return UnimplementedError("layer '" + l.name() + "': GetConfig() is not a JSON object");
    layers.push_back(
        json{{"type", std::string(l.type())}, {"name", l.name()}, {"config", std::move(c)}});
  }
  json params = json::array();
  for (const ParameterSpec& p : net.ParameterSpecs())
    params.push_back(json{{"name", p.name}, {"shape", p.shape.dims()}});
  json compile = nullptr;
  if (const auto& c = model.compile_options(); c.has_value()) {
    json metrics = json::array();
    for (const Metric& m : c->metrics)
      metrics.push_back(json{{"kind", MetricKindName(m.kind)}, {"name", m.name}});
    compile = json{{"optimizer", OptimizerToJson(c->optimizer)},
                   {"loss", {{"name", c->loss.name()}, {"from_logits", c->loss.from_logits}}},
                   {"metrics", std::move(metrics)}};
  }
  return json{{"format", kFormat},
              {"version", kVersion},
              {"input_features", model.input_features()},
              {"output_features", model.output_features()},
              {"max_batch", model.max_batch()},
              {"seed", model.build_options().seed},
              {"layers", std::move(layers)},
              {"parameters", std::move(params)},
              {"compile", std::move(compile)},
              {"learning_rate", model.learning_rate()},
              {"optimizer_state", "not saved"}};
}

Status Model::Save(const std::string& path) {
  DV_ASSIGN_OR_RETURN(json arch, ModelToJson(*this));
  DV_ASSIGN_OR_RETURN(std::vector<Tensor> weights, GetWeights());
  std::error_code ec;
  std::filesystem::create_directories(path, ec);
  if (ec)
    return PermissionDeniedError("Save: cannot create directory " + path + ": " + ec.message());
  if (!std::filesystem::is_directory(path, ec))
    return InvalidArgumentError("Save: " + path + " exists and is not a directory");
  const std::vector<ParameterSpec> specs = layers_.ParameterSpecs();
  std::vector<SafetensorsEntry> entries;
  for (size_t i = 0; i < specs.size(); ++i) entries.push_back({specs[i].name, &weights[i]});
  const std::string text = arch.dump(2);
  const std::string dir = std::filesystem::path(path).string();
  DV_RETURN_IF_ERROR(WriteSafetensors(dir + "/" + kModelVariablesFile, entries,
                                      {{"format", kFormat}, {"model", arch.dump()}}));
  return WriteFileAtomically(dir + "/" + kModelJsonFile, text + "\n");
}

// ---- Load -----------------------------------------------------------------------------

StatusOr<std::unique_ptr<Model>> LoadModel(const std::string& path, const LoadOptions& options) {
  std::error_code ec;
  const bool is_dir = std::filesystem::is_directory(path, ec);
  const std::string variables_path = is_dir ? path + "/" + kModelVariablesFile : path;
  DV_ASSIGN_OR_RETURN(SafetensorsFile file, ReadSafetensors(variables_path));
  std::string text;
  std::string where;
  if (is_dir) {
    where = path + "/" + kModelJsonFile;
    DV_ASSIGN_OR_RETURN(text, ReadText(where));
  } else {
    where = path + " (metadata)";
    auto it = file.metadata.find("model");
    if (it == file.metadata.end())
      return InvalidArgumentError(path +
                                  ": no \"model\" in the safetensors metadata (not a distval "
                                  "model; load a saved model's directory)");
    text = it->second;
  }
  const json arch = json::parse(text, nullptr, /*allow_exceptions=*/false);
  if (arch.is_discarded()) return DataLossError(where + ": not valid JSON");
  try {
    return BuildFromJson(arch, std::move(file), options, where);
  } catch (const json::exception& e) {
    return DataLossError(where + ": malformed model description (" + e.what() + ")");
  }
}

}  // namespace distval
