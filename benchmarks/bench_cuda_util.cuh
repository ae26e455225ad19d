// Helpers of the stand-alone GPU benchmark programs (kd_bench_vocab_parallel, kd_bench_small_calls,
// kd_small_call_streaming, kd_dsmem_scatter): stop with a message on a failed CUDA or kd call (a benchmark
// has nothing to recover), fill device storage with normal values, time calls by CUDA events, measure the
// card's copy bandwidth (the ceiling a streaming kernel is held to), and a streaming kernel over a call's
// own arrays (its floor at that size).
#pragma once

#include <cuda_runtime.h>

#include <algorithm>
#include <chrono>
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

// Event timing of `call` (which enqueues work on `stream` and stops the program itself on a failure), after
// `warm` untimed calls. mean: one pair of events around `reps` calls back to back, so the kernels and the
// gaps between them, and the host time spent issuing them; best: each of `reps` calls between its own
// events, the fastest (for calls long enough that launch gaps do not count; host_us is then 0).
enum class statistic { mean, best };
struct event_time {
  double gpu_us, host_us;
};
template <class F>
event_time time_calls(cudaStream_t stream, F&& call, int reps, statistic stat = statistic::mean, int warm = 3) {
  for (int i = 0; i < warm; ++i) call();
  or_exit(cudaStreamSynchronize(stream), "warm-up calls");
  cudaEvent_t a, b;
  or_exit(cudaEventCreate(&a), "event");
  or_exit(cudaEventCreate(&b), "event");
  auto elapsed_us = [&] {
    float ms = 0;
    or_exit(cudaEventSynchronize(b), "timed calls");
    or_exit(cudaEventElapsedTime(&ms, a, b), "event");
    return 1e3 * static_cast<double>(ms);
  };
  event_time t{0, 0};
  if (stat == statistic::mean) {
    or_exit(cudaEventRecord(a, stream), "event");
    const auto h0 = std::chrono::steady_clock::now();
    for (int i = 0; i < reps; ++i) call();
    const auto h1 = std::chrono::steady_clock::now();
    or_exit(cudaEventRecord(b, stream), "event");
    t = {elapsed_us() / reps, std::chrono::duration<double, std::micro>(h1 - h0).count() / reps};
  } else {
    t.gpu_us = 1e300;
    for (int i = 0; i < reps; ++i) {
      or_exit(cudaEventRecord(a, stream), "event");
      call();
      or_exit(cudaEventRecord(b, stream), "event");
      t.gpu_us = std::min(t.gpu_us, elapsed_us());
    }
  }
  cudaEventDestroy(a);
  cudaEventDestroy(b);
  return t;
}

// The streaming floor of a call at its own size: reads a (and b, where given) and writes g, n16 16-byte
// vectors each, one launch. No arithmetic beyond a XOR, so only the traffic and the launch count.
// (static: each program is one translation unit.)
static __global__ void stream_arrays(const uint4* a, const uint4* b, uint4* g, long long n16) {
  const long long step = static_cast<long long>(gridDim.x) * blockDim.x;
  for (long long i = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x; i < n16; i += step) {
    uint4 v = a[i];
    if (b != nullptr) {
      const uint4 w = b[i];
      v.x ^= w.x;
      v.y ^= w.y;
      v.z ^= w.z;
      v.w ^= w.w;
    }
    g[i] = v;
  }
}
// Its grid: 256-thread blocks, at most 8 an SM.
inline int stream_blocks(long long n16, int sms) {
  return static_cast<int>(std::min<long long>((n16 + 255) / 256, 8LL * sms));
}

// Device-to-device copy bandwidth of the current device in TB/s (bytes read plus written): the mean of
// 10 copies of 2 GiB after one warm-up, timed by CUDA events.
inline double copy_bandwidth() {
  const std::size_t bytes = std::size_t{2} << 30;
  void *a = nullptr, *b = nullptr;
  or_exit(cudaMalloc(&a, bytes), "malloc (copy bandwidth)");
  or_exit(cudaMalloc(&b, bytes), "malloc (copy bandwidth)");
  const double us =
      time_calls(nullptr, [&] { or_exit(cudaMemcpyAsync(b, a, bytes, cudaMemcpyDeviceToDevice), "copy"); }, 10, statistic::mean, 1).gpu_us;
  cudaFree(a);
  cudaFree(b);
  return 2.0 * static_cast<double>(bytes) / (us * 1e-6) / 1e12;
}

}  // namespace kd_bench
