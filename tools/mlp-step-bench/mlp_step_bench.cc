// distval-mlp-step-bench: time of one training step of the reference MLP
// (784-256-128-10, ReLU, softmax cross-entropy) on one device: forward,
// loss, backward and every parameter gradient; no parameter server, no
// optimizer update. Used by tools/gpu-check to compare cpu:0 with cuda:0.
//
//   distval-mlp-step-bench --device cuda:0 --batch 4096 --steps 50
//   distval-mlp-step-bench --list-devices
//
// The batch lives on the device (uploaded once) unless --upload is given,
// which adds the host-to-device copy of the batch (inputs and labels) to
// every step. The device is synchronized before the clock starts and before
// it stops, so asynchronous backends are timed to completion. A cpu:N device
// is one replica: one thread.
//
// Output: one line,
//   device=cuda:0 batch=4096 steps=50 upload=0 ms_per_step=0.412 examples_per_s=9941747 loss=2.31
// Exit status: 0 on success, 1 on an error (printed to stderr), 2 on bad flags.
#include <CLI/CLI.hpp>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "distval/devices.h"
#include "distval/float_env.h"
#include "distval/layers.h"

namespace distval {
namespace {

constexpr int kIn = 784, kClasses = 10;

struct Options {
  std::string device = "cpu:0";
  int batch = 256;
  int steps = 20;
  int warmup = 3;
  bool upload = false;
  uint64_t seed = 1;
};

Status Run(const Options& opt) {
  const DeviceInventory inventory = ProbeDevices();
  DV_ASSIGN_OR_RETURN(std::vector<DeviceSpec> devices, ParseDevices(opt.device, inventory));
  if (devices.size() != 1)
    return InvalidArgumentError("--device takes one device, got " + opt.device);
  DV_ASSIGN_OR_RETURN(std::unique_ptr<Backend> backend, CreateBackend(devices[0]));
  Backend& be = *backend;

  Sequential model;
  model.Add(std::make_unique<Dense>(kIn, 256))
      .Add(std::make_unique<ReLU>())
      .Add(std::make_unique<Dense>(256, 128))
      .Add(std::make_unique<ReLU>())
      .Add(std::make_unique<Dense>(128, kClasses));
  DV_RETURN_IF_ERROR(model.Build(&be, opt.batch, kIn));
  DV_RETURN_IF_ERROR(model.SetParameters(model.InitialValues(opt.seed)));
  SoftmaxCrossEntropy head;
  DV_RETURN_IF_ERROR(head.Build(&be, opt.batch, kClasses));

  // A random batch (pixel-like inputs in [0, 1]).
  std::mt19937 rng(static_cast<uint32_t>(opt.seed));
  std::uniform_real_distribution<float> pixel(0.0f, 1.0f);
  std::uniform_int_distribution<int32_t> label(0, kClasses - 1);
  std::vector<float> xs(static_cast<size_t>(opt.batch) * kIn);
  std::vector<int32_t> ys(static_cast<size_t>(opt.batch));
  for (float& v : xs) v = pixel(rng);
  for (int32_t& v : ys) v = label(rng);
  DV_ASSIGN_OR_RETURN(DeviceBuffer x, be.Allocate(static_cast<int64_t>(xs.size())));
  DV_ASSIGN_OR_RETURN(DeviceBuffer y, be.Allocate(opt.batch, DType::kI32));
  auto upload = [&]() -> Status {
    DV_RETURN_IF_ERROR(be.CopyToDevice(xs.data(), x, static_cast<int64_t>(xs.size())));
    return be.CopyToDevice(ys.data(), y, opt.batch);
  };
  DV_RETURN_IF_ERROR(upload());

  auto step = [&]() -> Status {
    if (opt.upload) DV_RETURN_IF_ERROR(upload());
    DV_RETURN_IF_ERROR(model.Forward(x, opt.batch));
    DV_RETURN_IF_ERROR(head.Forward(model.output(), y, opt.batch));
    DV_RETURN_IF_ERROR(head.Backward(y, opt.batch));
    return model.Backward(x, head.grad(), opt.batch);
  };
  for (int i = 0; i < opt.warmup; ++i) DV_RETURN_IF_ERROR(step());
  DV_RETURN_IF_ERROR(be.Synchronize());

  const auto start = std::chrono::steady_clock::now();
  for (int i = 0; i < opt.steps; ++i) DV_RETURN_IF_ERROR(step());
  DV_RETURN_IF_ERROR(be.Synchronize());
  const double seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();

  DV_ASSIGN_OR_RETURN(float loss, head.LossValue());
  if (!std::isfinite(loss)) return InternalError("loss is not finite: " + std::to_string(loss));
  const double ms = 1e3 * seconds / opt.steps;
  std::printf(
      "device=%s batch=%d steps=%d upload=%d ms_per_step=%.4f examples_per_s=%.0f loss=%.4f\n",
      be.Name().c_str(), opt.batch, opt.steps, opt.upload ? 1 : 0, ms,
      opt.batch * opt.steps / seconds, loss);
  return OkStatus();
}

}  // namespace
}  // namespace distval

int main(int argc, char** argv) {
  distval::SetFlushDenormalsToZero();
  distval::Options opt;
  bool list_devices = false;
  CLI::App app{"Times one training step (forward + backward) of the 784-256-128-10 MLP."};
  app.add_option("--device", opt.device, "device to run on: cpu:N or cuda:N")
      ->capture_default_str();
  app.add_option("--batch", opt.batch, "examples per step")
      ->check(CLI::Range(1, 1 << 20))
      ->capture_default_str();
  app.add_option("--steps", opt.steps, "timed steps")
      ->check(CLI::Range(1, 1 << 20))
      ->capture_default_str();
  app.add_option("--warmup", opt.warmup, "untimed steps first")
      ->check(CLI::Range(0, 1 << 20))
      ->capture_default_str();
  app.add_flag("--upload", opt.upload, "copy the batch from host memory in every step");
  app.add_option("--seed", opt.seed, "seed of the parameters and the batch")->capture_default_str();
  app.add_flag("--list-devices", list_devices,
               "print the devices this machine has (\"cuda devices: N\") and exit");
  CLI11_PARSE(app, argc, argv);

  if (list_devices) {
    const distval::DeviceInventory inv = distval::ProbeDevices();
    std::printf("cpu replicas: %d\ncuda devices: %d\navailable: %s\n", inv.num_cpu_replicas_allowed,
                inv.num_cuda_devices, inv.ToString().c_str());
    return 0;
  }
  const distval::Status s = distval::Run(opt);
  if (!s.ok()) {
    std::fprintf(stderr, "distval-mlp-step-bench: %s\n", s.ToString().c_str());
    return 1;
  }
  return 0;
}
