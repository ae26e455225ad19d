// Helpers for the GPU tests: device buffers, poisoning, random inputs and comparisons.
#pragma once

#include <cuda_runtime.h>
#include <doctest/doctest.h>

#include <cmath>
#include <cstdint>
#include <random>
#include <vector>

#include <kd/core/numeric.hpp>

namespace kd_test {

// Fresh inputs every run (seeded from the device's entropy): a kernel must compute the same function
// on any valid input, not on one fixed draw.
inline std::mt19937_64& rng() {
  static std::mt19937_64 r(std::random_device{}());
  return r;
}

template <class T>
struct device_buffer {
  T* data = nullptr;
  std::size_t count = 0;
  explicit device_buffer(std::size_t n) : count(n) { REQUIRE(cudaMalloc(&data, (n ? n : 1) * sizeof(T)) == cudaSuccess); }
  device_buffer(const device_buffer&) = delete;
  device_buffer& operator=(const device_buffer&) = delete;
  ~device_buffer() { cudaFree(data); }
  void upload(const std::vector<T>& h) {
    REQUIRE(h.size() == count);
    REQUIRE(cudaMemcpy(data, h.data(), count * sizeof(T), cudaMemcpyHostToDevice) == cudaSuccess);
  }
  std::vector<T> download() const {
    std::vector<T> h(count);
    REQUIRE(cudaMemcpy(h.data(), data, count * sizeof(T), cudaMemcpyDeviceToHost) == cudaSuccess);
    return h;
  }
  // All-ones bytes are NaN in float, half and bfloat16: an element the kernel failed to write stays NaN.
  void poison() { REQUIRE(cudaMemset(data, 0xff, count * sizeof(T)) == cudaSuccess); }
};

// Fresh random values rounded to storage type T (the reference sees exactly what the GPU sees).
template <class T>
std::vector<T> random_storage(std::size_t n, double stddev, std::mt19937_64& rng) {
  std::normal_distribution<double> d(0.0, stddev);
  std::vector<T> out(n);
  for (auto& x : out) x = kd::store_as<T>(static_cast<float>(d(rng)));
  return out;
}

// The student of a close pair in storage S: 0.9 teacher + offset + noise (stddev 0.3, drawn in S), so the
// two distributions are near each other while their logits sit `offset` apart.
template <class S, class T>
std::vector<S> close_student(const std::vector<T>& teacher, double offset, std::mt19937_64& rng) {
  auto s = random_storage<S>(teacher.size(), 0.3, rng);
  for (std::size_t i = 0; i < s.size(); ++i)
    s[i] = kd::store_as<S>(
        static_cast<float>(0.9 * kd::load_as<double>(teacher[i]) + offset + kd::load_as<double>(s[i])));
  return s;
}

template <class T>
std::vector<double> to_double(const std::vector<T>& v) {
  std::vector<double> out(v.size());
  for (std::size_t i = 0; i < v.size(); ++i) out[i] = kd::load_as<double>(v[i]);
  return out;
}

// ||a - b|| / ||b||; NaN anywhere in a gives NaN (which fails every comparison).
inline double rel_error(const std::vector<double>& a, const std::vector<double>& b) {
  double num = 0, den = 0;
  for (std::size_t i = 0; i < a.size(); ++i) {
    num += (a[i] - b[i]) * (a[i] - b[i]);
    den += b[i] * b[i];
  }
  return std::sqrt(num) / (den > 0 ? std::sqrt(den) : 1.0);
}

inline bool all_finite(const std::vector<double>& v) {
  for (double x : v)
    if (!std::isfinite(x)) return false;
  return true;
}

// Columns [a, a + w) of a row-major n x cols matrix (a rank's vocabulary slice), and back: a slice's
// n x w values into those columns of an n x cols matrix of doubles.
template <class T>
std::vector<T> columns(const std::vector<T>& m, kd::index_t n, kd::index_t cols, kd::index_t a, kd::index_t w) {
  std::vector<T> out;
  out.reserve(static_cast<std::size_t>(n * w));
  for (kd::index_t i = 0; i < n; ++i)
    for (kd::index_t j = 0; j < w; ++j) out.push_back(m[static_cast<std::size_t>(i * cols + a + j)]);
  return out;
}
template <class T>
void put_columns(const std::vector<T>& slice, kd::index_t n, kd::index_t cols, kd::index_t a, kd::index_t w,
                 std::vector<double>& m) {
  for (kd::index_t i = 0; i < n; ++i)
    for (kd::index_t j = 0; j < w; ++j)
      m[static_cast<std::size_t>(i * cols + a + j)] = kd::load_as<double>(slice[static_cast<std::size_t>(i * w + j)]);
}

template <class T>
constexpr double tolerance() {
  return sizeof(T) == 2 ? 1e-2 : 1e-5;
}

}  // namespace kd_test
