// expect: static assertion failed( due to requirement '[^']*')?: kd: a feature normalization must be kd::none, kd::sqrt_dim_mse, kd::rms_mse or kd::cosine\.
// softmax_kl is an attention normalization; hidden states have no softmax.
#include <kd/kd.hpp>

kd::feature_loss<kd::softmax_kl> wrong_feature_normalization;
