// expect: static assertion failed( due to requirement '[^']*')?: kd: this loss has no implementation for this backend; include the backend\'s header for it\.
// A backend type kd knows nothing about: it satisfies kd::Backend, but no loss_impl exists for it.
#include <cstdint>
#include <span>

#include <kd/kd.hpp>

struct my_backend {
  static constexpr std::string_view name = "x";
};
static_assert(kd::Backend<my_backend>);

kd::status unknown_backend(const float* teacher, const float* student) {
  const kd::matrix_view<const float> t(teacher, 4, 8);
  const kd::matrix_view<const float> s(student, 4, 8);
  kd::loss_result out;
  return kd::logit_kd<kd::forward_kl>{}(my_backend{}, t, s, std::span<const std::int32_t>{}, out);
}
