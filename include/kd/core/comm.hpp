// kd/core/comm.hpp: collective communication between the ranks of a data- or vocabulary-parallel run.
//
// kd::communicator is one rank's handle on a group of ranks. Its collectives act in place on memory of
// the communicator's own kind: host memory for the CPU communicators here, device memory in stream order
// for kd::cuda::nccl_communicator (kd/cuda/nccl.cuh). Code written against it (the vocabulary-parallel
// losses, the trainer's gradient all-reduce) runs unchanged on one rank, on threads of one process (the
// CPU tests and the CPU trainer) and on NCCL ranks, one process per GPU.
//   solo_communicator     one rank: every collective is the identity (the N = 1 path, bit for bit)
//   thread_group          N ranks as threads of one process; member(r) is rank r's communicator. Sums run
//                         in rank order, so a result does not depend on which thread arrives first.
// A rank that never arrives does not deadlock the others: a collective that waits longer than the
// group's timeout fails with errc::backend_error naming the collective and the ranks that are missing,
// and the group is marked failed, so every later collective fails at once.
#pragma once

#include <algorithm>
#include <chrono>
#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <memory>
#include <mutex>
#include <string>
#include <type_traits>
#include <vector>

#include <kd/core/numeric.hpp>
#include <kd/core/status.hpp>

namespace kd {

enum class reduce_op { sum, max };

class communicator {
 public:
  virtual ~communicator() = default;
  [[nodiscard]] virtual int rank() const = 0;
  [[nodiscard]] virtual int size() const = 0;
  // In place over the group: every rank ends with the reduction of every rank's n values.
  virtual status all_reduce(float* data, std::size_t n, reduce_op op) = 0;
  virtual status all_reduce(double* data, std::size_t n, reduce_op op) = 0;
  // 16-bit storage (gradients of bf16 / fp16 models): the CPU group adds in float and rounds once; NCCL
  // reduces in the type itself.
  virtual status all_reduce(bfloat16* data, std::size_t n, reduce_op op) = 0;
  virtual status all_reduce(half* data, std::size_t n, reduce_op op) = 0;
  // Host values (token counts, flags, logged losses): available on return on every kind of communicator.
  virtual status all_reduce_host(std::int64_t* data, std::size_t n, reduce_op op) = 0;
  virtual status all_reduce_host(double* data, std::size_t n, reduce_op op) = 0;
  // Rank `root`'s n bytes to every rank (host memory).
  virtual status broadcast_host(void* data, std::size_t n, int root) = 0;
  // Returns once every rank has arrived (or the group has failed).
  virtual status barrier() = 0;
  // An all-reduce that may overlap with later work: device communicators start it on a side stream after
  // everything the stream holds so far and return; the buffer must not be touched until all_reduce_end(),
  // which orders every started reduction before the stream's later work. Host communicators finish it at
  // once (as all_reduce).
  virtual status all_reduce_begin(float* data, std::size_t n, reduce_op op) { return all_reduce(data, n, op); }
  virtual status all_reduce_begin(bfloat16* data, std::size_t n, reduce_op op) { return all_reduce(data, n, op); }
  virtual status all_reduce_begin(half* data, std::size_t n, reduce_op op) { return all_reduce(data, n, op); }
  virtual status all_reduce_end() { return {}; }
  // Waits for the collectives this rank has enqueued (device communicators run them in stream order),
  // failing after the group's timeout: call it before a blocking copy that follows collectives. Host
  // communicators finish each collective before returning: nothing to wait for.
  virtual status sync() { return {}; }
};

// One rank: the collectives leave the data as it is.
class solo_communicator final : public communicator {
 public:
  [[nodiscard]] int rank() const override { return 0; }
  [[nodiscard]] int size() const override { return 1; }
  status all_reduce(float*, std::size_t, reduce_op) override { return {}; }
  status all_reduce(double*, std::size_t, reduce_op) override { return {}; }
  status all_reduce(bfloat16*, std::size_t, reduce_op) override { return {}; }
  status all_reduce(half*, std::size_t, reduce_op) override { return {}; }
  status all_reduce_host(std::int64_t*, std::size_t, reduce_op) override { return {}; }
  status all_reduce_host(double*, std::size_t, reduce_op) override { return {}; }
  status broadcast_host(void*, std::size_t, int root) override {
    return root == 0 ? status{} : status{errc::out_of_range, "broadcast: root " + std::to_string(root) + " outside a group of 1"};
  }
  status barrier() override { return {}; }
};

// N ranks as threads of one process, over host memory.
class thread_group {
 public:
  explicit thread_group(int ranks, std::chrono::milliseconds timeout = std::chrono::minutes(5))
      : n_(std::max(ranks, 1)), timeout_(timeout), slots_(static_cast<std::size_t>(n_)) {
    for (int r = 0; r < n_; ++r) members_.push_back(std::unique_ptr<member_comm>(new member_comm(this, r)));
  }
  thread_group(const thread_group&) = delete;
  thread_group& operator=(const thread_group&) = delete;

  [[nodiscard]] int size() const { return n_; }
  communicator& member(int rank) { return *members_.at(static_cast<std::size_t>(rank)); }
  // Marks the group failed (a rank that stops with an error): the others' collectives fail at once.
  void fail(const std::string& why) {
    std::lock_guard<std::mutex> lk(mu_);
    if (failed_.empty()) failed_ = why;
    cv_.notify_all();
  }

 private:
  class member_comm final : public communicator {
   public:
    member_comm(thread_group* g, int r) : g_(g), r_(r) {}
    [[nodiscard]] int rank() const override { return r_; }
    [[nodiscard]] int size() const override { return g_->n_; }
    status all_reduce(float* d, std::size_t n, reduce_op op) override { return g_->reduce(r_, d, n, op, "all_reduce"); }
    status all_reduce(double* d, std::size_t n, reduce_op op) override { return g_->reduce(r_, d, n, op, "all_reduce"); }
    status all_reduce(bfloat16* d, std::size_t n, reduce_op op) override { return g_->reduce(r_, d, n, op, "all_reduce"); }
    status all_reduce(half* d, std::size_t n, reduce_op op) override { return g_->reduce(r_, d, n, op, "all_reduce"); }
    status all_reduce_host(std::int64_t* d, std::size_t n, reduce_op op) override {
      return g_->reduce(r_, d, n, op, "all_reduce_host");
    }
    status all_reduce_host(double* d, std::size_t n, reduce_op op) override {
      return g_->reduce(r_, d, n, op, "all_reduce_host");
    }
    status broadcast_host(void* d, std::size_t n, int root) override { return g_->broadcast(r_, d, n, root); }
    status barrier() override { return g_->reduce<double>(r_, nullptr, 0, reduce_op::sum, "barrier"); }

   private:
    thread_group* g_;
    int r_;
  };

  // The rendezvous of every collective: each rank posts its slot; the last to arrive runs `act` (which
  // reads and writes every posted buffer) and releases the others; a rank that waits longer than the
  // timeout fails the group, naming the ranks that never posted.
  template <class Act>
  status rendezvous(int rank, void* data, std::size_t n, std::size_t elem, const char* what, Act&& act) {
    std::unique_lock<std::mutex> lk(mu_);
    if (!failed_.empty()) return {errc::backend_error, std::string(what) + ": the group failed: " + failed_};
    const std::uint64_t gen = gen_;
    slots_[static_cast<std::size_t>(rank)] = {data, n, elem, what, true};
    if (++arrived_ == n_) {
      status st;
      for (const auto& s : slots_)
        if (st.ok() && (s.n != n || s.elem != elem || std::string(s.what) != what))
          st = {errc::shape_mismatch, std::string(what) + ": the ranks disagree on the collective (" + s.what + " of " +
                                          std::to_string(s.n) + " vs " + what + " of " + std::to_string(n) + ")"};
      if (st.ok()) st = act();
      arrived_ = 0;
      for (auto& s : slots_) s.posted = false;
      if (st.ok()) ++gen_;  // a failed collective leaves the generation: its waiters report the failure
      else failed_ = st.message();
      cv_.notify_all();
      return st;
    }
    if (!cv_.wait_for(lk, timeout_, [&] { return gen_ != gen || !failed_.empty(); })) {
      std::string missing;
      for (int r = 0; r < n_; ++r)
        if (!slots_[static_cast<std::size_t>(r)].posted) missing += (missing.empty() ? "" : ", ") + std::to_string(r);
      failed_ = std::string(what) + " timed out after " + std::to_string(timeout_.count()) + " ms waiting for rank(s) " + missing;
      cv_.notify_all();
      return {errc::backend_error, failed_};
    }
    if (gen_ == gen) return {errc::backend_error, std::string(what) + ": the group failed: " + failed_};
    return {};
  }

  // Element-wise reduction in rank order into every rank's buffer (16-bit types in float, rounded once).
  template <class V>
  status reduce(int rank, V* data, std::size_t n, reduce_op op, const char* what) {
    using A = std::conditional_t<is_16bit_float_v<V>, float, V>;
    return rendezvous(rank, data, n, sizeof(V), what, [&]() -> status {
      if (n == 0) return {};
      std::vector<A> acc(n);
      for (std::size_t i = 0; i < n; ++i) acc[i] = static_cast<A>(static_cast<const V*>(slots_[0].data)[i]);
      for (std::size_t r = 1; r < slots_.size(); ++r) {
        const V* x = static_cast<const V*>(slots_[r].data);
        for (std::size_t i = 0; i < n; ++i) {
          const A v = static_cast<A>(x[i]);
          acc[i] = op == reduce_op::sum ? acc[i] + v : std::max(acc[i], v);
        }
      }
      for (auto& s : slots_)
        for (std::size_t i = 0; i < n; ++i) static_cast<V*>(s.data)[i] = static_cast<V>(acc[i]);
      return {};
    });
  }

  status broadcast(int rank, void* data, std::size_t n, int root) {
    if (root < 0 || root >= n_) return {errc::out_of_range, "broadcast: root " + std::to_string(root) + " outside the group"};
    return rendezvous(rank, data, n, 1, "broadcast_host", [&]() -> status {
      const auto* src = static_cast<const unsigned char*>(slots_[static_cast<std::size_t>(root)].data);
      for (std::size_t r = 0; r < slots_.size(); ++r)
        if (static_cast<int>(r) != root && n > 0) std::copy(src, src + n, static_cast<unsigned char*>(slots_[r].data));
      return {};
    });
  }

  struct slot {
    void* data = nullptr;
    std::size_t n = 0, elem = 0;
    const char* what = "";
    bool posted = false;
  };
  int n_;
  std::chrono::milliseconds timeout_;
  std::mutex mu_;
  std::condition_variable cv_;
  std::vector<slot> slots_;
  std::vector<std::unique_ptr<member_comm>> members_;
  int arrived_ = 0;
  std::uint64_t gen_ = 0;
  std::string failed_;
};

}  // namespace kd
