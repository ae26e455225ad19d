// kd/train/adamw.hpp: AdamW over a flat parameter arena (CPU reference), and its learning-rate schedule.
//
// The model keeps every parameter and gradient in one contiguous arena (kd/model/parameters.hpp); the
// optimizer sees the same arena as a list of tensor segments, each with its own weight-decay flag. One
// step is two passes, the shape a fused CUDA kernel follows:
//   1. norm   = sqrt(sum over segments of g^2)                     (global norm, fp64 accumulation)
//      NaN/Inf -> error status naming the first non-finite tensor; nothing is updated, step not counted
//      clip   = max_grad_norm > 0 && norm > max_grad_norm ? max_grad_norm / norm : 1
//   2. t += 1, lr = schedule.lr(t), per element (fp32):
//      g = clip * grad
//      m = beta1 m + (1 - beta1) g
//      v = beta2 v + (1 - beta2) g^2
//      p = p - lr * weight_decay * p                                (decoupled: only if the tensor decays)
//      p = p - (lr / (1 - beta1^t)) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)
// (torch.optim.AdamW's order and formula). The fp32 value of p is the master weight: the parameters
// themselves when they are float, a separate fp32 copy when they are 16-bit (bf16/fp16), rounded into
// the parameters after each step, so updates smaller than a bf16 ulp still accumulate.
// The schedule: linear warm-up from 0 to `peak` over warmup_steps, then cosine decay to `floor` at
// total_steps, `floor` after that (total_steps == warmup_steps: no decay, `peak` after the warm-up).
// Step t is 1-based (the first update uses lr(1)).
// State (step, m, v, master) saves to and loads from a binary stream; a resumed run reproduces the
// uninterrupted one bit for bit.
#pragma once

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <istream>
#include <numbers>
#include <ostream>
#include <span>
#include <string>
#include <type_traits>
#include <vector>

#include <kd/core/numeric.hpp>
#include <kd/core/status.hpp>
#include <kd/model/parameters.hpp>

namespace kd {

// Linear warm-up then cosine decay to a floor.
struct lr_schedule {
  double peak = 1e-3;
  double floor = 0.0;
  std::int64_t warmup_steps = 0;
  std::int64_t total_steps = 1;  // the step at which the cosine reaches `floor`

  // Host and device: the CUDA optimizer computes lr(step) on the device (kd/train/adamw.cuh).
  [[nodiscard]] KD_HOST_DEVICE double lr(std::int64_t step) const noexcept {
    if (step < warmup_steps) return peak * static_cast<double>(step < 0 ? 0 : step) / static_cast<double>(warmup_steps);
    if (step >= total_steps) return total_steps > warmup_steps ? floor : peak;
    const double progress =
        static_cast<double>(step - warmup_steps) / static_cast<double>(total_steps - warmup_steps);
    return floor + (peak - floor) * 0.5 * (1.0 + std::cos(std::numbers::pi * progress));
  }

  [[nodiscard]] status validate() const {
    if (!std::isfinite(peak) || !(peak > 0.0))
      return {errc::invalid_argument, "lr_schedule: peak must be finite and positive, got " + std::to_string(peak)};
    if (!std::isfinite(floor) || floor < 0.0 || floor > peak)
      return {errc::invalid_argument, "lr_schedule: floor must be in [0, peak], got " + std::to_string(floor)};
    if (warmup_steps < 0 || total_steps < warmup_steps)
      return {errc::invalid_argument, "lr_schedule: need 0 <= warmup_steps <= total_steps, got " +
                                          std::to_string(warmup_steps) + " and " + std::to_string(total_steps)};
    return {};
  }
};

struct adamw_options {
  double beta1 = 0.9;
  double beta2 = 0.999;
  double eps = 1e-8;
  double weight_decay = 0.01;  // decoupled; applied only to segments with decay = true
  double max_grad_norm = 0.0;  // global-norm clipping threshold; 0 = no clipping
  lr_schedule schedule;

  [[nodiscard]] status validate() const {
    auto bad = [](const char* what, double v) {
      return status{errc::invalid_argument, std::string("adamw: ") + what + ", got " + std::to_string(v)};
    };
    if (!(beta1 >= 0.0 && beta1 < 1.0)) return bad("beta1 must be in [0, 1)", beta1);
    if (!(beta2 >= 0.0 && beta2 < 1.0)) return bad("beta2 must be in [0, 1)", beta2);
    if (!std::isfinite(eps) || !(eps > 0.0)) return bad("eps must be finite and positive", eps);
    if (!std::isfinite(weight_decay) || weight_decay < 0.0) return bad("weight_decay must be finite and >= 0", weight_decay);
    if (!std::isfinite(max_grad_norm) || max_grad_norm < 0.0)
      return bad("max_grad_norm must be finite and >= 0", max_grad_norm);
    return schedule.validate();
  }
};

// One tensor of the arena: [offset, offset + numel), decayed or not. Elements outside every segment
// (alignment padding) are never read or written.
struct adamw_segment {
  std::string name;
  std::size_t offset = 0, numel = 0;
  bool decay = true;
};

// Which tensor kinds weight decay applies to (matrices always decay).
struct decay_policy {
  bool norms = false;       // RMSNorm weights
  bool biases = false;      // names ending in "bias"
  bool embeddings = false;  // the token embedding (and a tied head, which is the same tensor)
};

// The segments of a model's parameter table, decay flags from the policy.
inline std::vector<adamw_segment> model_segments(const model::parameter_table& table, decay_policy p = {}) {
  std::vector<adamw_segment> out;
  for (const model::param_entry& e : table.entries()) {
    bool decay = true;
    const bool bias = e.name.size() >= 4 && e.name.compare(e.name.size() - 4, 4, "bias") == 0;
    if (e.kind == model::param_kind::norm) decay = p.norms;
    else if (bias) decay = p.biases;
    else if (e.offset == table.embed()) decay = p.embeddings;
    out.push_back({e.name, e.offset, e.numel, decay});
  }
  return out;
}

// The fp32 scalars of one update, as a kernel receives them. One definition for the CPU reference and
// the CUDA kernel (kd/train/adamw.cuh), which computes them on the device from the step it counts there.
struct adamw_scalars {
  float b1, b2, c1, c2, step_size, inv_sqrt_bc2, eps, scale, decay;

  KD_HOST_DEVICE static adamw_scalars make(const adamw_options& o, std::int64_t step, double lr, double clip) {
    const double t = static_cast<double>(step);
    // 1 - beta comes from double: float(1 - 0.999) is within an ulp of 1e-3, 1 - float(0.999) is 2.4e-5 off.
    return {static_cast<float>(o.beta1),
            static_cast<float>(o.beta2),
            static_cast<float>(1.0 - o.beta1),
            static_cast<float>(1.0 - o.beta2),
            static_cast<float>(lr / (1.0 - std::pow(o.beta1, t))),
            static_cast<float>(1.0 / std::sqrt(1.0 - std::pow(o.beta2, t))),
            static_cast<float>(o.eps),
            static_cast<float>(clip),
            static_cast<float>(1.0 - lr * o.weight_decay)};
  }
};

// One element of the update (fp32): raw gradient g, moments m and v (updated in place), fp32 weight p
// in, the new weight out. The same function runs on the CPU and in the CUDA kernel.
KD_HOST_DEVICE inline float adamw_update(float g, float& m, float& v, float p, bool decay, const adamw_scalars& s) {
  g *= s.scale;
  m = s.b1 * m + s.c1 * g;
  v = s.b2 * v + s.c2 * g * g;
  if (decay) p *= s.decay;
  return p - s.step_size * m / (std::sqrt(v) * s.inv_sqrt_bc2 + s.eps);
}

namespace detail {

// Segments must lie inside an arena of n elements and not overlap.
inline status check_adamw_segments(const std::vector<adamw_segment>& segments, std::size_t n) {
  std::vector<bool> used(n, false);
  for (const adamw_segment& s : segments) {
    if (s.offset > n || s.numel > n - s.offset)
      return {errc::out_of_range, "adamw: tensor '" + s.name + "' [" + std::to_string(s.offset) + ", +" +
                                      std::to_string(s.numel) + ") lies outside the arena of " + std::to_string(n) +
                                      " elements"};
    for (std::size_t i = s.offset; i < s.offset + s.numel; ++i) {
      if (used[i]) return {errc::invalid_argument, "adamw: tensor '" + s.name + "' overlaps another segment"};
      used[i] = true;
    }
  }
  return {};
}

// The optimizer state stream, shared by the CPU and CUDA optimizers (a checkpoint moves between them):
// header {magic, storage size, step, arena size}, then m, v and master as fp32 (master empty for float).
inline constexpr std::uint64_t adamw_magic = 0x31574d4144416b64ull;  // "kdADAMW1"

inline status write_adamw_state(std::ostream& os, std::uint64_t storage_size, std::int64_t step,
                                std::span<const float> m, std::span<const float> v, std::span<const float> master) {
  const std::uint64_t header[4] = {adamw_magic, storage_size, static_cast<std::uint64_t>(step), m.size()};
  os.write(reinterpret_cast<const char*>(header), sizeof header);
  for (std::span<const float> vec : {m, v, master})
    os.write(reinterpret_cast<const char*>(vec.data()), static_cast<std::streamsize>(vec.size() * sizeof(float)));
  if (!os) return {errc::io_error, "adamw: writing the optimizer state failed"};
  return {};
}

// Reads a state of an arena of n elements into m, v and (when with_master) master; nothing is changed
// on an error.
inline status read_adamw_state(std::istream& is, std::uint64_t storage_size, std::size_t n, bool with_master,
                               std::int64_t& step, std::vector<float>& m_out, std::vector<float>& v_out,
                               std::vector<float>& master_out) {
  std::uint64_t header[4] = {};
  if (!is.read(reinterpret_cast<char*>(header), sizeof header))
    return {errc::io_error, "adamw: optimizer state truncated (header)"};
  if (header[0] != adamw_magic) return {errc::invalid_argument, "adamw: not an optimizer state (bad magic)"};
  if (header[1] != storage_size)
    return {errc::invalid_argument, "adamw: state saved for " + std::to_string(header[1]) +
                                        "-byte parameters, this optimizer stores " + std::to_string(storage_size)};
  if (header[3] != n)
    return {errc::shape_mismatch, "adamw: state of an arena of " + std::to_string(header[3]) +
                                      " elements, this optimizer has " + std::to_string(n)};
  std::vector<float> m(n), v(n), master(with_master ? n : 0);
  for (auto* vec : {&m, &v, &master})
    if (!is.read(reinterpret_cast<char*>(vec->data()), static_cast<std::streamsize>(vec->size() * sizeof(float))))
      return {errc::io_error, "adamw: optimizer state truncated"};
  step = static_cast<std::int64_t>(header[2]);
  m_out = std::move(m);
  v_out = std::move(v);
  master_out = std::move(master);
  return {};
}

}  // namespace detail

struct adamw_step_result {
  std::int64_t step = 0;    // the step just taken (1-based)
  double lr = 0.0;          // its learning rate
  double grad_norm = 0.0;   // global gradient norm before clipping
  double clip_scale = 1.0;  // factor the gradients were multiplied by
};

// T: parameter storage (float, bfloat16 or half). Gradients may have any storage type.
template <class T>
class adamw {
  static_assert(std::is_same_v<T, float> || is_16bit_float_v<T>,
                "kd: adamw stores parameters as float, kd::bfloat16 or kd::half.");

 public:
  static constexpr bool keeps_master = !std::is_same_v<T, float>;

  // Validates the options and segments against the arena `params` and sets up zero m and v (and the
  // fp32 master copy of 16-bit parameters). Resets the step count.
  status init(std::vector<adamw_segment> segments, std::span<const T> params, const adamw_options& o) {
    KD_TRY(o.validate());
    KD_TRY(detail::check_adamw_segments(segments, params.size()));
    opt_ = o;
    segments_ = std::move(segments);
    step_ = 0;
    m_.assign(params.size(), 0.0f);
    v_.assign(params.size(), 0.0f);
    master_.clear();
    if constexpr (keeps_master) {
      master_.resize(params.size());
      for (std::size_t i = 0; i < params.size(); ++i) master_[i] = load_as<float>(params[i]);
    }
    return {};
  }

  // One update of `params` from `grads` (both the whole arena). On an error nothing changes.
  template <class G>
  status step(std::span<T> params, std::span<const G> grads, adamw_step_result& out) {
    if (params.size() != m_.size() || grads.size() != m_.size())
      return {errc::shape_mismatch, "adamw: arena of " + std::to_string(m_.size()) + " elements (init), got " +
                                        std::to_string(params.size()) + " parameters and " +
                                        std::to_string(grads.size()) + " gradients"};
    double sumsq = 0.0;
    for (const adamw_segment& s : segments_) {
      double t = 0.0;
      for (std::size_t i = s.offset; i < s.offset + s.numel; ++i) {
        const double g = load_as<double>(grads[i]);
        t += g * g;
      }
      if (!std::isfinite(t))
        return {errc::non_finite, "adamw: gradient norm is not finite at step " + std::to_string(step_ + 1) +
                                      " (tensor '" + s.name + "'); no update applied"};
      sumsq += t;
    }
    const double norm = std::sqrt(sumsq);
    if (!std::isfinite(norm))
      return {errc::non_finite, "adamw: gradient norm overflows at step " + std::to_string(step_ + 1) +
                                    "; no update applied"};
    const double clip = opt_.max_grad_norm > 0.0 && norm > opt_.max_grad_norm ? opt_.max_grad_norm / norm : 1.0;

    ++step_;
    const double lr = opt_.schedule.lr(step_);
    const adamw_scalars sc = adamw_scalars::make(opt_, step_, lr, clip);
    for (const adamw_segment& s : segments_) {
      for (std::size_t i = s.offset; i < s.offset + s.numel; ++i) {
        const float p = adamw_update(load_as<float>(grads[i]), m_[i], v_[i],
                                     keeps_master ? master_[i] : load_as<float>(params[i]), s.decay, sc);
        if constexpr (keeps_master) master_[i] = p;
        params[i] = store_as<T>(p);
      }
    }
    out = {step_, lr, norm, clip};
    return {};
  }

  [[nodiscard]] std::int64_t steps_taken() const noexcept { return step_; }
  [[nodiscard]] const adamw_options& options() const noexcept { return opt_; }
  [[nodiscard]] const std::vector<adamw_segment>& segments() const noexcept { return segments_; }
  [[nodiscard]] std::span<const float> m() const noexcept { return m_; }
  [[nodiscard]] std::span<const float> v() const noexcept { return v_; }
  // fp32 master weights (empty for float parameters, which are their own master).
  [[nodiscard]] std::span<const float> master() const noexcept { return master_; }

  // Binary state: magic, storage size, step, arena size, m, v, master. Options and segments are not
  // stored: init() with the run's own before load().
  status save(std::ostream& os) const { return detail::write_adamw_state(os, sizeof(T), step_, m_, v_, master_); }

  // Replaces step, m, v and master with a saved state of the same arena and storage type.
  status load(std::istream& is) {
    return detail::read_adamw_state(is, sizeof(T), m_.size(), keeps_master, step_, m_, v_, master_);
  }

 private:
  adamw_options opt_;
  std::vector<adamw_segment> segments_;
  std::int64_t step_ = 0;
  std::vector<float> m_, v_, master_;
};

}  // namespace kd
