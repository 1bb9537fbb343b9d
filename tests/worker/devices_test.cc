#include "distval/devices.h"

#include <gtest/gtest.h>

#include <string>

namespace distval {
namespace {

const DeviceInventory kTwoCpusOneGpu{/*num_cpu_replicas_allowed=*/2, /*num_cuda_devices=*/1};

bool Contains(const Status& s, const std::string& text) {
  return s.message().find(text) != std::string::npos;
}

TEST(DevicesTest, ParsesAListInOrder) {
  auto devices = ParseDevices("cuda:0, cpu:1,cpu:0", kTwoCpusOneGpu);
  ASSERT_TRUE(devices.ok()) << devices.status();
  ASSERT_EQ(devices->size(), 3u);
  EXPECT_EQ((*devices)[0], (DeviceSpec{DeviceKind::kCuda, 0}));
  EXPECT_EQ((*devices)[1], (DeviceSpec{DeviceKind::kCpu, 1}));
  EXPECT_EQ((*devices)[2], (DeviceSpec{DeviceKind::kCpu, 0}));
  EXPECT_EQ((*devices)[0].ToString(), "cuda:0");
}

TEST(DevicesTest, MissingDeviceIsNamedWithWhatExists) {
  auto r = ParseDevices("cpu:0,cuda:3", kTwoCpusOneGpu);
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(r.status().message(),
            "device \"cuda:3\" does not exist; available: cpu:0, cpu:1, cuda:0");
  r = ParseDevices("cpu:2", kTwoCpusOneGpu);
  EXPECT_TRUE(Contains(r.status(), "\"cpu:2\" does not exist")) << r.status();
  r = ParseDevices("cuda:0", DeviceInventory{1, 0});
  EXPECT_TRUE(Contains(r.status(), "\"cuda:0\" does not exist; available: cpu:0")) << r.status();
}

TEST(DevicesTest, RepeatedDeviceIsRejected) {
  auto r = ParseDevices("cpu:0,cpu:1,cpu:0", kTwoCpusOneGpu);
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), StatusCode::kInvalidArgument);
  EXPECT_TRUE(Contains(r.status(), "\"cpu:0\" is listed more than once")) << r.status();
  EXPECT_TRUE(Contains(r.status(), "available: cpu:0, cpu:1, cuda:0")) << r.status();
}

TEST(DevicesTest, EmptyListsAndEntriesAreRejected) {
  for (const char* list : {"", "   "}) {
    auto r = ParseDevices(list, kTwoCpusOneGpu);
    ASSERT_FALSE(r.ok());
    EXPECT_EQ(r.status().code(), StatusCode::kInvalidArgument);
    EXPECT_EQ(r.status().message(), "device list is empty; available: cpu:0, cpu:1, cuda:0");
  }
  auto r = ParseDevices("cpu:0,,cpu:1", kTwoCpusOneGpu);
  EXPECT_TRUE(Contains(r.status(), "empty entry")) << r.status();
  r = ParseDevices("cpu:0,", kTwoCpusOneGpu);
  EXPECT_TRUE(Contains(r.status(), "empty entry")) << r.status();
}

TEST(DevicesTest, MalformedNamesAreRejected) {
  for (const char* name : {"cpu", "gpu:0", "tpu:1", "cpu:", "cpu:-1", "cpu:01", "cpu:1x", "CPU:0",
                           "cuda:0:1", "cpu :0"}) {
    auto r = ParseDevices(name, kTwoCpusOneGpu);
    ASSERT_FALSE(r.ok()) << name;
    EXPECT_EQ(r.status().code(), StatusCode::kInvalidArgument) << name;
    EXPECT_TRUE(Contains(r.status(), "malformed device name \"" + std::string(name) + "\""))
        << r.status();
    EXPECT_TRUE(Contains(r.status(), "available: cpu:0, cpu:1, cuda:0")) << r.status();
  }
  EXPECT_TRUE(Contains(ParseDevices("gpu:0", kTwoCpusOneGpu).status(), "cuda:N"));
}

TEST(DevicesTest, ProbeFindsAtLeastOneCpu) {
  const DeviceInventory inv = ProbeDevices();
  EXPECT_GE(inv.num_cpu_replicas_allowed, 1);
  EXPECT_GE(inv.num_cuda_devices, 0);
  auto r = ParseDevices("cpu:0", inv);
  EXPECT_TRUE(r.ok()) << r.status();
}

TEST(DevicesTest, CreateBackend) {
  auto cpu = CreateBackend({DeviceKind::kCpu, 1});
  ASSERT_TRUE(cpu.ok()) << cpu.status();
  EXPECT_EQ((*cpu)->Name(), "cpu:1");
  EXPECT_EQ(CreateBackend({DeviceKind::kCpu, -1}).status().code(), StatusCode::kInvalidArgument);
  if (ProbeDevices().num_cuda_devices == 0) {
    // Built without CUDA: FailedPrecondition naming the device. With CUDA but
    // no GPU: the device does not exist.
    auto gpu = CreateBackend({DeviceKind::kCuda, 0});
    ASSERT_FALSE(gpu.ok());
    EXPECT_TRUE(gpu.status().code() == StatusCode::kFailedPrecondition ||
                gpu.status().code() == StatusCode::kInvalidArgument)
        << gpu.status();
    EXPECT_TRUE(Contains(gpu.status(), "cuda:0")) << gpu.status();
  }
}

// On a machine without a usable GPU (this one in CI), asking for cuda:0
// fails early and says what exists, whether or not CUDA was built in.
TEST(DevicesTest, WithoutAGpuCudaDevicesAreRejectedClearly) {
  const DeviceInventory inv = ProbeDevices();
  if (inv.num_cuda_devices > 0) GTEST_SKIP() << "this machine has a GPU";
  auto r = ParseDevices("cuda:0", inv);
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), StatusCode::kInvalidArgument);
  EXPECT_TRUE(Contains(r.status(), "device \"cuda:0\" does not exist; available: cpu:0"))
      << r.status();
  const std::string& msg = r.status().message();
  EXPECT_EQ(msg.find("cuda", msg.find("available:")), std::string::npos) << msg;  // none listed

  auto gpu = CreateBackend({DeviceKind::kCuda, 0});
  ASSERT_FALSE(gpu.ok());
#if DISTVAL_TEST_CUDA_BUILT
  EXPECT_EQ(gpu.status().code(), StatusCode::kInvalidArgument) << gpu.status();
  EXPECT_EQ(gpu.status().message(),
            "device \"cuda:0\" does not exist; this machine shows 0 CUDA device(s)");
#else
  EXPECT_EQ(gpu.status().code(), StatusCode::kFailedPrecondition) << gpu.status();
  EXPECT_TRUE(Contains(gpu.status(), "device cuda:0: this distval was built without CUDA"))
      << gpu.status();
#endif
  // Asking again gives the same answer (the probe is cached, nothing breaks).
  EXPECT_EQ(ProbeDevices().num_cuda_devices, 0);
  EXPECT_EQ(CreateBackend({DeviceKind::kCuda, 1}).status().code(), gpu.status().code());
}

TEST(DevicesTest, CudaIndicesBeyondTheGpusPresentAreRejected) {
  const int gpus = ProbeDevices().num_cuda_devices;
  auto r = CreateBackend({DeviceKind::kCuda, gpus});
  ASSERT_FALSE(r.ok());
  EXPECT_TRUE(Contains(r.status(), "cuda:" + std::to_string(gpus))) << r.status();
  EXPECT_EQ(CreateBackend({DeviceKind::kCuda, -1}).status().code(), StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace distval
