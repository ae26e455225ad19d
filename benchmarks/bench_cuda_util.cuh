// Helpers of the stand-alone GPU benchmark programs (kd_bench_vocab_parallel, kd_bench_small_calls): stop
// with a message on a failed CUDA or kd call (a benchmark has nothing to recover), and fill device
// storage with normal values.
#pragma once

#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <vector>

#include <kd/core/numeric.hpp>
#include <kd/core/rng.hpp>
#include <kd/core/status.hpp>

namespace kd_bench {

inline void or_exit(cudaError_t e, const char* what) {
  if (e != cudaSuccess) {
    std::fprintf(stderr, "kd benchmark: %s: %s\n", what, cudaGetErrorString(e));
    std::exit(1);
  }
}
inline void or_exit(const kd::status& s, const char* what) {
  if (!s.ok()) {
    std::fprintf(stderr, "kd benchmark: %s: %s\n", what, s.message().c_str());
    std::exit(1);
  }
}

// Normal(0, sd) values rounded to T on the device, from a pattern of at most 2^24 values repeated (timing
// does not depend on the values, but exponentials of constant rows would flatter the kernels).
template <class T>
void fill_normal(T* d, std::size_t n, double sd, std::uint64_t seed) {
  std::vector<T> h(std::min<std::size_t>(n, std::size_t{1} << 24));
  kd::rng r(seed);
  for (auto& x : h) x = kd::store_as<T>(static_cast<float>(r.normal() * sd));
  for (std::size_t off = 0; off < n; off += h.size())
    or_exit(cudaMemcpy(d + off, h.data(), std::min(h.size(), n - off) * sizeof(T), cudaMemcpyHostToDevice), "upload");
}

}  // namespace kd_bench
