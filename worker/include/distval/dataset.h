// Datasets in host memory and the IDX (MNIST-format) reader.
//
// IDX files: big-endian int32 magic (2051 for uint8 images [n, rows, cols],
// 2049 for uint8 labels [n]), then the dimensions, then the bytes. Files may
// be gzip'd or plain (zlib reads both). Pixels become floats in [0, 1]
// (value / 255); labels become int32.
//
// Sharding across workers and batching across replicas live in
// distval/input_pipeline.h.
//
// Thread-safety: functions are thread-safe; an Examples value may be read
// from many threads at once (e.g. every replica thread gathering its batch).
#ifndef DISTVAL_DATASET_H_
#define DISTVAL_DATASET_H_

#include <cstdint>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "distval/status.h"
#include "distval/tensor.h"

namespace distval {

// Where the Debian package dataset-fashion-mnist installs the files.
inline constexpr std::string_view kDefaultFashionMnistDir = "/usr/share/datasets/fashion-mnist";

// Labelled examples in host memory.
struct Examples {
  // f32 [n, feature_size], row-major, 64-byte aligned.
  Tensor features;
  // n labels.
  std::vector<int32_t> labels;
  // Examples contributed by each source file, in order (sums to n). File
  // auto-sharding (AutoShardPolicy::kFile) splits along these boundaries.
  std::vector<int64_t> file_sizes;
  // 1 + the largest label (0 when empty).
  int num_classes = 0;

  int64_t size() const { return static_cast<int64_t>(labels.size()); }
  int64_t feature_size() const { return features.shape().row_elements(); }
};

// One IDX image file and its label file.
struct IdxFilePair {
  std::string images;
  std::string labels;
};

// Reads an IDX image file (magic 2051) into f32 [n, rows * cols], pixel / 255.
// When limit >= 0 only the first min(limit, n) images are read. Errors name
// the path: NotFound (cannot open), InvalidArgument (bad magic or
// dimensions), DataLoss (truncated or corrupt gzip data, with the numbers).
StatusOr<Tensor> ReadIdxImages(const std::string& path, int64_t limit = -1);
// Reads an IDX label file (magic 2049); errors as ReadIdxImages.
StatusOr<std::vector<int32_t>> ReadIdxLabels(const std::string& path, int64_t limit = -1);

// Reads image/label pairs and concatenates them, in order. limit >= 0 keeps
// only the first `limit` examples overall (later files may then contribute
// nothing and are not read). Errors: those of the readers, InvalidArgument
// when the image and label counts of a pair differ (naming both files and
// counts) or when the files' image sizes differ, InvalidArgument for no files.
StatusOr<Examples> ReadIdxExamples(std::span<const IdxFilePair> files, int64_t limit = -1);

enum class Split { kTrain, kTest };

// The Fashion-MNIST pair of `split` in `dir`: train-images-idx3-ubyte.gz /
// train-labels-idx1-ubyte.gz, or t10k-... for the test split.
IdxFilePair FashionMnistFiles(std::string_view dir, Split split);

// Loads Fashion-MNIST (784 features, labels 0-9) from `dir`. A missing file
// gives NotFound naming it and suggesting `apt-get install
// dataset-fashion-mnist`; a label outside 0-9 is DataLoss.
StatusOr<Examples> LoadFashionMnist(std::string_view dir, Split split, int64_t limit = -1);

}  // namespace distval

#endif  // DISTVAL_DATASET_H_
