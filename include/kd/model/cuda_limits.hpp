// kd/model/cuda_limits.hpp: the limits of the CUDA model kernels (kd/model/cuda/), in plain C++.
//
// The kernels size registers, shared memory and launch grids by these constants; cuda_ops checks its ops'
// arguments against them (after the checks both backends share, op_check.hpp), and
// cuda::can_implement(arch) rejects a whole model that breaks one, which transformer::allocate() calls
// through cuda_ops::can_implement: a model the GPU cannot run fails before any memory is allocated, not at
// its first forward. Plain C++ so that a CPU build can check (and test) an architecture.
#pragma once

#include <climits>
#include <cstdint>
#include <string>

#include <kd/core/status.hpp>
#include <kd/model/op_check.hpp>
#include <kd/model/parameters.hpp>

namespace kd::model::cuda {

namespace detail {

inline constexpr int kRouterMaxExperts = 256;  // router: 8 probabilities per lane of a warp
inline constexpr int kRouterMaxTopK = 8;       // router: the top-k kept in registers
inline constexpr int kMaxHeadDim = 128;        // attention: a head row per warp in shared memory; even
inline constexpr std::int64_t kRopeMaxDim = 8192;   // RoPE: cos / sin of a token in shared memory, 4 * D bytes
inline constexpr std::int64_t kMaxGridY = 65535;    // attention: batch and query heads each along a grid axis

struct cuda_ops_prefix {
  static constexpr const char* value = "cuda_ops::";
};
using op_check = model::detail::basic_op_check<cuda_ops_prefix>;

// The router's and dispatch's E and k.
inline op_check& router_limits(op_check& c, std::int64_t e, std::int64_t k) {
  return c
      .that(e <= kRouterMaxExperts, errc::invalid_argument,
            "E = " + std::to_string(e) + " exceeds the CUDA router's " + std::to_string(kRouterMaxExperts) + " experts")
      .that(k <= kRouterMaxTopK, errc::invalid_argument,
            "k = " + std::to_string(k) + " exceeds the CUDA router's top-" + std::to_string(kRouterMaxTopK));
}
inline op_check& rope_limits(op_check& c, std::int64_t d) {
  return c.that(d <= kRopeMaxDim, errc::out_of_range,
                "D = " + std::to_string(d) + " exceeds the CUDA RoPE's " + std::to_string(kRopeMaxDim));
}

}  // namespace detail

// Every limit a CUDA kernel puts on a model's architecture (sequence length and batch are the forward's).
inline status can_implement(const arch& a) {
  detail::op_check c("can_implement");
  bool moe = false;
  for (const layer_arch& l : a.layers) moe = moe || l.moe;
  if (moe) detail::router_limits(c, a.experts, a.top_k);
  c.that(a.head_dim <= detail::kMaxHeadDim && a.head_dim % 2 == 0, errc::invalid_argument,
         "head_dim = " + std::to_string(a.head_dim) + " must be even and at most the CUDA attention's " +
             std::to_string(detail::kMaxHeadDim))
      .that(a.heads <= detail::kMaxGridY, errc::invalid_argument,
            "heads = " + std::to_string(a.heads) + " exceeds the CUDA attention's " + std::to_string(detail::kMaxGridY))
      .fits_int(a.vocab, "vocab")
      .fits_int(a.hidden, "hidden");
  for (const layer_arch& l : a.layers) c.fits_int(l.intermediate, "intermediate");
  return c.done();
}

}  // namespace kd::model::cuda
