// kd/loss/moe.hpp: Mixture-of-Experts router losses and expert-utilization statistics.
//
// Switch load balance (Fedus et al.):  L = coefficient * E * sum_i f_i P_i,
//   f_i = tokens routed to expert i / (k * T)   (non-differentiable counts over the top-k choices)
//   P_i = mean over tokens of softmax(router logits)_i.
// At perfect balance (f_i = P_i = 1/E) L equals the coefficient, whatever E and k; a collapsed router
// (every token to one expert with probability 1) gives coefficient * E. The seed run weighted this term
// at 1e-4 and watched its experts collapse; the default here is 1e-2 and utilization is reported.
// dL/dlogit_{t,j} = q_tj (c_j - sum_i q_ti c_i),  c_j = coefficient * E * f_j / T.
// Router z-loss (ST-MoE): coefficient * mean_t logsumexp(logits_t)^2, default coefficient 1e-3.
#pragma once

#include <algorithm>
#include <cmath>
#include <string>
#include <vector>

#include <Eigen/Core>

#include <kd/loss/common.hpp>
#include <kd/policy/backend.hpp>
#include <kd/policy/precision.hpp>

namespace kd {

struct router_options {
  double coefficient = 1e-2;
  double grad_scale = 1.0;
  bool accumulate_grad = false;
  std::string_view component = "load_balance";
};

namespace detail {

// The router checks split in two: the shape and option half reads no tensor memory (a device backend,
// kd/loss/moe.cuh, runs it on device pointers and checks the values in its kernels); validate_router
// and validate_expert_ids add the value checks of the CPU reference.
template <class LT, class GT>
status validate_router_shape(const matrix_view<LT>& logits, const matrix_view<GT>& dlogits, const router_options& o) {
  const std::string ic = in_component(o.component);
  KD_TRY(validate_view(logits, "router logits"));
  if (logits.empty()) return {errc::empty_input, "router logits are empty" + ic};
  if (!std::isfinite(o.coefficient) || o.coefficient < 0)
    return {errc::invalid_argument, "coefficient must be finite and >= 0" + ic};
  if (!dlogits.empty()) {
    KD_TRY(validate_view(dlogits, "router gradient"));
    KD_TRY(same_shape(dlogits, "router gradient", logits, "router logits"));
  }
  return {};
}

template <class LT, class GT>
status validate_router(const matrix_view<LT>& logits, const matrix_view<GT>& dlogits, const router_options& o) {
  KD_TRY(validate_router_shape(logits, dlogits, o));
  KD_TRY(check_finite(logits, "router logits", o.component));
  return {};
}

inline status validate_expert_ids_shape(const matrix_view<const std::int32_t>& ids, index_t tokens, index_t experts,
                                        std::string_view component) {
  const std::string ic = in_component(component);
  KD_TRY(validate_view(ids, "expert ids"));
  if (ids.rows != tokens)
    return {errc::shape_mismatch, "expert ids cover " + std::to_string(ids.rows) + " tokens but the router logits " +
                                      std::to_string(tokens) + ic};
  if (ids.cols <= 0 || ids.cols > experts)
    return {errc::invalid_argument, "top-k " + std::to_string(ids.cols) + " must lie in [1, " + std::to_string(experts) +
                                        "]" + ic};
  return {};
}

inline status validate_expert_ids(const matrix_view<const std::int32_t>& ids, index_t tokens, index_t experts,
                                  std::string_view component) {
  KD_TRY(validate_expert_ids_shape(ids, tokens, experts, component));
  for (index_t t = 0; t < ids.rows; ++t)
    for (index_t j = 0; j < ids.cols; ++j) {
      const auto e = ids(t, j);
      if (e < 0 || e >= experts)
        return {errc::out_of_range, "expert id " + std::to_string(e) + " at token " + std::to_string(t) +
                                        " is outside [0, " + std::to_string(experts) + ")" + in_component(component)};
    }
  return {};
}

}  // namespace detail

struct load_balance_tag {};
struct router_z_tag {};

template <class P = fp32>
struct load_balance_loss {
  static_assert(Precision<P>, "kd: load_balance_loss's parameter must be a precision policy such as kd::fp32.");
  using precision_policy = P;
  router_options options;

  // router_logits: [T x E]; expert_ids: [T x k], the experts each token was routed to. `out` is the
  // backend's result type: kd::loss_result on the CPU, kd::cuda::device_loss on the GPU.
  template <class Backend, class LT, class Out, class GT>
  status operator()(const Backend& backend, matrix_view<LT> router_logits, matrix_view<const std::int32_t> expert_ids,
                    Out& out, matrix_view<GT> dlogits) const {
    KD_CHECK_STUDENT_DTYPE(P, LT);
    KD_CHECK_GRAD_DTYPE(P, GT);
    return detail::with_component(
        loss_impl<Backend, load_balance_tag>::run(backend, *this, as_const(router_logits), expert_ids, out, dlogits),
        detail::component_or(options, "load_balance"));
  }
  template <class Backend, class LT, class Out>
  status operator()(const Backend& backend, matrix_view<LT> router_logits, matrix_view<const std::int32_t> expert_ids,
                    Out& out) const {
    return (*this)(backend, router_logits, expert_ids, out, matrix_view<typename P::storage_type>{});
  }
};

template <class P = fp32>
struct router_z_loss {
  static_assert(Precision<P>, "kd: router_z_loss's parameter must be a precision policy such as kd::fp32.");
  using precision_policy = P;
  router_options options{1e-3, 1.0, false, "router_z"};

  template <class Backend, class LT, class Out, class GT>
  status operator()(const Backend& backend, matrix_view<LT> router_logits, Out& out,
                    matrix_view<GT> dlogits) const {
    KD_CHECK_STUDENT_DTYPE(P, LT);
    KD_CHECK_GRAD_DTYPE(P, GT);
    return detail::with_component(loss_impl<Backend, router_z_tag>::run(backend, *this, as_const(router_logits), out, dlogits),
                                  detail::component_or(options, "router_z"));
  }
  template <class Backend, class LT, class Out>
  status operator()(const Backend& backend, matrix_view<LT> router_logits, Out& out) const {
    return (*this)(backend, router_logits, out, matrix_view<typename P::storage_type>{});
  }
};

template <>
struct loss_impl<cpu_backend, load_balance_tag> {
  template <class Loss, class LT, class GT>
  static status run(const cpu_backend&, const Loss& loss, matrix_view<const LT> logits,
                    matrix_view<const std::int32_t> ids, loss_result& out, matrix_view<GT> dlogits) {
    using A = typename Loss::precision_policy::accum_type;
    using Mat = Eigen::Array<A, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
    const auto& o = loss.options;
    KD_TRY(detail::validate_router(logits, dlogits, o));
    const index_t t_count = logits.rows, e_count = logits.cols;
    KD_TRY(detail::validate_expert_ids(ids, t_count, e_count, o.component));
    Mat q(t_count, e_count);
    for (index_t t = 0; t < t_count; ++t) {
      for (index_t e = 0; e < e_count; ++e) q(t, e) = load_as<A>(logits(t, e));
      const A m = q.row(t).maxCoeff();
      q.row(t) = (q.row(t) - m).exp();
      q.row(t) /= detail::sum_in_double(q.row(t));
    }
    Eigen::Array<A, 1, Eigen::Dynamic> f = Eigen::Array<A, 1, Eigen::Dynamic>::Zero(e_count);
    for (index_t t = 0; t < t_count; ++t)
      for (index_t j = 0; j < ids.cols; ++j) f[ids(t, j)] += A(1);
    f /= static_cast<A>(ids.cols * t_count);
    // Token and expert sums in double (the reference the CUDA kernels are checked against).
    const Eigen::Array<A, 1, Eigen::Dynamic> p_mean =
        (q.template cast<double>().colwise().sum() / static_cast<double>(t_count)).template cast<A>();
    const A coef = static_cast<A>(o.coefficient) * static_cast<A>(e_count);
    out.loss = static_cast<double>(coef) * (f * p_mean).template cast<double>().sum();
    out.tokens = t_count;
    out.normalizer = static_cast<double>(t_count);
    if (!dlogits.empty()) {
      const Eigen::Array<A, 1, Eigen::Dynamic> c = coef * f / static_cast<A>(t_count);
      for (index_t t = 0; t < t_count; ++t) {
        const A dot = detail::sum_in_double(q.row(t) * c);
        for (index_t e = 0; e < e_count; ++e)
          detail::put_grad(dlogits(t, e), static_cast<A>(o.grad_scale) * q(t, e) * (c[e] - dot), o.accumulate_grad);
      }
    }
    return {};
  }
};

template <>
struct loss_impl<cpu_backend, router_z_tag> {
  template <class Loss, class LT, class GT>
  static status run(const cpu_backend&, const Loss& loss, matrix_view<const LT> logits, loss_result& out,
                    matrix_view<GT> dlogits) {
    using A = typename Loss::precision_policy::accum_type;
    using Arr = Eigen::Array<A, Eigen::Dynamic, 1>;
    const auto& o = loss.options;
    KD_TRY(detail::validate_router(logits, dlogits, o));
    const index_t t_count = logits.rows, e_count = logits.cols;
    const A coef = static_cast<A>(o.coefficient);
    Arr z(e_count);
    double total = 0.0;  // row and token sums in double: the reference
    for (index_t t = 0; t < t_count; ++t) {
      for (index_t e = 0; e < e_count; ++e) z[e] = load_as<A>(logits(t, e));
      const A m = z.maxCoeff();
      const A lse = m + static_cast<A>(std::log((z - m).exp().template cast<double>().sum()));
      total += static_cast<double>(lse) * static_cast<double>(lse);
      if (dlogits.empty()) continue;
      const A scale = static_cast<A>(o.grad_scale) * coef * A(2) * lse / static_cast<A>(t_count);
      for (index_t e = 0; e < e_count; ++e)
        detail::put_grad(dlogits(t, e), scale * std::exp(z[e] - lse), o.accumulate_grad);
    }
    out.loss = static_cast<double>(coef) * total / static_cast<double>(t_count);
    out.tokens = t_count;
    out.normalizer = static_cast<double>(t_count);
    return {};
  }
};

// Expert utilization from routing decisions: what a trainer logs to catch collapse early.
struct expert_utilization {
  std::vector<double> fraction;    // share of routed slots per expert (sums to 1)
  double entropy = 0.0;            // nats
  double normalized_entropy = 0.0; // entropy / log(E): 1 = uniform, 0 = one expert
  double max_fraction = 0.0;
  index_t unused_experts = 0;      // experts that received no token
  bool collapsed = false;          // normalized_entropy below the threshold
};

inline status compute_expert_utilization(matrix_view<const std::int32_t> expert_ids, index_t experts,
                                         expert_utilization& out, double collapse_threshold = 0.5) {
  if (experts <= 0) return {errc::invalid_argument, "expert count must be positive"};
  if (expert_ids.empty()) return {errc::empty_input, "expert ids are empty"};
  KD_TRY(detail::validate_expert_ids(expert_ids, expert_ids.rows, experts, "expert_utilization"));
  expert_utilization u;
  u.fraction.assign(static_cast<std::size_t>(experts), 0.0);
  for (index_t t = 0; t < expert_ids.rows; ++t)
    for (index_t j = 0; j < expert_ids.cols; ++j) u.fraction[static_cast<std::size_t>(expert_ids(t, j))] += 1.0;
  const double total = static_cast<double>(expert_ids.rows * expert_ids.cols);
  for (auto& f : u.fraction) {
    f /= total;
    if (f > 0) u.entropy -= f * std::log(f);
    else ++u.unused_experts;
    u.max_fraction = std::max(u.max_fraction, f);
  }
  u.normalized_entropy = experts > 1 ? u.entropy / std::log(static_cast<double>(experts)) : 1.0;
  u.collapsed = u.normalized_entropy < collapse_threshold;
  out = std::move(u);
  return {};
}

}  // namespace kd
