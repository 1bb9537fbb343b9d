// The codec between distval::protocol values and frame 0 of a message. This
// is the only file that includes the generated Cap'n Proto header: kj and
// capnp exceptions stop here and become Status.
#include "distval/protocol.h"

#include <capnp/message.h>
#include <capnp/serialize.h>
#include <kj/exception.h>
#include <kj/io.h>

#include <array>
#include <cstring>
#include <exception>
#include <limits>
#include <memory>
#include <optional>
#include <string>
#include <utility>

#include "distval.capnp.h"

namespace distval::protocol {
namespace {

// The C++ enums mirror the schema's numbering; casts between them rely on it.
template <typename A, typename B>
constexpr bool SameValue(A a, B b) {
  return static_cast<int>(a) == static_cast<int>(b);
}
static_assert(SameValue(wire::DType::F32, DType::kF32) &&
              SameValue(wire::DType::F16, DType::kF16) &&
              SameValue(wire::DType::BF16, DType::kBF16) &&
              SameValue(wire::DType::F64, DType::kF64) &&
              SameValue(wire::DType::I32, DType::kI32) && SameValue(wire::DType::I64, DType::kI64));
static_assert(SameValue(wire::Encoding::RAW, Encoding::kRaw) &&
              SameValue(wire::Encoding::F16, Encoding::kF16) &&
              SameValue(wire::Encoding::BF16, Encoding::kBF16));
static_assert(SameValue(wire::OptimizerKind::SGD, OptimizerKind::kSgd) &&
              SameValue(wire::OptimizerKind::MOMENTUM, OptimizerKind::kMomentum) &&
              SameValue(wire::OptimizerKind::ADAGRAD, OptimizerKind::kAdagrad) &&
              SameValue(wire::OptimizerKind::ADAM, OptimizerKind::kAdam) &&
              SameValue(wire::OptimizerKind::ADAMW, OptimizerKind::kAdamW));
static_assert(SameValue(wire::Aggregation::MEAN, Aggregation::kMean) &&
              SameValue(wire::Aggregation::SUM, Aggregation::kSum));
static_assert(SameValue(wire::Hello::Role::WORKER, Role::kWorker) &&
              SameValue(wire::Hello::Role::CONTROL, Role::kControl));
// Number of values of each enum this version knows.
constexpr int kNumOptimizerKinds = 5;
constexpr int kNumAggregations = 2;
constexpr int kNumRoles = 2;

template <typename... Fs>
struct Overloaded : Fs... {
  using Fs::operator()...;
};
template <typename... Fs>
Overloaded(Fs...) -> Overloaded<Fs...>;

// ---------------------------------------------------------------------------
// Encoding

// Words a struct of type T occupies (data + pointer sections).
template <typename T>
constexpr size_t StructWords() {
  return T::_capnpPrivate::dataWordSize + T::_capnpPrivate::pointerCount;
}
// Words of a Text blob (NUL terminator included, padded to a word).
size_t TextWords(size_t bytes) { return (bytes + 1 + 7) / 8; }
// Words of a List(Int64) / List(UInt64) body.
size_t Int64ListWords(size_t n) { return n; }
// Words of a List(struct T) body: tag word + elements.
template <typename T>
size_t StructListWords(size_t n) {
  return 1 + n * StructWords<T>();
}
size_t RefWords(const TensorRef& ref) {
  return StructWords<wire::TensorRef>() + Int64ListWords(ref.shape.size());
}
size_t SelectionWords(const RowSelection& rows) {
  if (const auto* ref = std::get_if<TensorRef>(&rows)) return RefWords(*ref);
  return StructWords<wire::RowRange>();
}

// Upper bound of the words a request body occupies in the builder's segment.
size_t BodyWords(const RequestBody& body) {
  return std::visit(
      Overloaded{
          [](const Hello&) { return StructWords<wire::Hello>(); },
          [](const Heartbeat&) -> size_t { return 0; },
          [](const CreateVariable& b) {
            const VariableSpec& s = b.spec;
            size_t words = StructWords<wire::CreateVariable>() + StructWords<wire::VariableSpec>() +
                           TextWords(s.name.size()) + Int64ListWords(s.shape.size()) +
                           StructWords<wire::Initializer>() + StructWords<wire::OptimizerSpec>() +
                           StructWords<wire::RowRange>();
            if (const auto* v = std::get_if<InitValues>(&s.initializer.kind))
              words += RefWords(v->values);
            return words;
          },
          [](const Push& b) {
            size_t words =
                StructWords<wire::Push>() + StructListWords<wire::Update>(b.updates.size());
            for (const Update& u : b.updates)
              words += TextWords(u.variable.size()) + RefWords(u.values) + SelectionWords(u.rows);
            return words;
          },
          [](const Pull& b) {
            size_t words = StructWords<wire::Pull>() + StructListWords<wire::Read>(b.reads.size());
            for (const Read& r : b.reads)
              words += TextWords(r.variable.size()) + SelectionWords(r.rows);
            return words;
          },
          [](const AdvanceClock&) { return StructWords<wire::AdvanceClock>(); },
          [](const Barrier& b) { return StructWords<wire::Barrier>() + TextWords(b.name.size()); },
          [](const SetMode& b) {
            return StructWords<wire::SetMode>() + TextWords(b.variable.size());
          },
          [](const SetLearningRate& b) {
            return StructWords<wire::SetLearningRate>() + TextWords(b.variable.size());
          },
          [](const Checkpoint& b) {
            return StructWords<wire::Checkpoint>() + TextWords(b.directory.size());
          },
          [](const Stats&) { return StructWords<wire::Stats>(); },
          [](const Shutdown&) { return StructWords<wire::Shutdown>(); },
          [](const PushChunk&) { return StructWords<wire::PushChunk>(); },
      },
      body);
}

size_t BodyWords(const ReplyBody& body) {
  return std::visit(Overloaded{
                        [](const NoBody&) -> size_t { return 0; },
                        [](const HelloReply&) { return StructWords<wire::HelloReply>(); },
                        [](const PullReply& b) {
                          size_t words = StructWords<wire::PullReply>() +
                                         StructListWords<wire::TensorRef>(b.tensors.size()) +
                                         Int64ListWords(b.versions.size());
                          for (const TensorRef& t : b.tensors)
                            words += Int64ListWords(t.shape.size());
                          return words;
                        },
                        [](const CheckpointReply& b) {
                          return StructWords<wire::CheckpointReply>() + TextWords(b.path.size());
                        },
                        [](const PullChunk&) { return StructWords<wire::PullChunk>(); },
                        [](const StatsReply& b) {
                          size_t words =
                              StructWords<wire::StatsReply>() +
                              StructListWords<wire::StatsReply::WorkerState>(b.workers.size()) +
                              StructListWords<wire::StatsReply::VariableState>(b.variables.size()) +
                              TextWords(b.last_checkpoint.size());
                          for (const VariableState& v : b.variables)
                            words += TextWords(v.name.size()) + StructWords<wire::RowRange>();
                          return words;
                        },
                    },
                    body);
}

capnp::Text::Reader AsText(const std::string& s) { return capnp::Text::Reader(s.data(), s.size()); }

void SetShape(capnp::List<int64_t>::Builder out, const std::vector<int64_t>& shape) {
  for (unsigned i = 0; i < shape.size(); ++i) out.set(i, shape[i]);
}

void SetRef(wire::TensorRef::Builder out, const TensorRef& ref) {
  out.setFrame(ref.frame);
  out.setDtype(static_cast<wire::DType>(ref.dtype));
  out.setEncoding(static_cast<wire::Encoding>(ref.encoding));
  SetShape(out.initShape(static_cast<unsigned>(ref.shape.size())), ref.shape);
}

void SetRange(wire::RowRange::Builder out, const RowRange& range) {
  out.setBegin(range.begin);
  out.setEnd(range.end);
}

// Update and Read share the dense/sparse union.
template <typename Builder>
void SetSelection(Builder out, const RowSelection& rows) {
  std::visit(Overloaded{
                 [&](const RowRange& r) { SetRange(out.initDense(), r); },
                 [&](const TensorRef& t) { SetRef(out.initSparse(), t); },
             },
             rows);
}

void SetInitializer(wire::Initializer::Builder out, const Initializer& init) {
  out.setSeed(init.seed);
  std::visit(Overloaded{
                 [&](const InitZeros&) { out.setZeros(); },
                 [&](const InitConstant& k) { out.setConstant(k.value); },
                 [&](const InitUniform& k) {
                   auto u = out.initUniform();
                   u.setLow(k.low);
                   u.setHigh(k.high);
                 },
                 [&](const InitNormal& k) {
                   auto n = out.initNormal();
                   n.setMean(k.mean);
                   n.setStddev(k.stddev);
                 },
                 [&](const InitGlorotUniform&) { out.setGlorotUniform(); },
                 [&](const InitValues& k) { SetRef(out.initValues(), k.values); },
             },
             init.kind);
}

void SetSpec(wire::VariableSpec::Builder out, const VariableSpec& spec) {
  out.setName(AsText(spec.name));
  out.setDtype(static_cast<wire::DType>(spec.dtype));
  SetShape(out.initShape(static_cast<unsigned>(spec.shape.size())), spec.shape);
  SetInitializer(out.initInitializer(), spec.initializer);
  auto opt = out.initOptimizer();
  const OptimizerSpec& o = spec.optimizer;
  opt.setKind(static_cast<wire::OptimizerKind>(o.kind));
  opt.setLearningRate(o.learning_rate);
  opt.setMomentum(o.momentum);
  opt.setNesterov(o.nesterov);
  opt.setBeta1(o.beta1);
  opt.setBeta2(o.beta2);
  opt.setEpsilon(o.epsilon);
  opt.setWeightDecay(o.weight_decay);
  opt.setInitialAccumulator(o.initial_accumulator);
  out.setAggregation(static_cast<wire::Aggregation>(spec.aggregation));
  out.setStaleness(spec.staleness);
}

void SetRequest(wire::Request::Builder out, const Request& request) {
  out.setRequestId(request.request_id);
  out.setWorkerId(request.worker_id);
  out.setClock(request.clock);
  std::visit(
      Overloaded{
          [&](const Hello& b) {
            auto h = out.initHello();
            h.setProtocolVersion(b.protocol_version);
            h.setRole(static_cast<wire::Hello::Role>(b.role));
            h.setWorkerIndex(b.worker_index);
            h.setNumWorkers(b.num_workers);
            h.setNumShards(b.num_shards);
            h.setStaleness(b.staleness);
          },
          [&](const Heartbeat&) { out.setHeartbeat(); },
          [&](const CreateVariable& b) {
            auto c = out.initCreateVariable();
            SetSpec(c.initSpec(), b.spec);
            SetRange(c.initRows(), b.rows);
          },
          [&](const Push& b) {
            auto p = out.initPush();
            auto updates = p.initUpdates(static_cast<unsigned>(b.updates.size()));
            for (unsigned i = 0; i < b.updates.size(); ++i) {
              const Update& u = b.updates[i];
              auto w = updates[i];
              w.setVariable(AsText(u.variable));
              SetRef(w.initValues(), u.values);
              SetSelection(w, u.rows);
            }
            p.setAdvanceClock(b.advance_clock);
            p.setChunks(b.chunks);
          },
          [&](const Pull& b) {
            auto pull = out.initPull();
            pull.setChunkBytes(b.chunk_bytes);
            auto reads = pull.initReads(static_cast<unsigned>(b.reads.size()));
            for (unsigned i = 0; i < b.reads.size(); ++i) {
              const Read& r = b.reads[i];
              auto w = reads[i];
              w.setVariable(AsText(r.variable));
              w.setEncoding(static_cast<wire::Encoding>(r.encoding));
              SetSelection(w, r.rows);
            }
          },
          [&](const AdvanceClock& b) { out.initAdvanceClock().setTo(b.to); },
          [&](const Barrier& b) { out.initBarrier().setName(AsText(b.name)); },
          [&](const SetMode& b) {
            auto m = out.initSetMode();
            m.setStaleness(b.staleness);
            m.setVariable(AsText(b.variable));
            m.setStaleAwareLr(b.stale_aware_lr);
            m.setAtClock(b.at_clock);
          },
          [&](const SetLearningRate& b) {
            auto l = out.initSetLearningRate();
            l.setVariable(AsText(b.variable));
            l.setLearningRate(b.learning_rate);
          },
          [&](const Checkpoint& b) { out.initCheckpoint().setDirectory(AsText(b.directory)); },
          [&](const Stats&) { out.initStats(); },
          [&](const Shutdown& b) { out.initShutdown().setCheckpointFirst(b.checkpoint_first); },
          [&](const PushChunk& b) { out.initPushChunk().setOffset(b.offset); },
      },
      request.body);
}

// Offset of the first byte of `s` that does not start (or continue) a
// well-formed UTF-8 sequence (RFC 3629: no overlong forms, surrogates or
// code points above U+10FFFF); npos when `s` is valid.
size_t InvalidUtf8At(std::string_view s) {
  size_t i = 0;
  while (i < s.size()) {
    const auto c = static_cast<unsigned char>(s[i]);
    if (c < 0x80) {
      ++i;
      continue;
    }
    size_t len;
    unsigned char lo = 0x80, hi = 0xBF;  // bounds of the second byte
    if (c >= 0xC2 && c <= 0xDF) {
      len = 2;
    } else if (c >= 0xE0 && c <= 0xEF) {
      len = 3;
      if (c == 0xE0) lo = 0xA0;  // overlong
      if (c == 0xED) hi = 0x9F;  // surrogates
    } else if (c >= 0xF0 && c <= 0xF4) {
      len = 4;
      if (c == 0xF0) lo = 0x90;  // overlong
      if (c == 0xF4) hi = 0x8F;  // above U+10FFFF
    } else {
      return i;
    }
    if (s.size() - i < len) return i;
    for (size_t k = 1; k < len; ++k) {
      const auto b = static_cast<unsigned char>(s[i + k]);
      if (b < (k == 1 ? lo : 0x80) || b > (k == 1 ? hi : 0xBF)) return i;
    }
    i += len;
  }
  return std::string_view::npos;
}

// Cuts `message` to at most `limit` bytes, at a UTF-8 boundary, ending in
// "..." when something was cut.
std::string_view Truncated(const std::string& message, size_t limit, std::string* storage) {
  constexpr std::string_view kEllipsis = "...";
  if (message.size() <= limit) return message;
  const bool ellipsis = limit >= kEllipsis.size();
  size_t cut = ellipsis ? limit - kEllipsis.size() : limit;
  // Do not cut inside a UTF-8 sequence: back up over continuation bytes.
  while (cut > 0 && (static_cast<unsigned char>(message[cut]) & 0xC0) == 0x80) --cut;
  storage->assign(message, 0, cut);
  if (ellipsis) storage->append(kEllipsis);
  return *storage;
}

// `message` with every byte that breaks UTF-8 replaced by '?' (the decoder
// refuses text that is not UTF-8; a server's message may quote anything).
std::string_view ValidUtf8(std::string_view message, std::string* storage) {
  size_t bad = InvalidUtf8At(message);
  if (bad == std::string_view::npos) return message;
  std::string out(message);
  while (bad != std::string_view::npos) {
    out[bad] = '?';
    const size_t next = InvalidUtf8At(std::string_view(out).substr(bad + 1));
    bad = next == std::string_view::npos ? next : bad + 1 + next;
  }
  *storage = std::move(out);
  return *storage;
}

void SetReply(wire::Reply::Builder out, const Reply& reply) {
  out.setRequestId(reply.request_id);
  out.setCode(static_cast<int32_t>(reply.code));
  std::string storage;
  std::string utf8;
  std::string_view message =
      ValidUtf8(Truncated(reply.message, DecodeLimits{}.max_text_bytes, &storage), &utf8);
  if (!message.empty()) out.setMessage(capnp::Text::Reader(message.data(), message.size()));
  out.setMinClock(reply.min_clock);
  out.setShardClock(reply.shard_clock);
  std::visit(Overloaded{
                 [&](const NoBody&) { out.setNone(); },
                 [&](const HelloReply& b) {
                   auto h = out.initHello();
                   h.setProtocolVersion(b.protocol_version);
                   h.setShardIndex(b.shard_index);
                   h.setNumShards(b.num_shards);
                   h.setNumWorkers(b.num_workers);
                   h.setStaleness(b.staleness);
                   h.setClock(b.clock);
                   h.setIncarnation(b.incarnation);
                   h.setNumVariables(b.num_variables);
                   h.setRestoredClock(b.restored_clock);
                 },
                 [&](const PullReply& b) {
                   auto p = out.initPull();
                   auto tensors = p.initTensors(static_cast<unsigned>(b.tensors.size()));
                   for (unsigned i = 0; i < b.tensors.size(); ++i) SetRef(tensors[i], b.tensors[i]);
                   auto versions = p.initVersions(static_cast<unsigned>(b.versions.size()));
                   for (unsigned i = 0; i < b.versions.size(); ++i) versions.set(i, b.versions[i]);
                   p.setChunks(b.chunks);
                 },
                 [&](const PullChunk& b) {
                   auto c = out.initPullChunk();
                   c.setTensor(b.tensor);
                   c.setOffset(b.offset);
                 },
                 [&](const CheckpointReply& b) {
                   auto c = out.initCheckpoint();
                   c.setPath(AsText(b.path));
                   c.setClock(b.clock);
                 },
                 [&](const StatsReply& b) {
                   auto s = out.initStats();
                   s.setShardIndex(b.shard_index);
                   s.setStaleness(b.staleness);
                   auto workers = s.initWorkers(static_cast<unsigned>(b.workers.size()));
                   for (unsigned i = 0; i < b.workers.size(); ++i) {
                     workers[i].setWorkerId(b.workers[i].worker_id);
                     workers[i].setClock(b.workers[i].clock);
                     workers[i].setLive(b.workers[i].live);
                   }
                   auto vars = s.initVariables(static_cast<unsigned>(b.variables.size()));
                   for (unsigned i = 0; i < b.variables.size(); ++i) {
                     const VariableState& v = b.variables[i];
                     vars[i].setName(AsText(v.name));
                     SetRange(vars[i].initRows(), v.rows);
                     vars[i].setBytes(v.bytes);
                     vars[i].setVersion(v.version);
                     vars[i].setLearningRate(v.learning_rate);
                   }
                   s.setLastCheckpoint(AsText(b.last_checkpoint));
                   s.setNanUpdates(b.nan_updates);
                 },
             },
             reply.body);
}

// Headers up to this many words are built in a zeroed stack buffer; larger
// ones in one heap segment of the estimated size.
constexpr size_t kStackSegmentWords = 512;

// Builds a message whose root is filled by `fill(root_builder)` in a first
// segment of `estimate_words`, and returns the flat stream encoding.
template <typename Root, typename Fill>
std::vector<std::byte> BuildFlat(size_t estimate_words, Fill fill) {
  // Slack for rounding and the root pointer.
  estimate_words += 8;
  alignas(8) std::array<std::byte, kStackSegmentWords * sizeof(capnp::word)> stack;
  std::optional<capnp::MallocMessageBuilder> builder;
  if (estimate_words <= kStackSegmentWords) {
    // A caller-provided first segment must be zeroed.
    std::memset(stack.data(), 0, estimate_words * sizeof(capnp::word));
    builder.emplace(kj::arrayPtr(reinterpret_cast<capnp::word*>(stack.data()), estimate_words));
  } else {
    builder.emplace(static_cast<unsigned>(estimate_words));
  }
  fill(builder->initRoot<Root>());
  std::vector<std::byte> out(capnp::computeSerializedSizeInWords(*builder) * sizeof(capnp::word));
  kj::ArrayOutputStream stream(kj::arrayPtr(reinterpret_cast<kj::byte*>(out.data()), out.size()));
  capnp::writeMessage(stream, *builder);
  return out;
}

// ---------------------------------------------------------------------------
// Decoding

// A field path kept on the stack while decoding and formatted only for an
// error message: "push.updates[2].values". Each node must outlive its
// children, so build them as named locals.
struct Path {
  const Path* parent = nullptr;
  std::string_view name;
  int64_t index = -1;  // >= 0: "name[index]"

  Path Field(std::string_view field) const { return Path{this, field, -1}; }
  Path Element(std::string_view field, size_t i) const {
    return Path{this, field, static_cast<int64_t>(i)};
  }
  std::string ToString() const {
    std::string s = parent != nullptr ? parent->ToString() : std::string();
    if (!name.empty()) {
      if (!s.empty()) s += '.';
      s += name;
    }
    if (index >= 0) s += "[" + std::to_string(index) + "]";
    return s;
  }
};

std::string ShapeString(const std::vector<int64_t>& shape) {
  std::string s = "[";
  for (size_t i = 0; i < shape.size(); ++i) {
    if (i > 0) s += ',';
    s += std::to_string(shape[i]);
  }
  return s + "]";
}

// Decodes wire values into protocol values, checking every limit and
// bookkeeping which payload frames TensorRefs use.
class Decoder {
 public:
  Decoder(std::span<const size_t> payload_sizes, const DecodeLimits& limits)
      : payload_sizes_(payload_sizes), limits_(limits) {
    if (payload_sizes_.size() > 64) used_large_.resize(payload_sizes_.size(), false);
  }

  Status Error(const Path& path, std::string_view what) const {
    return InvalidArgumentError(path.ToString() + ": " + std::string(what));
  }

  Status ListSize(size_t n, const Path& path) const {
    if (n > limits_.max_list_entries)
      return Error(path, "list of " + std::to_string(n) + " entries exceeds the limit of " +
                             std::to_string(limits_.max_list_entries));
    return OkStatus();
  }

  Status Text(capnp::Text::Reader in, const Path& path, std::string* out) const {
    if (in.size() > limits_.max_text_bytes)
      return Error(path, "text of " + std::to_string(in.size()) + " bytes exceeds the limit of " +
                             std::to_string(limits_.max_text_bytes));
    // Cap'n Proto Text is UTF-8; names end up in JSON (checkpoint
    // manifests), which refuses anything else.
    if (const size_t bad = InvalidUtf8At(std::string_view(in.begin(), in.size()));
        bad != std::string_view::npos)
      return Error(path, "text is not valid UTF-8 (byte " + std::to_string(bad) + ")");
    out->assign(in.begin(), in.size());
    return OkStatus();
  }

  // Enum field `in` of a wire enum with `count` values.
  template <typename Out, typename In>
  Status Enum(In in, int count, const Path& path, Out* out) const {
    const auto raw = static_cast<uint16_t>(in);
    if (raw >= count)
      return Error(path, "unknown value " + std::to_string(raw) + " (this version knows 0.." +
                             std::to_string(count - 1) + ")");
    *out = static_cast<Out>(raw);
    return OkStatus();
  }

  // A shape: rank <= max_rank, dims >= 0, element count within int64.
  Status Shape(capnp::List<int64_t>::Reader in, const Path& path, std::vector<int64_t>* out,
               int64_t* num_elements) const {
    if (in.size() > limits_.max_rank)
      return Error(path, "rank " + std::to_string(in.size()) + " exceeds the limit of " +
                             std::to_string(limits_.max_rank));
    out->resize(in.size());
    int64_t n = 1;
    for (unsigned i = 0; i < in.size(); ++i) {
      const int64_t d = in[i];
      (*out)[i] = d;
      if (d < 0)
        return Error(path,
                     "dimension " + std::to_string(i) + " is negative (" + std::to_string(d) + ")");
      if (d != 0 && n > std::numeric_limits<int64_t>::max() / d)
        return Error(path, "element count overflows at dimension " + std::to_string(i));
      n *= d;
    }
    *num_elements = n;
    return OkStatus();
  }

  Status Range(wire::RowRange::Reader in, const Path& path, RowRange* out) const {
    out->begin = in.getBegin();
    out->end = in.getEnd();
    if (out->begin < 0 || out->end < out->begin)
      return Error(path, "invalid row range [" + std::to_string(out->begin) + "," +
                             std::to_string(out->end) + ")");
    return OkStatus();
  }

  // A TensorRef: enums, encoding allowed for the dtype, shape, and its frame
  // (in range, unused so far, of exactly the bytes the shape needs).
  // `deferred`: the values travel outside this message (a chunked push or
  // pull reply): frame must be 0 and no frame is taken.
  Status Ref(wire::TensorRef::Reader in, const Path& path, TensorRef* out, bool deferred = false) {
    const Path dtype_path = path.Field("dtype");
    DV_RETURN_IF_ERROR(Enum(in.getDtype(), kNumDTypes, dtype_path, &out->dtype));
    const Path encoding_path = path.Field("encoding");
    DV_RETURN_IF_ERROR(Enum(in.getEncoding(), kNumEncodings, encoding_path, &out->encoding));
    if (out->encoding != Encoding::kRaw && out->dtype != DType::kF32)
      return Error(path, "encoding " + std::string(EncodingName(out->encoding)) +
                             " needs dtype f32, not " + std::string(DTypeName(out->dtype)));
    int64_t n = 0;
    const Path shape_path = path.Field("shape");
    DV_RETURN_IF_ERROR(Shape(in.getShape(), shape_path, &out->shape, &n));
    const size_t element_size = EncodedElementSize(out->dtype, out->encoding);
    if (n > std::numeric_limits<int64_t>::max() / static_cast<int64_t>(element_size))
      return Error(path, "byte size of shape " + ShapeString(out->shape) + " overflows");
    const size_t need = static_cast<size_t>(n) * element_size;

    const uint32_t frame = in.getFrame();
    out->frame = frame;
    if (deferred) {
      if (frame != 0)
        return Error(path, "frame " + std::to_string(frame) +
                               " given for values that follow in chunks (must be 0)");
      return OkStatus();
    }
    if (frame == 0 || frame > payload_sizes_.size()) {
      const size_t n = payload_sizes_.size();
      return Error(path, "frame " + std::to_string(frame) + " is out of range (" +
                             (n == 0 ? std::string("the message has no payload frames")
                                     : "valid: 1.." + std::to_string(n)) +
                             ")");
    }
    if (TestAndSetUsed(frame - 1))
      return Error(path, "frame " + std::to_string(frame) + " is used by another tensor too");
    const size_t have = payload_sizes_[frame - 1];
    if (have != need) {
      std::string what = "frame " + std::to_string(frame) + " has " + std::to_string(have) +
                         " bytes, shape " + ShapeString(out->shape) + " " +
                         std::string(DTypeName(out->dtype));
      if (out->encoding != Encoding::kRaw)
        what += " as " + std::string(EncodingName(out->encoding));
      return Error(path, what + " needs " + std::to_string(need));
    }
    return OkStatus();
  }

  // Takes payload frame `frame` (1-based) as used, whatever its size.
  Status UseFrame(uint32_t frame, const Path& path) {
    if (frame == 0 || frame > payload_sizes_.size())
      return Error(path, "frame " + std::to_string(frame) + " is out of range (the message has " +
                             std::to_string(payload_sizes_.size()) + " payload frames)");
    if (TestAndSetUsed(frame - 1))
      return Error(path, "frame " + std::to_string(frame) + " is used twice");
    return OkStatus();
  }

  // The dense/sparse union of Update and Read. Sparse indices: rank-1 i64.
  template <typename Wire>
  Status Selection(typename Wire::Reader in, const Path& path, RowSelection* out) {
    switch (in.which()) {
      case Wire::DENSE: {
        const Path p = path.Field("dense");
        RowRange range;
        DV_RETURN_IF_ERROR(Range(in.getDense(), p, &range));
        *out = range;
        return OkStatus();
      }
      case Wire::SPARSE: {
        const Path p = path.Field("sparse");
        TensorRef ref;
        DV_RETURN_IF_ERROR(Ref(in.getSparse(), p, &ref));
        if (ref.dtype != DType::kI64 || ref.shape.size() != 1)
          return Error(p, "row indices must be a rank-1 i64 tensor, not " +
                              std::string(DTypeName(ref.dtype)) + " " + ShapeString(ref.shape));
        *out = std::move(ref);
        return OkStatus();
      }
    }
    return Error(path, "unknown row selection " + std::to_string(static_cast<int>(in.which())));
  }

  // After the whole message: every payload frame must have been used.
  Status CheckAllFramesUsed() const {
    for (size_t i = 0; i < payload_sizes_.size(); ++i) {
      const bool used = used_large_.empty() ? (used_small_ >> i) & 1 : used_large_[i];
      if (!used)
        return InvalidArgumentError("unexpected payload frame " + std::to_string(i + 1) +
                                    ": no tensor of the message refers to it");
    }
    return OkStatus();
  }

 private:
  // Marks payload frame `i` (0-based) used; true if it already was.
  bool TestAndSetUsed(size_t i) {
    if (used_large_.empty()) {
      const uint64_t bit = uint64_t{1} << i;
      const bool was = (used_small_ & bit) != 0;
      used_small_ |= bit;
      return was;
    }
    const bool was = used_large_[i];
    used_large_[i] = true;
    return was;
  }

  std::span<const size_t> payload_sizes_;
  const DecodeLimits& limits_;
  uint64_t used_small_ = 0;       // payload frames used, when there are <= 64
  std::vector<bool> used_large_;  // payload frames used, when there are more
};

Status DecodeInitializer(Decoder& d, wire::Initializer::Reader in, const Path& path,
                         Initializer* out) {
  out->seed = in.getSeed();
  switch (in.which()) {
    case wire::Initializer::ZEROS:
      out->kind = InitZeros{};
      return OkStatus();
    case wire::Initializer::CONSTANT:
      out->kind = InitConstant{in.getConstant()};
      return OkStatus();
    case wire::Initializer::UNIFORM: {
      auto u = in.getUniform();
      out->kind = InitUniform{u.getLow(), u.getHigh()};
      return OkStatus();
    }
    case wire::Initializer::NORMAL: {
      auto n = in.getNormal();
      out->kind = InitNormal{n.getMean(), n.getStddev()};
      return OkStatus();
    }
    case wire::Initializer::GLOROT_UNIFORM:
      out->kind = InitGlorotUniform{};
      return OkStatus();
    case wire::Initializer::VALUES: {
      const Path p = path.Field("values");
      InitValues values;
      DV_RETURN_IF_ERROR(d.Ref(in.getValues(), p, &values.values));
      out->kind = std::move(values);
      return OkStatus();
    }
  }
  return d.Error(path, "unknown initializer kind " + std::to_string(static_cast<int>(in.which())));
}

Status DecodeSpec(Decoder& d, wire::VariableSpec::Reader in, const Path& path, VariableSpec* out) {
  const Path name_path = path.Field("name");
  DV_RETURN_IF_ERROR(d.Text(in.getName(), name_path, &out->name));
  const Path dtype_path = path.Field("dtype");
  DV_RETURN_IF_ERROR(d.Enum(in.getDtype(), kNumDTypes, dtype_path, &out->dtype));
  const Path shape_path = path.Field("shape");
  int64_t n = 0;
  DV_RETURN_IF_ERROR(d.Shape(in.getShape(), shape_path, &out->shape, &n));
  if (n > std::numeric_limits<int64_t>::max() / static_cast<int64_t>(DTypeSize(out->dtype)))
    return d.Error(shape_path, "byte size of shape " + ShapeString(out->shape) + " overflows");
  const Path init_path = path.Field("initializer");
  DV_RETURN_IF_ERROR(DecodeInitializer(d, in.getInitializer(), init_path, &out->initializer));
  const Path opt_path = path.Field("optimizer");
  auto opt = in.getOptimizer();
  OptimizerSpec& o = out->optimizer;
  const Path kind_path = opt_path.Field("kind");
  DV_RETURN_IF_ERROR(d.Enum(opt.getKind(), kNumOptimizerKinds, kind_path, &o.kind));
  o.learning_rate = opt.getLearningRate();
  o.momentum = opt.getMomentum();
  o.nesterov = opt.getNesterov();
  o.beta1 = opt.getBeta1();
  o.beta2 = opt.getBeta2();
  o.epsilon = opt.getEpsilon();
  o.weight_decay = opt.getWeightDecay();
  o.initial_accumulator = opt.getInitialAccumulator();
  const Path agg_path = path.Field("aggregation");
  DV_RETURN_IF_ERROR(d.Enum(in.getAggregation(), kNumAggregations, agg_path, &out->aggregation));
  out->staleness = in.getStaleness();
  return OkStatus();
}

Status DecodeCreateVariable(Decoder& d, wire::CreateVariable::Reader in, const Path& path,
                            CreateVariable* out) {
  const Path spec_path = path.Field("spec");
  DV_RETURN_IF_ERROR(DecodeSpec(d, in.getSpec(), spec_path, &out->spec));
  const Path rows_path = path.Field("rows");
  DV_RETURN_IF_ERROR(d.Range(in.getRows(), rows_path, &out->rows));
  const std::vector<int64_t>& shape = out->spec.shape;
  const int64_t total_rows = shape.empty() ? 1 : shape[0];
  if (out->rows.end > total_rows)
    return d.Error(rows_path, "rows [" + std::to_string(out->rows.begin) + "," +
                                  std::to_string(out->rows.end) + ") exceed the " +
                                  std::to_string(total_rows) + " rows of shape " +
                                  ShapeString(shape));
  if (const auto* v = std::get_if<InitValues>(&out->spec.initializer.kind)) {
    const Path values_path = spec_path.Field("initializer");
    const Path p = values_path.Field("values");
    if (v->values.dtype != out->spec.dtype)
      return d.Error(p, "dtype " + std::string(DTypeName(v->values.dtype)) +
                            " differs from the variable's " +
                            std::string(DTypeName(out->spec.dtype)));
    int64_t row_elements = 1;
    for (size_t i = 1; i < shape.size(); ++i) row_elements *= shape[i];
    // Cannot overflow: rows <= total_rows and the full count fits int64.
    const int64_t need = out->rows.size() * row_elements;
    if (v->values.num_elements() != need)
      return d.Error(p, std::to_string(v->values.num_elements()) + " elements, rows [" +
                            std::to_string(out->rows.begin) + "," + std::to_string(out->rows.end) +
                            ") of shape " + ShapeString(shape) + " need " + std::to_string(need));
  }
  return OkStatus();
}

Status DecodePush(Decoder& d, wire::Push::Reader in, const Path& path, Push* out) {
  auto updates = in.getUpdates();
  const Path list_path = path.Field("updates");
  DV_RETURN_IF_ERROR(d.ListSize(updates.size(), list_path));
  out->updates.resize(updates.size());
  for (unsigned i = 0; i < updates.size(); ++i) {
    auto u = updates[i];
    Update& o = out->updates[i];
    const Path p = path.Element("updates", i);
    const Path var_path = p.Field("variable");
    DV_RETURN_IF_ERROR(d.Text(u.getVariable(), var_path, &o.variable));
    const Path values_path = p.Field("values");
    // Chunked: the values follow in PushChunk messages, not in frames.
    DV_RETURN_IF_ERROR(
        d.Ref(u.getValues(), values_path, &o.values, /*deferred=*/in.getChunks() > 0));
    DV_RETURN_IF_ERROR(d.Selection<wire::Update>(u, p, &o.rows));
    if (const auto* indices = std::get_if<TensorRef>(&o.rows)) {
      const int64_t n = indices->shape[0];
      if (o.values.shape.empty() || o.values.shape[0] != n)
        return d.Error(values_path, "shape " + ShapeString(o.values.shape) + " does not have " +
                                        std::to_string(n) + " rows, one per sparse row index");
    }
  }
  out->advance_clock = in.getAdvanceClock();
  out->chunks = in.getChunks();
  if (out->chunks > 0 &&
      (out->updates.size() != 1 || !std::holds_alternative<RowRange>(out->updates[0].rows)))
    return d.Error(path.Field("chunks"), "a chunked push carries exactly one dense update, not " +
                                             std::to_string(out->updates.size()) + " update(s)" +
                                             (out->updates.size() == 1 ? " of sparse rows" : ""));
  return OkStatus();
}

Status DecodePull(Decoder& d, wire::Pull::Reader in, const Path& path, Pull* out) {
  auto reads = in.getReads();
  const Path list_path = path.Field("reads");
  DV_RETURN_IF_ERROR(d.ListSize(reads.size(), list_path));
  out->reads.resize(reads.size());
  for (unsigned i = 0; i < reads.size(); ++i) {
    auto r = reads[i];
    Read& o = out->reads[i];
    const Path p = path.Element("reads", i);
    const Path var_path = p.Field("variable");
    DV_RETURN_IF_ERROR(d.Text(r.getVariable(), var_path, &o.variable));
    const Path enc_path = p.Field("encoding");
    DV_RETURN_IF_ERROR(d.Enum(r.getEncoding(), kNumEncodings, enc_path, &o.encoding));
    DV_RETURN_IF_ERROR(d.Selection<wire::Read>(r, p, &o.rows));
  }
  out->chunk_bytes = in.getChunkBytes();
  return OkStatus();
}

Status DecodeRequestRoot(Decoder& d, wire::Request::Reader in, Request* out) {
  out->request_id = in.getRequestId();
  out->worker_id = in.getWorkerId();
  out->clock = in.getClock();
  switch (in.which()) {
    case wire::Request::HELLO: {
      const Path path{nullptr, "hello"};
      auto h = in.getHello();
      Hello b;
      b.protocol_version = h.getProtocolVersion();
      const Path role_path = path.Field("role");
      DV_RETURN_IF_ERROR(d.Enum(h.getRole(), kNumRoles, role_path, &b.role));
      b.worker_index = h.getWorkerIndex();
      b.num_workers = h.getNumWorkers();
      b.num_shards = h.getNumShards();
      b.staleness = h.getStaleness();
      out->body = b;
      return OkStatus();
    }
    case wire::Request::HEARTBEAT:
      out->body = Heartbeat{};
      return OkStatus();
    case wire::Request::CREATE_VARIABLE: {
      const Path path{nullptr, "create_variable"};
      CreateVariable b;
      DV_RETURN_IF_ERROR(DecodeCreateVariable(d, in.getCreateVariable(), path, &b));
      out->body = std::move(b);
      return OkStatus();
    }
    case wire::Request::PUSH: {
      const Path path{nullptr, "push"};
      out->body = Push{};
      return DecodePush(d, in.getPush(), path, &std::get<Push>(out->body));
    }
    case wire::Request::PULL: {
      const Path path{nullptr, "pull"};
      out->body = Pull{};
      return DecodePull(d, in.getPull(), path, &std::get<Pull>(out->body));
    }
    case wire::Request::ADVANCE_CLOCK:
      out->body = AdvanceClock{in.getAdvanceClock().getTo()};
      return OkStatus();
    case wire::Request::BARRIER: {
      const Path path{nullptr, "barrier.name"};
      Barrier b;
      DV_RETURN_IF_ERROR(d.Text(in.getBarrier().getName(), path, &b.name));
      out->body = std::move(b);
      return OkStatus();
    }
    case wire::Request::SET_MODE: {
      const Path path{nullptr, "set_mode.variable"};
      auto m = in.getSetMode();
      SetMode b;
      b.staleness = m.getStaleness();
      DV_RETURN_IF_ERROR(d.Text(m.getVariable(), path, &b.variable));
      b.stale_aware_lr = m.getStaleAwareLr();
      b.at_clock = m.getAtClock();
      out->body = std::move(b);
      return OkStatus();
    }
    case wire::Request::SET_LEARNING_RATE: {
      const Path path{nullptr, "set_learning_rate.variable"};
      auto l = in.getSetLearningRate();
      SetLearningRate b;
      DV_RETURN_IF_ERROR(d.Text(l.getVariable(), path, &b.variable));
      b.learning_rate = l.getLearningRate();
      out->body = std::move(b);
      return OkStatus();
    }
    case wire::Request::CHECKPOINT: {
      const Path path{nullptr, "checkpoint.directory"};
      Checkpoint b;
      DV_RETURN_IF_ERROR(d.Text(in.getCheckpoint().getDirectory(), path, &b.directory));
      out->body = std::move(b);
      return OkStatus();
    }
    case wire::Request::STATS:
      out->body = Stats{};
      return OkStatus();
    case wire::Request::SHUTDOWN:
      out->body = Shutdown{in.getShutdown().getCheckpointFirst()};
      return OkStatus();
    case wire::Request::PUSH_CHUNK: {
      const Path path{nullptr, "push_chunk"};
      out->body = PushChunk{in.getPushChunk().getOffset()};
      return d.UseFrame(1, path.Field("frame"));
    }
  }
  return InvalidArgumentError("request: unknown body type " +
                              std::to_string(static_cast<int>(in.which())));
}

Status DecodeStatsReply(Decoder& d, wire::StatsReply::Reader in, const Path& path,
                        StatsReply* out) {
  out->shard_index = in.getShardIndex();
  out->staleness = in.getStaleness();
  out->nan_updates = in.getNanUpdates();
  auto workers = in.getWorkers();
  const Path workers_path = path.Field("workers");
  DV_RETURN_IF_ERROR(d.ListSize(workers.size(), workers_path));
  out->workers.resize(workers.size());
  for (unsigned i = 0; i < workers.size(); ++i) {
    out->workers[i].worker_id = workers[i].getWorkerId();
    out->workers[i].clock = workers[i].getClock();
    out->workers[i].live = workers[i].getLive();
  }
  auto vars = in.getVariables();
  const Path vars_path = path.Field("variables");
  DV_RETURN_IF_ERROR(d.ListSize(vars.size(), vars_path));
  out->variables.resize(vars.size());
  for (unsigned i = 0; i < vars.size(); ++i) {
    auto v = vars[i];
    VariableState& o = out->variables[i];
    const Path p = path.Element("variables", i);
    const Path name_path = p.Field("name");
    DV_RETURN_IF_ERROR(d.Text(v.getName(), name_path, &o.name));
    auto rows = v.getRows();
    o.rows = RowRange{rows.getBegin(), rows.getEnd()};
    o.bytes = v.getBytes();
    o.version = v.getVersion();
    o.learning_rate = v.getLearningRate();
  }
  const Path last_path = path.Field("last_checkpoint");
  return d.Text(in.getLastCheckpoint(), last_path, &out->last_checkpoint);
}

Status DecodeReplyRoot(Decoder& d, wire::Reply::Reader in, Reply* out) {
  out->request_id = in.getRequestId();
  out->code = StatusCodeFromInt(in.getCode());
  const Path message_path{nullptr, "reply.message"};
  DV_RETURN_IF_ERROR(d.Text(in.getMessage(), message_path, &out->message));
  out->min_clock = in.getMinClock();
  out->shard_clock = in.getShardClock();
  switch (in.which()) {
    case wire::Reply::NONE:
      out->body = NoBody{};
      return OkStatus();
    case wire::Reply::HELLO: {
      auto h = in.getHello();
      out->body = HelloReply{h.getProtocolVersion(), h.getShardIndex(),   h.getNumShards(),
                             h.getNumWorkers(),      h.getStaleness(),    h.getClock(),
                             h.getIncarnation(),     h.getNumVariables(), h.getRestoredClock()};
      return OkStatus();
    }
    case wire::Reply::PULL: {
      const Path path{nullptr, "pull_reply"};
      auto p = in.getPull();
      PullReply b;
      b.chunks = p.getChunks();
      auto tensors = p.getTensors();
      const Path tensors_path = path.Field("tensors");
      DV_RETURN_IF_ERROR(d.ListSize(tensors.size(), tensors_path));
      b.tensors.resize(tensors.size());
      for (unsigned i = 0; i < tensors.size(); ++i) {
        const Path t = path.Element("tensors", i);
        // Chunked: the values follow in PullChunk messages, not in frames.
        DV_RETURN_IF_ERROR(d.Ref(tensors[i], t, &b.tensors[i], /*deferred=*/b.chunks > 0));
      }
      auto versions = p.getVersions();
      const Path versions_path = path.Field("versions");
      DV_RETURN_IF_ERROR(d.ListSize(versions.size(), versions_path));
      b.versions.resize(versions.size());
      for (unsigned i = 0; i < versions.size(); ++i) b.versions[i] = versions[i];
      out->body = std::move(b);
      return OkStatus();
    }
    case wire::Reply::PULL_CHUNK: {
      const Path path{nullptr, "pull_chunk"};
      auto c = in.getPullChunk();
      out->body = PullChunk{c.getTensor(), c.getOffset()};
      return d.UseFrame(1, path.Field("frame"));
    }
    case wire::Reply::CHECKPOINT: {
      const Path path{nullptr, "checkpoint_reply.path"};
      auto c = in.getCheckpoint();
      CheckpointReply b;
      DV_RETURN_IF_ERROR(d.Text(c.getPath(), path, &b.path));
      b.clock = c.getClock();
      out->body = std::move(b);
      return OkStatus();
    }
    case wire::Reply::STATS: {
      const Path path{nullptr, "stats_reply"};
      out->body = StatsReply{};
      return DecodeStatsReply(d, in.getStats(), path, &std::get<StatsReply>(out->body));
    }
  }
  return InvalidArgumentError("reply: unknown body type " +
                              std::to_string(static_cast<int>(in.which())));
}

// Headers up to this size are realigned on the stack; larger ones on the heap.
constexpr size_t kStackHeaderWords = 256;

// Opens `header` as a flat Cap'n Proto message with the limits applied and
// calls `fn(root_reader, decoder)`. Exceptions from kj/capnp become
// InvalidArgument.
template <typename Root, typename Fn>
Status WithRoot(std::span<const std::byte> header, std::span<const size_t> payload_sizes,
                const DecodeLimits& limits, Fn fn) {
  if (header.empty()) return InvalidArgumentError("header: empty");
  if (header.size() % sizeof(capnp::word) != 0)
    return InvalidArgumentError("header: " + std::to_string(header.size()) +
                                " bytes is not a whole number of 8-byte words");
  const size_t num_words = header.size() / sizeof(capnp::word);
  const capnp::word* words = reinterpret_cast<const capnp::word*>(header.data());
  alignas(8) std::array<std::byte, kStackHeaderWords * sizeof(capnp::word)> stack;
  std::unique_ptr<uint64_t[]> heap;
  if (reinterpret_cast<uintptr_t>(header.data()) % alignof(uint64_t) != 0) {
    std::byte* aligned = stack.data();
    if (num_words > kStackHeaderWords) {
      heap = std::make_unique_for_overwrite<uint64_t[]>(num_words);
      aligned = reinterpret_cast<std::byte*>(heap.get());
    }
    std::memcpy(aligned, header.data(), header.size());
    words = reinterpret_cast<const capnp::word*>(aligned);
  }
  try {
    capnp::ReaderOptions options;
    options.traversalLimitInWords = limits.traversal_limit_words;
    options.nestingLimit = limits.nesting_limit;
    capnp::FlatArrayMessageReader reader(kj::arrayPtr(words, num_words), options);
    if (reader.getEnd() != words + num_words)
      return InvalidArgumentError(
          "header: " + std::to_string((words + num_words - reader.getEnd()) * sizeof(capnp::word)) +
          " trailing bytes after the message");
    Decoder decoder(payload_sizes, limits);
    DV_RETURN_IF_ERROR(fn(reader.getRoot<Root>(), decoder));
    return decoder.CheckAllFramesUsed();
  } catch (const kj::Exception& e) {
    return InvalidArgumentError("header: malformed message: " +
                                std::string(e.getDescription().cStr()));
  } catch (const std::exception& e) {
    return InvalidArgumentError(std::string("header: malformed message: ") + e.what());
  }
}

}  // namespace

// ---------------------------------------------------------------------------
// Small helpers

std::string_view EncodingName(Encoding encoding) {
  switch (encoding) {
    case Encoding::kRaw:
      return "raw";
    case Encoding::kF16:
      return "f16";
    case Encoding::kBF16:
      return "bf16";
  }
  return "invalid";
}

size_t EncodedElementSize(DType dtype, Encoding encoding) {
  return encoding == Encoding::kRaw ? DTypeSize(dtype) : 2;
}

int64_t TensorRef::num_elements() const {
  int64_t n = 1;
  for (int64_t d : shape) {
    if (d < 0) return -1;
    if (d != 0 && n > std::numeric_limits<int64_t>::max() / d) return -1;
    n *= d;
  }
  return n;
}

size_t TensorRef::num_bytes() const {
  const int64_t n = num_elements();
  const size_t element_size = EncodedElementSize(dtype, encoding);
  if (n < 0 || (element_size != 0 &&
                static_cast<uint64_t>(n) > std::numeric_limits<size_t>::max() / element_size))
    return std::numeric_limits<size_t>::max();
  return static_cast<size_t>(n) * element_size;
}

namespace {
constexpr std::array<std::string_view, kNumOptimizerKinds> kOptimizerNames = {
    "sgd", "momentum", "adagrad", "adam", "adamw"};
constexpr std::array<std::string_view, std::variant_size_v<RequestBody>> kRequestNames = {
    "hello",     "heartbeat", "create_variable",   "push",       "pull",  "advance_clock",
    "barrier",   "set_mode",  "set_learning_rate", "checkpoint", "stats", "shutdown",
    "push_chunk"};
}  // namespace

std::string_view OptimizerKindName(OptimizerKind kind) {
  const auto i = static_cast<size_t>(kind);
  return i < kOptimizerNames.size() ? kOptimizerNames[i] : "invalid";
}

StatusOr<OptimizerKind> ParseOptimizerKind(std::string_view name) {
  for (size_t i = 0; i < kOptimizerNames.size(); ++i)
    if (kOptimizerNames[i] == name) return static_cast<OptimizerKind>(i);
  return InvalidArgumentError("unknown optimizer '" + std::string(name) +
                              "' (expected sgd, momentum, adagrad, adam or adamw)");
}

std::string_view RequestTypeName(const RequestBody& body) { return kRequestNames[body.index()]; }

// ---------------------------------------------------------------------------
// Codec

std::vector<std::byte> EncodeRequest(const Request& request) {
  const size_t words = 1 + StructWords<wire::Request>() + BodyWords(request.body);
  return BuildFlat<wire::Request>(words,
                                  [&](wire::Request::Builder root) { SetRequest(root, request); });
}

std::vector<std::byte> EncodeReply(const Reply& reply) {
  const size_t message_bytes = std::min(reply.message.size(), DecodeLimits{}.max_text_bytes);
  const size_t words =
      1 + StructWords<wire::Reply>() + TextWords(message_bytes) + BodyWords(reply.body);
  return BuildFlat<wire::Reply>(words, [&](wire::Reply::Builder root) { SetReply(root, reply); });
}

StatusOr<Request> DecodeRequest(std::span<const std::byte> header,
                                std::span<const size_t> payload_sizes, const DecodeLimits& limits) {
  Request request;
  DV_RETURN_IF_ERROR(WithRoot<wire::Request>(header, payload_sizes, limits,
                                             [&](wire::Request::Reader root, Decoder& decoder) {
                                               return DecodeRequestRoot(decoder, root, &request);
                                             }));
  return request;
}

StatusOr<Reply> DecodeReply(std::span<const std::byte> header,
                            std::span<const size_t> payload_sizes, const DecodeLimits& limits) {
  Reply reply;
  DV_RETURN_IF_ERROR(WithRoot<wire::Reply>(header, payload_sizes, limits,
                                           [&](wire::Reply::Reader root, Decoder& decoder) {
                                             return DecodeReplyRoot(decoder, root, &reply);
                                           }));
  return reply;
}

}  // namespace distval::protocol
