// kd/model/cuda/flash_attention.cuh: causal GQA attention of the CUDA model backend (forward, backward, the
// probability maps a distillation loss reads, and their backward). Layouts are those of kd/model/ops.hpp:
// token-major q [batch*seq, hq, d], k/v [batch*seq, hkv, d], o like q, lse [batch, hq, seq] (natural log of
// the partition sum of the scaled scores), probs [batch, hq, seq, seq] with zeros above the diagonal.
//
// Why this shape:
//  - The forward and backward never store a seq x seq matrix (flash attention, FA2 work split). The
//    forward keeps an online softmax per query row and saves lse; the backward recomputes
//    P = exp(scale q.k - lse) from it and uses delta = rowsum(dO * O) (one small pre-pass), so
//    dS = P * (dP - delta) needs no row reduction inside the key loop.
//  - bf16 with d in {64, 128} (the real models) runs on tensor cores: mma.sync m16n8k16 (bf16 in, fp32
//    accumulate) fed by ldmatrix from shared memory, tiles loaded with cp.async (zero-filled past the end
//    of the sequence, so any seq works). Shared-memory rows are padded by 16 bytes, which puts the 8 rows
//    an ldmatrix phase reads on 8 different bank groups (no swizzle needed).
//      forward:  one CTA (4 warps) per 64 RB query rows of one (batch, head) (RB = 2 for d = 64: each
//                K / V fragment read from shared memory feeds two 16-row blocks; RB = 1 for d = 128);
//                each warp keeps its Q fragments and the O accumulator in registers and streams 64-key
//                K/V tiles through double-buffered shared memory; causal early exit (tiles past the
//                diagonal are never loaded, a warp skips a tile whose keys all follow its rows), only
//                tiles that cross the diagonal are masked; exp2 with the scale pre-multiplied by log2 e.
//                The heaviest query blocks launch first.
//      backward: one CTA (8 warps) per 128-key block of one (batch, query head); each warp owns 16 keys,
//                whose dK and dV stay in registers while the CTA walks the 64-row query tiles at or below
//                the diagonal, then go once into fp32 accumulators of the KV head (the GQA group sum; one
//                CTA per query head rather than per KV head gives hq / hkv times more CTAs, which the SMs
//                need). dQ is a sum over key blocks owned by different CTAs: each CTA adds its part per
//                query tile. All accumulator adds are 16-byte fp32 atomics (red.global.add.v4.f32, sm_90).
//                A pre-pass computes delta and zeroes the dQ accumulator; a last vectorised pass scales
//                and converts the three accumulators to T.
//  - Everything else (float T, other even d <= 128, unaligned pointers) takes a scalar path: one warp per
//    query row (or per key row for dK/dV), lanes over the head dimension, fp32 online softmax. Correct for
//    every valid shape; not fast (it is the fp32 reference path and the tiny-model path).
//  - probs and its backward are rare (a few layers whose maps a loss wants) and are simple kernels: a
//    32 x 32 tile of the map per block for probs; per-row / per-key warps for the backward, which
//    accumulates into dq and dk.
// Every function only enqueues work on the stream it is given and reports launch errors; none
// synchronises.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <initializer_list>
#include <string>
#include <type_traits>
#include <utility>

#include <kd/cuda/context.cuh>
#include <kd/cuda/detail/mma.cuh>
#include <kd/cuda/detail/reduce.cuh>
#include <kd/cuda/detail/storage.cuh>
#include <kd/core/numeric.hpp>
#include <kd/core/status.hpp>
#include <kd/model/cuda_limits.hpp>  // kMaxHeadDim

namespace kd::model::cuda {

using int64 = std::int64_t;

namespace detail {

using ::kd::cuda::detail::fast_exp2;
using ::kd::cuda::detail::from_float;
using ::kd::cuda::detail::kLog2e;
using ::kd::cuda::detail::smem_u32;
using ::kd::cuda::detail::to_float;
using ::kd::cuda::detail::warp_sum;

inline constexpr int kRowThreads = 256;  // scalar path: 8 warps per block, one row per warp
inline constexpr int kFlashRows = 64;    // tensor-core path: query rows per tile (16 per warp)
inline constexpr int kFlashKeys = 64;    // keys per K/V tile
inline constexpr int kFlashThreads = 128;
inline constexpr std::int64_t kFlashMaxSeq = 65535LL * 64;  // tiles along grid.y

inline std::size_t align_up(std::size_t n, std::size_t a) { return (n + a - 1) / a * a; }

// Tensor-core primitives: kd/cuda/detail/mma.cuh.
using ::kd::cuda::detail::cp_async16;
using ::kd::cuda::detail::cp_async_commit;
using ::kd::cuda::detail::cp_async_wait_all;
using ::kd::cuda::detail::ldsm_x4;
using ::kd::cuda::detail::ldsm_x4_t;
using ::kd::cuda::detail::mma_bf16;
using ::kd::cuda::detail::pack_bf16;
using ::kd::cuda::detail::red_add_v4;

// Loads a ROWS x D tile (rows row0.. of a token-major tensor, one head) into shared memory with pitch
// D + 8, with THREADS threads; rows at or past seq are zero-filled.
template <int D, int ROWS, int THREADS>
__device__ __forceinline__ void load_tile(std::uint16_t* dst, const kd::bfloat16* head_base, int64 row_stride,
                                          int64 row0, int64 seq) {
  constexpr int P = D + 8;
  constexpr int chunks = D / 8;  // 16-byte chunks per row
#pragma unroll
  for (int c = threadIdx.x; c < ROWS * chunks; c += THREADS) {
    const int r = c / chunks, cc = c % chunks;
    const int64 row = row0 + r;
    const bool ok = row < seq;
    const kd::bfloat16* src = ok ? head_base + row * row_stride + cc * 8 : head_base;
    cp_async16(dst + r * P + cc * 8, src, ok);
  }
}

// Adds a 16 x (8 NT) mma accumulator (rows g and g + 8 of a 16-row block, columns 8n + 2t, 8n + 2t + 1)
// to a fp32 row-major destination with 16-byte atomics: lanes t and t ^ 1 swap halves, so the even lane
// owns 4 consecutive columns of row g and the odd lane those of row g + 8. base points at the block's row
// 0, column 0; rows at or past nrows are skipped.
template <int NT>
__device__ __forceinline__ void red_tile(float* base, int64 row_stride, const float (&a)[NT][4], int g, int t,
                                         int64 row0, int64 nrows) {
  const bool odd = (t & 1) != 0;
  const int64 row = row0 + g + (odd ? 8 : 0);
  float* dst = base + (g + (odd ? 8 : 0)) * row_stride + 2 * (t & ~1);
#pragma unroll
  for (int n = 0; n < NT; ++n) {
    const float s0 = odd ? a[n][0] : a[n][2], s1 = odd ? a[n][1] : a[n][3];
    const float r0 = __shfl_xor_sync(0xffffffffu, s0, 1), r1 = __shfl_xor_sync(0xffffffffu, s1, 1);
    if (row < nrows) {
      if (odd) red_add_v4(dst + 8 * n, r0, r1, a[n][2], a[n][3]);
      else red_add_v4(dst + 8 * n, a[n][0], a[n][1], r0, r1);
    }
  }
}

struct flash_params {
  const kd::bfloat16* q = nullptr;
  const kd::bfloat16* k = nullptr;
  const kd::bfloat16* v = nullptr;
  kd::bfloat16* o = nullptr;      // forward
  float* lse = nullptr;           // forward output / backward input
  const kd::bfloat16* dout = nullptr;
  const float* delta = nullptr;   // backward: rowsum(dO * O), [batch, hq, seq]
  float* dq_acc = nullptr;        // backward: fp32 accumulators, token-major like q / k / v
  float* dk_acc = nullptr;
  float* dv_acc = nullptr;
  int64 seq = 0;
  int hq = 0, hkv = 0;
  float scale = 1.f;
  float scale_log2 = 1.f;  // scale * log2(e)
};

// Forward. Grid (batch * hq, query blocks of 64 RB rows); block 128 threads; dynamic smem
// (64 RB + 4 * 64) * (D + 8) * 2 bytes (Q, two K and two V buffers). Warp w owns query rows
// 16 RB w .. 16 RB w + 16 RB - 1 of the block (RB 16-row blocks: every K / V fragment read from shared
// memory feeds RB mma). Thread (g = lane / 4, t = lane % 4) holds rows g and g + 8 of each 16-row block
// and, per 8-column n-tile, columns 2t and 2t + 1 (the mma accumulator layout), so the row max / sum need
// only the 4 lanes of a quad.
template <int D, int RB, int MINB>
__global__ void __launch_bounds__(kFlashThreads, MINB) flash_fwd_kernel(const __grid_constant__ flash_params p) {
  constexpr int P = D + 8;
  constexpr int KT = D / 16;  // k-steps over the head dimension
  constexpr int NT = D / 8;   // n-tiles of the output
  constexpr int ROWS = 64 * RB;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  std::uint16_t* qs = reinterpret_cast<std::uint16_t*>(smem_raw);
  std::uint16_t* ks = qs + ROWS * P;
  std::uint16_t* vs = ks + 2 * kFlashKeys * P;

  // Grid (batch * hq, query blocks): blocks are dispatched x fastest, so the longest causal ranges (the
  // last query blocks) of every head start first and the short ones fill the tail.
  const int nqb = static_cast<int>(gridDim.y);
  const int qb = nqb - 1 - static_cast<int>(blockIdx.y);
  const int h = static_cast<int>(blockIdx.x % p.hq);
  const int64 b = blockIdx.x / p.hq;
  const int hk = h / (p.hq / p.hkv);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int g = lane >> 2, t = lane & 3;

  const int64 qstride = static_cast<int64>(p.hq) * D, kstride = static_cast<int64>(p.hkv) * D;
  const kd::bfloat16* qg = p.q + (b * p.seq * p.hq + h) * D;
  const kd::bfloat16* kg = p.k + (b * p.seq * p.hkv + hk) * D;
  const kd::bfloat16* vg = p.v + (b * p.seq * p.hkv + hk) * D;
  const int qrow0 = qb * ROWS;                 // seq <= kFlashMaxSeq: ints suffice for positions
  const int wrow0 = qrow0 + warp * 16 * RB;    // this warp's first row
  const int wrow1 = wrow0 + 16 * RB - 1;       // and last
  const int nkt = static_cast<int>((p.seq + kFlashKeys - 1) / kFlashKeys);
  const int ntiles = min(nkt, (qrow0 + ROWS - 1) / kFlashKeys + 1);  // causal early exit

  load_tile<D, ROWS, kFlashThreads>(qs, qg, qstride, qrow0, p.seq);
  load_tile<D, kFlashKeys, kFlashThreads>(ks, kg, kstride, 0, p.seq);
  load_tile<D, kFlashKeys, kFlashThreads>(vs, vg, kstride, 0, p.seq);
  cp_async_commit();

  unsigned qf[RB][KT][4];
  float acc[RB][NT][4];
  float m[RB][2], l[RB][2];  // rows g and g + 8 of each block (raw-score max, partial sums)
#pragma unroll
  for (int r = 0; r < RB; ++r) {
#pragma unroll
    for (int n = 0; n < NT; ++n) acc[r][n][0] = acc[r][n][1] = acc[r][n][2] = acc[r][n][3] = 0.f;
    m[r][0] = m[r][1] = -INFINITY;
    l[r][0] = l[r][1] = 0.f;
  }

  for (int j = 0; j < ntiles; ++j) {
    cp_async_wait_all();
    __syncthreads();  // tile j landed for everyone; everyone is done with tile j - 1's buffer
    if (j == 0) {
#pragma unroll
      for (int r = 0; r < RB; ++r)
#pragma unroll
        for (int kk = 0; kk < KT; ++kk)
          ldsm_x4(qf[r][kk], qs + (warp * 16 * RB + 16 * r + (lane % 16)) * P + kk * 16 + (lane / 16) * 8);
    }
    if (j + 1 < ntiles) {
      const int nb = (j + 1) & 1;
      load_tile<D, kFlashKeys, kFlashThreads>(ks + nb * kFlashKeys * P, kg, kstride,
                                              static_cast<int64>(j + 1) * kFlashKeys, p.seq);
      load_tile<D, kFlashKeys, kFlashThreads>(vs + nb * kFlashKeys * P, vg, kstride,
                                              static_cast<int64>(j + 1) * kFlashKeys, p.seq);
      cp_async_commit();
    }
    const int key0 = j * kFlashKeys;
    if (key0 > wrow1) continue;  // every key of the tile is after every row of this warp (warp-uniform)
    const std::uint16_t* kt = ks + (j & 1) * kFlashKeys * P;
    const std::uint16_t* vt = vs + (j & 1) * kFlashKeys * P;

    // S = Q K^T for this warp's 16 RB rows x 64 keys.
    float s[RB][8][4];
#pragma unroll
    for (int r = 0; r < RB; ++r)
#pragma unroll
      for (int n = 0; n < 8; ++n) s[r][n][0] = s[r][n][1] = s[r][n][2] = s[r][n][3] = 0.f;
#pragma unroll
    for (int kk = 0; kk < KT; ++kk) {
#pragma unroll
      for (int np = 0; np < 4; ++np) {
        unsigned bf[4];
        ldsm_x4(bf, kt + (16 * np + (lane % 8) + (lane / 16) * 8) * P + kk * 16 + ((lane / 8) % 2) * 8);
#pragma unroll
        for (int r = 0; r < RB; ++r) {
          mma_bf16(s[r][2 * np], qf[r][kk], bf[0], bf[1]);
          mma_bf16(s[r][2 * np + 1], qf[r][kk], bf[2], bf[3]);
        }
      }
    }
    if (key0 + kFlashKeys - 1 > wrow0) {  // some key after some row: mask (keys past seq included)
#pragma unroll
      for (int r = 0; r < RB; ++r)
#pragma unroll
        for (int n = 0; n < 8; ++n)
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const int key = key0 + 8 * n + 2 * t + (e & 1);
            const int row = wrow0 + 16 * r + g + 8 * (e >> 1);
            if (key > row) s[r][n][e] = -INFINITY;
          }
    }
    // Online softmax (base 2). Every row sees key 0 in tile 0, so the max is finite from the start.
#pragma unroll
    for (int r = 0; r < RB; ++r) {
      float mx0 = m[r][0], mx1 = m[r][1];
#pragma unroll
      for (int n = 0; n < 8; ++n) {
        mx0 = fmaxf(mx0, fmaxf(s[r][n][0], s[r][n][1]));
        mx1 = fmaxf(mx1, fmaxf(s[r][n][2], s[r][n][3]));
      }
      mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, 1));
      mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, 2));
      mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, 1));
      mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, 2));
      const float c0 = fast_exp2((m[r][0] - mx0) * p.scale_log2), c1 = fast_exp2((m[r][1] - mx1) * p.scale_log2);
      m[r][0] = mx0;
      m[r][1] = mx1;
      const float b0 = mx0 * p.scale_log2, b1 = mx1 * p.scale_log2;
      l[r][0] *= c0;
      l[r][1] *= c1;
#pragma unroll
      for (int n = 0; n < NT; ++n) {
        acc[r][n][0] *= c0;
        acc[r][n][1] *= c0;
        acc[r][n][2] *= c1;
        acc[r][n][3] *= c1;
      }
#pragma unroll
      for (int n = 0; n < 8; ++n) {
        s[r][n][0] = fast_exp2(fmaf(s[r][n][0], p.scale_log2, -b0));
        s[r][n][1] = fast_exp2(fmaf(s[r][n][1], p.scale_log2, -b0));
        s[r][n][2] = fast_exp2(fmaf(s[r][n][2], p.scale_log2, -b1));
        s[r][n][3] = fast_exp2(fmaf(s[r][n][3], p.scale_log2, -b1));
        l[r][0] += s[r][n][0] + s[r][n][1];
        l[r][1] += s[r][n][2] + s[r][n][3];
      }
    }
    // O += P V: the S accumulators of two n-tiles are exactly the A fragment of one 16-key step.
#pragma unroll
    for (int kk = 0; kk < 4; ++kk) {
      unsigned pa[RB][4];
#pragma unroll
      for (int r = 0; r < RB; ++r) {
        pa[r][0] = pack_bf16(s[r][2 * kk][0], s[r][2 * kk][1]);
        pa[r][1] = pack_bf16(s[r][2 * kk][2], s[r][2 * kk][3]);
        pa[r][2] = pack_bf16(s[r][2 * kk + 1][0], s[r][2 * kk + 1][1]);
        pa[r][3] = pack_bf16(s[r][2 * kk + 1][2], s[r][2 * kk + 1][3]);
      }
#pragma unroll
      for (int dp = 0; dp < D / 16; ++dp) {
        unsigned bf[4];
        ldsm_x4_t(bf, vt + (16 * kk + (lane % 8) + ((lane / 8) % 2) * 8) * P + 16 * dp + (lane / 16) * 8);
#pragma unroll
        for (int r = 0; r < RB; ++r) {
          mma_bf16(acc[r][2 * dp], pa[r], bf[0], bf[1]);
          mma_bf16(acc[r][2 * dp + 1], pa[r], bf[2], bf[3]);
        }
      }
    }
  }

#pragma unroll
  for (int r = 0; r < RB; ++r) {
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      float lr = l[r][half];
      lr += __shfl_xor_sync(0xffffffffu, lr, 1);
      lr += __shfl_xor_sync(0xffffffffu, lr, 2);
      const float inv = 1.f / lr;
      const int64 row = wrow0 + 16 * r + g + 8 * half;
      if (row < p.seq) {
        unsigned* o = reinterpret_cast<unsigned*>(p.o + ((b * p.seq + row) * p.hq + h) * D + 2 * t);
#pragma unroll
        for (int n = 0; n < NT; ++n) o[4 * n] = pack_bf16(acc[r][n][2 * half] * inv, acc[r][n][2 * half + 1] * inv);
        if (t == 0) p.lse[(b * p.hq + h) * p.seq + row] = m[r][half] * p.scale + logf(lr);
      }
    }
  }
}

// Backward. Grid (batch * hq, key blocks of 16 WARPS keys): one CTA per key block of one query head, key
// block 0 (the most query tiles) first for every head. dK and dV of the block stay in registers over the
// 64-row query tiles at or below the diagonal and are added once, with fp32 atomics, to the KV head's
// accumulators (the GQA group sum): a group's heads run in parallel CTAs instead of one CTA walking the
// group, which gives the grid hq / hkv times more CTAs for the same work. Shared memory: K and V of the
// block's keys, double-buffered Q and dO tiles with their lse (base 2) and delta, and dS^T (bf16) for the
// dQ product. Warp w owns keys 16w..16w+15: it computes S^T = K Q^T and dP^T = V dO^T for its keys
// against the 64 queries of the tile, so P^T and dS^T are already the A fragments of dV += P^T dO and
// dK += dS^T Q; a warp whose keys all follow the tile's queries skips them. dQ = dS K needs all keys per
// query: dS^T goes through shared memory and warp w then owns queries 16 (w % 4).. of the tile and a
// D / (WARPS / 4) column slice; its part is added to the fp32 accumulator with 16-byte atomics.
template <int D, int WARPS, int MINB>
__global__ void __launch_bounds__(WARPS * 32, MINB) flash_bwd_kernel(const __grid_constant__ flash_params p) {
  constexpr int THREADS = WARPS * 32;
  constexpr int KEYS = 16 * WARPS;
  constexpr int P = D + 8;
  constexpr int PS = kFlashRows + 8;  // dS^T pitch
  constexpr int KT = D / 16;
  constexpr int NT = D / 8;
  constexpr int DQC = D / (WARPS / 4);  // dQ columns per warp
  static_assert(WARPS % 4 == 0 && KEYS % kFlashRows == 0, "key block must be whole query tiles");
  extern __shared__ __align__(16) unsigned char smem_raw[];
  std::uint16_t* ks = reinterpret_cast<std::uint16_t*>(smem_raw);
  std::uint16_t* vs = ks + KEYS * P;
  std::uint16_t* qs = vs + KEYS * P;             // [2][64][P]
  std::uint16_t* dos = qs + 2 * kFlashRows * P;  // [2][64][P]
  std::uint16_t* dss = dos + 2 * kFlashRows * P; // [KEYS][PS]
  float* lse_s = reinterpret_cast<float*>(dss + KEYS * PS);  // [2][64]
  float* delta_s = lse_s + 2 * kFlashRows;                    // [2][64]

  const int kb = static_cast<int>(blockIdx.y);
  const int h = static_cast<int>(blockIdx.x % p.hq);
  const int64 b = blockIdx.x / p.hq;
  const int hk = h / (p.hq / p.hkv);
  const int nqb = static_cast<int>((p.seq + kFlashRows - 1) / kFlashRows);
  const int krow0 = kb * KEYS;
  const int qt0 = krow0 / kFlashRows;  // first query tile that sees this key block
  const int iters = nqb - qt0;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int g = lane >> 2, t = lane & 3;
  const int64 qstride = static_cast<int64>(p.hq) * D, kstride = static_cast<int64>(p.hkv) * D;
  const int wkey0 = krow0 + warp * 16;  // this warp's first key

  load_tile<D, KEYS, THREADS>(ks, p.k + (b * p.seq * p.hkv + hk) * D, kstride, krow0, p.seq);
  load_tile<D, KEYS, THREADS>(vs, p.v + (b * p.seq * p.hkv + hk) * D, kstride, krow0, p.seq);
  auto issue = [&](int it, int buf) {
    const int64 q0 = static_cast<int64>(qt0 + it) * kFlashRows;
    load_tile<D, kFlashRows, THREADS>(qs + buf * kFlashRows * P, p.q + (b * p.seq * p.hq + h) * D, qstride, q0,
                                      p.seq);
    load_tile<D, kFlashRows, THREADS>(dos + buf * kFlashRows * P, p.dout + (b * p.seq * p.hq + h) * D, qstride,
                                      q0, p.seq);
    if (threadIdx.x < kFlashRows) {
      const int64 row = q0 + threadIdx.x;
      const int64 at = (b * p.hq + h) * p.seq + row;
      // Padding queries get lse = +inf: their P is exactly 0 and they add nothing.
      lse_s[buf * kFlashRows + threadIdx.x] = row < p.seq ? p.lse[at] * kLog2e : INFINITY;
      delta_s[buf * kFlashRows + threadIdx.x] = row < p.seq ? p.delta[at] : 0.f;
    }
  };
  issue(0, 0);
  cp_async_commit();

  float dk[NT][4], dv[NT][4];
#pragma unroll
  for (int n = 0; n < NT; ++n)
#pragma unroll
    for (int e = 0; e < 4; ++e) dk[n][e] = dv[n][e] = 0.f;
  const int lkey0 = warp * 16 + g;  // this thread's keys in the block: lkey0 and lkey0 + 8

  for (int it = 0; it < iters; ++it) {
    cp_async_wait_all();
    __syncthreads();  // tile it landed; everyone is done with the previous tile's buffers and dS^T
    if (it + 1 < iters) {
      issue(it + 1, (it + 1) & 1);
      cp_async_commit();
    }
    const int buf = it & 1;
    const int q0 = (qt0 + it) * kFlashRows;
    const std::uint16_t* qt = qs + buf * kFlashRows * P;
    const std::uint16_t* dot = dos + buf * kFlashRows * P;
    const float* lse_t = lse_s + buf * kFlashRows;
    const float* delta_t = delta_s + buf * kFlashRows;
    const bool skip = wkey0 > q0 + kFlashRows - 1;  // all of this warp's keys follow all queries

    float s[8][4];
#pragma unroll
    for (int n = 0; n < 8; ++n) s[n][0] = s[n][1] = s[n][2] = s[n][3] = 0.f;
    if (!skip) {
      // S^T = K Q^T (16 keys x 64 queries per warp), then P^T.
#pragma unroll
      for (int kk = 0; kk < KT; ++kk) {
        unsigned ka[4];
        ldsm_x4(ka, ks + (warp * 16 + (lane % 16)) * P + kk * 16 + (lane / 16) * 8);
#pragma unroll
        for (int np = 0; np < 4; ++np) {
          unsigned bf[4];
          ldsm_x4(bf, qt + (16 * np + (lane % 8) + (lane / 16) * 8) * P + kk * 16 + ((lane / 8) % 2) * 8);
          mma_bf16(s[2 * np], ka, bf[0], bf[1]);
          mma_bf16(s[2 * np + 1], ka, bf[2], bf[3]);
        }
      }
      const bool mask = wkey0 + 15 > q0;  // some key of this warp after some query (keys past seq too)
#pragma unroll
      for (int n = 0; n < 8; ++n)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int q = 8 * n + 2 * t + (e & 1);
          const int key = lkey0 + 8 * (e >> 1);
          const float pr = fast_exp2(fmaf(s[n][e], p.scale_log2, -lse_t[q]));
          s[n][e] = (mask && krow0 + key > q0 + q) ? 0.f : pr;
        }
      // dV += P^T dO.
#pragma unroll
      for (int kk = 0; kk < 4; ++kk) {
        const unsigned pa[4] = {pack_bf16(s[2 * kk][0], s[2 * kk][1]), pack_bf16(s[2 * kk][2], s[2 * kk][3]),
                                pack_bf16(s[2 * kk + 1][0], s[2 * kk + 1][1]),
                                pack_bf16(s[2 * kk + 1][2], s[2 * kk + 1][3])};
#pragma unroll
        for (int dp = 0; dp < D / 16; ++dp) {
          unsigned bf[4];
          ldsm_x4_t(bf, dot + (16 * kk + (lane % 8) + ((lane / 8) % 2) * 8) * P + 16 * dp + (lane / 16) * 8);
          mma_bf16(dv[2 * dp], pa, bf[0], bf[1]);
          mma_bf16(dv[2 * dp + 1], pa, bf[2], bf[3]);
        }
      }
      // dP^T = V dO^T, then dS^T = P^T (dP^T - delta).
      float dpv[8][4];
#pragma unroll
      for (int n = 0; n < 8; ++n) dpv[n][0] = dpv[n][1] = dpv[n][2] = dpv[n][3] = 0.f;
#pragma unroll
      for (int kk = 0; kk < KT; ++kk) {
        unsigned va[4];
        ldsm_x4(va, vs + (warp * 16 + (lane % 16)) * P + kk * 16 + (lane / 16) * 8);
#pragma unroll
        for (int np = 0; np < 4; ++np) {
          unsigned bf[4];
          ldsm_x4(bf, dot + (16 * np + (lane % 8) + (lane / 16) * 8) * P + kk * 16 + ((lane / 8) % 2) * 8);
          mma_bf16(dpv[2 * np], va, bf[0], bf[1]);
          mma_bf16(dpv[2 * np + 1], va, bf[2], bf[3]);
        }
      }
#pragma unroll
      for (int n = 0; n < 8; ++n)
#pragma unroll
        for (int e = 0; e < 4; ++e) s[n][e] *= dpv[n][e] - delta_t[8 * n + 2 * t + (e & 1)];
    }
    // dS^T to shared memory for dQ (zeros for a skipping warp); dK += dS^T Q.
#pragma unroll
    for (int kk = 0; kk < 4; ++kk) {
      const unsigned pa[4] = {pack_bf16(s[2 * kk][0], s[2 * kk][1]), pack_bf16(s[2 * kk][2], s[2 * kk][3]),
                              pack_bf16(s[2 * kk + 1][0], s[2 * kk + 1][1]),
                              pack_bf16(s[2 * kk + 1][2], s[2 * kk + 1][3])};
      *reinterpret_cast<unsigned*>(dss + lkey0 * PS + 16 * kk + 2 * t) = pa[0];
      *reinterpret_cast<unsigned*>(dss + (lkey0 + 8) * PS + 16 * kk + 2 * t) = pa[1];
      *reinterpret_cast<unsigned*>(dss + lkey0 * PS + 16 * kk + 8 + 2 * t) = pa[2];
      *reinterpret_cast<unsigned*>(dss + (lkey0 + 8) * PS + 16 * kk + 8 + 2 * t) = pa[3];
      if (!skip) {
#pragma unroll
        for (int dp = 0; dp < D / 16; ++dp) {
          unsigned bf[4];
          ldsm_x4_t(bf, qt + (16 * kk + (lane % 8) + ((lane / 8) % 2) * 8) * P + 16 * dp + (lane / 16) * 8);
          mma_bf16(dk[2 * dp], pa, bf[0], bf[1]);
          mma_bf16(dk[2 * dp + 1], pa, bf[2], bf[3]);
        }
      }
    }
    __syncthreads();  // dS^T complete
    // dQ (queries 16 (w % 4).., columns c0..c0 + DQC) = dS K over the block's keys at or before the tile's
    // last query, added to the fp32 accumulator.
    {
      const int qr = (warp % 4) * 16, c0 = (warp / 4) * DQC;
      const int kk_end = min(KEYS / 16, (q0 + kFlashRows - 1 - krow0) / 16 + 1);
      float dq[DQC / 8][4];
#pragma unroll
      for (int n = 0; n < DQC / 8; ++n) dq[n][0] = dq[n][1] = dq[n][2] = dq[n][3] = 0.f;
#pragma unroll
      for (int kk = 0; kk < KEYS / 16; ++kk) {
        if (kk < kk_end) {
          unsigned a[4];
          ldsm_x4_t(a, dss + (16 * kk + (lane % 8) + (lane / 16) * 8) * PS + qr + ((lane / 8) % 2) * 8);
#pragma unroll
          for (int dp = 0; dp < DQC / 16; ++dp) {
            unsigned bf[4];
            ldsm_x4_t(bf, ks + (16 * kk + (lane % 8) + ((lane / 8) % 2) * 8) * P + c0 + 16 * dp + (lane / 16) * 8);
            mma_bf16(dq[2 * dp], a, bf[0], bf[1]);
            mma_bf16(dq[2 * dp + 1], a, bf[2], bf[3]);
          }
        }
      }
      const int64 row0 = q0 + qr;
      red_tile<DQC / 8>(p.dq_acc + ((b * p.seq + row0) * p.hq + h) * D + c0, qstride, dq, g, t, row0, p.seq);
    }
  }

  // Add this head's dK (unscaled) and dV to the KV head's fp32 accumulators.
  const int64 key0 = wkey0;
  float* at = p.dk_acc + ((b * p.seq + key0) * p.hkv + hk) * D;
  red_tile<NT>(at, kstride, dk, g, t, key0, p.seq);
  red_tile<NT>(p.dv_acc + ((b * p.seq + key0) * p.hkv + hk) * D, kstride, dv, g, t, key0, p.seq);
}

template <int D, int RB>
constexpr int flash_fwd_smem() {
  return (64 * RB + 4 * kFlashKeys) * (D + 8) * 2;
}
template <int D, int WARPS>
constexpr int flash_bwd_smem() {
  return (2 * 16 * WARPS + 4 * kFlashRows) * (D + 8) * 2 + 16 * WARPS * (kFlashRows + 8) * 2 + 4 * kFlashRows * 4;
}

// Backward pre-pass of the tensor-core path: delta[b, h, i] = sum_c dO * O with 16-byte loads (D / 8
// lanes per row, rows in token order), and zeroes the fp32 dQ accumulator (same layout as dO).
template <int D>
__global__ void __launch_bounds__(256) flash_delta_kernel(const __grid_constant__ flash_params p, const kd::bfloat16* o,
                                                          int64 rows) {
  constexpr int L = D / 8;
  const int64 idx = static_cast<int64>(blockIdx.x) * 256 + threadIdx.x;
  const int64 row = idx / L;  // token-major row (b * seq + i) * hq + h
  const int c = static_cast<int>(idx % L) * 8;
  float s = 0.f;
  if (row < rows) {
    const uint4 a = *reinterpret_cast<const uint4*>(p.dout + row * D + c);
    const uint4 bq = *reinterpret_cast<const uint4*>(o + row * D + c);
    const unsigned av[4] = {a.x, a.y, a.z, a.w}, bv[4] = {bq.x, bq.y, bq.z, bq.w};
#pragma unroll
    for (int u = 0; u < 4; ++u) {
      const float2 x = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&av[u]));
      const float2 y = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&bv[u]));
      s = fmaf(x.x, y.x, fmaf(x.y, y.y, s));
    }
    float4* z = reinterpret_cast<float4*>(p.dq_acc + row * D + c);
    z[0] = make_float4(0.f, 0.f, 0.f, 0.f);
    z[1] = make_float4(0.f, 0.f, 0.f, 0.f);
  }
#pragma unroll
  for (int o2 = L / 2; o2 > 0; o2 >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o2);
  if (row < rows && c == 0) {
    const int64 h = row % p.hq, bi = row / p.hq;  // bi = b * seq + i
    const int64 bb = bi / p.seq, i = bi % p.seq;
    const_cast<float*>(p.delta)[(bb * p.hq + h) * p.seq + i] = s;
  }
}

// Converts the fp32 accumulators of the flash backward (one launch for dq, dk, dv; they lie back to
// back in the workspace, each a multiple of 4 floats): dq = scale acc_q, dk = scale acc_k, dv = acc_v.
__global__ void flash_grad_convert_kernel(const float* acc, kd::bfloat16* dq, kd::bfloat16* dk, kd::bfloat16* dv,
                                          int64 nq, int64 nk, float scale) {
  const int64 n4 = (nq + 2 * nk) / 4;
  for (int64 i4 = static_cast<int64>(blockIdx.x) * blockDim.x + threadIdx.x; i4 < n4;
       i4 += static_cast<int64>(gridDim.x) * blockDim.x) {
    const int64 i = 4 * i4;
    const float4 a = reinterpret_cast<const float4*>(acc)[i4];
    kd::bfloat16* dst;
    float sc = scale;
    if (i < nq) dst = dq + i;
    else if (i < nq + nk) dst = dk + (i - nq);
    else {
      dst = dv + (i - nq - nk);
      sc = 1.f;
    }
    uint2 w;
    w.x = pack_bf16(a.x * sc, a.y * sc);
    w.y = pack_bf16(a.z * sc, a.w * sc);
    *reinterpret_cast<uint2*>(dst) = w;
  }
}

// ----------------------------------------------------------------------------------------------------
// Scalar path: one warp per row, lane l holds dimensions l, l + 32, l + 64, l + 96 (d <= 128).

struct rows_params {
  const void* q = nullptr;
  const void* k = nullptr;
  const void* v = nullptr;
  const void* o = nullptr;
  const void* dout = nullptr;
  void* out = nullptr;   // o (forward), dq (dq pass / probs dq), dk (dk pass)
  void* out2 = nullptr;  // dv (dkdv pass)
  float* lse = nullptr;
  const float* lse_in = nullptr;
  float* delta = nullptr;
  const float* delta_in = nullptr;
  const void* probs = nullptr;
  const void* dprobs = nullptr;
  int64 batch = 0, seq = 0;
  int hq = 0, hkv = 0, d = 0;
  float scale = 1.f;
};

template <class T>
__device__ __forceinline__ void load_row(const T* p, int d, int lane, float (&x)[4]) {
#pragma unroll
  for (int r = 0; r < 4; ++r) {
    const int c = lane + 32 * r;
    x[r] = c < d ? to_float(p[c]) : 0.f;
  }
}
template <class T>
__device__ __forceinline__ float dot_part(const float (&x)[4], const T* p, int d, int lane) {
  float s = 0.f;
#pragma unroll
  for (int r = 0; r < 4; ++r) {
    const int c = lane + 32 * r;
    if (c < d) s = fmaf(x[r], to_float(p[c]), s);
  }
  return s;
}
template <class T>
__device__ __forceinline__ void axpy_row(float (&y)[4], float a, const T* p, int d, int lane) {
#pragma unroll
  for (int r = 0; r < 4; ++r) {
    const int c = lane + 32 * r;
    if (c < d) y[r] = fmaf(a, to_float(p[c]), y[r]);
  }
}
template <class T>
__device__ __forceinline__ void store_row(T* p, const float (&x)[4], float a, int d, int lane) {
#pragma unroll
  for (int r = 0; r < 4; ++r) {
    const int c = lane + 32 * r;
    if (c < d) p[c] = from_float<T>(x[r] * a);
  }
}
// p += a x (accumulating outputs of the probs backward).
template <class T>
__device__ __forceinline__ void add_row(T* p, const float (&x)[4], float a, int d, int lane) {
#pragma unroll
  for (int r = 0; r < 4; ++r) {
    const int c = lane + 32 * r;
    if (c < d) p[c] = from_float<T>(to_float(p[c]) + x[r] * a);
  }
}

// Forward, row (b, h, i) in lse order; exact expf (this is also the fp32 path).
template <class T>
__global__ void __launch_bounds__(kRowThreads) attn_fwd_rows_kernel(const __grid_constant__ rows_params p) {
  const int64 row = static_cast<int64>(blockIdx.x) * (kRowThreads / 32) + threadIdx.x / 32;
  if (row >= p.batch * p.hq * p.seq) return;  // whole warps leave; no block barrier below
  const int lane = threadIdx.x % 32;
  const int64 i = row % p.seq, bh = row / p.seq;
  const int h = static_cast<int>(bh % p.hq);
  const int64 b = bh / p.hq;
  const int hk = h / (p.hq / p.hkv);
  const int d = p.d;
  const T* q = static_cast<const T*>(p.q) + ((b * p.seq + i) * p.hq + h) * d;
  const T* kb = static_cast<const T*>(p.k) + (b * p.seq * p.hkv + hk) * d;
  const T* vb = static_cast<const T*>(p.v) + (b * p.seq * p.hkv + hk) * d;
  const int64 kstride = static_cast<int64>(p.hkv) * d;
  float qv[4], acc[4] = {0.f, 0.f, 0.f, 0.f};
  load_row(q, d, lane, qv);
  float m = -INFINITY, l = 0.f;
  for (int64 j = 0; j <= i; ++j) {
    const float s = warp_sum(dot_part(qv, kb + j * kstride, d, lane)) * p.scale;
    const float mn = fmaxf(m, s);
    const float c = expf(m - mn), pj = expf(s - mn);
    l = l * c + pj;
#pragma unroll
    for (int r = 0; r < 4; ++r) acc[r] *= c;
    axpy_row(acc, pj, vb + j * kstride, d, lane);
    m = mn;
  }
  store_row(static_cast<T*>(p.out) + ((b * p.seq + i) * p.hq + h) * d, acc, 1.f / l, d, lane);
  if (lane == 0) p.lse[row] = m + logf(l);
}

// delta[b, h, i] = sum_c dO * O (both paths). One warp per row.
template <class T>
__global__ void __launch_bounds__(kRowThreads) attn_delta_kernel(const __grid_constant__ rows_params p) {
  const int64 row = static_cast<int64>(blockIdx.x) * (kRowThreads / 32) + threadIdx.x / 32;
  if (row >= p.batch * p.hq * p.seq) return;
  const int lane = threadIdx.x % 32;
  const int64 i = row % p.seq, bh = row / p.seq;
  const int h = static_cast<int>(bh % p.hq);
  const int64 b = bh / p.hq;
  const int64 at = ((b * p.seq + i) * p.hq + h) * p.d;
  float x[4];
  load_row(static_cast<const T*>(p.dout) + at, p.d, lane, x);
  const float s = warp_sum(dot_part(x, static_cast<const T*>(p.o) + at, p.d, lane));
  if (lane == 0) p.delta[row] = s;
}

// dQ of the scalar path: row (b, h, i), keys j <= i.
template <class T>
__global__ void __launch_bounds__(kRowThreads) attn_bwd_dq_rows_kernel(const __grid_constant__ rows_params p) {
  const int64 row = static_cast<int64>(blockIdx.x) * (kRowThreads / 32) + threadIdx.x / 32;
  if (row >= p.batch * p.hq * p.seq) return;
  const int lane = threadIdx.x % 32;
  const int64 i = row % p.seq, bh = row / p.seq;
  const int h = static_cast<int>(bh % p.hq);
  const int64 b = bh / p.hq;
  const int hk = h / (p.hq / p.hkv);
  const int d = p.d;
  const int64 at = ((b * p.seq + i) * p.hq + h) * d;
  const T* kb = static_cast<const T*>(p.k) + (b * p.seq * p.hkv + hk) * d;
  const T* vb = static_cast<const T*>(p.v) + (b * p.seq * p.hkv + hk) * d;
  const int64 kstride = static_cast<int64>(p.hkv) * d;
  float qv[4], dov[4], dq[4] = {0.f, 0.f, 0.f, 0.f};
  load_row(static_cast<const T*>(p.q) + at, d, lane, qv);
  load_row(static_cast<const T*>(p.dout) + at, d, lane, dov);
  const float lse = p.lse_in[row], delta = p.delta_in[row];
  for (int64 j = 0; j <= i; ++j) {
    float s = dot_part(qv, kb + j * kstride, d, lane), dp = dot_part(dov, vb + j * kstride, d, lane);
    for (int o = 16; o > 0; o >>= 1) {
      s += __shfl_xor_sync(0xffffffffu, s, o);
      dp += __shfl_xor_sync(0xffffffffu, dp, o);
    }
    const float pj = expf(s * p.scale - lse);
    axpy_row(dq, pj * (dp - delta), kb + j * kstride, d, lane);
  }
  store_row(static_cast<T*>(p.out) + at, dq, p.scale, d, lane);
}

// dK, dV of the scalar path: row (b, kv head, j); sums over the group's query heads and queries i >= j.
template <class T>
__global__ void __launch_bounds__(kRowThreads) attn_bwd_dkdv_rows_kernel(const __grid_constant__ rows_params p) {
  const int64 row = static_cast<int64>(blockIdx.x) * (kRowThreads / 32) + threadIdx.x / 32;
  if (row >= p.batch * p.hkv * p.seq) return;
  const int lane = threadIdx.x % 32;
  const int64 j = row % p.seq, bk = row / p.seq;
  const int hk = static_cast<int>(bk % p.hkv);
  const int64 b = bk / p.hkv;
  const int group = p.hq / p.hkv;
  const int d = p.d;
  const int64 at = ((b * p.seq + j) * p.hkv + hk) * d;
  float kv[4], vv[4], dk[4] = {0.f, 0.f, 0.f, 0.f}, dv[4] = {0.f, 0.f, 0.f, 0.f};
  load_row(static_cast<const T*>(p.k) + at, d, lane, kv);
  load_row(static_cast<const T*>(p.v) + at, d, lane, vv);
  const int64 qstride = static_cast<int64>(p.hq) * d;
  for (int hg = 0; hg < group; ++hg) {
    const int h = hk * group + hg;
    const T* qb = static_cast<const T*>(p.q) + (b * p.seq * p.hq + h) * d;
    const T* db = static_cast<const T*>(p.dout) + (b * p.seq * p.hq + h) * d;
    const float* lse = p.lse_in + (b * p.hq + h) * p.seq;
    const float* delta = p.delta_in + (b * p.hq + h) * p.seq;
    for (int64 i = j; i < p.seq; ++i) {
      float s = dot_part(kv, qb + i * qstride, d, lane), dp = dot_part(vv, db + i * qstride, d, lane);
      for (int o = 16; o > 0; o >>= 1) {
        s += __shfl_xor_sync(0xffffffffu, s, o);
        dp += __shfl_xor_sync(0xffffffffu, dp, o);
      }
      const float pj = expf(s * p.scale - lse[i]);
      axpy_row(dv, pj, db + i * qstride, d, lane);
      axpy_row(dk, pj * (dp - delta[i]), qb + i * qstride, d, lane);
    }
  }
  store_row(static_cast<T*>(p.out) + at, dk, p.scale, d, lane);
  store_row(static_cast<T*>(p.out2) + at, dv, 1.f, d, lane);
}

// Converts the fp32 accumulators of the flash backward (one launch for dq, dk, dv; they lie back to
// back in the workspace): dq = scale acc_q, dk = scale acc_k, dv = acc_v.
template <class T>
__global__ void attn_grad_convert_kernel(const float* acc, T* dq, T* dk, T* dv, int64 nq, int64 nk, float scale) {
  for (int64 i = static_cast<int64>(blockIdx.x) * blockDim.x + threadIdx.x; i < nq + 2 * nk;
       i += static_cast<int64>(gridDim.x) * blockDim.x) {
    const float a = acc[i];
    if (i < nq) dq[i] = from_float<T>(a * scale);
    else if (i < nq + nk) dk[i - nq] = from_float<T>(a * scale);
    else dv[i - nq - nk] = from_float<T>(a);
  }
}

// probs: one block per 32 x 32 tile of one (batch, head) map, grid (key tiles, query tiles, batch * hq).
// Q and K rows of the tile are staged as floats (pitch 129: the 32 key rows fall on 32 banks), each
// thread computes 4 elements; tiles wholly above the diagonal are only zero-filled.
template <class T>
__global__ void __launch_bounds__(256) attn_probs_kernel(const __grid_constant__ rows_params p) {
  __shared__ float qs[32][kMaxHeadDim + 1];
  __shared__ float kst[32][kMaxHeadDim + 1];
  const int64 j0 = static_cast<int64>(blockIdx.x) * 32, i0 = static_cast<int64>(blockIdx.y) * 32;
  const int64 bh = blockIdx.z;
  const int h = static_cast<int>(bh % p.hq);
  const int64 b = bh / p.hq;
  const int hk = h / (p.hq / p.hkv);
  const int tx = threadIdx.x % 32, ty = threadIdx.x / 32;
  const int d = p.d;
  T* out = static_cast<T*>(p.out) + bh * p.seq * p.seq;
  if (j0 > i0 + 31) {
    for (int r = ty; r < 32; r += 8) {
      const int64 i = i0 + r, j = j0 + tx;
      if (i < p.seq && j < p.seq) out[i * p.seq + j] = from_float<T>(0.f);
    }
    return;  // uniform over the block
  }
  for (int idx = threadIdx.x; idx < 32 * d; idx += blockDim.x) {
    const int r = idx / d, c = idx % d;
    const int64 i = i0 + r, j = j0 + r;
    qs[r][c] = i < p.seq ? to_float(static_cast<const T*>(p.q)[((b * p.seq + i) * p.hq + h) * d + c]) : 0.f;
    kst[r][c] = j < p.seq ? to_float(static_cast<const T*>(p.k)[((b * p.seq + j) * p.hkv + hk) * d + c]) : 0.f;
  }
  __syncthreads();
  for (int r = ty; r < 32; r += 8) {
    const int64 i = i0 + r, j = j0 + tx;
    if (i >= p.seq || j >= p.seq) continue;
    float val = 0.f;
    if (j <= i) {
      float s = 0.f;
      for (int c = 0; c < d; ++c) s = fmaf(qs[r][c], kst[tx][c], s);
      val = expf(s * p.scale - p.lse_in[bh * p.seq + i]);
    }
    out[i * p.seq + j] = from_float<T>(val);
  }
}

// probs backward, pass 1: r[b, h, i] = sum_j dP * P over j <= i. One warp per row.
template <class T>
__global__ void __launch_bounds__(kRowThreads) attn_probs_rowsum_kernel(const __grid_constant__ rows_params p) {
  const int64 row = static_cast<int64>(blockIdx.x) * (kRowThreads / 32) + threadIdx.x / 32;
  if (row >= p.batch * p.hq * p.seq) return;
  const int lane = threadIdx.x % 32;
  const int64 i = row % p.seq;
  const T* pr = static_cast<const T*>(p.probs) + row * p.seq;
  const T* dpr = static_cast<const T*>(p.dprobs) + row * p.seq;
  float s = 0.f;
  for (int64 j = lane; j <= i; j += 32) s = fmaf(to_float(pr[j]), to_float(dpr[j]), s);
  s = warp_sum(s);
  if (lane == 0) p.delta[row] = s;
}

// probs backward, dq += scale * sum_j dS_ij k_j; row (b, h, i). Each lane computes one dS of a chunk of 32
// keys (coalesced reads of the map row), then the chunk is broadcast by shuffles.
template <class T>
__global__ void __launch_bounds__(kRowThreads) attn_probs_dq_kernel(const __grid_constant__ rows_params p) {
  const int64 row = static_cast<int64>(blockIdx.x) * (kRowThreads / 32) + threadIdx.x / 32;
  if (row >= p.batch * p.hq * p.seq) return;
  const int lane = threadIdx.x % 32;
  const int64 i = row % p.seq, bh = row / p.seq;
  const int h = static_cast<int>(bh % p.hq);
  const int64 b = bh / p.hq;
  const int hk = h / (p.hq / p.hkv);
  const int d = p.d;
  const T* pr = static_cast<const T*>(p.probs) + row * p.seq;
  const T* dpr = static_cast<const T*>(p.dprobs) + row * p.seq;
  const float r = p.delta_in[row];
  const T* kb = static_cast<const T*>(p.k) + (b * p.seq * p.hkv + hk) * d;
  const int64 kstride = static_cast<int64>(p.hkv) * d;
  float acc[4] = {0.f, 0.f, 0.f, 0.f};
  for (int64 j0 = 0; j0 <= i; j0 += 32) {
    const int64 j = j0 + lane;
    const float ds = j <= i ? to_float(pr[j]) * (to_float(dpr[j]) - r) : 0.f;
    const int n = static_cast<int>(i - j0 + 1 < 32 ? i - j0 + 1 : 32);
    for (int u = 0; u < n; ++u) axpy_row(acc, __shfl_sync(0xffffffffu, ds, u), kb + (j0 + u) * kstride, d, lane);
  }
  add_row(static_cast<T*>(p.out) + ((b * p.seq + i) * p.hq + h) * d, acc, p.scale, d, lane);
}

// probs backward, dk += scale * sum_{h in group, i >= j} dS_ij q_i; row (b, kv head, j).
template <class T>
__global__ void __launch_bounds__(kRowThreads) attn_probs_dk_kernel(const __grid_constant__ rows_params p) {
  const int64 row = static_cast<int64>(blockIdx.x) * (kRowThreads / 32) + threadIdx.x / 32;
  if (row >= p.batch * p.hkv * p.seq) return;
  const int lane = threadIdx.x % 32;
  const int64 j = row % p.seq, bk = row / p.seq;
  const int hk = static_cast<int>(bk % p.hkv);
  const int64 b = bk / p.hkv;
  const int group = p.hq / p.hkv;
  const int d = p.d;
  const int64 qstride = static_cast<int64>(p.hq) * d;
  float acc[4] = {0.f, 0.f, 0.f, 0.f};
  for (int hg = 0; hg < group; ++hg) {
    const int h = hk * group + hg;
    const int64 bh = b * p.hq + h;
    const T* pr = static_cast<const T*>(p.probs) + bh * p.seq * p.seq;
    const T* dpr = static_cast<const T*>(p.dprobs) + bh * p.seq * p.seq;
    const float* r = p.delta_in + bh * p.seq;
    const T* qb = static_cast<const T*>(p.q) + (b * p.seq * p.hq + h) * d;
    for (int64 i0 = j; i0 < p.seq; i0 += 32) {
      const int64 i = i0 + lane;
      const float ds = i < p.seq ? to_float(pr[i * p.seq + j]) * (to_float(dpr[i * p.seq + j]) - r[i]) : 0.f;
      const int n = static_cast<int>(p.seq - i0 < 32 ? p.seq - i0 : 32);
      for (int u = 0; u < n; ++u) axpy_row(acc, __shfl_sync(0xffffffffu, ds, u), qb + (i0 + u) * qstride, d, lane);
    }
  }
  add_row(static_cast<T*>(p.out) + ((b * p.seq + j) * p.hkv + hk) * d, acc, p.scale, d, lane);
}

// ----------------------------------------------------------------------------------------------------
// Host side.

inline status check_shape(const char* fn, int64 batch, int64 seq, int64 hq, int64 hkv, int64 d) {
  const std::string f(fn);
  if (batch < 0 || seq < 0 || hq < 0 || hkv < 0 || d < 0)
    return {errc::invalid_argument, f + ": negative size"};
  if (batch == 0 || seq == 0 || hq == 0 || hkv == 0 || d == 0)
    return {errc::empty_input, f + ": batch, seq, hq, hkv and d must be positive"};
  if (hq % hkv != 0)
    return {errc::invalid_argument, f + ": hq (" + std::to_string(hq) + ") is not a multiple of hkv (" +
                                        std::to_string(hkv) + ")"};
  if (d % 2 != 0 || d > kMaxHeadDim)
    return {errc::invalid_argument, f + ": head dim " + std::to_string(d) + " must be even and at most 128"};
  if (batch > kMaxGridY || hq > kMaxGridY)
    return {errc::invalid_argument, f + ": batch and hq must be at most 65535"};
  if (batch * hq * seq / (kRowThreads / 32) >= (int64{1} << 31) - 1 || seq >= (int64{1} << 31) / 32)
    return {errc::invalid_argument, f + ": batch * hq * seq too large"};
  return {};
}

inline status check_ptr(const void* ptr, const char* what, const char* fn) {
  if (ptr == nullptr) return {errc::invalid_argument, std::string(fn) + ": " + what + " is null"};
  return {};
}

inline bool aligned16(const void* ptr) { return reinterpret_cast<std::uintptr_t>(ptr) % 16 == 0; }

inline unsigned row_blocks(int64 rows) {
  return static_cast<unsigned>((rows + kRowThreads / 32 - 1) / (kRowThreads / 32));
}

template <class T>
inline status check_float(float scale, const char* fn) {
  static_assert(std::is_same_v<T, float> || std::is_same_v<T, kd::bfloat16>,
                "kd::model::cuda attention: T must be float or kd::bfloat16");
  if (!std::isfinite(scale)) return {errc::invalid_argument, std::string(fn) + ": scale is not finite"};
  return {};
}

// The checks every host entry point runs: scale, shape, then each named pointer.
template <class T>
status check_call(const char* fn, float scale, int64 batch, int64 seq, int64 hq, int64 hkv, int64 d,
                  std::initializer_list<std::pair<const void*, const char*>> ptrs) {
  KD_TRY(check_float<T>(scale, fn));
  KD_TRY(check_shape(fn, batch, seq, hq, hkv, d));
  for (const auto& [ptr, what] : ptrs) KD_TRY(check_ptr(ptr, what, fn));
  return {};
}

// The shape fields of the row kernels' parameters (the tensors are the caller's to set).
inline rows_params shape_rows_params(int64 batch, int64 seq, int64 hq, int64 hkv, int64 d, float scale) {
  rows_params p;
  p.batch = batch;
  p.seq = seq;
  p.hq = static_cast<int>(hq);
  p.hkv = static_cast<int>(hkv);
  p.d = static_cast<int>(d);
  p.scale = scale;
  return p;
}

// The tensor-core path (bf16, head_dim 64 or 128, 16-byte aligned tensors), and its shared parameters.
template <class T>
bool flash_eligible(int64 seq, int64 d, std::initializer_list<const void*> tensors) {
  if constexpr (!std::is_same_v<T, kd::bfloat16>) {
    return false;
  } else {
    if ((d != 64 && d != 128) || seq > kFlashMaxSeq) return false;
    for (const void* t : tensors)
      if (!aligned16(t)) return false;
    return true;
  }
}
inline flash_params shape_flash_params(const kd::bfloat16* q, const kd::bfloat16* k, const kd::bfloat16* v, int64 seq,
                                       int64 hq, int64 hkv, float scale) {
  flash_params p;
  p.q = q;
  p.k = k;
  p.v = v;
  p.seq = seq;
  p.hq = static_cast<int>(hq);
  p.hkv = static_cast<int>(hkv);
  p.scale = scale;
  p.scale_log2 = scale * kLog2e;
  return p;
}

// Tile choices (H200, bf16, batch 8, seq 1024, 16 / 4 heads): d = 64 runs 128-row forward tiles (32 rows a
// warp, 251 registers, two CTAs an SM) and 128-key backward blocks of 8 warps capped at 128 registers (two
// CTAs, 16 warps an SM); d = 128 needs too many registers for either and runs 64-row forward tiles and
// 8-warp backward blocks at one CTA an SM.
template <int D>
status launch_flash_fwd(cudaStream_t s, const flash_params& p, int64 batch) {
  constexpr int RB = D == 64 ? 2 : 1;
  constexpr int smem = flash_fwd_smem<D, RB>();
  KD_CUDA_TRY(cudaFuncSetAttribute(flash_fwd_kernel<D, RB, 1>, cudaFuncAttributeMaxDynamicSharedMemorySize, smem),
              "attention_forward: cudaFuncSetAttribute");
  const dim3 grid(static_cast<unsigned>(batch * p.hq), static_cast<unsigned>((p.seq + 64 * RB - 1) / (64 * RB)));
  flash_fwd_kernel<D, RB, 1><<<grid, kFlashThreads, smem, s>>>(p);
  KD_CUDA_TRY(cudaGetLastError(), "attention_forward: flash kernel launch");
  return {};
}

template <int D>
status launch_flash_bwd(cudaStream_t s, const flash_params& p, int64 batch) {
  constexpr int WARPS = 8, MINB = D == 64 ? 2 : 1;
  constexpr int smem = flash_bwd_smem<D, WARPS>();
  KD_CUDA_TRY(cudaFuncSetAttribute(flash_bwd_kernel<D, WARPS, MINB>, cudaFuncAttributeMaxDynamicSharedMemorySize, smem),
              "attention_backward: cudaFuncSetAttribute");
  const dim3 grid(static_cast<unsigned>(batch * p.hq), static_cast<unsigned>((p.seq + 16 * WARPS - 1) / (16 * WARPS)));
  flash_bwd_kernel<D, WARPS, MINB><<<grid, WARPS * 32, smem, s>>>(p);
  KD_CUDA_TRY(cudaGetLastError(), "attention_backward: flash kernel launch");
  return {};
}

}  // namespace detail

// o = softmax(scale q k^T, causal) v per (batch, head); lse = log sum exp of each row's scaled scores.
template <class T>
status attention_forward(cudaStream_t s, const T* q, const T* k, const T* v, T* o, float* lse, int64 batch,
                         int64 seq, int64 hq, int64 hkv, int64 d, float scale) {
  KD_TRY(detail::check_call<T>("attention_forward", scale, batch, seq, hq, hkv, d,
                                {{q, "q"}, {k, "k"}, {v, "v"}, {o, "o"}, {lse, "lse"}}));
  if constexpr (std::is_same_v<T, kd::bfloat16>) {
    if (detail::flash_eligible<T>(seq, d, {q, k, v, o})) {
      detail::flash_params p = detail::shape_flash_params(q, k, v, seq, hq, hkv, scale);
      p.o = o;
      p.lse = lse;
      return d == 64 ? detail::launch_flash_fwd<64>(s, p, batch) : detail::launch_flash_fwd<128>(s, p, batch);
    }
  }
  detail::rows_params p = detail::shape_rows_params(batch, seq, hq, hkv, d, scale);
  p.q = q;
  p.k = k;
  p.v = v;
  p.out = o;
  p.lse = lse;
  detail::attn_fwd_rows_kernel<T><<<detail::row_blocks(batch * hq * seq), detail::kRowThreads, 0, s>>>(p);
  KD_CUDA_TRY(cudaGetLastError(), "attention_forward: kernel launch");
  return {};
}

// Workspace of attention_backward (device memory, no alignment beyond cudaMalloc's needed): delta
// [batch, hq, seq] and the fp32 accumulators of dq, dk, dv of the tensor-core path.
inline std::size_t attention_backward_workspace_bytes(int64 batch, int64 seq, int64 hq, int64 hkv, int64 d) {
  if (batch <= 0 || seq <= 0 || hq <= 0 || hkv <= 0 || d <= 0) return 0;
  const auto rows = static_cast<std::size_t>(batch * hq * seq);
  const auto elems = static_cast<std::size_t>(batch * seq * (hq + 2 * hkv) * d);
  return detail::align_up(rows * sizeof(float), 256) + elems * sizeof(float);
}

// dq, dk, dv (overwritten) of attention_forward, from its o and lse. GQA: dk/dv sum over the group.
// deterministic: the row kernels (every sum in a fixed order) instead of the flash kernel, whose dQ / dK /
// dV adds are fp32 atomics in arrival order: bitwise-repeatable training (a resumed run then logs the
// uninterrupted run's losses exactly), at the cost of a slower backward.
template <class T>
status attention_backward(cudaStream_t s, const T* q, const T* k, const T* v, const T* o, const float* lse,
                          const T* dout, T* dq, T* dk, T* dv, int64 batch, int64 seq, int64 hq, int64 hkv, int64 d,
                          float scale, void* workspace, bool deterministic = false) {
  KD_TRY(detail::check_call<T>("attention_backward", scale, batch, seq, hq, hkv, d,
                                {{q, "q"},
                                 {k, "k"},
                                 {v, "v"},
                                 {o, "o"},
                                 {lse, "lse"},
                                 {dout, "dout"},
                                 {dq, "dq"},
                                 {dk, "dk"},
                                 {dv, "dv"},
                                 {workspace, "workspace"}}));
  const int64 rows = batch * hq * seq;
  float* delta = static_cast<float*>(workspace);
  float* dq_acc = reinterpret_cast<float*>(static_cast<unsigned char*>(workspace) +
                                           detail::align_up(static_cast<std::size_t>(rows) * sizeof(float), 256));
  if constexpr (std::is_same_v<T, kd::bfloat16>) {
    if (!deterministic && detail::flash_eligible<T>(seq, d, {q, k, v, o, dout})) {
      const int64 nq = rows * d, nk = batch * seq * hkv * d;
      detail::flash_params p = detail::shape_flash_params(q, k, v, seq, hq, hkv, scale);
      p.lse = const_cast<float*>(lse);  // read only in the backward kernel
      p.dout = dout;
      p.delta = delta;
      p.dq_acc = dq_acc;
      p.dk_acc = dq_acc + nq;
      p.dv_acc = dq_acc + nq + nk;
      // delta and the zeroed dQ accumulator in one pass; dK / dV accumulators by memset.
      const auto delta_blocks = static_cast<unsigned>((rows * (d / 8) + 255) / 256);
      if (d == 64) detail::flash_delta_kernel<64><<<delta_blocks, 256, 0, s>>>(p, o, rows);
      else detail::flash_delta_kernel<128><<<delta_blocks, 256, 0, s>>>(p, o, rows);
      KD_CUDA_TRY(cudaGetLastError(), "attention_backward: delta kernel launch");
      KD_CUDA_TRY(cudaMemsetAsync(p.dk_acc, 0, static_cast<std::size_t>(2 * nk) * sizeof(float), s),
                  "attention_backward: cudaMemsetAsync");
      KD_TRY(d == 64 ? detail::launch_flash_bwd<64>(s, p, batch) : detail::launch_flash_bwd<128>(s, p, batch));
      const unsigned blocks = static_cast<unsigned>(std::min<int64>((nq + 2 * nk + 1023) / 1024, 132 * 16));
      if (reinterpret_cast<std::uintptr_t>(dq) % 8 == 0 && reinterpret_cast<std::uintptr_t>(dk) % 8 == 0 &&
          reinterpret_cast<std::uintptr_t>(dv) % 8 == 0)
        detail::flash_grad_convert_kernel<<<blocks, 256, 0, s>>>(dq_acc, dq, dk, dv, nq, nk, scale);
      else
        detail::attn_grad_convert_kernel<T><<<blocks, 256, 0, s>>>(dq_acc, dq, dk, dv, nq, nk, scale);
      KD_CUDA_TRY(cudaGetLastError(), "attention_backward: gradient convert launch");
      return {};
    }
  }
  detail::rows_params rp = detail::shape_rows_params(batch, seq, hq, hkv, d, scale);
  rp.q = q;
  rp.k = k;
  rp.v = v;
  rp.o = o;
  rp.dout = dout;
  rp.lse_in = lse;
  rp.delta = delta;
  rp.delta_in = delta;
  detail::attn_delta_kernel<T><<<detail::row_blocks(rows), detail::kRowThreads, 0, s>>>(rp);
  KD_CUDA_TRY(cudaGetLastError(), "attention_backward: delta kernel launch");
  rp.out = dq;
  detail::attn_bwd_dq_rows_kernel<T><<<detail::row_blocks(rows), detail::kRowThreads, 0, s>>>(rp);
  KD_CUDA_TRY(cudaGetLastError(), "attention_backward: dq kernel launch");
  rp.out = dk;
  rp.out2 = dv;
  detail::attn_bwd_dkdv_rows_kernel<T><<<detail::row_blocks(batch * hkv * seq), detail::kRowThreads, 0, s>>>(rp);
  KD_CUDA_TRY(cudaGetLastError(), "attention_backward: dk/dv kernel launch");
  return {};
}

// probs [batch, hq, seq, seq] = exp(scale q k^T - lse), zero above the diagonal.
template <class T>
status attention_probs(cudaStream_t s, const T* q, const T* k, const float* lse, T* probs, int64 batch, int64 seq,
                       int64 hq, int64 hkv, int64 d, float scale) {
  KD_TRY(detail::check_call<T>("attention_probs", scale, batch, seq, hq, hkv, d,
                                {{q, "q"}, {k, "k"}, {lse, "lse"}, {probs, "probs"}}));
  if (batch * hq > detail::kMaxGridY) return {errc::invalid_argument, "attention_probs: batch * hq must be at most 65535"};
  detail::rows_params p = detail::shape_rows_params(batch, seq, hq, hkv, d, scale);
  p.q = q;
  p.k = k;
  p.lse_in = lse;
  p.out = probs;
  const unsigned tiles = static_cast<unsigned>((seq + 31) / 32);
  detail::attn_probs_kernel<T><<<dim3(tiles, tiles, static_cast<unsigned>(batch * hq)), 256, 0, s>>>(p);
  KD_CUDA_TRY(cudaGetLastError(), "attention_probs: kernel launch");
  return {};
}

// Workspace of attention_probs_backward: the row sums r [batch, hq, seq].
inline std::size_t attention_probs_backward_workspace_bytes(int64 batch, int64 seq, int64 hq, int64 hkv, int64 d) {
  (void)hkv;
  (void)d;
  if (batch <= 0 || seq <= 0 || hq <= 0) return 0;
  return static_cast<std::size_t>(batch * hq * seq) * sizeof(float);
}

// Backward of attention_probs through the softmax: dS = P (dP - rowsum(dP P)); dq += scale dS k,
// dk += scale dS^T q (summed over the GQA group). Accumulates.
template <class T>
status attention_probs_backward(cudaStream_t s, const T* q, const T* k, const T* probs, const T* dprobs, T* dq,
                                T* dk, int64 batch, int64 seq, int64 hq, int64 hkv, int64 d, float scale,
                                void* workspace) {
  KD_TRY(detail::check_call<T>(
      "attention_probs_backward", scale, batch, seq, hq, hkv, d,
      {{q, "q"}, {k, "k"}, {probs, "probs"}, {dprobs, "dprobs"}, {dq, "dq"}, {dk, "dk"}, {workspace, "workspace"}}));
  detail::rows_params p = detail::shape_rows_params(batch, seq, hq, hkv, d, scale);
  p.q = q;
  p.k = k;
  p.probs = probs;
  p.dprobs = dprobs;
  p.delta = static_cast<float*>(workspace);
  p.delta_in = static_cast<const float*>(workspace);
  const int64 rows = batch * hq * seq;
  detail::attn_probs_rowsum_kernel<T><<<detail::row_blocks(rows), detail::kRowThreads, 0, s>>>(p);
  KD_CUDA_TRY(cudaGetLastError(), "attention_probs_backward: rowsum kernel launch");
  p.out = dq;
  detail::attn_probs_dq_kernel<T><<<detail::row_blocks(rows), detail::kRowThreads, 0, s>>>(p);
  KD_CUDA_TRY(cudaGetLastError(), "attention_probs_backward: dq kernel launch");
  p.out = dk;
  detail::attn_probs_dk_kernel<T><<<detail::row_blocks(batch * hkv * seq), detail::kRowThreads, 0, s>>>(p);
  KD_CUDA_TRY(cudaGetLastError(), "attention_probs_backward: dk kernel launch");
  return {};
}

}  // namespace kd::model::cuda
