// Helpers shared by the worker tests that run against every Backend
// (conformance style): the device list, a fixture that creates the backend or
// skips when the device is absent, and host<->device helpers.
#ifndef DISTVAL_TESTS_WORKER_BACKEND_TEST_UTIL_H_
#define DISTVAL_TESTS_WORKER_BACKEND_TEST_UTIL_H_

#include <gtest/gtest.h>

#include <memory>
#include <string>
#include <vector>

#include "distval/backend.h"
#include "distval/devices.h"
#include "distval/float_env.h"

namespace distval::testing {

// Devices every conformance test runs on; cuda:0 skips when absent.
inline std::vector<DeviceSpec> ConformanceDevices() {
  return {DeviceSpec{DeviceKind::kCpu, 0}, DeviceSpec{DeviceKind::kCuda, 0}};
}

inline std::string DeviceParamName(const ::testing::TestParamInfo<DeviceSpec>& info) {
  return std::string(DeviceKindName(info.param.kind)) + std::to_string(info.param.index);
}

class BackendTest : public ::testing::TestWithParam<DeviceSpec> {
 protected:
  void SetUp() override {
    SetFlushDenormalsToZero();
    const DeviceSpec spec = GetParam();
    if (spec.kind == DeviceKind::kCuda && ProbeDevices().num_cuda_devices <= spec.index)
      GTEST_SKIP() << spec.ToString() << " is not present (no GPU, or built without CUDA)";
    auto backend = CreateBackend(spec);
    ASSERT_TRUE(backend.ok()) << backend.status();
    backend_ = std::move(*backend);
  }

  Backend& be() { return *backend_; }

  DeviceBuffer Upload(const std::vector<float>& host) {
    auto buf = backend_->Allocate(static_cast<int64_t>(host.size()));
    EXPECT_TRUE(buf.ok()) << buf.status();
    EXPECT_TRUE(backend_->CopyToDevice(host.data(), *buf, static_cast<int64_t>(host.size())).ok());
    return std::move(*buf);
  }
  DeviceBuffer UploadLabels(const std::vector<int32_t>& host) {
    auto buf = backend_->Allocate(static_cast<int64_t>(host.size()), DType::kI32);
    EXPECT_TRUE(buf.ok()) << buf.status();
    EXPECT_TRUE(backend_->CopyToDevice(host.data(), *buf, static_cast<int64_t>(host.size())).ok());
    return std::move(*buf);
  }
  DeviceBuffer Zeros(int64_t n) {
    auto buf = backend_->Allocate(n);
    EXPECT_TRUE(buf.ok()) << buf.status();
    return std::move(*buf);
  }
  std::vector<float> Download(const DeviceBuffer& buf, int64_t n = -1) {
    if (n < 0) n = buf.size();
    std::vector<float> host(static_cast<size_t>(n));
    Status s = backend_->CopyToHost(buf, host.data(), n);
    EXPECT_TRUE(s.ok()) << s;
    return host;
  }
  float Scalar(const DeviceBuffer& buf) { return Download(buf, 1)[0]; }

  std::unique_ptr<Backend> backend_;
};

}  // namespace distval::testing

#endif  // DISTVAL_TESTS_WORKER_BACKEND_TEST_UTIL_H_
