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

// The folds below run across the lanes of each warp instead of down the slots in every thread: lane l
// takes slot l mod P (P: c_blocks rounded up to a power of two; slots past c_blocks are empty) and
// log2(P) xor-butterfly levels combine them. The sequential fold (a max over the C slots, then one
// exponential a slot, each behind a branch) ran ~330 instructions in every warp for pass 1's two
// log-sum-exps at C = 8, 7% of JSD's instructions and 12% of its stall samples (ncu SourceCounters, H100,
// 8192 x 128,256 bf16, benchmarks/RESULTS.md session 20), on the path of every block. Across the lanes:
// 1.00-1.03x on the bf16 per-row losses, 1.01-1.08x in fp32 (16-block rows: JSD 1.07-1.08x, reverse KL
// 1.03-1.06x; forward KL fp32 at 16384 x 151,936 0.98x), cross-entropy 1.00x (H100, same-run A/B against
// fef3acc, 2026-12-06).
// Same bits everywhere: the folds are the ordered butterflies of kd/cuda/detail/reduce.cuh (each pair
// combined as lower lane, upper lane), and every group of P lanes holds the same slots, so every lane of
// every warp of every block of the cluster gets the same result (the exchange's contract: one row value
// for the cluster). The combination order is a tree over the ranks, as the pairwise combines define it.
__device__ __forceinline__ unsigned fold_width(unsigned c_blocks) { return 1u << (32 - __clz(c_blocks - 1)); }

// The C slots' (m, s) pairs at floats i, i + 1 folded into one log-sum-exp (lse_acc::combine: no finite
// maximum keeps the plain sum of s, 0 or NaN from a poisoned block, and a NaN s reaches the result).
template <int N, int MaxC>
__device__ inline lse_acc mailbox_lse(const cluster_mailbox<N, MaxC>& mb, unsigned c_blocks, int i) {
  const unsigned width = fold_width(c_blocks), r = threadIdx.x % width;
  return warp_lse<true>(r < c_blocks ? lse_acc{mb.v[r][i], mb.v[r][i + 1]} : lse_acc{}, width);
}

// The C slots' student accumulators with reverse KL's weighted sum (lse_wacc: m, s, w, rt at floats i to
// i + 3) folded by lse_wacc::combine: the reference rt of the lowest-ranked block with the largest
// maximum, each block's w moved to it, empty blocks adding nothing to w.
template <int N, int MaxC>
__device__ inline lse_wacc mailbox_lse_w(const cluster_mailbox<N, MaxC>& mb, unsigned c_blocks, int i) {
  const unsigned width = fold_width(c_blocks), r = threadIdx.x % width;
  const lse_wacc a = warp_lse_w<true>(
      r < c_blocks ? lse_wacc{mb.v[r][i], mb.v[r][i + 1], mb.v[r][i + 2], mb.v[r][i + 3]} : lse_wacc{}, width);
  return {a.m, a.s, a.w, a.m == -INFINITY ? 0.f : a.rt};
}

// The C slots' float i summed.
template <int N, int MaxC>
__device__ inline float mailbox_sum(const cluster_mailbox<N, MaxC>& mb, unsigned c_blocks, int i) {
  const unsigned width = fold_width(c_blocks), r = threadIdx.x % width;
  return warp_sum(r < c_blocks ? mb.v[r][i] : 0.f, width);
}

}  // namespace kd::cuda::detail
