// kd/loss/linear_kd_on_chip.cuh: the kernels of linear + KD with the logits kept on chip
// (kd::linear_kd_path::on_chip; the launcher is loss_impl<cuda::backend, linear_kd_tag> in
// kd/loss/linear_kd.cuh, the CPU reference the chunked loop of kd/loss/linear_kd.hpp).
//
// A CTA owns a tile of 128 tokens and a range of the vocabulary's 128-entry tiles (a split: the grid is
// token tiles x splits, ~8 CTAs per SM at any N). For each vocabulary tile it forms the 128 x 128 student
// logits h W^T on the tensor cores (mma.sync m16n8k16, fp32 accumulation; operands streamed over the
// hidden width, 64 columns a stage, through two cp.async stages), and with a kd::teacher_head the
// teacher's tile likewise (else it reads the teacher's logits of the tile). Nothing of a tile is written:
//   1. stats:  each row's base-2 log-sum-exps of teacher and student (per split, combined by a row kernel
//              that also checks labels and finiteness);
//   2. terms:  (divergences with a row sum: all but forward KL) each row's loss terms and C = sum q dD/dq,
//              the entries of kd/loss/logit_kd_math.cuh, per split, then summed per row;
//   3. grad:   the tile again, its gradient dL/dz (forward KL's loss terms too) rounded to the storage
//              type into shared memory, then dhidden[tile] += G W[tile] and dW[tile] += G^T h[tile] over
//              64-column chunks of the hidden width, added to fp32 accumulators with 16-byte atomics.
// So the logits are formed 2 (forward KL) or 3 times and the head's GEMM work is 4 or 5 units of
// 2 N V d, against 3 for the chunked path, which writes and reads chunk x V fp32 logits instead.
// The gradient enters its two GEMMs as the chunked path's dlogits do (rounded to the storage type),
// times 2^k for fp16 (the power of two that brings grad_scale T to [256, 512): fp16's range then holds
// every entry's |q (dD/dq - C)| up to 128), and the division by the token count is applied to the fp32
// sums. Accumulating by atomics makes dhidden and dW sums in an arbitrary order (float rounding only).
// What it buys and what bounds it (H100 SXM, 2026-12-05, bf16, T = 2, benchmarks/RESULTS.md session 13):
// extra memory 317 MB against the chunked path's 1,872 at 8192 x 128,256 x 576 (372 against 3,462 with a
// 152k teacher head), at 3.2x its time (34.4 ms against 10.8). ncu (8192 x 128,256 x 576): the grad
// kernel holds the L2 at 75% of its peak, most of it the fp32 atomic adds of dhidden and dW (1.8 G
// sectors: every (token tile, vocabulary tile) pair adds 128 x d to each), with the tensor pipe at 25% of
// its active cycles; the stats kernel's tensor pipe is at 29%, its warps waiting on global loads and on
// mma results (long scoreboard 2.7, wait 2.0 cycles per issue) with two CTAs (16 warps) per SM. What the
// design needs to be fast (benchmarks/NOTES.md): dW and dhidden held on chip across tiles (a cluster
// owning a wide vocabulary tile, distributed shared memory), wgmma fed by TMA.
#pragma once

#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <type_traits>

#include <kd/cuda/context.cuh>
#include <kd/cuda/detail/mma.cuh>
#include <kd/cuda/detail/reduce.cuh>
#include <kd/cuda/detail/storage.cuh>
#include <kd/loss/divergence.hpp>
#include <kd/loss/logit_kd_math.cuh>

namespace kd::cuda::detail {

inline constexpr int kOcTile = 128;     // tokens and vocabulary entries of a logits tile
inline constexpr int kOcK = 64;         // hidden columns per stage of the logits GEMM
inline constexpr int kOcStages = 2;     // cp.async ring depth of the logits GEMM (two CTAs per SM instead)
inline constexpr int kOcThreads = 256;  // 8 warps: 2 (tokens) x 4 (vocabulary), a 64 x 32 piece each
inline constexpr int kOcChunk = 64;     // hidden columns per step of the two gradient GEMMs
// Shared-memory pitches, padded by 16 bytes: the 8 rows an ldmatrix phase reads fall on 8 bank groups.
inline constexpr int kOcPitch = kOcK + 8;
inline constexpr int kOcGPitch = kOcTile + 8;
inline constexpr int kOcCPitch = kOcChunk + 8;
inline constexpr std::size_t kOcStageBytes = std::size_t{kOcStages} * 2 * kOcTile * kOcPitch * 2;
inline constexpr std::size_t kOcRowBytes = std::size_t{kOcTile} * (16 + 4);
inline constexpr std::size_t kOcGBytes = std::size_t{kOcTile} * kOcGPitch * 2;
inline constexpr std::size_t kOcChunkBytes = std::size_t{2} * 2 * kOcTile * kOcCPitch * 2;
// The grad kernel's chunk buffers reuse the stages (the logits GEMM is done when they fill).
static_assert(kOcChunkBytes <= kOcStageBytes, "kd: the gradient GEMMs' chunk buffers must fit the logits GEMM's stages");
inline constexpr std::size_t kOcGradSmem = kOcStageBytes + kOcRowBytes + kOcGBytes;
// Two CTAs per SM where the registers allow (the teacher-head kernels hold two logits tiles: one).
template <bool Head>
inline constexpr int kOcMinBlocks = Head ? 1 : 2;

struct on_chip_params {
  const void* h = nullptr;  // student hidden [n x d] and head [v x d], one 16-bit type, contiguous
  const void* w = nullptr;
  int d = 0;
  const void* t = nullptr;  // teacher logits [n x >= support] (row stride t_stride), or null with:
  long long t_stride = 0;
  bool t_pairs = false;     // the teacher's rows allow pair loads (even stride, pair-aligned base)
  const void* th = nullptr;  // teacher hidden [n x dt] and head [>= support x dt] (16-bit, contiguous)
  const void* tw = nullptr;
  int dt = 0;
  long long n = 0;
  long long support = 0;  // the first `support` vocabulary entries (the rest is padding: gradient 0)
  int splits = 1;
  long long tiles_per_split = 1;
  const std::int32_t* labels = nullptr;
  int ignore_index = -100;
  float k2 = 1.f;          // log2(e) / T
  float param = 0.5f;      // beta / alpha
  float loss_scale = 1.f;  // T^2 or 1
  float gscale = 1.f;      // grad_scale T^2 / T, times 2^k for fp16 (the gradient tile's scale)
  float unscale = 1.f;     // 2^-k
  const long long* divisor_dev = nullptr;
  double divisor = 1.0;
  float4* stats = nullptr;  // [splits][n]: teacher (m, s), student (m, s) of the split's columns
  float2* sums = nullptr;   // [splits][n]: loss terms, C (terms pass)
  float4* rows = nullptr;   // [n]: teacher lse, student lse (base 2), the value's lse gap, active (1 / 0)
  float* cq = nullptr;      // [n]: the row's C
  float* partial = nullptr; // [n][splits + 1]: loss partials (row terms, then the grad pass's per split)
  float* dh32 = nullptr;    // [n x d] fp32 accumulators (zeroed), or null
  float* dw32 = nullptr;    // [v x d]
  unsigned long long* error = nullptr;
  unsigned component = 0;
};

template <class T>
__device__ __forceinline__ unsigned oc_pack2(float lo, float hi) {
  if constexpr (std::is_same_v<T, kd::bfloat16>) {
    return pack_bf16(lo, hi);
  } else {
    const __half2 v = __floats2half2_rn(lo, hi);
    return static_cast<unsigned>(__half_as_ushort(v.x)) | (static_cast<unsigned>(__half_as_ushort(v.y)) << 16);
  }
}

// One stage of the logits GEMM: rows a0.. of A and b0.. of B (row-major, k columns), hidden columns
// kc .. kc + kOcK - 1; rows at or past an / bn and columns at or past k are zero-filled (k % 8 == 0).
template <class T>
__device__ __forceinline__ void oc_load_stage(T* st, const T* a, long long a0, long long an, const T* b, long long b0,
                                              long long bn, int k, int kc) {
  constexpr int pieces = kOcK / 8;  // 16-byte pieces per row
#pragma unroll
  for (int i = 0; i < kOcTile * pieces / kOcThreads; ++i) {
    const int c = threadIdx.x + i * kOcThreads, r = c / pieces, q = c % pieces, col = kc + q * 8;
    const long long ra = a0 + r, rb = b0 + r;
    const bool oka = ra < an && col < k, okb = rb < bn && col < k;
    cp_async16(st + r * kOcPitch + q * 8, oka ? a + ra * k + col : a, oka);
    cp_async16(st + (kOcTile + r) * kOcPitch + q * 8, okb ? b + rb * k + col : b, okb);
  }
}

// acc = A[a0 .. a0 + 128) B[b0 .. b0 + 128)^T over k columns. Warp (wm = warp / 4, wn = warp % 4) holds
// rows wm 64 + 16 mi + {g, g + 8} and columns wn 32 + 8 ni + {2t, 2t + 1} (the mma accumulator layout:
// acc[mi][ni][2 h + e] is row g + 8 h, column 2t + e; g = lane / 4, t = lane % 4).
template <class T>
__device__ __forceinline__ void oc_gemm(float (&acc)[4][4][4], const T* a, long long a0, long long an, const T* b,
                                        long long b0, long long bn, int k, T* stage) {
#pragma unroll
  for (int mi = 0; mi < 4; ++mi)
#pragma unroll
    for (int ni = 0; ni < 4; ++ni)
#pragma unroll
      for (int j = 0; j < 4; ++j) acc[mi][ni][j] = 0.f;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, wm = warp >> 2, wn = warp & 3;
  constexpr int stage_elems = 2 * kOcTile * kOcPitch;
  const int nk = (k + kOcK - 1) / kOcK;
  __syncthreads();  // every warp is done with the stages' previous contents
#pragma unroll
  for (int s = 0; s < kOcStages - 1; ++s) {
    if (s < nk) oc_load_stage(stage + s * stage_elems, a, a0, an, b, b0, bn, k, s * kOcK);
    cp_async_commit();
  }
  for (int kt = 0; kt < nk; ++kt) {
    cp_async_wait<kOcStages - 2>();
    __syncthreads();  // stage kt is visible to all; stage kt - 1 (refilled next) is read by no one
    const int nx = kt + kOcStages - 1;
    if (nx < nk) oc_load_stage(stage + (nx % kOcStages) * stage_elems, a, a0, an, b, b0, bn, k, nx * kOcK);
    cp_async_commit();
    const T* as = stage + (kt % kOcStages) * stage_elems;
    const T* bs = as + kOcTile * kOcPitch;
#pragma unroll 2  // fully unrolled, the fragments of all four steps are loaded up front and spill at 128 registers
    for (int kk = 0; kk < kOcK; kk += 16) {
      unsigned af[4][4], bf[2][4];
#pragma unroll
      for (int mi = 0; mi < 4; ++mi)
        ldsm_x4(af[mi], as + (wm * 64 + mi * 16 + (lane & 15)) * kOcPitch + kk + (lane >> 4) * 8);
#pragma unroll
      for (int nb = 0; nb < 2; ++nb)
        ldsm_x4(bf[nb], bs + (wn * 32 + nb * 16 + (lane & 7) + (lane >> 4) * 8) * kOcPitch + kk + ((lane >> 3) & 1) * 8);
#pragma unroll
      for (int mi = 0; mi < 4; ++mi)
#pragma unroll
        for (int nb = 0; nb < 2; ++nb) {
          mma_16<T>(acc[mi][2 * nb], af[mi], bf[nb][0], bf[nb][1]);
          mma_16<T>(acc[mi][2 * nb + 1], af[mi], bf[nb][2], bf[nb][3]);
        }
    }
  }
  cp_async_wait<0>();
}

// The tile's logits of both sides: the student's always through the GEMM, the teacher's through its own
// GEMM (Head) or read where the epilogue needs them (oc_teacher).
template <class T, class TT, bool Head>
__device__ __forceinline__ void oc_tiles(const on_chip_params& p, long long m0, long long v0, float (&s)[4][4][4],
                                         float (&t)[4][4][4], T* stage) {
  oc_gemm<T>(s, static_cast<const T*>(p.h), m0, p.n, static_cast<const T*>(p.w), v0, p.support, p.d, stage);
  if constexpr (Head)
    oc_gemm<TT>(t, static_cast<const TT*>(p.th), m0, p.n, static_cast<const TT*>(p.tw), v0, p.support, p.dt,
                reinterpret_cast<TT*>(stage));
}
// Entries (mi, ni, 2h) and (mi, ni, 2h + 1) of the teacher's tile (columns col, col + 1; ok: which lie in
// the support, col even): the GEMM's accumulators, or the logits read from memory, as one pair where the
// rows allow (t_pairs: an even stride and a pair-aligned base).
template <class TT, bool Head>
__device__ __forceinline__ float2 oc_teacher2(const on_chip_params& p, const float (&t)[4][4][4], int mi, int ni, int h,
                                              long long row, long long col, unsigned ok) {
  if constexpr (Head) {
    return {t[mi][ni][2 * h], t[mi][ni][2 * h + 1]};
  } else {
    const TT* q = static_cast<const TT*>(p.t) + row * p.t_stride + col;
    if (ok == 3u && p.t_pairs) {
      struct alignas(2 * sizeof(TT)) pair_t {
        TT x, y;
      };
      const pair_t v = *reinterpret_cast<const pair_t*>(q);
      return {to_float(v.x), to_float(v.y)};
    }
    return {ok & 1u ? to_float(q[0]) : 0.f, ok & 2u ? to_float(q[1]) : 0.f};
  }
}

// Adds a batch of up to 8 base-2 logits (valid: which) to a running log-sum-exp in one rescale. A NaN
// (a non-finite input, lse_acc::strict) makes the sum NaN, which the row kernel reports.
__device__ __forceinline__ void oc_lse_add(lse_acc& a, const float (&y)[8], unsigned valid) {
  float mx = -INFINITY;
#pragma unroll
  for (int k = 0; k < 8; ++k)
    if (valid >> k & 1u) mx = fmaxf(mx, y[k]);
  const float mn = fmaxf(a.m, mx);
  if (mn == -INFINITY) {
    if (valid != 0u) a.s = NAN;  // every valid y was NaN (fmaxf skips NaN)
    return;
  }
  float s = a.s * fast_exp2(a.m - mn);
#pragma unroll
  for (int k = 0; k < 8; ++k)
    if (valid >> k & 1u) s += fast_exp2(y[k] - mn);
  a.m = mn;
  a.s = s;
}

// The columns of the thread's 8 entries per row that lie inside the support.
__device__ __forceinline__ unsigned oc_valid_cols(long long v0, long long support) {
  const int lane = threadIdx.x & 31, wn = (threadIdx.x >> 5) & 3, t = lane & 3;
  unsigned m = 0;
#pragma unroll
  for (int ni = 0; ni < 4; ++ni)
#pragma unroll
    for (int e = 0; e < 2; ++e)
      if (v0 + wn * 32 + ni * 8 + 2 * t + e < support) m |= 1u << (ni * 2 + e);
  return m;
}

// The vocabulary tiles of this CTA's split.
__device__ __forceinline__ void oc_tile_range(const on_chip_params& p, long long& vt0, long long& vt1) {
  const long long tiles = (p.support + kOcTile - 1) / kOcTile;
  vt0 = static_cast<long long>(blockIdx.y) * p.tiles_per_split;
  vt1 = vt0 + p.tiles_per_split < tiles ? vt0 + p.tiles_per_split : tiles;
}

// Lane exchanges of the per-row values the kernels reduce.
__device__ __forceinline__ float oc_shfl(float v, int o) { return __shfl_xor_sync(0xffffffffu, v, o); }
__device__ __forceinline__ float2 oc_shfl(float2 v, int o) { return {oc_shfl(v.x, o), oc_shfl(v.y, o)}; }
__device__ __forceinline__ float4 oc_shfl(float4 v, int o) {
  return {oc_shfl(v.x, o), oc_shfl(v.y, o), oc_shfl(v.z, o), oc_shfl(v.w, o)};
}

// The CTA's per-row reduction: each thread's 8 row slots (slot mi * 2 + h: row wm 64 + 16 mi + g + 8 h)
// combined over the quad's lanes (which hold the same rows), then across the 4 warps along the
// vocabulary through shared memory (smem: the stages, free once every warp is past its last GEMM);
// out(r, value) for the tile's rows r = 0..127, from threads 0..127.
template <class V, class Combine, class Out>
__device__ __forceinline__ void oc_reduce_rows(V (&v)[8], unsigned char* smem, Combine&& comb, Out&& out) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, wm = warp >> 2, wn = warp & 3, g = lane >> 2;
#pragma unroll
  for (int k = 0; k < 8; ++k) {
    v[k] = comb(v[k], oc_shfl(v[k], 1));
    v[k] = comb(v[k], oc_shfl(v[k], 2));
  }
  __syncthreads();
  V* red = reinterpret_cast<V*>(smem);  // [4 wn][128 rows]
  if ((lane & 3) == 0)
#pragma unroll
    for (int k = 0; k < 8; ++k) red[wn * kOcTile + wm * 64 + (k >> 1) * 16 + g + 8 * (k & 1)] = v[k];
  __syncthreads();
  if (threadIdx.x < kOcTile) {
    V a = red[threadIdx.x];
    for (int q = 1; q < 4; ++q) a = comb(a, red[q * kOcTile + threadIdx.x]);
    out(static_cast<int>(threadIdx.x), a);
  }
}
__device__ __forceinline__ float4 oc_combine_lse2(float4 a, float4 b) {
  const lse_acc t = lse_acc::combine({a.x, a.y}, {b.x, b.y}), s = lse_acc::combine({a.z, a.w}, {b.z, b.w});
  return {t.m, t.s, s.m, s.s};
}

// Pass 1: per row and split, the teacher's and the student's base-2 log-sum-exps.
template <class T, class TT, bool Head>
__global__ void __launch_bounds__(kOcThreads, kOcMinBlocks<Head>) on_chip_stats_kernel(const __grid_constant__ on_chip_params p) {
  extern __shared__ __align__(16) unsigned char oc_smem[];
  T* stage = reinterpret_cast<T*>(oc_smem);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, wm = warp >> 2, wn = warp & 3, g = lane >> 2;
  const long long m0 = static_cast<long long>(blockIdx.x) * kOcTile;
  long long vt0, vt1;
  oc_tile_range(p, vt0, vt1);
  lse_acc ta[8], sa[8];  // slot mi * 2 + h: row wm 64 + 16 mi + g + 8 h
  float s[4][4][4], t[4][4][4];
  for (long long vt = vt0; vt < vt1; ++vt) {
    const long long v0 = vt * kOcTile;
    oc_tiles<T, TT, Head>(p, m0, v0, s, t, stage);
    const unsigned valid = oc_valid_cols(v0, p.support);
#pragma unroll
    for (int mi = 0; mi < 4; ++mi)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const long long row = m0 + wm * 64 + mi * 16 + g + 8 * h;
        if (row >= p.n) continue;
        float ys[8], yt[8];
#pragma unroll
        for (int ni = 0; ni < 4; ++ni) {
          const unsigned ok = valid >> (ni * 2) & 3u;
          const float2 tv = ok != 0u ? oc_teacher2<TT, Head>(p, t, mi, ni, h, row, v0 + wn * 32 + ni * 8 + 2 * (lane & 3), ok)
                                     : make_float2(0.f, 0.f);
          ys[ni * 2] = lse_acc::strict(s[mi][ni][2 * h] * p.k2);
          ys[ni * 2 + 1] = lse_acc::strict(s[mi][ni][2 * h + 1] * p.k2);
          yt[ni * 2] = ok & 1u ? lse_acc::strict(tv.x * p.k2) : 0.f;
          yt[ni * 2 + 1] = ok & 2u ? lse_acc::strict(tv.y * p.k2) : 0.f;
        }
        oc_lse_add(sa[mi * 2 + h], ys, valid);
        oc_lse_add(ta[mi * 2 + h], yt, valid);
      }
  }
  float4 v[8];
#pragma unroll
  for (int k = 0; k < 8; ++k) v[k] = {ta[k].m, ta[k].s, sa[k].m, sa[k].s};
  oc_reduce_rows(v, oc_smem, oc_combine_lse2, [&](int r, float4 a) {
    if (m0 + r < p.n) p.stats[blockIdx.y * p.n + m0 + r] = a;
  });
}

// After pass 1: each row's log-sum-exps over all splits, its label (ignored rows and rows reported for a
// label outside the vocabulary or a non-finite log-sum-exp are inactive: no loss, no gradient), the
// value's lse gap (kd/loss/logit_kd_math.cuh), and the loss partials set to their row part.
template <class D>
__global__ void on_chip_rows_kernel(const on_chip_params p) {
  using E = kd_entry<D>;
  using M = ::kd::detail::divergence_math<D, float>;
  for (long long row = blockIdx.x * static_cast<long long>(blockDim.x) + threadIdx.x; row < p.n;
       row += static_cast<long long>(gridDim.x) * blockDim.x) {
    lse_acc t{}, s{};
    for (int k = 0; k < p.splits; ++k) {
      const float4 f = p.stats[k * p.n + row];
      t = lse_acc::combine(t, {f.x, f.y});
      s = lse_acc::combine(s, {f.z, f.w});
    }
    const float tl = t.value(), sl = s.value();
    bool active = true;
    if (p.labels != nullptr) {
      const int y = p.labels[row];
      if (y == p.ignore_index) {
        active = false;
      } else if (y < 0 || y >= p.support) {
        active = false;
        atomicMin(p.error, encode_error(row, device_error::label_out_of_range, device_tensor::labels, p.component));
      }
    }
    if (active && !(isfinite(tl) && isfinite(sl))) {
      active = false;
      atomicMin(p.error, encode_error(row, device_error::non_finite,
                                      isfinite(tl) ? device_tensor::student : device_tensor::teacher, p.component));
    }
    float gap = 0.f;
    if constexpr (adds_lse_gap<D, E>)
      if (active) gap = M{p.param}.lse_gap_weight() * lse_gap_bits(t, s);
    p.rows[row] = {tl, sl, gap, active ? 1.f : 0.f};
    float* part = p.partial + row * (p.splits + 1);
    part[0] = E::one_sweep && active ? E::loss_of(gap) * p.loss_scale : 0.f;
    for (int k = 1; k <= p.splits; ++k) part[k] = 0.f;
  }
}

// Loads the CTA's 128 rows of a tile's row statistics into shared memory (rows past n inactive).
__device__ __forceinline__ void oc_load_rows(const on_chip_params& p, long long m0, float4* ri, float* rc, bool with_c) {
  for (int r = threadIdx.x; r < kOcTile; r += kOcThreads) {
    const long long row = m0 + r;
    ri[r] = row < p.n ? p.rows[row] : make_float4(0.f, 0.f, 0.f, 0.f);
    rc[r] = with_c && row < p.n ? p.cq[row] : 0.f;
  }
  __syncthreads();
}

// Pass 2 (divergences with a row sum): per row and split, the loss terms and C = sum q dD/dq.
template <class T, class TT, bool Head, class D>
__global__ void __launch_bounds__(kOcThreads, kOcMinBlocks<Head>) on_chip_terms_kernel(const __grid_constant__ on_chip_params p) {
  extern __shared__ __align__(16) unsigned char oc_smem[];
  T* stage = reinterpret_cast<T*>(oc_smem);
  float4* ri = reinterpret_cast<float4*>(oc_smem + kOcStageBytes);
  float* rc = reinterpret_cast<float*>(ri + kOcTile);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, wm = warp >> 2, wn = warp & 3, g = lane >> 2;
  const long long m0 = static_cast<long long>(blockIdx.x) * kOcTile;
  oc_load_rows(p, m0, ri, rc, false);
  long long vt0, vt1;
  oc_tile_range(p, vt0, vt1);
  const kd_entry<D> e(p.param, 1.f);
  float loss[8] = {}, cq[8] = {};
  float s[4][4][4], t[4][4][4];
  for (long long vt = vt0; vt < vt1; ++vt) {
    const long long v0 = vt * kOcTile;
    oc_tiles<T, TT, Head>(p, m0, v0, s, t, stage);
    const unsigned valid = oc_valid_cols(v0, p.support);
#pragma unroll
    for (int mi = 0; mi < 4; ++mi)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int lr = wm * 64 + mi * 16 + g + 8 * h;
        const float4 r = ri[lr];
        if (r.w == 0.f) continue;
        const long long row = m0 + lr;
#pragma unroll
        for (int ni = 0; ni < 4; ++ni) {
          const unsigned ok = valid >> (ni * 2) & 3u;
          if (ok == 0u) continue;
          const float2 tv = oc_teacher2<TT, Head>(p, t, mi, ni, h, row, v0 + wn * 32 + ni * 8 + 2 * (lane & 3), ok);
          if (ok & 1u) e.first(tv.x * p.k2 - r.x, s[mi][ni][2 * h] * p.k2 - r.y, loss[mi * 2 + h], cq[mi * 2 + h]);
          if (ok & 2u) e.first(tv.y * p.k2 - r.x, s[mi][ni][2 * h + 1] * p.k2 - r.y, loss[mi * 2 + h], cq[mi * 2 + h]);
        }
      }
  }
  float2 v[8];
#pragma unroll
  for (int k = 0; k < 8; ++k) v[k] = {loss[k], cq[k]};
  oc_reduce_rows(v, oc_smem, [](float2 a, float2 b) { return make_float2(a.x + b.x, a.y + b.y); }, [&](int r, float2 a) {
    if (m0 + r < p.n) p.sums[blockIdx.y * p.n + m0 + r] = a;
  });
}

// After pass 2: each row's C and its loss (terms plus the lse gap) in the row's first partial.
template <class D>
__global__ void on_chip_terms_rows_kernel(const on_chip_params p) {
  using E = kd_entry<D>;
  for (long long row = blockIdx.x * static_cast<long long>(blockDim.x) + threadIdx.x; row < p.n;
       row += static_cast<long long>(gridDim.x) * blockDim.x) {
    const float4 r = p.rows[row];
    float l = 0.f, c = 0.f;
    for (int k = 0; k < p.splits; ++k) {
      const float2 f = p.sums[k * p.n + row];
      l += f.x;
      c += f.y;
    }
    p.cq[row] = c;
    p.partial[row * (p.splits + 1)] = r.w != 0.f ? E::loss_of(l + r.z) * p.loss_scale : 0.f;
  }
}

// 16 x (8 NT) accumulator tile to fp32 rows with 16-byte atomics, times scale (lanes t and t ^ 1 swap
// halves, so the even lane adds 4 columns of row g and the odd lane 4 of row g + 8). row0 / col0: the
// block's first row and column; rows at or past nrows and columns at or past ncols (a multiple of 4) are
// skipped.
template <int NT>
__device__ __forceinline__ void oc_red(float* base, long long ld, const float (&a)[NT][4], float scale, long long row0,
                                       long long nrows, long long col0, long long ncols) {
  const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  const bool odd = (t & 1) != 0;
  const long long row = row0 + g + (odd ? 8 : 0);
#pragma unroll
  for (int n = 0; n < NT; ++n) {
    const float s0 = odd ? a[n][0] : a[n][2], s1 = odd ? a[n][1] : a[n][3];
    const float r0 = __shfl_xor_sync(0xffffffffu, s0, 1), r1 = __shfl_xor_sync(0xffffffffu, s1, 1);
    const long long col = col0 + n * 8 + 2 * (t & ~1);
    if (row < nrows && col < ncols) {
      float* dst = base + row * ld + col;
      if (odd) red_add_v4(dst, r0 * scale, r1 * scale, a[n][2] * scale, a[n][3] * scale);
      else red_add_v4(dst, a[n][0] * scale, a[n][1] * scale, r0 * scale, r1 * scale);
    }
  }
}

// Hidden columns c0 .. c0 + 63 of the tile's W rows (v0.., up to support) and h rows (m0.., up to n).
template <class T>
__device__ __forceinline__ void oc_load_chunk(T* buf, const on_chip_params& p, long long m0, long long v0, int c0) {
  const T* w = static_cast<const T*>(p.w);
  const T* h = static_cast<const T*>(p.h);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int c = threadIdx.x + i * kOcThreads, r = c >> 3, q = c & 7, col = c0 + q * 8;
    const long long rw = v0 + r, rh = m0 + r;
    const bool okw = rw < p.support && col < p.d, okh = rh < p.n && col < p.d;
    cp_async16(buf + r * kOcCPitch + q * 8, okw ? w + rw * p.d + col : w, okw);
    cp_async16(buf + (kOcTile + r) * kOcCPitch + q * 8, okh ? h + rh * p.d + col : h, okh);
  }
}

// One chunk of a gradient GEMM for warp (wm, wn): acc = A B[:, wn 16 .. wn 16 + 15] with k = 128, A's rows
// wm 64 .. wm 64 + 63. A is the gradient tile G (tokens x vocabulary: dhidden's product) or, GT, its
// transpose (dW's), read through the transposing ldmatrix; B is a chunk in shared memory, its rows the k
// index (W's vocabulary rows or h's token rows), read transposed into the column fragments.
template <class T, bool GT>
__device__ __forceinline__ void oc_chunk_mma(float (&acc)[4][2][4], const T* gs, const T* b) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, wm = warp >> 2, wn = warp & 3;
#pragma unroll
  for (int mi = 0; mi < 4; ++mi)
#pragma unroll
    for (int j = 0; j < 8; ++j) acc[mi][j >> 2][j & 3] = 0.f;
#pragma unroll
  for (int ks = 0; ks < kOcTile; ks += 16) {
    unsigned bf[4];
    ldsm_x4_t(bf, b + (ks + (lane & 7) + ((lane >> 3) & 1) * 8) * kOcCPitch + wn * 16 + (lane >> 4) * 8);
#pragma unroll
    for (int mi = 0; mi < 4; ++mi) {
      unsigned af[4];
      if constexpr (GT)
        ldsm_x4_t(af, gs + (ks + (lane & 7) + (lane >> 4) * 8) * kOcGPitch + wm * 64 + mi * 16 + ((lane >> 3) & 1) * 8);
      else
        ldsm_x4(af, gs + (wm * 64 + mi * 16 + (lane & 15)) * kOcGPitch + ks + (lane >> 4) * 8);
      mma_16<T>(acc[mi][0], af, bf[0], bf[1]);
      mma_16<T>(acc[mi][1], af, bf[2], bf[3]);
    }
  }
}

// Pass 3: the tile's gradient G (shared memory, storage type) into dhidden += G W and dW += G^T h.
template <class T, class TT, bool Head, class D>
__global__ void __launch_bounds__(kOcThreads, kOcMinBlocks<Head>) on_chip_grad_kernel(const __grid_constant__ on_chip_params p) {
  using E = kd_entry<D>;
  extern __shared__ __align__(16) unsigned char oc_smem[];
  T* stage = reinterpret_cast<T*>(oc_smem);
  float4* ri = reinterpret_cast<float4*>(oc_smem + kOcStageBytes);
  float* rc = reinterpret_cast<float*>(ri + kOcTile);
  T* gs = reinterpret_cast<T*>(oc_smem + kOcStageBytes + kOcRowBytes);
  T* chunks = stage;  // free once the tile's logits are formed
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, wm = warp >> 2, wn = warp & 3, g = lane >> 2;
  const long long m0 = static_cast<long long>(blockIdx.x) * kOcTile;
  oc_load_rows(p, m0, ri, rc, !E::one_sweep);
  long long vt0, vt1;
  oc_tile_range(p, vt0, vt1);
  E e(p.param, p.gscale);
  const float red_scale = p.unscale / static_cast<float>(loss_divisor(p.divisor_dev, p.divisor));
  float loss[8] = {};
  float s[4][4][4], t[4][4][4];
  const bool grads = p.dh32 != nullptr || p.dw32 != nullptr;
  constexpr int chunk_elems = 2 * kOcTile * kOcCPitch;
  for (long long vt = vt0; vt < vt1; ++vt) {
    const long long v0 = vt * kOcTile;
    oc_tiles<T, TT, Head>(p, m0, v0, s, t, stage);
    const unsigned valid = oc_valid_cols(v0, p.support);
    // The gradient tile (0 outside the support and on inactive rows) into shared memory. The previous
    // tile's chunk loop ended with a barrier, and oc_gemm began with one: nobody reads gs now.
#pragma unroll
    for (int mi = 0; mi < 4; ++mi)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int lr = wm * 64 + mi * 16 + g + 8 * h;
        const float4 r = ri[lr];
        const bool active = r.w != 0.f;
        if constexpr (!E::one_sweep) e.set_c(rc[lr]);
        const long long row = m0 + lr;
        float cq_unused = 0.f;
#pragma unroll
        for (int ni = 0; ni < 4; ++ni) {
          float gv[2] = {0.f, 0.f};
          const unsigned ok = active ? valid >> (ni * 2) & 3u : 0u;
          if (ok != 0u) {
            const float2 tv = oc_teacher2<TT, Head>(p, t, mi, ni, h, row, v0 + wn * 32 + ni * 8 + 2 * (lane & 3), ok);
            const float tt[2] = {tv.x, tv.y};
#pragma unroll
            for (int e2 = 0; e2 < 2; ++e2) {
              if (!(ok >> e2 & 1u)) continue;
              const float dt = tt[e2] * p.k2 - r.x, ds = s[mi][ni][2 * h + e2] * p.k2 - r.y;
              if constexpr (E::one_sweep) gv[e2] = e.first(dt, ds, loss[mi * 2 + h], cq_unused);
              else gv[e2] = e.grad(dt, ds);
            }
          }
          *reinterpret_cast<unsigned*>(gs + lr * kOcGPitch + wn * 32 + ni * 8 + 2 * (lane & 3)) = oc_pack2<T>(gv[0], gv[1]);
        }
      }
    if (!grads) continue;
    __syncthreads();  // every warp is done with the stages (the chunks' buffers) and has written its G
    // dhidden[m0.., c] += G W[v0.., c] and dW[v0.., c] += G^T h[m0.., c] per 64-column chunk c (double
    // buffered): each warp a 64 x 16 piece of each product, k = the tile's 128 vocabulary entries / tokens.
    const int nc = (p.d + kOcChunk - 1) / kOcChunk;
    oc_load_chunk(chunks, p, m0, v0, 0);
    cp_async_commit();
    for (int c = 0; c < nc; ++c) {
      if (c + 1 < nc) oc_load_chunk(chunks + ((c + 1) & 1) * chunk_elems, p, m0, v0, (c + 1) * kOcChunk);
      cp_async_commit();
      cp_async_wait<1>();
      __syncthreads();  // chunk c visible to all
      const T* wc = chunks + (c & 1) * chunk_elems;
      const T* hc = wc + kOcTile * kOcCPitch;
      float acc[4][2][4];
      if (p.dh32 != nullptr) {
        oc_chunk_mma<T, false>(acc, gs, wc);
#pragma unroll
        for (int mi = 0; mi < 4; ++mi)
          oc_red<2>(p.dh32, p.d, acc[mi], red_scale, m0 + wm * 64 + mi * 16, p.n, c * kOcChunk + wn * 16, p.d);
      }
      if (p.dw32 != nullptr) {
        oc_chunk_mma<T, true>(acc, gs, hc);
#pragma unroll
        for (int mi = 0; mi < 4; ++mi)
          oc_red<2>(p.dw32, p.d, acc[mi], red_scale, v0 + wm * 64 + mi * 16, p.support, c * kOcChunk + wn * 16, p.d);
      }
      __syncthreads();  // chunk c's buffer (refilled at c + 1) and, after the last, the gradient tile are free
    }
  }
  if constexpr (E::one_sweep)
    oc_reduce_rows(loss, oc_smem, [](float a, float b) { return a + b; }, [&](int r, float l) {
      if (m0 + r < p.n) p.partial[(m0 + r) * (p.splits + 1) + 1 + blockIdx.y] = E::loss_of(l) * p.loss_scale;
    });
}

}  // namespace kd::cuda::detail
