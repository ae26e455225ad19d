// Tests for kd/loss/attention.hpp: attention-map transfer with head and layer maps.
//
// Gradients of the student scores are checked against central finite differences in double for both
// normalizations, causal and not, over several head maps and temperatures; the loss is compared with
// an independent loop implementation; the layer/head map constructors, the scale argument for
// softmax_kl and the error paths are covered separately.
#include <doctest/doctest.h>

#include <kd/kd.hpp>

#include "test_util.hpp"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <random>
#include <set>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

namespace {

using fp64_pair = kd::precision_set<kd::fp64, kd::fp64>;
template <class N>
using attn64 = kd::attention_loss<N, fp64_pair>;

// batch * heads maps of T x T, batch-major, in one vector.
struct maps {
  std::vector<double> v;
  kd::index_t count = 0, t = 0;
  maps(kd::index_t c, kd::index_t len) : v(static_cast<std::size_t>(c * len * len), 0.0), count(c), t(len) {}
  kd::tensor3_view<double> view() { return {v.data(), count, t, t}; }
  double& at(kd::index_t m, kd::index_t i, kd::index_t k) { return v[static_cast<std::size_t>((m * t + i) * t + k)]; }
  double at(kd::index_t m, kd::index_t i, kd::index_t k) const {
    return v[static_cast<std::size_t>((m * t + i) * t + k)];
  }
};

maps randn_maps(kdtest::rng_t& rng, kd::index_t count, kd::index_t t, double stddev = 1.0) {
  maps m(count, t);
  kdtest::fill_normal(m.v, rng, 0.0, stddev);
  return m;
}

using kdtest::contains;
using kdtest::rel_error;

// Independent reference: plain loops, no Eigen, no shared code with the library.
//   softmax_kl: T^2 * mean_rows KL(mean_g softmax(t_g / T) || softmax(s / T))
//   none:       mean_rows sum_k (s_k - mean_g t_gk)^2
double reference_loss(const maps& teacher, const maps& student, int hs, int ht, bool causal, double temp, bool kl,
                      const std::vector<std::vector<int>>& groups) {
  const kd::index_t batch = student.count / hs, len = student.t;
  double total = 0;
  for (kd::index_t b = 0; b < batch; ++b)
    for (int h = 0; h < hs; ++h)
      for (kd::index_t i = 0; i < len; ++i) {
        const kd::index_t keys = causal ? i + 1 : len;
        std::vector<double> p(static_cast<std::size_t>(keys), 0.0);
        const auto& g = groups[static_cast<std::size_t>(h)];
        for (int th : g) {
          double z = 0;
          for (kd::index_t k = 0; k < keys; ++k) z += std::exp(teacher.at(b * ht + th, i, k) / (kl ? temp : 1.0));
          for (kd::index_t k = 0; k < keys; ++k) {
            const double tv = teacher.at(b * ht + th, i, k);
            p[static_cast<std::size_t>(k)] += (kl ? std::exp(tv / temp) / z : tv) / static_cast<double>(g.size());
          }
        }
        const kd::index_t sm = b * hs + h;
        if (kl) {
          double z = 0;
          for (kd::index_t k = 0; k < keys; ++k) z += std::exp(student.at(sm, i, k) / temp);
          for (kd::index_t k = 0; k < keys; ++k) {
            const double q = std::exp(student.at(sm, i, k) / temp) / z;
            const double pk = p[static_cast<std::size_t>(k)];
            if (pk > 0) total += pk * std::log(pk / q);
          }
        } else {
          for (kd::index_t k = 0; k < keys; ++k) {
            const double d = student.at(sm, i, k) - p[static_cast<std::size_t>(k)];
            total += d * d;
          }
        }
      }
  const double rows = static_cast<double>(student.count * len);
  return (kl ? temp * temp : 1.0) * total / rows;
}

template <class N>
double forward(const kd::attention_options& o, maps& teacher, maps& student) {
  attn64<N> loss;
  loss.options = o;
  kd::loss_result r;
  const kd::status s = loss(kd::cpu, teacher.view(), student.view(), r);
  REQUIRE_MESSAGE(s.ok(), s.message());
  return r.loss;
}

// FD-checks the student-score gradient and compares the loss with the reference.
template <class N>
void check_attention(std::uint64_t seed, int hs, int ht, bool causal, double temp, const kd::head_map* custom) {
  constexpr bool kl = std::is_same_v<N, kd::softmax_kl>;
  kdtest::rng_t rng(seed);
  const kd::index_t batch = 2, len = 5;
  maps teacher = randn_maps(rng, batch * ht, len, 1.5);
  maps student = randn_maps(rng, batch * hs, len, 1.5);

  kd::attention_options o;
  o.student_heads = hs;
  o.teacher_heads = ht;
  o.causal = causal;
  o.temperature = temp;
  o.heads = custom;
  const kd::head_map groups = custom ? *custom : kd::head_map::uniform(hs, ht);

  attn64<N> loss;
  loss.options = o;
  maps grad(batch * hs, len);
  std::fill(grad.v.begin(), grad.v.end(), 77.0);  // overwritten, including the masked entries
  kd::loss_result out;
  const kd::status s = loss(kd::cpu, teacher.view(), student.view(), out, grad.view());
  REQUIRE_MESSAGE(s.ok(), s.message());
  CHECK(out.tokens == batch * hs * len);
  CHECK(out.normalizer == static_cast<double>(batch * hs * len));
  CHECK(out.loss > 0.0);
  CHECK(out.loss == doctest::Approx(reference_loss(teacher, student, hs, ht, causal, temp, kl, groups.teacher_heads))
                        .epsilon(1e-12));

  // Central differences over every student score.
  const std::vector<double> fd =
      kdtest::numeric_gradient([&] { return forward<N>(o, teacher, student); }, student.v, 1e-6);
  CHECK(rel_error(grad.v, fd) < 1e-7);

  // Masked entries (keys after the query) are exactly zero with a causal mask.
  if (causal) {
    bool all_zero = true;
    for (kd::index_t m = 0; m < grad.count; ++m)
      for (kd::index_t i = 0; i < len; ++i)
        for (kd::index_t k = i + 1; k < len; ++k) all_zero = all_zero && grad.at(m, i, k) == 0.0;
    CHECK(all_zero);
  }
  // softmax_kl gradient rows sum to zero (q - p over the visible keys).
  if (kl) {
    double worst = 0;
    for (kd::index_t m = 0; m < grad.count; ++m)
      for (kd::index_t i = 0; i < len; ++i) {
        double row = 0;
        for (kd::index_t k = 0; k < len; ++k) row += grad.at(m, i, k);
        worst = std::max(worst, std::abs(row));
      }
    CHECK(worst < 1e-14);
  }
}

template <class N>
void check_attention_all_heads(std::uint64_t seed, bool causal, double temp) {
  SUBCASE("equal heads 3 -> 3") { check_attention<N>(seed, 3, 3, causal, temp, nullptr); }
  SUBCASE("teacher 4 -> student 2") { check_attention<N>(seed + 1, 2, 4, causal, temp, nullptr); }
  SUBCASE("teacher 16 -> student 9") { check_attention<N>(seed + 2, 9, 16, causal, temp, nullptr); }
  SUBCASE("teacher 2 -> student 4 (fewer teacher heads)") { check_attention<N>(seed + 3, 4, 2, causal, temp, nullptr); }
  SUBCASE("custom head_map") {
    // Non-contiguous, overlapping, unordered groups.
    const kd::head_map hm{{{2, 0}, {1}, {0, 1, 2}}};
    check_attention<N>(seed + 4, 3, 3, causal, temp, &hm);
  }
}

}  // namespace

// -----------------------------------------------------------------------------------------------
// Gradients vs finite differences, loss vs an independent loop
// -----------------------------------------------------------------------------------------------

TEST_CASE("attention loss: softmax_kl gradients, causal") { check_attention_all_heads<kd::softmax_kl>(1, true, 1.0); }
TEST_CASE("attention loss: softmax_kl gradients, non-causal") { check_attention_all_heads<kd::softmax_kl>(11, false, 1.0); }
TEST_CASE("attention loss: softmax_kl gradients, temperature 2.5, causal") {
  check_attention_all_heads<kd::softmax_kl>(21, true, 2.5);
}
TEST_CASE("attention loss: softmax_kl gradients, temperature 0.6, non-causal") {
  check_attention_all_heads<kd::softmax_kl>(31, false, 0.6);
}
TEST_CASE("attention loss: none gradients, causal") { check_attention_all_heads<kd::none>(41, true, 1.0); }
TEST_CASE("attention loss: none gradients, non-causal") { check_attention_all_heads<kd::none>(51, false, 1.0); }

// -----------------------------------------------------------------------------------------------
// Known values
// -----------------------------------------------------------------------------------------------

TEST_CASE("attention loss: known values") {
  kdtest::rng_t rng(5);
  const kd::index_t batch = 2, len = 4;

  SUBCASE("identical maps give 0") {
    for (bool causal : {true, false}) {
      maps t = randn_maps(rng, batch * 3, len);
      maps s = t;
      kd::attention_options o;
      o.student_heads = o.teacher_heads = 3;
      o.causal = causal;
      CHECK(std::abs(forward<kd::softmax_kl>(o, t, s)) < 1e-15);
      CHECK(forward<kd::none>(o, t, s) == 0.0);
      o.temperature = 3.0;
      CHECK(std::abs(forward<kd::softmax_kl>(o, t, s)) < 1e-14);
    }
  }

  SUBCASE("a group of identical teacher heads averages to that head") {
    // teacher 4 heads -> student 2: heads {0,1} and {2,3}; make each pair equal to the student head.
    maps s = randn_maps(rng, batch * 2, len);
    maps t(batch * 4, len);
    for (kd::index_t b = 0; b < batch; ++b)
      for (kd::index_t g = 0; g < 4; ++g)
        for (kd::index_t i = 0; i < len; ++i)
          for (kd::index_t k = 0; k < len; ++k) t.at(b * 4 + g, i, k) = s.at(b * 2 + g / 2, i, k);
    kd::attention_options o;
    o.student_heads = 2;
    o.teacher_heads = 4;
    CHECK(std::abs(forward<kd::softmax_kl>(o, t, s)) < 1e-15);
    CHECK(forward<kd::none>(o, t, s) == doctest::Approx(0.0));
  }

  SUBCASE("softmax_kl averages teacher probabilities, none averages raw scores") {
    // One query row over 2 keys, one student head, two teacher heads.
    maps t(2, 2), s(1, 2);
    // Row 1 (two visible keys): teacher head 0 ~ (0, 1), head 1 ~ (1, 0), student uniform.
    t.at(0, 1, 1) = 10.0;
    t.at(1, 1, 0) = 10.0;
    s.at(0, 1, 0) = 0.3;
    s.at(0, 1, 1) = 0.3;
    kd::attention_options o;
    o.teacher_heads = 2;
    // softmax_kl: row 0 has one key (KL 0); row 1: mean of the teacher probabilities = (0.5, 0.5) = q.
    CHECK(std::abs(forward<kd::softmax_kl>(o, t, s)) < 1e-12);
    // none: row 0 is (0 - 0)^2; row 1 compares 0.3 with the mean raw score 5 on both keys; mean over 2 rows.
    CHECK(forward<kd::none>(o, t, s) == doctest::Approx(2 * 4.7 * 4.7 / 2).epsilon(1e-14));
  }

  SUBCASE("tiny case against a hand loop, with temperature") {
    maps t = randn_maps(rng, 4, 3, 2.0), s = randn_maps(rng, 2, 3, 2.0);
    const std::vector<std::vector<int>> groups = {{0, 1}, {2, 3}};
    for (bool causal : {true, false})
      for (double temp : {1.0, 1.7}) {
        CAPTURE(causal);
        CAPTURE(temp);
        kd::attention_options o;
        o.student_heads = 2;
        o.teacher_heads = 4;
        o.causal = causal;
        o.temperature = temp;
        // Written out again here, independently of reference_loss's structure.
        double total = 0;
        for (int h = 0; h < 2; ++h)
          for (int i = 0; i < 3; ++i) {
            const int keys = causal ? i + 1 : 3;
            double p[3] = {0, 0, 0}, zs = 0, zt[2] = {0, 0};
            for (int g = 0; g < 2; ++g)
              for (int k = 0; k < keys; ++k) zt[g] += std::exp(t.at(2 * h + g, i, k) / temp);
            for (int k = 0; k < keys; ++k) {
              p[k] = 0.5 * (std::exp(t.at(2 * h, i, k) / temp) / zt[0] + std::exp(t.at(2 * h + 1, i, k) / temp) / zt[1]);
              zs += std::exp(s.at(h, i, k) / temp);
            }
            for (int k = 0; k < keys; ++k) total += p[k] * std::log(p[k] * zs / std::exp(s.at(h, i, k) / temp));
          }
        const double expected = temp * temp * total / 6.0;
        CHECK(forward<kd::softmax_kl>(o, t, s) == doctest::Approx(expected).epsilon(1e-13));
        CHECK(forward<kd::softmax_kl>(o, t, s) ==
              doctest::Approx(reference_loss(t, s, 2, 4, causal, temp, true, groups)).epsilon(1e-13));
      }
  }

  SUBCASE("temperature: loss_T(s, t) = T^2 loss_1(s / T, t / T) and grad_T = grad_1(s / T, t / T) / T") {
    const double temp = 3.0;
    maps t = randn_maps(rng, batch * 2, len, 3.0), s = randn_maps(rng, batch * 2, len, 3.0);
    maps ts = t, ss = s;
    for (auto& x : ts.v) x /= temp;
    for (auto& x : ss.v) x /= temp;
    attn64<kd::softmax_kl> lt, l1;
    lt.options.student_heads = lt.options.teacher_heads = 2;
    l1.options = lt.options;
    lt.options.temperature = temp;
    maps gt(batch * 2, len), g1(batch * 2, len);
    kd::loss_result rt, r1;
    REQUIRE(lt(kd::cpu, t.view(), s.view(), rt, gt.view()).ok());
    REQUIRE(l1(kd::cpu, ts.view(), ss.view(), r1, g1.view()).ok());
    CHECK(rt.loss == doctest::Approx(temp * temp * r1.loss).epsilon(1e-13));
    for (auto& x : g1.v) x *= temp;  // d/ds = (1/T) d/d(s/T), times T^2
    CHECK(rel_error(gt.v, g1.v) < 1e-13);
  }

  SUBCASE("softmax_kl ignores a per-row shift of the student scores; none does not") {
    maps t = randn_maps(rng, batch, len), s = randn_maps(rng, batch, len);
    maps shifted = s;
    for (kd::index_t m = 0; m < batch; ++m)
      for (kd::index_t i = 0; i < len; ++i)
        for (kd::index_t k = 0; k < len; ++k) shifted.at(m, i, k) += 10.0 * static_cast<double>(i + 1);
    kd::attention_options o;
    CHECK(forward<kd::softmax_kl>(o, t, shifted) == doctest::Approx(forward<kd::softmax_kl>(o, t, s)).epsilon(1e-12));
    CHECK(forward<kd::none>(o, t, shifted) > forward<kd::none>(o, t, s) + 10.0);
  }

  SUBCASE("causal: only keys 0..i are read, and -inf masked scores are accepted") {
    maps t = randn_maps(rng, batch, len), s = randn_maps(rng, batch, len);
    kd::attention_options o;
    const double base = forward<kd::softmax_kl>(o, t, s);
    const double base_none = forward<kd::none>(o, t, s);
    for (kd::index_t m = 0; m < batch; ++m)
      for (kd::index_t i = 0; i < len; ++i)
        for (kd::index_t k = i + 1; k < len; ++k) {
          t.at(m, i, k) = -std::numeric_limits<double>::infinity();
          s.at(m, i, k) = m == 0 ? 1e300 : -std::numeric_limits<double>::infinity();
        }
    CHECK(forward<kd::softmax_kl>(o, t, s) == base);
    CHECK(forward<kd::none>(o, t, s) == base_none);
    o.causal = false;  // now they are read, and rejected
    attn64<kd::softmax_kl> loss;
    loss.options = o;
    kd::loss_result r;
    CHECK(loss(kd::cpu, t.view(), s.view(), r).code() == kd::errc::non_finite);
  }
}

TEST_CASE("attention loss: grad_scale multiplies and accumulate_grad adds") {
  kdtest::rng_t rng(17);
  const kd::index_t batch = 2, len = 4;
  maps t = randn_maps(rng, batch * 4, len), s = randn_maps(rng, batch * 2, len);
  attn64<kd::softmax_kl> loss;
  loss.options.student_heads = 2;
  loss.options.teacher_heads = 4;
  maps g1(batch * 2, len), g2(batch * 2, len);
  kd::loss_result r1, r2;
  REQUIRE(loss(kd::cpu, t.view(), s.view(), r1, g1.view()).ok());
  loss.options.grad_scale = 0.25;
  REQUIRE(loss(kd::cpu, t.view(), s.view(), r2, g2.view()).ok());
  CHECK(r2.loss == r1.loss);
  for (auto& x : g1.v) x *= 0.25;
  CHECK(rel_error(g2.v, g1.v) < 1e-15);

  loss.options.accumulate_grad = true;
  maps g3 = randn_maps(rng, batch * 2, len);
  const maps g0 = g3;
  REQUIRE(loss(kd::cpu, t.view(), s.view(), r2, g3.view()).ok());
  std::vector<double> expected(g0.v.size());
  for (std::size_t i = 0; i < expected.size(); ++i) expected[i] = g0.v[i] + g1.v[i];
  CHECK(rel_error(g3.v, expected) < 1e-15);
  // Masked entries keep what was there.
  bool kept = true;
  for (kd::index_t m = 0; m < g3.count; ++m)
    for (kd::index_t i = 0; i < len; ++i)
      for (kd::index_t k = i + 1; k < len; ++k) kept = kept && g3.at(m, i, k) == g0.at(m, i, k);
  CHECK(kept);
}

TEST_CASE("attention loss: fp32 matches fp64 and bf16 teacher is accepted") {
  kdtest::rng_t rng(23);
  const kd::index_t batch = 2, len = 8;
  maps t = randn_maps(rng, batch * 4, len), s = randn_maps(rng, batch * 2, len);
  std::vector<float> tf(t.v.begin(), t.v.end()), sf(s.v.begin(), s.v.end()), gf(s.v.size());
  std::vector<kd::bfloat16> tb(t.v.size());
  for (std::size_t i = 0; i < t.v.size(); ++i) tb[i] = kd::bfloat16(static_cast<float>(t.v[i]));

  attn64<kd::softmax_kl> ref;
  ref.options.student_heads = 2;
  ref.options.teacher_heads = 4;
  maps g(batch * 2, len);
  kd::loss_result r_ref;
  REQUIRE(ref(kd::cpu, t.view(), s.view(), r_ref, g.view()).ok());

  kd::attention_loss<kd::softmax_kl, kd::precision_set<kd::fp32, kd::fp32>> l32;
  l32.options = ref.options;
  kd::loss_result r32;
  REQUIRE(l32(kd::cpu, kd::tensor3_view<float>{tf.data(), batch * 4, len, len},
              kd::tensor3_view<float>{sf.data(), batch * 2, len, len}, r32,
              kd::tensor3_view<float>{gf.data(), batch * 2, len, len})
              .ok());
  CHECK(r32.loss == doctest::Approx(r_ref.loss).epsilon(1e-5));
  CHECK(rel_error(std::vector<double>(gf.begin(), gf.end()), g.v) < 1e-5);

  kd::attention_loss<kd::softmax_kl, kd::precision_set<kd::bf16, kd::fp32>> lbf;
  lbf.options = ref.options;
  kd::loss_result rbf;
  REQUIRE(lbf(kd::cpu, kd::tensor3_view<kd::bfloat16>{tb.data(), batch * 4, len, len},
              kd::tensor3_view<float>{sf.data(), batch * 2, len, len}, rbf)
              .ok());
  CHECK(rbf.loss == doctest::Approx(r_ref.loss).epsilon(2e-2));
}

// -----------------------------------------------------------------------------------------------
// Layer and head maps
// -----------------------------------------------------------------------------------------------

TEST_CASE("layer_map::uniform") {
  SUBCASE("student 30, teacher 24") {
    kd::layer_map m;
    REQUIRE(kd::layer_map::uniform(30, 24, m).ok());
    REQUIRE(m.pairs.size() == 24);
    std::vector<int> teacher_seen(24, 0);
    for (std::size_t i = 0; i < m.pairs.size(); ++i) {
      const auto [s, t] = m.pairs[i];
      CHECK(s >= 0);
      CHECK(s < 30);
      REQUIRE(t >= 0);
      REQUIRE(t < 24);
      ++teacher_seen[static_cast<std::size_t>(t)];
      if (i > 0) CHECK(s > m.pairs[i - 1].first);
      CHECK(t == static_cast<int>(i));
    }
    CHECK(std::all_of(teacher_seen.begin(), teacher_seen.end(), [](int c) { return c == 1; }));
    CHECK(m.pairs.back() == std::pair<int, int>{29, 23});
    CHECK(m.pairs.front() == std::pair<int, int>{0, 0});  // round(1.25) - 1
  }
  SUBCASE("student 24, teacher 30 is the mirror") {
    kd::layer_map a, b;
    REQUIRE(kd::layer_map::uniform(30, 24, a).ok());
    REQUIRE(kd::layer_map::uniform(24, 30, b).ok());
    REQUIRE(b.pairs.size() == 24);
    for (std::size_t i = 0; i < a.pairs.size(); ++i) {
      CHECK(b.pairs[i].first == a.pairs[i].second);
      CHECK(b.pairs[i].second == a.pairs[i].first);
    }
    CHECK(b.pairs.back() == std::pair<int, int>{23, 29});
  }
  SUBCASE("equal depths pair layer i with layer i; any depths end on the two last layers") {
    kd::layer_map m;
    REQUIRE(kd::layer_map::uniform(12, 12, m).ok());
    REQUIRE(m.pairs.size() == 12);
    for (int i = 0; i < 12; ++i) CHECK(m.pairs[static_cast<std::size_t>(i)] == std::pair<int, int>{i, i});
    for (int ls = 1; ls <= 40; ++ls)
      for (int lt = 1; lt <= 40; ++lt) {
        REQUIRE(kd::layer_map::uniform(ls, lt, m).ok());
        CHECK(m.pairs.size() == static_cast<std::size_t>(std::min(ls, lt)));
        CHECK(m.pairs.back() == std::pair<int, int>{ls - 1, lt - 1});
        bool increasing = true;
        for (std::size_t i = 1; i < m.pairs.size(); ++i)
          increasing = increasing && m.pairs[i].first > m.pairs[i - 1].first && m.pairs[i].second > m.pairs[i - 1].second;
        CHECK(increasing);
      }
  }
  SUBCASE("non-positive layer counts are rejected") {
    kd::layer_map m;
    const kd::status s = kd::layer_map::uniform(0, 24, m);
    CHECK(s.code() == kd::errc::invalid_argument);
    CHECK(contains(s.message(), "positive layer counts"));
    CHECK(kd::layer_map::uniform(30, -1, m).code() == kd::errc::invalid_argument);
  }
}

TEST_CASE("layer_map::explicit_pairs") {
  kd::layer_map m;
  REQUIRE(kd::layer_map::explicit_pairs({{0, 0}, {5, 3}, {29, 23}}, 30, 24, m).ok());
  CHECK(m.pairs.size() == 3);
  CHECK(m.pairs[1] == std::pair<int, int>{5, 3});

  kd::status s = kd::layer_map::explicit_pairs({{0, 0}, {30, 3}}, 30, 24, m);
  CHECK(s.code() == kd::errc::out_of_range);
  CHECK(contains(s.message(), "student layer 30 is outside [0, 30)"));
  s = kd::layer_map::explicit_pairs({{-1, 3}}, 30, 24, m);
  CHECK(s.code() == kd::errc::out_of_range);
  CHECK(contains(s.message(), "student layer -1"));
  s = kd::layer_map::explicit_pairs({{4, 24}}, 30, 24, m);
  CHECK(s.code() == kd::errc::out_of_range);
  CHECK(contains(s.message(), "teacher layer 24 is outside [0, 24)"));
  s = kd::layer_map::explicit_pairs({{4, -2}}, 30, 24, m);
  CHECK(s.code() == kd::errc::out_of_range);
  // A failed call leaves the previous map alone.
  CHECK(m.pairs.size() == 3);
}

TEST_CASE("head_map::uniform") {
  SUBCASE("teacher 16 -> student 9: groups cover every teacher head, each contiguous and non-empty") {
    const kd::head_map m = kd::head_map::uniform(9, 16);
    REQUIRE(m.teacher_heads.size() == 9);
    CHECK(m.check(9, 16).ok());
    std::set<int> covered;
    int prev_first = -1;
    for (const auto& g : m.teacher_heads) {
      REQUIRE(!g.empty());
      CHECK(g.size() >= 2);
      CHECK(g.size() <= 3);
      for (std::size_t i = 1; i < g.size(); ++i) CHECK(g[i] == g[i - 1] + 1);  // contiguous
      CHECK(g.front() >= prev_first);                                         // groups move forward
      prev_first = g.front();
      covered.insert(g.begin(), g.end());
    }
    CHECK(covered.size() == 16);
    CHECK(*covered.begin() == 0);
    CHECK(*covered.rbegin() == 15);
    CHECK(m.teacher_heads.front().front() == 0);
    CHECK(m.teacher_heads.back().back() == 15);
  }
  SUBCASE("teacher 4 -> student 2 groups evenly") {
    const kd::head_map m = kd::head_map::uniform(2, 4);
    CHECK(m.teacher_heads == std::vector<std::vector<int>>{{0, 1}, {2, 3}});
  }
  SUBCASE("equal heads map one to one") {
    const kd::head_map m = kd::head_map::uniform(5, 5);
    for (int h = 0; h < 5; ++h) CHECK(m.teacher_heads[static_cast<std::size_t>(h)] == std::vector<int>{h});
  }
  SUBCASE("teacher 2 -> student 4: each student head copies one teacher head") {
    const kd::head_map m = kd::head_map::uniform(4, 2);
    CHECK(m.teacher_heads == std::vector<std::vector<int>>{{0}, {0}, {1}, {1}});
  }
  SUBCASE("every pair up to 24 heads is valid and covering") {
    for (int hs = 1; hs <= 24; ++hs)
      for (int ht = 1; ht <= 24; ++ht) {
        const kd::head_map m = kd::head_map::uniform(hs, ht);
        CHECK(m.check(hs, ht).ok());
        std::set<int> covered;
        for (const auto& g : m.teacher_heads) covered.insert(g.begin(), g.end());
        CHECK(covered.size() == static_cast<std::size_t>(ht));
      }
  }
}

// -----------------------------------------------------------------------------------------------
// Scale: why softmax_kl exists
// -----------------------------------------------------------------------------------------------

namespace {
// Scores q.k / sqrt(64) with q, k ~ N(0, 1) of width 64, per head.
std::vector<float> scores(kdtest::rng_t& rng, kd::index_t heads, kd::index_t len, kd::index_t width) {
  std::normal_distribution<double> dist(0.0, 1.0);
  std::vector<float> out(static_cast<std::size_t>(heads * len * len));
  std::vector<double> q(static_cast<std::size_t>(len * width)), k(q.size());
  for (kd::index_t h = 0; h < heads; ++h) {
    for (auto& x : q) x = dist(rng);
    for (auto& x : k) x = dist(rng);
    for (kd::index_t i = 0; i < len; ++i)
      for (kd::index_t j = 0; j < len; ++j) {
        double dot = 0;
        for (kd::index_t c = 0; c < width; ++c)
          dot += q[static_cast<std::size_t>(i * width + c)] * k[static_cast<std::size_t>(j * width + c)];
        out[static_cast<std::size_t>((h * len + i) * len + j)] = static_cast<float>(dot / std::sqrt(double(width)));
      }
  }
  return out;
}
}  // namespace

TEST_CASE("attention loss: at T=64, 16 -> 9 heads softmax_kl is O(1), raw-score MSE is not") {
  kdtest::rng_t rng(64);
  const kd::index_t len = 64;
  std::vector<float> t = scores(rng, 16, len, 64), s = scores(rng, 9, len, 64);
  kd::tensor3_view<float> tv{t.data(), 16, len, len}, sv{s.data(), 9, len, len};
  for (bool causal : {false, true}) {
    CAPTURE(causal);
    kd::attention_loss<kd::softmax_kl> kl;
    kd::attention_loss<kd::none> raw;
    kl.options.student_heads = raw.options.student_heads = 9;
    kl.options.teacher_heads = raw.options.teacher_heads = 16;
    kl.options.causal = raw.options.causal = causal;
    kd::loss_result rk, rr;
    REQUIRE(kl(kd::cpu, tv, sv, rk).ok());
    REQUIRE(raw(kd::cpu, tv, sv, rr).ok());
    MESSAGE("causal=" << causal << " softmax_kl=" << rk.loss << " none=" << rr.loss);
    CHECK(rk.loss >= 0.1);
    CHECK(rk.loss <= 5.0);
    // Without a mask each row sums 64 squared differences of unit-variance scores: ~ 64 * (1 + 1/3).
    // With one, rows average 32.5 keys, so the raw loss halves (still tens of times the KL).
    if (!causal) CHECK(rr.loss > 50.0);
    else CHECK(rr.loss > 25.0);
    CHECK(rr.loss > 20.0 * rk.loss);
  }
}

// -----------------------------------------------------------------------------------------------
// Bad input
// -----------------------------------------------------------------------------------------------

TEST_CASE("attention loss: bad input is reported with a code and a message") {
  kdtest::rng_t rng(3);
  const kd::index_t batch = 2, len = 4;
  maps t = randn_maps(rng, batch * 4, len), s = randn_maps(rng, batch * 2, len), g(batch * 2, len);
  attn64<kd::softmax_kl> loss;
  loss.options.student_heads = 2;
  loss.options.teacher_heads = 4;
  kd::loss_result r;
  auto run = [&](kd::tensor3_view<double> tv, kd::tensor3_view<double> sv, kd::tensor3_view<double> gv) {
    return loss(kd::cpu, tv, sv, r, gv);
  };
  REQUIRE(run(t.view(), s.view(), g.view()).ok());

  SUBCASE("batch disagrees between teacher and student") {
    maps t3 = randn_maps(rng, 3 * 4, len);
    const kd::status st = run(t3.view(), s.view(), g.view());
    CHECK(st.code() == kd::errc::shape_mismatch);
    CHECK(contains(st.message(), "student maps (4 = batch x 2 heads) and teacher maps (12 = batch x 4 heads)"));
    CHECK(contains(st.message(), "disagree on the batch"));
    CHECK(contains(st.message(), "component 'attention'"));
  }
  SUBCASE("map count not a multiple of the head count") {
    loss.options.teacher_heads = 3;  // 8 teacher maps
    const kd::status st = run(t.view(), s.view(), g.view());
    CHECK(st.code() == kd::errc::shape_mismatch);
    CHECK(contains(st.message(), "disagree on the batch"));
  }
  SUBCASE("heads disagree with the declared head counts") {
    loss.options.student_heads = 4;  // 4 student maps = 1 x 4 heads, 8 teacher maps = 2 x 4 heads
    const kd::status st = run(t.view(), s.view(), g.view());
    CHECK(st.code() == kd::errc::shape_mismatch);
    CHECK(contains(st.message(), "disagree on the batch"));
  }
  SUBCASE("non-square maps") {
    kd::tensor3_view<double> sv{s.v.data(), batch * 2, len, len - 1};
    kd::status st = run(t.view(), sv, g.view());
    CHECK(st.code() == kd::errc::shape_mismatch);
    CHECK(contains(st.message(), "must be square"));
    kd::tensor3_view<double> tv{t.v.data(), batch * 4, len - 1, len};
    st = run(tv, s.view(), g.view());
    CHECK(st.code() == kd::errc::shape_mismatch);
    CHECK(contains(st.message(), "must be square"));
  }
  SUBCASE("sequence lengths differ") {
    kd::tensor3_view<double> tv{t.v.data(), batch * 4, len - 1, len - 1};
    const kd::status st = run(tv, s.view(), g.view());
    CHECK(st.code() == kd::errc::shape_mismatch);
    CHECK(contains(st.message(), "student maps cover 4 positions but teacher maps 3"));
  }
  SUBCASE("gradient shape") {
    kd::tensor3_view<double> gv{g.v.data(), batch * 2 - 1, len, len};
    const kd::status st = run(t.view(), s.view(), gv);
    CHECK(st.code() == kd::errc::shape_mismatch);
    CHECK(contains(st.message(), "student gradient"));
    CHECK(contains(st.message(), "component 'attention'"));
  }
  SUBCASE("null pointers are rejected on the CPU too, naming the component") {
    loss.options.component = "attn_layer2";
    const kd::status st = run(t.view(), s.view(), kd::tensor3_view<double>{nullptr, batch * 2, len, len});
    CHECK(st.code() == kd::errc::invalid_argument);
    CHECK(contains(st.message(), "null"));
    CHECK(contains(st.message(), "component 'attn_layer2'"));
  }
  SUBCASE("softmax_kl: a finite score that overflows at the temperature is rejected") {
    loss.options.temperature = 0.5;
    t.at(5, 2, 1) = 3e38;
    const kd::status st = run(t.view(), s.view(), g.view());
    CHECK(st.code() == kd::errc::non_finite);
    CHECK(contains(st.message(), "teacher attention scores (map 5) at token 2, column 1"));
    CHECK(contains(st.message(), "overflows"));
    CHECK(contains(st.message(), "component 'attention'"));
    t.at(5, 2, 1) = 1e30;
    CHECK(run(t.view(), s.view(), g.view()).ok());
  }
  SUBCASE("empty inputs") {
    kd::status st = run(kd::tensor3_view<double>{t.v.data(), 0, len, len}, s.view(), g.view());
    CHECK(st.code() == kd::errc::empty_input);
    CHECK(contains(st.message(), "attention maps are empty"));
    st = run(t.view(), kd::tensor3_view<double>{s.v.data(), batch * 2, 0, 0}, g.view());
    CHECK(st.code() == kd::errc::empty_input);
  }
  SUBCASE("head counts and temperature") {
    loss.options.student_heads = 0;
    kd::status st = run(t.view(), s.view(), g.view());
    CHECK(st.code() == kd::errc::invalid_argument);
    CHECK(contains(st.message(), "head counts must be positive"));
    loss.options.student_heads = 2;
    for (double temp : {0.0, -1.0, std::numeric_limits<double>::infinity(), std::numeric_limits<double>::quiet_NaN()}) {
      loss.options.temperature = temp;
      st = run(t.view(), s.view(), g.view());
      CHECK(st.code() == kd::errc::invalid_argument);
      CHECK(contains(st.message(), "temperature must be > 0"));
    }
  }
  SUBCASE("head_map: wrong count, empty group, out of range") {
    kd::head_map hm{{{0, 1}}};
    loss.options.heads = &hm;
    kd::status st = run(t.view(), s.view(), g.view());
    CHECK(st.code() == kd::errc::shape_mismatch);
    CHECK(contains(st.message(), "head_map has 1 entries but the student has 2 heads"));
    CHECK(contains(st.message(), "component 'attention'"));

    hm.teacher_heads = {{0, 1}, {}};
    st = run(t.view(), s.view(), g.view());
    CHECK(st.code() == kd::errc::invalid_argument);
    CHECK(contains(st.message(), "gives student head 1 no teacher head"));

    hm.teacher_heads = {{0, 4}, {2, 3}};
    st = run(t.view(), s.view(), g.view());
    CHECK(st.code() == kd::errc::out_of_range);
    CHECK(contains(st.message(), "head_map teacher head 4 is outside [0, 4)"));

    hm.teacher_heads = {{0, 1}, {-1}};
    st = run(t.view(), s.view(), g.view());
    CHECK(st.code() == kd::errc::out_of_range);
    CHECK(contains(st.message(), "teacher head -1"));

    hm.teacher_heads = {{3}, {0}};
    CHECK(run(t.view(), s.view(), g.view()).ok());
  }
  SUBCASE("NaN / Inf names the tensor and the component") {
    const double nan = std::numeric_limits<double>::quiet_NaN(), inf = std::numeric_limits<double>::infinity();
    for (bool causal : {true, false}) {
      loss.options.causal = causal;
      t.at(5, 2, 1) = nan;  // on/below the diagonal: read in both modes
      loss.options.component = "attn_layer7";
      kd::status st = run(t.view(), s.view(), g.view());
      CHECK(st.code() == kd::errc::non_finite);
      CHECK(contains(st.message(), "NaN in teacher attention scores (map 5) at token 2, column 1"));
      CHECK(contains(st.message(), "component 'attn_layer7'"));
      t.at(5, 2, 1) = 0.0;

      s.at(3, 3, 0) = inf;
      loss.options.component = "attention";
      st = run(t.view(), s.view(), g.view());
      CHECK(st.code() == kd::errc::non_finite);
      CHECK(contains(st.message(), "Inf in student attention scores (map 3) at token 3, column 0"));
      CHECK(contains(st.message(), "component 'attention'"));
      s.at(3, 3, 0) = 0.0;
    }
  }
}
