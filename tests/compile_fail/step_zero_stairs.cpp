// expect: static assertion failed( due to requirement '[^']*')?: kd: a step curve needs at least one stair\.
#include <kd/kd.hpp>

double zero_stairs() { return kd::curve::step<0>::shape(0.5); }
