// The CUDA vocabulary-parallel losses (kd/loss/vocab_parallel.cuh) on one GPU:
//  - one slice (solo_communicator) against the fused one-GPU kernels (logit_kd, cross_entropy);
//  - 1-4 uneven slices, ranks on threads each with its own stream, their device statistics all-reduced
//    through host memory (staged_communicator below), against the CPU reference on the whole rows, for
//    every divergence, fp32 and bf16 storage, padding, ignored rows; every gradient column is poisoned
//    first, so a column no rank writes fails the comparison;
//  - a NaN in one rank's slice: that row is skipped on every rank and named by that rank's sync_status.
// Multi-GPU runs over NCCL need machines with several GPUs (issue 13).
#include <doctest/doctest.h>

#include <cmath>
#include <functional>
#include <memory>
#include <thread>
#include <vector>

#include <kd/core/comm.hpp>
#include <kd/cuda/context.cuh>
#include <kd/kd.hpp>
#include <kd/loss/vocab_parallel.cuh>

#include "gpu_util.cuh"

namespace {

using namespace kd_test;
using kd::index_t;

// A device-memory communicator for ranks that share one GPU: each collective waits for the rank's stream,
// reduces a host copy through a host communicator (a thread_group member) and copies it back.
class staged_communicator final : public kd::communicator {
 public:
  staged_communicator(kd::communicator& host, kd::cuda::context& ctx) : h_(&host), ctx_(&ctx) {}
  [[nodiscard]] int rank() const override { return h_->rank(); }
  [[nodiscard]] int size() const override { return h_->size(); }
  kd::status all_reduce(float* d, std::size_t n, kd::reduce_op op) override { return staged(d, n, op); }
  kd::status all_reduce(double* d, std::size_t n, kd::reduce_op op) override { return staged(d, n, op); }
  kd::status all_reduce(kd::bfloat16* d, std::size_t n, kd::reduce_op op) override { return staged(d, n, op); }
  kd::status all_reduce(kd::half* d, std::size_t n, kd::reduce_op op) override { return staged(d, n, op); }
  kd::status all_reduce_host(std::int64_t* d, std::size_t n, kd::reduce_op op) override { return h_->all_reduce_host(d, n, op); }
  kd::status all_reduce_host(double* d, std::size_t n, kd::reduce_op op) override { return h_->all_reduce_host(d, n, op); }
  kd::status broadcast_host(void* d, std::size_t n, int root) override { return h_->broadcast_host(d, n, root); }
  kd::status barrier() override { return h_->barrier(); }

 private:
  template <class T>
  kd::status staged(T* d, std::size_t n, kd::reduce_op op) {
    // In the rank's stream order: the copy back must land before the rank's next kernel reads it (a
    // pageable cudaMemcpy to the device may return before its DMA is done).
    std::vector<T> h(n);
    if (cudaMemcpyAsync(h.data(), d, n * sizeof(T), cudaMemcpyDeviceToHost, ctx_->stream()) != cudaSuccess ||
        cudaStreamSynchronize(ctx_->stream()) != cudaSuccess)
      return {kd::errc::backend_error, "staged_communicator: copy to the host"};
    KD_TRY(h_->all_reduce(h.data(), n, op));
    if (cudaMemcpyAsync(d, h.data(), n * sizeof(T), cudaMemcpyHostToDevice, ctx_->stream()) != cudaSuccess ||
        cudaStreamSynchronize(ctx_->stream()) != cudaSuccess)
      return {kd::errc::backend_error, "staged_communicator: copy to the device"};
    return {};
  }
  kd::communicator* h_;
  kd::cuda::context* ctx_;
};

std::vector<index_t> cuts(index_t cols, int ranks) {
  std::vector<index_t> c{0};
  for (int r = 1; r < ranks; ++r) c.push_back(cols * r / ranks + (r % 2 == 0 ? 5 : -3));
  c.push_back(cols);
  return c;
}

// Runs fn(rank, comm, ctx) on `ranks` threads, each with its own context (stream) on this GPU.
void on_gpu_ranks(int ranks, const std::function<void(int, kd::communicator&, kd::cuda::context&)>& fn) {
  kd::thread_group g(ranks, std::chrono::seconds(60));
  std::vector<std::thread> th;
  for (int r = 0; r < ranks; ++r)
    th.emplace_back([&, r] {
      kd::cuda::context ctx;
      staged_communicator comm(g.member(r), ctx);
      fn(r, comm, ctx);
    });
  for (auto& t : th) t.join();
}

// offset != 0: student = 0.9 teacher + offset + noise (close distributions, shifted logits), and the
// value is held to `value_eps` relative; grad_eps != 0: the gradient's norm-relative tolerance (else 1e-4
// in float, 1e-2 in 16 bits).
template <class D, class T>
void check_kd(double temperature, double offset = 0.0, double value_eps = 2e-5, double grad_eps = 0.0) {
  const index_t n = 13, cols = 1031, real = 1019;
  auto& g = rng();
  const auto th = random_storage<T>(static_cast<std::size_t>(n * cols), 2.0, g);
  const auto sh =
      offset != 0.0 ? close_student<T>(th, offset, g) : random_storage<T>(static_cast<std::size_t>(n * cols), 2.0, g);
  std::vector<std::int32_t> labels(static_cast<std::size_t>(n));
  for (index_t i = 0; i < n; ++i) labels[static_cast<std::size_t>(i)] = i % 4 == 1 ? kd::default_ignore_index : static_cast<std::int32_t>((i * 37) % real);
  // Reference: the CPU on whole rows, in double, from the same stored values.
  using P64 = kd::precision_set<kd::fp64, kd::fp64>;
  kd::logit_kd<D, kd::token_mean, P64> ref_loss;
  ref_loss.options.temperature = temperature;
  ref_loss.options.vocab = real;
  ref_loss.options.beta = 0.3;
  ref_loss.options.alpha = 0.2;
  const auto t64 = to_double(th), s64 = to_double(sh);
  std::vector<double> ref_grad(t64.size());
  kd::loss_result ref;
  REQUIRE(ref_loss(kd::cpu, kd::matrix_view<const double>(t64.data(), n, cols), kd::matrix_view<const double>(s64.data(), n, cols),
                   labels, ref, kd::matrix_view<double>(ref_grad.data(), n, cols))
              .ok());
  using PT = kd::precision_set<kd::precision<T, float>, kd::precision<T, float>>;
  kd::logit_kd<D, kd::token_mean, PT> loss;
  loss.options = ref_loss.options;
  for (int ranks : {1, 2, 4}) {
    CAPTURE(ranks);
    const auto c = cuts(cols, ranks);
    std::vector<double> grad(t64.size(), NAN);
    std::vector<float> value(static_cast<std::size_t>(ranks), NAN);
    std::vector<kd::status> st(static_cast<std::size_t>(ranks));
    on_gpu_ranks(ranks, [&](int r, kd::communicator& comm, kd::cuda::context& ctx) {
      const index_t a = c[static_cast<std::size_t>(r)], w = c[static_cast<std::size_t>(r) + 1] - a;
      const auto ts = columns(th, n, cols, a, w), ss = columns(sh, n, cols, a, w);
      device_buffer<T> td(ts.size()), sd(ss.size()), gd(ss.size());
      device_buffer<std::int32_t> ld(labels.size());
      device_buffer<float> vd(1);
      td.upload(ts);
      sd.upload(ss);
      ld.upload(labels);
      gd.poison();
      kd::cuda::device_loss out{vd.data, nullptr};
      st[static_cast<std::size_t>(r)] = kd::vocab_parallel_kd(
          kd::cuda::backend{&ctx}, loss, comm, kd::vocab_slice{a, cols}, kd::matrix_view<const T>(td.data, n, w),
          kd::matrix_view<const T>(sd.data, n, w), std::span<const std::int32_t>(ld.data, labels.size()), out,
          kd::matrix_view<T>(gd.data, n, w));
      if (st[static_cast<std::size_t>(r)].ok()) st[static_cast<std::size_t>(r)] = ctx.sync_status();
      put_columns(gd.download(), n, cols, a, w, grad);
      value[static_cast<std::size_t>(r)] = vd.download()[0];
    });
    for (int r = 0; r < ranks; ++r) {
      REQUIRE_MESSAGE(st[static_cast<std::size_t>(r)].ok(), st[static_cast<std::size_t>(r)].message());
      CHECK(value[static_cast<std::size_t>(r)] == doctest::Approx(ref.loss).epsilon(value_eps));
    }
    CHECK(all_finite(grad));
    CHECK(rel_error(grad, ref_grad) < (grad_eps != 0.0 ? grad_eps : sizeof(T) == 2 ? 1e-2 : 1e-4));
  }
}

// Pass 1 alone (kd::cuda::detail::vp_kd_stats_kernel) against double sums on the host: each row's base-2
// log-sum-exps and E_p[yt - ys] (forward KL's term, summed in bits), 16-byte vector path and element
// path. `offset` shifts the teacher's logits (the kernel's per-row references must add it back).
template <class T>
void check_stats(kd::index_t cols, kd::index_t real, bool vec, double offset = 0.0) {
  namespace cd = kd::cuda::detail;
  const index_t n = 64;
  auto& g = rng();
  auto th = random_storage<T>(static_cast<std::size_t>(n * cols), 3.0, g);
  for (auto& x : th) x = kd::store_as<T>(static_cast<float>(kd::load_as<double>(x) + offset));
  const auto sh = random_storage<T>(static_cast<std::size_t>(n * cols), 2.0, g);
  kd::cuda::context ctx;
  device_buffer<T> td(th.size()), sd(sh.size());
  device_buffer<double> mx(static_cast<std::size_t>(3 * n)), loc(static_cast<std::size_t>(2 * n)), sums(static_cast<std::size_t>(3 * n));
  td.upload(th);
  sd.upload(sh);
  cd::vp_params p;
  p.teacher = td.data;
  p.student = sd.data;
  p.t_stride = p.s_stride = cols;
  p.rows = n;
  p.cols = cols;
  p.real = real;
  p.inv_temp = 0.5f;
  p.mode = 1;
  p.mx = mx.data;
  p.loc = loc.data;
  p.sums = sums.data;
  REQUIRE(ctx.error_word(p.error).ok());
  if (vec) cd::vp_kd_stats_kernel<1, true, T, T><<<static_cast<unsigned>(n), cd::kVpThreads, 0, ctx.stream()>>>(p);
  else cd::vp_kd_stats_kernel<1, false, T, T><<<static_cast<unsigned>(n), cd::kVpThreads, 0, ctx.stream()>>>(p);
  REQUIRE(cudaGetLastError() == cudaSuccess);
  const kd::status st = ctx.sync_status();
  CHECK_MESSAGE(st.ok(), st.message());
  const auto m = mx.download(), su = sums.download();
  int bad = 0;
  for (index_t i = 0; i < n && bad < 3; ++i) {
    double mt = -INFINITY, ms = -INFINITY;
    for (index_t j = 0; j < real; ++j) {
      mt = std::max(mt, kd::load_as<double>(th[static_cast<std::size_t>(i * cols + j)]) * 0.5);
      ms = std::max(ms, kd::load_as<double>(sh[static_cast<std::size_t>(i * cols + j)]) * 0.5);
    }
    double st_ = 0, ss = 0, a = 0;
    for (index_t j = 0; j < real; ++j) {
      const double yt = kd::load_as<double>(th[static_cast<std::size_t>(i * cols + j)]) * 0.5;
      const double ys = kd::load_as<double>(sh[static_cast<std::size_t>(i * cols + j)]) * 0.5;
      st_ += std::exp(yt - mt);
      ss += std::exp(ys - ms);
      a += std::exp(yt - mt) * (yt - ys);
    }
    const double lt = (mt + std::log(st_)) / std::log(2.0), ls = (ms + std::log(ss)) / std::log(2.0), ea = a / st_;
    const auto I = static_cast<std::size_t>(i);
    const double gt = m[3 * I] + std::log2(su[3 * I]), gs = m[3 * I + 1] + std::log2(su[3 * I + 1]);
    const double ga = su[3 * I + 2] / su[3 * I] * std::log(2.0);  // the term is summed in bits
    const bool ok = std::abs(gt - lt) < 1e-5 && std::abs(gs - ls) < 1e-5 && std::abs(ga - ea) < 1e-5 * (1 + std::abs(ea)) && m[3 * I + 2] == 0.0;
    if (!ok) {
      ++bad;
      MESSAGE("row ", i, ": lse2 teacher ", gt, " (", lt, "), student ", gs, " (", ls, "), E_p[yt - ys] ", ga, " (", ea,
              "), max ", m[3 * I], " sums ", su[3 * I], " ", su[3 * I + 1], " ", su[3 * I + 2], " flag ", m[3 * I + 2]);
    }
  }
  CHECK(bad == 0);
}

}  // namespace

TEST_CASE("vocab-parallel pass 1 (row statistics) = double sums on the host") {
  for (bool vec : {false, true}) {
    CAPTURE(vec);
    check_stats<float>(50304, 50257, vec);
    check_stats<kd::bfloat16>(50304, 50257, vec);
    check_stats<float>(2048, 2048, vec);
    check_stats<kd::bfloat16>(2048, 2048, vec);
  }
  check_stats<float>(1031, 1019, false);
  check_stats<kd::bfloat16>(1031, 1019, false);
  check_stats<float>(50304, 50257, true, 150.0);
  check_stats<kd::bfloat16>(2048, 2048, false, -200.0);
}

TEST_CASE_TEMPLATE("vocab_parallel_kd (CUDA) on 1, 2, 4 slices = the whole rows", D, kd::forward_kl, kd::reverse_kl, kd::jsd,
                   kd::skew_kl, kd::tvd) {
  check_kd<D, float>(2.0);
  check_kd<D, kd::bfloat16>(1.0);
}

// Logits far apart, distributions close (KL ~0.01-0.03 nats): pass 1 takes each model's logits from a
// per-row reference, so the value holds to 1e-5 (a float emulation: <= 2.3e-6; logits rounded at their
// own size erred by 1e-5 to 7e-5 at these offsets). Float gradients take the float lse's rounding back
// per row from the doubles (vp_lse2's excess), so they hold to 6e-6 as well.
TEST_CASE_TEMPLATE("vocab_parallel_kd (CUDA): forward and reverse KL between logits far apart", D, kd::forward_kl,
                   kd::reverse_kl) {
  for (double offset : {150.0, -150.0, 400.0}) {
    CAPTURE(offset);
    check_kd<D, float>(2.0, offset, 1e-5, 6e-6);
    if (offset != 400.0) check_kd<D, kd::bfloat16>(2.0, offset, 1e-5);  // bf16 spaces logits near 400 by 2
  }
}

TEST_CASE("vocab_parallel_kd (CUDA) on one slice = the fused logit_kd kernel") {
  const index_t n = 64, V = 50304;
  auto& g = rng();
  const auto th = random_storage<kd::bfloat16>(static_cast<std::size_t>(n * V), 2.0, g);
  const auto sh = random_storage<kd::bfloat16>(static_cast<std::size_t>(n * V), 2.0, g);
  device_buffer<kd::bfloat16> td(th.size()), sd(sh.size()), g1(sh.size()), g2(sh.size());
  device_buffer<float> v(2);
  td.upload(th);
  sd.upload(sh);
  kd::cuda::context ctx;
  kd::logit_kd<kd::forward_kl, kd::token_mean, kd::precision_set<kd::bf16, kd::bf16>> loss;
  loss.options.temperature = 2.0;
  loss.options.vocab = 50257;
  kd::cuda::device_loss o1{v.data, nullptr}, o2{v.data + 1, nullptr};
  REQUIRE(loss(kd::cuda::backend{&ctx}, kd::matrix_view<const kd::bfloat16>(td.data, n, V), kd::matrix_view<const kd::bfloat16>(sd.data, n, V),
               std::span<const std::int32_t>(), o1, kd::matrix_view<kd::bfloat16>(g1.data, n, V))
              .ok());
  kd::solo_communicator solo;
  REQUIRE(kd::vocab_parallel_kd(kd::cuda::backend{&ctx}, loss, solo, kd::vocab_slice{0, V},
                                kd::matrix_view<const kd::bfloat16>(td.data, n, V), kd::matrix_view<const kd::bfloat16>(sd.data, n, V),
                                std::span<const std::int32_t>(), o2, kd::matrix_view<kd::bfloat16>(g2.data, n, V))
              .ok());
  REQUIRE(ctx.sync_status().ok());
  const auto vals = v.download();
  CHECK(vals[1] == doctest::Approx(vals[0]).epsilon(1e-5));
  CHECK(rel_error(to_double(g2.download()), to_double(g1.download())) < 1e-2);  // bf16 gradients: one rounding apart
}

TEST_CASE("vocab_parallel_cross_entropy (CUDA) on 1, 3 slices = cross_entropy on the whole rows") {
  const index_t n = 17, cols = 2053, real = 2040;
  auto& g = rng();
  const auto sh = random_storage<float>(static_cast<std::size_t>(n * cols), 3.0, g);
  std::vector<std::int32_t> labels(static_cast<std::size_t>(n));
  for (index_t i = 0; i < n; ++i) labels[static_cast<std::size_t>(i)] = i % 5 == 2 ? kd::default_ignore_index : static_cast<std::int32_t>((i * 131) % real);
  kd::cross_entropy<kd::token_mean, kd::fp64> ref_ce;
  ref_ce.options.vocab = real;
  ref_ce.options.z_loss_weight = 1e-2;
  const auto s64 = to_double(sh);
  std::vector<double> ref_grad(s64.size());
  kd::cross_entropy_result ref;
  REQUIRE(ref_ce(kd::cpu, kd::matrix_view<const double>(s64.data(), n, cols), labels, ref, kd::matrix_view<double>(ref_grad.data(), n, cols)).ok());
  kd::cross_entropy<kd::token_mean, kd::fp32> ce;
  ce.options = ref_ce.options;
  for (int ranks : {1, 3}) {
    CAPTURE(ranks);
    const auto c = cuts(cols, ranks);
    std::vector<double> grad(s64.size(), NAN);
    std::vector<std::vector<float>> vals(static_cast<std::size_t>(ranks));
    std::vector<kd::status> st(static_cast<std::size_t>(ranks));
    on_gpu_ranks(ranks, [&](int r, kd::communicator& comm, kd::cuda::context& ctx) {
      const index_t a = c[static_cast<std::size_t>(r)], w = c[static_cast<std::size_t>(r) + 1] - a;
      const auto ss = columns(sh, n, cols, a, w);
      device_buffer<float> sd(ss.size()), gd(ss.size()), vd(2);
      device_buffer<std::int32_t> ld(labels.size());
      sd.upload(ss);
      ld.upload(labels);
      gd.poison();
      kd::cuda::device_cross_entropy out{vd.data, vd.data + 1, nullptr};
      st[static_cast<std::size_t>(r)] = kd::vocab_parallel_cross_entropy(
          kd::cuda::backend{&ctx}, ce, comm, kd::vocab_slice{a, cols}, kd::matrix_view<const float>(sd.data, n, w),
          std::span<const std::int32_t>(ld.data, labels.size()), out, kd::matrix_view<float>(gd.data, n, w));
      if (st[static_cast<std::size_t>(r)].ok()) st[static_cast<std::size_t>(r)] = ctx.sync_status();
      vals[static_cast<std::size_t>(r)] = vd.download();
      put_columns(gd.download(), n, cols, a, w, grad);
    });
    for (int r = 0; r < ranks; ++r) {
      REQUIRE_MESSAGE(st[static_cast<std::size_t>(r)].ok(), st[static_cast<std::size_t>(r)].message());
      CHECK(vals[static_cast<std::size_t>(r)][0] == doctest::Approx(ref.ce).epsilon(1e-5));
      CHECK(vals[static_cast<std::size_t>(r)][1] == doctest::Approx(ref.z_loss).epsilon(1e-5));
    }
    CHECK(all_finite(grad));
    CHECK(rel_error(grad, ref_grad) < 1e-5);
  }
}

TEST_CASE("vocab_parallel_kd (CUDA): a NaN in one rank's slice skips the row everywhere and is named there") {
  const index_t n = 6, cols = 300;
  auto& g = rng();
  auto th = random_storage<float>(static_cast<std::size_t>(n * cols), 1.0, g);
  const auto sh = random_storage<float>(static_cast<std::size_t>(n * cols), 1.0, g);
  th[static_cast<std::size_t>(3 * cols + 250)] = NAN;  // row 3, in rank 1's half
  kd::logit_kd<kd::forward_kl, kd::token_mean, kd::precision_set<kd::fp32, kd::fp32>> loss;
  std::vector<kd::status> st(2);
  on_gpu_ranks(2, [&](int r, kd::communicator& comm, kd::cuda::context& ctx) {
    const index_t a = r == 0 ? 0 : 150, w = 150;
    const auto ts = columns(th, n, cols, a, w), ss = columns(sh, n, cols, a, w);
    device_buffer<float> td(ts.size()), sd(ss.size()), gd(ss.size()), vd(1);
    td.upload(ts);
    sd.upload(ss);
    kd::cuda::device_loss out{vd.data, nullptr};
    st[static_cast<std::size_t>(r)] = kd::vocab_parallel_kd(kd::cuda::backend{&ctx}, loss, comm, kd::vocab_slice{a, cols},
                                                            kd::matrix_view<const float>(td.data, n, w), kd::matrix_view<const float>(sd.data, n, w),
                                                            std::span<const std::int32_t>(), out, kd::matrix_view<float>(gd.data, n, w));
    if (st[static_cast<std::size_t>(r)].ok()) st[static_cast<std::size_t>(r)] = ctx.sync_status();
    const auto gh = gd.download();
    for (index_t j = 0; j < w; ++j) CHECK(gh[static_cast<std::size_t>(3 * w + j)] == 0.f);  // the row is skipped on both ranks
  });
  CHECK(st[0].ok());
  CHECK(st[1].code() == kd::errc::non_finite);
  CHECK(st[1].message().find("teacher") != std::string::npos);
}
