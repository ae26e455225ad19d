// kd/train/step_backend.hpp: what a training step needs from a model backend besides its ops.
//
// The step code (kd/train/distill_step.hpp) is written once against kd::model's op interface. Three
// things differ per backend and live here: the loss backend object the losses run on, where loss values
// land (host results on the CPU; device floats on the GPU, read once per logged step), and the optimizer
// over the backend's parameter arena. The CPU specialization is below; the CUDA one is in
// kd/train/step_backend.cuh. A backend without one stops at the primary template's static_assert.
#pragma once

#include <cstddef>
#include <istream>
#include <ostream>
#include <span>
#include <string>
#include <type_traits>
#include <vector>

#include <kd/core/status.hpp>
#include <kd/loss/common.hpp>
#include <kd/loss/cross_entropy.hpp>
#include <kd/model/ops_cpu.hpp>
#include <kd/policy/backend.hpp>
#include <kd/train/adamw.hpp>

namespace kd::train {

template <class B>
struct step_backend {
  static_assert(backend_dependent_false_v<B>,
                "kd: this model backend has no kd::train::step_backend; include kd/train/step_backend.cuh for cuda_ops.");
};

// Loss values of one or more steps: `losses` plain slots (one value each) and `ces` cross-entropy slots
// (ce and z-loss). read() returns them in that order, each ce slot as (ce, z).
template <class Real>
struct step_backend<model::cpu_ops<Real>> {
  using ops = model::cpu_ops<Real>;
  using value_type = Real;
  using loss_backend = cpu_backend;
  static constexpr bool is_device = false;

  static loss_backend losses(ops&) { return cpu; }

  class slots {
   public:
    status resize(ops&, std::size_t losses, std::size_t ces) {
      l_.assign(losses, {});
      c_.assign(ces, {});
      return {};
    }
    loss_result& loss(std::size_t i) { return l_[i]; }
    cross_entropy_result& ce(std::size_t i) { return c_[i]; }
    [[nodiscard]] std::size_t loss_count() const { return l_.size(); }
    [[nodiscard]] std::size_t ce_count() const { return c_.size(); }
    status read(ops&, std::vector<double>& out) const {
      out.clear();
      for (const auto& r : l_) out.push_back(r.loss);
      for (const auto& r : c_) {
        out.push_back(r.ce);
        out.push_back(r.z_loss);
      }
      return {};
    }

   private:
    std::vector<loss_result> l_;
    std::vector<cross_entropy_result> c_;
  };

  // AdamW over an arena in the backend's memory (kd::adamw, the CPU reference).
  class optimizer {
   public:
    status init(ops&, std::vector<adamw_segment> segments, const Real* params, std::size_t n, const adamw_options& o) {
      return opt_.init(std::move(segments), std::span<const Real>(params, n), o);
    }
    status step(ops&, Real* params, const Real* grads, std::size_t n) {
      return opt_.step(std::span<Real>(params, n), std::span<const Real>(grads, n), last_);
    }
    // The last step's lr, gradient norm and clip factor (no synchronisation on the CPU).
    status result(ops&, adamw_step_result& out) const {
      out = last_;
      return {};
    }
    status save(std::ostream& os) const { return opt_.save(os); }
    status load(std::istream& is) { return opt_.load(is); }

   private:
    kd::adamw<Real> opt_;
    adamw_step_result last_;
  };
};

}  // namespace kd::train
