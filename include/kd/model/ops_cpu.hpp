// kd/model/ops_cpu.hpp: the CPU reference model backend, kd::model::cpu_ops<Real>.
//
// Implements every op of kd/model/ops.hpp on host memory. cpu_ops<double> is the reference the CUDA
// backend and the finite-difference tests are checked against, so every op is written for exactness
// first: GEMMs go through Eigen (row-major Maps over the caller's memory, no copies), everything else is
// plain loops accumulating in acc_type (= Real). Large GEMMs (an LM head over a 152k vocabulary) are split
// into output blocks over threads (KD_CPU_THREADS, default: the hardware's): each output element is still
// one Eigen dot product, and the blocks depend only on the shape and the thread count, so a run repeats
// bit for bit on the same machine. Host-checkable preconditions (null pointers, sizes,
// Hq % Hkv, even D for RoPE, k <= E: kd/model/op_check.hpp, shared with the CUDA backend; plus the values
// of ids and slots, which only the host backend can read) return a kd::status; nothing asserts or throws.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <limits>
#include <new>
#include <numeric>
#include <string>
#include <type_traits>
#include <vector>

#include <Eigen/Core>

#include <kd/core/parallel.hpp>
#include <kd/model/op_check.hpp>
#include <kd/model/ops.hpp>
#include <kd/model/parameters.hpp>
#include <kd/core/status.hpp>

namespace kd::model {

namespace detail {

struct cpu_ops_prefix {
  static constexpr const char* value = "cpu_ops::";
};
using cpu_op_check = basic_op_check<cpu_ops_prefix>;


}  // namespace detail

template <class Real>
class cpu_ops {
  static_assert(std::is_same_v<Real, double> || std::is_same_v<Real, float>, "cpu_ops<Real>: Real is double or float");
  using T = Real;
  using A = Real;
  using i64 = std::int64_t;

 public:
  using value_type = Real;
  using acc_type = Real;  // double for the fp64 reference, float for cpu_ops<float>
  template <class U>
  using buffer = std::vector<U>;

  static const char* name() { return "cpu"; }
  // The reference runs any architecture (its limits are the host's memory).
  static status can_implement(const arch& /*a*/) { return {}; }

  // Zero-filled; empty when the allocation fails (library code does not throw).
  template <class U>
  buffer<U> alloc(std::size_t n) {
    try {
      return buffer<U>(n);
    } catch (const std::bad_alloc&) {
      return {};
    } catch (const std::length_error&) {
      return {};
    }
  }

  // ---------------------------------------------------------------------------------------------
  // memory (host to host: upload and download are copies)
  // ---------------------------------------------------------------------------------------------
  template <class U>
  status upload(const U* host, std::size_t n, U* dst) {
    detail::cpu_op_check c("upload");
    KD_TRY(detail::upload_args(c, host, n, dst).done());
    return copy_impl(host, dst, n);
  }
  template <class U>
  status download(const U* src, std::size_t n, U* host) {
    detail::cpu_op_check c("download");
    KD_TRY(detail::download_args(c, src, n, host).done());
    return copy_impl(src, host, n);
  }
  template <class U>
  status copy(const U* src, U* dst, std::size_t n) {
    detail::cpu_op_check c("copy");
    KD_TRY(detail::copy_args(c, src, dst, n).done());
    return copy_impl(src, dst, n);
  }
  template <class U>
  status fill_zero(U* p, std::size_t n) {
    detail::cpu_op_check c("fill_zero");
    KD_TRY(detail::fill_zero_args(c, p, n).done());
    std::fill_n(p, n, U{});
    return {};
  }
  // dst[r, 0:cols] = src[r, 0:cols] for rows r with row strides src_ld / dst_ld (a column slice of a matrix).
  status copy_rows(const T* src, i64 src_ld, T* dst, i64 dst_ld, i64 rows, i64 cols) {
    detail::cpu_op_check c("copy_rows");
    KD_TRY(detail::rows_shape(c, src, src_ld, dst, dst_ld, rows, cols).done());
    for (i64 r = 0; r < rows; ++r) std::copy_n(src + r * src_ld, cols, dst + r * dst_ld);
    return {};
  }
  status add(T* y, const T* x, std::size_t n) {
    detail::cpu_op_check c("add");
    KD_TRY(detail::add_args(c, y, x, n).done());
    for (std::size_t i = 0; i < n; ++i) y[i] += x[i];
    return {};
  }

  // ---------------------------------------------------------------------------------------------
  // dense
  // ---------------------------------------------------------------------------------------------
  // y[M,N] (+)= x[M,K] w[N,K]^T
  status linear(const T* x, const T* w, T* y, i64 M, i64 N, i64 K, bool accumulate) {
    detail::cpu_op_check c("linear");
    KD_TRY(detail::linear_args(c, x, w, y, M, N, K).done());
    // Blocks of output columns (weight rows): a 152k-row head splits evenly.
    ::kd::parallel_blocks(N, 2.0 * M * N * K, [&](i64 n0, i64 n1) {
      auto Y = map(y, M, N).middleCols(n0, n1 - n0);
      const auto W = cmap(w, N, K).middleRows(n0, n1 - n0);
      if (accumulate)
        Y.noalias() += cmap(x, M, K) * W.transpose();
      else
        Y.noalias() = cmap(x, M, K) * W.transpose();
    });
    return {};
  }

  // dx[M,K] (+)= dy[M,N] w[N,K]
  status linear_dx(const T* dy, const T* w, T* dx, i64 M, i64 N, i64 K, bool accumulate) {
    detail::cpu_op_check c("linear_dx");
    KD_TRY(detail::linear_dx_args(c, dy, w, dx, M, N, K).done());
    ::kd::parallel_blocks(M, 2.0 * M * N * K, [&](i64 m0, i64 m1) {
      auto DX = map(dx, M, K).middleRows(m0, m1 - m0);
      const auto DY = cmap(dy, M, N).middleRows(m0, m1 - m0);
      if (accumulate)
        DX.noalias() += DY * cmap(w, N, K);
      else
        DX.noalias() = DY * cmap(w, N, K);
    });
    return {};
  }

  // dw[N,K] (+)= dy[M,N]^T x[M,K]
  status linear_dw(const T* dy, const T* x, T* dw, i64 M, i64 N, i64 K, bool accumulate = true) {
    detail::cpu_op_check c("linear_dw");
    KD_TRY(detail::linear_dw_args(c, dy, x, dw, M, N, K).done());
    ::kd::parallel_blocks(N, 2.0 * M * N * K, [&](i64 n0, i64 n1) {
      auto DW = map(dw, N, K).middleRows(n0, n1 - n0);
      const auto DY = cmap(dy, M, N).middleCols(n0, n1 - n0);
      if (accumulate)
        DW.noalias() += DY.transpose() * cmap(x, M, K);
      else
        DW.noalias() = DY.transpose() * cmap(x, M, K);
    });
    return {};
  }

  // QK norm then RoPE: the composition (the CUDA backend fuses it).
  // A device backend caches the RoPE (cos, sin) table of pos here; the reference computes it per op.
  status rope_cache(const index_t* pos, i64 tokens, i64 D, double theta) {
    detail::cpu_op_check c("rope_cache");
    return detail::rope_cache_args(c, pos, tokens, D, theta).done();
  }

  // x_ld (forward) / ld (backward, for x and dx): token stride of x / dx when they are column slices of a
  // wider matrix (0: heads * D), as the q and k parts of the fused QKV projection and its gradient are.
  status rmsnorm_rope(const T* x, const T* w, T* y, A* rstd, const index_t* pos, i64 tokens, i64 heads, i64 D,
                      double eps, double theta, i64 x_ld = 0) {
    detail::cpu_op_check c("rmsnorm_rope");
    KD_TRY(detail::rmsnorm_rope_args(c, x, w, y, rstd, pos, tokens, heads, D, eps, theta, x_ld).done());
    if (x_ld != 0 && x_ld != heads * D) {
      KD_TRY(copy_rows(x, x_ld, y, heads * D, tokens, heads * D));
      x = y;  // rmsnorm works row by row, so in place is fine
    }
    KD_TRY(rmsnorm(x, w, y, rstd, tokens * heads, D, eps));
    return rope(y, pos, tokens, heads, D, theta, false);
  }
  status rmsnorm_rope_bwd(const T* x, const T* w, const A* rstd, const index_t* pos, const T* dy, T* dx, T* dw,
                          i64 tokens, i64 heads, i64 D, double theta, i64 ld = 0, bool accumulate_dw = true) {
    detail::cpu_op_check c("rmsnorm_rope_bwd");
    KD_TRY(detail::rmsnorm_rope_bwd_args(c, x, w, rstd, pos, dy, dx, dw, tokens, heads, D, theta, ld, accumulate_dw).done());
    std::vector<T> g(dy, dy + tokens * heads * D);
    KD_TRY(rope(g.data(), pos, tokens, heads, D, theta, true));
    if (ld == 0 || ld == heads * D)
      return rmsnorm_bwd(x, w, rstd, g.data(), dx, dw, tokens * heads, D, false, accumulate_dw);
    std::vector<T> xs(g.size()), d(g.size());
    KD_TRY(copy_rows(x, ld, xs.data(), heads * D, tokens, heads * D));
    KD_TRY(rmsnorm_bwd(xs.data(), w, rstd, g.data(), d.data(), dw, tokens * heads, D, false, accumulate_dw));
    return copy_rows(d.data(), heads * D, dx, ld, tokens, heads * D);
  }

  // The experts' GEMMs: group g is counts[g] consecutive rows against weight w + g*N*K.
  status grouped_linear(const T* x, const T* w, T* y, const std::int64_t* counts, i64 G, i64 N, i64 K,
                        bool accumulate) {
    detail::cpu_op_check args("grouped_linear");
    KD_TRY(detail::grouped_linear_args(args, x, w, y, counts, G, N, K).done());
    return for_groups(counts, G, [&](i64 g, i64 r, i64 c) {
      return linear(x + r * K, w + g * N * K, y + r * N, c, N, K, accumulate);
    });
  }
  status grouped_linear_dx(const T* dy, const T* w, T* dx, const std::int64_t* counts, i64 G, i64 N, i64 K,
                           bool accumulate) {
    detail::cpu_op_check args("grouped_linear_dx");
    KD_TRY(detail::grouped_linear_dx_args(args, dy, w, dx, counts, G, N, K).done());
    return for_groups(counts, G, [&](i64 g, i64 r, i64 c) {
      return linear_dx(dy + r * N, w + g * N * K, dx + r * K, c, N, K, accumulate);
    });
  }
  // Without accumulate every group's dw is overwritten, an empty group's with zeros.
  status grouped_linear_dw(const T* dy, const T* x, T* dw, const std::int64_t* counts, i64 G, i64 N, i64 K,
                           bool accumulate = true) {
    detail::cpu_op_check args("grouped_linear_dw");
    KD_TRY(detail::grouped_linear_dw_args(args, dy, x, dw, counts, G, N, K).done());
    if (!accumulate)
      for (i64 g = 0; g < G; ++g)
        if (counts[g] == 0) KD_TRY(fill_zero(dw + g * N * K, static_cast<std::size_t>(N * K)));
    return for_groups(counts, G, [&](i64 g, i64 r, i64 c) {
      return linear_dw(dy + r * N, x + r * K, dw + g * N * K, c, N, K, accumulate);
    });
  }

  // out[i] = table[ids[i]]. ops.hpp leaves id checks to the caller; the host can afford them here.
  status embedding(const index_t* ids, const T* table, T* out, i64 n, i64 V, i64 H) {
    detail::cpu_op_check c("embedding");
    KD_TRY(detail::embedding_args(c, ids, table, out, n, V, H).in_range(ids, n, V, "ids").done());
    for (i64 i = 0; i < n; ++i) std::copy_n(table + ids[i] * H, H, out + i * H);
    return {};
  }

  // dtable[ids[i]] += dout[i]
  status embedding_dw(const index_t* ids, const T* dout, T* dtable, i64 n, i64 V, i64 H) {
    detail::cpu_op_check c("embedding_dw");
    KD_TRY(detail::embedding_dw_args(c, ids, dout, dtable, n, V, H).in_range(ids, n, V, "ids").done());
    for (i64 i = 0; i < n; ++i) {
      T* row = dtable + ids[i] * H;
      const T* g = dout + i * H;
      for (i64 h = 0; h < H; ++h) row[h] += g[h];
    }
    return {};
  }

  // y = x * rstd * w, rstd = 1 / sqrt(mean(x^2) + eps) per row.
  // x_copy (optional): also receives x (the residual stream's copy a layer adds its branch to).
  status rmsnorm(const T* x, const T* w, T* y, A* rstd, i64 R, i64 D, double eps, T* x_copy = nullptr) {
    detail::cpu_op_check c("rmsnorm");
    KD_TRY(detail::rmsnorm_args(c, x, w, y, rstd, R, D, eps).done());
    if (x_copy != nullptr) KD_TRY(copy(x, x_copy, static_cast<std::size_t>(R * D)));  // before y may overwrite x
    for (i64 r = 0; r < R; ++r) {
      const T* xr = x + r * D;
      A ss = 0;
      for (i64 i = 0; i < D; ++i) ss += A(xr[i]) * A(xr[i]);
      const A rs = A(1) / std::sqrt(ss / A(D) + A(eps));
      rstd[r] = rs;
      for (i64 i = 0; i < D; ++i) y[r * D + i] = T(A(xr[i]) * rs * A(w[i]));
    }
    return {};
  }

  // With g_i = dy_i w_i: dx_j = rstd g_j - rstd^3 x_j / D * sum_i g_i x_i; dw_i += sum_rows dy_i x_i rstd.
  status rmsnorm_bwd(const T* x, const T* w, const A* rstd, const T* dy, T* dx, T* dw, i64 R, i64 D,
                     bool accumulate_dx, bool accumulate_dw = true) {
    detail::cpu_op_check c("rmsnorm_bwd");
    KD_TRY(detail::rmsnorm_bwd_args(c, x, w, rstd, dy, dx, dw, R, D, accumulate_dw).done());
    if (!accumulate_dw) std::fill_n(dw, D, T(0));
    for (i64 r = 0; r < R; ++r) {
      const T* xr = x + r * D;
      const T* dyr = dy + r * D;
      T* dxr = dx + r * D;
      const A rs = rstd[r];
      A dot = 0;
      for (i64 i = 0; i < D; ++i) dot += A(dyr[i]) * A(w[i]) * A(xr[i]);
      const A c = rs * rs * rs * dot / A(D);
      for (i64 i = 0; i < D; ++i) {
        const A g = rs * A(dyr[i]) * A(w[i]) - c * A(xr[i]);
        dxr[i] = accumulate_dx ? T(A(dxr[i]) + g) : T(g);
        dw[i] = T(A(dw[i]) + A(dyr[i]) * A(xr[i]) * rs);
      }
    }
    return {};
  }

  // HF rotate-half RoPE in place; inverse rotates by -angle, which is also the backward.
  status rope(T* x, const index_t* pos, i64 tokens, i64 heads, i64 D, double theta, bool inverse) {
    detail::cpu_op_check c("rope");
    KD_TRY(detail::rope_args(c, x, pos, tokens, heads, D, theta).done());
    const i64 half = D / 2;
    // inv_freq in double, then cast, as HF stores it in the model's float type.
    std::vector<A> inv_freq(static_cast<std::size_t>(half));
    for (i64 i = 0; i < half; ++i)
      inv_freq[static_cast<std::size_t>(i)] = A(std::pow(theta, -2.0 * double(i) / double(D)));
    std::vector<A> cs(static_cast<std::size_t>(half)), sn(static_cast<std::size_t>(half));
    for (i64 t = 0; t < tokens; ++t) {
      for (i64 i = 0; i < half; ++i) {
        const A angle = A(pos[t]) * inv_freq[static_cast<std::size_t>(i)];
        cs[static_cast<std::size_t>(i)] = std::cos(angle);
        sn[static_cast<std::size_t>(i)] = inverse ? -std::sin(angle) : std::sin(angle);
      }
      for (i64 h = 0; h < heads; ++h) {
        T* v = x + (t * heads + h) * D;
        for (i64 i = 0; i < half; ++i) {
          const A a = A(v[i]), b = A(v[i + half]);
          const A c = cs[static_cast<std::size_t>(i)], s = sn[static_cast<std::size_t>(i)];
          v[i] = T(a * c - b * s);
          v[i + half] = T(b * c + a * s);
        }
      }
    }
    return {};
  }

  // h = silu(g) * u with gu = [g | u] per row.
  status swiglu(const T* gu, T* h, i64 R, i64 I) {
    detail::cpu_op_check c("swiglu");
    KD_TRY(detail::swiglu_args(c, gu, h, R, I).done());
    for (i64 r = 0; r < R; ++r) {
      const T* g = gu + r * 2 * I;
      const T* u = g + I;
      for (i64 i = 0; i < I; ++i) {
        const A gv = A(g[i]);
        h[r * I + i] = T(gv * sigmoid(gv) * A(u[i]));
      }
    }
    return {};
  }

  // dgate = dh u silu'(g), silu'(g) = s (1 + g (1 - s)); dup = dh silu(g). dgu is overwritten.
  status swiglu_bwd(const T* gu, const T* dh, T* dgu, i64 R, i64 I) {
    detail::cpu_op_check c("swiglu_bwd");
    KD_TRY(detail::swiglu_bwd_args(c, gu, dh, dgu, R, I).done());
    for (i64 r = 0; r < R; ++r) {
      const T* g = gu + r * 2 * I;
      const T* u = g + I;
      T* dg = dgu + r * 2 * I;
      T* du = dg + I;
      for (i64 i = 0; i < I; ++i) {
        const A gv = A(g[i]), s = sigmoid(gv), d = A(dh[r * I + i]);
        dg[i] = T(d * A(u[i]) * s * (A(1) + gv * (A(1) - s)));
        du[i] = T(d * gv * s);
      }
    }
    return {};
  }

  // ---------------------------------------------------------------------------------------------
  // attention: one (sequence, q head) at a time through Eigen on strided views of the token-major
  // tensors; the full seq x seq score matrix is masked (twice the causal work, but GEMM speed).
  // ---------------------------------------------------------------------------------------------
  status attention(const T* q, const T* k, const T* v, T* o, A* lse, i64 batch, i64 seq, i64 Hq, i64 Hkv, i64 D,
                   double scale) {
    detail::cpu_op_check c("attention");
    KD_TRY(detail::attention_args(c, q, k, v, o, lse, batch, seq, Hq, Hkv, D, scale).done());
    const i64 group = Hq / Hkv;
    mat S(seq, seq);
    for (i64 b = 0; b < batch; ++b)
      for (i64 h = 0; h < Hq; ++h) {
        const i64 kvh = h / group;
        auto Q = head(q, b, h, seq, Hq, D);
        auto K = head(k, b, kvh, seq, Hkv, D);
        auto V = head(v, b, kvh, seq, Hkv, D);
        S.noalias() = Q * K.transpose();
        A* l = lse + (b * Hq + h) * seq;
        for (i64 i = 0; i < seq; ++i) {
          A m = -std::numeric_limits<A>::infinity();
          for (i64 j = 0; j <= i; ++j) m = std::max(m, A(scale) * S(i, j));
          A sum = 0;
          for (i64 j = 0; j <= i; ++j) sum += std::exp(A(scale) * S(i, j) - m);
          l[i] = m + std::log(sum);
          for (i64 j = 0; j <= i; ++j) S(i, j) = std::exp(A(scale) * S(i, j) - l[i]);
          for (i64 j = i + 1; j < seq; ++j) S(i, j) = 0;
        }
        head(o, b, h, seq, Hq, D).noalias() = S * V;
      }
    return {};
  }

  // Flash-style backward from lse: P = exp(scale QK^T - lse), dP = dO V^T, dS = P (dP - rowsum(dO o)),
  // dq = scale dS K, dk = scale dS^T Q, dv = P^T dO (dk, dv summed over the q heads of a KV group).
  status attention_bwd(const T* q, const T* k, const T* v, const T* o, const A* lse, const T* dout, T* dq, T* dk,
                       T* dv, i64 batch, i64 seq, i64 Hq, i64 Hkv, i64 D, double scale) {
    detail::cpu_op_check c("attention_bwd");
    KD_TRY(detail::attention_bwd_args(c, q, k, v, o, lse, dout, dq, dk, dv, batch, seq, Hq, Hkv, D, scale).done());
    const i64 tokens = batch * seq, nkv = tokens * Hkv * D;
    std::fill_n(dk, nkv, T(0));
    std::fill_n(dv, nkv, T(0));
    const i64 group = Hq / Hkv;
    mat P(seq, seq), dS(seq, seq);
    for (i64 b = 0; b < batch; ++b)
      for (i64 h = 0; h < Hq; ++h) {
        const i64 kvh = h / group;
        auto Q = head(q, b, h, seq, Hq, D);
        auto K = head(k, b, kvh, seq, Hkv, D);
        auto V = head(v, b, kvh, seq, Hkv, D);
        auto O = head(o, b, h, seq, Hq, D);
        auto dO = head(dout, b, h, seq, Hq, D);
        recompute_probs(Q, K, lse + (b * Hq + h) * seq, A(scale), P);
        dS.noalias() = dO * V.transpose();
        for (i64 i = 0; i < seq; ++i) {
          const A delta = dO.row(i).dot(O.row(i));
          for (i64 j = 0; j < seq; ++j) dS(i, j) = P(i, j) * (dS(i, j) - delta);
        }
        head(dq, b, h, seq, Hq, D).noalias() = A(scale) * dS * K;
        head(dk, b, kvh, seq, Hkv, D).noalias() += A(scale) * dS.transpose() * Q;
        head(dv, b, kvh, seq, Hkv, D).noalias() += P.transpose() * dO;
      }
    return {};
  }

  // probs[b, h, i, j] = exp(scale q_i k_j - lse[b, h, i]) for j <= i, zero above the diagonal.
  status attention_probs(const T* q, const T* k, const A* lse, T* probs, i64 batch, i64 seq, i64 Hq, i64 Hkv, i64 D,
                         double scale) {
    detail::cpu_op_check c("attention_probs");
    KD_TRY(detail::attention_probs_args(c, q, k, lse, probs, batch, seq, Hq, Hkv, D, scale).done());
    const i64 group = Hq / Hkv;
    for (i64 b = 0; b < batch; ++b)
      for (i64 h = 0; h < Hq; ++h) {
        mat_map P(probs + (b * Hq + h) * seq * seq, seq, seq);
        recompute_probs(head(q, b, h, seq, Hq, D), head(k, b, h / group, seq, Hkv, D), lse + (b * Hq + h) * seq,
                        A(scale), P);
      }
    return {};
  }

  // Softmax backward of given probs: dS = P (dP - rowsum(dP P)); dq += scale dS k, dk += scale dS^T q.
  status attention_probs_bwd(const T* q, const T* k, const T* probs, const T* dprobs, T* dq, T* dk, i64 batch, i64 seq,
                             i64 Hq, i64 Hkv, i64 D, double scale) {
    detail::cpu_op_check c("attention_probs_bwd");
    KD_TRY(detail::attention_probs_bwd_args(c, q, k, probs, dprobs, dq, dk, batch, seq, Hq, Hkv, D, scale).done());
    const i64 group = Hq / Hkv;
    mat dS(seq, seq);
    for (i64 b = 0; b < batch; ++b)
      for (i64 h = 0; h < Hq; ++h) {
        const i64 kvh = h / group;
        const i64 off = (b * Hq + h) * seq * seq;
        const_mat_map P(probs + off, seq, seq), dP(dprobs + off, seq, seq);
        for (i64 i = 0; i < seq; ++i) {
          const A delta = P.row(i).dot(dP.row(i));
          for (i64 j = 0; j < seq; ++j) dS(i, j) = P(i, j) * (dP(i, j) - delta);
        }
        head(dq, b, h, seq, Hq, D).noalias() += A(scale) * dS * head(k, b, kvh, seq, Hkv, D);
        head(dk, b, kvh, seq, Hkv, D).noalias() += A(scale) * dS.transpose() * head(q, b, h, seq, Hq, D);
      }
    return {};
  }

  // ---------------------------------------------------------------------------------------------
  // mixture of experts
  // ---------------------------------------------------------------------------------------------
  status router(const T* logits, A* probs, index_t* topk_idx, A* topk_w, i64 N, i64 E, i64 k, bool renorm) {
    detail::cpu_op_check c("router");
    KD_TRY(detail::router_args(c, logits, probs, topk_idx, topk_w, N, E, k).done());
    std::vector<index_t> order(static_cast<std::size_t>(E));
    for (i64 t = 0; t < N; ++t) {
      const T* z = logits + t * E;
      A* p = probs + t * E;
      A m = -std::numeric_limits<A>::infinity();
      for (i64 e = 0; e < E; ++e) m = std::max(m, A(z[e]));
      A sum = 0;
      for (i64 e = 0; e < E; ++e) sum += (p[e] = std::exp(A(z[e]) - m));
      for (i64 e = 0; e < E; ++e) p[e] /= sum;
      // Descending probability, ties to the lower expert index.
      std::iota(order.begin(), order.end(), index_t(0));
      std::partial_sort(order.begin(), order.begin() + k, order.end(),
                        [p](index_t a, index_t b) { return p[a] > p[b] || (p[a] == p[b] && a < b); });
      A wsum = 0;
      for (i64 j = 0; j < k; ++j) {
        topk_idx[t * k + j] = order[static_cast<std::size_t>(j)];
        wsum += (topk_w[t * k + j] = p[order[static_cast<std::size_t>(j)]]);
      }
      if (renorm)
        for (i64 j = 0; j < k; ++j) topk_w[t * k + j] /= wsum;
    }
    return {};
  }

  // dlogits (overwritten) from dtopk_w through renorm (w_j = p_j / S: dp_j = (dw_j - sum_l dw_l w_l) / S),
  // the selection (a gather) and the softmax (dz = p (dp - sum p dp)); dprobs_extra adds to dp on all E.
  status router_bwd(const A* probs, const index_t* topk_idx, const A* dtopk_w, const A* dprobs_extra, T* dlogits, i64 N,
                    i64 E, i64 k, bool renorm) {
    detail::cpu_op_check c("router_bwd");
    KD_TRY(detail::router_bwd_args(c, probs, topk_idx, dtopk_w, dlogits, N, E, k).in_range(topk_idx, N * k, E, "topk_idx").done());
    std::vector<A> dp(static_cast<std::size_t>(E));
    for (i64 t = 0; t < N; ++t) {
      const A* p = probs + t * E;
      const index_t* idx = topk_idx + t * k;
      const A* dw = dtopk_w + t * k;
      for (i64 e = 0; e < E; ++e) dp[static_cast<std::size_t>(e)] = dprobs_extra ? dprobs_extra[t * E + e] : A(0);
      if (renorm) {
        A S = 0, dot = 0;
        for (i64 j = 0; j < k; ++j) S += p[idx[j]];
        for (i64 j = 0; j < k; ++j) dot += dw[j] * p[idx[j]] / S;
        for (i64 j = 0; j < k; ++j) dp[static_cast<std::size_t>(idx[j])] += (dw[j] - dot) / S;
      } else {
        for (i64 j = 0; j < k; ++j) dp[static_cast<std::size_t>(idx[j])] += dw[j];
      }
      A pdp = 0;
      for (i64 e = 0; e < E; ++e) pdp += p[e] * dp[static_cast<std::size_t>(e)];
      for (i64 e = 0; e < E; ++e) dlogits[t * E + e] = T(p[e] * (dp[static_cast<std::size_t>(e)] - pdp));
    }
    return {};
  }

  // The counts of moe_dispatch are on the host on its return here; a device backend may deliver them later.
  status sync_counts() { return {}; }

  // Counting sort of the N*k (token, choice) pairs by expert: stable, so tokens ascend inside an expert.
  status moe_dispatch(const index_t* topk_idx, i64 N, i64 E, i64 k, index_t* slot_token, index_t* token_slot, std::int64_t* counts_host) {
    detail::cpu_op_check c("moe_dispatch");
    KD_TRY(detail::moe_dispatch_args(c, topk_idx, N, E, k, slot_token, token_slot, counts_host)
               .in_range(topk_idx, N * k, E, "topk_idx")
               .done());
    std::fill_n(counts_host, E, std::int64_t{0});
    for (i64 s = 0; s < N * k; ++s) ++counts_host[topk_idx[s]];
    std::vector<i64> next(static_cast<std::size_t>(E));
    for (i64 e = 1; e < E; ++e)
      next[static_cast<std::size_t>(e)] = next[static_cast<std::size_t>(e - 1)] + counts_host[e - 1];
    for (i64 t = 0; t < N; ++t)
      for (i64 j = 0; j < k; ++j) {
        const i64 slot = next[static_cast<std::size_t>(topk_idx[t * k + j])]++;
        slot_token[slot] = index_t(t);
        token_slot[t * k + j] = index_t(slot);
      }
    return {};
  }

  // out[s] = x[rows[s]]; the row count of x is unknown here, so only negative rows are caught.
  status gather_rows(const T* x, const index_t* rows, T* out, i64 S, i64 H) {
    detail::cpu_op_check c("gather_rows");
    KD_TRY(detail::gather_rows_args(c, x, rows, out, S, H).done());
    for (i64 s = 0; s < S; ++s)
      if (rows[s] < 0) return {errc::out_of_range, "cpu_ops::gather_rows: rows[" + std::to_string(s) + "] is negative"};
    for (i64 s = 0; s < S; ++s) std::copy_n(x + i64(rows[s]) * H, H, out + s * H);
    return {};
  }

  // out[t] = residual[t] + sum_j topk_w[t, j] y[token_slot[t*k + j]] (residual nullable, or out itself)
  status moe_combine(const T* y, const index_t* token_slot, const A* topk_w, const T* residual, T* out, i64 N, i64 k,
                     i64 H) {
    detail::cpu_op_check c("moe_combine");
    KD_TRY(detail::moe_combine_args(c, y, token_slot, topk_w, out, N, k, H).in_range(token_slot, N * k, N * k, "token_slot").done());
    std::vector<A> acc(static_cast<std::size_t>(H));
    for (i64 t = 0; t < N; ++t) {
      T* ot = out + t * H;
      for (i64 h = 0; h < H; ++h) acc[static_cast<std::size_t>(h)] = residual != nullptr ? A(residual[t * H + h]) : A(0);
      for (i64 j = 0; j < k; ++j) {
        const T* yr = y + i64(token_slot[t * k + j]) * H;
        const A w = topk_w[t * k + j];
        for (i64 h = 0; h < H; ++h) acc[static_cast<std::size_t>(h)] += w * A(yr[h]);
      }
      for (i64 h = 0; h < H; ++h) ot[h] = T(acc[static_cast<std::size_t>(h)]);
    }
    return {};
  }

  // dy[slot(t, j)] = topk_w[t, j] dout[t] (dy overwritten), dtopk_w[t, j] = dout[t] . y[slot(t, j)].
  status moe_combine_bwd(const T* y, const index_t* token_slot, const A* topk_w, const T* dout, T* dy, A* dtopk_w, i64 N,
                         i64 k, i64 H) {
    detail::cpu_op_check c("moe_combine_bwd");
    KD_TRY(detail::moe_combine_bwd_args(c, y, token_slot, topk_w, dout, dy, dtopk_w, N, k, H)
               .in_range(token_slot, N * k, N * k, "token_slot")
               .done());
    // Zero first and add, so a slot no choice maps to still ends up defined.
    std::fill_n(dy, N * k * H, T(0));
    for (i64 t = 0; t < N; ++t) {
      const T* g = dout + t * H;
      for (i64 j = 0; j < k; ++j) {
        const i64 slot = token_slot[t * k + j];
        const T* yr = y + slot * H;
        T* dyr = dy + slot * H;
        const A w = topk_w[t * k + j];
        A dot = 0;
        for (i64 h = 0; h < H; ++h) {
          dot += A(g[h]) * A(yr[h]);
          dyr[h] = T(A(dyr[h]) + w * A(g[h]));
        }
        dtopk_w[t * k + j] = dot;
      }
    }
    return {};
  }

  // dx[t] (+)= sum_j dy_slots[token_slot[t*k + j]] (+ dlogits[t] w_router when E > 0: the router's input
  // gradient, linear_dx(dlogits, w_router), fused)
  status moe_gather_add(const T* dy_slots, const index_t* token_slot, T* dx, i64 N, i64 k, i64 H, bool accumulate,
                        const T* dlogits = nullptr, const T* w_router = nullptr, i64 E = 0) {
    detail::cpu_op_check c("moe_gather_add");
    KD_TRY(detail::moe_gather_add_args(c, dy_slots, token_slot, dx, N, k, H, dlogits, w_router, E)
               .in_range(token_slot, N * k, N * k, "token_slot")
               .done());
    for (i64 t = 0; t < N; ++t) {
      T* d = dx + t * H;
      if (!accumulate) std::fill_n(d, H, T(0));
      for (i64 j = 0; j < k; ++j) {
        const T* s = dy_slots + i64(token_slot[t * k + j]) * H;
        for (i64 h = 0; h < H; ++h) d[h] += s[h];
      }
      for (i64 e = 0; e < E; ++e)
        for (i64 h = 0; h < H; ++h) d[h] += dlogits[t * E + e] * w_router[e * H + h];
    }
    return {};
  }

 private:
  // f(group, first_row, rows) for every non-empty group, in order.
  template <class F>
  static status for_groups(const std::int64_t* counts, i64 G, F&& f) {
    i64 r = 0;
    for (i64 g = 0; g < G; ++g) {
      if (counts[g] > 0) KD_TRY(f(g, r, counts[g]));
      r += counts[g];
    }
    return {};
  }

  using mat = Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
  using mat_map = Eigen::Map<mat>;
  using const_mat_map = Eigen::Map<const mat>;
  using stride = Eigen::OuterStride<>;

  static mat_map map(T* p, i64 r, i64 c) { return mat_map(p, r, c); }
  static const_mat_map cmap(const T* p, i64 r, i64 c) { return const_mat_map(p, r, c); }

  // Head h of sequence b in a token-major [batch*seq, heads, D] tensor: a seq x D view, row stride heads*D.
  static Eigen::Map<mat, 0, stride> head(T* p, i64 b, i64 h, i64 seq, i64 heads, i64 D) {
    return Eigen::Map<mat, 0, stride>(p + (b * seq * heads + h) * D, seq, D, stride(heads * D));
  }
  static Eigen::Map<const mat, 0, stride> head(const T* p, i64 b, i64 h, i64 seq, i64 heads, i64 D) {
    return Eigen::Map<const mat, 0, stride>(p + (b * seq * heads + h) * D, seq, D, stride(heads * D));
  }

  template <class QM, class KM, class PM>
  static void recompute_probs(const QM& Q, const KM& K, const A* lse, A scale, PM& P) {
    P.noalias() = Q * K.transpose();
    const i64 seq = P.rows();
    for (i64 i = 0; i < seq; ++i) {
      for (i64 j = 0; j <= i; ++j) P(i, j) = std::exp(scale * P(i, j) - lse[i]);
      for (i64 j = i + 1; j < seq; ++j) P(i, j) = 0;
    }
  }

  static A sigmoid(A x) { return A(1) / (A(1) + std::exp(-x)); }

  // After the op's checks passed.
  template <class U>
  static status copy_impl(const U* src, U* dst, std::size_t n) {
    if (n > 0 && src != dst) std::memmove(static_cast<void*>(dst), static_cast<const void*>(src), n * sizeof(U));
    return {};
  }
};

static_assert(ModelBackend<cpu_ops<double>>);
static_assert(ModelBackend<cpu_ops<float>>);

}  // namespace kd::model
