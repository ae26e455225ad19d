// kd/loss/divergence.hpp: divergences between a teacher distribution p and a student distribution q.
//
// Conventions (all in nats; p = softmax(teacher / T), q = softmax(student / T)):
//   forward_kl   KL(p || q) = sum p (log p - log q)
//   reverse_kl   KL(q || p) = sum q (log q - log p)
//   jsd          beta KL(p || m) + (1 - beta) KL(q || m),  m = beta p + (1 - beta) q   (GKD's generalized
//                JSD; beta = 0.5 is the symmetric JSD; beta = 0 or 1 makes m equal q or p and the loss 0)
//   skew_kl      KL(p || m),  m = alpha p + (1 - alpha) q   (alpha = 0 is forward KL)
//   tvd          0.5 sum |p - q|   (at an exact tie p_j = q_j the sign of p_j - q_j is taken as 0: dL/dq_j = 0,
//                a valid subgradient)
// Gradients are taken with respect to the student's scaled logits z = s / T:
//   dL/dz_j = q_j (g_j - sum_i q_i g_i), with g = dL/dq;  forward KL reduces to q - p.
// Terms with p_j = 0 contribute 0 (0 log 0 = 0).
// Temperature: every backend scales a logit x as y = x * k2 in float, k2 = float(1 / T) * log2(e) (the
// CUDA kernels' arithmetic); a finite logit whose y overflows (3e38 at T = 0.5) is rejected like a NaN.
#pragma once

#include <cmath>
#include <concepts>
#include <string_view>

#include <kd/core/numeric.hpp>  // KD_HOST_DEVICE

namespace kd {

struct forward_kl {
  static constexpr std::string_view name = "forward_kl";
};
struct reverse_kl {
  static constexpr std::string_view name = "reverse_kl";
};
struct jsd {
  static constexpr std::string_view name = "jsd";
};
struct skew_kl {
  static constexpr std::string_view name = "skew_kl";
};
struct tvd {
  static constexpr std::string_view name = "tvd";
};

template <class D>
concept Divergence = std::same_as<D, forward_kl> || std::same_as<D, reverse_kl> || std::same_as<D, jsd> ||
                     std::same_as<D, skew_kl> || std::same_as<D, tvd>;
static_assert(Divergence<forward_kl> && Divergence<jsd> && Divergence<tvd> && !Divergence<int>);

template <class D>
struct divergence_traits {
  static_assert(!sizeof(D*),
                "kd: a divergence must be kd::forward_kl, kd::reverse_kl, kd::jsd, kd::skew_kl or kd::tvd.");
};
template <Divergence D>
struct divergence_traits<D> {
  static constexpr bool uses_beta = std::same_as<D, jsd>;
  static constexpr bool uses_alpha = std::same_as<D, skew_kl>;
};

namespace detail {

// log and |x| usable in host and device code (the CUDA kernels share these formulas).
// logf on the device too, not __logf (MUFU.LG2): the approximation's error, up to 2^-22 of |log2 m|, is
// not centred on zero, so over a row it adds up instead of averaging out; a JSD or skew KL of close
// distributions took it whole (skew KL's value off by 8e-6 to 9e-4 relative on an H100, 2026-12-05,
// benchmarks/NOTES.md session 11). The fused kernels' own base-2 forms choose per storage
// (kd/loss/logit_kd_math.cuh: mixture_entry's Exact).
KD_HOST_DEVICE inline float div_log(float x) { return ::logf(x); }
KD_HOST_DEVICE inline double div_log(double x) { return ::log(x); }
template <class A>
KD_HOST_DEVICE inline A div_abs(A x) { return x < A(0) ? -x : x; }

// float(1 / T): the inverse temperature as every backend multiplies by it.
KD_HOST_DEVICE inline float inverse_temperature(double temperature) { return 1.f / static_cast<float>(temperature); }

// The one overflow rule for tempered logits: x is usable at temperature T when x * k2 is finite in float,
// k2 = inv_temp * log2(e) (a fused kernel flags the row when the base-2 log-sum-exp of those values is not).
KD_HOST_DEVICE inline bool scaled_logit_ok(float x, float inv_temp) {
  const float y = x * (inv_temp * 1.4426950408889634f);
#ifdef __CUDA_ARCH__
  return isfinite(y);
#else
  return std::isfinite(y);
#endif
}

// Per-element pieces of a divergence, evaluated in accumulation type A.
//   term(p, logp, q, logq): the contribution of one vocabulary entry to the loss.
//   dq(p, logp, q, logq):   dL/dq_j for that entry (used with the softmax Jacobian).
// forward_kl is special-cased by callers (dL/dz = q - p, no Jacobian pass needed).
template <Divergence D, class A>
struct divergence_math {
  A param = A(0.5);  // beta for jsd, alpha for skew_kl

  // A backend that holds the two log-normalizers in float and subtracts each rounded, off by e_t
  // (teacher) and e_s (student), scales p and q by 2^-e_t, 2^-e_s (base 2) and moves the row's value by
  // -w (e_t - e_s) to first order, with w this weight (d/dlog-scale of p minus that of q, at q = p):
  // forward KL 1 (KL(p||q)'s sum p is not renormalized), reverse KL -1, skew KL 1 - alpha; JSD 0 (its
  // change is a KL(p||m) e_t + ..., second order for close p and q); TVD 0 (first order, but by
  // sum p sign(p - q) / 2, which no normalizer gives: left as it is). The CUDA kernels add w (e_t - e_s)
  // back once per row: for close distributions the normalizers' rounding was most of the float error
  // of the value. has_lse_gap: whether the weight can be nonzero (kernels compile the gap only then).
  // (The CPU backends know each rounding exactly: kd::detail::split_lse and log_shift below.)
  static constexpr bool has_lse_gap = !std::same_as<D, jsd> && !std::same_as<D, tvd>;
  KD_HOST_DEVICE A lse_gap_weight() const {
    if constexpr (std::same_as<D, forward_kl>) return A(1);
    else if constexpr (std::same_as<D, reverse_kl>) return A(-1);
    else if constexpr (std::same_as<D, skew_kl>) return A(1) - param;
    else return A(0);
  }
  // What a row's value (the sum of term() over the row) gains when every log p is e_t too low and every
  // log q e_s too low while p and q themselves are exact: -(e_t sum dterm/dlog p + e_s sum dterm/dlog q).
  // The CPU backends add it back (kd::detail::split_lse): forward KL e_t - e_s, reverse KL e_s - e_t,
  // skew KL e_t (its m comes from the exact p and q), JSD a e_t + (1 - a) e_s, TVD 0 (no logs).
  double log_shift(double e_t, double e_s) const {
    const double a = static_cast<double>(param);
    if constexpr (std::same_as<D, forward_kl>) return e_t - e_s;
    else if constexpr (std::same_as<D, reverse_kl>) return e_s - e_t;
    else if constexpr (std::same_as<D, skew_kl>) return e_t;
    else if constexpr (std::same_as<D, jsd>) return a * e_t + (1.0 - a) * e_s;
    else return 0.0;
  }

  KD_HOST_DEVICE A term(A p, A logp, A q, A logq) const {
    if constexpr (std::same_as<D, forward_kl>) {
      return p > A(0) ? p * (logp - logq) : A(0);
    } else if constexpr (std::same_as<D, reverse_kl>) {
      return q > A(0) ? q * (logq - logp) : A(0);
    } else if constexpr (std::same_as<D, jsd>) {
      const A b = param;
      const A m = b * p + (A(1) - b) * q;
      if (m <= A(0)) return A(0);
      const A logm = div_log(m);
      A t = A(0);
      if (p > A(0)) t += b * p * (logp - logm);
      if (q > A(0)) t += (A(1) - b) * q * (logq - logm);
      return t;
    } else if constexpr (std::same_as<D, skew_kl>) {
      const A a = param;
      const A m = a * p + (A(1) - a) * q;
      return p > A(0) ? p * (logp - div_log(m)) : A(0);
    } else {
      return A(0.5) * div_abs(p - q);
    }
  }

  KD_HOST_DEVICE A dq(A p, A logp, A q, A logq) const {
    if constexpr (std::same_as<D, forward_kl>) {
      return q > A(0) ? -p / q : A(0);
    } else if constexpr (std::same_as<D, reverse_kl>) {
      return logq - logp + A(1);
    } else if constexpr (std::same_as<D, jsd>) {
      const A b = param;
      const A m = b * p + (A(1) - b) * q;
      if (m <= A(0) || q <= A(0)) return A(0);
      return (A(1) - b) * (logq - div_log(m));
    } else if constexpr (std::same_as<D, skew_kl>) {
      const A a = param;
      const A m = a * p + (A(1) - a) * q;
      return m > A(0) ? -p * (A(1) - a) / m : A(0);
    } else {
      return p == q ? A(0) : (q > p ? A(0.5) : A(-0.5));
    }
  }
};

// A log-sum-exp m + l (the max and the log of the shifted sum, in double) as a CPU backend in A subtracts
// it: value, rounded to A, and excess = value - (m + l), what the rounding added (in double; exactly 0
// when A is double, so the fp64 reference is unchanged). x - value is then the log-probability minus
// the excess, common to the whole row (2^-24 |lse| in float: at logits 150 from zero ~1e-5 of every p
// and q, which forward KL's q - p of close distributions and the sum p (log p - log q) magnify ~10x).
// The backends keep x - value as the log (adding the excess to each would round it away in a biased
// way), take the probabilities back with scale = exp(excess), and give the value back its shift
// (divergence_math::log_shift).
template <class A>
struct split_lse {
  A value = A(0);
  double excess = 0.0;
  A scale = A(1);
  static split_lse of(double m, double l) {
    const A v = static_cast<A>(m) + static_cast<A>(l);
    const double excess = static_cast<double>(v) - (m + l);
    return {v, excess, static_cast<A>(std::exp(excess))};
  }
};

}  // namespace detail
}  // namespace kd
