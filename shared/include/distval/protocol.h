// The distval wire protocol as plain C++ values, and the codec that turns
// them into frame 0 of a message and back. This header (and protocol.cc, the
// only file that includes the generated *.capnp.h) is the whole boundary to
// Cap'n Proto; schema/distval.capnp documents every field.
//
// A message on the wire is frame 0 (the encoded header) followed by payload
// frames. Tensor bytes live only in payload frames; a TensorRef names one by
// index (>= 1). The codec never touches payload bytes, but DecodeRequest /
// DecodeReply check every TensorRef against the payload frames actually
// received (index in range, no frame used twice, byte size matching
// shape x encoding), so a handler can map a frame without further checks.
//
// Thread-safety: pure functions over values.
#ifndef DISTVAL_PROTOCOL_H_
#define DISTVAL_PROTOCOL_H_

#include <cstddef>
#include <cstdint>
#include <span>
#include <string>
#include <string_view>
#include <variant>
#include <vector>

#include "distval/status.h"
#include "distval/tensor.h"

namespace distval::protocol {

inline constexpr uint32_t kProtocolVersion = 1;

// Staleness values (job default and per-variable override).
inline constexpr int32_t kStalenessAsync = -1;
inline constexpr int32_t kStalenessInherit = -2;    // per-variable: use the job's
inline constexpr int32_t kStalenessDontCheck = -3;  // hello: don't compare

// How the elements of a payload frame are encoded. kF16 / kBF16 are only
// valid for f32 tensors (lossy compression; see distval/encoding.h).
enum class Encoding : uint8_t { kRaw = 0, kF16 = 1, kBF16 = 2 };
inline constexpr int kNumEncodings = 3;
// "raw", "f16", "bf16" ("invalid" for values out of range).
std::string_view EncodingName(Encoding encoding);
// Bytes per element of `dtype` values sent with `encoding`: DTypeSize(dtype)
// for kRaw, 2 for kF16 / kBF16. Does not check that the pair is allowed.
size_t EncodedElementSize(DType dtype, Encoding encoding);

struct TensorRef {
  uint32_t frame = 0;  // >= 1
  DType dtype = DType::kF32;
  Encoding encoding = Encoding::kRaw;
  std::vector<int64_t> shape;

  // Product of the dimensions (1 for a scalar); -1 when a dimension is
  // negative or the product overflows int64 (never for a decoded ref).
  int64_t num_elements() const;
  // num_elements() * EncodedElementSize(dtype, encoding): the byte size of
  // the payload frame. SIZE_MAX when num_elements() is -1 or the product
  // overflows (never for a decoded ref).
  size_t num_bytes() const;
  friend bool operator==(const TensorRef&, const TensorRef&) = default;
};

struct RowRange {
  int64_t begin = 0;
  int64_t end = 0;
  int64_t size() const { return end - begin; }
  friend bool operator==(const RowRange&, const RowRange&) = default;
};

struct InitZeros {
  friend bool operator==(const InitZeros&, const InitZeros&) = default;
};
struct InitConstant {
  double value = 0;
  friend bool operator==(const InitConstant&, const InitConstant&) = default;
};
struct InitUniform {
  double low = -0.05, high = 0.05;
  friend bool operator==(const InitUniform&, const InitUniform&) = default;
};
struct InitNormal {
  double mean = 0, stddev = 0.05;
  friend bool operator==(const InitNormal&, const InitNormal&) = default;
};
struct InitGlorotUniform {
  friend bool operator==(const InitGlorotUniform&, const InitGlorotUniform&) = default;
};
struct InitValues {
  TensorRef values;  // this shard's rows
  friend bool operator==(const InitValues&, const InitValues&) = default;
};
struct Initializer {
  uint64_t seed = 0;
  std::variant<InitZeros, InitConstant, InitUniform, InitNormal, InitGlorotUniform, InitValues>
      kind = InitZeros{};
  friend bool operator==(const Initializer&, const Initializer&) = default;
};

enum class OptimizerKind : uint8_t { kSgd = 0, kMomentum = 1, kAdagrad = 2, kAdam = 3, kAdamW = 4 };
std::string_view OptimizerKindName(OptimizerKind kind);  // "sgd", "momentum", ...
StatusOr<OptimizerKind> ParseOptimizerKind(std::string_view name);

struct OptimizerSpec {
  OptimizerKind kind = OptimizerKind::kSgd;
  double learning_rate = 0.01;
  double momentum = 0.9;
  bool nesterov = false;
  double beta1 = 0.9;
  double beta2 = 0.999;
  double epsilon = 1e-7;
  double weight_decay = 0.0;
  double initial_accumulator = 0.1;
  friend bool operator==(const OptimizerSpec&, const OptimizerSpec&) = default;
};

enum class Aggregation : uint8_t { kMean = 0, kSum = 1 };

struct VariableSpec {
  std::string name;
  DType dtype = DType::kF32;
  std::vector<int64_t> shape;
  Initializer initializer;
  OptimizerSpec optimizer;
  Aggregation aggregation = Aggregation::kMean;
  int32_t staleness = kStalenessInherit;
  friend bool operator==(const VariableSpec&, const VariableSpec&) = default;
};

// ---- Request bodies ----
enum class Role : uint8_t { kWorker = 0, kControl = 1 };
struct Hello {
  uint32_t protocol_version = kProtocolVersion;
  Role role = Role::kWorker;
  int32_t worker_index = 0;
  int32_t num_workers = 0;
  int32_t num_shards = 0;
  int32_t staleness = kStalenessDontCheck;
  friend bool operator==(const Hello&, const Hello&) = default;
};
struct Heartbeat {
  friend bool operator==(const Heartbeat&, const Heartbeat&) = default;
};
struct CreateVariable {
  VariableSpec spec;
  RowRange rows;
  friend bool operator==(const CreateVariable&, const CreateVariable&) = default;
};
// Dense range or sparse rows (i64 indices in a payload frame).
using RowSelection = std::variant<RowRange, TensorRef>;
struct Update {
  std::string variable;
  TensorRef values;
  RowSelection rows = RowRange{};
  friend bool operator==(const Update&, const Update&) = default;
};
struct Push {
  std::vector<Update> updates;
  bool advance_clock = false;
  // 0: the values are this message's payload frames. Else exactly one dense
  // update, its values.frame 0, and its values follow in this many
  // PushChunk messages with the same request id.
  uint32_t chunks = 0;
  friend bool operator==(const Push&, const Push&) = default;
};
// A piece of a chunked push: values bytes [offset, offset + frame size) of
// its one update; its one payload frame (frame 1) holds them.
struct PushChunk {
  uint64_t offset = 0;
  friend bool operator==(const PushChunk&, const PushChunk&) = default;
};
struct Read {
  std::string variable;
  Encoding encoding = Encoding::kRaw;
  RowSelection rows = RowRange{};
  friend bool operator==(const Read&, const Read&) = default;
};
struct Pull {
  std::vector<Read> reads;
  // 0: reply with whole payload frames. Else the sender wants the values in
  // pieces of about this many bytes, each in a message of its own
  // (PullReply::chunks, PullChunk).
  uint64_t chunk_bytes = 0;
  friend bool operator==(const Pull&, const Pull&) = default;
};
struct AdvanceClock {
  int64_t to = -1;  // -1: clock + 1
  friend bool operator==(const AdvanceClock&, const AdvanceClock&) = default;
};
struct Barrier {
  std::string name;
  friend bool operator==(const Barrier&, const Barrier&) = default;
};
struct SetMode {
  int32_t staleness = 0;
  std::string variable;  // empty: job default
  bool stale_aware_lr = false;
  int64_t at_clock = -1;  // -1: the next clock boundary the shard sees
  friend bool operator==(const SetMode&, const SetMode&) = default;
};
struct SetLearningRate {
  std::string variable;  // empty: all
  double learning_rate = 0;
  friend bool operator==(const SetLearningRate&, const SetLearningRate&) = default;
};
struct Checkpoint {
  std::string directory;
  friend bool operator==(const Checkpoint&, const Checkpoint&) = default;
};
struct Stats {
  friend bool operator==(const Stats&, const Stats&) = default;
};
struct Shutdown {
  bool checkpoint_first = false;
  friend bool operator==(const Shutdown&, const Shutdown&) = default;
};

using RequestBody =
    std::variant<Hello, Heartbeat, CreateVariable, Push, Pull, AdvanceClock, Barrier, SetMode,
                 SetLearningRate, Checkpoint, Stats, Shutdown, PushChunk>;

struct Request {
  uint64_t request_id = 0;
  int32_t worker_id = -1;
  int64_t clock = 0;
  RequestBody body = Heartbeat{};
  friend bool operator==(const Request&, const Request&) = default;
};
// "hello", "heartbeat", "create_variable", "push", "pull", "advance_clock",
// "barrier", "set_mode", "set_learning_rate", "checkpoint", "stats", "shutdown".
std::string_view RequestTypeName(const RequestBody& body);

// ---- Reply bodies ----
struct NoBody {
  friend bool operator==(const NoBody&, const NoBody&) = default;
};
struct HelloReply {
  uint32_t protocol_version = kProtocolVersion;
  int32_t shard_index = 0;
  int32_t num_shards = 0;
  int32_t num_workers = 0;
  int32_t staleness = 0;
  int64_t clock = 0;
  // Random non-zero id of the server process: a client that sees it change
  // knows the shard restarted (and lost what it had not checkpointed).
  uint64_t incarnation = 0;
  // Variables the shard holds.
  int32_t num_variables = 0;
  // Clock of the checkpoint the process restored at start (-1: none).
  int64_t restored_clock = -1;
  friend bool operator==(const HelloReply&, const HelloReply&) = default;
};
struct PullReply {
  std::vector<TensorRef> tensors;
  std::vector<uint64_t> versions;
  // 0: the values are this message's payload frames. Else this many
  // PullChunk messages follow with them, and every TensorRef::frame is 0.
  uint32_t chunks = 0;
  friend bool operator==(const PullReply&, const PullReply&) = default;
};
// A piece of a chunked pull reply: bytes [offset, offset + frame size) of
// tensor `tensor`; its one payload frame (frame 1) holds them.
struct PullChunk {
  uint32_t tensor = 0;
  uint64_t offset = 0;
  friend bool operator==(const PullChunk&, const PullChunk&) = default;
};
struct CheckpointReply {
  std::string path;
  int64_t clock = 0;
  friend bool operator==(const CheckpointReply&, const CheckpointReply&) = default;
};
struct WorkerState {
  int32_t worker_id = 0;
  int64_t clock = 0;
  bool live = true;
  friend bool operator==(const WorkerState&, const WorkerState&) = default;
};
struct VariableState {
  std::string name;
  RowRange rows;
  uint64_t bytes = 0;
  uint64_t version = 0;
  double learning_rate = 0;
  friend bool operator==(const VariableState&, const VariableState&) = default;
};
struct StatsReply {
  int32_t shard_index = 0;
  int32_t staleness = 0;
  std::vector<WorkerState> workers;
  std::vector<VariableState> variables;
  std::string last_checkpoint;
  // Updates (one variable of one push) this shard refused or skipped since
  // it started because their gradient held NaN or Inf (--nan-policy).
  uint64_t nan_updates = 0;
  friend bool operator==(const StatsReply&, const StatsReply&) = default;
};

using ReplyBody =
    std::variant<NoBody, HelloReply, PullReply, CheckpointReply, StatsReply, PullChunk>;

struct Reply {
  uint64_t request_id = 0;
  StatusCode code = StatusCode::kOk;
  std::string message;
  int64_t min_clock = 0;
  int64_t shard_clock = 0;
  ReplyBody body = NoBody{};

  Status status() const { return code == StatusCode::kOk ? OkStatus() : Status(code, message); }
  friend bool operator==(const Reply&, const Reply&) = default;
};

// Limits applied while decoding untrusted bytes.
struct DecodeLimits {
  uint64_t traversal_limit_words = 1 << 20;  // 8 MiB of header
  int nesting_limit = 16;
  size_t max_list_entries = 1 << 16;  // updates, reads, shape dims, ...
  size_t max_text_bytes = 4096;       // names, messages
  size_t max_rank = 8;
};

// Encodes frame 0: a single-segment Cap'n Proto message in the flat
// (unpacked) stream format, sized so that it needs no second segment. The
// encoder does not validate: it writes what it is given (so tests can build
// bad messages); DecodeRequest / DecodeReply are the checks. Reply.message is
// cut to DecodeLimits{}.max_text_bytes (at a UTF-8 boundary, ending in "...")
// so that a long error message still reaches the peer. Never fails for lists
// below Cap'n Proto's 2^29 entries; throws only std::bad_alloc.
std::vector<std::byte> EncodeRequest(const Request& request);
std::vector<std::byte> EncodeReply(const Reply& reply);

// Decodes frame 0 of a request (DecodeReply: of a reply). `header` may have any alignment (it is
// copied into an aligned buffer when it is not 8-byte aligned) and must hold exactly one message
// (no trailing bytes). `payload_sizes[i]` is the byte size of frame i + 1 as received.
// InvalidArgument, with a message that names the field (e.g. "push.updates[2].values: frame 3 has
// 400 bytes, shape [10,20] f32 needs 800"), for:
//  - malformed or truncated bytes, the traversal or nesting limit exceeded;
//  - a list longer than max_list_entries, a text longer than max_text_bytes,
//    a shape of rank > max_rank, a negative dimension, an element or byte
//    count that overflows int64;
//  - an enum value or union member this version does not know;
//  - a TensorRef whose frame is 0, beyond payload_sizes.size() or already
//    used by another TensorRef, whose frame size differs from
//    num_elements x EncodedElementSize, or with an f16/bf16 encoding on a
//    non-f32 dtype; payload frames that no TensorRef uses;
//  - sparse row indices that are not a rank-1 i64 tensor, or (in an update)
//    whose count differs from the first dimension of the values;
//  - a RowRange with begin < 0 or end < begin; in create_variable, rows
//    outside the variable's axis 0, or initial values whose dtype differs
//    from the spec or whose element count differs from the rows' elements.
// Checks against a variable's stored spec are the handler's job.
// Reply.code values that are not canonical codes decode as kUnknown.
StatusOr<Request> DecodeRequest(std::span<const std::byte> header,
                                std::span<const size_t> payload_sizes,
                                const DecodeLimits& limits = {});
StatusOr<Reply> DecodeReply(std::span<const std::byte> header,
                            std::span<const size_t> payload_sizes, const DecodeLimits& limits = {});

}  // namespace distval::protocol

#endif  // DISTVAL_PROTOCOL_H_
