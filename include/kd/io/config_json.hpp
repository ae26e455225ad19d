// kd/io/config_json.hpp: Hugging Face config.json for kd's model configurations (nlohmann/json).
//
//   status to_json(const moe_config&, std::string& out)     Qwen3MoeForCausalLM, model_type "qwen3_moe"
//   status to_json(const dense_config&, std::string& out)   LlamaForCausalLM,    model_type "llama"
//   status from_json(std::string_view text, moe_config&)    and the same for dense_config
//
// Writing. validate() first; then every key transformers needs to rebuild the model, keys sorted and
// indented by 2 as transformers' save_pretrained writes them. For compatibility across transformers
// versions some facts are written under both of their names (every reader takes the one it knows, and
// the two always agree):
//   rope_theta and rope_parameters {"rope_theta", "rope_type": "default"}  (4.x reads the first, 5.x the second)
//   dtype and torch_dtype                                                 (5.x writes dtype, 4.x torch_dtype)
//   num_experts and num_local_experts  (Qwen3-MoE only; transformers 5.17 maps num_experts to
//                                       num_local_experts through its attribute_map and saves the latter)
// Checked with transformers 5.17: every preset's config.json loads with AutoConfig, AutoModelForCausalLM
// builds it with exactly parameter_count() parameters, with either expert-count spelling, either RoPE
// spelling and either dtype spelling alone; and what save_pretrained writes back reads to the same preset.
// intermediate_size for Qwen3-MoE is the width of the dense MLP of non-sparse layers (see config.hpp);
// max_window_layers is not written (transformers 5 has no such field; sliding windows are off).
//
// Reading. The text must be one JSON object. Keys that change the architecture are required; the others
// take transformers' default when absent. Unknown keys are ignored. Wrong JSON types, missing required keys
// and values kd does not implement are rejected with a message naming the key; the result is then checked
// with validate(). `out` is written only on success.
//   Qwen3-MoE required: model_type ("qwen3_moe"), vocab_size, hidden_size, num_hidden_layers,
//     num_attention_heads, num_key_value_heads, moe_intermediate_size, num_experts (or num_local_experts),
//     num_experts_per_tok, norm_topk_prob, rms_norm_eps, max_position_embeddings, tie_word_embeddings, and
//     the RoPE base: rope_parameters.rope_theta or rope_theta (both: they must agree).
//     intermediate_size is required when some layer is dense (mlp_only_layers, decoder_sparse_step > 1).
//   Llama required: model_type ("llama"), vocab_size, hidden_size, intermediate_size, num_hidden_layers,
//     num_attention_heads, rms_norm_eps, max_position_embeddings, tie_word_embeddings, the RoPE base.
//     num_key_value_heads (absent or null: num_attention_heads) and head_dim (absent or null:
//     hidden_size / num_attention_heads) are optional, as in transformers.
//   Optional everywhere: architectures (when present it must name the expected class), head_dim,
//     attention_bias (false), mlp_bias (false, Llama), initializer_range (0.02), bos_token_id / eos_token_id
//     (absent or null: -1; a list of ids keeps the first), dtype / torch_dtype (absent: float32, as in
//     transformers), router_aux_loss_coef (0.001, transformers' default), decoder_sparse_step (1),
//     mlp_only_layers ([]), output_router_logits (ignored), use_cache (ignored).
//   Rejected as unsupported: hidden_act other than "silu", attention_dropout other than 0, a rope_type other
//     than "default" (rope_parameters, or the legacy rope_scaling), partial_rotary_factor other than 1,
//     use_sliding_window true, pretraining_tp other than 1.
#pragma once

#include <cmath>
#include <cstdint>
#include <exception>
#include <limits>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include <nlohmann/json.hpp>

#include <kd/model/config.hpp>
#include <kd/core/status.hpp>

namespace kd::model {

namespace detail {

using json = nlohmann::json;

inline constexpr std::string_view qwen3_moe_architecture = "Qwen3MoeForCausalLM";
inline constexpr std::string_view qwen3_moe_model_type = "qwen3_moe";
inline constexpr std::string_view llama_architecture = "LlamaForCausalLM";
inline constexpr std::string_view llama_model_type = "llama";

inline const char* json_type_name(const json& v) noexcept {
  if (v.is_null()) return "null";
  if (v.is_boolean()) return "a boolean";
  if (v.is_number_integer()) return "an integer";
  if (v.is_number_float()) return "a floating-point number";
  if (v.is_string()) return "a string";
  if (v.is_array()) return "an array";
  if (v.is_object()) return "an object";
  return "an unsupported JSON value";
}

// Typed access to the keys of one JSON object; every error names the key.
class config_reader {
 public:
  config_reader(const json& object, std::string where) : object_(object), where_(std::move(where)) {}

  [[nodiscard]] const json* find(std::string_view key) const {
    const auto it = object_.find(std::string(key));
    return it == object_.end() ? nullptr : &*it;
  }
  [[nodiscard]] bool has(std::string_view key) const { return find(key) != nullptr; }
  // Absent or null.
  [[nodiscard]] bool absent(std::string_view key) const {
    const json* v = find(key);
    return v == nullptr || v->is_null();
  }

  [[nodiscard]] status missing(std::string_view key) const {
    return {errc::io_error, where_ + ": required key \"" + std::string(key) + "\" is missing"};
  }
  [[nodiscard]] status wrong_type(std::string_view key, std::string_view expected, const json& v) const {
    return {errc::io_error, where_ + ": key \"" + std::string(key) + "\" must be " + std::string(expected) + ", got " +
                                json_type_name(v)};
  }
  [[nodiscard]] status unsupported(std::string_view key, std::string_view why) const {
    return {errc::invalid_argument, where_ + ": key \"" + std::string(key) + "\": " + std::string(why)};
  }

  // Typed reads: JSON integers only for integers (1024.0 and true are not integers), any JSON number
  // for doubles, JSON booleans for bools.
  [[nodiscard]] status get(std::string_view key, std::int64_t& out, const json& v) const {
    if (!v.is_number_integer()) return wrong_type(key, "an integer", v);
    if (v.is_number_unsigned()) {
      const auto u = v.get<std::uint64_t>();
      if (u > static_cast<std::uint64_t>(std::numeric_limits<std::int64_t>::max()))
        return {errc::out_of_range, where_ + ": key \"" + std::string(key) + "\" does not fit 64 bits"};
      out = static_cast<std::int64_t>(u);
    } else {
      out = v.get<std::int64_t>();
    }
    return {};
  }
  [[nodiscard]] status get(std::string_view key, double& out, const json& v) const {
    if (!v.is_number()) return wrong_type(key, "a number", v);
    out = v.get<double>();
    return {};
  }
  [[nodiscard]] status get(std::string_view key, bool& out, const json& v) const {
    if (!v.is_boolean()) return wrong_type(key, "a boolean", v);
    out = v.get<bool>();
    return {};
  }

  // Required key of out's type.
  template <class T>
  [[nodiscard]] status require(std::string_view key, T& out) const {
    const json* v = find(key);
    if (v == nullptr) return missing(key);
    return get(key, out, *v);
  }
  // Optional key of out's type: absent or null keeps `out`.
  template <class T>
  [[nodiscard]] status optional(std::string_view key, T& out) const {
    const json* v = find(key);
    if (v == nullptr || v->is_null()) return {};
    return get(key, out, *v);
  }

  [[nodiscard]] status optional_string(std::string_view key, std::string& out, bool& present) const {
    present = false;
    const json* v = find(key);
    if (v == nullptr || v->is_null()) return {};
    if (!v->is_string()) return wrong_type(key, "a string", *v);
    out = v->get<std::string>();
    present = true;
    return {};
  }

  [[nodiscard]] const std::string& where() const noexcept { return where_; }

 private:
  const json& object_;
  std::string where_;
};

inline status parse_object(std::string_view text, json& out, const std::string& where) {
  try {
    out = json::parse(text.begin(), text.end());
  } catch (const json::parse_error& e) {
    return {errc::io_error, where + ": not valid JSON (" + std::string(e.what()) + ")"};
  }
  if (!out.is_object())
    return {errc::io_error, where + ": the top level must be a JSON object, got " + json_type_name(out)};
  return {};
}

inline status read_model_type(const config_reader& r, std::string_view expected_type, std::string_view expected_arch) {
  bool present = false;
  std::string model_type;
  KD_TRY(r.optional_string("model_type", model_type, present));
  if (!present) return r.missing("model_type");
  if (model_type != expected_type)
    return {errc::invalid_argument, r.where() + ": key \"model_type\" is \"" + model_type + "\", expected \"" +
                                        std::string(expected_type) + "\""};
  if (const json* a = r.find("architectures"); a != nullptr && !a->is_null()) {
    if (!a->is_array()) return r.wrong_type("architectures", "an array of strings", *a);
    bool found = false;
    for (const json& e : *a) {
      if (!e.is_string()) return r.wrong_type("architectures", "an array of strings", e);
      if (e.get<std::string>() == expected_arch) found = true;
    }
    if (!found)
      return {errc::invalid_argument, r.where() + ": key \"architectures\" does not list \"" +
                                          std::string(expected_arch) + "\""};
  }
  return {};
}

inline status read_dtype(const config_reader& r, weight_dtype& out) {
  weight_dtype result = weight_dtype::float32;  // transformers' default when the checkpoint says nothing
  bool any = false;
  for (const std::string_view key : {std::string_view("dtype"), std::string_view("torch_dtype")}) {
    bool present = false;
    std::string name;
    KD_TRY(r.optional_string(key, name, present));
    if (!present) continue;
    weight_dtype d{};
    if (name == "float32") d = weight_dtype::float32;
    else if (name == "float16") d = weight_dtype::float16;
    else if (name == "bfloat16") d = weight_dtype::bfloat16;
    else
      return r.unsupported(key, "\"" + name + "\" is not one of \"float32\", \"float16\", \"bfloat16\"");
    if (any && d != result)
      return {errc::invalid_argument, r.where() + ": keys \"dtype\" and \"torch_dtype\" disagree"};
    result = d;
    any = true;
  }
  out = result;
  return {};
}

// RoPE base from rope_parameters (transformers 5), the legacy rope_scaling object, or rope_theta.
inline status read_rope(const config_reader& r, double& theta) {
  bool have = false;
  double from_params = 0.0;
  for (const std::string_view key : {std::string_view("rope_parameters"), std::string_view("rope_scaling")}) {
    const json* p = r.find(key);
    if (p == nullptr || p->is_null()) continue;
    if (!p->is_object()) return r.wrong_type(key, "an object", *p);
    for (const char* type_key : {"rope_type", "type"}) {
      const auto it = p->find(type_key);
      if (it == p->end() || it->is_null()) continue;
      if (!it->is_string())
        return r.wrong_type(std::string(key) + "." + type_key, "a string", *it);
      if (it->get<std::string>() != "default")
        return r.unsupported(std::string(key) + "." + type_key,
                             "\"" + it->get<std::string>() + "\" is not supported (only \"default\" RoPE)");
    }
    if (const auto it = p->find("partial_rotary_factor"); it != p->end() && !it->is_null()) {
      if (!it->is_number()) return r.wrong_type(std::string(key) + ".partial_rotary_factor", "a number", *it);
      if (it->get<double>() != 1.0)
        return r.unsupported(std::string(key) + ".partial_rotary_factor", "only 1 (full rotary) is supported");
    }
    if (const auto it = p->find("rope_theta"); it != p->end() && !it->is_null()) {
      if (!it->is_number()) return r.wrong_type(std::string(key) + ".rope_theta", "a number", *it);
      if (have && it->get<double>() != from_params)
        return {errc::invalid_argument,
                r.where() + ": rope_parameters.rope_theta and rope_scaling.rope_theta disagree"};
      from_params = it->get<double>();
      have = true;
    }
  }
  if (const json* t = r.find("rope_theta"); t != nullptr && !t->is_null()) {
    double top = 0.0;
    KD_TRY(r.get("rope_theta", top, *t));
    if (have && top != from_params)
      return {errc::invalid_argument, r.where() + ": key \"rope_theta\" (" + std::to_string(top) +
                                          ") disagrees with rope_parameters.rope_theta (" +
                                          std::to_string(from_params) + ")"};
    from_params = top;
    have = true;
  }
  if (!have)
    return {errc::io_error, r.where() + ": required key \"rope_theta\" is missing (neither rope_parameters.rope_theta "
                                        "nor rope_theta is present)"};
  theta = from_params;
  return {};
}

// bos/eos: an id, null (-1) or a list of ids (the first is kept; every one must be an integer).
inline status read_token_id(const config_reader& r, std::string_view key, std::int64_t& out) {
  const json* v = r.find(key);
  if (v == nullptr || v->is_null()) {
    out = -1;
    return {};
  }
  if (v->is_array()) {
    if (v->empty()) return r.wrong_type(key, "an integer or a non-empty list of integers", *v);
    std::int64_t first = -1;
    for (std::size_t i = 0; i < v->size(); ++i) {
      std::int64_t id = 0;
      KD_TRY(r.get(key, id, (*v)[i]));
      if (i == 0) first = id;
    }
    out = first;
    return {};
  }
  return r.get(key, out, *v);
}

// Keys whose only supported value is transformers' default.
inline status read_common_unsupported(const config_reader& r) {
  bool present = false;
  std::string act;
  KD_TRY(r.optional_string("hidden_act", act, present));
  if (present && act != "silu")
    return r.unsupported("hidden_act", "\"" + act + "\" is not supported (SwiGLU uses \"silu\")");
  double dropout = 0.0;
  KD_TRY(r.optional("attention_dropout", dropout));
  if (dropout != 0.0) return r.unsupported("attention_dropout", "kd's models have no attention dropout (must be 0)");
  return {};
}

inline json rope_parameters_json(double theta) { return json{{"rope_theta", theta}, {"rope_type", "default"}}; }

inline json token_json(std::int64_t id) { return id < 0 ? json(nullptr) : json(id); }

inline status dump(const json& j, std::string& out) {
  try {
    out = j.dump(2) + "\n";
  } catch (const std::exception& e) {
    return {errc::io_error, std::string("config.json: cannot serialise (") + e.what() + ")"};
  }
  return {};
}

// Keys both architectures write the same way: the shared shape fields, fixed features kd implements,
// token ids, dtype (nlohmann::json sorts keys, so the order of writes does not show in the file).
template <class Config>
void write_common_keys(json& j, const Config& c) {
  j["vocab_size"] = c.vocab_size;
  j["hidden_size"] = c.hidden_size;
  j["intermediate_size"] = c.intermediate_size;
  j["num_hidden_layers"] = c.num_hidden_layers;
  j["num_attention_heads"] = c.num_attention_heads;
  j["num_key_value_heads"] = c.num_key_value_heads;
  j["head_dim"] = c.head_dim;
  j["rms_norm_eps"] = c.rms_norm_eps;
  j["rope_theta"] = c.rope_theta;
  j["rope_parameters"] = rope_parameters_json(c.rope_theta);
  j["max_position_embeddings"] = c.max_position_embeddings;
  j["tie_word_embeddings"] = c.tie_word_embeddings;
  j["attention_bias"] = c.attention_bias;
  j["attention_dropout"] = 0.0;
  j["hidden_act"] = "silu";
  j["use_cache"] = true;
  j["initializer_range"] = c.initializer_range;
  j["bos_token_id"] = token_json(c.bos_token_id);
  j["eos_token_id"] = token_json(c.eos_token_id);
  j["dtype"] = std::string(to_string(c.dtype));
  j["torch_dtype"] = std::string(to_string(c.dtype));
}

// A validated config as config.json: the common keys, then fill(j) adds the architecture's own.
template <class Config, class Fill>
status write_config_json(const Config& c, std::string_view architecture, std::string_view model_type, std::string& out,
                    Fill&& fill) {
  KD_TRY(c.validate());
  try {
    json j;
    j["architectures"] = json::array({std::string(architecture)});
    j["model_type"] = std::string(model_type);
    write_common_keys(j, c);
    fill(j);
    return dump(j, out);
  } catch (const std::exception& e) {
    return {errc::io_error, std::string("config.json: cannot serialise (") + e.what() + ")"};
  }
}

// Parses config.json of one architecture: its model_type / architectures, the keys no architecture
// supports, then read(r, c) for the rest; the result must validate. Errors are prefixed with `where`.
template <class Config, class Read>
status parse_config_json(std::string_view text, const std::string& where, std::string_view model_type,
                   std::string_view architecture, Config& out, Read&& read) {
  try {
    json j;
    KD_TRY(parse_object(text, j, where));
    const config_reader r(j, where);
    KD_TRY(read_model_type(r, model_type, architecture));
    KD_TRY(read_common_unsupported(r));
    Config c;
    KD_TRY(read(r, c));
    if (status s = c.validate(); !s.ok()) return {s.code(), where + ": " + s.message()};
    out = std::move(c);
    return {};
  } catch (const std::exception& e) {
    return {errc::io_error, where + ": " + e.what()};
  }
}

// The keys both architectures read alike after their shapes, in two runs (the MoE reads its router keys
// between them).
template <class Config>
status read_common_norm_rope(const config_reader& r, Config& c) {
  KD_TRY(r.require("rms_norm_eps", c.rms_norm_eps));
  KD_TRY(read_rope(r, c.rope_theta));
  KD_TRY(r.require("max_position_embeddings", c.max_position_embeddings));
  KD_TRY(r.require("tie_word_embeddings", c.tie_word_embeddings));
  return r.optional("attention_bias", c.attention_bias);
}
template <class Config>
status read_common_ids(const config_reader& r, Config& c) {
  KD_TRY(r.optional("initializer_range", c.initializer_range));
  KD_TRY(read_token_id(r, "bos_token_id", c.bos_token_id));
  KD_TRY(read_token_id(r, "eos_token_id", c.eos_token_id));
  return read_dtype(r, c.dtype);
}

}  // namespace detail

// ------------------------------------------------------------------------------------------------------
// Qwen3-MoE
// ------------------------------------------------------------------------------------------------------
inline status to_json(const moe_config& c, std::string& out) {
  const auto architecture = detail::qwen3_moe_architecture;
  return detail::write_config_json(c, architecture, detail::qwen3_moe_model_type, out, [&](detail::json& j) {
    j["moe_intermediate_size"] = c.moe_intermediate_size;
    j["num_experts"] = c.num_experts;
    j["num_local_experts"] = c.num_experts;
    j["num_experts_per_tok"] = c.num_experts_per_tok;
    j["norm_topk_prob"] = c.norm_topk_prob;
    j["decoder_sparse_step"] = c.decoder_sparse_step;
    j["mlp_only_layers"] = c.mlp_only_layers;
    j["router_aux_loss_coef"] = c.router_aux_loss_coef;
    j["output_router_logits"] = false;
    j["use_sliding_window"] = false;
    j["sliding_window"] = nullptr;
  });
}

inline status from_json(std::string_view text, moe_config& out) {
  const std::string where = "config.json (qwen3_moe)";
  return detail::parse_config_json(text, where, detail::qwen3_moe_model_type, detail::qwen3_moe_architecture, out,
                             [&](const detail::config_reader& r, moe_config& c) -> status {
    bool sliding = false;
    KD_TRY(r.optional("use_sliding_window", sliding));
    if (sliding) return r.unsupported("use_sliding_window", "sliding-window attention is not supported");

    KD_TRY(r.require("vocab_size", c.vocab_size));
    KD_TRY(r.require("hidden_size", c.hidden_size));
    KD_TRY(r.require("num_hidden_layers", c.num_hidden_layers));
    KD_TRY(r.require("num_attention_heads", c.num_attention_heads));
    KD_TRY(r.require("num_key_value_heads", c.num_key_value_heads));
    c.head_dim = 0;
    KD_TRY(r.optional("head_dim", c.head_dim));
    if (r.absent("head_dim")) {
      if (c.num_attention_heads <= 0)
        return {errc::invalid_argument, where + ": num_attention_heads must be positive"};
      c.head_dim = c.hidden_size / c.num_attention_heads;
    }
    KD_TRY(r.require("moe_intermediate_size", c.moe_intermediate_size));
    // num_experts, or num_local_experts (recent transformers' canonical name); both: they must agree.
    const bool has_e = !r.absent("num_experts");
    const bool has_le = !r.absent("num_local_experts");
    if (!has_e && !has_le)
      return {errc::io_error,
              where + ": required key \"num_experts\" is missing (nor is \"num_local_experts\" present)"};
    if (has_e) KD_TRY(r.require("num_experts", c.num_experts));
    if (has_le) {
      std::int64_t local = 0;
      KD_TRY(r.require("num_local_experts", local));
      if (has_e && local != c.num_experts)
        return {errc::invalid_argument, where + ": keys \"num_experts\" (" + std::to_string(c.num_experts) +
                                            ") and \"num_local_experts\" (" + std::to_string(local) + ") disagree"};
      c.num_experts = local;
    }
    KD_TRY(r.require("num_experts_per_tok", c.num_experts_per_tok));
    KD_TRY(r.require("norm_topk_prob", c.norm_topk_prob));
    KD_TRY(r.optional("decoder_sparse_step", c.decoder_sparse_step));
    c.mlp_only_layers.clear();
    if (const auto* m = r.find("mlp_only_layers"); m != nullptr && !m->is_null()) {
      if (!m->is_array()) return r.wrong_type("mlp_only_layers", "an array of integers", *m);
      for (const auto& e : *m) {
        std::int64_t layer = 0;
        KD_TRY(r.get("mlp_only_layers", layer, e));
        c.mlp_only_layers.push_back(layer);
      }
    }
    // intermediate_size builds the dense MLP of non-sparse layers: required only when there is one.
    const bool all_sparse = c.mlp_only_layers.empty() && c.decoder_sparse_step == 1;
    if (all_sparse) {
      c.intermediate_size = c.moe_intermediate_size * c.num_experts_per_tok;
      KD_TRY(r.optional("intermediate_size", c.intermediate_size));
    } else {
      KD_TRY(r.require("intermediate_size", c.intermediate_size));
    }
    KD_TRY(detail::read_common_norm_rope(r, c));
    c.router_aux_loss_coef = 0.001;  // transformers' default when absent
    KD_TRY(r.optional("router_aux_loss_coef", c.router_aux_loss_coef));
    bool ignored = false;
    KD_TRY(r.optional("output_router_logits", ignored));
    return detail::read_common_ids(r, c);
  });
}

// ------------------------------------------------------------------------------------------------------
// Llama
// ------------------------------------------------------------------------------------------------------
inline status to_json(const dense_config& c, std::string& out) {
  return detail::write_config_json(c, detail::llama_architecture, detail::llama_model_type, out, [&](detail::json& j) {
    j["mlp_bias"] = c.mlp_bias;
    j["pretraining_tp"] = 1;
  });
}

inline status from_json(std::string_view text, dense_config& out) {
  const std::string where = "config.json (llama)";
  return detail::parse_config_json(text, where, detail::llama_model_type, detail::llama_architecture, out,
                             [&](const detail::config_reader& r, dense_config& c) -> status {
    std::int64_t tp = 1;
    KD_TRY(r.optional("pretraining_tp", tp));
    if (tp != 1) return r.unsupported("pretraining_tp", "only 1 is supported");

    KD_TRY(r.require("vocab_size", c.vocab_size));
    KD_TRY(r.require("hidden_size", c.hidden_size));
    KD_TRY(r.require("intermediate_size", c.intermediate_size));
    KD_TRY(r.require("num_hidden_layers", c.num_hidden_layers));
    KD_TRY(r.require("num_attention_heads", c.num_attention_heads));
    if (c.num_attention_heads <= 0)
      return {errc::invalid_argument, where + ": num_attention_heads must be positive, got " +
                                          std::to_string(c.num_attention_heads)};
    c.num_key_value_heads = c.num_attention_heads;  // transformers' default: multi-head attention
    KD_TRY(r.optional("num_key_value_heads", c.num_key_value_heads));
    c.head_dim = c.hidden_size / c.num_attention_heads;
    KD_TRY(r.optional("head_dim", c.head_dim));
    KD_TRY(detail::read_common_norm_rope(r, c));
    KD_TRY(r.optional("mlp_bias", c.mlp_bias));
    return detail::read_common_ids(r, c);
  });
}

}  // namespace kd::model
