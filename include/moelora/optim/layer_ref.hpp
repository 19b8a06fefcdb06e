/// \file
/// \brief TrainableLayer (what an optimizer needs of a layer) and LayerRef<Backend>, a non-owning
/// reference to any such layer of one backend, so that one step can cover layers of several types.
#pragma once

#include <concepts>
#include <string>
#include <string_view>
#include <vector>

#include "moelora/grouped_lora.hpp"
#include "moelora/policies/parallel_mode.hpp"

namespace moelora {

/// A layer whose adapters an optimizer steps: its backend, the adapter names in order and a view of
/// each (factors, fp32 gradients, settings). `GroupedLoRA` models it.
template <class L>
concept TrainableLayer = requires(L& layer, std::string_view name) {
  typename L::backend_type;
  { layer.adapter_names() } -> std::convertible_to<std::vector<std::string>>;
  { layer.adapter(name) } -> std::same_as<AdapterView>;
};

/// The tensor-parallel axis of factor `f` in layers of type L: from `L::policies::parallel_mode`
/// where L has one (TpAxis::none, replicated, otherwise).
template <class L>
constexpr policy::TpAxis layer_factor_axis(policy::Factor f) {
  if constexpr (requires { typename L::policies::parallel_mode; })
    return policy::factor_tp_axis<typename L::policies::parallel_mode>(f);
  else
    return policy::TpAxis::none;
}

/// A non-owning reference to a TrainableLayer on `Backend`; the layer must outlive it. Converts
/// implicitly from the layer, so `optimizer.step({fc1, fc2}, stream)` takes layers of any types.
template <class Backend>
class LayerRef {
 public:
  template <TrainableLayer L>
    requires std::same_as<typename L::backend_type, Backend>
  LayerRef(L& layer)  // NOLINT(google-explicit-constructor): a reference converts from what it refers to
      : layer_(&layer),
        names_([](void* l) -> std::vector<std::string> { return static_cast<L*>(l)->adapter_names(); }),
        view_([](void* l, std::string_view name) { return static_cast<L*>(l)->adapter(name); }),
        sharded_a_(layer_factor_axis<L>(policy::Factor::a) != policy::TpAxis::none),
        sharded_b_(layer_factor_axis<L>(policy::Factor::b) != policy::TpAxis::none) {}

  [[nodiscard]] std::vector<std::string> adapter_names() const { return names_(layer_); }
  [[nodiscard]] AdapterView adapter(std::string_view name) const { return view_(layer_, name); }
  /// Whether factor `f` of this layer's adapters is TP-sharded (else replicated on every TP rank).
  [[nodiscard]] bool sharded(policy::Factor f) const { return f == policy::Factor::a ? sharded_a_ : sharded_b_; }

 private:
  void* layer_;
  std::vector<std::string> (*names_)(void*);
  AdapterView (*view_)(void*, std::string_view);
  bool sharded_a_, sharded_b_;
};

}  // namespace moelora
