/// \file
/// \brief Host-side 16-bit float storage types (bf16, fp16) with round-to-nearest-even conversion.
///
/// Bit layouts equal CUDA's `__nv_bfloat16` and `__half`, so host and device buffers are
/// interchangeable byte for byte. The conversions are usable in device code too.
#pragma once

#include <bit>
#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define MOELORA_HOST_DEVICE __host__ __device__
#else
#define MOELORA_HOST_DEVICE
#endif

namespace moelora {

namespace detail {
MOELORA_HOST_DEVICE inline std::uint32_t float_bits(float value) {
  std::uint32_t bits;
  std::memcpy(&bits, &value, sizeof bits);
  return bits;
}
MOELORA_HOST_DEVICE inline float bits_float(std::uint32_t bits) {
  float value;
  std::memcpy(&value, &bits, sizeof value);
  return value;
}
}  // namespace detail

/// bfloat16_t storage: the upper 16 bits of an IEEE binary32, rounded to nearest even; NaN stays NaN.
struct bfloat16_t {
  std::uint16_t bits = 0;

  bfloat16_t() = default;
  MOELORA_HOST_DEVICE explicit bfloat16_t(float value) {
    std::uint32_t u = detail::float_bits(value);
    if ((u & 0x7fffffffu) > 0x7f800000u) {
      bits = static_cast<std::uint16_t>((u >> 16) | 0x40u);  // quiet NaN
      return;
    }
    u += 0x7fffu + ((u >> 16) & 1u);
    bits = static_cast<std::uint16_t>(u >> 16);
  }
  MOELORA_HOST_DEVICE explicit operator float() const {
    return detail::bits_float(static_cast<std::uint32_t>(bits) << 16);
  }
  friend bool operator==(bfloat16_t a, bfloat16_t b) { return a.bits == b.bits; }
};

/// IEEE binary16 storage, rounded to nearest even with subnormals; overflow gives infinity.
struct half_t {
  std::uint16_t bits = 0;

  half_t() = default;
  MOELORA_HOST_DEVICE explicit half_t(float value) {
    const std::uint32_t u = detail::float_bits(value);
    const std::uint32_t sign = (u >> 16) & 0x8000u;
    const std::uint32_t magnitude = u & 0x7fffffffu;
    if (magnitude > 0x7f800000u) {  // NaN
      bits = static_cast<std::uint16_t>(sign | 0x7e00u);
      return;
    }
    if (magnitude >= 0x477ff000u) {  // rounds to >= 65520: infinity
      bits = static_cast<std::uint16_t>(sign | 0x7c00u);
      return;
    }
    if (magnitude < 0x38800000u) {  // below 2^-14: subnormal or zero, in units of 2^-24
      const float scaled = detail::bits_float(magnitude) * 16777216.0f;  // exact
      // round half to even on the integer part
      auto whole = static_cast<std::uint32_t>(scaled);
      const float fraction = scaled - static_cast<float>(whole);
      if (fraction > 0.5f || (fraction == 0.5f && (whole & 1u))) ++whole;
      bits = static_cast<std::uint16_t>(sign | whole);
      return;
    }
    std::uint32_t rounded = magnitude + 0xfffu + ((magnitude >> 13) & 1u);
    rounded = ((rounded >> 13) - (112u << 10));  // rebias exponent 127 -> 15
    bits = static_cast<std::uint16_t>(sign | rounded);
  }
  MOELORA_HOST_DEVICE explicit operator float() const {
    const std::uint32_t sign = static_cast<std::uint32_t>(bits & 0x8000u) << 16;
    const std::uint32_t exponent = (bits >> 10) & 0x1fu;
    const std::uint32_t mantissa = bits & 0x3ffu;
    if (exponent == 0) {  // zero or subnormal: mantissa * 2^-24
      const float value = static_cast<float>(mantissa) * (1.0f / 16777216.0f);
      return sign ? -value : value;
    }
    if (exponent == 31) return detail::bits_float(sign | 0x7f800000u | (mantissa << 13));
    return detail::bits_float(sign | ((exponent + 112u) << 23) | (mantissa << 13));
  }
  friend bool operator==(half_t a, half_t b) { return a.bits == b.bits; }
};

static_assert(sizeof(bfloat16_t) == 2 && sizeof(half_t) == 2);

}  // namespace moelora
