// The training steps on the CUDA backend against the CPU backend (kd/train/distill_step.hpp is written once
// over the model ops; this checks the GPU path: the loss slots, the optimizer, the chunked head, the compact
// teacher head, the gathers and the micro-batch accumulation). Same weights (initialised from one seed on
// the host), same batches. fp32 on both sides: losses to 1e-4 relative, accumulated gradients to 1e-4 of
// their largest entry; bf16 on the GPU: losses within 3% of fp32.
#include <doctest/doctest.h>

#include <cmath>
#include <vector>

#include <kd/cuda/context.cuh>
#include <kd/model/cuda/ops.cuh>
#include <kd/model/ops_cpu.hpp>
#include <kd/train/distill_step.hpp>
#include <kd/train/step_backend.cuh>

#include "../distill_fixture.hpp"

namespace {

using namespace kd_test::distill;
namespace km = kd::model;

template <class B>
struct pair_run {
  using model_t = km::transformer<B>;
  model_t teacher, student;
  kd::vocab_map map = make_map();
  kd::objective obj = full_objective();
  kd::train::distill_step<model_t, model_t> step;
  explicit pair_run(B& b) : teacher(b, km::make_arch(teacher_cfg())), student(b, km::make_arch(student_cfg())) {
    init_models(teacher, student);
    kd::check(step.init(&teacher, student, &map, obj, fixture_options(2), adamw()));
  }
};

template <class T>
std::vector<double> to_host(km::cuda_ops<T>& b, const T* p, std::size_t n) {
  std::vector<T> h(n);
  kd::check(b.download(p, n, h.data()));
  std::vector<double> out(n);
  for (std::size_t i = 0; i < n; ++i) out[i] = static_cast<double>(static_cast<float>(h[i]));
  return out;
}

double rel_diff(const std::vector<double>& gpu, const float* cpu) {
  double d = 0, m = 0;
  for (std::size_t i = 0; i < gpu.size(); ++i) {
    d = std::max(d, std::abs(gpu[i] - static_cast<double>(cpu[i])));
    m = std::max(m, std::abs(static_cast<double>(cpu[i])));
  }
  return d / m;
}

}  // namespace

TEST_CASE("distill_step: CUDA fp32 = CPU fp32 (two steps, the second over micro-batches)") {
  kd::model::cpu_ops<float> cb;
  kd::cuda::context ctx;
  km::cuda_ops<float> gb(ctx);
  pair_run<km::cpu_ops<float>> cpu(cb);
  pair_run<km::cuda_ops<float>> gpu(gb);
  const auto b1 = make_batch(41), b2 = make_batch(42);
  const std::vector<kd::train::text_batch> micro = {row_of(b2, 0), row_of(b2, 1), row_of(b2, 2)};
  // Steps buffered between two flush() calls share one shape: the whole batch and its micro-batch split
  // are flushed apart.
  std::vector<kd::train::step_record> c, g, part;
  REQUIRE(cpu.step.step(b1, 1).ok());
  REQUIRE(gpu.step.step(b1, 1).ok());
  REQUIRE(cpu.step.flush(c).ok());
  REQUIRE(gpu.step.flush(g).ok());  // the one synchronisation of a window
  REQUIRE(cpu.step.step(std::span<const kd::train::text_batch>(micro), 2).ok());
  REQUIRE(gpu.step.step(std::span<const kd::train::text_batch>(micro), 2).ok());
  REQUIRE(cpu.step.flush(part).ok());
  c.insert(c.end(), part.begin(), part.end());
  REQUIRE(gpu.step.flush(part).ok());
  g.insert(g.end(), part.begin(), part.end());
  REQUIRE(c.size() == 2);
  REQUIRE(g.size() == 2);
  for (std::size_t s = 0; s < 2; ++s)
    for (const char* name : {"lm", "z_loss", "kd", "feature", "route"}) {
      CAPTURE(s);
      CAPTURE(name);
      CHECK(value(g[s], name) == doctest::Approx(value(c[s], name)).epsilon(1e-4));
    }
  const auto grads = to_host(gb, gpu.student.grads(), gpu.student.table().size());
  CHECK(rel_diff(grads, cpu.student.grads()) < 1e-4);
  const auto side = to_host(gb, gpu.step.side().grads.data(), gpu.step.side().size());
  CHECK(rel_diff(side, cpu.step.side().grads.data()) < 1e-4);
}

TEST_CASE("distill_step: CUDA bf16 losses track fp32; teacher_step and evaluate_lm match the CPU") {
  kd::model::cpu_ops<float> cb;
  kd::cuda::context ctx;
  km::cuda_ops<kd::bfloat16> gb(ctx);
  pair_run<km::cpu_ops<float>> cpu(cb);
  pair_run<km::cuda_ops<kd::bfloat16>> gpu(gb);
  const auto b1 = make_batch(43);
  REQUIRE(cpu.step.step(b1, 1).ok());
  REQUIRE(gpu.step.step(b1, 1).ok());
  std::vector<kd::train::step_record> c, g;
  REQUIRE(cpu.step.flush(c).ok());
  REQUIRE(gpu.step.flush(g).ok());
  for (const char* name : {"lm", "kd", "feature", "route"}) {
    CAPTURE(name);
    CHECK(std::isfinite(value(g[0], name)));
    CHECK(value(g[0], name) == doctest::Approx(value(c[0], name)).epsilon(3e-2));
  }

  // The MoE teacher's step and evaluation, fp32 on both backends.
  km::cuda_ops<float> fb(ctx);
  km::transformer<km::cpu_ops<float>> tc(cb, km::make_arch(teacher_cfg()));
  km::transformer<km::cuda_ops<float>> tg(fb, km::make_arch(teacher_cfg()));
  REQUIRE(tc.allocate(true));
  REQUIRE(tg.allocate(true));
  REQUIRE(tc.initialize(0.3, 7));
  REQUIRE(tg.initialize(0.3, 7));
  kd::objective obj;
  obj.add("load_balance", kd::fixed(1e-2)).add("router_z", kd::fixed(1e-3)).add("z_loss", kd::fixed(1e-3));
  kd::train::teacher_step<km::transformer<km::cpu_ops<float>>> sc;
  kd::train::teacher_step<km::transformer<km::cuda_ops<float>>> sg;
  kd::train::step_options so;
  so.chunk_rows = 16;
  REQUIRE(sc.init(tc, obj, so, adamw()).ok());
  REQUIRE(sg.init(tg, obj, so, adamw()).ok());
  const auto batch = make_batch(44);
  REQUIRE(sc.step(batch.teacher_ids, batch.teacher_labels, batch.batch, batch.teacher_seq, 1).ok());
  REQUIRE(sg.step(batch.teacher_ids, batch.teacher_labels, batch.batch, batch.teacher_seq, 1).ok());
  REQUIRE(sc.flush(c).ok());
  REQUIRE(sg.flush(g).ok());
  for (const char* name : {"lm", "z_loss", "load_balance", "router_z"}) {
    CAPTURE(name);
    CHECK(value(g[0], name) == doctest::Approx(value(c[0], name)).epsilon(1e-4));
  }
  std::vector<std::uint32_t> ids, begin, end;
  kd::rng r(45);
  for (std::uint32_t i = 0; i < 40; ++i) {
    ids.push_back(static_cast<std::uint32_t>(r.below(97)));
    begin.push_back(3 * i);
    end.push_back(3 * i + 3);
  }
  kd::train::lm_eval_result ec, eg;
  REQUIRE(kd::train::evaluate_lm(tc, {ids, begin, end}, 2, 9, 0, 0, 7, ec).ok());
  REQUIRE(kd::train::evaluate_lm(tg, {ids, begin, end}, 2, 9, 0, 0, 7, eg).ok());
  CHECK(eg.tokens == ec.tokens);
  CHECK(eg.bytes == ec.bytes);
  CHECK(eg.loss == doctest::Approx(ec.loss).epsilon(1e-4));
  CHECK(eg.bits_per_byte == doctest::Approx(ec.bits_per_byte).epsilon(1e-4));
}
