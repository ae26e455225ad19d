// expect: static assertion failed( due to requirement '[^']*')?: kd: the teacher tensor\'s element type does not match the teacher precision policy\.
// The seed run's crash, "mat1 and mat2 must have the same dtype (Half and Float)": the teacher's hidden
// states were fp16 while the projection (and the loss) ran in fp32. With kd the policy states the
// teacher precision, and a kd::half teacher tensor under an fp32 teacher policy does not compile.
#include <cstdint>
#include <span>

#include <kd/kd.hpp>

kd::status seed_dtype_mixup(const float* student_hidden, const float* projection, const kd::half* teacher_hidden) {
  const kd::matrix_view<const float> x(student_hidden, 32, 576);
  const kd::matrix_view<const float> w(projection, 1024, 576);
  const kd::matrix_view<const kd::half> t(teacher_hidden, 32, 1024);
  kd::loss_result out;
  return kd::feature_loss<kd::sqrt_dim_mse, kd::token_mean, kd::precision_set<kd::fp32, kd::fp32, kd::fp32>>{}(
      kd::cpu, x, w, kd::matrix_view<const float>{}, t, std::span<const std::int32_t>{}, out);
}
