// Tests of the metrics HTTP endpoint (distval/http_endpoint.h) over real
// TCP connections on 127.0.0.1.
#include "distval/http_endpoint.h"

#include <gtest/gtest.h>

#include <atomic>
#include <thread>
#include <vector>

#include "http_get.h"
#include "prometheus_text.h"

namespace distval {
namespace {

using testing::HttpRequest;
using testing::HttpResponse;
using testing::ParsePrometheusText;

HttpEndpointOptions Loopback() {
  HttpEndpointOptions o;
  o.address = "127.0.0.1";
  o.port = 0;
  return o;
}

TEST(HttpEndpointTest, ServesMetricsThatMove) {
  MetricRegistry registry;
  Counter* steps = *registry.AddCounter("steps_total", "Steps.");
  auto http = HttpEndpoint::Start(Loopback(), &registry);
  ASSERT_TRUE(http.ok()) << http.status();
  const int port = (*http)->port();
  ASSERT_GT(port, 0);

  steps->Increment(5);
  HttpResponse a = HttpRequest(port, "/metrics");
  ASSERT_EQ(a.status, 200) << a.headers;
  EXPECT_NE(a.headers.find("text/plain; version=0.0.4"), std::string::npos) << a.headers;
  auto pa = ParsePrometheusText(a.body);
  ASSERT_TRUE(pa.error.empty()) << pa.error;
  EXPECT_EQ(pa.Value("steps_total"), 5.0);

  steps->Increment(2);
  auto pb = ParsePrometheusText(HttpRequest(port, "/metrics?x=1").body);
  ASSERT_TRUE(pb.error.empty()) << pb.error;
  EXPECT_EQ(pb.Value("steps_total"), 7.0);
}

TEST(HttpEndpointTest, HealthAndErrors) {
  MetricRegistry registry;
  std::atomic<bool> healthy{true};
  auto http = HttpEndpoint::Start(Loopback(), &registry, [&]() -> std::string {
    return healthy.load() ? "" : "the request loop is stuck";
  });
  ASSERT_TRUE(http.ok()) << http.status();
  const int port = (*http)->port();
  HttpResponse ok = HttpRequest(port, "/healthz");
  EXPECT_EQ(ok.status, 200);
  EXPECT_EQ(ok.body, "ok\n");
  healthy.store(false);
  HttpResponse bad = HttpRequest(port, "/healthz");
  EXPECT_EQ(bad.status, 503);
  EXPECT_NE(bad.body.find("stuck"), std::string::npos);
  EXPECT_EQ(HttpRequest(port, "/nothing").status, 404);
  EXPECT_EQ(HttpRequest(port, "/metrics", "POST").status, 405);
  HttpResponse head = HttpRequest(port, "/metrics", "HEAD");
  EXPECT_EQ(head.status, 200);
  EXPECT_TRUE(head.body.empty());
}

TEST(HttpEndpointTest, ConcurrentScrapes) {
  MetricRegistry registry;
  Histogram* h = *registry.AddHistogram("lat_seconds", "Latency.", {0.1, 1});
  auto http = HttpEndpoint::Start(Loopback(), &registry);
  ASSERT_TRUE(http.ok()) << http.status();
  const int port = (*http)->port();
  std::atomic<bool> stop{false};
  std::thread writer([&] {
    while (!stop.load()) h->Observe(0.5);
  });
  std::vector<std::thread> readers;
  std::atomic<int> good{0};
  for (int t = 0; t < 4; ++t) {
    readers.emplace_back([&] {
      for (int i = 0; i < 10; ++i) {
        HttpResponse r = HttpRequest(port, "/metrics");
        if (r.status == 200 && ParsePrometheusText(r.body).error.empty()) good.fetch_add(1);
      }
    });
  }
  for (auto& t : readers) t.join();
  stop.store(true);
  writer.join();
  EXPECT_EQ(good.load(), 40);
}

TEST(HttpEndpointTest, BadOptions) {
  MetricRegistry registry;
  HttpEndpointOptions o = Loopback();
  o.address = "not-an-ip";
  EXPECT_EQ(HttpEndpoint::Start(o, &registry).status().code(), StatusCode::kInvalidArgument);
  o = Loopback();
  o.port = 70000;
  EXPECT_EQ(HttpEndpoint::Start(o, &registry).status().code(), StatusCode::kInvalidArgument);
  // A port in use: Unavailable naming it.
  auto first = HttpEndpoint::Start(Loopback(), &registry);
  ASSERT_TRUE(first.ok());
  o = Loopback();
  o.port = (*first)->port();
  auto second = HttpEndpoint::Start(o, &registry);
  EXPECT_EQ(second.status().code(), StatusCode::kUnavailable);
  EXPECT_NE(second.status().message().find(std::to_string(o.port)), std::string::npos);
  EXPECT_EQ(HttpEndpoint::Start(Loopback(), nullptr).status().code(), StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace distval
