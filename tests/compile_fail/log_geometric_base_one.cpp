// expect: static assertion failed( due to requirement '[^']*')?: kd: log_geometric needs a base of at least 2\.
// Base 1 would loop forever dividing by 1.
#include <kd/kd.hpp>

bool due_geometric_one() { return kd::log_geometric<1>::due(4); }
