// Tests for kd::cross_entropy (kd/loss/cross_entropy.hpp): hard-label cross-entropy + z-loss on the
// CPU reference backend.
#include <doctest/doctest.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <span>
#include <string>
#include <vector>

#include <kd/kd.hpp>

#include "test_util.hpp"

namespace {

using kd::index_t;
constexpr std::int32_t kIgnore = kd::default_ignore_index;

struct batch {
  index_t n = 0, cols = 0, vocab = 0;
  std::vector<double> logits;
  std::vector<std::int32_t> labels;
  kd::matrix_view<const double> view() const { return {logits.data(), n, cols}; }
};

batch make_batch(kdtest::rng_t& g, index_t n, index_t cols, index_t vocab, std::vector<index_t> ignored,
                 double scale = 2.0) {
  batch b;
  b.n = n;
  b.cols = cols;
  b.vocab = vocab;
  b.logits = kdtest::normal(static_cast<std::size_t>(n * cols), g, 0.0, scale);
  std::uniform_int_distribution<std::int32_t> lab(0, static_cast<std::int32_t>(vocab - 1));
  b.labels.resize(static_cast<std::size_t>(n));
  for (auto& y : b.labels) y = lab(g);
  for (auto r : ignored) b.labels[static_cast<std::size_t>(r)] = kIgnore;
  return b;
}

template <class R = kd::token_mean>
kd::cross_entropy_result run64(const kd::cross_entropy_options& o, const batch& b, std::vector<double>* grad = nullptr) {
  kd::cross_entropy<R, kd::fp64> ce;
  ce.options = o;
  kd::cross_entropy_result res;
  const kd::status st = grad != nullptr ? ce(kd::cpu, b.view(), b.labels, res, kd::matrix_view<double>(grad->data(), b.n, b.cols))
                                        : ce(kd::cpu, b.view(), b.labels, res);
  if (!st.ok()) FAIL(st.message());  // not an assertion per call: this runs inside finite-difference loops
  return res;
}

// ce and z by hand: log-sum-exp over the real columns of the active rows.
struct ce_ref {
  double ce = 0, z = 0;
  index_t active = 0;
};
ce_ref reference(const batch& b, std::int32_t ignore = kIgnore) {
  ce_ref r;
  for (index_t i = 0; i < b.n; ++i) {
    const auto y = b.labels[static_cast<std::size_t>(i)];
    if (y == ignore) continue;
    ++r.active;
    const double* row = b.logits.data() + i * b.cols;
    double s = 0.0;
    for (index_t c = 0; c < b.vocab; ++c) s += std::exp(row[c]);
    const double lse = std::log(s);
    r.ce += lse - row[y];
    r.z += lse * lse;
  }
  const double d = r.active > 0 ? static_cast<double>(r.active) : 1.0;
  r.ce /= d;
  r.z /= d;
  return r;
}

}  // namespace

// =====================================================================================================
// Gradients vs finite differences
// =====================================================================================================
TEST_CASE("cross_entropy: gradient of ce + w * z_loss matches central finite differences") {
  auto g = kdtest::rng(101);
  const index_t n = 6, cols = 10, vocab = 8;
  for (double zw : {0.0, 1e-4, 0.3}) {
    for (int mode = 0; mode < 2; ++mode) {
      CAPTURE(zw);
      CAPTURE(mode);
      batch b = make_batch(g, n, cols, vocab, {1, 4});
      kd::cross_entropy_options o;
      o.vocab = vocab;
      o.z_loss_weight = zw;
      const ce_ref ref = reference(b);
      const auto r0 = run64(o, b);
      CHECK(kdtest::rel_error(r0.ce, ref.ce) < 1e-13);
      CHECK(kdtest::rel_error(r0.z_loss, ref.z) < 1e-13);
      CHECK(r0.tokens == 4);

      const bool accumulate = mode == 1;
      kd::cross_entropy_options go = o;
      go.accumulate_grad = accumulate;
      go.grad_scale = accumulate ? -1.7 : 1.0;
      const std::vector<double> g0 =
          accumulate ? kdtest::normal(b.logits.size(), g) : std::vector<double>(b.logits.size(), NAN);
      std::vector<double> grad = g0;
      const auto r1 = run64(go, b, &grad);
      CHECK(r1.ce == r0.ce);  // neither grad_scale nor the gradient changes the reported loss
      CHECK(r1.z_loss == r0.z_loss);

      // grad_scale weights the cross-entropy only; z_loss_weight is the z-loss's absolute weight.
      const std::vector<double> fd_ce = kdtest::numeric_gradient([&] { return run64(o, b).ce; }, b.logits, 1e-5);
      const std::vector<double> fd_z = kdtest::numeric_gradient([&] { return run64(o, b).z_loss; }, b.logits, 1e-5);
      std::vector<double> fd(fd_ce.size());
      for (std::size_t i = 0; i < fd.size(); ++i) fd[i] = go.grad_scale * fd_ce[i] + zw * fd_z[i];
      std::vector<double> added(grad.size());
      for (std::size_t i = 0; i < grad.size(); ++i) added[i] = accumulate ? grad[i] - g0[i] : grad[i];
      CHECK(kdtest::rel_error(added, fd) < 1e-6);

      bool dead_exact = true, fd_zero = true;
      for (index_t r = 0; r < n; ++r)
        for (index_t c = 0; c < cols; ++c) {
          if (c < vocab && b.labels[static_cast<std::size_t>(r)] != kIgnore) continue;
          const auto i = static_cast<std::size_t>(r * cols + c);
          dead_exact = dead_exact && (accumulate ? grad[i] == g0[i] : grad[i] == 0.0);
          fd_zero = fd_zero && fd[i] == 0.0;
        }
      CHECK(dead_exact);
      CHECK(fd_zero);
    }
  }
}

TEST_CASE("cross_entropy: the none reduction sums, a custom ignore_index is honoured") {
  auto g = kdtest::rng(102);
  batch b = make_batch(g, 5, 7, 7, {});
  b.labels[2] = -1;
  kd::cross_entropy_options o;
  o.ignore_index = -1;
  o.z_loss_weight = 0.01;
  std::vector<double> grad(b.logits.size());
  const auto sum = run64<kd::none>(o, b, &grad);
  const auto mean = run64(o, b);
  CHECK(sum.tokens == 4);
  CHECK(sum.normalizer == 1.0);
  CHECK(mean.normalizer == 4.0);
  CHECK(sum.ce == doctest::Approx(4 * mean.ce).epsilon(1e-14));
  CHECK(sum.z_loss == doctest::Approx(4 * mean.z_loss).epsilon(1e-14));
  const auto fd = kdtest::numeric_gradient(
      [&] {
        const auto r = run64<kd::none>(o, b);
        return r.ce + 0.01 * r.z_loss;
      },
      b.logits);
  CHECK(kdtest::rel_error(grad, fd) < 1e-6);
}

// =====================================================================================================
// Known values
// =====================================================================================================
TEST_CASE("cross_entropy known values: uniform logits give log(V); z-loss is (c + log V)^2") {
  for (index_t vocab : {1, 2, 7, 1000}) {
    for (double c : {0.0, 3.5, -20.0}) {
      CAPTURE(vocab);
      CAPTURE(c);
      batch b;
      b.n = 3;
      b.cols = vocab + 3;  // padding columns with wild values must not count
      b.vocab = vocab;
      b.logits.assign(static_cast<std::size_t>(b.n * b.cols), c);
      for (index_t r = 0; r < b.n; ++r)
        for (index_t j = vocab; j < b.cols; ++j) b.logits[static_cast<std::size_t>(r * b.cols + j)] = 1e6;
      b.labels = {0, static_cast<std::int32_t>(vocab - 1), kIgnore};
      kd::cross_entropy_options o;
      o.vocab = vocab;
      std::vector<double> grad(b.logits.size(), NAN);
      const auto r = run64(o, b, &grad);
      const double logv = std::log(static_cast<double>(vocab));
      CHECK(r.ce == doctest::Approx(logv).epsilon(1e-13));
      CHECK(r.z_loss == doctest::Approx((c + logv) * (c + logv)).epsilon(1e-12));
      CHECK(r.tokens == 2);
      // dce/ds = (1/V - onehot) / N.
      std::vector<double> expected(grad.size(), 0.0);
      for (index_t row = 0; row < 2; ++row)
        for (index_t j = 0; j < vocab; ++j)
          expected[static_cast<std::size_t>(row * b.cols + j)] =
              (1.0 / static_cast<double>(vocab) - (j == b.labels[static_cast<std::size_t>(row)] ? 1.0 : 0.0)) / 2.0;
      CHECK(kdtest::rel_error(grad, expected) < 1e-13);
    }
  }
}

TEST_CASE("cross_entropy known values: ce and z-loss equal the hand-computed means") {
  auto g = kdtest::rng(103);
  batch b = make_batch(g, 7, 12, 9, {0, 5}, 3.0);
  kd::cross_entropy_options o;
  o.vocab = 9;
  o.z_loss_weight = 1e-4;  // reported values do not depend on the weight
  const auto r = run64(o, b);
  const ce_ref ref = reference(b);
  CHECK(r.ce == doctest::Approx(ref.ce).epsilon(1e-13));
  CHECK(r.z_loss == doctest::Approx(ref.z).epsilon(1e-13));
  CHECK(r.normalizer == 5.0);
  // Shifting every real logit of a row by a constant leaves ce unchanged and moves lse by the constant.
  batch shifted = b;
  for (index_t i = 0; i < b.n; ++i)
    for (index_t c = 0; c < b.vocab; ++c) shifted.logits[static_cast<std::size_t>(i * b.cols + c)] += 10.0;
  const auto rs = run64(o, shifted);
  CHECK(rs.ce == doctest::Approx(r.ce).epsilon(1e-12));
  CHECK(rs.z_loss == doctest::Approx(reference(shifted).z).epsilon(1e-13));
  // Huge logits do not overflow (log-sum-exp is shifted by the max).
  batch big = b;
  for (auto& v : big.logits) v += 1e4;
  const auto rb = run64(o, big);
  CHECK(rb.ce == doctest::Approx(r.ce).epsilon(1e-9));
  CHECK(std::isfinite(rb.z_loss));
}

TEST_CASE("cross_entropy: padding columns are never read") {
  auto g = kdtest::rng(104);
  batch b = make_batch(g, 4, 9, 6, {3});
  kd::cross_entropy_options o;
  o.vocab = 6;
  std::vector<double> g1(b.logits.size()), g2(b.logits.size());
  const auto r1 = run64(o, b, &g1);
  b.logits[6] = NAN;
  b.logits[1 * 9 + 8] = INFINITY;
  b.logits[2 * 9 + 7] = 1e300;
  const auto r2 = run64(o, b, &g2);
  CHECK(r1.ce == r2.ce);
  CHECK(r1.z_loss == r2.z_loss);
  CHECK(g1 == g2);
}

// =====================================================================================================
// Gradient accumulation
// =====================================================================================================
TEST_CASE("cross_entropy: micro-batches with global_tokens reproduce the full batch exactly") {
  auto g = kdtest::rng(105);
  const index_t n = 16, cols = 12;
  batch b = make_batch(g, n, cols, 11, {0, 1, 2, 4, 6, 7, 13});
  kd::cross_entropy_options o;
  o.vocab = 11;
  o.z_loss_weight = 1e-3;
  const index_t total = kd::count_tokens(b.labels);
  REQUIRE(total == 9);
  std::vector<double> full_grad(b.logits.size(), NAN);
  const auto full = run64(o, b, &full_grad);

  for (index_t k : {1, 2, 4, 8}) {
    CAPTURE(k);
    const index_t rows = n / k;
    kd::cross_entropy<kd::token_mean, kd::fp64> ce, naive;
    ce.options = o;
    ce.options.global_tokens = total;
    naive.options = o;
    double ce_sum = 0, z_sum = 0, naive_ce = 0;
    std::vector<double> grad(b.logits.size(), NAN), naive_grad(b.logits.size(), NAN);
    for (index_t m = 0; m < k; ++m) {
      const auto off = static_cast<std::size_t>(m * rows * cols);
      const std::span<const std::int32_t> lab(b.labels.data() + m * rows, static_cast<std::size_t>(rows));
      const kd::matrix_view<const double> x(b.logits.data() + off, rows, cols);
      kd::cross_entropy_result r;
      REQUIRE(ce(kd::cpu, x, lab, r, kd::matrix_view<double>(grad.data() + off, rows, cols)).ok());
      CHECK(r.normalizer == 9.0);
      ce_sum += r.ce;
      z_sum += r.z_loss;
      REQUIRE(naive(kd::cpu, x, lab, r, kd::matrix_view<double>(naive_grad.data() + off, rows, cols)).ok());
      naive_ce += r.ce / static_cast<double>(k);
      for (index_t i = 0; i < rows * cols; ++i) naive_grad[off + static_cast<std::size_t>(i)] /= static_cast<double>(k);
    }
    CHECK(kdtest::rel_error(ce_sum, full.ce) < 1e-12);
    CHECK(kdtest::rel_error(z_sum, full.z_loss) < 1e-12);
    CHECK(grad == full_grad);
    if (k > 1) {
      CHECK(kdtest::rel_error(naive_ce, full.ce) > 1e-3);
      CHECK(kdtest::rel_error(naive_grad, full_grad) > 1e-3);
    }
  }
}

// =====================================================================================================
// Precisions
// =====================================================================================================
TEST_CASE_TEMPLATE("cross_entropy precisions: 16-bit and fp32 storage match fp64 on the same rounded inputs", P,
                   kd::bf16, kd::fp16, kd::fp32) {
  using T = typename P::storage_type;
  const double tol = std::is_same_v<T, float> ? 1e-5 : 1e-2;
  for (index_t cols : {64, 50304}) {  // small, and GPT-2's padded vocabulary (forward only)
    CAPTURE(cols);
    const index_t vocab = cols == 64 ? 60 : 50257;
    const index_t n = cols == 64 ? 8 : 3;
    auto g = kdtest::rng(106);
    batch b = make_batch(g, n, cols, vocab, {1}, 2.0);
    std::vector<T> x(b.logits.size());
    for (std::size_t i = 0; i < x.size(); ++i) {
      x[i] = kdtest::from_double<T>(b.logits[i]);
      b.logits[i] = kdtest::to_double(x[i]);
    }
    kd::cross_entropy<kd::token_mean, P> ce;
    ce.options.vocab = vocab;
    ce.options.z_loss_weight = 1e-2;
    kd::cross_entropy_result r;
    std::vector<T> grad(x.size());
    const bool with_grad = cols == 64;
    const kd::matrix_view<const T> xv(x.data(), n, cols);
    if (with_grad) {
      REQUIRE(ce(kd::cpu, xv, b.labels, r, kd::matrix_view<T>(grad.data(), n, cols)).ok());
    } else {
      REQUIRE(ce(kd::cpu, xv, b.labels, r).ok());
    }
    kd::cross_entropy_options o = ce.options;
    std::vector<double> ref_grad(x.size());
    const auto ref = run64(o, b, with_grad ? &ref_grad : nullptr);
    CHECK(kdtest::rel_error(r.ce, ref.ce) < tol);
    CHECK(kdtest::rel_error(r.z_loss, ref.z_loss) < tol);
    if (with_grad) CHECK(kdtest::rel_error(grad, ref_grad) < tol);
  }
}

// =====================================================================================================
// Bad input
// =====================================================================================================
namespace {
struct ce_fixture {
  index_t n = 4, cols = 6;
  std::vector<double> x, grad;
  std::vector<std::int32_t> labels{1, kIgnore, 3, 0};
  kd::cross_entropy_options o;
  ce_fixture() {
    auto g = kdtest::rng(107);
    x = kdtest::normal(static_cast<std::size_t>(n * cols), g);
    grad.assign(x.size(), 0.0);
  }
  kd::status call(kd::matrix_view<const double> xv, kd::matrix_view<double> gv, std::span<const std::int32_t> lab) const {
    kd::cross_entropy<kd::token_mean, kd::fp64> ce;
    ce.options = o;
    kd::cross_entropy_result r;
    return ce(kd::cpu, xv, lab, r, gv);
  }
  kd::status call() { return call({x.data(), n, cols}, {grad.data(), n, cols}, labels); }
};

void check_status(const kd::status& st, kd::errc code, std::initializer_list<const char*> needles) {
  INFO("message: " << st.message());
  CHECK(st.code() == code);
  for (const char* s : needles) CHECK(kdtest::contains(st.message(), s));
}
}  // namespace

TEST_CASE("cross_entropy bad input") {
  ce_fixture f;
  REQUIRE(f.call().ok());

  SUBCASE("labels: wrong count, outside the vocabulary, in the padding") {
    const std::vector<std::int32_t> three{1, 2, 3};
    check_status(f.call({f.x.data(), 4, 6}, {f.grad.data(), 4, 6}, three), kd::errc::shape_mismatch,
                 {"3 labels", "4 rows", "'lm'"});
    f.labels[3] = 6;
    check_status(f.call(), kd::errc::out_of_range, {"label 6", "token 3", "'lm'"});
    f.labels[3] = -7;
    check_status(f.call(), kd::errc::out_of_range, {"label -7", "token 3"});
    f.labels[3] = 5;
    f.o.vocab = 5;
    check_status(f.call(), kd::errc::out_of_range, {"label 5", "[0, 5)"});
  }
  SUBCASE("NaN / Inf in the logits name the component and the token") {
    f.x[2 * 6 + 3] = NAN;
    check_status(f.call(), kd::errc::non_finite, {"NaN", "logits", "token 2", "column 3", "'lm'"});
    f.o.component = "student_lm";
    check_status(f.call(), kd::errc::non_finite, {"NaN", "token 2", "'student_lm'"});
    f.x[2 * 6 + 3] = 0.0;
    f.x[3 * 6 + 0] = -INFINITY;
    check_status(f.call(), kd::errc::non_finite, {"Inf", "token 3", "'student_lm'"});
    // An ignored token is not looked at.
    f.x[3 * 6 + 0] = 0.0;
    f.x[1 * 6 + 2] = NAN;
    CHECK(f.call().ok());
  }
  SUBCASE("z_loss_weight negative or not finite") {
    for (double w : {-1e-4, std::nan(""), std::numeric_limits<double>::infinity()}) {
      f.o.z_loss_weight = w;
      check_status(f.call(), kd::errc::invalid_argument, {"z_loss_weight", "'lm'"});
    }
  }
  SUBCASE("empty, shapes, strides, vocab") {
    const std::span<const std::int32_t> none;
    check_status(f.call({f.x.data(), 0, 6}, {f.grad.data(), 0, 6}, none), kd::errc::empty_input, {"logits are empty"});
    check_status(f.call({f.x.data(), 4, 6}, {f.grad.data(), 4, 5}, f.labels), kd::errc::shape_mismatch,
                 {"logit gradient", "[4 x 5]", "[4 x 6]"});
    check_status(f.call({f.x.data(), 4, 6, 4}, {f.grad.data(), 4, 6}, f.labels), kd::errc::shape_mismatch,
                 {"logits", "stride 4"});
    check_status(f.call({f.x.data(), 4, 6}, {f.grad.data(), 4, 6, 5}, f.labels), kd::errc::shape_mismatch,
                 {"logit gradient", "stride 5"});
    f.o.vocab = 7;
    check_status(f.call(), kd::errc::out_of_range, {"vocab 7", "6 logit columns"});
  }
  SUBCASE("global_tokens smaller than the active tokens, grad_scale not finite") {
    f.o.global_tokens = 2;
    check_status(f.call(), kd::errc::invalid_argument, {"global_tokens 2", "3 tokens", "'lm'"});
    f.o.global_tokens = 0;
    f.o.grad_scale = std::numeric_limits<double>::infinity();
    check_status(f.call(), kd::errc::invalid_argument, {"grad_scale"});
  }
  SUBCASE("kd::check turns a failed status into kd::error") {
    f.o.z_loss_weight = -1;
    const kd::status st = f.call();
    CHECK_THROWS_WITH_AS(kd::check(st), doctest::Contains("z_loss_weight"), kd::error);
  }
}

TEST_CASE("cross_entropy bad input: gradient shape, stride and null errors name the component") {
  for (const char* component : {"", "student_lm"}) {
    ce_fixture f;
    f.o.component = component;
    const std::string quoted = std::string("'") + (*component ? component : "lm") + "'";
    CAPTURE(quoted);
    check_status(f.call({f.x.data(), 4, 6}, {f.grad.data(), 4, 5}, f.labels), kd::errc::shape_mismatch,
                 {"logit gradient", quoted.c_str()});
    check_status(f.call({f.x.data(), 4, 6}, {f.grad.data(), 4, 6, 5}, f.labels), kd::errc::shape_mismatch,
                 {"logit gradient", "stride 5", quoted.c_str()});
    check_status(f.call({nullptr, 4, 6}, {f.grad.data(), 4, 6}, f.labels), kd::errc::invalid_argument,
                 {"logits", "null", quoted.c_str()});
    check_status(f.call({f.x.data(), 0, 6}, {f.grad.data(), 0, 6}, {}), kd::errc::empty_input, {quoted.c_str()});
  }
}

// The fp32 CPU reference sums rows in double: it matches fp64 on the same inputs to ~1e-6 at V = 50,304.
TEST_CASE("cross_entropy: fp32 CPU reference matches fp64 to 1e-6 relative at V = 50,304") {
  const index_t n = 3, cols = 50304;
  auto g = kdtest::rng(108);
  batch b = make_batch(g, n, cols, cols, {}, 2.0);
  std::vector<float> x(b.logits.size());
  for (std::size_t i = 0; i < x.size(); ++i) {
    x[i] = static_cast<float>(b.logits[i]);
    b.logits[i] = x[i];
  }
  kd::cross_entropy<kd::token_mean, kd::fp32> ce32;
  kd::cross_entropy<kd::token_mean, kd::fp64> ce64;
  ce32.options.z_loss_weight = ce64.options.z_loss_weight = 1e-2;
  kd::cross_entropy_result r32, r64;
  REQUIRE(ce32(kd::cpu, kd::matrix_view<const float>(x.data(), n, cols), b.labels, r32).ok());
  REQUIRE(ce64(kd::cpu, b.view(), b.labels, r64).ok());
  CHECK(kdtest::rel_error(r32.ce, r64.ce) < 1e-6);
  CHECK(kdtest::rel_error(r32.z_loss, r64.z_loss) < 1e-6);
}

// Logits far from zero: the float lse is rounded at their size (2^-24 |lse|, a factor common to every
// softmax entry of the row). The backend takes that rounding back (kd::detail::split_lse): each entry's
// gradient within a few float roundings of fp64 (it had been off by up to ~1e-5 relative at 400), the
// value and z-loss too.
TEST_CASE("cross_entropy fp32 CPU: logits 150-400 from zero, every gradient entry within 1e-6 of fp64") {
  const index_t n = 3, cols = 50304;
  auto g = kdtest::rng(109);
  for (const double offset : {150.0, -400.0, 400.0}) {
    CAPTURE(offset);
    batch b = make_batch(g, n, cols, cols, {}, 2.0);
    std::vector<float> x(b.logits.size());
    for (std::size_t i = 0; i < x.size(); ++i) {
      x[i] = static_cast<float>(b.logits[i] + offset);
      b.logits[i] = x[i];
    }
    kd::cross_entropy<kd::token_mean, kd::fp32> ce32;
    kd::cross_entropy<kd::token_mean, kd::fp64> ce64;
    ce32.options.z_loss_weight = ce64.options.z_loss_weight = 1e-4;
    kd::cross_entropy_result r32, r64;
    std::vector<float> g32(x.size());
    std::vector<double> g64(x.size());
    REQUIRE(ce32(kd::cpu, kd::matrix_view<const float>(x.data(), n, cols), b.labels, r32,
                 kd::matrix_view<float>(g32.data(), n, cols))
                .ok());
    REQUIRE(ce64(kd::cpu, b.view(), b.labels, r64, kd::matrix_view<double>(g64.data(), n, cols)).ok());
    CHECK(kdtest::rel_error(r32.ce, r64.ce) < 1e-6);
    CHECK(kdtest::rel_error(r32.z_loss, r64.z_loss) < 1e-6);
    double worst = 0.0;
    for (std::size_t i = 0; i < g64.size(); ++i) worst = std::max(worst, std::abs(g32[i] - g64[i]) / std::abs(g64[i]));
    CHECK(worst < 1e-6);
  }
}
