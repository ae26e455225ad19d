// kd_bench_vocab_parallel: the vocabulary-parallel KD and cross-entropy (kd/loss/vocab_parallel.cuh) over
// R GPUs of this host against the fused one-GPU kernels, forward + backward, bf16 logits, T = 2.
// Prints a markdown table: per shape and op, the one-GPU kernel's time and bandwidth (minimum bytes:
// read teacher + student, write the gradient), then for R = 1 (solo communicator: the extra passes
// alone), 2, 4, 8 ranks (NCCL, one thread per GPU, each with a V / R slice) the time per call and the
// bandwidth per rank over its slice, and that bandwidth as a fraction of the one-GPU kernel's (the
// issue's target: >= 80%). Also the device-to-device copy bandwidth of GPU 0.
//   kd_bench_vocab_parallel [--rows N] [--iters K]
#include <cuda_runtime.h>
#include <nccl.h>

#include <barrier>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include <kd/cuda/context.cuh>
#include <kd/cuda/nccl.cuh>
#include <kd/kd.hpp>
#include <kd/loss/vocab_parallel.cuh>

#include "bench_cuda_util.cuh"

namespace {

using kd::index_t;
using bf16 = kd::bfloat16;

using kd_bench::fill_normal;

struct slice_data {
  bf16 *t = nullptr, *s = nullptr, *g = nullptr;
  std::int32_t* labels = nullptr;
  float* value = nullptr;
  slice_data(index_t n, index_t w, index_t vocab, std::uint64_t seed) {
    const auto e = static_cast<std::size_t>(n * w);
    kd_bench::or_exit(cudaMalloc(&t, e * sizeof(bf16)), "malloc");
    kd_bench::or_exit(cudaMalloc(&s, e * sizeof(bf16)), "malloc");
    kd_bench::or_exit(cudaMalloc(&g, e * sizeof(bf16)), "malloc");
    kd_bench::or_exit(cudaMalloc(&labels, static_cast<std::size_t>(n) * sizeof(std::int32_t)), "malloc");
    kd_bench::or_exit(cudaMalloc(&value, 4 * sizeof(float)), "malloc");
    fill_normal(t, e, 3.0, seed);
    fill_normal(s, e, 2.0, seed + 1);
    std::vector<std::int32_t> l(static_cast<std::size_t>(n));
    for (index_t i = 0; i < n; ++i) l[static_cast<std::size_t>(i)] = static_cast<std::int32_t>((i * 7919) % vocab);
    kd_bench::or_exit(cudaMemcpy(labels, l.data(), l.size() * sizeof(std::int32_t), cudaMemcpyHostToDevice), "upload");
  }
  ~slice_data() {
    cudaFree(t);
    cudaFree(s);
    cudaFree(g);
    cudaFree(labels);
    cudaFree(value);
  }
};

template <class D>
using kd_loss_of = kd::logit_kd<D, kd::token_mean, kd::precision_set<kd::bf16, kd::bf16>>;
using ce_loss = kd::cross_entropy<kd::token_mean, kd::bf16>;

enum class op { fkl, rkl, jsd, ce };
const char* name(op o) { return o == op::fkl ? "forward KL" : o == op::rkl ? "reverse KL" : o == op::jsd ? "JSD" : "cross-entropy"; }

template <class L>
L configured(index_t vocab) {
  L l;
  l.options.temperature = 2.0;
  l.options.vocab = vocab;
  return l;
}

// One call of the op on a [n x w] slice at offset a of a vocabulary of `cols` columns (`vocab` real).
kd::status call(op o, kd::cuda::context& ctx, kd::communicator* comm, slice_data& d, index_t n, index_t w, index_t a,
                index_t cols, index_t vocab) {
  const kd::cuda::backend be{&ctx};
  const kd::matrix_view<const bf16> t(d.t, n, w), s(d.s, n, w);
  const kd::matrix_view<bf16> g(d.g, n, w);
  const std::span<const std::int32_t> labels(d.labels, static_cast<std::size_t>(n));
  const kd::vocab_slice slice{a, cols};
  kd::cuda::device_loss out{d.value, nullptr};
  auto kd_call = [&](auto loss) -> kd::status {
    if (comm == nullptr) return loss(be, t, s, labels, out, g);
    return kd::vocab_parallel_kd(be, loss, *comm, slice, t, s, labels, out, g);
  };
  switch (o) {
    case op::fkl: return kd_call(configured<kd_loss_of<kd::forward_kl>>(vocab));
    case op::rkl: return kd_call(configured<kd_loss_of<kd::reverse_kl>>(vocab));
    case op::jsd: return kd_call(configured<kd_loss_of<kd::jsd>>(vocab));
    case op::ce: {
      ce_loss ce;
      ce.options.vocab = vocab;
      kd::cuda::device_cross_entropy co{d.value, d.value + 1, nullptr};
      if (comm == nullptr) return ce(be, s, labels, co, g);
      return kd::vocab_parallel_cross_entropy(be, ce, *comm, slice, s, labels, co, g);
    }
  }
  return {};
}

// Mean ms per call over `iters` calls after two warm-up calls, by CUDA events on the context's stream.
// `ready` runs after the warm-up (the ranks' barrier: no rank's events time another's late start).
double time_calls(kd::cuda::context& ctx, int iters, const std::function<void()>& fn,
                  const std::function<void()>& ready = {}) {
  fn();
  fn();
  kd_bench::or_exit(ctx.sync_status(), "warm-up");
  if (ready) ready();
  cudaEvent_t a, b;
  kd_bench::or_exit(cudaEventCreate(&a), "event");
  kd_bench::or_exit(cudaEventCreate(&b), "event");
  kd_bench::or_exit(cudaEventRecord(a, ctx.stream()), "event");
  for (int i = 0; i < iters; ++i) fn();
  kd_bench::or_exit(cudaEventRecord(b, ctx.stream()), "event");
  kd_bench::or_exit(ctx.sync_status(), "timed calls");
  float ms = 0;
  kd_bench::or_exit(cudaEventElapsedTime(&ms, a, b), "event");
  cudaEventDestroy(a);
  cudaEventDestroy(b);
  return static_cast<double>(ms) / iters;
}

}  // namespace

int main(int argc, char** argv) {
  index_t rows = 8192;
  int iters = 20;
  for (int i = 1; i + 1 < argc; i += 2) {
    if (std::strcmp(argv[i], "--rows") == 0) rows = std::atoll(argv[i + 1]);
    else if (std::strcmp(argv[i], "--iters") == 0) iters = std::atoi(argv[i + 1]);
  }
  int devices = 0;
  kd_bench::or_exit(cudaGetDeviceCount(&devices), "cudaGetDeviceCount");
  cudaDeviceProp prop{};
  kd_bench::or_exit(cudaGetDeviceProperties(&prop, 0), "properties");
  std::printf("kd_bench_vocab_parallel: %d x %s, %lld rows, bf16 logits, T = 2, forward + backward, %d calls each\n", devices,
              prop.name, static_cast<long long>(rows), iters);
  std::printf("device-to-device copy bandwidth (GPU 0): %.2f TB/s\n\n", kd_bench::copy_bandwidth());
  std::vector<int> rank_counts{1};
  for (int r = 2; r <= devices; r *= 2) rank_counts.push_back(r);
  std::printf("| op | N x V | one GPU fused ms | TB/s |");
  for (int r : rank_counts) std::printf(" %d rank%s ms | TB/s per rank | vs fused |", r, r > 1 ? "s" : " (solo)");
  std::printf("\n|---|---|---:|---:|");
  for (std::size_t i = 0; i < rank_counts.size(); ++i) std::printf("---:|---:|---:|");
  std::printf("\n");
  for (const index_t V : {50304, 128256, 151936}) {
    const index_t vocab = V == 50304 ? 50257 : V == 151936 ? 151643 : V;
    for (op o : {op::fkl, op::rkl, op::jsd, op::ce}) {
      const double kd_bytes = static_cast<double>(rows) * static_cast<double>(V) * 2.0 * (o == op::ce ? 2.0 : 3.0);
      double fused_ms = 0;
      {
        kd_bench::or_exit(cudaSetDevice(0), "device");
        kd::cuda::context ctx;
        slice_data d(rows, V, vocab, 11);
        fused_ms = time_calls(ctx, iters, [&] { kd_bench::or_exit(call(o, ctx, nullptr, d, rows, V, 0, V, vocab), "fused call"); });
      }
      const double fused_bw = kd_bytes / (fused_ms * 1e-3) / 1e12;
      std::printf("| %s | %lld x %lld | %.3f | %.2f |", name(o), static_cast<long long>(rows), static_cast<long long>(V), fused_ms, fused_bw);
      for (int R : rank_counts) {
        // Slices of whole 16-byte vectors: V / R rounded to a multiple of 8 columns, the last takes the rest.
        std::vector<index_t> cut{0};
        for (int r = 1; r < R; ++r) cut.push_back(V * r / R / 8 * 8);
        cut.push_back(V);
        double ms = 0;
        ncclUniqueId id;
        if (R > 1 && ncclGetUniqueId(&id) != ncclSuccess) {
          std::fprintf(stderr, "kd_bench_vocab_parallel: ncclGetUniqueId failed\n");
          return 1;
        }
        std::barrier<> start(R);
        std::vector<std::thread> th;
        for (int r = 0; r < R; ++r)
          th.emplace_back([&, r] {
            kd_bench::or_exit(cudaSetDevice(r), "device");
            kd::cuda::context ctx;
            const index_t a = cut[static_cast<std::size_t>(r)], w = cut[static_cast<std::size_t>(r) + 1] - a;
            slice_data d(rows, w, vocab, 11 + static_cast<std::uint64_t>(r));
            std::unique_ptr<kd::cuda::nccl_communicator> nccl;
            kd::solo_communicator solo;
            kd::communicator* comm = &solo;
            if (R > 1) {
              kd_bench::or_exit(kd::cuda::nccl_communicator::create(ctx, r, R, id, std::chrono::minutes(2), nccl), "NCCL group");
              comm = nccl.get();
            }
            const double t = time_calls(ctx, iters, [&] { kd_bench::or_exit(call(o, ctx, comm, d, rows, w, a, V, vocab), "vocab-parallel call"); },
                                      [&] { start.arrive_and_wait(); });
            if (r == 0) ms = t;
          });
        for (auto& t : th) t.join();
        const double per_rank = kd_bytes / R / (ms * 1e-3) / 1e12;
        std::printf(" %.3f | %.2f | %.0f%% |", ms, per_rank, 100.0 * per_rank / fused_bw);
      }
      std::printf("\n");
      std::fflush(stdout);
    }
  }
  return 0;
}
