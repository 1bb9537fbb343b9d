// The variables one parameter-server shard holds: their parameters, optimizer
// state and versions, and the validated apply / read operations on them.
//
// Coordinates: a shard holds rows [rows.begin, rows.end) (axis 0) of a
// variable. Every row index and RowRange passed to the store is GLOBAL (rows of
// the whole variable); the store converts to shard-local offsets. A scalar
// variable has one row: its shard rows are [0, 1).
//
// Locking protocol (per variable; the store's own map has a separate lock):
//  * Each Variable has a std::shared_mutex. Applies, learning-rate changes and
//    checkpoint restores take it exclusively; reads (ReadDense, ReadRows,
//    Snapshot, VisitState) take it shared. Validation touches only immutable
//    fields and takes no lock.
//  * Zero-copy pulls: the parameter buffer is held by a
//    std::shared_ptr<Tensor>. Snapshot() returns a shared_ptr<const Tensor> to
//    the current buffer (a pointer copy under the shared lock, no byte
//    copied) together with its version. The server may send straight from it
//    (e.g. zmq_msg_init_data whose free callback drops the shared_ptr) for as
//    long as it likes, with no lock held: the buffer a snapshot names is never
//    written again while anyone outside the store holds it. An apply checks
//    whether the current buffer is lent (use_count > 1): if not, it updates in
//    place; if it is, it writes the update out of place into a spare buffer
//    (reused once its own borrowers are done, else freshly allocated) and
//    swaps it in (copy-on-write). A dense whole-shard apply writes out of
//    place in the same pass that computes it (no extra copy); partial dense
//    and sparse applies first copy the rows they do not touch. So a snapshot
//    is consistent (exactly `version` updates applied) and cheap, and slow
//    senders never block applies.
//  * The optimizer slots are never lent; they are only accessed under the
//    variable's lock.
//
// Thread-safety: all VariableStore methods are thread-safe. Variable pointers
// returned by the store stay valid for the store's lifetime (variables are
// never removed).
#ifndef DISTVAL_PS_VARIABLE_STORE_H_
#define DISTVAL_PS_VARIABLE_STORE_H_

#include <atomic>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <shared_mutex>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "distval/protocol.h"
#include "distval/status.h"
#include "distval/tensor.h"
#include "optimizer.h"

namespace distval::ps {

// A read-only reference to one consistent state of a shard's parameters.
struct ParamsSnapshot {
  // The whole shard buffer (shard_shape, f32). Never written while held.
  std::shared_ptr<const Tensor> params;
  // Number of updates applied to it.
  uint64_t version = 0;
};

// Makes a parameter buffer: f32, `shape`, zero-filled, kTensorAlignment
// aligned. Called during VariableStore::Create or under a variable's
// exclusive lock; a null result means "use an ordinary Tensor".
using ParamsAllocator = std::function<std::shared_ptr<Tensor>(const Shape& shape)>;

// One shard of one variable. Created and owned by VariableStore; everything
// that changes is reached through the store's methods.
class Variable {
 public:
  // Construction is reserved to VariableStore (only it can make a Key).
  class Key {
    friend class VariableStore;
    Key() = default;
  };
  Variable(Key, protocol::VariableSpec spec, Shape shape, protocol::RowRange rows,
           Shape shard_shape);
  Variable(const Variable&) = delete;
  Variable& operator=(const Variable&) = delete;

  // Immutable after creation; safe to read without a lock.
  const protocol::VariableSpec& spec() const { return spec_; }
  const std::string& name() const { return spec_.name; }
  // Shape of the whole variable.
  const Shape& shape() const { return shape_; }
  // Rows of the whole variable this shard holds.
  protocol::RowRange rows() const { return rows_; }
  // Shape of this shard's buffer: [rows.size(), shape[1:]...] ([] for a scalar).
  const Shape& shard_shape() const { return shard_shape_; }
  int64_t row_elements() const { return row_elements_; }
  // Elements in this shard's buffer.
  int64_t num_elements() const { return shard_shape_.num_elements(); }
  // Element offset in the shard buffer of global row `global_row` (which must
  // be within rows()).
  int64_t LocalOffset(int64_t global_row) const {
    return (global_row - rows_.begin) * row_elements_;
  }
  // Bytes of parameters plus optimizer slots (spare copy-on-write buffers
  // not counted).
  size_t bytes() const { return bytes_; }

  // Updates applied so far (lock-free read; may be stale by the time it is
  // used: use Snapshot() / the version out-parameters for a consistent pair).
  uint64_t version() const { return version_.load(std::memory_order_acquire); }
  // The optimizer's current base learning rate (lock-free read).
  double learning_rate() const { return learning_rate_.load(std::memory_order_relaxed); }

 private:
  friend class VariableStore;

  const protocol::VariableSpec spec_;
  const Shape shape_;
  const protocol::RowRange rows_;
  const Shape shard_shape_;
  const int64_t row_elements_;
  size_t bytes_ = 0;  // Set once during creation.

  mutable std::shared_mutex mu_;
  std::shared_ptr<Tensor> params_;        // Guarded by mu_ (the pointer; see the header).
  std::shared_ptr<Tensor> spare_;         // Guarded by mu_.
  ParamsAllocator allocator_;             // Set once during creation (may be null).
  std::unique_ptr<Optimizer> optimizer_;  // Guarded by mu_ (its state).
  std::atomic<uint64_t> version_{0};      // Written under mu_ (exclusive).
  std::atomic<double> learning_rate_{0};  // Written under mu_ (exclusive).
};

class VariableStore {
 public:
  using BufferAllocator = ParamsAllocator;

  // Runs body(begin, end) over disjoint subranges covering [0, n), possibly
  // on several threads, and returns when all have finished. Lets the server
  // spread one dense apply over its apply threads.
  using RangeRunner =
      std::function<void(int64_t n, const std::function<void(int64_t begin, int64_t end)>& body)>;

  VariableStore() = default;
  // Parameter buffers (and their copy-on-write spares) come from
  // `allocator`, e.g. shared memory that co-located clients can read pulls
  // straight from; optimizer slots stay ordinary Tensors. Null: ordinary
  // Tensors.
  explicit VariableStore(BufferAllocator allocator) : allocator_(std::move(allocator)) {}
  VariableStore(const VariableStore&) = delete;
  VariableStore& operator=(const VariableStore&) = delete;

  // Creates this shard's part (global rows `rows`) of the variable `spec`,
  // initialized per spec.initializer; `initial_values` (this shard's rows,
  // shard_shape floats, caller-owned, only read during the call) is required
  // for the `values` initializer and ignored otherwise.
  // Idempotent: the same spec (the initializer's values frame index aside)
  // and rows return the existing variable, untouched.
  // Errors: InvalidArgument for an empty name, a negative dimension, rows
  // outside [0, shape[0]] (a scalar needs [0, 1)), a staleness below
  // kStalenessInherit, an invalid optimizer or initializer (naming the field)
  // or missing initial values; Unimplemented for a dtype other than f32;
  // AlreadyExists when a variable of that name exists with a different spec or
  // rows (the message names both shapes and the first field that differs).
  StatusOr<Variable*> Create(const protocol::VariableSpec& spec, protocol::RowRange rows,
                             const float* initial_values);

  // NotFound naming the variable.
  StatusOr<Variable*> Find(std::string_view name) const;
  // All variables in creation order.
  std::vector<Variable*> All() const;
  size_t size() const;
  // Bytes held by all variables (parameters + optimizer slots).
  uint64_t TotalBytes() const { return total_bytes_.load(std::memory_order_relaxed); }

  // ---- Validation of requests, before any byte is touched. Pure checks of
  // immutable data: no lock, no state change. Messages name the variable,
  // the rows and the sizes.

  // InvalidArgument unless begin <= end, and for a scalar unless the range
  // is [0, 1); OutOfRange unless the range lies within the shard's rows.
  static Status ValidateDenseRange(const Variable& v, protocol::RowRange rows);
  // The above, plus: payload dtype f32 (the server decodes f16/bf16 encodings
  // to f32 first) and shape == [rows.size(), shape[1:]...] (a scalar's
  // payload is shaped []). InvalidArgument otherwise.
  static Status ValidateDensePayload(const Variable& v, protocol::RowRange rows, DType dtype,
                                     std::span<const int64_t> payload_shape);
  // The index tensor of a sparse request: dtype i64, rank 1, and a variable
  // that is not a scalar. InvalidArgument.
  static Status ValidateSparseIndices(const Variable& v, DType dtype,
                                      std::span<const int64_t> indices_shape);
  // Every global row within the shard's rows: OutOfRange naming the first bad
  // index and its position.
  static Status ValidateSparseRows(const Variable& v, std::span<const int64_t> global_rows);
  // A sparse payload for `num_rows` indices: dtype f32, shape
  // [num_rows, shape[1:]...]. InvalidArgument.
  static Status ValidateSparsePayload(const Variable& v, int64_t num_rows, DType dtype,
                                      std::span<const int64_t> payload_shape);

  // ---- Updates. Each validates first (state untouched on error), then, under
  // the variable's exclusive lock, starts one optimizer step, applies and
  // bumps the version by one.

  // Applies grad (rows.size() * row_elements floats, row-major, caller-owned)
  // to global rows `rows`. grad_scale multiplies the gradient (1/contributors
  // for mean aggregation), lr_scale the learning rate. With a `runner` the
  // element range is split over its threads (the lock is held meanwhile).
  // Errors: those of ValidateDenseRange.
  static Status ApplyDense(Variable& v, protocol::RowRange rows, const float* grad,
                           float grad_scale, float lr_scale, const RangeRunner& runner = {});
  // As ApplyDense, for a gradient that arrives front to back (a streaming
  // shared-memory frame, see transport::Frame::Window): the gradient of the
  // range is fetched in order, `piece` elements at a time (fetch(begin, n)
  // returns elements [begin, begin + n) of it, valid until the next call)
  // and each piece is applied as it comes, while it is still in cache. If
  // fetch fails, the pieces applied so far stay applied (the step and the
  // version count), the rest of the range keeps its values, and fetch's
  // error is returned. InvalidArgument for piece < 1.
  // Checked (non_finite not null): all or nothing. Each piece is also
  // checked for NaN / +-Inf as it comes (while it is in cache), and the
  // update is written out of place, into the spare buffer, which replaces
  // the parameters only once the whole gradient is there and finite.
  // Otherwise nothing changes (parameters, optimizer step, version), and
  // *non_finite > 0 (it stops counting at the first bad piece) or the fetch
  // error says why. Only for optimizers without state
  // (SupportsCheckedStreaming): FailedPrecondition for the others.
  static Status ApplyDenseStreaming(
      Variable& v, protocol::RowRange rows, int64_t piece,
      const std::function<StatusOr<const float*>(int64_t begin, int64_t n)>& fetch,
      float grad_scale, float lr_scale, const RangeRunner& runner = {},
      size_t* non_finite = nullptr);
  // True when v's optimizer keeps no state besides the parameters (plain
  // SGD), so that an update can be computed out of place and dropped.
  static bool SupportsCheckedStreaming(const Variable& v);

  // A checked out-of-place update (as ApplyDenseStreaming with non_finite)
  // whose gradient arrives over several calls with other work in between (a
  // chunked push, one message per piece): each piece is checked and applied
  // into a buffer of the update's own as it comes, and Commit() swaps that
  // buffer in. Reads and other updates of the variable may run between the
  // calls: readers see the old parameters until Commit, and when anything
  // changed the variable meanwhile Commit applies nothing (the caller then
  // applies the gradient the ordinary way, in arrival order after the one
  // that got in between). Not thread-safe; the store's single writer thread
  // drives it. Must not outlive the variable.
  class CheckedUpdate {
   public:
    CheckedUpdate() = default;
    CheckedUpdate(CheckedUpdate&& other) noexcept;
    CheckedUpdate& operator=(CheckedUpdate&& other) noexcept;
    ~CheckedUpdate();
    // Checks and applies the next `n` gradient elements of the range (in
    // order). Adds the non-finite values found to *non_finite; once one is
    // found, later pieces are only counted. OutOfRange past the range's end.
    Status Piece(const float* grad, int64_t n, size_t* non_finite, const RangeRunner& runner = {});
    // Swaps the result in (the optimizer's step and the version advance as
    // for one apply) when every element came, all finite, and nothing else
    // changed the variable (its values or its learning rate) since Begin.
    // Otherwise changes nothing and says why: InvalidArgument (non-finite
    // values), FailedPrecondition (pieces missing), Aborted (the variable
    // changed meanwhile).
    Status Commit();
    // Whether Commit can still succeed once the rest of the range came: no
    // non-finite value so far, and nothing else changed the variable (its
    // values or its learning rate) since Begin.
    bool Current() const;
    // Ends it without a commit: the buffer goes back as the variable's
    // spare (when it has none). The destructor does the same.
    void Abandon();

   private:
    friend class VariableStore;
    Variable* v_ = nullptr;
    int64_t begin_ = 0, end_ = 0, done_ = 0;  // elements of the shard buffer
    float lr_scale_ = 1;
    uint64_t version_ = 0;      // v_'s version at Begin
    double learning_rate_ = 0;  // and its learning rate
    bool poisoned_ = false;
    std::shared_ptr<Tensor> out_;
  };
  // Starts a CheckedUpdate of global rows `rows` of v (a plain SGD variable,
  // SupportsCheckedStreaming: FailedPrecondition otherwise). Takes the
  // spare buffer when it is free, else allocates one.
  static StatusOr<CheckedUpdate> BeginCheckedUpdate(Variable& v, protocol::RowRange rows,
                                                    float lr_scale);
  // Applies grad_rows (global_rows.size() rows) to the listed global rows;
  // duplicates are summed, only listed rows change (see optimizer.h). Errors:
  // those of ValidateSparseRows.
  static Status ApplySparse(Variable& v, std::span<const int64_t> global_rows,
                            const float* grad_rows, float grad_scale, float lr_scale);

  // ---- Reads (shared lock; copy into caller-owned memory).

  // Copies global rows `rows` into out (rows.size() * row_elements floats);
  // *version (if not null) receives the version copied. Errors: those of
  // ValidateDenseRange.
  static Status ReadDense(const Variable& v, protocol::RowRange rows, float* out,
                          uint64_t* version = nullptr);
  // Copies the listed global rows, in order, into out. Errors: those of
  // ValidateSparseRows.
  static Status ReadRows(const Variable& v, std::span<const int64_t> global_rows, float* out,
                         uint64_t* version = nullptr);
  // The current parameter buffer and its version, without copying (see the
  // locking protocol above). Never fails.
  static ParamsSnapshot Snapshot(const Variable& v);

  // ---- Learning rate.

  // Sets the base learning rate of variable `name`, or of every variable when
  // name is empty. InvalidArgument (nothing changed) for a negative or
  // non-finite rate; NotFound for an unknown name.
  Status SetLearningRate(std::string_view name, double learning_rate);

  // ---- Checkpoints.

  // Calls fn(params, optimizer, version) with a consistent state under the
  // variable's shared lock (applies wait meanwhile); returns fn's status.
  // params is the shard buffer (shard_shape); optimizer.Slots() and .step()
  // give the rest.
  static Status VisitState(
      const Variable& v,
      const std::function<Status(const Tensor& params, const Optimizer& optimizer,
                                 uint64_t version)>& fn);
  // Calls fn(params, optimizer) under the variable's exclusive lock so that it
  // can overwrite the parameters, slot contents and step (optimizer.set_step,
  // SetLearningRate); on success the version becomes `version`. Snapshots
  // taken before keep their old contents. Returns fn's status (on error the
  // state is whatever fn left and the version is unchanged).
  static Status RestoreState(Variable& v, uint64_t version,
                             const std::function<Status(Tensor& params, Optimizer& optimizer)>& fn);

 private:
  BufferAllocator allocator_;
  mutable std::shared_mutex mu_;
  std::map<std::string, std::unique_ptr<Variable>, std::less<>> by_name_;  // Guarded by mu_.
  std::vector<Variable*> order_;                                           // Guarded by mu_.
  std::atomic<uint64_t> total_bytes_{0};
};

}  // namespace distval::ps

#endif  // DISTVAL_PS_VARIABLE_STORE_H_
