// Rendezvous: how workers learn server endpoints that are only known once
// the servers run (a port the OS chose, a host the scheduler picked).
//
// A rendezvous is a directory every process of the job can read (a shared
// file system under Slurm or MPI, an emptyDir or volume in Kubernetes).
// Server i publishes the endpoint it bound as the one-line file
// <dir>/ps-<i>.endpoint (written to a temporary name, then renamed, so that
// a reader never sees half a line); workers wait until every server's file
// exists. Use a fresh directory per job (e.g. .../$SLURM_JOB_ID): files left
// by an earlier job would be read as this job's.
//
// Thread-safety: pure functions (file system operations only).
#ifndef DISTVAL_RENDEZVOUS_H_
#define DISTVAL_RENDEZVOUS_H_

#include <chrono>
#include <functional>
#include <string>
#include <string_view>
#include <vector>

#include "distval/status.h"

namespace distval {

// <dir>/ps-<shard>.endpoint
std::string RendezvousPath(const std::string& dir, int shard);

// Creates `dir` (and its parents) if needed and publishes `endpoint` for
// `shard`. NotFound / PermissionDenied-like failures come back as
// Unavailable naming the path.
Status PublishEndpoint(const std::string& dir, int shard, const std::string& endpoint);

// Called while waiting, about every `progress_every`: the shards whose
// files are still missing and how long the wait has lasted.
using RendezvousProgress =
    std::function<void(const std::vector<int>& missing, std::chrono::seconds waited)>;

// Waits until every shard 0..num_ps-1 has published, polling the directory,
// and returns the endpoints in shard order. DeadlineExceeded after
// `timeout`, naming the missing shards and their files; InvalidArgument for
// num_ps < 1 or an empty file.
StatusOr<std::vector<std::string>> WaitForEndpoints(
    const std::string& dir, int num_ps, std::chrono::milliseconds timeout,
    const RendezvousProgress& progress = {},
    std::chrono::milliseconds progress_every = std::chrono::seconds(5));

// The endpoint others should use for a server bound to `bound`: a wildcard
// TCP address (tcp://*:P, tcp://0.0.0.0:P, tcp://[::]:P) becomes
// tcp://<host>:P (IPv6 hosts in brackets); anything else is returned as it
// is. InvalidArgument when `bound` is a wildcard and `host` is empty.
StatusOr<std::string> AdvertisedEndpoint(std::string_view bound, std::string_view host);

}  // namespace distval

#endif  // DISTVAL_RENDEZVOUS_H_
