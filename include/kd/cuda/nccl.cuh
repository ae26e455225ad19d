// kd/cuda/nccl.cuh: kd::communicator over NCCL, one process (rank) per GPU.
//
// nccl_communicator's collectives act on device memory in the order of a kd::cuda::context's stream
// (all_reduce: enqueued, no host wait). NCCL runs on a side stream of the communicator's own, after an
// event of the context's stream: all_reduce makes the stream wait for it at once, all_reduce_begin only
// at all_reduce_end, so gradient buckets reduce while the backward goes on. The host ones (token counts, logged losses, flags, broadcast of
// bytes) stage through a small device buffer and wait. Every wait polls the stream and NCCL's
// asynchronous error state (a non-blocking communicator: NCCL's own error handling) and gives up after
// the group's timeout: the communicator is then aborted and the call fails with a message naming this
// rank, so a rank that died or hangs stops the others instead of leaving them in a collective forever.
// sync() is that wait on its own: call it before a blocking copy that follows collectives.
// The group's ncclUniqueId travels through a file: rank 0 writes it (temporary file, then rename), the
// others wait for it (write_nccl_id / read_nccl_id). Keep NVLink multicast off (NCCL_NVLS_ENABLE=0) on
// shared machines.
#pragma once

#include <cuda_runtime.h>
#include <nccl.h>

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <memory>
#include <string>
#include <thread>
#include <type_traits>

#include <kd/core/comm.hpp>
#include <kd/core/numeric.hpp>
#include <kd/cuda/context.cuh>

namespace kd::cuda {

namespace detail {

inline status nccl_status(ncclResult_t r, const char* what, int rank) {
  if (r == ncclSuccess || r == ncclInProgress) return {};
  return {errc::backend_error, std::string(what) + " (rank " + std::to_string(rank) + "): " + ncclGetErrorString(r)};
}

template <class T>
constexpr ncclDataType_t nccl_type() {
  if constexpr (std::is_same_v<T, float>) return ncclFloat32;
  else if constexpr (std::is_same_v<T, double>) return ncclFloat64;
  else if constexpr (std::is_same_v<T, kd::bfloat16>) return ncclBfloat16;
  else if constexpr (std::is_same_v<T, kd::half>) return ncclFloat16;
  else if constexpr (std::is_same_v<T, std::int64_t>) return ncclInt64;
  else static_assert(sizeof(T) == 0, "kd: nccl_communicator reduces float, double, bfloat16, half and int64 values.");
}

}  // namespace detail

// Rank 0's side: the id into `path` (written beside it, then renamed: a reader never sees half an id).
inline status write_nccl_id(const std::string& path, const ncclUniqueId& id) {
  const std::string tmp = path + ".tmp";
  {
    std::ofstream out(tmp, std::ios::binary | std::ios::trunc);
    out.write(reinterpret_cast<const char*>(&id), sizeof id);
    if (!out) return {errc::io_error, "write_nccl_id: cannot write " + tmp};
  }
  std::error_code ec;
  std::filesystem::rename(tmp, path, ec);
  if (ec) return {errc::io_error, "write_nccl_id: cannot rename " + tmp + " to " + path + ": " + ec.message()};
  return {};
}

// The other ranks' side: waits for the file, up to `timeout`.
inline status read_nccl_id(const std::string& path, ncclUniqueId& id, std::chrono::milliseconds timeout) {
  const auto until = std::chrono::steady_clock::now() + timeout;
  for (;;) {
    std::ifstream in(path, std::ios::binary);
    if (in) {
      in.read(reinterpret_cast<char*>(&id), sizeof id);
      if (in.gcount() == static_cast<std::streamsize>(sizeof id)) return {};
      return {errc::io_error, "read_nccl_id: " + path + " holds " + std::to_string(in.gcount()) + " bytes, not an NCCL id"};
    }
    if (std::chrono::steady_clock::now() > until)
      return {errc::backend_error, "read_nccl_id: no NCCL id at " + path + " after " + std::to_string(timeout.count()) +
                                       " ms (did rank 0 start?)"};
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
}

class nccl_communicator final : public communicator {
 public:
  nccl_communicator(const nccl_communicator&) = delete;
  nccl_communicator& operator=(const nccl_communicator&) = delete;
  ~nccl_communicator() override {
    if (comm_ != nullptr) {
      if (failed_) ncclCommAbort(comm_);
      else ncclCommDestroy(comm_);
    }
    if (staging_ != nullptr) cudaFree(staging_);
    if (done_ != nullptr) cudaEventDestroy(done_);
    if (ready_ != nullptr) cudaEventDestroy(ready_);
    if (reduced_ != nullptr) cudaEventDestroy(reduced_);
    if (side_ != nullptr) cudaStreamDestroy(side_);
  }

  // Joins rank `rank` of `ranks` on the current device, ordered on ctx's stream.
  static status create(context& ctx, int rank, int ranks, const ncclUniqueId& id, std::chrono::milliseconds timeout,
                       std::unique_ptr<nccl_communicator>& out) {
    if (ranks < 1 || rank < 0 || rank >= ranks)
      return {errc::invalid_argument, "nccl_communicator: rank " + std::to_string(rank) + " outside a group of " + std::to_string(ranks)};
    std::unique_ptr<nccl_communicator> c(new nccl_communicator(ctx, rank, ranks, timeout));
    KD_CUDA_TRY(cudaEventCreateWithFlags(&c->done_, cudaEventDisableTiming), "nccl_communicator: cudaEventCreate");
    KD_CUDA_TRY(cudaEventCreateWithFlags(&c->ready_, cudaEventDisableTiming), "nccl_communicator: cudaEventCreate");
    KD_CUDA_TRY(cudaEventCreateWithFlags(&c->reduced_, cudaEventDisableTiming), "nccl_communicator: cudaEventCreate");
    KD_CUDA_TRY(cudaStreamCreateWithFlags(&c->side_, cudaStreamNonBlocking), "nccl_communicator: cudaStreamCreate");
    KD_CUDA_TRY(cudaMalloc(&c->staging_, kStaging), "nccl_communicator: cudaMalloc (staging)");
    ncclConfig_t config = NCCL_CONFIG_INITIALIZER;
    config.blocking = 0;  // every NCCL call returns; waits below poll with a timeout
    KD_TRY(detail::nccl_status(ncclCommInitRankConfig(&c->comm_, ranks, id, rank, &config), "ncclCommInitRankConfig", rank));
    KD_TRY(c->settle("ncclCommInitRankConfig"));
    out = std::move(c);
    return {};
  }

  [[nodiscard]] int rank() const override { return rank_; }
  [[nodiscard]] int size() const override { return ranks_; }
  status all_reduce(float* d, std::size_t n, reduce_op op) override { return reduce_now(d, n, op); }
  status all_reduce(double* d, std::size_t n, reduce_op op) override { return reduce_now(d, n, op); }
  status all_reduce(bfloat16* d, std::size_t n, reduce_op op) override { return reduce_now(d, n, op); }
  status all_reduce(half* d, std::size_t n, reduce_op op) override { return reduce_now(d, n, op); }
  status all_reduce_begin(float* d, std::size_t n, reduce_op op) override { return enqueue(d, n, op); }
  status all_reduce_begin(bfloat16* d, std::size_t n, reduce_op op) override { return enqueue(d, n, op); }
  status all_reduce_begin(half* d, std::size_t n, reduce_op op) override { return enqueue(d, n, op); }
  // The context's stream waits for every reduction started so far.
  status all_reduce_end() override {
    KD_TRY(live("all_reduce_end"));
    KD_CUDA_TRY(cudaEventRecord(reduced_, side_), "nccl_communicator: cudaEventRecord");
    KD_CUDA_TRY(cudaStreamWaitEvent(ctx_->stream(), reduced_, 0), "nccl_communicator: cudaStreamWaitEvent");
    return {};
  }
  status all_reduce_host(std::int64_t* d, std::size_t n, reduce_op op) override { return host_reduce(d, n, op); }
  status all_reduce_host(double* d, std::size_t n, reduce_op op) override { return host_reduce(d, n, op); }
  status broadcast_host(void* data, std::size_t n, int root) override {
    if (root < 0 || root >= ranks_) return {errc::out_of_range, "broadcast_host: root " + std::to_string(root) + " outside the group"};
    for (std::size_t at = 0; at < n; at += kStaging) {
      const std::size_t part = std::min(kStaging, n - at);
      KD_TRY(live("broadcast_host"));
      auto* bytes = static_cast<unsigned char*>(data) + at;
      KD_CUDA_TRY(cudaMemcpyAsync(staging_, bytes, part, cudaMemcpyHostToDevice, ctx_->stream()), "broadcast_host: cudaMemcpyAsync");
      KD_TRY(after_stream());
      KD_TRY(detail::nccl_status(ncclBroadcast(staging_, staging_, part, ncclUint8, root, comm_, side_), "ncclBroadcast", rank_));
      KD_TRY(settle("ncclBroadcast"));
      KD_TRY(all_reduce_end());
      KD_CUDA_TRY(cudaMemcpyAsync(bytes, staging_, part, cudaMemcpyDeviceToHost, ctx_->stream()), "broadcast_host: cudaMemcpyAsync");
      KD_TRY(sync());
    }
    return {};
  }
  status barrier() override {
    std::int64_t one = 1;
    return host_reduce(&one, 1, reduce_op::sum);
  }
  // Waits for everything enqueued on the stream so far, within the timeout.
  status sync() override {
    KD_TRY(all_reduce_end());  // the side stream's reductions too
    KD_CUDA_TRY(cudaEventRecord(done_, ctx_->stream()), "nccl_communicator: cudaEventRecord");
    const auto until = std::chrono::steady_clock::now() + timeout_;
    for (;;) {
      const cudaError_t q = cudaEventQuery(done_);
      if (q == cudaSuccess) return {};
      if (q != cudaErrorNotReady) return fail(detail::cuda_status(q, "nccl_communicator: the stream failed"));
      KD_TRY(async_error("a collective"));
      if (std::chrono::steady_clock::now() > until)
        return fail({errc::backend_error, "rank " + std::to_string(rank_) + ": collectives did not finish within " +
                                              std::to_string(timeout_.count()) + " ms (a peer rank stopped or hangs); "
                                              "the communicator is aborted"});
      std::this_thread::sleep_for(std::chrono::microseconds(50));
    }
  }

 private:
  static constexpr std::size_t kStaging = 1 << 16;  // bytes of the host collectives' device buffer

  nccl_communicator(context& ctx, int rank, int ranks, std::chrono::milliseconds timeout)
      : ctx_(&ctx), rank_(rank), ranks_(ranks), timeout_(timeout) {}

  status live(const char* what) const {
    if (failed_) return {errc::backend_error, std::string(what) + " (rank " + std::to_string(rank_) + "): the communicator was aborted"};
    return {};
  }
  status fail(status s) {
    failed_ = true;
    if (comm_ != nullptr) ncclCommAbort(comm_);
    comm_ = nullptr;
    return s;
  }
  status async_error(const char* what) {
    ncclResult_t r = ncclSuccess;
    const ncclResult_t q = ncclCommGetAsyncError(comm_, &r);
    if (q != ncclSuccess) return fail(detail::nccl_status(q, "ncclCommGetAsyncError", rank_));
    if (r != ncclSuccess && r != ncclInProgress)
      return fail({errc::backend_error, std::string(what) + " (rank " + std::to_string(rank_) + "): " + ncclGetErrorString(r) +
                                            ": " + ncclGetLastError(comm_)});
    return {};
  }
  // A non-blocking call returns before NCCL has taken it: poll until it has, within the timeout.
  status settle(const char* what) {
    const auto until = std::chrono::steady_clock::now() + timeout_;
    for (;;) {
      ncclResult_t r = ncclInProgress;
      const ncclResult_t q = ncclCommGetAsyncError(comm_, &r);
      if (q != ncclSuccess) return fail(detail::nccl_status(q, "ncclCommGetAsyncError", rank_));
      if (r == ncclSuccess) return {};
      if (r != ncclInProgress)
        return fail({errc::backend_error, std::string(what) + " (rank " + std::to_string(rank_) + "): " + ncclGetErrorString(r)});
      if (std::chrono::steady_clock::now() > until)
        return fail({errc::backend_error, std::string(what) + " (rank " + std::to_string(rank_) + ") did not complete within " +
                                              std::to_string(timeout_.count()) + " ms; the communicator is aborted"});
      std::this_thread::sleep_for(std::chrono::microseconds(50));
    }
  }
  // The side stream waits for what the context's stream holds so far.
  status after_stream() {
    KD_CUDA_TRY(cudaEventRecord(ready_, ctx_->stream()), "nccl_communicator: cudaEventRecord");
    KD_CUDA_TRY(cudaStreamWaitEvent(side_, ready_, 0), "nccl_communicator: cudaStreamWaitEvent");
    return {};
  }
  // Every NCCL call of this communicator goes to the one side stream: they run in the order issued.
  template <class T>
  status enqueue(T* d, std::size_t n, reduce_op op) {
    KD_TRY(live("all_reduce"));
    if (n == 0) return {};
    KD_TRY(after_stream());
    KD_TRY(detail::nccl_status(ncclAllReduce(d, d, n, detail::nccl_type<T>(), op == reduce_op::sum ? ncclSum : ncclMax, comm_, side_),
                               "ncclAllReduce", rank_));
    return settle("ncclAllReduce");
  }
  template <class T>
  status reduce_now(T* d, std::size_t n, reduce_op op) {
    KD_TRY(enqueue(d, n, op));
    return all_reduce_end();
  }
  template <class T>
  status host_reduce(T* d, std::size_t n, reduce_op op) {
    const std::size_t per = kStaging / sizeof(T);
    for (std::size_t at = 0; at < n; at += per) {
      const std::size_t part = std::min(per, n - at);
      KD_TRY(live("all_reduce_host"));
      T* dev = static_cast<T*>(staging_);
      KD_CUDA_TRY(cudaMemcpyAsync(dev, d + at, part * sizeof(T), cudaMemcpyHostToDevice, ctx_->stream()), "all_reduce_host: cudaMemcpyAsync");
      KD_TRY(reduce_now(dev, part, op));
      KD_CUDA_TRY(cudaMemcpyAsync(d + at, dev, part * sizeof(T), cudaMemcpyDeviceToHost, ctx_->stream()), "all_reduce_host: cudaMemcpyAsync");
      KD_TRY(sync());
    }
    return {};
  }

  context* ctx_;
  int rank_, ranks_;
  std::chrono::milliseconds timeout_;
  ncclComm_t comm_ = nullptr;
  void* staging_ = nullptr;
  cudaStream_t side_ = nullptr;
  cudaEvent_t done_ = nullptr, ready_ = nullptr, reduced_ = nullptr;
  bool failed_ = false;
};

}  // namespace kd::cuda
