// Tests for kd/loss/moe.hpp: Switch load balance, router z-loss and expert-utilization statistics.
#include <doctest/doctest.h>

#include <kd/kd.hpp>

#include "test_util.hpp"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <functional>
#include <limits>
#include <numeric>
#include <random>
#include <string>
#include <vector>

namespace {

using ids_t = std::vector<std::int32_t>;

struct mat {
  std::vector<double> v;
  kd::index_t rows = 0, cols = 0;
  mat(kd::index_t r, kd::index_t c, double fill = 0.0) : v(static_cast<std::size_t>(r * c), fill), rows(r), cols(c) {}
  kd::matrix_view<double> view() { return {v.data(), rows, cols}; }
  double& operator()(kd::index_t r, kd::index_t c) { return v[static_cast<std::size_t>(r * cols + c)]; }
};

mat randn(kdtest::rng_t& rng, kd::index_t r, kd::index_t c, double stddev = 1.0) {
  mat m(r, c);
  kdtest::fill_normal(m.v, rng, 0.0, stddev);
  return m;
}

kd::matrix_view<const std::int32_t> ids_view(const ids_t& ids, kd::index_t tokens, kd::index_t k) {
  return {ids.data(), tokens, k};
}

// Token t goes to experts (t * k + j) mod E: every expert gets T * k / E slots when E divides T * k.
ids_t round_robin(kd::index_t tokens, kd::index_t k, kd::index_t experts) {
  ids_t ids(static_cast<std::size_t>(tokens * k));
  for (kd::index_t t = 0; t < tokens; ++t)
    for (kd::index_t j = 0; j < k; ++j) ids[static_cast<std::size_t>(t * k + j)] = static_cast<std::int32_t>((t * k + j) % experts);
  return ids;
}

// Distinct random top-k experts per token.
ids_t random_topk(kdtest::rng_t& rng, kd::index_t tokens, kd::index_t k, kd::index_t experts) {
  ids_t ids;
  std::vector<std::int32_t> perm(static_cast<std::size_t>(experts));
  for (kd::index_t t = 0; t < tokens; ++t) {
    std::iota(perm.begin(), perm.end(), 0);
    std::shuffle(perm.begin(), perm.end(), rng);
    ids.insert(ids.end(), perm.begin(), perm.begin() + k);
  }
  return ids;
}

using kdtest::contains;
using kdtest::rel_error;

std::vector<double> finite_diff(mat& m, const std::function<double()>& f) {
  return kdtest::numeric_gradient(f, m.v, 1e-6);
}

double lb_loss(const kd::load_balance_loss<kd::fp64>& loss, mat& logits, const ids_t& ids, kd::index_t k) {
  kd::loss_result r;
  const kd::status s = loss(kd::cpu, logits.view(), ids_view(ids, logits.rows, k), r);
  REQUIRE_MESSAGE(s.ok(), s.message());
  return r.loss;
}

}  // namespace

// -----------------------------------------------------------------------------------------------
// Load balance
// -----------------------------------------------------------------------------------------------

TEST_CASE("load balance: equals the coefficient at perfect balance, whatever E and k") {
  for (kd::index_t e : {2, 3, 4, 8, 16, 60})
    for (kd::index_t k : {1, 2, 4}) {
      if (k > e) continue;
      CAPTURE(e);
      CAPTURE(k);
      const kd::index_t tokens = 3 * e;  // E divides T * k
      for (double c : {0.5, 1.7}) {    // any constant logit row is uniform
        mat logits(tokens, e, c);
        const ids_t ids = round_robin(tokens, k, e);
        kd::load_balance_loss<kd::fp64> loss;
        loss.options.coefficient = 0.01;
        CHECK(lb_loss(loss, logits, ids, k) == doctest::Approx(0.01).epsilon(1e-14));
        loss.options.coefficient = 1.0;
        CHECK(lb_loss(loss, logits, ids, k) == doctest::Approx(1.0).epsilon(1e-14));

        // The default (fp32) policy lands on the coefficient too.
        std::vector<float> lf(logits.v.begin(), logits.v.end());
        kd::load_balance_loss<> loss32;
        kd::loss_result r;
        REQUIRE(loss32(kd::cpu, kd::matrix_view<float>{lf.data(), tokens, e}, ids_view(ids, tokens, k), r).ok());
        CHECK(r.loss == doctest::Approx(loss32.options.coefficient).epsilon(1e-5));
        CHECK(r.tokens == tokens);
      }
    }
  CHECK(kd::load_balance_loss<>{}.options.coefficient == 1e-2);
}

TEST_CASE("load balance: a collapsed router gives coefficient * E") {
  for (kd::index_t e : {2, 4, 8, 64}) {
    CAPTURE(e);
    const kd::index_t tokens = 10;
    mat logits(tokens, e, 0.0);
    for (kd::index_t t = 0; t < tokens; ++t) logits(t, 0) = 40.0;  // probability ~ 1 - (E - 1) e^-40
    const ids_t ids(static_cast<std::size_t>(tokens), 0);
    kd::load_balance_loss<kd::fp64> loss;
    loss.options.coefficient = 0.02;
    CHECK(lb_loss(loss, logits, ids, 1) == doctest::Approx(0.02 * static_cast<double>(e)).epsilon(1e-12));
    // Balanced routing with the same collapsed probabilities is in between: coef * E * P_0 / E = coef.
    const ids_t rr = round_robin(tokens, 1, e);
    const double mixed = lb_loss(loss, logits, rr, 1);
    CHECK(mixed < 0.02 * static_cast<double>(e));
  }
}

TEST_CASE("load balance: value by hand and gradient vs finite differences (routing held fixed)") {
  kdtest::rng_t rng(41);
  for (kd::index_t e : {3, 8})
    for (kd::index_t k : {1, 2}) {
      CAPTURE(e);
      CAPTURE(k);
      const kd::index_t tokens = 7;
      mat logits = randn(rng, tokens, e, 2.0);
      const ids_t ids = random_topk(rng, tokens, k, e);
      kd::load_balance_loss<kd::fp64> loss;
      loss.options.coefficient = 0.3;

      // By hand: coef * E * sum_i f_i P_i.
      std::vector<double> f(static_cast<std::size_t>(e), 0.0), p(static_cast<std::size_t>(e), 0.0);
      for (auto id : ids) f[static_cast<std::size_t>(id)] += 1.0 / static_cast<double>(tokens * k);
      for (kd::index_t t = 0; t < tokens; ++t) {
        double z = 0;
        for (kd::index_t j = 0; j < e; ++j) z += std::exp(logits(t, j));
        for (kd::index_t j = 0; j < e; ++j) p[static_cast<std::size_t>(j)] += std::exp(logits(t, j)) / z / static_cast<double>(tokens);
      }
      double expected = 0;
      for (std::size_t j = 0; j < f.size(); ++j) expected += f[j] * p[j];
      expected *= 0.3 * static_cast<double>(e);
      CHECK(lb_loss(loss, logits, ids, k) == doctest::Approx(expected).epsilon(1e-13));

      mat grad(tokens, e, 9.0);
      kd::loss_result r;
      REQUIRE(loss(kd::cpu, logits.view(), ids_view(ids, tokens, k), r, grad.view()).ok());
      // expert_ids stay fixed across the perturbations: f is a constant of the FD, as in training.
      const auto fd = finite_diff(logits, [&] { return lb_loss(loss, logits, ids, k); });
      CHECK(rel_error(grad.v, fd) < 1e-7);
      // Softmax gradients: each row sums to 0.
      for (kd::index_t t = 0; t < tokens; ++t) {
        double row = 0;
        for (kd::index_t j = 0; j < e; ++j) row += grad(t, j);
        CHECK(std::abs(row) < 1e-15);
      }
    }
}

TEST_CASE("load balance: grad_scale and accumulate_grad") {
  kdtest::rng_t rng(42);
  const kd::index_t tokens = 6, e = 4, k = 2;
  mat logits = randn(rng, tokens, e);
  const ids_t ids = random_topk(rng, tokens, k, e);
  kd::load_balance_loss<kd::fp64> loss;
  mat g1(tokens, e), g2(tokens, e);
  kd::loss_result r1, r2;
  REQUIRE(loss(kd::cpu, logits.view(), ids_view(ids, tokens, k), r1, g1.view()).ok());
  loss.options.grad_scale = 4.0;
  REQUIRE(loss(kd::cpu, logits.view(), ids_view(ids, tokens, k), r2, g2.view()).ok());
  CHECK(r2.loss == r1.loss);
  std::vector<double> expected(g1.v);
  for (auto& x : expected) x *= 4.0;
  CHECK(rel_error(g2.v, expected) < 1e-15);
  loss.options.accumulate_grad = true;
  REQUIRE(loss(kd::cpu, logits.view(), ids_view(ids, tokens, k), r2, g2.view()).ok());
  for (auto& x : expected) x *= 2.0;
  CHECK(rel_error(g2.v, expected) < 1e-15);
}

// -----------------------------------------------------------------------------------------------
// Router z-loss
// -----------------------------------------------------------------------------------------------

TEST_CASE("router z-loss: coefficient * mean logsumexp^2, and its gradient") {
  kdtest::rng_t rng(43);
  const kd::index_t tokens = 9, e = 5;
  mat logits = randn(rng, tokens, e, 3.0);
  kd::router_z_loss<kd::fp64> loss;
  CHECK(loss.options.coefficient == 1e-3);
  CHECK(loss.options.component == "router_z");
  loss.options.coefficient = 0.05;

  double expected = 0;
  for (kd::index_t t = 0; t < tokens; ++t) {
    double z = 0;
    for (kd::index_t j = 0; j < e; ++j) z += std::exp(logits(t, j));
    expected += std::log(z) * std::log(z);
  }
  expected *= 0.05 / static_cast<double>(tokens);

  auto eval = [&] {
    kd::loss_result r;
    REQUIRE(loss(kd::cpu, logits.view(), r).ok());
    return r.loss;
  };
  CHECK(eval() == doctest::Approx(expected).epsilon(1e-13));

  mat grad(tokens, e, 3.0);
  kd::loss_result r;
  REQUIRE(loss(kd::cpu, logits.view(), r, grad.view()).ok());
  CHECK(r.tokens == tokens);
  CHECK(rel_error(grad.v, finite_diff(logits, eval)) < 1e-7);

  // Large logits stay finite (logsumexp is shifted by the row max).
  mat big(2, 3, 800.0);
  big(1, 2) = 1000.0;
  loss.options.coefficient = 1.0;
  kd::loss_result rb;
  REQUIRE(loss(kd::cpu, big.view(), rb).ok());
  const double lse0 = 800.0 + std::log(3.0);
  const double lse1 = 1000.0 + std::log1p(2.0 * std::exp(-200.0));
  CHECK(rb.loss == doctest::Approx((lse0 * lse0 + lse1 * lse1) / 2).epsilon(1e-14));

  // grad_scale / accumulate_grad.
  mat g1(tokens, e), g2(tokens, e, 1.0);
  loss.options.coefficient = 0.05;
  REQUIRE(loss(kd::cpu, logits.view(), r, g1.view()).ok());
  loss.options.grad_scale = -3.0;
  loss.options.accumulate_grad = true;
  REQUIRE(loss(kd::cpu, logits.view(), r, g2.view()).ok());
  std::vector<double> expected_g(g1.v);
  for (auto& x : expected_g) x = 1.0 - 3.0 * x;
  CHECK(rel_error(g2.v, expected_g) < 1e-14);
}

// -----------------------------------------------------------------------------------------------
// Expert utilization
// -----------------------------------------------------------------------------------------------

TEST_CASE("expert_utilization") {
  SUBCASE("uniform routing: normalized entropy 1, not collapsed") {
    for (kd::index_t e : {2, 4, 7, 64})
      for (kd::index_t k : {1, 2}) {
        CAPTURE(e);
        CAPTURE(k);
        const kd::index_t tokens = 2 * e;
        const ids_t ids = round_robin(tokens, k, e);
        kd::expert_utilization u;
        REQUIRE(kd::compute_expert_utilization(ids_view(ids, tokens, k), e, u).ok());
        REQUIRE(u.fraction.size() == static_cast<std::size_t>(e));
        for (double f : u.fraction) CHECK(f == doctest::Approx(1.0 / static_cast<double>(e)).epsilon(1e-14));
        CHECK(std::accumulate(u.fraction.begin(), u.fraction.end(), 0.0) == doctest::Approx(1.0).epsilon(1e-14));
        CHECK(u.entropy == doctest::Approx(std::log(static_cast<double>(e))).epsilon(1e-12));
        CHECK(u.normalized_entropy == doctest::Approx(1.0).epsilon(1e-12));
        CHECK(u.max_fraction == doctest::Approx(1.0 / static_cast<double>(e)).epsilon(1e-14));
        CHECK(u.unused_experts == 0);
        CHECK_FALSE(u.collapsed);
      }
  }
  SUBCASE("everything on one expert: entropy 0, collapsed, E - 1 unused") {
    for (kd::index_t e : {2, 8, 64}) {
      CAPTURE(e);
      const ids_t ids(20, 3 % static_cast<std::int32_t>(e));
      kd::expert_utilization u;
      REQUIRE(kd::compute_expert_utilization(ids_view(ids, 20, 1), e, u).ok());
      CHECK(u.entropy == 0.0);
      CHECK(u.normalized_entropy == 0.0);
      CHECK(u.collapsed);
      CHECK(u.unused_experts == e - 1);
      CHECK(u.max_fraction == 1.0);
      CHECK(u.fraction[static_cast<std::size_t>(3 % e)] == 1.0);
      CHECK(std::accumulate(u.fraction.begin(), u.fraction.end(), 0.0) == 1.0);
    }
  }
  SUBCASE("random routing: fractions sum to 1 and match the counts; the threshold decides collapse") {
    kdtest::rng_t rng(44);
    const kd::index_t tokens = 50, e = 8, k = 2;
    const ids_t ids = random_topk(rng, tokens, k, e);
    kd::expert_utilization u;
    REQUIRE(kd::compute_expert_utilization(ids_view(ids, tokens, k), e, u).ok());
    CHECK(std::accumulate(u.fraction.begin(), u.fraction.end(), 0.0) == doctest::Approx(1.0).epsilon(1e-14));
    for (kd::index_t j = 0; j < e; ++j) {
      const auto n = std::count(ids.begin(), ids.end(), static_cast<std::int32_t>(j));
      CHECK(u.fraction[static_cast<std::size_t>(j)] == doctest::Approx(static_cast<double>(n) / (tokens * k)));
    }
    CHECK(u.normalized_entropy > 0.5);
    CHECK(u.normalized_entropy <= 1.0);
    CHECK_FALSE(u.collapsed);
    REQUIRE(kd::compute_expert_utilization(ids_view(ids, tokens, k), e, u, 1.01).ok());
    CHECK(u.collapsed);
  }
  SUBCASE("two of four experts used half each") {
    const ids_t ids = {0, 2, 0, 2};
    kd::expert_utilization u;
    REQUIRE(kd::compute_expert_utilization(ids_view(ids, 4, 1), 4, u).ok());
    CHECK(u.unused_experts == 2);
    CHECK(u.normalized_entropy == doctest::Approx(0.5).epsilon(1e-14));  // log 2 / log 4
    CHECK(u.max_fraction == 0.5);
  }
  SUBCASE("bad input") {
    const ids_t ids = {0, 1, 5, 2};
    kd::expert_utilization u;
    kd::status s = kd::compute_expert_utilization(ids_view(ids, 4, 1), 4, u);
    CHECK(s.code() == kd::errc::out_of_range);
    CHECK(contains(s.message(), "expert id 5 at token 2 is outside [0, 4)"));
    CHECK(contains(s.message(), "component 'expert_utilization'"));
    s = kd::compute_expert_utilization(ids_view(ids, 4, 1), 0, u);
    CHECK(s.code() == kd::errc::invalid_argument);
    CHECK(contains(s.message(), "expert count must be positive"));
    s = kd::compute_expert_utilization(ids_view(ids, 0, 1), 4, u);
    CHECK(s.code() == kd::errc::empty_input);
    s = kd::compute_expert_utilization(ids_view(ids, 1, 4), 3, u);
    CHECK(s.code() == kd::errc::invalid_argument);
    CHECK(contains(s.message(), "top-k 4 must lie in [1, 3]"));
  }
}

// -----------------------------------------------------------------------------------------------
// Bad input to the router losses
// -----------------------------------------------------------------------------------------------

TEST_CASE("router losses: bad input is reported with a code and a message") {
  kdtest::rng_t rng(45);
  const kd::index_t tokens = 4, e = 3;
  mat logits = randn(rng, tokens, e), grad(tokens, e);
  ids_t ids = {0, 1, 2, 0};
  kd::load_balance_loss<kd::fp64> lb;
  kd::router_z_loss<kd::fp64> z;
  kd::loss_result r;
  REQUIRE(lb(kd::cpu, logits.view(), ids_view(ids, tokens, 1), r, grad.view()).ok());
  REQUIRE(z(kd::cpu, logits.view(), r, grad.view()).ok());

  SUBCASE("expert ids out of range") {
    for (std::int32_t bad : {3, -1}) {
      ids[2] = bad;
      const kd::status s = lb(kd::cpu, logits.view(), ids_view(ids, tokens, 1), r);
      CHECK(s.code() == kd::errc::out_of_range);
      CHECK(contains(s.message(), "expert id " + std::to_string(bad) + " at token 2 is outside [0, 3)"));
      CHECK(contains(s.message(), "component 'load_balance'"));
    }
  }
  SUBCASE("top-k > E") {
    const ids_t wide = random_topk(rng, tokens, 3, 3);
    ids_t four(static_cast<std::size_t>(tokens * 4), 0);
    const kd::status s = lb(kd::cpu, logits.view(), ids_view(four, tokens, 4), r);
    CHECK(s.code() == kd::errc::invalid_argument);
    CHECK(contains(s.message(), "top-k 4 must lie in [1, 3]"));
    CHECK(lb(kd::cpu, logits.view(), ids_view(wide, tokens, 3), r).ok());  // k = E is allowed
    CHECK(r.loss == doctest::Approx(lb.options.coefficient).epsilon(1e-14));  // every expert every token
  }
  SUBCASE("expert ids cover a different token count") {
    const kd::status s = lb(kd::cpu, logits.view(), ids_view(ids, tokens - 1, 1), r);
    CHECK(s.code() == kd::errc::shape_mismatch);
    CHECK(contains(s.message(), "expert ids cover 3 tokens but the router logits 4"));
  }
  SUBCASE("gradient shape") {
    mat g(tokens, e + 1);
    kd::status s = lb(kd::cpu, logits.view(), ids_view(ids, tokens, 1), r, g.view());
    CHECK(s.code() == kd::errc::shape_mismatch);
    CHECK(contains(s.message(), "router gradient"));
    CHECK(contains(s.message(), "component 'load_balance'"));
    s = z(kd::cpu, logits.view(), r, g.view());
    CHECK(s.code() == kd::errc::shape_mismatch);
    CHECK(contains(s.message(), "router gradient"));
    CHECK(contains(s.message(), "component 'router_z'"));
    // Stride and null errors of the gradient name the component too (one validation for both backends).
    const kd::matrix_view<double> strided(grad.view().data, tokens, e, e - 1);
    s = lb(kd::cpu, logits.view(), ids_view(ids, tokens, 1), r, strided);
    CHECK(s.code() == kd::errc::shape_mismatch);
    CHECK(contains(s.message(), "router gradient"));
    CHECK(contains(s.message(), "component 'load_balance'"));
    z.options.component = "moe/z";
    s = z(kd::cpu, logits.view(), r, kd::matrix_view<double>(nullptr, tokens, e));
    CHECK(s.code() == kd::errc::invalid_argument);
    CHECK(contains(s.message(), "router gradient"));
    CHECK(contains(s.message(), "component 'moe/z'"));
  }
  SUBCASE("negative or non-finite coefficient") {
    for (double c : {-1e-3, std::numeric_limits<double>::infinity(), std::numeric_limits<double>::quiet_NaN()}) {
      lb.options.coefficient = c;
      z.options.coefficient = c;
      kd::status s = lb(kd::cpu, logits.view(), ids_view(ids, tokens, 1), r);
      CHECK(s.code() == kd::errc::invalid_argument);
      CHECK(contains(s.message(), "coefficient must be finite and >= 0"));
      CHECK(contains(s.message(), "component 'load_balance'"));
      s = z(kd::cpu, logits.view(), r);
      CHECK(s.code() == kd::errc::invalid_argument);
      CHECK(contains(s.message(), "component 'router_z'"));
    }
    lb.options.coefficient = 0.0;  // zero is allowed (term switched off)
    CHECK(lb(kd::cpu, logits.view(), ids_view(ids, tokens, 1), r).ok());
    CHECK(r.loss == 0.0);
  }
  SUBCASE("empty logits") {
    kd::status s = lb(kd::cpu, kd::matrix_view<double>{logits.v.data(), 0, e}, ids_view(ids, 0, 1), r);
    CHECK(s.code() == kd::errc::empty_input);
    CHECK(contains(s.message(), "router logits are empty"));
    s = z(kd::cpu, kd::matrix_view<double>{logits.v.data(), tokens, 0}, r);
    CHECK(s.code() == kd::errc::empty_input);
  }
  SUBCASE("NaN / Inf in the logits names the tensor and the component") {
    logits(1, 2) = std::numeric_limits<double>::quiet_NaN();
    lb.options.component = "moe_layer3";
    kd::status s = lb(kd::cpu, logits.view(), ids_view(ids, tokens, 1), r);
    CHECK(s.code() == kd::errc::non_finite);
    CHECK(contains(s.message(), "NaN in router logits at token 1, column 2"));
    CHECK(contains(s.message(), "component 'moe_layer3'"));
    logits(1, 2) = -std::numeric_limits<double>::infinity();
    s = z(kd::cpu, logits.view(), r);
    CHECK(s.code() == kd::errc::non_finite);
    CHECK(contains(s.message(), "Inf in router logits at token 1, column 2"));
    CHECK(contains(s.message(), "component 'router_z'"));
  }
}
