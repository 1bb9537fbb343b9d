#include "socket_shm.h"

#include <arpa/inet.h>
#include <ifaddrs.h>
#include <linux/futex.h>
#include <netdb.h>
#include <signal.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <bit>
#include <cerrno>
#include <cstring>
#include <random>
#include <string_view>
#include <thread>

#include "distval/logging.h"

namespace distval::transport {
namespace internal {
namespace {

using Clock = std::chrono::steady_clock;

constexpr uint32_t kVersion = 1;
constexpr uint32_t kNumLeases = 4096;  // frames lent at once, per socket
constexpr size_t kControlHeaderBytes = 64;
constexpr size_t kProgressOffset = kControlHeaderBytes + 4 * size_t{kNumLeases};
constexpr size_t kConsumedOffset = kProgressOffset + 8 * size_t{kNumLeases};
constexpr size_t kWaitersOffset = kConsumedOffset + 8 * size_t{kNumLeases};
constexpr size_t kControlBytes = kWaitersOffset + 4 * size_t{kNumLeases};
// The ring a large frame streams through to a receiver that reads it as it
// comes (SocketOptions::shared_memory_early_receive): small enough to stay
// in cache, in slots of the size the receiver reads at once.
constexpr size_t kRingBytes = size_t{2} << 20;
constexpr size_t kRingSlot = size_t{256} << 10;
// A streamed copy publishes its progress every this many bytes.
constexpr size_t kCopyChunk = 256 * 1024;
// Flags of an envelope reference.
constexpr uint8_t kStreamed = 1;
constexpr uint8_t kRing = 2;
// Receiver-side cache of mapped peer segments.
constexpr size_t kMaxMappings = 256;
constexpr size_t kMaxMappedBytes = size_t{4} << 30;

using Magic = std::array<unsigned char, 16>;
constexpr Magic kHelloMagic = {0xff, 'd', 'v', '-', 's', 'h', 'm', '-',
                               'h',  'e', 'l', 'l', 'o', 0,   0,   1};
constexpr Magic kWelcomeMagic = {0xff, 'd', 'v', '-', 's', 'h', 'm', '-',
                                 'w',  'e', 'l', 'c', 'o', 0,   0,   1};
constexpr Magic kRefuseMagic = {0xff, 'd', 'v', '-', 's', 'h', 'm', '-',
                                'r',  'e', 'f', 'u', 's', 0,   0,   1};
constexpr Magic kEnvelopeMagic = {0xff, 'd', 'v', '-', 's', 'h', 'm', '-',
                                  'r',  'e', 'f', 's', 0,   0,   0,   1};
constexpr char kControlMagic[16] = "distval-shm-ctl";

struct ControlHeader {
  char magic[16];
  uint64_t nonce;
  uint32_t num_leases;
  int32_t pid;
  char reserved[32];
};
static_assert(sizeof(ControlHeader) == kControlHeaderBytes);

const ControlHeader& HeaderOf(const SharedSegment& control) {
  return *reinterpret_cast<const ControlHeader*>(control.data());
}
std::atomic_ref<uint32_t> LeaseFlag(const SharedSegment& control, uint32_t index) {
  return std::atomic_ref<uint32_t>(
      *reinterpret_cast<uint32_t*>(control.data() + kControlHeaderBytes + 4 * size_t{index}));
}
uint64_t* ProgressOf(const SharedSegment& control, uint32_t index) {
  return reinterpret_cast<uint64_t*>(control.data() + kProgressOffset + 8 * size_t{index});
}
uint64_t* ConsumedOf(const SharedSegment& control, uint32_t index) {
  return reinterpret_cast<uint64_t*>(control.data() + kConsumedOffset + 8 * size_t{index});
}
uint32_t* WaitersOf(const SharedSegment& control, uint32_t index) {
  return reinterpret_cast<uint32_t*>(control.data() + kWaitersOffset + 4 * size_t{index});
}

bool StartsWith(std::span<const std::byte> bytes, const Magic& magic) {
  return bytes.size() >= magic.size() && std::memcmp(bytes.data(), magic.data(), magic.size()) == 0;
}

// Little-endian writer / bounds-checked reader for the handshake and
// envelope frames.
class Writer {
 public:
  explicit Writer(const Magic& magic) { Put(magic.data(), magic.size()); }
  void U8(uint8_t v) { Put(&v, 1); }
  void U32(uint32_t v) { Put(&v, 4); }
  void U64(uint64_t v) { Put(&v, 8); }
  void Name(const std::string& s) {
    U8(static_cast<uint8_t>(s.size()));
    Put(s.data(), s.size());
  }
  void Text(const std::string& s) { Put(s.data(), s.size()); }
  std::vector<std::byte> Take() { return std::move(bytes_); }

 private:
  void Put(const void* p, size_t n) {
    const auto* b = static_cast<const std::byte*>(p);
    bytes_.insert(bytes_.end(), b, b + n);
  }
  std::vector<std::byte> bytes_;
};

class Reader {
 public:
  explicit Reader(std::span<const std::byte> bytes) : bytes_(bytes), pos_(16) {}
  bool U8(uint8_t* v) { return Get(v, 1); }
  bool U32(uint32_t* v) { return Get(v, 4); }
  bool U64(uint64_t* v) { return Get(v, 8); }
  bool Name(std::string* s) {
    uint8_t n;
    if (!U8(&n) || pos_ + n > bytes_.size()) return false;
    s->assign(reinterpret_cast<const char*>(bytes_.data() + pos_), n);
    pos_ += n;
    return true;
  }
  std::string Rest() const {
    return pos_ >= bytes_.size() ? std::string()
                                 : std::string(reinterpret_cast<const char*>(bytes_.data() + pos_),
                                               bytes_.size() - pos_);
  }
  bool AtEnd() const { return pos_ == bytes_.size(); }

 private:
  bool Get(void* p, size_t n) {
    if (pos_ + n > bytes_.size()) return false;
    std::memcpy(p, bytes_.data() + pos_, n);
    pos_ += n;
    return true;
  }
  std::span<const std::byte> bytes_;
  size_t pos_;
};

OutMessage OneFrame(std::vector<std::byte> bytes) {
  OutMessage m;
  m.push_back(Payload::Copy(std::move(bytes)));
  return m;
}

bool PeerGone(int pid) { return pid > 0 && kill(pid, 0) != 0 && errno == ESRCH; }

// Keeps a referenced frame's memory mapped; gives the lease back when the
// last Frame over it is dropped.
struct ReferenceHolder {
  std::shared_ptr<SharedSegment> segment;
  std::shared_ptr<SharedSegment> control;  // the sender's
  uint32_t lease = 0;
  bool ring = false;
  ~ReferenceHolder() {
    // A sender waiting for ring space must not wait for us any longer. This
    // comes before the lease goes back: once the flag is 0 the sender may
    // reuse the lease (and its counters) for another frame at once.
    if (ring)
      Publish(ConsumedOf(*control, lease), ~uint64_t{0} >> 1, WaitersOf(*control, lease),
              kWriterWaits);
    LeaseFlag(*control, lease).store(0, std::memory_order_seq_cst);
  }
};

long Futex(uint32_t* word, int op, uint32_t value, const timespec* timeout) {
  return syscall(SYS_futex, word, op, value, timeout, nullptr, 0);
}

}  // namespace

void Publish(uint64_t* counter, uint64_t value, uint32_t* waiters, uint32_t bit) {
  std::atomic_ref<uint64_t>(*counter).store(value, std::memory_order_seq_cst);
  if ((std::atomic_ref<uint32_t>(*waiters).load(std::memory_order_seq_cst) & bit) != 0) {
    // Wake every waiter on the counter's low word (processes share it: not
    // a private futex).
    Futex(reinterpret_cast<uint32_t*>(counter), FUTEX_WAKE, INT32_MAX, nullptr);
  }
}

bool Await(uint64_t* counter, uint32_t* waiters, uint32_t bit, const std::function<bool()>& ready,
           Clock::time_point deadline, const std::function<bool()>& alive) {
  // The other side normally publishes within microseconds: spin first,
  // then yield (it may be waiting for our CPU), and only then sleep (a
  // wake-up costs tens of microseconds on a virtual machine).
  const auto spin_until = Clock::now() + std::chrono::microseconds(300);
  for (int i = 0;; ++i) {
    if (ready()) return true;
    if (i < 256) {
#if defined(__x86_64__) || defined(__i386__)
      __builtin_ia32_pause();
#endif
      continue;
    }
    if ((i & 15) == 0 && Clock::now() >= spin_until) break;
    std::this_thread::yield();
  }
  std::atomic_ref<uint32_t> w(*waiters);
  std::atomic_ref<uint32_t> low(*reinterpret_cast<uint32_t*>(counter));
  for (;;) {
    const uint32_t seen = low.load(std::memory_order_seq_cst);
    w.fetch_or(bit, std::memory_order_seq_cst);
    if (ready()) {
      w.fetch_and(~bit, std::memory_order_seq_cst);
      return true;
    }
    // Sleeps only if the counter has not moved since `seen` (no lost
    // wake-up: Publish stores before it checks the waiter bit).
    const timespec slice{0, 10 * 1000 * 1000};
    Futex(reinterpret_cast<uint32_t*>(counter), FUTEX_WAIT, seen, &slice);
    w.fetch_and(~bit, std::memory_order_seq_cst);
    if (ready()) return true;
    if (Clock::now() >= deadline || !alive()) return false;
  }
}

SocketShm::SocketShm(SocketType type, const SocketOptions& options,
                     const SharedMemoryRegistry* registry)
    : type_(type),
      accept_(options.shared_memory),
      early_receive_(options.shared_memory_early_receive),
      min_bytes_(std::max<size_t>(options.shared_memory_min_bytes, 1)),
      pool_cap_(options.shared_memory_pool_bytes),
      registry_(registry),
      next_liveness_check_(Clock::now()) {}

SocketShm::~SocketShm() {
  // Memory still lent to peers: the peers keep their own mappings, and
  // clearing our references here only drops our side.
  leases_.clear();
}

bool SocketShm::EnsureControl() {
  if (control_) return true;
  auto seg = SharedSegment::Create(kControlBytes);
  if (!seg.ok()) {
    DV_LOG(kWarning) << "shared memory off: cannot create a control segment: " << seg.status();
    return false;
  }
  control_ = *seg;
  ControlHeader& h = *reinterpret_cast<ControlHeader*>(control_->data());
  std::memcpy(h.magic, kControlMagic, sizeof(h.magic));
  nonce_ = std::random_device{}() | (uint64_t{std::random_device{}()} << 32);
  h.nonce = nonce_;
  h.num_leases = kNumLeases;
  h.pid = static_cast<int32_t>(getpid());
  leases_.assign(kNumLeases, Lease{});
  free_leases_.clear();
  for (uint32_t i = kNumLeases; i-- > 0;) free_leases_.push_back(i);
  return true;
}

bool SocketShm::ControlMatches(const SharedSegment& control, uint64_t nonce, int pid) {
  if (control.size() < kControlHeaderBytes) return false;
  const ControlHeader& h = HeaderOf(control);
  return std::memcmp(h.magic, kControlMagic, sizeof(h.magic)) == 0 && h.nonce == nonce &&
         h.pid == pid && h.num_leases == kNumLeases && control.size() >= kControlBytes;
}

std::optional<OutMessage> SocketShm::Offer(const std::string& endpoint) {
  if (type_ != SocketType::kDealer || !accept_ || offered_) return std::nullopt;
  if (!IsLocalEndpoint(endpoint) || !EnsureControl()) return std::nullopt;
  offered_ = true;
  Writer w(kHelloMagic);
  w.U32(kVersion);
  w.U32(static_cast<uint32_t>(getpid()));
  w.U64(nonce_);
  w.Name(control_->name());
  return OneFrame(w.Take());
}

bool SocketShm::Intercept(const InMessage& message, std::optional<OutMessage>* reply) {
  if (type_ == SocketType::kRouter) {
    if (message.size() != 2 || !StartsWith(message[1].bytes(), kHelloMagic)) return false;
    const Frame& identity = message[0];
    auto refuse = [&](const std::string& why) {
      Writer w(kRefuseMagic);
      w.Text(why);
      OutMessage m;
      m.push_back(Payload::Copy(identity.bytes()));
      m.push_back(Payload::Copy(w.Take()));
      *reply = std::move(m);
      DV_LOG(kDebug) << "shared memory refused to a peer: " << why;
    };
    Reader r(message[1].bytes());
    uint32_t version = 0, pid = 0;
    uint64_t nonce = 0;
    std::string name;
    if (!r.U32(&version) || !r.U32(&pid) || !r.U64(&nonce) || !r.Name(&name) || !r.AtEnd()) {
      refuse("malformed hello");
      return true;
    }
    if (!accept_) {
      refuse("shared memory is off on this side");
      return true;
    }
    if (version != kVersion) {
      refuse("shared-memory version " + std::to_string(version) + ", expected " +
             std::to_string(kVersion));
      return true;
    }
    auto control = Map(name);
    if (control == nullptr || !ControlMatches(*control, nonce, static_cast<int>(pid))) {
      refuse("cannot map the peer's control segment " + name + " (another host?)");
      return true;
    }
    if (!EnsureControl()) {
      refuse("cannot create a control segment");
      return true;
    }
    peers_[std::string(reinterpret_cast<const char*>(identity.data()), identity.size())] =
        static_cast<int>(pid);
    stats_.active = true;
    Writer w(kWelcomeMagic);
    w.U32(kVersion);
    w.U32(static_cast<uint32_t>(getpid()));
    w.U64(nonce_);
    w.Name(control_->name());
    w.U8(early_receive_ ? 1 : 0);  // we read large frames as they come: rings welcome
    OutMessage m;
    m.push_back(Payload::Copy(identity.bytes()));
    m.push_back(Payload::Copy(w.Take()));
    *reply = std::move(m);
    return true;
  }
  if (message.size() != 1 || !offered_) return false;
  const auto bytes = message[0].bytes();
  if (StartsWith(bytes, kRefuseMagic)) {
    DV_LOG(kDebug) << "peer refused shared memory: " << Reader(bytes).Rest();
    return true;
  }
  if (!StartsWith(bytes, kWelcomeMagic)) return false;
  Reader r(bytes);
  uint32_t version = 0, pid = 0;
  uint64_t nonce = 0;
  uint8_t rings = 0;
  std::string name;
  if (!r.U32(&version) || !r.U32(&pid) || !r.U64(&nonce) || !r.Name(&name) || !r.U8(&rings) ||
      !r.AtEnd() || version != kVersion) {
    DV_LOG(kWarning) << "malformed shared-memory welcome; staying on ZeroMQ frames";
    return true;
  }
  auto control = Map(name);
  if (control == nullptr || !ControlMatches(*control, nonce, static_cast<int>(pid))) {
    DV_LOG(kWarning) << "cannot map the peer's control segment " << name
                     << "; staying on ZeroMQ frames";
    return true;
  }
  active_ = true;
  peer_pid_ = static_cast<int>(pid);
  peer_reads_rings_ = rings != 0;
  stats_.active = true;
  return true;
}

std::optional<uint32_t> SocketShm::AllocateLease() {
  if (free_leases_.empty()) return std::nullopt;
  const uint32_t i = free_leases_.back();
  free_leases_.pop_back();
  held_leases_.push_back(i);
  return i;
}

void SocketShm::ReleaseLease(uint32_t index) {
  Lease& l = leases_[index];
  if (l.pool_index >= 0) pool_[static_cast<size_t>(l.pool_index)].busy = false;
  if (l.ring) ring_busy_ = false;
  l = Lease{};
  free_leases_.push_back(index);
}

void SocketShm::Reclaim() {
  if (held_leases_.empty()) return;
  const auto now = Clock::now();
  const bool check_peers = now >= next_liveness_check_;
  if (check_peers) next_liveness_check_ = now + std::chrono::seconds(1);
  std::vector<int> gone;
  for (size_t k = 0; k < held_leases_.size();) {
    const uint32_t i = held_leases_[k];
    bool release = LeaseFlag(*control_, i).load(std::memory_order_acquire) == 0;
    if (!release && check_peers) {
      const int pid = leases_[i].peer_pid;
      if (std::find(gone.begin(), gone.end(), pid) != gone.end()) {
        release = true;
      } else if (PeerGone(pid)) {
        gone.push_back(pid);
        release = true;
      }
    }
    if (release) {
      LeaseFlag(*control_, i).store(0, std::memory_order_relaxed);
      ReleaseLease(i);
      held_leases_[k] = held_leases_.back();
      held_leases_.pop_back();
    } else {
      ++k;
    }
  }
  for (int pid : gone) {
    for (auto it = peers_.begin(); it != peers_.end();)
      it = it->second == pid ? peers_.erase(it) : std::next(it);
    if (pid == peer_pid_) active_ = false;
  }
}

int SocketShm::GetPoolBuffer(size_t bytes) {
  const size_t size = std::bit_ceil(std::max(bytes, min_bytes_));
  for (size_t i = 0; i < pool_.size(); ++i) {
    if (!pool_[i].busy && pool_[i].segment->size() == size) {
      pool_[i].busy = true;
      return static_cast<int>(i);
    }
  }
  if (pool_bytes_ + size > pool_cap_) {
    // Make room: drop idle buffers of other sizes first.
    for (size_t i = 0; i < pool_.size() && pool_bytes_ + size > pool_cap_; ++i) {
      if (pool_[i].busy || pool_[i].segment == nullptr) continue;
      pool_bytes_ -= pool_[i].segment->size();
      pool_[i].segment.reset();
    }
    if (pool_bytes_ + size > pool_cap_) return -1;
  }
  auto seg = SharedSegment::Create(size);
  if (!seg.ok()) return -1;
  pool_bytes_ += size;
  for (size_t i = 0; i < pool_.size(); ++i) {
    if (pool_[i].segment == nullptr) {
      pool_[i] = PoolBuffer{*seg, true};
      return static_cast<int>(i);
    }
  }
  pool_.push_back(PoolBuffer{*seg, true});
  return static_cast<int>(pool_.size() - 1);
}

SocketShm::SendPlan SocketShm::PrepareSend(OutMessage& message) {
  SendPlan plan;
  const size_t first = type_ == SocketType::kRouter ? 2 : 1;
  if (message.size() <= first) return plan;
  bool eligible = false;
  for (size_t i = first; i < message.size(); ++i) eligible |= message[i].size() >= min_bytes_;
  if (!eligible) return plan;
  int peer_pid = 0;
  std::string peer;
  if (type_ == SocketType::kRouter) {
    peer.assign(reinterpret_cast<const char*>(message[0].data()), message[0].size());
    auto it = peers_.find(peer);
    if (it == peers_.end()) return plan;
    peer_pid = it->second;
  } else {
    if (!active_) return plan;
    peer_pid = peer_pid_;
  }
  Reclaim();
  struct Reference {
    uint32_t frame, lease;
    uint64_t offset, size;
    uint8_t flags;
    const std::string* name;
  };
  std::vector<Reference> refs;
  // At most one frame per message streams through the ring (the largest
  // copied one): it is copied last, so that the receiver may read the other
  // frames in any order without waiting on the ring.
  size_t ring_frame = 0;
  if (peer_reads_rings_ && ring_busy_) {
    // The previous frame through the ring is normally in its last slots
    // right now (the receiver acknowledges before it has read everything):
    // wait a little for it rather than fall back to a full-size copy.
    const auto give_up = Clock::now() + std::chrono::milliseconds(20);
    for (int spins = 0; ring_busy_ && Clock::now() < give_up; ++spins) {
      if (spins < 256) {
#if defined(__x86_64__) || defined(__i386__)
        __builtin_ia32_pause();
#endif
      } else {
        std::this_thread::sleep_for(std::chrono::microseconds(20));
      }
      Reclaim();
    }
  }
  if (peer_reads_rings_ && !ring_busy_ && EnsureRing()) {
    size_t best = kRingSlot;  // smaller frames are not worth it
    for (size_t i = first; i < message.size(); ++i) {
      const Payload& p = message[i];
      if (p.size_ < best || p.data_ == nullptr) continue;
      if (p.borrowed_ && p.owner_ != nullptr && registry_->Find(p.data_, p.size_)) continue;
      best = p.size_;
      ring_frame = i;
    }
  }
  for (size_t i = first; i < message.size(); ++i) {
    Payload& p = message[i];
    if (p.size_ < min_bytes_ || p.data_ == nullptr) continue;
    const bool ring = i == ring_frame;
    std::shared_ptr<SharedSegment> lent;
    if (!ring && p.borrowed_ && p.owner_ != nullptr) lent = registry_->Find(p.data_, p.size_);
    int pool_index = -1;
    if (lent == nullptr && !ring) {
      pool_index = GetPoolBuffer(p.size_);
      if (pool_index < 0) continue;  // stays a ZeroMQ frame
    }
    auto lease = AllocateLease();
    if (!lease) {
      if (pool_index >= 0) pool_[static_cast<size_t>(pool_index)].busy = false;
      break;
    }
    plan.leases.push_back(*lease);
    Lease& l = leases_[*lease];
    l.peer_pid = peer_pid;
    l.peer = peer;
    // Frame indices on the wire count from the header (a ROUTER's routing id
    // is not part of what the peer sees).
    const size_t wire_index = type_ == SocketType::kRouter ? i - 1 : i;
    Reference ref{static_cast<uint32_t>(wire_index), *lease, 0, p.size_, 0, nullptr};
    if (lent != nullptr) {
      l.owner = std::move(p.owner_);
      l.segment = lent;
      ref.offset = static_cast<uint64_t>(p.data_ - lent->data());
      ref.name = &lent->name();
      stats_.frames_lent += 1;
      p = Payload::Borrow(nullptr, 0, nullptr);  // the placeholder
    } else {
      std::byte* destination;
      if (ring) {
        l.ring = true;
        ring_busy_ = true;
        ref.name = &ring_->name();
        ref.flags = kStreamed | kRing;
        destination = ring_->data();
      } else {
        l.pool_index = pool_index;
        const auto& seg = pool_[static_cast<size_t>(pool_index)].segment;
        ref.name = &seg->name();
        ref.flags = kStreamed;
        destination = seg->data();
      }
      std::atomic_ref<uint64_t>(*ProgressOf(*control_, *lease)).store(0, std::memory_order_relaxed);
      std::atomic_ref<uint64_t>(*ConsumedOf(*control_, *lease)).store(0, std::memory_order_relaxed);
      std::atomic_ref<uint32_t>(*WaitersOf(*control_, *lease)).store(0, std::memory_order_relaxed);
      // Copied after the message has gone (FinishCopies); keep the source.
      plan.copies.push_back(SendPlan::Copy{destination, *lease, ring, std::move(p)});
      p = Payload::Borrow(nullptr, 0, nullptr);
    }
    LeaseFlag(*control_, *lease).store(1, std::memory_order_release);
    stats_.frames_sent += 1;
    stats_.bytes_sent += static_cast<int64_t>(ref.size);
    refs.push_back(ref);
  }
  if (refs.empty()) return plan;
  Writer w(kEnvelopeMagic);
  w.Name(control_->name());
  w.U32(static_cast<uint32_t>(refs.size()));
  for (const Reference& r : refs) {
    w.U32(r.frame);
    w.U32(r.lease);
    w.U64(r.offset);
    w.U64(r.size);
    w.U8(r.flags);
    w.Name(*r.name);
  }
  message.push_back(Payload::Copy(w.Take()));
  return plan;
}

void SocketShm::FinishCopies(SendPlan& plan) {
  // Contiguous copies first: nothing the receiver waits for depends on how
  // far it has read the ring.
  for (SendPlan::Copy& c : plan.copies) {
    if (c.ring) continue;
    uint64_t* progress = ProgressOf(*control_, c.lease);
    uint32_t* waiters = WaitersOf(*control_, c.lease);
    const size_t n = c.source.size_;
    for (size_t done = 0; done < n;) {
      const size_t step = std::min(kCopyChunk, n - done);
      std::memcpy(c.destination + done, c.source.data_ + done, step);
      done += step;
      Publish(progress, done, waiters, kReaderWaits);
    }
    c.source = Payload::Borrow(nullptr, 0, nullptr);  // the source's owner goes now
  }
  for (SendPlan::Copy& c : plan.copies) {
    if (!c.ring) continue;
    uint64_t* progress = ProgressOf(*control_, c.lease);
    uint64_t* consumed = ConsumedOf(*control_, c.lease);
    uint32_t* waiters = WaitersOf(*control_, c.lease);
    std::atomic_ref<uint32_t> flag = LeaseFlag(*control_, c.lease);
    const int peer = leases_[c.lease].peer_pid;
    const size_t n = c.source.size_;
    const size_t ring = ring_->size();
    for (size_t done = 0; done < n;) {
      const size_t step = std::min(kCopyChunk, n - done);
      // The slot is free once the reader has moved past its last contents;
      // a reader that dropped the frame wants nothing more.
      bool dropped = false;
      auto space = [&](size_t needed) {
        dropped = flag.load(std::memory_order_seq_cst) == 0;
        return dropped ||
               done + needed <=
                   std::atomic_ref<uint64_t>(*consumed).load(std::memory_order_acquire) + ring;
      };
      // When the ring is full, wait until half of it is free again (fewer
      // hand-offs; the reader still has half a ring to work on meanwhile).
      if (!space(step) &&
          (!Await(
               consumed, waiters, kWriterWaits, [&] { return space(std::max(step, ring / 2)); },
               Clock::time_point::max(), [peer] { return !PeerGone(peer); }) ||
           dropped)) {
        break;
      }
      std::memcpy(c.destination + done % ring, c.source.data_ + done, step);
      done += step;
      Publish(progress, done, waiters, kReaderWaits);
    }
    c.source = Payload::Borrow(nullptr, 0, nullptr);
  }
  plan.copies.clear();
}

bool SocketShm::EnsureRing() {
  if (ring_) return true;
  auto seg = SharedSegment::Create(kRingBytes);
  if (!seg.ok()) return false;
  ring_ = *seg;
  return true;
}

void SocketShm::AbandonSend(SendPlan& plan) {
  for (uint32_t lease : plan.leases)
    LeaseFlag(*control_, lease).store(0, std::memory_order_release);
  plan.copies.clear();
  plan.leases.clear();
  Reclaim();
}

std::shared_ptr<SharedSegment> SocketShm::Map(const std::string& name) {
  auto it = mappings_.find(name);
  if (it != mappings_.end()) {
    it->second.last_use = ++use_counter_;
    return it->second.segment;
  }
  auto seg = SharedSegment::Open(name);
  if (!seg.ok()) return nullptr;
  // Evict the least recently used mappings beyond the caps (Frames that
  // still view them keep their own reference).
  while (!mappings_.empty() &&
         (mappings_.size() >= kMaxMappings || mapped_bytes_ + (*seg)->size() > kMaxMappedBytes)) {
    auto victim = mappings_.begin();
    for (auto m = mappings_.begin(); m != mappings_.end(); ++m)
      if (m->second.last_use < victim->second.last_use) victim = m;
    mapped_bytes_ -= victim->second.segment->size();
    mappings_.erase(victim);
  }
  mapped_bytes_ += (*seg)->size();
  mappings_[name] = Mapping{*seg, ++use_counter_};
  return *seg;
}

void SocketShm::Resolve(InMessage& message) {
  if (message.size() < 2 || !StartsWith(message.back().bytes(), kEnvelopeMagic)) return;
  const Frame envelope = message.back();
  message.pop_back();
  // Wire frame indices count from the header; a ROUTER sees the routing id
  // first.
  const size_t shift = type_ == SocketType::kRouter ? 1 : 0;
  Reader r(envelope.bytes());
  std::string control_name;
  uint32_t count = 0;
  if (!r.Name(&control_name) || !r.U32(&count) || count > message.size()) {
    DV_LOG(kWarning) << "dropping a malformed shared-memory envelope";
    return;
  }
  std::shared_ptr<SharedSegment> control = Map(control_name);
  if (control == nullptr || control->size() < kControlHeaderBytes) {
    DV_LOG(kWarning) << "shared-memory envelope names an unknown control segment " << control_name;
    return;
  }
  const uint32_t num_leases =
      std::min<uint32_t>(HeaderOf(*control).num_leases,
                         static_cast<uint32_t>((control->size() - kControlHeaderBytes) / 4));
  std::vector<std::pair<size_t, Frame>> resolved;
  bool ok = true;
  for (uint32_t k = 0; k < count && ok; ++k) {
    uint32_t frame = 0, lease = 0;
    uint64_t offset = 0, size = 0;
    uint8_t flags = 0;
    std::string name;
    ok = r.U32(&frame) && r.U32(&lease) && r.U64(&offset) && r.U64(&size) && r.U8(&flags) &&
         r.Name(&name) && frame >= 1 && frame + shift < message.size() &&
         message[frame + shift].size() == 0 && lease < num_leases;
    if (!ok) break;
    frame += static_cast<uint32_t>(shift);
    auto holder = std::make_shared<ReferenceHolder>();
    holder->control = control;
    holder->lease = lease;
    holder->segment = Map(name);
    // A ring frame is longer than its ring; any other must lie inside its
    // segment.
    if (holder->segment == nullptr || size == 0 ||
        ((flags & kRing) == 0 &&
         (offset > holder->segment->size() || size > holder->segment->size() - offset))) {
      ok = false;
      break;  // the holder gives the lease back
    }
    Frame f;
    f.data_ = holder->segment->data() + offset;
    f.size_ = static_cast<size_t>(size);
    // The sender's own memory (not a copy into its pool or ring).
    f.lent_ = (flags & kStreamed) == 0;
    if ((flags & kStreamed) != 0) {
      f.progress_ = ProgressOf(*control, lease);
      f.waiters_ = WaitersOf(*control, lease);
      f.stream_pid_ = HeaderOf(*control).pid;
    }
    if ((flags & kRing) != 0) {
      const size_t ring = holder->segment->size();
      if ((flags & kStreamed) == 0 || offset != 0 || ring < kRingSlot || ring % kRingSlot != 0) {
        ok = false;
        break;
      }
      holder->ring = true;
      f.data_ = nullptr;
      f.ring_ = holder->segment->data();
      f.ring_bytes_ = ring;
      f.ring_slot_ = kRingSlot;
      f.consumed_ = ConsumedOf(*control, lease);
    }
    f.holder_ = std::move(holder);
    resolved.emplace_back(frame, std::move(f));
  }
  if (!ok || !r.AtEnd()) {
    DV_LOG(kWarning) << "dropping a shared-memory envelope that does not check out (" << count
                     << " references)";
    return;  // resolved frames drop here and give their leases back
  }
  if (!early_receive_) {
    // The caller reads frames as soon as it gets them: wait for streamed
    // copies to finish (the sender copies right after sending).
    for (auto& [index, f] : resolved) {
      StatusOr<Frame> complete = f.Materialized();
      if (!complete.ok()) {
        DV_LOG(kWarning) << "shared-memory frame never completed: " << complete.status();
        return;  // placeholders stay empty; the leases go back
      }
      f = std::move(*complete);
    }
  }
  for (auto& [index, f] : resolved) {
    stats_.frames_received += 1;
    stats_.bytes_received += static_cast<int64_t>(f.size());
    message[index] = std::move(f);
  }
}

}  // namespace internal

// ---------------------------------------------------------------- locality

bool IsLocalEndpoint(const std::string& endpoint) {
  if (endpoint.rfind("ipc://", 0) == 0) return true;
  if (endpoint.rfind("tcp://", 0) != 0) return false;
  std::string host = endpoint.substr(6);
  const auto colon = host.rfind(':');
  if (colon == std::string::npos) return false;
  host = host.substr(0, colon);
  if (!host.empty() && host.front() == '[' && host.back() == ']')
    host = host.substr(1, host.size() - 2);
  if (host == "localhost" || host == "::1" || host.rfind("127.", 0) == 0) return true;
  char hostname[256] = {};
  if (gethostname(hostname, sizeof(hostname) - 1) == 0 && host == hostname) return true;
  // One of this host's interface addresses.
  ifaddrs* addrs = nullptr;
  if (getifaddrs(&addrs) != 0) return false;
  bool local = false;
  for (ifaddrs* a = addrs; a != nullptr && !local; a = a->ifa_next) {
    if (a->ifa_addr == nullptr) continue;
    char buf[INET6_ADDRSTRLEN] = {};
    if (a->ifa_addr->sa_family == AF_INET) {
      inet_ntop(AF_INET, &reinterpret_cast<sockaddr_in*>(a->ifa_addr)->sin_addr, buf, sizeof(buf));
    } else if (a->ifa_addr->sa_family == AF_INET6) {
      inet_ntop(AF_INET6, &reinterpret_cast<sockaddr_in6*>(a->ifa_addr)->sin6_addr, buf,
                sizeof(buf));
    } else {
      continue;
    }
    local = host == buf;
  }
  freeifaddrs(addrs);
  return local;
}

}  // namespace distval::transport
