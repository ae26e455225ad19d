// Tests for kd/model/ops_cpu.hpp: every backward op of cpu_ops<double> against central finite differences
// of its forward, known values (RoPE at position 0, one-token attention, causality, dispatch grouping),
// accumulate flags, error codes, and cpu_ops<float> against cpu_ops<double>.
#include <doctest/doctest.h>

#include <kd/model/ops_cpu.hpp>

#include "test_util.hpp"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <functional>
#include <numeric>
#include <vector>

namespace {

using kd::errc;
using kd::model::index_t;
using ops_t = kd::model::cpu_ops<double>;
using vec = std::vector<double>;
using ids = std::vector<index_t>;

constexpr double fd_h = 1e-6;
constexpr double fd_tol = 1e-6;

double dot(const vec& a, const vec& b) {
  double s = 0;
  for (std::size_t i = 0; i < a.size(); ++i) s += a[i] * b[i];
  return s;
}

// Checks analytic against the central-difference gradient of f with respect to x (f reads x).
void check_gradient(const std::function<double()>& f, vec& x, const vec& analytic, const char* what) {
  INFO(what);
  const vec numeric = kdtest::numeric_gradient(f, x, fd_h);
  CHECK(kdtest::rel_error(analytic, numeric) < fd_tol);
}

vec plus(const vec& a, const vec& b) {
  vec r(a.size());
  for (std::size_t i = 0; i < a.size(); ++i) r[i] = a[i] + b[i];
  return r;
}

}  // namespace

TEST_CASE("cpu_ops: buffers and memory ops") {
  ops_t ops;
  CHECK(std::string(ops_t::name()) == "cpu");
  auto buf = ops.alloc<double>(7);
  REQUIRE(buf.size() == 7);
  CHECK(std::all_of(buf.begin(), buf.end(), [](double v) { return v == 0.0; }));
  vec host{1, 2, 3, 4, 5, 6, 7}, back(7);
  REQUIRE(ops.upload(host.data(), 7, buf.data()).ok());
  REQUIRE(ops.add(buf.data(), host.data(), 7).ok());
  REQUIRE(ops.download(buf.data(), 7, back.data()).ok());
  CHECK(back == vec{2, 4, 6, 8, 10, 12, 14});
  REQUIRE(ops.copy(host.data(), back.data(), 7).ok());
  CHECK(back == host);
  REQUIRE(ops.fill_zero(back.data(), 7).ok());
  CHECK(back == vec(7, 0.0));
  CHECK(ops.copy<double>(nullptr, back.data(), 7).code() == errc::invalid_argument);
  CHECK(ops.copy<double>(nullptr, nullptr, 0).ok());  // empty tensors may be null

  // copy_rows: a column slice in, a column slice out; the other columns untouched.
  const vec m{0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11};  // 3 x 4
  vec d(10, -1.0);                                    // 2 rows of stride 5 hold columns 1..2
  REQUIRE(ops.copy_rows(m.data() + 1, 4, d.data() + 2, 5, 2, 2).ok());
  CHECK(d == vec{-1, -1, 1, 2, -1, -1, -1, 5, 6, -1});
  CHECK(ops.copy_rows(m.data(), 1, d.data(), 5, 2, 2).code() == errc::invalid_argument);  // stride below cols
  // Through a volatile pointer: with a literal null, GCC 12's -Warray-bounds flags the copy that the check
  // makes unreachable.
  double* volatile no_dst = nullptr;
  CHECK(ops.copy_rows(m.data(), 4, no_dst, 5, 2, 2).code() == errc::invalid_argument);
  CHECK(ops.copy_rows(nullptr, 4, nullptr, 4, 0, 4).ok());
}

TEST_CASE("cpu_ops: linear, linear_dx, linear_dw") {
  ops_t ops;
  auto g = kdtest::rng(11);
  const std::int64_t M = 5, N = 4, K = 6;
  vec x = kdtest::normal(M * K, g), w = kdtest::normal(N * K, g), R = kdtest::normal(M * N, g);
  vec y(M * N);
  REQUIRE(ops.linear(x.data(), w.data(), y.data(), M, N, K, false).ok());
  for (int m = 0; m < M; ++m)
    for (int n = 0; n < N; ++n) {
      double s = 0;
      for (int kk = 0; kk < K; ++kk) s += x[m * K + kk] * w[n * K + kk];
      CHECK(y[m * N + n] == doctest::Approx(s).epsilon(1e-14));
    }

  auto loss = [&] {
    vec yy(M * N);
    REQUIRE(ops.linear(x.data(), w.data(), yy.data(), M, N, K, false).ok());
    return dot(yy, R);
  };
  vec dx(M * K, 0.0), dw(N * K, 0.0);
  REQUIRE(ops.linear_dx(R.data(), w.data(), dx.data(), M, N, K, false).ok());
  REQUIRE(ops.linear_dw(R.data(), x.data(), dw.data(), M, N, K).ok());
  check_gradient(loss, x, dx, "dx");
  check_gradient(loss, w, dw, "dw");

  SUBCASE("accumulate flags") {
    vec y0 = kdtest::normal(M * N, g), ya = y0;
    REQUIRE(ops.linear(x.data(), w.data(), ya.data(), M, N, K, true).ok());
    CHECK(kdtest::rel_error(ya, plus(y0, y)) < 1e-14);
    vec dx0 = kdtest::normal(M * K, g), dxa = dx0;
    REQUIRE(ops.linear_dx(R.data(), w.data(), dxa.data(), M, N, K, true).ok());
    CHECK(kdtest::rel_error(dxa, plus(dx0, dx)) < 1e-14);
    vec dxo = kdtest::normal(M * K, g);  // overwritten, whatever it held
    REQUIRE(ops.linear_dx(R.data(), w.data(), dxo.data(), M, N, K, false).ok());
    CHECK(kdtest::rel_error(dxo, dx) < 1e-15);
    vec dw2 = dw;  // weight gradients always accumulate
    REQUIRE(ops.linear_dw(R.data(), x.data(), dw2.data(), M, N, K).ok());
    CHECK(kdtest::rel_error(dw2, plus(dw, dw)) < 1e-14);
  }
  SUBCASE("errors") {
    CHECK(ops.linear(x.data(), nullptr, y.data(), M, N, K, false).code() == errc::invalid_argument);
    CHECK(ops.linear(x.data(), w.data(), y.data(), -1, N, K, false).code() == errc::invalid_argument);
  }
}

TEST_CASE("cpu_ops: embedding and embedding_dw") {
  ops_t ops;
  auto g = kdtest::rng(12);
  const std::int64_t V = 5, H = 3, n = 6;
  ids tok{4, 0, 2, 4, 1, 4};  // repeated ids accumulate
  vec table = kdtest::normal(V * H, g), R = kdtest::normal(n * H, g), out(n * H);
  REQUIRE(ops.embedding(tok.data(), table.data(), out.data(), n, V, H).ok());
  for (int i = 0; i < n; ++i)
    for (int h = 0; h < H; ++h) CHECK(out[i * H + h] == table[tok[i] * H + h]);
  vec dtable(V * H, 0.0);
  REQUIRE(ops.embedding_dw(tok.data(), R.data(), dtable.data(), n, V, H).ok());
  auto loss = [&] {
    vec o(n * H);
    REQUIRE(ops.embedding(tok.data(), table.data(), o.data(), n, V, H).ok());
    return dot(o, R);
  };
  check_gradient(loss, table, dtable, "dtable");
  ids bad{0, 5};
  CHECK(ops.embedding(bad.data(), table.data(), out.data(), 2, V, H).code() == errc::out_of_range);
}

TEST_CASE("cpu_ops: rmsnorm forward, backward and accumulate_dx") {
  ops_t ops;
  auto g = kdtest::rng(13);
  const std::int64_t R = 4, D = 7;
  const double eps = 1e-5;
  vec x = kdtest::normal(R * D, g), w = kdtest::normal(D, g, 1.0, 0.3), dy = kdtest::normal(R * D, g);
  vec y(R * D), rstd(R), xc(R * D);
  REQUIRE(ops.rmsnorm(x.data(), w.data(), y.data(), rstd.data(), R, D, eps, xc.data()).ok());
  CHECK(xc == x);
  for (int r = 0; r < R; ++r) {
    double ss = 0;
    for (int i = 0; i < D; ++i) ss += x[r * D + i] * x[r * D + i];
    const double rs = 1.0 / std::sqrt(ss / D + eps);
    CHECK(rstd[r] == doctest::Approx(rs).epsilon(1e-14));
    CHECK(y[r * D + 2] == doctest::Approx(x[r * D + 2] * rs * w[2]).epsilon(1e-14));
  }
  auto loss = [&] {
    vec yy(R * D), rs(R);
    REQUIRE(ops.rmsnorm(x.data(), w.data(), yy.data(), rs.data(), R, D, eps).ok());
    return dot(yy, dy);
  };
  vec dw0 = kdtest::normal(D, g), dw = dw0, dx(R * D);
  REQUIRE(ops.rmsnorm_bwd(x.data(), w.data(), rstd.data(), dy.data(), dx.data(), dw.data(), R, D, false).ok());
  vec dw_only(D);
  for (int i = 0; i < D; ++i) dw_only[i] = dw[i] - dw0[i];  // dw accumulates
  check_gradient(loss, x, dx, "dx");
  check_gradient(loss, w, dw_only, "dw");

  vec dx0 = kdtest::normal(R * D, g), dxa = dx0, dw_scratch(D, 0.0);
  REQUIRE(ops.rmsnorm_bwd(x.data(), w.data(), rstd.data(), dy.data(), dxa.data(), dw_scratch.data(), R, D, true).ok());
  CHECK(kdtest::rel_error(dxa, plus(dx0, dx)) < 1e-14);
  CHECK(ops.rmsnorm(x.data(), w.data(), y.data(), rstd.data(), R, D, -1.0).code() == errc::invalid_argument);
}

TEST_CASE("cpu_ops: rope") {
  ops_t ops;
  auto g = kdtest::rng(14);
  const std::int64_t tokens = 4, heads = 3, D = 8;
  const double theta = 10000.0;
  ids pos{0, 1, 7, 300};
  const vec x0 = kdtest::normal(tokens * heads * D, g);

  SUBCASE("position 0 is the identity, norms are preserved, inverse undoes forward") {
    vec x = x0;
    REQUIRE(ops.rope(x.data(), pos.data(), tokens, heads, D, theta, false).ok());
    for (int i = 0; i < heads * D; ++i) CHECK(x[i] == x0[i]);
    for (int t = 0; t < tokens; ++t)
      for (int h = 0; h < heads; ++h)
        for (int i = 0; i < D / 2; ++i) {  // each (i, i + D/2) pair is a plane rotation
          const auto at = [&](const vec& v, int j) { return v[(t * heads + h) * D + j]; };
          const double n0 = std::hypot(at(x0, i), at(x0, i + D / 2)), n1 = std::hypot(at(x, i), at(x, i + D / 2));
          CHECK(n1 == doctest::Approx(n0).epsilon(1e-13));
        }
    REQUIRE(ops.rope(x.data(), pos.data(), tokens, heads, D, theta, true).ok());
    CHECK(kdtest::rel_error(x, x0) < 1e-14);
  }
  SUBCASE("known value: D = 2 rotates by pos radians") {
    vec v{0.3, -0.7};
    ids p{2};
    REQUIRE(ops.rope(v.data(), p.data(), 1, 1, 2, theta, false).ok());
    CHECK(v[0] == doctest::Approx(0.3 * std::cos(2.0) + 0.7 * std::sin(2.0)).epsilon(1e-14));
    CHECK(v[1] == doctest::Approx(-0.7 * std::cos(2.0) + 0.3 * std::sin(2.0)).epsilon(1e-14));
  }
  SUBCASE("inverse is the backward") {
    vec x = x0;
    const vec R = kdtest::normal(x.size(), g);
    auto loss = [&] {
      vec y = x;
      REQUIRE(ops.rope(y.data(), pos.data(), tokens, heads, D, theta, false).ok());
      return dot(y, R);
    };
    vec dx = R;
    REQUIRE(ops.rope(dx.data(), pos.data(), tokens, heads, D, theta, true).ok());
    check_gradient(loss, x, dx, "rope dx");
  }
  SUBCASE("rmsnorm_rope and its backward on column slices of a wider matrix (the fused QKV layout)") {
    const std::int64_t HD = heads * D, ld = HD + 2 * D;  // q-like columns [0, HD) of a [tokens, ld] matrix
    const vec wide = kdtest::normal(tokens * ld, g), nw = kdtest::uniform(D, g, 0.5, 1.5), dy = kdtest::normal(tokens * HD, g);
    vec x(tokens * HD);
    REQUIRE(ops.copy_rows(wide.data(), ld, x.data(), HD, tokens, HD).ok());
    vec y(tokens * HD), ys(tokens * HD), rstd(tokens * heads), rstds(tokens * heads);
    REQUIRE(ops.rmsnorm_rope(x.data(), nw.data(), y.data(), rstd.data(), pos.data(), tokens, heads, D, 1e-6, theta).ok());
    REQUIRE(ops.rmsnorm_rope(wide.data(), nw.data(), ys.data(), rstds.data(), pos.data(), tokens, heads, D, 1e-6, theta, ld)
                .ok());
    CHECK(ys == y);
    CHECK(rstds == rstd);
    vec dx(tokens * HD), dw(D, 0.0), dws(D, 0.0), dwide(tokens * ld, 7.0);
    REQUIRE(ops.rmsnorm_rope_bwd(x.data(), nw.data(), rstd.data(), pos.data(), dy.data(), dx.data(), dw.data(), tokens,
                                 heads, D, theta)
                .ok());
    REQUIRE(ops.rmsnorm_rope_bwd(wide.data(), nw.data(), rstd.data(), pos.data(), dy.data(), dwide.data(), dws.data(),
                                 tokens, heads, D, theta, ld)
                .ok());
    CHECK(dws == dw);
    for (std::int64_t t = 0; t < tokens; ++t)
      for (std::int64_t c = 0; c < ld; ++c)
        CHECK(dwide[t * ld + c] == (c < HD ? dx[t * HD + c] : 7.0));  // the other columns are left alone
    // The backward is the gradient of the forward.
    auto loss = [&] {
      vec yy(tokens * HD), r(tokens * heads);
      REQUIRE(ops.rmsnorm_rope(x.data(), nw.data(), yy.data(), r.data(), pos.data(), tokens, heads, D, 1e-6, theta).ok());
      return dot(yy, dy);
    };
    check_gradient(loss, x, dx, "rmsnorm_rope dx");
    CHECK(ops.rmsnorm_rope(wide.data(), nw.data(), ys.data(), rstds.data(), pos.data(), tokens, heads, D, 1e-6, theta,
                           HD - 1)
              .code() == errc::invalid_argument);
  }
  SUBCASE("errors") {
    vec x = x0;
    CHECK(ops.rope(x.data(), pos.data(), tokens, heads * 2, D / 2 - 1, theta, false).code() == errc::invalid_argument);
    CHECK(ops.rope(x.data(), nullptr, tokens, heads, D, theta, false).code() == errc::invalid_argument);
  }
}

TEST_CASE("cpu_ops: swiglu") {
  ops_t ops;
  auto g = kdtest::rng(15);
  const std::int64_t R = 3, I = 5;
  vec gu = kdtest::normal(R * 2 * I, g, 0.0, 2.0), dh = kdtest::normal(R * I, g), h(R * I);
  REQUIRE(ops.swiglu(gu.data(), h.data(), R, I).ok());
  const double g0 = gu[0], u0 = gu[I];
  CHECK(h[0] == doctest::Approx(g0 / (1.0 + std::exp(-g0)) * u0).epsilon(1e-14));
  auto loss = [&] {
    vec hh(R * I);
    REQUIRE(ops.swiglu(gu.data(), hh.data(), R, I).ok());
    return dot(hh, dh);
  };
  vec dgu = kdtest::normal(R * 2 * I, g);  // overwritten
  REQUIRE(ops.swiglu_bwd(gu.data(), dh.data(), dgu.data(), R, I).ok());
  check_gradient(loss, gu, dgu, "dgu");
}

namespace {

struct attn_shape {
  std::int64_t batch = 2, seq = 5, Hq = 4, Hkv = 2, D = 8;
  double scale = 1.0 / std::sqrt(8.0);
  std::int64_t nq() const { return batch * seq * Hq * D; }
  std::int64_t nkv() const { return batch * seq * Hkv * D; }
  std::int64_t nlse() const { return batch * Hq * seq; }
  std::int64_t nprobs() const { return batch * Hq * seq * seq; }
};

// Naive fp64 causal GQA attention, written from the definition.
void naive_attention(const attn_shape& s, const vec& q, const vec& k, const vec& v, vec& o, vec& lse) {
  o.assign(s.nq(), 0.0);
  lse.assign(s.nlse(), 0.0);
  const auto group = s.Hq / s.Hkv;
  for (std::int64_t b = 0; b < s.batch; ++b)
    for (std::int64_t h = 0; h < s.Hq; ++h)
      for (std::int64_t i = 0; i < s.seq; ++i) {
        const double* qi = &q[((b * s.seq + i) * s.Hq + h) * s.D];
        vec sc(i + 1);
        for (std::int64_t j = 0; j <= i; ++j) {
          const double* kj = &k[((b * s.seq + j) * s.Hkv + h / group) * s.D];
          double d = 0;
          for (std::int64_t c = 0; c < s.D; ++c) d += qi[c] * kj[c];
          sc[j] = s.scale * d;
        }
        const double m = *std::max_element(sc.begin(), sc.end());
        double z = 0;
        for (double x : sc) z += std::exp(x - m);
        lse[(b * s.Hq + h) * s.seq + i] = m + std::log(z);
        for (std::int64_t j = 0; j <= i; ++j) {
          const double p = std::exp(sc[j] - m) / z;
          const double* vj = &v[((b * s.seq + j) * s.Hkv + h / group) * s.D];
          for (std::int64_t c = 0; c < s.D; ++c) o[((b * s.seq + i) * s.Hq + h) * s.D + c] += p * vj[c];
        }
      }
}

}  // namespace

TEST_CASE("cpu_ops: attention forward against the definition, backward against finite differences") {
  ops_t ops;
  auto g = kdtest::rng(16);
  attn_shape s;
  vec q = kdtest::normal(s.nq(), g), k = kdtest::normal(s.nkv(), g), v = kdtest::normal(s.nkv(), g);
  vec o(s.nq()), lse(s.nlse()), o_ref, lse_ref;
  REQUIRE(ops.attention(q.data(), k.data(), v.data(), o.data(), lse.data(), s.batch, s.seq, s.Hq, s.Hkv, s.D, s.scale).ok());
  naive_attention(s, q, k, v, o_ref, lse_ref);
  CHECK(kdtest::rel_error(o, o_ref) < 1e-14);
  CHECK(kdtest::rel_error(lse, lse_ref) < 1e-14);

  const vec dout = kdtest::normal(s.nq(), g);
  auto loss = [&] {
    vec oo(s.nq()), ll(s.nlse());
    REQUIRE(ops.attention(q.data(), k.data(), v.data(), oo.data(), ll.data(), s.batch, s.seq, s.Hq, s.Hkv, s.D, s.scale).ok());
    return dot(oo, dout);
  };
  // Poisoned outputs: attention_bwd overwrites dq, dk, dv.
  vec dq = kdtest::normal(s.nq(), g), dk = kdtest::normal(s.nkv(), g), dv = kdtest::normal(s.nkv(), g);
  REQUIRE(ops.attention_bwd(q.data(), k.data(), v.data(), o.data(), lse.data(), dout.data(), dq.data(), dk.data(),
                            dv.data(), s.batch, s.seq, s.Hq, s.Hkv, s.D, s.scale)
              .ok());
  check_gradient(loss, q, dq, "dq");
  check_gradient(loss, k, dk, "dk");
  check_gradient(loss, v, dv, "dv");
}

TEST_CASE("cpu_ops: attention known values and causality") {
  ops_t ops;
  auto g = kdtest::rng(17);
  SUBCASE("one token returns v of the head's KV group") {
    attn_shape s;
    s.seq = 1;
    vec q = kdtest::normal(s.nq(), g), k = kdtest::normal(s.nkv(), g), v = kdtest::normal(s.nkv(), g);
    vec o(s.nq()), lse(s.nlse());
    REQUIRE(ops.attention(q.data(), k.data(), v.data(), o.data(), lse.data(), s.batch, 1, s.Hq, s.Hkv, s.D, s.scale).ok());
    for (std::int64_t b = 0; b < s.batch; ++b)
      for (std::int64_t h = 0; h < s.Hq; ++h)
        for (std::int64_t c = 0; c < s.D; ++c)
          CHECK(o[(b * s.Hq + h) * s.D + c] == doctest::Approx(v[(b * s.Hkv + h / 2) * s.D + c]).epsilon(1e-15));
  }
  SUBCASE("a later token does not change earlier outputs, nor another sequence") {
    attn_shape s;
    vec q = kdtest::normal(s.nq(), g), k = kdtest::normal(s.nkv(), g), v = kdtest::normal(s.nkv(), g);
    vec o1(s.nq()), l1(s.nlse()), o2(s.nq()), l2(s.nlse());
    REQUIRE(ops.attention(q.data(), k.data(), v.data(), o1.data(), l1.data(), s.batch, s.seq, s.Hq, s.Hkv, s.D, s.scale).ok());
    const std::int64_t t = 3;  // token 3 of sequence 0
    for (std::int64_t c = 0; c < s.Hq * s.D; ++c) q[t * s.Hq * s.D + c] += 1.0;
    for (std::int64_t c = 0; c < s.Hkv * s.D; ++c) {
      k[t * s.Hkv * s.D + c] -= 2.0;
      v[t * s.Hkv * s.D + c] += 3.0;
    }
    REQUIRE(ops.attention(q.data(), k.data(), v.data(), o2.data(), l2.data(), s.batch, s.seq, s.Hq, s.Hkv, s.D, s.scale).ok());
    const std::int64_t row = s.Hq * s.D;
    for (std::int64_t i = 0; i < t * row; ++i) CHECK(o2[i] == o1[i]);
    CHECK(o2[t * row] != o1[t * row]);
    for (std::int64_t i = s.seq * row; i < s.nq(); ++i) CHECK(o2[i] == o1[i]);  // sequence 1 untouched
  }
}

TEST_CASE("cpu_ops: attention_probs and attention_probs_bwd") {
  ops_t ops;
  auto g = kdtest::rng(18);
  attn_shape s;
  vec q = kdtest::normal(s.nq(), g), k = kdtest::normal(s.nkv(), g), v = kdtest::normal(s.nkv(), g);
  vec o(s.nq()), lse(s.nlse()), probs(s.nprobs());
  REQUIRE(ops.attention(q.data(), k.data(), v.data(), o.data(), lse.data(), s.batch, s.seq, s.Hq, s.Hkv, s.D, s.scale).ok());
  REQUIRE(ops.attention_probs(q.data(), k.data(), lse.data(), probs.data(), s.batch, s.seq, s.Hq, s.Hkv, s.D, s.scale).ok());
  for (std::int64_t bh = 0; bh < s.batch * s.Hq; ++bh)
    for (std::int64_t i = 0; i < s.seq; ++i) {
      const double* row = &probs[(bh * s.seq + i) * s.seq];
      double sum = 0;
      for (std::int64_t j = 0; j < s.seq; ++j) {
        if (j > i) CHECK(row[j] == 0.0);
        CHECK(row[j] >= 0.0);
        sum += row[j];
      }
      CHECK(sum == doctest::Approx(1.0).epsilon(1e-14));
    }
  // probs . v reproduces o (head 3 of sequence 1, KV head 1).
  for (std::int64_t i = 0; i < s.seq; ++i) {
    double acc = 0;
    for (std::int64_t j = 0; j <= i; ++j)
      acc += probs[((1 * s.Hq + 3) * s.seq + i) * s.seq + j] * v[((1 * s.seq + j) * s.Hkv + 1) * s.D + 5];
    CHECK(acc == doctest::Approx(o[((1 * s.seq + i) * s.Hq + 3) * s.D + 5]).epsilon(1e-13));
  }

  const vec dprobs = kdtest::normal(s.nprobs(), g);
  auto loss = [&] {
    vec oo(s.nq()), ll(s.nlse()), pp(s.nprobs());
    REQUIRE(ops.attention(q.data(), k.data(), v.data(), oo.data(), ll.data(), s.batch, s.seq, s.Hq, s.Hkv, s.D, s.scale).ok());
    REQUIRE(ops.attention_probs(q.data(), k.data(), ll.data(), pp.data(), s.batch, s.seq, s.Hq, s.Hkv, s.D, s.scale).ok());
    return dot(pp, dprobs);
  };
  const vec dq0 = kdtest::normal(s.nq(), g), dk0 = kdtest::normal(s.nkv(), g);  // dq, dk accumulate
  vec dq = dq0, dk = dk0;
  REQUIRE(ops.attention_probs_bwd(q.data(), k.data(), probs.data(), dprobs.data(), dq.data(), dk.data(), s.batch, s.seq,
                                  s.Hq, s.Hkv, s.D, s.scale)
              .ok());
  for (std::size_t i = 0; i < dq.size(); ++i) dq[i] -= dq0[i];
  for (std::size_t i = 0; i < dk.size(); ++i) dk[i] -= dk0[i];
  check_gradient(loss, q, dq, "dq");
  check_gradient(loss, k, dk, "dk");
}

TEST_CASE("cpu_ops: attention errors") {
  ops_t ops;
  attn_shape s;
  vec q(s.nq()), k(s.nkv()), v(s.nkv()), o(s.nq()), lse(s.nlse());
  CHECK(ops.attention(q.data(), k.data(), v.data(), o.data(), lse.data(), s.batch, s.seq, 4, 3, s.D, s.scale).code() ==
        errc::shape_mismatch);
  CHECK(ops.attention(q.data(), k.data(), v.data(), o.data(), nullptr, s.batch, s.seq, s.Hq, s.Hkv, s.D, s.scale).code() ==
        errc::invalid_argument);
  CHECK(ops.attention(q.data(), k.data(), v.data(), o.data(), lse.data(), s.batch, s.seq, s.Hq, 0, s.D, s.scale).code() ==
        errc::invalid_argument);
  CHECK(ops.attention(q.data(), k.data(), v.data(), o.data(), lse.data(), s.batch, s.seq, s.Hq, s.Hkv, s.D, NAN).code() ==
        errc::invalid_argument);
  vec dq(s.nq()), dk(s.nkv());
  CHECK(ops.attention_probs_bwd(q.data(), k.data(), o.data(), o.data(), dq.data(), dk.data(), s.batch, s.seq, 6, 4, s.D,
                                s.scale)
            .code() == errc::shape_mismatch);
}

TEST_CASE("cpu_ops: router forward") {
  ops_t ops;
  const std::int64_t N = 2, E = 4;
  vec logits{1.0, 2.0, 2.0, 0.0,   // tie between experts 1 and 2: the lower index first
             0.5, -1.0, 3.0, 0.5};
  vec probs(N * E), w(N * 3);
  ids idx(N * 3);
  REQUIRE(ops.router(logits.data(), probs.data(), idx.data(), w.data(), N, E, 3, false).ok());
  CHECK(idx == ids{1, 2, 0, 2, 0, 3});
  const double z0 = std::exp(1.0) + 2 * std::exp(2.0) + 1.0;
  CHECK(probs[0] == doctest::Approx(std::exp(1.0) / z0).epsilon(1e-15));
  CHECK(w[0] == probs[1]);
  CHECK(w[2] == probs[0]);
  for (int t = 0; t < N; ++t)
    CHECK(std::accumulate(probs.begin() + t * E, probs.begin() + (t + 1) * E, 0.0) == doctest::Approx(1.0).epsilon(1e-15));
  REQUIRE(ops.router(logits.data(), probs.data(), idx.data(), w.data(), N, E, 3, true).ok());
  CHECK(w[0] + w[1] + w[2] == doctest::Approx(1.0).epsilon(1e-15));
  CHECK(w[0] == doctest::Approx(probs[1] / (probs[1] + probs[2] + probs[0])).epsilon(1e-15));
  CHECK(ops.router(logits.data(), probs.data(), idx.data(), w.data(), N, E, 5, false).code() == errc::invalid_argument);
  CHECK(ops.router(logits.data(), probs.data(), idx.data(), w.data(), N, E, 0, false).code() == errc::invalid_argument);
}

TEST_CASE("cpu_ops: router_bwd against finite differences") {
  ops_t ops;
  auto g = kdtest::rng(19);
  const std::int64_t N = 3, E = 6, k = 2;
  // Logits 0.7 apart (shuffled per token) plus small noise: no near-ties, so +-h never flips the top-k.
  vec logits(N * E);
  for (int t = 0; t < N; ++t) {
    ids perm(E);
    std::iota(perm.begin(), perm.end(), 0);
    std::shuffle(perm.begin(), perm.end(), g);
    const vec noise = kdtest::uniform(E, g, -0.1, 0.1);
    for (int e = 0; e < E; ++e) logits[t * E + e] = 0.7 * perm[e] + noise[e];
  }
  const vec dw = kdtest::normal(N * k, g), dextra = kdtest::normal(N * E, g);
  for (bool renorm : {false, true})
    for (bool extra : {false, true}) {
      CAPTURE(renorm);
      CAPTURE(extra);
      auto loss = [&] {
        vec p(N * E), w(N * k);
        ids idx(N * k);
        REQUIRE(ops.router(logits.data(), p.data(), idx.data(), w.data(), N, E, k, renorm).ok());
        return dot(w, dw) + (extra ? dot(p, dextra) : 0.0);
      };
      vec p(N * E), w(N * k), dlogits = kdtest::normal(N * E, g);  // dlogits overwritten
      ids idx(N * k);
      REQUIRE(ops.router(logits.data(), p.data(), idx.data(), w.data(), N, E, k, renorm).ok());
      REQUIRE(ops.router_bwd(p.data(), idx.data(), dw.data(), extra ? dextra.data() : nullptr, dlogits.data(), N, E, k,
                             renorm)
                  .ok());
      check_gradient(loss, logits, dlogits, "dlogits");
    }
}

TEST_CASE("cpu_ops: moe_dispatch groups stably and counts") {
  ops_t ops;
  const std::int64_t N = 4, E = 3, k = 2;
  const ids topk{2, 0, 0, 1, 2, 1, 0, 2};
  ids slot_token(N * k, -1), token_slot(N * k, -1);
  std::vector<std::int64_t> counts(E, -1);
  REQUIRE(ops.moe_dispatch(topk.data(), N, E, k, slot_token.data(), token_slot.data(), counts.data()).ok());
  CHECK(counts == std::vector<std::int64_t>{3, 2, 3});
  CHECK(slot_token == ids{0, 1, 3, 1, 2, 0, 2, 3});
  CHECK(token_slot == ids{5, 0, 1, 3, 6, 4, 2, 7});

  const ids bad{2, 0, 0, 3, 2, 1, 0, 2};
  CHECK(ops.moe_dispatch(bad.data(), N, E, k, slot_token.data(), token_slot.data(), counts.data()).code() ==
        errc::out_of_range);
  const ids neg{2, 0, 0, -1, 2, 1, 0, 2};
  CHECK(ops.moe_dispatch(neg.data(), N, E, k, slot_token.data(), token_slot.data(), counts.data()).code() ==
        errc::out_of_range);
  CHECK(ops.moe_dispatch(topk.data(), N, E, 4, slot_token.data(), token_slot.data(), counts.data()).code() ==
        errc::invalid_argument);
}

TEST_CASE("cpu_ops: gather_rows, moe_combine, moe_combine_bwd, moe_gather_add") {
  ops_t ops;
  auto g = kdtest::rng(20);
  const std::int64_t N = 4, E = 3, k = 2, H = 5, S = N * k;
  const ids topk{2, 0, 0, 1, 2, 1, 0, 2};
  ids slot_token(S), token_slot(S);
  std::vector<std::int64_t> counts(E);
  REQUIRE(ops.moe_dispatch(topk.data(), N, E, k, slot_token.data(), token_slot.data(), counts.data()).ok());

  vec x = kdtest::normal(N * H, g), xs(S * H);
  REQUIRE(ops.gather_rows(x.data(), slot_token.data(), xs.data(), S, H).ok());
  for (int s = 0; s < S; ++s)
    for (int h = 0; h < H; ++h) CHECK(xs[s * H + h] == x[slot_token[s] * H + h]);

  vec y = kdtest::normal(S * H, g), w = kdtest::uniform(N * k, g, 0.1, 1.0), dout = kdtest::normal(N * H, g);
  vec out(N * H);
  REQUIRE(ops.moe_combine(y.data(), token_slot.data(), w.data(), nullptr, out.data(), N, k, H).ok());
  CHECK(out[1 * H + 2] == doctest::Approx(w[2] * y[1 * H + 2] + w[3] * y[3 * H + 2]).epsilon(1e-15));
  // With a residual: from another tensor, or in place (+=).
  vec out0 = kdtest::normal(N * H, g), outa = out0, outr(N * H);
  REQUIRE(ops.moe_combine(y.data(), token_slot.data(), w.data(), outa.data(), outa.data(), N, k, H).ok());
  CHECK(kdtest::rel_error(outa, plus(out0, out)) < 1e-14);
  REQUIRE(ops.moe_combine(y.data(), token_slot.data(), w.data(), out0.data(), outr.data(), N, k, H).ok());
  CHECK(kdtest::rel_error(outr, plus(out0, out)) < 1e-14);

  auto loss = [&] {
    vec o(N * H);
    REQUIRE(ops.moe_combine(y.data(), token_slot.data(), w.data(), nullptr, o.data(), N, k, H).ok());
    return dot(o, dout);
  };
  vec dy = kdtest::normal(S * H, g), dw(N * k);  // dy overwritten
  REQUIRE(ops.moe_combine_bwd(y.data(), token_slot.data(), w.data(), dout.data(), dy.data(), dw.data(), N, k, H).ok());
  check_gradient(loss, y, dy, "dy");
  check_gradient(loss, w, dw, "dtopk_w");

  // moe_gather_add is the backward of gather_rows: dx[t] += every slot row of token t.
  vec dx0 = kdtest::normal(N * H, g), dx = dx0, dxo = kdtest::normal(N * H, g);
  REQUIRE(ops.moe_gather_add(dy.data(), token_slot.data(), dx.data(), N, k, H, true).ok());
  REQUIRE(ops.moe_gather_add(dy.data(), token_slot.data(), dxo.data(), N, k, H, false).ok());  // overwrites
  for (int t = 0; t < N; ++t)
    for (int h = 0; h < H; ++h) {
      const double sum = dy[token_slot[t * k] * H + h] + dy[token_slot[t * k + 1] * H + h];
      CHECK(dx[t * H + h] == doctest::Approx(dx0[t * H + h] + sum).epsilon(1e-15));
      CHECK(dxo[t * H + h] == doctest::Approx(sum).epsilon(1e-15));
    }
  auto gather_loss = [&] {
    vec r(S * H);
    REQUIRE(ops.gather_rows(x.data(), slot_token.data(), r.data(), S, H).ok());
    return dot(r, dy);
  };
  // With the router's input gradient fused in: equal to the gather-add followed by linear_dx.
  {
    const std::int64_t E = 3;
    const vec dl = kdtest::normal(N * E, g), wr = kdtest::normal(E * H, g);
    vec fused = dx0, split = dx0;
    REQUIRE(ops.moe_gather_add(dy.data(), token_slot.data(), fused.data(), N, k, H, true, dl.data(), wr.data(), E).ok());
    REQUIRE(ops.moe_gather_add(dy.data(), token_slot.data(), split.data(), N, k, H, true).ok());
    REQUIRE(ops.linear_dx(dl.data(), wr.data(), split.data(), N, E, H, true).ok());
    CHECK(kdtest::rel_error(fused, split) < 1e-14);
    CHECK(ops.moe_gather_add(dy.data(), token_slot.data(), fused.data(), N, k, H, true, nullptr, wr.data(), E).code() ==
          errc::invalid_argument);
  }
  vec dgx(N * H, 0.0);
  REQUIRE(ops.moe_gather_add(dy.data(), token_slot.data(), dgx.data(), N, k, H, true).ok());
  check_gradient(gather_loss, x, dgx, "gather dx");

  const ids bad_slot{0, 1, 2, 3, 4, 5, 6, 8};
  CHECK(ops.moe_combine(y.data(), bad_slot.data(), w.data(), nullptr, out.data(), N, k, H).code() == errc::out_of_range);
}

TEST_CASE("cpu_ops<float> matches cpu_ops<double> on linear and attention") {
  kd::model::cpu_ops<double> d;
  kd::model::cpu_ops<float> f;
  auto g = kdtest::rng(21);
  const auto to_float = [](const vec& v) { return std::vector<float>(v.begin(), v.end()); };

  const std::int64_t M = 9, N = 7, K = 16;
  vec x = kdtest::normal(M * K, g), w = kdtest::normal(N * K, g), y(M * N);
  std::vector<float> xf = to_float(x), wf = to_float(w), yf(M * N);
  // Inputs rounded to float first, so the comparison measures the ops, not the input rounding.
  x.assign(xf.begin(), xf.end());
  w.assign(wf.begin(), wf.end());
  REQUIRE(d.linear(x.data(), w.data(), y.data(), M, N, K, false).ok());
  REQUIRE(f.linear(xf.data(), wf.data(), yf.data(), M, N, K, false).ok());
  CHECK(kdtest::rel_error(yf, y) < 1e-5);

  attn_shape s;
  vec q = kdtest::normal(s.nq(), g), k = kdtest::normal(s.nkv(), g), v = kdtest::normal(s.nkv(), g);
  std::vector<float> qf = to_float(q), kf = to_float(k), vf = to_float(v), of(s.nq()), lf(s.nlse());
  q.assign(qf.begin(), qf.end());
  k.assign(kf.begin(), kf.end());
  v.assign(vf.begin(), vf.end());
  vec o(s.nq()), l(s.nlse());
  REQUIRE(d.attention(q.data(), k.data(), v.data(), o.data(), l.data(), s.batch, s.seq, s.Hq, s.Hkv, s.D, s.scale).ok());
  REQUIRE(f.attention(qf.data(), kf.data(), vf.data(), of.data(), lf.data(), s.batch, s.seq, s.Hq, s.Hkv, s.D, s.scale).ok());
  CHECK(kdtest::rel_error(of, o) < 1e-5);
  CHECK(kdtest::rel_error(lf, l) < 1e-5);
}
