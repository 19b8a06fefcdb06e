/// \file
/// \brief The MSE loss kernel (loss/mse.hpp): dy per element, the loss summed per block in fp64
/// and added atomically to the caller's accumulator.
#pragma once

#include <cub/block/block_reduce.cuh>

#include <cstdint>

#include "moelora/kernels/common.cuh"
#include "moelora/kernels/vec4.cuh"
#include "moelora/loss/mse.hpp"

namespace moelora::kernels {

inline constexpr int kLossThreads = 256;

/// Grid-stride over 4-element groups (vector accesses when `vectorized`), then a block sum.
template <class T>
__global__ void __launch_bounds__(kLossThreads) mse_loss_kernel(loss::MseLossArgs a, bool vectorized) {
  const float k = loss::mse_grad_factor(a.weight, a.loss_scale ? *a.loss_scale : 1.0f);
  const auto* y = static_cast<const T*>(a.y);
  const auto* t = static_cast<const T*>(a.target);
  auto* dy = static_cast<T*>(a.dy);
  double sum = 0.0;
  for (std::int64_t i = 4 * (blockIdx.x * static_cast<std::int64_t>(kLossThreads) + threadIdx.x); i < a.count;
       i += 4 * static_cast<std::int64_t>(gridDim.x) * kLossThreads) {
    if (vectorized && i + 4 <= a.count) {
      float yv[4], tv[4], g[4];
      load4(y + i, yv);
      load4(t + i, tv);
      for (int j = 0; j < 4; ++j) {
        const double d = static_cast<double>(yv[j]) - static_cast<double>(tv[j]);
        sum += d * d;
        g[j] = loss::mse_grad(yv[j], tv[j], k);
      }
      store4(dy + i, g);
    } else {
      for (std::int64_t j = i; j < a.count && j < i + 4; ++j) {
        const float yj = to_float(y[j]), tj = to_float(t[j]);
        const double d = static_cast<double>(yj) - static_cast<double>(tj);
        sum += d * d;
        dy[j] = from_float<T>(loss::mse_grad(yj, tj, k));
      }
    }
  }
  if (!a.loss_sum) return;
  using Reduce = cub::BlockReduce<double, kLossThreads>;
  __shared__ typename Reduce::TempStorage temp;
  const double block = Reduce(temp).Sum(sum);
  if (threadIdx.x == 0) atomicAdd(a.loss_sum, static_cast<double>(a.weight) * block);
}

}  // namespace moelora::kernels
