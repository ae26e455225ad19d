// GPU kernels against the CPU reference (fp64 on the same rounded inputs), fresh random inputs each
// case, gradients poisoned before every run so an unwritten element fails as NaN.
#include <doctest/doctest.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <numeric>
#include <random>
#include <vector>

#include <kd/kd.cuh>

#include "../tvd_ties.hpp"
#include "gpu_util.cuh"
#include "linear_kd_check.hpp"

using namespace kd_test;

namespace {

struct kd_case {
  kd::index_t n, v;
  double temperature = 2.0;
  bool labels = false;
  kd::index_t vocab = 0;  // real columns (0 = all)
  double offset = 0.0;    // != 0: student = 0.9 teacher + offset + noise (close distributions, shifted logits)
  double value_tol = 0.0; // != 0: the value's relative tolerance (else tolerance<T>())
  double grad_tol = 0.0;  // != 0: the gradient's norm-relative tolerance (else tolerance<T>())
  double alpha = 0.2;     // skew KL's
  double beta = 0.3;      // JSD's
  double grad_scale = 0;  // != 0: fp16's gradient scale (else 4096)
  double teacher_sd = 2.0, student_sd = 1.0;  // the logits' standard deviations (student: unless offset)
  // Logits masked at the storage type's lowest finite value (as a caller masks a vocabulary): 0 none;
  // 1 teacher columns c % 7 == 3 and student columns c % 5 == 1 (bounded divergences); 2 columns
  // c % 7 == 3 on both sides (p = q = 0 there: the KLs).
  int mask = 0;
};

// The storage type's lowest finite value (bit patterns: bf16 0xFF7F, fp16 0xFBFF).
template <class S>
S lowest_finite() {
  if constexpr (std::is_same_v<S, kd::bfloat16>) return kd::bfloat16::from_bits(0xFF7F);
  else if constexpr (std::is_same_v<S, kd::half>) return kd::half::from_bits(0xFBFF);
  else return std::numeric_limits<S>::lowest();
}

// Runs logit_kd<D> on the GPU (student and gradient in storage T, teacher in TT) and compares loss and
// gradient with the fp64 CPU reference. `shared`: run on that context (several calls on one context), else
// on a fresh one.
template <class D, class T, class TT = T>
void check_logit_kd(const kd_case& c, const kd::vocab_map* map = nullptr, kd::index_t teacher_cols = 0,
                    kd::cuda::context* shared = nullptr, kd::cuda::row_schedule schedule = kd::cuda::row_schedule::automatic) {
  kd::logit_kd<D, kd::token_mean, kd::precision_set<kd::precision<TT, float>, kd::precision<T, float>>> gpu;
  gpu.options.temperature = c.temperature;
  gpu.options.vocab = c.vocab;
  gpu.options.map = map;
  gpu.options.beta = c.beta;
  gpu.options.alpha = c.alpha;
  // fp16 gradients of a 152k softmax are ~1/(N V): below fp16's normal range. Real fp16 training
  // scales the loss (kd::dynamic_loss_scaler); so does this test.
  if (std::is_same_v<T, kd::half>) gpu.options.grad_scale = c.grad_scale != 0.0 ? c.grad_scale : 4096.0;

  const kd::index_t tv = map ? teacher_cols : c.v;
  std::vector<TT> th;
  std::vector<T> sh;
  std::vector<std::int32_t> labels;
  auto draw = [&] {
    th = random_storage<TT>(static_cast<std::size_t>(c.n * tv), c.teacher_sd, rng());
    sh = c.offset != 0.0 ? close_student<T>(th, c.offset, rng())
                         : random_storage<T>(static_cast<std::size_t>(c.n * c.v), c.student_sd, rng());
    if (c.mask != 0) {
      const TT tlow = lowest_finite<TT>();
      const T slow = lowest_finite<T>();
      for (kd::index_t r = 0; r < c.n; ++r) {
        for (kd::index_t j = 3; j < tv; j += 7) th[static_cast<std::size_t>(r * tv + j)] = tlow;
        for (kd::index_t j = c.mask == 1 ? 1 : 3; j < c.v; j += c.mask == 1 ? 5 : 7)
          sh[static_cast<std::size_t>(r * c.v + j)] = slow;
      }
    }
    labels.clear();
    if (c.labels) {
      std::uniform_int_distribution<int> pick(0, static_cast<int>((c.vocab > 0 ? c.vocab : c.v) - 1));
      for (kd::index_t i = 0; i < c.n; ++i) labels.push_back(i % 3 == 1 ? -100 : pick(rng()));
    }
  };
  draw();
  // TVD: student logits within 3e-5 of a tie of p and q are moved away from it (float and the fp64
  // reference may take different signs there, and one flipped sign moves a float gradient by ~1e-3 of its
  // norm). Redrawing, as the loss matrix does, cannot help here: at 10^5 entries and more nearly every
  // draw has such an entry.
  if constexpr (std::is_same_v<D, kd::tvd>) {
    const auto th64 = to_double(th);  // the teacher never moves
    for (int round = 0;; ++round) {
      const auto ties = kdtest::tvd_near_ties<kd::token_mean>(gpu.options, c.n, tv, c.v, th64, to_double(sh), labels, 3e-5);
      REQUIRE(ties.has_value());
      if (ties->empty()) break;
      REQUIRE_MESSAGE(round < 8, "TVD: student logits still within 3e-5 of a tie after 8 rounds of moving them");
      for (const auto& t : *ties) sh[t.index] = kdtest::nudge_from_tie(sh[t.index], t.side);
    }
  }
  device_buffer<TT> td(th.size());
  device_buffer<T> sd(sh.size()), gd(sh.size());
  device_buffer<float> loss_d(1);
  device_buffer<long long> tok_d(1);
  device_buffer<std::int32_t> lab_d(labels.size());
  td.upload(th);
  sd.upload(sh);
  if (!labels.empty()) lab_d.upload(labels);
  gd.poison();

  kd::cuda::context own;
  kd::cuda::context& ctx = shared != nullptr ? *shared : own;
  if (shared == nullptr) ctx.set_schedule(schedule);
  kd::cuda::device_loss out{loss_d.data, tok_d.data};
  const std::span<const std::int32_t> lab_span(labels.empty() ? nullptr : lab_d.data, labels.size());
  REQUIRE(gpu(kd::cuda::backend{&ctx}, kd::matrix_view<const TT>(td.data, c.n, tv),
              kd::matrix_view<const T>(sd.data, c.n, c.v), lab_span, out, kd::matrix_view<T>(gd.data, c.n, c.v))
              .ok());
  const auto st = ctx.sync_status();
  REQUIRE_MESSAGE(st.ok(), st.message());
  // The same call without a gradient (evaluation): no gradient sweep at all for forward and reverse KL
  // (reverse KL's value comes from pass 1 alone), the terms sweep only for the others.
  device_buffer<float> eval_d(1);
  device_buffer<long long> eval_tok(1);
  kd::cuda::device_loss eval_out{eval_d.data, eval_tok.data};
  REQUIRE(gpu(kd::cuda::backend{&ctx}, kd::matrix_view<const TT>(td.data, c.n, tv), kd::matrix_view<const T>(sd.data, c.n, c.v),
              lab_span, eval_out)
              .ok());
  const auto st_eval = ctx.sync_status();
  REQUIRE_MESSAGE(st_eval.ok(), st_eval.message());

  auto td64 = to_double(th), sd64 = to_double(sh);
  std::vector<double> gref(sh.size());
  kd::logit_kd<D, kd::token_mean, kd::precision_set<kd::fp64, kd::fp64>> ref;
  ref.options = gpu.options;
  kd::loss_result rr;
  REQUIRE(ref(kd::cpu, kd::matrix_view<const double>(td64.data(), c.n, tv),
              kd::matrix_view<const double>(sd64.data(), c.n, c.v), labels, rr,
              kd::matrix_view<double>(gref.data(), c.n, c.v))
              .ok());
  const double loss = loss_d.download()[0];
  const auto g = to_double(gd.download());
  INFO("n=", c.n, " v=", c.v, " T=", c.temperature, " loss gpu=", loss, " ref=", rr.loss);
  CHECK(all_finite(g));
  const double value_tol = c.value_tol != 0.0 ? c.value_tol : tolerance<T>();
  CHECK(std::abs(loss - rr.loss) <= value_tol * std::max(std::abs(rr.loss), 1e-3));
  CHECK(rel_error(g, gref) <= (c.grad_tol != 0.0 ? c.grad_tol : tolerance<T>()));
  CHECK(tok_d.download()[0] == rr.tokens);
  const double eval = eval_d.download()[0];
  INFO("without a gradient: loss gpu=", eval);
  CHECK(std::abs(eval - rr.loss) <= value_tol * std::max(std::abs(rr.loss), 1e-3));
  CHECK(eval_tok.download()[0] == rr.tokens);
}

template <class T>
void check_cross_entropy(kd::index_t n, kd::index_t v, kd::index_t vocab, double z, kd::cuda::context* shared = nullptr) {
  auto sh = random_storage<T>(static_cast<std::size_t>(n * v), 2.0, rng());
  std::vector<std::int32_t> labels;
  std::uniform_int_distribution<int> pick(0, static_cast<int>((vocab > 0 ? vocab : v) - 1));
  for (kd::index_t i = 0; i < n; ++i) labels.push_back(i % 4 == 3 ? -100 : pick(rng()));
  device_buffer<T> sd(sh.size()), gd(sh.size());
  device_buffer<float> ce_d(1), z_d(1);
  device_buffer<long long> tok_d(1);
  device_buffer<std::int32_t> lab_d(labels.size());
  sd.upload(sh);
  lab_d.upload(labels);
  gd.poison();
  kd::cuda::context own;
  kd::cuda::context& ctx = shared != nullptr ? *shared : own;
  kd::cross_entropy<kd::token_mean, kd::precision<T, float>> gpu;
  gpu.options.vocab = vocab;
  gpu.options.z_loss_weight = z;
  kd::cuda::device_cross_entropy out{ce_d.data, z_d.data, tok_d.data};
  REQUIRE(gpu(kd::cuda::backend{&ctx}, kd::matrix_view<const T>(sd.data, n, v),
              std::span<const std::int32_t>(lab_d.data, labels.size()), out, kd::matrix_view<T>(gd.data, n, v))
              .ok());
  REQUIRE(ctx.sync_status().ok());
  auto s64 = to_double(sh);
  std::vector<double> gref(sh.size());
  kd::cross_entropy<kd::token_mean, kd::fp64> ref;
  ref.options = gpu.options;
  kd::cross_entropy_result rr;
  REQUIRE(ref(kd::cpu, kd::matrix_view<const double>(s64.data(), n, v), labels, rr,
              kd::matrix_view<double>(gref.data(), n, v))
              .ok());
  const auto g = to_double(gd.download());
  CHECK(all_finite(g));
  CHECK(std::abs(ce_d.download()[0] - rr.ce) <= tolerance<T>() * rr.ce);
  CHECK(std::abs(z_d.download()[0] - rr.z_loss) <= tolerance<T>() * rr.z_loss);
  CHECK(rel_error(g, gref) <= tolerance<T>());
  CHECK(tok_d.download()[0] == rr.tokens);
}

// A 151,936 -> 50,304 map shaped like Qwen3 -> GPT-2: 42,256 shared strings (an injection) plus a few
// many-to-one entries; padded rows unmapped.
kd::vocab_map qwen_like_map() {
  std::vector<int> student_ids(50257);
  std::iota(student_ids.begin(), student_ids.end(), 0);
  std::mt19937_64 r(7);
  std::shuffle(student_ids.begin(), student_ids.end(), r);
  std::vector<std::pair<std::int32_t, std::int32_t>> pairs;
  for (int i = 0; i < 42256; ++i) pairs.emplace_back(static_cast<std::int32_t>(i * 3 + 1), student_ids[i]);
  for (int i = 0; i < 64; ++i) pairs.emplace_back(150000 + i, student_ids[i]);  // many-to-one
  kd::vocab_map m;
  REQUIRE(kd::vocab_map::from_pairs(pairs, 151936, 50304, m).ok());
  return m;
}

// A contiguous map (kd::vocab_map::contiguous_teacher): teacher id t -> student id student_of(t), increasing,
// for t < k.
template <class F>
kd::vocab_map contiguous_map_of(kd::index_t k, kd::index_t student_cols, F&& student_of) {
  std::vector<std::pair<std::int32_t, std::int32_t>> pairs;
  for (kd::index_t t = 0; t < k; ++t) pairs.emplace_back(static_cast<std::int32_t>(t), static_cast<std::int32_t>(student_of(t)));
  kd::vocab_map m;
  REQUIRE(kd::vocab_map::from_pairs(pairs, k, student_cols, m).ok());
  REQUIRE(m.contiguous_teacher());
  return m;
}
// 3,000 teacher columns onto 4,096 student columns with an uncovered head, a gap every 5 and a tail.
kd::vocab_map gaps_map() {
  return contiguous_map_of(3000, 4096, [](kd::index_t t) { return 37 + t + t / 5; });
}

}  // namespace

TEST_CASE("fused logit KD matches the CPU reference for every divergence (fp32)") {
  const kd_case c{5, 3001, 2.0, true, 0};
  check_logit_kd<kd::forward_kl, float>(c);
  check_logit_kd<kd::reverse_kl, float>(c);
  check_logit_kd<kd::jsd, float>(c);
  check_logit_kd<kd::skew_kl, float>(c);
  check_logit_kd<kd::tvd, float>(c);
}

TEST_CASE_TEMPLATE("fused forward KL across sizes", T, float, kd::bfloat16, kd::half) {
  check_logit_kd<kd::forward_kl, T>({1, 50257, 2.0});           // N = 1, odd V (unaligned rows)
  check_logit_kd<kd::forward_kl, T>({33, 50304, 1.0, true, 50257});  // padded vocabulary
  check_logit_kd<kd::forward_kl, T>({6, 151936, 4.0, true});    // 8-block clusters
  check_logit_kd<kd::jsd, T>({6, 151936, 2.0});
}

// Many rows: the ring kernel (persistent clusters, kd/loss/logit_kd_ring.cuh; forced, as the planner no
// longer takes it), the planner's choice, and one cluster per row.
TEST_CASE_TEMPLATE("fused logit KD over many rows, both row schedules", T, float, kd::bfloat16, kd::half) {
  using kd::cuda::row_schedule;
  for (const auto sch : {row_schedule::ring, row_schedule::automatic, row_schedule::per_row}) {
    CAPTURE(static_cast<int>(sch));
    check_logit_kd<kd::forward_kl, T>({700, 32000, 2.0, true}, nullptr, 0, nullptr, sch);
    check_logit_kd<kd::reverse_kl, T>({500, 50304, 1.0, true, 50257}, nullptr, 0, nullptr, sch);
    check_logit_kd<kd::jsd, T>({300, 50304, 2.0, false}, nullptr, 0, nullptr, sch);
    check_logit_kd<kd::skew_kl, T>({300, 32000, 0.5, true}, nullptr, 0, nullptr, sch);
    // (TVD: the ring-forced matrix, whose tolerance allows for sign flips at near-ties of p and q.)
    check_logit_kd<kd::reverse_kl, T>({300, 32000, 4.0, true}, nullptr, 0, nullptr, sch);
    if constexpr (!std::is_same_v<T, float>) check_logit_kd<kd::forward_kl, T>({70, 151936, 2.0, true, 151669}, nullptr, 0, nullptr, sch);
    // Past kInlineCountRows the call ends in a finish kernel (the ring's partials: one a block of its grid).
    const kd::index_t many = kd::cuda::detail::kInlineCountRows + 300;
    check_logit_kd<kd::forward_kl, T>({many, 4096, 2.0, true}, nullptr, 0, nullptr, sch);
    check_logit_kd<kd::jsd, T>({many, 4096, 1.0, false}, nullptr, 0, nullptr, sch);  // no labels: rows
  }
}

// Rows of 8-byte entries (fp32 teacher and student) take clusters of up to 16 blocks (Hopper's
// non-portable size; kd::cuda::detail::max_row_cluster): 151,936 columns run on 16 blocks of 76 KB,
// 128,256 on 16 of 64 KB and 100,000 on 16 of 50 KB. The divergences
// with labels and padding, on every schedule (the ring kernel does not take rows this wide). TVD: the
// loss matrix, whose tolerance allows for sign flips at near-ties of p and q (millions of entries here
// leave a tie in every draw; 20 rows of 151,936 erred by 7e-4 to 9e-4 against 1e-5, the value exact).
TEST_CASE("fp32 rows on clusters of up to 16 blocks") {
  using kd::cuda::row_schedule;
  for (const auto sch : {row_schedule::automatic, row_schedule::per_row, row_schedule::ring}) {
    CAPTURE(static_cast<int>(sch));
    check_logit_kd<kd::forward_kl, float>({40, 151936, 2.0, true, 151669}, nullptr, 0, nullptr, sch);
    check_logit_kd<kd::reverse_kl, float>({30, 151936, 1.0, false}, nullptr, 0, nullptr, sch);
    check_logit_kd<kd::jsd, float>({30, 100000, 2.0, true}, nullptr, 0, nullptr, sch);
    check_logit_kd<kd::skew_kl, float>({30, 151936, 0.5, false}, nullptr, 0, nullptr, sch);
    check_logit_kd<kd::reverse_kl, float>({20, 128256, 2.0, true, 0, 60.0}, nullptr, 0, nullptr, sch);
  }
}

// The two-sweep divergences keep each entry's w (dD/dq's part besides the row sum) over the teacher's
// entry in shared memory for the gradient sweep where the teacher's entries are 4 bytes wide (16-bit
// ones recompute it: keeps_w). The ends of both parameters, on both row schedules. What is tested is the
// gradient (at each type's tolerance); the value is held to 1e-3 relative, 1e-6 absolute in fp32: at
// beta = 0 or 1 and alpha = 1 it is 0, and the kernels' exponentials (MUFU.EX2, ~2^-22 relative) leave
// ~1e-7 there. Skew KL's gradient shrinks with 1 - alpha: at alpha = 0.99 an fp16 gradient scaled by
// 4096 is mostly subnormal, and rounding the exact gradient to fp16 alone errs by 1.57% (a Python
// emulation of these rows; the H200 measured 1.57%), so fp16 scales it by 4096 / max(1 - alpha, 1/64)
// as a loss scaler would (the emulation: 3e-4).
TEST_CASE_TEMPLATE("JSD and skew KL at the ends of their parameter", T, float, kd::bfloat16, kd::half) {
  using kd::cuda::row_schedule;
  const double value_tol = std::is_same_v<T, float> ? 1e-3 : 0.0;
  for (const auto sch : {row_schedule::automatic, row_schedule::per_row}) {
    CAPTURE(static_cast<int>(sch));
    for (const double alpha : {0.0, 0.002, 0.0039, 0.0040, 0.5, 0.99, 1.0}) {
      CAPTURE(alpha);
      const double grad_scale = 4096.0 / std::max(1.0 - alpha, 1.0 / 64);
      kd_case c{200, 32000, 2.0, true, 0, 0.0, value_tol};
      c.alpha = alpha;
      c.grad_scale = grad_scale;
      check_logit_kd<kd::skew_kl, T>(c, nullptr, 0, nullptr, sch);
      c = {3, 50304, 0.5, false, 0, 0.0, value_tol};  // few rows: the per-row kernel's 2-block clusters
      c.alpha = alpha;
      c.grad_scale = grad_scale;
      check_logit_kd<kd::skew_kl, T>(c, nullptr, 0, nullptr, sch);
    }
    for (const double beta : {0.0, 0.01, 0.99, 1.0}) {
      CAPTURE(beta);
      kd_case c{200, 32000, 1.0, true, 0, 0.0, value_tol};
      c.beta = beta;
      check_logit_kd<kd::jsd, T>(c, nullptr, 0, nullptr, sch);
    }
  }
}

// 16-bit JSD and skew KL keep each entry's w in fp16 for the gradient sweep (kept16 in
// kd/loss/logit_kd_math.cuh), shifted by w at each thread's largest student logit, with the row sum C
// taken from the kept values. The case that tells the forms apart: sharp, unrelated teacher and student
// at beta = 0.99, where w sits near one value over q's mass and the gradient is a small difference of
// such w. An emulation of these rows (benchmarks/kept16_rounding.py's form, bf16 gradients against fp64,
// norm over all rows): the float path 0.25%, w kept in fp16 unshifted 5.8%, shifted 0.25%; the H100
// (2026-12-06) 0.05-0.20% in bf16 and 0.02-0.09% in fp16. Skew KL at alpha = 0.99 and a milder JSD beside
// it, each row shape on both schedules. (Skew KL at alpha = 0, whose w = p / q - 1 has no bound, keeps
// recomputing: "JSD and skew KL at the ends of their parameter".)
TEST_CASE_TEMPLATE("JSD and skew KL with w kept in fp16: sharp, unrelated teacher and student", T, kd::bfloat16, kd::half) {
  using kd::cuda::row_schedule;
  for (const auto sch : {row_schedule::automatic, row_schedule::per_row}) {
    CAPTURE(static_cast<int>(sch));
    kd_case c{24, 32000, 1.0, false};
    c.teacher_sd = c.student_sd = 6.0;
    c.beta = 0.99;
    check_logit_kd<kd::jsd, T>(c, nullptr, 0, nullptr, sch);
    c.alpha = 0.99;
    check_logit_kd<kd::skew_kl, T>(c, nullptr, 0, nullptr, sch);
    c = {16, 50304, 1.0, true};
    c.teacher_sd = 4.0;
    c.student_sd = 4.0;
    c.beta = 0.99;
    check_logit_kd<kd::jsd, T>(c, nullptr, 0, nullptr, sch);
  }
}

// A student equal to its teacher: every p_j = q_j bit for bit (both rows go through the same pass-1
// arithmetic), so TVD's every entry is an exact tie (sign 0: kd_entry<tvd>'s kept16 form keeps
// (q - p) 2^127 = 0, C = 0) and forward KL's q - p and p (log p - log q) are 0: the loss and every
// gradient entry are exactly 0, on the kept16 rows (16-bit, aligned) and the float ones, on clusters of
// 2 to 16 blocks. (fp32 forward KL is left out: its folded gradient fmaf(f, q, -(f p)) keeps the
// product's rounding error, ~1e-8 of it, by design.)
TEST_CASE_TEMPLATE("TVD and forward KL of a student equal to its teacher: exactly zero", T, kd::bfloat16, kd::half, float) {
  for (const kd::index_t v : {kd::index_t{32000}, kd::index_t{50304}, kd::index_t{151936}}) {
    CAPTURE(v);
    const kd::index_t n = 24;
    const auto h = random_storage<T>(static_cast<std::size_t>(n * v), 3.0, rng());
    device_buffer<T> td(h.size()), sd(h.size()), gd(h.size());
    device_buffer<float> loss_d(1);
    device_buffer<long long> tok_d(1);
    td.upload(h);
    sd.upload(h);
    kd::cuda::context ctx;
    auto run = [&](auto divergence) {
      using D = decltype(divergence);
      kd::logit_kd<D, kd::token_mean, kd::precision_set<kd::precision<T, float>, kd::precision<T, float>>> gpu;
      gd.poison();
      kd::cuda::device_loss out{loss_d.data, tok_d.data};
      REQUIRE(gpu(kd::cuda::backend{&ctx}, kd::matrix_view<const T>(td.data, n, v), kd::matrix_view<const T>(sd.data, n, v),
                  std::span<const std::int32_t>(), out, kd::matrix_view<T>(gd.data, n, v))
                  .ok());
      REQUIRE(ctx.sync_status().ok());
      CHECK(loss_d.download()[0] == 0.f);
      const auto g = to_double(gd.download());
      CHECK(std::all_of(g.begin(), g.end(), [](double x) { return x == 0.0; }));
    };
    run(kd::tvd{});
    if constexpr (!std::is_same_v<T, float>) run(kd::forward_kl{});
  }
}

// Logits masked at the storage type's lowest finite value (bf16 -3.4e38: a vocabulary masked as callers
// do with finfo.min) have p or q = 0 exactly, and every term of theirs is 0. JSD's kept16 form once took
// m >= 2^-126 from a 2^-126 added to a p, which put 2^-126 (dt - log2 m) into the value: -0.5 an entry at
// dt ~ -2^127. Unmapped rows, and the span kernel through a contiguous map (which fills the columns
// outside its slots with a sentinel logit of its own).
TEST_CASE_TEMPLATE("masked logits at the storage type's lowest value", T, kd::bfloat16, kd::half, float) {
  for (const kd::index_t v : {kd::index_t{32000}, kd::index_t{50304}}) {
    CAPTURE(v);
    kd_case c{6, v, 2.0, true};
    c.mask = 1;
    c.beta = 0.5;
    check_logit_kd<kd::jsd, T>(c);
    c.alpha = 0.5;
    check_logit_kd<kd::skew_kl, T>(c);
    check_logit_kd<kd::tvd, T>(c);
    c.mask = 2;
    check_logit_kd<kd::forward_kl, T>(c);
    check_logit_kd<kd::reverse_kl, T>(c);
  }
  const auto gaps = gaps_map();
  kd_case c{5, 4096, 2.0, true};
  c.mask = 1;
  check_logit_kd<kd::jsd, T>(c, &gaps, 3000);
  check_logit_kd<kd::skew_kl, T>(c, &gaps, 3000);
  check_logit_kd<kd::tvd, T>(c, &gaps, 3000);
}

// Softmax ignores a constant added to a row, so a student whose logits sit far from the teacher's can
// still be close to it. Reverse KL forms the row's KL in pass 1 from a q-weighted sum of ys - yt (the
// logits' difference, here ~100-150 bits a term) minus the two log-normalizers: the sum is taken around
// a reference offset so that it does not lose the small KL (~0.01 nats) to float cancellation.
TEST_CASE_TEMPLATE("reverse KL between logits far apart but distributions close", T, kd::bfloat16, kd::half) {
  using kd::cuda::row_schedule;
  for (const auto sch : {row_schedule::automatic, row_schedule::per_row}) {
    CAPTURE(static_cast<int>(sch));
    check_logit_kd<kd::reverse_kl, T>({300, 32000, 2.0, true, 0, 200.0}, nullptr, 0, nullptr, sch);
    check_logit_kd<kd::reverse_kl, T>({200, 50304, 2.0, false, 0, -150.0}, nullptr, 0, nullptr, sch);
    check_logit_kd<kd::reverse_kl, T>({3, 151936, 1.0, true, 0, 120.0}, nullptr, 0, nullptr, sch);
  }
}

// Forward KL's value is sum p (dt - ds) with dt = yt - tlse, ds = ys - slse: each float log-sum-exp is
// rounded at the size of the logits, and for close distributions (KL ~0.06 nats here) that rounding
// alone was 5e-6 to 3e-5 of the value in fp32 (a float emulation; more where the logits sit further
// out), skew KL's (a = 0.2) 1.4e-5 to 3e-5. The kernels add the rounding's gap back once per row
// (lse_gap_bits): forward KL 3e-7 to 1.7e-6 and skew KL 1.2e-6 to 2e-6 in the emulation, so forward KL's
// value is held to 5e-6 here. Skew KL in fp32 forms its value from the exact p and q (skew_kl_folded).
// Skew KL and JSD take a log2 of the mixture m per entry: through MUFU.LG2 (lg2.approx) that log's error
// is not centred on zero and adds up over a row (skew KL measured 9.5e-6 on an H200 here; a probe on an
// H100, kd_mufu_log_bias, 8e-6 to 9e-4 over its rows), so the fp32 kernels take log2f for the value.
// Skew KL is then held to 5e-6 as well (H200, 2026-12-05: passed; the probe 7.6e-7 on this row shape).
// JSD's value measured 1.5e-5 (H200, both schedules), as the probe's 1.4e-5 for its row shape with
// MUFU.EX2's p and q and log2f: what is left is the exponentials' error, held to 3e-5 (open,
// benchmarks/NOTES.md session 11). The gradient keeps the fp32 tolerance (1e-5; its own share of the
// rounding is folded back per row, next test).
TEST_CASE("forward / skew KL and JSD of close distributions in fp32: the value to 5e-6 (JSD 3e-5)") {
  using kd::cuda::row_schedule;
  for (const auto sch : {row_schedule::automatic, row_schedule::per_row}) {
    CAPTURE(static_cast<int>(sch));
    check_logit_kd<kd::forward_kl, float>({300, 32000, 1.0, true, 0, 30.0, 5e-6}, nullptr, 0, nullptr, sch);
    check_logit_kd<kd::forward_kl, float>({40, 50304, 1.0, false, 0, -30.0, 5e-6}, nullptr, 0, nullptr, sch);
    check_logit_kd<kd::forward_kl, float>({3, 151936, 1.0, true, 0, 30.0, 5e-6}, nullptr, 0, nullptr, sch);
    check_logit_kd<kd::skew_kl, float>({300, 32000, 1.0, true, 0, -30.0, 5e-6}, nullptr, 0, nullptr, sch);
    check_logit_kd<kd::jsd, float>({40, 50304, 2.0, true, 0, 30.0, 3e-5}, nullptr, 0, nullptr, sch);
  }
}

// The gradient carries the float lse's rounding as a factor common to each row's q (and p): ~2^-24 |lse|,
// magnified by q - p of close distributions. A float emulation (benchmarks/lse_rounding.cpp) put forward,
// reverse and skew KL's gradient at 3.7e-5 to 5.8e-5 with the student's logits 400 from the teacher's,
// against 5.6e-7 to 2.8e-6 with the rounding folded back per row (fp32 gradients: lse_fold). Held to 6e-6
// here (the emulation's exponentials are exp2f, the kernels' MUFU.EX2 adds ~2 ulp), on both schedules.
// Skew KL's value there measured 4e-5 on an H200 (2026-12-05) through MUFU.LG2; with log2f it passed
// 1e-5 there (the probe, kd_mufu_log_bias: 3e-6 for this row shape on the H200, 4.7e-6 on an H100).
TEST_CASE("fp32 gradients of forward / reverse / skew KL with logits far apart: within 6e-6 of fp64") {
  using kd::cuda::row_schedule;
  for (const auto sch : {row_schedule::automatic, row_schedule::per_row}) {
    CAPTURE(static_cast<int>(sch));
    check_logit_kd<kd::forward_kl, float>({200, 32000, 1.0, true, 0, 400.0, 0.0, 6e-6}, nullptr, 0, nullptr, sch);
    check_logit_kd<kd::forward_kl, float>({40, 151936, 2.0, false, 0, -400.0, 0.0, 6e-6}, nullptr, 0, nullptr, sch);
    check_logit_kd<kd::reverse_kl, float>({200, 50304, 1.0, true, 0, -400.0, 0.0, 6e-6}, nullptr, 0, nullptr, sch);
    check_logit_kd<kd::reverse_kl, float>({3, 151936, 2.0, false, 0, 400.0, 0.0, 6e-6}, nullptr, 0, nullptr, sch);
    check_logit_kd<kd::skew_kl, float>({100, 50304, 2.0, true, 0, 400.0, 1e-5, 6e-6}, nullptr, 0, nullptr, sch);
  }
}

TEST_CASE_TEMPLATE("fused logit KD through the 152k -> 50k vocabulary map", T, float, kd::bfloat16) {
  const auto map = qwen_like_map();
  check_logit_kd<kd::forward_kl, T>({4, 50304, 2.0, true}, &map, 151936);
  check_logit_kd<kd::reverse_kl, T>({3, 50304, 1.0, false}, &map, 151936);
}

// Contiguous maps (teacher column j -> the j-th student id, increasing): the span kernel, whose blocks
// bulk-copy the student columns their slots cover, on maps with an uncovered head, gaps and tail; a
// map whose one wide gap makes the planner take a larger cluster; and one whose spans fit no cluster
// (the gather kernel instead).
TEST_CASE_TEMPLATE("fused logit KD through contiguous maps of every spacing", T, float, kd::bfloat16) {
  const auto gaps = gaps_map();
  check_logit_kd<kd::forward_kl, T>({5, 4096, 2.0, true}, &gaps, 3000);
  check_logit_kd<kd::jsd, T>({4, 4096, 0.5, false}, &gaps, 3000);
  // 1504: the 2-block cluster's chunk, so the one gap falls between its blocks.
  const auto one_gap = contiguous_map_of(3000, 204000, [](kd::index_t t) { return t < 1504 ? t : 200000 + t; });
  check_logit_kd<kd::forward_kl, T>({3, 204000, 2.0, true}, &one_gap, 3000);
  check_logit_kd<kd::tvd, T>({3, 204000, 1.0, false}, &one_gap, 3000);
  const auto sparse = contiguous_map_of(3000, 1200000, [](kd::index_t t) { return 400 * t + 3; });
  check_logit_kd<kd::reverse_kl, T>({2, 1200000, 2.0, true}, &sparse, 3000);
}

TEST_CASE_TEMPLATE("fused cross-entropy and z-loss", T, float, kd::bfloat16, kd::half) {
  check_cross_entropy<T>(1, 50257, 0, 1e-4);
  check_cross_entropy<T>(17, 50304, 50257, 1e-3);
  check_cross_entropy<T>(5, 151936, 151669, 0.0);
}

// The teacher in another storage type than the student (the seed run's crash came from an fp16 teacher
// beside fp32 student code): declared in the precision_set, the kernels read each side in its own type
// (no 16-byte vector path then), on both row schedules, with labels, padding and the 152k -> 50k map.
template <class Teacher, class Student>
struct storage_pair {
  using teacher = Teacher;
  using student = Student;
};
TEST_CASE_TEMPLATE("fused logit KD with the teacher in another storage type than the student", P,
                   storage_pair<kd::half, kd::bfloat16>, storage_pair<float, kd::bfloat16>,
                   storage_pair<kd::bfloat16, float>, storage_pair<kd::bfloat16, kd::half>) {
  using TT = typename P::teacher;
  using T = typename P::student;
  using kd::cuda::row_schedule;
  for (const auto sch : {row_schedule::automatic, row_schedule::per_row}) {
    CAPTURE(static_cast<int>(sch));
    check_logit_kd<kd::forward_kl, T, TT>({300, 32000, 2.0, true}, nullptr, 0, nullptr, sch);
    check_logit_kd<kd::jsd, T, TT>({5, 50304, 1.0, true, 50257}, nullptr, 0, nullptr, sch);
    check_logit_kd<kd::reverse_kl, T, TT>({40, 151936, 2.0, false}, nullptr, 0, nullptr, sch);
  }
  const auto map = qwen_like_map();
  check_logit_kd<kd::forward_kl, T, TT>({4, 50304, 2.0, true}, &map, 151936);
}

// Up to kInlineCountRows rows a call is one kernel: every block counts the labels' tokens and the last
// block to finish forms the value behind the context's grid ticket. Above it a count kernel runs first
// and a finish kernel forms the value. Both paths, and the ticket's reuse by consecutive calls on one
// context (it must be back to zero after each), against the CPU reference.
TEST_CASE("one context, calls on both sides of the in-kernel token count") {
  kd::cuda::context ctx;
  const kd::index_t inline_rows = kd::cuda::detail::kInlineCountRows;
  for (const kd::index_t n : {kd::index_t{1}, inline_rows, inline_rows + 1, kd::index_t{2500}, kd::index_t{7}}) {
    CAPTURE(n);
    check_logit_kd<kd::forward_kl, float>({n, 4003, 2.0, true, 4000}, nullptr, 0, &ctx);
    check_logit_kd<kd::jsd, kd::bfloat16>({n, 4096, 1.0, true}, nullptr, 0, &ctx);
    check_logit_kd<kd::reverse_kl, float>({n, 4003, 2.0, false}, nullptr, 0, &ctx);  // no labels: rows
    check_cross_entropy<float>(n, 4003, 4000, 1e-3, &ctx);
  }
}

// linear + KD through cuBLAS chunks (the on-chip path: test_cuda_linear_kd_on_chip.cu).
TEST_CASE_TEMPLATE("fused linear + KD matches the CPU reference", T, float, kd::bfloat16) {
  check_linear_kd<T, kd::forward_kl>({.n = 300, .d = 64, .v = 5003, .chunk = 128});  // three chunks, odd vocabulary
  check_linear_kd<T, kd::forward_kl>({.n = 1, .d = 576, .v = 50304});
}

// The teacher as hidden states and LM head; reverse KL, so the non-forward path runs too.
TEST_CASE_TEMPLATE("fused linear + KD with the teacher as hidden states and LM head", T, float, kd::bfloat16) {
  check_linear_kd<T, kd::reverse_kl>({.n = 300, .d = 64, .v = 5003, .chunk = 128, .dt = 96});  // three chunks
  check_linear_kd<T, kd::reverse_kl>({.n = 5, .d = 96, .v = 50304, .dt = 128});
}

// The teacher's logits, or its hidden states and head, in another storage type than the student's.
TEST_CASE("fused linear + KD with the teacher in another storage type than the student") {
  using kd::bfloat16;
  check_linear_kd<bfloat16, kd::forward_kl, float>({.n = 300, .d = 64, .v = 5003, .chunk = 128});
  check_linear_kd<bfloat16, kd::jsd, kd::half>({.n = 200, .d = 96, .v = 1500, .chunk = 128, .vocab = 1400});
  check_linear_kd<float, kd::forward_kl, bfloat16>({.n = 130, .d = 64, .v = 4100});
  check_linear_kd<bfloat16, kd::reverse_kl, kd::half>({.n = 300, .d = 64, .v = 5003, .chunk = 128, .dt = 96});
  check_linear_kd<bfloat16, kd::forward_kl, float>({.n = 100, .d = 64, .v = 2000, .dt = 40});
}

template <kd::cuda::row_schedule S>
struct schedule_is {
  static constexpr kd::cuda::row_schedule value = S;
};

// Both row kernels: the per-row clusters and the ring (forced for these few rows; "NaN rows among many
// rows" gives its clusters several rows each).
TEST_CASE_TEMPLATE("CUDA bad input: clear status, deferred data errors named", Sch,
                   schedule_is<kd::cuda::row_schedule::automatic>, schedule_is<kd::cuda::row_schedule::ring>) {
  kd::cuda::context ctx;
  ctx.set_schedule(Sch::value);
  const kd::index_t n = 4, v = 1024;
  device_buffer<float> t(n * v), s(n * v), g(n * v), loss(1);
  t.upload(random_storage<float>(n * v, 1.0, rng()));
  s.upload(random_storage<float>(n * v, 1.0, rng()));
  kd::logit_kd<kd::forward_kl> l;
  kd::cuda::device_loss out{loss.data, nullptr};
  const kd::cuda::backend be{&ctx};
  // Runs l on teacher rows `th` and returns what sync_status then reports (the kernel's deferred error).
  auto deferred = [&](const std::vector<float>& th) {
    t.upload(th);
    REQUIRE(l(be, kd::matrix_view<const float>(t.data, n, v), kd::matrix_view<const float>(s.data, n, v), {}, out,
              kd::matrix_view<float>(g.data, n, v))
                .ok());
    return ctx.sync_status();
  };

  SUBCASE("shape mismatch") {
    const auto st = l(be, kd::matrix_view<const float>(t.data, n, v), kd::matrix_view<const float>(s.data, n - 1, v),
                      {}, out, kd::matrix_view<float>(g.data, n - 1, v));
    CHECK(st.code() == kd::errc::shape_mismatch);
  }
  SUBCASE("stride smaller than a row") {
    const auto st = l(be, kd::matrix_view<const float>(t.data, n, v, v - 1), kd::matrix_view<const float>(s.data, n, v),
                      {}, out, kd::matrix_view<float>(g.data, n, v));
    CHECK(st.code() == kd::errc::shape_mismatch);
  }
  SUBCASE("misaligned pointer") {
    const auto* bad = reinterpret_cast<const float*>(reinterpret_cast<const char*>(s.data) + 2);
    const auto st = l(be, kd::matrix_view<const float>(t.data, n, v - 1), kd::matrix_view<const float>(bad, n, v - 1),
                      {}, out, kd::matrix_view<float>(g.data, n, v - 1));
    CHECK(st.code() == kd::errc::misaligned);
  }
  SUBCASE("label outside the vocabulary is reported by sync_status") {
    device_buffer<std::int32_t> lab(n);
    lab.upload({1, 2, static_cast<std::int32_t>(v) + 5, 3});
    REQUIRE(l(be, kd::matrix_view<const float>(t.data, n, v), kd::matrix_view<const float>(s.data, n, v),
              std::span<const std::int32_t>(lab.data, n), out, kd::matrix_view<float>(g.data, n, v))
                .ok());
    const auto st = ctx.sync_status();
    CHECK(st.code() == kd::errc::out_of_range);
    CHECK(st.message().find("token 2") != std::string::npos);
    CHECK(ctx.sync_status().ok());  // the error word was cleared
  }
  SUBCASE("NaN in the teacher is named with component and token") {
    auto th = random_storage<float>(n * v, 1.0, rng());
    th[3 * v + 17] = std::nanf("");
    l.options.component = "kd_final";
    const auto st = deferred(th);
    CHECK(st.code() == kd::errc::non_finite);
    CHECK(st.message().find("teacher") != std::string::npos);
    CHECK(st.message().find("token 3") != std::string::npos);
    CHECK(st.message().find("kd_final") != std::string::npos);
  }
  SUBCASE("NaN rows among many rows: the lowest is named, bad rows get a zero gradient, the others are kept") {
    const kd::index_t rows = 600;
    device_buffer<float> t2(rows * v), s2(rows * v), g2(rows * v);
    auto th = random_storage<float>(rows * v, 1.0, rng());
    auto sh = random_storage<float>(rows * v, 1.0, rng());
    th[301 * v + 5] = std::nanf("");
    sh[450 * v + 1000] = INFINITY;
    t2.upload(th);
    s2.upload(sh);
    g2.poison();
    REQUIRE(l(be, kd::matrix_view<const float>(t2.data, rows, v), kd::matrix_view<const float>(s2.data, rows, v), {}, out,
              kd::matrix_view<float>(g2.data, rows, v))
                .ok());
    const auto st = ctx.sync_status();
    CHECK(st.code() == kd::errc::non_finite);
    CHECK(st.message().find("teacher") != std::string::npos);
    CHECK(st.message().find("token 301") != std::string::npos);
    const auto g = g2.download();
    CHECK(all_finite(std::vector<double>(g.begin(), g.end())));
    for (const kd::index_t r : {kd::index_t{301}, kd::index_t{450}})
      CHECK(std::all_of(g.begin() + r * v, g.begin() + (r + 1) * v, [](float x) { return x == 0.f; }));
    CHECK(std::any_of(g.begin() + 302 * v, g.begin() + 303 * v, [](float x) { return x != 0.f; }));
  }
  SUBCASE("temperature <= 0") {
    l.options.temperature = 0;
    CHECK(l(be, kd::matrix_view<const float>(t.data, n, v), kd::matrix_view<const float>(s.data, n, v), {}, out,
            kd::matrix_view<float>(g.data, n, v))
              .code() == kd::errc::invalid_argument);
  }
  SUBCASE("host-side errors name the component (gradient stride, labels count, null device_loss)") {
    l.options.component = "kd_mid";
    auto st = l(be, kd::matrix_view<const float>(t.data, n, v), kd::matrix_view<const float>(s.data, n, v), {}, out,
                kd::matrix_view<float>(g.data, n, v, v - 1));
    CHECK(st.code() == kd::errc::shape_mismatch);
    CHECK(st.message().find("student gradient") != std::string::npos);
    CHECK(st.message().find("'kd_mid'") != std::string::npos);
    device_buffer<std::int32_t> lab(n);
    st = l(be, kd::matrix_view<const float>(t.data, n, v), kd::matrix_view<const float>(s.data, n, v),
           std::span<const std::int32_t>(lab.data, n - 1), out, kd::matrix_view<float>(g.data, n, v));
    CHECK(st.code() == kd::errc::shape_mismatch);
    CHECK(st.message().find("'kd_mid'") != std::string::npos);
    kd::cuda::device_loss none{};
    st = l(be, kd::matrix_view<const float>(t.data, n, v), kd::matrix_view<const float>(s.data, n, v), {}, none,
           kd::matrix_view<float>(g.data, n, v));
    CHECK(st.code() == kd::errc::invalid_argument);
    CHECK(st.message().find("'kd_mid'") != std::string::npos);
    const auto* bad = reinterpret_cast<const float*>(reinterpret_cast<const char*>(s.data) + 2);
    st = l(be, kd::matrix_view<const float>(t.data, n, v - 1), kd::matrix_view<const float>(bad, n, v - 1), {}, out,
           kd::matrix_view<float>(g.data, n, v - 1));
    CHECK(st.code() == kd::errc::misaligned);
    CHECK(st.message().find("'kd_mid'") != std::string::npos);
  }
  SUBCASE("a finite teacher logit that overflows at the temperature is flagged, as on the CPU") {
    auto th = random_storage<float>(n * v, 1.0, rng());
    th[2 * v + 5] = 3e38f;
    l.options.temperature = 0.5;
    const auto st = deferred(th);
    CHECK(st.code() == kd::errc::non_finite);
    CHECK(st.message().find("teacher") != std::string::npos);
    CHECK(st.message().find("token 2") != std::string::npos);
    // The CPU reference rejects the same row through the same rule.
    std::vector<float> sh(n * v, 0.f);
    std::vector<float> gh(n * v);
    kd::loss_result r;
    const auto cst = l(kd::cpu, kd::matrix_view<const float>(th.data(), n, v), kd::matrix_view<const float>(sh.data(), n, v),
                       {}, r, kd::matrix_view<float>(gh.data(), n, v));
    CHECK(cst.code() == kd::errc::non_finite);
    CHECK(cst.message().find("token 2") != std::string::npos);
  }
  SUBCASE("a finite logit that overflows to -inf at the temperature is flagged on either side, as on the CPU") {
    // -3e38 / 0.5 is -inf in float: the row's log-sum-exp alone stays finite, so the kernel must see it
    // per element (before the fix the loss came out inf or NaN with an ok status).
    l.options.temperature = 0.5;
    auto th = random_storage<float>(n * v, 1.0, rng());
    th[1 * v + 9] = -3e38f;
    auto st = deferred(th);
    CHECK(st.code() == kd::errc::non_finite);
    CHECK(st.message().find("teacher") != std::string::npos);
    CHECK(st.message().find("token 1") != std::string::npos);
    auto sh = random_storage<float>(n * v, 1.0, rng());
    sh[3 * v + 1000] = -3e38f;
    s.upload(sh);
    st = deferred(random_storage<float>(n * v, 1.0, rng()));
    CHECK(st.code() == kd::errc::non_finite);
    CHECK(st.message().find("student") != std::string::npos);
    CHECK(st.message().find("token 3") != std::string::npos);
    // Through a vocab map too (the gather branch of the kernel).
    kd::vocab_map m;
    std::vector<std::pair<std::int32_t, std::int32_t>> pairs;
    for (std::int32_t i = 0; i < static_cast<std::int32_t>(v); ++i) pairs.emplace_back(i, i / 2);
    REQUIRE(kd::vocab_map::from_pairs(pairs, v, v / 2, m).ok());
    s.upload(random_storage<float>(n * v, 1.0, rng()));
    l.options.map = &m;
    th = random_storage<float>(n * v, 1.0, rng());
    th[2 * v + 77] = -3e38f;
    t.upload(th);
    REQUIRE(l(be, kd::matrix_view<const float>(t.data, n, v), kd::matrix_view<const float>(s.data, n, v / 2), {}, out,
              kd::matrix_view<float>(g.data, n, v / 2))
                .ok());
    st = ctx.sync_status();
    CHECK(st.code() == kd::errc::non_finite);
    CHECK(st.message().find("token 2") != std::string::npos);
  }
}

TEST_CASE("context::cached_buffer uploads once per key and returns the same device buffer") {
  kd::cuda::context ctx;
  int made = 0;
  auto make = [&] {
    ++made;
    return std::vector<unsigned char>{1, 2, 3, 4};
  };
  const void* a = nullptr;
  const void* b = nullptr;
  REQUIRE(ctx.cached_buffer(42, make, a).ok());
  REQUIRE(ctx.cached_buffer(42, make, b).ok());
  CHECK(a == b);
  CHECK(made == 1);
  std::vector<unsigned char> back(4);
  REQUIRE(cudaMemcpy(back.data(), a, 4, cudaMemcpyDeviceToHost) == cudaSuccess);
  CHECK(back == std::vector<unsigned char>{1, 2, 3, 4});
  // A vocab_map's device copy lives in that cache: the second upload returns the same pointers.
  kd::vocab_map m;
  REQUIRE(kd::vocab_map::from_pairs({{0, 1}, {2, 1}, {3, 0}}, 4, 3, m).ok());
  kd::cuda::detail::device_map d1, d2;
  REQUIRE(kd::cuda::detail::upload_map(ctx, m, d1).ok());
  REQUIRE(kd::cuda::detail::upload_map(ctx, m, d2).ok());
  CHECK(d1.support == d2.support);
  CHECK(d1.slots == 2);
  std::vector<int> host(2 + 3 + 3);
  REQUIRE(cudaMemcpy(host.data(), d1.support, host.size() * sizeof(int), cudaMemcpyDeviceToHost) == cudaSuccess);
  // support {0, 1}; offsets {0, 1, 3}; teacher ids grouped by slot: {3 | 0, 2}
  CHECK(host == std::vector<int>{0, 1, 0, 1, 3, 3, 0, 2});
  // Then the uncovered student ids ({2}) and, from a 16-byte boundary, the support's bitmask over the
  // student's columns in whole 16-byte vectors (the span kernel bulk-copies its words).
  int unc = -1;
  REQUIRE(cudaMemcpy(&unc, d1.uncovered, sizeof(int), cudaMemcpyDeviceToHost) == cudaSuccess);
  CHECK(unc == 2);
  CHECK(reinterpret_cast<std::uintptr_t>(d1.covered_bits) % 16 == 0);
  CHECK(kd::cuda::detail::covered_words(3) == 4);
  std::vector<unsigned> bits(4, 99);
  REQUIRE(cudaMemcpy(bits.data(), d1.covered_bits, bits.size() * sizeof(unsigned), cudaMemcpyDeviceToHost) == cudaSuccess);
  CHECK(bits == std::vector<unsigned>{0b011u, 0, 0, 0});
}
