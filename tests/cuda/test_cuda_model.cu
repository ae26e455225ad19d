// The whole model on the CUDA backend against the fp64 CPU reference backend: same weights (rounded to
// the GPU's storage type), same tokens; logits, hidden states, attention maps, router outputs and every
// parameter gradient, for the tiny presets and a small one whose head_dim (64) takes the tensor-core
// attention path.
#include <doctest/doctest.h>

#include <cmath>
#include <cstdint>
#include <random>
#include <string>
#include <vector>

#include <kd/cuda/context.cuh>
#include <kd/model/config.hpp>
#include <kd/model/cuda/ops.cuh>
#include <kd/model/ops_cpu.hpp>
#include <kd/model/parameters.hpp>
#include <kd/model/transformer.hpp>

#include "gpu_util.cuh"

namespace km = kd::model;

namespace {

km::moe_config small_teacher() {
  km::moe_config c = km::tiny_teacher();
  c.vocab_size = 3001;
  c.hidden_size = 256;
  c.num_hidden_layers = 3;
  c.num_attention_heads = 4;
  c.num_key_value_heads = 2;
  c.head_dim = 64;
  c.moe_intermediate_size = 128;
  c.intermediate_size = 384;
  c.num_experts = 8;
  c.num_experts_per_tok = 2;
  c.mlp_only_layers = {1};
  c.bos_token_id = c.eos_token_id = 0;
  return c;
}

km::dense_config small_student() {
  km::dense_config c = km::tiny_student();
  c.vocab_size = 2003;
  c.hidden_size = 192;
  c.num_hidden_layers = 3;
  c.num_attention_heads = 3;
  c.num_key_value_heads = 1;
  c.head_dim = 64;
  c.intermediate_size = 512;
  c.bos_token_id = c.eos_token_id = 0;
  return c;
}

std::vector<double> normal_vec(std::size_t n, std::mt19937_64& rng) {
  std::normal_distribution<double> d(0.0, 1.0);
  std::vector<double> v(n);
  for (auto& x : v) x = d(rng);
  return v;
}

template <class T>
struct tolerances {
  double out, grad;
};

template <class T>
void compare_with_cpu(const km::arch& a, std::int64_t batch, std::int64_t seq, double range) {
  auto& rng = kd_test::rng();
  using cpu_b = km::cpu_ops<double>;
  using gpu_b = km::cuda_ops<T>;
  cpu_b cb;
  km::transformer<cpu_b> ref(cb, a);
  REQUIRE(ref.allocate(true));
  kd::cuda::context ctx;
  gpu_b gb(ctx);
  km::transformer<gpu_b> gpu(gb, a);
  REQUIRE(gpu.allocate(true));

  // Same weights on both sides: drawn in double, rounded to T, the CPU reference gets the rounded values.
  const std::size_t P = ref.table().size();
  std::vector<T> w(P);
  std::normal_distribution<double> nd(0.0, range);
  for (const km::param_entry& e : ref.table().entries())
    for (std::size_t i = 0; i < e.numel; ++i) {
      const double v = e.kind == km::param_kind::norm ? 1.0 + 0.2 * nd(rng) / range : nd(rng);
      w[e.offset + i] = kd::store_as<T>(v);
      ref.params()[e.offset + i] = kd::load_as<double>(w[e.offset + i]);
    }
  REQUIRE(gb.upload(w.data(), P, gpu.params()));

  const std::int64_t n = batch * seq;
  std::uniform_int_distribution<std::int64_t> tok(0, a.vocab - 1);
  std::vector<km::index_t> ids(static_cast<std::size_t>(n));
  for (auto& t : ids) t = static_cast<km::index_t>(tok(rng));
  km::forward_options opt;
  opt.attention_layers = {a.num_layers() - 1};
  // The reference replays the GPU's expert choices: in bf16 about 1% of tokens meet a router near-tie that
  // rounding decides differently from fp64, which would compare two different functions. (fp32 choices
  // are also checked to equal the reference's own below.)
  REQUIRE(gpu.forward(ids, batch, seq, opt));
  const std::int64_t L = a.num_layers(), last = L - 1;
  std::vector<std::vector<km::index_t>> routing(static_cast<std::size_t>(L));
  for (std::int64_t l = 0; l < L; ++l)
    if (a.layers[static_cast<std::size_t>(l)].moe) {
      routing[static_cast<std::size_t>(l)].resize(static_cast<std::size_t>(n * a.top_k));
      REQUIRE(gb.download(gpu.expert_ids(l), routing[static_cast<std::size_t>(l)].size(),
                          routing[static_cast<std::size_t>(l)].data()));
    }
  if (sizeof(T) == 4) {
    REQUIRE(ref.forward(ids, batch, seq, opt));
    for (std::int64_t l = 0; l < L; ++l)
      for (std::size_t i = 0; i < routing[static_cast<std::size_t>(l)].size(); ++i)
        CHECK(routing[static_cast<std::size_t>(l)][i] == ref.expert_ids(l)[i]);
  }
  km::forward_options replay = opt;
  replay.replay_routing = &routing;
  REQUIRE(ref.forward(ids, batch, seq, replay));

  auto fetch = [&](const T* p, std::size_t count) {
    std::vector<T> h(count);
    REQUIRE(gb.download(p, count, h.data()));
    return kd_test::to_double(h);
  };
  const tolerances<T> tol = sizeof(T) == 2 ? tolerances<T>{3e-2, 6e-2} : tolerances<T>{2e-5, 1e-4};
  const std::size_t NV = static_cast<std::size_t>(n * a.vocab), NH = static_cast<std::size_t>(n * a.hidden);
  const std::vector<double> logits_ref(ref.logits(), ref.logits() + NV);
  const auto logits_gpu = fetch(gpu.logits(), NV);
  CHECK(kd_test::rel_error(logits_gpu, logits_ref) < tol.out);
  CHECK(kd_test::rel_error(fetch(gpu.final_hidden(), NH), std::vector<double>(ref.final_hidden(), ref.final_hidden() + NH)) <
        tol.out);
  const std::size_t maps = static_cast<std::size_t>(batch * a.heads * seq * seq);
  CHECK(kd_test::rel_error(fetch(gpu.attention(last), maps),
                           std::vector<double>(ref.attention(last), ref.attention(last) + maps)) < tol.out);
  for (std::int64_t l = 0; l < L; ++l) {
    if (!a.layers[static_cast<std::size_t>(l)].moe) continue;
    const std::size_t ne = static_cast<std::size_t>(n * a.experts);
    std::vector<float> p(ne);
    REQUIRE(gb.download(gpu.router_probs(l), ne, p.data()));
    CHECK(kd_test::rel_error(std::vector<double>(p.begin(), p.end()),
                             std::vector<double>(ref.router_probs(l), ref.router_probs(l) + ne)) < tol.out);
    std::int64_t total = 0;
    for (auto c : gpu.expert_counts(l)) total += c;
    CHECK(total == n * a.top_k);
  }

  // Backward from a random gradient on the logits and one on a hidden state.
  std::vector<double> dl = normal_vec(NV, rng), dh = normal_vec(NH, rng);
  std::vector<T> dl_t(NV), dh_t(NH);
  for (std::size_t i = 0; i < NV; ++i) {
    dl_t[i] = kd::store_as<T>(dl[i]);
    dl[i] = kd::load_as<double>(dl_t[i]);
  }
  for (std::size_t i = 0; i < NH; ++i) {
    dh_t[i] = kd::store_as<T>(dh[i]);
    dh[i] = kd::load_as<double>(dh_t[i]);
  }
  auto dl_d = gb.template alloc<T>(NV);
  auto dh_d = gb.template alloc<T>(NH);
  REQUIRE(gb.upload(dl_t.data(), NV, dl_d.data()));
  REQUIRE(gb.upload(dh_t.data(), NH, dh_d.data()));
  typename km::transformer<cpu_b>::grads_in gr;
  gr.d_logits = dl.data();
  gr.d_hidden = {{0, dh.data()}};
  typename km::transformer<gpu_b>::grads_in gg;
  gg.d_logits = dl_d.data();
  gg.d_hidden = {{0, dh_d.data()}};
  REQUIRE(ref.zero_grads());
  REQUIRE(ref.backward(gr));
  // The GPU side overwrites a stale arena instead (grad_mode::overwrite): it must match zero + accumulate.
  const std::vector<T> stale(P, kd::store_as<T>(3.0));
  REQUIRE(gb.upload(stale.data(), P, gpu.grads()));
  REQUIRE(gpu.backward(gg, km::grad_mode::overwrite));
  const auto grads = fetch(gpu.grads(), P);
  for (const km::param_entry& e : ref.table().entries()) {
    std::vector<double> g(grads.begin() + static_cast<std::ptrdiff_t>(e.offset),
                          grads.begin() + static_cast<std::ptrdiff_t>(e.offset + e.numel));
    std::vector<double> r(ref.grads() + e.offset, ref.grads() + e.offset + e.numel);
    INFO("gradient of " << e.name);
    CHECK(kd_test::rel_error(g, r) < tol.grad);
  }
}

}  // namespace

TEST_CASE_TEMPLATE("cuda model: tiny teacher and student match the fp64 CPU backend", T, float, kd::bfloat16) {
  compare_with_cpu<T>(km::make_arch(km::tiny_teacher()), 2, 7, 0.3);
  compare_with_cpu<T>(km::make_arch(km::tiny_student()), 2, 7, 0.3);
}

TEST_CASE_TEMPLATE("cuda model: small teacher and student (head_dim 64) match the fp64 CPU backend", T, float,
                   kd::bfloat16) {
  compare_with_cpu<T>(km::make_arch(small_teacher()), 2, 96, 0.08);
  compare_with_cpu<T>(km::make_arch(small_student()), 2, 96, 0.08);
}

// The CUDA kernels' limits (kd/model/cuda_limits.hpp) stop a model at allocate(), before any memory is
// taken and long before its first forward.
TEST_CASE("cuda model: allocate() rejects what the CUDA kernels cannot run, naming the limit") {
  kd::cuda::context ctx;
  km::cuda_ops<float> gpu(ctx);
  auto allocate = [&](const km::moe_config& c) {
    km::transformer<km::cuda_ops<float>> m(gpu, km::make_arch(c));
    const kd::status s = m.allocate(true);
    if (!s.ok()) CHECK(m.params() == nullptr);  // nothing allocated
    return s;
  };
  km::moe_config c = km::tiny_teacher();
  c.num_experts = 257;
  kd::status s = allocate(c);
  CHECK(s.code() == kd::errc::invalid_argument);
  CHECK(s.message().find("E = 257 exceeds the CUDA router's 256 experts") != std::string::npos);

  c = km::tiny_teacher();
  c.num_experts = 16;
  c.num_experts_per_tok = 9;
  s = allocate(c);
  CHECK(s.code() == kd::errc::invalid_argument);
  CHECK(s.message().find("k = 9 exceeds the CUDA router's top-8") != std::string::npos);

  CHECK(allocate(km::tiny_teacher()).ok());
}
