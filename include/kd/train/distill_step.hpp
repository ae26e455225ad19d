// kd/train/distill_step.hpp: the training steps of a distillation run, on any model backend.
//
//   teacher_step<Model>            MoE teacher: LM + z-loss + Switch load balance + router z-loss, with
//                                  expert-utilization statistics and a collapse alarm
//   distill_step<Teacher, Student, Policy>
//                                  dense student: LM + z-loss + KD through the vocab map on aligned
//                                  positions + feature loss + the routing term; or LM alone (scratch)
//   evaluate_lm(model, stream)     validation loss, perplexity and bits per byte
//
// Shared shape of a step (written once against kd::model's ops; kd/train/step_backend.hpp says what
// differs per backend):
//  - Losses are configured once (the objective's component names, the policy types, the vocab map);
//    per step only their weights and temperature change, taken from the objective's schedules.
//  - The LM head never materialises N x V logits: it runs chunk by chunk (chunk_rows tokens): logits =
//    x W^T, KD writes dlogits, cross-entropy adds its gradient to them, then dx = dlogits W and
//    dW += dlogits^T x. The teacher's logits exist only for the rows of one chunk (its final hidden
//    states are gathered to the student's rows first), and only for the teacher ids the vocab map reads:
//    the frozen teacher's head rows of those ids are gathered once into a compact head (42,257 of
//    151,936 rows for Qwen3 -> GPT-2, padded with zero rows to 42,304), against a compact copy of the
//    map. The loss is the same: with a map, KD never reads an unmapped teacher column.
//  - Token means use the whole step's token count (token_options::global_tokens), so the chunking does
//    not change the loss, and a micro-batch split would not either.
//  - Loss values land in backend slots (device floats on the GPU). They are read by flush(), once per
//    logged step: the only host synchronisation. flush() combines each buffered step's values through
//    the objective, which names a NaN/Inf component and its step.
// Data parallel (step_options::comm): each rank steps on its own rows with a replica of both models; the
// step's token counts, the gradients (student and side arena) and the logged losses are summed over the
// group, so every rank applies the update of the global batch (to float rounding of the sums' order).
// The routing term ("route"): a linear head on a middle student layer predicts, for every aligned token,
// the teacher's router distribution over experts at a middle MoE layer (forward KL at T = 1). It teaches
// the dense student which expert the teacher would use for each token; weight 0 turns it off.
#pragma once

#include <algorithm>
#include <cmath>
#include <concepts>
#include <cstdint>
#include <numbers>
#include <span>
#include <string>
#include <string_view>
#include <type_traits>
#include <utility>
#include <vector>

#include <kd/core/comm.hpp>
#include <kd/core/rng.hpp>
#include <kd/core/status.hpp>
#include <kd/loss/cross_entropy.hpp>
#include <kd/loss/feature.hpp>
#include <kd/loss/logit_kd.hpp>
#include <kd/loss/moe.hpp>
#include <kd/loss/vocab_map.hpp>
#include <kd/model/transformer.hpp>
#include <kd/policy/curriculum.hpp>
#include <kd/policy/normalization.hpp>
#include <kd/train/adamw.hpp>
#include <kd/train/data.hpp>
#include <kd/train/objective.hpp>
#include <kd/train/step_backend.hpp>

namespace kd::train {

// Compile-time choices of a distillation run: the divergence of the logit KD, the normalization of the
// feature loss and the curve of the KD weight's ramp (the grid of examples/kd_train's `grid`).
template <class D = forward_kl, class FeatureNorm = rms_mse, Curve KdCurve = curve::linear>
struct distill_policy {
  static_assert(FeatureNormalization<FeatureNorm>, "kd: distill_policy's second parameter must be a feature normalization (rms_mse, sqrt_dim_mse, cosine, none).");
  using divergence = D;
  using feature_normalization = FeatureNorm;
  using kd_curve = KdCurve;

  static constexpr std::string_view divergence_name = std::same_as<D, forward_kl>   ? "forward_kl"
                                                      : std::same_as<D, reverse_kl> ? "reverse_kl"
                                                      : std::same_as<D, jsd>        ? "jsd"
                                                      : std::same_as<D, skew_kl>    ? "skew_kl"
                                                                                    : "tvd";
  static constexpr std::string_view feature_name = std::same_as<FeatureNorm, rms_mse>        ? "rms_mse"
                                                   : std::same_as<FeatureNorm, sqrt_dim_mse> ? "sqrt_dim_mse"
                                                   : std::same_as<FeatureNorm, cosine>       ? "cosine"
                                                                                             : "none";
  static constexpr std::string_view curve_name = KdCurve::name;
};

// The storage precision policy of a backend's value type.
template <class T>
using precision_of = precision<T, std::conditional_t<std::is_same_v<T, double>, double, float>>;

struct step_options {
  index_t chunk_rows = 2048;                  // LM-head rows per chunk: extra memory chunk_rows x V
  std::int32_t ignore_index = default_ignore_index;
  index_t vocab = 0;                          // real tokens of the model's own head (0 = every row)
  std::int64_t window = 1;                    // steps whose losses are buffered between two flush() calls
  // Data parallel (distill_step): this rank's handle on the group, or null for one process. Each rank
  // steps on its own rows; the token counts, the gradients and the logged losses are summed over the
  // group, so every rank takes the update of the whole global batch.
  communicator* comm = nullptr;
  // Data parallel: gradients are reduced in buckets of at least this many elements, each started as soon
  // as the backward has finished its layers (on NCCL, on a side stream while the earlier layers run).
  std::size_t bucket_elements = std::size_t{1} << 22;
};

struct distill_options : step_options {
  std::int64_t feature_student_layer = -2;  // -2: the final normed hidden state; l >= -1: hidden(l)
  std::int64_t feature_teacher_layer = -2;
  std::int64_t route_student_layer = -3;    // -3: the middle layer; else the layer whose output feeds the head
  std::int64_t route_teacher_layer = -3;    // -3: the middle MoE layer
  std::uint64_t seed = 0;                   // initialisation of the projection and the routing head
};

namespace detail {

template <class B, class U>
status ensure(B& b, typename B::template buffer<U>& buf, std::size_t n, const char* what) {
  if (buf.size() == n) return {};
  buf = b.template alloc<U>(n);
  if (buf.size() != n)
    return {errc::backend_error, std::string("training step: cannot allocate ") + what + " (" +
                                     std::to_string(n * sizeof(U)) + " bytes)"};
  return {};
}

template <class B, class U>
status upload_vector(B& b, std::span<const U> host, typename B::template buffer<U>& dev, const char* what) {
  KD_TRY((ensure<B, U>(b, dev, std::max<std::size_t>(host.size(), 1), what)));
  if (!host.empty()) KD_TRY(b.upload(host.data(), host.size(), dev.data()));
  return {};
}

// Profiling hook: a backend with time(name, f) (kd::model::profiled_ops) brackets the losses and the
// optimizer steps, which are not model ops, so a step's GPU time is accounted for in full.
template <class B, class F>
status timed(B& b, const char* name, F&& f) {
  if constexpr (requires { b.time(name, f); })
    return b.time(name, f);
  else
    return f();
}

// The indices of a model's MoE layers, and the middle one (-1 without one).
inline std::vector<std::int64_t> moe_layers(const model::arch& a) {
  std::vector<std::int64_t> moe;
  for (std::int64_t l = 0; l < a.num_layers(); ++l)
    if (a.layers[static_cast<std::size_t>(l)].moe) moe.push_back(l);
  return moe;
}
inline std::int64_t middle_moe_layer(const model::arch& a) {
  const auto moe = moe_layers(a);
  return moe.empty() ? -1 : moe[moe.size() / 2];
}

// Tokens routed to each expert of each MoE layer, summed over forwards (the model's host counts), and the
// shares they give: expert-utilization statistics of training windows and of evaluations.
struct expert_tally {
  std::vector<std::int64_t> layers;
  std::vector<std::vector<double>> counts;
  expert_tally() = default;
  explicit expert_tally(const model::arch& a)
      : layers(moe_layers(a)), counts(layers.size(), std::vector<double>(static_cast<std::size_t>(a.experts), 0.0)) {}
  template <class Model>
  void add(const Model& m) {
    for (std::size_t r = 0; r < layers.size(); ++r) {
      const auto c = m.expert_counts(layers[r]);
      for (std::size_t e = 0; e < c.size() && e < counts[r].size(); ++e) counts[r][e] += static_cast<double>(c[e]);
    }
  }
  // Each layer's shares (summing to 1; 0 with no token); the tally restarts.
  std::vector<std::vector<double>> take_shares() {
    std::vector<std::vector<double>> out = counts;
    for (auto& c : out) {
      double total = 0;
      for (double x : c) total += x;
      for (double& x : c) x = total > 0 ? x / total : 0.0;
    }
    for (auto& c : counts) std::fill(c.begin(), c.end(), 0.0);
    return out;
  }
};

// Data-parallel gradient buckets over a model's arena, which holds [embedding | layer 0 | ... | layer L-1 |
// final norm | head if untied]. The backward finishes the final norm first, then the layers from the last
// down: after layer l, [layer l, final norm] is final. Each bucket is a contiguous range started once it
// holds bucket_elements; finish() starts the rest (embedding, earliest layers, the head after its gradient
// was added). Every element is reduced exactly once, as by one all-reduce of the whole arena.
struct grad_buckets {
  std::size_t hi = 0, bucket = 0;
  void start(const model::parameter_table& t, std::size_t bucket_elements) {
    hi = t.final_norm() + static_cast<std::size_t>(t.arch().hidden);
    bucket = std::max<std::size_t>(bucket_elements, 1);
  }
  template <class T>
  static status begin(communicator& c, T* g, std::size_t n) {
    if constexpr (std::is_same_v<T, double>) return c.all_reduce(g, n, reduce_op::sum);
    else return c.all_reduce_begin(g, n, reduce_op::sum);
  }
  template <class T>
  status layer_done(communicator& c, T* g, const model::parameter_table& t, std::int64_t l) {
    const std::size_t lo = t.layer(l).input_norm;
    if (hi - lo < bucket) return {};
    KD_TRY(begin(c, g + lo, hi - lo));
    hi = lo;
    return {};
  }
  template <class T>
  status finish(communicator& c, T* g, const model::parameter_table& t) {
    if (hi > 0) KD_TRY(begin(c, g, hi));
    const std::size_t tail = t.final_norm() + static_cast<std::size_t>(t.arch().hidden);
    if (t.size() > tail) KD_TRY(begin(c, g + tail, t.size() - tail));
    hi = 0;
    return {};
  }
};

// A plain arena (parameters and gradients of the same layout) in backend memory: the projection and the
// routing head, which are not part of either model.
template <class B>
struct side_arena {
  using T = typename B::value_type;
  typename B::template buffer<T> params, grads;
  std::vector<adamw_segment> segments;
  std::size_t size() const { return params.size(); }
};

}  // namespace detail

// ---------------------------------------------------------------------------------------------------
// The chunked LM head: CE (+ z-loss) and, with a teacher, KD through the vocab map, no N x V logits.
// ---------------------------------------------------------------------------------------------------
namespace detail {

template <class B>
struct head_buffers {
  using T = typename B::value_type;
  typename B::template buffer<T> logits, dlogits, tlogits, dw;
};

// One pass over the head for N rows of x [N x H] with head W [V x H]. ce_slot0 / kd_slot0: the first of
// ceil(N / chunk) slots. With dx == nullptr the pass is forward only (evaluation). With kd_teacher
// (the teacher's final hidden gathered to these rows, [N x Ht]) and its head Wt [Vt x Ht], KD runs on the
// rows whose kd_mask is not ignored.
template <class B, class CE, class KD>
status head_pass(B& b, typename step_backend<B>::slots& slots, head_buffers<B>& hb, const CE& ce_proto,
                 const KD* kd_proto, const typename B::value_type* x, const typename B::value_type* w, index_t n,
                 index_t v, index_t h, index_t chunk_rows, std::span<const std::int32_t> labels,
                 std::size_t ce_slot0, typename B::value_type* dx, typename B::value_type* dw,
                 const typename B::value_type* kd_teacher = nullptr, const typename B::value_type* wt = nullptr,
                 index_t vt = 0, index_t ht = 0, std::span<const std::int32_t> kd_mask = {},
                 std::size_t kd_slot0 = 0) {
  using T = typename B::value_type;
  const auto lb = step_backend<B>::losses(b);
  const index_t chunk = std::min(chunk_rows, n);
  KD_TRY((ensure<B, T>(b, hb.logits, static_cast<std::size_t>(chunk) * v, "head logits")));
  const bool grad = dx != nullptr;
  const bool with_kd = kd_proto != nullptr;
  if (grad) KD_TRY((ensure<B, T>(b, hb.dlogits, static_cast<std::size_t>(chunk) * v, "head logit gradients")));
  if (with_kd) KD_TRY((ensure<B, T>(b, hb.tlogits, static_cast<std::size_t>(chunk) * vt, "teacher logits")));
  std::size_t c = 0;
  for (index_t r0 = 0; r0 < n; r0 += chunk, ++c) {
    const index_t rows = std::min(chunk, n - r0);
    KD_TRY(b.linear(x + static_cast<std::size_t>(r0) * h, w, hb.logits.data(), rows, v, h, false));
    const auto lg = matrix_view<const T>(hb.logits.data(), rows, v);
    const auto lab = labels.subspan(static_cast<std::size_t>(r0), static_cast<std::size_t>(rows));
    CE ce = ce_proto;
    if (with_kd) {
      KD_TRY(b.linear(kd_teacher + static_cast<std::size_t>(r0) * ht, wt, hb.tlogits.data(), rows, vt, ht, false));
      decltype(auto) ko = slots.loss(kd_slot0 + c);
      const auto mask = kd_mask.subspan(static_cast<std::size_t>(r0), static_cast<std::size_t>(rows));
      KD_TRY(timed(b, "loss kd", [&] {
        return (*kd_proto)(lb, matrix_view<const T>(hb.tlogits.data(), rows, vt), lg, mask, ko,
                           matrix_view<T>(hb.dlogits.data(), rows, v));
      }));
      ce.options.accumulate_grad = true;
    }
    decltype(auto) co = slots.ce(ce_slot0 + c);
    if (grad) {
      KD_TRY(timed(b, "loss cross_entropy", [&] { return ce(lb, lg, lab, co, matrix_view<T>(hb.dlogits.data(), rows, v)); }));
      KD_TRY(b.linear_dx(hb.dlogits.data(), w, dx + static_cast<std::size_t>(r0) * h, rows, v, h, false));
      KD_TRY(b.linear_dw(hb.dlogits.data(), x + static_cast<std::size_t>(r0) * h, dw, rows, v, h, r0 > 0));
    } else {
      KD_TRY(timed(b, "loss cross_entropy", [&] { return ce(lb, lg, lab, co); }));
    }
  }
  return {};
}

inline std::size_t chunks_of(index_t n, index_t chunk) {
  const index_t c = std::min(chunk, n);
  return c <= 0 ? 0 : static_cast<std::size_t>((n + c - 1) / c);
}

}  // namespace detail

// Per-step values of a component, in the order the objective names them, plus step statistics.
struct step_record {
  std::int64_t step = 0;
  std::vector<std::pair<std::string, double>> values;
};

// ---------------------------------------------------------------------------------------------------
// The MoE teacher
// ---------------------------------------------------------------------------------------------------
template <class Model>
class teacher_step {
 public:
  using B = std::remove_cvref_t<decltype(std::declval<Model&>().backend())>;
  using T = typename B::value_type;
  using P = precision_of<T>;
  using sb = step_backend<B>;

  // The objective names lm and, optionally, z_loss, load_balance, router_z (their weights: the losses run
  // at coefficient 1).
  status init(Model& m, const objective& obj, const step_options& o, const adamw_options& opt) {
    KD_TRY(obj.validate());
    if (o.comm != nullptr)
      return {errc::invalid_argument, "teacher_step: data-parallel teacher training is not supported (the Switch "
                                      "load-balance loss would need the group's expert statistics); train the "
                                      "teacher on one rank"};
    m_ = &m;
    obj_ = &obj;
    o_ = o;
    const auto& a = m.arch();
    tally_ = detail::expert_tally(a);
    ce_.options.vocab = o.vocab;
    ce_.options.ignore_index = o.ignore_index;
    ce_.options.component = "lm";
    lb_.options.coefficient = rz_.options.coefficient = 1.0;
    lb_.options.component = "load_balance";
    rz_.options.component = "router_z";
    rz_.options.accumulate_grad = true;
    return opt_.init(m.backend(), model_segments(m.table()), m.params(), m.table().size(), opt);
  }

  // Enqueues one optimizer step on batch rows [b x s] of teacher ids and labels (host).
  status step(std::span<const std::int32_t> ids, std::span<const std::int32_t> labels, std::int64_t batch,
              std::int64_t seq, std::int64_t step_no) {
    B& b = m_->backend();
    const auto& a = m_->arch();
    const auto n = static_cast<index_t>(batch * seq);
    const std::size_t C = detail::chunks_of(n, o_.chunk_rows), R = tally_.layers.size();
    if (pending_.empty()) KD_TRY(slots_.resize(b, static_cast<std::size_t>(o_.window) * 2 * R, static_cast<std::size_t>(o_.window) * C));
    if (static_cast<std::int64_t>(pending_.size()) >= o_.window)
      return {errc::invalid_argument, "teacher_step: " + std::to_string(o_.window) + " steps buffered; flush() first"};
    const std::size_t w = pending_.size();
    model::forward_options fo;
    fo.logits = false;
    KD_TRY(m_->forward(ids, batch, seq, fo));
    KD_TRY((detail::upload_vector<B, std::int32_t>(b, labels, labels_, "labels")));
    KD_TRY((detail::ensure<B, T>(b, dxf_, static_cast<std::size_t>(n) * a.hidden, "final hidden gradient")));
    KD_TRY((detail::ensure<B, T>(b, hb_.dw, static_cast<std::size_t>(a.vocab) * a.hidden, "head gradient")));
    auto ce = ce_;
    ce.options.global_tokens = std::max<index_t>(1, count_tokens(labels, o_.ignore_index));
    ce.options.grad_scale = obj_->weight("lm", step_no);
    ce.options.z_loss_weight = obj_->weight("z_loss", step_no);
    using no_kd = logit_kd<forward_kl, token_mean, precision_set<P, P>>;
    KD_TRY((detail::head_pass<B, decltype(ce), no_kd>(
        b, slots_, hb_, ce, nullptr, m_->final_hidden(), m_->params() + m_->table().head(), n,
        static_cast<index_t>(a.vocab), static_cast<index_t>(a.hidden), o_.chunk_rows,
        std::span<const std::int32_t>(labels_.data(), static_cast<std::size_t>(n)), w * C, dxf_.data(), hb_.dw.data())));
    typename Model::grads_in g;
    g.d_final_hidden = dxf_.data();
    const auto lb = sb::losses(b);
    const auto E = static_cast<index_t>(a.experts), k = static_cast<index_t>(a.top_k);
    drouter_.resize(R);
    auto lbl = lb_;
    auto rzl = rz_;
    lbl.options.grad_scale = obj_->weight("load_balance", step_no);
    rzl.options.grad_scale = obj_->weight("router_z", step_no);
    for (std::size_t r = 0; r < R; ++r) {
      const std::int64_t l = tally_.layers[r];
      KD_TRY((detail::ensure<B, T>(b, drouter_[r], static_cast<std::size_t>(n) * E, "router gradient")));
      const auto rl = matrix_view<const T>(m_->router_logits(l), n, E);
      decltype(auto) lo = slots_.loss(w * 2 * R + 2 * r);
      decltype(auto) zo = slots_.loss(w * 2 * R + 2 * r + 1);
      KD_TRY(lbl(lb, rl, matrix_view<const std::int32_t>(m_->expert_ids(l), n, k), lo,
                 matrix_view<T>(drouter_[r].data(), n, E)));
      KD_TRY(rzl(lb, rl, zo, matrix_view<T>(drouter_[r].data(), n, E)));
      g.d_router_logits.emplace_back(l, drouter_[r].data());
    }
    tally_.add(*m_);
    KD_TRY(m_->backward(g, model::grad_mode::overwrite));
    KD_TRY(b.add(m_->grads() + m_->table().head(), hb_.dw.data(), hb_.dw.size()));
    KD_TRY(detail::timed(b, "adamw", [&] { return opt_.step(b, m_->params(), m_->grads(), m_->table().size()); }));
    pending_.push_back(step_no);
    return {};
  }

  // Reads the buffered steps' losses (one synchronisation) and returns their objective values.
  status flush(std::vector<step_record>& out) {
    out.clear();
    if (pending_.empty()) return {};
    std::vector<double> v;
    KD_TRY(slots_.read(m_->backend(), v));
    const std::size_t R = tally_.layers.size(), L = slots_.loss_count(), C = slots_.ce_count() / static_cast<std::size_t>(o_.window);
    for (std::size_t w = 0; w < pending_.size(); ++w) {
      step_record rec;
      rec.step = pending_[w];
      double ce = 0, z = 0, lbv = 0, rzv = 0;
      for (std::size_t c = 0; c < C; ++c) {
        ce += v[L + 2 * (w * C + c)];
        z += v[L + 2 * (w * C + c) + 1];
      }
      for (std::size_t r = 0; r < R; ++r) {
        lbv += v[w * 2 * R + 2 * r];
        rzv += v[w * 2 * R + 2 * r + 1];
      }
      const double layers = std::max<double>(1.0, static_cast<double>(R));
      rec.values = {{"lm", ce}};
      if (obj_->has("z_loss")) rec.values.emplace_back("z_loss", z);
      if (obj_->has("load_balance")) rec.values.emplace_back("load_balance", lbv / layers);
      if (obj_->has("router_z")) rec.values.emplace_back("router_z", rzv / layers);
      out.push_back(std::move(rec));
    }
    pending_.clear();
    return {};
  }

  // Expert shares since the last call, per MoE layer (each sums to 1), then reset.
  std::vector<std::vector<double>> take_expert_shares() { return tally_.take_shares(); }
  [[nodiscard]] const std::vector<std::int64_t>& moe_layers() const { return tally_.layers; }
  typename sb::optimizer& optimizer() { return opt_; }

 private:
  Model* m_ = nullptr;
  const objective* obj_ = nullptr;
  step_options o_;
  cross_entropy<token_mean, P> ce_;
  load_balance_loss<P> lb_;
  router_z_loss<P> rz_;
  typename sb::slots slots_;
  typename sb::optimizer opt_;
  detail::head_buffers<B> hb_;
  typename B::template buffer<T> dxf_;
  typename B::template buffer<std::int32_t> labels_;
  std::vector<typename B::template buffer<T>> drouter_;
  detail::expert_tally tally_;  // also the list of MoE layers
  std::vector<std::int64_t> pending_;
};

// ---------------------------------------------------------------------------------------------------
// The dense student: distillation (with a teacher) or LM alone (scratch, teacher == nullptr)
// ---------------------------------------------------------------------------------------------------
template <class Teacher, class Student, class Policy = distill_policy<>>
class distill_step {
 public:
  using B = std::remove_cvref_t<decltype(std::declval<Student&>().backend())>;
  static_assert(std::is_same_v<B, std::remove_cvref_t<decltype(std::declval<Teacher&>().backend())>>,
                "kd: distill_step needs the teacher and the student on one model backend type.");
  using T = typename B::value_type;
  using P = precision_of<T>;
  using sb = step_backend<B>;
  using kd_loss = logit_kd<typename Policy::divergence, token_mean, precision_set<P, P>>;
  using feature_t = feature_loss<typename Policy::feature_normalization, token_mean, precision_set<P, P, P>>;
  using route_loss = logit_kd<forward_kl, token_mean, precision_set<P, P>>;

  // teacher == nullptr: scratch (the objective may only name lm and z_loss). With a teacher: map is the
  // teacher -> student vocabulary map, and the objective may name kd, feature and route. The teacher is
  // frozen from here on: init() copies the mapped rows of its head (call it after loading its weights).
  status init(Teacher* teacher, Student& student, const vocab_map* map, const objective& obj, const distill_options& o,
              const adamw_options& opt) {
    KD_TRY(obj.validate());
    t_ = teacher;
    s_ = &student;
    obj_ = &obj;
    o_ = o;
    for (const auto& name : obj.names())
      if (name != "lm" && name != "z_loss" && name != "kd" && name != "feature" && name != "route")
        return {errc::invalid_argument, "distill_step: unknown objective component '" + name + "'"};
    if (t_ == nullptr && (obj.has("kd") || obj.has("feature") || obj.has("route")))
      return {errc::invalid_argument, "distill_step: kd, feature and route need a teacher"};
    if (t_ != nullptr && obj.has("kd") && map == nullptr)
      return {errc::invalid_argument, "distill_step: kd needs the teacher -> student vocab_map"};
    const auto& sa = student.arch();
    B& b = student.backend();
    ce_.options.vocab = o.vocab;
    ce_.options.ignore_index = o.ignore_index;
    ce_.options.component = "lm";
    kd_.options.map = map;
    kd_.options.component = "kd";
    feat_.options.component = "feature";
    route_.options.component = "route";
    if (t_ != nullptr && map != nullptr) {
      // The compact teacher head (vocab_map::compact_teacher): rows of the mapped teacher ids in the order
      // of their student ids, the teacher being frozen. With a one-to-one map the compact map is contiguous
      // (slot j reads compact column j) and the KD kernel reads each teacher row slice in one bulk copy.
      if (map->teacher_vocab() != t_->arch().vocab || map->student_vocab() != sa.vocab)
        return {errc::shape_mismatch, "distill_step: the vocab_map is " + std::to_string(map->teacher_vocab()) + " -> " +
                                          std::to_string(map->student_vocab()) + " but the heads have " +
                                          std::to_string(t_->arch().vocab) + " and " + std::to_string(sa.vocab) + " rows"};
      // Rows padded to a multiple of 64 (zero weights, never read through the map): the logits' row
      // stride then stays a multiple of 16 bytes, which cuBLAS's tensor-core kernels need (42,257 is odd).
      std::vector<std::int32_t> tids;
      KD_TRY(map->compact_teacher(64, compact_map_, tids));
      const auto Dt = static_cast<std::size_t>(t_->arch().hidden), K = tids.size();
      const auto padded = static_cast<std::size_t>(compact_map_.teacher_vocab());
      kd_.options.map = &compact_map_;
      KD_TRY((detail::upload_vector<B, std::int32_t>(b, std::span<const std::int32_t>(tids), thead_rows_, "mapped teacher ids")));
      thead_ = typename B::template buffer<T>{};  // a fresh, zero-filled allocation: the padding rows are 0
      KD_TRY((detail::ensure<B, T>(b, thead_, padded * Dt, "compact teacher head")));
      KD_TRY(b.gather_rows(t_->params() + t_->table().head(), thead_rows_.data(), thead_.data(), static_cast<std::int64_t>(K),
                           static_cast<std::int64_t>(Dt)));
    }
    if (t_ != nullptr) {
      const auto& ta = t_->arch();
      fs_layer_ = o.feature_student_layer;
      ft_layer_ = o.feature_teacher_layer;
      if (fs_layer_ < -2 || fs_layer_ >= sa.num_layers() || ft_layer_ < -2 || ft_layer_ >= ta.num_layers())
        return {errc::out_of_range, "distill_step: feature layer outside the models"};
      rs_layer_ = o.route_student_layer == -3 ? sa.num_layers() / 2 - 1 : o.route_student_layer;
      rt_layer_ = o.route_teacher_layer == -3 ? detail::middle_moe_layer(ta) : o.route_teacher_layer;
      route_on_ = obj.has("route");
      if (route_on_ && (rt_layer_ < 0 || rt_layer_ >= ta.num_layers() || !ta.layers[static_cast<std::size_t>(rt_layer_)].moe))
        return {errc::invalid_argument, "distill_step: the routing term needs an MoE teacher layer"};
      if (route_on_ && (rs_layer_ < 0 || rs_layer_ >= sa.num_layers()))
        return {errc::out_of_range, "distill_step: routing-head layer outside the student"};
      // Side arena: projection [Dt x Ds] + bias [Dt] + routing head [E x Ds].
      const auto Ds = static_cast<std::size_t>(sa.hidden), Dt = static_cast<std::size_t>(ta.hidden);
      const auto E = static_cast<std::size_t>(route_on_ ? ta.experts : 0);
      const std::size_t n = Dt * Ds + Dt + E * Ds;
      side_.segments = {{"feature_projection.weight", 0, Dt * Ds, true}, {"feature_projection.bias", Dt * Ds, Dt, false}};
      if (E > 0) side_.segments.push_back({"route_head.weight", Dt * Ds + Dt, E * Ds, true});
      KD_TRY((detail::ensure<B, T>(b, side_.params, n, "side parameters")));
      KD_TRY((detail::ensure<B, T>(b, side_.grads, n, "side gradients")));
      std::vector<T> init(n, store_as<T>(0.0));
      rng r(stream_key(o.seed, 0x51de));
      const double sd = 1.0 / std::sqrt(static_cast<double>(Ds));
      for (std::size_t i = 0; i < Dt * Ds; ++i) init[i] = store_as<T>(sd * r.normal());
      for (std::size_t i = 0; i < E * Ds; ++i) init[Dt * Ds + Dt + i] = store_as<T>(0.02 * r.normal());
      KD_TRY(b.upload(init.data(), n, side_.params.data()));
      KD_TRY(side_opt_.init(b, side_.segments, side_.params.data(), n, opt));
    }
    return opt_.init(b, model_segments(student.table()), student.params(), student.table().size(), opt);
  }

  // Enqueues one optimizer step on a text_batch (host ids, labels and aligned positions).
  status step(const text_batch& tb, std::int64_t step_no) { return step(std::span<const text_batch>(&tb, 1), step_no); }

  // One optimizer step over micro-batches of one shape (gradient accumulation). Every loss divides by the
  // token count of the whole step (global_tokens), so any split of the same rows gives the same losses
  // and the same update (to float rounding).
  status step(std::span<const text_batch> micro, std::int64_t step_no) {
    B& b = s_->backend();
    if (micro.empty()) return {errc::invalid_argument, "distill_step: no micro-batch"};
    const text_batch& first = micro.front();
    const auto n = static_cast<index_t>(first.batch * first.seq);
    const std::size_t M = micro.size(), C = detail::chunks_of(n, o_.chunk_rows);
    const std::size_t per_loss = C + 2;  // per micro-batch: kd per chunk, feature, route
    for (const auto& tb : micro) {
      if (tb.batch != first.batch || tb.seq != first.seq || tb.teacher_seq != first.teacher_seq)
        return {errc::shape_mismatch, "distill_step: micro-batches of one step must share one shape"};
      if (static_cast<index_t>(tb.student_labels.size()) != n || static_cast<index_t>(tb.student_ids.size()) != n ||
          tb.aligned_student.size() != tb.aligned_teacher.size())
        return {errc::shape_mismatch, "distill_step: the batch's arrays disagree with its shape"};
    }
    if (pending_.empty()) {
      micro_ = M;
      chunks_ = C;
      KD_TRY(slots_.resize(b, static_cast<std::size_t>(o_.window) * M * per_loss, static_cast<std::size_t>(o_.window) * M * C));
    }
    if (M != micro_ || C != chunks_)
      return {errc::invalid_argument, "distill_step: the steps buffered between two flush() calls must share one shape"};
    if (static_cast<std::int64_t>(pending_.size()) >= o_.window)
      return {errc::invalid_argument, "distill_step: " + std::to_string(o_.window) + " steps buffered; flush() first"};
    const std::size_t w = pending_.size();
    // The step's token counts: the divisors of every micro-batch's losses.
    index_t lm_tokens = 0, aligned = 0;
    for (const auto& tb : micro) {
      lm_tokens += count_tokens(tb.student_labels, o_.ignore_index);
      std::vector<char> seen(static_cast<std::size_t>(n), 0);
      for (auto r : tb.aligned_student) {
        if (r < 0 || r >= n) return {errc::out_of_range, "distill_step: aligned student row " + std::to_string(r) + " outside the batch"};
        aligned += seen[static_cast<std::size_t>(r)] ? 0 : 1;
        seen[static_cast<std::size_t>(r)] = 1;
      }
    }
    if (o_.comm != nullptr) {  // data parallel: every rank divides by the whole group's counts
      std::int64_t counts[2] = {lm_tokens, aligned};
      KD_TRY(o_.comm->all_reduce_host(counts, 2, reduce_op::sum));
      lm_tokens = static_cast<index_t>(counts[0]);
      aligned = static_cast<index_t>(counts[1]);
    }
    if (t_ != nullptr && side_.size() > 0) KD_TRY(b.fill_zero(side_.grads.data(), side_.size()));
    if (o_.comm != nullptr) buckets_.start(s_->table(), o_.bucket_elements);
    for (std::size_t m = 0; m < M; ++m)
      KD_TRY(micro_step(micro[m], step_no, (w * M + m), std::max<index_t>(1, lm_tokens), std::max<index_t>(1, aligned),
                        m == 0 ? model::grad_mode::overwrite : model::grad_mode::accumulate, m + 1 == M));
    if (o_.comm != nullptr)  // the gradients of the global batch on every rank (the same update everywhere)
      KD_TRY(detail::timed(b, "all_reduce", [&]() -> status {
        KD_TRY(buckets_.finish(*o_.comm, s_->grads(), s_->table()));
        if (t_ != nullptr && side_.size() > 0) KD_TRY(o_.comm->all_reduce(side_.grads.data(), side_.size(), reduce_op::sum));
        return o_.comm->all_reduce_end();
      }));
    KD_TRY(detail::timed(b, "adamw", [&] { return opt_.step(b, s_->params(), s_->grads(), s_->table().size()); }));
    if (t_ != nullptr && side_.size() > 0)
      KD_TRY(detail::timed(b, "adamw (side)", [&] { return side_opt_.step(b, side_.params.data(), side_.grads.data(), side_.size()); }));
    pending_.push_back(step_no);
    return {};
  }

  // Reads the buffered steps' losses (one synchronisation).
  status flush(std::vector<step_record>& out) {
    out.clear();
    if (pending_.empty()) return {};
    std::vector<double> v;
    if (o_.comm != nullptr) KD_TRY(o_.comm->sync());  // a peer that died mid-collective: an error, not a hang
    KD_TRY(slots_.read(s_->backend(), v));
    // Every micro-batch's value is already divided by the step's token count: they add up, over the
    // micro-batches and over the ranks of a data-parallel group.
    if (o_.comm != nullptr) KD_TRY(o_.comm->all_reduce_host(v.data(), v.size(), reduce_op::sum));
    const std::size_t C = chunks_, M = micro_, per_loss = C + 2, L = slots_.loss_count();
    for (std::size_t w = 0; w < pending_.size(); ++w) {
      step_record rec;
      rec.step = pending_[w];
      double ce = 0, z = 0, kd = 0, feat = 0, route = 0;
      for (std::size_t m = 0; m < M; ++m) {
        const std::size_t g = w * M + m;
        for (std::size_t c = 0; c < C; ++c) {
          ce += v[L + 2 * (g * C + c)];
          z += v[L + 2 * (g * C + c) + 1];
          kd += v[g * per_loss + c];
        }
        feat += v[g * per_loss + C];
        route += v[g * per_loss + C + 1];
      }
      rec.values = {{"lm", ce}};
      if (obj_->has("z_loss")) rec.values.emplace_back("z_loss", z);
      if (obj_->has("kd")) rec.values.emplace_back("kd", kd);
      if (obj_->has("feature")) rec.values.emplace_back("feature", feat);
      if (obj_->has("route")) rec.values.emplace_back("route", route);
      out.push_back(std::move(rec));
    }
    pending_.clear();
    return {};
  }

  typename sb::optimizer& optimizer() { return opt_; }
  typename sb::optimizer& side_optimizer() { return side_opt_; }
  detail::side_arena<B>& side() { return side_; }

 private:
  // One micro-batch: forward passes, losses into slot group `g`, backward into the gradient arenas.
  status micro_step(const text_batch& tb, std::int64_t step_no, std::size_t g, index_t lm_tokens, index_t aligned,
                    model::grad_mode mode, bool last) {
    B& b = s_->backend();
    const auto& sa = s_->arch();
    const auto n = static_cast<index_t>(tb.batch * tb.seq);
    const auto Ds = static_cast<index_t>(sa.hidden), Vs = static_cast<index_t>(sa.vocab);
    const std::size_t C = chunks_, per_loss = C + 2;

    // Host-side index arrays: each student row's teacher row, and the KD mask (0 on aligned rows).
    const bool distill = t_ != nullptr;
    std::vector<std::int32_t> gather(static_cast<std::size_t>(n), 0), mask(static_cast<std::size_t>(n), o_.ignore_index);
    for (std::size_t k = 0; k < tb.aligned_student.size(); ++k) {
      gather[static_cast<std::size_t>(tb.aligned_student[k])] = tb.aligned_teacher[k];
      mask[static_cast<std::size_t>(tb.aligned_student[k])] = 0;
    }
    KD_TRY((detail::upload_vector<B, std::int32_t>(b, tb.student_labels, labels_, "labels")));
    const auto labels = std::span<const std::int32_t>(labels_.data(), static_cast<std::size_t>(n));

    // 1. The frozen teacher: forward only, what the losses need gathered to the student's rows.
    const T* tfinal = nullptr;
    if (distill) {
      const auto& ta = t_->arch();
      model::forward_options fo;
      fo.training = false;
      fo.logits = false;
      KD_TRY(t_->forward(tb.teacher_ids, tb.batch, tb.teacher_seq, fo));
      KD_TRY((detail::upload_vector<B, std::int32_t>(b, gather, gather_, "aligned rows")));
      KD_TRY((detail::upload_vector<B, std::int32_t>(b, mask, mask_, "KD mask")));
      const auto Dt = static_cast<index_t>(ta.hidden);
      KD_TRY((detail::ensure<B, T>(b, tfinal_, static_cast<std::size_t>(n) * Dt, "teacher hidden (aligned)")));
      KD_TRY(b.gather_rows(t_->final_hidden(), gather_.data(), tfinal_.data(), n, Dt));
      tfinal = tfinal_.data();
      if (ft_layer_ != -2) {
        KD_TRY((detail::ensure<B, T>(b, tfeat_, static_cast<std::size_t>(n) * Dt, "teacher feature (aligned)")));
        KD_TRY(b.gather_rows(t_->hidden(ft_layer_), gather_.data(), tfeat_.data(), n, Dt));
      }
      if (route_on_) {
        const auto E = static_cast<index_t>(ta.experts);
        KD_TRY((detail::ensure<B, T>(b, trouter_, static_cast<std::size_t>(n) * E, "teacher router logits (aligned)")));
        KD_TRY(b.gather_rows(t_->router_logits(rt_layer_), gather_.data(), trouter_.data(), n, E));
      }
    }

    // 2. The student: forward, then the head (LM + KD), feature and routing losses into gradients.
    model::forward_options fo;
    fo.logits = false;
    KD_TRY(s_->forward(tb.student_ids, tb.batch, tb.seq, fo));
    KD_TRY((detail::ensure<B, T>(b, dxf_, static_cast<std::size_t>(n) * Ds, "final hidden gradient")));
    KD_TRY((detail::ensure<B, T>(b, hb_.dw, static_cast<std::size_t>(Vs) * Ds, "head gradient")));
    auto ce = ce_;
    ce.options.global_tokens = lm_tokens;
    ce.options.grad_scale = obj_->weight("lm", step_no);
    ce.options.z_loss_weight = obj_->weight("z_loss", step_no);
    auto kd = kd_;
    kd.options.temperature = obj_->temperature_at(step_no);
    kd.options.grad_scale = obj_->weight("kd", step_no);
    kd.options.global_tokens = aligned;
    const bool with_kd = distill && obj_->has("kd");
    const auto mask_dev = distill ? std::span<const std::int32_t>(mask_.data(), static_cast<std::size_t>(n))
                                  : std::span<const std::int32_t>();
    const T* head = s_->params() + s_->table().head();
    if (with_kd) {
      const auto& ta = t_->arch();
      KD_TRY((detail::head_pass<B, decltype(ce), kd_loss>(
          b, slots_, hb_, ce, &kd, s_->final_hidden(), head, n, Vs, Ds, o_.chunk_rows, labels, g * C, dxf_.data(),
          hb_.dw.data(), tfinal, thead_.data(), compact_map_.teacher_vocab(), static_cast<index_t>(ta.hidden), mask_dev,
          g * per_loss)));
    } else {
      KD_TRY((detail::head_pass<B, decltype(ce), kd_loss>(b, slots_, hb_, ce, nullptr, s_->final_hidden(), head, n, Vs,
                                                          Ds, o_.chunk_rows, labels, g * C, dxf_.data(), hb_.dw.data())));
    }
    typename Student::grads_in gin;
    gin.d_final_hidden = dxf_.data();
    const auto lb = sb::losses(b);
    // The feature and routing losses accumulate into the side arena's gradients (zeroed once per step by
    // step()) and the feature loss's student gradient adds to the head's.
    if (distill && obj_->has("feature")) {
      const auto Dt = static_cast<index_t>(t_->arch().hidden);
      auto f = feat_;
      f.options.grad_scale = obj_->weight("feature", step_no);
      f.options.global_tokens = aligned;
      f.options.accumulate_grad = true;  // the side arena's gradients gather over micro-batches
      const T* sx = fs_layer_ == -2 ? s_->final_hidden() : s_->hidden(fs_layer_);
      T* dsx = dxf_.data();  // the final hidden: onto the head's gradient of the same state
      if (fs_layer_ != -2) {
        KD_TRY((detail::ensure<B, T>(b, dfeat_, static_cast<std::size_t>(n) * Ds, "feature gradient")));
        KD_TRY(b.fill_zero(dfeat_.data(), dfeat_.size()));
        dsx = dfeat_.data();
        gin.d_hidden.emplace_back(fs_layer_, dfeat_.data());
      }
      T* pw = side_.grads.data();
      decltype(auto) fo_ = slots_.loss(g * per_loss + C);
      KD_TRY(detail::timed(b, "loss feature", [&] {
        return f(lb, matrix_view<const T>(sx, n, Ds), matrix_view<const T>(side_.params.data(), Dt, Ds),
                 matrix_view<const T>(side_.params.data() + static_cast<std::size_t>(Dt) * Ds, 1, Dt),
                 matrix_view<const T>(ft_layer_ == -2 ? tfinal : tfeat_.data(), n, Dt), mask_dev, fo_,
                 matrix_view<T>(dsx, n, Ds), matrix_view<T>(pw, Dt, Ds),
                 matrix_view<T>(pw + static_cast<std::size_t>(Dt) * Ds, 1, Dt));
      }));
    }
    if (route_on_) {
      const auto& ta = t_->arch();
      const auto E = static_cast<index_t>(ta.experts);
      const std::size_t off = static_cast<std::size_t>(ta.hidden) * Ds + static_cast<std::size_t>(ta.hidden);
      KD_TRY((detail::ensure<B, T>(b, slog_, static_cast<std::size_t>(n) * E, "routing-head logits")));
      KD_TRY((detail::ensure<B, T>(b, dslog_, static_cast<std::size_t>(n) * E, "routing-head gradient")));
      KD_TRY((detail::ensure<B, T>(b, droute_, static_cast<std::size_t>(n) * Ds, "routing hidden gradient")));
      const T* hs = s_->hidden(rs_layer_);
      KD_TRY(b.linear(hs, side_.params.data() + off, slog_.data(), n, E, Ds, false));
      auto r = route_;
      r.options.grad_scale = obj_->weight("route", step_no);
      r.options.global_tokens = aligned;
      decltype(auto) ro = slots_.loss(g * per_loss + C + 1);
      KD_TRY(detail::timed(b, "loss route", [&] {
        return r(lb, matrix_view<const T>(trouter_.data(), n, E), matrix_view<const T>(slog_.data(), n, E), mask_dev, ro,
                 matrix_view<T>(dslog_.data(), n, E));
      }));
      KD_TRY(b.linear_dx(dslog_.data(), side_.params.data() + off, droute_.data(), n, E, Ds, false));
      KD_TRY(b.linear_dw(dslog_.data(), hs, side_.grads.data() + off, n, E, Ds, true));
      gin.d_hidden.emplace_back(rs_layer_, droute_.data());
    }

    // 3. Backward through the student (the first micro-batch overwrites the gradient arena, the others
    // add to it), then the head's gradient added. Data parallel: the last micro-batch's backward starts
    // the gradient buckets of the layers it has finished.
    if (o_.comm != nullptr && last)
      gin.on_layer_done = [this](std::int64_t l) { return buckets_.layer_done(*o_.comm, s_->grads(), s_->table(), l); };
    KD_TRY(s_->backward(gin, mode));
    return b.add(s_->grads() + s_->table().head(), hb_.dw.data(), hb_.dw.size());
  }


  Teacher* t_ = nullptr;
  Student* s_ = nullptr;
  const objective* obj_ = nullptr;
  distill_options o_;
  std::int64_t fs_layer_ = -2, ft_layer_ = -2, rs_layer_ = -1, rt_layer_ = -1;
  bool route_on_ = false;
  cross_entropy<token_mean, P> ce_;
  kd_loss kd_;
  feature_t feat_;
  route_loss route_;
  vocab_map compact_map_;                      // the map onto the compact teacher head
  typename B::template buffer<T> thead_;       // compact teacher head [mapped ids x teacher hidden]
  typename B::template buffer<std::int32_t> thead_rows_;
  typename sb::slots slots_;
  typename sb::optimizer opt_, side_opt_;
  detail::side_arena<B> side_;
  detail::head_buffers<B> hb_;
  typename B::template buffer<T> dxf_, dfeat_, tfinal_, tfeat_, trouter_, slog_, dslog_, droute_;
  typename B::template buffer<std::int32_t> labels_, gather_, mask_;
  std::vector<std::int64_t> pending_;
  std::size_t chunks_ = 0, micro_ = 1;
  detail::grad_buckets buckets_;
};

// ---------------------------------------------------------------------------------------------------
// Evaluation: validation loss, perplexity and bits per byte over a whole token stream.
// ---------------------------------------------------------------------------------------------------
struct lm_eval_result {
  double loss = 0.0;        // nats per predicted token
  double ppl = 0.0;
  double bits_per_byte = 0.0;
  std::int64_t tokens = 0;  // predicted tokens
  std::int64_t bytes = 0;   // bytes of the predicted tokens
  std::vector<std::vector<double>> expert_shares;  // MoE models: per MoE layer, each expert's share
};

// Cuts `stream` into consecutive windows of seq + 1 tokens (the last a label only), batch windows a
// forward, up to max_windows (0: all). The model runs in inference mode in its own precision.
template <class Model>
status evaluate_lm(Model& m, token_stream stream, std::int64_t batch, std::int64_t seq, index_t vocab,
                   std::int64_t max_windows, index_t chunk_rows, lm_eval_result& out) {
  using B = std::remove_cvref_t<decltype(m.backend())>;
  using T = typename B::value_type;
  using P = precision_of<T>;
  B& b = m.backend();
  const auto& a = m.arch();
  if (batch <= 0 || seq <= 0) return {errc::invalid_argument, "evaluate_lm: batch and seq must be positive"};
  std::int64_t windows = stream.ids.size() > 1 ? static_cast<std::int64_t>((stream.ids.size() - 1) / static_cast<std::size_t>(seq)) : 0;
  if (max_windows > 0) windows = std::min(windows, max_windows);
  if (windows == 0) return {errc::empty_input, "evaluate_lm: the validation stream is shorter than one window"};
  cross_entropy<token_mean, P> ce;
  ce.options.vocab = vocab;
  ce.options.component = "eval";
  typename step_backend<B>::slots slots;
  detail::head_buffers<B> hb;
  typename B::template buffer<std::int32_t> labels_dev;
  detail::expert_tally tally(a);
  const std::int64_t calls = (windows + batch - 1) / batch;
  const std::size_t C = detail::chunks_of(static_cast<index_t>(batch * seq), chunk_rows);
  KD_TRY(slots.resize(b, 0, static_cast<std::size_t>(calls) * C));
  std::vector<std::int64_t> chunk_tokens(static_cast<std::size_t>(calls) * C, 0);
  std::int64_t tokens = 0, bytes = 0;
  model::forward_options fo;
  fo.training = false;
  fo.logits = false;
  for (std::int64_t c = 0; c < calls; ++c) {
    const std::int64_t w0 = c * batch, rows = std::min(batch, windows - w0);
    std::vector<std::int32_t> ids(static_cast<std::size_t>(rows * seq)), labels(ids.size());
    for (std::int64_t r = 0; r < rows; ++r) {
      const auto p = static_cast<std::size_t>((w0 + r) * seq);
      for (std::int64_t j = 0; j < seq; ++j) {
        ids[static_cast<std::size_t>(r * seq + j)] = static_cast<std::int32_t>(stream.ids[p + static_cast<std::size_t>(j)]);
        labels[static_cast<std::size_t>(r * seq + j)] = static_cast<std::int32_t>(stream.ids[p + static_cast<std::size_t>(j) + 1]);
      }
      bytes += static_cast<std::int64_t>(stream.end[p + static_cast<std::size_t>(seq)]) - static_cast<std::int64_t>(stream.end[p]);
    }
    KD_TRY(m.forward(ids, rows, seq, fo));
    tally.add(m);
    KD_TRY((detail::upload_vector<B, std::int32_t>(b, labels, labels_dev, "labels")));
    const auto n = static_cast<index_t>(rows * seq);
    using no_kd = logit_kd<forward_kl, token_mean, precision_set<P, P>>;
    KD_TRY((detail::head_pass<B, decltype(ce), no_kd>(b, slots, hb, ce, nullptr, m.final_hidden(),
                                                      m.params() + m.table().head(), n, static_cast<index_t>(a.vocab),
                                                      static_cast<index_t>(a.hidden), chunk_rows,
                                                      std::span<const std::int32_t>(labels_dev.data(), labels.size()),
                                                      static_cast<std::size_t>(c) * C, nullptr, nullptr)));
    const index_t chunk = std::min(chunk_rows, n);
    for (std::size_t k = 0; k < C; ++k) {
      const std::int64_t r0 = static_cast<std::int64_t>(k) * chunk;
      chunk_tokens[static_cast<std::size_t>(c) * C + k] = std::max<std::int64_t>(0, std::min<std::int64_t>(chunk, n - r0));
    }
    tokens += n;
  }
  std::vector<double> v;
  KD_TRY(slots.read(b, v));
  double nats = 0.0;
  for (std::size_t i = 0; i < chunk_tokens.size(); ++i) nats += v[2 * i] * static_cast<double>(chunk_tokens[i]);
  lm_eval_result r;
  r.tokens = tokens;
  r.bytes = bytes;
  r.loss = nats / static_cast<double>(tokens);
  r.ppl = std::exp(r.loss);
  r.bits_per_byte = nats / std::numbers::ln2 / static_cast<double>(std::max<std::int64_t>(bytes, 1));
  r.expert_shares = tally.take_shares();
  KD_TRY(check_finite_loss("validation loss", 0, r.loss));
  out = std::move(r);
  return {};
}

}  // namespace kd::train
