// kd/loss/vocab_parallel.cuh: the vocabulary-parallel losses on the GPU (kd/loss/vocab_parallel.hpp is the
// reference, with the conventions).
//
// Each rank holds a column slice of the logits in device memory; the communicator's collectives act on
// device memory in stream order (kd::cuda::nccl_communicator). Per call, one block per row:
//   1. row maxima of the scaled teacher / student logits over the slice's real columns (and a flag for a
//      non-finite or overflowing logit)        -> all-reduce (max) of [rows x 3]
//   2. sums of exp(y - max)                     -> all-reduce (sum) of [rows x 2]
//   3. the divergence's row terms and sum q * dD/dq (KD only) -> all-reduce (sum) of [rows x 2]
//   4. the slice's gradient, and the row losses -> the loss value (fixed-order sum, then the divisor)
// Why this shape: no rank ever holds a full row, and only O(rows) numbers cross the link. The slice is
// read once per pass (three for KD, two for cross-entropy) where the one-GPU fused kernel reads it once:
// a row's statistics must cross the ranks between the passes. A row with a bad logit on any rank is
// skipped on every rank (the flag is all-reduced); the rank that holds it records the error in its
// context's error word (sync_status names it). The host validation is agreed on by all ranks first.
#pragma once

#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <span>
#include <string>

#include <kd/core/comm.hpp>
#include <kd/cuda/context.cuh>
#include <kd/cuda/detail/reduce.cuh>
#include <kd/cuda/detail/storage.cuh>
#include <kd/loss/cross_entropy.cuh>
#include <kd/loss/logit_kd.cuh>
#include <kd/loss/vocab_parallel.hpp>

namespace kd {
namespace cuda::detail {

constexpr int kVpThreads = 256;

struct vp_params {
  const void* teacher = nullptr;  // KD only
  long long t_stride = 0;
  const void* student = nullptr;  // the student logits (KD) or the logits (cross-entropy)
  long long s_stride = 0;
  void* grad = nullptr;
  long long g_stride = 0;
  long long rows = 0, cols = 0, real = 0;  // real: this slice's real columns, [0, real)
  long long offset = 0;                    // the slice's first column in the full vocabulary
  const std::int32_t* labels = nullptr;
  int ignore_index = -100;
  long long label_vocab = 0;
  float inv_temp = 1.f;
  float param = 0.5f;
  float loss_scale = 1.f;
  float grad_base = 1.f;     // KD: grad_scale * loss_scale / T; CE: grad_scale
  float z_weight = 0.f;      // CE: the z-loss's weight
  const long long* divisor_dev = nullptr;
  double divisor = 1.0;
  bool want_grad = false, accumulate = false;
  double* stats = nullptr;   // [rows x 3]: teacher max, student max, bad (KD); max, bad, - (CE)
  double* sums = nullptr;    // [rows x 2]
  double* terms = nullptr;   // [rows x 2]
  float* partial = nullptr;  // [rows] (KD loss, or CE)
  float* partial_z = nullptr;  // [rows] (CE z-loss)
  unsigned long long* error = nullptr;
  unsigned component = 0;
};

__device__ inline double vp_block_sum(double v, double* sh) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  __syncthreads();
  if (lane == 0) sh[warp] = v;
  __syncthreads();
  double t = 0.0;
  for (int w = 0; w < static_cast<int>(blockDim.x / 32); ++w) t += sh[w];  // fixed order
  return t;
}
__device__ inline float vp_block_max(float v, float* sh) {
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  __syncthreads();
  if (lane == 0) sh[warp] = v;
  __syncthreads();
  float t = -INFINITY;
  for (int w = 0; w < static_cast<int>(blockDim.x / 32); ++w) t = fmaxf(t, sh[w]);
  return t;
}

// Whether row r takes part (label not ignored; a label outside the full vocabulary is recorded, skipped).
__device__ inline bool vp_active(const vp_params& p, long long r) {
  if (p.labels == nullptr) return true;
  const int y = p.labels[r];
  if (y == p.ignore_index) return false;
  if (y < 0 || y >= p.label_vocab) {
    if (threadIdx.x == 0)
      atomicMin(p.error, encode_error(r, device_error::label_out_of_range, device_tensor::labels, p.component));
    return false;
  }
  return true;
}

// Pass 1: scaled maxima and the bad flag. With teacher == nullptr (cross-entropy) only the logits.
template <class TT, class ST>
__global__ void __launch_bounds__(kVpThreads) vp_max_kernel(const vp_params p) {
  __shared__ float sh[32];
  const long long r = blockIdx.x;
  const bool act = vp_active(p, r);
  const bool kd = p.teacher != nullptr;
  float mt = -INFINITY, ms = -INFINITY;
  int bad_t = 0, bad_s = 0;
  if (act) {
    const TT* t = kd ? static_cast<const TT*>(p.teacher) + r * p.t_stride : nullptr;
    const ST* s = static_cast<const ST*>(p.student) + r * p.s_stride;
    for (long long c = threadIdx.x; c < p.real; c += blockDim.x) {
      const float xs = to_float(s[c]), ys = xs * p.inv_temp;
      if (!isfinite(xs) || !isfinite(ys)) bad_s = 1;
      else ms = fmaxf(ms, ys);
      if (kd) {
        const float xt = to_float(t[c]), yt = xt * p.inv_temp;
        if (!isfinite(xt) || !isfinite(yt)) bad_t = 1;
        else mt = fmaxf(mt, yt);
      }
    }
  }
  mt = vp_block_max(mt, sh);
  ms = vp_block_max(ms, sh);
  const int bt = __syncthreads_or(bad_t), bs = __syncthreads_or(bad_s);
  if (threadIdx.x == 0) {
    if (bt || bs)
      atomicMin(p.error, encode_error(r, device_error::non_finite, bt ? device_tensor::teacher : device_tensor::student,
                                      p.component));
    double* st = p.stats + 3 * r;
    if (kd) {
      st[0] = mt;
      st[1] = ms;
      st[2] = (bt || bs) ? 1.0 : 0.0;
    } else {
      st[0] = ms;
      st[1] = bs ? 1.0 : 0.0;
      st[2] = 0.0;
    }
  }
}

// Pass 2: sums of exp(y - max) (KD: teacher, student; CE: the logits and the label's logit, 0 unless here).
template <class TT, class ST>
__global__ void __launch_bounds__(kVpThreads) vp_sum_kernel(const vp_params p) {
  __shared__ double sh[32];
  const long long r = blockIdx.x;
  const bool kd = p.teacher != nullptr;
  const double* st = p.stats + 3 * r;
  const bool use = vp_active(p, r) && (kd ? st[2] == 0.0 : st[1] == 0.0);
  double a = 0.0, b = 0.0;
  const ST* s = static_cast<const ST*>(p.student) + r * p.s_stride;
  if (use) {
    if (kd) {
      const TT* t = static_cast<const TT*>(p.teacher) + r * p.t_stride;
      const float mt = static_cast<float>(st[0]), ms = static_cast<float>(st[1]);
      for (long long c = threadIdx.x; c < p.real; c += blockDim.x) {
        a += static_cast<double>(__expf(to_float(t[c]) * p.inv_temp - mt));
        b += static_cast<double>(__expf(to_float(s[c]) * p.inv_temp - ms));
      }
    } else {
      const float m = static_cast<float>(st[0]);
      for (long long c = threadIdx.x; c < p.real; c += blockDim.x) a += static_cast<double>(__expf(to_float(s[c]) - m));
    }
  }
  a = vp_block_sum(a, sh);
  b = vp_block_sum(b, sh);
  if (threadIdx.x == 0) {
    p.sums[2 * r] = a;
    if (kd) {
      p.sums[2 * r + 1] = b;
    } else {
      const long long y = use ? static_cast<long long>(p.labels[r]) - p.offset : -1;
      p.sums[2 * r + 1] = (y >= 0 && y < p.real) ? static_cast<double>(to_float(s[y])) : 0.0;
    }
  }
}

// KD pass 3: the row's divergence terms and sum q * dD/dq over this slice.
template <class D, class TT, class ST>
__global__ void __launch_bounds__(kVpThreads) vp_kd_terms_kernel(const vp_params p) {
  __shared__ double sh[32];
  const long long r = blockIdx.x;
  const double* st = p.stats + 3 * r;
  const bool use = vp_active(p, r) && st[2] == 0.0;
  double loss = 0.0, cq = 0.0;
  if (use) {
    const TT* t = static_cast<const TT*>(p.teacher) + r * p.t_stride;
    const ST* s = static_cast<const ST*>(p.student) + r * p.s_stride;
    const float tl = static_cast<float>(st[0]) + static_cast<float>(log(p.sums[2 * r]));
    const float sl = static_cast<float>(st[1]) + static_cast<float>(log(p.sums[2 * r + 1]));
    ::kd::detail::divergence_math<D, float> math;
    math.param = p.param;
    for (long long c = threadIdx.x; c < p.real; c += blockDim.x) {
      const float lp = to_float(t[c]) * p.inv_temp - tl, lq = to_float(s[c]) * p.inv_temp - sl;
      const float pj = __expf(lp), qj = __expf(lq);
      loss += static_cast<double>(math.term(pj, lp, qj, lq));
      if constexpr (!std::is_same_v<D, forward_kl>) cq += static_cast<double>(qj * math.dq(pj, lp, qj, lq));
    }
  }
  loss = vp_block_sum(loss, sh);
  cq = vp_block_sum(cq, sh);
  if (threadIdx.x == 0) {
    p.terms[2 * r] = loss;
    p.terms[2 * r + 1] = cq;
  }
}

__device__ inline float vp_divisor(const vp_params& p) {
  return p.divisor_dev != nullptr ? static_cast<float>(*p.divisor_dev > 0 ? *p.divisor_dev : 1) : static_cast<float>(p.divisor);
}

// KD pass 4: the slice's gradient (zero off the real columns and on skipped rows) and the row's loss.
template <class D, class TT, class ST, class GT>
__global__ void __launch_bounds__(kVpThreads) vp_kd_grad_kernel(const vp_params p) {
  const long long r = blockIdx.x;
  const double* st = p.stats + 3 * r;
  const bool use = vp_active(p, r) && st[2] == 0.0;
  if (threadIdx.x == 0) p.partial[r] = use ? static_cast<float>(p.terms[2 * r] * p.loss_scale) : 0.f;
  if (!p.want_grad) return;
  const TT* t = static_cast<const TT*>(p.teacher) + r * p.t_stride;
  const ST* s = static_cast<const ST*>(p.student) + r * p.s_stride;
  GT* g = static_cast<GT*>(p.grad) + r * p.g_stride;
  const float tl = static_cast<float>(st[0]) + static_cast<float>(log(p.sums[2 * r]));
  const float sl = static_cast<float>(st[1]) + static_cast<float>(log(p.sums[2 * r + 1]));
  const float factor = p.grad_base / vp_divisor(p), cq = static_cast<float>(p.terms[2 * r + 1]);
  ::kd::detail::divergence_math<D, float> math;
  math.param = p.param;
  for (long long c = threadIdx.x; c < p.cols; c += blockDim.x) {
    float v = 0.f;
    if (use && c < p.real) {
      const float lp = to_float(t[c]) * p.inv_temp - tl, lq = to_float(s[c]) * p.inv_temp - sl;
      const float pj = __expf(lp), qj = __expf(lq);
      if constexpr (std::is_same_v<D, forward_kl>) v = qj - pj;
      else v = qj * (math.dq(pj, lp, qj, lq) - cq);
      v *= factor;
    } else if (p.accumulate) {
      continue;
    }
    if (p.accumulate) v += to_float(g[c]);
    g[c] = from_float<GT>(v);
  }
}

// CE pass 3: the slice's gradient and the row's cross-entropy and lse^2.
template <class ST, class GT>
__global__ void __launch_bounds__(kVpThreads) vp_ce_grad_kernel(const vp_params p) {
  const long long r = blockIdx.x;
  const double* st = p.stats + 3 * r;
  const bool use = vp_active(p, r) && st[1] == 0.0;
  const float lse = static_cast<float>(st[0]) + static_cast<float>(log(p.sums[2 * r]));
  if (threadIdx.x == 0) {
    p.partial[r] = use ? lse - static_cast<float>(p.sums[2 * r + 1]) : 0.f;
    p.partial_z[r] = use ? lse * lse : 0.f;
  }
  if (!p.want_grad) return;
  const ST* s = static_cast<const ST*>(p.student) + r * p.s_stride;
  GT* g = static_cast<GT*>(p.grad) + r * p.g_stride;
  const float d = vp_divisor(p), gs = p.grad_base / d, zfac = gs + p.z_weight / d * 2.f * lse;
  const long long y = use ? static_cast<long long>(p.labels[r]) - p.offset : -1;
  for (long long c = threadIdx.x; c < p.cols; c += blockDim.x) {
    float v = 0.f;
    if (use && c < p.real) {
      v = __expf(to_float(s[c]) - lse) * zfac - (c == y ? gs : 0.f);
    } else if (p.accumulate) {
      continue;
    }
    if (p.accumulate) v += to_float(g[c]);
    g[c] = from_float<GT>(v);
  }
}

// The slice, its gradient and the labels, as both losses bind them.
template <class ST, class GT, class Options>
void vp_bind(vp_params& p, const matrix_view<const ST>& x, const matrix_view<GT>& g, bool want_grad, const vocab_slice& slice,
             const Options& o, std::span<const std::int32_t> labels) {
  p.student = x.data;
  p.s_stride = x.stride;
  p.grad = want_grad ? static_cast<void*>(g.data) : nullptr;
  p.g_stride = want_grad ? g.stride : 0;
  p.rows = x.rows;
  p.cols = x.cols;
  p.real = ::kd::detail::local_real(slice, x.cols, o.vocab);
  p.offset = slice.offset;
  p.labels = labels.empty() ? nullptr : labels.data();
  p.ignore_index = o.ignore_index;
  p.label_vocab = o.vocab > 0 ? o.vocab : slice.vocab;
  p.want_grad = want_grad;
  p.accumulate = o.accumulate_grad;
}

// Scratch: stats [3n] | sums [2n] | terms [2n] doubles | partial [n] | partial_z [n] floats | count.
inline status vp_scratch(context& ctx, long long n, vp_params& p, long long*& count) {
  const auto N = static_cast<std::size_t>(n);
  const std::size_t d = (7 * N * sizeof(double) + 255) / 256 * 256, f = (2 * N * sizeof(float) + 255) / 256 * 256;
  void* base = nullptr;
  KD_TRY(ctx.scratch(d + f + 256, base));
  auto* dd = static_cast<double*>(base);
  p.stats = dd;
  p.sums = dd + 3 * N;
  p.terms = dd + 5 * N;
  auto* ff = reinterpret_cast<float*>(static_cast<char*>(base) + d);
  p.partial = ff;
  p.partial_z = ff + N;
  count = reinterpret_cast<long long*>(static_cast<char*>(base) + d + f);
  return {};
}

}  // namespace cuda::detail

// Vocabulary-parallel logit KD on the GPU: this rank's [rows x cols] slices in device memory, device
// labels (or none), the loss value into out (every rank gets the whole loss).
template <class Loss, class TT, class ST, class GT>
status vocab_parallel_kd(const cuda::backend& be, const Loss& loss, communicator& comm, vocab_slice slice,
                         matrix_view<TT> teacher_in, matrix_view<ST> student_in, std::span<const std::int32_t> labels,
                         cuda::device_loss& out, matrix_view<GT> dstudent, bool want_grad = true) {
  using namespace cuda::detail;
  using D = typename Loss::divergence;
  using G = std::remove_const_t<GT>;
  const auto& o = loss.options;
  const auto comp = ::kd::detail::component_or(o, "kd");
  const auto teacher = as_const(teacher_in);
  const auto student = as_const(student_in);
  status local = be.ctx == nullptr ? status{errc::invalid_argument, "the CUDA backend has no context"}
                 : out.value == nullptr ? status{errc::invalid_argument, "device_loss.value is null"}
                                        : ::kd::detail::validate_vocab_parallel_kd(loss, slice, teacher, student, labels,
                                                                                  false, dstudent, want_grad);
  KD_TRY(::kd::detail::with_component(::kd::detail::agree_on_call(comm, local, "vocab_parallel_kd"), comp));
  cuda::context& ctx = *be.ctx;
  const cudaStream_t stream = ctx.stream();
  const auto sc = ::kd::detail::make_kd_scaling<Loss::reduction_info.mean>(o, o.temperature, o.scale_by_t2);
  vp_params p;
  vp_bind(p, student, dstudent, want_grad, slice, o, labels);
  p.teacher = teacher.data;
  p.t_stride = teacher.stride;
  p.inv_temp = sc.inv_temp;
  p.loss_scale = static_cast<float>(sc.loss_scale);
  p.grad_base = static_cast<float>(sc.grad_base);
  if constexpr (Loss::divergence_info.uses_beta) p.param = static_cast<float>(o.beta);
  if constexpr (Loss::divergence_info.uses_alpha) p.param = static_cast<float>(o.alpha);
  p.component = ctx.component_slot(comp);
  KD_TRY(ctx.error_word(p.error));
  long long* count = nullptr;
  KD_TRY(vp_scratch(ctx, p.rows, p, count));
  bind_divisor(sc, p, p.labels != nullptr ? count : nullptr, p.rows);
  if (p.labels != nullptr) KD_TRY(launch_count_tokens(p.labels, p.rows, p.ignore_index, count, stream));
  const auto grid = static_cast<unsigned>(p.rows);
  vp_max_kernel<TT, ST><<<grid, kVpThreads, 0, stream>>>(p);
  KD_CUDA_TRY(cudaGetLastError(), "vocab_parallel_kd: max kernel launch");
  KD_TRY(comm.all_reduce(p.stats, static_cast<std::size_t>(3 * p.rows), reduce_op::max));
  vp_sum_kernel<TT, ST><<<grid, kVpThreads, 0, stream>>>(p);
  KD_CUDA_TRY(cudaGetLastError(), "vocab_parallel_kd: sum kernel launch");
  KD_TRY(comm.all_reduce(p.sums, static_cast<std::size_t>(2 * p.rows), reduce_op::sum));
  vp_kd_terms_kernel<D, TT, ST><<<grid, kVpThreads, 0, stream>>>(p);
  KD_CUDA_TRY(cudaGetLastError(), "vocab_parallel_kd: terms kernel launch");
  KD_TRY(comm.all_reduce(p.terms, static_cast<std::size_t>(2 * p.rows), reduce_op::sum));
  vp_kd_grad_kernel<D, TT, ST, G><<<grid, kVpThreads, 0, stream>>>(p);
  KD_CUDA_TRY(cudaGetLastError(), "vocab_parallel_kd: gradient kernel launch");
  return launch_finish_loss(p.partial, p.rows, p.divisor_dev, p.divisor, p.labels != nullptr ? count : nullptr,
                            p.labels == nullptr ? p.rows : -1, out, stream);
}

// Vocabulary-parallel cross-entropy and z-loss on the GPU (device labels of the full vocabulary).
template <class Loss, class ST, class GT>
status vocab_parallel_cross_entropy(const cuda::backend& be, const Loss& loss, communicator& comm, vocab_slice slice,
                                    matrix_view<ST> logits_in, std::span<const std::int32_t> labels,
                                    cuda::device_cross_entropy& out, matrix_view<GT> dlogits, bool want_grad = true) {
  using namespace cuda::detail;
  using G = std::remove_const_t<GT>;
  const auto& o = loss.options;
  const auto comp = ::kd::detail::component_or(o, "lm");
  const auto logits = as_const(logits_in);
  status local = be.ctx == nullptr ? status{errc::invalid_argument, "the CUDA backend has no context"}
                 : out.ce == nullptr ? status{errc::invalid_argument, "device_cross_entropy.ce is null"}
                                     : ::kd::detail::validate_vocab_parallel_ce(loss, slice, logits, labels, false, dlogits,
                                                                               want_grad);
  KD_TRY(::kd::detail::with_component(::kd::detail::agree_on_call(comm, local, "vocab_parallel_cross_entropy"), comp));
  cuda::context& ctx = *be.ctx;
  const cudaStream_t stream = ctx.stream();
  vp_params p;
  vp_bind(p, logits, dlogits, want_grad, slice, o, labels);
  p.grad_base = static_cast<float>(o.grad_scale);
  p.z_weight = static_cast<float>(o.z_loss_weight);
  p.component = ctx.component_slot(comp);
  KD_TRY(ctx.error_word(p.error));
  long long* count = nullptr;
  KD_TRY(vp_scratch(ctx, p.rows, p, count));
  const auto kind = ::kd::detail::divisor_of<Loss::reduction_info.mean>(o);
  if (kind == ::kd::detail::divisor_kind::active_tokens) p.divisor_dev = count;
  else p.divisor = ::kd::detail::token_divisor(kind, o, 0);
  KD_TRY(launch_count_tokens(p.labels, p.rows, p.ignore_index, count, stream));
  const auto grid = static_cast<unsigned>(p.rows);
  vp_max_kernel<ST, ST><<<grid, kVpThreads, 0, stream>>>(p);
  KD_CUDA_TRY(cudaGetLastError(), "vocab_parallel_cross_entropy: max kernel launch");
  KD_TRY(comm.all_reduce(p.stats, static_cast<std::size_t>(3 * p.rows), reduce_op::max));
  vp_sum_kernel<ST, ST><<<grid, kVpThreads, 0, stream>>>(p);
  KD_CUDA_TRY(cudaGetLastError(), "vocab_parallel_cross_entropy: sum kernel launch");
  KD_TRY(comm.all_reduce(p.sums, static_cast<std::size_t>(2 * p.rows), reduce_op::sum));
  vp_ce_grad_kernel<ST, G><<<grid, kVpThreads, 0, stream>>>(p);
  KD_CUDA_TRY(cudaGetLastError(), "vocab_parallel_cross_entropy: gradient kernel launch");
  KD_TRY(launch_finish_loss(p.partial, p.rows, p.divisor_dev, p.divisor, count, -1, cuda::device_loss{out.ce, out.tokens}, stream));
  if (out.z_loss != nullptr)
    KD_TRY(launch_finish_loss(p.partial_z, p.rows, p.divisor_dev, p.divisor, count, -1, cuda::device_loss{out.z_loss, nullptr}, stream));
  return {};
}

}  // namespace kd
