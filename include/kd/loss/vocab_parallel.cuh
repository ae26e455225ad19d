// kd/loss/vocab_parallel.cuh: the vocabulary-parallel losses on the GPU (kd/loss/vocab_parallel.hpp is the
// reference, with the conventions).
//
// Each rank holds a column slice of the logits in device memory; the communicator's collectives act on
// device memory in stream order (kd::cuda::nccl_communicator). One block per row, 16-byte loads where
// the rows are aligned, and only O(rows) numbers cross the link; no rank ever holds a full row:
//   1. stats: one read of the slice gives each row's online log-sum-exp (max, sum) of the scaled teacher
//      and student logits (each taken from a per-row reference) and, for forward / reverse KL, the sum of
//      w * (y_w - y_other) under the same running max (w: the teacher's, resp. the student's,
//      probabilities)  -> all-reduce (max) of the maxima and a bad-logit flag, a rescale of the sums to
//      the global maxima, all-reduce (sum).
//      Forward and reverse KL are then known: KL = E_w[y_w - y_o] - lse_w + lse_o.
//   2. (JSD, skew KL, TVD) the row terms and sum q * dD/dq, which need the global lse -> all-reduce (sum).
//   3. the slice's gradient, and the row losses -> the loss value (fixed-order sum, then the divisor).
// So forward / reverse KL and cross-entropy read the slice twice and write it once, the other divergences
// read it three times; the one-GPU fused kernel reads it once, but it holds the whole row on chip.
// Why bounded by: HBM bandwidth (each pass is a streaming read at one 16-byte load per thread in flight
// per tensor) plus the collectives' latency (two or three small all-reduces per call).
// A row with a bad logit on any rank is skipped on every rank (the flag is all-reduced); the rank that
// holds it records the error in its context's error word (sync_status names it). The host validation
// is agreed on by all ranks first.
#pragma once

#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <span>
#include <string>
#include <type_traits>

#include <kd/core/comm.hpp>
#include <kd/cuda/context.cuh>
#include <kd/cuda/detail/reduce.cuh>
#include <kd/cuda/detail/storage.cuh>
#include <kd/loss/cross_entropy.cuh>
#include <kd/loss/logit_kd.cuh>
#include <kd/loss/vocab_parallel.hpp>

namespace kd {
namespace cuda::detail {

constexpr int kVpThreads = 256;

// What pass 1 accumulates beside the two log-sum-exps: 0 nothing, 1 E_p[yt - ys] (forward KL), 2 E_q[ys - yt]
// (reverse KL), 3 cross-entropy (one lse, the label's logit).
template <class D>
inline constexpr int vp_mode = std::is_same_v<D, forward_kl> ? 1 : std::is_same_v<D, reverse_kl> ? 2 : 0;
inline constexpr int kVpCe = 3;

struct vp_params {
  const void* teacher = nullptr;  // KD only
  long long t_stride = 0;
  const void* student = nullptr;  // the student logits (KD) or the logits (cross-entropy)
  long long s_stride = 0;
  void* grad = nullptr;
  long long g_stride = 0;
  long long rows = 0, cols = 0, real = 0;  // real: this slice's real columns, [0, real)
  long long offset = 0;                    // the slice's first column in the full vocabulary
  const std::int32_t* labels = nullptr;
  int ignore_index = -100;
  long long label_vocab = 0;
  float inv_temp = 1.f;
  float param = 0.5f;
  float loss_scale = 1.f;
  float grad_base = 1.f;     // KD: grad_scale * loss_scale / T; CE: grad_scale
  float z_weight = 0.f;      // CE: the z-loss's weight
  const long long* divisor_dev = nullptr;
  double divisor = 1.0;
  bool want_grad = false, accumulate = false;
  int mode = 0;              // vp_mode / kVpCe
  double* mx = nullptr;      // [rows x 3] base-2 maxima (teacher, student; CE: logits, -) and the bad flag: max-reduced
  double* loc = nullptr;     // [rows x 2] this rank's maxima (the rescale's reference)
  double* sums = nullptr;    // [rows x 3] sums of 2^(y - max) (teacher, student; CE: logits, -) and the mode's term: summed
  double* terms = nullptr;   // [rows x 2] pass 2: the row's divergence and sum q * dD/dq
  float* partial = nullptr;  // [rows] (KD loss, or CE)
  float* partial_z = nullptr;  // [rows] (CE z-loss)
  unsigned long long* error = nullptr;
  unsigned component = 0;
};

// Whether row r takes part (label not ignored; a label outside the full vocabulary is recorded, skipped).
__device__ inline bool vp_active(const vp_params& p, long long r) {
  if (p.labels == nullptr) return true;
  const int y = p.labels[r];
  if (y == p.ignore_index) return false;
  if (y < 0 || y >= p.label_vocab) {
    if (threadIdx.x == 0)
      atomicMin(p.error, encode_error(r, device_error::label_out_of_range, device_tensor::labels, p.component));
    return false;
  }
  return true;
}

// G elements from 16-byte aligned memory (G * sizeof(T) a multiple of 16), as floats.
template <class T, int G>
__device__ __forceinline__ void vp_load(const T* __restrict__ src, float (&f)[G]) {
  constexpr int per = vec_n<T>;
  static_assert(G % per == 0, "a group is whole 16-byte vectors");
  const uint4* q = reinterpret_cast<const uint4*>(src);
#pragma unroll
  for (int k = 0; k < G / per; ++k) {
    float tmp[per];
    unpack<T>(__ldg(q + k), tmp);
#pragma unroll
    for (int i = 0; i < per; ++i) f[k * per + i] = tmp[i];
  }
}
template <class T, int G>
__device__ __forceinline__ void vp_store(T* dst, float (&f)[G], bool accumulate) {
  constexpr int per = vec_n<T>;
  static_assert(G % per == 0, "a group is whole 16-byte vectors");
  uint4* q = reinterpret_cast<uint4*>(dst);
#pragma unroll
  for (int k = 0; k < G / per; ++k) {
    float tmp[per];
#pragma unroll
    for (int i = 0; i < per; ++i) tmp[i] = f[k * per + i];
    store_grad_vec<T>(q + k, tmp, accumulate);
  }
}

// Elements per group: one 16-byte load of the narrower type.
template <class A, class B = A>
inline constexpr int vp_group = 16 / (sizeof(A) < sizeof(B) ? sizeof(A) : sizeof(B));

// Calls fn(xt, xs) on float arrays of a row pair's first `real` columns: groups of 16-byte loads where
// the rows are aligned (Vec), then single elements.
template <bool Vec, class TT, class ST, class F>
__device__ __forceinline__ void vp_for_pairs(const TT* t, const ST* s, long long real, F&& fn) {
  long long c0 = 0;
  if constexpr (Vec) {
    constexpr int G = vp_group<TT, ST>;
    const long long ng = real / G;
    for (long long gi = threadIdx.x; gi < ng; gi += blockDim.x) {
      float xt[G], xs[G];
      vp_load<TT, G>(t + gi * G, xt);
      vp_load<ST, G>(s + gi * G, xs);
      fn(xt, xs);
    }
    c0 = ng * G;
  }
  for (long long c = c0 + threadIdx.x; c < real; c += blockDim.x) {
    const float xt[1] = {to_float(t[c])}, xs[1] = {to_float(s[c])};
    fn(xt, xs);
  }
}

// A running base-2 log-sum-exp with a weighted term under the same max: m, s = sum 2^(y - m),
// a = sum 2^(y - m) * d. The exponentials are computed once and serve both sums.
struct vp_acc {
  float m = -INFINITY, s = 0.f, a = 0.f;
  template <int G>
  __device__ __forceinline__ void add(const float (&y)[G], const float (&d)[G], bool with_term) {
    float vm = y[0];
#pragma unroll
    for (int i = 1; i < G; ++i) vm = fmaxf(vm, y[i]);
    if (vm > m) {
      const float f = fast_exp2(m - vm);  // 0 on the first group (m = -inf)
      s *= f;
      a *= f;
      m = vm;
    }
    float ts = 0.f, ta = 0.f;
#pragma unroll
    for (int i = 0; i < G; ++i) {
      const float e = fast_exp2(y[i] - m);
      ts += e;
      if (with_term) ta = fmaf(e, d[i], ta);
    }
    s += ts;  // a NaN input reaches s through e (fmaxf alone would drop it)
    a += ta;
  }
  __device__ static vp_acc combine(vp_acc x, vp_acc y) {
    const float m = fmaxf(x.m, y.m);
    if (m == -INFINITY) return {m, x.s + y.s, x.a + y.a};
    const float fx = fast_exp2(x.m - m), fy = fast_exp2(y.m - m);
    return {m, x.s * fx + y.s * fy, x.a * fx + y.a * fy};
  }
};

__device__ inline vp_acc vp_warp(vp_acc v) {
  for (int o = 16; o > 0; o >>= 1) {
    const vp_acc w{__shfl_xor_sync(0xffffffffu, v.m, o), __shfl_xor_sync(0xffffffffu, v.s, o), __shfl_xor_sync(0xffffffffu, v.a, o)};
    v = vp_acc::combine(v, w);
  }
  return v;
}

// The block's combination of every thread's accumulator, in double, on thread 0 (fixed order).
struct vp_total {
  double m, s, a;
};
__device__ inline vp_total vp_block(vp_acc v, float3* sh) {
  v = vp_warp(v);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  __syncthreads();
  if (lane == 0) sh[warp] = make_float3(v.m, v.s, v.a);
  __syncthreads();
  vp_total t{-INFINITY, 0.0, 0.0};
  if (threadIdx.x == 0)
    for (int w = 0; w < static_cast<int>(blockDim.x / 32); ++w) {
      const double m = fmax(t.m, static_cast<double>(sh[w].x));
      if (m == -INFINITY) {
        t.s += sh[w].y;
        t.a += sh[w].z;
        continue;
      }
      const double ft = exp2(t.m - m), fw = exp2(static_cast<double>(sh[w].x) - m);
      t = {m, t.s * ft + sh[w].y * fw, t.a * ft + sh[w].z * fw};
    }
  return t;
}

// Pass 1, KD: both log-sum-exps and the mode's term, one read of the slice. Each model's scaled logits are
// taken from a per-row reference, this rank's first column (rt, rs; 0 where it is not finite or huge), in one
// FFMA: y - r = x * sc - r keeps the product exact and rounds at the size of y - r, not of y. So the
// weighting side's term d = (yt - rt) - (ys - rs) carries no offset between the two models' logits, and
// neither log-sum-exp is rounded at the logits' size; rt and rs are added back in double (the maxima
// and the term's sum). Against long double (a float emulation of this order, kd_lse_rounding: 1,019 to
// 151,936 columns, 1-4 ranks, student = 0.9 teacher + offset + noise) the value errs by 2e-7 to 2.3e-6
// relative at offsets 0-400, where scaled logits rounded at their own size erred by 6e-6 to 1.9e-4 at
// offsets 30-400 (benchmarks/NOTES.md, session 9).
template <int Mode, bool Vec, class TT, class ST>
__global__ void __launch_bounds__(kVpThreads) vp_kd_stats_kernel(const vp_params p) {
  __shared__ float3 sh[32];
  const long long r = blockIdx.x;
  const bool act = vp_active(p, r);
  const float sc = p.inv_temp * kLog2e;  // base-2 scaled logits
  const TT* t = static_cast<const TT*>(p.teacher) + r * p.t_stride;
  const ST* s = static_cast<const ST*>(p.student) + r * p.s_stride;
  vp_acc at, as;  // the term rides on the weighting side's accumulator
  // References only of a usable size (|r| <= 2^20, else 0, as for a non-finite first column): a scaled
  // logit that overflows float must still overflow after subtracting one, so that it is rejected as on
  // the other backends (a reference near 1e38 could bring it back into range).
  float rt = 0.f, rs = 0.f;
  if (act && p.real > 0) {
    rt = to_float(t[0]) * sc;
    rs = to_float(s[0]) * sc;
    if (!(fabsf(rt) <= 0x1p20f)) rt = 0.f;
    if (!(fabsf(rs) <= 0x1p20f)) rs = 0.f;
  }
  auto group = [&](const auto& xt, const auto& xs) {
    constexpr int G = sizeof(xt) / sizeof(float);
    float yt[G], ys[G], d[G];
#pragma unroll
    for (int i = 0; i < G; ++i) {
      yt[i] = lse_acc::strict(fmaf(xt[i], sc, -rt));
      ys[i] = lse_acc::strict(fmaf(xs[i], sc, -rs));
      d[i] = Mode == 1 ? yt[i] - ys[i] : ys[i] - yt[i];
    }
    at.add(yt, d, Mode == 1);
    as.add(ys, d, Mode == 2);
  };
  if (act) vp_for_pairs<Vec>(t, s, p.real, group);
  const vp_total tt = vp_block(at, sh);
  const vp_total ts = vp_block(as, sh);
  if (threadIdx.x == 0) {
    const bool bt = !isfinite(tt.s) || (Mode == 1 && !isfinite(tt.a)) || tt.m == INFINITY;
    const bool bs = !isfinite(ts.s) || (Mode == 2 && !isfinite(ts.a)) || ts.m == INFINITY;
    if (act && (bt || bs))
      atomicMin(p.error, encode_error(r, device_error::non_finite, bt ? device_tensor::teacher : device_tensor::student,
                                      p.component));
    const bool ok = act && !bt && !bs;
    double* mx = p.mx + 3 * r;
    // A slice with no column keeps -inf (its sums are 0): the rescale gives it no weight.
    mx[0] = ok ? tt.m + static_cast<double>(rt) : -INFINITY;
    mx[1] = ok ? ts.m + static_cast<double>(rs) : -INFINITY;
    mx[2] = act && !ok ? 1.0 : 0.0;
    p.loc[2 * r] = mx[0];
    p.loc[2 * r + 1] = mx[1];
    // The term in bits, the references' difference added back: sum w (y_w - y_o) = a + (r_w - r_o) s.
    const double dr = static_cast<double>(rt) - static_cast<double>(rs);
    double* su = p.sums + 3 * r;
    su[0] = ok ? tt.s : 0.0;
    su[1] = ok ? ts.s : 0.0;
    su[2] = !ok ? 0.0 : Mode == 1 ? tt.a + dr * tt.s : Mode == 2 ? ts.a - dr * ts.s : 0.0;
  }
}

// Pass 1, cross-entropy: the logits' log-sum-exp (raw logits: -inf is probability 0) and the label's
// logit where this slice holds it.
template <bool Vec, class ST>
__global__ void __launch_bounds__(kVpThreads) vp_ce_stats_kernel(const vp_params p) {
  __shared__ float3 sh[32];
  const long long r = blockIdx.x;
  const bool act = vp_active(p, r);
  const ST* s = static_cast<const ST*>(p.student) + r * p.s_stride;
  vp_acc acc;
  if (act) {
    long long c0 = 0;
    if constexpr (Vec) {
      constexpr int G = vp_group<ST>;
      const long long ng = p.real / G;
      for (long long gi = threadIdx.x; gi < ng; gi += blockDim.x) {
        float x[G];
        vp_load<ST, G>(s + gi * G, x);
#pragma unroll
        for (int i = 0; i < G; ++i) x[i] *= kLog2e;
        acc.add(x, x, false);
      }
      c0 = ng * G;
    }
    for (long long c = c0 + threadIdx.x; c < p.real; c += blockDim.x) {
      const float x[1] = {to_float(s[c]) * kLog2e};
      acc.add(x, x, false);
    }
  }
  const vp_total tot = vp_block(acc, sh);
  if (threadIdx.x == 0) {
    const bool bad = act && (!isfinite(tot.s) || tot.m == INFINITY);
    if (bad) atomicMin(p.error, encode_error(r, device_error::non_finite, device_tensor::student, p.component));
    const bool ok = act && !bad;
    double* mx = p.mx + 3 * r;
    mx[0] = ok ? tot.m : -INFINITY;
    mx[1] = -INFINITY;
    mx[2] = bad ? 1.0 : 0.0;
    p.loc[2 * r] = mx[0];
    p.loc[2 * r + 1] = -INFINITY;
    const long long y = ok ? static_cast<long long>(p.labels[r]) - p.offset : -1;
    double* su = p.sums + 3 * r;
    su[0] = ok ? tot.s : 0.0;
    su[1] = 0.0;
    su[2] = (y >= 0 && y < p.real) ? static_cast<double>(to_float(s[y])) : 0.0;
  }
}

// Between the two collectives: this rank's sums, taken relative to its own maxima, rescaled to the
// group's maxima (2^(local - global); 0 for a slice with no column).
__global__ void vp_rescale_kernel(const vp_params p) {
  for (long long r = blockIdx.x * static_cast<long long>(blockDim.x) + threadIdx.x; r < p.rows;
       r += static_cast<long long>(gridDim.x) * blockDim.x) {
    const double* mx = p.mx + 3 * r;
    const double* lo = p.loc + 2 * r;
    double* su = p.sums + 3 * r;
    const double f0 = lo[0] == -INFINITY ? 0.0 : exp2(lo[0] - mx[0]);
    const double f1 = lo[1] == -INFINITY ? 0.0 : exp2(lo[1] - mx[1]);
    su[0] *= f0;
    su[1] *= f1;
    if (p.mode == 1) su[2] *= f0;
    else if (p.mode == 2) su[2] *= f1;
  }
}

// The group's base-2 lse of column k (0 teacher / logits, 1 student) of row r, after the collectives: the
// float the sweeps subtract, and how far it lies above the exact (double) lse, in bits (a sweep's
// 2^(y - value) is the probability times 2^-excess). Float gradients of forward and reverse KL take the
// excess back (lse_fold, kd/cuda/detail/reduce.cuh).
struct vp_lse {
  float value = 0.f;
  double excess = 0.0;
};
__device__ inline vp_lse vp_lse2(const vp_params& p, long long r, int k) {
  const double exact = p.mx[3 * r + k] + log2(p.sums[3 * r + k]);
  const float value = static_cast<float>(exact);
  return {value, static_cast<double>(value) - exact};
}

// Pass 2 (JSD, skew KL, TVD) subtracts the float lse's (vp_lse2): its row sum is off by their rounding's
// gap in bits times divergence_math::lse_gap_weight (skew KL 1 - a; here the exact values are the
// doubles), added back once per row after the all-reduce. Forward and reverse KL's value is formed in
// double from pass 1 (vp_kl_row).
__device__ inline double vp_lse_gap_bits(const vp_params& p, long long r) {
  return vp_lse2(p, r, 0).excess - vp_lse2(p, r, 1).excess;
}

// Forward / reverse KL of row r from the pass-1 sums (all in bits; the result in natural log units):
//   KL = E_w[y_w - y_o] - lse_w + lse_o.
__device__ inline double vp_kl_row(const vp_params& p, long long r) {
  const double* mx = p.mx + 3 * r;
  const double* su = p.sums + 3 * r;
  const double lt = mx[0] + log2(su[0]), ls = mx[1] + log2(su[1]);
  const double bits = p.mode == 1 ? su[2] / su[0] - lt + ls : su[2] / su[1] - ls + lt;
  return bits * static_cast<double>(kLn2);
}

// Pass 2 (JSD, skew KL, TVD): the row's divergence terms and sum q * dD/dq over this slice.
template <class D, bool Vec, class TT, class ST>
__global__ void __launch_bounds__(kVpThreads) vp_kd_terms_kernel(const vp_params p) {
  __shared__ double sh[32];
  const long long r = blockIdx.x;
  const bool use = vp_active(p, r) && p.mx[3 * r + 2] == 0.0;
  double loss = 0.0, cq = 0.0;
  if (use) {
    const TT* t = static_cast<const TT*>(p.teacher) + r * p.t_stride;
    const ST* s = static_cast<const ST*>(p.student) + r * p.s_stride;
    const float sc = p.inv_temp * kLog2e, lt = vp_lse2(p, r, 0).value, ls = vp_lse2(p, r, 1).value;
    ::kd::detail::divergence_math<D, float> math;
    math.param = p.param;
    float fl = 0.f, fc = 0.f;
    auto group = [&](const auto& xt, const auto& xs) {
      constexpr int G = sizeof(xt) / sizeof(float);
#pragma unroll
      for (int i = 0; i < G; ++i) {
        const float l2p = xt[i] * sc - lt, l2q = xs[i] * sc - ls;
        const float pj = fast_exp2(l2p), qj = fast_exp2(l2q), lp = l2p * kLn2, lq = l2q * kLn2;
        fl += math.term(pj, lp, qj, lq);
        fc = fmaf(qj, math.dq(pj, lp, qj, lq), fc);
      }
    };
    vp_for_pairs<Vec>(t, s, p.real, group);
    loss = fl;
    cq = fc;
  }
  loss = block_sum_double(loss, sh);
  cq = block_sum_double(cq, sh);
  if (threadIdx.x == 0) {
    p.terms[2 * r] = loss;
    p.terms[2 * r + 1] = cq;
  }
}

__device__ inline float vp_divisor(const vp_params& p) {
  return static_cast<float>(loss_divisor(p.divisor_dev, p.divisor));
}

// G elements of a row from column c (a multiple of G): one vector load when all are real columns, else
// element by element with 0 past `real`.
template <class T, int G>
__device__ __forceinline__ void vp_load_upto(const T* row, long long c, long long real, float (&x)[G]) {
  if (c + G <= real) {
    vp_load<T, G>(row + c, x);
    return;
  }
#pragma unroll
  for (int i = 0; i < G; ++i) x[i] = c + i < real ? to_float(row[c + i]) : 0.f;
}

// Writes a gradient row: group(c, v) gives the G values from column c (< real; values past real must be 0),
// one(c) the value of column c < real; the other columns and the rows not used get 0 (nothing is written
// where accumulating would add 0).
template <bool Vec, int G, class GT, class Group, class One>
__device__ __forceinline__ void vp_write_row(GT* g, long long cols, long long real, bool use, bool accumulate, Group&& group,
                                             One&& one) {
  long long c0 = 0;
  if constexpr (Vec) {
    const long long ng = cols / G;
    for (long long gi = threadIdx.x; gi < ng; gi += blockDim.x) {
      const long long c = gi * G;
      float v[G];
      if (use && c < real) {
        group(c, v);
      } else {
        if (accumulate) continue;
#pragma unroll
        for (int i = 0; i < G; ++i) v[i] = 0.f;
      }
      vp_store<GT, G>(g + c, v, accumulate);
    }
    c0 = ng * G;
  }
  for (long long c = c0 + threadIdx.x; c < cols; c += blockDim.x) {
    if (accumulate && (!use || c >= real)) continue;
    float v = use && c < real ? one(c) : 0.f;
    if (accumulate) v += to_float(g[c]);
    g[c] = from_float<GT>(v);
  }
}

// The last pass, KD: the slice's gradient (zero off the real columns and on skipped rows) and the row's loss.
//   forward KL: q - p;  otherwise q * (dD/dq - sum_k q_k dD/dq_k)  (reverse KL: dD/dq - sum = lq - lp - KL).
template <class D, bool Vec, class TT, class ST, class GT>
__global__ void __launch_bounds__(kVpThreads) vp_kd_grad_kernel(const vp_params p) {
  const long long r = blockIdx.x;
  const bool use = vp_active(p, r) && p.mx[3 * r + 2] == 0.0;
  constexpr int Mode = vp_mode<D>;
  double row = !use ? 0.0 : Mode != 0 ? vp_kl_row(p, r) : p.terms[2 * r];
  using M = ::kd::detail::divergence_math<D, double>;
  if constexpr (Mode == 0 && M::has_lse_gap)  // after the all-reduce: once per row, the same on every rank
    if (use) row += M{p.param}.lse_gap_weight() * vp_lse_gap_bits(p, r) * static_cast<double>(kLn2);
  if (threadIdx.x == 0) p.partial[r] = use ? static_cast<float>(row * p.loss_scale) : 0.f;
  if (!p.want_grad) return;
  const TT* t = static_cast<const TT*>(p.teacher) + r * p.t_stride;
  const ST* s = static_cast<const ST*>(p.student) + r * p.s_stride;
  GT* g = static_cast<GT*>(p.grad) + r * p.g_stride;
  const float sc = p.inv_temp * kLog2e;
  const vp_lse tl = use ? vp_lse2(p, r, 0) : vp_lse{}, sl = use ? vp_lse2(p, r, 1) : vp_lse{};
  const float lt = tl.value, ls = sl.value;
  const float factor = p.grad_base / vp_divisor(p);
  float cq = Mode == 2 ? static_cast<float>(row) : Mode == 0 && use ? static_cast<float>(p.terms[2 * r + 1]) : 0.f;
  // Float gradients of forward and reverse KL: q and p scaled back by the lse's rounding, and reverse KL's
  // row constant (exact, from pass 1) moved by the gap that the sweep's l2q - l2p carries.
  float fq = factor, fp = factor;
  if constexpr (lse_fold<GT> && Mode != 0) {
    if (use) {
      fq = static_cast<float>(factor * exp2(sl.excess));
      fp = static_cast<float>(factor * exp2(tl.excess));
      if constexpr (Mode == 2) cq = static_cast<float>(row + (tl.excess - sl.excess) * static_cast<double>(kLn2));
    }
  }
  ::kd::detail::divergence_math<D, float> math;
  math.param = p.param;
  auto value = [&](float xt, float xs, long long c) {
    if (!use || c >= p.real) return 0.f;
    const float l2p = xt * sc - lt, l2q = xs * sc - ls;
    const float pj = fast_exp2(l2p), qj = fast_exp2(l2q);
    if constexpr (Mode == 1) return lse_fold<GT> ? fmaf(fq, qj, -(fp * pj)) : (qj - pj) * factor;
    else if constexpr (Mode == 2) return fq * qj * ((l2q - l2p) * kLn2 - cq);
    else return factor * qj * (math.dq(pj, l2p * kLn2, qj, l2q * kLn2) - cq);
  };
  if (p.accumulate && !use) return;  // nothing to add
  constexpr int G = vp_group<TT, ST> > vp_group<GT> ? vp_group<TT, ST> : vp_group<GT>;
  vp_write_row<Vec, G>(
      g, p.cols, p.real, use, p.accumulate,
      [&](long long c, float (&v)[G]) {
        float xt[G], xs[G];
        vp_load_upto<TT, G>(t, c, p.real, xt);
        vp_load_upto<ST, G>(s, c, p.real, xs);
#pragma unroll
        for (int i = 0; i < G; ++i) v[i] = value(xt[i], xs[i], c + i);
      },
      [&](long long c) { return value(to_float(t[c]), to_float(s[c]), c); });
}

// The last pass, cross-entropy: the slice's gradient and the row's cross-entropy and lse^2.
template <bool Vec, class ST, class GT>
__global__ void __launch_bounds__(kVpThreads) vp_ce_grad_kernel(const vp_params p) {
  const long long r = blockIdx.x;
  const bool use = vp_active(p, r) && p.mx[3 * r + 2] == 0.0;
  const vp_lse l2 = use ? vp_lse2(p, r, 0) : vp_lse{};
  const float lse2 = l2.value, lse = lse2 * kLn2;
  if (threadIdx.x == 0) {
    p.partial[r] = use ? lse - static_cast<float>(p.sums[3 * r + 2]) : 0.f;
    p.partial_z[r] = use ? lse * lse : 0.f;
  }
  if (!p.want_grad) return;
  if (p.accumulate && !use) return;
  const ST* s = static_cast<const ST*>(p.student) + r * p.s_stride;
  GT* g = static_cast<GT*>(p.grad) + r * p.g_stride;
  const float d = vp_divisor(p), gs = p.grad_base / d;
  float zfac = gs + p.z_weight / d * 2.f * lse;
  if constexpr (lse_fold<GT>)  // float gradients: softmax scaled back by the lse's rounding
    if (use) zfac = static_cast<float>(zfac * exp2(l2.excess));
  const long long y = use ? static_cast<long long>(p.labels[r]) - p.offset : -1;
  auto value = [&](float x, long long c) {
    if (!use || c >= p.real) return 0.f;
    return fast_exp2(x * kLog2e - lse2) * zfac - (c == y ? gs : 0.f);
  };
  constexpr int G = vp_group<ST> > vp_group<GT> ? vp_group<ST> : vp_group<GT>;
  vp_write_row<Vec, G>(
      g, p.cols, p.real, use, p.accumulate,
      [&](long long c, float (&v)[G]) {
        float x[G];
        vp_load_upto<ST, G>(s, c, p.real, x);
#pragma unroll
        for (int i = 0; i < G; ++i) v[i] = value(x[i], c + i);
      },
      [&](long long c) { return value(to_float(s[c]), c); });
}

// The slice, its gradient and the labels, as both losses bind them.
template <class ST, class GT, class Options>
void vp_bind(vp_params& p, const matrix_view<const ST>& x, const matrix_view<GT>& g, bool want_grad, const vocab_slice& slice,
             const Options& o, std::span<const std::int32_t> labels) {
  p.student = x.data;
  p.s_stride = x.stride;
  p.grad = want_grad ? static_cast<void*>(g.data) : nullptr;
  p.g_stride = want_grad ? g.stride : 0;
  p.rows = x.rows;
  p.cols = x.cols;
  p.real = ::kd::detail::local_real(slice, x.cols, o.vocab);
  p.offset = slice.offset;
  p.labels = labels.empty() ? nullptr : labels.data();
  p.ignore_index = o.ignore_index;
  p.label_vocab = o.vocab > 0 ? o.vocab : slice.vocab;
  p.want_grad = want_grad;
  p.accumulate = o.accumulate_grad;
}

// Scratch: mx [3n] | loc [2n] | sums [3n] | terms [2n] doubles | partial [n] | partial_z [n] floats | count.
inline status vp_scratch(context& ctx, long long n, vp_params& p, long long*& count) {
  const auto N = static_cast<std::size_t>(n);
  const std::size_t d = (10 * N * sizeof(double) + 255) / 256 * 256, f = (2 * N * sizeof(float) + 255) / 256 * 256;
  void* base = nullptr;
  KD_TRY(ctx.scratch(d + f + 256, base));
  auto* dd = static_cast<double*>(base);
  p.mx = dd;
  p.loc = dd + 3 * N;
  p.sums = dd + 5 * N;
  p.terms = dd + 8 * N;
  auto* ff = reinterpret_cast<float*>(static_cast<char*>(base) + d);
  p.partial = ff;
  p.partial_z = ff + N;
  count = reinterpret_cast<long long*>(static_cast<char*>(base) + d + f);
  return {};
}

// The collectives between pass 1 and the rest: the maxima and flags (max), the rescale, the sums (sum).
inline status vp_exchange_stats(vp_params& p, communicator& comm, cudaStream_t stream) {
  KD_TRY(comm.all_reduce(p.mx, static_cast<std::size_t>(3 * p.rows), reduce_op::max));
  const auto blocks = static_cast<unsigned>(std::min<long long>((p.rows + 255) / 256, 1024));
  vp_rescale_kernel<<<blocks, 256, 0, stream>>>(p);
  KD_CUDA_TRY(cudaGetLastError(), "vocab-parallel rescale kernel launch");
  return comm.all_reduce(p.sums, static_cast<std::size_t>(3 * p.rows), reduce_op::sum);
}

template <class D, bool Vec, class TT, class ST, class GT>
status vp_kd_passes(vp_params& p, communicator& comm, cudaStream_t stream) {
  if (p.rows == 0) return {};  // every rank has the same rows (agreed on by the validation)
  const auto grid = static_cast<unsigned>(p.rows);
  vp_kd_stats_kernel<vp_mode<D>, Vec, TT, ST><<<grid, kVpThreads, 0, stream>>>(p);
  KD_CUDA_TRY(cudaGetLastError(), "vocab_parallel_kd: stats kernel launch");
  KD_TRY(vp_exchange_stats(p, comm, stream));
  if constexpr (vp_mode<D> == 0) {
    vp_kd_terms_kernel<D, Vec, TT, ST><<<grid, kVpThreads, 0, stream>>>(p);
    KD_CUDA_TRY(cudaGetLastError(), "vocab_parallel_kd: terms kernel launch");
    KD_TRY(comm.all_reduce(p.terms, static_cast<std::size_t>(2 * p.rows), reduce_op::sum));
  }
  vp_kd_grad_kernel<D, Vec, TT, ST, GT><<<grid, kVpThreads, 0, stream>>>(p);
  KD_CUDA_TRY(cudaGetLastError(), "vocab_parallel_kd: gradient kernel launch");
  return {};
}

template <bool Vec, class ST, class GT>
status vp_ce_passes(vp_params& p, communicator& comm, cudaStream_t stream) {
  if (p.rows == 0) return {};
  const auto grid = static_cast<unsigned>(p.rows);
  vp_ce_stats_kernel<Vec, ST><<<grid, kVpThreads, 0, stream>>>(p);
  KD_CUDA_TRY(cudaGetLastError(), "vocab_parallel_cross_entropy: stats kernel launch");
  KD_TRY(vp_exchange_stats(p, comm, stream));
  vp_ce_grad_kernel<Vec, ST, GT><<<grid, kVpThreads, 0, stream>>>(p);
  KD_CUDA_TRY(cudaGetLastError(), "vocab_parallel_cross_entropy: gradient kernel launch");
  return {};
}

}  // namespace cuda::detail

// Vocabulary-parallel logit KD on the GPU: this rank's [rows x cols] slices in device memory, device
// labels (or none), the loss value into out (every rank gets the whole loss).
template <class Loss, class TT, class ST, class GT>
status vocab_parallel_kd(const cuda::backend& be, const Loss& loss, communicator& comm, vocab_slice slice,
                         matrix_view<TT> teacher_in, matrix_view<ST> student_in, std::span<const std::int32_t> labels,
                         cuda::device_loss& out, matrix_view<GT> dstudent, bool want_grad = true) {
  using namespace cuda::detail;
  using D = typename Loss::divergence;
  using G = std::remove_const_t<GT>;
  const auto& o = loss.options;
  const auto comp = ::kd::detail::component_or(o, "kd");
  const auto teacher = as_const(teacher_in);
  const auto student = as_const(student_in);
  status local = be.ctx == nullptr ? status{errc::invalid_argument, "the CUDA backend has no context"}
                 : out.value == nullptr ? status{errc::invalid_argument, "device_loss.value is null"}
                                        : ::kd::detail::validate_vocab_parallel_kd(loss, slice, teacher, student, labels,
                                                                                  false, dstudent, want_grad);
  KD_TRY(::kd::detail::with_component(::kd::detail::agree_on_call(comm, local, "vocab_parallel_kd"), comp));
  cuda::context& ctx = *be.ctx;
  const cudaStream_t stream = ctx.stream();
  const auto sc = ::kd::detail::make_kd_scaling<Loss::reduction_info.mean>(o, o.temperature, o.scale_by_t2);
  vp_params p;
  vp_bind(p, student, dstudent, want_grad, slice, o, labels);
  p.teacher = teacher.data;
  p.t_stride = teacher.stride;
  p.inv_temp = sc.inv_temp;
  p.loss_scale = static_cast<float>(sc.loss_scale);
  p.grad_base = static_cast<float>(sc.grad_base);
  if constexpr (Loss::divergence_info.uses_beta) p.param = static_cast<float>(o.beta);
  if constexpr (Loss::divergence_info.uses_alpha) p.param = static_cast<float>(o.alpha);
  p.component = ctx.component_slot(comp);
  KD_TRY(ctx.error_word(p.error));
  long long* count = nullptr;
  KD_TRY(vp_scratch(ctx, p.rows, p, count));
  bind_divisor(sc, p, p.labels != nullptr ? count : nullptr, p.rows);
  if (p.labels != nullptr) KD_TRY(launch_count_tokens(p.labels, p.rows, p.ignore_index, count, stream));
  p.mode = vp_mode<D>;
  const bool vec = rows_aligned(teacher) && rows_aligned(student) && (!want_grad || rows_aligned(dstudent));
  using TV = std::remove_const_t<TT>;  // the kernels' element types: storage types, never const-qualified
  using SV = std::remove_const_t<ST>;
  if (vec) KD_TRY((vp_kd_passes<D, true, TV, SV, G>(p, comm, stream)));
  else KD_TRY((vp_kd_passes<D, false, TV, SV, G>(p, comm, stream)));
  return launch_finish_loss(p.partial, p.rows, p.divisor_dev, p.divisor, p.labels != nullptr ? count : nullptr,
                            p.labels == nullptr ? p.rows : -1, out, stream);
}

// Vocabulary-parallel cross-entropy and z-loss on the GPU (device labels of the full vocabulary).
template <class Loss, class ST, class GT>
status vocab_parallel_cross_entropy(const cuda::backend& be, const Loss& loss, communicator& comm, vocab_slice slice,
                                    matrix_view<ST> logits_in, std::span<const std::int32_t> labels,
                                    cuda::device_cross_entropy& out, matrix_view<GT> dlogits, bool want_grad = true) {
  using namespace cuda::detail;
  using G = std::remove_const_t<GT>;
  const auto& o = loss.options;
  const auto comp = ::kd::detail::component_or(o, "lm");
  const auto logits = as_const(logits_in);
  status local = be.ctx == nullptr ? status{errc::invalid_argument, "the CUDA backend has no context"}
                 : out.ce == nullptr ? status{errc::invalid_argument, "device_cross_entropy.ce is null"}
                                     : ::kd::detail::validate_vocab_parallel_ce(loss, slice, logits, labels, false, dlogits,
                                                                               want_grad);
  KD_TRY(::kd::detail::with_component(::kd::detail::agree_on_call(comm, local, "vocab_parallel_cross_entropy"), comp));
  cuda::context& ctx = *be.ctx;
  const cudaStream_t stream = ctx.stream();
  vp_params p;
  vp_bind(p, logits, dlogits, want_grad, slice, o, labels);
  p.grad_base = static_cast<float>(o.grad_scale);
  p.z_weight = static_cast<float>(o.z_loss_weight);
  p.component = ctx.component_slot(comp);
  KD_TRY(ctx.error_word(p.error));
  long long* count = nullptr;
  KD_TRY(vp_scratch(ctx, p.rows, p, count));
  const auto kind = ::kd::detail::divisor_of<Loss::reduction_info.mean>(o);
  if (kind == ::kd::detail::divisor_kind::active_tokens) p.divisor_dev = count;
  else p.divisor = ::kd::detail::token_divisor(kind, o, 0);
  KD_TRY(launch_count_tokens(p.labels, p.rows, p.ignore_index, count, stream));
  p.mode = kVpCe;
  const bool vec = rows_aligned(logits) && (!want_grad || rows_aligned(dlogits));
  using SV = std::remove_const_t<ST>;
  if (vec) KD_TRY((vp_ce_passes<true, SV, G>(p, comm, stream)));
  else KD_TRY((vp_ce_passes<false, SV, G>(p, comm, stream)));
  KD_TRY(launch_finish_loss(p.partial, p.rows, p.divisor_dev, p.divisor, count, -1, cuda::device_loss{out.ce, out.tokens}, stream));
  if (out.z_loss != nullptr)
    KD_TRY(launch_finish_loss(p.partial_z, p.rows, p.divisor_dev, p.divisor, count, -1, cuda::device_loss{out.z_loss, nullptr}, stream));
  return {};
}

}  // namespace kd
