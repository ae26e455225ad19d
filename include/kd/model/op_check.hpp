// kd/model/op_check.hpp: the host-side argument checks both model backends run before an op.
//
// Chained: the first failed check wins, and its message names the backend, the op and the argument
// ("cuda_ops::rope: D = 7 ..."), so a bad call is reported the same way on the CPU and the GPU.
//
// One function per op (`<op>_args`), in CUTLASS's can_implement style: both backends call it first, then
// add only what is theirs (cuda_ops: extents that must fit a kernel's int, the CUDA kernels' limits from
// cuda_limits.hpp; cpu_ops: the values of host-side ids, which a device backend cannot read).
#pragma once

#include <climits>
#include <cstddef>
#include <cmath>
#include <cstdint>
#include <string>
#include <utility>

#include <kd/core/status.hpp>
#include <kd/model/ops.hpp>

namespace kd::model::detail {

// Prefix is a tag type with `static constexpr const char* value` ("cpu_ops::", "cuda_ops::").
template <class Prefix>
class basic_op_check {
 public:
  explicit basic_op_check(const char* op) : op_(op) {}
  basic_op_check& nonneg(std::int64_t v, const char* what) {
    if (st_.ok() && v < 0) fail(errc::invalid_argument, std::string(what) + " = " + std::to_string(v) + " is negative");
    return *this;
  }
  basic_op_check& positive(std::int64_t v, const char* what) {
    if (st_.ok() && v <= 0)
      fail(errc::invalid_argument, std::string(what) + " = " + std::to_string(v) + " must be positive");
    return *this;
  }
  // An extent a kernel indexes with int (or a launch grid dimension).
  basic_op_check& fits_int(std::int64_t v, const char* what) {
    if (st_.ok() && v > INT_MAX) fail(errc::out_of_range, std::string(what) + " = " + std::to_string(v) + " exceeds 2^31 - 1");
    return *this;
  }
  // A pointer may be null only when its tensor is empty.
  basic_op_check& ptr(const void* p, std::int64_t n, const char* what) {
    if (st_.ok() && n > 0 && p == nullptr) fail(errc::invalid_argument, std::string(what) + " is null");
    return *this;
  }
  // Every ids[i] in [0, bound): for host-side ids only (the CPU backend; a device backend cannot read them).
  basic_op_check& in_range(const std::int32_t* ids, std::int64_t n, std::int64_t bound, const char* what) {
    for (std::int64_t i = 0; st_.ok() && i < n; ++i)
      if (ids[i] < 0 || ids[i] >= bound)
        fail(errc::out_of_range, std::string(what) + "[" + std::to_string(i) + "] = " + std::to_string(ids[i]) +
                                     " is outside [0, " + std::to_string(bound) + ")");
    return *this;
  }
  basic_op_check& finite(double v, const char* what) {
    if (st_.ok() && !std::isfinite(v)) fail(errc::invalid_argument, std::string(what) + " is not finite");
    return *this;
  }
  basic_op_check& that(bool cond, errc code, const std::string& what) {
    if (st_.ok() && !cond) fail(code, what);
    return *this;
  }
  // A check that may only run once the earlier ones passed (it reads the data).
  template <class F>
  basic_op_check& then(F&& f) {
    if (st_.ok()) {
      status s = f();
      std::swap(st_, s);
    }
    return *this;
  }
  [[nodiscard]] bool ok() const { return st_.ok(); }
  [[nodiscard]] status done() { return std::move(st_); }

 private:
  void fail(errc code, const std::string& what) {
    status s(code, std::string(Prefix::value) + op_ + ": " + what);
    std::swap(st_, s);
  }
  const char* op_;
  status st_;
};

// The shape checks of the four attention ops.
template <class Prefix>
basic_op_check<Prefix>& attention_shape(basic_op_check<Prefix>& c, std::int64_t batch, std::int64_t seq,
                                        std::int64_t hq, std::int64_t hkv, std::int64_t d, double scale) {
  c.nonneg(batch, "batch").nonneg(seq, "seq").positive(hq, "Hq").positive(hkv, "Hkv").positive(d, "D");
  if (c.ok())
    c.that(hq % hkv == 0, errc::shape_mismatch,
           "Hq = " + std::to_string(hq) + " is not a multiple of Hkv = " + std::to_string(hkv));
  return c.finite(scale, "scale");
}

// The full argument checks of the four attention ops (shapes, then every tensor's extent), shared by the
// backends so that both reject the same calls with the same messages.
template <class Prefix>
basic_op_check<Prefix>& attention_args(basic_op_check<Prefix>& c, const void* q, const void* k, const void* v,
                                       const void* o, const void* lse, std::int64_t batch, std::int64_t seq,
                                       std::int64_t hq, std::int64_t hkv, std::int64_t d, double scale) {
  attention_shape(c, batch, seq, hq, hkv, d, scale);
  const std::int64_t tokens = batch * seq;
  return c.ptr(q, tokens * hq * d, "q")
      .ptr(k, tokens * hkv * d, "k")
      .ptr(v, tokens * hkv * d, "v")
      .ptr(o, tokens * hq * d, "o")
      .ptr(lse, batch * hq * seq, "lse");
}
template <class Prefix>
basic_op_check<Prefix>& attention_bwd_args(basic_op_check<Prefix>& c, const void* q, const void* k, const void* v,
                                           const void* o, const void* lse, const void* dout, const void* dq,
                                           const void* dk, const void* dv, std::int64_t batch, std::int64_t seq,
                                           std::int64_t hq, std::int64_t hkv, std::int64_t d, double scale) {
  const std::int64_t tokens = batch * seq, nq = tokens * hq * d, nkv = tokens * hkv * d;
  return attention_args(c, q, k, v, o, lse, batch, seq, hq, hkv, d, scale)
      .ptr(dout, nq, "dout")
      .ptr(dq, nq, "dq")
      .ptr(dk, nkv, "dk")
      .ptr(dv, nkv, "dv");
}
template <class Prefix>
basic_op_check<Prefix>& attention_probs_args(basic_op_check<Prefix>& c, const void* q, const void* k, const void* lse,
                                             const void* probs, std::int64_t batch, std::int64_t seq, std::int64_t hq,
                                             std::int64_t hkv, std::int64_t d, double scale) {
  attention_shape(c, batch, seq, hq, hkv, d, scale);
  const std::int64_t tokens = batch * seq;
  return c.ptr(q, tokens * hq * d, "q")
      .ptr(k, tokens * hkv * d, "k")
      .ptr(lse, batch * hq * seq, "lse")
      .ptr(probs, batch * hq * seq * seq, "probs");
}
template <class Prefix>
basic_op_check<Prefix>& attention_probs_bwd_args(basic_op_check<Prefix>& c, const void* q, const void* k,
                                                 const void* probs, const void* dprobs, const void* dq, const void* dk,
                                                 std::int64_t batch, std::int64_t seq, std::int64_t hq,
                                                 std::int64_t hkv, std::int64_t d, double scale) {
  attention_shape(c, batch, seq, hq, hkv, d, scale);
  const std::int64_t tokens = batch * seq, np = batch * hq * seq * seq;
  return c.ptr(q, tokens * hq * d, "q")
      .ptr(k, tokens * hkv * d, "k")
      .ptr(probs, np, "probs")
      .ptr(dprobs, np, "dprobs")
      .ptr(dq, tokens * hq * d, "dq")
      .ptr(dk, tokens * hkv * d, "dk");
}

// copy_rows: rows x cols elements between row strides src_ld and dst_ld (each at least cols). The last row
// needs only cols elements, so a column slice of a wider matrix passes with its own extent.
template <class Prefix>
basic_op_check<Prefix>& rows_shape(basic_op_check<Prefix>& c, const void* src, std::int64_t src_ld, const void* dst,
                                   std::int64_t dst_ld, std::int64_t rows, std::int64_t cols) {
  c.nonneg(rows, "rows").nonneg(cols, "cols");
  if (!c.ok()) return c;
  c.that(src_ld >= cols && dst_ld >= cols, errc::invalid_argument,
         "row strides " + std::to_string(src_ld) + " (src) and " + std::to_string(dst_ld) + " (dst) must be at least cols = " +
             std::to_string(cols));
  if (!c.ok() || rows == 0 || cols == 0) return c;
  return c.ptr(src, (rows - 1) * src_ld + cols, "src").ptr(dst, (rows - 1) * dst_ld + cols, "dst");
}

// The row stride of a [tokens, heads * D] tensor that may be a column slice of a wider one (ld = 0: dense).
template <class Prefix>
basic_op_check<Prefix>& head_rows_ld(basic_op_check<Prefix>& c, std::int64_t ld, std::int64_t heads, std::int64_t d,
                                     const char* what) {
  return c.that(ld == 0 || ld >= heads * d, errc::invalid_argument,
                std::string(what) + " row stride " + std::to_string(ld) + " is below heads * D = " + std::to_string(heads * d));
}

// ---------------------------------------------------------------------------------------------------
// memory
// ---------------------------------------------------------------------------------------------------
template <class Prefix>
basic_op_check<Prefix>& transfer_args(basic_op_check<Prefix>& c, const void* src, const char* src_name, const void* dst,
                                      const char* dst_name, std::size_t n) {
  return c.ptr(src, static_cast<std::int64_t>(n), src_name).ptr(dst, static_cast<std::int64_t>(n), dst_name);
}
template <class Prefix>
basic_op_check<Prefix>& upload_args(basic_op_check<Prefix>& c, const void* host, std::size_t n, const void* dst) {
  return transfer_args(c, host, "host", dst, "dst", n);
}
template <class Prefix>
basic_op_check<Prefix>& download_args(basic_op_check<Prefix>& c, const void* src, std::size_t n, const void* host) {
  return transfer_args(c, src, "src", host, "host", n);
}
template <class Prefix>
basic_op_check<Prefix>& copy_args(basic_op_check<Prefix>& c, const void* src, const void* dst, std::size_t n) {
  return transfer_args(c, src, "src", dst, "dst", n);
}
template <class Prefix>
basic_op_check<Prefix>& fill_zero_args(basic_op_check<Prefix>& c, const void* p, std::size_t n) {
  return c.ptr(p, static_cast<std::int64_t>(n), "p");
}
template <class Prefix>
basic_op_check<Prefix>& add_args(basic_op_check<Prefix>& c, const void* y, const void* x, std::size_t n) {
  return transfer_args(c, y, "y", x, "x", n);
}

// ---------------------------------------------------------------------------------------------------
// dense
// ---------------------------------------------------------------------------------------------------
// The three GEMMs of a linear layer, named as in ops.hpp: C (+)= A B over extents M, N, K.
template <class Prefix>
basic_op_check<Prefix>& gemm_extents(basic_op_check<Prefix>& c, std::int64_t m, std::int64_t n, std::int64_t k) {
  return c.nonneg(m, "M").nonneg(n, "N").nonneg(k, "K");
}
template <class Prefix>
basic_op_check<Prefix>& linear_args(basic_op_check<Prefix>& c, const void* x, const void* w, const void* y,
                                    std::int64_t m, std::int64_t n, std::int64_t k) {
  return gemm_extents(c, m, n, k).ptr(x, m * k, "x").ptr(w, n * k, "w").ptr(y, m * n, "y");
}
template <class Prefix>
basic_op_check<Prefix>& linear_dx_args(basic_op_check<Prefix>& c, const void* dy, const void* w, const void* dx,
                                       std::int64_t m, std::int64_t n, std::int64_t k) {
  return gemm_extents(c, m, n, k).ptr(dy, m * n, "dy").ptr(w, n * k, "w").ptr(dx, m * k, "dx");
}
template <class Prefix>
basic_op_check<Prefix>& linear_dw_args(basic_op_check<Prefix>& c, const void* dy, const void* x, const void* dw,
                                       std::int64_t m, std::int64_t n, std::int64_t k) {
  return gemm_extents(c, m, n, k).ptr(dy, m * n, "dy").ptr(x, m * k, "x").ptr(dw, n * k, "dw");
}

// The grouped GEMMs: G groups of counts[g] >= 0 consecutive rows (counts on the host), weights [G, N, K].
template <class Prefix>
basic_op_check<Prefix>& grouped_args(basic_op_check<Prefix>& c, const std::int64_t* counts, std::int64_t g,
                                     std::int64_t n, std::int64_t k) {
  c.nonneg(g, "G").nonneg(n, "N").nonneg(k, "K").ptr(counts, g, "counts");
  for (std::int64_t i = 0; c.ok() && i < g; ++i)
    c.that(counts[i] >= 0, errc::invalid_argument,
           "counts[" + std::to_string(i) + "] = " + std::to_string(counts[i]) + " is negative");
  return c;
}
inline std::int64_t grouped_rows(const std::int64_t* counts, std::int64_t g) {
  std::int64_t r = 0;
  for (std::int64_t i = 0; i < g; ++i) r += counts[i];
  return r;
}
template <class Prefix>
basic_op_check<Prefix>& grouped_linear_args(basic_op_check<Prefix>& c, const void* x, const void* w, const void* y,
                                            const std::int64_t* counts, std::int64_t g, std::int64_t n, std::int64_t k) {
  if (!grouped_args(c, counts, g, n, k).ok()) return c;
  const std::int64_t rows = grouped_rows(counts, g);
  return c.ptr(x, rows * k, "x").ptr(w, g * n * k, "w").ptr(y, rows * n, "y");
}
template <class Prefix>
basic_op_check<Prefix>& grouped_linear_dx_args(basic_op_check<Prefix>& c, const void* dy, const void* w, const void* dx,
                                               const std::int64_t* counts, std::int64_t g, std::int64_t n,
                                               std::int64_t k) {
  if (!grouped_args(c, counts, g, n, k).ok()) return c;
  const std::int64_t rows = grouped_rows(counts, g);
  return c.ptr(dy, rows * n, "dy").ptr(w, g * n * k, "w").ptr(dx, rows * k, "dx");
}
template <class Prefix>
basic_op_check<Prefix>& grouped_linear_dw_args(basic_op_check<Prefix>& c, const void* dy, const void* x, const void* dw,
                                               const std::int64_t* counts, std::int64_t g, std::int64_t n,
                                               std::int64_t k) {
  if (!grouped_args(c, counts, g, n, k).ok()) return c;
  const std::int64_t rows = grouped_rows(counts, g);
  return c.ptr(dy, rows * n, "dy").ptr(x, rows * k, "x").ptr(dw, g * n * k, "dw");
}

// embedding / embedding_dw: n ids into a [V, H] table (the ids' values are the backend's to check).
template <class Prefix>
basic_op_check<Prefix>& embedding_shape(basic_op_check<Prefix>& c, const index_t* ids, std::int64_t n, std::int64_t v,
                                        std::int64_t h) {
  return c.nonneg(n, "n").positive(v, "V").nonneg(h, "H").ptr(ids, n, "ids");
}
template <class Prefix>
basic_op_check<Prefix>& embedding_args(basic_op_check<Prefix>& c, const index_t* ids, const void* table, const void* out,
                                       std::int64_t n, std::int64_t v, std::int64_t h) {
  return embedding_shape(c, ids, n, v, h).ptr(table, v * h, "table").ptr(out, n * h, "out");
}
template <class Prefix>
basic_op_check<Prefix>& embedding_dw_args(basic_op_check<Prefix>& c, const index_t* ids, const void* dout,
                                          const void* dtable, std::int64_t n, std::int64_t v, std::int64_t h) {
  return embedding_shape(c, ids, n, v, h).ptr(dout, n * h, "dout").ptr(dtable, v * h, "dtable");
}

// rmsnorm over R rows of D.
template <class Prefix>
basic_op_check<Prefix>& eps_arg(basic_op_check<Prefix>& c, double eps) {
  return c.finite(eps, "eps").that(eps >= 0.0, errc::invalid_argument, "eps is negative");
}
template <class Prefix>
basic_op_check<Prefix>& rmsnorm_args(basic_op_check<Prefix>& c, const void* x, const void* w, const void* y,
                                     const void* rstd, std::int64_t r, std::int64_t d, double eps) {
  c.nonneg(r, "R").positive(d, "D");
  return eps_arg(c, eps).ptr(x, r * d, "x").ptr(w, r > 0 ? d : 0, "w").ptr(y, r * d, "y").ptr(rstd, r, "rstd");
}
// dw may be null when nothing is written to it (no rows and accumulate_dw).
template <class Prefix>
basic_op_check<Prefix>& rmsnorm_bwd_args(basic_op_check<Prefix>& c, const void* x, const void* w, const void* rstd,
                                         const void* dy, const void* dx, const void* dw, std::int64_t r, std::int64_t d,
                                         bool accumulate_dw) {
  return c.nonneg(r, "R")
      .positive(d, "D")
      .ptr(x, r * d, "x")
      .ptr(w, r > 0 ? d : 0, "w")
      .ptr(rstd, r, "rstd")
      .ptr(dy, r * d, "dy")
      .ptr(dx, r * d, "dx")
      .ptr(dw, accumulate_dw && r == 0 ? 0 : d, "dw");
}

// RoPE over [tokens, heads, D] with positions pos[tokens].
template <class Prefix>
basic_op_check<Prefix>& rope_shape(basic_op_check<Prefix>& c, const index_t* pos, std::int64_t tokens,
                                   std::int64_t heads, std::int64_t d, double theta) {
  return c.nonneg(tokens, "tokens")
      .positive(heads, "heads")
      .positive(d, "D")
      .that(d % 2 == 0, errc::invalid_argument, "D = " + std::to_string(d) + " is odd")
      .finite(theta, "theta")
      .that(theta > 0.0, errc::invalid_argument, "theta must be positive")
      .ptr(pos, tokens, "pos");
}
template <class Prefix>
basic_op_check<Prefix>& rope_args(basic_op_check<Prefix>& c, const void* x, const index_t* pos, std::int64_t tokens,
                                  std::int64_t heads, std::int64_t d, double theta) {
  return rope_shape(c, pos, tokens, heads, d, theta).ptr(x, tokens * heads * d, "x");
}
template <class Prefix>
basic_op_check<Prefix>& rope_cache_args(basic_op_check<Prefix>& c, const index_t* pos, std::int64_t tokens,
                                        std::int64_t d, double theta) {
  return rope_shape(c, pos, tokens, 1, d, theta);
}
// x (and dx) may be column slices of a wider matrix with token stride ld (0: heads * D); their extent is
// then (tokens - 1) * ld + heads * D.
inline std::int64_t sliced_extent(std::int64_t tokens, std::int64_t ld, std::int64_t heads, std::int64_t d) {
  return tokens > 0 ? (tokens - 1) * (ld == 0 ? heads * d : ld) + heads * d : 0;
}
template <class Prefix>
basic_op_check<Prefix>& rmsnorm_rope_args(basic_op_check<Prefix>& c, const void* x, const void* w, const void* y,
                                          const void* rstd, const index_t* pos, std::int64_t tokens, std::int64_t heads,
                                          std::int64_t d, double eps, double theta, std::int64_t x_ld) {
  rope_shape(c, pos, tokens, heads, d, theta);
  head_rows_ld(eps_arg(c, eps), x_ld, heads, d, "x");
  if (!c.ok()) return c;
  return c.ptr(x, sliced_extent(tokens, x_ld, heads, d), "x")
      .ptr(w, tokens > 0 ? d : 0, "w")
      .ptr(y, tokens * heads * d, "y")
      .ptr(rstd, tokens * heads, "rstd");
}
template <class Prefix>
basic_op_check<Prefix>& rmsnorm_rope_bwd_args(basic_op_check<Prefix>& c, const void* x, const void* w, const void* rstd,
                                              const index_t* pos, const void* dy, const void* dx, const void* dw,
                                              std::int64_t tokens, std::int64_t heads, std::int64_t d, double theta,
                                              std::int64_t ld, bool accumulate_dw) {
  head_rows_ld(rope_shape(c, pos, tokens, heads, d, theta), ld, heads, d, "x / dx");
  if (!c.ok()) return c;
  const std::int64_t sliced = sliced_extent(tokens, ld, heads, d);
  return c.ptr(x, sliced, "x")
      .ptr(w, tokens > 0 ? d : 0, "w")
      .ptr(rstd, tokens * heads, "rstd")
      .ptr(dy, tokens * heads * d, "dy")
      .ptr(dx, sliced, "dx")
      .ptr(dw, accumulate_dw && tokens == 0 ? 0 : d, "dw");
}

// SwiGLU over R rows: gu [R, 2I], h [R, I].
template <class Prefix>
basic_op_check<Prefix>& swiglu_args(basic_op_check<Prefix>& c, const void* gu, const void* h, std::int64_t r,
                                    std::int64_t i) {
  return c.nonneg(r, "R").positive(i, "I").ptr(gu, r * 2 * i, "gu").ptr(h, r * i, "h");
}
template <class Prefix>
basic_op_check<Prefix>& swiglu_bwd_args(basic_op_check<Prefix>& c, const void* gu, const void* dh, const void* dgu,
                                        std::int64_t r, std::int64_t i) {
  return c.nonneg(r, "R").positive(i, "I").ptr(gu, r * 2 * i, "gu").ptr(dh, r * i, "dh").ptr(dgu, r * 2 * i, "dgu");
}

// ---------------------------------------------------------------------------------------------------
// mixture of experts
// ---------------------------------------------------------------------------------------------------
// N tokens choosing k of E experts; the N*k (token, choice) slots are indexed with index_t.
template <class Prefix>
basic_op_check<Prefix>& router_shape(basic_op_check<Prefix>& c, std::int64_t n, std::int64_t e, std::int64_t k) {
  c.nonneg(n, "N").positive(e, "E").positive(k, "k");
  if (!c.ok()) return c;
  return c.that(k <= e, errc::invalid_argument, "k = " + std::to_string(k) + " exceeds E = " + std::to_string(e))
      .that(n * k <= INT32_MAX, errc::invalid_argument, "N * k does not fit index_t");
}
template <class Prefix>
basic_op_check<Prefix>& router_args(basic_op_check<Prefix>& c, const void* logits, const void* probs,
                                    const index_t* topk_idx, const void* topk_w, std::int64_t n, std::int64_t e,
                                    std::int64_t k) {
  return router_shape(c, n, e, k)
      .ptr(logits, n * e, "logits")
      .ptr(probs, n * e, "probs")
      .ptr(topk_idx, n * k, "topk_idx")
      .ptr(topk_w, n * k, "topk_w");
}
template <class Prefix>
basic_op_check<Prefix>& router_bwd_args(basic_op_check<Prefix>& c, const void* probs, const index_t* topk_idx,
                                        const void* dtopk_w, const void* dlogits, std::int64_t n, std::int64_t e,
                                        std::int64_t k) {
  return router_shape(c, n, e, k)
      .ptr(probs, n * e, "probs")
      .ptr(topk_idx, n * k, "topk_idx")
      .ptr(dtopk_w, n * k, "dtopk_w")
      .ptr(dlogits, n * e, "dlogits");
}
template <class Prefix>
basic_op_check<Prefix>& moe_dispatch_args(basic_op_check<Prefix>& c, const index_t* topk_idx, std::int64_t n,
                                          std::int64_t e, std::int64_t k, const index_t* slot_token,
                                          const index_t* token_slot, const std::int64_t* counts_host) {
  return router_shape(c, n, e, k)
      .ptr(topk_idx, n * k, "topk_idx")
      .ptr(slot_token, n * k, "slot_token")
      .ptr(token_slot, n * k, "token_slot")
      .ptr(counts_host, e, "counts_host");
}

// out[s] = x[rows[s]] for S rows of H.
template <class Prefix>
basic_op_check<Prefix>& gather_rows_args(basic_op_check<Prefix>& c, const void* x, const index_t* rows, const void* out,
                                         std::int64_t s, std::int64_t h) {
  return c.nonneg(s, "S").nonneg(h, "H").ptr(rows, s, "rows").ptr(x, s * h, "x").ptr(out, s * h, "out");
}

// The combines: N tokens of H, k slots each through token_slot [N*k].
template <class Prefix>
basic_op_check<Prefix>& combine_shape(basic_op_check<Prefix>& c, const index_t* token_slot, std::int64_t n,
                                      std::int64_t k, std::int64_t h) {
  c.nonneg(n, "N").positive(k, "k").nonneg(h, "H").ptr(token_slot, n * k, "token_slot");
  if (!c.ok()) return c;
  return c.that(n * k <= INT32_MAX, errc::invalid_argument, "N * k does not fit index_t");
}
template <class Prefix>
basic_op_check<Prefix>& moe_combine_args(basic_op_check<Prefix>& c, const void* y, const index_t* token_slot,
                                         const void* topk_w, const void* out, std::int64_t n, std::int64_t k,
                                         std::int64_t h) {
  return combine_shape(c, token_slot, n, k, h).ptr(y, n * k * h, "y").ptr(topk_w, n * k, "topk_w").ptr(out, n * h, "out");
}
template <class Prefix>
basic_op_check<Prefix>& moe_combine_bwd_args(basic_op_check<Prefix>& c, const void* y, const index_t* token_slot,
                                             const void* topk_w, const void* dout, const void* dy, const void* dtopk_w,
                                             std::int64_t n, std::int64_t k, std::int64_t h) {
  return combine_shape(c, token_slot, n, k, h)
      .ptr(y, n * k * h, "y")
      .ptr(topk_w, n * k, "topk_w")
      .ptr(dout, n * h, "dout")
      .ptr(dy, n * k * h, "dy")
      .ptr(dtopk_w, n * k, "dtopk_w");
}
template <class Prefix>
basic_op_check<Prefix>& moe_gather_add_args(basic_op_check<Prefix>& c, const void* dy_slots, const index_t* token_slot,
                                            const void* dx, std::int64_t n, std::int64_t k, std::int64_t h,
                                            const void* dlogits, const void* w_router, std::int64_t e) {
  return combine_shape(c, token_slot, n, k, h)
      .ptr(dy_slots, n * k * h, "dy_slots")
      .ptr(dx, n * h, "dx")
      .nonneg(e, "E")
      .ptr(dlogits, n * e, "dlogits")
      .ptr(w_router, e * h, "w_router");
}

}  // namespace kd::model::detail
