// Tests of the endpoint rendezvous (distval/rendezvous.h): publish and wait
// (also with servers that publish late, from other threads), the deadline
// message, progress reports, and advertised endpoints.
#include "distval/rendezvous.h"

#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>
#include <thread>

namespace distval {
namespace {

class RendezvousTest : public ::testing::Test {
 protected:
  void SetUp() override {
    char tmpl[] = "/tmp/distval-rendezvous-test-XXXXXX";
    ASSERT_NE(mkdtemp(tmpl), nullptr);
    dir_ = tmpl;
  }
  void TearDown() override { std::filesystem::remove_all(dir_); }
  std::string dir_;
};

TEST_F(RendezvousTest, PublishThenWait) {
  const std::string rdv = dir_ + "/job/7";  // created on publish
  ASSERT_TRUE(PublishEndpoint(rdv, 1, "tcp://10.0.0.2:4000").ok());
  ASSERT_TRUE(PublishEndpoint(rdv, 0, "tcp://10.0.0.1:4000").ok());
  auto e = WaitForEndpoints(rdv, 2, std::chrono::seconds(5));
  ASSERT_TRUE(e.ok()) << e.status();
  EXPECT_EQ(*e, (std::vector<std::string>{"tcp://10.0.0.1:4000", "tcp://10.0.0.2:4000"}));
  // Only the final files remain (no temporaries).
  int files = 0;
  for (const auto& entry : std::filesystem::directory_iterator(rdv)) {
    ++files;
    EXPECT_EQ(entry.path().extension(), ".endpoint") << entry.path();
  }
  EXPECT_EQ(files, 2);
}

TEST_F(RendezvousTest, WaitsForLateServersAndReportsProgress) {
  std::thread late([&] {
    std::this_thread::sleep_for(std::chrono::milliseconds(300));
    ASSERT_TRUE(PublishEndpoint(dir_, 0, "tcp://a:1").ok());
    std::this_thread::sleep_for(std::chrono::milliseconds(300));
    ASSERT_TRUE(PublishEndpoint(dir_, 1, "tcp://b:2").ok());
  });
  std::vector<std::vector<int>> reports;
  auto e = WaitForEndpoints(
      dir_, 2, std::chrono::seconds(20),
      [&](const std::vector<int>& missing, std::chrono::seconds) { reports.push_back(missing); },
      std::chrono::milliseconds(100));
  late.join();
  ASSERT_TRUE(e.ok()) << e.status();
  EXPECT_EQ((*e)[1], "tcp://b:2");
  ASSERT_FALSE(reports.empty());
  EXPECT_EQ(reports.front(), (std::vector<int>{0, 1}));
  EXPECT_EQ(reports.back(), (std::vector<int>{1}));
}

TEST_F(RendezvousTest, DeadlineNamesTheMissingServers) {
  ASSERT_TRUE(PublishEndpoint(dir_, 0, "tcp://a:1").ok());
  auto e = WaitForEndpoints(dir_, 3, std::chrono::milliseconds(200));
  EXPECT_EQ(e.status().code(), StatusCode::kDeadlineExceeded);
  EXPECT_NE(e.status().message().find("2 of 3"), std::string::npos) << e.status();
  EXPECT_NE(e.status().message().find(RendezvousPath(dir_, 1)), std::string::npos);
  EXPECT_NE(e.status().message().find(RendezvousPath(dir_, 2)), std::string::npos);
  EXPECT_EQ(e.status().message().find(RendezvousPath(dir_, 0)), std::string::npos);
}

TEST_F(RendezvousTest, EmptyFileAndBadArguments) {
  std::ofstream(RendezvousPath(dir_, 0)) << "\n";
  EXPECT_EQ(WaitForEndpoints(dir_, 1, std::chrono::seconds(1)).status().code(),
            StatusCode::kInvalidArgument);
  EXPECT_EQ(WaitForEndpoints(dir_, 0, std::chrono::seconds(1)).status().code(),
            StatusCode::kInvalidArgument);
  EXPECT_FALSE(PublishEndpoint("", 0, "tcp://a:1").ok());
  std::ofstream(dir_ + "/file") << "x";
  EXPECT_EQ(PublishEndpoint(dir_ + "/file/sub", 0, "tcp://a:1").code(), StatusCode::kUnavailable);
}

TEST(AdvertisedEndpointTest, ReplacesWildcards) {
  EXPECT_EQ(*AdvertisedEndpoint("tcp://0.0.0.0:5555", "node07"), "tcp://node07:5555");
  EXPECT_EQ(*AdvertisedEndpoint("tcp://*:5555", "10.1.2.3"), "tcp://10.1.2.3:5555");
  EXPECT_EQ(*AdvertisedEndpoint("tcp://[::]:5555", "fe80::1"), "tcp://[fe80::1]:5555");
  EXPECT_EQ(*AdvertisedEndpoint("tcp://10.0.0.1:5555", "other"), "tcp://10.0.0.1:5555");
  EXPECT_EQ(*AdvertisedEndpoint("ipc:///tmp/x", "h"), "ipc:///tmp/x");
  EXPECT_EQ(AdvertisedEndpoint("tcp://0.0.0.0:1", "").status().code(),
            StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace distval
