// kd/loss/linear_kd.hpp: student LM head + logit distillation, without materializing N x V logits.
//
// logits = hidden W^T (hidden [N x d], W [V x d], the student's LM head); the loss is logit_kd on those
// logits against the teacher's logits, so every convention of kd/loss/logit_kd.hpp holds (temperature,
// T^2, vocab map, padding, ignore_index, token reduction). Gradients: dhidden = dlogits W and
// dW = dlogits^T hidden. Backends process `chunk_rows` tokens at a time, so the extra memory is
// chunk_rows x V logits instead of N x V (the CUDA backend runs the three products through cuBLAS), or
// (CUDA, linear_kd_path::on_chip) tiles that never leave the chip.
// The CPU reference here computes the logits in the accumulation type, chunk by chunk (rounded to the
// storage type with linear_kd_logits::storage).
// The teacher may also come as its final hidden states and LM head (kd::teacher_head): its logits are
// then formed chunk by chunk too, in the accumulation type, so its N x V_teacher logits never exist
// either (the trainer's case: 2.5 GB per 8k-token step of a 152k-vocabulary teacher in bf16).
#pragma once

#include <algorithm>
#include <cstddef>
#include <span>
#include <string>
#include <type_traits>

#include <Eigen/Core>

#include <kd/loss/logit_kd.hpp>

namespace kd {

// How the CUDA backend forms the logits (the CPU reference always runs chunks; both give one result).
//  - chunked: per chunk of chunk_rows tokens through cuBLAS into an fp32 chunk x V buffer (any dtype,
//    any vocab map);
//  - on_chip: tiles of 128 tokens x 128 vocabulary entries formed on the tensor cores and consumed in
//    shared memory and registers, never written (kd/loss/linear_kd_on_chip.cuh): extra memory is fp32
//    accumulators for dhidden and dW plus O(N), (N + V) d x 4 bytes instead of chunk_rows x V x 6 plus
//    V d x 4 (5-9x less at d = 576), at 2.7-3.6x the chunked path's time at d = 576 and 4.5-7.8x at d >= 2048
//    (H100, benchmarks/RESULTS.md session 14): the path for when memory, not time, is short.
//    Needs 16-bit hidden states and heads (bfloat16 or half), hidden widths that are multiples of 8,
//    16-byte aligned contiguous rows, and a shared vocabulary (no map). dhidden and dW are sums of atomic
//    adds (their float rounding varies from run to run).
enum class linear_kd_path { chunked, on_chip };

// What type the chunked path keeps the logits in (and, with a kd::teacher_head, the teacher's logits):
//  - accumulation: the GEMM's fp32 accumulator, unrounded (the CPU reference's exact arithmetic);
//  - storage: rounded once to the storage type of the hidden states and head (of the teacher's, for its
//    logits), as PyTorch's `hidden @ W.T` in bfloat16 rounds them. For 16-bit storage the loss kernel
//    then reads 16-bit rows and writes the gradient over them in place: 6 bytes an entry instead of 8
//    (10 with a teacher head), a third of the chunk scratch, and the same-type vector sweeps. The price is
//    one rounding of each logit (2^-9 of it in bfloat16): ~1e-2 of the gradient's scale at T = 0.5.
//    bf16, T = 2, chunk 2048, H100 (benchmarks/RESULTS.md session 28): 1.12-1.27x the fp32 logits at
//    d = 576 (forward KL 2.25-2.50x torch.compile, with a teacher head 1.89-2.00x), 1.04-1.14x at
//    d = 2048, where the GEMMs take most of the time. With it, 4096-row chunks use less scratch than fp32
//    logits' 2048 and ran 1.06x faster again (fewer passes over the fp32 dW accumulator).
//    fp32 storage gives the same result either way. on_chip keeps its tiles in fp32 and refuses it.
// The CPU reference rounds the same way, so both backends compute one function of the inputs.
enum class linear_kd_logits { accumulation, storage };

struct linear_kd_options : logit_kd_options {
  // Tokens per chunk (the chunked path's extra memory is chunk_rows x V entries). 0 (the default): the rows
  // whose chunk scratch takes what 2048 rows of fp32 logits take (detail::linear_kd_chunk): 2048 with fp32
  // logits, more with 16-bit linear_kd_logits::storage ones (6144 in bf16), for fewer passes over the fp32
  // dW accumulator at the same memory.
  index_t chunk_rows = 0;
  linear_kd_path path = linear_kd_path::chunked;
  // on_chip: how many ranges the vocabulary's 128-entry tiles are split into across CTAs (0: about 8 CTAs
  // per SM; 1: each CTA sweeps the whole vocabulary). For tuning and tests; any value gives one result.
  index_t on_chip_splits = 0;
  linear_kd_logits logits = linear_kd_logits::accumulation;
  // With a kd::teacher_head and a vocab_map, KD reads only the mapped teacher columns, so the CUDA chunked
  // path gathers the head rows the map reads (vocab_map::compact_teacher, in the student's order) into
  // scratch once per call and runs the teacher GEMM and the loss over them: the same loss, with the
  // teacher GEMM over K rows instead of V_t (42,257 of 151,936 for Qwen3 -> GPT-2) and teacher columns
  // that follow the student order (for a one-to-one map, the contiguous map's kernels). Extra memory:
  // K x d_t of the teacher's type. Left out where it would save little (K at least 7/8 of V_t: a head
  // already compact). false: the full head (for comparisons); the CPU reference always reads the full head.
  bool compact_teacher_head = true;
};

struct linear_kd_tag {};

// A teacher given by its last hidden states [N x d_t] and LM head [V_t x d_t] (V_t: the student's V
// for a shared vocabulary, the map's teacher columns with a vocab map). No gradient flows to it.
// With a vocab map, only the head rows the map reads matter: vocab_map::compact_teacher lists them (in the
// student's order) with the map onto them, and the head gathered to those rows with that map gives the
// same loss, with the teacher GEMM over K mapped rows instead of V_t (42,257 of 151,936 for Qwen3 ->
// GPT-2) and, for a one-to-one map, the contiguous map's kernels. The CUDA chunked path does this itself
// each call (linear_kd_options::compact_teacher_head); a frozen teacher's head given compact once (as
// kd::train::distill_step does) saves that call's gather and K x d_t of scratch.
template <class T>
struct teacher_head {
  matrix_view<const T> hidden;
  matrix_view<const T> weight;
};

// D, R as in logit_kd; P = precision_set<teacher logits, student hidden, LM-head weight>.
template <class D, class R = token_mean, class P = precision_set<fp32, fp32, fp32>>
struct linear_logit_kd {
  static_assert(PrecisionSet<P>, "kd: linear_logit_kd's third parameter must be a kd::precision_set<Teacher, Student, Head>.");
  using divergence = D;
  using reduction = R;
  using precisions = P;
  static constexpr divergence_traits<D> divergence_info{};
  static constexpr token_reduction_traits<R> reduction_info{};

  linear_kd_options options;

  template <class Backend, class HT, class WT, class TT, class Out, class GH, class GW>
  status operator()(const Backend& backend, matrix_view<HT> hidden, matrix_view<WT> weight, matrix_view<TT> teacher,
                    std::span<const std::int32_t> labels, Out& out, matrix_view<GH> dhidden,
                    matrix_view<GW> dweight) const {
    return call<TT>(backend, hidden, weight, as_const(teacher), labels, out, dhidden, dweight);
  }

  // The teacher as hidden states and LM head (P::teacher is their storage dtype); as above otherwise.
  template <class Backend, class HT, class WT, class TT, class Out, class GH, class GW>
  status operator()(const Backend& backend, matrix_view<HT> hidden, matrix_view<WT> weight,
                    const teacher_head<TT>& teacher, std::span<const std::int32_t> labels, Out& out,
                    matrix_view<GH> dhidden, matrix_view<GW> dweight) const {
    return call<TT>(backend, hidden, weight, teacher, labels, out, dhidden, dweight);
  }

  // The logit_kd equivalent of this loss on logits held in accumulation type A (what the CPU reference
  // runs per chunk; the CUDA path keeps its chunk logits in the storage type). TP: the teacher logits'
  // precision (P::teacher when given, precision<A, A> when formed from a teacher_head).
  template <class A, class TP = typename P::teacher>
  using logit_loss = logit_kd<D, R, precision_set<TP, precision<A, A>>>;

 private:
  // Both teacher forms: the dtype checks (TT: the teacher's element type), then the backend.
  template <class TT, class Backend, class HT, class WT, class Teacher, class Out, class GH, class GW>
  status call(const Backend& backend, matrix_view<HT> hidden, matrix_view<WT> weight, const Teacher& teacher,
              std::span<const std::int32_t> labels, Out& out, matrix_view<GH> dhidden, matrix_view<GW> dweight) const {
    KD_CHECK_STUDENT_DTYPE(P::student, HT);
    KD_CHECK_PROJECTION_DTYPE(P::projection, WT);
    KD_CHECK_TEACHER_DTYPE(P::teacher, TT);
    KD_CHECK_GRAD_DTYPE(P::student, GH);
    KD_CHECK_GRAD_DTYPE(P::projection, GW);
    return detail::with_component(loss_impl<Backend, linear_kd_tag>::run(backend, *this, as_const(hidden),
                                                                          as_const(weight), teacher, labels, out,
                                                                          dhidden, dweight),
                                  detail::component_or(options, "kd"));
  }
};

namespace detail {
// The fp32-logit chunk whose scratch linear_kd_options::chunk_rows = 0 budgets.
inline constexpr index_t kLinearKdChunk = 2048;

// The chunk rows a call runs, both backends: options.chunk_rows, or for 0 the rows whose chunk scratch on the
// CUDA path takes no more than kLinearKdChunk rows of fp32 logits. An fp32-logit row holds V fp32 logits,
// their gradient in the storage type (s bytes) when that is 16-bit, and with a teacher head (V_t = vt
// columns; 0 for given logits) V_t fp32 teacher logits; with linear_kd_logits::storage a row holds V
// entries of s bytes (the gradient written over them) and V_t of the teacher's st. So 2048 rows with fp32
// logits, 6144 with bf16 ones, 5120 with a bf16 teacher head as wide, 4608 with one 3x as wide (multiples of
// 256). Why more rows: each chunk's dW GEMM reads and writes the fp32 V x d accumulator (700 MB at
// V = 151,936, d = 576); 4096-8192-row chunks of bf16 logits ran 1.03-1.08x faster than 2048 (H100,
// 2026-12-07, benchmarks/RESULTS.md session 28).
inline index_t linear_kd_chunk(const linear_kd_options& o, index_t n, index_t v, index_t vt, std::size_t s,
                               std::size_t st) {
  index_t c = o.chunk_rows;
  if (c == 0) {
    const double fv = static_cast<double>(v), ft = static_cast<double>(vt);
    const double f32_row = 4.0 * fv + (s < 4 ? static_cast<double>(s) * fv : 0.0) + 4.0 * ft;
    const double row = o.logits == linear_kd_logits::storage
                           ? static_cast<double>(s) * fv + static_cast<double>(st) * ft
                           : f32_row;
    c = std::max(kLinearKdChunk, static_cast<index_t>(static_cast<double>(kLinearKdChunk) * f32_row / row) / 256 * 256);
  }
  return std::min(c, n);
}

// Whether a call with a teacher head of vt rows through `map` runs on the compact head
// (linear_kd_options::compact_teacher_head): a map that fits the head and reads under 7/8 of its rows.
inline bool compacts_teacher_head(const linear_kd_options& o, index_t vt, index_t v) {
  return o.compact_teacher_head && o.path == linear_kd_path::chunked && o.map != nullptr &&
         o.map->check_fits(vt, v).ok() && 8 * o.map->size() < 7 * vt;
}

// The checks of the LM-head product, shared by both backends (the per-chunk logit_kd validates the rest:
// its own plan carries the same scaling). Label values are checked by the per-chunk logit_kd.
// The teacher: given logits (a matrix_view) or a teacher_head.
template <class T>
status validate_teacher(const matrix_view<T>& t, index_t tokens) {
  KD_TRY(validate_view(t, "teacher logits"));
  if (t.rows != tokens)
    return {errc::shape_mismatch, "teacher logits have " + std::to_string(t.rows) + " tokens but hidden has " +
                                      std::to_string(tokens)};
  return {};
}
template <class T>
status validate_teacher(const teacher_head<T>& th, index_t tokens) {
  KD_TRY(validate_view(th.hidden, "teacher hidden"));
  KD_TRY(validate_view(th.weight, "teacher LM head weight"));
  if (th.hidden.empty() || th.weight.empty()) return {errc::empty_input, "teacher hidden states or LM head are empty"};
  if (th.weight.cols != th.hidden.cols)
    return {errc::shape_mismatch, "teacher LM head is " + shape_string(th.weight.rows, th.weight.cols) +
                                      " but the teacher hidden width is " + std::to_string(th.hidden.cols)};
  if (th.hidden.rows != tokens)
    return {errc::shape_mismatch, "teacher hidden has " + std::to_string(th.hidden.rows) +
                                      " tokens but the student hidden has " + std::to_string(tokens)};
  return {};
}

template <class Loss, class HT, class WT, class Teacher, class GH, class GW>
status validate_linear_kd(const Loss& loss, const matrix_view<HT>& h, const matrix_view<WT>& w, const Teacher& t,
                          std::span<const std::int32_t> labels, const matrix_view<GH>& dh, const matrix_view<GW>& dw,
                          kd_scaling& scaling) {
  const auto& o = loss.options;
  KD_TRY(validate_view(h, "student hidden"));
  KD_TRY(validate_view(w, "LM head weight"));
  if (h.empty() || w.empty()) return {errc::empty_input, "hidden states or LM head are empty"};
  if (w.cols != h.cols)
    return {errc::shape_mismatch, "LM head is " + shape_string(w.rows, w.cols) + " but the hidden width is " +
                                      std::to_string(h.cols)};
  KD_TRY(validate_teacher(t, h.rows));
  if (!labels.empty() && static_cast<index_t>(labels.size()) != h.rows)
    return {errc::shape_mismatch, "labels has " + std::to_string(labels.size()) + " entries but hidden has " +
                                      std::to_string(h.rows) + " tokens"};
  if (o.chunk_rows < 0)
    return {errc::invalid_argument, "chunk_rows must be positive, or 0 for the default (got " + std::to_string(o.chunk_rows) + ")"};
  if (o.logits != linear_kd_logits::accumulation && o.logits != linear_kd_logits::storage)
    return {errc::invalid_argument, "linear_kd_options::logits is neither accumulation nor storage"};
  if (!dh.empty()) {
    KD_TRY(validate_view(dh, "hidden gradient"));
    KD_TRY(same_shape(dh, "hidden gradient", h, "student hidden"));
  }
  if (!dw.empty()) {
    KD_TRY(validate_view(dw, "LM head gradient"));
    KD_TRY(same_shape(dw, "LM head gradient", w, "LM head weight"));
  }
  scaling = make_kd_scaling<Loss::reduction_info.mean>(o, o.temperature, o.scale_by_t2);
  return {};
}
}  // namespace detail

template <>
struct loss_impl<cpu_backend, linear_kd_tag> {
  template <class Loss, class HT, class WT, class TT, class GH, class GW>
  static status run(const cpu_backend&, const Loss& loss, matrix_view<const HT> h, matrix_view<const WT> w,
                    matrix_view<const TT> t, std::span<const std::int32_t> labels, loss_result& out,
                    matrix_view<GH> dh, matrix_view<GW> dw) {
    detail::kd_scaling sc;
    KD_TRY(detail::validate_linear_kd(loss, h, w, t, labels, dh, dw, sc));
    using Inner = typename Loss::template logit_loss<accum<Loss>>;
    const index_t chunk = detail::linear_kd_chunk(loss.options, h.rows, w.rows, 0, sizeof(HT), 0);
    return chunks<Inner>(loss, h, w, labels, out, dh, dw, sc, chunk, [&](index_t r0, index_t rows) {
      return matrix_view<const TT>(t.row(r0), rows, t.cols, t.stride);
    });
  }

  template <class Loss, class HT, class WT, class TT, class GH, class GW>
  static status run(const cpu_backend&, const Loss& loss, matrix_view<const HT> h, matrix_view<const WT> w,
                    const teacher_head<TT>& th, std::span<const std::int32_t> labels, loss_result& out,
                    matrix_view<GH> dh, matrix_view<GW> dw) {
    using A = accum<Loss>;
    detail::kd_scaling sc;
    KD_TRY(detail::validate_linear_kd(loss, h, w, th, labels, dh, dw, sc));
    const Mat<A> tw = load<A>(th.weight, 0, th.weight.rows);
    Mat<A> tlogits;
    using Inner = typename Loss::template logit_loss<A, precision<A, A>>;
    const index_t chunk = detail::linear_kd_chunk(loss.options, h.rows, w.rows, th.weight.rows, sizeof(HT), sizeof(TT));
    return chunks<Inner>(loss, h, w, labels, out, dh, dw, sc, chunk, [&](index_t r0, index_t rows) {
      tlogits = load<A>(th.hidden, r0, rows) * tw.transpose();
      if (loss.options.logits == linear_kd_logits::storage) round_through<TT>(tlogits);
      return matrix_view<const A>(tlogits.data(), rows, tlogits.cols());
    });
  }

 private:
  template <class Loss>
  using accum = detail::common_accum_for<typename Loss::precisions>;
  template <class A>
  using Mat = Eigen::Matrix<A, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;

  template <class A, class V>
  static Mat<A> load(const V& view, index_t r0, index_t rows) {
    Mat<A> m(rows, view.cols);
    for (index_t r = 0; r < rows; ++r)
      for (index_t c = 0; c < view.cols; ++c) m(r, c) = load_as<A>(view(r0 + r, c));
    return m;
  }

  // linear_kd_logits::storage: each entry rounded to the storage type T and held in A again.
  template <class T, class A>
  static void round_through(Mat<A>& m) {
    if constexpr (!std::is_same_v<T, A>)
      for (index_t i = 0; i < m.size(); ++i) m.data()[i] = load_as<A>(store_as<T>(m.data()[i]));
  }

  // The chunk loop shared by both teacher forms, `chunk` rows at a time (detail::linear_kd_chunk):
  // teacher(r0, rows) gives the chunk's teacher logits.
  template <class Inner, class Loss, class HT, class WT, class GH, class GW, class Teacher>
  static status chunks(const Loss& loss, matrix_view<const HT> h, matrix_view<const WT> w,
                       std::span<const std::int32_t> labels, loss_result& out, matrix_view<GH> dh, matrix_view<GW> dw,
                       const detail::kd_scaling& sc, index_t chunk, Teacher&& teacher) {
    using A = accum<Loss>;
    const auto& o = loss.options;
    const index_t n = h.rows, d = h.cols, v = w.rows;
    const Mat<A> W = load<A>(w, 0, v);
    Mat<A> dW = Mat<A>::Zero(v, d);
    // One logit_kd over all rows would need N x V; chunks share the global normalizer instead.
    Inner inner;
    static_cast<logit_kd_options&>(inner.options) = o;
    const index_t active = detail::count_active(labels, n, o.ignore_index);
    const double divisor = sc.divisor_for(active);
    // Chunks are divided by the whole call's divisor, not their own token count.
    if (sc.divisor == detail::divisor_kind::active_tokens) inner.options.global_tokens = static_cast<index_t>(divisor);
    inner.options.accumulate_grad = false;
    double total = 0.0;
    for (index_t r0 = 0; r0 < n; r0 += chunk) {
      const index_t rows = std::min(chunk, n - r0);
      const Mat<A> H = load<A>(h, r0, rows);
      Mat<A> logits = H * W.transpose();
      if (o.logits == linear_kd_logits::storage) round_through<HT>(logits);
      Mat<A> dlogits(rows, v);
      loss_result part;
      const auto lab = labels.empty() ? labels : labels.subspan(static_cast<std::size_t>(r0), static_cast<std::size_t>(rows));
      KD_TRY(inner(cpu, teacher(r0, rows), matrix_view<const A>(logits.data(), rows, v), lab, part,
                   matrix_view<A>(dlogits.data(), rows, v)));
      total += part.loss * part.normalizer;
      if (!dh.empty()) {
        const Mat<A> dH = dlogits * W;
        for (index_t r = 0; r < rows; ++r)
          for (index_t c = 0; c < d; ++c) detail::put_grad(dh(r0 + r, c), dH(r, c), o.accumulate_grad);
      }
      if (!dw.empty()) dW.noalias() += dlogits.transpose() * H;
    }
    if (!dw.empty())
      for (index_t r = 0; r < v; ++r)
        for (index_t c = 0; c < d; ++c) detail::put_grad(dw(r, c), dW(r, c), o.accumulate_grad);
    out.tokens = active;
    out.normalizer = divisor;
    out.loss = total / divisor;
    return {};
  }
};

}  // namespace kd
