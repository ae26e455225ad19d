// GPU feature distillation and MoE router losses against the CPU reference (fp64 on the same rounded
// inputs). Fresh random inputs each case, gradients poisoned (NaN bytes) before every run so an
// element the kernels failed to write fails; each check builds its own kd::cuda::context.
#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <random>
#include <span>
#include <string>
#include <vector>

#include <kd/kd.hpp>
#include <kd/loss/feature.cuh>
#include <kd/loss/moe.cuh>

#include "gpu_util.cuh"

using namespace kd_test;

namespace {

template <class T>
kd::matrix_view<const T> cview(const device_buffer<T>& b, kd::index_t rows, kd::index_t cols) {
  if (rows == 0 || cols == 0) return {};
  return {b.data, rows, cols};
}
template <class T>
kd::matrix_view<T> mview(device_buffer<T>& b, kd::index_t rows, kd::index_t cols) {
  if (rows == 0 || cols == 0) return {};
  return {b.data, rows, cols};
}
template <class T>
kd::matrix_view<const T> hview(const std::vector<T>& v, kd::index_t rows, kd::index_t cols) {
  if (rows == 0 || cols == 0) return {};
  return {v.data(), rows, cols};
}
template <class T>
kd::matrix_view<T> hmview(std::vector<T>& v, kd::index_t rows, kd::index_t cols) {
  if (rows == 0 || cols == 0) return {};
  return {v.data(), rows, cols};
}

bool close(double got, double ref, double tol) { return std::abs(got - ref) <= tol * std::max(std::abs(ref), 1e-3); }

// ---------------------------------------------------------------------------------------------------
// Feature loss
// ---------------------------------------------------------------------------------------------------

struct feature_case {
  kd::index_t n = 64, ds = 576, dt = 1024;
  bool projection = true;
  bool bias = true;
  bool labels = true;  // every third token ignored
  double grad_scale = 1.0;
  bool accumulate = false;
  kd::index_t global_tokens = 0;
};

// Runs feature_loss<N, R> with student S, projection W and teacher Tt storage on the GPU and compares
// loss, token count and every gradient with the fp64 CPU reference.
template <class N, class S, class W, class Tt = S, class R = kd::token_mean>
void check_feature(const feature_case& c) {
  const kd::index_t n = c.n, ds = c.ds, dt = c.dt;
  REQUIRE((c.projection || ds == dt));
  const kd::index_t wr = c.projection ? dt : 0, wc = c.projection ? ds : 0, bc = c.bias ? dt : 0;
  auto xh = random_storage<S>(static_cast<std::size_t>(n * ds), 1.0, rng());
  auto wh = random_storage<W>(static_cast<std::size_t>(wr * wc), 1.0 / std::sqrt(static_cast<double>(ds)), rng());
  auto bh = random_storage<W>(static_cast<std::size_t>(bc), 0.3, rng());
  auto th = random_storage<Tt>(static_cast<std::size_t>(n * dt), 1.0, rng());
  std::vector<std::int32_t> labels;
  if (c.labels)
    for (kd::index_t i = 0; i < n; ++i) labels.push_back(i % 3 == 1 ? -100 : static_cast<std::int32_t>(i % 50));
  // Prior gradient contents (accumulate_grad adds to them), about the size of the gradients themselves
  // so that neither hides an error in the other.
  auto dx0 = random_storage<S>(static_cast<std::size_t>(n * ds), 1e-4, rng());
  auto dw0 = random_storage<W>(static_cast<std::size_t>(wr * wc), 1e-4, rng());
  auto db0 = random_storage<W>(static_cast<std::size_t>(bc), 1e-4, rng());

  device_buffer<S> xd(xh.size()), dxd(xh.size());
  device_buffer<W> wd(wh.size()), bd(bh.size()), dwd(wh.size()), dbd(bh.size());
  device_buffer<Tt> td(th.size());
  device_buffer<std::int32_t> lab_d(labels.size());
  device_buffer<float> loss_d(1);
  device_buffer<long long> tok_d(1);
  xd.upload(xh);
  td.upload(th);
  if (!wh.empty()) wd.upload(wh);
  if (!bh.empty()) bd.upload(bh);
  if (!labels.empty()) lab_d.upload(labels);
  if (c.accumulate) {
    dxd.upload(dx0);
    if (!dw0.empty()) dwd.upload(dw0);
    if (!db0.empty()) dbd.upload(db0);
  } else {
    dxd.poison();
    dwd.poison();
    dbd.poison();
  }
  loss_d.poison();

  kd::cuda::context ctx;
  using P = kd::precision_set<kd::precision<Tt, float>, kd::precision<S, float>, kd::precision<W, float>>;
  kd::feature_loss<N, R, P> gpu;
  gpu.options.grad_scale = c.grad_scale;
  gpu.options.accumulate_grad = c.accumulate;
  gpu.options.global_tokens = c.global_tokens;
  kd::cuda::device_loss out{loss_d.data, tok_d.data};
  const std::span<const std::int32_t> lab_span(labels.empty() ? nullptr : lab_d.data, labels.size());
  const kd::status s = gpu(kd::cuda::backend{&ctx}, cview(xd, n, ds), cview(wd, wr, wc), cview(bd, 1, bc),
                           cview(td, n, dt), lab_span, out, mview(dxd, n, ds), mview(dwd, wr, wc), mview(dbd, 1, bc));
  REQUIRE_MESSAGE(s.ok(), s.message());
  const kd::status st = ctx.sync_status();
  REQUIRE_MESSAGE(st.ok(), st.message());

  // Reference: fp64 on the same rounded values.
  auto x64 = to_double(xh), w64 = to_double(wh), b64 = to_double(bh), t64 = to_double(th);
  std::vector<double> dx_ref = to_double(dx0), dw_ref = to_double(dw0), db_ref = to_double(db0);
  kd::feature_loss<N, R, kd::precision_set<kd::fp64, kd::fp64, kd::fp64>> ref;
  ref.options = gpu.options;
  kd::loss_result rr;
  const kd::status rs = ref(kd::cpu, hview(x64, n, ds), hview(w64, wr, wc), hview(b64, 1, bc), hview(t64, n, dt),
                            std::span<const std::int32_t>(labels), rr, hmview(dx_ref, n, ds), hmview(dw_ref, wr, wc),
                            hmview(db_ref, 1, bc));
  REQUIRE_MESSAGE(rs.ok(), rs.message());

  const double tol = std::max(tolerance<S>(), std::max(tolerance<W>(), tolerance<Tt>()));
  const double loss = loss_d.download()[0];
  const auto dx = to_double(dxd.download());
  INFO("feature n=", n, " ds=", ds, " dt=", dt, " projection=", c.projection, " bias=", c.bias, " loss gpu=", loss,
       " ref=", rr.loss);
  CHECK(close(loss, rr.loss, tol));
  CHECK(tok_d.download()[0] == rr.tokens);
  CHECK(all_finite(dx));
  CHECK(rel_error(dx, dx_ref) <= tol);
  if (c.projection) {
    const auto dw = to_double(dwd.download());
    CHECK(all_finite(dw));
    CHECK(rel_error(dw, dw_ref) <= tol);
  }
  if (c.bias) {
    const auto db = to_double(dbd.download());
    CHECK(all_finite(db));
    CHECK(rel_error(db, db_ref) <= tol);
  }
}

// Every projection / bias combination at the realistic size and at small odd sizes.
template <class N, class T>
void check_feature_shapes() {
  for (const bool bias : {true, false}) {
    check_feature<N, T, T>({64, 576, 1024, true, bias});    // 576 -> 1024 projection
    check_feature<N, T, T>({64, 1024, 1024, false, bias});  // identity
    check_feature<N, T, T>({1, 5, 7, true, bias});          // N = 1, odd widths
    check_feature<N, T, T>({1, 7, 7, false, bias});
    check_feature<N, T, T>({7, 3, 7, true, bias});
  }
}

// ---------------------------------------------------------------------------------------------------
// Router losses
// ---------------------------------------------------------------------------------------------------

// Top-k distinct experts per token, skewed towards low ids so the utilization is uneven (the
// gradient's c_j - sum q c then has no near-cancellation).
std::vector<std::int32_t> routed_ids(kd::index_t t, kd::index_t e, kd::index_t k) {
  std::vector<std::int32_t> ids;
  std::uniform_real_distribution<double> u(0.0, 1.0);
  for (kd::index_t i = 0; i < t; ++i) {
    std::vector<std::int32_t> chosen;
    while (static_cast<kd::index_t>(chosen.size()) < k) {
      const double r = u(rng());
      const auto id = static_cast<std::int32_t>(std::min<double>(static_cast<double>(e) - 1, std::floor(r * r * e)));
      if (std::find(chosen.begin(), chosen.end(), id) == chosen.end()) chosen.push_back(id);
    }
    ids.insert(ids.end(), chosen.begin(), chosen.end());
  }
  return ids;
}

template <class T>
void check_load_balance(kd::index_t t, kd::index_t e, kd::index_t k) {
  auto lh = random_storage<T>(static_cast<std::size_t>(t * e), 2.0, rng());
  const auto ids = routed_ids(t, e, k);
  device_buffer<T> ld(lh.size()), gd(lh.size());
  device_buffer<std::int32_t> idd(ids.size());
  device_buffer<float> loss_d(1);
  device_buffer<long long> tok_d(1);
  ld.upload(lh);
  idd.upload(ids);
  gd.poison();
  loss_d.poison();

  kd::cuda::context ctx;
  kd::load_balance_loss<kd::precision<T, float>> gpu;
  gpu.options.grad_scale = 2.0;
  kd::cuda::device_loss out{loss_d.data, tok_d.data};
  const kd::status s = gpu(kd::cuda::backend{&ctx}, cview(ld, t, e), kd::matrix_view<const std::int32_t>(idd.data, t, k),
                           out, mview(gd, t, e));
  REQUIRE_MESSAGE(s.ok(), s.message());
  const kd::status st = ctx.sync_status();
  REQUIRE_MESSAGE(st.ok(), st.message());

  auto l64 = to_double(lh);
  std::vector<double> gref(lh.size());
  kd::load_balance_loss<kd::fp64> ref;
  ref.options = gpu.options;
  kd::loss_result rr;
  REQUIRE(ref(kd::cpu, hview(l64, t, e), kd::matrix_view<const std::int32_t>(ids.data(), t, k), rr, hmview(gref, t, e))
              .ok());
  const double loss = loss_d.download()[0];
  const auto g = to_double(gd.download());
  INFO("load balance T=", t, " E=", e, " k=", k, " loss gpu=", loss, " ref=", rr.loss);
  CHECK(close(loss, rr.loss, tolerance<T>()));
  CHECK(tok_d.download()[0] == t);
  CHECK(all_finite(g));
  CHECK(rel_error(g, gref) <= tolerance<T>());
}

template <class T>
void check_router_z(kd::index_t t, kd::index_t e, bool accumulate) {
  auto lh = random_storage<T>(static_cast<std::size_t>(t * e), 2.0, rng());
  auto g0 = random_storage<T>(static_cast<std::size_t>(t * e), 3e-7, rng());  // ~ the gradient's size
  device_buffer<T> ld(lh.size()), gd(lh.size());
  device_buffer<float> loss_d(1);
  device_buffer<long long> tok_d(1);
  ld.upload(lh);
  if (accumulate) gd.upload(g0);
  else gd.poison();
  loss_d.poison();

  kd::cuda::context ctx;
  kd::router_z_loss<kd::precision<T, float>> gpu;
  gpu.options.accumulate_grad = accumulate;
  gpu.options.grad_scale = 0.5;
  kd::cuda::device_loss out{loss_d.data, tok_d.data};
  const kd::status s = gpu(kd::cuda::backend{&ctx}, cview(ld, t, e), out, mview(gd, t, e));
  REQUIRE_MESSAGE(s.ok(), s.message());
  const kd::status st = ctx.sync_status();
  REQUIRE_MESSAGE(st.ok(), st.message());

  auto l64 = to_double(lh);
  std::vector<double> gref = to_double(g0);
  kd::router_z_loss<kd::fp64> ref;
  ref.options = gpu.options;
  kd::loss_result rr;
  REQUIRE(ref(kd::cpu, hview(l64, t, e), rr, hmview(gref, t, e)).ok());
  const double loss = loss_d.download()[0];
  const auto g = to_double(gd.download());
  INFO("router z T=", t, " E=", e, " loss gpu=", loss, " ref=", rr.loss);
  CHECK(close(loss, rr.loss, tolerance<T>()));
  CHECK(tok_d.download()[0] == t);
  CHECK(all_finite(g));
  CHECK(rel_error(g, gref) <= tolerance<T>());
}

}  // namespace

TEST_CASE_TEMPLATE("CUDA feature loss matches the CPU reference (none)", T, float, kd::bfloat16) {
  check_feature_shapes<kd::none, T>();
}
TEST_CASE_TEMPLATE("CUDA feature loss matches the CPU reference (sqrt_dim_mse)", T, float, kd::bfloat16) {
  check_feature_shapes<kd::sqrt_dim_mse, T>();
}
TEST_CASE_TEMPLATE("CUDA feature loss matches the CPU reference (rms_mse)", T, float, kd::bfloat16) {
  check_feature_shapes<kd::rms_mse, T>();
}
TEST_CASE_TEMPLATE("CUDA feature loss matches the CPU reference (cosine)", T, float, kd::bfloat16) {
  check_feature_shapes<kd::cosine, T>();
}

TEST_CASE("CUDA feature loss: grad_scale, accumulate_grad, global_tokens, sum reduction, no labels") {
  feature_case c{64, 576, 1024, true, true};
  c.grad_scale = -2.5;
  c.accumulate = true;
  c.global_tokens = 100;
  check_feature<kd::rms_mse, float, float>(c);
  check_feature<kd::cosine, kd::bfloat16, kd::bfloat16>(c);
  c.projection = false;
  c.ds = 1024;
  check_feature<kd::sqrt_dim_mse, float, float>(c);
  feature_case plain{33, 64, 96, true, true, false};
  check_feature<kd::none, float, float, float, kd::none>(plain);
  check_feature<kd::cosine, float, float, float, kd::none>(plain);
}

TEST_CASE("CUDA feature loss: mixed student / projection / teacher dtypes") {
  check_feature<kd::rms_mse, kd::bfloat16, float>({64, 576, 1024, true, true});          // bf16 student, fp32 projection
  check_feature<kd::cosine, float, kd::bfloat16>({64, 576, 1024, true, true});           // fp32 student, bf16 projection
  check_feature<kd::sqrt_dim_mse, kd::bfloat16, float, float>({17, 96, 128, true, true});  // fp32 teacher
  check_feature<kd::sqrt_dim_mse, kd::bfloat16, float, kd::half>({17, 96, 96, false, true});
}

TEST_CASE_TEMPLATE("CUDA load balance loss matches the CPU reference", T, float, kd::bfloat16) {
  for (const kd::index_t e : {8, 64})
    for (const kd::index_t k : {1, 2})
      for (const kd::index_t t : {1, 333, 4096}) check_load_balance<T>(t, e, k);
}

TEST_CASE_TEMPLATE("CUDA router z-loss matches the CPU reference", T, float, kd::bfloat16) {
  for (const kd::index_t e : {8, 64})
    for (const kd::index_t t : {1, 333, 4096}) check_router_z<T>(t, e, false);
  check_router_z<T>(333, 64, true);
  check_router_z<T>(50, 40, false);  // E not a multiple of the warp
}

TEST_CASE("CUDA feature and router losses: bad input") {
  kd::cuda::context ctx;
  const kd::cuda::backend be{&ctx};
  device_buffer<float> loss(1);
  kd::cuda::device_loss out{loss.data, nullptr};

  const kd::index_t n = 4, ds = 6, dt = 8;
  device_buffer<float> x(n * ds), w(dt * ds), b(dt), t(n * dt), dx(n * ds), dw(dt * ds), db(dt);
  x.upload(random_storage<float>(n * ds, 1.0, rng()));
  w.upload(random_storage<float>(dt * ds, 0.5, rng()));
  b.upload(random_storage<float>(dt, 0.5, rng()));
  t.upload(random_storage<float>(n * dt, 1.0, rng()));
  kd::feature_loss<kd::rms_mse> feat;

  const kd::index_t tt = 5, e = 4, k = 2;
  device_buffer<float> logits(tt * e), dlogits(tt * e);
  device_buffer<std::int32_t> ids(tt * k);
  logits.upload(random_storage<float>(tt * e, 1.0, rng()));
  ids.upload({0, 1, 2, 3, 1, 2, 3, 0, 2, 1});
  kd::load_balance_loss<> lb;
  kd::router_z_loss<> rz;

  SUBCASE("feature: shape mismatch is a status at once") {
    const auto st = feat(be, cview(x, n, ds), cview(w, dt, ds), cview(b, 1, dt), cview(t, n - 1, dt), {}, out,
                         mview(dx, n, ds), mview(dw, dt, ds), mview(db, 1, dt));
    CHECK(st.code() == kd::errc::shape_mismatch);
    CHECK(st.message().find("teacher hidden has 3 tokens but student hidden has 4") != std::string::npos);
    CHECK(st.message().find("component 'feature'") != std::string::npos);
    const auto st2 = feat(be, cview(x, n, ds), cview(w, dt, ds - 1), cview(b, 1, dt), cview(t, n, dt), {}, out,
                          mview(dx, n, ds), mview(dw, dt, ds - 1), mview(db, 1, dt));
    CHECK(st2.code() == kd::errc::shape_mismatch);
    CHECK(st2.message().find("projection is [8 x 5]") != std::string::npos);
    CHECK(ctx.sync_status().ok());
  }
  SUBCASE("feature: NaN in the teacher is reported by sync_status with token and component") {
    auto th = random_storage<float>(n * dt, 1.0, rng());
    th[3 * dt + 5] = std::nanf("");
    t.upload(th);
    feat.options.component = "feature_layer6";
    REQUIRE(feat(be, cview(x, n, ds), cview(w, dt, ds), cview(b, 1, dt), cview(t, n, dt), {}, out, mview(dx, n, ds),
                 mview(dw, dt, ds), mview(db, 1, dt))
                .ok());
    const auto st = ctx.sync_status();
    CHECK(st.code() == kd::errc::non_finite);
    CHECK(st.message().find("hidden states") != std::string::npos);
    CHECK(st.message().find("token 3") != std::string::npos);
    CHECK(st.message().find("feature_layer6") != std::string::npos);
    CHECK(ctx.sync_status().ok());  // the error word was cleared
  }
  SUBCASE("feature: Inf in the student of an ignored token is still reported") {
    auto xh = random_storage<float>(n * ds, 1.0, rng());
    xh[2 * ds] = INFINITY;
    x.upload(xh);
    device_buffer<std::int32_t> lab(n);
    lab.upload({1, 2, -100, 3});
    REQUIRE(feat(be, cview(x, n, ds), cview(w, dt, ds), cview(b, 1, dt), cview(t, n, dt),
                 std::span<const std::int32_t>(lab.data, n), out)
                .ok());
    const auto st = ctx.sync_status();
    CHECK(st.code() == kd::errc::non_finite);
    CHECK(st.message().find("token 2") != std::string::npos);
  }
  SUBCASE("feature: a negative label other than ignore_index") {
    device_buffer<std::int32_t> lab(n);
    lab.upload({1, -100, -7, 3});
    REQUIRE(feat(be, cview(x, n, ds), cview(w, dt, ds), cview(b, 1, dt), cview(t, n, dt),
                 std::span<const std::int32_t>(lab.data, n), out, mview(dx, n, ds), mview(dw, dt, ds), mview(db, 1, dt))
                .ok());
    const auto st = ctx.sync_status();
    CHECK(st.code() == kd::errc::out_of_range);
    CHECK(st.message().find("token 2") != std::string::npos);
  }
  SUBCASE("load balance: expert ids shape mismatch is a status at once") {
    const auto st = lb(be, cview(logits, tt, e), kd::matrix_view<const std::int32_t>(ids.data, tt - 1, k), out,
                       mview(dlogits, tt, e));
    CHECK(st.code() == kd::errc::shape_mismatch);
    CHECK(st.message().find("expert ids cover 4 tokens but the router logits 5") != std::string::npos);
    const auto st2 = lb(be, cview(logits, tt, e), kd::matrix_view<const std::int32_t>(ids.data, tt, e + 1), out);
    CHECK(st2.code() == kd::errc::invalid_argument);
    CHECK(st2.message().find("top-k 5 must lie in [1, 4]") != std::string::npos);
  }
  SUBCASE("load balance: expert id out of range is reported by sync_status") {
    ids.upload({0, 1, 2, 3, 1, 4, 3, 0, -1, 1});  // token 2 (id 4) and token 4 (id -1)
    lb.options.component = "moe_layer3";
    REQUIRE(lb(be, cview(logits, tt, e), kd::matrix_view<const std::int32_t>(ids.data, tt, k), out,
               mview(dlogits, tt, e))
                .ok());
    const auto st = ctx.sync_status();
    CHECK(st.code() == kd::errc::out_of_range);
    CHECK(st.message().find("token 2") != std::string::npos);
    CHECK(st.message().find("expert id") != std::string::npos);
    CHECK(st.message().find("moe_layer3") != std::string::npos);
    CHECK(ctx.sync_status().ok());
  }
  SUBCASE("load balance: NaN in the router logits") {
    auto lh = random_storage<float>(tt * e, 1.0, rng());
    lh[1 * e + 2] = std::nanf("");
    logits.upload(lh);
    REQUIRE(lb(be, cview(logits, tt, e), kd::matrix_view<const std::int32_t>(ids.data, tt, k), out,
               mview(dlogits, tt, e))
                .ok());
    const auto st = ctx.sync_status();
    CHECK(st.code() == kd::errc::non_finite);
    CHECK(st.message().find("router logits") != std::string::npos);
    CHECK(st.message().find("token 1") != std::string::npos);
    CHECK(st.message().find("load_balance") != std::string::npos);
  }
  SUBCASE("router z: -Inf in the router logits, and a gradient shape mismatch") {
    CHECK(rz(be, cview(logits, tt, e), out, mview(dlogits, tt, e - 1)).code() == kd::errc::shape_mismatch);
    auto lh = random_storage<float>(tt * e, 1.0, rng());
    lh[4 * e + 0] = -INFINITY;
    logits.upload(lh);
    REQUIRE(rz(be, cview(logits, tt, e), out, mview(dlogits, tt, e)).ok());
    const auto st = ctx.sync_status();
    CHECK(st.code() == kd::errc::non_finite);
    CHECK(st.message().find("router logits") != std::string::npos);
    CHECK(st.message().find("token 4") != std::string::npos);
    CHECK(st.message().find("router_z") != std::string::npos);
  }
  SUBCASE("router losses: bad coefficient") {
    rz.options.coefficient = -1.0;
    const auto st = rz(be, cview(logits, tt, e), out);
    CHECK(st.code() == kd::errc::invalid_argument);
    CHECK(st.message().find("coefficient must be finite and >= 0") != std::string::npos);
  }
}
