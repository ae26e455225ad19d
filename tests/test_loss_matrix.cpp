// The generated loss matrix (tests/loss_matrix.hpp) on the CPU backend: fp32 / bf16 / fp16 storage against
// the fp64 CPU reference, in-place gradients, every option product, and the bad inputs.
// KD_MATRIX_SEED=<n> reproduces a run; KD_MATRIX_ONLY=<substring> runs the cases whose name contains it.
#include <doctest/doctest.h>

#include <span>
#include <vector>

#include <kd/kd.hpp>

#include "loss_matrix.hpp"

using namespace kdmatrix;

namespace {

// Runs the io of a case on kd::cpu, on host memory.
struct cpu_exec {
  template <class Loss, class T>
  outcome logit(const Loss& loss, logit_io<T>& io) {
    kd::loss_result r;
    const T* student = io.inplace ? io.grad.data() : io.student.data();
    outcome o;
    o.st = loss(kd::cpu, kd::matrix_view<const T>(io.teacher.data(), io.t_rows, io.t_cols),
                kd::matrix_view<const T>(student, io.s_rows, io.s_cols), std::span<const std::int32_t>(io.labels), r,
                kd::matrix_view<T>(io.null_grad ? nullptr : io.grad.data(), io.g_rows, io.g_cols));
    o.loss = r.loss;
    o.tokens = r.tokens;
    return o;
  }
  template <class Loss, class T>
  outcome linear(const Loss& loss, linear_io<T>& io) {
    kd::loss_result r;
    outcome o;
    auto call = [&](const auto& teacher) {
      return loss(kd::cpu, kd::matrix_view<const T>(io.hidden.data(), io.n, io.h_cols),
                  kd::matrix_view<const T>(io.weight.data(), io.w_rows, io.w_cols), teacher,
                  std::span<const std::int32_t>(io.labels), r, kd::matrix_view<T>(io.dhidden.data(), io.dh_rows, io.h_cols),
                  kd::matrix_view<T>(io.dweight.data(), io.w_rows, io.w_cols));
    };
    o.st = with_linear_teacher(io, io.teacher.data(), io.t_hidden.data(), io.t_weight.data(), call);
    o.loss = r.loss;
    o.tokens = r.tokens;
    return o;
  }
  template <class Loss, class T>
  outcome ce(const Loss& loss, ce_io<T>& io) {
    kd::cross_entropy_result r;
    const T* logits = io.inplace ? io.grad.data() : io.logits.data();
    outcome o;
    o.st = loss(kd::cpu, kd::matrix_view<const T>(logits, io.rows, io.cols), std::span<const std::int32_t>(io.labels), r,
                kd::matrix_view<T>(io.null_grad ? nullptr : io.grad.data(), io.g_rows, io.cols));
    o.loss = r.ce;
    o.z_loss = r.z_loss;
    o.tokens = r.tokens;
    return o;
  }
  template <class P, class T>
  outcome router(const kd::load_balance_loss<P>& loss, router_io<T>& io) {
    kd::loss_result r;
    outcome o;
    o.st = loss(kd::cpu, kd::matrix_view<const T>(io.logits.data(), io.rows, io.cols),
                kd::matrix_view<const std::int32_t>(io.ids.data(), io.id_rows, io.k), r,
                kd::matrix_view<T>(io.grad.data(), io.g_rows, io.cols));
    o.loss = r.loss;
    return o;
  }
  template <class P, class T>
  outcome router(const kd::router_z_loss<P>& loss, router_io<T>& io) {
    kd::loss_result r;
    outcome o;
    o.st = loss(kd::cpu, kd::matrix_view<const T>(io.logits.data(), io.rows, io.cols), r,
                kd::matrix_view<T>(io.grad.data(), io.g_rows, io.cols));
    o.loss = r.loss;
    return o;
  }
  template <class Loss, class T>
  outcome feature(const Loss& loss, feature_io<T>& io) {
    auto cv = [](const std::vector<T>& v, index_t r, index_t c) {
      return v.empty() ? kd::matrix_view<const T>{} : kd::matrix_view<const T>(v.data(), r, c);
    };
    auto mv = [](std::vector<T>& v, index_t r, index_t c) {
      return v.empty() ? kd::matrix_view<T>{} : kd::matrix_view<T>(v.data(), r, c);
    };
    kd::loss_result r;
    outcome o;
    o.st = loss(kd::cpu, cv(io.x, io.n, io.ds), cv(io.w, io.w_rows, io.w_cols), cv(io.b, 1, io.dt), cv(io.t, io.t_rows, io.dt),
                std::span<const std::int32_t>(io.labels), r, mv(io.dx, io.dx_rows, io.ds), mv(io.dw, io.w_rows, io.w_cols),
                mv(io.db, 1, io.dt));
    o.loss = r.loss;
    o.tokens = r.tokens;
    return o;
  }
  template <class Loss, class T>
  outcome attention(const Loss& loss, attention_io<T>& io) {
    kd::loss_result r;
    outcome o;
    o.st = loss(kd::cpu, kd::tensor3_view<const T>{io.teacher.data(), io.t_maps, io.seq, io.seq},
                kd::tensor3_view<const T>{io.student.data(), io.s_maps, io.seq, io.seq}, r,
                kd::tensor3_view<T>{io.grad.data(), io.g_maps, io.seq, io.seq});
    o.loss = r.loss;
    return o;
  }
};

// The first failures one by one (name and numbers), then the count: thousands of lines help nobody.
void report(const stats& s, const std::string& title) {
  std::size_t shown = 0;
  for (const auto& f : s.failures)
    if (shown++ < 40) FAIL_CHECK(f);
  CHECK_MESSAGE(s.failures.empty(), s.failures.size(), " failing cases in ", title);
  MESSAGE(s.summary(title));
}

}  // namespace

TEST_CASE("logit_kd matrix: CPU backend in fp32 / bf16 / fp16 against the fp64 reference") {
  cpu_exec exec;
  stats s;
  run_all(generate(logit_space{}), exec, s);
  report(s, "logit_kd matrix (CPU)");
}

TEST_CASE("linear_logit_kd matrix: CPU backend in fp32 / bf16 against the fp64 reference") {
  logit_space sp;
  sp.hidden = 8;
  sp.temps = {0.5, 2};
  sp.inplace = {false};
  sp.precs = {prec::fp32, prec::bf16};
  sp.ns = {1, 7, 12};
  sp.chunk_rows = {3, 4, 2048};  // 3 divides 12, not 7; 4 divides neither 7 nor 1 ... and 12; 2048 = one chunk
  cpu_exec exec;
  stats s;
  run_all(generate(sp), exec, s);
  report(s, "linear_logit_kd matrix (CPU)");
}

TEST_CASE("linear_logit_kd matrix, the teacher as hidden states and head: CPU backend against the fp64 reference") {
  logit_space sp;
  sp.hidden = 8;
  sp.teacher_dts = {16};
  sp.temps = {0.5, 2};
  sp.inplace = {false};
  sp.precs = {prec::fp32, prec::bf16};
  sp.ns = {1, 12};
  sp.chunk_rows = {5, 0};  // 0: the default chunk, one chunk here
  cpu_exec exec;
  stats s;
  run_all(generate(sp), exec, s);
  report(s, "linear_logit_kd matrix, teacher head (CPU)");
}

TEST_CASE("linear_logit_kd matrix, logits in the storage type: CPU backend against the fp64 reference") {
  logit_space sp;
  sp.hidden = 8;
  sp.teacher_dts = {0, 16};
  sp.temps = {0.5, 2};
  sp.ignores = {ignore_mode::none, ignore_mode::some};
  sp.reduces = {reduce_mode::mean};
  sp.inplace = {false};
  sp.precs = {prec::fp32, prec::bf16};
  sp.ns = {7, 12};
  sp.chunk_rows = {5, 0};  // 0: the default chunk (by scratch), one chunk here
  sp.storage_logits = {true};
  cpu_exec exec;
  stats s;
  run_all(generate(sp), exec, s);
  report(s, "linear_logit_kd matrix, logits in the storage type (CPU)");
}

TEST_CASE("cross_entropy matrix: CPU backend in fp32 / bf16 / fp16 against the fp64 reference") {
  cpu_exec exec;
  stats s;
  run_all(generate(ce_space{}), exec, s);
  report(s, "cross_entropy matrix (CPU)");
}

TEST_CASE("load_balance_loss / router_z_loss matrix: CPU backend against the fp64 reference") {
  cpu_exec exec;
  stats s;
  run_all(generate(router_space{}), exec, s);
  report(s, "router loss matrix (CPU)");
}

TEST_CASE("feature_loss matrix: CPU backend against the fp64 reference") {
  cpu_exec exec;
  stats s;
  run_all(generate(feature_space{}), exec, s);
  report(s, "feature_loss matrix (CPU)");
}

TEST_CASE("attention_loss matrix: CPU backend against the fp64 reference") {
  cpu_exec exec;
  stats s;
  run_all(generate(attention_space{}), exec, s);
  report(s, "attention_loss matrix (CPU)");
}

TEST_CASE("bad inputs are rejected by every CPU loss") {
  cpu_exec exec;
  stats s;
  run_all_bad_inputs(exec, s);
  report(s, "bad inputs (CPU)");
}
