// kd_distill_cuda: the combined distillation objective on the GPU.
//
// A student LM head (hidden 576 -> vocabulary 50,304, GPT-2-sized) learns from a teacher whose logits
// live in a different, larger vocabulary (151,936 rows, Qwen3-sized), through a vocabulary map, while the
// LM loss (cross-entropy with z-loss) keeps it on the labels. Each step:
//   logits = hidden W^T                                   (cuBLAS)
//   lm + z_loss  -> dlogits                               (kd::cross_entropy, fused kernel)
//   kd           -> dlogits (accumulated)                 (kd::logit_kd through the vocab map, fused)
//   dW = dlogits^T hidden, W -= lr dW                     (cuBLAS, a small kernel)
// Weights and temperature come from a kd::objective; losses stay on the device and are read once per
// logged step (the only synchronisation), when the objective combines them and the logger prints.
// The data is synthetic (random hidden states, a fixed random teacher): the point is the GPU path, not a
// model. The run fails (exit 1) unless KL(teacher || student) at T = 1 falls. Without a GPU it exits 77
// (skipped).
#include <cuda_runtime.h>

#include <cstdio>
#include <exception>
#include <iostream>
#include <numeric>
#include <random>
#include <vector>

#include <kd/kd.cuh>

namespace {

using T = kd::bfloat16;

void cuda_check(cudaError_t e, const char* what) {
  if (e != cudaSuccess) throw kd::error(kd::status(kd::errc::backend_error, std::string(what) + ": " + cudaGetErrorString(e)));
}

template <class V>
V* upload(const std::vector<V>& h) {
  V* d = nullptr;
  cuda_check(cudaMalloc(&d, h.size() * sizeof(V)), "cudaMalloc");
  cuda_check(cudaMemcpy(d, h.data(), h.size() * sizeof(V), cudaMemcpyHostToDevice), "cudaMemcpy");
  return d;
}

std::vector<T> random_bf16(std::size_t n, double stddev, std::mt19937_64& rng) {
  std::normal_distribution<double> d(0.0, stddev);
  std::vector<T> v(n);
  for (auto& x : v) x = T(static_cast<float>(d(rng)));
  return v;
}

// W -= lr * dW, with dW accumulated in float by cuBLAS.
__global__ void sgd_kernel(T* w, const float* dw, long long n, float lr) {
  for (long long i = blockIdx.x * static_cast<long long>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<long long>(gridDim.x) * blockDim.x)
    w[i] = kd::cuda::detail::from_float<T>(kd::cuda::detail::to_float(w[i]) - lr * dw[i]);
}

int run() {
  int devices = 0;
  if (cudaGetDeviceCount(&devices) != cudaSuccess || devices == 0) {
    std::printf("SKIPPED: no CUDA device\n");
    return 77;
  }
  constexpr long long n = 2048, d = 576, vs = 50304, vt = 151936, steps = 200;
  std::mt19937_64 rng(2026);

  // Vocabulary map: 42,256 shared token strings (an injection into GPT-2's 50,257 ids), padding unmapped.
  std::vector<std::int32_t> sid(50257);
  std::iota(sid.begin(), sid.end(), 0);
  std::shuffle(sid.begin(), sid.end(), rng);
  std::vector<std::pair<std::int32_t, std::int32_t>> pairs;
  for (int i = 0; i < 42256; ++i) pairs.emplace_back(i * 3 + 1, sid[static_cast<std::size_t>(i)]);
  kd::vocab_map map;
  kd::check(kd::vocab_map::from_pairs(pairs, vt, vs, map));

  // Labels: the teacher's own argmax ids mapped into the student vocabulary (so LM and KD agree), every
  // eighth token ignored.
  auto hidden_h = random_bf16(n * d, 1.0, rng);
  auto w_h = random_bf16(vs * d, 0.02, rng);
  auto teacher_h = random_bf16(n * vt, 3.0, rng);
  std::vector<std::int32_t> labels(n);
  for (long long r = 0; r < n; ++r) {
    std::size_t best = 0;
    float best_v = -1e30f;
    for (std::size_t e = 0; e < pairs.size(); ++e) {
      const float v = static_cast<float>(teacher_h[static_cast<std::size_t>(r * vt + pairs[e].first)]);
      if (v > best_v) best_v = v, best = e;
    }
    labels[static_cast<std::size_t>(r)] = r % 8 == 7 ? kd::default_ignore_index : pairs[best].second;
  }
  T* hidden = upload(hidden_h);
  T* w = upload(w_h);
  T* teacher = upload(teacher_h);
  std::int32_t* labels_d = upload(labels);
  T* logits = nullptr;
  T* kd_grad = nullptr;
  float *dw = nullptr, *losses = nullptr;
  cuda_check(cudaMalloc(&logits, n * vs * sizeof(T)), "cudaMalloc");
  cuda_check(cudaMalloc(&kd_grad, n * vs * sizeof(T)), "cudaMalloc");
  cuda_check(cudaMalloc(&dw, vs * d * sizeof(float)), "cudaMalloc");
  cuda_check(cudaMalloc(&losses, 3 * sizeof(float)), "cudaMalloc");

  kd::cuda::context ctx;
  const kd::cuda::backend gpu{&ctx};
  cublasHandle_t blas = nullptr;
  kd::check(ctx.cublas(blas));

  kd::objective objective;
  objective.add("kd", kd::schedule<kd::curve::linear>{0.0, 1.0, steps / 2});
  objective.add("z_loss", kd::fixed(1e-4));
  objective.temperature(kd::schedule<kd::curve::cosine>{2.0, 1.0, steps});
  kd::check(objective.validate());

  kd::cross_entropy<kd::token_mean, kd::bf16> lm;
  kd::logit_kd<kd::forward_kl, kd::token_mean, kd::precision_set<kd::bf16, kd::bf16>> distill;
  distill.options.map = &map;
  kd::metrics_logger<kd::log_every<25>> logger(&std::cout);

  const std::span<const std::int32_t> lab(labels_d, labels.size());
  const auto logits_c = kd::matrix_view<const T>(logits, n, vs);
  const auto dlogits = kd::matrix_view<T>(logits, n, vs);  // the gradient overwrites the logits in place
  // KL(teacher || student) at T = 1, forward only: the yardstick, independent of the schedules.
  auto kl_at_t1 = [&] {
    kd::logit_kd<kd::forward_kl, kd::token_mean, kd::precision_set<kd::bf16, kd::bf16>> eval;
    eval.options.map = &map;
    kd::check(kd::cuda::gemm_rm(blas, n, vs, d, hidden, d, false, w, d, true, logits, vs, 0.f));
    kd::cuda::device_loss out{losses + 2, nullptr};
    kd::check(eval(gpu, kd::matrix_view<const T>(teacher, n, vt), logits_c, lab, out));
    kd::check(ctx.sync_status());
    float h = 0;
    cuda_check(cudaMemcpy(&h, losses + 2, sizeof h, cudaMemcpyDeviceToHost), "cudaMemcpy");
    return static_cast<double>(h);
  };
  const double kl_before = kl_at_t1();
  for (long long step = 1; step <= steps; ++step) {
    kd::check(kd::cuda::gemm_rm(blas, n, vs, d, hidden, d, false, w, d, true, logits, vs, 0.f));
    // KD writes its gradient to kd_grad; then the LM loss overwrites the logits with its own gradient
    // in place (each block reads its slice into shared memory before writing it).
    distill.options.temperature = objective.temperature_at(step);
    distill.options.grad_scale = objective.weight("kd", step);
    kd::cuda::device_loss kd_out{losses + 2, nullptr};
    kd::check(distill(gpu, kd::matrix_view<const T>(teacher, n, vt), logits_c, lab, kd_out, kd::matrix_view<T>(kd_grad, n, vs)));
    lm.options.grad_scale = objective.weight("lm", step);
    lm.options.z_loss_weight = objective.weight("z_loss", step);
    kd::cuda::device_cross_entropy lm_out{losses, losses + 1, nullptr};
    kd::check(lm(gpu, logits_c, lab, lm_out, dlogits));
    // dW = (dlogits_lm + dlogits_kd)^T hidden, in two accumulating products.
    kd::check(kd::cuda::gemm_rm(blas, vs, d, n, logits, vs, true, hidden, d, false, dw, d, 0.f));
    kd::check(kd::cuda::gemm_rm(blas, vs, d, n, kd_grad, vs, true, hidden, d, false, dw, d, 1.f));
    sgd_kernel<<<1024, 256, 0, ctx.stream()>>>(w, dw, vs * d, 5.0f);
    cuda_check(cudaGetLastError(), "sgd kernel");

    if (step % 25 == 0 || step == 1) {  // the logger's cadence; step 1 joins the first window
      kd::check(ctx.sync_status());  // data errors (labels, NaN) surface here, named
      float h[3];
      cuda_check(cudaMemcpy(h, losses, sizeof h, cudaMemcpyDeviceToHost), "cudaMemcpy");
      kd::objective_evaluation ev;
      kd::check(objective.combine(step, {{"lm", h[0]}, {"z_loss", h[1]}, {"kd", h[2]}}, ev));
      kd::record(logger, ev);
      kd::check(logger.end_step(step));
    }
  }
  kd::check(logger.finish());
  const double kl_after = kl_at_t1();
  std::printf("KL(teacher || student) at T = 1 over the shared vocabulary: %.4f before, %.4f after %lld steps\n",
              kl_before, kl_after, steps);
  for (void* p : {static_cast<void*>(hidden), static_cast<void*>(w), static_cast<void*>(teacher),
                  static_cast<void*>(labels_d), static_cast<void*>(logits), static_cast<void*>(kd_grad), static_cast<void*>(dw),
                  static_cast<void*>(losses)})
    cudaFree(p);
  return kl_after < kl_before ? 0 : 1;
}

}  // namespace

int main() {
  try {
    return run();
  } catch (const std::exception& e) {
    std::fprintf(stderr, "kd_distill_cuda: %s\n", e.what());
    return 2;
  }
}
