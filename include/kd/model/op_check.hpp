// kd/model/op_check.hpp: the host-side argument checks both model backends run before an op.
//
// Chained: the first failed check wins, and its message names the backend, the op and the argument
// ("cuda_ops::rope: D = 7 ..."), so a bad call is reported the same way on the CPU and the GPU.
#pragma once

#include <climits>
#include <cmath>
#include <cstdint>
#include <string>
#include <utility>

#include <kd/core/status.hpp>

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

}  // namespace kd::model::detail
