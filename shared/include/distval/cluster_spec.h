// ClusterSpec: who is in a distval job and which task this process is.
//
// A job has parameter servers (each listens on one ZeroMQ endpoint) and
// workers (which only connect; they do not listen). A ClusterSpec holds the
// ps endpoints, the number of workers and, optionally, this process's task
// (its type and index).
//
// Three sources parse to the same spec for equivalent input:
//  - command-line flags (ClusterFlags, filled by main() through CLI11);
//  - a JSON cluster file in TF_CONFIG format (ClusterSpecFromFile);
//  - the TF_CONFIG value (ClusterSpecFromTfConfig; main() reads the
//    environment variable and passes the string: libraries never read it).
//
// TF_CONFIG format:
//   {"cluster": {"ps": ["h0:2222", ...], "worker": ["w0:2222", ...],
//                "chief": ["c0:2222"]},
//    "task": {"type": "worker", "index": 0}}
//
// Endpoints. A ps endpoint is either TensorFlow style "host:port" or a full
// ZeroMQ endpoint: "tcp://host:port", "ipc://path" or "inproc://name".
// "host:port" is normalized to "tcp://host:port". IPv6 hosts go in brackets
// ("[::1]:2222"). Port 0 is accepted (a server may bind port 0 and report the
// port the OS chose; workers must be given the real port).
//
// Workers and the chief. distval numbers workers 0..num_workers-1. TF lists
// worker addresses; distval keeps them (worker_addresses()) but only their
// count matters. A TF "chief" is a worker: in TF_CONFIG and in the "task"
// object of a cluster file, the chief is distval worker 0 and TF's "worker"
// task i is distval worker i + 1 (shifted by one) when a chief is listed.
// The flags and WithTask() always use distval numbering: "worker" i is worker
// i, and "chief" is an alias of worker 0 (index must be 0).
// Evaluator tasks are not supported (InvalidArgument).
//
// Errors: every malformed input gives InvalidArgument whose message starts
// with the source ("TF_CONFIG", "cluster file <path>", the flag name) and
// names the field, e.g.
//   TF_CONFIG: "task.index" must be an integer
//   cluster file /x.json: "cluster.ps[1]" is empty
//   --task-index 3 out of range: 2 ps tasks
//
// Thread-safety: ClusterSpec is a plain value; copy freely.
#ifndef DISTVAL_CLUSTER_SPEC_H_
#define DISTVAL_CLUSTER_SPEC_H_

#include <string>
#include <string_view>
#include <vector>

#include "distval/status.h"

namespace distval {

// This process's role. kNone: no task assigned (e.g. a cluster file read by a
// launcher).
enum class TaskType { kNone, kPs, kWorker };

// "none", "ps", "worker".
std::string_view TaskTypeName(TaskType type);

// Normalizes one ps endpoint: "host:port" -> "tcp://host:port"; full
// "tcp://host:port", "ipc://path" and "inproc://name" endpoints are checked
// and returned unchanged. InvalidArgument (without a field name; callers add
// it) when the text is empty, has another scheme, an empty host or path, a
// missing or non-numeric port, a port above 65535, whitespace, or an
// unbracketed IPv6 address.
StatusOr<std::string> NormalizeEndpoint(std::string_view endpoint);

class ClusterSpec {
 public:
  // An empty spec (no ps, no workers, no task). Not valid for running a job;
  // use the factories below.
  ClusterSpec() = default;

  // Builds a spec without a task from ps endpoints (normalized with
  // NormalizeEndpoint) and a worker count. InvalidArgument when there is no
  // ps, an endpoint is malformed, two endpoints are equal after
  // normalization, or num_workers < 1. Messages name "ps[i]" / "num_workers".
  static StatusOr<ClusterSpec> Make(const std::vector<std::string>& ps_endpoints, int num_workers);

  // Returns a copy with this process's task set (replacing any task the spec
  // had). `type` is "ps", "worker" or "chief" (= worker 0, index must be 0),
  // distval numbering (see the file comment). InvalidArgument for another
  // type ("evaluator": not supported) or an index out of range.
  StatusOr<ClusterSpec> WithTask(std::string_view type, int index) const;
  // Same with a TaskType; kNone clears the task (index ignored).
  StatusOr<ClusterSpec> WithTask(TaskType type, int index) const;

  // Parameter servers, normalized ZeroMQ endpoints, in ps index order.
  const std::vector<std::string>& ps_endpoints() const { return ps_endpoints_; }
  int num_ps() const { return static_cast<int>(ps_endpoints_.size()); }
  // Precondition: 0 <= i < num_ps().
  const std::string& ps_endpoint(int i) const { return ps_endpoints_[static_cast<size_t>(i)]; }

  int num_workers() const { return num_workers_; }
  // Worker addresses in distval worker order (chief first) as listed in
  // TF_CONFIG / a cluster file; empty when the spec came from flags.
  // Informational only: distval workers do not listen.
  const std::vector<std::string>& worker_addresses() const { return worker_addresses_; }
  // True when worker 0 was listed as a TF "chief".
  bool has_chief() const { return has_chief_; }

  bool has_task() const { return task_type_ != TaskType::kNone; }
  TaskType task_type() const { return task_type_; }
  // Index within the task type (distval numbering); 0 when there is no task.
  int task_index() const { return task_index_; }
  bool is_ps() const { return task_type_ == TaskType::kPs; }
  bool is_worker() const { return task_type_ == TaskType::kWorker; }
  // Worker 0 is the chief (whether or not it was listed as "chief").
  bool is_chief() const { return is_worker() && task_index_ == 0; }

  // One line, e.g.
  //   "ps=[tcp://h0:2222,tcp://h1:2222] workers=3 task=worker:1"
  // (" (chief)" follows workers=N when has_chief(); "task=none" without a
  // task).
  std::string ToString() const;

  // A TF_CONFIG value (compact JSON, one line) describing this spec, for
  // launchers. tcp ps endpoints are written as "host:port"; ipc/inproc ones
  // as they are. Workers are written under "chief" (worker 0, when
  // has_chief()) and "worker"; when addresses are unknown (spec from flags)
  // placeholders "distval-worker-<i>:0" are written, which distval ignores.
  // "task" is written in TF numbering when has_task().
  // ClusterSpecFromTfConfig(ToTfConfigJson()) == *this (ClusterSpecFromJson
  // when there is no task); known worker addresses and has_chief() survive
  // the round trip too.
  std::string ToTfConfigJson() const;

  // Two specs are equal when they describe the same job and task: same ps
  // endpoints (normalized, in order), same number of workers, same task type
  // and index. Worker addresses and has_chief() are informational and not
  // compared, so flags, a cluster file and TF_CONFIG that describe the same
  // job compare equal.
  friend bool operator==(const ClusterSpec& a, const ClusterSpec& b) {
    return a.ps_endpoints_ == b.ps_endpoints_ && a.num_workers_ == b.num_workers_ &&
           a.task_type_ == b.task_type_ && a.task_index_ == b.task_index_;
  }

 private:
  friend class ClusterSpecParser;

  std::vector<std::string> ps_endpoints_;
  int num_workers_ = 0;
  std::vector<std::string> worker_addresses_;
  bool has_chief_ = false;
  TaskType task_type_ = TaskType::kNone;
  int task_index_ = 0;
};

// Cluster flags as main() binds them (CLI11): --ps, --num-workers,
// --task-type, --task-index.
struct ClusterFlags {
  // Comma-separated ps endpoints ("h0:2222,tcp://h1:2222"); spaces around
  // entries are ignored.
  std::string ps;
  // Number of workers (>= 1).
  int num_workers = 0;
  // "ps", "worker" or "chief" (alias of worker 0). Required.
  std::string task_type;
  // Index within task_type, distval numbering.
  int task_index = 0;
};

// Builds a spec from flags. InvalidArgument naming the flag ("--ps",
// "--num-workers", "--task-type", "--task-index") for any bad value.
StatusOr<ClusterSpec> ClusterSpecFromFlags(const ClusterFlags& flags);

// Parses a cluster description in TF_CONFIG format. "task" is optional (the
// spec then has no task: add one with WithTask()). Messages start with
// `source_name` (e.g. "cluster file /x.json"). InvalidArgument for malformed
// JSON or any bad field. Unknown top-level keys (e.g. TF's "environment",
// "rpc_layer") and unknown keys inside "task" are ignored; unknown jobs in
// "cluster" are errors.
StatusOr<ClusterSpec> ClusterSpecFromJson(std::string_view text, std::string_view source_name);

// Reads and parses a cluster file (ClusterSpecFromJson with source
// "cluster file <path>"). NotFound when the file cannot be opened, DataLoss
// when reading fails, InvalidArgument for bad contents.
StatusOr<ClusterSpec> ClusterSpecFromFile(const std::string& path);

// Parses a TF_CONFIG value (source "TF_CONFIG"). Unlike a cluster file, "task"
// is required.
StatusOr<ClusterSpec> ClusterSpecFromTfConfig(std::string_view value);

}  // namespace distval

#endif  // DISTVAL_CLUSTER_SPEC_H_
