// The CUDA AdamW (kd/train/adamw.cuh) against the CPU reference kd::adamw<T> (kd/train/adamw.hpp) over
// several steps, on fresh random arenas with odd-sized tensors, padding between them and tensors that
// do not decay; a non-finite gradient; and the state moving between the GPU and CPU optimizers.
#include <doctest/doctest.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <random>
#include <span>
#include <sstream>
#include <string>
#include <type_traits>
#include <vector>

#include <kd/train/adamw.cuh>

#include "gpu_util.cuh"

using namespace kd_test;

namespace {

// Seven tensors of random odd sizes with 0..7 padding elements around them: one of a single element,
// one spanning several kernel chunks; every third does not decay.
std::vector<kd::adamw_segment> odd_segments(std::size_t& arena) {
  std::uniform_int_distribution<std::size_t> size(1, 5000), gap(0, 7);
  std::vector<kd::adamw_segment> segs;
  std::size_t at = gap(rng());
  for (int i = 0; i < 7; ++i) {
    std::size_t n = size(rng());
    if (i == 3) n = 1;
    if (i == 5) n = 3 * kd::cuda::detail::kAdamwChunk + size(rng());
    std::string name = "t";  // appended, not "t" + ...: GCC 12 warns falsely (-Wrestrict) on that
    name += std::to_string(i);
    segs.push_back({name, at, n, i % 3 != 2});
    at += n + gap(rng());
  }
  arena = at + gap(rng());
  return segs;
}

std::size_t segment_elements(const std::vector<kd::adamw_segment>& segs) {
  std::size_t n = 0;
  for (const auto& s : segs) n += s.numel;
  return n;
}

// Warm-up over 2 steps, then cosine decay: lr changes every step.
kd::adamw_options options(double max_grad_norm) {
  kd::adamw_options o;
  o.weight_decay = 0.1;
  o.max_grad_norm = max_grad_norm;
  o.schedule = {.peak = 1e-2, .floor = 1e-3, .warmup_steps = 2, .total_steps = 7};
  return o;
}

// |a - b| <= tol (|b| + rms(b)) over the segments' elements; prints the worst one.
void check_close(const char* what, std::span<const float> a, std::span<const float> b,
                 const std::vector<kd::adamw_segment>& segs, double tol) {
  REQUIRE(a.size() == b.size());
  double ss = 0;
  std::size_t count = 0;
  for (const auto& s : segs)
    for (std::size_t i = s.offset; i < s.offset + s.numel; ++i, ++count) ss += double(b[i]) * b[i];
  const double rms = std::sqrt(ss / double(count ? count : 1));
  double worst = -1;
  std::size_t at = 0;
  for (const auto& s : segs)
    for (std::size_t i = s.offset; i < s.offset + s.numel; ++i) {
      const double e = std::abs(double(a[i]) - b[i]) / (std::abs(double(b[i])) + rms);
      if (!(e <= worst)) {  // NaN sticks
        worst = e;
        at = i;
      }
    }
  INFO(what, ": worst relative difference ", worst, " at element ", at, " (gpu ", a[at], ", cpu ", b[at],
       ", rms ", rms, ")");
  CHECK(worst <= tol);
}

template <class T>
std::vector<float> as_float(const std::vector<T>& v) {
  std::vector<float> out(v.size());
  for (std::size_t i = 0; i < v.size(); ++i) out[i] = kd::load_as<float>(v[i]);
  return out;
}

// GPU state and parameters against the CPU optimizer's; padding elements must be untouched (== p0).
template <class T>
void compare_state(kd::cuda::context& ctx, const kd::cuda::adamw<T>& gpu, const std::vector<T>& gpu_params,
                   const kd::adamw<T>& cpu, const std::vector<T>& cpu_params, const std::vector<T>& p0) {
  const auto& segs = cpu.segments();
  const std::size_t n = p0.size();
  const float nan = std::numeric_limits<float>::quiet_NaN();
  std::int64_t step = -1;
  std::vector<float> m(n, nan), v(n, nan), master(kd::adamw<T>::keeps_master ? n : 0, nan);  // poisoned
  REQUIRE(gpu.download(ctx, step, m, v, master).ok());
  CHECK(step == cpu.steps_taken());
  constexpr double tol = 1e-5;  // fp32 rounding (the kernel fuses multiply-adds), compounded over a few steps
  check_close("m", m, cpu.m(), segs, tol);
  check_close("v", v, cpu.v(), segs, tol);
  if constexpr (kd::adamw<T>::keeps_master) {
    check_close("master", master, cpu.master(), segs, tol);
    // The 16-bit parameters are the master rounded to nearest; against the CPU at most an ulp apart
    // (the masters may straddle a rounding boundary).
    std::size_t not_rounded = 0, far = 0, first_far = 0;
    for (const auto& s : segs)
      for (std::size_t i = s.offset; i < s.offset + s.numel; ++i) {
        if (gpu_params[i].bits != kd::store_as<T>(master[i]).bits) ++not_rounded;
        const double a = kd::load_as<double>(gpu_params[i]), b = kd::load_as<double>(cpu_params[i]);
        if (!(std::abs(a - b) <= std::ldexp(std::abs(b), std::is_same_v<T, kd::half> ? -10 : -7) + std::ldexp(1.0, -24))) {
          if (far++ == 0) first_far = i;
        }
      }
    INFO("parameters not equal to their rounded master: ", not_rounded, "; more than an ulp from the CPU: ", far,
         " (first at ", first_far, ": gpu ", kd::load_as<float>(gpu_params[first_far]), ", cpu ",
         kd::load_as<float>(cpu_params[first_far]), ")");
    CHECK(not_rounded == 0);
    CHECK(far == 0);
  } else {
    check_close("parameters", as_float(gpu_params), as_float(cpu_params), segs, tol);
  }
  std::vector<bool> inside(n, false);
  for (const auto& s : segs)
    for (std::size_t i = s.offset; i < s.offset + s.numel; ++i) inside[i] = true;
  std::size_t touched = 0;
  for (std::size_t i = 0; i < n; ++i)
    if (!inside[i] && std::memcmp(&gpu_params[i], &p0[i], sizeof(T)) != 0) ++touched;
  INFO("padding elements written: ", touched);
  CHECK(touched == 0);
}

// A GPU arena of n elements starting `shift` elements into its buffer (shift 1: not 16-byte aligned,
// so the kernels take their scalar path).
template <class X>
struct arena {
  device_buffer<X> buf;
  std::size_t n, shift;
  arena(std::size_t n_, std::size_t shift_) : buf(n_ + shift_), n(n_), shift(shift_) { buf.poison(); }
  X* data() { return buf.data + shift; }
  std::span<X> span() { return {data(), n}; }
  std::span<const X> cspan() { return {data(), n}; }
  void upload(const std::vector<X>& h) {
    REQUIRE(h.size() == n);
    REQUIRE(cudaMemcpy(data(), h.data(), n * sizeof(X), cudaMemcpyHostToDevice) == cudaSuccess);
  }
  std::vector<X> download() {
    std::vector<X> h(n);
    REQUIRE(cudaMemcpy(h.data(), data(), n * sizeof(X), cudaMemcpyDeviceToHost) == cudaSuccess);
    return h;
  }
};

// One step on both optimizers with the same fresh gradients; the step results must agree.
template <class T, class G>
void step_both(kd::cuda::context& ctx, kd::cuda::adamw<T>& gpu, arena<T>& pd, arena<G>& gd, kd::adamw<T>& cpu,
               std::vector<T>& ph) {
  const auto gh = random_storage<G>(pd.n, 1.0, rng());
  gd.upload(gh);
  REQUIRE(gpu.step(ctx, pd.span(), gd.cspan()).ok());
  kd::adamw_step_result rc, rg;
  REQUIRE(cpu.step(std::span<T>(ph), std::span<const G>(gh), rc).ok());
  const auto st = ctx.sync_status();
  REQUIRE_MESSAGE(st.ok(), st.message());
  REQUIRE(gpu.result(ctx, rg).ok());
  INFO("step gpu ", rg.step, " cpu ", rc.step, "; lr ", rg.lr, " / ", rc.lr, "; norm ", rg.grad_norm, " / ",
       rc.grad_norm, "; clip ", rg.clip_scale, " / ", rc.clip_scale);
  CHECK(rg.step == rc.step);
  CHECK(rg.lr == doctest::Approx(rc.lr).epsilon(1e-12));
  CHECK(rg.grad_norm == doctest::Approx(rc.grad_norm).epsilon(1e-12));
  CHECK(rg.clip_scale == doctest::Approx(rc.clip_scale).epsilon(1e-12));
}

// The GPU and CPU optimizers on the same fresh arena. `clip_factor` sets max_grad_norm relative to the
// expected norm of N(0, 1) gradients: 0.5 clips every step, 0 never clips, 4 is set but never reached.
template <class T, class G = T>
struct twin_run {
  std::size_t n = 0;
  std::vector<kd::adamw_segment> segs = odd_segments(n);
  kd::adamw_options o;
  std::vector<T> p0, ph;
  arena<T> pd;
  arena<G> gd;
  kd::cuda::context ctx;
  kd::cuda::adamw<T> gpu;
  kd::adamw<T> cpu;

  explicit twin_run(double clip_factor, std::size_t shift = 0)
      : o(options(clip_factor * std::sqrt(double(segment_elements(segs))))),
        p0(random_storage<T>(n, 1.0, rng())),
        ph(p0),
        pd(n, shift),
        gd(n, shift) {
    pd.upload(p0);
    REQUIRE(gpu.init(ctx, segs, pd.cspan(), o).ok());
    REQUIRE(cpu.init(segs, ph, o).ok());
  }
  void step() { step_both(ctx, gpu, pd, gd, cpu, ph); }
  void compare() { compare_state(ctx, gpu, pd.download(), cpu, ph, p0); }
};

template <class T, class G>
void check_against_cpu(double clip_factor, std::size_t shift, int steps = 5) {
  twin_run<T, G> run(clip_factor, shift);
  INFO("arena ", run.n, " elements, shift ", shift, ", max_grad_norm ", run.o.max_grad_norm);
  for (int s = 0; s < steps; ++s) run.step();
  kd::adamw_step_result r;
  REQUIRE(run.gpu.result(run.ctx, r).ok());
  if (clip_factor > 0 && clip_factor < 1) CHECK(r.clip_scale < 1.0);
  else CHECK(r.clip_scale == 1.0);
  run.compare();
}

}  // namespace

TEST_CASE_TEMPLATE("cuda adamw matches the CPU reference over several steps", T, float, kd::bfloat16, kd::half) {
  SUBCASE("clipping inactive") { check_against_cpu<T, T>(0.0, 0); }
  SUBCASE("clipping set, not reached") { check_against_cpu<T, T>(4.0, 0); }
  SUBCASE("clipping active") { check_against_cpu<T, T>(0.5, 0); }
  SUBCASE("unaligned arena (scalar path), clipping active") { check_against_cpu<T, T>(0.5, 1); }
  SUBCASE("float gradients") { check_against_cpu<T, float>(0.5, 0); }
}

TEST_CASE_TEMPLATE("cuda adamw: a non-finite gradient changes nothing and sync_status names the tensor", T, float,
                   kd::bfloat16) {
  for (const float bad : {std::numeric_limits<float>::quiet_NaN(), std::numeric_limits<float>::infinity()}) {
    CAPTURE(bad);
    twin_run<T> run(0.5);
    kd::cuda::context& ctx = run.ctx;
    arena<T> &pd = run.pd, &gd = run.gd;
    kd::cuda::adamw<T>& gpu = run.gpu;
    kd::adamw<T>& cpu = run.cpu;
    const auto& segs = run.segs;
    const std::size_t n = run.n;
    run.step();
    run.step();

    std::int64_t step0 = 0, step1 = 0;
    std::vector<float> m0, v0, w0, m1, v1, w1;
    REQUIRE(gpu.download(ctx, step0, m0, v0, w0).ok());
    const auto params_before = pd.download();
    // Bad values in tensors 4 and 6 (the last element of 4): the message names the first, t4.
    auto gh = random_storage<T>(n, 1.0, rng());
    gh[segs[4].offset + segs[4].numel - 1] = kd::store_as<T>(bad);
    gh[segs[6].offset] = kd::store_as<T>(-bad);
    gd.upload(gh);
    REQUIRE(gpu.step(ctx, pd.span(), gd.cspan()).ok());  // found on the device, reported at the sync
    const auto st = ctx.sync_status();
    INFO("sync_status: ", st.message());
    CHECK(st.code() == kd::errc::non_finite);
    CHECK(st.message().find("non-finite gradient") != std::string::npos);
    CHECK(st.message().find("'t4'") != std::string::npos);
    CHECK(ctx.sync_status().ok());  // reported once
    kd::adamw_step_result rc;
    CHECK(cpu.step(std::span<T>(run.ph), std::span<const T>(gh), rc).code() == kd::errc::non_finite);

    REQUIRE(gpu.download(ctx, step1, m1, v1, w1).ok());
    const auto params_after = pd.download();
    CHECK(step1 == step0);
    CHECK(std::memcmp(params_after.data(), params_before.data(), n * sizeof(T)) == 0);
    CHECK(m1 == m0);
    CHECK(v1 == v0);
    CHECK(w1 == w0);
    kd::adamw_step_result r;
    REQUIRE(gpu.result(ctx, r).ok());
    CHECK(r.step == 2);

    // The run goes on: the next good step is step 3 on both.
    run.step();
    run.compare();
  }
}

TEST_CASE_TEMPLATE("cuda adamw: the state moves between the GPU and CPU optimizers", T, float, kd::bfloat16) {
  twin_run<T> run(0.5);
  kd::cuda::context& ctx = run.ctx;
  arena<T> &pd = run.pd, &gd = run.gd;
  kd::cuda::adamw<T>& gpu = run.gpu;
  const auto& segs = run.segs;
  const auto& o = run.o;
  const std::size_t n = run.n;
  for (int s = 0; s < 3; ++s) {
    gd.upload(random_storage<T>(n, 1.0, rng()));
    REQUIRE(gpu.step(ctx, pd.span(), gd.cspan()).ok());
  }
  REQUIRE(ctx.sync_status().ok());

  // GPU -> CPU: a CPU optimizer on the GPU's parameters loads the GPU's state and both go on alike.
  std::stringstream saved;
  REQUIRE(gpu.save(ctx, saved).ok());
  auto& ph = run.ph = pd.download();
  auto& cpu = run.cpu;
  REQUIRE(cpu.init(segs, ph, o).ok());
  const auto loaded = cpu.load(saved);
  REQUIRE_MESSAGE(loaded.ok(), loaded.message());
  CHECK(cpu.steps_taken() == 3);
  for (int s = 0; s < 2; ++s) run.step();
  run.compare();

  // CPU -> GPU: a fresh GPU optimizer on the CPU's parameters loads the CPU's state.
  std::stringstream saved_cpu;
  REQUIRE(cpu.save(saved_cpu).ok());
  arena<T> pd2(n, 0);
  pd2.upload(ph);
  kd::cuda::adamw<T> gpu2;
  REQUIRE(gpu2.init(ctx, segs, pd2.cspan(), o).ok());
  const auto loaded2 = gpu2.load(ctx, saved_cpu);
  REQUIRE_MESSAGE(loaded2.ok(), loaded2.message());
  for (int s = 0; s < 2; ++s) step_both(ctx, gpu2, pd2, gd, cpu, ph);
  compare_state(ctx, gpu2, pd2.download(), cpu, ph, run.p0);

  // A state of another storage type or arena is refused.
  std::stringstream again;
  REQUIRE(cpu.save(again).ok());
  kd::cuda::adamw<T> other;
  arena<T> small(n - 1, 0);
  REQUIRE(other.init(ctx, {segs[0]}, small.cspan(), o).ok());
  CHECK(other.load(ctx, again).code() == kd::errc::shape_mismatch);
}

TEST_CASE("cuda adamw: host-side errors come back at once") {
  kd::cuda::context ctx;
  arena<float> pd(100, 0), gd(100, 0);
  kd::cuda::adamw<float> gpu;
  CHECK(gpu.step(ctx, pd.span(), gd.cspan()).code() == kd::errc::invalid_argument);  // before init
  const auto o = options(0.0);
  CHECK(gpu.init(ctx, {{"w", 90, 20, true}}, pd.cspan(), o).code() == kd::errc::out_of_range);
  CHECK(gpu.init(ctx, {{"a", 0, 50, true}, {"b", 40, 20, true}}, pd.cspan(), o).code() == kd::errc::invalid_argument);
  auto bad = o;
  bad.beta2 = 1.0;
  CHECK(gpu.init(ctx, {{"w", 0, 100, true}}, pd.cspan(), bad).code() == kd::errc::invalid_argument);
  REQUIRE(gpu.init(ctx, {{"w", 0, 100, true}}, pd.cspan(), o).ok());
  CHECK(gpu.step(ctx, pd.span().first(99), gd.cspan()).code() == kd::errc::shape_mismatch);
  CHECK(gpu.step(ctx, pd.span(), gd.cspan().first(99)).code() == kd::errc::shape_mismatch);
  CHECK(ctx.sync_status().ok());
}

// Bandwidth of a step on a SmolLM-135M-sized bf16 arena (bf16 gradients): 30 bytes move per parameter
// (kd/train/adamw.cuh). Run with --no-skip.
TEST_CASE("cuda adamw timing: 135M-parameter bf16 arena" * doctest::skip()) {
  using T = kd::bfloat16;
  const std::size_t n = 135'000'000;
  std::vector<kd::adamw_segment> segs;
  for (std::size_t at = 0, i = 0; at < n; ++i) {  // 4.5M-element matrices with a 576-element norm after each
    const std::size_t w = std::min<std::size_t>(4'500'000, n - at);
    std::string id = std::to_string(i), w_name = "w", norm_name = "norm";
    segs.push_back({w_name += id, at, w, true});
    at += w;
    const std::size_t g = std::min<std::size_t>(576, n - at);
    if (g > 0) segs.push_back({norm_name += id, at, g, false});
    at += g;
  }
  device_buffer<T> pd(n), gd(n);
  REQUIRE(cudaMemset(pd.data, 0x3f, n * sizeof(T)) == cudaSuccess);  // 0x3f3f: 0.75
  REQUIRE(cudaMemset(gd.data, 0x3c, n * sizeof(T)) == cudaSuccess);  // 0x3c3c: 0.0115
  kd::cuda::context ctx;
  kd::cuda::adamw<T> gpu;
  REQUIRE(gpu.init(ctx, segs, std::span<const T>(pd.data, n), options(1.0)).ok());
  const std::span<T> p(pd.data, n);
  const std::span<const T> g(gd.data, n);
  for (int i = 0; i < 3; ++i) REQUIRE(gpu.step(ctx, p, g).ok());
  cudaEvent_t start, stop;
  REQUIRE(cudaEventCreate(&start) == cudaSuccess);
  REQUIRE(cudaEventCreate(&stop) == cudaSuccess);
  const int steps = 20;
  REQUIRE(cudaEventRecord(start, ctx.stream()) == cudaSuccess);
  for (int i = 0; i < steps; ++i) REQUIRE(gpu.step(ctx, p, g).ok());
  REQUIRE(cudaEventRecord(stop, ctx.stream()) == cudaSuccess);
  const auto st = ctx.sync_status();
  REQUIRE_MESSAGE(st.ok(), st.message());
  float ms = 0;
  REQUIRE(cudaEventElapsedTime(&ms, start, stop) == cudaSuccess);
  const double per_step = ms / steps;
  const double gbs = 30.0 * double(n) / (per_step * 1e-3) / 1e9;
  MESSAGE("adamw bf16, ", n, " parameters: ", per_step, " ms/step, ", gbs, " GB/s (30 bytes/parameter)");
  kd::adamw_step_result r;
  REQUIRE(gpu.result(ctx, r).ok());
  CHECK(r.step == 23);
  cudaEventDestroy(start);
  cudaEventDestroy(stop);
}
