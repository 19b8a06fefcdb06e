/// \file
/// \brief The MoE token path on the GPU: TopKRouter, TokenPermuter, SwiGlu and RowChunkMover for
/// CudaBackend (layouts and math in `moe/routing.hpp`, `moe/permutation.hpp`, `moe/swiglu.hpp`,
/// `moe/row_chunks.hpp`).
///
/// Nothing here synchronises the host or allocates after `reserve`: every call queues kernels (and
/// CUB's device-wide sort and histogram, whose scratch is sized by `reserve`) on the caller's
/// stream, so a training step built from these pieces can be captured in a CUDA graph. The expert
/// counts stay on the device; the routed-row count R = T·k is known on the host from T.
#pragma once

#if !defined(__CUDACC__)
#error "moelora/cuda/moe.hpp holds device code: compile this translation unit with nvcc"
#endif

#include <cub/device/device_histogram.cuh>
#include <cub/device/device_radix_sort.cuh>

#include <algorithm>
#include <bit>
#include <cstdint>

#include "moelora/core/buffer.hpp"
#include "moelora/cuda/backend.hpp"
#include "moelora/cuda/check.hpp"
#include "moelora/kernels/moe.cuh"
#include "moelora/moe/permutation.hpp"
#include "moelora/moe/routing.hpp"
#include "moelora/moe/row_chunks.hpp"
#include "moelora/moe/swiglu.hpp"

namespace moelora::moe {

namespace cuda_detail {

/// Largest vector (16, 8, 4 or 2 bytes, at most one row) that divides `row_bytes` and every
/// pointer's address.
inline std::size_t vector_bytes(std::size_t row_bytes, std::initializer_list<const void*> pointers) {
  for (std::size_t v : {std::size_t{16}, std::size_t{8}, std::size_t{4}}) {
    bool fits = row_bytes % v == 0;
    for (const void* p : pointers) fits = fits && moelora::cuda_detail::aligned(p, v);
    if (fits) return v;
  }
  return 2;
}

/// Calls `launch(V{})` with the widest vector type V (uint4, uint2, uint32, uint16) that
/// `vector_bytes` allows for rows of `row_bytes` bytes (a multiple of 2).
template <class Launch>
void dispatch_vector(std::size_t row_bytes, std::initializer_list<const void*> pointers, Launch&& launch) {
  switch (vector_bytes(row_bytes, pointers)) {
    case 16: launch(uint4{}); break;
    case 8: launch(uint2{}); break;
    case 4: launch(std::uint32_t{}); break;
    default: launch(std::uint16_t{}); break;
  }
}

/// Launches a row kernel `kernel<T, N>` with N = 16 / sizeof(T) elements per thread when `width`
/// and the pointers allow 16-byte vectors, else N = 1; `f(kernel_tag)` returns the kernel for N.
template <class T, class Launch>
void launch_rows(std::int64_t width, std::initializer_list<const void*> pointers, Launch&& launch) {
  constexpr int kWide = 16 / static_cast<int>(sizeof(T));
  if (vector_bytes(static_cast<std::size_t>(width) * sizeof(T), pointers) == 16)
    launch(std::integral_constant<int, kWide>{});
  else
    launch(std::integral_constant<int, 1>{});
}

/// Grid of a grid-stride kernel over `items` items.
inline dim3 grid_of(std::int64_t items) { return moelora::cuda_detail::elementwise_grid(items); }

}  // namespace cuda_detail

/// Softmax top-k on the GPU: one warp per token (`kernels::top_k_kernel`).
template <>
struct TopKRouter<CudaBackend> {
  static void route(ConstTensorRef logits, const Routing& routing, cudaStream_t stream) {
    const RoutingShape& s = routing.shape;
    check_logits(logits, s);
    if (s.tokens == 0) return;
    dispatch_dtype(logits.dtype, [&](auto tag) {
      using LT = kernels::device_t<tag.value>;
      constexpr std::int64_t kWarps = kernels::kMoeThreads / 32;
      const auto blocks = static_cast<unsigned>(std::min<std::int64_t>((s.tokens + kWarps - 1) / kWarps, 65535 * 8));
      kernels::top_k_kernel<LT><<<blocks, kernels::kMoeThreads, 0, stream>>>(
          static_cast<const LT*>(logits.data), s.tokens, static_cast<std::int32_t>(s.experts),
          static_cast<std::int32_t>(s.top_k), routing.expert, routing.weight);
    });
    MOELORA_CUDA_CHECK(cudaGetLastError());
  }
};

/// The permutation on the GPU: CUB DeviceRadixSort (stable) of the routed rows' experts with their
/// routed-row indices, CUB DeviceHistogram for the counts, and gather / combine kernels.
template <>
class TokenPermuter<CudaBackend> {
 public:
  /// Sizes the order, the sort keys, the routed-row indices and CUB's scratch (the two-phase size
  /// query runs here) for routings of up to `max.tokens` tokens at `max.experts`, `max.top_k`;
  /// allocates (so synchronises the device) when they grow, and fills the sort's index input on
  /// `stream`.
  void reserve(const RoutingShape& max, cudaStream_t stream) {
    validate(max);
    const std::int64_t rows = max.routed();
    if (max.experts == experts_ && rows <= capacity_) return;
    const std::int64_t capacity = std::max<std::int64_t>({rows, capacity_, 1});
    const int bits = key_bits(max.experts);
    std::size_t sort_bytes = 0, histogram_bytes = 0;
    MOELORA_CUDA_CHECK(cub::DeviceRadixSort::SortPairs(nullptr, sort_bytes, static_cast<const std::int32_t*>(nullptr),
                                                       static_cast<std::int32_t*>(nullptr),
                                                       static_cast<const std::int32_t*>(nullptr),
                                                       static_cast<std::int32_t*>(nullptr), capacity, 0, bits));
    MOELORA_CUDA_CHECK(cub::DeviceHistogram::HistogramEven(
        nullptr, histogram_bytes, static_cast<const std::int32_t*>(nullptr), static_cast<int*>(nullptr),
        static_cast<int>(max.experts) + 1, 0, static_cast<int>(max.experts), capacity));
    const auto bytes = [](std::int64_t n) { return static_cast<std::size_t>(n) * sizeof(std::int32_t); };
    counts_ = Buffer<CudaBackend>(bytes(max.experts));
    source_ = Buffer<CudaBackend>(bytes(capacity));
    position_ = Buffer<CudaBackend>(bytes(capacity));
    keys_ = Buffer<CudaBackend>(bytes(capacity));
    iota_ = Buffer<CudaBackend>(bytes(capacity));
    temp_ = Buffer<CudaBackend>(std::max(sort_bytes, histogram_bytes));
    kernels::iota_kernel<<<cuda_detail::grid_of(capacity), kernels::kMoeThreads, 0, stream>>>(iota_.as<std::int32_t>(),
                                                                                               capacity);
    MOELORA_CUDA_CHECK(cudaGetLastError());
    experts_ = max.experts;
    capacity_ = capacity;
  }

  /// Sorts on `stream`; reserves first if the routing is larger than the reserved one (an
  /// allocation: call `reserve` up front to keep steps allocation-free).
  const ExpertOrder& sort(const ConstRouting& routing, cudaStream_t stream) {
    const RoutingShape& s = routing.shape;
    validate(s);
    MOELORA_REQUIRE(routing.expert != nullptr || s.tokens == 0, ErrorCode::invalid_argument, "the routing has no data");
    if (s.experts != experts_ || s.routed() > capacity_) reserve(s, stream);
    const std::int64_t rows = s.routed();
    auto* counts = counts_.as<std::int32_t>();
    if (rows > 0) {
      std::size_t bytes = temp_.bytes();
      MOELORA_CUDA_CHECK(cub::DeviceRadixSort::SortPairs(temp_.data(), bytes, routing.expert, keys_.as<std::int32_t>(),
                                                         iota_.as<const std::int32_t>(), source_.as<std::int32_t>(),
                                                         rows, 0, key_bits(s.experts), stream));
      bytes = temp_.bytes();
      MOELORA_CUDA_CHECK(cub::DeviceHistogram::HistogramEven(temp_.data(), bytes, routing.expert, counts,
                                                             static_cast<int>(s.experts) + 1, 0,
                                                             static_cast<int>(s.experts), rows, stream));
      kernels::invert_permutation_kernel<<<cuda_detail::grid_of(rows), kernels::kMoeThreads, 0, stream>>>(
          source_.as<const std::int32_t>(), rows, position_.as<std::int32_t>());
      MOELORA_CUDA_CHECK(cudaGetLastError());
    } else {
      CudaBackend::fill_zero(counts, static_cast<std::size_t>(s.experts) * sizeof(std::int32_t), stream);
    }
    order_ = {counts, source_.as<const std::int32_t>(), position_.as<const std::int32_t>(), s};
    return order_;
  }

  static void permute(ConstTensorRef x, const ExpertOrder& order, TensorRef rows, cudaStream_t stream) {
    detail::check_permute(x, "x", rows, "rows", order);
    const std::size_t row_bytes = static_cast<std::size_t>(x.shape[1]) * dtype_size(x.dtype);
    const std::int64_t n = order.shape.routed();
    if (n == 0 || row_bytes == 0) return;
    const auto launch = [&](auto vector) {
      using V = decltype(vector);
      const auto units = static_cast<std::int64_t>(row_bytes / sizeof(V));
      kernels::permute_kernel<V><<<cuda_detail::grid_of(n * units), kernels::kMoeThreads, 0, stream>>>(
          static_cast<const V*>(x.data), order.source, static_cast<std::int32_t>(order.shape.top_k), n, units,
          static_cast<V*>(rows.data));
    };
    cuda_detail::dispatch_vector(row_bytes, {x.data, rows.data}, launch);
    MOELORA_CUDA_CHECK(cudaGetLastError());
  }

  static void combine(ConstTensorRef rows, const float* weights, const ExpertOrder& order, TensorRef y,
                      cudaStream_t stream) {
    detail::check_permute(y, "y", rows, "rows", order);
    const std::int64_t width = y.shape[1], tokens = order.shape.tokens;
    if (tokens == 0 || width == 0) return;
    dispatch_dtype(y.dtype, [&](auto tag) {
      using T = kernels::device_t<tag.value>;
      cuda_detail::launch_rows<T>(width, {rows.data, y.data}, [&](auto n) {
        constexpr int kN = decltype(n)::value;
        kernels::combine_kernel<T, kN><<<cuda_detail::grid_of(tokens * width / kN), kernels::kMoeThreads, 0, stream>>>(
            static_cast<const T*>(rows.data), weights, order.position, static_cast<std::int32_t>(order.shape.top_k),
            tokens, width, static_cast<T*>(y.data));
      });
    });
    MOELORA_CUDA_CHECK(cudaGetLastError());
  }

  static void combine_backward(ConstTensorRef dy, const ConstRouting& routing, const ExpertOrder& order,
                               TensorRef d_rows, cudaStream_t stream) {
    detail::check_permute(dy, "dy", d_rows, "d_rows", order);
    detail::check_same_routing(routing, order);
    const std::int64_t width = dy.shape[1], n = order.shape.routed();
    if (n == 0 || width == 0) return;
    dispatch_dtype(dy.dtype, [&](auto tag) {
      using T = kernels::device_t<tag.value>;
      cuda_detail::launch_rows<T>(width, {dy.data, d_rows.data}, [&](auto vector) {
        constexpr int kN = decltype(vector)::value;
        kernels::combine_backward_kernel<T, kN><<<cuda_detail::grid_of(n * width / kN), kernels::kMoeThreads, 0, stream>>>(
            static_cast<const T*>(dy.data), routing.weight, order.source, static_cast<std::int32_t>(order.shape.top_k),
            n, width, static_cast<T*>(d_rows.data));
      });
    });
    MOELORA_CUDA_CHECK(cudaGetLastError());
  }

 private:
  /// Radix bits of expert indices in [0, E).
  static int key_bits(std::int64_t experts) {
    return std::max(1, static_cast<int>(std::bit_width(static_cast<std::uint64_t>(experts - 1))));
  }

  std::int64_t experts_ = 0, capacity_ = 0;
  Buffer<CudaBackend> counts_, source_, position_, keys_, iota_, temp_;
  ExpertOrder order_;
};

/// SwiGLU on the GPU (`kernels::swiglu_kernel`, `kernels::swiglu_backward_kernel`).
template <>
struct SwiGlu<CudaBackend> {
  static void forward(ConstTensorRef in, TensorRef out, cudaStream_t stream) {
    check_swiglu(in, out, "in", "out");
    const std::int64_t rows = out.shape[0], f = out.shape[1];
    if (rows == 0 || f == 0) return;
    dispatch_dtype(in.dtype, [&](auto tag) {
      using T = kernels::device_t<tag.value>;
      cuda_detail::launch_rows<T>(f, {in.data, out.data}, [&](auto n) {
        constexpr int kN = decltype(n)::value;
        kernels::swiglu_kernel<T, kN><<<cuda_detail::grid_of(rows * f / kN), kernels::kMoeThreads, 0, stream>>>(
            static_cast<const T*>(in.data), rows, f, static_cast<T*>(out.data));
      });
    });
    MOELORA_CUDA_CHECK(cudaGetLastError());
  }

  static void backward(ConstTensorRef in, ConstTensorRef d_out, TensorRef d_in, cudaStream_t stream) {
    check_swiglu(in, d_out, "in", "d_out");
    check_swiglu(d_in, d_out, "d_in", "d_out");
    const std::int64_t rows = d_out.shape[0], f = d_out.shape[1];
    if (rows == 0 || f == 0) return;
    dispatch_dtype(in.dtype, [&](auto tag) {
      using T = kernels::device_t<tag.value>;
      cuda_detail::launch_rows<T>(f, {in.data, d_out.data, d_in.data}, [&](auto n) {
        constexpr int kN = decltype(n)::value;
        kernels::swiglu_backward_kernel<T, kN><<<cuda_detail::grid_of(rows * f / kN), kernels::kMoeThreads, 0, stream>>>(
            static_cast<const T*>(in.data), static_cast<const T*>(d_out.data), rows, f, static_cast<T*>(d_in.data));
      });
    });
    MOELORA_CUDA_CHECK(cudaGetLastError());
  }
};

/// Row blocks on the GPU: the block table is uploaded (from pageable memory, so the host waits for
/// the staging copy: the exchange that uses it has synchronised already) and one kernel moves every
/// row (`kernels::move_rows_kernel`).
template <>
class RowChunkMover<CudaBackend> {
 public:
  void move(ConstTensorRef in, const RowChunks& chunks, TensorRef out, cudaStream_t stream) {
    check_chunks(in, chunks, out);
    const std::size_t blocks = chunks.rows.size();
    const std::size_t row_bytes = static_cast<std::size_t>(in.shape[1]) * dtype_size(in.dtype);
    if (blocks == 0 || row_bytes == 0) return;
    // Table: first [blocks + 1], src [blocks], dst [blocks].
    table_.assign(chunks.first.begin(), chunks.first.end());
    table_.insert(table_.end(), chunks.src.begin(), chunks.src.end());
    table_.insert(table_.end(), chunks.dst.begin(), chunks.dst.end());
    device_table_.reserve(table_.size() * sizeof(std::int64_t));
    MOELORA_CUDA_CHECK(cudaMemcpyAsync(device_table_.data(), table_.data(), table_.size() * sizeof(std::int64_t),
                                       cudaMemcpyHostToDevice, stream));
    const auto* first = device_table_.as<const std::int64_t>();
    const auto launch = [&](auto vector) {
      using V = decltype(vector);
      const auto units = static_cast<std::int64_t>(row_bytes / sizeof(V));
      kernels::move_rows_kernel<V><<<cuda_detail::grid_of(chunks.total() * units), kernels::kMoeThreads, 0, stream>>>(
          static_cast<const V*>(in.data), first, first + blocks + 1, first + 2 * blocks + 1,
          static_cast<std::int32_t>(blocks), units, static_cast<V*>(out.data));
    };
    cuda_detail::dispatch_vector(row_bytes, {in.data, out.data}, launch);
    MOELORA_CUDA_CHECK(cudaGetLastError());
  }

 private:
  std::vector<std::int64_t> table_;  // host staging of the block table
  Buffer<CudaBackend> device_table_;
};

}  // namespace moelora::moe
