// kd/loss/moe.cuh: Mixture-of-Experts router losses on the GPU (load balance, router z-loss).
//
// Mirrors kd/loss/moe.hpp:
//   load balance  L = coefficient * E * sum_i f_i P_i, f_i = routed slots of expert i / (k T),
//                 P_i = mean_t softmax(logits_t)_i; dL/dz_tj = q_tj (c_j - sum_i q_ti c_i),
//                 c_j = coefficient * E * f_j / T.
//   router z      L = coefficient * mean_t lse(logits_t)^2; dL/dz_tj = coefficient * 2 lse_t / T * q_tj.
// Router logits are small (T x E, E ~ 8..256), so the kernels give each token row one warp (no block
// barriers in the row kernels) and keep everything else in a few tiny launches; nothing here is on the
// hot path. Host-side shape and option checks return at once with the CPU reference's messages
// (validate_router_shape / validate_expert_ids_shape); what only the data reveals (NaN/Inf in the
// logits, an expert id outside [0, E)) is recorded by the row kernel in the context's error word with
// device_tensor::router, and ctx.sync_status() reports the lowest offending token. Such a row gets zero
// probabilities (zero gradient; its ids are still counted in f except the out-of-range ones). No host
// synchronisation.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <string>
#include <type_traits>

#include <kd/cuda/context.cuh>
#include <kd/cuda/detail/reduce.cuh>
#include <kd/cuda/detail/storage.cuh>
#include <kd/loss/moe.hpp>

namespace kd {
namespace cuda::detail {

inline constexpr int kRouterThreads = 256;  // 8 warps = 8 token rows per block
inline constexpr int kRouterRowsPerBlock = kRouterThreads / 32;

__device__ inline float router_warp_max(float v) {
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// Max and finiteness of one router row, read by one warp (lane e handles columns e, e + 32, ...).
// Every lane gets the results. Call with all 32 lanes of the warp.
template <class LT>
__device__ inline void router_row_max(const LT* z, long long e_count, float& m, bool& bad) {
  const int lane = threadIdx.x & 31;
  m = -INFINITY;
  bad = false;
  for (long long e = lane; e < e_count; e += 32) {
    const float v = to_float(z[e]);
    bad = bad || !isfinite(v);
    m = fmaxf(m, v);
  }
  m = router_warp_max(m);
  bad = __any_sync(0xffffffffu, bad) != 0;
}

// Softmax of each router row into q [T x E] (fp32, contiguous), with the row's value checks.
// One warp per token row, kRouterRowsPerBlock rows per block. Why: E is small (often < 32..256), so a
// warp covers a row in a few strided reads and reduces it with shuffles alone; a block-per-row layout
// would leave most threads idle. The row index is warp-uniform, so the early return for rows past T
// retires whole warps, and there are no block barriers to miss.
template <class LT>
__global__ void __launch_bounds__(kRouterThreads) router_softmax_kernel(const LT* logits, long long stride, long long rows,
                                                                        long long e_count, const std::int32_t* ids,
                                                                        long long ids_stride, long long k, float* q,
                                                                        unsigned long long* error, unsigned component) {
  const int lane = threadIdx.x & 31;
  const long long row = static_cast<long long>(blockIdx.x) * kRouterRowsPerBlock + (threadIdx.x >> 5);
  if (row >= rows) return;  // warp-uniform
  const LT* z = logits + row * stride;
  float m;
  bool bad;
  router_row_max(z, e_count, m, bad);
  bool bad_id = false;
  if (ids != nullptr)
    for (long long j = lane; j < k; j += 32) {
      const std::int32_t id = ids[row * ids_stride + j];
      bad_id = bad_id || id < 0 || id >= e_count;
    }
  bad_id = __any_sync(0xffffffffu, bad_id) != 0;
  if (lane == 0) {
    if (bad_id) atomicMin(error, encode_error(row, device_error::label_out_of_range, device_tensor::router, component));
    if (bad) atomicMin(error, encode_error(row, device_error::non_finite, device_tensor::router, component));
  }
  float s = 0.f;
  for (long long e = lane; e < e_count; e += 32) s += expf(to_float(z[e]) - m);
  s = warp_sum(s);
  const float inv = 1.f / s;
  float* qrow = q + row * e_count;
  for (long long e = lane; e < e_count; e += 32) qrow[e] = bad ? 0.f : expf(to_float(z[e]) - m) * inv;
}

// Per expert e: P-sum sum_t q[t, e] and the count of slots routed to e. One block per expert (E blocks).
// Why: E is small, each block reduces one column with a fixed thread-to-element assignment and a fixed
// tree (deterministic, unlike float atomics), and the id count is an integer sum (order-free). The
// column read is strided by E; at T x E of a router that is a few hundred KB through L2, so a
// transposed layout is not worth the extra code. Every thread reaches both barriers (no early return).
template <int = 0>
__global__ void __launch_bounds__(256) expert_stats_kernel(const float* q, long long rows, long long e_count,
                                                           const std::int32_t* ids, long long ids_stride, long long k,
                                                           float* p_sum, unsigned long long* counts) {
  __shared__ float red[32];
  __shared__ unsigned long long cnt;
  const long long e = blockIdx.x;
  if (threadIdx.x == 0) cnt = 0;
  float s = 0.f;
  for (long long t = threadIdx.x; t < rows; t += blockDim.x) s += q[t * e_count + e];
  unsigned long long c = 0;
  for (long long i = threadIdx.x; i < rows * k; i += blockDim.x) c += ids[(i / k) * ids_stride + i % k] == e ? 1 : 0;
  s = block_sum(s, red);  // its barriers also order cnt = 0 before the atomics below
  atomicAdd(&cnt, c);
  __syncthreads();
  if (threadIdx.x == 0) {
    p_sum[e] = s;
    counts[e] = cnt;
  }
}

// f, P, the loss and the gradient coefficients c_j = coefficient * E * f_j / T. One block: thread j
// computes c_j for its experts; thread 0 sums the loss over experts in order (deterministic, in
// double). No barriers.
template <int = 0>
__global__ void load_balance_finish_kernel(const float* p_sum, const unsigned long long* counts, long long rows,
                                           long long e_count, long long k, double coefficient, float* c,
                                           float* value, long long* tokens) {
  const double coef = coefficient * static_cast<double>(e_count);
  const double slots = static_cast<double>(k) * static_cast<double>(rows);
  for (long long j = threadIdx.x; j < e_count; j += blockDim.x)
    c[j] = static_cast<float>(coef * (static_cast<double>(counts[j]) / slots) / static_cast<double>(rows));
  if (threadIdx.x == 0) {
    double total = 0.0;
    for (long long j = 0; j < e_count; ++j)
      total += (static_cast<double>(counts[j]) / slots) * (static_cast<double>(p_sum[j]) / static_cast<double>(rows));
    *value = static_cast<float>(coef * total);
    if (tokens != nullptr) *tokens = rows;
  }
}

// dL/dz_tj = grad_scale * q_tj (c_j - sum_i q_ti c_i). One warp per token row (as router_softmax_kernel):
// the dot product is a warp shuffle reduction; the row index is warp-uniform, no block barriers.
template <class GT>
__global__ void __launch_bounds__(kRouterThreads) load_balance_grad_kernel(const float* q, long long rows,
                                                                           long long e_count, const float* c,
                                                                           float grad_scale, GT* grad,
                                                                           long long g_stride, bool accumulate) {
  const int lane = threadIdx.x & 31;
  const long long row = static_cast<long long>(blockIdx.x) * kRouterRowsPerBlock + (threadIdx.x >> 5);
  if (row >= rows) return;  // warp-uniform
  const float* qrow = q + row * e_count;
  float dot = 0.f;
  for (long long e = lane; e < e_count; e += 32) dot += qrow[e] * c[e];
  dot = warp_sum(dot);
  GT* grow = grad + row * g_stride;
  for (long long e = lane; e < e_count; e += 32) {
    float g = grad_scale * qrow[e] * (c[e] - dot);
    if (accumulate) g += to_float(grow[e]);
    grow[e] = from_float<GT>(g);
  }
}

// Router z-loss: per row lse = logsumexp(z), partial[t] = coefficient * lse^2, gradient
// grad_factor * lse * softmax(z) with grad_factor = grad_scale * coefficient * 2 / T. One warp per
// token row (same shape and reasons as router_softmax_kernel); a bad row (NaN/Inf) reports, adds 0
// and gets a zero gradient.
template <class LT, class GT>
__global__ void __launch_bounds__(kRouterThreads) router_z_kernel(const LT* logits, long long stride, long long rows,
                                                                  long long e_count, float coefficient,
                                                                  float grad_factor, GT* grad, long long g_stride,
                                                                  bool accumulate, float* partial,
                                                                  unsigned long long* error, unsigned component) {
  const int lane = threadIdx.x & 31;
  const long long row = static_cast<long long>(blockIdx.x) * kRouterRowsPerBlock + (threadIdx.x >> 5);
  if (row >= rows) return;  // warp-uniform
  const LT* z = logits + row * stride;
  float m;
  bool bad;
  router_row_max(z, e_count, m, bad);
  float s = 0.f;
  for (long long e = lane; e < e_count; e += 32) s += expf(to_float(z[e]) - m);
  s = warp_sum(s);
  const float lse = m + logf(s);
  if (lane == 0) {
    if (bad) atomicMin(error, encode_error(row, device_error::non_finite, device_tensor::router, component));
    partial[row] = bad ? 0.f : coefficient * lse * lse;
  }
  if (grad == nullptr) return;  // warp-uniform
  GT* grow = grad + row * g_stride;
  const float scale = grad_factor * lse;
  for (long long e = lane; e < e_count; e += 32) {
    float g = bad ? 0.f : scale * expf(to_float(z[e]) - lse);
    if (accumulate) g += to_float(grow[e]);
    grow[e] = from_float<GT>(g);
  }
}

inline unsigned router_blocks(long long rows) {
  return static_cast<unsigned>((rows + kRouterRowsPerBlock - 1) / kRouterRowsPerBlock);
}

}  // namespace cuda::detail

template <>
struct loss_impl<cuda::backend, load_balance_tag> {
  template <class Loss, class LT, class GT>
  static status run(const cuda::backend& be, const Loss& loss, matrix_view<const LT> logits,
                    matrix_view<const std::int32_t> ids, cuda::device_loss& out, matrix_view<GT> dlogits) {
    using namespace cuda::detail;
    static_assert(!std::is_same_v<LT, double>, "kd: the CUDA router losses take float, kd::bfloat16 or kd::half logits.");
    using G = std::remove_const_t<GT>;
    const auto& o = loss.options;
    const std::string ic = ::kd::detail::in_component(o.component);
    if (be.ctx == nullptr) return {errc::invalid_argument, "the CUDA backend has no context"};
    if (out.value == nullptr) return {errc::invalid_argument, "device_loss.value is null" + ic};
    KD_TRY(::kd::detail::validate_router_shape(logits, dlogits, o));
    const long long t_count = logits.rows, e_count = logits.cols;
    KD_TRY(::kd::detail::validate_expert_ids_shape(ids, t_count, e_count, o.component));
    if (!dlogits.empty()) KD_TRY(check_alignment(dlogits.data, "router gradient", o.component));
    KD_TRY(check_alignment(logits.data, "router logits", o.component));
    KD_TRY(check_alignment(ids.data, "expert ids", o.component));

    cuda::context& ctx = *be.ctx;
    const cudaStream_t stream = ctx.stream();
    // Scratch: q [T x E] | p_sum [E] | c [E] | counts [E].
    auto align = [](std::size_t bytes) { return (bytes + 255) / 256 * 256; };
    const std::size_t q_bytes = align(static_cast<std::size_t>(t_count * e_count) * sizeof(float));
    const std::size_t e_bytes = align(static_cast<std::size_t>(e_count) * sizeof(float));
    const std::size_t cnt_bytes = align(static_cast<std::size_t>(e_count) * sizeof(unsigned long long));
    void* scratch = nullptr;
    KD_TRY(ctx.scratch(q_bytes + 2 * e_bytes + cnt_bytes, scratch));
    char* base = static_cast<char*>(scratch);
    float* q = reinterpret_cast<float*>(base);
    float* p_sum = reinterpret_cast<float*>(base + q_bytes);
    float* c = reinterpret_cast<float*>(base + q_bytes + e_bytes);
    auto* counts = reinterpret_cast<unsigned long long*>(base + q_bytes + 2 * e_bytes);
    unsigned long long* err = nullptr;
    KD_TRY(ctx.error_word(err));
    const unsigned slot = ctx.component_slot(o.component);

    router_softmax_kernel<LT><<<router_blocks(t_count), kRouterThreads, 0, stream>>>(
        logits.data, logits.stride, t_count, e_count, ids.data, ids.stride, ids.cols, q, err, slot);
    KD_CUDA_TRY(cudaGetLastError(), "router softmax kernel launch");
    expert_stats_kernel<><<<static_cast<unsigned>(e_count), 256, 0, stream>>>(q, t_count, e_count, ids.data, ids.stride,
                                                                             ids.cols, p_sum, counts);
    KD_CUDA_TRY(cudaGetLastError(), "expert stats kernel launch");
    load_balance_finish_kernel<><<<1, 256, 0, stream>>>(p_sum, counts, t_count, e_count, ids.cols, o.coefficient, c,
                                                        out.value, out.tokens);
    KD_CUDA_TRY(cudaGetLastError(), "load balance finish kernel launch");
    if (!dlogits.empty()) {
      load_balance_grad_kernel<G><<<router_blocks(t_count), kRouterThreads, 0, stream>>>(
          q, t_count, e_count, c, static_cast<float>(o.grad_scale), dlogits.data, dlogits.stride, o.accumulate_grad);
      KD_CUDA_TRY(cudaGetLastError(), "load balance gradient kernel launch");
    }
    return {};
  }
};

template <>
struct loss_impl<cuda::backend, router_z_tag> {
  template <class Loss, class LT, class GT>
  static status run(const cuda::backend& be, const Loss& loss, matrix_view<const LT> logits, cuda::device_loss& out,
                    matrix_view<GT> dlogits) {
    using namespace cuda::detail;
    static_assert(!std::is_same_v<LT, double>, "kd: the CUDA router losses take float, kd::bfloat16 or kd::half logits.");
    using G = std::remove_const_t<GT>;
    const auto& o = loss.options;
    const std::string ic = ::kd::detail::in_component(o.component);
    if (be.ctx == nullptr) return {errc::invalid_argument, "the CUDA backend has no context"};
    if (out.value == nullptr) return {errc::invalid_argument, "device_loss.value is null" + ic};
    KD_TRY(::kd::detail::validate_router_shape(logits, dlogits, o));
    if (!dlogits.empty()) KD_TRY(check_alignment(dlogits.data, "router gradient", o.component));
    KD_TRY(check_alignment(logits.data, "router logits", o.component));

    cuda::context& ctx = *be.ctx;
    const cudaStream_t stream = ctx.stream();
    const long long t_count = logits.rows, e_count = logits.cols;
    void* scratch = nullptr;
    KD_TRY(ctx.scratch(static_cast<std::size_t>(t_count) * sizeof(float), scratch));
    float* partial = static_cast<float*>(scratch);
    unsigned long long* err = nullptr;
    KD_TRY(ctx.error_word(err));
    const float coef = static_cast<float>(o.coefficient);
    const float grad_factor =
        static_cast<float>(o.grad_scale * o.coefficient * 2.0 / static_cast<double>(t_count));
    router_z_kernel<LT, G><<<router_blocks(t_count), kRouterThreads, 0, stream>>>(
        logits.data, logits.stride, t_count, e_count, coef, grad_factor, dlogits.empty() ? nullptr : dlogits.data,
        dlogits.stride, o.accumulate_grad, partial, err, ctx.component_slot(o.component));
    KD_CUDA_TRY(cudaGetLastError(), "router z kernel launch");
    return launch_finish_loss(partial, t_count, nullptr, static_cast<double>(t_count), nullptr, t_count, out, stream);
  }
};

}  // namespace kd
