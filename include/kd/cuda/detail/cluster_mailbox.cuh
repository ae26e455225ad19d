// kd/cuda/detail/cluster_mailbox.cuh: a row's statistics exchanged between the blocks of a cluster by
// pushes into each block's own shared memory.
//
// Why: the per-row kernels used to publish a block's values in its own shared memory, wait at a cluster
// barrier, read the others' through distributed shared memory, and wait at a second barrier so that no
// block overwrote or left its slot while another still read it (cluster_combine, until 2026-12-06): two
// round trips over the cluster's SMs and a remote load per block, 26% of their stall samples (ncu, H100,
// benchmarks/NOTES.md session 15). The pushes measured 1.04-1.30x on the unmapped per-row losses and
// cross-entropy (H100, benchmarks/RESULTS.md session 18). Here every block writes its values into slot
// [rank] of every block of the cluster with st.async, whose bytes complete on the receiving block's
// mbarrier; each block waits on its own mbarrier for all C slots and reads them from its own shared
// memory. Arrival of the data is the synchronisation: one wait, on the slowest block's
// values, and nothing after it (a block leaves only after every push into it has landed, and nobody reads
// another block's shared memory).
// Use: mailbox_init by one thread at the kernel's start, then a cluster barrier (cluster_arrive early,
// cluster_wait before the first post: the peers' mbarriers must be initialised before anything lands in
// them); then per exchange mailbox_exchange from every thread (the block's values known to all of them),
// and a fold of the slots. Each mailbox serves one exchange of the kernel (phase 0).
#pragma once

#include <cuda_runtime.h>

#include <cmath>

#include <kd/cuda/detail/reduce.cuh>
#include <kd/cuda/detail/storage.cuh>

namespace kd::cuda::detail {

// Slots for up to MaxC blocks (8: the portable cluster size; 16: Hopper's non-portable one, the row
// kernels' 8-byte entries) of N floats each, and the mbarrier they complete on.
template <int N, int MaxC = 8>
struct cluster_mailbox {
  static_assert(N == 1 || N % 2 == 0, "kd: a mailbox slot is one float or pairs of floats (st.async .v2)");
  static_assert(MaxC == 8 || MaxC == 16, "kd: a cluster holds 8 blocks (portable) or 16 (non-portable, sm_90)");
  __align__(8) float v[MaxC][N];
  unsigned long long bar;
};

// The shared::cluster address of this block's `p` in block `rank` of the cluster.
__device__ __forceinline__ unsigned cluster_addr(const void* p, unsigned rank) {
  unsigned r;
  asm volatile("mapa.shared::cluster.u32 %0, %1, %2;" : "=r"(r) : "r"(smem_u32(p)), "r"(rank));
  return r;
}

template <int N, int MaxC>
__device__ inline void mailbox_init(cluster_mailbox<N, MaxC>& mb) {
  mbar_init(&mb.bar);
}

// Sends this block's N values to slot [rank] of every block of the cluster (lane r of the first warp to
// block r), arrives on this block's own mbarrier expecting C slots, and waits until all C blocks' values
// are in this block's slots. Call from every thread.
// A cluster of one block stores its slot and arrives without the async proxy: st.async into the
// shared::cluster window is only defined for clusters of two or more (compute-sanitizer's memcheck
// reports it otherwise).
template <int N, int MaxC>
__device__ inline void mailbox_exchange(cluster_mailbox<N, MaxC>& mb, unsigned rank, unsigned c_blocks,
                                        const float (&vals)[N]) {
  if (c_blocks == 1) {
    if (threadIdx.x == 0) {
#pragma unroll
      for (int i = 0; i < N; ++i) mb.v[0][i] = vals[i];
      // Release (the default): the wait's acquire below sees the slot.
      asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];" ::"r"(smem_u32(&mb.bar)) : "memory");
    }
  } else {
    if (threadIdx.x == 0) mbar_expect_tx(&mb.bar, c_blocks * N * static_cast<unsigned>(sizeof(float)));
    if (threadIdx.x < c_blocks) {
      const unsigned dst = cluster_addr(&mb.v[rank][0], threadIdx.x), bar = cluster_addr(&mb.bar, threadIdx.x);
      if constexpr (N == 1) {
        asm volatile("st.async.shared::cluster.mbarrier::complete_tx::bytes.f32 [%0], %1, [%2];" ::"r"(dst),
                     "f"(vals[0]), "r"(bar)
                     : "memory");
      } else {
#pragma unroll
        for (int i = 0; i < N; i += 2)
          asm volatile("st.async.shared::cluster.mbarrier::complete_tx::bytes.v2.f32 [%0], {%1, %2}, [%3];" ::"r"(
                           dst + 4u * static_cast<unsigned>(i)),
                       "f"(vals[i]), "f"(vals[i + 1]), "r"(bar)
                       : "memory");
      }
    }
  }
  mbar_wait(&mb.bar, 0);
}

// The C slots' (m, s) pairs at floats i, i + 1 folded into one log-sum-exp, in rank order (every block of
// the cluster gets the same bits). As lse_acc::combine: no finite maximum keeps the plain sum of s (0, or
// NaN from a poisoned block), and a NaN s reaches the result either way.
template <int N, int MaxC>
__device__ inline lse_acc mailbox_lse(const cluster_mailbox<N, MaxC>& mb, unsigned c_blocks, int i) {
  float m = -INFINITY;
#pragma unroll 8
  for (unsigned r = 0; r < MaxC; ++r)
    if (r < c_blocks) m = fmaxf(m, mb.v[r][i]);
  float s = 0.f;
#pragma unroll 8
  for (unsigned r = 0; r < MaxC; ++r)
    if (r < c_blocks) s += m == -INFINITY ? mb.v[r][i + 1] : mb.v[r][i + 1] * fast_exp2(mb.v[r][i] - m);
  return {m, s};
}

// The C slots' student accumulators with reverse KL's weighted sum (lse_wacc: m, s, w, rt at floats i to
// i + 3) folded in rank order, as lse_wacc::combine does pairwise: the reference rt of the (first) block
// with the largest maximum, each block's w moved to it by ((m_r - m) + (rt - rt_r)) s_r, empty blocks
// adding nothing to w.
template <int N, int MaxC>
__device__ inline lse_wacc mailbox_lse_w(const cluster_mailbox<N, MaxC>& mb, unsigned c_blocks, int i) {
  float m = -INFINITY, rt = 0.f;
#pragma unroll 8
  for (unsigned r = 0; r < MaxC; ++r)
    if (r < c_blocks && mb.v[r][i] > m) {
      m = mb.v[r][i];
      rt = mb.v[r][i + 3];
    }
  float s = 0.f, w = 0.f;
#pragma unroll 8
  for (unsigned r = 0; r < MaxC; ++r) {
    if (r >= c_blocks) continue;
    const float mr = mb.v[r][i], sr = mb.v[r][i + 1], wr = mb.v[r][i + 2], rtr = mb.v[r][i + 3];
    if (m == -INFINITY) {
      s += sr;
      w += wr;
    } else {
      const float f = fast_exp2(mr - m);
      s += sr * f;
      if (mr != -INFINITY) w += (wr + ((mr - m) + (rt - rtr)) * sr) * f;
    }
  }
  return {m, s, w, m == -INFINITY ? 0.f : rt};
}

// The C slots' float i summed in rank order.
template <int N, int MaxC>
__device__ inline float mailbox_sum(const cluster_mailbox<N, MaxC>& mb, unsigned c_blocks, int i) {
  float s = 0.f;
#pragma unroll 8
  for (unsigned r = 0; r < MaxC; ++r)
    if (r < c_blocks) s += mb.v[r][i];
  return s;
}

}  // namespace kd::cuda::detail
