/// \file
/// \brief The optimizer's multi-tensor kernels (optim/multi_tensor.hpp): gradient statistics with
/// the step's decision in the last block, the decision alone after a cross-rank reduction, and the
/// AdamW update that advances the step counts in its last block.
///
/// Both passes run a fixed grid (`optim_blocks`) of 256 threads that walks the chunks of all
/// tensors; a chunk finds its tensor by a binary search over `first_chunk`. A thread handles 4
/// consecutive elements at a time, with vector accesses where the tensor allows them.
#pragma once

#include <cub/block/block_reduce.cuh>

#include <cstdint>
#include <limits>

#include "moelora/kernels/common.cuh"
#include "moelora/kernels/vec4.cuh"
#include "moelora/optim/multi_tensor.hpp"

namespace moelora::kernels {

inline constexpr int kOptimThreads = 256;

/// The tensor that chunk `c` belongs to.
__device__ __forceinline__ const OptimTensor& tensor_of_chunk(const OptimBatch& b, std::int64_t c) {
  std::int32_t lo = 0, hi = b.tensor_count;  // tensors[lo].first_chunk <= c < tensors[hi].first_chunk
  while (hi - lo > 1) {
    const std::int32_t mid = (lo + hi) / 2;
    if (b.tensors[mid].first_chunk <= c) lo = mid;
    else hi = mid;
  }
  return b.tensors[lo];
}

/// Elements `[begin, end)` of chunk `c` of tensor `t`.
struct ChunkRange {
  std::int64_t begin, end;
};
__device__ __forceinline__ ChunkRange chunk_range(const OptimTensor& t, std::int64_t c) {
  const std::int64_t begin = (c - t.first_chunk) * kOptimChunk;
  return {begin, begin + kOptimChunk < t.count ? begin + kOptimChunk : t.count};
}

/// Whether this block is the last of the grid to arrive at `counter` (thread 0 asks; every thread
/// gets the answer). The last block resets the counter, so the next launch starts from 0.
__device__ __forceinline__ bool last_block(std::uint32_t* counter) {
  __shared__ bool last;
  __syncthreads();
  if (threadIdx.x == 0) {
    __threadfence();  // this block's results are visible before it is counted
    last = atomicAdd(counter, 1u) == gridDim.x - 1;
    if (last) *counter = 0;
  }
  __syncthreads();
  if (last) __threadfence();  // and the other blocks' results are visible to the last one
  return last;
}

/// Statistics pass: Σg² (fp64; sharded and replicated tensors apart) and the non-finite flag over
/// every gradient; per-block partials summed by the last block in a fixed order, which then decides
/// the step (`finish_step`) or leaves the sums in `control->reduced` for a communicator. `Threads`
/// threads a block (kOptimThreads).
template <int Threads>
__global__ void __launch_bounds__(Threads) optim_stats_kernel(OptimBatch b) {
  allow_dependent_launch();  // the update pass may be scheduled now; it waits for this grid's end
  using Reduce = cub::BlockReduce<double, Threads>;
  __shared__ typename Reduce::TempStorage temp;
  double sums[2] = {0.0, 0.0};  // [sharded, replicated]
  int nonfinite = 0;
  for (std::int64_t c = blockIdx.x; c < b.chunk_count; c += gridDim.x) {
    const OptimTensor t = tensor_of_chunk(b, c);
    const auto [begin, end] = chunk_range(t, c);
    double sum = 0.0;
    for (std::int64_t i = begin + 4 * threadIdx.x; i < end; i += 4 * Threads) {
      float g[4] = {0.0f, 0.0f, 0.0f, 0.0f};
      if (t.vectorized && i + 4 <= end) load4(t.grad + i, g);
      else
        for (std::int64_t j = i; j < end && j < i + 4; ++j) g[j - i] = t.grad[j];
      for (const float x : g) {
        nonfinite |= !is_finite(x);
        sum += static_cast<double>(x) * static_cast<double>(x);
      }
    }
    sums[t.sharded ? 0 : 1] += sum;
  }
  const double block_sharded = Reduce(temp).Sum(sums[0]);
  __syncthreads();
  const double block_replicated = Reduce(temp).Sum(sums[1]);
  const int block_nonfinite = __syncthreads_or(nonfinite);
  if (threadIdx.x == 0) {
    b.partials[2 * blockIdx.x] = block_sharded;
    b.partials[2 * blockIdx.x + 1] = block_replicated;
    if (block_nonfinite) atomicOr(&b.control->nonfinite, 1u);
  }
  if (!last_block(&b.control->stats_blocks_done)) return;

  double total[2] = {0.0, 0.0};
  for (unsigned i = threadIdx.x; i < gridDim.x; i += Threads) {
    total[0] += __ldcg(b.partials + 2 * i);
    total[1] += __ldcg(b.partials + 2 * i + 1);
  }
  const double sharded = Reduce(temp).Sum(total[0]);
  __syncthreads();
  const double replicated = Reduce(temp).Sum(total[1]);
  if (threadIdx.x != 0) return;
  const bool any_nonfinite = atomicExch(&b.control->nonfinite, 0u) != 0;
  if (b.finish_in_stats) {
    finish_step(*b.control, b.config, sharded + replicated, any_nonfinite);
    return;
  }
  constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();
  b.control->reduced[0] = any_nonfinite ? kNaN : static_cast<float>(sharded);
  b.control->reduced[1] = any_nonfinite ? kNaN : static_cast<float>(replicated);
}

/// The step's decision from the sums a communicator reduced into `control->reduced` (thread 0 of a
/// `Threads`-thread block; launched with one).
template <int Threads>
__global__ void __launch_bounds__(Threads) optim_finish_kernel(OptimBatch b) {
  if (threadIdx.x != 0) return;
  finish_step(*b.control, b.config,
              static_cast<double>(b.control->reduced[0]) + static_cast<double>(b.control->reduced[1]), false);
}

/// AdamW over elements `[begin, end)` of tensor `t` (parameters of device type T), by a block of
/// `Threads` threads.
template <int Threads, class T>
__device__ __forceinline__ void adamw_chunk(const OptimTensor& t, std::int64_t begin, std::int64_t end,
                                            const AdamWConfig& config, const AdamWStep& s, float grad_scale,
                                            bool from_param) {
  T* param = static_cast<T*>(t.param);
  for (std::int64_t i = begin + 4 * threadIdx.x; i < end; i += 4 * Threads) {
    if (t.vectorized && i + 4 <= end) {
      float g[4], m[4], v[4], w[4];
      load4(t.grad + i, g);
      load4(t.m + i, m);
      load4(t.v + i, v);
      if (from_param) load4(param + i, w);
      else load4(t.master + i, w);
      for (int j = 0; j < 4; ++j) w[j] = adamw_update(w[j], g[j] * grad_scale, m[j], v[j], config, s);
      store4(t.m + i, m);
      store4(t.v + i, v);
      if (t.master) store4(t.master + i, w);
      store4(param + i, w);
    } else {
      for (std::int64_t j = i; j < end && j < i + 4; ++j) {
        const float w = from_param ? to_float(param[j]) : t.master[j];
        const float updated = adamw_update(w, t.grad[j] * grad_scale, t.m[j], t.v[j], config, s);
        if (t.master) t.master[j] = updated;
        param[j] = from_float<T>(updated);
      }
    }
  }
}

/// Update pass: AdamW over every tensor unless the step was skipped; each chunk's constants come
/// from its tensor's step count and the schedule; the last block advances every step count.
/// `Threads` threads a block (kOptimThreads). After a statistics pass it runs as that pass's
/// programmatic dependent and waits for it before reading the decision.
template <int Threads>
__global__ void __launch_bounds__(Threads) optim_update_kernel(OptimBatch b) {
  if (b.use_stats) wait_for_prerequisites();
  if (b.use_stats && !b.control->apply) return;  // the same answer for every block: skip entirely
  const float grad_scale = b.use_stats ? b.control->grad_scale : 1.0f;
  __shared__ AdamWStep constants;
  __shared__ bool from_param;
  for (std::int64_t c = blockIdx.x; c < b.chunk_count; c += gridDim.x) {
    const OptimTensor t = tensor_of_chunk(b, c);
    if (threadIdx.x == 0) {
      const std::int64_t steps = *t.step;
      constants = next_step_constants(b.config, *b.control, steps);
      from_param = !t.master || steps == 0;  // the master copy is read from the factor at first
    }
    __syncthreads();
    const auto [begin, end] = chunk_range(t, c);
    switch (t.dtype) {
      case DType::bf16: adamw_chunk<Threads, __nv_bfloat16>(t, begin, end, b.config, constants, grad_scale, from_param); break;
      case DType::fp16: adamw_chunk<Threads, __half>(t, begin, end, b.config, constants, grad_scale, from_param); break;
      case DType::fp32: adamw_chunk<Threads, float>(t, begin, end, b.config, constants, grad_scale, from_param); break;
    }
    __syncthreads();
  }
  // Every block has read the step counts it needs before it is counted: the last one advances them.
  if (!last_block(&b.control->update_blocks_done)) return;
  for (std::int32_t i = threadIdx.x; i < b.tensor_count; i += Threads) ++*b.tensors[i].step;
  if (threadIdx.x == 0) ++b.control->step;
}

}  // namespace moelora::kernels
