// The safetensors writer and reader: the byte layout of the format, round
// trips, every malformed input the reader must refuse, and the atomic write.
#include "distval/safetensors.h"

#include <gtest/gtest.h>

#include <cstring>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>

#include "distval/atomic_file.h"

namespace distval {
namespace {

using nlohmann::json;

Tensor Iota(Shape shape, float start) {
  Tensor t(DType::kF32, std::move(shape));
  for (int64_t i = 0; i < t.num_elements(); ++i) t.data_as<float>()[i] = start + 0.25f * i;
  return t;
}

uint64_t HeaderLength(const std::string& bytes) {
  uint64_t n = 0;
  for (int i = 7; i >= 0; --i) n = (n << 8) | static_cast<unsigned char>(bytes[i]);
  return n;
}

// A file with `header` (any text) and `data_bytes` zero bytes of data.
std::string Craft(const std::string& header, size_t data_bytes) {
  std::string out(8, '\0');
  for (int i = 0; i < 8; ++i) out[i] = static_cast<char>((header.size() >> (8 * i)) & 0xff);
  return out + header + std::string(data_bytes, '\0');
}

TEST(SafetensorsTest, TheBytesFollowTheFormat) {
  const Tensor a = Iota(Shape{2, 3}, 1.0f), b = Iota(Shape{4}, -2.0f);
  const std::vector<SafetensorsEntry> entries = {{"layer/a", &a}, {"b", &b}};
  auto bytes = EncodeSafetensors(entries, {{"who", "distval"}});
  ASSERT_TRUE(bytes.ok()) << bytes.status();
  const uint64_t n = HeaderLength(*bytes);
  ASSERT_LE(8 + n, bytes->size());
  EXPECT_EQ((8 + n) % 8, 0u);  // data 8-byte aligned
  EXPECT_EQ(bytes->size(), 8 + n + (6 + 4) * 4);
  const json header = json::parse(bytes->substr(8, n));
  EXPECT_EQ(header["__metadata__"], (json{{"who", "distval"}}));
  EXPECT_EQ(header["layer/a"],
            (json{{"dtype", "F32"}, {"shape", {2, 3}}, {"data_offsets", {0, 24}}}));
  EXPECT_EQ(header["b"]["data_offsets"], (json{24, 40}));
  // Little-endian float32, in entry order: 1.0f is 00 00 80 3f.
  const unsigned char* data = reinterpret_cast<const unsigned char*>(bytes->data()) + 8 + n;
  EXPECT_EQ(data[0], 0x00);
  EXPECT_EQ(data[2], 0x80);
  EXPECT_EQ(data[3], 0x3f);
  float b0;
  std::memcpy(&b0, data + 24, 4);
  EXPECT_EQ(b0, -2.0f);
}

TEST(SafetensorsTest, RoundTripsExactly) {
  const Tensor a = Iota(Shape{3, 5}, 0.1f), scalar = Iota(Shape{}, 7.0f),
               empty = Iota(Shape{0, 4}, 0.0f);
  const std::vector<SafetensorsEntry> entries = {{"a", &a}, {"s", &scalar}, {"e", &empty}};
  auto bytes = EncodeSafetensors(entries, {{"k", "v"}, {"model", "{\"x\": 1}"}});
  ASSERT_TRUE(bytes.ok());
  auto file = DecodeSafetensors(*bytes);
  ASSERT_TRUE(file.ok()) << file.status();
  EXPECT_EQ(file->metadata.at("k"), "v");
  EXPECT_EQ(file->metadata.at("model"), "{\"x\": 1}");
  ASSERT_EQ(file->tensors.size(), 3u);
  const Tensor* got = file->Find("a");
  ASSERT_NE(got, nullptr);
  EXPECT_EQ(got->shape(), a.shape());
  EXPECT_EQ(std::memcmp(got->data_as<float>(), a.data_as<float>(), a.num_bytes()), 0);
  EXPECT_EQ(file->Find("s")->shape(), Shape{});
  EXPECT_EQ(file->Find("s")->data_as<float>()[0], 7.0f);
  EXPECT_EQ(file->Find("e")->shape(), (Shape{0, 4}));
  EXPECT_EQ(file->Find("nope"), nullptr);
}

TEST(SafetensorsTest, TheWriterRefusesWhatTheFormatCannotHold) {
  const Tensor a = Iota(Shape{2}, 0);
  Tensor ints(DType::kI32, Shape{2});
  const std::vector<std::vector<SafetensorsEntry>> bad = {
      {{"", &a}}, {{"x", &a}, {"x", &a}}, {{"__metadata__", &a}}, {{"x", nullptr}}, {{"i", &ints}}};
  for (const auto& entries : bad)
    EXPECT_EQ(EncodeSafetensors(entries, {}).status().code(), StatusCode::kInvalidArgument);
}

TEST(SafetensorsTest, TheReaderRefusesMalformedFiles) {
  struct Case {
    std::string bytes;
    StatusCode code;
    std::string message;
  };
  const std::string f32 = R"("dtype": "F32")";
  std::string too_long(8, '\0');
  too_long[7] = 0x10;  // 2^60
  std::string beyond = Craft("{}", 0);
  beyond[0] = 50;  // 50 bytes of header, 2 present
  const std::vector<Case> cases = {
      {"abc", StatusCode::kDataLoss, "shorter than the 8-byte header length"},
      {too_long, StatusCode::kDataLoss, "exceeds the limit"},
      {beyond, StatusCode::kDataLoss, "header length 50 but only 2 bytes follow"},
      {Craft("[1, 2]", 0), StatusCode::kDataLoss, "does not start with '{'"},
      {Craft("{\"a\": ", 0), StatusCode::kDataLoss, "not a JSON object"},
      {Craft(R"({"a": {"dtype": "F32", "shape": [1]}})", 4), StatusCode::kDataLoss,
       "lacks dtype, shape or data_offsets"},
      {Craft(R"({"a": {"dtype": "F16", "shape": [2], "data_offsets": [0, 4]}})", 4),
       StatusCode::kUnimplemented, "dtype F16"},
      {Craft("{\"a\": {" + f32 + R"(, "shape": [-1], "data_offsets": [0, 4]}})", 4),
       StatusCode::kDataLoss, "not a non-negative integer"},
      {Craft("{\"a\": {" + f32 + R"(, "shape": [2], "data_offsets": [0, 12]}})", 8),
       StatusCode::kDataLoss, "outside the 8 data bytes"},
      {Craft("{\"a\": {" + f32 + R"(, "shape": [3], "data_offsets": [0, 8]}})", 8),
       StatusCode::kDataLoss, "needs 12"},
      {Craft("{\"a\": {" + f32 + R"(, "shape": [1], "data_offsets": [4, 8]}})", 8),
       StatusCode::kDataLoss, "(hole)"},
      {Craft("{\"a\": {" + f32 + R"(, "shape": [2], "data_offsets": [0, 8]}, "b": {)" + f32 +
                 R"(, "shape": [1], "data_offsets": [4, 8]}})",
             8),
       StatusCode::kDataLoss, "(overlap)"},
      {Craft("{\"a\": {" + f32 + R"(, "shape": [1], "data_offsets": [0, 4]}})", 8),
       StatusCode::kDataLoss, "cover 4 of 8 data bytes"},
      {Craft(R"({"__metadata__": {"k": 1}})", 0), StatusCode::kDataLoss, "not a string"},
      {Craft(R"({"a": 5})", 0), StatusCode::kDataLoss, "is not an object"},
      {Craft("{\"a\": {" + f32 + R"(, "shape": [4611686018427387904, 4], "data_offsets": [0, 0]}})",
             0),
       StatusCode::kDataLoss, "overflows"},
  };
  for (const Case& c : cases) {
    auto file = DecodeSafetensors(c.bytes);
    EXPECT_EQ(file.status().code(), c.code) << c.message << ": " << file.status();
    EXPECT_NE(file.status().message().find(c.message), std::string::npos) << file.status();
  }
  // A valid empty file.
  EXPECT_TRUE(DecodeSafetensors(Craft("{}", 0)).ok());
}

TEST(SafetensorsTest, WritesAtomicallyAndReadsBack) {
  char tmpl[] = "/tmp/distval-safetensors-XXXXXX";
  ASSERT_NE(mkdtemp(tmpl), nullptr);
  const std::string dir = tmpl;
  const std::string path = dir + "/w.safetensors";
  const Tensor a = Iota(Shape{8}, 1), b = Iota(Shape{2, 2}, 5);
  ASSERT_TRUE(WriteSafetensors(path, std::vector<SafetensorsEntry>{{"a", &a}}).ok());
  ASSERT_TRUE(WriteSafetensors(path, std::vector<SafetensorsEntry>{{"b", &b}}, {{"m", "1"}}).ok());
  auto file = ReadSafetensors(path);
  ASSERT_TRUE(file.ok()) << file.status();
  ASSERT_EQ(file->tensors.size(), 1u);  // replaced, not appended
  EXPECT_EQ(file->tensors[0].first, "b");
  EXPECT_EQ(file->metadata.at("m"), "1");
  int entries = 0;
  for (const auto& e : std::filesystem::directory_iterator(dir)) {
    (void)e;
    ++entries;
  }
  EXPECT_EQ(entries, 1);  // no temporary file left
  EXPECT_EQ(std::filesystem::status(path).permissions() & std::filesystem::perms::others_read,
            std::filesystem::perms::others_read);
  EXPECT_EQ(ReadSafetensors(dir + "/missing").status().code(), StatusCode::kNotFound);
  Status s = WriteFileAtomically(dir + "/no/such/dir/f", "x");
  EXPECT_EQ(s.code(), StatusCode::kNotFound);
  EXPECT_NE(s.message().find(dir + "/no/such/dir/f"), std::string::npos) << s;
  // A corrupt file names its path.
  {
    std::ofstream f(path, std::ios::binary | std::ios::trunc);
    f << "12345678";
  }
  s = ReadSafetensors(path).status();
  EXPECT_EQ(s.code(), StatusCode::kDataLoss);
  EXPECT_NE(s.message().find(path), std::string::npos) << s;
  std::filesystem::remove_all(dir);
}

}  // namespace
}  // namespace distval
