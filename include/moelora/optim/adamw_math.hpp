/// \file
/// \brief AdamW's settings and the update of one element, shared by the host loop and the CUDA kernel.
#pragma once

#include <cmath>
#include <cstdint>

#include "moelora/core/dtype.hpp"
#include "moelora/core/error.hpp"
#include "moelora/optim/loss_scaling.hpp"
#include "moelora/optim/schedule.hpp"

namespace moelora {

/// The settings of AdamW and of the step around it (PyTorch's AdamW defaults but for weight decay).
struct AdamWConfig {
  float lr = 1e-3f;           ///< base learning rate (the schedule scales it)
  float beta1 = 0.9f;
  float beta2 = 0.999f;
  float eps = 1e-8f;
  float weight_decay = 0.0f;  ///< decoupled: w ← w · (1 − lr_t · weight_decay)
  float max_grad_norm = 0.0f; ///< clip the global L2 norm of all stepped gradients to this; 0: no clipping
  bool skip_nonfinite = true; ///< a NaN or Inf in any gradient skips the whole step
  LrSchedule schedule{};      ///< lr_t as a function of the step (constant by default)
  LossScaling loss_scaling{}; ///< dynamic loss scaling (off by default)

  friend bool operator==(const AdamWConfig&, const AdamWConfig&) = default;

  /// Whether a step first reads every gradient once for the global norm and the finite check.
  [[nodiscard]] bool needs_grad_stats() const { return max_grad_norm > 0.0f || skip_nonfinite || loss_scaling.enabled; }
};

/// Throws ErrorCode::invalid_argument naming the first bad field: lr finite and > 0, betas in
/// [0, 1), eps ≥ 0, weight_decay ≥ 0, max_grad_norm finite and ≥ 0, a valid schedule and loss
/// scaling, and skip_nonfinite on when loss scaling is (a scaled step that overflowed must be skipped).
inline const AdamWConfig& validate_adamw_config(const AdamWConfig& c) {
  MOELORA_REQUIRE(std::isfinite(c.lr) && c.lr > 0.0f, ErrorCode::invalid_argument, "AdamW lr must be finite and > 0, got ",
                  c.lr);
  MOELORA_REQUIRE(c.beta1 >= 0.0f && c.beta1 < 1.0f && c.beta2 >= 0.0f && c.beta2 < 1.0f, ErrorCode::invalid_argument,
                  "AdamW betas must be in [0, 1), got ", c.beta1, " and ", c.beta2);
  MOELORA_REQUIRE(c.eps >= 0.0f && std::isfinite(c.eps), ErrorCode::invalid_argument, "AdamW eps must be >= 0, got ", c.eps);
  MOELORA_REQUIRE(c.weight_decay >= 0.0f && std::isfinite(c.weight_decay), ErrorCode::invalid_argument,
                  "AdamW weight_decay must be >= 0, got ", c.weight_decay);
  MOELORA_REQUIRE(c.max_grad_norm >= 0.0f && std::isfinite(c.max_grad_norm), ErrorCode::invalid_argument,
                  "max_grad_norm must be finite and >= 0 (0: no clipping), got ", c.max_grad_norm);
  validate_schedule(c.schedule);
  if (c.loss_scaling.enabled) validate_loss_scaling(c.loss_scaling);
  MOELORA_REQUIRE(!c.loss_scaling.enabled || c.skip_nonfinite, ErrorCode::invalid_argument,
                  "loss scaling needs skip_nonfinite: a step whose scaled gradients overflowed must be skipped");
  return c;
}

/// Per-tensor constants of one AdamW step.
struct AdamWStep {
  float lr;                ///< the scheduled learning rate lr_t
  float step_size;         ///< lr_t / (1 − beta1^t)
  float bias_correction2;  ///< √(1 − beta2^t)
};

/// The constants of a tensor's t-th step (1-based) at learning rate `lr`, computed in fp64 as
/// PyTorch does and rounded once, identically on the host and the device.
MOELORA_HOST_DEVICE inline AdamWStep adamw_step_at(const AdamWConfig& c, float lr, std::int64_t t) {
  const double bc1 = 1.0 - ::pow(static_cast<double>(c.beta1), static_cast<double>(t));
  const double bc2 = 1.0 - ::pow(static_cast<double>(c.beta2), static_cast<double>(t));
  return {lr, static_cast<float>(static_cast<double>(lr) / bc1), static_cast<float>(::sqrt(bc2))};
}

/// One AdamW step of one weight `w` with gradient `g` and moments `m`, `v` (updated in place);
/// returns the new weight. PyTorch's formula: decay, moments, then `w -= step_size · m / (√v / bc2 + eps)`.
MOELORA_HOST_DEVICE inline float adamw_update(float w, float g, float& m, float& v, const AdamWConfig& c,
                                              const AdamWStep& s) {
  w = w * (1.0f - s.lr * c.weight_decay);
  m = c.beta1 * m + (1.0f - c.beta1) * g;
  v = c.beta2 * v + (1.0f - c.beta2) * g * g;
  return w - s.step_size * m / (sqrtf(v) / s.bias_correction2 + c.eps);
}

}  // namespace moelora
