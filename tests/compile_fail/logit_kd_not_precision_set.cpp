// expect: static assertion failed( due to requirement '[^']*')?: kd: logit_kd\'s third parameter must be a kd::precision_set<Teacher, Student>\.
// One precision where a teacher/student pair is needed.
#include <kd/kd.hpp>

kd::logit_kd<kd::forward_kl, kd::token_mean, kd::fp32> not_a_precision_set;
