/// \file
/// \brief Device code of the MoE token path (`moe/`): softmax top-k routing, the inverse of the
/// expert-order permutation, row gathers and the weighted combine, and SwiGLU. Row kernels move
/// `N` elements per thread (16-byte vectors where the host adapter found the widths and pointers
/// aligned, else N = 1), grid-stride over `rows × width / N`.
#pragma once

#include <cstdint>

#include "moelora/kernels/common.cuh"
#include "moelora/moe/routing.hpp"
#include "moelora/moe/swiglu.hpp"

namespace moelora::kernels {

inline constexpr int kMoeThreads = 256;

/// N elements of T, loaded and stored as one vector.
template <class T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

template <class T, int N>
__device__ __forceinline__ void load_floats(const T* p, float (&out)[N]) {
  const Pack<T, N> pack = *reinterpret_cast<const Pack<T, N>*>(p);
#pragma unroll
  for (int i = 0; i < N; ++i) out[i] = to_float(pack.v[i]);
}
template <class T, int N>
__device__ __forceinline__ void store_floats(T* p, const float (&in)[N]) {
  Pack<T, N> pack;
#pragma unroll
  for (int i = 0; i < N; ++i) pack.v[i] = from_float<T>(in[i]);
  *reinterpret_cast<Pack<T, N>*>(p) = pack;
}

/// Work item i of a row kernel that moves N elements per item over rows of `units` items: its row
/// and first column.
struct RowItem {
  std::int64_t row, col;
};
template <int N>
__device__ __forceinline__ RowItem row_item(std::int64_t i, std::int64_t units) {
  const std::int64_t row = i / units;
  return {row, (i - row * units) * N};
}

/// Grid-stride index over `count` work items.
#define MOELORA_GRID_STRIDE(i, count)                                                                        \
  for (std::int64_t i = blockIdx.x * static_cast<std::int64_t>(blockDim.x) + threadIdx.x; i < (count); \
       i += static_cast<std::int64_t>(gridDim.x) * blockDim.x)

/// One warp per token: the k best logits of `logits [T, E]` by `moe::ranks_before`, then their
/// weights by `moe::normalise_top_k` (lane 0). Choice j is the best logit ranking after choice j−1
/// (a strict total order), so no taken-set is kept; each round re-reads the row (from L1).
template <class LT>
__global__ void __launch_bounds__(kMoeThreads)
    top_k_kernel(const LT* logits, std::int64_t tokens, std::int32_t experts, std::int32_t top_k,
                 std::int32_t* chosen, float* weights) {
  constexpr int kWarps = kMoeThreads / 32;
  const int lane = static_cast<int>(threadIdx.x % 32);
  for (std::int64_t t = blockIdx.x * std::int64_t{kWarps} + threadIdx.x / 32; t < tokens;
       t += static_cast<std::int64_t>(gridDim.x) * kWarps) {
    const LT* row = logits + t * experts;
    float last = 0.0f;
    std::int32_t last_index = -1;
    for (std::int32_t j = 0; j < top_k; ++j) {
      float best = 0.0f;
      std::int32_t best_index = -1;
      for (std::int32_t e = lane; e < experts; e += 32) {
        const float v = to_float(row[e]);
        if ((last_index < 0 || moe::ranks_before(last, last_index, v, e)) &&
            (best_index < 0 || moe::ranks_before(v, e, best, best_index)))
          best = v, best_index = e;
      }
#pragma unroll
      for (int offset = 16; offset > 0; offset /= 2) {
        const float other = __shfl_xor_sync(0xffffffffu, best, offset);
        const std::int32_t other_index = __shfl_xor_sync(0xffffffffu, best_index, offset);
        if (other_index >= 0 && (best_index < 0 || moe::ranks_before(other, other_index, best, best_index)))
          best = other, best_index = other_index;
      }
      last = best, last_index = best_index;
      if (lane == 0) chosen[t * top_k + j] = best_index, weights[t * top_k + j] = best;
    }
    if (lane == 0) moe::normalise_top_k(weights + t * top_k, top_k);
  }
}

/// out[i] = i for i < n (the routed-row indices the sort carries along).
template <class Index>
__global__ void iota_kernel(Index* out, std::int64_t n) {
  MOELORA_GRID_STRIDE(i, n) out[i] = static_cast<Index>(i);
}

/// position[source[i]] = i for i < rows.
template <class Index>
__global__ void invert_permutation_kernel(const Index* source, std::int64_t rows, Index* position) {
  MOELORA_GRID_STRIDE(i, rows) position[source[i]] = static_cast<Index>(i);
}

/// rows[i] = x[source[i] / top_k]; `units` vectors V per row.
template <class V>
__global__ void __launch_bounds__(kMoeThreads)
    permute_kernel(const V* x, const std::int32_t* source, std::int32_t top_k, std::int64_t rows, std::int64_t units,
                   V* out) {
  MOELORA_GRID_STRIDE(i, rows * units) {
    const std::int64_t row = i / units, unit = i - row * units;
    out[i] = x[static_cast<std::int64_t>(source[row] / top_k) * units + unit];
  }
}

/// y[t] = round(Σ_j w[t, j] · rows[position[t·k + j]]) (fp32, j ascending); weights null: w = 1.
template <class T, int N>
__global__ void __launch_bounds__(kMoeThreads)
    combine_kernel(const T* rows, const float* weights, const std::int32_t* position, std::int32_t top_k,
                   std::int64_t tokens, std::int64_t width, T* y) {
  const std::int64_t units = width / N;
  MOELORA_GRID_STRIDE(i, tokens * units) {
    const auto [t, c] = row_item<N>(i, units);
    float sum[N] = {};
    for (std::int32_t j = 0; j < top_k; ++j) {
      const float w = weights ? weights[t * top_k + j] : 1.0f;
      float v[N];
      load_floats<T, N>(rows + static_cast<std::int64_t>(position[t * top_k + j]) * width + c, v);
#pragma unroll
      for (int n = 0; n < N; ++n) sum[n] = fmaf(w, v[n], sum[n]);
    }
    store_floats<T, N>(y + t * width + c, sum);
  }
}

/// d_rows[i] = round(w[source[i]] · dy[source[i] / k]).
template <class T, int N>
__global__ void __launch_bounds__(kMoeThreads)
    combine_backward_kernel(const T* dy, const float* weights, const std::int32_t* source, std::int32_t top_k,
                            std::int64_t rows, std::int64_t width, T* d_rows) {
  const std::int64_t units = width / N;
  MOELORA_GRID_STRIDE(i, rows * units) {
    const auto [row, c] = row_item<N>(i, units);
    const std::int32_t s = source[row];
    const float w = weights[s];
    float v[N];
    load_floats<T, N>(dy + static_cast<std::int64_t>(s / top_k) * width + c, v);
#pragma unroll
    for (int n = 0; n < N; ++n) v[n] *= w;
    store_floats<T, N>(d_rows + row * width + c, v);
  }
}

/// out `[R, f]` = swiglu(in[:, :f], in[:, f:]).
template <class T, int N>
__global__ void __launch_bounds__(kMoeThreads)
    swiglu_kernel(const T* in, std::int64_t rows, std::int64_t f, T* out) {
  const std::int64_t units = f / N;
  MOELORA_GRID_STRIDE(i, rows * units) {
    const auto [row, c] = row_item<N>(i, units);
    float g[N], u[N], y[N];
    load_floats<T, N>(in + row * 2 * f + c, g);
    load_floats<T, N>(in + row * 2 * f + f + c, u);
#pragma unroll
    for (int n = 0; n < N; ++n) y[n] = moe::swiglu(g[n], u[n]);
    store_floats<T, N>(out + row * f + c, y);
  }
}

/// d_in `[R, 2f]` = (d_gate, d_up) of swiglu at in for d_out `[R, f]`.
template <class T, int N>
__global__ void __launch_bounds__(kMoeThreads)
    swiglu_backward_kernel(const T* in, const T* d_out, std::int64_t rows, std::int64_t f, T* d_in) {
  const std::int64_t units = f / N;
  MOELORA_GRID_STRIDE(i, rows * units) {
    const auto [row, c] = row_item<N>(i, units);
    float g[N], u[N], d[N], dg[N], du[N];
    load_floats<T, N>(in + row * 2 * f + c, g);
    load_floats<T, N>(in + row * 2 * f + f + c, u);
    load_floats<T, N>(d_out + row * f + c, d);
#pragma unroll
    for (int n = 0; n < N; ++n) {
      const moe::SwiGluGrad grad = moe::swiglu_grad(g[n], u[n], d[n]);
      dg[n] = grad.gate, du[n] = grad.up;
    }
    store_floats<T, N>(d_in + row * 2 * f + c, dg);
    store_floats<T, N>(d_in + row * 2 * f + f + c, du);
  }
}

/// Row blocks (moe::RowChunks, on the device): row j of the concatenated blocks, block b holding
/// rows `[first[b], first[b+1])`, moves from row `src[b] + j − first[b]` of `in` to row
/// `dst[b] + j − first[b]` of `out`; `units` vectors V per row.
template <class V>
__global__ void __launch_bounds__(kMoeThreads)
    move_rows_kernel(const V* in, const std::int64_t* first, const std::int64_t* src, const std::int64_t* dst,
                     std::int32_t blocks, std::int64_t units, V* out) {
  MOELORA_GRID_STRIDE(i, first[blocks] * units) {
    const std::int64_t j = i / units, unit = i - j * units;
    std::int32_t lo = 0, hi = blocks;  // first[lo] <= j < first[hi]
    while (hi - lo > 1) {
      const std::int32_t mid = (lo + hi) / 2;
      if (first[mid] <= j) lo = mid;
      else hi = mid;
    }
    const std::int64_t k = j - first[lo];
    out[(dst[lo] + k) * units + unit] = in[(src[lo] + k) * units + unit];
  }
}

#undef MOELORA_GRID_STRIDE

}  // namespace moelora::kernels
