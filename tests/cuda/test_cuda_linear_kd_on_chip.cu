// linear + KD with the logits kept on chip (kd::linear_kd_path::on_chip) against the fp64 CPU reference
// (kd/loss/linear_kd.hpp's chunked loop): every divergence, both teacher forms, bf16 and fp16, token
// counts and vocabularies that are not multiples of the 128 x 128 tile, padding columns, ignored rows,
// accumulation, either gradient alone or none, and the inputs the path refuses or reports.
#include <doctest/doctest.h>

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include <kd/kd.cuh>

#include "gpu_util.cuh"
#include "linear_kd_check.hpp"

using namespace kd_test;

namespace {

// The on-chip path (the teacher in storage TT); the CPU reference runs chunks of 97 tokens.
template <class T, class D, class TT = T>
void check_on_chip(linear_kd_case c) {
  c.path = kd::linear_kd_path::on_chip;
  c.chunk = 97;
  check_linear_kd<T, D, TT>(c);
}

}  // namespace

TEST_CASE_TEMPLATE("on-chip linear + KD: forward KL against the fp64 reference", T, kd::bfloat16, kd::half) {
  check_on_chip<T, kd::forward_kl>({.n = 300, .d = 64, .v = 5003});  // partial token and vocabulary tiles
  check_on_chip<T, kd::forward_kl>({.n = 130, .d = 576, .v = 4100, .temperature = 1.0});  // the student's width, 5 hidden chunks
  check_on_chip<T, kd::forward_kl>({.n = 1, .d = 72, .v = 300, .temperature = 0.5});  // one token, a width not of 64
  check_on_chip<T, kd::forward_kl>({.n = 257, .d = 64, .v = 1030, .vocab = 1000});  // padding columns
  check_on_chip<T, kd::forward_kl>({.n = 3, .d = 8, .v = 50});  // the narrowest width, one partial tile each way
  check_on_chip<T, kd::forward_kl>({.n = 129, .d = 4096, .v = 260});  // 64 stages of the logits GEMM and chunks
}

TEST_CASE_TEMPLATE("on-chip linear + KD: every divergence with a row sum", T, kd::bfloat16, kd::half) {
  check_on_chip<T, kd::reverse_kl>({.n = 200, .d = 96, .v = 1500});
  check_on_chip<T, kd::jsd>({.n = 200, .d = 96, .v = 1500});
  check_on_chip<T, kd::skew_kl>({.n = 200, .d = 96, .v = 1500});
  check_on_chip<T, kd::tvd>({.n = 200, .d = 96, .v = 1500});
  check_on_chip<T, kd::jsd>({.n = 129, .d = 64, .v = 700, .vocab = 650, .temperature = 1.0});
}

TEST_CASE_TEMPLATE("on-chip linear + KD: the teacher as hidden states and LM head", T, kd::bfloat16, kd::half) {
  check_on_chip<T, kd::forward_kl>({.n = 300, .d = 64, .v = 5003, .dt = 96});
  check_on_chip<T, kd::reverse_kl>({.n = 300, .d = 64, .v = 2000, .dt = 128});
  check_on_chip<T, kd::skew_kl>({.n = 140, .d = 64, .v = 1000, .dt = 40, .vocab = 900});
}

// Small calls spread one vocabulary tile per CTA; forced splits make each CTA sweep many tiles (its
// running log-sum-exps, row sums and gradient tiles carried across them), as large calls do.
TEST_CASE_TEMPLATE("on-chip linear + KD: CTAs that sweep many vocabulary tiles", T, kd::bfloat16, kd::half) {
  check_on_chip<T, kd::forward_kl>({.n = 300, .d = 64, .v = 5003, .splits = 1});
  check_on_chip<T, kd::jsd>({.n = 200, .d = 96, .v = 1500, .splits = 2});
  check_on_chip<T, kd::reverse_kl>({.n = 140, .d = 64, .v = 2000, .dt = 40, .splits = 3});
  check_on_chip<T, kd::forward_kl>({.n = 150, .d = 64, .v = 1200, .accumulate = true, .splits = 1});
}

// The teacher's logits in float or the other 16-bit type (pair loads where the row stride is even, single
// loads where it is odd), or its hidden states and head in the other 16-bit type.
TEST_CASE("on-chip linear + KD: the teacher in another storage type than the student") {
  using kd::bfloat16;
  using kd::half;
  check_on_chip<bfloat16, kd::forward_kl, float>({.n = 300, .d = 64, .v = 5003});  // odd stride
  check_on_chip<bfloat16, kd::jsd, float>({.n = 200, .d = 96, .v = 1500, .vocab = 1400});
  check_on_chip<bfloat16, kd::reverse_kl, half>({.n = 200, .d = 96, .v = 1500, .splits = 2});
  check_on_chip<half, kd::forward_kl, bfloat16>({.n = 130, .d = 64, .v = 1031});
  check_on_chip<bfloat16, kd::forward_kl, half>({.n = 300, .d = 64, .v = 2000, .dt = 96});
  check_on_chip<half, kd::skew_kl, bfloat16>({.n = 140, .d = 64, .v = 1000, .dt = 40, .vocab = 900});
}

TEST_CASE("on-chip linear + KD: accumulation, one gradient, no gradient") {
  using T = kd::bfloat16;
  check_on_chip<T, kd::forward_kl>({.n = 150, .d = 64, .v = 1200, .accumulate = true});
  check_on_chip<T, kd::jsd>({.n = 150, .d = 64, .v = 1200, .accumulate = true});
  check_on_chip<T, kd::forward_kl>({.n = 150, .d = 64, .v = 1200, .want_dw = false});
  check_on_chip<T, kd::reverse_kl>({.n = 150, .d = 64, .v = 1200, .want_dh = false});
  check_on_chip<T, kd::forward_kl>({.n = 150, .d = 64, .v = 1200, .want_dh = false, .want_dw = false});
  check_on_chip<T, kd::tvd>({.n = 150, .d = 64, .v = 1200, .want_dh = false, .want_dw = false});
}

// What the path refuses up front, and what it reports from the device (by row, tensor and component).
TEST_CASE("on-chip linear + KD: refused and reported inputs") {
  using T = kd::bfloat16;
  const kd::index_t n = 130, d = 64, v = 600;
  device_buffer<T> hd(n * d), wd(v * d), td(n * v), dhd(n * d), dwd(v * d);
  device_buffer<float> loss_d(1);
  device_buffer<std::int32_t> lab_d(n);
  hd.upload(random_storage<T>(n * d, 1.0, rng()));
  wd.upload(random_storage<T>(v * d, 0.1, rng()));
  auto t = random_storage<T>(n * v, 1.0, rng());
  td.upload(t);
  std::vector<std::int32_t> labels(n, 1);
  lab_d.upload(labels);
  kd::cuda::context ctx;
  using P = kd::precision_set<kd::bf16, kd::bf16, kd::bf16>;
  kd::linear_logit_kd<kd::forward_kl, kd::token_mean, P> l;
  l.options.path = kd::linear_kd_path::on_chip;
  kd::cuda::device_loss out{loss_d.data, nullptr};
  const kd::cuda::backend be{&ctx};
  const std::span<const std::int32_t> lab(lab_d.data, n);
  auto call = [&](kd::index_t width, const T* tdata) {
    return l(be, kd::matrix_view<const T>(hd.data, n, width), kd::matrix_view<const T>(wd.data, v, width),
             kd::matrix_view<const T>(tdata, n, v), lab, out, kd::matrix_view<T>(dhd.data, n, width),
             kd::matrix_view<T>(dwd.data, v, width));
  };
  SUBCASE("a hidden width that is not a multiple of 8") {
    const auto s = call(60, td.data);
    CHECK(s.code() == kd::errc::invalid_argument);
    CHECK(s.message().find("multiple of 8") != std::string::npos);
  }
  SUBCASE("a vocab map") {
    std::vector<std::pair<std::int32_t, std::int32_t>> pairs;
    for (kd::index_t i = 0; i < v; ++i) pairs.emplace_back(static_cast<std::int32_t>(i), static_cast<std::int32_t>(i));
    kd::vocab_map map;
    REQUIRE(kd::vocab_map::from_pairs(pairs, v, v, map).ok());
    l.options.map = &map;
    const auto s = call(d, td.data);
    CHECK(s.code() == kd::errc::invalid_argument);
    CHECK(s.message().find("vocab_map") != std::string::npos);
  }
  SUBCASE("logits rounded to the storage type (a chunked-path option)") {
    l.options.logits = kd::linear_kd_logits::storage;
    const auto s = call(d, td.data);
    CHECK(s.code() == kd::errc::invalid_argument);
    CHECK(s.message().find("linear_kd_logits::storage") != std::string::npos);
  }
  SUBCASE("a negative split count") {
    l.options.on_chip_splits = -1;
    const auto s = call(d, td.data);
    CHECK(s.code() == kd::errc::invalid_argument);
    CHECK(s.message().find("on_chip_splits") != std::string::npos);
  }
  SUBCASE("a NaN teacher row is reported as the teacher's, by row") {
    t[static_cast<std::size_t>(77 * v + 5)] = kd::store_as<T>(std::nanf(""));
    td.upload(t);
    REQUIRE(call(d, td.data).ok());
    const auto s = ctx.sync_status();
    CHECK(!s.ok());
    CHECK(s.message().find("teacher") != std::string::npos);
    CHECK(s.message().find("77") != std::string::npos);
  }
  SUBCASE("a label outside the vocabulary") {
    labels[9] = static_cast<std::int32_t>(v);
    lab_d.upload(labels);
    REQUIRE(call(d, td.data).ok());
    const auto s = ctx.sync_status();
    CHECK(!s.ok());
    CHECK(s.message().find("label") != std::string::npos);
  }
}

TEST_CASE("on-chip linear + KD: float storage is refused with the reason") {
  kd::cuda::context ctx;
  device_buffer<float> hd(8 * 16), wd(32 * 16), td(8 * 32), loss_d(1);
  kd::linear_logit_kd<kd::forward_kl, kd::token_mean, kd::precision_set<kd::fp32, kd::fp32, kd::fp32>> l;
  l.options.path = kd::linear_kd_path::on_chip;
  kd::cuda::device_loss out{loss_d.data, nullptr};
  const auto s = l(kd::cuda::backend{&ctx}, kd::matrix_view<const float>(hd.data, 8, 16),
                   kd::matrix_view<const float>(wd.data, 32, 16), kd::matrix_view<const float>(td.data, 8, 32), {}, out,
                   kd::matrix_view<float>(), kd::matrix_view<float>());
  CHECK(s.code() == kd::errc::invalid_argument);
  CHECK(s.message().find("bfloat16 or half") != std::string::npos);
  // A float teacher head beside a bf16 student: the teacher's GEMM runs on the tensor cores too.
  device_buffer<kd::bfloat16> hb(8 * 16), wb(32 * 16);
  kd::linear_logit_kd<kd::forward_kl, kd::token_mean, kd::precision_set<kd::fp32, kd::bf16, kd::bf16>> m;
  m.options.path = kd::linear_kd_path::on_chip;
  const auto s2 = m(kd::cuda::backend{&ctx}, kd::matrix_view<const kd::bfloat16>(hb.data, 8, 16),
                    kd::matrix_view<const kd::bfloat16>(wb.data, 32, 16),
                    kd::teacher_head<float>{kd::matrix_view<const float>(hd.data, 8, 16), kd::matrix_view<const float>(wd.data, 32, 16)},
                    {}, out, kd::matrix_view<kd::bfloat16>(), kd::matrix_view<kd::bfloat16>());
  CHECK(s2.code() == kd::errc::invalid_argument);
  CHECK(s2.message().find("teacher head") != std::string::npos);
}
