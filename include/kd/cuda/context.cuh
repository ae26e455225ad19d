// kd/cuda/context.cuh: the CUDA backend object, its scratch memory and its deferred error word.
//
// Loss calls on the CUDA backend never synchronise. Errors found on the host (shapes, strides,
// alignment, parameters) come back at once as the call's kd::status. Errors that only the data can
// reveal (a label outside the vocabulary, NaN/Inf in a row) are found by the kernels, which record the
// first one (lowest row) in a device error word and treat the row as ignored; sync_status() waits for the
// stream and turns that word into a kd::status naming the tensor, row and component. Call it where
// the trainer synchronises anyway (at logging, before the optimizer step's loss-scale decision).
#pragma once

#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <string_view>
#include <tuple>
#include <typeindex>
#include <typeinfo>
#include <unordered_map>
#include <utility>
#include <vector>

#include <kd/core/status.hpp>

namespace kd::cuda {

// What a loss writes on the device: the reduced loss (and optionally the token count), never N x V.
struct device_loss {
  float* value = nullptr;              // one float, device memory
  long long* tokens = nullptr;         // optional: non-ignored tokens counted by the call
};

namespace detail {

// Deferred error codes recorded by kernels.
enum class device_error : unsigned { none = 0, label_out_of_range = 1, non_finite = 2 };
enum class device_tensor : unsigned { teacher = 1, student = 2, labels = 3, hidden = 4, scores = 5, router = 6, gradients = 7 };

// Key layout: row (40 bits) | code (8) | tensor (8) | component slot (8): atomicMin keeps the lowest row.
__host__ __device__ inline unsigned long long encode_error(long long row, device_error code, device_tensor tensor,
                                                           unsigned component) {
  return (static_cast<unsigned long long>(row) << 24) | (static_cast<unsigned long long>(code) << 16) |
         (static_cast<unsigned long long>(tensor) << 8) | (component & 0xffu);
}

inline status cuda_status(cudaError_t e, const char* what) {
  if (e == cudaSuccess) return {};
  return {errc::backend_error, std::string(what) + ": " + cudaGetErrorString(e)};
}

// The launch configuration of a 1-D grid of 1-D thread-block clusters (cudaLaunchKernelEx). Not
// copyable: cfg points at the struct's own attribute.
struct cluster_launch {
  cudaLaunchAttribute attr[1];
  cudaLaunchConfig_t cfg{};
  cluster_launch(long long blocks, int cluster, int threads, std::size_t smem, cudaStream_t stream) {
    cfg.gridDim = dim3(static_cast<unsigned>(blocks));
    cfg.blockDim = dim3(static_cast<unsigned>(threads));
    cfg.dynamicSmemBytes = smem;
    cfg.stream = stream;
    attr[0].id = cudaLaunchAttributeClusterDimension;
    attr[0].val.clusterDim.x = static_cast<unsigned>(cluster);
    attr[0].val.clusterDim.y = 1;
    attr[0].val.clusterDim.z = 1;
    cfg.attrs = attr;
    cfg.numAttrs = 1;
  }
  cluster_launch(const cluster_launch&) = delete;
  cluster_launch& operator=(const cluster_launch&) = delete;
};

}  // namespace detail

#define KD_CUDA_TRY(expr, what) KD_TRY(::kd::cuda::detail::cuda_status((expr), (what)))

// How logit_kd schedules the rows of an unmapped call (kd/loss/logit_kd.cuh): automatic (the planner's
// choice: one cluster per row, which measures 0.96-1.26x the ring at V = 32,000 and more above it since
// 2026-12-06, see plan_ring), per_row (one cluster per row), or ring (the persistent ring kernel wherever
// its slices fit). A knob for tests and benchmarks, like the slice budget.
enum class row_schedule { automatic, per_row, ring };

class context {
 public:
  explicit context(cudaStream_t stream = nullptr) : stream_(stream) {}
  context(const context&) = delete;
  context& operator=(const context&) = delete;
  ~context() {
    if (cublas_ != nullptr) cublasDestroy(cublas_);
    if (cublas_workspace_ != nullptr) cudaFree(cublas_workspace_);
    for (auto& [key, b] : cache_) cudaFree(b.data);
    if (scratch_ != nullptr) cudaFree(scratch_);
    if (error_ != nullptr) cudaFree(error_);
    if (ticket_ != nullptr) cudaFree(ticket_);
  }

  [[nodiscard]] cudaStream_t stream() const noexcept { return stream_; }
  // Shared-memory bytes a row-kernel block may use for its slice of a row (kd/loss/logit_kd.cuh):
  // smaller slices mean larger clusters and more blocks per SM. A tuning knob for benchmarks; the
  // default is what benchmarks/RESULTS.md measured best (64 KiB since session 19: 3-4 blocks an SM; the
  // CSR map's gathering kernel takes half of it).
  [[nodiscard]] std::size_t slice_budget() const noexcept { return slice_budget_; }
  void set_slice_budget(std::size_t bytes) noexcept { slice_budget_ = bytes; }
  [[nodiscard]] row_schedule schedule() const noexcept { return schedule_; }
  void set_schedule(row_schedule s) noexcept { schedule_ = s; }

  // Device scratch currently held (the O(N) extra memory of the losses).
  [[nodiscard]] std::size_t scratch_capacity() const noexcept { return scratch_bytes_; }

  // Scratch memory of at least `bytes`, valid until the next call that reserves more. Grown in
  // stream order, so no synchronisation.
  status scratch(std::size_t bytes, void*& out) {
    if (bytes > scratch_bytes_) {
      if (scratch_ != nullptr) KD_CUDA_TRY(cudaFreeAsync(scratch_, stream_), "cudaFreeAsync");
      scratch_ = nullptr;
      scratch_bytes_ = 0;
      const std::size_t grow = bytes < (1u << 20) ? (1u << 20) : bytes;
      KD_CUDA_TRY(cudaMallocAsync(&scratch_, grow, stream_), "cudaMallocAsync (kd scratch)");
      scratch_bytes_ = grow;
    }
    out = scratch_;
    return {};
  }

  // The device error word (allocated and cleared on first use).
  status error_word(unsigned long long*& out) {
    if (error_ == nullptr) {
      KD_CUDA_TRY(cudaMalloc(&error_, sizeof(unsigned long long)), "cudaMalloc (kd error word)");
      KD_CUDA_TRY(cudaMemsetAsync(error_, 0xff, sizeof(unsigned long long), stream_), "cudaMemsetAsync");
    }
    out = error_;
    return {};
  }

  // The grid ticket of kernels that end their own reduction (the last block to finish sums the
  // partials: kd::cuda::detail::last_block_of_grid). Zero between kernels; made on first use. So the
  // calls of one context must not overlap: they run on its stream (a captured graph of them is replayed
  // on that stream, or ordered with it), as its scratch already requires.
  status ticket(unsigned*& out) {
    if (ticket_ == nullptr) {
      KD_CUDA_TRY(cudaMalloc(&ticket_, sizeof(unsigned)), "cudaMalloc (kd grid ticket)");
      KD_CUDA_TRY(cudaMemsetAsync(ticket_, 0, sizeof(unsigned), stream_), "cudaMemsetAsync");
    }
    out = ticket_;
    return {};
  }

  // Raises a kernel's dynamic shared-memory limit to `bytes`, once per kernel and size: the attribute
  // call costs about a microsecond of host time, which small calls cannot afford every time.
  template <class Kernel>
  status allow_dynamic_smem(Kernel* kernel, std::size_t bytes) {
    const void* key = reinterpret_cast<const void*>(kernel);
    auto it = std::find_if(smem_set_.begin(), smem_set_.end(), [&](const auto& e) { return e.first == key; });
    if (it != smem_set_.end() && it->second >= bytes) return {};
    KD_CUDA_TRY(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)),
                "cudaFuncSetAttribute");
    if (it != smem_set_.end()) it->second = bytes;
    else smem_set_.emplace_back(key, bytes);
    return {};
  }

  // Lets `kernel` launch in clusters of more than 8 blocks (Hopper's non-portable sizes, up to 16), once
  // per kernel; max_active_clusters then tells whether a size fits.
  template <class Kernel>
  status allow_wide_clusters(Kernel* kernel) {
    const void* key = reinterpret_cast<const void*>(kernel);
    if (std::find(wide_set_.begin(), wide_set_.end(), key) != wide_set_.end()) return {};
    KD_CUDA_TRY(cudaFuncSetAttribute(kernel, cudaFuncAttributeNonPortableClusterSizeAllowed, 1), "cudaFuncSetAttribute");
    wide_set_.push_back(key);
    return {};
  }

  // Clusters of `cluster` blocks of `threads` threads and `smem` bytes of dynamic shared memory that fit
  // on the device at once (a persistent kernel's grid), queried once per kernel and shape: the query
  // costs microseconds of host time. Call after allow_dynamic_smem for that size.
  template <class Kernel>
  status max_active_clusters(Kernel* kernel, int cluster, int threads, std::size_t smem, int& out) {
    const auto key = std::make_tuple(reinterpret_cast<const void*>(kernel), cluster, threads, smem);
    for (const auto& [k, n] : active_clusters_)
      if (k == key) {
        out = n;
        return {};
      }
    const detail::cluster_launch l(cluster, cluster, threads, smem, stream_);
    int n = 0;
    KD_CUDA_TRY(cudaOccupancyMaxActiveClusters(&n, kernel, &l.cfg), "cudaOccupancyMaxActiveClusters");
    active_clusters_.emplace_back(key, n);
    out = n;
    return {};
  }

  // Streaming multiprocessors of the current device (queried once).
  int sm_count() {
    if (sm_count_ == 0) {
      int dev = 0;
      if (cudaGetDevice(&dev) != cudaSuccess ||
          cudaDeviceGetAttribute(&sm_count_, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess)
        sm_count_ = 1;  // unknown: the launch plans that use it fall back to their plain shape
    }
    return sm_count_;
  }

  // The context's cuBLAS handle, bound to its stream (created on first use).
  status cublas(cublasHandle_t& out) {
    if (cublas_ == nullptr) {
      if (cublasCreate(&cublas_) != CUBLAS_STATUS_SUCCESS) return {errc::backend_error, "cublasCreate failed"};
      if (cublasSetStream(cublas_, stream_) != CUBLAS_STATUS_SUCCESS) return {errc::backend_error, "cublasSetStream failed"};
      // cuBLAS's own default workspace is smaller than Hopper's GEMM kernels want (NVIDIA recommends 32 MiB
      // on sm_90); without it some shapes fall back to slower split strategies.
      KD_CUDA_TRY(cudaMalloc(&cublas_workspace_, kCublasWorkspace), "cudaMalloc (cuBLAS workspace)");
      if (cublasSetWorkspace(cublas_, cublas_workspace_, kCublasWorkspace) != CUBLAS_STATUS_SUCCESS)
        return {errc::backend_error, "cublasSetWorkspace failed"};
    }
    out = cublas_;
    return {};
  }

  // Registers a component name for error messages; returns its slot.
  unsigned component_slot(std::string_view name) {
    for (unsigned i = 0; i < components_.size(); ++i)
      if (components_[i] == name) return i;
    if (components_.size() >= 255) return 255;
    components_.emplace_back(name);
    return static_cast<unsigned>(components_.size() - 1);
  }

  // Names the rows of a component's errors where a row is a tensor (the optimizer's segments), so
  // sync_status() can say which tensor held a non-finite gradient.
  void name_rows(unsigned slot, std::vector<std::string> names) { row_names_[slot] = std::move(names); }

  // Waits for the stream, then reports (and clears) the first error any kernel recorded.
  status sync_status() {
    KD_CUDA_TRY(cudaStreamSynchronize(stream_), "cudaStreamSynchronize");
    KD_CUDA_TRY(cudaGetLastError(), "a kd kernel");
    if (error_ == nullptr) return {};
    unsigned long long key = ~0ull;
    KD_CUDA_TRY(cudaMemcpy(&key, error_, sizeof key, cudaMemcpyDeviceToHost), "cudaMemcpy (kd error word)");
    if (key == ~0ull) return {};
    KD_CUDA_TRY(cudaMemset(error_, 0xff, sizeof key), "cudaMemset (kd error word)");
    const long long row = static_cast<long long>(key >> 24);
    const auto code = static_cast<detail::device_error>((key >> 16) & 0xff);
    const auto tensor = static_cast<detail::device_tensor>((key >> 8) & 0xff);
    const unsigned slot = key & 0xff;
    const std::string comp = slot < components_.size() ? components_[slot] : std::string("?");
    const char* tname = tensor == detail::device_tensor::teacher   ? "teacher logits"
                        : tensor == detail::device_tensor::student ? "student logits"
                        : tensor == detail::device_tensor::labels  ? "labels"
                        : tensor == detail::device_tensor::hidden  ? "hidden states"
                        : tensor == detail::device_tensor::scores  ? "attention scores"
                                                                   : "router logits";
    if (code == detail::device_error::label_out_of_range)
      return {errc::out_of_range, std::string(tensor == detail::device_tensor::router
                                                  ? "an expert id outside the router's experts at token "
                                                  : "a label outside the vocabulary at token ") +
                                      std::to_string(row) + " (component '" + comp + "')"};
    if (tensor == detail::device_tensor::gradients) {
      const auto it = row_names_.find(slot);
      const std::string which = it != row_names_.end() && static_cast<std::size_t>(row) < it->second.size()
                                    ? "'" + it->second[static_cast<std::size_t>(row)] + "'"
                                    : "#" + std::to_string(row);
      return {errc::non_finite, "non-finite gradient in tensor " + which + " (component '" + comp +
                                    "'); no parameter was updated and the step was not counted"};
    }
    return {errc::non_finite, std::string("NaN or Inf in ") + tname + " at token " + std::to_string(row) +
                                  " (component '" + comp + "')"};
  }

  // A device buffer kept for the context's lifetime under a caller-chosen 64-bit key (e.g. a
  // vocab_map's id) and a tag that tells apart the buffers derived from one key (a map's CSR image is
  // tag 0): components cache device copies of immutable host objects here, so each is uploaded once per
  // context instead of once per call. On the first request for (key, tag), make() returns the host bytes
  // (a std::vector<unsigned char>), which are uploaded; later requests return the same buffer without
  // calling make().
  template <class Make>
  status cached_buffer(std::uint64_t key, Make&& make, const void*& out, unsigned tag = 0) {
    const auto k = std::make_pair(key, tag);
    if (auto it = cache_.find(k); it != cache_.end()) {
      out = it->second.data;
      return {};
    }
    const std::vector<unsigned char> host = make();
    void* d = nullptr;
    if (!host.empty()) {
      KD_CUDA_TRY(cudaMalloc(&d, host.size()), "cudaMalloc (kd device cache)");
      if (const cudaError_t e = cudaMemcpy(d, host.data(), host.size(), cudaMemcpyHostToDevice); e != cudaSuccess) {
        cudaFree(d);
        return detail::cuda_status(e, "cudaMemcpy (kd device cache)");
      }
    }
    cache_.emplace(k, cached{d, host.size()});
    out = d;
    return {};
  }

  // A host object of type T derived from an immutable one, kept for the context's lifetime under its key
  // (e.g. a vocab_map's compact form under the map's id), so that host work a call would repeat (a sort
  // of the map) runs once per context. On the first request for (key, T), make(T&) fills a fresh T and
  // returns a status (on failure nothing is kept); later requests return the same object.
  template <class T, class Make>
  status cached_object(std::uint64_t key, Make&& make, const T*& out) {
    const auto k = std::make_pair(key, std::type_index(typeid(T)));
    if (auto it = objects_.find(k); it != objects_.end()) {
      out = static_cast<const T*>(it->second.get());
      return {};
    }
    auto obj = std::make_shared<T>();
    KD_TRY(make(*obj));
    out = obj.get();
    objects_.emplace(k, std::move(obj));
    return {};
  }

 private:
  struct cached {
    void* data = nullptr;
    std::size_t bytes = 0;
  };

  cudaStream_t stream_;
  cublasHandle_t cublas_ = nullptr;
  static constexpr std::size_t kCublasWorkspace = 32u << 20;
  void* cublas_workspace_ = nullptr;
  std::size_t slice_budget_ = 64 * 1024;  // 3-4 blocks an SM (benchmarks/RESULTS.md session 19, budget sweep)
  void* scratch_ = nullptr;
  std::size_t scratch_bytes_ = 0;
  unsigned long long* error_ = nullptr;
  unsigned* ticket_ = nullptr;
  int sm_count_ = 0;
  row_schedule schedule_ = row_schedule::automatic;
  std::vector<std::pair<const void*, std::size_t>> smem_set_;  // dynamic shared memory allowed per kernel
  std::vector<const void*> wide_set_;  // kernels allowed clusters of more than 8 blocks
  std::vector<std::pair<std::tuple<const void*, int, int, std::size_t>, int>> active_clusters_;
  std::vector<std::string> components_;
  std::map<std::pair<std::uint64_t, unsigned>, cached> cache_;
  std::map<std::pair<std::uint64_t, std::type_index>, std::shared_ptr<void>> objects_;
  std::unordered_map<unsigned, std::vector<std::string>> row_names_;
};

// The backend argument of a loss call: a context (stream, scratch, error word).
struct backend {
  static constexpr std::string_view name = "cuda";
  context* ctx = nullptr;
};

}  // namespace kd::cuda
