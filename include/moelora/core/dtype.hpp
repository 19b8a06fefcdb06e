/// \file
/// \brief Element types of activations and factors, their names, sizes and host storage types.
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>
#include <type_traits>

#include "moelora/core/error.hpp"
#include "moelora/core/half_types.hpp"

namespace moelora {

/// Floating-point element type of a tensor. Factors, activations and base weights use these.
enum class DType : std::uint8_t { bf16, fp16, fp32 };

inline constexpr std::array<DType, 3> kAllDTypes = {DType::bf16, DType::fp16, DType::fp32};

/// Short, canonical name: "bf16", "fp16" or "fp32".
constexpr std::string_view dtype_name(DType dtype) {
  switch (dtype) {
    case DType::bf16: return "bf16";
    case DType::fp16: return "fp16";
    case DType::fp32: return "fp32";
  }
  return "?";
}

/// Bytes per element.
constexpr std::size_t dtype_size(DType dtype) { return dtype == DType::fp32 ? 4 : 2; }

/// Every spelling `lora_dtype` accepts, as listed in error messages.
inline constexpr std::string_view kLoraDTypeSpellings =
    "bf16, bfloat16, fp16, float16, half, fp32, float32, float";

/// Parses a `lora_dtype` spelling (short or long form, exact case) into its DType; anything else
/// throws ErrorCode::invalid_argument with the accepted spellings in the message.
inline DType parse_dtype(std::string_view spelling) {
  if (spelling == "bf16" || spelling == "bfloat16") return DType::bf16;
  if (spelling == "fp16" || spelling == "float16" || spelling == "half") return DType::fp16;
  if (spelling == "fp32" || spelling == "float32" || spelling == "float") return DType::fp32;
  detail::raise(ErrorCode::invalid_argument, "lora_dtype \"", spelling,
                "\" is not a known dtype; accepted spellings: ", kLoraDTypeSpellings);
}

/// The host storage type of each DType (`bfloat16_t`, `half_t`, `float`).
template <DType D> struct HostType;
template <> struct HostType<DType::bf16> { using type = bfloat16_t; };
template <> struct HostType<DType::fp16> { using type = half_t; };
template <> struct HostType<DType::fp32> { using type = float; };
template <DType D> using host_type_t = typename HostType<D>::type;

/// The DType of a host storage type.
template <class T> inline constexpr DType dtype_of = [] {
  static_assert(std::is_same_v<T, bfloat16_t> || std::is_same_v<T, half_t> || std::is_same_v<T, float>,
                "moelora: dtype_of<T> needs T = moelora::bfloat16_t, moelora::half_t or float");
  if constexpr (std::is_same_v<T, bfloat16_t>) return DType::bf16;
  else if constexpr (std::is_same_v<T, half_t>) return DType::fp16;
  else return DType::fp32;
}();

/// A value-level tag carrying a DType, for dispatch lambdas: `[](auto tag) { decltype(tag)::value }`.
template <DType D> using DTypeTag = std::integral_constant<DType, D>;

/// Calls `f(DTypeTag<D>{})` with the compile-time DType equal to `dtype`.
template <class F>
decltype(auto) dispatch_dtype(DType dtype, F&& f) {
  switch (dtype) {
    case DType::bf16: return f(DTypeTag<DType::bf16>{});
    case DType::fp16: return f(DTypeTag<DType::fp16>{});
    case DType::fp32: break;
  }
  return f(DTypeTag<DType::fp32>{});
}

/// Rounds an fp32 value to `D` and back: the value a tensor of dtype D stores.
template <DType D>
MOELORA_HOST_DEVICE inline float round_to(float value) {
  if constexpr (D == DType::fp32) return value;
  else return static_cast<float>(host_type_t<D>(value));
}

}  // namespace moelora
