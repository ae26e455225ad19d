// kd/loss/feature.hpp: hidden-state (feature) distillation through a learned projection.
//
// y = x W^T + b maps a student hidden state x (width d_s, e.g. 576) to the teacher's width D (e.g.
// 1024); the per-token loss compares y with the teacher hidden state t under a feature normalization
// (kd/policy/normalization.hpp: none, sqrt_dim_mse, rms_mse, cosine), then a token reduction.
// Gradients: dL/dy per normalization, dx = dy W, dW = dy^T x, db = sum dy.
// An empty projection means identity (d_s must equal D). Teacher, student and projection precisions
// come from the precision_set; mixing them is allowed only as the set declares.
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>
#include <span>
#include <string>

#include <Eigen/Core>

#include <kd/loss/common.hpp>
#include <kd/policy/backend.hpp>
#include <kd/policy/normalization.hpp>
#include <kd/policy/precision.hpp>

namespace kd {

struct feature_options : token_options {
  double eps = 1e-6;  // rms_mse and cosine: added under square roots so a zero vector stays finite
};

struct feature_tag {};

template <class N = sqrt_dim_mse, class R = token_mean, class P = precision_set<fp32, fp32, fp32>>
struct feature_loss {
  static_assert(PrecisionSet<P>, "kd: feature_loss's third parameter must be a kd::precision_set<Teacher, Student, Projection>.");
  using normalization = N;
  using reduction = R;
  using precisions = P;
  static constexpr feature_normalization_traits<N> normalization_info{};
  static constexpr token_reduction_traits<R> reduction_info{};

  feature_options options;

  // student: [N x d_s], projection: [D x d_s] (or empty = identity), bias: [1 x D] (or empty),
  // teacher: [N x D]. Gradients have the shapes of their inputs; pass an empty view to skip one.
  // `out` is the backend's result type: kd::loss_result on the CPU, kd::cuda::device_loss on the GPU.
  template <class Backend, class ST, class WT, class BT, class TT, class Out, class GS, class GW, class GB>
  status operator()(const Backend& backend, matrix_view<ST> student, matrix_view<WT> projection, matrix_view<BT> bias,
                    matrix_view<TT> teacher, std::span<const std::int32_t> labels, Out& out,
                    matrix_view<GS> dstudent, matrix_view<GW> dprojection, matrix_view<GB> dbias) const {
    KD_CHECK_STUDENT_DTYPE(P::student, ST);
    KD_CHECK_PROJECTION_DTYPE(P::projection, WT);
    KD_CHECK_PROJECTION_DTYPE(P::projection, BT);
    KD_CHECK_TEACHER_DTYPE(P::teacher, TT);
    KD_CHECK_GRAD_DTYPE(P::student, GS);
    KD_CHECK_GRAD_DTYPE(P::projection, GW);
    KD_CHECK_GRAD_DTYPE(P::projection, GB);
    return detail::with_component(
        loss_impl<Backend, feature_tag>::run(backend, *this, as_const(student), as_const(projection), as_const(bias),
                                             as_const(teacher), labels, out, dstudent, dprojection, dbias),
        detail::component_or(options, "feature"));
  }

  // Forward only.
  template <class Backend, class ST, class WT, class BT, class TT, class Out>
  status operator()(const Backend& backend, matrix_view<ST> student, matrix_view<WT> projection, matrix_view<BT> bias,
                    matrix_view<TT> teacher, std::span<const std::int32_t> labels, Out& out) const {
    using S = typename P::student::storage_type;
    using W = typename P::projection::storage_type;
    return (*this)(backend, student, projection, bias, teacher, labels, out, matrix_view<S>{}, matrix_view<W>{},
                   matrix_view<W>{});
  }
};

namespace detail {

// The feature loss's component name for messages ("feature" unless the options name one).
template <class Loss>
token_options feature_named_options(const Loss& loss) {
  token_options named = loss.options;
  named.component = component_or(loss.options, "feature");
  return named;
}

// Shapes, strides, options and the label count: everything that needs no tensor or label memory, so
// a backend whose tensors live on a device (kd/loss/feature.cuh) runs it unchanged. The data checks
// (label values, the token count against global_tokens, NaN/Inf) are validate_feature's second half;
// global_tokens is checked against the token count here only when there are no labels.
template <class Loss, class ST, class WT, class BT, class TT, class GS, class GW, class GB>
status validate_feature_shapes(const Loss& loss, const matrix_view<ST>& x, const matrix_view<WT>& w,
                               const matrix_view<BT>& b, const matrix_view<TT>& t, std::span<const std::int32_t> labels,
                               const matrix_view<GS>& dx, const matrix_view<GW>& dw, const matrix_view<GB>& db) {
  const auto& o = loss.options;
  const token_options named = feature_named_options(loss);
  const std::string ic = in_component(named.component);
  KD_TRY(validate_view(x, "student hidden"));
  KD_TRY(validate_view(w, "projection"));
  KD_TRY(validate_view(b, "projection bias"));
  KD_TRY(validate_view(t, "teacher hidden"));
  if (x.empty()) return {errc::empty_input, "student hidden states are empty" + ic};
  if (t.rows != x.rows)
    return {errc::shape_mismatch, "teacher hidden has " + std::to_string(t.rows) + " tokens but student hidden has " +
                                      std::to_string(x.rows) + ic};
  if (w.empty()) {
    if (x.cols != t.cols)
      return {errc::shape_mismatch, "without a projection the student width " + std::to_string(x.cols) +
                                        " must equal the teacher width " + std::to_string(t.cols) + ic};
  } else if (w.rows != t.cols || w.cols != x.cols) {
    return {errc::shape_mismatch, "projection is " + shape_string(w.rows, w.cols) + " but must be [teacher width " +
                                      std::to_string(t.cols) + " x student width " + std::to_string(x.cols) + "]" + ic};
  }
  if (!b.empty() && (b.rows != 1 || b.cols != t.cols))
    return {errc::shape_mismatch, "projection bias is " + shape_string(b.rows, b.cols) + " but must be [1 x " +
                                      std::to_string(t.cols) + "]" + ic};
  if (!(o.eps > 0) || !std::isfinite(o.eps)) return {errc::invalid_argument, "eps must be finite and > 0" + ic};
  if (!dx.empty()) {
    KD_TRY(validate_view(dx, "student hidden gradient"));
    KD_TRY(same_shape(dx, "student hidden gradient", x, "student hidden"));
  }
  if (!dw.empty()) {
    if (w.empty()) return {errc::invalid_argument, "a projection gradient was given without a projection" + ic};
    KD_TRY(validate_view(dw, "projection gradient"));
    KD_TRY(same_shape(dw, "projection gradient", w, "projection"));
  }
  if (!db.empty()) {
    if (b.empty()) return {errc::invalid_argument, "a bias gradient was given without a bias" + ic};
    KD_TRY(validate_view(db, "bias gradient"));
    KD_TRY(same_shape(db, "bias gradient", b, "projection bias"));
  }
  KD_TRY(check_labels(labels, x.rows, std::numeric_limits<std::int32_t>::max(), named, false));
  KD_TRY(check_token_options(named, labels.empty() ? x.rows : 0));
  return {};
}

// Every check of the CPU reference: validate_feature_shapes, then the ones that read the data.
template <class Loss, class ST, class WT, class BT, class TT, class GS, class GW, class GB>
status validate_feature(const Loss& loss, const matrix_view<ST>& x, const matrix_view<WT>& w, const matrix_view<BT>& b,
                        const matrix_view<TT>& t, std::span<const std::int32_t> labels, const matrix_view<GS>& dx,
                        const matrix_view<GW>& dw, const matrix_view<GB>& db) {
  KD_TRY(validate_feature_shapes(loss, x, w, b, t, labels, dx, dw, db));
  const token_options named = feature_named_options(loss);
  KD_TRY(check_labels(labels, x.rows, std::numeric_limits<std::int32_t>::max(), named));
  KD_TRY(check_token_options(named, count_active(labels, x.rows, loss.options.ignore_index)));
  KD_TRY(check_finite(x, "student hidden", named.component));
  KD_TRY(check_finite(w, "projection", named.component));
  KD_TRY(check_finite(b, "projection bias", named.component));
  KD_TRY(check_finite(t, "teacher hidden", named.component));
  return {};
}

// Per-token feature loss and dL/dy under normalization kind K. y, t, g are length-D arrays.
template <feature_norm_kind K, class Arr, class A>
A feature_row(const Arr& y, const Arr& t, Arr& g, A eps) {
  const A d = static_cast<A>(y.size());
  if constexpr (K == feature_norm_kind::none) {
    g = A(2) * (y - t);
    return sum_in_double((y - t).square());
  } else if constexpr (K == feature_norm_kind::sqrt_dim_mse) {
    g = A(2) * (y - t) / d;
    return sum_in_double((y - t).square()) / d;
  } else if constexpr (K == feature_norm_kind::rms_mse) {
    const A ry = std::sqrt(sum_in_double(y.square()) / d + eps);
    const A rt = std::sqrt(sum_in_double(t.square()) / d + eps);
    const Arr diff = y / ry - t / rt;
    const Arr a = A(2) * diff / d;  // dL/du
    g = a / ry - sum_in_double(a * y) * y / (d * ry * ry * ry);
    return sum_in_double(diff.square()) / d;
  } else {
    const A ny = std::sqrt(sum_in_double(y.square()) + eps);
    const A nt = std::sqrt(sum_in_double(t.square()) + eps);
    const A dot = sum_in_double(y * t);
    g = -(t / (ny * nt) - dot * y / (ny * ny * ny * nt));
    return A(1) - dot / (ny * nt);
  }
}

}  // namespace detail

template <>
struct loss_impl<cpu_backend, feature_tag> {
  template <class Loss, class ST, class WT, class BT, class TT, class GS, class GW, class GB>
  static status run(const cpu_backend&, const Loss& loss, matrix_view<const ST> x, matrix_view<const WT> w,
                    matrix_view<const BT> b, matrix_view<const TT> t, std::span<const std::int32_t> labels,
                    loss_result& out, matrix_view<GS> dx, matrix_view<GW> dw, matrix_view<GB> db) {
    using A = detail::common_accum_for<typename Loss::precisions>;
    using Mat = Eigen::Matrix<A, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
    using Arr = Eigen::Array<A, Eigen::Dynamic, 1>;
    constexpr auto kind = Loss::normalization_info.kind;
    const auto& o = loss.options;
    KD_TRY(detail::validate_feature(loss, x, w, b, t, labels, dx, dw, db));
    const index_t n = x.rows, ds = x.cols, dt = t.cols;
    auto load = [](auto view) {
      Mat m(view.rows, view.cols);
      for (index_t r = 0; r < view.rows; ++r)
        for (index_t c = 0; c < view.cols; ++c) m(r, c) = load_as<A>(view(r, c));
      return m;
    };
    const Mat X = load(x);
    const Mat W = w.empty() ? Mat() : load(w);
    Mat Y = w.empty() ? X : Mat(X * W.transpose());
    if (!b.empty())
      for (index_t c = 0; c < dt; ++c) Y.col(c).array() += load_as<A>(b(0, c));

    const index_t active = detail::count_active(labels, n, o.ignore_index);
    const double divisor = detail::token_divisor<Loss::reduction_info.mean>(o, active);
    Mat dY = Mat::Zero(n, dt);
    Arr yr(dt), tr(dt), g(dt);
    double total = 0.0;  // the token sum in double (rows are summed in double by feature_row)
    for (index_t r = 0; r < n; ++r) {
      if (!detail::token_active(labels, r, o.ignore_index)) continue;
      yr = Y.row(r).transpose().array();
      for (index_t c = 0; c < dt; ++c) tr[c] = load_as<A>(t(r, c));
      total += detail::feature_row<kind>(yr, tr, g, static_cast<A>(o.eps));
      dY.row(r) = g.matrix().transpose();
    }
    dY *= static_cast<A>(o.grad_scale / divisor);
    out.tokens = active;
    out.normalizer = divisor;
    out.loss = total / divisor;
    if (!std::isfinite(out.loss)) return {errc::non_finite, "the loss is not finite"};

    auto store = [&](auto view, const Mat& m) {
      for (index_t r = 0; r < view.rows; ++r)
        for (index_t c = 0; c < view.cols; ++c) detail::put_grad(view(r, c), m(r, c), o.accumulate_grad);
    };
    if (!dx.empty()) store(dx, w.empty() ? dY : Mat(dY * W));
    if (!dw.empty()) store(dw, Mat(dY.transpose() * X));
    if (!db.empty()) store(db, Mat(dY.colwise().sum()));
    (void)ds;
    return {};
  }
};

}  // namespace kd
