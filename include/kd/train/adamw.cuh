// kd/train/adamw.cuh: AdamW over a flat parameter arena on the GPU, the CUDA twin of kd::adamw<T>
// (kd/train/adamw.hpp). Options, schedule, segments, the per-element formula (kd::adamw_update), its
// scalars (kd::adamw_scalars::make) and the state stream are the CPU reference's own, so a checkpoint
// moves between the two and both compute the same update (to fp32 rounding: the kernel may fuse
// multiply-adds).
//
// Shape of one step (three kernels on the context's stream, no host synchronisation, no allocation:
// graph-capturable once init() reserved the scratch):
//   1. sumsq: the arena is cut into chunks of at most kChunk elements that never straddle a tensor;
//      each chunk's sum of g^2 (fp64) goes to its own slot in the context's scratch. Fixed chunks, not
//      one partial per block, so the result does not depend on the grid, and no float atomics.
//   2. finish (one block): sums the chunk partials in a fixed order (deterministic), finds the first
//      tensor with a non-finite partial, and either records it in the context's error word and sets the
//      skip flag, or counts the step and writes lr(step), the clip factor and the update's scalars to
//      device memory. The step count lives on the device, so a skipped step is not counted without the
//      host ever looking.
//   3. update: one fused elementwise pass over the chunks (grid-stride), reading the scalars and the
//      skip flag from device memory; 16-byte vectors where the arena is aligned, scalar at the edges.
// What bounds it: memory bandwidth. Per parameter, bf16 storage with bf16 gradients moves 30 bytes
// (gradient read twice 2+2, m, v and the fp32 master read and written 3x8, the bf16 parameter written
// 2); float storage with float gradients 32 (4+4, m and v 16, parameter read and written 8). At
// ~4.8 TB/s a 135M-parameter bf16 arena is then ~0.85 ms a step; the arithmetic (a sqrt and a divide per
// element) is far below that. Pass 1 cannot be fused into pass 2: the clip factor needs the whole norm.
#pragma once

#include <cuda_runtime.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <istream>
#include <ostream>
#include <span>
#include <string>
#include <string_view>
#include <type_traits>
#include <vector>

#include <kd/core/status.hpp>
#include <kd/cuda/context.cuh>
#include <kd/cuda/detail/storage.cuh>
#include <kd/train/adamw.hpp>

namespace kd::cuda {

namespace detail {

// A piece of one tensor: the unit of the norm's partial sums and of the update's work distribution.
struct adamw_chunk {
  unsigned long long offset;
  unsigned numel;
  unsigned segment;  // index into the optimizer's segments (the error names it)
  unsigned decay;
  unsigned pad_;
};

inline constexpr unsigned kAdamwChunk = 16384;  // a multiple of every vector width
inline constexpr int kAdamwThreads = 256;

// What the finish kernel leaves for the update kernel and for the host (result()).
struct adamw_device_state {
  adamw_scalars scalars;
  adamw_step_result result;
  long long step;
  int skip;
};

// V elements of X as 32-bit words, moved in 16-byte accesses (one 8-byte access for 8 bytes). The
// stores go through __stwb: plain vector stores came out of nvcc split into 4-byte ones.
template <int W>
__device__ __forceinline__ void load_words(const void* p, unsigned (&w)[W]) {
  if constexpr (W % 4 == 0) {
#pragma unroll
    for (int q = 0; q < W / 4; ++q) {
      const uint4 u = static_cast<const uint4*>(p)[q];
      w[4 * q] = u.x;
      w[4 * q + 1] = u.y;
      w[4 * q + 2] = u.z;
      w[4 * q + 3] = u.w;
    }
  } else {
    static_assert(W == 2);
    const uint2 u = *static_cast<const uint2*>(p);
    w[0] = u.x;
    w[1] = u.y;
  }
}
template <int W>
__device__ __forceinline__ void store_words(void* p, const unsigned (&w)[W]) {
  if constexpr (W % 4 == 0) {
#pragma unroll
    for (int q = 0; q < W / 4; ++q)
      __stwb(static_cast<uint4*>(p) + q, make_uint4(w[4 * q], w[4 * q + 1], w[4 * q + 2], w[4 * q + 3]));
  } else {
    static_assert(W == 2);
    __stwb(static_cast<uint2*>(p), make_uint2(w[0], w[1]));
  }
}

template <class X, int V>
__device__ __forceinline__ void load_vec(const X* p, float (&f)[V]) {
  constexpr int W = V * static_cast<int>(sizeof(X)) / 4;
  unsigned w[W];
  load_words<W>(p, w);
#pragma unroll
  for (int k = 0; k < W; ++k) {
    if constexpr (sizeof(X) == 4) {
      f[k] = __uint_as_float(w[k]);
    } else {
      f[2 * k] = to_float(X::from_bits(static_cast<std::uint16_t>(w[k] & 0xffffu)));
      f[2 * k + 1] = to_float(X::from_bits(static_cast<std::uint16_t>(w[k] >> 16)));
    }
  }
}
template <class X, int V>
__device__ __forceinline__ void store_vec(X* p, const float (&f)[V]) {
  constexpr int W = V * static_cast<int>(sizeof(X)) / 4;
  unsigned w[W];
#pragma unroll
  for (int k = 0; k < W; ++k) {
    if constexpr (sizeof(X) == 4) w[k] = __float_as_uint(f[k]);
    else w[k] = static_cast<unsigned>(from_float<X>(f[2 * k]).bits) | (static_cast<unsigned>(from_float<X>(f[2 * k + 1]).bits) << 16);
  }
  store_words<W>(p, w);
}

// Visits a chunk: scalar elements up to the first multiple of V, then V-vectors, then a scalar tail.
// Without vec_ok (an arena base not aligned for vectors) everything goes scalar.
template <int V, class FV, class FS>
__device__ __forceinline__ void walk_chunk(const adamw_chunk& c, bool vec_ok, FV&& vec, FS&& one) {
  const unsigned head = vec_ok ? min(c.numel, static_cast<unsigned>((V - c.offset % V) % V)) : c.numel;
  for (unsigned i = threadIdx.x; i < head; i += blockDim.x) one(c.offset + i);
  const unsigned nv = (c.numel - head) / V;
  for (unsigned i = threadIdx.x; i < nv; i += blockDim.x) vec(c.offset + head + static_cast<unsigned long long>(i) * V);
  for (unsigned i = head + nv * V + threadIdx.x; i < c.numel; i += blockDim.x) one(c.offset + i);
}

template <class T>
inline constexpr int adamw_width = 16 / static_cast<int>(sizeof(T));  // one 16-byte vector of parameters

template <class T, class G>
__global__ void __launch_bounds__(kAdamwThreads) adamw_sumsq_kernel(const adamw_chunk* __restrict__ chunks,
                                                                    unsigned nchunks, const G* __restrict__ grads,
                                                                    bool vec_ok, double* __restrict__ partial) {
  constexpr int V = adamw_width<T>;
  __shared__ double sh[kAdamwThreads / 32];
  for (unsigned ci = blockIdx.x; ci < nchunks; ci += gridDim.x) {
    const adamw_chunk c = chunks[ci];
    double acc = 0.0;  // fp64 like the CPU reference: a sum of squares of fp32 values cannot overflow it
    walk_chunk<V>(
        c, vec_ok,
        [&](unsigned long long i) {
          float g[V];
          load_vec<G, V>(grads + i, g);
#pragma unroll
          for (int k = 0; k < V; ++k) acc += static_cast<double>(g[k]) * g[k];
        },
        [&](unsigned long long i) {
          const double g = to_float(grads[i]);
          acc += g * g;
        });
    for (int o = 16; o > 0; o >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, o);
    __syncthreads();  // sh may still be read for the previous chunk
    if ((threadIdx.x & 31) == 0) sh[threadIdx.x >> 5] = acc;
    __syncthreads();
    if (threadIdx.x == 0) {
      double s = 0.0;
      for (int w = 0; w < kAdamwThreads / 32; ++w) s += sh[w];
      partial[ci] = s;
    }
  }
}

template <int = 0>  // a template: header-defined kernels must not clash across translation units
__global__ void __launch_bounds__(1024) adamw_finish_kernel(const double* __restrict__ partial,
                                                            const adamw_chunk* __restrict__ chunks, unsigned nchunks,
                                                            adamw_options o, adamw_device_state* st,
                                                            unsigned long long* error, unsigned slot) {
  __shared__ double sum[1024];
  __shared__ unsigned bad[1024];
  double s = 0.0;
  unsigned first = ~0u;
  for (unsigned i = threadIdx.x; i < nchunks; i += blockDim.x) {
    const double p = partial[i];
    if (isfinite(p)) s += p;
    else first = min(first, chunks[i].segment);
  }
  sum[threadIdx.x] = s;
  bad[threadIdx.x] = first;
  __syncthreads();
  for (unsigned w = blockDim.x / 2; w > 0; w >>= 1) {
    if (threadIdx.x < w) {
      sum[threadIdx.x] += sum[threadIdx.x + w];
      bad[threadIdx.x] = min(bad[threadIdx.x], bad[threadIdx.x + w]);
    }
    __syncthreads();
  }
  if (threadIdx.x != 0) return;
  if (bad[0] != ~0u) {
    st->skip = 1;  // nothing changes and the step is not counted, as in the CPU reference
    atomicMin(error, encode_error(bad[0], device_error::non_finite, device_tensor::gradients, slot));
    return;
  }
  const double norm = sqrt(sum[0]);
  const double clip = o.max_grad_norm > 0.0 && norm > o.max_grad_norm ? o.max_grad_norm / norm : 1.0;
  const long long step = st->step + 1;
  const double lr = o.schedule.lr(step);
  st->step = step;
  st->skip = 0;
  st->scalars = adamw_scalars::make(o, step, lr, clip);
  st->result = {step, lr, norm, clip};
}

template <class T, class G>
__global__ void __launch_bounds__(kAdamwThreads) adamw_update_kernel(const adamw_chunk* __restrict__ chunks,
                                                                     unsigned nchunks, T* __restrict__ params,
                                                                     const G* __restrict__ grads, float* __restrict__ m,
                                                                     float* __restrict__ v, float* __restrict__ master,
                                                                     const adamw_device_state* __restrict__ st,
                                                                     bool vec_ok) {
  constexpr int V = adamw_width<T>;
  constexpr bool keeps_master = !std::is_same_v<T, float>;
  if (st->skip != 0) return;
  const adamw_scalars s = st->scalars;
  for (unsigned ci = blockIdx.x; ci < nchunks; ci += gridDim.x) {
    const adamw_chunk c = chunks[ci];
    const bool decay = c.decay != 0;
    walk_chunk<V>(
        c, vec_ok,
        [&](unsigned long long i) {
          float g[V], mm[V], vv[V], p[V];
          load_vec<G, V>(grads + i, g);
          load_vec<float, V>(m + i, mm);
          load_vec<float, V>(v + i, vv);
          if constexpr (keeps_master) load_vec<float, V>(master + i, p);
          else load_vec<T, V>(params + i, p);
#pragma unroll
          for (int k = 0; k < V; ++k) p[k] = adamw_update(g[k], mm[k], vv[k], p[k], decay, s);
          store_vec<float, V>(m + i, mm);
          store_vec<float, V>(v + i, vv);
          if constexpr (keeps_master) store_vec<float, V>(master + i, p);
          store_vec<T, V>(params + i, p);
        },
        [&](unsigned long long i) {
          float mm = m[i], vv = v[i];
          const float p = adamw_update(to_float(grads[i]), mm, vv, keeps_master ? master[i] : to_float(params[i]),
                                       decay, s);
          m[i] = mm;
          v[i] = vv;
          if constexpr (keeps_master) master[i] = p;
          params[i] = from_float<T>(p);
        });
  }
}

template <class T>
__global__ void adamw_master_kernel(const T* __restrict__ params, float* __restrict__ master, unsigned long long n) {
  for (unsigned long long i = blockIdx.x * static_cast<unsigned long long>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<unsigned long long>(gridDim.x) * blockDim.x)
    master[i] = to_float(params[i]);
}

}  // namespace detail

// T: parameter storage (float, bfloat16 or half), device memory. m, v and the fp32 master copy of
// 16-bit parameters live on the device, owned by the optimizer.
template <class T>
class adamw {
 public:
  // The CPU reference's rule (and, by instantiating it, its check of T).
  static constexpr bool keeps_master = kd::adamw<T>::keeps_master;

  adamw() = default;
  adamw(const adamw&) = delete;
  adamw& operator=(const adamw&) = delete;
  ~adamw() { release(); }

  // Validates options and segments against the device arena `params`, allocates zero m and v (and the
  // fp32 master copy of 16-bit parameters, taken from `params`) and reserves the step's scratch.
  // Resets the step count. `component` names the optimizer in error messages.
  status init(context& ctx, std::vector<adamw_segment> segments, std::span<const T> params, const adamw_options& o,
              std::string_view component = "adamw") {
    KD_TRY(o.validate());
    KD_TRY(kd::detail::check_adamw_segments(segments, params.size()));
    KD_TRY(detail::check_alignment(params.data(), "adamw parameters", component));
    release();
    opt_ = o;
    segments_ = std::move(segments);
    n_ = params.size();
    chunks_.clear();
    std::vector<std::string> names;
    for (std::size_t si = 0; si < segments_.size(); ++si) {
      const adamw_segment& s = segments_[si];
      names.push_back(s.name);
      for (std::size_t at = 0; at < s.numel; at += detail::kAdamwChunk)
        chunks_.push_back({s.offset + at, static_cast<unsigned>(std::min<std::size_t>(detail::kAdamwChunk, s.numel - at)),
                           static_cast<unsigned>(si), s.decay ? 1u : 0u, 0u});
    }
    slot_ = ctx.component_slot(component);
    ctx.name_rows(slot_, std::move(names));
    int device = 0, sms = 0;
    KD_CUDA_TRY(cudaGetDevice(&device), "cudaGetDevice");
    KD_CUDA_TRY(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device), "cudaDeviceGetAttribute");
    grid_ = static_cast<unsigned>(std::max(1, sms * 8));
    const cudaStream_t stream = ctx.stream();
    const std::size_t bytes = std::max<std::size_t>(n_, 1) * sizeof(float);
    KD_CUDA_TRY(cudaMalloc(&m_, bytes), "cudaMalloc (adamw m)");
    KD_CUDA_TRY(cudaMalloc(&v_, bytes), "cudaMalloc (adamw v)");
    if constexpr (keeps_master) KD_CUDA_TRY(cudaMalloc(&master_, bytes), "cudaMalloc (adamw master)");
    KD_CUDA_TRY(cudaMalloc(&chunks_dev_, std::max<std::size_t>(chunks_.size(), 1) * sizeof(detail::adamw_chunk)),
                "cudaMalloc (adamw chunks)");
    KD_CUDA_TRY(cudaMalloc(&state_, sizeof(detail::adamw_device_state)), "cudaMalloc (adamw state)");
    KD_CUDA_TRY(cudaMemcpyAsync(chunks_dev_, chunks_.data(), chunks_.size() * sizeof(detail::adamw_chunk),
                                cudaMemcpyHostToDevice, stream),
                "cudaMemcpyAsync (adamw chunks)");
    KD_CUDA_TRY(cudaMemsetAsync(m_, 0, bytes, stream), "cudaMemsetAsync");
    KD_CUDA_TRY(cudaMemsetAsync(v_, 0, bytes, stream), "cudaMemsetAsync");
    KD_CUDA_TRY(cudaMemsetAsync(state_, 0, sizeof(detail::adamw_device_state), stream), "cudaMemsetAsync");
    if constexpr (keeps_master) {
      if (n_ > 0) {
        detail::adamw_master_kernel<T><<<grid_, detail::kAdamwThreads, 0, stream>>>(params.data(), master_, n_);
        KD_CUDA_TRY(cudaGetLastError(), "adamw master kernel launch");
      }
    }
    void* scratch = nullptr;
    KD_TRY(ctx.scratch(chunk_count() * sizeof(double), scratch));  // reserved now: step() never allocates
    unsigned long long* error = nullptr;
    KD_TRY(ctx.error_word(error));
    return {};
  }

  // One update of the device arena `params` from `grads` (both the whole arena; G: float, bfloat16 or
  // half), queued on the context's stream. Host-side errors come back at once; a non-finite gradient is
  // found on the device: no parameter changes, the step is not counted, and ctx.sync_status() reports
  // it naming the tensor.
  template <class G>
  status step(context& ctx, std::span<T> params, std::span<const G> grads) {
    static_assert(std::is_same_v<G, float> || is_16bit_float_v<G>,
                  "kd: adamw gradients are float, kd::bfloat16 or kd::half.");
    if (state_ == nullptr) return {errc::invalid_argument, "adamw: step() before init()"};
    if (params.size() != n_ || grads.size() != n_)
      return {errc::shape_mismatch, "adamw: arena of " + std::to_string(n_) + " elements (init), got " +
                                        std::to_string(params.size()) + " parameters and " +
                                        std::to_string(grads.size()) + " gradients"};
    KD_TRY(detail::check_alignment(params.data(), "adamw parameters", "adamw"));
    KD_TRY(detail::check_alignment(grads.data(), "adamw gradients", "adamw"));
    constexpr int V = detail::adamw_width<T>;
    const bool vec_ok = reinterpret_cast<std::uintptr_t>(params.data()) % (V * sizeof(T)) == 0 &&
                        reinterpret_cast<std::uintptr_t>(grads.data()) % (V * sizeof(G)) == 0;
    void* scratch = nullptr;
    KD_TRY(ctx.scratch(chunk_count() * sizeof(double), scratch));
    unsigned long long* error = nullptr;
    KD_TRY(ctx.error_word(error));
    const auto partial = static_cast<double*>(scratch);
    const auto nchunks = static_cast<unsigned>(chunks_.size());
    const unsigned grid = std::max(1u, std::min(nchunks, grid_));
    const cudaStream_t stream = ctx.stream();
    detail::adamw_sumsq_kernel<T, G><<<grid, detail::kAdamwThreads, 0, stream>>>(chunks_dev_, nchunks, grads.data(),
                                                                               vec_ok, partial);
    KD_CUDA_TRY(cudaGetLastError(), "adamw sumsq kernel launch");
    detail::adamw_finish_kernel<><<<1, 1024, 0, stream>>>(partial, chunks_dev_, nchunks, opt_, state_, error, slot_);
    KD_CUDA_TRY(cudaGetLastError(), "adamw finish kernel launch");
    detail::adamw_update_kernel<T, G><<<grid, detail::kAdamwThreads, 0, stream>>>(
        chunks_dev_, nchunks, params.data(), grads.data(), m_, v_, master_, state_, vec_ok);
    KD_CUDA_TRY(cudaGetLastError(), "adamw update kernel launch");
    return {};
  }

  // The last counted step's result, in device memory (for logging without a synchronisation here).
  [[nodiscard]] const adamw_step_result* device_result() const noexcept {
    return state_ == nullptr ? nullptr : &state_->result;
  }
  // Waits for the stream and reads the last counted step's result (step 0 and zeros before the first).
  status result(context& ctx, adamw_step_result& out) const {
    if (state_ == nullptr) return {errc::invalid_argument, "adamw: result() before init()"};
    KD_CUDA_TRY(cudaMemcpyAsync(&out, &state_->result, sizeof out, cudaMemcpyDeviceToHost, ctx.stream()),
                "cudaMemcpyAsync (adamw result)");
    KD_CUDA_TRY(cudaStreamSynchronize(ctx.stream()), "cudaStreamSynchronize");
    return {};
  }

  [[nodiscard]] const adamw_options& options() const noexcept { return opt_; }
  [[nodiscard]] const std::vector<adamw_segment>& segments() const noexcept { return segments_; }
  [[nodiscard]] std::size_t size() const noexcept { return n_; }

  // Copies the state to the host (waits for the stream): step, m, v and master (empty for float).
  status download(context& ctx, std::int64_t& step, std::vector<float>& m, std::vector<float>& v,
                  std::vector<float>& master) const {
    if (state_ == nullptr) return {errc::invalid_argument, "adamw: download() before init()"};
    const cudaStream_t stream = ctx.stream();
    m.resize(n_);
    v.resize(n_);
    master.resize(keeps_master ? n_ : 0);
    long long s = 0;
    KD_CUDA_TRY(cudaMemcpyAsync(&s, &state_->step, sizeof s, cudaMemcpyDeviceToHost, stream), "cudaMemcpyAsync");
    KD_CUDA_TRY(cudaMemcpyAsync(m.data(), m_, n_ * sizeof(float), cudaMemcpyDeviceToHost, stream), "cudaMemcpyAsync");
    KD_CUDA_TRY(cudaMemcpyAsync(v.data(), v_, n_ * sizeof(float), cudaMemcpyDeviceToHost, stream), "cudaMemcpyAsync");
    if constexpr (keeps_master)
      KD_CUDA_TRY(cudaMemcpyAsync(master.data(), master_, n_ * sizeof(float), cudaMemcpyDeviceToHost, stream),
                  "cudaMemcpyAsync");
    KD_CUDA_TRY(cudaStreamSynchronize(stream), "cudaStreamSynchronize");
    step = s;
    return {};
  }

  // Replaces the state with one from the host (an arena of the same size; master empty for float).
  status upload(context& ctx, std::int64_t step, std::span<const float> m, std::span<const float> v,
                std::span<const float> master) {
    if (state_ == nullptr) return {errc::invalid_argument, "adamw: upload() before init()"};
    if (m.size() != n_ || v.size() != n_ || master.size() != (keeps_master ? n_ : 0) || step < 0)
      return {errc::shape_mismatch, "adamw: uploaded state does not match an arena of " + std::to_string(n_) +
                                        " elements (m " + std::to_string(m.size()) + ", v " +
                                        std::to_string(v.size()) + ", master " + std::to_string(master.size()) + ")"};
    const cudaStream_t stream = ctx.stream();
    const long long s = step;
    KD_CUDA_TRY(cudaMemcpyAsync(&state_->step, &s, sizeof s, cudaMemcpyHostToDevice, stream), "cudaMemcpyAsync");
    KD_CUDA_TRY(cudaMemcpyAsync(m_, m.data(), n_ * sizeof(float), cudaMemcpyHostToDevice, stream), "cudaMemcpyAsync");
    KD_CUDA_TRY(cudaMemcpyAsync(v_, v.data(), n_ * sizeof(float), cudaMemcpyHostToDevice, stream), "cudaMemcpyAsync");
    if constexpr (keeps_master)
      KD_CUDA_TRY(cudaMemcpyAsync(master_, master.data(), n_ * sizeof(float), cudaMemcpyHostToDevice, stream),
                  "cudaMemcpyAsync");
    KD_CUDA_TRY(cudaStreamSynchronize(stream), "cudaStreamSynchronize");  // the host buffers may go now
    return {};
  }

  // The CPU optimizer's state stream (kd::adamw<T>::save / load read and write the same bytes).
  status save(context& ctx, std::ostream& os) const {
    std::int64_t step = 0;
    std::vector<float> m, v, master;
    KD_TRY(download(ctx, step, m, v, master));
    return kd::detail::write_adamw_state(os, sizeof(T), step, m, v, master);
  }
  status load(context& ctx, std::istream& is) {
    if (state_ == nullptr) return {errc::invalid_argument, "adamw: load() before init()"};
    std::int64_t step = 0;
    std::vector<float> m, v, master;
    KD_TRY(kd::detail::read_adamw_state(is, sizeof(T), n_, keeps_master, step, m, v, master));
    return upload(ctx, step, m, v, master);
  }

 private:
  [[nodiscard]] std::size_t chunk_count() const noexcept { return std::max<std::size_t>(chunks_.size(), 1); }

  void release() noexcept {
    for (void* p : {static_cast<void*>(m_), static_cast<void*>(v_), static_cast<void*>(master_),
                    static_cast<void*>(chunks_dev_), static_cast<void*>(state_)})
      if (p != nullptr) cudaFree(p);
    m_ = v_ = master_ = nullptr;
    chunks_dev_ = nullptr;
    state_ = nullptr;
  }

  adamw_options opt_;
  std::vector<adamw_segment> segments_;
  std::vector<detail::adamw_chunk> chunks_;
  std::size_t n_ = 0;
  unsigned slot_ = 0, grid_ = 1;
  float *m_ = nullptr, *v_ = nullptr, *master_ = nullptr;
  detail::adamw_chunk* chunks_dev_ = nullptr;
  detail::adamw_device_state* state_ = nullptr;
};

}  // namespace kd::cuda
