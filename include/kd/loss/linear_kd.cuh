// kd/loss/linear_kd.cuh: fused student LM head + logit distillation on the GPU. Two paths
// (linear_kd_options::path): chunked, below, and on_chip, whose kernels are kd/loss/linear_kd_on_chip.cuh
// (the launcher is on_chip() below).
//
// Per chunk of `chunk_rows` tokens: logits = hidden W^T (cuBLAS, fp32 accumulation, kept in fp32 in a
// chunk_rows x V scratch, as the CPU reference keeps them), the fused logit-distillation kernel writes
// dlogits in the storage type (over the logits themselves when that is float: it reads each slice into
// shared memory before writing it), then dhidden = dlogits W and dW += dlogits^T hidden (cuBLAS). The
// N x V logits never exist: extra memory is chunk_rows x V x (4 + the storage size, or 4 for float), plus
// V x d floats for dW when W is stored in 16 bits (dW is accumulated over chunks in fp32 and rounded once),
// plus O(N). With a kd::teacher_head, each chunk's teacher logits are a GEMM into an fp32 chunk x V_teacher
// scratch as well (chunk x V_teacher x 4 more bytes instead of the teacher's N x V_teacher logits).
// With linear_kd_logits::storage (16-bit storage) the GEMMs' epilogues round the logits to the storage
// type instead (the teacher head's to the teacher's), and the loss kernel writes dlogits over them: the
// chunk scratch is chunk_rows x V x 2 bytes (+ chunk_rows x V_teacher x 2), and the kernel reads and writes
// 16-bit rows of one type, its vector sweeps' case: 1.12-1.27x the fp32 logits at d = 576, 1.04-1.14x
// at d = 2048 (H100, 2026-12-07, benchmarks/RESULTS.md session 28). The default chunk (chunk_rows = 0,
// detail::linear_kd_chunk) then holds 2.5-3x the rows in the same scratch.
// What bounds it (H200, 2026-12-04, bf16, T = 2, chunk 2048, benchmarks/RESULTS.md session 6): the
// cuBLAS GEMMs take 59-63% of a call at d = 576 and 78-87% at d = 2048 (the rest is the loss kernel over
// the fp32 logits); kd is 1.5-1.8x torch.compile at d = 576 and 1.2-1.3x at d = 2048. A design that
// never stores the logits must form them twice (once for the normalizer, once for the gradient): at
// cuBLAS's own GEMM rate its floor is 4/3 of these GEMMs, 1.9-2.2x torch.compile at d = 576 and
// 1.0-1.15x at d = 2048, so only a GEMM faster than cuBLAS's would reach 2x there.
#pragma once

#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <climits>
#include <cmath>
#include <cstdint>
#include <span>
#include <string>
#include <type_traits>

#include <kd/cuda/gemm.cuh>
#include <kd/loss/logit_kd.cuh>
#include <kd/loss/linear_kd.hpp>
#include <kd/loss/linear_kd_on_chip.cuh>
#include <kd/loss/vocab_map.cuh>

namespace kd {
namespace cuda::detail {

template <class T>
__global__ void round_store_kernel(const float* src, T* dst, long long rows, long long cols, long long stride,
                                   bool accumulate) {
  for (long long i = blockIdx.x * static_cast<long long>(blockDim.x) + threadIdx.x; i < rows * cols;
       i += static_cast<long long>(gridDim.x) * blockDim.x) {
    const long long r = i / cols, c = i % cols;
    float v = src[i];
    if (accumulate) v += to_float(dst[r * stride + c]);
    dst[r * stride + c] = from_float<T>(v);
  }
}

// The compact teacher head (linear_kd_options::compact_teacher_head): row j of dst is row rows[j] of the
// head for j < k, zeros for k <= j < kp (padding that no map slot reads). One pass over K x d_t, in 16-byte
// vectors where the rows allow it (Vec). Estimates, not yet timed (BM_headmap_auto): ~0.06 ms for 42k x 1,024
// bf16 rows at copy speed, against the ~3.6 TFLOP (~6 ms) of teacher GEMM it saves at N = 16,384.
template <class T, bool Vec>
__global__ void gather_head_kernel(const T* __restrict__ src, long long src_stride, const std::int32_t* __restrict__ rows,
                                   long long k, long long kp, long long dt, T* __restrict__ dst) {
  constexpr long long vn = Vec ? 16 / static_cast<long long>(sizeof(T)) : 1;
  const long long per_row = dt / vn;
  for (long long i = blockIdx.x * static_cast<long long>(blockDim.x) + threadIdx.x; i < kp * per_row;
       i += static_cast<long long>(gridDim.x) * blockDim.x) {
    const long long j = i / per_row, c = (i % per_row) * vn;
    if constexpr (Vec) {
      const uint4 z = make_uint4(0, 0, 0, 0);
      *reinterpret_cast<uint4*>(dst + j * dt + c) =
          j < k ? *reinterpret_cast<const uint4*>(src + static_cast<long long>(rows[j]) * src_stride + c) : z;
    } else {
      dst[j * dt + c] = j < k ? src[static_cast<long long>(rows[j]) * src_stride + c] : T{};
    }
  }
}

template <class T>
status launch_gather_head(const matrix_view<const T>& head, const compact_head& ch, T* dst, cudaStream_t stream) {
  const long long kp = ch.map.teacher_vocab(), dt = head.cols;
  const bool vec = (dt * static_cast<long long>(sizeof(T))) % 16 == 0 && (head.stride * static_cast<long long>(sizeof(T))) % 16 == 0 &&
                   reinterpret_cast<std::uintptr_t>(head.data) % 16 == 0 && reinterpret_cast<std::uintptr_t>(dst) % 16 == 0;
  const long long work = kp * dt / (vec ? 16 / static_cast<long long>(sizeof(T)) : 1);
  const unsigned blocks = static_cast<unsigned>(std::clamp<long long>((work + 255) / 256, 1, 8192));
  if (vec) gather_head_kernel<T, true><<<blocks, 256, 0, stream>>>(head.data, head.stride, ch.rows, ch.map.size(), kp, dt, dst);
  else gather_head_kernel<T, false><<<blocks, 256, 0, stream>>>(head.data, head.stride, ch.rows, ch.map.size(), kp, dt, dst);
  return cuda_status(cudaGetLastError(), "compact teacher head: gather kernel launch");
}

// The element type of a teacher given as logits (a matrix_view) or as a teacher_head.
template <class X>
struct teacher_elem {
  using type = typename X::value_type;
};
template <class X>
struct teacher_elem<teacher_head<X>> {
  using type = std::remove_const_t<X>;
};

}  // namespace cuda::detail

template <>
struct loss_impl<cuda::backend, linear_kd_tag> {
  // Teacher logits given: each chunk reads its rows in place.
  template <class Loss, class HT, class WT, class TT, class GH, class GW>
  static status run(const cuda::backend& be, const Loss& loss, matrix_view<const HT> h, matrix_view<const WT> w,
                    matrix_view<const TT> t, std::span<const std::int32_t> labels, cuda::device_loss& out,
                    matrix_view<GH> dh, matrix_view<GW> dw) {
    using TeacherPrecision = typename Loss::precisions::teacher;
    if (loss.options.path == linear_kd_path::on_chip) return on_chip<false>(be, loss, h, w, t, labels, out, dh, dw);
    auto given = [&](cublasHandle_t, long long r0, long long rows, float*, void*) -> status_or_view<TT> {
      return {{}, matrix_view<const TT>(t.row(r0), rows, t.cols, t.stride)};
    };
    if constexpr (is_16bit_float_v<HT>)
      if (loss.options.logits == linear_kd_logits::storage)
        return chunks<TeacherPrecision, HT>(be, loss, h, w, t, 0, labels, out, dh, dw, given);
    return chunks<TeacherPrecision, float>(be, loss, h, w, t, 0, labels, out, dh, dw, given);
  }

  // Teacher as hidden states and LM head: each chunk's teacher logits are one more GEMM into a chunk x
  // V_teacher scratch (fp32 accumulation; kept in fp32 as the CPU reference keeps them, or rounded to the
  // teacher's storage type with linear_kd_logits::storage).
  template <class Loss, class HT, class WT, class TT, class GH, class GW>
  static status run(const cuda::backend& be, const Loss& loss, matrix_view<const HT> h, matrix_view<const WT> w,
                    const teacher_head<TT>& th, std::span<const std::int32_t> labels, cuda::device_loss& out,
                    matrix_view<GH> dh, matrix_view<GW> dw) {
    if (loss.options.path == linear_kd_path::on_chip) return on_chip<true>(be, loss, h, w, th, labels, out, dh, dw);
    if (::kd::detail::compacts_teacher_head(loss.options, th.weight.rows, w.rows)) {
      // The head rows the map reads (linear_kd_options::compact_teacher_head), gathered into the front of
      // the chunk scratch by the first chunk; the loss runs with the map onto them. The call is checked
      // before the compact map is built, so a refused call (or one without a context) builds and uploads
      // nothing; chunks() checks it again, with the full head, at host cost only.
      ::kd::detail::kd_scaling sc;
      KD_TRY(check_call(be, loss, h, w, th, labels, out, dh, dw, sc));
      const cuda::detail::compact_head* ch = nullptr;
      KD_TRY(cuda::detail::compact_head_of(*be.ctx, *loss.options.map, ch));
      Loss compact = loss;
      compact.options.map = &ch->map;
      const long long kp = ch->map.teacher_vocab();
      const std::size_t head_bytes = static_cast<std::size_t>(kp) * static_cast<std::size_t>(th.weight.cols) * sizeof(TT);
      return head_chunks(be, compact, h, w, th, kp, head_bytes, labels, out, dh, dw,
                         [&](TT* front, cudaStream_t stream) -> status_or_view<TT> {
                           return {cuda::detail::launch_gather_head(th.weight, *ch, front, stream),
                                   matrix_view<const TT>(front, kp, th.weight.cols)};
                         });
    }
    return head_chunks(be, loss, h, w, th, th.weight.rows, 0, labels, out, dh, dw,
                       [&](TT*, cudaStream_t) -> status_or_view<TT> { return {{}, th.weight}; });
  }

 private:
  // What both paths check first: a context, a loss slot, the shared validation (which also gives the
  // scaling), and contiguous rows.
  template <class Loss, class HT, class WT, class Teacher, class GH, class GW>
  static status check_call(const cuda::backend& be, const Loss& loss, matrix_view<const HT> h, matrix_view<const WT> w,
                           const Teacher& teacher, std::span<const std::int32_t> labels, const cuda::device_loss& out,
                           matrix_view<GH> dh, matrix_view<GW> dw, ::kd::detail::kd_scaling& sc) {
    static_assert(std::is_same_v<HT, WT>, "kd: the CUDA linear_logit_kd needs the hidden states and LM head in one dtype.");
    if (be.ctx == nullptr) return {errc::invalid_argument, "the CUDA backend has no context"};
    if (out.value == nullptr) return {errc::invalid_argument, "device_loss.value is null"};
    KD_TRY(::kd::detail::validate_linear_kd(loss, h, w, teacher, labels, dh, dw, sc));
    if (h.stride != h.cols || w.stride != w.cols || (!dh.empty() && dh.stride != dh.cols) || (!dw.empty() && dw.stride != dw.cols))
      return {errc::shape_mismatch, "the CUDA linear_logit_kd needs contiguous hidden, weight and gradient rows"};
    return {};
  }

  // linear_kd_path::on_chip (kd/loss/linear_kd_on_chip.cuh): the logits in tiles that never leave the chip.
  // Head: the teacher as a teacher_head<TT>, else its logits.
  template <bool Head, class Loss, class HT, class WT, class Teacher, class GH, class GW>
  static status on_chip(const cuda::backend& be, const Loss& loss, matrix_view<const HT> h, matrix_view<const WT> w,
                        const Teacher& teacher, std::span<const std::int32_t> labels, cuda::device_loss& out,
                        matrix_view<GH> dh, matrix_view<GW> dw) {
    using namespace cuda::detail;
    using D = typename Loss::divergence;
    using TT = typename cuda::detail::teacher_elem<Teacher>::type;
    constexpr bool sixteen = is_16bit_float_v<HT>;
    constexpr bool teacher_ok = is_16bit_float_v<TT> || (!Head && std::is_same_v<TT, float>);
    const auto& o = loss.options;
    ::kd::detail::kd_scaling sc;
    KD_TRY(check_call(be, loss, h, w, teacher, labels, out, dh, dw, sc));
    if constexpr (!sixteen || !teacher_ok) {
      return {errc::invalid_argument, Head ? "linear_kd_path::on_chip needs bfloat16 or half hidden states, LM heads and teacher head"
                                           : "linear_kd_path::on_chip needs bfloat16 or half hidden states and LM head"};
    } else {
      const long long n = h.rows, d = h.cols, v = w.rows;
      // The logit-level checks of every path (temperature, parameters, vocab, a shared vocabulary) on the
      // logits' shapes; nothing is read through these views.
      if (o.map != nullptr)
        return {errc::invalid_argument, "linear_kd_path::on_chip needs a shared vocabulary (no vocab_map): use chunked"};
      if (o.logits != linear_kd_logits::accumulation)
        return {errc::invalid_argument, "linear_kd_path::on_chip keeps its logit tiles in fp32: linear_kd_logits::storage "
                                        "applies to the chunked path"};
      long long tcols = 0;
      if constexpr (Head) tcols = teacher.weight.rows;
      else tcols = teacher.cols;
      ::kd::detail::logit_kd_plan plan;
      logit_kd<D, typename Loss::reduction, precision_set<precision<float, float>, precision<float, float>>> inner;
      static_cast<logit_kd_options&>(inner.options) = o;
      const auto* any = reinterpret_cast<const float*>(h.data);
      KD_TRY(::kd::detail::validate_logit_kd(inner, matrix_view<const float>(any, n, tcols), matrix_view<const float>(any, n, v),
                                             labels, false, matrix_view<float>(), false, plan));
      auto aligned = [](const void* ptr) { return reinterpret_cast<std::uintptr_t>(ptr) % 16 == 0; };
      if (d % 8 != 0 || !aligned(h.data) || !aligned(w.data))
        return {errc::invalid_argument, "linear_kd_path::on_chip needs a hidden width that is a multiple of 8 (got " +
                                            std::to_string(d) + ") and 16-byte aligned hidden states and LM head"};
      int dt_cols = 0;
      if constexpr (Head) {
        dt_cols = static_cast<int>(teacher.weight.cols);
        if (dt_cols % 8 != 0 || teacher.hidden.stride != dt_cols || teacher.weight.stride != dt_cols ||
            !aligned(teacher.hidden.data) || !aligned(teacher.weight.data))
          return {errc::invalid_argument, "linear_kd_path::on_chip needs the teacher's hidden width to be a multiple of 8 (got " +
                                              std::to_string(dt_cols) + ") and its rows contiguous and 16-byte aligned"};
      }
      if (d > INT_MAX || n >= (1LL << 31) * kOcTile) return {errc::out_of_range, "linear_kd_path::on_chip: hidden width or tokens too large"};
      cuda::context& ctx = *be.ctx;
      const cudaStream_t stream = ctx.stream();
      const long long support = plan.support;
      const long long tiles = (support + kOcTile - 1) / kOcTile, token_tiles = (n + kOcTile - 1) / kOcTile;
      // Splits of the vocabulary: about 8 CTAs per SM at any N, so that the last wave of CTAs (two per SM
      // fit) is a small part of the call (ncu: 1.2 waves had left 25% of the SMs' time idle).
      if (o.on_chip_splits < 0) return {errc::invalid_argument, "on_chip_splits must be >= 0 (0: automatic)"};
      const long long wanted = o.on_chip_splits > 0 ? o.on_chip_splits : (8LL * ctx.sm_count() + token_tiles - 1) / token_tiles;
      long long splits = std::clamp<long long>(wanted, 1, std::min<long long>(tiles, 65535));
      const long long per = (tiles + splits - 1) / splits;
      splits = (tiles + per - 1) / per;
      using E = kd_entry<D>;
      const bool want_dh = !dh.empty(), want_dw = !dw.empty();
      auto align = [](std::size_t b) { return (b + 255) / 256 * 256; };
      const std::size_t un = static_cast<std::size_t>(n), us = static_cast<std::size_t>(splits);
      const std::size_t dh_bytes = want_dh ? align(un * static_cast<std::size_t>(d) * 4) : 0;
      const std::size_t dw_bytes = want_dw ? align(static_cast<std::size_t>(v) * static_cast<std::size_t>(d) * 4) : 0;
      const std::size_t stats_bytes = align(us * un * 16), sums_bytes = E::one_sweep ? 0 : align(us * un * 8);
      const std::size_t rows_bytes = align(un * 16), cq_bytes = align(un * 4), part_bytes = align(un * (us + 1) * 4);
      void* scratch = nullptr;
      KD_TRY(ctx.scratch(dh_bytes + dw_bytes + stats_bytes + sums_bytes + rows_bytes + cq_bytes + part_bytes + 256, scratch));
      char* base = static_cast<char*>(scratch);
      on_chip_params p;
      auto take = [&](std::size_t bytes) {
        char* q = base;
        base += bytes;
        return q;
      };
      p.dh32 = want_dh ? reinterpret_cast<float*>(take(dh_bytes)) : nullptr;
      p.dw32 = want_dw ? reinterpret_cast<float*>(take(dw_bytes)) : nullptr;
      p.stats = reinterpret_cast<float4*>(take(stats_bytes));
      p.sums = E::one_sweep ? nullptr : reinterpret_cast<float2*>(take(sums_bytes));
      p.rows = reinterpret_cast<float4*>(take(rows_bytes));
      p.cq = reinterpret_cast<float*>(take(cq_bytes));
      p.partial = reinterpret_cast<float*>(take(part_bytes));
      long long* count = reinterpret_cast<long long*>(take(256));
      p.h = h.data;
      p.w = w.data;
      p.d = static_cast<int>(d);
      if constexpr (Head) {
        p.th = teacher.hidden.data;
        p.tw = teacher.weight.data;
        p.dt = dt_cols;
      } else {
        p.t = teacher.data;
        p.t_stride = teacher.stride;
        p.t_pairs = teacher.stride % 2 == 0 && reinterpret_cast<std::uintptr_t>(teacher.data) % (2 * sizeof(TT)) == 0;
      }
      p.n = n;
      p.support = support;
      p.splits = static_cast<int>(splits);
      p.tiles_per_split = per;
      p.labels = labels.empty() ? nullptr : labels.data();
      p.ignore_index = o.ignore_index;
      p.k2 = sc.inv_temp * kLog2e;
      if constexpr (Loss::divergence_info.uses_beta) p.param = static_cast<float>(o.beta);
      if constexpr (Loss::divergence_info.uses_alpha) p.param = static_cast<float>(o.alpha);
      p.loss_scale = static_cast<float>(sc.loss_scale);
      // fp16 gradient tiles: grad_scale T times the power of two that brings it to [256, 512).
      const double gb = sc.grad_base;
      const int shift = std::is_same_v<HT, kd::half> && gb != 0.0 && std::isfinite(gb) ? 8 - std::ilogb(std::abs(gb)) : 0;
      p.gscale = static_cast<float>(std::ldexp(gb, shift));
      p.unscale = static_cast<float>(std::ldexp(1.0, -shift));
      KD_TRY(ctx.error_word(p.error));
      p.component = ctx.component_slot(::kd::detail::component_or(o, "kd"));
      if (!labels.empty()) KD_TRY(launch_count_tokens(labels.data(), n, o.ignore_index, count, stream));
      bind_divisor(sc, p, labels.empty() ? nullptr : count, n);
      if (want_dh) KD_CUDA_TRY(cudaMemsetAsync(p.dh32, 0, un * static_cast<std::size_t>(d) * 4, stream), "cudaMemsetAsync (dhidden)");
      if (want_dw) KD_CUDA_TRY(cudaMemsetAsync(p.dw32, 0, static_cast<std::size_t>(v) * static_cast<std::size_t>(d) * 4, stream), "cudaMemsetAsync (dW)");

      const dim3 grid(static_cast<unsigned>(token_tiles), static_cast<unsigned>(splits));
      const int row_blocks = static_cast<int>(std::min<long long>((n + 255) / 256, 4LL * ctx.sm_count()));
      auto launch = [&](auto kernel, std::size_t smem, const char* what) -> status {
        KD_CUDA_TRY(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)), what);
        kernel<<<grid, kOcThreads, smem, stream>>>(p);
        return cuda_status(cudaGetLastError(), what);
      };
      KD_TRY(launch(on_chip_stats_kernel<HT, TT, Head>, kOcStageBytes, "linear + KD on chip: stats kernel launch"));
      on_chip_rows_kernel<D><<<row_blocks, 256, 0, stream>>>(p);
      KD_CUDA_TRY(cudaGetLastError(), "linear + KD on chip: rows kernel launch");
      if constexpr (!E::one_sweep) {
        KD_TRY(launch(on_chip_terms_kernel<HT, TT, Head, D>, kOcStageBytes + kOcRowBytes, "linear + KD on chip: terms kernel launch"));
        on_chip_terms_rows_kernel<D><<<row_blocks, 256, 0, stream>>>(p);
        KD_CUDA_TRY(cudaGetLastError(), "linear + KD on chip: terms rows kernel launch");
      }
      if (E::one_sweep || want_dh || want_dw)
        KD_TRY(launch(on_chip_grad_kernel<HT, TT, Head, D>, kOcGradSmem, "linear + KD on chip: grad kernel launch"));
      if (want_dh) {
        round_store_kernel<<<1024, 256, 0, stream>>>(p.dh32, dh.data, n, d, dh.stride, o.accumulate_grad);
        KD_CUDA_TRY(cudaGetLastError(), "round_store kernel launch");
      }
      if (want_dw) {
        round_store_kernel<<<1024, 256, 0, stream>>>(p.dw32, dw.data, v, d, dw.stride, o.accumulate_grad);
        KD_CUDA_TRY(cudaGetLastError(), "round_store kernel launch");
      }
      return launch_finish_loss(p.partial, n * (splits + 1), p.divisor_dev, p.divisor, labels.empty() ? nullptr : count,
                                labels.empty() ? n : -1, out, stream);
    }
  }

  template <class T>
  struct status_or_view {
    status st;
    matrix_view<const T> view;
  };
  // The type linear_kd_logits::storage keeps logits of storage type T in: T itself when it is 16-bit
  // (float and double storage keep fp32, the GEMM's accumulator).
  template <class T>
  using logit_type = std::conditional_t<is_16bit_float_v<T>, T, float>;

  // The teacher-head form of the chunk loop: each chunk's teacher logits are one GEMM against the head
  // that head_of(front, stream) gives on the first chunk (the full head, or the compact head gathered into
  // the front_bytes that chunks() reserves at its scratch's start), vt rows of it.
  template <class Loss, class HT, class WT, class TT, class GH, class GW, class HeadOf>
  static status head_chunks(const cuda::backend& be, const Loss& loss, matrix_view<const HT> h, matrix_view<const WT> w,
                            const teacher_head<TT>& th, long long vt, std::size_t front_bytes,
                            std::span<const std::int32_t> labels, cuda::device_loss& out, matrix_view<GH> dh,
                            matrix_view<GW> dw, HeadOf&& head_of) {
    matrix_view<const TT> weight;
    auto head = [&](cublasHandle_t blas, long long r0, long long rows, auto* tlogits, void* front) {
      using TL = std::remove_pointer_t<decltype(tlogits)>;
      if (r0 == 0) {
        auto got = head_of(static_cast<TT*>(front), be.ctx->stream());
        if (!got.st.ok()) return status_or_view<TL>{got.st, {}};
        weight = got.view;
      }
      const long long dt = weight.cols;
      status st = cuda::gemm_rm(blas, rows, vt, dt, th.hidden.row(r0), th.hidden.stride, false, weight.data,
                                weight.stride, true, tlogits, vt, 0.f);
      return status_or_view<TL>{st, matrix_view<const TL>(tlogits, rows, vt)};
    };
    if constexpr (is_16bit_float_v<HT> || is_16bit_float_v<TT>)
      if (loss.options.logits == linear_kd_logits::storage)
        return chunks<precision<logit_type<TT>, float>, logit_type<HT>, logit_type<TT>>(be, loss, h, w, th, vt, labels,
                                                                                          out, dh, dw, head, front_bytes);
    return chunks<precision<float, float>, float, float>(be, loss, h, w, th, vt, labels, out, dh, dw, head, front_bytes);
  }

  // The chunk loop of both forms. L: the type of the chunk's student logits (float: the GEMM's
  // accumulator; HT: linear_kd_logits::storage, rounded by the GEMM's epilogue). TL: the same for the
  // teacher chunk the callback fills (teacher_cols of them; 0: it reads given logits in place);
  // teacher(blas, r0, rows, TL* scratch, void* front) gives the chunk's view; front: front_bytes of scratch
  // reserved for the teacher's own use (the compact head) for the whole call.
  template <class TeacherPrecision, class L, class TL = float, class Loss, class HT, class WT, class Teacher, class GH,
            class GW, class Fn>
  static status chunks(const cuda::backend& be, const Loss& loss, matrix_view<const HT> h, matrix_view<const WT> w,
                       const Teacher& teacher_arg, long long teacher_cols, std::span<const std::int32_t> labels,
                       cuda::device_loss& out, matrix_view<GH> dh, matrix_view<GW> dw, Fn&& teacher,
                       std::size_t front_bytes = 0) {
    using namespace cuda::detail;
    const auto& o = loss.options;
    ::kd::detail::kd_scaling sc;
    KD_TRY(check_call(be, loss, h, w, teacher_arg, labels, out, dh, dw, sc));
    cuda::context& ctx = *be.ctx;
    const cudaStream_t stream = ctx.stream();
    cublasHandle_t blas = nullptr;
    KD_TRY(ctx.cublas(blas));
    const long long n = h.rows, d = h.cols, v = w.rows;
    const long long chunk = ::kd::detail::linear_kd_chunk(o, n, v, teacher_cols, sizeof(HT), sizeof(TL));

    // The per-chunk loss: logit_kd on the chunk's logits (fp32, the GEMM's accumulator, as the CPU
    // reference keeps them: rounding them to a 16-bit storage type first costs ~1e-2 of the gradient at
    // T = 0.5; or, with linear_kd_logits::storage, in that type), with dlogits written in the storage
    // type for the two backward GEMMs: over the logits themselves when they have that type (the kernel
    // reads each slice into shared memory before it writes it).
    using Inner = logit_kd<typename Loss::divergence, typename Loss::reduction,
                           precision_set<TeacherPrecision, precision<L, float>>>;
    constexpr bool separate_grad = !std::is_same_v<HT, L>;
    Inner inner;
    static_cast<logit_kd_options&>(inner.options) = o;
    inner.options.accumulate_grad = false;

    // Scratch: front (the teacher's own) | logits chunk | dlogits chunk (16-bit heads, fp32 logits) |
    // teacher chunk (teacher_head) | fp32 dW (16-bit heads) | partials [n * kMaxRowCluster (the largest
    // cluster)] | count.
    const bool dw_f32 = !dw.empty() && !std::is_same_v<std::remove_const_t<GW>, float>;
    auto align = [](std::size_t b) { return (b + 255) / 256 * 256; };
    const std::size_t logits_bytes = align(static_cast<std::size_t>(chunk) * v * sizeof(L)) +
                                     (separate_grad ? align(static_cast<std::size_t>(chunk) * v * sizeof(HT)) : 0);
    const std::size_t teacher_bytes = align(static_cast<std::size_t>(chunk) * teacher_cols * sizeof(TL));
    const std::size_t dw_bytes = dw_f32 ? align(static_cast<std::size_t>(v) * d * sizeof(float)) : 0;
    const std::size_t partial_bytes = align(static_cast<std::size_t>(n) * kMaxRowCluster * sizeof(float));
    void* scratch = nullptr;
    const std::size_t front = align(front_bytes);
    KD_TRY(ctx.scratch(front + logits_bytes + teacher_bytes + dw_bytes + partial_bytes + 256, scratch));
    void* front_ptr = scratch;
    auto* base = static_cast<char*>(scratch) + front;
    L* logits = reinterpret_cast<L*>(base);
    HT* dlogits = separate_grad ? reinterpret_cast<HT*>(base + align(static_cast<std::size_t>(chunk) * v * sizeof(L)))
                                : reinterpret_cast<HT*>(logits);
    TL* tlogits = teacher_cols > 0 ? reinterpret_cast<TL*>(base + logits_bytes) : nullptr;
    float* dw32 = dw_f32 ? reinterpret_cast<float*>(base + logits_bytes + teacher_bytes) : nullptr;
    float* partial = reinterpret_cast<float*>(base + logits_bytes + teacher_bytes + dw_bytes);
    long long* count = reinterpret_cast<long long*>(base + logits_bytes + teacher_bytes + dw_bytes + partial_bytes);
    unsigned long long* err = nullptr;
    KD_TRY(ctx.error_word(err));
    if (!labels.empty()) KD_TRY(launch_count_tokens(labels.data(), n, o.ignore_index, count, stream));

    int cluster = 0;
    for (long long r0 = 0; r0 < n; r0 += chunk) {
      const long long rows = std::min(chunk, n - r0);
      // logits[rows x V] = h[r0:r0+rows] W^T
      KD_TRY(cuda::gemm_rm(blas, rows, v, d, h.row(r0), d, false, w.data, d, true, logits, v, 0.f));
      const auto tv = teacher(blas, r0, rows, tlogits, front_ptr);
      KD_TRY(tv.st);
      logit_kd_launch l;
      const auto lab = labels.empty() ? labels : labels.subspan(static_cast<std::size_t>(r0), static_cast<std::size_t>(rows));
      KD_TRY(plan_logit_kd(ctx, inner, tv.view, matrix_view<const L>(logits, rows, v), lab, matrix_view<HT>(dlogits, rows, v), true, l));
      if (cluster == 0) cluster = l.cluster;
      l.p.partial = partial + r0 * cluster;
      l.p.error = err;
      bind_divisor(sc, l.p, labels.empty() ? nullptr : count, n);
      KD_TRY(enqueue_logit_kd(ctx, l));
      // dh[r0:r0+rows] = dlogits W ;  dW (+)= dlogits^T h[r0:r0+rows]
      if (!dh.empty())
        KD_TRY(cuda::gemm_rm(blas, rows, d, v, dlogits, v, false, w.data, d, false, dh.row(r0), d, o.accumulate_grad ? 1.f : 0.f));
      if (!dw.empty()) {
        const float beta = (r0 == 0 && (dw_f32 || !o.accumulate_grad)) ? 0.f : 1.f;
        if (dw_f32) KD_TRY(cuda::gemm_rm(blas, v, d, rows, dlogits, v, true, h.row(r0), d, false, dw32, d, beta));
        else KD_TRY(cuda::gemm_rm(blas, v, d, rows, dlogits, v, true, h.row(r0), d, false, dw.data, d, beta));
      }
    }
    if (dw_f32) {
      round_store_kernel<<<1024, 256, 0, stream>>>(dw32, dw.data, v, d, dw.stride, o.accumulate_grad);
      KD_CUDA_TRY(cudaGetLastError(), "round_store kernel launch");
    }
    logit_kd_params div;
    bind_divisor(sc, div, labels.empty() ? nullptr : count, n);
    return launch_finish_loss(partial, n * cluster, div.divisor_dev, div.divisor, labels.empty() ? nullptr : count,
                              labels.empty() ? n : -1, out, stream);
  }
};

}  // namespace kd
