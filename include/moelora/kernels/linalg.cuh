/// \file
/// \brief Kernels of the initialisers' linear algebra: batched transposes, factor assembly from an
/// SVD, element-wise subtraction and conversion, and per-matrix squared norms (templates on the
/// element type, so that every translation unit may include them).
#pragma once

#include <cstdint>

#include "moelora/init/linalg.hpp"
#include "moelora/kernels/common.cuh"

namespace moelora::kernels {

inline constexpr int kTransposeTile = 32;

/// out `[batch, cols, rows]` = inᵀ of in `[batch, rows, cols]`; 32×32 tiles through shared memory,
/// grid (⌈cols/32⌉, ⌈rows/32⌉, batch), block (32, 8).
template <class T>
__global__ void transpose_kernel(const T* __restrict__ in, T* __restrict__ out, std::int64_t rows, std::int64_t cols) {
  __shared__ T tile[kTransposeTile][kTransposeTile + 1];
  const std::int64_t matrix = static_cast<std::int64_t>(blockIdx.z) * rows * cols;
  const std::int64_t c0 = static_cast<std::int64_t>(blockIdx.x) * kTransposeTile;
  const std::int64_t r0 = static_cast<std::int64_t>(blockIdx.y) * kTransposeTile;
  for (int i = threadIdx.y; i < kTransposeTile; i += blockDim.y) {
    const std::int64_t r = r0 + i, c = c0 + threadIdx.x;
    if (r < rows && c < cols) tile[i][threadIdx.x] = in[matrix + r * cols + c];
  }
  __syncthreads();
  for (int i = threadIdx.y; i < kTransposeTile; i += blockDim.y) {
    const std::int64_t c = c0 + i, r = r0 + threadIdx.x;
    if (r < rows && c < cols) out[matrix + c * rows + r] = tile[threadIdx.x][i];
  }
}

/// b `[batch, rows, rank]` = U diag(scale_b) zero-padded past k, U `[batch, rows, k]`; values
/// rounded to `Round` and kept as fp32.
template <class Round>
__global__ void factor_b_kernel(const float* u, const float* s, init::SvdShape shape, init::FactorSplit split,
                                float* b) {
  const std::int64_t count = shape.batch * shape.rows * split.rank;
  for (std::int64_t i = blockIdx.x * static_cast<std::int64_t>(blockDim.x) + threadIdx.x; i < count;
       i += static_cast<std::int64_t>(gridDim.x) * blockDim.x) {
    const std::int64_t j = i % split.rank, row = i / split.rank, e = row / shape.rows;
    float value = 0.0f;
    if (j < shape.k)
      value = u[row * shape.k + j] * init::factor_scales(s[e * shape.k + j], split.balanced, split.b_multiplier).b;
    b[i] = to_float(from_float<Round>(value));
  }
}

/// a `[batch, rank, cols]` = diag(scale_a) Vᵀ zero-padded past k, Vᵀ `[batch, k, cols]`.
template <class Round>
__global__ void factor_a_kernel(const float* s, const float* vt, init::SvdShape shape, init::FactorSplit split,
                                float* a) {
  const std::int64_t count = shape.batch * split.rank * shape.cols;
  for (std::int64_t i = blockIdx.x * static_cast<std::int64_t>(blockDim.x) + threadIdx.x; i < count;
       i += static_cast<std::int64_t>(gridDim.x) * blockDim.x) {
    const std::int64_t c = i % shape.cols, j = (i / shape.cols) % split.rank, e = i / (shape.cols * split.rank);
    float value = 0.0f;
    if (j < shape.k)
      value = vt[(e * shape.k + j) * shape.cols + c] *
              init::factor_scales(s[e * shape.k + j], split.balanced, split.b_multiplier).a;
    a[i] = to_float(from_float<Round>(value));
  }
}

template <class T>
__global__ void subtract_kernel(const T* x, const T* y, T* out, std::int64_t n) {
  for (std::int64_t i = blockIdx.x * static_cast<std::int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<std::int64_t>(gridDim.x) * blockDim.x)
    out[i] = x[i] - y[i];
}

template <class In, class Out>
__global__ void convert_kernel(const In* in, Out* out, std::int64_t n) {
  for (std::int64_t i = blockIdx.x * static_cast<std::int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<std::int64_t>(gridDim.x) * blockDim.x)
    out[i] = from_float<Out>(to_float(in[i]));
}

/// norms[blockIdx.x] = Σ m² over matrix blockIdx.x of n elements, in fp64; 256 threads.
template <class T>
__global__ void sq_norms_kernel(const T* m, std::int64_t n, double* norms) {
  __shared__ double partial[256];
  const T* matrix = m + static_cast<std::int64_t>(blockIdx.x) * n;
  double sum = 0.0;
  for (std::int64_t i = threadIdx.x; i < n; i += blockDim.x) sum += static_cast<double>(matrix[i]) * matrix[i];
  partial[threadIdx.x] = sum;
  __syncthreads();
  for (int stride = blockDim.x / 2; stride > 0; stride /= 2) {
    if (threadIdx.x < stride) partial[threadIdx.x] += partial[threadIdx.x + stride];
    __syncthreads();
  }
  if (threadIdx.x == 0) norms[blockIdx.x] = partial[0];
}

}  // namespace moelora::kernels
