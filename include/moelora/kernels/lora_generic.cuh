/// \file
/// \brief The generic LoRA kernels: one thread per output element, any dtypes, ranks and sizes.
///
/// Used where the tensor-core path does not apply (fp32 factors, rank > 128 or not a multiple of 8,
/// `in` or `out` not a multiple of 8, unaligned tensors). Same numerics as the fast path: inputs
/// rounded to the factor dtype, fp32 accumulation, h and round(scale · u) rounded to the factor dtype.
#pragma once

#include "moelora/kernels/common.cuh"

namespace moelora::kernels {

/// The expert of row `row` (offsets[e] ≤ row < offsets[e+1]), or -1 past the last row.
__device__ __forceinline__ std::int32_t expert_of_row(const std::int64_t* offsets, std::int32_t experts,
                                                      std::int64_t row) {
  if (row >= offsets[experts]) return -1;
  std::int32_t lo = 0, hi = experts;
  while (hi - lo > 1) {
    const std::int32_t mid = (lo + hi) / 2;
    if (offsets[mid] <= row) lo = mid;
    else hi = mid;
  }
  return lo;
}

template <class FT, class T>
__device__ __forceinline__ float as_factor(T v) {  ///< v rounded to the factor dtype, as fp32
  return to_float(from_float<FT>(to_float(v)));
}

#define MOELORA_GRID_STRIDE(i, n) \
  for (std::int64_t i = blockIdx.x * static_cast<std::int64_t>(blockDim.x) + threadIdx.x; i < (n); i += static_cast<std::int64_t>(gridDim.x) * blockDim.x)

struct GenericParams {
  const std::int64_t* offsets;  // [E+1]
  std::int32_t experts;
  std::int64_t rows, in, out;
  std::int32_t rank;
  float scale;
  const void* x;   // [T, in]
  const void* a;   // [E, r, in]
  const void* b;   // [E, out, r]
  void* h;         // [T, r]
  void* y;         // [T, out]
  const void* dy;  // [T, out]
  float* u;        // [T, r] fp32 (unscaled B_eᵀ dy_t)
  const float* u_grad_a;  // [T, r] fp32, the u of dA where it differs from dx's (column-parallel); null: u
  float* h_sums;   // [T, r] fp32 unrounded h, written by the shrink when non-null (row-parallel)
  void* dx;        // [T, in]
  float* grad_a;   // [E, r, in]
  float* grad_b;   // [E, out, r]
  bool add_y, add_dx, add_grads;  // accumulate into y, dx, the gradients (else overwrite them)
};

/// h[t, j] = round(Σ_k x[t, k] A_e[j, k])
template <class IoT, class FT>
__global__ void generic_shrink_kernel(GenericParams p) {
  MOELORA_GRID_STRIDE(i, p.rows * p.rank) {
    const std::int64_t t = i / p.rank, j = i % p.rank;
    const std::int32_t e = expert_of_row(p.offsets, p.experts, t);
    if (e < 0) continue;
    const IoT* x = static_cast<const IoT*>(p.x) + t * p.in;
    const FT* a = static_cast<const FT*>(p.a) + (static_cast<std::int64_t>(e) * p.rank + j) * p.in;
    float acc = 0.0f;
    for (std::int64_t k = 0; k < p.in; ++k) acc += as_factor<FT>(x[k]) * to_float(a[k]);
    static_cast<FT*>(p.h)[i] = from_float<FT>(acc);
    if (p.h_sums) p.h_sums[i] = acc;
  }
}

/// y[t, n] (+)= scale · Σ_j h[t, j] B_e[n, j]
template <class IoT, class FT>
__global__ void generic_expand_kernel(GenericParams p) {
  MOELORA_GRID_STRIDE(i, p.rows * p.out) {
    const std::int64_t t = i / p.out, n = i % p.out;
    const std::int32_t e = expert_of_row(p.offsets, p.experts, t);
    if (e < 0) continue;
    const FT* h = static_cast<const FT*>(p.h) + t * p.rank;
    const FT* b = static_cast<const FT*>(p.b) + (static_cast<std::int64_t>(e) * p.out + n) * p.rank;
    float acc = 0.0f;
    for (std::int32_t j = 0; j < p.rank; ++j) acc += to_float(h[j]) * to_float(b[j]);
    IoT* y = static_cast<IoT*>(p.y) + i;
    *y = from_float<IoT>((p.add_y ? to_float(*y) : 0.0f) + p.scale * acc);
  }
}

/// u[t, j] = Σ_n dy[t, n] B_e[n, j]
template <class IoT, class FT>
__global__ void generic_u_kernel(GenericParams p) {
  MOELORA_GRID_STRIDE(i, p.rows * p.rank) {
    const std::int64_t t = i / p.rank, j = i % p.rank;
    const std::int32_t e = expert_of_row(p.offsets, p.experts, t);
    if (e < 0) continue;
    const IoT* dy = static_cast<const IoT*>(p.dy) + t * p.out;
    const FT* b = static_cast<const FT*>(p.b) + static_cast<std::int64_t>(e) * p.out * p.rank + j;
    float acc = 0.0f;
    for (std::int64_t n = 0; n < p.out; ++n) acc += as_factor<FT>(dy[n]) * to_float(b[n * p.rank]);
    p.u[i] = acc;
  }
}

/// grad_b[e, n, j] (+)= scale · Σ_{t ∈ e} dy[t, n] h[t, j]
template <class IoT, class FT>
__global__ void generic_grad_b_kernel(GenericParams p) {
  MOELORA_GRID_STRIDE(i, p.experts * p.out * p.rank) {
    const std::int64_t e = i / (p.out * p.rank), n = (i / p.rank) % p.out, j = i % p.rank;
    float acc = 0.0f;
    for (std::int64_t t = p.offsets[e]; t < p.offsets[e + 1]; ++t)
      acc += as_factor<FT>(static_cast<const IoT*>(p.dy)[t * p.out + n]) * to_float(static_cast<const FT*>(p.h)[t * p.rank + j]);
    p.grad_b[i] = (p.add_grads ? p.grad_b[i] : 0.0f) + p.scale * acc;
  }
}

/// grad_a[e, j, k] (+)= Σ_{t ∈ e} round(scale · u[t, j]) x[t, k], u being `u_grad_a` when given
template <class IoT, class FT>
__global__ void generic_grad_a_kernel(GenericParams p) {
  const float* u = p.u_grad_a ? p.u_grad_a : p.u;
  MOELORA_GRID_STRIDE(i, p.experts * p.rank * p.in) {
    const std::int64_t e = i / (p.rank * p.in), j = (i / p.in) % p.rank, k = i % p.in;
    float acc = 0.0f;
    for (std::int64_t t = p.offsets[e]; t < p.offsets[e + 1]; ++t)
      acc += as_factor<FT>(p.scale * u[t * p.rank + j]) * as_factor<FT>(static_cast<const IoT*>(p.x)[t * p.in + k]);
    p.grad_a[i] = (p.add_grads ? p.grad_a[i] : 0.0f) + acc;
  }
}

/// dx[t, k] (+)= Σ_j round(scale · u[t, j]) A_e[j, k]
template <class IoT, class FT>
__global__ void generic_dx_kernel(GenericParams p) {
  MOELORA_GRID_STRIDE(i, p.rows * p.in) {
    const std::int64_t t = i / p.in, k = i % p.in;
    const std::int32_t e = expert_of_row(p.offsets, p.experts, t);
    if (e < 0) continue;
    const FT* a = static_cast<const FT*>(p.a) + static_cast<std::int64_t>(e) * p.rank * p.in + k;
    float acc = 0.0f;
    for (std::int32_t j = 0; j < p.rank; ++j) acc += as_factor<FT>(p.scale * p.u[t * p.rank + j]) * to_float(a[j * p.in]);
    IoT* dx = static_cast<IoT*>(p.dx) + i;
    *dx = from_float<IoT>((p.add_dx ? to_float(*dx) : 0.0f) + acc);
  }
}

#undef MOELORA_GRID_STRIDE

}  // namespace moelora::kernels
