// ParameterStore: where a ParameterServerStrategy's variables live.
//
// The strategy only needs four things from the other side: create a
// variable, pull every variable once per step, push one gradient per step
// (advancing this worker's clock), and the clocks for staleness. Two
// implementations:
//
//   NewRemoteParameterStore(client)  the parameter servers (distval-ps),
//                                    through a connected Client; the normal
//                                    case (ParameterServerStrategy::Create
//                                    makes one from WorkerOptions).
//   NewLocalParameterStore()         (distval/local_parameter_store.h) the
//                                    variables and the servers' optimizer
//                                    code in this process: the single-process
//                                    baseline (`distval-worker --local`).
//
// Thread-safety: implementations are used by one thread at a time (the
// strategy serializes its calls).
#ifndef DISTVAL_PARAMETER_STORE_H_
#define DISTVAL_PARAMETER_STORE_H_

#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "distval/client.h"
#include "distval/status.h"
#include "distval/tensor.h"

namespace distval {

class ParameterStore {
 public:
  virtual ~ParameterStore() = default;

  // Creates `name` (f32, `shape`) with `options` (initializer or initial
  // values, optimizer, aggregation, staleness, partitioner). Idempotent for
  // the same spec; AlreadyExists for a different spec under the same name;
  // InvalidArgument for a bad spec (the optimizer's or initializer's
  // message); transport errors from the servers.
  virtual Status CreateVariable(const std::string& name, const Shape& shape,
                                const VariableOptions& options) = 0;

  // Starts a pull of the current value of every named variable (all
  // created before). When `*done` completes OK, (*out)[i] describes
  // variables[i]: slices sorted by row, covering every row, each a view
  // that stays valid while `*out` keeps it (the slice owners) and at least
  // until the next push. The pull is answered as the consistency model says
  // (BSP/SSP pulls wait for slower workers). A pull started right after a
  // push sees that push (read-my-writes). Errors: an immediate Status for
  // what is wrong before anything is sent; otherwise `*done` reports them
  // (NotFound for an unknown variable, the servers' errors).
  virtual Status StartPull(const std::vector<std::string>& variables,
                           std::shared_ptr<std::vector<PulledVariable>> out,
                           RequestHandle* done) = 0;

  // Starts a push of one gradient per listed variable (whole-variable, f32,
  // the variable's element count) that advances this worker's clock by one
  // (clock() counts it at once). The gradient buffers are borrowed until
  // `*done` completes. Errors: as StartPull (InvalidArgument for sizes,
  // NotFound, the servers').
  virtual Status StartPush(std::span<const PushSource> gradients, RequestHandle* done) = 0;

  // StartPull / StartPush and wait for them.
  Status Pull(const std::vector<std::string>& variables, std::vector<PulledVariable>* out);
  Status Push(std::span<const PushSource> gradients);

  // Steps this worker has completed (pushes with a clock advance).
  virtual int64_t clock() const = 0;
  // The smallest live worker clock the servers reported on their latest
  // replies (this worker's own clock for a local store).
  virtual int64_t min_clock() const = 0;
  // After a request failed with Aborted (a parameter server restarted from a
  // checkpoint behind this worker's clock, Client::AcceptRollback): moves
  // the clock back to the checkpoint's and returns it. Stores that never
  // roll back return clock().
  virtual int64_t AcceptRollback() { return clock(); }

  // Sets the learning rate of every variable's optimizer (the servers'
  // SetLearningRate without a variable name: every variable they hold,
  // whoever created it). Takes effect for updates applied after the
  // servers acknowledged it. Errors: InvalidArgument for a negative or
  // non-finite rate; the servers' errors.
  virtual Status SetLearningRate(double learning_rate) = 0;

  // Waits until every live worker of the job reached the barrier `name`
  // (a collective: each worker calls it once per name). A store with one
  // worker (local) returns at once. Errors: the servers' (Unavailable,
  // DeadlineExceeded after the client's request timeout).
  virtual Status Barrier(const std::string& name) = 0;

  // Sums `values` over every live worker of the job and returns the sum on
  // every worker (a collective: every worker calls it with the same `key`,
  // never used before in this job, and the same number of values). Values
  // travel and are summed as f32 (integers are exact up to 2^24). A store
  // with one worker (local) returns `values`.
  // Remote scheme: an accumulator variable "__distval/sum/<key>" of shape
  // [shards, values.size()] split over every shard (so that worker 0 can
  // set its learning rate to 1 on each), SGD, async; every worker reads it
  // (barrier), pushes -values into row 0 without advancing its clock
  // (barrier) and reads it again: the sum is the difference, even on
  // servers that kept an accumulator of the same name. Not safe against a
  // SetLearningRate for every variable sent while the collective runs.
  // Errors: InvalidArgument for an empty key; the servers' errors.
  virtual StatusOr<std::vector<double>> SumAcrossWorkers(const std::string& key,
                                                         std::span<const double> values) = 0;

  // The connected client of a remote store (for Stats, ...); null for
  // other stores. Borrowed.
  virtual Client* client() { return nullptr; }

  // "parameter servers tcp://...,tcp://..." or "local (in-process)".
  virtual std::string Describe() const = 0;
};

// A store backed by the parameter servers `client` is connected to. Takes
// ownership of the client.
std::unique_ptr<ParameterStore> NewRemoteParameterStore(std::unique_ptr<Client> client);

}  // namespace distval

#endif  // DISTVAL_PARAMETER_STORE_H_
