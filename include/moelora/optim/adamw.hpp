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
///
/// The step count lives in the backend's memory and the step's constants are computed there, so a
/// `step` allocates nothing and decides nothing on the host once every stepped adapter has state:
/// on the GPU it can be captured in a CUDA graph (after one eager step) and each replay is the next
/// step. The learning rate and other settings are the ones at capture.
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
      auto* steps = state.steps.template as<std::int64_t>();
      state.a.update(view.a, static_cast<const float*>(view.grad_a.data), config_, steps, false, stream);
      state.b.update(view.b, static_cast<const float*>(view.grad_b.data), config_, steps, true, stream);
    }
    states_ = std::move(kept);
  }

  /// Steps taken by adapter `name` (0 if it has no state), graph replays included: read from the
  /// backend's memory, so on the GPU this synchronises `stream`.
  [[nodiscard]] std::int64_t steps(const std::string& name, stream_type stream) const {
    const auto it = states_.find(name);
    if (it == states_.end()) return 0;
    std::int64_t steps = 0;
    backend_type::copy_to_host(&steps, it->second.steps.data(), sizeof steps, stream);
    return steps;
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
    void update(const TensorRef& param, const float* grad, const AdamWConfig& config, std::int64_t* steps,
                bool advance, stream_type stream) {
      backend_type::adamw_step({param.data, param.dtype, master.template as<float>(), grad, m.template as<float>(),
                                v.template as<float>(), param.numel(), config, steps, advance},
                               stream);
    }
  };

  struct State {
    Moments a, b;
    Buffer<backend_type> steps;    // std::int64_t: steps taken, in the backend's memory
    std::uint64_t adapter_id = 0;  // the adapter instance the state belongs to

    State() = default;
    State(const AdapterView& view, stream_type stream)
        : a(view.a, stream), b(view.b, stream), steps(sizeof(std::int64_t)), adapter_id(view.id) {
      backend_type::fill_zero(steps.data(), steps.bytes(), stream);
    }
    [[nodiscard]] bool stale(const AdapterView& view) const { return adapter_id != view.id; }
  };

  AdamWConfig config_;
  std::map<std::string, State> states_;
};

}  // namespace moelora
