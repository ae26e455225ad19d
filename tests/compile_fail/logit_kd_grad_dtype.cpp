// expect: static assertion failed( due to requirement '[^']*')?: kd: a gradient tensor\'s element type does not match the precision policy it belongs to\.
// A double gradient buffer for an fp32 student.
#include <cstdint>
#include <span>

#include <kd/kd.hpp>

kd::status grad_dtype(const float* teacher, const float* student, double* grad) {
  const kd::matrix_view<const float> t(teacher, 4, 8);
  const kd::matrix_view<const float> s(student, 4, 8);
  const kd::matrix_view<double> g(grad, 4, 8);
  kd::loss_result out;
  return kd::logit_kd<kd::forward_kl>{}(kd::cpu, t, s, std::span<const std::int32_t>{}, out, g);
}
