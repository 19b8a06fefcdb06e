/// \file
/// \brief The optimizer step as a backend receives it: a table of parameter tensors, the control
/// block in backend memory, and the decision after the gradient statistics (host and device).
///
/// A step is two passes over all stepped tensors at once, each one kernel on the GPU:
/// 1. **statistics** (when clipping, the finite check or loss scaling is on): every gradient is
///    read once for Σg² (fp64, kept apart for TP-sharded and replicated tensors) and whether any
///    element is NaN or Inf. The last block to finish sums the per-block partials in a fixed order
///    (deterministic) and decides the step (`finish_step`): the norm, the clip coefficient, skip or
///    apply, the loss-scale update. With a communicator the decision waits for the sums to be
///    reduced across ranks (`StepControl::reduced`) and runs in a separate one-block pass.
/// 2. **update**: every gradient is read again, scaled by `StepControl::grad_scale` (1/loss scale ·
///    clip coefficient) and applied by AdamW, unless the step was skipped. Each tensor's bias
///    corrections come from its own step count and the learning rate from the schedule at the
///    optimizer's step, both read from backend memory; the last block to finish advances them.
/// Nothing is read back to the host, so a step can be captured in a CUDA graph.
#pragma once

#include <cstdint>
#include <limits>

#include "moelora/core/dtype.hpp"
#include "moelora/optim/adamw_math.hpp"

namespace moelora {

/// Elements of a tensor one block handles at a time; every tensor starts a new chunk.
inline constexpr std::int64_t kOptimChunk = 4096;
/// At most this many blocks (grid-stride over chunks): the statistics' partials have this many
/// entries, and a fixed grid keeps their sum deterministic on any GPU.
inline constexpr std::int64_t kOptimBlocks = 1024;

/// Blocks of a pass over `chunks` chunks.
constexpr std::int64_t optim_blocks(std::int64_t chunks) { return chunks < kOptimBlocks ? chunks : kOptimBlocks; }

/// The optimizer's state and the last step's results, in backend memory (one per optimizer).
struct StepControl {
  // Persistent state (saved with the optimizer).
  std::int64_t step = 0;            ///< updates applied: the schedule's step
  std::int64_t skipped = 0;         ///< steps skipped because a gradient was not finite
  std::int64_t growth_tracker = 0;  ///< finite steps since the loss scale last changed
  float loss_scale = 1.0f;          ///< the dynamic loss scale (1 without loss scaling)
  // Results of the last step.
  float norm = std::numeric_limits<float>::quiet_NaN();  ///< global L2 norm of the unscaled gradients (NaN: not finite, or not computed)
  float grad_scale = 1.0f;          ///< what the update multiplies every gradient by
  std::int32_t apply = 1;           ///< 1: the update runs; 0: the step is skipped
  // Scratch of the passes (every pass leaves it as it found it).
  float reduced[2] = {0.0f, 0.0f};  ///< Σg² of sharded and replicated tensors (NaN if not finite), for a communicator
  std::uint32_t nonfinite = 0;
  std::uint32_t stats_blocks_done = 0;
  std::uint32_t update_blocks_done = 0;
};

/// One stepped parameter tensor (a factor of an adapter); pointers in backend memory.
struct OptimTensor {
  void* param = nullptr;        ///< the factor, `count` elements of `dtype`
  float* master = nullptr;      ///< fp32 master weights of a 16-bit factor; null for fp32 factors
  const float* grad = nullptr;  ///< fp32 gradient
  float* m = nullptr;           ///< first moment (fp32)
  float* v = nullptr;           ///< second moment (fp32)
  std::int64_t* step = nullptr; ///< this tensor's step count (bias corrections)
  std::int64_t count = 0;
  std::int64_t first_chunk = 0; ///< index of its first chunk among all tensors' chunks
  DType dtype = DType::fp32;
  bool sharded = false;         ///< TP-sharded: its Σg² is summed over the TP group
  bool vectorized = false;      ///< every pointer is aligned for 4-element vector accesses

  friend bool operator==(const OptimTensor&, const OptimTensor&) = default;
};

/// Chunks of a tensor of `count` elements.
constexpr std::int64_t optim_chunks(std::int64_t count) { return (count + kOptimChunk - 1) / kOptimChunk; }

/// One optimizer step over a table of tensors, as the backends' `optim_*` passes receive it.
struct OptimBatch {
  const OptimTensor* tensors = nullptr;  ///< backend memory, `tensor_count` entries in chunk order
  std::int32_t tensor_count = 0;
  std::int64_t chunk_count = 0;
  StepControl* control = nullptr;        ///< backend memory
  double* partials = nullptr;            ///< backend memory, 2 · kOptimBlocks doubles (statistics scratch)
  AdamWConfig config{};
  bool use_stats = false;      ///< the statistics pass ran: the update obeys `apply` and `grad_scale`
  bool finish_in_stats = true; ///< the statistics pass decides the step itself (no communicator)
};

/// The decision after the statistics: `sum_squares` = Σg² over every stepped gradient (after any
/// reduction across ranks), `nonfinite` = some gradient was NaN or Inf. Sets the norm (of the
/// unscaled gradients, NaN when not finite), `grad_scale` (1/loss scale · min(1, max_norm /
/// (norm + 1e-6)), PyTorch's clip coefficient), skips (counting it) or applies the step, and
/// updates the loss scale.
MOELORA_HOST_DEVICE inline void finish_step(StepControl& c, const AdamWConfig& config, double sum_squares,
                                            bool nonfinite) {
  const bool bad = nonfinite || !is_finite(sum_squares);
  // 1 / scale rounded to fp32, as GradScaler unscales.
  const double inv_scale =
      config.loss_scaling.enabled ? static_cast<double>(static_cast<float>(1.0 / static_cast<double>(c.loss_scale))) : 1.0;
  const double norm = ::sqrt(sum_squares) * inv_scale;
  c.norm = bad ? std::numeric_limits<float>::quiet_NaN() : static_cast<float>(norm);
  double coefficient = 1.0;
  if (config.max_grad_norm > 0.0f && !bad) {
    const double limit = static_cast<double>(config.max_grad_norm) / (norm + 1e-6);
    coefficient = limit < 1.0 ? limit : 1.0;
  }
  if (bad && config.skip_nonfinite) {
    c.apply = 0;
    ++c.skipped;
  } else {
    c.apply = 1;
    c.grad_scale = static_cast<float>(inv_scale * coefficient);
  }
  if (config.loss_scaling.enabled) update_loss_scale(config.loss_scaling, bad, c.loss_scale, c.growth_tracker);
}

/// The constants of tensor `t`'s next step: its own step count + 1, the schedule at the
/// optimizer's step + 1.
MOELORA_HOST_DEVICE inline AdamWStep next_step_constants(const AdamWConfig& config, const StepControl& c,
                                                         std::int64_t tensor_steps) {
  return adamw_step_at(config, scheduled_lr(config.schedule, config.lr, c.step + 1), tensor_steps + 1);
}

}  // namespace moelora
