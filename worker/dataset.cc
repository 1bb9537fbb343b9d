#include "distval/dataset.h"

#include <zlib.h>

#include <Eigen/Core>
#include <algorithm>
#include <cerrno>
#include <cstring>
#include <limits>
#include <string>

namespace distval {

namespace {

constexpr int32_t kImagesMagic = 2051;
constexpr int32_t kLabelsMagic = 2049;

std::string Num(int64_t v) { return std::to_string(v); }

// A gzip'd or plain file read through zlib. Move-only.
class GzReader {
 public:
  static StatusOr<GzReader> Open(const std::string& path) {
    errno = 0;
    gzFile f = gzopen(path.c_str(), "rb");
    if (f == nullptr) {
      const int err = errno;
      const std::string why = err != 0 ? std::strerror(err) : "zlib could not open it";
      if (err == ENOENT) return NotFoundError("cannot open " + path + ": " + why);
      if (err == EACCES) return PermissionDeniedError("cannot open " + path + ": " + why);
      return UnavailableError("cannot open " + path + ": " + why);
    }
    gzbuffer(f, 1 << 18);
    return GzReader(path, f);
  }
  GzReader(GzReader&& o) noexcept : path_(std::move(o.path_)), file_(o.file_) { o.file_ = nullptr; }
  GzReader& operator=(GzReader&&) = delete;
  ~GzReader() {
    if (file_ != nullptr) gzclose(file_);
  }

  // Reads up to n bytes; returns how many were read (less only at the end
  // of the data). DataLoss on corrupt gzip data.
  StatusOr<size_t> Read(void* buffer, size_t n) {
    size_t done = 0;
    auto* out = static_cast<unsigned char*>(buffer);
    while (done < n) {
      const unsigned chunk = static_cast<unsigned>(std::min<size_t>(n - done, 1u << 30));
      const int got = gzread(file_, out + done, chunk);
      if (got < 0) {
        int code = 0;
        const char* msg = gzerror(file_, &code);
        return DataLossError(path_ + ": corrupt data (" + (msg ? msg : "zlib error") + ")");
      }
      if (got == 0) break;
      done += static_cast<size_t>(got);
    }
    return done;
  }

  const std::string& path() const { return path_; }

 private:
  GzReader(std::string path, gzFile f) : path_(std::move(path)), file_(f) {}
  std::string path_;
  gzFile file_;
};

// Reads `count` big-endian int32 header fields.
StatusOr<std::vector<int32_t>> ReadHeader(GzReader& in, int count) {
  std::vector<unsigned char> bytes(static_cast<size_t>(count) * 4);
  DV_ASSIGN_OR_RETURN(size_t got, in.Read(bytes.data(), bytes.size()));
  if (got < bytes.size())
    return DataLossError(in.path() + ": truncated header (" + Num(static_cast<int64_t>(got)) +
                         " of " + Num(static_cast<int64_t>(bytes.size())) + " bytes)");
  std::vector<int32_t> fields(static_cast<size_t>(count));
  for (int i = 0; i < count; ++i) {
    const unsigned char* b = &bytes[static_cast<size_t>(i) * 4];
    fields[i] = static_cast<int32_t>((uint32_t{b[0]} << 24) | (uint32_t{b[1]} << 16) |
                                     (uint32_t{b[2]} << 8) | uint32_t{b[3]});
  }
  return fields;
}

Status CheckMagic(const GzReader& in, int32_t magic, int32_t expected, const char* kind) {
  if (magic == expected) return OkStatus();
  char hex[16];
  std::snprintf(hex, sizeof(hex), "0x%08x", static_cast<uint32_t>(magic));
  return InvalidArgumentError(in.path() + ": magic number " + Num(magic) + " (" + hex +
                              ") is not an IDX " + kind + " file (expected " + Num(expected) + ")");
}

}  // namespace

StatusOr<Tensor> ReadIdxImages(const std::string& path, int64_t limit) {
  DV_ASSIGN_OR_RETURN(GzReader in, GzReader::Open(path));
  DV_ASSIGN_OR_RETURN(std::vector<int32_t> magic, ReadHeader(in, 1));
  DV_RETURN_IF_ERROR(CheckMagic(in, magic[0], kImagesMagic, "image"));
  DV_ASSIGN_OR_RETURN(std::vector<int32_t> dims, ReadHeader(in, 3));
  const int64_t n = dims[0], rows = dims[1], cols = dims[2];
  if (n < 0 || rows <= 0 || cols <= 0 || rows > 65536 || cols > 65536)
    return InvalidArgumentError(path + ": implausible image dimensions " + Num(n) + " x " +
                                Num(rows) + " x " + Num(cols));
  const int64_t keep = limit >= 0 ? std::min(limit, n) : n;
  const int64_t pixels = rows * cols;
  Tensor images(DType::kF32, Shape{keep, pixels});
  float* out = images.data_as<float>();
  const int64_t total = keep * pixels;
  std::vector<unsigned char> chunk(static_cast<size_t>(std::min<int64_t>(total, 1 << 20)));
  for (int64_t done = 0; done < total;) {
    const size_t want = static_cast<size_t>(std::min<int64_t>(total - done, chunk.size()));
    DV_ASSIGN_OR_RETURN(size_t got, in.Read(chunk.data(), want));
    if (got < want)
      return DataLossError(path + ": truncated: the header says " + Num(n) + " images of " +
                           Num(rows) + "x" + Num(cols) + " (" + Num(n * pixels) +
                           " bytes of pixels) but the file ends after " +
                           Num(done + static_cast<int64_t>(got)) + " bytes of pixels");
    Eigen::Map<Eigen::ArrayXf>(out + done, static_cast<Eigen::Index>(got)) =
        Eigen::Map<const Eigen::Array<unsigned char, Eigen::Dynamic, 1>>(
            chunk.data(), static_cast<Eigen::Index>(got))
            .cast<float>() /
        255.0f;
    done += static_cast<int64_t>(got);
  }
  return images;
}

StatusOr<std::vector<int32_t>> ReadIdxLabels(const std::string& path, int64_t limit) {
  DV_ASSIGN_OR_RETURN(GzReader in, GzReader::Open(path));
  DV_ASSIGN_OR_RETURN(std::vector<int32_t> magic, ReadHeader(in, 1));
  DV_RETURN_IF_ERROR(CheckMagic(in, magic[0], kLabelsMagic, "label"));
  DV_ASSIGN_OR_RETURN(std::vector<int32_t> dims, ReadHeader(in, 1));
  const int64_t n = dims[0];
  if (n < 0) return InvalidArgumentError(path + ": negative label count " + Num(n));
  const int64_t keep = limit >= 0 ? std::min(limit, n) : n;
  std::vector<unsigned char> bytes(static_cast<size_t>(keep));
  DV_ASSIGN_OR_RETURN(size_t got, in.Read(bytes.data(), bytes.size()));
  if (got < bytes.size())
    return DataLossError(path + ": truncated: the header says " + Num(n) +
                         " labels but the file ends after " + Num(static_cast<int64_t>(got)));
  return std::vector<int32_t>(bytes.begin(), bytes.end());
}

StatusOr<Examples> ReadIdxExamples(std::span<const IdxFilePair> files, int64_t limit) {
  if (files.empty()) return InvalidArgumentError("ReadIdxExamples: no files given");
  std::vector<Tensor> parts;
  Examples ex;
  int64_t total = 0, feature_size = -1;
  for (const IdxFilePair& pair : files) {
    const int64_t remaining = limit >= 0 ? limit - total : -1;
    if (remaining == 0) {
      ex.file_sizes.push_back(0);
      continue;
    }
    DV_ASSIGN_OR_RETURN(Tensor images, ReadIdxImages(pair.images, remaining));
    DV_ASSIGN_OR_RETURN(std::vector<int32_t> labels, ReadIdxLabels(pair.labels, remaining));
    if (images.shape().rows() != static_cast<int64_t>(labels.size()))
      return InvalidArgumentError(
          "image and label counts differ: " + pair.images + " has " + Num(images.shape().rows()) +
          " images, " + pair.labels + " has " + Num(static_cast<int64_t>(labels.size())) +
          " labels" + (remaining >= 0 ? " (reading at most " + Num(remaining) + ")" : ""));
    if (feature_size >= 0 && images.shape().row_elements() != feature_size)
      return InvalidArgumentError(pair.images + " has images of " +
                                  Num(images.shape().row_elements()) + " pixels, earlier files " +
                                  Num(feature_size));
    feature_size = images.shape().row_elements();
    total += images.shape().rows();
    ex.file_sizes.push_back(images.shape().rows());
    ex.labels.insert(ex.labels.end(), labels.begin(), labels.end());
    parts.push_back(std::move(images));
  }
  if (parts.empty()) {
    ex.features = Tensor(DType::kF32, Shape{0, 0});
  } else if (parts.size() == 1) {
    ex.features = std::move(parts[0]);
  } else {
    ex.features = Tensor(DType::kF32, Shape{total, feature_size});
    std::byte* out = static_cast<std::byte*>(ex.features.data());
    for (const Tensor& p : parts) {
      std::memcpy(out, p.data(), p.num_bytes());
      out += p.num_bytes();
    }
  }
  int32_t max_label = -1;
  for (int32_t l : ex.labels) max_label = std::max(max_label, l);
  ex.num_classes = max_label + 1;
  return ex;
}

IdxFilePair FashionMnistFiles(std::string_view dir, Split split) {
  std::string base(dir);
  if (!base.empty() && base.back() != '/') base += '/';
  const std::string prefix = split == Split::kTrain ? "train" : "t10k";
  return {base + prefix + "-images-idx3-ubyte.gz", base + prefix + "-labels-idx1-ubyte.gz"};
}

StatusOr<Examples> LoadFashionMnist(std::string_view dir, Split split, int64_t limit) {
  const IdxFilePair files = FashionMnistFiles(dir, split);
  StatusOr<Examples> ex = ReadIdxExamples(std::span<const IdxFilePair>(&files, 1), limit);
  if (!ex.ok()) {
    if (ex.status().code() == StatusCode::kNotFound)
      return NotFoundError(ex.status().message() +
                           " (Fashion-MNIST: apt-get install dataset-fashion-mnist, or pass the "
                           "directory that holds the files)");
    return ex.status();
  }
  if (ex->feature_size() != 784 && ex->size() > 0)
    return InvalidArgumentError(files.images + ": Fashion-MNIST images have 784 pixels, found " +
                                Num(ex->feature_size()));
  for (size_t i = 0; i < ex->labels.size(); ++i) {
    if (ex->labels[i] > 9)
      return DataLossError(files.labels + ": label " + Num(ex->labels[i]) + " of example " +
                           Num(static_cast<int64_t>(i)) + " is outside 0-9");
  }
  ex->num_classes = 10;
  return ex;
}

}  // namespace distval
