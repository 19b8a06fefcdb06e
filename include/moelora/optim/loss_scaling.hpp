/// \file
/// \brief Dynamic loss scaling (PyTorch GradScaler semantics) for fp16 training: the settings and
/// the scale update after a step, shared by the host and the device.
#pragma once

#include <cmath>
#include <cstdint>

#include "moelora/core/dtype.hpp"
#include "moelora/core/error.hpp"

namespace moelora {

/// Whether `x` is neither infinite nor NaN (host and device; no library call).
MOELORA_HOST_DEVICE inline bool is_finite(double x) { return ::fabs(x) <= 1.7976931348623157e308; }

/// Dynamic loss scaling: the loss (and so every gradient) is multiplied by `scale`; the optimizer
/// divides the gradients by it before clipping and the update. A step whose gradients hold a NaN
/// or Inf is skipped and the scale is multiplied by `backoff_factor`; after `growth_interval`
/// finite steps in a row it is multiplied by `growth_factor` (when the result is finite).
struct LossScaling {
  bool enabled = false;
  float init_scale = 65536.0f;  ///< 2^16
  float growth_factor = 2.0f;
  float backoff_factor = 0.5f;
  std::int64_t growth_interval = 2000;

  friend bool operator==(const LossScaling&, const LossScaling&) = default;
};

/// The scale update after one step (`found_inf`: the step's gradients were not all finite), as
/// torch's `_amp_update_scale_`: back off and reset the tracker, or count a finite step and grow
/// the scale every `growth_interval` of them.
MOELORA_HOST_DEVICE inline void update_loss_scale(const LossScaling& c, bool found_inf, float& scale,
                                                  std::int64_t& growth_tracker) {
  if (found_inf) {
    scale = scale * c.backoff_factor;
    growth_tracker = 0;
    return;
  }
  const std::int64_t successful = growth_tracker + 1;
  if (successful == c.growth_interval) {
    const float grown = scale * c.growth_factor;
    if (is_finite(grown)) scale = grown;
    growth_tracker = 0;
  } else {
    growth_tracker = successful;
  }
}

/// Throws ErrorCode::invalid_argument naming the field unless init_scale is finite and > 0,
/// growth_factor > 1, backoff_factor in (0, 1) and growth_interval ≥ 1.
inline void validate_loss_scaling(const LossScaling& c) {
  MOELORA_REQUIRE(std::isfinite(c.init_scale) && c.init_scale > 0.0f, ErrorCode::invalid_argument,
                  "loss scaling init_scale must be finite and > 0, got ", c.init_scale);
  MOELORA_REQUIRE(std::isfinite(c.growth_factor) && c.growth_factor > 1.0f, ErrorCode::invalid_argument,
                  "loss scaling growth_factor must be > 1, got ", c.growth_factor);
  MOELORA_REQUIRE(c.backoff_factor > 0.0f && c.backoff_factor < 1.0f, ErrorCode::invalid_argument,
                  "loss scaling backoff_factor must be in (0, 1), got ", c.backoff_factor);
  MOELORA_REQUIRE(c.growth_interval >= 1, ErrorCode::invalid_argument,
                  "loss scaling growth_interval must be >= 1, got ", c.growth_interval);
}

}  // namespace moelora
