// kd_model: the reference models from the command line: HF configs and checkpoints, logits, and a
// training-step benchmark. scripts/hf_compare.py drives it against transformers; benchmarks/ time it.
//
//   kd_model config --arch teacher|student --preset tiny|demo|seed --out DIR
//   kd_model init   --arch teacher|student --preset tiny|demo|seed --out DIR [--seed N] [--dtype float32|bfloat16]
//   kd_model logits --model DIR --tokens FILE --out FILE [--backend cpu|cuda] [--dtype float32|float64|bfloat16]
//                   [--routing-out FILE] [--routing-in FILE]   (MoE: write / replay "layers.L.expert_ids")
//   kd_model tokens --model DIR --batch B --seq T --out FILE [--seed N]   (random ids in the model's vocabulary)
//   kd_model bench  --arch teacher|student --preset tiny|demo|seed --batch B --seq T [--steps N] [--warmup W]
//                   [--profile 1]   (then a per-op GPU-time table of one extra step goes to stderr)
//
// Built as CUDA (kd_model.cu includes this file with KD_MODEL_CUDA) wherever kd::cuda exists; the CPU build
// has every command except --backend cuda and bench.
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <iostream>
#include <map>
#include <random>
#include <string>
#include <vector>

#include <kd/io/atomic_file.hpp>
#include <kd/io/safetensors.hpp>
#include <kd/model/checkpoint.hpp>
#include <kd/model/config.hpp>
#include <kd/io/config_json.hpp>
#include <kd/model/ops_cpu.hpp>
#include <kd/model/transformer.hpp>

#if defined(KD_MODEL_CUDA)
#include <kd/loss/cross_entropy.cuh>
#include <kd/model/cuda/ops.cuh>
#include <kd/model/cuda/profiled_ops.cuh>
#endif

namespace {

using kd::status;
using kd::errc;
namespace km = kd::model;

struct args {
  std::string command;
  std::map<std::string, std::string> kv;
  [[nodiscard]] std::string get(const std::string& k, const std::string& fallback = "") const {
    auto it = kv.find(k);
    return it == kv.end() ? fallback : it->second;
  }
  [[nodiscard]] bool has(const std::string& k) const { return kv.count(k) != 0; }
};

status parse(int argc, char** argv, args& a) {
  if (argc < 2) return {errc::invalid_argument, "usage: kd_model config|init|logits|bench --key value ..."};
  a.command = argv[1];
  for (int i = 2; i < argc; i += 2) {
    std::string k = argv[i];
    if (k.rfind("--", 0) != 0 || i + 1 >= argc)
      return {errc::invalid_argument, "expected --key value pairs, got '" + k + "'"};
    a.kv[k.substr(2)] = argv[i + 1];
  }
  return {};
}

status require(const args& a, std::initializer_list<const char*> keys) {
  for (const char* k : keys)
    if (!a.has(k)) return {errc::invalid_argument, a.command + ": --" + std::string(k) + " is required"};
  return {};
}

status preset_config(const args& a, km::any_config& out) {
  const std::string arch = a.get("arch"), preset = a.get("preset");
  if (arch == "teacher") {
    if (preset == "seed") out = km::seed_teacher();
    else if (preset == "demo") out = km::demo_teacher();
    else if (preset == "tiny") out = km::tiny_teacher();
    else return {errc::invalid_argument, "--preset must be tiny, demo or seed, got '" + preset + "'"};
  } else if (arch == "student") {
    if (preset == "seed") out = km::seed_student();
    else if (preset == "demo") out = km::demo_student();
    else if (preset == "tiny") out = km::tiny_student();
    else return {errc::invalid_argument, "--preset must be tiny, demo or seed, got '" + preset + "'"};
  } else {
    return {errc::invalid_argument, "--arch must be teacher or student, got '" + arch + "'"};
  }
  if (a.has("dtype")) {
    const std::string d = a.get("dtype");
    km::weight_dtype w;
    if (d == "float32") w = km::weight_dtype::float32;
    else if (d == "bfloat16") w = km::weight_dtype::bfloat16;
    else if (d == "float16") w = km::weight_dtype::float16;
    else return {errc::invalid_argument, "--dtype must be float32, bfloat16 or float16, got '" + d + "'"};
    std::visit([&](auto& c) { c.dtype = w; }, out);
  }
  return {};
}

status write_config(const km::any_config& c, const std::string& dir) {
  std::error_code ec;
  std::filesystem::create_directories(dir, ec);
  if (ec) return {errc::io_error, "cannot create '" + dir + "': " + ec.message()};
  std::string json;
  KD_TRY(std::visit([&](const auto& x) { return km::to_json(x, json); }, c));
  return kd::io::write_file_atomic((std::filesystem::path(dir) / "config.json").string(), json);
}

status cmd_config(const args& a) {
  KD_TRY(require(a, {"arch", "preset", "out"}));
  km::any_config c;
  KD_TRY(preset_config(a, c));
  return write_config(c, a.get("out"));
}

status cmd_init(const args& a) {
  KD_TRY(require(a, {"arch", "preset", "out"}));
  km::any_config c;
  KD_TRY(preset_config(a, c));
  KD_TRY(km::check_supported(c));
  km::cpu_ops<float> cpu;
  km::transformer<km::cpu_ops<float>> m(cpu, km::make_arch(c));
  KD_TRY(m.allocate(false));
  const double range = std::visit([](const auto& x) { return x.initializer_range; }, c);
  KD_TRY(m.initialize(range, std::stoull(a.get("seed", "0"))));
  return std::visit([&](const auto& x) { return km::save_checkpoint(m, x, a.get("out")); }, c);
}

// Token ids [batch, seq] from a safetensors file ("input_ids", any integer dtype).
status read_tokens(const std::string& path, std::vector<km::index_t>& ids, std::int64_t& batch, std::int64_t& seq) {
  kd::io::safetensors_file f;
  KD_TRY(kd::io::safetensors_file::open(path, f));
  const kd::io::tensor_info* t = f.find("input_ids");
  if (t == nullptr) return {errc::io_error, path + ": no tensor 'input_ids'"};
  if (t->shape.size() != 2) return {errc::shape_mismatch, path + ": input_ids must be [batch, seq]"};
  batch = t->shape[0];
  seq = t->shape[1];
  std::vector<std::int64_t> wide;
  KD_TRY(f.read("input_ids", wide));
  ids.resize(wide.size());
  for (std::size_t i = 0; i < wide.size(); ++i) {
    if (wide[i] < 0 || wide[i] > 2147483647) return {errc::out_of_range, path + ": input_ids holds " + std::to_string(wide[i])};
    ids[i] = static_cast<km::index_t>(wide[i]);
  }
  return {};
}

status cmd_tokens(const args& a) {
  KD_TRY(require(a, {"model", "batch", "seq", "out"}));
  km::any_config c;
  KD_TRY(km::read_config(a.get("model"), c));
  const std::int64_t vocab = km::make_arch(c).vocab;
  const std::int64_t batch = std::stoll(a.get("batch")), seq = std::stoll(a.get("seq"));
  if (batch <= 0 || seq <= 0) return {errc::invalid_argument, "tokens: --batch and --seq must be positive"};
  std::mt19937_64 rng(std::stoull(a.get("seed", "0")));
  std::uniform_int_distribution<std::int32_t> d(0, static_cast<std::int32_t>(vocab - 1));
  std::vector<std::int32_t> ids(static_cast<std::size_t>(batch * seq));
  for (auto& t : ids) t = d(rng);
  return kd::io::write_safetensors(a.get("out"), {kd::io::make_tensor("input_ids", ids, {batch, seq})});
}

template <class B>
status run_logits(B& backend, const km::any_config& c, const args& a) {
  using T = typename B::value_type;
  km::transformer<B> m(backend, km::make_arch(c));
  KD_TRY(m.allocate(false));
  KD_TRY(km::load_weights(m, a.get("model")));
  std::vector<km::index_t> ids;
  std::int64_t batch = 0, seq = 0;
  KD_TRY(read_tokens(a.get("tokens"), ids, batch, seq));
  km::forward_options opt;
  opt.training = false;
  const km::arch& ar = m.arch();
  const std::int64_t n = batch * seq;
  std::vector<std::vector<km::index_t>> replay;
  if (a.has("routing-in")) {  // "layers.L.expert_ids" [tokens, top_k] for every MoE layer
    kd::io::safetensors_file f;
    KD_TRY(kd::io::safetensors_file::open(a.get("routing-in"), f));
    replay.resize(static_cast<std::size_t>(ar.num_layers()));
    for (std::int64_t l = 0; l < ar.num_layers(); ++l)
      if (ar.layers[static_cast<std::size_t>(l)].moe) {
        std::vector<std::int64_t> wide;
        KD_TRY(f.read("layers." + std::to_string(l) + ".expert_ids", wide));
        if (static_cast<std::int64_t>(wide.size()) != n * ar.top_k)
          return {errc::shape_mismatch, a.get("routing-in") + ": layers." + std::to_string(l) +
                                            ".expert_ids does not hold tokens x top_k ids"};
        replay[static_cast<std::size_t>(l)].assign(wide.begin(), wide.end());
      }
    opt.replay_routing = &replay;
  }
  KD_TRY(m.forward(ids, batch, seq, opt));
  if (a.has("routing-out")) {  // the choices and probabilities of every MoE layer
    std::vector<std::vector<std::int32_t>> e_store;
    std::vector<std::vector<float>> p_store;
    std::vector<kd::io::tensor_to_write> t;
    for (std::int64_t l = 0; l < ar.num_layers(); ++l) {
      if (!ar.layers[static_cast<std::size_t>(l)].moe) continue;
      auto& e = e_store.emplace_back(static_cast<std::size_t>(n * ar.top_k));
      KD_TRY(backend.download(m.expert_ids(l), e.size(), e.data()));
      std::vector<typename B::acc_type> probs(static_cast<std::size_t>(n * ar.experts));
      KD_TRY(backend.download(m.router_probs(l), probs.size(), probs.data()));
      auto& p = p_store.emplace_back(probs.begin(), probs.end());
      t.push_back(kd::io::make_tensor("layers." + std::to_string(l) + ".expert_ids", e, {n, ar.top_k}));
      t.push_back(kd::io::make_tensor("layers." + std::to_string(l) + ".router_probs", p, {n, ar.experts}));
    }
    KD_TRY(kd::io::write_safetensors(a.get("routing-out"), t));
  }
  const std::int64_t V = m.arch().vocab;
  std::vector<T> host(static_cast<std::size_t>(batch * seq * V));
  KD_TRY(backend.download(m.logits(), host.size(), host.data()));
  std::vector<float> out(host.size());
  for (std::size_t i = 0; i < host.size(); ++i) out[i] = kd::load_as<float>(host[i]);
  return kd::io::write_safetensors(a.get("out"), {kd::io::make_tensor("logits", out, {batch, seq, V})});
}

status cmd_logits(const args& a) {
  KD_TRY(require(a, {"model", "tokens", "out"}));
  km::any_config c;
  KD_TRY(km::read_config(a.get("model"), c));
  KD_TRY(km::check_supported(c));
  const std::string backend = a.get("backend", "cpu"), dtype = a.get("dtype", "float32");
  if (backend == "cpu") {
    if (dtype == "float32") {
      km::cpu_ops<float> b;
      return run_logits(b, c, a);
    }
    if (dtype == "float64") {
      km::cpu_ops<double> b;
      return run_logits(b, c, a);
    }
    return {errc::invalid_argument, "--backend cpu takes --dtype float32 or float64, got '" + dtype + "'"};
  }
#if defined(KD_MODEL_CUDA)
  if (backend == "cuda") {
    kd::cuda::context ctx;
    if (dtype == "float32") {
      km::cuda_ops<float> b(ctx);
      return run_logits(b, c, a);
    }
    if (dtype == "bfloat16") {
      km::cuda_ops<kd::bfloat16> b(ctx);
      return run_logits(b, c, a);
    }
    return {errc::invalid_argument, "--backend cuda takes --dtype float32 or bfloat16, got '" + dtype + "'"};
  }
#endif
  return {errc::invalid_argument, "--backend '" + backend + "' is not available in this build"};
}

#if defined(KD_MODEL_CUDA)
status cuda_check(cudaError_t e, const char* what) { return kd::cuda::detail::cuda_status(e, what); }

// One training step = forward, next-token cross-entropy (fused kernel, gradient in place of the logits),
// backward to every parameter gradient; no optimizer. Timed with events over `steps` after `warmup`.
status cmd_bench(const args& a) {
  KD_TRY(require(a, {"arch", "preset", "batch", "seq"}));
  km::any_config c;
  KD_TRY(preset_config(a, c));
  KD_TRY(km::check_supported(c));
  const std::int64_t batch = std::stoll(a.get("batch")), seq = std::stoll(a.get("seq"));
  const int steps = std::stoi(a.get("steps", "20")), warmup = std::stoi(a.get("warmup", "5"));
  using T = kd::bfloat16;
  using B = km::profiled_ops<T>;  // timing off for the measured steps; one profiled step at the end
  std::size_t free0 = 0, total = 0;
  KD_TRY(cuda_check(cudaMemGetInfo(&free0, &total), "cudaMemGetInfo"));
  kd::cuda::context ctx;
  B backend(ctx);
  backend.enable(false);
  km::transformer<B> m(backend, km::make_arch(c));
  KD_TRY(m.allocate(true));
  const double range = std::visit([](const auto& x) { return x.initializer_range; }, c);
  KD_TRY(m.initialize(range, 1234));
  const std::int64_t n = batch * seq, V = m.arch().vocab;
  std::mt19937_64 rng(7);
  std::uniform_int_distribution<std::int64_t> tok(0, V - 1);
  std::vector<km::index_t> ids(static_cast<std::size_t>(n));
  for (auto& t : ids) t = static_cast<km::index_t>(tok(rng));
  // Labels: the next token of the same sequence; the last position of each sequence is ignored.
  std::vector<std::int32_t> labels(static_cast<std::size_t>(n));
  for (std::int64_t i = 0; i < n; ++i)
    labels[static_cast<std::size_t>(i)] = (i % seq == seq - 1) ? -100 : ids[static_cast<std::size_t>(i + 1)];
  auto labels_d = backend.template alloc<std::int32_t>(labels.size());
  auto loss_d = backend.template alloc<float>(2);
  KD_TRY(backend.upload(labels.data(), labels.size(), labels_d.data()));
  const kd::cuda::backend gpu{&ctx};
  kd::cross_entropy<kd::token_mean, kd::bf16> ce;
  km::forward_options opt;
  opt.training = true;
  auto step = [&]() -> status {  // gradients overwritten (no zeroing pass), as PyTorch's set_to_none
    KD_TRY(m.forward(ids, batch, seq, opt));
    T* logits = m.logits();
    kd::cuda::device_cross_entropy out{loss_d.data(), nullptr, nullptr};
    KD_TRY(backend.time("cross_entropy", [&] {
      return ce(gpu, kd::matrix_view<const T>(logits, n, V),
                std::span<const std::int32_t>(labels_d.data(), labels.size()), out, kd::matrix_view<T>(logits, n, V));
    }));
    typename km::transformer<B>::grads_in g;
    g.d_logits = logits;
    return m.backward(g, km::grad_mode::overwrite);
  };
  for (int i = 0; i < warmup; ++i) KD_TRY(step());
  KD_TRY(ctx.sync_status());
  cudaEvent_t e0, e1;
  KD_TRY(cuda_check(cudaEventCreate(&e0), "cudaEventCreate"));
  KD_TRY(cuda_check(cudaEventCreate(&e1), "cudaEventCreate"));
  std::vector<float> ms;
  for (int i = 0; i < steps; ++i) {
    KD_TRY(cuda_check(cudaEventRecord(e0, ctx.stream()), "cudaEventRecord"));
    KD_TRY(step());
    KD_TRY(cuda_check(cudaEventRecord(e1, ctx.stream()), "cudaEventRecord"));
    KD_TRY(cuda_check(cudaEventSynchronize(e1), "cudaEventSynchronize"));
    float t = 0;
    KD_TRY(cuda_check(cudaEventElapsedTime(&t, e0, e1), "cudaEventElapsedTime"));
    ms.push_back(t);
  }
  KD_TRY(ctx.sync_status());
  float loss = 0;
  KD_TRY(backend.download(loss_d.data(), 1, &loss));
  std::size_t free1 = 0;
  KD_TRY(cuda_check(cudaMemGetInfo(&free1, &total), "cudaMemGetInfo"));
  std::sort(ms.begin(), ms.end());
  if (a.get("profile", "0") != "0") {
    // One more step with every op bracketed by events: where the step's GPU time goes (stderr).
    backend.enable(true);
    backend.reset();
    KD_TRY(step());
    std::vector<B::row> rows;
    KD_TRY(backend.report(rows));
    backend.enable(false);
    double total = 0;
    for (const auto& r : rows) total += r.ms;
    std::fprintf(stderr, "| op | calls | ms | share |\n|---|---|---|---|\n");
    for (const auto& r : rows)
      std::fprintf(stderr, "| %s | %lld | %.3f | %.1f%% |\n", r.op.c_str(), r.calls, r.ms, 100.0 * r.ms / total);
    std::fprintf(stderr, "| (sum of ops) | | %.3f | step median %.3f ms |\n", total, ms.empty() ? 0.0 : ms[ms.size() / 2]);
  }
  const double med = ms.empty() ? 0.0 : ms[ms.size() / 2];
  const double tps = static_cast<double>(n) / (med / 1e3);
  const double mfu = km::training_flops_per_token(m.arch(), seq) * tps / 989e12;
  cudaDeviceProp prop{};
  cudaGetDeviceProperties(&prop, 0);
  std::printf(
      "{\"impl\":\"kd\",\"arch\":\"%s\",\"preset\":\"%s\",\"batch\":%lld,\"seq\":%lld,\"ms_per_step\":%.3f,"
      "\"tokens_per_s\":%.1f,\"mfu\":%.4f,\"peak_mem_gb\":%.2f,\"loss\":%.4f,\"gpu\":\"%s\"}\n",
      a.get("arch").c_str(), a.get("preset").c_str(), static_cast<long long>(batch), static_cast<long long>(seq), med,
      tps, mfu, static_cast<double>(free0 - free1) / 1e9, static_cast<double>(loss), prop.name);
  cudaEventDestroy(e0);
  cudaEventDestroy(e1);
  return {};
}
#endif

}  // namespace

int main(int argc, char** argv) {
  args a;
  status s = parse(argc, argv, a);
  if (s) {
    if (a.command == "config") s = cmd_config(a);
    else if (a.command == "init") s = cmd_init(a);
    else if (a.command == "logits") s = cmd_logits(a);
    else if (a.command == "tokens") s = cmd_tokens(a);
#if defined(KD_MODEL_CUDA)
    else if (a.command == "bench") s = cmd_bench(a);
#endif
    else s = {errc::invalid_argument, "unknown command '" + a.command + "' (config, init, tokens, logits, bench)"};
  }
  if (!s) {
    std::fprintf(stderr, "kd_model: %s: %s\n", std::string(kd::to_string(s.code())).c_str(), s.message().c_str());
    return 1;
  }
  return 0;
}
