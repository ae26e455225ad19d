// kd/loss/common.hpp: options and checks shared by the token-level losses.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <span>
#include <string>
#include <string_view>

#include <kd/core/numeric.hpp>
#include <kd/core/status.hpp>
#include <kd/core/tensor.hpp>
#include <kd/loss/divergence.hpp>  // inverse_temperature, scaled_logit_ok

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

// The component a loss's options name, or the loss's own name when they name none.
template <class Options>
std::string_view component_or(const Options& o, std::string_view fallback) {
  return o.component.empty() ? fallback : o.component;
}

inline std::string in_component(std::string_view component) {
  return " (component '" + std::string(component) + "')";
}

// The one place a loss's errors get their component: every loss's entry point passes the status of
// its backend call through this, so validation helpers, the CPU reference and the CUDA host code
// need not each append it (a message that already names one is left as it is).
inline status with_component(status s, std::string_view component) {
  if (s.ok() || s.message().find(" (component '") != std::string::npos) return s;
  return {s.code(), s.message() + in_component(component)};
}

// Labels are optional (empty span = every token counts); when given they must match the token count
// and each be a valid class or the ignore index.
// Label values are only read when they live on the host (`values_on_host`); device labels are
// checked by the kernels, so only their count is checked here.
inline status check_labels(std::span<const std::int32_t> labels, index_t tokens, index_t vocab,
                           const token_options& o, bool values_on_host = true) {
  if (labels.empty()) return {};
  if (static_cast<index_t>(labels.size()) != tokens)
    return {errc::shape_mismatch, "labels has " + std::to_string(labels.size()) + " entries but the logits have " +
                                      std::to_string(tokens) + " rows" + in_component(o.component)};
  if (!values_on_host) return {};
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

// What a token reduction divides the summed loss by: nothing (sum), the caller's global_tokens, or
// this call's active-token count (known on the host, or counted on the device by the CUDA backend).
enum class divisor_kind { one, global_tokens, active_tokens };

template <bool Mean>
divisor_kind divisor_of(const token_options& o) {
  if constexpr (!Mean) return divisor_kind::one;
  return o.global_tokens > 0 ? divisor_kind::global_tokens : divisor_kind::active_tokens;
}

// The divisor of a token reduction: 1 for a sum, the (global) token count for a mean.
inline double token_divisor(divisor_kind kind, const token_options& o, index_t active) {
  if (kind == divisor_kind::one) return 1.0;
  const index_t n = kind == divisor_kind::global_tokens ? o.global_tokens : active;
  return n > 0 ? static_cast<double>(n) : 1.0;
}
template <bool Mean>
double token_divisor(const token_options& o, index_t active) {
  return token_divisor(divisor_of<Mean>(o), o, active);
}

// The temperature conventions of a distillation loss, computed once per call from its options and
// consumed by every backend (no loss recomputes T^2 / T itself):
//   loss     = loss_scale * sum_tokens D / divisor,       loss_scale = T^2 if scale_by_t2, else 1
//   dstudent = grad_base * dD/dz / divisor,               grad_base  = grad_scale * loss_scale / T
// inv_temp is float(1 / T), the factor the kernels and the overflow rule (scaled_logit_ok) use.
struct kd_scaling {
  double temperature = 1.0;
  float inv_temp = 1.f;
  double loss_scale = 1.0;
  double grad_base = 1.0;
  divisor_kind divisor = divisor_kind::one;
  index_t global_tokens = 0;

  [[nodiscard]] double divisor_for(index_t active) const {
    token_options o;
    o.global_tokens = global_tokens;
    return token_divisor(divisor, o, active);
  }
  [[nodiscard]] double grad_factor(index_t active) const { return grad_base / divisor_for(active); }
};

template <bool Mean>
kd_scaling make_kd_scaling(const token_options& o, double temperature, bool scale_by_t2) {
  kd_scaling s;
  s.temperature = temperature;
  s.inv_temp = inverse_temperature(temperature);
  s.loss_scale = scale_by_t2 ? temperature * temperature : 1.0;
  s.grad_base = o.grad_scale * s.loss_scale / temperature;
  s.divisor = divisor_of<Mean>(o);
  s.global_tokens = o.global_tokens;
  return s;
}

// The error for a non-finite value v found in `tensor` at (token r, column c).
inline status non_finite_at(double v, const char* tensor, index_t r, index_t c, std::string_view component) {
  return {errc::non_finite, std::string(std::isnan(v) ? "NaN" : "Inf") + " in " + tensor + " at token " +
                                std::to_string(r) + ", column " + std::to_string(c) + in_component(component)};
}

// Checks one logit that a loss divides by a temperature: finite, and finite once scaled in float
// (scaled_logit_ok, the rule the CUDA kernels apply). Names the tensor, token, column and component.
template <class T>
status check_scaled_logit(const T& x, float inv_temp, double temperature, const char* tensor, index_t r, index_t c,
                          std::string_view component) {
  const double v = load_as<double>(x);
  if (!std::isfinite(v)) return non_finite_at(v, tensor, r, c, component);
  if (!scaled_logit_ok(static_cast<float>(v), inv_temp)) {
    char msg[96];  // %g: std::to_string would print 3e38 with 39 digits
    std::snprintf(msg, sizeof msg, "logit %g in ", v);
    std::string text = msg;
    std::snprintf(msg, sizeof msg, " overflows float when divided by temperature %g", temperature);
    return {errc::non_finite, text + tensor + " at token " + std::to_string(r) + ", column " + std::to_string(c) + msg +
                                  in_component(component)};
  }
  return {};
}

// Same over the first `cols` columns of a row, or over the listed columns when `ids` is not empty.
template <class T>
status check_scaled_row(const T* row, index_t cols, std::span<const std::int32_t> ids, float inv_temp,
                        double temperature, index_t r, const char* tensor, std::string_view component) {
  if (ids.empty()) {
    for (index_t c = 0; c < cols; ++c) KD_TRY(check_scaled_logit(row[c], inv_temp, temperature, tensor, r, c, component));
  } else {
    for (const auto c : ids) KD_TRY(check_scaled_logit(row[c], inv_temp, temperature, tensor, r, c, component));
  }
  return {};
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

// The sum of an Eigen array expression accumulated in double, returned in its own scalar type: the CPU
// reference sums every row / vocabulary-length reduction this way (it is what the other backends are
// checked against; term-by-term float sums drift by ~1e-5 relative at V = 50k).
template <class E>
auto sum_in_double(const E& e) {
  return static_cast<typename E::Scalar>(e.template cast<double>().sum());
}

// Writes v (already scaled) into a gradient slot, honouring accumulate_grad.
template <class T, class A>
void put_grad(T& slot, A v, bool accumulate) {
  if (accumulate) v += load_as<A>(slot);
  slot = store_as<T>(v);
}

}  // namespace detail
}  // namespace kd
