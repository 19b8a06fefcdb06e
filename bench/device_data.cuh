/// \file
/// \brief Device data of the GPU benchmarks: uniform random fills (the copy bandwidth is in timing.cuh).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "moelora/core/random.hpp"
#include "moelora/cuda/backend.hpp"

namespace moelora::bench {

/// data[i] = round((2 · uniform01(seed, 1, i) − 1) · scale), i < n.
template <class T>
__global__ void fill_uniform_kernel(T* data, std::int64_t n, std::uint64_t seed, float scale) {
  for (std::int64_t i = blockIdx.x * static_cast<std::int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<std::int64_t>(gridDim.x) * blockDim.x)
    data[i] = kernels::from_float<T>((2.0f * uniform01(seed, 1, static_cast<std::uint64_t>(i)) - 1.0f) * scale);
}

/// Fills `n` bf16 at `data` with values uniform in [−scale, scale] on `stream`.
inline void fill(void* data, std::int64_t n, std::uint64_t seed, float scale, cudaStream_t stream) {
  fill_uniform_kernel<__nv_bfloat16><<<1024, 256, 0, stream>>>(static_cast<__nv_bfloat16*>(data), n, seed, scale);
  MOELORA_CUDA_CHECK(cudaGetLastError());
}

}  // namespace moelora::bench
