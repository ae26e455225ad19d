// kd/model/ops.hpp: the op interface the model math is written against.
//
// A model backend (kd::model::cpu_ops<Real> in ops_cpu.hpp, kd::model::cuda_ops<T> in
// kd/model/cuda/ops.cuh) is an object with the members below. The transformer in transformer.hpp calls
// only these, so the model is written once and every op has a CPU reference that the CUDA op is tested
// against (tests/test_model_ops.cpp, tests/cuda/test_cuda_model_ops.cu).
//
// Conventions shared by every op:
//  - Every tensor is row-major and contiguous; pointers live in the backend's memory (host for CPU,
//    device for CUDA). `T` is the backend's value_type (weights, activations and their gradients);
//    `A` is its acc_type (accumulation, softmax statistics, router probabilities): double for
//    cpu_ops<double>, float otherwise. `I` is std::int32_t (token ids, positions, expert indices).
//  - A linear weight has the HF layout [out, in]; y = x W^T.
//  - "accumulate" means +=; otherwise the output is overwritten. Weight gradients accumulate by default
//    (so a tied embedding collects the head's and the embedding's gradients in one tensor); linear_dw,
//    grouped_linear_dw and the norms' dw take accumulate = false to overwrite instead (a model's first
//    gradient write, so the arena needs no zeroing pass).
//  - Ops return kd::status. CUDA ops only enqueue work on the backend's stream and report launch
//    failures; none of them synchronises except sync_counts (expert sizes go to the host) and download.
//  - Attention inputs are token-major, as the projection GEMMs produce them: q [batch*seq, Hq, D],
//    k and v [batch*seq, Hkv, D], o [batch*seq, Hq, D]; head h reads KV head h / (Hq / Hkv). Attention is
//    causal within each sequence of `seq` tokens. lse is [batch, Hq, seq]: log sum exp of the scaled
//    scores of each query row, the statistic a flash-style backward recomputes the probabilities from.
//    probs (only for layers whose maps a loss needs) is [batch, Hq, seq, seq], zero above the diagonal.
//  - RoPE is HF's rotate-half form: for i < D/2, angle = pos * theta^(-2i/D),
//    x'[i] = x[i] cos - x[i + D/2] sin, x'[i + D/2] = x[i + D/2] cos + x[i] sin. inverse rotates by -angle
//    (the backward of the forward rotation).
//  - SwiGLU input gu is [rows, 2I]: columns [0, I) are the gate, [I, 2I) the up projection
//    (one GEMM against the gate and up weights stored back to back); h = silu(gate) * up.
//  - Router: probs = softmax(logits) in A over E experts; the k largest (ties to the lower index) in
//    descending order go to topk_idx / topk_w [N, k]; with renorm, topk_w is divided by its sum.
//  - moe_dispatch groups the N*k (token, choice) pairs by expert, tokens ascending inside an expert:
//    slot s in [0, N*k) holds token slot_token[s]; token_slot[t*k + j] is the slot of choice j of token t;
//    counts[e] (host) is the number of slots of expert e, which occupy one contiguous range in order.
//    counts_host is complete once sync_counts() returns (a device backend sends it without waiting, so
//    the caller can queue work that does not need it first); the grouped GEMMs call it themselves.
#pragma once

#include <concepts>
#include <cstddef>
#include <cstdint>
#include <type_traits>

#include <kd/core/status.hpp>
#include <kd/model/parameters.hpp>

namespace kd::model {

using index_t = std::int32_t;

// The members every model backend has. Checked on the types, not on each op's arity, so a missing op is
// reported by the compiler at its call in transformer.hpp with the op's name.
template <class B>
concept ModelBackend = requires(B& b, std::size_t n, const arch& a) {
  typename B::value_type;
  typename B::acc_type;
  typename B::template buffer<typename B::value_type>;
  requires std::is_floating_point_v<typename B::acc_type>;
  { b.template alloc<typename B::value_type>(n) } -> std::same_as<typename B::template buffer<typename B::value_type>>;
  { B::name() } -> std::convertible_to<const char*>;
  { B::can_implement(a) } -> std::same_as<status>;
};

// The ops, for reference (T = value_type, A = acc_type, I = index_t; all return status):
//
//  model
//   static can_implement(const arch&)                   the backend's limits on a whole model (e.g. the CUDA
//                                                       kernels' experts <= 256); transformer::allocate() calls it
//
//  memory
//   buffer<U> alloc<U>(n)                               zero-filled; .data(), .size(); empty on failure
//   upload(const U* host, n, U* dst) / download(const U* src, n, U* host)     download waits for the stream
//   fill_zero(U* p, n), copy(const U* src, U* dst, n), add(T* y, const T* x, n)   (y += x)
//  dense
//   linear(x[M,K], w[N,K], y[M,N], M, N, K, accumulate)                y (+)= x w^T
//   linear_dx(dy[M,N], w[N,K], dx[M,K], M, N, K, accumulate)           dx (+)= dy w
//   linear_dw(dy[M,N], x[M,K], dw[N,K], M, N, K[, accumulate = true])  dw (+)= dy^T x
//   grouped_linear / grouped_linear_dx / grouped_linear_dw (..., const std::int64_t* counts_host, G, N, K[, accumulate])
//                                      (dw without accumulate: an empty group's dw is zeroed)
//                                      the same per group g of counts_host[g] consecutive rows, with weight
//                                      w + g*N*K ([N,K]): the experts of an MoE layer (independent GEMMs)
//   embedding(ids[n], table[V,H], out[n,H], n, V, H)                   ids are checked by the caller
//   embedding_dw(ids[n], dout[n,H], dtable[V,H], n, V, H)              dtable[ids[i]] += dout[i]
//   rmsnorm(x[R,D], w[D], y[R,D], A* rstd[R], R, D, eps[, x_copy])     y = x * rstd * w (x_copy = x, optional)
//   rmsnorm_bwd(x, w, rstd, dy, dx, dw, R, D, accumulate_dx[, accumulate_dw = true])   dw (+)= ...
//   rope(x[tokens,heads,D], pos[tokens], tokens, heads, D, theta, inverse)   in place
//   rmsnorm_rope(x[tokens,heads,D], w[D], y, A* rstd[tokens*heads], pos, tokens, heads, D, eps, theta[, x_ld])
//                                      y = rope(rmsnorm(x)) per head: Qwen3's QK norm and RoPE in one pass
//   rmsnorm_rope_bwd(x, w, rstd, pos, dy, dx, dw, tokens, heads, D, theta[, ld, accumulate_dw])
//                                      dy: w.r.t. y; dx overwritten
//                                      x_ld / ld: token stride of x (and dx) when they are column slices of a
//                                      wider matrix, as in the fused QKV projection (0: heads * D)
//   copy_rows(src, src_ld, dst, dst_ld, rows, cols)    dst[r, :cols] = src[r, :cols] (strided 2-D copy)
//   rope_cache(pos, tokens, D, theta)   rmsnorm_rope(_bwd) on this pos may reuse one (cos, sin) table until the
//                                      next rope_cache or upload into pos (the caller keeps pos unchanged)
//   swiglu(gu[R,2I], h[R,I], R, I) / swiglu_bwd(gu, dh[R,I], dgu[R,2I], R, I)  (dgu overwritten)
//  attention
//   attention(q, k, v, o, A* lse, batch, seq, Hq, Hkv, D, scale)
//   attention_bwd(q, k, v, o, lse, do, dq, dk, dv, batch, seq, Hq, Hkv, D, scale)   overwrites dq, dk, dv
//   attention_probs(q, k, lse, T* probs, batch, seq, Hq, Hkv, D, scale)
//   attention_probs_bwd(q, k, probs, dprobs, dq, dk, batch, seq, Hq, Hkv, D, scale) dq, dk accumulate
//  mixture of experts
//   router(logits[N,E] T, A* probs[N,E], I* topk_idx[N,k], A* topk_w[N,k], N, E, k, renorm)
//   router_bwd(probs, topk_idx, dtopk_w, const A* dprobs_extra (nullable), T* dlogits[N,E], N, E, k, renorm)
//   moe_dispatch(topk_idx, N, E, k, I* slot_token, I* token_slot, std::int64_t* counts_host)
//   sync_counts()                                       waits for the last moe_dispatch's counts_host
//   gather_rows(x[N,H], rows[S], out[S,H], S, H)                       out[s] = x[rows[s]]
//   moe_combine(y[S,H], token_slot, topk_w, residual[N,H], out[N,H], N, k, H)
//                                 out[t] = residual[t] + sum_j topk_w[t,j] y[token_slot[t*k+j]]
//                                 (residual nullable: no term; or equal to out: +=)
//   moe_combine_bwd(y, token_slot, topk_w, dout[N,H], dy[S,H], A* dtopk_w[N,k], N, k, H)
//   moe_gather_add(dy_slots[S,H], token_slot, dx[N,H], N, k, H, accumulate[, dlogits[N,E], w_router[E,H], E])
//                                 dx[t] (+)= sum_j dy[token_slot[t*k+j]] (+ dlogits[t] w_router: the router's
//                                 input gradient, linear_dx fused in)

}  // namespace kd::model
