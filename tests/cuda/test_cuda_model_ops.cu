// kd::model::cuda_ops<T> (kd/model/cuda/ops.cuh) against the CPU reference cpu_ops<double> on the same
// values: every op gets fresh random inputs rounded to T, outputs poisoned with NaN bytes (accumulate
// targets get random values instead), and is compared with the fp64 reference by relative L2 error
// (1e-5 for float, 1e-2 for bfloat16). Shapes include odd sizes (scalar paths), vector-friendly sizes
// (16-byte paths) and the tiny test models' sizes. Index outputs (router choices, dispatch) must match
// exactly. Each case runs on its own non-blocking stream, so an op that used another stream would race.
#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include <kd/model/cuda/ops.cuh>
#include <kd/model/ops_cpu.hpp>

#include "gpu_util.cuh"

using namespace kd_test;
using kd::errc;
using kd::model::index_t;

namespace {

using ref_t = kd::model::cpu_ops<double>;
using dvec = std::vector<double>;
using ivec = std::vector<index_t>;
template <class U>
using darray = kd::model::cuda::device_array<U>;

// One stream, context and backend per case.
template <class T>
struct fixture {
  cudaStream_t stream = nullptr;
  kd::cuda::context* ctx = nullptr;
  kd::model::cuda_ops<T>* ops = nullptr;
  ref_t ref;
  fixture() {
    REQUIRE(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking) == cudaSuccess);
    ctx = new kd::cuda::context(stream);
    ops = new kd::model::cuda_ops<T>(*ctx);
  }
  ~fixture() {
    cudaStreamSynchronize(stream);
    delete ops;
    delete ctx;
    cudaStreamDestroy(stream);
  }
  fixture(const fixture&) = delete;
  fixture& operator=(const fixture&) = delete;
};

template <class U>
darray<U> dev(const std::vector<U>& h) {
  darray<U> d;
  REQUIRE(d.allocate(h.size(), nullptr).ok());
  REQUIRE(cudaDeviceSynchronize() == cudaSuccess);
  if (!h.empty()) REQUIRE(cudaMemcpy(d.data(), h.data(), h.size() * sizeof(U), cudaMemcpyHostToDevice) == cudaSuccess);
  // From pageable memory cudaMemcpy may return before the last staged chunk reaches the device, and the
  // legacy stream does not order the case's non-blocking stream: wait, or the op can read stale memory.
  REQUIRE(cudaDeviceSynchronize() == cudaSuccess);
  return d;
}

// All-ones bytes: NaN in float / bfloat16, -1 in index_t; an element the op failed to write stays so.
template <class U>
darray<U> poisoned(std::size_t n) {
  darray<U> d;
  REQUIRE(d.allocate(n, nullptr).ok());
  if (n > 0) REQUIRE(cudaMemset(d.data(), 0xff, n * sizeof(U)) == cudaSuccess);
  REQUIRE(cudaDeviceSynchronize() == cudaSuccess);
  return d;
}

template <class U>
std::vector<U> host(const darray<U>& d) {
  REQUIRE(cudaDeviceSynchronize() == cudaSuccess);
  std::vector<U> h(d.size());
  if (!h.empty()) REQUIRE(cudaMemcpy(h.data(), d.data(), h.size() * sizeof(U), cudaMemcpyDeviceToHost) == cudaSuccess);
  return h;
}

template <class T>
std::vector<T> rnd(std::size_t n, double sd = 1.0) {
  return random_storage<T>(n, sd, rng());
}

template <class U>
std::vector<U> round_to(const dvec& v) {
  std::vector<U> out(v.size());
  for (std::size_t i = 0; i < v.size(); ++i) out[i] = kd::store_as<U>(static_cast<float>(v[i]));
  return out;
}

template <class T>
constexpr double tol() {
  return tolerance<T>();
}

void near(const dvec& got, const dvec& ref, double tolerance_, const std::string& what) {
  INFO(what);
  REQUIRE(got.size() == ref.size());
  CHECK(all_finite(got));
  const double e = rel_error(got, ref);
  INFO("relative L2 error " << e);
  CHECK(e < tolerance_);
}

bool all_poison_bytes(const void* p, std::size_t bytes) {
  const auto* b = static_cast<const unsigned char*>(p);
  return std::all_of(b, b + bytes, [](unsigned char c) { return c == 0xff; });
}

// k distinct experts per token, random.
ivec random_choices(std::int64_t n, std::int64_t e, std::int64_t k) {
  ivec out(static_cast<std::size_t>(n * k));
  ivec all(static_cast<std::size_t>(e));
  for (std::int64_t t = 0; t < n; ++t) {
    std::iota(all.begin(), all.end(), 0);
    std::shuffle(all.begin(), all.end(), rng());
    std::copy_n(all.begin(), k, out.begin() + t * k);
  }
  return out;
}

ivec random_ids(std::size_t n, std::int64_t bound) {
  std::uniform_int_distribution<index_t> d(0, static_cast<index_t>(bound - 1));
  ivec out(n);
  for (auto& x : out) x = d(rng());
  return out;
}

ivec random_permutation(std::size_t n) {
  ivec p(n);
  std::iota(p.begin(), p.end(), 0);
  std::shuffle(p.begin(), p.end(), rng());
  return p;
}

std::vector<float> rnd_float(std::size_t n, double sd = 1.0) { return random_storage<float>(n, sd, rng()); }

}  // namespace

// ---------------------------------------------------------------------------------------------------
// memory
// ---------------------------------------------------------------------------------------------------
TEST_CASE_TEMPLATE("cuda_ops: memory ops", T, float, kd::bfloat16) {
  fixture<T> f;
  auto& ops = *f.ops;
  CHECK(std::string(kd::model::cuda_ops<T>::name()) == "cuda");
  auto buf = ops.template alloc<T>(37);
  REQUIRE(buf.size() == 37);
  std::vector<T> back(37);
  REQUIRE(ops.download(buf.data(), 37, back.data()).ok());
  CHECK(std::all_of(back.begin(), back.end(), [](T v) { return kd::load_as<double>(v) == 0.0; }));
  CHECK(ops.template alloc<T>(0).size() == 0);
  typename kd::model::cuda_ops<T>::template buffer<float> fb;
  REQUIRE(ops.alloc(fb, 5).ok());
  CHECK(fb.size() == 5);

  const auto a = rnd<T>(37), b = rnd<T>(37);
  REQUIRE(ops.upload(a.data(), 37, buf.data()).ok());
  auto other = ops.template alloc<T>(37);
  REQUIRE(ops.copy(buf.data(), other.data(), 37).ok());
  auto bx = dev(b);
  REQUIRE(ops.add(other.data(), bx.data(), 37).ok());
  REQUIRE(ops.download(other.data(), 37, back.data()).ok());
  dvec ref = to_double(a);
  REQUIRE(f.ref.add(ref.data(), to_double(b).data(), 37).ok());
  near(to_double(back), ref, tol<T>(), "copy + add");
  REQUIRE(ops.fill_zero(other.data(), 37).ok());
  REQUIRE(ops.download(other.data(), 37, back.data()).ok());
  CHECK(std::all_of(back.begin(), back.end(), [](T v) { return kd::load_as<double>(v) == 0.0; }));

  // copy_rows: a column slice of one matrix into a column slice of another, the rest untouched; odd strides
  // (cudaMemcpy2DAsync) and whole 16-byte vectors (the vector kernel: 8 bf16 / 4 float columns align).
  auto copy_rows_case = [&](std::int64_t rows, std::int64_t cols, std::int64_t src_ld, std::int64_t src_off,
                            std::int64_t dst_ld, std::int64_t dst_off) {
    CAPTURE(src_ld);
    CAPTURE(dst_ld);
    const auto src = rnd<T>(static_cast<std::size_t>(rows * src_ld)), dst0 = rnd<T>(static_cast<std::size_t>(rows * dst_ld));
    auto ds = dev(src), dd = dev(dst0);
    REQUIRE(ops.copy_rows(ds.data() + src_off, src_ld, dd.data() + dst_off, dst_ld, rows, cols).ok());
    const auto got = host(dd);
    bool ok = true;
    for (std::int64_t r = 0; r < rows; ++r)
      for (std::int64_t c = 0; c < dst_ld; ++c) {
        const bool in = c >= dst_off && c < dst_off + cols;
        const T want = in ? src[static_cast<std::size_t>(r * src_ld + src_off + c - dst_off)]
                          : dst0[static_cast<std::size_t>(r * dst_ld + c)];
        ok = ok && kd::load_as<double>(got[static_cast<std::size_t>(r * dst_ld + c)]) == kd::load_as<double>(want);
      }
    CHECK(ok);
  };
  copy_rows_case(5, 4, 9, 3, 7, 2);
  copy_rows_case(300, 16, 48, 32, 24, 8);
  {
    auto a = ops.template alloc<T>(64);
    CHECK(ops.copy_rows(a.data(), 3, a.data(), 7, 5, 4).code() == errc::invalid_argument);
  }

  // add over a long odd length and an offset (unaligned) pointer: vector body, scalar tail, scalar path.
  for (std::size_t off : {std::size_t{0}, std::size_t{1}}) {
    const std::size_t n = 10007;
    const auto y0 = rnd<T>(n + 1), x0 = rnd<T>(n + 1);
    auto y = dev(y0), x = dev(x0);
    REQUIRE(ops.add(y.data() + off, x.data() + off, n).ok());
    dvec ry = to_double(y0), rx = to_double(x0);
    REQUIRE(f.ref.add(ry.data() + off, rx.data() + off, n).ok());
    near(to_double(host(y)), ry, tol<T>(), "add, offset " + std::to_string(off));
  }
}

// ---------------------------------------------------------------------------------------------------
// dense
// ---------------------------------------------------------------------------------------------------
TEST_CASE_TEMPLATE("cuda_ops: linear, linear_dx, linear_dw", T, float, kd::bfloat16) {
  fixture<T> f;
  auto& ops = *f.ops;
  struct shape {
    std::int64_t m, n, k;
  };
  for (shape s : {shape{37, 40, 72}, shape{1, 1, 1}, shape{24, 32, 32}, shape{24, 97, 32}, shape{24, 64, 32},
                  shape{19, 33, 15}, shape{256, 576, 1024}, shape{300, 8, 1024}, shape{19, 3, 40}, shape{77, 16, 64}}) {
    CAPTURE(s.m);
    CAPTURE(s.n);
    CAPTURE(s.k);
    const auto sz = [](std::int64_t a, std::int64_t b) { return static_cast<std::size_t>(a * b); };
    const auto x = rnd<T>(sz(s.m, s.k)), w = rnd<T>(sz(s.n, s.k)), dy = rnd<T>(sz(s.m, s.n));
    for (bool acc : {false, true}) {
      CAPTURE(acc);
      const auto y0 = rnd<T>(sz(s.m, s.n));
      auto dx_ = dev(x), dw_ = dev(w);
      auto y = acc ? dev(y0) : poisoned<T>(sz(s.m, s.n));
      REQUIRE(ops.linear(dx_.data(), dw_.data(), y.data(), s.m, s.n, s.k, acc).ok());
      dvec ry = to_double(y0);
      REQUIRE(f.ref.linear(to_double(x).data(), to_double(w).data(), ry.data(), s.m, s.n, s.k, acc).ok());
      near(to_double(host(y)), ry, tol<T>(), "linear");

      const auto g0 = rnd<T>(sz(s.m, s.k));
      auto ddy = dev(dy);
      auto g = acc ? dev(g0) : poisoned<T>(sz(s.m, s.k));
      REQUIRE(ops.linear_dx(ddy.data(), dw_.data(), g.data(), s.m, s.n, s.k, acc).ok());
      dvec rg = to_double(g0);
      REQUIRE(f.ref.linear_dx(to_double(dy).data(), to_double(w).data(), rg.data(), s.m, s.n, s.k, acc).ok());
      near(to_double(host(g)), rg, tol<T>(), "linear_dx");
    }
    for (bool acc : {true, false}) {  // accumulate (the default) or overwrite a stale dw
      CAPTURE(acc);
      const auto gw0 = rnd<T>(sz(s.n, s.k));
      auto ddy = dev(dy), dx_ = dev(x), gw = dev(gw0);
      REQUIRE(ops.linear_dw(ddy.data(), dx_.data(), gw.data(), s.m, s.n, s.k, acc).ok());
      dvec rgw = to_double(gw0);
      REQUIRE(f.ref.linear_dw(to_double(dy).data(), to_double(x).data(), rgw.data(), s.m, s.n, s.k, acc).ok());
      near(to_double(host(gw)), rgw, tol<T>(), "linear_dw");
    }
  }
  // Grouped weight gradients, overwriting: an empty group's dw becomes zero, the others the group's product.
  {
    const std::int64_t G = 4, N = 24, K = 40;
    const std::vector<std::int64_t> counts{7, 0, 13, 5};
    const std::int64_t M = 25;
    const auto dy = rnd<T>(static_cast<std::size_t>(M * N)), x = rnd<T>(static_cast<std::size_t>(M * K));
    const auto stale = rnd<T>(static_cast<std::size_t>(G * N * K));
    auto ddy = dev(dy), dx_ = dev(x), gw = dev(stale);
    REQUIRE(ops.grouped_linear_dw(ddy.data(), dx_.data(), gw.data(), counts.data(), G, N, K, false).ok());
    dvec rgw = to_double(stale);
    REQUIRE(f.ref.grouped_linear_dw(to_double(dy).data(), to_double(x).data(), rgw.data(), counts.data(), G, N, K, false).ok());
    near(to_double(host(gw)), rgw, tol<T>(), "grouped_linear_dw overwrite");
    for (std::size_t i = static_cast<std::size_t>(N * K); i < static_cast<std::size_t>(2 * N * K); ++i) CHECK(rgw[i] == 0.0);
  }
  // M = 0: an overwriting dw is zeroed.
  {
    auto gw = dev(rnd<T>(12));
    REQUIRE(ops.linear_dw(nullptr, nullptr, gw.data(), 0, 3, 4, false).ok());
    for (T v : host(gw)) CHECK(kd::load_as<double>(v) == 0.0);
  }
  // K = 0: an empty sum overwrites y with zeros.
  auto y = poisoned<T>(15);
  REQUIRE(ops.linear(nullptr, nullptr, y.data(), 5, 3, 0, false).ok());
  for (T v : host(y)) CHECK(kd::load_as<double>(v) == 0.0);
}

TEST_CASE_TEMPLATE("cuda_ops: embedding and embedding_dw", T, float, kd::bfloat16) {
  fixture<T> f;
  auto& ops = *f.ops;
  struct shape {
    std::int64_t n, v, h;
  };
  for (shape s : {shape{37, 13, 40}, shape{37, 13, 37}, shape{24, 97, 32}, shape{24, 61, 32}, shape{2000, 50, 576},
                  shape{1, 1, 8}}) {
    CAPTURE(s.n);
    CAPTURE(s.v);
    CAPTURE(s.h);
    const auto ids = random_ids(static_cast<std::size_t>(s.n), s.v);
    const auto table = rnd<T>(static_cast<std::size_t>(s.v * s.h));
    auto dids = dev(ids);
    auto dtable = dev(table);
    auto out = poisoned<T>(static_cast<std::size_t>(s.n * s.h));
    REQUIRE(ops.embedding(dids.data(), dtable.data(), out.data(), s.n, s.v, s.h).ok());
    dvec rout(static_cast<std::size_t>(s.n * s.h));
    REQUIRE(f.ref.embedding(ids.data(), to_double(table).data(), rout.data(), s.n, s.v, s.h).ok());
    near(to_double(host(out)), rout, tol<T>(), "embedding");

    const auto dout = rnd<T>(static_cast<std::size_t>(s.n * s.h)), dt0 = rnd<T>(static_cast<std::size_t>(s.v * s.h));
    auto ddout = dev(dout), dt = dev(dt0);
    REQUIRE(ops.embedding_dw(dids.data(), ddout.data(), dt.data(), s.n, s.v, s.h).ok());
    dvec rdt = to_double(dt0);
    REQUIRE(f.ref.embedding_dw(ids.data(), to_double(dout).data(), rdt.data(), s.n, s.v, s.h).ok());
    near(to_double(host(dt)), rdt, tol<T>(), "embedding_dw");
  }
}

// ---------------------------------------------------------------------------------------------------
// norms, rope, swiglu
// ---------------------------------------------------------------------------------------------------
TEST_CASE_TEMPLATE("cuda_ops: rmsnorm and rmsnorm_bwd", T, float, kd::bfloat16) {
  fixture<T> f;
  auto& ops = *f.ops;
  struct shape {
    std::int64_t r, d;
  };
  const double eps = 1e-6;
  for (shape s : {shape{37, 72}, shape{37, 70}, shape{24, 32}, shape{3000, 40}, shape{129, 1024}, shape{64, 576},
                  shape{5, 20000}, shape{1, 3}}) {
    CAPTURE(s.r);
    CAPTURE(s.d);
    const std::size_t n = static_cast<std::size_t>(s.r * s.d), d = static_cast<std::size_t>(s.d);
    const auto x = rnd<T>(n, 2.0), w = rnd<T>(d), dy = rnd<T>(n);
    auto dx_ = dev(x), dw_ = dev(w);
    auto y = poisoned<T>(n), xc = poisoned<T>(n);
    auto rstd = poisoned<float>(static_cast<std::size_t>(s.r));
    REQUIRE(ops.rmsnorm(dx_.data(), dw_.data(), y.data(), rstd.data(), s.r, s.d, eps, xc.data()).ok());
    CHECK(to_double(host(xc)) == to_double(x));  // the copy of x, written by the same pass
    dvec ry(n), rr(static_cast<std::size_t>(s.r));
    REQUIRE(f.ref.rmsnorm(to_double(x).data(), to_double(w).data(), ry.data(), rr.data(), s.r, s.d, eps).ok());
    near(to_double(host(y)), ry, tol<T>(), "rmsnorm y");
    near(to_double(host(rstd)), rr, 1e-5, "rmsnorm rstd");

    // Backward from the same (float-rounded) rstd on both sides.
    const auto rstd_f = round_to<float>(rr);
    auto drstd = dev(rstd_f);
    auto ddy = dev(dy);
    for (bool acc : {false, true}) {
      CAPTURE(acc);
      const auto gx0 = rnd<T>(n), gw0 = rnd<T>(d);
      auto gx = acc ? dev(gx0) : poisoned<T>(n);
      auto gw = dev(gw0);
      REQUIRE(ops.rmsnorm_bwd(dx_.data(), dw_.data(), drstd.data(), ddy.data(), gx.data(), gw.data(), s.r, s.d, acc).ok());
      dvec rgx = to_double(gx0), rgw = to_double(gw0);
      REQUIRE(f.ref.rmsnorm_bwd(to_double(x).data(), to_double(w).data(), to_double(rstd_f).data(), to_double(dy).data(),
                                rgx.data(), rgw.data(), s.r, s.d, acc)
                  .ok());
      near(to_double(host(gx)), rgx, tol<T>(), "rmsnorm_bwd dx");
      near(to_double(host(gw)), rgw, tol<T>(), "rmsnorm_bwd dw");
    }
  }
}

TEST_CASE_TEMPLATE("cuda_ops: rmsnorm_rope (QK norm + RoPE) fused and unfused", T, float, kd::bfloat16) {
  fixture<T> f;
  auto& ops = *f.ops;
  struct shape {
    std::int64_t tokens, heads, d;
  };
  // d 64 / 128 take the fused kernels (one 16-byte vector per lane), 8 / 72 the composition; many rows
  // leave partial warps and blocks. Each runs on a dense x and on x as a column slice of a wider matrix
  // (the fused QKV layout; x_ld / ld), with an aligned stride (fused kernels) and an odd one (fallback).
  for (shape s : {shape{300, 16, 64}, shape{77, 4, 128}, shape{33, 3, 64}, shape{24, 4, 8}, shape{19, 2, 72}})
    for (int layout : {0, 1, 2}) {
      CAPTURE(s.tokens);
      CAPTURE(s.heads);
      CAPTURE(s.d);
      CAPTURE(layout);
      const std::int64_t rows = s.tokens * s.heads, HD = s.heads * s.d;
      const std::int64_t ld = layout == 0 ? HD : layout == 1 ? HD + 2 * s.d : HD + 1, off = layout == 0 ? 0 : layout == 1 ? s.d : 1;
      const std::size_t n = static_cast<std::size_t>(rows * s.d), d = static_cast<std::size_t>(s.d);
      const std::size_t wn = static_cast<std::size_t>(s.tokens * ld);
      const double eps = 1e-6, theta = 1e6;
      const auto x = rnd<T>(n, 2.0), w = rnd<T>(d), dy = rnd<T>(n);
      auto wide = rnd<T>(wn);  // x inside columns [off, off + HD) of [tokens, ld]
      for (std::int64_t t = 0; t < s.tokens; ++t)
        std::copy_n(x.begin() + t * HD, HD, wide.begin() + t * ld + off);
      const auto pos = random_ids(static_cast<std::size_t>(s.tokens), 4096);
      auto dwide = dev(wide), dw_ = dev(w), ddy = dev(dy);
      const T* xs = dwide.data() + off;
      const std::int64_t ld_arg = layout == 0 ? 0 : ld;
      auto dpos = dev(pos);
      auto y = poisoned<T>(n);
      auto rstd = poisoned<float>(static_cast<std::size_t>(rows));
      REQUIRE(ops.rmsnorm_rope(xs, dw_.data(), y.data(), rstd.data(), dpos.data(), s.tokens, s.heads, s.d, eps, theta,
                               ld_arg).ok());
      dvec ry(n), rr(static_cast<std::size_t>(rows));
      REQUIRE(f.ref.rmsnorm_rope(to_double(x).data(), to_double(w).data(), ry.data(), rr.data(), pos.data(), s.tokens,
                                 s.heads, s.d, eps, theta).ok());
      near(to_double(host(y)), ry, tol<T>(), "rmsnorm_rope y");
      near(to_double(host(rstd)), rr, 1e-5, "rmsnorm_rope rstd");

      const auto rstd_f = round_to<float>(rr);
      auto drstd = dev(rstd_f);
      const auto gw0 = rnd<T>(d), filler = rnd<T>(wn);
      auto gwide = dev(filler);
      auto gw = dev(gw0);
      REQUIRE(ops.rmsnorm_rope_bwd(xs, dw_.data(), drstd.data(), dpos.data(), ddy.data(), gwide.data() + off, gw.data(),
                                   s.tokens, s.heads, s.d, theta, ld_arg).ok());
      dvec rgx(n), rgw = to_double(gw0);
      REQUIRE(f.ref.rmsnorm_rope_bwd(to_double(x).data(), to_double(w).data(), to_double(rstd_f).data(), pos.data(),
                                     to_double(dy).data(), rgx.data(), rgw.data(), s.tokens, s.heads, s.d, theta).ok());
      const auto got = host(gwide);
      std::vector<T> gx(n);
      bool others_kept = true;
      for (std::int64_t t = 0; t < s.tokens; ++t)
        for (std::int64_t c = 0; c < ld; ++c) {
          const std::size_t i = static_cast<std::size_t>(t * ld + c);
          if (c >= off && c < off + HD) gx[static_cast<std::size_t>(t * HD + c - off)] = got[i];
          else others_kept = others_kept && kd::load_as<double>(got[i]) == kd::load_as<double>(filler[i]);
        }
      CHECK(others_kept);
      near(to_double(gx), rgx, tol<T>(), "rmsnorm_rope_bwd dx");
      near(to_double(host(gw)), rgw, tol<T>(), "rmsnorm_rope_bwd dw");
    }
  CHECK(ops.rmsnorm_rope(nullptr, nullptr, nullptr, nullptr, nullptr, 4, 2, 8, 1e-6, 1e4, 15).code() ==
        errc::invalid_argument);  // a stride below heads * D
}

TEST_CASE_TEMPLATE("cuda_ops: rope forward and inverse", T, float, kd::bfloat16) {
  fixture<T> f;
  auto& ops = *f.ops;
  struct shape {
    std::int64_t tokens, heads, d;
    double theta;
  };
  for (shape s : {shape{37, 3, 72, 10000.0}, shape{37, 4, 64, 1000000.0}, shape{24, 4, 8, 10000.0},
                  shape{24, 2, 8, 10000.0}, shape{300, 16, 128, 1000000.0}, shape{19, 5, 10, 500.0}, shape{7, 1, 2, 10000.0}}) {
    CAPTURE(s.tokens);
    CAPTURE(s.heads);
    CAPTURE(s.d);
    const std::size_t n = static_cast<std::size_t>(s.tokens * s.heads * s.d);
    const auto pos = random_ids(static_cast<std::size_t>(s.tokens), 8192);
    auto dpos = dev(pos);
    for (bool inverse : {false, true}) {
      CAPTURE(inverse);
      const auto x0 = rnd<T>(n);
      auto x = dev(x0);
      REQUIRE(ops.rope(x.data(), dpos.data(), s.tokens, s.heads, s.d, s.theta, inverse).ok());
      dvec rx = to_double(x0);
      REQUIRE(f.ref.rope(rx.data(), pos.data(), s.tokens, s.heads, s.d, s.theta, inverse).ok());
      near(to_double(host(x)), rx, tol<T>(), "rope");
    }
  }
}

TEST_CASE_TEMPLATE("cuda_ops: swiglu and swiglu_bwd", T, float, kd::bfloat16) {
  fixture<T> f;
  auto& ops = *f.ops;
  struct shape {
    std::int64_t r, i;
  };
  for (shape s : {shape{37, 40}, shape{37, 37}, shape{24, 16}, shape{24, 64}, shape{512, 1536}, shape{1, 1}}) {
    CAPTURE(s.r);
    CAPTURE(s.i);
    const std::size_t n = static_cast<std::size_t>(s.r * s.i);
    const auto gu = rnd<T>(2 * n, 3.0), dh = rnd<T>(n);
    auto dgu_in = dev(gu), ddh = dev(dh);
    auto h = poisoned<T>(n);
    REQUIRE(ops.swiglu(dgu_in.data(), h.data(), s.r, s.i).ok());
    dvec rh(n);
    REQUIRE(f.ref.swiglu(to_double(gu).data(), rh.data(), s.r, s.i).ok());
    near(to_double(host(h)), rh, tol<T>(), "swiglu");
    auto dgu = poisoned<T>(2 * n);
    REQUIRE(ops.swiglu_bwd(dgu_in.data(), ddh.data(), dgu.data(), s.r, s.i).ok());
    dvec rdgu(2 * n);
    REQUIRE(f.ref.swiglu_bwd(to_double(gu).data(), to_double(dh).data(), rdgu.data(), s.r, s.i).ok());
    near(to_double(host(dgu)), rdgu, tol<T>(), "swiglu_bwd");
  }
}

// ---------------------------------------------------------------------------------------------------
// attention (the wrapper over kd/model/cuda/flash_attention.cuh)
// ---------------------------------------------------------------------------------------------------
TEST_CASE_TEMPLATE("cuda_ops: attention ops", T, float, kd::bfloat16) {
  fixture<T> f;
  auto& ops = *f.ops;
  struct shape {
    std::int64_t batch, seq, hq, hkv, d;
  };
  for (shape s : {shape{2, 37, 4, 2, 64}, shape{2, 16, 4, 2, 8}, shape{1, 70, 2, 1, 128}, shape{3, 5, 3, 3, 10}}) {
    CAPTURE(s.batch);
    CAPTURE(s.seq);
    CAPTURE(s.hq);
    CAPTURE(s.hkv);
    CAPTURE(s.d);
    const double scale = 1.0 / std::sqrt(static_cast<double>(s.d));
    const std::size_t tokens = static_cast<std::size_t>(s.batch * s.seq);
    const std::size_t nq = tokens * s.hq * s.d, nkv = tokens * s.hkv * s.d;
    const std::size_t nl = static_cast<std::size_t>(s.batch * s.hq * s.seq), np = nl * s.seq;
    const auto q = rnd<T>(nq), k = rnd<T>(nkv), v = rnd<T>(nkv), dout = rnd<T>(nq);
    const dvec rq = to_double(q), rk = to_double(k), rv = to_double(v);
    auto dq_ = dev(q), dk_ = dev(k), dv_ = dev(v), ddout = dev(dout);

    auto o = poisoned<T>(nq);
    auto lse = poisoned<float>(nl);
    REQUIRE(ops.attention(dq_.data(), dk_.data(), dv_.data(), o.data(), lse.data(), s.batch, s.seq, s.hq, s.hkv, s.d, scale).ok());
    dvec ro(nq), rl(nl);
    REQUIRE(f.ref.attention(rq.data(), rk.data(), rv.data(), ro.data(), rl.data(), s.batch, s.seq, s.hq, s.hkv, s.d, scale).ok());
    near(to_double(host(o)), ro, tol<T>(), "attention o");
    near(to_double(host(lse)), rl, 1e-5, "attention lse");

    // Backward from the reference's o and lse, rounded to the device types, on both sides.
    const auto o_t = round_to<T>(ro);
    const auto l_f = round_to<float>(rl);
    auto d_o = dev(o_t);
    auto d_l = dev(l_f);
    auto gq = poisoned<T>(nq), gk = poisoned<T>(nkv), gv = poisoned<T>(nkv);
    REQUIRE(ops.attention_bwd(dq_.data(), dk_.data(), dv_.data(), d_o.data(), d_l.data(), ddout.data(), gq.data(), gk.data(),
                              gv.data(), s.batch, s.seq, s.hq, s.hkv, s.d, scale)
                .ok());
    dvec rgq(nq), rgk(nkv), rgv(nkv);
    REQUIRE(f.ref.attention_bwd(rq.data(), rk.data(), rv.data(), to_double(o_t).data(), to_double(l_f).data(),
                                to_double(dout).data(), rgq.data(), rgk.data(), rgv.data(), s.batch, s.seq, s.hq, s.hkv, s.d,
                                scale)
                .ok());
    near(to_double(host(gq)), rgq, tol<T>(), "attention_bwd dq");
    near(to_double(host(gk)), rgk, tol<T>(), "attention_bwd dk");
    near(to_double(host(gv)), rgv, tol<T>(), "attention_bwd dv");

    auto probs = poisoned<T>(np);
    REQUIRE(ops.attention_probs(dq_.data(), dk_.data(), d_l.data(), probs.data(), s.batch, s.seq, s.hq, s.hkv, s.d, scale).ok());
    dvec rp(np);
    REQUIRE(f.ref.attention_probs(rq.data(), rk.data(), to_double(l_f).data(), rp.data(), s.batch, s.seq, s.hq, s.hkv, s.d, scale)
                .ok());
    near(to_double(host(probs)), rp, tol<T>(), "attention_probs");

    const auto p_t = round_to<T>(rp);
    const auto dp = rnd<T>(np);
    const auto gq0 = rnd<T>(nq), gk0 = rnd<T>(nkv);
    auto d_p = dev(p_t), d_dp = dev(dp), pgq = dev(gq0), pgk = dev(gk0);
    REQUIRE(ops.attention_probs_bwd(dq_.data(), dk_.data(), d_p.data(), d_dp.data(), pgq.data(), pgk.data(), s.batch, s.seq,
                                    s.hq, s.hkv, s.d, scale)
                .ok());
    dvec rpgq = to_double(gq0), rpgk = to_double(gk0);
    REQUIRE(f.ref.attention_probs_bwd(rq.data(), rk.data(), to_double(p_t).data(), to_double(dp).data(), rpgq.data(),
                                      rpgk.data(), s.batch, s.seq, s.hq, s.hkv, s.d, scale)
                .ok());
    near(to_double(host(pgq)), rpgq, tol<T>(), "attention_probs_bwd dq (accumulated)");
    near(to_double(host(pgk)), rpgk, tol<T>(), "attention_probs_bwd dk (accumulated)");
  }
}

// ---------------------------------------------------------------------------------------------------
// mixture of experts
// ---------------------------------------------------------------------------------------------------
TEST_CASE_TEMPLATE("cuda_ops: router and router_bwd", T, float, kd::bfloat16) {
  fixture<T> f;
  auto& ops = *f.ops;
  struct shape {
    std::int64_t n, e, k;
  };
  for (shape s : {shape{19, 8, 2}, shape{19, 4, 1}, shape{19, 60, 4}, shape{24, 4, 2}, shape{37, 256, 8}, shape{37, 33, 3},
                  shape{4096, 128, 8}}) {
    for (bool renorm : {false, true}) {
      CAPTURE(s.n);
      CAPTURE(s.e);
      CAPTURE(s.k);
      CAPTURE(renorm);
      const std::size_t ne = static_cast<std::size_t>(s.n * s.e), nk = static_cast<std::size_t>(s.n * s.k);
      const auto logits = rnd<T>(ne, 2.0);
      auto dlog = dev(logits);
      auto probs = poisoned<float>(ne);
      auto idx = poisoned<index_t>(nk);
      auto w = poisoned<float>(nk);
      REQUIRE(ops.router(dlog.data(), probs.data(), idx.data(), w.data(), s.n, s.e, s.k, renorm).ok());
      dvec rp(ne), rw(nk);
      ivec ridx(nk);
      REQUIRE(f.ref.router(to_double(logits).data(), rp.data(), ridx.data(), rw.data(), s.n, s.e, s.k, renorm).ok());
      const auto got_p = host(probs);
      const auto got_idx = host(idx);
      near(to_double(got_p), rp, 1e-5, "router probs");
      CHECK(got_idx == ridx);
      near(to_double(host(w)), rw, 1e-5, "router topk_w");

      // Backward from the device's probabilities and choices, with and without dprobs_extra.
      for (bool extra : {false, true}) {
        CAPTURE(extra);
        const auto dtw = rnd_float(nk), dpx = rnd_float(ne);
        auto ddtw = dev(dtw), ddpx = dev(dpx);
        auto dz = poisoned<T>(ne);
        REQUIRE(ops.router_bwd(probs.data(), idx.data(), ddtw.data(), extra ? ddpx.data() : nullptr, dz.data(), s.n, s.e, s.k,
                               renorm)
                    .ok());
        dvec rdz(ne);
        REQUIRE(f.ref.router_bwd(to_double(got_p).data(), got_idx.data(), to_double(dtw).data(),
                                 extra ? to_double(dpx).data() : nullptr, rdz.data(), s.n, s.e, s.k, renorm)
                    .ok());
        near(to_double(host(dz)), rdz, tol<T>(), "router_bwd");
      }
    }
  }
}

TEST_CASE("cuda_ops: router ties go to the lower expert index") {
  fixture<kd::bfloat16> f;
  auto& ops = *f.ops;
  for (std::int64_t e : {4, 8, 60, 256}) {
    for (std::int64_t k : {1, 2, 4}) {
      CAPTURE(e);
      CAPTURE(k);
      const std::int64_t n = 5;
      std::vector<kd::bfloat16> logits(static_cast<std::size_t>(n * e), kd::bfloat16(0.75f));
      // Token 1: two groups of equal values; the larger group sits at high indices.
      for (std::int64_t x = e / 2; x < e; ++x) logits[static_cast<std::size_t>(e + x)] = kd::bfloat16(1.5f);
      auto dlog = dev(logits);
      auto probs = poisoned<float>(static_cast<std::size_t>(n * e));
      auto idx = poisoned<index_t>(static_cast<std::size_t>(n * k));
      auto w = poisoned<float>(static_cast<std::size_t>(n * k));
      REQUIRE(ops.router(dlog.data(), probs.data(), idx.data(), w.data(), n, e, k, false).ok());
      const auto got = host(idx);
      const auto gw = host(w);
      for (std::int64_t t = 0; t < n; ++t)
        for (std::int64_t j = 0; j < k; ++j) {
          // token 1: the high half (descending value) first, then the low half, each in index order
          const index_t expect = static_cast<index_t>(t != 1 ? j : j < e - e / 2 ? e / 2 + j : j - (e - e / 2));
          CHECK(got[static_cast<std::size_t>(t * k + j)] == expect);
          if (t != 1) CHECK(std::abs(gw[static_cast<std::size_t>(t * k + j)] - 1.0 / static_cast<double>(e)) < 1e-6);
        }
    }
  }
}

TEST_CASE("cuda_ops: moe_dispatch matches the reference exactly") {
  fixture<float> f;
  auto& ops = *f.ops;
  struct shape {
    std::int64_t n, e, k;
  };
  for (shape s : {shape{19, 8, 2}, shape{19, 4, 1}, shape{19, 60, 4}, shape{24, 4, 2}, shape{1000, 256, 8},
                  shape{8192, 8, 2}, shape{1, 3, 3}, shape{0, 4, 2}}) {
    CAPTURE(s.n);
    CAPTURE(s.e);
    CAPTURE(s.k);
    const std::size_t nk = static_cast<std::size_t>(s.n * s.k);
    const auto choice = random_choices(s.n, s.e, s.k);
    auto dch = dev(choice);
    auto st = poisoned<index_t>(nk), ts = poisoned<index_t>(nk);
    std::vector<std::int64_t> counts(static_cast<std::size_t>(s.e), -1), rcounts(static_cast<std::size_t>(s.e));
    REQUIRE(ops.moe_dispatch(dch.data(), s.n, s.e, s.k, st.data(), ts.data(), counts.data()).ok());
    REQUIRE(ops.sync_counts().ok());  // counts_host is complete once sync_counts returns
    ivec rst(nk), rts(nk);
    REQUIRE(f.ref.moe_dispatch(choice.data(), s.n, s.e, s.k, rst.data(), rts.data(), rcounts.data()).ok());
    CHECK(counts == rcounts);
    CHECK(host(st) == rst);
    CHECK(host(ts) == rts);
  }
  // An expert id outside [0, E) is reported.
  const ivec bad{0, 1, 7, 2};
  auto dbad = dev(bad);
  auto st = poisoned<index_t>(4), ts = poisoned<index_t>(4);
  std::vector<std::int64_t> counts(4);
  REQUIRE(ops.moe_dispatch(dbad.data(), 4, 4, 1, st.data(), ts.data(), counts.data()).ok());
  CHECK(ops.sync_counts().code() == errc::out_of_range);
  CHECK(ops.sync_counts().ok());  // reported once
  // A grouped GEMM collects pending counts itself, and so reports them too.
  REQUIRE(ops.moe_dispatch(dbad.data(), 4, 4, 1, st.data(), ts.data(), counts.data()).ok());
  auto gx = dev(rnd<float>(16)), gw = dev(rnd<float>(64)), gy = poisoned<float>(16);
  CHECK(ops.grouped_linear(gx.data(), gw.data(), gy.data(), counts.data(), 4, 4, 4, false).code() == errc::out_of_range);
  // Two dispatches in a row: the first one's counts arrive before the second is queued.
  const auto c1 = random_choices(64, 8, 2), c2 = random_choices(64, 8, 2);
  auto d1 = dev(c1), d2 = dev(c2);
  auto s1 = poisoned<index_t>(128), t1 = poisoned<index_t>(128);
  std::vector<std::int64_t> k1(8, -1), k2(8, -1), r1(8), r2(8);
  ivec rs(128), rt(128);
  REQUIRE(ops.moe_dispatch(d1.data(), 64, 8, 2, s1.data(), t1.data(), k1.data()).ok());
  REQUIRE(ops.moe_dispatch(d2.data(), 64, 8, 2, s1.data(), t1.data(), k2.data()).ok());
  REQUIRE(ops.sync_counts().ok());
  REQUIRE(f.ref.moe_dispatch(c1.data(), 64, 8, 2, rs.data(), rt.data(), r1.data()).ok());
  REQUIRE(f.ref.moe_dispatch(c2.data(), 64, 8, 2, rs.data(), rt.data(), r2.data()).ok());
  CHECK(k1 == r1);
  CHECK(k2 == r2);
}

TEST_CASE_TEMPLATE("cuda_ops: gather_rows, moe_combine, moe_combine_bwd, moe_gather_add", T, float, kd::bfloat16) {
  fixture<T> f;
  auto& ops = *f.ops;
  struct shape {
    std::int64_t n, k, h;
  };
  for (shape s : {shape{19, 2, 40}, shape{19, 1, 37}, shape{19, 4, 72}, shape{24, 2, 32}, shape{1024, 8, 1024},
                  shape{1, 1, 1}}) {
    CAPTURE(s.n);
    CAPTURE(s.k);
    CAPTURE(s.h);
    const std::size_t nk = static_cast<std::size_t>(s.n * s.k), nh = static_cast<std::size_t>(s.n * s.h), sh = nk * s.h;
    // gather_rows: S = N*k rows of x[N, H]
    const auto x = rnd<T>(nh);
    const auto rows = random_ids(nk, s.n);
    auto dx_ = dev(x);
    auto drows = dev(rows);
    auto g = poisoned<T>(sh);
    REQUIRE(ops.gather_rows(dx_.data(), drows.data(), g.data(), static_cast<std::int64_t>(nk), s.h).ok());
    dvec rg(sh);
    REQUIRE(f.ref.gather_rows(to_double(x).data(), rows.data(), rg.data(), static_cast<std::int64_t>(nk), s.h).ok());
    near(to_double(host(g)), rg, tol<T>(), "gather_rows");

    const auto slots = random_permutation(nk);
    const auto y = rnd<T>(sh), dout = rnd<T>(nh);
    const auto w = rnd_float(nk);
    auto dslots = dev(slots);
    auto dy_ = dev(y), ddout = dev(dout);
    auto dw_ = dev(w);
    for (int mode : {0, 1, 2}) {  // no residual, residual in place (+=), residual from another tensor
      CAPTURE(mode);
      const auto o0 = rnd<T>(nh);
      auto o = mode == 1 ? dev(o0) : poisoned<T>(nh);
      auto res = dev(o0);
      const T* residual = mode == 0 ? nullptr : mode == 1 ? o.data() : res.data();
      REQUIRE(ops.moe_combine(dy_.data(), dslots.data(), dw_.data(), residual, o.data(), s.n, s.k, s.h).ok());
      dvec ro(nh), r0 = to_double(o0);
      REQUIRE(f.ref.moe_combine(to_double(y).data(), slots.data(), to_double(w).data(), mode == 0 ? nullptr : r0.data(),
                                ro.data(), s.n, s.k, s.h)
                  .ok());
      near(to_double(host(o)), ro, tol<T>(), "moe_combine");
    }
    auto gy = poisoned<T>(sh);
    auto gw = poisoned<float>(nk);
    REQUIRE(ops.moe_combine_bwd(dy_.data(), dslots.data(), dw_.data(), ddout.data(), gy.data(), gw.data(), s.n, s.k, s.h).ok());
    dvec rgy(sh), rgw(nk);
    REQUIRE(f.ref.moe_combine_bwd(to_double(y).data(), slots.data(), to_double(w).data(), to_double(dout).data(), rgy.data(),
                                  rgw.data(), s.n, s.k, s.h)
                .ok());
    near(to_double(host(gy)), rgy, tol<T>(), "moe_combine_bwd dy");
    near(to_double(host(gw)), rgw, sizeof(T) == 2 ? 1e-5 : 1e-5, "moe_combine_bwd dtopk_w");

    const std::int64_t E = 8;  // the fused router term, on and off
    const auto dl = rnd<T>(static_cast<std::size_t>(s.n * E)), wr = rnd<T>(static_cast<std::size_t>(E * s.h));
    auto ddl = dev(dl), dwr = dev(wr);
    for (bool acc : {false, true})
      for (std::int64_t e : {std::int64_t{0}, E}) {
        CAPTURE(acc);
        CAPTURE(e);
        const auto gx0 = rnd<T>(nh);
        auto gx = acc ? dev(gx0) : poisoned<T>(nh);
        REQUIRE(ops.moe_gather_add(dy_.data(), dslots.data(), gx.data(), s.n, s.k, s.h, acc, e ? ddl.data() : nullptr,
                                   e ? dwr.data() : nullptr, e)
                    .ok());
        dvec rgx = to_double(gx0);
        const dvec rdl = to_double(dl), rwr = to_double(wr);
        REQUIRE(f.ref.moe_gather_add(to_double(y).data(), slots.data(), rgx.data(), s.n, s.k, s.h, acc,
                                     e ? rdl.data() : nullptr, e ? rwr.data() : nullptr, e)
                    .ok());
        near(to_double(host(gx)), rgx, tol<T>(), "moe_gather_add");
      }
  }
}

// ---------------------------------------------------------------------------------------------------
// argument checks: the right code, nothing launched (poisoned outputs stay poisoned)
// ---------------------------------------------------------------------------------------------------
TEST_CASE("cuda_ops: bad arguments return the right errc without launching") {
  fixture<float> f;
  auto& ops = *f.ops;
  auto a = poisoned<float>(64), b = poisoned<float>(64), c = poisoned<float>(64);
  auto ids = dev(ivec(8, 0));
  auto id_out = poisoned<index_t>(64);
  CHECK(ops.linear(a.data(), b.data(), c.data(), -1, 4, 4, false).code() == errc::invalid_argument);
  CHECK(ops.linear(nullptr, b.data(), c.data(), 4, 4, 4, false).code() == errc::invalid_argument);
  CHECK(ops.linear(a.data(), b.data(), c.data(), std::int64_t{1} << 32, 1, 1, false).code() == errc::out_of_range);
  CHECK(ops.rmsnorm(nullptr, b.data(), c.data(), a.data(), 4, 8, 1e-6).code() == errc::invalid_argument);
  CHECK(ops.rmsnorm(a.data(), b.data(), c.data(), a.data(), 4, 8, -1.0).code() == errc::invalid_argument);
  CHECK(ops.rmsnorm(a.data(), b.data(), c.data(), a.data(), 4, 0, 1e-6).code() == errc::invalid_argument);
  CHECK(ops.rope(c.data(), ids.data(), 2, 2, 7, 10000.0, false).code() == errc::invalid_argument);
  CHECK(ops.rope(c.data(), ids.data(), 2, 2, 8, -1.0, false).code() == errc::invalid_argument);
  CHECK(ops.rope(c.data(), ids.data(), 1, 1, 10000, 10000.0, false).code() == errc::out_of_range);
  CHECK(ops.swiglu(a.data(), c.data(), 4, 0).code() == errc::invalid_argument);
  CHECK(ops.embedding(ids.data(), a.data(), c.data(), 8, 0, 4).code() == errc::invalid_argument);
  CHECK(ops.embedding(ids.data(), a.data(), c.data(), 8, std::int64_t{1} << 32, 4).code() == errc::out_of_range);
  CHECK(ops.router(a.data(), b.data(), id_out.data(), c.data(), 4, 4, 5, true).code() == errc::invalid_argument);
  CHECK(ops.router(a.data(), b.data(), id_out.data(), c.data(), 4, 4, 0, true).code() == errc::invalid_argument);
  CHECK(ops.router(a.data(), b.data(), id_out.data(), c.data(), 1, 300, 2, true).code() == errc::invalid_argument);
  CHECK(ops.router(a.data(), b.data(), id_out.data(), c.data(), 1, 16, 9, true).code() == errc::invalid_argument);
  CHECK(ops.router_bwd(a.data(), ids.data(), b.data(), nullptr, c.data(), 4, 2, 3, false).code() == errc::invalid_argument);
  std::int64_t counts[4];
  CHECK(ops.moe_dispatch(ids.data(), 4, 4, 2, id_out.data(), id_out.data(), nullptr).code() == errc::invalid_argument);
  CHECK(ops.moe_dispatch(ids.data(), 4, 4, 5, id_out.data(), id_out.data(), counts).code() == errc::invalid_argument);
  CHECK(ops.attention(a.data(), b.data(), b.data(), c.data(), a.data(), 1, 2, 3, 2, 8, 0.5).code() == errc::shape_mismatch);
  CHECK(ops.attention(a.data(), b.data(), b.data(), c.data(), a.data(), 1, 2, 2, 2, 8, std::nan("")).code() ==
        errc::invalid_argument);
  CHECK(ops.attention_bwd(a.data(), b.data(), b.data(), a.data(), a.data(), a.data(), nullptr, c.data(), c.data(), 1, 2, 2, 2,
                          8, 0.5)
            .code() == errc::invalid_argument);
  CHECK(ops.moe_combine(a.data(), ids.data(), b.data(), nullptr, c.data(), 4, 0, 8).code() == errc::invalid_argument);
  CHECK(ops.gather_rows(a.data(), ids.data(), c.data(), -2, 8).code() == errc::invalid_argument);
  CHECK(ops.upload<float>(nullptr, 4, c.data()).code() == errc::invalid_argument);
  const auto hc = host(c);
  const auto hi = host(id_out);
  CHECK(all_poison_bytes(hc.data(), hc.size() * sizeof(float)));
  CHECK(all_poison_bytes(hi.data(), hi.size() * sizeof(index_t)));
  // Empty extents are no-ops, not errors.
  CHECK(ops.rmsnorm(nullptr, nullptr, nullptr, nullptr, 0, 8, 1e-6).ok());
  CHECK(ops.attention(nullptr, nullptr, nullptr, nullptr, nullptr, 0, 4, 2, 2, 8, 0.5).ok());
  CHECK(ops.router(nullptr, nullptr, nullptr, nullptr, 0, 8, 2, true).ok());
}

// ---------------------------------------------------------------------------------------------------
// Timing at the seed geometry (8192 tokens, hidden 1024, MLP 1536, 16 heads of 64, 8 experts top-2), bf16.
// Skipped by default; run with -tc="*timing*" --no-skip. Prints microseconds and effective GB/s.
// ---------------------------------------------------------------------------------------------------
TEST_CASE("cuda_ops: timing at the seed geometry" * doctest::skip()) {
  using T = kd::bfloat16;
  fixture<T> f;
  auto& ops = *f.ops;
  const std::int64_t n = 8192, h = 1024, inter = 1536, heads = 16, hd = 64, e = 8, k = 2, vocab = 32000;
  cudaEvent_t e0, e1;
  REQUIRE(cudaEventCreate(&e0) == cudaSuccess);
  REQUIRE(cudaEventCreate(&e1) == cudaSuccess);
  auto time = [&](const char* what, double bytes, auto&& fn) {
    for (int i = 0; i < 3; ++i) REQUIRE(fn().ok());
    constexpr int reps = 20;
    cudaEventRecord(e0, f.stream);
    for (int i = 0; i < reps; ++i) REQUIRE(fn().ok());
    cudaEventRecord(e1, f.stream);
    REQUIRE(cudaEventSynchronize(e1) == cudaSuccess);
    float ms = 0;
    cudaEventElapsedTime(&ms, e0, e1);
    const double us = 1000.0 * ms / reps;
    MESSAGE(std::string(what) << ": " << us << " us, " << bytes / (us * 1e3) << " GB/s");
  };
  const std::size_t nh = static_cast<std::size_t>(n * h), ni = static_cast<std::size_t>(n * inter);
  auto x = dev(rnd<T>(nh)), y = poisoned<T>(nh), dx = poisoned<T>(nh), w = dev(rnd<T>(static_cast<std::size_t>(h)));
  auto dw = dev(rnd<T>(static_cast<std::size_t>(h)));
  auto rstd = poisoned<float>(static_cast<std::size_t>(n));
  const double b2 = 2.0;
  time("rmsnorm 8192x1024", b2 * 2 * nh, [&] { return ops.rmsnorm(x.data(), w.data(), y.data(), rstd.data(), n, h, 1e-6); });
  time("rmsnorm_bwd 8192x1024", b2 * 3 * nh,
       [&] { return ops.rmsnorm_bwd(x.data(), w.data(), rstd.data(), y.data(), dx.data(), dw.data(), n, h, false); });
  time("add 8192x1024", b2 * 3 * nh, [&] { return ops.add(y.data(), x.data(), nh); });
  auto gu = dev(rnd<T>(2 * ni)), hh = poisoned<T>(ni), dgu = poisoned<T>(2 * ni);
  time("swiglu 8192x1536", b2 * 3 * ni, [&] { return ops.swiglu(gu.data(), hh.data(), n, inter); });
  time("swiglu_bwd 8192x1536", b2 * 5 * ni, [&] { return ops.swiglu_bwd(gu.data(), hh.data(), dgu.data(), n, inter); });
  auto pos = dev(random_ids(static_cast<std::size_t>(n), 4096));
  time("rope q 8192x16x64", b2 * 2 * nh, [&] { return ops.rope(x.data(), pos.data(), n, heads, hd, 1e6, false); });
  {  // the QK norm + RoPE of the teacher, reading q / k from the fused QKV output [n, 1536]
    const std::int64_t qkv_w = h + 2 * 4 * hd, kvw = 4 * hd;
    auto qkv = dev(rnd<T>(static_cast<std::size_t>(n * qkv_w))), dqkv = poisoned<T>(static_cast<std::size_t>(n * qkv_w));
    auto qn = dev(rnd<T>(static_cast<std::size_t>(hd))), dqn = dev(rnd<T>(static_cast<std::size_t>(hd)));
    auto rq = poisoned<float>(static_cast<std::size_t>(n * heads));
    time("rmsnorm_rope q 8192x16x64 (ld 1536)", b2 * 2 * nh, [&] {
      return ops.rmsnorm_rope(qkv.data(), qn.data(), y.data(), rq.data(), pos.data(), n, heads, hd, 1e-6, 1e6, qkv_w);
    });
    time("rmsnorm_rope k 8192x4x64 (ld 1536)", b2 * 2 * n * kvw, [&] {
      return ops.rmsnorm_rope(qkv.data() + h, qn.data(), y.data(), rq.data(), pos.data(), n, 4, hd, 1e-6, 1e6, qkv_w);
    });
    time("rmsnorm_rope_bwd q 8192x16x64 (ld 1536)", b2 * 3 * nh, [&] {
      return ops.rmsnorm_rope_bwd(qkv.data(), qn.data(), rq.data(), pos.data(), x.data(), dqkv.data(), dqn.data(), n, heads,
                                  hd, 1e6, qkv_w);
    });
    time("rmsnorm_rope_bwd k 8192x4x64 (ld 1536)", b2 * 3 * n * kvw, [&] {
      return ops.rmsnorm_rope_bwd(qkv.data() + h, qn.data(), rq.data(), pos.data(), x.data(), dqkv.data() + h, dqn.data(),
                                  n, 4, hd, 1e6, qkv_w);
    });
    time("copy_rows v 8192x256 (ld 1536)", b2 * 2 * n * kvw,
         [&] { return ops.copy_rows(qkv.data() + h + kvw, qkv_w, y.data(), kvw, n, kvw); });
    auto wqkv = dev(rnd<T>(static_cast<std::size_t>(qkv_w * h)));
    time("linear qkv 8192x1536x1024 (TFLOP/s = GB/s / 1000)", 2.0 * n * qkv_w * h,
         [&] { return ops.linear(x.data(), wqkv.data(), qkv.data(), n, qkv_w, h, false); });
    auto wr = dev(rnd<T>(static_cast<std::size_t>(e * h))), dwr = dev(rnd<T>(static_cast<std::size_t>(e * h)));
    auto lg = poisoned<T>(static_cast<std::size_t>(n * e));
    time("linear router 8192x8x1024", b2 * nh, [&] { return ops.linear(x.data(), wr.data(), lg.data(), n, e, h, false); });
    time("linear_dx router 8192x8x1024 (accumulate)", b2 * 3 * nh,
         [&] { return ops.linear_dx(lg.data(), wr.data(), y.data(), n, e, h, true); });
    time("linear_dw router 8192x8x1024", b2 * nh, [&] { return ops.linear_dw(lg.data(), x.data(), dwr.data(), n, e, h); });
  }
  auto logits = dev(rnd<T>(static_cast<std::size_t>(n * e)));
  auto probs = poisoned<float>(static_cast<std::size_t>(n * e));
  auto idx = poisoned<index_t>(static_cast<std::size_t>(n * k));
  auto tw = poisoned<float>(static_cast<std::size_t>(n * k));
  time("router 8192x8 top2", 0.0, [&] { return ops.router(logits.data(), probs.data(), idx.data(), tw.data(), n, e, k, true); });
  auto st = poisoned<index_t>(static_cast<std::size_t>(n * k)), ts = poisoned<index_t>(static_cast<std::size_t>(n * k));
  std::vector<std::int64_t> counts(static_cast<std::size_t>(e));
  time("moe_dispatch 8192x8 top2 (+ sync_counts)", 0.0, [&] {
    KD_TRY(ops.moe_dispatch(idx.data(), n, e, k, st.data(), ts.data(), counts.data()));
    return ops.sync_counts();
  });
  auto ys = dev(rnd<T>(nh * k)), dys = poisoned<T>(nh * k);
  auto dtw = poisoned<float>(static_cast<std::size_t>(n * k));
  time("moe_combine 8192x2x1024", b2 * 3 * nh,
       [&] { return ops.moe_combine(ys.data(), ts.data(), tw.data(), nullptr, y.data(), n, k, h); });
  time("moe_combine_bwd 8192x2x1024", b2 * 5 * nh,
       [&] { return ops.moe_combine_bwd(ys.data(), ts.data(), tw.data(), x.data(), dys.data(), dtw.data(), n, k, h); });
  time("gather_rows 16384x1024", b2 * 4 * nh, [&] { return ops.gather_rows(x.data(), st.data(), dys.data(), n * k, h); });
  auto ids = dev(random_ids(static_cast<std::size_t>(n), vocab));
  auto table = dev(rnd<T>(static_cast<std::size_t>(vocab * h)));
  time("embedding 8192x1024", b2 * 2 * nh, [&] { return ops.embedding(ids.data(), table.data(), y.data(), n, vocab, h); });
  time("embedding_dw 8192x1024", b2 * 3 * nh,
       [&] { return ops.embedding_dw(ids.data(), x.data(), table.data(), n, vocab, h); });
  auto wq = dev(rnd<T>(static_cast<std::size_t>(h * h)));
  time("linear 8192x1024x1024 (TFLOP/s = GB/s / 1000)", 2.0 * n * h * h,
       [&] { return ops.linear(x.data(), wq.data(), y.data(), n, h, h, false); });
  cudaEventDestroy(e0);
  cudaEventDestroy(e1);
}
