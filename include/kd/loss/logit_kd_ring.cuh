// kd/loss/logit_kd_ring.cuh: the fused logit-distillation kernel for many rows: persistent clusters
// whose blocks keep a ring of row slices in flight.
//
// Why: the per-row kernel (kd/loss/logit_kd.cuh) copies a row slice and then computes on it. Blocks that
// start together on an SM stay in step, so HBM idles while they compute and the SM's pipes idle while
// they copy (ncu, 8192 x 128,256 bf16 forward KL: DRAM 40%, issue slots 66%; 49-57% of copy bandwidth).
// Here cluster k owns rows k, k + clusters, ...; each block holds `stages` slices (its share of
// consecutive rows: 3-4 of 50-76 KB, one block per SM) and one thread starts the bulk copy of row i + S
// as soon as row i's gradient is written, so the copy engine always has rows in flight while the
// threads compute. No block-wide reduction sits on a row's path: each warp stores its partial
// statistics in its own slot, every warp of the cluster combines all C x 16 slots itself through
// distributed shared memory, and the cluster's exchanges (the two log-sum-exps, with reverse KL's
// q-weighted sum; the row sum C of the two-sweep divergences) are split barriers with a sweep of
// another row between arrive and wait. Slots alternate by row parity, so a fast block never overwrites
// what a slow one still reads. The losses add up per thread over the rows; each block writes one
// partial (a fixed layout for a fixed grid).
// Scope: unmapped rows, 16-byte aligned, one storage type for teacher, student and gradient, where three
// slices fit (V up to 151,936 in 16-bit storage, about 64,000 in fp32), when the context's schedule is
// row_schedule::ring. The planner took it at V = 32,000 until 2026-12-06; since the per-row kernel's
// exchanges became pushes (kd/cuda/detail/cluster_mailbox.cuh) that kernel measures 0.96-0.99x the ring
// for reverse KL and 1.06-1.26x for the others there (H100, RESULTS.md session 18), so the ring stays a
// schedule to ask for, and the base for a ring with the same pushes. In place and accumulating gradients, ignored and
// invalid labels and non-finite rows behave as in the per-row kernel; the last block to finish forms
// the call's value.
// What bounds it (H200, 2026-12-04, benchmarks/RESULTS.md session 7): latency, with one block of 16
// warps per SM. ncu at 8192 x 32,000 forward KL: DRAM 36%, 1.12 eligible warps per scheduler, no warp
// eligible in 41% of cycles. Where the planner takes it (V = 32,000: 2-block clusters, evenly shared
// slices) it runs at 1.16-1.27x the per-row kernel (forward KL 50-56% of copy in bf16, 56-61% in fp32;
// reverse KL, with its KL from pass 1, 1.27-1.48x and 48-58%, session 8).
// On unevenly shared slices (V = 50,304 on 4 blocks) it ran 0.72-0.86x, on 8-block clusters 0.84-1.01x.
#pragma once

#include <cooperative_groups.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstddef>

#include <kd/cuda/context.cuh>
#include <kd/cuda/detail/reduce.cuh>
#include <kd/cuda/detail/storage.cuh>
#include <kd/loss/logit_kd_math.cuh>

namespace kd::cuda::detail {

inline constexpr int kRingMaxStages = 4;
inline constexpr int kRingThreads = 512;  // plan_ring sets it as the launch's threads (logit_kd_launch)
// Dynamic shared memory the slices may take per block: the 227 KB opt-in limit less the static part.
inline constexpr std::size_t kRingSmemLimit = 227 * 1024 - 3 * 1024;
// A block's slice of one row (teacher + student) is kept at or under this when 8 blocks allow it: three
// slices per SM at most 192 KB.
inline constexpr std::size_t kRingSliceTarget = 64 * 1024;

template <class D, class T>
__global__ void __launch_bounds__(kRingThreads, 1) logit_kd_ring_kernel(const logit_kd_params p) {
  namespace cg = cooperative_groups;
  using E = typename entry_for<D, T>::type;
  constexpr bool online = online_c<E>;  // reverse KL: the row's KL from pass 1, then one gradient sweep
  constexpr bool two = !E::one_sweep && !online;
  constexpr int kWarps = kRingThreads / 32;
  cg::cluster_group cluster = cg::this_cluster();
  const unsigned rank = cluster.block_rank(), c_blocks = cluster.num_blocks();
  const unsigned warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const long long cid = blockIdx.x / c_blocks, ncl = gridDim.x / c_blocks;
  const long long nrows = cid < p.rows ? (p.rows - 1 - cid) / ncl + 1 : 0;  // rows cid, cid + ncl, ...
  const int S = p.stages;

  extern __shared__ __align__(16) unsigned char smem_raw[];
  __shared__ unsigned long long full[kRingMaxStages];  // slot s: row i's slices landed (i % S == s)
  // Each warp's partial statistics, by row parity, read by every warp of the cluster (no block-wide
  // reduction, so no __syncthreads on a row's path): (t.m, t.s, s.m, s.s), reverse KL's (w, rt) and the
  // two-sweep sum C.
  __shared__ float4 lse_slot[2][kWarps];
  __shared__ float q_slot[2][kWarps];
  __shared__ std::conditional_t<online, float2[2][kWarps], char> w_slot;  // reverse KL: the student's (w, rt)
  __shared__ float red_sum[32];
  __shared__ double red_d[32];

  const long long j0 = std::min<long long>(static_cast<long long>(rank) * p.chunk, p.support);
  const long long n_local = std::min<long long>(j0 + p.chunk, p.support) - j0;
  const long long half = (p.chunk * static_cast<long long>(sizeof(T)) + 15) / 16 * 16;
  auto tc = [&](long long i) { return reinterpret_cast<T*>(smem_raw + (i % S) * 2 * half); };
  auto sc = [&](long long i) { return reinterpret_cast<T*>(smem_raw + (i % S) * 2 * half + half); };
  const long long bulk = bulk_bytes<T>(n_local);
  const bool has_tail = bulk / static_cast<long long>(sizeof(T)) < n_local;  // the last block's, at most
  auto row_of = [&](long long i) { return cid + i * ncl; };
  auto trow = [&](long long i) { return static_cast<const T*>(p.teacher) + row_of(i) * p.t_stride; };
  auto srow = [&](long long i) { return static_cast<const T*>(p.student) + row_of(i) * p.s_stride; };
  auto active = [&](long long i) { return label_of_row(p, row_of(i)) == row_label::active; };
  // Thread 0: row i's slices into slot i % S. An inactive row moves no bytes but still completes the
  // slot's phase, so every row waits on its slot with the same parity rule.
  auto issue = [&](long long i) {
    if (i >= nrows) return;
    unsigned long long* bar = &full[i % S];
    if (active(i)) start_bulk(bar, tc(i), trow(i) + j0, bulk, sc(i), srow(i) + j0, bulk);
    else mbar_expect_tx(bar, 0);
  };
  if (threadIdx.x == 0) {
    for (int s = 0; s < S; ++s) mbar_init(&full[s]);
    for (long long i = 0; i < S; ++i) issue(i);
  }
  __syncthreads();
  const long long tokens =
      p.count_inline ? static_cast<long long>(block_count_tokens(p.labels, p.rows, p.ignore_index, red_sum)) : 0;
  const double call_divisor = loss_divisor(p.divisor_dev, p.divisor, p.count_inline, tokens);
  const float k2 = p.inv_temp * kLog2e;
  const float factor = p.grad_base / static_cast<float>(call_divisor);
  E e(p.param, factor);
  float loss_total = 0.f;  // this thread's share of its rows' losses (one block sum at the end)

  // Row i's log-sum-exps over this block's slice, reduced over the warp and stored in its slot (the
  // caller arrives at the cluster barrier to publish them).
  auto lse_pass = [&](long long i) {
    mbar_wait(&full[i % S], static_cast<unsigned>((i / S) & 1));
    lse_acc acc[2];
    lse_wacc sw;
    if (active(i)) {  // uniform in the block
      T* t = tc(i);
      T* s = sc(i);
      if (has_tail) {  // the unaligned tail, through registers
        const T* tg = trow(i) + j0;
        const T* sg = srow(i) + j0;
        for (long long c = bulk / static_cast<long long>(sizeof(T)) + threadIdx.x; c < n_local; c += blockDim.x) {
          t[c] = tg[c];
          s[c] = sg[c];
        }
        __syncthreads();
      }
      acc[0] = thread_lse<true>(t, n_local, k2);
      if constexpr (online) {
        sw = warp_lse_w(thread_lse_weighted<true>(s, t, n_local, k2, acc[0].m));
        acc[1] = sw.lse();
      } else {
        acc[1] = warp_lse(thread_lse<true>(s, n_local, k2));
      }
      acc[0] = warp_lse(acc[0]);
    }
    // Safe to overwrite: this parity's previous values (row i - 2) were gathered by every block before
    // it arrived for row i - 1, and this block has waited for that.
    if (lane == 0) {
      lse_slot[i & 1][warp] = make_float4(acc[0].m, acc[0].s, acc[1].m, acc[1].s);
      if constexpr (online) w_slot[i & 1][warp] = make_float2(sw.w, sw.rt);
    }
  };
  // After the cluster wait: every warp combines all the cluster's warp slots itself (lane l reads slots
  // l, l + 32, ...; the same order in every warp, so every thread of the cluster gets the same bits).
  float tlse = 0.f, slse = 0.f;
  bool ok = false;  // row active and both log-sum-exps finite
  const unsigned n_slots = c_blocks * kWarps;
  float row_kl = 0.f;  // reverse KL: the row's KL in bits, from the gather
  auto gather_lse = [&](long long i) {
    lse_acc g[2];
    lse_wacc gw;
    for (unsigned k = lane; k < n_slots; k += 32) {
      const float4 v = *cluster.map_shared_rank(&lse_slot[i & 1][k % kWarps], k / kWarps);
      g[0] = lse_acc::combine(g[0], lse_acc{v.x, v.y});
      if constexpr (online) {
        const float2 w = *cluster.map_shared_rank(&w_slot[i & 1][k % kWarps], k / kWarps);
        gw = lse_wacc::combine(gw, lse_wacc{v.z, v.w, w.x, w.y});
      } else {
        g[1] = lse_acc::combine(g[1], lse_acc{v.z, v.w});
      }
    }
    // Ordered butterflies: each pair combined lower lane first, so every lane gets the same bits.
    g[0] = warp_lse<true>(g[0]);
    if constexpr (online) {
      gw = warp_lse_w<true>(gw);
      g[1] = gw.lse();
      row_kl = E::kl_bits(g[0], gw);
      e.set_c(row_kl);
    } else {
      g[1] = warp_lse<true>(g[1]);
    }
    tlse = g[0].value();
    slse = g[1].value();
    ok = active(i) && isfinite(tlse) && isfinite(slse);
    if constexpr (folds_lse<E, T>) e.fold_lse(factor, g[0], g[1], online);  // fp32: the lse's rounding, per row
    // Forward and skew KL: the float log-sum-exps' rounding (lse_gap_bits), once per row, into the loss.
    using M = ::kd::detail::divergence_math<D, float>;
    if constexpr (!online && adds_lse_gap<D, E>)
      if (ok && rank == 0 && threadIdx.x == 0)
        loss_total += e.loss_of(M{p.param}.lse_gap_weight() * lse_gap_bits(g[0], g[1]));
  };
  // A sweep over row i's slice (16-byte vectors, then the unaligned tail).
  auto sweep = [&](long long i, bool write, auto&& fn) {
    T* g = p.want_grad ? static_cast<T*>(p.grad) + row_of(i) * p.g_stride + j0 : nullptr;
    sweep_slice<T>(tc(i), sc(i), g, n_local, k2, tlse, slse, write, p.accumulate, fn);
  };
  // Two-sweep divergences: row i's loss terms and its warp sums of C, published to the cluster. Entries
  // that keep w (keeps_w) write it over the row's teacher slice for the gradient sweep.
  constexpr bool Keep = two && keeps_w<E, T, T>;
  using W = kept_w_t<T>;
  const bool keep = Keep && p.want_grad;
  auto terms_pass = [&](long long i) {
    float loss = 0.f, cq = 0.f;
    if (ok) {
      if (keep) {
        if constexpr (Keep)
          sweep_slice_keep<T, W>(tc(i), sc(i), n_local, k2, tlse, slse,
                                 [&](float dt, float ds) { return e.term(dt, ds, loss, cq); });
      } else {
        sweep(i, false, [&](float dt, float ds) { return e.first(dt, ds, loss, cq); });
      }
      loss_total += e.loss_of(loss);  // only here: an inactive row's fold (fp32 skew KL's scale) is NaN
    }
    cq = warp_sum(cq);
    if (lane == 0) q_slot[i & 1][warp] = cq;
    cluster_arrive();
  };
  auto gather_c = [&](long long i) {
    float v = 0.f;
    for (unsigned k = lane; k < n_slots; k += 32) v += *cluster.map_shared_rank(&q_slot[i & 1][k % kWarps], k / kWarps);
    e.set_c(warp_sum(v));
  };
  // Row i's gradient (and forward KL's loss), then its slot refilled with row i + S.
  auto grad_pass = [&](long long i) {
    const long long row = row_of(i);
    T* grow = p.want_grad ? static_cast<T*>(p.grad) + row * p.g_stride : nullptr;
    if (ok) {
      if constexpr (two) {
        if (keep) {
          if constexpr (Keep)
            sweep_slice_kept<T, W>(tc(i), sc(i), grow + j0, n_local, k2, slse, p.accumulate,
                                   [&](float ds, float w) { return e.grad_w(ds, w); });
        } else if (p.want_grad) {
          sweep(i, true, [&](float dt, float ds) { return e.grad(dt, ds); });
        }
      } else if constexpr (online) {
        if (p.want_grad) sweep(i, true, [&](float dt, float ds) { return e.grad(dt, ds); });
        if (rank == 0 && threadIdx.x == 0) loss_total += E::loss_of(row_kl);  // once per row
      } else {
        float loss = 0.f, unused = 0.f;
        sweep(i, p.want_grad, [&](float dt, float ds) { return e.first(dt, ds, loss, unused); });
        loss_total += e.loss_of(loss);
      }
    } else {
      if (rank == 0 && threadIdx.x == 0) {
        const row_label label = label_of_row(p, row);
        if (label == row_label::out_of_range)
          atomicMin(p.error, encode_error(row, device_error::label_out_of_range, device_tensor::labels, p.component));
        else if (label == row_label::active)
          atomicMin(p.error, encode_error(row, device_error::non_finite,
                                          isfinite(tlse) ? device_tensor::student : device_tensor::teacher, p.component));
      }
      if (p.want_grad && !p.accumulate) zero_columns(grow, j0, j0 + n_local);
    }
    if (p.want_grad && !p.accumulate && rank == c_blocks - 1) zero_columns(grow, p.support, p.student_cols);  // padding
    // The slot is free once every warp is done with it; thread 0 refills it. A block barrier: the
    // cluster wait that follows holds the warps together anyway, and compute-sanitizer's racecheck
    // does not follow a per-warp release through an mbarrier to the bulk copy (it reported the copy
    // racing with the log-sum-exp reads).
    __syncthreads();
    if (threadIdx.x == 0) {
      fence_proxy_async_smem();
      issue(i + S);
    }
  };

  // The pipeline. Arrive (A) and wait (W) alternate on the one cluster barrier, with a sweep of another
  // row between them: forward and reverse KL L(0) A W | L(1) A G(0) W | L(2) A G(1) W ...; the
  // two-sweep divergences L(0) A W T(0) A | L(1) W A G(0) W T(1) A | ... (L: a row's log-sum-exp pass,
  // T: its terms and C, G: its gradient; each W is followed by the gather of what the last A published).
  if (nrows > 0) {
    lse_pass(0);
    cluster_arrive();
    cluster_wait();
    gather_lse(0);
    if constexpr (two) terms_pass(0);
  }
  for (long long i = 0; i < nrows; ++i) {
    const bool next = i + 1 < nrows;
    if (next) lse_pass(i + 1);
    if constexpr (two) {
      cluster_wait();
      gather_c(i);
    }
    if (next) cluster_arrive();
    grad_pass(i);
    if (next) {
      cluster_wait();
      gather_lse(i + 1);
      if constexpr (two) terms_pass(i + 1);
    }
  }
  cluster_arrive();  // no block exits while another may still read its slots
  cluster_wait();
  // The block's loss (rows of its cluster, its slice) in partial[block]: a fixed layout for a fixed grid.
  const float block_loss = block_sum(loss_total, red_sum);
  if (threadIdx.x == 0) p.partial[blockIdx.x] = block_loss * p.loss_scale;
  finish_call(p, gridDim.x, call_divisor, tokens, red_d);
}

}  // namespace kd::cuda::detail
