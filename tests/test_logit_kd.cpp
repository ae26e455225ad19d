// Tests for kd::logit_kd (kd/loss/logit_kd.hpp, kd/loss/divergence.hpp, kd/loss/common.hpp) on the CPU
// reference backend: gradients against central finite differences (fp64), loss values against an
// independent straightforward implementation, gradient-accumulation invariance, 16-bit storage, and
// the error paths.
#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <span>
#include <string>
#include <type_traits>
#include <vector>

#include <kd/kd.hpp>

#include "divergence_ref.hpp"
#include "test_util.hpp"

namespace {

using kd::index_t;
using P64 = kd::precision_set<kd::fp64, kd::fp64>;
template <class D, class R = kd::token_mean>
using kd64 = kd::logit_kd<D, R, P64>;

constexpr std::int32_t kIgnore = kd::default_ignore_index;

// One batch of teacher/student logits in double (row-major, stride == cols).
struct problem {
  index_t n = 0, cols = 0, vocab = 0;  // vocab: real columns; [vocab, cols) is padding
  std::vector<double> teacher, student;
  std::vector<std::int32_t> labels;
  kd::matrix_view<const double> t() const { return {teacher.data(), n, cols}; }
  kd::matrix_view<const double> s() const { return {student.data(), n, cols}; }
};

// Random logits; `ignored` rows get the ignore label (never all of them).
problem make_problem(kdtest::rng_t& g, index_t n, index_t cols, index_t vocab, std::vector<index_t> ignored,
                     double scale = 1.5, std::int32_t ignore_index = kIgnore) {
  problem pr;
  pr.n = n;
  pr.cols = cols;
  pr.vocab = vocab;
  pr.teacher = kdtest::normal(static_cast<std::size_t>(n * cols), g, 0.0, scale);
  pr.student = kdtest::normal(static_cast<std::size_t>(n * cols), g, 0.0, scale);
  std::uniform_int_distribution<std::int32_t> lab(0, static_cast<std::int32_t>(vocab - 1));
  pr.labels.resize(static_cast<std::size_t>(n));
  for (auto& y : pr.labels) y = lab(g);
  for (auto r : ignored) pr.labels[static_cast<std::size_t>(r)] = ignore_index;
  return pr;
}

// ---- independent reference ------------------------------------------------------------------
std::vector<double> softmax_ref(const double* z, index_t v, double temp) {
  double mx = -INFINITY;
  for (index_t j = 0; j < v; ++j) mx = std::max(mx, z[j] / temp);
  std::vector<double> p(static_cast<std::size_t>(v));
  double sum = 0.0;
  for (index_t j = 0; j < v; ++j) sum += (p[static_cast<std::size_t>(j)] = std::exp(z[j] / temp - mx));
  for (auto& x : p) x /= sum;
  return p;
}

template <class D>
double loss_ref(const problem& pr, double temp, bool t2, double param, std::int32_t ignore = kIgnore,
                double divisor = 0.0) {
  double total = 0.0;
  index_t active = 0;
  for (index_t r = 0; r < pr.n; ++r) {
    if (pr.labels[static_cast<std::size_t>(r)] == ignore) continue;
    ++active;
    const auto p = softmax_ref(pr.teacher.data() + r * pr.cols, pr.vocab, temp);
    const auto q = softmax_ref(pr.student.data() + r * pr.cols, pr.vocab, temp);
    total += kdtest::divergence_ref<D>(p, q, param);
  }
  if (divisor == 0.0) divisor = active > 0 ? static_cast<double>(active) : 1.0;
  return total * (t2 ? temp * temp : 1.0) / divisor;
}

// ---- calling the library ----------------------------------------------------------------------
template <class D>
double param_of(const kd::logit_kd_options& o) {
  if constexpr (std::is_same_v<D, kd::jsd>) return o.beta;
  if constexpr (std::is_same_v<D, kd::skew_kl>) return o.alpha;
  return 0.0;
}

template <class D>
void set_param(kd::logit_kd_options& o, double param) {
  if constexpr (std::is_same_v<D, kd::jsd>) o.beta = param;
  if constexpr (std::is_same_v<D, kd::skew_kl>) o.alpha = param;
}

template <class D, class R = kd::token_mean>
kd::loss_result run64(const kd::logit_kd_options& o, const problem& pr, std::vector<double>* grad = nullptr) {
  kd64<D, R> loss;
  loss.options = o;
  kd::loss_result res;
  const kd::status st = grad != nullptr
                            ? loss(kd::cpu, pr.t(), pr.s(), pr.labels, res, kd::matrix_view<double>(grad->data(), pr.n, pr.cols))
                            : loss(kd::cpu, pr.t(), pr.s(), pr.labels, res);
  if (!st.ok()) FAIL(st.message());  // not an assertion per call: this runs inside finite-difference loops
  return res;
}

// Smallest |p_j - q_j| over the real columns of the active rows (TVD has a kink at p == q).
double min_gap(const problem& pr, double temp) {
  double gap = INFINITY;
  for (index_t r = 0; r < pr.n; ++r) {
    if (pr.labels[static_cast<std::size_t>(r)] == kIgnore) continue;
    const auto p = softmax_ref(pr.teacher.data() + r * pr.cols, pr.vocab, temp);
    const auto q = softmax_ref(pr.student.data() + r * pr.cols, pr.vocab, temp);
    for (std::size_t j = 0; j < p.size(); ++j) gap = std::min(gap, std::abs(p[j] - q[j]));
  }
  return gap;
}

// Gradient vs central differences for one divergence over temperatures x T^2 scaling x
// (overwrite | accumulate with grad_scale), with ignored tokens and padding columns.
template <class D>
void check_gradients(double param, std::uint64_t seed) {
  auto g = kdtest::rng(seed);
  const index_t n = 5, cols = 9, vocab = 7;
  for (double temp : {0.5, 1.0, 2.0, 4.0}) {
    for (bool t2 : {true, false}) {
      for (int mode = 0; mode < 2; ++mode) {
        CAPTURE(temp);
        CAPTURE(t2);
        CAPTURE(mode);
        CAPTURE(param);
        problem pr = make_problem(g, n, cols, vocab, {1, 3});
        if constexpr (std::is_same_v<D, kd::tvd>)
          while (min_gap(pr, temp) < 1e-3) pr = make_problem(g, n, cols, vocab, {1, 3});
        kd::logit_kd_options o;
        o.temperature = temp;
        o.scale_by_t2 = t2;
        o.vocab = vocab;
        set_param<D>(o, param);
        const bool accumulate = mode == 1;
        const double gscale = accumulate ? 0.37 : 1.0;

        // Forward-only loss (what the finite differences see).
        kd::logit_kd_options fo = o;
        const auto f = [&] { return run64<D>(fo, pr).loss; };
        const double l0 = f();
        CHECK(kdtest::rel_error(l0, loss_ref<D>(pr, temp, t2, param)) < 1e-12);

        // Analytic gradient. Overwrite mode starts from NaN (every slot must be written);
        // accumulate mode from random values (which must be added to, and kept where nothing is added).
        std::vector<double> g0 =
            accumulate ? kdtest::normal(pr.student.size(), g) : std::vector<double>(pr.student.size(), NAN);
        std::vector<double> grad = g0;
        o.accumulate_grad = accumulate;
        o.grad_scale = gscale;
        const auto res = run64<D>(o, pr, &grad);
        CHECK(res.loss == doctest::Approx(l0).epsilon(1e-14));  // grad_scale does not scale the loss
        CHECK(res.tokens == 3);
        CHECK(res.normalizer == 3.0);

        std::vector<double> added(grad.size());
        for (std::size_t i = 0; i < grad.size(); ++i) added[i] = accumulate ? grad[i] - g0[i] : grad[i];
        std::vector<double> fd = kdtest::numeric_gradient(f, pr.student, 1e-5);
        for (auto& v : fd) v *= gscale;
        CHECK(kdtest::rel_error(added, fd) < 1e-6);

        // Padding columns and ignored rows: analytic gradient exactly 0 (slot untouched when accumulating)
        // and the loss does not move at all when they change.
        bool exact_zero = true, fd_zero = true;
        for (index_t r = 0; r < n; ++r)
          for (index_t c = 0; c < cols; ++c) {
            const bool dead = c >= vocab || pr.labels[static_cast<std::size_t>(r)] == kIgnore;
            if (!dead) continue;
            const auto i = static_cast<std::size_t>(r * cols + c);
            exact_zero = exact_zero && (accumulate ? grad[i] == g0[i] : grad[i] == 0.0);
            fd_zero = fd_zero && fd[i] == 0.0;
          }
        CHECK(exact_zero);
        CHECK(fd_zero);
      }
    }
  }
}

}  // namespace

// =====================================================================================================
// 1. Gradients vs finite differences
// =====================================================================================================
TEST_CASE("logit_kd forward_kl: gradient matches central finite differences") { check_gradients<kd::forward_kl>(0.0, 11); }
TEST_CASE("logit_kd reverse_kl: gradient matches central finite differences") { check_gradients<kd::reverse_kl>(0.0, 12); }
TEST_CASE("logit_kd jsd: gradient matches central finite differences for several beta") {
  for (double beta : {0.1, 0.5, 0.9}) check_gradients<kd::jsd>(beta, 13);
}
TEST_CASE("logit_kd skew_kl: gradient matches central finite differences for several alpha") {
  for (double alpha : {0.0, 0.1, 0.5, 0.9}) check_gradients<kd::skew_kl>(alpha, 14);
}
TEST_CASE("logit_kd tvd: gradient matches central finite differences away from p == q") { check_gradients<kd::tvd>(0.0, 15); }

TEST_CASE("logit_kd: custom ignore_index and the none reduction") {
  auto g = kdtest::rng(21);
  problem pr = make_problem(g, 6, 8, 8, {0, 4}, 1.5, /*ignore_index=*/-1);
  kd::logit_kd_options o;
  o.ignore_index = -1;
  o.temperature = 2.0;
  std::vector<double> grad(pr.student.size(), NAN);
  const auto res = run64<kd::jsd, kd::none>(o, pr, &grad);
  CHECK(res.tokens == 4);
  CHECK(res.normalizer == 1.0);
  CHECK(kdtest::rel_error(res.loss, loss_ref<kd::jsd>(pr, 2.0, true, 0.5, -1, 1.0)) < 1e-12);
  const auto fd = kdtest::numeric_gradient([&] { return run64<kd::jsd, kd::none>(o, pr).loss; }, pr.student);
  CHECK(kdtest::rel_error(grad, fd) < 1e-6);
  // token_mean divides the same sum by the 4 active tokens.
  CHECK(run64<kd::jsd>(o, pr).loss == doctest::Approx(res.loss / 4).epsilon(1e-13));
}

TEST_CASE("logit_kd: padding columns are never read") {
  auto g = kdtest::rng(22);
  problem pr = make_problem(g, 4, 10, 7, {2});
  kd::logit_kd_options o;
  o.vocab = 7;
  o.temperature = 1.5;
  std::vector<double> g1(pr.student.size()), g2(pr.student.size());
  const double l1 = run64<kd::forward_kl>(o, pr, &g1).loss;
  for (index_t r = 0; r < pr.n; ++r)
    for (index_t c = pr.vocab; c < pr.cols; ++c) {
      pr.teacher[static_cast<std::size_t>(r * pr.cols + c)] = (c % 2 ? 1e300 : -1e300);
      pr.student[static_cast<std::size_t>(r * pr.cols + c)] = (c % 2 ? -1e300 : 1e300);
    }
  const double l2 = run64<kd::forward_kl>(o, pr, &g2).loss;
  CHECK(l1 == l2);
  CHECK(g1 == g2);
  // Not even a NaN or Inf there matters: padding is excluded from both softmaxes and from the checks.
  pr.teacher[static_cast<std::size_t>(0 * pr.cols + 8)] = NAN;
  pr.student[static_cast<std::size_t>(1 * pr.cols + 9)] = INFINITY;
  std::vector<double> g3(pr.student.size());
  const double l3 = run64<kd::forward_kl>(o, pr, &g3).loss;
  CHECK(l1 == l3);
  CHECK(g1 == g3);
}

TEST_CASE("logit_kd: strided views give the same result as contiguous ones") {
  auto g = kdtest::rng(23);
  problem pr = make_problem(g, 5, 6, 6, {1});
  const index_t stride = 9;
  std::vector<double> ts(static_cast<std::size_t>(pr.n * stride), NAN), ss = ts;
  for (index_t r = 0; r < pr.n; ++r)
    for (index_t c = 0; c < pr.cols; ++c) {
      ts[static_cast<std::size_t>(r * stride + c)] = pr.teacher[static_cast<std::size_t>(r * pr.cols + c)];
      ss[static_cast<std::size_t>(r * stride + c)] = pr.student[static_cast<std::size_t>(r * pr.cols + c)];
    }
  kd64<kd::reverse_kl> loss;
  loss.options.temperature = 2.0;
  kd::loss_result r1, r2;
  std::vector<double> g1(pr.student.size());
  std::vector<double> g2(static_cast<std::size_t>(pr.n * stride), 7.0);
  REQUIRE(loss(kd::cpu, pr.t(), pr.s(), pr.labels, r1, kd::matrix_view<double>(g1.data(), pr.n, pr.cols)).ok());
  REQUIRE(loss(kd::cpu, kd::matrix_view<const double>(ts.data(), pr.n, pr.cols, stride),
               kd::matrix_view<const double>(ss.data(), pr.n, pr.cols, stride), pr.labels, r2,
               kd::matrix_view<double>(g2.data(), pr.n, pr.cols, stride))
              .ok());
  CHECK(r1.loss == r2.loss);
  bool same = true, gap_untouched = true;
  for (index_t r = 0; r < pr.n; ++r)
    for (index_t c = 0; c < stride; ++c) {
      const double v = g2[static_cast<std::size_t>(r * stride + c)];
      if (c < pr.cols)
        same = same && v == g1[static_cast<std::size_t>(r * pr.cols + c)];
      else
        gap_untouched = gap_untouched && v == 7.0;
    }
  CHECK(same);
  CHECK(gap_untouched);
}

// =====================================================================================================
// 2. Known values
// =====================================================================================================
TEST_CASE("logit_kd known values: forward KL of identical logits is 0 with zero gradient") {
  auto g = kdtest::rng(31);
  problem pr = make_problem(g, 4, 12, 10, {});
  pr.teacher = pr.student;
  for (double temp : {0.5, 1.0, 3.0}) {
    kd::logit_kd_options o;
    o.temperature = temp;
    o.vocab = 10;
    std::vector<double> grad(pr.student.size(), NAN);
    const auto res = run64<kd::forward_kl>(o, pr, &grad);
    CHECK(std::abs(res.loss) < 1e-15);
    CHECK(kdtest::norm(grad) < 1e-15);
    // Every divergence is 0 at p == q.
    CHECK(std::abs(run64<kd::reverse_kl>(o, pr).loss) < 1e-15);
    CHECK(std::abs(run64<kd::jsd>(o, pr).loss) < 1e-15);
    CHECK(std::abs(run64<kd::skew_kl>(o, pr).loss) < 1e-15);
    CHECK(std::abs(run64<kd::tvd>(o, pr).loss) < 1e-15);
  }
}

TEST_CASE("logit_kd known values: KL(p||q) by a straightforward double loop") {
  // 2 tokens x 3 classes, T = 2, computed with nothing but exp/log.
  const double t[6] = {1.0, 2.0, 0.5, -1.0, 0.0, 3.0};
  const double s[6] = {0.3, -0.2, 1.1, 2.0, -0.5, 0.25};
  const double temp = 2.0;
  double expected = 0.0;
  for (int r = 0; r < 2; ++r) {
    double zt = 0, zs = 0;
    for (int j = 0; j < 3; ++j) {
      zt += std::exp(t[r * 3 + j] / temp);
      zs += std::exp(s[r * 3 + j] / temp);
    }
    for (int j = 0; j < 3; ++j) {
      const double p = std::exp(t[r * 3 + j] / temp) / zt, q = std::exp(s[r * 3 + j] / temp) / zs;
      expected += p * std::log(p / q);
    }
  }
  expected = expected * temp * temp / 2.0;
  kd64<kd::forward_kl> loss;
  loss.options.temperature = temp;
  kd::loss_result res;
  REQUIRE(loss(kd::cpu, kd::matrix_view<const double>(t, 2, 3), kd::matrix_view<const double>(s, 2, 3),
               std::span<const std::int32_t>{}, res)
              .ok());
  CHECK(res.loss == doctest::Approx(expected).epsilon(1e-13));
  CHECK(res.tokens == 2);
}

TEST_CASE_TEMPLATE("logit_kd known values: loss equals the reference divergence, and T^2 scaling", D, kd::forward_kl,
                   kd::reverse_kl, kd::jsd, kd::skew_kl, kd::tvd) {
  auto g = kdtest::rng(32);
  problem pr = make_problem(g, 6, 9, 8, {2, 5});
  for (double temp : {0.5, 1.0, 2.0, 4.0}) {
    CAPTURE(temp);
    kd::logit_kd_options o;
    o.temperature = temp;
    o.vocab = 8;
    o.scale_by_t2 = true;
    const double with = run64<D>(o, pr).loss;
    o.scale_by_t2 = false;
    const double without = run64<D>(o, pr).loss;
    CHECK(with == doctest::Approx(temp * temp * without).epsilon(1e-13));
    CHECK(kdtest::rel_error(without, loss_ref<D>(pr, temp, false, param_of<D>(o))) < 1e-12);
    CHECK(without > 0.0);
  }
}

TEST_CASE("logit_kd known values: symmetric JSD, skew_kl(alpha = 0) == forward_kl, reverse_kl swaps roles") {
  auto g = kdtest::rng(33);
  problem pr = make_problem(g, 5, 7, 7, {3});
  problem sw = pr;
  std::swap(sw.teacher, sw.student);
  for (double temp : {0.5, 1.0, 2.0}) {
    CAPTURE(temp);
    kd::logit_kd_options o;
    o.temperature = temp;
    o.beta = 0.5;
    CHECK(run64<kd::jsd>(o, pr).loss == doctest::Approx(run64<kd::jsd>(o, sw).loss).epsilon(1e-13));
    // beta != 0.5 is not symmetric; swapping roles equals 1 - beta.
    o.beta = 0.2;
    const double a = run64<kd::jsd>(o, pr).loss;
    o.beta = 0.8;
    CHECK(a == doctest::Approx(run64<kd::jsd>(o, sw).loss).epsilon(1e-13));
    CHECK(std::abs(a - run64<kd::jsd>(o, pr).loss) > 1e-6);
    // beta = 0 and beta = 1 make m equal q or p: loss 0.
    for (double b : {0.0, 1.0}) {
      o.beta = b;
      std::vector<double> grad(pr.student.size(), NAN);
      CHECK(std::abs(run64<kd::jsd>(o, pr, &grad).loss) < 1e-15);
      CHECK(kdtest::norm(grad) < 1e-15);
    }
    o.alpha = 0.0;
    std::vector<double> gs(pr.student.size()), gf(pr.student.size());
    CHECK(run64<kd::skew_kl>(o, pr, &gs).loss == doctest::Approx(run64<kd::forward_kl>(o, pr, &gf).loss).epsilon(1e-13));
    CHECK(kdtest::rel_error(gs, gf) < 1e-12);
    // skew_kl(alpha = 1) compares p with itself.
    o.alpha = 1.0;
    CHECK(std::abs(run64<kd::skew_kl>(o, pr).loss) < 1e-15);
    // KL(q || p) with teacher and student swapped is KL(p || q).
    CHECK(run64<kd::reverse_kl>(o, sw).loss == doctest::Approx(run64<kd::forward_kl>(o, pr).loss).epsilon(1e-13));
    // TVD lies in [0, T^2].
    const double tv = run64<kd::tvd>(o, pr).loss;
    CHECK(tv > 0.0);
    CHECK(tv <= temp * temp);
  }
}

TEST_CASE("logit_kd known values: forward KL gradient is T (q - p) / N") {
  auto g = kdtest::rng(34);
  problem pr = make_problem(g, 6, 9, 8, {0, 4});
  for (double temp : {0.5, 1.0, 2.0, 4.0}) {
    CAPTURE(temp);
    kd::logit_kd_options o;
    o.temperature = temp;
    o.vocab = 8;
    std::vector<double> grad(pr.student.size(), NAN);
    const auto res = run64<kd::forward_kl>(o, pr, &grad);
    const double n_active = 4.0;
    CHECK(res.tokens == 4);
    std::vector<double> expected(pr.student.size(), 0.0);
    for (index_t r = 0; r < pr.n; ++r) {
      if (pr.labels[static_cast<std::size_t>(r)] == kIgnore) continue;
      const auto p = softmax_ref(pr.teacher.data() + r * pr.cols, pr.vocab, temp);
      const auto q = softmax_ref(pr.student.data() + r * pr.cols, pr.vocab, temp);
      for (index_t j = 0; j < pr.vocab; ++j)
        expected[static_cast<std::size_t>(r * pr.cols + j)] =
            temp * (q[static_cast<std::size_t>(j)] - p[static_cast<std::size_t>(j)]) / n_active;
    }
    CHECK(kdtest::rel_error(grad, expected) < 1e-13);
    // Without T^2 scaling the gradient is (q - p) / (T N).
    o.scale_by_t2 = false;
    std::vector<double> grad2(pr.student.size(), NAN);
    (void)run64<kd::forward_kl>(o, pr, &grad2);
    for (auto& e : expected) e /= temp * temp;
    CHECK(kdtest::rel_error(grad2, expected) < 1e-13);
  }
}

TEST_CASE("logit_kd known values: every token ignored gives loss 0, no tokens, zero gradient") {
  auto g = kdtest::rng(35);
  problem pr = make_problem(g, 3, 5, 5, {0, 1, 2});
  std::vector<double> grad(pr.student.size(), NAN);
  const auto res = run64<kd::jsd>(kd::logit_kd_options{}, pr, &grad);
  CHECK(res.loss == 0.0);
  CHECK(res.tokens == 0);
  CHECK(kdtest::norm(grad) == 0.0);
  CHECK(kd::count_tokens(pr.labels) == 0);
}

// =====================================================================================================
// 3. Gradient accumulation
// =====================================================================================================
TEST_CASE_TEMPLATE("logit_kd: micro-batches with global_tokens reproduce the full batch exactly", D, kd::forward_kl,
                   kd::reverse_kl, kd::jsd, kd::skew_kl, kd::tvd) {
  auto g = kdtest::rng(41);
  const index_t n = 16, cols = 11;
  // Ignored tokens bunched in the first half, so micro-batches hold different token counts.
  problem pr = make_problem(g, n, cols, 10, {0, 1, 2, 3, 5, 6, 12});
  kd::logit_kd_options o;
  o.temperature = 2.0;
  o.vocab = 10;
  const index_t total_tokens = kd::count_tokens(pr.labels);
  REQUIRE(total_tokens == 9);

  std::vector<double> full_grad(pr.student.size(), NAN);
  const double full = run64<D>(o, pr, &full_grad).loss;

  for (index_t k : {1, 2, 4, 8}) {
    CAPTURE(k);
    const index_t rows = n / k;
    kd64<D> loss;
    loss.options = o;
    loss.options.global_tokens = total_tokens;
    kd::logit_kd_options naive_o = o;  // what a trainer does without global_tokens: mean per micro-batch
    kd64<D> naive;
    naive.options = naive_o;
    double sum = 0.0, naive_mean = 0.0;
    std::vector<double> grad(pr.student.size(), NAN), naive_grad(pr.student.size(), NAN);
    for (index_t b = 0; b < k; ++b) {
      const auto off = static_cast<std::size_t>(b * rows * cols);
      const std::span<const std::int32_t> lab(pr.labels.data() + b * rows, static_cast<std::size_t>(rows));
      kd::matrix_view<const double> t(pr.teacher.data() + off, rows, cols), s(pr.student.data() + off, rows, cols);
      kd::loss_result res;
      REQUIRE(loss(kd::cpu, t, s, lab, res, kd::matrix_view<double>(grad.data() + off, rows, cols)).ok());
      CHECK(res.normalizer == static_cast<double>(total_tokens));
      CHECK(res.tokens == kd::count_tokens(lab));
      sum += res.loss;
      REQUIRE(naive(kd::cpu, t, s, lab, res, kd::matrix_view<double>(naive_grad.data() + off, rows, cols)).ok());
      naive_mean += res.loss / static_cast<double>(k);
      for (index_t i = 0; i < rows * cols; ++i) naive_grad[off + static_cast<std::size_t>(i)] /= static_cast<double>(k);
    }
    CHECK(kdtest::rel_error(sum, full) < 1e-12);
    CHECK(grad == full_grad);  // per-token arithmetic is identical: bit-for-bit the same gradient
    if (k > 1) {
      // Without global_tokens each micro-batch divides by its own count: the result depends on the split.
      CHECK(kdtest::rel_error(naive_mean, full) > 1e-3);
      CHECK(kdtest::rel_error(naive_grad, full_grad) > 1e-3);
    }
  }
}

TEST_CASE("logit_kd: accumulate_grad over micro-batch passes sums gradients into one buffer") {
  // Two passes over the same rows (e.g. two teachers) accumulate; grad_scale weighs each.
  auto g = kdtest::rng(42);
  problem pr = make_problem(g, 6, 8, 8, {2});
  kd::logit_kd_options o;
  o.temperature = 1.5;
  std::vector<double> a(pr.student.size()), b(pr.student.size()), acc(pr.student.size(), NAN);
  (void)run64<kd::forward_kl>(o, pr, &a);
  (void)run64<kd::reverse_kl>(o, pr, &b);
  kd::logit_kd_options o1 = o;
  o1.grad_scale = 0.25;
  (void)run64<kd::forward_kl>(o1, pr, &acc);  // overwrite (NaN-initialised buffer)
  kd::logit_kd_options o2 = o;
  o2.grad_scale = 0.75;
  o2.accumulate_grad = true;
  (void)run64<kd::reverse_kl>(o2, pr, &acc);
  std::vector<double> expected(a.size());
  for (std::size_t i = 0; i < a.size(); ++i) expected[i] = 0.25 * a[i] + 0.75 * b[i];
  CHECK(kdtest::rel_error(acc, expected) < 1e-14);
}

// =====================================================================================================
// 4. Precisions
// =====================================================================================================
namespace {

template <class T>
std::vector<T> rounded(const std::vector<double>& v) {
  std::vector<T> out(v.size());
  for (std::size_t i = 0; i < v.size(); ++i) out[i] = kdtest::from_double<T>(v[i]);
  return out;
}

// Loss and gradient in precision set P vs the fp64 reference on the same (rounded) inputs.
template <class D, class P>
void check_precision(double loss_tol, double grad_tol, index_t n, index_t cols, index_t vocab, bool forward_only,
                     std::uint64_t seed) {
  using TT = typename P::teacher::storage_type;
  using ST = typename P::student::storage_type;
  auto g = kdtest::rng(seed);
  problem pr = make_problem(g, n, cols, vocab, {1}, 2.0);
  const auto t = rounded<TT>(pr.teacher);
  const auto s = rounded<ST>(pr.student);
  pr.teacher = kdtest::to_doubles(t);  // the reference sees exactly the stored values
  pr.student = kdtest::to_doubles(s);
  for (double temp : {1.0, 2.0}) {
    CAPTURE(temp);
    kd::logit_kd_options o;
    o.temperature = temp;
    o.vocab = vocab;
    kd::logit_kd<D, kd::token_mean, P> loss;
    loss.options = o;
    kd::loss_result res;
    std::vector<ST> grad(s.size());
    std::vector<double> ref_grad(s.size());
    const kd::matrix_view<const TT> tv(t.data(), n, cols);
    const kd::matrix_view<const ST> sv(s.data(), n, cols);
    if (forward_only) {
      REQUIRE(loss(kd::cpu, tv, sv, pr.labels, res).ok());
    } else {
      REQUIRE(loss(kd::cpu, tv, sv, pr.labels, res, kd::matrix_view<ST>(grad.data(), n, cols)).ok());
    }
    const auto ref = run64<D>(o, pr, forward_only ? nullptr : &ref_grad);
    CHECK(kdtest::rel_error(res.loss, ref.loss) < loss_tol);
    CHECK(kdtest::rel_error(res.loss, loss_ref<D>(pr, temp, true, param_of<D>(o))) < loss_tol);
    if (!forward_only && grad_tol > 0) CHECK(kdtest::rel_error(grad, ref_grad) < grad_tol);
  }
}

template <class D>
void check_all_precisions(std::uint64_t seed) {
  using namespace kd;
  // TVD's gradient is a step function of sign(q - p); 16-bit rounding of the inputs can flip an entry
  // where p ~ q, so its 16-bit gradients are only compared in fp32 (loss still checked).
  constexpr double g16 = std::is_same_v<D, kd::tvd> ? 0.0 : 1e-2;
  SUBCASE("bf16") { check_precision<D, precision_set<bf16, bf16>>(1e-2, g16, 8, 64, 60, false, seed); }
  SUBCASE("fp16") { check_precision<D, precision_set<fp16, fp16>>(1e-2, g16, 8, 64, 60, false, seed); }
  SUBCASE("fp32") { check_precision<D, precision_set<fp32, fp32>>(1e-5, 1e-5, 8, 64, 60, false, seed); }
  SUBCASE("bf16 teacher, fp32 student") { check_precision<D, precision_set<bf16, fp32>>(1e-5, 1e-5, 8, 64, 60, false, seed); }
  SUBCASE("fp16 teacher, bf16 student") { check_precision<D, precision_set<fp16, bf16>>(1e-2, g16, 8, 64, 60, false, seed); }
  SUBCASE("bf16 teacher, fp64 student (double accumulation)") {
    check_precision<D, precision_set<bf16, fp64>>(1e-12, 1e-12, 8, 64, 60, false, seed);
  }
}

}  // namespace

TEST_CASE_TEMPLATE("logit_kd precisions: 16-bit and fp32 storage match the fp64 reference", D, kd::forward_kl,
                   kd::reverse_kl, kd::jsd, kd::skew_kl, kd::tvd) {
  check_all_precisions<D>(51);
}

TEST_CASE_TEMPLATE("logit_kd precisions at a realistic vocabulary (GPT-2: 50,257 padded to 50,304), forward only", D,
                   kd::forward_kl, kd::jsd) {
  using namespace kd;
  SUBCASE("bf16") { check_precision<D, precision_set<bf16, bf16>>(1e-2, 0, 3, 50304, 50257, true, 52); }
  SUBCASE("fp16") { check_precision<D, precision_set<fp16, fp16>>(1e-2, 0, 3, 50304, 50257, true, 52); }
  SUBCASE("fp32") { check_precision<D, precision_set<fp32, fp32>>(1e-5, 0, 3, 50304, 50257, true, 52); }
}

// =====================================================================================================
// 8. Bad input
// =====================================================================================================
namespace {

struct bad_input_fixture {
  index_t n = 4, cols = 6;
  std::vector<double> t, s, grad;
  std::vector<std::int32_t> labels{1, kIgnore, 3, 0};
  bad_input_fixture() {
    auto g = kdtest::rng(61);
    t = kdtest::normal(static_cast<std::size_t>(n * cols), g);
    s = kdtest::normal(static_cast<std::size_t>(n * cols), g);
    grad.assign(s.size(), 0.0);
  }
  template <class D = kd::forward_kl>
  kd::status call(const kd::logit_kd_options& o, kd::matrix_view<const double> tv, kd::matrix_view<const double> sv,
                  kd::matrix_view<double> gv, std::span<const std::int32_t> lab) const {
    kd64<D> loss;
    loss.options = o;
    kd::loss_result res;
    return loss(kd::cpu, tv, sv, lab, res, gv);
  }
  template <class D = kd::forward_kl>
  kd::status call(const kd::logit_kd_options& o = {}) {
    return call<D>(o, {t.data(), n, cols}, {s.data(), n, cols}, {grad.data(), n, cols}, labels);
  }
};

#define KD_CHECK_STATUS(expr, expected_code, ...)                                   \
  do {                                                                              \
    const kd::status st_ = (expr);                                                  \
    INFO("message: " << st_.message());                                             \
    CHECK(st_.code() == (expected_code));                                           \
    for (const char* needle_ : {__VA_ARGS__}) CHECK(kdtest::contains(st_.message(), needle_)); \
  } while (0)

}  // namespace

TEST_CASE("logit_kd bad input: the happy path of the fixture is ok") {
  bad_input_fixture f;
  CHECK(f.call().ok());
  CHECK(f.call<kd::tvd>().ok());
}

TEST_CASE("logit_kd bad input: shape mismatches") {
  bad_input_fixture f;
  kd::logit_kd_options o;
  // Teacher has fewer rows than student.
  KD_CHECK_STATUS(f.call(o, {f.t.data(), 3, f.cols}, {f.s.data(), 4, f.cols}, {f.grad.data(), 4, f.cols}, f.labels),
                  kd::errc::shape_mismatch, "teacher logits", "student logits", "3", "4");
  // Different vocabulary widths without a map.
  KD_CHECK_STATUS(f.call(o, {f.t.data(), 4, 5}, {f.s.data(), 4, 6}, {f.grad.data(), 4, 6}, f.labels),
                  kd::errc::shape_mismatch, "teacher logits have 5 columns", "student logits have 6", "vocab_map");
  // Labels of the wrong length.
  const std::vector<std::int32_t> three{1, 2, 3};
  KD_CHECK_STATUS(f.call(o, {f.t.data(), 4, 6}, {f.s.data(), 4, 6}, {f.grad.data(), 4, 6}, three),
                  kd::errc::shape_mismatch, "labels", "3", "4 rows");
  // Gradient of the wrong shape (rows, then cols).
  KD_CHECK_STATUS(f.call(o, {f.t.data(), 4, 6}, {f.s.data(), 4, 6}, {f.grad.data(), 3, 6}, f.labels),
                  kd::errc::shape_mismatch, "student gradient", "[3 x 6]", "[4 x 6]");
  KD_CHECK_STATUS(f.call(o, {f.t.data(), 4, 6}, {f.s.data(), 4, 6}, {f.grad.data(), 4, 5}, f.labels),
                  kd::errc::shape_mismatch, "student gradient", "[4 x 5]");
}

TEST_CASE("logit_kd bad input: stride smaller than cols, null data") {
  bad_input_fixture f;
  kd::logit_kd_options o;
  KD_CHECK_STATUS(f.call(o, {f.t.data(), 4, 6, 5}, {f.s.data(), 4, 6}, {f.grad.data(), 4, 6}, f.labels),
                  kd::errc::shape_mismatch, "teacher logits", "stride 5");
  KD_CHECK_STATUS(f.call(o, {f.t.data(), 4, 6}, {f.s.data(), 4, 6, 2}, {f.grad.data(), 4, 6}, f.labels),
                  kd::errc::shape_mismatch, "student logits", "stride 2");
  KD_CHECK_STATUS(f.call(o, {f.t.data(), 4, 6}, {f.s.data(), 4, 6}, {f.grad.data(), 4, 6, 3}, f.labels),
                  kd::errc::shape_mismatch, "student gradient", "stride 3");
  KD_CHECK_STATUS(f.call(o, {nullptr, 4, 6}, {f.s.data(), 4, 6}, {f.grad.data(), 4, 6}, f.labels),
                  kd::errc::invalid_argument, "teacher logits", "null");
}

TEST_CASE("logit_kd bad input: empty batch") {
  bad_input_fixture f;
  kd::logit_kd_options o;
  const std::span<const std::int32_t> none;
  KD_CHECK_STATUS(f.call(o, {f.t.data(), 0, 6}, {f.s.data(), 0, 6}, {f.grad.data(), 0, 6}, none),
                  kd::errc::empty_input, "student logits", "empty", "'kd'");
  KD_CHECK_STATUS(f.call(o, {f.t.data(), 4, 0}, {f.s.data(), 4, 0}, {f.grad.data(), 4, 0}, f.labels),
                  kd::errc::empty_input, "empty");
}

TEST_CASE("logit_kd bad input: temperature <= 0, NaN or Inf") {
  bad_input_fixture f;
  for (double temp : {0.0, -1.0, std::nan(""), std::numeric_limits<double>::infinity()}) {
    CAPTURE(temp);
    kd::logit_kd_options o;
    o.temperature = temp;
    KD_CHECK_STATUS(f.call(o), kd::errc::invalid_argument, "temperature", "'kd'");
  }
}

TEST_CASE("logit_kd bad input: labels outside the vocabulary") {
  bad_input_fixture f;
  kd::logit_kd_options o;
  f.labels[2] = 6;  // == cols
  KD_CHECK_STATUS(f.call(o), kd::errc::out_of_range, "label 6", "token 2", "[0, 6)");
  f.labels[2] = -5;  // negative and not the ignore index
  KD_CHECK_STATUS(f.call(o), kd::errc::out_of_range, "label -5", "token 2");
  // With padding, a label in the padded range is outside the vocabulary.
  f.labels[2] = 5;
  o.vocab = 5;
  KD_CHECK_STATUS(f.call(o), kd::errc::out_of_range, "label 5", "token 2", "[0, 5)");
  // vocab itself must fit the columns.
  o.vocab = 7;
  f.labels[2] = 1;
  KD_CHECK_STATUS(f.call(o), kd::errc::out_of_range, "vocab 7", "6");
  o.vocab = -1;
  KD_CHECK_STATUS(f.call(o), kd::errc::out_of_range, "vocab -1");
}

TEST_CASE("logit_kd bad input: NaN and Inf in teacher and student logits name component and token") {
  for (const char* component : {"", "distill/teacher0"}) {
    const std::string comp = *component ? component : "kd";
    const std::string quoted = "'" + comp + "'";
    CAPTURE(comp);
    kd::logit_kd_options o;
    o.component = component;
    {
      bad_input_fixture f;
      f.t[2 * 6 + 4] = NAN;
      KD_CHECK_STATUS(f.call(o), kd::errc::non_finite, "NaN", "teacher logits", "token 2", "column 4",
                      quoted.c_str());
    }
    {
      bad_input_fixture f;
      f.t[3 * 6 + 0] = -INFINITY;
      KD_CHECK_STATUS(f.call(o), kd::errc::non_finite, "Inf", "teacher logits", "token 3", quoted.c_str());
    }
    {
      bad_input_fixture f;
      f.s[0 * 6 + 1] = NAN;
      KD_CHECK_STATUS(f.call<kd::jsd>(o), kd::errc::non_finite, "NaN", "student logits", "token 0",
                      quoted.c_str());
    }
    {
      bad_input_fixture f;
      f.s[3 * 6 + 5] = INFINITY;
      KD_CHECK_STATUS(f.call<kd::tvd>(o), kd::errc::non_finite, "Inf", "student logits", "token 3",
                      quoted.c_str());
    }
    {
      // Forward-only calls check too.
      bad_input_fixture f;
      f.s[2 * 6 + 2] = NAN;
      kd64<kd::forward_kl> loss;
      loss.options = o;
      kd::loss_result res;
      KD_CHECK_STATUS(loss(kd::cpu, kd::matrix_view<const double>(f.t.data(), 4, 6),
                           kd::matrix_view<const double>(f.s.data(), 4, 6), f.labels, res),
                      kd::errc::non_finite, "student logits", "token 2", quoted.c_str());
    }
  }
}

TEST_CASE("logit_kd bad input: beta and alpha outside [0, 1]") {
  bad_input_fixture f;
  for (double v : {-0.1, 1.5, std::nan("")}) {
    CAPTURE(v);
    kd::logit_kd_options o;
    o.beta = v;
    KD_CHECK_STATUS(f.call<kd::jsd>(o), kd::errc::invalid_argument, "beta", "'kd'");
    CHECK(f.call<kd::forward_kl>(o).ok());  // beta is not a forward_kl parameter
    o = {};
    o.alpha = v;
    KD_CHECK_STATUS(f.call<kd::skew_kl>(o), kd::errc::invalid_argument, "alpha", "'kd'");
    CHECK(f.call<kd::jsd>(o).ok());
  }
}

TEST_CASE("logit_kd bad input: global_tokens and grad_scale") {
  bad_input_fixture f;  // 3 active tokens
  kd::logit_kd_options o;
  o.global_tokens = 2;
  KD_CHECK_STATUS(f.call(o), kd::errc::invalid_argument, "global_tokens 2", "3 tokens");
  o.global_tokens = -1;
  KD_CHECK_STATUS(f.call(o), kd::errc::invalid_argument, "global_tokens", "negative");
  o.global_tokens = 3;
  CHECK(f.call(o).ok());
  o.global_tokens = 0;
  o.grad_scale = NAN;
  KD_CHECK_STATUS(f.call(o), kd::errc::invalid_argument, "grad_scale");
}

TEST_CASE("kd::check throws kd::error carrying code and message") {
  bad_input_fixture f;
  kd::logit_kd_options o;
  o.temperature = -2.0;
  o.component = "my_kd";
  const kd::status st = f.call(o);
  REQUIRE_FALSE(st.ok());
  CHECK_FALSE(static_cast<bool>(st));
  CHECK_THROWS_AS(kd::check(st), kd::error);
  try {
    kd::check(st);
    FAIL("kd::check did not throw");
  } catch (const kd::error& e) {
    CHECK(e.code() == kd::errc::invalid_argument);
    CHECK(kdtest::contains(e.what(), st.message()));
    CHECK(kdtest::contains(e.what(), "invalid argument"));
    CHECK(kdtest::contains(e.what(), "my_kd"));
  }
  CHECK_NOTHROW(kd::check(f.call()));
  CHECK_NOTHROW(kd::check(kd::ok_status()));
  CHECK(kd::to_string(kd::errc::non_finite) == "non-finite value");
}

// =====================================================================================================
// 9. Defects found by a long-double reference run
// =====================================================================================================
// fp32 CPU vs fp64 CPU at a realistic vocabulary: the fp32 reference accumulates its row sums in double,
// so its loss agrees with the fp64 one to ~1e-6 relative (term-by-term float sums drift by ~3e-5).
TEST_CASE_TEMPLATE("logit_kd fp32 CPU reference matches fp64 to 1e-6 relative at V = 50,304", D, kd::jsd, kd::tvd) {
  using namespace kd;
  const index_t n = 3, v = 50304;
  auto g = kdtest::rng(91);
  problem pr = make_problem(g, n, v, v, {}, 2.0);
  const auto t = rounded<float>(pr.teacher);
  const auto s = rounded<float>(pr.student);
  pr.teacher = kdtest::to_doubles(t);
  pr.student = kdtest::to_doubles(s);
  logit_kd<D, token_mean, precision_set<fp32, fp32>> loss32;
  kd64<D> loss64;
  loss_result r32, r64;
  REQUIRE(loss32(cpu, matrix_view<const float>(t.data(), n, v), matrix_view<const float>(s.data(), n, v), pr.labels, r32).ok());
  REQUIRE(loss64(cpu, pr.t(), pr.s(), pr.labels, r64).ok());
  CAPTURE(r32.loss);
  CAPTURE(r64.loss);
  CHECK(kdtest::rel_error(r32.loss, r64.loss) < 1e-6);
}

// Close distributions (KL ~0.04-0.07 nats), logits around 0 or shifted: in float the two log-normalizers'
// rounding (a constant of each row's log p and log q) was most of the error of the value (forward and
// reverse KL 1.6e-6 to 2.3e-5, skew KL 3e-6 to 3.2e-5 at V = 50,304) and of the gradient (1.5e-6 to
// 2.7e-5 norm-relative at logits up to 400 from the teacher's). The backend knows each rounding exactly
// (kd::detail::split_lse): p and q are scaled back, the value takes its shift back
// (divergence_math::log_shift). Measured: forward and reverse KL's value <= 1.1e-7, skew KL's and JSD's
// <= 5.3e-6, every gradient <= 3.4e-6.
TEST_CASE_TEMPLATE("logit_kd fp32 CPU: close distributions, shifted logits, value and gradient within a few 1e-6 of fp64",
                   D, kd::forward_kl, kd::reverse_kl, kd::skew_kl, kd::jsd) {
  using namespace kd;
  const index_t n = 3, v = 50304;
  auto g = kdtest::rng(93);
  constexpr bool kl = std::is_same_v<D, forward_kl> || std::is_same_v<D, reverse_kl>;
  for (const double temperature : {1.0, 2.0})
    for (const double offset : {0.0, 30.0, -150.0, 400.0}) {
      CAPTURE(temperature);
      CAPTURE(offset);
      const auto pair = kdtest::close_pair(static_cast<std::size_t>(n * v), g, offset);
      const auto t = rounded<float>(pair.teacher);
      const auto s = rounded<float>(pair.student);
      const auto t64 = kdtest::to_doubles(t), s64 = kdtest::to_doubles(s);
      logit_kd<D, token_mean, precision_set<fp32, fp32>> loss32;
      kd64<D> loss64;
      loss32.options.temperature = loss64.options.temperature = temperature;
      loss32.options.alpha = loss64.options.alpha = 0.2;
      loss32.options.beta = loss64.options.beta = 0.3;
      loss_result r32, r64;
      std::vector<float> g32(t.size());
      std::vector<double> g64(t.size());
      REQUIRE(loss32(cpu, matrix_view<const float>(t.data(), n, v), matrix_view<const float>(s.data(), n, v), {}, r32,
                     matrix_view<float>(g32.data(), n, v))
                  .ok());
      REQUIRE(loss64(cpu, matrix_view<const double>(t64.data(), n, v), matrix_view<const double>(s64.data(), n, v), {}, r64,
                     matrix_view<double>(g64.data(), n, v))
                  .ok());
      CAPTURE(r32.loss);
      CAPTURE(r64.loss);
      CHECK(kdtest::rel_error(r32.loss, r64.loss) < (kl ? 5e-7 : 1e-5));
      CHECK(kdtest::rel_error(g32, g64) < 5e-6);
    }
}

// A finite logit whose x / T overflows float (the CUDA kernel's y = x * float(1/T) * log2(e)) is rejected
// by the CPU backend too, on the side each divergence reads, with and without a vocab map.
TEST_CASE_TEMPLATE("logit_kd: a finite logit that overflows at the temperature is rejected, naming the row", D,
                   kd::forward_kl, kd::reverse_kl, kd::skew_kl, kd::jsd, kd::tvd) {
  using namespace kd;
  const index_t n = 3, v = 6;
  auto g = kdtest::rng(92);
  std::vector<float> t(n * v), s(n * v), grad(n * v);
  kdtest::fill_normal(t, g);
  kdtest::fill_normal(s, g);
  const std::vector<std::int32_t> labels{0, 1, 2};
  vocab_map map;
  REQUIRE(vocab_map::from_pairs({{0, 0}, {1, 1}, {2, 2}, {3, 3}, {4, 4}, {5, 5}}, v, v, map).ok());
  for (const bool mapped : {false, true}) {
    for (const bool teacher_side : {true, false}) {
      CAPTURE(mapped);
      CAPTURE(teacher_side);
      auto tt = t, ss = s;
      (teacher_side ? tt : ss)[1 * v + 2] = 3e38f;
      logit_kd<D, token_mean, precision_set<fp32, fp32>> loss;
      loss.options.temperature = 0.5;
      loss.options.component = "distill";
      if (mapped) loss.options.map = &map;
      loss_result res;
      KD_CHECK_STATUS(loss(cpu, matrix_view<const float>(tt.data(), n, v), matrix_view<const float>(ss.data(), n, v),
                           labels, res, matrix_view<float>(grad.data(), n, v)),
                      errc::non_finite, teacher_side ? "teacher logits" : "student logits", "token 1", "column 2",
                      "overflows", "temperature", "'distill'");
      // Forward only too.
      KD_CHECK_STATUS(loss(cpu, matrix_view<const float>(tt.data(), n, v), matrix_view<const float>(ss.data(), n, v),
                           labels, res),
                      errc::non_finite, "token 1", "overflows");
      // A large logit that stays finite once scaled is accepted.
      (teacher_side ? tt : ss)[1 * v + 2] = 1e30f;
      CHECK(loss(cpu, matrix_view<const float>(tt.data(), n, v), matrix_view<const float>(ss.data(), n, v), labels, res,
                 matrix_view<float>(grad.data(), n, v))
                .ok());
    }
  }
}

TEST_CASE("linear_logit_kd: a teacher logit that overflows at the temperature is rejected") {
  using namespace kd;
  const index_t n = 2, d = 3, v = 5;
  auto g = kdtest::rng(93);
  std::vector<float> h(n * d), w(v * d), t(n * v), dh(n * d), dw(v * d);
  kdtest::fill_normal(h, g);
  kdtest::fill_normal(w, g);
  kdtest::fill_normal(t, g);
  t[1 * v + 3] = -3e38f;
  linear_logit_kd<forward_kl> loss;
  loss.options.temperature = 0.5;
  loss_result res;
  KD_CHECK_STATUS(loss(cpu, matrix_view<const float>(h.data(), n, d), matrix_view<const float>(w.data(), v, d),
                       matrix_view<const float>(t.data(), n, v), std::span<const std::int32_t>{}, res,
                       matrix_view<float>(dh.data(), n, d), matrix_view<float>(dw.data(), v, d)),
                  errc::non_finite, "teacher logits", "token 1", "column 3", "overflows", "'kd'");
}

// The teacher as hidden states and LM head: the same loss and gradients as on its logits computed
// beforehand (fp64, so the two orders of the same products agree to rounding), with and without a
// vocabulary map, over several chunks, with ignored labels; bad teacher shapes are named.
TEST_CASE("linear_logit_kd with a teacher_head equals it on the teacher's logits") {
  using namespace kd;
  const index_t n = 7, d = 5, dt = 6, v = 11;
  auto g = kdtest::rng(94);
  std::vector<std::int32_t> labels{1, -100, 3, 4, 0, -100, 9};
  vocab_map map;
  REQUIRE(vocab_map::from_pairs({{0, 0}, {2, 1}, {3, 1}, {5, 4}, {7, 9}, {8, 10}, {12, 3}}, 13, v, map).ok());
  for (const bool mapped : {false, true}) {
    for (const index_t chunk : {index_t{3}, index_t{64}}) {
      CAPTURE(mapped);
      CAPTURE(chunk);
      const index_t vt = mapped ? 13 : v;
      std::vector<double> h(n * d), w(v * d), th(n * dt), tw(vt * dt), t(n * vt, 0.0);
      kdtest::fill_normal(h, g);
      kdtest::fill_normal(w, g);
      kdtest::fill_normal(th, g);
      kdtest::fill_normal(tw, g);
      for (index_t r = 0; r < n; ++r)
        for (index_t c = 0; c < vt; ++c)
          for (index_t k = 0; k < dt; ++k) t[r * vt + c] += th[r * dt + k] * tw[c * dt + k];
      linear_logit_kd<jsd, token_mean, precision_set<fp64, fp64, fp64>> loss;
      loss.options.temperature = 2.0;
      loss.options.chunk_rows = chunk;
      loss.options.map = mapped ? &map : nullptr;
      std::vector<double> dh0(n * d), dw0(v * d), dh1(n * d), dw1(v * d);
      loss_result r0, r1;
      REQUIRE(loss(cpu, matrix_view<const double>(h.data(), n, d), matrix_view<const double>(w.data(), v, d),
                   matrix_view<const double>(t.data(), n, vt), labels, r0, matrix_view<double>(dh0.data(), n, d),
                   matrix_view<double>(dw0.data(), v, d))
                  .ok());
      const teacher_head<double> head{matrix_view<const double>(th.data(), n, dt), matrix_view<const double>(tw.data(), vt, dt)};
      REQUIRE(loss(cpu, matrix_view<const double>(h.data(), n, d), matrix_view<const double>(w.data(), v, d), head, labels,
                   r1, matrix_view<double>(dh1.data(), n, d), matrix_view<double>(dw1.data(), v, d))
                  .ok());
      CHECK(r1.loss == doctest::Approx(r0.loss).epsilon(1e-12));
      CHECK(r1.loss > 0.0);
      CHECK(r1.tokens == r0.tokens);
      for (std::size_t i = 0; i < dh0.size(); ++i) CHECK(dh1[i] == doctest::Approx(dh0[i]).epsilon(1e-10));
      for (std::size_t i = 0; i < dw0.size(); ++i) CHECK(dw1[i] == doctest::Approx(dw0[i]).epsilon(1e-10));
    }
  }
  // Bad teacher shapes.
  linear_logit_kd<forward_kl> loss;
  std::vector<float> h(n * d, 0.5f), w(v * d, 0.25f), th(n * dt, 0.5f), tw(v * dt, 0.1f), dh(n * d), dw(v * d);
  loss_result res;
  auto call = [&](matrix_view<const float> thv, matrix_view<const float> twv) {
    return loss(cpu, matrix_view<const float>(h.data(), n, d), matrix_view<const float>(w.data(), v, d),
                teacher_head<float>{thv, twv}, labels, res, matrix_view<float>(dh.data(), n, d),
                matrix_view<float>(dw.data(), v, d));
  };
  KD_CHECK_STATUS(call({th.data(), n - 1, dt}, {tw.data(), v, dt}), errc::shape_mismatch, "teacher hidden has 6 tokens",
                  "'kd'");
  KD_CHECK_STATUS(call({th.data(), n, dt}, {tw.data(), v, dt - 1}), errc::shape_mismatch, "teacher LM head", "width is 6");
  KD_CHECK_STATUS(call({th.data(), n, dt}, {tw.data(), v - 1, dt}), errc::shape_mismatch, "teacher");  // V_t != V, no map
  KD_CHECK_STATUS(call({nullptr, n, dt}, {tw.data(), v, dt}), errc::invalid_argument, "teacher hidden", "null");
}

// linear_kd_logits::storage rounds each logit once to the storage type: the loss is logit_kd's on those
// rounded logits (bf16 hidden states and head whose products are exact in float), and an unknown mode
// is refused.
TEST_CASE("linear_logit_kd: logits in the storage type are logit_kd on the rounded logits") {
  using T = kd::bfloat16;
  const kd::index_t n = 3, d = 4, v = 5;
  std::vector<T> h(n * d), w(v * d), t(n * v), dh(n * d), dw(v * d);
  std::vector<float> logits(n * v), rounded(n * v);
  for (kd::index_t i = 0; i < n * d; ++i) h[i] = T(static_cast<float>((i * 7) % 25 - 12) / 8.f);
  for (kd::index_t i = 0; i < v * d; ++i) w[i] = T(static_cast<float>((i * 5) % 23 - 11) * 5.f / 64.f);
  for (kd::index_t i = 0; i < n * v; ++i) t[i] = T(static_cast<float>((i * 3) % 7 - 3) * 0.7f);
  bool any_rounded = false;
  for (kd::index_t r = 0; r < n; ++r)
    for (kd::index_t c = 0; c < v; ++c) {
      float acc = 0;
      for (kd::index_t k = 0; k < d; ++k) acc += static_cast<float>(h[r * d + k]) * static_cast<float>(w[c * d + k]);
      logits[r * v + c] = acc;
      rounded[r * v + c] = static_cast<float>(T(acc));
      any_rounded = any_rounded || rounded[r * v + c] != acc;
    }
  REQUIRE(any_rounded);  // the case must exercise the rounding
  using P = kd::precision_set<kd::bf16, kd::bf16, kd::bf16>;
  kd::linear_logit_kd<kd::forward_kl, kd::token_mean, P> lin;
  lin.options.temperature = 0.5;
  kd::logit_kd<kd::forward_kl, kd::token_mean, kd::precision_set<kd::bf16, kd::fp32>> lk;
  static_cast<kd::logit_kd_options&>(lk.options) = lin.options;
  auto run_linear = [&](kd::linear_kd_logits mode, kd::loss_result& res) {
    lin.options.logits = mode;
    return lin(kd::cpu, kd::matrix_view<const T>(h.data(), n, d), kd::matrix_view<const T>(w.data(), v, d),
               kd::matrix_view<const T>(t.data(), n, v), {}, res, kd::matrix_view<T>(dh.data(), n, d),
               kd::matrix_view<T>(dw.data(), v, d));
  };
  auto run_logits = [&](const std::vector<float>& s) {
    kd::loss_result res;
    std::vector<float> g(n * v);
    REQUIRE(lk(kd::cpu, kd::matrix_view<const T>(t.data(), n, v), kd::matrix_view<const float>(s.data(), n, v), {}, res,
               kd::matrix_view<float>(g.data(), n, v))
                .ok());
    return res.loss;
  };
  kd::loss_result acc_res, st_res;
  REQUIRE(run_linear(kd::linear_kd_logits::accumulation, acc_res).ok());
  REQUIRE(run_linear(kd::linear_kd_logits::storage, st_res).ok());
  CHECK(acc_res.loss == doctest::Approx(run_logits(logits)).epsilon(1e-6));
  CHECK(st_res.loss == doctest::Approx(run_logits(rounded)).epsilon(1e-6));
  CHECK(st_res.loss != doctest::Approx(acc_res.loss).epsilon(1e-6));
  KD_CHECK_STATUS(run_linear(static_cast<kd::linear_kd_logits>(7), st_res), kd::errc::invalid_argument,
                  "linear_kd_options::logits");
}

// linear_kd_options::chunk_rows = 0 (the default) runs as many rows as fit the scratch of 2048 rows of fp32
// logits on the CUDA path: exact values for each logit type and teacher form, at most N rows, an explicit
// chunk as given; on the CPU the default chunk gives the result of explicit ones, and a negative chunk is
// refused.
TEST_CASE("linear_logit_kd: the default chunk takes the scratch of 2048 fp32-logit rows") {
  using kd::detail::linear_kd_chunk;
  kd::linear_kd_options o;
  CHECK(o.chunk_rows == 0);
  const kd::index_t big = 1 << 20, v = 50304;
  // fp32 logits: 2048 rows whatever the types.
  CHECK(linear_kd_chunk(o, big, v, 0, 2, 0) == 2048);
  CHECK(linear_kd_chunk(o, big, v, 3 * v, 2, 2) == 2048);
  CHECK(linear_kd_chunk(o, big, v, 0, 4, 0) == 2048);
  o.logits = kd::linear_kd_logits::storage;
  CHECK(linear_kd_chunk(o, big, v, 0, 2, 0) == 6144);          // 4 + 2 bytes an entry against 2
  CHECK(linear_kd_chunk(o, big, v, v, 2, 2) == 5120);          // 4 + 2 + 4 against 2 + 2
  CHECK(linear_kd_chunk(o, big, v, 3 * v, 2, 2) == 4608);      // 6 + 12 against 2 + 6
  CHECK(linear_kd_chunk(o, big, v, v, 2, 4) == 3328);          // 10 against 6: 3413 rounded down to 256s
  CHECK(linear_kd_chunk(o, big, v, v, 4, 4) == 2048);          // fp32 storage: the same scratch
  CHECK(linear_kd_chunk(o, big, v, 0, 8, 0) == 2048);          // never below 2048 (the CPU's doubles)
  CHECK(linear_kd_chunk(o, 1000, v, 0, 2, 0) == 1000);         // at most N
  o.chunk_rows = 100;
  CHECK(linear_kd_chunk(o, big, v, v, 2, 2) == 100);
  CHECK(linear_kd_chunk(o, 64, v, v, 2, 2) == 64);

  // The CPU backend: the default chunk (one chunk here) against chunks of 2 and 3 rows.
  const kd::index_t n = 7, d = 3, sv = 6;
  auto g = kdtest::rng(17);
  std::vector<double> h(n * d), w(sv * d), t(n * sv);
  kdtest::fill_normal(h, g);
  kdtest::fill_normal(w, g);
  kdtest::fill_normal(t, g);
  const std::vector<std::int32_t> labels{1, -100, 3, 4, 0, 5, 2};
  kd::linear_logit_kd<kd::forward_kl, kd::token_mean, kd::precision_set<kd::fp64, kd::fp64, kd::fp64>> loss;
  loss.options.temperature = 2.0;
  auto run = [&](kd::index_t chunk, std::vector<double>& dh, std::vector<double>& dw, kd::loss_result& r) {
    loss.options.chunk_rows = chunk;
    dh.assign(n * d, 0.0);
    dw.assign(sv * d, 0.0);
    return loss(kd::cpu, kd::matrix_view<const double>(h.data(), n, d), kd::matrix_view<const double>(w.data(), sv, d),
                kd::matrix_view<const double>(t.data(), n, sv), labels, r, kd::matrix_view<double>(dh.data(), n, d),
                kd::matrix_view<double>(dw.data(), sv, d));
  };
  std::vector<double> dh0, dw0, dh1, dw1;
  kd::loss_result r0, r1;
  REQUIRE(run(0, dh0, dw0, r0).ok());
  for (const kd::index_t chunk : {kd::index_t{2}, kd::index_t{3}}) {
    CAPTURE(chunk);
    REQUIRE(run(chunk, dh1, dw1, r1).ok());
    CHECK(r1.loss == doctest::Approx(r0.loss).epsilon(1e-13));
    for (std::size_t i = 0; i < dh0.size(); ++i) CHECK(dh1[i] == doctest::Approx(dh0[i]).epsilon(1e-12));
    for (std::size_t i = 0; i < dw0.size(); ++i) CHECK(dw1[i] == doctest::Approx(dw0[i]).epsilon(1e-12));
  }
  KD_CHECK_STATUS(run(-1, dh1, dw1, r1), kd::errc::invalid_argument, "chunk_rows must be positive, or 0", "(got -1)");
}

// Every validation error names the component, including gradient shape / stride / null checks.
TEST_CASE("logit_kd and linear_logit_kd: gradient shape, stride and null errors name the component") {
  bad_input_fixture f;
  for (const char* component : {"", "distill/t0"}) {
    const std::string quoted = std::string("'") + (*component ? component : "kd") + "'";
    CAPTURE(quoted);
    kd::logit_kd_options o;
    o.component = component;
    KD_CHECK_STATUS(f.call(o, {f.t.data(), 4, 6}, {f.s.data(), 4, 6}, {f.grad.data(), 3, 6}, f.labels),
                    kd::errc::shape_mismatch, "student gradient", quoted.c_str());
    KD_CHECK_STATUS(f.call(o, {f.t.data(), 4, 6}, {f.s.data(), 4, 6}, {f.grad.data(), 4, 6, 3}, f.labels),
                    kd::errc::shape_mismatch, "student gradient", "stride 3", quoted.c_str());
    KD_CHECK_STATUS(f.call(o, {nullptr, 4, 6}, {f.s.data(), 4, 6}, {f.grad.data(), 4, 6}, f.labels),
                    kd::errc::invalid_argument, "teacher logits", "null", quoted.c_str());
    kd::linear_logit_kd<kd::forward_kl> lin;
    lin.options.component = component;
    std::vector<float> h(4 * 3, 0.5f), w(6 * 3, 0.25f), t(4 * 6, 0.f), dh(4 * 3), dw(6 * 3);
    kd::loss_result res;
    KD_CHECK_STATUS(lin(kd::cpu, kd::matrix_view<const float>(h.data(), 4, 3), kd::matrix_view<const float>(w.data(), 6, 3),
                        kd::matrix_view<const float>(t.data(), 4, 6), f.labels, res,
                        kd::matrix_view<float>(dh.data(), 4, 2), kd::matrix_view<float>(dw.data(), 6, 3)),
                    kd::errc::shape_mismatch, "hidden gradient", quoted.c_str());
  }
}

// TVD's convention at an exact tie p == q: the sign is 0, so an identical pair has zero gradient.
TEST_CASE("logit_kd tvd: at p == q (identical logits) the loss and the gradient are exactly 0") {
  bad_input_fixture f;
  f.t = f.s;
  kd64<kd::tvd> loss;
  kd::loss_result res;
  REQUIRE(loss(kd::cpu, kd::matrix_view<const double>(f.t.data(), 4, 6), kd::matrix_view<const double>(f.s.data(), 4, 6),
               f.labels, res, kd::matrix_view<double>(f.grad.data(), 4, 6))
              .ok());
  CHECK(res.loss == 0.0);
  for (double x : f.grad) CHECK(x == 0.0);
}
