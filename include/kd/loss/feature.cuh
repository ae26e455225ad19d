// kd/loss/feature.cuh: hidden-state (feature) distillation through a learned projection on the GPU.
//
// Mirrors the CPU reference (kd/loss/feature.hpp) step for step:
//   y = x W^T (+ b)            cuBLAS, fp32 accumulation, y kept in fp32 scratch [N x D]
//   per-token loss, dL/dy      one block per token row (feature_row_kernel), every normalization
//   dx = dY W, dW = dY^T x     cuBLAS into the gradient (fp32) or an fp32 scratch rounded once (16-bit)
//   db = column sums of dY     feature_bias_grad_kernel, fixed summation order
// An empty projection is the identity (y = x (+ b), d_s == D): no GEMM, dx = dY.
// Mixed precision: when the student and projection dtypes differ, the operands a GEMM needs are
// converted to fp32 in scratch (the values are exact in fp32, so the result equals the reference's
// fp32 arithmetic); when they agree the forward GEMM reads them as stored. double storage is CPU-only.
// The dY buffer reuses y's scratch (each block overwrites only its own row, after reading it).
// Host-side checks return at once (kd::detail::validate_feature_shapes: the CPU messages). What only
// the data can reveal (NaN/Inf in x, W, b or t; a label that is neither the ignore index nor >= 0) is
// found by the row kernel and recorded in the context's error word (device_tensor::hidden / labels):
// ctx.sync_status() reports it. The row is then treated as ignored. No host synchronisation.
// Not checked on the device: global_tokens smaller than this call's labelled token count (checked on
// the host when no labels are given, i.e. when the count is the row count).
#pragma once

#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <span>
#include <string>
#include <type_traits>

#include <kd/cuda/context.cuh>
#include <kd/cuda/detail/reduce.cuh>
#include <kd/cuda/detail/storage.cuh>
#include <kd/cuda/gemm.cuh>
#include <kd/loss/feature.hpp>

namespace kd {
namespace cuda::detail {

struct feature_row_params {
  const void* y = nullptr;        // [rows x dim] at y_stride: fp32 GEMM output, or the student (identity)
  long long y_stride = 0;
  const void* bias = nullptr;     // [dim] or null
  const void* teacher = nullptr;  // [rows x dim] at t_stride
  long long t_stride = 0;
  float* dy = nullptr;            // [rows x dim] contiguous, or null (forward only); may alias y
  long long rows = 0, dim = 0;
  const std::int32_t* labels = nullptr;
  int ignore_index = -100;
  float eps = 1e-6f;
  float grad_scale = 1.f;
  const long long* divisor_dev = nullptr;  // device token count, or null
  double divisor = 1.0;                    // used when divisor_dev is null
  float* partial = nullptr;       // [rows] per-token losses (0 for ignored / bad rows)
  unsigned long long* error = nullptr;
  unsigned component = 0;
};

// N block-wide sums at once (one pair of barriers instead of N). Every thread of the block must call
// it; every thread gets the sums. `scratch` holds N x 32 floats.
template <int N>
__device__ inline void feature_block_sum(float (&v)[N], float (*scratch)[32]) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = (blockDim.x + 31) >> 5;
#pragma unroll
  for (int i = 0; i < N; ++i) v[i] = warp_sum(v[i]);
  __syncthreads();  // scratch may still be read by a previous reduction
  if (lane == 0) {
#pragma unroll
    for (int i = 0; i < N; ++i) scratch[i][warp] = v[i];
  }
  __syncthreads();
#pragma unroll
  for (int i = 0; i < N; ++i) v[i] = warp_sum(lane < warps ? scratch[i][lane] : 0.f);
}

inline constexpr int kFeatureThreads = 256;

// One block per token row. Why this shape: a row is D (~1k) floats, so one block of 256 threads reads
// it in one or two coalesced sweeps, and the per-row reductions the normalizations need (sum (y-t)^2,
// |y|^2, |t|^2, y.t; rms_mse's second pass) stay inside the block with no inter-block traffic. The
// work per row is tiny next to the GEMMs around it, so the kernel favours plain code over vector loads.
// Column c of the row is always handled by thread c % blockDim.x, in every sweep: a thread only ever
// rereads and overwrites its own elements, which is what makes dY in place of y safe.
// Control flow: the row's active/bad flags are block-uniform (every thread reads the same label and
// gets the same block sums), every thread reaches every feature_block_sum barrier, and the only early
// return (forward only) is uniform and after the last barrier.
template <feature_norm_kind K, class YT, class BT, class TT>
__global__ void __launch_bounds__(kFeatureThreads) feature_row_kernel(const feature_row_params p) {
  __shared__ float red[5][32];
  const long long row = blockIdx.x;
  const long long d = p.dim;
  const YT* yrow = static_cast<const YT*>(p.y) + row * p.y_stride;
  const BT* bias = static_cast<const BT*>(p.bias);
  const TT* trow = static_cast<const TT*>(p.teacher) + row * p.t_stride;
  auto y_at = [&](long long c) {
    float v = to_float(yrow[c]);
    if (bias != nullptr) v += to_float(bias[c]);
    return v;
  };

  // Labels: the CPU reference accepts the ignore index or any label in [0, INT32_MAX).
  bool active = true;
  if (p.labels != nullptr) {
    const int lab = p.labels[row];
    if (lab == p.ignore_index) {
      active = false;
    } else if (lab < 0 || lab == std::numeric_limits<std::int32_t>::max()) {
      active = false;
      if (threadIdx.x == 0)
        atomicMin(p.error, encode_error(row, device_error::label_out_of_range, device_tensor::labels, p.component));
    }
  }

  // Sweep 1, over every row (ignored ones too: the reference rejects NaN/Inf anywhere in the inputs).
  // s = {sum (y-t)^2, sum y^2, sum t^2, sum y t, non-finite count}.
  float s[5] = {0.f, 0.f, 0.f, 0.f, 0.f};
  for (long long c = threadIdx.x; c < d; c += blockDim.x) {
    const float y = y_at(c), t = to_float(trow[c]);
    const float e = y - t;
    s[0] += e * e;
    s[1] += y * y;
    s[2] += t * t;
    s[3] += y * t;
    s[4] += (isfinite(y) && isfinite(t)) ? 0.f : 1.f;
  }
  feature_block_sum<5>(s, red);
  const float df = static_cast<float>(d);

  float loss = 0.f;
  float k0 = 0.f, k1 = 0.f, k2 = 0.f;  // per-normalization gradient coefficients (see below)
  if constexpr (K == feature_norm_kind::none) {
    loss = s[0];
  } else if constexpr (K == feature_norm_kind::sqrt_dim_mse) {
    loss = s[0] / df;
  } else if constexpr (K == feature_norm_kind::rms_mse) {
    // ry = sqrt(|y|^2 / D + eps), diff = y / ry - t / rt, a = 2 diff / D:
    // loss = |diff|^2 / D, g = a / ry - (sum a y) y / (D ry^3). Sweep 2 needs ry and rt.
    const float ry = sqrtf(s[1] / df + p.eps), rt = sqrtf(s[2] / df + p.eps);
    const float iry = 1.f / ry, irt = 1.f / rt;
    float q[2] = {0.f, 0.f};  // {sum diff^2, sum a y}
    for (long long c = threadIdx.x; c < d; c += blockDim.x) {
      const float y = y_at(c), t = to_float(trow[c]);
      const float diff = y * iry - t * irt;
      q[0] += diff * diff;
      q[1] += 2.f * diff / df * y;
    }
    feature_block_sum<2>(q, red);
    loss = q[0] / df;
    k0 = iry;                             // 1 / ry
    k1 = irt;                             // 1 / rt
    k2 = q[1] / (df * ry * ry * ry);      // (sum a y) / (D ry^3)
  } else {
    // ny = sqrt(|y|^2 + eps), loss = 1 - y.t / (ny nt), g = -(t / (ny nt) - (y.t) y / (ny^3 nt)).
    const float ny = sqrtf(s[1] + p.eps), nt = sqrtf(s[2] + p.eps);
    loss = 1.f - s[3] / (ny * nt);
    k0 = 1.f / (ny * nt);
    k1 = s[3] / (ny * ny * ny * nt);
  }
  const bool ok = s[4] == 0.f && isfinite(loss);
  if (!ok && threadIdx.x == 0)
    atomicMin(p.error, encode_error(row, device_error::non_finite, device_tensor::hidden, p.component));
  const bool use = active && ok;
  if (threadIdx.x == 0) p.partial[row] = use ? loss : 0.f;
  if (p.dy == nullptr) return;  // uniform, and no barrier follows

  const float divisor = static_cast<float>(loss_divisor(p.divisor_dev, p.divisor));
  const float factor = p.grad_scale / divisor;
  float* drow = p.dy + row * d;
  for (long long c = threadIdx.x; c < d; c += blockDim.x) {
    float g = 0.f;
    if (use) {
      const float y = y_at(c), t = to_float(trow[c]);
      if constexpr (K == feature_norm_kind::none) {
        g = 2.f * (y - t);
      } else if constexpr (K == feature_norm_kind::sqrt_dim_mse) {
        g = 2.f * (y - t) / df;
      } else if constexpr (K == feature_norm_kind::rms_mse) {
        const float a = 2.f * (y * k0 - t * k1) / df;
        g = a * k0 - k2 * y;
      } else {
        g = -(t * k0 - k1 * y);
      }
      g *= factor;
    }
    drow[c] = g;  // this thread read element c of this row above (same index mapping): no hazard
  }
}

// db[c] (+)= sum_r dY[r, c], deterministic in two kernels. Stage 1: a grid of column tiles x row bands,
// one thread per (band, column) summing its band's rows in order in double (coalesced across a warp's
// adjacent columns). Stage 2: one thread per column adds the bands in order. Why two stages: one thread
// per column alone put D (~1k) threads on the GPU for N x D reads, latency-bound (1.4 ms of the
// trainer's 8192 x 1024 feature loss); the bands fill the GPU and the order stays fixed.
constexpr long long kBiasBands = 64;
inline long long bias_bands(long long rows) { return std::max(1LL, std::min(kBiasBands, rows)); }

__global__ void feature_bias_partial_kernel(const float* dy, long long rows, long long cols, long long bands,
                                            double* partial) {
  const long long c = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x;
  const long long band = blockIdx.y;
  if (c >= cols) return;
  const long long per = (rows + bands - 1) / bands;
  const long long r0 = band * per, r1 = std::min(rows, r0 + per);
  double s = 0.0;
  for (long long r = r0; r < r1; ++r) s += dy[r * cols + c];
  partial[band * cols + c] = s;
}

template <class GB>
__global__ void feature_bias_grad_kernel(const double* partial, long long bands, long long cols, GB* db, bool accumulate) {
  const long long c = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= cols) return;
  double s = 0.0;
  for (long long b = 0; b < bands; ++b) s += partial[b * cols + c];
  float v = static_cast<float>(s);
  if (accumulate) v += to_float(db[c]);
  db[c] = from_float<GB>(v);
}

// dst[r, c] = float(src[r, c]) into a contiguous [rows x cols] fp32 buffer. Grid-stride elementwise
// copy (one flat index per thread): no reductions, no barriers.
template <class T>
__global__ void feature_to_float_kernel(const T* src, long long stride, long long rows, long long cols, float* dst) {
  const long long n = rows * cols;
  for (long long i = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += static_cast<long long>(gridDim.x) * blockDim.x) {
    const long long r = i / cols, c = i % cols;
    dst[i] = to_float(src[r * stride + c]);
  }
}

// dst[r, c] (+)= src[r, c], src a contiguous fp32 [rows x cols] buffer, dst strided in its storage type
// (rounded once). Grid-stride elementwise: no reductions, no barriers.
template <class T>
__global__ void feature_store_kernel(const float* src, long long rows, long long cols, T* dst, long long stride,
                                     bool accumulate) {
  const long long n = rows * cols;
  for (long long i = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += static_cast<long long>(gridDim.x) * blockDim.x) {
    const long long r = i / cols, c = i % cols;
    float v = src[i];
    if (accumulate) v += to_float(dst[r * stride + c]);
    dst[r * stride + c] = from_float<T>(v);
  }
}

inline unsigned feature_grid(long long n, unsigned threads) {
  const long long blocks = (n + threads - 1) / threads;
  return static_cast<unsigned>(blocks < 4096 ? (blocks > 0 ? blocks : 1) : 4096);
}

template <class T>
status feature_to_float(const matrix_view<const T>& v, float* dst, cudaStream_t stream) {
  feature_to_float_kernel<T><<<feature_grid(v.size(), 256), 256, 0, stream>>>(v.data, v.stride, v.rows, v.cols, dst);
  return cuda_status(cudaGetLastError(), "feature to_float kernel launch");
}

template <class T>
status feature_store(const float* src, const matrix_view<T>& dst, bool accumulate, cudaStream_t stream) {
  feature_store_kernel<T><<<feature_grid(dst.size(), 256), 256, 0, stream>>>(src, dst.rows, dst.cols, dst.data,
                                                                            dst.stride, accumulate);
  return cuda_status(cudaGetLastError(), "feature store kernel launch");
}

}  // namespace cuda::detail

template <>
struct loss_impl<cuda::backend, feature_tag> {
  template <class Loss, class ST, class WT, class BT, class TT, class GS, class GW, class GB>
  static status run(const cuda::backend& be, const Loss& loss, matrix_view<const ST> x, matrix_view<const WT> w,
                    matrix_view<const BT> b, matrix_view<const TT> t, std::span<const std::int32_t> labels,
                    cuda::device_loss& out, matrix_view<GS> dx, matrix_view<GW> dw, matrix_view<GB> db) {
    using namespace cuda::detail;
    static_assert(!std::is_same_v<ST, double> && !std::is_same_v<WT, double> && !std::is_same_v<BT, double> &&
                      !std::is_same_v<TT, double>,
                  "kd: the CUDA feature loss takes float, kd::bfloat16 or kd::half tensors (double is CPU-only).");
    using GSv = std::remove_const_t<GS>;
    using GWv = std::remove_const_t<GW>;
    using GBv = std::remove_const_t<GB>;
    constexpr auto kind = Loss::normalization_info.kind;
    const auto& o = loss.options;
    const token_options named = ::kd::detail::feature_named_options(loss);
    const std::string_view comp = named.component;
    if (be.ctx == nullptr) return {errc::invalid_argument, "the CUDA backend has no context"};
    if (out.value == nullptr) return {errc::invalid_argument, "device_loss.value is null"};
    KD_TRY(::kd::detail::validate_feature_shapes(loss, x, w, b, t, labels, dx, dw, db));
    KD_TRY(check_alignment(x.data, "student hidden", comp));
    KD_TRY(check_alignment(t.data, "teacher hidden", comp));
    if (!w.empty()) KD_TRY(check_alignment(w.data, "projection", comp));
    if (!b.empty()) KD_TRY(check_alignment(b.data, "projection bias", comp));
    if (!dx.empty()) KD_TRY(check_alignment(dx.data, "student hidden gradient", comp));
    if (!dw.empty()) KD_TRY(check_alignment(dw.data, "projection gradient", comp));
    if (!db.empty()) KD_TRY(check_alignment(db.data, "bias gradient", comp));

    cuda::context& ctx = *be.ctx;
    const cudaStream_t stream = ctx.stream();
    const long long n = x.rows, ds = x.cols, dt = t.cols;
    const bool proj = !w.empty();
    const bool want_dx = !dx.empty(), want_dw = !dw.empty(), want_db = !db.empty();
    const bool want_dy = want_dx || want_dw || want_db;
    constexpr bool same_xw = std::is_same_v<ST, WT>;
    constexpr bool x_f32 = std::is_same_v<ST, float>, w_f32 = std::is_same_v<WT, float>;
    // fp32 copies of x and W, only where a GEMM needs fp32 operands and they are stored otherwise.
    const bool need_x32 = proj && !x_f32 && (!same_xw || want_dw);
    const bool need_w32 = proj && !w_f32 && (!same_xw || want_dx);
    const bool need_dx32 = proj && want_dx && !std::is_same_v<GSv, float>;
    const bool need_dw32 = want_dw && !std::is_same_v<GWv, float>;
    const bool need_y = proj || want_dy;

    // Scratch: y / dY [n x dt] | x32 [n x ds] | w32 [dt x ds] | dx32 [n x ds] | dw32 [dt x ds] |
    // partial [n] | count.
    auto align = [](std::size_t bytes) { return (bytes + 255) / 256 * 256; };
    const std::size_t f = sizeof(float);
    const std::size_t y_bytes = need_y ? align(static_cast<std::size_t>(n * dt) * f) : 0;
    const std::size_t x32_bytes = need_x32 ? align(static_cast<std::size_t>(n * ds) * f) : 0;
    const std::size_t w32_bytes = need_w32 ? align(static_cast<std::size_t>(dt * ds) * f) : 0;
    const std::size_t dx32_bytes = need_dx32 ? align(static_cast<std::size_t>(n * ds) * f) : 0;
    const std::size_t dw32_bytes = need_dw32 ? align(static_cast<std::size_t>(dt * ds) * f) : 0;
    const std::size_t partial_bytes = align(static_cast<std::size_t>(n) * f);
    const long long bands = bias_bands(n);
    const std::size_t bias_bytes = want_db ? align(static_cast<std::size_t>(bands * dt) * sizeof(double)) : 0;
    void* scratch = nullptr;
    KD_TRY(ctx.scratch(y_bytes + x32_bytes + w32_bytes + dx32_bytes + dw32_bytes + partial_bytes + bias_bytes + 256, scratch));
    char* cursor = static_cast<char*>(scratch);
    auto carve = [&](std::size_t bytes) {
      char* p = cursor;
      cursor += bytes;
      return bytes > 0 ? reinterpret_cast<float*>(p) : nullptr;
    };
    float* y32 = carve(y_bytes);
    float* x32 = carve(x32_bytes);
    float* w32 = carve(w32_bytes);
    float* dx32 = carve(dx32_bytes);
    float* dw32 = carve(dw32_bytes);
    float* partial = carve(partial_bytes);
    auto* bias_partial = reinterpret_cast<double*>(carve(bias_bytes));
    long long* count = reinterpret_cast<long long*>(cursor);

    unsigned long long* err = nullptr;
    KD_TRY(ctx.error_word(err));
    cublasHandle_t blas = nullptr;
    if (proj) KD_TRY(ctx.cublas(blas));
    if (need_x32) KD_TRY(feature_to_float(x, x32, stream));
    if (need_w32) KD_TRY(feature_to_float(w, w32, stream));
    // The fp32 (or as-stored) operands of the GEMMs and their leading dimensions.
    // (null where not needed: then no GEMM reads them).
    const float* xf = x32;
    long long ldxf = ds;
    if constexpr (x_f32) {
      xf = x.data;
      ldxf = x.stride;
    }
    const float* wf = w32;
    long long ldwf = ds;
    if constexpr (w_f32) {
      wf = w.data;
      ldwf = w.stride;
    }

    // y = x W^T  [n x dt], fp32.
    if (proj) {
      if constexpr (same_xw) KD_TRY(cuda::gemm_rm(blas, n, dt, ds, x.data, x.stride, false, w.data, w.stride, true, y32, dt, 0.f));
      else KD_TRY(cuda::gemm_rm(blas, n, dt, ds, xf, ldxf, false, wf, ldwf, true, y32, dt, 0.f));
    }

    // Token count and divisor (token_divisor on the device).
    if (!labels.empty()) KD_TRY(launch_count_tokens(labels.data(), n, o.ignore_index, count, stream));
    feature_row_params p;
    p.bias = b.empty() ? nullptr : static_cast<const void*>(b.data);
    p.teacher = t.data;
    p.t_stride = t.stride;
    p.dy = want_dy ? y32 : nullptr;
    p.rows = n;
    p.dim = dt;
    p.labels = labels.empty() ? nullptr : labels.data();
    p.ignore_index = o.ignore_index;
    p.eps = static_cast<float>(o.eps);
    p.grad_scale = static_cast<float>(o.grad_scale);
    const auto div_kind = ::kd::detail::divisor_of<Loss::reduction_info.mean>(o);
    if (div_kind == ::kd::detail::divisor_kind::active_tokens && !labels.empty()) p.divisor_dev = count;
    else p.divisor = ::kd::detail::token_divisor(div_kind, o, n);
    p.partial = partial;
    p.error = err;
    p.component = ctx.component_slot(comp);
    if (proj) {
      p.y = y32;
      p.y_stride = dt;
      feature_row_kernel<kind, float, BT, TT><<<static_cast<unsigned>(n), kFeatureThreads, 0, stream>>>(p);
    } else {
      p.y = x.data;
      p.y_stride = x.stride;
      feature_row_kernel<kind, ST, BT, TT><<<static_cast<unsigned>(n), kFeatureThreads, 0, stream>>>(p);
    }
    KD_CUDA_TRY(cudaGetLastError(), "feature row kernel launch");

    // Gradients from dY (y32 now holds dY, scaled and zero on ignored rows).
    if (want_db) {
      const unsigned tiles = static_cast<unsigned>((dt + 255) / 256);
      feature_bias_partial_kernel<<<dim3(tiles, static_cast<unsigned>(bands)), 256, 0, stream>>>(y32, n, dt, bands, bias_partial);
      KD_CUDA_TRY(cudaGetLastError(), "feature bias partial-sum kernel launch");
      feature_bias_grad_kernel<GBv><<<tiles, 256, 0, stream>>>(bias_partial, bands, dt, db.data, o.accumulate_grad);
      KD_CUDA_TRY(cudaGetLastError(), "feature bias gradient kernel launch");
    }
    if (want_dw) {
      // dW [dt x ds] = dY^T x: straight into an fp32 gradient, else through dw32 and one rounding.
      if constexpr (std::is_same_v<GWv, float>) {
        KD_TRY(cuda::gemm_rm(blas, dt, ds, n, y32, dt, true, xf, ldxf, false, dw.data, dw.stride, o.accumulate_grad ? 1.f : 0.f));
      } else {
        KD_TRY(cuda::gemm_rm(blas, dt, ds, n, y32, dt, true, xf, ldxf, false, dw32, ds, 0.f));
        KD_TRY(feature_store(dw32, dw, o.accumulate_grad, stream));
      }
    }
    if (want_dx) {
      if (!proj) {
        KD_TRY(feature_store(y32, dx, o.accumulate_grad, stream));  // identity: dx = dY
      } else {
        // dx [n x ds] = dY W
        if constexpr (std::is_same_v<GSv, float>) {
          KD_TRY(cuda::gemm_rm(blas, n, ds, dt, y32, dt, false, wf, ldwf, false, dx.data, dx.stride,
                               o.accumulate_grad ? 1.f : 0.f));
        } else {
          KD_TRY(cuda::gemm_rm(blas, n, ds, dt, y32, dt, false, wf, ldwf, false, dx32, ds, 0.f));
          KD_TRY(feature_store(dx32, dx, o.accumulate_grad, stream));
        }
      }
    }
    return launch_finish_loss(partial, n, p.divisor_dev, p.divisor, labels.empty() ? nullptr : count,
                              labels.empty() ? n : -1, out, stream);
  }
};

}  // namespace kd
