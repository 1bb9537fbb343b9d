// Status and StatusOr<T>: the error currency between distval modules.
//
// A Status is either OK or carries a canonical code and a human-readable
// message that names the problem (which field, which variable, which peer).
// Both types are [[nodiscard]]: ignoring an error is a compile warning.
// Thread-safety: values, no shared state; copy freely.
#ifndef DISTVAL_STATUS_H_
#define DISTVAL_STATUS_H_

#include <cassert>
#include <optional>
#include <ostream>
#include <string>
#include <string_view>
#include <utility>
#include <variant>

namespace distval {

// Canonical codes (same meaning as gRPC/absl). The numeric values travel on
// the wire in replies: never renumber.
enum class StatusCode : int {
  kOk = 0,
  kCancelled = 1,
  kUnknown = 2,
  kInvalidArgument = 3,
  kDeadlineExceeded = 4,
  kNotFound = 5,
  kAlreadyExists = 6,
  kPermissionDenied = 7,
  kResourceExhausted = 8,
  kFailedPrecondition = 9,
  kAborted = 10,
  kOutOfRange = 11,
  kUnimplemented = 12,
  kInternal = 13,
  kUnavailable = 14,
  kDataLoss = 15,
};

// "InvalidArgument", "NotFound", ... ("Unknown(<n>)" for values out of range).
std::string StatusCodeName(StatusCode code);
// Maps a wire integer to a code; out-of-range values become kUnknown.
StatusCode StatusCodeFromInt(int value);

class [[nodiscard]] Status {
 public:
  // OK.
  Status() = default;
  Status(StatusCode code, std::string message);

  static Status Ok() { return Status(); }

  bool ok() const { return code_ == StatusCode::kOk; }
  StatusCode code() const { return code_; }
  const std::string& message() const { return message_; }

  // "OK" or "<CodeName>: <message>".
  std::string ToString() const;

  // Returns a copy whose message is "<context>: <message>" (OK stays OK).
  Status WithContext(std::string_view context) const;

  // Explicitly drops the status (for places where failure is harmless).
  void IgnoreError() const {}

  friend bool operator==(const Status& a, const Status& b) {
    return a.code_ == b.code_ && a.message_ == b.message_;
  }

 private:
  StatusCode code_ = StatusCode::kOk;
  std::string message_;
};

std::ostream& operator<<(std::ostream& os, const Status& s);

Status OkStatus();
Status CancelledError(std::string message);
Status InvalidArgumentError(std::string message);
Status DeadlineExceededError(std::string message);
Status NotFoundError(std::string message);
Status AlreadyExistsError(std::string message);
Status PermissionDeniedError(std::string message);
Status ResourceExhaustedError(std::string message);
Status FailedPreconditionError(std::string message);
Status AbortedError(std::string message);
Status OutOfRangeError(std::string message);
Status UnimplementedError(std::string message);
Status InternalError(std::string message);
Status UnavailableError(std::string message);
Status DataLossError(std::string message);

// Either a value of T or a non-OK Status.
template <typename T>
class [[nodiscard]] StatusOr {
 public:
  // Constructing from an OK status is a programming error; it becomes
  // Internal so that it can never be mistaken for a value.
  StatusOr(Status status)  // NOLINT(google-explicit-constructor)
      : status_(status.ok() ? InternalError("StatusOr constructed from OK status")
                            : std::move(status)) {}
  StatusOr(const T& value) : value_(value) {}  // NOLINT
  StatusOr(T&& value) : value_(std::move(value)) {}  // NOLINT
  template <typename U,
            typename = std::enable_if_t<std::is_constructible_v<T, U&&> &&
                                        !std::is_same_v<std::decay_t<U>, Status> &&
                                        !std::is_same_v<std::decay_t<U>, StatusOr<T>> &&
                                        !std::is_same_v<std::decay_t<U>, T>>>
  StatusOr(U&& value) : value_(T(std::forward<U>(value))) {}  // NOLINT

  bool ok() const { return value_.has_value(); }
  const Status& status() const& { return status_; }
  Status status() && { return std::move(status_); }

  // Precondition: ok().
  const T& value() const& {
    assert(ok());
    return *value_;
  }
  T& value() & {
    assert(ok());
    return *value_;
  }
  T&& value() && {
    assert(ok());
    return std::move(*value_);
  }
  const T& operator*() const& { return value(); }
  T& operator*() & { return value(); }
  T&& operator*() && { return std::move(*value_); }
  const T* operator->() const { return &value(); }
  T* operator->() { return &value(); }

  T value_or(T fallback) const& { return ok() ? *value_ : std::move(fallback); }

 private:
  Status status_;  // OK when value_ holds a value.
  std::optional<T> value_;
};

namespace internal {
inline const Status& AsStatus(const Status& s) { return s; }
template <typename T>
const Status& AsStatus(const StatusOr<T>& s) {
  return s.status();
}
}  // namespace internal

}  // namespace distval

#define DV_STATUS_CONCAT_INNER_(a, b) a##b
#define DV_STATUS_CONCAT_(a, b) DV_STATUS_CONCAT_INNER_(a, b)

// Evaluates expr (a Status or StatusOr); returns its status from the
// enclosing function when it is not OK.
#define DV_RETURN_IF_ERROR(expr)                                                   \
  do {                                                                             \
    const auto& dv_status_ref_ = (expr);                                           \
    if (!::distval::internal::AsStatus(dv_status_ref_).ok())                       \
      return ::distval::internal::AsStatus(dv_status_ref_);                        \
  } while (false)

// DV_ASSIGN_OR_RETURN(auto x, MakeX()); or DV_ASSIGN_OR_RETURN(x, MakeX());
#define DV_ASSIGN_OR_RETURN(lhs, expr) \
  DV_ASSIGN_OR_RETURN_IMPL_(DV_STATUS_CONCAT_(dv_statusor_, __LINE__), lhs, expr)
#define DV_ASSIGN_OR_RETURN_IMPL_(tmp, lhs, expr) \
  auto tmp = (expr);                              \
  if (!tmp.ok()) return std::move(tmp).status();  \
  lhs = std::move(tmp).value()

#endif  // DISTVAL_STATUS_H_
