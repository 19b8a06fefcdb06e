/// \file
/// \brief The AdamW update of one element, shared by the host loop and the CUDA kernel.
#pragma once

#include <cmath>
#include <cstdint>

#include "moelora/core/dtype.hpp"

namespace moelora {

/// Hyper-parameters of AdamW (PyTorch's defaults but for weight decay).
struct AdamWConfig {
  float lr = 1e-3f;
  float beta1 = 0.9f;
  float beta2 = 0.999f;
  float eps = 1e-8f;
  float weight_decay = 0.0f;  ///< decoupled: w ← w · (1 − lr · weight_decay)
};

/// Per-step constants of AdamW at step `t` (1-based), computed in double and rounded once; the
/// same function on the host and (in the CUDA kernel, from the step count in device memory) on the GPU.
struct AdamWStep {
  float step_size;         ///< lr / (1 − beta1^t)
  float bias_correction2;  ///< √(1 − beta2^t)

  MOELORA_HOST_DEVICE static AdamWStep at(const AdamWConfig& c, std::int64_t t) {
    const double bc1 = 1.0 - ::pow(static_cast<double>(c.beta1), static_cast<double>(t));
    const double bc2 = 1.0 - ::pow(static_cast<double>(c.beta2), static_cast<double>(t));
    return {static_cast<float>(c.lr / bc1), static_cast<float>(::sqrt(bc2))};
  }
};

/// One AdamW step of one weight `w` with gradient `g` and moments `m`, `v` (updated in place);
/// returns the new weight. PyTorch's formula: decay, moments, then `w -= step_size · m / (√v / bc2 + eps)`.
MOELORA_HOST_DEVICE inline float adamw_update(float w, float g, float& m, float& v, const AdamWConfig& c,
                                              const AdamWStep& s) {
  w = w * (1.0f - c.lr * c.weight_decay);
  m = c.beta1 * m + (1.0f - c.beta1) * g;
  v = c.beta2 * v + (1.0f - c.beta2) * g * g;
  return w - s.step_size * m / (sqrtf(v) / s.bias_correction2 + c.eps);
}

/// One AdamW step over a parameter tensor, as a backend receives it (pointers in its memory).
/// `master` (fp32) holds the weights of a 16-bit parameter and is initialised from it on the first
/// step; it is null for fp32 parameters, which are updated in place. The step number lives in the
/// backend's memory, so that a captured CUDA graph replays successive steps: the update is step
/// `*steps + 1` (step 1 initialises `master`), and `advance` adds 1 to `*steps` after it (set on the
/// last tensor of an adapter's step).
struct AdamWArgs {
  void* param = nullptr;
  DType dtype = DType::fp32;
  float* master = nullptr;
  const float* grad = nullptr;
  float* m = nullptr;
  float* v = nullptr;
  std::int64_t count = 0;
  AdamWConfig config;
  std::int64_t* steps = nullptr;  ///< steps taken before this one (backend memory)
  bool advance = false;
};

}  // namespace moelora
