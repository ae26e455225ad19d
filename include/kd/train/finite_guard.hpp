// kd/train/finite_guard.hpp: stops a run at the first non-finite loss, naming component and step.
#pragma once

#include <cmath>
#include <cstdint>
#include <string>
#include <string_view>

#include <kd/core/numeric.hpp>
#include <kd/core/status.hpp>

namespace kd {

inline status check_finite_loss(std::string_view component, std::int64_t step, double value) {
  if (std::isfinite(value)) return {};
  return {errc::non_finite, "the '" + std::string(component) + "' loss is " + (std::isnan(value) ? "NaN" : "Inf") +
                                " at step " + std::to_string(step)};
}

// Checks gradients (or any buffer) on the host; returns the first non-finite entry's position.
template <class T>
status check_finite_values(std::string_view what, std::int64_t step, const T* data, std::int64_t count) {
  for (std::int64_t i = 0; i < count; ++i) {
    // load_as widens half/bfloat16 through float and everything else directly, so a finite double
    // beyond float's range is not mistaken for Inf.
    const double v = load_as<double>(data[i]);
    if (!std::isfinite(v))
      return {errc::non_finite, std::string(what) + " holds " + (std::isnan(v) ? "NaN" : "Inf") + " at index " +
                                    std::to_string(i) + " at step " + std::to_string(step)};
  }
  return {};
}

}  // namespace kd
