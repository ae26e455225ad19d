// kd/model/parameters.hpp: one description of both architectures, and the parameter table in HF names.
//
// The Qwen3-MoE teacher and the Llama student differ only in per-head QK norm, the MLP of each layer
// (dense SwiGLU or routed experts) and whether the head is tied, so the transformer is written once
// against `arch` and both configs lower to it. The parameter table fixes every tensor's HF name, shape
// and offset in one flat arena (values and gradients share the layout), so checkpoints, optimizers and
// the backends all see the same tensors.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include <kd/model/config.hpp>
#include <kd/core/status.hpp>

namespace kd::model {

enum class family { qwen3_moe, llama };

struct layer_arch {
  bool moe = false;                // routed experts (else a dense SwiGLU MLP)
  std::int64_t intermediate = 0;   // dense MLP width, or the width of one expert
};

// Everything the model math needs from a config.
struct arch {
  model::family family = family::llama;
  std::int64_t vocab = 0, hidden = 0, heads = 0, kv_heads = 0, head_dim = 0;
  double eps = 1e-6, theta = 10000.0;
  bool tied = false;
  bool qk_norm = false;            // per-head RMSNorm on q and k before RoPE (Qwen3)
  std::int64_t experts = 0, top_k = 0;
  bool renorm_topk = true;
  std::vector<layer_arch> layers;

  [[nodiscard]] std::int64_t num_layers() const noexcept { return static_cast<std::int64_t>(layers.size()); }
  [[nodiscard]] std::int64_t q_width() const noexcept { return heads * head_dim; }
  [[nodiscard]] std::int64_t kv_width() const noexcept { return kv_heads * head_dim; }
};

namespace detail {
// The fields both configs name alike.
template <class Config>
arch common_arch(const Config& c, model::family f) {
  arch a;
  a.family = f;
  a.vocab = c.vocab_size;
  a.hidden = c.hidden_size;
  a.heads = c.num_attention_heads;
  a.kv_heads = c.num_key_value_heads;
  a.head_dim = c.head_dim;
  a.eps = c.rms_norm_eps;
  a.theta = c.rope_theta;
  a.tied = c.tie_word_embeddings;
  return a;
}
}  // namespace detail

inline arch make_arch(const moe_config& c) {
  arch a = detail::common_arch(c, family::qwen3_moe);
  a.qk_norm = true;
  a.experts = c.num_experts;
  a.top_k = c.num_experts_per_tok;
  a.renorm_topk = c.norm_topk_prob;
  for (std::int64_t l = 0; l < c.num_hidden_layers; ++l) {
    const bool sparse = c.is_sparse_layer(l);
    a.layers.push_back({sparse, sparse ? c.moe_intermediate_size : c.intermediate_size});
  }
  return a;
}

inline arch make_arch(const dense_config& c) {
  arch a = detail::common_arch(c, family::llama);
  for (std::int64_t l = 0; l < c.num_hidden_layers; ++l) a.layers.push_back({false, c.intermediate_size});
  return a;
}

// Biases are not modelled: the seed models have none.
inline status check_supported(const moe_config& c) {
  KD_TRY(c.validate());
  if (c.attention_bias) return {errc::invalid_argument, "attention_bias = true is not supported (the model has no biases)"};
  return {};
}
inline status check_supported(const dense_config& c) {
  KD_TRY(c.validate());
  if (c.attention_bias || c.mlp_bias)
    return {errc::invalid_argument, "attention_bias / mlp_bias = true is not supported (the model has no biases)"};
  return {};
}

// What a tensor is, for initialisation (norm weights start at 1, everything else ~ N(0, range)).
enum class param_kind { matrix, norm };

struct param_entry {
  std::string name;                  // HF name
  std::vector<std::int64_t> shape;   // HF shape
  std::size_t offset = 0;            // elements from the arena start (aligned to 128 elements)
  std::size_t numel = 0;
  param_kind kind = param_kind::matrix;
};

// Offsets of one layer's tensors in the arena. The q, k and v weights are separate tensors; a dense MLP's
// gate and up weights are adjacent (gate first) so one GEMM computes both, as the fused expert tensor does.
struct layer_offsets {
  std::size_t input_norm = 0, q = 0, k = 0, v = 0, o = 0, q_norm = 0, k_norm = 0, post_norm = 0;
  std::size_t gate_up = 0, down = 0;  // dense: [2I, H] and [H, I]; experts: [E, 2I, H] and [E, H, I]
  std::size_t router = 0;             // [E, H]
};

class parameter_table {
 public:
  parameter_table() = default;
  explicit parameter_table(const arch& a) : arch_(a) {
    const std::int64_t h = a.hidden;
    embed_ = add("model.embed_tokens.weight", {a.vocab, h}, param_kind::matrix);
    for (std::int64_t l = 0; l < a.num_layers(); ++l) {
      const std::string p = "model.layers." + std::to_string(l) + ".";
      const layer_arch& la = a.layers[static_cast<std::size_t>(l)];
      layer_offsets o;
      o.input_norm = add(p + "input_layernorm.weight", {h}, param_kind::norm);
      o.q = add(p + "self_attn.q_proj.weight", {a.q_width(), h}, param_kind::matrix);
      o.k = add(p + "self_attn.k_proj.weight", {a.kv_width(), h}, param_kind::matrix);
      o.v = add(p + "self_attn.v_proj.weight", {a.kv_width(), h}, param_kind::matrix);
      o.o = add(p + "self_attn.o_proj.weight", {h, a.q_width()}, param_kind::matrix);
      if (a.qk_norm) {
        o.q_norm = add(p + "self_attn.q_norm.weight", {a.head_dim}, param_kind::norm);
        o.k_norm = add(p + "self_attn.k_norm.weight", {a.head_dim}, param_kind::norm);
      }
      o.post_norm = add(p + "post_attention_layernorm.weight", {h}, param_kind::norm);
      const std::int64_t i = la.intermediate;
      if (la.moe) {
        o.router = add(p + "mlp.gate.weight", {a.experts, h}, param_kind::matrix);
        o.gate_up = add(p + "mlp.experts.gate_up_proj", {a.experts, 2 * i, h}, param_kind::matrix);
        o.down = add(p + "mlp.experts.down_proj", {a.experts, h, i}, param_kind::matrix);
      } else {
        o.gate_up = add(p + "mlp.gate_proj.weight", {i, h}, param_kind::matrix, /*align=*/true);
        add(p + "mlp.up_proj.weight", {i, h}, param_kind::matrix, /*align=*/false);  // right after gate
        o.down = add(p + "mlp.down_proj.weight", {h, i}, param_kind::matrix);
      }
      layers_.push_back(o);
    }
    final_norm_ = add("model.norm.weight", {h}, param_kind::norm);
    head_ = a.tied ? embed_ : add("lm_head.weight", {a.vocab, h}, param_kind::matrix);
  }

  [[nodiscard]] const model::arch& arch() const noexcept { return arch_; }
  [[nodiscard]] const std::vector<param_entry>& entries() const noexcept { return entries_; }
  // Arena size in elements (includes alignment padding, which stays zero).
  [[nodiscard]] std::size_t size() const noexcept { return size_; }
  // Sum of the tensors' element counts: the model's parameter count.
  [[nodiscard]] std::size_t parameter_count() const noexcept {
    std::size_t n = 0;
    for (const auto& e : entries_) n += e.numel;
    return n;
  }
  [[nodiscard]] const param_entry* find(std::string_view name) const noexcept {
    for (const auto& e : entries_)
      if (e.name == name) return &e;
    return nullptr;
  }

  [[nodiscard]] std::size_t embed() const noexcept { return embed_; }
  [[nodiscard]] std::size_t head() const noexcept { return head_; }
  [[nodiscard]] std::size_t final_norm() const noexcept { return final_norm_; }
  [[nodiscard]] const layer_offsets& layer(std::int64_t l) const noexcept {
    return layers_[static_cast<std::size_t>(l)];
  }

 private:
  // 128 elements = 256 bytes of bf16: every tensor starts aligned for vector loads and cuBLAS.
  static constexpr std::size_t alignment = 128;

  std::size_t add(std::string name, std::vector<std::int64_t> shape, param_kind kind, bool align = true) {
    if (align) size_ = (size_ + alignment - 1) / alignment * alignment;
    std::size_t n = 1;
    for (std::int64_t d : shape) n *= static_cast<std::size_t>(d);
    entries_.push_back({std::move(name), std::move(shape), size_, n, kind});
    size_ += n;
    return entries_.back().offset;
  }

  model::arch arch_;
  std::vector<param_entry> entries_;
  std::vector<layer_offsets> layers_;
  std::size_t size_ = 0;
  std::size_t embed_ = 0, head_ = 0, final_norm_ = 0;
};

// Training FLOPs per token, the convention of benchmarks/RESULTS.md: 6 per multiply-accumulate weight
// that a token passes through (top-k experts only; the head once, the embedding lookup none) plus
// 6 * layers * seq * (heads * head_dim) for attention scores and values.
inline double training_flops_per_token(const arch& a, std::int64_t seq) {
  const double h = static_cast<double>(a.hidden);
  double mm = static_cast<double>(a.vocab) * h;  // head
  for (const layer_arch& l : a.layers) {
    mm += h * static_cast<double>(a.q_width() + 2 * a.kv_width()) + static_cast<double>(a.q_width()) * h;
    const double mlp = 3.0 * h * static_cast<double>(l.intermediate);
    mm += l.moe ? static_cast<double>(a.top_k) * mlp + h * static_cast<double>(a.experts) : mlp;
  }
  return 6.0 * mm + 6.0 * static_cast<double>(a.num_layers()) * static_cast<double>(seq) *
                        static_cast<double>(a.q_width());
}

}  // namespace kd::model
