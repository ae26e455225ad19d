// expect: static assertion failed( due to requirement '[^']*')?: kd: log_every needs a period of at least one step\.
#include <kd/kd.hpp>

bool due_every_zero() { return kd::log_every<0>::due(1); }
