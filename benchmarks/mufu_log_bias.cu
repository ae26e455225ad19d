// kd_mufu_log_bias: how much MUFU.LG2 (lg2.approx, the kernels' fast_log2) moves the value of JSD and
// skew KL, against log2f and fp64, on rows shaped like the tests' close distributions (teacher logits
// ~ N(0, 2), student 0.9 teacher + offset + N(0, 0.3)). A table, no timing. What it showed (H100 and
// H200, 2026-12-05, benchmarks/NOTES.md session 11): the approximation's error is not centred on zero,
// so it adds up over a row; skew KL's value moved by 9e-6 to 9e-4 relative through it, by 2e-8 to 1.6e-6
// through log2f, and JSD's by 3e-5 to 1.3e-4 (log2f: 2e-7 to 6.5e-7). With the kernels' MUFU.EX2 p and q
// and log2f, what is left is the exponentials' error: 8e-7 to 1.4e-5 (7e-5 where the value is 0.09 bits).
// Exit code 77 without a GPU.
#include <cuda_runtime.h>

#include <cmath>
#include <cstdio>
#include <random>
#include <vector>

#include <kd/cuda/detail/reduce.cuh>

namespace {

using kd::cuda::detail::fast_exp2;
using kd::cuda::detail::fast_log2;

constexpr int kThreads = 256;
constexpr int kSums = 5;

// Per row, summed in double (so only the logs and exponentials differ): [0] float p and m, logs in
// double; [1] fast_log2; [2] log2f; then as the kernels form p and q (fast_exp2) and sum in float,
// [3] with fast_log2, [4] with log2f. Skew KL: sum p (log2 p - log2 m); JSD: sum a p (log2 p - log2 m)
// + (1 - a) q (log2 q - log2 m).
__global__ void row_values(const float* dt, const float* ds, long long v, float a, bool jsd, double* out) {
  const long long r = blockIdx.x;
  double s[kSums] = {};
  float f3 = 0.f, f4 = 0.f;
  const float a1 = 1.f - a;
  for (long long j = threadIdx.x; j < v; j += blockDim.x) {
    const float t = dt[r * v + j], u = ds[r * v + j];
    const float p = static_cast<float>(exp2(static_cast<double>(t))), q = static_cast<float>(exp2(static_cast<double>(u)));
    const float m = a * p + a1 * q;
    if (!(m >= 1.17549435e-38f)) continue;
    const double lms[3] = {log2(static_cast<double>(m)), fast_log2(m), log2f(m)};
    for (int k = 0; k < 3; ++k)
      s[k] += jsd ? a * static_cast<double>(p) * (t - lms[k]) + a1 * static_cast<double>(q) * (u - lms[k])
                  : static_cast<double>(p) * (t - lms[k]);
    const float pk = fast_exp2(t), qk = fast_exp2(u), mk = a * pk + a1 * qk;
    const float l3 = fast_log2(mk), l4 = log2f(mk);
    f3 += jsd ? a * pk * (t - l3) + a1 * qk * (u - l3) : pk * (t - l3);
    f4 += jsd ? a * pk * (t - l4) + a1 * qk * (u - l4) : pk * (t - l4);
  }
  s[3] = f3;
  s[4] = f4;
  __shared__ double red[kSums][kThreads];
  for (int k = 0; k < kSums; ++k) red[k][threadIdx.x] = s[k];
  __syncthreads();
  if (threadIdx.x == 0)
    for (int k = 0; k < kSums; ++k) {
      double x = 0.0;
      for (int i = 0; i < kThreads; ++i) x += red[k][i];
      out[r * kSums + k] = x;
    }
}

struct row_case {
  long long n, v;
  double temperature, offset;
  float a;
  bool jsd;
};

}  // namespace

int main() {
  int devices = 0;
  if (cudaGetDeviceCount(&devices) != cudaSuccess || devices == 0) {
    std::printf("kd_mufu_log_bias: no CUDA device\n");
    return 77;
  }
  std::mt19937_64 rng(42);
  std::printf("| divergence | N x V | T | offset | a | value (bits) | float p, m; fp64 log | MUFU.LG2 | log2f | "
              "kernel-like: MUFU.LG2 | kernel-like: log2f |\n|---|---|---|---|---|---|---|---|---|---|---|\n");
  const row_case cases[] = {{300, 32000, 1.0, -30.0, 0.2f, false}, {100, 50304, 2.0, 400.0, 0.2f, false},
                            {100, 50304, 1.0, 0.0, 0.5f, false},   {100, 151936, 2.0, 0.0, 0.8f, false},
                            {100, 50304, 1.0, 0.0, 0.3f, true},    {100, 50304, 2.0, 30.0, 0.3f, true}};
  for (const row_case& c : cases) {
    std::normal_distribution<double> teacher(0.0, 2.0), noise(0.0, 0.3);
    std::vector<float> dt(static_cast<std::size_t>(c.n * c.v)), ds(dt.size());
    std::vector<double> yt(static_cast<std::size_t>(c.v)), ys(yt.size());
    double exact = 0.0;
    for (long long r = 0; r < c.n; ++r) {
      double mt = -INFINITY, ms = -INFINITY;
      for (long long j = 0; j < c.v; ++j) {
        const float x = static_cast<float>(teacher(rng));
        const float y = static_cast<float>(0.9 * x + c.offset + static_cast<float>(noise(rng)));
        yt[j] = x / c.temperature * M_LOG2E;
        ys[j] = y / c.temperature * M_LOG2E;
        mt = std::max(mt, yt[j]);
        ms = std::max(ms, ys[j]);
      }
      double st = 0.0, ss = 0.0;
      for (long long j = 0; j < c.v; ++j) {
        st += exp2(yt[j] - mt);
        ss += exp2(ys[j] - ms);
      }
      const double lt = mt + log2(st), ls = ms + log2(ss);
      for (long long j = 0; j < c.v; ++j) {
        const double a = yt[j] - lt, b = ys[j] - ls, p = exp2(a), q = exp2(b), m = c.a * p + (1.0 - c.a) * q;
        dt[r * c.v + j] = static_cast<float>(a);
        ds[r * c.v + j] = static_cast<float>(b);
        exact += c.jsd ? c.a * p * (a - log2(m)) + (1.0 - c.a) * q * (b - log2(m)) : p * (a - log2(m));
      }
    }
    float *ddt = nullptr, *dds = nullptr;
    double* dout = nullptr;
    if (cudaMalloc(&ddt, dt.size() * sizeof(float)) != cudaSuccess || cudaMalloc(&dds, ds.size() * sizeof(float)) != cudaSuccess ||
        cudaMalloc(&dout, static_cast<std::size_t>(c.n) * kSums * sizeof(double)) != cudaSuccess) {
      std::printf("kd_mufu_log_bias: cudaMalloc failed\n");
      return 1;
    }
    cudaMemcpy(ddt, dt.data(), dt.size() * sizeof(float), cudaMemcpyHostToDevice);
    cudaMemcpy(dds, ds.data(), ds.size() * sizeof(float), cudaMemcpyHostToDevice);
    row_values<<<static_cast<unsigned>(c.n), kThreads>>>(ddt, dds, c.v, c.a, c.jsd, dout);
    std::vector<double> out(static_cast<std::size_t>(c.n) * kSums);
    if (cudaMemcpy(out.data(), dout, out.size() * sizeof(double), cudaMemcpyDeviceToHost) != cudaSuccess) {
      std::printf("kd_mufu_log_bias: kernel failed\n");
      return 1;
    }
    double total[kSums] = {};
    for (long long r = 0; r < c.n; ++r)
      for (int k = 0; k < kSums; ++k) total[k] += out[static_cast<std::size_t>(r) * kSums + k];
    std::printf("| %s | %lld x %lld | %.0f | %.0f | %.1f | %.4g |", c.jsd ? "JSD" : "skew KL", c.n, c.v, c.temperature,
                c.offset, static_cast<double>(c.a), exact);
    for (int k = 0; k < kSums; ++k) std::printf(" %.2e |", (total[k] - exact) / exact);
    std::printf("\n");
    cudaFree(ddt);
    cudaFree(dds);
    cudaFree(dout);
  }
  return 0;
}
