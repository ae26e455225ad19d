// kd/loss/cross_entropy.hpp: hard-label cross-entropy (the LM loss) and z-loss, in one pass.
//
//   ce     = sum_{tokens not ignored} (logsumexp(s) - s[label]) / normalizer
//   z_loss = sum_{tokens not ignored} logsumexp(s)^2 / normalizer     (PaLM / ST-MoE; weight ~1e-4)
//   dL/ds  = (grad_scale * (softmax(s) - onehot(label)) + z_loss_weight * 2 logsumexp(s) softmax(s)) / normalizer
// grad_scale weights the cross-entropy (the "lm" component's weight) and z_loss_weight is the z-loss's
// own absolute weight, so an objective can weight, or switch off, each independently.
// Only the first `vocab` columns are real tokens; padded columns are excluded from the softmax and get
// gradient 0. The LM loss is always computed: a trainer reports it every logged step.
#pragma once

#include <cmath>
#include <span>
#include <string>
#include <vector>

#include <Eigen/Core>

#include <kd/core/parallel.hpp>

#include <kd/loss/common.hpp>
#include <kd/policy/backend.hpp>
#include <kd/policy/normalization.hpp>
#include <kd/policy/precision.hpp>

namespace kd {

struct cross_entropy_options : token_options {
  index_t vocab = 0;        // real tokens (0 = every column)
  double z_loss_weight = 0; // absolute weight of the z-loss in the gradient (its value is reported either way)
};

struct cross_entropy_result {
  double ce = 0.0;       // reduced cross-entropy (nats per token under token_mean)
  double z_loss = 0.0;   // reduced mean logsumexp^2, unweighted
  index_t tokens = 0;
  double normalizer = 1.0;
};

struct cross_entropy_tag {};

template <class R = token_mean, class P = fp32>
struct cross_entropy {
  static_assert(Precision<P>, "kd: cross_entropy's second parameter must be a precision policy such as kd::bf16.");
  using reduction = R;
  using precision_policy = P;
  using storage = typename P::storage_type;
  static constexpr token_reduction_traits<R> reduction_info{};

  cross_entropy_options options;

  // `out` is the backend's result type: kd::cross_entropy_result on the CPU,
  // kd::cuda::device_cross_entropy on the GPU.
  template <class Backend, class ST, class Out, class GT>
  status operator()(const Backend& backend, matrix_view<ST> logits, std::span<const std::int32_t> labels,
                    Out& out, matrix_view<GT> dlogits) const {
    KD_CHECK_STUDENT_DTYPE(P, ST);
    KD_CHECK_GRAD_DTYPE(P, GT);
    static_assert(!std::is_const_v<GT>, "kd: the gradient tensor must be writable.");
    return detail::with_component(
        loss_impl<Backend, cross_entropy_tag>::run(backend, *this, as_const(logits), labels, out, dlogits, true),
        detail::component_or(options, "lm"));
  }
  template <class Backend, class ST, class Out>
  status operator()(const Backend& backend, matrix_view<ST> logits, std::span<const std::int32_t> labels,
                    Out& out) const {
    KD_CHECK_STUDENT_DTYPE(P, ST);
    return detail::with_component(loss_impl<Backend, cross_entropy_tag>::run(backend, *this, as_const(logits), labels,
                                                                              out, matrix_view<storage>{}, false),
                                  detail::component_or(options, "lm"));
  }
};

namespace detail {
// The shapes and weights of a cross_entropy call (also of a vocabulary-parallel one, whose logits are a
// column slice): views, one label per row, the z-loss weight, the gradient's shape.
template <class Loss, class ST, class GT>
status validate_cross_entropy_shapes(const Loss& loss, const matrix_view<ST>& logits, std::span<const std::int32_t> labels,
                                     const matrix_view<GT>& dlogits, bool want_grad) {
  const auto& o = loss.options;
  KD_TRY(validate_view(logits, "logits"));
  if (logits.rows == 0 || logits.cols == 0) return {errc::empty_input, "logits are empty"};
  if (static_cast<index_t>(labels.size()) != logits.rows)
    return {errc::shape_mismatch, "cross-entropy needs one label per token: " + std::to_string(labels.size()) +
                                      " labels for " + std::to_string(logits.rows) + " rows"};
  if (!std::isfinite(o.z_loss_weight) || o.z_loss_weight < 0)
    return {errc::invalid_argument, "z_loss_weight must be finite and >= 0"};
  if (want_grad) {
    KD_TRY(validate_view(dlogits, "logit gradient"));
    KD_TRY(same_shape(dlogits, "logit gradient", logits, "logits"));
  }
  return {};
}

// The one validation of a cross_entropy call, shared by both backends. Label values are read only
// when `labels_on_host` (the CUDA kernel checks device labels itself). Returns the label vocabulary.
template <class Loss, class ST, class GT>
status validate_cross_entropy(const Loss& loss, const matrix_view<ST>& logits, std::span<const std::int32_t> labels,
                              bool labels_on_host, const matrix_view<GT>& dlogits, bool want_grad, index_t& vocab) {
  const auto& o = loss.options;
  token_options named = o;
  named.component = component_or(o, "lm");
  KD_TRY(validate_cross_entropy_shapes(loss, logits, labels, dlogits, want_grad));
  if (o.vocab < 0 || o.vocab > logits.cols)
    return {errc::out_of_range, "vocab " + std::to_string(o.vocab) + " exceeds the " + std::to_string(logits.cols) +
                                    " logit columns"};
  vocab = o.vocab > 0 ? o.vocab : logits.cols;
  KD_TRY(check_labels(labels, logits.rows, vocab, named, labels_on_host));
  KD_TRY(check_token_options(named, labels_on_host ? count_active(labels, logits.rows, o.ignore_index) : 0));
  return {};
}
}  // namespace detail

template <>
struct loss_impl<cpu_backend, cross_entropy_tag> {
  template <class Loss, class ST, class GT>
  static status run(const cpu_backend&, const Loss& loss, matrix_view<const ST> logits,
                    std::span<const std::int32_t> labels, cross_entropy_result& out, matrix_view<GT> dlogits,
                    bool want_grad) {
    using A = typename Loss::precision_policy::accum_type;
    using Vec = Eigen::Array<A, Eigen::Dynamic, 1>;
    const auto& o = loss.options;
    const auto comp = detail::component_or(o, "lm");
    index_t v = 0;
    KD_TRY(detail::validate_cross_entropy(loss, logits, labels, true, dlogits, want_grad, v));
    const index_t n = logits.rows;
    const index_t active = detail::count_active(labels, n, o.ignore_index);
    const double divisor = detail::token_divisor<Loss::reduction_info.mean>(o, active);
    const A gscale = static_cast<A>(o.grad_scale / divisor);
    const A zw = static_cast<A>(o.z_loss_weight / divisor);
    // Every row is checked before any gradient is written: the gradient may be the logits buffer
    // itself (in place), and a rejected call must leave its inputs as they were.
    for (index_t r = 0; r < n; ++r)
      if (detail::token_active(labels, r, o.ignore_index))
        KD_TRY(detail::check_row_finite(logits.row(r), v, r, "logits", comp));
    // Rows are independent: blocks of rows run on threads (kd/core/parallel.hpp), each row's terms kept
    // and summed in row order afterwards, so the result does not depend on the thread count.
    std::vector<double> row_ce(static_cast<std::size_t>(n), 0.0), row_z(static_cast<std::size_t>(n), 0.0);
    parallel_blocks(n, 40.0 * static_cast<double>(n) * static_cast<double>(v), [&](std::int64_t r0, std::int64_t r1) {
      Vec s(v);
      for (index_t r = static_cast<index_t>(r0); r < r1; ++r) {
        const bool act = detail::token_active(labels, r, o.ignore_index);
        if (act)  // read the row before its gradient overwrites it (in place)
          for (index_t c = 0; c < v; ++c) s[c] = load_as<A>(logits(r, c));
        if (want_grad && !o.accumulate_grad)
          for (index_t c = 0; c < logits.cols; ++c) dlogits(r, c) = store_as<GT>(A(0));
        if (!act) continue;
        const A m = s.maxCoeff();
        // The lse in A and what A's rounding added to it (0 in double), taken back from the value and
        // from softmax's scale (kd::detail::split_lse).
        const auto lse = detail::split_lse<A>::of(m, std::log((s - m).exp().template cast<double>().sum()));
        const double lse_d = static_cast<double>(lse.value) - lse.excess;
        const auto y = labels[static_cast<std::size_t>(r)];
        row_ce[static_cast<std::size_t>(r)] = static_cast<double>(lse.value - s[y]) - lse.excess;
        row_z[static_cast<std::size_t>(r)] = lse_d * lse_d;
        if (!want_grad) continue;
        const A zfac = (gscale + zw * A(2) * lse.value) * lse.scale;  // coefficient of exp(s - lse.value)
        for (index_t c = 0; c < v; ++c) {
          const A g = std::exp(s[c] - lse.value) * zfac - (c == y ? gscale : A(0));
          detail::put_grad(dlogits(r, c), g, o.accumulate_grad);
        }
      }
    });
    double ce = 0.0, z = 0.0;  // the reference: row sums and the token sum in double
    for (index_t r = 0; r < n; ++r) {
      ce += row_ce[static_cast<std::size_t>(r)];
      z += row_z[static_cast<std::size_t>(r)];
    }
    out.tokens = active;
    out.normalizer = divisor;
    out.ce = ce / divisor;
    out.z_loss = z / divisor;
    if (!std::isfinite(out.ce) || !std::isfinite(out.z_loss)) return {errc::non_finite, "the loss is not finite"};
    return {};
  }
};

}  // namespace kd
