// expect: static assertion failed( due to requirement '[^']*')?: kd: an attention normalization must be kd::none or kd::softmax_kl\.
// sqrt_dim_mse is a feature normalization; attention maps are compared as distributions.
#include <kd/kd.hpp>

kd::attention_loss<kd::sqrt_dim_mse> wrong_attention_normalization;
