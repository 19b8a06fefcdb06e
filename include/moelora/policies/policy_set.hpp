/// \file
/// \brief PolicySet: picks one policy per category from an unordered pack, with defaults.
///
/// `GroupedLoRA<Base, PinnedFactorDType<DType::bf16>, StaticExperts<128>>` names policies in any
/// order; each category may appear at most once, and an unknown type is a readable compile error.
#pragma once

#include <type_traits>

#include "moelora/policies/expert_count.hpp"
#include "moelora/policies/factor_dtype.hpp"
#include "moelora/policies/init_method.hpp"
#include "moelora/policies/parallel_mode.hpp"

namespace moelora::policy {

namespace detail {
template <class P, class = void>
struct CategoryOf {
  using type = void;
};
template <class P>
struct CategoryOf<P, std::void_t<typename P::category>> {
  using type = typename P::category;
};

template <class Category, class Default, class... Ps>
struct Select {
  using type = Default;
};
template <class Category, class Default, class P, class... Rest>
struct Select<Category, Default, P, Rest...> {
  using type = std::conditional_t<std::is_same_v<typename CategoryOf<P>::type, Category>, P,
                                  typename Select<Category, Default, Rest...>::type>;
};

template <class Category, class... Ps>
inline constexpr int kCount = (0 + ... + (std::is_same_v<typename CategoryOf<Ps>::type, Category> ? 1 : 0));

template <class P>
inline constexpr bool kKnown = std::is_same_v<typename CategoryOf<P>::type, FactorDTypeCategory> ||
                               std::is_same_v<typename CategoryOf<P>::type, ParallelModeCategory> ||
                               std::is_same_v<typename CategoryOf<P>::type, ExpertCountCategory> ||
                               std::is_same_v<typename CategoryOf<P>::type, InitMethodCategory>;
}  // namespace detail

template <class... Ps>
struct PolicySet {
  static_assert((detail::kKnown<Ps> && ...),
                "moelora: a GroupedLoRA policy must be a factor-dtype, parallel-mode, expert-count or "
                "init-method policy from moelora::policy");
  static_assert(detail::kCount<FactorDTypeCategory, Ps...> <= 1, "moelora: more than one factor-dtype policy");
  static_assert(detail::kCount<ParallelModeCategory, Ps...> <= 1, "moelora: more than one parallel-mode policy");
  static_assert(detail::kCount<ExpertCountCategory, Ps...> <= 1, "moelora: more than one expert-count policy");
  static_assert(detail::kCount<InitMethodCategory, Ps...> <= 1, "moelora: more than one init-method policy");

  using factor_dtype = typename detail::Select<FactorDTypeCategory, RuntimeFactorDType, Ps...>::type;
  using parallel_mode = typename detail::Select<ParallelModeCategory, NoTensorParallel, Ps...>::type;
  using expert_count = typename detail::Select<ExpertCountCategory, DynamicExperts, Ps...>::type;
  using init_method = typename detail::Select<InitMethodCategory, DefaultInit<>, Ps...>::type;

  static_assert(FactorDTypePolicy<factor_dtype>);
  static_assert(ParallelModePolicy<parallel_mode>);
  static_assert(ExpertCountPolicy<expert_count>);
  static_assert(InitMethodPolicy<init_method>);
};

}  // namespace moelora::policy
