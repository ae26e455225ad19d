// kd/loss/logit_kd.cuh: the fused logit-distillation kernel (loss and dlogits in one launch).
//
// Why this shape: the op is bandwidth-bound (a few flops per byte), so the floor is one read of each
// logit row and one write of its gradient. A row of the support (V columns, or the vocab map's K
// slots) is split over a thread-block cluster of C blocks; each block copies its slice of the teacher
// and student rows into shared memory while keeping an online log-sum-exp, the blocks exchange their
// partial statistics through distributed shared memory, and the gradient is computed from shared
// memory: HBM sees each input once and the gradient once, extra memory is O(N) (one partial loss per
// block). C is the smallest power of two whose slices fit the context's slice budget (64 KiB; row_cluster
// in kd/cuda/detail/storage.cuh): bf16 V = 32,000 -> 2 blocks of 64 KB, 50,304 -> 4 of 50 KB, 151,936 -> 8
// of 76 KB; fp32 rows up to 16 blocks (Hopper's non-portable clusters), 151,936 -> 16 of 76 KB.
// With a vocab map, each slot gathers the log-sum-exp of its teacher ids' logits and the slots are
// normalized over the support (only mapped teacher columns are read). A contiguous map (slot j reads
// teacher column j: kd::vocab_map::contiguous_teacher, the trainer's compact teacher head) reads the
// teacher slice like an unmapped row, through the bulk-copy engine; when the rows are aligned and the
// gradient has the student's type, each block also bulk-copies the span of student columns its slots
// cover (map_kind::span) and forms the gradient there (fp16) or writes it from its sweeps (bf16, fp32),
// else it gathers the student's support columns one by one. In the trainer's shape (bf16, T = 2, 42,304 compact teacher columns onto
// 50,304 student columns, 8192 rows) forward KL went from 1.04 TB/s of minimum bytes gathering to 1.27
// through spans (H200, 2026-12-04; the general CSR map runs at 0.45: its teacher reads are gathers,
// bounded by latency, so each thread keeps a batch of slots' loads in flight; its DRAM floor is the whole
// teacher row, since a scattered map touches every 32-byte sector of it).
// In bf16 and fp32 (span_expands, kd/loss/logit_kd_math.cuh) the span kernel then moves its teacher
// slice to the student's columns in shared memory (expand_span_bits) and fills the columns outside its
// slots with a sentinel logit on both sides (p = q = 0 there), so that the span runs the unmapped rows'
// vector sweeps: slot-by-slot sweeps had taken every entry's student id from memory in each sweep (every
// divergence 1.41-1.56x, 37-46% of copy at the trainer's shape, H100, 2026-12-06, RESULTS.md session 22).
// Which columns its slots cover comes from the map's bitmask (a bit a student column), bulk-copied with
// the span: the support ids (4 bytes a slot) and the sorted list of uncovered ids had cost dependent L2
// round trips after the copies landed (each removed one measured 1.1-1.2x; RESULTS.md sessions 23-25).
// What bounds the span kernel: instruction issue, as the unmapped rows' (ncu, H100, 2026-12-07, JSD at
// 16,384 x 50,304: 75-77% of issue slots at the same occupancy), with more instructions an entry: 83
// against an unmapped row's 62. Of the 21 more, the expansion takes ~12 (a word at a time since session
// 27; entry by entry it took 20.5), the bitmask prefix, the block's setup and waits the rest. bf16,
// T = 2, the trainer's shape: forward KL 69-76% of copy, reverse KL 61-65%, TVD 61-66%, JSD and skew KL
// 52-58% (RESULTS.md session 27).
// The student columns outside the support get a zero gradient (never read, so they can be written at
// any time, even in place).
// The gradient may be the student-logit buffer itself (linear + KD runs the kernel in place on its
// chunk of logits): no gradient column of a row is written before every read of it in that row is done.
// Labels and NaN/Inf are checked in the kernel; a bad row is recorded in the context's error word and
// skipped (kd::cuda::context::sync_status reports it). No host synchronisation happens in a call.
// A call is one launch up to kInlineCountRows rows: each block counts the labels' tokens itself and the
// last block to finish forms the loss value (the context's grid ticket); above that a token-count kernel
// runs first and (the per-row kernel) a finish kernel last: the ticket's fence and atomic at every
// block's end held its slice resident (0.98-1.18x, mostly 1.03-1.08x, across the per-row losses and
// shapes at N >= 2048, H100, 2026-12-06, RESULTS.md session 23). Host cost per call 4.4-5.1 us, GPU
// 10.2 us at N = 1 (kd_bench_small_calls, H200).
// Many rows of an unmapped call may run instead in the ring kernel (kd/loss/logit_kd_ring.cuh: persistent
// clusters, row slices refilled by bulk copies while the threads compute) when the context asks for it
// (plan_ring).
// What bounds it (H200, 2026-12-04, bf16, T = 2, benchmarks/RESULTS.md session 6): instruction issue,
// not HBM. ncu (8192 x 128,256, ncu's locked clocks): forward KL issues in 66% of cycles with DRAM at
// 40%; JSD, before its base-2 rewrite, in 77% with DRAM at 19%. Each block alternates between waiting
// for its slice and computing on it, and 3-4 blocks per SM overlap those phases only partly. Forward KL
// streams at 2.1-2.4 TB/s of minimum bytes for V >= 50,304 (49-57% of the 4.2 TB/s copy); reverse KL at
// 2.0-2.2 (48-53%, session 8: its KL rides on pass 1, so it has one sweep after it as forward KL);
// TVD at 1.6-1.9 (a second sweep and a cluster sum), JSD / skew KL at 1.4-1.5 (two sweeps with a log2
// and a reciprocal per entry each). Session 11 keeps each entry's w from the terms sweep over its
// teacher entry in shared memory (keeps_w), so the gradient sweep takes one exponential instead of
// five MUFU operations: JSD 1.07-1.14x, skew KL 1.04-1.09x, TVD 0.98-1.05x (bf16, 8192 x 32,000 /
// 128,256, both schedules, same-run A/B, H200, 2026-12-05); fp32 JSD / skew KL 0.91-0.92x, the price of
// log2f for their values (kd/loss/logit_kd_math.cuh, mixture_entry). Static shared memory counts: at
// V = 151,936 in 16 bits three 76 KB slices fit an SM only with the static part at ~700 B (reverse KL at
// 1.2 KB ran 2 blocks, 0.98x).
// On an H100 (2026-12-05) forward KL streamed at 66-71% of the measured copy, JSD at 37-46%. ncu there
// (8192 x 128,256): each warp ran as many instructions once per block (block reductions, cluster
// exchange, set-up) as in its sweeps of ~31 entries a thread, and 26% of stalls sat at the two cluster
// barriers of each exchange (benchmarks/NOTES.md, session 15). Session 18 (H100, 2026-12-06, same-run
// A/B, RESULTS.md) took three steps at those: pass 1 of unmapped aligned rows around the block's maxima
// (slice_pair_lse), 256-thread blocks (kRowSliceThreads), and exchanges by pushes into each block's mailbox
// (kd/cuda/detail/cluster_mailbox.cuh: one wait on the slowest block's data, no barrier after it).
// bf16, T = 2, N = 2048-8192, minimum bytes against the copy measured in the same run (3.02-3.04 TB/s):
// forward KL 81-91% of copy at V >= 50,304 (66-72% at 32,000), reverse KL 75-88% (57-64%), TVD 69-76%
// (56-63%), JSD 58-64% (50-55%), skew KL 57-62% (49-54%); fp32 forward / reverse KL at 16384 x 50,304
// 90-91% / 88-89%. What bounds the two-sweep divergences now: their MUFU work (JSD in bf16: 8 MUFU operations
// an entry over pass 1 and two sweeps, ~2.0 ms of the 16 a clock an SM at 8192 x 128,256, against 2.1 ms
// for the bytes), which the block's serial phases (copy, pass 1, exchange, sweeps) overlap with the copy
// only across the 3-4 blocks an SM holds. Not profiled since the change (no device time left).
// Session 19 (H100, 2026-12-06, same-run A/B against fa34557, RESULTS.md): slices of up to 64 KiB in
// place of 52 (V = 32,000 on 2 blocks of 64 KB, not 4 of 32: 1.21-1.35x in bf16, 1.08-1.38x in fp32;
// three blocks an SM with 192 KB in flight against four with 128), fp32 rows on up to 16 blocks
// (V = 151,936: 1.29-1.52x, three 76 KB blocks an SM where 8 blocks held one of 152 KB), and JSD / skew
// KL keeping w in fp16 over 16-bit teacher entries (kept16: the gradient sweep's three MUFU operations
// an entry become one, 1.01-1.05x: the MUFU pipe was not what held them). bf16, N = 8192-16384: forward
// KL 86-96% of copy, reverse KL 81-89%, TVD 71-80%, JSD 62-70%, skew KL 60-68%; fp32 forward KL 82-93%,
// reverse KL 84-92%, TVD 83-84%, JSD 67-78%, skew KL 70-76%.
// What bounds them now (ncu, H100, 8192 x 128,256 bf16, fef3acc, ncu's locked clocks; RESULTS.md session 20):
// instruction issue for the two-sweep divergences. JSD executes 69 instructions an entry (pass 1 ~14, terms
// sweep 27, gradient sweep 12, the rest per block: reductions, exchanges, waits) and issues in 73% of
// cycles with DRAM at 46%; TVD 58 an entry, 72% and 54%; forward KL 39, 61% and 67%. At 1.98 GHz JSD's
// instructions alone take ~2.2 ms against 2.1 ms for its bytes at copy speed, so it cannot reach 80% of
// copy without fewer instructions an entry. Copying in parts to overlap pass 1 with the bulk copy measured
// 0.71-0.98x; folding the exchanged slots across lanes (cluster_mailbox.cuh) 1.00-1.08x (NOTES.md,
// session 20).
// Session 21 (H100, 2026-12-06, same-run A/B against 9964f3a): the kept16 sweeps in pairs (one F2FP
// rounds two kept values, saturating; the loss's constant factors and the m clamp once per thread; the
// factor on the gradient's exponential: kd/loss/logit_kd_math.cuh), TVD's sign kept the same way, the
// sweeps' write / accumulate flags compiled out of their loops, and the loss's block sum riding with C's:
// JSD 75 -> 62 instructions an entry (ncu), 1.06-1.12x; skew KL 1.07-1.12x; TVD 1.03-1.10x; reverse KL
// 1.00-1.04x. bf16 JSD now 68-78% of copy, skew KL 66-75%, TVD 74-87%. JSD's 62: the sweeps' loops 42
// (pass 1 ~14), 12 once per block a warp, the rest waits; issue 69% of cycles, DRAM 53% (ncu's clocks).
// Then (same session, A/B against 076fc92): the first cluster arrive relaxed (reduce.cuh), JSD's clamp
// of m in an FFMA and pass 1's two slices in one loop each (slice_pair_lse): JSD 1.01-1.06x, skew KL
// 1.01-1.05x, TVD 1.00-1.06x, forward KL 1.00-1.08x; bf16 JSD 72-82% of copy, skew KL 69-77%, TVD 76-92%.
#pragma once

#include <cooperative_groups.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <span>
#include <string>

#include <kd/cuda/context.cuh>
#include <kd/cuda/detail/cluster_mailbox.cuh>
#include <kd/cuda/detail/reduce.cuh>
#include <kd/cuda/detail/storage.cuh>
#include <kd/loss/logit_kd.hpp>
#include <kd/loss/logit_kd_math.cuh>
#include <kd/loss/logit_kd_ring.cuh>
#include <kd/loss/vocab_map.cuh>

namespace kd {
namespace cuda::detail {

// K ids of a map array at positions at0 + k * stride (k < K), -1 at or past `end`. Every load is issued
// before any id is used: a batch pays one L2 round trip, where an id loaded beside the store it feeds
// waited for it (the compiler cannot move a load above a store that may alias it). I is the positions'
// type (int with a compile-time stride puts the batch at immediate offsets from one base).
template <int K, class I, class S>
__device__ __forceinline__ void load_ids(const int* ids, I at0, S stride, I end, int (&out)[K]) {
#pragma unroll
  for (int k = 0; k < K; ++k) {
    const I at = at0 + static_cast<I>(k) * static_cast<I>(stride);
    out[k] = at < end ? __ldg(ids + at) : -1;
  }
}

template <class D, class TT, class ST, class GT, map_kind MK>
__global__ void __launch_bounds__(kRowSliceThreads, 4) logit_kd_kernel(const logit_kd_params p) {
  namespace cg = cooperative_groups;
  constexpr bool Map = MK != map_kind::none;
  constexpr bool Csr = MK == map_kind::csr;
  constexpr bool Span = MK == map_kind::span;
  constexpr bool SpanVec = Span && span_expands<TT, ST, GT>;  // the span expanded to vector sweeps
  static_assert(!Span || std::is_same_v<ST, GT>, "kd: the span kernel forms the gradient over the student's span (in its storage type)");
  using TC = std::conditional_t<Csr, float, TT>;  // teacher slice cache: raw logits, or mapped log-probs
  cg::cluster_group cluster = cg::this_cluster();
  const unsigned rank = cluster.block_rank();
  const unsigned c_blocks = cluster.num_blocks();
  const long long row = static_cast<long long>(blockIdx.x) / c_blocks;

  extern __shared__ __align__(16) unsigned char smem_raw[];
  TC* tcache = reinterpret_cast<TC*>(smem_raw);
  ST* scache = reinterpret_cast<ST*>(smem_raw + (((SpanVec ? p.span_cap : p.chunk) * sizeof(TC) + 15) / 16) * 16);
  // Every block reduction's scratch in the same bytes (each begins with a barrier before it writes):
  // static shared memory decides whether three 76 KB slices fit an SM (V = 151,936 in 16 bits).
  __shared__ union {
    float2 pair[32];
    float4 quad[16];
    float sum[32];
    double d[32];
  } red;
  using E = typename entry_for<D, GT>::type;
  // Reverse KL without a map (or over an expanded span): the row's KL rides on pass 1
  // (kd_entry<reverse_kl>::online).
  constexpr bool Online = online_c<E> && (MK == map_kind::none || SpanVec);
  constexpr bool RowSum = !E::one_sweep && !Online;  // a second exchange, of the row's sum C
  // The cluster's exchanges (kd/cuda/detail/cluster_mailbox.cuh): pass 1's log-sum-exps (with reverse KL's
  // weighted sum), and C.
  constexpr int MaxC = max_row_cluster(sizeof(TC) + sizeof(ST));
  __shared__ std::conditional_t<Online, cluster_mailbox<6, MaxC>, cluster_mailbox<4, MaxC>> box;
  __shared__ std::conditional_t<RowSum, cluster_mailbox<1, MaxC>, char> box1;
  __shared__ unsigned long long bar;  // bulk-copy completion
  // Span (fp16): the run of the sorted uncovered list inside [s_lo, s_hi), as positions in it.
  __shared__ std::conditional_t<Span && !SpanVec, long long, char> unc[2];
  const long long j0 = std::min<long long>(static_cast<long long>(rank) * p.chunk, p.support);
  const long long j1 = std::min<long long>(j0 + p.chunk, p.support);
  const long long n_local = j1 - j0;

  const TT* trow = static_cast<const TT*>(p.teacher) + row * p.t_stride;
  const ST* srow = static_cast<const ST*>(p.student) + row * p.s_stride;
  GT* grow = p.want_grad ? static_cast<GT*>(p.grad) + row * p.g_stride : nullptr;
  float* partial = p.partial + row * c_blocks + rank;
  // Span kernel: this block's slots cover student columns [s_lo, s_hi) (support ids are increasing);
  // shared memory holds columns [a0, s_hi) from the 16-byte boundary a0 <= s_lo, the first nb of them
  // through the bulk-copy engine. The block owns the gradient columns [own0, own1): its span plus the
  // uncovered columns up to the next block's span (from column 0 for the first block, to the row's end
  // for the last), so the blocks of a row write every gradient column exactly once.
  // SpanVec: the teacher slice lands at t_off, the first vector boundary at or past (s_hi - a0) - n_local,
  // and moves to its columns' positions from there (expand_span_bits); the teacher's part of shared
  // memory holds span_cap entries (the widest span and a vector). The map's bitmask words [wb0, wb1)
  // (16-byte aligned, covering [a0, s_hi)) land at span_bits_at, their prefix counts after them.
  constexpr int svn = vec_n<ST>;
  long long s_lo = 0, s_hi = 0, a0 = 0, nb = 0, own0 = 0, own1 = 0, t_off = 0, wb0 = 0, wb1 = 0;
  unsigned* sbits = reinterpret_cast<unsigned*>(smem_raw + p.span_bits_at);
  unsigned* spre = sbits + p.span_words;
  if constexpr (Span) {
    if (n_local > 0) {
      s_lo = p.span_lo[rank];
      s_hi = p.span_hi[rank];
      a0 = s_lo / svn * svn;
      nb = (s_hi - a0) / svn * svn;
      if constexpr (SpanVec) {
        t_off = ((s_hi - a0) - n_local + svn - 1) / svn * svn;
        wb0 = a0 / 128 * 4;
        wb1 = (s_hi + 127) / 128 * 4;
      }
    }
    own0 = rank == 0 ? 0 : p.span_lo[rank];
    own1 = rank + 1 < c_blocks ? p.span_lo[rank + 1] : p.student_cols;
  }
  // The span's unaligned tail [a0 + nb, s_hi), which the bulk copy leaves out, through registers.
  auto copy_span_tail = [&] {
    for (long long c = a0 + nb + threadIdx.x; c < s_hi; c += blockDim.x) scache[c - a0] = srow[c];
  };
  // The span kernel's shared-memory position of slot j's student column.
  auto span_pos = [&](long long j) { return static_cast<long long>(__ldg(p.map_support + j0 + j)) - a0; };
  // f(c - a0) for each uncovered student column c in the span [s_lo, s_hi), a thread each: the run
  // [unc[0], unc[1]) of the sorted uncovered list, found by bisection at the kernel's start. Four ids a
  // thread a batch (load_ids): one L2 round trip for the ~2,000 of a block at the trainer's shape, not
  // one an id.
  auto first_uncovered = [&](long long x) {  // the first position in the list whose id is >= x
    long long lo = 0, hi = p.uncovered;
    while (lo < hi) {
      const long long mid = (lo + hi) / 2;
      if (p.map_uncovered[mid] < x) lo = mid + 1;
      else hi = mid;
    }
    return lo;
  };
  auto for_span_uncovered = [&](auto&& f) {
    constexpr int kIds = 4;
    const long long u1 = unc[1];
    const long long bd = blockDim.x;
    for (long long u = unc[0] + threadIdx.x; u < u1; u += kIds * bd) {
      int c[kIds];
      load_ids(p.map_uncovered, u, bd, u1, c);
#pragma unroll
      for (int k = 0; k < kIds; ++k)
        if (c[k] >= 0) f(c[k] - a0);
    }
  };

  // Ignored or invalid rows: zero gradient, zero loss. The decision is the same in every block.
  const row_label label = label_of_row(p, row);
  const bool active = label == row_label::active;
  if (label == row_label::out_of_range && rank == 0 && threadIdx.x == 0)
    atomicMin(p.error, encode_error(row, device_error::label_out_of_range, device_tensor::labels, p.component));
  // An active row's bulk copies start before anything else: their latency overlaps the label count
  // below (at N = 1 that left the GPU time at 10.2 us: the launch and the cluster's barriers dominate).
  if (threadIdx.x == 0) {
    mbar_init(&bar);
    mailbox_init(box);
    if constexpr (RowSum) mailbox_init(box1);
    if (!Csr && active && p.vector_ok) {  // the CSR map gathers its teacher columns instead
      if constexpr (MK == map_kind::none)
        start_bulk(&bar, tcache, trow + j0, bulk_bytes<TT>(n_local), scache, srow + j0, bulk_bytes<ST>(n_local));
      else if constexpr (MK == map_kind::contiguous)
        start_bulk(&bar, tcache, trow + j0, bulk_bytes<TT>(n_local), nullptr, nullptr, 0);
      else if constexpr (Span)  // SpanVec: and the span's bitmask words (none for the fp16 span)
        start_bulk(&bar, tcache + t_off, trow + j0, bulk_bytes<TT>(n_local), scache, srow + a0,
                   nb * static_cast<long long>(sizeof(ST)), sbits, p.map_bits + wb0, (wb1 - wb0) * 4);
    }
  }
  __syncthreads();
  cluster_arrive_relaxed();  // the mailboxes are initialised; waited for before the first post (or the exit)
  // Span (fp16): one lane each of the second and third warps bisects the uncovered list (~13 dependent
  // loads) while the copies are in flight; every read of unc follows a barrier after the copies' wait.
  if constexpr (Span && !SpanVec)
    if (threadIdx.x == 32 || threadIdx.x == 64) unc[threadIdx.x / 64] = first_uncovered(threadIdx.x == 32 ? s_lo : s_hi);
  const long long tokens =  // this block's count (count_inline), else read from count_dev where needed
      p.count_inline ? static_cast<long long>(block_count_tokens(p.labels, p.rows, p.ignore_index, red.sum)) : 0;
  const double call_divisor = loss_divisor(p.divisor_dev, p.divisor, p.count_inline, tokens);
  // Every block ends here (each exit path, uniformly per block): the last one forms the call's value.
  auto finish = [&] { finish_call(p, p.rows * c_blocks, call_divisor, tokens, red.d); };

  // Gradient columns no support entry covers: padding (shared vocab) or unmapped ids (map). The gradient
  // may alias the student logits (linear + KD runs in place), but these columns are never read, so they
  // are zeroed at once, without ordering: the last block the padding of a shared vocab, every block its
  // share of the map's list of uncovered student ids.
  auto zero_range = [&](long long a, long long b) { zero_columns(grow, a, b); };
  auto zero_uncovered = [&]() {
    if (!p.want_grad || p.accumulate) return;
    if constexpr (Span) {
      // The owned columns outside the span (the span's own uncovered columns are zeroed in shared memory).
      // Neighbouring blocks may read these columns into the head of their spans, but never use them.
      zero_range(own0, n_local > 0 ? s_lo : own1);
      if (n_local > 0) zero_range(s_hi, own1);
    } else if constexpr (Map) {
      const long long per = (p.uncovered + c_blocks - 1) / c_blocks;
      const long long a = std::min<long long>(rank * per, p.uncovered), b = std::min<long long>(a + per, p.uncovered);
      // Four ids a thread a batch (load_ids): one id at a time paid an L2 round trip a column.
      constexpr int kU = 4;
      const long long bd = blockDim.x;
      for (long long c = a + threadIdx.x; c < b; c += kU * bd) {
        int id[kU];
        load_ids(p.map_uncovered, c, bd, b, id);
#pragma unroll
        for (int k = 0; k < kU; ++k)
          if (id[k] >= 0) grow[id[k]] = from_float<GT>(0.f);
      }
    } else if (rank == c_blocks - 1) {
      zero_range(p.support, p.student_cols);
    }
  };

  if (!active) {
    if (p.want_grad && !p.accumulate) {
      const long long per = (p.student_cols + c_blocks - 1) / c_blocks;
      const long long a = std::min<long long>(rank * per, p.student_cols);
      zero_range(a, std::min<long long>(a + per, p.student_cols));
    }
    if (threadIdx.x == 0) *partial = 0.f;
    cluster_wait();
    finish();
    return;  // uniform across the cluster: no block waits at a barrier the others skip
  }
  zero_uncovered();

  // Pass 1: copy the slices into shared memory with running base-2 log-sum-exps of y = x / T * log2(e).
  // Strict adds: a y that overflows float (either sign) makes the row's log-sum-exp non-finite, so the
  // row is reported, the rule of scaled_logit_ok that the CPU reference applies per element.
  const float k2 = p.inv_temp * kLog2e;
  lse_acc acc[2];  // [0] teacher (or mapped mass), [1] student
  bool block_done = false;  // acc[] already holds the block's sums (slice_pair_lse)
  // Sixteen-byte vector sweeps (sweep_slice) when every tensor has one storage type and the rows are
  // aligned. JSD, skew KL and TVD over 16-bit vectors keep w in fp16 (kept16, kd/loss/logit_kd_math.cuh);
  // JSD's and skew KL's shifted by w at each thread's largest student logit, which pass 1 finds (s_arg).
  constexpr bool Vec = (!Map || SpanVec) && std::is_same_v<TT, ST> && std::is_same_v<ST, GT>;
  constexpr bool Keep16 = Vec && !Online && sizeof(TT) == 2 && kept16<E>;
  constexpr bool Shift16 = Keep16 && kept16_shifted<E>;
  long long s_arg = -1;
  // The map kernels' gathers and scatters through index arrays: kIdx entries a thread at a time (entries
  // jb + k kT of batch jb), each level's loads issued together before any is used, so an L2 or DRAM round
  // trip is paid once a batch, not once an entry. Before, each entry waited on its ids and then its
  // values, one entry a thread in flight: the general map ran at 12-13% of copy bandwidth.
  // The per-row kernel's blocks are kRowSliceThreads wide: a constant stride puts a batch's entries at
  // immediate offsets from one base (a batch of 64-bit addresses spilled at 8 entries).
  constexpr int kIdx = 8, kT = kRowSliceThreads;
  const int nl = static_cast<int>(n_local);
  const int* sup = Map ? p.map_support + j0 : nullptr;  // this block's slots' student ids
  auto batches = [&](auto&& f) {
    for (int jb = threadIdx.x; jb < nl; jb += kIdx * kT) f(jb);
  };
  // Batch jb's student ids (-1 past the block's slots).
  auto batch_cols = [&](int jb, int (&col)[kIdx]) { load_ids(sup, jb, kT, nl, col); };
  auto gather_student = [&]() {
    batches([&](int jb) {
      int col[kIdx];
      batch_cols(jb, col);
      ST sv[kIdx];
#pragma unroll
      for (int k = 0; k < kIdx; ++k) sv[k] = col[k] >= 0 ? srow[col[k]] : ST{};
#pragma unroll
      for (int k = 0; k < kIdx; ++k)
        if (col[k] >= 0) {
          scache[jb + k * kT] = sv[k];
          acc[1].add(lse_acc::strict(to_float(sv[k]) * k2));
        }
    });
  };
  if constexpr (SpanVec) {
    // Both in flight since the kernel's start: the teacher slice and the student span. Their unaligned
    // tails through registers, the teacher slice expanded to its columns, the sentinel around its slots,
    // then pass 1 as an unmapped row's.
    // The tails land past the bulk copies' bytes, so they are copied while those are still in flight.
    const long long bt = bulk_bytes<TT>(n_local) / static_cast<long long>(sizeof(TT)), len = s_hi - a0;
    copy_span_tail();
    for (long long i = bt + threadIdx.x; i < n_local; i += blockDim.x) tcache[t_off + i] = trow[j0 + i];
    mbar_wait(&bar, 0);
    __syncthreads();
    span_bits_prefix<kRowSliceThreads>(sbits, spre, wb1 - wb0, wb0, s_lo, s_hi, reinterpret_cast<unsigned*>(red.sum));
    const float sent = fmaxf(kSpanSentinelBits / k2, -3.0e38f);
    expand_span_bits<kRowSliceThreads>(tcache, t_off, len, sbits, spre, a0, wb0, scache, from_float<TT>(sent), from_float<ST>(sent));
    if constexpr (Online) {
      __syncthreads();
      acc[0] = thread_lse<true>(tcache, len, k2);
    } else {
      slice_pair_lse<true, Shift16>(tcache, tcache, len, scache, scache, len, len, k2, red.pair, acc[0], acc[1], &s_arg);
      block_done = true;
    }
  } else if constexpr (Span) {
    // Both in flight since the kernel's start: the teacher slice and the student span (the planner
    // chooses this kernel only for aligned rows). The span's unaligned tail goes through registers
    // before lse_of_slice's barrier.
    const long long bt = bulk_bytes<TT>(n_local);
    mbar_wait(&bar, 0);
    copy_span_tail();
    lse_of_slice<true>(trow + j0, tcache, n_local, bt / static_cast<long long>(sizeof(TT)), k2, acc[0]);
    for (long long j = threadIdx.x; j < n_local; j += blockDim.x)
      acc[1].add(lse_acc::strict(to_float(scache[span_pos(j)]) * k2));
  } else if constexpr (MK == map_kind::contiguous) {
    // The teacher slice in flight through the bulk-copy engine while the threads gather the student's.
    if (p.vector_ok) {
      const long long bt = bulk_bytes<TT>(n_local);  // in flight since the kernel's start
      gather_student();
      mbar_wait(&bar, 0);
      lse_of_slice<true>(trow + j0, tcache, n_local, bt / static_cast<long long>(sizeof(TT)), k2, acc[0]);
    } else {
      copy_slice_with_lse<true>(trow + j0, tcache, n_local, k2, acc[0]);
      gather_student();
    }
  } else if constexpr (Csr) {
    // Each slot: the log-sum-exp of its teacher ids' scaled logits. The teacher's own normalizer
    // cancels in the renormalization over the support, so only mapped columns are ever read (padded
    // teacher rows cannot change the loss).
    // Three levels of loads a batch (offsets and student ids; first teacher ids and student logits;
    // teacher logits); a slot's further ids (many-to-one slots, rare) one by one after them, their
    // offsets loaded again there, which keeps the batch within the kernel's 64 registers.
    constexpr int kCsr = 6;  // slots a batch: eight spill past the kernel's 64 registers
    const int* offs = p.map_offsets + j0;
    for (int jb = threadIdx.x; jb < nl; jb += kCsr * kT) {
      int tid[kCsr];
      ST sv[kCsr];
      unsigned any = 0, more = 0;  // bit k: slot k has a teacher id; more than one
      {
        int o0[kCsr], col[kCsr];
#pragma unroll
        for (int k = 0; k < kCsr; ++k) {
          const int j = jb + k * kT;
          const bool in = j < nl;
          o0[k] = in ? __ldg(offs + j) : 0;
          const int o1 = in ? __ldg(offs + j + 1) : 0;
          col[k] = in ? __ldg(sup + j) : -1;
          any |= static_cast<unsigned>(o1 > o0[k]) << k;
          more |= static_cast<unsigned>(o1 - o0[k] > 1) << k;
        }
#pragma unroll
        for (int k = 0; k < kCsr; ++k) {
          tid[k] = (any >> k) & 1u ? __ldg(p.map_teacher + o0[k]) : -1;
          sv[k] = col[k] >= 0 ? srow[col[k]] : ST{};
        }
      }
      TT tv[kCsr];
#pragma unroll
      for (int k = 0; k < kCsr; ++k) tv[k] = tid[k] >= 0 ? trow[tid[k]] : TT{};
#pragma unroll
      for (int k = 0; k < kCsr; ++k) {
        const int j = jb + k * kT;
        if (j >= nl) continue;
        lse_acc g;
        if (tid[k] >= 0) g.add(lse_acc::strict(to_float(tv[k]) * k2));
        if ((more >> k) & 1u)
          for (int e = __ldg(offs + j) + 1, e1 = __ldg(offs + j + 1); e < e1; ++e)
            g.add(lse_acc::strict(to_float(trow[__ldg(p.map_teacher + e)]) * k2));
        const float lp = g.value();
        tcache[j] = lp;
        acc[0].add(lp);
        scache[j] = sv[k];
        acc[1].add(lse_acc::strict(to_float(sv[k]) * k2));
      }
    }
  } else if (p.vector_ok) {
    // Both slices in flight at once through the bulk-copy engine (since the kernel's start).
    const long long bt = bulk_bytes<TT>(n_local), bs = bulk_bytes<ST>(n_local);
    mbar_wait(&bar, 0);
    if constexpr (Online) {
      lse_of_slice<true>(trow + j0, tcache, n_local, bt / static_cast<long long>(sizeof(TT)), k2, acc[0]);
      for (long long i = bs / static_cast<long long>(sizeof(ST)) + threadIdx.x; i < n_local; i += blockDim.x)
        scache[i] = srow[j0 + i];
      __syncthreads();
    } else {
      // Both log-sum-exps for the whole block at once, around the block's maxima.
      slice_pair_lse<true, Shift16>(trow + j0, tcache, bt / static_cast<long long>(sizeof(TT)), srow + j0, scache,
                                   bs / static_cast<long long>(sizeof(ST)), n_local, k2, red.pair, acc[0], acc[1], &s_arg);
      block_done = true;
    }
  } else {
    copy_slice_with_lse<true>(trow + j0, tcache, n_local, k2, acc[0]);
    copy_slice_with_lse<true>(srow + j0, scache, n_local, k2, acc[1]);
    if constexpr (Online) __syncthreads();  // the weighted sweep reads both slices in 16-byte vectors
  }
  // Reverse KL: the student's sweep of exponentials also sums q (ys - yt) (over shared memory, after the
  // copies), and the cluster combines both in one exchange.
  lse_wacc sw;
  // The vector sweeps' slice: the block's entries, or (SpanVec) its expanded span [a0, s_hi), columns
  // a0 on of the gradient row.
  const long long nvec_len = SpanVec ? s_hi - a0 : n_local;
  GT* gvec = grow == nullptr ? nullptr : SpanVec ? grow + a0 : grow + j0;
  const bool vacc = p.accumulate;
  // SpanVec: the gradient goes straight to the row from the sweeps, but for the head vector when the span
  // starts past a0 (its first columns are the previous block's): that one lands over the student's
  // values in shared memory and the write-back takes its own columns.
  uint4* ghead = SpanVec && a0 < s_lo ? reinterpret_cast<uint4*>(scache) : nullptr;
  // The exchange ends pass 1 for the whole row: each block posts after its last read of the row's inputs
  // (in global memory; the gradient may alias the student's logits), and no block writes a gradient
  // before every block's post has arrived.
  cluster_wait();  // every block's mailbox is initialised
  if constexpr (Online) {
    sw = thread_lse_weighted<true>(scache, tcache, nvec_len, k2, acc[0].m);
    acc[0] = block_lse(acc[0], red.pair);
    sw = block_lse_w(sw, red.quad);
    const float v[6] = {acc[0].m, acc[0].s, sw.m, sw.s, sw.w, sw.rt};
    mailbox_exchange(box, rank, c_blocks, v);
    acc[0] = mailbox_lse(box, c_blocks, 0);
    sw = mailbox_lse_w(box, c_blocks, 2);
    acc[1] = sw.lse();
  } else {
    if (!block_done) {
      acc[0] = block_lse(acc[0], red.pair);
      acc[1] = block_lse(acc[1], red.pair);
    }
    const float v[4] = {acc[0].m, acc[0].s, acc[1].m, acc[1].s};
    mailbox_exchange(box, rank, c_blocks, v);
    acc[0] = mailbox_lse(box, c_blocks, 0);
    acc[1] = mailbox_lse(box, c_blocks, 2);
  }
  const float tlse = acc[0].value();  // log2 of the teacher's (or the mapped mass's) partition sum
  const float slse = acc[1].value();
  if (!isfinite(tlse) || !isfinite(slse)) {
    if (rank == 0 && threadIdx.x == 0)
      atomicMin(p.error, encode_error(row, device_error::non_finite,
                                      isfinite(tlse) ? device_tensor::student : device_tensor::teacher, p.component));
    if (p.want_grad && !p.accumulate) {
      if constexpr (Span) zero_range(own0, own1);
      else
        for (long long j = threadIdx.x; j < n_local; j += blockDim.x)
          grow[Map ? p.map_support[j0 + j] : j0 + j] = from_float<GT>(0.f);
    }
    if (threadIdx.x == 0) *partial = 0.f;
    finish();
    return;
  }
  const float factor = p.grad_base / static_cast<float>(call_divisor);
  // Base-2 log-probabilities of entry j: dt = log2 p, ds = log2 q.
  auto log2_q = [&](long long j) {
    if constexpr (Span && !SpanVec) return to_float(scache[span_pos(j)]) * k2 - slse;
    else return to_float(scache[j]) * k2 - slse;
  };
  auto log2_pq = [&](long long j, float& dt, float& ds) {
    if constexpr (Csr) dt = tcache[j] - tlse;
    else dt = to_float(tcache[j]) * k2 - tlse;
    ds = log2_q(j);
  };
  // Entry j's gradient g at its column c (Span: over the student's value in shared memory, read by this
  // thread in this sweep).
  auto put = [&](long long j, long long c, float g) {
    if constexpr (Span) {
      scache[span_pos(j)] = from_float<ST>(g);
      return;
    }
    if (p.accumulate) g += to_float(grow[c]);
    grow[c] = from_float<GT>(g);
  };
  // The element sweeps' entries f(j, c), c entry j's gradient column where write. Over a map (not the
  // span) the columns come in batches (batches above), loaded before any store: otherwise each store
  // waits on its own id, since the compiler cannot move the next id's load above a store that may alias it.
  auto for_entries = [&](bool write, auto&& f) {
    if constexpr (Map && !Span) {
      if (write) {
        batches([&](int jb) {
          int col[kIdx];
          batch_cols(jb, col);
#pragma unroll
          for (int k = 0; k < kIdx; ++k)
            if (col[k] >= 0) f(static_cast<long long>(jb + k * kT), static_cast<long long>(col[k]));
        });
        return;
      }
    }
    for (long long j = threadIdx.x; j < n_local; j += blockDim.x) f(j, Map ? -1LL : j0 + j);
  };

  // Pass 2 (and 3): loss terms and gradients from shared memory. sweep(write, fn) visits every entry of
  // this block's slice with its base-2 log-probabilities (dt = log2 p, ds = log2 q); fn returns the
  // entry's gradient, stored when `write`. Sixteen-byte vectors (Vec) where they apply, else element by
  // element (never in a SpanVec kernel: the planner takes the span kernel only where vector_ok holds).
  auto sweep = [&](bool write, auto&& fn) {
    if constexpr (Vec) {
      if (p.vector_ok) {
        sweep_slice<TT>(tcache, scache, gvec, nvec_len, k2, tlse, slse, write, vacc, fn, ghead);
        return;
      }
    }
    for_entries(write, [&](long long j, long long c) {
      float dt, ds;
      log2_pq(j, dt, ds);
      const float g = fn(dt, ds);
      if (write) put(j, c, g);
    });
  };
  // Two-sweep entries that keep w (keeps_w): the terms sweep writes each entry's w over its teacher entry
  // (the row's teacher logits are not read after it), the gradient sweep reads it with the student's.
  constexpr bool Keep = !Online && keeps_w<E, TC, GT>;
  using W = kept_w_t<TC>;
  const bool keep = Keep && p.want_grad;
  auto sweep_keep = [&](auto&& fn) {
    if constexpr (Vec) {
      if (p.vector_ok) {
        sweep_slice_keep<TT, W>(tcache, scache, nvec_len, k2, tlse, slse, fn);
        return;
      }
    }
    W* wc = reinterpret_cast<W*>(tcache);
    for (long long j = threadIdx.x; j < n_local; j += blockDim.x) {
      float dt, ds;
      log2_pq(j, dt, ds);
      wc[j] = from_float<W>(clamp_kept<W>(fn(dt, ds)));
    }
  };
  auto sweep_kept = [&](auto&& fn) {
    if constexpr (Vec) {
      if (p.vector_ok) {
        sweep_slice_kept<TT, W>(tcache, scache, gvec, nvec_len, k2, slse, vacc, fn, ghead);
        return;
      }
    }
    const W* wc = reinterpret_cast<const W*>(tcache);
    for_entries(true, [&](long long j, long long c) { put(j, c, fn(log2_q(j), to_float(wc[j]))); });
  };
  // The divergence's entries (kd/loss/logit_kd_math.cuh): forward KL in one sweep, reverse KL without a
  // map in one after pass 1's KL; the others a sweep for the terms and the row's sum C, the cluster's
  // sum, a gradient sweep.
  E e(p.param, factor);
  float loss = 0.f, cq = 0.f, shift = 0.f;
  // s_arg is set on the vector path only; kept16_fits: w's range fits fp16 (skew KL's 1 / alpha).
  bool keep16 = false;
  if constexpr (Keep16) keep16 = p.want_grad && p.vector_ok && e.kept16_fits();
  if constexpr (Online) {
    // The row's KL from pass 1: its loss (once, from the cluster's first block) and the gradient sweep.
    const float kl = E::kl_bits(acc[0], sw);
    loss = rank == 0 && threadIdx.x == 0 ? E::loss_of(kl) : 0.f;
    e.set_c(kl);
    if constexpr (folds_lse<E, GT>) e.fold_lse(factor, acc[0], acc[1], true);
    if (p.want_grad) sweep(true, [&](float dt, float ds) { return e.grad(dt, ds); });
  } else {
    // Forward and skew KL (and reverse KL's sweep of terms): the float log-sum-exps' rounding, once per
    // row, taken before the sweep so that acc[] is not kept alive through it (that cost 72-88 B of spills).
    using M = ::kd::detail::divergence_math<D, float>;
    if constexpr (adds_lse_gap<D, E>)
      if (rank == 0 && threadIdx.x == 0) loss = M{p.param}.lse_gap_weight() * lse_gap_bits(acc[0], acc[1]);
    if constexpr (folds_lse<E, GT>) e.fold_lse(factor, acc[0], acc[1], false);  // fp32 gradients
    if (keep16) {
      if constexpr (Keep16) {
        // The vector path alone (keep16 implies vector_ok). The teacher's exponent as the entry takes it.
        const float toff = tlse + e.kept16_t_offset();
        // This thread's shift: x at its largest student logit (none: the thread has no entries).
        if constexpr (Shift16)
          if (s_arg >= 0) {
            kept16_acc unused;
            float q;
            shift = e.x16(to_float(tcache[s_arg]) * k2 - toff, log2_q(s_arg), unused, q, 0.f);
          }
        kept16_acc k;
        sweep_slice_keep16<TT>(tcache, scache, nvec_len, k2, toff, slse, e, shift, k);
        loss += e.kept16_loss(k);
        cq = e.kept16_c(k, shift);
      }
    } else if (keep) {
      if constexpr (Keep) sweep_keep([&](float dt, float ds) { return e.term(dt, ds, loss, cq); });
    } else {
      sweep(E::one_sweep && p.want_grad, [&](float dt, float ds) { return e.first(dt, ds, loss, cq); });
    }
    loss = e.loss_of(loss);
  }
  // Two-sweep rows with a gradient: the loss is complete after the terms sweep, so its block sum rides
  // with C's (one block reduction of a pair instead of two: ~65 instructions a warp and two barriers).
  bool loss_summed = false;
  if constexpr (RowSum) {
    if (p.want_grad) {
      float cb = cq;
      block_sum2(cb, loss, red.pair);
      loss_summed = true;
      const float c1[1] = {cb};
      mailbox_exchange(box1, rank, c_blocks, c1);
      const float c_row = mailbox_sum(box1, c_blocks, 0);
      if (keep16) {
        if constexpr (Keep16) {  // the vector path alone (keep16 implies vector_ok), as in the terms sweep
          e.kept16_set_c(c_row, shift);
          sweep_slice_kept16<TT>(tcache, scache, gvec, nvec_len, k2, slse - e.kept16_grad_offset(), vacc, e, ghead);
        }
      } else if (keep) {
        e.set_c(c_row);
        if constexpr (Keep) sweep_kept([&](float ds, float w) { return e.grad_w(ds, w); });
      } else {
        e.set_c(c_row);
        sweep(true, [&](float dt, float ds) { return e.grad(dt, ds); });
      }
    }
  }
  if constexpr (SpanVec) {
    // The head vector's own columns [s_lo, a0 + vn) back to the row. The rest of the span went straight
    // from the sweeps: its uncovered columns got exactly 0 there (p = q = 0), these by the bitmask.
    if (p.want_grad && n_local > 0 && ghead != nullptr) {
      __syncthreads();  // the head, written in the sweep by other threads
      const long long c = s_lo + threadIdx.x;
      if (c < std::min(a0 + svn, s_hi)) {
        float g = ((sbits[(c >> 5) - wb0] >> (c & 31)) & 1u) != 0 ? to_float(scache[c - a0]) : 0.f;
        if (p.accumulate) g += to_float(grow[c]);
        grow[c] = from_float<GT>(g);
      }
    }
  } else if constexpr (Span) {
    if (p.want_grad && n_local > 0) {
      __syncthreads();  // every sweep's reads and writes of the span are done
      // The span's uncovered columns (a run of the sorted uncovered list) get 0.
      for_span_uncovered([&](long long c) { scache[c] = from_float<ST>(0.f); });
      __syncthreads();
      // Columns [s_lo, s_hi) back to the gradient row: 16-byte vectors between the aligned bounds v0 and
      // v1, single elements at the ends.
      const long long v0 = std::min((s_lo + svn - 1) / svn * svn, s_hi), v1 = std::max(v0, s_hi / svn * svn);
      auto put_col = [&](long long c) {
        float g = to_float(scache[c - a0]);
        if (p.accumulate) g += to_float(grow[c]);
        grow[c] = from_float<GT>(g);
      };
      for (long long c = s_lo + threadIdx.x; c < v0; c += blockDim.x) put_col(c);
      for (long long c = v1 + threadIdx.x; c < s_hi; c += blockDim.x) put_col(c);
      const uint4* src = reinterpret_cast<const uint4*>(scache + (v0 - a0));
      uint4* dst = reinterpret_cast<uint4*>(grow + v0);
      for (long long i = threadIdx.x; i < (v1 - v0) / svn; i += blockDim.x) {
        if (p.accumulate) {
          float g[svn];
          unpack<ST>(src[i], g);
          store_grad_vec<GT>(dst + i, g, true);
        } else {
          dst[i] = src[i];
        }
      }
    }
  }
  if (!loss_summed) loss = block_sum(loss, red.sum);
  if (threadIdx.x == 0) *partial = loss * p.loss_scale;
  finish();
}

}  // namespace cuda::detail

namespace cuda::detail {

// A planned launch: validated parameters, cluster size and shared memory, before scratch is bound.
struct logit_kd_launch {
  logit_kd_params p;
  int cluster = 1;
  long long clusters = 0;  // the grid in clusters: one per row, or the ring kernel's resident clusters
  std::size_t smem = 0;
  void (*kernel)(const logit_kd_params) = nullptr;
  int threads = kRowSliceThreads;  // a block's: the per-row kernel's, or the ring's (plan_ring)
  ::kd::detail::kd_scaling scaling;  // for bind_divisor
};

// The ring kernel's geometry (kd/loss/logit_kd_ring.cuh) for a planned unmapped call, when it applies:
// the smallest cluster whose per-block slice of a row fits kRingSliceTarget (else 8 blocks), as many
// slices per block as fit (3 or 4; fewer than 3 leave the per-row kernel), and a grid of the clusters
// that fit on the device at once. Only when the context's schedule asks for it (row_schedule::ring):
// automatic scheduling took it at V = 32,000 (1.16-1.29x the per-row kernel, H200, 2026-12-04,
// RESULTS.md session 7) until the per-row kernel's exchanges became pushes (cluster_mailbox.cuh). Now one
// cluster per row measures 0.96-0.98x the ring for reverse KL and 1.06-1.26x for the other divergences
// at V = 32,000 (bf16, N = 2048 and 8192), 0.98-0.99x and 1.10-1.11x (reverse, forward KL) in fp32, and
// more where V is larger (H100, 2026-12-06, RESULTS.md session 18).
template <class D, class T>
status plan_ring(context& ctx, logit_kd_launch& l) {
  logit_kd_params& p = l.p;
  if (p.rows <= 0 || ctx.schedule() != row_schedule::ring) return {};
  const auto chunk_of = [&](int c) { return row_chunk(p.support, c); };
  const auto slice_of = [](long long chunk) {
    return 2 * static_cast<std::size_t>((chunk * static_cast<long long>(sizeof(T)) + 15) / 16 * 16);
  };
  int c = 1;
  while (c < 8 && slice_of(chunk_of(c)) > kRingSliceTarget) ++c;
  const long long chunk = chunk_of(c);
  const std::size_t slice = slice_of(chunk);
  const int stages = static_cast<int>(std::min<std::size_t>(kRingMaxStages, kRingSmemLimit / slice));
  if (stages < 3) return {};
  auto* kernel = logit_kd_ring_kernel<D, T>;
  const std::size_t smem = static_cast<std::size_t>(stages) * slice;
  KD_TRY(ctx.allow_dynamic_smem(kernel, smem));
  int active = 0;
  KD_TRY(ctx.max_active_clusters(kernel, c, kRingThreads, smem, active));
  if (active < 1) return {};
  l.kernel = kernel;
  l.threads = kRingThreads;
  l.cluster = c;
  l.clusters = std::min<long long>(p.rows, active);
  l.smem = smem;
  p.chunk = chunk;
  p.stages = stages;
  return {};
}

// Launch geometry from the shared validation (kd::detail::validate_logit_kd) plus the checks that are
// truly device-specific (alignment, cluster size). Label values live on the device and are checked by
// the kernel. spread_rows (row_cluster): few rows may take larger clusters, many rows the ring kernel;
// callers that lay out partials by one cluster size across launches (linear + KD's chunks) leave it off.
template <class Loss, class TT, class ST, class GT>
status plan_logit_kd(context& ctx, const Loss& loss, matrix_view<const TT> teacher, matrix_view<const ST> student,
                     std::span<const std::int32_t> labels, matrix_view<GT> dstudent, bool want_grad,
                     logit_kd_launch& out, bool spread_rows = false) {
  using D = typename Loss::divergence;
  const auto& o = loss.options;
  const auto comp = ::kd::detail::component_or(o, "kd");
  ::kd::detail::logit_kd_plan plan;
  KD_TRY(::kd::detail::validate_logit_kd(loss, teacher, student, labels, false, dstudent, want_grad, plan));
  KD_TRY(check_alignment(teacher.data, "teacher logits", comp));
  KD_TRY(check_alignment(student.data, "student logits", comp));
  if (want_grad) KD_TRY(check_alignment(dstudent.data, "student gradient", comp));

  logit_kd_params& p = out.p;
  p = logit_kd_params{};
  p.teacher = teacher.data;
  p.t_stride = teacher.stride;
  p.student = student.data;
  p.s_stride = student.stride;
  p.grad = want_grad ? static_cast<void*>(dstudent.data) : nullptr;
  p.g_stride = want_grad ? dstudent.stride : 0;
  p.rows = student.rows;
  p.student_cols = student.cols;
  p.labels = labels.empty() ? nullptr : labels.data();
  p.ignore_index = o.ignore_index;
  p.want_grad = want_grad;
  p.accumulate = o.accumulate_grad;
  p.component = ctx.component_slot(comp);
  out.scaling = plan.scaling;
  p.inv_temp = plan.scaling.inv_temp;
  p.loss_scale = static_cast<float>(plan.scaling.loss_scale);
  p.grad_base = static_cast<float>(plan.scaling.grad_base);
  if constexpr (Loss::divergence_info.uses_beta) p.param = static_cast<float>(o.beta);
  if constexpr (Loss::divergence_info.uses_alpha) p.param = static_cast<float>(o.alpha);
  const bool map = o.map != nullptr;
  p.support = plan.support;
  p.label_vocab = plan.label_vocab;
  if (map) {
    device_map dm;
    KD_TRY(upload_map(ctx, *o.map, dm));
    p.map_support = dm.support;
    p.map_offsets = dm.offsets;
    p.map_teacher = dm.teacher_ids;
    p.map_uncovered = dm.uncovered;
    p.map_bits = dm.covered_bits;
    p.uncovered = dm.uncovered_count;
  }
  const bool contiguous = map && o.map->contiguous_teacher();
  // Vector paths need 16-byte aligned rows everywhere (slices start at multiples of 8 elements).
  // A contiguous map bulk-copies only the teacher slice (the student's support is gathered).
  p.vector_ok = map ? contiguous && rows_aligned(teacher)
                    : rows_aligned(teacher) && rows_aligned(student) && (!want_grad || rows_aligned(dstudent));

  // Cluster size: the smallest whose per-block slice fits the budget (up to 16 blocks for 8-byte entries,
  // where the device takes such clusters: below).
  const std::size_t tc_bytes = map && !contiguous ? sizeof(float) : sizeof(TT);
  const std::size_t per_entry = tc_bytes + sizeof(ST);
  const auto chunk_of = [&](int c) { return row_chunk(p.support, c); };
  const auto slice_smem = [&](int c) { return ((chunk_of(c) * tc_bytes + 15) / 16) * 16 + chunk_of(c) * sizeof(ST); };
  // The CSR map's pass 1 gathers its teacher columns one by one, bound by their latency rather than by
  // the bytes in flight: it takes half the budget, twice the blocks. Its 42,256-slot rows (the benchmark's
  // Qwen3 -> GPT-2 shape) ran 0.64-0.69x on 4 blocks of 62 KB against 8 of 31 KB (H100, 2026-12-06).
  const std::size_t budget = map && !contiguous ? ctx.slice_budget() / 2 : ctx.slice_budget();
  int cluster = row_cluster(ctx, p.support, per_entry, p.rows, spread_rows, max_row_cluster(per_entry), budget);
  using G = std::remove_const_t<GT>;
  out.kernel = !map        ? logit_kd_kernel<D, TT, ST, G, map_kind::none>
               : contiguous ? logit_kd_kernel<D, TT, ST, G, map_kind::contiguous>
                            : logit_kd_kernel<D, TT, ST, G, map_kind::csr>;
  if (cluster > 8) {
    // Hopper's non-portable cluster sizes: allowed per kernel, and checked to fit at this size. Where the
    // device or driver refuses either, 8 blocks as before (and the refusal is not left as the last error).
    int fits = 0;
    KD_TRY(ctx.allow_dynamic_smem(out.kernel, slice_smem(cluster)));
    if (!ctx.allow_wide_clusters(out.kernel).ok() ||
        !ctx.max_active_clusters(out.kernel, cluster, kRowSliceThreads, slice_smem(cluster), fits).ok())
      fits = 0;
    if (fits < 1) {
      (void)cudaGetLastError();
      cluster = 8;
    }
  }
  p.chunk = chunk_of(cluster);
  out.smem = slice_smem(cluster);
  if (out.smem > kSliceLimit)
    return {errc::invalid_argument, "the vocabulary (" + std::to_string(p.support) + " entries) is too large for one " +
                                        std::to_string(cluster) + "-block cluster"};
  // A contiguous map over aligned rows, gradient in the student's type: each block bulk-copies the span
  // of student columns its slots cover, when the widest span fits (larger clusters if the budget asks).
  // The trainer's case (42,304 compact teacher columns onto 50,304 student columns, bf16): 1.0 TB/s of
  // minimum bytes gathering the student's columns one by one (H200, 2026-12-04).
  if constexpr (std::is_same_v<ST, G>) {
    if (contiguous && cluster <= kMaxSpanCluster && p.vector_ok && rows_aligned(student) && (!want_grad || rows_aligned(dstudent))) {
      const auto support = o.map->student_support();
      // Block r's span of c: the student columns [lo, hi) its slots cover; lo = student_cols and hi = 0
      // for a block without slots (the kernel's span_lo / span_hi).
      struct block_span {
        int lo, hi;
      };
      const auto span_of = [&](int c, int r) {
        const long long chunk = chunk_of(c);
        const long long j0 = std::min<long long>(r * chunk, p.support), j1 = std::min<long long>(j0 + chunk, p.support);
        if (j1 == j0) return block_span{static_cast<int>(p.student_cols), 0};
        return block_span{support[static_cast<std::size_t>(j0)], support[static_cast<std::size_t>(j1 - 1)] + 1};
      };
      // The widest span of the c blocks' slots, from a 16-byte boundary.
      const auto widest_span = [&](int c) {
        long long widest = 0;
        for (int r = 0; r < c; ++r) {
          const block_span b = span_of(c, r);
          if (b.hi > 0) widest = std::max<long long>(widest, b.hi - b.lo / vec_n<ST> * vec_n<ST>);
        }
        return widest;
      };
      // A block's teacher entries (its slots, or with span_expands the widest span and a vector) and its
      // shared memory (those entries, then the widest span of student columns), for c blocks a row.
      // span_expands adds the span's bitmask words and their prefix counts (4 bits a column).
      struct span_geometry {
        long long teacher_cap;
        std::size_t smem;
        std::size_t bits_at;
        long long words;
      };
      const auto geometry_of = [&](int c) {
        const long long widest = widest_span(c);
        const long long cap = span_expands<TT, ST, G> ? widest + vec_n<TT> : chunk_of(c);
        const std::size_t t_bytes = ((cap * sizeof(TT) + 15) / 16) * 16;
        if constexpr (!span_expands<TT, ST, G>)
          return span_geometry{cap, t_bytes + static_cast<std::size_t>(widest) * sizeof(ST), 0, 0};
        // The words [a0 / 128 * 4, (s_hi + 127) / 128 * 4) of a span of at most `widest` columns from a0.
        const long long words = (widest + 255) / 128 * 4 + 4;
        const std::size_t bits_at = t_bytes + ((static_cast<std::size_t>(widest) * sizeof(ST) + 15) / 16) * 16;
        return span_geometry{cap, bits_at + 2 * static_cast<std::size_t>(words) * sizeof(unsigned), bits_at, words};
      };
      int c = cluster;
      span_geometry g = geometry_of(c);
      while (c < kMaxSpanCluster && g.smem > ctx.slice_budget()) {
        c *= 2;
        g = geometry_of(c);
      }
      if (g.smem <= kSliceLimit) {
        cluster = c;
        p.chunk = chunk_of(c);
        p.span_cap = g.teacher_cap;
        p.span_bits_at = static_cast<long long>(g.bits_at);
        p.span_words = g.words;
        for (int r = 0; r < c; ++r) {
          const block_span b = span_of(c, r);
          p.span_lo[r] = b.lo;
          p.span_hi[r] = b.hi;
        }
        out.smem = g.smem;
        out.kernel = logit_kd_kernel<D, TT, ST, G, map_kind::span>;
      }
    }
  }
  out.cluster = cluster;
  out.clusters = p.rows;
  // Many aligned unmapped rows in one storage type: the ring kernel, where the call owns its partials'
  // layout (linear + KD lays its chunks' partials out by one cluster size, so it keeps one cluster a row).
  if constexpr (std::is_same_v<TT, ST> && std::is_same_v<ST, G>)
    if (!map && spread_rows && p.vector_ok) KD_TRY((plan_ring<D, TT>(ctx, out)));
  return {};
}

// Enqueues a planned launch whose partial, error and divisor fields are bound.
inline status enqueue_logit_kd(context& ctx, const logit_kd_launch& l) {
  KD_TRY(ctx.allow_dynamic_smem(l.kernel, l.smem));
  const cluster_launch c((l.clusters > 0 ? l.clusters : l.p.rows) * l.cluster, l.cluster, l.threads, l.smem,
                         ctx.stream());
  KD_CUDA_TRY(cudaLaunchKernelEx(&c.cfg, l.kernel, l.p), "logit_kd kernel launch");
  return {};
}

// The token divisor (kd::detail::kd_scaling's kind) bound for the kernel: 1, global_tokens, or the
// labels' count on the device (all rows when there are no labels). Params: any kernel parameter block
// with divisor_dev and divisor (logit_kd's, the vocabulary-parallel losses').
template <class Params>
void bind_divisor(const ::kd::detail::kd_scaling& sc, Params& p, const long long* count_dev, long long rows) {
  using ::kd::detail::divisor_kind;
  p.divisor_dev = nullptr;
  p.divisor = 1.0;
  if (sc.divisor == divisor_kind::global_tokens) p.divisor = sc.divisor_for(0);
  else if (sc.divisor == divisor_kind::active_tokens && count_dev != nullptr) p.divisor_dev = count_dev;
  else if (sc.divisor == divisor_kind::active_tokens) p.divisor = sc.divisor_for(rows);
}

}  // namespace cuda::detail

template <>
struct loss_impl<cuda::backend, logit_kd_tag> {
  template <class Loss, class TT, class ST, class GT>
  static status run(const cuda::backend& be, const Loss& loss, matrix_view<const TT> teacher,
                    matrix_view<const ST> student, std::span<const std::int32_t> labels, cuda::device_loss& out,
                    matrix_view<GT> dstudent, bool want_grad) {
    using namespace cuda::detail;
    if (be.ctx == nullptr) return {errc::invalid_argument, "the CUDA backend has no context"};
    if (out.value == nullptr) return {errc::invalid_argument, "device_loss.value is null"};
    cuda::context& ctx = *be.ctx;
    const cudaStream_t stream = ctx.stream();
    logit_kd_launch l;
    KD_TRY(plan_logit_kd(ctx, loss, teacher, student, labels, dstudent, want_grad, l, true));
    // Scratch: partial losses [rows * cluster] and the device token count. One launch in all when the
    // labels are few enough to count in every block; else the count kernel first.
    void* scratch = nullptr;
    const std::size_t partial_bytes = ((static_cast<std::size_t>(l.p.rows) * l.cluster * sizeof(float) + 15) / 16) * 16;
    KD_TRY(ctx.scratch(partial_bytes + 64, scratch));
    l.p.partial = static_cast<float*>(scratch);
    long long* count = reinterpret_cast<long long*>(static_cast<char*>(scratch) + partial_bytes);
    KD_TRY(ctx.error_word(l.p.error));
    KD_TRY(ctx.ticket(l.p.ticket));
    l.p.value = out.value;
    l.p.tokens = out.tokens;
    const bool labelled = l.p.labels != nullptr;
    l.p.count_inline = labelled && l.p.rows <= kInlineCountRows;
    if (labelled && !l.p.count_inline) {
      KD_TRY(launch_count_tokens(l.p.labels, l.p.rows, l.p.ignore_index, count, stream));
      l.p.count_dev = count;
    }
    bind_divisor(l.scaling, l.p, labelled ? count : nullptr, l.p.rows);
    // Large calls of the per-row kernel end in a finish kernel instead of the grid ticket: with the ticket
    // every block held its slice resident through a fence and an atomic at its end (0.98-1.18x, mostly
    // 1.03-1.08x, H100, RESULTS.md sessions 22-23). The ring kernel (opt-in, p.stages > 0) too: its
    // partials are its grid's blocks (l.clusters * l.cluster, one each).
    const bool finish_kernel = l.p.rows > kInlineCountRows;
    if (finish_kernel) l.p.ticket = nullptr;
    KD_TRY(enqueue_logit_kd(ctx, l));
    if (!finish_kernel) return {};
    return launch_finish_loss(l.p.partial, l.clusters * l.cluster, l.p.divisor_dev, l.p.divisor, l.p.count_dev,
                              labelled ? -1 : l.p.rows, out, stream);
  }
};

}  // namespace kd
