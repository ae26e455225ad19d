// kd/core/tensor.hpp: non-owning views over row-major storage.
//
// Losses take views, never containers, so the same call works on host memory (CPU backend) and on
// device memory (CUDA backend). The element type is part of the view's type: that is what lets a
// precision policy reject a tensor of the wrong dtype at compile time.
#pragma once

#include <cstdint>
#include <span>
#include <string>
#include <type_traits>

#include <kd/core/numeric.hpp>
#include <kd/core/status.hpp>

namespace kd {

using index_t = std::int64_t;

// A rows x cols matrix whose row r starts at data + r * stride (stride >= cols, in elements).
template <class T>
struct matrix_view {
  using element_type = T;
  using value_type = std::remove_cv_t<T>;

  T* data = nullptr;
  index_t rows = 0;
  index_t cols = 0;
  index_t stride = 0;

  constexpr matrix_view() = default;
  constexpr matrix_view(T* d, index_t r, index_t c) : data(d), rows(r), cols(c), stride(c) {}
  constexpr matrix_view(T* d, index_t r, index_t c, index_t s) : data(d), rows(r), cols(c), stride(s) {}
  // A view of T converts to a view of const T, never the reverse.
  template <class U>
    requires(std::is_same_v<const U, T> && !std::is_same_v<U, T>)
  constexpr matrix_view(matrix_view<U> o) : data(o.data), rows(o.rows), cols(o.cols), stride(o.stride) {}

  constexpr T* row(index_t r) const noexcept { return data + r * stride; }
  constexpr T& operator()(index_t r, index_t c) const noexcept { return data[r * stride + c]; }
  [[nodiscard]] constexpr bool empty() const noexcept { return rows == 0 || cols == 0; }
  [[nodiscard]] constexpr index_t size() const noexcept { return rows * cols; }
};

template <class T>
matrix_view(T*, index_t, index_t) -> matrix_view<T>;
template <class T>
matrix_view(T*, index_t, index_t, index_t) -> matrix_view<T>;

template <class T>
constexpr matrix_view<const T> as_const(matrix_view<T> v) noexcept {
  return {v.data, v.rows, v.cols, v.stride};
}

// A batch of equally shaped matrices (attention maps: batch * heads of T x T), contiguous batches.
template <class T>
struct tensor3_view {
  T* data = nullptr;
  index_t batch = 0;
  index_t rows = 0;
  index_t cols = 0;

  constexpr matrix_view<T> operator[](index_t b) const noexcept { return {data + b * rows * cols, rows, cols}; }
  [[nodiscard]] constexpr bool empty() const noexcept { return batch == 0 || rows == 0 || cols == 0; }
};

namespace detail {

// Structural validity of a view: non-negative extents, stride covers a row, data present when non-empty.
template <class T>
status validate_view(const matrix_view<T>& v, const char* name) {
  if (v.rows < 0 || v.cols < 0)
    return {errc::shape_mismatch, std::string(name) + " has negative extents"};
  if (v.stride < v.cols)
    return {errc::shape_mismatch, std::string(name) + " has stride " + std::to_string(v.stride) +
                                      " smaller than its " + std::to_string(v.cols) + " columns"};
  if (!v.empty() && v.data == nullptr) return {errc::invalid_argument, std::string(name) + " is null"};
  return {};
}

inline std::string shape_string(index_t r, index_t c) {
  std::string s = "[";  // appended piece by piece: GCC 12 warns (-Wrestrict) on "[" + std::string
  s += std::to_string(r);
  s += " x ";
  s += std::to_string(c);
  s += ']';
  return s;
}

template <class A, class B>
status same_shape(const matrix_view<A>& a, const char* an, const matrix_view<B>& b, const char* bn) {
  if (a.rows != b.rows || a.cols != b.cols)
    return {errc::shape_mismatch, std::string(an) + " is " + shape_string(a.rows, a.cols) + " but " + bn +
                                      " is " + shape_string(b.rows, b.cols)};
  return {};
}

}  // namespace detail
}  // namespace kd
