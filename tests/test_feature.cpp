// Tests for kd/loss/feature.hpp: hidden-state distillation through a learned projection.
//
// Gradients are checked against central finite differences in double precision on fresh random
// inputs for every normalization x reduction, with ignored tokens mixed in; known values, the
// mixed-precision path, micro-batch accumulation, the scale argument for normalization and the
// error paths are covered separately.
#include <doctest/doctest.h>

#include <kd/kd.hpp>

#include <Eigen/Core>

#include "test_util.hpp"

#include <cmath>
#include <cstdint>
#include <functional>
#include <limits>
#include <random>
#include <span>
#include <string>
#include <type_traits>
#include <vector>

namespace {

using MatD = Eigen::Matrix<double, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
using MatF = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
using fp64_set = kd::precision_set<kd::fp64, kd::fp64, kd::fp64>;

constexpr std::int32_t kIgnore = kd::default_ignore_index;

template <class M>
kd::matrix_view<typename M::Scalar> view(M& m) {
  if (m.size() == 0) return {};
  return {m.data(), static_cast<kd::index_t>(m.rows()), static_cast<kd::index_t>(m.cols())};
}

// Rows [r0, r0 + n) of a row-major matrix, as a view.
template <class M>
kd::matrix_view<typename M::Scalar> row_block(M& m, kd::index_t r0, kd::index_t n) {
  return {m.data() + r0 * m.cols(), n, static_cast<kd::index_t>(m.cols())};
}

MatD randn(kdtest::rng_t& rng, kd::index_t rows, kd::index_t cols, double stddev = 1.0) {
  MatD m(rows, cols);
  std::span<double> flat(m.data(), static_cast<std::size_t>(m.size()));
  kdtest::fill_normal(flat, rng, 0.0, stddev);
  return m;
}

// ||a - b|| / ||b|| over all entries (kdtest::rel_error on the flattened matrices).
double rel_err(const MatD& a, const MatD& b) {
  REQUIRE(a.rows() == b.rows());
  REQUIRE(a.cols() == b.cols());
  return kdtest::rel_error(std::span<const double>(a.data(), static_cast<std::size_t>(a.size())),
                           std::span<const double>(b.data(), static_cast<std::size_t>(b.size())));
}

// Row-major bf16 storage (kd::bfloat16 is not an Eigen scalar).
struct bf16_mat {
  std::vector<kd::bfloat16> v;
  kd::index_t rows = 0, cols = 0;
  bf16_mat(kd::index_t r, kd::index_t c) : v(static_cast<std::size_t>(r * c)), rows(r), cols(c) {}
  kd::matrix_view<kd::bfloat16> view() { return {v.data(), rows, cols}; }
};

bf16_mat to_bf16(const MatD& m) {
  bf16_mat r(m.rows(), m.cols());
  for (Eigen::Index i = 0; i < m.size(); ++i) r.v[static_cast<std::size_t>(i)] = kd::bfloat16(static_cast<float>(m.data()[i]));
  return r;
}

MatD to_double(const bf16_mat& m) {
  MatD r(m.rows, m.cols);
  for (Eigen::Index i = 0; i < r.size(); ++i) r.data()[i] = static_cast<double>(static_cast<float>(m.v[static_cast<std::size_t>(i)]));
  return r;
}

// Central finite differences of f with respect to every entry of m (perturbed in place and restored).
MatD finite_diff(MatD& m, const std::function<double()>& f, double h = 1e-6) {
  const std::vector<double> g =
      kdtest::numeric_gradient(f, std::span<double>(m.data(), static_cast<std::size_t>(m.size())), h);
  return Eigen::Map<const MatD>(g.data(), m.rows(), m.cols());
}

// Labels with a mix of ignored and counted tokens (at least one of each when n >= 2).
std::vector<std::int32_t> mixed_labels(kdtest::rng_t& rng, kd::index_t n) {
  std::vector<std::int32_t> labels(static_cast<std::size_t>(n));
  std::uniform_int_distribution<int> pick(0, 2);
  for (kd::index_t i = 0; i < n; ++i) labels[static_cast<std::size_t>(i)] = pick(rng) == 0 ? kIgnore : 7 * static_cast<int>(i);
  labels[0] = kIgnore;
  labels[static_cast<std::size_t>(n - 1)] = 3;
  return labels;
}

// FD-checks dx, dW, db of one normalization x reduction on fresh random inputs.
template <class N, class R>
void check_feature_gradients(std::uint64_t seed, bool identity, bool with_bias) {
  kdtest::rng_t rng(seed);
  const kd::index_t n = 6, ds = identity ? 5 : 4, dt = 5;
  MatD x = randn(rng, n, ds);
  MatD t = randn(rng, n, dt);
  MatD w = identity ? MatD() : randn(rng, dt, ds, 0.5);
  MatD b = with_bias ? randn(rng, 1, dt, 0.3) : MatD();
  const auto labels = mixed_labels(rng, n);

  kd::feature_loss<N, R, fp64_set> loss;
  auto eval = [&] {
    kd::loss_result r;
    const kd::status s = loss(kd::cpu, view(x), view(w), view(b), view(t), labels, r);
    REQUIRE(s.ok());
    return r.loss;
  };

  MatD dx(n, ds), dw(w.rows(), w.cols()), db(b.rows(), b.cols());
  dx.setConstant(123.0);  // overwritten (accumulate_grad is off)
  dw.setConstant(123.0);
  db.setConstant(123.0);
  kd::loss_result out;
  const kd::status s = loss(kd::cpu, view(x), view(w), view(b), view(t), labels, out, view(dx), view(dw), view(db));
  REQUIRE_MESSAGE(s.ok(), s.message());

  const kd::index_t active = kd::count_tokens(labels);
  CHECK(out.tokens == active);
  CHECK(out.normalizer == (std::is_same_v<R, kd::token_mean> ? static_cast<double>(active) : 1.0));
  CHECK(out.loss == doctest::Approx(eval()).epsilon(1e-15));

  CHECK(rel_err(dx, finite_diff(x, eval)) < 1e-7);
  for (kd::index_t r = 0; r < n; ++r)
    if (labels[static_cast<std::size_t>(r)] == kIgnore) CHECK(dx.row(r).norm() == 0.0);
  if (!identity) CHECK(rel_err(dw, finite_diff(w, eval)) < 1e-7);
  if (with_bias) CHECK(rel_err(db, finite_diff(b, eval)) < 1e-7);
  // The loss really depends on the teacher (no silent zero target).
  CHECK(finite_diff(t, eval).norm() > 0.0);
}

template <class N>
void check_feature_gradients_all(std::uint64_t seed) {
  SUBCASE("projection + bias, token_mean") { check_feature_gradients<N, kd::token_mean>(seed, false, true); }
  SUBCASE("projection + bias, sum") { check_feature_gradients<N, kd::none>(seed + 1, false, true); }
  SUBCASE("projection, no bias, token_mean") { check_feature_gradients<N, kd::token_mean>(seed + 2, false, false); }
  SUBCASE("identity + bias, token_mean") { check_feature_gradients<N, kd::token_mean>(seed + 3, true, true); }
  SUBCASE("identity, no bias, sum") { check_feature_gradients<N, kd::none>(seed + 4, true, false); }
}

// Loss of one normalization with identity projection and no bias: y = x.
template <class N, class R = kd::token_mean>
double identity_loss(MatD& x, MatD& t, double eps = 1e-6) {
  kd::feature_loss<N, R, fp64_set> loss;
  loss.options.eps = eps;
  MatD none;
  kd::loss_result r;
  const kd::status s = loss(kd::cpu, view(x), view(none), view(none), view(t), {}, r);
  REQUIRE_MESSAGE(s.ok(), s.message());
  return r.loss;
}

}  // namespace

// -----------------------------------------------------------------------------------------------
// Gradients vs finite differences
// -----------------------------------------------------------------------------------------------

TEST_CASE("feature loss: gradients match finite differences (none)") { check_feature_gradients_all<kd::none>(101); }
TEST_CASE("feature loss: gradients match finite differences (sqrt_dim_mse)") {
  check_feature_gradients_all<kd::sqrt_dim_mse>(202);
}
TEST_CASE("feature loss: gradients match finite differences (rms_mse)") { check_feature_gradients_all<kd::rms_mse>(303); }
TEST_CASE("feature loss: gradients match finite differences (cosine)") { check_feature_gradients_all<kd::cosine>(404); }

TEST_CASE("feature loss: grad_scale multiplies and accumulate_grad adds every gradient") {
  kdtest::rng_t rng(7);
  const kd::index_t n = 5, ds = 3, dt = 4;
  MatD x = randn(rng, n, ds), t = randn(rng, n, dt), w = randn(rng, dt, ds), b = randn(rng, 1, dt);
  const auto labels = mixed_labels(rng, n);
  kd::feature_loss<kd::rms_mse, kd::token_mean, fp64_set> loss;

  MatD dx1(n, ds), dw1(dt, ds), db1(1, dt);
  kd::loss_result r1;
  REQUIRE(loss(kd::cpu, view(x), view(w), view(b), view(t), labels, r1, view(dx1), view(dw1), view(db1)).ok());

  loss.options.grad_scale = -2.5;
  MatD dx2(n, ds), dw2(dt, ds), db2(1, dt);
  kd::loss_result r2;
  REQUIRE(loss(kd::cpu, view(x), view(w), view(b), view(t), labels, r2, view(dx2), view(dw2), view(db2)).ok());
  CHECK(r2.loss == r1.loss);  // the reported loss is unweighted
  CHECK(rel_err(dx2, -2.5 * dx1) < 1e-14);
  CHECK(rel_err(dw2, -2.5 * dw1) < 1e-14);
  CHECK(rel_err(db2, -2.5 * db1) < 1e-14);

  loss.options.grad_scale = 1.0;
  loss.options.accumulate_grad = true;
  MatD dx3 = randn(rng, n, ds), dw3 = randn(rng, dt, ds), db3 = randn(rng, 1, dt);
  const MatD dx0 = dx3, dw0 = dw3, db0 = db3;
  kd::loss_result r3;
  REQUIRE(loss(kd::cpu, view(x), view(w), view(b), view(t), labels, r3, view(dx3), view(dw3), view(db3)).ok());
  CHECK(rel_err(dx3, dx0 + dx1) < 1e-14);
  CHECK(rel_err(dw3, dw0 + dw1) < 1e-14);
  CHECK(rel_err(db3, db0 + db1) < 1e-14);
  // Ignored rows keep what was there.
  for (kd::index_t r = 0; r < n; ++r)
    if (labels[static_cast<std::size_t>(r)] == kIgnore) CHECK(dx3.row(r) == dx0.row(r));
}

TEST_CASE("feature loss: empty gradient views are skipped") {
  kdtest::rng_t rng(8);
  MatD x = randn(rng, 3, 2), t = randn(rng, 3, 4), w = randn(rng, 4, 2), b = randn(rng, 1, 4);
  kd::feature_loss<kd::cosine, kd::token_mean, fp64_set> loss;
  MatD dw(4, 2), none;
  kd::loss_result r_full, r_part;
  REQUIRE(loss(kd::cpu, view(x), view(w), view(b), view(t), {}, r_full).ok());
  REQUIRE(loss(kd::cpu, view(x), view(w), view(b), view(t), {}, r_part, view(none), view(dw), view(none)).ok());
  CHECK(r_part.loss == r_full.loss);
  CHECK(r_full.tokens == 3);  // no labels: every token counts
  CHECK(dw.norm() > 0.0);
}

TEST_CASE("feature loss: strided views give the same loss and gradients as contiguous ones") {
  kdtest::rng_t rng(9);
  const kd::index_t n = 5, ds = 3, dt = 4, pad = 2;
  MatD x = randn(rng, n, ds), t = randn(rng, n, dt), w = randn(rng, dt, ds), b = randn(rng, 1, dt);
  const auto labels = mixed_labels(rng, n);
  kd::feature_loss<kd::cosine, kd::token_mean, fp64_set> loss;
  MatD dx(n, ds), dw(dt, ds), db(1, dt);
  kd::loss_result r;
  REQUIRE(loss(kd::cpu, view(x), view(w), view(b), view(t), labels, r, view(dx), view(dw), view(db)).ok());

  // The same tensors as column windows of wider buffers (e.g. one slice of a fused activation).
  MatD xw = MatD::Constant(n, ds + pad, 1e300), tw = MatD::Constant(n, dt + pad, -1e300);
  MatD ww = MatD::Constant(dt, ds + pad, 1e300), dxw = MatD::Constant(n, ds + pad, 7.0);
  MatD dww = MatD::Constant(dt, ds + pad, 7.0);
  xw.block(0, 1, n, ds) = x;
  tw.block(0, 1, n, dt) = t;
  ww.block(0, 1, dt, ds) = w;
  auto win = [](MatD& m, kd::index_t cols) { return kd::matrix_view<double>{m.data() + 1, m.rows(), cols, m.cols()}; };
  MatD db2(1, dt);
  kd::loss_result r2;
  const kd::status s = loss(kd::cpu, win(xw, ds), win(ww, ds), view(b), win(tw, dt), labels, r2, win(dxw, ds),
                            win(dww, ds), view(db2));
  REQUIRE_MESSAGE(s.ok(), s.message());
  CHECK(r2.loss == r.loss);
  CHECK(MatD(dxw.block(0, 1, n, ds)) == dx);
  CHECK(MatD(dww.block(0, 1, dt, ds)) == dw);
  CHECK(db2 == db);
  // Padding columns are untouched.
  CHECK((dxw.col(0).array() == 7.0).all());
  CHECK((dxw.rightCols(1).array() == 7.0).all());
  CHECK((dww.col(0).array() == 7.0).all());

  // A stride smaller than the row is rejected.
  kd::matrix_view<double> bad{x.data(), n, ds, ds - 1};
  CHECK(loss(kd::cpu, bad, view(w), view(b), view(t), labels, r2).code() == kd::errc::shape_mismatch);
}

// -----------------------------------------------------------------------------------------------
// Known values
// -----------------------------------------------------------------------------------------------

TEST_CASE("feature loss: known values") {
  kdtest::rng_t rng(11);
  const kd::index_t n = 4, d = 16;
  MatD t = randn(rng, n, d);

  SUBCASE("identical y and t give 0 for every normalization") {
    MatD y = t;
    CHECK(identity_loss<kd::none>(y, t) == 0.0);
    CHECK(identity_loss<kd::sqrt_dim_mse>(y, t) == 0.0);
    CHECK(identity_loss<kd::rms_mse>(y, t) == 0.0);
    // cosine puts eps under the norms, so identical vectors sit eps / (|t|^2 + eps) per token above 0.
    const double min_sq = t.rowwise().squaredNorm().minCoeff();
    const double l_cos = identity_loss<kd::cosine>(y, t);
    CHECK(l_cos >= 0.0);
    CHECK(l_cos <= 1e-6 / min_sq * (1 + 1e-9));
    CHECK(std::abs(identity_loss<kd::cosine>(y, t, 1e-300)) < 1e-15);

    // Through a projection: W = I, b = 0 reproduces the same 0.
    MatD w = MatD::Identity(d, d), b = MatD::Zero(1, d), x = t;
    kd::feature_loss<kd::rms_mse, kd::token_mean, fp64_set> loss;
    kd::loss_result r;
    REQUIRE(loss(kd::cpu, view(x), view(w), view(b), view(t), {}, r).ok());
    CHECK(r.loss == 0.0);
  }

  SUBCASE("cosine: t vs 2t is 0, t vs -t is 2") {
    MatD y2 = 2.0 * t, yneg = -t;
    CHECK(std::abs(identity_loss<kd::cosine>(y2, t, 1e-300)) < 1e-14);
    CHECK(identity_loss<kd::cosine>(yneg, t, 1e-300) == doctest::Approx(2.0).epsilon(1e-14));
    // Summed over tokens: n times the per-token value.
    CHECK(identity_loss<kd::cosine, kd::none>(yneg, t, 1e-300) == doctest::Approx(2.0 * n).epsilon(1e-14));
  }

  SUBCASE("none is sum of squares, sqrt_dim_mse is none / D") {
    MatD y = randn(rng, n, d);
    const double expected = (y - t).squaredNorm() / static_cast<double>(n);
    const double l_none = identity_loss<kd::none>(y, t);
    CHECK(l_none == doctest::Approx(expected).epsilon(1e-14));
    CHECK(identity_loss<kd::sqrt_dim_mse>(y, t) == doctest::Approx(l_none / d).epsilon(1e-14));
    CHECK(identity_loss<kd::none, kd::none>(y, t) == doctest::Approx(expected * n).epsilon(1e-14));
  }

  SUBCASE("rms_mse is invariant to scaling y by a positive constant") {
    MatD y = randn(rng, n, d);
    const double base = identity_loss<kd::rms_mse>(y, t, 1e-300);
    CHECK(base > 0.1);
    for (double c : {1e-3, 0.37, 2.0, 1e3}) {
      MatD yc = c * y;
      CHECK(identity_loss<kd::rms_mse>(yc, t, 1e-300) == doctest::Approx(base).epsilon(1e-12));
    }
    // ... but not to a negative one (and none is not invariant at all).
    MatD yneg = -y;
    CHECK(identity_loss<kd::rms_mse>(yneg, t, 1e-300) != doctest::Approx(base).epsilon(1e-3));
    MatD y2 = 2.0 * y;
    CHECK(identity_loss<kd::none>(y2, t) != doctest::Approx(identity_loss<kd::none>(y, t)).epsilon(1e-3));
  }

  SUBCASE("rms_mse is bounded by 4 and cosine by 2") {
    for (int trial = 0; trial < 20; ++trial) {
      MatD y = randn(rng, n, d);
      const double rms = identity_loss<kd::rms_mse>(y, t);
      const double cos = identity_loss<kd::cosine>(y, t);
      CHECK(rms >= 0.0);
      CHECK(rms <= 4.0);
      CHECK(cos >= 0.0);
      CHECK(cos <= 2.0);
    }
  }

  SUBCASE("ignored tokens do not contribute; all ignored gives 0") {
    MatD y = randn(rng, n, d);
    std::vector<std::int32_t> labels = {kIgnore, 1, kIgnore, 2};
    MatD w;
    kd::feature_loss<kd::sqrt_dim_mse, kd::token_mean, fp64_set> loss;
    kd::loss_result r;
    REQUIRE(loss(kd::cpu, view(y), view(w), view(w), view(t), labels, r).ok());
    const double expected = ((y.row(1) - t.row(1)).squaredNorm() + (y.row(3) - t.row(3)).squaredNorm()) / d / 2.0;
    CHECK(r.loss == doctest::Approx(expected).epsilon(1e-14));
    CHECK(r.tokens == 2);

    std::vector<std::int32_t> all_ignored(static_cast<std::size_t>(n), kIgnore);
    MatD dy(n, d);
    dy.setConstant(5.0);
    REQUIRE(loss(kd::cpu, view(y), view(w), view(w), view(t), all_ignored, r, view(dy), view(w), view(w)).ok());
    CHECK(r.loss == 0.0);
    CHECK(r.tokens == 0);
    CHECK(dy.norm() == 0.0);

    // A custom ignore index.
    loss.options.ignore_index = -1;
    std::vector<std::int32_t> custom = {-1, 1, -1, 2};
    REQUIRE(loss(kd::cpu, view(y), view(w), view(w), view(t), custom, r).ok());
    CHECK(r.loss == doctest::Approx(expected).epsilon(1e-14));
  }
}

// -----------------------------------------------------------------------------------------------
// Mixed precision
// -----------------------------------------------------------------------------------------------

namespace {

template <class N>
void check_mixed_precision(std::uint64_t seed) {
  kdtest::rng_t rng(seed);
  const kd::index_t n = 12, ds = 24, dt = 40;
  bf16_mat xs = to_bf16(randn(rng, n, ds));
  bf16_mat ts = to_bf16(randn(rng, n, dt));
  const MatF wf = randn(rng, dt, ds, 1.0 / std::sqrt(double(ds))).cast<float>();
  const MatF bf = randn(rng, 1, dt, 0.1).cast<float>();
  const auto labels = mixed_labels(rng, n);

  // Reference: fp64 on exactly the rounded inputs.
  MatD x = to_double(xs), t = to_double(ts), w = wf.cast<double>(), b = bf.cast<double>();
  kd::feature_loss<N, kd::token_mean, fp64_set> ref;
  MatD dx_ref(n, ds), dw_ref(dt, ds), db_ref(1, dt);
  kd::loss_result r_ref;
  REQUIRE(ref(kd::cpu, view(x), view(w), view(b), view(t), labels, r_ref, view(dx_ref), view(dw_ref), view(db_ref)).ok());

  using mixed = kd::precision_set<kd::bf16, kd::bf16, kd::fp32>;
  kd::feature_loss<N, kd::token_mean, mixed> loss;
  bf16_mat dx(n, ds);
  MatF ws = wf, bs = bf, dw(dt, ds), db(1, dt);
  kd::loss_result r;
  const kd::status s = loss(kd::cpu, xs.view(), view(ws), view(bs), ts.view(), labels, r, dx.view(), view(dw), view(db));
  REQUIRE_MESSAGE(s.ok(), s.message());

  CHECK(r.loss == doctest::Approx(r_ref.loss).epsilon(1e-2));
  CHECK(rel_err(to_double(dx), dx_ref) < 1e-2);
  CHECK(rel_err(dw.cast<double>(), dw_ref) < 1e-2);
  CHECK(rel_err(db.cast<double>(), db_ref) < 1e-2);
}

}  // namespace

TEST_CASE("feature loss: bf16 teacher/student with fp32 projection matches fp64 within 1e-2") {
  SUBCASE("none") { check_mixed_precision<kd::none>(21); }
  SUBCASE("sqrt_dim_mse") { check_mixed_precision<kd::sqrt_dim_mse>(22); }
  SUBCASE("rms_mse") { check_mixed_precision<kd::rms_mse>(23); }
  SUBCASE("cosine") { check_mixed_precision<kd::cosine>(24); }
}

// -----------------------------------------------------------------------------------------------
// Gradient accumulation over micro-batches
// -----------------------------------------------------------------------------------------------

namespace {

template <class N>
void check_micro_batches(std::uint64_t seed) {
  kdtest::rng_t rng(seed);
  const kd::index_t n = 11, ds = 6, dt = 7;
  MatD x = randn(rng, n, ds), t = randn(rng, n, dt), w = randn(rng, dt, ds, 0.4), b = randn(rng, 1, dt);
  const auto labels = mixed_labels(rng, n);

  kd::feature_loss<N, kd::token_mean, fp64_set> full;
  MatD dx_full(n, ds), dw_full(dt, ds), db_full(1, dt);
  kd::loss_result r_full;
  REQUIRE(full(kd::cpu, view(x), view(w), view(b), view(t), labels, r_full, view(dx_full), view(dw_full), view(db_full)).ok());

  // Split 11 tokens into 3 + 5 + 3; every micro-batch divides by the global count.
  kd::feature_loss<N, kd::token_mean, fp64_set> micro;
  micro.options.global_tokens = kd::count_tokens(labels);
  // dW and db start as garbage (the first micro-batch overwrites them); dx rows are written once each.
  MatD dx = MatD::Zero(n, ds), dw = MatD::Constant(dt, ds, 42.0), db = MatD::Constant(1, dt, 42.0);
  double loss_sum = 0.0;
  const kd::index_t starts[] = {0, 3, 8}, sizes[] = {3, 5, 3};
  for (int m = 0; m < 3; ++m) {
    micro.options.accumulate_grad = m > 0;
    const std::span<const std::int32_t> lab(labels.data() + starts[m], static_cast<std::size_t>(sizes[m]));
    kd::loss_result r;
    const kd::status s = micro(kd::cpu, row_block(x, starts[m], sizes[m]), view(w), view(b),
                               row_block(t, starts[m], sizes[m]), lab, r, row_block(dx, starts[m], sizes[m]),
                               view(dw), view(db));
    REQUIRE_MESSAGE(s.ok(), s.message());
    CHECK(r.normalizer == static_cast<double>(micro.options.global_tokens));
    loss_sum += r.loss;
  }
  CHECK(std::abs(loss_sum - r_full.loss) <= 1e-12 * std::abs(r_full.loss));
  CHECK(rel_err(dw, dw_full) < 1e-12);
  CHECK(rel_err(db, db_full) < 1e-12);
  CHECK(rel_err(dx, dx_full) < 1e-12);

  // Without global_tokens each micro-batch divides by its own count, and the sum differs.
  kd::feature_loss<N, kd::token_mean, fp64_set> local;
  double local_sum = 0.0;
  for (int m = 0; m < 3; ++m) {
    const std::span<const std::int32_t> lab(labels.data() + starts[m], static_cast<std::size_t>(sizes[m]));
    kd::loss_result r;
    REQUIRE(local(kd::cpu, row_block(x, starts[m], sizes[m]), view(w), view(b), row_block(t, starts[m], sizes[m]),
                  lab, r).ok());
    local_sum += r.loss;
  }
  CHECK(std::abs(local_sum - r_full.loss) > 1e-6 * std::abs(r_full.loss));
}

}  // namespace

TEST_CASE("feature loss: micro-batches with global_tokens reproduce the full batch") {
  SUBCASE("none") { check_micro_batches<kd::none>(31); }
  SUBCASE("sqrt_dim_mse") { check_micro_batches<kd::sqrt_dim_mse>(32); }
  SUBCASE("rms_mse") { check_micro_batches<kd::rms_mse>(33); }
  SUBCASE("cosine") { check_micro_batches<kd::cosine>(34); }
}

// -----------------------------------------------------------------------------------------------
// Scale: why normalization exists
// -----------------------------------------------------------------------------------------------

namespace {
template <class N>
double scale_loss(MatF& x, MatF& w, MatF& t) {
  kd::feature_loss<N, kd::token_mean, kd::precision_set<kd::fp32, kd::fp32, kd::fp32>> loss;
  MatF none;
  kd::loss_result r;
  const kd::status s = loss(kd::cpu, view(x), view(w), view(none), view(t), {}, r);
  REQUIRE_MESSAGE(s.ok(), s.message());
  return r.loss;
}
}  // namespace

TEST_CASE("feature loss: at d_s=576, D=1024 normalized losses are O(1), unnormalized is not") {
  kdtest::rng_t rng(576);
  const kd::index_t n = 32, ds = 576, dt = 1024;
  MatF t = randn(rng, n, dt).cast<float>();
  MatF x = randn(rng, n, ds).cast<float>();
  MatF w = randn(rng, dt, ds, 1.0 / std::sqrt(576.0)).cast<float>();

  const double l_none = scale_loss<kd::none>(x, w, t);
  const double l_sqrt = scale_loss<kd::sqrt_dim_mse>(x, w, t);
  const double l_rms = scale_loss<kd::rms_mse>(x, w, t);
  const double l_cos = scale_loss<kd::cosine>(x, w, t);
  MESSAGE("none=" << l_none << " sqrt_dim_mse=" << l_sqrt << " rms_mse=" << l_rms << " cosine=" << l_cos);
  CHECK(l_none > 100.0);
  for (double l : {l_sqrt, l_rms, l_cos}) {
    CHECK(l >= 0.1);
    CHECK(l <= 5.0);
  }
  CHECK(l_sqrt == doctest::Approx(l_none / dt).epsilon(1e-5));
}

// -----------------------------------------------------------------------------------------------
// Bad input
// -----------------------------------------------------------------------------------------------

namespace {

struct feature_fixture {
  kdtest::rng_t rng{99};
  kd::index_t n = 4, ds = 3, dt = 5;
  MatD x = randn(rng, n, ds), t = randn(rng, n, dt), w = randn(rng, dt, ds), b = randn(rng, 1, dt);
  MatD dx = MatD::Zero(n, ds), dw = MatD::Zero(dt, ds), db = MatD::Zero(1, dt);
  std::vector<std::int32_t> labels = {1, kIgnore, 2, 3};
  kd::feature_loss<kd::rms_mse, kd::token_mean, fp64_set> loss;

  kd::status run() {
    kd::loss_result r;
    return loss(kd::cpu, view(x), view(w), view(b), view(t), labels, r, view(dx), view(dw), view(db));
  }
};

}  // namespace

TEST_CASE("feature loss: bad input is reported with a code and a message") {
  feature_fixture f;
  REQUIRE(f.run().ok());

  SUBCASE("teacher and student token counts differ") {
    f.t = randn(f.rng, f.n + 1, f.dt);
    const kd::status s = f.run();
    CHECK(s.code() == kd::errc::shape_mismatch);
    CHECK(kdtest::contains(s.message(), "teacher hidden has 5 tokens but student hidden has 4"));
    CHECK(kdtest::contains(s.message(), "component 'feature'"));
  }
  SUBCASE("projection shape") {
    f.w = randn(f.rng, f.dt, f.ds + 1);
    f.dw = MatD::Zero(f.dt, f.ds + 1);
    const kd::status s = f.run();
    CHECK(s.code() == kd::errc::shape_mismatch);
    CHECK(kdtest::contains(s.message(), "projection is [5 x 4]"));
    CHECK(kdtest::contains(s.message(), "[teacher width 5 x student width 3]"));
  }
  SUBCASE("transposed projection") {
    f.w = randn(f.rng, f.ds, f.dt);
    const kd::status s = f.run();
    CHECK(s.code() == kd::errc::shape_mismatch);
    CHECK(kdtest::contains(s.message(), "projection is [3 x 5]"));
  }
  SUBCASE("bias shape") {
    f.b = randn(f.rng, 1, f.dt + 1);
    f.db = MatD::Zero(1, f.dt + 1);
    kd::status s = f.run();
    CHECK(s.code() == kd::errc::shape_mismatch);
    CHECK(kdtest::contains(s.message(), "projection bias is [1 x 6]"));
    f.b = randn(f.rng, 2, f.dt);
    f.db = MatD::Zero(2, f.dt);
    s = f.run();
    CHECK(s.code() == kd::errc::shape_mismatch);
    CHECK(kdtest::contains(s.message(), "projection bias is [2 x 5]"));
  }
  SUBCASE("identity projection needs equal widths") {
    f.w = MatD();
    f.dw = MatD();
    const kd::status s = f.run();
    CHECK(s.code() == kd::errc::shape_mismatch);
    CHECK(kdtest::contains(s.message(), "without a projection the student width 3 must equal the teacher width 5"));
  }
  SUBCASE("gradient shapes") {
    f.dx = MatD::Zero(f.n, f.ds + 1);
    kd::status s = f.run();
    CHECK(s.code() == kd::errc::shape_mismatch);
    CHECK(kdtest::contains(s.message(), "student hidden gradient"));
    CHECK(kdtest::contains(s.message(), "component 'feature'"));  // gradient errors name it too
    f.dx = MatD::Zero(f.n, f.ds);
    f.dw = MatD::Zero(f.ds, f.dt);
    s = f.run();
    CHECK(s.code() == kd::errc::shape_mismatch);
    CHECK(kdtest::contains(s.message(), "projection gradient"));
    CHECK(kdtest::contains(s.message(), "component 'feature'"));  // gradient errors name it too
    f.dw = MatD::Zero(f.dt, f.ds);
    f.db = MatD::Zero(1, f.dt - 1);
    s = f.run();
    CHECK(s.code() == kd::errc::shape_mismatch);
    CHECK(kdtest::contains(s.message(), "bias gradient"));
    CHECK(kdtest::contains(s.message(), "component 'feature'"));  // gradient errors name it too
  }
  SUBCASE("a gradient without its parameter") {
    f.b = MatD();
    kd::status s = f.run();
    CHECK(s.code() == kd::errc::invalid_argument);
    CHECK(kdtest::contains(s.message(), "bias gradient was given without a bias"));
    f.db = MatD();
    f.w = MatD();
    f.x = randn(f.rng, f.n, f.dt);
    f.dx = MatD::Zero(f.n, f.dt);
    s = f.run();
    CHECK(s.code() == kd::errc::invalid_argument);
    CHECK(kdtest::contains(s.message(), "projection gradient was given without a projection"));
  }
  SUBCASE("empty inputs") {
    f.x = MatD(0, f.ds);
    f.t = MatD(0, f.dt);
    f.dx = MatD();
    f.labels.clear();
    kd::loss_result r;
    MatD none;
    kd::matrix_view<double> x0{f.x.data(), 0, f.ds};
    kd::matrix_view<double> t0{f.t.data(), 0, f.dt};
    const kd::status s = f.loss(kd::cpu, x0, view(f.w), view(f.b), t0, f.labels, r);
    CHECK(s.code() == kd::errc::empty_input);
    CHECK(kdtest::contains(s.message(), "student hidden states are empty"));
  }
  SUBCASE("labels") {
    f.labels = {1, 2, 3};
    kd::status s = f.run();
    CHECK(s.code() == kd::errc::shape_mismatch);
    CHECK(kdtest::contains(s.message(), "labels has 3 entries"));
    f.labels = {1, -5, 2, 3};
    s = f.run();
    CHECK(s.code() == kd::errc::out_of_range);
    CHECK(kdtest::contains(s.message(), "label -5 at token 1"));
  }
  SUBCASE("token options") {
    f.loss.options.global_tokens = 2;  // 3 tokens are active
    kd::status s = f.run();
    CHECK(s.code() == kd::errc::invalid_argument);
    CHECK(kdtest::contains(s.message(), "global_tokens 2"));
    f.loss.options.global_tokens = -1;
    s = f.run();
    CHECK(s.code() == kd::errc::invalid_argument);
    CHECK(kdtest::contains(s.message(), "global_tokens is negative"));
    f.loss.options.global_tokens = 0;
    f.loss.options.grad_scale = std::numeric_limits<double>::infinity();
    s = f.run();
    CHECK(s.code() == kd::errc::invalid_argument);
    CHECK(kdtest::contains(s.message(), "grad_scale"));
  }
  SUBCASE("eps <= 0") {
    for (double eps : {0.0, -1e-6, std::numeric_limits<double>::quiet_NaN(), std::numeric_limits<double>::infinity()}) {
      f.loss.options.eps = eps;
      const kd::status s = f.run();
      CHECK(s.code() == kd::errc::invalid_argument);
      CHECK(kdtest::contains(s.message(), "eps must be finite and > 0"));
    }
  }
  SUBCASE("NaN / Inf in each input names the tensor and the component") {
    const double nan = std::numeric_limits<double>::quiet_NaN(), inf = std::numeric_limits<double>::infinity();
    struct tc {
      MatD* m;
      const char* name;
    };
    for (tc c : {tc{&f.x, "in student hidden at token 2, column 1"}, tc{&f.w, "in projection at token 2, column 1"},
                 tc{&f.b, "in projection bias at token 0, column 1"}, tc{&f.t, "in teacher hidden at token 2, column 1"}}) {
      CAPTURE(c.name);
      for (double bad : {nan, -inf}) {
        const kd::index_t r = c.m->rows() > 1 ? 2 : 0;
        const double keep = (*c.m)(r, 1);
        (*c.m)(r, 1) = bad;
        f.loss.options.component = {};
        kd::status s = f.run();
        CHECK(s.code() == kd::errc::non_finite);
        CHECK(kdtest::contains(s.message(), std::string(std::isnan(bad) ? "NaN " : "Inf ") + c.name));
        CHECK(kdtest::contains(s.message(), "component 'feature'"));
        f.loss.options.component = "hidden_kd_layer7";
        s = f.run();
        CHECK(s.code() == kd::errc::non_finite);
        CHECK(kdtest::contains(s.message(), c.name));
        CHECK(kdtest::contains(s.message(), "component 'hidden_kd_layer7'"));
        (*c.m)(r, 1) = keep;
      }
    }
    // A NaN in an ignored token is still an error (the input is corrupt either way).
    f.loss.options.component = {};
    f.x(1, 0) = nan;
    CHECK(f.run().code() == kd::errc::non_finite);
  }
  SUBCASE("kd::check throws kd::error with the same message") {
    f.loss.options.eps = 0.0;
    try {
      kd::check(f.run());
      FAIL("kd::check did not throw");
    } catch (const kd::error& e) {
      CHECK(e.code() == kd::errc::invalid_argument);
      CHECK(kdtest::contains(e.what(), "eps must be finite"));
    }
  }
}
