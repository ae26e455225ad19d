// kd/cuda/detail/storage.cuh: element conversions, aligned slice copies and the small helper kernels
// (token count, final loss reduction) shared by the CUDA losses.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <string>
#include <string_view>
#include <type_traits>

#include <kd/cuda/context.cuh>
#include <kd/cuda/detail/reduce.cuh>
#include <kd/core/numeric.hpp>
#include <kd/core/tensor.hpp>

namespace kd::cuda::detail {

// Per-block shared memory for a row slice: the context's slice_budget() picks the cluster size;
// kSliceLimit is the hard ceiling.
inline constexpr std::size_t kSliceLimit = 220 * 1024;

// The largest cluster of a row kernel whose entries (teacher and student slice together) take
// entry_bytes: 8 blocks, the portable size, or 16 for 8-byte entries (fp32 teacher and student), whose
// rows past ~75,000 columns would otherwise hold slices of up to 152 KB, one block an SM (V = 151,936).
// Sixteen is Hopper's non-portable cluster size: the planner checks that such clusters fit
// (context::allow_wide_clusters, max_active_clusters) and keeps 8 where they do not.
inline constexpr int kMaxRowCluster = 16;
inline constexpr int max_row_cluster(std::size_t entry_bytes) { return entry_bytes >= 8 ? kMaxRowCluster : 8; }

// Cluster size of a row kernel (logit_kd, cross_entropy): the smallest power of two (up to max_c blocks)
// whose per-block slice of `entries` x `entry_bytes` fits the context's slice budget. Other counts
// measured worse where they differ (H100, 2026-12-06, benchmarks/RESULTS.md session 19): 3 blocks at
// 50,304 bf16 columns and 7 at 128,256 ran JSD and TVD at 0.94-0.97x of 4 and 8 (forward and reverse KL
// 1.00-1.03x), 7 at 50,304 fp32 columns 0.85-0.94x of 8, and the vocab maps' kernels (the trainer's
// shape) 0.64-0.69x (CSR, 5 blocks for 8) and 0.81-0.91x (spans, 3 for 4).
// spread_rows: for a small call, doubled (up to 8) while the grid stays under half the SMs and each block
// keeps >= 4096 entries (below that the per-block fixed phases outweigh the shorter copy), so one row at
// N = 1 still spreads over 4-8 SMs. budget: the slice budget, 0 for the context's.
inline int row_cluster(context& ctx, long long entries, std::size_t entry_bytes, long long rows, bool spread_rows,
                       int max_c = 8, std::size_t budget = 0) {
  if (budget == 0) budget = ctx.slice_budget();
  int c = 1;
  while (c < max_c && static_cast<std::size_t>((entries + c - 1) / c) * entry_bytes > budget) c *= 2;
  if (spread_rows)
    while (c < 8 && rows * c * 2 <= ctx.sm_count() && entries / (c * 2) >= 4096) c *= 2;
  return c;
}

// Threads of a row-slice block (logit_kd's per-row kernel, cross_entropy): 256 with up to 64 registers
// a thread (__launch_bounds__(256, 4)). Shared memory already holds these kernels at 3-4 blocks an SM
// (52-76 KB slices), so 512-thread blocks bought warps, not blocks, at 32 registers (spills of 68-116 B
// in JSD, skew KL, TVD, reverse KL and the CSR-mapped kernels). Every warp runs the block's
// straight-line code once (block reductions, cluster exchange, set-up: as many instructions as its
// sweeps at 512 threads, ncu, benchmarks/NOTES.md session 15), so half the warps a block halve that
// share. With pass 1 around the block's maxima (slice_pair_lse) it measured 1.05-1.08x on forward KL,
// 1.07-1.13x reverse KL, 1.12-1.20x JSD, 1.05-1.16x skew KL and TVD, 1.00-1.07x cross-entropy at
// V >= 50,304 (H100, 2026-12-06, same-run A/B, benchmarks/RESULTS.md session 18).
inline constexpr int kRowSliceThreads = 256;

// kd::half / kd::bfloat16 share the bit layout of __half / __nv_bfloat16 (kd/core/numeric.hpp).
static_assert(sizeof(__half) == sizeof(kd::half) && sizeof(__nv_bfloat16) == sizeof(kd::bfloat16));

template <class T>
__device__ __forceinline__ float to_float(T v) {
  if constexpr (std::is_same_v<T, kd::half>) return __half2float(__ushort_as_half(v.bits));
  else if constexpr (std::is_same_v<T, kd::bfloat16>) return __uint_as_float(static_cast<unsigned>(v.bits) << 16);
  else return static_cast<float>(v);
}
template <class T>
__device__ __forceinline__ T from_float(float f) {
  if constexpr (std::is_same_v<T, kd::half>) return kd::half::from_bits(__half_as_ushort(__float2half_rn(f)));
  else if constexpr (std::is_same_v<T, kd::bfloat16>) return kd::bfloat16::from_bits(__bfloat16_as_ushort(__float2bfloat16_rn(f)));
  else return static_cast<T>(f);
}

// 16-byte vectors of storage elements, unpacked to / packed from floats.
template <class T>
inline constexpr int vec_n = 16 / sizeof(T);

template <class T>
__device__ __forceinline__ void unpack(const uint4& v, float (&f)[vec_n<T>]) {
  // A const-qualified T would miss the bfloat16 / half branches below and read the bits as floats.
  static_assert(std::is_same_v<T, std::remove_cv_t<T>>, "unpack takes the storage type itself, not a const-qualified one");
  const unsigned w[4] = {v.x, v.y, v.z, v.w};
  if constexpr (std::is_same_v<T, kd::bfloat16>) {
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      f[2 * i] = __uint_as_float(w[i] << 16);
      f[2 * i + 1] = __uint_as_float(w[i] & 0xffff0000u);
    }
  } else if constexpr (std::is_same_v<T, kd::half>) {
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const float2 x = __half22float2(*reinterpret_cast<const __half2*>(&w[i]));
      f[2 * i] = x.x;
      f[2 * i + 1] = x.y;
    }
  } else {
#pragma unroll
    for (int i = 0; i < 4; ++i) f[i] = __uint_as_float(w[i]);
  }
}

template <class T>
__device__ __forceinline__ uint4 pack(const float (&f)[vec_n<T>]) {
  static_assert(std::is_same_v<T, std::remove_cv_t<T>>, "pack takes the storage type itself, not a const-qualified one");
  unsigned w[4];
  if constexpr (std::is_same_v<T, kd::bfloat16>) {
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const __nv_bfloat162 b = __floats2bfloat162_rn(f[2 * i], f[2 * i + 1]);
      w[i] = *reinterpret_cast<const unsigned*>(&b);
    }
  } else if constexpr (std::is_same_v<T, kd::half>) {
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const __half2 h = __floats2half2_rn(f[2 * i], f[2 * i + 1]);
      w[i] = *reinterpret_cast<const unsigned*>(&h);
    }
  } else {
#pragma unroll
    for (int i = 0; i < 4; ++i) w[i] = __float_as_uint(f[i]);
  }
  return make_uint4(w[0], w[1], w[2], w[3]);
}

// Writes one 16-byte vector of gradients, adding the values already there when accumulating.
template <class GT>
__device__ __forceinline__ void store_grad_vec(uint4* dst, float (&g)[vec_n<GT>], bool accumulate) {
  if (accumulate) {
    float old[vec_n<GT>];
    unpack<GT>(*dst, old);
#pragma unroll
    for (int k = 0; k < vec_n<GT>; ++k) g[k] += old[k];
  }
  *dst = pack<GT>(g);
}

// Copies n elements of a row slice into shared memory element by element (rows that are not 16-byte
// aligned, where bulk copies cannot be used), adding y = x * scale of each to a running base-2
// log-sum-exp (Strict: a y of -inf poisons it, see lse_acc::strict).
template <bool Strict = false, class T>
__device__ void copy_slice_with_lse(const T* __restrict__ src, T* __restrict__ dst, long long n, float scale,
                                    lse_acc& acc) {
  for (long long i = threadIdx.x; i < n; i += blockDim.x) {
    const T v = src[i];
    dst[i] = v;
    const float y = to_float(v) * scale;
    acc.add(Strict ? lse_acc::strict(y) : y);
  }
}

// Hopper bulk copies (cp.async.bulk, the TMA engine's 1-D form): one thread starts the copy of a
// whole row slice into shared memory and every thread waits on an mbarrier. The whole slice is in
// flight at once, which is what keeps HBM busy while other blocks on the SM compute (register-staged
// loads only keep a few vectors per thread in flight).
__device__ __forceinline__ unsigned smem_u32(const void* p) { return static_cast<unsigned>(__cvta_generic_to_shared(p)); }

__device__ __forceinline__ void mbar_init(unsigned long long* bar) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;" ::"r"(smem_u32(bar)));
  asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
}
__device__ __forceinline__ void mbar_expect_tx(unsigned long long* bar, unsigned bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(smem_u32(bar)), "r"(bytes) : "memory");
}
__device__ __forceinline__ void bulk_copy_g2s(void* dst, const void* src, unsigned bytes, unsigned long long* bar) {
  asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];" ::"r"(smem_u32(dst)),
               "l"(src), "r"(bytes), "r"(smem_u32(bar))
               : "memory");
}
__device__ __forceinline__ void mbar_wait(unsigned long long* bar, unsigned parity) {
  asm volatile(
      "{\n"
      ".reg .pred done;\n"
      "WAIT_%=:\n"
      "mbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\n"
      "@!done bra WAIT_%=;\n"
      "}\n" ::"r"(smem_u32(bar)),
      "r"(parity)
      : "memory");
}

// Orders this thread's earlier generic-proxy accesses of shared memory before later bulk copies into it
// (a ring slot that the threads wrote through registers, refilled by the copy engine).
__device__ __forceinline__ void fence_proxy_async_smem() { asm volatile("fence.proxy.async.shared::cta;" ::: "memory"); }

// Bytes of a slice that the bulk engine can move (a multiple of 16); the rest goes through registers.
template <class T>
__device__ __forceinline__ long long bulk_bytes(long long n) {
  return (n * static_cast<long long>(sizeof(T))) / 16 * 16;
}

// Starts the bulk copies of up to three slices (call from one thread, after mbar_init and a barrier); a
// slice of 0 bytes is skipped.
__device__ __forceinline__ void start_bulk(unsigned long long* bar, void* d0, const void* s0, long long b0, void* d1,
                                           const void* s1, long long b1, void* d2 = nullptr,
                                           const void* s2 = nullptr, long long b2 = 0) {
  mbar_expect_tx(bar, static_cast<unsigned>(b0 + b1 + b2));
  if (b0 > 0) bulk_copy_g2s(d0, s0, static_cast<unsigned>(b0), bar);
  if (b1 > 0) bulk_copy_g2s(d1, s1, static_cast<unsigned>(b1), bar);
  if (b2 > 0) bulk_copy_g2s(d2, s2, static_cast<unsigned>(b2), bar);
}

// Packed extremes of two 16-bit values (one HMNMX2 for two elements; NaN loses to a number, as fmaxf).
template <class T, bool Max>
__device__ __forceinline__ unsigned minmax2(unsigned a, unsigned b) {
  unsigned r;
  if constexpr (std::is_same_v<T, kd::bfloat16>) {
    if constexpr (Max) asm("max.bf16x2 %0, %1, %2;" : "=r"(r) : "r"(a), "r"(b));
    else asm("min.bf16x2 %0, %1, %2;" : "=r"(r) : "r"(a), "r"(b));
  } else {
    if constexpr (Max) asm("max.f16x2 %0, %1, %2;" : "=r"(r) : "r"(a), "r"(b));
    else asm("min.f16x2 %0, %1, %2;" : "=r"(r) : "r"(a), "r"(b));
  }
  return r;
}

// The thread's largest x (and smallest, Strict) over the slice elements it visits: thread_lse's first
// sweep. Arg (16-bit T): also where the largest x is, as an element index of the slice (-1 when the
// thread visits none; the first of equal ones in each packed lane). Each lane of the packed maximum
// remembers the last vector that raised it, two LOP3s and two SELs a vector of 8 elements; the element
// is found in that vector once, after the sweep.
template <bool Strict, bool Arg, class T>
struct extremes_acc {
  static_assert(!Arg || sizeof(T) == 2, "kd: thread_extremes tracks the argmax of 16-bit slices only");
  static constexpr bool Packed = sizeof(T) == 2;
  static constexpr unsigned kNegInf2 = std::is_same_v<T, kd::bfloat16> ? 0xff80ff80u : 0xfc00fc00u;
  unsigned mx = kNegInf2, mn = kNegInf2 ^ 0x80008000u;  // packed 16-bit lanes
  long long at_lo = -1, at_hi = -1;                    // Arg: the vector that last raised each lane of mx
  float hi = -INFINITY, lo = INFINITY;                 // 4-byte T
  __device__ __forceinline__ void add(const uint4& v, long long i) {
    if constexpr (Packed) {
      const unsigned nx = minmax2<T, true>(mx, minmax2<T, true>(minmax2<T, true>(v.x, v.y), minmax2<T, true>(v.z, v.w)));
      if constexpr (Arg) {
        const unsigned d = nx ^ mx;
        at_lo = (d & 0xffffu) != 0 ? i : at_lo;
        at_hi = (d >> 16) != 0 ? i : at_hi;
      }
      mx = nx;
      if constexpr (Strict) mn = minmax2<T, false>(mn, minmax2<T, false>(minmax2<T, false>(v.x, v.y), minmax2<T, false>(v.z, v.w)));
    } else {
      hi = fmaxf(hi, fmaxf(fmaxf(__uint_as_float(v.x), __uint_as_float(v.y)), fmaxf(__uint_as_float(v.z), __uint_as_float(v.w))));
      if constexpr (Strict)
        lo = fminf(lo, fminf(fminf(__uint_as_float(v.x), __uint_as_float(v.y)), fminf(__uint_as_float(v.z), __uint_as_float(v.w))));
    }
  }
  // After the vectors: the extremes as floats, the argmax's element (Arg), then the scalar tail.
  __device__ __forceinline__ void finish(const T* __restrict__ smem, long long n, float& hi_, float& lo_, long long* arg) {
    constexpr int vn = vec_n<T>;
    const long long nv = n / vn;
    if constexpr (Packed) {
      const auto lo_of = [](unsigned w) { return to_float(T::from_bits(static_cast<std::uint16_t>(w & 0xffffu))); };
      const auto hi_of = [](unsigned w) { return to_float(T::from_bits(static_cast<std::uint16_t>(w >> 16))); };
      hi = fmaxf(lo_of(mx), hi_of(mx));
      if constexpr (Strict) lo = fminf(lo_of(mn), hi_of(mn));
      if constexpr (Arg) {
        // The lane holding hi, then its element in that vector (bit-equal: minmax2 returns an input's bits).
        const bool upper = !(lo_of(mx) >= hi_of(mx));
        const long long at = upper ? at_hi : at_lo;
        *arg = -1;
        if (at >= 0) {
          const uint4 v = reinterpret_cast<const uint4*>(smem)[at];
          const unsigned w[4] = {v.x, v.y, v.z, v.w};
          const unsigned key = upper ? mx >> 16 : mx & 0xffffu;
          int k = 3;
#pragma unroll
          for (int j = 2; j >= 0; --j) k = ((upper ? w[j] >> 16 : w[j] & 0xffffu) == key) ? j : k;
          *arg = at * vn + 2 * k + (upper ? 1 : 0);
        }
      }
    }
    for (long long i = nv * vn + threadIdx.x; i < n; i += blockDim.x) {
      const float x = to_float(smem[i]);
      if constexpr (Arg)
        if (x > hi || *arg < 0) *arg = i;
      hi = fmaxf(hi, x);
      if constexpr (Strict) lo = fminf(lo, x);
    }
    hi_ = hi;
    lo_ = lo;
  }
};
template <bool Strict, bool Arg = false, class T>
__device__ __forceinline__ void thread_extremes(const T* __restrict__ smem, long long n, float& hi, float& lo,
                                                long long* arg = nullptr) {
  const long long nv = n / vec_n<T>;
  const uint4* s4 = reinterpret_cast<const uint4*>(smem);
  extremes_acc<Strict, Arg, T> e;
  for (long long i = threadIdx.x; i < nv; i += blockDim.x) e.add(s4[i], i);
  e.finish(smem, n, hi, lo, arg);
}
// thread_extremes of two slices of one storage type in one loop (a row pair's pass 1): one loop's
// address arithmetic, compare and branch for both.
template <bool Strict, bool Arg, class T>
__device__ __forceinline__ void pair_extremes(const T* __restrict__ a, const T* __restrict__ b, long long n, float& ha,
                                              float& la, float& hb, float& lb, long long* b_arg) {
  const long long nv = n / vec_n<T>;
  const uint4* a4 = reinterpret_cast<const uint4*>(a);
  const uint4* b4 = reinterpret_cast<const uint4*>(b);
  extremes_acc<Strict, false, T> ea;
  extremes_acc<Strict, Arg, T> eb;
  for (long long i = threadIdx.x; i < nv; i += blockDim.x) {
    ea.add(a4[i], i);
    eb.add(b4[i], i);
  }
  ea.finish(a, n, ha, la, nullptr);
  eb.finish(b, n, hb, lb, b_arg);
}

// This thread's sum of 2^(x * scale - m) over the slice elements it visits (16-byte vectors
// i = threadIdx.x + k * blockDim.x, then the scalar tail): one FFMA and one MUFU.EX2 an element, no
// branch or rescale (m is at least every y of the thread, or of its block: slice_pair_lse). Alternate
// elements go to two sums (s0, s1) for two dependency chains.
template <class T>
struct exp2_sum_acc {
  float scale, m, s0 = 0.f, s1 = 0.f;
  __device__ __forceinline__ void add(const uint4& v) {
    float f[vec_n<T>];
    unpack<T>(v, f);
#pragma unroll
    for (int k = 0; k < vec_n<T>; k += 2) {
      s0 += fast_exp2(fmaf(f[k], scale, -m));
      s1 += fast_exp2(fmaf(f[k + 1], scale, -m));
    }
  }
  // After the nv vectors: the scalar tail, and the sum.
  __device__ __forceinline__ float finish(const T* __restrict__ smem, long long nv, long long n) {
    for (long long i = nv * vec_n<T> + threadIdx.x; i < n; i += blockDim.x)
      s0 += fast_exp2(fmaf(to_float(smem[i]), scale, -m));
    return s0 + s1;
  }
};
template <class T>
__device__ __forceinline__ float thread_exp2_sum(const T* __restrict__ smem, long long n, float scale, float m) {
  const long long nv = n / vec_n<T>;
  const uint4* s4 = reinterpret_cast<const uint4*>(smem);
  exp2_sum_acc<T> e{scale, m};
  for (long long i = threadIdx.x; i < nv; i += blockDim.x) e.add(s4[i]);
  return e.finish(smem, nv, n);
}
// thread_exp2_sum of two slices of one storage type in one loop, each around its own m.
template <class T>
__device__ __forceinline__ void pair_exp2_sum(const T* __restrict__ a, const T* __restrict__ b, long long n, float scale,
                                              float ma, float mb, float& sa, float& sb) {
  const long long nv = n / vec_n<T>;
  const uint4* a4 = reinterpret_cast<const uint4*>(a);
  const uint4* b4 = reinterpret_cast<const uint4*>(b);
  exp2_sum_acc<T> ea{scale, ma}, eb{scale, mb};
  for (long long i = threadIdx.x; i < nv; i += blockDim.x) {
    ea.add(a4[i]);
    eb.add(b4[i]);
  }
  sa = ea.finish(a, nv, n);
  sb = eb.finish(b, nv, n);
}

// This thread's base-2 log-sum-exp of y = x * scale over the elements of a shared-memory slice it visits:
// a sweep for the thread's largest and smallest x (packed 16-bit min / max, two elements an
// instruction), then thread_exp2_sum around the largest. No per-element branch, rescale or -inf test:
// the online form took 9 instructions an element against 5 here (kd/loss/logit_kd.cuh's pass 1 and
// cross-entropy's). Strict: a y of -inf (x * scale overflowed, or x = -inf) poisons the sum with NaN,
// exactly where lse_acc::strict would (the smallest x gives the smallest y: scale > 0). NaN inputs reach
// the sum through their exponentials; a thread with no finite x keeps m = -inf (an empty accumulator,
// or NaN in s).
template <bool Strict, class T>
__device__ lse_acc thread_lse(const T* __restrict__ smem, long long n, float scale) {
  float hi, lo;
  thread_extremes<Strict>(smem, n, hi, lo);
  const float m = hi == -INFINITY ? 0.f : hi * scale;  // no finite x: 2^(x * scale) stays 0 (or NaN)
  lse_acc acc{hi == -INFINITY ? -INFINITY : m, thread_exp2_sum(smem, n, scale, m)};
  if constexpr (Strict)
    if (lo * scale == -INFINITY) acc.s = NAN;
  return acc;
}

// thread_lse of the student slice with reverse KL's weighted sum (lse_wacc) over the same elements:
// w = sum 2^(ys - m) ((ys - m) - (yt - mt)) with reference rt = mt, this thread's teacher maximum (its
// thread_lse's m over the teacher slice). Three instructions an element more than thread_lse (an FFMA
// for yt - mt, an FADD and an FFMA), in place of a sweep of loss terms.
template <bool Strict, class T, class TT>
__device__ lse_wacc thread_lse_weighted(const T* __restrict__ smem, const TT* __restrict__ teacher, long long n,
                                        float scale, float mt) {
  float hi, lo, s0 = 0.f, s1 = 0.f, w0 = 0.f, w1 = 0.f, m = 0.f, mt_ = 0.f;
  auto frame = [&] {
    m = hi == -INFINITY ? 0.f : hi * scale;
    mt_ = mt == -INFINITY ? m : mt;  // no finite teacher value here: the row is reported anyway
  };
  auto add = [&](float x, float t, float& s, float& w) {
    const float a = fmaf(x, scale, -m), e = fast_exp2(a);
    s += e;
    w = fmaf(e, a - fmaf(t, scale, -mt_), w);
  };
  if constexpr (std::is_same_v<T, TT>) {  // 16-byte vectors, in thread_extremes' order
    constexpr int vn = vec_n<T>;
    const long long nv = n / vn;
    const uint4* s4 = reinterpret_cast<const uint4*>(smem);
    const uint4* t4 = reinterpret_cast<const uint4*>(teacher);
    thread_extremes<Strict>(smem, n, hi, lo);
    frame();
    for (long long i = threadIdx.x; i < nv; i += blockDim.x) {
      float f[vn], g[vn];
      unpack<T>(s4[i], f);
      unpack<T>(t4[i], g);
#pragma unroll
      for (int k = 0; k < vn; k += 2) {
        add(f[k], g[k], s0, w0);
        add(f[k + 1], g[k + 1], s1, w1);
      }
    }
    for (long long i = nv * vn + threadIdx.x; i < n; i += blockDim.x) add(to_float(smem[i]), to_float(teacher[i]), s0, w0);
  } else {  // mixed storage (linear + KD's fp32 logits against a 16-bit teacher): element by element
    hi = -INFINITY;
    lo = INFINITY;
    for (long long i = threadIdx.x; i < n; i += blockDim.x) {
      const float x = to_float(smem[i]);
      hi = fmaxf(hi, x);
      lo = fminf(lo, x);
    }
    frame();
    for (long long i = threadIdx.x; i < n; i += blockDim.x) add(to_float(smem[i]), to_float(teacher[i]), s0, w0);
  }
  lse_wacc acc{hi == -INFINITY ? -INFINITY : m, s0 + s1, w0 + w1, mt_};
  if constexpr (Strict)
    if (lo * scale == -INFINITY) acc.s = NAN;
  return acc;
}

// After the bulk copy landed: copies the unaligned tail [from, n) through registers, then adds every
// element's y = x * scale to a base-2 log-sum-exp (thread_lse), reading shared memory in 16-byte vectors.
template <bool Strict = false, class T>
__device__ void lse_of_slice(const T* __restrict__ src, T* __restrict__ dst, long long n, long long from, float scale,
                             lse_acc& acc) {
  for (long long i = from + threadIdx.x; i < n; i += blockDim.x) dst[i] = src[i];
  __syncthreads();
  acc = lse_acc::combine(acc, thread_lse<Strict>(dst, n, scale));
}

// Pass 1 of a row pair (teacher and student slices, both bulk-copied; the per-row kernel's unmapped
// aligned rows): copies each slice's unaligned tail [from, n) through registers, then forms both
// slices' base-2 log-sum-exps of y = x * scale for the whole block, around the block's maxima: one
// FMNMX butterfly for the two maxima, the exponentials, one FADD butterfly for the two sums. Two
// block_lse calls (a butterfly of (m, s) pairs with two MUFU.EX2 and -inf guards a level, at warp and
// block level) cost every warp ~260 instructions a row slice, as much as its sweeps of ~31 entries a
// thread (ncu, H100, benchmarks/NOTES.md session 15); this form ~70. Every thread gets the block's
// accumulators t and s. Strict per thread, as thread_lse: a y of -inf poisons that thread's sum with
// NaN, and so the block's. A block with no finite x keeps m = -inf (s = 0, or NaN).
// SArg: s_arg gets the slice index of the student's largest x among this thread's elements
// (thread_extremes), -1 if none.
template <bool Strict, bool SArg = false, class TT, class ST>
__device__ void slice_pair_lse(const TT* __restrict__ tsrc, TT* __restrict__ tdst, long long tfrom,
                               const ST* __restrict__ ssrc, ST* __restrict__ sdst, long long sfrom, long long n,
                               float scale, float2* scratch, lse_acc& t, lse_acc& s, long long* s_arg = nullptr) {
  for (long long i = tfrom + threadIdx.x; i < n; i += blockDim.x) tdst[i] = tsrc[i];
  for (long long i = sfrom + threadIdx.x; i < n; i += blockDim.x) sdst[i] = ssrc[i];
  __syncthreads();
  float ht, lt, hs, ls;
  // One storage type: both slices in each loop (pair_extremes, pair_exp2_sum): one loop's address
  // arithmetic, compare and branch for two (with JSD's clamp in an FFMA, 1.00-1.08x across the per-row
  // losses, H100, benchmarks/RESULTS.md session 21).
  constexpr bool Pair = std::is_same_v<TT, ST>;
  if constexpr (Pair) {
    pair_extremes<Strict, SArg>(tdst, sdst, n, ht, lt, hs, ls, s_arg);
  } else {
    thread_extremes<Strict>(tdst, n, ht, lt);
    thread_extremes<Strict, SArg>(sdst, n, hs, ls, s_arg);
  }
  block_max2(ht, hs, scratch);
  const float mt = ht == -INFINITY ? 0.f : ht * scale, ms = hs == -INFINITY ? 0.f : hs * scale;
  float st, ss;
  if constexpr (Pair) {
    pair_exp2_sum(tdst, sdst, n, scale, mt, ms, st, ss);
  } else {
    st = thread_exp2_sum(tdst, n, scale, mt);
    ss = thread_exp2_sum(sdst, n, scale, ms);
  }
  if constexpr (Strict) {
    if (lt * scale == -INFINITY) st = NAN;
    if (ls * scale == -INFINITY) ss = NAN;
  }
  block_sum2(st, ss, scratch);
  t = lse_acc{ht == -INFINITY ? -INFINITY : mt, st};
  s = lse_acc{hs == -INFINITY ? -INFINITY : ms, ss};
}

template <class T>
bool rows_aligned(const kd::matrix_view<T>& v) {
  return reinterpret_cast<std::uintptr_t>(v.data) % 16 == 0 && (v.stride * sizeof(T)) % 16 == 0;
}

template <class T>
kd::status check_alignment(const T* ptr, const char* what, std::string_view component) {
  if (reinterpret_cast<std::uintptr_t>(ptr) % alignof(T) != 0)
    return {kd::errc::misaligned, std::string(what) + " is not aligned to its " + std::to_string(alignof(T)) +
                                      "-byte element type (component '" + std::string(component) + "')"};
  return {};
}

// Labels other than ignore_index among labels[0, n), counted by one block (every thread gets the count).
// Exact: per-thread counts stay far below 2^24.
__device__ inline float block_count_tokens(const std::int32_t* labels, long long n, int ignore_index, float* scratch) {
  float local = 0.f;
  for (long long i = threadIdx.x; i < n; i += blockDim.x) local += labels[i] != ignore_index ? 1.f : 0.f;
  return block_sum(local, scratch);
}

// Rows up to which a row kernel counts the labels' tokens in every block instead of after a count
// kernel: below it the re-reads are L2 hits worth less than the dependent launch they replace (1024
// labels are 4 KB per block; the rows themselves are >= 32,000 columns).
inline constexpr long long kInlineCountRows = 1024;

// The token divisor of a loss value and its gradient: when the divisor is the active tokens
// (divisor_dev non-null), their count, at least 1: the device count *divisor_dev, or `inline_count`
// when the kernel counted the labels itself (count_inline); else the host's value (1, rows or
// global_tokens). Every CUDA loss goes through it.
__device__ __forceinline__ double loss_divisor(const long long* divisor_dev, double host_divisor,
                                               bool count_inline = false, long long inline_count = 0) {
  if (divisor_dev == nullptr) return host_divisor;
  const long long count = count_inline ? inline_count : *divisor_dev;
  return static_cast<double>(count > 0 ? count : 1);
}

template <int = 0>  // a template: header-defined kernels must not clash across translation units
__global__ void count_tokens_kernel(const std::int32_t* labels, long long n, int ignore_index, long long* count) {
  __shared__ float scratch[32];
  const float total = block_count_tokens(labels, n, ignore_index, scratch);
  if (threadIdx.x == 0) *count = static_cast<long long>(total);
}

inline kd::status launch_count_tokens(const std::int32_t* labels, long long n, int ignore_index, long long* count,
                                      cudaStream_t stream) {
  count_tokens_kernel<><<<1, 1024, 0, stream>>>(labels, n, ignore_index, count);
  return cuda_status(cudaGetLastError(), "count_tokens kernel launch");
}

// Sums partial losses in a fixed order (deterministic), in double, and divides by the normalizer.
template <int = 0>
__global__ void finish_loss_kernel(const float* partial, long long n, const long long* divisor_dev, double divisor,
                                   const long long* count_dev, long long count_host, float* value, long long* tokens) {
  __shared__ double scratch[32];
  const double sum = block_sum_ordered(partial, n, scratch);
  if (threadIdx.x == 0) {
    *value = static_cast<float>(sum / loss_divisor(divisor_dev, divisor));
    if (tokens != nullptr) *tokens = count_dev != nullptr ? *count_dev : count_host;
  }
}

inline kd::status launch_finish_loss(const float* partial, long long n, const long long* divisor_dev, double divisor,
                                     const long long* count_dev, long long count_host, const device_loss& out,
                                     cudaStream_t stream) {
  finish_loss_kernel<><<<1, 1024, 0, stream>>>(partial, n, divisor_dev, divisor, count_dev, count_host, out.value,
                                             out.tokens);
  return cuda_status(cudaGetLastError(), "finish_loss kernel launch");
}

}  // namespace kd::cuda::detail
