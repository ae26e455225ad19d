// The combined distillation objective (kd/train/objective.hpp).
#include <doctest/doctest.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

#include <kd/kd.hpp>

#include "test_util.hpp"

namespace {

using values_t = std::vector<std::pair<std::string, double>>;

// lm fixed at 1, kd ramping linearly 0 -> 1 over 100 steps, feature fixed at 0.5, attention stepping
// 0 -> 0.2 over [50, 150), temperature falling 4 -> 1 along a cosine over 200 steps.
kd::objective make_objective() {
  kd::objective obj;
  obj.add("kd", kd::schedule<kd::curve::linear>{0.0, 1.0, 100})
      .add("feature", kd::fixed(0.5))
      .add("attention", kd::schedule<kd::curve::step<2>>{0.0, 0.2, 100, 0, 50})
      .temperature(kd::schedule<kd::curve::cosine>{4.0, 1.0, 200});
  return obj;
}

}  // namespace

TEST_CASE("components and their schedules") {
  const kd::objective obj = make_objective();
  REQUIRE(obj.validate().ok());
  CHECK(obj.names() == std::vector<std::string>{"lm", "kd", "feature", "attention"});
  CHECK(obj.has("lm"));
  CHECK(obj.has("attention"));
  CHECK_FALSE(obj.has("router_z"));

  SUBCASE("weight(name, step) follows the schedules") {
    for (std::int64_t t : {0, 50, 100, 1000}) CHECK(obj.weight("lm", t) == 1.0);
    CHECK(obj.weight("kd", 0) == 0.0);
    CHECK(obj.weight("kd", 25) == 0.25);
    CHECK(obj.weight("kd", 50) == 0.5);
    CHECK(obj.weight("kd", 100) == 1.0);
    CHECK(obj.weight("kd", 5000) == 1.0);
    CHECK(obj.weight("feature", 0) == 0.5);
    CHECK(obj.weight("feature", 99999) == 0.5);
    CHECK(obj.weight("attention", 49) == 0.0);
    CHECK(obj.weight("attention", 99) == 0.0);
    CHECK(obj.weight("attention", 100) == doctest::Approx(0.1));
    CHECK(obj.weight("attention", 150) == doctest::Approx(0.2));
    CHECK(obj.weight("router_z", 10) == 0.0);  // unknown component: weight 0
  }
  SUBCASE("the temperature follows its schedule") {
    CHECK(obj.temperature_at(0) == 4.0);
    CHECK(obj.temperature_at(100) == doctest::Approx(2.5));
    CHECK(obj.temperature_at(200) == 1.0);
    CHECK(obj.temperature_at(1000) == 1.0);
  }
  SUBCASE("add() with an existing name replaces its schedule") {
    kd::objective o = make_objective();
    o.add("kd", kd::fixed(3.0));
    CHECK(o.weight("kd", 0) == 3.0);
    CHECK(o.names().size() == 4);
    o.add("lm", kd::fixed(0.0));  // the LM weight may be 0, the component stays
    CHECK(o.has("lm"));
    CHECK(o.weight("lm", 0) == 0.0);
  }
}

TEST_CASE("combine(): total = sum of weight * value") {
  const kd::objective obj = make_objective();
  const values_t v{{"lm", 2.0}, {"kd", 3.0}, {"feature", 4.0}, {"attention", 10.0}};
  kd::objective_evaluation ev;
  REQUIRE(obj.combine(50, v, ev).ok());
  CHECK(ev.step == 50);
  // 1 * 2 + 0.5 * 3 + 0.5 * 4 + 0 * 10
  CHECK(ev.total == doctest::Approx(5.5));
  CHECK(ev.temperature == doctest::Approx(4.0 - 3.0 * (1.0 - std::cos(3.141592653589793 * 0.25)) / 2.0));
  REQUIRE(ev.terms.size() == 4);
  REQUIRE(ev.find("kd") != nullptr);
  CHECK(ev.find("kd")->value == 3.0);
  CHECK(ev.find("kd")->weight == 0.5);
  CHECK(ev.find("kd")->weighted() == 1.5);
  CHECK(ev.find("attention")->weighted() == 0.0);
  CHECK(ev.find("nope") == nullptr);
  double sum = 0.0;
  for (const auto& t : ev.terms) sum += t.weight * t.value;
  CHECK(ev.total == doctest::Approx(sum));

  // Order of the given values does not matter.
  kd::objective_evaluation ev2;
  REQUIRE(obj.combine(150, {{"attention", 10.0}, {"feature", 4.0}, {"kd", 3.0}, {"lm", 2.0}}, ev2).ok());
  CHECK(ev2.total == doctest::Approx(2.0 + 3.0 + 2.0 + 2.0));
  CHECK(ev2.temperature == doctest::Approx(1.0 + 3.0 * (1.0 - (1.0 - std::cos(3.141592653589793 * 0.75)) / 2.0)));
}

TEST_CASE("combine(): missing, unknown or repeated components are errors") {
  const kd::objective obj = make_objective();
  kd::objective_evaluation ev;
  ev.total = -42.0;

  const kd::status missing = obj.combine(3, {{"lm", 1.0}, {"kd", 1.0}, {"attention", 1.0}}, ev);
  CHECK(missing.code() == kd::errc::invalid_argument);
  CHECK(kdtest::contains(missing.message(), "'feature'"));
  CHECK(kdtest::contains(missing.message(), "step 3"));

  const kd::status unknown =
      obj.combine(3, {{"lm", 1.0}, {"kd", 1.0}, {"feature", 1.0}, {"attention", 1.0}, {"router_z", 1.0}}, ev);
  CHECK(unknown.code() == kd::errc::invalid_argument);
  CHECK(kdtest::contains(unknown.message(), "'router_z'"));

  const kd::status twice =
      obj.combine(3, {{"lm", 1.0}, {"kd", 1.0}, {"feature", 1.0}, {"attention", 1.0}, {"kd", 5.0}}, ev);
  CHECK(twice.code() == kd::errc::invalid_argument);
  CHECK(kdtest::contains(twice.message(), "'kd'"));

  CHECK(ev.total == -42.0);  // a failed combine leaves the output untouched
}

TEST_CASE("combine(): NaN in 'kd' at step 7 names the component and the step") {
  const kd::objective obj = make_objective();
  kd::objective_evaluation ev;
  const double nan = std::numeric_limits<double>::quiet_NaN();
  const kd::status st = obj.combine(7, {{"lm", 2.0}, {"kd", nan}, {"feature", 1.0}, {"attention", 1.0}}, ev);
  CHECK(st.code() == kd::errc::non_finite);
  CHECK(kdtest::contains(st.message(), "'kd'"));
  CHECK(kdtest::contains(st.message(), "step 7"));
  CHECK(kdtest::contains(st.message(), "NaN"));

  // Even a component whose weight is 0 at this step must be finite (attention is 0 until step 100).
  const kd::status inf = obj.combine(
      9, {{"lm", 2.0}, {"kd", 1.0}, {"feature", 1.0}, {"attention", std::numeric_limits<double>::infinity()}}, ev);
  CHECK(inf.code() == kd::errc::non_finite);
  CHECK(kdtest::contains(inf.message(), "'attention'"));
  CHECK(kdtest::contains(inf.message(), "step 9"));
  CHECK(kdtest::contains(inf.message(), "Inf"));

  // Finite values whose weighted sum overflows: the total is named.
  const kd::status total = obj.combine(
      200, {{"lm", 1e308}, {"kd", 1e308}, {"feature", 1.0}, {"attention", 1.0}}, ev);
  CHECK(total.code() == kd::errc::non_finite);
  CHECK(kdtest::contains(total.message(), "'total'"));
}

TEST_CASE("lm is always present") {
  const kd::objective obj;  // no components added
  CHECK(obj.names() == std::vector<std::string>{"lm"});
  CHECK(obj.has("lm"));
  CHECK(obj.weight("lm", 0) == 1.0);
  CHECK(obj.validate().ok());

  kd::objective_evaluation ev;
  const kd::status st = obj.combine(1, {}, ev);
  CHECK(st.code() == kd::errc::invalid_argument);
  CHECK(kdtest::contains(st.message(), "'lm'"));

  const kd::status only_kd = obj.combine(1, {{"kd", 1.0}}, ev);
  CHECK_FALSE(only_kd.ok());
  CHECK(kdtest::contains(only_kd.message(), "'lm'"));

  REQUIRE(obj.combine(1, {{"lm", 3.25}}, ev).ok());
  CHECK(ev.total == 3.25);
  CHECK(ev.temperature == 1.0);

  // A custom LM weight schedule in the constructor.
  const kd::objective ramped(kd::schedule<kd::curve::linear>{1.0, 0.5, 10});
  CHECK(ramped.weight("lm", 5) == 0.75);
  CHECK(ramped.names() == std::vector<std::string>{"lm"});
}

TEST_CASE("ramping() reflects component and temperature schedules") {
  SUBCASE("fixed weights and temperature never ramp") {
    kd::objective obj;
    obj.add("kd", kd::fixed(1.0)).add("feature", kd::fixed(0.1));
    for (std::int64_t t : {0, 1, 100, 100000}) CHECK_FALSE(obj.ramping(t));
  }
  SUBCASE("a component ramp") {
    kd::objective obj;
    obj.add("kd", kd::schedule<kd::curve::linear>{0.0, 1.0, 100, 0, 20});
    CHECK(obj.ramping(0));
    CHECK(obj.ramping(119));
    CHECK_FALSE(obj.ramping(120));
  }
  SUBCASE("a temperature ramp outlasting the components") {
    const kd::objective obj = make_objective();
    CHECK(obj.ramping(0));
    CHECK(obj.ramping(150));  // components done (kd at 100, attention at 150), temperature still moving
    CHECK(obj.ramping(199));
    CHECK_FALSE(obj.ramping(200));
  }
  SUBCASE("the LM weight's own schedule counts") {
    const kd::objective obj(kd::schedule<kd::curve::cosine>{1.0, 0.5, 30});
    CHECK(obj.ramping(29));
    CHECK_FALSE(obj.ramping(30));
  }
}

TEST_CASE("the temperature schedule must stay > 0") {
  for (const auto& bad : {kd::schedule<kd::curve::linear>{1.0, 0.0, 10}, kd::schedule<kd::curve::linear>{-1.0, 2.0, 10},
                          kd::schedule<kd::curve::linear>{0.0, 0.0, 0}}) {
    kd::objective obj;
    obj.temperature(bad);
    const kd::status v = obj.validate();
    CHECK(v.code() == kd::errc::invalid_argument);
    CHECK(kdtest::contains(v.message(), "temperature"));
    // An invalid objective refuses to combine.
    kd::objective_evaluation ev;
    CHECK(obj.combine(0, {{"lm", 1.0}}, ev).code() == kd::errc::invalid_argument);
  }
  kd::objective warm;
  warm.temperature(kd::schedule<kd::curve::linear>{2.0, 1.0, 10, 5});
  CHECK(warm.validate().code() == kd::errc::invalid_argument);

  kd::objective good;
  good.temperature(kd::schedule<kd::curve::linear>{2.0, 1.0, 10});
  CHECK(good.validate().ok());
  // Re-setting a valid temperature clears an earlier invalid one.
  kd::objective fixed_later;
  fixed_later.temperature(kd::fixed(0.0));
  CHECK_FALSE(fixed_later.validate().ok());
  fixed_later.temperature(kd::fixed(2.0));
  CHECK(fixed_later.validate().ok());
  CHECK(fixed_later.temperature_at(5) == 2.0);
}

TEST_CASE("validate() names a component whose schedule is invalid") {
  kd::objective obj;
  obj.add("feature", kd::schedule<kd::curve::linear>{0.0, 1.0, -5});
  const kd::status v = obj.validate();
  CHECK(v.code() == kd::errc::invalid_argument);
  CHECK(kdtest::contains(v.message(), "'feature'"));
}

TEST_CASE("record(logger, evaluation) records the total and each term") {
  const kd::objective obj = make_objective();
  kd::objective_evaluation ev;
  REQUIRE(obj.combine(50, {{"lm", 2.0}, {"kd", 3.0}, {"feature", 4.0}, {"attention", 10.0}}, ev).ok());

  std::ostringstream human, jsonl;
  kd::metrics_logger<kd::log_every<1>> log(&human, &jsonl);
  kd::record(log, ev);
  REQUIRE(log.end_step(ev.step).ok());
  CHECK(human.str() == "step 50 | total 5.5 | lm 2 | kd 3 | feature 4 | attention 10\n");
  CHECK(kdtest::contains(jsonl.str(), "\"total\":{\"mean\":5.5,"));
  CHECK(kdtest::contains(jsonl.str(), "\"lm\":{\"mean\":2,"));

  // The LM term is recorded even when its weight is 0, so the required 'lm' is always satisfied.
  kd::objective zero_lm(kd::fixed(0.0));
  zero_lm.add("kd", kd::fixed(1.0));
  kd::objective_evaluation ev0;
  REQUIRE(zero_lm.combine(1, {{"lm", 4.0}, {"kd", 1.5}}, ev0).ok());
  CHECK(ev0.total == 1.5);
  std::ostringstream out;
  kd::metrics_logger<kd::log_every<1>> log0(&out);
  kd::record(log0, ev0);
  REQUIRE(log0.end_step(1).ok());
  CHECK(out.str() == "step 1 | total 1.5 | lm 4 | kd 1.5\n");
}
