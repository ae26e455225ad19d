// tests/test_util.hpp: small, generic helpers shared by kd's doctest tests.
//
//   kdtest::rng(seed)                      a seeded std::mt19937_64 (tests are reproducible)
//   kdtest::fill_uniform / fill_normal     random fill of any container of float-like values
//   kdtest::uniform / normal               a std::vector<double> of random values
//   kdtest::to_double / from_double        element conversion that also works for kd::half / kd::bfloat16
//   kdtest::central_difference             d f / d x[i] by (f(x + h) - f(x - h)) / 2h
//   kdtest::numeric_gradient               the whole gradient of f at x by central differences
//   kdtest::norm / rel_error               ||a - b|| / ||b|| (absolute ||a - b|| when b is 0)
//   kdtest::contains                       substring test for error messages
//   kdtest::temp_dir                       a fresh directory under the system temp dir, removed at scope exit
//
// Header-only and free of doctest macros so any test (or benchmark) can include it.
#pragma once

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <functional>
#include <random>
#include <span>
#include <string>
#include <string_view>
#include <system_error>
#include <type_traits>
#include <vector>

namespace kdtest {

using rng_t = std::mt19937_64;

inline rng_t rng(std::uint64_t seed) { return rng_t{seed}; }

// Element conversion for double, float and any class type with an explicit conversion to float
// (kd::half, kd::bfloat16).
template <class T>
double to_double(const T& v) {
  if constexpr (std::is_arithmetic_v<T>)
    return static_cast<double>(v);
  else
    return static_cast<double>(static_cast<float>(v));
}

template <class T>
T from_double(double v) {
  if constexpr (std::is_arithmetic_v<T>)
    return static_cast<T>(v);
  else
    return T(static_cast<float>(v));
}

template <class Container>
void fill_uniform(Container& c, rng_t& g, double lo = -1.0, double hi = 1.0) {
  using T = std::remove_cvref_t<decltype(*std::begin(c))>;
  std::uniform_real_distribution<double> d(lo, hi);
  for (auto& v : c) v = from_double<T>(d(g));
}

template <class Container>
void fill_normal(Container& c, rng_t& g, double mean = 0.0, double stddev = 1.0) {
  using T = std::remove_cvref_t<decltype(*std::begin(c))>;
  std::normal_distribution<double> d(mean, stddev);
  for (auto& v : c) v = from_double<T>(d(g));
}

inline std::vector<double> uniform(std::size_t n, rng_t& g, double lo = -1.0, double hi = 1.0) {
  std::vector<double> v(n);
  fill_uniform(v, g, lo, hi);
  return v;
}

inline std::vector<double> normal(std::size_t n, rng_t& g, double mean = 0.0, double stddev = 1.0) {
  std::vector<double> v(n);
  fill_normal(v, g, mean, stddev);
  return v;
}

// Close distributions whose logits sit `offset` apart: teacher ~ N(0, 2), student = 0.9 teacher + offset +
// N(0, 0.3) (KL ~0.04-0.07 nats at T = 1-2), drawn teacher first.
struct close_logits {
  std::vector<double> teacher, student;
};
inline close_logits close_pair(std::size_t n, rng_t& g, double offset) {
  close_logits c{normal(n, g, 0.0, 2.0), normal(n, g, 0.0, 0.3)};
  for (std::size_t i = 0; i < n; ++i) c.student[i] = 0.9 * c.teacher[i] + offset + c.student[i];
  return c;
}

// Converts every element of a container to double.
template <class Container>
std::vector<double> to_doubles(const Container& c) {
  std::vector<double> out;
  for (const auto& v : c) out.push_back(to_double(v));
  return out;
}

// (f(x + h e_i) - f(x - h e_i)) / 2h; x[i] is restored before returning.
inline double central_difference(const std::function<double()>& f, double& xi, double h = 1e-5) {
  const double saved = xi;
  xi = saved + h;
  const double fp = f();
  xi = saved - h;
  const double fm = f();
  xi = saved;
  return (fp - fm) / (2.0 * h);
}

// The gradient of f (which reads x) at x by central differences, one coordinate at a time.
inline std::vector<double> numeric_gradient(const std::function<double()>& f, std::span<double> x,
                                            double h = 1e-5) {
  std::vector<double> g(x.size());
  for (std::size_t i = 0; i < x.size(); ++i) g[i] = central_difference(f, x[i], h);
  return g;
}

template <class A>
double norm(const A& a) {
  double s = 0.0;
  for (const auto& v : a) {
    const double d = to_double(v);
    s += d * d;
  }
  return std::sqrt(s);
}

// ||a - b|| / ||b||; when ||b|| == 0 the absolute ||a - b||. Sizes must match (returns +inf if not).
template <class A, class B>
double rel_error(const A& a, const B& b) {
  if (std::size(a) != std::size(b)) return INFINITY;
  double num = 0.0, den = 0.0;
  auto ia = std::begin(a);
  for (auto ib = std::begin(b); ib != std::end(b); ++ib, ++ia) {
    const double x = to_double(*ia), y = to_double(*ib);
    num += (x - y) * (x - y);
    den += y * y;
  }
  return den > 0.0 ? std::sqrt(num / den) : std::sqrt(num);
}

// |a - b| / |b| for scalars (absolute when b is 0).
inline double rel_error(double a, double b) { return b != 0.0 ? std::abs(a - b) / std::abs(b) : std::abs(a - b); }

inline bool contains(std::string_view haystack, std::string_view needle) {
  return haystack.find(needle) != std::string_view::npos;
}

struct temp_dir {
  std::filesystem::path path;
  explicit temp_dir(std::string_view prefix = "kd_test_") {
    std::random_device rd;
    path = std::filesystem::temp_directory_path() / (std::string(prefix) + std::to_string(rd()) + std::to_string(rd()));
    std::filesystem::create_directories(path);
  }
  ~temp_dir() {
    std::error_code ec;
    std::filesystem::remove_all(path, ec);
  }
  temp_dir(const temp_dir&) = delete;
  temp_dir& operator=(const temp_dir&) = delete;
};

}  // namespace kdtest
