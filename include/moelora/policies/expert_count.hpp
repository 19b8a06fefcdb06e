/// \file
/// \brief Expert-count policies: a number of experts fixed at compile time, or taken from the base.
#pragma once

#include <concepts>
#include <cstdint>
#include <limits>

namespace moelora::policy {

struct ExpertCountCategory {};

inline constexpr std::int64_t kDynamicExperts = std::numeric_limits<std::int64_t>::min();

/// The number of (local) experts is whatever the base holds (default).
struct DynamicExperts {
  using category = ExpertCountCategory;
  static constexpr std::int64_t value = kDynamicExperts;
};

/// The base must hold exactly `N` (local) experts; checked when the layer is built.
template <std::int64_t N>
struct StaticExperts {
  static_assert(N >= 1, "moelora: StaticExperts<N> needs N >= 1");
  using category = ExpertCountCategory;
  static constexpr std::int64_t value = N;
};

template <class P>
concept ExpertCountPolicy = std::same_as<typename P::category, ExpertCountCategory> && requires {
  { P::value } -> std::convertible_to<std::int64_t>;
};

}  // namespace moelora::policy
