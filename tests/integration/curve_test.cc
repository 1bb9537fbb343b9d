// CURVE with real processes on 127.0.0.1: distval-keygen writes a usable
// pair; distval-ps --curve-secret --authorized-keys admits an authorized
// client (push/pull, distval-ctl, a distval-worker training run) and refuses
// a client with an unlisted key and a plain client (neither gets a reply,
// and both refusals are logged, the key's with its Z85 text).
#include <gtest/gtest.h>
#include <sys/stat.h>
#include <unistd.h>

#include <chrono>
#include <filesystem>
#include <string>
#include <vector>

#include "child_process.h"
#include "distval/client.h"
#include "distval/curve_keys.h"
#include "distval/dataset.h"
#include "distval/protocol.h"
#include "distval/transport.h"
#include "local_cluster.h"

namespace distval {
namespace {

namespace fs = std::filesystem;
using testing::ChildProcess;
using testing::LocalCluster;
using testing::LocalClusterOptions;
using testing::ProcessResult;

class CurveTest : public ::testing::Test {
 protected:
  void SetUp() override {
    keygen_ = testing::BinaryFromEnv("DISTVAL_KEYGEN_BIN");
    ASSERT_FALSE(keygen_.empty()) << "DISTVAL_KEYGEN_BIN is not set";
    ASSERT_FALSE(dir_.path().empty()) << "cannot make a temporary directory";
  }
  std::string Path(const std::string& name) const { return dir_.Path(name); }

  // distval-keygen NAME; the pair as read back.
  CurveKeyPair Keygen(const std::string& name) {
    ProcessResult r = testing::RunProcess({keygen_, Path(name)}, Path(name + ".log"), 20);
    EXPECT_EQ(r.exit_code, 0) << r.output;
    auto pair = ReadCurveSecretKeyFile(Path(name + ".key_secret"));
    EXPECT_TRUE(pair.ok()) << pair.status();
    return pair.ok() ? *pair : CurveKeyPair{};
  }

  ClientOptions Options(const LocalCluster& c, std::chrono::milliseconds connect_timeout) {
    ClientOptions o;
    o.ps_endpoints = c.endpoints();
    o.connect_timeout = connect_timeout;
    o.request_timeout = std::chrono::milliseconds(10000);
    o.heartbeat_interval = std::chrono::milliseconds(200);
    return o;
  }

  std::string keygen_;
  testing::TempDir dir_{"distval-curve-test"};
};

TEST_F(CurveTest, KeygenWritesAPairWithAPrivateSecretAndRefusesToOverwrite) {
  CurveKeyPair pair = Keygen("alice");
  ASSERT_TRUE(IsCurveKeyZ85(pair.public_key));
  ASSERT_TRUE(IsCurveKeyZ85(pair.secret_key));
  struct stat st {};
  ASSERT_EQ(::stat(Path("alice.key_secret").c_str(), &st), 0);
  EXPECT_EQ(st.st_mode & 0777, 0600u);
  auto pub = ReadCurvePublicKeyFile(Path("alice.key"));
  ASSERT_TRUE(pub.ok()) << pub.status();
  EXPECT_EQ(*pub, pair.public_key);
  // The public file holds no secret.
  EXPECT_EQ(testing::ReadFile(Path("alice.key")).find(pair.secret_key), std::string::npos);
  // A second pair is different, and an existing pair is never replaced.
  EXPECT_NE(Keygen("bob").public_key, pair.public_key);
  ProcessResult again = testing::RunProcess({keygen_, Path("alice")}, Path("again.log"), 20);
  EXPECT_EQ(again.exit_code, 1);
  EXPECT_NE(again.output.find("already exists"), std::string::npos) << again.output;
  EXPECT_EQ(ReadCurveSecretKeyFile(Path("alice.key_secret"))->secret_key, pair.secret_key);
  // A secret readable by others is refused.
  ASSERT_EQ(::chmod(Path("alice.key_secret").c_str(), 0644), 0);
  EXPECT_EQ(ReadCurveSecretKeyFile(Path("alice.key_secret")).status().code(),
            StatusCode::kPermissionDenied);
}

TEST_F(CurveTest, CurveAndSharedMemoryExcludeEachOther) {
  CurveKeyPair server = Keygen("server");
  transport::Context context;
  transport::SocketOptions so;
  so.curve_server = true;
  so.curve_secret_key = server.secret_key;
  so.shared_memory = true;
  auto socket = transport::Socket::Create(context, transport::SocketType::kRouter, so);
  EXPECT_EQ(socket.status().code(), StatusCode::kInvalidArgument);
  so.shared_memory = false;
  so.curve_secret_key = "too short";
  socket = transport::Socket::Create(context, transport::SocketType::kRouter, so);
  EXPECT_EQ(socket.status().code(), StatusCode::kInvalidArgument);
}

TEST_F(CurveTest, OnlyAuthorizedKeysArePushedAndPulled) {
  const CurveKeyPair server = Keygen("server");
  const CurveKeyPair alice = Keygen("alice");
  const CurveKeyPair mallory = Keygen("mallory");
  fs::create_directory(Path("authorized"));
  fs::copy_file(Path("alice.key"), Path("authorized/alice.key"));

  LocalClusterOptions co;
  co.extra_args = {"--curve-secret", Path("server.key_secret"), "--authorized-keys",
                   Path("authorized")};
  auto cluster = LocalCluster::Start(co);
  ASSERT_TRUE(cluster.ok()) << cluster.status();
  const auto kShort = std::chrono::milliseconds(1500);

  // An unlisted key: the handshake is refused, no hello is ever answered.
  ClientOptions bad = Options(*cluster, kShort);
  bad.curve_public_key = mallory.public_key;
  bad.curve_secret_key = mallory.secret_key;
  bad.curve_server_key = server.public_key;
  auto refused = Client::Connect(bad);
  ASSERT_FALSE(refused.ok());
  EXPECT_EQ(refused.status().code(), StatusCode::kUnavailable) << refused.status();

  // A plain client: no CURVE handshake, no reply either.
  auto plain = Client::Connect(Options(*cluster, kShort));
  ASSERT_FALSE(plain.ok());
  EXPECT_EQ(plain.status().code(), StatusCode::kUnavailable) << plain.status();

  // The server logged the refused key (its Z85 text) and the plain client.
  const std::string log = testing::ReadFile(cluster->LogPath(0));
  EXPECT_NE(log.find("CURVE key " + mallory.public_key + " is not authorized"), std::string::npos)
      << log;
  EXPECT_NE(log.find("not a CURVE client (security mechanism mismatch)"), std::string::npos) << log;
  EXPECT_NE(log.find("curve=on (1 authorized keys, shared memory off)"), std::string::npos) << log;

  // The authorized key: variables, pushes and pulls work.
  ClientOptions good = Options(*cluster, std::chrono::milliseconds(10000));
  good.curve_public_key = alice.public_key;
  good.curve_secret_key = alice.secret_key;
  good.curve_server_key = server.public_key;
  auto client = Client::Connect(good);
  ASSERT_TRUE(client.ok()) << client.status();
  VariableOptions vo;
  vo.initializer = {0, protocol::InitZeros{}};
  vo.optimizer.kind = protocol::OptimizerKind::kSgd;
  vo.optimizer.learning_rate = 0.5;
  ASSERT_TRUE((*client)->CreateVariable("w", DType::kF32, Shape({256, 4}), vo).ok());
  std::vector<float> grad(1024);
  for (size_t i = 0; i < grad.size(); ++i) grad[i] = static_cast<float>(i % 7);
  for (int step = 0; step < 3; ++step)
    ASSERT_TRUE((*client)->Push({{"w", grad}}, true).Wait().ok());
  std::vector<float> w(1024, -1.0f);
  ASSERT_TRUE((*client)->Pull({{"w", w}}).Wait().ok());
  for (size_t i = 0; i < w.size(); ++i) ASSERT_FLOAT_EQ(w[i], -1.5f * grad[i]) << "at " << i;
  (*client).reset();

  // distval-ctl with the same flags as the worker.
  const std::string ctl = testing::BinaryFromEnv("DISTVAL_CTL_BIN");
  ASSERT_FALSE(ctl.empty());
  ProcessResult status = testing::RunProcess(
      {ctl, "--ps", cluster->endpoints()[0], "--curve-secret", Path("alice.key_secret"),
       "--server-key", Path("server.key"), "--timeout", "10", "status"},
      Path("ctl.log"), 20);
  EXPECT_EQ(status.exit_code, 0) << status.output;
  EXPECT_NE(status.output.find("variables: 1"), std::string::npos) << status.output;
  // The authorized key was never refused.
  const std::string after = testing::ReadFile(cluster->LogPath(0));
  EXPECT_EQ(after.find(alice.public_key), std::string::npos) << after;
}

TEST_F(CurveTest, AnAuthorizedWorkerTrains) {
  const std::string worker = testing::BinaryFromEnv("DISTVAL_WORKER_BIN");
  ASSERT_FALSE(worker.empty());
  if (!fs::exists(std::string(kDefaultFashionMnistDir)))
    GTEST_SKIP() << "Fashion-MNIST not installed";
  Keygen("server");
  Keygen("w0");
  fs::create_directory(Path("authorized"));
  fs::copy_file(Path("w0.key"), Path("authorized/w0.key"));
  LocalClusterOptions co;
  co.extra_args = {"--curve-secret", Path("server.key_secret"), "--authorized-keys",
                   Path("authorized")};
  auto cluster = LocalCluster::Start(co);
  ASSERT_TRUE(cluster.ok()) << cluster.status();
  ProcessResult r =
      testing::RunProcess({worker, "--ps", cluster->endpoints()[0], "--train-limit", "640",
                           "--global-batch", "64", "--curve-secret", Path("w0.key_secret"),
                           "--server-key", Path("server.key"), "--summary-json", Path("w0.json")},
                          Path("w0.log"), 60);
  EXPECT_EQ(r.exit_code, 0) << r.output;
  EXPECT_TRUE(fs::exists(Path("w0.json"))) << r.output;
  // Only --server-key without --curve-secret is a usage error.
  ProcessResult half = testing::RunProcess(
      {worker, "--ps", cluster->endpoints()[0], "--server-key", Path("server.key")},
      Path("half.log"), 20);
  EXPECT_NE(half.exit_code, 0);
  EXPECT_NE(half.output.find("--curve-secret and --server-key go together"), std::string::npos)
      << half.output;
}

}  // namespace
}  // namespace distval
