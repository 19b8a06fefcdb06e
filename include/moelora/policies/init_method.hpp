/// \file
/// \brief Init-method policies: the default initialiser of new adapters, or one pinned for all.
#pragma once

#include <concepts>

#include "moelora/core/config.hpp"

namespace moelora::policy {

struct InitMethodCategory {};

/// Adapters whose config names no init method use `M`; a config may name another.
template <InitMethod M = InitMethod::kaiming_zeros>
struct DefaultInit {
  using category = InitMethodCategory;
  static constexpr InitMethod method = M;
  static constexpr bool pinned = false;
};

/// Every adapter is initialised with `M`; a config naming another method is rejected.
template <InitMethod M>
struct PinnedInit {
  using category = InitMethodCategory;
  static constexpr InitMethod method = M;
  static constexpr bool pinned = true;
};

template <class P>
concept InitMethodPolicy = std::same_as<typename P::category, InitMethodCategory> && requires {
  { P::method } -> std::convertible_to<InitMethod>;
  { P::pinned } -> std::convertible_to<bool>;
};

}  // namespace moelora::policy
