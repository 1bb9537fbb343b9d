#include "distval/protocol.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cstring>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "protocol_samples.h"

namespace distval::protocol {
namespace {

using samples::NextRef;
using samples::SampleReplies;
using samples::SampleRequests;

// Little-endian u32 at `offset`.
uint32_t ReadU32(const std::vector<std::byte>& bytes, size_t offset) {
  uint32_t v;
  std::memcpy(&v, bytes.data() + offset, sizeof(v));
  return v;
}

// True if the flat encoding holds exactly one segment.
bool IsSingleSegment(const std::vector<std::byte>& bytes) {
  return bytes.size() >= 8 && ReadU32(bytes, 0) == 0 && ReadU32(bytes, 4) * 8 + 8 == bytes.size();
}

// The one byte offset at which `a` and `b` differ (they must have the same
// size and differ in exactly one byte).
size_t SingleDiff(const std::vector<std::byte>& a, const std::vector<std::byte>& b) {
  EXPECT_EQ(a.size(), b.size());
  size_t found = a.size();
  int count = 0;
  for (size_t i = 0; i < a.size() && i < b.size(); ++i) {
    if (a[i] != b[i]) {
      found = i;
      ++count;
    }
  }
  EXPECT_EQ(count, 1);
  return found;
}

Status DecodeRequestStatus(const std::vector<std::byte>& bytes, const std::vector<size_t>& sizes,
                           const DecodeLimits& limits = {}) {
  return DecodeRequest(bytes, sizes, limits).status();
}
Status DecodeReplyStatus(const std::vector<std::byte>& bytes, const std::vector<size_t>& sizes,
                         const DecodeLimits& limits = {}) {
  return DecodeReply(bytes, sizes, limits).status();
}

void ExpectInvalid(const Status& s, const std::string& substring) {
  EXPECT_EQ(s.code(), StatusCode::kInvalidArgument) << s;
  EXPECT_NE(s.message().find(substring), std::string::npos)
      << "message: " << s.message() << "\nexpected to contain: " << substring;
}

Request PushRequest(std::vector<Update> updates) {
  Request r;
  r.request_id = 7;
  r.worker_id = 1;
  r.clock = 5;
  r.body = Push{std::move(updates), false};
  return r;
}

// ---------------------------------------------------------------------------
// Round trips

TEST(ProtocolTest, EveryRequestSampleRoundTrips) {
  const auto all = SampleRequests();
  ASSERT_GE(all.size(), 20u);
  std::vector<bool> body_seen(std::variant_size_v<RequestBody>, false);
  for (const auto& s : all) {
    SCOPED_TRACE(s.name);
    body_seen[s.request.body.index()] = true;
    const std::vector<std::byte> bytes = EncodeRequest(s.request);
    EXPECT_TRUE(IsSingleSegment(bytes));
    auto decoded = DecodeRequest(bytes, s.payload_sizes);
    ASSERT_TRUE(decoded.ok()) << decoded.status();
    EXPECT_EQ(*decoded, s.request);
  }
  for (size_t i = 0; i < body_seen.size(); ++i) EXPECT_TRUE(body_seen[i]) << "body " << i;
}

TEST(ProtocolTest, EveryReplySampleRoundTrips) {
  std::vector<bool> body_seen(std::variant_size_v<ReplyBody>, false);
  for (const auto& s : SampleReplies()) {
    SCOPED_TRACE(s.name);
    body_seen[s.reply.body.index()] = true;
    const std::vector<std::byte> bytes = EncodeReply(s.reply);
    EXPECT_TRUE(IsSingleSegment(bytes));
    auto decoded = DecodeReply(bytes, s.payload_sizes);
    ASSERT_TRUE(decoded.ok()) << decoded.status();
    EXPECT_EQ(*decoded, s.reply);
    EXPECT_EQ(decoded->status().code(), s.reply.code);
  }
  for (size_t i = 0; i < body_seen.size(); ++i) EXPECT_TRUE(body_seen[i]) << "body " << i;
}

TEST(ProtocolTest, EveryInitializerKindRoundTrips) {
  std::vector<bool> seen(std::variant_size_v<decltype(Initializer::kind)>, false);
  for (const auto& s : SampleRequests()) {
    if (const auto* c = std::get_if<CreateVariable>(&s.request.body)) {
      seen[c->spec.initializer.kind.index()] = true;
      auto decoded = DecodeRequest(EncodeRequest(s.request), s.payload_sizes);
      ASSERT_TRUE(decoded.ok()) << decoded.status();
      EXPECT_EQ(std::get<CreateVariable>(decoded->body).spec.initializer, c->spec.initializer);
    }
  }
  for (size_t i = 0; i < seen.size(); ++i) EXPECT_TRUE(seen[i]) << "initializer kind " << i;
}

TEST(ProtocolTest, EveryOptimizerAggregationAndRoleRoundTrips) {
  for (int k = 0; k < 5; ++k) {
    for (int a = 0; a < 2; ++a) {
      VariableSpec spec = samples::SampleSpec(Initializer{});
      spec.optimizer.kind = static_cast<OptimizerKind>(k);
      spec.aggregation = static_cast<Aggregation>(a);
      Request r;
      r.body = CreateVariable{spec, RowRange{0, 784}};
      auto decoded = DecodeRequest(EncodeRequest(r), {});
      ASSERT_TRUE(decoded.ok()) << decoded.status();
      EXPECT_EQ(*decoded, r);
    }
  }
  for (Role role : {Role::kWorker, Role::kControl}) {
    Request r;
    r.body = Hello{kProtocolVersion, role, 0, 1, 1, 0};
    auto decoded = DecodeRequest(EncodeRequest(r), {});
    ASSERT_TRUE(decoded.ok()) << decoded.status();
    EXPECT_EQ(std::get<Hello>(decoded->body).role, role);
  }
}

TEST(ProtocolTest, EveryDTypeAndEncodingRoundTripsInATensorRef) {
  for (int d = 0; d < kNumDTypes; ++d) {
    for (int e = 0; e < kNumEncodings; ++e) {
      const auto dtype = static_cast<DType>(d);
      const auto encoding = static_cast<Encoding>(e);
      if (encoding != Encoding::kRaw && dtype != DType::kF32) continue;
      std::vector<size_t> sizes;
      Request r = PushRequest({{"v", NextRef(&sizes, dtype, encoding, {3, 2}), RowRange{0, 3}}});
      auto decoded = DecodeRequest(EncodeRequest(r), sizes);
      ASSERT_TRUE(decoded.ok()) << decoded.status();
      EXPECT_EQ(*decoded, r);
    }
  }
}

TEST(ProtocolTest, ExtremeScalarValuesRoundTrip) {
  Request r;
  r.request_id = std::numeric_limits<uint64_t>::max();
  r.worker_id = std::numeric_limits<int32_t>::min();
  r.clock = std::numeric_limits<int64_t>::min();
  r.body = SetLearningRate{"x", std::numeric_limits<double>::infinity()};
  auto decoded = DecodeRequest(EncodeRequest(r), {});
  ASSERT_TRUE(decoded.ok()) << decoded.status();
  EXPECT_EQ(*decoded, r);

  Reply reply;
  reply.request_id = 1;
  reply.code = StatusCode::kDataLoss;
  reply.message = "x";
  reply.body = PullReply{{}, {std::numeric_limits<uint64_t>::max()}};
  auto decoded_reply = DecodeReply(EncodeReply(reply), {});
  ASSERT_TRUE(decoded_reply.ok()) << decoded_reply.status();
  EXPECT_EQ(*decoded_reply, reply);
}

TEST(ProtocolTest, LargePushIsOneSegmentAndRoundTrips) {
  std::vector<size_t> sizes;
  std::vector<Update> updates;
  for (int i = 0; i < 300; ++i)
    updates.push_back({std::string("layer_") + std::to_string(i) + "/a_rather_long_variable_name",
                       NextRef(&sizes, DType::kF32, Encoding::kRaw, {4, 3, 2}), RowRange{0, 4}});
  Request r = PushRequest(std::move(updates));
  const auto bytes = EncodeRequest(r);
  EXPECT_GT(bytes.size(), 4096u * 2);  // beyond the stack segment
  EXPECT_TRUE(IsSingleSegment(bytes));
  auto decoded = DecodeRequest(bytes, sizes);
  ASSERT_TRUE(decoded.ok()) << decoded.status();
  EXPECT_EQ(*decoded, r);
}

TEST(ProtocolTest, DecodesUnalignedHeaders) {
  for (const auto& s : SampleRequests()) {
    SCOPED_TRACE(s.name);
    const auto bytes = EncodeRequest(s.request);
    for (size_t offset : {1, 2, 3, 4, 7}) {
      std::vector<std::byte> buffer(bytes.size() + offset);
      std::memcpy(buffer.data() + offset, bytes.data(), bytes.size());
      auto decoded =
          DecodeRequest(std::span<const std::byte>(buffer).subspan(offset), s.payload_sizes);
      ASSERT_TRUE(decoded.ok()) << decoded.status();
      EXPECT_EQ(*decoded, s.request);
    }
  }
  // Larger than the stack buffer used for realignment.
  std::vector<size_t> sizes;
  std::vector<Update> updates;
  for (int i = 0; i < 100; ++i)
    updates.push_back({std::string("w") + std::to_string(i),
                       NextRef(&sizes, DType::kF32, Encoding::kRaw, {2}), RowRange{0, 2}});
  Request r = PushRequest(std::move(updates));
  const auto bytes = EncodeRequest(r);
  ASSERT_GT(bytes.size(), 256u * 8);
  std::vector<std::byte> buffer(bytes.size() + 1);
  std::memcpy(buffer.data() + 1, bytes.data(), bytes.size());
  auto decoded = DecodeRequest(std::span<const std::byte>(buffer).subspan(1), sizes);
  ASSERT_TRUE(decoded.ok()) << decoded.status();
  EXPECT_EQ(*decoded, r);
}

TEST(ProtocolTest, LongReplyMessageIsCutAtAUtf8Boundary) {
  Reply reply;
  reply.code = StatusCode::kInternal;
  reply.message = "x" + std::string(3000, '\0') + std::string(4000, 'a');
  for (int i = 0; i < 5000; ++i) reply.message += "\xc3\xa9";  // U+00E9, two bytes
  auto decoded = DecodeReply(EncodeReply(reply), {});
  ASSERT_TRUE(decoded.ok()) << decoded.status();
  const std::string& m = decoded->message;
  EXPECT_LE(m.size(), DecodeLimits{}.max_text_bytes);
  EXPECT_GE(m.size(), DecodeLimits{}.max_text_bytes - 4);
  ASSERT_GE(m.size(), 3u);
  EXPECT_EQ(m.substr(m.size() - 3), "...");
  EXPECT_EQ(m.substr(0, m.size() - 3), reply.message.substr(0, m.size() - 3));
  // A message of 2-byte characters is cut between characters.
  reply.message.clear();
  for (int i = 0; i < 5000; ++i) reply.message += "\xc3\xa9";
  decoded = DecodeReply(EncodeReply(reply), {});
  ASSERT_TRUE(decoded.ok()) << decoded.status();
  const std::string body = decoded->message.substr(0, decoded->message.size() - 3);
  EXPECT_EQ(body.size() % 2, 0u);
  EXPECT_EQ(body, reply.message.substr(0, body.size()));
}

// ---------------------------------------------------------------------------
// Names and sizes

TEST(ProtocolTest, RequestTypeNames) {
  const char* expected[] = {
      "hello",     "heartbeat", "create_variable",   "push",       "pull",  "advance_clock",
      "barrier",   "set_mode",  "set_learning_rate", "checkpoint", "stats", "shutdown",
      "push_chunk"};
  RequestBody bodies[] = {
      Hello{},    Heartbeat{}, CreateVariable{},  Push{},       Pull{},  AdvanceClock{},
      Barrier{},  SetMode{},   SetLearningRate{}, Checkpoint{}, Stats{}, Shutdown{},
      PushChunk{}};
  static_assert(std::size(bodies) == std::variant_size_v<RequestBody>);
  for (size_t i = 0; i < std::size(bodies); ++i) {
    EXPECT_EQ(bodies[i].index(), i);
    EXPECT_EQ(RequestTypeName(bodies[i]), expected[i]);
  }
}

TEST(ProtocolTest, OptimizerKindNamesParseBack) {
  const char* names[] = {"sgd", "momentum", "adagrad", "adam", "adamw"};
  for (int k = 0; k < 5; ++k) {
    const auto kind = static_cast<OptimizerKind>(k);
    EXPECT_EQ(OptimizerKindName(kind), names[k]);
    auto parsed = ParseOptimizerKind(names[k]);
    ASSERT_TRUE(parsed.ok()) << parsed.status();
    EXPECT_EQ(*parsed, kind);
  }
  auto bad = ParseOptimizerKind("rmsprop");
  EXPECT_EQ(bad.status().code(), StatusCode::kInvalidArgument);
  EXPECT_NE(bad.status().message().find("rmsprop"), std::string::npos) << bad.status();
}

TEST(ProtocolTest, EncodingNamesAndElementSizes) {
  EXPECT_EQ(EncodingName(Encoding::kRaw), "raw");
  EXPECT_EQ(EncodingName(Encoding::kF16), "f16");
  EXPECT_EQ(EncodingName(Encoding::kBF16), "bf16");
  EXPECT_EQ(EncodedElementSize(DType::kF32, Encoding::kRaw), 4u);
  EXPECT_EQ(EncodedElementSize(DType::kF64, Encoding::kRaw), 8u);
  EXPECT_EQ(EncodedElementSize(DType::kI64, Encoding::kRaw), 8u);
  EXPECT_EQ(EncodedElementSize(DType::kBF16, Encoding::kRaw), 2u);
  EXPECT_EQ(EncodedElementSize(DType::kF32, Encoding::kF16), 2u);
  EXPECT_EQ(EncodedElementSize(DType::kF32, Encoding::kBF16), 2u);
}

TEST(ProtocolTest, TensorRefElementAndByteCounts) {
  TensorRef t;
  EXPECT_EQ(t.num_elements(), 1);  // scalar
  EXPECT_EQ(t.num_bytes(), 4u);
  t.shape = {10, 20};
  EXPECT_EQ(t.num_elements(), 200);
  EXPECT_EQ(t.num_bytes(), 800u);
  t.encoding = Encoding::kF16;
  EXPECT_EQ(t.num_bytes(), 400u);
  t.shape = {10, 0, 3};
  EXPECT_EQ(t.num_elements(), 0);
  EXPECT_EQ(t.num_bytes(), 0u);
  t.shape = {10, -1};
  EXPECT_EQ(t.num_elements(), -1);
  EXPECT_EQ(t.num_bytes(), std::numeric_limits<size_t>::max());
  t.shape = {int64_t{1} << 32, int64_t{1} << 32};
  EXPECT_EQ(t.num_elements(), -1);
  t.shape = {int64_t{1} << 62};
  t.dtype = DType::kF64;
  t.encoding = Encoding::kRaw;
  EXPECT_EQ(t.num_elements(), int64_t{1} << 62);
  EXPECT_EQ(t.num_bytes(), std::numeric_limits<size_t>::max());
}

// ---------------------------------------------------------------------------
// Malformed bytes

TEST(ProtocolTest, EveryTruncationOfEveryMessageIsRejected) {
  for (const auto& s : SampleRequests()) {
    SCOPED_TRACE(s.name);
    const auto bytes = EncodeRequest(s.request);
    for (size_t n = 0; n < bytes.size(); ++n) {
      std::vector<std::byte> prefix(bytes.begin(), bytes.begin() + n);
      EXPECT_EQ(DecodeRequestStatus(prefix, s.payload_sizes).code(), StatusCode::kInvalidArgument)
          << "prefix of " << n << " bytes";
    }
  }
  for (const auto& s : SampleReplies()) {
    SCOPED_TRACE(s.name);
    const auto bytes = EncodeReply(s.reply);
    for (size_t n = 0; n < bytes.size(); ++n) {
      std::vector<std::byte> prefix(bytes.begin(), bytes.begin() + n);
      EXPECT_EQ(DecodeReplyStatus(prefix, s.payload_sizes).code(), StatusCode::kInvalidArgument)
          << "prefix of " << n << " bytes";
    }
  }
}

TEST(ProtocolTest, TrailingBytesAreRejected) {
  const auto s = SampleRequests()[0];
  auto bytes = EncodeRequest(s.request);
  bytes.resize(bytes.size() + 8);
  ExpectInvalid(DecodeRequestStatus(bytes, s.payload_sizes), "8 trailing bytes");
  bytes.resize(bytes.size() - 5);
  ExpectInvalid(DecodeRequestStatus(bytes, s.payload_sizes), "not a whole number");
}

TEST(ProtocolTest, RandomBytesNeverCrashAndAreRejected) {
  std::mt19937_64 rng(20240601);
  int rejected = 0;
  constexpr int kTrials = 4000;
  for (int trial = 0; trial < kTrials; ++trial) {
    size_t n = rng() % 200;
    if (trial % 2 == 0) n = (n / 8) * 8;  // whole words: gets past the size check
    std::vector<std::byte> bytes(n);
    for (auto& b : bytes) b = static_cast<std::byte>(rng());
    if (trial % 4 == 0 && n >= 8) {
      // Plausible segment table: one segment of the remaining words.
      const uint32_t zero = 0, words = static_cast<uint32_t>(n / 8 - 1);
      std::memcpy(bytes.data(), &zero, 4);
      std::memcpy(bytes.data() + 4, &words, 4);
    }
    std::vector<size_t> sizes(rng() % 3);
    for (auto& size : sizes) size = rng() % 64;
    const Status req = DecodeRequestStatus(bytes, sizes);
    const Status rep = DecodeReplyStatus(bytes, sizes);
    ASSERT_TRUE(req.ok() || req.code() == StatusCode::kInvalidArgument) << req;
    ASSERT_TRUE(rep.ok() || rep.code() == StatusCode::kInvalidArgument) << rep;
    if (!req.ok() && !rep.ok()) ++rejected;
  }
  // Random bytes can by chance form a valid message, but rarely.
  EXPECT_GT(rejected, kTrials * 9 / 10);
}

TEST(ProtocolTest, FlippedBytesOfValidMessagesNeverCrash) {
  std::mt19937_64 rng(7);
  int accepted = 0, rejected = 0;
  for (const auto& s : SampleRequests()) {
    const auto bytes = EncodeRequest(s.request);
    for (int trial = 0; trial < 200; ++trial) {
      auto mutated = bytes;
      const int flips = 1 + static_cast<int>(rng() % 3);
      for (int f = 0; f < flips; ++f)
        mutated[rng() % mutated.size()] ^= static_cast<std::byte>(1u << (rng() % 8));
      auto decoded = DecodeRequest(mutated, s.payload_sizes);
      if (!decoded.ok()) {
        ASSERT_EQ(decoded.status().code(), StatusCode::kInvalidArgument) << decoded.status();
        ++rejected;
        continue;
      }
      ++accepted;
      // Whatever decodes re-encodes to a message that decodes to the same bytes.
      const auto again = EncodeRequest(*decoded);
      auto redecoded = DecodeRequest(again, s.payload_sizes);
      ASSERT_TRUE(redecoded.ok()) << redecoded.status();
      EXPECT_EQ(EncodeRequest(*redecoded), again);
    }
  }
  // Both outcomes occur: flips in data fields decode, flips in pointers do not.
  EXPECT_GT(accepted, 0);
  EXPECT_GT(rejected, 0);
}

// ---------------------------------------------------------------------------
// Limits

TEST(ProtocolTest, ListsBeyondTheLimitAreRejected) {
  DecodeLimits limits;
  limits.max_list_entries = 2;
  {
    std::vector<size_t> sizes;
    std::vector<Update> updates;
    for (int i = 0; i < 3; ++i)
      updates.push_back({"w", NextRef(&sizes, DType::kF32, Encoding::kRaw, {1}), RowRange{0, 1}});
    const auto bytes = EncodeRequest(PushRequest(updates));
    ExpectInvalid(DecodeRequestStatus(bytes, sizes, limits),
                  "push.updates: list of 3 entries exceeds the limit of 2");
    updates.pop_back();
    sizes.pop_back();
    EXPECT_TRUE(DecodeRequestStatus(EncodeRequest(PushRequest(updates)), sizes, limits).ok());
  }
  {
    Request r;
    r.body = Pull{{{"a"}, {"b"}, {"c"}}};
    ExpectInvalid(DecodeRequestStatus(EncodeRequest(r), {}, limits), "pull.reads: list of 3");
  }
  {
    Reply r;
    r.body = PullReply{{}, {1, 2, 3}};
    ExpectInvalid(DecodeReplyStatus(EncodeReply(r), {}, limits), "pull_reply.versions: list of 3");
    std::vector<size_t> sizes;
    PullReply p;
    for (int i = 0; i < 3; ++i)
      p.tensors.push_back(NextRef(&sizes, DType::kF32, Encoding::kRaw, {}));
    r.body = p;
    ExpectInvalid(DecodeReplyStatus(EncodeReply(r), sizes, limits),
                  "pull_reply.tensors: list of 3");
    r.body = StatsReply{0, 0, {{}, {}, {}}, {}, ""};
    ExpectInvalid(DecodeReplyStatus(EncodeReply(r), {}, limits), "stats_reply.workers: list of 3");
    r.body = StatsReply{0, 0, {}, {{}, {}, {}}, ""};
    ExpectInvalid(DecodeReplyStatus(EncodeReply(r), {}, limits),
                  "stats_reply.variables: list of 3");
  }
}

TEST(ProtocolTest, RankBeyondTheLimitIsRejected) {
  DecodeLimits limits;
  limits.max_rank = 3;
  std::vector<size_t> sizes;
  const auto bytes = EncodeRequest(PushRequest(
      {{"w", NextRef(&sizes, DType::kF32, Encoding::kRaw, {1, 1, 1, 2}), RowRange{0, 1}}}));
  ExpectInvalid(DecodeRequestStatus(bytes, sizes, limits),
                "push.updates[0].values.shape: rank 4 exceeds the limit of 3");
  EXPECT_TRUE(DecodeRequestStatus(bytes, sizes).ok());

  Request r;
  VariableSpec spec = samples::SampleSpec(Initializer{});
  spec.shape = {2, 2, 2, 2};
  r.body = CreateVariable{spec, RowRange{0, 2}};
  ExpectInvalid(DecodeRequestStatus(EncodeRequest(r), {}, limits),
                "create_variable.spec.shape: rank 4 exceeds the limit of 3");
}

TEST(ProtocolTest, TextBeyondTheLimitIsRejected) {
  const std::string long_name(5000, 'n');
  std::vector<size_t> sizes;
  ExpectInvalid(
      DecodeRequestStatus(
          EncodeRequest(PushRequest(
              {{long_name, NextRef(&sizes, DType::kF32, Encoding::kRaw, {1}), RowRange{0, 1}}})),
          sizes),
      "push.updates[0].variable: text of 5000 bytes exceeds the limit of 4096");
  Request r;
  r.body = Barrier{long_name};
  ExpectInvalid(DecodeRequestStatus(EncodeRequest(r), {}), "barrier.name: text of 5000 bytes");
  r.body = Checkpoint{long_name};
  ExpectInvalid(DecodeRequestStatus(EncodeRequest(r), {}), "checkpoint.directory: text of 5000");
  r.body = SetMode{0, long_name, false, -1};
  ExpectInvalid(DecodeRequestStatus(EncodeRequest(r), {}), "set_mode.variable: text of 5000");
  r.body = SetLearningRate{long_name, 0.1};
  ExpectInvalid(DecodeRequestStatus(EncodeRequest(r), {}), "set_learning_rate.variable: text");
  VariableSpec spec = samples::SampleSpec(Initializer{});
  spec.name = long_name;
  r.body = CreateVariable{spec, RowRange{0, 1}};
  ExpectInvalid(DecodeRequestStatus(EncodeRequest(r), {}), "create_variable.spec.name: text");
  r.body = Pull{{{long_name}}};
  ExpectInvalid(DecodeRequestStatus(EncodeRequest(r), {}), "pull.reads[0].variable: text");

  Reply reply;
  reply.body = CheckpointReply{long_name, 1};
  ExpectInvalid(DecodeReplyStatus(EncodeReply(reply), {}), "checkpoint_reply.path: text");
  VariableState long_variable;
  long_variable.name = long_name;
  reply.body = StatsReply{0, 0, {}, {long_variable}, ""};
  ExpectInvalid(DecodeReplyStatus(EncodeReply(reply), {}), "stats_reply.variables[0].name: text");
  reply.body = StatsReply{0, 0, {}, {}, long_name};
  ExpectInvalid(DecodeReplyStatus(EncodeReply(reply), {}), "stats_reply.last_checkpoint: text");

  // A smaller limit applies to the reply message too.
  DecodeLimits limits;
  limits.max_text_bytes = 10;
  reply.body = NoBody{};
  reply.message = "an error message longer than ten bytes";
  ExpectInvalid(DecodeReplyStatus(EncodeReply(reply), {}, limits), "reply.message: text of 38");
}

// Text is UTF-8 (names end up in checkpoint manifests, which are JSON: a
// variable named with a lone 0xFF byte once made the next checkpoint throw
// and stopped the server). Malformed text is refused where it is decoded;
// a reply message is repaired when it is encoded instead.
TEST(ProtocolTest, TextMustBeUtf8) {
  Request r;
  r.request_id = 1;
  for (const std::string& bad : {std::string("w\xff"), std::string("\xc0\xaf"),  // overlong '/'
                                 std::string("\xed\xa0\x80"),                    // surrogate
                                 std::string("\xf4\x90\x80\x80"),                // > U+10FFFF
                                 std::string("ab\xe2\x82")}) {                   // cut short
    SCOPED_TRACE(bad);
    VariableSpec spec = samples::SampleSpec(Initializer{});
    spec.name = bad;
    r.body = CreateVariable{spec, RowRange{0, 1}};
    ExpectInvalid(DecodeRequestStatus(EncodeRequest(r), {}),
                  "create_variable.spec.name: text is not valid UTF-8");
    r.body = Barrier{bad};
    ExpectInvalid(DecodeRequestStatus(EncodeRequest(r), {}), "barrier.name: text is not valid");
  }
  for (const std::string& good :
       {std::string("plain"), std::string("caf\xc3\xa9/\xe2\x82\xac"),
        std::string("\xf0\x9f\x98\x80"), std::string("\xf4\x8f\xbf\xbf")}) {
    r.body = Barrier{good};
    auto decoded = DecodeRequest(EncodeRequest(r), {});
    ASSERT_TRUE(decoded.ok()) << decoded.status();
    EXPECT_EQ(std::get<Barrier>(decoded->body).name, good);
  }
  Reply reply;
  reply.code = StatusCode::kNotFound;
  reply.message = "no variable 'a\xff\xfe' \xe2\x82";
  auto decoded = DecodeReply(EncodeReply(reply), {});
  ASSERT_TRUE(decoded.ok()) << decoded.status();
  EXPECT_EQ(decoded->message,
            "no variable 'a?"
            "?' ?"
            "?");
}

TEST(ProtocolTest, TraversalAndNestingLimitsApply) {
  const auto s = SampleRequests();
  const auto& create = *std::find_if(
      s.begin(), s.end(), [](const auto& x) { return x.name == "create_variable_values"; });
  const auto bytes = EncodeRequest(create.request);
  DecodeLimits tight;
  tight.traversal_limit_words = 8;
  ExpectInvalid(DecodeRequestStatus(bytes, create.payload_sizes, tight), "traversal limit");
  DecodeLimits shallow;
  shallow.nesting_limit = 2;
  ExpectInvalid(DecodeRequestStatus(bytes, create.payload_sizes, shallow), "nesting");
  EXPECT_TRUE(DecodeRequestStatus(bytes, create.payload_sizes).ok());
}

// ---------------------------------------------------------------------------
// Payload frames

TEST(ProtocolTest, MissingPayloadFrameIsRejected) {
  std::vector<size_t> sizes;
  const auto bytes = EncodeRequest(
      PushRequest({{"a", NextRef(&sizes, DType::kF32, Encoding::kRaw, {2}), RowRange{0, 2}},
                   {"b", NextRef(&sizes, DType::kF32, Encoding::kRaw, {2}), RowRange{0, 2}}}));
  ASSERT_TRUE(DecodeRequestStatus(bytes, sizes).ok());
  ExpectInvalid(DecodeRequestStatus(bytes, {8}),
                "push.updates[1].values: frame 2 is out of range (valid: 1..1)");
  ExpectInvalid(DecodeRequestStatus(bytes, {}),
                "push.updates[0].values: frame 1 is out of range (the message has no payload");
}

TEST(ProtocolTest, ExtraPayloadFrameIsRejected) {
  std::vector<size_t> sizes;
  const auto bytes = EncodeRequest(
      PushRequest({{"a", NextRef(&sizes, DType::kF32, Encoding::kRaw, {2}), RowRange{0, 2}}}));
  ExpectInvalid(DecodeRequestStatus(bytes, {8, 16}), "unexpected payload frame 2");
  Request heartbeat;
  ExpectInvalid(DecodeRequestStatus(EncodeRequest(heartbeat), {4}), "unexpected payload frame 1");
  Reply reply;
  ExpectInvalid(DecodeReplyStatus(EncodeReply(reply), {0}), "unexpected payload frame 1");
  // Many frames (beyond the 64 tracked in a bit mask).
  std::vector<size_t> many(100, 4);
  many[99] = 0;
  ExpectInvalid(DecodeRequestStatus(EncodeRequest(heartbeat), many), "unexpected payload frame 1");
}

TEST(ProtocolTest, FrameSizeMismatchIsRejectedNamingTheField) {
  std::vector<size_t> sizes;
  std::vector<Update> updates;
  updates.push_back({"a", NextRef(&sizes, DType::kF32, Encoding::kRaw, {1}), RowRange{0, 1}});
  updates.push_back({"b", NextRef(&sizes, DType::kF32, Encoding::kRaw, {1}), RowRange{0, 1}});
  updates.push_back({"c", NextRef(&sizes, DType::kF32, Encoding::kRaw, {10, 20}), RowRange{0, 10}});
  const auto bytes = EncodeRequest(PushRequest(updates));
  ASSERT_TRUE(DecodeRequestStatus(bytes, sizes).ok());
  sizes[2] = 400;
  ExpectInvalid(DecodeRequestStatus(bytes, sizes),
                "push.updates[2].values: frame 3 has 400 bytes, shape [10,20] f32 needs 800");

  std::vector<size_t> f16_sizes;
  const auto f16 = EncodeRequest(PushRequest(
      {{"a", NextRef(&f16_sizes, DType::kF32, Encoding::kF16, {10, 20}), RowRange{0, 10}}}));
  ASSERT_TRUE(DecodeRequestStatus(f16, f16_sizes).ok());
  ExpectInvalid(DecodeRequestStatus(f16, {800}),
                "frame 1 has 800 bytes, shape [10,20] f32 as f16 needs 400");

  Reply reply;
  std::vector<size_t> reply_sizes;
  reply.body = PullReply{{NextRef(&reply_sizes, DType::kF32, Encoding::kBF16, {3})}, {1}};
  ExpectInvalid(DecodeReplyStatus(EncodeReply(reply), {7}),
                "pull_reply.tensors[0]: frame 1 has 7 bytes, shape [3] f32 as bf16 needs 6");
}

TEST(ProtocolTest, FrameZeroOutOfRangeAndDuplicateAreRejected) {
  std::vector<size_t> sizes;
  Update a{"a", NextRef(&sizes, DType::kF32, Encoding::kRaw, {2}), RowRange{0, 2}};
  Update b{"b", NextRef(&sizes, DType::kF32, Encoding::kRaw, {2}), RowRange{0, 2}};
  Update bad = b;
  bad.values.frame = 0;
  ExpectInvalid(DecodeRequestStatus(EncodeRequest(PushRequest({a, bad})), sizes),
                "push.updates[1].values: frame 0 is out of range");
  bad.values.frame = 3;
  ExpectInvalid(DecodeRequestStatus(EncodeRequest(PushRequest({a, bad})), sizes),
                "push.updates[1].values: frame 3 is out of range");
  bad.values.frame = std::numeric_limits<uint32_t>::max();
  ExpectInvalid(DecodeRequestStatus(EncodeRequest(PushRequest({a, bad})), sizes),
                "frame 4294967295 is out of range");
  bad.values.frame = 1;
  ExpectInvalid(DecodeRequestStatus(EncodeRequest(PushRequest({a, bad})), sizes),
                "push.updates[1].values: frame 1 is used by another tensor too");
  // The same frame for values and sparse indices.
  std::vector<size_t> one = {8};
  TensorRef values{1, DType::kF32, Encoding::kRaw, {1, 2}};
  TensorRef indices{1, DType::kI64, Encoding::kRaw, {1}};
  ExpectInvalid(DecodeRequestStatus(EncodeRequest(PushRequest({{"e", values, indices}})), one),
                "push.updates[0].sparse: frame 1 is used by another tensor too");
}

TEST(ProtocolTest, ChunkedPullRepliesAreChecked) {
  // The shapes of a chunked reply name no frame (the values follow in
  // PullChunk messages), and the message carries none.
  Reply shapes;
  shapes.body = PullReply{{{1, DType::kF32, Encoding::kRaw, {4}}}, {1}, 2};
  ExpectInvalid(DecodeReplyStatus(EncodeReply(shapes), {16}),
                "pull_reply.tensors[0]: frame 1 given for values that follow in chunks");
  std::get<PullReply>(shapes.body).tensors[0].frame = 0;
  ASSERT_TRUE(DecodeReplyStatus(EncodeReply(shapes), {}).ok());
  ExpectInvalid(DecodeReplyStatus(EncodeReply(shapes), {16}), "unexpected payload frame 1");
  // Without chunks, frame 0 is still out of range.
  std::get<PullReply>(shapes.body).chunks = 0;
  ExpectInvalid(DecodeReplyStatus(EncodeReply(shapes), {}), "frame 0 is out of range");
  // A piece has exactly one payload frame, of any size.
  Reply piece;
  piece.body = PullChunk{0, 8};
  ASSERT_TRUE(DecodeReplyStatus(EncodeReply(piece), {8}).ok());
  ASSERT_TRUE(DecodeReplyStatus(EncodeReply(piece), {0}).ok());
  ExpectInvalid(DecodeReplyStatus(EncodeReply(piece), {}),
                "pull_chunk.frame: frame 1 is out of range");
  ExpectInvalid(DecodeReplyStatus(EncodeReply(piece), {8, 8}), "unexpected payload frame 2");
}

TEST(ProtocolTest, ChunkedPushesAreChecked) {
  // One dense update whose values name no frame; the header carries none.
  Update u{"w", TensorRef{0, DType::kF32, Encoding::kRaw, {1024}}, RowRange{0, 1024}};
  Request header = PushRequest({u});
  std::get<Push>(header.body).chunks = 4;
  ASSERT_TRUE(DecodeRequestStatus(EncodeRequest(header), {}).ok());
  ExpectInvalid(DecodeRequestStatus(EncodeRequest(header), {4096}), "unexpected payload frame 1");
  std::get<Push>(header.body).updates[0].values.frame = 1;
  ExpectInvalid(DecodeRequestStatus(EncodeRequest(header), {4096}),
                "push.updates[0].values: frame 1 given for values that follow in chunks");
  // Never two updates, never sparse rows.
  std::get<Push>(header.body).updates[0].values.frame = 0;
  std::get<Push>(header.body).updates.push_back(u);
  ExpectInvalid(DecodeRequestStatus(EncodeRequest(header), {}),
                "push.chunks: a chunked push carries exactly one dense update, not 2 update(s)");
  std::get<Push>(header.body).updates.pop_back();
  std::get<Push>(header.body).updates[0].rows = TensorRef{0, DType::kI64, Encoding::kRaw, {1024}};
  EXPECT_FALSE(DecodeRequestStatus(EncodeRequest(header), {}).ok());
  // A piece has exactly one payload frame.
  Request piece;
  piece.body = PushChunk{4096};
  ASSERT_TRUE(DecodeRequestStatus(EncodeRequest(piece), {4096}).ok());
  ExpectInvalid(DecodeRequestStatus(EncodeRequest(piece), {}),
                "push_chunk.frame: frame 1 is out of range");
  ExpectInvalid(DecodeRequestStatus(EncodeRequest(piece), {8, 8}), "unexpected payload frame 2");
}

TEST(ProtocolTest, NegativeAndOverflowingDimensionsAreRejected) {
  Update u{"a", TensorRef{1, DType::kF32, Encoding::kRaw, {4, -3}}, RowRange{0, 4}};
  ExpectInvalid(DecodeRequestStatus(EncodeRequest(PushRequest({u})), {0}),
                "push.updates[0].values.shape: dimension 1 is negative (-3)");
  u.values.shape = {int64_t{1} << 40, int64_t{1} << 30};
  ExpectInvalid(DecodeRequestStatus(EncodeRequest(PushRequest({u})), {0}),
                "push.updates[0].values.shape: element count overflows at dimension 1");
  u.values.shape = {int64_t{1} << 62};  // elements fit, bytes do not
  ExpectInvalid(DecodeRequestStatus(EncodeRequest(PushRequest({u})), {0}),
                "push.updates[0].values: byte size of shape [4611686018427387904] overflows");

  Request r;
  VariableSpec spec = samples::SampleSpec(Initializer{});
  spec.shape = {5, -1};
  r.body = CreateVariable{spec, RowRange{0, 5}};
  ExpectInvalid(DecodeRequestStatus(EncodeRequest(r), {}),
                "create_variable.spec.shape: dimension 1 is negative (-1)");
}

TEST(ProtocolTest, BadRowSelectionsAreRejected) {
  std::vector<size_t> sizes = {8 * 4, 4 * 8};
  TensorRef values{1, DType::kF32, Encoding::kRaw, {4, 2}};
  TensorRef indices{2, DType::kI64, Encoding::kRaw, {4}};
  ASSERT_TRUE(
      DecodeRequestStatus(EncodeRequest(PushRequest({{"e", values, indices}})), sizes).ok());

  TensorRef i32 = indices;
  i32.dtype = DType::kI32;
  ExpectInvalid(
      DecodeRequestStatus(EncodeRequest(PushRequest({{"e", values, i32}})), {8 * 4, 4 * 4}),
      "push.updates[0].sparse: row indices must be a rank-1 i64 tensor, not i32 [4]");
  TensorRef rank2 = indices;
  rank2.shape = {2, 2};
  ExpectInvalid(DecodeRequestStatus(EncodeRequest(PushRequest({{"e", values, rank2}})), sizes),
                "row indices must be a rank-1 i64 tensor, not i64 [2,2]");
  TensorRef three = indices;
  three.shape = {3};
  ExpectInvalid(
      DecodeRequestStatus(EncodeRequest(PushRequest({{"e", values, three}})), {8 * 4, 3 * 8}),
      "push.updates[0].values: shape [4,2] does not have 3 rows");
  TensorRef scalar_values{1, DType::kF32, Encoding::kRaw, {}};
  ExpectInvalid(
      DecodeRequestStatus(EncodeRequest(PushRequest({{"e", scalar_values, indices}})), {4, 4 * 8}),
      "push.updates[0].values: shape [] does not have 4 rows");

  ExpectInvalid(
      DecodeRequestStatus(EncodeRequest(PushRequest({{"e", values, RowRange{-1, 3}}})), {32}),
      "push.updates[0].dense: invalid row range [-1,3)");
  ExpectInvalid(
      DecodeRequestStatus(EncodeRequest(PushRequest({{"e", values, RowRange{5, 4}}})), {32}),
      "push.updates[0].dense: invalid row range [5,4)");
  Request pull;
  pull.body = Pull{{{"e", Encoding::kRaw, RowRange{3, 1}}}};
  ExpectInvalid(DecodeRequestStatus(EncodeRequest(pull), {}),
                "pull.reads[0].dense: invalid row range [3,1)");
  pull.body = Pull{{{"e", Encoding::kRaw, TensorRef{1, DType::kF32, Encoding::kRaw, {2}}}}};
  ExpectInvalid(DecodeRequestStatus(EncodeRequest(pull), {8}),
                "pull.reads[0].sparse: row indices must be a rank-1 i64 tensor");
}

TEST(ProtocolTest, CompressedEncodingNeedsF32) {
  TensorRef values{1, DType::kF64, Encoding::kF16, {4}};
  ExpectInvalid(
      DecodeRequestStatus(EncodeRequest(PushRequest({{"e", values, RowRange{0, 4}}})), {8}),
      "push.updates[0].values: encoding f16 needs dtype f32, not f64");
  values.dtype = DType::kI64;
  values.encoding = Encoding::kBF16;
  ExpectInvalid(
      DecodeRequestStatus(EncodeRequest(PushRequest({{"e", values, RowRange{0, 4}}})), {8}),
      "encoding bf16 needs dtype f32, not i64");
}

TEST(ProtocolTest, CreateVariableRowsAndInitialValuesAreChecked) {
  VariableSpec spec = samples::SampleSpec(Initializer{});
  spec.shape = {10, 3};
  Request r;
  r.body = CreateVariable{spec, RowRange{0, 11}};
  ExpectInvalid(DecodeRequestStatus(EncodeRequest(r), {}),
                "create_variable.rows: rows [0,11) exceed the 10 rows of shape [10,3]");
  VariableSpec scalar = spec;
  scalar.shape = {};
  r.body = CreateVariable{scalar, RowRange{0, 1}};
  EXPECT_TRUE(DecodeRequestStatus(EncodeRequest(r), {}).ok());
  r.body = CreateVariable{scalar, RowRange{0, 2}};
  ExpectInvalid(DecodeRequestStatus(EncodeRequest(r), {}), "exceed the 1 rows of shape []");

  spec.initializer.kind = InitValues{TensorRef{1, DType::kF32, Encoding::kRaw, {4, 3}}};
  r.body = CreateVariable{spec, RowRange{2, 6}};
  EXPECT_TRUE(DecodeRequestStatus(EncodeRequest(r), {48}).ok());
  r.body = CreateVariable{spec, RowRange{2, 7}};
  ExpectInvalid(DecodeRequestStatus(EncodeRequest(r), {48}),
                "create_variable.spec.initializer.values: 12 elements, rows [2,7) of shape "
                "[10,3] need 15");
  spec.initializer.kind = InitValues{TensorRef{1, DType::kF64, Encoding::kRaw, {4, 3}}};
  r.body = CreateVariable{spec, RowRange{2, 6}};
  ExpectInvalid(DecodeRequestStatus(EncodeRequest(r), {96}),
                "create_variable.spec.initializer.values: dtype f64 differs from the "
                "variable's f32");
}

// ---------------------------------------------------------------------------
// Unknown enum values and union members (made by patching encoded bytes:
// only protocol.cc sees the generated Cap'n Proto code).

// Encodes `a` and `b` (which differ in one enum field), patches the differing
// byte of a's encoding to `value` and returns the decode status.
template <typename Message>
Status PatchedStatus(const Message& a, const Message& b, uint8_t value,
                     const std::vector<size_t>& sizes) {
  std::vector<std::byte> bytes;
  std::vector<std::byte> other;
  if constexpr (std::is_same_v<Message, Request>) {
    bytes = EncodeRequest(a);
    other = EncodeRequest(b);
  } else {
    bytes = EncodeReply(a);
    other = EncodeReply(b);
  }
  const size_t at = SingleDiff(bytes, other);
  if (at >= bytes.size()) return InternalError("no single differing byte");
  bytes[at] = static_cast<std::byte>(value);
  if constexpr (std::is_same_v<Message, Request>) {
    return DecodeRequest(bytes, sizes).status();
  } else {
    return DecodeReply(bytes, sizes).status();
  }
}

TEST(ProtocolTest, UnknownEnumValuesAreRejectedNamingTheField) {
  // TensorRef dtype and encoding.
  {
    std::vector<size_t> sizes = {16};
    Update u{"a", TensorRef{1, DType::kF32, Encoding::kRaw, {4}}, RowRange{0, 4}};
    Update v = u;
    v.values.dtype = DType::kI32;
    ExpectInvalid(PatchedStatus(PushRequest({u}), PushRequest({v}), 6, sizes),
                  "push.updates[0].values.dtype: unknown value 6");
    v = u;
    v.values.encoding = Encoding::kF16;
    ExpectInvalid(PatchedStatus(PushRequest({u}), PushRequest({v}), 3, sizes),
                  "push.updates[0].values.encoding: unknown value 3");
  }
  // Read encoding.
  {
    Request a, b;
    a.body = Pull{{{"x", Encoding::kRaw, RowRange{0, 1}}}};
    b.body = Pull{{{"x", Encoding::kBF16, RowRange{0, 1}}}};
    ExpectInvalid(PatchedStatus(a, b, 200, {}), "pull.reads[0].encoding: unknown value 200");
  }
  // VariableSpec dtype, optimizer kind, aggregation; hello role.
  {
    Request a, b;
    VariableSpec spec = samples::SampleSpec(Initializer{});
    a.body = CreateVariable{spec, RowRange{0, 1}};
    VariableSpec other = spec;
    other.dtype = DType::kF64;
    b.body = CreateVariable{other, RowRange{0, 1}};
    ExpectInvalid(PatchedStatus(a, b, 9, {}), "create_variable.spec.dtype: unknown value 9");
    other = spec;
    other.optimizer.kind = OptimizerKind::kSgd;
    b.body = CreateVariable{other, RowRange{0, 1}};
    ExpectInvalid(PatchedStatus(a, b, 5, {}),
                  "create_variable.spec.optimizer.kind: unknown value 5");
    other = spec;
    other.aggregation = Aggregation::kMean;
    b.body = CreateVariable{other, RowRange{0, 1}};
    ExpectInvalid(PatchedStatus(a, b, 2, {}), "create_variable.spec.aggregation: unknown value 2");
    // Initializer kind: zeros (0) and glorot_uniform (5) are both Void.
    VariableSpec zeros = spec, glorot = spec;
    zeros.initializer.kind = InitZeros{};
    glorot.initializer.kind = InitGlorotUniform{};
    a.body = CreateVariable{zeros, RowRange{0, 1}};
    b.body = CreateVariable{glorot, RowRange{0, 1}};
    ExpectInvalid(PatchedStatus(a, b, 6, {}), "create_variable.spec.initializer: unknown");
  }
  {
    Request a, b;
    a.body = Hello{kProtocolVersion, Role::kWorker, 0, 1, 1, 0};
    b.body = Hello{kProtocolVersion, Role::kControl, 0, 1, 1, 0};
    ExpectInvalid(PatchedStatus(a, b, 2, {}), "hello.role: unknown value 2");
  }
}

// Offset of the 16-bit little-endian field that holds `va` in `a` and `vb`
// in `b` at the same position (the union discriminant).
size_t FindU16(const std::vector<std::byte>& a, const std::vector<std::byte>& b, uint16_t va,
               uint16_t vb) {
  size_t found = a.size();
  int count = 0;
  for (size_t i = 8; i + 2 <= a.size() && i + 2 <= b.size(); i += 2) {
    uint16_t x, y;
    std::memcpy(&x, a.data() + i, 2);
    std::memcpy(&y, b.data() + i, 2);
    if (x == va && y == vb) {
      found = i;
      ++count;
    }
  }
  EXPECT_EQ(count, 1);
  return found;
}

TEST(ProtocolTest, UnknownUnionMembersAreRejected) {
  // Request body: heartbeat is member 1, stats member 10.
  Request heartbeat;
  heartbeat.request_id = 0x5555555555555555;
  heartbeat.worker_id = 0x66666666;
  heartbeat.clock = 0x7777777777777777;
  Request stats = heartbeat;
  stats.body = Stats{};
  auto bytes = EncodeRequest(heartbeat);
  const size_t at = FindU16(bytes, EncodeRequest(stats), 1, 10);
  ASSERT_LT(at, bytes.size());
  bytes[at] = std::byte{40};
  ExpectInvalid(DecodeRequestStatus(bytes, {}), "request: unknown body type 40");

  // Reply body: none is member 0, checkpoint member 3.
  Reply none;
  none.request_id = 0x5555555555555555;
  none.code = StatusCode::kAborted;
  none.min_clock = 0x7777777777777777;
  none.shard_clock = 0x7777777777777777;
  Reply checkpoint = none;
  checkpoint.body = CheckpointReply{};
  auto reply_bytes = EncodeReply(none);
  const size_t reply_at = FindU16(reply_bytes, EncodeReply(checkpoint), 0, 3);
  ASSERT_LT(reply_at, reply_bytes.size());
  reply_bytes[reply_at] = std::byte{9};
  ExpectInvalid(DecodeReplyStatus(reply_bytes, {}), "reply: unknown body type 9");
}

TEST(ProtocolTest, UnknownStatusCodeDecodesAsUnknown) {
  Reply a, b;
  a.code = StatusCode::kAborted;
  a.message = "m";
  b = a;
  b.code = StatusCode::kCancelled;
  auto bytes = EncodeReply(a);
  const size_t at = SingleDiff(bytes, EncodeReply(b));
  ASSERT_LT(at, bytes.size());
  bytes[at] = std::byte{99};
  auto decoded = DecodeReply(bytes, {});
  ASSERT_TRUE(decoded.ok()) << decoded.status();
  EXPECT_EQ(decoded->code, StatusCode::kUnknown);
  EXPECT_EQ(decoded->status().code(), StatusCode::kUnknown);
  EXPECT_EQ(decoded->message, "m");
}

}  // namespace
}  // namespace distval::protocol
