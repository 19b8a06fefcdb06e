/// \file
/// \brief CudaBackend: device memory, stream-ordered work, and the host adapters that choose and
/// launch the LoRA kernels (tensor-core path, or the generic path where it does not apply).
///
/// Every operation is queued on the caller's stream; none synchronises the host except
/// `copy_to_host`, `synchronize` and `Workspace::check_counts`. Device code is compiled only by nvcc.
#pragma once

#if !defined(__CUDACC__)
#error "moelora/cuda/backend.hpp holds device code: compile this translation unit with nvcc"
#endif

#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <utility>
#include <vector>

#include "moelora/core/buffer.hpp"
#include "moelora/core/error.hpp"
#include "moelora/core/lora_args.hpp"
#include "moelora/core/segments.hpp"
#include "moelora/core/tensor.hpp"
#include "moelora/cuda/check.hpp"
#include "moelora/kernels/elementwise.cuh"
#include "moelora/kernels/lora_backward.cuh"
#include "moelora/kernels/lora_forward.cuh"
#include "moelora/kernels/lora_generic.cuh"
#include "moelora/kernels/optim.cuh"
#include "moelora/kernels/segments.cuh"
#include "moelora/optim/multi_tensor.hpp"

namespace moelora {

namespace cuda_detail {

/// Calls `f(in_tag, factor_tag)` with the compile-time io and factor dtypes.
template <class F>
void dispatch_io_and_factor(DType io, DType factor, F&& f) {
  dispatch_dtype(io, [&](auto io_tag) { dispatch_dtype(factor, [&](auto factor_tag) { f(io_tag, factor_tag); }); });
}

/// Calls `f(std::integral_constant<int, NFrag>)` for the rank tile that holds `rank` (≤ 128).
template <class F>
void dispatch_rank_tile(std::int64_t rank, F&& f) {
  if (rank <= 16) f(std::integral_constant<int, 1>{});
  else if (rank <= 32) f(std::integral_constant<int, 2>{});
  else if (rank <= 64) f(std::integral_constant<int, 4>{});
  else f(std::integral_constant<int, 8>{});
}

/// Calls `f(IoT, FT, NFrag)` (device element types as `std::type_identity`, NFrag as an
/// integral constant) for the tensor-core kernels: 16-bit factors, rank ≤ 128.
template <class F>
void dispatch_tensor_core(DType io, DType factor, std::int64_t rank, F&& f) {
  dispatch_io_and_factor(io, factor, [&]([[maybe_unused]] auto io_tag, auto factor_tag) {
    if constexpr (factor_tag.value != DType::fp32)
      dispatch_rank_tile(rank, [&](auto nfrag) {
        f(std::type_identity<kernels::device_t<io_tag.value>>{}, std::type_identity<kernels::device_t<factor_tag.value>>{},
          nfrag);
      });
  });
}

inline bool aligned(const void* p, std::size_t bytes) { return reinterpret_cast<std::uintptr_t>(p) % bytes == 0; }

/// Whether the tensor-core kernels serve this problem (else the generic kernels do).
inline bool tensor_core_path(const LoraShape& s, const FactorsRef& f, std::initializer_list<const void*> io,
                             std::initializer_list<const void*> factor) {
  if (f.dtype == DType::fp32 || f.rank > 128 || f.rank % 8 || s.in % 8 || s.out % 8) return false;
  const std::size_t io_alignment = s.io_dtype == DType::fp32 ? 32 : 16;
  for (const void* p : io)
    if (p && !aligned(p, io_alignment)) return false;
  for (const void* p : factor)
    if (p && !aligned(p, 16)) return false;
  return true;
}

/// Launches `kernel` with `smem` bytes of dynamic shared memory, raising the kernel's limit first.
/// `programmatic`: as a programmatic dependent of the kernel queued before it on `stream`, which
/// lets it start while that kernel's last blocks run; it must then wait for them
/// (`kernels::wait_for_prerequisites`) before it reads what they write.
template <class Kernel, class... Args>
void launch_programmatic(bool programmatic, Kernel kernel, dim3 grid, int threads, int smem, cudaStream_t stream,
                         const Args&... args) {
  if (grid.x == 0 || grid.y == 0) return;
  if (smem > 48 * 1024)
    MOELORA_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
  cudaLaunchAttribute dependent{};
  dependent.id = cudaLaunchAttributeProgrammaticStreamSerialization;
  dependent.val.programmaticStreamSerializationAllowed = 1;
  cudaLaunchConfig_t config{};
  config.gridDim = grid;
  config.blockDim = dim3(static_cast<unsigned>(threads));
  config.dynamicSmemBytes = static_cast<std::size_t>(smem);
  config.stream = stream;
  config.attrs = &dependent;
  config.numAttrs = programmatic ? 1 : 0;
  MOELORA_CUDA_CHECK(cudaLaunchKernelEx(&config, kernel, args...));
}

/// Launches `kernel` in stream order (see launch_programmatic).
template <class Kernel, class... Args>
void launch(Kernel kernel, dim3 grid, int threads, int smem, cudaStream_t stream, const Args&... args) {
  launch_programmatic(false, kernel, grid, threads, smem, stream, args...);
}

/// Grid of a grid-stride element-wise kernel over `count` elements.
inline dim3 elementwise_grid(std::int64_t count) {
  return dim3(static_cast<unsigned>(std::clamp<std::int64_t>((count + 255) / 256, 1, 65535 * 8)));
}

}  // namespace cuda_detail

/// The CUDA backend (memory: device; stream: `cudaStream_t`).
struct CudaBackend {
  using stream_type = cudaStream_t;
  static constexpr Memory memory = Memory::device;

  static void* allocate(std::size_t bytes) {
    void* p = nullptr;
    MOELORA_CUDA_CHECK(cudaMalloc(&p, bytes));
    return p;
  }
  static void deallocate(void* p) noexcept { cudaFree(p); }
  static void copy(void* dst, const void* src, std::size_t bytes, cudaStream_t stream) {
    if (bytes) MOELORA_CUDA_CHECK(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToDevice, stream));
  }
  /// `height` rows of `width` bytes from `src` (rows `src_pitch` bytes apart) to `dst` (`dst_pitch` apart).
  static void copy_2d(void* dst, std::size_t dst_pitch, const void* src, std::size_t src_pitch, std::size_t width,
                      std::size_t height, cudaStream_t stream) {
    if (width && height)
      MOELORA_CUDA_CHECK(
          cudaMemcpy2DAsync(dst, dst_pitch, src, src_pitch, width, height, cudaMemcpyDeviceToDevice, stream));
  }
  /// Device → host; returns when the data is on the host (synchronises `stream`).
  static void copy_to_host(void* host_dst, const void* src, std::size_t bytes, cudaStream_t stream) {
    if (!bytes) return;
    MOELORA_CUDA_CHECK(cudaMemcpyAsync(host_dst, src, bytes, cudaMemcpyDeviceToHost, stream));
    MOELORA_CUDA_CHECK(cudaStreamSynchronize(stream));
  }
  /// Host → device; returns when the data is on the device (synchronises `stream`).
  static void copy_from_host(void* dst, const void* host_src, std::size_t bytes, cudaStream_t stream) {
    if (!bytes) return;
    MOELORA_CUDA_CHECK(cudaMemcpyAsync(dst, host_src, bytes, cudaMemcpyHostToDevice, stream));
    MOELORA_CUDA_CHECK(cudaStreamSynchronize(stream));
  }
  static void fill_zero(void* data, std::size_t bytes, cudaStream_t stream) {
    if (bytes) MOELORA_CUDA_CHECK(cudaMemsetAsync(data, 0, bytes, stream));
  }
  static void synchronize(cudaStream_t stream) { MOELORA_CUDA_CHECK(cudaStreamSynchronize(stream)); }

  /// Per-layer device scratch: counts, offsets, the two tile schedules, the count status word and
  /// the backward's `u` scratch. Grows when a call needs more (an allocation only then);
  /// `GroupedLoRA::reserve` pre-sizes it.
  class Workspace {
   public:
    /// Scans `counts` on `stream` into offsets and schedules. Host counts (already validated) are
    /// uploaded and their offsets also kept on the host; device counts are validated by the scan
    /// kernel, which records a bad count in the status word (see `check_counts`) and leaves an
    /// empty schedule, so that no kernel reads or writes out of bounds.
    const ExpertSegments& prepare_segments(const ExpertCounts& counts, std::int64_t rows, cudaStream_t stream) {
      const std::int64_t experts = counts.size;
      reserve_experts(experts);
      if (!status_.data()) {
        status_ = Buffer<CudaBackend>(sizeof(std::uint32_t));
        fill_zero(status_.data(), status_.bytes(), stream);
      }
      ExpertCounts scanned = counts;
      const std::int64_t* host_offsets = nullptr;
      if (counts.memory == Memory::host) {
        // Staged through pageable host memory, so the copy has left it when cudaMemcpyAsync returns.
        host_counts_.resize(static_cast<std::size_t>(experts));
        host_offsets_.assign(static_cast<std::size_t>(experts) + 1, 0);
        for (std::int64_t e = 0; e < experts; ++e) {
          host_counts_[static_cast<std::size_t>(e)] = counts.at(e);
          host_offsets_[static_cast<std::size_t>(e) + 1] = host_offsets_[static_cast<std::size_t>(e)] + counts.at(e);
        }
        host_offsets = host_offsets_.data();
        MOELORA_CUDA_CHECK(cudaMemcpyAsync(counts_.data(), host_counts_.data(), static_cast<std::size_t>(experts) * 8,
                                           cudaMemcpyHostToDevice, stream));
        scanned = {counts_.data(), IndexType::int64, experts, Memory::device};
      }
      auto* tile_offsets = tiles_.as<std::int32_t>();
      const auto launch_scan = [&](auto* typed_counts) {
        kernels::scan_counts_kernel<std::remove_cvref_t<decltype(*typed_counts)>, kernels::kForwardRows,
                                    kernels::kGroupRows>
            <<<1, kernels::kScanThreads, 0, stream>>>(typed_counts, static_cast<std::int32_t>(experts), rows,
                                                      counts.padded, offsets_.as<std::int64_t>(), tile_offsets,
                                                      tile_offsets + capacity_experts_, status_.as<std::uint32_t>());
      };
      if (scanned.index_type == IndexType::int32) launch_scan(static_cast<const std::int32_t*>(scanned.data));
      else launch_scan(static_cast<const std::int64_t*>(scanned.data));
      MOELORA_CUDA_CHECK(cudaGetLastError());
      segments_ = {offsets_.as<std::int64_t>(), host_offsets, experts, rows};
      return segments_;
    }

    [[nodiscard]] const ExpertSegments& segments() const { return segments_; }
    /// Schedule of kForwardRows-row tiles.
    [[nodiscard]] kernels::TileSchedule row_tiles() const {
      return {segments_.offsets, tiles_.as<std::int32_t>(), static_cast<std::int32_t>(segments_.num_experts)};
    }
    /// Schedule of kGroupRows-row groups.
    [[nodiscard]] kernels::TileSchedule row_groups() const {
      return {segments_.offsets, tiles_.as<std::int32_t>() + capacity_experts_,
              static_cast<std::int32_t>(segments_.num_experts)};
    }

    /// Sizes the scratch for calls of up to `rows` rows over `experts` experts with ranks up to
    /// `max_rank`.
    void reserve(std::int64_t rows, std::int64_t experts, std::int64_t max_rank) {
      reserve_experts(experts);
      scratch(2 * rows * max_rank);
    }

    /// Multiprocessors of the current device (queried once).
    int multiprocessors() {
      if (multiprocessors_ == 0) {
        int device = 0;
        MOELORA_CUDA_CHECK(cudaGetDevice(&device));
        MOELORA_CUDA_CHECK(cudaDeviceGetAttribute(&multiprocessors_, cudaDevAttrMultiProcessorCount, device));
      }
      return multiprocessors_;
    }

    /// Zeroed counters for ordered gradient adds (kernels::GradOrder) of the x pass (`x_slices`
    /// column slices) and of the dB pass (`b_slices`) over `experts` experts, on `stream`.
    std::pair<kernels::GradOrder, kernels::GradOrder> grad_orders(std::int64_t experts, std::int64_t x_slices,
                                                                  std::int64_t b_slices, cudaStream_t stream) {
      const auto count = static_cast<std::size_t>(2 + experts * (x_slices + b_slices));
      orders_.reserve(count * sizeof(unsigned));
      fill_zero(orders_.data(), count * sizeof(unsigned), stream);
      unsigned* c = orders_.as<unsigned>();
      return {{c, c + 2}, {c + 1, c + 2 + experts * x_slices}};
    }

    /// An fp32 scratch of at least `count` elements, valid until the next call that asks for one.
    float* scratch(std::int64_t count) {
      scratch_.reserve(static_cast<std::size_t>(count) * sizeof(float));
      return scratch_.as<float>();
    }

    /// Synchronises `stream` and throws ErrorCode::bad_counts if any device `tokens_per_expert`
    /// scanned since the last check had a negative entry or a sum different from the row count
    /// (larger than it, for padded counts); the calls that saw them computed nothing. Resets the status.
    void check_counts(cudaStream_t stream) {
      if (!status_.data()) return;
      std::uint32_t status = 0;
      copy_to_host(&status, status_.data(), sizeof status, stream);
      fill_zero(status_.data(), status_.bytes(), stream);
      MOELORA_REQUIRE(status == kernels::kCountsOk, ErrorCode::bad_counts, "device tokens_per_expert ",
                      (status & kernels::kNegativeCount) ? "had a negative entry" : "",
                      (status == (kernels::kNegativeCount | kernels::kWrongSum)) ? " and " : "",
                      (status & kernels::kWrongSum) ? "did not sum to the number of rows (padded: summed to more)" : "");
    }

   private:
    void reserve_experts(std::int64_t experts) {
      if (experts + 1 <= capacity_experts_) return;
      capacity_experts_ = experts + 1;
      counts_ = Buffer<CudaBackend>(static_cast<std::size_t>(capacity_experts_) * 8);
      offsets_ = Buffer<CudaBackend>(static_cast<std::size_t>(capacity_experts_) * 8);
      tiles_ = Buffer<CudaBackend>(static_cast<std::size_t>(capacity_experts_) * 8);
    }

    std::int64_t capacity_experts_ = 0;
    int multiprocessors_ = 0;
    Buffer<CudaBackend> counts_, offsets_, tiles_, status_, scratch_, orders_;
    std::vector<std::int64_t> host_counts_, host_offsets_;
    ExpertSegments segments_;
  };

  static void lora_forward(const LoraForwardArgs& args, Workspace& workspace, cudaStream_t stream) {
    using namespace kernels;
    const LoraShape& s = args.shape;
    const FactorsRef& f = args.factors;
    if (cuda_detail::tensor_core_path(s, f, {args.x, args.y}, {f.a, f.b, args.h})) {
      cuda_detail::dispatch_tensor_core(s.io_dtype, f.dtype, f.rank, [&](auto io, auto ft, auto nfrag) {
        lora_forward_tensor_core<typename decltype(io)::type, typename decltype(ft)::type, decltype(nfrag)::value>(
            args, workspace, stream);
      });
      return;
    }
    GenericParams p = generic_params(s, f, workspace);
    p.x = args.x, p.h = args.h, p.y = args.y, p.h_sums = args.h_sums;
    p.add_y = args.y_mode == WriteMode::accumulate;
    const std::int64_t tr = s.rows * f.rank;
    if (!args.y && !p.h_sums) p.h_sums = workspace.scratch(tr);  // the projection alone: h = round(scale · sums)
    cuda_detail::dispatch_io_and_factor(s.io_dtype, f.dtype, [&]([[maybe_unused]] auto io, auto ft) {
      using IoT = device_t<io.value>;
      using FT = device_t<ft.value>;
      cuda_detail::launch(generic_shrink_kernel<IoT, FT>, cuda_detail::elementwise_grid(tr), 256, 0, stream, p);
      if (!args.y) {
        cuda_detail::launch(round_scaled_kernel<FT>, cuda_detail::elementwise_grid(tr), 256, 0, stream,
                            static_cast<const float*>(p.h_sums), static_cast<FT*>(args.h), tr, f.scale);
        return;
      }
      cuda_detail::launch(generic_expand_kernel<IoT, FT>, cuda_detail::elementwise_grid(s.rows * s.out), 256, 0,
                          stream, p);
    });
  }

  /// The forward on the tensor-core kernels, for activations of device type IoT, factors of FT and
  /// rank tile NFrag (`args` must pass `cuda_detail::tensor_core_path`, rank ≤ 16·NFrag): the
  /// projection `h = round(A_e x)`, then the expand `y (+)= scale · B_e h` (y null: the projection
  /// alone, `h = round(scale · A_e x)`). `Tuning`: the kernels' tilings and launch rules
  /// (bench/sweep_lora.cu instantiates alternatives to measure them).
  template <class IoT, class FT, int NFrag, kernels::ForwardTuning Tuning = kernels::DefaultForwardTuning>
  static void lora_forward_tensor_core(const LoraForwardArgs& args, Workspace& workspace, cudaStream_t stream) {
    using namespace kernels;
    const LoraShape& s = args.shape;
    const FactorsRef& f = args.factors;
    const std::int64_t expand_blocks =
        max_tiles(s.rows, s.experts, kForwardRows) * ((s.out + kExpandCols - 1) / kExpandCols);
    MOELORA_REQUIRE(expand_blocks <= std::numeric_limits<std::int32_t>::max(), ErrorCode::unsupported,
                    "the CUDA forward launches up to 2^31 - 1 blocks of 128 rows × 128 columns; this call has ", s.rows,
                    " rows over ", s.experts, " experts and ", s.out, " output columns");
    // At most two K slices: two fp32 addends onto zero sum the same in either order, so the
    // forward stays deterministic. A row-parallel layer keeps the fp32 sums (its partial h).
    project<IoT, FT, NFrag, false, typename Tuning::template project<NFrag>, Tuning::kFillWave>(
        args.x, f.a, static_cast<FT*>(args.h), s.in, f.rank, args.y ? 1.0f : f.scale, 2, workspace, stream,
        args.h_sums, args.h_sums != nullptr);
    if (!args.y) return;
    cuda_detail::launch_programmatic(
        Tuning::kOverlap, lora_expand_kernel<IoT, FT, NFrag, typename Tuning::template expand<NFrag>>,
        dim3(static_cast<unsigned>(expand_blocks)), kExpandThreads, expand_smem_bytes<NFrag, IoT>(), stream,
        ExpandParams{args.h, f.b, args.y, workspace.row_tiles(), s.out, static_cast<std::int32_t>(f.rank), f.scale,
                     args.y_mode == WriteMode::accumulate});
  }

  static void lora_backward(const LoraBackwardArgs& args, Workspace& workspace, cudaStream_t stream) {
    using namespace kernels;
    const LoraShape& s = args.shape;
    const FactorsRef& f = args.factors;
    MOELORA_REQUIRE(!args.u || !args.dx, ErrorCode::invalid_argument,
                    "a LoRA backward that hands u to the caller leaves dx to it: pass dx null");
    const bool needs_u = args.grad_a || args.dx || args.u;
    const bool reduce_u = args.reduce_u && args.grad_a;  // column-parallel: dA needs the group's sum of u
    const bool add_grads = args.grad_mode == WriteMode::accumulate, add_dx = args.dx_mode == WriteMode::accumulate;
    const std::int64_t tr = s.rows * f.rank;
    // The fp32 scratch [2·T·r]: the tensor-core path keeps the rounded u (16-bit factors) in
    // floats [0, T·r/2), a second rounded [T, r] array (a column-parallel layer's reduced u, or a
    // row-parallel layer's full h) in [T·r/2, T·r), and fp32 sums (of a projection computed in
    // slices, or a column-parallel layer's partial u) in [T·r, 2·T·r). The generic path keeps the
    // fp32 u in [0, T·r) and the reduced u, or the rounded full h, in [T·r, 2·T·r).
    float* scratch = needs_u || args.h_sums ? workspace.scratch(2 * tr) : nullptr;
    float* u = needs_u ? scratch : nullptr;
    if (cuda_detail::tensor_core_path(s, f, {args.x, args.dy, args.dx}, {f.a, f.b, args.h, args.u})) {
      const auto groups = static_cast<unsigned>(max_tiles(s.rows, s.experts, kGroupRows));
      MOELORA_REQUIRE(groups <= 65535, ErrorCode::unsupported, "the CUDA backward handles up to 65535 row groups of ",
                      kGroupRows, " rows; this call has ", s.rows, " rows over ", s.experts, " experts");
      cuda_detail::dispatch_tensor_core(s.io_dtype, f.dtype, f.rank, [&](auto io, auto ft, auto nfrag) {
        using IoT = typename decltype(io)::type;
        using FT = typename decltype(ft)::type;
        constexpr int kNFrag = decltype(nfrag)::value;
        FT* u_rounded = args.u ? static_cast<FT*>(args.u) : reinterpret_cast<FT*>(scratch);  // round(scale · B_eᵀ dy) [T, r]
        FT* second = reinterpret_cast<FT*>(scratch) + tr;      // the reduced u, or the full h [T, r]
        float* sums = scratch + tr;                            // fp32 sums [T, r]
        const auto in_slices = static_cast<unsigned>((s.in + kChunk - 1) / kChunk);
        const auto out_slices = static_cast<unsigned>((s.out + kGradBCols - 1) / kGradBCols);
        std::pair<GradOrder, GradOrder> orders{};  // null: atomic adds
        if (args.ordered_grads && (args.grad_a || args.grad_b))
          orders = workspace.grad_orders(s.experts, in_slices, out_slices, stream);
        if (!add_grads && (args.grad_a || args.grad_b)) {
          const std::int64_t slice_a = f.rank * s.in, slice_b = s.out * f.rank;
          const auto chunks = static_cast<unsigned>((std::max(slice_a, slice_b) + 1023) / 1024);
          cuda_detail::launch(zero_unowned_grads_kernel<kGroupRows>, dim3(chunks, static_cast<unsigned>(s.experts)),
                              256, 0, stream, args.grad_a, slice_a, args.grad_b, slice_b, workspace.segments().offsets);
        }
        // u and dB in one grid (lora_dy_pass_kernel) where that pays, u needs no K slices or kept
        // sums and dB adds in any order; else one kernel each.
        const bool dy_pass = dy_pass_pays<kNFrag>(s.out) && needs_u && args.grad_b && !reduce_u && !orders.second.ticket &&
                             project_slices<UProjectionTiling<kNFrag>, false>(s.out, s.out, workspace) == 1;
        if (needs_u && !dy_pass)
          project<IoT, FT, kNFrag, true>(args.dy, f.b, u_rounded, s.out, f.rank, f.scale, s.out, workspace, stream,
                                         sums, reduce_u);
        if (args.grad_b) {
          const void* h = args.h;
          if (args.h_sums) {  // row-parallel: dB uses round(Σ_k h_k), or round(scale · Σ_k h_k)
            cuda_detail::launch(round_scaled_kernel<FT>, cuda_detail::elementwise_grid(tr), 256, 0, stream,
                                args.h_sums, second, tr, args.h_sums_scale());
            h = second;
          }
          const GradBParams grad_b{args.dy, h, args.grad_b, workspace.row_groups(), s.out,
                                   static_cast<std::int32_t>(f.rank), args.grad_b_scale(), add_grads, orders.second};
          if (dy_pass) {
            const ProjectParams u{args.dy, f.b,  u_rounded, workspace.row_tiles(), s.out,
                                  s.out,   static_cast<std::int32_t>(f.rank), f.scale};
            cuda_detail::launch(lora_dy_pass_kernel<IoT, FT, kNFrag>,
                                dim3(groups * (kDyPassProjectBlocks + out_slices)), kGradBThreads,
                                dy_pass_smem_bytes<kNFrag>(), stream, u, grad_b);
          } else {
            cuda_detail::launch(lora_grad_b_kernel<IoT, FT, kNFrag>, dim3(out_slices, groups), kGradBThreads,
                                GradBLayout<kNFrag>{}.bytes, stream, grad_b);
          }
        }
        if (!args.grad_a && !args.dx) return;
        BackwardXParams params{args.x,  f.a,   u_rounded, u_rounded, args.dx,       args.grad_a, workspace.row_groups(),
                               s.in,    static_cast<std::int32_t>(f.rank), add_dx,    add_grads, orders.first};
        if (!reduce_u) {
          cuda_detail::launch(lora_backward_x_kernel<IoT, FT, kNFrag>, dim3(in_slices, groups), kBackwardThreads,
                              BackwardXLayout<kNFrag, IoT>{}.bytes, stream, params);
          return;
        }
        args.reduce_u(sums, static_cast<std::size_t>(tr));
        cuda_detail::launch(round_scaled_kernel<FT>, cuda_detail::elementwise_grid(tr), 256, 0, stream,
                            static_cast<const float*>(sums), second, tr, f.scale);
        params.u_grad_a = second;
        cuda_detail::launch(lora_backward_x_kernel<IoT, FT, kNFrag, true>, dim3(in_slices, groups), kBackwardThreads,
                            BackwardXLayout<kNFrag, IoT, true>{}.bytes, stream, params);
      });
      return;
    }
    GenericParams p = generic_params(s, f, workspace);
    p.x = args.x, p.dy = args.dy, p.u = u, p.dx = args.dx, p.grad_a = args.grad_a, p.grad_b = args.grad_b;
    p.add_dx = add_dx, p.add_grads = add_grads;
    p.h = const_cast<void*>(args.h);  // read only in the backward kernels
    cuda_detail::dispatch_io_and_factor(s.io_dtype, f.dtype, [&]([[maybe_unused]] auto io, auto ft) {
      using IoT = device_t<io.value>;
      using FT = device_t<ft.value>;
      const auto grid = cuda_detail::elementwise_grid;
      if (args.grad_b) {
        if (args.h_sums) {  // row-parallel: dB uses round(Σ_k h_k) (or of scale · Σ), behind u in the scratch
          FT* h = reinterpret_cast<FT*>(scratch + tr);
          cuda_detail::launch(round_scaled_kernel<FT>, grid(tr), 256, 0, stream, args.h_sums, h, tr,
                              args.h_sums_scale());
          p.h = h;
        }
        GenericParams grad_b = p;
        grad_b.scale = args.grad_b_scale();
        cuda_detail::launch(generic_grad_b_kernel<IoT, FT>, grid(s.experts * s.out * f.rank), 256, 0, stream, grad_b);
      }
      if (!needs_u) return;
      cuda_detail::launch(generic_u_kernel<IoT, FT>, grid(s.rows * f.rank), 256, 0, stream, p);
      if (args.u)
        cuda_detail::launch(round_scaled_kernel<FT>, grid(tr), 256, 0, stream, static_cast<const float*>(u),
                            static_cast<FT*>(args.u), tr, f.scale);
      if (args.dx) cuda_detail::launch(generic_dx_kernel<IoT, FT>, grid(s.rows * s.in), 256, 0, stream, p);
      if (!args.grad_a) return;
      if (reduce_u) {  // column-parallel: dA from the group's sum of u, a copy behind this rank's partial one
        float* reduced = u + tr;
        copy(reduced, u, static_cast<std::size_t>(tr) * sizeof(float), stream);
        args.reduce_u(reduced, static_cast<std::size_t>(tr));
        p.u_grad_a = reduced;
      }
      cuda_detail::launch(generic_grad_a_kernel<IoT, FT>, grid(s.experts * f.rank * s.in), 256, 0, stream, p);
    });
  }

  static void kaiming_init(const KaimingInitArgs& args, cudaStream_t stream) {
    const float bound = std::sqrt(6.0f / static_cast<float>(args.fan_in()));
    const std::int64_t count = args.experts * args.rank * args.in;
    dispatch_dtype(args.dtype, [&](auto tag) {
      using FT = kernels::device_t<tag.value>;
      cuda_detail::launch(kernels::kaiming_uniform_kernel<FT>, cuda_detail::elementwise_grid(count), 256, 0, stream,
                          args, count, bound);
    });
    fill_zero(args.b, static_cast<std::size_t>(args.experts * args.out * args.rank) * dtype_size(args.dtype), stream);
  }

  /// The optimizer's passes (optim/multi_tensor.hpp; kernels in kernels/optim.cuh).
  static void optim_grad_stats(const OptimBatch& batch, cudaStream_t stream) {
    const dim3 grid(static_cast<unsigned>(optim_blocks(batch.chunk_count)));
    cuda_detail::launch(kernels::optim_stats_kernel<kernels::kOptimThreads>, grid, kernels::kOptimThreads, 0, stream, batch);
  }
  static void optim_finish_stats(const OptimBatch& batch, cudaStream_t stream) {
    cuda_detail::launch(kernels::optim_finish_kernel<1>, dim3(1), 1, 0, stream, batch);
  }
  /// With statistics, the update follows their pass (or the decision) as a programmatic dependent.
  static void optim_update(const OptimBatch& batch, cudaStream_t stream) {
    const dim3 grid(static_cast<unsigned>(optim_blocks(batch.chunk_count)));
    cuda_detail::launch_programmatic(batch.use_stats, kernels::optim_update_kernel<kernels::kOptimThreads>, grid,
                                     kernels::kOptimThreads, 0, stream, batch);
  }

 private:
  /// The K slices `project` splits a projection over K = `k` columns into (see there).
  template <class Tiling, bool FillWave, int NFrag = 1, bool FactorKMajor = true>
  static std::int64_t project_slices(std::int64_t k, std::int64_t max_slices, Workspace& workspace) {
    using namespace kernels;
    const ExpertSegments& seg = workspace.segments();
    const std::int64_t sms = workspace.multiprocessors();
    const std::int64_t slots = max_tiles(seg.rows, seg.num_experts, kForwardRows);
    std::int64_t slices = 1;
    if constexpr (FillWave) {
      const std::int64_t least_blocks = std::max<std::int64_t>(1, (seg.rows + kForwardRows - 1) / kForwardRows) * Tiling::kParts;
      slices = sms * Tiling::template blocks_per_sm<NFrag, FactorKMajor> / least_blocks;
    } else {
      slices = (2 * sms + slots * Tiling::kParts - 1) / (slots * Tiling::kParts);
    }
    return std::clamp<std::int64_t>(slices, 1, std::min(max_slices, (k + 511) / 512));
  }

  /// out `[T, r]` = round(scale · Σ_k in[t, k] · F_e(k, ·)) (lora_project_kernel with `Tiling`) over
  /// K = `k` columns, split into up to `max_slices` slices of at least 512 columns: when the row
  /// tiles give fewer than two blocks an SM, as few as bring them to two; with `FillWave`, as many as
  /// still fit one wave of resident blocks (counting the tiles T rows need at least). Sliced sums
  /// are added atomically into fp32 `sums` `[T, r]` (default: the workspace scratch) and then rounded.
  /// `keep_sums`: the unscaled fp32 sums are always computed into `sums` (a tensor-parallel partial
  /// sum), however many slices.
  template <class IoT, class FT, int NFrag, bool FactorKMajor, class Tiling = kernels::UProjectionTiling<NFrag>,
            bool FillWave = false>
  static void project(const void* in, const void* factor, FT* out, std::int64_t k, std::int64_t rank, float scale,
                      std::int64_t max_slices, Workspace& workspace, cudaStream_t stream, float* sums = nullptr,
                      bool keep_sums = false) {
    using namespace kernels;
    const ExpertSegments& seg = workspace.segments();
    constexpr int kSmem = Tiling::template smem_bytes<NFrag, FactorKMajor>();
    const std::int64_t slots = max_tiles(seg.rows, seg.num_experts, kForwardRows);
    const std::int64_t slices =
        project_slices<Tiling, FillWave, NFrag, FactorKMajor>(k, max_slices, workspace);
    const std::int64_t split = ((k + slices - 1) / slices + Tiling::kCols - 1) / Tiling::kCols * Tiling::kCols;
    const auto grid_slices = static_cast<unsigned>((k + split - 1) / split);
    const dim3 grid(static_cast<unsigned>(slots), grid_slices, Tiling::kParts);
    const ProjectParams params{in, factor, out, workspace.row_tiles(), k, split, static_cast<std::int32_t>(rank), scale};
    if (grid_slices == 1 && !keep_sums) {
      cuda_detail::launch(lora_project_kernel<IoT, FT, NFrag, FactorKMajor, FT, Tiling>, grid, Tiling::kThreads, kSmem,
                          stream, params);
      return;
    }
    const std::int64_t count = seg.rows * rank;
    if (!sums) sums = workspace.scratch(count);
    fill_zero(sums, static_cast<std::size_t>(count) * sizeof(float), stream);
    ProjectParams sliced = params;
    sliced.out = sums;
    cuda_detail::launch(lora_project_kernel<IoT, FT, NFrag, FactorKMajor, float, Tiling>, grid, Tiling::kThreads, kSmem,
                        stream, sliced);
    cuda_detail::launch(round_scaled_kernel<FT>, cuda_detail::elementwise_grid(count), 256, 0, stream,
                        static_cast<const float*>(sums), out, count, scale);
  }

  static kernels::GenericParams generic_params(const LoraShape& s, const FactorsRef& f, const Workspace& workspace) {
    kernels::GenericParams p{};
    p.offsets = workspace.segments().offsets;
    p.experts = static_cast<std::int32_t>(s.experts);
    p.rows = s.rows, p.in = s.in, p.out = s.out;
    p.rank = static_cast<std::int32_t>(f.rank);
    p.scale = f.scale;
    p.a = f.a, p.b = f.b;
    return p;
  }
};

}  // namespace moelora
