// examples/distill_cpu.cpp: end-to-end teacher -> student distillation on the CPU reference backend.
//
// The whole pipeline in one file, small enough to run in seconds but with every moving part real:
//   1. A synthetic corpus from a fixed sparse Markov "grammar" over 300 teacher tokens. Its exact
//      transition table is kept, so the best achievable cross-entropy (the oracle) can be printed.
//   2. Two tokenizers: the teacher names all 300 tokens (padded to 320 embedding rows); the student
//      names the 180 most frequent ones, an <unk> and 19 strings the corpus never uses (200, padded to
//      256). kd::vocab_map::from_tokens aligns them by string; tokens the student cannot name become
//      <unk> in its labels.
//   3. A frozen top-2 MoE teacher (d = 32, 4 experts) given real knowledge by a short cross-entropy fit of
//      its embeddings and head (router and experts stay random), then audited for expert collapse.
//   4. A dense student (d = 16) trained on a small transfer set with kd::objective: lm + kd (forward KL
//      through the vocab_map, cosine temperature 4 -> 1) + feature (rms_mse through a learned 16 -> 32
//      projection) + z_loss, logged through kd::metrics_logger, guarded by the objective's finite checks,
//      early-stopped on a contiguous held-out split once the curriculum stops ramping.
//   5. The same student, same init, same batches, trained on the LM loss alone, for comparison.
// The student's transfer set (6,000 tokens by default) is much smaller than the teacher's 56,000: the
// regime where soft targets pay off. With --transfer-tokens 56000 the LM-only student catches up (the
// student is then capacity-bound, not data-bound) and distillation no longer lowers held-out CE.
// Exit status: 0 on success; 1 when learning did not happen (the LM loss's last logged window is not
// below its first, or the held-out KL to the teacher at T = 1 did not fall); 2 on a kd::error (any failed
// kd::status); 3 on another exception; 64 on a bad flag.
#include <algorithm>
#include <array>
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

#include <kd/kd.hpp>

namespace {

using Mat = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
using ids_t = std::vector<std::int32_t>;

kd::matrix_view<float> view(Mat& m) { return {m.data(), m.rows(), m.cols()}; }
kd::matrix_view<const float> cview(const Mat& m) { return {m.data(), m.rows(), m.cols()}; }

// Log cadence is a type: one line per 50 optimizer steps for the student, 100 for the teacher fit.
constexpr std::int64_t kLogEvery = 50;
using student_log = kd::metrics_logger<kd::log_every<kLogEvery>>;

constexpr int kTeacherReal = 300, kTeacherRows = 320, kStudentReal = 200, kStudentRows = 256;
constexpr int kShared = 180, kUnk = 0;
constexpr int kTeacherDim = 32, kExperts = 4, kTopK = 2, kStudentDim = 16;
constexpr int kBatch = 256;

// splitmix64: the corpus and every initialization are identical on every platform and standard
// library (std::normal_distribution is not), so the printed numbers are reproducible.
class rng {
 public:
  explicit rng(std::uint64_t seed) : s_(seed) {}
  std::uint64_t next() {
    std::uint64_t z = (s_ += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
  }
  double uniform() { return static_cast<double>(next() >> 11) * 0x1.0p-53; }
  std::int32_t below(std::int64_t n) { return static_cast<std::int32_t>(uniform() * static_cast<double>(n)); }
  double normal() {
    const double u1 = uniform() + 1e-300, u2 = uniform();
    return std::sqrt(-2.0 * std::log(u1)) * std::cos(2.0 * std::numbers::pi * u2);
  }
  Mat matrix(Eigen::Index r, Eigen::Index c, double scale) {
    Mat m(r, c);
    for (Eigen::Index i = 0; i < m.size(); ++i) m.data()[i] = static_cast<float>(scale * normal());
    return m;
  }

 private:
  std::uint64_t s_;
};

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
// a 16-wide student can partly learn and a 32-wide teacher learns better.
corpus make_corpus(std::uint64_t seed, std::int64_t length, std::int64_t transfer_tokens) {
  rng r(seed);
  constexpr int kClasses = 15, kPerClass = kTeacherReal / kClasses;
  corpus c;
  c.grammar = Eigen::MatrixXd::Zero(kTeacherReal, kTeacherReal);
  std::vector<int> order(kTeacherReal);
  std::iota(order.begin(), order.end(), 0);
  for (int i = kTeacherReal - 1; i > 0; --i) std::swap(order[i], order[r.below(i + 1)]);
  auto member = [&](int cls, int rank) { return order[cls * kPerClass + rank]; };
  std::vector<int> class_of(kTeacherReal);
  for (int k = 0; k < kTeacherReal; ++k) class_of[order[k]] = k / kPerClass;
  Eigen::MatrixXd class_next = Eigen::MatrixXd::Zero(kClasses, kClasses);
  for (int a = 0; a < kClasses; ++a) {
    for (int j = 0; j < 3; ++j) class_next(a, r.below(kClasses)) += std::exp(r.normal());
    class_next.row(a) /= class_next.row(a).sum();
  }
  Eigen::VectorXd zipf(kPerClass);
  for (int k = 0; k < kPerClass; ++k) zipf[k] = 1.0 / std::pow(k + 1.0, 1.1);
  zipf /= zipf.sum();
  for (int t = 0; t < kTeacherReal; ++t) {
    Eigen::VectorXd priv = Eigen::VectorXd::Zero(kTeacherReal);
    for (int j = 0; j < 3; ++j) priv[r.below(kTeacherReal)] += std::exp(r.normal());
    priv /= priv.sum();
    c.grammar.row(t) = 0.55 * priv.transpose();
    for (int b = 0; b < kClasses; ++b)
      for (int k = 0; k < kPerClass; ++k) c.grammar(t, member(b, k)) += 0.45 * class_next(class_of[t], b) * zipf[k];
  }
  c.teacher_stream.resize(static_cast<std::size_t>(length));
  std::int32_t cur = r.below(kTeacherReal);
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
  for (std::size_t i = rest.size() - 1; i > 0; --i) std::swap(rest[i], rest[r.below(static_cast<std::int64_t>(i) + 1)]);
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

// ---- Adam over a list of (parameter, gradient) matrices ------------------------------------------
class adam {
 public:
  explicit adam(float lr) : lr_(lr) {}
  void add(Mat& param, Mat& grad) {
    grad = Mat::Zero(param.rows(), param.cols());
    slots_.push_back({&param, &grad, Mat::Zero(param.rows(), param.cols()), Mat::Zero(param.rows(), param.cols())});
  }
  void step() {
    ++t_;
    const float c1 = 1.0f - std::pow(kB1, static_cast<float>(t_)), c2 = 1.0f - std::pow(kB2, static_cast<float>(t_));
    for (auto& s : slots_) {
      s.m = kB1 * s.m + (1.0f - kB1) * *s.g;
      s.v = kB2 * s.v + (1.0f - kB2) * s.g->cwiseProduct(*s.g);
      s.p->array() -= lr_ * (s.m.array() / c1) / ((s.v.array() / c2).sqrt() + 1e-8f);
    }
  }

 private:
  static constexpr float kB1 = 0.9f, kB2 = 0.999f;
  struct slot { Mat* p; Mat* g; Mat m, v; };
  float lr_;
  std::int64_t t_ = 0;
  std::vector<slot> slots_;
};

// A batch: inputs at positions p, labels at p + 1, in both vocabularies.
struct batch { ids_t teacher_in, teacher_label, student_in, student_label; };
batch make_batch(const corpus& c, std::int64_t begin, std::int64_t end, rng* r, std::int64_t n) {
  batch b;
  for (std::int64_t i = 0; i < n; ++i) {
    const auto p = static_cast<std::size_t>(r != nullptr ? begin + r->below(end - 1 - begin) : begin + i);
    b.teacher_in.push_back(c.teacher_stream[p]);
    b.teacher_label.push_back(c.teacher_stream[p + 1]);
    b.student_in.push_back(c.student_stream[p]);
    b.student_label.push_back(c.student_stream[p + 1]);
  }
  return b;
}

// ---- Teacher: embedding -> top-2 MoE of tanh experts (residual) -> head over 320 rows ------------
struct teacher_model {
  Mat emb, router, head, head_b, g_emb, g_head, g_head_b;
  std::array<Mat, kExperts> w, b;
  explicit teacher_model(rng& r)
      : emb(r.matrix(kTeacherRows, kTeacherDim, 0.5)), router(r.matrix(kExperts, kTeacherDim, 1.0)),
        head(r.matrix(kTeacherRows, kTeacherDim, 0.1)), head_b(Mat::Zero(1, kTeacherRows)) {
    for (int e = 0; e < kExperts; ++e) {
      w[e] = r.matrix(kTeacherDim, kTeacherDim, 1.0 / std::sqrt(kTeacherDim));
      b[e] = r.matrix(1, kTeacherDim, 0.1);
    }
  }
};

struct teacher_out {
  Mat x, router_logits, hidden, logits, expert_out;  // expert_out: [N x top_k * d], tanh outputs
  Eigen::Matrix<std::int32_t, Eigen::Dynamic, kTopK, Eigen::RowMajor> expert_ids;
  Eigen::Matrix<float, Eigen::Dynamic, kTopK, Eigen::RowMajor> gates;
};

void teacher_forward(const teacher_model& t, const ids_t& in, teacher_out& o) {
  const auto n = static_cast<Eigen::Index>(in.size());
  o.x.resize(n, kTeacherDim);
  for (Eigen::Index i = 0; i < n; ++i) o.x.row(i) = t.emb.row(in[static_cast<std::size_t>(i)]);
  o.router_logits = o.x * t.router.transpose();
  o.hidden = o.x;
  o.expert_out.resize(n, kTopK * kTeacherDim);
  o.expert_ids.resize(n, kTopK);
  o.gates.resize(n, kTopK);
  for (Eigen::Index i = 0; i < n; ++i) {
    // Top-2 of the router logits, gates renormalized over the chosen pair (Mixtral-style).
    std::array<int, kExperts> idx{};
    std::iota(idx.begin(), idx.end(), 0);
    std::partial_sort(idx.begin(), idx.begin() + kTopK, idx.end(),
                      [&](int a, int b) { return o.router_logits(i, a) > o.router_logits(i, b); });
    const float top = o.router_logits(i, idx[0]);
    float z = 0.0f;
    for (int j = 0; j < kTopK; ++j) z += (o.gates(i, j) = std::exp(o.router_logits(i, idx[j]) - top));
    for (int j = 0; j < kTopK; ++j) {
      const int e = idx[j];
      o.gates(i, j) /= z;
      o.expert_ids(i, j) = e;
      auto f = o.expert_out.row(i).segment(j * kTeacherDim, kTeacherDim);
      f = (o.x.row(i) * t.w[e].transpose() + t.b[e]).array().tanh().matrix();
      o.hidden.row(i) += o.gates(i, j) * f;
    }
  }
  o.logits = o.hidden * t.head.transpose();
  o.logits.rowwise() += t.head_b.row(0);
}

// Gradients for the teacher's embeddings and head from dL/dlogits; experts and router are frozen but
// the gradient still flows through them (and through the top-2 gates) into the embeddings.
void teacher_backward(teacher_model& t, const ids_t& in, const teacher_out& o, const Mat& dlogits) {
  t.g_head.noalias() = dlogits.transpose() * o.hidden;
  t.g_head_b = dlogits.colwise().sum();
  const Mat dh = dlogits * t.head;
  t.g_emb.setZero();
  for (Eigen::Index i = 0; i < dh.rows(); ++i) {
    Eigen::RowVectorXf dx = dh.row(i);
    std::array<float, kTopK> dgate{};
    float mix = 0.0f;
    for (int j = 0; j < kTopK; ++j) {
      const int e = o.expert_ids(i, j);
      const auto f = o.expert_out.row(i).segment(j * kTeacherDim, kTeacherDim);
      dgate[j] = dh.row(i).dot(f);
      mix += o.gates(i, j) * dgate[j];
      const Eigen::RowVectorXf dpre = o.gates(i, j) * dh.row(i).cwiseProduct((1.0f - f.array().square()).matrix());
      dx += dpre * t.w[e];
    }
    for (int j = 0; j < kTopK; ++j) dx += o.gates(i, j) * (dgate[j] - mix) * t.router.row(o.expert_ids(i, j));
    t.g_emb.row(in[static_cast<std::size_t>(i)]) += dx;
  }
}

// ---- Student: embedding -> residual tanh layer -> head over 256 rows; plus the feature projection 16 -> 32 ---
struct student_model {
  Mat emb, w1, b1, head, head_b, proj, proj_b;
  Mat g_emb, g_w1, g_b1, g_head, g_head_b, g_proj, g_proj_b;
  explicit student_model(rng& r)
      : emb(r.matrix(kStudentRows, kStudentDim, 0.5)), w1(r.matrix(kStudentDim, kStudentDim, 0.25)),
        b1(Mat::Zero(1, kStudentDim)), head(r.matrix(kStudentRows, kStudentDim, 0.1)),
        head_b(Mat::Zero(1, kStudentRows)), proj(r.matrix(kTeacherDim, kStudentDim, 0.25)),
        proj_b(Mat::Zero(1, kTeacherDim)) {}
  void attach(adam& opt) {
    for (auto [p, g] : {std::pair{&emb, &g_emb}, {&w1, &g_w1}, {&b1, &g_b1}, {&head, &g_head}, {&head_b, &g_head_b},
                        {&proj, &g_proj}, {&proj_b, &g_proj_b}})
      opt.add(*p, *g);
  }
};

struct student_out { Mat x, u, hidden, logits; };

void student_forward(const student_model& s, const ids_t& in, student_out& o) {
  const auto n = static_cast<Eigen::Index>(in.size());
  o.x.resize(n, kStudentDim);
  for (Eigen::Index i = 0; i < n; ++i) o.x.row(i) = s.emb.row(in[static_cast<std::size_t>(i)]);
  o.u = o.x * s.w1.transpose();
  o.u.rowwise() += s.b1.row(0);
  o.u = o.u.array().tanh().matrix();
  o.hidden = o.x + o.u;
  o.logits = o.hidden * s.head.transpose();
  o.logits.rowwise() += s.head_b.row(0);
}

// dlogits and dhidden arrive already weighted (each loss got its weight as grad_scale); the projection's
// gradients were written by feature_loss itself.
void student_backward(student_model& s, const ids_t& in, const student_out& o, const Mat& dlogits, Mat& dhidden) {
  s.g_head.noalias() = dlogits.transpose() * o.hidden;
  s.g_head_b = dlogits.colwise().sum();
  dhidden.noalias() += dlogits * s.head;
  const Mat dpre = dhidden.cwiseProduct((1.0f - o.u.array().square()).matrix());
  s.g_w1.noalias() = dpre.transpose() * o.x;
  s.g_b1 = dpre.colwise().sum();
  const Mat dx = dhidden + dpre * s.w1;
  s.g_emb.setZero();
  for (Eigen::Index i = 0; i < dx.rows(); ++i) s.g_emb.row(in[static_cast<std::size_t>(i)]) += dx.row(i);
}

// ---- Losses (policies fixed at compile time) and evaluation --------------------------------------
using lm_loss = kd::cross_entropy<kd::token_mean, kd::fp32>;
using kd_loss = kd::logit_kd<kd::forward_kl, kd::token_mean, kd::precision_set<kd::fp32, kd::fp32>>;
using hint_loss = kd::feature_loss<kd::rms_mse, kd::token_mean, kd::precision_set<kd::fp32, kd::fp32, kd::fp32>>;

struct heldout {
  batch data;
  teacher_out teacher;  // the teacher is frozen: its held-out outputs are computed once
};

struct eval_result { double ce = 0.0, kd_t1 = 0.0; };  // student CE (nats/token), forward KL to teacher at T = 1

eval_result evaluate(const student_model& s, const heldout& h, const corpus& c) {
  student_out o;
  student_forward(s, h.data.student_in, o);
  lm_loss ce;
  ce.options.vocab = kStudentReal;
  kd::cross_entropy_result cr;
  kd::check(ce(kd::cpu, cview(o.logits), h.data.student_label, cr));
  kd_loss kl;
  kl.options.map = &c.map;
  kd::loss_result kr;
  kd::check(kl(kd::cpu, cview(h.teacher.logits), cview(o.logits), h.data.student_label, kr));
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

struct run_summary {
  std::vector<kd::objective_evaluation> history;
  eval_result initial, final_eval;
  double best_ce = 0.0;  // lowest held-out CE seen at any evaluation
  std::int64_t steps_run = 0;
  bool stopped_early = false;
};

// Trains the student for up to `steps` steps. With a teacher: the full objective; without: LM only.
template <class Logger>
run_summary train_student(student_model& s, const corpus& c, const teacher_model* teacher, const heldout& h,
                          const kd::objective& obj, std::int64_t steps, std::uint64_t seed, Logger& log,
                          bool verbose) {
  kd::check(obj.validate());
  adam opt(5e-3f);
  s.attach(opt);
  rng sampler(seed ^ 0x5eedULL);  // same batches for the distilled and the LM-only student
  lm_loss ce;
  ce.options.vocab = kStudentReal;
  kd_loss kl;
  kl.options.map = &c.map;
  kl.options.accumulate_grad = true;  // adds into the CE gradient of the same logits
  hint_loss hint;
  kd::early_stopping stopper({.patience = 4, .min_delta = 1e-4});
  const std::int64_t eval_every = std::max<std::int64_t>(10, steps / 12);

  run_summary out;
  out.initial = evaluate(s, h, c);
  out.best_ce = out.initial.ce;
  student_out so;
  teacher_out to;
  Mat dlogits(kBatch, kStudentRows), dhidden(kBatch, kStudentDim);
  for (std::int64_t step = 1; step <= steps; ++step) {
    const batch b = make_batch(c, 0, c.transfer_end, &sampler, kBatch);
    student_forward(s, b.student_in, so);
    // Weights from the objective's schedules go in as grad_scale: gradients come back weighted. The
    // z-loss rides in the CE pass with its own absolute weight.
    ce.options.grad_scale = obj.weight("lm", step);
    ce.options.z_loss_weight = obj.weight("z_loss", step);
    kd::cross_entropy_result cr;
    kd::check(ce(kd::cpu, cview(so.logits), b.student_label, cr, view(dlogits)));
    std::vector<std::pair<std::string, double>> values{{"lm", cr.ce}};
    if (obj.has("z_loss")) values.emplace_back("z_loss", cr.z_loss);
    if (teacher != nullptr) {
      teacher_forward(*teacher, b.teacher_in, to);
      kl.options.temperature = obj.temperature_at(step);
      kl.options.grad_scale = obj.weight("kd", step);
      kd::loss_result kr;
      kd::check(kl(kd::cpu, cview(to.logits), cview(so.logits), b.student_label, kr, view(dlogits)));
      hint.options.grad_scale = obj.weight("feature", step);
      kd::loss_result fr;
      kd::check(hint(kd::cpu, cview(so.hidden), cview(s.proj), cview(s.proj_b), cview(to.hidden), {}, fr,
                     view(dhidden), view(s.g_proj), view(s.g_proj_b)));
      values.emplace_back("kd", kr.loss);
      values.emplace_back("feature", fr.loss);
    } else {
      dhidden.setZero();
    }
    kd::objective_evaluation ev;
    kd::check(obj.combine(step, values, ev));  // NaN/Inf in any component stops here, named
    kd::record(log, ev);
    kd::check(log.end_step(step));
    out.history.push_back(std::move(ev));
    student_backward(s, b.student_in, so, dlogits, dhidden);
    opt.step();
    out.steps_run = step;

    if (step % eval_every == 0 || step == steps) {
      const eval_result e = evaluate(s, h, c);
      kd::check(kd::check_finite_loss("heldout_ce", step, e.ce));
      out.best_ce = std::min(out.best_ce, e.ce);
      bool stop = false;
      kd::check(stopper.update(e.ce, obj.ramping(step), stop));
      if (verbose)
        std::printf("  eval step %lld | held-out ce %.4f (%.3f bits) | kd@T=1 %.4f | T %.2f | w_kd %.2f | %s\n",
                    static_cast<long long>(step), e.ce, e.ce / std::numbers::ln2, e.kd_t1, obj.temperature_at(step),
                    obj.weight("kd", step), obj.ramping(step) ? "ramping (not counted)" : "counted");
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

double window_mean(const std::vector<kd::objective_evaluation>& h, std::size_t begin, std::size_t end,
                   const std::string& name) {
  double sum = 0.0;
  for (std::size_t i = begin; i < end; ++i)
    sum += name == "total" ? h[i].total : h[i].find(name)->value;
  return sum / static_cast<double>(end - begin);
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
  std::int64_t steps = 4000, teacher_steps = 400, transfer_tokens = 6000;
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

    // ---- 1. teacher: give it knowledge, then freeze it ----------------------------------------------
    std::printf("\n== teacher pretraining (%lld steps, embeddings + head; router and experts frozen) ==\n",
                static_cast<long long>(teacher_steps));
    rng init(seed * 7919 + 1);
    teacher_model teacher(init);
    {
      adam opt(2e-2f);
      opt.add(teacher.emb, teacher.g_emb);
      opt.add(teacher.head, teacher.g_head);
      opt.add(teacher.head_b, teacher.g_head_b);
      rng sampler(seed ^ 0x7eac4e7ULL);
      kd::metrics_logger<kd::log_every<100>> log(&std::cout);
      lm_loss ce;
      ce.options.vocab = kTeacherReal;  // rows 300..319 are padding: out of the softmax, gradient 0
      teacher_out o;
      Mat dlogits(kBatch, kTeacherRows);
      for (std::int64_t step = 1; step <= teacher_steps; ++step) {
        const batch b = make_batch(c, 0, c.teacher_train_end, &sampler, kBatch);
        teacher_forward(teacher, b.teacher_in, o);
        kd::cross_entropy_result r;
        kd::check(ce(kd::cpu, cview(o.logits), b.teacher_label, r, view(dlogits)));
        kd::check(kd::check_finite_loss("teacher lm", step, r.ce));
        log.record("lm", r.ce);
        kd::check(log.end_step(step));
        teacher_backward(teacher, b.teacher_in, o, dlogits);
        opt.step();
      }
      kd::check(log.finish());
    }
    heldout h;
    h.data = make_batch(c, c.heldout_begin, static_cast<std::int64_t>(c.teacher_stream.size()), nullptr,
                        static_cast<std::int64_t>(c.teacher_stream.size()) - 1 - c.heldout_begin);
    teacher_forward(teacher, h.data.teacher_in, h.teacher);
    {
      lm_loss ce;
      ce.options.vocab = kTeacherReal;
      kd::cross_entropy_result r;
      kd::check(ce(kd::cpu, cview(h.teacher.logits), h.data.teacher_label, r));
      double oracle = 0.0;
      for (std::size_t i = 0; i < h.data.teacher_in.size(); ++i)
        oracle -= std::log(c.grammar(h.data.teacher_in[i], h.data.teacher_label[i]));
      oracle /= static_cast<double>(h.data.teacher_in.size());
      kd::expert_utilization u;
      const kd::matrix_view<const std::int32_t> ids(h.teacher.expert_ids.data(), h.teacher.expert_ids.rows(), kTopK);
      kd::check(kd::compute_expert_utilization(ids, kExperts, u));
      kd::loss_result lb, rz;
      kd::check(kd::load_balance_loss<kd::fp32>{}(kd::cpu, cview(h.teacher.router_logits), ids, lb));
      kd::check(kd::router_z_loss<kd::fp32>{}(kd::cpu, cview(h.teacher.router_logits), rz));
      std::printf("teacher held-out ce %.4f nats (%.3f bits) in its own vocabulary; grammar oracle %.4f\n", r.ce,
                  r.ce / std::numbers::ln2, oracle);
      std::printf("teacher experts: fractions");
      for (double f : u.fraction) std::printf(" %.3f", f);
      std::printf(" | normalized entropy %.3f | unused %lld | collapsed %s | load_balance %.4f (1e-2 = balanced) | "
                  "router_z %.4f\n",
                  u.normalized_entropy, static_cast<long long>(u.unused_experts), u.collapsed ? "yes" : "no", lb.loss,
                  rz.loss);
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
    rng student_init(seed * 104729 + 3);
    student_model distilled(student_init);
    const student_model fresh = distilled;  // the LM-only run starts from the very same weights
    student_log log(&std::cout, jsonl.is_open() ? &jsonl : nullptr);
    const run_summary run = train_student(distilled, c, &teacher, h, obj, steps, seed, log, true);
    const double distill_s = seconds_since(t_distill);

    // ---- 3. the same student without a teacher ----------------------------------------------------
    const auto t_base = std::chrono::steady_clock::now();
    student_model baseline = fresh;
    kd::objective lm_only;
    kd::metrics_logger<kd::log_never> quiet(nullptr);
    const run_summary base = train_student(baseline, c, nullptr, h, lm_only, run.steps_run, seed, quiet, false);
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
      const Eigen::RowVectorXd z = h.teacher.logits.row(static_cast<Eigen::Index>(i)).head(kTeacherReal).cast<double>();
      const double m = z.maxCoeff(), sum = (z.array() - m).exp().sum();
      for (int j = 0; j < kTeacherReal; ++j) p[j] = std::exp(z[j] - m) / sum;
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
    std::printf("distillation %s the best held-out CE by %.4f nats/token (%.2f%%) vs the LM-only student\n",
                gain >= 0 ? "lowers" : "RAISES", std::abs(gain), 100.0 * std::abs(gain) / base.best_ce);
    std::printf("time: total %.1f s (distillation %.1f s, LM-only %.1f s); log lines: %lld%s\n", seconds_since(t_start),
                distill_s, base_s, static_cast<long long>(log.lines()),
                jsonl_path.empty() ? "" : (", JSON Lines in " + jsonl_path).c_str());

    // The run is a test too: learning must have happened.
    const double lm_first = window_mean(run.history, 0, w, "lm"), lm_last = window_mean(run.history, n - w, n, "lm");
    const bool lm_ok = lm_last < lm_first, kd_ok = run.final_eval.kd_t1 < run.initial.kd_t1;
    if (!lm_ok)
      std::fprintf(stderr, "FAIL: the LM loss did not decrease (first window %.4f, last %.4f)\n", lm_first, lm_last);
    if (!kd_ok)
      std::fprintf(stderr, "FAIL: held-out KL to the teacher did not decrease (%.4f -> %.4f)\n", run.initial.kd_t1,
                   run.final_eval.kd_t1);
    return lm_ok && kd_ok ? 0 : 1;
  } catch (const kd::error& e) {  // every failed kd::status, by way of kd::check
    std::fprintf(stderr, "error: %s\n", e.what());
    return 2;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "error: %s\n", e.what());
    return 3;
  }
}
