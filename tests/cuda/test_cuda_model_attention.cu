// The model backend's CUDA attention (kd/model/cuda/flash_attention.cuh) against a double-precision CPU
// reference written here: naive causal GQA attention, its backward through the softmax formula, the
// probability maps and their backward. float and bf16 storage; shapes cover the scalar path (d = 8, and
// every float case), the tensor-core path (bf16, d = 64 and 128) with sequences that are not a multiple of
// the 64 / 128-row tiles, seq = 1, and GQA groups of 1 to 4. Fresh random inputs every run; every output is
// poisoned with NaN first, so an element a kernel fails to write fails the comparison.
//
// KD_ATTN_BENCH=1 also runs the timing case (bf16 target geometries, forward and forward+backward, median
// of 20 cudaEvent timings); benchmarks/bench_model_attention.py times torch SDPA on the same shapes.
#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <vector>

#include <kd/model/cuda/flash_attention.cuh>

#include "gpu_util.cuh"

using namespace kd_test;
using kd::model::cuda::int64;

namespace {

struct shape {
  int64 batch, seq, hq, hkv, d;
};

template <class T>
constexpr double tol() {
  return sizeof(T) == 2 ? 2e-2 : 1e-4;
}

struct ref_ctx {
  shape s;
  std::size_t qi(int64 b, int64 i, int64 h, int64 c) const {
    return static_cast<std::size_t>(((b * s.seq + i) * s.hq + h) * s.d + c);
  }
  std::size_t ki(int64 b, int64 j, int64 h, int64 c) const {
    return static_cast<std::size_t>(((b * s.seq + j) * s.hkv + h) * s.d + c);
  }
  std::size_t ri(int64 b, int64 h, int64 i) const { return static_cast<std::size_t>((b * s.hq + h) * s.seq + i); }
  std::size_t pi(int64 b, int64 h, int64 i, int64 j) const { return ri(b, h, i) * static_cast<std::size_t>(s.seq) + static_cast<std::size_t>(j); }
  int64 kvh(int64 h) const { return h / (s.hq / s.hkv); }
  double score(const std::vector<double>& q, const std::vector<double>& k, int64 b, int64 h, int64 i, int64 j,
               double scale) const {
    double acc = 0;
    for (int64 c = 0; c < s.d; ++c) acc += q[qi(b, i, h, c)] * k[ki(b, j, kvh(h), c)];
    return acc * scale;
  }
  // Row i's probabilities over keys 0..i and its lse.
  std::vector<double> row_probs(const std::vector<double>& q, const std::vector<double>& k, int64 b, int64 h,
                                int64 i, double scale, double* lse) const {
    std::vector<double> p(static_cast<std::size_t>(i + 1));
    double m = -std::numeric_limits<double>::infinity();
    for (int64 j = 0; j <= i; ++j) {
      p[static_cast<std::size_t>(j)] = score(q, k, b, h, i, j, scale);
      m = std::max(m, p[static_cast<std::size_t>(j)]);
    }
    double z = 0;
    for (auto& x : p) z += (x = std::exp(x - m));
    for (auto& x : p) x /= z;
    if (lse != nullptr) *lse = m + std::log(z);
    return p;
  }
};

struct reference {
  std::vector<double> o, lse, dq, dk, dv, probs;
};

reference compute_reference(const shape& s, const std::vector<double>& q, const std::vector<double>& k,
                            const std::vector<double>& v, const std::vector<double>& dout, double scale) {
  const ref_ctx r{s};
  reference out;
  const auto nq = static_cast<std::size_t>(s.batch * s.seq * s.hq * s.d);
  const auto nk = static_cast<std::size_t>(s.batch * s.seq * s.hkv * s.d);
  out.o.assign(nq, 0.0);
  out.dq.assign(nq, 0.0);
  out.dk.assign(nk, 0.0);
  out.dv.assign(nk, 0.0);
  out.lse.assign(static_cast<std::size_t>(s.batch * s.hq * s.seq), 0.0);
  out.probs.assign(static_cast<std::size_t>(s.batch * s.hq * s.seq * s.seq), 0.0);
  for (int64 b = 0; b < s.batch; ++b)
    for (int64 h = 0; h < s.hq; ++h) {
      const int64 hk = r.kvh(h);
      for (int64 i = 0; i < s.seq; ++i) {
        double lse = 0;
        const auto p = r.row_probs(q, k, b, h, i, scale, &lse);
        out.lse[r.ri(b, h, i)] = lse;
        for (int64 j = 0; j <= i; ++j) {
          const double pj = p[static_cast<std::size_t>(j)];
          out.probs[r.pi(b, h, i, j)] = pj;
          for (int64 c = 0; c < s.d; ++c) out.o[r.qi(b, i, h, c)] += pj * v[r.ki(b, j, hk, c)];
        }
        // Backward: dp_j = dO . v_j, dS_j = p_j (dp_j - sum_l p_l dp_l).
        std::vector<double> dp(p.size());
        double delta = 0;
        for (int64 j = 0; j <= i; ++j) {
          double a = 0;
          for (int64 c = 0; c < s.d; ++c) a += dout[r.qi(b, i, h, c)] * v[r.ki(b, j, hk, c)];
          dp[static_cast<std::size_t>(j)] = a;
          delta += p[static_cast<std::size_t>(j)] * a;
        }
        for (int64 j = 0; j <= i; ++j) {
          const double pj = p[static_cast<std::size_t>(j)];
          const double ds = pj * (dp[static_cast<std::size_t>(j)] - delta);
          for (int64 c = 0; c < s.d; ++c) {
            out.dq[r.qi(b, i, h, c)] += scale * ds * k[r.ki(b, j, hk, c)];
            out.dk[r.ki(b, j, hk, c)] += scale * ds * q[r.qi(b, i, h, c)];
            out.dv[r.ki(b, j, hk, c)] += pj * dout[r.qi(b, i, h, c)];
          }
        }
      }
    }
  return out;
}

// dq += scale dS k, dk += scale dS^T q with dS = P (dP - rowsum(dP P)), from the given maps.
void reference_probs_backward(const shape& s, const std::vector<double>& q, const std::vector<double>& k,
                              const std::vector<double>& p, const std::vector<double>& dp, double scale,
                              std::vector<double>& dq, std::vector<double>& dk) {
  const ref_ctx r{s};
  for (int64 b = 0; b < s.batch; ++b)
    for (int64 h = 0; h < s.hq; ++h) {
      const int64 hk = r.kvh(h);
      for (int64 i = 0; i < s.seq; ++i) {
        double rs = 0;
        for (int64 j = 0; j <= i; ++j) rs += p[r.pi(b, h, i, j)] * dp[r.pi(b, h, i, j)];
        for (int64 j = 0; j <= i; ++j) {
          const double ds = p[r.pi(b, h, i, j)] * (dp[r.pi(b, h, i, j)] - rs);
          for (int64 c = 0; c < s.d; ++c) {
            dq[r.qi(b, i, h, c)] += scale * ds * k[r.ki(b, j, hk, c)];
            dk[r.ki(b, j, hk, c)] += scale * ds * q[r.qi(b, i, h, c)];
          }
        }
      }
    }
}

template <class T>
void check_attention(const shape& s, bool deterministic = false) {
  namespace mc = kd::model::cuda;
  const auto nq = static_cast<std::size_t>(s.batch * s.seq * s.hq * s.d);
  const auto nk = static_cast<std::size_t>(s.batch * s.seq * s.hkv * s.d);
  const auto nr = static_cast<std::size_t>(s.batch * s.hq * s.seq);
  const auto np = nr * static_cast<std::size_t>(s.seq);
  const float scale = 1.f / std::sqrt(static_cast<float>(s.d));
  INFO("T=", kd::type_name<T>(), " batch=", s.batch, " seq=", s.seq, " hq=", s.hq, " hkv=", s.hkv, " d=", s.d,
       " deterministic=", deterministic);

  const auto qh = random_storage<T>(nq, 1.0, rng());
  const auto kh = random_storage<T>(nk, 1.0, rng());
  const auto vh = random_storage<T>(nk, 1.0, rng());
  const auto doh = random_storage<T>(nq, 1.0, rng());
  device_buffer<T> q(nq), k(nk), v(nk), o(nq), dout(nq), dq(nq), dk(nk), dv(nk), probs(np), dprobs(np);
  device_buffer<float> lse(nr);
  q.upload(qh);
  k.upload(kh);
  v.upload(vh);
  dout.upload(doh);
  const auto q64 = to_double(qh), k64 = to_double(kh), v64 = to_double(vh), do64 = to_double(doh);
  const reference ref = compute_reference(s, q64, k64, v64, do64, scale);

  // Forward.
  o.poison();
  lse.poison();
  const auto st_fwd = mc::attention_forward<T>(nullptr, q.data, k.data, v.data, o.data, lse.data, s.batch, s.seq, s.hq,
                                     s.hkv, s.d, scale);
  REQUIRE_MESSAGE(st_fwd.ok(), st_fwd.message());
  REQUIRE(cudaDeviceSynchronize() == cudaSuccess);
  const auto og = to_double(o.download()), lseg = to_double(lse.download());
  CHECK(all_finite(og));
  CHECK(all_finite(lseg));
  CHECK(rel_error(og, ref.o) <= tol<T>());
  CHECK(rel_error(lseg, ref.lse) <= tol<T>());

  // Backward from the GPU forward's o and lse.
  device_buffer<unsigned char> ws(mc::attention_backward_workspace_bytes(s.batch, s.seq, s.hq, s.hkv, s.d));
  dq.poison();
  dk.poison();
  dv.poison();
  const auto st_bwd = mc::attention_backward<T>(nullptr, q.data, k.data, v.data, o.data, lse.data, dout.data, dq.data, dk.data,
                                 dv.data, s.batch, s.seq, s.hq, s.hkv, s.d, scale, ws.data, deterministic);
  REQUIRE_MESSAGE(st_bwd.ok(), st_bwd.message());
  REQUIRE(cudaDeviceSynchronize() == cudaSuccess);
  const auto dqg = to_double(dq.download()), dkg = to_double(dk.download()), dvg = to_double(dv.download());
  if (deterministic) {  // a second backward gives the same bits
    const auto dq1 = dq.download(), dk1 = dk.download(), dv1 = dv.download();
    dq.poison();
    dk.poison();
    dv.poison();
    REQUIRE(mc::attention_backward<T>(nullptr, q.data, k.data, v.data, o.data, lse.data, dout.data, dq.data, dk.data, dv.data,
                                      s.batch, s.seq, s.hq, s.hkv, s.d, scale, ws.data, true).ok());
    REQUIRE(cudaDeviceSynchronize() == cudaSuccess);
    const auto dq2 = dq.download(), dk2 = dk.download(), dv2 = dv.download();
    CHECK(std::memcmp(dq1.data(), dq2.data(), dq1.size() * sizeof(T)) == 0);
    CHECK(std::memcmp(dk1.data(), dk2.data(), dk1.size() * sizeof(T)) == 0);
    CHECK(std::memcmp(dv1.data(), dv2.data(), dv1.size() * sizeof(T)) == 0);
  }
  CHECK(all_finite(dqg));
  CHECK(all_finite(dkg));
  CHECK(all_finite(dvg));
  CHECK(rel_error(dqg, ref.dq) <= tol<T>());
  CHECK(rel_error(dkg, ref.dk) <= tol<T>());
  CHECK(rel_error(dvg, ref.dv) <= tol<T>());

  // Probability maps: exactly zero above the diagonal.
  probs.poison();
  const auto st_probs = mc::attention_probs<T>(nullptr, q.data, k.data, lse.data, probs.data, s.batch, s.seq, s.hq, s.hkv, s.d,
                              scale);
  REQUIRE_MESSAGE(st_probs.ok(), st_probs.message());
  REQUIRE(cudaDeviceSynchronize() == cudaSuccess);
  const auto ph = probs.download();
  const auto pg = to_double(ph);
  CHECK(all_finite(pg));
  CHECK(rel_error(pg, ref.probs) <= tol<T>());
  bool upper_zero = true;
  for (std::size_t m = 0; m < nr; ++m) {
    const auto i = static_cast<int64>(m % static_cast<std::size_t>(s.seq));
    for (int64 j = i + 1; j < s.seq; ++j)
      upper_zero = upper_zero && pg[m * static_cast<std::size_t>(s.seq) + static_cast<std::size_t>(j)] == 0.0;
  }
  CHECK(upper_zero);

  // Probs backward: accumulates into dq and dk (start from random values), from the GPU's maps.
  auto dph = random_storage<T>(np, 1.0, rng());
  dprobs.upload(dph);
  const auto dq0 = random_storage<T>(nq, 0.1, rng());
  const auto dk0 = random_storage<T>(nk, 0.1, rng());
  dq.upload(dq0);
  dk.upload(dk0);
  auto dqr = to_double(dq0), dkr = to_double(dk0);
  reference_probs_backward(s, q64, k64, pg, to_double(dph), scale, dqr, dkr);
  device_buffer<unsigned char> pws(mc::attention_probs_backward_workspace_bytes(s.batch, s.seq, s.hq, s.hkv, s.d));
  const auto st_pb = mc::attention_probs_backward<T>(nullptr, q.data, k.data, probs.data, dprobs.data, dq.data, dk.data, s.batch,
                                       s.seq, s.hq, s.hkv, s.d, scale, pws.data);
  REQUIRE_MESSAGE(st_pb.ok(), st_pb.message());
  REQUIRE(cudaDeviceSynchronize() == cudaSuccess);
  const auto dqp = to_double(dq.download()), dkp = to_double(dk.download());
  CHECK(all_finite(dqp));
  CHECK(all_finite(dkp));
  CHECK(rel_error(dqp, dqr) <= tol<T>());
  CHECK(rel_error(dkp, dkr) <= tol<T>());
}

const shape kShapes[] = {{2, 5, 4, 2, 8}, {1, 1, 2, 1, 8}, {2, 77, 4, 2, 64}, {1, 300, 6, 3, 64}, {1, 130, 2, 2, 128}};

}  // namespace

TEST_CASE("model attention: float against the fp64 reference") {
  for (const auto& s : kShapes) check_attention<float>(s);
}

TEST_CASE("model attention: bf16 against the fp64 reference") {
  for (const auto& s : kShapes) check_attention<kd::bfloat16>(s);
  // Tensor-core path edges: seq not a multiple of the 128-row / 128-key tiles, a group of 4, one tile, seq 1.
  const shape extra[] = {{1, 200, 4, 1, 64}, {2, 129, 2, 1, 128}, {1, 64, 3, 3, 64}, {1, 1, 2, 1, 64}};
  for (const auto& s : extra) check_attention<kd::bfloat16>(s);
}

TEST_CASE("model attention: deterministic backward (row kernels, no atomics) on the flash path's shapes") {
  // The shapes that take the tensor-core flash backward otherwise: same reference, and bitwise repeatable.
  const shape s[] = {{2, 77, 4, 2, 64}, {1, 200, 4, 1, 64}, {2, 129, 2, 1, 128}};
  for (const auto& x : s) check_attention<kd::bfloat16>(x, true);
}

TEST_CASE("model attention: host-side argument checks") {
  namespace mc = kd::model::cuda;
  device_buffer<float> buf(64), lse(8);
  float* p = buf.data;
  auto code = [](const kd::status& st) { return st.code(); };
  // hq % hkv, odd d, d > 128, null q, negative seq, null workspace, hq % hkv in the probs backward.
  CHECK(code(mc::attention_forward<float>(nullptr, p, p, p, p, lse.data, 1, 2, 3, 2, 8, 1.f)) == kd::errc::invalid_argument);
  CHECK(code(mc::attention_forward<float>(nullptr, p, p, p, p, lse.data, 1, 2, 2, 1, 7, 1.f)) == kd::errc::invalid_argument);
  CHECK(code(mc::attention_forward<float>(nullptr, p, p, p, p, lse.data, 1, 2, 2, 1, 130, 1.f)) == kd::errc::invalid_argument);
  CHECK(code(mc::attention_forward<float>(nullptr, nullptr, p, p, p, lse.data, 1, 2, 2, 1, 8, 1.f)) == kd::errc::invalid_argument);
  CHECK(code(mc::attention_forward<float>(nullptr, p, p, p, p, lse.data, 1, -1, 2, 1, 8, 1.f)) == kd::errc::invalid_argument);
  CHECK(code(mc::attention_backward<float>(nullptr, p, p, p, p, lse.data, p, p, p, p, 1, 2, 2, 1, 8, 1.f, nullptr)) ==
        kd::errc::invalid_argument);
  CHECK(code(mc::attention_probs_backward<float>(nullptr, p, p, p, p, p, p, 1, 2, 4, 3, 8, 1.f, p)) ==
        kd::errc::invalid_argument);
  CHECK(cudaDeviceSynchronize() == cudaSuccess);  // nothing was launched
}

// Timing (KD_ATTN_BENCH=1): bf16 teacher / student geometries, forward and forward + backward.
TEST_CASE("model attention: timing (KD_ATTN_BENCH=1)") {
  const char* env = std::getenv("KD_ATTN_BENCH");
  if (env == nullptr || env[0] != '1') return;
  namespace mc = kd::model::cuda;
  using T = kd::bfloat16;
  const shape geoms[] = {{8, 1024, 16, 4, 64}, {8, 1024, 9, 3, 64}, {8, 1024, 16, 4, 128}};
  cudaDeviceProp prop{};
  REQUIRE(cudaGetDeviceProperties(&prop, 0) == cudaSuccess);
  std::printf("kd attention timing on %s (median of 20, ms)\n", prop.name);
  for (const auto& s : geoms) {
    const auto nq = static_cast<std::size_t>(s.batch * s.seq * s.hq * s.d);
    const auto nk = static_cast<std::size_t>(s.batch * s.seq * s.hkv * s.d);
    const auto nr = static_cast<std::size_t>(s.batch * s.hq * s.seq);
    device_buffer<T> q(nq), k(nk), v(nk), o(nq), dout(nq), dq(nq), dk(nk), dv(nk);
    device_buffer<float> lse(nr);
    device_buffer<unsigned char> ws(mc::attention_backward_workspace_bytes(s.batch, s.seq, s.hq, s.hkv, s.d));
    q.upload(random_storage<T>(nq, 1.0, rng()));
    k.upload(random_storage<T>(nk, 1.0, rng()));
    v.upload(random_storage<T>(nk, 1.0, rng()));
    dout.upload(random_storage<T>(nq, 1.0, rng()));
    const float scale = 1.f / std::sqrt(static_cast<float>(s.d));
    auto fwd = [&] {
      return mc::attention_forward<T>(nullptr, q.data, k.data, v.data, o.data, lse.data, s.batch, s.seq, s.hq,
                                      s.hkv, s.d, scale);
    };
    auto bwd = [&] {
      return mc::attention_backward<T>(nullptr, q.data, k.data, v.data, o.data, lse.data, dout.data, dq.data,
                                       dk.data, dv.data, s.batch, s.seq, s.hq, s.hkv, s.d, scale, ws.data);
    };
    cudaEvent_t e0, e1;
    REQUIRE(cudaEventCreate(&e0) == cudaSuccess);
    REQUIRE(cudaEventCreate(&e1) == cudaSuccess);
    auto time = [&](bool with_bwd) {
      std::vector<float> ms;
      for (int it = 0; it < 23; ++it) {
        REQUIRE(cudaEventRecord(e0) == cudaSuccess);
        REQUIRE(fwd().ok());
        if (with_bwd) REQUIRE(bwd().ok());
        REQUIRE(cudaEventRecord(e1) == cudaSuccess);
        REQUIRE(cudaEventSynchronize(e1) == cudaSuccess);
        float t = 0;
        REQUIRE(cudaEventElapsedTime(&t, e0, e1) == cudaSuccess);
        if (it >= 3) ms.push_back(t);  // 3 warm-ups
      }
      std::sort(ms.begin(), ms.end());
      return (ms[9] + ms[10]) / 2;
    };
    auto time_bwd = [&] {
      std::vector<float> ms;
      REQUIRE(fwd().ok());
      for (int it = 0; it < 23; ++it) {
        REQUIRE(cudaEventRecord(e0) == cudaSuccess);
        REQUIRE(bwd().ok());
        REQUIRE(cudaEventRecord(e1) == cudaSuccess);
        REQUIRE(cudaEventSynchronize(e1) == cudaSuccess);
        float t = 0;
        REQUIRE(cudaEventElapsedTime(&t, e0, e1) == cudaSuccess);
        if (it >= 3) ms.push_back(t);
      }
      std::sort(ms.begin(), ms.end());
      return (ms[9] + ms[10]) / 2;
    };
    const float tf = time(false), tfb = time(true), tb = time_bwd();
    // Causal attention FLOPs: 4 b h s^2 d / 2 forward, 2.5x that for forward + backward.
    const double flops = 4.0 * s.batch * s.hq * s.seq * s.seq * s.d / 2;
    std::printf("kd  batch %lld seq %lld hq %lld hkv %lld d %lld: fwd %.3f ms (%.0f TFLOP/s)  fwd+bwd %.3f ms (%.0f TFLOP/s)  bwd %.3f ms\n",
                static_cast<long long>(s.batch), static_cast<long long>(s.seq), static_cast<long long>(s.hq),
                static_cast<long long>(s.hkv), static_cast<long long>(s.d), tf, flops / tf * 1e-9, tfb,
                3.5 * flops / tfb * 1e-9, tb);
    CHECK(all_finite(to_double(dq.download())));
    cudaEventDestroy(e0);
    cudaEventDestroy(e1);
  }
}
