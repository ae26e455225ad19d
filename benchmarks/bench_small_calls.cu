// kd_bench_small_calls: the cost of a loss call at small N (evaluation, per-sequence calls), where launch
// and planning dominate (issue 12's bar: under 10 us per call). Per op and N, bf16 logits of 50,304
// columns: host us per call (enqueueing 200 calls back to back, no synchronisation), GPU us per call
// (CUDA events around those 200 calls: kernels plus the gaps between them), and GPU us per call when one
// captured call is replayed as a CUDA graph 200 times; and the overhead: the direct GPU time minus the
// time the call's minimum bytes (read the inputs, write the gradient) take at the card's measured copy
// bandwidth, i.e. what a call costs beyond streaming its data. The copy rate is reached only by transfers
// far larger than these calls, so the table also times a one-launch streaming kernel over the call's own
// arrays (stream_arrays: the same bytes read and written in 16-byte vectors) and gives kd's time beyond
// that: the launch, ramp and tail any kernel of that traffic pays at this size are not counted against
// the call there. Prints a markdown table.
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <vector>

#include <kd/cuda/context.cuh>
#include <kd/kd.cuh>

#include "bench_cuda_util.cuh"

namespace {

using kd::index_t;
using bf16 = kd::bfloat16;

using kd_bench::or_exit;
using kd_bench::stream_arrays;

struct timing {
  double host_us, gpu_us, graph_us;
};

timing measure(kd::cuda::context& ctx, const std::function<kd::status()>& call) {
  constexpr int K = 200;
  const auto direct = kd_bench::time_calls(ctx.stream(), [&] { or_exit(call(), "call"); }, K);
  or_exit(ctx.sync_status(), "calls");
  cudaGraph_t graph = nullptr;
  cudaGraphExec_t exec = nullptr;
  or_exit(cudaStreamBeginCapture(ctx.stream(), cudaStreamCaptureModeGlobal), "begin capture");
  or_exit(call(), "captured call");
  or_exit(cudaStreamEndCapture(ctx.stream(), &graph), "end capture");
  or_exit(cudaGraphInstantiate(&exec, graph, 0), "instantiate");
  const auto replay =
      kd_bench::time_calls(ctx.stream(), [&] { or_exit(cudaGraphLaunch(exec, ctx.stream()), "graph launch"); }, K, kd_bench::statistic::mean, 1);
  or_exit(ctx.sync_status(), "graph replays");
  cudaGraphExecDestroy(exec);
  cudaGraphDestroy(graph);
  return {direct.host_us, direct.gpu_us, replay.gpu_us};
}

}  // namespace

int main() {
  const index_t V = 50304, vocab = 50257, max_n = 512;
  cudaDeviceProp prop{};
  or_exit(cudaGetDeviceProperties(&prop, 0), "properties");
  const double copy_tbs = kd_bench::copy_bandwidth();
  std::printf("kd_bench_small_calls: %s, bf16 logits, V = %lld (%lld real), labels on the device; copy %.2f TB/s\n\n",
              prop.name, static_cast<long long>(V), static_cast<long long>(vocab), copy_tbs);
  // us to stream `arrays` N x V bf16 arrays at copy bandwidth
  auto stream_us = [&](index_t n, int arrays) { return arrays * 2.0 * static_cast<double>(n * V) / (copy_tbs * 1e12) * 1e6; };
  const auto e = static_cast<std::size_t>(max_n * V);
  bf16 *t = nullptr, *s = nullptr, *g = nullptr;
  std::int32_t* labels = nullptr;
  float* value = nullptr;
  or_exit(cudaMalloc(&t, e * sizeof(bf16)), "malloc");
  or_exit(cudaMalloc(&s, e * sizeof(bf16)), "malloc");
  or_exit(cudaMalloc(&g, e * sizeof(bf16)), "malloc");
  or_exit(cudaMalloc(&labels, max_n * sizeof(std::int32_t)), "malloc");
  or_exit(cudaMalloc(&value, 2 * sizeof(float)), "malloc");
  kd_bench::fill_normal(t, e, 2.0, 7);
  or_exit(cudaMemcpy(s, t, e * sizeof(bf16), cudaMemcpyDeviceToDevice), "copy");
  {
    std::vector<std::int32_t> l(max_n);
    for (index_t i = 0; i < max_n; ++i) l[static_cast<std::size_t>(i)] = static_cast<std::int32_t>((i * 7919) % vocab);
    or_exit(cudaMemcpy(labels, l.data(), l.size() * sizeof(std::int32_t), cudaMemcpyHostToDevice), "upload");
  }
  std::printf("| op | N | host us / call | GPU us / call | graph replay GPU us / call | GPU us beyond streaming | "
              "streaming kernel GPU us | GPU us beyond the streaming kernel |\n"
              "|---|---:|---:|---:|---:|---:|---:|---:|\n");
  for (const index_t n : {1, 16, 64, 256, 512}) {
    cudaStream_t stream = nullptr;  // capturable (the legacy default stream is not)
    or_exit(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking), "stream");
    kd::cuda::context ctx(stream);
    const kd::cuda::backend be{&ctx};
    const kd::matrix_view<const bf16> tv(t, n, V), sv(s, n, V);
    const kd::matrix_view<bf16> gv(g, n, V);
    const std::span<const std::int32_t> lv(labels, static_cast<std::size_t>(n));
    kd::logit_kd<kd::forward_kl, kd::token_mean, kd::precision_set<kd::bf16, kd::bf16>> kdl;
    kdl.options.temperature = 2.0;
    kdl.options.vocab = vocab;
    kd::cuda::device_loss out{value, nullptr};
    // The streaming kernel over the call's arrays: 2 read and 1 written (logit_kd), 1 and 1 (cross-entropy).
    const long long n16 = n * V * static_cast<long long>(sizeof(bf16)) / 16;
    const int blocks = kd_bench::stream_blocks(n16, prop.multiProcessorCount);
    auto streaming = [&](const bf16* a, const bf16* b) {
      return measure(ctx, [&]() -> kd::status {
        stream_arrays<<<blocks, 256, 0, ctx.stream()>>>(reinterpret_cast<const uint4*>(a), reinterpret_cast<const uint4*>(b),
                                                        reinterpret_cast<uint4*>(g), n16);
        return kd::cuda::detail::cuda_status(cudaGetLastError(), "stream_arrays");
      });
    };
    const timing a = measure(ctx, [&] { return kdl(be, tv, sv, lv, out, gv); });
    const timing sa = streaming(t, s);
    std::printf("| logit_kd forward KL | %lld | %.1f | %.1f | %.1f | %.1f | %.1f | %.1f |\n", static_cast<long long>(n), a.host_us,
                a.gpu_us, a.graph_us, a.gpu_us - stream_us(n, 3), sa.gpu_us, a.gpu_us - sa.gpu_us);
    kd::cross_entropy<kd::token_mean, kd::bf16> ce;
    ce.options.vocab = vocab;
    kd::cuda::device_cross_entropy co{value, value + 1, nullptr};
    const timing c = measure(ctx, [&] { return ce(be, sv, lv, co, gv); });
    const timing sc = streaming(s, nullptr);
    std::printf("| cross-entropy | %lld | %.1f | %.1f | %.1f | %.1f | %.1f | %.1f |\n", static_cast<long long>(n), c.host_us,
                c.gpu_us, c.graph_us, c.gpu_us - stream_us(n, 2), sc.gpu_us, c.gpu_us - sc.gpu_us);
    std::fflush(stdout);
    or_exit(ctx.sync_status(), "end");
    cudaStreamDestroy(stream);
  }
  return 0;
}
