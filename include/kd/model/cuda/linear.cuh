// kd/model/cuda/linear.cuh: the row-major GEMMs of the model's linear layers, over kd::cuda::gemm_rm
// (kd/cuda/gemm.cuh: cublasGemmEx, fp32 compute, no TF32). "accumulate" is beta = 1 (C += A B), applied
// in fp32 before the single rounding to the storage type. The op's argument checks run before these
// (kd/model/op_check.hpp); gemm_rm checks the extents against cuBLAS's int.
#pragma once

#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

#include <kd/core/status.hpp>
#include <kd/cuda/context.cuh>
#include <kd/cuda/gemm.cuh>

namespace kd::model::cuda::detail {

// C[m,n] of an empty sum (k = 0): zero, or unchanged when accumulating.
template <class T>
status empty_sum(cudaStream_t s, T* c, std::int64_t m, std::int64_t n, bool accumulate, const char* what) {
  if (!accumulate) KD_CUDA_TRY(cudaMemsetAsync(c, 0, static_cast<std::size_t>(m * n) * sizeof(T), s), what);
  return {};
}

// y[M,N] (+)= x[M,K] w[N,K]^T
template <class T>
status linear(cublasHandle_t h, cudaStream_t s, const T* x, const T* w, T* y, std::int64_t m, std::int64_t n,
              std::int64_t k, bool accumulate) {
  if (m == 0 || n == 0) return {};
  if (k == 0) return empty_sum(s, y, m, n, accumulate, "linear: cudaMemsetAsync");
  return ::kd::cuda::gemm_rm(h, m, n, k, x, k, false, w, k, true, y, n, accumulate ? 1.f : 0.f);
}

// dx[M,K] (+)= dy[M,N] w[N,K]
template <class T>
status linear_dx(cublasHandle_t h, cudaStream_t s, const T* dy, const T* w, T* dx, std::int64_t m, std::int64_t n,
                 std::int64_t k, bool accumulate) {
  if (m == 0 || k == 0) return {};
  if (n == 0) return empty_sum(s, dx, m, k, accumulate, "linear_dx: cudaMemsetAsync");
  return ::kd::cuda::gemm_rm(h, m, k, n, dy, n, false, w, k, false, dx, k, accumulate ? 1.f : 0.f);
}

// dw[N,K] (+)= dy[M,N]^T x[M,K]
template <class T>
status linear_dw(cublasHandle_t h, cudaStream_t s, const T* dy, const T* x, T* dw, std::int64_t m, std::int64_t n,
                 std::int64_t k, bool accumulate) {
  if (n == 0 || k == 0) return {};
  if (m == 0) return empty_sum(s, dw, n, k, accumulate, "linear_dw: cudaMemsetAsync");
  return ::kd::cuda::gemm_rm(h, n, k, m, dy, n, true, x, k, false, dw, k, accumulate ? 1.f : 0.f);
}

}  // namespace kd::model::cuda::detail
