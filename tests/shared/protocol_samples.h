// Sample wire messages covering every request and reply body and every
// union variant, with the payload frame sizes that make them valid. Used by
// protocol_test and by the generator of the fuzz seed corpus.
#ifndef DISTVAL_TESTS_SHARED_PROTOCOL_SAMPLES_H_
#define DISTVAL_TESTS_SHARED_PROTOCOL_SAMPLES_H_

#include <cstddef>
#include <string>
#include <utility>
#include <vector>

#include "distval/protocol.h"

namespace distval::protocol::samples {

struct SampleRequest {
  std::string name;  // file-name friendly
  Request request;
  std::vector<size_t> payload_sizes;
};

struct SampleReply {
  std::string name;
  Reply reply;
  std::vector<size_t> payload_sizes;
};

// Makes a TensorRef on the next payload frame and records that frame's size.
inline TensorRef NextRef(std::vector<size_t>* sizes, DType dtype, Encoding encoding,
                         std::vector<int64_t> shape) {
  TensorRef ref;
  ref.frame = static_cast<uint32_t>(sizes->size() + 1);
  ref.dtype = dtype;
  ref.encoding = encoding;
  ref.shape = std::move(shape);
  sizes->push_back(ref.num_bytes());
  return ref;
}

inline Request WithHeader(RequestBody body, uint64_t id) {
  Request r;
  r.request_id = id;
  r.worker_id = 3;
  r.clock = 41;
  r.body = std::move(body);
  return r;
}

inline VariableSpec SampleSpec(Initializer init) {
  VariableSpec s;
  s.name = "dense_1/kernel";
  s.dtype = DType::kF32;
  s.shape = {784, 256};
  s.initializer = std::move(init);
  s.optimizer.kind = OptimizerKind::kAdamW;
  s.optimizer.learning_rate = 1e-3;
  s.optimizer.momentum = 0.5;
  s.optimizer.nesterov = true;
  s.optimizer.beta1 = 0.8;
  s.optimizer.beta2 = 0.99;
  s.optimizer.epsilon = 1e-8;
  s.optimizer.weight_decay = 0.01;
  s.optimizer.initial_accumulator = 0.2;
  s.aggregation = Aggregation::kSum;
  s.staleness = 2;
  return s;
}

inline std::vector<SampleRequest> SampleRequests() {
  std::vector<SampleRequest> out;
  uint64_t id = 100;
  auto add = [&](std::string name, RequestBody body, std::vector<size_t> sizes = {}) {
    out.push_back({std::move(name), WithHeader(std::move(body), id++), std::move(sizes)});
  };

  add("hello_worker", Hello{kProtocolVersion, Role::kWorker, 3, 4, 2, 0});
  add("hello_control", Hello{kProtocolVersion, Role::kControl, -1, 4, 2, kStalenessDontCheck});
  add("heartbeat", Heartbeat{});

  const std::pair<const char*, Initializer> inits[] = {
      {"zeros", Initializer{1, InitZeros{}}},
      {"constant", Initializer{2, InitConstant{0.25}}},
      {"uniform", Initializer{3, InitUniform{-0.1, 0.2}}},
      {"normal", Initializer{4, InitNormal{0.5, 0.01}}},
      {"glorot_uniform", Initializer{5, InitGlorotUniform{}}},
  };
  for (const auto& [name, init] : inits)
    add(std::string("create_variable_") + name, CreateVariable{SampleSpec(init), RowRange{0, 392}});
  {
    std::vector<size_t> sizes;
    Initializer init{6, InitValues{NextRef(&sizes, DType::kF32, Encoding::kRaw, {10, 256})}};
    add("create_variable_values", CreateVariable{SampleSpec(init), RowRange{100, 110}}, sizes);
  }
  {
    std::vector<size_t> sizes;
    Push push;
    push.updates.push_back({"dense_1/kernel",
                            NextRef(&sizes, DType::kF32, Encoding::kRaw, {392, 256}),
                            RowRange{0, 392}});
    push.updates.push_back(
        {"dense_1/bias", NextRef(&sizes, DType::kF32, Encoding::kF16, {256}), RowRange{0, 256}});
    push.updates.push_back(
        {"dense_2/bias", NextRef(&sizes, DType::kF32, Encoding::kBF16, {10}), RowRange{0, 10}});
    push.advance_clock = true;
    add("push_dense", std::move(push), sizes);
  }
  {
    std::vector<size_t> sizes;
    Push push;
    TensorRef values = NextRef(&sizes, DType::kF32, Encoding::kRaw, {5, 16});
    TensorRef indices = NextRef(&sizes, DType::kI64, Encoding::kRaw, {5});
    push.updates.push_back({"embedding", values, indices});
    TensorRef values2 = NextRef(&sizes, DType::kF32, Encoding::kBF16, {3, 16});
    TensorRef indices2 = NextRef(&sizes, DType::kI64, Encoding::kRaw, {3});
    push.updates.push_back({"embedding_2", values2, indices2});
    push.updates.push_back(
        {"global_step", NextRef(&sizes, DType::kI64, Encoding::kRaw, {}), RowRange{0, 1}});
    push.advance_clock = false;
    add("push_sparse", std::move(push), sizes);
  }
  add("push_empty", Push{{}, true});
  {
    // The header of a chunked push; its values follow in 16 PushChunk messages.
    Push push;
    push.updates.push_back({"dense_1/kernel",
                            TensorRef{0, DType::kF32, Encoding::kRaw, {4096, 1024}},
                            RowRange{0, 4096}});
    push.advance_clock = true;
    push.chunks = 16;
    add("push_chunked", std::move(push));
    add("push_chunk", PushChunk{uint64_t{15} << 20}, {1 << 20});
  }
  {
    std::vector<size_t> sizes;
    Pull pull;
    pull.reads.push_back({"dense_1/kernel", Encoding::kRaw, RowRange{0, 392}});
    pull.reads.push_back({"dense_1/bias", Encoding::kF16, RowRange{0, 256}});
    pull.reads.push_back(
        {"embedding", Encoding::kBF16, NextRef(&sizes, DType::kI64, Encoding::kRaw, {7})});
    add("pull", pull, sizes);
    pull.chunk_bytes = 1 << 20;
    add("pull_chunked", std::move(pull), sizes);
  }
  add("advance_clock", AdvanceClock{57});
  add("advance_clock_next", AdvanceClock{-1});
  add("barrier", Barrier{"epoch_end"});
  add("set_mode", SetMode{3, "embedding", true, 120});
  add("set_mode_job", SetMode{kStalenessAsync, "", false, -1});
  add("set_learning_rate", SetLearningRate{"", 0.005});
  add("checkpoint", Checkpoint{"/tmp/ckpt"});
  add("stats", Stats{});
  add("shutdown", Shutdown{true});
  return out;
}

inline std::vector<SampleReply> SampleReplies() {
  std::vector<SampleReply> out;
  auto add = [&](std::string name, StatusCode code, std::string message, ReplyBody body,
                 std::vector<size_t> sizes = {}) {
    Reply r;
    r.request_id = 100 + out.size();
    r.code = code;
    r.message = std::move(message);
    r.min_clock = 40;
    r.shard_clock = 42;
    r.body = std::move(body);
    out.push_back({std::move(name), std::move(r), std::move(sizes)});
  };
  add("reply_ok", StatusCode::kOk, "", NoBody{});
  add("reply_error", StatusCode::kInvalidArgument,
      "push.updates[0].values: shape [3,4] differs from the variable's [3,5]", NoBody{});
  add("reply_hello", StatusCode::kOk, "",
      HelloReply{kProtocolVersion, 1, 2, 4, 0, 17, 0x9e3779b97f4a7c15ULL, 3, 12});
  {
    std::vector<size_t> sizes;
    PullReply pull;
    pull.tensors.push_back(NextRef(&sizes, DType::kF32, Encoding::kRaw, {392, 256}));
    pull.tensors.push_back(NextRef(&sizes, DType::kF32, Encoding::kF16, {256}));
    pull.tensors.push_back(NextRef(&sizes, DType::kF32, Encoding::kBF16, {7, 16}));
    pull.versions = {12, 12, 9};
    add("reply_pull", StatusCode::kOk, "", std::move(pull), sizes);
  }
  {
    // The shapes of a chunked reply: values follow in 5 PullChunk messages.
    PullReply pull;
    pull.tensors.push_back({0, DType::kF32, Encoding::kRaw, {392, 256}});
    pull.tensors.push_back({0, DType::kF32, Encoding::kRaw, {1000}});
    pull.versions = {12, 3};
    pull.chunks = 5;
    add("reply_pull_chunked", StatusCode::kOk, "", std::move(pull));
    add("reply_pull_chunk", StatusCode::kOk, "", PullChunk{1, 65536}, {4000 - 65536 % 4000});
  }
  add("reply_checkpoint", StatusCode::kOk, "", CheckpointReply{"/tmp/ckpt/clock-40", 40});
  {
    StatsReply stats;
    stats.shard_index = 1;
    stats.staleness = 2;
    stats.workers = {{0, 40, true}, {1, 38, true}, {2, 11, false}};
    stats.variables = {{"dense_1/kernel", {392, 784}, 392 * 256 * 4, 12, 0.001},
                       {"embedding", {0, 1000}, 1000 * 16 * 4, 9, 0.01}};
    stats.last_checkpoint = "/tmp/ckpt/clock-40";
    stats.nan_updates = 3;
    add("reply_stats", StatusCode::kOk, "", std::move(stats));
  }
  return out;
}

}  // namespace distval::protocol::samples

#endif  // DISTVAL_TESTS_SHARED_PROTOCOL_SAMPLES_H_
