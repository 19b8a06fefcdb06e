/// \file
/// \brief The mean-squared-error loss of an output against a target and its gradient, computed
/// where the tensors live (host: host/loss.hpp; CUDA: cuda/loss.hpp), so that a training step
/// needs no transfer: the loss is accumulated in backend memory and read only when wanted.
///
/// For `count` elements of y and target (any shape, flattened; bf16, fp16 or fp32):
///   `loss_sum += weight · Σ (y − target)²` (fp64),
///   `dy = round(k · (y − target))` with `k = 2 · weight · scale` (fp32, rounded once to the
///   dtype), where `scale` is the loss scale in backend memory (`AdamW::loss_scale_data`), or 1.
/// With `weight = 1 / count` the loss is the mean squared error. Host and device compute dy
/// bit for bit alike; the loss sum's fp64 additions may differ in order.
#pragma once

#include <cstdint>

#include "moelora/core/dtype.hpp"
#include "moelora/core/error.hpp"

namespace moelora::loss {

/// Arguments of `mse_loss(args, stream)`; every pointer in the backend's memory.
struct MseLossArgs {
  const void* y = nullptr;            ///< `[count]` in `dtype`
  const void* target = nullptr;       ///< `[count]` in `dtype`
  void* dy = nullptr;                 ///< written: `[count]` in `dtype`
  DType dtype = DType::bf16;
  std::int64_t count = 0;
  float weight = 1.0f;                ///< loss = weight · Σ (y − target)²
  const float* loss_scale = nullptr;  ///< one fp32 multiplying dy (dynamic loss scaling); null: 1
  double* loss_sum = nullptr;         ///< one fp64 the loss is added to; null: the loss is not summed
};

/// The gradient factor k = 2 · weight · scale (fp32, in this order).
MOELORA_HOST_DEVICE inline float mse_grad_factor(float weight, float scale) { return 2.0f * weight * scale; }

/// One element of dy before rounding: k · (y − target).
MOELORA_HOST_DEVICE inline float mse_grad(float y, float target, float k) { return k * (y - target); }

/// Throws ErrorCode::invalid_argument unless count ≥ 0, weight is finite, and y, target and dy
/// are non-null when count > 0.
inline void validate(const MseLossArgs& a) {
  MOELORA_REQUIRE(a.count >= 0, ErrorCode::invalid_argument, "mse_loss: count must be >= 0, got ", a.count);
  MOELORA_REQUIRE(a.weight - a.weight == 0.0f, ErrorCode::invalid_argument, "mse_loss: weight must be finite, got ",
                  a.weight);
  MOELORA_REQUIRE(a.count == 0 || (a.y && a.target && a.dy), ErrorCode::invalid_argument,
                  "mse_loss: y, target and dy need data for ", a.count, " elements");
}

}  // namespace moelora::loss
