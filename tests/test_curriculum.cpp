// Curriculum curves and schedules (kd/policy/curriculum.hpp).
#include <doctest/doctest.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <numbers>
#include <set>
#include <vector>

#include <kd/kd.hpp>

#include "test_util.hpp"

namespace {

// Every curve checked on a fine grid: in [0, 1], non-decreasing, 1 at p = 1.
template <class C>
void check_curve_monotone(double at_zero) {
  CAPTURE(C::name);
  constexpr int n = 10000;
  double prev = C::shape(0.0);
  CHECK(prev == doctest::Approx(at_zero));
  for (int i = 1; i <= n; ++i) {
    const double p = static_cast<double>(i) / n;
    const double v = C::shape(p);
    REQUIRE(v >= prev);
    REQUIRE(v >= 0.0);
    REQUIRE(v <= 1.0);
    prev = v;
  }
  CHECK(prev == doctest::Approx(1.0));
}

// A schedule from `start` to `end` is monotone over steps in the direction of the ramp (no warm-up).
template <class C>
void check_schedule_monotone(double start, double end) {
  CAPTURE(C::name);
  const kd::schedule<C> s{start, end, 1000, 0, 50};
  double prev = s(0);
  for (std::int64_t t = 1; t <= 1200; ++t) {
    const double v = s(t);
    if (end >= start)
      REQUIRE(v >= prev);
    else
      REQUIRE(v <= prev);
    prev = v;
  }
  CHECK(s(1200) == end);
}

}  // namespace

TEST_CASE("curve shapes at 0, 0.25, 0.5 and 1 follow the documented formulas") {
  using namespace kd::curve;
  const double ps[] = {0.0, 0.25, 0.5, 1.0};

  SUBCASE("constant is 1 everywhere") {
    for (double p : ps) CHECK(constant::shape(p) == 1.0);
  }
  SUBCASE("linear is p (exactly 0.5 at 50%; the seed's curve gave 6.7%)") {
    for (double p : ps) CHECK(linear::shape(p) == p);
    static_assert(linear::shape(0.5) == 0.5);
  }
  SUBCASE("cosine is (1 - cos(pi p)) / 2") {
    CHECK(cosine::shape(0.0) == doctest::Approx(0.0));
    CHECK(cosine::shape(0.25) == doctest::Approx((1.0 - std::numbers::sqrt2 / 2.0) / 2.0));
    CHECK(cosine::shape(0.5) == doctest::Approx(0.5));
    CHECK(cosine::shape(1.0) == doctest::Approx(1.0));
  }
  SUBCASE("quadratic is p^2") {
    CHECK(quadratic::shape(0.0) == 0.0);
    CHECK(quadratic::shape(0.25) == 0.0625);
    CHECK(quadratic::shape(0.5) == 0.25);
    CHECK(quadratic::shape(1.0) == 1.0);
  }
  SUBCASE("exponential is (e^{rp} - 1) / (e^r - 1)") {
    for (double p : ps) {
      CAPTURE(p);
      CHECK(exponential<5.0>::shape(p) == doctest::Approx((std::exp(5.0 * p) - 1.0) / (std::exp(5.0) - 1.0)));
      CHECK(exponential<1.0>::shape(p) == doctest::Approx((std::exp(p) - 1.0) / (std::exp(1.0) - 1.0)));
    }
    CHECK(exponential<>::rate == 5.0);
    CHECK(exponential<5.0>::shape(0.5) == doctest::Approx(1.0 / (std::exp(2.5) + 1.0)));
  }
  SUBCASE("step has N equal stairs") {
    CHECK(step<4>::shape(0.0) == 0.0);
    CHECK(step<4>::shape(0.25) == 0.25);
    CHECK(step<4>::shape(0.5) == 0.5);
    CHECK(step<4>::shape(1.0) == 1.0);
    CHECK(step<4>::shape(0.2499) == 0.0);
    CHECK(step<4>::shape(0.9999) == 0.75);
    CHECK(step<1>::shape(0.9999) == 0.0);
    CHECK(step<1>::shape(1.0) == 1.0);
    CHECK(step<>::stairs == 4);
  }
}

TEST_CASE("every curve is monotone on a fine grid") {
  check_curve_monotone<kd::curve::constant>(1.0);
  check_curve_monotone<kd::curve::linear>(0.0);
  check_curve_monotone<kd::curve::cosine>(0.0);
  check_curve_monotone<kd::curve::quadratic>(0.0);
  check_curve_monotone<kd::curve::exponential<>>(0.0);
  check_curve_monotone<kd::curve::exponential<0.5>>(0.0);
  check_curve_monotone<kd::curve::exponential<20.0>>(0.0);
  check_curve_monotone<kd::curve::step<>>(0.0);
  check_curve_monotone<kd::curve::step<7>>(0.0);

  check_schedule_monotone<kd::curve::linear>(0.0, 2.0);
  check_schedule_monotone<kd::curve::cosine>(4.0, 1.0);  // a falling temperature
  check_schedule_monotone<kd::curve::quadratic>(0.1, 0.9);
  check_schedule_monotone<kd::curve::exponential<>>(1.0, 0.0);
  check_schedule_monotone<kd::curve::step<5>>(0.0, 1.0);
  check_schedule_monotone<kd::curve::constant>(0.0, 1.0);
}

TEST_CASE("linear schedule gives exactly half the way at 50% of the ramp") {
  // The seed's curriculum curve gave 6.7% of the target at half the ramp.
  const kd::schedule<kd::curve::linear> s{0.0, 1.0, 1000};
  CHECK(s(500) == 0.5);
  CHECK(s(250) == 0.25);
  CHECK(s(0) == 0.0);
  CHECK(s(1000) == 1.0);
  CHECK(s.progress(500) == 0.5);

  const kd::schedule<kd::curve::linear> down{2.0, 1.0, 100};
  CHECK(down(50) == 1.5);
}

TEST_CASE("warm-up, hold, ramp, then end") {
  // Timeline: warm-up [0, 10), hold [10, 30), ramp [30, 130), then end.
  const kd::schedule<kd::curve::linear> s{0.2, 1.0, 100, 10, 20};
  REQUIRE(s.validate().ok());

  SUBCASE("warm-up rises linearly from 0 to start") {
    CHECK(s(0) == 0.0);
    for (std::int64_t t = 0; t < 10; ++t) CHECK(s(t) == doctest::Approx(0.2 * static_cast<double>(t) / 10.0));
    for (std::int64_t t = 1; t < 10; ++t) CHECK(s(t) - s(t - 1) == doctest::Approx(0.02));
    CHECK(s(10) == 0.2);
  }
  SUBCASE("hold holds start") {
    for (std::int64_t t = 10; t < 30; ++t) CHECK(s(t) == 0.2);
  }
  SUBCASE("the ramp follows the curve from start to end") {
    CHECK(s(30) == doctest::Approx(0.2));
    CHECK(s(55) == doctest::Approx(0.2 + 0.8 * 0.25));
    CHECK(s(80) == doctest::Approx(0.6));
    CHECK(s(129) == doctest::Approx(0.2 + 0.8 * 0.99));
    CHECK(s.progress(30) == 0.0);
    CHECK(s.progress(80) == 0.5);
    CHECK(s.progress(130) == 1.0);
  }
  SUBCASE("after the ramp the value is end") {
    for (std::int64_t t : {130, 131, 1000, 1000000}) CHECK(s(t) == 1.0);
  }
  SUBCASE("ramping() is true exactly during warm-up + hold + ramp") {
    for (std::int64_t t = 0; t < 130; ++t) REQUIRE(s.ramping(t));
    for (std::int64_t t = 130; t < 400; ++t) REQUIRE_FALSE(s.ramping(t));
  }
  SUBCASE("steps before 0 give 0, never a negative weight") {
    CHECK(s(-5) == 0.0);
  }
}

TEST_CASE("ramp_steps = 0 jumps to end after the hold") {
  const kd::schedule<kd::curve::cosine> s{0.5, 2.0, 0, 0, 40};
  CHECK(s(0) == 0.5);
  CHECK(s(39) == 0.5);
  CHECK(s(40) == 2.0);
  CHECK(s.ramping(39));
  CHECK_FALSE(s.ramping(40));
}

TEST_CASE("constant curve: fixed values never ramp; a delayed switch ramps until it switches") {
  const auto f = kd::fixed(0.3);
  for (std::int64_t t : {0, 1, 100, 100000}) {
    CHECK(f(t) == 0.3);
    CHECK_FALSE(f.ramping(t));
  }
  // "turn the component on at step 100": the value changes at step 100, so early stopping must wait.
  const kd::schedule<kd::curve::constant> on{0.0, 1.0, 0, 0, 100};
  CHECK(on(99) == 0.0);
  CHECK(on(100) == 1.0);
  CHECK(on.ramping(0));
  CHECK(on.ramping(99));
  CHECK_FALSE(on.ramping(100));
  // With start == end the hold changes nothing: not ramping.
  const kd::schedule<kd::curve::constant> flat{1.0, 1.0, 0, 0, 100};
  CHECK_FALSE(flat.ramping(0));
  // A warm-up ramps, then the constant jumps to end at the first ramp step.
  const kd::schedule<kd::curve::constant> warm{1.0, 1.0, 50, 10, 0};
  CHECK(warm(5) == 0.5);
  CHECK(warm.ramping(9));
  CHECK(warm(10) == 1.0);
  CHECK_FALSE(warm.ramping(10));
}

TEST_CASE("step curve produces stairs over a schedule") {
  const kd::schedule<kd::curve::step<4>> s{0.0, 1.0, 100};
  std::set<double> seen;
  for (std::int64_t t = 0; t < 100; ++t) {
    const double expected = static_cast<double>(t / 25) * 0.25;
    CAPTURE(t);
    REQUIRE(s(t) == expected);
    seen.insert(s(t));
  }
  CHECK(seen == std::set<double>{0.0, 0.25, 0.5, 0.75});
  CHECK(s(100) == 1.0);

  const kd::schedule<kd::curve::step<3>> s3{0.0, 3.0, 30};
  CHECK(s3(5) == doctest::Approx(0.0));
  CHECK(s3(15) == doctest::Approx(1.0));
  CHECK(s3(25) == doctest::Approx(2.0));
  CHECK(s3(30) == doctest::Approx(3.0));
}

TEST_CASE("any_schedule matches the typed schedule") {
  const kd::schedule<kd::curve::cosine> c{1.0, 0.0, 200, 20, 30};
  const kd::schedule<kd::curve::exponential<3.0>> e{0.0, 5.0, 100, 0, 10};
  const kd::schedule<kd::curve::step<5>> st{0.0, 1.0, 50};
  const kd::any_schedule ac = c, ae = e, as = st;
  for (std::int64_t t = 0; t <= 300; ++t) {
    CAPTURE(t);
    REQUIRE(ac(t) == c(t));
    REQUIRE(ae(t) == e(t));
    REQUIRE(as(t) == st(t));
    REQUIRE(ac.ramping(t) == c.ramping(t));
    REQUIRE(ae.ramping(t) == e.ramping(t));
    REQUIRE(as.ramping(t) == st.ramping(t));
  }
  CHECK(ac.curve_name() == "cosine");
  CHECK(ae.curve_name() == "exponential");
  CHECK(as.curve_name() == "step");
  CHECK(ac.validate().ok());

  const kd::any_schedule def;  // weight 1, constant
  CHECK(def(0) == 1.0);
  CHECK(def(12345) == 1.0);
  CHECK_FALSE(def.ramping(0));
  CHECK(def.curve_name() == "constant");
}

TEST_CASE("validate() rejects negative step counts and non-finite values") {
  using lin = kd::schedule<kd::curve::linear>;
  CHECK(lin{0.0, 1.0, 10, 0, 0}.validate().ok());
  CHECK(lin{0.0, 1.0, 0, 0, 0}.validate().ok());

  const double nan = std::numeric_limits<double>::quiet_NaN();
  const double inf = std::numeric_limits<double>::infinity();
  for (const lin& bad : {lin{0.0, 1.0, -1, 0, 0}, lin{0.0, 1.0, 10, -1, 0}, lin{0.0, 1.0, 10, 0, -1}, lin{nan, 1.0, 10},
                         lin{0.0, nan, 10}, lin{inf, 1.0, 10}, lin{0.0, -inf, 10}}) {
    const kd::status st = bad.validate();
    CHECK_FALSE(st.ok());
    CHECK(st.code() == kd::errc::invalid_argument);
    CHECK_FALSE(st.message().empty());
    // The type-erased schedule carries the same verdict.
    CHECK(kd::any_schedule(bad).validate().code() == kd::errc::invalid_argument);
  }
  CHECK(kdtest::contains(lin{0.0, 1.0, -1}.validate().message(), ">= 0"));
  CHECK(kdtest::contains(lin{nan, 1.0, 1}.validate().message(), "finite"));
}

TEST_CASE("validate_temperature rejects 0, negative temperatures and warm-up") {
  using tsched = kd::schedule<kd::curve::cosine>;
  CHECK(kd::validate_temperature(tsched{4.0, 1.0, 1000}).ok());
  CHECK(kd::validate_temperature(tsched{2.0, 2.0, 0, 0, 100}).ok());
  CHECK(kd::validate_temperature(kd::fixed(1.0)).ok());

  for (const tsched& bad : {tsched{0.0, 1.0, 10}, tsched{1.0, 0.0, 10}, tsched{-1.0, 1.0, 10}, tsched{1.0, -2.0, 10}}) {
    const kd::status st = kd::validate_temperature(bad);
    CHECK(st.code() == kd::errc::invalid_argument);
    CHECK(kdtest::contains(st.message(), "temperature"));
  }
  CHECK(kd::validate_temperature(kd::fixed(0.0)).code() == kd::errc::invalid_argument);

  // Warm-up would start the temperature at 0.
  const kd::status w = kd::validate_temperature(tsched{2.0, 1.0, 100, 5, 0});
  CHECK(w.code() == kd::errc::invalid_argument);
  CHECK(kdtest::contains(w.message(), "warm up"));

  // Structural problems are reported too.
  CHECK(kd::validate_temperature(tsched{std::numeric_limits<double>::quiet_NaN(), 1.0, 10}).code() ==
        kd::errc::invalid_argument);
  CHECK(kd::validate_temperature(tsched{2.0, 1.0, -10}).code() == kd::errc::invalid_argument);
}
