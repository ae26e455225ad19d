// expect: static assertion failed( due to requirement '[^']*')?: kd: the projection tensor\'s element type does not match the projection precision policy\.
// The policy declares a bf16 projection, the caller passes a float weight matrix.
#include <cstdint>
#include <span>

#include <kd/kd.hpp>

kd::status projection_dtype(const float* student_hidden, const float* projection, const float* teacher_hidden) {
  using set = kd::precision_set<kd::fp32, kd::fp32, kd::bf16>;
  const kd::matrix_view<const float> x(student_hidden, 4, 6);
  const kd::matrix_view<const float> w(projection, 8, 6);
  const kd::matrix_view<const float> t(teacher_hidden, 4, 8);
  kd::loss_result out;
  return kd::feature_loss<kd::rms_mse, kd::token_mean, set>{}(kd::cpu, x, w, kd::matrix_view<const kd::bfloat16>{}, t,
                                                                std::span<const std::int32_t>{}, out);
}
