// The fused losses inside a CUDA graph (issue 12: small calls are graph-capturable): after one warm-up
// call has grown the context's scratch and made its error word, a call allocates nothing and never
// synchronises the host, so it can be captured once (global capture mode: any synchronising or
// allocating call would invalidate the capture) and replayed on new inputs written into the same buffers.
// Each replay's loss and gradient equal a direct call's on the same inputs, bit for bit.
#include <doctest/doctest.h>

#include <functional>
#include <vector>

#include <kd/cuda/context.cuh>
#include <kd/kd.hpp>
#include <kd/loss/vocab_parallel.cuh>

#include "gpu_util.cuh"

namespace {

using namespace kd_test;
using kd::index_t;
using bf16 = kd::bfloat16;

// Captures call() on the context's stream and replays it three times, each on fresh inputs (refill(k)
// writes draw k into the same buffers), comparing the replay's outputs with a direct call's on draw k.
void check_capture(kd::cuda::context& ctx, const std::function<void(int)>& refill, const std::function<kd::status()>& call,
                   const std::function<std::vector<float>()>& outputs) {
  refill(0);
  REQUIRE(call().ok());  // warm-up: scratch and error word exist from here on
  REQUIRE(ctx.sync_status().ok());
  const std::size_t scratch = ctx.scratch_capacity();
  cudaGraph_t graph = nullptr;
  REQUIRE(cudaStreamBeginCapture(ctx.stream(), cudaStreamCaptureModeGlobal) == cudaSuccess);
  const kd::status captured = call();
  REQUIRE(cudaStreamEndCapture(ctx.stream(), &graph) == cudaSuccess);
  REQUIRE_MESSAGE(captured.ok(), captured.message());
  CHECK(ctx.scratch_capacity() == scratch);  // nothing allocated inside the call
  cudaGraphExec_t exec = nullptr;
  REQUIRE(cudaGraphInstantiate(&exec, graph, 0) == cudaSuccess);
  for (int round = 0; round < 3; ++round) {
    CAPTURE(round);
    refill(round + 1);
    REQUIRE(call().ok());
    REQUIRE(ctx.sync_status().ok());
    const auto direct = outputs();
    refill(round + 1);  // the same inputs again
    REQUIRE(cudaGraphLaunch(exec, ctx.stream()) == cudaSuccess);
    REQUIRE(ctx.sync_status().ok());
    const auto replayed = outputs();
    CHECK(replayed == direct);
  }
  cudaGraphExecDestroy(exec);
  cudaGraphDestroy(graph);
}

}  // namespace

TEST_CASE("logit_kd, cross_entropy and vocab_parallel_kd calls are captured in a CUDA graph and replayed") {
  for (const index_t n : {1, 64, 512}) {
    CAPTURE(n);
    const index_t V = 50304, vocab = 50257;
    // A stream of its own: the legacy default stream (a context's default) cannot be captured.
    cudaStream_t stream = nullptr;
    REQUIRE(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking) == cudaSuccess);
    kd::cuda::context ctx(stream);
    device_buffer<bf16> t(static_cast<std::size_t>(n * V)), s(static_cast<std::size_t>(n * V)), g(static_cast<std::size_t>(n * V));
    device_buffer<std::int32_t> labels(static_cast<std::size_t>(n));
    device_buffer<float> value(2);
    std::uint64_t seed = 0;
    auto refill = [&](int k) {
      std::mt19937_64 r(seed + static_cast<std::uint64_t>(k));
      t.upload(random_storage<bf16>(t.count, 3.0, r));
      s.upload(random_storage<bf16>(s.count, 2.0, r));
      std::vector<std::int32_t> l(static_cast<std::size_t>(n));
      for (auto& x : l) x = static_cast<std::int32_t>(r() % vocab);
      l[0] = kd::default_ignore_index;
      labels.upload(l);
    };
    auto outputs = [&] {
      std::vector<float> out = value.download();
      for (const bf16 x : g.download()) out.push_back(kd::load_as<float>(x));
      return out;
    };
    const kd::matrix_view<const bf16> tv(t.data, n, V), sv(s.data, n, V);
    const kd::matrix_view<bf16> gv(g.data, n, V);
    const std::span<const std::int32_t> lv(labels.data, static_cast<std::size_t>(n));
    SUBCASE("logit_kd") {
      kd::logit_kd<kd::reverse_kl, kd::token_mean, kd::precision_set<kd::bf16, kd::bf16>> loss;
      loss.options.temperature = 2.0;
      loss.options.vocab = vocab;
      kd::cuda::device_loss out{value.data, nullptr};
      seed = rng()();  // fresh inputs every run
      check_capture(ctx, refill, [&] { return loss(kd::cuda::backend{&ctx}, tv, sv, lv, out, gv); }, outputs);
    }
    SUBCASE("cross_entropy") {
      kd::cross_entropy<kd::token_mean, kd::bf16> ce;
      ce.options.vocab = vocab;
      ce.options.z_loss_weight = 1e-4;
      kd::cuda::device_cross_entropy out{value.data, value.data + 1, nullptr};
      seed = rng()();  // fresh inputs every run
      check_capture(ctx, refill, [&] { return ce(kd::cuda::backend{&ctx}, sv, lv, out, gv); }, outputs);
    }
    SUBCASE("vocab_parallel_kd, one slice") {
      kd::logit_kd<kd::forward_kl, kd::token_mean, kd::precision_set<kd::bf16, kd::bf16>> loss;
      loss.options.temperature = 2.0;
      loss.options.vocab = vocab;
      kd::solo_communicator solo;
      kd::cuda::device_loss out{value.data, nullptr};
      seed = rng()();  // fresh inputs every run
      check_capture(ctx, refill,
                    [&] { return kd::vocab_parallel_kd(kd::cuda::backend{&ctx}, loss, solo, kd::vocab_slice{0, V}, tv, sv, lv, out, gv); },
                    outputs);
    }
    REQUIRE(ctx.sync_status().ok());
    cudaStreamDestroy(stream);
  }
}
