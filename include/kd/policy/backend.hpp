// kd/policy/backend.hpp: execution backends.
//
// A backend is the first argument of every loss call; swapping kd::cpu for a CUDA backend (which
// carries a cudaStream_t) changes nothing else at the call site. Each loss is implemented for a
// backend by specializing kd::loss_impl<Backend, LossTag>; calling a loss on a backend that lacks it
// hits the primary template's static_assert.
#pragma once

#include <concepts>
#include <string_view>

namespace kd {

template <class>
inline constexpr bool backend_dependent_false_v = false;

// The CPU reference backend: Eigen, exact formulas, accumulation in the policy's accum_type.
struct cpu_backend {
  static constexpr std::string_view name = "cpu";
};
inline constexpr cpu_backend cpu{};

template <class B>
concept Backend = requires {
  { B::name } -> std::convertible_to<std::string_view>;
};
static_assert(Backend<cpu_backend>);

template <class Backend, class LossTag>
struct loss_impl {
  static_assert(backend_dependent_false_v<Backend>,
                "kd: this loss has no implementation for this backend; include the backend's header for it.");
};

}  // namespace kd
