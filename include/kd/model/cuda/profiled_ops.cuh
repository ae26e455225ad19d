// kd/model/cuda/profiled_ops.cuh: cuda_ops with a GPU-time breakdown per op.
//
// profiled_ops<T> is a cuda_ops<T> whose every op is bracketed by a pair of CUDA events, so a
// transformer<profiled_ops<T>> reports where a training step spends its GPU time (op name, calls, ms)
// without a profiler on the machine. The events are recorded in stream order and read only in report(),
// which synchronises; each op adds about two event records of overhead.
#pragma once

#include <cuda_runtime.h>

#include <algorithm>
#include <cstdio>
#include <map>
#include <set>
#include <string>
#include <utility>
#include <vector>

#include <kd/model/cuda/ops.cuh>

namespace kd::model {

template <class T>
class profiled_ops : public cuda_ops<T> {
  using base = cuda_ops<T>;

 public:
  using base::base;
  profiled_ops(const profiled_ops&) = delete;
  profiled_ops& operator=(const profiled_ops&) = delete;
  ~profiled_ops() {
    for (cudaEvent_t e : pool_) cudaEventDestroy(e);
  }

  // Starts a new window (drops what was recorded).
  void reset() {
    marks_.clear();
    used_ = 0;
  }
  void enable(bool on) { on_ = on; }

  struct row {
    std::string op;
    long long calls = 0;
    double ms = 0;
  };
  // Per-op totals since reset(), largest first; waits for the stream.
  status report(std::vector<row>& out) {
    KD_CUDA_TRY(cudaStreamSynchronize(this->stream()), "profiled_ops::report");
    std::map<std::string, row> by;
    for (const mark& m : marks_) {
      float ms = 0;
      KD_CUDA_TRY(cudaEventElapsedTime(&ms, pool_[m.start], pool_[m.start + 1]), "cudaEventElapsedTime");
      row& r = by[m.op];
      r.op = m.op;
      ++r.calls;
      r.ms += ms;
    }
    out.clear();
    for (auto& [k, r] : by) out.push_back(r);
    std::sort(out.begin(), out.end(), [](const row& a, const row& b) { return a.ms > b.ms; });
    return {};
  }

#define KD_PROFILED_OP(op)                                         \
  template <class... Args>                                         \
  status op(Args&&... args) {                                      \
    if (!on_) return base::op(std::forward<Args>(args)...);        \
    std::size_t i = 0;                                             \
    KD_TRY(begin(#op, i));                                         \
    status s = base::op(std::forward<Args>(args)...);              \
    KD_CUDA_TRY(cudaEventRecord(pool_[i + 1], this->stream()), #op); \
    return s;                                                      \
  }
  KD_PROFILED_OP(copy)
  KD_PROFILED_OP(copy_rows)
  KD_PROFILED_OP(fill_zero)
  KD_PROFILED_OP(add)
  KD_PROFILED_OP(grouped_linear)
  KD_PROFILED_OP(grouped_linear_dx)
  KD_PROFILED_OP(grouped_linear_dw)
  KD_PROFILED_OP(embedding)
  KD_PROFILED_OP(embedding_dw)
  KD_PROFILED_OP(rmsnorm)
  KD_PROFILED_OP(rmsnorm_bwd)
  KD_PROFILED_OP(rope)
  KD_PROFILED_OP(rope_cache)
  KD_PROFILED_OP(rmsnorm_rope)
  KD_PROFILED_OP(rmsnorm_rope_bwd)
  KD_PROFILED_OP(swiglu)
  KD_PROFILED_OP(swiglu_bwd)
  KD_PROFILED_OP(attention)
  KD_PROFILED_OP(attention_bwd)
  KD_PROFILED_OP(attention_probs)
  KD_PROFILED_OP(attention_probs_bwd)
  KD_PROFILED_OP(router)
  KD_PROFILED_OP(router_bwd)
  KD_PROFILED_OP(moe_dispatch)
  KD_PROFILED_OP(gather_rows)
  KD_PROFILED_OP(moe_combine)
  KD_PROFILED_OP(moe_combine_bwd)
  KD_PROFILED_OP(moe_gather_add)
#undef KD_PROFILED_OP

  // The dense GEMMs are told apart by their weight's shape ("linear 1024x1024"): which one is slow matters.
  status linear(const T* x, const T* w, T* y, std::int64_t M, std::int64_t N, std::int64_t K, bool acc) {
    return time(shaped("linear", N, K), [&] { return base::linear(x, w, y, M, N, K, acc); });
  }
  status linear_dx(const T* dy, const T* w, T* dx, std::int64_t M, std::int64_t N, std::int64_t K, bool acc) {
    return time(shaped("linear_dx", N, K), [&] { return base::linear_dx(dy, w, dx, M, N, K, acc); });
  }
  status linear_dw(const T* dy, const T* x, T* dw, std::int64_t M, std::int64_t N, std::int64_t K, bool acc = true) {
    return time(shaped("linear_dw", N, K), [&] { return base::linear_dw(dy, x, dw, M, N, K, acc); });
  }

  // Times a region that is not an op (a loss kernel) under `name`.
  template <class F>
  status time(const char* name, F&& f) {
    if (!on_) return f();
    std::size_t i = 0;
    KD_TRY(begin(name, i));
    status s = f();
    KD_CUDA_TRY(cudaEventRecord(pool_[i + 1], this->stream()), name);
    return s;
  }

 private:
  // A stable C string per distinct name (marks keep the pointer).
  const char* shaped(const char* op, std::int64_t n, std::int64_t k) {
    return names_.insert(std::string(op) + " " + std::to_string(n) + "x" + std::to_string(k)).first->c_str();
  }

  struct mark {
    const char* op;
    std::size_t start;
  };

  status begin(const char* op, std::size_t& i) {
    if (used_ + 2 > pool_.size()) {
      for (int k = 0; k < 256; ++k) {
        cudaEvent_t e = nullptr;
        KD_CUDA_TRY(cudaEventCreate(&e), "profiled_ops: cudaEventCreate");
        pool_.push_back(e);
      }
    }
    i = used_;
    used_ += 2;
    marks_.push_back({op, i});
    KD_CUDA_TRY(cudaEventRecord(pool_[i], this->stream()), op);
    return {};
  }

  std::vector<cudaEvent_t> pool_;
  std::vector<mark> marks_;
  std::set<std::string> names_;
  std::size_t used_ = 0;
  bool on_ = true;
};

static_assert(ModelBackend<profiled_ops<kd::bfloat16>>);

}  // namespace kd::model
