// expect: static assertion failed( due to requirement '[^']*')?: kd: the student tensor\'s element type does not match the student precision policy\.
// A float student tensor given to a loss whose student precision is bf16.
#include <cstdint>
#include <span>

#include <kd/kd.hpp>

kd::status student_dtype(const kd::bfloat16* teacher, const float* student) {
  const kd::matrix_view<const kd::bfloat16> t(teacher, 4, 8);
  const kd::matrix_view<const float> s(student, 4, 8);
  kd::loss_result out;
  return kd::logit_kd<kd::forward_kl, kd::token_mean, kd::precision_set<kd::bf16, kd::bf16>>{}(
      kd::cpu, t, s, std::span<const std::int32_t>{}, out);
}
