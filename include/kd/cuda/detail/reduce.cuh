// kd/cuda/detail/reduce.cuh: warp, block and cluster reductions used by the row kernels.
#pragma once

#include <cuda_runtime.h>

#include <cmath>
#include <type_traits>

namespace kd::cuda::detail {

// 2^x in one MUFU.EX2 (flush-to-zero: results below 2^-126 are 0, far under any tolerance here). exp2f
// adds a denormal-safe range reduction around the same instruction; in these kernels the exponentials
// are most of the arithmetic, so the saving is what lets the math hide under the memory traffic.
__device__ __forceinline__ float fast_exp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

// log2(x) in one MUFU.LG2 and 1 / x in one MUFU.RCP (both flush subnormal inputs and outputs: callers
// pass normal numbers only).
__device__ __forceinline__ float fast_log2(float x) {
  float y;
  asm("lg2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}
__device__ __forceinline__ float fast_rcp(float x) {
  float y;
  asm("rcp.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

// a + b = fl(a + b) + err, exactly (TwoSum; __fadd_rn is never contracted or reordered).
__device__ inline float round_err(float a, float b) {
  const float sum = __fadd_rn(a, b), bb = __fsub_rn(sum, a);
  return __fadd_rn(__fsub_rn(a, __fsub_rn(sum, bb)), __fsub_rn(b, bb));
}

// A running log-sum-exp in base 2 (inputs are pre-multiplied by log2(e)): max m and sum s of
// 2^(y - m). Base 2 because exp2f is a single MUFU.EX2; combining two accumulators is exact.
struct lse_acc {
  float m = -INFINITY;
  float s = 0.f;

  __device__ void add(float y) {
    if (y > m) {
      s = s * fast_exp2(m - y) + 1.f;  // fast_exp2(-inf) = 0 on the first element
      m = y;
    } else {
      s += fast_exp2(y - m);
    }
  }
  __device__ static lse_acc combine(lse_acc a, lse_acc b) {
    const float m = fmaxf(a.m, b.m);
    // Both empty: keep the sums (0 + 0 for empty threads; NaN when a NaN or -inf input was added to an
    // accumulator whose max is still -inf, which must reach value() and report the row, not vanish).
    if (m == -INFINITY) return {m, a.s + b.s};
    return {m, a.s * fast_exp2(a.m - m) + b.s * fast_exp2(b.m - m)};
  }
  // For tempered logits: y = -inf means x / T overflowed float (the loss terms would be inf or NaN, while
  // the sum itself stays finite). Strict adds turn it into NaN, so value() is NaN and the row is
  // reported; a plain add keeps -inf as probability 0 (cross-entropy's raw logits).
  __device__ static float strict(float y) { return y == -INFINITY ? NAN : y; }
  // log2 of the sum.
  __device__ float value() const { return m + log2f(s); }
  // How far value() lies above m + log2f(s): its float rounding, exact (TwoSum). A sweep's 2^(y - value())
  // is the probability times 2^-excess(), for every entry of the row (kd/loss/logit_kd_math.cuh).
  __device__ float excess() const { return -round_err(m, log2f(s)); }
};

// Whether a kernel takes the float lse's rounding back out of its gradient (a factor common to the row,
// ~2^-24 |lse| ln 2: 4e-6 at logits 150 from zero, magnified ~10x by q - p of close distributions): where
// the gradient is stored in float. A 16-bit gradient rounds at 2^-9, far above it, and keeps the plain form.
template <class GT>
inline constexpr bool lse_fold = std::is_same_v<GT, float>;

// A student's log-sum-exp with the q-weighted sum of ys - yt riding on it (reverse KL's pass 1: the
// row's KL is known before any gradient sweep, so no sweep of loss terms and no second cluster sum).
// w = sum 2^(ys - m) ((ys - m) - (yt - rt)) around a teacher reference rt (the first sweep's teacher
// maximum), so a constant offset between teacher and student logits, which leaves the divergence
// unchanged, adds nothing to w: sum q (ys - yt) = w / s + m - rt. Two accumulators combine at the
// reference of the one with the larger max; the conversion adds ((m_a - m) + (rt - rt_a)) s_a, two
// differences of nearby maxima. Against fp64 (a float emulation, 32,000 entries, KL ~0.004-0.2 nats)
// this form is at least as accurate as summing q (log q - log p) entry by entry, and 45-600x more so
// when the student's logits sit 150-1000 away from the teacher's.
struct lse_wacc {
  float m = -INFINITY;
  float s = 0.f;
  float w = 0.f;
  float rt = 0.f;
  __device__ static lse_wacc combine(lse_wacc a, lse_wacc b) {
    const float m = fmaxf(a.m, b.m);
    if (m == -INFINITY) return {m, a.s + b.s, a.w + b.w, 0.f};  // both empty (or NaN: kept, as lse_acc)
    const float fa = fast_exp2(a.m - m), fb = fast_exp2(b.m - m);
    const float rt = a.m >= b.m ? a.rt : b.rt;
    // An empty side has s = w = 0 and scale 0; its reference is never used.
    const float wa = a.m == -INFINITY ? 0.f : (a.w + ((a.m - m) + (rt - a.rt)) * a.s) * fa;
    const float wb = b.m == -INFINITY ? 0.f : (b.w + ((b.m - m) + (rt - b.rt)) * b.s) * fb;
    return {m, a.s * fa + b.s * fb, wa + wb, rt};
  }
  __device__ lse_acc lse() const { return {m, s}; }
};

inline constexpr float kLog2e = 1.4426950408889634f;
inline constexpr float kLn2 = 0.6931471805599453f;

// Xor-butterfly reductions over each group of `width` lanes (a power of two up to 32; every group
// reduces its own lanes and all of its lanes get the result).
// Ordered (the log-sum-exp folds): each pair is combined as (lower lane's value, upper lane's value),
// so both partners, and so every lane of the group, get the same bits. Unordered, each lane combines
// (its own, its partner's): combine's products may then be contracted into FMAs differently in the two
// lanes, and lse_wacc picks the reference of its first argument on equal maxima. The sum needs no
// order (a + b rounds as b + a). Lanes are threadIdx.x mod 32 (1-D blocks, as the block reductions below).
__device__ inline float warp_sum(float v, unsigned width = 32) {
  for (unsigned o = width / 2; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}
template <bool Ordered = false>
__device__ inline lse_acc warp_lse(lse_acc a, unsigned width = 32) {
  for (unsigned o = width / 2; o > 0; o >>= 1) {
    const lse_acc b{__shfl_xor_sync(0xffffffffu, a.m, o), __shfl_xor_sync(0xffffffffu, a.s, o)};
    const bool upper = Ordered && (threadIdx.x & o) != 0;
    a = lse_acc::combine(upper ? b : a, upper ? a : b);
  }
  return a;
}
template <bool Ordered = false>
__device__ inline lse_wacc warp_lse_w(lse_wacc a, unsigned width = 32) {
  for (unsigned o = width / 2; o > 0; o >>= 1) {
    const lse_wacc b{__shfl_xor_sync(0xffffffffu, a.m, o), __shfl_xor_sync(0xffffffffu, a.s, o),
                     __shfl_xor_sync(0xffffffffu, a.w, o), __shfl_xor_sync(0xffffffffu, a.rt, o)};
    const bool upper = Ordered && (threadIdx.x & o) != 0;
    a = lse_wacc::combine(upper ? b : a, upper ? a : b);
  }
  return a;
}

// Block-wide reductions; every thread gets the result. `scratch` holds >= 32 entries.
__device__ inline float block_sum(float v, float* scratch) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = (blockDim.x + 31) >> 5;
  v = warp_sum(v);
  __syncthreads();  // scratch may still be read by a previous reduction
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  v = lane < warps ? scratch[lane] : 0.f;
  return warp_sum(v);
}
__device__ inline lse_acc block_lse(lse_acc a, float2* scratch) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = (blockDim.x + 31) >> 5;
  a = warp_lse(a);
  __syncthreads();
  if (lane == 0) scratch[warp] = make_float2(a.m, a.s);
  __syncthreads();
  lse_acc b;
  if (lane < warps) b = {scratch[lane].x, scratch[lane].y};
  return warp_lse(b);
}

// Block-wide maxima and sums of two values at once (a row pair's pass 1, slice_pair_lse in
// kd/cuda/detail/storage.cuh): plain FMNMX / FADD butterflies, where block_lse pays two exponentials and
// -inf guards a level. Every thread gets the results; `scratch` holds >= 32 entries. The second level
// is a full 32-lane butterfly: lanes past the warp count hold the identity, and a shorter butterfly
// would leave lanes 16-31 with only those (the bug of session 17, benchmarks/NOTES.md).
template <class Op>
__device__ inline void block_reduce2(float& a, float& b, float2* scratch, float identity, Op op) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = (blockDim.x + 31) >> 5;
  const auto butterfly = [&] {
    for (int o = 16; o > 0; o >>= 1) {
      a = op(a, __shfl_xor_sync(0xffffffffu, a, o));
      b = op(b, __shfl_xor_sync(0xffffffffu, b, o));
    }
  };
  butterfly();
  __syncthreads();  // scratch may still be read by a previous reduction
  if (lane == 0) scratch[warp] = make_float2(a, b);
  __syncthreads();
  const float2 v = lane < warps ? scratch[lane] : make_float2(identity, identity);
  a = v.x;
  b = v.y;
  butterfly();
}
__device__ inline void block_max2(float& a, float& b, float2* scratch) {
  block_reduce2(a, b, scratch, -INFINITY, [](float x, float y) { return fmaxf(x, y); });
}
__device__ inline void block_sum2(float& a, float& b, float2* scratch) {
  block_reduce2(a, b, scratch, 0.f, [](float x, float y) { return x + y; });
}

// (scratch: one entry per warp of the block)
__device__ inline lse_wacc block_lse_w(lse_wacc a, float4* scratch) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = (blockDim.x + 31) >> 5;
  a = warp_lse_w(a);
  __syncthreads();
  if (lane == 0) scratch[warp] = make_float4(a.m, a.s, a.w, a.rt);
  __syncthreads();
  lse_wacc b;
  if (lane < warps) b = {scratch[lane].x, scratch[lane].y, scratch[lane].z, scratch[lane].w};
  return warp_lse_w(b);
}

// A block sum of doubles in a fixed order (shuffles within each warp, then the warps' sums in turn):
// the same bits for the same inputs and block size on every launch. Every thread gets the total;
// `scratch` holds >= 32 doubles.
__device__ inline double block_sum_double(double v, double* scratch) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, warps = (blockDim.x + 31) >> 5;
  __syncthreads();  // scratch may still be read by a previous reduction
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  double t = 0.0;
  for (int w = 0; w < warps; ++w) t += scratch[w];
  return t;
}

// A block sum of n floats in double, in a fixed order (each thread a strided run, then
// block_sum_double), so a loss value is reproducible. Reads go through L2 (__ldcg): the partials may
// have been written by other blocks of this grid just before.
__device__ inline double block_sum_ordered(const float* v, long long n, double* scratch) {
  double s = 0.0;
  for (long long i = threadIdx.x; i < n; i += blockDim.x) s += static_cast<double>(__ldcg(v + i));
  return block_sum_double(s, scratch);
}

// True in the one block of a 1-D grid that arrives here last; call from every thread of every block
// after the block's partial results are stored. The ticket is zero between kernels (the last block
// resets it), so a loss kernel can end its own reduction without a second launch: at N <= 512 the
// finish kernel and its dependency were a third of a call (benchmarks/RESULTS.md, small calls).
__device__ inline bool last_block_of_grid(unsigned* ticket) {
  __shared__ unsigned last;
  __syncthreads();  // every partial of this block is stored
  if (threadIdx.x == 0) {
    __threadfence();  // ... and visible to the grid before this block takes its ticket
    last = atomicAdd(ticket, 1u) + 1u == gridDim.x ? 1u : 0u;
    if (last != 0u) {
      atomicExch(ticket, 0u);
      __threadfence();  // the other blocks' partials are read after their tickets
    }
  }
  __syncthreads();
  return last != 0u;
}

// The cluster barrier in two halves (barrier.cluster.arrive / wait): work placed between them overlaps
// the other blocks' arrival. Arrive releases this block's earlier shared-memory writes to the cluster;
// wait acquires theirs. Every thread of every block calls both, alternately.
__device__ __forceinline__ void cluster_arrive() { asm volatile("barrier.cluster.arrive.release.aligned;" ::: "memory"); }
// An arrive that orders nothing before it: for the kernels' first barrier, which only publishes mbarrier
// inits, and those through mbar_init's own fence.mbarrier_init.release.cluster (the release arrive
// compiled to MEMBAR.ALL.GPU and ERRBAR in every thread: 11% of JSD's stall samples, ncu, H100,
// benchmarks/RESULTS.md session 21).
__device__ __forceinline__ void cluster_arrive_relaxed() {
  asm volatile("barrier.cluster.arrive.relaxed.aligned;" ::: "memory");
}
__device__ __forceinline__ void cluster_wait() { asm volatile("barrier.cluster.wait.acquire.aligned;" ::: "memory"); }

}  // namespace kd::cuda::detail
