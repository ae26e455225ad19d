// kd/model/config.hpp: architecture configurations of the reference teacher and student.
//
// Two layouts, named and shaped as Hugging Face transformers builds them, so a checkpoint written by kd
// loads with AutoModelForCausalLM (config.json: kd/io/config_json.hpp; this header has no JSON
// dependency):
//
//   moe_config    Qwen3-MoE (Qwen3MoeForCausalLM): RMSNorm, RoPE, GQA attention with a per-head RMSNorm on
//                 queries and keys (q_norm, k_norm: head_dim weights each; always present in Qwen3), a
//                 softmax router over num_experts, top num_experts_per_tok experts (their probabilities
//                 renormalised when norm_topk_prob), SwiGLU experts of width moe_intermediate_size. A layer
//                 is sparse unless it is listed in mlp_only_layers or (layer + 1) % decoder_sparse_step != 0;
//                 a non-sparse layer has a dense SwiGLU MLP of width intermediate_size.
//   dense_config  Llama (LlamaForCausalLM): RMSNorm, RoPE, GQA attention, SwiGLU MLP, tied embeddings by
//                 default (SmolLM-135M geometry).
//
// Field names are the config.json keys. Weights (all bias-free unless attention_bias / mlp_bias):
//   embed_tokens        vocab_size x hidden_size
//   per layer           input_layernorm, post_attention_layernorm: hidden_size each
//                       q_proj: (num_attention_heads * head_dim) x hidden_size, o_proj: its transpose
//                       k_proj, v_proj: (num_key_value_heads * head_dim) x hidden_size
//                       (Qwen3) q_norm, k_norm: head_dim each
//                       (Qwen3 sparse) router gate: num_experts x hidden_size;
//                                      per expert gate, up: moe_intermediate_size x hidden_size, down: transpose
//                       dense MLP: gate, up: intermediate_size x hidden_size, down: transpose
//   norm                hidden_size
//   lm_head             vocab_size x hidden_size, absent when tie_word_embeddings
// transformers 5.17 holds the experts fused in memory: mlp.gate.weight [E, H],
// mlp.experts.gate_up_proj [E, 2 * moe_intermediate_size, H] (gate rows first, then up, per its source),
// mlp.experts.down_proj [E, H, moe_intermediate_size]; its save_pretrained writes them one tensor per expert
// (mlp.experts.N.gate_proj.weight ...), checked on the GPU machine. The counts are the same either way.
// parameter_count() counts every one of them exactly (it is meaningful only when validate() is ok).
// active_parameter_count() counts what one token uses: everything except the experts it is not routed to
// (embeddings and the LM head included, as in Qwen's "A3B"-style figures).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include <kd/core/status.hpp>

namespace kd::model {

// Storage dtype recorded in config.json ("dtype" / "torch_dtype"); it does not change the architecture.
enum class weight_dtype { float32, float16, bfloat16 };

constexpr std::string_view to_string(weight_dtype d) noexcept {
  switch (d) {
    case weight_dtype::float32: return "float32";
    case weight_dtype::float16: return "float16";
    case weight_dtype::bfloat16: return "bfloat16";
  }
  return "bfloat16";
}

namespace detail {

// Every size must fit a 32-bit id/extent (the kernels index with int32 inside a row).
inline constexpr std::int64_t max_extent = 2147483647;
// parameter_count() must fit int64 with a wide margin.
inline constexpr double max_parameters = 4.0e18;

inline status positive(std::string_view what, std::int64_t v) {
  if (v <= 0) return {errc::invalid_argument, std::string(what) + " must be positive, got " + std::to_string(v)};
  if (v > max_extent)
    return {errc::out_of_range, std::string(what) + " = " + std::to_string(v) + " exceeds 2^31 - 1"};
  return {};
}

inline status finite_positive(std::string_view what, double v) {
  if (!std::isfinite(v) || !(v > 0.0))
    return {errc::invalid_argument, std::string(what) + " must be a finite positive number, got " + std::to_string(v)};
  return {};
}

inline status token_id(std::string_view what, std::int64_t id, std::int64_t vocab_size) {
  if (id == -1) return {};  // none (null in config.json)
  if (id < 0 || id >= vocab_size)
    return {errc::out_of_range, std::string(what) + " = " + std::to_string(id) + " is outside [0, vocab_size = " +
                                    std::to_string(vocab_size) + ") (use -1 for none)"};
  return {};
}

// Checks shared by both layouts: sizes, GQA grouping, norms, RoPE, special tokens.
inline status validate_common(std::int64_t vocab_size, std::int64_t hidden_size, std::int64_t num_hidden_layers,
                              std::int64_t num_attention_heads, std::int64_t num_key_value_heads, std::int64_t head_dim,
                              double rms_norm_eps, double rope_theta, std::int64_t max_position_embeddings,
                              std::int64_t bos_token_id, std::int64_t eos_token_id) {
  KD_TRY(positive("vocab_size", vocab_size));
  KD_TRY(positive("hidden_size", hidden_size));
  KD_TRY(positive("num_hidden_layers", num_hidden_layers));
  KD_TRY(positive("num_attention_heads", num_attention_heads));
  KD_TRY(positive("num_key_value_heads", num_key_value_heads));
  KD_TRY(positive("head_dim", head_dim));
  KD_TRY(positive("max_position_embeddings", max_position_embeddings));
  if (num_key_value_heads > num_attention_heads || num_attention_heads % num_key_value_heads != 0)
    return {errc::invalid_argument, "num_key_value_heads = " + std::to_string(num_key_value_heads) +
                                        " must divide num_attention_heads = " + std::to_string(num_attention_heads) +
                                        " (grouped-query attention)"};
  if (head_dim % 2 != 0)
    return {errc::invalid_argument,
            "head_dim = " + std::to_string(head_dim) + " must be even (RoPE rotates pairs of dimensions)"};
  if (num_attention_heads * head_dim > max_extent)
    return {errc::out_of_range, "num_attention_heads * head_dim exceeds 2^31 - 1"};
  KD_TRY(finite_positive("rms_norm_eps", rms_norm_eps));
  KD_TRY(finite_positive("rope_theta", rope_theta));
  KD_TRY(token_id("bos_token_id", bos_token_id, vocab_size));
  KD_TRY(token_id("eos_token_id", eos_token_id, vocab_size));
  return {};
}

// Attention block of one layer (projections, optional biases), without norms.
constexpr std::int64_t attention_parameters(std::int64_t hidden, std::int64_t heads, std::int64_t kv_heads,
                                            std::int64_t head_dim, bool bias) noexcept {
  const std::int64_t q = heads * head_dim;
  const std::int64_t kv = kv_heads * head_dim;
  std::int64_t n = hidden * q + 2 * hidden * kv + q * hidden;  // q, k, v, o
  if (bias) n += q + 2 * kv + hidden;
  return n;
}

// One SwiGLU MLP (gate, up, down).
constexpr std::int64_t swiglu_parameters(std::int64_t hidden, std::int64_t width, bool bias) noexcept {
  std::int64_t n = 3 * hidden * width;
  if (bias) n += 2 * width + hidden;
  return n;
}

}  // namespace detail

// ------------------------------------------------------------------------------------------------------
// Qwen3-MoE
// ------------------------------------------------------------------------------------------------------
struct moe_config {
  std::int64_t vocab_size = 151936;
  std::int64_t hidden_size = 1024;
  // Width of the dense SwiGLU MLP of non-sparse layers (mlp_only_layers, decoder_sparse_step gaps). When
  // every layer is sparse (the presets) transformers builds nothing with it; the presets set it to
  // moe_intermediate_size * num_experts_per_tok, the dense width with the same active FLOPs.
  std::int64_t intermediate_size = 2048;
  std::int64_t num_hidden_layers = 24;
  std::int64_t num_attention_heads = 16;
  std::int64_t num_key_value_heads = 4;
  // Qwen3 decouples head_dim from hidden_size / num_attention_heads (Qwen3-30B-A3B: 2048 hidden, 32 heads
  // of 128); q_proj is hidden_size -> num_attention_heads * head_dim.
  std::int64_t head_dim = 64;
  std::int64_t moe_intermediate_size = 1024;
  std::int64_t num_experts = 8;
  std::int64_t num_experts_per_tok = 2;
  bool norm_topk_prob = true;
  std::int64_t decoder_sparse_step = 1;
  std::vector<std::int64_t> mlp_only_layers;  // layer indices with a dense MLP instead of experts
  double rms_norm_eps = 1e-6;
  double rope_theta = 1000000.0;
  std::int64_t max_position_embeddings = 32768;
  bool tie_word_embeddings = false;
  bool attention_bias = false;
  double router_aux_loss_coef = 0.01;  // Switch load-balance coefficient (kd's default; HF's is 1e-3)
  double initializer_range = 0.02;
  std::int64_t bos_token_id = 151643;  // -1: none
  std::int64_t eos_token_id = 151643;  // -1: none
  weight_dtype dtype = weight_dtype::bfloat16;

  bool operator==(const moe_config&) const = default;

  // transformers' rule (Qwen3MoeDecoderLayer): sparse unless listed in mlp_only_layers, and only every
  // decoder_sparse_step-th layer (1-based).
  [[nodiscard]] bool is_sparse_layer(std::int64_t layer) const noexcept {
    if (std::find(mlp_only_layers.begin(), mlp_only_layers.end(), layer) != mlp_only_layers.end()) return false;
    return num_experts > 0 && decoder_sparse_step > 0 && (layer + 1) % decoder_sparse_step == 0;
  }

  [[nodiscard]] std::int64_t num_sparse_layers() const noexcept {
    std::int64_t n = 0;
    for (std::int64_t l = 0; l < num_hidden_layers; ++l) n += is_sparse_layer(l) ? 1 : 0;
    return n;
  }

  [[nodiscard]] status validate() const {
    KD_TRY(detail::validate_common(vocab_size, hidden_size, num_hidden_layers, num_attention_heads,
                                   num_key_value_heads, head_dim, rms_norm_eps, rope_theta, max_position_embeddings,
                                   bos_token_id, eos_token_id));
    KD_TRY(detail::positive("intermediate_size", intermediate_size));
    KD_TRY(detail::positive("moe_intermediate_size", moe_intermediate_size));
    KD_TRY(detail::positive("num_experts", num_experts));
    KD_TRY(detail::positive("num_experts_per_tok", num_experts_per_tok));
    if (num_experts_per_tok > num_experts)
      return {errc::invalid_argument, "num_experts_per_tok = " + std::to_string(num_experts_per_tok) +
                                          " exceeds num_experts = " + std::to_string(num_experts)};
    KD_TRY(detail::positive("decoder_sparse_step", decoder_sparse_step));
    for (std::size_t i = 0; i < mlp_only_layers.size(); ++i) {
      const std::int64_t l = mlp_only_layers[i];
      if (l < 0 || l >= num_hidden_layers)
        return {errc::out_of_range, "mlp_only_layers contains layer " + std::to_string(l) +
                                        ", outside [0, num_hidden_layers = " + std::to_string(num_hidden_layers) + ")"};
      for (std::size_t j = 0; j < i; ++j)
        if (mlp_only_layers[j] == l)
          return {errc::invalid_argument, "mlp_only_layers lists layer " + std::to_string(l) + " twice"};
    }
    if (!std::isfinite(router_aux_loss_coef) || router_aux_loss_coef < 0.0)
      return {errc::invalid_argument,
              "router_aux_loss_coef must be finite and >= 0, got " + std::to_string(router_aux_loss_coef)};
    if (!std::isfinite(initializer_range) || !(initializer_range > 0.0))
      return {errc::invalid_argument,
              "initializer_range must be finite and positive, got " + std::to_string(initializer_range)};
    if (approximate_parameter_count() > detail::max_parameters)
      return {errc::out_of_range, "the configuration has more than 4e18 parameters"};
    return {};
  }

  // Every weight, exactly (see the table at the top of the file).
  [[nodiscard]] std::int64_t parameter_count() const noexcept {
    return count(num_experts);
  }

  // What one token uses: all but the (num_experts - num_experts_per_tok) experts it is not routed to, in
  // every sparse layer. The router itself is always active.
  [[nodiscard]] std::int64_t active_parameter_count() const noexcept { return count(num_experts_per_tok); }

  // Only the experts (all of them), for reporting.
  [[nodiscard]] std::int64_t expert_parameter_count() const noexcept {
    return num_sparse_layers() * num_experts * detail::swiglu_parameters(hidden_size, moe_intermediate_size, false);
  }

 private:
  [[nodiscard]] std::int64_t count(std::int64_t experts_counted) const noexcept {
    const std::int64_t embed = vocab_size * hidden_size;
    const std::int64_t attention =
        detail::attention_parameters(hidden_size, num_attention_heads, num_key_value_heads, head_dim, attention_bias) +
        2 * head_dim;  // q_norm, k_norm
    const std::int64_t layer_norms = 2 * hidden_size;
    const std::int64_t expert = detail::swiglu_parameters(hidden_size, moe_intermediate_size, false);
    const std::int64_t sparse_mlp = num_experts * hidden_size + experts_counted * expert;  // router gate + experts
    const std::int64_t dense_mlp = detail::swiglu_parameters(hidden_size, intermediate_size, false);
    const std::int64_t sparse = num_sparse_layers();
    const std::int64_t dense = num_hidden_layers - sparse;
    return embed + (tie_word_embeddings ? 0 : embed) + hidden_size +
           num_hidden_layers * (attention + layer_norms) + sparse * sparse_mlp + dense * dense_mlp;
  }

  [[nodiscard]] double approximate_parameter_count() const noexcept {
    const double h = static_cast<double>(hidden_size);
    const double layers = static_cast<double>(num_hidden_layers);
    const double attn = h * static_cast<double>(num_attention_heads + num_key_value_heads) * 2.0 *
                        static_cast<double>(head_dim);
    const double mlp = 3.0 * h *
                           (static_cast<double>(num_experts) * static_cast<double>(moe_intermediate_size) +
                            static_cast<double>(intermediate_size)) +
                       h * static_cast<double>(num_experts);
    return 2.0 * static_cast<double>(vocab_size) * h + layers * (attn + mlp + 4.0 * h);
  }
};

// ------------------------------------------------------------------------------------------------------
// Llama
// ------------------------------------------------------------------------------------------------------
struct dense_config {
  std::int64_t vocab_size = 50304;
  std::int64_t hidden_size = 576;
  std::int64_t intermediate_size = 1536;
  std::int64_t num_hidden_layers = 30;
  std::int64_t num_attention_heads = 9;
  std::int64_t num_key_value_heads = 3;
  std::int64_t head_dim = 64;  // must equal hidden_size / num_attention_heads (Llama layout)
  double rms_norm_eps = 1e-5;
  double rope_theta = 10000.0;
  std::int64_t max_position_embeddings = 2048;
  bool tie_word_embeddings = true;
  bool attention_bias = false;
  bool mlp_bias = false;
  double initializer_range = 0.02;
  std::int64_t bos_token_id = 50256;  // -1: none
  std::int64_t eos_token_id = 50256;  // -1: none
  weight_dtype dtype = weight_dtype::bfloat16;

  bool operator==(const dense_config&) const = default;

  [[nodiscard]] status validate() const {
    KD_TRY(detail::validate_common(vocab_size, hidden_size, num_hidden_layers, num_attention_heads,
                                   num_key_value_heads, head_dim, rms_norm_eps, rope_theta, max_position_embeddings,
                                   bos_token_id, eos_token_id));
    KD_TRY(detail::positive("intermediate_size", intermediate_size));
    if (hidden_size % num_attention_heads != 0)
      return {errc::invalid_argument, "num_attention_heads = " + std::to_string(num_attention_heads) +
                                          " must divide hidden_size = " + std::to_string(hidden_size)};
    if (head_dim != hidden_size / num_attention_heads)
      return {errc::invalid_argument, "head_dim = " + std::to_string(head_dim) +
                                          " must equal hidden_size / num_attention_heads = " +
                                          std::to_string(hidden_size / num_attention_heads) + " in the Llama layout"};
    if (!std::isfinite(initializer_range) || !(initializer_range > 0.0))
      return {errc::invalid_argument,
              "initializer_range must be finite and positive, got " + std::to_string(initializer_range)};
    const double h = static_cast<double>(hidden_size);
    const double per_layer = 4.0 * h * h + 3.0 * h * static_cast<double>(intermediate_size);
    const double approx = 2.0 * static_cast<double>(vocab_size) * h + static_cast<double>(num_hidden_layers) * per_layer;
    if (approx > detail::max_parameters)
      return {errc::out_of_range, "the configuration has more than 4e18 parameters"};
    return {};
  }

  [[nodiscard]] std::int64_t parameter_count() const noexcept {
    const std::int64_t embed = vocab_size * hidden_size;
    const std::int64_t layer =
        detail::attention_parameters(hidden_size, num_attention_heads, num_key_value_heads, head_dim, attention_bias) +
        detail::swiglu_parameters(hidden_size, intermediate_size, mlp_bias) + 2 * hidden_size;
    return embed + (tie_word_embeddings ? 0 : embed) + hidden_size + num_hidden_layers * layer;
  }

  // Dense: every parameter is active.
  [[nodiscard]] std::int64_t active_parameter_count() const noexcept { return parameter_count(); }
};

// ------------------------------------------------------------------------------------------------------
// Presets
// ------------------------------------------------------------------------------------------------------

// The seed run's teacher: Qwen3-MoE, 24 layers, hidden 1024, 16 heads / 4 KV heads of 64, 8 experts top-2 of
// width 1024, vocabulary 151,936, untied head: 978,309,120 parameters (525,324,288 active).
inline moe_config seed_teacher() { return moe_config{}; }

// The seed run's student: SmolLM-135M geometry (576 hidden, 1536 MLP, 30 layers, 9 heads / 3 KV heads) with
// the GPT-2 vocabulary padded to 50,304, tied: 135,178,560 parameters.
inline dense_config seed_student() { return dense_config{}; }

// Trains in minutes on one GPU; real vocabularies. Teacher: 8 layers, hidden 512, 8 heads / 2 KV heads of 64,
// 8 experts top-2 of width 512: 211,199,488 parameters (173,450,752 active), 155.6M of them embeddings.
inline moe_config demo_teacher() {
  moe_config c;
  c.hidden_size = 512;
  c.num_hidden_layers = 8;
  c.num_attention_heads = 8;
  c.num_key_value_heads = 2;
  c.head_dim = 64;
  c.moe_intermediate_size = 512;
  c.intermediate_size = 1024;
  c.max_position_embeddings = 2048;
  return c;
}

// Student for the demo: 8 layers, hidden 256, 4 heads / 2 KV heads of 64, MLP 768, tied: 19,173,632 parameters.
inline dense_config demo_student() {
  dense_config c;
  c.hidden_size = 256;
  c.intermediate_size = 768;
  c.num_hidden_layers = 8;
  c.num_attention_heads = 4;
  c.num_key_value_heads = 2;
  c.head_dim = 64;
  c.max_position_embeddings = 2048;
  return c;
}

// CPU tests: 2 layers, hidden 32, 4 heads / 2 KV heads of 8, 4 experts top-2 of width 16, vocabulary 97:
// 25,088 parameters (18,944 active).
inline moe_config tiny_teacher() {
  moe_config c;
  c.vocab_size = 97;
  c.hidden_size = 32;
  c.intermediate_size = 32;
  c.num_hidden_layers = 2;
  c.num_attention_heads = 4;
  c.num_key_value_heads = 2;
  c.head_dim = 8;
  c.moe_intermediate_size = 16;
  c.num_experts = 4;
  c.num_experts_per_tok = 2;
  c.max_position_embeddings = 64;
  c.bos_token_id = 96;
  c.eos_token_id = 96;
  return c;
}

// CPU tests: 2 layers, hidden 32, MLP 64, 4 heads / 2 KV heads of 8, vocabulary 61, tied: 20,544 parameters.
inline dense_config tiny_student() {
  dense_config c;
  c.vocab_size = 61;
  c.hidden_size = 32;
  c.intermediate_size = 64;
  c.num_hidden_layers = 2;
  c.num_attention_heads = 4;
  c.num_key_value_heads = 2;
  c.head_dim = 8;
  c.max_position_embeddings = 64;
  c.bos_token_id = 60;
  c.eos_token_id = 60;
  return c;
}

}  // namespace kd::model
