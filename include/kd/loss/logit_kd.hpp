// kd/loss/logit_kd.hpp: logit distillation (teacher logits -> student logits) with temperature.
//
// loss = T^2 * sum_tokens D(p_t, q_t) / normalizer   (T^2 after Hinton, so gradient size does not
// shrink as T grows; disable with scale_by_t2 = false), p = softmax(teacher / T), q = softmax(student / T).
// dL/dstudent = T * dD/dz / normalizer (dD/dz from kd/loss/divergence.hpp), times grad_scale.
//
// Vocabularies: without a vocab_map both sides share one vocabulary; only the first `vocab` columns
// are real tokens (the rest is embedding padding: excluded from both softmaxes, gradient 0). With a
// vocab_map, p is the teacher's probability mapped onto the student ids (renormalized over the map's
// support) and q is the student softmax over that same support: both distributions live on the tokens
// the two tokenizers share, and student logits off the support get gradient 0.
// Tokens whose label equals ignore_index are skipped (loss 0, gradient 0) and not counted.
#pragma once

#include <algorithm>
#include <cmath>
#include <limits>
#include <span>
#include <string>
#include <vector>

#include <Eigen/Core>

#include <kd/core/parallel.hpp>

#include <kd/loss/common.hpp>
#include <kd/loss/divergence.hpp>
#include <kd/policy/backend.hpp>
#include <kd/policy/normalization.hpp>
#include <kd/policy/precision.hpp>
#include <kd/loss/vocab_map.hpp>

namespace kd {

struct logit_kd_options : token_options {
  double temperature = 1.0;
  double beta = 0.5;         // jsd only
  double alpha = 0.1;        // skew_kl only
  bool scale_by_t2 = true;
  index_t vocab = 0;         // real tokens when both sides share a vocabulary (0 = every column)
  const vocab_map* map = nullptr;  // teacher -> student vocabulary map; null = shared vocabulary
};

struct logit_kd_tag {};

// Logit distillation with divergence D, token reduction R and precisions P (teacher, student).
template <class D, class R = token_mean, class P = precision_set<fp32, fp32>>
struct logit_kd {
  static_assert(PrecisionSet<P>, "kd: logit_kd's third parameter must be a kd::precision_set<Teacher, Student>.");
  using divergence = D;
  using reduction = R;
  using precisions = P;
  using teacher_storage = typename P::teacher::storage_type;
  using student_storage = typename P::student::storage_type;
  static constexpr divergence_traits<D> divergence_info{};
  static constexpr token_reduction_traits<R> reduction_info{};

  logit_kd_options options;

  // Forward and backward: writes dL/dstudent into dstudent (same shape as student). `out` is the
  // backend's result type: kd::loss_result on the CPU, kd::cuda::device_loss on the GPU.
  template <class Backend, class TT, class ST, class Out, class GT>
  status operator()(const Backend& backend, matrix_view<TT> teacher, matrix_view<ST> student,
                    std::span<const std::int32_t> labels, Out& out, matrix_view<GT> dstudent) const {
    KD_CHECK_TEACHER_DTYPE(P::teacher, TT);
    KD_CHECK_STUDENT_DTYPE(P::student, ST);
    KD_CHECK_GRAD_DTYPE(P::student, GT);
    static_assert(!std::is_const_v<GT>, "kd: the gradient tensor must be writable.");
    return detail::with_component(loss_impl<Backend, logit_kd_tag>::run(backend, *this, as_const(teacher),
                                                                         as_const(student), labels, out, dstudent, true),
                                  detail::component_or(options, "kd"));
  }

  // Forward only.
  template <class Backend, class TT, class ST, class Out>
  status operator()(const Backend& backend, matrix_view<TT> teacher, matrix_view<ST> student,
                    std::span<const std::int32_t> labels, Out& out) const {
    KD_CHECK_TEACHER_DTYPE(P::teacher, TT);
    KD_CHECK_STUDENT_DTYPE(P::student, ST);
    return detail::with_component(
        loss_impl<Backend, logit_kd_tag>::run(backend, *this, as_const(teacher), as_const(student), labels, out,
                                              matrix_view<student_storage>{}, false),
        detail::component_or(options, "kd"));
  }
};

namespace detail {

// What validation hands both backends: the support the two distributions live on, the label
// vocabulary, and the temperature / divisor conventions.
struct logit_kd_plan {
  index_t support = 0;      // K: the first `vocab` columns (shared vocabulary) or the map's support slots
  index_t label_vocab = 0;  // labels must lie in [0, label_vocab)
  kd_scaling scaling;
};

// The one validation of a logit_kd call (shapes, parameters, labels, map), shared by every backend.
// Label values are read only when `labels_on_host` (the CUDA kernel checks device labels itself).
template <class Loss, class TT, class ST, class GT>
status validate_logit_kd(const Loss& loss, const matrix_view<TT>& teacher, const matrix_view<ST>& student,
                         std::span<const std::int32_t> labels, bool labels_on_host, const matrix_view<GT>& dstudent,
                         bool want_grad, logit_kd_plan& plan) {
  const auto& o = loss.options;
  KD_TRY(validate_view(teacher, "teacher logits"));
  KD_TRY(validate_view(student, "student logits"));
  if (student.rows == 0 || student.cols == 0) return {errc::empty_input, "student logits are empty"};
  if (teacher.rows != student.rows)
    return {errc::shape_mismatch, "teacher logits have " + std::to_string(teacher.rows) +
                                      " tokens but student logits have " + std::to_string(student.rows)};
  if (!(o.temperature > 0.0) || !std::isfinite(o.temperature))
    return {errc::invalid_argument, "temperature must be > 0, got " + std::to_string(o.temperature)};
  if (Loss::divergence_info.uses_beta && !(o.beta >= 0.0 && o.beta <= 1.0))
    return {errc::invalid_argument, "jsd beta must lie in [0, 1], got " + std::to_string(o.beta)};
  if (Loss::divergence_info.uses_alpha && !(o.alpha >= 0.0 && o.alpha <= 1.0))
    return {errc::invalid_argument, "skew_kl alpha must lie in [0, 1], got " + std::to_string(o.alpha)};
  plan.label_vocab = student.cols;
  if (o.map != nullptr) {
    KD_TRY(o.map->check_fits(teacher.cols, student.cols));
    plan.support = static_cast<index_t>(o.map->student_support().size());
  } else {
    if (teacher.cols != student.cols)
      return {errc::shape_mismatch, "teacher logits have " + std::to_string(teacher.cols) +
                                        " columns but student logits have " + std::to_string(student.cols) +
                                        "; pass a vocab_map to distill across vocabularies"};
    if (o.vocab < 0 || o.vocab > student.cols)
      return {errc::out_of_range, "vocab " + std::to_string(o.vocab) + " exceeds the " +
                                      std::to_string(student.cols) + " logit columns"};
    if (o.vocab > 0) plan.label_vocab = o.vocab;
    plan.support = plan.label_vocab;
  }
  if (want_grad) {
    KD_TRY(validate_view(dstudent, "student gradient"));
    KD_TRY(same_shape(dstudent, "student gradient", student, "student logits"));
  }
  token_options named = o;
  named.component = component_or(o, "kd");
  KD_TRY(check_labels(labels, student.rows, plan.label_vocab, named, labels_on_host));
  // Device labels cannot be counted here; global_tokens is then checked for sign only.
  KD_TRY(check_token_options(named, labels_on_host ? count_active(labels, student.rows, o.ignore_index) : 0));
  plan.scaling = make_kd_scaling<Loss::reduction_info.mean>(o, o.temperature, o.scale_by_t2);
  return {};
}

// The divergence's math in accumulation type A, with the loss's parameter (jsd's beta, skew_kl's alpha).
template <class A, class Loss>
divergence_math<typename Loss::divergence, A> divergence_math_for(const Loss& loss) {
  divergence_math<typename Loss::divergence, A> math;
  if constexpr (Loss::divergence_info.uses_beta) math.param = static_cast<A>(loss.options.beta);
  if constexpr (Loss::divergence_info.uses_alpha) math.param = static_cast<A>(loss.options.alpha);
  return math;
}

}  // namespace detail

// CPU reference.
template <>
struct loss_impl<cpu_backend, logit_kd_tag> {
  template <class Loss, class TT, class ST, class GT>
  static status run(const cpu_backend&, const Loss& loss, matrix_view<const TT> teacher, matrix_view<const ST> student,
                    std::span<const std::int32_t> labels, loss_result& out, matrix_view<GT> dstudent, bool want_grad) {
    using A = detail::common_accum_for<typename Loss::precisions>;
    using Vec = Eigen::Array<A, Eigen::Dynamic, 1>;
    using D = typename Loss::divergence;
    const auto& o = loss.options;
    const auto comp = detail::component_or(o, "kd");
    detail::logit_kd_plan plan;
    KD_TRY(detail::validate_logit_kd(loss, teacher, student, labels, true, dstudent, want_grad, plan));

    const index_t n = student.rows;
    const vocab_map* map = o.map;
    // Columns the two distributions live on: student ids (support) and the teacher columns read.
    std::vector<std::int32_t> support;
    if (map == nullptr) {
      support.resize(static_cast<std::size_t>(plan.support));
      for (index_t j = 0; j < plan.support; ++j) support[static_cast<std::size_t>(j)] = static_cast<std::int32_t>(j);
    } else {
      support.assign(map->student_support().begin(), map->student_support().end());
    }
    const index_t k = plan.support;
    // Without a map the teacher's first k columns are read; with one, only the mapped teacher ids (padded
    // and unmapped teacher columns are never read: a huge or non-finite logit there must not matter).
    const index_t teacher_read = map == nullptr ? k : map->size();
    // Position of each student id inside the support (for scattering mapped teacher mass).
    std::vector<std::int32_t> slot;
    if (map != nullptr) {
      slot.assign(static_cast<std::size_t>(student.cols), -1);
      for (index_t j = 0; j < k; ++j) slot[static_cast<std::size_t>(support[static_cast<std::size_t>(j)])] = static_cast<std::int32_t>(j);
    }

    const detail::kd_scaling& sc = plan.scaling;
    const A temp = static_cast<A>(sc.temperature);
    const index_t active = detail::count_active(labels, n, o.ignore_index);
    const double divisor = sc.divisor_for(active);
    const A grad_factor = static_cast<A>(sc.grad_factor(active));
    const auto math = detail::divergence_math_for<A>(loss);
    // Row sums are accumulated in double whatever A is: this is the reference the other backends are
    // checked against, and float term-by-term sums drift by ~1e-5 relative at V = 50k.
    // lse(x): the log-sum-exp in A with what A's rounding added to it (detail::split_lse; 0 for A =
    // double, so the fp64 reference is untouched). A float log-normalizer rounded at the size of the
    // logits was most of the float error of the value and of the gradient for close p and q (value
    // 1.6e-6 to 2.3e-5, gradient 1.5e-6 to 2.5e-5 relative at V = 50,304, logits 0-400 from zero): p and
    // q are scaled back per row and the value takes its shift back (divergence_math::log_shift).
    auto lse = [](const Vec& x) {
      const A mx = x.maxCoeff();
      return detail::split_lse<A>::of(mx, std::log((x - mx).exp().template cast<double>().sum()));
    };
    // Only the columns the two distributions live on are read (and checked): never the padding.
    const std::span<const std::int32_t> teacher_cols =
        map == nullptr ? std::span<const std::int32_t>{} : map->teacher_ids();
    const std::span<const std::int32_t> student_cols =
        map == nullptr ? std::span<const std::int32_t>{} : std::span<const std::int32_t>(support);

    // Every active row is checked before any gradient is written: the gradient may be the student
    // logits themselves (in place), and a rejected call must leave its inputs as they were.
    for (index_t r = 0; r < n; ++r) {
      if (!detail::token_active(labels, r, o.ignore_index)) continue;
      KD_TRY(detail::check_scaled_row(teacher.row(r), map == nullptr ? k : 0, teacher_cols, sc.inv_temp,
                                      sc.temperature, r, "teacher logits", comp));
      KD_TRY(detail::check_scaled_row(student.row(r), map == nullptr ? k : 0, student_cols, sc.inv_temp,
                                      sc.temperature, r, "student logits", comp));
    }
    // Rows are independent: blocks of rows on threads, each row's loss kept and summed in row order.
    std::vector<double> row_total(static_cast<std::size_t>(n), 0.0);
    const double work = 30.0 * static_cast<double>(n) * static_cast<double>(teacher_read + 2 * k);
    parallel_blocks(n, work, [&](std::int64_t r0, std::int64_t r1) {
      Vec tz(teacher_read), logp(k), logq(k), p(k), q(k), g(k);
      for (index_t r = static_cast<index_t>(r0); r < r1; ++r) {
        const bool active_row = detail::token_active(labels, r, o.ignore_index);
        if (!active_row) {
          if (want_grad && !o.accumulate_grad)
            for (index_t c = 0; c < student.cols; ++c) dstudent(r, c) = store_as<GT>(A(0));
          continue;
        }
        // Teacher log-probabilities over the support. With a map, tz[e] is the scaled logit of the e-th
        // mapped teacher id, so the teacher's log-sum-exp runs over mapped columns only.
        if (map == nullptr) {
          for (index_t c = 0; c < teacher_read; ++c) tz[c] = load_as<A>(teacher(r, c)) / temp;
        } else {
          const auto tids = map->teacher_ids();
          for (index_t e = 0; e < teacher_read; ++e) tz[e] = load_as<A>(teacher(r, tids[static_cast<std::size_t>(e)])) / temp;
        }
        detail::split_lse<A> tlse = lse(tz);
        if (map == nullptr) {
          logp = tz - tlse.value;
        } else {
          // log of summed mass per student id, then renormalize over the support (log-sum-exp throughout).
          logp.setConstant(-std::numeric_limits<A>::infinity());
          const auto sids = map->student_ids();
          for (std::size_t e = 0; e < sids.size(); ++e) {
            const auto j = slot[static_cast<std::size_t>(sids[e])];
            const A lp = tz[static_cast<index_t>(e)] - tlse.value;
            const A hi = std::max(logp[j], lp);
            logp[j] = hi + std::log(std::exp(logp[j] - hi) + std::exp(lp - hi));
          }
          tlse = lse(logp);  // the first lse's rounding cancels in this renormalization
          logp -= tlse.value;
        }
        p = logp.exp() * tlse.scale;
        // Student log-probabilities over the support.
        for (index_t j = 0; j < k; ++j) logq[j] = load_as<A>(student(r, support[static_cast<std::size_t>(j)])) / temp;
        const auto slse = lse(logq);
        logq -= slse.value;
        q = logq.exp() * slse.scale;

        double row_loss = 0.0;
        for (index_t j = 0; j < k; ++j) row_loss += static_cast<double>(math.term(p[j], logp[j], q[j], logq[j]));
        row_loss += math.log_shift(tlse.excess, slse.excess);
        row_total[static_cast<std::size_t>(r)] = row_loss;
        if (!want_grad) continue;
        if constexpr (std::is_same_v<D, forward_kl>) {
          g = q - p;
        } else {
          for (index_t j = 0; j < k; ++j) g[j] = math.dq(p[j], logp[j], q[j], logq[j]);
          const A c = detail::sum_in_double(q * g);
          g = q * (g - c);
        }
        if (!o.accumulate_grad)
          for (index_t c = 0; c < student.cols; ++c) dstudent(r, c) = store_as<GT>(A(0));
        for (index_t j = 0; j < k; ++j)
          detail::put_grad(dstudent(r, support[static_cast<std::size_t>(j)]), grad_factor * g[j], o.accumulate_grad);
      }
    });
    double total = 0.0;
    for (double t : row_total) total += t;
    out.tokens = active;
    out.normalizer = divisor;
    out.loss = total * sc.loss_scale / divisor;
    if (!std::isfinite(out.loss)) return {errc::non_finite, "the loss is not finite"};
    return {};
  }
};

}  // namespace kd
