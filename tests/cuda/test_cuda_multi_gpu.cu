// Several GPUs of one host over NCCL, one thread per GPU, every device of the machine (skipped, exit 77,
// with fewer than two: tests/cuda/CMakeLists.txt links this test to the multi-GPU main):
//  - data-parallel distill_step: R ranks, one row each, two steps = one GPU on the R rows: the logged
//    losses to 1e-5, the all-reduced gradients to 1e-5 of their largest, and every rank ends with the
//    same parameters bit for bit;
//  - vocab_parallel_kd (every divergence) and vocab_parallel_cross_entropy over R uneven slices, one per
//    GPU = the fused one-GPU kernels on the whole rows, fp32: loss and gradient to 1e-5.
#include <doctest/doctest.h>

#include <chrono>
#include <cmath>
#include <functional>
#include <memory>
#include <string>
#include <thread>
#include <type_traits>
#include <vector>

#include <kd/cuda/context.cuh>
#include <kd/cuda/nccl.cuh>
#include <kd/kd.hpp>
#include <kd/loss/vocab_parallel.cuh>
#include <kd/model/cuda/ops.cuh>
#include <kd/train/distill_step.hpp>
#include <kd/train/step_backend.cuh>

#include "../distill_fixture.hpp"
#include "gpu_util.cuh"

namespace {

namespace km = kd::model;
using namespace kd_test;
using namespace kd_test::distill;
using kd::index_t;

int gpus() {
  int n = 0;
  REQUIRE(cudaGetDeviceCount(&n) == cudaSuccess);
  return n;
}

// fn(rank, comm, ctx) on one thread per GPU, each with its context and its NCCL communicator. Statuses
// come back to the caller (doctest's REQUIRE must not throw on a worker thread).
std::vector<kd::status> on_gpus(int ranks, const std::function<kd::status(int, kd::communicator&, kd::cuda::context&)>& fn) {
  ncclUniqueId id;
  REQUIRE(ncclGetUniqueId(&id) == ncclSuccess);
  std::vector<kd::status> st(static_cast<std::size_t>(ranks));
  std::vector<std::thread> th;
  for (int r = 0; r < ranks; ++r)
    th.emplace_back([&, r] {
      auto& s = st[static_cast<std::size_t>(r)];
      if (cudaSetDevice(r) != cudaSuccess) {
        s = {kd::errc::backend_error, "cudaSetDevice failed"};
        return;
      }
      kd::cuda::context ctx;
      std::unique_ptr<kd::cuda::nccl_communicator> comm;
      s = kd::cuda::nccl_communicator::create(ctx, r, ranks, id, std::chrono::seconds(120), comm);
      if (s.ok()) s = fn(r, *comm, ctx);
      if (s.ok()) s = ctx.sync_status();
    });
  for (auto& t : th) t.join();
  for (int r = 0; r < ranks; ++r) {
    CAPTURE(r);
    CHECK_MESSAGE(st[static_cast<std::size_t>(r)].ok(), st[static_cast<std::size_t>(r)].message());
  }
  REQUIRE(cudaSetDevice(0) == cudaSuccess);
  return st;
}

// The rows of several batches as one batch (aligned positions re-based).
kd::train::text_batch join_rows(const std::vector<kd::train::text_batch>& parts) {
  kd::train::text_batch o;
  o.batch = 0;
  o.seq = parts.front().seq;
  o.teacher_seq = parts.front().teacher_seq;
  for (const auto& p : parts) {
    const auto bs = static_cast<std::int32_t>(o.batch * o.seq), bt = static_cast<std::int32_t>(o.batch * o.teacher_seq);
    o.student_ids.insert(o.student_ids.end(), p.student_ids.begin(), p.student_ids.end());
    o.student_labels.insert(o.student_labels.end(), p.student_labels.begin(), p.student_labels.end());
    o.teacher_ids.insert(o.teacher_ids.end(), p.teacher_ids.begin(), p.teacher_ids.end());
    o.teacher_labels.insert(o.teacher_labels.end(), p.teacher_labels.begin(), p.teacher_labels.end());
    for (std::size_t k = 0; k < p.aligned_student.size(); ++k) {
      o.aligned_student.push_back(p.aligned_student[k] + bs);
      o.aligned_teacher.push_back(p.aligned_teacher[k] + bt);
    }
    o.batch += p.batch;
  }
  return o;
}

using model_t = km::transformer<km::cuda_ops<float>>;

struct gpu_run {
  km::cuda_ops<float> b;
  model_t teacher, student;
  kd::vocab_map map = make_map();
  kd::objective obj = full_objective();
  kd::train::distill_step<model_t, model_t> step;
  gpu_run(kd::cuda::context& ctx, kd::communicator* comm)
      : b(ctx), teacher(b, km::make_arch(teacher_cfg())), student(b, km::make_arch(student_cfg())) {
    b.set_deterministic(true);
    init_models(teacher, student);
    auto o = fixture_options();
    o.comm = comm;
    o.bucket_elements = 5000;  // several buckets, started during the backward
    kd::check(step.init(&teacher, student, &map, obj, o, adamw()));
  }
  std::vector<float> download(const float* d) {
    std::vector<float> h(student.table().size());
    kd::check(b.download(d, h.size(), h.data()));
    return h;
  }
};

const char* const kTerms[] = {"lm", "z_loss", "kd", "feature", "route"};

}  // namespace

TEST_CASE("data-parallel distill_step over NCCL on every GPU = one GPU on the global batch") {
  const int R = gpus();
  std::vector<kd::train::text_batch> rows1, rows2;
  for (int r = 0; r < R; ++r) {
    rows1.push_back(row_of(make_batch(300 + static_cast<std::uint64_t>(r / 3)), r % 3));
    rows2.push_back(row_of(make_batch(400 + static_cast<std::uint64_t>(r / 3)), r % 3));
  }
  const auto whole1 = join_rows(rows1), whole2 = join_rows(rows2);
  // One GPU, the R rows.
  std::vector<std::vector<double>> ref(2);
  std::vector<float> ref_grad, ref_params;
  {
    kd::cuda::context ctx;
    gpu_run one(ctx, nullptr);
    std::vector<kd::train::step_record> recs;
    for (int k = 1; k <= 2; ++k) {
      REQUIRE(one.step.step(k == 1 ? whole1 : whole2, k).ok());
      REQUIRE(one.step.flush(recs).ok());
      for (const char* name : kTerms) ref[static_cast<std::size_t>(k - 1)].push_back(value(recs[0], name));
    }
    ref_grad = one.download(one.student.grads());
    ref_params = one.download(one.student.params());
  }
  // R GPUs, a row each.
  std::vector<std::vector<std::vector<double>>> got(static_cast<std::size_t>(R), std::vector<std::vector<double>>(2));
  std::vector<std::vector<float>> grads(static_cast<std::size_t>(R)), params(static_cast<std::size_t>(R));
  on_gpus(R, [&](int r, kd::communicator& comm, kd::cuda::context& ctx) -> kd::status {
    const auto ru = static_cast<std::size_t>(r);
    gpu_run run(ctx, &comm);
    std::vector<kd::train::step_record> recs;
    for (int k = 1; k <= 2; ++k) {
      KD_TRY(run.step.step(k == 1 ? rows1[ru] : rows2[ru], k));
      KD_TRY(run.step.flush(recs));
      for (const char* name : kTerms)
        for (const auto& [n, v] : recs[0].values)
          if (n == name) got[ru][static_cast<std::size_t>(k - 1)].push_back(v);
    }
    grads[ru] = run.download(run.student.grads());
    params[ru] = run.download(run.student.params());
    return {};
  });
  for (int r = 0; r < R; ++r) {
    const auto ru = static_cast<std::size_t>(r);
    for (std::size_t k = 0; k < 2; ++k) {
      REQUIRE(got[ru][k].size() == ref[k].size());
      for (std::size_t i = 0; i < ref[k].size(); ++i) {
        CAPTURE(r);
        CAPTURE(k);
        CAPTURE(kTerms[i]);
        CHECK(got[ru][k][i] == doctest::Approx(ref[k][i]).epsilon(1e-5));
      }
    }
    CHECK(params[ru] == params[0]);  // one update everywhere
  }
  double d = 0, m = 0, dp = 0, mp = 0;
  for (std::size_t i = 0; i < ref_grad.size(); ++i) {
    d = std::max(d, std::abs(static_cast<double>(grads[0][i]) - ref_grad[i]));
    m = std::max(m, std::abs(static_cast<double>(ref_grad[i])));
    dp = std::max(dp, std::abs(static_cast<double>(params[0][i]) - ref_params[i]));
    mp = std::max(mp, std::abs(static_cast<double>(ref_params[i])));
  }
  MESSAGE(R, " GPUs: gradient max deviation ", d / m, " of the largest; parameters ", dp / mp);
  CHECK(d / m < 1e-5);
  CHECK(dp / mp < 1e-5);
}

namespace {

std::vector<index_t> uneven_cuts(index_t cols, int ranks) {
  std::vector<index_t> c{0};
  for (int r = 1; r < ranks; ++r) c.push_back(cols * r / ranks + (r % 2 == 0 ? 40 : -24));
  c.push_back(cols);
  return c;
}

template <class D>
void check_vocab_parallel_kd() {
  const int R = gpus();
  const index_t n = 96, cols = 50304, real = 50257;
  auto& g = rng();
  const auto th = random_storage<float>(static_cast<std::size_t>(n * cols), 3.0, g);
  const auto sh = random_storage<float>(static_cast<std::size_t>(n * cols), 2.0, g);
  std::vector<std::int32_t> labels(static_cast<std::size_t>(n));
  for (index_t i = 0; i < n; ++i)
    labels[static_cast<std::size_t>(i)] = i % 7 == 3 ? kd::default_ignore_index : static_cast<std::int32_t>((i * 977) % real);
  kd::logit_kd<D, kd::token_mean, kd::precision_set<kd::fp32, kd::fp32>> loss;
  loss.options.temperature = 2.0;
  loss.options.vocab = real;
  loss.options.beta = 0.3;
  loss.options.alpha = 0.2;
  // The fused kernel on GPU 0, whole rows.
  std::vector<double> ref_grad;
  float ref_value = 0;
  {
    kd::cuda::context ctx;
    device_buffer<float> td(th.size()), sd(sh.size()), gd(sh.size()), vd(1);
    device_buffer<std::int32_t> ld(labels.size());
    td.upload(th);
    sd.upload(sh);
    ld.upload(labels);
    kd::cuda::device_loss out{vd.data, nullptr};
    REQUIRE(loss(kd::cuda::backend{&ctx}, kd::matrix_view<const float>(td.data, n, cols), kd::matrix_view<const float>(sd.data, n, cols),
                 std::span<const std::int32_t>(ld.data, labels.size()), out, kd::matrix_view<float>(gd.data, n, cols))
                .ok());
    REQUIRE(ctx.sync_status().ok());
    ref_grad = to_double(gd.download());
    ref_value = vd.download()[0];
  }
  const auto c = uneven_cuts(cols, R);
  std::vector<double> grad(ref_grad.size(), NAN);
  std::vector<float> value(static_cast<std::size_t>(R), NAN);
  on_gpus(R, [&](int r, kd::communicator& comm, kd::cuda::context& ctx) -> kd::status {
    const index_t a = c[static_cast<std::size_t>(r)], w = c[static_cast<std::size_t>(r) + 1] - a;
    device_buffer<float> td(static_cast<std::size_t>(n * w)), sd(static_cast<std::size_t>(n * w)), gd(static_cast<std::size_t>(n * w)), vd(1);
    device_buffer<std::int32_t> ld(labels.size());
    td.upload(columns(th, n, cols, a, w));
    sd.upload(columns(sh, n, cols, a, w));
    ld.upload(labels);
    gd.poison();
    kd::cuda::device_loss out{vd.data, nullptr};
    KD_TRY(kd::vocab_parallel_kd(kd::cuda::backend{&ctx}, loss, comm, kd::vocab_slice{a, cols},
                                 kd::matrix_view<const float>(td.data, n, w), kd::matrix_view<const float>(sd.data, n, w),
                                 std::span<const std::int32_t>(ld.data, labels.size()), out, kd::matrix_view<float>(gd.data, n, w)));
    KD_TRY(ctx.sync_status());
    put_columns(gd.download(), n, cols, a, w, grad);
    value[static_cast<std::size_t>(r)] = vd.download()[0];
    return {};
  });
  for (int r = 0; r < R; ++r) CHECK(value[static_cast<std::size_t>(r)] == doctest::Approx(ref_value).epsilon(1e-5));
  CHECK(all_finite(grad));
  const double e = rel_error(grad, ref_grad);
  MESSAGE(R, " slices: loss ", value[0], " vs ", ref_value, ", gradient relative error ", e);
  // TVD's gradient is q_j (sign(q_j - p_j) / 2 - ...): where q_j and p_j agree to float rounding, the two
  // computations of them may land on either side of the tie, a jump of q_j in that column.
  CHECK(e < (std::is_same_v<D, kd::tvd> ? 2e-3 : 1e-5));
}

}  // namespace

TEST_CASE_TEMPLATE("vocab_parallel_kd over NCCL, a slice per GPU = the fused one-GPU kernel (fp32)", D, kd::forward_kl,
                   kd::reverse_kl, kd::jsd, kd::skew_kl, kd::tvd) {
  check_vocab_parallel_kd<D>();
}

TEST_CASE("vocab_parallel_cross_entropy over NCCL, a slice per GPU = the fused one-GPU kernel (fp32)") {
  const int R = gpus();
  const index_t n = 80, cols = 151936, real = 151643;
  auto& g = rng();
  const auto sh = random_storage<float>(static_cast<std::size_t>(n * cols), 3.0, g);
  std::vector<std::int32_t> labels(static_cast<std::size_t>(n));
  for (index_t i = 0; i < n; ++i)
    labels[static_cast<std::size_t>(i)] = i % 5 == 2 ? kd::default_ignore_index : static_cast<std::int32_t>((i * 7919) % real);
  kd::cross_entropy<kd::token_mean, kd::fp32> ce;
  ce.options.vocab = real;
  ce.options.z_loss_weight = 1e-3;
  std::vector<double> ref_grad;
  std::vector<float> ref_vals;
  {
    kd::cuda::context ctx;
    device_buffer<float> sd(sh.size()), gd(sh.size()), vd(2);
    device_buffer<std::int32_t> ld(labels.size());
    sd.upload(sh);
    ld.upload(labels);
    kd::cuda::device_cross_entropy out{vd.data, vd.data + 1, nullptr};
    REQUIRE(ce(kd::cuda::backend{&ctx}, kd::matrix_view<const float>(sd.data, n, cols), std::span<const std::int32_t>(ld.data, labels.size()),
               out, kd::matrix_view<float>(gd.data, n, cols))
                .ok());
    REQUIRE(ctx.sync_status().ok());
    ref_grad = to_double(gd.download());
    ref_vals = vd.download();
  }
  const auto c = uneven_cuts(cols, R);
  std::vector<double> grad(ref_grad.size(), NAN);
  std::vector<std::vector<float>> vals(static_cast<std::size_t>(R));
  on_gpus(R, [&](int r, kd::communicator& comm, kd::cuda::context& ctx) -> kd::status {
    const index_t a = c[static_cast<std::size_t>(r)], w = c[static_cast<std::size_t>(r) + 1] - a;
    device_buffer<float> sd(static_cast<std::size_t>(n * w)), gd(static_cast<std::size_t>(n * w)), vd(2);
    device_buffer<std::int32_t> ld(labels.size());
    sd.upload(columns(sh, n, cols, a, w));
    ld.upload(labels);
    gd.poison();
    kd::cuda::device_cross_entropy out{vd.data, vd.data + 1, nullptr};
    KD_TRY(kd::vocab_parallel_cross_entropy(kd::cuda::backend{&ctx}, ce, comm, kd::vocab_slice{a, cols},
                                            kd::matrix_view<const float>(sd.data, n, w), std::span<const std::int32_t>(ld.data, labels.size()),
                                            out, kd::matrix_view<float>(gd.data, n, w)));
    KD_TRY(ctx.sync_status());
    vals[static_cast<std::size_t>(r)] = vd.download();
    put_columns(gd.download(), n, cols, a, w, grad);
    return {};
  });
  for (int r = 0; r < R; ++r) {
    REQUIRE(vals[static_cast<std::size_t>(r)].size() == 2);
    CHECK(vals[static_cast<std::size_t>(r)][0] == doctest::Approx(ref_vals[0]).epsilon(1e-5));
    CHECK(vals[static_cast<std::size_t>(r)][1] == doctest::Approx(ref_vals[1]).epsilon(1e-5));
  }
  CHECK(all_finite(grad));
  const double e = rel_error(grad, ref_grad);
  MESSAGE(R, " slices: cross-entropy ", vals[0][0], " vs ", ref_vals[0], ", gradient relative error ", e);
  CHECK(e < 1e-5);
}
