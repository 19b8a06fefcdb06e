/// \file
/// \brief Factor-dtype policies: pin the LoRA factor dtype at compile time, or take it at run time.
#pragma once

#include <concepts>
#include <optional>

#include "moelora/core/dtype.hpp"

namespace moelora::policy {

struct FactorDTypeCategory {};

/// The factor dtype comes from `AdapterConfig::lora_dtype`, or is the base's dtype when unset.
struct RuntimeFactorDType {
  using category = FactorDTypeCategory;
  static constexpr std::optional<DType> pinned = std::nullopt;
};

/// Every adapter's factors are of dtype `D`; a config naming another dtype is rejected.
template <DType D>
struct PinnedFactorDType {
  using category = FactorDTypeCategory;
  static constexpr std::optional<DType> pinned = D;
};

template <class P>
concept FactorDTypePolicy = std::same_as<typename P::category, FactorDTypeCategory> && requires {
  { P::pinned } -> std::convertible_to<std::optional<DType>>;
};

}  // namespace moelora::policy
