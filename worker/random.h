// Deterministic pseudo-random numbers for initializers and data shuffles.
//
// The standard library's distributions (and std::shuffle) are
// implementation-defined, so the same seed could give different values with
// another compiler; distval's initial values and data order must be a pure
// function of the seed everywhere. These are small, fully specified
// generators: SplitMix64 (Steele, Lea, Flood 2014) and Lemire's nearly
// divisionless bounded integers.
// Internal header. Thread-safety: values; one generator per thread.
#ifndef DISTVAL_WORKER_RANDOM_H_
#define DISTVAL_WORKER_RANDOM_H_

#include <cstdint>
#include <span>
#include <string_view>
#include <utility>

namespace distval::internal {

// SplitMix64 finalizer: a bijective 64-bit mix.
inline uint64_t Mix64(uint64_t z) {
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
  return z ^ (z >> 31);
}

// FNV-1a of a string (stable across platforms), to derive per-name seeds.
inline uint64_t HashName(std::string_view s) {
  uint64_t h = 0xcbf29ce484222325ULL;
  for (char c : s) {
    h ^= static_cast<unsigned char>(c);
    h *= 0x100000001b3ULL;
  }
  return h;
}

// Combines a seed with a stream id into an independent seed.
inline uint64_t DeriveSeed(uint64_t seed, uint64_t stream) {
  return Mix64(seed ^ Mix64(stream + 0x9e3779b97f4a7c15ULL));
}

class SplitMix64 {
 public:
  explicit SplitMix64(uint64_t seed) : state_(seed) {}

  uint64_t Next() {
    state_ += 0x9e3779b97f4a7c15ULL;
    return Mix64(state_);
  }
  // Uniform in [0, 1) with 24 random bits (every float in the grid is exact).
  float NextFloat() { return static_cast<float>(Next() >> 40) * (1.0f / 16777216.0f); }
  // Uniform integer in [0, bound), bound >= 1 (Lemire 2019, unbiased).
  uint64_t NextBelow(uint64_t bound) {
    unsigned __int128 m = static_cast<unsigned __int128>(Next()) * bound;
    uint64_t low = static_cast<uint64_t>(m);
    if (low < bound) {
      const uint64_t threshold = (0 - bound) % bound;
      while (low < threshold) {
        m = static_cast<unsigned __int128>(Next()) * bound;
        low = static_cast<uint64_t>(m);
      }
    }
    return static_cast<uint64_t>(m >> 64);
  }

 private:
  uint64_t state_;
};

// Fisher-Yates shuffle, fully determined by the generator's seed.
template <typename T>
void Shuffle(std::span<T> items, SplitMix64& rng) {
  for (size_t i = items.size(); i > 1; --i) {
    const size_t j = static_cast<size_t>(rng.NextBelow(i));
    std::swap(items[i - 1], items[j]);
  }
}

}  // namespace distval::internal

#endif  // DISTVAL_WORKER_RANDOM_H_
