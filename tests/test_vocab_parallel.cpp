// kd::communicator (kd/core/comm.hpp) and the vocabulary-parallel losses (kd/loss/vocab_parallel.hpp):
//  - thread_group collectives: sums in rank order, max, host counts, broadcast; a rank that never
//    arrives times out with its number named, and the group then fails every later collective;
//  - vocab_parallel_kd / vocab_parallel_cross_entropy on 1 slice (solo_communicator) and on 2-4 uneven
//    slices (ranks on threads) equal kd::logit_kd / kd::cross_entropy on the whole rows (fp64), for every
//    divergence, padding columns on the last rank, ignored rows, global_tokens and accumulation;
//  - a call that one rank rejects (a shape, a NaN in its slice) is rejected on every rank, none hangs.
#include <doctest/doctest.h>

#include <chrono>
#include <cmath>
#include <cstdint>
#include <functional>
#include <string>
#include <thread>
#include <type_traits>
#include <vector>

#include <kd/kd.hpp>
#include <kd/core/comm.hpp>
#include <kd/loss/vocab_parallel.hpp>

#include "test_util.hpp"

namespace {

using kd::index_t;
using P64 = kd::precision_set<kd::fp64, kd::fp64>;
constexpr std::int32_t kIgnore = kd::default_ignore_index;

// Runs fn(rank, comm) on `ranks` threads of one group; returns each rank's status.
std::vector<kd::status> on_ranks(int ranks, const std::function<kd::status(int, kd::communicator&)>& fn,
                                 std::chrono::milliseconds timeout = std::chrono::seconds(20)) {
  kd::thread_group g(ranks, timeout);
  std::vector<kd::status> out(static_cast<std::size_t>(ranks));
  std::vector<std::thread> th;
  for (int r = 0; r < ranks; ++r) th.emplace_back([&, r] { out[static_cast<std::size_t>(r)] = fn(r, g.member(r)); });
  for (auto& t : th) t.join();
  return out;
}

// Column boundaries of `ranks` uneven slices of `cols` columns.
std::vector<index_t> cuts(index_t cols, int ranks) {
  std::vector<index_t> c{0};
  for (int r = 1; r < ranks; ++r) c.push_back(cols * r / ranks + (r % 2 == 0 ? 3 : -2));
  c.push_back(cols);
  return c;
}

double max_abs_diff(const std::vector<double>& a, const std::vector<double>& b) {
  double d = 0;
  for (std::size_t i = 0; i < a.size(); ++i) d = std::max(d, std::abs(a[i] - b[i]));
  return d;
}

struct rows {
  index_t n = 0, cols = 0;
  std::vector<double> t, s;
  std::vector<std::int32_t> labels;
};

rows make_rows(std::uint64_t seed, index_t n, index_t cols, index_t real) {
  auto g = kdtest::rng(seed);
  rows r;
  r.n = n;
  r.cols = cols;
  r.t = kdtest::normal(static_cast<std::size_t>(n * cols), g, 0.0, 2.0);
  r.s = kdtest::normal(static_cast<std::size_t>(n * cols), g, 0.0, 2.0);
  std::uniform_int_distribution<std::int32_t> lab(0, static_cast<std::int32_t>(real - 1));
  for (index_t i = 0; i < n; ++i) r.labels.push_back(i % 3 == 1 ? kIgnore : lab(g));
  return r;
}

// The whole-row loss and gradient, then every slice count: same loss, same gradient columns.
template <class D>
void check_kd_slices(double temperature, bool accumulate, index_t global_tokens) {
  const index_t n = 7, cols = 103, real = 97;
  const rows in = make_rows(11, n, cols, real);
  kd::logit_kd<D, kd::token_mean, P64> loss;
  loss.options.temperature = temperature;
  loss.options.vocab = real;
  loss.options.grad_scale = 1.5;
  loss.options.beta = 0.3;
  loss.options.alpha = 0.2;
  loss.options.accumulate_grad = accumulate;
  loss.options.global_tokens = global_tokens;
  const std::vector<double> g0(static_cast<std::size_t>(n * cols), 0.25);
  std::vector<double> ref_grad = g0;
  kd::loss_result ref;
  REQUIRE(loss(kd::cpu, kd::matrix_view<const double>(in.t.data(), n, cols), kd::matrix_view<const double>(in.s.data(), n, cols),
               in.labels, ref, kd::matrix_view<double>(ref_grad.data(), n, cols))
              .ok());
  for (int ranks : {1, 2, 3, 4}) {
    CAPTURE(ranks);
    const auto c = cuts(cols, ranks);
    std::vector<double> grad = g0;
    std::vector<kd::loss_result> res(static_cast<std::size_t>(ranks));
    const auto st = on_ranks(ranks, [&](int r, kd::communicator& comm) {
      const index_t a = c[static_cast<std::size_t>(r)], w = c[static_cast<std::size_t>(r) + 1] - a;
      return kd::vocab_parallel_kd(kd::cpu, loss, comm, kd::vocab_slice{a, cols},
                                   kd::matrix_view<const double>(in.t.data() + a, n, w, cols),
                                   kd::matrix_view<const double>(in.s.data() + a, n, w, cols), in.labels,
                                   res[static_cast<std::size_t>(r)], kd::matrix_view<double>(grad.data() + a, n, w, cols));
    });
    for (int r = 0; r < ranks; ++r) {
      REQUIRE_MESSAGE(st[static_cast<std::size_t>(r)].ok(), st[static_cast<std::size_t>(r)].message());
      CHECK(res[static_cast<std::size_t>(r)].loss == doctest::Approx(ref.loss).epsilon(1e-12));
      CHECK(res[static_cast<std::size_t>(r)].tokens == ref.tokens);
    }
    CHECK(max_abs_diff(grad, ref_grad) < 1e-13);
  }
}

}  // namespace

TEST_CASE("thread_group: sums in rank order, max, host counts and broadcast on every rank") {
  const int R = 4;
  std::vector<std::vector<double>> got(R);
  std::vector<std::int64_t> counts(R), flags(R);
  std::vector<std::string> words(R);
  const auto st = on_ranks(R, [&](int r, kd::communicator& c) -> kd::status {
    CHECK(c.size() == R);
    CHECK(c.rank() == r);
    std::vector<double> v{1.0 + r, 0.1 * r, -r * 1.0};
    KD_TRY(c.all_reduce(v.data(), 2, kd::reduce_op::sum));  // the last element stays as it is
    std::vector<float> m{static_cast<float>(r), static_cast<float>(-r)};
    KD_TRY(c.all_reduce(m.data(), m.size(), kd::reduce_op::max));
    v.push_back(m[0]);
    v.push_back(m[1]);
    got[static_cast<std::size_t>(r)] = v;
    std::int64_t n = 10 * (r + 1);
    KD_TRY(c.all_reduce_host(&n, 1, kd::reduce_op::sum));
    counts[static_cast<std::size_t>(r)] = n;
    char word[6] = {'r', 'a', 'n', 'k', static_cast<char>('0' + r), 0};
    KD_TRY(c.broadcast_host(word, sizeof word, 2));
    words[static_cast<std::size_t>(r)] = word;
    return c.barrier();
  });
  for (int r = 0; r < R; ++r) {
    REQUIRE(st[static_cast<std::size_t>(r)].ok());
    const auto& v = got[static_cast<std::size_t>(r)];
    CHECK(v[0] == 1.0 + 2.0 + 3.0 + 4.0);
    CHECK(v[1] == ((0.0 + 0.1) + 0.2) + 0.30000000000000004);  // rank order: the same bits on every rank
    CHECK(v[2] == -r * 1.0);
    CHECK(v[3] == 3.0f);
    CHECK(v[4] == 0.0f);
    CHECK(counts[static_cast<std::size_t>(r)] == 100);
    CHECK(words[static_cast<std::size_t>(r)] == "rank2");
  }
  kd::solo_communicator solo;
  double x = 2.5;
  CHECK(solo.all_reduce(&x, 1, kd::reduce_op::sum).ok());
  CHECK(x == 2.5);
  CHECK_FALSE(solo.broadcast_host(&x, sizeof x, 1).ok());
}

TEST_CASE("thread_group: a rank that never arrives times out, named, and the group fails after") {
  const auto st = on_ranks(
      3,
      [&](int r, kd::communicator& c) -> kd::status {
        if (r == 1) return {};  // rank 1 skips the collective
        double v = 1;
        kd::status s = c.all_reduce(&v, 1, kd::reduce_op::sum);
        if (s.ok()) return {kd::errc::invalid_argument, "the collective returned without rank 1"};
        const kd::status again = c.barrier();  // failed group: at once
        if (again.ok()) return {kd::errc::invalid_argument, "a failed group ran a collective"};
        return s;
      },
      std::chrono::milliseconds(300));
  CHECK(st[1].ok());
  for (int r : {0, 2}) {
    CHECK(st[static_cast<std::size_t>(r)].code() == kd::errc::backend_error);
    const std::string m = st[static_cast<std::size_t>(r)].message();
    CHECK((kdtest::contains(m, "waiting for rank(s) 1") || kdtest::contains(m, "the group failed")));
  }
}

TEST_CASE("thread_group: ranks that disagree on a collective are told so") {
  const auto st = on_ranks(2, [&](int r, kd::communicator& c) -> kd::status {
    std::vector<double> v(static_cast<std::size_t>(2 + r), 1.0);
    return c.all_reduce(v.data(), v.size(), kd::reduce_op::sum);
  });
  for (const auto& s : st) {
    CHECK_FALSE(s.ok());
    CHECK(kdtest::contains(s.message(), "disagree"));
  }
}

TEST_CASE_TEMPLATE("vocab_parallel_kd on 1-4 slices equals logit_kd on whole rows", D, kd::forward_kl, kd::reverse_kl,
                   kd::jsd, kd::skew_kl, kd::tvd) {
  check_kd_slices<D>(2.0, false, 0);
  check_kd_slices<D>(0.5, true, 20);
}

// In float, close distributions and shifted logits: the value and the gradient within a few 1e-6 of the
// fp64 whole-row values on every slice count (each lse's float rounding taken back per row, as in
// kd::logit_kd: kd::detail::split_lse, divergence_math::log_shift).
TEST_CASE_TEMPLATE("vocab_parallel_kd in fp32 on 1-4 slices: close distributions, shifted logits", D, kd::forward_kl,
                   kd::reverse_kl, kd::skew_kl, kd::jsd) {
  const index_t n = 3, cols = 20011;
  auto g = kdtest::rng(17);
  constexpr bool kl = std::is_same_v<D, kd::forward_kl> || std::is_same_v<D, kd::reverse_kl>;
  for (const double offset : {30.0, -150.0, 400.0}) {
    CAPTURE(offset);
    const auto pair = kdtest::close_pair(static_cast<std::size_t>(n * cols), g, offset);
    const std::vector<float> t(pair.teacher.begin(), pair.teacher.end()), s(pair.student.begin(), pair.student.end());
    const auto t64 = kdtest::to_doubles(t), s64 = kdtest::to_doubles(s);
    kd::logit_kd<D, kd::token_mean, P64> ref_loss;
    ref_loss.options.temperature = 2.0;
    ref_loss.options.alpha = 0.2;
    ref_loss.options.beta = 0.3;
    kd::loss_result ref;
    std::vector<double> ref_grad(t64.size());
    REQUIRE(ref_loss(kd::cpu, kd::matrix_view<const double>(t64.data(), n, cols),
                     kd::matrix_view<const double>(s64.data(), n, cols), {}, ref,
                     kd::matrix_view<double>(ref_grad.data(), n, cols))
                .ok());
    kd::logit_kd<D, kd::token_mean, kd::precision_set<kd::fp32, kd::fp32>> loss;
    loss.options = ref_loss.options;
    for (int ranks : {1, 2, 4}) {
      CAPTURE(ranks);
      const auto c = cuts(cols, ranks);
      std::vector<kd::loss_result> res(static_cast<std::size_t>(ranks));
      std::vector<float> grad(t.size(), NAN);
      const auto st = on_ranks(ranks, [&](int r, kd::communicator& comm) {
        const index_t a = c[static_cast<std::size_t>(r)], w = c[static_cast<std::size_t>(r) + 1] - a;
        return kd::vocab_parallel_kd(kd::cpu, loss, comm, kd::vocab_slice{a, cols},
                                     kd::matrix_view<const float>(t.data() + a, n, w, cols),
                                     kd::matrix_view<const float>(s.data() + a, n, w, cols), {},
                                     res[static_cast<std::size_t>(r)], kd::matrix_view<float>(grad.data() + a, n, w, cols));
      });
      for (int r = 0; r < ranks; ++r) {
        REQUIRE_MESSAGE(st[static_cast<std::size_t>(r)].ok(), st[static_cast<std::size_t>(r)].message());
        CHECK(res[static_cast<std::size_t>(r)].loss == doctest::Approx(ref.loss).epsilon(kl ? 5e-7 : 1e-5));
      }
      CHECK(kdtest::rel_error(grad, ref_grad) < 5e-6);
    }
  }
}

TEST_CASE("vocab_parallel_cross_entropy on 1-4 slices equals cross_entropy (with z-loss) on whole rows") {
  const index_t n = 9, cols = 131, real = 120;
  const rows in = make_rows(5, n, cols, real);
  kd::cross_entropy<kd::token_mean, kd::fp64> ce;
  ce.options.vocab = real;
  ce.options.z_loss_weight = 1e-2;
  ce.options.grad_scale = 0.7;
  std::vector<double> ref_grad(static_cast<std::size_t>(n * cols), 9.0);
  kd::cross_entropy_result ref;
  REQUIRE(ce(kd::cpu, kd::matrix_view<const double>(in.s.data(), n, cols), in.labels, ref,
             kd::matrix_view<double>(ref_grad.data(), n, cols))
              .ok());
  for (int ranks : {1, 2, 3, 4}) {
    CAPTURE(ranks);
    const auto c = cuts(cols, ranks);
    std::vector<double> grad(static_cast<std::size_t>(n * cols), 9.0);  // every column must be written
    std::vector<kd::cross_entropy_result> res(static_cast<std::size_t>(ranks));
    const auto st = on_ranks(ranks, [&](int r, kd::communicator& comm) {
      const index_t a = c[static_cast<std::size_t>(r)], w = c[static_cast<std::size_t>(r) + 1] - a;
      return kd::vocab_parallel_cross_entropy(kd::cpu, ce, comm, kd::vocab_slice{a, cols},
                                              kd::matrix_view<const double>(in.s.data() + a, n, w, cols), in.labels,
                                              res[static_cast<std::size_t>(r)],
                                              kd::matrix_view<double>(grad.data() + a, n, w, cols));
    });
    for (int r = 0; r < ranks; ++r) {
      REQUIRE_MESSAGE(st[static_cast<std::size_t>(r)].ok(), st[static_cast<std::size_t>(r)].message());
      CHECK(res[static_cast<std::size_t>(r)].ce == doctest::Approx(ref.ce).epsilon(1e-12));
      CHECK(res[static_cast<std::size_t>(r)].z_loss == doctest::Approx(ref.z_loss).epsilon(1e-12));
    }
    CHECK(max_abs_diff(grad, ref_grad) < 1e-13);
  }
}

TEST_CASE("vocab-parallel losses: a call one rank rejects fails on every rank, naming the rank") {
  const index_t n = 4, cols = 40;
  rows in = make_rows(3, n, cols, cols);
  kd::logit_kd<kd::forward_kl, kd::token_mean, P64> loss;
  loss.options.temperature = 2.0;
  const auto c = cuts(cols, 3);
  auto run = [&](const std::function<kd::index_t(int)>& width_of) {
    std::vector<double> grad(static_cast<std::size_t>(n * cols));
    return on_ranks(3, [&](int r, kd::communicator& comm) {
      kd::loss_result out;
      const index_t a = c[static_cast<std::size_t>(r)], w = width_of(r);
      return kd::vocab_parallel_kd(kd::cpu, loss, comm, kd::vocab_slice{a, cols},
                                   kd::matrix_view<const double>(in.t.data() + a, n, w, cols),
                                   kd::matrix_view<const double>(in.s.data() + a, n, w, cols), in.labels, out,
                                   kd::matrix_view<double>(grad.data() + a, n, w, cols));
    });
  };
  auto width = [&](int r) { return c[static_cast<std::size_t>(r) + 1] - c[static_cast<std::size_t>(r)]; };
  SUBCASE("rank 2's slice runs past the vocabulary") {
    const auto st = run([&](int r) { return r == 2 ? width(r) + 1 : width(r); });
    CHECK(st[2].code() == kd::errc::out_of_range);
    for (int r : {0, 1}) CHECK(kdtest::contains(st[static_cast<std::size_t>(r)].message(), "rank 2 rejected"));
  }
  SUBCASE("a NaN in rank 1's teacher slice") {
    in.t[static_cast<std::size_t>(2 * cols + c[1] + 1)] = std::nan("");
    const auto st = run(width);
    CHECK(st[1].code() == kd::errc::non_finite);
    CHECK(kdtest::contains(st[1].message(), "teacher logits at token 2"));
    CHECK(kdtest::contains(st[1].message(), "rank 1"));
    for (int r : {0, 2}) {
      CHECK_FALSE(st[static_cast<std::size_t>(r)].ok());
      CHECK(kdtest::contains(st[static_cast<std::size_t>(r)].message(), "rank 1 rejected"));
    }
  }
  SUBCASE("a vocab_map cannot be split") {
    kd::vocab_map m;
    REQUIRE(kd::vocab_map::from_pairs({{0, 0}, {1, 1}}, cols, cols, m).ok());
    loss.options.map = &m;
    const auto st = run(width);
    for (const auto& s : st) CHECK_FALSE(s.ok());
    CHECK(kdtest::contains(st[0].message(), "cannot be split"));
  }
}
