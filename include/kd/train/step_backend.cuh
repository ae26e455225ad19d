// kd/train/step_backend.cuh: kd::train::step_backend for the CUDA model backend (kd::model::cuda_ops<T>).
//
// Includes the CUDA implementations of every loss the steps call (cross-entropy, logit KD, feature, router),
// so a program needs only this header and kd/train/distill_step.hpp.
// Losses run on the ops' own context (one stream: the model's kernels, the losses and the optimizer are
// ordered without events). Loss values are device floats that the losses overwrite; read() is the step's
// only synchronisation and also reports the first error a kernel recorded (a NaN in a named loss
// component, a label out of range, a non-finite gradient the optimizer refused).
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <istream>
#include <memory>
#include <ostream>
#include <span>
#include <vector>

#include <kd/cuda/context.cuh>
#include <kd/loss/cross_entropy.cuh>
#include <kd/loss/feature.cuh>
#include <kd/loss/logit_kd.cuh>
#include <kd/loss/moe.cuh>
#include <kd/model/cuda/ops.cuh>
#include <kd/model/cuda/profiled_ops.cuh>
#include <kd/train/adamw.cuh>
#include <kd/train/step_backend.hpp>

namespace kd::train {

template <class T>
struct step_backend<model::cuda_ops<T>> {
  using ops = model::cuda_ops<T>;
  using value_type = T;
  using loss_backend = cuda::backend;
  static constexpr bool is_device = true;

  static loss_backend losses(ops& o) { return cuda::backend{&o.context()}; }

  class slots {
   public:
    // Reallocates only when the count changes: a cudaFree would synchronise the device every window.
    status resize(ops& o, std::size_t losses, std::size_t ces) {
      nl_ = losses;
      nc_ = ces;
      if (buf_.size() == nl_ + 2 * nc_ + 1) return {};
      buf_ = o.template alloc<float>(nl_ + 2 * nc_ + 1);
      if (buf_.size() != nl_ + 2 * nc_ + 1) return {errc::backend_error, "step_backend: cannot allocate loss slots"};
      return {};
    }
    cuda::device_loss loss(std::size_t i) { return {buf_.data() + i, nullptr}; }
    cuda::device_cross_entropy ce(std::size_t i) {
      return {buf_.data() + nl_ + 2 * i, buf_.data() + nl_ + 2 * i + 1, nullptr};
    }
    [[nodiscard]] std::size_t loss_count() const { return nl_; }
    [[nodiscard]] std::size_t ce_count() const { return nc_; }
    // Waits for the stream: the one synchronisation of a logged step.
    status read(ops& o, std::vector<double>& out) const {
      KD_TRY(o.context().sync_status());
      std::vector<float> h(nl_ + 2 * nc_);
      KD_CUDA_TRY(cudaMemcpy(h.data(), buf_.data(), h.size() * sizeof(float), cudaMemcpyDeviceToHost),
                  "cudaMemcpy (loss slots)");
      out.assign(h.begin(), h.end());
      return {};
    }

   private:
    model::cuda::device_array<float> buf_;
    std::size_t nl_ = 0, nc_ = 0;
  };

  // kd::cuda::adamw: no host synchronisation per step; result() waits.
  // A copy shares the device optimizer and stages a load() on the host: kd::load_run_checkpoint checks a
  // copy first and assigns it to the live optimizer only once every part of the checkpoint has loaded, so a
  // rejected checkpoint leaves the device state untouched and no second device copy of m and v is made.
  class optimizer {
   public:
    optimizer() = default;
    optimizer(const optimizer& o) : opt_(o.opt_), ctx_(o.ctx_), copy_(true) {}
    optimizer& operator=(optimizer&& o) noexcept {
      if (this == &o) return *this;
      if (o.staged_ != nullptr && opt_ != nullptr && ctx_ != nullptr) {
        // Applying a checked state cannot fail but for a device error, which the next sync reports.
        (void)opt_->upload(*ctx_, o.staged_->step, o.staged_->m, o.staged_->v, o.staged_->master);
      } else if (o.staged_ == nullptr) {
        opt_ = std::move(o.opt_);
        ctx_ = o.ctx_;
      }
      return *this;
    }
    optimizer& operator=(const optimizer&) = delete;

    status init(ops& o, std::vector<adamw_segment> segments, const T* params, std::size_t n, const adamw_options& opt) {
      ctx_ = &o.context();
      opt_ = std::make_shared<cuda::adamw<T>>();
      return opt_->init(*ctx_, std::move(segments), std::span<const T>(params, n), opt);
    }
    status step(ops& o, T* params, const T* grads, std::size_t n) {
      if (opt_ == nullptr) return {errc::invalid_argument, "optimizer: step() before init()"};
      return opt_->step(o.context(), std::span<T>(params, n), std::span<const T>(grads, n));
    }
    status result(ops& o, adamw_step_result& out) const {
      if (opt_ == nullptr) return {errc::invalid_argument, "optimizer: result() before init()"};
      return opt_->result(o.context(), out);
    }
    status save(std::ostream& os) const {
      if (opt_ == nullptr || ctx_ == nullptr) return {errc::invalid_argument, "optimizer: save() before init()"};
      return opt_->save(*ctx_, os);
    }
    status load(std::istream& is) {
      if (opt_ == nullptr || ctx_ == nullptr) return {errc::invalid_argument, "optimizer: load() before init()"};
      if (!copy_) return opt_->load(*ctx_, is);
      auto st = std::make_shared<staged>();
      KD_TRY(kd::detail::read_adamw_state(is, sizeof(T), opt_->size(), cuda::adamw<T>::keeps_master, st->step, st->m,
                                          st->v, st->master));
      staged_ = std::move(st);
      return {};
    }

   private:
    struct staged {
      std::int64_t step = 0;
      std::vector<float> m, v, master;
    };
    std::shared_ptr<cuda::adamw<T>> opt_;
    cuda::context* ctx_ = nullptr;
    bool copy_ = false;
    std::shared_ptr<staged> staged_;
  };
};

// profiled_ops (per-op GPU times for a breakdown) runs the steps as cuda_ops does.
template <class T>
struct step_backend<model::profiled_ops<T>> : step_backend<model::cuda_ops<T>> {};

}  // namespace kd::train
