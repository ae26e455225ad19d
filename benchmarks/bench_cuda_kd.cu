// GPU benchmarks of kd's fused kernels (Google Benchmark, manual time from CUDA events).
// Each case reports the time of one forward+backward call, the minimum bytes it must move (read the
// teacher and student logits once, write the gradient once) as bytes_per_second, and kd's extra device
// memory (scratch) as extra_MB. BM_device_copy measures the card's copy bandwidth (bytes read plus
// written) in the same run, the ceiling to compare against.
#include <benchmark/benchmark.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <initializer_list>
#include <utility>
#include <vector>

#include <kd/kd.cuh>

namespace {

#define BENCH_CHECK(x)                                                                   \
  do {                                                                                   \
    cudaError_t e_ = (x);                                                                \
    if (e_ != cudaSuccess) {                                                             \
      std::fprintf(stderr, "%s:%d %s: %s\n", __FILE__, __LINE__, #x, cudaGetErrorString(e_)); \
      std::abort();                                                                      \
    }                                                                                    \
  } while (0)

// Deterministic pseudo-normal fill on the device (sum of uniforms), never zeros.
template <class T>
__global__ void fill_kernel(T* out, long long n, unsigned seed, float stddev) {
  for (long long i = blockIdx.x * static_cast<long long>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<long long>(gridDim.x) * blockDim.x) {
    unsigned h = static_cast<unsigned>(i) * 2654435761u ^ seed;
    float acc = 0.f;
    for (int k = 0; k < 4; ++k) {
      h ^= h >> 16;
      h *= 0x7feb352du;
      h ^= h >> 15;
      h *= 0x846ca68bu;
      h ^= h >> 16;
      acc += static_cast<float>(h & 0xffffff) / 16777216.f - 0.5f;
    }
    out[i] = kd::cuda::detail::from_float<T>(acc * 1.7320508f * stddev);
  }
}

template <class T>
T* device_random(long long n, unsigned seed, float stddev) {
  T* p = nullptr;
  BENCH_CHECK(cudaMalloc(&p, n * sizeof(T)));
  fill_kernel<<<1024, 256>>>(p, n, seed, stddev);
  BENCH_CHECK(cudaGetLastError());
  return p;
}

void BM_device_copy(benchmark::State& state) {
  const std::size_t bytes = std::size_t(2) << 30;
  void *a = nullptr, *b = nullptr;
  BENCH_CHECK(cudaMalloc(&a, bytes));
  BENCH_CHECK(cudaMalloc(&b, bytes));
  BENCH_CHECK(cudaMemset(a, 1, bytes));
  cudaEvent_t e0, e1;
  cudaEventCreate(&e0);
  cudaEventCreate(&e1);
  for (auto _ : state) {
    cudaEventRecord(e0);
    BENCH_CHECK(cudaMemcpyAsync(b, a, bytes, cudaMemcpyDeviceToDevice));
    cudaEventRecord(e1);
    cudaEventSynchronize(e1);
    float ms = 0;
    cudaEventElapsedTime(&ms, e0, e1);
    state.SetIterationTime(ms / 1e3);
  }
  state.SetBytesProcessed(static_cast<int64_t>(state.iterations()) * 2 * static_cast<int64_t>(bytes));
  cudaFree(a);
  cudaFree(b);
  cudaEventDestroy(e0);
  cudaEventDestroy(e1);
}
BENCHMARK(BM_device_copy)->UseManualTime()->Unit(benchmark::kMillisecond)->Iterations(20);

// Times `call` (which enqueues one forward+backward on `stream`) with CUDA events.
template <class F>
void time_calls(benchmark::State& state, F&& call) {
  for (int w = 0; w < 3; ++w) call();
  BENCH_CHECK(cudaDeviceSynchronize());
  cudaEvent_t e0, e1;
  cudaEventCreate(&e0);
  cudaEventCreate(&e1);
  for (auto _ : state) {
    cudaEventRecord(e0);
    call();
    cudaEventRecord(e1);
    cudaEventSynchronize(e1);
    float ms = 0;
    cudaEventElapsedTime(&ms, e0, e1);
    state.SetIterationTime(ms / 1e3);
  }
  cudaEventDestroy(e0);
  cudaEventDestroy(e1);
}

// Logit KD on given logits, teacher and student in one storage type T (bf16 or float), gradient into
// its own buffer. range: N, V, shared-memory slice budget in KiB (0: the context's default).
template <class D, class T>
void run_logit_kd(benchmark::State& state, long long n, long long v, std::size_t budget_kb, kd::cuda::row_schedule schedule) {
  T* t = device_random<T>(n * v, 1, 2.f);
  T* s = device_random<T>(n * v, 2, 1.f);
  T* g = nullptr;
  float* loss = nullptr;
  BENCH_CHECK(cudaMalloc(&g, n * v * sizeof(T)));
  BENCH_CHECK(cudaMalloc(&loss, sizeof(float)));
  kd::cuda::context ctx;
  if (budget_kb != 0) ctx.set_slice_budget(budget_kb * 1024);  // 0: the context's default
  ctx.set_schedule(schedule);
  using P = kd::precision<T, float>;
  kd::logit_kd<D, kd::token_mean, kd::precision_set<P, P>> l;
  l.options.temperature = 2.0;
  kd::cuda::device_loss out{loss, nullptr};
  time_calls(state, [&] {
    const auto st = l(kd::cuda::backend{&ctx}, kd::matrix_view<const T>(t, n, v), kd::matrix_view<const T>(s, n, v),
                      {}, out, kd::matrix_view<T>(g, n, v));
    if (!st.ok()) state.SkipWithError(st.message().c_str());
  });
  const auto sync = ctx.sync_status();
  if (!sync.ok()) state.SkipWithError(sync.message().c_str());
  state.SetBytesProcessed(static_cast<int64_t>(state.iterations()) * 3 * n * v * static_cast<int64_t>(sizeof(T)));
  state.counters["extra_MB"] = static_cast<double>(ctx.scratch_capacity()) / 1e6;
  cudaFree(t);
  cudaFree(s);
  cudaFree(g);
  cudaFree(loss);
}

// range: N, V, shared-memory slice budget in KiB (the per-row kernel's cluster-size knob; 0: the default).
template <class D, class T>
void BM_logit_kd(benchmark::State& state) {
  run_logit_kd<D, T>(state, state.range(0), state.range(1), static_cast<std::size_t>(state.range(2)),
                     kd::cuda::row_schedule::automatic);
}
// The row schedules side by side (kd::cuda::row_schedule): range N, V, schedule (0 the planner's
// choice, 1 per-row clusters, 2 the ring kernel where it applies), at the context's default slice budget.
template <class D, class T>
void BM_logit_kd_schedule(benchmark::State& state) {
  run_logit_kd<D, T>(state, state.range(0), state.range(1), 0, static_cast<kd::cuda::row_schedule>(state.range(2)));
}

template <class D>
void BM_logit_kd_bf16(benchmark::State& state) {
  BM_logit_kd<D, kd::bfloat16>(state);
}

template <class T>
void BM_cross_entropy(benchmark::State& state) {
  const long long n = state.range(0), v = state.range(1);
  const std::size_t budget_kb = state.range(2);
  T* s = device_random<T>(n * v, 3, 2.f);
  T* g = nullptr;
  float* ce = nullptr;
  std::int32_t* labels = nullptr;
  BENCH_CHECK(cudaMalloc(&g, n * v * sizeof(T)));
  BENCH_CHECK(cudaMalloc(&ce, sizeof(float)));
  BENCH_CHECK(cudaMalloc(&labels, n * sizeof(std::int32_t)));
  BENCH_CHECK(cudaMemset(labels, 0, n * sizeof(std::int32_t)));
  kd::cuda::context ctx;
  if (budget_kb != 0) ctx.set_slice_budget(budget_kb * 1024);  // 0: the context's default
  kd::cross_entropy<kd::token_mean, kd::precision<T, float>> l;
  kd::cuda::device_cross_entropy out{ce, nullptr, nullptr};
  time_calls(state, [&] {
    const auto st = l(kd::cuda::backend{&ctx}, kd::matrix_view<const T>(s, n, v),
                      std::span<const std::int32_t>(labels, static_cast<std::size_t>(n)), out, kd::matrix_view<T>(g, n, v));
    if (!st.ok()) state.SkipWithError(st.message().c_str());
  });
  state.SetBytesProcessed(static_cast<int64_t>(state.iterations()) * 2 * n * v * static_cast<int64_t>(sizeof(T)));
  state.counters["extra_MB"] = static_cast<double>(ctx.scratch_capacity()) / 1e6;
  cudaFree(s);
  cudaFree(g);
  cudaFree(ce);
  cudaFree(labels);
}
void BM_cross_entropy_bf16(benchmark::State& state) { BM_cross_entropy<kd::bfloat16>(state); }

// The benchmarks' vocab maps onto a 50,304-wide student. kind 0: a 151,936-wide teacher through a
// Qwen3 -> GPT-2-shaped map (42,256 shared strings at every third teacher id, scattered over the student
// ids, plus 1,024 many-to-one entries: the general CSR path); 1: a compact teacher head of 42,304 columns
// mapped one to one onto increasing student ids (kd::vocab_map::contiguous_teacher, the trainer's case);
// 2: map 0 compacted (vocab_map::compact_teacher: its 43,280 teacher columns in the student's order,
// 43,328 wide; many-to-one, so still the CSR path, with teacher ids that follow the student order).
// The map's teacher width is its teacher_vocab(); false if it could not be built.
bool bench_map(long long kind, kd::vocab_map& map) {
  std::vector<std::pair<std::int32_t, std::int32_t>> pairs;
  const long long tv = kind == 1 ? 42304 : 151936;
  if (kind == 1) {
    for (std::int32_t i = 0; i < tv; ++i) pairs.emplace_back(i, static_cast<std::int32_t>((i * 50257LL) / tv));
  } else {
    for (std::int32_t i = 0; i < 42256; ++i) pairs.emplace_back(i * 3 + 1, static_cast<std::int32_t>((i * 7919LL) % 50257));
    for (std::int32_t i = 0; i < 1024; ++i) pairs.emplace_back(140000 + i, i % 50257);
  }
  if (!kd::vocab_map::from_pairs(pairs, tv, 50304, map).ok()) return false;
  if (kind == 1) return map.contiguous_teacher();
  if (kind == 2) {
    const kd::vocab_map general = std::move(map);
    std::vector<std::int32_t> rows;
    return general.compact_teacher(64, map, rows).ok();
  }
  return true;
}

// Student LM head (hidden d = range(2) -> V) + a divergence against the teacher, forward+backward with
// gradients for the hidden states and the head; the logits never reach memory in full. The teacher is
// given as logits [N x V], or (Head) as hidden states of width 1024 (the seed teacher's) and an LM head,
// whose logits are formed per chunk too. range(3): chunk_rows (2048 in the grid), -1 for the default
// chunk (linear_kd_options::chunk_rows = 0: 2048 rows with fp32 logits, more in bf16), 0 for
// linear_kd_path::on_chip (no logits in memory). Storage: linear_kd_logits::storage (the chunk logits in
// bf16, the gradient over them). Map (>= 0): the teacher through bench_map(Map) onto the student's V
// (50,304), the teacher's width the map's; with a head, map 0 runs the full head
// (compact_teacher_head = false) and 3 the same map and head compacted by linear_kd itself. Minimum
// bytes: read the hidden states, the heads and the teacher logits (or hidden states); write dhidden and dW.
template <class D, bool Head = false, bool Storage = false, int Map = -1>
void BM_linear_kd_bf16(benchmark::State& state) {
  const long long n = state.range(0), v = state.range(1), d = state.range(2), dt = 1024;
  const long long chunk = state.range(3);
  kd::vocab_map map;
  if (Map >= 0 && (!bench_map(Map == 3 ? 0 : Map, map) || map.student_vocab() != v)) return state.SkipWithError("vocab_map");
  const long long tv = Map >= 0 ? map.teacher_vocab() : v;
  using T = kd::bfloat16;
  T* h = device_random<T>(n * d, 4, 1.f);
  T* w = device_random<T>(v * d, 5, 0.04f);
  T* t = Head ? nullptr : device_random<T>(n * tv, 6, 2.f);
  T* th = Head ? device_random<T>(n * dt, 6, 1.f) : nullptr;
  T* tw = Head ? device_random<T>(tv * dt, 7, 0.06f) : nullptr;
  T *dh = nullptr, *dw = nullptr;
  float* loss = nullptr;
  BENCH_CHECK(cudaMalloc(&dh, n * d * sizeof(T)));
  BENCH_CHECK(cudaMalloc(&dw, v * d * sizeof(T)));
  BENCH_CHECK(cudaMalloc(&loss, sizeof(float)));
  kd::cuda::context ctx;
  kd::linear_logit_kd<D, kd::token_mean, kd::precision_set<kd::bf16, kd::bf16, kd::bf16>> l;
  l.options.temperature = 2.0;
  if (chunk > 0) l.options.chunk_rows = chunk;
  if (chunk == 0) l.options.path = kd::linear_kd_path::on_chip;  // range(3) = 0: the logits on chip
  if (Storage) l.options.logits = kd::linear_kd_logits::storage;
  if (Map >= 0) l.options.map = &map;
  l.options.compact_teacher_head = Map != 0;
  kd::cuda::device_loss out{loss, nullptr};
  const kd::matrix_view<const T> hv(h, n, d), wv(w, v, d);
  const kd::matrix_view<T> dhv(dh, n, d), dwv(dw, v, d);
  time_calls(state, [&] {
    kd::status st;
    if constexpr (Head)
      st = l(kd::cuda::backend{&ctx}, hv, wv,
             kd::teacher_head<T>{kd::matrix_view<const T>(th, n, dt), kd::matrix_view<const T>(tw, tv, dt)}, {}, out, dhv, dwv);
    else
      st = l(kd::cuda::backend{&ctx}, hv, wv, kd::matrix_view<const T>(t, n, tv), {}, out, dhv, dwv);
    if (!st.ok()) state.SkipWithError(st.message().c_str());
  });
  const auto sync = ctx.sync_status();
  if (!sync.ok()) state.SkipWithError(sync.message().c_str());
  const long long teacher_elems = Head ? n * dt + tv * dt : n * tv;
  state.SetBytesProcessed(static_cast<int64_t>(state.iterations()) * (teacher_elems + 2 * n * d + 2 * v * d) *
                          static_cast<int64_t>(sizeof(T)));
  state.counters["extra_MB"] = static_cast<double>(ctx.scratch_capacity()) / 1e6;
  state.counters["TFLOPs"] = benchmark::Counter((6.0 * n * v * d + (Head ? 2.0 * n * tv * dt : 0.0)) *
                                                    state.iterations() / 1e12,
                                                benchmark::Counter::kIsRate);
  for (void* p : {static_cast<void*>(h), static_cast<void*>(w), static_cast<void*>(t), static_cast<void*>(th),
                  static_cast<void*>(tw), static_cast<void*>(dh), static_cast<void*>(dw), static_cast<void*>(loss)})
    cudaFree(p);
}

// The GEMMs alone of linear_kd's chunk loop at the same shapes, operand types and chunking (range: N, V,
// d, chunk rows; Head: the teacher-head GEMM too): per chunk logits[chunk x V] (fp32) = h W^T,
// dh = dlogits W, dW += dlogits^T h (fp32). Its time is the floor of the cuBLAS chunk design, and 4/3 of
// it (the student GEMM once more, to recompute the logits after their normalizer is known) the floor of
// any design that never stores the logits, at cuBLAS's own GEMM rate.
template <bool Head = false>
void BM_linear_gemms_bf16(benchmark::State& state) {
  const long long n = state.range(0), v = state.range(1), d = state.range(2), chunk = state.range(3), dt = 1024;
  using T = kd::bfloat16;
  T* h = device_random<T>(n * d, 4, 1.f);
  T* w = device_random<T>(v * d, 5, 0.04f);
  T* th = Head ? device_random<T>(n * dt, 6, 1.f) : nullptr;
  T* tw = Head ? device_random<T>(v * dt, 7, 0.06f) : nullptr;
  T* dlogits = device_random<T>(chunk * v, 8, 1e-4f);
  T* dh = nullptr;
  float *logits = nullptr, *tlogits = nullptr, *dw32 = nullptr;
  BENCH_CHECK(cudaMalloc(&dh, n * d * sizeof(T)));
  BENCH_CHECK(cudaMalloc(&logits, chunk * v * sizeof(float)));
  if (Head) BENCH_CHECK(cudaMalloc(&tlogits, chunk * v * sizeof(float)));
  BENCH_CHECK(cudaMalloc(&dw32, v * d * sizeof(float)));
  cublasHandle_t blas = nullptr;
  if (cublasCreate(&blas) != CUBLAS_STATUS_SUCCESS) return state.SkipWithError("cublasCreate");
  kd::status st;
  time_calls(state, [&] {
    for (long long r0 = 0; r0 < n && st.ok(); r0 += chunk) {
      const long long rows = std::min(chunk, n - r0);
      st = kd::cuda::gemm_rm(blas, rows, v, d, h + r0 * d, d, false, w, d, true, logits, v, 0.f);
      if (Head && st.ok()) st = kd::cuda::gemm_rm(blas, rows, v, dt, th + r0 * dt, dt, false, tw, dt, true, tlogits, v, 0.f);
      if (st.ok()) st = kd::cuda::gemm_rm(blas, rows, d, v, dlogits, v, false, w, d, false, dh + r0 * d, d, 0.f);
      if (st.ok()) st = kd::cuda::gemm_rm(blas, v, d, rows, dlogits, v, true, h + r0 * d, d, false, dw32, d, r0 == 0 ? 0.f : 1.f);
    }
  });
  if (!st.ok()) state.SkipWithError(st.message().c_str());
  state.counters["TFLOPs"] = benchmark::Counter((6.0 * n * v * d + (Head ? 2.0 * n * v * dt : 0.0)) *
                                                    state.iterations() / 1e12,
                                                benchmark::Counter::kIsRate);
  cublasDestroy(blas);
  for (void* p : {static_cast<void*>(h), static_cast<void*>(w), static_cast<void*>(th), static_cast<void*>(tw),
                  static_cast<void*>(dlogits), static_cast<void*>(dh), static_cast<void*>(logits),
                  static_cast<void*>(tlogits), static_cast<void*>(dw32)})
    cudaFree(p);
}

// Logit KD across vocabularies, range(1) the map (bench_map's kinds: 0 the general CSR map of a
// 151,936-wide teacher, 1 a compact contiguous teacher head, 2 map 0 compacted). range(2): gradient into
// its own buffer (0) or written over the student logits (1, what linear + KD does). Bytes counted: the
// mapped teacher columns and the student row read once, the student gradient row written once.
template <class D>
void BM_logit_kd_map_bf16(benchmark::State& state) {
  const long long n = state.range(0), sv = 50304;
  const bool in_place = state.range(2) != 0;
  using T = kd::bfloat16;
  kd::vocab_map map;
  if (!bench_map(state.range(1), map)) return state.SkipWithError("vocab_map");
  const long long tv = map.teacher_vocab();
  T* t = device_random<T>(n * tv, 7, 2.f);
  T* s = device_random<T>(n * sv, 8, 1.f);
  T* g = s;
  float* loss = nullptr;
  if (!in_place) BENCH_CHECK(cudaMalloc(&g, n * sv * sizeof(T)));
  BENCH_CHECK(cudaMalloc(&loss, sizeof(float)));
  kd::cuda::context ctx;
  kd::logit_kd<D, kd::token_mean, kd::precision_set<kd::bf16, kd::bf16>> l;
  l.options.temperature = 2.0;
  l.options.map = &map;
  kd::cuda::device_loss out{loss, nullptr};
  time_calls(state, [&] {
    const auto st = l(kd::cuda::backend{&ctx}, kd::matrix_view<const T>(t, n, tv), kd::matrix_view<const T>(s, n, sv),
                      {}, out, kd::matrix_view<T>(g, n, sv));
    if (!st.ok()) state.SkipWithError(st.message().c_str());
  });
  // In place, later calls read gradients as logits: finite values, the same work per element.
  const auto sync = ctx.sync_status();
  if (!sync.ok()) state.SkipWithError(sync.message().c_str());
  state.SetBytesProcessed(static_cast<int64_t>(state.iterations()) * n *
                          (static_cast<int64_t>(map.size()) + 2 * sv) * static_cast<int64_t>(sizeof(T)));
  state.counters["extra_MB"] = static_cast<double>(ctx.scratch_capacity()) / 1e6;
  cudaFree(t);
  cudaFree(s);
  if (!in_place) cudaFree(g);
  cudaFree(loss);
}

// The table's shapes at the default slice budget (third argument, KiB; 0 the default).
void shapes(benchmark::internal::Benchmark* b) {
  for (long long n : {4096, 16384})
    for (long long v : {50304, 151936}) b->Args({n, v, 0});
  b->UseManualTime()->Unit(benchmark::kMillisecond)->Iterations(20);
}
// A sweep of the slice budget over the grid's vocabularies at N = 8192 (and 2048 at V = 32,000): the
// budget sets the cluster size (kd::cuda::detail::row_cluster), so one run compares cluster sizes and
// blocks an SM (the per-row kernel's registers allow 4; three 76 KB slices fill an H100's shared
// memory). 52 KiB was the default to session 18, 64 since. make_table.py prints the BM_sweep_ rows.
void budget_sweep(benchmark::internal::Benchmark* b) {
  for (long long v : {32000, 50304, 128256, 151936})
    for (long long kb : {52, 64, 76}) b->Args({8192, v, kb});
  for (long long kb : {52, 64}) b->Args({2048, 32000, kb});
  b->UseManualTime()->Unit(benchmark::kMillisecond)->Iterations(20);
}

BENCHMARK(BM_logit_kd_bf16<kd::forward_kl>)->Apply(shapes);
// Small calls (N <= 1024, kd_bench_small_calls' range) at two slice budgets: half the default budget
// doubles the blocks a row (more blocks an SM, each with half the serial copy-then-compute latency), the
// question being whether those calls, a few waves of blocks, gain from it.
void small_sweep(benchmark::internal::Benchmark* b) {
  for (long long n : {256, 512, 1024})
    for (long long v : {50304, 151936})
      for (long long kb : {32, 64}) b->Args({n, v, kb});
  b->UseManualTime()->Unit(benchmark::kMicrosecond)->Iterations(200);
}

BENCHMARK(BM_logit_kd_bf16<kd::forward_kl>)->Name("BM_sweep_forward_kl")->Apply(budget_sweep);
BENCHMARK(BM_logit_kd_bf16<kd::reverse_kl>)->Name("BM_sweep_reverse_kl")->Apply(budget_sweep);
BENCHMARK(BM_logit_kd_bf16<kd::jsd>)->Name("BM_sweep_jsd")->Apply(budget_sweep);
BENCHMARK(BM_logit_kd_bf16<kd::tvd>)->Name("BM_sweep_tvd")->Apply(budget_sweep);
BENCHMARK(BM_logit_kd<kd::forward_kl, float>)->Name("BM_sweep_forward_kl_f32")->Apply(budget_sweep);
BENCHMARK(BM_logit_kd<kd::jsd, float>)->Name("BM_sweep_jsd_f32")->Apply(budget_sweep);
BENCHMARK(BM_cross_entropy_bf16)->Name("BM_sweep_cross_entropy")->Apply(budget_sweep);
// Small calls by schedule (range N, V, schedule: 1 per-row clusters, 2 the ring kernel): at N = 256-1024
// a call is 2-8 waves of per-row blocks, each wave paying every block's copy-then-compute latency, while
// the ring's persistent blocks keep the next rows' copies in flight.
void small_schedules(benchmark::internal::Benchmark* b) {
  for (long long n : {256, 512, 1024})
    for (long long v : {50304, 151936})
      for (long long sch : {1, 2}) b->Args({n, v, sch});
  b->UseManualTime()->Unit(benchmark::kMicrosecond)->Iterations(200);
}
BENCHMARK(BM_logit_kd_schedule<kd::forward_kl, kd::bfloat16>)->Name("BM_small_schedule_forward_kl")->Apply(small_schedules);
BENCHMARK(BM_logit_kd_schedule<kd::jsd, kd::bfloat16>)->Name("BM_small_schedule_jsd")->Apply(small_schedules);
BENCHMARK(BM_logit_kd_bf16<kd::forward_kl>)->Name("BM_small_forward_kl")->Apply(small_sweep);
BENCHMARK(BM_logit_kd_bf16<kd::jsd>)->Name("BM_small_jsd")->Apply(small_sweep);
BENCHMARK(BM_cross_entropy_bf16)->Name("BM_small_cross_entropy")->Apply(small_sweep);
BENCHMARK(BM_logit_kd_bf16<kd::jsd>)->Args({4096, 50304, 0})->UseManualTime()->Unit(benchmark::kMillisecond)->Iterations(20);
BENCHMARK(BM_logit_kd_map_bf16<kd::forward_kl>)->Args({4096, 0, 0})->Args({4096, 0, 1})->Args({16384, 0, 0})->UseManualTime()->Unit(benchmark::kMillisecond)->Iterations(20);
BENCHMARK(BM_linear_kd_bf16<kd::forward_kl>)->Args({16384, 50304, 576, 2048})->Args({16384, 151936, 576, 2048})->UseManualTime()->Unit(benchmark::kMillisecond)->Iterations(10);
BENCHMARK(BM_cross_entropy_bf16)->Args({4096, 50304, 0})->Args({16384, 50304, 0})->UseManualTime()->Unit(benchmark::kMillisecond)->Iterations(20);

// Issue 12's grid (run with --benchmark_filter='BM_grid|BM_gemms|BM_chunks'): every divergence and
// cross-entropy over V x N at the default budget, in bf16, in fp32 (a subset) and through the vocab maps
// (bench_map's three kinds); linear + KD at d = 576 and 2048 with the teacher as logits or as hidden
// states + head, and Liger's fused-linear JSD shape, each beside the time of its GEMMs alone (BM_gemms),
// with the logits in bf16 (BM_storage) and on chip (BM_onchip); linear + KD's chunk-size sweep
// (BM_chunks); a teacher head through the general map, full and compact (BM_headmap).
void grid(benchmark::internal::Benchmark* b) {
  for (long long v : {32000, 50304, 128256, 151936})
    for (long long n : {2048, 8192, 16384}) b->Args({n, v, 0});
  b->UseManualTime()->Unit(benchmark::kMillisecond)->Iterations(20);
}
// Chunk: BM_linear_kd_bf16's range(3) (2048 rows; -1 the default chunk; 0 the logits on chip).
template <long long Chunk>
void linear_grid(benchmark::internal::Benchmark* b) {
  for (long long d : {576, 2048})
    for (long long v : {50304, 128256, 151936})
      for (long long n : {8192, 16384}) b->Args({n, v, d, Chunk});
  b->UseManualTime()->Unit(benchmark::kMillisecond)->Iterations(10);
}
// fp32 storage: the smallest and largest of each extent.
void grid_f32(benchmark::internal::Benchmark* b) {
  for (long long v : {32000, 151936})
    for (long long n : {2048, 16384}) b->Args({n, v, 0});
  b->UseManualTime()->Unit(benchmark::kMillisecond)->Iterations(20);
}
// With a vocab map (all three kinds), gradient into its own buffer.
void grid_map(benchmark::internal::Benchmark* b) {
  for (long long kind : {0, 1, 2})
    for (long long n : {2048, 8192, 16384}) b->Args({n, kind, 0});
  b->UseManualTime()->Unit(benchmark::kMillisecond)->Iterations(20);
}
// Linear + KD's memory against its time: chunk rows from 256 to all of N at one shape, and the default (-1).
void linear_chunks(benchmark::internal::Benchmark* b) {
  for (long long c : {256, 512, 1024, 2048, 4096, 8192, -1}) b->Args({8192, 151936, 576, c});
  b->UseManualTime()->Unit(benchmark::kMillisecond)->Iterations(10);
}
BENCHMARK(BM_logit_kd_bf16<kd::forward_kl>)->Name("BM_grid_forward_kl")->Apply(grid);
BENCHMARK(BM_logit_kd_bf16<kd::reverse_kl>)->Name("BM_grid_reverse_kl")->Apply(grid);
BENCHMARK(BM_logit_kd_bf16<kd::jsd>)->Name("BM_grid_jsd")->Apply(grid);
BENCHMARK(BM_logit_kd_bf16<kd::skew_kl>)->Name("BM_grid_skew_kl")->Apply(grid);
BENCHMARK(BM_logit_kd_bf16<kd::tvd>)->Name("BM_grid_tvd")->Apply(grid);
BENCHMARK(BM_cross_entropy_bf16)->Name("BM_grid_cross_entropy")->Apply(grid);
BENCHMARK(BM_linear_kd_bf16<kd::forward_kl>)->Name("BM_grid_linear_forward_kl")->Apply(linear_grid<2048>);
BENCHMARK_TEMPLATE(BM_linear_kd_bf16, kd::forward_kl, true)->Name("BM_grid_linear_teacher_head")->Apply(linear_grid<2048>);
BENCHMARK(BM_linear_kd_bf16<kd::jsd>)->Name("BM_grid_linear_jsd")->Args({8192, 128256, 4096, 2048})->UseManualTime()->Unit(benchmark::kMillisecond)->Iterations(10);
BENCHMARK_TEMPLATE(BM_linear_kd_bf16, kd::forward_kl, false, true)->Name("BM_storage_linear_forward_kl")->Apply(linear_grid<-1>);
BENCHMARK_TEMPLATE(BM_linear_kd_bf16, kd::forward_kl, true, true)->Name("BM_storage_linear_teacher_head")->Apply(linear_grid<-1>);
BENCHMARK_TEMPLATE(BM_linear_kd_bf16, kd::jsd, false, true)->Name("BM_storage_linear_jsd")->Args({8192, 128256, 4096, -1})->UseManualTime()->Unit(benchmark::kMillisecond)->Iterations(10);
BENCHMARK(BM_linear_kd_bf16<kd::forward_kl>)->Name("BM_onchip_linear_forward_kl")->Apply(linear_grid<0>);
BENCHMARK_TEMPLATE(BM_linear_kd_bf16, kd::forward_kl, true)->Name("BM_onchip_linear_teacher_head")->Apply(linear_grid<0>);
BENCHMARK(BM_linear_kd_bf16<kd::jsd>)->Name("BM_onchip_linear_jsd")->Args({8192, 128256, 4096, 0})->UseManualTime()->Unit(benchmark::kMillisecond)->Iterations(10);
BENCHMARK(BM_linear_gemms_bf16<false>)->Name("BM_gemms_linear_forward_kl")->Apply(linear_grid<2048>);
BENCHMARK(BM_linear_gemms_bf16<true>)->Name("BM_gemms_linear_teacher_head")->Apply(linear_grid<2048>);
BENCHMARK(BM_linear_gemms_bf16<false>)->Name("BM_gemms_linear_jsd")->Args({8192, 128256, 4096, 2048})->UseManualTime()->Unit(benchmark::kMillisecond)->Iterations(10);
BENCHMARK(BM_linear_kd_bf16<kd::forward_kl>)->Name("BM_chunks_linear_forward_kl")->Apply(linear_chunks);
BENCHMARK_TEMPLATE(BM_linear_kd_bf16, kd::forward_kl, false, true)->Name("BM_chunks_storage_linear_forward_kl")->Apply(linear_chunks);
BENCHMARK_TEMPLATE(BM_linear_kd_bf16, kd::forward_kl, true, true)->Name("BM_chunks_storage_linear_teacher_head")->Apply(linear_chunks);
BENCHMARK(BM_logit_kd<kd::forward_kl, float>)->Name("BM_grid_forward_kl_f32")->Apply(grid_f32);
BENCHMARK(BM_logit_kd<kd::reverse_kl, float>)->Name("BM_grid_reverse_kl_f32")->Apply(grid_f32);
BENCHMARK(BM_logit_kd<kd::jsd, float>)->Name("BM_grid_jsd_f32")->Apply(grid_f32);
BENCHMARK(BM_logit_kd<kd::skew_kl, float>)->Name("BM_grid_skew_kl_f32")->Apply(grid_f32);
BENCHMARK(BM_logit_kd<kd::tvd, float>)->Name("BM_grid_tvd_f32")->Apply(grid_f32);
BENCHMARK(BM_cross_entropy<float>)->Name("BM_grid_cross_entropy_f32")->Apply(grid_f32);
void schedule_args(benchmark::internal::Benchmark* b, std::initializer_list<long long> vs, std::initializer_list<long long> ns) {
  for (long long v : vs)
    for (long long n : ns)
      for (long long sch : {0, 1, 2}) b->Args({n, v, sch});
  b->UseManualTime()->Unit(benchmark::kMillisecond)->Iterations(20);
}
void schedules(benchmark::internal::Benchmark* b) { schedule_args(b, {32000, 50304, 128256, 151936}, {2048, 8192, 16384}); }
// fp32: where the ring's slices fit (V up to about 64,000).
void schedules_f32(benchmark::internal::Benchmark* b) { schedule_args(b, {32000, 50304}, {2048, 16384}); }
BENCHMARK(BM_logit_kd_schedule<kd::forward_kl, kd::bfloat16>)->Name("BM_schedule_forward_kl")->Apply(schedules);
BENCHMARK(BM_logit_kd_schedule<kd::reverse_kl, kd::bfloat16>)->Name("BM_schedule_reverse_kl")->Apply(schedules);
BENCHMARK(BM_logit_kd_schedule<kd::jsd, kd::bfloat16>)->Name("BM_schedule_jsd")->Apply(schedules);
BENCHMARK(BM_logit_kd_schedule<kd::skew_kl, kd::bfloat16>)->Name("BM_schedule_skew_kl")->Apply(schedules);
BENCHMARK(BM_logit_kd_schedule<kd::tvd, kd::bfloat16>)->Name("BM_schedule_tvd")->Apply(schedules);
BENCHMARK(BM_logit_kd_schedule<kd::forward_kl, float>)->Name("BM_schedule_forward_kl_f32")->Apply(schedules_f32);
BENCHMARK(BM_logit_kd_schedule<kd::reverse_kl, float>)->Name("BM_schedule_reverse_kl_f32")->Apply(schedules_f32);
// Linear + KD with the teacher as hidden states and a head through the general map (d = 576, the
// default chunk): the full 151,936-row head, the same head compacted by linear_kd itself
// (compact_teacher_head, the default: a gather per call) and the head given compact
// (vocab_map::compact_teacher, what the trainer runs), fp32 and bf16 chunk logits. make_table.py prints
// them side by side.
void linear_head_map(benchmark::internal::Benchmark* b) {
  for (long long n : {8192, 16384}) b->Args({n, 50304, 576, -1});
  b->UseManualTime()->Unit(benchmark::kMillisecond)->Iterations(10);
}
BENCHMARK_TEMPLATE(BM_linear_kd_bf16, kd::forward_kl, true, false, 0)->Name("BM_headmap_full")->Apply(linear_head_map);
BENCHMARK_TEMPLATE(BM_linear_kd_bf16, kd::forward_kl, true, false, 3)->Name("BM_headmap_auto")->Apply(linear_head_map);
BENCHMARK_TEMPLATE(BM_linear_kd_bf16, kd::forward_kl, true, false, 2)->Name("BM_headmap_compact")->Apply(linear_head_map);
BENCHMARK_TEMPLATE(BM_linear_kd_bf16, kd::forward_kl, true, true, 0)->Name("BM_headmap_storage_full")->Apply(linear_head_map);
BENCHMARK_TEMPLATE(BM_linear_kd_bf16, kd::forward_kl, true, true, 3)->Name("BM_headmap_storage_auto")->Apply(linear_head_map);
BENCHMARK_TEMPLATE(BM_linear_kd_bf16, kd::forward_kl, true, true, 2)->Name("BM_headmap_storage_compact")->Apply(linear_head_map);
BENCHMARK(BM_logit_kd_map_bf16<kd::forward_kl>)->Name("BM_grid_forward_kl_map")->Apply(grid_map);
BENCHMARK(BM_logit_kd_map_bf16<kd::reverse_kl>)->Name("BM_grid_reverse_kl_map")->Apply(grid_map);
BENCHMARK(BM_logit_kd_map_bf16<kd::jsd>)->Name("BM_grid_jsd_map")->Apply(grid_map);
BENCHMARK(BM_logit_kd_map_bf16<kd::skew_kl>)->Name("BM_grid_skew_kl_map")->Apply(grid_map);
BENCHMARK(BM_logit_kd_map_bf16<kd::tvd>)->Name("BM_grid_tvd_map")->Apply(grid_map);

}  // namespace

int main(int argc, char** argv) {
  int devices = 0;
  if (cudaGetDeviceCount(&devices) != cudaSuccess || devices == 0) {
    std::printf("SKIPPED: no CUDA device\n");
    return 77;
  }
  cudaDeviceProp prop{};
  cudaGetDeviceProperties(&prop, 0);
  benchmark::AddCustomContext("device", prop.name);
  benchmark::Initialize(&argc, argv);
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
