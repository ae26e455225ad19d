// The CUDA attention-map loss against the CPU reference (fp64 on the same rounded inputs): softmax_kl and
// none, causal and not, T from 1 to 257 (both kernel shapes: a warp per row up to 256 keys, a block per
// row above), head maps 16 -> 9 (uniform), 4 -> 2 and equal heads, temperatures 1 and 2, fp32 and bf16.
// Fresh random inputs each case; with a causal mask the masked scores are -inf, as in a real model;
// gradients are poisoned before every run so an unwritten element fails as NaN.
#include <doctest/doctest.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <random>
#include <string>
#include <type_traits>
#include <vector>

#include <kd/kd.cuh>

#include "gpu_util.cuh"

using namespace kd_test;

namespace {

struct attn_case {
  kd::index_t batch = 2;
  kd::index_t len = 5;
  int hs = 2, ht = 4;
  bool causal = true;
  double temperature = 1.0;
  bool accumulate = false;
  double grad_scale = 1.0;
  bool forward_only = false;
  const kd::head_map* heads = nullptr;
};

// -inf above the diagonal of every [T x T] map (keys after the query).
template <class T>
void mask_upper(std::vector<T>& v, kd::index_t len) {
  const auto minus_inf = kd::store_as<T>(-std::numeric_limits<float>::infinity());
  for (std::size_t m = 0; m < v.size() / static_cast<std::size_t>(len * len); ++m)
    for (kd::index_t i = 0; i < len; ++i)
      for (kd::index_t k = i + 1; k < len; ++k)
        v[m * static_cast<std::size_t>(len * len) + static_cast<std::size_t>(i * len + k)] = minus_inf;
}

// Runs attention_loss<N> on the GPU in storage T and compares loss and gradient with the fp64 CPU reference.
template <class N, class T>
void check_attention(kd::cuda::context& ctx, const attn_case& c) {
  const kd::index_t len = c.len;
  const std::size_t tn = static_cast<std::size_t>(c.batch * c.ht * len * len);
  const std::size_t sn = static_cast<std::size_t>(c.batch * c.hs * len * len);
  auto th = random_storage<T>(tn, 2.0, rng());
  auto sh = random_storage<T>(sn, 1.5, rng());
  if (c.causal) {
    mask_upper(th, len);
    mask_upper(sh, len);
  }
  std::vector<T> g0;
  if (c.accumulate) g0 = random_storage<T>(sn, 0.01, rng());
  device_buffer<T> td(tn), sd(sn), gd(sn);
  device_buffer<float> loss_d(1);
  device_buffer<long long> tok_d(1);
  td.upload(th);
  sd.upload(sh);
  if (c.accumulate) gd.upload(g0);
  else gd.poison();
  loss_d.poison();

  using P = kd::precision_set<kd::precision<T, float>, kd::precision<T, float>>;
  kd::attention_loss<N, P> gpu;
  gpu.options.student_heads = c.hs;
  gpu.options.teacher_heads = c.ht;
  gpu.options.causal = c.causal;
  gpu.options.temperature = c.temperature;
  gpu.options.grad_scale = c.grad_scale;
  gpu.options.accumulate_grad = c.accumulate;
  gpu.options.heads = c.heads;
  gpu.options.component = "attn_test";
  kd::cuda::device_loss out{loss_d.data, tok_d.data};
  const kd::tensor3_view<const T> tv{td.data, c.batch * c.ht, len, len};
  const kd::tensor3_view<const T> sv{sd.data, c.batch * c.hs, len, len};
  const kd::status launched = c.forward_only ? gpu(kd::cuda::backend{&ctx}, tv, sv, out)
                                             : gpu(kd::cuda::backend{&ctx}, tv, sv, out,
                                                   kd::tensor3_view<T>{gd.data, c.batch * c.hs, len, len});
  REQUIRE_MESSAGE(launched.ok(), launched.message());
  const auto st = ctx.sync_status();
  REQUIRE_MESSAGE(st.ok(), st.message());

  auto t64 = to_double(th), s64 = to_double(sh);
  std::vector<double> gref = c.accumulate ? to_double(g0) : std::vector<double>(sn, 0.0);
  kd::attention_loss<N, kd::precision_set<kd::fp64, kd::fp64>> ref;
  ref.options = gpu.options;
  kd::loss_result rr;
  const kd::status rs = ref(kd::cpu, kd::tensor3_view<double>{t64.data(), c.batch * c.ht, len, len},
                            kd::tensor3_view<double>{s64.data(), c.batch * c.hs, len, len}, rr,
                            kd::tensor3_view<double>{gref.data(), c.batch * c.hs, len, len});
  REQUIRE_MESSAGE(rs.ok(), rs.message());

  const double loss = loss_d.download()[0];
  INFO("T=", len, " heads ", c.ht, " -> ", c.hs, " causal=", c.causal, " temperature=", c.temperature,
       " accumulate=", c.accumulate, " loss gpu=", loss, " ref=", rr.loss);
  CHECK(std::isfinite(loss));
  // Relative to the loss, floored at 0.1: with one key (T = 1) both maps are [1] and the exact loss is
  // 0, where float rounding of p log p leaves ~1e-8.
  CHECK(std::abs(loss - rr.loss) <= tolerance<T>() * std::max(std::abs(rr.loss), 0.1));
  CHECK(tok_d.download()[0] == rr.tokens);
  if (c.forward_only) {
    // No gradient requested: the poisoned buffer is untouched.
    CHECK(!all_finite(to_double(gd.download())));
    return;
  }
  const auto graw = gd.download();
  const auto g = to_double(graw);
  CHECK(all_finite(g));
  CHECK(rel_error(g, gref) <= tolerance<T>());
  if (c.causal) {
    // Masked keys: exactly 0, or exactly the previous value with accumulate_grad.
    bool exact = true;
    for (kd::index_t m = 0; m < c.batch * c.hs; ++m)
      for (kd::index_t i = 0; i < len; ++i)
        for (kd::index_t k = i + 1; k < len; ++k) {
          const auto idx = static_cast<std::size_t>((m * len + i) * len + k);
          const double expect = c.accumulate ? kd::load_as<double>(g0[idx]) : 0.0;
          exact = exact && g[idx] == expect;
        }
    CHECK(exact);
  }
}

template <class N, class T>
void sweep(kd::cuda::context& ctx) {
  struct heads {
    int hs, ht;
  };
  for (bool causal : {true, false})
    for (kd::index_t len : {1, 5, 64, 257})
      for (heads hd : {heads{9, 16}, heads{2, 4}, heads{3, 3}})
        for (double temp : {1.0, 2.0}) {
          attn_case c;
          c.len = len;
          c.hs = hd.hs;
          c.ht = hd.ht;
          c.causal = causal;
          c.temperature = temp;
          check_attention<N, T>(ctx, c);
        }
}

}  // namespace

TEST_CASE_TEMPLATE("CUDA attention loss, softmax_kl, matches the CPU reference", T, float, kd::bfloat16) {
  kd::cuda::context ctx;
  sweep<kd::softmax_kl, T>(ctx);
}

TEST_CASE_TEMPLATE("CUDA attention loss, none, matches the CPU reference", T, float, kd::bfloat16) {
  kd::cuda::context ctx;
  sweep<kd::none, T>(ctx);
}

TEST_CASE_TEMPLATE("CUDA attention loss: accumulate_grad, grad_scale, forward only, custom head map", T, float,
                   kd::bfloat16) {
  kd::cuda::context ctx;
  for (kd::index_t len : {64, 300}) {  // both kernel shapes
    attn_case c;
    c.len = len;
    c.accumulate = true;
    c.grad_scale = 3.0;
    c.temperature = 2.0;
    check_attention<kd::softmax_kl, T>(ctx, c);
    check_attention<kd::none, T>(ctx, c);
    c.accumulate = false;
    c.forward_only = true;
    check_attention<kd::softmax_kl, T>(ctx, c);
    check_attention<kd::none, T>(ctx, c);
  }
  // Non-contiguous, overlapping, unordered groups; teacher 2 -> student 4.
  const kd::head_map custom{{{2, 0}, {1}, {0, 1, 2}}};
  const kd::head_map fewer = kd::head_map::uniform(4, 2);
  for (bool causal : {true, false})
    for (kd::index_t len : {5, 257}) {
      attn_case c;
      c.len = len;
      c.causal = causal;
      c.hs = c.ht = 3;
      c.heads = &custom;
      check_attention<kd::softmax_kl, T>(ctx, c);
      check_attention<kd::none, T>(ctx, c);
      c.hs = 4;
      c.ht = 2;
      c.heads = &fewer;
      check_attention<kd::softmax_kl, T>(ctx, c);
      check_attention<kd::none, T>(ctx, c);
    }
}

TEST_CASE("CUDA attention loss: bad input gives a clear status, data errors are named by sync_status") {
  kd::cuda::context ctx;
  const kd::cuda::backend be{&ctx};
  const kd::index_t batch = 2, len = 4;
  const auto tn = static_cast<std::size_t>(batch * 4 * len * len);
  const auto sn = static_cast<std::size_t>(batch * 2 * len * len);
  device_buffer<float> t(tn), s(sn), g(sn), loss(1);
  auto th = random_storage<float>(tn, 1.0, rng());
  auto sh = random_storage<float>(sn, 1.0, rng());
  t.upload(th);
  s.upload(sh);
  kd::attention_loss<kd::softmax_kl> l;
  l.options.student_heads = 2;
  l.options.teacher_heads = 4;
  l.options.component = "attn_layer7";
  kd::cuda::device_loss out{loss.data, nullptr};
  const kd::tensor3_view<const float> tv{t.data, batch * 4, len, len};
  const kd::tensor3_view<const float> sv{s.data, batch * 2, len, len};
  const kd::tensor3_view<float> gv{g.data, batch * 2, len, len};
  REQUIRE(l(be, tv, sv, out, gv).ok());
  REQUIRE(ctx.sync_status().ok());

  SUBCASE("batch disagrees between teacher and student") {
    const auto st = l(be, kd::tensor3_view<const float>{t.data, 3 * 4, len, len}, sv, out, gv);
    CHECK(st.code() == kd::errc::shape_mismatch);
    CHECK(st.message().find("disagree on the batch") != std::string::npos);
    CHECK(st.message().find("attn_layer7") != std::string::npos);
  }
  SUBCASE("non-square maps") {
    const auto st = l(be, tv, kd::tensor3_view<const float>{s.data, batch * 2, len, len - 1}, out, gv);
    CHECK(st.code() == kd::errc::shape_mismatch);
    CHECK(st.message().find("must be square") != std::string::npos);
    const auto st2 = l(be, kd::tensor3_view<const float>{t.data, batch * 4, len - 1, len}, sv, out, gv);
    CHECK(st2.code() == kd::errc::shape_mismatch);
  }
  SUBCASE("gradient shape and temperature") {
    const auto st = l(be, tv, sv, out, kd::tensor3_view<float>{g.data, batch * 2 - 1, len, len});
    CHECK(st.code() == kd::errc::shape_mismatch);
    CHECK(st.message().find("student gradient") != std::string::npos);
    l.options.temperature = 0.0;
    const auto st2 = l(be, tv, sv, out, gv);
    CHECK(st2.code() == kd::errc::invalid_argument);
    CHECK(st2.message().find("temperature must be > 0") != std::string::npos);
  }
  SUBCASE("head maps the kernel cannot take") {
    // 16 teacher heads averaged into one student head: more than 8.
    device_buffer<float> t16(static_cast<std::size_t>(16 * len * len)), s1(static_cast<std::size_t>(len * len));
    l.options.student_heads = 1;
    l.options.teacher_heads = 16;
    const auto st = l(be, kd::tensor3_view<const float>{t16.data, 16, len, len},
                      kd::tensor3_view<const float>{s1.data, 1, len, len}, out);
    CHECK(st.code() == kd::errc::invalid_argument);
    CHECK(st.message().find("at most 8") != std::string::npos);
    // 65 student heads.
    device_buffer<float> t65(static_cast<std::size_t>(65 * len * len)), s65(static_cast<std::size_t>(65 * len * len));
    l.options.student_heads = l.options.teacher_heads = 65;
    const auto st2 = l(be, kd::tensor3_view<const float>{t65.data, 65, len, len},
                       kd::tensor3_view<const float>{s65.data, 65, len, len}, out);
    CHECK(st2.code() == kd::errc::invalid_argument);
    CHECK(st2.message().find("at most 64 student heads") != std::string::npos);
    // Host-side head_map errors keep the CPU's messages.
    const kd::head_map bad{{{0, 4}, {2, 3}}};
    l.options.student_heads = 2;
    l.options.teacher_heads = 4;
    l.options.heads = &bad;
    const auto st3 = l(be, tv, sv, out, gv);
    CHECK(st3.code() == kd::errc::out_of_range);
    CHECK(st3.message().find("head_map teacher head 4 is outside [0, 4)") != std::string::npos);
  }
  SUBCASE("null device_loss") {
    kd::cuda::device_loss none_out{};
    CHECK(l(be, tv, sv, none_out, gv).code() == kd::errc::invalid_argument);
  }
  SUBCASE("NaN in the teacher is reported by sync_status with component and row") {
    // Teacher map 5 = batch 1, head 1, read by student head 0 (uniform 4 -> 2: {0, 1}), i.e. student map
    // 2; query 2 -> flat loss row 2 * 4 + 2 = 10.
    for (bool causal : {true, false}) {
      CAPTURE(causal);
      l.options.causal = causal;
      auto bad = th;
      bad[static_cast<std::size_t>((5 * len + 2) * len + 1)] = std::nanf("");
      t.upload(bad);
      REQUIRE(l(be, tv, sv, out, gv).ok());
      const auto st = ctx.sync_status();
      CHECK(st.code() == kd::errc::non_finite);
      CHECK(st.message().find("attention scores") != std::string::npos);
      CHECK(st.message().find("token 10") != std::string::npos);
      CHECK(st.message().find("attn_layer7") != std::string::npos);
      CHECK(ctx.sync_status().ok());  // the error word was cleared
    }
  }
  SUBCASE("Inf in the student is reported; NaN and -inf above the diagonal are not read with a causal mask") {
    auto bad = sh;
    bad[static_cast<std::size_t>((3 * len + 3) * len + 0)] = std::numeric_limits<float>::infinity();  // map 3, row 3
    s.upload(bad);
    REQUIRE(l(be, tv, sv, out, gv).ok());
    const auto st = ctx.sync_status();
    CHECK(st.code() == kd::errc::non_finite);
    CHECK(st.message().find("token 15") != std::string::npos);

    auto masked_t = th;
    auto masked_s = sh;
    masked_t[static_cast<std::size_t>((5 * len + 1) * len + 3)] = std::nanf("");
    masked_s[static_cast<std::size_t>((0 * len + 0) * len + 2)] = -std::numeric_limits<float>::infinity();
    t.upload(masked_t);
    s.upload(masked_s);
    l.options.causal = true;
    REQUIRE(l(be, tv, sv, out, gv).ok());
    const auto st2 = ctx.sync_status();
    CHECK_MESSAGE(st2.ok(), st2.message());
    CHECK(std::isfinite(loss.download()[0]));
    l.options.causal = false;  // now those entries are read
    REQUIRE(l(be, tv, sv, out, gv).ok());
    CHECK(ctx.sync_status().code() == kd::errc::non_finite);
  }
}
