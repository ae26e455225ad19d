// Tests for kd::vocab_map (kd/loss/vocab_map.hpp) and logit distillation across vocabularies through it.
#include <doctest/doctest.h>

#include <cmath>
#include <cstdint>
#include <numeric>
#include <span>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include <kd/kd.hpp>

#include "divergence_ref.hpp"
#include "test_util.hpp"

namespace {

using kd::index_t;
using P64 = kd::precision_set<kd::fp64, kd::fp64>;
using ids = std::vector<std::int32_t>;

ids to_ids(std::span<const std::int32_t> s) { return {s.begin(), s.end()}; }

}  // namespace

// =====================================================================================================
// Construction
// =====================================================================================================
TEST_CASE("vocab_map::from_tokens maps identical strings, skips padding and tokens missing on one side") {
  // Teacher: 5 real tokens + 3 padded rows; student: 4 real tokens + 2 padded rows.
  const std::vector<std::string> teacher{"a", "b", "c", "d", "e"};
  const std::vector<std::string> student{"c", "a", "x", "b"};
  kd::vocab_map m;
  REQUIRE(kd::vocab_map::from_tokens(teacher, student, 8, 6, m).ok());
  CHECK(m.teacher_vocab() == 8);
  CHECK(m.student_vocab() == 6);
  CHECK(m.size() == 3);
  CHECK_FALSE(m.empty());
  CHECK(to_ids(m.teacher_ids()) == ids{0, 1, 2});       // "a", "b", "c"; "d", "e" have no student string
  CHECK(to_ids(m.student_ids()) == ids{1, 3, 0});
  CHECK(to_ids(m.student_support()) == ids{0, 1, 3});  // "x" (2) has no teacher string; 4, 5 are padding
}

TEST_CASE("vocab_map::from_tokens: several teacher ids with one string map many-to-one") {
  const std::vector<std::string> teacher{"a", "b", "a"};
  const std::vector<std::string> student{"b", "a"};
  kd::vocab_map m;
  REQUIRE(kd::vocab_map::from_tokens(teacher, student, 3, 2, m).ok());
  CHECK(to_ids(m.teacher_ids()) == ids{0, 1, 2});
  CHECK(to_ids(m.student_ids()) == ids{1, 0, 1});
  CHECK(to_ids(m.student_support()) == ids{0, 1});
}

TEST_CASE("vocab_map::from_tokens rejects duplicate student strings and lists longer than the vocabulary") {
  kd::vocab_map m;
  const std::vector<std::string> teacher{"a", "b"};
  const std::vector<std::string> dup{"a", "b", "a"};
  const kd::status st = kd::vocab_map::from_tokens(teacher, dup, 2, 3, m);
  CHECK(st.code() == kd::errc::invalid_argument);
  CHECK(kdtest::contains(st.message(), "student vocabulary"));
  CHECK(kdtest::contains(st.message(), "id 2 twice"));

  const kd::status t_long = kd::vocab_map::from_tokens(teacher, teacher, 1, 2, m);
  CHECK(t_long.code() == kd::errc::shape_mismatch);
  CHECK(kdtest::contains(t_long.message(), "2 teacher tokens"));
  const kd::status s_long = kd::vocab_map::from_tokens(teacher, dup, 2, 2, m);
  CHECK(s_long.code() == kd::errc::shape_mismatch);
  CHECK(kdtest::contains(s_long.message(), "3 student tokens"));
  // No shared string: an empty map, which a loss then refuses (see below).
  const std::vector<std::string> other{"y", "z"};
  REQUIRE(kd::vocab_map::from_tokens(teacher, other, 2, 2, m).ok());
  CHECK(m.empty());
  CHECK(m.check_fits(2, 2).code() == kd::errc::empty_input);
}

TEST_CASE("vocab_map::from_pairs sorts by teacher id and rejects bad ids") {
  kd::vocab_map m;
  REQUIRE(kd::vocab_map::from_pairs({{4, 1}, {0, 2}, {2, 2}}, 5, 3, m).ok());
  CHECK(to_ids(m.teacher_ids()) == ids{0, 2, 4});
  CHECK(to_ids(m.student_ids()) == ids{2, 2, 1});
  CHECK(to_ids(m.student_support()) == ids{1, 2});
  CHECK(m.check_fits(5, 3).ok());

  SUBCASE("student id past the student vocabulary") {
    const kd::status st = kd::vocab_map::from_pairs({{0, 1}, {2, 5}}, 4, 5, m);
    CHECK(st.code() == kd::errc::out_of_range);
    CHECK(kdtest::contains(st.message(), "student id 5"));
    CHECK(kdtest::contains(st.message(), "teacher id 2"));
    CHECK(kdtest::contains(st.message(), "student vocabulary of 5"));
  }
  SUBCASE("negative student id") {
    const kd::status st = kd::vocab_map::from_pairs({{0, -1}}, 4, 5, m);
    CHECK(st.code() == kd::errc::out_of_range);
    CHECK(kdtest::contains(st.message(), "student id -1"));
  }
  SUBCASE("teacher id past the teacher vocabulary") {
    const kd::status st = kd::vocab_map::from_pairs({{4, 0}}, 4, 5, m);
    CHECK(st.code() == kd::errc::out_of_range);
    CHECK(kdtest::contains(st.message(), "teacher id 4"));
    CHECK(kdtest::contains(st.message(), "[0, 4)"));
  }
  SUBCASE("teacher id mapped twice") {
    const kd::status st = kd::vocab_map::from_pairs({{1, 0}, {3, 2}, {1, 4}}, 4, 5, m);
    CHECK(st.code() == kd::errc::invalid_argument);
    CHECK(kdtest::contains(st.message(), "teacher id 1 twice"));
    const kd::status same_pair = kd::vocab_map::from_pairs({{1, 0}, {1, 0}}, 4, 5, m);
    CHECK(same_pair.code() == kd::errc::invalid_argument);
  }
  SUBCASE("empty vocabularies") {
    CHECK(kd::vocab_map::from_pairs({}, 0, 5, m).code() == kd::errc::empty_input);
    CHECK(kd::vocab_map::from_pairs({}, 5, 0, m).code() == kd::errc::empty_input);
  }
  SUBCASE("a failed build leaves the output map alone") {
    CHECK_FALSE(kd::vocab_map::from_pairs({{9, 0}}, 4, 5, m).ok());
    CHECK(m.size() == 3);
    CHECK(m.teacher_vocab() == 5);
  }
}

TEST_CASE("vocab_map::contiguous_teacher: teacher ids 0..K-1 onto increasing student ids, and nothing else") {
  kd::vocab_map m;
  REQUIRE(kd::vocab_map::from_pairs({{2, 7}, {0, 1}, {1, 4}}, 5, 9, m).ok());
  CHECK(m.contiguous_teacher());  // slot j (student ids 1, 4, 7) reads teacher column j
  REQUIRE(kd::vocab_map::from_pairs({{0, 1}, {1, 0}}, 5, 9, m).ok());
  CHECK_FALSE(m.contiguous_teacher());  // student ids out of order
  REQUIRE(kd::vocab_map::from_pairs({{0, 1}, {2, 4}}, 5, 9, m).ok());
  CHECK_FALSE(m.contiguous_teacher());  // teacher id 1 skipped
  REQUIRE(kd::vocab_map::from_pairs({{0, 1}, {1, 1}}, 5, 9, m).ok());
  CHECK_FALSE(m.contiguous_teacher());  // many-to-one
  REQUIRE(kd::vocab_map::from_pairs({}, 5, 9, m).ok());
  CHECK_FALSE(m.contiguous_teacher());
}

TEST_CASE("vocab_map::compact_teacher: mapped teacher ids in student order, padded, contiguous when one to one") {
  kd::vocab_map m, c;
  ids rows;
  // One to one, teacher ids scattered against the student order.
  REQUIRE(kd::vocab_map::from_pairs({{9, 2}, {3, 7}, {12, 0}, {5, 4}}, 16, 8, m).ok());
  REQUIRE_FALSE(m.contiguous_teacher());
  REQUIRE(m.compact_teacher(64, c, rows).ok());
  CHECK(rows == ids{12, 9, 5, 3});  // student ids 0, 2, 4, 7
  CHECK(c.teacher_vocab() == 64);
  CHECK(c.student_vocab() == 8);
  CHECK(c.contiguous_teacher());
  CHECK(to_ids(c.teacher_ids()) == ids{0, 1, 2, 3});
  CHECK(to_ids(c.student_ids()) == ids{0, 2, 4, 7});
  CHECK(to_ids(c.student_support()) == to_ids(m.student_support()));
  CHECK(c.id() != m.id());
  REQUIRE(m.compact_teacher(1, c, rows).ok());
  CHECK(c.teacher_vocab() == 4);  // no padding
  REQUIRE(m.compact_teacher(3, c, rows).ok());
  CHECK(c.teacher_vocab() == 6);
  // Many to one: ties in the student order go by teacher id; not contiguous, its teacher columns in order.
  REQUIRE(kd::vocab_map::from_pairs({{10, 3}, {2, 5}, {7, 3}, {1, 0}, {4, 5}}, 11, 6, m).ok());
  REQUIRE(m.compact_teacher(4, c, rows).ok());
  CHECK(rows == ids{1, 7, 10, 2, 4});
  CHECK(c.teacher_vocab() == 8);
  CHECK_FALSE(c.contiguous_teacher());
  CHECK(to_ids(c.teacher_ids()) == ids{0, 1, 2, 3, 4});
  CHECK(to_ids(c.student_ids()) == ids{0, 3, 3, 5, 5});
  // Bad input: an empty map, a row multiple that is not positive; `out` and `rows` are left as they were.
  kd::vocab_map empty;
  REQUIRE(kd::vocab_map::from_pairs({}, 5, 9, empty).ok());
  const auto before = c.id();
  const kd::status e1 = empty.compact_teacher(64, c, rows), e2 = m.compact_teacher(0, c, rows);
  CHECK(e1.code() == kd::errc::empty_input);
  CHECK(kdtest::contains(e1.message(), "compact_teacher: the map maps no token"));
  CHECK(e2.code() == kd::errc::invalid_argument);
  CHECK(kdtest::contains(e2.message(), "row_multiple must be positive (got 0)"));
  CHECK(c.id() == before);
  CHECK(rows == ids{1, 7, 10, 2, 4});
}

// What compact_teacher is for: KD against a teacher head gathered to the compact rows (padding rows NaN:
// never read) with the compact map equals KD against the full head with the map, for a many-to-one map
// with scattered ids and ignored labels (fp64 CPU reference, so the two summation orders agree to rounding).
TEST_CASE_TEMPLATE("vocab_map::compact_teacher: linear_logit_kd on the compact teacher head equals the full head", D,
                   kd::forward_kl, kd::jsd, kd::reverse_kl) {
  const index_t n = 9, d = 5, dt = 6, sv = 13, tv = 23;
  kd::vocab_map m, c;
  REQUIRE(kd::vocab_map::from_pairs({{20, 3}, {1, 7}, {8, 3}, {15, 0}, {4, 12}, {11, 7}, {6, 9}, {19, 1}, {2, 10}}, tv, sv, m)
              .ok());
  ids rows;
  REQUIRE(m.compact_teacher(8, c, rows).ok());
  REQUIRE(c.teacher_vocab() == 16);
  auto g = kdtest::rng(2024);
  std::vector<double> h(n * d), w(sv * d), th(n * dt), tw(tv * dt);
  kdtest::fill_normal(h, g);
  kdtest::fill_normal(w, g);
  kdtest::fill_normal(th, g);
  kdtest::fill_normal(tw, g, 0.0, 2.0);
  std::vector<double> cw(static_cast<std::size_t>(c.teacher_vocab() * dt), std::nan(""));
  for (std::size_t k = 0; k < rows.size(); ++k)
    for (index_t j = 0; j < dt; ++j) cw[k * dt + static_cast<std::size_t>(j)] = tw[static_cast<std::size_t>(rows[k] * dt + j)];
  const std::vector<std::int32_t> labels{1, -100, 3, 12, 0, 9, -100, 7, 10};
  kd::linear_logit_kd<D, kd::token_mean, kd::precision_set<kd::fp64, kd::fp64, kd::fp64>> loss;
  loss.options.temperature = 2.0;
  loss.options.chunk_rows = 4;
  auto run = [&](const kd::vocab_map& map, const std::vector<double>& head, std::vector<double>& dh,
                 std::vector<double>& dw) {
    loss.options.map = &map;
    dh.assign(n * d, 0.0);
    dw.assign(sv * d, 0.0);
    kd::loss_result r;
    const kd::teacher_head<double> t{kd::matrix_view<const double>(th.data(), n, dt),
                                     kd::matrix_view<const double>(head.data(), map.teacher_vocab(), dt)};
    REQUIRE(loss(kd::cpu, kd::matrix_view<const double>(h.data(), n, d), kd::matrix_view<const double>(w.data(), sv, d), t,
                 labels, r, kd::matrix_view<double>(dh.data(), n, d), kd::matrix_view<double>(dw.data(), sv, d))
                .ok());
    return r;
  };
  std::vector<double> dh0, dw0, dh1, dw1;
  const kd::loss_result full = run(m, tw, dh0, dw0), compact = run(c, cw, dh1, dw1);
  CHECK(full.loss > 0.0);
  CHECK(compact.loss == doctest::Approx(full.loss).epsilon(1e-12));
  CHECK(compact.tokens == full.tokens);
  for (std::size_t i = 0; i < dh0.size(); ++i) CHECK(dh1[i] == doctest::Approx(dh0[i]).epsilon(1e-11));
  for (std::size_t i = 0; i < dw0.size(); ++i) CHECK(dw1[i] == doctest::Approx(dw0[i]).epsilon(1e-11));
}

TEST_CASE("vocab_map::check_fits names the side that does not match") {
  kd::vocab_map m;
  REQUIRE(kd::vocab_map::from_pairs({{0, 0}, {1, 2}}, 6, 4, m).ok());
  const kd::status t = m.check_fits(7, 4);
  CHECK(t.code() == kd::errc::shape_mismatch);
  CHECK(kdtest::contains(t.message(), "teacher logits have 7 columns"));
  CHECK(kdtest::contains(t.message(), "built for 6"));
  const kd::status s = m.check_fits(6, 3);
  CHECK(s.code() == kd::errc::shape_mismatch);
  CHECK(kdtest::contains(s.message(), "student logits have 3 columns"));
  CHECK(kdtest::contains(s.message(), "built for 4"));
}

// =====================================================================================================
// project_probabilities
// =====================================================================================================
TEST_CASE("vocab_map::project_probabilities sums many-to-one mass, renormalizes, zeroes the rest") {
  // Teacher 0 and 1 -> student 2; 3 -> 0; 4 -> 1; teacher 2 and 5 unmapped; student 3 and 4 get nothing.
  kd::vocab_map m;
  REQUIRE(kd::vocab_map::from_pairs({{0, 2}, {1, 2}, {3, 0}, {4, 1}}, 6, 5, m).ok());
  auto g = kdtest::rng(71);
  std::vector<double> tp = kdtest::uniform(6, g, 0.1, 1.0);
  const double z = std::accumulate(tp.begin(), tp.end(), 0.0);
  for (auto& v : tp) v /= z;

  std::vector<double> sp(5, 42.0);
  const double mass = m.project_probabilities<double>(tp, sp, false);
  const double expected_mass = tp[0] + tp[1] + tp[3] + tp[4];
  CHECK(mass == doctest::Approx(expected_mass).epsilon(1e-15));
  CHECK(sp[2] == doctest::Approx(tp[0] + tp[1]).epsilon(1e-15));
  CHECK(sp[0] == tp[3]);
  CHECK(sp[1] == tp[4]);
  CHECK(sp[3] == 0.0);
  CHECK(sp[4] == 0.0);

  std::vector<double> rn(5, 42.0);
  const double mass2 = m.project_probabilities<double>(tp, rn, true);
  CHECK(mass2 == mass);
  CHECK(rn[0] + rn[1] + rn[2] + rn[3] + rn[4] == doctest::Approx(1.0).epsilon(1e-15));
  for (int j : {0, 1, 2}) CHECK(rn[static_cast<std::size_t>(j)] == doctest::Approx(sp[static_cast<std::size_t>(j)] / mass).epsilon(1e-15));
  CHECK(rn[3] == 0.0);
  CHECK(rn[4] == 0.0);

  // float works too, and zero mass (nothing mapped has probability) is not divided by.
  std::vector<float> tf(6, 0.0f), sf(5, 1.0f);
  tf[2] = 1.0f;
  CHECK(m.project_probabilities<float>(tf, sf, true) == 0.0f);
  for (float v : sf) CHECK(v == 0.0f);
}

// =====================================================================================================
// logit_kd through a map
// =====================================================================================================
namespace {

// Teacher: 8 real tokens padded to 10; student: 7 real tokens padded to 9.
// Teacher 1 and 2 both map to student 0 (many-to-one), teacher 4 has no student string, student 4 has
// no teacher string. Support: {0, 1, 2, 3, 5, 6}.
constexpr index_t kTV = 10, kSV = 9, kN = 5;
const std::vector<std::pair<std::int32_t, std::int32_t>> kPairs{{0, 3}, {1, 0}, {2, 0}, {3, 5}, {5, 1}, {6, 6}, {7, 2}};

kd::vocab_map make_map() {
  kd::vocab_map m;
  const kd::status st = kd::vocab_map::from_pairs(kPairs, kTV, kSV, m);
  REQUIRE_MESSAGE(st.ok(), st.message());
  return m;
}

struct mapped_problem {
  std::vector<double> teacher, student;
  std::vector<std::int32_t> labels{3, kd::default_ignore_index, 0, 6, 1};
  explicit mapped_problem(std::uint64_t seed) {
    auto g = kdtest::rng(seed);
    teacher = kdtest::normal(static_cast<std::size_t>(kN * kTV), g, 0.0, 1.5);
    student = kdtest::normal(static_cast<std::size_t>(kN * kSV), g, 0.0, 1.5);
  }
  kd::matrix_view<const double> t() const { return {teacher.data(), kN, kTV}; }
  kd::matrix_view<const double> s() const { return {student.data(), kN, kSV}; }
};

template <class D>
double param_of(const kd::logit_kd_options& o) {
  if constexpr (std::is_same_v<D, kd::jsd>) return o.beta;
  if constexpr (std::is_same_v<D, kd::skew_kl>) return o.alpha;
  return 0.0;
}

// The loss by hand: teacher softmax over its 8 real tokens, projected (summed + renormalized) onto the
// student ids with project_probabilities, and student softmax over the support.
template <class D>
double mapped_loss_ref(const mapped_problem& pr, const kd::vocab_map& m, const kd::logit_kd_options& o) {
  const double temp = o.temperature;
  const auto support = m.student_support();
  double total = 0.0;
  index_t active = 0;
  for (index_t r = 0; r < kN; ++r) {
    if (pr.labels[static_cast<std::size_t>(r)] == o.ignore_index) continue;
    ++active;
    std::vector<double> tp(kTV, 0.0);
    double zt = 0.0;
    for (index_t c = 0; c < 8; ++c) zt += (tp[static_cast<std::size_t>(c)] = std::exp(pr.teacher[static_cast<std::size_t>(r * kTV + c)] / temp));
    for (auto& v : tp) v /= zt;
    std::vector<double> sp(kSV);
    (void)m.project_probabilities<double>(tp, sp, true);
    std::vector<double> p, q;
    double zs = 0.0;
    for (auto j : support) zs += std::exp(pr.student[static_cast<std::size_t>(r * kSV + j)] / temp);
    for (auto j : support) {
      p.push_back(sp[static_cast<std::size_t>(j)]);
      q.push_back(std::exp(pr.student[static_cast<std::size_t>(r * kSV + j)] / temp) / zs);
    }
    total += kdtest::divergence_ref<D>(p, q, param_of<D>(o));
  }
  return total * (o.scale_by_t2 ? temp * temp : 1.0) / static_cast<double>(active);
}

template <class D>
kd::loss_result run_mapped(const kd::logit_kd_options& o, const mapped_problem& pr, std::vector<double>* grad = nullptr) {
  kd::logit_kd<D, kd::token_mean, P64> loss;
  loss.options = o;
  kd::loss_result res;
  const kd::status st = grad != nullptr
                            ? loss(kd::cpu, pr.t(), pr.s(), pr.labels, res, kd::matrix_view<double>(grad->data(), kN, kSV))
                            : loss(kd::cpu, pr.t(), pr.s(), pr.labels, res);
  if (!st.ok()) FAIL(st.message());  // not an assertion per call: this runs inside finite-difference loops
  return res;
}

bool in_support(const kd::vocab_map& m, index_t c) {
  for (auto j : m.student_support())
    if (j == c) return true;
  return false;
}

}  // namespace

TEST_CASE("project_probabilities agrees with a direct gather") {
  // The hand reference above leans on project_probabilities; check it against an explicit sum once.
  const kd::vocab_map m = make_map();
  auto g = kdtest::rng(72);
  std::vector<double> tp = kdtest::uniform(kTV, g, 0.0, 1.0);
  tp[8] = tp[9] = 0.0;  // padding
  std::vector<double> sp(kSV);
  (void)m.project_probabilities<double>(tp, sp, true);
  const double mass = tp[0] + tp[1] + tp[2] + tp[3] + tp[5] + tp[6] + tp[7];
  const std::vector<double> expected{(tp[1] + tp[2]) / mass, tp[5] / mass, tp[7] / mass, tp[0] / mass, 0.0,
                                     tp[3] / mass, tp[6] / mass, 0.0, 0.0};
  CHECK(kdtest::rel_error(sp, expected) < 1e-15);
}

TEST_CASE_TEMPLATE("logit_kd with a vocab_map: loss by hand, zero gradient off the support, finite differences", D,
                   kd::forward_kl, kd::reverse_kl, kd::jsd, kd::skew_kl, kd::tvd) {
  const kd::vocab_map m = make_map();
  std::uint64_t seed = 80;
  for (double temp : {0.5, 1.0, 2.0, 4.0}) {
    for (bool t2 : {true, false}) {
      CAPTURE(temp);
      CAPTURE(t2);
      mapped_problem pr(++seed);
      kd::logit_kd_options o;
      o.map = &m;
      o.temperature = temp;
      o.scale_by_t2 = t2;
      o.beta = 0.3;
      o.alpha = 0.2;
      const double ref = mapped_loss_ref<D>(pr, m, o);
      std::vector<double> grad(pr.student.size(), NAN);
      const auto res = run_mapped<D>(o, pr, &grad);
      CHECK(kdtest::rel_error(res.loss, ref) < 1e-12);
      CHECK(res.tokens == 4);

      // Student columns outside the support (4: no teacher string; 7, 8: padding) and the ignored row
      // get exactly 0.
      bool zero_off_support = true;
      for (index_t r = 0; r < kN; ++r)
        for (index_t c = 0; c < kSV; ++c)
          if (!in_support(m, c) || r == 1) zero_off_support = zero_off_support && grad[static_cast<std::size_t>(r * kSV + c)] == 0.0;
      CHECK(zero_off_support);

      const auto fd = kdtest::numeric_gradient([&] { return run_mapped<D>(o, pr).loss; }, pr.student, 1e-5);
      CHECK(kdtest::rel_error(grad, fd) < 1e-6);
    }
  }
}

TEST_CASE("logit_kd with a vocab_map: teacher columns that are not mapped are never read") {
  const kd::vocab_map m = make_map();
  mapped_problem pr(90);
  kd::logit_kd_options o;
  o.map = &m;
  o.temperature = 2.0;
  std::vector<double> g1(pr.student.size()), g2(pr.student.size());
  const double l1 = run_mapped<kd::forward_kl>(o, pr, &g1).loss;
  SUBCASE("huge logits in padded teacher columns") {
    for (index_t r = 0; r < kN; ++r) {
      pr.teacher[static_cast<std::size_t>(r * kTV + 8)] = 1e30;
      pr.teacher[static_cast<std::size_t>(r * kTV + 9)] = 1e300;
    }
  }
  SUBCASE("a huge logit on the unmapped real teacher token (renormalized away)") {
    for (index_t r = 0; r < kN; ++r) pr.teacher[static_cast<std::size_t>(r * kTV + 4)] = 1e30;
  }
  SUBCASE("NaN and Inf in padded teacher columns") {
    pr.teacher[static_cast<std::size_t>(0 * kTV + 9)] = NAN;
    pr.teacher[static_cast<std::size_t>(2 * kTV + 8)] = INFINITY;
  }
  SUBCASE("student columns off the support") {
    for (index_t r = 0; r < kN; ++r) {
      pr.student[static_cast<std::size_t>(r * kSV + 4)] = 1e30;
      pr.student[static_cast<std::size_t>(r * kSV + 8)] = NAN;
    }
  }
  const double l2 = run_mapped<kd::forward_kl>(o, pr, &g2).loss;
  CHECK(l1 == l2);
  CHECK(g1 == g2);
}

TEST_CASE("logit_kd with a vocab_map: huge padded teacher logit in 16-bit and fp32 storage") {
  const kd::vocab_map m = make_map();
  mapped_problem pr(91);
  std::vector<kd::bfloat16> tb(pr.teacher.size()), sb(pr.student.size());
  for (std::size_t i = 0; i < tb.size(); ++i) tb[i] = kd::bfloat16(static_cast<float>(pr.teacher[i]));
  for (std::size_t i = 0; i < sb.size(); ++i) sb[i] = kd::bfloat16(static_cast<float>(pr.student[i]));
  kd::logit_kd<kd::jsd, kd::token_mean, kd::precision_set<kd::bf16, kd::bf16>> loss;
  loss.options.map = &m;
  kd::loss_result r1, r2;
  REQUIRE(loss(kd::cpu, kd::matrix_view<const kd::bfloat16>(tb.data(), kN, kTV),
               kd::matrix_view<const kd::bfloat16>(sb.data(), kN, kSV), pr.labels, r1)
              .ok());
  for (index_t r = 0; r < kN; ++r) tb[static_cast<std::size_t>(r * kTV + 9)] = kd::bfloat16(3e38f);
  REQUIRE(loss(kd::cpu, kd::matrix_view<const kd::bfloat16>(tb.data(), kN, kTV),
               kd::matrix_view<const kd::bfloat16>(sb.data(), kN, kSV), pr.labels, r2)
              .ok());
  CHECK(r1.loss == r2.loss);
  // ... and the bf16 loss is within 1e-2 of the fp64 one on the same rounded values.
  for (std::size_t i = 0; i < tb.size(); ++i) pr.teacher[i] = static_cast<float>(tb[i]);
  for (std::size_t i = 0; i < sb.size(); ++i) pr.student[i] = static_cast<float>(sb[i]);
  kd::logit_kd_options o;
  o.map = &m;
  CHECK(kdtest::rel_error(r1.loss, mapped_loss_ref<kd::jsd>(pr, m, o)) < 1e-2);
}

TEST_CASE("logit_kd with an identity map equals the shared-vocabulary loss with vocab padding") {
  // Identity over the 7 real tokens of a 9-column vocabulary == no map with vocab = 7.
  std::vector<std::pair<std::int32_t, std::int32_t>> pairs;
  for (std::int32_t j = 0; j < 7; ++j) pairs.emplace_back(j, j);
  kd::vocab_map m;
  REQUIRE(kd::vocab_map::from_pairs(pairs, 9, 9, m).ok());
  auto g = kdtest::rng(92);
  const std::vector<double> t = kdtest::normal(4 * 9, g), s = kdtest::normal(4 * 9, g);
  const std::vector<std::int32_t> labels{1, 2, kd::default_ignore_index, 6};
  kd::logit_kd<kd::reverse_kl, kd::token_mean, P64> a, b;
  a.options.map = &m;
  a.options.temperature = b.options.temperature = 1.7;
  b.options.vocab = 7;
  kd::loss_result ra, rb;
  std::vector<double> ga(s.size()), gb(s.size());
  REQUIRE(a(kd::cpu, kd::matrix_view<const double>(t.data(), 4, 9), kd::matrix_view<const double>(s.data(), 4, 9), labels,
            ra, kd::matrix_view<double>(ga.data(), 4, 9))
              .ok());
  REQUIRE(b(kd::cpu, kd::matrix_view<const double>(t.data(), 4, 9), kd::matrix_view<const double>(s.data(), 4, 9), labels,
            rb, kd::matrix_view<double>(gb.data(), 4, 9))
              .ok());
  CHECK(kdtest::rel_error(ra.loss, rb.loss) < 1e-13);
  CHECK(kdtest::rel_error(ga, gb) < 1e-13);
}

TEST_CASE("logit_kd with a vocab_map: bad input") {
  const kd::vocab_map m = make_map();
  mapped_problem pr(93);
  kd::logit_kd<kd::forward_kl, kd::token_mean, P64> loss;
  loss.options.map = &m;
  kd::loss_result res;
  std::vector<double> grad(pr.student.size());

  SUBCASE("teacher logits narrower than the map's teacher vocabulary") {
    const kd::status st = loss(kd::cpu, kd::matrix_view<const double>(pr.teacher.data(), kN, kTV - 1), pr.s(),
                               pr.labels, res);
    CHECK(st.code() == kd::errc::shape_mismatch);
    CHECK(kdtest::contains(st.message(), "teacher logits have 9 columns"));
    CHECK(kdtest::contains(st.message(), "vocab_map"));
  }
  SUBCASE("student logits wider than the map's student vocabulary") {
    std::vector<double> wide(static_cast<std::size_t>(kN * (kSV + 1)), 0.0);
    const kd::status st =
        loss(kd::cpu, pr.t(), kd::matrix_view<const double>(wide.data(), kN, kSV + 1), pr.labels, res);
    CHECK(st.code() == kd::errc::shape_mismatch);
    CHECK(kdtest::contains(st.message(), "student logits have 10 columns"));
    CHECK(kdtest::contains(st.message(), "built for 9"));
  }
  SUBCASE("an empty map") {
    kd::vocab_map empty;
    REQUIRE(kd::vocab_map::from_pairs({}, kTV, kSV, empty).ok());
    loss.options.map = &empty;
    const kd::status st = loss(kd::cpu, pr.t(), pr.s(), pr.labels, res);
    CHECK(st.code() == kd::errc::empty_input);
    CHECK(kdtest::contains(st.message(), "vocab_map"));
  }
  SUBCASE("a label outside the student vocabulary") {
    pr.labels[2] = static_cast<std::int32_t>(kSV);
    const kd::status st = loss(kd::cpu, pr.t(), pr.s(), pr.labels, res);
    CHECK(st.code() == kd::errc::out_of_range);
    CHECK(kdtest::contains(st.message(), "label 9"));
    CHECK(kdtest::contains(st.message(), "token 2"));
  }
  SUBCASE("NaN in a mapped teacher column is still caught, naming the column") {
    pr.teacher[static_cast<std::size_t>(3 * kTV + 5)] = NAN;
    const kd::status st = loss(kd::cpu, pr.t(), pr.s(), pr.labels, res, kd::matrix_view<double>(grad.data(), kN, kSV));
    CHECK(st.code() == kd::errc::non_finite);
    CHECK(kdtest::contains(st.message(), "teacher logits at token 3, column 5"));
    CHECK(kdtest::contains(st.message(), "'kd'"));
  }
  SUBCASE("Inf in a student column of the support is still caught") {
    pr.student[static_cast<std::size_t>(4 * kSV + 6)] = -INFINITY;
    const kd::status st = loss(kd::cpu, pr.t(), pr.s(), pr.labels, res, kd::matrix_view<double>(grad.data(), kN, kSV));
    CHECK(st.code() == kd::errc::non_finite);
    CHECK(kdtest::contains(st.message(), "student logits at token 4, column 6"));
  }
}
