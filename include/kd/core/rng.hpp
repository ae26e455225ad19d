// kd/core/rng.hpp: kd's one random-number source.
//
// splitmix64 is a bijective 64-bit mixer; everything random in kd (model initialization, data order,
// synthetic corpora, benchmark inputs) is derived from it, so a seed gives the same numbers on every
// platform and standard library (std::normal_distribution is implementation-defined).
//   splitmix64(x)          the mixer itself: a counter-based hash (stateless, parallel-friendly)
//   uniform_at(key, i)     the i-th uniform double in [0, 1) of a counter-based stream
//   rng                    a sequential generator (state = one counter), saved and restored as one word
#pragma once

#include <cmath>
#include <cstdint>

namespace kd {

inline constexpr std::uint64_t splitmix64(std::uint64_t x) noexcept {
  x += 0x9e3779b97f4a7c15ull;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}

// The top 53 bits of a 64-bit word as a double in [0, 1).
inline constexpr double unit_double(std::uint64_t bits) noexcept { return static_cast<double>(bits >> 11) * 0x1.0p-53; }

// Counter-based stream: the i-th value depends on (key, i) alone, so threads fill disjoint ranges.
inline constexpr double uniform_at(std::uint64_t key, std::uint64_t i) noexcept { return unit_double(splitmix64(key + i)); }

// A key for stream `stream` of seed `seed` (independent streams per tensor, per purpose).
inline constexpr std::uint64_t stream_key(std::uint64_t seed, std::uint64_t stream) noexcept {
  return splitmix64(seed ^ splitmix64(stream + 0x632be59bd9b4e019ull));
}

// Standard normal from two uniforms (Box-Muller); u1 in (0, 1].
inline double box_muller(double u1, double u2) noexcept {
  constexpr double two_pi = 6.283185307179586;
  return std::sqrt(-2.0 * std::log(u1)) * std::cos(two_pi * u2);
}

// Sequential generator: the whole state is `state` (checkpoint it as one integer).
struct rng {
  std::uint64_t state = 0;

  constexpr explicit rng(std::uint64_t seed = 0) noexcept : state(seed) {}
  constexpr std::uint64_t next() noexcept { return splitmix64(state++); }
  constexpr double uniform() noexcept { return unit_double(next()); }
  // Uniform integer in [0, n) for 0 < n <= 2^53 (scaling a 53-bit uniform: no modulo bias).
  constexpr std::uint64_t below(std::uint64_t n) noexcept { return static_cast<std::uint64_t>(uniform() * static_cast<double>(n)); }
  double normal() noexcept {
    const double u1 = 1.0 - uniform();  // (0, 1]
    return box_muller(u1, uniform());
  }
};

static_assert(splitmix64(0) == 0xe220a8397b1dcdafull, "splitmix64 reference value");

}  // namespace kd
