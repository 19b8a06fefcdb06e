/// \file
/// \brief Weight quantization formats (DESIGN.md §5): the format, its granularity and amax scope,
/// their names, and the spelling a configuration gives them.
#pragma once

#include <array>
#include <cstdint>
#include <string>
#include <string_view>

#include "moelora/core/error.hpp"

namespace moelora::quant {

/// Element format of a quantized weight.
enum class Format : std::uint8_t {
  int8,      ///< signed 8-bit integers, codes [-128, 127], per tensor or per output channel
  int4,      ///< signed 4-bit integers, codes [-8, 7], blocks of 128 along `in`
  fp8_e4m3,  ///< OCP FP8 E4M3 (max 448, saturating), per tensor
  nvfp4,     ///< E2M1 elements, blocks of 16 along `in` with E4M3 block scales, an fp32 global scale
  nf4,       ///< QLoRA NormalFloat4: 16 code values, blocks of 64 along `in` with an fp32 absmax
  mxfp4,     ///< OCP MX FP4: E2M1 elements, blocks of 32 along `in` with E8M0 (power of two) scales
};

/// Where the scale of an INT8 weight changes: one per tensor or one per output channel (row).
/// The other formats have fixed blocks and ignore it.
enum class Granularity : std::uint8_t { per_tensor, per_channel };

/// The tensor-level amax (INT8 per tensor, FP8, NVFP4's global scale): shared by all local experts
/// (the default) or one per expert (axis 0). Formats without a tensor-level amax ignore it.
enum class AmaxScope : std::uint8_t { shared, per_expert };

/// What a weight is quantized to. Max calibration: amax = max |w| over the scope.
struct QuantSpec {
  Format format = Format::nvfp4;
  Granularity granularity = Granularity::per_tensor;
  AmaxScope amax_scope = AmaxScope::shared;
  friend bool operator==(const QuantSpec&, const QuantSpec&) = default;
};

/// Canonical name of a format: "int8", "int4", "fp8_e4m3", "nvfp4", "nf4" or "mxfp4".
constexpr std::string_view format_name(Format format) {
  switch (format) {
    case Format::int8: return "int8";
    case Format::int4: return "int4";
    case Format::fp8_e4m3: return "fp8_e4m3";
    case Format::nvfp4: return "nvfp4";
    case Format::nf4: return "nf4";
    case Format::mxfp4: return "mxfp4";
  }
  return "?";
}

/// Bits per stored element code: 8 (INT8, FP8) or 4 (two codes per byte).
constexpr int code_bits(Format format) {
  return format == Format::int8 || format == Format::fp8_e4m3 ? 8 : 4;
}

/// Elements per scale block along `in` (INT4 128, NVFP4 16, NF4 64, MXFP4 32); 0 for the formats
/// scaled per tensor or per channel (INT8, FP8).
constexpr std::int64_t block_size(Format format) {
  switch (format) {
    case Format::int4: return 128;
    case Format::nvfp4: return 16;
    case Format::nf4: return 64;
    case Format::mxfp4: return 32;
    case Format::int8:
    case Format::fp8_e4m3: break;
  }
  return 0;
}

/// Whether the spec calibrates a tensor-level amax (INT8 per tensor, FP8, NVFP4), the quantity
/// `amax_scope` applies to.
constexpr bool has_tensor_amax(const QuantSpec& spec) {
  return (spec.format == Format::int8 && spec.granularity == Granularity::per_tensor) ||
         spec.format == Format::fp8_e4m3 || spec.format == Format::nvfp4;
}

/// Every format and granularity, with the shared amax scope: the names `parse_quant_spec` accepts.
inline constexpr std::array<QuantSpec, 7> kAllQuantSpecs = {
    QuantSpec{Format::int8, Granularity::per_tensor, AmaxScope::shared},
    QuantSpec{Format::int8, Granularity::per_channel, AmaxScope::shared},
    QuantSpec{Format::int4, Granularity::per_tensor, AmaxScope::shared},
    QuantSpec{Format::fp8_e4m3, Granularity::per_tensor, AmaxScope::shared},
    QuantSpec{Format::nvfp4, Granularity::per_tensor, AmaxScope::shared},
    QuantSpec{Format::nf4, Granularity::per_tensor, AmaxScope::shared},
    QuantSpec{Format::mxfp4, Granularity::per_tensor, AmaxScope::shared},
};

/// Every spelling `parse_quant_spec` accepts, as listed in its error message.
inline constexpr std::string_view kQuantSpecSpellings =
    "int8, int8_channel, int4, fp8, fp8_e4m3, nvfp4, nf4, mxfp4 (each optionally followed by _per_expert)";

/// Throws ErrorCode::invalid_argument unless the spec is one the quantizers implement:
/// per-channel granularity is INT8's only.
inline void validate(const QuantSpec& spec) {
  MOELORA_REQUIRE(spec.granularity == Granularity::per_tensor || spec.format == Format::int8,
                  ErrorCode::invalid_argument, "per-channel granularity is for int8 only, not ",
                  format_name(spec.format));
}

/// Name of a spec, the inverse of `parse_quant_spec`: the format name, "int8_channel" for
/// per-channel INT8, plus "_per_expert" when the amax scope is per expert.
inline std::string quant_spec_name(const QuantSpec& spec) {
  std::string name(format_name(spec.format));
  if (spec.granularity == Granularity::per_channel) name += "_channel";
  if (spec.amax_scope == AmaxScope::per_expert) name += "_per_expert";
  return name;
}

/// Parses a quantizer spelling: "int8", "int8_channel", "int4", "fp8" or "fp8_e4m3", "nvfp4",
/// "nf4", "mxfp4", each optionally followed by "_per_expert" (amax per expert, axis 0). Anything
/// else throws ErrorCode::invalid_argument listing the accepted spellings.
inline QuantSpec parse_quant_spec(std::string_view spelling) {
  QuantSpec spec;
  std::string_view base = spelling;
  constexpr std::string_view kPerExpert = "_per_expert";
  if (base.size() > kPerExpert.size() && base.ends_with(kPerExpert)) {
    spec.amax_scope = AmaxScope::per_expert;
    base.remove_suffix(kPerExpert.size());
  }
  if (base == "int8") spec.format = Format::int8;
  else if (base == "int8_channel") spec.format = Format::int8, spec.granularity = Granularity::per_channel;
  else if (base == "int4") spec.format = Format::int4;
  else if (base == "fp8" || base == "fp8_e4m3") spec.format = Format::fp8_e4m3;
  else if (base == "nvfp4") spec.format = Format::nvfp4;
  else if (base == "nf4") spec.format = Format::nf4;
  else if (base == "mxfp4") spec.format = Format::mxfp4;
  else
    detail::raise(ErrorCode::invalid_argument, "quantizer \"", spelling, "\" is not a known format; accepted: ",
                  kQuantSpecSpellings);
  return spec;
}

}  // namespace moelora::quant
