// expect: static assertion failed( due to requirement '[^']*')?: kd: a token reduction must be kd::none or kd::token_mean\.
// kd::cosine is a feature normalization, not a way to reduce per-token losses.
#include <kd/kd.hpp>

kd::logit_kd<kd::forward_kl, kd::cosine> wrong_token_reduction;
