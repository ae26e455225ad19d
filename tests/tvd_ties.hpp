// tests/tvd_ties.hpp: where TVD's gradient may legitimately differ between a float backend and the fp64
// reference. TVD's gradient is a sign of p - q: where p_j and q_j agree to float rounding, the two may
// take different signs, and the gradient moves by up to T q_j / norm (entry j) and T q_k q_j / norm (every
// other entry k). Tests redraw such inputs (the loss matrix, tests/loss_matrix.hpp), move the student's
// logits away from the ties (test_cuda_losses: at 10^5 entries and more nearly every draw has one within
// 3e-5), or widen the gradient tolerance by the largest q_j found.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <optional>
#include <vector>

#include <kd/kd.hpp>

namespace kdtest {

// An entry of the student's gradient whose p_j and q_j are within `rel` of a tie: its index in the
// n x s_cols student, q_j, and the side q_j sits on (+1: q_j >= p_j).
struct tvd_tie {
  std::size_t index;
  double q;
  int side;
};

// Every entry within `rel` of a tie of p_j and q_j, for a logit_kd call with options o (any vocabulary
// map, padding, labels) on n rows of t_cols teacher and s_cols student columns. p and q come from two fp64
// forward-KL gradients, (q - p) / (T divisor) x loss scale and, against a uniform student (zero logits:
// q = 1 / k on the support), (1 / k - p) / (T divisor) x loss scale. Entries with p = q = 0 (logits
// masked on both sides) are no tie: both backends take the sign of 0 there. Empty when the reference
// rejects the call.
template <class R>
std::optional<std::vector<tvd_tie>> tvd_near_ties(const kd::logit_kd_options& o, kd::index_t n, kd::index_t t_cols,
                                                  kd::index_t s_cols, const std::vector<double>& t64,
                                                  const std::vector<double>& s64, const std::vector<std::int32_t>& labels,
                                                  double rel) {
  kd::logit_kd<kd::forward_kl, R, kd::precision_set<kd::fp64, kd::fp64>> fkl;
  fkl.options = o;
  fkl.options.accumulate_grad = false;
  fkl.options.grad_scale = 1;
  const std::vector<double> zeros(s64.size(), 0.0);
  std::vector<double> g(s64.size()), gu(s64.size());
  kd::loss_result r;
  auto run = [&](const std::vector<double>& student, std::vector<double>& grad) {
    return fkl(kd::cpu, kd::matrix_view<const double>(t64.data(), n, t_cols),
               kd::matrix_view<const double>(student.data(), n, s_cols), labels, r,
               kd::matrix_view<double>(grad.data(), n, s_cols))
        .ok();
  };
  if (!run(s64, g) || !run(zeros, gu)) return std::nullopt;
  // dL/dz = grad_scale * loss_scale / T * (q - p) / divisor, loss_scale = T^2 or 1.
  const double f = o.scale_by_t2 ? r.normalizer / o.temperature : r.normalizer * o.temperature;
  const double k = o.map ? static_cast<double>(o.map->student_support().size())
                         : static_cast<double>(o.vocab > 0 ? o.vocab : s_cols);
  // p recovered as 1 / k - gu f carries a rounding of ~1e-16 / k: below 1e-9 / k both are zero.
  const double zero = 1e-9 / k;
  std::vector<tvd_tie> ties;
  for (std::size_t i = 0; i < g.size(); ++i) {
    if (gu[i] == 0 && g[i] == 0) continue;  // off the support or an ignored row
    const double p = 1.0 / k - gu[i] * f, q = p + g[i] * f;
    if (std::max(p, q) < zero) continue;
    if (std::abs(q - p) < rel * std::max(p, q)) ties.push_back({i, q, q >= p ? 1 : -1});
  }
  return ties;
}

// The largest q_j among the entries within `rel` of a tie (0 if none); empty when the reference rejects
// the call.
template <class R>
std::optional<double> tvd_tie_q(const kd::logit_kd_options& o, kd::index_t n, kd::index_t t_cols, kd::index_t s_cols,
                                const std::vector<double>& t64, const std::vector<double>& s64,
                                const std::vector<std::int32_t>& labels, double rel) {
  const auto ties = tvd_near_ties<R>(o, n, t_cols, s_cols, t64, s64, labels, rel);
  if (!ties) return std::nullopt;
  double worst = 0;
  for (const auto& t : *ties) worst = std::max(worst, t.q);
  return worst;
}

// Moves student logit `x` (storage T) away from a tie on `side` (+1 raises q_j), by at least 1e-3 and
// at least one step of T: q_j then moves by ~5e-4 / T relative, far past float rounding.
template <class T>
T nudge_from_tie(T x, int side) {
  const double y = kd::load_as<double>(x);
  for (double s = 1e-3; s < 1e30; s *= 2) {
    const T r = kd::store_as<T>(static_cast<float>(y + side * s));
    if (kd::load_as<double>(r) != y) return r;
  }
  return x;
}

}  // namespace kdtest
