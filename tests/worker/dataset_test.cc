// IDX reader: the real Fashion-MNIST files and crafted bad files.
#include "distval/dataset.h"

#include <gtest/gtest.h>
#include <zlib.h>

#include <array>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

namespace distval {
namespace {

namespace fs = std::filesystem;

bool Contains(const Status& s, const std::string& text) {
  return s.message().find(text) != std::string::npos;
}

std::vector<unsigned char> BigEndian(std::initializer_list<int32_t> fields) {
  std::vector<unsigned char> out;
  for (int32_t f : fields) {
    const uint32_t u = static_cast<uint32_t>(f);
    out.push_back(static_cast<unsigned char>(u >> 24));
    out.push_back(static_cast<unsigned char>(u >> 16));
    out.push_back(static_cast<unsigned char>(u >> 8));
    out.push_back(static_cast<unsigned char>(u));
  }
  return out;
}

class IdxFilesTest : public ::testing::Test {
 protected:
  void SetUp() override {
    std::string tmpl = (fs::path(::testing::TempDir()) / "distval_idx_XXXXXX").string();
    ASSERT_NE(mkdtemp(tmpl.data()), nullptr);
    dir_ = tmpl;
  }
  void TearDown() override { fs::remove_all(dir_); }

  std::string Write(const std::string& name, const std::vector<unsigned char>& bytes,
                    bool gzip = false) {
    const std::string path = (dir_ / name).string();
    if (gzip) {
      gzFile f = gzopen(path.c_str(), "wb");
      EXPECT_NE(f, nullptr);
      EXPECT_EQ(gzwrite(f, bytes.data(), static_cast<unsigned>(bytes.size())),
                static_cast<int>(bytes.size()));
      gzclose(f);
    } else {
      std::ofstream out(path, std::ios::binary);
      out.write(reinterpret_cast<const char*>(bytes.data()),
                static_cast<std::streamsize>(bytes.size()));
    }
    return path;
  }

  // n images of 2x2 with pixel values (i * 4 + p) * 5, and matching labels.
  static std::vector<unsigned char> Images(int n, int stored = -1) {
    auto bytes = BigEndian({2051, n, 2, 2});
    for (int i = 0; i < (stored < 0 ? n : stored) * 4; ++i)
      bytes.push_back(static_cast<unsigned char>(i * 5));
    return bytes;
  }
  static std::vector<unsigned char> Labels(int n) {
    auto bytes = BigEndian({2049, n});
    for (int i = 0; i < n; ++i) bytes.push_back(static_cast<unsigned char>(i % 3));
    return bytes;
  }

  fs::path dir_;
};

TEST_F(IdxFilesTest, ReadsPlainAndGzipFilesAlike) {
  auto bytes = Images(3);
  bytes[16 + 5] = 255;  // image 1, pixel 1
  for (bool gzip : {false, true}) {
    const std::string path = Write(gzip ? "img.gz" : "img", bytes, gzip);
    auto images = ReadIdxImages(path);
    ASSERT_TRUE(images.ok()) << images.status();
    EXPECT_EQ(images->shape(), (Shape{3, 4}));
    const float* p = images->data_as<float>();
    EXPECT_FLOAT_EQ(p[0], 0.0f);
    EXPECT_FLOAT_EQ(p[1], 5.0f / 255.0f);
    EXPECT_FLOAT_EQ(p[5], 1.0f);
    EXPECT_FLOAT_EQ(p[11], 55.0f / 255.0f);
  }
  auto labels = ReadIdxLabels(Write("lab.gz", Labels(5), true));
  ASSERT_TRUE(labels.ok()) << labels.status();
  EXPECT_EQ(*labels, (std::vector<int32_t>{0, 1, 2, 0, 1}));
}

TEST_F(IdxFilesTest, LimitReadsOnlyTheFirstExamples) {
  auto images = ReadIdxImages(Write("img", Images(3)), 2);
  ASSERT_TRUE(images.ok());
  EXPECT_EQ(images->shape(), (Shape{2, 4}));
  images = ReadIdxImages(Write("img2", Images(3)), 10);
  ASSERT_TRUE(images.ok());
  EXPECT_EQ(images->shape().rows(), 3);
  // Truncation after the limit is not read, so it is not an error.
  images = ReadIdxImages(Write("short", Images(3, /*stored=*/1)), 1);
  EXPECT_TRUE(images.ok()) << images.status();
}

TEST_F(IdxFilesTest, MissingFileIsNotFoundAndNamesIt) {
  const std::string path = (dir_ / "nope.gz").string();
  auto images = ReadIdxImages(path);
  EXPECT_EQ(images.status().code(), StatusCode::kNotFound);
  EXPECT_TRUE(Contains(images.status(), path)) << images.status();

  auto ex = LoadFashionMnist(dir_.string(), Split::kTrain);
  EXPECT_EQ(ex.status().code(), StatusCode::kNotFound);
  EXPECT_TRUE(Contains(ex.status(), "train-images-idx3-ubyte.gz")) << ex.status();
  EXPECT_TRUE(Contains(ex.status(), "apt-get install dataset-fashion-mnist")) << ex.status();
}

TEST_F(IdxFilesTest, BadMagicIsRejected) {
  const std::string labels = Write("lab", Labels(3));
  auto images = ReadIdxImages(labels);
  EXPECT_EQ(images.status().code(), StatusCode::kInvalidArgument);
  EXPECT_TRUE(Contains(images.status(), "magic number 2049 (0x00000801) is not an IDX image file"))
      << images.status();
  auto l = ReadIdxLabels(Write("img", Images(2)));
  EXPECT_EQ(l.status().code(), StatusCode::kInvalidArgument);
  EXPECT_TRUE(Contains(l.status(), "expected 2049")) << l.status();
}

TEST_F(IdxFilesTest, TruncatedFilesAreDataLoss) {
  // Header promises 3 images, 2 are present (plain and gzip).
  for (bool gzip : {false, true}) {
    auto images = ReadIdxImages(Write(gzip ? "t.gz" : "t", Images(3, 2), gzip));
    EXPECT_EQ(images.status().code(), StatusCode::kDataLoss);
    EXPECT_TRUE(Contains(images.status(), "truncated: the header says 3 images of 2x2"))
        << images.status();
    EXPECT_TRUE(Contains(images.status(), "ends after 8 bytes")) << images.status();
  }
  auto header = ReadIdxImages(Write("h", {0, 0, 8, 3, 0, 0}));
  EXPECT_EQ(header.status().code(), StatusCode::kDataLoss);
  EXPECT_TRUE(Contains(header.status(), "truncated header")) << header.status();
  auto labels = ReadIdxLabels(Write("l", BigEndian({2049, 5})));
  EXPECT_EQ(labels.status().code(), StatusCode::kDataLoss);
  EXPECT_TRUE(Contains(labels.status(), "header says 5 labels")) << labels.status();
}

TEST_F(IdxFilesTest, CutGzipStreamIsDataLoss) {
  std::vector<unsigned char> bytes = Images(200);
  const std::string path = Write("big.gz", bytes, true);
  const auto size = fs::file_size(path);
  fs::resize_file(path, size / 2);
  auto images = ReadIdxImages(path);
  EXPECT_EQ(images.status().code(), StatusCode::kDataLoss) << images.status();
}

TEST_F(IdxFilesTest, CountMismatchBetweenImagesAndLabels) {
  const IdxFilePair pair{Write("img", Images(3)), Write("lab", Labels(2))};
  auto ex = ReadIdxExamples(std::span<const IdxFilePair>(&pair, 1));
  EXPECT_EQ(ex.status().code(), StatusCode::kInvalidArgument);
  EXPECT_TRUE(Contains(ex.status(), "has 3 images")) << ex.status();
  EXPECT_TRUE(Contains(ex.status(), "has 2 labels")) << ex.status();
  EXPECT_TRUE(Contains(ex.status(), pair.labels)) << ex.status();
}

TEST_F(IdxFilesTest, SeveralFilesConcatenateWithFileSizes) {
  const std::vector<IdxFilePair> files = {{Write("a", Images(3)), Write("al", Labels(3))},
                                          {Write("b", Images(2)), Write("bl", Labels(2))}};
  auto ex = ReadIdxExamples(files);
  ASSERT_TRUE(ex.ok()) << ex.status();
  EXPECT_EQ(ex->size(), 5);
  EXPECT_EQ(ex->feature_size(), 4);
  EXPECT_EQ(ex->file_sizes, (std::vector<int64_t>{3, 2}));
  EXPECT_EQ(ex->labels, (std::vector<int32_t>{0, 1, 2, 0, 1}));
  EXPECT_EQ(ex->num_classes, 3);
  EXPECT_FLOAT_EQ(ex->features.data_as<float>()[3 * 4 + 1], 5.0f / 255.0f);  // b's image 0

  auto limited = ReadIdxExamples(files, 4);
  ASSERT_TRUE(limited.ok());
  EXPECT_EQ(limited->file_sizes, (std::vector<int64_t>{3, 1}));
  limited = ReadIdxExamples(files, 2);
  ASSERT_TRUE(limited.ok());
  EXPECT_EQ(limited->file_sizes, (std::vector<int64_t>{2, 0}));
}

TEST(FashionMnistTest, RealFilesHaveTheExpectedCountsAndLabels) {
  if (!fs::exists(FashionMnistFiles(kDefaultFashionMnistDir, Split::kTest).images))
    GTEST_SKIP() << "Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)";
  for (Split split : {Split::kTrain, Split::kTest}) {
    auto ex = LoadFashionMnist(kDefaultFashionMnistDir, split);
    ASSERT_TRUE(ex.ok()) << ex.status();
    const int64_t expected = split == Split::kTrain ? 60000 : 10000;
    EXPECT_EQ(ex->size(), expected);
    EXPECT_EQ(ex->features.shape(), (Shape{expected, 784}));
    EXPECT_EQ(ex->num_classes, 10);
    std::array<int64_t, 10> per_class{};
    for (int32_t l : ex->labels) {
      ASSERT_GE(l, 0);
      ASSERT_LE(l, 9);
      ++per_class[static_cast<size_t>(l)];
    }
    // Fashion-MNIST is balanced: 6000 / 1000 of each class.
    for (int64_t c : per_class) EXPECT_EQ(c, expected / 10);
    const float* p = ex->features.data_as<float>();
    float lo = 1, hi = 0;
    for (int64_t i = 0; i < ex->features.num_elements(); ++i) {
      lo = std::min(lo, p[i]);
      hi = std::max(hi, p[i]);
    }
    EXPECT_EQ(lo, 0.0f);
    EXPECT_EQ(hi, 1.0f);
  }
  auto first = LoadFashionMnist(kDefaultFashionMnistDir, Split::kTrain, 100);
  ASSERT_TRUE(first.ok());
  EXPECT_EQ(first->size(), 100);
  EXPECT_EQ(first->labels[0], 9);  // the first training example is an ankle boot
}

}  // namespace
}  // namespace distval
