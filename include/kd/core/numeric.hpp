// kd/core/numeric.hpp: 16-bit storage types.
//
// kd owns its half and bfloat16 types (instead of borrowing Eigen's or CUDA's) so that one type names
// the storage on host and device: both are trivially copyable 16-bit structs with the same bit layout
// as __half / __nv_bfloat16, so a CUDA backend reinterprets pointers to them without a copy.
// Conversions round to nearest even, like the hardware.
#pragma once

#include <bit>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>

#if defined(__CUDACC__)
#define KD_HOST_DEVICE __host__ __device__
#else
#define KD_HOST_DEVICE
#endif

namespace kd {

namespace detail {
KD_HOST_DEVICE constexpr std::uint32_t float_bits(float f) noexcept { return std::bit_cast<std::uint32_t>(f); }
KD_HOST_DEVICE constexpr float bits_float(std::uint32_t u) noexcept { return std::bit_cast<float>(u); }
}  // namespace detail

// bfloat16: the top 16 bits of an IEEE float.
struct bfloat16 {
  std::uint16_t bits = 0;

  bfloat16() = default;
  KD_HOST_DEVICE constexpr explicit bfloat16(float f) noexcept : bits(from_float(f)) {}
  KD_HOST_DEVICE constexpr explicit operator float() const noexcept {
    return detail::bits_float(static_cast<std::uint32_t>(bits) << 16);
  }
  KD_HOST_DEVICE static constexpr bfloat16 from_bits(std::uint16_t b) noexcept {
    bfloat16 r;
    r.bits = b;
    return r;
  }

 private:
  KD_HOST_DEVICE static constexpr std::uint16_t from_float(float f) noexcept {
    std::uint32_t u = detail::float_bits(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<std::uint16_t>((u >> 16) | 0x40u);  // quiet NaN
    u += 0x7fffu + ((u >> 16) & 1u);  // round to nearest even
    return static_cast<std::uint16_t>(u >> 16);
  }
};

// IEEE 754 binary16.
struct half {
  std::uint16_t bits = 0;

  half() = default;
  KD_HOST_DEVICE constexpr explicit half(float f) noexcept : bits(from_float(f)) {}
  KD_HOST_DEVICE constexpr explicit operator float() const noexcept { return to_float(bits); }
  KD_HOST_DEVICE static constexpr half from_bits(std::uint16_t b) noexcept {
    half r;
    r.bits = b;
    return r;
  }

 private:
  KD_HOST_DEVICE static constexpr std::uint16_t from_float(float f) noexcept {
    const std::uint32_t u = detail::float_bits(f);
    const std::uint32_t sign = (u >> 16) & 0x8000u;
    const std::uint32_t abs = u & 0x7fffffffu;
    if (abs > 0x7f800000u) return static_cast<std::uint16_t>(sign | 0x7e00u);  // NaN
    if (abs >= 0x477ff000u) return static_cast<std::uint16_t>(sign | 0x7c00u);  // overflow -> Inf
    if (abs < 0x38800000u) {
      // Subnormal or zero in half: shift the implicit-one mantissa into place with rounding.
      if (abs < 0x33000000u) return static_cast<std::uint16_t>(sign);  // below half the smallest subnormal
      const std::uint32_t exp = abs >> 23;
      const std::uint32_t mant = (abs & 0x7fffffu) | 0x800000u;
      const std::uint32_t shift = 126u - exp;  // 14 + (112 - exp) + 1 - 1
      const std::uint32_t halfway = 1u << (shift - 1);
      std::uint32_t r = mant >> shift;
      const std::uint32_t rem = mant & ((1u << shift) - 1u);
      if (rem > halfway || (rem == halfway && (r & 1u))) ++r;
      return static_cast<std::uint16_t>(sign | r);
    }
    // Normal: rebias exponent (127 -> 15) and round the 13 dropped mantissa bits to nearest even.
    std::uint32_t r = abs - 0x38000000u;
    r += 0xfffu + ((r >> 13) & 1u);
    return static_cast<std::uint16_t>(sign | (r >> 13));
  }

  KD_HOST_DEVICE static constexpr float to_float(std::uint16_t h) noexcept {
    const std::uint32_t sign = (static_cast<std::uint32_t>(h) & 0x8000u) << 16;
    const std::uint32_t exp = (h >> 10) & 0x1fu;
    std::uint32_t mant = h & 0x3ffu;
    if (exp == 0x1fu) return detail::bits_float(sign | 0x7f800000u | (mant << 13));  // Inf / NaN
    if (exp == 0) {
      if (mant == 0) return detail::bits_float(sign);
      // Subnormal: normalise.
      std::uint32_t e = 113;
      while ((mant & 0x400u) == 0) {
        mant <<= 1;
        --e;
      }
      return detail::bits_float(sign | (e << 23) | ((mant & 0x3ffu) << 13));
    }
    return detail::bits_float(sign | ((exp + 112u) << 23) | (mant << 13));
  }
};

static_assert(sizeof(half) == 2 && std::is_trivially_copyable_v<half>);
static_assert(sizeof(bfloat16) == 2 && std::is_trivially_copyable_v<bfloat16>);

// kd's 16-bit floating-point storage types: stored in 16 bits, computed in float. The one spelling of
// "bfloat16 or half" (GEMM operands, vector widths, accumulators, file dtypes all ask it).
template <class T>
inline constexpr bool is_16bit_float_v = std::is_same_v<T, half> || std::is_same_v<T, bfloat16>;
static_assert(is_16bit_float_v<bfloat16> && is_16bit_float_v<half> && !is_16bit_float_v<float> &&
              !is_16bit_float_v<double> && !is_16bit_float_v<unsigned short>);

// Storage element types kd's losses accept.
template <class T>
inline constexpr bool is_storage_type_v = std::is_same_v<T, float> || std::is_same_v<T, double> || is_16bit_float_v<T>;

// Load a stored element into an accumulator type, and store one back.
template <class Acc, class T>
KD_HOST_DEVICE constexpr Acc load_as(T v) noexcept {
  if constexpr (is_16bit_float_v<T>)
    return static_cast<Acc>(static_cast<float>(v));
  else
    return static_cast<Acc>(v);
}

template <class T, class Acc>
KD_HOST_DEVICE constexpr T store_as(Acc v) noexcept {
  if constexpr (is_16bit_float_v<T>)
    return T(static_cast<float>(v));
  else
    return static_cast<T>(v);
}

template <class T>
constexpr const char* type_name() noexcept {
  if constexpr (std::is_same_v<T, float>) return "float";
  else if constexpr (std::is_same_v<T, double>) return "double";
  else if constexpr (std::is_same_v<T, half>) return "half";
  else if constexpr (std::is_same_v<T, bfloat16>) return "bfloat16";
  else return "unknown";
}

}  // namespace kd
