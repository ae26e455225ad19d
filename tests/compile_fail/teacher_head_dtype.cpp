// expect: static assertion failed( due to requirement '[^']*')?: kd: the teacher tensor\'s element type does not match the teacher precision policy\.
// An fp16 teacher (hidden states and LM head) given to linear + KD whose teacher precision is bf16: the
// mix-up of the failed run that started kd (an fp16 teacher against an fp32 projector), caught at compile time.
#include <cstdint>
#include <span>

#include <kd/kd.hpp>

kd::status teacher_head_dtype(const kd::bfloat16* hidden, const kd::bfloat16* head, const kd::half* teacher_hidden,
                              const kd::half* teacher_head, kd::bfloat16* dhidden, kd::bfloat16* dhead) {
  const kd::teacher_head<kd::half> teacher{kd::matrix_view<const kd::half>(teacher_hidden, 4, 16),
                                           kd::matrix_view<const kd::half>(teacher_head, 8, 16)};
  kd::loss_result out;
  return kd::linear_logit_kd<kd::forward_kl, kd::token_mean, kd::precision_set<kd::bf16, kd::bf16, kd::bf16>>{}(
      kd::cpu, kd::matrix_view<const kd::bfloat16>(hidden, 4, 8), kd::matrix_view<const kd::bfloat16>(head, 8, 8),
      teacher, std::span<const std::int32_t>{}, out, kd::matrix_view<kd::bfloat16>(dhidden, 4, 8),
      kd::matrix_view<kd::bfloat16>(dhead, 8, 8));
}
