// kd/loss/linear_kd.hpp: student LM head + logit distillation, without materializing N x V logits.
//
// logits = hidden W^T (hidden [N x d], W [V x d], the student's LM head); the loss is logit_kd on those
// logits against the teacher's logits, so every convention of kd/loss/logit_kd.hpp holds (temperature,
// T^2, vocab map, padding, ignore_index, token reduction). Gradients: dhidden = dlogits W and
// dW = dlogits^T hidden. Backends process `chunk_rows` tokens at a time, so the extra memory is
// chunk_rows x V logits instead of N x V (the CUDA backend runs the three products through cuBLAS).
// The CPU reference here computes the logits in the accumulation type, chunk by chunk.
#pragma once

#include <span>
#include <string>

#include <Eigen/Core>

#include <kd/loss/logit_kd.hpp>

namespace kd {

struct linear_kd_options : logit_kd_options {
  index_t chunk_rows = 2048;  // tokens per chunk (bounds the extra memory to chunk_rows x V)
};

struct linear_kd_tag {};

// D, R as in logit_kd; P = precision_set<teacher logits, student hidden, LM-head weight>.
template <class D, class R = token_mean, class P = precision_set<fp32, fp32, fp32>>
struct linear_logit_kd {
  static_assert(PrecisionSet<P>, "kd: linear_logit_kd's third parameter must be a kd::precision_set<Teacher, Student, Head>.");
  using divergence = D;
  using reduction = R;
  using precisions = P;
  static constexpr divergence_traits<D> divergence_info{};
  static constexpr token_reduction_traits<R> reduction_info{};

  linear_kd_options options;

  template <class Backend, class HT, class WT, class TT, class Out, class GH, class GW>
  status operator()(const Backend& backend, matrix_view<HT> hidden, matrix_view<WT> weight, matrix_view<TT> teacher,
                    std::span<const std::int32_t> labels, Out& out, matrix_view<GH> dhidden,
                    matrix_view<GW> dweight) const {
    KD_CHECK_STUDENT_DTYPE(P::student, HT);
    KD_CHECK_PROJECTION_DTYPE(P::projection, WT);
    KD_CHECK_TEACHER_DTYPE(P::teacher, TT);
    KD_CHECK_GRAD_DTYPE(P::student, GH);
    KD_CHECK_GRAD_DTYPE(P::projection, GW);
    return detail::with_component(loss_impl<Backend, linear_kd_tag>::run(backend, *this, as_const(hidden),
                                                                          as_const(weight), as_const(teacher), labels,
                                                                          out, dhidden, dweight),
                                  detail::component_or(options, "kd"));
  }

  // The logit_kd equivalent of this loss on logits held in accumulation type A (what the CPU reference
  // runs per chunk; the CUDA path keeps its chunk logits in the storage type).
  template <class A>
  using logit_loss = logit_kd<D, R, precision_set<typename P::teacher, precision<A, A>>>;
};

namespace detail {
// The checks of the LM-head product, shared by both backends (the per-chunk logit_kd validates the rest:
// its own plan carries the same scaling). Label values are checked by the per-chunk logit_kd.
template <class Loss, class HT, class WT, class TT, class GH, class GW>
status validate_linear_kd(const Loss& loss, const matrix_view<HT>& h, const matrix_view<WT>& w, const matrix_view<TT>& t,
                          std::span<const std::int32_t> labels, const matrix_view<GH>& dh, const matrix_view<GW>& dw,
                          kd_scaling& scaling) {
  const auto& o = loss.options;
  KD_TRY(validate_view(h, "student hidden"));
  KD_TRY(validate_view(w, "LM head weight"));
  KD_TRY(validate_view(t, "teacher logits"));
  if (h.empty() || w.empty()) return {errc::empty_input, "hidden states or LM head are empty"};
  if (w.cols != h.cols)
    return {errc::shape_mismatch, "LM head is " + shape_string(w.rows, w.cols) + " but the hidden width is " +
                                      std::to_string(h.cols)};
  if (t.rows != h.rows)
    return {errc::shape_mismatch, "teacher logits have " + std::to_string(t.rows) + " tokens but hidden has " +
                                      std::to_string(h.rows)};
  if (!labels.empty() && static_cast<index_t>(labels.size()) != h.rows)
    return {errc::shape_mismatch, "labels has " + std::to_string(labels.size()) + " entries but hidden has " +
                                      std::to_string(h.rows) + " tokens"};
  if (o.chunk_rows <= 0) return {errc::invalid_argument, "chunk_rows must be positive"};
  if (!dh.empty()) {
    KD_TRY(validate_view(dh, "hidden gradient"));
    KD_TRY(same_shape(dh, "hidden gradient", h, "student hidden"));
  }
  if (!dw.empty()) {
    KD_TRY(validate_view(dw, "LM head gradient"));
    KD_TRY(same_shape(dw, "LM head gradient", w, "LM head weight"));
  }
  scaling = make_kd_scaling<Loss::reduction_info.mean>(o, o.temperature, o.scale_by_t2);
  return {};
}
}  // namespace detail

template <>
struct loss_impl<cpu_backend, linear_kd_tag> {
  template <class Loss, class HT, class WT, class TT, class GH, class GW>
  static status run(const cpu_backend&, const Loss& loss, matrix_view<const HT> h, matrix_view<const WT> w,
                    matrix_view<const TT> t, std::span<const std::int32_t> labels, loss_result& out,
                    matrix_view<GH> dh, matrix_view<GW> dw) {
    using A = detail::common_accum_for<typename Loss::precisions>;
    using Mat = Eigen::Matrix<A, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
    const auto& o = loss.options;
    detail::kd_scaling sc;
    KD_TRY(detail::validate_linear_kd(loss, h, w, t, labels, dh, dw, sc));
    const index_t n = h.rows, d = h.cols, v = w.rows;
    auto load = [](auto view, index_t r0, index_t rows) {
      Mat m(rows, view.cols);
      for (index_t r = 0; r < rows; ++r)
        for (index_t c = 0; c < view.cols; ++c) m(r, c) = load_as<A>(view(r0 + r, c));
      return m;
    };
    const Mat W = load(w, 0, v);
    Mat dW = Mat::Zero(v, d);
    // One logit_kd over all rows would need N x V; chunks share the global normalizer instead.
    typename Loss::template logit_loss<A> inner;
    static_cast<logit_kd_options&>(inner.options) = o;
    const index_t active = detail::count_active(labels, n, o.ignore_index);
    const double divisor = sc.divisor_for(active);
    // Chunks are divided by the whole call's divisor, not their own token count.
    if (sc.divisor == detail::divisor_kind::active_tokens) inner.options.global_tokens = static_cast<index_t>(divisor);
    inner.options.accumulate_grad = false;
    double total = 0.0;
    for (index_t r0 = 0; r0 < n; r0 += o.chunk_rows) {
      const index_t rows = std::min(o.chunk_rows, n - r0);
      const Mat H = load(h, r0, rows);
      Mat logits = H * W.transpose();
      Mat dlogits(rows, v);
      loss_result part;
      const auto lab = labels.empty() ? labels : labels.subspan(static_cast<std::size_t>(r0), static_cast<std::size_t>(rows));
      KD_TRY(inner(cpu, matrix_view<const TT>(t.row(r0), rows, t.cols, t.stride),
                   matrix_view<const A>(logits.data(), rows, v), lab, part, matrix_view<A>(dlogits.data(), rows, v)));
      total += part.loss * part.normalizer;
      if (!dh.empty()) {
        const Mat dH = dlogits * W;
        for (index_t r = 0; r < rows; ++r)
          for (index_t c = 0; c < d; ++c) detail::put_grad(dh(r0 + r, c), dH(r, c), o.accumulate_grad);
      }
      if (!dw.empty()) dW.noalias() += dlogits.transpose() * H;
    }
    if (!dw.empty())
      for (index_t r = 0; r < v; ++r)
        for (index_t c = 0; c < d; ++c) detail::put_grad(dw(r, c), dW(r, c), o.accumulate_grad);
    out.tokens = active;
    out.normalizer = divisor;
    out.loss = total / divisor;
    return {};
  }
};

}  // namespace kd
