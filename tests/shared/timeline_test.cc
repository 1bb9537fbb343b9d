// Tests of the Chrome trace writer (distval/timeline.h): the file is valid
// JSON in the trace-event object format, with named tracks, spans at the
// right times, escaped names, and spans recorded from several threads.
#include "distval/timeline.h"

#include <gtest/gtest.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <thread>
#include <vector>

namespace distval {
namespace {

using nlohmann::json;

class TimelineTest : public ::testing::Test {
 protected:
  void SetUp() override {
    char tmpl[] = "/tmp/distval-timeline-test-XXXXXX";
    ASSERT_NE(mkdtemp(tmpl), nullptr);
    dir_ = tmpl;
  }
  void TearDown() override { std::filesystem::remove_all(dir_); }
  json Load(const std::string& path) {
    std::ifstream f(path);
    return json::parse(f);
  }
  std::string dir_;
};

TEST_F(TimelineTest, WritesTracksAndSpans) {
  const std::string path = dir_ + "/t.json";
  auto t = Timeline::Open(path, "worker \"0\"");
  ASSERT_TRUE(t.ok()) << t.status();
  const int a = (*t)->AddTrack("replica 0", 5);
  const int b = (*t)->AddTrack("ps 1", 7);
  EXPECT_NE(a, b);
  const auto t0 = Timeline::Clock::now();
  (*t)->Span(a, "compute", t0, t0 + std::chrono::microseconds(1500), {{"step", 3}});
  (*t)->Span(b, "push", t0 + std::chrono::microseconds(100), t0 + std::chrono::microseconds(50),
             {{"step", 3}, {"shard", 1}});  // ends before it begins: duration 0
  ASSERT_TRUE((*t)->Close().ok());
  ASSERT_TRUE((*t)->Close().ok());  // again: same result

  json doc = Load(path);
  ASSERT_TRUE(doc.contains("traceEvents"));
  EXPECT_EQ(doc["displayTimeUnit"], "ms");
  std::map<int, std::string> tracks;
  std::map<int, int> sort;
  std::vector<json> spans;
  std::string process;
  for (const json& e : doc["traceEvents"]) {
    EXPECT_EQ(e["pid"], static_cast<int>(getpid()));
    if (e["ph"] == "M" && e["name"] == "process_name") process = e["args"]["name"];
    if (e["ph"] == "M" && e["name"] == "thread_name") tracks[e["tid"]] = e["args"]["name"];
    if (e["ph"] == "M" && e["name"] == "thread_sort_index")
      sort[e["tid"]] = e["args"]["sort_index"];
    if (e["ph"] == "X") spans.push_back(e);
  }
  EXPECT_EQ(process, "worker \"0\"");
  EXPECT_EQ(tracks[a], "replica 0");
  EXPECT_EQ(tracks[b], "ps 1");
  EXPECT_EQ(sort[a], 5);
  ASSERT_EQ(spans.size(), 2u);
  EXPECT_EQ(spans[0]["name"], "compute");
  EXPECT_EQ(spans[0]["tid"], a);
  EXPECT_EQ(spans[0]["dur"], 1500);
  EXPECT_EQ(spans[0]["args"]["step"], 3);
  EXPECT_EQ(spans[1]["dur"], 0);
  EXPECT_EQ(spans[1]["ts"].get<int64_t>() - spans[0]["ts"].get<int64_t>(), 100);
  EXPECT_EQ(spans[1]["args"]["shard"], 1);
  // Timestamps are wall-clock microseconds (so that processes line up).
  const int64_t now_us = std::chrono::duration_cast<std::chrono::microseconds>(
                             std::chrono::system_clock::now().time_since_epoch())
                             .count();
  EXPECT_NEAR(static_cast<double>(spans[0]["ts"].get<int64_t>()), static_cast<double>(now_us),
              60e6);
}

TEST_F(TimelineTest, ManyThreadsManySpans) {
  const std::string path = dir_ + "/many.json";
  {
    auto t = Timeline::Open(path, "p");
    ASSERT_TRUE(t.ok());
    Timeline* tl = t->get();
    std::vector<std::thread> threads;
    for (int r = 0; r < 4; ++r) {
      threads.emplace_back([tl, r] {
        const int track = tl->AddTrack("replica " + std::to_string(r), r);
        for (int i = 0; i < 5000; ++i) {
          const auto b = Timeline::Clock::now();
          tl->Span(track, "step", b, b + std::chrono::microseconds(1), {{"step", i}});
        }
      });
    }
    for (auto& th : threads) th.join();
    // Closed by the destructor.
  }
  json doc = Load(path);
  std::map<int, int> per_track;
  for (const json& e : doc["traceEvents"])
    if (e["ph"] == "X") per_track[e["tid"]] += 1;
  ASSERT_EQ(per_track.size(), 4u);
  for (const auto& [tid, n] : per_track) EXPECT_EQ(n, 5000) << "track " << tid;
}

TEST_F(TimelineTest, UnwritablePath) {
  auto t = Timeline::Open(dir_ + "/no/such/dir/t.json", "p");
  EXPECT_EQ(t.status().code(), StatusCode::kNotFound);
  EXPECT_NE(t.status().message().find("no/such/dir"), std::string::npos);
}

}  // namespace
}  // namespace distval
