// kd/loss/cross_entropy.cuh: fused cross-entropy + z-loss (loss and dlogits in one launch).
//
// Same row pipeline as the logit-distillation kernel (kd/loss/logit_kd.cuh): the row's slice is copied
// into shared memory with a running log-sum-exp, the cluster combines the statistics through
// distributed shared memory, and the gradient (softmax * (1 + 2 z lse) - onehot) / normalizer is written
// from shared memory. HBM traffic: one read of the logits, one write of the gradient. One launch per call
// up to kInlineCountRows rows (in-block token count, last-block reduction), as logit_kd's; above it a count
// kernel before and finish kernels after.
// What bounds it (H200, 2026-12-04, commit ca37689, bf16): 2.3-3.0 TB/s of minimum bytes for N >= 8192
// (54-70% of copy), 2.1-2.5 at N = 2048; the same serial copy-then-compute phases per block as logit_kd.
// On an H100 (2026-12-06, RESULTS.md session 18), in 256-thread blocks with the row's log-sum-exp
// exchanged by pushes (kd/cuda/detail/cluster_mailbox.cuh): 89-91% of the copy measured in the same run
// at N = 8192 (V = 50,304 and 151,936), 81-85% at N = 2048.
#pragma once

#include <cooperative_groups.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <span>
#include <string>

#include <kd/cuda/context.cuh>
#include <kd/cuda/detail/cluster_mailbox.cuh>
#include <kd/cuda/detail/reduce.cuh>
#include <kd/cuda/detail/storage.cuh>
#include <kd/loss/cross_entropy.hpp>

namespace kd {
namespace cuda {

// Device outputs of cross_entropy on the CUDA backend.
struct device_cross_entropy {
  float* ce = nullptr;          // one float
  float* z_loss = nullptr;      // one float (optional)
  long long* tokens = nullptr;  // optional
};

namespace detail {

struct cross_entropy_params {
  const void* logits = nullptr;
  long long stride = 0;
  void* grad = nullptr;
  long long g_stride = 0;
  long long rows = 0, vocab = 0, cols = 0, chunk = 0;
  const std::int32_t* labels = nullptr;
  int ignore_index = -100;
  float z_weight = 0.f;
  float grad_base = 1.f;
  const long long* divisor_dev = nullptr;
  double divisor = 1.0;
  bool want_grad = false, accumulate = false, vector_ok = false;
  float* partial_ce = nullptr;  // [rows * C]
  float* partial_z = nullptr;   // [rows * C]
  unsigned long long* error = nullptr;
  unsigned component = 0;
  // The call's end (as logit_kd's, kd/loss/logit_kd.cuh): count_inline: each block counts the tokens
  // (divisor_dev then only marks the divisor as that count) and the last block (ticket) writes ce, z_loss
  // (optional) and tokens (optional); else count_dev holds the count kernel's, ticket is null and finish
  // kernels write them.
  bool count_inline = false;
  const long long* count_dev = nullptr;
  unsigned* ticket = nullptr;
  float* out_ce = nullptr;
  float* out_z = nullptr;
  long long* out_tokens = nullptr;
};

template <class ST, class GT>
__global__ void __launch_bounds__(kRowSliceThreads, 4) cross_entropy_kernel(const cross_entropy_params p) {
  namespace cg = cooperative_groups;
  cg::cluster_group cluster = cg::this_cluster();
  const unsigned rank = cluster.block_rank(), c_blocks = cluster.num_blocks();
  const long long row = static_cast<long long>(blockIdx.x) / c_blocks;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  ST* cache = reinterpret_cast<ST*>(smem_raw);
  __shared__ union {  // every block reduction's scratch (each begins with a barrier before it writes)
    float2 pair[32];
    float sum[32];
    double d[32];
  } red;
  __shared__ cluster_mailbox<2> box;  // the row's log-sum-exp (kd/cuda/detail/cluster_mailbox.cuh)
  __shared__ unsigned long long bar;  // bulk-copy completion
  const long long j0 = std::min<long long>(static_cast<long long>(rank) * p.chunk, p.vocab);
  const long long n_local = std::min<long long>(j0 + p.chunk, p.vocab) - j0;
  const ST* srow = static_cast<const ST*>(p.logits) + row * p.stride;
  GT* grow = p.want_grad ? static_cast<GT*>(p.grad) + row * p.g_stride : nullptr;
  const long long out_i = row * c_blocks + rank;

  const int y = p.labels[row];
  bool active = y != p.ignore_index;
  if (active && (y < 0 || y >= p.vocab)) {
    active = false;
    if (rank == 0 && threadIdx.x == 0)
      atomicMin(p.error, encode_error(row, device_error::label_out_of_range, device_tensor::labels, p.component));
  }
  // An active row's slice starts its bulk copy before anything else: its latency overlaps the label
  // count below (N = 1 stays at 9.1 us of GPU time on an H200: launch and cluster barriers dominate).
  if (threadIdx.x == 0) {
    mbar_init(&bar);
    mailbox_init(box);
    if (active && p.vector_ok) start_bulk(&bar, cache, srow + j0, bulk_bytes<ST>(n_local), nullptr, nullptr, 0);
  }
  __syncthreads();
  cluster_arrive_relaxed();  // the mailbox is initialised; waited for before the post (or the exit)
  const long long tokens =  // this block's count (count_inline), else read from count_dev where needed
      p.count_inline ? static_cast<long long>(block_count_tokens(p.labels, p.rows, p.ignore_index, red.sum)) : 0;
  const double call_divisor = loss_divisor(p.divisor_dev, p.divisor, p.count_inline, tokens);
  // Every block ends here (each exit path, uniformly per block): the last one forms the call's values.
  auto finish = [&] {
    if (p.ticket == nullptr || !last_block_of_grid(p.ticket)) return;
    const long long n = p.rows * c_blocks;
    const double ce = block_sum_ordered(p.partial_ce, n, red.d);
    const double z = p.out_z != nullptr ? block_sum_ordered(p.partial_z, n, red.d) : 0.0;
    if (threadIdx.x == 0) {
      *p.out_ce = static_cast<float>(ce / call_divisor);
      if (p.out_z != nullptr) *p.out_z = static_cast<float>(z / call_divisor);
      if (p.out_tokens != nullptr) *p.out_tokens = p.count_inline ? tokens : *p.count_dev;
    }
  };

  auto zero_slice = [&](long long a, long long b) {
    if (p.want_grad && !p.accumulate)
      for (long long c = a + threadIdx.x; c < b; c += blockDim.x) grow[c] = from_float<GT>(0.f);
  };
  if (rank == c_blocks - 1) zero_slice(p.vocab, p.cols);  // padding columns
  if (!active) {
    zero_slice(j0, j0 + n_local);
    if (threadIdx.x == 0) p.partial_ce[out_i] = p.partial_z[out_i] = 0.f;
    cluster_wait();
    finish();
    return;
  }
  lse_acc acc[1];
  if (p.vector_ok) {
    const long long b = bulk_bytes<ST>(n_local);  // in flight since the kernel's start
    mbar_wait(&bar, 0);
    lse_of_slice(srow + j0, cache, n_local, b / static_cast<long long>(sizeof(ST)), kLog2e, acc[0]);
  } else {
    copy_slice_with_lse(srow + j0, cache, n_local, kLog2e, acc[0]);
  }
  acc[0] = block_lse(acc[0], red.pair);
  // Each block posts after its last read of the row (the gradient may alias the logits), and writes no
  // gradient before every block's post has arrived.
  cluster_wait();  // every block's mailbox is initialised
  const float v[2] = {acc[0].m, acc[0].s};
  mailbox_exchange(box, rank, c_blocks, v);
  acc[0] = mailbox_lse(box, c_blocks, 0);
  const float lse2 = acc[0].value();
  const float lse = lse2 * kLn2;
  if (!isfinite(lse)) {
    if (rank == 0 && threadIdx.x == 0)
      atomicMin(p.error, encode_error(row, device_error::non_finite, device_tensor::student, p.component));
    zero_slice(j0, j0 + n_local);
    if (threadIdx.x == 0) p.partial_ce[out_i] = p.partial_z[out_i] = 0.f;
    finish();
    return;
  }
  if (threadIdx.x == 0) {
    // The block that holds the label's column reports the row's losses; the others report 0.
    const bool mine = y >= j0 && y < j0 + n_local;
    p.partial_ce[out_i] = mine ? lse - to_float(cache[y - j0]) : 0.f;
    p.partial_z[out_i] = mine ? lse * lse : 0.f;
  }
  if (!p.want_grad) {
    finish();
    return;
  }
  const float divisor = static_cast<float>(call_divisor);
  const float factor = p.grad_base / divisor;
  float zfac = factor + p.z_weight / divisor * 2.f * lse;  // coefficient of softmax (kd/loss/cross_entropy.hpp)
  // fp32 gradients: softmax scaled back by the float lse's rounding (lse_fold, kd/cuda/detail/reduce.cuh).
  if constexpr (lse_fold<GT>) zfac *= fast_exp2(acc[0].excess());
  long long done = 0;
  if constexpr (std::is_same_v<ST, GT>) {
    if (p.vector_ok) {
      constexpr int vn = vec_n<ST>;
      const long long nv = n_local / vn;
      for (long long i = threadIdx.x; i < nv; i += blockDim.x) {
        float f[vn];
        unpack<ST>(reinterpret_cast<const uint4*>(cache)[i], f);
#pragma unroll
        for (int k = 0; k < vn; ++k) f[k] = fast_exp2(f[k] * kLog2e - lse2) * zfac - (j0 + i * vn + k == y ? factor : 0.f);
        store_grad_vec<GT>(reinterpret_cast<uint4*>(grow + j0) + i, f, p.accumulate);
      }
      done = nv * vn;
    }
  }
  for (long long j = done + threadIdx.x; j < n_local; j += blockDim.x) {
    float g = fast_exp2(to_float(cache[j]) * kLog2e - lse2) * zfac - (j0 + j == y ? factor : 0.f);
    if (p.accumulate) g += to_float(grow[j0 + j]);
    grow[j0 + j] = from_float<GT>(g);
  }
  finish();
}

}  // namespace detail
}  // namespace cuda

template <>
struct loss_impl<cuda::backend, cross_entropy_tag> {
  template <class Loss, class ST, class GT>
  static status run(const cuda::backend& be, const Loss& loss, matrix_view<const ST> logits,
                    std::span<const std::int32_t> labels, cuda::device_cross_entropy& out, matrix_view<GT> dlogits,
                    bool want_grad) {
    using namespace cuda::detail;
    const auto& o = loss.options;
    const auto comp = ::kd::detail::component_or(o, "lm");
    if (be.ctx == nullptr) return {errc::invalid_argument, "the CUDA backend has no context"};
    if (out.ce == nullptr) return {errc::invalid_argument, "device_cross_entropy.ce is null"};
    index_t vocab = 0;
    KD_TRY(::kd::detail::validate_cross_entropy(loss, logits, labels, false, dlogits, want_grad, vocab));
    // Device-specific: vector loads need aligned rows.
    if (want_grad) KD_TRY(check_alignment(dlogits.data, "logit gradient", comp));
    KD_TRY(check_alignment(logits.data, "logits", comp));

    cuda::context& ctx = *be.ctx;
    const cudaStream_t stream = ctx.stream();
    cross_entropy_params p;
    p.logits = logits.data;
    p.stride = logits.stride;
    p.grad = want_grad ? static_cast<void*>(dlogits.data) : nullptr;
    p.g_stride = want_grad ? dlogits.stride : 0;
    p.rows = logits.rows;
    p.cols = logits.cols;
    p.vocab = vocab;
    p.labels = labels.data();
    p.ignore_index = o.ignore_index;
    p.z_weight = static_cast<float>(o.z_loss_weight);
    p.grad_base = static_cast<float>(o.grad_scale);
    p.want_grad = want_grad;
    p.accumulate = o.accumulate_grad;
    p.vector_ok = rows_aligned(logits) && (!want_grad || rows_aligned(dlogits));
    p.component = ctx.component_slot(comp);
    const int cluster = row_cluster(ctx, p.vocab, sizeof(ST), p.rows, true);
    p.chunk = ((p.vocab + cluster - 1) / cluster + 7) / 8 * 8;
    const std::size_t smem = p.chunk * sizeof(ST);
    if (smem > kSliceLimit) return {errc::invalid_argument, "the vocabulary is too large for one 8-block cluster"};

    void* scratch = nullptr;
    const std::size_t n_part = static_cast<std::size_t>(p.rows) * cluster;
    const std::size_t part_bytes = ((n_part * sizeof(float) + 15) / 16) * 16;
    KD_TRY(ctx.scratch(2 * part_bytes + 64, scratch));
    p.partial_ce = static_cast<float*>(scratch);
    p.partial_z = reinterpret_cast<float*>(static_cast<char*>(scratch) + part_bytes);
    long long* count = reinterpret_cast<long long*>(static_cast<char*>(scratch) + 2 * part_bytes);
    KD_TRY(ctx.error_word(p.error));
    KD_TRY(ctx.ticket(p.ticket));
    p.out_ce = out.ce;
    p.out_z = out.z_loss;
    p.out_tokens = out.tokens;
    p.count_inline = p.rows <= kInlineCountRows;  // else the count kernel first
    if (!p.count_inline) {
      KD_TRY(launch_count_tokens(p.labels, p.rows, p.ignore_index, count, stream));
      p.count_dev = count;
    }
    const auto kind = ::kd::detail::divisor_of<Loss::reduction_info.mean>(o);
    if (kind == ::kd::detail::divisor_kind::active_tokens) p.divisor_dev = count;
    else p.divisor = ::kd::detail::token_divisor(kind, o, 0);

    // Large calls end in finish kernels instead of the grid ticket, as logit_kd's (kd/loss/logit_kd.cuh).
    const bool finish_kernel = !p.count_inline;
    if (finish_kernel) p.ticket = nullptr;
    auto kernel = cross_entropy_kernel<ST, std::remove_const_t<GT>>;
    KD_TRY(ctx.allow_dynamic_smem(kernel, smem));
    const cluster_launch l(p.rows * cluster, cluster, kRowSliceThreads, smem, stream);
    KD_CUDA_TRY(cudaLaunchKernelEx(&l.cfg, kernel, p), "cross_entropy kernel launch");
    if (!finish_kernel) return {};
    const long long n = static_cast<long long>(n_part);
    KD_TRY(launch_finish_loss(p.partial_ce, n, p.divisor_dev, p.divisor, p.count_dev, -1,
                              cuda::device_loss{out.ce, out.tokens}, stream));
    if (out.z_loss == nullptr) return {};
    return launch_finish_loss(p.partial_z, n, p.divisor_dev, p.divisor, p.count_dev, -1,
                              cuda::device_loss{out.z_loss, nullptr}, stream);
  }
};

}  // namespace kd
