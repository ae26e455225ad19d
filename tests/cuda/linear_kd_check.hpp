// linear + KD on the GPU against the fp64 CPU reference, for both CUDA paths (chunked, on chip): the one
// check test_cuda_losses and test_cuda_linear_kd_on_chip share.
#pragma once

#include <doctest/doctest.h>

#include <cstdint>
#include <span>
#include <vector>

#include <kd/kd.cuh>

#include "gpu_util.cuh"

namespace kd_test {

struct linear_kd_case {
  kd::index_t n = 0, d = 0, v = 0;
  kd::index_t chunk = 2048;  // the chunked path's (and the CPU reference's) chunk_rows
  kd::index_t dt = 0;        // > 0: the teacher as hidden states of this width and an LM head
  kd::index_t vocab = 0;     // > 0: real columns (the rest padding)
  double temperature = 2.0;
  bool want_dh = true, want_dw = true, accumulate = false;
  kd::linear_kd_path path = kd::linear_kd_path::chunked;
  kd::index_t splits = 0;  // on_chip_splits
};

// linear + KD on the GPU (path c.path; student hidden states, head and gradients in storage T, the
// teacher's logits or hidden states and head in TT; fp32 accumulation) against the fp64 CPU reference:
// the loss, the token count, both gradients (or that an unwanted one is left alone), and that padding
// rows of the head get no gradient.
template <class T, class D, class TT = T>
void check_linear_kd(const linear_kd_case& c) {
  const bool head = c.dt > 0;
  const kd::index_t n = c.n, d = c.d, v = c.v;
  const kd::index_t support = c.vocab > 0 ? c.vocab : v;
  auto hh = random_storage<T>(static_cast<std::size_t>(n * d), 1.0, rng());
  auto wh = random_storage<T>(static_cast<std::size_t>(v * d), 0.125, rng());
  auto th = random_storage<TT>(static_cast<std::size_t>(head ? n * c.dt : n * v), head ? 1.0 : 2.0, rng());
  auto twh = random_storage<TT>(static_cast<std::size_t>(head ? v * c.dt : 0), 0.25, rng());
  std::vector<std::int32_t> labels(static_cast<std::size_t>(n));
  for (kd::index_t i = 0; i < n; ++i)
    labels[static_cast<std::size_t>(i)] = i % 7 == 3 ? -100 : static_cast<int>((i * 31) % support);
  // Accumulation adds to what the gradients hold; else they start poisoned (NaN) and must be overwritten.
  auto dh0 = random_storage<T>(hh.size(), 0.01, rng());
  auto dw0 = random_storage<T>(wh.size(), 0.01, rng());
  device_buffer<T> hd(hh.size()), wd(wh.size()), dhd(hh.size()), dwd(wh.size());
  device_buffer<TT> td(th.size()), twd(twh.size());
  device_buffer<float> loss_d(1);
  device_buffer<long long> tok_d(1);
  device_buffer<std::int32_t> lab_d(labels.size());
  hd.upload(hh);
  wd.upload(wh);
  td.upload(th);
  if (head) twd.upload(twh);
  lab_d.upload(labels);
  if (c.accumulate) {
    dhd.upload(dh0);
    dwd.upload(dw0);
  } else {
    dhd.poison();
    dwd.poison();
  }
  kd::cuda::context ctx;
  using P = kd::precision_set<kd::precision<TT, float>, kd::precision<T, float>, kd::precision<T, float>>;
  kd::linear_logit_kd<D, kd::token_mean, P> gpu;
  gpu.options.temperature = c.temperature;
  gpu.options.vocab = c.vocab;
  gpu.options.accumulate_grad = c.accumulate;
  gpu.options.path = c.path;
  gpu.options.chunk_rows = c.chunk;
  gpu.options.on_chip_splits = c.splits;
  kd::cuda::device_loss out{loss_d.data, tok_d.data};
  const kd::matrix_view<const T> hv(hd.data, n, d), wv(wd.data, v, d);
  const std::span<const std::int32_t> lab(lab_d.data, labels.size());
  const kd::matrix_view<T> dhv = c.want_dh ? kd::matrix_view<T>(dhd.data, n, d) : kd::matrix_view<T>();
  const kd::matrix_view<T> dwv = c.want_dw ? kd::matrix_view<T>(dwd.data, v, d) : kd::matrix_view<T>();
  const kd::status call =
      head ? gpu(kd::cuda::backend{&ctx}, hv, wv,
                 kd::teacher_head<TT>{kd::matrix_view<const TT>(td.data, n, c.dt), kd::matrix_view<const TT>(twd.data, v, c.dt)},
                 lab, out, dhv, dwv)
           : gpu(kd::cuda::backend{&ctx}, hv, wv, kd::matrix_view<const TT>(td.data, n, v), lab, out, dhv, dwv);
  REQUIRE_MESSAGE(call.ok(), call.message());
  const auto st = ctx.sync_status();
  REQUIRE_MESSAGE(st.ok(), st.message());

  auto h64 = to_double(hh), w64 = to_double(wh), t64 = to_double(th), tw64 = to_double(twh);
  std::vector<double> dh_ref(hh.size()), dw_ref(wh.size());
  kd::linear_logit_kd<D, kd::token_mean, kd::precision_set<kd::fp64, kd::fp64, kd::fp64>> ref;
  ref.options = gpu.options;
  ref.options.accumulate_grad = false;
  kd::loss_result rr;
  const kd::matrix_view<const double> h64v(h64.data(), n, d), w64v(w64.data(), v, d);
  const kd::matrix_view<double> dhr(dh_ref.data(), n, d), dwr(dw_ref.data(), v, d);
  const kd::status ref_call =
      head ? ref(kd::cpu, h64v, w64v,
                 kd::teacher_head<double>{kd::matrix_view<const double>(t64.data(), n, c.dt),
                                          kd::matrix_view<const double>(tw64.data(), v, c.dt)},
                 labels, rr, dhr, dwr)
           : ref(kd::cpu, h64v, w64v, kd::matrix_view<const double>(t64.data(), n, v), labels, rr, dhr, dwr);
  REQUIRE_MESSAGE(ref_call.ok(), ref_call.message());
  if (c.accumulate) {
    // The accumulated part is compared on its own: the sum's rounding to T is checked separately below.
    for (std::size_t i = 0; i < dh_ref.size(); ++i) dh_ref[i] += kd::load_as<double>(dh0[i]);
    for (std::size_t i = 0; i < dw_ref.size(); ++i) dw_ref[i] += kd::load_as<double>(dw0[i]);
  }
  const double loss = loss_d.download()[0];
  INFO("linear KD path ", static_cast<int>(c.path), " n=", n, " d=", d, " v=", v, " vocab=", c.vocab, " teacher hidden width ", c.dt,
       " accumulate=", c.accumulate, " loss gpu=", loss, " ref=", rr.loss);
  CHECK(std::abs(loss - rr.loss) <= tolerance<T>() * std::abs(rr.loss));
  CHECK(tok_d.download()[0] == rr.tokens);
  if (c.want_dh) {
    const auto dh = to_double(dhd.download());
    CHECK(all_finite(dh));
    CHECK(rel_error(dh, dh_ref) <= tolerance<T>());
  } else {
    CHECK(!all_finite(to_double(dhd.download())) == !c.accumulate);  // untouched
  }
  if (c.want_dw) {
    const auto dw = to_double(dwd.download());
    CHECK(all_finite(dw));
    CHECK(rel_error(dw, dw_ref) <= tolerance<T>());
    // Padding rows of the head get no gradient: zero, or what was there when accumulating.
    for (kd::index_t r = support; r < v; ++r)
      for (kd::index_t j = 0; j < d; ++j) {
        const std::size_t i = static_cast<std::size_t>(r * d + j);
        CHECK(dw[i] == (c.accumulate ? kd::load_as<double>(dw0[i]) : 0.0));
      }
  }
}

}  // namespace kd_test
