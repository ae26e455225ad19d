// examples/distill_cpu.cpp: end-to-end teacher -> student distillation on the CPU reference backend.
//
// The whole pipeline on kd's own parts, small enough to run in a minute or two:
//   1. A synthetic corpus from a fixed sparse Markov "grammar" over 300 teacher tokens (kd::rng). Its exact
//      transition table is kept, so the best achievable cross-entropy (the oracle) can be printed.
//   2. Two tokenizers: the teacher names all 300 tokens (padded to 320 embedding rows); the student
//      names the 180 most frequent ones, an <unk> and 19 strings the corpus never uses (200, padded to
//      256). kd::vocab_map::from_tokens aligns them by string; tokens the student cannot name become
//      <unk> in its labels.
//   3. The teacher: kd::model::transformer<cpu_ops<float>>, a Qwen3-MoE (tiny preset: 2 layers, hidden 32,
//      4 experts top-2), trained from scratch with cross_entropy + load_balance_loss + router_z_loss
//      (kd::objective, kd::adamw with warm-up + cosine), then frozen and audited for expert collapse.
//   4. The student: a dense Llama (hidden 16, 2 layers, tied head) trained on a small transfer set with
//      kd::objective: lm + kd (forward KL through the vocab_map, cosine temperature 4 -> 1) + feature
//      (rms_mse of the final hidden states through a learned 16 -> 32 projection) + z_loss, logged through
//      kd::metrics_logger, early-stopped on a contiguous held-out split once the curriculum stops ramping.
//   5. The same student, same init, same batches, trained on the LM loss alone, for comparison.
// The student's transfer set (6,000 tokens by default) is much smaller than the teacher's 56,000: the
// regime where soft targets pay off. With --transfer-tokens 56000 the LM-only student catches up.
// Exit status: 0 on success; 1 when learning or distillation did not happen (the teacher's or the
// student's LM loss did not fall between its first and last windows, the held-out KL to the teacher at
// T = 1 did not fall, or the distilled student's best held-out CE is not below the LM-only student's);
// 2 on a kd::error (any failed kd::status); 3 on another exception; 64 on a bad flag.
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <iostream>
#include <numbers>
#include <numeric>
#include <span>
#include <string>
#include <vector>

#include <Eigen/Core>

#include <kd/core/rng.hpp>
#include <kd/kd.hpp>
#include <kd/model/ops_cpu.hpp>
#include <kd/model/transformer.hpp>
#include <kd/train/adamw.hpp>

namespace {

using ids_t = std::vector<std::int32_t>;
using model_t = kd::model::transformer<kd::model::cpu_ops<float>>;

kd::matrix_view<const float> cview(const float* p, std::int64_t rows, std::int64_t cols) { return {p, rows, cols}; }
kd::matrix_view<float> view(std::vector<float>& v, std::int64_t rows, std::int64_t cols) {
  return {v.data(), rows, cols};
}

// Log cadence is a type: one line per 50 optimizer steps for the student, 100 for the teacher.
constexpr std::int64_t kLogEvery = 50;
using student_log = kd::metrics_logger<kd::log_every<kLogEvery>>;

constexpr int kTeacherReal = 300, kTeacherRows = 320, kStudentReal = 200, kStudentRows = 256;
constexpr int kShared = 180, kUnk = 0;
constexpr int kSeq = 16, kSeqs = 16, kBatch = kSeq * kSeqs;  // 256 tokens per optimizer step

std::int32_t below(kd::rng& r, std::int64_t n) { return static_cast<std::int32_t>(r.below(static_cast<std::uint64_t>(n))); }

// The tiny presets with the example's vocabularies; the student is narrower than the teacher.
kd::model::moe_config teacher_config() {
  kd::model::moe_config c = kd::model::tiny_teacher();
  c.vocab_size = kTeacherRows;
  return c;
}
kd::model::dense_config student_config() {
  kd::model::dense_config c = kd::model::tiny_student();
  c.vocab_size = kStudentRows;
  c.hidden_size = 16;
  c.intermediate_size = 48;
  c.num_attention_heads = 2;
  c.num_key_value_heads = 1;
  c.head_dim = 8;
  return c;
}

// ---- Corpus, grammar and the two vocabularies ----------------------------------------------------
struct corpus {
  Eigen::MatrixXd grammar;          // exact P(next | current) over teacher ids: the oracle
  ids_t teacher_stream;             // the corpus in teacher ids
  ids_t student_stream;             // the same corpus in student ids (<unk> where the student has no string)
  std::vector<std::string> teacher_tokens, student_tokens;
  kd::vocab_map map;
  std::int64_t teacher_train_end = 0;  // teacher fits on positions [0, teacher_train_end)
  std::int64_t transfer_end = 0;       // student sees only [0, transfer_end): the transfer set
  std::int64_t heldout_begin = 0;      // contiguous held-out tail [heldout_begin, size - 1)
};

// Each token continues with one of its 3 private successors (55%) or jumps to a token of one of its
// class's 3 successor classes, Zipf-distributed inside the class (45%): sparse, with low-rank structure
// a narrow student can partly learn and a wider MoE teacher learns better.
corpus make_corpus(std::uint64_t seed, std::int64_t length, std::int64_t transfer_tokens) {
  kd::rng r(seed);
  constexpr int kClasses = 15, kPerClass = kTeacherReal / kClasses;
  corpus c;
  c.grammar = Eigen::MatrixXd::Zero(kTeacherReal, kTeacherReal);
  std::vector<int> order(kTeacherReal);
  std::iota(order.begin(), order.end(), 0);
  for (int i = kTeacherReal - 1; i > 0; --i) std::swap(order[i], order[below(r, i + 1)]);
  auto member = [&](int cls, int rank) { return order[cls * kPerClass + rank]; };
  std::vector<int> class_of(kTeacherReal);
  for (int k = 0; k < kTeacherReal; ++k) class_of[order[k]] = k / kPerClass;
  Eigen::MatrixXd class_next = Eigen::MatrixXd::Zero(kClasses, kClasses);
  for (int a = 0; a < kClasses; ++a) {
    for (int j = 0; j < 3; ++j) class_next(a, below(r, kClasses)) += std::exp(r.normal());
    class_next.row(a) /= class_next.row(a).sum();
  }
  Eigen::VectorXd zipf(kPerClass);
  for (int k = 0; k < kPerClass; ++k) zipf[k] = 1.0 / std::pow(k + 1.0, 1.1);
  zipf /= zipf.sum();
  for (int t = 0; t < kTeacherReal; ++t) {
    Eigen::VectorXd priv = Eigen::VectorXd::Zero(kTeacherReal);
    for (int j = 0; j < 3; ++j) priv[below(r, kTeacherReal)] += std::exp(r.normal());
    priv /= priv.sum();
    c.grammar.row(t) = 0.55 * priv.transpose();
    for (int b = 0; b < kClasses; ++b)
      for (int k = 0; k < kPerClass; ++k) c.grammar(t, member(b, k)) += 0.45 * class_next(class_of[t], b) * zipf[k];
  }
  c.teacher_stream.resize(static_cast<std::size_t>(length));
  std::int32_t cur = below(r, kTeacherReal);
  for (auto& tok : c.teacher_stream) {
    tok = cur;
    double u = r.uniform(), acc = 0.0;
    std::int32_t next = kTeacherReal - 1;
    for (int j = 0; j < kTeacherReal; ++j)
      if ((acc += c.grammar(cur, j)) > u) { next = j; break; }
    cur = next;
  }
  c.heldout_begin = length - length / 8;
  c.teacher_train_end = c.heldout_begin;
  c.transfer_end = std::min<std::int64_t>(transfer_tokens, c.teacher_train_end);

  // Tokenizers. The student shares the most frequent strings (as real tokenizers do) in its own order.
  auto token = [](char prefix, int i) {  // snprintf, not "w" + to_string: GCC 12 -Wrestrict false positive
    char buf[16];
    std::snprintf(buf, sizeof buf, "%c%d", prefix, i);
    return std::string(buf);
  };
  for (int i = 0; i < kTeacherReal; ++i) c.teacher_tokens.push_back(token('w', i));
  std::vector<std::int64_t> freq(kTeacherReal, 0);
  for (std::int64_t p = 0; p < c.teacher_train_end; ++p) ++freq[static_cast<std::size_t>(c.teacher_stream[p])];
  std::vector<int> by_freq(kTeacherReal);
  std::iota(by_freq.begin(), by_freq.end(), 0);
  std::stable_sort(by_freq.begin(), by_freq.end(), [&](int a, int b) { return freq[a] > freq[b]; });
  std::vector<std::string> rest;
  for (int k = 0; k < kShared; ++k) rest.push_back(c.teacher_tokens[by_freq[k]]);
  for (int k = 0; k < kStudentReal - 1 - kShared; ++k) rest.push_back(token('x', k));  // never in corpus
  for (std::size_t i = rest.size() - 1; i > 0; --i) std::swap(rest[i], rest[below(r, static_cast<std::int64_t>(i) + 1)]);
  c.student_tokens.push_back("<unk>");
  c.student_tokens.insert(c.student_tokens.end(), rest.begin(), rest.end());
  kd::check(kd::vocab_map::from_tokens(c.teacher_tokens, c.student_tokens, kTeacherRows, kStudentRows, c.map));

  ids_t to_student(kTeacherReal, kUnk);
  const auto tids = c.map.teacher_ids(), sids = c.map.student_ids();  // pairs sorted by teacher id
  for (std::size_t e = 0; e < tids.size(); ++e) to_student[static_cast<std::size_t>(tids[e])] = sids[e];
  c.student_stream.reserve(c.teacher_stream.size());
  for (auto t : c.teacher_stream) c.student_stream.push_back(to_student[static_cast<std::size_t>(t)]);
  return c;
}

// A batch: kSeqs sequences of kSeq positions; inputs at p, labels at p + 1, in both vocabularies. With
// r == nullptr the sequences tile [begin, end) in order (held-out), else their starts are random.
struct batch {
  ids_t teacher_in, student_in;         // model inputs
  ids_t teacher_label, student_label;               // loss labels
  std::int64_t seqs = 0;
};
batch make_batch(const corpus& c, std::int64_t begin, std::int64_t end, kd::rng* r, std::int64_t seqs) {
  batch b;
  b.seqs = seqs;
  for (std::int64_t s = 0; s < seqs; ++s) {
    const std::int64_t start = r != nullptr ? begin + below(*r, end - kSeq - begin) : begin + s * kSeq;
    for (std::int64_t i = 0; i < kSeq; ++i) {
      const auto p = static_cast<std::size_t>(start + i);
      b.teacher_in.push_back(c.teacher_stream[p]);
      b.teacher_label.push_back(c.teacher_stream[p + 1]);
      b.student_in.push_back(c.student_stream[p]);
      b.student_label.push_back(c.student_stream[p + 1]);
    }
  }
  return b;
}

std::span<float> params(model_t& m) { return {m.params(), m.table().size()}; }
std::span<const float> grads(model_t& m) { return {m.grads(), m.table().size()}; }

// ---- Losses (policies fixed at compile time) and evaluation --------------------------------------
using lm_loss = kd::cross_entropy<kd::token_mean, kd::fp32>;
using kd_loss = kd::logit_kd<kd::forward_kl, kd::token_mean, kd::precision_set<kd::fp32, kd::fp32>>;
using hint_loss = kd::feature_loss<kd::rms_mse, kd::token_mean, kd::precision_set<kd::fp32, kd::fp32, kd::fp32>>;

struct heldout {
  batch data;
  std::vector<float> teacher_logits;  // the teacher is frozen: its held-out outputs are computed once
};

struct eval_result { double ce = 0.0, kd_t1 = 0.0; };  // student CE (nats/token), forward KL to teacher at T = 1

eval_result evaluate(model_t& s, const heldout& h, const corpus& c) {
  kd::model::forward_options fo;
  fo.training = false;
  kd::check(s.forward(h.data.student_in, h.data.seqs, kSeq, fo));
  const auto n = static_cast<std::int64_t>(h.data.student_label.size());
  lm_loss ce;
  ce.options.vocab = kStudentReal;
  kd::cross_entropy_result cr;
  kd::check(ce(kd::cpu, cview(s.logits(), n, kStudentRows), h.data.student_label, cr));
  kd_loss kl;
  kl.options.map = &c.map;
  kd::loss_result kr;
  kd::check(kl(kd::cpu, cview(h.teacher_logits.data(), n, kTeacherRows), cview(s.logits(), n, kStudentRows),
               h.data.student_label, kr));
  return {cr.ce, kr.loss};
}

// CE of a teacher-vocabulary distribution scored in the student's vocabulary: mass of tokens the
// student can name goes to their ids (vocab_map::project_probabilities), the rest is <unk>'s.
template <class RowFn>
double projected_ce(const corpus& c, const batch& b, RowFn teacher_probs_of) {
  std::vector<double> tp(kTeacherRows, 0.0), sp(kStudentRows, 0.0);
  double total = 0.0;
  for (std::size_t i = 0; i < b.teacher_in.size(); ++i) {
    teacher_probs_of(i, tp);
    const double mass = c.map.project_probabilities<double>(tp, sp, false);
    const auto y = b.student_label[i];
    total -= std::log(std::max(y == kUnk ? 1.0 - mass : sp[static_cast<std::size_t>(y)], 1e-300));
  }
  return total / static_cast<double>(b.teacher_in.size());
}

double window_mean(const std::vector<kd::objective_evaluation>& h, std::size_t begin, std::size_t end,
                   const std::string& name) {
  double sum = 0.0;
  for (std::size_t i = begin; i < end; ++i) sum += name == "total" ? h[i].total : h[i].find(name)->value;
  return sum / static_cast<double>(end - begin);
}

// Expert choices of an MoE layer as the int32 matrix the router losses read.
ids_t expert_ids(const model_t& m, std::int64_t layer) {
  const std::int64_t n = m.tokens() * m.arch().top_k;
  return ids_t(m.expert_ids(layer), m.expert_ids(layer) + n);
}

// AdamW with linear warm-up over the first 5% of `steps`, then cosine to 10% of the peak.
kd::adamw_options adamw_for(double peak, std::int64_t steps) {
  kd::adamw_options o;
  o.weight_decay = 0.01;
  o.max_grad_norm = 1.0;
  o.schedule = {.peak = peak, .floor = 0.1 * peak, .warmup_steps = std::max<std::int64_t>(1, steps / 20),
                .total_steps = steps};
  return o;
}

// ---- 1. The teacher: trained from scratch, LM + load balance + router z-loss -------------------------
struct teacher_summary { double first_lm = 0.0, last_lm = 0.0; };

teacher_summary train_teacher(model_t& t, const corpus& c, std::int64_t steps, std::uint64_t seed) {
  kd::objective obj;  // router losses at coefficient 1: their weights live in the objective
  obj.add("load_balance", kd::fixed(1e-2)).add("router_z", kd::fixed(1e-3));
  kd::check(obj.validate());
  kd::adamw<float> opt;
  kd::check(opt.init(kd::model_segments(t.table()), params(t), adamw_for(1e-2, steps)));
  kd::rng sampler(seed ^ 0x7eac4e7ULL);
  kd::metrics_logger<kd::log_every<100>> log(&std::cout);
  lm_loss ce;
  ce.options.vocab = kTeacherReal;  // rows 300..319 are padding: out of the softmax, gradient 0
  kd::load_balance_loss<kd::fp32> lb;
  kd::router_z_loss<kd::fp32> rz;
  lb.options.coefficient = rz.options.coefficient = 1.0;
  rz.options.accumulate_grad = true;  // adds into the load-balance gradient of the same logits
  const std::int64_t E = t.arch().experts, k = t.arch().top_k;
  std::vector<float> dlogits(kBatch * kTeacherRows);
  std::vector<std::vector<float>> drouter(static_cast<std::size_t>(t.arch().num_layers()),
                                          std::vector<float>(static_cast<std::size_t>(kBatch * E)));
  std::vector<kd::objective_evaluation> history;
  for (std::int64_t step = 1; step <= steps; ++step) {
    const batch b = make_batch(c, 0, c.teacher_train_end, &sampler, kSeqs);
    kd::check(t.forward(b.teacher_in, kSeqs, kSeq));
    kd::cross_entropy_result cr;
    ce.options.grad_scale = obj.weight("lm", step);
    kd::check(ce(kd::cpu, cview(t.logits(), kBatch, kTeacherRows), b.teacher_label, cr,
                 view(dlogits, kBatch, kTeacherRows)));
    model_t::grads_in g;
    g.d_logits = dlogits.data();
    double lb_sum = 0.0, rz_sum = 0.0;
    for (std::int64_t l = 0; l < t.arch().num_layers(); ++l) {
      if (!t.arch().layers[static_cast<std::size_t>(l)].moe) continue;
      const ids_t ids = expert_ids(t, l);
      auto& d = drouter[static_cast<std::size_t>(l)];
      const auto rl = cview(t.router_logits(l), kBatch, E);
      kd::loss_result lr, zr;
      lb.options.grad_scale = obj.weight("load_balance", step);
      rz.options.grad_scale = obj.weight("router_z", step);
      kd::check(lb(kd::cpu, rl, kd::matrix_view<const std::int32_t>(ids.data(), kBatch, k), lr, view(d, kBatch, E)));
      kd::check(rz(kd::cpu, rl, zr, view(d, kBatch, E)));
      lb_sum += lr.loss;
      rz_sum += zr.loss;
      g.d_router_logits.emplace_back(l, d.data());
    }
    const double layers = std::max<double>(1.0, static_cast<double>(g.d_router_logits.size()));
    kd::objective_evaluation ev;
    kd::check(obj.combine(step, {{"lm", cr.ce}, {"load_balance", lb_sum / layers}, {"router_z", rz_sum / layers}}, ev));
    kd::record(log, ev);
    kd::check(log.end_step(step));
    history.push_back(std::move(ev));
    kd::check(t.backward(g, kd::model::grad_mode::overwrite));
    kd::adamw_step_result sr;
    kd::check(opt.step(params(t), grads(t), sr));
  }
  kd::check(log.finish());
  const std::size_t n = history.size(), w = std::clamp<std::size_t>(n / 4, 1, 100);
  return {window_mean(history, 0, w, "lm"), window_mean(history, n - w, n, "lm")};
}

// ---- 2. The student ------------------------------------------------------------------------------
struct run_summary {
  std::vector<kd::objective_evaluation> history;
  eval_result initial, final_eval;
  double best_ce = 0.0;  // lowest held-out CE seen at any evaluation
  std::int64_t steps_run = 0;
  bool stopped_early = false;
};

// The feature loss's projection student hidden -> teacher hidden: its own small arena and optimizer.
struct projection {
  std::int64_t rows = 0, cols = 0;   // teacher hidden x student hidden
  std::vector<float> values, grads;  // weight [rows x cols], then bias [rows]
  projection(std::int64_t teacher_dim, std::int64_t student_dim, kd::rng& r)
      : rows(teacher_dim), cols(student_dim), values(static_cast<std::size_t>(rows * cols + rows), 0.0f),
        grads(values.size(), 0.0f) {
    for (std::int64_t i = 0; i < rows * cols; ++i) values[static_cast<std::size_t>(i)] = static_cast<float>(0.25 * r.normal());
  }
  [[nodiscard]] std::vector<kd::adamw_segment> segments() const {
    const auto w = static_cast<std::size_t>(rows * cols);
    return {{"proj.weight", 0, w, true}, {"proj.bias", w, static_cast<std::size_t>(rows), false}};
  }
};

// Trains the student for up to `steps` steps. With a teacher: the full objective; without: LM only.
template <class Logger>
run_summary train_student(model_t& s, projection& proj, const corpus& c, model_t* teacher, const heldout& h,
                          const kd::objective& obj, std::int64_t steps, std::uint64_t seed, Logger& log,
                          bool verbose) {
  kd::check(obj.validate());
  kd::adamw<float> opt, proj_opt;
  kd::check(opt.init(kd::model_segments(s.table()), params(s), adamw_for(1e-2, steps)));
  kd::check(proj_opt.init(proj.segments(), proj.values, adamw_for(1e-2, steps)));
  kd::rng sampler(seed ^ 0x5eedULL);  // same batches for the distilled and the LM-only student
  lm_loss ce;
  ce.options.vocab = kStudentReal;
  kd_loss kl;
  kl.options.map = &c.map;
  kl.options.accumulate_grad = true;  // adds into the CE gradient of the same logits
  hint_loss hint;
  kd::early_stopping stopper({.patience = 4, .min_delta = 1e-4});
  const std::int64_t eval_every = std::max<std::int64_t>(10, steps / 12);
  const std::int64_t Ds = s.arch().hidden, Dt = proj.rows;
  kd::model::forward_options frozen;
  frozen.training = false;

  run_summary out;
  out.initial = evaluate(s, h, c);
  out.best_ce = out.initial.ce;
  std::vector<float> dlogits(kBatch * kStudentRows), dhidden(static_cast<std::size_t>(kBatch * Ds));
  for (std::int64_t step = 1; step <= steps; ++step) {
    const batch b = make_batch(c, 0, c.transfer_end, &sampler, kSeqs);
    kd::check(s.forward(b.student_in, kSeqs, kSeq));
    // Weights from the objective's schedules go in as grad_scale: gradients come back weighted. The
    // z-loss rides in the CE pass with its own absolute weight.
    ce.options.grad_scale = obj.weight("lm", step);
    ce.options.z_loss_weight = obj.weight("z_loss", step);
    kd::cross_entropy_result cr;
    kd::check(ce(kd::cpu, cview(s.logits(), kBatch, kStudentRows), b.student_label, cr,
                 view(dlogits, kBatch, kStudentRows)));
    std::vector<std::pair<std::string, double>> values{{"lm", cr.ce}};
    if (obj.has("z_loss")) values.emplace_back("z_loss", cr.z_loss);
    model_t::grads_in g;
    g.d_logits = dlogits.data();
    if (teacher != nullptr) {
      kd::check(teacher->forward(b.teacher_in, kSeqs, kSeq, frozen));
      kl.options.temperature = obj.temperature_at(step);
      kl.options.grad_scale = obj.weight("kd", step);
      kd::loss_result kr;
      kd::check(kl(kd::cpu, cview(teacher->logits(), kBatch, kTeacherRows), cview(s.logits(), kBatch, kStudentRows),
                   b.student_label, kr, view(dlogits, kBatch, kStudentRows)));
      hint.options.grad_scale = obj.weight("feature", step);
      kd::loss_result fr;
      float* pg = proj.grads.data();
      kd::check(hint(kd::cpu, cview(s.final_hidden(), kBatch, Ds), cview(proj.values.data(), Dt, Ds),
                     cview(proj.values.data() + Dt * Ds, 1, Dt), cview(teacher->final_hidden(), kBatch, Dt), {}, fr,
                     view(dhidden, kBatch, Ds), kd::matrix_view<float>(pg, Dt, Ds),
                     kd::matrix_view<float>(pg + Dt * Ds, 1, Dt)));
      g.d_final_hidden = dhidden.data();
      values.emplace_back("kd", kr.loss);
      values.emplace_back("feature", fr.loss);
    }
    kd::objective_evaluation ev;
    kd::check(obj.combine(step, values, ev));  // NaN/Inf in any component stops here, named
    kd::record(log, ev);
    kd::check(log.end_step(step));
    out.history.push_back(std::move(ev));
    kd::check(s.backward(g, kd::model::grad_mode::overwrite));
    kd::adamw_step_result sr;
    kd::check(opt.step(params(s), grads(s), sr));
    if (teacher != nullptr) kd::check(proj_opt.step(std::span<float>(proj.values), std::span<const float>(proj.grads), sr));
    out.steps_run = step;

    if (step % eval_every == 0 || step == steps) {
      const eval_result e = evaluate(s, h, c);
      kd::check(kd::check_finite_loss("heldout_ce", step, e.ce));
      out.best_ce = std::min(out.best_ce, e.ce);
      bool stop = false;
      kd::check(stopper.update(e.ce, obj.ramping(step), stop));
      if (verbose)
        std::printf("  eval step %lld | held-out ce %.4f (%.3f bits) | kd@T=1 %.4f | T %.2f | w_kd %.2f | lr %.2e | %s\n",
                    static_cast<long long>(step), e.ce, e.ce / std::numbers::ln2, e.kd_t1, obj.temperature_at(step),
                    obj.weight("kd", step), sr.lr, obj.ramping(step) ? "ramping (not counted)" : "counted");
      if (stop) {
        out.stopped_early = true;
        if (verbose)
          std::printf("  early stop at step %lld (best counted held-out ce %.4f)\n", static_cast<long long>(step),
                      stopper.best());
        break;
      }
    }
  }
  kd::check(log.finish());
  out.final_eval = evaluate(s, h, c);
  out.best_ce = std::min(out.best_ce, out.final_eval.ce);
  return out;
}

constexpr const char* kUsage = "usage: kd_distill_cpu [--steps N] [--seed S] [--jsonl PATH] [--teacher-steps N] "
                               "[--transfer-tokens N]\n";
int usage(const std::string& why) {
  std::fprintf(stderr, "kd_distill_cpu: %s\n%s", why.c_str(), kUsage);
  return 64;
}

double seconds_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

}  // namespace

int main(int argc, char** argv) {
  std::int64_t steps = 4000, teacher_steps = 2000, transfer_tokens = 6000;
  std::uint64_t seed = 20240607;
  std::string jsonl_path;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--help" || a == "-h") return std::printf("%s", kUsage), 0;
    if (i + 1 >= argc) return usage("missing value for " + a);
    const std::string v = argv[++i];
    char* end = nullptr;
    const long long n = std::strtoll(v.c_str(), &end, 10);
    const bool numeric = end != v.c_str() && *end == '\0';
    if (a == "--jsonl") jsonl_path = v;
    else if (!numeric) return usage("not a number: " + a + " " + v);
    else if (a == "--steps" && n >= 2) steps = n;  // two steps at least: a first and a last window
    else if (a == "--seed") seed = static_cast<std::uint64_t>(n);
    else if (a == "--teacher-steps" && n >= 1) teacher_steps = n;
    else if (a == "--transfer-tokens" && n >= 2) transfer_tokens = n;
    else return usage("bad flag or value: " + a + " " + v);
  }

  try {
    const auto t_start = std::chrono::steady_clock::now();
    std::ofstream jsonl;
    if (!jsonl_path.empty()) {  // fail before the work, not after it
      jsonl.open(jsonl_path);
      if (!jsonl) throw kd::error({kd::errc::io_error, "cannot open " + jsonl_path + " for writing"});
    }
    const corpus c = make_corpus(seed, 64000, transfer_tokens);
    std::printf("corpus: %zu tokens | teacher vocab %d (%d rows) | student vocab %d (%d rows) | shared %lld | "
                "teacher fit on [0, %lld), student transfer set [0, %lld), held-out [%lld, %zu)\n",
                c.teacher_stream.size(), kTeacherReal, kTeacherRows, kStudentReal, kStudentRows,
                static_cast<long long>(c.map.size()), static_cast<long long>(c.teacher_train_end),
                static_cast<long long>(c.transfer_end), static_cast<long long>(c.heldout_begin),
                c.teacher_stream.size());
    const auto unk = std::count(c.student_stream.begin() + c.heldout_begin, c.student_stream.end(), kUnk);
    std::printf("held-out tokens the student must call <unk>: %.1f%%\n",
                100.0 * static_cast<double>(unk) / static_cast<double>(c.student_stream.size() - c.heldout_begin));

    // ---- 1. teacher: trained from scratch, then frozen --------------------------------------------
    kd::model::cpu_ops<float> cpu_backend;
    const kd::model::moe_config tcfg = teacher_config();
    kd::check(kd::model::check_supported(tcfg));
    model_t teacher(cpu_backend, kd::model::make_arch(tcfg));
    kd::check(teacher.allocate(/*with_grads=*/true));
    kd::check(teacher.initialize(tcfg.initializer_range, seed * 7919 + 1));
    std::printf("\n== teacher training (%lld steps; Qwen3-MoE %lld layers, hidden %lld, %lld experts top-%lld, "
                "%lld parameters; lm + load_balance + router_z) ==\n",
                static_cast<long long>(teacher_steps), static_cast<long long>(tcfg.num_hidden_layers),
                static_cast<long long>(tcfg.hidden_size), static_cast<long long>(tcfg.num_experts),
                static_cast<long long>(tcfg.num_experts_per_tok), static_cast<long long>(tcfg.parameter_count()));
    const auto t_teacher = std::chrono::steady_clock::now();
    const teacher_summary ts = train_teacher(teacher, c, teacher_steps, seed);
    const double teacher_s = seconds_since(t_teacher);
    heldout h;
    const std::int64_t heldout_seqs = (static_cast<std::int64_t>(c.teacher_stream.size()) - 1 - c.heldout_begin) / kSeq;
    h.data = make_batch(c, c.heldout_begin, static_cast<std::int64_t>(c.teacher_stream.size()), nullptr, heldout_seqs);
    const auto nh = static_cast<std::int64_t>(h.data.teacher_label.size());
    {
      kd::model::forward_options fo;
      fo.training = false;
      kd::check(teacher.forward(h.data.teacher_in, heldout_seqs, kSeq, fo));
      h.teacher_logits.assign(teacher.logits(), teacher.logits() + nh * kTeacherRows);
      lm_loss ce;
      ce.options.vocab = kTeacherReal;
      kd::cross_entropy_result r;
      kd::check(ce(kd::cpu, cview(h.teacher_logits.data(), nh, kTeacherRows), h.data.teacher_label, r));
      double oracle = 0.0;
      for (std::size_t i = 0; i < h.data.teacher_in.size(); ++i)
        oracle -= std::log(c.grammar(h.data.teacher_in[i], h.data.teacher_label[i]));
      oracle /= static_cast<double>(h.data.teacher_in.size());
      std::printf("teacher held-out ce %.4f nats (%.3f bits) in its own vocabulary; grammar oracle %.4f; %.1f s\n",
                  r.ce, r.ce / std::numbers::ln2, oracle, teacher_s);
      const std::int64_t E = tcfg.num_experts, k = tcfg.num_experts_per_tok;
      for (std::int64_t l = 0; l < teacher.arch().num_layers(); ++l) {
        const ids_t ids = expert_ids(teacher, l);
        const kd::matrix_view<const std::int32_t> idv(ids.data(), nh, k);
        kd::expert_utilization u;
        kd::check(kd::compute_expert_utilization(idv, E, u));
        kd::loss_result lb, rz;
        kd::check(kd::load_balance_loss<kd::fp32>{}(kd::cpu, cview(teacher.router_logits(l), nh, E), idv, lb));
        kd::check(kd::router_z_loss<kd::fp32>{}(kd::cpu, cview(teacher.router_logits(l), nh, E), rz));
        std::printf("teacher layer %lld experts: fractions", static_cast<long long>(l));
        for (double f : u.fraction) std::printf(" %.3f", f);
        std::printf(" | normalized entropy %.3f | unused %lld | collapsed %s | load_balance %.4f (1e-2 = balanced) | "
                    "router_z %.4f\n",
                    u.normalized_entropy, static_cast<long long>(u.unused_experts), u.collapsed ? "yes" : "no", lb.loss,
                    rz.loss);
      }
    }

    // ---- 2. distillation --------------------------------------------------------------------------
    const std::int64_t ramp = std::max<std::int64_t>(1, steps / 2);  // curriculum settles at half-way
    kd::objective obj;  // "lm" is built in, weight 1.0
    obj.add("kd", kd::schedule<kd::curve::linear>{.start = 0.25, .end = 1.0, .ramp_steps = ramp})
        .add("feature", kd::schedule<kd::curve::cosine>{.start = 1.0, .end = 0.1, .ramp_steps = ramp})
        .add("z_loss", kd::fixed(1e-3))  // 1e-4 barely restrains logsumexp at this scale; 1e-3 does
        .temperature(kd::schedule<kd::curve::cosine>{.start = 4.0, .end = 1.0, .ramp_steps = ramp});
    std::printf("\n== student distillation (%lld steps, batch %d, log every %lld) ==\n", static_cast<long long>(steps),
                kBatch, static_cast<long long>(kLogEvery));
    const auto t_distill = std::chrono::steady_clock::now();
    const kd::model::dense_config scfg = student_config();
    kd::check(kd::model::check_supported(scfg));
    model_t distilled(cpu_backend, kd::model::make_arch(scfg)), baseline(cpu_backend, kd::model::make_arch(scfg));
    kd::check(distilled.allocate(true));
    kd::check(baseline.allocate(true));
    kd::check(distilled.initialize(scfg.initializer_range, seed * 104729 + 3));
    std::copy(params(distilled).begin(), params(distilled).end(), params(baseline).begin());  // the same init
    kd::rng proj_init(seed * 104729 + 5);
    projection proj(tcfg.hidden_size, scfg.hidden_size, proj_init);
    std::printf("student: Llama %lld layers, hidden %lld, tied head, %lld parameters; feature projection %lld -> %lld\n",
                static_cast<long long>(scfg.num_hidden_layers), static_cast<long long>(scfg.hidden_size),
                static_cast<long long>(scfg.parameter_count()), static_cast<long long>(scfg.hidden_size),
                static_cast<long long>(tcfg.hidden_size));
    student_log log(&std::cout, jsonl.is_open() ? &jsonl : nullptr);
    const run_summary run = train_student(distilled, proj, c, &teacher, h, obj, steps, seed, log, true);
    const double distill_s = seconds_since(t_distill);

    // ---- 3. the same student without a teacher ----------------------------------------------------
    const auto t_base = std::chrono::steady_clock::now();
    kd::objective lm_only;
    kd::metrics_logger<kd::log_never> quiet(nullptr);
    const run_summary base = train_student(baseline, proj, c, nullptr, h, lm_only, run.steps_run, seed, quiet, false);
    const double base_s = seconds_since(t_base);

    // ---- 4. report -------------------------------------------------------------------------------
    const std::size_t n = run.history.size(), w = std::clamp<std::size_t>(n / 2, 1, kLogEvery);
    std::printf("\n== summary: %lld steps%s; windows of %zu steps ==\n", static_cast<long long>(run.steps_run),
                run.stopped_early ? " (early stop)" : "", w);
    std::printf("%-10s %12s %12s %12s %9s\n", "component", "weight@end", "first mean", "last mean", "change");
    for (const std::string name : {"lm", "kd", "feature", "z_loss", "total"}) {
      const double first = window_mean(run.history, 0, w, name), last = window_mean(run.history, n - w, n, name);
      const double weight = name == "total" ? 1.0 : obj.weight(name, run.steps_run);
      std::printf("%-10s %12.4g %12.4f %12.4f %8.1f%%\n", name.c_str(), weight, first, last,
                  100.0 * (last - first) / first);
    }
    std::printf("(kd is T^2 * KL at the scheduled temperature: T went %.2f -> %.2f, so its windows differ in T too)\n",
                obj.temperature_at(1), obj.temperature_at(run.steps_run));

    const double teacher_proj = projected_ce(c, h.data, [&](std::size_t i, std::vector<double>& p) {
      std::fill(p.begin(), p.end(), 0.0);
      const float* z = h.teacher_logits.data() + i * kTeacherRows;
      const double mx = *std::max_element(z, z + kTeacherReal);
      double sum = 0.0;
      for (int j = 0; j < kTeacherReal; ++j) sum += (p[j] = std::exp(z[j] - mx));
      for (int j = 0; j < kTeacherReal; ++j) p[j] /= sum;
    });
    const double oracle_proj = projected_ce(c, h.data, [&](std::size_t i, std::vector<double>& p) {
      std::fill(p.begin(), p.end(), 0.0);
      for (int j = 0; j < kTeacherReal; ++j) p[j] = c.grammar(h.data.teacher_in[i], j);
    });
    std::printf("\nheld-out: %zu contiguous tokens, scored in the student vocabulary (<unk> = tokens it cannot name)\n",
                h.data.student_in.size());
    std::printf("%-44s %10s %11s %9s %7s %9s\n", "model", "ce (nats)", "bits/token", "kd@T=1", "steps", "best ce");
    auto row = [](const char* name, double ce, double kl, std::int64_t steps_run, bool early, double best = -1) {
      char kl_s[32] = "-", steps_s[32] = "-", best_s[32] = "-";
      if (kl >= 0) std::snprintf(kl_s, sizeof kl_s, "%.4f", kl);
      if (steps_run >= 0)
        std::snprintf(steps_s, sizeof steps_s, "%lld%s", static_cast<long long>(steps_run), early ? "*" : "");
      if (best >= 0) std::snprintf(best_s, sizeof best_s, "%.4f", best);
      std::printf("%-44s %10.4f %11.4f %9s %7s %9s\n", name, ce, ce / std::numbers::ln2, kl_s, steps_s, best_s);
    };
    row("grammar oracle (knows the teacher ids)", oracle_proj, -1, -1, false);
    row("teacher, projected to student vocabulary", teacher_proj, -1, teacher_steps, false);
    row("student at init", run.initial.ce, run.initial.kd_t1, 0, false);
    row("student, distilled (lm+kd+feature+z_loss)", run.final_eval.ce, run.final_eval.kd_t1, run.steps_run,
        run.stopped_early, run.best_ce);
    row("student, LM loss only (same init, batches)", base.final_eval.ce, base.final_eval.kd_t1, base.steps_run,
        base.stopped_early, base.best_ce);
    if (run.stopped_early || base.stopped_early)
      std::printf("(* = stopped early: 4 held-out evaluations without improvement, none counted while ramping)\n");
    // Compare best held-out CE: a checkpointing trainer would keep each run's best evaluation.
    const double gain = base.best_ce - run.best_ce;
    std::printf("\n== result: LM-only vs distilled student on held-out data ==\n");
    std::printf("%-26s %12s %12s %12s\n", "", "LM-only", "distilled", "improvement");
    auto result_row = [](const char* what, double lm, double kd) {
      std::printf("%-26s %12.4f %12.4f %11.2f%%\n", what, lm, kd, 100.0 * (lm - kd) / lm);
    };
    result_row("best held-out CE (nats)", base.best_ce, run.best_ce);
    result_row("final held-out CE (nats)", base.final_eval.ce, run.final_eval.ce);
    result_row("final KL to teacher, T=1", base.final_eval.kd_t1, run.final_eval.kd_t1);
    std::printf("distillation %s the best held-out CE by %.4f nats/token (%.2f%%) vs the LM-only student\n",
                gain > 0 ? "lowers" : "does NOT lower", std::abs(gain), 100.0 * std::abs(gain) / base.best_ce);
    std::printf("time: total %.1f s (teacher %.1f s, distillation %.1f s, LM-only %.1f s); log lines: %lld%s\n",
                seconds_since(t_start), teacher_s, distill_s, base_s, static_cast<long long>(log.lines()),
                jsonl_path.empty() ? "" : (", JSON Lines in " + jsonl_path).c_str());

    // The run is a test too: learning must have happened.
    const double lm_first = window_mean(run.history, 0, w, "lm"), lm_last = window_mean(run.history, n - w, n, "lm");
    const bool lm_ok = lm_last < lm_first, kd_ok = run.final_eval.kd_t1 < run.initial.kd_t1;
    const bool teacher_ok = ts.last_lm < ts.first_lm, gain_ok = gain > 0;
    if (!teacher_ok)
      std::fprintf(stderr, "FAIL: the teacher's LM loss did not decrease (first window %.4f, last %.4f)\n",
                   ts.first_lm, ts.last_lm);
    if (!gain_ok) std::fprintf(stderr, "FAIL: distillation did not lower the best held-out CE\n");
    if (!lm_ok)
      std::fprintf(stderr, "FAIL: the LM loss did not decrease (first window %.4f, last %.4f)\n", lm_first, lm_last);
    if (!kd_ok)
      std::fprintf(stderr, "FAIL: held-out KL to the teacher did not decrease (%.4f -> %.4f)\n", run.initial.kd_t1,
                   run.final_eval.kd_t1);
    return lm_ok && kd_ok && teacher_ok && gain_ok ? 0 : 1;
  } catch (const kd::error& e) {  // every failed kd::status, by way of kd::check
    std::fprintf(stderr, "error: %s\n", e.what());
    return 2;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "error: %s\n", e.what());
    return 3;
  }
}
