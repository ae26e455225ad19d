// kd/loss/attention.hpp: attention-map transfer, with layer and head maps for unequal depths/widths.
//
// Inputs are pre-softmax attention scores, [batch * heads, T, T] (query rows, key columns). With a
// causal mask, row i covers keys 0..i; entries above the diagonal are never read (masked scores may be
// -inf there). For each student head h the target is the teacher's maps of the
// heads head_map[h] (averaged as probabilities for softmax_kl, as raw scores for none):
//   softmax_kl  per row: KL(mean_{g in map(h)} softmax(t_g / T) || softmax(s_h / T)) * T^2, mean over
//               batch * student heads * rows;  dL/ds = T (q - p) / rows.
//   none        per row: sum_k (s_k - mean_g t_gk)^2, mean over rows (the seed's scale).
// Which layers are compared is the caller's loop over a layer_map (student layer, teacher layer).
#pragma once

#include <algorithm>
#include <cmath>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include <Eigen/Core>

#include <kd/loss/common.hpp>
#include <kd/policy/backend.hpp>
#include <kd/policy/normalization.hpp>
#include <kd/policy/precision.hpp>

namespace kd {

// Pairs (student layer, teacher layer). uniform() spaces min(Ls, Lt) pairs evenly over the deeper
// model and always pairs the two last layers: student 30 / teacher 24 pairs teacher j with student
// round((j + 1) * 30 / 24) - 1.
struct layer_map {
  std::vector<std::pair<int, int>> pairs;

  static status uniform(int student_layers, int teacher_layers, layer_map& out) {
    if (student_layers <= 0 || teacher_layers <= 0)
      return {errc::invalid_argument, "layer_map needs positive layer counts"};
    layer_map m;
    const bool student_deeper = student_layers >= teacher_layers;
    const int shallow = student_deeper ? teacher_layers : student_layers;
    const int deep = student_deeper ? student_layers : teacher_layers;
    for (int j = 0; j < shallow; ++j) {
      const int k = static_cast<int>(std::lround(static_cast<double>(j + 1) * deep / shallow)) - 1;
      m.pairs.emplace_back(student_deeper ? k : j, student_deeper ? j : k);
    }
    out = std::move(m);
    return {};
  }

  static status explicit_pairs(std::vector<std::pair<int, int>> pairs, int student_layers, int teacher_layers,
                               layer_map& out) {
    for (auto [s, t] : pairs) {
      if (s < 0 || s >= student_layers)
        return {errc::out_of_range, "layer_map student layer " + std::to_string(s) + " is outside [0, " +
                                        std::to_string(student_layers) + ")"};
      if (t < 0 || t >= teacher_layers)
        return {errc::out_of_range, "layer_map teacher layer " + std::to_string(t) + " is outside [0, " +
                                        std::to_string(teacher_layers) + ")"};
    }
    out.pairs = std::move(pairs);
    return {};
  }
};

// For each student head, the teacher heads whose maps form its target. uniform() gives student head h
// the teacher heads overlapping [h * Ht / Hs, (h + 1) * Ht / Hs): groups when the teacher has more
// heads (16 -> 9: each student head averages 2 or 3 teacher heads), one head when it has fewer.
struct head_map {
  std::vector<std::vector<int>> teacher_heads;

  static head_map uniform(int student_heads, int teacher_heads) {
    head_map m;
    m.teacher_heads.resize(static_cast<std::size_t>(std::max(student_heads, 0)));
    for (int h = 0; h < student_heads; ++h) {
      const long lo = static_cast<long>(h) * teacher_heads;         // [lo, hi) in units of 1 / student_heads
      const long hi = static_cast<long>(h + 1) * teacher_heads;
      for (int g = 0; g < teacher_heads; ++g) {
        const long glo = static_cast<long>(g) * student_heads, ghi = static_cast<long>(g + 1) * student_heads;
        if (glo < hi && ghi > lo) m.teacher_heads[static_cast<std::size_t>(h)].push_back(g);
      }
    }
    return m;
  }

  status check(int student_heads, int teacher_heads) const {
    if (static_cast<int>(this->teacher_heads.size()) != student_heads)
      return {errc::shape_mismatch, "head_map has " + std::to_string(this->teacher_heads.size()) +
                                        " entries but the student has " + std::to_string(student_heads) + " heads"};
    for (std::size_t h = 0; h < this->teacher_heads.size(); ++h) {
      if (this->teacher_heads[h].empty())
        return {errc::invalid_argument, "head_map gives student head " + std::to_string(h) + " no teacher head"};
      for (int g : this->teacher_heads[h])
        if (g < 0 || g >= teacher_heads)
          return {errc::out_of_range, "head_map teacher head " + std::to_string(g) + " is outside [0, " +
                                          std::to_string(teacher_heads) + ")"};
    }
    return {};
  }
};

struct attention_options {
  int student_heads = 1;
  int teacher_heads = 1;
  bool causal = true;
  double temperature = 1.0;   // softmax_kl only
  double grad_scale = 1.0;
  bool accumulate_grad = false;
  const head_map* heads = nullptr;  // null = head_map::uniform(student_heads, teacher_heads)
  std::string_view component = "attention";
};

struct attention_tag {};

namespace detail {
// NaN/Inf scan of one [T x T] score map (map index m = batch * heads + head); causal maps are scanned
// on and below the diagonal only, the part the loss reads.
// softmax_kl divides the scores by the temperature: `sc` then applies the overflow rule too.
template <class T>
status check_scores_finite(const matrix_view<T>& map, bool causal, const char* tensor, index_t m,
                           std::string_view component, const kd_scaling* sc = nullptr) {
  const std::string name = std::string(tensor) + " (map " + std::to_string(m) + ")";
  for (index_t r = 0; r < map.rows; ++r) {
    const index_t keys = causal ? std::min(r + 1, map.cols) : map.cols;
    if (sc == nullptr) KD_TRY(check_row_finite(map.row(r), keys, r, name.c_str(), component));
    else KD_TRY(check_scaled_row(map.row(r), keys, {}, sc->inv_temp, sc->temperature, r, name.c_str(), component));
  }
  return {};
}

// Shape, parameter and head-map checks shared by every backend. Reads no tensor element, so the views
// may point to device memory. On success `hm` is the head map the call uses: options.heads, or
// head_map::uniform(student_heads, teacher_heads) built into `fallback` (only once the shapes passed),
// and `scaling` the temperature conventions (softmax_kl: T^2 on the loss, T on the gradient; none:
// T = 1) over the divisor of every query row.
template <class TT, class ST, class GT>
status validate_attention(const attention_options& o, const tensor3_view<TT>& teacher, const tensor3_view<ST>& student,
                          const tensor3_view<GT>& dstudent, bool softmax, head_map& fallback, const head_map*& hm,
                          kd_scaling& scaling) {
  const std::string ic = in_component(o.component);
  if (o.student_heads <= 0 || o.teacher_heads <= 0)
    return {errc::invalid_argument, "head counts must be positive" + ic};
  if (student.empty() || teacher.empty()) return {errc::empty_input, "attention maps are empty" + ic};
  if (teacher.data == nullptr || student.data == nullptr || (!dstudent.empty() && dstudent.data == nullptr))
    return {errc::invalid_argument, "an attention map pointer is null"};
  if (student.rows != student.cols || teacher.rows != teacher.cols)
    return {errc::shape_mismatch, "attention maps must be square [T x T]" + ic};
  if (student.rows != teacher.rows)
    return {errc::shape_mismatch, "student maps cover " + std::to_string(student.rows) + " positions but teacher maps " +
                                      std::to_string(teacher.rows) + ic};
  if (student.batch % o.student_heads != 0 || teacher.batch % o.teacher_heads != 0 ||
      student.batch / o.student_heads != teacher.batch / o.teacher_heads)
    return {errc::shape_mismatch, "student maps (" + std::to_string(student.batch) + " = batch x " +
                                      std::to_string(o.student_heads) + " heads) and teacher maps (" +
                                      std::to_string(teacher.batch) + " = batch x " + std::to_string(o.teacher_heads) +
                                      " heads) disagree on the batch" + ic};
  if (!(o.temperature > 0) || !std::isfinite(o.temperature))
    return {errc::invalid_argument, "temperature must be > 0" + ic};
  if (!dstudent.empty() && (dstudent.batch != student.batch || dstudent.rows != student.rows ||
                            dstudent.cols != student.cols))
    return {errc::shape_mismatch, "the student gradient's shape differs from the student maps" + ic};
  if (o.heads == nullptr) fallback = head_map::uniform(o.student_heads, o.teacher_heads);
  const head_map& m = o.heads != nullptr ? *o.heads : fallback;
  if (status s = m.check(o.student_heads, o.teacher_heads); !s.ok()) return {s.code(), s.message() + ic};
  hm = &m;
  token_options to;
  to.grad_scale = o.grad_scale;
  if (!std::isfinite(o.grad_scale)) return {errc::invalid_argument, "grad_scale is not finite"};
  scaling = make_kd_scaling<true>(to, softmax ? o.temperature : 1.0, softmax);
  return {};
}

// NaN/Inf scan of every map on the host (CPU backend only; the CUDA kernel checks on the device).
// With a causal mask only keys 0..i of row i are read: masked scores above the diagonal are commonly
// -inf (or garbage) and must not be rejected.
template <class TT, class ST>
status check_attention_finite(const attention_options& o, const tensor3_view<TT>& teacher,
                              const tensor3_view<ST>& student, const kd_scaling* sc) {
  for (index_t b = 0; b < teacher.batch; ++b)
    KD_TRY(check_scores_finite(teacher[b], o.causal, "teacher attention scores", b, o.component, sc));
  for (index_t b = 0; b < student.batch; ++b)
    KD_TRY(check_scores_finite(student[b], o.causal, "student attention scores", b, o.component, sc));
  return {};
}
}  // namespace detail

template <class N = softmax_kl, class P = precision_set<fp32, fp32>>
struct attention_loss {
  static_assert(PrecisionSet<P>, "kd: attention_loss's second parameter must be a kd::precision_set<Teacher, Student>.");
  using normalization = N;
  using precisions = P;
  static constexpr attention_normalization_traits<N> normalization_info{};

  attention_options options;

  // teacher: [batch * teacher_heads, T, T], student: [batch * student_heads, T, T], batch-major.
  // `out` is the backend's result type: kd::loss_result on the CPU, kd::cuda::device_loss on the GPU.
  template <class Backend, class TT, class ST, class Out, class GT>
  status operator()(const Backend& backend, tensor3_view<TT> teacher, tensor3_view<ST> student, Out& out,
                    tensor3_view<GT> dstudent) const {
    KD_CHECK_TEACHER_DTYPE(P::teacher, TT);
    KD_CHECK_STUDENT_DTYPE(P::student, ST);
    KD_CHECK_GRAD_DTYPE(P::student, GT);
    return detail::with_component(loss_impl<Backend, attention_tag>::run(backend, *this, teacher, student, out, dstudent),
                                  detail::component_or(options, "attention"));
  }
  template <class Backend, class TT, class ST, class Out>
  status operator()(const Backend& backend, tensor3_view<TT> teacher, tensor3_view<ST> student, Out& out) const {
    return (*this)(backend, teacher, student, out, tensor3_view<typename P::student::storage_type>{});
  }
};

template <>
struct loss_impl<cpu_backend, attention_tag> {
  template <class Loss, class TT, class ST, class GT>
  static status run(const cpu_backend&, const Loss& loss, tensor3_view<TT> teacher, tensor3_view<ST> student,
                    loss_result& out, tensor3_view<GT> dstudent) {
    using A = detail::common_accum_for<typename Loss::precisions>;
    using Arr = Eigen::Array<A, Eigen::Dynamic, 1>;
    const auto& o = loss.options;
    constexpr bool kl = Loss::normalization_info.softmax;
    head_map fallback;
    const head_map* heads = nullptr;
    detail::kd_scaling sc;
    KD_TRY(detail::validate_attention(o, teacher, student, dstudent, kl, fallback, heads, sc));
    KD_TRY(detail::check_attention_finite(o, teacher, student, kl ? &sc : nullptr));
    const head_map& hm = *heads;

    const index_t batch = student.batch / o.student_heads, t_len = student.rows;
    const index_t rows = student.batch * t_len;
    const A temp = static_cast<A>(sc.temperature);
    const A gscale = static_cast<A>(sc.grad_factor(rows));
    // Row sums and the total in double: this is the reference the CUDA kernel is checked against.
    auto lse_of = [](const auto& x) {
      const A m = x.maxCoeff();
      return m + static_cast<A>(std::log((x - m).exp().template cast<double>().sum()));
    };
    Arr target(t_len), s(t_len), g(t_len);
    double total = 0.0;
    for (index_t bi = 0; bi < batch; ++bi) {
      for (int h = 0; h < o.student_heads; ++h) {
        const auto smap = student[bi * o.student_heads + h];
        const auto& group = hm.teacher_heads[static_cast<std::size_t>(h)];
        for (index_t i = 0; i < t_len; ++i) {
          const index_t keys = o.causal ? i + 1 : t_len;
          auto tgt = target.head(keys);
          auto sv = s.head(keys);
          auto gv = g.head(keys);
          tgt.setZero();
          for (int gh : group) {
            const auto tmap = teacher[bi * o.teacher_heads + gh];
            for (index_t k = 0; k < keys; ++k) sv[k] = load_as<A>(tmap(i, k)) / (kl ? temp : A(1));
            if constexpr (kl) {
              tgt += (sv - lse_of(sv)).exp();
            } else {
              tgt += sv;
            }
          }
          tgt /= static_cast<A>(group.size());
          for (index_t k = 0; k < keys; ++k) sv[k] = load_as<A>(smap(i, k)) / (kl ? temp : A(1));
          if constexpr (kl) {
            const auto logq = sv - lse_of(sv);
            for (index_t k = 0; k < keys; ++k)
              if (tgt[k] > A(0)) total += static_cast<double>(tgt[k] * (std::log(tgt[k]) - logq[k]));
            gv = logq.exp() - tgt;
          } else {
            total += (sv - tgt).square().template cast<double>().sum();
            gv = A(2) * (sv - tgt);
          }
          if (dstudent.empty()) continue;
          auto drow = dstudent[bi * o.student_heads + h];
          for (index_t k = 0; k < t_len; ++k) {
            const A v = k < keys ? gscale * gv[k] : A(0);
            detail::put_grad(drow(i, k), v, o.accumulate_grad);
          }
        }
      }
    }
    out.tokens = rows;
    out.normalizer = sc.divisor_for(rows);
    out.loss = total * sc.loss_scale / out.normalizer;
    if (!std::isfinite(out.loss)) return {errc::non_finite, "the loss is not finite"};
    return {};
  }
};

}  // namespace kd
