// kd/loss/logit_kd_math.cuh: what the fused logit-distillation kernels share: their parameter block,
// how they read the support, and the per-entry math of each divergence in base 2.
//
// Both row kernels (kd/loss/logit_kd.cuh: a cluster per row; kd/loss/logit_kd_ring.cuh: persistent
// clusters with a ring of row slices) hold a row's slice in shared memory and visit every entry with its
// base-2 log-probabilities dt = log2 p, ds = log2 q. kd_entry<D> is what each entry contributes: the
// loss term, and the gradient dL/dz = q (dD/dq - sum_i q_i dD/dq_i) times the call's factor. Forward KL
// needs no row sum (its gradient is q - p: one sweep); reverse KL's row sum is KL + 1, which pass 1
// forms without a mapped support (kd_entry<reverse_kl>::online: one sweep after pass 1); the others take
// a sweep for the loss terms and the row's sum C = sum q dD/dq, the cluster's sum of C, and a gradient
// sweep, which reads what the terms sweep kept of each entry over its teacher entry (keeps_w).
#pragma once

#include <cuda_runtime.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include <kd/cuda/context.cuh>
#include <kd/cuda/detail/reduce.cuh>
#include <kd/cuda/detail/storage.cuh>
#include <kd/loss/divergence.hpp>

namespace kd::cuda::detail {

// The span kernel's largest cluster (its bounds ride in the launch's parameters, a pair of ints a block).
inline constexpr int kMaxSpanCluster = 8;

struct logit_kd_params {
  const void* teacher = nullptr;
  long long t_stride = 0;
  const void* student = nullptr;
  long long s_stride = 0;
  void* grad = nullptr;
  long long g_stride = 0;
  long long rows = 0;
  long long support = 0;        // K: columns (shared vocab) or slots (map)
  long long student_cols = 0;   // full student row width (padding included)
  long long chunk = 0;          // support entries per block
  int stages = 0;               // the ring kernel's slices in flight per block (kd/loss/logit_kd_ring.cuh)
  const int* map_support = nullptr;
  const int* map_offsets = nullptr;
  const int* map_teacher = nullptr;
  const int* map_uncovered = nullptr;
  long long uncovered = 0;
  const unsigned* map_bits = nullptr;  // bit c: student column c is a support id (words padded to 16 bytes)
  long long span_cap = 0;       // the expanding span kernel's teacher entries a block (span_expands)
  long long span_bits_at = 0;   // its shared-memory bytes before the bitmask words (span_expands)
  long long span_words = 0;     // its bitmask words (and as many prefix counts) a block
  // The span kernel's bounds by cluster rank, from the planner: the first support id of each block's
  // slots (student_cols past the support) and one past its last (0 for no slots). In the launch's
  // parameters, so that a block starts its copies without waiting on the map in memory.
  int span_lo[kMaxSpanCluster] = {};
  int span_hi[kMaxSpanCluster] = {};
  const std::int32_t* labels = nullptr;
  int ignore_index = -100;
  long long label_vocab = 0;
  float inv_temp = 1.f;
  float loss_scale = 1.f;       // T^2 or 1
  float grad_base = 1.f;        // grad_scale * loss_scale / T (divided by the divisor in the kernel)
  float param = 0.5f;           // beta / alpha
  const long long* divisor_dev = nullptr;  // token count computed on the device, or null
  double divisor = 1.0;                    // used when divisor_dev is null
  bool want_grad = false;
  bool accumulate = false;
  bool vector_ok = false;       // 16-byte aligned rows: vectorized copies
  float* partial = nullptr;     // [rows * C] partial losses (already scaled by loss_scale)
  unsigned long long* error = nullptr;
  unsigned component = 0;
  // The call's end inside the kernel (small calls: one launch in all). count_inline: every block counts
  // the labels' tokens itself, and divisor_dev (still non-null when the divisor is that count) is not
  // read. ticket non-null: the last block sums the partials into value, and tokens (count_dev's count,
  // the inline count, or rows without labels); else a finish kernel does (linear + KD's chunks).
  bool count_inline = false;
  const long long* count_dev = nullptr;
  unsigned* ticket = nullptr;
  float* value = nullptr;
  long long* tokens = nullptr;
};

// How a kernel reads the support: no map (columns 0..V-1), a general map (CSR: each slot the
// log-sum-exp of its teacher ids), a contiguous map (slot j is teacher column j) whose student
// columns are gathered from global memory, or a contiguous map whose blocks each bulk-copy the span of
// student columns their slots cover (span: the planner's choice when the spans fit shared memory and
// the gradient has the student's storage type; the gradient goes out as 16-byte vectors, from the
// sweeps, or in fp16 from the span in shared memory after them).
enum class map_kind { none, csr, contiguous, span };

// The span kernel over one storage type (bf16 or fp32) expands its teacher slice to the student's
// columns in shared memory and fills the columns outside its slots with a sentinel logit on both sides
// (y = x k2 = -2^64: p = q = 0 exactly, every term 0), so that it runs the unmapped kernel's 16-byte
// vector sweeps (kept16 included) over the span instead of visiting slots one by one through their
// student ids. fp16 keeps the slot-by-slot sweeps: its logits reach only -65,504, so the sentinel's
// exponential underflows only against a row maximum above -65,504 + 150 / k2.
template <class TT, class ST, class GT>
inline constexpr bool span_expands =
    std::is_same_v<TT, ST> && std::is_same_v<ST, GT> && !std::is_same_v<TT, ::kd::half>;
inline constexpr float kSpanSentinelBits = -1.8446744e19f;  // -2^64

// The expanding span kernel reads which student columns its slots cover from the map's bitmask (bit c of
// the image: column c is a support id), bulk-copied beside the span, instead of each slot's support id:
// 4 bits a column against 4 bytes a slot, and no L2 round trip after the copies land. bits[i] holds
// word wb0 + i; span_bits_prefix masks each word to the block's columns [s_lo, s_hi) and sets pre[i] to
// the covered columns before word i (the block-local slot of word i's first covered column): a few
// words a thread and one block scan (scratch: a word a warp).
// kThreads: the block's width (the per-row kernel's kRowSliceThreads), a constant so that the words a
// thread takes come from a shift, not a 64-bit division: with its 64-bit loops and the setup around
// it, the prefix ran ~5 instructions an entry of the row, 6 % of the span kernel's at the trainer's
// shape (ncu SASS counters, H100, 2026-12-07).
template <int kThreads>
__device__ inline void span_bits_prefix(unsigned* bits, unsigned* pre, long long nw_ll, long long wb0, long long s_lo_ll,
                                        long long s_hi_ll, unsigned* scratch) {
  // Columns relative to word wb0's first: the span is a few thousand words at most, so 32 bits hold them.
  const int nw = static_cast<int>(nw_ll), lo = static_cast<int>(s_lo_ll - wb0 * 32), hi = static_cast<int>(s_hi_ll - wb0 * 32);
  const int per = (nw + kThreads - 1) / kThreads;
  const int i0 = min(static_cast<int>(threadIdx.x) * per, nw), i1 = min(i0 + per, nw);
  unsigned count = 0;
  for (int i = i0; i < i1; ++i) {
    const int c0 = i * 32;  // word i's first column
    unsigned w = bits[i];
    if (c0 < lo) w &= lo - c0 >= 32 ? 0u : ~0u << (lo - c0);
    if (c0 + 32 > hi) w &= hi <= c0 ? 0u : ~0u >> (c0 + 32 - hi);
    bits[i] = w;
    count += __popc(w);
  }
  const unsigned lane = threadIdx.x & 31u, warp = threadIdx.x >> 5;
  unsigned incl = count;
#pragma unroll
  for (int d = 1; d < 32; d <<= 1) {
    const unsigned v = __shfl_up_sync(0xffffffffu, incl, d);
    if (lane >= static_cast<unsigned>(d)) incl += v;
  }
  if (lane == 31) scratch[warp] = incl;
  __syncthreads();
  unsigned run = incl - count;
  for (unsigned w = 0; w < warp; ++w) run += scratch[w];
  for (int i = i0; i < i1; ++i) {
    pre[i] = run;
    run += __popc(bits[i]);
  }
  __syncthreads();
}

// The 32-bit words of a 16-byte vector of vn entries as masks of the entries whose bit is set in sub
// (bit k: entry k): all ones over a covered entry, zeros elsewhere. The multiply moves bit k of a nibble
// to the top of byte k (no two partial products overlap), and prmt's sign mode (a selector nibble's
// msb) spreads a byte's top bit over each byte of the word.
template <int vn>
__device__ inline void covered_words(unsigned sub, unsigned (&m)[4]) {
  static_assert(vn == 8 || vn == 4, "kd: covered_words takes vectors of 16-bit or 32-bit entries");
  const auto spread = [](unsigned x, unsigned sel) {
    unsigned r;
    asm("prmt.b32 %0, %1, 0, %2;" : "=r"(r) : "r"(x), "r"(sel));
    return r;
  };
  const unsigned lo = ((sub & 0xfu) * 0x10204080u) & 0x80808080u;
  if constexpr (vn == 8) {
    const unsigned hi = (((sub >> 4) & 0xfu) * 0x10204080u) & 0x80808080u;
    m[0] = spread(lo, 0x9988u);
    m[1] = spread(lo, 0xbbaau);
    m[2] = spread(hi, 0x9988u);
    m[3] = spread(hi, 0xbbaau);
  } else {
    m[0] = spread(lo, 0x8888u);
    m[1] = spread(lo, 0x9999u);
    m[2] = spread(lo, 0xaaaau);
    m[3] = spread(lo, 0xbbbbu);
  }
}

// A 16-byte vector of vn entries with those whose bit in sub is clear replaced by the entries of the
// sentinel word sent (a word at a time, by covered_words' masks).
template <int vn>
__device__ inline uint4 keep_covered(uint4 v, unsigned sub, unsigned sent) {
  unsigned m[4], r[4];
  memcpy(r, &v, sizeof(r));
  covered_words<vn>(sub, m);
#pragma unroll
  for (int j = 0; j < 4; ++j) r[j] = (r[j] & m[j]) | (sent & ~m[j]);
  return make_uint4(r[0], r[1], r[2], r[3]);
}

// The expanding span kernel's move of its slots' teacher entries to their columns, as a gather: the
// vector of positions [x, x + vn) (student columns a0 + x, one bitmask word: a0 and 32 are multiples of
// vn) takes, for each covered column, the next compact entry from t[off + rank] (rank: the column's
// slot in the block, from pre and a popcount), and the sentinel t_sent elsewhere; the student's
// uncovered columns below len get s_sent. The compact entries sit at t[off, off + n) with
// off >= len - n, so a column's source never lies below its position (off + rank(c) >= c - a0: the
// columns before c number at most off more than the slots before it); in rounds of U vectors a thread,
// each read before the round's barrier and written after it, no write lands on an entry a later round
// still has to read. All in shared memory: three rounds at the trainer's shape (12,576 bf16 columns a
// block), each a barrier and no global load.
// Every entry of a vector is read from t[base + (covered entries below it)], covered or not (an
// uncovered one reads at most t[off + n], inside the span_cap entries), and the sentinels go in a word
// at a time (keep_covered); the student's vector is read, masked and written whole. Entry
// by entry (a predicated load, a select and a predicated sentinel store each, in 64-bit indices), the
// expansion took 143 instructions a vector, 20.5 an entry of the row: a third of the span kernel's
// instructions above an unmapped row's (JSD 92.7 against 62.4 an entry; ncu, H100, 2026-12-07).
template <int kThreads, class T>
__device__ void expand_span_bits(T* t, long long off_ll, long long len_ll, const unsigned* bits, const unsigned* pre,
                                 long long a0, long long wb0, T* s, T t_sent, T s_sent) {
  constexpr int vn = vec_n<T>;
  constexpr int U = 2;
  static_assert(32 % vn == 0, "kd: expand_span_bits reads a vector's columns from one bitmask word");
  constexpr unsigned lanes = (1u << vn) - 1u;
  // Shared-memory positions fit 32 bits; so does the column offset of a0 from word wb0's first column.
  const int off = static_cast<int>(off_ll), len = static_cast<int>(len_ll), abit = static_cast<int>(a0 - wb0 * 32);
  const int nv = (len + vn - 1) / vn;
  // A 32-bit word of sentinels (two 16-bit entries, or one fp32).
  const auto word_of = [](T x) {
    if constexpr (sizeof(T) == 2) {
      unsigned short h;
      memcpy(&h, &x, 2);
      return static_cast<unsigned>(h) * 0x10001u;
    } else {
      unsigned r;
      memcpy(&r, &x, 4);
      return r;
    }
  };
  const unsigned t2 = word_of(t_sent), s2 = word_of(s_sent);
  constexpr int step = kThreads;
  for (int first = 0; first < nv; first += U * step) {
    uint4 val[U];
    unsigned sub[U];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int v = first + u * step + static_cast<int>(threadIdx.x);
      sub[u] = lanes;
      if (v < nv) {
        const int x = abit + v * vn, i = x >> 5, b = x & 31;
        const unsigned w = bits[i];
        sub[u] = (w >> b) & lanes;
        const T* src = t + off + static_cast<int>(pre[i]) + __popc(w & ((1u << b) - 1u));
        T e[vn];
#pragma unroll
        for (int k = 0; k < vn; ++k) e[k] = src[__popc(sub[u] & ((1u << k) - 1u))];
        memcpy(&val[u], e, sizeof(e));
        val[u] = keep_covered<vn>(val[u], sub[u], t2);
      }
    }
    __syncthreads();
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int v = first + u * step + static_cast<int>(threadIdx.x);
      if (v < nv) {
        *reinterpret_cast<uint4*>(t + v * vn) = val[u];
        if (sub[u] != lanes) {
          if (v * vn + vn <= len) {
            uint4* sv = reinterpret_cast<uint4*>(s + v * vn);
            *sv = keep_covered<vn>(*sv, sub[u], s2);
          } else {
#pragma unroll
            for (int k = 0; k < vn; ++k)
              if (!((sub[u] >> k) & 1u) && v * vn + k < len) s[v * vn + k] = s_sent;
          }
        }
      }
    }
  }
  __syncthreads();
}

// Support entries per block when a row's K entries are split over c blocks (a multiple of 8, so every
// block's slice starts on a 16-byte boundary): both planners' convention.
inline long long row_chunk(long long support, int c) { return ((support + c - 1) / c + 7) / 8 * 8; }

// A row's label: none given or inside the vocabulary (active), ignore_index, or outside the vocabulary
// (the row is skipped and reported). The same in every block of the row's cluster.
enum class row_label { active, ignored, out_of_range };
__device__ inline row_label label_of_row(const logit_kd_params& p, long long row) {
  if (p.labels == nullptr) return row_label::active;
  const int y = p.labels[row];
  if (y == p.ignore_index) return row_label::ignored;
  return y < 0 || y >= p.label_vocab ? row_label::out_of_range : row_label::active;
}

// Gradient columns [a, b) of a row set to zero by the block.
template <class GT>
__device__ inline void zero_columns(GT* row, long long a, long long b) {
  for (long long c = a + threadIdx.x; c < b; c += blockDim.x) row[c] = from_float<GT>(0.f);
}

// The call's end in the kernel (p.ticket non-null): the last block to finish sums the n partials in a
// fixed order into the loss value, and writes the token count (count_dev's, the block's inline count, or
// the rows when there are no labels). Every block calls it once, from every thread.
__device__ inline void finish_call(const logit_kd_params& p, long long n, double call_divisor, long long inline_tokens,
                                   double* scratch) {
  if (p.ticket == nullptr || !last_block_of_grid(p.ticket)) return;
  const double sum = block_sum_ordered(p.partial, n, scratch);
  if (threadIdx.x == 0) {
    *p.value = static_cast<float>(sum / call_divisor);
    if (p.tokens != nullptr) *p.tokens = p.labels == nullptr ? p.rows : p.count_inline ? inline_tokens : *p.count_dev;
  }
}

// The rounding of the two log-sum-exps, for the loss (not the gradient). A sweep forms
// dt - ds = (yt - ys) - (tlse - slse), each lse = m + log2f(s) rounded to float at the size of the
// logits (and of log2 V), so forward KL's row sum p (dt - ds) is off by the gap
// (tlse - slse) - (TLSE - SLSE): up to ~1e-6 bits at |lse| ~ 20 and ~1.5e-5 at ~500, against KLs of
// 0.01 nats. The maxima cancel exactly in it, which leaves small numbers only:
//   gap = (log2f(t.s) - log2f(s.s)) - log2f(t.s / s.s) - (et - es),
// et: the rounding of t.m + log2f(t.s) (TwoSum; __fadd_rn is never contracted or reordered). The row's
// KL in bits is sum p (dt - ds) + gap; the other divergences weigh the gap by
// divergence_math::lse_gap_weight (reverse KL -1, skew KL 1 - a; JSD and TVD 0: !has_lse_gap; fp32 skew
// KL forms its value from the exact p and q instead, adds_lse_gap); the gradient's share of the rounding
// is a scale of p and q instead (below). Against fp64, a float
// emulation of the sweep (32,000 to 151,936 columns, student = 0.9 teacher + offset + noise, KL
// 0.016-0.22 nats, offsets 0-400): forward KL's value erred
// by 4.8e-6 to 5.5e-4 relative without it, 3e-7 to 1.7e-5 with it; skew KL's (a = 0.1-0.9) by 1.7e-5 to
// 8.9e-4 without, 1e-6 to 4.1e-5 with.
__device__ inline float lse_gap_bits(const lse_acc& t, const lse_acc& s) {
  const float lt = log2f(t.s), ls = log2f(s.s);
  return __fsub_rn(__fsub_rn(lt, ls), log2f(t.s / s.s)) - (round_err(t.m, lt) - round_err(s.m, ls));
}

// The gradient's share of the same rounding: a sweep's q = 2^ds is the exact q times 2^-e_s, e_s =
// lse_acc::excess() (log2f's own error, <= 2^-19 bits, stays), and likewise p. Where the gradient is
// stored in float (lse_fold<GT>, kd/cuda/detail/reduce.cuh) the kernels take it back once per row,
// folded into the entry's factors (fold_lse below). A float emulation against fp64
// (benchmarks/lse_rounding.cpp: close distributions, student logits 0-400 from the teacher's, 32,000 and
// 151,936 columns, T = 1, 2): forward and reverse KL's gradient 7.6e-7 to 4.7e-5 norm-relative plain,
// 4e-7 to 3e-6 folded; skew KL likewise (skew_kl_folded). JSD would need log m of the folded p and q in
// its row sum C but of the plain ones in the value (whose gap cancels only there), a second log an
// entry: not folded; nor TVD (its gradient's signs are what ties decide).

// A kept w as its slot of type W stores it: fp16 slots clamp to fp16's range (a kept w is never inf).
template <class W>
__device__ __forceinline__ float clamp_kept(float w) {
  if constexpr (std::is_same_v<W, float>) return w;
  else return fminf(fmaxf(w, -65504.f), 65504.f);
}
// Two floats rounded to fp16 and packed (lo in the low half), saturated to fp16's finite range: one F2FP
// for a pair, where a clamp (two FMNMX) and a rounding (one F2FP) an entry did it before (kept16).
__device__ __forceinline__ unsigned half2_satfinite(float lo, float hi) {
  unsigned r;
  asm("cvt.rn.satfinite.f16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));  // the first source is the high half
  return r;
}
// One float so (the unaligned tail's entries).
__device__ __forceinline__ ::kd::half half_satfinite(float x) {
  unsigned short r;
  asm("cvt.rn.satfinite.f16.f32 %0, %1;" : "=h"(r) : "f"(x));
  return ::kd::half::from_bits(r);
}

// Per-entry math, generic form: divergence_math in natural logs (TVD's, beside its kept16 form below).
template <class D>
struct generic_entry {
  static constexpr bool one_sweep = false;
  ::kd::detail::divergence_math<D, float> math;
  float factor = 0.f;  // grad_scale * loss_scale / T / divisor
  float c = 0.f;       // the row's sum of q dD/dq (set_c, before the gradient sweep)
  __device__ generic_entry(float param, float factor_) : factor(factor_) { math.param = param; }
  // The terms sweep: adds the entry's loss term and q dD/dq; returns w = dD/dq (the kept form, below).
  __device__ float term(float dt, float ds, float& loss, float& cq) const {
    const float logp = dt * kLn2, logq = ds * kLn2, pj = fast_exp2(dt), qj = fast_exp2(ds);
    loss += math.term(pj, logp, qj, logq);
    const float w = math.dq(pj, logp, qj, logq);
    cq += qj * w;
    return w;
  }
  // The first sweep: the terms, and the gradient when one_sweep (never here).
  __device__ float first(float dt, float ds, float& loss, float& cq) const {
    term(dt, ds, loss, cq);
    return 0.f;
  }
  __device__ static float loss_of(float sum) { return sum; }
  __device__ void set_c(float cq_row) { c = cq_row; }
  __device__ float grad(float dt, float ds) const {
    const float logp = dt * kLn2, logq = ds * kLn2, pj = fast_exp2(dt), qj = fast_exp2(ds);
    return factor * qj * (math.dq(pj, logp, qj, logq) - c);
  }
  // The gradient from the entry's kept w (TVD: dD/dq = sign(q - p) / 2, exact in any storage).
  __device__ float grad_w(float ds, float w) const { return factor * fast_exp2(ds) * (w - c); }
};
template <class D>
struct kd_entry : generic_entry<D> {
  using generic_entry<D>::generic_entry;
};

// What a kept16 terms sweep sums over a thread's entries (each entry's form says what la and lb are):
// qh = sum q h over the kept (rounded) values h, sq = sum q (for the thread's shift).
struct kept16_acc {
  float la = 0.f, lb = 0.f, qh = 0.f, sq = 0.f;
};

// The kept16 gradient of TVD and the mixtures: q' (g1 h + g0), with the row's g1, g0 set by kept16_set_c.
struct kept16_grad_terms {
  float g1 = 0.f, g0 = 0.f;
  __device__ float grad16(float qf, float h) const { return qf * fmaf(h, g1, g0); }
};

// TVD: the generic entry, and a kept16 form (below: mixture_entry's comment says what the members are).
// Its w = sign(q - p) / 2 is kept as x = (q - p) 2^127 saturated to fp16, +-65,504 for |q - p| >= 2^-111
// (and 0 at an exact tie): one FMUL and half an F2FP an entry for the compares and selects of a sign.
// Where 0 < |q - p| < 2^-111 the kept value is a fraction of 65,504; both probabilities are then
// below ~2^-100 and so is the gradient the fraction moves. C takes the kept values as they are.
template <>
struct kd_entry<tvd> : generic_entry<tvd>, kept16_grad_terms {
  using generic_entry<tvd>::generic_entry;
  static constexpr float kScale = 1.70141183e38f;  // 2^127
  static constexpr float kUnit = 0.5f / 65504.f;    // w of a kept +-65,504
  __device__ float kept16_t_offset() const { return 0.f; }
  __device__ float x16(float dt, float ds, kept16_acc& k, float& q, float) const {
    const float pk = fast_exp2(dt), qk = fast_exp2(ds), d = qk - pk;
    q = qk;
    k.la += fabsf(d);
    return d * kScale;
  }
  __device__ float kept16_loss(const kept16_acc& k) const { return 0.5f * k.la; }
  __device__ float kept16_c(const kept16_acc& k, float) const { return k.qh; }
  __device__ void kept16_set_c(float c_row, float) {  // dq - C = kUnit (h - c_row)
    g1 = factor < 0.f ? -kUnit : kUnit;
    g0 = -g1 * c_row;
  }
  __device__ float kept16_grad_offset() const { return fast_log2(fabsf(factor)); }
  __device__ bool kept16_fits() const { return true; }
};

// Reverse KL: KL = ln 2 * sum q (log2 q - log2 p), q dD/dq summed over the row = KL + 1, so
// dL/dz = q (ln 2 (log2 q - log2 p) - KL). `online`: the unmapped kernels get the row's KL from pass 1
// (thread_lse_weighted: the q-weighted sum of ys - yt rides on the student's log-sum-exp) and run the
// gradient sweep only; mapped rows take the sweep of terms (first) as the other divergences do. c is
// the row's KL in bits either way.
template <>
struct kd_entry<reverse_kl> {
  static constexpr bool one_sweep = false;
  static constexpr bool online = true;
  float factor = 0.f, c = 0.f;
  __device__ kd_entry(float, float factor_) : factor(factor_ * kLn2) {}
  __device__ float first(float dt, float ds, float& loss, float& cq) const {
    const float u = fast_exp2(ds) * (ds - dt);
    loss += u;
    cq += u;
    return 0.f;
  }
  __device__ static float loss_of(float sum) { return sum * kLn2; }
  __device__ void set_c(float kl_bits) { c = kl_bits; }
  // The row's KL in bits from the cluster's combined pass-1 statistics: sum q (ys - yt) - slse + tlse
  // = (w / s + s.m - rt) - (s.m + log2 s.s) + (t.m + log2 t.s); the student maximum cancels exactly,
  // and one log of the sums' ratio replaces two logs of ~log2 V each.
  __device__ static float kl_bits(const lse_acc& t, const lse_wacc& s) {
    return s.w / s.s + (t.m - s.rt) + log2f(t.s / s.s);
  }
  __device__ float grad(float dt, float ds) const { return factor * fast_exp2(ds) * (ds - dt - c); }
  // fp32 gradients (lse_fold): q scaled back by its own factor, after set_c; the row constant from pass 1
  // (online_row) is free of the lse's rounding while the sweep's ds - dt carries their gap, so it moves by
  // the gap (a constant c from the mapped rows' sweep of terms carries it already).
  __device__ void fold_lse(float base, const lse_acc& t, const lse_acc& s, bool online_row) {
    factor = base * kLn2 * fast_exp2(s.excess());
    if (online_row) c += lse_gap_bits(t, s);
  }
};

// Which kernels take the online row statistics (kd_entry<reverse_kl>::online).
template <class E>
inline constexpr bool online_c = requires { E::online; };

// Forward KL: KL = ln 2 * sum p (log2 p - log2 q); dL/dz = q - p: one sweep.
template <>
struct kd_entry<forward_kl> {
  static constexpr bool one_sweep = true;
  float factor = 0.f;
  __device__ kd_entry(float, float factor_) : factor(factor_) {}
  __device__ float first(float dt, float ds, float& loss, float&) const {
    const float pk = fast_exp2(dt), qk = fast_exp2(ds);
    loss += pk * (dt - ds);
    return factor * (qk - pk);
  }
  __device__ static float loss_of(float sum) { return sum * kLn2; }
  __device__ void set_c(float) {}  // no row sum (called only where the kernel's code is shared)
};

// Forward KL for fp32 gradients (lse_fold): q and p scaled back by factors of their own (fold_lse, once
// per row), in one FMUL and one FFMA an entry as the plain form's FADD and FMUL.
struct forward_kl_folded : kd_entry<forward_kl> {
  float fp = 0.f;  // factor holds q's
  __device__ forward_kl_folded(float param, float factor_) : kd_entry<forward_kl>(param, factor_), fp(factor_) {}
  __device__ float first(float dt, float ds, float& loss, float&) const {
    const float pk = fast_exp2(dt), qk = fast_exp2(ds);
    loss += pk * (dt - ds);
    return fmaf(factor, qk, -(fp * pk));
  }
  __device__ void fold_lse(float base, const lse_acc& t, const lse_acc& s, bool) {
    factor = base * fast_exp2(s.excess());
    fp = base * fast_exp2(t.excess());
  }
};

// The mixture divergences, in base 2 with their shared factors formed once per entry (m = a p +
// (1 - a) q, its log2 in one MUFU.LG2, 1 / m in one MUFU.RCP): ncu had JSD issue-bound at 77% of issue
// slots and 19% of DRAM bandwidth through the generic divergence_math path (8192 x 128,256 bf16, H200).
// Where m is below float's normal range both distributions are < 2^-126 / min(a, 1 - a) there, and the
// entry's terms are taken as 0 (the reference's are below 1e-36).
//   JSD (a = beta):  D = a sum p (log p - log m) + (1 - a) sum q (log q - log m),
//                    q dD/dq = (1 - a) q (log q - log m)
//   skew KL (a = alpha): D = sum p (log p - log m), q dD/dq = -(1 - a) p q / m
// Exact: log2 m by log2f instead of MUFU.LG2 (entry_for's choice where the gradient is stored in float).
// The approximation's error (up to 2^-22 of |log2 m|, ~17 bits for m ~ 2^-17) is not centred on zero,
// so it does not average out over a row as float rounding does: both values take sum m * error whole.
// Measured on an H100 (2026-12-05, a probe: benchmarks/NOTES.md, session 11): skew KL's value
// off by -8e-6 to -9e-4 relative through MUFU.LG2 (rows of 32,000-151,936, a = 0.2-0.8, values 0.09-17
// bits), by 3e-8 to 1e-6 through log2f. JSD's gradient does not see it (a constant error of log2 m moves
// every dq and their q-weighted sum C alike), its value does.
template <bool J, bool Exact = false>
struct mixture_entry : kept16_grad_terms {
  static constexpr bool one_sweep = false;
  float a, a1, factor, c = 0.f;
  __device__ mixture_entry(float param, float factor_) : a(param), a1(1.f - param), factor(factor_) {}
  static constexpr float kMinNormal = 1.17549435e-38f;
  // The terms sweep; returns the entry's kept w (below): JSD (1 - a) log2(q / m), skew KL p / m - 1 formed
  // as (1 - a)(p - q) / m (no cancellation for close p and q); below float's normal range 0 and -1, which
  // leave the gradient -factor q C as grad() gives it there.
  __device__ float term(float dt, float ds, float& loss, float& cq) const {
    const float pk = fast_exp2(dt), qk = fast_exp2(ds), m = a * pk + a1 * qk;
    const bool normal = m >= kMinNormal;
    const float lm = normal ? (Exact ? log2f(m) : fast_log2(m)) : dt;
    if constexpr (J) {
      const float w = normal ? a1 * (ds - lm) : 0.f;
      const float u = qk * w;
      loss += a * pk * (dt - lm) + u;
      cq += u;
      return w;
    } else {
      const float r = fast_rcp(m);
      loss += pk * (dt - lm);
      const float w = normal ? a1 * (pk - qk) * r : -1.f;
      cq += normal ? pk * qk * r : 0.f;
      return w;
    }
  }

  // kept16 (below): the terms sweep returns x = w - shift in the entry's units, which the sweep rounds
  // to fp16 in pairs (h), and the gradient sweep forms q (g1 h + g0) with q = 2^(ds + log2 |factor|)
  // (the factor rides on the exponential: kept16_grad_offset, one MUFU.LG2 whose error, ~2^-22 of
  // |log2 factor|, scales the row's 16-bit gradient by ~1e-6) and g1, g0 the thread's row constants.
  // Fewer instructions an entry than term() (the sweeps are bound by instruction issue): m is kept at or
  // above float's smallest normal instead of a compare and two selects (one FMNMX); the entries this
  // moves have p, q < 2^-126 / min(a, 1 - a) and terms below 1e-36, as term()'s zeros. The loss takes its
  // constant factors once per thread (kept16_loss).
  //   JSD: x = log2(q / m) - shift, w = (1 - a) log2(q / m) (the 1 - a is in g1); the teacher's
  //        exponent as given (kept16_t_offset 0).
  //   skew KL: x = (1 - a)(p - q) / m - shift; the teacher's exponent comes shifted by -log2(1 - a)
  //        (kept16_t_offset), so p' = p / (1 - a): m / (1 - a) = a p' + q and p - q = (1 - a) p' - q are
  //        one FFMA each, and x = (p - q) / (m / (1 - a)) - shift one more.
  __device__ float kept16_t_offset() const { return J ? 0.f : log2f(a1); }
  __device__ float x16(float dt, float ds, kept16_acc& k, float& q, float shift) const {
    const float pk = fast_exp2(dt), qk = fast_exp2(ds);
    q = qk;
    if constexpr (J) {
      // m clamped to float's normal range: a 2^-126 added to a p (one FFMA for the FMUL, session 21)
      // took 2^-126 (dt - lm) into the value, -0.5 an entry for a logit masked at bf16's lowest.
      const float apk = a * pk, lm = fast_log2(fmaxf(fmaf(a1, qk, apk), kMinNormal));
      k.la = fmaf(apk, dt - lm, k.la);
      const float t = ds - lm;
      k.lb = fmaf(qk, t, k.lb);
      return t - shift;
    } else {  // pk = p / (1 - a), mn = m / (1 - a), dt = log2 p - log2(1 - a)
      const float mn = fmaxf(fmaf(a, pk, qk), kMinNormal), lm = fast_log2(mn);
      k.la = fmaf(pk, dt - lm, k.la);
      return fmaf(fmaf(a1, pk, -qk), fast_rcp(mn), -shift);
    }
  }
  // The row's value (before loss_of) from the thread's sums: JSD a sum p (dt - lm) + (1 - a) sum q t;
  // skew KL sum p (log2 p - log2 m) = (1 - a) sum p' (dt - log2 mn).
  __device__ float kept16_loss(const kept16_acc& k) const { return J ? fmaf(a1, k.lb, k.la) : a1 * k.la; }
  // The thread's share of the row's constant, from the kept values: JSD sum q (shift + h) (= C / ((1 - a) ln 2));
  // skew KL sum q (w + 1) = sum q p / m (= -C / (1 - a)).
  __device__ float kept16_c(const kept16_acc& k, float shift) const {
    return J ? fmaf(shift, k.sq, k.qh) : fmaf(shift + 1.f, k.sq, k.qh);
  }
  // g1, g0 from the row's sum of kept16_c: the gradient q factor (dq - C) = q' (g1 h + g0).
  __device__ void kept16_set_c(float c_row, float shift) {
    const float sg = factor < 0.f ? -1.f : 1.f;
    if constexpr (J) {  // dq - C = (1 - a) ln 2 (shift + h - c_row)
      g1 = sg * a1 * kLn2;
      g0 = g1 * (shift - c_row);
    } else {  // dq - C = -(1 - a)(shift + h + 1) + (1 - a) c_row
      g1 = -sg * a1;
      g0 = sg * a1 * (c_row - shift - 1.f);
    }
  }
  __device__ float kept16_grad_offset() const { return fast_log2(fabsf(factor)); }
  // Whether every x fits fp16 (kept16). JSD's |log2(q / m) - shift| passes 65,504 only where q = 2^ds is
  // 0 in float, whose gradient no clamp changes (the kept value saturates, and C takes it so); skew KL's
  // w = p / m - 1 lies in [-1, (1 - a) / a], unbounded as a -> 0 (a = 0 is forward KL with
  // w = p / q - 1), and p' = p / (1 - a) overflows as a -> 1.
  __device__ bool kept16_fits() const { return J || (a >= 1.f / 32768.f && a1 >= 1.f / 32768.f); }
  __device__ float first(float dt, float ds, float& loss, float& cq) const {
    term(dt, ds, loss, cq);
    return 0.f;
  }
  __device__ static float loss_of(float sum) { return sum * kLn2; }
  // The sweeps' cq is in base 2 (JSD) or without the -(1 - a) factor (skew KL).
  __device__ void set_c(float cq_row) { c = J ? cq_row * kLn2 : -a1 * cq_row; }
  __device__ float grad(float dt, float ds) const {
    const float pk = fast_exp2(dt), qk = fast_exp2(ds), m = a * pk + a1 * qk;
    if (!(m >= kMinNormal)) return -factor * qk * c;
    const float dq = J ? a1 * kLn2 * (ds - fast_log2(m)) : -a1 * pk * fast_rcp(m);
    return factor * qk * (dq - c);
  }
  // From the kept w: JSD dq = ln 2 w; skew KL dq = -(1 - a)(w + 1).
  __device__ float grad_w(float ds, float w) const {
    const float qk = fast_exp2(ds);
    if constexpr (J) return factor * qk * fmaf(w, kLn2, -c);
    else return -factor * qk * fmaf(a1, w, a1 + c);
  }
};
template <>
struct kd_entry<jsd> : mixture_entry<true> {
  using mixture_entry<true>::mixture_entry;
};
// JSD for fp32 gradients: log2 m by log2f in the terms sweep (the value's), MUFU.LG2 in the recomputing
// gradient sweep (which a constant error does not move). The lse's rounding is not folded (above).
struct jsd_exact : mixture_entry<true, true> {
  using mixture_entry<true, true>::mixture_entry;
};
template <>
struct kd_entry<skew_kl> : mixture_entry<false> {
  using mixture_entry<false>::mixture_entry;
};

// Skew KL for fp32 gradients (lse_fold): every sweep takes p = p' 2^e_t and q = q' 2^e_s back (e: the
// float lse's excess, fold_lse) in the factors it multiplies by anyway: m = fa p' + fb q' is the exact
// p and q's mixture, the gradient's dq = -(1 - a) p / m, and the value sum p (log2 p - log2 m) with
// log2 p = dt + e_t, so it needs no lse gap (exact_value) and costs one FADD an entry more. Its log2 m
// is log2f's, not MUFU.LG2's: the approximation's error (up to 2^-22 relative to |log2 m| ~ 17 for
// m ~ 2^-17) is not centred on zero, so it does not average out over a row as float rounding does, and
// the value of close distributions (~0.01 bits) took it whole (H200: 9.5e-6 to 4e-5 relative with
// MUFU.LG2 where the emulation, with exact logs, said 2e-6 to 5e-6).
// A float emulation of the gradient (benchmarks/lse_rounding.cpp): 1.2e-6 to 5.8e-5 plain, 5e-7 to 3.4e-6
// folded.
struct skew_kl_folded : mixture_entry<false> {
  static constexpr bool exact_value = true;
  float fa = 0.f, fb = 0.f, pa = 0.f, cscale = 1.f;  // m = fa p' + fb q'; dq = -pa p' / m; C's scale
  float ft = 1.f, et = 0.f;                          // the teacher's 2^e_t and e_t
  __device__ skew_kl_folded(float param, float factor_)
      : mixture_entry<false>(param, factor_), fa(param), fb(1.f - param), pa(1.f - param) {}
  __device__ float term(float dt, float ds, float& loss, float& cq) const {
    const float pk = fast_exp2(dt), qk = fast_exp2(ds), m = fa * pk + fb * qk;
    const bool normal = m >= kMinNormal;
    const float r = fast_rcp(m), lp = dt + et;
    loss += pk * (lp - (normal ? log2f(m) : lp));
    cq += normal ? pk * qk * r : 0.f;
    return normal ? (pa * pk - fb * qk) * r : -1.f;  // p / m - 1 of the exact p, q (mixture_entry::grad_w)
  }
  __device__ float first(float dt, float ds, float& loss, float& cq) const {
    term(dt, ds, loss, cq);
    return 0.f;
  }
  __device__ float loss_of(float sum) const { return sum * ft * kLn2; }
  __device__ void set_c(float cq_row) { c = -pa * cscale * cq_row; }
  __device__ float grad(float dt, float ds) const {
    const float pk = fast_exp2(dt), qk = fast_exp2(ds), m = fa * pk + fb * qk;
    if (!(m >= kMinNormal)) return -factor * qk * c;
    return factor * qk * (-pa * pk * fast_rcp(m) - c);
  }
  // Before the terms sweep: p = p' 2^e_t, q = q' 2^e_s.
  __device__ void fold_lse(float base, const lse_acc& t, const lse_acc& s, bool) {
    et = t.excess();
    ft = fast_exp2(et);
    const float fs = fast_exp2(s.excess());
    fa = a * ft;
    fb = a1 * fs;
    pa = a1 * ft;
    cscale = fs;
    factor = base * fs;
  }
};

// The entry a kernel runs: D's, or its folding form where the gradient is stored in float.
template <class D, class GT>
struct entry_for {
  using type = kd_entry<D>;
};
template <>
struct entry_for<forward_kl, float> {
  using type = forward_kl_folded;
};
template <>
struct entry_for<skew_kl, float> {
  using type = skew_kl_folded;
};
template <>
struct entry_for<jsd, float> {
  using type = jsd_exact;
};
// Whether entry E takes the lse's rounding back (fold_lse) for gradients of type GT.
template <class E, class GT>
inline constexpr bool folds_lse = lse_fold<GT> && requires(E& e, const lse_acc& a) { e.fold_lse(1.f, a, a, true); };
// Whether a kernel running entry E for divergence D adds D's lse gap (lse_gap_bits) to the value: where D
// has one, unless E forms the value from the exact p and q (skew_kl_folded).
template <class D, class E>
inline constexpr bool adds_lse_gap = ::kd::detail::divergence_math<D, float>::has_lse_gap && !requires { E::exact_value; };

// The two-sweep divergences (JSD, skew KL, TVD, and reverse KL's mapped rows, which do not keep) may keep
// what their gradient needs of an entry besides q, its w (term()'s result), over the teacher's entry in
// shared memory: the terms sweep writes it, the gradient sweep reads it and the student's logit and
// takes one exponential (grad_w) instead of forming p, q, m, log2 m or 1 / m again. JSD and skew KL
// had 8-9 MUFU operations an entry across pass 1 and their two sweeps; keeping w leaves 6-7.
// Stored in float over a 4-byte teacher entry (exact). Over a 2-byte one only TVD's w (+-1/2 or 0) is kept,
// in fp16 (exact): JSD's and skew KL's gradient q (w - C) cancels where one entry holds most of q (C is then
// close to that entry's w), which magnifies fp16's 2^-12 of w past a 16-bit gradient's rounding: the loss
// matrix on an H100 (2026-12-05) had a bf16 JSD row at T = 0.5 off by 3.8% of the gradient's norm against
// a 1% bound. Those recompute w in float instead.
template <class E>
inline constexpr bool has_grad_w = requires(const E& e, float x, float& r) {
  e.term(x, x, r, r);
  e.grad_w(x, x);
};
template <class E, class TC, class GT>
inline constexpr bool keeps_w =
    has_grad_w<E> && (sizeof(TC) == 4 || (sizeof(GT) == 2 && std::is_same_v<E, kd_entry<tvd>>));

// JSD and skew KL with 16-bit teacher entries and gradients may keep w in fp16 after all (the per-row
// kernel's aligned unmapped rows: kept16), on two conditions that make fp16's rounding of w harmless:
//  - C is summed from the w read back (consistent): the gradient q (w - C) is unchanged when every w
//    moves by one constant, so a w rounded to fp16 errs by q_j (d_j - sum q d), not by q_j d_j. The 3.8%
//    above was the second form: near-one q_k made C ~ w_k, and the error of w_k stood alone.
//  - Each thread stores h = w - s, s = w at the thread's largest student logit (the entry of largest q
//    among those it visits; slice_pair_lse finds it in pass 1), and reads back s + h. Rounding h errs by
//    2^-11 |w_j - s| <= 2^-11 (|w_j - C| + |s - C|), and q_j |s - C| <= q_k |w_k - C|: every entry's error
//    is 2^-11 of its own gradient plus the thread's largest one. Without s, w near a constant far from 0
//    (teacher much sharper than the student: w ~ (1 - a) log2(1 / (1 - a)) over q's mass) leaves
//    gradients of ~1e-6 of w under fp16's rounding of w.
// An emulation (benchmarks/kept16_rounding.py: rows of 32,000 and 50,304 columns, the kernel's float
// path, bf16 gradients against fp64, worst row of 12 per regime): kept and shifted, every regime's error
// equals the float path's to 3 digits (0.17-1.2% of the row's gradient norm, bf16's rounding included);
// kept unshifted, up to 27x it (34% against 1.2%: sharp unrelated teacher and student, a = 0.99). Rows
// whose gradient is a vanishing difference of its terms (unrelated logits of stddev 10-20 at T = 1)
// defeat the float path as much: all three forms err alike there.
// On the GPU (tests/cuda/test_cuda_losses.cu, that regime): 0.05-0.20% in bf16, 0.02-0.09% in fp16.
// The gradient sweep then takes one MUFU.EX2 an entry instead of three MUFU operations: 1.01-1.05x
// (H100, 2026-12-06; the per-row kernels' serial phases, not the MUFU pipe, bound them).
// Skew KL keeps w so only for 2^-15 <= alpha <= 1 - 2^-15 (kept16_fits).
// TVD's w (+-1/2 or 0) is exact in fp16 and needs no shift (kd_entry<tvd>'s kept16 form: kept16_shifted
// is false for it); it takes the same paired sweeps for their fewer instructions an entry.
// The kept16 sweeps (kernels' sweep_slice_keep16 / sweep_slice_kept16 below) round each pair of x to fp16
// in one F2FP (half2_satfinite) and form the gradient as q' (g1 h + g0), q' = 2^(ds + log2 |factor|).
// ncu (H100, 8192 x 128,256 bf16, fef3acc) had JSD's terms sweep at 27 instructions an entry and its
// gradient sweep at 12, both issue-bound.
template <class E>
inline constexpr bool kept16 = requires(const E& e, E& m, float x, float& r, kept16_acc& k) {
  e.x16(x, x, k, r, x);
  e.kept16_t_offset();
  e.kept16_loss(k);
  e.kept16_c(k, x);
  m.kept16_set_c(x, x);
  e.kept16_grad_offset();
  e.grad16(x, x);
  e.kept16_fits();
};
// Whether a kept16 entry stores w less a per-thread shift (JSD, skew KL), which pass 1 finds (s_arg).
template <class E>
inline constexpr bool kept16_shifted = kept16<E> && !std::is_same_v<E, kd_entry<tvd>>;
// The storage of a kept w over a teacher entry of type TC.
template <class TC>
using kept_w_t = std::conditional_t<sizeof(TC) == 4, float, ::kd::half>;

// A sweep over a slice in shared memory (teacher tc, student sc, one storage type T, 16-byte aligned):
// fn(dt, ds) per entry, its gradient stored to grad (global, 16-byte aligned) when `write`, added to the
// values there when accumulating. Entries [0, 8k) as 16-byte vectors (shared-memory reads and gradient
// stores: element-wise 2-byte accesses had held reverse KL at 1.54 TB/s against forward KL's 2.30 at
// 8192 x 128,256 bf16 on an H200), the unaligned tail one by one.
// The first input may have its own storage TA and the result its own G, both of T's size: the kept-w
// sweeps (below) write w over the teacher's entries and read it back with scale 1 and offset 0.
// The vector loop is instantiated for write and accumulate separately (sweep_vectors): a runtime flag in
// it left ~17 predicated-off instructions a vector in JSD's gradient sweep (ncu, H100, fef3acc).
// head (the span kernel's, else null): entries [0, vn) go there instead, stored without accumulating;
// their columns start below the block's own (the previous block writes them).
template <bool Write, bool Acc, class T, class TA, class G, class Fn>
__device__ __forceinline__ void sweep_vectors(const TA* ta, float ka, float aoff, const T* sc, G* grad, long long nv,
                                              float k2, float slse, Fn&& fn, uint4* head) {
  constexpr int vn = vec_n<T>;
  const uint4* t4 = reinterpret_cast<const uint4*>(ta);
  const uint4* s4 = reinterpret_cast<const uint4*>(sc);
  for (long long i = threadIdx.x; i < nv; i += blockDim.x) {
    float ft[vn], fs[vn];
    unpack<TA>(t4[i], ft);
    unpack<T>(s4[i], fs);
#pragma unroll
    for (int k = 0; k < vn; ++k) ft[k] = fn(ft[k] * ka - aoff, fs[k] * k2 - slse);
    if constexpr (Write) {
      if (head != nullptr && i == 0) store_grad_vec<G>(head, ft, false);
      else store_grad_vec<G>(reinterpret_cast<uint4*>(grad) + i, ft, Acc);
    }
  }
}
template <class T, class TA, class G, class Fn>
__device__ __forceinline__ void sweep_slice_of(const TA* ta, float ka, float aoff, const T* sc, G* grad, long long n,
                                               float k2, float slse, bool write, bool accumulate, Fn&& fn,
                                               uint4* head = nullptr) {
  static_assert(sizeof(TA) == sizeof(T) && sizeof(G) == sizeof(T), "kd: a sweep's inputs and result have one entry size");
  constexpr int vn = vec_n<T>;
  const long long nv = n / vn;
  if (!write) sweep_vectors<false, false, T>(ta, ka, aoff, sc, grad, nv, k2, slse, fn, head);
  else if (accumulate) sweep_vectors<true, true, T>(ta, ka, aoff, sc, grad, nv, k2, slse, fn, head);
  else sweep_vectors<true, false, T>(ta, ka, aoff, sc, grad, nv, k2, slse, fn, head);
  for (long long j = nv * vn + threadIdx.x; j < n; j += blockDim.x) {
    float v = fn(to_float(ta[j]) * ka - aoff, to_float(sc[j]) * k2 - slse);
    if (write) {
      if (head != nullptr && j < vn) {  // a span shorter than a vector
        reinterpret_cast<G*>(head)[j] = from_float<G>(v);
        continue;
      }
      if (accumulate) v += to_float(grad[j]);
      grad[j] = from_float<G>(v);
    }
  }
}
template <class T, class Fn>
__device__ __forceinline__ void sweep_slice(const T* tc, const T* sc, T* grad, long long n, float k2, float tlse,
                                            float slse, bool write, bool accumulate, Fn&& fn, uint4* head = nullptr) {
  sweep_slice_of<T, T, T>(tc, k2, tlse, sc, grad, n, k2, slse, write, accumulate, fn, head);
}

// The terms sweep of an entry that keeps w: fn(dt, ds) returns the entry's w, written over its teacher
// entry as W (each thread writes only the entries it has just read).
template <class T, class W, class Fn>
__device__ __forceinline__ void sweep_slice_keep(T* tc, const T* sc, long long n, float k2, float tlse, float slse,
                                                 Fn&& fn) {
  sweep_slice_of<T, T, W>(tc, k2, tlse, sc, reinterpret_cast<W*>(tc), n, k2, slse, true, false,
                          [&](float dt, float ds) { return clamp_kept<W>(fn(dt, ds)); });
}

// The gradient sweep from kept w: fn(ds, w) returns the gradient, stored (or added) to grad. The same
// thread visits the same entries as in sweep_slice_keep.
template <class T, class W, class Fn>
__device__ __forceinline__ void sweep_slice_kept(const T* tc, const T* sc, T* grad, long long n, float k2, float slse,
                                                 bool accumulate, Fn&& fn, uint4* head = nullptr) {
  sweep_slice_of<T, W, T>(reinterpret_cast<const W*>(tc), 1.f, 0.f, sc, grad, n, k2, slse, true, accumulate,
                          [&](float w, float ds) { return fn(ds, w); }, head);
}

// The kept16 terms sweep (16-bit T, 16-byte aligned): every entry's x = e.x16(dt, ds, ...) rounded to fp16
// in pairs (one F2FP each: half2_satfinite) and written over its teacher entry; k gets the loss sums,
// sum q h of the kept h and sum q. dt = x_t k2 - toff (toff: tlse plus the entry's kept16_t_offset).
template <class T, class E>
__device__ __forceinline__ void sweep_slice_keep16(T* tc, const T* sc, long long n, float k2, float toff, float slse,
                                                   const E& e, float shift, kept16_acc& k) {
  static_assert(sizeof(T) == 2, "kd: kept16 sweeps take 16-bit slices");
  constexpr int vn = vec_n<T>;
  const long long nv = n / vn;
  uint4* t4 = reinterpret_cast<uint4*>(tc);
  const uint4* s4 = reinterpret_cast<const uint4*>(sc);
  for (long long i = threadIdx.x; i < nv; i += blockDim.x) {
    float ft[vn], fs[vn];
    unpack<T>(t4[i], ft);
    unpack<T>(s4[i], fs);
    unsigned h2[vn / 2];
#pragma unroll
    for (int j = 0; j < vn / 2; ++j) {
      float q0, q1;
      const float x0 = e.x16(ft[2 * j] * k2 - toff, fs[2 * j] * k2 - slse, k, q0, shift);
      const float x1 = e.x16(ft[2 * j + 1] * k2 - toff, fs[2 * j + 1] * k2 - slse, k, q1, shift);
      h2[j] = half2_satfinite(x0, x1);
      const float2 h = __half22float2(*reinterpret_cast<const __half2*>(&h2[j]));
      k.qh = fmaf(q0, h.x, k.qh);
      k.qh = fmaf(q1, h.y, k.qh);
      k.sq += q0 + q1;
    }
    t4[i] = make_uint4(h2[0], h2[1], h2[2], h2[3]);
  }
  ::kd::half* hc = reinterpret_cast<::kd::half*>(tc);
  for (long long j = nv * vn + threadIdx.x; j < n; j += blockDim.x) {
    float q;
    const ::kd::half h = half_satfinite(e.x16(to_float(tc[j]) * k2 - toff, to_float(sc[j]) * k2 - slse, k, q, shift));
    hc[j] = h;
    k.qh = fmaf(q, to_float(h), k.qh);
    k.sq += q;
  }
}

// The kept16 gradient sweep: grad = e.grad16(2^(x_s k2 - qoff), h) from the kept h over the teacher entries
// (qoff: slse less the entry's kept16_grad_offset), stored or added to grad. The same thread visits the
// same entries as in sweep_slice_keep16.
template <class T, class E>
__device__ __forceinline__ void sweep_slice_kept16(const T* tc, const T* sc, T* grad, long long n, float k2, float qoff,
                                                   bool accumulate, const E& e, uint4* head = nullptr) {
  sweep_slice_of<T, ::kd::half, T>(reinterpret_cast<const ::kd::half*>(tc), 1.f, 0.f, sc, grad, n, k2, qoff, true,
                                   accumulate, [&](float h, float ds) { return e.grad16(fast_exp2(ds), h); }, head);
}

}  // namespace kd::cuda::detail
