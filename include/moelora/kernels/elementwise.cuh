/// \file
/// \brief Element-wise kernels: Kaiming-uniform factor init.
#pragma once

#include <cstdint>

#include "moelora/core/random.hpp"
#include "moelora/kernels/common.cuh"

namespace moelora::kernels {

/// a[i] = round((2 · uniform01(seed, 0, i) − 1) · bound), the same values as the host backend.
template <class FT>
__global__ void kaiming_uniform_kernel(FT* a, std::int64_t count, float bound, std::uint64_t seed) {
  for (std::int64_t i = blockIdx.x * static_cast<std::int64_t>(blockDim.x) + threadIdx.x; i < count;
       i += static_cast<std::int64_t>(gridDim.x) * blockDim.x)
    a[i] = from_float<FT>(__fmul_rn(2.0f * uniform01(seed, 0, static_cast<std::uint64_t>(i)) - 1.0f, bound));
}

}  // namespace moelora::kernels
