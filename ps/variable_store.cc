#include "variable_store.h"

#include <algorithm>
#include <atomic>
#include <cfloat>
#include <cmath>
#include <cstring>
#include <mutex>
#include <sstream>
#include <utility>

#include "distval/encoding.h"
#include "initializer.h"

namespace distval::ps {
namespace {

using protocol::RowRange;
using protocol::VariableSpec;

// Built with append: GCC 12 warns falsely (-Wrestrict) on "literal" + rvalue.
std::string Quoted(std::string_view name) {
  std::string s;
  s.reserve(name.size() + 2);
  s.append("'").append(name).append("'");
  return s;
}

std::string RangeText(RowRange r) {
  std::string s("[");
  s.append(std::to_string(r.begin)).append(", ").append(std::to_string(r.end)).append(")");
  return s;
}

std::string DimsText(std::span<const int64_t> dims) {
  return Shape(std::vector<int64_t>(dims.begin(), dims.end())).ToString();
}

std::string Num(double v) {
  std::ostringstream os;
  os << v;
  return os.str();
}

// The shard buffer shape for rows `rows` of a variable of `shape`.
Shape ShardShape(const Shape& shape, RowRange rows) {
  if (shape.rank() == 0) return Shape();
  std::vector<int64_t> dims = shape.dims();
  dims[0] = rows.size();
  return Shape(std::move(dims));
}

// Expected payload shape for `num_rows` rows of v.
std::vector<int64_t> RowsShape(const Variable& v, int64_t num_rows) {
  if (v.shape().rank() == 0) return {};
  std::vector<int64_t> dims = v.shape().dims();
  dims[0] = num_rows;
  return dims;
}

// The first field in which two specs of the same name differ, or "".
std::string FirstDifference(const VariableSpec& a, const VariableSpec& b) {
  if (a.dtype != b.dtype) return "dtype";
  if (a.shape != b.shape) return "shape";
  if (a.initializer.seed != b.initializer.seed) return "initializer.seed";
  if (a.initializer.kind.index() != b.initializer.kind.index()) return "initializer kind";
  {
    // The values initializer's frame index is transport detail, not spec.
    protocol::Initializer ia = a.initializer, ib = b.initializer;
    if (auto* va = std::get_if<protocol::InitValues>(&ia.kind)) va->values.frame = 0;
    if (auto* vb = std::get_if<protocol::InitValues>(&ib.kind)) vb->values.frame = 0;
    if (ia != ib) return "initializer parameters";
  }
  const auto& oa = a.optimizer;
  const auto& ob = b.optimizer;
  if (oa.kind != ob.kind) return "optimizer.kind";
  if (oa.learning_rate != ob.learning_rate) return "optimizer.learning_rate";
  if (oa.momentum != ob.momentum) return "optimizer.momentum";
  if (oa.nesterov != ob.nesterov) return "optimizer.nesterov";
  if (oa.beta1 != ob.beta1) return "optimizer.beta1";
  if (oa.beta2 != ob.beta2) return "optimizer.beta2";
  if (oa.epsilon != ob.epsilon) return "optimizer.epsilon";
  if (oa.weight_decay != ob.weight_decay) return "optimizer.weight_decay";
  if (oa.initial_accumulator != ob.initial_accumulator) return "optimizer.initial_accumulator";
  if (a.aggregation != b.aggregation) return "aggregation";
  if (a.staleness != b.staleness) return "staleness";
  return "";
}

Status ValidateSpec(const VariableSpec& spec, RowRange rows) {
  if (spec.name.empty()) return InvalidArgumentError("variable name is empty");
  const std::string var = "variable " + Quoted(spec.name);
  if (spec.dtype != DType::kF32)
    return UnimplementedError(var + ": dtype " + std::string(DTypeName(spec.dtype)) +
                              " is not supported: only f32 variables are trainable");
  auto shape = Shape::Make(spec.shape);
  if (!shape.ok()) return shape.status().WithContext(var);
  const int64_t num_rows = shape->rows();
  if (shape->rank() == 0) {
    if (rows.begin != 0 || rows.end != 1)
      return InvalidArgumentError(var + ": a scalar's shard rows must be [0, 1), got " +
                                  RangeText(rows));
  } else if (rows.begin < 0 || rows.begin > rows.end || rows.end > num_rows) {
    return InvalidArgumentError(var + ": shard rows " + RangeText(rows) + " are not within [0, " +
                                std::to_string(num_rows) + ") of shape " + shape->ToString());
  }
  if (spec.aggregation != protocol::Aggregation::kMean &&
      spec.aggregation != protocol::Aggregation::kSum)
    return InvalidArgumentError(var + ": aggregation " +
                                std::to_string(static_cast<int>(spec.aggregation)) +
                                " is unknown (expected mean or sum)");
  if (spec.staleness < protocol::kStalenessInherit)
    return InvalidArgumentError(var + ": staleness " + std::to_string(spec.staleness) +
                                " is invalid (expected >= 0, -1 for async or -2 to inherit)");
  DV_RETURN_IF_ERROR(ValidateOptimizerSpec(spec.optimizer).WithContext(var));
  DV_RETURN_IF_ERROR(
      ValidateInitializer(spec.initializer, ShardShape(*shape, rows)).WithContext(var));
  return OkStatus();
}

// Where an update writes. Caller holds v.mu_ exclusively.
struct WriteTarget {
  const float* in;
  float* out;
  bool swap;  // out is the spare buffer: swap it in after writing.
};

}  // namespace

Variable::Variable(Key, VariableSpec spec, Shape shape, RowRange rows, Shape shard_shape)
    : spec_(std::move(spec)),
      shape_(std::move(shape)),
      rows_(rows),
      shard_shape_(std::move(shard_shape)),
      row_elements_(shape_.row_elements()) {}

namespace {

// Pairs with the borrowers' releasing shared_ptr decrement (see below).
inline void AcquireAfterUseCount() {
#if !defined(__SANITIZE_THREAD__)  // TSan does not model fences (and -Wtsan warns).
  std::atomic_thread_fence(std::memory_order_acquire);
#endif
}

// Chooses the buffer an update writes (see "Zero-copy pulls" in the header):
// the current one when nobody outside the store holds it, else a spare one.
// shared_ptr::use_count() is a relaxed load; the acquire fence after reading
// 1 orders the borrowers' last reads (before their releasing decrement)
// before our writes. New borrowers cannot appear meanwhile: Snapshot() needs
// the shared lock and the caller holds the exclusive one.
std::shared_ptr<Tensor> NewBuffer(const VariableStore::BufferAllocator& allocator,
                                  const Shape& shape) {
  if (allocator) {
    if (std::shared_ptr<Tensor> t = allocator(shape)) return t;
  }
  return std::make_shared<Tensor>(DType::kF32, shape);
}

// Into the spare buffer (made when there is none or it is still lent).
WriteTarget PrepareOutOfPlace(std::shared_ptr<Tensor>& params, std::shared_ptr<Tensor>& spare,
                              const Shape& shard_shape,
                              const VariableStore::BufferAllocator& allocator) {
  if (!spare || spare.use_count() != 1) spare = NewBuffer(allocator, shard_shape);
  AcquireAfterUseCount();
  return {params->data_as<float>(), spare->data_as<float>(), true};
}

WriteTarget PrepareWrite(std::shared_ptr<Tensor>& params, std::shared_ptr<Tensor>& spare,
                         const Shape& shard_shape,
                         const VariableStore::BufferAllocator& allocator) {
  float* current = params->data_as<float>();
  if (params.use_count() == 1) {
    AcquireAfterUseCount();
    return {current, current, false};
  }
  return PrepareOutOfPlace(params, spare, shard_shape, allocator);
}

void CopyElements(const float* from, float* to, int64_t begin, int64_t end) {
  if (end > begin)
    std::memcpy(to + begin, from + begin, static_cast<size_t>(end - begin) * sizeof(float));
}

// Checks grad[0, n) for NaN/Inf and applies it to elements [b, b + n) out of
// place, block by block: the check brings a block of the gradient into the L1
// cache and the apply reads it from there, so the gradient is read from
// memory (or another core's cache) once, not twice. Once a non-finite value
// turns up, the rest is only counted (the result is discarded anyway).
// Returns the number of non-finite values.
size_t CheckAndApply(Optimizer& opt, const float* in, float* out, const float* grad, int64_t b,
                     int64_t n, float grad_scale, float lr_scale) {
  constexpr int64_t kBlock = 4096;  // floats: 16 KiB
  size_t bad = 0;
  for (int64_t at = 0; at < n; at += kBlock) {
    const int64_t k = std::min(kBlock, n - at);
    bad += protocol::CountNonFinite(
        std::span<const std::byte>(reinterpret_cast<const std::byte*>(grad + at),
                                   static_cast<size_t>(k) * sizeof(float)),
        protocol::Encoding::kRaw);
    if (bad == 0) opt.ApplyDense(in, out, grad + at, b + at, b + at + k, grad_scale, lr_scale);
  }
  return bad;
}

// CheckAndApply over the runner's threads (or this one).
size_t CheckAndApplyOn(const VariableStore::RangeRunner& runner, Optimizer& opt, const float* in,
                       float* out, const float* grad, int64_t b, int64_t n, float grad_scale,
                       float lr_scale) {
  if (!runner) return CheckAndApply(opt, in, out, grad, b, n, grad_scale, lr_scale);
  std::atomic<size_t> bad{0};
  runner(n, [&](int64_t lo, int64_t hi) {
    bad.fetch_add(CheckAndApply(opt, in, out, grad + lo, b + lo, hi - lo, grad_scale, lr_scale),
                  std::memory_order_relaxed);
  });
  return bad.load(std::memory_order_relaxed);
}

}  // namespace

StatusOr<Variable*> VariableStore::Create(const VariableSpec& spec, RowRange rows,
                                          const float* initial_values) {
  DV_RETURN_IF_ERROR(ValidateSpec(spec, rows));
  Shape shape(spec.shape);
  const std::string var = "variable " + Quoted(spec.name);

  auto check_existing = [&](Variable& existing) -> StatusOr<Variable*> {
    std::string field = FirstDifference(existing.spec(), spec);
    if (field.empty() && existing.rows() != rows) field = "shard rows";
    if (field.empty()) return &existing;
    return AlreadyExistsError(var + " already exists with shape " + existing.shape().ToString() +
                              " " + std::string(DTypeName(existing.spec().dtype)) + ", rows " +
                              RangeText(existing.rows()) + "; the request has shape " +
                              shape.ToString() + " " + std::string(DTypeName(spec.dtype)) +
                              ", rows " + RangeText(rows) + ": " + field + " differs");
  };
  {
    std::shared_lock lock(mu_);
    auto it = by_name_.find(spec.name);
    if (it != by_name_.end()) return check_existing(*it->second);
  }

  const bool needs_values = std::holds_alternative<protocol::InitValues>(spec.initializer.kind);
  if (needs_values && initial_values == nullptr)
    return InvalidArgumentError(var + ": the values initializer needs initial values, none given");

  Shape shard_shape = ShardShape(shape, rows);
  auto v = std::make_unique<Variable>(Variable::Key(), spec, shape, rows, shard_shape);
  DV_ASSIGN_OR_RETURN(v->optimizer_, Optimizer::Create(spec.optimizer, shard_shape));
  v->allocator_ = allocator_;
  v->params_ = NewBuffer(allocator_, shard_shape);
  const size_t n = static_cast<size_t>(shard_shape.num_elements());
  std::span<const float> values;
  if (needs_values) values = std::span<const float>(initial_values, n);
  // For a scalar, InitializeRows sees rows [0, 1) of shape [] (one row).
  DV_RETURN_IF_ERROR(InitializeRows(spec.initializer, shape, rows,
                                    std::span<float>(v->params_->data_as<float>(), n), values)
                         .WithContext(var));
  v->learning_rate_.store(v->optimizer_->learning_rate());
  v->bytes_ = v->params_->num_bytes() + v->optimizer_->SlotBytes();

  std::unique_lock lock(mu_);
  auto it = by_name_.find(spec.name);
  if (it != by_name_.end()) return check_existing(*it->second);  // Lost a creation race.
  Variable* raw = v.get();
  total_bytes_.fetch_add(raw->bytes_, std::memory_order_relaxed);
  by_name_.emplace(spec.name, std::move(v));
  order_.push_back(raw);
  return raw;
}

StatusOr<Variable*> VariableStore::Find(std::string_view name) const {
  std::shared_lock lock(mu_);
  auto it = by_name_.find(name);
  if (it == by_name_.end())
    return NotFoundError("variable " + Quoted(name) + " does not exist on this shard");
  return it->second.get();
}

std::vector<Variable*> VariableStore::All() const {
  std::shared_lock lock(mu_);
  return order_;
}

size_t VariableStore::size() const {
  std::shared_lock lock(mu_);
  return order_.size();
}

// ---- Validation

Status VariableStore::ValidateDenseRange(const Variable& v, RowRange rows) {
  if (rows.begin > rows.end)
    return InvalidArgumentError("variable " + Quoted(v.name()) + ": row range " + RangeText(rows) +
                                " has begin > end");
  if (rows.begin < v.rows().begin || rows.end > v.rows().end)
    return OutOfRangeError("variable " + Quoted(v.name()) + ": rows " + RangeText(rows) +
                           " are outside this shard's rows " + RangeText(v.rows()));
  // A scalar has no rows to choose from: its one "row" is all of it (an
  // empty range would make a pull reply of 0 bytes for shape [], which no
  // client can decode).
  if (v.shape().rank() == 0 && rows != v.rows())
    return InvalidArgumentError("variable " + Quoted(v.name()) + " is a scalar: rows " +
                                RangeText(rows) + " must be [0, 1)");
  return OkStatus();
}

Status VariableStore::ValidateDensePayload(const Variable& v, RowRange rows, DType dtype,
                                           std::span<const int64_t> payload_shape) {
  DV_RETURN_IF_ERROR(ValidateDenseRange(v, rows));
  if (dtype != DType::kF32)
    return InvalidArgumentError("variable " + Quoted(v.name()) + ": payload dtype " +
                                std::string(DTypeName(dtype)) + " for rows " + RangeText(rows) +
                                ", expected f32");
  const std::vector<int64_t> expected = RowsShape(v, rows.size());
  if (!std::equal(payload_shape.begin(), payload_shape.end(), expected.begin(), expected.end()))
    return InvalidArgumentError("variable " + Quoted(v.name()) + ": payload shape " +
                                DimsText(payload_shape) + " does not match " + DimsText(expected) +
                                " expected for rows " + RangeText(rows));
  return OkStatus();
}

Status VariableStore::ValidateSparseIndices(const Variable& v, DType dtype,
                                            std::span<const int64_t> indices_shape) {
  if (dtype != DType::kI64)
    return InvalidArgumentError("variable " + Quoted(v.name()) + ": row indices have dtype " +
                                std::string(DTypeName(dtype)) + ", expected i64");
  if (indices_shape.size() != 1)
    return InvalidArgumentError("variable " + Quoted(v.name()) + ": row indices have shape " +
                                DimsText(indices_shape) + ", expected rank 1");
  // A scalar has no rows (n of them would be answered as one value of
  // shape [] in n * 4 bytes, a reply no client decodes).
  if (v.shape().rank() == 0)
    return InvalidArgumentError("variable " + Quoted(v.name()) +
                                " is a scalar: it has no rows to read or update sparsely");
  return OkStatus();
}

Status VariableStore::ValidateSparseRows(const Variable& v, std::span<const int64_t> global_rows) {
  const RowRange r = v.rows();
  for (size_t i = 0; i < global_rows.size(); ++i) {
    const int64_t row = global_rows[i];
    if (row < r.begin || row >= r.end)
      return OutOfRangeError("variable " + Quoted(v.name()) + ": row index " + std::to_string(row) +
                             " (position " + std::to_string(i) + " of " +
                             std::to_string(global_rows.size()) +
                             ") is outside this shard's rows " + RangeText(r));
  }
  return OkStatus();
}

Status VariableStore::ValidateSparsePayload(const Variable& v, int64_t num_rows, DType dtype,
                                            std::span<const int64_t> payload_shape) {
  if (dtype != DType::kF32)
    return InvalidArgumentError("variable " + Quoted(v.name()) + ": sparse payload dtype " +
                                std::string(DTypeName(dtype)) + ", expected f32");
  std::vector<int64_t> expected = v.shape().dims();
  if (expected.empty())
    expected.push_back(num_rows);  // Scalar: one element per row.
  else
    expected[0] = num_rows;
  if (!std::equal(payload_shape.begin(), payload_shape.end(), expected.begin(), expected.end()))
    return InvalidArgumentError("variable " + Quoted(v.name()) + ": sparse payload shape " +
                                DimsText(payload_shape) + " does not match " + DimsText(expected) +
                                " expected for " + std::to_string(num_rows) + " row indices");
  return OkStatus();
}

// ---- Updates

Status VariableStore::ApplyDense(Variable& v, RowRange rows, const float* grad, float grad_scale,
                                 float lr_scale, const RangeRunner& runner) {
  DV_RETURN_IF_ERROR(ValidateDenseRange(v, rows));
  std::unique_lock lock(v.mu_);
  const int64_t begin = v.LocalOffset(rows.begin);
  const int64_t end = v.LocalOffset(rows.end);
  const WriteTarget t = PrepareWrite(v.params_, v.spare_, v.shard_shape_, v.allocator_);
  if (t.swap) {
    CopyElements(t.in, t.out, 0, begin);
    CopyElements(t.in, t.out, end, v.num_elements());
  }
  Optimizer& opt = *v.optimizer_;
  opt.BeginStep();
  if (runner && end - begin > 0) {
    runner(end - begin, [&](int64_t b, int64_t e) {
      opt.ApplyDense(t.in, t.out, grad + b, begin + b, begin + e, grad_scale, lr_scale);
    });
  } else {
    opt.ApplyDense(t.in, t.out, grad, begin, end, grad_scale, lr_scale);
  }
  if (t.swap) std::swap(v.params_, v.spare_);
  v.version_.fetch_add(1, std::memory_order_release);
  return OkStatus();
}

Status VariableStore::ApplyDenseStreaming(
    Variable& v, RowRange rows, int64_t piece,
    const std::function<StatusOr<const float*>(int64_t begin, int64_t n)>& fetch, float grad_scale,
    float lr_scale, const RangeRunner& runner, size_t* non_finite) {
  const bool checked = non_finite != nullptr;
  if (checked) *non_finite = 0;
  if (piece < 1) return InvalidArgumentError("streaming apply: piece must be >= 1");
  if (checked && !SupportsCheckedStreaming(v))
    return FailedPreconditionError("checked streaming apply needs an optimizer without state");
  DV_RETURN_IF_ERROR(ValidateDenseRange(v, rows));
  std::unique_lock lock(v.mu_);
  const int64_t begin = v.LocalOffset(rows.begin);
  const int64_t end = v.LocalOffset(rows.end);
  // Checked: always out of place, so that the parameters stay as they are
  // until the whole gradient is known to be finite.
  const WriteTarget t = checked
                            ? PrepareOutOfPlace(v.params_, v.spare_, v.shard_shape_, v.allocator_)
                            : PrepareWrite(v.params_, v.spare_, v.shard_shape_, v.allocator_);
  if (t.swap) {
    CopyElements(t.in, t.out, 0, begin);
    CopyElements(t.in, t.out, end, v.num_elements());
  }
  Optimizer& opt = *v.optimizer_;
  const int64_t step_before = opt.step();
  opt.BeginStep();
  Status status;
  int64_t done = 0;  // elements of the range applied
  while (done < end - begin) {
    const int64_t n = std::min(piece, end - begin - done);
    StatusOr<const float*> grad = fetch(done, n);
    if (!grad.ok()) {
      status = grad.status();
      break;
    }
    const float* g = *grad;
    const int64_t b = begin + done;
    if (checked) {
      *non_finite += CheckAndApplyOn(runner, opt, t.in, t.out, g, b, n, grad_scale, lr_scale);
      if (*non_finite > 0) break;
    } else if (runner) {
      runner(n, [&](int64_t lo, int64_t hi) {
        opt.ApplyDense(t.in, t.out, g + lo, b + lo, b + hi, grad_scale, lr_scale);
      });
    } else {
      opt.ApplyDense(t.in, t.out, g, b, b + n, grad_scale, lr_scale);
    }
    done += n;
  }
  if (checked && done < end - begin) {
    // All or nothing: drop the spare's contents, undo the step.
    opt.set_step(step_before);
    return status;
  }
  // Out of place, the elements never reached keep their old values.
  if (t.swap) {
    CopyElements(t.in, t.out, begin + done, end);
    std::swap(v.params_, v.spare_);
  }
  v.version_.fetch_add(1, std::memory_order_release);
  return status;
}

bool VariableStore::SupportsCheckedStreaming(const Variable& v) {
  return v.spec().optimizer.kind == protocol::OptimizerKind::kSgd;
}

StatusOr<VariableStore::CheckedUpdate> VariableStore::BeginCheckedUpdate(Variable& v, RowRange rows,
                                                                         float lr_scale) {
  if (!SupportsCheckedStreaming(v))
    return FailedPreconditionError("checked update of " + Quoted(v.name()) +
                                   ": needs an optimizer without state");
  DV_RETURN_IF_ERROR(ValidateDenseRange(v, rows));
  CheckedUpdate u;
  std::unique_lock lock(v.mu_);
  u.v_ = &v;
  u.begin_ = v.LocalOffset(rows.begin);
  u.end_ = v.LocalOffset(rows.end);
  u.lr_scale_ = lr_scale;
  u.version_ = v.version_.load(std::memory_order_relaxed);
  u.learning_rate_ = v.learning_rate();
  // Its own buffer: the spare when nobody holds it (it stays the update's
  // until Commit, so that another update meanwhile cannot write it).
  if (v.spare_ && v.spare_.use_count() == 1) {
    u.out_ = std::move(v.spare_);
    AcquireAfterUseCount();
  } else {
    u.out_ = NewBuffer(v.allocator_, v.shard_shape_);
  }
  return u;
}

Status VariableStore::CheckedUpdate::Piece(const float* grad, int64_t n, size_t* non_finite,
                                           const RangeRunner& runner) {
  if (v_ == nullptr) return FailedPreconditionError("checked update: not begun");
  if (n < 0 || n > end_ - begin_ - done_)
    return OutOfRangeError("checked update of " + Quoted(v_->name()) + ": piece of " +
                           std::to_string(n) + " elements after " + std::to_string(done_) + " of " +
                           std::to_string(end_ - begin_));
  size_t bad = 0;
  // Nothing to compute once it cannot be committed: then only counted.
  if (!poisoned_ && v_->version_.load(std::memory_order_relaxed) == version_ &&
      v_->learning_rate() == learning_rate_) {
    std::shared_lock lock(v_->mu_);
    Optimizer& opt = *v_->optimizer_;  // plain SGD: no state is written
    bad = CheckAndApplyOn(runner, opt, v_->params_->data_as<float>(), out_->data_as<float>(), grad,
                          begin_ + done_, n, 1.0f, lr_scale_);
  } else {
    bad = protocol::CountNonFinite(
        std::span<const std::byte>(reinterpret_cast<const std::byte*>(grad),
                                   static_cast<size_t>(n) * sizeof(float)),
        protocol::Encoding::kRaw);
  }
  *non_finite += bad;
  poisoned_ = poisoned_ || bad > 0;
  done_ += n;
  return OkStatus();
}

VariableStore::CheckedUpdate::CheckedUpdate(CheckedUpdate&& other) noexcept
    : v_(std::exchange(other.v_, nullptr)),
      begin_(other.begin_),
      end_(other.end_),
      done_(other.done_),
      lr_scale_(other.lr_scale_),
      version_(other.version_),
      learning_rate_(other.learning_rate_),
      poisoned_(other.poisoned_),
      out_(std::move(other.out_)) {}

VariableStore::CheckedUpdate& VariableStore::CheckedUpdate::operator=(
    CheckedUpdate&& other) noexcept {
  if (this != &other) {
    Abandon();
    v_ = std::exchange(other.v_, nullptr);
    begin_ = other.begin_;
    end_ = other.end_;
    done_ = other.done_;
    lr_scale_ = other.lr_scale_;
    version_ = other.version_;
    learning_rate_ = other.learning_rate_;
    poisoned_ = other.poisoned_;
    out_ = std::move(other.out_);
  }
  return *this;
}

VariableStore::CheckedUpdate::~CheckedUpdate() { Abandon(); }

void VariableStore::CheckedUpdate::Abandon() {
  if (v_ == nullptr) return;
  std::unique_lock lock(v_->mu_);
  if (!v_->spare_) v_->spare_ = std::move(out_);
  out_.reset();
  v_ = nullptr;
}

bool VariableStore::CheckedUpdate::Current() const {
  return v_ != nullptr && !poisoned_ && v_->version_.load(std::memory_order_relaxed) == version_ &&
         v_->learning_rate() == learning_rate_;
}

Status VariableStore::CheckedUpdate::Commit() {
  if (v_ == nullptr) return FailedPreconditionError("checked update: not begun");
  Variable& v = *v_;
  Status why;
  if (poisoned_) {
    why = InvalidArgumentError("checked update of " + Quoted(v.name()) + ": non-finite values");
  } else if (done_ != end_ - begin_) {
    why = FailedPreconditionError("checked update of " + Quoted(v.name()) + ": " +
                                  std::to_string(done_) + " of " + std::to_string(end_ - begin_) +
                                  " elements came");
  } else if (!Current()) {
    why = AbortedError("checked update of " + Quoted(v.name()) +
                       ": the variable changed while its gradient was arriving");
  }
  if (!why.ok()) {
    Abandon();
    return why;
  }
  std::unique_lock lock(v.mu_);
  const float* in = v.params_->data_as<float>();
  float* out = out_->data_as<float>();
  CopyElements(in, out, 0, begin_);
  CopyElements(in, out, end_, v.num_elements());
  v.optimizer_->BeginStep();
  v.spare_ = std::move(v.params_);
  v.params_ = std::move(out_);
  v.version_.fetch_add(1, std::memory_order_release);
  v_ = nullptr;
  return OkStatus();
}

Status VariableStore::ApplySparse(Variable& v, std::span<const int64_t> global_rows,
                                  const float* grad_rows, float grad_scale, float lr_scale) {
  DV_RETURN_IF_ERROR(ValidateSparseRows(v, global_rows));
  std::vector<int64_t> local(global_rows.size());
  for (size_t i = 0; i < local.size(); ++i) local[i] = global_rows[i] - v.rows().begin;
  std::unique_lock lock(v.mu_);
  const WriteTarget t = PrepareWrite(v.params_, v.spare_, v.shard_shape_, v.allocator_);
  if (t.swap) CopyElements(t.in, t.out, 0, v.num_elements());
  v.optimizer_->BeginStep();
  v.optimizer_->ApplyRows(t.out, local, grad_rows, grad_scale, lr_scale);
  if (t.swap) std::swap(v.params_, v.spare_);
  v.version_.fetch_add(1, std::memory_order_release);
  return OkStatus();
}

// ---- Reads

Status VariableStore::ReadDense(const Variable& v, RowRange rows, float* out, uint64_t* version) {
  DV_RETURN_IF_ERROR(ValidateDenseRange(v, rows));
  std::shared_lock lock(v.mu_);
  const int64_t begin = v.LocalOffset(rows.begin);
  const int64_t n = rows.size() * v.row_elements();
  if (n > 0)
    std::memcpy(out, v.params_->data_as<float>() + begin, static_cast<size_t>(n) * sizeof(float));
  if (version) *version = v.version_.load(std::memory_order_relaxed);
  return OkStatus();
}

Status VariableStore::ReadRows(const Variable& v, std::span<const int64_t> global_rows, float* out,
                               uint64_t* version) {
  DV_RETURN_IF_ERROR(ValidateSparseRows(v, global_rows));
  std::shared_lock lock(v.mu_);
  const float* params = v.params_->data_as<float>();
  const size_t row_bytes = static_cast<size_t>(v.row_elements()) * sizeof(float);
  for (size_t i = 0; i < global_rows.size(); ++i) {
    if (row_bytes == 0) break;
    std::memcpy(out + static_cast<int64_t>(i) * v.row_elements(),
                params + v.LocalOffset(global_rows[i]), row_bytes);
  }
  if (version) *version = v.version_.load(std::memory_order_relaxed);
  return OkStatus();
}

ParamsSnapshot VariableStore::Snapshot(const Variable& v) {
  std::shared_lock lock(v.mu_);
  return ParamsSnapshot{v.params_, v.version_.load(std::memory_order_relaxed)};
}

// ---- Learning rate

Status VariableStore::SetLearningRate(std::string_view name, double learning_rate) {
  // Applied as a float: a finite double above FLT_MAX would become Inf.
  if (!std::isfinite(learning_rate) || learning_rate < 0 || learning_rate > FLT_MAX)
    return InvalidArgumentError(
        "learning_rate = " + Num(learning_rate) + " for " +
        (name.empty() ? std::string("all variables") : "variable " + Quoted(name)) +
        " must be >= 0 and fit a float (<= 3.4e38)");
  std::vector<Variable*> targets;
  if (name.empty()) {
    targets = All();
  } else {
    DV_ASSIGN_OR_RETURN(Variable * v, Find(name));
    targets.push_back(v);
  }
  for (Variable* v : targets) {
    std::unique_lock lock(v->mu_);
    DV_RETURN_IF_ERROR(v->optimizer_->SetLearningRate(learning_rate));  // Validated above.
    v->learning_rate_.store(learning_rate, std::memory_order_relaxed);
  }
  return OkStatus();
}

// ---- Checkpoints

Status VariableStore::VisitState(
    const Variable& v,
    const std::function<Status(const Tensor& params, const Optimizer& optimizer, uint64_t version)>&
        fn) {
  std::shared_lock lock(v.mu_);
  return fn(*v.params_, *v.optimizer_, v.version_.load(std::memory_order_relaxed));
}

Status VariableStore::RestoreState(
    Variable& v, uint64_t version,
    const std::function<Status(Tensor& params, Optimizer& optimizer)>& fn) {
  std::unique_lock lock(v.mu_);
  const WriteTarget t = PrepareWrite(v.params_, v.spare_, v.shard_shape_, v.allocator_);
  if (t.swap) {
    CopyElements(t.in, t.out, 0, v.num_elements());
    std::swap(v.params_, v.spare_);
  }
  Status s = fn(*v.params_, *v.optimizer_);
  v.learning_rate_.store(v.optimizer_->learning_rate(), std::memory_order_relaxed);
  if (s.ok()) v.version_.store(version, std::memory_order_release);
  return s;
}

}  // namespace distval::ps
