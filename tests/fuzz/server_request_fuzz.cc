// Fuzz target over the parameter server's whole request path: each input
// (format: ParseFramedFuzzInput in fuzz_input.h) is one request, header and
// payload frames, sent over ZeroMQ to real ps::Server instances (decode,
// validate, dispatch, store, optimizer, consistency controller, replies).
// The servers, their state and the properties checked after every input
// are described in server_harness.h; a failed check aborts.
#include <cstdio>
#include <cstdlib>
#include <memory>

#include "distval/logging.h"
#include "fuzz_input.h"
#include "server_harness.h"

namespace {

distval::fuzz::ServerHarness& Harness() {
  static const std::unique_ptr<distval::fuzz::ServerHarness> harness = [] {
    // The servers log every refused request at kDebug and many at kInfo
    // and kWarning: keep the fuzzer's output readable.
    distval::ConfigureLogging({distval::LogLevel::kError, "fuzz", false});
    auto h = distval::fuzz::ServerHarness::Create();
    if (!h.ok()) {
      std::fprintf(stderr, "server_request_fuzz: starting the servers failed: %s\n",
                   h.status().ToString().c_str());
      std::abort();
    }
    return std::move(*h);
  }();
  return *harness;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  distval::fuzz::FramedFuzzInput input;
  if (!distval::fuzz::ParseFramedFuzzInput(data, size, &input)) return 0;
  distval::fuzz::WireRequest request;
  request.header.assign(input.header.begin(), input.header.end());
  request.payloads = std::move(input.payloads);
  Harness().Send(request);
  return 0;
}
