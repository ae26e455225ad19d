// Tests for kd::half and kd::bfloat16 (kd/core/numeric.hpp): exhaustive round trips, round-to-nearest-even,
// overflow, subnormals, and agreement with a reference rounding written with std::frexp / std::ldexp /
// std::nearbyint (a different method from the library's bit manipulation).
#include <doctest/doctest.h>

#include <bit>
#include <cfenv>
#include <cmath>
#include <cstdint>
#include <limits>
#include <random>

#include <kd/core/numeric.hpp>

#include "test_util.hpp"

namespace {

std::uint32_t bits_of(float f) { return std::bit_cast<std::uint32_t>(f); }
float float_of(std::uint32_t u) { return std::bit_cast<float>(u); }

bool half_is_nan(std::uint16_t b) { return (b & 0x7c00u) == 0x7c00u && (b & 0x03ffu) != 0; }
bool bf16_is_nan(std::uint16_t b) { return (b & 0x7f80u) == 0x7f80u && (b & 0x007fu) != 0; }

// Reference: the value of x rounded to a binary format with `frac` fraction bits, minimum normal exponent
// `emin` (value 2^emin) and largest finite value `max`, round to nearest even, via nearbyint in double
// (exact: every float and every scaled grid point is representable in double).
double round_ref(float x, int frac, int emin, double max) {
  if (std::isnan(x)) return x;
  if (std::isinf(x)) return x;
  const double a = std::fabs(static_cast<double>(x));
  double r;
  if (a < std::ldexp(1.0, emin)) {
    // Subnormal grid: 2^(emin - frac).
    r = std::ldexp(std::nearbyint(std::ldexp(a, frac - emin)), emin - frac);
  } else {
    int e = 0;
    (void)std::frexp(a, &e);  // a = m 2^e, m in [0.5, 1): the last place is 2^(e - 1 - frac)
    r = std::ldexp(std::nearbyint(std::ldexp(a, frac + 1 - e)), e - 1 - frac);
  }
  if (r > max) r = std::numeric_limits<double>::infinity();
  return std::copysign(r, static_cast<double>(x));
}

double half_ref(float x) { return round_ref(x, 10, -14, 65504.0); }
double bf16_ref(float x) { return round_ref(x, 7, -126, static_cast<double>(float_of(0x7f7f0000u))); }

// Compares a converted value with the reference: same value and sign, or both NaN.
bool same_value(float got, double want) {
  if (std::isnan(want)) return std::isnan(got);
  return static_cast<double>(got) == want && std::signbit(got) == std::signbit(want);
}

}  // namespace

// Conversions are constexpr (usable in device code and constant expressions).
static_assert(kd::half(1.0f).bits == 0x3c00);
static_assert(kd::half(-2.0f).bits == 0xc000);
static_assert(kd::bfloat16(1.0f).bits == 0x3f80);
static_assert(static_cast<float>(kd::half::from_bits(0x3555)) > 0.333f);

TEST_CASE("numeric: the reference rounding rounds to nearest even") {
  REQUIRE(std::fegetround() == FE_TONEAREST);
  CHECK(half_ref(1.0f + 0x1p-11f) == 1.0);                 // tie -> even
  CHECK(half_ref(1.0f + 3 * 0x1p-11f) == 1.0 + 0x1p-9);    // tie -> even (up)
  CHECK(half_ref(65520.0f) == INFINITY);
  CHECK(half_ref(0x1p-25f) == 0.0);
}

TEST_CASE("half: every finite bit pattern round-trips through float; NaN stays NaN") {
  int nan_count = 0, mismatches = 0, nan_lost = 0;
  for (std::uint32_t b = 0; b < 0x10000u; ++b) {
    const auto h = kd::half::from_bits(static_cast<std::uint16_t>(b));
    const float f = static_cast<float>(h);
    const auto back = kd::half(f);
    if (half_is_nan(static_cast<std::uint16_t>(b))) {
      ++nan_count;
      nan_lost += !(std::isnan(f) && half_is_nan(back.bits));
    } else {
      mismatches += back.bits != b;
    }
  }
  CHECK(nan_count == 2 * 1023);
  CHECK(mismatches == 0);
  CHECK(nan_lost == 0);
}

TEST_CASE("bfloat16: every finite bit pattern round-trips through float; NaN stays NaN") {
  int nan_count = 0, mismatches = 0, nan_lost = 0, value_wrong = 0;
  for (std::uint32_t b = 0; b < 0x10000u; ++b) {
    const auto h = kd::bfloat16::from_bits(static_cast<std::uint16_t>(b));
    const float f = static_cast<float>(h);
    value_wrong += bits_of(f) != (b << 16);  // bfloat16 is the top half of a float
    const auto back = kd::bfloat16(f);
    if (bf16_is_nan(static_cast<std::uint16_t>(b))) {
      ++nan_count;
      nan_lost += !(std::isnan(f) && bf16_is_nan(back.bits));
    } else {
      mismatches += back.bits != b;
    }
  }
  CHECK(nan_count == 2 * 127);
  CHECK(value_wrong == 0);
  CHECK(mismatches == 0);
  CHECK(nan_lost == 0);
}

TEST_CASE("half: decoding known bit patterns") {
  CHECK(static_cast<float>(kd::half::from_bits(0x0000)) == 0.0f);
  CHECK(std::signbit(static_cast<float>(kd::half::from_bits(0x8000))));
  CHECK(static_cast<float>(kd::half::from_bits(0x3c00)) == 1.0f);
  CHECK(static_cast<float>(kd::half::from_bits(0x7bff)) == 65504.0f);
  CHECK(static_cast<float>(kd::half::from_bits(0x0400)) == 0x1p-14f);  // smallest normal
  CHECK(static_cast<float>(kd::half::from_bits(0x0001)) == 0x1p-24f);  // smallest subnormal
  CHECK(static_cast<float>(kd::half::from_bits(0x03ff)) == 1023 * 0x1p-24f);
  CHECK(static_cast<float>(kd::half::from_bits(0x8200)) == -0x1p-15f);
  CHECK(std::isinf(static_cast<float>(kd::half::from_bits(0x7c00))));
  CHECK(static_cast<float>(kd::half::from_bits(0xfc00)) == -INFINITY);
  CHECK(std::isnan(static_cast<float>(kd::half::from_bits(0x7e00))));
  // Every decoded value equals the definition (-1)^s 2^(e-15) (1 + m/1024), or m 2^-24 for e == 0.
  int wrong = 0;
  for (std::uint32_t b = 0; b < 0x7c00u; ++b) {
    const double m = b & 0x3ffu;
    const int e = static_cast<int>(b >> 10);
    const double want = e == 0 ? std::ldexp(m, -24) : std::ldexp(1.0 + m / 1024.0, e - 15);
    wrong += static_cast<double>(static_cast<float>(kd::half::from_bits(static_cast<std::uint16_t>(b)))) != want;
    wrong += static_cast<double>(static_cast<float>(kd::half::from_bits(static_cast<std::uint16_t>(b | 0x8000u)))) != -want;
  }
  CHECK(wrong == 0);
}

TEST_CASE("half: round to nearest even on ties, normal and subnormal") {
  CHECK(kd::half(1.0f + 0x1p-11f).bits == 0x3c00);      // halfway 1 .. 1+2^-10 -> 1 (even)
  CHECK(kd::half(1.0f + 3 * 0x1p-11f).bits == 0x3c02);  // halfway 1+2^-10 .. 1+2^-9 -> 1+2^-9 (even)
  CHECK(kd::half(1.0f + 0x1p-11f + 0x1p-20f).bits == 0x3c01);  // just above the tie -> up
  CHECK(kd::half(2049.0f).bits == kd::half(2048.0f).bits);     // ulp 2 at 2048: 2049 is a tie -> 2048
  CHECK(static_cast<float>(kd::half(2051.0f)) == 2052.0f);
  CHECK(kd::half(-(1.0f + 3 * 0x1p-11f)).bits == 0xbc02);
  // Subnormal ties: the grid is 2^-24.
  CHECK(kd::half(0x1p-25f).bits == 0x0000);      // halfway 0 .. 2^-24 -> 0
  CHECK(kd::half(3 * 0x1p-25f).bits == 0x0002);  // halfway 1 .. 2 (x 2^-24) -> 2
  CHECK(kd::half(5 * 0x1p-25f).bits == 0x0002);  // halfway 2 .. 3 -> 2
  CHECK(kd::half(0x1p-25f + 0x1p-40f).bits == 0x0001);
  CHECK(kd::half(0x1p-26f).bits == 0x0000);
  CHECK(kd::half(-0x1p-26f).bits == 0x8000);
  // Rounding up out of the subnormal range into the smallest normal.
  CHECK(kd::half(0x1p-14f - 0x1p-26f).bits == 0x0400);
  CHECK(kd::half(0x1p-14f - 0x1p-24f).bits == 0x03ff);
  // Every tie between consecutive finite halves goes to the even one.
  int wrong = 0;
  for (std::uint32_t b = 0; b < 0x7bffu; ++b) {
    const float lo = static_cast<float>(kd::half::from_bits(static_cast<std::uint16_t>(b)));
    const float hi = static_cast<float>(kd::half::from_bits(static_cast<std::uint16_t>(b + 1)));
    const float mid = (lo + hi) / 2;  // exact in float
    const std::uint16_t even = (b & 1u) ? static_cast<std::uint16_t>(b + 1) : static_cast<std::uint16_t>(b);
    wrong += kd::half(mid).bits != even;
    wrong += kd::half(-mid).bits != (even | 0x8000u);
  }
  CHECK(wrong == 0);
}

TEST_CASE("half: overflow to infinity above 65520, signed zero, NaN") {
  CHECK(kd::half(65504.0f).bits == 0x7bff);
  CHECK(kd::half(65519.996f).bits == 0x7bff);   // below the tie: largest finite
  CHECK(kd::half(65520.0f).bits == 0x7c00);     // the tie 65504 .. 65536 rounds to even = Inf
  CHECK(kd::half(-65520.0f).bits == 0xfc00);
  CHECK(kd::half(1e5f).bits == 0x7c00);
  CHECK(kd::half(std::numeric_limits<float>::max()).bits == 0x7c00);
  CHECK(kd::half(INFINITY).bits == 0x7c00);
  CHECK(kd::half(-INFINITY).bits == 0xfc00);
  CHECK(kd::half(0.0f).bits == 0x0000);
  CHECK(kd::half(-0.0f).bits == 0x8000);
  CHECK(kd::half(1e-30f).bits == 0x0000);
  CHECK(half_is_nan(kd::half(std::numeric_limits<float>::quiet_NaN()).bits));
  CHECK(half_is_nan(kd::half(-std::numeric_limits<float>::quiet_NaN()).bits));
  CHECK(half_is_nan(kd::half(float_of(0x7f800001u)).bits));  // signalling NaN with a low payload
  CHECK(half_is_nan(kd::half(float_of(0xff800001u)).bits));
}

TEST_CASE("bfloat16: round to nearest even, overflow, NaN") {
  CHECK(kd::bfloat16(1.0f + 0x1p-8f).bits == 0x3f80);      // tie -> even (down)
  CHECK(kd::bfloat16(1.0f + 3 * 0x1p-8f).bits == 0x3f82);  // tie -> even (up)
  CHECK(kd::bfloat16(1.0f + 0x1p-8f + 0x1p-20f).bits == 0x3f81);
  CHECK(kd::bfloat16(-(1.0f + 3 * 0x1p-8f)).bits == 0xbf82);
  CHECK(kd::bfloat16(float_of(0x7f7fffffu)).bits == 0x7f80);  // FLT_MAX rounds past the largest bf16
  CHECK(kd::bfloat16(float_of(0x7f7f7fffu)).bits == 0x7f7f);
  CHECK(kd::bfloat16(INFINITY).bits == 0x7f80);
  CHECK(kd::bfloat16(-0.0f).bits == 0x8000);
  CHECK(kd::bfloat16(float_of(0x00008000u)).bits == 0x0000);  // subnormal tie -> even (0)
  CHECK(kd::bfloat16(float_of(0x00018000u)).bits == 0x0002);  // subnormal tie -> even (2)
  CHECK(bf16_is_nan(kd::bfloat16(std::numeric_limits<float>::quiet_NaN()).bits));
  // A NaN whose payload sits only in the low 16 bits must not truncate to Inf.
  CHECK(bf16_is_nan(kd::bfloat16(float_of(0x7f800001u)).bits));
  CHECK(bf16_is_nan(kd::bfloat16(float_of(0xff800001u)).bits));
  CHECK((kd::bfloat16(float_of(0xff800001u)).bits & 0x8000u) != 0);
}

TEST_CASE("half and bfloat16 agree with the frexp/ldexp/nearbyint reference on random floats") {
  auto g = kdtest::rng(2024);
  std::uniform_int_distribution<std::uint32_t> any_bits;
  std::uniform_int_distribution<int> exp16(-27, 17);   // around the half range, subnormals and overflow included
  std::uniform_int_distribution<int> expbf(-135, 128); // around bfloat16's (= float's) range
  std::uniform_real_distribution<float> mant(1.0f, 2.0f);
  int bad_half = 0, bad_bf16 = 0, checked = 0;
  for (int i = 0; i < 1'500'000; ++i) {
    float x;
    switch (i % 3) {
      case 0: x = float_of(any_bits(g)); break;
      case 1: x = std::ldexp(mant(g), exp16(g)); break;
      default: x = std::ldexp(mant(g), expbf(g)); break;
    }
    if (any_bits(g) & 1u) x = -x;
    bad_half += !same_value(static_cast<float>(kd::half(x)), half_ref(x));
    bad_bf16 += !same_value(static_cast<float>(kd::bfloat16(x)), bf16_ref(x));
    ++checked;
  }
  CHECK(checked == 1'500'000);
  CHECK(bad_half == 0);
  CHECK(bad_bf16 == 0);
}

TEST_CASE("half: every float in [2^-26, 2^-13) with 10 random low bits agrees with the reference") {
  // Dense sweep of the subnormal / smallest-normal region (where the two code paths of the converter
  // meet): every float whose top 22 bits lie in range, with random low bits.
  auto g = kdtest::rng(7);
  std::uniform_int_distribution<std::uint32_t> low(0, 1023);
  int bad = 0;
  for (std::uint32_t hi = bits_of(0x1p-26f) >> 10; hi < (bits_of(0x1p-13f) >> 10); ++hi) {
    const float x = float_of((hi << 10) | low(g));
    bad += !same_value(static_cast<float>(kd::half(x)), half_ref(x));
  }
  CHECK(bad == 0);
}

TEST_CASE("numeric: load_as / store_as and type names") {
  CHECK(kd::load_as<double>(kd::half(0.5f)) == 0.5);
  CHECK(kd::load_as<float>(kd::bfloat16(-3.0f)) == -3.0f);
  CHECK(kd::load_as<double>(2.5f) == 2.5);
  CHECK(kd::store_as<kd::half>(1.0 / 3.0).bits == kd::half(1.0f / 3.0f).bits);
  CHECK(kd::store_as<float>(0.1) == 0.1f);
  CHECK(std::string(kd::type_name<kd::half>()) == "half");
  CHECK(std::string(kd::type_name<kd::bfloat16>()) == "bfloat16");
  CHECK(std::string(kd::type_name<float>()) == "float");
  CHECK(std::string(kd::type_name<double>()) == "double");
  CHECK(kd::is_storage_type_v<kd::half>);
  CHECK_FALSE(kd::is_storage_type_v<int>);
}
