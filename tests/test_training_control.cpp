// Early stopping, dynamic loss scaling and the finite guards (kd/train/*.hpp).
#include <doctest/doctest.h>

#include <cstdint>
#include <limits>
#include <vector>

#include <kd/kd.hpp>

#include "test_util.hpp"

namespace {

constexpr double k_nan = std::numeric_limits<double>::quiet_NaN();
constexpr double k_inf = std::numeric_limits<double>::infinity();

// Feeds values (none ramping); returns the 1-based index of the evaluation that said stop, 0 if none.
int first_stop(kd::early_stopping& es, const std::vector<double>& values) {
  for (std::size_t i = 0; i < values.size(); ++i) {
    bool stop = true;
    REQUIRE(es.update(values[i], false, stop).ok());
    if (stop) return static_cast<int>(i + 1);
  }
  return 0;
}

}  // namespace

TEST_CASE("early_stopping stops after exactly `patience` non-improving evaluations") {
  for (std::int64_t patience : {1, 3, 5}) {
    CAPTURE(patience);
    kd::early_stopping es({patience, 0.0});
    bool stop = true;
    REQUIRE(es.update(2.0, false, stop).ok());
    CHECK_FALSE(stop);
    CHECK(es.best() == 2.0);
    for (std::int64_t i = 1; i <= patience; ++i) {
      REQUIRE(es.update(2.0 + 0.1 * static_cast<double>(i), false, stop).ok());
      CHECK(es.evaluations_without_improvement() == i);
      CHECK(stop == (i == patience));
    }
    CHECK(es.should_stop());
    CHECK(es.best() == 2.0);
  }

  // An improvement resets the count.
  kd::early_stopping es({3, 0.0});
  CHECK(first_stop(es, {1.0, 1.1, 1.2, 0.9, 1.0, 1.0}) == 0);
  CHECK(es.evaluations_without_improvement() == 2);
  CHECK(es.best() == 0.9);
  bool stop = false;
  REQUIRE(es.update(0.9, false, stop).ok());  // equal is not an improvement
  CHECK(stop);

  // Default options: patience 5.
  kd::early_stopping def;
  CHECK(first_stop(def, {1.0, 1.0, 1.0, 1.0, 1.0, 1.0}) == 6);
}

TEST_CASE("early_stopping respects min_delta") {
  kd::early_stopping es({2, 0.1});
  bool stop = false;
  REQUIRE(es.update(1.0, false, stop).ok());
  REQUIRE(es.update(0.95, false, stop).ok());  // 0.05 better: not enough
  CHECK(es.evaluations_without_improvement() == 1);
  CHECK(es.best() == 1.0);
  REQUIRE(es.update(0.85, false, stop).ok());  // 0.15 better than the best: improvement
  CHECK(es.evaluations_without_improvement() == 0);
  CHECK(es.best() == 0.85);
  REQUIRE(es.update(0.80, false, stop).ok());  // 0.05 better: not enough
  CHECK_FALSE(stop);
  REQUIRE(es.update(0.76, false, stop).ok());  // 0.09 better than 0.85: still not enough
  CHECK(stop);
  CHECK(es.best() == 0.85);
}

TEST_CASE("evaluations while ramping are ignored: a rising loss during the ramp never stops the run") {
  // The seed run: 24,914 steps, evaluation every 500 steps, a curriculum ramping over the first half.
  // The validation loss rises while weight shifts towards the distillation terms; the seed counted
  // those evaluations and stopped at half the run.
  kd::objective obj;
  obj.add("kd", kd::schedule<kd::curve::linear>{0.0, 1.0, 12457});
  auto val_loss = [](std::int64_t step) {
    return step < 12457 ? 3.0 + 1e-4 * static_cast<double>(step)        // rising during the ramp
                        : 4.3 - 1e-5 * static_cast<double>(step - 12457);  // falling after it
  };

  kd::early_stopping es({5, 0.0});
  kd::early_stopping naive({5, 0.0});  // the seed's behaviour: ramp ignored
  std::int64_t stopped_at = -1, naive_stopped_at = -1;
  for (std::int64_t step = 500; step <= 24914; step += 500) {
    bool stop = false, naive_stop = false;
    REQUIRE(es.update(val_loss(step), obj.ramping(step), stop).ok());
    REQUIRE(naive.update(val_loss(step), false, naive_stop).ok());
    if (step < 12457) {
      CHECK(es.best() == k_inf);  // ramping evaluations set no best value
      CHECK(es.evaluations_without_improvement() == 0);
    }
    if (stop && stopped_at < 0) stopped_at = step;
    if (naive_stop && naive_stopped_at < 0) naive_stopped_at = step;
  }
  CHECK(stopped_at == -1);
  CHECK(naive_stopped_at == 3000);  // what ignoring the ramp would have done: 5 rises after step 500

  // After the ramp, patience counts again: a plateau stops it after exactly 5 evaluations.
  bool stop = false;
  const double best = es.best();
  for (int i = 1; i <= 5; ++i) {
    REQUIRE(es.update(best + 1.0, obj.ramping(30000), stop).ok());
    CHECK(stop == (i == 5));
  }
}

TEST_CASE("early_stopping rejects NaN/Inf values and bad options") {
  kd::early_stopping es;
  bool stop = true;
  const kd::status s1 = es.update(k_nan, false, stop);
  CHECK(s1.code() == kd::errc::non_finite);
  CHECK_FALSE(stop);
  CHECK(es.update(k_inf, false, stop).code() == kd::errc::non_finite);
  CHECK(es.update(-k_inf, true, stop).code() == kd::errc::non_finite);  // even while ramping
  CHECK(es.evaluations_without_improvement() == 0);
  CHECK(es.update(1.0, false, stop).ok());

  kd::early_stopping zero({0, 0.0});
  CHECK(zero.update(1.0, false, stop).code() == kd::errc::invalid_argument);
  kd::early_stopping neg({3, -0.1});
  CHECK(neg.update(1.0, false, stop).code() == kd::errc::invalid_argument);
  kd::early_stopping nan_delta({3, k_nan});
  CHECK(nan_delta.update(1.0, false, stop).code() == kd::errc::invalid_argument);
}

TEST_CASE("dynamic_loss_scaler: skip, back off, grow, clamp") {
  kd::dynamic_loss_scaler::options o;
  o.initial_scale = 1024.0;
  o.growth_factor = 2.0;
  o.backoff_factor = 0.5;
  o.growth_interval = 3;
  o.min_scale = 1.0;
  o.max_scale = 4096.0;
  REQUIRE(kd::dynamic_loss_scaler(o).validate().ok());

  SUBCASE("a non-finite step is skipped and backs off by backoff_factor") {
    kd::dynamic_loss_scaler s(o);
    CHECK(s.scale() == 1024.0);
    CHECK(s.inverse_scale() == 1.0 / 1024.0);
    CHECK(s.update(true));
    CHECK(s.scale() == 512.0);
    CHECK(s.skipped_steps() == 1);
    CHECK(s.update(true));
    CHECK(s.scale() == 256.0);
    CHECK(s.skipped_steps() == 2);
  }
  SUBCASE("growth after growth_interval clean steps") {
    kd::dynamic_loss_scaler s(o);
    CHECK_FALSE(s.update(false));
    CHECK_FALSE(s.update(false));
    CHECK(s.scale() == 1024.0);
    CHECK_FALSE(s.update(false));
    CHECK(s.scale() == 2048.0);
    CHECK(s.skipped_steps() == 0);
  }
  SUBCASE("a non-finite step resets the clean-step count") {
    kd::dynamic_loss_scaler s(o);
    s.update(false);
    s.update(false);
    s.update(true);  // 512
    s.update(false);
    s.update(false);
    CHECK(s.scale() == 512.0);
    s.update(false);
    CHECK(s.scale() == 1024.0);
    CHECK(s.skipped_steps() == 1);
  }
  SUBCASE("clamped to max_scale and min_scale") {
    kd::dynamic_loss_scaler s(o);
    for (int i = 0; i < 30; ++i) s.update(false);
    CHECK(s.scale() == 4096.0);
    for (int i = 0; i < 30; ++i) CHECK(s.update(true));
    CHECK(s.scale() == 1.0);
    CHECK(s.skipped_steps() == 30);
  }
  SUBCASE("non-default backoff") {
    kd::dynamic_loss_scaler::options q = o;
    q.backoff_factor = 0.25;
    kd::dynamic_loss_scaler s(q);
    s.update(true);
    CHECK(s.scale() == 256.0);
  }
  SUBCASE("driven by check_finite_values on an fp16 gradient buffer") {
    kd::dynamic_loss_scaler s(o);
    std::vector<kd::half> grad(64, kd::half(0.5f));
    auto step = [&](std::int64_t t) {
      return s.update(!kd::check_finite_values("student gradient", t, grad.data(), static_cast<std::int64_t>(grad.size())).ok());
    };
    CHECK_FALSE(step(1));
    grad[17] = kd::half::from_bits(0x7c00);  // +Inf
    CHECK(step(2));
    CHECK(s.scale() == 512.0);
    grad[17] = kd::half(0.5f);
    CHECK_FALSE(step(3));
    CHECK(s.skipped_steps() == 1);
  }
}

TEST_CASE("dynamic_loss_scaler::validate() rejects bad options") {
  CHECK(kd::dynamic_loss_scaler{}.validate().ok());
  using opt = kd::dynamic_loss_scaler::options;
  auto with = [](auto edit) {
    opt o;
    edit(o);
    return kd::dynamic_loss_scaler(o).validate();
  };
  CHECK(with([](opt& o) { o.initial_scale = 0; }).code() == kd::errc::invalid_argument);
  CHECK(with([](opt& o) { o.initial_scale = -1; }).code() == kd::errc::invalid_argument);
  CHECK(with([](opt& o) { o.initial_scale = k_nan; }).code() == kd::errc::invalid_argument);
  CHECK(with([](opt& o) { o.growth_factor = 1.0; }).code() == kd::errc::invalid_argument);
  CHECK(with([](opt& o) { o.growth_factor = 0.5; }).code() == kd::errc::invalid_argument);
  CHECK(with([](opt& o) { o.backoff_factor = 1.0; }).code() == kd::errc::invalid_argument);
  CHECK(with([](opt& o) { o.backoff_factor = 0.0; }).code() == kd::errc::invalid_argument);
  CHECK(with([](opt& o) { o.backoff_factor = k_nan; }).code() == kd::errc::invalid_argument);
  CHECK(with([](opt& o) { o.growth_interval = 0; }).code() == kd::errc::invalid_argument);
  CHECK(with([](opt& o) { o.min_scale = 0; }).code() == kd::errc::invalid_argument);
  CHECK(with([](opt& o) {
          o.min_scale = 10;
          o.max_scale = 5;
          o.initial_scale = 7;
        }).code() == kd::errc::invalid_argument);
  CHECK(with([](opt& o) { o.max_scale = k_inf; }).code() == kd::errc::invalid_argument);
  // The initial scale must lie in [min_scale, max_scale] (else "growth" would shrink it to max).
  CHECK(with([](opt& o) { o.initial_scale = 1e9; }).code() == kd::errc::invalid_argument);
  CHECK(with([](opt& o) {
          o.min_scale = 2;
          o.initial_scale = 1;
        }).code() == kd::errc::invalid_argument);
  CHECK(with([](opt& o) {
          o.initial_scale = 1;
          o.min_scale = 1;
          o.max_scale = 1;
        }).ok());
}

TEST_CASE("check_finite_loss names component and step") {
  CHECK(kd::check_finite_loss("kd", 7, 1.5).ok());
  const kd::status n = kd::check_finite_loss("kd", 7, k_nan);
  CHECK(n.code() == kd::errc::non_finite);
  CHECK(n.message() == "the 'kd' loss is NaN at step 7");
  const kd::status i = kd::check_finite_loss("feature", 12000, -k_inf);
  CHECK(i.code() == kd::errc::non_finite);
  CHECK(i.message() == "the 'feature' loss is Inf at step 12000");
}

TEST_CASE("check_finite_values names the buffer, index and step") {
  std::vector<float> f(10, 1.0f);
  CHECK(kd::check_finite_values("student gradient", 3, f.data(), 10).ok());
  CHECK(kd::check_finite_values("empty", 3, f.data(), 0).ok());
  f[4] = std::numeric_limits<float>::quiet_NaN();
  f[6] = std::numeric_limits<float>::infinity();
  const kd::status s = kd::check_finite_values("student gradient", 3, f.data(), 10);
  CHECK(s.code() == kd::errc::non_finite);
  CHECK(kdtest::contains(s.message(), "student gradient"));
  CHECK(kdtest::contains(s.message(), "NaN"));
  CHECK(kdtest::contains(s.message(), "index 4"));
  CHECK(kdtest::contains(s.message(), "step 3"));
  // The count limits the scan.
  CHECK(kd::check_finite_values("student gradient", 3, f.data(), 4).ok());

  std::vector<kd::bfloat16> b(5, kd::bfloat16(1.0f));
  b[2] = kd::bfloat16::from_bits(0xff80);  // -Inf
  const kd::status sb = kd::check_finite_values("projection gradient", 41, b.data(), 5);
  CHECK(kdtest::contains(sb.message(), "projection gradient holds Inf at index 2 at step 41"));

  // A finite double beyond float's range is finite.
  std::vector<double> d{1e300, -1e300, 1e-320};
  CHECK(kd::check_finite_values("double buffer", 1, d.data(), 3).ok());
  d[1] = k_nan;
  CHECK(kdtest::contains(kd::check_finite_values("double buffer", 1, d.data(), 3).message(), "index 1"));
}
