// kd_lse_rounding: how much of a divergence's value float log-normalizers cost, before and after the
// corrections of session 9 (benchmarks/NOTES.md), in a float emulation of the CUDA kernels' arithmetic
// order against long double. No GPU: the kernels' exponentials (MUFU.EX2) are emulated by exp2f, their
// per-thread partial sums by runs of 128 entries.
//   - one GPU, forward and skew KL: the sweep subtracts float lse's (m + log2f(s)), the value is
//     sum p (dt - ds) in bits; the correction adds lse_gap_weight x the two lse's rounding gap
//     (kd::cuda::detail::lse_gap_bits);
//   - vocabulary-parallel pass 1 (forward KL): scaled logits rounded at their own size with a
//     first-column difference d0 (the old form) against per-row references in one FFMA (the new form);
//   - the gradient in fp32 (session 10): q' and p' from the float lse's against q and p scaled back by
//     each lse's rounding per row, as the fp32 kernels fold it (lse_fold: forward, reverse and skew KL).
// Rows: teacher ~ N(0, 2), student = 0.9 teacher + offset + N(0, 0.3) (close distributions, shifted
// logits). Prints the largest relative error of the value, and of the gradient (norm-relative, as the
// tests' rel_error), over a few rows per case.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <random>
#include <vector>

#include <kd/loss/divergence.hpp>

namespace {

using row = std::vector<float>;

// The natural log-sum-exp of x * it in long double.
long double lse_ld(const row& x, long double it) {
  long double m = -INFINITY, sum = 0;
  for (float v : x) m = std::max(m, v * it);
  for (float v : x) sum += std::exp(v * it - m);
  return m + std::log(sum);
}

// fp64-class reference (long double): D(p || q) for p = softmax(t / T), q = softmax(s / T).
enum class div { forward, reverse, skew };
long double reference(const row& t, const row& s, float temperature, div d, double a = 0.2) {
  const long double it = 1.0L / temperature;
  const long double lt = lse_ld(t, it), ls = lse_ld(s, it);
  long double out = 0;
  for (std::size_t j = 0; j < t.size(); ++j) {
    const long double lp = t[j] * it - lt, lq = s[j] * it - ls, p = std::exp(lp), q = std::exp(lq);
    if (d == div::forward) out += p * (lp - lq);
    if (d == div::reverse) out += q * (lq - lp);
    if (d == div::skew) out += p * (lp - std::log(a * p + (1 - a) * q));
  }
  return out;
}

// A float base-2 log-sum-exp as the kernels form it: max m of x k2, s = sum 2^(fma(x, k2, -m)).
struct float_lse {
  float m, s, log2s, value, round;  // value = m + log2s in float; round: its rounding (TwoSum)
};
float_lse lse_of(const row& x, float k2) {
  float m = -INFINITY;
  for (float v : x) m = std::max(m, v * k2);
  double total = 0;
  for (std::size_t i = 0; i < x.size(); i += 128) {
    float part = 0;
    for (std::size_t j = i; j < std::min(x.size(), i + 128); ++j) part += std::exp2(std::fma(x[j], k2, -m));
    total += part;
  }
  const float s = static_cast<float>(total), l = std::log2(s), v = m + l, bb = v - m;
  return {m, s, l, v, (m - (v - bb)) + (l - bb)};
}

// One GPU: the row's value in nats, plain and corrected.
void one_gpu(const row& t, const row& s, float temperature, div d, double a, double& plain, double& corrected) {
  const float k2 = 1.4426950408889634f / temperature, af = static_cast<float>(a), a1 = 1.f - af;
  const float_lse ft = lse_of(t, k2), fs = lse_of(s, k2);
  double sum = 0;
  for (std::size_t i = 0; i < t.size(); i += 128) {
    float part = 0;
    for (std::size_t j = i; j < std::min(t.size(), i + 128); ++j) {
      const float dt = std::fma(t[j], k2, -ft.value), ds = std::fma(s[j], k2, -fs.value), p = std::exp2(dt);
      part += d == div::forward ? p * (dt - ds) : p * (dt - std::log2(af * p + a1 * std::exp2(ds)));
    }
    sum += part;
  }
  const float gap = ((ft.log2s - fs.log2s) - std::log2(ft.s / fs.s)) - (ft.round - fs.round);
  const float w = d == div::forward ? kd::detail::divergence_math<kd::forward_kl, float>{}.lse_gap_weight()
                                    : kd::detail::divergence_math<kd::skew_kl, float>{af}.lse_gap_weight();
  plain = sum * 0.6931471805599453;
  corrected = (static_cast<float>(sum) + w * gap) * 0.6931471805599453;
}

// Vocabulary-parallel pass 1, forward KL, `ranks` slices of 256 threads each; old or new form.
double vocab_parallel(const row& t, const row& s, float temperature, int ranks, bool referenced) {
  const float it = 1.f / temperature, sc = it * 1.4426950408889634f;
  struct acc {
    float m = -INFINITY, s = 0, a = 0;
    void add(float y, float d) {
      if (y > m) {
        const float f = std::exp2(m - y);
        s *= f;
        a *= f;
        m = y;
      }
      const float e = std::exp2(y - m);
      s += e;
      a = std::fma(e, d, a);
    }
  };
  const std::size_t v = t.size();
  double gm_t = -INFINITY, gm_s = -INFINITY;
  struct part {
    double mt, st, ms, ss, a;
  };
  std::vector<part> parts;
  for (int k = 0; k < ranks; ++k) {
    const std::size_t c0 = v * k / ranks, c1 = v * (k + 1) / ranks;
    std::vector<acc> at(256), as(256);
    const float rt = referenced ? t[c0] * sc : 0.f, rs = referenced ? s[c0] * sc : 0.f;
    const float d0 = referenced ? 0.f : (t[c0] - s[c0]) * it;
    for (std::size_t c = c0; c < c1; ++c) {
      const std::size_t th = ((c - c0) / 8) % 256;
      float yt, ys, d;
      if (referenced) {
        yt = std::fma(t[c], sc, -rt);
        ys = std::fma(s[c], sc, -rs);
        d = yt - ys;  // bits
      } else {
        yt = t[c] * sc;
        ys = s[c] * sc;
        d = (t[c] - s[c]) * it - d0;  // nats
      }
      at[th].add(yt, d);
      as[th].add(ys, 0.f);
    }
    auto total = [](const std::vector<acc>& x, double& m, double& sum, double* a) {
      m = -INFINITY;
      for (const acc& e : x) m = std::max(m, static_cast<double>(e.m));
      sum = 0;
      double w = 0;
      for (const acc& e : x) {
        const double f = std::exp2(e.m - m);
        sum += e.s * f;
        w += e.a * f;
      }
      if (a != nullptr) *a = w;
    };
    part p{};
    total(at, p.mt, p.st, &p.a);
    total(as, p.ms, p.ss, nullptr);
    p.mt += rt;
    p.ms += rs;
    p.a += (referenced ? static_cast<double>(rt) - rs : static_cast<double>(d0)) * p.st;
    gm_t = std::max(gm_t, p.mt);
    gm_s = std::max(gm_s, p.ms);
    parts.push_back(p);
  }
  double st = 0, ss = 0, a = 0;
  for (const part& p : parts) {
    st += p.st * std::exp2(p.mt - gm_t);
    ss += p.ss * std::exp2(p.ms - gm_s);
    a += p.a * std::exp2(p.mt - gm_t);
  }
  const double ln2 = 0.6931471805599453, lt = gm_t + std::log2(st), ls = gm_s + std::log2(ss);
  return referenced ? (a / st - lt + ls) * ln2 : a / st - (lt - ls) * ln2;
}


// The gradient in float, one GPU (the sweeps' order): plain, as the kernels formed it before session 10
// (q' and p' from the float lse's, one factor), and with the rounding folded in per row (the fp32
// kernels since session 10): q = q' 2^(e_s), p = p' 2^(e_t), e = fl(m + log2f(s)) - (m + log2f(s)) by
// TwoSum, into the row's factors; reverse KL's row constant c (pass 1's KL, free of the lse's) takes
// the lse gap, since its sweep's ds - dt carry it. Returns the norm-relative error against long double
// (the tests' rel_error).
void gradient(const row& t, const row& s, float temperature, div d, double a, double& plain, double& folded) {
  const float k2 = 1.4426950408889634f / temperature, af = static_cast<float>(a), a1 = 1.f - af;
  const float_lse ft = lse_of(t, k2), fs = lse_of(s, k2);
  const long double it = 1.0L / temperature;
  const long double lt = lse_ld(t, it), ls = lse_ld(s, it), kl_rev = reference(t, s, temperature, div::reverse);
  // The reference gradient (per unit factor) and the row constants both forms need.
  const std::size_t n = t.size();
  std::vector<long double> gref(n);
  long double cref = 0;  // sum q dD/dq (skew KL)
  for (std::size_t j = 0; j < n; ++j) {
    const long double p = std::exp(t[j] * it - lt), q = std::exp(s[j] * it - ls);
    if (d == div::skew) cref += q * (-(1 - a) * p / (a * p + (1 - a) * q));
  }
  for (std::size_t j = 0; j < n; ++j) {
    const long double lp = t[j] * it - lt, lq = s[j] * it - ls, p = std::exp(lp), q = std::exp(lq);
    if (d == div::forward) gref[j] = q - p;
    else if (d == div::reverse) gref[j] = q * (lq - lp - kl_rev);
    else gref[j] = q * (-(1 - a) * p / (a * p + (1 - a) * q) - cref);
  }
  // Float: the row's excesses (bits) and gap.
  const float et = -ft.round, es = -fs.round;
  const float gap = ((ft.log2s - fs.log2s) - std::log2(ft.s / fs.s)) - (ft.round - fs.round);
  const float ln2 = 0.6931471805599453f;
  auto run = [&](bool fold) {
    const float fq = fold ? std::exp2(es) : 1.f, fp = fold ? std::exp2(et) : 1.f;
    // Row constants as the kernels have them: reverse KL's from pass 1 (here the exact KL in bits,
    // rounded to float), skew KL's from a float sweep of the same terms.
    float c = d == div::reverse ? static_cast<float>(kl_rev / 0.6931471805599453L) : 0.f;
    if (d == div::reverse && fold) c += gap;
    // Skew KL: m = a p + (1 - a) q and dq = -(1 - a) p / m from the folded p and q.
    const float ma = fold ? af * fp : af, mb = fold ? a1 * fq : a1, pa = fold ? a1 * fp : a1;
    if (d == div::skew) {
      double sum = 0;
      for (std::size_t j = 0; j < n; ++j) {
        const float dt = std::fma(t[j], k2, -ft.value), ds = std::fma(s[j], k2, -fs.value);
        const float pk = std::exp2(dt), qk = std::exp2(ds), m = ma * pk + mb * qk;
        sum += pk * qk / m;
      }
      c = -pa * static_cast<float>(sum) * fq;
    }
    long double num = 0, den = 0;
    for (std::size_t j = 0; j < n; ++j) {
      const float dt = std::fma(t[j], k2, -ft.value), ds = std::fma(s[j], k2, -fs.value);
      const float pk = std::exp2(dt), qk = std::exp2(ds);
      float g;
      if (d == div::forward) g = fold ? std::fma(fq, qk, -(fp * pk)) : qk - pk;
      else if (d == div::reverse) g = fq * qk * ((ds - dt - c) * ln2);
      else g = fq * qk * (-pa * pk / (ma * pk + mb * qk) - c);
      num += (g - gref[j]) * (g - gref[j]);
      den += gref[j] * gref[j];
    }
    return static_cast<double>(std::sqrt(num / den));
  };
  plain = run(false);
  folded = run(true);
}

}  // namespace

int main() {
  std::mt19937_64 g(2026);
  std::normal_distribution<double> teacher(0, 2), noise(0, 0.3);
  auto draw = [&](std::size_t v, double offset, row& t, row& s) {
    t.resize(v);
    s.resize(v);
    for (std::size_t j = 0; j < v; ++j) {
      t[j] = static_cast<float>(teacher(g));
      s[j] = static_cast<float>(0.9 * t[j] + offset + noise(g));
    }
  };
  // One table: rows of three paths over T, offsets and widths; case(t, s, T, e) raises e[2k], e[2k + 1]
  // (before / after of path k) over 3 draws.
  row t, s;
  auto table = [&](const char* header, const char* const (&names)[3], auto&& one_case) {
    std::printf("%s\n|---|---|---|---|---|---|\n", header);
    for (const float temperature : {1.f, 2.f})
      for (const double offset : {0.0, 30.0, 150.0, 400.0})
        for (const std::size_t v : {std::size_t{32000}, std::size_t{151936}}) {
          double e[6] = {};
          for (int rep = 0; rep < 3; ++rep) {
            draw(v, offset, t, s);
            one_case(temperature, e);
          }
          for (int k = 0; k < 3; ++k)
            std::printf("| %s | %.0f | %.0f | %zu | %.1e | %.1e |\n", names[k], temperature, offset, v, e[2 * k], e[2 * k + 1]);
        }
  };
  const char* const value_paths[3] = {"forward KL, one GPU", "skew KL (a = 0.2), one GPU", "forward KL, 2 vocab-parallel ranks"};
  table("| path | T | offset | columns | value's relative error: before | after |", value_paths, [&](float temperature, double* e) {
    const double rf = static_cast<double>(reference(t, s, temperature, div::forward));
    const double rk = static_cast<double>(reference(t, s, temperature, div::skew));
    double plain, corr;
    one_gpu(t, s, temperature, div::forward, 0.2, plain, corr);
    e[0] = std::max(e[0], std::abs(plain - rf) / rf);
    e[1] = std::max(e[1], std::abs(corr - rf) / rf);
    one_gpu(t, s, temperature, div::skew, 0.2, plain, corr);
    e[2] = std::max(e[2], std::abs(plain - rk) / rk);
    e[3] = std::max(e[3], std::abs(corr - rk) / rk);
    e[4] = std::max(e[4], std::abs(vocab_parallel(t, s, temperature, 2, false) - rf) / rf);
    e[5] = std::max(e[5], std::abs(vocab_parallel(t, s, temperature, 2, true) - rf) / rf);
  });
  std::printf("\n");
  const char* const grad_paths[3] = {"forward KL", "reverse KL", "skew KL (a = 0.2)"};
  table("| gradient | T | offset | columns | norm-relative error: plain | folded |", grad_paths, [&](float temperature, double* e) {
    const enum div kinds[3] = {div::forward, div::reverse, div::skew};
    for (int k = 0; k < 3; ++k) {
      double plain, folded;
      gradient(t, s, temperature, kinds[k], 0.2, plain, folded);
      e[2 * k] = std::max(e[2 * k], plain);
      e[2 * k + 1] = std::max(e[2 * k + 1], folded);
    }
  });
  return 0;
}
