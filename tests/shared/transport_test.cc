#include "distval/transport.h"

#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <cstdint>
#include <cstring>
#include <memory>
#include <numeric>
#include <string>
#include <thread>
#include <vector>

namespace distval::transport {
namespace {

using std::chrono::milliseconds;

std::span<const std::byte> Bytes(const std::string& s) { return std::as_bytes(std::span(s)); }

std::string Str(const Frame& f) {
  return std::string(reinterpret_cast<const char*>(f.data()), f.size());
}

Payload Text(const std::string& s) { return Payload::Copy(Bytes(s)); }

// Deterministic, position-dependent byte pattern (a frame that arrived
// shifted, truncated or mixed up with another compares unequal).
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

bool SameBytes(const Frame& f, const std::vector<std::byte>& v) {
  return f.size() == v.size() && (v.empty() || std::memcmp(f.data(), v.data(), v.size()) == 0);
}

// Counts how often a Borrow owner was destroyed.
struct ReleaseCounter {
  // A buffer whose destruction is counted.
  struct Counted {
    Counted(std::vector<std::byte> b, std::atomic<int>* c) : bytes(std::move(b)), releases(c) {}
    ~Counted() { releases->fetch_add(1); }
    std::vector<std::byte> bytes;
    std::atomic<int>* releases;
  };

  std::atomic<int> releases{0};
  // An owner over `bytes` and the address of its data.
  std::pair<std::shared_ptr<const void>, const std::byte*> Make(std::vector<std::byte> bytes) {
    auto counted = std::make_shared<Counted>(std::move(bytes), &releases);
    const std::byte* data = counted->bytes.data();
    return {std::move(counted), data};
  }
  // Bounded wait (not a timing assertion): true once `n` releases happened.
  bool WaitFor(int n) {
    const auto until = std::chrono::steady_clock::now() + std::chrono::seconds(10);
    while (releases.load() < n && std::chrono::steady_clock::now() < until) {
      std::this_thread::sleep_for(milliseconds(1));
    }
    return releases.load() >= n;
  }
};

class TransportTest : public ::testing::Test {
 protected:
  std::unique_ptr<Socket> Make(SocketType type, const SocketOptions& options = {}) {
    auto socket = Socket::Create(context_, type, options);
    EXPECT_TRUE(socket.ok()) << socket.status();
    return socket.ok() ? std::move(socket).value() : nullptr;
  }
  // A ROUTER bound to an OS-chosen loopback port and a DEALER connected to it.
  void MakePair(const SocketOptions& router_options = {},
                const SocketOptions& dealer_options = {}) {
    router_ = Make(SocketType::kRouter, router_options);
    dealer_ = Make(SocketType::kDealer, dealer_options);
    ASSERT_TRUE(router_ && dealer_);
    auto endpoint = router_->Bind("tcp://127.0.0.1:0");
    ASSERT_TRUE(endpoint.ok()) << endpoint.status();
    endpoint_ = *endpoint;
    ASSERT_TRUE(dealer_->Connect(endpoint_).ok());
  }

  Context context_;
  std::unique_ptr<Socket> router_;
  std::unique_ptr<Socket> dealer_;
  std::string endpoint_;
};

TEST_F(TransportTest, BindPortZeroReturnsTheConcretePort) {
  for (const std::string requested : {"tcp://127.0.0.1:0", "tcp://127.0.0.1:*"}) {
    auto pull = Make(SocketType::kPull);
    auto endpoint = pull->Bind(requested);
    ASSERT_TRUE(endpoint.ok()) << endpoint.status();
    const std::string prefix = "tcp://127.0.0.1:";
    ASSERT_EQ(endpoint->rfind(prefix, 0), 0u) << *endpoint;
    const std::string port = endpoint->substr(prefix.size());
    ASSERT_FALSE(port.empty());
    ASSERT_EQ(port.find_first_not_of("0123456789"), std::string::npos) << *endpoint;
    EXPECT_GT(std::stoi(port), 0);
    // The returned endpoint is the real one: a message sent there arrives.
    auto push = Make(SocketType::kPush);
    ASSERT_TRUE(push->Connect(*endpoint).ok());
    ASSERT_TRUE(push->Send(MakeMessage(Text("hello"))).ok());
    auto in = pull->Receive(std::chrono::seconds(10));
    ASSERT_TRUE(in.ok()) << in.status();
    ASSERT_EQ(in->size(), 1u);
    EXPECT_EQ(Str((*in)[0]), "hello");
  }
}

TEST_F(TransportTest, DealerRouterMultipartRoundTrip) {
  SocketOptions dealer_options;
  dealer_options.routing_id = "worker-7";
  MakePair({}, dealer_options);

  std::vector<float> floats(1000);
  std::iota(floats.begin(), floats.end(), 0.5f);
  auto float_owner = std::make_shared<std::vector<float>>(floats);
  const std::vector<std::byte> big = Pattern(5000, 1);  // > inline-copy size

  OutMessage out;
  out.push_back(Text("header"));
  out.push_back(
      Payload::Borrow(float_owner->data(), float_owner->size() * sizeof(float), float_owner));
  out.push_back(Payload::Copy(std::vector<std::byte>(big)));
  out.push_back(Payload::Copy(std::span<const std::byte>()));  // empty frame
  out.push_back(Text("tail"));
  float_owner.reset();
  ASSERT_TRUE(dealer_->Send(std::move(out)).ok());

  auto in = router_->Receive(std::chrono::seconds(10));
  ASSERT_TRUE(in.ok()) << in.status();
  ASSERT_EQ(in->size(), 6u);
  EXPECT_EQ(Str((*in)[0]), "worker-7");  // identity frame first
  EXPECT_EQ(Str((*in)[1]), "header");
  ASSERT_EQ((*in)[2].size(), floats.size() * sizeof(float));
  std::vector<float> got(floats.size());
  std::memcpy(got.data(), (*in)[2].data(), (*in)[2].size());
  EXPECT_EQ(got, floats);
  EXPECT_TRUE(SameBytes((*in)[3], big));
  EXPECT_EQ((*in)[4].size(), 0u);
  EXPECT_EQ((*in)[4].data(), nullptr);
  EXPECT_EQ(Str((*in)[5]), "tail");

  // Reply to that dealer through its identity.
  OutMessage reply;
  reply.push_back(Payload::Copy((*in)[0].bytes()));
  reply.push_back(Text("ack"));
  reply.push_back(Payload::Copy((*in)[3].bytes()));
  ASSERT_TRUE(router_->Send(std::move(reply), milliseconds(5000)).ok());
  auto back = dealer_->Receive(std::chrono::seconds(10));
  ASSERT_TRUE(back.ok()) << back.status();
  ASSERT_EQ(back->size(), 2u);  // a DEALER sees no identity frame
  EXPECT_EQ(Str((*back)[0]), "ack");
  EXPECT_TRUE(SameBytes((*back)[1], big));
}

TEST_F(TransportTest, InprocBorrowIsZeroCopyAndOwnerLivesUntilReceiverIsDone) {
  auto router = Make(SocketType::kRouter);
  SocketOptions dealer_options;
  dealer_options.routing_id = "d";
  auto dealer = Make(SocketType::kDealer, dealer_options);
  ASSERT_TRUE(router->Bind("inproc://zero-copy").ok());
  ASSERT_TRUE(dealer->Connect("inproc://zero-copy").ok());

  ReleaseCounter counter;
  auto [owner, data] = counter.Make(Pattern(100000, 2));
  const std::vector<std::byte> expected = Pattern(100000, 2);
  OutMessage out;
  out.push_back(Text("h"));
  out.push_back(Payload::Borrow(data, expected.size(), std::move(owner)));
  ASSERT_TRUE(dealer->Send(std::move(out)).ok());
  // The only remaining reference is inside ZeroMQ, and the message is still
  // queued in the pipe: the owner must not have been released.
  EXPECT_EQ(counter.releases.load(), 0);

  Frame kept;
  {
    auto in = router->Receive(std::chrono::seconds(10));
    ASSERT_TRUE(in.ok()) << in.status();
    ASSERT_EQ(in->size(), 3u);
    // Zero copy: the receiver reads the sender's very buffer.
    EXPECT_EQ((*in)[2].data(), data);
    EXPECT_TRUE(SameBytes((*in)[2], expected));
    kept = (*in)[2];
    EXPECT_EQ(counter.releases.load(), 0);
  }
  // The InMessage is gone; the copied Frame still keeps the bytes alive.
  EXPECT_EQ(counter.releases.load(), 0);
  EXPECT_TRUE(SameBytes(kept, expected));
  std::shared_ptr<const void> keep_alive = kept.owner();
  kept = Frame();
  EXPECT_EQ(counter.releases.load(), 0);  // owner() keeps it alive too
  keep_alive.reset();
  EXPECT_EQ(counter.releases.load(), 1);
}

TEST_F(TransportTest, TcpBorrowOwnerHeldWhileQueuedAndReleasedOnceAfterSend) {
  // Find a free port, then close the listener so that nobody is there.
  std::string endpoint;
  {
    auto probe = Make(SocketType::kRouter);
    auto bound = probe->Bind("tcp://127.0.0.1:0");
    ASSERT_TRUE(bound.ok()) << bound.status();
    endpoint = *bound;
  }
  auto dealer = Make(SocketType::kDealer);
  ASSERT_TRUE(dealer->Connect(endpoint).ok());

  ReleaseCounter counter;
  const std::vector<std::byte> expected = Pattern(3 << 20, 3);
  auto [owner, data] = counter.Make(expected);
  OutMessage out;
  out.push_back(Payload::Borrow(data, expected.size(), std::move(owner)));
  ASSERT_TRUE(dealer->Send(std::move(out)).ok());
  // No peer exists, so the message sits in the queue and the bytes are still
  // needed: not released (give ZeroMQ a moment to misbehave).
  std::this_thread::sleep_for(milliseconds(100));
  EXPECT_EQ(counter.releases.load(), 0);

  // Bring the peer up on that port (the closed listener may take a moment to
  // release it).
  auto router = Make(SocketType::kRouter);
  Status bound = UnavailableError("not tried");
  for (int attempt = 0; attempt < 200 && !bound.ok(); ++attempt) {
    auto r = router->Bind(endpoint);
    bound = r.ok() ? OkStatus() : r.status();
    if (!bound.ok()) std::this_thread::sleep_for(milliseconds(10));
  }
  ASSERT_TRUE(bound.ok()) << bound;
  auto in = router->Receive(std::chrono::seconds(10));
  ASSERT_TRUE(in.ok()) << in.status();
  ASSERT_EQ(in->size(), 2u);
  // Over tcp the receiver has its own copy; the sender's owner goes once the
  // bytes have been written.
  EXPECT_NE((*in)[1].data(), data);
  EXPECT_TRUE(SameBytes((*in)[1], expected));
  ASSERT_TRUE(counter.WaitFor(1));
  EXPECT_EQ(counter.releases.load(), 1);
}

TEST_F(TransportTest, OwnersReleasedExactlyOnceWhenSendFails) {
  SocketOptions router_options;
  router_options.router_mandatory = true;
  MakePair(router_options);
  ReleaseCounter counter;
  {
    auto [owner1, data1] = counter.Make(Pattern(4096, 4));
    auto [owner2, data2] = counter.Make(Pattern(64, 5));
    OutMessage out;
    out.push_back(Text("nobody-here"));
    out.push_back(Payload::Borrow(data1, 4096, std::move(owner1)));
    out.push_back(Payload::Borrow(data2, 64, std::move(owner2)));
    Status s = router_->Send(std::move(out), milliseconds(1000));
    EXPECT_EQ(s.code(), StatusCode::kUnavailable) << s;
    EXPECT_NE(s.message().find("nobody-here"), std::string::npos) << s;
  }
  // Nothing reached ZeroMQ's queues, so both were released synchronously.
  EXPECT_EQ(counter.releases.load(), 2);

  // A null non-empty payload is rejected before anything is sent.
  {
    auto [owner, data] = counter.Make(Pattern(16, 6));
    OutMessage out;
    out.push_back(Payload::Borrow(data, 16, std::move(owner)));
    out.push_back(Payload::Borrow(nullptr, 10, nullptr));
    Status s = dealer_->Send(std::move(out));
    EXPECT_EQ(s.code(), StatusCode::kInvalidArgument) << s;
  }
  EXPECT_EQ(counter.releases.load(), 3);
  EXPECT_EQ(dealer_->Send({}).code(), StatusCode::kInvalidArgument);
  // Nothing of the rejected message went out: the next message arrives alone.
  ASSERT_TRUE(dealer_->Send(MakeMessage(Text("next"))).ok());
  auto in = router_->Receive(std::chrono::seconds(10));
  ASSERT_TRUE(in.ok()) << in.status();
  ASSERT_EQ(in->size(), 2u);
  EXPECT_EQ(Str((*in)[1]), "next");
}

TEST_F(TransportTest, ReceivedFrameOutlivesMessageSocketAndLaterTraffic) {
  MakePair();
  const std::vector<std::byte> small_a = Pattern(100, 10);
  const std::vector<std::byte> large_a = Pattern(200000, 11);
  ASSERT_TRUE(dealer_->Send(MakeMessage(Payload::Copy(small_a), Payload::Copy(large_a))).ok());
  Frame small, large;
  {
    auto in = router_->Receive(std::chrono::seconds(10));
    ASSERT_TRUE(in.ok()) << in.status();
    ASSERT_EQ(in->size(), 3u);
    small = (*in)[1];
    large = (*in)[2];
  }
  // Same-sized messages with other contents reuse whatever buffers ZeroMQ
  // has; the held frames must not change.
  for (uint64_t seed = 20; seed < 30; ++seed) {
    ASSERT_TRUE(dealer_
                    ->Send(MakeMessage(Payload::Copy(Pattern(100, seed)),
                                       Payload::Copy(Pattern(200000, seed))))
                    .ok());
    auto in = router_->Receive(std::chrono::seconds(10));
    ASSERT_TRUE(in.ok()) << in.status();
    EXPECT_TRUE(SameBytes((*in)[2], Pattern(200000, seed)));
  }
  router_.reset();
  dealer_.reset();
  EXPECT_TRUE(SameBytes(small, small_a));
  EXPECT_TRUE(SameBytes(large, large_a));
}

TEST_F(TransportTest, SixtyFourMiBFrameArrivesIntactOverTcp) {
  MakePair();
  constexpr size_t kSize = size_t{64} << 20;
  auto owner = std::make_shared<std::vector<std::byte>>(Pattern(kSize, 42));
  const std::vector<std::byte>& expected = *owner;
  OutMessage out;
  out.push_back(Text("big"));
  out.push_back(Payload::Borrow(owner->data(), kSize, owner));
  ASSERT_TRUE(dealer_->Send(std::move(out)).ok());
  auto in = router_->Receive(std::chrono::seconds(60));
  ASSERT_TRUE(in.ok()) << in.status();
  ASSERT_EQ(in->size(), 3u);
  EXPECT_EQ(Str((*in)[1]), "big");
  ASSERT_EQ((*in)[2].size(), kSize);
  EXPECT_EQ(std::memcmp((*in)[2].data(), expected.data(), kSize), 0);
}

TEST_F(TransportTest, ReceivedTcpFramesAreEightByteAligned) {
  // The finding documented on Frame::AlignedFor: with this Context every
  // frame received over tcp is 8-byte aligned, whatever its size and its
  // position in the stream.
  MakePair();
  const std::vector<size_t> sizes = {1,   7,    13,   33,   34,    40,     100,
                                     999, 5000, 8191, 9000, 70000, 1 << 20};
  OutMessage out;
  out.push_back(Text("h"));  // odd-sized first frame shifts the rest on the wire
  for (size_t i = 0; i < sizes.size(); ++i) out.push_back(Payload::Copy(Pattern(sizes[i], i)));
  ASSERT_TRUE(dealer_->Send(std::move(out)).ok());
  auto in = router_->Receive(std::chrono::seconds(10));
  ASSERT_TRUE(in.ok()) << in.status();
  ASSERT_EQ(in->size(), sizes.size() + 2);
  for (size_t i = 0; i < sizes.size(); ++i) {
    const Frame& f = (*in)[i + 2];
    EXPECT_TRUE(SameBytes(f, Pattern(sizes[i], i))) << "size " << sizes[i];
    EXPECT_TRUE(f.AlignedFor(alignof(double)))
        << "size " << sizes[i] << " at " << reinterpret_cast<uintptr_t>(f.data()) % 64;
  }
}

TEST_F(TransportTest, AlignedForAndRealigned) {
  const std::vector<std::byte> bytes = Pattern(1000, 7);
  Frame aligned = Frame::FromBytes(bytes);
  EXPECT_TRUE(aligned.AlignedFor(64));
  EXPECT_TRUE(SameBytes(aligned, bytes));
  EXPECT_EQ(aligned.Realigned(64).data(), aligned.data());  // no copy needed
  EXPECT_TRUE(Frame().AlignedFor(64));
  EXPECT_EQ(Frame::FromBytes({}).size(), 0u);

  // A received frame: Realigned either returns it or a 64-aligned copy.
  MakePair();
  ASSERT_TRUE(dealer_->Send(MakeMessage(Payload::Copy(bytes))).ok());
  auto in = router_->Receive(std::chrono::seconds(10));
  ASSERT_TRUE(in.ok()) << in.status();
  const Frame& f = (*in)[1];
  const auto address = reinterpret_cast<uintptr_t>(f.data());
  for (size_t a : {1, 2, 4, 8, 16, 32, 64}) EXPECT_EQ(f.AlignedFor(a), address % a == 0) << a;
  Frame r = f.Realigned(64);
  EXPECT_TRUE(r.AlignedFor(64));
  EXPECT_TRUE(SameBytes(r, bytes));
  EXPECT_EQ(r.data() == f.data(), f.AlignedFor(64));
}

TEST_F(TransportTest, ReceiveTimeoutIsDeadlineExceeded) {
  MakePair();
  const auto start = std::chrono::steady_clock::now();
  auto in = router_->Receive(milliseconds(50));
  const auto waited = std::chrono::steady_clock::now() - start;
  EXPECT_EQ(in.status().code(), StatusCode::kDeadlineExceeded) << in.status();
  EXPECT_GE(waited, milliseconds(50));  // never gives up early
  EXPECT_EQ(router_->Receive(milliseconds(0)).status().code(), StatusCode::kDeadlineExceeded);
}

TEST_F(TransportTest, SendTimeoutIsDeadlineExceededAndReleasesOwner) {
  // A DEALER with no connection cannot accept a message.
  auto dealer = Make(SocketType::kDealer);
  ReleaseCounter counter;
  auto [owner, data] = counter.Make(Pattern(5000, 8));
  OutMessage out;
  out.push_back(Payload::Borrow(data, 5000, std::move(owner)));
  Status s = dealer->Send(std::move(out), milliseconds(20));
  EXPECT_EQ(s.code(), StatusCode::kDeadlineExceeded) << s;
  EXPECT_EQ(counter.releases.load(), 1);
}

TEST_F(TransportTest, BadEndpointsAreInvalidArgument) {
  auto socket = Make(SocketType::kRouter);
  for (const std::string endpoint : {"tcp://127.0.0.1", "nosuchtransport://x", "garbage"}) {
    auto bound = socket->Bind(endpoint);
    EXPECT_EQ(bound.status().code(), StatusCode::kInvalidArgument)
        << endpoint << ": " << bound.status();
    EXPECT_NE(bound.status().message().find(endpoint), std::string::npos) << bound.status();
    Status connected = socket->Connect(endpoint);
    EXPECT_EQ(connected.code(), StatusCode::kInvalidArgument) << endpoint << ": " << connected;
    EXPECT_NE(connected.message().find(endpoint), std::string::npos) << connected;
  }
  EXPECT_EQ(socket->Disconnect("tcp://127.0.0.1:1").code(), StatusCode::kNotFound);
}

TEST_F(TransportTest, BindToPortInUseIsUnavailable) {
  auto first = Make(SocketType::kRouter);
  auto second = Make(SocketType::kRouter);
  auto endpoint = first->Bind("tcp://127.0.0.1:0");
  ASSERT_TRUE(endpoint.ok()) << endpoint.status();
  auto again = second->Bind(*endpoint);
  EXPECT_EQ(again.status().code(), StatusCode::kUnavailable) << again.status();
  EXPECT_NE(again.status().message().find(*endpoint), std::string::npos) << again.status();
}

TEST_F(TransportTest, OptionsOutOfRangeAreInvalidArgument) {
  SocketOptions mandatory;
  mandatory.router_mandatory = true;
  EXPECT_EQ(Socket::Create(context_, SocketType::kDealer, mandatory).status().code(),
            StatusCode::kInvalidArgument);
  SocketOptions long_id;
  long_id.routing_id = std::string(300, 'x');
  EXPECT_EQ(Socket::Create(context_, SocketType::kDealer, long_id).status().code(),
            StatusCode::kInvalidArgument);
  SocketOptions negative_hwm;
  negative_hwm.send_hwm = -5;
  EXPECT_EQ(Socket::Create(context_, SocketType::kDealer, negative_hwm).status().code(),
            StatusCode::kInvalidArgument);
}

TEST_F(TransportTest, MaxMessageSizeDropsOversizedMessages) {
  SocketOptions router_options;
  router_options.max_message_bytes = 1024;
  MakePair(router_options);
  ASSERT_TRUE(dealer_->Send(MakeMessage(Text("h"), Payload::Copy(Pattern(4096, 9)))).ok());
  auto in = router_->Receive(milliseconds(300));
  EXPECT_EQ(in.status().code(), StatusCode::kDeadlineExceeded) << in.status();
}

TEST_F(TransportTest, PollReadableReportsTheReadySockets) {
  MakePair();
  auto router2 = Make(SocketType::kRouter);
  auto dealer2 = Make(SocketType::kDealer);
  auto endpoint2 = router2->Bind("tcp://127.0.0.1:0");
  ASSERT_TRUE(endpoint2.ok());
  ASSERT_TRUE(dealer2->Connect(*endpoint2).ok());
  std::vector<Socket*> sockets = {router_.get(), router2.get()};

  auto none = PollReadable(sockets, milliseconds(20));
  ASSERT_TRUE(none.ok()) << none.status();
  EXPECT_TRUE(none->empty());

  ASSERT_TRUE(dealer2->Send(MakeMessage(Text("to-2"))).ok());
  auto ready = PollReadable(sockets, std::chrono::seconds(10));
  ASSERT_TRUE(ready.ok()) << ready.status();
  EXPECT_EQ(*ready, std::vector<size_t>{1});
  auto in = router2->Receive(milliseconds(0));  // readable: no wait needed
  ASSERT_TRUE(in.ok()) << in.status();
  EXPECT_EQ(Str((*in)[1]), "to-2");

  EXPECT_EQ(PollReadable({}, milliseconds(0)).status().code(), StatusCode::kInvalidArgument);
}

TEST(TransportContextTest, ShutdownCancelsABlockedReceive) {
  Context context;
  auto socket = Socket::Create(context, SocketType::kPull);
  ASSERT_TRUE(socket.ok()) << socket.status();
  ASSERT_TRUE((*socket)->Bind("inproc://shutdown").ok());
  Status result;
  std::thread receiver([&] { result = (*socket)->Receive().status(); });
  std::this_thread::sleep_for(milliseconds(50));  // let it block (not required)
  context.Shutdown();
  receiver.join();
  EXPECT_EQ(result.code(), StatusCode::kCancelled) << result;
  EXPECT_EQ(Socket::Create(context, SocketType::kPull).status().code(), StatusCode::kCancelled);
  socket->reset();  // sockets must be closed before ~Context
}

}  // namespace
}  // namespace distval::transport
