/// \file
/// \brief Element-wise kernels: Kaiming-uniform factor init and the AdamW update.
#pragma once

#include <cstdint>

#include "moelora/core/lora_args.hpp"
#include "moelora/core/random.hpp"
#include "moelora/kernels/common.cuh"
#include "moelora/optim/adamw_math.hpp"

namespace moelora::kernels {

/// a[i] = round((2 · uniform01(seed, 0, g(i)) − 1) · bound) over A's `count` elements, g(i) being
/// the element's global index (KaimingInitArgs::global_index): the same values as the host backend.
template <class FT>
__global__ void kaiming_uniform_kernel(KaimingInitArgs args, std::int64_t count, float bound) {
  FT* a = static_cast<FT*>(args.a);
  for (std::int64_t i = blockIdx.x * static_cast<std::int64_t>(blockDim.x) + threadIdx.x; i < count;
       i += static_cast<std::int64_t>(gridDim.x) * blockDim.x)
    a[i] = from_float<FT>(__fmul_rn(2.0f * uniform01(args.seed, 0, args.global_index(i)) - 1.0f, bound));
}

/// AdamW over `p.count` parameters of device type FT (see AdamWArgs): step `*p.steps + 1`, whose
/// constants each block computes once.
template <class FT>
__global__ void adamw_kernel(AdamWArgs p) {
  __shared__ AdamWStep step;
  __shared__ bool first_step;
  if (threadIdx.x == 0) {
    const std::int64_t t = *p.steps + 1;
    step = AdamWStep::at(p.config, t);
    first_step = t == 1;
  }
  __syncthreads();
  FT* param = static_cast<FT*>(p.param);
  for (std::int64_t i = blockIdx.x * static_cast<std::int64_t>(blockDim.x) + threadIdx.x; i < p.count;
       i += static_cast<std::int64_t>(gridDim.x) * blockDim.x) {
    const float w = p.master && !first_step ? p.master[i] : to_float(param[i]);
    const float updated = adamw_update(w, p.grad[i], p.m[i], p.v[i], p.config, step);
    if (p.master) p.master[i] = updated;
    param[i] = from_float<FT>(updated);
  }
}

/// `*steps += 1` (one thread): the step count of an AdamW state, after its last update of a step.
template <class Count>
__global__ void advance_steps_kernel(Count* steps) {
  *steps += 1;
}

}  // namespace moelora::kernels
