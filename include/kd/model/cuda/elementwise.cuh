// kd/model/cuda/elementwise.cuh: SwiGLU forward / backward, y += x, and the token embedding (lookup and
// its weight gradient).
//
// The launchers assume arguments already validated by kd::model::cuda_ops (kd/model/cuda/ops.cuh). These
// ops move whole activations (8192 tokens x 1024-1536 columns at the seed geometry) with almost no
// arithmetic, so they are memory-bound: each thread moves 16-byte vectors when the row length and the
// pointers allow it, elements otherwise; all arithmetic is fp32 and each output is rounded once.
#pragma once

#include <cub/device/device_radix_sort.cuh>
#include <cuda_runtime.h>

#include <cstdint>

#include <kd/model/cuda/norm.cuh>

namespace kd::model::cuda::detail {

// ---------------------------------------------------------------------------------------------------
// SwiGLU. gu is [R, 2I] (gate | up); h = silu(gate) * up. Backward with s = sigmoid(g):
//   dgate = dh * up * s * (1 + g (1 - s)),   dup = dh * g * s.
// Grid-stride over vectors of h: a vector of h reads the matching vectors of gate and up.
// ---------------------------------------------------------------------------------------------------
__device__ __forceinline__ float sigmoid_f(float g) { return 1.f / (1.f + expf(-g)); }

// Row and column of flat vector index v in rows of per_row vectors. 32-bit division whenever the index
// fits: the 64-bit one is a software routine of some 70 instructions that sits between the thread's start
// and its first load in these one-pass kernels (measured ~25% of gather_rows' time at 16384 x 1024).
__device__ __forceinline__ void split_index(long long v, long long per_row, long long& r, long long& c) {
  if (v <= 0xffffffffLL && per_row <= 0xffffffffLL) {
    const unsigned q = static_cast<unsigned>(v) / static_cast<unsigned>(per_row);
    r = q;
    c = v - static_cast<long long>(q) * per_row;
  } else {
    r = v / per_row;
    c = v % per_row;
  }
}

template <class T, bool Vec>
__global__ void swiglu_kernel(const T* __restrict__ gu, T* __restrict__ h, long long rows, long long inter) {
  constexpr int vn = Vec ? vec_n<T> : 1;
  const long long per_row = inter / vn;
  const long long total = rows * per_row;
  for (long long v = blockIdx.x * static_cast<long long>(blockDim.x) + threadIdx.x; v < total;
       v += static_cast<long long>(gridDim.x) * blockDim.x) {
    long long r, c;
    split_index(v, per_row, r, c);
    c *= vn;
    const T* g = gu + r * 2 * inter + c;
    const T* u = g + inter;
    T* o = h + r * inter + c;
    if constexpr (Vec) {
      float a[vn], b[vn];
      unpack<T>(*reinterpret_cast<const uint4*>(g), a);
      unpack<T>(*reinterpret_cast<const uint4*>(u), b);
#pragma unroll
      for (int k = 0; k < vn; ++k) a[k] = a[k] * sigmoid_f(a[k]) * b[k];
      *reinterpret_cast<uint4*>(o) = pack<T>(a);
    } else {
      const float a = to_float(*g);
      *o = from_float<T>(a * sigmoid_f(a) * to_float(*u));
    }
  }
}

template <class T, bool Vec>
__global__ void swiglu_bwd_kernel(const T* __restrict__ gu, const T* __restrict__ dh, T* __restrict__ dgu, long long rows,
                                  long long inter) {
  constexpr int vn = Vec ? vec_n<T> : 1;
  const long long per_row = inter / vn;
  const long long total = rows * per_row;
  for (long long v = blockIdx.x * static_cast<long long>(blockDim.x) + threadIdx.x; v < total;
       v += static_cast<long long>(gridDim.x) * blockDim.x) {
    long long r, c;
    split_index(v, per_row, r, c);
    c *= vn;
    const T* g = gu + r * 2 * inter + c;
    const T* u = g + inter;
    const T* d = dh + r * inter + c;
    T* dg = dgu + r * 2 * inter + c;
    T* du = dg + inter;
    if constexpr (Vec) {
      float a[vn], b[vn], e[vn];
      unpack<T>(*reinterpret_cast<const uint4*>(g), a);
      unpack<T>(*reinterpret_cast<const uint4*>(u), b);
      unpack<T>(*reinterpret_cast<const uint4*>(d), e);
#pragma unroll
      for (int k = 0; k < vn; ++k) {
        const float s = sigmoid_f(a[k]);
        const float dgate = e[k] * b[k] * s * (1.f + a[k] * (1.f - s));
        b[k] = e[k] * a[k] * s;
        a[k] = dgate;
      }
      *reinterpret_cast<uint4*>(dg) = pack<T>(a);
      *reinterpret_cast<uint4*>(du) = pack<T>(b);
    } else {
      const float a = to_float(*g), b = to_float(*u), e = to_float(*d);
      const float s = sigmoid_f(a);
      *dg = from_float<T>(e * b * s * (1.f + a * (1.f - s)));
      *du = from_float<T>(e * a * s);
    }
  }
}

template <class T>
status launch_swiglu(cudaStream_t s, const T* gu, T* h, std::int64_t rows, std::int64_t inter) {
  if (rows == 0 || inter == 0) return {};
  const bool vec = inter % vec_n<T> == 0 && vec_aligned(gu) && vec_aligned(h);
  const std::int64_t work = rows * inter / (vec ? vec_n<T> : 1);
  if (vec) swiglu_kernel<T, true><<<grid_for(work, 256), 256, 0, s>>>(gu, h, rows, inter);
  else swiglu_kernel<T, false><<<grid_for(work, 256), 256, 0, s>>>(gu, h, rows, inter);
  KD_CUDA_TRY(cudaGetLastError(), "swiglu kernel launch");
  return {};
}

template <class T>
status launch_swiglu_bwd(cudaStream_t s, const T* gu, const T* dh, T* dgu, std::int64_t rows, std::int64_t inter) {
  if (rows == 0 || inter == 0) return {};
  const bool vec = inter % vec_n<T> == 0 && vec_aligned(gu) && vec_aligned(dh) && vec_aligned(dgu);
  const std::int64_t work = rows * inter / (vec ? vec_n<T> : 1);
  if (vec) swiglu_bwd_kernel<T, true><<<grid_for(work, 256), 256, 0, s>>>(gu, dh, dgu, rows, inter);
  else swiglu_bwd_kernel<T, false><<<grid_for(work, 256), 256, 0, s>>>(gu, dh, dgu, rows, inter);
  KD_CUDA_TRY(cudaGetLastError(), "swiglu_bwd kernel launch");
  return {};
}

// ---------------------------------------------------------------------------------------------------
// y += x (the residual adds): a flat grid-stride loop over 16-byte vectors plus a scalar tail.
// ---------------------------------------------------------------------------------------------------
template <class T, bool Vec>
__global__ void add_kernel(T* __restrict__ y, const T* __restrict__ x, long long n) {
  constexpr int vn = Vec ? vec_n<T> : 1;
  const long long nv = n / vn;
  const long long stride = static_cast<long long>(gridDim.x) * blockDim.x;
  const long long t0 = blockIdx.x * static_cast<long long>(blockDim.x) + threadIdx.x;
  for (long long v = t0; v < nv; v += stride) {
    if constexpr (Vec) {
      float a[vn], b[vn];
      unpack<T>(reinterpret_cast<const uint4*>(y)[v], a);
      unpack<T>(reinterpret_cast<const uint4*>(x)[v], b);
#pragma unroll
      for (int k = 0; k < vn; ++k) a[k] += b[k];
      reinterpret_cast<uint4*>(y)[v] = pack<T>(a);
    } else {
      y[v] = from_float<T>(to_float(y[v]) + to_float(x[v]));
    }
  }
  for (long long i = nv * vn + t0; i < n; i += stride) y[i] = from_float<T>(to_float(y[i]) + to_float(x[i]));
}

template <class T>
status launch_add(cudaStream_t s, T* y, const T* x, std::int64_t n) {
  if (n == 0) return {};
  const bool vec = vec_aligned(y) && vec_aligned(x);
  if (vec) add_kernel<T, true><<<grid_for(n / vec_n<T> + 1, 256), 256, 0, s>>>(y, x, n);
  else add_kernel<T, false><<<grid_for(n, 256), 256, 0, s>>>(y, x, n);
  KD_CUDA_TRY(cudaGetLastError(), "add kernel launch");
  return {};
}

// ---------------------------------------------------------------------------------------------------
// Strided 2-D copy of 16-byte vectors (the v columns out of the fused QKV output and the q / k / v
// gradients into it): cudaMemcpy2DAsync moves 512-byte rows at about a quarter of the bandwidth this
// flat grid-stride loop reaches. Callers fall back to cudaMemcpy2DAsync when the rows are not whole vectors.
// ---------------------------------------------------------------------------------------------------
template <int = 0>
__global__ void copy_rows_kernel(const uint4* __restrict__ src, long long src_ld, uint4* __restrict__ dst, long long dst_ld,
                                 long long rows, long long cols) {
  const long long n = rows * cols;
  for (long long v = blockIdx.x * static_cast<long long>(blockDim.x) + threadIdx.x; v < n;
       v += static_cast<long long>(gridDim.x) * blockDim.x) {
    long long r, c;
    split_index(v, cols, r, c);
    dst[r * dst_ld + c] = src[r * src_ld + c];
  }
}

// Extents in elements of T; false when the vector kernel does not apply (the caller then copies otherwise).
template <class T>
bool launch_copy_rows(cudaStream_t s, const T* src, std::int64_t src_ld, T* dst, std::int64_t dst_ld, std::int64_t rows,
                      std::int64_t cols) {
  constexpr std::int64_t vn = 16 / sizeof(T);
  if (!vec_aligned(src) || !vec_aligned(dst) || src_ld % vn != 0 || dst_ld % vn != 0 || cols % vn != 0) return false;
  const std::int64_t work = rows * (cols / vn);
  copy_rows_kernel<><<<grid_for(work, 256), 256, 0, s>>>(reinterpret_cast<const uint4*>(src), src_ld / vn,
                                                         reinterpret_cast<uint4*>(dst), dst_ld / vn, rows, cols / vn);
  return true;
}

// ---------------------------------------------------------------------------------------------------
// Row gather: out[s] = src[rows[s]] for S rows of H (the embedding lookup, and the MoE's gather of tokens
// into expert order). Grid-stride over 16-byte vectors of out. A row index outside [0, limit) (the
// caller checks ids; this only keeps a bad one from reading out of bounds) gives a zero row.
// ---------------------------------------------------------------------------------------------------
template <class T, bool Vec>
__global__ void gather_rows_kernel(const T* __restrict__ src, const std::int32_t* __restrict__ rows, T* __restrict__ out,
                                   long long n, long long h, long long limit) {
  constexpr int vn = Vec ? vec_n<T> : 1;
  const long long per_row = h / vn;
  for (long long v = blockIdx.x * static_cast<long long>(blockDim.x) + threadIdx.x; v < n * per_row;
       v += static_cast<long long>(gridDim.x) * blockDim.x) {
    long long r, c;
    split_index(v, per_row, r, c);
    c *= vn;
    const long long from = rows[r];
    const bool ok = from >= 0 && from < limit;
    if constexpr (Vec) {
      *reinterpret_cast<uint4*>(out + r * h + c) =
          ok ? *reinterpret_cast<const uint4*>(src + from * h + c) : make_uint4(0, 0, 0, 0);
    } else {
      out[r * h + c] = ok ? src[from * h + c] : from_float<T>(0.f);
    }
  }
}

template <class T>
status launch_gather_rows(cudaStream_t s, const T* src, const std::int32_t* rows, T* out, std::int64_t n, std::int64_t h,
                          std::int64_t limit, const char* what) {
  if (n == 0 || h == 0) return {};
  const bool vec = h % vec_n<T> == 0 && vec_aligned(src) && vec_aligned(out);
  const std::int64_t work = n * h / (vec ? vec_n<T> : 1);
  if (vec) gather_rows_kernel<T, true><<<grid_for(work, 256), 256, 0, s>>>(src, rows, out, n, h, limit);
  else gather_rows_kernel<T, false><<<grid_for(work, 256), 256, 0, s>>>(src, rows, out, n, h, limit);
  KD_CUDA_TRY(cudaGetLastError(), what);
  return {};
}

// ---------------------------------------------------------------------------------------------------
// Embedding weight gradient: dtable[ids[i]] += dout[i]. Repeated ids make this a scatter-add; instead of
// atomics (run-to-run different sums, and one bf16 rounding per add) the n token indices are sorted by
// id (CUB radix sort, stable), then one block per run of equal ids sums its rows in token order in fp32
// and adds the sum to the table row, rounding once. Deterministic; an id outside [0, V) is skipped.
// ---------------------------------------------------------------------------------------------------
template <int = 0>
__global__ void embedding_keys_kernel(const std::int32_t* __restrict__ ids, std::int32_t* __restrict__ keys,
                                      std::int32_t* __restrict__ vals, long long n, std::int32_t vocab) {
  for (long long i = blockIdx.x * static_cast<long long>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<long long>(gridDim.x) * blockDim.x) {
    const std::int32_t id = ids[i];
    keys[i] = id >= 0 && id < vocab ? id : vocab;  // invalid ids sort last, under the sentinel V
    vals[i] = static_cast<std::int32_t>(i);
  }
}

template <class T, bool Vec>
__global__ void embedding_dw_kernel(const std::int32_t* __restrict__ keys, const std::int32_t* __restrict__ order,
                                    const T* __restrict__ dout, T* __restrict__ dtable, long long n, long long h,
                                    std::int32_t vocab) {
  const long long p = blockIdx.x;
  const std::int32_t id = keys[p];
  if (id == vocab || (p > 0 && keys[p - 1] == id)) return;  // not the first of its run
  long long end = p + 1;
  while (end < n && keys[end] == id) ++end;
  constexpr int vn = Vec ? vec_n<T> : 1;
  T* dst = dtable + static_cast<long long>(id) * h;
  for (long long c = threadIdx.x * static_cast<long long>(vn); c < h; c += static_cast<long long>(blockDim.x) * vn) {
    float acc[vn];
#pragma unroll
    for (int k = 0; k < vn; ++k) acc[k] = 0.f;
    for (long long q = p; q < end; ++q) {
      const T* src = dout + static_cast<long long>(order[q]) * h + c;
      if constexpr (Vec) {
        float f[vn];
        unpack<T>(*reinterpret_cast<const uint4*>(src), f);
#pragma unroll
        for (int k = 0; k < vn; ++k) acc[k] += f[k];
      } else {
        acc[0] += to_float(*src);
      }
    }
    if constexpr (Vec) ::kd::cuda::detail::store_grad_vec<T>(reinterpret_cast<uint4*>(dst + c), acc, true);
    else dst[c] = from_float<T>(to_float(dst[c]) + acc[0]);
  }
}

inline std::size_t align256(std::size_t b) { return (b + 255) / 256 * 256; }

// Scratch bytes embedding_dw needs for n tokens: keys and values in and out, and CUB's temporary storage.
inline status embedding_dw_scratch_bytes(std::int64_t n, std::int32_t vocab, std::size_t& bytes) {
  std::size_t cub_bytes = 0;
  int end_bit = 1;
  while (end_bit < 31 && (std::int64_t{1} << end_bit) <= vocab) ++end_bit;
  KD_CUDA_TRY(cub::DeviceRadixSort::SortPairs(nullptr, cub_bytes, static_cast<const std::int32_t*>(nullptr),
                                              static_cast<std::int32_t*>(nullptr), static_cast<const std::int32_t*>(nullptr),
                                              static_cast<std::int32_t*>(nullptr), static_cast<int>(n), 0, end_bit),
              "cub::DeviceRadixSort (size query)");
  bytes = 4 * align256(static_cast<std::size_t>(n) * sizeof(std::int32_t)) + align256(cub_bytes);
  return {};
}

template <class T>
status launch_embedding_dw(cudaStream_t s, const std::int32_t* ids, const T* dout, T* dtable, std::int64_t n,
                           std::int32_t vocab, std::int64_t h, void* scratch, std::size_t scratch_bytes) {
  if (n == 0 || h == 0) return {};
  const std::size_t arr = align256(static_cast<std::size_t>(n) * sizeof(std::int32_t));
  char* base = static_cast<char*>(scratch);
  auto* keys_in = reinterpret_cast<std::int32_t*>(base);
  auto* keys_out = reinterpret_cast<std::int32_t*>(base + arr);
  auto* vals_in = reinterpret_cast<std::int32_t*>(base + 2 * arr);
  auto* vals_out = reinterpret_cast<std::int32_t*>(base + 3 * arr);
  void* temp = base + 4 * arr;
  std::size_t temp_bytes = scratch_bytes - 4 * arr;
  int end_bit = 1;  // bits of the sentinel V
  while (end_bit < 31 && (std::int64_t{1} << end_bit) <= vocab) ++end_bit;
  embedding_keys_kernel<><<<grid_for(n, 256), 256, 0, s>>>(ids, keys_in, vals_in, n, vocab);
  KD_CUDA_TRY(cudaGetLastError(), "embedding_dw key kernel launch");
  KD_CUDA_TRY(cub::DeviceRadixSort::SortPairs(temp, temp_bytes, keys_in, keys_out, vals_in, vals_out, static_cast<int>(n), 0,
                                              end_bit, s),
              "cub::DeviceRadixSort::SortPairs (embedding_dw)");
  const bool vec = h % vec_n<T> == 0 && vec_aligned(dout) && vec_aligned(dtable);
  const int threads = static_cast<int>(std::clamp<std::int64_t>((h / (vec ? vec_n<T> : 1) + 31) / 32 * 32, 32, 256));
  if (vec) embedding_dw_kernel<T, true><<<static_cast<unsigned>(n), threads, 0, s>>>(keys_out, vals_out, dout, dtable, n, h, vocab);
  else embedding_dw_kernel<T, false><<<static_cast<unsigned>(n), threads, 0, s>>>(keys_out, vals_out, dout, dtable, n, h, vocab);
  KD_CUDA_TRY(cudaGetLastError(), "embedding_dw kernel launch");
  return {};
}

}  // namespace kd::model::cuda::detail
