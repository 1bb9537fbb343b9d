// Tests of the metric registry (distval/metrics.h): values, histograms,
// the exposition text (checked with a strict parser), registration errors,
// and concurrent updates while rendering.
#include "distval/metrics.h"

#include <gtest/gtest.h>

#include <cmath>
#include <thread>
#include <vector>

#include "prometheus_text.h"

namespace distval {
namespace {

using testing::ParsePrometheusText;
using testing::PromText;

TEST(MetricsTest, CounterGaugeValues) {
  MetricRegistry r;
  auto c = r.AddCounter("x_total", "A counter.");
  ASSERT_TRUE(c.ok()) << c.status();
  (*c)->Increment();
  (*c)->Increment(2.5);
  (*c)->Increment(-4);  // ignored: counters never go down
  EXPECT_DOUBLE_EQ((*c)->value(), 3.5);
  auto g = r.AddGauge("y", "A gauge.");
  ASSERT_TRUE(g.ok());
  (*g)->Set(7);
  (*g)->Add(-9.5);
  EXPECT_DOUBLE_EQ((*g)->value(), -2.5);
}

TEST(MetricsTest, SameNameAndLabelsIsTheSameMetric) {
  MetricRegistry r;
  auto a = r.AddCounter("req_total", "Requests.", {{"type", "pull"}});
  auto b = r.AddCounter("req_total", "Requests.", {{"type", "pull"}});
  auto c = r.AddCounter("req_total", "Requests.", {{"type", "push"}});
  ASSERT_TRUE(a.ok() && b.ok() && c.ok());
  EXPECT_EQ(*a, *b);
  EXPECT_NE(*a, *c);
}

TEST(MetricsTest, RegistrationErrors) {
  MetricRegistry r;
  EXPECT_EQ(r.AddCounter("1bad", "x").status().code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(r.AddCounter("bad-name", "x").status().code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(r.AddCounter("ok", "x", {{"__reserved", "v"}}).status().code(),
            StatusCode::kInvalidArgument);
  EXPECT_EQ(r.AddCounter("ok", "x", {{"a", "1"}, {"a", "2"}}).status().code(),
            StatusCode::kInvalidArgument);
  ASSERT_TRUE(r.AddCounter("m", "help").ok());
  auto clash = r.AddGauge("m", "help");
  EXPECT_EQ(clash.status().code(), StatusCode::kInvalidArgument);
  EXPECT_NE(clash.status().message().find("'m'"), std::string::npos);
  EXPECT_EQ(r.AddCounter("m", "other help").status().code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(r.AddHistogram("h", "x", {}).status().code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(r.AddHistogram("h", "x", {1, 1}).status().code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(r.AddHistogram("h", "x", {1, 2}, {{"le", "3"}}).status().code(),
            StatusCode::kInvalidArgument);
  ASSERT_TRUE(r.AddHistogram("h", "x", {1, 2}).ok());
  EXPECT_EQ(r.AddHistogram("h", "x", {1, 3}).status().code(), StatusCode::kInvalidArgument);
}

TEST(MetricsTest, HistogramBucketsAreLessOrEqual) {
  Histogram h({1, 2, 4});
  for (double v : {0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 5.0, 100.0}) h.Observe(v);
  Histogram::Snapshot s = h.Read();
  ASSERT_EQ(s.cumulative.size(), 4u);
  EXPECT_EQ(s.cumulative[0], 2u);  // 0.5, 1
  EXPECT_EQ(s.cumulative[1], 4u);  // + 1.5, 2
  EXPECT_EQ(s.cumulative[2], 6u);  // + 3, 4
  EXPECT_EQ(s.cumulative[3], 8u);  // + 5, 100
  EXPECT_EQ(s.count, 8u);
  EXPECT_DOUBLE_EQ(s.sum, 117.0);
}

TEST(MetricsTest, BucketHelpers) {
  auto e = ExponentialBuckets(0.001, 10, 4);
  ASSERT_TRUE(e.ok());
  ASSERT_EQ(e->size(), 4u);
  EXPECT_DOUBLE_EQ((*e)[3], 1.0);
  auto l = LinearBuckets(0, 5, 3);
  ASSERT_TRUE(l.ok());
  EXPECT_EQ(*l, (std::vector<double>{0, 5, 10}));
  EXPECT_FALSE(ExponentialBuckets(0, 2, 3).ok());
  EXPECT_FALSE(ExponentialBuckets(1, 1, 3).ok());
  EXPECT_FALSE(LinearBuckets(0, 0, 3).ok());
}

TEST(MetricsTest, FormatValue) {
  EXPECT_EQ(FormatMetricValue(42), "42");
  EXPECT_EQ(FormatMetricValue(-3), "-3");
  EXPECT_EQ(FormatMetricValue(0.25), "0.25");
  EXPECT_EQ(FormatMetricValue(INFINITY), "+Inf");
  EXPECT_EQ(FormatMetricValue(-INFINITY), "-Inf");
  EXPECT_EQ(FormatMetricValue(NAN), "NaN");
  EXPECT_EQ(std::stod(FormatMetricValue(1e-7)), 1e-7);
  EXPECT_EQ(std::stod(FormatMetricValue(1.0 / 3)), 1.0 / 3);  // shortest exact form
}

TEST(MetricsTest, RenderIsValidExpositionText) {
  MetricRegistry r;
  auto pulls = r.AddCounter("dv_requests_total", "Requests, by type.", {{"type", "pull"}});
  auto pushes = r.AddCounter("dv_requests_total", "Requests, by type.", {{"type", "push"}});
  auto weird = r.AddGauge("dv_weird", "Help with a \\ backslash\nand a newline.",
                          {{"path", "C:\\dir \"quoted\"\nline"}});
  auto lat = r.AddHistogram("dv_latency_seconds", "Latency.", {0.001, 0.01, 0.1}, {{"op", "x"}});
  ASSERT_TRUE(pulls.ok() && pushes.ok() && weird.ok() && lat.ok());
  (*pulls)->Increment(3);
  (*pushes)->Increment(1);
  (*weird)->Set(-1.5);
  for (double v : {0.0005, 0.005, 0.05, 0.5}) (*lat)->Observe(v);

  const std::string text = r.Render();
  PromText p = ParsePrometheusText(text);
  ASSERT_TRUE(p.error.empty()) << p.error << "\n" << text;
  ASSERT_EQ(p.families.size(), 3u);
  EXPECT_EQ(p.families["dv_requests_total"].type, "counter");
  EXPECT_EQ(p.families["dv_requests_total"].help, "Requests, by type.");
  EXPECT_EQ(p.families["dv_weird"].help, "Help with a \\ backslash\nand a newline.");
  EXPECT_EQ(p.families["dv_latency_seconds"].type, "histogram");
  EXPECT_EQ(p.Value("dv_requests_total", {{"type", "pull"}}), 3.0);
  EXPECT_EQ(p.Value("dv_requests_total", {{"type", "push"}}), 1.0);
  EXPECT_EQ(p.Value("dv_weird", {{"path", "C:\\dir \"quoted\"\nline"}}), -1.5);
  EXPECT_EQ(p.Value("dv_latency_seconds_bucket", {{"le", "0.001"}}), 1.0);
  EXPECT_EQ(p.Value("dv_latency_seconds_bucket", {{"le", "0.01"}}), 2.0);
  EXPECT_EQ(p.Value("dv_latency_seconds_bucket", {{"le", "0.1"}}), 3.0);
  EXPECT_EQ(p.Value("dv_latency_seconds_bucket", {{"le", "+Inf"}}), 4.0);
  EXPECT_EQ(p.Value("dv_latency_seconds_count", {{"op", "x"}}), 4.0);
  EXPECT_NEAR(*p.Value("dv_latency_seconds_sum"), 0.5555, 1e-12);
  // HELP and TYPE come once per family, before its samples.
  EXPECT_LT(text.find("# TYPE dv_requests_total counter"), text.find("dv_requests_total{"));
  EXPECT_EQ(text.find("# TYPE dv_requests_total"), text.rfind("# TYPE dv_requests_total"));
}

TEST(MetricsTest, TheParserRejectsBrokenText) {
  // The checks of the test parser itself (so that a pass above means
  // something).
  EXPECT_FALSE(ParsePrometheusText("x 1\n").error.empty());  // no TYPE
  EXPECT_FALSE(ParsePrometheusText("# TYPE x counter\nx -1\n").error.empty());
  EXPECT_FALSE(ParsePrometheusText("# TYPE x gauge\nx{a=\"b} 1\n").error.empty());
  EXPECT_FALSE(ParsePrometheusText("# TYPE x gauge\nx one\n").error.empty());
  EXPECT_FALSE(ParsePrometheusText("# TYPE x gauge\nx 1\nx 2\n").error.empty());
  EXPECT_FALSE(ParsePrometheusText("# TYPE h histogram\nh_bucket{le=\"1\"} 2\n"
                                   "h_bucket{le=\"+Inf\"} 1\nh_count 1\nh_sum 0\n")
                   .error.empty());
  EXPECT_FALSE(
      ParsePrometheusText("# TYPE h histogram\nh_bucket{le=\"1\"} 1\nh_count 1\n").error.empty());
  EXPECT_TRUE(ParsePrometheusText("# TYPE x gauge\nx{a=\"\\\"\"} 1 1700000000000\n").error.empty());
}

TEST(MetricsTest, ConcurrentUpdatesWhileRendering) {
  MetricRegistry r;
  Counter* c = *r.AddCounter("c_total", "c");
  Histogram* h = *r.AddHistogram("h", "h", {0.5, 1.5});
  constexpr int kThreads = 4, kPerThread = 20000;
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&] {
      for (int i = 0; i < kPerThread; ++i) {
        c->Increment();
        h->Observe(1.0);
      }
    });
  }
  // Every render in the meantime parses and is self-consistent.
  for (int i = 0; i < 50; ++i) {
    PromText p = ParsePrometheusText(r.Render());
    ASSERT_TRUE(p.error.empty()) << p.error;
  }
  for (auto& t : threads) t.join();
  EXPECT_EQ(c->value(), kThreads * kPerThread);
  Histogram::Snapshot s = h->Read();
  EXPECT_EQ(s.count, static_cast<uint64_t>(kThreads * kPerThread));
  EXPECT_EQ(s.cumulative[0], 0u);
  EXPECT_DOUBLE_EQ(s.sum, kThreads * kPerThread * 1.0);
}

}  // namespace
}  // namespace distval
