#include "distval/cluster_spec.h"

#include <gtest/gtest.h>
#include <stdlib.h>
#include <unistd.h>

#include <fstream>
#include <initializer_list>
#include <string>
#include <vector>

namespace distval {
namespace {

// Writes files into a fresh temporary directory, removed at the end.
class TempDir {
 public:
  TempDir() {
    std::string tmpl = ::testing::TempDir() + "cluster_spec_test.XXXXXX";
    path_ = mkdtemp(tmpl.data()) ? tmpl : std::string();
  }
  ~TempDir() {
    for (const std::string& f : files_) unlink(f.c_str());
    if (!path_.empty()) rmdir(path_.c_str());
  }
  const std::string& path() const { return path_; }
  std::string Write(const std::string& name, const std::string& contents) {
    std::string file = path_ + "/" + name;
    std::ofstream(file) << contents;
    files_.push_back(file);
    return file;
  }

 private:
  std::string path_;
  std::vector<std::string> files_;
};

// Asserts InvalidArgument whose message contains every one of `parts`.
template <typename T>
void ExpectInvalid(const StatusOr<T>& result, std::initializer_list<std::string> parts) {
  ASSERT_FALSE(result.ok()) << "expected an error containing " << *parts.begin();
  EXPECT_EQ(result.status().code(), StatusCode::kInvalidArgument) << result.status();
  for (const std::string& part : parts)
    EXPECT_NE(result.status().message().find(part), std::string::npos)
        << "message \"" << result.status().message() << "\" lacks \"" << part << "\"";
}

constexpr char kTfConfig[] = R"({
  "cluster": {
    "ps": ["h0:2222", "tcp://h1:2222"],
    "worker": ["w0:2222", "w1:2222", "w2:2222"]
  },
  "task": {"type": "worker", "index": 1}
})";

TEST(ClusterSpecTest, FlagsFileAndTfConfigAgree) {
  ClusterFlags flags;
  flags.ps = "h0:2222, tcp://h1:2222";
  flags.num_workers = 3;
  flags.task_type = "worker";
  flags.task_index = 1;
  StatusOr<ClusterSpec> from_flags = ClusterSpecFromFlags(flags);
  ASSERT_TRUE(from_flags.ok()) << from_flags.status();

  StatusOr<ClusterSpec> from_env = ClusterSpecFromTfConfig(kTfConfig);
  ASSERT_TRUE(from_env.ok()) << from_env.status();

  TempDir dir;
  ASSERT_FALSE(dir.path().empty());
  StatusOr<ClusterSpec> from_file = ClusterSpecFromFile(dir.Write("cluster.json", kTfConfig));
  ASSERT_TRUE(from_file.ok()) << from_file.status();

  // A file without "task", the role coming from the flags.
  StatusOr<ClusterSpec> no_task = ClusterSpecFromFile(dir.Write("no_task.json", R"({
    "cluster": {"ps": ["tcp://h0:2222", "h1:2222"], "worker": ["a:1", "b:1", "c:1"]}})"));
  ASSERT_TRUE(no_task.ok()) << no_task.status();
  EXPECT_FALSE(no_task->has_task());
  StatusOr<ClusterSpec> merged = no_task->WithTask(flags.task_type, flags.task_index);
  ASSERT_TRUE(merged.ok()) << merged.status();

  for (const ClusterSpec* spec : {&*from_flags, &*from_env, &*from_file, &*merged}) {
    SCOPED_TRACE(spec->ToString());
    EXPECT_EQ(spec->ps_endpoints(), (std::vector<std::string>{"tcp://h0:2222", "tcp://h1:2222"}));
    EXPECT_EQ(spec->num_ps(), 2);
    EXPECT_EQ(spec->ps_endpoint(1), "tcp://h1:2222");
    EXPECT_EQ(spec->num_workers(), 3);
    EXPECT_TRUE(spec->has_task());
    EXPECT_TRUE(spec->is_worker());
    EXPECT_FALSE(spec->is_ps());
    EXPECT_FALSE(spec->is_chief());
    EXPECT_EQ(spec->task_type(), TaskType::kWorker);
    EXPECT_EQ(spec->task_index(), 1);
  }
  EXPECT_EQ(*from_flags, *from_env);
  EXPECT_EQ(*from_flags, *from_file);
  EXPECT_EQ(*from_flags, *merged);
  EXPECT_EQ(from_flags->ToString(), from_env->ToString());
  EXPECT_EQ(from_flags->ToString(), "ps=[tcp://h0:2222,tcp://h1:2222] workers=3 task=worker:1");
  // Worker addresses are kept from TF-style sources; flags have none.
  EXPECT_EQ(from_env->worker_addresses(),
            (std::vector<std::string>{"w0:2222", "w1:2222", "w2:2222"}));
  EXPECT_TRUE(from_flags->worker_addresses().empty());
  // A different task is a different spec.
  EXPECT_FALSE(*from_flags == *from_flags->WithTask("worker", 2));
}

TEST(ClusterSpecTest, PsTask) {
  StatusOr<ClusterSpec> spec = ClusterSpecFromTfConfig(
      R"({"cluster": {"ps": ["a:1", "b:1"], "worker": ["w:1"]}, "task": {"type": "ps", "index": 1}})");
  ASSERT_TRUE(spec.ok()) << spec.status();
  EXPECT_TRUE(spec->is_ps());
  EXPECT_FALSE(spec->is_worker());
  EXPECT_EQ(spec->task_index(), 1);
  EXPECT_EQ(spec->ToString(), "ps=[tcp://a:1,tcp://b:1] workers=1 task=ps:1");

  ClusterFlags flags{"a:1,b:1", 1, "ps", 1};
  StatusOr<ClusterSpec> from_flags = ClusterSpecFromFlags(flags);
  ASSERT_TRUE(from_flags.ok()) << from_flags.status();
  EXPECT_EQ(*from_flags, *spec);
}

TEST(ClusterSpecTest, ChiefIsWorkerZeroAndShiftsWorkers) {
  constexpr char kCluster[] =
      R"("cluster": {"chief": ["c:1"], "worker": ["w0:1", "w1:1"], "ps": ["p:1"]})";
  auto tf = [&](const std::string& task) {
    return ClusterSpecFromTfConfig(std::string("{") + kCluster + ", \"task\": " + task + "}");
  };

  StatusOr<ClusterSpec> chief = tf(R"({"type": "chief", "index": 0})");
  ASSERT_TRUE(chief.ok()) << chief.status();
  EXPECT_EQ(chief->num_workers(), 3);
  EXPECT_TRUE(chief->has_chief());
  EXPECT_TRUE(chief->is_worker());
  EXPECT_TRUE(chief->is_chief());
  EXPECT_EQ(chief->task_index(), 0);
  EXPECT_EQ(chief->worker_addresses(), (std::vector<std::string>{"c:1", "w0:1", "w1:1"}));

  // TF worker 0 is distval worker 1; TF worker 1 is distval worker 2.
  StatusOr<ClusterSpec> w0 = tf(R"({"type": "worker", "index": 0})");
  ASSERT_TRUE(w0.ok()) << w0.status();
  EXPECT_EQ(w0->task_index(), 1);
  EXPECT_FALSE(w0->is_chief());
  StatusOr<ClusterSpec> w1 = tf(R"({"type": "worker", "index": 1})");
  ASSERT_TRUE(w1.ok()) << w1.status();
  EXPECT_EQ(w1->task_index(), 2);

  // Same job from flags (distval numbering): 3 workers, worker 2; and the
  // chief flag alias is worker 0.
  StatusOr<ClusterSpec> flags = ClusterSpecFromFlags({"p:1", 3, "worker", 2});
  ASSERT_TRUE(flags.ok()) << flags.status();
  EXPECT_EQ(*flags, *w1);
  StatusOr<ClusterSpec> flags_chief = ClusterSpecFromFlags({"p:1", 3, "chief", 0});
  ASSERT_TRUE(flags_chief.ok()) << flags_chief.status();
  EXPECT_EQ(*flags_chief, *chief);
  ExpectInvalid(ClusterSpecFromFlags({"p:1", 3, "chief", 1}),
                {"--task-index 1 out of range: 1 chief task"});

  // Only two TF workers besides the chief.
  ExpectInvalid(tf(R"({"type": "worker", "index": 2})"),
                {"TF_CONFIG: ", "\"task.index\" 2 out of range: 2 worker tasks"});
  ExpectInvalid(tf(R"({"type": "chief", "index": 1})"), {"\"task.index\" 1 out of range"});
  // A chief task without a chief in the cluster.
  ExpectInvalid(ClusterSpecFromTfConfig(
                    R"({"cluster": {"ps": ["p:1"], "worker": ["w:1"]},
                        "task": {"type": "chief", "index": 0}})"),
                {"\"task.type\"", "chief"});
  // At most one chief.
  ExpectInvalid(ClusterSpecFromTfConfig(
                    R"({"cluster": {"ps": ["p:1"], "chief": ["c:1", "d:1"]},
                        "task": {"type": "chief", "index": 0}})"),
                {"\"cluster.chief\"", "at most one"});
  // A chief alone is one worker.
  StatusOr<ClusterSpec> only_chief = ClusterSpecFromTfConfig(
      R"({"cluster": {"ps": ["p:1"], "chief": ["c:1"]}, "task": {"type": "ps", "index": 0}})");
  ASSERT_TRUE(only_chief.ok()) << only_chief.status();
  EXPECT_EQ(only_chief->num_workers(), 1);
}

TEST(ClusterSpecTest, EndpointForms) {
  struct Case {
    const char* in;
    const char* out;
  };
  for (const Case& c :
       {Case{"h:1", "tcp://h:1"}, Case{"10.0.0.1:2222", "tcp://10.0.0.1:2222"},
        Case{"tcp://h.example.com:65535", "tcp://h.example.com:65535"},
        Case{"[::1]:2222", "tcp://[::1]:2222"}, Case{"tcp://127.0.0.1:0", "tcp://127.0.0.1:0"},
        Case{"ipc:///tmp/ps0.sock", "ipc:///tmp/ps0.sock"}, Case{"inproc://ps0", "inproc://ps0"}}) {
    StatusOr<std::string> e = NormalizeEndpoint(c.in);
    ASSERT_TRUE(e.ok()) << c.in << ": " << e.status();
    EXPECT_EQ(*e, c.out);
  }
  for (const char* bad :
       {"", "h", "h:", ":1", "h:port", "h:70000", "h:123456", "::1:2222", "[::1", "[::1]2222",
        "udp://h:1", "tcp://h", "ipc://", "inproc://", "h :1", "a/b:1", "tcp://:1"}) {
    StatusOr<std::string> e = NormalizeEndpoint(bad);
    EXPECT_FALSE(e.ok()) << '"' << bad << '"';
    EXPECT_EQ(e.status().code(), StatusCode::kInvalidArgument) << bad;
  }
  ExpectInvalid(ClusterSpecFromTfConfig(
                    R"({"cluster": {"ps": ["a:1", "b"], "worker": ["w:1"]},
                        "task": {"type": "ps", "index": 0}})"),
                {"\"cluster.ps[1]\"", "\"b\"", "missing port"});
}

TEST(ClusterSpecTest, MalformedJsonNamesTheField) {
  const std::string w = R"("worker": ["w:1"])";
  const std::string task = R"("task": {"type": "worker", "index": 0})";
  auto tf = [](const std::string& text) { return ClusterSpecFromTfConfig(text); };

  ExpectInvalid(tf("{\"cluster\": "), {"TF_CONFIG: ", "invalid JSON"});
  ExpectInvalid(tf("[1, 2]"), {"TF_CONFIG: ", "top level must be a JSON object"});
  ExpectInvalid(tf("{" + task + "}"), {"TF_CONFIG: ", "\"cluster\" is required"});
  ExpectInvalid(tf("{\"cluster\": [], " + task + "}"), {"\"cluster\" must be an object"});
  ExpectInvalid(tf("{\"cluster\": {" + w + "}, " + task + "}"), {"\"cluster.ps\" is required"});
  ExpectInvalid(tf("{\"cluster\": {\"ps\": \"a:1\", " + w + "}, " + task + "}"),
                {"\"cluster.ps\" must be a list", "got string"});
  ExpectInvalid(tf("{\"cluster\": {\"ps\": [], " + w + "}, " + task + "}"),
                {"\"cluster.ps\" must list at least one"});
  ExpectInvalid(tf("{\"cluster\": {\"ps\": [\"a:1\", 7], " + w + "}, " + task + "}"),
                {"\"cluster.ps[1]\" must be a string", "got number"});
  ExpectInvalid(tf("{\"cluster\": {\"ps\": [\"a:1\", \"\"], " + w + "}, " + task + "}"),
                {"TF_CONFIG: \"cluster.ps[1]\" is empty"});
  ExpectInvalid(tf("{\"cluster\": {\"ps\": [\"a:1\", \"tcp://a:1\"], " + w + "}, " + task + "}"),
                {"\"cluster.ps[1]\"", "duplicates", "\"cluster.ps[0]\""});
  ExpectInvalid(tf(R"({"cluster": {"ps": ["a:1"]}, )" + task + "}"),
                {"\"cluster.worker\" must list at least one worker"});
  ExpectInvalid(tf(R"({"cluster": {"ps": ["a:1"], "worker": ["w:1", 3]}, )" + task + "}"),
                {"\"cluster.worker[1]\" must be a string"});
  ExpectInvalid(tf(R"({"cluster": {"ps": ["a:1"], "worker": [""]}, )" + task + "}"),
                {"\"cluster.worker[0]\" is empty"});
  ExpectInvalid(tf(R"({"cluster": {"ps": ["a:1"], "worker": {}}, )" + task + "}"),
                {"\"cluster.worker\" must be a list"});
  ExpectInvalid(
      tf(R"({"cluster": {"ps": ["a:1"], "evaluator": ["e:1"], )" + w + "}, " + task + "}"),
      {"\"cluster.evaluator\"", "not supported"});
  ExpectInvalid(tf(R"({"cluster": {"ps": ["a:1"], "master": ["m:1"], )" + w + "}, " + task + "}"),
                {"\"cluster.master\" is not a known job"});

  const std::string cluster = R"("cluster": {"ps": ["a:1", "b:1"], )" + w + "}";
  auto with_task = [&](const std::string& t) { return tf("{" + cluster + ", " + t + "}"); };
  ExpectInvalid(tf("{" + cluster + "}"), {"TF_CONFIG: \"task\" is required"});
  ExpectInvalid(with_task(R"("task": 3)"), {"\"task\" must be an object"});
  ExpectInvalid(with_task(R"("task": {"index": 0})"), {"\"task.type\" is required"});
  ExpectInvalid(with_task(R"("task": {"type": 1, "index": 0})"),
                {"\"task.type\" must be a string"});
  ExpectInvalid(with_task(R"("task": {"type": "boss", "index": 0})"),
                {"\"task.type\" \"boss\" is not a task type"});
  ExpectInvalid(with_task(R"("task": {"type": "evaluator", "index": 0})"),
                {"\"task.type\" \"evaluator\" is not supported"});
  ExpectInvalid(with_task(R"("task": {"type": "ps", "index": "1"})"),
                {"TF_CONFIG: \"task.index\" must be an integer"});
  ExpectInvalid(with_task(R"("task": {"type": "ps", "index": 1.5})"),
                {"\"task.index\" must be an integer"});
  ExpectInvalid(with_task(R"("task": {"type": "ps", "index": true})"),
                {"\"task.index\" must be an integer"});
  ExpectInvalid(with_task(R"("task": {"type": "ps", "index": -1})"),
                {"\"task.index\" -1 is negative"});
  ExpectInvalid(with_task(R"("task": {"type": "ps", "index": 2})"),
                {"\"task.index\" 2 out of range: 2 ps tasks"});
  ExpectInvalid(with_task(R"("task": {"type": "worker", "index": 1})"),
                {"\"task.index\" 1 out of range: 1 worker task"});
  ExpectInvalid(with_task(R"("task": {"type": "ps", "index": 18446744073709551615})"),
                {"\"task.index\"", "out of range"});

  // TF's default index is 0; unknown keys elsewhere are ignored.
  StatusOr<ClusterSpec> lenient =
      tf("{" + cluster + R"(, "task": {"type": "ps"}, "environment": "cloud"})");
  ASSERT_TRUE(lenient.ok()) << lenient.status();
  EXPECT_TRUE(lenient->is_ps());
  EXPECT_EQ(lenient->task_index(), 0);
}

TEST(ClusterSpecTest, FileErrorsNameTheFile) {
  TempDir dir;
  ASSERT_FALSE(dir.path().empty());
  const std::string path =
      dir.Write("bad.json", R"({"cluster": {"ps": ["a:1", ""], "worker": ["w:1"]}})");
  ExpectInvalid(ClusterSpecFromFile(path),
                {"cluster file " + path + ": \"cluster.ps[1]\" is empty"});
  const std::string garbage = dir.Write("garbage.json", "not json");
  ExpectInvalid(ClusterSpecFromFile(garbage), {"cluster file " + garbage, "invalid JSON"});
  const std::string empty = dir.Write("empty.json", "");
  ExpectInvalid(ClusterSpecFromFile(empty), {"cluster file " + empty, "invalid JSON"});

  StatusOr<ClusterSpec> missing = ClusterSpecFromFile(dir.path() + "/missing.json");
  ASSERT_FALSE(missing.ok());
  EXPECT_EQ(missing.status().code(), StatusCode::kNotFound);
  EXPECT_NE(missing.status().message().find("missing.json"), std::string::npos);

  // ClusterSpecFromJson uses the caller's source name.
  ExpectInvalid(ClusterSpecFromJson("{}", "launcher config"),
                {"launcher config: \"cluster\" is required"});
}

TEST(ClusterSpecTest, MalformedFlagsNameTheFlag) {
  ExpectInvalid(ClusterSpecFromFlags({"a:1,b:1", 1, "ps", 3}),
                {"--task-index 3 out of range: 2 ps tasks"});
  ExpectInvalid(ClusterSpecFromFlags({"a:1,b:1", 2, "worker", 2}),
                {"--task-index 2 out of range: 2 worker tasks"});
  ExpectInvalid(ClusterSpecFromFlags({"a:1", 1, "worker", -1}), {"--task-index -1 is negative"});
  ExpectInvalid(ClusterSpecFromFlags({"a:1", 0, "ps", 0}),
                {"--num-workers 0", "at least one worker"});
  ExpectInvalid(ClusterSpecFromFlags({"a:1", -2, "ps", 0}), {"--num-workers -2"});
  ExpectInvalid(ClusterSpecFromFlags({"", 1, "ps", 0}), {"--ps must list at least one"});
  ExpectInvalid(ClusterSpecFromFlags({"  ", 1, "ps", 0}), {"--ps must list at least one"});
  ExpectInvalid(ClusterSpecFromFlags({"a:1,,b:1", 1, "ps", 0}),
                {"--ps entry 2 of \"a:1,,b:1\" is empty"});
  ExpectInvalid(ClusterSpecFromFlags({"a:1,", 1, "ps", 0}), {"--ps entry 2", "is empty"});
  ExpectInvalid(ClusterSpecFromFlags({"a:1,tcp://a:1", 1, "ps", 0}),
                {"--ps entry 2", "duplicates --ps entry 1"});
  ExpectInvalid(ClusterSpecFromFlags({"a:1,b", 1, "ps", 0}), {"--ps entry 2", "missing port"});
  ExpectInvalid(ClusterSpecFromFlags({"a:1", 1, "", 0}), {"--task-type is required"});
  ExpectInvalid(ClusterSpecFromFlags({"a:1", 1, "evaluator", 0}),
                {"--task-type \"evaluator\" is not supported"});
  ExpectInvalid(ClusterSpecFromFlags({"a:1", 1, "master", 0}),
                {"--task-type \"master\" is not a task type"});
}

TEST(ClusterSpecTest, MakeAndWithTask) {
  StatusOr<ClusterSpec> spec = ClusterSpec::Make({"a:1", "ipc:///tmp/x"}, 2);
  ASSERT_TRUE(spec.ok()) << spec.status();
  EXPECT_FALSE(spec->has_task());
  EXPECT_EQ(spec->task_type(), TaskType::kNone);
  EXPECT_EQ(spec->ToString(), "ps=[tcp://a:1,ipc:///tmp/x] workers=2 task=none");
  ExpectInvalid(ClusterSpec::Make({}, 1), {"ps must list at least one"});
  ExpectInvalid(ClusterSpec::Make({"a:1"}, 0), {"num_workers 0"});
  ExpectInvalid(ClusterSpec::Make({"a:1", "a:1"}, 1), {"ps[1]", "duplicates ps[0]"});

  StatusOr<ClusterSpec> ps1 = spec->WithTask(TaskType::kPs, 1);
  ASSERT_TRUE(ps1.ok()) << ps1.status();
  EXPECT_TRUE(ps1->is_ps());
  EXPECT_EQ(ps1->task_index(), 1);
  StatusOr<ClusterSpec> cleared = ps1->WithTask(TaskType::kNone, 0);
  ASSERT_TRUE(cleared.ok());
  EXPECT_EQ(*cleared, *spec);
  ExpectInvalid(spec->WithTask("worker", 2), {"task index 2 out of range: 2 worker tasks"});
  ExpectInvalid(spec->WithTask("evaluator", 0), {"\"evaluator\" is not supported"});
  EXPECT_EQ(ClusterSpec(), ClusterSpec());
  EXPECT_EQ(ClusterSpec().num_ps(), 0);
}

TEST(ClusterSpecTest, TfConfigRoundTrip) {
  // With a chief, ipc endpoint, each task kind.
  constexpr char kChief[] = R"({"cluster": {"ps": ["p0:1", "ipc:///tmp/p1"],
      "chief": ["c:1"], "worker": ["w0:1", "w1:1"]}, "task": {"type": "worker", "index": 1}})";
  StatusOr<ClusterSpec> spec = ClusterSpecFromTfConfig(kChief);
  ASSERT_TRUE(spec.ok()) << spec.status();
  EXPECT_EQ(spec->task_index(), 2);
  for (int w = 0; w < spec->num_workers(); ++w) {
    StatusOr<ClusterSpec> s = spec->WithTask("worker", w);
    ASSERT_TRUE(s.ok()) << s.status();
    const std::string json = s->ToTfConfigJson();
    EXPECT_EQ(json.find('\n'), std::string::npos);
    StatusOr<ClusterSpec> back = ClusterSpecFromTfConfig(json);
    ASSERT_TRUE(back.ok()) << json << ": " << back.status();
    EXPECT_EQ(*back, *s) << json;
    EXPECT_EQ(back->worker_addresses(), s->worker_addresses());
    EXPECT_TRUE(back->has_chief());
  }
  EXPECT_NE(spec->ToTfConfigJson().find("\"p0:1\""), std::string::npos);
  EXPECT_NE(spec->ToTfConfigJson().find("\"ipc:///tmp/p1\""), std::string::npos);

  // From flags: no worker addresses, placeholders are written.
  StatusOr<ClusterSpec> flags = ClusterSpecFromFlags({"tcp://p:5,q:6", 2, "ps", 1});
  ASSERT_TRUE(flags.ok()) << flags.status();
  StatusOr<ClusterSpec> back = ClusterSpecFromTfConfig(flags->ToTfConfigJson());
  ASSERT_TRUE(back.ok()) << back.status();
  EXPECT_EQ(*back, *flags);
  EXPECT_EQ(back->worker_addresses().size(), 2u);

  // No task: parse back with ClusterSpecFromJson.
  StatusOr<ClusterSpec> no_task = ClusterSpec::Make({"p:1"}, 3);
  ASSERT_TRUE(no_task.ok());
  EXPECT_EQ(no_task->ToTfConfigJson().find("\"task\""), std::string::npos);
  StatusOr<ClusterSpec> back2 = ClusterSpecFromJson(no_task->ToTfConfigJson(), "round trip");
  ASSERT_TRUE(back2.ok()) << back2.status();
  EXPECT_EQ(*back2, *no_task);
}

}  // namespace
}  // namespace distval
