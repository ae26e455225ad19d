// The model layer on the CPU reference backend: whole-model gradients against central finite differences
// (fp64, tiny presets, every output a loss can use), forward invariants, and HF checkpoints in and out.
#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <random>
#include <string>
#include <vector>

#include <kd/io/atomic_file.hpp>
#include <kd/io/safetensors.hpp>
#include <kd/model/checkpoint.hpp>
#include <kd/model/cuda_limits.hpp>
#include <kd/model/ops_cpu.hpp>
#include <kd/model/parameters.hpp>
#include <kd/model/transformer.hpp>

#include "test_util.hpp"

namespace km = kd::model;
using cpu = km::cpu_ops<double>;
using model_t = km::transformer<cpu>;

namespace {

namespace fs = std::filesystem;

using kdtest::temp_dir;

// Random weights of a size where every nonlinearity matters (HF's 0.02 leaves the model nearly linear);
// norm weights drawn around 1 so their gradients are not all alike.
void randomize(model_t& m, std::mt19937_64& rng, double range) {
  std::normal_distribution<double> nd(0.0, range);
  for (const km::param_entry& e : m.table().entries())
    for (std::size_t i = 0; i < e.numel; ++i)
      m.params()[e.offset + i] = e.kind == km::param_kind::norm ? 1.0 + 0.3 * nd(rng) / range : nd(rng);
}

std::vector<km::index_t> random_ids(std::size_t n, std::int64_t vocab, std::mt19937_64& rng) {
  std::uniform_int_distribution<std::int64_t> d(0, vocab - 1);
  std::vector<km::index_t> ids(n);
  for (auto& t : ids) t = static_cast<km::index_t>(d(rng));
  return ids;
}

// L = sum of every output a distillation loss may read, each against fixed random weights.
struct probe {
  std::int64_t batch = 2, seq = 5;
  std::vector<km::index_t> ids;
  km::forward_options opt;
  std::vector<double> r_logits, r_final, r_hidden0, r_embed, r_attn, r_router;
  std::int64_t attn_layer = 1, router_layer = -1;

  probe(const km::arch& a, std::mt19937_64& rng) {
    const std::int64_t n = batch * seq;
    ids = random_ids(static_cast<std::size_t>(n), a.vocab, rng);
    opt.attention_layers = {attn_layer};
    for (std::int64_t l = 0; l < a.num_layers(); ++l)
      if (a.layers[static_cast<std::size_t>(l)].moe) router_layer = l;
    r_logits = kdtest::normal(static_cast<std::size_t>(n * a.vocab), rng);
    r_final = kdtest::normal(static_cast<std::size_t>(n * a.hidden), rng);
    r_hidden0 = kdtest::normal(static_cast<std::size_t>(n * a.hidden), rng);
    r_embed = kdtest::normal(static_cast<std::size_t>(n * a.hidden), rng);
    r_attn = kdtest::normal(static_cast<std::size_t>(batch * a.heads * seq * seq), rng);
    if (router_layer >= 0) r_router = kdtest::normal(static_cast<std::size_t>(n * a.experts), rng);
  }

  static double dot(const double* x, const std::vector<double>& r) {
    double s = 0;
    for (std::size_t i = 0; i < r.size(); ++i) s += x[i] * r[i];
    return s;
  }

  double loss(model_t& m) {
    kd::check(m.forward(ids, batch, seq, opt));
    double l = dot(m.logits(), r_logits) + dot(m.final_hidden(), r_final) + dot(m.hidden(0), r_hidden0) +
               dot(m.hidden(-1), r_embed) + dot(m.attention(attn_layer), r_attn);
    if (router_layer >= 0) l += dot(m.router_logits(router_layer), r_router);
    return l;
  }

  void backward(model_t& m) {
    model_t::grads_in g;
    g.d_logits = r_logits.data();
    g.d_final_hidden = r_final.data();
    g.d_hidden = {{0, r_hidden0.data()}, {-1, r_embed.data()}};
    g.d_attention = {{attn_layer, r_attn.data()}};
    if (router_layer >= 0) g.d_router_logits = {{router_layer, r_router.data()}};
    kd::check(m.zero_grads());
    kd::check(m.backward(g));
  }
};

void check_gradients(const km::arch& a, std::uint64_t seed) {
  std::mt19937_64 rng(seed);
  cpu b;
  model_t m(b, a);
  REQUIRE(m.allocate(true));
  randomize(m, rng, 0.3);
  probe p(a, rng);
  p.loss(m);
  p.backward(m);
  std::vector<double> grad(m.grads(), m.grads() + m.table().size());

  // Every tensor, several random elements each (all of a norm weight's).
  const double h = 1e-5;
  int checked = 0;
  for (const km::param_entry& e : m.table().entries()) {
    std::vector<std::size_t> idx;
    if (e.numel <= 8) {
      for (std::size_t i = 0; i < e.numel; ++i) idx.push_back(i);
    } else {
      std::uniform_int_distribution<std::size_t> d(0, e.numel - 1);
      for (int i = 0; i < 6; ++i) idx.push_back(d(rng));
    }
    for (std::size_t i : idx) {
      double& w = m.params()[e.offset + i];
      const double w0 = w;
      w = w0 + h;
      const double lp = p.loss(m);
      w = w0 - h;
      const double lm = p.loss(m);
      w = w0;
      const double fd = (lp - lm) / (2 * h);
      const double g = grad[e.offset + i];
      INFO(e.name << "[" << i << "]: analytic " << g << ", finite difference " << fd);
      CHECK(std::abs(fd - g) <= 1e-6 + 1e-5 * std::abs(fd));
      ++checked;
    }
  }
  CHECK(checked > 50);
}

}  // namespace

TEST_CASE("model: teacher (Qwen3-MoE) gradients of every output match finite differences (fp64)") {
  check_gradients(km::make_arch(km::tiny_teacher()), std::random_device{}());
}

TEST_CASE("model: teacher with dense and sparse layers, top-1 without renorm (fp64)") {
  km::moe_config c = km::tiny_teacher();
  c.num_hidden_layers = 3;
  c.mlp_only_layers = {1};
  c.num_experts_per_tok = 1;
  c.norm_topk_prob = false;
  REQUIRE(c.validate());
  check_gradients(km::make_arch(c), std::random_device{}());
}

TEST_CASE("model: student (Llama, tied head) gradients match finite differences (fp64)") {
  check_gradients(km::make_arch(km::tiny_student()), std::random_device{}());
}

TEST_CASE("model: backward with grad_mode::overwrite equals zero_grads + accumulate, and accumulate adds") {
  // Teacher with the last expert of every MoE layer left without tokens (routing replay): its weight
  // gradients must come out zero, not stale; student: the tied table collects head and embedding.
  for (const km::arch& a : {km::make_arch(km::tiny_teacher()), km::make_arch(km::tiny_student())}) {
    std::mt19937_64 rng(7);
    cpu b;
    model_t m(b, a);
    REQUIRE(m.allocate(true));
    randomize(m, rng, 0.3);
    probe p(a, rng);
    const std::int64_t n = p.batch * p.seq;
    std::vector<std::vector<km::index_t>> routing(static_cast<std::size_t>(a.num_layers()));
    if (a.experts > 2)
      for (std::int64_t l = 0; l < a.num_layers(); ++l)
        if (a.layers[static_cast<std::size_t>(l)].moe)
          for (std::int64_t t = 0; t < n; ++t)
            for (std::int64_t j = 0; j < a.top_k; ++j)
              routing[static_cast<std::size_t>(l)].push_back(static_cast<km::index_t>((t + j) % (a.experts - 1)));
    if (a.experts > 2) p.opt.replay_routing = &routing;
    p.loss(m);
    p.backward(m);  // zero_grads + accumulate
    const std::vector<double> ref(m.grads(), m.grads() + m.table().size());
    model_t::grads_in g;
    g.d_logits = p.r_logits.data();
    g.d_final_hidden = p.r_final.data();
    g.d_hidden = {{0, p.r_hidden0.data()}, {-1, p.r_embed.data()}};
    g.d_attention = {{p.attn_layer, p.r_attn.data()}};
    if (p.router_layer >= 0) g.d_router_logits = {{p.router_layer, p.r_router.data()}};
    std::fill(m.grads(), m.grads() + m.table().size(), 123.0);  // stale values overwrite must not keep
    REQUIRE(m.backward(g, km::grad_mode::overwrite));
    // Tensor by tensor (the arena pads between tensors; padding is no gradient).
    auto mismatches = [&](double factor) {
      std::size_t bad = 0;
      for (const km::param_entry& e : m.table().entries())
        for (std::size_t i = e.offset; i < e.offset + e.numel; ++i)
          bad += std::abs(m.grads()[i] - factor * ref[i]) > 1e-12 * (1.0 + std::abs(ref[i])) ? 1 : 0;
      return bad;
    };
    CHECK(mismatches(1.0) == 0);
    REQUIRE(m.backward(g, km::grad_mode::accumulate));  // a second micro-batch: twice the gradient
    CHECK(mismatches(2.0) == 0);
    if (a.experts > 2) {  // the unused expert's gradients are exactly zero
      const km::layer_offsets& lo = m.table().layer(0);
      const auto I = a.layers[0].intermediate, H = a.hidden, E = a.experts;
      const double* gu = m.grads() + lo.gate_up + static_cast<std::size_t>((E - 1) * 2 * I * H);
      CHECK(std::all_of(gu, gu + 2 * I * H, [](double v) { return v == 0.0; }));
    }
  }
}

TEST_CASE("model: forward invariants") {
  std::mt19937_64 rng(std::random_device{}());
  const km::arch a = km::make_arch(km::tiny_teacher());
  cpu b;
  model_t m(b, a);
  REQUIRE(m.allocate(true));
  randomize(m, rng, 0.3);
  const std::int64_t batch = 2, seq = 7, n = batch * seq, V = a.vocab;
  auto ids = random_ids(static_cast<std::size_t>(n), V, rng);
  km::forward_options train;
  REQUIRE(m.forward(ids, batch, seq, train));
  const std::vector<double> logits(m.logits(), m.logits() + n * V);

  SUBCASE("inference mode computes the same logits with shared scratch") {
    km::forward_options infer;
    infer.training = false;
    REQUIRE(m.forward(ids, batch, seq, infer));
    CHECK(kdtest::rel_error(std::vector<double>(m.logits(), m.logits() + n * V), logits) == 0.0);
    CHECK(m.backward({}).code() == kd::errc::invalid_argument);
  }
  SUBCASE("causal: a later token never changes an earlier position; sequences are independent") {
    auto ids2 = ids;
    ids2[4] = static_cast<km::index_t>((ids2[4] + 1) % V);  // sequence 0, position 4
    REQUIRE(m.forward(ids2, batch, seq, train));
    for (std::int64_t t = 0; t < n; ++t) {
      const bool same = t < 4 || t >= seq;
      double diff = 0;
      for (std::int64_t v = 0; v < V; ++v) diff = std::max(diff, std::abs(m.logits()[t * V + v] - logits[t * V + v]));
      // Not bit-exact: a changed token can move another token's expert group, and Eigen's GEMM may sum a
      // row in another order at another M (seen: 1.8e-15 on an AVX-512 host).
      if (same) CHECK(diff <= 1e-12);
      else CHECK(diff > 1e-6);
    }
  }
  SUBCASE("routing statistics: every token picks top_k distinct experts; counts add up") {
    for (std::int64_t l = 0; l < a.num_layers(); ++l) {
      const auto counts = m.expert_counts(l);
      std::int64_t total = 0;
      for (auto c : counts) total += c;
      CHECK(total == n * a.top_k);
      for (std::int64_t t = 0; t < n; ++t) {
        const km::index_t* e = m.expert_ids(l) + t * a.top_k;
        CHECK(e[0] != e[1]);
        const double* w = m.expert_weights(l) + t * a.top_k;
        CHECK(w[0] + w[1] == doctest::Approx(1.0).epsilon(1e-12));  // renormalised top-k
        CHECK(w[0] >= w[1]);
      }
    }
  }
  SUBCASE("routing replay: own choices reproduce the forward; other choices change it; bad replays refused") {
    std::vector<std::vector<km::index_t>> routing(static_cast<std::size_t>(a.num_layers()));
    for (std::int64_t l = 0; l < a.num_layers(); ++l)
      routing[static_cast<std::size_t>(l)].assign(m.expert_ids(l), m.expert_ids(l) + n * a.top_k);
    km::forward_options o;
    o.replay_routing = &routing;
    REQUIRE(m.forward(ids, batch, seq, o));
    CHECK(kdtest::rel_error(std::vector<double>(m.logits(), m.logits() + n * V), logits) < 1e-14);
    auto& r0 = routing[0];  // token 0 of layer 0: swap its first choice for an expert it did not pick
    for (km::index_t e = 0; e < a.experts; ++e)
      if (e != r0[0] && e != r0[1]) {
        r0[0] = e;
        break;
      }
    REQUIRE(m.forward(ids, batch, seq, o));
    CHECK(kdtest::rel_error(std::vector<double>(m.logits(), m.logits() + n * V), logits) > 1e-6);
    routing[1][3] = static_cast<km::index_t>(a.experts);
    CHECK(m.forward(ids, batch, seq, o).code() == kd::errc::out_of_range);
    routing[1][3] = routing[1][2];
    CHECK(m.forward(ids, batch, seq, o).code() == kd::errc::invalid_argument);
    routing.pop_back();
    CHECK(m.forward(ids, batch, seq, o).code() == kd::errc::shape_mismatch);
  }
  SUBCASE("bad inputs are named, nothing runs") {
    auto bad = ids;
    bad[3] = static_cast<km::index_t>(V);
    kd::status s = m.forward(bad, batch, seq, train);
    CHECK(s.code() == kd::errc::out_of_range);
    CHECK(kdtest::contains(s.message(), "position 3"));
    CHECK(m.forward(ids, batch, seq + 1, train).code() == kd::errc::shape_mismatch);
    km::forward_options o;
    o.attention_layers = {5};
    CHECK(m.forward(ids, batch, seq, o).code() == kd::errc::out_of_range);
    REQUIRE(m.forward(ids, batch, seq, train));
    model_t::grads_in g;
    std::vector<double> d(static_cast<std::size_t>(batch * a.heads * seq * seq));
    g.d_attention = {{0, d.data()}};
    CHECK(m.backward(g).code() == kd::errc::invalid_argument);  // layer 0's map was not materialised
  }
}

TEST_CASE("model: parameter table matches the configs' HF counts") {
  CHECK(km::parameter_table(km::make_arch(km::seed_teacher())).parameter_count() ==
        static_cast<std::size_t>(km::seed_teacher().parameter_count()));
  CHECK(km::parameter_table(km::make_arch(km::seed_student())).parameter_count() ==
        static_cast<std::size_t>(km::seed_student().parameter_count()));
  CHECK(km::parameter_table(km::make_arch(km::demo_teacher())).parameter_count() ==
        static_cast<std::size_t>(km::demo_teacher().parameter_count()));
  const km::parameter_table t(km::make_arch(km::tiny_teacher()));
  const km::param_entry* e = t.find("model.layers.1.mlp.experts.gate_up_proj");
  REQUIRE(e != nullptr);
  CHECK(e->shape == std::vector<std::int64_t>{4, 32, 32});
  CHECK(t.find("lm_head.weight") != nullptr);
  CHECK(km::parameter_table(km::make_arch(km::tiny_student())).find("lm_head.weight") == nullptr);
}

TEST_CASE("checkpoint: save and load round trip (teacher and student, every dtype)") {
  std::mt19937_64 rng(std::random_device{}());
  temp_dir dir;
  for (auto dtype : {km::weight_dtype::float32, km::weight_dtype::bfloat16}) {
    km::moe_config c = km::tiny_teacher();
    c.dtype = dtype;
    cpu b;
    model_t m(b, km::make_arch(c));
    REQUIRE(m.allocate(false));
    randomize(m, rng, 0.3);
    REQUIRE(km::save_checkpoint(m, c, dir.path.string()));
    km::any_config back;
    REQUIRE(km::read_config(dir.path.string(), back));
    REQUIRE(std::holds_alternative<km::moe_config>(back));
    CHECK(std::get<km::moe_config>(back) == c);
    model_t m2(b, km::make_arch(back));
    REQUIRE(m2.allocate(false));
    REQUIRE(km::load_weights(m2, dir.path.string()));
    for (std::size_t i = 0; i < m.table().size(); ++i) {
      const double expect = dtype == km::weight_dtype::float32
                                ? static_cast<double>(static_cast<float>(m.params()[i]))
                                : static_cast<double>(static_cast<float>(kd::bfloat16(static_cast<float>(m.params()[i]))));
      if (m2.params()[i] != expect) {
        FAIL("parameter " << i << " differs after the round trip");
        break;
      }
    }
  }
  km::dense_config s = km::tiny_student();
  s.dtype = km::weight_dtype::float32;
  cpu b;
  model_t m(b, km::make_arch(s));
  REQUIRE(m.allocate(false));
  randomize(m, rng, 0.3);
  REQUIRE(km::save_checkpoint(m, s, dir.path.string()));
  model_t m2(b, km::make_arch(s));
  REQUIRE(m2.allocate(false));
  REQUIRE(km::load_weights(m2, dir.path.string()));
  CHECK(std::equal(m.params(), m.params() + m.table().size(), m2.params(),
                   [](double x, double y) { return static_cast<double>(static_cast<float>(x)) == y; }));
}

namespace {
// Writes the tensors of `m` to DIR/model.safetensors in float32, edited by `edit`.
template <class Edit>
void write_edited(const model_t& m, const fs::path& dir, Edit edit) {
  std::vector<std::vector<float>> data;
  std::vector<kd::io::tensor_to_write> out;
  data.reserve(m.table().entries().size() * 8 + 8);
  for (const km::param_entry& e : m.table().entries()) {
    auto& v = data.emplace_back(m.params() + e.offset, m.params() + e.offset + e.numel);
    out.push_back(kd::io::make_tensor(e.name, v, e.shape));
  }
  edit(out, data);
  REQUIRE(kd::io::write_safetensors((dir / "model.safetensors").string(), out));
}
}  // namespace

TEST_CASE("checkpoint: corrupt or foreign checkpoints are rejected with the tensor named") {
  std::mt19937_64 rng(std::random_device{}());
  temp_dir dir;
  const km::arch a = km::make_arch(km::tiny_teacher());
  cpu b;
  model_t m(b, a);
  REQUIRE(m.allocate(false));
  randomize(m, rng, 0.3);
  model_t dst(b, a);
  REQUIRE(dst.allocate(false));
  using list = std::vector<kd::io::tensor_to_write>;
  using store = std::vector<std::vector<float>>;

  SUBCASE("missing tensor") {
    write_edited(m, dir.path, [](list& out, store&) {
      out.erase(std::find_if(out.begin(), out.end(),
                             [](auto& t) { return t.name == "model.layers.1.self_attn.k_norm.weight"; }));
    });
    kd::status s = km::load_weights(dst, dir.path.string());
    CHECK(s.code() == kd::errc::io_error);
    CHECK(kdtest::contains(s.message(), "model.layers.1.self_attn.k_norm.weight"));
  }
  SUBCASE("wrong shape") {
    write_edited(m, dir.path, [](list& out, store&) {
      for (auto& t : out)
        if (t.name == "model.layers.0.self_attn.q_proj.weight") t.shape = {16, 64};  // same element count, other shape
    });
    kd::status s = km::load_weights(dst, dir.path.string());
    CHECK(s.code() == kd::errc::shape_mismatch);
    CHECK(kdtest::contains(s.message(), "q_proj"));
  }
  SUBCASE("a tensor the model does not have") {
    write_edited(m, dir.path, [](list& out, store& data) {
      auto& v = data.emplace_back(4, 1.0f);
      out.push_back(kd::io::make_tensor("model.layers.7.mlp.gate.weight", v, {2, 2}));
    });
    kd::status s = km::load_weights(dst, dir.path.string());
    CHECK(s.code() == kd::errc::io_error);
    CHECK(kdtest::contains(s.message(), "model.layers.7.mlp.gate.weight"));
  }
  SUBCASE("experts stored one tensor per expert load into the fused layout") {
    write_edited(m, dir.path, [&](list& out, store& data) {
      list kept;
      for (auto& t : out) {
        const bool gu = t.name.ends_with("experts.gate_up_proj"), dn = t.name.ends_with("experts.down_proj");
        if (!gu && !dn) {
          kept.push_back(t);
          continue;
        }
        const std::string base = t.name.substr(0, t.name.rfind('.') + 1);
        const auto* src = reinterpret_cast<const float*>(t.data.data());
        const std::int64_t E = t.shape[0], r = t.shape[1], c = t.shape[2];
        for (std::int64_t e = 0; e < E; ++e) {
          if (gu)
            for (int part = 0; part < 2; ++part) {
              auto& v = data.emplace_back(src + (e * r + part * r / 2) * c, src + (e * r + (part + 1) * r / 2) * c);
              kept.push_back(kd::io::make_tensor(base + std::to_string(e) + (part ? ".up_proj.weight" : ".gate_proj.weight"),
                                                 v, {r / 2, c}));
            }
          else {
            auto& v = data.emplace_back(src + e * r * c, src + (e + 1) * r * c);
            kept.push_back(kd::io::make_tensor(base + std::to_string(e) + ".down_proj.weight", v, {r, c}));
          }
        }
      }
      out = kept;
    });
    REQUIRE(km::load_weights(dst, dir.path.string()));
    CHECK(std::equal(m.params(), m.params() + m.table().size(), dst.params(),
                     [](double x, double y) { return static_cast<double>(static_cast<float>(x)) == y; }));
  }
  SUBCASE("not a checkpoint") {
    kd::status s = km::load_weights(dst, (dir.path / "nothing").string());
    CHECK(s.code() == kd::errc::io_error);
  }
}

TEST_CASE("model: initialize draws N(0, range) for matrices and 1 for norms, reproducibly") {
  cpu b;
  model_t m(b, km::make_arch(km::tiny_teacher())), m2(b, km::make_arch(km::tiny_teacher()));
  REQUIRE(m.allocate(false));
  REQUIRE(m2.allocate(false));
  REQUIRE(m.initialize(0.02, 42));
  REQUIRE(m2.initialize(0.02, 42));
  CHECK(std::equal(m.params(), m.params() + m.table().size(), m2.params()));
  double s = 0, s2 = 0;
  std::size_t n = 0;
  for (const km::param_entry& e : m.table().entries())
    for (std::size_t i = 0; i < e.numel; ++i) {
      const double v = m.params()[e.offset + i];
      if (e.kind == km::param_kind::norm) {
        CHECK(v == 1.0);
        continue;
      }
      s += v;
      s2 += v * v;
      ++n;
    }
  const double mean = s / static_cast<double>(n), sd = std::sqrt(s2 / static_cast<double>(n) - mean * mean);
  CHECK(std::abs(mean) < 5 * 0.02 / std::sqrt(static_cast<double>(n)));
  CHECK(sd == doctest::Approx(0.02).epsilon(0.02));
  REQUIRE(m2.initialize(0.02, 43));
  CHECK(!std::equal(m.params(), m.params() + m.table().size(), m2.params()));
}

TEST_CASE("checkpoint: sharded checkpoints load through the index; a tied model may carry lm_head") {
  std::mt19937_64 rng(std::random_device{}());
  temp_dir dir;
  const km::arch a = km::make_arch(km::tiny_student());
  cpu b;
  model_t m(b, a);
  REQUIRE(m.allocate(false));
  randomize(m, rng, 0.3);
  // Two shards, split by tensor, plus the HF index naming them; the tied head given too.
  std::vector<std::vector<float>> data;
  std::vector<kd::io::tensor_to_write> first, second;
  nlohmann::json index = {{"metadata", {{"total_size", 0}}}, {"weight_map", nlohmann::json::object()}};
  std::size_t i = 0;
  for (const km::param_entry& e : m.table().entries()) {
    auto& v = data.emplace_back(m.params() + e.offset, m.params() + e.offset + e.numel);
    const bool one = i++ % 2 == 0;
    (one ? first : second).push_back(kd::io::make_tensor(e.name, v, e.shape));
    index["weight_map"][e.name] = one ? "model-00001-of-00002.safetensors" : "model-00002-of-00002.safetensors";
  }
  const km::param_entry* emb = m.table().find("model.embed_tokens.weight");
  REQUIRE(emb != nullptr);
  auto& head = data.emplace_back(m.params() + emb->offset, m.params() + emb->offset + emb->numel);
  second.push_back(kd::io::make_tensor("lm_head.weight", head, emb->shape));
  index["weight_map"]["lm_head.weight"] = "model-00002-of-00002.safetensors";
  REQUIRE(kd::io::write_safetensors((dir.path / "model-00001-of-00002.safetensors").string(), first));
  REQUIRE(kd::io::write_safetensors((dir.path / "model-00002-of-00002.safetensors").string(), second));
  REQUIRE(kd::io::write_file_atomic((dir.path / "model.safetensors.index.json").string(), index.dump()));
  model_t dst(b, a);
  REQUIRE(dst.allocate(false));
  REQUIRE(km::load_weights(dst, dir.path.string()));
  CHECK(std::equal(m.params(), m.params() + m.table().size(), dst.params(),
                   [](double x, double y) { return static_cast<double>(static_cast<float>(x)) == y; }));

  SUBCASE("an index naming a file outside the directory is refused") {
    index["weight_map"]["model.norm.weight"] = "../elsewhere.safetensors";
    REQUIRE(kd::io::write_file_atomic((dir.path / "model.safetensors.index.json").string(), index.dump()));
    kd::status s = km::load_weights(dst, dir.path.string());
    CHECK(s.code() == kd::errc::io_error);
    CHECK(kdtest::contains(s.message(), "leaves the checkpoint directory"));
  }
}

// ---------------------------------------------------------------------------------------------------
// CUDA limits (kd/model/cuda_limits.hpp): plain C++, so the GPU's limits on a model are checked here.
// ---------------------------------------------------------------------------------------------------
TEST_CASE("cuda limits: can_implement accepts the presets and names every limit a model breaks") {
  namespace kc = kd::model::cuda;
  for (const km::arch& a : {km::make_arch(km::seed_teacher()), km::make_arch(km::seed_student()),
                            km::make_arch(km::demo_teacher()), km::make_arch(km::demo_student()),
                            km::make_arch(km::tiny_teacher()), km::make_arch(km::tiny_student())})
    CHECK(kc::can_implement(a).ok());

  auto rejects = [](const km::arch& a, const char* fragment) {
    const kd::status s = kc::can_implement(a);
    INFO("message: " << s.message());
    CHECK(s.code() == kd::errc::invalid_argument);
    CHECK(kdtest::contains(s.message(), "cuda_ops::can_implement"));
    CHECK(kdtest::contains(s.message(), fragment));
  };
  km::moe_config c = km::tiny_teacher();
  c.num_experts = kc::detail::kRouterMaxExperts + 1;
  rejects(km::make_arch(c), "E = 257 exceeds the CUDA router's 256 experts");
  c = km::tiny_teacher();
  c.num_experts = 16;
  c.num_experts_per_tok = kc::detail::kRouterMaxTopK + 1;
  rejects(km::make_arch(c), "k = 9 exceeds the CUDA router's top-8");
  c = km::tiny_teacher();
  c.num_experts = kc::detail::kRouterMaxExperts;  // at the limits: fine
  c.num_experts_per_tok = kc::detail::kRouterMaxTopK;
  CHECK(kc::can_implement(km::make_arch(c)).ok());

  km::dense_config d = km::tiny_student();
  d.head_dim = 2 * kc::detail::kMaxHeadDim;
  rejects(km::make_arch(d), "head_dim = 256 must be even and at most the CUDA attention's 128");
  d.head_dim = 7;
  rejects(km::make_arch(d), "head_dim = 7");

  // A dense model has no router: its (unused) expert fields do not matter.
  km::arch a = km::make_arch(km::tiny_student());
  a.experts = 1000;
  a.top_k = 50;
  CHECK(kc::can_implement(a).ok());
}

TEST_CASE("cuda limits: the CPU reference runs any architecture, and allocate() asks the backend") {
  km::moe_config c = km::tiny_teacher();
  c.num_experts = 300;
  c.num_experts_per_tok = 12;
  cpu ops;
  model_t m(ops, km::make_arch(c));
  CHECK(cpu::can_implement(m.arch()).ok());
  CHECK(m.allocate(false).ok());
  CHECK_FALSE(kd::model::cuda::can_implement(m.arch()).ok());
}
