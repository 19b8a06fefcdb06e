/// \file
/// \brief The optimizer passes of the host backend (optim/multi_tensor.hpp): the same decisions and
/// per-element update as the CUDA kernels, in plain loops.
#pragma once

#include <cstdint>
#include <limits>

#include "moelora/core/dtype.hpp"
#include "moelora/optim/multi_tensor.hpp"

namespace moelora::host {

/// Σg² of every gradient (fp64; sharded and replicated tensors apart) and whether one is not
/// finite; then the step's decision, or the sums in `control->reduced` for a communicator.
inline void optim_grad_stats(const OptimBatch& b) {
  double sums[2] = {0.0, 0.0};  // [sharded, replicated]
  bool nonfinite = false;
  for (std::int32_t i = 0; i < b.tensor_count; ++i) {
    const OptimTensor& t = b.tensors[i];
    double sum = 0.0;
    for (std::int64_t k = 0; k < t.count; ++k) {
      const float g = t.grad[k];
      nonfinite |= !is_finite(g);
      sum += static_cast<double>(g) * static_cast<double>(g);
    }
    sums[t.sharded ? 0 : 1] += sum;
  }
  if (b.finish_in_stats) {
    finish_step(*b.control, b.config, sums[0] + sums[1], nonfinite);
    return;
  }
  constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();
  b.control->reduced[0] = nonfinite ? kNaN : static_cast<float>(sums[0]);
  b.control->reduced[1] = nonfinite ? kNaN : static_cast<float>(sums[1]);
}

/// The step's decision from the sums a communicator reduced into `control->reduced`.
inline void optim_finish_stats(const OptimBatch& b) {
  finish_step(*b.control, b.config,
              static_cast<double>(b.control->reduced[0]) + static_cast<double>(b.control->reduced[1]), false);
}

/// The AdamW update of every tensor (unless the step was skipped), then the step counts advance.
inline void optim_update(const OptimBatch& b) {
  StepControl& control = *b.control;
  if (b.use_stats && !control.apply) return;
  const float grad_scale = b.use_stats ? control.grad_scale : 1.0f;
  for (std::int32_t i = 0; i < b.tensor_count; ++i) {
    const OptimTensor& t = b.tensors[i];
    const AdamWStep constants = next_step_constants(b.config, control, *t.step);
    const bool from_param = !t.master || *t.step == 0;  // the master copy is read from the factor at first
    dispatch_dtype(t.dtype, [&](auto tag) {
      using T = host_type_t<tag.value>;
      auto* param = static_cast<T*>(t.param);
      for (std::int64_t k = 0; k < t.count; ++k) {
        const float w = from_param ? static_cast<float>(param[k]) : t.master[k];
        const float updated = adamw_update(w, t.grad[k] * grad_scale, t.m[k], t.v[k], b.config, constants);
        if (t.master) t.master[k] = updated;
        param[k] = T(updated);
      }
    });
  }
  for (std::int32_t i = 0; i < b.tensor_count; ++i) ++*b.tensors[i].step;
  ++control.step;
}

}  // namespace moelora::host
