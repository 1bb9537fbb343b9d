// The shared-memory side of a transport::Socket (SocketOptions::
// shared_memory): the handshake that proves a peer runs on this host, the
// references that replace large frames, and the bookkeeping that returns
// lent memory when the peer is done with it. Implementation detail of
// shared/transport.cc.
//
// Wire format (all integers little-endian; every transport message below
// starts with a 16-byte magic whose first byte is 0xff, which no Cap'n
// Proto header can start with):
//  - HELLO (DEALER -> ROUTER, one frame, sent on Connect to a local
//    endpoint): magic, u32 version, i32 pid, u64 nonce, u8 length + name of
//    the sender's control segment, whose header holds the same nonce and pid.
//  - WELCOME (ROUTER -> DEALER, one frame): the same fields for the ROUTER's
//    control segment, then u8 1 when it reads large frames as they arrive
//    (rings welcome). REFUSE: magic, then a reason (text).
//  - ENVELOPE (last frame of a message that carries references): magic,
//    u8 length + name of the sender's control segment, u32 count, then per
//    reference: u32 frame index (0 is the header; a ROUTER's routing id is
//    not counted), u32 lease, u64 offset, u64 size, u8 flags (1: streamed,
//    the bytes are still being copied; 2: through a ring, see below), u8
//    length + name of the segment holding the bytes. The referenced frames
//    travel as empty frames.
//
// A control segment holds a 64-byte header, an array of u32 lease flags and
// an array of u64 progress counters: the sender sets flag i to 1 before
// lending memory under lease i; the receiver stores 0 when it drops its last
// Frame over that memory; the sender's socket thread then releases the
// memory (Reclaim). A streamed copy (the sender copies into the pooled
// segment after sending the message) publishes the bytes written so far in
// progress counter i, in order, with release stores. A ring (to a receiver
// that reads as the bytes come) is a 2 MiB segment reused for every frame:
// byte k of the frame goes to k mod 2 MiB, copied in 256 KiB slots, and the
// receiver publishes in consumed counter i how far it has read, so that the
// sender writes at most one ring ahead; only one frame at a time uses it.
//
// Thread-safety: used by the socket's thread only, except that Frames made
// by Resolve may be dropped on any thread (an atomic store into shared
// memory).
#ifndef DISTVAL_SHARED_SOCKET_SHM_H_
#define DISTVAL_SHARED_SOCKET_SHM_H_

#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <unordered_map>
#include <vector>

#include "distval/shared_memory.h"
#include "distval/transport.h"

namespace distval::transport::internal {

// Waiting on a counter in shared memory that another process advances (the
// bytes of a streamed frame, how far a reader has read a ring). A waiter
// spins briefly, then announces itself with `bit` in *waiters and sleeps on
// the counter (a futex on its low 32 bits); whoever advances the counter
// (Publish) wakes it. Sleeps are cut into slices so that the waiter notices a
// deadline or a dead peer.
inline constexpr uint32_t kReaderWaits = 1;  // for more bytes
inline constexpr uint32_t kWriterWaits = 2;  // for ring space
// Stores `value` into *counter and wakes a waiter announced with `bit`.
void Publish(uint64_t* counter, uint64_t value, uint32_t* waiters, uint32_t bit);
// Waits until ready() (a check of shared state that only grows true).
// Returns false when `deadline` passes or alive() turns false first.
bool Await(uint64_t* counter, uint32_t* waiters, uint32_t bit, const std::function<bool()>& ready,
           std::chrono::steady_clock::time_point deadline, const std::function<bool()>& alive);

class SocketShm {
 public:
  // `accept`: a ROUTER answers HELLOs with WELCOME (else REFUSE); a DEALER
  // offers on Connect.
  // `registry` (the Context's) must outlive this object.
  SocketShm(SocketType type, const SocketOptions& options, const SharedMemoryRegistry* registry);
  ~SocketShm();
  SocketShm(const SocketShm&) = delete;
  SocketShm& operator=(const SocketShm&) = delete;

  // DEALER: the HELLO to send after connecting to `endpoint`, or nullopt
  // when the endpoint is not local or offering is off.
  std::optional<OutMessage> Offer(const std::string& endpoint);

  // The copies a send still owes its receiver (streamed) and the leases it
  // took; see PrepareSend.
  struct SendPlan {
    struct Copy {
      std::byte* destination;
      uint32_t lease;
      bool ring;       // through the ring, as fast as the receiver reads
      Payload source;  // keeps the source bytes alive until copied
    };
    std::vector<Copy> copies;
    std::vector<uint32_t> leases;
  };
  // Before a send (ROUTER: frame 0 is the routing id): when the peer has
  // accepted shared memory, replaces every payload frame of at least the
  // minimum size by a reference (lending registered memory, else reserving a
  // pooled segment to copy it into) and appends the envelope. A frame that
  // cannot go through shared memory (no lease or pool space left) stays as
  // it is. After ZeroMQ took the message, call FinishCopies(plan); if the
  // send failed, AbandonSend(plan).
  SendPlan PrepareSend(OutMessage& message);
  // Copies the reserved frames into their pooled segments, publishing
  // progress as it goes (the receiver may already be reading the front).
  void FinishCopies(SendPlan& plan);
  // The message never left: gives every lease of `plan` back.
  void AbandonSend(SendPlan& plan);

  // After a receive: true when `message` was a handshake message for this
  // layer (consumed: the caller must not return it); `*reply` is then set
  // when an answer must be sent back on the socket.
  bool Intercept(const InMessage& message, std::optional<OutMessage>* reply);
  // After a receive: if the last frame is an envelope, replaces the empty
  // frames it names by Frames over the sender's shared memory and removes
  // it. An envelope that does not check out (unknown segment, out of bounds,
  // non-empty placeholder) is removed and its placeholders are left empty,
  // so the message fails the protocol's size checks instead of touching
  // memory it should not.
  void Resolve(InMessage& message);

  // Releases the memory of every lease the peers have given back; every
  // second also of leases held by peers whose process is gone. Cheap when
  // nothing is lent; the socket calls it on every send and receive.
  void Reclaim();

  SharedMemoryStats stats() const { return stats_; }

 private:
  struct Lease {
    std::shared_ptr<const void> owner;  // lent memory's owner (zero-copy)
    std::shared_ptr<SharedSegment> segment;
    int pool_index = -1;  // a pooled copy
    bool ring = false;    // streamed through the ring
    int peer_pid = 0;
    std::string peer;  // ROUTER: routing id
  };
  struct PoolBuffer {
    std::shared_ptr<SharedSegment> segment;
    bool busy = false;
  };
  struct Mapping {
    std::shared_ptr<SharedSegment> segment;
    uint64_t last_use = 0;
  };

  bool EnsureControl();
  bool EnsureRing();
  void ReleaseLease(uint32_t index);
  std::optional<uint32_t> AllocateLease();
  int GetPoolBuffer(size_t bytes);
  // The peer's segment `name`, mapped (cached, least recently used evicted).
  std::shared_ptr<SharedSegment> Map(const std::string& name);
  // Checks a peer control segment: distval magic, `nonce`, `pid`.
  static bool ControlMatches(const SharedSegment& control, uint64_t nonce, int pid);

  const SocketType type_;
  const bool accept_;
  const bool early_receive_;
  const size_t min_bytes_;
  const size_t pool_cap_;
  const SharedMemoryRegistry* registry_;

  std::shared_ptr<SharedSegment> control_;  // ours: lease flags
  uint64_t nonce_ = 0;
  std::vector<Lease> leases_;
  std::vector<uint32_t> free_leases_;
  std::vector<uint32_t> held_leases_;
  std::vector<PoolBuffer> pool_;
  size_t pool_bytes_ = 0;
  std::shared_ptr<SharedSegment> ring_;
  bool ring_busy_ = false;  // a frame streamed through it is still lent
  std::chrono::steady_clock::time_point next_liveness_check_;

  // DEALER: the peer accepted (WELCOME checked out).
  bool offered_ = false;
  bool active_ = false;
  int peer_pid_ = 0;
  bool peer_reads_rings_ = false;
  // ROUTER: peers that said HELLO and passed the checks -> their pid.
  std::unordered_map<std::string, int> peers_;

  std::unordered_map<std::string, Mapping> mappings_;
  uint64_t use_counter_ = 0;
  size_t mapped_bytes_ = 0;

  SharedMemoryStats stats_;
};

}  // namespace distval::transport::internal

#endif  // DISTVAL_SHARED_SOCKET_SHM_H_
