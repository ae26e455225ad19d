// expect: static assertion failed( due to requirement '[^']*')?: kd: a divergence must be kd::forward_kl, kd::reverse_kl, kd::jsd, kd::skew_kl or kd::tvd\.
#include <kd/kd.hpp>

kd::logit_kd<int> not_a_divergence;
