// tests/static/static_checks.cpp: compile-time checks over kd's concepts and policies (no main).
//
// Built as the static library kd_static_checks with the tests (part of ALL), so a broken trait,
// concept or constexpr conversion breaks the build. The functions at the end are positive controls
// for the compile-fail tests in tests/compile_fail/: the same calls with matching types compile.
#include <cstdint>
#include <limits>
#include <span>
#include <string_view>
#include <type_traits>

#include <kd/kd.hpp>

namespace static_checks {

// ---------------------------------------------------------------------------------------------
// Precision policies
// ---------------------------------------------------------------------------------------------
static_assert(kd::Precision<kd::fp32> && kd::Precision<kd::fp16> && kd::Precision<kd::bf16> && kd::Precision<kd::fp64>);
static_assert(kd::Precision<kd::precision<kd::half, double>>);
static_assert(!kd::Precision<float> && !kd::Precision<kd::half> && !kd::Precision<int>);
static_assert(!kd::Precision<kd::precision_set<kd::fp32, kd::fp32>>);
static_assert(std::is_same_v<kd::fp16::storage_type, kd::half> && std::is_same_v<kd::fp16::accum_type, float>);
static_assert(std::is_same_v<kd::bf16::storage_type, kd::bfloat16> && std::is_same_v<kd::bf16::accum_type, float>);
static_assert(std::is_same_v<kd::fp64::storage_type, double> && std::is_same_v<kd::fp64::accum_type, double>);

using seed_set = kd::precision_set<kd::fp16, kd::fp32, kd::fp32>;
static_assert(kd::PrecisionSet<seed_set> && kd::PrecisionSet<kd::precision_set<kd::bf16, kd::bf16>>);
static_assert(!kd::PrecisionSet<kd::fp32> && !kd::PrecisionSet<float> && !kd::PrecisionSet<int>);
static_assert(std::is_same_v<kd::precision_set<kd::fp16, kd::bf16>::projection, kd::bf16>);  // defaults to student
static_assert(std::is_same_v<seed_set::teacher, kd::fp16> && std::is_same_v<seed_set::projection, kd::fp32>);

static_assert(std::is_same_v<kd::common_accum_t<kd::fp16, kd::fp32>, float>);
static_assert(std::is_same_v<kd::common_accum_t<kd::bf16, kd::fp64>, double>);
static_assert(std::is_same_v<kd::common_accum_t<kd::fp32>, float>);
static_assert(std::is_same_v<kd::common_accum_t<kd::fp16, kd::bf16, kd::fp32>, float>);
static_assert(std::is_same_v<kd::detail::common_accum_for<kd::precision_set<kd::bf16, kd::bf16, kd::fp64>>, double>);

static_assert(kd::is_storage_type_v<float> && kd::is_storage_type_v<double> && kd::is_storage_type_v<kd::half> &&
              kd::is_storage_type_v<kd::bfloat16>);
static_assert(!kd::is_storage_type_v<int> && !kd::is_storage_type_v<long double> && !kd::is_storage_type_v<const float>);
static_assert(kd::detail::storage_matches_v<float, const float> && !kd::detail::storage_matches_v<float, kd::half>);

// ---------------------------------------------------------------------------------------------
// 16-bit storage types: constexpr, round to nearest even
// ---------------------------------------------------------------------------------------------
static_assert(sizeof(kd::half) == 2 && sizeof(kd::bfloat16) == 2);
static_assert(std::is_trivially_copyable_v<kd::half> && std::is_trivially_copyable_v<kd::bfloat16>);
static_assert(!std::is_convertible_v<float, kd::half> && !std::is_convertible_v<kd::half, float>);  // explicit only

static_assert(kd::bfloat16(1.0f).bits == 0x3f80);
static_assert(kd::bfloat16(-2.0f).bits == 0xc000);
static_assert(kd::bfloat16(0.0f).bits == 0x0000 && kd::bfloat16(-0.0f).bits == 0x8000);
static_assert(kd::bfloat16(1.00390625f).bits == 0x3f80);  // 1 + 2^-8: a tie, rounds to even (down)
static_assert(kd::bfloat16(1.01171875f).bits == 0x3f82);  // 1 + 3 * 2^-8: a tie, rounds to even (up)
static_assert(kd::bfloat16(1.0078125f).bits == 0x3f81);   // 1 + 2^-7: exact
static_assert(kd::bfloat16(std::numeric_limits<float>::infinity()).bits == 0x7f80);
static_assert((kd::bfloat16(std::numeric_limits<float>::quiet_NaN()).bits & 0x7fc0) == 0x7fc0);  // stays NaN
static_assert(static_cast<float>(kd::bfloat16::from_bits(0x3f80)) == 1.0f);
static_assert(static_cast<float>(kd::bfloat16::from_bits(0x4049)) == 3.140625f);

static_assert(kd::half(1.0f).bits == 0x3c00);
static_assert(kd::half(-2.0f).bits == 0xc000);
static_assert(kd::half(0.5f).bits == 0x3800);
static_assert(kd::half(65504.0f).bits == 0x7bff);  // largest finite half
static_assert(kd::half(65519.0f).bits == 0x7bff);  // rounds down to it
static_assert(kd::half(65520.0f).bits == 0x7c00);  // rounds up to Inf
static_assert(kd::half(-1e6f).bits == 0xfc00);
static_assert(kd::half(std::numeric_limits<float>::quiet_NaN()).bits == 0x7e00);
static_assert(kd::half(5.9604644775390625e-8f).bits == 0x0001);   // 2^-24, smallest subnormal
static_assert(kd::half(2.98023223876953125e-8f).bits == 0x0000);  // 2^-25: a tie, rounds to even (0)
static_assert(kd::half(4.4703483581542969e-8f).bits == 0x0001);   // 1.5 * 2^-25 rounds up
static_assert(kd::half(6.103515625e-5f).bits == 0x0400);          // 2^-14, smallest normal
static_assert(kd::half(1.0f + 1.0f / 2048).bits == 0x3c00);       // tie, to even
static_assert(kd::half(1.0f + 3.0f / 2048).bits == 0x3c02);       // tie, to even
static_assert(static_cast<float>(kd::half::from_bits(0x3c00)) == 1.0f);
static_assert(static_cast<float>(kd::half::from_bits(0x7bff)) == 65504.0f);
static_assert(static_cast<float>(kd::half::from_bits(0x0001)) == 5.9604644775390625e-8f);
static_assert(static_cast<float>(kd::half::from_bits(0x03ff)) == 6.0975551605224609e-5f);  // largest subnormal
static_assert(static_cast<float>(kd::half::from_bits(0xfc00)) == -std::numeric_limits<float>::infinity());
static_assert(static_cast<float>(kd::half(0.1f)) == 0.0999755859375f);

static_assert(kd::load_as<float>(kd::half::from_bits(0x3800)) == 0.5f);
static_assert(kd::load_as<double>(kd::bfloat16(2.0f)) == 2.0);
static_assert(kd::store_as<kd::half>(1.0f).bits == 0x3c00);
static_assert(kd::store_as<float>(2.5) == 2.5f);
static_assert(std::string_view(kd::type_name<kd::half>()) == "half" &&
              std::string_view(kd::type_name<kd::bfloat16>()) == "bfloat16" &&
              std::string_view(kd::type_name<int>()) == "unknown");

// ---------------------------------------------------------------------------------------------
// Normalization policies
// ---------------------------------------------------------------------------------------------
static_assert(kd::TokenReduction<kd::none> && kd::TokenReduction<kd::token_mean>);
static_assert(!kd::TokenReduction<kd::cosine> && !kd::TokenReduction<kd::sqrt_dim_mse> && !kd::TokenReduction<int>);
static_assert(kd::FeatureNormalization<kd::none> && kd::FeatureNormalization<kd::sqrt_dim_mse> &&
              kd::FeatureNormalization<kd::rms_mse> && kd::FeatureNormalization<kd::cosine>);
static_assert(!kd::FeatureNormalization<kd::softmax_kl> && !kd::FeatureNormalization<kd::token_mean>);
static_assert(kd::AttentionNormalization<kd::none> && kd::AttentionNormalization<kd::softmax_kl>);
static_assert(!kd::AttentionNormalization<kd::sqrt_dim_mse> && !kd::AttentionNormalization<kd::rms_mse>);
static_assert(kd::token_reduction_traits<kd::token_mean>::mean && !kd::token_reduction_traits<kd::none>::mean);
static_assert(kd::feature_normalization_traits<kd::rms_mse>::kind == kd::feature_norm_kind::rms_mse);
static_assert(kd::feature_normalization_traits<kd::none>::kind == kd::feature_norm_kind::none);
static_assert(kd::attention_normalization_traits<kd::softmax_kl>::softmax &&
              !kd::attention_normalization_traits<kd::none>::softmax);
static_assert(kd::sqrt_dim_mse::name == "sqrt_dim_mse" && kd::token_mean::name == "token_mean");

// ---------------------------------------------------------------------------------------------
// Divergences
// ---------------------------------------------------------------------------------------------
static_assert(kd::Divergence<kd::forward_kl> && kd::Divergence<kd::reverse_kl> && kd::Divergence<kd::jsd> &&
              kd::Divergence<kd::skew_kl> && kd::Divergence<kd::tvd>);
static_assert(!kd::Divergence<int> && !kd::Divergence<kd::none> && !kd::Divergence<kd::softmax_kl>);
static_assert(kd::divergence_traits<kd::jsd>::uses_beta && !kd::divergence_traits<kd::jsd>::uses_alpha);
static_assert(kd::divergence_traits<kd::skew_kl>::uses_alpha && !kd::divergence_traits<kd::forward_kl>::uses_beta);

using bf16_kd = kd::logit_kd<kd::forward_kl, kd::token_mean, kd::precision_set<kd::bf16, kd::bf16>>;
static_assert(std::is_same_v<bf16_kd::teacher_storage, kd::bfloat16> && std::is_same_v<bf16_kd::student_storage, kd::bfloat16>);
static_assert(std::is_same_v<kd::logit_kd<kd::jsd>::reduction, kd::token_mean>);  // defaults
static_assert(std::is_same_v<kd::logit_kd<kd::jsd>::precisions, kd::precision_set<kd::fp32, kd::fp32>>);

// ---------------------------------------------------------------------------------------------
// Curriculum curves
// ---------------------------------------------------------------------------------------------
struct my_curve {  // a user-defined curve satisfies the concept
  static constexpr std::string_view name = "mine";
  static constexpr double shape(double p) noexcept { return p * p * p; }
};
static_assert(kd::Curve<kd::curve::constant> && kd::Curve<kd::curve::linear> && kd::Curve<kd::curve::cosine> &&
              kd::Curve<kd::curve::quadratic> && kd::Curve<kd::curve::exponential<>> &&
              kd::Curve<kd::curve::exponential<0.5>> && kd::Curve<kd::curve::step<>> && kd::Curve<kd::curve::step<1>> &&
              kd::Curve<my_curve>);
static_assert(!kd::Curve<int> && !kd::Curve<kd::none> && !kd::Curve<kd::log_every<10>>);
static_assert(kd::curve::linear::shape(0.5) == 0.5);
static_assert(kd::curve::linear::shape(0.25) == 0.25 && kd::curve::linear::shape(1.0) == 1.0);
static_assert(kd::curve::quadratic::shape(0.5) == 0.25);
static_assert(kd::curve::constant::shape(0.0) == 1.0);
static_assert(kd::curve::step<4>::stairs == 4 && kd::curve::exponential<3.0>::rate == 3.0);
static_assert(std::is_same_v<kd::schedule<my_curve>::curve_type, my_curve>);
static_assert(std::is_convertible_v<kd::schedule<kd::curve::cosine>, kd::any_schedule>);

// ---------------------------------------------------------------------------------------------
// Logging cadences
// ---------------------------------------------------------------------------------------------
struct my_cadence {
  static constexpr std::string_view name = "odd";
  static constexpr bool due(std::int64_t s) noexcept { return s % 2 == 1; }
};
static_assert(kd::LogCadence<kd::log_every<1>> && kd::LogCadence<kd::log_every<100>> &&
              kd::LogCadence<kd::log_geometric<>> && kd::LogCadence<kd::log_geometric<10>> &&
              kd::LogCadence<kd::log_never> && kd::LogCadence<my_cadence>);
static_assert(!kd::LogCadence<int> && !kd::LogCadence<kd::curve::linear>);
static_assert(kd::log_every<100>::due(100) && kd::log_every<100>::due(24900));
static_assert(!kd::log_every<100>::due(0) && !kd::log_every<100>::due(150) && !kd::log_every<100>::due(24914));
static_assert(kd::log_every<1>::due(1) && kd::log_every<1>::due(2));
static_assert(kd::log_geometric<2>::due(1) && kd::log_geometric<2>::due(2) && kd::log_geometric<2>::due(4) &&
              kd::log_geometric<2>::due(8) && kd::log_geometric<2>::due(1024));
static_assert(!kd::log_geometric<2>::due(0) && !kd::log_geometric<2>::due(3) && !kd::log_geometric<2>::due(6) &&
              !kd::log_geometric<2>::due(-4));
static_assert(kd::log_geometric<10>::due(1000) && !kd::log_geometric<10>::due(500));
static_assert(!kd::log_never::due(1) && !kd::log_never::due(100));
// 24,914 steps, a line every 100: 249 on the cadence (+1 for the final window at finish()).
static_assert([] {
  int n = 0;
  for (std::int64_t s = 1; s <= 24914; ++s) n += kd::log_every<100>::due(s);
  return n;
}() == 249);

// ---------------------------------------------------------------------------------------------
// Backends
// ---------------------------------------------------------------------------------------------
struct my_backend {
  static constexpr std::string_view name = "mine";
};
static_assert(kd::Backend<kd::cpu_backend> && kd::Backend<my_backend>);
static_assert(!kd::Backend<int> && !kd::Backend<kd::fp32>);
static_assert(kd::cpu_backend::name == "cpu" && std::is_same_v<std::remove_cv_t<decltype(kd::cpu)>, kd::cpu_backend>);

// ---------------------------------------------------------------------------------------------
// Views and status
// ---------------------------------------------------------------------------------------------
static_assert(std::is_convertible_v<kd::matrix_view<float>, kd::matrix_view<const float>>);
static_assert(!std::is_convertible_v<kd::matrix_view<const float>, kd::matrix_view<float>>);
static_assert(!std::is_convertible_v<kd::matrix_view<kd::half>, kd::matrix_view<float>>);
static_assert(kd::to_string(kd::errc::non_finite) == "non-finite value" && kd::to_string(kd::errc::ok) == "ok");

// ---------------------------------------------------------------------------------------------
// Positive controls for tests/compile_fail/: the same calls with matching element types compile.
// ---------------------------------------------------------------------------------------------

// seed_dtype_mixup.cpp, fixed the kd way: the policy says the teacher is fp16.
kd::status seed_dtype_stated(const float* student_hidden, const float* projection, const kd::half* teacher_hidden) {
  const kd::matrix_view<const float> x(student_hidden, 32, 576);
  const kd::matrix_view<const float> w(projection, 1024, 576);
  const kd::matrix_view<const kd::half> t(teacher_hidden, 32, 1024);
  kd::loss_result out;
  return kd::feature_loss<kd::sqrt_dim_mse, kd::token_mean, seed_set>{}(
      kd::cpu, x, w, kd::matrix_view<const float>{}, t, std::span<const std::int32_t>{}, out);
}

// logit_kd_student_dtype.cpp / logit_kd_grad_dtype.cpp with matching types.
kd::status logit_kd_matching(const kd::bfloat16* teacher, const kd::bfloat16* student, kd::bfloat16* grad) {
  const kd::matrix_view<const kd::bfloat16> t(teacher, 4, 8);
  const kd::matrix_view<const kd::bfloat16> s(student, 4, 8);
  const kd::matrix_view<kd::bfloat16> g(grad, 4, 8);
  kd::loss_result out;
  return bf16_kd{}(kd::cpu, t, s, std::span<const std::int32_t>{}, out, g);
}

}  // namespace static_checks
