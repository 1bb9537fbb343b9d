// Runs a libFuzzer target (LLVMFuzzerTestOneInput) over every file of the
// corpus directories given as arguments, so that the corpus replays as a
// normal test with any compiler. Fails when a directory is missing or holds
// no file; a failing input aborts inside the target.
#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <vector>

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size);

int main(int argc, char** argv) {
  if (argc < 2) {
    std::fprintf(stderr, "usage: %s CORPUS_DIR...\n", argv[0]);
    return 2;
  }
  for (int a = 1; a < argc; ++a) {
    const std::filesystem::path dir = argv[a];
    std::error_code ec;
    std::vector<std::filesystem::path> files;
    for (const auto& entry : std::filesystem::recursive_directory_iterator(dir, ec))
      if (entry.is_regular_file()) files.push_back(entry.path());
    if (ec) {
      std::fprintf(stderr, "cannot read corpus %s: %s\n", dir.c_str(), ec.message().c_str());
      return 1;
    }
    if (files.empty()) {
      std::fprintf(stderr, "corpus %s holds no input\n", dir.c_str());
      return 1;
    }
    std::sort(files.begin(), files.end());
    for (const auto& file : files) {
      std::ifstream in(file, std::ios::binary);
      std::vector<uint8_t> bytes((std::istreambuf_iterator<char>(in)),
                                 std::istreambuf_iterator<char>());
      if (!in.good() && !in.eof()) {
        std::fprintf(stderr, "cannot read %s\n", file.c_str());
        return 1;
      }
      LLVMFuzzerTestOneInput(bytes.data(), bytes.size());
    }
    std::printf("replayed %zu inputs from %s\n", files.size(), dir.c_str());
  }
  return 0;
}
