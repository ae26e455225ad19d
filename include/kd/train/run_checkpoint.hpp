// kd/train/run_checkpoint.hpp: a training run's checkpoint, written crash-safely and refused when corrupt.
//
// Layout of RUN/step-N/ (one directory per checkpoint):
//   config.json, model.safetensors   the model, HF format (kd/model/checkpoint.hpp): transformers loads
//                                    the directory as it is. Saved in the arena's own dtype (float32 for
//                                    float and double arenas, bf16, f16), so a float/bf16/f16 model resumes bit
//                                    for bit; a double arena is rounded to float32.
//   optimizer.bin                    the optimizer's save()/load() state
//   progress.json, rng.json, early_stopping.json, loss_scaler.json, objective.json, run_config.json
//   <name>.bin                       extension parts (checkpoint_part: the data loader's position, ...)
//   manifest.json                    written last: format version, step, and each part's file, size and
//                                    FNV-1a 64 checksum
// plus RUN/latest, a one-line pointer ("step-N") replaced atomically.
//
// Writing: every file goes through io::write_file_atomic (temp, fsync, rename) into RUN/step-N.tmp, which
// is renamed to RUN/step-N (parent fsynced) once complete; then `latest` moves; then old checkpoints
// beyond keep_last are removed. A crash at any point leaves the previous checkpoint and a `latest` that
// names a complete directory, or a stale `latest` that find_latest_checkpoint() steps over.
// Reading: every part's size and checksum are checked, then every part is parsed into temporaries and
// checked against the live run (model config and dtype, arena size, objective schedule, run config,
// set of parts); only when all of that passed is the live state replaced. The staging costs one more
// copy of the parameters on the model's backend and one on the host, plus a copy of the optimizer. Errors name the checkpoint
// directory, the part and its file: "checkpoint 'run/step-40': part 'optimizer' (optimizer.bin):
// checksum mismatch (the file was modified or damaged)".
// One writer per run directory (a second concurrent writer is not detected).
#pragma once

#include <algorithm>
#include <bit>
#include <charconv>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <functional>
#include <map>
#include <memory>
#include <sstream>
#include <string>
#include <string_view>
#include <system_error>
#include <type_traits>
#include <utility>
#include <vector>

#include <nlohmann/json.hpp>

#include <kd/core/numeric.hpp>
#include <kd/core/rng.hpp>
#include <kd/core/status.hpp>
#include <kd/io/atomic_file.hpp>
#include <kd/model/checkpoint.hpp>
#include <kd/train/early_stopping.hpp>
#include <kd/train/loss_scaler.hpp>
#include <kd/train/objective.hpp>

namespace kd {

inline constexpr int run_checkpoint_version = 1;

// FNV-1a 64 over a byte range, continuing from `h` (start with fnv1a64_seed).
inline constexpr std::uint64_t fnv1a64_seed = 0xcbf29ce484222325ull;
inline std::uint64_t fnv1a64(const void* data, std::size_t n, std::uint64_t h = fnv1a64_seed) noexcept {
  const auto* p = static_cast<const unsigned char*>(data);
  for (std::size_t i = 0; i < n; ++i) h = (h ^ p[i]) * 0x100000001b3ull;
  return h;
}

// An extension part: `save` produces its bytes; `load` parses and checks them WITHOUT touching the live
// state and, on success, sets `commit` to the action that applies them (run only once every part of the
// checkpoint has loaded; it must not fail). Names: [a-z0-9_], stored as <name>.bin.
struct checkpoint_part {
  std::string name;
  std::function<status(std::string& bytes)> save;
  std::function<status(std::string_view bytes, std::function<void()>& commit)> load;
};

// An optimizer (save(std::ostream&) / load(std::istream&), copyable) as a checkpoint part: the run's own
// optimizer uses it, and a run with more than one (e.g. a projection's) adds the others to `extra`. A
// copy takes the load (the live optimizer's arena size and options are what it is checked against) and
// replaces the live one on commit, so a rejected checkpoint leaves the live optimizer untouched.
template <class Optimizer>
checkpoint_part optimizer_part(std::string name, Optimizer& opt) {
  checkpoint_part p;
  p.name = std::move(name);
  p.save = [&opt](std::string& bytes) {
    std::ostringstream os(std::ios::binary);
    KD_TRY(opt.save(os));
    bytes = std::move(os).str();
    return status{};
  };
  p.load = [&opt](std::string_view bytes, std::function<void()>& commit) {
    auto tmp = std::make_shared<Optimizer>(opt);
    std::istringstream is{std::string(bytes), std::ios::binary};
    KD_TRY(tmp->load(is));
    if (is.peek() != std::char_traits<char>::eof()) return status{errc::io_error, "trailing bytes after the optimizer state"};
    commit = [&opt, tmp] { opt = std::move(*tmp); };
    return status{};
  };
  return p;
}

// What a run checkpoint holds: pointers to the live state. model, model_config, optimizer and step are
// required; a null pointer or an empty run_config / rngs leaves that part out (and a checkpoint that
// has it is then refused as belonging to another kind of run).
template <model::ModelBackend B, class Config, class Optimizer>
struct run_state {
  model::transformer<B>* model = nullptr;
  const Config* model_config = nullptr;  // moe_config or dense_config
  Optimizer* optimizer = nullptr;        // save(std::ostream&) / load(std::istream&), e.g. kd::adamw<T>
  std::int64_t* step = nullptr;          // optimizer steps completed
  std::string run_config;                // the run's configuration as JSON (must equal the checkpoint's)
  std::vector<std::pair<std::string, kd::rng*>> rngs;  // named generators
  kd::early_stopping* early_stopping = nullptr;
  kd::dynamic_loss_scaler* loss_scaler = nullptr;
  const kd::objective* objective = nullptr;  // stateless: its weights at the saved step must match
  std::vector<checkpoint_part> extra;
};

struct checkpoint_options {
  int keep_last = 3;  // checkpoints kept in the run directory, newest first; 0 = keep all
};

namespace detail {

namespace ckpt {

using json = nlohmann::json;
namespace fs = std::filesystem;

inline constexpr std::string_view manifest_file = "manifest.json";
inline constexpr std::string_view latest_file = "latest";
inline constexpr std::string_view format_name = "kd-run-checkpoint";

// A part as the generic machinery sees it (the model's two files are handled beside these).
struct part {
  std::string name, file;
  std::function<status(std::string&)> save;
  std::function<status(std::string_view, std::function<void()>&)> load;
};

// Doubles travel as their bit pattern: exact, and inf (early stopping's initial best) is not JSON.
inline std::uint64_t bits(double v) noexcept { return std::bit_cast<std::uint64_t>(v); }
inline double from_bits(std::uint64_t b) noexcept { return std::bit_cast<double>(b); }

inline std::string hex(std::uint64_t v) {
  char buf[17];
  std::snprintf(buf, sizeof buf, "%016llx", static_cast<unsigned long long>(v));
  return buf;
}

inline status dump(const json& j, std::string& out) {
  try {
    out = j.dump(2) + "\n";
  } catch (const json::exception& e) {
    return {errc::invalid_argument, std::string("cannot serialize: ") + e.what()};
  }
  return {};
}

// Parses `bytes` as a JSON object and hands it to `read` (which may throw json exceptions: they become
// a status saying what is wrong).
template <class Read>
status parse(std::string_view bytes, Read&& read) {
  try {
    const json j = json::parse(bytes);
    if (!j.is_object()) return {errc::io_error, "not a JSON object"};
    return read(j);
  } catch (const json::exception& e) {
    return {errc::io_error, std::string("unparsable: ") + e.what()};
  }
}

inline bool valid_part_name(std::string_view n) {
  return !n.empty() && n.size() <= 64 &&
         std::all_of(n.begin(), n.end(), [](char c) { return (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') || c == '_'; });
}

// "step-N" -> N; false for anything else (step-N.tmp, latest, ...).
inline bool parse_step_name(std::string_view name, std::int64_t& n) {
  if (!name.starts_with("step-") || name.size() == 5 || name.size() > 5 + 18) return false;
  const char* b = name.data() + 5;
  const char* e = name.data() + name.size();
  const auto r = std::from_chars(b, e, n);
  return r.ec == std::errc{} && r.ptr == e && n >= 0;
}
inline std::string step_name(std::int64_t n) { return "step-" + std::to_string(n); }

// Reads a whole file (into `keep` unless null) and checksums it on the way.
inline status read_hashed(const fs::path& path, std::string* keep, std::uint64_t& size, std::uint64_t& hash) {
  std::ifstream f(path, std::ios::binary);
  if (!f) return {errc::io_error, "cannot open the file"};
  std::vector<char> buf(1 << 20);
  size = 0;
  hash = fnv1a64_seed;
  if (keep != nullptr) keep->clear();
  while (f) {
    f.read(buf.data(), static_cast<std::streamsize>(buf.size()));
    const auto n = static_cast<std::size_t>(f.gcount());
    hash = fnv1a64(buf.data(), n, hash);
    size += n;
    if (keep != nullptr) keep->append(buf.data(), n);
  }
  if (f.bad()) return {errc::io_error, "read error"};
  return {};
}

inline void sync_dir(const fs::path& dir) { io::detail::sync_directory_of((dir / "x").string()); }

template <class T>
constexpr model::weight_dtype dtype_of_arena() {
  if constexpr (std::is_same_v<T, bfloat16>) return model::weight_dtype::bfloat16;
  else if constexpr (std::is_same_v<T, half>) return model::weight_dtype::float16;
  else return model::weight_dtype::float32;
}

// The model config as the checkpoint stores it: the run's, in the arena's dtype.
template <model::ModelBackend B, class Config>
Config stored_config(const Config& c) {
  Config out = c;
  out.dtype = dtype_of_arena<typename B::value_type>();
  return out;
}

// The first top-level key on which two JSON objects differ, for the mismatch message.
inline std::string first_difference(const json& a, const json& b) {
  if (!a.is_object() || !b.is_object()) return "(the whole document)";
  for (const auto& [k, v] : a.items())
    if (!b.contains(k) || b.at(k) != v) return "'" + k + "'";
  for (const auto& [k, v] : b.items())
    if (!a.contains(k)) return "'" + k + "'";
  return "(none)";
}

// The built-in parts of a run state plus its extension parts.
template <class S>
status collect_parts(S& s, std::vector<part>& out) {
  out.clear();
  if (s.model == nullptr || s.model_config == nullptr || s.optimizer == nullptr || s.step == nullptr)
    return {errc::invalid_argument, "run checkpoint: model, model_config, optimizer and step are required"};

  {
    checkpoint_part opt = optimizer_part("optimizer", *s.optimizer);
    out.push_back({opt.name, opt.name + ".bin", std::move(opt.save), std::move(opt.load)});
  }

  out.push_back({"progress", "progress.json",
                 [&s](std::string& bytes) { return dump(json{{"step", *s.step}}, bytes); },
                 [&s](std::string_view bytes, std::function<void()>& commit) {
                   return parse(bytes, [&](const json& j) {
                     const auto step = j.at("step").get<std::int64_t>();
                     if (step < 0) return status{errc::io_error, "negative step " + std::to_string(step)};
                     commit = [&s, step] { *s.step = step; };
                     return status{};
                   });
                 }});

  if (!s.rngs.empty()) {
    for (std::size_t i = 0; i < s.rngs.size(); ++i) {
      if (s.rngs[i].second == nullptr) return {errc::invalid_argument, "run checkpoint: rng '" + s.rngs[i].first + "' is null"};
      for (std::size_t k = 0; k < i; ++k)
        if (s.rngs[k].first == s.rngs[i].first)
          return {errc::invalid_argument, "run checkpoint: rng '" + s.rngs[i].first + "' is named twice"};
    }
    out.push_back({"rng", "rng.json",
                   [&s](std::string& bytes) {
                     json j = json::object();
                     for (const auto& [name, g] : s.rngs) j[name] = g->state;
                     return dump(json{{"streams", j}}, bytes);
                   },
                   [&s](std::string_view bytes, std::function<void()>& commit) {
                     return parse(bytes, [&](const json& j) {
                       const json& streams = j.at("streams");
                       if (streams.size() != s.rngs.size())
                         return status{errc::invalid_argument, "holds " + std::to_string(streams.size()) +
                                                                   " generators, the run has " + std::to_string(s.rngs.size())};
                       std::vector<std::uint64_t> states;
                       for (const auto& [name, g] : s.rngs) {
                         if (!streams.contains(name))
                           return status{errc::invalid_argument, "no state for the run's generator '" + name + "'"};
                         states.push_back(streams.at(name).template get<std::uint64_t>());
                       }
                       commit = [&s, states] {
                         for (std::size_t i = 0; i < states.size(); ++i) s.rngs[i].second->state = states[i];
                       };
                       return status{};
                     });
                   }});
  }

  if (s.early_stopping != nullptr)
    out.push_back({"early_stopping", "early_stopping.json",
                   [&s](std::string& bytes) {
                     const auto st = s.early_stopping->state();
                     return dump(json{{"best_bits", bits(st.best)}, {"bad", st.bad}, {"stop", st.stop}}, bytes);
                   },
                   [&s](std::string_view bytes, std::function<void()>& commit) {
                     return parse(bytes, [&](const json& j) {
                       kd::early_stopping::snapshot st;
                       st.best = from_bits(j.at("best_bits").get<std::uint64_t>());
                       st.bad = j.at("bad").get<std::int64_t>();
                       st.stop = j.at("stop").get<bool>();
                       if (st.bad < 0) return status{errc::io_error, "negative evaluation count"};
                       commit = [&s, st] { s.early_stopping->restore(st); };
                       return status{};
                     });
                   }});

  if (s.loss_scaler != nullptr)
    out.push_back({"loss_scaler", "loss_scaler.json",
                   [&s](std::string& bytes) {
                     const auto st = s.loss_scaler->state();
                     return dump(json{{"scale_bits", bits(st.scale)}, {"clean", st.clean}, {"skipped", st.skipped}}, bytes);
                   },
                   [&s](std::string_view bytes, std::function<void()>& commit) {
                     return parse(bytes, [&](const json& j) {
                       kd::dynamic_loss_scaler::snapshot st;
                       st.scale = from_bits(j.at("scale_bits").get<std::uint64_t>());
                       st.clean = j.at("clean").get<std::int64_t>();
                       st.skipped = j.at("skipped").get<std::int64_t>();
                       if (!(st.scale > 0.0) || !std::isfinite(st.scale) || st.clean < 0 || st.skipped < 0)
                         return status{errc::io_error, "scale or counters out of range"};
                       commit = [&s, st] { s.loss_scaler->restore(st); };
                       return status{};
                     });
                   }});

  // The objective has no mutable state (its schedules are functions of the step); the part records its
  // components and their values at the saved step, so resuming under a changed curriculum is refused.
  if (s.objective != nullptr)
    out.push_back({"objective", "objective.json",
                   [&s](std::string& bytes) {
                     const std::int64_t t = *s.step;
                     json comps = json::array();
                     for (const std::string& n : s.objective->names())
                       comps.push_back(json{{"name", n}, {"weight_bits", bits(s.objective->weight(n, t))}});
                     return dump(json{{"step", t}, {"components", comps},
                                      {"temperature_bits", bits(s.objective->temperature_at(t))}},
                                 bytes);
                   },
                   [&s](std::string_view bytes, std::function<void()>& commit) {
                     return parse(bytes, [&](const json& j) {
                       const auto t = j.at("step").get<std::int64_t>();
                       const json& comps = j.at("components");
                       std::vector<std::string> names;
                       for (const json& c : comps) names.push_back(c.at("name").get<std::string>());
                       if (names != s.objective->names()) {
                         std::string a, b;
                         for (const auto& n : names) a += (a.empty() ? "" : ", ") + n;
                         for (const auto& n : s.objective->names()) b += (b.empty() ? "" : ", ") + n;
                         return status{errc::invalid_argument, "components {" + a + "} differ from the run's {" + b + "}"};
                       }
                       for (const json& c : comps) {
                         const std::string n = c.at("name").get<std::string>();
                         const double saved = from_bits(c.at("weight_bits").get<std::uint64_t>());
                         const double live = s.objective->weight(n, t);
                         if (bits(saved) != bits(live))
                           return status{errc::invalid_argument, "component '" + n + "' weighs " + std::to_string(saved) +
                                                                     " at step " + std::to_string(t) + ", the run's schedule gives " +
                                                                     std::to_string(live)};
                       }
                       const double temp = from_bits(j.at("temperature_bits").get<std::uint64_t>());
                       if (bits(temp) != bits(s.objective->temperature_at(t)))
                         return status{errc::invalid_argument, "temperature " + std::to_string(temp) + " at step " +
                                                                   std::to_string(t) + ", the run's schedule gives " +
                                                                   std::to_string(s.objective->temperature_at(t))};
                       commit = [] {};
                       return status{};
                     });
                   }});

  if (!s.run_config.empty()) {
    if (!json::accept(s.run_config)) return {errc::invalid_argument, "run checkpoint: the run config is not valid JSON"};
    out.push_back({"run_config", "run_config.json",
                   [&s](std::string& bytes) { return dump(json::parse(s.run_config), bytes); },
                   [&s](std::string_view bytes, std::function<void()>& commit) {
                     return parse(bytes, [&](const json& j) {
                       const json live = json::parse(s.run_config);
                       if (j != live)
                         return status{errc::invalid_argument,
                                       "differs from this run's config at key " + first_difference(j, live)};
                       commit = [] {};
                       return status{};
                     });
                   }});
  }

  for (const checkpoint_part& p : s.extra) {
    if (!valid_part_name(p.name))
      return {errc::invalid_argument, "run checkpoint: part name '" + p.name + "' (use 1-64 of [a-z0-9_])"};
    if (!p.save || !p.load) return {errc::invalid_argument, "run checkpoint: part '" + p.name + "' lacks save or load"};
    out.push_back({p.name, p.name + ".bin", p.save, p.load});
  }
  for (std::size_t i = 0; i < out.size(); ++i)
    for (std::size_t k = 0; k < i; ++k)
      if (out[k].name == out[i].name || out[i].name == "model" || out[i].name == "model_config")
        return {errc::invalid_argument, "run checkpoint: part name '" + out[i].name + "' is taken"};
  return {};
}

inline status error_in(const fs::path& dir, std::string_view part, std::string_view file, const status& s) {
  return {s.code(), "checkpoint '" + dir.string() + "': part '" + std::string(part) + "' (" + std::string(file) +
                        "): " + s.message()};
}

struct manifest_entry {
  std::string name, file;
  std::uint64_t size = 0, hash = 0;
};

inline status read_manifest(const fs::path& dir, std::int64_t& step, std::vector<manifest_entry>& parts) {
  std::string text;
  std::uint64_t size = 0, hash = 0;
  const std::string file(manifest_file);
  auto fail = [&](const status& s) { return error_in(dir, "manifest", file, s); };
  if (!fs::exists(dir / file)) return fail({errc::io_error, "missing (an incomplete or foreign directory)"});
  if (status s = read_hashed(dir / file, &text, size, hash); !s) return fail(s);
  parts.clear();
  const status parsed = parse(text, [&](const json& j) {
    if (j.at("format").get<std::string>() != format_name)
      return status{errc::invalid_argument, "format '" + j.at("format").get<std::string>() + "', expected '" +
                                                 std::string(format_name) + "'"};
    const int v = j.at("version").get<int>();
    if (v != run_checkpoint_version)
      return status{errc::invalid_argument, "format version " + std::to_string(v) + ", this build reads version " +
                                                 std::to_string(run_checkpoint_version)};
    step = j.at("step").get<std::int64_t>();
    for (const json& p : j.at("parts")) {
      manifest_entry e;
      e.name = p.at("name").get<std::string>();
      e.file = p.at("file").get<std::string>();
      e.size = p.at("size").get<std::uint64_t>();
      const std::string h = p.at("fnv1a64").get<std::string>();
      const auto r = std::from_chars(h.data(), h.data() + h.size(), e.hash, 16);
      if (h.size() != 16 || r.ec != std::errc{} || r.ptr != h.data() + h.size())
        return status{errc::io_error, "part '" + e.name + "': checksum '" + h + "' is not 16 hex digits"};
      if (e.file.find('/') != std::string::npos || e.file.find("..") != std::string::npos || e.file.empty())
        return status{errc::io_error, "part '" + e.name + "': file name '" + e.file + "' leaves the checkpoint"};
      parts.push_back(std::move(e));
    }
    return status{};
  });
  return parsed ? parsed : fail(parsed);
}

// Size and checksum of one listed file; its bytes into `keep` unless null.
inline status verify(const fs::path& dir, const manifest_entry& e, std::string* keep) {
  auto fail = [&](const status& s) { return error_in(dir, e.name, e.file, s); };
  std::error_code ec;
  if (!fs::is_regular_file(dir / e.file, ec)) return fail({errc::io_error, "missing"});
  const std::uintmax_t on_disk = fs::file_size(dir / e.file, ec);
  if (ec) return fail({errc::io_error, "cannot stat: " + ec.message()});
  if (on_disk != e.size)
    return fail({errc::io_error, (on_disk < e.size ? "truncated: " : "wrong size: ") + std::to_string(on_disk) +
                                     " bytes, the manifest says " + std::to_string(e.size)});
  std::uint64_t size = 0, hash = 0;
  if (status s = read_hashed(dir / e.file, keep, size, hash); !s) return fail(s);
  if (size != e.size || hash != e.hash)
    return fail({errc::io_error, "checksum mismatch (the file was modified or damaged: FNV-1a 64 " + hex(hash) +
                                     ", the manifest says " + hex(e.hash) + ")"});
  return {};
}

// The entries of a directory (empty when it cannot be read); never throws.
inline std::vector<fs::directory_entry> entries(const fs::path& dir) {
  std::vector<fs::directory_entry> out;
  std::error_code ec;
  for (fs::directory_iterator it(dir, ec), end; !ec && it != end; it.increment(ec)) out.push_back(*it);
  return out;
}

// Removes leftover step-N.tmp / step-N.old directories and the step-N directories beyond the newest
// keep - 1 besides `current` (keep <= 0: none of those).
inline void prune(const fs::path& run, int keep, std::int64_t current) {
  std::error_code ec;
  std::vector<std::int64_t> steps;
  for (const auto& d : entries(run)) {
    const std::string n = d.path().filename().string();
    std::int64_t k = 0;
    if (!d.is_directory(ec)) continue;
    if (parse_step_name(n, k)) steps.push_back(k);
    else if (n.starts_with("step-") && (n.ends_with(".tmp") || n.ends_with(".old"))) fs::remove_all(d.path(), ec);
  }
  if (keep <= 0) return;
  std::sort(steps.rbegin(), steps.rend());
  int others = 0;
  for (std::int64_t k : steps) {
    if (k == current) continue;
    if (++others < keep) continue;
    fs::remove_all(run / step_name(k), ec);
  }
}

}  // namespace ckpt

}  // namespace detail

// RUN/latest, or when that is missing or stale (names no complete checkpoint: a crash between the
// directory rename and the pointer update, a pruned or deleted directory), the newest RUN/step-N that has
// a manifest. `out` is the checkpoint directory; errc::io_error when the run has none.
inline status find_latest_checkpoint(const std::string& run_dir, std::string& out) {
  namespace fs = std::filesystem;
  using namespace detail::ckpt;
  const fs::path run(run_dir);
  std::error_code ec;
  {
    std::ifstream f(run / latest_file);
    std::string line;
    std::int64_t n = 0;
    if (f && std::getline(f, line) && parse_step_name(line, n) && fs::is_regular_file(run / line / manifest_file, ec)) {
      out = (run / line).string();
      return {};
    }
  }
  std::int64_t best = -1;
  for (const auto& d : entries(run)) {
    std::int64_t n = 0;
    if (parse_step_name(d.path().filename().string(), n) && n > best && fs::is_regular_file(d.path() / manifest_file, ec))
      best = n;
  }
  if (best < 0) return {errc::io_error, "'" + run_dir + "' holds no complete checkpoint"};
  out = (run / step_name(best)).string();
  return {};
}

// Writes RUN/step-<*state.step> as described at the top; `written` (optional) receives its path.
template <model::ModelBackend B, class Config, class Optimizer>
status save_run_checkpoint(const std::string& run_dir, run_state<B, Config, Optimizer>& state,
                           const checkpoint_options& opt = {}, std::string* written = nullptr) {
  namespace fs = std::filesystem;
  using namespace detail::ckpt;
  std::vector<part> parts;
  KD_TRY(collect_parts(state, parts));
  const std::int64_t step = *state.step;
  if (step < 0) return {errc::invalid_argument, "run checkpoint: negative step " + std::to_string(step)};
  const fs::path run(run_dir), final_dir = run / step_name(step), tmp = run / (step_name(step) + ".tmp");
  std::error_code ec;
  fs::create_directories(run, ec);
  if (ec) return {errc::io_error, "cannot create '" + run.string() + "': " + ec.message()};
  fs::remove_all(tmp, ec);  // a crashed earlier attempt at this step
  if (!fs::create_directory(tmp, ec) || ec)
    return {errc::io_error, "cannot create '" + tmp.string() + "': " + (ec ? ec.message() : "it exists")};
  auto fail = [&](const status& s) {
    std::error_code ignored;
    fs::remove_all(tmp, ignored);
    return s;
  };

  json listed = json::array();
  auto list = [&](const std::string& name, const std::string& file, std::uint64_t size, std::uint64_t hash) {
    listed.push_back(json{{"name", name}, {"file", file}, {"size", size}, {"fnv1a64", hex(hash)}});
  };
  if (status s = model::save_checkpoint(*state.model, stored_config<B>(*state.model_config), tmp.string()); !s)
    return fail(s);
  for (const auto& [name, file] : {std::pair<std::string, std::string>{"model", "model.safetensors"}, {"model_config", "config.json"}}) {
    std::uint64_t size = 0, hash = 0;
    if (status s = read_hashed(tmp / file, nullptr, size, hash); !s) return fail(error_in(tmp, name, file, s));
    list(name, file, size, hash);
  }
  for (const part& p : parts) {
    std::string bytes;
    if (status s = p.save(bytes); !s) return fail(error_in(tmp, p.name, p.file, s));
    if (status s = io::write_file_atomic((tmp / p.file).string(), std::string_view(bytes)); !s) return fail(s);
    list(p.name, p.file, bytes.size(), fnv1a64(bytes.data(), bytes.size()));
  }
  std::string manifest;
  if (status s = dump(json{{"format", format_name}, {"version", run_checkpoint_version}, {"step", step}, {"parts", listed}},
                      manifest);
      !s)
    return fail(s);
  if (status s = io::write_file_atomic((tmp / manifest_file).string(), std::string_view(manifest)); !s) return fail(s);

  // Replacing a checkpoint of the same step (an emergency save right after a regular one): move the old
  // one aside first, as a directory cannot be renamed over a non-empty one.
  const fs::path old = run / (step_name(step) + ".old");
  if (fs::exists(final_dir, ec)) {
    fs::remove_all(old, ec);
    fs::rename(final_dir, old, ec);
    if (ec) return fail({errc::io_error, "cannot move '" + final_dir.string() + "' aside: " + ec.message()});
  }
  fs::rename(tmp, final_dir, ec);
  if (ec && fs::exists(old)) {
    std::error_code ignored;
    fs::rename(old, final_dir, ignored);  // put the previous one back
  }
  if (ec) return fail({errc::io_error, "cannot rename '" + tmp.string() + "' to '" + final_dir.string() + "': " + ec.message()});
  sync_dir(run);
  KD_TRY(io::write_file_atomic((run / latest_file).string(), step_name(step) + "\n"));
  fs::remove_all(old, ec);
  prune(run, opt.keep_last, step);
  if (written != nullptr) *written = final_dir.string();
  return {};
}

// Loads checkpoint directory DIR into the live run state: all or nothing (see the top of the file).
template <model::ModelBackend B, class Config, class Optimizer>
status load_run_checkpoint(const std::string& dir, run_state<B, Config, Optimizer>& state) {
  namespace fs = std::filesystem;
  using namespace detail::ckpt;
  using T = typename B::value_type;
  std::vector<part> parts;
  KD_TRY(collect_parts(state, parts));
  const fs::path d(dir);
  std::int64_t step = 0;
  std::vector<manifest_entry> listed;
  KD_TRY(read_manifest(d, step, listed));

  auto find = [&](std::string_view name) -> const manifest_entry* {
    for (const auto& e : listed)
      if (e.name == name) return &e;
    return nullptr;
  };
  for (const auto& e : listed) {
    const bool known = e.name == "model" || e.name == "model_config" ||
                       std::any_of(parts.begin(), parts.end(), [&](const part& p) { return p.name == e.name; });
    if (!known)
      return error_in(d, e.name, e.file, {errc::invalid_argument, "this run has no such part (a checkpoint of another kind of run)"});
  }
  for (const char* name : {"model", "model_config"})
    if (find(name) == nullptr) return error_in(d, name, name == std::string("model") ? "model.safetensors" : "config.json",
                                               {errc::io_error, "not listed in the manifest"});
  for (const part& p : parts)
    if (find(p.name) == nullptr) return error_in(d, p.name, p.file, {errc::io_error, "not listed in the manifest"});

  // 1. Every file intact.
  KD_TRY(verify(d, *find("model"), nullptr));
  KD_TRY(verify(d, *find("model_config"), nullptr));
  std::vector<std::string> bytes(parts.size());
  for (std::size_t i = 0; i < parts.size(); ++i) KD_TRY(verify(d, *find(parts[i].name), &bytes[i]));

  // 2. Everything parsed into temporaries and checked against the run.
  {
    const auto& e = *find("model_config");
    model::any_config saved;
    if (status s = model::read_config(dir, saved); !s) return error_in(d, e.name, e.file, s);
    const Config expect = stored_config<B>(*state.model_config);
    const Config* got = std::get_if<Config>(&saved);
    if (got == nullptr) return error_in(d, e.name, e.file, {errc::invalid_argument, "a model of another architecture"});
    if (got->dtype != expect.dtype)
      return error_in(d, e.name, e.file, {errc::invalid_argument, "weights stored as another dtype than this run's arena"});
    if (!(*got == expect))
      return error_in(d, e.name, e.file, {errc::invalid_argument, "the model config differs from this run's"});
  }
  std::vector<T> weights;
  {
    const auto& e = *find("model");
    model::transformer<B> tmp(state.model->backend(), state.model->arch());
    if (status s = tmp.allocate(false); !s) return error_in(d, e.name, e.file, s);
    if (status s = model::load_weights(tmp, dir); !s) return error_in(d, e.name, e.file, s);
    weights.resize(tmp.table().size());
    if (status s = tmp.backend().download(tmp.params(), weights.size(), weights.data()); !s)
      return error_in(d, e.name, e.file, s);
  }
  std::vector<std::function<void()>> commits(parts.size());
  for (std::size_t i = 0; i < parts.size(); ++i)
    if (status s = parts[i].load(bytes[i], commits[i]); !s) return error_in(d, parts[i].name, parts[i].file, s);

  // 3. Commit: the upload first, as it alone can fail (a device error; the run is then lost anyway).
  if (status s = state.model->backend().upload(weights.data(), weights.size(), state.model->params()); !s)
    return error_in(d, "model", "model.safetensors", s);
  for (auto& c : commits)
    if (c) c();
  return {};
}

}  // namespace kd
