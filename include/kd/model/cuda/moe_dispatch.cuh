// kd/model/cuda/moe_dispatch.cuh: the mixture-of-experts kernels: router softmax + top-k and its backward, the
// dispatch of (token, choice) pairs into expert order, and the weighted combine of the expert outputs
// (forward, backward, and the unweighted gather-add of the input gradients).
//
// The launchers assume arguments already validated by kd::model::cuda_ops (kd/model/cuda/ops.cuh).
// Conventions (kd/model/ops.hpp): slot s in [0, N*k) holds token slot_token[s]; token_slot[t*k + j] is the
// slot of choice j of token t; the slots of an expert are one contiguous range, tokens ascending.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <string>
#include <utility>

#include <kd/model/cuda/elementwise.cuh>
#include <kd/model/cuda_limits.hpp>  // kRouterMaxExperts, kRouterMaxTopK

namespace kd::model::cuda::detail {

// ---------------------------------------------------------------------------------------------------
// Router: one warp per token; lane l holds experts l, l + 32, ... (E <= 256, so <= 8 a lane, in
// registers). Softmax in fp32. Top-k by k rounds of warp argmax over the logits (the same order as the
// probabilities, without the ties fp32 rounding of exp could create), ties to the lower index, in
// descending order; with renorm the k weights are divided by their sum.
// ---------------------------------------------------------------------------------------------------
__device__ __forceinline__ bool router_better(float v, int i, float ov, int oi) {
  if (oi < 0) return i >= 0;
  if (i < 0) return false;
  return v > ov || (v == ov && i < oi);
}

template <class T>
__global__ void router_kernel(const T* __restrict__ logits, float* __restrict__ probs, std::int32_t* __restrict__ topk_idx,
                              float* __restrict__ topk_w, long long n, int e, int k, bool renorm) {
  constexpr int per_lane = kRouterMaxExperts / 32;
  const int lane = threadIdx.x & 31;
  const long long t = static_cast<long long>(blockIdx.x) * (blockDim.x / 32) + threadIdx.x / 32;
  if (t >= n) return;
  const T* z_row = logits + t * e;
  float z[per_lane], p[per_lane];
  float m = -INFINITY;
#pragma unroll
  for (int j = 0; j < per_lane; ++j) {
    const int x = lane + 32 * j;
    z[j] = x < e ? to_float(z_row[x]) : -INFINITY;
    m = fmaxf(m, z[j]);
  }
  for (int o = 16; o > 0; o >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, o));
  float s = 0.f;
#pragma unroll
  for (int j = 0; j < per_lane; ++j) {
    p[j] = lane + 32 * j < e ? expf(z[j] - m) : 0.f;
    s += p[j];
  }
  s = warp_sum(s);
#pragma unroll
  for (int j = 0; j < per_lane; ++j) {
    const int x = lane + 32 * j;
    p[j] /= s;
    if (x < e) probs[t * e + x] = p[j];
  }
  unsigned taken = 0;
  float wsum = 0.f, w_mine = 0.f;  // lane r keeps the weight of choice r
  int idx_mine = 0;
  for (int r = 0; r < k; ++r) {
    float bv = -INFINITY, bp = 0.f;
    int bi = -1;
#pragma unroll
    for (int j = 0; j < per_lane; ++j) {
      const int x = lane + 32 * j;
      if (x < e && !((taken >> j) & 1u) && router_better(z[j], x, bv, bi)) {
        bv = z[j];
        bi = x;
        bp = p[j];
      }
    }
    for (int o = 16; o > 0; o >>= 1) {
      const float ov = __shfl_xor_sync(0xffffffffu, bv, o);
      const int oi = __shfl_xor_sync(0xffffffffu, bi, o);
      const float op = __shfl_xor_sync(0xffffffffu, bp, o);
      if (router_better(ov, oi, bv, bi)) {
        bv = ov;
        bi = oi;
        bp = op;
      }
    }
    if ((bi & 31) == lane) taken |= 1u << (bi >> 5);
    wsum += bp;
    if (lane == r) {
      w_mine = bp;
      idx_mine = bi;
    }
  }
  if (lane < k) {
    topk_idx[t * k + lane] = idx_mine;
    topk_w[t * k + lane] = renorm ? w_mine / wsum : w_mine;
  }
}

template <class T>
status launch_router(cudaStream_t s, const T* logits, float* probs, std::int32_t* topk_idx, float* topk_w, std::int64_t n,
                     std::int64_t e, std::int64_t k, bool renorm) {
  if (n == 0) return {};
  constexpr int warps = 8;
  router_kernel<T><<<static_cast<unsigned>((n + warps - 1) / warps), warps * 32, 0, s>>>(
      logits, probs, topk_idx, topk_w, n, static_cast<int>(e), static_cast<int>(k), renorm);
  KD_CUDA_TRY(cudaGetLastError(), "router kernel launch");
  return {};
}

// Router backward, one warp per token as in the forward. dp (the gradient of the probabilities) is
// dprobs_extra (or 0) plus, at each chosen expert, dw_j (no renorm) or (dw_j - sum_l dw_l w_l) / S with
// S = sum of the chosen probabilities (renorm); then dz = p (dp - sum_e p_e dp_e), overwriting dlogits.
template <class T>
__global__ void router_bwd_kernel(const float* __restrict__ probs, const std::int32_t* __restrict__ topk_idx,
                                  const float* __restrict__ dtopk_w, const float* __restrict__ dprobs_extra,
                                  T* __restrict__ dlogits, long long n, int e, int k, bool renorm) {
  constexpr int per_lane = kRouterMaxExperts / 32;
  const int lane = threadIdx.x & 31;
  const long long t = static_cast<long long>(blockIdx.x) * (blockDim.x / 32) + threadIdx.x / 32;
  if (t >= n) return;
  float p[per_lane], g[per_lane];
#pragma unroll
  for (int j = 0; j < per_lane; ++j) {
    const int x = lane + 32 * j;
    p[j] = x < e ? probs[t * e + x] : 0.f;
    g[j] = x < e && dprobs_extra != nullptr ? dprobs_extra[t * e + x] : 0.f;
  }
  // Every lane reads the k choices (k <= 8, broadcast loads).
  float S = 0.f, dot = 0.f;
  if (renorm) {
    for (int r = 0; r < k; ++r) S += probs[t * e + topk_idx[t * k + r]];
    for (int r = 0; r < k; ++r) dot += dtopk_w[t * k + r] * (probs[t * e + topk_idx[t * k + r]] / S);
  }
  for (int r = 0; r < k; ++r) {
    const int x = topk_idx[t * k + r];
    const float dw = dtopk_w[t * k + r];
    const float c = renorm ? (dw - dot) / S : dw;
#pragma unroll
    for (int j = 0; j < per_lane; ++j)
      if (lane + 32 * j == x) g[j] += c;
  }
  float pg = 0.f;
#pragma unroll
  for (int j = 0; j < per_lane; ++j) pg += p[j] * g[j];
  pg = warp_sum(pg);
#pragma unroll
  for (int j = 0; j < per_lane; ++j) {
    const int x = lane + 32 * j;
    if (x < e) dlogits[t * e + x] = from_float<T>(p[j] * (g[j] - pg));
  }
}

template <class T>
status launch_router_bwd(cudaStream_t s, const float* probs, const std::int32_t* topk_idx, const float* dtopk_w,
                         const float* dprobs_extra, T* dlogits, std::int64_t n, std::int64_t e, std::int64_t k, bool renorm) {
  if (n == 0) return {};
  constexpr int warps = 8;
  router_bwd_kernel<T><<<static_cast<unsigned>((n + warps - 1) / warps), warps * 32, 0, s>>>(
      probs, topk_idx, dtopk_w, dprobs_extra, dlogits, n, static_cast<int>(e), static_cast<int>(k), renorm);
  KD_CUDA_TRY(cudaGetLastError(), "router_bwd kernel launch");
  return {};
}

// ---------------------------------------------------------------------------------------------------
// Dispatch: a counting sort of the N*k pairs by expert on the device.
//  1. histogram (shared-memory counts per block, then one global atomic per expert and block);
//  2. one block per expert: its base is the sum of the counts before it; it walks the pairs in order in
//     tiles, each thread counting its consecutive pairs that are "mine", and a block-wide exclusive scan
//     of those counts gives each pair its rank, so the placement is stable (pair order = token order,
//     then choice order) and deterministic.
// Ids outside [0, E) are counted nowhere; the host sees it in the counts (it synchronises anyway).
// Each expert block re-reads the N*k ids (L2-resident: 256 KiB at 8192 tokens x 8 choices).
// ---------------------------------------------------------------------------------------------------
template <int = 0>
__global__ void dispatch_histogram_kernel(const std::int32_t* __restrict__ ids, long long pairs, int e,
                                          unsigned* __restrict__ counts) {
  __shared__ unsigned local[kRouterMaxExperts];
  for (int i = threadIdx.x; i < e; i += blockDim.x) local[i] = 0;
  __syncthreads();
  for (long long i = blockIdx.x * static_cast<long long>(blockDim.x) + threadIdx.x; i < pairs;
       i += static_cast<long long>(gridDim.x) * blockDim.x) {
    const int x = ids[i];
    if (x >= 0 && x < e) atomicAdd(&local[x], 1u);
  }
  __syncthreads();
  for (int i = threadIdx.x; i < e; i += blockDim.x)
    if (local[i] != 0) atomicAdd(&counts[i], local[i]);
}

// Each warp owns kDispatchItems x 32 consecutive pairs of a tile and walks them 32 at a time: a ballot of
// "pair is mine" counts them, the warps' counts are scanned through shared memory, and a second walk
// places each pair at its warp's base + the ballot bits below its lane. One tile is 8192 pairs (a scan per
// 256 pairs, as before, made the placement the slowest op of the MoE block).
inline constexpr int kDispatchThreads = 512;
inline constexpr int kDispatchItems = 16;

template <int = 0>
__global__ void __launch_bounds__(kDispatchThreads) dispatch_place_kernel(
    const std::int32_t* __restrict__ ids, long long pairs, int k, const unsigned* __restrict__ counts,
    std::int32_t* __restrict__ slot_token, std::int32_t* __restrict__ token_slot, long long* __restrict__ counts64) {
  constexpr int warps = kDispatchThreads / 32, per_warp = 32 * kDispatchItems, tile = warps * per_warp;
  __shared__ int warp_count[warps];
  __shared__ long long base_s;
  const int ex = blockIdx.x, lane = threadIdx.x & 31, w = threadIdx.x / 32;
  const unsigned below = (1u << lane) - 1u;
  if (threadIdx.x == 0) {
    long long b = 0;
    for (int f = 0; f < ex; ++f) b += counts[f];
    base_s = b;
    counts64[ex] = counts[ex];
  }
  __syncthreads();
  long long next = base_s;
  for (long long t0 = 0; t0 < pairs; t0 += tile) {
    const long long w0 = t0 + static_cast<long long>(w) * per_warp;
    int mine = 0;
#pragma unroll
    for (int j = 0; j < kDispatchItems; ++j) {
      const long long i = w0 + 32 * j + lane;
      mine += __popc(__ballot_sync(0xffffffffu, i < pairs && ids[i] == ex));
    }
    if (lane == 0) warp_count[w] = mine;
    __syncthreads();
    long long slot = next, total = 0;
#pragma unroll
    for (int v = 0; v < warps; ++v) {
      slot += v < w ? warp_count[v] : 0;
      total += warp_count[v];
    }
#pragma unroll
    for (int j = 0; j < kDispatchItems; ++j) {
      const long long i = w0 + 32 * j + lane;
      const bool is_mine = i < pairs && ids[i] == ex;
      const unsigned m = __ballot_sync(0xffffffffu, is_mine);
      if (is_mine) {
        const long long at = slot + __popc(m & below);
        slot_token[at] = static_cast<std::int32_t>(i / k);
        token_slot[i] = static_cast<std::int32_t>(at);
      }
      slot += __popc(m);
    }
    next += total;
    __syncthreads();  // warp_count is rewritten by the next tile
  }
}

// Scratch bytes moe_dispatch needs: E unsigned counts and E 64-bit counts.
inline std::size_t dispatch_scratch_bytes(std::int64_t e) {
  return align256(static_cast<std::size_t>(e) * sizeof(unsigned)) + static_cast<std::size_t>(e) * sizeof(long long);
}

// Enqueues the counting sort and the copy of the E counts into pinned host memory; does not wait (the
// caller records an event after it and collects the counts with it: dispatch_counts below).
template <int = 0>
status launch_dispatch(cudaStream_t s, const std::int32_t* ids, std::int64_t n, std::int64_t e, std::int64_t k,
                       std::int32_t* slot_token, std::int32_t* token_slot, long long* counts_pinned, void* scratch) {
  auto* counts = static_cast<unsigned*>(scratch);
  auto* counts64 = reinterpret_cast<long long*>(static_cast<char*>(scratch) + align256(static_cast<std::size_t>(e) * sizeof(unsigned)));
  const std::int64_t pairs = n * k;
  KD_CUDA_TRY(cudaMemsetAsync(counts, 0, static_cast<std::size_t>(e) * sizeof(unsigned), s), "moe_dispatch: cudaMemsetAsync");
  if (pairs > 0) {
    dispatch_histogram_kernel<><<<std::min<unsigned>(grid_for(pairs, 256), 512), 256, 0, s>>>(ids, pairs, static_cast<int>(e), counts);
    KD_CUDA_TRY(cudaGetLastError(), "moe_dispatch histogram kernel launch");
  }
  dispatch_place_kernel<><<<static_cast<unsigned>(e), kDispatchThreads, 0, s>>>(ids, pairs, static_cast<int>(k), counts,
                                                                                 slot_token, token_slot, counts64);
  KD_CUDA_TRY(cudaGetLastError(), "moe_dispatch placement kernel launch");
  KD_CUDA_TRY(cudaMemcpyAsync(counts_pinned, counts64, static_cast<std::size_t>(e) * sizeof(long long), cudaMemcpyDeviceToHost, s),
              "moe_dispatch: cudaMemcpyAsync (counts)");
  return {};
}

// How moe_dispatch's expert counts reach the host. The GEMMs of the experts need the counts on the
// host (cuBLAS takes extents by value), so one wait per MoE layer is unavoidable; waiting on an event
// right after the sort, not on the whole stream at dispatch, lets the host queue the work that does not
// need the counts (the gather of the rows, the residual) first, so the GPU is busy while the host waits.
class dispatch_counts {
 public:
  static constexpr std::int64_t max_experts = 256;
  dispatch_counts() = default;
  dispatch_counts(const dispatch_counts&) = delete;
  dispatch_counts& operator=(const dispatch_counts&) = delete;
  ~dispatch_counts() {
    if (pinned_ != nullptr) cudaFreeHost(pinned_);
    if (ready_ != nullptr) cudaEventDestroy(ready_);
  }

  // Pinned buffer and event, created on first use.
  status init(long long*& pinned) {
    if (pinned_ == nullptr) {
      KD_CUDA_TRY(cudaMallocHost(&pinned_, max_experts * sizeof(long long)), "moe_dispatch: cudaMallocHost (counts)");
      KD_CUDA_TRY(cudaEventCreateWithFlags(&ready_, cudaEventDisableTiming), "moe_dispatch: cudaEventCreate");
    }
    pinned = pinned_;
    return {};
  }
  // After launch_dispatch: the counts are complete when the stream passes this point.
  status post(cudaStream_t s, std::int64_t* dst, std::int64_t e, std::int64_t pairs) {
    KD_CUDA_TRY(cudaEventRecord(ready_, s), "moe_dispatch: cudaEventRecord");
    dst_ = dst;
    e_ = e;
    pairs_ = pairs;
    return {};
  }
  // Waits for the posted counts (if any), copies them to their destination and checks that they add up
  // to the number of pairs (an expert id outside [0, E) is counted nowhere).
  status collect() {
    if (dst_ == nullptr) return {};
    std::int64_t* dst = std::exchange(dst_, nullptr);
    KD_CUDA_TRY(cudaEventSynchronize(ready_), "moe_dispatch: cudaEventSynchronize (counts)");
    std::int64_t total = 0;
    for (std::int64_t x = 0; x < e_; ++x) total += dst[x] = pinned_[x];
    if (total != pairs_)
      return {errc::out_of_range, "cuda_ops::moe_dispatch: " + std::to_string(pairs_ - total) +
                                      " entries of topk_idx are outside [0, " + std::to_string(e_) + ")"};
    return {};
  }

 private:
  long long* pinned_ = nullptr;
  cudaEvent_t ready_ = nullptr;
  std::int64_t* dst_ = nullptr;
  std::int64_t e_ = 0, pairs_ = 0;
};

// ---------------------------------------------------------------------------------------------------
// Combine: out[t] = residual[t] + sum_j w[t, j] y[token_slot[t*k + j]] (Weighted), or the gather-add of the
// backward, dx[t] = residual[t] + sum_j dy[slot] (+ dlogits[t] . w_router, the router's input gradient:
// E fused multiply-adds a vector against the L1-resident router weight, instead of a separate N = E GEMM
// that reads and writes dx again); residual may be null (no term) or out itself (+=). Taking
// the residual as an input lets the MoE block write x_mid + moe(x_mid) in one pass, with no copy of the
// residual stream first. Grid-stride over 16-byte vectors of out; the k rows are summed in fp32 in choice
// order, on top of the residual, and the result is rounded once.
// ---------------------------------------------------------------------------------------------------
template <class T, bool Vec, bool Weighted>
__global__ void combine_kernel(const T* __restrict__ y, const std::int32_t* __restrict__ token_slot,
                               const float* __restrict__ w, const T* residual, T* out, long long n, int k, long long h,
                               const T* __restrict__ dlogits = nullptr, const T* __restrict__ w_router = nullptr,
                               int e = 0) {
  constexpr int vn = Vec ? vec_n<T> : 1;
  const long long per_row = h / vn;
  for (long long v = blockIdx.x * static_cast<long long>(blockDim.x) + threadIdx.x; v < n * per_row;
       v += static_cast<long long>(gridDim.x) * blockDim.x) {
    long long t, c;
    split_index(v, per_row, t, c);
    c *= vn;
    float acc[vn];
    if (residual != nullptr) {
      if constexpr (Vec) unpack<T>(*reinterpret_cast<const uint4*>(residual + t * h + c), acc);
      else acc[0] = to_float(residual[t * h + c]);
    } else {
#pragma unroll
      for (int q = 0; q < vn; ++q) acc[q] = 0.f;
    }
    for (int j = 0; j < k; ++j) {
      const long long slot = token_slot[t * k + j];
      const float wj = Weighted ? w[t * k + j] : 1.f;
      const T* src = y + slot * h + c;
      if constexpr (Vec) {
        float f[vn];
        unpack<T>(*reinterpret_cast<const uint4*>(src), f);
#pragma unroll
        for (int q = 0; q < vn; ++q) acc[q] += wj * f[q];
      } else {
        acc[0] += wj * to_float(*src);
      }
    }
    for (int x = 0; x < e; ++x) {
      const float g = to_float(dlogits[t * e + x]);
      const T* wr = w_router + static_cast<long long>(x) * h + c;
      if constexpr (Vec) {
        float f[vn];
        unpack<T>(*reinterpret_cast<const uint4*>(wr), f);
#pragma unroll
        for (int q = 0; q < vn; ++q) acc[q] += g * f[q];
      } else {
        acc[0] += g * to_float(*wr);
      }
    }
    T* dst = out + t * h + c;
    if constexpr (Vec) *reinterpret_cast<uint4*>(dst) = pack<T>(acc);
    else *dst = from_float<T>(acc[0]);
  }
}

template <class T, bool Weighted>
status launch_combine(cudaStream_t s, const T* y, const std::int32_t* token_slot, const float* w, const T* residual,
                      T* out, std::int64_t n, std::int64_t k, std::int64_t h, const char* what,
                      const T* dlogits = nullptr, const T* w_router = nullptr, std::int64_t e = 0) {
  if (n == 0 || h == 0) return {};
  const bool vec = h % vec_n<T> == 0 && vec_aligned(y) && vec_aligned(out) &&
                   (residual == nullptr || vec_aligned(residual)) && (e == 0 || vec_aligned(w_router));
  const std::int64_t work = n * h / (vec ? vec_n<T> : 1);
  const int ei = static_cast<int>(e);
  if (vec)
    combine_kernel<T, true, Weighted><<<grid_for(work, 256), 256, 0, s>>>(y, token_slot, w, residual, out, n,
                                                                          static_cast<int>(k), h, dlogits, w_router, ei);
  else
    combine_kernel<T, false, Weighted><<<grid_for(work, 256), 256, 0, s>>>(y, token_slot, w, residual, out, n,
                                                                           static_cast<int>(k), h, dlogits, w_router, ei);
  KD_CUDA_TRY(cudaGetLastError(), what);
  return {};
}

// Combine backward, one warp per token: for each choice j, dy[slot] = w[t, j] dout[t] (every slot is one
// choice's, so dy is fully overwritten when token_slot is a permutation of [0, N*k), as moe_dispatch
// makes it) and dtopk_w[t, j] = dout[t] . y[slot] (fp32, warp reduction, overwritten).
template <class T, bool Vec>
__global__ void combine_bwd_kernel(const T* __restrict__ y, const std::int32_t* __restrict__ token_slot,
                                   const float* __restrict__ w, const T* __restrict__ dout, T* __restrict__ dy,
                                   float* __restrict__ dtopk_w, long long n, int k, long long h) {
  constexpr int vn = Vec ? vec_n<T> : 1;
  const int lane = threadIdx.x & 31;
  const long long t = static_cast<long long>(blockIdx.x) * (blockDim.x / 32) + threadIdx.x / 32;
  if (t >= n) return;
  const T* g = dout + t * h;
  for (int j = 0; j < k; ++j) {
    const long long slot = token_slot[t * k + j];
    const float wj = w[t * k + j];
    const T* yr = y + slot * h;
    T* dyr = dy + slot * h;
    float dot = 0.f;
    for (long long c = lane * static_cast<long long>(vn); c < h; c += 32LL * vn) {
      if constexpr (Vec) {
        float a[vn], b[vn];
        unpack<T>(*reinterpret_cast<const uint4*>(g + c), a);
        unpack<T>(*reinterpret_cast<const uint4*>(yr + c), b);
#pragma unroll
        for (int q = 0; q < vn; ++q) {
          dot += a[q] * b[q];
          a[q] *= wj;
        }
        *reinterpret_cast<uint4*>(dyr + c) = pack<T>(a);
      } else {
        const float a = to_float(g[c]);
        dot += a * to_float(yr[c]);
        dyr[c] = from_float<T>(wj * a);
      }
    }
    dot = warp_sum(dot);
    if (lane == 0) dtopk_w[t * k + j] = dot;
  }
}

template <class T>
status launch_combine_bwd(cudaStream_t s, const T* y, const std::int32_t* token_slot, const float* w, const T* dout, T* dy,
                          float* dtopk_w, std::int64_t n, std::int64_t k, std::int64_t h) {
  if (n == 0) return {};
  constexpr int warps = 8;
  const unsigned blocks = static_cast<unsigned>((n + warps - 1) / warps);
  const bool vec = h % vec_n<T> == 0 && vec_aligned(y) && vec_aligned(dout) && vec_aligned(dy);
  if (vec) combine_bwd_kernel<T, true><<<blocks, warps * 32, 0, s>>>(y, token_slot, w, dout, dy, dtopk_w, n, static_cast<int>(k), h);
  else combine_bwd_kernel<T, false><<<blocks, warps * 32, 0, s>>>(y, token_slot, w, dout, dy, dtopk_w, n, static_cast<int>(k), h);
  KD_CUDA_TRY(cudaGetLastError(), "moe_combine_bwd kernel launch");
  return {};
}

}  // namespace kd::model::cuda::detail
