/// \file
/// \brief Run-time adapter settings (`AdapterConfig`) and their validation.
#pragma once

#include <array>
#include <cmath>
#include <cstdint>
#include <optional>
#include <string>
#include <string_view>

#include "moelora/core/dtype.hpp"
#include "moelora/core/error.hpp"

namespace moelora {

/// How a new adapter's factors are initialised.
enum class InitMethod : std::uint8_t {
  /// A ~ U(-√(6/in), +√(6/in)) per expert (Kaiming-uniform, a = 0, fan_in = in), B = 0: a new adapter
  /// leaves the output unchanged. (The reference initialises the stacked [E, r, in] tensor, whose
  /// fan_in is r·in; per-expert fan_in = in is the correct value.)
  kaiming_zeros,
  /// Rank-r SVD of the quantization residual R_e = W_e − Q(W_e): A_e = V_rᵀ, B_e = U_r S_r / scale,
  /// so Q(W)x + scale·BAx ≈ Wx. Needs a base with a weight quantizer (else zeros and a warning).
  svdquant,
  /// LoftQ: alternates Q_t = Q(W − scale·B A) and (B, A) = SVD_r(W − Q_t) / scale for
  /// `init_iterations` steps (default 5), keeps the best iterate and sets the base's quantized
  /// weights to its Q_t. Needs a base that owns its quantized copy.
  loftq,
  /// SVD-first: (B, A) = SVD_r(W) / scale, the base quantizes the remainder Q(W − scale·BA), then
  /// `init_iterations` refits (default 1) of (B, A) = SVD_r(W − Q) / scale; keeps the best.
  svd_first,
  /// PiSSA: the principal part of W itself, A = S_r^½ V_rᵀ, B = U_r S_r^½ / scale; the base keeps
  /// the remainder W − scale·BA (quantized when the base has a quantizer).
  pissa,
};

inline constexpr std::array<InitMethod, 5> kAllInitMethods = {InitMethod::kaiming_zeros, InitMethod::svdquant,
                                                              InitMethod::loftq, InitMethod::svd_first,
                                                              InitMethod::pissa};

constexpr std::string_view init_method_name(InitMethod method) {
  switch (method) {
    case InitMethod::kaiming_zeros: return "kaiming_zeros";
    case InitMethod::svdquant: return "svdquant";
    case InitMethod::loftq: return "loftq";
    case InitMethod::svd_first: return "svd_first";
    case InitMethod::pissa: return "pissa";
  }
  return "?";
}

/// Whether `method` initialises from an SVD of the base's weights (every method but kaiming_zeros).
constexpr bool is_svd_init(InitMethod method) { return method != InitMethod::kaiming_zeros; }

/// Parses an init method name; unknown names throw ErrorCode::invalid_argument listing the known ones.
inline InitMethod parse_init_method(std::string_view name) {
  for (const InitMethod method : kAllInitMethods)
    if (name == init_method_name(method)) return method;
  detail::raise(ErrorCode::invalid_argument, "init method \"", name,
                "\" is not known; accepted: kaiming_zeros, svdquant, loftq, svd_first, pissa");
}

/// The default `init_iterations` of a method: LoftQ steps 5, SVD-first refits 1, else 0.
constexpr std::int64_t default_init_iterations(InitMethod method) {
  return method == InitMethod::loftq ? 5 : (method == InitMethod::svd_first ? 1 : 0);
}

/// Settings of one named adapter. Defaults follow the reference: rank 64, scale 1, enabled,
/// `kaiming_zeros`, trainable.
struct AdapterConfig {
  std::int64_t rank = 64;                 ///< r >= 1
  double scale = 1.0;                     ///< plain multiplier of the delta; finite and > 0
  bool enabled = true;                    ///< a disabled adapter adds nothing and gets no gradient
  std::optional<std::string> lora_dtype;  ///< factor dtype spelling; unset = the base's dtype
  std::optional<InitMethod> init;         ///< unset = the layer's default (policy::DefaultInit)
  bool trainable = true;                  ///< false freezes the factors: no dA, dB are computed
  std::optional<std::uint64_t> seed;      ///< seeds the initialiser (same factors on every backend);
                                          ///< unset: derived from the adapter's name
  std::optional<std::int64_t> init_iterations;  ///< loftq steps (>= 1) or svd_first refits (>= 0);
                                                ///< unset: default_init_iterations(init)
};

/// An AdapterConfig after validation: the dtype resolved and its spelling normalised.
struct ResolvedAdapterConfig {
  std::int64_t rank;
  float scale;
  bool enabled;
  DType dtype;
  InitMethod init;
  bool trainable;
  std::uint64_t seed;
  std::int64_t init_iterations;
};

/// Checks a scale: finite and > 0, else ErrorCode::invalid_argument naming the value.
inline float validate_scale(double scale) {
  MOELORA_REQUIRE(std::isfinite(scale) && scale > 0.0 && std::isfinite(static_cast<float>(scale)),
                  ErrorCode::invalid_argument, "scale must be finite and > 0, got ", scale);
  return static_cast<float>(scale);
}

/// What the layer's compile-time policies impose on a config.
struct ConfigConstraints {
  DType base_dtype;                   ///< the dtype an unset `lora_dtype` inherits
  std::optional<DType> pinned_dtype;  ///< a factor dtype fixed at compile time
  InitMethod default_init;            ///< the init an unset `init` takes
  bool init_pinned;                   ///< whether `default_init` is the only one allowed
};

/// Validates `config` under `constraints`; throws ErrorCode::invalid_argument naming the bad field.
inline ResolvedAdapterConfig resolve(const AdapterConfig& config, const ConfigConstraints& constraints) {
  MOELORA_REQUIRE(config.rank >= 1, ErrorCode::invalid_argument, "rank must be >= 1, got ", config.rank);
  const float scale = validate_scale(config.scale);
  DType dtype = constraints.pinned_dtype.value_or(constraints.base_dtype);
  if (config.lora_dtype) {
    const DType asked = parse_dtype(*config.lora_dtype);
    MOELORA_REQUIRE(!constraints.pinned_dtype || asked == dtype, ErrorCode::invalid_argument, "lora_dtype \"",
                    *config.lora_dtype, "\" conflicts with the factor dtype ", dtype_name(dtype),
                    " pinned by the layer's PinnedFactorDType policy");
    dtype = asked;
  }
  const InitMethod init = config.init.value_or(constraints.default_init);
  MOELORA_REQUIRE(!constraints.init_pinned || init == constraints.default_init, ErrorCode::invalid_argument,
                  "init method ", init_method_name(init), " conflicts with ", init_method_name(constraints.default_init),
                  " pinned by the layer's PinnedInit policy");
  const std::int64_t iterations = config.init_iterations.value_or(default_init_iterations(init));
  MOELORA_REQUIRE(iterations >= (init == InitMethod::loftq ? 1 : 0), ErrorCode::invalid_argument,
                  "init_iterations must be >= ", init == InitMethod::loftq ? 1 : 0, " for ", init_method_name(init),
                  ", got ", iterations);
  return {config.rank, scale, config.enabled, dtype, init, config.trainable, config.seed.value_or(0), iterations};
}

/// The canonical short spelling of a config's `lora_dtype` ("bfloat16" → "bf16"); unset stays unset.
inline std::optional<std::string> normalized_lora_dtype(const AdapterConfig& config) {
  if (!config.lora_dtype) return std::nullopt;
  return std::string(dtype_name(parse_dtype(*config.lora_dtype)));
}

}  // namespace moelora
