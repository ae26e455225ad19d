// kd/model/checkpoint.hpp: HF checkpoints (config.json + model.safetensors) in and out of a transformer.
//
// Tensor names and shapes are HF's (parameters.hpp), so a directory written here loads with
// transformers' from_pretrained and a directory saved by save_pretrained loads here. Loading is strict:
// a missing tensor, a tensor of another shape or a tensor the model does not have is an error naming it
// (a silently half-loaded model is the failure this exists to prevent). Experts: transformers 5.17 keeps
// them fused in memory (gate_up_proj [E, 2I, H], gate rows first; down_proj [E, H, I]) but save_pretrained
// writes one tensor per expert (mlp.experts.N.{gate,up,down}_proj.weight); both load here, and kd writes
// the per-expert form. Also accepted: sharded checkpoints (model.safetensors.index.json) and a tied
// model's redundant lm_head.weight.
#pragma once

#include <cstdio>
#include <filesystem>
#include <fstream>
#include <map>
#include <set>
#include <sstream>
#include <string>
#include <variant>
#include <vector>

#include <nlohmann/json.hpp>

#include <kd/io/atomic_file.hpp>
#include <kd/io/safetensors.hpp>
#include <kd/model/config.hpp>
#include <kd/io/config_json.hpp>
#include <kd/model/transformer.hpp>
#include <kd/core/numeric.hpp>

namespace kd::model {

using any_config = std::variant<moe_config, dense_config>;

namespace detail {

inline status read_text(const std::string& path, std::string& out) {
  std::ifstream f(path, std::ios::binary);
  if (!f) return {errc::io_error, "cannot open '" + path + "'"};
  std::ostringstream s;
  s << f.rdbuf();
  if (f.bad()) return {errc::io_error, "cannot read '" + path + "'"};
  out = s.str();
  return {};
}

inline std::string shape_text(const std::vector<std::int64_t>& s) {
  std::string t = "[";
  for (std::size_t i = 0; i < s.size(); ++i) t += (i ? ", " : "") + std::to_string(s[i]);
  return t + "]";
}

// The checkpoint's files: one model.safetensors, or the shards named by model.safetensors.index.json.
inline status open_weights(const std::string& dir, std::vector<io::safetensors_file>& files) {
  namespace fs = std::filesystem;
  const fs::path single = fs::path(dir) / "model.safetensors";
  const fs::path index = fs::path(dir) / "model.safetensors.index.json";
  files.clear();
  if (fs::exists(single)) {
    files.emplace_back();
    return io::safetensors_file::open(single.string(), files.back());
  }
  if (!fs::exists(index))
    return {errc::io_error, "'" + dir + "' has neither model.safetensors nor model.safetensors.index.json"};
  std::string text;
  KD_TRY(read_text(index.string(), text));
  std::set<std::string> shards;
  try {
    const auto j = nlohmann::json::parse(text);
    for (const auto& [name, file] : j.at("weight_map").items()) shards.insert(file.get<std::string>());
  } catch (const nlohmann::json::exception& e) {
    return {errc::io_error, index.string() + ": not a valid index (" + e.what() + ")"};
  }
  for (const std::string& s : shards) {
    if (s.find('/') != std::string::npos || s.find("..") != std::string::npos)
      return {errc::io_error, index.string() + ": shard name '" + s + "' leaves the checkpoint directory"};
    files.emplace_back();
    KD_TRY(io::safetensors_file::open((fs::path(dir) / s).string(), files.back()));
  }
  return {};
}

struct located {
  const io::safetensors_file* file = nullptr;
  const io::tensor_info* info = nullptr;
};

inline located locate(const std::vector<io::safetensors_file>& files, std::string_view name) {
  for (const auto& f : files)
    if (const io::tensor_info* t = f.find(name)) return {&f, t};
  return {};
}

template <class T>
status read_checked(const located& at, const std::vector<std::int64_t>& shape, T* dst) {
  const std::vector<std::int64_t> got(at.info->shape.begin(), at.info->shape.end());
  if (got != shape)
    return {errc::shape_mismatch, at.file->source() + ": tensor '" + at.info->name + "' has shape " + shape_text(got) +
                                      " but the model's config expects " + shape_text(shape)};
  return at.file->read(at.info->name, std::span<T>(dst, static_cast<std::size_t>(at.info->numel)));
}

}  // namespace detail

// Reads DIR/config.json into the config of its architecture (model_type qwen3_moe or llama).
inline status read_config(const std::string& dir, any_config& out) {
  std::string text;
  const std::string path = (std::filesystem::path(dir) / "config.json").string();
  KD_TRY(detail::read_text(path, text));
  std::string type;
  try {
    const auto j = nlohmann::json::parse(text);
    if (j.contains("model_type") && j["model_type"].is_string()) type = j["model_type"].get<std::string>();
  } catch (const nlohmann::json::exception& e) {
    return {errc::io_error, path + ": not valid JSON (" + e.what() + ")"};
  }
  auto wrap = [&](status s) { return s ? s : status{s.code(), path + ": " + s.message()}; };
  if (type == "qwen3_moe") {
    moe_config c;
    KD_TRY(wrap(from_json(text, c)));
    out = c;
    return {};
  }
  if (type == "llama") {
    dense_config c;
    KD_TRY(wrap(from_json(text, c)));
    out = c;
    return {};
  }
  return {errc::invalid_argument,
          path + ": model_type '" + type + "' is not supported (kd models: qwen3_moe, llama)"};
}

inline model::arch make_arch(const any_config& c) {
  return std::visit([](const auto& x) { return make_arch(x); }, c);
}
inline status check_supported(const any_config& c) {
  return std::visit([](const auto& x) { return check_supported(x); }, c);
}

// Loads the weights of DIR into `m` (allocated, of the same architecture as DIR/config.json).
template <ModelBackend B>
status load_weights(transformer<B>& m, const std::string& dir) {
  using T = typename transformer<B>::value_type;
  std::vector<io::safetensors_file> files;
  KD_TRY(detail::open_weights(dir, files));
  const parameter_table& table = m.table();
  const model::arch& a = m.arch();
  std::set<std::string> used;
  std::vector<T> host;
  for (const param_entry& e : table.entries()) {
    host.assign(e.numel, T{});
    if (auto at = detail::locate(files, e.name); at.info != nullptr) {
      KD_TRY(detail::read_checked(at, e.shape, host.data()));
      used.insert(e.name);
    } else if (e.shape.size() == 3 && e.name.ends_with("mlp.experts.gate_up_proj")) {
      // One tensor per expert: gate_proj [I, H] and up_proj [I, H] stack into this expert's [2I, H].
      const std::string base = e.name.substr(0, e.name.size() - std::string("gate_up_proj").size());
      const std::int64_t I = e.shape[1] / 2, H = e.shape[2];
      for (std::int64_t x = 0; x < a.experts; ++x)
        for (int part = 0; part < 2; ++part) {
          const std::string n = base + std::to_string(x) + (part == 0 ? ".gate_proj.weight" : ".up_proj.weight");
          auto pt = detail::locate(files, n);
          if (pt.info == nullptr) return {errc::io_error, dir + ": missing tensor '" + e.name + "' (or '" + n + "')"};
          KD_TRY(detail::read_checked(pt, {I, H}, host.data() + (x * 2 + part) * I * H));
          used.insert(n);
        }
    } else if (e.shape.size() == 3 && e.name.ends_with("mlp.experts.down_proj")) {
      const std::string base = e.name.substr(0, e.name.size() - std::string("down_proj").size());
      const std::int64_t H = e.shape[1], I = e.shape[2];
      for (std::int64_t x = 0; x < a.experts; ++x) {
        const std::string n = base + std::to_string(x) + ".down_proj.weight";
        auto pt = detail::locate(files, n);
        if (pt.info == nullptr) return {errc::io_error, dir + ": missing tensor '" + e.name + "' (or '" + n + "')"};
        KD_TRY(detail::read_checked(pt, {H, I}, host.data() + x * H * I));
        used.insert(n);
      }
    } else {
      return {errc::io_error, dir + ": missing tensor '" + e.name + "' " + detail::shape_text(e.shape)};
    }
    KD_TRY(m.backend().upload(host.data(), host.size(), m.params() + e.offset));
  }
  // A tied model may carry the head anyway (it equals the embedding); anything else is not ours.
  for (const auto& f : files)
    for (const io::tensor_info& t : f.tensors()) {
      if (used.count(t.name) != 0) continue;
      if (a.tied && t.name == "lm_head.weight") continue;
      return {errc::io_error, f.source() + ": tensor '" + t.name + "' is not part of this model (" +
                                  (a.family == family::qwen3_moe ? "qwen3_moe" : "llama") + " config of " +
                                  std::to_string(a.num_layers()) + " layers)"};
    }
  return {};
}

// Writes DIR/config.json and DIR/model.safetensors (weights converted to `c`'s dtype, HF's on-disk names).
template <ModelBackend B, class Config>
status save_checkpoint(const transformer<B>& m, const Config& c, const std::string& dir) {
  using T = typename transformer<B>::value_type;
  std::error_code ec;
  std::filesystem::create_directories(dir, ec);
  if (ec) return {errc::io_error, "cannot create '" + dir + "': " + ec.message()};
  std::vector<T> all(m.table().size());
  KD_TRY(m.backend().download(m.params(), all.size(), all.data()));
  // Converted copies, one per tensor, kept alive until the file is written.
  std::vector<std::vector<float>> f32;
  std::vector<std::vector<kd::bfloat16>> b16;
  std::vector<std::vector<kd::half>> f16;
  std::vector<io::tensor_to_write> out;
  // One output tensor from `count` elements at `src`, converted to the checkpoint's dtype.
  auto emit = [&](std::string name, const T* src, std::size_t count, std::vector<std::int64_t> shape) {
    switch (c.dtype) {
      case weight_dtype::float32: {
        auto& v = f32.emplace_back(count);
        for (std::size_t i = 0; i < count; ++i) v[i] = load_as<float>(src[i]);
        out.push_back(io::make_tensor(std::move(name), v, std::move(shape)));
        break;
      }
      case weight_dtype::bfloat16: {
        auto& v = b16.emplace_back(count);
        for (std::size_t i = 0; i < count; ++i) v[i] = store_as<kd::bfloat16>(load_as<float>(src[i]));
        out.push_back(io::make_tensor(std::move(name), v, std::move(shape)));
        break;
      }
      case weight_dtype::float16: {
        auto& v = f16.emplace_back(count);
        for (std::size_t i = 0; i < count; ++i) v[i] = store_as<kd::half>(load_as<float>(src[i]));
        out.push_back(io::make_tensor(std::move(name), v, std::move(shape)));
        break;
      }
    }
  };
  for (const param_entry& e : m.table().entries()) {
    const T* src = all.data() + e.offset;
    const bool gate_up = e.shape.size() == 3 && e.name.ends_with("mlp.experts.gate_up_proj");
    const bool down = e.shape.size() == 3 && e.name.ends_with("mlp.experts.down_proj");
    if (!gate_up && !down) {
      emit(e.name, src, e.numel, e.shape);
      continue;
    }
    // The experts go to disk one tensor each, as transformers' save_pretrained writes them (and as
    // published Qwen3-MoE checkpoints hold them); in memory they stay fused.
    const std::string base = e.name.substr(0, e.name.rfind('.') + 1);
    const std::int64_t E = e.shape[0], r = e.shape[1], k = e.shape[2];
    for (std::int64_t x = 0; x < E; ++x) {
      const T* ex = src + x * r * k;
      if (gate_up) {
        emit(base + std::to_string(x) + ".gate_proj.weight", ex, static_cast<std::size_t>(r / 2 * k), {r / 2, k});
        emit(base + std::to_string(x) + ".up_proj.weight", ex + r / 2 * k, static_cast<std::size_t>(r / 2 * k),
             {r / 2, k});
      } else {
        emit(base + std::to_string(x) + ".down_proj.weight", ex, static_cast<std::size_t>(r * k), {r, k});
      }
    }
  }
  std::string json;
  KD_TRY(to_json(c, json));
  KD_TRY(io::write_safetensors((std::filesystem::path(dir) / "model.safetensors").string(), out, {{"format", "pt"}}));
  return io::write_file_atomic((std::filesystem::path(dir) / "config.json").string(), json);
}

}  // namespace kd::model
