// benchmarks/bench_cpu_losses.cpp: Google Benchmark of kd's CPU reference losses (forward + backward).
//
// These are reference-backend figures: single-threaded Eigen, exact formulas, no fusion. They say how
// long a correctness oracle takes at real sizes (GPT-2's 50,304 and Qwen's 151,936 padded vocabularies,
// SmolLM's 576 -> 1,024 feature projection, 9 student heads at T = 256), not what a trainer should expect
// from the CUDA backend.
//
// Every case reports items = tokens (rows) and bytes = the minimum traffic the loss cannot avoid:
// its inputs read once and its gradients written once. bytes / time is therefore a lower bound on the
// memory bandwidth the implementation would need if it were memory-bound.
//
// The whole suite runs in well under two minutes on two cores; CI only builds it and runs one small case
// (ctest bench_cpu_smoke).
#include <cstdint>
#include <map>
#include <utility>
#include <vector>

#include <benchmark/benchmark.h>

#include <kd/core/rng.hpp>
#include <kd/kd.hpp>

namespace {

using kd::index_t;

// Deterministic, cheap pseudo-random fill (kd's counter-based stream, one hash per element): generating
// ~40M normals per case would dominate the suite's run time, and loss cost does not depend on the
// distribution's shape.
inline float hashed_uniform(std::uint64_t i, std::uint64_t salt) { return static_cast<float>(kd::uniform_at(salt, i)); }

// Inputs are generated once per (type, size, salt) and shared by every case that needs them: Google
// Benchmark calls a benchmark function several times while it sizes the iteration count.
template <class T>
const std::vector<T>& logits(index_t count, std::uint64_t salt, float scale = 8.0f) {
  static std::map<std::pair<index_t, std::uint64_t>, std::vector<T>> cache;
  auto [it, fresh] = cache.try_emplace({count, salt});
  if (fresh) {
    it->second.resize(static_cast<std::size_t>(count));
    for (index_t i = 0; i < count; ++i)
      it->second[static_cast<std::size_t>(i)] =
          kd::store_as<T>(scale * (hashed_uniform(static_cast<std::uint64_t>(i), salt) - 0.5f));
  }
  return it->second;
}

template <class T>
constexpr std::int64_t bytes_of(std::int64_t elements) {
  return elements * static_cast<std::int64_t>(sizeof(T));
}

// Runs one loss call per iteration; stops the case with the loss's own message if it fails.
template <class Call>
void run_loop(benchmark::State& state, Call&& call) {
  for (auto _ : state) {
    kd::status s = call();
    if (!s.ok()) {
      state.SkipWithError(s.message().c_str());
      break;
    }
    benchmark::ClobberMemory();
  }
}

// ---- logit distillation ---------------------------------------------------------------------------
template <class D, class P>
void BM_logit_kd(benchmark::State& state) {
  using T = typename P::storage_type;
  const index_t n = state.range(0), v = state.range(1);
  const auto& teacher = logits<T>(n * v, 1);
  const auto& student = logits<T>(n * v, 2);
  std::vector<T> grad(static_cast<std::size_t>(n * v));
  kd::logit_kd<D, kd::token_mean, kd::precision_set<P, P>> loss;
  loss.options.temperature = 2.0;
  kd::loss_result r;
  run_loop(state, [&] {
    kd::status s = loss(kd::cpu, kd::matrix_view<const T>(teacher.data(), n, v),
                        kd::matrix_view<const T>(student.data(), n, v), {}, r, kd::matrix_view<T>(grad.data(), n, v));
    T* g = grad.data();
    benchmark::DoNotOptimize(g);
    benchmark::DoNotOptimize(r);
    return s;
  });
  state.SetItemsProcessed(state.iterations() * n);
  state.SetBytesProcessed(state.iterations() * bytes_of<T>(3 * n * v));  // read teacher + student, write grad
}

// The README's cross-tokenizer case: a 151,936-row teacher distilled into a 50,304-row student through
// a vocab_map of 42,000 shared tokens (the two byte-level BPEs share ~42k strings).
void BM_logit_kd_vocab_map(benchmark::State& state) {
  const index_t n = state.range(0), vt = 151936, vs = 50304, shared = 42000;
  static const kd::vocab_map map = [&] {
    std::vector<std::pair<std::int32_t, std::int32_t>> pairs;
    for (std::int32_t k = 0; k < shared; ++k) pairs.emplace_back(3 * k + 1, k);  // scattered teacher ids
    kd::vocab_map m;
    kd::check(kd::vocab_map::from_pairs(std::move(pairs), vt, vs, m));
    return m;
  }();
  const auto& teacher = logits<float>(n * vt, 3);
  const auto& student = logits<float>(n * vs, 4);
  std::vector<float> grad(static_cast<std::size_t>(n * vs));
  kd::logit_kd<kd::forward_kl> loss;
  loss.options.temperature = 2.0;
  loss.options.map = &map;
  kd::loss_result r;
  run_loop(state, [&] {
    kd::status s =
        loss(kd::cpu, kd::matrix_view<const float>(teacher.data(), n, vt),
             kd::matrix_view<const float>(student.data(), n, vs), {}, r, kd::matrix_view<float>(grad.data(), n, vs));
    float* g = grad.data();
    benchmark::DoNotOptimize(g);
    benchmark::DoNotOptimize(r);
    return s;
  });
  state.SetItemsProcessed(state.iterations() * n);
  state.SetBytesProcessed(state.iterations() * bytes_of<float>(n * (vt + 2 * vs)));
}

// ---- cross-entropy (LM loss + z-loss in one pass) -------------------------------------------------
template <class P>
void BM_cross_entropy(benchmark::State& state) {
  using T = typename P::storage_type;
  const index_t n = state.range(0), v = state.range(1);
  const auto& x = logits<T>(n * v, 5);
  std::vector<std::int32_t> labels(static_cast<std::size_t>(n));
  for (index_t i = 0; i < n; ++i) labels[static_cast<std::size_t>(i)] = static_cast<std::int32_t>((i * 7919) % v);
  std::vector<T> grad(static_cast<std::size_t>(n * v));
  kd::cross_entropy<kd::token_mean, P> loss;
  loss.options.z_loss_weight = 1e-4;
  kd::cross_entropy_result r;
  run_loop(state, [&] {
    kd::status s =
        loss(kd::cpu, kd::matrix_view<const T>(x.data(), n, v), labels, r, kd::matrix_view<T>(grad.data(), n, v));
    T* g = grad.data();
    benchmark::DoNotOptimize(g);
    benchmark::DoNotOptimize(r);
    return s;
  });
  state.SetItemsProcessed(state.iterations() * n);
  state.SetBytesProcessed(state.iterations() * (bytes_of<T>(2 * n * v) + bytes_of<std::int32_t>(n)));
}

// ---- feature distillation through a learned projection (576 -> 1024) ------------------------------
template <class Norm>
void BM_feature(benchmark::State& state) {
  const index_t n = state.range(0), ds = 576, dt = 1024;
  const auto& x = logits<float>(n * ds, 6, 2.0f);
  const auto& w = logits<float>(dt * ds, 7, 0.1f);
  const auto& b = logits<float>(dt, 8, 0.1f);
  const auto& t = logits<float>(n * dt, 9, 2.0f);
  std::vector<float> dx(static_cast<std::size_t>(n * ds)), dw(static_cast<std::size_t>(dt * ds)),
      db(static_cast<std::size_t>(dt));
  kd::feature_loss<Norm> loss;
  kd::loss_result r;
  run_loop(state, [&] {
    kd::status s = loss(kd::cpu, kd::matrix_view<const float>(x.data(), n, ds),
                        kd::matrix_view<const float>(w.data(), dt, ds), kd::matrix_view<const float>(b.data(), 1, dt),
                        kd::matrix_view<const float>(t.data(), n, dt), {}, r, kd::matrix_view<float>(dx.data(), n, ds),
                        kd::matrix_view<float>(dw.data(), dt, ds), kd::matrix_view<float>(db.data(), 1, dt));
    float* p = dw.data();
    benchmark::DoNotOptimize(p);
    benchmark::DoNotOptimize(r);
    return s;
  });
  state.SetItemsProcessed(state.iterations() * n);
  // read x, W, b, teacher; write dx, dW, db
  state.SetBytesProcessed(state.iterations() * bytes_of<float>(2 * (n * ds + dt * ds + dt) + n * dt));
}

// ---- attention-map transfer: 9 student heads against 16 teacher heads, T = 256, causal -------------
template <class Norm>
void BM_attention(benchmark::State& state) {
  const index_t t_len = state.range(0), hs = 9, ht = 16;
  const auto& teacher = logits<float>(ht * t_len * t_len, 10);
  const auto& student = logits<float>(hs * t_len * t_len, 11);
  std::vector<float> grad(static_cast<std::size_t>(hs * t_len * t_len));
  kd::attention_loss<Norm> loss;
  loss.options.student_heads = static_cast<int>(hs);
  loss.options.teacher_heads = static_cast<int>(ht);
  kd::loss_result r;
  run_loop(state, [&] {
    kd::status s = loss(kd::cpu, kd::tensor3_view<const float>{teacher.data(), ht, t_len, t_len},
                        kd::tensor3_view<const float>{student.data(), hs, t_len, t_len}, r,
                        kd::tensor3_view<float>{grad.data(), hs, t_len, t_len});
    float* g = grad.data();
    benchmark::DoNotOptimize(g);
    benchmark::DoNotOptimize(r);
    return s;
  });
  state.SetItemsProcessed(state.iterations() * t_len);  // tokens of one sequence
  state.SetBytesProcessed(state.iterations() * bytes_of<float>((ht + 2 * hs) * t_len * t_len));
}

// ---- MoE router: Switch load balance over top-2 routing, N = 4096 tokens, E = 8 experts ------------
void BM_load_balance(benchmark::State& state) {
  const index_t n = state.range(0), e = state.range(1), k = 2;
  const auto& router = logits<float>(n * e, 12, 4.0f);
  std::vector<std::int32_t> ids(static_cast<std::size_t>(n * k));
  for (index_t t = 0; t < n; ++t) {  // the real top-2 of each row
    const float* row = router.data() + t * e;
    std::int32_t a = 0, b = 1;
    if (row[b] > row[a]) std::swap(a, b);
    for (std::int32_t j = 2; j < e; ++j) {
      if (row[j] > row[a])
        b = a, a = j;
      else if (row[j] > row[b])
        b = j;
    }
    ids[static_cast<std::size_t>(t * k)] = a;
    ids[static_cast<std::size_t>(t * k + 1)] = b;
  }
  std::vector<float> grad(static_cast<std::size_t>(n * e));
  kd::load_balance_loss<kd::fp32> loss;
  kd::loss_result r;
  run_loop(state, [&] {
    kd::status s =
        loss(kd::cpu, kd::matrix_view<const float>(router.data(), n, e),
             kd::matrix_view<const std::int32_t>(ids.data(), n, k), r, kd::matrix_view<float>(grad.data(), n, e));
    float* g = grad.data();
    benchmark::DoNotOptimize(g);
    benchmark::DoNotOptimize(r);
    return s;
  });
  state.SetItemsProcessed(state.iterations() * n);
  state.SetBytesProcessed(state.iterations() * (bytes_of<float>(2 * n * e) + bytes_of<std::int32_t>(n * k)));
}

// ---- registration ---------------------------------------------------------------------------------
// 2 x 2 (N, V) per divergence and precision: 32 logit_kd cases, plus the 151,936 and vocab_map ones.
#define KD_BENCH_LOGIT_KD(D, P)                 \
  BENCHMARK_TEMPLATE(BM_logit_kd, D, P)         \
      ->ArgNames({"N", "V"})                    \
      ->ArgsProduct({{64, 256}, {4096, 50304}}) \
      ->Unit(benchmark::kMillisecond)

KD_BENCH_LOGIT_KD(kd::forward_kl, kd::fp32);
KD_BENCH_LOGIT_KD(kd::forward_kl, kd::bf16);
KD_BENCH_LOGIT_KD(kd::reverse_kl, kd::fp32);
KD_BENCH_LOGIT_KD(kd::reverse_kl, kd::bf16);
KD_BENCH_LOGIT_KD(kd::jsd, kd::fp32);
KD_BENCH_LOGIT_KD(kd::jsd, kd::bf16);
KD_BENCH_LOGIT_KD(kd::tvd, kd::fp32);
KD_BENCH_LOGIT_KD(kd::tvd, kd::bf16);
BENCHMARK_TEMPLATE(BM_logit_kd, kd::forward_kl, kd::fp32)
    ->ArgNames({"N", "V"})
    ->Args({64, 151936})
    ->Unit(benchmark::kMillisecond);
BENCHMARK(BM_logit_kd_vocab_map)->ArgNames({"N"})->Arg(64)->Unit(benchmark::kMillisecond);

BENCHMARK_TEMPLATE(BM_cross_entropy, kd::fp32)
    ->ArgNames({"N", "V"})
    ->ArgsProduct({{64, 256}, {4096, 50304}})
    ->Unit(benchmark::kMillisecond);
BENCHMARK_TEMPLATE(BM_cross_entropy, kd::bf16)->ArgNames({"N", "V"})->Args({256, 50304})->Unit(benchmark::kMillisecond);

BENCHMARK_TEMPLATE(BM_feature, kd::sqrt_dim_mse)->ArgNames({"N"})->Arg(256)->Unit(benchmark::kMillisecond);
BENCHMARK_TEMPLATE(BM_feature, kd::rms_mse)->ArgNames({"N"})->Arg(256)->Unit(benchmark::kMillisecond);
BENCHMARK_TEMPLATE(BM_feature, kd::cosine)->ArgNames({"N"})->Arg(256)->Unit(benchmark::kMillisecond);

BENCHMARK_TEMPLATE(BM_attention, kd::softmax_kl)->ArgNames({"T"})->Arg(256)->Unit(benchmark::kMillisecond);
BENCHMARK_TEMPLATE(BM_attention, kd::none)->ArgNames({"T"})->Arg(256)->Unit(benchmark::kMillisecond);

BENCHMARK(BM_load_balance)->ArgNames({"N", "E"})->Args({4096, 8})->Unit(benchmark::kMicrosecond);

}  // namespace

BENCHMARK_MAIN();
