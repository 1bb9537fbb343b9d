# distval wire protocol.
#
# Every ZeroMQ message between a worker (DEALER) and a parameter server
# (ROUTER) is multipart: frame 0 is one Cap'n Proto message (a Request or a
# Reply, unpacked, single segment), and every tensor payload travels as a
# frame of its own after it. Tensor bytes are never inside the Cap'n Proto
# message; a TensorRef names the frame that holds them, so they can be sent
# zero-copy and read in place.
#
# Compatibility: fields are only ever added, never renumbered or removed.
# protocolVersion in Hello is bumped when semantics change.

@0xcde91b02d787c974;

using Cxx = import "/capnp/c++.capnp";
$Cxx.namespace("distval::wire");

# Element type of a tensor. Same numbering as distval::DType.
enum DType {
  f32 @0;   # IEEE 754 binary32
  f16 @1;   # IEEE 754 binary16
  bf16 @2;  # bfloat16 (upper half of a binary32)
  f64 @3;   # IEEE 754 binary64
  i32 @4;   # two's complement 32-bit
  i64 @5;   # two's complement 64-bit
}

# How the elements of a payload frame are encoded.
enum Encoding {
  raw @0;   # little-endian elements of the tensor's own dtype
  f16 @1;   # f32 values sent as binary16 (lossy compression of gradients)
  bf16 @2;  # f32 values sent as bfloat16 (lossy compression of gradients)
}

# A tensor payload carried in a frame after the header.
struct TensorRef {
  frame @0 :UInt32;       # index of the payload frame; the header is frame 0, so >= 1
  dtype @1 :DType;        # logical element type of the tensor
  encoding @2 :Encoding;  # how the bytes in the frame encode the elements
  shape @3 :List(Int64);  # dimensions of this payload (e.g. [rows, cols] of a row range)
}

# A contiguous range of rows along axis 0, in the variable's global row numbering.
struct RowRange {
  begin @0 :Int64;  # first row, inclusive
  end @1 :Int64;    # one past the last row
}

# How a server fills a new variable. Initial values are a pure function of
# (kind, parameters, seed, global element index), so they do not depend on how
# the variable is partitioned.
struct Initializer {
  seed @0 :UInt64;  # seed for the random kinds
  union {
    zeros @1 :Void;          # all zero
    constant @2 :Float64;    # every element equal to this value
    uniform :group {         # uniform in [low, high)
      low @3 :Float64;       # lower bound
      high @4 :Float64;      # upper bound
    }
    normal :group {          # normal distribution
      mean @5 :Float64;      # mean
      stddev @6 :Float64;    # standard deviation
    }
    glorotUniform @7 :Void;  # uniform in +-sqrt(6 / (fan_in + fan_out)); fans from the full shape
    values @8 :TensorRef;    # explicit values for this shard's rows (e.g. loading a saved model)
  }
}

# Server-side optimizer kinds.
enum OptimizerKind {
  sgd @0;       # p -= lr * g
  momentum @1;  # v = m * v + g; p -= lr * v (or Nesterov)
  adagrad @2;   # a += g^2; p -= lr * g / (sqrt(a) + eps)
  adam @3;      # Kingma & Ba, with bias correction
  adamw @4;     # Adam with decoupled weight decay
}

# Optimizer and its hyper-parameters. Unused fields are ignored by a kind.
struct OptimizerSpec {
  kind @0 :OptimizerKind;             # which update rule
  learningRate @1 :Float64 = 0.01;    # step size
  momentum @2 :Float64 = 0.9;         # momentum coefficient
  nesterov @3 :Bool = false;          # Nesterov momentum
  beta1 @4 :Float64 = 0.9;            # Adam first-moment decay
  beta2 @5 :Float64 = 0.999;          # Adam second-moment decay
  epsilon @6 :Float64 = 1e-7;         # Adam / Adagrad denominator guard
  weightDecay @7 :Float64 = 0.0;      # AdamW decoupled weight decay
  initialAccumulator @8 :Float64 = 0.1;  # Adagrad initial accumulator value
}

# How the gradients of several workers for one variable are combined.
enum Aggregation {
  mean @0;  # average over the workers that contributed
  sum @1;   # plain sum
}

# Full description of a variable; identical on every worker and shard.
struct VariableSpec {
  name @0 :Text;                 # unique name, e.g. "dense_1/kernel"
  dtype @1 :DType;               # element type of the parameters
  shape @2 :List(Int64);         # full (unpartitioned) shape
  initializer @3 :Initializer;   # how to fill it on creation
  optimizer @4 :OptimizerSpec;   # update rule applied on the servers
  aggregation @5 :Aggregation;   # combination of worker gradients
  staleness @6 :Int32 = -2;      # per-variable bound: -2 inherit job's, -1 async, 0 BSP, s>0 SSP
}

# Hello: the first request of a connection; also used to rejoin.
struct Hello {
  protocolVersion @0 :UInt32;   # the sender's protocol version
  role @1 :Role;                # who is connecting
  workerIndex @2 :Int32;        # this worker's index (workers only)
  numWorkers @3 :Int32;         # number of workers the sender expects in the job
  numShards @4 :Int32;          # number of shards the sender expects
  staleness @5 :Int32;          # job staleness the sender expects: -1 async, 0 BSP, s>0 SSP; -3 = don't check
  enum Role {
    worker @0;   # a training worker: has a clock and is waited for
    control @1;  # a control client (tools/ctl): never waited for
  }
}

# What the server says back to a Hello.
struct HelloReply {
  protocolVersion @0 :UInt32;  # the server's protocol version
  shardIndex @1 :Int32;        # this server's shard index
  numShards @2 :Int32;         # number of shards in the job
  numWorkers @3 :Int32;        # number of workers the server expects
  staleness @4 :Int32;         # current job staleness
  clock @5 :Int64;             # clock at which this worker (re)joins
  incarnation @6 :UInt64;      # random id of this server process (a restart changes it)
  numVariables @7 :Int32;      # variables this shard holds (0 after a restart without --restore)
  restoredClock @8 :Int64 = -1; # clock of the checkpoint this process restored (-1: none)
}

# Create a variable, or find the existing one with the same spec.
struct CreateVariable {
  spec @0 :VariableSpec;  # full spec of the variable
  rows @1 :RowRange;      # rows of axis 0 this shard holds (all rows for an unpartitioned variable)
}

# One variable's update inside a push.
struct Update {
  variable @0 :Text;        # variable name
  values @1 :TensorRef;     # gradient values (dense: rows x row elements; sparse: n x row elements)
  union {
    dense @2 :RowRange;     # gradient for a contiguous row range
    sparse @3 :TensorRef;   # i64 row indices (global numbering), one per row of values
  }
}

# Push gradients for the sender's current clock (header field clock).
struct Push {
  updates @0 :List(Update);   # one entry per variable (or per range / row set)
  advanceClock @1 :Bool;      # after this push, the sender's clock becomes clock + 1
  chunks @2 :UInt32;          # 0: values in this message's payload frames. Else exactly
                              # one dense update (values.frame 0) whose values follow in
                              # this many PushChunk messages (same requestId), in order, so
                              # the server checks and applies each piece while the next
                              # arrives; the push is acknowledged after the last one
}

# One piece of a chunked push (a message of its own, after the Push, with the
# same requestId): values bytes [offset, offset + size of its one payload frame).
struct PushChunk {
  offset @0 :UInt64;  # byte offset inside the update's values
}

# One variable's read inside a pull.
struct Read {
  variable @0 :Text;        # variable name
  encoding @1 :Encoding;    # encoding wanted for the reply payload (raw by default)
  union {
    dense @2 :RowRange;     # a contiguous row range
    sparse @3 :TensorRef;   # i64 row indices (global numbering)
  }
}

# Pull parameters. Held by the consistency controller until the sender's
# staleness bound allows it to be answered.
struct Pull {
  reads @0 :List(Read);  # variables and rows to read
  chunkBytes @1 :UInt64; # 0: values in payload frames of the reply; else the sender
                         # takes them in pieces of about this many bytes, each in a
                         # message of its own after the reply (see PullChunk), so it
                         # can copy one piece while the next is still arriving. The
                         # server may answer whole (small replies) or pick larger pieces.
}

# Reply body of a pull: one tensor per read, in the same order.
struct PullReply {
  tensors @0 :List(TensorRef);  # payload frames with the values (frame 0 when chunks > 0)
  versions @1 :List(UInt64);    # number of updates applied to each variable so far
  chunks @2 :UInt32;            # 0: values in this message; else this many PullChunk
                                # messages follow, with every byte of every tensor, in order
}

# One piece of a chunked pull reply (a message of its own, after the PullReply,
# with the same requestId): the bytes [offset, offset + size of its one payload
# frame) of tensor `tensor` of that reply.
struct PullChunk {
  tensor @0 :UInt32;  # index into PullReply.tensors
  offset @1 :UInt64;  # byte offset inside that tensor's values
}

# Advance the sender's clock without pushing.
struct AdvanceClock {
  to @0 :Int64;  # the new clock (must be >= the current one); -1 means clock + 1
}

# Wait until every live worker has reached the same barrier.
struct Barrier {
  name @0 :Text;  # barrier name; each name counts arrivals separately
}

# Change the consistency mode while the job runs.
struct SetMode {
  staleness @0 :Int32;         # -1 async, 0 BSP, s>0 SSP
  variable @1 :Text;           # empty: the job default; else one variable's override
  staleAwareLr @2 :Bool;       # async: scale the learning rate by 1 / (1 + measured staleness)
  atClock @3 :Int64 = -1;      # first clock the new bound applies to; -1: the next clock boundary this shard sees
}

# Change the learning rate of one or all variables.
struct SetLearningRate {
  variable @0 :Text;           # empty: every variable
  learningRate @1 :Float64;    # the new learning rate
}

# Write a checkpoint now.
struct Checkpoint {
  directory @0 :Text;  # empty: the server's --checkpoint-dir
}

# Reply body of a checkpoint.
struct CheckpointReply {
  path @0 :Text;   # the checkpoint written
  clock @1 :Int64; # the clock it holds
}

# Ask for the server's state.
struct Stats {}

# Reply body of a stats request.
struct StatsReply {
  shardIndex @0 :Int32;                 # this shard
  staleness @1 :Int32;                  # job staleness
  workers @2 :List(WorkerState);        # every known worker
  variables @3 :List(VariableState);    # every variable held
  lastCheckpoint @4 :Text;              # path of the last checkpoint ("" if none)
  nanUpdates @5 :UInt64;                # updates (one variable of one push) refused or skipped
                                        # because their gradient held NaN/Inf (--nan-policy)
  struct WorkerState {
    workerId @0 :Int32;                 # worker index
    clock @1 :Int64;                    # its clock
    live @2 :Bool;                      # false once dropped for silence
  }
  struct VariableState {
    name @0 :Text;                      # variable name
    rows @1 :RowRange;                  # rows held here
    bytes @2 :UInt64;                   # parameter bytes held
    version @3 :UInt64;                 # updates applied
    learningRate @4 :Float64;           # current learning rate
  }
}

# Stop the server.
struct Shutdown {
  checkpointFirst @0 :Bool;  # write a checkpoint before exiting (when a directory is set)
}

# Frame 0 of every request.
struct Request {
  requestId @0 :UInt64;  # unique per sender; echoed in the reply; used to deduplicate retries
  workerId @1 :Int32;    # sender's worker index (-1 for control clients)
  clock @2 :Int64;       # sender's clock (steps completed) when it sent this
  union {
    hello @3 :Hello;                      # join the job
    heartbeat @4 :Void;                   # still alive
    createVariable @5 :CreateVariable;    # create or find a variable
    push @6 :Push;                        # gradients
    pull @7 :Pull;                        # parameters
    advanceClock @8 :AdvanceClock;        # clock without push
    barrier @9 :Barrier;                  # wait for everyone
    setMode @10 :SetMode;                 # change staleness
    setLearningRate @11 :SetLearningRate; # change learning rate
    checkpoint @12 :Checkpoint;           # write a checkpoint
    stats @13 :Stats;                     # report state
    shutdown @14 :Shutdown;               # stop the server
    pushChunk @15 :PushChunk;             # a piece of a chunked push
  }
}

# Frame 0 of every reply.
struct Reply {
  requestId @0 :UInt64;  # the request this answers
  code @1 :Int32;        # distval::StatusCode (0 = OK)
  message @2 :Text;      # error message naming the problem (empty when OK)
  minClock @3 :Int64;    # smallest clock among the shard's live workers when replying
  shardClock @4 :Int64;  # BSP: clocks fully applied on this shard; else the largest worker clock
  union {
    none @5 :Void;                        # no body (errors, heartbeat, push, clock, ...)
    hello @6 :HelloReply;                 # answer to hello
    pull @7 :PullReply;                   # answer to pull
    checkpoint @8 :CheckpointReply;       # answer to checkpoint
    stats @9 :StatsReply;                 # answer to stats
    pullChunk @10 :PullChunk;             # a piece of a chunked pull reply
  }
}
