// kd/model/cuda/ops.cuh: the CUDA model backend, kd::model::cuda_ops<T> (T = float or kd::bfloat16).
//
// Every op of kd/model/ops.hpp with the same signature as the CPU reference kd::model::cpu_ops (ops_cpu.hpp),
// on device memory, enqueued on the stream of a kd::cuda::context (whose cuBLAS handle and scratch memory
// it also uses). acc_type is float: softmax statistics, router probabilities and rstd are fp32.
//
// Host-checkable preconditions come back as a kd::status before anything is launched: first the checks
// both backends share (kd/model/op_check.hpp: negative extents, null pointers, odd RoPE dimension, k > E),
// then this backend's own (extents a kernel indexes with int, the kernels' limits of cuda_limits.hpp such
// as E <= 256 and k <= 8, which transformer::allocate() also checks for a whole model via can_implement). What only the data can reveal is not checked on the host: ids and token slots
// are trusted (a bad embedding id reads as a zero row and is skipped by the gradient; a negative
// gather row gives a zero row), except in moe_dispatch, whose counts must reach the host anyway: sync_counts
// reports expert ids outside [0, E).
//
// Nothing synchronises except download and sync_counts (ops.hpp). Memory: alloc is cudaMalloc plus a
// zeroing cudaMemsetAsync on the stream; buffers free with cudaFree (which waits for the device).
// Kernels: linear.cuh (cuBLAS through kd/cuda/gemm.cuh), norm.cuh (rmsnorm, rope), elementwise.cuh
// (swiglu, add, embedding), moe_dispatch.cuh (router, dispatch, combine), flash_attention.cuh (flash
// attention and the probability maps).
#pragma once

#include <cuda_runtime.h>

#include <algorithm>
#include <climits>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include <kd/cuda/context.cuh>
#include <kd/model/cuda/flash_attention.cuh>
#include <kd/model/cuda/elementwise.cuh>
#include <kd/model/cuda/linear.cuh>
#include <kd/model/cuda/grouped_gemm.cuh>
#include <kd/model/cuda/moe_dispatch.cuh>
#include <kd/model/cuda/norm.cuh>
#include <kd/model/cuda_limits.hpp>
#include <kd/model/op_check.hpp>
#include <kd/model/ops.hpp>
#include <kd/core/status.hpp>

namespace kd::model {

namespace cuda {

// Move-only owner of n elements of device memory (cudaMalloc / cudaFree).
template <class U>
class device_array {
 public:
  device_array() = default;
  device_array(const device_array&) = delete;
  device_array& operator=(const device_array&) = delete;
  device_array(device_array&& o) noexcept : p_(std::exchange(o.p_, nullptr)), n_(std::exchange(o.n_, 0)) {}
  device_array& operator=(device_array&& o) noexcept {
    if (this != &o) {
      reset();
      p_ = std::exchange(o.p_, nullptr);
      n_ = std::exchange(o.n_, 0);
    }
    return *this;
  }
  ~device_array() { reset(); }

  [[nodiscard]] U* data() noexcept { return p_; }
  [[nodiscard]] const U* data() const noexcept { return p_; }
  [[nodiscard]] std::size_t size() const noexcept { return n_; }
  [[nodiscard]] bool empty() const noexcept { return n_ == 0; }

  void reset() noexcept {
    if (p_ != nullptr) cudaFree(p_);
    p_ = nullptr;
    n_ = 0;
  }

  // Allocates n zeroed elements (the memset is enqueued on `s`); on failure the array stays empty.
  status allocate(std::size_t n, cudaStream_t s) {
    reset();
    if (n == 0) return {};
    if (n > std::numeric_limits<std::size_t>::max() / sizeof(U))
      return {errc::out_of_range, "cuda_ops::alloc: " + std::to_string(n) + " elements overflow size_t"};
    void* p = nullptr;
    const cudaError_t e = cudaMalloc(&p, n * sizeof(U));
    if (e != cudaSuccess) {
      (void)cudaGetLastError();  // clear the sticky-free allocation error so later launches report their own
      return {errc::backend_error, "cuda_ops::alloc: cudaMalloc of " + std::to_string(n * sizeof(U)) +
                                       " bytes: " + cudaGetErrorString(e)};
    }
    if (const cudaError_t m = cudaMemsetAsync(p, 0, n * sizeof(U), s); m != cudaSuccess) {
      cudaFree(p);
      return {errc::backend_error, std::string("cuda_ops::alloc: cudaMemsetAsync: ") + cudaGetErrorString(m)};
    }
    p_ = static_cast<U*>(p);
    n_ = n;
    return {};
  }

 private:
  U* p_ = nullptr;
  std::size_t n_ = 0;
};

}  // namespace cuda

template <class T>
class cuda_ops {
  static_assert(std::is_same_v<T, float> || std::is_same_v<T, kd::bfloat16>, "cuda_ops<T>: T is float or kd::bfloat16");
  using A = float;
  using I = index_t;
  using i64 = std::int64_t;
  using check = cuda::detail::op_check;

 public:
  using value_type = T;
  using acc_type = float;
  template <class U>
  using buffer = cuda::device_array<U>;

  explicit cuda_ops(::kd::cuda::context& ctx) : ctx_(&ctx) {}

  static const char* name() { return "cuda"; }
  // The CUDA kernels' limits on a whole model (cuda_limits.hpp); transformer::allocate() calls it.
  static status can_implement(const arch& a) { return cuda::can_implement(a); }
  [[nodiscard]] ::kd::cuda::context& context() const noexcept { return *ctx_; }
  [[nodiscard]] cudaStream_t stream() const noexcept { return ctx_->stream(); }
  // Bitwise-repeatable runs: every reduction in a fixed order (the attention backward then runs its row
  // kernels instead of the flash kernel's fp32 atomics; the other ops are deterministic already).
  void set_deterministic(bool on) noexcept { deterministic_ = on; }
  [[nodiscard]] bool deterministic() const noexcept { return deterministic_; }

  // ---------------------------------------------------------------------------------------------
  // memory
  // ---------------------------------------------------------------------------------------------
  // Zero-filled (in stream order); empty on failure. alloc(b, n) says why.
  template <class U>
  buffer<U> alloc(std::size_t n) {
    buffer<U> b;
    (void)b.allocate(n, stream());
    return b;
  }
  template <class U>
  status alloc(buffer<U>& b, std::size_t n) {
    return b.allocate(n, stream());
  }

  // Host to device, in stream order. From pageable memory the host buffer may be reused on return; from
  // pinned memory it must stay untouched until the stream reaches the copy.
  template <class U>
  status upload(const U* host, std::size_t n, U* dst) {
    check c("upload");
    KD_TRY(model::detail::upload_args(c, host, n, dst).done());
    if (n == 0) return {};
    if constexpr (std::is_same_v<U, I>)  // new positions: the rope_cache table is stale
      if (cos_sin_.pos != nullptr && dst < cos_sin_.pos + cos_sin_.tokens && cos_sin_.pos < dst + n) cos_sin_.pos = nullptr;
    KD_CUDA_TRY(cudaMemcpyAsync(dst, host, n * sizeof(U), cudaMemcpyHostToDevice, stream()), "cuda_ops::upload");
    return {};
  }
  // Device to host; waits for the stream, so the host copy is complete on return.
  template <class U>
  status download(const U* src, std::size_t n, U* host) {
    check c("download");
    KD_TRY(model::detail::download_args(c, src, n, host).done());
    KD_TRY(sync_counts());
    if (n == 0) return {};
    KD_CUDA_TRY(cudaMemcpyAsync(host, src, n * sizeof(U), cudaMemcpyDeviceToHost, stream()), "cuda_ops::download");
    KD_CUDA_TRY(cudaStreamSynchronize(stream()), "cuda_ops::download: cudaStreamSynchronize");
    return {};
  }
  template <class U>
  status fill_zero(U* p, std::size_t n) {
    check c("fill_zero");
    KD_TRY(model::detail::fill_zero_args(c, p, n).done());
    if (n == 0) return {};
    KD_CUDA_TRY(cudaMemsetAsync(p, 0, n * sizeof(U), stream()), "cuda_ops::fill_zero");
    return {};
  }
  template <class U>
  status copy(const U* src, U* dst, std::size_t n) {
    check c("copy");
    KD_TRY(model::detail::copy_args(c, src, dst, n).done());
    if (n == 0 || src == dst) return {};
    KD_CUDA_TRY(cudaMemcpyAsync(dst, src, n * sizeof(U), cudaMemcpyDeviceToDevice, stream()), "cuda_ops::copy");
    return {};
  }
  // dst[r, 0:cols] = src[r, 0:cols] with row strides src_ld / dst_ld (a vector kernel, or cudaMemcpy2DAsync).
  status copy_rows(const T* src, i64 src_ld, T* dst, i64 dst_ld, i64 rows, i64 cols) {
    check c("copy_rows");
    KD_TRY(model::detail::rows_shape(c, src, src_ld, dst, dst_ld, rows, cols).done());
    if (rows == 0 || cols == 0) return {};
    if (cuda::detail::launch_copy_rows(stream(), src, src_ld, dst, dst_ld, rows, cols)) {
      KD_CUDA_TRY(cudaGetLastError(), "copy_rows kernel launch");
      return {};
    }
    constexpr auto b = static_cast<i64>(sizeof(T));
    KD_CUDA_TRY(cudaMemcpy2DAsync(dst, static_cast<std::size_t>(dst_ld * b), src, static_cast<std::size_t>(src_ld * b),
                                  static_cast<std::size_t>(cols * b), static_cast<std::size_t>(rows),
                                  cudaMemcpyDeviceToDevice, stream()),
                "cuda_ops::copy_rows");
    return {};
  }
  status add(T* y, const T* x, std::size_t n) {
    check c("add");
    KD_TRY(model::detail::add_args(c, y, x, n).done());
    return cuda::detail::launch_add(stream(), y, x, static_cast<i64>(n));
  }

  // ---------------------------------------------------------------------------------------------
  // dense (cuBLAS, fp32 accumulation)
  // ---------------------------------------------------------------------------------------------
  status linear(const T* x, const T* w, T* y, i64 M, i64 N, i64 K, bool accumulate) {
    check c("linear");
    KD_TRY(gemm_fits(model::detail::linear_args(c, x, w, y, M, N, K), M, N, K).done());
    cublasHandle_t h = nullptr;
    KD_TRY(ctx_->cublas(h));
    return cuda::detail::linear(h, stream(), x, w, y, M, N, K, accumulate);
  }
  status linear_dx(const T* dy, const T* w, T* dx, i64 M, i64 N, i64 K, bool accumulate) {
    check c("linear_dx");
    KD_TRY(gemm_fits(model::detail::linear_dx_args(c, dy, w, dx, M, N, K), M, N, K).done());
    cublasHandle_t h = nullptr;
    KD_TRY(ctx_->cublas(h));
    return cuda::detail::linear_dx(h, stream(), dy, w, dx, M, N, K, accumulate);
  }
  status linear_dw(const T* dy, const T* x, T* dw, i64 M, i64 N, i64 K, bool accumulate = true) {
    check c("linear_dw");
    KD_TRY(gemm_fits(model::detail::linear_dw_args(c, dy, x, dw, M, N, K), M, N, K).done());
    cublasHandle_t h = nullptr;
    KD_TRY(ctx_->cublas(h));
    return cuda::detail::linear_dw(h, stream(), dy, x, dw, M, N, K, accumulate);
  }

  // Qwen3's per-head QK norm and RoPE in one pass when a head is one 16-byte vector per lane of a
  // power-of-two lane group (head_dim 64 or 128 in bf16); otherwise rmsnorm then rope.
  // The (cos, sin) table of (pos, tokens, D, theta) for the fused QK norm + RoPE ops, kept until the next
  // rope_cache call or upload into pos: a model computes it once a forward instead of once an op (each
  // build is a kernel of its own, four a layer). The caller promises pos does not change meanwhile.
  status rope_cache(const I* pos, i64 tokens, i64 D, double theta) {
    check c("rope_cache");
    KD_TRY(rope_fits(model::detail::rope_cache_args(c, pos, tokens, D, theta), tokens, 1, D).done());
    cos_sin_.pos = nullptr;
    if (tokens == 0) return {};
    const auto n = static_cast<std::size_t>(tokens * (D / 2));
    if (cos_sin_.table.size() < n) KD_TRY(cos_sin_.table.allocate(n, stream()));
    const double* inv_freq = nullptr;
    KD_TRY(rope_table(D, theta, inv_freq));
    KD_TRY(cuda::detail::launch_rope_cos_sin(stream(), pos, inv_freq, cos_sin_.table.data(), tokens, D));
    cos_sin_.pos = pos;
    cos_sin_.tokens = tokens;
    cos_sin_.d = D;
    cos_sin_.theta = theta;
    return {};
  }

  // x_ld (forward) / ld (backward, for x and dx): token stride of x / dx when they are column slices of a
  // wider matrix (0: heads * D), as the q and k parts of the fused QKV projection and its gradient are.
  status rmsnorm_rope(const T* x, const T* w, T* y, A* rstd, const I* pos, i64 tokens, i64 heads, i64 D, double eps,
                      double theta, i64 x_ld = 0) {
    {
      check c("rmsnorm_rope");
      KD_TRY(rope_fits(model::detail::rmsnorm_rope_args(c, x, w, y, rstd, pos, tokens, heads, D, eps, theta, x_ld), tokens,
                       heads, D)
                 .done());
    }
    const i64 HD = heads * D;
    if (x_ld == 0) x_ld = HD;
    if (!cuda::detail::rope_fusable<T>(D, x, w, y, y) || (x_ld * static_cast<i64>(sizeof(T))) % 16 != 0) {
      if (x_ld != HD) {  // gather the slice first; rmsnorm works row by row, so in place is fine
        KD_TRY(copy_rows(x, x_ld, y, HD, tokens, HD));
        x = y;
      }
      KD_TRY(rmsnorm(x, w, y, rstd, tokens * heads, D, eps));
      return rope(y, pos, tokens, heads, D, theta, false);
    }
    if (tokens == 0) return {};
    const float2* cs = cached_cos_sin(pos, tokens, D, theta);
    if (cs == nullptr) {
      const double* inv_freq = nullptr;
      KD_TRY(rope_table(D, theta, inv_freq));
      void* scratch = nullptr;
      KD_TRY(ctx_->scratch(cuda::detail::rope_cos_sin_bytes(tokens, D), scratch));
      KD_TRY(cuda::detail::launch_rope_cos_sin(stream(), pos, inv_freq, static_cast<float2*>(scratch), tokens, D));
      cs = static_cast<const float2*>(scratch);
    }
    return cuda::detail::launch_rmsnorm_rope(stream(), x, w, y, rstd, cs, tokens, heads, D, static_cast<float>(eps), x_ld);
  }
  status rmsnorm_rope_bwd(const T* x, const T* w, const A* rstd, const I* pos, const T* dy, T* dx, T* dw, i64 tokens,
                          i64 heads, i64 D, double theta, i64 ld = 0, bool accumulate_dw = true) {
    {
      check c("rmsnorm_rope_bwd");
      KD_TRY(rope_fits(model::detail::rmsnorm_rope_bwd_args(c, x, w, rstd, pos, dy, dx, dw, tokens, heads, D, theta, ld,
                                                            accumulate_dw),
                       tokens, heads, D)
                 .done());
    }
    const i64 HD = heads * D;
    if (ld == 0) ld = HD;
    if (tokens == 0) return accumulate_dw ? status{} : fill_zero(dw, static_cast<std::size_t>(D));
    const i64 R = tokens * heads;
    if (!cuda::detail::rope_fusable<T>(D, x, w, dy, dx) || (ld * static_cast<i64>(sizeof(T))) % 16 != 0) {
      // Unfused: rotate a copy of dy back, then the norm's backward (temporaries: small heads only).
      const auto n = static_cast<std::size_t>(R * D);
      auto g = alloc<T>(n);
      auto xs = alloc<T>(ld == HD ? 0 : n);
      auto d = alloc<T>(ld == HD ? 0 : n);
      if (g.size() != n || (ld != HD && (xs.size() != n || d.size() != n)))
        return {errc::backend_error, "cuda_ops::rmsnorm_rope_bwd: cannot allocate its temporaries"};
      KD_TRY(copy(dy, g.data(), n));
      KD_TRY(rope(g.data(), pos, tokens, heads, D, theta, true));
      if (ld == HD) return rmsnorm_bwd(x, w, rstd, g.data(), dx, dw, R, D, false, accumulate_dw);
      KD_TRY(copy_rows(x, ld, xs.data(), HD, tokens, HD));
      KD_TRY(rmsnorm_bwd(xs.data(), w, rstd, g.data(), d.data(), dw, R, D, false, accumulate_dw));
      return copy_rows(d.data(), HD, dx, ld, tokens, HD);
    }
    // One scratch block: the (cos, sin) table unless rope_cache holds it, then the partial dw rows.
    const float2* cs = cached_cos_sin(pos, tokens, D, theta);
    const std::size_t table = cs != nullptr ? 0 : (cuda::detail::rope_cos_sin_bytes(tokens, D) + 255) / 256 * 256;
    void* scratch = nullptr;
    KD_TRY(ctx_->scratch(table + cuda::detail::rmsnorm_bwd_scratch_bytes(R, D), scratch));
    if (cs == nullptr) {
      const double* inv_freq = nullptr;
      KD_TRY(rope_table(D, theta, inv_freq));
      KD_TRY(cuda::detail::launch_rope_cos_sin(stream(), pos, inv_freq, static_cast<float2*>(scratch), tokens, D));
      cs = static_cast<const float2*>(scratch);
    }
    return cuda::detail::launch_rmsnorm_bwd(stream(), x, w, rstd, dy, dx, dw, R, D, false,
                                            reinterpret_cast<float*>(static_cast<unsigned char*>(scratch) + table), cs,
                                            heads, ld, accumulate_dw);
  }

  // The experts' GEMMs (grouped_gemm.cuh): spread over side streams when more than one group has rows.
  status grouped_linear(const T* x, const T* w, T* y, const std::int64_t* counts, i64 G, i64 N, i64 K,
                        bool accumulate) {
    KD_TRY(sync_counts());  // counts may be those of a dispatch still on their way
    check args("grouped_linear");
    KD_TRY(model::detail::grouped_linear_args(args, x, w, y, counts, G, N, K).done());
    return on_groups(counts, G, [&](cublasHandle_t h, cudaStream_t s, i64 g, i64 r, i64 c) {
      return cuda::detail::linear(h, s, x + r * K, w + g * N * K, y + r * N, c, N, K, accumulate);
    });
  }
  status grouped_linear_dx(const T* dy, const T* w, T* dx, const std::int64_t* counts, i64 G, i64 N, i64 K,
                           bool accumulate) {
    KD_TRY(sync_counts());
    check args("grouped_linear_dx");
    KD_TRY(model::detail::grouped_linear_dx_args(args, dy, w, dx, counts, G, N, K).done());
    return on_groups(counts, G, [&](cublasHandle_t h, cudaStream_t s, i64 g, i64 r, i64 c) {
      return cuda::detail::linear_dx(h, s, dy + r * N, w + g * N * K, dx + r * K, c, N, K, accumulate);
    });
  }
  // Without accumulate every group's dw is overwritten, an empty group's with zeros.
  status grouped_linear_dw(const T* dy, const T* x, T* dw, const std::int64_t* counts, i64 G, i64 N, i64 K,
                           bool accumulate = true) {
    KD_TRY(sync_counts());
    check args("grouped_linear_dw");
    KD_TRY(model::detail::grouped_linear_dw_args(args, dy, x, dw, counts, G, N, K).done());
    if (!accumulate)
      for (i64 g = 0; g < G; ++g)
        if (counts[g] == 0) KD_TRY(fill_zero(dw + g * N * K, static_cast<std::size_t>(N * K)));
    return on_groups(counts, G, [&](cublasHandle_t h, cudaStream_t s, i64 g, i64 r, i64 c) {
      return cuda::detail::linear_dw(h, s, dy + r * N, x + r * K, dw + g * N * K, c, N, K, accumulate);
    });
  }

  // out[i] = table[ids[i]] (an id outside [0, V) gives a zero row; ids are the caller's to check).
  status embedding(const I* ids, const T* table, T* out, i64 n, i64 V, i64 H) {
    check c("embedding");
    KD_TRY(model::detail::embedding_args(c, ids, table, out, n, V, H).fits_int(n, "n").fits_int(V, "V").done());
    return cuda::detail::launch_gather_rows(stream(), table, ids, out, n, H, V, "embedding kernel launch");
  }
  // dtable[ids[i]] += dout[i]: sorted by id, each table row summed once in fp32 (deterministic).
  status embedding_dw(const I* ids, const T* dout, T* dtable, i64 n, i64 V, i64 H) {
    check c("embedding_dw");
    KD_TRY(model::detail::embedding_dw_args(c, ids, dout, dtable, n, V, H).fits_int(n, "n").fits_int(V, "V").done());
    if (n == 0 || H == 0) return {};
    std::size_t bytes = 0;
    KD_TRY(cuda::detail::embedding_dw_scratch_bytes(n, static_cast<std::int32_t>(V), bytes));
    void* scratch = nullptr;
    KD_TRY(ctx_->scratch(bytes, scratch));
    return cuda::detail::launch_embedding_dw(stream(), ids, dout, dtable, n, static_cast<std::int32_t>(V), H, scratch, bytes);
  }

  // x_copy (optional): also receives x, written by the same pass (the residual stream's copy a layer adds
  // its branch to, without a separate copy kernel reading x again).
  status rmsnorm(const T* x, const T* w, T* y, A* rstd, i64 R, i64 D, double eps, T* x_copy = nullptr) {
    check c("rmsnorm");
    KD_TRY(model::detail::rmsnorm_args(c, x, w, y, rstd, R, D, eps).fits_int(D, "D").done());
    return cuda::detail::launch_rmsnorm(stream(), x, w, y, rstd, R, D, static_cast<float>(eps), x_copy);
  }

  status rmsnorm_bwd(const T* x, const T* w, const A* rstd, const T* dy, T* dx, T* dw, i64 R, i64 D, bool accumulate_dx,
                     bool accumulate_dw = true) {
    check c("rmsnorm_bwd");
    KD_TRY(model::detail::rmsnorm_bwd_args(c, x, w, rstd, dy, dx, dw, R, D, accumulate_dw).fits_int(D, "D").done());
    if (R == 0) return accumulate_dw ? status{} : fill_zero(dw, static_cast<std::size_t>(D));
    void* scratch = nullptr;
    KD_TRY(ctx_->scratch(cuda::detail::rmsnorm_bwd_scratch_bytes(R, D), scratch));
    return cuda::detail::launch_rmsnorm_bwd(stream(), x, w, rstd, dy, dx, dw, R, D, accumulate_dx, static_cast<float*>(scratch),
                                            nullptr, 1, 0, accumulate_dw);
  }

  // HF rotate-half RoPE in place. inv_freq = theta^(-2i/D) in double, built on the device once per
  // (D, theta) and kept; angles formed and range-reduced in double, sin/cos in fp32 (norm.cuh).
  status rope(T* x, const I* pos, i64 tokens, i64 heads, i64 D, double theta, bool inverse) {
    check c("rope");
    KD_TRY(rope_fits(model::detail::rope_args(c, x, pos, tokens, heads, D, theta), tokens, heads, D).done());
    if (tokens == 0) return {};
    const double* inv_freq = nullptr;
    KD_TRY(rope_table(D, theta, inv_freq));
    return cuda::detail::launch_rope(stream(), x, pos, inv_freq, tokens, heads, D, inverse);
  }

  status swiglu(const T* gu, T* h, i64 R, i64 I_) {
    check c("swiglu");
    KD_TRY(model::detail::swiglu_args(c, gu, h, R, I_).done());
    return cuda::detail::launch_swiglu(stream(), gu, h, R, I_);
  }
  status swiglu_bwd(const T* gu, const T* dh, T* dgu, i64 R, i64 I_) {
    check c("swiglu_bwd");
    KD_TRY(model::detail::swiglu_bwd_args(c, gu, dh, dgu, R, I_).done());
    return cuda::detail::launch_swiglu_bwd(stream(), gu, dh, dgu, R, I_);
  }

  // ---------------------------------------------------------------------------------------------
  // attention (kd/model/cuda/flash_attention.cuh); an empty batch or sequence is a no-op, as on the CPU
  // ---------------------------------------------------------------------------------------------
  status attention(const T* q, const T* k, const T* v, T* o, A* lse, i64 batch, i64 seq, i64 Hq, i64 Hkv, i64 D,
                   double scale) {
    check c("attention");
    KD_TRY(model::detail::attention_args(c, q, k, v, o, lse, batch, seq, Hq, Hkv, D, scale).done());
    const i64 tokens = batch * seq;
    if (tokens == 0) return {};
    return cuda::attention_forward<T>(stream(), q, k, v, o, lse, batch, seq, Hq, Hkv, D, static_cast<float>(scale));
  }

  status attention_bwd(const T* q, const T* k, const T* v, const T* o, const A* lse, const T* dout, T* dq, T* dk, T* dv,
                       i64 batch, i64 seq, i64 Hq, i64 Hkv, i64 D, double scale) {
    check c("attention_bwd");
    KD_TRY(model::detail::attention_bwd_args(c, q, k, v, o, lse, dout, dq, dk, dv, batch, seq, Hq, Hkv, D, scale).done());
    const i64 tokens = batch * seq;
    if (tokens == 0) return {};
    void* ws = nullptr;
    KD_TRY(ctx_->scratch(std::max<std::size_t>(16, cuda::attention_backward_workspace_bytes(batch, seq, Hq, Hkv, D)), ws));
    return cuda::attention_backward<T>(stream(), q, k, v, o, lse, dout, dq, dk, dv, batch, seq, Hq, Hkv, D,
                                       static_cast<float>(scale), ws, deterministic_);
  }

  status attention_probs(const T* q, const T* k, const A* lse, T* probs, i64 batch, i64 seq, i64 Hq, i64 Hkv, i64 D,
                         double scale) {
    check c("attention_probs");
    KD_TRY(model::detail::attention_probs_args(c, q, k, lse, probs, batch, seq, Hq, Hkv, D, scale).done());
    const i64 tokens = batch * seq;
    if (tokens == 0) return {};
    return cuda::attention_probs<T>(stream(), q, k, lse, probs, batch, seq, Hq, Hkv, D, static_cast<float>(scale));
  }

  // dq and dk accumulate.
  status attention_probs_bwd(const T* q, const T* k, const T* probs, const T* dprobs, T* dq, T* dk, i64 batch, i64 seq,
                             i64 Hq, i64 Hkv, i64 D, double scale) {
    check c("attention_probs_bwd");
    KD_TRY(model::detail::attention_probs_bwd_args(c, q, k, probs, dprobs, dq, dk, batch, seq, Hq, Hkv, D, scale).done());
    const i64 tokens = batch * seq;
    if (tokens == 0) return {};
    void* ws = nullptr;
    KD_TRY(ctx_->scratch(std::max<std::size_t>(16, cuda::attention_probs_backward_workspace_bytes(batch, seq, Hq, Hkv, D)), ws));
    return cuda::attention_probs_backward<T>(stream(), q, k, probs, dprobs, dq, dk, batch, seq, Hq, Hkv, D,
                                             static_cast<float>(scale), ws);
  }

  // ---------------------------------------------------------------------------------------------
  // mixture of experts (kd/model/cuda/moe_dispatch.cuh)
  // ---------------------------------------------------------------------------------------------
  status router(const T* logits, A* probs, I* topk_idx, A* topk_w, i64 N, i64 E, i64 k, bool renorm) {
    check c("router");
    KD_TRY(router_fits(model::detail::router_args(c, logits, probs, topk_idx, topk_w, N, E, k), N, E, k).done());
    return cuda::detail::launch_router(stream(), logits, probs, topk_idx, topk_w, N, E, k, renorm);
  }

  // dlogits overwritten; dprobs_extra [N, E] may be null. topk_idx is trusted to hold ids in [0, E).
  status router_bwd(const A* probs, const I* topk_idx, const A* dtopk_w, const A* dprobs_extra, T* dlogits, i64 N, i64 E,
                    i64 k, bool renorm) {
    check c("router_bwd");
    KD_TRY(router_fits(model::detail::router_bwd_args(c, probs, topk_idx, dtopk_w, dlogits, N, E, k), N, E, k).done());
    return cuda::detail::launch_router_bwd(stream(), probs, topk_idx, dtopk_w, dprobs_extra, dlogits, N, E, k, renorm);
  }

  // Counting sort on the device. Does not wait: counts_host is filled by sync_counts(), which the grouped
  // GEMMs and download call first, so the host can queue the gather and the residual while the sort runs.
  // Expert ids outside [0, E) come back from sync_counts() as errc::out_of_range (slot_token / token_slot
  // are then incomplete).
  status moe_dispatch(const I* topk_idx, i64 N, i64 E, i64 k, I* slot_token, I* token_slot, std::int64_t* counts_host) {
    check c("moe_dispatch");
    KD_TRY(router_fits(model::detail::moe_dispatch_args(c, topk_idx, N, E, k, slot_token, token_slot, counts_host), N, E, k)
               .done());
    KD_TRY(sync_counts());  // an earlier dispatch nobody collected
    void* scratch = nullptr;
    KD_TRY(ctx_->scratch(cuda::detail::dispatch_scratch_bytes(E), scratch));
    long long* pinned = nullptr;
    KD_TRY(counts_.init(pinned));
    KD_TRY(cuda::detail::launch_dispatch(stream(), topk_idx, N, E, k, slot_token, token_slot, pinned, scratch));
    return counts_.post(stream(), counts_host, E, N * k);
  }
  // Waits for the counts of the last moe_dispatch (if not yet collected) and writes them to its counts_host.
  status sync_counts() { return counts_.collect(); }

  // out[s] = x[rows[s]] (a negative row gives a zero row).
  status gather_rows(const T* x, const I* rows, T* out, i64 S, i64 H) {
    check c("gather_rows");
    KD_TRY(model::detail::gather_rows_args(c, x, rows, out, S, H).done());
    return cuda::detail::launch_gather_rows(stream(), x, rows, out, S, H, std::numeric_limits<i64>::max(),
                                            "gather_rows kernel launch");
  }

  status moe_combine(const T* y, const I* token_slot, const A* topk_w, const T* residual, T* out, i64 N, i64 k, i64 H) {
    check c("moe_combine");
    KD_TRY(model::detail::moe_combine_args(c, y, token_slot, topk_w, out, N, k, H).done());
    return cuda::detail::launch_combine<T, true>(stream(), y, token_slot, topk_w, residual, out, N, k, H,
                                                 "moe_combine kernel launch");
  }

  // dy (overwritten: every slot of a permutation token_slot, as moe_dispatch makes it) and dtopk_w (overwritten).
  status moe_combine_bwd(const T* y, const I* token_slot, const A* topk_w, const T* dout, T* dy, A* dtopk_w, i64 N, i64 k,
                         i64 H) {
    check c("moe_combine_bwd");
    KD_TRY(model::detail::moe_combine_bwd_args(c, y, token_slot, topk_w, dout, dy, dtopk_w, N, k, H).done());
    return cuda::detail::launch_combine_bwd(stream(), y, token_slot, topk_w, dout, dy, dtopk_w, N, k, H);
  }

  status moe_gather_add(const T* dy_slots, const I* token_slot, T* dx, i64 N, i64 k, i64 H, bool accumulate,
                        const T* dlogits = nullptr, const T* w_router = nullptr, i64 E = 0) {
    check c("moe_gather_add");
    KD_TRY(model::detail::moe_gather_add_args(c, dy_slots, token_slot, dx, N, k, H, dlogits, w_router, E)
               .fits_int(E, "E")
               .done());
    return cuda::detail::launch_combine<T, false>(stream(), dy_slots, token_slot, nullptr, accumulate ? dx : nullptr, dx,
                                                  N, k, H, "moe_gather_add kernel launch", dlogits, w_router, E);
  }

 private:
  // This backend's own checks, after the shared ones (op_check.hpp): kernel extents that must fit an int
  // and the kernels' limits (cuda_limits.hpp).
  static check& gemm_fits(check& c, i64 M, i64 N, i64 K) { return c.fits_int(M, "M").fits_int(N, "N").fits_int(K, "K"); }
  static check& rope_fits(check& c, i64 tokens, i64 heads, i64 D) {
    return cuda::detail::rope_limits(c, D).fits_int(tokens, "tokens").fits_int(heads * D, "heads * D");
  }
  static check& router_fits(check& c, i64 N, i64 E, i64 k) { return cuda::detail::router_limits(c, E, k).fits_int(N, "N"); }

  // Runs f(handle, stream, group, first_row, rows) for every non-empty group: on the main stream when
  // there is one, else spread over the side streams between a fork and a join.
  template <class F>
  status on_groups(const std::int64_t* counts, i64 G, F&& f) {
    i64 busy = 0;  // counts were checked (and collected by sync_counts) by the op
    for (i64 g = 0; g < G; ++g) busy += counts[g] > 0 ? 1 : 0;
    if (busy <= 1) {
      cublasHandle_t h = nullptr;
      KD_TRY(ctx_->cublas(h));
      i64 r = 0;
      for (i64 g = 0; g < G; ++g) {
        if (counts[g] > 0) KD_TRY(f(h, stream(), g, r, counts[g]));
        r += counts[g];
      }
      return {};
    }
    if (!pool_) pool_ = std::make_unique<cuda::stream_pool>();
    KD_TRY(pool_->fork(stream()));
    status s;
    i64 r = 0, used = 0;
    for (i64 g = 0; g < G && s.ok(); ++g) {
      if (counts[g] > 0) {
        const int i = static_cast<int>(used++ % cuda::stream_pool::size);
        static_cast<void>(s = f(pool_->handle(i), pool_->stream(i), g, r, counts[g]));
      }
      r += counts[g];
    }
    KD_TRY(pool_->join(stream()));  // join even after a failure: the main stream must not run ahead
    return s;
  }
  std::unique_ptr<cuda::stream_pool> pool_;
  cuda::detail::dispatch_counts counts_;

  // The inv_freq table of (D, theta), built on first use (in stream order, no synchronisation).
  status rope_table(i64 D, double theta, const double*& out) {
    for (const auto& t : rope_tables_)
      if (t.d == D && std::memcmp(&t.theta, &theta, sizeof theta) == 0) {
        out = t.inv_freq.data();
        return {};
      }
    rope_entry e{D, theta, {}};
    KD_TRY(e.inv_freq.allocate(static_cast<std::size_t>(D / 2), stream()));
    KD_TRY(cuda::detail::launch_rope_inv_freq(stream(), e.inv_freq.data(), D, theta));
    rope_tables_.push_back(std::move(e));
    out = rope_tables_.back().inv_freq.data();
    return {};
  }

  struct rope_entry {
    i64 d;
    double theta;
    cuda::device_array<double> inv_freq;
  };

  struct cos_sin_entry {
    const I* pos = nullptr;  // null: nothing cached
    i64 tokens = 0, d = 0;
    double theta = 0;
    cuda::device_array<float2> table;
  };
  const float2* cached_cos_sin(const I* pos, i64 tokens, i64 D, double theta) const {
    const auto& c = cos_sin_;
    return c.pos == pos && c.tokens == tokens && c.d == D && std::memcmp(&c.theta, &theta, sizeof theta) == 0
               ? c.table.data()
               : nullptr;
  }

  ::kd::cuda::context* ctx_;
  bool deterministic_ = false;
  std::vector<rope_entry> rope_tables_;
  cos_sin_entry cos_sin_;
};

static_assert(ModelBackend<cuda_ops<float>>);
static_assert(ModelBackend<cuda_ops<kd::bfloat16>>);

}  // namespace kd::model
