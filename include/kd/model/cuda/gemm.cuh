// kd/model/cuda/gemm.cuh: the row-major GEMMs of the model's linear layers, over cuBLAS.
//
// Every product is cublasGemmEx with CUBLAS_COMPUTE_32F: float tensors are multiplied in true fp32 (no
// TF32, so a float model matches an fp64 reference to ~1e-6), bfloat16 tensors are read and written in
// bf16 with fp32 accumulation. "accumulate" is beta = 1 (C += A B), applied by cuBLAS in fp32 before the
// single rounding to the storage type.
#pragma once

#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <climits>
#include <cstdint>
#include <string>
#include <type_traits>

#include <kd/cuda/context.cuh>
#include <kd/core/numeric.hpp>
#include <kd/core/status.hpp>

namespace kd::model::cuda::detail {

template <class T>
constexpr cudaDataType_t gemm_type() {
  if constexpr (std::is_same_v<T, float>) return CUDA_R_32F;
  else if constexpr (std::is_same_v<T, kd::bfloat16>) return CUDA_R_16BF;
  else if constexpr (std::is_same_v<T, kd::half>) return CUDA_R_16F;
  else static_assert(sizeof(T) == 0, "kd: cuda_ops GEMMs take float, bfloat16 or half");
}

inline status blas_status(cublasStatus_t s, const char* what) {
  if (s == CUBLAS_STATUS_SUCCESS) return {};
  return {errc::backend_error, std::string(what) + " failed with cuBLAS status " + std::to_string(static_cast<int>(s))};
}

// Row-major C[m x n] (+)= op(A) op(B), through column-major cuBLAS (C^T = op(B)^T op(A)^T). a_t / b_t say
// whether A / B enter transposed, in row-major terms; lda / ldb / ldc are row-major row strides.
// Extents must fit cuBLAS's int (checked by the callers).
template <class T>
status gemm_rm(cublasHandle_t h, std::int64_t m, std::int64_t n, std::int64_t k, const T* a, std::int64_t lda, bool a_t,
               const T* b, std::int64_t ldb, bool b_t, T* c, std::int64_t ldc, bool accumulate) {
  const float alpha = 1.f, beta = accumulate ? 1.f : 0.f;
  return blas_status(cublasGemmEx(h, b_t ? CUBLAS_OP_T : CUBLAS_OP_N, a_t ? CUBLAS_OP_T : CUBLAS_OP_N,
                                  static_cast<int>(n), static_cast<int>(m), static_cast<int>(k), &alpha, b,
                                  gemm_type<T>(), static_cast<int>(ldb), a, gemm_type<T>(), static_cast<int>(lda), &beta,
                                  c, gemm_type<T>(), static_cast<int>(ldc), CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT),
                     "cublasGemmEx");
}

// Host checks shared by the three linear ops (C[m,n] = A[m,k] B[k,n] in some layout): non-negative extents
// that fit cuBLAS's int, and non-null pointers wherever a tensor is non-empty (a: m*k, b: n*k, c: m*n).
inline status check_gemm_args(const char* op, std::int64_t m, std::int64_t n, std::int64_t k, const void* a,
                              const void* b, const void* c) {
  if (m < 0 || n < 0 || k < 0)
    return {errc::invalid_argument, std::string(op) + ": negative extent (M = " + std::to_string(m) +
                                        ", N = " + std::to_string(n) + ", K = " + std::to_string(k) + ")"};
  if (m > INT_MAX || n > INT_MAX || k > INT_MAX)
    return {errc::out_of_range, std::string(op) + ": an extent exceeds cuBLAS's 2^31 - 1 (M = " + std::to_string(m) +
                                    ", N = " + std::to_string(n) + ", K = " + std::to_string(k) + ")"};
  if ((m > 0 && k > 0 && a == nullptr) || (n > 0 && k > 0 && b == nullptr) || (m > 0 && n > 0 && c == nullptr))
    return {errc::invalid_argument, std::string(op) + ": null tensor pointer"};
  return {};
}

// y[M,N] (+)= x[M,K] w[N,K]^T
template <class T>
status linear(cublasHandle_t h, cudaStream_t s, const T* x, const T* w, T* y, std::int64_t m, std::int64_t n,
              std::int64_t k, bool accumulate) {
  KD_TRY(check_gemm_args("linear", m, n, k, x, w, y));
  if (m == 0 || n == 0) return {};
  if (k == 0) {  // an empty sum: y = 0, or unchanged when accumulating
    if (!accumulate) KD_CUDA_TRY(cudaMemsetAsync(y, 0, static_cast<std::size_t>(m * n) * sizeof(T), s), "linear: cudaMemsetAsync");
    return {};
  }
  return gemm_rm(h, m, n, k, x, k, false, w, k, true, y, n, accumulate);
}

// dx[M,K] (+)= dy[M,N] w[N,K]
template <class T>
status linear_dx(cublasHandle_t h, cudaStream_t s, const T* dy, const T* w, T* dx, std::int64_t m, std::int64_t n,
                 std::int64_t k, bool accumulate) {
  KD_TRY(check_gemm_args("linear_dx", m, k, n, dy, w, dx));
  if (m == 0 || k == 0) return {};
  if (n == 0) {
    if (!accumulate) KD_CUDA_TRY(cudaMemsetAsync(dx, 0, static_cast<std::size_t>(m * k) * sizeof(T), s), "linear_dx: cudaMemsetAsync");
    return {};
  }
  return gemm_rm(h, m, k, n, dy, n, false, w, k, false, dx, k, accumulate);
}

// dw[N,K] (+)= dy[M,N]^T x[M,K]
template <class T>
status linear_dw(cublasHandle_t h, cudaStream_t s, const T* dy, const T* x, T* dw, std::int64_t m, std::int64_t n,
                 std::int64_t k, bool accumulate) {
  KD_TRY(check_gemm_args("linear_dw", n, k, m, dy, x, dw));
  if (n == 0 || k == 0) return {};
  if (m == 0) {  // an empty sum
    if (!accumulate) KD_CUDA_TRY(cudaMemsetAsync(dw, 0, static_cast<std::size_t>(n * k) * sizeof(T), s), "linear_dw: cudaMemsetAsync");
    return {};
  }
  return gemm_rm(h, n, k, m, dy, n, true, x, k, false, dw, k, accumulate);
}

}  // namespace kd::model::cuda::detail
