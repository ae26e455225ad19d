// kd/train/loss_scaler.hpp: dynamic loss scaling for fp16 training.
//
// fp16 gradients underflow below 6e-8; the loss is multiplied by `scale` before backward and the
// gradients divided by it before the optimizer step. A step whose gradients hold Inf/NaN is skipped and
// the scale backs off; after `growth_interval` clean steps the scale grows.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>

#include <kd/core/status.hpp>

namespace kd {

class dynamic_loss_scaler {
 public:
  struct options {
    double initial_scale = 65536.0;
    double growth_factor = 2.0;
    double backoff_factor = 0.5;
    std::int64_t growth_interval = 2000;
    double min_scale = 1.0;
    double max_scale = 16777216.0;  // 2^24
  };

  dynamic_loss_scaler() : dynamic_loss_scaler(options{}) {}
  explicit dynamic_loss_scaler(options o) : opt_(o), scale_(o.initial_scale) {}

  status validate() const {
    if (!(opt_.initial_scale > 0) || !(opt_.growth_factor > 1) || !(opt_.backoff_factor > 0 && opt_.backoff_factor < 1) ||
        opt_.growth_interval < 1 || !(opt_.min_scale > 0) || !(opt_.max_scale >= opt_.min_scale) ||
        !std::isfinite(opt_.max_scale) || !(opt_.initial_scale >= opt_.min_scale && opt_.initial_scale <= opt_.max_scale))
      return {errc::invalid_argument, "dynamic_loss_scaler options out of range"};
    return {};
  }

  [[nodiscard]] double scale() const noexcept { return scale_; }
  [[nodiscard]] double inverse_scale() const noexcept { return 1.0 / scale_; }
  [[nodiscard]] std::int64_t skipped_steps() const noexcept { return skipped_; }

  // The mutable state, for run checkpoints (options belong to the run's config).
  struct snapshot {
    double scale = 0.0;
    std::int64_t clean = 0;
    std::int64_t skipped = 0;
  };
  [[nodiscard]] snapshot state() const noexcept { return {scale_, clean_, skipped_}; }
  void restore(const snapshot& s) noexcept {
    scale_ = s.scale;
    clean_ = s.clean;
    skipped_ = s.skipped;
  }

  // Call once per step with whether any gradient was non-finite. Returns true if the optimizer step
  // must be skipped.
  bool update(bool found_non_finite) {
    if (found_non_finite) {
      scale_ = std::max(opt_.min_scale, scale_ * opt_.backoff_factor);
      clean_ = 0;
      ++skipped_;
      return true;
    }
    if (++clean_ >= opt_.growth_interval) {
      scale_ = std::min(opt_.max_scale, scale_ * opt_.growth_factor);
      clean_ = 0;
    }
    return false;
  }

 private:
  options opt_;
  double scale_;
  std::int64_t clean_ = 0;
  std::int64_t skipped_ = 0;
};

}  // namespace kd
