// kd/policy/curriculum.hpp: curriculum curves and schedules for loss weights and temperature.
//
// A schedule moves a value from `start` to `end` along a curve. Timeline, in optimizer steps:
//   [0, warmup)                       rises linearly from 0 to start (skipped when warmup = 0)
//   [warmup, warmup + hold)           holds start
//   [warmup + hold, + ramp)           follows the curve from start to end (progress 0 -> 1)
//   after                             holds end
// Curves map progress p in [0, 1] to [0, 1]: linear p (0.5 at 50%: the seed's curve gave 6.7%),
// cosine (1 - cos(pi p)) / 2, quadratic p^2, exponential (e^{r p} - 1) / (e^r - 1), step (N equal
// stairs), constant 1 (the value is `end` from the first ramp step).
#pragma once

#include <algorithm>
#include <cmath>
#include <concepts>
#include <cstdint>
#include <functional>
#include <numbers>
#include <string>
#include <string_view>
#include <type_traits>

#include <kd/core/status.hpp>

namespace kd {

// Curves are tag types in kd::curve (curve::linear, curve::cosine, ...).
namespace curve {

struct constant {
  static constexpr std::string_view name = "constant";
  static constexpr double shape(double) noexcept { return 1.0; }
};
struct linear {
  static constexpr std::string_view name = "linear";
  static constexpr double shape(double p) noexcept { return p; }
};
struct cosine {
  static constexpr std::string_view name = "cosine";
  static double shape(double p) noexcept { return 0.5 * (1.0 - std::cos(std::numbers::pi * p)); }
};
struct quadratic {
  static constexpr std::string_view name = "quadratic";
  static constexpr double shape(double p) noexcept { return p * p; }
};
template <double Rate = 5.0>
struct exponential {
  static_assert(Rate > 0.0, "kd: an exponential curve needs a positive rate.");
  static constexpr std::string_view name = "exponential";
  static constexpr double rate = Rate;
  static double shape(double p) noexcept { return std::expm1(Rate * p) / std::expm1(Rate); }
};
template <int Stairs = 4>
struct step {
  static_assert(Stairs >= 1, "kd: a step curve needs at least one stair.");
  static constexpr std::string_view name = "step";
  static constexpr int stairs = Stairs;
  static double shape(double p) noexcept { return std::min(1.0, std::floor(p * Stairs) / Stairs); }
};

}  // namespace curve

template <class C>
concept Curve = requires(double p) {
  { C::shape(p) } -> std::convertible_to<double>;
  { C::name } -> std::convertible_to<std::string_view>;
};
static_assert(Curve<curve::linear> && Curve<curve::cosine> && Curve<curve::exponential<>> && Curve<curve::step<>> &&
              Curve<curve::constant>);
static_assert(!Curve<int>);
static_assert(curve::linear::shape(0.5) == 0.5);

template <Curve C>
struct schedule {
  using curve_type = C;
  double start = 0.0;
  double end = 1.0;
  std::int64_t ramp_steps = 0;   // steps over which the curve runs; 0 = jump to `end`
  std::int64_t warmup_steps = 0;
  std::int64_t hold_steps = 0;

  status validate() const {
    if (!std::isfinite(start) || !std::isfinite(end)) return {errc::invalid_argument, "schedule values must be finite"};
    if (ramp_steps < 0 || warmup_steps < 0 || hold_steps < 0)
      return {errc::invalid_argument, "schedule step counts must be >= 0"};
    return {};
  }

  // Progress through the ramp, in [0, 1].
  [[nodiscard]] double progress(std::int64_t step) const noexcept {
    const std::int64_t s = step - warmup_steps - hold_steps;
    if (s <= 0) return 0.0;
    if (ramp_steps <= 0 || s >= ramp_steps) return 1.0;
    return static_cast<double>(s) / static_cast<double>(ramp_steps);
  }

  [[nodiscard]] double operator()(std::int64_t step) const {
    if (step < warmup_steps)  // steps before 0 count as step 0 (no negative weights)
      return start * static_cast<double>(std::max<std::int64_t>(step, 0)) / static_cast<double>(warmup_steps);
    if (step < warmup_steps + hold_steps) return start;
    if (ramp_steps <= 0) return end;
    return start + (end - start) * C::shape(progress(step));
  }

  // True while the value still changes: early stopping does not count these steps.
  // A constant curve jumps to `end` at the first ramp step, so it changes only during warm-up and,
  // when end != start, at the end of the hold; it never ramps after that.
  [[nodiscard]] bool ramping(std::int64_t step) const noexcept {
    if constexpr (std::is_same_v<C, curve::constant>)
      return step < warmup_steps + (end != start ? hold_steps : 0);
    return step < warmup_steps + hold_steps + ramp_steps;
  }
};

// A type-erased schedule, for objectives whose components use different curves.
class any_schedule {
 public:
  any_schedule() : any_schedule(schedule<curve::constant>{1.0, 1.0}) {}
  template <Curve C>
  any_schedule(schedule<C> s)  // NOLINT: implicit on purpose
      : value_([s](std::int64_t t) { return s(t); }),
        ramping_([s](std::int64_t t) { return s.ramping(t); }),
        valid_(s.validate()),
        curve_(C::name) {}

  [[nodiscard]] double operator()(std::int64_t step) const { return value_(step); }
  [[nodiscard]] bool ramping(std::int64_t step) const { return ramping_(step); }
  [[nodiscard]] const status& validate() const { return valid_; }
  [[nodiscard]] std::string_view curve_name() const { return curve_; }

 private:
  std::function<double(std::int64_t)> value_;
  std::function<bool(std::int64_t)> ramping_;
  status valid_;
  std::string_view curve_;
};

// A fixed value (weight 1.0 by default).
inline schedule<curve::constant> fixed(double value) { return {value, value, 0, 0, 0}; }

// Temperature schedules are schedules whose values must stay > 0.
template <Curve C>
status validate_temperature(const schedule<C>& s) {
  KD_TRY(s.validate());
  if (!(s.start > 0.0) || !(s.end > 0.0))
    return {errc::invalid_argument, "a temperature schedule must stay > 0 (start " + std::to_string(s.start) +
                                        ", end " + std::to_string(s.end) + ")"};
  if (s.warmup_steps > 0)
    return {errc::invalid_argument, "a temperature schedule cannot warm up from 0; use hold_steps"};
  return {};
}

}  // namespace kd
