/// \file
/// \brief Element-wise kernels: Kaiming-uniform factor init.
#pragma once

#include <cstdint>

#include "moelora/core/lora_args.hpp"
#include "moelora/core/random.hpp"
#include "moelora/kernels/common.cuh"

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

}  // namespace moelora::kernels
