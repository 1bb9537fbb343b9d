// predict_saved_model MODEL_DIR INPUTS OUTPUTS: loads a saved model without
// parameter servers (LoadModel, local inference on cpu:0), predicts the rows
// of the tensor "inputs" in the safetensors file INPUTS and writes the
// outputs as the tensor "outputs" to the safetensors file OUTPUTS. Used by
// the save / load tests to predict in a fresh process.
#include <cstdio>
#include <string>
#include <vector>

#include "distval/model_saving.h"
#include "distval/safetensors.h"

namespace {

distval::Status Run(const std::string& model_dir, const std::string& inputs,
                    const std::string& outputs) {
  DV_ASSIGN_OR_RETURN(std::unique_ptr<distval::Model> model, distval::LoadModel(model_dir));
  DV_ASSIGN_OR_RETURN(distval::SafetensorsFile in, distval::ReadSafetensors(inputs));
  const distval::Tensor* x = in.Find("inputs");
  if (x == nullptr) return distval::InvalidArgumentError(inputs + " has no tensor 'inputs'");
  DV_ASSIGN_OR_RETURN(distval::Tensor y, model->Predict(*x));
  const std::vector<distval::SafetensorsEntry> out = {{"outputs", &y}};
  return distval::WriteSafetensors(outputs, out);
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 4) {
    std::fprintf(stderr, "usage: %s MODEL_DIR INPUTS.safetensors OUTPUTS.safetensors\n", argv[0]);
    return 2;
  }
  const distval::Status s = Run(argv[1], argv[2], argv[3]);
  if (!s.ok()) {
    std::fprintf(stderr, "predict_saved_model: %s\n", s.ToString().c_str());
    return 1;
  }
  return 0;
}
