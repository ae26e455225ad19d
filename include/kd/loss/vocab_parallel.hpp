// kd/loss/vocab_parallel.hpp: logit KD and cross-entropy over logits split by vocabulary columns across
// the ranks of a kd::communicator (tensor-parallel LM heads: Megatron's vocab-parallel cross-entropy, the
// NeMo / ModelOpt tensor-parallel KL loss).
//
// Each rank holds columns [slice.offset, slice.offset + cols) of one shared vocabulary of slice.vocab
// columns, for the teacher and the student alike, and the same rows and labels. No rank ever holds a
// full row: per row, the ranks all-reduce
//   1. the maxima of the scaled teacher and student logits (max), then their sums of exp(y - max) (sum):
//      every rank then has both log-sum-exps;
//   2. (divergences other than forward KL, and the loss) each rank's sum of the divergence terms and of
//      q * dD/dq over its columns (sum): the gradient's row constant and the row's loss;
// and each rank writes the gradient of its own columns. The token divisor and temperature conventions
// are logit_kd's (kd::detail::make_kd_scaling), and the options are a kd::logit_kd's / cross_entropy's:
// options.vocab counts the real tokens of the whole vocabulary (columns past it, on whichever rank, are
// padding: outside both softmaxes, gradient 0). A vocab_map cannot be split this way (its support is not
// a column range): map the teacher first, or distill on one rank.
// A call that one rank rejects is rejected on every rank (the ranks agree on it through one all-reduce
// of a flag before any other collective): no rank waits in a collective that another has skipped.
// This is the CPU reference (host memory, any communicator whose collectives act on host memory);
// kd/loss/vocab_parallel.cuh is the CUDA version, tested against it.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <span>
#include <string>
#include <vector>

#include <kd/core/comm.hpp>
#include <kd/loss/cross_entropy.hpp>
#include <kd/loss/logit_kd.hpp>

namespace kd {

// This rank's columns of a vocabulary split by columns.
struct vocab_slice {
  index_t offset = 0;  // first column held here, in the full vocabulary
  index_t vocab = 0;   // columns of the full vocabulary (padding included)
};

namespace detail {

// The checks every rank makes of its own call; the ranks then agree (agree_on_call) before computing.
inline status validate_slice(const vocab_slice& s, index_t cols, index_t real_vocab, const char* what) {
  if (s.vocab <= 0) return {errc::invalid_argument, std::string(what) + ": the slice's full vocabulary is empty"};
  if (s.offset < 0 || s.offset + cols > s.vocab)
    return {errc::out_of_range, std::string(what) + ": columns [" + std::to_string(s.offset) + ", " +
                                    std::to_string(s.offset + cols) + ") lie outside the vocabulary of " +
                                    std::to_string(s.vocab)};
  if (real_vocab < 0 || real_vocab > s.vocab)
    return {errc::out_of_range, std::string(what) + ": vocab " + std::to_string(real_vocab) + " exceeds the " +
                                    std::to_string(s.vocab) + " columns of the full vocabulary"};
  return {};
}

// One all-reduce of a flag: every rank learns whether any rank rejected its call. The rank that did
// returns its own error, the others an error naming it.
inline status agree_on_call(communicator& comm, status local, const char* what) {
  std::int64_t flag = local.ok() ? 0 : comm.rank() + 1;
  KD_TRY(comm.all_reduce_host(&flag, 1, reduce_op::max));
  if (!local.ok()) return local;
  if (flag != 0)
    return {errc::invalid_argument, std::string(what) + ": rank " + std::to_string(flag - 1) + " rejected its part of the call"};
  return {};
}

// Real columns of this slice: [0, local_real) of its cols.
inline index_t local_real(const vocab_slice& s, index_t cols, index_t real_vocab) {
  const index_t real = real_vocab > 0 ? real_vocab : s.vocab;
  return std::clamp<index_t>(real - s.offset, 0, cols);
}

// This rank's checks of a vocab_parallel_kd call (both backends; device labels are checked by the kernels).
template <class Loss, class TT, class ST, class GT>
status validate_vocab_parallel_kd(const Loss& loss, const vocab_slice& slice, const matrix_view<TT>& teacher,
                                  const matrix_view<ST>& student, std::span<const std::int32_t> labels, bool labels_on_host,
                                  const matrix_view<GT>& dstudent, bool want_grad) {
  const auto& o = loss.options;
  if (o.map != nullptr)
    return {errc::invalid_argument, "vocab_parallel_kd: a vocab_map cannot be split by columns; map the teacher first"};
  KD_TRY(validate_slice(slice, student.cols, o.vocab, "vocab_parallel_kd"));
  // The shared checks of logit_kd, on this slice (the label range is the full vocabulary's: below).
  auto whole = loss;
  whole.options.vocab = 0;
  whole.options.map = nullptr;
  logit_kd_plan plan;
  KD_TRY(validate_logit_kd(whole, teacher, student, std::span<const std::int32_t>{}, true, dstudent, want_grad, plan));
  if (!labels.empty()) {
    token_options named = o;
    named.component = component_or(o, "kd");
    KD_TRY(check_labels(labels, student.rows, o.vocab > 0 ? o.vocab : slice.vocab, named, labels_on_host));
    KD_TRY(check_token_options(named, labels_on_host ? count_active(labels, student.rows, o.ignore_index) : 0));
  }
  return {};
}

// Same for vocab_parallel_cross_entropy.
template <class Loss, class ST, class GT>
status validate_vocab_parallel_ce(const Loss& loss, const vocab_slice& slice, const matrix_view<ST>& logits,
                                  std::span<const std::int32_t> labels, bool labels_on_host, const matrix_view<GT>& dlogits,
                                  bool want_grad) {
  const auto& o = loss.options;
  KD_TRY(validate_slice(slice, logits.cols, o.vocab, "vocab_parallel_cross_entropy"));
  KD_TRY(validate_cross_entropy_shapes(loss, logits, labels, dlogits, want_grad));
  token_options named = o;
  named.component = component_or(o, "lm");
  KD_TRY(check_labels(labels, logits.rows, o.vocab > 0 ? o.vocab : slice.vocab, named, labels_on_host));
  return check_token_options(named, labels_on_host ? count_active(labels, logits.rows, o.ignore_index) : 0);
}

}  // namespace detail

// Vocabulary-parallel logit KD (CPU reference): `loss` is a kd::logit_kd (its options without a map);
// teacher, student and dstudent are this rank's [rows x cols] slices. The loss value (every rank gets
// the whole loss) lands in `out`.
template <class Loss, class TT, class ST, class GT>
status vocab_parallel_kd(const cpu_backend&, const Loss& loss, communicator& comm, vocab_slice slice,
                         matrix_view<TT> teacher_in, matrix_view<ST> student_in, std::span<const std::int32_t> labels,
                         loss_result& out, matrix_view<GT> dstudent, bool want_grad = true) {
  using A = detail::common_accum_for<typename Loss::precisions>;
  using D = typename Loss::divergence;
  const auto& o = loss.options;
  const auto comp = detail::component_or(o, "kd");
  const auto teacher = as_const(teacher_in);
  const auto student = as_const(student_in);
  // Local validation, then one agreement across the ranks.
  const status local = detail::validate_vocab_parallel_kd(loss, slice, teacher, student, labels, true, dstudent, want_grad);
  KD_TRY(detail::with_component(detail::agree_on_call(comm, local, "vocab_parallel_kd"), comp));

  const index_t n = student.rows, cols = student.cols, kr = detail::local_real(slice, cols, o.vocab);
  const auto sc = detail::make_kd_scaling<Loss::reduction_info.mean>(o, o.temperature, o.scale_by_t2);
  const A temp = static_cast<A>(sc.temperature);
  const index_t active = detail::count_active(labels, n, o.ignore_index);
  const double divisor = sc.divisor_for(active);
  const A grad_factor = static_cast<A>(sc.grad_factor(active));
  const auto math = detail::divergence_math_for<A>(loss);

  // Non-finite logits: found on the rank that holds them, agreed on by all.
  status bad;
  for (index_t r = 0; r < n && bad.ok(); ++r) {
    if (!detail::token_active(labels, r, o.ignore_index)) continue;
    bad = detail::check_scaled_row(teacher.row(r), kr, {}, sc.inv_temp, sc.temperature, r, "teacher logits", comp);
    if (bad.ok()) bad = detail::check_scaled_row(student.row(r), kr, {}, sc.inv_temp, sc.temperature, r, "student logits", comp);
  }
  if (!bad.ok()) bad = status{bad.code(), bad.message() + " (rank " + std::to_string(comm.rank()) + ", columns from " + std::to_string(slice.offset) + ")"};
  KD_TRY(detail::agree_on_call(comm, bad, "vocab_parallel_kd"));

  // Scaled logits of this slice, per row (inactive rows stay unread).
  auto tz = [&](index_t r, index_t c) { return load_as<A>(teacher(r, c)) / temp; };
  auto sz = [&](index_t r, index_t c) { return load_as<A>(student(r, c)) / temp; };
  const auto N = static_cast<std::size_t>(n);
  std::vector<double> mx(2 * N, -std::numeric_limits<double>::infinity()), sm(2 * N, 0.0);
  for (index_t r = 0; r < n; ++r) {
    if (!detail::token_active(labels, r, o.ignore_index)) continue;
    for (index_t c = 0; c < kr; ++c) {
      mx[2 * r] = std::max<double>(mx[2 * r], tz(r, c));
      mx[2 * r + 1] = std::max<double>(mx[2 * r + 1], sz(r, c));
    }
  }
  KD_TRY(comm.all_reduce(mx.data(), mx.size(), reduce_op::max));
  for (index_t r = 0; r < n; ++r) {
    if (!detail::token_active(labels, r, o.ignore_index)) continue;
    const A mt = static_cast<A>(mx[2 * r]), ms = static_cast<A>(mx[2 * r + 1]);
    for (index_t c = 0; c < kr; ++c) {
      sm[2 * r] += static_cast<double>(std::exp(tz(r, c) - mt));
      sm[2 * r + 1] += static_cast<double>(std::exp(sz(r, c) - ms));
    }
  }
  KD_TRY(comm.all_reduce(sm.data(), sm.size(), reduce_op::sum));
  // Each lse in A with what A's rounding added to it (0 for A = double): p and q scaled back, the value's
  // shift given back per row (detail::split_lse, divergence_math::log_shift, as kd::logit_kd's CPU backend).
  std::vector<detail::split_lse<A>> tlse(N), slse(N);
  for (std::size_t r = 0; r < N; ++r) {
    if (!detail::token_active(labels, static_cast<index_t>(r), o.ignore_index)) continue;
    tlse[r] = detail::split_lse<A>::of(mx[2 * r], std::log(sm[2 * r]));
    slse[r] = detail::split_lse<A>::of(mx[2 * r + 1], std::log(sm[2 * r + 1]));
  }
  auto log_pq = [&](index_t r, index_t c, A& logp, A& logq, A& p, A& q) {
    const auto& t = tlse[static_cast<std::size_t>(r)];
    const auto& s = slse[static_cast<std::size_t>(r)];
    logp = tz(r, c) - t.value;
    logq = sz(r, c) - s.value;
    p = std::exp(logp) * t.scale;
    q = std::exp(logq) * s.scale;
  };
  // Row terms of the loss and of the gradient's constant sum q * dD/dq.
  std::vector<double> terms(2 * N, 0.0);
  for (index_t r = 0; r < n; ++r) {
    if (!detail::token_active(labels, r, o.ignore_index)) continue;
    for (index_t c = 0; c < kr; ++c) {
      A logp, logq, p, q;
      log_pq(r, c, logp, logq, p, q);
      terms[2 * r] += static_cast<double>(math.term(p, logp, q, logq));
      if constexpr (!std::is_same_v<D, forward_kl>) terms[2 * r + 1] += static_cast<double>(q * math.dq(p, logp, q, logq));
    }
  }
  KD_TRY(comm.all_reduce(terms.data(), terms.size(), reduce_op::sum));
  if (want_grad) {
    for (index_t r = 0; r < n; ++r) {
      const bool act = detail::token_active(labels, r, o.ignore_index);
      const A cq = static_cast<A>(terms[2 * r + 1]);
      for (index_t c = 0; c < cols; ++c) {
        A g = A(0);
        if (act && c < kr) {
          A logp, logq, p, q;
          log_pq(r, c, logp, logq, p, q);
          if constexpr (std::is_same_v<D, forward_kl>) g = q - p;
          else g = q * (math.dq(p, logp, q, logq) - cq);
          g *= grad_factor;
        }
        if (!act || c >= kr) {
          if (!o.accumulate_grad) dstudent(r, c) = store_as<std::remove_const_t<GT>>(A(0));
          continue;
        }
        detail::put_grad(dstudent(r, c), g, o.accumulate_grad);
      }
    }
  }
  double total = 0.0;
  for (std::size_t r = 0; r < N; ++r)  // after the all-reduce: the same on every rank
    if (detail::token_active(labels, static_cast<index_t>(r), o.ignore_index))
      total += terms[2 * r] + math.log_shift(tlse[r].excess, slse[r].excess);
  out.tokens = active;
  out.normalizer = divisor;
  out.loss = total * sc.loss_scale / divisor;
  if (!std::isfinite(out.loss)) return {errc::non_finite, "the loss is not finite" + detail::in_component(comp)};
  return {};
}

// Vocabulary-parallel cross-entropy and z-loss (CPU reference): `loss` is a kd::cross_entropy; logits and
// dlogits are this rank's [rows x cols] slices, labels the full vocabulary's ids (the same on every rank).
template <class Loss, class ST, class GT>
status vocab_parallel_cross_entropy(const cpu_backend&, const Loss& loss, communicator& comm, vocab_slice slice,
                                    matrix_view<ST> logits_in, std::span<const std::int32_t> labels,
                                    cross_entropy_result& out, matrix_view<GT> dlogits, bool want_grad = true) {
  using A = typename Loss::precision_policy::accum_type;
  const auto& o = loss.options;
  const auto comp = detail::component_or(o, "lm");
  const auto logits = as_const(logits_in);
  const status local = detail::validate_vocab_parallel_ce(loss, slice, logits, labels, true, dlogits, want_grad);
  KD_TRY(detail::with_component(detail::agree_on_call(comm, local, "vocab_parallel_cross_entropy"), comp));

  const index_t n = logits.rows, cols = logits.cols, kr = detail::local_real(slice, cols, o.vocab);
  const index_t active = detail::count_active(labels, n, o.ignore_index);
  const double divisor = detail::token_divisor<Loss::reduction_info.mean>(o, active);
  const A gscale = static_cast<A>(o.grad_scale / divisor);
  const A zw = static_cast<A>(o.z_loss_weight / divisor);
  status bad;
  for (index_t r = 0; r < n && bad.ok(); ++r)
    if (detail::token_active(labels, r, o.ignore_index)) bad = detail::check_row_finite(logits.row(r), kr, r, "logits", comp);
  if (!bad.ok()) bad = status{bad.code(), bad.message() + " (rank " + std::to_string(comm.rank()) + ", columns from " + std::to_string(slice.offset) + ")"};
  KD_TRY(detail::agree_on_call(comm, bad, "vocab_parallel_cross_entropy"));

  const auto N = static_cast<std::size_t>(n);
  auto x = [&](index_t r, index_t c) { return load_as<A>(logits(r, c)); };
  // Per row: max | sum of exp(x - max), then the label's logit (held by one rank; the others add 0).
  std::vector<double> mx(N, -std::numeric_limits<double>::infinity()), sm(2 * N, 0.0);
  for (index_t r = 0; r < n; ++r)
    if (detail::token_active(labels, r, o.ignore_index))
      for (index_t c = 0; c < kr; ++c) mx[r] = std::max<double>(mx[r], x(r, c));
  KD_TRY(comm.all_reduce(mx.data(), mx.size(), reduce_op::max));
  for (index_t r = 0; r < n; ++r) {
    if (!detail::token_active(labels, r, o.ignore_index)) continue;
    const A m = static_cast<A>(mx[r]);
    for (index_t c = 0; c < kr; ++c) sm[2 * r] += static_cast<double>(std::exp(x(r, c) - m));
    const index_t y = labels[static_cast<std::size_t>(r)] - slice.offset;
    if (y >= 0 && y < kr) sm[2 * r + 1] = static_cast<double>(x(r, y));
  }
  KD_TRY(comm.all_reduce(sm.data(), sm.size(), reduce_op::sum));
  double ce = 0.0, z = 0.0;
  for (index_t r = 0; r < n; ++r) {
    const bool act = detail::token_active(labels, r, o.ignore_index);
    // The lse in A with its rounding added back (kd::detail::split_lse), as the one-rank backend.
    const auto lse = act ? detail::split_lse<A>::of(mx[r], std::log(sm[2 * r])) : detail::split_lse<A>{};
    if (act) {
      const double lse_d = static_cast<double>(lse.value) - lse.excess;
      ce += static_cast<double>(lse.value - static_cast<A>(sm[2 * r + 1])) - lse.excess;
      z += lse_d * lse_d;
    }
    if (!want_grad) continue;
    const A zfac = (gscale + zw * A(2) * lse.value) * lse.scale;  // softmax's coefficient, times its scale-back
    const index_t y = act ? labels[static_cast<std::size_t>(r)] - slice.offset : -1;
    for (index_t c = 0; c < cols; ++c) {
      if (!act || c >= kr) {
        if (!o.accumulate_grad) dlogits(r, c) = store_as<std::remove_const_t<GT>>(A(0));
        continue;
      }
      const A g = std::exp(x(r, c) - lse.value) * zfac - (c == y ? gscale : A(0));
      detail::put_grad(dlogits(r, c), g, o.accumulate_grad);
    }
  }
  out.tokens = active;
  out.normalizer = divisor;
  out.ce = ce / divisor;
  out.z_loss = z / divisor;
  if (!std::isfinite(out.ce) || !std::isfinite(out.z_loss)) return {errc::non_finite, "the loss is not finite" + detail::in_component(comp)};
  return {};
}

}  // namespace kd
