// Shared memory for co-located peers: segments, the registry of lendable
// memory, and the transport's shared-memory path (handshake, references in
// place of large frames, memory given back when the receiver is done).
// Both ends live in this process, which is enough for the transport: a
// segment is opened by name just as another process would.
#include "distval/shared_memory.h"

#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <cstring>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "distval/transport.h"

namespace distval::transport {
namespace {

using std::chrono::milliseconds;

std::vector<std::byte> Pattern(size_t size, uint64_t seed) {
  std::vector<std::byte> out(size);
  uint64_t x = seed * 0x9E3779B97F4A7C15ull + 1;
  for (size_t i = 0; i < size; ++i) {
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    out[i] = static_cast<std::byte>(x >> 24);
  }
  return out;
}

bool SameBytes(const Frame& f, const std::byte* p, size_t n) {
  return f.size() == n && std::memcmp(f.data(), p, n) == 0;
}

TEST(SharedSegmentTest, APeerOpensTheSameBytesByName) {
  auto a = SharedSegment::Create(10000);
  ASSERT_TRUE(a.ok()) << a.status();
  EXPECT_GE((*a)->size(), 10000u);
  EXPECT_EQ(reinterpret_cast<uintptr_t>((*a)->data()) % 4096, 0u);
  EXPECT_EQ((*a)->data()[9999], std::byte{0});  // zero-filled
  const auto bytes = Pattern(10000, 1);
  std::memcpy((*a)->data(), bytes.data(), bytes.size());
  auto b = SharedSegment::Open((*a)->name());
  ASSERT_TRUE(b.ok()) << b.status();
  EXPECT_NE((*a)->data(), (*b)->data());                                // another mapping ...
  EXPECT_EQ(std::memcmp((*b)->data(), bytes.data(), bytes.size()), 0);  // ... of the same bytes
  (*b)->data()[5] = std::byte{0x42};
  EXPECT_EQ((*a)->data()[5], std::byte{0x42});
  (*a)->Unlink();
  EXPECT_EQ(SharedSegment::Open((*a)->name()).status().code(), StatusCode::kNotFound);
}

TEST(SharedSegmentTest, OnlyDistvalNamesAreOpened) {
  EXPECT_EQ(SharedSegment::Open("/etc-passwd").status().code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(SharedSegment::Open("/distval-../x").status().code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(SharedSegment::Create(0).status().code(), StatusCode::kInvalidArgument);
  EXPECT_TRUE(SharedSegment::IsSegmentName("/distval-12-3-00ff"));
  EXPECT_FALSE(SharedSegment::IsSegmentName("distval-12-3-00ff"));
}

TEST(SharedSegmentTest, DestroyingTheCreatorsSegmentRemovesItsName) {
  std::string name;
  {
    auto a = SharedSegment::Create(4096);
    ASSERT_TRUE(a.ok());
    name = (*a)->name();
    EXPECT_TRUE(SharedSegment::Open(name).ok());
  }
  EXPECT_EQ(SharedSegment::Open(name).status().code(), StatusCode::kNotFound);
}

TEST(SharedMemoryRegistryTest, FindsOnlyRangesInsideLiveSegments) {
  SharedMemoryRegistry registry;
  auto seg = SharedSegment::Create(8192);
  ASSERT_TRUE(seg.ok());
  registry.Add(*seg);
  const std::byte* base = (*seg)->data();
  EXPECT_EQ(registry.Find(base, 8192), *seg);
  EXPECT_EQ(registry.Find(base + 100, 1000), *seg);
  EXPECT_EQ(registry.Find(base + 100, 8192), nullptr);  // runs past the end
  std::vector<std::byte> heap(100);
  EXPECT_EQ(registry.Find(heap.data(), heap.size()), nullptr);
  seg->reset();
  EXPECT_EQ(registry.Find(base, 10), nullptr);  // destroyed: no longer lendable
}

TEST(IsLocalEndpointTest, LoopbackIpcAndThisHostAreLocal) {
  EXPECT_TRUE(IsLocalEndpoint("tcp://127.0.0.1:5555"));
  EXPECT_TRUE(IsLocalEndpoint("tcp://localhost:5555"));
  EXPECT_TRUE(IsLocalEndpoint("tcp://[::1]:5555"));
  EXPECT_TRUE(IsLocalEndpoint("ipc:///tmp/x"));
  EXPECT_FALSE(IsLocalEndpoint("inproc://x"));
  EXPECT_FALSE(IsLocalEndpoint("tcp://192.0.2.1:5555"));  // TEST-NET-1, never ours
  EXPECT_FALSE(IsLocalEndpoint("tcp://example.invalid:5555"));
}

// A ROUTER and a DEALER over loopback TCP, both offering shared memory.
class SharedMemoryTransportTest : public ::testing::Test {
 protected:
  void MakePair(bool router_accepts = true, bool dealer_offers = true) {
    SocketOptions ro, dopts;
    ro.shared_memory = router_accepts;
    dopts.shared_memory = dealer_offers;
    auto r = Socket::Create(context_, SocketType::kRouter, ro);
    auto d = Socket::Create(context_, SocketType::kDealer, dopts);
    ASSERT_TRUE(r.ok() && d.ok());
    router_ = std::move(*r);
    dealer_ = std::move(*d);
    auto endpoint = router_->Bind("tcp://127.0.0.1:0");
    ASSERT_TRUE(endpoint.ok());
    ASSERT_TRUE(dealer_->Connect(*endpoint).ok());
  }
  // One request/reply exchange with small frames: the handshake rides on it
  // (the ROUTER answers the offer when it receives, the DEALER takes the
  // answer when it receives). Returns the routing id.
  Frame Handshake() {
    EXPECT_TRUE(dealer_->Send(MakeMessage(Payload::Copy(Bytes("ping")))).ok());
    auto req = router_->Receive(milliseconds(5000));
    EXPECT_TRUE(req.ok()) << req.status();
    if (!req.ok()) return Frame();
    EXPECT_EQ(req->size(), 2u);
    Frame identity = (*req)[0];
    EXPECT_TRUE(
        router_->Send(MakeMessage(Payload::Copy(identity.bytes()), Payload::Copy(Bytes("pong"))))
            .ok());
    auto rep = dealer_->Receive(milliseconds(5000));
    EXPECT_TRUE(rep.ok()) << rep.status();
    return identity;
  }
  static std::span<const std::byte> Bytes(const char* s) {
    return std::as_bytes(std::span(s, std::strlen(s)));
  }

  Context context_;
  std::unique_ptr<Socket> router_, dealer_;
};

TEST_F(SharedMemoryTransportTest, LargeFramesTravelAsReferencesBothWays) {
  MakePair();
  Frame identity = Handshake();
  EXPECT_TRUE(dealer_->shared_memory_stats().active);
  EXPECT_TRUE(router_->shared_memory_stats().active);

  // DEALER -> ROUTER: a large frame is copied once into a pooled segment.
  const auto big = Pattern(3 << 20, 7);
  const auto small = Pattern(100, 8);
  ASSERT_TRUE(dealer_
                  ->Send(MakeMessage(Payload::Copy(Bytes("header")), Payload::Copy(small),
                                     Payload::Borrow(big.data(), big.size(), nullptr)))
                  .ok());
  auto got = router_->Receive(milliseconds(5000));
  ASSERT_TRUE(got.ok()) << got.status();
  ASSERT_EQ(got->size(), 4u);  // identity, header, small, big: no envelope left
  EXPECT_TRUE(SameBytes((*got)[2], small.data(), small.size()));
  EXPECT_TRUE(SameBytes((*got)[3], big.data(), big.size()));
  EXPECT_TRUE((*got)[3].AlignedFor(64));
  EXPECT_FALSE((*got)[3].lent());  // a copy into the sender's pool
  EXPECT_EQ(dealer_->shared_memory_stats().frames_sent, 1);
  EXPECT_EQ(router_->shared_memory_stats().frames_received, 1);
  EXPECT_EQ(router_->shared_memory_stats().bytes_received, static_cast<int64_t>(big.size()));

  // ROUTER -> DEALER.
  const auto reply = Pattern(1 << 20, 9);
  ASSERT_TRUE(router_
                  ->Send(MakeMessage(Payload::Copy(identity.bytes()), Payload::Copy(Bytes("r")),
                                     Payload::Copy(reply)))
                  .ok());
  auto back = dealer_->Receive(milliseconds(5000));
  ASSERT_TRUE(back.ok()) << back.status();
  ASSERT_EQ(back->size(), 2u);
  EXPECT_TRUE(SameBytes((*back)[1], reply.data(), reply.size()));
  EXPECT_EQ(router_->shared_memory_stats().frames_sent, 1);
  EXPECT_EQ(dealer_->shared_memory_stats().frames_received, 1);
}

TEST_F(SharedMemoryTransportTest, RegisteredMemoryIsLentWithoutACopyAndReturnedWhenDropped) {
  MakePair();
  Frame identity = Handshake();
  auto seg = SharedSegment::Create(1 << 20);
  ASSERT_TRUE(seg.ok());
  context_.shared_memory().Add(*seg);
  const auto bytes = Pattern(1 << 19, 3);
  std::memcpy((*seg)->data() + 4096, bytes.data(), bytes.size());
  std::atomic<int> released{0};
  std::shared_ptr<const void> owner(static_cast<const void*>(seg->get()),
                                    [&released](const void*) { released.fetch_add(1); });
  ASSERT_TRUE(router_
                  ->Send(MakeMessage(
                      Payload::Copy(identity.bytes()), Payload::Copy(Bytes("r")),
                      Payload::Borrow((*seg)->data() + 4096, bytes.size(), std::move(owner))))
                  .ok());
  EXPECT_EQ(router_->shared_memory_stats().frames_lent, 1);
  auto back = dealer_->Receive(milliseconds(5000));
  ASSERT_TRUE(back.ok()) << back.status();
  ASSERT_EQ(back->size(), 2u);
  EXPECT_TRUE(SameBytes((*back)[1], bytes.data(), bytes.size()));
  EXPECT_TRUE((*back)[1].lent());
  // The receiver views the lender's memory itself: a later write shows.
  (*seg)->data()[4096] = std::byte{0x5a};
  EXPECT_EQ((*back)[1].data()[0], std::byte{0x5a});
  // Lent until the receiver drops its last Frame over it; the lender notices
  // on its next send or receive.
  Frame keep = (*back)[1];
  back->clear();
  router_->Receive(milliseconds(0)).status().IgnoreError();
  EXPECT_EQ(released.load(), 0);
  keep = Frame();
  router_->Receive(milliseconds(0)).status().IgnoreError();
  EXPECT_EQ(released.load(), 1);
}

TEST_F(SharedMemoryTransportTest, PooledBuffersAreReusedOnceReturned) {
  MakePair();
  Handshake();
  const auto big = Pattern(1 << 20, 11);
  for (int i = 0; i < 20; ++i) {
    ASSERT_TRUE(dealer_
                    ->Send(MakeMessage(Payload::Copy(Bytes("h")),
                                       Payload::Borrow(big.data(), big.size(), nullptr)))
                    .ok());
    auto got = router_->Receive(milliseconds(5000));
    ASSERT_TRUE(got.ok());
    ASSERT_TRUE(SameBytes((*got)[2], big.data(), big.size()));
  }  // each received message is dropped before the next send
  EXPECT_EQ(dealer_->shared_memory_stats().frames_sent, 20);
  // Every send after the first found the previous buffer returned: the peer
  // mapped one segment (one name) for all of them.
  EXPECT_EQ(router_->shared_memory_stats().frames_received, 20);
}

TEST_F(SharedMemoryTransportTest, RefusedOfferKeepsPlainFrames) {
  MakePair(/*router_accepts=*/false, /*dealer_offers=*/true);
  Frame identity = Handshake();
  EXPECT_FALSE(dealer_->shared_memory_stats().active);
  const auto big = Pattern(1 << 20, 5);
  ASSERT_TRUE(dealer_->Send(MakeMessage(Payload::Copy(Bytes("h")), Payload::Copy(big))).ok());
  auto got = router_->Receive(milliseconds(5000));
  ASSERT_TRUE(got.ok());
  EXPECT_TRUE(SameBytes((*got)[2], big.data(), big.size()));
  EXPECT_EQ(dealer_->shared_memory_stats().frames_sent, 0);
}

TEST_F(SharedMemoryTransportTest, AnEnvelopeThatDoesNotCheckOutLeavesEmptyFrames) {
  MakePair();
  Handshake();
  // A forged envelope: the right magic, then nonsense.
  std::vector<std::byte> forged(64, std::byte{0x7f});
  const unsigned char magic[16] = {0xff, 'd', 'v', '-', 's', 'h', 'm', '-',
                                   'r',  'e', 'f', 's', 0,   0,   0,   1};
  std::memcpy(forged.data(), magic, 16);
  SocketOptions plain;
  auto raw = Socket::Create(context_, SocketType::kDealer, plain);
  ASSERT_TRUE(raw.ok());
  // Reuse the ROUTER through a second, plain DEALER.
  auto endpoint_dealer = Socket::Create(context_, SocketType::kRouter, plain);
  ASSERT_TRUE(endpoint_dealer.ok());
  auto ep = (*endpoint_dealer)->Bind("tcp://127.0.0.1:0");
  ASSERT_TRUE(ep.ok());
  ASSERT_TRUE((*raw)->Connect(*ep).ok());
  ASSERT_TRUE((*raw)
                  ->Send(MakeMessage(Payload::Copy(Bytes("h")), Payload::Copy(Bytes("")),
                                     Payload::Copy(forged)))
                  .ok());
  auto got = (*endpoint_dealer)->Receive(milliseconds(5000));
  ASSERT_TRUE(got.ok()) << got.status();
  ASSERT_EQ(got->size(), 3u);  // identity, header, the placeholder; envelope removed
  EXPECT_EQ((*got)[2].size(), 0u);
}

// A ROUTER that reads large frames as they arrive (early receive): the
// sender streams the largest one through its ring, writing at most one ring
// ahead of the reader, so sender and reader must run at the same time.
class StreamingTest : public SharedMemoryTransportTest {
 protected:
  void MakeStreamingPair() {
    SocketOptions ro, dopts;
    ro.shared_memory = true;
    ro.shared_memory_early_receive = true;
    dopts.shared_memory = true;
    auto r = Socket::Create(context_, SocketType::kRouter, ro);
    auto d = Socket::Create(context_, SocketType::kDealer, dopts);
    ASSERT_TRUE(r.ok() && d.ok());
    router_ = std::move(*r);
    dealer_ = std::move(*d);
    auto endpoint = router_->Bind("tcp://127.0.0.1:0");
    ASSERT_TRUE(endpoint.ok());
    ASSERT_TRUE(dealer_->Connect(*endpoint).ok());
  }
};

TEST_F(StreamingTest, ALargeFrameStreamsThroughTheRingAndReadsInOrder) {
  MakeStreamingPair();
  Handshake();
  const auto big = Pattern(9 << 20, 21);  // several times the ring
  const auto other = Pattern(300 << 10, 22);
  Status sent;
  std::thread sender([&] {
    sent = dealer_->Send(MakeMessage(Payload::Copy(Bytes("h")), Payload::Copy(other),
                                     Payload::Borrow(big.data(), big.size(), nullptr)));
  });
  auto got = router_->Receive(milliseconds(10000));
  ASSERT_TRUE(got.ok()) << got.status();
  ASSERT_EQ(got->size(), 4u);
  const Frame& contiguous = (*got)[2];
  const Frame& ring = (*got)[3];
  EXPECT_TRUE(ring.ring());
  EXPECT_EQ(ring.data(), nullptr);
  EXPECT_EQ(ring.size(), big.size());
  EXPECT_FALSE(contiguous.ring());
  // Any order: the contiguous frame first (it does not depend on the ring).
  ASSERT_TRUE(contiguous.WaitReady(contiguous.size()).ok());
  EXPECT_TRUE(SameBytes(contiguous, other.data(), other.size()));
  const size_t w = ring.window_limit();
  ASSERT_GT(w, 0u);
  for (size_t off = 0; off < big.size(); off += w) {
    const size_t n = std::min(w, big.size() - off);
    auto p = ring.Window(off, n);
    ASSERT_TRUE(p.ok()) << p.status();
    ASSERT_EQ(std::memcmp(*p, big.data() + off, n), 0) << "window at " << off;
  }
  EXPECT_EQ(ring.Window(0, 16).status().code(), StatusCode::kFailedPrecondition);  // no going back
  got->clear();
  sender.join();
  EXPECT_TRUE(sent.ok()) << sent;
}

TEST_F(StreamingTest, MaterializedReadsARingFrameThroughIntoOwnMemory) {
  MakeStreamingPair();
  Handshake();
  const auto big = Pattern(5 << 20, 31);
  std::thread sender([&] {
    EXPECT_TRUE(dealer_
                    ->Send(MakeMessage(Payload::Copy(Bytes("h")),
                                       Payload::Borrow(big.data(), big.size(), nullptr)))
                    .ok());
  });
  auto got = router_->Receive(milliseconds(10000));
  ASSERT_TRUE(got.ok()) << got.status();
  ASSERT_TRUE((*got)[2].ring());
  auto whole = (*got)[2].Materialized();
  ASSERT_TRUE(whole.ok()) << whole.status();
  EXPECT_FALSE(whole->streaming());
  EXPECT_TRUE(SameBytes(*whole, big.data(), big.size()));
  sender.join();
}

TEST_F(StreamingTest, ASenderStopsWhenTheReaderDropsARingFrameUnread) {
  MakeStreamingPair();
  Handshake();
  const auto big = Pattern(16 << 20, 41);
  std::atomic<bool> done{false};
  std::thread sender([&] {
    EXPECT_TRUE(dealer_
                    ->Send(MakeMessage(Payload::Copy(Bytes("h")),
                                       Payload::Borrow(big.data(), big.size(), nullptr)))
                    .ok());
    done = true;
  });
  auto got = router_->Receive(milliseconds(10000));
  ASSERT_TRUE(got.ok()) << got.status();
  got->clear();  // never read: the sender must not wait for us forever
  sender.join();
  EXPECT_TRUE(done.load());
  // And the ring is usable again for the next frame.
  std::thread again([&] {
    EXPECT_TRUE(dealer_
                    ->Send(MakeMessage(Payload::Copy(Bytes("h")),
                                       Payload::Borrow(big.data(), big.size(), nullptr)))
                    .ok());
  });
  auto next = router_->Receive(milliseconds(10000));
  ASSERT_TRUE(next.ok());
  auto whole = (*next)[2].Materialized();
  ASSERT_TRUE(whole.ok());
  EXPECT_TRUE(SameBytes(*whole, big.data(), big.size()));
  again.join();
}

// Back-to-back frames through the ring reuse leases and their counters: a
// reader's "I am done" from one frame must never leak into the next.
TEST_F(StreamingTest, ManyRingFramesBackToBackArriveIntact) {
  MakeStreamingPair();
  Handshake();
  constexpr int kFrames = 150;
  std::vector<std::vector<std::byte>> frames;
  for (int i = 0; i < kFrames; ++i) frames.push_back(Pattern((1 << 20) + 4096 * i, 100 + i));
  std::thread sender([&] {
    for (const auto& f : frames)
      ASSERT_TRUE(dealer_
                      ->Send(MakeMessage(Payload::Copy(Bytes("h")),
                                         Payload::Borrow(f.data(), f.size(), nullptr)))
                      .ok());
  });
  for (int i = 0; i < kFrames; ++i) {
    auto got = router_->Receive(milliseconds(10000));
    ASSERT_TRUE(got.ok()) << got.status();
    const Frame& ring = (*got)[2];
    ASSERT_TRUE(ring.ring()) << i;
    const auto& want = frames[static_cast<size_t>(i)];
    for (size_t off = 0; off < want.size(); off += ring.window_limit()) {
      const size_t n = std::min(ring.window_limit(), want.size() - off);
      auto p = ring.Window(off, n);
      ASSERT_TRUE(p.ok()) << "frame " << i << " at " << off << ": " << p.status();
      ASSERT_EQ(std::memcmp(*p, want.data() + off, n), 0) << "frame " << i << " at " << off;
    }
  }
  sender.join();
}

TEST_F(StreamingTest, ContiguousStreamingFramesCompleteWithWaitReady) {
  MakeStreamingPair();
  Handshake();
  // Two frames too small for the ring: copied after the send, front to back.
  const auto a = Pattern(200 << 10, 51), b = Pattern(100 << 10, 52);
  ASSERT_TRUE(
      dealer_->Send(MakeMessage(Payload::Copy(Bytes("h")), Payload::Copy(a), Payload::Copy(b)))
          .ok());
  auto got = router_->Receive(milliseconds(5000));
  ASSERT_TRUE(got.ok());
  for (size_t i : {2u, 3u}) {
    const Frame& f = (*got)[i];
    EXPECT_FALSE(f.ring());
    ASSERT_TRUE(f.WaitReady(f.size()).ok());
    auto p = f.Window(0, f.size());
    ASSERT_TRUE(p.ok());
    EXPECT_EQ(*p, f.data());
  }
  EXPECT_TRUE(SameBytes((*got)[2], a.data(), a.size()));
  EXPECT_TRUE(SameBytes((*got)[3], b.data(), b.size()));
}

}  // namespace
}  // namespace distval::transport
