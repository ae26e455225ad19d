// tests/loss_matrix.hpp: a generated test matrix for the token losses, in the style of ggml's
// test-backend-ops: each loss declares its parameter space (a *_space), generate() takes the product and
// prunes impossible combinations, and run_*_case() runs one case through a backend executor and checks it
// against the fp64 CPU reference. The executor is the only backend-specific part (tests/test_loss_matrix.cpp
// runs kd::cpu on host vectors, tests/cuda/test_cuda_loss_matrix.cu uploads and runs kd::cuda), so the CPU
// and CUDA matrices share the generator, the inputs, the reference and the verdicts.
//
// Every case draws fresh inputs from its own seed (run seed x case index; the run seed comes from
// KD_MATRIX_SEED or std::random_device and is printed with every failure), poisons its gradient outputs with
// NaN unless it accumulates, and compares the loss, the token count and every gradient element (relative to
// the reference gradient's max-abs). Bad-input cases must be rejected: an unexpected ok fails.
// Free of doctest macros: the test files turn verdicts into CHECKs.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <limits>
#include <map>
#include <memory>
#include <random>
#include <span>
#include <string>
#include <tuple>
#include <type_traits>
#include <vector>

#include <kd/kd.hpp>

#include "tvd_ties.hpp"

namespace kdmatrix {

using kd::index_t;

// ---------------------------------------------------------------------------------------------
// Parameter values
// ---------------------------------------------------------------------------------------------
enum class prec { fp32, bf16, fp16 };
enum class div_kind { forward_kl, reverse_kl, jsd, skew_kl, tvd };
// one vocabulary; padded columns; a many-to-one teacher -> student map; a one-to-one map whose slot j is
// teacher column j (kd::vocab_map::contiguous_teacher: the trainer's compact teacher head)
enum class vocab_layout { shared, padded, mapped, contiguous };
enum class ignore_mode { none, some, all };          // no labels / every third row ignored / every row ignored
enum class reduce_mode { sum, mean, mean_global };   // kd::none; token_mean; token_mean with global_tokens

inline const char* name_of(prec p) { return p == prec::fp32 ? "fp32" : p == prec::bf16 ? "bf16" : "fp16"; }
inline const char* name_of(div_kind d) {
  constexpr const char* n[] = {"forward_kl", "reverse_kl", "jsd", "skew_kl", "tvd"};
  return n[static_cast<int>(d)];
}
inline const char* name_of(vocab_layout l) {
  return l == vocab_layout::shared ? "shared" : l == vocab_layout::padded ? "padded" : l == vocab_layout::mapped ? "mapped" : "contiguous";
}
inline const char* name_of(ignore_mode i) {
  return i == ignore_mode::none ? "no-labels" : i == ignore_mode::some ? "some-ignored" : "all-ignored";
}
inline const char* name_of(reduce_mode r) {
  return r == reduce_mode::sum ? "sum" : r == reduce_mode::mean ? "mean" : "mean-global";
}

// Storage type of a precision, as a tag passed to generic lambdas.
template <class T>
struct type_tag {
  using type = T;
};
template <class F>
decltype(auto) with_storage(prec p, F&& f) {
  switch (p) {
    case prec::fp32: return f(type_tag<float>{});
    case prec::bf16: return f(type_tag<kd::bfloat16>{});
    default: return f(type_tag<kd::half>{});
  }
}
template <class F>
decltype(auto) with_divergence(div_kind d, F&& f) {
  switch (d) {
    case div_kind::forward_kl: return f(type_tag<kd::forward_kl>{});
    case div_kind::reverse_kl: return f(type_tag<kd::reverse_kl>{});
    case div_kind::jsd: return f(type_tag<kd::jsd>{});
    case div_kind::skew_kl: return f(type_tag<kd::skew_kl>{});
    default: return f(type_tag<kd::tvd>{});
  }
}
template <class F>
decltype(auto) with_reduction(reduce_mode r, F&& f) {
  if (r == reduce_mode::sum) return f(type_tag<kd::none>{});
  return f(type_tag<kd::token_mean>{});
}

// Tolerances: fp32 storage ~1e-5 relative, 16-bit storage ~1e-2 (inputs are rounded to storage before the
// reference sees them, so only accumulation and output rounding differ).
// Gradients are compared element by element against the reference's max-abs: in fp32 a softmax at T = 0.5
// over logits of spread ~16 loses ~|z| eps per element, so 1e-4 (measured worst ~5e-5 over the CPU matrix).
inline double tolerance(prec p) { return p == prec::fp32 ? 2e-5 : 1e-2; }
inline double grad_tolerance(prec p) { return p == prec::fp32 ? 1e-4 : 1e-2; }

// ---------------------------------------------------------------------------------------------
// Seeds
// ---------------------------------------------------------------------------------------------
inline std::uint64_t splitmix(std::uint64_t x) {
  x += 0x9e3779b97f4a7c15ull;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}

// KD_MATRIX_SEED=<n> reproduces a run; otherwise a fresh seed per run.
inline std::uint64_t run_seed() {
  static const std::uint64_t s = [] {
    if (const char* e = std::getenv("KD_MATRIX_SEED")) return static_cast<std::uint64_t>(std::strtoull(e, nullptr, 10));
    return (static_cast<std::uint64_t>(std::random_device{}()) << 32) ^ std::random_device{}();
  }();
  return s;
}

// KD_MATRIX_ONLY=<substring> runs only the cases whose name contains it.
inline bool selected(const std::string& name) {
  const char* e = std::getenv("KD_MATRIX_ONLY");
  return e == nullptr || name.find(e) != std::string::npos;
}

// ---------------------------------------------------------------------------------------------
// Statistics and verdicts
// ---------------------------------------------------------------------------------------------
struct verdict {
  bool ok = true;
  std::string what;  // case name and numbers on failure
  double loss_err = 0, grad_err = 0;
};

// Cases run and worst errors per precision (reported with MESSAGE at the end of each test).
struct stats {
  long cases[3] = {0, 0, 0};
  long bad_inputs = 0;
  double worst_loss[3] = {0, 0, 0}, worst_grad[3] = {0, 0, 0};
  std::vector<std::string> failures;

  void add(prec p, const verdict& v) {
    const int i = static_cast<int>(p);
    ++cases[i];
    // NaN errors count as failures, not as worst errors.
    if (v.loss_err == v.loss_err) worst_loss[i] = std::max(worst_loss[i], v.loss_err);
    if (v.grad_err == v.grad_err) worst_grad[i] = std::max(worst_grad[i], v.grad_err);
    if (!v.ok) failures.push_back(v.what);
  }
  void add_bad(const verdict& v) {
    ++bad_inputs;
    if (!v.ok) failures.push_back(v.what);
  }
  [[nodiscard]] std::string summary(const std::string& title) const {
    std::string s = title + ": " + std::to_string(cases[0] + cases[1] + cases[2]) + " cases, " +
                    std::to_string(bad_inputs) + " bad-input cases, " + std::to_string(failures.size()) +
                    " failed (run seed " + std::to_string(run_seed()) + ")";
    for (int i = 0; i < 3; ++i) {
      if (cases[i] == 0) continue;
      char buf[160];
      std::snprintf(buf, sizeof buf, "; %s: %ld cases, worst loss err %.3g, worst grad err %.3g",
                    name_of(static_cast<prec>(i)), cases[i], worst_loss[i], worst_grad[i]);
      s += buf;
    }
    return s;
  }
};

// ---------------------------------------------------------------------------------------------
// Inputs
// ---------------------------------------------------------------------------------------------
using rng_t = std::mt19937_64;

template <class T>
T from_double(double v) {
  return kd::store_as<T>(static_cast<float>(v));
}
template <>
inline float from_double<float>(double v) {
  return static_cast<float>(v);
}
template <class T>
std::vector<double> to_doubles(const std::vector<T>& v) {
  std::vector<double> out(v.size());
  for (std::size_t i = 0; i < v.size(); ++i) out[i] = kd::load_as<double>(v[i]);
  return out;
}
template <class T>
std::vector<T> normal_storage(std::size_t n, double stddev, rng_t& g) {
  std::normal_distribution<double> d(0.0, stddev);
  std::vector<T> out(n);
  for (auto& x : out) x = from_double<T>(d(g));
  return out;
}
template <class T>
std::vector<T> nan_storage(std::size_t n) {
  return std::vector<T>(n, from_double<T>(std::numeric_limits<double>::quiet_NaN()));
}

// Worst |a - b| over the elements, relative to the max-abs of the reference b (NaN in a gives NaN).
inline double max_rel_error(const std::vector<double>& a, const std::vector<double>& b, double scale_floor = 0) {
  if (a.size() != b.size()) return std::numeric_limits<double>::infinity();
  double scale = scale_floor, worst = 0;
  for (double x : b) scale = std::max(scale, std::abs(x));
  if (scale == 0) scale = 1;
  for (std::size_t i = 0; i < a.size(); ++i) {
    const double e = std::abs(a[i] - b[i]);
    if (!(e == e)) return std::numeric_limits<double>::quiet_NaN();
    worst = std::max(worst, e / scale);
  }
  return worst;
}

// Vocabulary shapes: teacher columns (real ones first, the rest padding), student likewise.
struct vocab_shape {
  index_t t_cols = 0, t_real = 0, s_cols = 0, s_real = 0;
};

// A many-to-one teacher -> student map: real teacher ids not 2 mod 5 map to a scrambled student id among the
// real ones (more teacher ids than student ids, so several land on one); padded ids on both sides never.
inline const kd::vocab_map* shared_map(const vocab_shape& s) {
  static std::map<std::tuple<index_t, index_t, index_t, index_t>, std::unique_ptr<kd::vocab_map>> cache;
  auto& slot = cache[{s.t_cols, s.t_real, s.s_cols, s.s_real}];
  if (!slot) {
    std::vector<std::pair<std::int32_t, std::int32_t>> pairs;
    for (index_t t = 0; t < s.t_real; ++t)
      if (t % 5 != 2)
        pairs.emplace_back(static_cast<std::int32_t>(t), static_cast<std::int32_t>((t * 7919 + 13) % s.s_real));
    slot = std::make_unique<kd::vocab_map>();
    if (!kd::vocab_map::from_pairs(pairs, s.t_cols, s.s_cols, *slot).ok()) slot.reset();
  }
  return slot.get();
}

// A one-to-one map in order: real teacher id t -> student id t + t / q (increasing, skipping some student
// ids; q chosen so that the last lands among the real student ids). Padded ids on both sides never map.
inline const kd::vocab_map* contiguous_map(const vocab_shape& s) {
  static std::map<std::tuple<index_t, index_t, index_t, index_t>, std::unique_ptr<kd::vocab_map>> cache;
  auto& slot = cache[{s.t_cols, s.t_real, s.s_cols, s.s_real}];
  if (!slot) {
    const index_t q = s.t_real / std::max<index_t>(1, s.s_real - s.t_real) + 1;
    std::vector<std::pair<std::int32_t, std::int32_t>> pairs;
    for (index_t t = 0; t < s.t_real; ++t) pairs.emplace_back(static_cast<std::int32_t>(t), static_cast<std::int32_t>(t + t / q));
    slot = std::make_unique<kd::vocab_map>();
    if (!kd::vocab_map::from_pairs(pairs, s.t_cols, s.s_cols, *slot).ok() || !slot->contiguous_teacher()) slot.reset();
  }
  return slot.get();
}

// Fills padding columns (c >= real) of a rows x cols matrix with huge logits: counted by mistake, they
// would dominate the softmax.
template <class T>
void poison_padding(std::vector<T>& m, index_t rows, index_t cols, index_t real) {
  for (index_t r = 0; r < rows; ++r)
    for (index_t c = real; c < cols; ++c) m[static_cast<std::size_t>(r * cols + c)] = from_double<T>((c % 2 ? 3e4 : -3e4));
}

inline std::vector<std::int32_t> make_labels(ignore_mode m, index_t n, index_t vocab, rng_t& g, bool required) {
  std::vector<std::int32_t> labels;
  if (m == ignore_mode::none && !required) return labels;
  std::uniform_int_distribution<std::int32_t> pick(0, static_cast<std::int32_t>(vocab - 1));
  for (index_t i = 0; i < n; ++i) {
    const bool ignored = m == ignore_mode::all || (m == ignore_mode::some && i % 3 == 1);
    labels.push_back(ignored ? kd::default_ignore_index : pick(g));
  }
  return labels;
}

// ---------------------------------------------------------------------------------------------
// logit_kd and linear_logit_kd cases
// ---------------------------------------------------------------------------------------------
struct logit_case {
  std::size_t index = 0;
  std::uint64_t seed = 0;
  div_kind div = div_kind::forward_kl;
  double temperature = 1;
  vocab_layout layout = vocab_layout::shared;
  ignore_mode ignore = ignore_mode::none;
  bool inplace = false;     // gradient buffer aliases the student logits (logit_kd only)
  reduce_mode reduce = reduce_mode::mean;
  bool accumulate = false;
  prec p = prec::fp32;
  index_t n = 1;
  vocab_shape shape;
  index_t hidden = 0;       // linear_logit_kd: hidden width (0 = logit_kd)
  index_t chunk_rows = 0;   // linear_logit_kd
  index_t on_chip = -1;     // linear_logit_kd: -1 the chunked path, k >= 0 linear_kd_path::on_chip with k splits
  index_t teacher_dt = 0;   // linear_logit_kd: > 0 the teacher as hidden states of this width and an LM head
  bool storage_logits = false;  // linear_logit_kd: linear_kd_logits::storage (and inputs whose products are exact)
  bool compact_head = true;     // linear_logit_kd: linear_kd_options::compact_teacher_head

  [[nodiscard]] bool linear() const { return hidden > 0; }
  [[nodiscard]] std::string name() const {
    std::string s = std::string(linear() ? "linear_logit_kd" : "logit_kd") + "#" + std::to_string(index) + " " +
                    name_of(div) + " T=" + std::to_string(temperature).substr(0, 4) + " " + name_of(layout) + " " +
                    name_of(ignore) + " " + name_of(reduce) + (inplace ? " in-place" : "") +
                    (accumulate ? " accumulate" : "") + " " + name_of(p) + " N=" + std::to_string(n) +
                    " Vt=" + std::to_string(shape.t_cols) + "/" + std::to_string(shape.t_real) +
                    " Vs=" + std::to_string(shape.s_cols) + "/" + std::to_string(shape.s_real);
    if (linear())
      s += " d=" + std::to_string(hidden) +
           (on_chip < 0 ? " chunk=" + std::to_string(chunk_rows) : " on-chip splits=" + std::to_string(on_chip)) +
           (teacher_dt > 0 ? " teacher-head dt=" + std::to_string(teacher_dt) : "") +
           (storage_logits ? " storage-logits" : "") + (teacher_dt > 0 && !compact_head ? " full-head" : "");
    return s + " seed=" + std::to_string(seed);
  }
};

// The parameter space of logit_kd (hidden == 0) or linear_logit_kd (hidden > 0).
struct logit_space {
  std::vector<div_kind> divs{div_kind::forward_kl, div_kind::reverse_kl, div_kind::jsd, div_kind::skew_kl,
                             div_kind::tvd};
  std::vector<double> temps{0.5, 1, 2, 4};
  std::vector<vocab_layout> layouts{vocab_layout::shared, vocab_layout::padded, vocab_layout::mapped};
  std::vector<ignore_mode> ignores{ignore_mode::none, ignore_mode::some, ignore_mode::all};
  std::vector<bool> inplace{false, true};
  std::vector<reduce_mode> reduces{reduce_mode::sum, reduce_mode::mean, reduce_mode::mean_global};
  std::vector<bool> accumulate{false, true};
  std::vector<prec> precs{prec::fp32, prec::bf16, prec::fp16};
  std::vector<index_t> ns{1, 7, 31};
  // shared: t == s, no padding; padded: t == s with padding; mapped: both sides padded.
  vocab_shape shared{97, 97, 97, 97}, padded{101, 89, 101, 89}, mapped{67, 61, 41, 37};
  // contiguous: 68 teacher columns (16-byte rows in fp32: the bulk-copy path; not in 16-bit storage).
  vocab_shape contiguous{68, 50, 61, 57};
  index_t hidden = 0;
  [[nodiscard]] vocab_shape shape_of(vocab_layout l) const {
    return l == vocab_layout::shared ? shared : l == vocab_layout::padded ? padded : l == vocab_layout::mapped ? mapped : contiguous;
  }
  std::vector<index_t> chunk_rows{0};
  // linear_logit_kd's CUDA path: -1 chunked, k >= 0 on chip with k splits (0: the automatic count). The
  // on-chip path takes 16-bit storage and no vocab map; other combinations are left out of the product.
  std::vector<index_t> on_chip{-1};
  // linear_logit_kd's teacher: 0 its logits, dt > 0 its hidden states [N x dt] and LM head [Vt x dt].
  std::vector<index_t> teacher_dts{0};
  // linear_logit_kd: false the logits in the accumulation type, true linear_kd_logits::storage (not on chip).
  std::vector<bool> storage_logits{false};
  // linear_logit_kd with a teacher head: linear_kd_options::compact_teacher_head (false only with a head and
  // a map, where the option applies).
  std::vector<bool> compact_head{true};
};

// The product of a space, minus impossible combinations: an in-place gradient needs logit_kd (linear's
// gradients have other shapes) and no accumulation (the buffer holds the logits, not a gradient);
// fp16 is not a linear_logit_kd precision here; the on-chip path needs 16-bit storage, a hidden width that
// is a multiple of 8 and no vocab map (those refusals are tested on their own).
inline std::vector<logit_case> generate(const logit_space& sp, std::size_t first_index = 0) {
  std::vector<logit_case> out;
  std::size_t index = first_index;
  for (auto p : sp.precs)
    for (auto n : sp.ns)
      for (auto layout : sp.layouts)
        for (auto div : sp.divs)
          for (auto t : sp.temps)
            for (auto ign : sp.ignores)
              for (auto red : sp.reduces)
                for (bool inpl : sp.inplace)
                  for (bool acc : sp.accumulate)
                    for (auto chunk : sp.chunk_rows)
                      for (auto oc : sp.on_chip)
                        for (auto tdt : sp.teacher_dts)
                         for (bool sl : sp.storage_logits)
                          for (bool ch : sp.compact_head) {
                          if (!ch && (tdt == 0 || (layout != vocab_layout::mapped && layout != vocab_layout::contiguous)))
                            continue;
                          if (inpl && (acc || sp.hidden > 0)) continue;
                          if (sl && (sp.hidden == 0 || oc >= 0)) continue;
                          if (tdt > 0 && sp.hidden == 0) continue;
                          if (oc >= 0 && (sp.hidden == 0 || sp.hidden % 8 != 0 || tdt % 8 != 0 || p == prec::fp32 ||
                                          layout == vocab_layout::mapped || layout == vocab_layout::contiguous))
                            continue;
                          if (sp.hidden > 0 && p == prec::fp16) continue;
                          // linear_logit_kd + tvd at T < 1: a sign gradient on a sharpened softmax of logits that
                          // are themselves float products flips on rare draws (errors ~3e-2 seen); see the report.
                          if (sp.hidden > 0 && div == div_kind::tvd && t < 1) continue;
                          logit_case c;
                          c.index = index++;
                          c.seed = splitmix(run_seed() ^ splitmix(c.index));
                          c.div = div;
                          c.temperature = t;
                          c.layout = layout;
                          c.ignore = ign;
                          c.inplace = inpl;
                          c.reduce = red;
                          c.accumulate = acc;
                          c.p = p;
                          c.n = n;
                          c.shape = sp.shape_of(layout);
                          c.hidden = sp.hidden;
                          c.chunk_rows = chunk;
                          c.on_chip = oc;
                          c.teacher_dt = tdt;
                          c.storage_logits = sl;
                          c.compact_head = ch;
                          out.push_back(c);
                        }
  return out;
}

// Everything one logit_kd call sees, in host memory; an executor runs it on its backend. With `inplace`
// the student logits are `grad` (the executor passes one buffer as both).
template <class T>
struct logit_io {
  std::vector<T> teacher, student, grad;
  index_t t_rows = 0, t_cols = 0, s_rows = 0, s_cols = 0, g_rows = 0, g_cols = 0;
  std::vector<std::int32_t> labels;
  bool inplace = false;
  bool null_grad = false;
};

// What a backend returns: the status of the call (and, on the GPU, of the deferred data checks).
struct outcome {
  kd::status st;
  double loss = 0;       // cross_entropy: the cross-entropy
  double z_loss = 0;     // cross_entropy only
  long long tokens = 0;  // not reported by the router losses
};

template <class D, class R, class T>
using logit_loss_t = kd::logit_kd<D, R, kd::precision_set<kd::precision<T, float>, kd::precision<T, float>>>;
template <class D, class R, class T>
using linear_loss_t =
    kd::linear_logit_kd<D, R, kd::precision_set<kd::precision<T, float>, kd::precision<T, float>, kd::precision<T, float>>>;

template <class Options>
void set_logit_options(Options& o, const logit_case& c, const std::vector<std::int32_t>& labels) {
  o.temperature = c.temperature;
  o.beta = 0.3;
  o.alpha = 0.2;
  o.grad_scale = 1.5;
  o.accumulate_grad = c.accumulate;
  o.vocab = c.layout == vocab_layout::padded ? c.shape.s_real : 0;
  o.map = c.layout == vocab_layout::mapped ? shared_map(c.shape) : c.layout == vocab_layout::contiguous ? contiguous_map(c.shape) : nullptr;
  if (c.reduce == reduce_mode::mean_global)
    o.global_tokens = (labels.empty() ? c.n : kd::count_tokens(labels)) + 5;
}

// The loss tolerance floor: a divergence near 0 is computed with an absolute error ~ eps * log V per row,
// so the loss is compared relative to max(|ref|, T^2 * rows / normalizer * 0.05).
inline double loss_scale(double ref, double t, index_t active, double normalizer) {
  return std::max(std::abs(ref), 0.05 * t * t * static_cast<double>(std::max<index_t>(active, 1)) / normalizer);
}

// tvd's gradient is a sign of p - q: inputs with a near tie (|p - q| below 3e-5 of max(p, q), where float
// and double may disagree) are redrawn (tests/tvd_ties.hpp). The largest q_j among entries within `rel`
// of a tie (0 if none).
template <class R>
double tvd_tie_q(const logit_case& c, const std::vector<double>& t64, const std::vector<double>& s64,
                 const std::vector<std::int32_t>& labels, double rel) {
  kd::logit_kd_options o;
  set_logit_options(o, c, labels);
  return kdtest::tvd_tie_q<R>(o, c.n, c.shape.t_cols, c.shape.s_cols, t64, s64, labels, rel).value_or(0);
}
template <class R>
bool has_tvd_tie(const logit_case& c, const std::vector<double>& t64, const std::vector<double>& s64,
                 const std::vector<std::int32_t>& labels) {
  return tvd_tie_q<R>(c, t64, s64, labels, 3e-5) > 0;
}

inline std::string fmt(const char* f, double a, double b, double c = 0) {
  char buf[200];
  std::snprintf(buf, sizeof buf, f, a, b, c);
  return buf;
}

// Runs one logit_kd case through exec.logit(loss, io) and checks it against the fp64 CPU reference.
template <class D, class R, class T, class Exec>
verdict run_logit_typed(const logit_case& c, Exec& exec) {
  rng_t g(c.seed);
  logit_io<T> io;
  io.t_rows = io.s_rows = io.g_rows = c.n;
  io.t_cols = c.shape.t_cols;
  io.s_cols = io.g_cols = c.shape.s_cols;
  std::vector<double> t64, s64;
  for (int attempt = 0;; ++attempt) {
    io.teacher = normal_storage<T>(static_cast<std::size_t>(c.n * io.t_cols), 2.0, g);
    io.student = normal_storage<T>(static_cast<std::size_t>(c.n * io.s_cols), 1.0, g);
    poison_padding(io.teacher, c.n, io.t_cols, c.shape.t_real);
    poison_padding(io.student, c.n, io.s_cols, c.shape.s_real);
    io.labels = make_labels(c.ignore, c.n, c.shape.s_real, g, false);
    t64 = to_doubles(io.teacher);
    s64 = to_doubles(io.student);
    if (!std::is_same_v<D, kd::tvd> || attempt == 8 || !has_tvd_tie<R>(c, t64, s64, io.labels)) break;
  }
  logit_loss_t<D, R, T> loss;
  set_logit_options(loss.options, c, io.labels);

  kd::logit_kd<D, R, kd::precision_set<kd::fp64, kd::fp64>> ref;
  static_cast<kd::logit_kd_options&>(ref.options) = loss.options;
  ref.options.accumulate_grad = false;
  std::vector<double> gref(s64.size());
  kd::loss_result rr;
  verdict v;
  const auto rst = ref(kd::cpu, kd::matrix_view<const double>(t64.data(), c.n, io.t_cols),
                       kd::matrix_view<const double>(s64.data(), c.n, io.s_cols), io.labels, rr,
                       kd::matrix_view<double>(gref.data(), c.n, io.s_cols));
  if (!rst.ok()) return {false, c.name() + ": the fp64 reference failed: " + std::string(rst.message())};

  if (c.accumulate) {
    io.grad = normal_storage<T>(io.student.size(), 0.1, g);
    const auto init = to_doubles(io.grad);
    for (std::size_t i = 0; i < gref.size(); ++i) gref[i] += init[i];
  } else if (c.inplace) {
    io.grad = io.student;
    io.inplace = true;
  } else {
    io.grad = nan_storage<T>(io.student.size());
  }
  const outcome o = exec.logit(loss, io);
  if (!o.st.ok()) return {false, c.name() + ": returned an error: " + std::string(o.st.message())};
  v.loss_err = std::abs(o.loss - rr.loss) / loss_scale(rr.loss, c.temperature, rr.tokens, rr.normalizer);
  v.grad_err = max_rel_error(to_doubles(io.grad), gref);
  const double tol = tolerance(c.p);
  double gtol = grad_tolerance(c.p);
  if constexpr (std::is_same_v<D, kd::tvd>) {
    // tvd's gradient q_j (+-0.5 - sum q g) cancels when most of q sits on one sign: its largest entry can be
    // far below its natural size grad_scale * T * max q / 2 / norm, where float's rounding of q lives.
    // Errors are measured against that size.
    const double qmax = tvd_tie_q<R>(c, t64, s64, io.labels, 1e300);
    v.grad_err = max_rel_error(to_doubles(io.grad), gref,
                               0.5 * loss.options.grad_scale * c.temperature * qmax / std::max(rr.normalizer, 1.0));
    // tvd's gradient is a sign of p - q: entries within float's reach of a tie (1e-3, past the redraw's
    // 3e-5) may take the other sign in a float backend. Their possible effect is added to the tolerance:
    // grad_scale * T * q_j (1 + max q) / norm, over the reference gradient's scale.
    const double qt = tvd_tie_q<R>(c, t64, s64, io.labels, 1e-3);
    double scale = 0;
    for (double x : gref) scale = std::max(scale, std::abs(x));
    if (qt > 0 && scale > 0)
      gtol += 2.0 * loss.options.grad_scale * c.temperature * qt / std::max(rr.normalizer, 1.0) / scale;
  }
  v.ok = v.loss_err <= tol && v.grad_err <= gtol && o.tokens == rr.tokens;
  if (!v.ok)
    v.what = c.name() + ": " + fmt("loss %.9g ref %.9g (err %.3g)", o.loss, rr.loss, v.loss_err) +
             fmt(", grad err %.3g (tol %.3g)", v.grad_err, gtol) + ", tokens " + std::to_string(o.tokens) + " ref " +
             std::to_string(rr.tokens);
  return v;
}

// Everything one linear_logit_kd call sees (hidden [N x d], LM head [V x d], teacher logits [N x Vt]).
// The largest student probability softmax(logits / T) over the support, on the rows that take part.
template <class Options>
double student_qmax(const logit_case& c, const std::vector<double>& logits, index_t cols, const std::vector<std::int32_t>& labels,
                    const Options& o) {
  std::vector<index_t> support;
  if (o.map != nullptr) {
    for (auto j : o.map->student_support()) support.push_back(j);
  } else {
    for (index_t j = 0; j < (o.vocab > 0 ? o.vocab : cols); ++j) support.push_back(j);
  }
  double qmax = 0;
  for (index_t r = 0; r < c.n; ++r) {
    if (!labels.empty() && labels[static_cast<std::size_t>(r)] == o.ignore_index) continue;
    double m = -std::numeric_limits<double>::infinity(), z = 0;
    for (auto j : support) m = std::max(m, logits[static_cast<std::size_t>(r * cols + j)] / c.temperature);
    for (auto j : support) z += std::exp(logits[static_cast<std::size_t>(r * cols + j)] / c.temperature - m);
    qmax = std::max(qmax, 1.0 / z);  // the largest entry is exp(0) / z
  }
  return qmax;
}

template <class T>
struct linear_io {
  std::vector<T> hidden, weight, teacher, dhidden, dweight;
  index_t n = 0, d = 0, h_cols = 0, w_rows = 0, w_cols = 0, t_rows = 0, t_cols = 0, dh_rows = 0;
  std::vector<std::int32_t> labels;
  // dt > 0: the teacher as hidden states [t_rows x dt] and LM head [t_cols x dt] (teacher is then empty).
  std::vector<T> t_hidden, t_weight;
  index_t dt = 0;
};

// Calls call(teacher) with the case's teacher as the loss takes it: a kd::teacher_head over the hidden
// states and head at th / tw, or the logits at t (host or device copies of io's).
template <class T, class F>
decltype(auto) with_linear_teacher(const linear_io<T>& io, const T* t, const T* th, const T* tw, F&& call) {
  if (io.dt > 0)
    return call(kd::teacher_head<T>{kd::matrix_view<const T>(th, io.t_rows, io.dt), kd::matrix_view<const T>(tw, io.t_cols, io.dt)});
  return call(kd::matrix_view<const T>(t, io.t_rows, io.t_cols));
}

template <class T>
void make_linear_inputs(const logit_case& c, linear_io<T>& io, rng_t& g) {
  io.n = io.t_rows = io.dh_rows = c.n;
  io.d = io.h_cols = io.w_cols = c.hidden;
  io.w_rows = c.shape.s_cols;
  io.t_cols = c.shape.t_cols;
  // storage_logits: hidden states on a grid of 1/8 and heads of 1/16 (|values| < 8), so that every product
  // and sum of a logit is exact in fp32 whatever the GEMM's order: the logits the backend rounds to the
  // storage type are then the fp64 reference's, and so are their roundings.
  const double hq = c.storage_logits ? 8 : 0, wq = c.storage_logits ? 16 : 0;
  auto grid_values = [](std::vector<T>& v, double q) {
    if (q > 0)
      for (auto& x : v) x = from_double<T>(std::clamp(std::nearbyint(kd::load_as<double>(x) * q), -8 * q + 1, 8 * q - 1) / q);
  };
  io.hidden = normal_storage<T>(static_cast<std::size_t>(c.n * c.hidden), 1.0, g);
  io.weight = normal_storage<T>(static_cast<std::size_t>(io.w_rows * c.hidden), 2.0 / std::sqrt(double(c.hidden)), g);
  grid_values(io.hidden, hq);
  grid_values(io.weight, wq);
  // Padded head rows give huge logits (a constant row times the hidden state's sum); 16 on the grid.
  const double pad = c.storage_logits ? 16.0 : 100.0 / std::sqrt(double(c.hidden));
  for (index_t r = c.shape.s_real; r < io.w_rows; ++r)
    for (index_t k = 0; k < c.hidden; ++k) io.weight[static_cast<std::size_t>(r * c.hidden + k)] = from_double<T>(pad);
  io.dt = c.teacher_dt;
  if (io.dt > 0) {
    // Logits of the same spread as the given ones (~2); padded head rows give large ones of either sign.
    io.t_hidden = normal_storage<T>(static_cast<std::size_t>(c.n * io.dt), 1.0, g);
    io.t_weight = normal_storage<T>(static_cast<std::size_t>(io.t_cols * io.dt), 2.0 / std::sqrt(double(io.dt)), g);
    grid_values(io.t_hidden, hq);
    grid_values(io.t_weight, wq);
    const double tpad = c.storage_logits ? 16.0 : 100.0 / std::sqrt(double(io.dt));
    for (index_t r = c.shape.t_real; r < io.t_cols; ++r)
      for (index_t k = 0; k < io.dt; ++k)
        io.t_weight[static_cast<std::size_t>(r * io.dt + k)] = from_double<T>(r % 2 ? tpad : -tpad);
    io.teacher.clear();
  } else {
    io.teacher = normal_storage<T>(static_cast<std::size_t>(c.n * io.t_cols), 2.0, g);
    poison_padding(io.teacher, c.n, io.t_cols, c.shape.t_real);
  }
  io.labels = make_labels(c.ignore, c.n, c.shape.s_real, g, false);
}

// a [m x k] times b [n x k]^T, row-major, in double; with `absolute`, of |a| and |b| (the scale of the
// rounding error of a sum of products).
inline std::vector<double> product_abt(const std::vector<double>& a, const std::vector<double>& b, index_t m, index_t n,
                                       index_t k, bool absolute = false) {
  std::vector<double> out(static_cast<std::size_t>(m * n), 0.0);
  for (index_t r = 0; r < m; ++r)
    for (index_t j = 0; j < n; ++j) {
      double acc = 0;
      for (index_t x = 0; x < k; ++x) {
        const double u = a[static_cast<std::size_t>(r * k + x)], v = b[static_cast<std::size_t>(j * k + x)];
        acc += absolute ? std::abs(u) * std::abs(v) : u * v;
      }
      out[static_cast<std::size_t>(r * n + j)] = acc;
    }
  return out;
}
// The teacher's logits of a linear case in fp64: the given ones, or the product of its rounded hidden
// states and head.
template <class T>
std::vector<double> teacher_logits(const linear_io<T>& io) {
  return io.dt > 0 ? product_abt(to_doubles(io.t_hidden), to_doubles(io.t_weight), io.t_rows, io.t_cols, io.dt)
                   : to_doubles(io.teacher);
}
inline std::vector<double> transpose(const std::vector<double>& a, index_t rows, index_t cols) {
  std::vector<double> t(a.size());
  for (index_t r = 0; r < rows; ++r)
    for (index_t c = 0; c < cols; ++c) t[static_cast<std::size_t>(c * rows + r)] = a[static_cast<std::size_t>(r * cols + c)];
  return t;
}
inline double max_abs(const std::vector<double>& v) {
  double m = 0;
  for (double x : v) m = std::max(m, std::abs(x));
  return m;
}

// Runs one linear_logit_kd case through exec.linear(loss, io) against the fp64 CPU reference.
template <class D, class R, class T, class Exec>
verdict run_linear_typed(const logit_case& c, Exec& exec) {
  rng_t g(c.seed);
  linear_io<T> io;
  std::vector<double> logits, t64;  // fp64 logits of the rounded inputs
  // linear_kd_logits::storage: the reference's logits (and a head's teacher logits) rounded to T as the
  // backend's are (the grid inputs make them exact before that rounding).
  auto round_to_storage = [&](std::vector<double>& v) {
    if (c.storage_logits)
      for (auto& x : v) x = kd::load_as<double>(from_double<T>(x));
  };
  for (int attempt = 0;; ++attempt) {
    make_linear_inputs(c, io, g);
    logits = product_abt(to_doubles(io.hidden), to_doubles(io.weight), c.n, io.w_rows, c.hidden);
    round_to_storage(logits);
    t64 = teacher_logits(io);
    if (io.dt > 0) round_to_storage(t64);
    if (!std::is_same_v<D, kd::tvd> || attempt == 8 || !has_tvd_tie<R>(c, t64, logits, io.labels)) break;
  }
  linear_loss_t<D, R, T> loss;
  set_logit_options(loss.options, c, io.labels);
  loss.options.chunk_rows = c.chunk_rows;
  if (c.on_chip >= 0) {
    loss.options.path = kd::linear_kd_path::on_chip;
    loss.options.on_chip_splits = c.on_chip;
  }
  if (c.storage_logits) loss.options.logits = kd::linear_kd_logits::storage;
  loss.options.compact_teacher_head = c.compact_head;

  kd::linear_logit_kd<D, R, kd::precision_set<kd::fp64, kd::fp64, kd::fp64>> ref;
  ref.options = loss.options;
  ref.options.accumulate_grad = false;
  const auto h64 = to_doubles(io.hidden), w64 = to_doubles(io.weight);
  // The fp64 logit_kd reference on the case's logits: the scale of dhidden's and dW's rounding below, and
  // with storage logits the reference itself (dhidden = dlogits W, dW = dlogits^T h).
  std::vector<double> dlogits(logits.size());
  kd::loss_result lr;
  {
    kd::logit_kd<D, R, kd::precision_set<kd::fp64, kd::fp64>> lk;
    static_cast<kd::logit_kd_options&>(lk.options) = ref.options;
    if (!lk(kd::cpu, kd::matrix_view<const double>(t64.data(), c.n, io.t_cols),
            kd::matrix_view<const double>(logits.data(), c.n, io.w_rows), io.labels, lr,
            kd::matrix_view<double>(dlogits.data(), c.n, io.w_rows))
             .ok())
      return {false, c.name() + ": the fp64 logit reference failed"};
  }
  std::vector<double> dh_ref(h64.size()), dw_ref(w64.size());
  kd::loss_result rr;
  if (!c.storage_logits) {
    const auto rst = ref(kd::cpu, kd::matrix_view<const double>(h64.data(), c.n, c.hidden),
                         kd::matrix_view<const double>(w64.data(), io.w_rows, c.hidden),
                         kd::matrix_view<const double>(t64.data(), c.n, io.t_cols), io.labels, rr,
                         kd::matrix_view<double>(dh_ref.data(), c.n, c.hidden),
                         kd::matrix_view<double>(dw_ref.data(), io.w_rows, c.hidden));
    if (!rst.ok()) return {false, c.name() + ": the fp64 reference failed: " + std::string(rst.message())};
  } else {
    rr = lr;
    dh_ref = product_abt(dlogits, transpose(w64, io.w_rows, c.hidden), c.n, c.hidden, io.w_rows);
    dw_ref = product_abt(transpose(dlogits, c.n, io.w_rows), transpose(h64, c.n, c.hidden), io.w_rows, c.hidden, c.n);
  }
  if (c.accumulate) {
    io.dhidden = normal_storage<T>(io.hidden.size(), 0.1, g);
    io.dweight = normal_storage<T>(io.weight.size(), 0.1, g);
    const auto ih = to_doubles(io.dhidden), iw = to_doubles(io.dweight);
    for (std::size_t i = 0; i < ih.size(); ++i) dh_ref[i] += ih[i];
    for (std::size_t i = 0; i < iw.size(); ++i) dw_ref[i] += iw[i];
  } else {
    io.dhidden = nan_storage<T>(io.hidden.size());
    io.dweight = nan_storage<T>(io.weight.size());
  }
  const outcome o = exec.linear(loss, io);
  if (!o.st.ok()) return {false, c.name() + ": returned an error: " + std::string(o.st.message())};
  verdict v;
  v.loss_err = std::abs(o.loss - rr.loss) / loss_scale(rr.loss, c.temperature, rr.tokens, rr.normalizer);
  // dhidden = dlogits W and dW = dlogits^T hidden are sums of cancelling terms: their rounding error scales
  // with the sums of |terms| (from the fp64 dlogits), which is what a near-zero product is compared to.
  double dh_scale = max_abs(product_abt(dlogits, transpose(to_doubles(io.weight), io.w_rows, c.hidden), c.n,
                                        c.hidden, io.w_rows, true));
  double dw_scale = max_abs(product_abt(transpose(dlogits, c.n, io.w_rows), transpose(to_doubles(io.hidden), c.n, c.hidden),
                                        io.w_rows, c.hidden, c.n, true));
  // A saturated divergence (jsd or tvd between nearly disjoint, peaked distributions at T < 1) has
  // gradients far below their natural size grad_scale * T * max q / norm, while float's rounding of q lives
  // at that size: the products are also compared to a tenth of it, carried through |W| and |h|.
  {
    const double qmax = student_qmax(c, logits, io.w_rows, io.labels, loss.options);
    const double natural = 0.1 * loss.options.grad_scale * c.temperature * qmax / std::max(rr.normalizer, 1.0);
    const auto w = to_doubles(io.weight), h = to_doubles(io.hidden);
    double wsum = 0, hsum = 0;
    for (index_t k = 0; k < c.hidden; ++k) {
      double a = 0, b = 0;
      for (index_t j = 0; j < io.w_rows; ++j) a += std::abs(w[static_cast<std::size_t>(j * c.hidden + k)]);
      for (index_t r = 0; r < c.n; ++r) b += std::abs(h[static_cast<std::size_t>(r * c.hidden + k)]);
      wsum = std::max(wsum, a);
      hsum = std::max(hsum, b);
    }
    dh_scale = std::max(dh_scale, natural * wsum);
    dw_scale = std::max(dw_scale, natural * hsum);
  }
  const double eh = max_rel_error(to_doubles(io.dhidden), dh_ref, dh_scale),
               ew = max_rel_error(to_doubles(io.dweight), dw_ref, dw_scale);
  v.grad_err = (eh == eh && ew == ew) ? std::max(eh, ew) : std::numeric_limits<double>::quiet_NaN();
  const double tol = tolerance(c.p);
  // In fp32 the backend's logits are themselves fp32 products (error ~eps |h| |w| sqrt(d)), which 1/T = 2
  // doubles and a peaked softmax passes on: ~1e-3 of the gradient's scale at T = 0.5 is that floor (measured
  // over the CPU matrix), not a bug. 16-bit storage keeps its 1e-2.
  const double gtol = c.p == prec::fp32 ? 3e-3 : tol;
  v.ok = v.loss_err <= tol && v.grad_err <= gtol && o.tokens == rr.tokens;
  if (!v.ok)
    v.what = c.name() + ": " + fmt("loss %.9g ref %.9g (err %.3g)", o.loss, rr.loss, v.loss_err) +
             fmt(", dhidden err %.3g, dweight err %.3g (tol %.g)", eh, ew, gtol) +
             ", tokens " + std::to_string(o.tokens) + " ref " + std::to_string(rr.tokens);
  return v;
}

template <class Exec>
verdict run_logit_case(const logit_case& c, Exec& exec) {
  return with_storage(c.p, [&](auto tt) {
    return with_divergence(c.div, [&](auto dt) {
      return with_reduction(c.reduce, [&](auto rt) {
        using T = typename decltype(tt)::type;
        using D = typename decltype(dt)::type;
        using R = typename decltype(rt)::type;
        if (!c.linear()) return run_logit_typed<D, R, T>(c, exec);
        if constexpr (std::is_same_v<T, kd::half>)
          return verdict{false, c.name() + ": fp16 is not a linear_logit_kd precision of this matrix"};
        else
          return run_linear_typed<D, R, T>(c, exec);
      });
    });
  });
}

// ---------------------------------------------------------------------------------------------
// Bad inputs: each must be rejected (by the call, or on the GPU by the deferred data checks)
// ---------------------------------------------------------------------------------------------
enum class logit_bad {
  teacher_rows, teacher_cols, label_out_of_range, label_negative, label_count, nan_teacher, inf_teacher,
  nan_student, inf_student, overflow_student, overflow_teacher, null_grad, short_grad, vocab_too_big,
  zero_temperature, count_
};
inline const char* name_of(logit_bad b) {
  constexpr const char* n[] = {"teacher rows != student rows", "teacher columns do not fit", "label == label vocabulary",
                               "label -7", "labels count != rows", "NaN teacher logit", "Inf teacher logit",
                               "NaN student logit", "Inf student logit", "student logit 3e38 at T=0.5",
                               "teacher logit 3e38 at T=0.5", "null gradient", "gradient one row short",
                               "options.vocab > columns", "temperature 0"};
  return n[static_cast<int>(b)];
}

// Set v at (r, c) of a row-major rows x cols matrix.
template <class T>
void put(std::vector<T>& m, index_t cols, index_t r, index_t c, double v) {
  m[static_cast<std::size_t>(r * cols + c)] = from_double<T>(v);
}

// A valid 5-row logit_kd case with one defect; `layout` picks shared or mapped vocabularies.
template <class T, class Exec>
verdict run_logit_bad_typed(logit_bad b, prec p, vocab_layout layout, Exec& exec, std::uint64_t seed) {
  logit_case c;
  c.p = p;
  c.layout = layout;
  c.n = 5;
  c.seed = seed;
  c.temperature = 2;
  const logit_space sp;
  c.shape = sp.shape_of(layout);
  const std::string what = std::string("logit_kd bad input '") + name_of(b) + "' " + name_of(p) + " " +
                           name_of(layout) + " seed=" + std::to_string(seed);
  if ((b == logit_bad::overflow_student || b == logit_bad::overflow_teacher) && p == prec::fp16) return {true, {}};
  if (b == logit_bad::vocab_too_big && (layout == vocab_layout::mapped || layout == vocab_layout::contiguous)) return {true, {}};
  rng_t g(seed);
  logit_io<T> io;
  io.t_rows = io.s_rows = io.g_rows = c.n;
  io.t_cols = c.shape.t_cols;
  io.s_cols = io.g_cols = c.shape.s_cols;
  io.labels = make_labels(ignore_mode::none, c.n, c.shape.s_real, g, true);
  logit_loss_t<kd::forward_kl, kd::token_mean, T> loss;
  set_logit_options(loss.options, c, io.labels);
  const kd::vocab_map* map = loss.options.map;
  const index_t tc = map ? map->teacher_ids()[0] : 0, sc = map ? map->student_support()[0] : 0;
  if (b == logit_bad::teacher_rows) io.t_rows = c.n - 1;
  if (b == logit_bad::teacher_cols) io.t_cols = map ? c.shape.t_cols - 1 : c.shape.t_cols + 1;
  io.teacher = normal_storage<T>(static_cast<std::size_t>(io.t_rows * io.t_cols), 2.0, g);
  io.student = normal_storage<T>(static_cast<std::size_t>(c.n * io.s_cols), 1.0, g);
  const index_t r = c.n - 1;
  switch (b) {
    // With a map every student column is a label (the student's own padding included).
    case logit_bad::label_out_of_range:
      io.labels[static_cast<std::size_t>(r)] = static_cast<std::int32_t>(map ? c.shape.s_cols : c.shape.s_real);
      break;
    case logit_bad::label_negative: io.labels[0] = -7; break;
    case logit_bad::label_count: io.labels.pop_back(); break;
    case logit_bad::nan_teacher: put(io.teacher, io.t_cols, r, tc, std::numeric_limits<double>::quiet_NaN()); break;
    case logit_bad::inf_teacher: put(io.teacher, io.t_cols, r, tc, std::numeric_limits<double>::infinity()); break;
    case logit_bad::nan_student: put(io.student, io.s_cols, r, sc, std::numeric_limits<double>::quiet_NaN()); break;
    case logit_bad::inf_student: put(io.student, io.s_cols, r, sc, -std::numeric_limits<double>::infinity()); break;
    case logit_bad::overflow_student: put(io.student, io.s_cols, r, sc, 3e38); loss.options.temperature = 0.5; break;
    case logit_bad::overflow_teacher: put(io.teacher, io.t_cols, r, tc, 3e38); loss.options.temperature = 0.5; break;
    case logit_bad::null_grad: io.null_grad = true; break;
    case logit_bad::short_grad: io.g_rows = c.n - 1; break;
    case logit_bad::vocab_too_big: loss.options.vocab = c.shape.s_cols + 1; break;
    case logit_bad::zero_temperature: loss.options.temperature = 0; break;
    default: break;
  }
  io.grad = nan_storage<T>(static_cast<std::size_t>(io.g_rows * io.g_cols));
  const outcome o = exec.logit(loss, io);
  if (o.st.ok()) return {false, what + ": accepted (loss " + std::to_string(o.loss) + ")"};
  return {true, {}};
}

template <class Exec>
void run_logit_bad_inputs(Exec& exec, stats& s, const std::vector<prec>& precs) {
  std::uint64_t k = 0;
  for (auto p : precs)
    for (auto layout : {vocab_layout::shared, vocab_layout::padded, vocab_layout::mapped, vocab_layout::contiguous})
      for (int b = 0; b < static_cast<int>(logit_bad::count_); ++b)
        s.add_bad(with_storage(p, [&](auto tt) {
          return run_logit_bad_typed<typename decltype(tt)::type>(static_cast<logit_bad>(b), p, layout, exec,
                                                                  splitmix(run_seed() ^ (0xbad0000 + k++)));
        }));
}

enum class linear_bad {
  head_width, teacher_rows, label_out_of_range, nan_hidden, nan_weight, nan_teacher, inf_teacher, overflow_teacher,
  short_dhidden, negative_chunk, count_
};
inline const char* name_of(linear_bad b) {
  constexpr const char* n[] = {"LM head width != hidden width", "teacher rows != hidden rows", "label == label vocabulary",
                               "NaN hidden", "NaN LM head", "NaN teacher logit", "Inf teacher logit",
                               "teacher logit 3e38 at T=0.5", "dhidden one row short", "chunk_rows -1"};
  return n[static_cast<int>(b)];
}

template <class T, class Exec>
verdict run_linear_bad_typed(linear_bad b, prec p, vocab_layout layout, Exec& exec, std::uint64_t seed) {
  if (b == linear_bad::overflow_teacher && p == prec::fp16) return {true, {}};
  logit_case c;
  c.p = p;
  c.layout = layout;
  c.n = 6;
  c.hidden = 8;
  c.chunk_rows = 4;
  c.temperature = 2;
  c.seed = seed;
  const logit_space sp;
  c.shape = sp.shape_of(layout);
  const std::string what = std::string("linear_logit_kd bad input '") + name_of(b) + "' " + name_of(p) + " " +
                           name_of(layout) + " seed=" + std::to_string(seed);
  rng_t g(seed);
  linear_io<T> io;
  make_linear_inputs(c, io, g);
  io.labels = make_labels(ignore_mode::some, c.n, c.shape.s_real, g, true);
  linear_loss_t<kd::forward_kl, kd::token_mean, T> loss;
  set_logit_options(loss.options, c, io.labels);
  loss.options.chunk_rows = c.chunk_rows;
  const kd::vocab_map* map = loss.options.map;
  const index_t tc = map ? map->teacher_ids()[0] : 0;
  const index_t r = c.n - 1;  // an active row (rows 1 mod 3 are ignored)
  switch (b) {
    case linear_bad::head_width:
      io.w_cols = c.hidden + 1;
      io.weight = normal_storage<T>(static_cast<std::size_t>(io.w_rows * io.w_cols), 0.3, g);
      break;
    case linear_bad::teacher_rows:
      io.t_rows = c.n - 1;
      io.teacher.resize(static_cast<std::size_t>(io.t_rows * io.t_cols));
      break;
    case linear_bad::label_out_of_range:
      io.labels[static_cast<std::size_t>(r)] = static_cast<std::int32_t>(map ? c.shape.s_cols : c.shape.s_real);
      break;
    case linear_bad::nan_hidden: put(io.hidden, io.h_cols, r, 0, std::numeric_limits<double>::quiet_NaN()); break;
    case linear_bad::nan_weight: put(io.weight, io.w_cols, map ? map->student_support()[0] : 0, 0, std::numeric_limits<double>::quiet_NaN()); break;
    case linear_bad::nan_teacher: put(io.teacher, io.t_cols, r, tc, std::numeric_limits<double>::quiet_NaN()); break;
    case linear_bad::inf_teacher: put(io.teacher, io.t_cols, r, tc, std::numeric_limits<double>::infinity()); break;
    case linear_bad::overflow_teacher: put(io.teacher, io.t_cols, r, tc, 3e38); loss.options.temperature = 0.5; break;
    case linear_bad::short_dhidden: io.dh_rows = c.n - 1; break;
    case linear_bad::negative_chunk: loss.options.chunk_rows = -1; break;
    default: break;
  }
  io.dhidden = nan_storage<T>(static_cast<std::size_t>(io.dh_rows * io.h_cols));
  io.dweight = nan_storage<T>(static_cast<std::size_t>(io.w_rows * io.w_cols));
  const outcome o = exec.linear(loss, io);
  if (o.st.ok()) return {false, what + ": accepted (loss " + std::to_string(o.loss) + ")"};
  return {true, {}};
}

template <class Exec>
void run_linear_bad_inputs(Exec& exec, stats& s, const std::vector<prec>& precs) {
  std::uint64_t k = 0;
  for (auto p : precs)
    for (auto layout : {vocab_layout::shared, vocab_layout::padded, vocab_layout::mapped, vocab_layout::contiguous})
      for (int b = 0; b < static_cast<int>(linear_bad::count_); ++b)
        s.add_bad(with_storage(p, [&](auto tt) {
          using T = typename decltype(tt)::type;
          if constexpr (std::is_same_v<T, kd::half>)
            return verdict{false, "fp16 is not a linear_logit_kd precision of this matrix"};
          else
            return run_linear_bad_typed<T>(static_cast<linear_bad>(b), p, layout, exec,
                                           splitmix(run_seed() ^ (0x11bad000 + k++)));
        }));
}

// ---------------------------------------------------------------------------------------------
// cross_entropy (+ z-loss)
// ---------------------------------------------------------------------------------------------
struct ce_case {
  std::size_t index = 0;
  std::uint64_t seed = 0;
  vocab_layout layout = vocab_layout::shared;  // shared or padded
  ignore_mode ignore = ignore_mode::some;      // none = every label valid (labels are required)
  double z_weight = 0;
  bool inplace = false;
  reduce_mode reduce = reduce_mode::mean;
  bool accumulate = false;
  prec p = prec::fp32;
  index_t n = 1, cols = 0, vocab = 0;
  [[nodiscard]] std::string name() const {
    return "cross_entropy#" + std::to_string(index) + " " + name_of(layout) + " " +
           (ignore == ignore_mode::none ? "all-labelled" : name_of(ignore)) + " z=" + fmt("%g", z_weight, 0) + " " +
           name_of(reduce) + (inplace ? " in-place" : "") + (accumulate ? " accumulate" : "") + " " + name_of(p) +
           " N=" + std::to_string(n) + " V=" + std::to_string(cols) + "/" + std::to_string(vocab) +
           " seed=" + std::to_string(seed);
  }
};

struct ce_space {
  std::vector<vocab_layout> layouts{vocab_layout::shared, vocab_layout::padded};
  std::vector<ignore_mode> ignores{ignore_mode::none, ignore_mode::some, ignore_mode::all};
  std::vector<double> z_weights{0, 1e-2};
  std::vector<bool> inplace{false, true};
  std::vector<reduce_mode> reduces{reduce_mode::sum, reduce_mode::mean, reduce_mode::mean_global};
  std::vector<bool> accumulate{false, true};
  std::vector<prec> precs{prec::fp32, prec::bf16, prec::fp16};
  std::vector<index_t> ns{1, 7, 31};
  index_t shared_cols = 97, padded_cols = 101, padded_vocab = 89;
};

inline std::vector<ce_case> generate(const ce_space& sp, std::size_t first_index = 0) {
  std::vector<ce_case> out;
  std::size_t index = first_index;
  for (auto p : sp.precs)
    for (auto n : sp.ns)
      for (auto layout : sp.layouts)
        for (auto ign : sp.ignores)
          for (auto z : sp.z_weights)
            for (auto red : sp.reduces)
              for (bool inpl : sp.inplace)
                for (bool acc : sp.accumulate) {
                  if (inpl && acc) continue;  // the buffer holds the logits, not a gradient to add to
                  ce_case c;
                  c.index = index++;
                  c.seed = splitmix(run_seed() ^ splitmix(c.index + 0xce000000ull));
                  c.layout = layout;
                  c.ignore = ign;
                  c.z_weight = z;
                  c.inplace = inpl;
                  c.reduce = red;
                  c.accumulate = acc;
                  c.p = p;
                  c.n = n;
                  c.cols = layout == vocab_layout::padded ? sp.padded_cols : sp.shared_cols;
                  c.vocab = layout == vocab_layout::padded ? sp.padded_vocab : sp.shared_cols;
                  out.push_back(c);
                }
  return out;
}

template <class T>
struct ce_io {
  std::vector<T> logits, grad;
  index_t rows = 0, cols = 0, g_rows = 0;
  std::vector<std::int32_t> labels;
  bool inplace = false, null_grad = false;
};

template <class R, class T>
using ce_loss_t = kd::cross_entropy<R, kd::precision<T, float>>;

template <class R, class T, class Exec>
verdict run_ce_typed(const ce_case& c, Exec& exec) {
  rng_t g(c.seed);
  ce_io<T> io;
  io.rows = io.g_rows = c.n;
  io.cols = c.cols;
  io.logits = normal_storage<T>(static_cast<std::size_t>(c.n * c.cols), 2.0, g);
  poison_padding(io.logits, c.n, c.cols, c.vocab);
  io.labels = make_labels(c.ignore, c.n, c.vocab, g, true);
  ce_loss_t<R, T> loss;
  loss.options.vocab = c.layout == vocab_layout::padded ? c.vocab : 0;
  loss.options.z_loss_weight = c.z_weight;
  loss.options.grad_scale = 1.5;
  loss.options.accumulate_grad = c.accumulate;
  if (c.reduce == reduce_mode::mean_global) loss.options.global_tokens = kd::count_tokens(io.labels) + 5;

  kd::cross_entropy<R, kd::fp64> ref;
  ref.options = loss.options;
  ref.options.accumulate_grad = false;
  const auto l64 = to_doubles(io.logits);
  std::vector<double> gref(l64.size());
  kd::cross_entropy_result rr;
  const auto rst = ref(kd::cpu, kd::matrix_view<const double>(l64.data(), c.n, c.cols), io.labels, rr,
                       kd::matrix_view<double>(gref.data(), c.n, c.cols));
  if (!rst.ok()) return {false, c.name() + ": the fp64 reference failed: " + std::string(rst.message())};
  if (c.accumulate) {
    io.grad = normal_storage<T>(io.logits.size(), 0.1, g);
    const auto init = to_doubles(io.grad);
    for (std::size_t i = 0; i < gref.size(); ++i) gref[i] += init[i];
  } else if (c.inplace) {
    io.grad = io.logits;
    io.inplace = true;
  } else {
    io.grad = nan_storage<T>(io.logits.size());
  }
  const outcome o = exec.ce(loss, io);
  if (!o.st.ok()) return {false, c.name() + ": returned an error: " + std::string(o.st.message())};
  verdict v;
  const double floor = 1e-3 * static_cast<double>(std::max<index_t>(rr.tokens, 1)) / rr.normalizer;
  v.loss_err = std::max(std::abs(o.loss - rr.ce) / std::max(std::abs(rr.ce), floor),
                        std::abs(o.z_loss - rr.z_loss) / std::max(std::abs(rr.z_loss), floor));
  if (!(o.loss == o.loss && o.z_loss == o.z_loss)) v.loss_err = std::numeric_limits<double>::quiet_NaN();
  v.grad_err = max_rel_error(to_doubles(io.grad), gref);
  const double tol = tolerance(c.p);
  v.ok = v.loss_err <= tol && v.grad_err <= grad_tolerance(c.p) && o.tokens == rr.tokens;
  if (!v.ok)
    v.what = c.name() + ": " + fmt("ce %.9g ref %.9g", o.loss, rr.ce) + fmt(", z %.9g ref %.9g", o.z_loss, rr.z_loss) +
             fmt(" (err %.3g), grad err %.3g", v.loss_err, v.grad_err) + fmt(" (tol %.g / %.g)", tol, grad_tolerance(c.p)) + ", tokens " +
             std::to_string(o.tokens) + " ref " + std::to_string(rr.tokens);
  return v;
}

template <class Exec>
verdict run_ce_case(const ce_case& c, Exec& exec) {
  return with_storage(c.p, [&](auto tt) {
    return with_reduction(c.reduce, [&](auto rt) {
      return run_ce_typed<typename decltype(rt)::type, typename decltype(tt)::type>(c, exec);
    });
  });
}

enum class ce_bad { label_out_of_range, label_negative, label_count, nan_logit, inf_logit, null_grad, short_grad,
                    vocab_too_big, negative_z, count_ };
inline const char* name_of(ce_bad b) {
  constexpr const char* n[] = {"label == vocab", "label -7", "labels count != rows", "NaN logit", "Inf logit",
                               "null gradient", "gradient one row short", "options.vocab > columns", "z_loss_weight -1"};
  return n[static_cast<int>(b)];
}

template <class Exec>
void run_ce_bad_inputs(Exec& exec, stats& s, const std::vector<prec>& precs) {
  std::uint64_t k = 0;
  for (auto p : precs)
    for (bool padded : {false, true})
      for (int bi = 0; bi < static_cast<int>(ce_bad::count_); ++bi)
        s.add_bad(with_storage(p, [&](auto tt) {
          using T = typename decltype(tt)::type;
          const auto b = static_cast<ce_bad>(bi);
          const std::uint64_t seed = splitmix(run_seed() ^ (0xcebad000 + k++));
          rng_t g(seed);
          const index_t n = 5, cols = padded ? 101 : 97, vocab = padded ? 89 : 97;
          ce_io<T> io;
          io.rows = io.g_rows = n;
          io.cols = cols;
          io.logits = normal_storage<T>(static_cast<std::size_t>(n * cols), 2.0, g);
          io.labels = make_labels(ignore_mode::none, n, vocab, g, true);
          ce_loss_t<kd::token_mean, T> loss;
          loss.options.vocab = padded ? vocab : 0;
          loss.options.z_loss_weight = 1e-2;
          switch (b) {
            case ce_bad::label_out_of_range: io.labels[4] = static_cast<std::int32_t>(vocab); break;
            case ce_bad::label_negative: io.labels[0] = -7; break;
            case ce_bad::label_count: io.labels.pop_back(); break;
            case ce_bad::nan_logit: put(io.logits, cols, 4, vocab - 1, std::numeric_limits<double>::quiet_NaN()); break;
            case ce_bad::inf_logit: put(io.logits, cols, 4, 0, std::numeric_limits<double>::infinity()); break;
            case ce_bad::null_grad: io.null_grad = true; break;
            case ce_bad::short_grad: io.g_rows = n - 1; break;
            case ce_bad::vocab_too_big: loss.options.vocab = cols + 1; break;
            case ce_bad::negative_z: loss.options.z_loss_weight = -1; break;
            default: break;
          }
          io.grad = nan_storage<T>(static_cast<std::size_t>(io.g_rows * cols));
          const outcome o = exec.ce(loss, io);
          if (o.st.ok())
            return verdict{false, std::string("cross_entropy bad input '") + name_of(b) + "' " + name_of(p) +
                                      (padded ? " padded" : " shared") + " seed=" + std::to_string(seed) + ": accepted"};
          return verdict{};
        }));
}

// ---------------------------------------------------------------------------------------------
// load_balance_loss and router_z_loss
// ---------------------------------------------------------------------------------------------
struct router_case {
  std::size_t index = 0;
  std::uint64_t seed = 0;
  bool z_loss = false;  // router_z_loss; else load_balance_loss
  index_t experts = 8, top_k = 1, n = 1;
  bool accumulate = false;
  prec p = prec::fp32;
  [[nodiscard]] std::string name() const {
    return std::string(z_loss ? "router_z_loss#" : "load_balance_loss#") + std::to_string(index) +
           " E=" + std::to_string(experts) + (z_loss ? "" : " k=" + std::to_string(top_k)) + " N=" + std::to_string(n) +
           (accumulate ? " accumulate " : " ") + name_of(p) + " seed=" + std::to_string(seed);
  }
};

struct router_space {
  std::vector<bool> kinds{false, true};
  std::vector<index_t> experts{8, 61};
  std::vector<index_t> top_k{1, 2, 7};  // not k = E: every expert chosen makes the gradient exactly 0
  std::vector<index_t> ns{1, 7, 33};
  std::vector<bool> accumulate{false, true};
  std::vector<prec> precs{prec::fp32, prec::bf16, prec::fp16};
};

inline std::vector<router_case> generate(const router_space& sp, std::size_t first_index = 0) {
  std::vector<router_case> out;
  std::size_t index = first_index;
  for (auto p : sp.precs)
    for (bool z : sp.kinds)
      for (auto e : sp.experts)
        for (auto k : sp.top_k)
          for (auto n : sp.ns)
            for (bool acc : sp.accumulate) {
              if (k > e || (z && k != sp.top_k.front())) continue;  // top-k <= E; the z-loss has no top-k
              router_case c;
              c.index = index++;
              c.seed = splitmix(run_seed() ^ splitmix(c.index + 0x40e000000ull));
              c.z_loss = z;
              c.experts = e;
              c.top_k = k;
              c.n = n;
              c.accumulate = acc;
              c.p = p;
              out.push_back(c);
            }
  return out;
}

template <class T>
struct router_io {
  std::vector<T> logits, grad;
  std::vector<std::int32_t> ids;  // [rows x k] (load balance)
  index_t rows = 0, cols = 0, id_rows = 0, k = 0, g_rows = 0;
};

// Distinct random experts per token.
inline std::vector<std::int32_t> make_expert_ids(index_t n, index_t e, index_t k, rng_t& g) {
  std::vector<std::int32_t> ids;
  std::vector<std::int32_t> all(static_cast<std::size_t>(e));
  for (index_t i = 0; i < e; ++i) all[static_cast<std::size_t>(i)] = static_cast<std::int32_t>(i);
  for (index_t t = 0; t < n; ++t) {
    std::shuffle(all.begin(), all.end(), g);
    ids.insert(ids.end(), all.begin(), all.begin() + k);
  }
  return ids;
}

template <class T, class Exec>
verdict run_router_typed(const router_case& c, Exec& exec) {
  rng_t g(c.seed);
  router_io<T> io;
  io.rows = io.g_rows = io.id_rows = c.n;
  io.cols = c.experts;
  io.k = c.top_k;
  io.logits = normal_storage<T>(static_cast<std::size_t>(c.n * c.experts), 1.5, g);
  io.ids = make_expert_ids(c.n, c.experts, c.top_k, g);
  // fp16 gradients of a 1e-2-weighted loss sit in fp16's subnormals: scaled, as fp16 training does.
  const double grad_scale = c.p == prec::fp16 ? 1024.0 : 1.5;
  const auto l64 = to_doubles(io.logits);
  std::vector<double> gref(l64.size());
  kd::loss_result rr;
  kd::status rst;
  const kd::matrix_view<const std::int32_t> ids(io.ids.data(), c.n, c.top_k);
  if (c.z_loss) {
    kd::router_z_loss<kd::fp64> ref;
    ref.options.grad_scale = grad_scale;
    rst = ref(kd::cpu, kd::matrix_view<const double>(l64.data(), c.n, c.experts), rr,
              kd::matrix_view<double>(gref.data(), c.n, c.experts));
  } else {
    kd::load_balance_loss<kd::fp64> ref;
    ref.options.grad_scale = grad_scale;
    rst = ref(kd::cpu, kd::matrix_view<const double>(l64.data(), c.n, c.experts), ids, rr,
              kd::matrix_view<double>(gref.data(), c.n, c.experts));
  }
  if (!rst.ok()) return {false, c.name() + ": the fp64 reference failed: " + std::string(rst.message())};
  if (c.accumulate) {
    io.grad = normal_storage<T>(io.logits.size(), 0.1 * max_abs(gref), g);
    const auto init = to_doubles(io.grad);
    for (std::size_t i = 0; i < gref.size(); ++i) gref[i] += init[i];
  } else {
    io.grad = nan_storage<T>(io.logits.size());
  }
  outcome o;
  if (c.z_loss) {
    kd::router_z_loss<kd::precision<T, float>> loss;
    loss.options.grad_scale = grad_scale;
    loss.options.accumulate_grad = c.accumulate;
    o = exec.router(loss, io);
  } else {
    kd::load_balance_loss<kd::precision<T, float>> loss;
    loss.options.grad_scale = grad_scale;
    loss.options.accumulate_grad = c.accumulate;
    o = exec.router(loss, io);
  }
  if (!o.st.ok()) return {false, c.name() + ": returned an error: " + std::string(o.st.message())};
  verdict v;
  v.loss_err = std::abs(o.loss - rr.loss) / std::abs(rr.loss);
  v.grad_err = max_rel_error(to_doubles(io.grad), gref);
  const double tol = tolerance(c.p);
  v.ok = v.loss_err <= tol && v.grad_err <= grad_tolerance(c.p);
  if (!v.ok)
    v.what = c.name() + ": " + fmt("loss %.9g ref %.9g (err %.3g)", o.loss, rr.loss, v.loss_err) +
             fmt(", grad err %.3g (tol %.g)", v.grad_err, grad_tolerance(c.p));
  return v;
}

template <class Exec>
verdict run_router_case(const router_case& c, Exec& exec) {
  return with_storage(c.p, [&](auto tt) { return run_router_typed<typename decltype(tt)::type>(c, exec); });
}

enum class router_bad { id_out_of_range, id_negative, id_rows, top_k_too_big, nan_logit, inf_logit, short_grad, count_ };
inline const char* name_of(router_bad b) {
  constexpr const char* n[] = {"expert id == E", "expert id -1", "expert ids one row short", "top-k > E",
                               "NaN router logit", "Inf router logit", "gradient one row short"};
  return n[static_cast<int>(b)];
}

template <class Exec>
void run_router_bad_inputs(Exec& exec, stats& s, const std::vector<prec>& precs) {
  std::uint64_t k = 0;
  for (auto p : precs)
    for (bool z : {false, true})
      for (int bi = 0; bi < static_cast<int>(router_bad::count_); ++bi)
        s.add_bad(with_storage(p, [&](auto tt) {
          using T = typename decltype(tt)::type;
          const auto b = static_cast<router_bad>(bi);
          // Expert-id defects concern the load balance only.
          if (z && b != router_bad::nan_logit && b != router_bad::inf_logit && b != router_bad::short_grad)
            return verdict{};
          const std::uint64_t seed = splitmix(run_seed() ^ (0x40bad000 + k++));
          rng_t g(seed);
          router_io<T> io;
          io.rows = io.g_rows = io.id_rows = 6;
          io.cols = 8;
          io.k = 2;
          io.logits = normal_storage<T>(48, 1.0, g);
          io.ids = make_expert_ids(6, 8, 2, g);
          switch (b) {
            case router_bad::id_out_of_range: io.ids[5] = 8; break;
            case router_bad::id_negative: io.ids[0] = -1; break;
            case router_bad::id_rows: io.id_rows = 5; io.ids.resize(10); break;
            case router_bad::top_k_too_big:
              io.k = 9;
              io.ids.assign(54, 0);
              break;
            case router_bad::nan_logit: put(io.logits, 8, 5, 3, std::numeric_limits<double>::quiet_NaN()); break;
            case router_bad::inf_logit: put(io.logits, 8, 5, 3, -std::numeric_limits<double>::infinity()); break;
            case router_bad::short_grad: io.g_rows = 5; break;
            default: break;
          }
          io.grad = nan_storage<T>(static_cast<std::size_t>(io.g_rows * io.cols));
          outcome o;
          if (z) o = exec.router(kd::router_z_loss<kd::precision<T, float>>{}, io);
          else o = exec.router(kd::load_balance_loss<kd::precision<T, float>>{}, io);
          if (o.st.ok())
            return verdict{false, std::string(z ? "router_z_loss" : "load_balance_loss") + " bad input '" + name_of(b) +
                                      "' " + name_of(p) + " seed=" + std::to_string(seed) + ": accepted"};
          return verdict{};
        }));
}

// ---------------------------------------------------------------------------------------------
// feature_loss
// ---------------------------------------------------------------------------------------------
enum class feature_norm { none, sqrt_dim_mse, rms_mse, cosine };
enum class projection_kind { identity, weight_and_bias, weight_only };
inline const char* name_of(feature_norm n) {
  constexpr const char* s[] = {"none", "sqrt_dim_mse", "rms_mse", "cosine"};
  return s[static_cast<int>(n)];
}
inline const char* name_of(projection_kind k) {
  return k == projection_kind::identity ? "identity" : k == projection_kind::weight_and_bias ? "W+b" : "W";
}

struct feature_case {
  std::size_t index = 0;
  std::uint64_t seed = 0;
  feature_norm norm = feature_norm::sqrt_dim_mse;
  projection_kind proj = projection_kind::weight_and_bias;
  ignore_mode ignore = ignore_mode::none;
  reduce_mode reduce = reduce_mode::mean;
  bool accumulate = false;
  prec p = prec::fp32;
  index_t n = 1, ds = 12, dt = 20;  // student width, teacher width (identity: ds = dt)
  [[nodiscard]] std::string name() const {
    return "feature_loss#" + std::to_string(index) + " " + name_of(norm) + " " + name_of(proj) + " " + name_of(ignore) +
           " " + name_of(reduce) + (accumulate ? " accumulate " : " ") + name_of(p) + " N=" + std::to_string(n) +
           " ds=" + std::to_string(ds) + " D=" + std::to_string(dt) + " seed=" + std::to_string(seed);
  }
};

struct feature_space {
  std::vector<feature_norm> norms{feature_norm::none, feature_norm::sqrt_dim_mse, feature_norm::rms_mse,
                                  feature_norm::cosine};
  std::vector<projection_kind> projs{projection_kind::identity, projection_kind::weight_and_bias,
                                     projection_kind::weight_only};
  std::vector<ignore_mode> ignores{ignore_mode::none, ignore_mode::some, ignore_mode::all};
  std::vector<reduce_mode> reduces{reduce_mode::sum, reduce_mode::mean, reduce_mode::mean_global};
  std::vector<bool> accumulate{false, true};
  std::vector<prec> precs{prec::fp32, prec::bf16, prec::fp16};
  std::vector<index_t> ns{1, 7, 33};
  index_t ds = 12, dt = 20;
};

inline std::vector<feature_case> generate(const feature_space& sp, std::size_t first_index = 0) {
  std::vector<feature_case> out;
  std::size_t index = first_index;
  for (auto p : sp.precs)
    for (auto n : sp.ns)
      for (auto norm : sp.norms)
        for (auto proj : sp.projs)
          for (auto ign : sp.ignores)
            for (auto red : sp.reduces)
              for (bool acc : sp.accumulate) {
                feature_case c;
                c.index = index++;
                c.seed = splitmix(run_seed() ^ splitmix(c.index + 0xfea000000ull));
                c.norm = norm;
                c.proj = proj;
                c.ignore = ign;
                c.reduce = red;
                c.accumulate = acc;
                c.p = p;
                c.n = n;
                c.dt = sp.dt;
                c.ds = proj == projection_kind::identity ? sp.dt : sp.ds;
                out.push_back(c);
              }
  return out;
}

template <class T>
struct feature_io {
  std::vector<T> x, w, b, t, dx, dw, db;  // w, b (and dw, db) empty when absent
  index_t n = 0, ds = 0, dt = 0, t_rows = 0, dx_rows = 0, w_rows = 0, w_cols = 0;
  std::vector<std::int32_t> labels;
};

template <class F>
decltype(auto) with_feature_norm(feature_norm n, F&& f) {
  switch (n) {
    case feature_norm::none: return f(type_tag<kd::none>{});
    case feature_norm::sqrt_dim_mse: return f(type_tag<kd::sqrt_dim_mse>{});
    case feature_norm::rms_mse: return f(type_tag<kd::rms_mse>{});
    default: return f(type_tag<kd::cosine>{});
  }
}

// Poisons (or, accumulating, fills with random values and adds to the reference) one gradient output.
template <class T>
void init_grad(std::vector<T>& grad, std::size_t size, bool accumulate, std::vector<double>& ref, rng_t& g) {
  if (size == 0) {
    grad.clear();
    return;
  }
  if (!accumulate) {
    grad = nan_storage<T>(size);
    return;
  }
  grad = normal_storage<T>(size, 0.1 * std::max(max_abs(ref), 1e-3), g);
  const auto init = to_doubles(grad);
  for (std::size_t i = 0; i < size; ++i) ref[i] += init[i];
}

template <class Norm, class R, class T, class Exec>
verdict run_feature_typed(const feature_case& c, Exec& exec) {
  rng_t g(c.seed);
  feature_io<T> io;
  io.n = io.t_rows = io.dx_rows = c.n;
  io.ds = io.w_cols = c.ds;
  io.dt = io.w_rows = c.dt;
  io.x = normal_storage<T>(static_cast<std::size_t>(c.n * c.ds), 1.0, g);
  io.t = normal_storage<T>(static_cast<std::size_t>(c.n * c.dt), 1.0, g);
  if (c.proj != projection_kind::identity)
    io.w = normal_storage<T>(static_cast<std::size_t>(c.dt * c.ds), 1.0 / std::sqrt(double(c.ds)), g);
  if (c.proj == projection_kind::weight_and_bias) io.b = normal_storage<T>(static_cast<std::size_t>(c.dt), 0.1, g);
  io.labels = make_labels(c.ignore, c.n, 1000, g, false);
  using P = kd::precision<T, float>;
  kd::feature_loss<Norm, R, kd::precision_set<P, P, P>> loss;
  loss.options.grad_scale = 1.5;
  loss.options.accumulate_grad = c.accumulate;
  if (c.reduce == reduce_mode::mean_global)
    loss.options.global_tokens = (io.labels.empty() ? c.n : kd::count_tokens(io.labels)) + 5;

  kd::feature_loss<Norm, R, kd::precision_set<kd::fp64, kd::fp64, kd::fp64>> ref;
  ref.options = loss.options;
  ref.options.accumulate_grad = false;
  const auto x64 = to_doubles(io.x), w64 = to_doubles(io.w), b64 = to_doubles(io.b), t64 = to_doubles(io.t);
  std::vector<double> dx_ref(x64.size()), dw_ref(w64.size()), db_ref(b64.size());
  auto view = [](const std::vector<double>& v, index_t r, index_t cols) {
    return v.empty() ? kd::matrix_view<const double>{} : kd::matrix_view<const double>(v.data(), r, cols);
  };
  auto mview = [](std::vector<double>& v, index_t r, index_t cols) {
    return v.empty() ? kd::matrix_view<double>{} : kd::matrix_view<double>(v.data(), r, cols);
  };
  kd::loss_result rr;
  const auto rst = ref(kd::cpu, view(x64, c.n, c.ds), view(w64, c.dt, c.ds), view(b64, 1, c.dt), view(t64, c.n, c.dt),
                       io.labels, rr, mview(dx_ref, c.n, c.ds), mview(dw_ref, c.dt, c.ds), mview(db_ref, 1, c.dt));
  if (!rst.ok()) return {false, c.name() + ": the fp64 reference failed: " + std::string(rst.message())};
  init_grad(io.dx, io.x.size(), c.accumulate, dx_ref, g);
  init_grad(io.dw, io.w.size(), c.accumulate, dw_ref, g);
  init_grad(io.db, io.b.size(), c.accumulate, db_ref, g);
  const outcome o = exec.feature(loss, io);
  if (!o.st.ok()) return {false, c.name() + ": returned an error: " + std::string(o.st.message())};
  verdict v;
  const double floor = 1e-3 * static_cast<double>(std::max<index_t>(rr.tokens, 1)) / rr.normalizer;
  v.loss_err = std::abs(o.loss - rr.loss) / std::max(std::abs(rr.loss), floor);
  const double ex = max_rel_error(to_doubles(io.dx), dx_ref), ew = max_rel_error(to_doubles(io.dw), dw_ref),
               eb = max_rel_error(to_doubles(io.db), db_ref);
  v.grad_err = (ex == ex && ew == ew && eb == eb) ? std::max({ex, ew, eb}) : std::numeric_limits<double>::quiet_NaN();
  const double tol = tolerance(c.p);
  v.ok = v.loss_err <= tol && v.grad_err <= grad_tolerance(c.p) && o.tokens == rr.tokens;
  if (!v.ok)
    v.what = c.name() + ": " + fmt("loss %.9g ref %.9g (err %.3g)", o.loss, rr.loss, v.loss_err) +
             fmt(", dx err %.3g, dW err %.3g", ex, ew) + fmt(", db err %.3g (tol %.g)", eb, grad_tolerance(c.p)) +
             ", tokens " + std::to_string(o.tokens) + " ref " + std::to_string(rr.tokens);
  return v;
}

template <class Exec>
verdict run_feature_case(const feature_case& c, Exec& exec) {
  return with_storage(c.p, [&](auto tt) {
    return with_feature_norm(c.norm, [&](auto nt) {
      return with_reduction(c.reduce, [&](auto rt) {
        return run_feature_typed<typename decltype(nt)::type, typename decltype(rt)::type, typename decltype(tt)::type>(
            c, exec);
      });
    });
  });
}

// ---------------------------------------------------------------------------------------------
// attention_loss
// ---------------------------------------------------------------------------------------------
struct attention_case {
  std::size_t index = 0;
  std::uint64_t seed = 0;
  bool softmax_kl = true;  // else kd::none (raw-score MSE)
  int student_heads = 1, teacher_heads = 1;
  bool causal = true;
  double temperature = 1;
  bool accumulate = false;
  prec p = prec::fp32;
  index_t batch = 1, seq = 1;
  [[nodiscard]] std::string name() const {
    return "attention_loss#" + std::to_string(index) + (softmax_kl ? " softmax_kl" : " none") + " heads " +
           std::to_string(student_heads) + "<-" + std::to_string(teacher_heads) + (causal ? " causal" : " full") +
           " T=" + fmt("%g", temperature, 0) + (accumulate ? " accumulate " : " ") + name_of(p) +
           " B=" + std::to_string(batch) + " S=" + std::to_string(seq) + " seed=" + std::to_string(seed);
  }
};

struct attention_space {
  std::vector<bool> softmax_kl{false, true};
  std::vector<std::pair<int, int>> heads{{2, 2}, {3, 4}, {9, 16}, {4, 2}};  // student <- teacher (uniform head map)
  std::vector<bool> causal{true, false};
  std::vector<double> temps{1, 2};  // softmax_kl only
  std::vector<bool> accumulate{false, true};
  std::vector<prec> precs{prec::fp32, prec::bf16, prec::fp16};
  std::vector<index_t> batches{1, 2};
  std::vector<index_t> seqs{1, 5, 17};
};

inline std::vector<attention_case> generate(const attention_space& sp, std::size_t first_index = 0) {
  std::vector<attention_case> out;
  std::size_t index = first_index;
  for (auto p : sp.precs)
    for (bool kl : sp.softmax_kl)
      for (auto [hs, ht] : sp.heads)
        for (bool causal : sp.causal)
          for (double t : sp.temps)
            for (bool acc : sp.accumulate)
              for (auto b : sp.batches)
                for (auto s : sp.seqs) {
                  if (!kl && t != sp.temps.front()) continue;  // the temperature only scales softmax_kl
                  attention_case c;
                  c.index = index++;
                  c.seed = splitmix(run_seed() ^ splitmix(c.index + 0xa77000000ull));
                  c.softmax_kl = kl;
                  c.student_heads = hs;
                  c.teacher_heads = ht;
                  c.causal = causal;
                  c.temperature = t;
                  c.accumulate = acc;
                  c.p = p;
                  c.batch = b;
                  c.seq = s;
                  out.push_back(c);
                }
  return out;
}

template <class T>
struct attention_io {
  std::vector<T> teacher, student, grad;
  index_t t_maps = 0, s_maps = 0, g_maps = 0, seq = 0;
};

template <class Norm, class T, class Exec>
verdict run_attention_typed(const attention_case& c, Exec& exec) {
  rng_t g(c.seed);
  attention_io<T> io;
  io.seq = c.seq;
  io.t_maps = c.batch * c.teacher_heads;
  io.s_maps = io.g_maps = c.batch * c.student_heads;
  const auto map_size = static_cast<std::size_t>(c.seq * c.seq);
  io.teacher = normal_storage<T>(io.t_maps * map_size, 2.0, g);
  io.student = normal_storage<T>(io.s_maps * map_size, 1.0, g);
  // Causal: the entries above the diagonal are masked (-inf in a real model) and must never be read.
  if (c.causal)
    for (auto* m : {&io.teacher, &io.student})
      for (std::size_t e = 0; e < m->size(); ++e)
        if (static_cast<index_t>(e % map_size) % c.seq > static_cast<index_t>(e % map_size) / c.seq)
          (*m)[e] = from_double<T>(-std::numeric_limits<double>::infinity());
  kd::attention_options o;
  o.student_heads = c.student_heads;
  o.teacher_heads = c.teacher_heads;
  o.causal = c.causal;
  o.temperature = c.temperature;
  o.grad_scale = 1.5;
  o.accumulate_grad = c.accumulate;
  using P = kd::precision<T, float>;
  kd::attention_loss<Norm, kd::precision_set<P, P>> loss;
  loss.options = o;
  kd::attention_loss<Norm, kd::precision_set<kd::fp64, kd::fp64>> ref;
  ref.options = o;
  ref.options.accumulate_grad = false;
  auto t64 = to_doubles(io.teacher), s64 = to_doubles(io.student);
  std::vector<double> gref(s64.size());
  kd::loss_result rr;
  const auto rst = ref(kd::cpu, kd::tensor3_view<const double>{t64.data(), io.t_maps, c.seq, c.seq},
                       kd::tensor3_view<const double>{s64.data(), io.s_maps, c.seq, c.seq}, rr,
                       kd::tensor3_view<double>{gref.data(), io.s_maps, c.seq, c.seq});
  if (!rst.ok()) return {false, c.name() + ": the fp64 reference failed: " + std::string(rst.message())};
  // Masked entries of the gradient: compared as written (the reference writes 0 there); never NaN.
  if (c.accumulate) {
    init_grad(io.grad, io.student.size(), true, gref, g);
  } else {
    io.grad = nan_storage<T>(io.student.size());
  }
  const outcome out = exec.attention(loss, io);
  if (!out.st.ok()) return {false, c.name() + ": returned an error: " + std::string(out.st.message())};
  verdict v;
  // Floors: a map with one key (S = 1) has loss and gradient exactly 0, where fp32 softmax rounding leaves
  // ~1e-7; they are compared at 1e-2 of the natural scales (a loss of O(1), a gradient of
  // grad_scale / normalizer per entry) instead of dividing by zero.
  v.loss_err = std::abs(out.loss - rr.loss) / std::max(std::abs(rr.loss), 1e-2);
  v.grad_err = max_rel_error(to_doubles(io.grad), gref, 1e-2 * o.grad_scale / std::max(rr.normalizer, 1.0));
  const double tol = tolerance(c.p);
  v.ok = v.loss_err <= tol && v.grad_err <= grad_tolerance(c.p);
  if (!v.ok)
    v.what = c.name() + ": " + fmt("loss %.9g ref %.9g (err %.3g)", out.loss, rr.loss, v.loss_err) +
             fmt(", grad err %.3g (tol %.g)", v.grad_err, grad_tolerance(c.p));
  return v;
}

template <class Exec>
verdict run_attention_case(const attention_case& c, Exec& exec) {
  return with_storage(c.p, [&](auto tt) {
    using T = typename decltype(tt)::type;
    if (c.softmax_kl) return run_attention_typed<kd::softmax_kl, T>(c, exec);
    return run_attention_typed<kd::none, T>(c, exec);
  });
}

// Bad inputs of feature_loss and attention_loss.
enum class feature_bad { teacher_rows, projection_shape, nan_student, nan_teacher, inf_projection, short_dx,
                         label_count, count_ };
inline const char* name_of(feature_bad b) {
  constexpr const char* n[] = {"teacher rows != student rows", "projection [D x ds+1]", "NaN student hidden", "NaN teacher hidden", "Inf projection",
                               "dstudent one row short", "labels count != rows"};
  return n[static_cast<int>(b)];
}

template <class Exec>
void run_feature_bad_inputs(Exec& exec, stats& s, const std::vector<prec>& precs) {
  std::uint64_t k = 0;
  for (auto p : precs)
    for (int bi = 0; bi < static_cast<int>(feature_bad::count_); ++bi)
      s.add_bad(with_storage(p, [&](auto tt) {
        using T = typename decltype(tt)::type;
        const auto b = static_cast<feature_bad>(bi);
        const std::uint64_t seed = splitmix(run_seed() ^ (0xfeabad00 + k++));
        rng_t g(seed);
        feature_io<T> io;
        io.n = io.t_rows = io.dx_rows = 5;
        io.ds = io.w_cols = 12;
        io.dt = io.w_rows = 20;
        io.x = normal_storage<T>(60, 1.0, g);
        io.t = normal_storage<T>(100, 1.0, g);
        io.w = normal_storage<T>(240, 0.3, g);
        io.b = normal_storage<T>(20, 0.1, g);
        io.labels = make_labels(ignore_mode::some, 5, 1000, g, true);
        switch (b) {
          case feature_bad::teacher_rows: io.t_rows = 4; io.t.resize(80); break;
          case feature_bad::projection_shape: io.w_cols = 13; io.w = normal_storage<T>(260, 0.3, g); break;
          case feature_bad::nan_student: put(io.x, 12, 3, 3, std::numeric_limits<double>::quiet_NaN()); break;
          case feature_bad::nan_teacher: put(io.t, 20, 3, 19, std::numeric_limits<double>::quiet_NaN()); break;
          case feature_bad::inf_projection: put(io.w, 12, 2, 2, std::numeric_limits<double>::infinity()); break;
          case feature_bad::short_dx: io.dx_rows = 4; break;
          case feature_bad::label_count: io.labels.pop_back(); break;
          default: break;
        }
        io.dx = nan_storage<T>(static_cast<std::size_t>(io.dx_rows * io.ds));
        io.dw = nan_storage<T>(io.w.size());
        io.db = nan_storage<T>(20);
        using P = kd::precision<T, float>;
        kd::feature_loss<kd::sqrt_dim_mse, kd::token_mean, kd::precision_set<P, P, P>> loss;
        const outcome o = exec.feature(loss, io);
        if (o.st.ok())
          return verdict{false, std::string("feature_loss bad input '") + name_of(b) + "' " + name_of(p) +
                                    " seed=" + std::to_string(seed) + ": accepted"};
        return verdict{};
      }));
}

enum class attention_bad { teacher_maps, nan_student, inf_teacher, short_grad, zero_temperature, count_ };
inline const char* name_of(attention_bad b) {
  constexpr const char* n[] = {"teacher maps != batch x teacher heads", "NaN student score (unmasked)",
                               "Inf teacher score (unmasked)", "gradient one map short", "temperature 0"};
  return n[static_cast<int>(b)];
}

template <class Exec>
void run_attention_bad_inputs(Exec& exec, stats& s, const std::vector<prec>& precs) {
  std::uint64_t k = 0;
  for (auto p : precs)
    for (int bi = 0; bi < static_cast<int>(attention_bad::count_); ++bi)
      s.add_bad(with_storage(p, [&](auto tt) {
        using T = typename decltype(tt)::type;
        const auto b = static_cast<attention_bad>(bi);
        const std::uint64_t seed = splitmix(run_seed() ^ (0xa77bad00 + k++));
        rng_t g(seed);
        attention_io<T> io;
        io.seq = 5;
        io.t_maps = 2 * 4;
        io.s_maps = io.g_maps = 2 * 3;
        io.teacher = normal_storage<T>(static_cast<std::size_t>(io.t_maps * 25), 2.0, g);
        io.student = normal_storage<T>(static_cast<std::size_t>(io.s_maps * 25), 1.0, g);
        kd::attention_options o;
        o.student_heads = 3;
        o.teacher_heads = 4;
        o.causal = true;
        switch (b) {
          case attention_bad::teacher_maps: io.t_maps = 7; io.teacher.resize(175); break;
          case attention_bad::nan_student: put(io.student, 5, 4, 2, std::numeric_limits<double>::quiet_NaN()); break;
          case attention_bad::inf_teacher: put(io.teacher, 5, 9, 0, std::numeric_limits<double>::infinity()); break;
          case attention_bad::short_grad: io.g_maps = 5; break;
          case attention_bad::zero_temperature: o.temperature = 0; break;
          default: break;
        }
        io.grad = nan_storage<T>(static_cast<std::size_t>(io.g_maps * 25));
        using P = kd::precision<T, float>;
        kd::attention_loss<kd::softmax_kl, kd::precision_set<P, P>> loss;
        loss.options = o;
        const outcome out = exec.attention(loss, io);
        if (out.st.ok())
          return verdict{false, std::string("attention_loss bad input '") + name_of(b) + "' " + name_of(p) +
                                    " seed=" + std::to_string(seed) + ": accepted"};
        return verdict{};
      }));
}

// ---------------------------------------------------------------------------------------------
// Drivers shared by the CPU and CUDA tests
// ---------------------------------------------------------------------------------------------
template <class Exec> verdict run_case(const logit_case& c, Exec& e) { return run_logit_case(c, e); }
template <class Exec> verdict run_case(const ce_case& c, Exec& e) { return run_ce_case(c, e); }
template <class Exec> verdict run_case(const router_case& c, Exec& e) { return run_router_case(c, e); }
template <class Exec> verdict run_case(const feature_case& c, Exec& e) { return run_feature_case(c, e); }
template <class Exec> verdict run_case(const attention_case& c, Exec& e) { return run_attention_case(c, e); }

// Runs every selected case of a generated list into s.
template <class Cases, class Exec>
void run_all(const Cases& cases, Exec& exec, stats& s) {
  for (const auto& c : cases)
    if (selected(c.name())) s.add(c.p, run_case(c, exec));
}

// Every loss's bad inputs (linear_logit_kd in fp32 and bf16 only).
template <class Exec>
void run_all_bad_inputs(Exec& exec, stats& s) {
  const std::vector<prec> all{prec::fp32, prec::bf16, prec::fp16};
  run_logit_bad_inputs(exec, s, all);
  run_linear_bad_inputs(exec, s, {prec::fp32, prec::bf16});
  run_ce_bad_inputs(exec, s, all);
  run_router_bad_inputs(exec, s, all);
  run_feature_bad_inputs(exec, s, all);
  run_attention_bad_inputs(exec, s, all);
}

}  // namespace kdmatrix
