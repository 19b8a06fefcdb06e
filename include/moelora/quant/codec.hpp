/// \file
/// \brief Scalar codecs of the quantization formats (E4M3, E2M1, NF4, E8M0, integer rint) and the
/// per-scheme group codecs of DESIGN.md §5, shared by the host and the device implementations so
/// that both round identically, bit for bit.
///
/// Every operation here is a single IEEE fp32 operation rounded to nearest even (`*`, `/`), an
/// exact one (comparisons, rint, bit manipulation, the double products of the code thresholds) or
/// integer arithmetic: there is no `a * b + c` that nvcc could contract into an FMA, and no
/// fast-math intrinsic. Where the device has an instruction for a codec (E4M3 conversions on
/// sm_89+, rounding a double down), it gives the software result for every input.
#pragma once

#include <bit>
#include <cmath>
#include <cstdint>
#include <type_traits>

#if defined(__CUDACC__)
#include <cuda_fp8.h>
#endif

#include "moelora/core/half_types.hpp"
#include "moelora/quant/format.hpp"

#if defined(__CUDA_ARCH__)
#define MOELORA_UNROLL _Pragma("unroll")
#else
#define MOELORA_UNROLL
#endif

namespace moelora::quant {

/// An INT or FP8 group (or tensor) with amax below this quantizes to zero (DESIGN.md §5).
inline constexpr float kTinyAmax = 0x1p-24f;
/// NVFP4 block scales below this are replaced by 1 (DESIGN.md §5).
inline constexpr float kNvfp4MinBlockScale = 1e-5f;

/// |value| as raw bits: a non-negative float whose unsigned order is its numeric order, so the
/// amax of a set is the unsigned max of these (the same on the host and the device, NaN included).
MOELORA_HOST_DEVICE inline std::uint32_t abs_bits(float value) { return detail::float_bits(value) & 0x7fffffffu; }

/// Rounds to the nearest integer, ties to even (exact).
MOELORA_HOST_DEVICE inline float rint_even(float value) {
#if defined(__CUDA_ARCH__)
  return rintf(value);
#else
  return std::rint(value);
#endif
}

/// FP8 E4M3 (OCP "fn": bias 7, no infinities, max 448, NaN = S.1111.111) of `value`, rounded to
/// nearest even and saturating: |value| ≥ 448 (infinity included) gives ±448; NaN gives NaN.
MOELORA_HOST_DEVICE inline std::uint8_t e4m3_encode(float value) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 890
  // The hardware conversion rounds and saturates the same way (checked on the H100 for every
  // float); the sign of a NaN is set as below.
  return static_cast<std::uint8_t>(__nv_cvt_float_to_fp8(value, __NV_SATFINITE, __NV_E4M3) |
                                   ((detail::float_bits(value) >> 24) & 0x80u));
#else
  const std::uint32_t bits = detail::float_bits(value);
  const auto sign = static_cast<std::uint8_t>((bits >> 24) & 0x80u);
  const std::uint32_t magnitude = bits & 0x7fffffffu;
  if (magnitude > 0x7f800000u) return sign | 0x7fu;   // NaN
  if (magnitude >= 0x43e00000u) return sign | 0x7eu;  // ≥ 448: saturate
  if (magnitude < 0x3c800000u) {                      // below 2^-6: subnormal, in units of 2^-9
    // 0..8 units; 8 units is 2^-6, whose code 0x08 is the smallest normal: the codes line up.
    return sign | static_cast<std::uint8_t>(rint_even(detail::bits_float(magnitude) * 512.0f));
  }
  const std::uint32_t rounded = magnitude + 0x7ffffu + ((magnitude >> 20) & 1u);  // keep 3 mantissa bits
  return sign | static_cast<std::uint8_t>((rounded >> 20) - (120u << 3));          // rebias 127 → 7
#endif
}

/// The value of an E4M3 code.
MOELORA_HOST_DEVICE inline float e4m3_decode(std::uint8_t code) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 890
  // The hardware conversion through fp16 is exact for every finite code; NaN as below.
  if ((code & 0x7fu) == 0x7fu) return detail::bits_float((static_cast<std::uint32_t>(code & 0x80u) << 24) | 0x7fc00000u);
  return __half2float(__half(__nv_cvt_fp8_to_halfraw(code, __NV_E4M3)));
#else
  const std::uint32_t exponent = (code >> 3) & 0xfu;
  const std::uint32_t mantissa = code & 0x7u;
  if (exponent == 0) {
    const float value = static_cast<float>(mantissa) * 0x1p-9f;
    return (code & 0x80u) ? -value : value;
  }
  const std::uint32_t sign = static_cast<std::uint32_t>(code & 0x80u) << 24;
  if (exponent == 15 && mantissa == 7) return detail::bits_float(sign | 0x7fc00000u);
  return detail::bits_float(sign | ((exponent + 120u) << 23) | (mantissa << 20));
#endif
}

/// Midpoint `index` (0–6) of the E2M1 magnitudes {0, .5, 1, 1.5, 2, 3, 4, 6}: between magnitude
/// indices `index` and `index + 1`.
MOELORA_HOST_DEVICE constexpr float e2m1_midpoint(int index) {
  switch (index) {
    case 0: return 0.25f;
    case 1: return 0.75f;
    case 2: return 1.25f;
    case 3: return 1.75f;
    case 4: return 2.5f;
    case 5: return 3.5f;
    default: return 5.0f;
  }
}

/// E2M1 magnitude index (0–7 of {0, 0.5, 1, 1.5, 2, 3, 4, 6}) of a ≥ 0, not NaN: the nearest
/// magnitude, ties to the even index, saturating at 6. On [0, 2] the magnitudes are the multiples
/// of 1/2, index RNE(2a); on [2, 4] the integers, index RNE(a) + 2; on [4, 8) the even integers,
/// index RNE(a/2) + 4 (+0, +2, +4 are even: ties go to the even index). The three are
/// nondecreasing in a and on each segment its own is the least (2a ≤ a + 2 ≤ a/2 + 4 on [0, 2],
/// and so on), so the index is their minimum, capped at 7 (a ≥ 7). Each is one rounding:
/// RN(y + 2^23 + c) = 2^23 + RNE(y) + c, the floats in [2^23, 2^24) being the integers (larger a
/// give larger floats only), so the minimum is an unsigned min of their bits.
MOELORA_HOST_DEVICE inline std::uint32_t e2m1_index(float a) {
#if defined(__CUDA_ARCH__)  // __fadd_rn: a caller's multiply is not contracted into `once`
  const float twice = __fmaf_rn(a, 2.0f, 0x1p23f);
  const float once = __fadd_rn(a, 0x1p23f + 2.0f);
  const float half = __fmaf_rn(a, 0.5f, 0x1p23f + 4.0f);
#else
  const float twice = std::fma(a, 2.0f, 0x1p23f);
  const float once = a + (0x1p23f + 2.0f);
  const float half = std::fma(a, 0.5f, 0x1p23f + 4.0f);
#endif
  const auto lower = [](std::uint32_t p, std::uint32_t q) { return p < q ? p : q; };
  const std::uint32_t least = lower(lower(detail::float_bits(twice), detail::float_bits(once)),
                                    lower(detail::float_bits(half), detail::float_bits(0x1p23f + 7.0f)));
  return least - detail::float_bits(0x1p23f);
}

/// FP4 E2M1 nibble of `value`: sign in bit 3 (the sign bit of `value`), magnitude index
/// e2m1_index(|value|) in bits 0–2; NaN gets index 0.
MOELORA_HOST_DEVICE inline std::uint8_t e2m1_encode(float value) {
  const std::uint32_t bits = detail::float_bits(value);
  const float a = detail::bits_float(bits & 0x7fffffffu);
  return static_cast<std::uint8_t>(((bits >> 28) & 0x8u) | (a == a ? e2m1_index(a) : 0u));
}

/// The value of an E2M1 nibble (bits 4–7 of `code` ignored).
MOELORA_HOST_DEVICE inline float e2m1_decode(std::uint8_t code) {
  const std::uint32_t index = code & 0x7u;
  // index ≥ 2: exponent 2^((index >> 1) − 1), one mantissa bit; 0 and 1 are 0 and 0.5.
  const float magnitude = index < 2 ? static_cast<float>(index) * 0.5f
                                    : detail::bits_float(((126u + (index >> 1)) << 23) | ((index & 1u) << 22));
  return (code & 0x8u) ? -magnitude : magnitude;
}

/// The 16 NF4 values of QLoRA (Dettmers et al. 2023) in increasing order; index 7 is 0.
MOELORA_HOST_DEVICE constexpr float nf4_value(int index) {
  switch (index) {
    case 0: return -1.0f;
    case 1: return -0.6961928009986877f;
    case 2: return -0.5250730514526367f;
    case 3: return -0.39491748809814453f;
    case 4: return -0.28444138169288635f;
    case 5: return -0.18477343022823334f;
    case 6: return -0.09105003625154495f;
    case 7: return 0.0f;
    case 8: return 0.07958029955625534f;
    case 9: return 0.16093020141124725f;
    case 10: return 0.24611230194568634f;
    case 11: return 0.33791524171829224f;
    case 12: return 0.44070982933044434f;
    case 13: return 0.5626170039176941f;
    case 14: return 0.7229568362236023f;
    default: return 1.0f;
  }
}

/// fp32 midpoint between NF4 values `index` and `index + 1`.
MOELORA_HOST_DEVICE constexpr float nf4_midpoint(int index) { return (nf4_value(index) + nf4_value(index + 1)) * 0.5f; }

/// Index of the NF4 value nearest to `normalized` (a value divided by its block's absmax); a value
/// exactly on a midpoint takes the lower code.
MOELORA_HOST_DEVICE inline std::uint8_t nf4_encode(float normalized) {
  int index = 0;
  MOELORA_UNROLL
  for (int i = 0; i < 15; ++i) index += normalized > nf4_midpoint(i);
  return static_cast<std::uint8_t>(index);
}

// ---- thresholds: a group's codes without a division per element ----------------------------------
//
// A scheme that codes x as the index of RN(x / d) in a sorted code book (d > 0: the group's
// divisor) switches from index k to k + 1 where RN(x / d) passes a fp32 value m (a midpoint of the
// code book), i.e. where the real x / d passes b, halfway between m and its float neighbour: x / d
// ends at or below index k exactly when x / d < b. Such a b is an odd multiple of a power of two
// with 25 significant bits, so b · d (exact in double) has an odd part of at least 25 bits and is
// never a float: no x / d lies exactly on b (rounding ties never happen), and for a float x,
// x / d > b ⟺ x > b · d ⟺ x > RD(b · d), the float threshold of index k.

/// The largest float ≤ `value` (rounding toward −∞).
MOELORA_HOST_DEVICE inline float round_down_to_float(double value) {
#if defined(__CUDA_ARCH__)
  return __double2float_rd(value);
#else
  const float nearest = static_cast<float>(value);
  return static_cast<double>(nearest) <= value ? nearest : std::nextafter(nearest, -INFINITY);
#endif
}

/// Where the index passes k when the test is RN(q) > m (`m_below`: m itself gets index ≤ k; b is
/// halfway to the next float up) or RN(q) ≥ m (b halfway to the next float down); m ≠ 0.
MOELORA_HOST_DEVICE constexpr double code_boundary(float m, bool m_below) {
  const auto bits = std::bit_cast<std::uint32_t>(m);
  const std::uint32_t neighbour = m_below == ((bits & 0x80000000u) != 0) ? bits - 1 : bits + 1;
  return (static_cast<double>(m) + static_cast<double>(std::bit_cast<float>(neighbour))) * 0.5;
}

/// The float threshold of boundary b for divisor d > 0: x's index is above the boundary's exactly
/// when x > code_threshold(b, d).
MOELORA_HOST_DEVICE inline float code_threshold(double boundary, float divisor) {
  return round_down_to_float(boundary * static_cast<double>(divisor));
}

/// How many of the sorted thresholds t[0..N) lie below x (N = 2^L − 1): a binary search, so `t`
/// may be in any memory (shared memory on the device). Written with an index, not a moving
/// pointer: ptxas 13.0 merges the pointer form's last two loads into one pair, wrongly.
template <int N>
MOELORA_HOST_DEVICE inline std::uint32_t count_below(float x, const float* t) {
  static_assert(((N + 1) & N) == 0, "count_below searches 2^L - 1 thresholds");
  std::uint32_t index = 0;
  MOELORA_UNROLL
  for (std::uint32_t step = (N + 1) / 2; step > 0; step /= 2) index += x > t[index + step - 1] ? step : 0;
  return index;
}

// ---- bins: one exact comparison per element ---------------------------------------------------
//
// A binned codec codes the x of a group (divisor d > 0) whose bin coordinate u = kBinUnit · x/d +
// kBinOrigin lies in [0, kBins] (NF4: x/d ∈ [-1, 1], 32 bins per unit, origin 32; NVFP4: |x|/d ∈
// [0, 8], 4 bins per unit, origin 0). With a bin scale s = (kBinUnit / d)(1 + δ), |δ| ≤
// kBinScaleError (d in [2^-120, 2^120], so 1/d is a normal float), the real x·s is within
// kBins · kBinScaleError ≤ 2^-15 of u − kBinOrigin. One FMA, RN(x·s + kBinOrigin + 2^23), lands in
// [2^23, 2^23 + kBins] where the floats are the integers: it is 2^23 + n with |n − u| ≤ 1/2 + 2^-15
// (no overflow, no other rounding).
// The exact code is #{k : x/d > b_k} = #{k : u > U_k}, U_k = kBinUnit · b_k + kBinOrigin (exact in
// double). bin_base(n) counts the U_k < n − 1/2 − kBinMargin: each lies below u. Adjacent U_k are
// more than 1 + 2·kBinMargin apart (bins_separate), so the next boundary after those,
// k = bin_base(n), is the only one that can lie below u: the one after it exceeds
// n + 1/2 + kBinMargin ≥ u. Hence code = k + (x > t[k]) with t[k] the exact threshold (t[kThresholds]:
// the spare threshold +∞, code_threshold(kSpareBoundary, d)).

/// Margin, in bins, between the approximate bin of x and the boundaries it may skip.
inline constexpr double kBinMargin = 0x1p-10;
/// Bound on the relative error δ of a bin scale (bin_scale): 2^-24 on the host (RN(1/d)), 2^-22 on
/// the device (rcp.approx, within 1 ulp); kBins · kBinScaleError must stay below kBinMargin.
inline constexpr double kBinScaleError = 0x1p-22;
/// Boundary of the spare threshold t[kThresholds]: +∞, so that x > t[kThresholds] never holds.
inline constexpr double kSpareBoundary = INFINITY;

/// For each boundary of a binned codec (kBins, kBinUnit, kBinOrigin, kThresholds, sorted
/// boundaries boundary(k)): the first bin n with U_k < n − 1/2 − kBinMargin (U_k ≥ 0, so the cast
/// is a floor).
template <class Codec>
struct BinStarts {
  int at[Codec::kThresholds];
  constexpr BinStarts() : at{} {
    for (int k = 0; k < Codec::kThresholds; ++k)
      at[k] = static_cast<int>(Codec::boundary(k) * Codec::kBinUnit + Codec::kBinOrigin + 0.5 + kBinMargin) + 1;
  }
};

/// The candidate code of bin n (0..kBins): the number of boundaries with U_k < n − 1/2 − kBinMargin
/// (compile-time starts: a few integer comparisons).
template <class Codec>
MOELORA_HOST_DEVICE constexpr std::uint8_t bin_base(int n) {
  constexpr BinStarts<Codec> kStarts{};
  int count = 0;
  MOELORA_UNROLL
  for (int k = 0; k < Codec::kThresholds; ++k) count += n >= kStarts.at[k];
  return static_cast<std::uint8_t>(count);
}

/// Whether adjacent boundaries are more than 1 + 2·kBinMargin bins apart and all lie strictly
/// inside [0, kBins] (bin_base's conditions), with the scale error within the margin.
template <class Codec>
constexpr bool bins_separate() {
  const auto bin = [](int k) { return Codec::boundary(k) * Codec::kBinUnit + Codec::kBinOrigin; };
  for (int k = 0; k + 1 < Codec::kThresholds; ++k)
    if (bin(k + 1) - bin(k) <= 1.0 + 2.0 * kBinMargin) return false;
  return Codec::kBins * kBinScaleError < kBinMargin && Codec::kBins < 256 && bin(0) > 0.0 &&
         bin(Codec::kThresholds - 1) < Codec::kBins;
}

/// s = (kBinUnit / d)(1 + δ), |δ| ≤ kBinScaleError, for a divisor d in [2^-120, 2^120]; 0 otherwise
/// (NaN included): then the group must be encoded by count_below. Only the choice of the candidate
/// depends on s, never the code, so the device may use the approximate reciprocal.
template <int Unit>
MOELORA_HOST_DEVICE inline float bin_scale(float divisor) {
  if (!(divisor >= 0x1p-120f && divisor <= 0x1p120f)) return 0.0f;
#if defined(__CUDA_ARCH__)
  float inverse;
  asm("rcp.approx.ftz.f32 %0, %1;" : "=f"(inverse) : "f"(divisor));
#else
  const float inverse = 1.0f / divisor;
#endif
  return inverse * static_cast<float>(Unit);
}

/// Code of x (bin coordinate in [0, Bins], see above) from its bin: base = bins[n] (bin_base), then
/// one comparison with the exact threshold t[base]; s = bin_scale(d) ≠ 0. Equal to count_below.
template <int Origin>
MOELORA_HOST_DEVICE inline std::uint32_t count_below_binned(float x, float s, const std::uint8_t* bins, const float* t) {
  constexpr float kOffset = 0x1p23f + static_cast<float>(Origin);
#if defined(__CUDA_ARCH__)
  const float nearest = __fmaf_rn(x, s, kOffset);
#else
  const float nearest = std::fma(x, s, kOffset);
#endif
  const std::uint32_t base = bins[detail::float_bits(nearest) - detail::float_bits(0x1p23f)];  // 2^23 + n: bin n
  return base + (x > t[base] ? 1u : 0u);
}

/// E8M0 code of the MXFP4 scale of a block with amax `amax` ≥ 0: 2^(floor(log2 amax) − 2), i.e.
/// the biased exponent of `amax` minus 2, clamped below at 2^-127 (code 0; zero and tiny blocks).
MOELORA_HOST_DEVICE inline std::uint8_t e8m0_encode_mx(float amax) {
  const std::uint32_t biased = (detail::float_bits(amax) >> 23) & 0xffu;
  return static_cast<std::uint8_t>(biased > 2 ? biased - 2 : 0);
}

/// The power of two of an E8M0 code (2^(code − 127); code 255 is NaN).
MOELORA_HOST_DEVICE inline float e8m0_decode(std::uint8_t code) {
  if (code == 0) return detail::bits_float(0x00400000u);  // 2^-127, subnormal
  if (code == 255) return detail::bits_float(0x7fc00000u);
  return detail::bits_float(static_cast<std::uint32_t>(code) << 23);
}

/// 1 / e8m0_decode(code) for codes 0–253, exact (2^(127 − code)).
MOELORA_HOST_DEVICE inline float e8m0_inverse(std::uint8_t code) {
  return detail::bits_float((254u - code) << 23);
}

/// INT scale of DESIGN.md §5: s = bound / amax, or 1 when amax < 2^-24 (all codes then 0).
MOELORA_HOST_DEVICE inline float int_scale(float amax, float bound) { return amax < kTinyAmax ? 1.0f : bound / amax; }

/// clamp(rint(x · s), −bound − 1, bound) as a two's complement byte (INT4: its low nibble).
template <int Bits>
MOELORA_HOST_DEVICE inline std::uint8_t int_encode(float x, float s) {
  constexpr float kBound = static_cast<float>((1 << (Bits - 1)) - 1);
  float q = rint_even(x * s);
  q = q < -kBound - 1.0f ? -kBound - 1.0f : q;
  q = q > kBound ? kBound : q;
  return static_cast<std::uint8_t>(static_cast<std::int32_t>(q) & ((1 << Bits) - 1));
}

/// The signed integer of an INT code.
template <int Bits>
MOELORA_HOST_DEVICE inline float int_code_value(std::uint8_t code) {
  constexpr std::int32_t kSign = 1 << (Bits - 1);
  return static_cast<float>((static_cast<std::int32_t>(code & ((1 << Bits) - 1)) ^ kSign) - kSign);
}

// ---- schemes: one per format and granularity --------------------------------------------------

/// A (format, granularity) pair: the seven ways a weight can be quantized.
enum class Scheme : std::uint8_t { int8_tensor, int8_channel, int4_block, fp8_tensor, nvfp4, nf4, mxfp4 };

/// The scheme of a (validated) spec.
constexpr Scheme scheme_of(const QuantSpec& spec) {
  switch (spec.format) {
    case Format::int8: return spec.granularity == Granularity::per_channel ? Scheme::int8_channel : Scheme::int8_tensor;
    case Format::int4: return Scheme::int4_block;
    case Format::fp8_e4m3: return Scheme::fp8_tensor;
    case Format::nvfp4: return Scheme::nvfp4;
    case Format::nf4: return Scheme::nf4;
    case Format::mxfp4: break;
  }
  return Scheme::mxfp4;
}

/// The numbers a group's elements are coded with: `enc` is what encoding multiplies (INT, FP8,
/// MXFP4) or divides (NVFP4, NF4) by, `dec` what decoding divides (INT, FP8) or multiplies by.
struct GroupScale {
  float enc, dec;
};

/// How one scheme codes a group of elements. Members:
/// - `kBits`: bits per code; `kGroup`: elements per group along `in` (0: the whole tensor, one
///   scale from the tensor amax; -1: a whole row, i.e. per output channel); `kTensorAmax`: whether
///   the scheme calibrates a tensor amax (then the packed blob has an `amax` section);
/// - `Stored`: element type of the `scales` section (`float` or a one-byte code; unused when
///   kGroup == 0);
/// - `make(group_amax, tensor_amax, stored)`: the group's scale from its calibrated amax, and what
///   the `scales` section stores; `load(stored, tensor_amax)`: the same GroupScale from the stored
///   form (bit for bit what `make` returned);
/// - `encode(x, scale)` → code; `decode(code, scale)` → value.
/// The schemes that code x as the index of RN(x / d) in a sorted code book (NVFP4, NF4) also have
/// `kThresholds` (7 or 15), `divisor(scale)` (d), `boundary(k)` (where the index passes k, see
/// code_boundary) and `encode_below(x, t)`: equal to `encode(x, scale)` for every finite x when
/// t[k] = code_threshold(boundary(k), divisor(scale)), so a group computes its thresholds once
/// instead of a division per element. NVFP4, NF4 and MXFP4 decode as `unit_value(code) · scale.dec`.
template <Scheme S> struct SchemeCodec;

/// The scale of the per-tensor schemes: s = Bound / tensor amax (1 below 2^-24), from the amax the
/// packed blob keeps; nothing is stored per group.
template <int Bound>
struct TensorScaleCodec {
  static constexpr int kGroup = 0;
  static constexpr bool kTensorAmax = true;
  using Stored = float;
  MOELORA_HOST_DEVICE static GroupScale load(Stored /*stored*/, float tensor_amax) {
    const float s = int_scale(tensor_amax, static_cast<float>(Bound));
    return {s, s};
  }
  MOELORA_HOST_DEVICE static GroupScale make(float /*group_amax*/, float tensor_amax, Stored& stored) {
    return load(stored, tensor_amax);
  }
};

/// INT8 per tensor: s = 127 / tensor amax; y = clamp(rint(x·s), −128, 127) / s.
template <> struct SchemeCodec<Scheme::int8_tensor> : TensorScaleCodec<127> {
  static constexpr int kBits = 8;
  MOELORA_HOST_DEVICE static std::uint8_t encode(float x, GroupScale s) { return int_encode<8>(x, s.enc); }
  MOELORA_HOST_DEVICE static float decode(std::uint8_t code, GroupScale s) { return int_code_value<8>(code) / s.dec; }
};

/// INT8 per output channel: s = 127 / row amax, stored per row.
template <> struct SchemeCodec<Scheme::int8_channel> : SchemeCodec<Scheme::int8_tensor> {
  static constexpr int kGroup = -1;
  static constexpr bool kTensorAmax = false;
  MOELORA_HOST_DEVICE static GroupScale load(Stored stored, float /*tensor_amax*/) { return {stored, stored}; }
  MOELORA_HOST_DEVICE static GroupScale make(float group_amax, float /*tensor_amax*/, Stored& stored) {
    stored = int_scale(group_amax, 127.0f);
    return {stored, stored};
  }
};

/// INT4 blockwise: blocks of 128 along `in`, s = 7 / block amax stored per block.
template <> struct SchemeCodec<Scheme::int4_block> {
  static constexpr int kBits = 4;
  static constexpr int kGroup = 128;
  static constexpr bool kTensorAmax = false;
  using Stored = float;
  MOELORA_HOST_DEVICE static GroupScale load(Stored stored, float /*tensor_amax*/) { return {stored, stored}; }
  MOELORA_HOST_DEVICE static GroupScale make(float group_amax, float /*tensor_amax*/, Stored& stored) {
    stored = int_scale(group_amax, 7.0f);
    return {stored, stored};
  }
  MOELORA_HOST_DEVICE static std::uint8_t encode(float x, GroupScale s) { return int_encode<4>(x, s.enc); }
  MOELORA_HOST_DEVICE static float decode(std::uint8_t code, GroupScale s) { return int_code_value<4>(code) / s.dec; }
};

/// FP8 E4M3 per tensor: s = 448 / tensor amax (1 below 2^-24); y = e4m3(x·s) / s.
template <> struct SchemeCodec<Scheme::fp8_tensor> : TensorScaleCodec<448> {
  static constexpr int kBits = 8;
  MOELORA_HOST_DEVICE static std::uint8_t encode(float x, GroupScale s) { return e4m3_encode(x * s.enc); }
  MOELORA_HOST_DEVICE static float decode(std::uint8_t code, GroupScale s) { return e4m3_decode(code) / s.dec; }
};

/// NVFP4: gs = tensor amax / (6·448); per 16-block the E4M3 code of min(bmax / (6·gs), 448) is
/// stored, sb = e4m3(...)·gs (1 below 1e-5); y = E2M1(x / sb)·sb.
template <> struct SchemeCodec<Scheme::nvfp4> {
  static constexpr int kBits = 4;
  static constexpr int kGroup = 16;
  static constexpr bool kTensorAmax = true;
  using Stored = std::uint8_t;
  MOELORA_HOST_DEVICE static GroupScale load(Stored stored, float tensor_amax) {
    const float gs = tensor_amax / 2688.0f;
    const float sb = e4m3_decode(stored) * gs;
    const float scale = sb < kNvfp4MinBlockScale ? 1.0f : sb;
    return {scale, scale};
  }
  MOELORA_HOST_DEVICE static GroupScale make(float group_amax, float tensor_amax, Stored& stored) {
    const float gs = tensor_amax / 2688.0f;
    const float ratio = group_amax / (6.0f * gs);
    stored = e4m3_encode(ratio < 448.0f ? ratio : 448.0f);  // NaN (0/0 of an all-zero tensor) → 448
    return load(stored, tensor_amax);
  }
  MOELORA_HOST_DEVICE static std::uint8_t encode(float x, GroupScale s) { return e2m1_encode(x / s.enc); }
  MOELORA_HOST_DEVICE static float unit_value(std::uint8_t code) { return e2m1_decode(code); }
  MOELORA_HOST_DEVICE static float decode(std::uint8_t code, GroupScale s) { return unit_value(code) * s.dec; }

  static constexpr int kThresholds = 7;
  MOELORA_HOST_DEVICE static float divisor(GroupScale s) { return s.enc; }
  /// e2m1_encode tests |RN(x / sb)| > midpoint k for even k, ≥ for odd k.
  MOELORA_HOST_DEVICE static constexpr double boundary(int k) { return code_boundary(e2m1_midpoint(k), k % 2 == 0); }
  /// The sign bit of x (that of x / sb) and the number of thresholds below |x|.
  MOELORA_HOST_DEVICE static std::uint8_t encode_below(float x, const float* t) {
    const std::uint32_t bits = detail::float_bits(x);
    return static_cast<std::uint8_t>(((bits >> 28) & 0x8u) | count_below<kThresholds>(detail::bits_float(bits & 0x7fffffffu), t));
  }

  /// Bins of the binned encoding of |x| (see count_below_binned): 4 per unit of |x|/sb over [0, 8].
  /// |x|/sb may exceed 8 (tiny blocks: a subnormal E4M3 code, or sb < 1e-5 replaced by 1): then
  /// `bin_scale` is 0 and the group uses encode_below. `encode_binned(x, s, bins, t)` equals
  /// encode_below(x, t) when t[7] is the spare threshold.
  static constexpr int kBins = 32, kBinUnit = 4, kBinOrigin = 0;
  MOELORA_HOST_DEVICE static constexpr std::uint8_t bin_code(int n) { return bin_base<SchemeCodec>(n); }
  MOELORA_HOST_DEVICE static float bin_scale(GroupScale s, float group_amax) {
    const float scale = quant::bin_scale<kBinUnit>(divisor(s));
    return group_amax * scale <= static_cast<float>(kBins) ? scale : 0.0f;  // RN(bmax·s) ≤ 32: every n ≤ 32
  }
  MOELORA_HOST_DEVICE static std::uint32_t encode_binned(float x, float s, const std::uint8_t* bins, const float* t) {
    const std::uint32_t bits = detail::float_bits(x);
    return ((bits >> 28) & 0x8u) + count_below_binned<kBinOrigin>(detail::bits_float(bits & 0x7fffffffu), s, bins, t);
  }
};

static_assert(bins_separate<SchemeCodec<Scheme::nvfp4>>(), "an NVFP4 bin (plus margins) holds at most one boundary");

/// NF4: blocks of 64, c = block absmax stored as fp32; code = nearest NF4 value of x / c; y = v·c.
/// An all-zero block (c = 0) encodes with divisor 1 instead: its elements are ±0, code 7 either way.
template <> struct SchemeCodec<Scheme::nf4> {
  static constexpr int kBits = 4;
  static constexpr int kGroup = 64;
  static constexpr bool kTensorAmax = false;
  using Stored = float;
  MOELORA_HOST_DEVICE static GroupScale load(Stored stored, float /*tensor_amax*/) {
    return {stored == 0.0f ? 1.0f : stored, stored};
  }
  MOELORA_HOST_DEVICE static GroupScale make(float group_amax, float tensor_amax, Stored& stored) {
    stored = group_amax;
    return load(stored, tensor_amax);
  }
  MOELORA_HOST_DEVICE static std::uint8_t encode(float x, GroupScale s) { return nf4_encode(x / s.enc); }
  MOELORA_HOST_DEVICE static float unit_value(std::uint8_t code) { return nf4_value(code & 0xf); }
  MOELORA_HOST_DEVICE static float decode(std::uint8_t code, GroupScale s) { return unit_value(code) * s.dec; }

  static constexpr int kThresholds = 15;
  MOELORA_HOST_DEVICE static float divisor(GroupScale s) { return s.enc; }
  /// nf4_encode tests RN(x / c) > nf4_midpoint(k).
  MOELORA_HOST_DEVICE static constexpr double boundary(int k) { return code_boundary(nf4_midpoint(k), true); }
  /// The number of thresholds below x.
  MOELORA_HOST_DEVICE static std::uint8_t encode_below(float x, const float* t) {
    return static_cast<std::uint8_t>(count_below<kThresholds>(x, t));
  }

  /// Bins of the binned encoding (see count_below_binned): 32 per unit of x/c over [-1, 1].
  /// `bin_code(n)` fills its table of kBins + 1 candidate codes, `bin_scale(scale, group_amax)` its
  /// per-group factor (0: use encode_below; every |x| ≤ c, so the amax is not needed),
  /// `encode_binned(x, s, bins, t)` equals encode_below(x, t) when t[15] is the spare threshold.
  static constexpr int kBins = 64, kBinUnit = 32, kBinOrigin = 32;
  MOELORA_HOST_DEVICE static constexpr std::uint8_t bin_code(int n) { return bin_base<SchemeCodec>(n); }
  MOELORA_HOST_DEVICE static float bin_scale(GroupScale s, float /*group_amax*/) { return quant::bin_scale<kBinUnit>(divisor(s)); }
  MOELORA_HOST_DEVICE static std::uint32_t encode_binned(float x, float s, const std::uint8_t* bins, const float* t) {
    return count_below_binned<kBinOrigin>(x, s, bins, t);
  }
};

static_assert(bins_separate<SchemeCodec<Scheme::nf4>>(), "an NF4 bin (plus margins) holds at most one boundary");

/// MXFP4: blocks of 32, E8M0 scale 2^(floor(log2 bmax) − 2); y = E2M1(x / scale)·scale. Encoding
/// multiplies by the exact inverse power of two, which rounds exactly as the division does.
template <> struct SchemeCodec<Scheme::mxfp4> {
  static constexpr int kBits = 4;
  static constexpr int kGroup = 32;
  static constexpr bool kTensorAmax = false;
  using Stored = std::uint8_t;
  MOELORA_HOST_DEVICE static GroupScale load(Stored stored, float /*tensor_amax*/) {
    return {e8m0_inverse(stored), e8m0_decode(stored)};
  }
  MOELORA_HOST_DEVICE static GroupScale make(float group_amax, float tensor_amax, Stored& stored) {
    stored = e8m0_encode_mx(group_amax);
    return load(stored, tensor_amax);
  }
  MOELORA_HOST_DEVICE static std::uint8_t encode(float x, GroupScale s) { return e2m1_encode(x * s.enc); }
  /// The magnitude index (bits 0–2) of encode(x, s) for an x that is not NaN: no NaN test, no sign.
  MOELORA_HOST_DEVICE static std::uint32_t encode_magnitude(float x, GroupScale s) {
#if defined(__CUDA_ARCH__)
    return e2m1_index(fabsf(x) * s.enc);  // |x| is a free operand modifier of the multiply
#else
    return e2m1_index(std::fabs(x) * s.enc);
#endif
  }
  MOELORA_HOST_DEVICE static float unit_value(std::uint8_t code) { return e2m1_decode(code); }
  MOELORA_HOST_DEVICE static float decode(std::uint8_t code, GroupScale s) { return unit_value(code) * s.dec; }
};

/// Calls `f(std::integral_constant<Scheme, S>{})` with the compile-time scheme of `spec`.
template <class F>
decltype(auto) dispatch_scheme(const QuantSpec& spec, F&& f) {
  switch (scheme_of(spec)) {
    case Scheme::int8_tensor: return f(std::integral_constant<Scheme, Scheme::int8_tensor>{});
    case Scheme::int8_channel: return f(std::integral_constant<Scheme, Scheme::int8_channel>{});
    case Scheme::int4_block: return f(std::integral_constant<Scheme, Scheme::int4_block>{});
    case Scheme::fp8_tensor: return f(std::integral_constant<Scheme, Scheme::fp8_tensor>{});
    case Scheme::nvfp4: return f(std::integral_constant<Scheme, Scheme::nvfp4>{});
    case Scheme::nf4: return f(std::integral_constant<Scheme, Scheme::nf4>{});
    case Scheme::mxfp4: break;
  }
  return f(std::integral_constant<Scheme, Scheme::mxfp4>{});
}

}  // namespace moelora::quant
