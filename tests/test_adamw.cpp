// AdamW over a flat arena and its learning-rate schedule (kd/train/adamw.hpp).
#include <doctest/doctest.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <sstream>
#include <vector>

#include <kd/core/rng.hpp>
#include <kd/kd.hpp>
#include <kd/train/adamw.hpp>

#include "test_util.hpp"

namespace {

std::vector<kd::adamw_segment> two_segments(std::size_t a, std::size_t b) {
  return {{"a", 0, a, true}, {"b", a, b, false}};
}

kd::adamw_options plain(double lr, double wd = 0.0) {
  kd::adamw_options o;
  o.weight_decay = wd;
  o.schedule = {.peak = lr, .floor = lr, .warmup_steps = 0, .total_steps = 0};  // constant lr
  return o;
}

// The update rule written independently in long double (torch.optim.AdamW's formula).
struct ref_adamw {
  long double p, m = 0, v = 0;
  void step(long double g, long double lr, long double wd, const kd::adamw_options& o, int t) {
    const long double b1 = o.beta1, b2 = o.beta2;
    m = b1 * m + (1 - b1) * g;
    v = b2 * v + (1 - b2) * g * g;
    const long double mhat = m / (1 - std::pow(b1, static_cast<long double>(t)));
    const long double vhat = v / (1 - std::pow(b2, static_cast<long double>(t)));
    p = p - lr * wd * p - lr * mhat / (std::sqrt(vhat) + static_cast<long double>(o.eps));
  }
};

}  // namespace

TEST_CASE("lr_schedule: warm-up end, cosine midpoint and end, floor after") {
  const kd::lr_schedule s{.peak = 1e-3, .floor = 1e-4, .warmup_steps = 10, .total_steps = 110};
  REQUIRE(s.validate().ok());
  CHECK(s.lr(0) == 0.0);
  CHECK(s.lr(5) == doctest::Approx(5e-4).epsilon(1e-12));
  CHECK(s.lr(10) == doctest::Approx(1e-3).epsilon(1e-12));     // warm-up end: the peak
  CHECK(s.lr(60) == doctest::Approx(5.5e-4).epsilon(1e-12));   // cosine midpoint: (peak + floor) / 2
  CHECK(s.lr(35) == doctest::Approx(1e-4 + 9e-4 * 0.5 * (1 + std::cos(M_PI / 4))).epsilon(1e-12));
  CHECK(s.lr(110) == doctest::Approx(1e-4).epsilon(1e-12));    // end: the floor
  CHECK(s.lr(1000) == 1e-4);
  for (std::int64_t t = 11; t <= 110; ++t) CHECK(s.lr(t) <= s.lr(t - 1));
  CHECK_FALSE(kd::lr_schedule{.peak = 0.0}.validate().ok());
  CHECK_FALSE(kd::lr_schedule{.peak = 1e-3, .floor = 2e-3}.validate().ok());
  CHECK_FALSE(kd::lr_schedule{.peak = 1e-3, .floor = 0, .warmup_steps = 20, .total_steps = 10}.validate().ok());
}

TEST_CASE("adamw: five steps match a long-double reference; decay only where the mask says") {
  kd::adamw_options o = plain(0.05, 0.1);
  std::vector<float> p = {1.0f, -2.0f};
  kd::adamw<float> opt;
  REQUIRE(opt.init(two_segments(1, 1), std::span<const float>(p), o).ok());
  ref_adamw r0{1.0L}, r1{-2.0L};
  for (int t = 1; t <= 5; ++t) {
    // f = 0.5 (p0 - 3)^2 + 2 (p1 + 1)^2
    const std::vector<float> g = {p[0] - 3.0f, 4.0f * (p[1] + 1.0f)};
    r0.step(g[0], 0.05L, 0.1L, o, t);
    r1.step(g[1], 0.05L, 0.0L, o, t);  // segment "b" does not decay
    kd::adamw_step_result res;
    REQUIRE(opt.step(std::span<float>(p), std::span<const float>(g), res).ok());
    CHECK(res.step == t);
    CHECK(res.lr == 0.05);
    CHECK(static_cast<double>(p[0]) == doctest::Approx(static_cast<double>(r0.p)).epsilon(2e-7));
    CHECK(static_cast<double>(p[1]) == doctest::Approx(static_cast<double>(r1.p)).epsilon(2e-7));
  }
}

TEST_CASE("adamw: bias correction makes the first step lr * sign(g), whatever the gradient's scale") {
  for (double scale : {1e-4, 1.0, 1e3}) {
    std::vector<float> p = {0.5f, 0.5f};
    const std::vector<float> g = {static_cast<float>(scale), static_cast<float>(-3 * scale)};
    kd::adamw<float> opt;
    REQUIRE(opt.init(two_segments(1, 1), std::span<const float>(p), plain(0.01)).ok());
    kd::adamw_step_result res;
    REQUIRE(opt.step(std::span<float>(p), std::span<const float>(g), res).ok());
    // m_hat = g, v_hat = g^2: the step is lr * g / (|g| + eps). Without correction it would be 0.1/sqrt(0.001) ~ 3.16x.
    CHECK(p[0] == doctest::Approx(0.5 - 0.01).epsilon(1e-6));
    CHECK(p[1] == doctest::Approx(0.5 + 0.01).epsilon(1e-6));
  }
}

TEST_CASE("adamw: weight decay is decoupled (multiplies p by 1 - lr wd, never enters m or v)") {
  std::vector<float> p = {2.0f, 2.0f};
  const std::vector<float> g = {0.0f, 0.0f};
  kd::adamw<float> opt;
  REQUIRE(opt.init(two_segments(1, 1), std::span<const float>(p), plain(0.1, 0.5)).ok());
  double expect = 2.0;
  for (int t = 1; t <= 4; ++t) {
    kd::adamw_step_result res;
    REQUIRE(opt.step(std::span<float>(p), std::span<const float>(g), res).ok());
    expect *= 1.0 - 0.1 * 0.5;
    CHECK(p[0] == doctest::Approx(expect).epsilon(1e-6));
    CHECK(p[1] == 2.0f);  // masked: no decay, zero gradient, untouched
    CHECK(opt.m()[0] == 0.0f);
    CHECK(opt.v()[0] == 0.0f);
  }
}

TEST_CASE("adamw: global-norm clipping scales to max_grad_norm and reports the pre-clip norm") {
  std::vector<float> p = {0.0f, 0.0f, 0.0f};
  kd::adamw_options o = plain(1e-3);
  o.max_grad_norm = 1.0;
  kd::adamw<float> opt;
  REQUIRE(opt.init({{"a", 0, 1, true}, {"b", 1, 2, true}}, std::span<const float>(p), o).ok());
  const std::vector<float> g = {3.0f, 0.0f, 4.0f};
  kd::adamw_step_result res;
  REQUIRE(opt.step(std::span<float>(p), std::span<const float>(g), res).ok());
  CHECK(res.grad_norm == doctest::Approx(5.0).epsilon(1e-12));
  CHECK(res.clip_scale == doctest::Approx(0.2).epsilon(1e-12));
  // m = (1 - beta1) * clipped g: the clipped gradient has norm max_grad_norm.
  const double c0 = opt.m()[0] / 0.1, c2 = opt.m()[2] / 0.1;
  CHECK(std::hypot(c0, c2) == doctest::Approx(1.0).epsilon(1e-6));
  CHECK(c0 == doctest::Approx(0.6).epsilon(1e-6));

  const std::vector<float> small = {0.3f, 0.0f, 0.4f};  // norm 0.5 < 1: untouched
  REQUIRE(opt.step(std::span<float>(p), std::span<const float>(small), res).ok());
  CHECK(res.grad_norm == doctest::Approx(0.5).epsilon(1e-7));
  CHECK(res.clip_scale == 1.0);
}

TEST_CASE("adamw: a NaN or Inf gradient is an error naming the tensor, and nothing is updated") {
  for (float bad : {std::numeric_limits<float>::quiet_NaN(), std::numeric_limits<float>::infinity()}) {
    std::vector<float> p = {1.0f, 2.0f, 3.0f};
    kd::adamw<float> opt;
    REQUIRE(opt.init({{"embed", 0, 2, true}, {"norm", 2, 1, false}}, std::span<const float>(p), plain(0.1)).ok());
    const std::vector<float> g = {0.5f, 0.5f, bad};
    kd::adamw_step_result res;
    const kd::status s = opt.step(std::span<float>(p), std::span<const float>(g), res);
    CHECK(s.code() == kd::errc::non_finite);
    CHECK(kdtest::contains(s.message(), "'norm'"));
    CHECK(p == std::vector<float>{1.0f, 2.0f, 3.0f});
    CHECK(opt.steps_taken() == 0);
    CHECK(opt.m()[0] == 0.0f);
  }
}

TEST_CASE("adamw: validation errors are statuses") {
  std::vector<float> p(4, 0.0f);
  kd::adamw<float> opt;
  CHECK(opt.init({{"x", 2, 3, true}}, std::span<const float>(p), plain(0.1)).code() == kd::errc::out_of_range);
  CHECK(opt.init({{"x", 0, 3, true}, {"y", 2, 2, true}}, std::span<const float>(p), plain(0.1)).code() ==
        kd::errc::invalid_argument);
  kd::adamw_options o = plain(0.1);
  o.beta1 = 1.0;
  CHECK(opt.init({{"x", 0, 4, true}}, std::span<const float>(p), o).code() == kd::errc::invalid_argument);
  o = plain(0.1);
  o.weight_decay = -1;
  CHECK_FALSE(opt.init({{"x", 0, 4, true}}, std::span<const float>(p), o).ok());
  o = plain(0.1);
  o.max_grad_norm = std::numeric_limits<double>::quiet_NaN();
  CHECK_FALSE(opt.init({{"x", 0, 4, true}}, std::span<const float>(p), o).ok());
  REQUIRE(opt.init({{"x", 0, 4, true}}, std::span<const float>(p), plain(0.1)).ok());
  const std::vector<float> g(3, 0.0f);
  kd::adamw_step_result res;
  CHECK(opt.step(std::span<float>(p), std::span<const float>(g), res).code() == kd::errc::shape_mismatch);
}

TEST_CASE("adamw: model_segments follow the parameter table and the decay policy") {
  const kd::model::parameter_table t(kd::model::make_arch(kd::model::tiny_student()));
  const auto segs = kd::model_segments(t);
  REQUIRE(segs.size() == t.entries().size());
  for (const auto& s : segs) {
    const bool norm = t.find(s.name)->kind == kd::model::param_kind::norm;
    const bool embed = s.name == "model.embed_tokens.weight";
    CHECK(s.decay == !(norm || embed));
  }
  const auto with_embed = kd::model_segments(t, {.norms = false, .biases = false, .embeddings = true});
  CHECK(with_embed[0].decay);
  std::vector<float> p(t.size(), 0.0f);
  kd::adamw<float> opt;
  CHECK(opt.init(segs, std::span<const float>(p), plain(0.1)).ok());
}

namespace {

// Deterministic pseudo-gradients depending on the parameters: a quadratic pull plus step noise.
template <class T>
std::vector<float> grads_at(const std::vector<T>& p, std::int64_t step) {
  kd::rng r(static_cast<std::uint64_t>(step) * 977);
  std::vector<float> g(p.size());
  for (std::size_t i = 0; i < p.size(); ++i)
    g[i] = static_cast<float>(kd::load_as<double>(p[i]) - 0.3 + 0.5 * r.normal());
  return g;
}

template <class T>
void run_steps(kd::adamw<T>& opt, std::vector<T>& p, std::int64_t from, std::int64_t to) {
  for (std::int64_t s = from; s < to; ++s) {
    const auto g = grads_at(p, s);
    kd::adamw_step_result res;
    REQUIRE(opt.step(std::span<T>(p), std::span<const float>(g), res).ok());
  }
}

template <class T>
void check_resume() {
  kd::rng r(5);
  std::vector<T> init(37);
  for (auto& x : init) x = kd::store_as<T>(r.normal());
  kd::adamw_options o;
  o.max_grad_norm = 2.0;
  o.schedule = {.peak = 3e-2, .floor = 1e-3, .warmup_steps = 2, .total_steps = 8};
  const std::vector<kd::adamw_segment> segs = {{"w", 0, 30, true}, {"n", 32, 5, false}};  // 30, 31: padding

  std::vector<T> straight = init;
  kd::adamw<T> a;
  REQUIRE(a.init(segs, std::span<const T>(straight), o).ok());
  run_steps(a, straight, 0, 8);

  std::vector<T> first = init;
  kd::adamw<T> b;
  REQUIRE(b.init(segs, std::span<const T>(first), o).ok());
  run_steps(b, first, 0, 4);
  std::stringstream state;
  REQUIRE(b.save(state).ok());

  std::vector<T> resumed = first;  // the parameter checkpoint
  kd::adamw<T> c;
  REQUIRE(c.init(segs, std::span<const T>(resumed), o).ok());
  REQUIRE(c.load(state).ok());
  CHECK(c.steps_taken() == 4);
  run_steps(c, resumed, 4, 8);
  CHECK(std::memcmp(resumed.data(), straight.data(), straight.size() * sizeof(T)) == 0);
  CHECK(std::memcmp(c.m().data(), a.m().data(), a.m().size() * sizeof(float)) == 0);
  CHECK(std::memcmp(c.master().data(), a.master().data(), a.master().size() * sizeof(float)) == 0);

  std::stringstream truncated(state.str().substr(0, 40));
  CHECK(c.load(truncated).code() == kd::errc::io_error);
  kd::adamw<T> other;
  std::vector<T> bigger(40);
  REQUIRE(other.init({{"w", 0, 40, true}}, std::span<const T>(bigger), o).ok());
  std::stringstream again;
  REQUIRE(a.save(again).ok());
  CHECK(other.load(again).code() == kd::errc::shape_mismatch);
}

}  // namespace

TEST_CASE("adamw: save and restore continue bit-identically (float and bf16 storage)") {
  check_resume<float>();
  check_resume<kd::bfloat16>();
}

TEST_CASE("adamw: bf16 storage keeps an fp32 master equal to the float run; updates below a bf16 ulp accumulate") {
  std::vector<float> pf(8, 1.0f);
  std::vector<kd::bfloat16> pb(8, kd::bfloat16(1.0f));
  kd::adamw<float> of;
  kd::adamw<kd::bfloat16> ob;
  const kd::adamw_options o = plain(1e-4);  // 1e-4 per step, bf16 spacing at 1 is 2^-7
  REQUIRE(of.init({{"x", 0, 8, true}}, std::span<const float>(pf), o).ok());
  REQUIRE(ob.init({{"x", 0, 8, true}}, std::span<const kd::bfloat16>(pb), o).ok());
  CHECK(of.master().empty());
  REQUIRE(ob.master().size() == 8);
  const std::vector<float> g(8, 1.0f);
  for (int t = 1; t <= 100; ++t) {
    kd::adamw_step_result res;
    REQUIRE(of.step(std::span<float>(pf), std::span<const float>(g), res).ok());
    REQUIRE(ob.step(std::span<kd::bfloat16>(pb), std::span<const float>(g), res).ok());
    if (t == 10) CHECK(static_cast<float>(pb[0]) == 1.0f);  // 0.999 rounds back to 1 in bf16
  }
  CHECK(std::memcmp(ob.master().data(), pf.data(), pf.size() * sizeof(float)) == 0);  // same fp32 math
  CHECK(pf[0] == doctest::Approx(0.99).epsilon(1e-5));
  CHECK(static_cast<float>(pb[0]) == static_cast<float>(kd::bfloat16(pf[0])));
  CHECK(static_cast<float>(pb[0]) < 1.0f);  // without a master copy every step would round back to 1
}

namespace {

// One optimizer step on a linear model logits = X W^T from `parts` micro-batches whose gradients add
// into one arena: CE + logit KD (accumulate_grad) with global_tokens over all micro-batches (or not).
std::vector<float> accumulated_update(int parts, bool global, std::vector<float>* grad_out = nullptr) {
  constexpr int N = 24, D = 5, V = 7;
  kd::rng r(11);
  std::vector<float> X(N * D), W(V * D), teacher(N * V);
  for (auto& x : X) x = static_cast<float>(r.normal());
  for (auto& w : W) w = static_cast<float>(0.3 * r.normal());
  for (auto& t : teacher) t = static_cast<float>(2.0 * r.normal());
  std::vector<std::int32_t> labels(N);
  for (int i = 0; i < N; ++i) labels[i] = i % 5 == 1 || i < 4 ? -100 : static_cast<std::int32_t>(r.below(V));

  kd::adamw<float> opt;
  kd::adamw_options o = plain(1e-2, 0.1);
  REQUIRE(opt.init({{"W", 0, W.size(), true}}, std::span<const float>(W), o).ok());
  kd::cross_entropy<kd::token_mean, kd::fp32> ce;
  kd::logit_kd<kd::forward_kl, kd::token_mean> kl;
  kl.options.temperature = 2.0;
  kl.options.grad_scale = 0.5;
  for (auto* opts : {static_cast<kd::token_options*>(&ce.options), static_cast<kd::token_options*>(&kl.options)}) {
    opts->accumulate_grad = true;
    opts->global_tokens = global ? kd::count_tokens(labels) : 0;
  }
  for (int step = 0; step < 3; ++step) {
    std::vector<double> gW(W.size(), 0.0);
    const int rows = N / parts;
    for (int part = 0; part < parts; ++part) {
      std::vector<float> logits(rows * V, 0.0f), dlogits(rows * V, 0.0f);
      for (int i = 0; i < rows; ++i)
        for (int v = 0; v < V; ++v)
          for (int d = 0; d < D; ++d) logits[i * V + v] += X[(part * rows + i) * D + d] * W[v * D + d];
      const std::span<const std::int32_t> lab(labels.data() + part * rows, rows);
      kd::cross_entropy_result cr;
      kd::loss_result kr;
      REQUIRE(ce(kd::cpu, kd::matrix_view<const float>(logits.data(), rows, V), lab, cr,
                 kd::matrix_view<float>(dlogits.data(), rows, V)).ok());
      REQUIRE(kl(kd::cpu, kd::matrix_view<const float>(teacher.data() + part * rows * V, rows, V),
                 kd::matrix_view<const float>(logits.data(), rows, V), lab, kr,
                 kd::matrix_view<float>(dlogits.data(), rows, V)).ok());
      for (int i = 0; i < rows; ++i)
        for (int v = 0; v < V; ++v)
          for (int d = 0; d < D; ++d) gW[v * D + d] += double{dlogits[i * V + v]} * X[(part * rows + i) * D + d];
    }
    const std::vector<float> g(gW.begin(), gW.end());
    if (grad_out != nullptr && step == 0) *grad_out = g;
    kd::adamw_step_result res;
    REQUIRE(opt.step(std::span<float>(W), std::span<const float>(g), res).ok());
  }
  return W;
}

}  // namespace

TEST_CASE("adamw: gradient accumulation with global_tokens gives the same update for 1, 2, 4 micro-batches") {
  std::vector<float> g1, g2, g4, g4_local;
  const auto w1 = accumulated_update(1, true, &g1);
  const auto w2 = accumulated_update(2, true, &g2);
  const auto w4 = accumulated_update(4, true, &g4);
  CHECK(kdtest::rel_error(std::span<const float>(g2), std::span<const float>(g1)) < 1e-6);
  CHECK(kdtest::rel_error(std::span<const float>(g4), std::span<const float>(g1)) < 1e-6);
  for (std::size_t i = 0; i < w1.size(); ++i) {
    CHECK(w2[i] == doctest::Approx(w1[i]).epsilon(1e-5));
    CHECK(w4[i] == doctest::Approx(w1[i]).epsilon(1e-5));
  }
  // Control: each micro-batch dividing by its own token count changes the gradient (uneven ignored labels).
  accumulated_update(4, false, &g4_local);
  CHECK(kdtest::rel_error(std::span<const float>(g4_local), std::span<const float>(g1)) > 1e-2);
}
