// kd/model/cuda/grouped_gemm.cuh: the GEMMs of the experts of one MoE layer, run concurrently.
//
// After dropless dispatch each expert owns a contiguous block of rows of different size (about
// tokens * top_k / E at the seed geometry: 2048 x 1024 x 2048 GEMMs). One such GEMM fills the GPU only
// partly, and run back to back their tails add up, so the experts are spread over a few side streams,
// each with its own cuBLAS handle and workspace (a handle's workspace must not be shared between
// concurrently running kernels). fork() makes the side streams wait for the main stream's work so far;
// join() makes the main stream wait for all of them, so callers still see stream-ordered semantics.
#pragma once

#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <string>

#include <kd/cuda/context.cuh>
#include <kd/model/cuda/linear.cuh>
#include <kd/core/status.hpp>

namespace kd::model::cuda {

class stream_pool {
 public:
  static constexpr int size = 4;
  static constexpr std::size_t workspace_bytes = 32u << 20;

  stream_pool() = default;
  stream_pool(const stream_pool&) = delete;
  stream_pool& operator=(const stream_pool&) = delete;
  ~stream_pool() {
    for (int i = 0; i < size; ++i) {
      if (handle_[i] != nullptr) cublasDestroy(handle_[i]);
      if (workspace_[i] != nullptr) cudaFree(workspace_[i]);
      if (join_[i] != nullptr) cudaEventDestroy(join_[i]);
      if (stream_[i] != nullptr) cudaStreamDestroy(stream_[i]);
    }
    if (fork_ != nullptr) cudaEventDestroy(fork_);
  }

  status fork(cudaStream_t main) {
    KD_TRY(init());
    KD_CUDA_TRY(cudaEventRecord(fork_, main), "stream_pool: cudaEventRecord");
    for (int i = 0; i < size; ++i) KD_CUDA_TRY(cudaStreamWaitEvent(stream_[i], fork_, 0), "stream_pool: cudaStreamWaitEvent");
    return {};
  }
  status join(cudaStream_t main) {
    for (int i = 0; i < size; ++i) {
      KD_CUDA_TRY(cudaEventRecord(join_[i], stream_[i]), "stream_pool: cudaEventRecord");
      KD_CUDA_TRY(cudaStreamWaitEvent(main, join_[i], 0), "stream_pool: cudaStreamWaitEvent");
    }
    return {};
  }
  [[nodiscard]] cudaStream_t stream(int i) const noexcept { return stream_[i]; }
  [[nodiscard]] cublasHandle_t handle(int i) const noexcept { return handle_[i]; }

 private:
  status init() {
    if (fork_ != nullptr) return {};
    for (int i = 0; i < size; ++i) {
      KD_CUDA_TRY(cudaStreamCreateWithFlags(&stream_[i], cudaStreamNonBlocking), "stream_pool: cudaStreamCreate");
      KD_CUDA_TRY(cudaEventCreateWithFlags(&join_[i], cudaEventDisableTiming), "stream_pool: cudaEventCreate");
      KD_CUDA_TRY(cudaMalloc(&workspace_[i], workspace_bytes), "stream_pool: cudaMalloc (cuBLAS workspace)");
      if (cublasCreate(&handle_[i]) != CUBLAS_STATUS_SUCCESS) return {errc::backend_error, "stream_pool: cublasCreate failed"};
      if (cublasSetStream(handle_[i], stream_[i]) != CUBLAS_STATUS_SUCCESS ||
          cublasSetWorkspace(handle_[i], workspace_[i], workspace_bytes) != CUBLAS_STATUS_SUCCESS)
        return {errc::backend_error, "stream_pool: cublasSetStream / cublasSetWorkspace failed"};
    }
    KD_CUDA_TRY(cudaEventCreateWithFlags(&fork_, cudaEventDisableTiming), "stream_pool: cudaEventCreate");
    return {};
  }

  cudaStream_t stream_[size] = {};
  cublasHandle_t handle_[size] = {};
  void* workspace_[size] = {};
  cudaEvent_t join_[size] = {};
  cudaEvent_t fork_ = nullptr;
};

}  // namespace kd::model::cuda
