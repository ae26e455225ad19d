// kd/model/cuda/norm.cuh: RMSNorm forward / backward and rotary position embedding (RoPE) kernels.
//
// The launchers assume arguments already validated by kd::model::cuda_ops (kd/model/cuda/ops.cuh): non-negative
// extents, non-null pointers where extents are non-zero. Rows are read in 16-byte vectors when the row
// length and the pointers allow it, element by element otherwise; all arithmetic is fp32.
#pragma once

#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <string>
#include <type_traits>

#include <kd/cuda/context.cuh>
#include <kd/cuda/detail/reduce.cuh>
#include <kd/cuda/detail/storage.cuh>
#include <kd/core/status.hpp>

namespace kd::model::cuda::detail {

using ::kd::cuda::detail::from_float;
using ::kd::cuda::detail::pack;
using ::kd::cuda::detail::to_float;
using ::kd::cuda::detail::unpack;
using ::kd::cuda::detail::vec_n;
using ::kd::cuda::detail::warp_sum;

inline bool vec_aligned(const void* p) { return reinterpret_cast<std::uintptr_t>(p) % 16 == 0; }

// Blocks of a grid-stride launch over `work` items with `threads` threads a block: enough to fill the
// GPU, capped so very large tensors reuse threads instead of launching millions of blocks.
inline unsigned grid_for(std::int64_t work, int threads) {
  const std::int64_t b = (work + threads - 1) / threads;
  return static_cast<unsigned>(std::clamp<std::int64_t>(b, 1, 8192));
}

// ---------------------------------------------------------------------------------------------------
// RMSNorm forward: y = x * rstd * w, rstd = 1 / sqrt(mean(x^2) + eps).
// L lanes per row (a warp, or a slice of one): a row of the model (576 to a few thousand elements) is a
// few 16-byte vectors per lane, so a warp reduction (no shared memory, no block barrier) is enough; a
// per-head QK-norm row (head_dim 64 = eight 16-byte vectors) takes 8 lanes, so four rows share a warp
// instead of leaving 24 lanes idle. x is read twice (the second pass hits L1/L2); y is written once.
// ---------------------------------------------------------------------------------------------------
// Sum over aligned groups of L lanes (every lane of the warp takes part).
template <int L>
__device__ __forceinline__ float group_sum(float v) {
#pragma unroll
  for (int o = L / 2; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// Lanes per row for rows of d elements read as vectors of vn: a power of two in [4, 32].
inline int lanes_per_row(std::int64_t d, int vn) {
  const std::int64_t vecs = (d + vn - 1) / vn;
  int l = 4;
  while (l < 32 && l < vecs) l *= 2;
  return l;
}

// cos / sin of every (token, frequency) pair, cs[t * half + i] = (cos, sin)(pos[t] * inv_freq[i]), the
// angle reduced in double as in rope_kernel. The fused QK-norm kernels read it (L2-resident: 8192 tokens x
// 32 pairs is 2 MiB) instead of evaluating sincos once per head.
template <int = 0>
__global__ void rope_cos_sin_kernel(const std::int32_t* __restrict__ pos, const double* __restrict__ inv_freq,
                                    float2* __restrict__ cs, long long tokens, int half) {
  constexpr double two_pi = 6.283185307179586;
  const long long k = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (k >= tokens * half) return;
  const long long t = k / half;
  const int i = static_cast<int>(k % half);
  const double a = static_cast<double>(pos[t]) * inv_freq[i];
  float sn, c;
  sincosf(static_cast<float>(fma(-rint(a / two_pi), two_pi, a)), &sn, &c);
  cs[k] = make_float2(c, sn);
}

inline std::size_t rope_cos_sin_bytes(std::int64_t tokens, std::int64_t d) {
  return static_cast<std::size_t>(tokens * (d / 2)) * sizeof(float2);
}

template <int = 0>
status launch_rope_cos_sin(cudaStream_t s, const std::int32_t* pos, const double* inv_freq, float2* cs,
                           std::int64_t tokens, std::int64_t d) {
  const std::int64_t n = tokens * (d / 2);
  if (n == 0) return {};
  rope_cos_sin_kernel<><<<static_cast<unsigned>((n + 255) / 256), 256, 0, s>>>(pos, inv_freq, cs, tokens,
                                                                               static_cast<int>(d / 2));
  KD_CUDA_TRY(cudaGetLastError(), "rope cos/sin kernel launch");
  return {};
}

// RoPE on a normalised row held one 16-byte vector per lane (d == L * vn): lane `sub` holds elements
// [sub * vn, sub * vn + vn); the partner of element i < d/2 is i + d/2, held by lane sub ^ (L / 2).
// cs: the row's token's (cos, sin) pairs. inverse rotates by -angle (the backward of the rotation).
// Every lane of the warp must call it.
template <int L, int VN>
__device__ __forceinline__ void rope_in_lanes(float (&v)[VN], int sub, const float2* __restrict__ cs, bool inverse) {
  const int half = L * VN / 2;
  const bool upper = sub >= L / 2;
#pragma unroll
  for (int k = 0; k < VN; ++k) {
    const float other = __shfl_xor_sync(0xffffffffu, v[k], L / 2);
    const float2 c = cs[(sub * VN + k) % half];
    const float sn = inverse ? -c.y : c.y;
    v[k] = upper ? v[k] * c.x + other * sn : v[k] * c.x - other * sn;
  }
}

template <class T, bool Vec, int L, bool Rope = false>
__global__ void rmsnorm_kernel(const T* __restrict__ x, const T* __restrict__ w, T* __restrict__ y,
                               float* __restrict__ rstd, long long rows, int d, float eps,
                               const float2* __restrict__ cs = nullptr, int heads = 1, long long x_ld = 0,
                               T* __restrict__ x_copy = nullptr) {
  constexpr int G = 32 / L;  // rows a warp
  const int lane = threadIdx.x & 31, sub = lane % L;
  const long long row = (static_cast<long long>(blockIdx.x) * (blockDim.x / 32) + threadIdx.x / 32) * G + lane / L;
  const bool active = row < rows;
  if (__all_sync(0xffffffffu, !active)) return;
  // With RoPE, x may be a column slice of a wider matrix (the fused QKV output): token stride x_ld.
  const long long rr = active ? row : 0;
  const T* xr = Rope ? x + (rr / heads) * x_ld + (rr % heads) * d : x + rr * d;
  T* yr = y + row * d;
  constexpr int vn = vec_n<T>;
  float ss = 0.f;
  if (active) {
    if constexpr (Vec) {
      const uint4* x4 = reinterpret_cast<const uint4*>(xr);
      for (int i = sub; i < d / vn; i += L) {
        float f[vn];
        unpack<T>(x4[i], f);
#pragma unroll
        for (int k = 0; k < vn; ++k) ss += f[k] * f[k];
      }
    } else {
      for (int i = sub; i < d; i += L) {
        const float v = to_float(xr[i]);
        ss += v * v;
      }
    }
  }
  ss = group_sum<L>(ss);
  const float r = 1.f / sqrtf(ss / static_cast<float>(d) + eps);
  if constexpr (Rope) {
    // Per-head QK norm fused with RoPE (d == L * vn): one vector per lane, rotated before the one store.
    static_assert(Vec, "the fused RoPE path reads 16-byte vectors");
    float f[vn], g[vn];
    if (active) {
      unpack<T>(reinterpret_cast<const uint4*>(xr)[sub], f);
      unpack<T>(reinterpret_cast<const uint4*>(w)[sub], g);
    } else {
      for (int k = 0; k < vn; ++k) f[k] = g[k] = 0.f;
    }
#pragma unroll
    for (int k = 0; k < vn; ++k) f[k] = f[k] * r * g[k];
    rope_in_lanes<L>(f, sub, cs + (active ? row / heads : 0) * (d / 2), false);
    if (active) {
      reinterpret_cast<uint4*>(yr)[sub] = pack<T>(f);
      if (sub == 0) rstd[row] = r;
    }
    return;
  }
  if (!active) return;
  if (sub == 0) rstd[row] = r;
  if constexpr (Vec) {
    const uint4* x4 = reinterpret_cast<const uint4*>(xr);
    const uint4* w4 = reinterpret_cast<const uint4*>(w);
    uint4* y4 = reinterpret_cast<uint4*>(yr);
    uint4* c4 = x_copy != nullptr ? reinterpret_cast<uint4*>(x_copy + row * d) : nullptr;
    for (int i = sub; i < d / vn; i += L) {
      float f[vn], g[vn];
      const uint4 xv = x4[i];
      if (c4 != nullptr) c4[i] = xv;
      unpack<T>(xv, f);
      unpack<T>(w4[i], g);
#pragma unroll
      for (int k = 0; k < vn; ++k) f[k] = f[k] * r * g[k];
      y4[i] = pack<T>(f);
    }
  } else {
    for (int i = sub; i < d; i += L) {
      if (x_copy != nullptr) x_copy[row * d + i] = xr[i];
      yr[i] = from_float<T>(to_float(xr[i]) * r * to_float(w[i]));
    }
  }
}

// Calls f(std::integral_constant<int, L>) for the runtime lanes-per-row l.
template <class F>
status with_lanes(int l, F&& f) {
  switch (l) {
    case 4: return f(std::integral_constant<int, 4>{});
    case 8: return f(std::integral_constant<int, 8>{});
    case 16: return f(std::integral_constant<int, 16>{});
    default: return f(std::integral_constant<int, 32>{});
  }
}

template <class T>
status launch_rmsnorm(cudaStream_t s, const T* x, const T* w, T* y, float* rstd, std::int64_t rows, std::int64_t d,
                      float eps, T* x_copy = nullptr) {
  if (rows == 0) return {};
  constexpr int warps = 8;
  const bool vec = d % vec_n<T> == 0 && vec_aligned(x) && vec_aligned(w) && vec_aligned(y) &&
                   (x_copy == nullptr || vec_aligned(x_copy));
  const int l = vec ? lanes_per_row(d, vec_n<T>) : 32;
  return with_lanes(l, [&](auto lc) -> status {
    constexpr int L = decltype(lc)::value;
    const std::int64_t per_block = warps * (32 / L);
    const unsigned blocks = static_cast<unsigned>((rows + per_block - 1) / per_block);
    if (vec)
      rmsnorm_kernel<T, true, L><<<blocks, warps * 32, 0, s>>>(x, w, y, rstd, rows, static_cast<int>(d), eps, nullptr, 1, 0,
                                                               x_copy);
    else
      rmsnorm_kernel<T, false, L><<<blocks, warps * 32, 0, s>>>(x, w, y, rstd, rows, static_cast<int>(d), eps, nullptr, 1,
                                                                0, x_copy);
    KD_CUDA_TRY(cudaGetLastError(), "rmsnorm kernel launch");
    return {};
  });
}

// Whether rmsnorm_rope can run fused: one 16-byte vector per lane of a power-of-two lane group.
template <class T>
bool rope_fusable(std::int64_t d, const void* a, const void* b, const void* c, const void* e) {
  return d % vec_n<T> == 0 && lanes_per_row(d, vec_n<T>) == d / vec_n<T> && vec_aligned(a) && vec_aligned(b) &&
         vec_aligned(c) && vec_aligned(e);
}

// y = rope(rmsnorm(x)) over rows = tokens * heads (the per-head QK norm of Qwen3, then RoPE), fused.
template <class T>
status launch_rmsnorm_rope(cudaStream_t s, const T* x, const T* w, T* y, float* rstd, const float2* cs,
                           std::int64_t tokens, std::int64_t heads, std::int64_t d, float eps, std::int64_t x_ld) {
  const std::int64_t rows = tokens * heads;
  if (rows == 0) return {};
  constexpr int warps = 8;
  return with_lanes(lanes_per_row(d, vec_n<T>), [&](auto lc) -> status {
    constexpr int L = decltype(lc)::value;
    const std::int64_t per_block = warps * (32 / L);
    const unsigned blocks = static_cast<unsigned>((rows + per_block - 1) / per_block);
    rmsnorm_kernel<T, true, L, true><<<blocks, warps * 32, 0, s>>>(x, w, y, rstd, rows, static_cast<int>(d), eps, cs,
                                                                   static_cast<int>(heads), x_ld);
    KD_CUDA_TRY(cudaGetLastError(), "rmsnorm_rope kernel launch");
    return {};
  });
}

// ---------------------------------------------------------------------------------------------------
// RMSNorm backward. With g = dy * w and c = sum_i g_i x_i over a row:
//   dx = rstd * g - (rstd^3 / D) * c * x,     dw += sum over rows of dy * x * rstd.
// dx: one warp per row, as in the forward. dw: a column sum over all rows, done deterministically in two
// steps: every block owns a fixed range of rows and each of its warps keeps a private fp32 row of
// partial dw in shared memory (a lane only touches its own columns, so no atomics); the block folds its
// warps in a fixed order into one fp32 row of a scratch array, and rmsnorm_dw_reduce_kernel folds the
// blocks' rows in a fixed order into dw, rounding once. The block count is a function of R only, so
// the result does not depend on the GPU.
// ---------------------------------------------------------------------------------------------------
inline constexpr int kNormBwdMaxBlocks = 512;

template <class T, bool Vec, int L, bool Rope = false>
__global__ void rmsnorm_bwd_kernel(const T* __restrict__ x, const T* __restrict__ w, const float* __restrict__ rstd,
                                   const T* __restrict__ dy, T* __restrict__ dx, float* __restrict__ partial,
                                   long long rows, int d, long long rows_per_block, bool accumulate_dx,
                                   const float2* __restrict__ cs = nullptr, int heads = 1, long long ld = 0) {
  extern __shared__ float4 norm_smem4[];
  constexpr int G = 32 / L;  // rows a warp works on at once, each with its own partial dw row
  float* part_all = reinterpret_cast<float*>(norm_smem4);
  const int lane = threadIdx.x & 31, sub = lane % L, warp = threadIdx.x / 32, warps = blockDim.x / 32;
  const int slot = warp * G + lane / L, slots = warps * G;
  float* part = part_all + static_cast<long long>(slot) * d;
  constexpr int vn = vec_n<T>;
  for (int i = sub; i < d; i += L) part[i] = 0.f;
  const long long r0 = blockIdx.x * rows_per_block;
  const long long r1 = min(rows, r0 + rows_per_block);
  // The loop runs the same number of times on every lane of a warp (the group reduction needs them all).
  for (long long base = r0 + warp * G; base < r1; base += slots) {
    const long long row = base + lane / L;
    const bool active = row < r1;
    const long long rr = active ? row : r0;
    // With RoPE, x and dx may be column slices of a wider matrix (the fused QKV output and its gradient):
    // token stride ld.
    const T* xr = Rope ? x + (rr / heads) * ld + (rr % heads) * d : x + rr * d;
    const T* dyr = dy + rr * d;
    T* dxr = Rope ? dx + (row / heads) * ld + (row % heads) * d : dx + row * d;
    const float r = active ? rstd[row] : 0.f;
    float c = 0.f;
    if constexpr (Rope) {
      // dy is the gradient of the rotated row: rotate it back (every lane, then the usual backward on one
      // vector per lane, the rotated dy kept in registers).
      static_assert(Vec, "the fused RoPE path reads 16-byte vectors");
      float a[vn], b[vn], e[vn], o[vn];
      if (active) {
        unpack<T>(reinterpret_cast<const uint4*>(xr)[sub], a);
        unpack<T>(reinterpret_cast<const uint4*>(w)[sub], b);
        unpack<T>(reinterpret_cast<const uint4*>(dyr)[sub], e);
      } else {
        for (int k = 0; k < vn; ++k) a[k] = b[k] = e[k] = 0.f;
      }
      rope_in_lanes<L>(e, sub, cs + (active ? row / heads : r0 / heads) * (d / 2), true);
#pragma unroll
      for (int k = 0; k < vn; ++k) c += e[k] * b[k] * a[k];
      c = group_sum<L>(c);
      if (!active) continue;
      const float coef = r * r * r * c / static_cast<float>(d);
#pragma unroll
      for (int k = 0; k < vn; ++k) o[k] = r * e[k] * b[k] - coef * a[k];
      ::kd::cuda::detail::store_grad_vec<T>(reinterpret_cast<uint4*>(dxr) + sub, o, accumulate_dx);
      float4* p4 = reinterpret_cast<float4*>(part) + sub * (vn / 4);
#pragma unroll
      for (int q = 0; q < vn / 4; ++q) {
        float4 p = p4[q];
        p.x += e[4 * q] * a[4 * q] * r;
        p.y += e[4 * q + 1] * a[4 * q + 1] * r;
        p.z += e[4 * q + 2] * a[4 * q + 2] * r;
        p.w += e[4 * q + 3] * a[4 * q + 3] * r;
        p4[q] = p;
      }
      continue;
    }
    if (active) {
      if constexpr (Vec) {
        const uint4 *x4 = reinterpret_cast<const uint4*>(xr), *w4 = reinterpret_cast<const uint4*>(w),
                    *dy4 = reinterpret_cast<const uint4*>(dyr);
        for (int i = sub; i < d / vn; i += L) {
          float a[vn], b[vn], e[vn];
          unpack<T>(x4[i], a);
          unpack<T>(w4[i], b);
          unpack<T>(dy4[i], e);
#pragma unroll
          for (int k = 0; k < vn; ++k) c += e[k] * b[k] * a[k];
        }
      } else {
        for (int i = sub; i < d; i += L) c += to_float(dyr[i]) * to_float(w[i]) * to_float(xr[i]);
      }
    }
    c = group_sum<L>(c);
    if (!active) continue;
    const float coef = r * r * r * c / static_cast<float>(d);
    if constexpr (Vec) {
      const uint4 *x4 = reinterpret_cast<const uint4*>(xr), *w4 = reinterpret_cast<const uint4*>(w),
                  *dy4 = reinterpret_cast<const uint4*>(dyr);
      uint4* dx4 = reinterpret_cast<uint4*>(dxr);
      float4* p4 = reinterpret_cast<float4*>(part);
      for (int i = sub; i < d / vn; i += L) {
        float a[vn], b[vn], e[vn], o[vn];
        unpack<T>(x4[i], a);
        unpack<T>(w4[i], b);
        unpack<T>(dy4[i], e);
#pragma unroll
        for (int k = 0; k < vn; ++k) o[k] = r * e[k] * b[k] - coef * a[k];
        ::kd::cuda::detail::store_grad_vec<T>(dx4 + i, o, accumulate_dx);
#pragma unroll
        for (int q = 0; q < vn / 4; ++q) {
          float4 p = p4[i * (vn / 4) + q];
          p.x += e[4 * q] * a[4 * q] * r;
          p.y += e[4 * q + 1] * a[4 * q + 1] * r;
          p.z += e[4 * q + 2] * a[4 * q + 2] * r;
          p.w += e[4 * q + 3] * a[4 * q + 3] * r;
          p4[i * (vn / 4) + q] = p;
        }
      }
    } else {
      for (int i = sub; i < d; i += L) {
        const float a = to_float(xr[i]), e = to_float(dyr[i]);
        float o = r * e * to_float(w[i]) - coef * a;
        if (accumulate_dx) o += to_float(dxr[i]);
        dxr[i] = from_float<T>(o);
        part[i] += e * a * r;
      }
    }
  }
  __syncthreads();
  for (int i = threadIdx.x; i < d; i += blockDim.x) {
    float s = 0.f;
    for (int k = 0; k < slots; ++k) s += part_all[static_cast<long long>(k) * d + i];
    partial[static_cast<long long>(blockIdx.x) * d + i] = s;
  }
}

// dw[c] += sum over blocks b (in order) of partial[b, c]. 32 columns x 32 block-groups per block (1024
// threads, so the few column tiles of a norm weight still spread the partial rows over many threads):
// reads are coalesced along the columns, the 32 group sums are folded in a fixed order.
template <class T>
__global__ void rmsnorm_dw_reduce_kernel(const float* __restrict__ partial, T* __restrict__ dw, int blocks, int d,
                                         bool accumulate) {
  __shared__ float sums[32][33];
  const int cx = threadIdx.x & 31, gy = threadIdx.x >> 5;
  const long long col = static_cast<long long>(blockIdx.x) * 32 + cx;
  float s = 0.f;
  if (col < d)
    for (int b = gy; b < blocks; b += 32) s += partial[static_cast<long long>(b) * d + col];
  sums[gy][cx] = s;
  __syncthreads();
  if (gy == 0 && col < d) {
    float t = 0.f;
#pragma unroll
    for (int k = 0; k < 32; ++k) t += sums[k][cx];
    dw[col] = from_float<T>(accumulate ? to_float(dw[col]) + t : t);
  }
}

// Scratch bytes rmsnorm_bwd needs for R rows of D (the per-block partial dw rows).
inline std::size_t rmsnorm_bwd_scratch_bytes(std::int64_t rows, std::int64_t d) {
  const std::int64_t blocks = std::min<std::int64_t>(kNormBwdMaxBlocks, std::max<std::int64_t>(1, (rows + 7) / 8));
  return static_cast<std::size_t>(blocks * d) * sizeof(float);
}

template <class T>
status launch_rmsnorm_bwd(cudaStream_t s, const T* x, const T* w, const float* rstd, const T* dy, T* dx, T* dw,
                          std::int64_t rows, std::int64_t d, bool accumulate_dx, float* partial,
                          const float2* cs = nullptr, std::int64_t heads = 1, std::int64_t ld = 0,
                          bool accumulate_dw = true) {
  // With cs (rope_fusable), dy is the gradient of rope(rmsnorm(x)) and is rotated back in the kernel:
  // the fused backward of launch_rmsnorm_rope.
  const bool rope = cs != nullptr;
  if (rows == 0 || d == 0) return {};
  // Lanes per row as in the forward; slots (rows in flight a block, each with a private fp32 partial dw
  // row) up to 32, as many as keep those rows within 48 KiB of shared memory; wider rows opt in to more.
  const bool vec = d % vec_n<T> == 0 && vec_aligned(x) && vec_aligned(w) && vec_aligned(dy) && vec_aligned(dx);
  const int l = vec ? lanes_per_row(d, vec_n<T>) : 32;
  const std::int64_t row_bytes = d * static_cast<std::int64_t>(sizeof(float));
  const int g = 32 / l;
  const int warps = static_cast<int>(std::clamp<std::int64_t>((48 * 1024) / (row_bytes * g), 1, 8));
  const std::size_t smem = static_cast<std::size_t>(warps * g * row_bytes);
  const std::int64_t blocks = std::min<std::int64_t>(kNormBwdMaxBlocks, std::max<std::int64_t>(1, (rows + 7) / 8));
  const std::int64_t per_block = (rows + blocks - 1) / blocks;
  auto run = [&](auto kernel) -> status {
    if (smem > 48 * 1024) {
      int dev = 0, optin = 0;
      KD_CUDA_TRY(cudaGetDevice(&dev), "cudaGetDevice");
      KD_CUDA_TRY(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev), "cudaDeviceGetAttribute");
      if (smem > static_cast<std::size_t>(optin))
        return {errc::out_of_range, "rmsnorm_bwd: D = " + std::to_string(d) + " needs " + std::to_string(smem) +
                                        " bytes of shared memory, more than the device's " + std::to_string(optin)};
      KD_CUDA_TRY(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)),
                  "cudaFuncSetAttribute (rmsnorm_bwd)");
    }
    kernel<<<static_cast<unsigned>(blocks), warps * 32, smem, s>>>(x, w, rstd, dy, dx, partial, rows, static_cast<int>(d),
                                                                   per_block, accumulate_dx, cs, static_cast<int>(heads), ld);
    KD_CUDA_TRY(cudaGetLastError(), "rmsnorm_bwd kernel launch");
    return {};
  };
  KD_TRY(with_lanes(l, [&](auto lc) -> status {
    constexpr int L = decltype(lc)::value;
    if (rope) return run(rmsnorm_bwd_kernel<T, true, L, true>);
    return vec ? run(rmsnorm_bwd_kernel<T, true, L>) : run(rmsnorm_bwd_kernel<T, false, L>);
  }));
  rmsnorm_dw_reduce_kernel<T><<<static_cast<unsigned>((d + 31) / 32), 1024, 0, s>>>(partial, dw, static_cast<int>(blocks),
                                                                                    static_cast<int>(d), accumulate_dw);
  KD_CUDA_TRY(cudaGetLastError(), "rmsnorm_bwd dw reduction launch");
  return {};
}

// ---------------------------------------------------------------------------------------------------
// RoPE (HF rotate-half). inv_freq[i] = theta^(-2i/D) is a table of D/2 doubles built once per (D, theta)
// on the device (rope_inv_freq_kernel; cuda_ops caches it). The angle pos * inv_freq is formed and
// reduced to [-pi, pi] in double, then sin/cos are taken in fp32: at positions in the thousands an fp32
// angle (HF's) is off by ~1e-4 rad in the lowest frequencies, which would show against the fp64
// reference, while the reduced angle is exact to fp32 rounding.
// One block per token: the D/2 cos/sin pairs are computed once into shared memory and applied to every
// head of the token (q has Hq heads, k Hkv), pairs read as 16-byte vectors when D/2 allows.
// ---------------------------------------------------------------------------------------------------
template <int = 0>
__global__ void rope_inv_freq_kernel(double* inv_freq, int half, double theta) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < half) inv_freq[i] = pow(theta, -2.0 * i / (2.0 * half));
}

template <int = 0>
status launch_rope_inv_freq(cudaStream_t s, double* inv_freq, std::int64_t d, double theta) {
  const int half = static_cast<int>(d / 2);
  if (half == 0) return {};
  rope_inv_freq_kernel<><<<(half + 127) / 128, 128, 0, s>>>(inv_freq, half, theta);
  KD_CUDA_TRY(cudaGetLastError(), "rope inv_freq kernel launch");
  return {};
}

template <class T, bool Vec>
__global__ void rope_kernel(T* __restrict__ x, const std::int32_t* __restrict__ pos, const double* __restrict__ inv_freq,
                            int heads, int d, bool inverse) {
  extern __shared__ float rope_smem[];
  const int half = d / 2;
  float* cs = rope_smem;
  float* sn = rope_smem + half;
  const long long token = blockIdx.x;
  const double p = static_cast<double>(pos[token]);
  constexpr double two_pi = 6.283185307179586;
  for (int i = threadIdx.x; i < half; i += blockDim.x) {
    const double a = p * inv_freq[i];
    const double red = fma(-rint(a / two_pi), two_pi, a);
    float sv, cv;
    sincosf(static_cast<float>(red), &sv, &cv);
    cs[i] = cv;
    sn[i] = inverse ? -sv : sv;
  }
  __syncthreads();
  T* xt = x + token * heads * d;
  if constexpr (Vec) {
    constexpr int vn = vec_n<T>;
    const int hv = half / vn;
    for (int q = threadIdx.x; q < heads * hv; q += blockDim.x) {
      const int h = q / hv, i0 = (q % hv) * vn;
      uint4* lo = reinterpret_cast<uint4*>(xt + static_cast<long long>(h) * d + i0);
      uint4* hi = reinterpret_cast<uint4*>(xt + static_cast<long long>(h) * d + i0 + half);
      float a[vn], b[vn], oa[vn], ob[vn];
      unpack<T>(*lo, a);
      unpack<T>(*hi, b);
#pragma unroll
      for (int k = 0; k < vn; ++k) {
        const float c = cs[i0 + k], sv = sn[i0 + k];
        oa[k] = a[k] * c - b[k] * sv;
        ob[k] = b[k] * c + a[k] * sv;
      }
      *lo = pack<T>(oa);
      *hi = pack<T>(ob);
    }
  } else {
    for (int q = threadIdx.x; q < heads * half; q += blockDim.x) {
      const int h = q / half, i = q % half;
      T* lo = xt + static_cast<long long>(h) * d + i;
      const float a = to_float(lo[0]), b = to_float(lo[half]);
      lo[0] = from_float<T>(a * cs[i] - b * sn[i]);
      lo[half] = from_float<T>(b * cs[i] + a * sn[i]);
    }
  }
}

template <class T>
status launch_rope(cudaStream_t s, T* x, const std::int32_t* pos, const double* inv_freq, std::int64_t tokens,
                   std::int64_t heads, std::int64_t d, bool inverse) {
  if (tokens == 0 || heads == 0 || d == 0) return {};
  const std::size_t smem = static_cast<std::size_t>(d) * sizeof(float);
  const bool vec = (d / 2) % vec_n<T> == 0 && vec_aligned(x);
  const unsigned blocks = static_cast<unsigned>(tokens);
  if (vec) rope_kernel<T, true><<<blocks, 128, smem, s>>>(x, pos, inv_freq, static_cast<int>(heads), static_cast<int>(d), inverse);
  else rope_kernel<T, false><<<blocks, 128, smem, s>>>(x, pos, inv_freq, static_cast<int>(heads), static_cast<int>(d), inverse);
  KD_CUDA_TRY(cudaGetLastError(), "rope kernel launch");
  return {};
}

}  // namespace kd::model::cuda::detail
