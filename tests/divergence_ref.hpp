// An independent, deliberately plain double-precision implementation of kd's divergences (the
// conventions of kd/loss/divergence.hpp), written without kd's code, for tests to compare against.
#pragma once

#include <cmath>
#include <type_traits>
#include <vector>

#include <kd/loss/divergence.hpp>

namespace kdtest {

template <class D>
double divergence_ref(const std::vector<double>& p, const std::vector<double>& q, double param) {
  double d = 0.0;
  for (std::size_t j = 0; j < p.size(); ++j) {
    const double pj = p[j], qj = q[j];
    if constexpr (std::is_same_v<D, kd::forward_kl>) {
      if (pj > 0) d += pj * std::log(pj / qj);
    } else if constexpr (std::is_same_v<D, kd::reverse_kl>) {
      if (qj > 0) d += qj * std::log(qj / pj);
    } else if constexpr (std::is_same_v<D, kd::jsd>) {
      const double m = param * pj + (1 - param) * qj;
      if (pj > 0) d += param * pj * std::log(pj / m);
      if (qj > 0) d += (1 - param) * qj * std::log(qj / m);
    } else if constexpr (std::is_same_v<D, kd::skew_kl>) {
      if (pj > 0) d += pj * std::log(pj / (param * pj + (1 - param) * qj));
    } else {
      d += 0.5 * std::abs(pj - qj);
    }
  }
  return d;
}

}  // namespace kdtest
