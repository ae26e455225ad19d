// kd/train/early_stopping.hpp: patience-based early stopping that ignores the curriculum ramp.
//
// The seed run stopped at half its length because validation loss rose while the curriculum was still
// shifting weight between components. Here evaluations made while any schedule is ramping neither
// count towards patience nor set the best value.
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>
#include <string>

#include <kd/core/status.hpp>

namespace kd {

class early_stopping {
 public:
  struct options {
    std::int64_t patience = 5;  // evaluations without improvement before stopping
    double min_delta = 0.0;     // improvement must exceed this (absolute)
  };

  early_stopping() = default;
  explicit early_stopping(options o) : opt_(o) {}

  // Records an evaluation; returns true once training should stop. ramping = a schedule is still moving.
  status update(double value, bool ramping, bool& stop) {
    stop = false;
    if (opt_.patience < 1 || !(opt_.min_delta >= 0.0))
      return {errc::invalid_argument, "early_stopping needs patience >= 1 and min_delta >= 0"};
    if (!std::isfinite(value))
      return {errc::non_finite, "early_stopping was given a non-finite validation value"};
    if (ramping) return {};
    if (value < best_ - opt_.min_delta) {
      best_ = value;
      bad_ = 0;
    } else {
      ++bad_;
    }
    stop_ = bad_ >= opt_.patience;
    stop = stop_;
    return {};
  }

  [[nodiscard]] double best() const noexcept { return best_; }
  [[nodiscard]] std::int64_t evaluations_without_improvement() const noexcept { return bad_; }
  [[nodiscard]] bool should_stop() const noexcept { return stop_; }

  // The mutable state, for run checkpoints (options belong to the run's config).
  struct snapshot {
    double best = std::numeric_limits<double>::infinity();
    std::int64_t bad = 0;
    bool stop = false;
  };
  [[nodiscard]] snapshot state() const noexcept { return {best_, bad_, stop_}; }
  void restore(const snapshot& s) noexcept {
    best_ = s.best;
    bad_ = s.bad;
    stop_ = s.stop;
  }

 private:
  options opt_{};
  double best_ = std::numeric_limits<double>::infinity();
  std::int64_t bad_ = 0;
  bool stop_ = false;
};

}  // namespace kd
