// Checkpoints of one parameter-server shard: writing, verifying, restoring
// and pruning them.
//
// Layout under a checkpoint root DIR (--checkpoint-dir):
//   DIR/ckpt-<clock, 12 digits>/shard-<i>-of-<n>.dvckpt   data of shard i
//   DIR/ckpt-<clock, 12 digits>/manifest-<i>-of-<n>.json  shard i's manifest
// A checkpoint is named by the clock it holds (in BSP every shard checkpoints
// at the same clock, so the shards of one consistent checkpoint share a
// directory). Shard i's part is complete once its manifest exists; the
// checkpoint is complete once the manifests of all n shards exist.
//
// Data file (.dvckpt, format version 1, little-endian):
//   bytes  0..7   magic "DVCKPT\0\1"
//   bytes  8..11  u32 format version (1)
//   bytes 12..15  u32 header length H
//   bytes 16..19  u32 CRC32C of the header
//   bytes 20..23  u32 0 (reserved)
//   bytes 24..24+H  header: UTF-8 JSON
//     {"format": "distval-checkpoint", "version": 1, "shard_index", "num_shards",
//      "clock", "staleness", "worker_clocks": [...],
//      "variables": [{"name", "spec" (hex of the Cap'n Proto CreateVariable
//        request that created it: the full VariableSpec), "spec_frames" (the
//        payload frame sizes that request names), "rows": [begin, end],
//        "version", "step", "learning_rate",
//        "tensors": [{"name": "params" | "slot:<slot>", "offset", "elements",
//                     "crc32c"}, ...]}, ...]}
//   then the tensors: raw f32, each at its 64-byte aligned "offset" (from the
//   start of the file), each with the CRC32C of its bytes in the header.
// Manifest (JSON): {"format": "distval-checkpoint-manifest", "version": 1,
//   "shard_index", "num_shards", "clock", "file", "bytes", "crc32c" (of the
//   whole data file)}.
//
// Durability: every file is written to "<name>.tmp", fsync'd, renamed over
// its name, and the directory fsync'd; the manifest is written only after
// the data file is durable and is removed first when a checkpoint at the
// same clock is rewritten. So a crash at any moment leaves every complete
// checkpoint intact and loadable; an interrupted one is incomplete and
// "latest" skips it.
//
// Thread-safety: the functions are thread-safe with respect to each other
// only for different roots. WriteCheckpoint takes each variable's shared lock
// in turn (see VariableStore::VisitState): the caller must make sure that no
// update is applied meanwhile if the shard must be consistent across
// variables (the server calls it from its dispatcher thread, which applies
// every update).
#ifndef DISTVAL_PS_CHECKPOINT_H_
#define DISTVAL_PS_CHECKPOINT_H_

#include <cstdint>
#include <string>
#include <vector>

#include "distval/status.h"
#include "variable_store.h"

namespace distval::ps {

inline constexpr uint32_t kCheckpointFormatVersion = 1;

// The consistency state saved beside the variables.
struct CheckpointShardInfo {
  int shard_index = 0;
  int num_shards = 1;
  // The clock the checkpoint holds (BSP: clocks fully applied on the shard).
  int64_t clock = 0;
  // Job staleness (-1 async, 0 BSP, s > 0 SSP).
  int32_t staleness = 0;
  // Clock of each worker, by index.
  std::vector<int64_t> worker_clocks;
};

// Writes shard `info.shard_index`'s part of checkpoint
// `root`/ckpt-<info.clock> (creating directories as needed) with every
// variable of `store` (spec, rows, parameters, optimizer slots and step,
// version, learning rate) and returns the checkpoint's directory.
// Errors: InvalidArgument for bad info; Internal (naming the path and errno)
// for I/O failures, in which case the shard's manifest for that clock does
// not exist (an older checkpoint stays the latest).
StatusOr<std::string> WriteCheckpoint(const std::string& root, const CheckpointShardInfo& info,
                                      const VariableStore& store);

// Keeps the newest `keep` checkpoints under `root` (by clock) that hold a
// part of shard `shard_index` and removes that shard's files (manifest
// first, leftover .tmp files too) of the older ones; a directory left empty is removed.
// InvalidArgument for keep < 1; Internal for an unreadable root.
Status PruneCheckpoints(const std::string& root, int shard_index, int num_shards, int keep);

// The directory of the newest complete checkpoint under `root` for a job of
// `num_shards` shards. NotFound (naming root) when there is none.
StatusOr<std::string> FindLatestCheckpoint(const std::string& root, int num_shards);

// What a restore loaded.
struct RestoredCheckpoint {
  CheckpointShardInfo info;
  // (name, per-variable staleness) of every variable created, in order.
  std::vector<std::pair<std::string, int32_t>> variables;
};

// Verifies shard `shard_index`'s part of the checkpoint in `dir` and loads it
// into `store`, which must hold no variable yet. Every error names the file
// and the field: DataLoss for a checksum mismatch or a truncated file;
// NotFound for a missing shard (a manifest or data file absent);
// FailedPrecondition for a checkpoint of a different number of shards or of
// another shard; InvalidArgument for a malformed header or a spec that does
// not match the stored tensors (rows, element counts, optimizer slots).
// On error `store` may hold part of the checkpoint: the caller must not
// serve from it.
StatusOr<RestoredCheckpoint> RestoreCheckpoint(const std::string& dir, int shard_index,
                                               int num_shards, VariableStore& store);

}  // namespace distval::ps

#endif  // DISTVAL_PS_CHECKPOINT_H_
