// kd/policy/normalization.hpp: loss normalization policies.
//
// The seed run summed losses over hidden dimensions and attention scores with no normalization, which
// made them 10-100x larger than the LM loss (feature 150-200, attention 90-140). Every kd loss takes a
// normalization policy so its scale is a property of the type, not of the tensor sizes.
//
// Token reductions (how per-token losses become one number):
//   none        sum over tokens.
//   token_mean  divide by the number of non-ignored tokens. When a batch is split into micro-batches
//               for gradient accumulation, pass the global count (options.global_tokens) so each
//               micro-batch divides by the same number: the summed loss and gradients then equal the
//               full-batch ones exactly, whatever the split.
// Feature normalizations (per token, student projected to teacher width D):
//   none          sum_d (y_d - t_d)^2                      (the seed's scale: grows with D)
//   sqrt_dim_mse  sum_d ((y_d - t_d) / sqrt(D))^2           (= mean squared error over the D features)
//   rms_mse       mean_d (y_d/rms(y) - t_d/rms(t))^2        (scale-free: bounded by 4)
//   cosine        1 - cos(y, t)                             (in [0, 2])
// Attention normalizations (per query row of an attention map):
//   none        sum_k (s_k - t_k)^2 over raw scores          (the seed's scale)
//   softmax_kl  KL(softmax(t) || softmax(s)) over the causal keys, mean over rows
#pragma once

#include <concepts>
#include <string_view>
#include <type_traits>

namespace kd {

template <class>
inline constexpr bool dependent_false_v = false;

struct none {
  static constexpr std::string_view name = "none";
};
struct token_mean {
  static constexpr std::string_view name = "token_mean";
};
struct sqrt_dim_mse {
  static constexpr std::string_view name = "sqrt_dim_mse";
};
struct rms_mse {
  static constexpr std::string_view name = "rms_mse";
};
struct cosine {
  static constexpr std::string_view name = "cosine";
};
struct softmax_kl {
  static constexpr std::string_view name = "softmax_kl";
};

// Primary templates: an unsupported policy lands here and the static_assert says what is accepted.
template <class N>
struct token_reduction_traits {
  static_assert(dependent_false_v<N>, "kd: a token reduction must be kd::none or kd::token_mean.");
};
template <>
struct token_reduction_traits<none> {
  static constexpr bool mean = false;
};
template <>
struct token_reduction_traits<token_mean> {
  static constexpr bool mean = true;
};

enum class feature_norm_kind { none, sqrt_dim_mse, rms_mse, cosine };
template <class N>
struct feature_normalization_traits {
  static_assert(dependent_false_v<N>,
                "kd: a feature normalization must be kd::none, kd::sqrt_dim_mse, kd::rms_mse or kd::cosine.");
};
template <>
struct feature_normalization_traits<none> {
  static constexpr feature_norm_kind kind = feature_norm_kind::none;
};
template <>
struct feature_normalization_traits<sqrt_dim_mse> {
  static constexpr feature_norm_kind kind = feature_norm_kind::sqrt_dim_mse;
};
template <>
struct feature_normalization_traits<rms_mse> {
  static constexpr feature_norm_kind kind = feature_norm_kind::rms_mse;
};
template <>
struct feature_normalization_traits<cosine> {
  static constexpr feature_norm_kind kind = feature_norm_kind::cosine;
};

template <class N>
struct attention_normalization_traits {
  static_assert(dependent_false_v<N>, "kd: an attention normalization must be kd::none or kd::softmax_kl.");
};
template <>
struct attention_normalization_traits<none> {
  static constexpr bool softmax = false;
};
template <>
struct attention_normalization_traits<softmax_kl> {
  static constexpr bool softmax = true;
};

template <class N>
concept TokenReduction = std::same_as<N, none> || std::same_as<N, token_mean>;
template <class N>
concept FeatureNormalization =
    std::same_as<N, none> || std::same_as<N, sqrt_dim_mse> || std::same_as<N, rms_mse> || std::same_as<N, cosine>;
template <class N>
concept AttentionNormalization = std::same_as<N, none> || std::same_as<N, softmax_kl>;

static_assert(TokenReduction<none> && TokenReduction<token_mean> && !TokenReduction<cosine>);
static_assert(FeatureNormalization<sqrt_dim_mse> && FeatureNormalization<cosine> && !FeatureNormalization<softmax_kl>);
static_assert(AttentionNormalization<softmax_kl> && !AttentionNormalization<rms_mse>);

}  // namespace kd
