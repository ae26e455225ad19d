// kd::train::teacher_step / distill_step / evaluate_lm on the CPU reference backend (tiny models):
//  - the chunked LM head (logits never stored whole) gives the losses and the update of one pass over all
//    rows, because token means use the step's token count, not the chunk's;
//  - its LM loss equals cross_entropy over the full logits of a forward with logits;
//  - evaluate_lm's loss, perplexity and bits per byte match a direct computation;
//  - a step buffers its losses until flush(), which returns them per step, in order;
//  - the teacher step's router losses and expert shares are reported; misuse is refused.
#include <doctest/doctest.h>

#include <cmath>
#include <memory>
#include <numbers>
#include <thread>
#include <vector>

#include <kd/model/ops_cpu.hpp>
#include <kd/train/distill_step.hpp>

#include "distill_fixture.hpp"
#include "test_util.hpp"

namespace {

using cpu = kd::model::cpu_ops<float>;
using model_t = kd::model::transformer<cpu>;
namespace km = kd::model;
using namespace kd_test::distill;

struct distill_run {
  cpu b;
  model_t teacher{b, km::make_arch(teacher_cfg())}, student{b, km::make_arch(student_cfg())};
  kd::vocab_map map = make_map();
  kd::objective obj = full_objective();
  kd::train::distill_step<model_t, model_t> step;
  explicit distill_run(kd::index_t chunk, std::int64_t window = 1, kd::communicator* comm = nullptr,
                       std::size_t bucket = std::size_t{1} << 22) {
    kd::check(teacher.allocate(false));
    kd::check(teacher.initialize(0.3, 1));
    kd::check(student.allocate(true));
    kd::check(student.initialize(0.3, 2));
    kd::train::distill_options o;
    o.chunk_rows = chunk;
    o.window = window;
    o.vocab = 60;
    o.comm = comm;
    o.bucket_elements = bucket;
    kd::check(step.init(&teacher, student, &map, obj, o, adamw()));
  }
};

}  // namespace

TEST_CASE("distill_step: chunked head = one pass (losses and the update)") {
  const auto batch = make_batch(11);
  distill_run whole(1000), chunked(5);
  REQUIRE(whole.step.step(batch, 1).ok());
  REQUIRE(chunked.step.step(batch, 1).ok());
  std::vector<kd::train::step_record> a, c;
  REQUIRE(whole.step.flush(a).ok());
  REQUIRE(chunked.step.flush(c).ok());
  REQUIRE(a.size() == 1);
  REQUIRE(c.size() == 1);
  for (const char* name : {"lm", "z_loss", "kd", "feature", "route"}) {
    CAPTURE(name);
    CHECK(value(c[0], name) == doctest::Approx(value(a[0], name)).epsilon(1e-5));
    CHECK(std::isfinite(value(a[0], name)));
  }
  const auto n = whole.student.table().size();
  double worst = 0;
  for (std::size_t i = 0; i < n; ++i)
    worst = std::max(worst, std::abs(static_cast<double>(whole.student.params()[i]) - chunked.student.params()[i]));
  CHECK(worst < 1e-5);
}

TEST_CASE("distill_step: gradient accumulation over micro-batches = the whole batch (losses and the update)") {
  const auto batch = make_batch(31);
  distill_run whole(1000), split(1000);
  const std::vector<kd::train::text_batch> micro = {row_of(batch, 0), row_of(batch, 1), row_of(batch, 2)};
  REQUIRE(whole.step.step(batch, 1).ok());
  REQUIRE(split.step.step(std::span<const kd::train::text_batch>(micro), 1).ok());
  std::vector<kd::train::step_record> a, c;
  REQUIRE(whole.step.flush(a).ok());
  REQUIRE(split.step.flush(c).ok());
  for (const char* name : {"lm", "z_loss", "kd", "feature", "route"}) {
    CAPTURE(name);
    CHECK(value(c[0], name) == doctest::Approx(value(a[0], name)).epsilon(1e-5));
  }
  // The accumulated gradients (kept in the arenas after the update) agree to float rounding. (Parameters
  // are not compared tightly: Adam's first update is lr * g / (|g| + eps), so a gradient entry near eps
  // turns rounding into a visible difference.)
  auto rel_diff = [](const float* x, const float* y, std::size_t n) {
    double d = 0, m = 0;
    for (std::size_t i = 0; i < n; ++i) {
      d = std::max(d, std::abs(static_cast<double>(x[i]) - y[i]));
      m = std::max(m, std::abs(static_cast<double>(x[i])));
    }
    return d / m;
  };
  CHECK(rel_diff(whole.student.grads(), split.student.grads(), whole.student.table().size()) < 1e-5);
  CHECK(rel_diff(whole.step.side().grads.data(), split.step.side().grads.data(), whole.step.side().size()) < 1e-5);
  CHECK(rel_diff(whole.student.params(), split.student.params(), whole.student.table().size()) < 1e-3);
  // Micro-batches of different shapes in one step are refused.
  auto odd = micro;
  odd[1] = batch;
  CHECK(split.step.step(std::span<const kd::train::text_batch>(odd), 2).code() == kd::errc::shape_mismatch);
}

TEST_CASE("distill_step: the LM value is cross_entropy over the full logits; losses wait for flush()") {
  const auto batch = make_batch(12);
  distill_run run(7, /*window=*/2);
  // Reference: the same student before its update, logits materialised.
  cpu b;
  model_t ref(b, km::make_arch(student_cfg()));
  REQUIRE(ref.allocate(false));
  std::copy_n(run.student.params(), ref.table().size(), ref.params());
  km::forward_options fo;
  fo.training = false;
  REQUIRE(ref.forward(batch.student_ids, batch.batch, batch.seq, fo));
  kd::cross_entropy<kd::token_mean, kd::fp32> ce;
  ce.options.vocab = 60;
  kd::cross_entropy_result cr;
  REQUIRE(ce(kd::cpu, kd::matrix_view<const float>(ref.logits(), 24, 61), batch.student_labels, cr).ok());

  REQUIRE(run.step.step(batch, 1).ok());
  REQUIRE(run.step.step(make_batch(13), 2).ok());
  CHECK(run.step.step(batch, 3).code() == kd::errc::invalid_argument);  // window full: flush first
  std::vector<kd::train::step_record> recs;
  REQUIRE(run.step.flush(recs).ok());
  REQUIRE(recs.size() == 2);
  CHECK(recs[0].step == 1);
  CHECK(recs[1].step == 2);
  CHECK(value(recs[0], "lm") == doctest::Approx(cr.ce).epsilon(1e-5));
  CHECK(value(recs[0], "z_loss") == doctest::Approx(cr.z_loss).epsilon(1e-5));

  // KD: logit_kd through the full map on the teacher's full logits, gathered to the aligned student rows
  // (the step uses the compact head and map: the same loss).
  model_t tref(b, km::make_arch(teacher_cfg()));
  REQUIRE(tref.allocate(false));
  std::copy_n(run.teacher.params(), tref.table().size(), tref.params());
  REQUIRE(tref.forward(batch.teacher_ids, batch.batch, batch.teacher_seq, fo));
  std::vector<float> tl(24 * 97, 0.0f);
  std::vector<std::int32_t> mask(24, kd::default_ignore_index);
  for (std::size_t k = 0; k < batch.aligned_student.size(); ++k) {
    const auto r = static_cast<std::size_t>(batch.aligned_student[k]), tr = static_cast<std::size_t>(batch.aligned_teacher[k]);
    std::copy_n(tref.logits() + tr * 97, 97, tl.begin() + static_cast<std::ptrdiff_t>(r * 97));
    mask[r] = 0;
  }
  kd::logit_kd<kd::forward_kl, kd::token_mean, kd::precision_set<kd::fp32, kd::fp32>> kl;
  kl.options.map = &run.map;
  kl.options.temperature = 2.0;
  kd::loss_result kr;
  REQUIRE(kl(kd::cpu, kd::matrix_view<const float>(tl.data(), 24, 97), kd::matrix_view<const float>(ref.logits(), 24, 61),
             mask, kr).ok());
  CHECK(value(recs[0], "kd") == doctest::Approx(kr.loss).epsilon(1e-5));
}

TEST_CASE("distill_step: scratch refuses teacher terms; distillation needs the map") {
  cpu b;
  model_t s(b, km::make_arch(student_cfg()));
  REQUIRE(s.allocate(true));
  kd::train::distill_step<model_t, model_t> step;
  kd::objective obj = full_objective();
  CHECK(step.init(nullptr, s, nullptr, obj, {}, adamw()).code() == kd::errc::invalid_argument);
  model_t t(b, km::make_arch(teacher_cfg()));
  REQUIRE(t.allocate(false));
  CHECK(step.init(&t, s, nullptr, obj, {}, adamw()).code() == kd::errc::invalid_argument);
  kd::objective bad;
  bad.add("attention_typo", kd::fixed(1.0));
  CHECK(step.init(&t, s, nullptr, bad, {}, adamw()).code() == kd::errc::invalid_argument);
  kd::objective lm_only;
  REQUIRE(step.init(nullptr, s, nullptr, lm_only, {}, adamw()).ok());
  REQUIRE(step.step(make_batch(14), 1).ok());
  std::vector<kd::train::step_record> recs;
  REQUIRE(step.flush(recs).ok());
  REQUIRE(recs.size() == 1);
  CHECK(recs[0].values.size() == 1);  // lm only
}

TEST_CASE("teacher_step: LM + router losses, expert shares; evaluate_lm against a direct computation") {
  cpu b;
  model_t t(b, km::make_arch(teacher_cfg()));
  REQUIRE(t.allocate(true));
  REQUIRE(t.initialize(0.3, 5));
  kd::objective obj;
  obj.add("load_balance", kd::fixed(1e-2)).add("router_z", kd::fixed(1e-3));
  kd::train::teacher_step<model_t> step;
  kd::train::step_options so;
  so.chunk_rows = 10;
  so.window = 3;
  REQUIRE(step.init(t, obj, so, adamw()).ok());
  std::vector<kd::train::step_record> recs;
  for (int k = 1; k <= 3; ++k) {
    const auto batch = make_batch(20 + static_cast<std::uint64_t>(k));
    REQUIRE(step.step(batch.teacher_ids, batch.teacher_labels, batch.batch, batch.teacher_seq, k).ok());
  }
  REQUIRE(step.flush(recs).ok());
  REQUIRE(recs.size() == 3);
  for (const auto& r : recs) {
    CHECK(value(r, "load_balance") >= 0.99);  // Switch's E * sum f P is >= 1 up to rounding, = 1 when balanced
    CHECK(value(r, "router_z") > 0);
    CHECK(value(r, "lm") > 0);
  }
  const auto shares = step.take_expert_shares();
  REQUIRE(shares.size() == step.moe_layers().size());
  for (const auto& l : shares) {
    double sum = 0;
    for (double x : l) sum += x;
    CHECK(sum == doctest::Approx(1.0));
  }

  // evaluate_lm on a stream of 3 windows of 9 + 1 tokens with known byte offsets.
  std::vector<std::uint32_t> ids, begin, end;
  kd::rng r(9);
  std::uint32_t at = 0;
  for (int i = 0; i < 28; ++i) {
    ids.push_back(static_cast<std::uint32_t>(r.below(97)));
    begin.push_back(at);
    at += 1 + static_cast<std::uint32_t>(r.below(4));
    end.push_back(at);
  }
  kd::train::lm_eval_result ev;
  REQUIRE(kd::train::evaluate_lm(t, {ids, begin, end}, 2, 9, 0, 0, 4, ev).ok());
  // Direct: logits of the same windows, cross_entropy summed, bytes of the predicted tokens.
  std::vector<std::int32_t> in, lab;
  std::int64_t bytes = 0;
  for (int w = 0; w < 3; ++w) {
    for (int j = 0; j < 9; ++j) {
      in.push_back(static_cast<std::int32_t>(ids[static_cast<std::size_t>(w * 9 + j)]));
      lab.push_back(static_cast<std::int32_t>(ids[static_cast<std::size_t>(w * 9 + j + 1)]));
    }
    bytes += end[static_cast<std::size_t>(w * 9 + 9)] - end[static_cast<std::size_t>(w * 9)];
  }
  km::forward_options fo;
  fo.training = false;
  REQUIRE(t.forward(in, 3, 9, fo).ok());
  kd::cross_entropy<kd::token_mean, kd::fp32> ce;
  kd::cross_entropy_result cr;
  REQUIRE(ce(kd::cpu, kd::matrix_view<const float>(t.logits(), 27, 97), lab, cr).ok());
  CHECK(ev.tokens == 27);
  CHECK(ev.bytes == bytes);
  CHECK(ev.loss == doctest::Approx(cr.ce).epsilon(1e-5));
  CHECK(ev.ppl == doctest::Approx(std::exp(cr.ce)).epsilon(1e-5));
  CHECK(ev.bits_per_byte == doctest::Approx(cr.ce * 27 / std::numbers::ln2 / static_cast<double>(bytes)).epsilon(1e-5));
  REQUIRE(ev.expert_shares.size() == step.moe_layers().size());
}

TEST_CASE("distill_step data parallel: one rank = no communicator, bit for bit; three ranks = the whole batch") {
  const auto b1 = make_batch(51), b2 = make_batch(52);
  auto params_of = [](const model_t& m) {
    return std::vector<float>(m.params(), m.params() + m.table().size());
  };
  // One rank (solo_communicator): the same bits as no communicator, over two steps.
  distill_run plain(1000);
  kd::solo_communicator solo;
  distill_run one(1000, 1, &solo);
  std::vector<kd::train::step_record> a, c;
  for (std::int64_t k = 1; k <= 2; ++k) {
    REQUIRE(plain.step.step(k == 1 ? b1 : b2, k).ok());
    REQUIRE(one.step.step(k == 1 ? b1 : b2, k).ok());
    REQUIRE(plain.step.flush(a).ok());
    REQUIRE(one.step.flush(c).ok());
    for (const char* name : {"lm", "z_loss", "kd", "feature", "route"}) {
      CAPTURE(name);
      CHECK(value(c[0], name) == value(a[0], name));
    }
  }
  CHECK(params_of(one.student) == params_of(plain.student));

  // Three ranks on threads, one row each, against one process on the three rows: the same losses and
  // gradients to float rounding, and every rank holds the same parameters after the update.
  distill_run whole(1000);
  REQUIRE(whole.step.step(b1, 1).ok());
  REQUIRE(whole.step.flush(a).ok());
  kd::thread_group group(3);
  std::vector<std::unique_ptr<distill_run>> ranks;
  for (int r = 0; r < 3; ++r) ranks.push_back(std::make_unique<distill_run>(1000, 1, &group.member(r)));
  std::vector<std::vector<kd::train::step_record>> recs(3);
  std::vector<kd::status> st(3);
  std::vector<std::thread> th;
  for (int r = 0; r < 3; ++r)
    th.emplace_back([&, r] {
      const auto ru = static_cast<std::size_t>(r);
      st[ru] = ranks[ru]->step.step(row_of(b1, r), 1);
      if (st[ru].ok()) st[ru] = ranks[ru]->step.flush(recs[ru]);
    });
  for (auto& t : th) t.join();
  for (int r = 0; r < 3; ++r) {
    const auto ru = static_cast<std::size_t>(r);
    REQUIRE_MESSAGE(st[ru].ok(), st[ru].message());
    for (const char* name : {"lm", "z_loss", "kd", "feature", "route"}) {
      CAPTURE(r);
      CAPTURE(name);
      CHECK(value(recs[ru][0], name) == doctest::Approx(value(a[0], name)).epsilon(1e-5));
    }
  }
  double d = 0, m = 0;
  for (std::size_t i = 0; i < whole.student.table().size(); ++i) {
    d = std::max(d, std::abs(static_cast<double>(ranks[0]->student.grads()[i]) - whole.student.grads()[i]));
    m = std::max(m, std::abs(static_cast<double>(whole.student.grads()[i])));
  }
  CHECK(d / m < 1e-5);
  CHECK(params_of(ranks[1]->student) == params_of(ranks[0]->student));
  CHECK(params_of(ranks[2]->student) == params_of(ranks[0]->student));

  // Small gradient buckets (started layer by layer during the backward, two micro-batches a rank) reduce
  // every element once, in rank order: the same bits as one reduction of the whole arena.
  auto run_group = [&](std::size_t bucket) {
    kd::thread_group g(3);
    std::vector<std::unique_ptr<distill_run>> rs;
    for (int r = 0; r < 3; ++r) rs.push_back(std::make_unique<distill_run>(1000, 1, &g.member(r), bucket));
    std::vector<std::thread> ts;
    std::vector<kd::status> ok(3);
    for (int r = 0; r < 3; ++r)
      ts.emplace_back([&, r] {
        const std::vector<kd::train::text_batch> two = {row_of(b2, r), row_of(b1, r)};
        std::vector<kd::train::step_record> out;
        auto& run = *rs[static_cast<std::size_t>(r)];
        ok[static_cast<std::size_t>(r)] = run.step.step(std::span<const kd::train::text_batch>(two), 1);
        if (ok[static_cast<std::size_t>(r)].ok()) ok[static_cast<std::size_t>(r)] = run.step.flush(out);
      });
    for (auto& t : ts) t.join();
    for (const auto& s : ok) REQUIRE_MESSAGE(s.ok(), s.message());
    return std::make_pair(params_of(rs[0]->student),
                          std::vector<float>(rs[0]->student.grads(), rs[0]->student.grads() + rs[0]->student.table().size()));
  };
  const auto one_bucket = run_group(std::size_t{1} << 30), many = run_group(1000);
  CHECK(many.first == one_bucket.first);
  CHECK(many.second == one_bucket.second);
}

TEST_CASE("teacher_step refuses a communicator (no data-parallel teacher training)") {
  cpu b;
  model_t t(b, km::make_arch(teacher_cfg()));
  REQUIRE(t.allocate(true).ok());
  kd::objective obj;
  kd::solo_communicator solo;
  kd::train::step_options o;
  o.comm = &solo;
  kd::train::teacher_step<model_t> ts;
  const kd::status s = ts.init(t, obj, o, adamw());
  CHECK(s.code() == kd::errc::invalid_argument);
  CHECK(kdtest::contains(s.message(), "data-parallel teacher"));
}
