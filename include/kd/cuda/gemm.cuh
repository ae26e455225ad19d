// kd/cuda/gemm.cuh: kd's one row-major GEMM over cuBLAS, used by the losses' projections (linear_kd,
// feature), the model's linear layers (kd/model/cuda/linear.cuh) and the examples.
//
// gemm_rm: row-major C[m x n] = op(A) op(B) + beta C through column-major cublasGemmEx
// (C^T = op(B)^T op(A)^T) with CUBLAS_COMPUTE_32F: float tensors are multiplied in true fp32 (no TF32, so a
// float model matches an fp64 reference to ~1e-6), 16-bit tensors are read and written in their storage
// type with fp32 accumulation; beta (0 overwrites, 1 accumulates) is applied in fp32 before the single
// rounding to C's type. A, B and C may have different element types (float, kd::bfloat16, kd::half).
// a_t / b_t say whether A / B enter transposed, in row-major terms; lda / ldb / ldc are row strides.
// Extents are checked on the host (non-negative, within cuBLAS's int, strides covering a row), so a
// bad call is a kd::status naming the argument instead of a cuBLAS status code.
#pragma once

#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <climits>
#include <cstdint>
#include <string>
#include <type_traits>

#include <kd/core/numeric.hpp>
#include <kd/core/status.hpp>

namespace kd::cuda {

template <class T>
constexpr cudaDataType_t blas_type() {
  if constexpr (std::is_same_v<T, float>) return CUDA_R_32F;
  else if constexpr (std::is_same_v<T, kd::bfloat16>) return CUDA_R_16BF;
  else if constexpr (std::is_same_v<T, kd::half>) return CUDA_R_16F;
  else static_assert(sizeof(T) == 0, "kd::cuda::gemm_rm takes float, kd::bfloat16 or kd::half tensors");
}

inline status blas_status(cublasStatus_t s, const char* what) {
  if (s == CUBLAS_STATUS_SUCCESS) return {};
  return {errc::backend_error, std::string(what) + " failed with cuBLAS status " + std::to_string(static_cast<int>(s))};
}

namespace detail {

// The host checks of gemm_rm: extents, then each operand's row stride against its stored row length.
inline status gemm_rm_args(std::int64_t m, std::int64_t n, std::int64_t k, std::int64_t lda, bool a_t,
                           std::int64_t ldb, bool b_t, std::int64_t ldc) {
  const auto dims = [&] {
    return " (M = " + std::to_string(m) + ", N = " + std::to_string(n) + ", K = " + std::to_string(k) + ")";
  };
  if (m < 0 || n < 0 || k < 0) return {errc::invalid_argument, "gemm_rm: negative extent" + dims()};
  if (m > INT_MAX || n > INT_MAX || k > INT_MAX || lda > INT_MAX || ldb > INT_MAX || ldc > INT_MAX)
    return {errc::out_of_range, "gemm_rm: an extent or stride exceeds cuBLAS's 2^31 - 1" + dims()};
  const auto ld_ok = [](const char* what, std::int64_t ld, std::int64_t cols) -> status {
    if (ld >= cols) return {};
    return {errc::invalid_argument, std::string("gemm_rm: ") + what + " = " + std::to_string(ld) +
                                        " is below the row length " + std::to_string(cols)};
  };
  KD_TRY(ld_ok("lda", lda, a_t ? m : k));
  KD_TRY(ld_ok("ldb", ldb, b_t ? k : n));
  return ld_ok("ldc", ldc, n);
}

}  // namespace detail

template <class TA, class TB, class TC>
status gemm_rm(cublasHandle_t h, std::int64_t m, std::int64_t n, std::int64_t k, const TA* a, std::int64_t lda, bool a_t,
               const TB* b, std::int64_t ldb, bool b_t, TC* c, std::int64_t ldc, float beta = 0.f) {
  KD_TRY(detail::gemm_rm_args(m, n, k, lda, a_t, ldb, b_t, ldc));
  if (m == 0 || n == 0) return {};
  const float alpha = 1.f;
  // cuBLAS wants every leading dimension >= 1, even for an operand with no columns (k = 0).
  const auto ld = [](std::int64_t v) { return static_cast<int>(std::max<std::int64_t>(v, 1)); };
  return blas_status(cublasGemmEx(h, b_t ? CUBLAS_OP_T : CUBLAS_OP_N, a_t ? CUBLAS_OP_T : CUBLAS_OP_N,
                                  static_cast<int>(n), static_cast<int>(m), static_cast<int>(k), &alpha, b,
                                  blas_type<TB>(), ld(ldb), a, blas_type<TA>(), ld(lda), &beta, c, blas_type<TC>(),
                                  ld(ldc), CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT),
                     "cublasGemmEx");
}

}  // namespace kd::cuda
