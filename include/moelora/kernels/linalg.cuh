/// \file
/// \brief Kernels of the initialisers' linear algebra: the steps of the Gram-matrix SVD (fp64
/// widening, diagonal shift, start block, singular vectors and values out of the eigenpairs), factor
/// assembly from an SVD, element-wise subtraction and conversion, and per-matrix squared norms
/// (templates, so that every translation unit may include them).
#pragma once

#include <cstdint>

#include "moelora/core/random.hpp"
#include "moelora/init/linalg.hpp"
#include "moelora/kernels/common.cuh"

namespace moelora::kernels {

/// out[i] = in[i] converted exactly to a wider type (fp32 → fp64), i < n.
template <class In, class Out>
__global__ void widen_kernel(const In* __restrict__ in, Out* __restrict__ out, std::int64_t n) {
  for (std::int64_t i = blockIdx.x * static_cast<std::int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<std::int64_t>(gridDim.x) * blockDim.x)
    out[i] = in[i];
}

/// For each n×n Gram matrix G (blockIdx.x = matrix, 256 threads): μ = relative · trace(G) / n, or 1
/// where the trace is 0; adds μ to the diagonal and writes trace_shift[2·b] = trace(G),
/// trace_shift[2·b + 1] = μ.
template <class T>
__global__ void shift_gram_kernel(T* gram, std::int64_t n, T relative, T* trace_shift) {
  __shared__ T partial[256];
  T* matrix = gram + static_cast<std::int64_t>(blockIdx.x) * n * n;
  T sum = 0;
  for (std::int64_t i = threadIdx.x; i < n; i += blockDim.x) sum += matrix[i * (n + 1)];
  partial[threadIdx.x] = sum;
  __syncthreads();
  for (int stride = blockDim.x / 2; stride > 0; stride /= 2) {
    if (threadIdx.x < stride) partial[threadIdx.x] += partial[threadIdx.x + stride];
    __syncthreads();
  }
  const T trace = partial[0];
  const T shift = trace > 0 ? relative * trace / static_cast<T>(n) : T(1);
  for (std::int64_t i = threadIdx.x; i < n; i += blockDim.x) matrix[i * (n + 1)] += shift;
  if (threadIdx.x == 0) {
    trace_shift[2 * blockIdx.x] = trace;
    trace_shift[2 * blockIdx.x + 1] = shift;
  }
}

/// q[i] = 2 · uniform01(seed, 0, i) − 1: the subspace iteration's start block.
template <class T>
__global__ void random_block_kernel(T* q, std::int64_t n, std::uint64_t seed) {
  for (std::int64_t i = blockIdx.x * static_cast<std::int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<std::int64_t>(gridDim.x) * blockDim.x)
    q[i] = static_cast<T>(2.0f * uniform01(seed, 0, static_cast<std::uint64_t>(i)) - 1.0f);
}

/// σ_j of matrix b from the eigenvalues of its shifted Gram matrix: `values` holds `stride` of them
/// per matrix, ascending, so σ_j = √max(values[b·stride + stride − 1 − j] − μ_b, 0), μ_b =
/// trace_shift[2·b + 1]: σ descending in j.
template <class T>
__device__ __forceinline__ T singular_value(const T* values, std::int64_t stride, const T* trace_shift, std::int64_t b,
                                            std::int64_t j) {
  return sqrt(fmax(values[b * stride + stride - 1 - j] - trace_shift[2 * b + 1], T(0)));
}

/// s `[batch, k]` = σ (see singular_value), rounded to fp32.
template <class T>
__global__ void singular_values_kernel(const T* values, std::int64_t stride, const T* trace_shift, std::int64_t batch,
                                       std::int64_t k, float* s) {
  for (std::int64_t i = blockIdx.x * static_cast<std::int64_t>(blockDim.x) + threadIdx.x; i < batch * k;
       i += static_cast<std::int64_t>(gridDim.x) * blockDim.x)
    s[i] = static_cast<float>(singular_value(values, stride, trace_shift, i / k, i % k));
}

/// Singular vectors of the short side, descending, in fp32: `vectors` holds per matrix (`stride`
/// apart) the eigenvectors of the k largest eigenvalues, ascending, as the columns of a column-major
/// n × k matrix; out[b·n·k + i·out_i + j·out_j] = vectors[b·stride + i + n·(k − 1 − j)].
/// (out_i, out_j) = (k, 1) writes u `[n, k]`, (1, n) writes vt `[k, n]` (row-major).
template <class T>
__global__ void short_side_kernel(const T* vectors, std::int64_t stride, std::int64_t n, std::int64_t k,
                                  std::int64_t batch, std::int64_t out_i, std::int64_t out_j, float* out) {
  for (std::int64_t t = blockIdx.x * static_cast<std::int64_t>(blockDim.x) + threadIdx.x; t < batch * n * k;
       t += static_cast<std::int64_t>(gridDim.x) * blockDim.x) {
    const std::int64_t i = t % n, j = (t / n) % k, b = t / (n * k);
    out[b * n * k + i * out_i + j * out_j] = static_cast<float>(vectors[b * stride + i + n * (k - 1 - j)]);
  }
}

/// Divides triplet j of the long side's vectors by σ_j (0 where σ_j = 0): x holds `per_matrix`
/// values per matrix, element t of which belongs to triplet (t / j_stride) mod k.
template <class T>
__global__ void divide_by_sigma_kernel(float* x, std::int64_t per_matrix, std::int64_t j_stride, std::int64_t k,
                                       std::int64_t batch, const T* values, std::int64_t stride, const T* trace_shift) {
  for (std::int64_t t = blockIdx.x * static_cast<std::int64_t>(blockDim.x) + threadIdx.x; t < batch * per_matrix;
       t += static_cast<std::int64_t>(gridDim.x) * blockDim.x) {
    const std::int64_t b = t / per_matrix, j = (t % per_matrix / j_stride) % k;
    const T sigma = singular_value(values, stride, trace_shift, b, j);
    x[t] = sigma > 0 ? static_cast<float>(x[t] / sigma) : 0.0f;
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
