/// \file
/// \brief AdamW over the trainable factors of a GroupedLoRA, with fp32 master weights for 16-bit
/// factors; on whichever backend the layer uses.
#pragma once

#include <cstdint>
#include <map>
#include <string>

#include "moelora/core/buffer.hpp"
#include "moelora/optim/adamw_math.hpp"

namespace moelora {

/// AdamW for the adapters of one layer. State (moments, master weights, step count) is kept per
/// adapter name, created at an adapter's first step and dropped when the adapter disappears.
/// Frozen or disabled adapters are not stepped.
template <class Layer>
class AdamW {
 public:
  using backend_type = typename Layer::backend_type;
  using stream_type = typename backend_type::stream_type;

  explicit AdamW(AdamWConfig config = {}) : config_(config) {}

  [[nodiscard]] const AdamWConfig& config() const { return config_; }
  /// Changes the learning rate (schedules); the other settings stay.
  void set_lr(float lr) { config_.lr = lr; }

  /// One step for every trainable, enabled adapter of `layer`, from its accumulated gradients.
  void step(Layer& layer, stream_type stream) {
    std::map<std::string, State> kept;
    for (const std::string& name : layer.adapter_names()) {
      const AdapterView view = layer.adapter(name);
      auto it = states_.find(name);
      if (it != states_.end()) kept.emplace(name, std::move(it->second));
      if (!view.config.trainable || !view.config.enabled) continue;
      auto [slot, fresh] = kept.try_emplace(name);
      State& state = slot->second;
      if (fresh || state.stale(view)) state = State(view, stream);
      ++state.steps;
      const AdamWStep constants = AdamWStep::at(config_, state.steps);
      state.a.update(view.a, static_cast<const float*>(view.grad_a.data), config_, constants, state.steps == 1, stream);
      state.b.update(view.b, static_cast<const float*>(view.grad_b.data), config_, constants, state.steps == 1, stream);
    }
    states_ = std::move(kept);
  }

  /// Steps taken by adapter `name` (0 if it has no state).
  [[nodiscard]] std::int64_t steps(const std::string& name) const {
    const auto it = states_.find(name);
    return it == states_.end() ? 0 : it->second.steps;
  }

 private:
  struct Moments {
    Buffer<backend_type> m, v, master;  // fp32; master only for 16-bit parameters

    Moments() = default;
    Moments(const TensorRef& param, stream_type stream) {
      const auto bytes = static_cast<std::size_t>(param.numel()) * sizeof(float);
      m = Buffer<backend_type>(bytes);
      v = Buffer<backend_type>(bytes);
      backend_type::fill_zero(m.data(), bytes, stream);
      backend_type::fill_zero(v.data(), bytes, stream);
      if (param.dtype != DType::fp32) master = Buffer<backend_type>(bytes);
    }
    void update(const TensorRef& param, const float* grad, const AdamWConfig& config, const AdamWStep& constants,
                bool first_step, stream_type stream) {
      backend_type::adamw_step({param.data, param.dtype, master.template as<float>(), grad, m.template as<float>(),
                                v.template as<float>(), param.numel(), config, constants, first_step},
                               stream);
    }
  };

  struct State {
    Moments a, b;
    std::int64_t steps = 0;
    std::uint64_t adapter_id = 0;  // the adapter instance the state belongs to

    State() = default;
    State(const AdapterView& view, stream_type stream) : a(view.a, stream), b(view.b, stream), adapter_id(view.id) {}
    [[nodiscard]] bool stale(const AdapterView& view) const { return adapter_id != view.id; }
  };

  AdamWConfig config_;
  std::map<std::string, State> states_;
};

}  // namespace moelora
