// expect: static assertion failed( due to requirement '[^']*')?: kd: an exponential curve needs a positive rate\.
#include <kd/kd.hpp>

double negative_rate() {
  const kd::schedule<kd::curve::exponential<-1.0>> s{0.0, 1.0, 100};
  return s(50);
}
