/// \file
/// \brief The CUDA backend's `loss::mse_loss` (loss/mse.hpp): one kernel on the caller's stream,
/// no host synchronisation.
#pragma once

#if !defined(__CUDACC__)
#error "moelora/cuda/loss.hpp holds device code: compile this translation unit with nvcc"
#endif

#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "moelora/cuda/backend.hpp"
#include "moelora/kernels/loss.cuh"
#include "moelora/loss/mse.hpp"

namespace moelora::loss {

/// MSE loss and gradient over device memory (see loss/mse.hpp), queued on `stream`.
inline void mse_loss(const MseLossArgs& a, cudaStream_t stream) {
  validate(a);
  if (a.count == 0) return;
  const std::size_t vector_bytes = 4 * dtype_size(a.dtype);
  const bool vectorized = cuda_detail::aligned(a.y, vector_bytes) && cuda_detail::aligned(a.target, vector_bytes) &&
                          cuda_detail::aligned(a.dy, vector_bytes);
  const auto blocks = static_cast<unsigned>(
      std::clamp<std::int64_t>((a.count + 4 * kernels::kLossThreads - 1) / (4 * kernels::kLossThreads), 1, 2048));
  dispatch_dtype(a.dtype, [&](auto tag) {
    cuda_detail::launch(kernels::mse_loss_kernel<kernels::device_t<tag.value>>, dim3(blocks), kernels::kLossThreads, 0,
                        stream, a, vectorized);
  });
}

}  // namespace moelora::loss
