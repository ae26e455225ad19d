// kd/loss/common.hpp: options and checks shared by the token-level losses.
#pragma once

#include <cmath>
#include <cstdint>
#include <span>
#include <string>
#include <string_view>

#include <kd/core/numeric.hpp>
#include <kd/core/status.hpp>
#include <kd/core/tensor.hpp>

namespace kd {

inline constexpr std::int32_t default_ignore_index = -100;

// How per-token losses are counted, scaled and written back. Shared by every token-level loss.
struct token_options {
  std::int32_t ignore_index = default_ignore_index;  // label value that excludes a token
  index_t global_tokens = 0;     // token_mean divisor across micro-batches; 0 = this call's count
  double grad_scale = 1.0;       // multiplies every gradient written (component weight, loss scale)
  bool accumulate_grad = false;  // add into the gradient tensor instead of overwriting it
  std::string_view component;   // named in error messages; empty = the loss's own name ("kd", "lm", ...)
};

// What a loss returns besides its gradients.
struct loss_result {
  double loss = 0.0;       // the reduced loss (unweighted by grad_scale)
  index_t tokens = 0;      // non-ignored tokens in this call
  double normalizer = 1.0; // what the summed loss was divided by
};

// Non-ignored tokens in a label array. Sum it over all micro-batches of an optimizer step and pass the
// total as token_options::global_tokens to make token_mean independent of the split.
inline index_t count_tokens(std::span<const std::int32_t> labels, std::int32_t ignore_index = default_ignore_index) {
  index_t n = 0;
  for (auto y : labels) n += (y != ignore_index);
  return n;
}

namespace detail {

inline std::string_view component_or(const token_options& o, std::string_view fallback) {
  return o.component.empty() ? fallback : o.component;
}

inline std::string in_component(std::string_view component) {
  return " (component '" + std::string(component) + "')";
}

// Labels are optional (empty span = every token counts); when given they must match the token count
// and each be a valid class or the ignore index.
inline status check_labels(std::span<const std::int32_t> labels, index_t tokens, index_t vocab,
                           const token_options& o) {
  if (labels.empty()) return {};
  if (static_cast<index_t>(labels.size()) != tokens)
    return {errc::shape_mismatch, "labels has " + std::to_string(labels.size()) + " entries but the logits have " +
                                      std::to_string(tokens) + " rows" + in_component(o.component)};
  for (std::size_t i = 0; i < labels.size(); ++i) {
    const auto y = labels[i];
    if (y == o.ignore_index) continue;
    if (y < 0 || y >= vocab)
      return {errc::out_of_range, "label " + std::to_string(y) + " at token " + std::to_string(i) +
                                      " is outside the vocabulary [0, " + std::to_string(vocab) + ")" +
                                      in_component(o.component)};
  }
  return {};
}

inline bool token_active(std::span<const std::int32_t> labels, index_t r, std::int32_t ignore_index) {
  return labels.empty() || labels[static_cast<std::size_t>(r)] != ignore_index;
}

inline index_t count_active(std::span<const std::int32_t> labels, index_t tokens, std::int32_t ignore_index) {
  if (labels.empty()) return tokens;
  index_t n = 0;
  for (auto y : labels) n += (y != ignore_index);
  return n;
}

inline status check_token_options(const token_options& o, index_t active) {
  if (o.global_tokens < 0)
    return {errc::invalid_argument, "global_tokens is negative" + in_component(o.component)};
  if (o.global_tokens > 0 && o.global_tokens < active)
    return {errc::invalid_argument, "global_tokens " + std::to_string(o.global_tokens) +
                                        " is smaller than this micro-batch's " + std::to_string(active) +
                                        " tokens" + in_component(o.component)};
  if (!std::isfinite(o.grad_scale))
    return {errc::invalid_argument, "grad_scale is not finite" + in_component(o.component)};
  return {};
}

// The divisor of a token reduction: 1 for a sum, the (global) token count for a mean.
template <bool Mean>
double token_divisor(const token_options& o, index_t active) {
  if constexpr (!Mean) return 1.0;
  const index_t n = o.global_tokens > 0 ? o.global_tokens : active;
  return n > 0 ? static_cast<double>(n) : 1.0;
}

// The error for a non-finite value v found in `tensor` at (token r, column c).
inline status non_finite_at(double v, const char* tensor, index_t r, index_t c, std::string_view component) {
  return {errc::non_finite, std::string(std::isnan(v) ? "NaN" : "Inf") + " in " + tensor + " at token " +
                                std::to_string(r) + ", column " + std::to_string(c) + in_component(component)};
}

// Scans a row for NaN/Inf; returns an error naming the tensor, component, token and column.
template <class T>
status check_row_finite(const T* row, index_t cols, index_t r, const char* tensor, std::string_view component) {
  for (index_t c = 0; c < cols; ++c)
    if (const double v = load_as<double>(row[c]); !std::isfinite(v)) return non_finite_at(v, tensor, r, c, component);
  return {};
}

// Same, over the listed columns of a row only (the columns a loss actually reads).
template <class T>
status check_cols_finite(const T* row, std::span<const std::int32_t> cols, index_t r, const char* tensor,
                         std::string_view component) {
  for (const auto c : cols)
    if (const double v = load_as<double>(row[c]); !std::isfinite(v)) return non_finite_at(v, tensor, r, c, component);
  return {};
}

template <class T>
status check_finite(const matrix_view<T>& m, const char* tensor, std::string_view component) {
  for (index_t r = 0; r < m.rows; ++r) KD_TRY(check_row_finite(m.row(r), m.cols, r, tensor, component));
  return {};
}

// Writes v (already scaled) into a gradient slot, honouring accumulate_grad.
template <class T, class A>
void put_grad(T& slot, A v, bool accumulate) {
  if (accumulate) v += load_as<A>(slot);
  slot = store_as<T>(v);
}

}  // namespace detail
}  // namespace kd
