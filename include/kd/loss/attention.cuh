// kd/loss/attention.cuh: attention-map transfer (softmax_kl and none) on the GPU, loss and dscores in one
// launch. Mirrors the CPU reference in kd/loss/attention.hpp formula by formula.
//
// Why this shape: a loss row is one (batch, student head, query) triple of T keys (T up to a few
// thousand), and every row is independent, so each row gets one thread group and nothing is shared
// between groups. T <= 256: one warp per row (8 rows in a 256-thread block), reductions by shuffles
// only, no block barrier at all. T > 256: one 256-thread block per row, reductions through shared
// memory (block_lse / block_sum / __syncthreads_or); every value that decides a branch around a
// barrier (row, group size, the non-finite vote) is the same in all threads of the block, and no
// thread returns before the last barrier of its row unless the whole block does.
// Per row, two passes over global memory (the second mostly hits L1/L2; simplicity over the last bit
// of bandwidth, no shared-memory row cache):
//   pass 1: finiteness of every read score (unmasked keys only) and, for softmax_kl, one base-2
//           online log-sum-exp per mapped teacher head and one for the student;
//   pass 2: target = mean over the mapped teacher heads of their probabilities (softmax_kl) or raw
//           scores (none), the row's loss term and the gradient, written once.
// With a causal mask row i reads keys 0..i only: keys above the diagonal are never loaded (they may
// be -inf or garbage) and their gradient is written as exactly 0 (left untouched with accumulate_grad).
// The loss is reduced deterministically: one partial per row, summed in a fixed order in double by
// finish_loss_kernel and divided by batch * student_heads * T.
// NaN/Inf in a read score is recorded in the context's error word (device_tensor::scores, the row
// being the flat loss row (batch * student_heads + head) * T + query) and the row is skipped (zero
// loss, zero gradient); kd::cuda::context::sync_status() reports it. No host synchronisation.
// The head map is host data: it travels by value in the kernel parameters (at most 64 student heads
// of at most 8 teacher heads each; larger maps are rejected with invalid_argument), so nothing is
// copied to the device and no host buffer has to outlive the call.
#pragma once

#include <cuda_runtime.h>

#include <climits>
#include <string>
#include <type_traits>

#include <kd/cuda/context.cuh>
#include <kd/cuda/detail/reduce.cuh>
#include <kd/cuda/detail/storage.cuh>
#include <kd/loss/attention.hpp>

namespace kd {
namespace cuda::detail {

inline constexpr int kAttnMaxStudentHeads = 64;
inline constexpr int kAttnMaxGroup = 8;        // teacher heads averaged into one student head's target
inline constexpr int kAttnThreads = 256;       // threads per block in both shapes
inline constexpr long long kAttnWarpMaxLen = 256;  // T up to this: one warp per row; above: one block per row

struct attention_params {
  const void* teacher = nullptr;  // [batch * teacher_heads, T, T]
  const void* student = nullptr;  // [batch * student_heads, T, T]
  void* grad = nullptr;           // like student, or null
  long long len = 0;              // T
  long long rows = 0;             // batch * student_heads * T
  int student_heads = 1;
  int teacher_heads = 1;
  bool causal = true;
  bool want_grad = false;
  bool accumulate = false;
  float k2 = kLog2e;          // log2(e) / temperature (softmax_kl only)
  float loss_scale = 1.f;     // temperature^2 (softmax_kl) or 1 (none)
  float grad_factor = 1.f;    // grad_scale * temperature / rows (softmax_kl) or 2 * grad_scale / rows (none)
  float* partial = nullptr;   // [rows] per-row losses, already scaled by loss_scale
  unsigned long long* error = nullptr;
  unsigned component = 0;
  int group_size[kAttnMaxStudentHeads] = {};              // teacher heads of each student head
  int group[kAttnMaxStudentHeads][kAttnMaxGroup] = {};    // their indices
};

// The reductions of a row's thread group: a warp (shuffles) or the whole block (shared memory and
// barriers; every thread of the block must call them).
template <bool Block>
struct attn_group {
  __device__ static float sum(float v, float* scratch) {
    (void)scratch;
    if constexpr (Block) return block_sum(v, scratch);
    else return warp_sum(v);
  }
  __device__ static lse_acc lse(lse_acc a, float2* scratch) {
    (void)scratch;
    if constexpr (Block) return block_lse(a, scratch);
    else return warp_lse(a);
  }
  __device__ static bool any(bool b) {
    if constexpr (Block) return __syncthreads_or(b ? 1 : 0) != 0;
    else return __any_sync(0xffffffffu, b ? 1 : 0) != 0;
  }
};

template <bool KL, bool Block, class TT, class ST, class GT>
__global__ void __launch_bounds__(kAttnThreads) attention_kernel(const __grid_constant__ attention_params p) {
  using grp = attn_group<Block>;
  __shared__ float2 red_lse[32];
  __shared__ float red_sum[32];
  (void)red_lse;  // unused by none

  // Block: one row per block. Warp: row = 8 * block + warp, lanes stride the keys.
  const long long row = Block ? static_cast<long long>(blockIdx.x)
                              : static_cast<long long>(blockIdx.x) * (blockDim.x / 32) + threadIdx.x / 32;
  const int tid = Block ? static_cast<int>(threadIdx.x) : static_cast<int>(threadIdx.x % 32);
  const int nthr = Block ? static_cast<int>(blockDim.x) : 32;
  // Block: grid == rows, never taken. Warp: a whole warp past the end leaves; warps use no block barrier.
  if (row >= p.rows) return;

  const long long len = p.len;
  const long long i = row % len;                         // query position
  const long long smap = row / len;                      // student map: batch * student_heads + head
  const int h = static_cast<int>(smap % p.student_heads);
  const long long b = smap / p.student_heads;
  const long long keys = p.causal ? i + 1 : len;         // keys [0, keys) are read
  const int gsize = p.group_size[h];                     // same for every thread of the row

  const TT* trow[kAttnMaxGroup];
#pragma unroll
  for (int j = 0; j < kAttnMaxGroup; ++j) {
    const long long tmap = b * p.teacher_heads + (j < gsize ? p.group[h][j] : 0);
    trow[j] = static_cast<const TT*>(p.teacher) + (tmap * len + i) * len;
  }
  const ST* srow = static_cast<const ST*>(p.student) + row * len;  // (smap * len + i) * len
  GT* grow = p.want_grad ? static_cast<GT*>(p.grad) + row * len : nullptr;

  // Pass 1: finiteness of everything read; softmax_kl also accumulates y = x / temperature * log2(e).
  bool bad = false;
  lse_acc tacc[kAttnMaxGroup], sacc;
  for (long long k = tid; k < keys; k += nthr) {
#pragma unroll
    for (int j = 0; j < kAttnMaxGroup; ++j) {
      if (j < gsize) {
        const float x = to_float(trow[j][k]);
        bad = bad || !isfinite(KL ? x * p.k2 : x);  // softmax_kl: scaled_logit_ok, the CPU's rule
        if constexpr (KL) tacc[j].add(x * p.k2);
      }
    }
    const float x = to_float(srow[k]);
    bad = bad || !isfinite(KL ? x * p.k2 : x);
    if constexpr (KL) sacc.add(x * p.k2);
  }
  float tlse[kAttnMaxGroup];  // log2 of each teacher head's partition sum (softmax_kl)
  float slse = 0.f;
#pragma unroll
  for (int j = 0; j < kAttnMaxGroup; ++j) tlse[j] = 0.f;
  if constexpr (KL) {
#pragma unroll
    for (int j = 0; j < kAttnMaxGroup; ++j) {
      if (j < gsize) {  // gsize is uniform over the group: all threads reach the same barriers
        tlse[j] = grp::lse(tacc[j], red_lse).value();
        bad = bad || !isfinite(tlse[j]);  // finite scores whose scaled sum overflows
      }
    }
    slse = grp::lse(sacc, red_lse).value();
    bad = bad || !isfinite(slse);
  }
  // One vote for the whole group, so the branch below is uniform (a reduced value may differ in its
  // last bit between threads; the vote cannot).
  if (grp::any(bad)) {
    if (tid == 0) {
      atomicMin(p.error, encode_error(row, device_error::non_finite, device_tensor::scores, p.component));
      p.partial[row] = 0.f;
    }
    if (p.want_grad && !p.accumulate)
      for (long long k = tid; k < len; k += nthr) grow[k] = from_float<GT>(0.f);
    return;  // the whole group returns here: no thread is left waiting at a barrier
  }

  // Pass 2: target, loss term and gradient of every key; masked keys get exactly 0.
  const float inv_g = 1.f / static_cast<float>(gsize);
  float loss = 0.f;
  for (long long k = tid; k < len; k += nthr) {
    if (k < keys) {
      float g;
      if constexpr (KL) {
        // p = mean_g 2^(y_g - lse_g), ds = log2 q; KL term p (log2 p - log2 q) (times ln 2 below).
        float pk = 0.f;
#pragma unroll
        for (int j = 0; j < kAttnMaxGroup; ++j)
          if (j < gsize) pk += fast_exp2(to_float(trow[j][k]) * p.k2 - tlse[j]);
        pk *= inv_g;
        const float ds = to_float(srow[k]) * p.k2 - slse;
        const float qk = fast_exp2(ds);
        if (pk > 0.f) loss += pk * (log2f(pk) - ds);
        g = p.grad_factor * (qk - pk);
      } else {
        float t = 0.f;
#pragma unroll
        for (int j = 0; j < kAttnMaxGroup; ++j)
          if (j < gsize) t += to_float(trow[j][k]);
        t *= inv_g;
        const float d = to_float(srow[k]) - t;
        loss += d * d;
        g = p.grad_factor * d;
      }
      if (p.want_grad) grow[k] = from_float<GT>(p.accumulate ? g + to_float(grow[k]) : g);
    } else if (p.want_grad && !p.accumulate) {
      grow[k] = from_float<GT>(0.f);
    }
  }
  loss = grp::sum(loss, red_sum);  // every thread of the group reaches this
  if (tid == 0) p.partial[row] = KL ? loss * kLn2 * p.loss_scale : loss;
}

// Launches the row kernel in the shape T calls for (p.rows <= INT_MAX, checked by the caller).
template <bool KL, class TT, class ST, class GT>
status launch_attention(const attention_params& p, cudaStream_t stream) {
  if (p.len > kAttnWarpMaxLen) {
    attention_kernel<KL, true, TT, ST, GT><<<static_cast<unsigned>(p.rows), kAttnThreads, 0, stream>>>(p);
  } else {
    constexpr long long per_block = kAttnThreads / 32;
    const long long blocks = (p.rows + per_block - 1) / per_block;
    attention_kernel<KL, false, TT, ST, GT><<<static_cast<unsigned>(blocks), kAttnThreads, 0, stream>>>(p);
  }
  return cuda_status(cudaGetLastError(), "attention kernel launch");
}

}  // namespace cuda::detail

template <>
struct loss_impl<cuda::backend, attention_tag> {
  template <class Loss, class TT, class ST, class GT>
  static status run(const cuda::backend& be, const Loss& loss, tensor3_view<TT> teacher, tensor3_view<ST> student,
                    cuda::device_loss& out, tensor3_view<GT> dstudent) {
    using namespace cuda::detail;
    using TS = std::remove_const_t<TT>;
    using SS = std::remove_const_t<ST>;
    using GS = std::remove_const_t<GT>;
    static_assert(!std::is_const_v<GT>, "kd: the gradient tensor must be writable.");
    constexpr bool kl = Loss::normalization_info.softmax;
    const auto& o = loss.options;
    const std::string ic = ::kd::detail::in_component(o.component);
    if (be.ctx == nullptr) return {errc::invalid_argument, "the CUDA backend has no context"};
    if (out.value == nullptr) return {errc::invalid_argument, "device_loss.value is null" + ic};

    // Shapes, parameters and the head map: the same checks, in the same order, as the CPU backend.
    // The finiteness scan is the kernel's (the maps are device memory).
    head_map fallback;
    const head_map* hm = nullptr;
    ::kd::detail::kd_scaling sc;
    KD_TRY(::kd::detail::validate_attention(o, teacher, student, dstudent, kl, fallback, hm, sc));
    const bool want_grad = !dstudent.empty();
    if (o.student_heads > kAttnMaxStudentHeads)
      return {errc::invalid_argument, "the CUDA attention loss supports at most " + std::to_string(kAttnMaxStudentHeads) +
                                          " student heads, got " + std::to_string(o.student_heads) + ic};
    for (std::size_t h = 0; h < hm->teacher_heads.size(); ++h)
      if (hm->teacher_heads[h].size() > static_cast<std::size_t>(kAttnMaxGroup))
        return {errc::invalid_argument, "head_map gives student head " + std::to_string(h) + " " +
                                            std::to_string(hm->teacher_heads[h].size()) +
                                            " teacher heads; the CUDA attention loss averages at most " +
                                            std::to_string(kAttnMaxGroup) + ic};
    KD_TRY(check_alignment(teacher.data, "teacher attention scores", o.component));
    KD_TRY(check_alignment(student.data, "student attention scores", o.component));
    if (want_grad) KD_TRY(check_alignment(dstudent.data, "student attention gradient", o.component));
    if (student.batch * student.rows > INT_MAX)
      return {errc::invalid_argument, "too many attention rows (" + std::to_string(student.batch * student.rows) +
                                          ") for one launch" + ic};

    cuda::context& ctx = *be.ctx;
    const cudaStream_t stream = ctx.stream();
    attention_params p;
    p.teacher = teacher.data;
    p.student = student.data;
    p.grad = want_grad ? static_cast<void*>(dstudent.data) : nullptr;
    p.len = student.rows;
    p.rows = student.batch * student.rows;
    p.student_heads = o.student_heads;
    p.teacher_heads = o.teacher_heads;
    p.causal = o.causal;
    p.want_grad = want_grad;
    p.accumulate = o.accumulate_grad;
    const double rows = sc.divisor_for(p.rows);
    p.k2 = sc.inv_temp * kLog2e;
    p.loss_scale = static_cast<float>(sc.loss_scale);
    // none: d/ds (s - t)^2 = 2 (s - t); the kernel applies the factor 2 through grad_factor.
    p.grad_factor = static_cast<float>((kl ? 1.0 : 2.0) * sc.grad_factor(p.rows));
    p.component = ctx.component_slot(o.component);
    for (int h = 0; h < o.student_heads; ++h) {
      const auto& g = hm->teacher_heads[static_cast<std::size_t>(h)];
      p.group_size[h] = static_cast<int>(g.size());
      for (std::size_t j = 0; j < g.size(); ++j) p.group[h][j] = g[j];
    }

    void* scratch = nullptr;
    KD_TRY(ctx.scratch(static_cast<std::size_t>(p.rows) * sizeof(float), scratch));
    p.partial = static_cast<float*>(scratch);
    KD_TRY(ctx.error_word(p.error));
    KD_TRY((launch_attention<kl, TS, SS, GS>(p, stream)));
    return launch_finish_loss(p.partial, p.rows, nullptr, rows, nullptr, p.rows, out, stream);
  }
};

}  // namespace kd
