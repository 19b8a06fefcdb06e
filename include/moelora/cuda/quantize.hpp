/// \file
/// \brief FormatQuantizer<CudaBackend>: the quantizers of DESIGN.md §5 on the GPU, equal bit for
/// bit to the host's (moelora/host/quantize.hpp), packed bytes included.
///
/// Every call is queued on the caller's stream and never synchronises the host: the tensor amax
/// (INT8 per tensor, FP8, NVFP4) is reduced on the device into the quantizer's scratch (and, with
/// an AmaxSync, max-reduced over its group there) and read there by the quantize kernel. Bytes moved: quantize reads w twice with a tensor amax (once
/// without) and writes the packed blob; fake_quantize the same reads and writes out; dequantize
/// reads codes and scales and writes out.
#pragma once

#if !defined(__CUDACC__)
#error "moelora/cuda/quantize.hpp holds device code: compile this translation unit with nvcc"
#endif

#include <cuda_runtime.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <string>
#include <type_traits>

#include "moelora/core/buffer.hpp"
#include "moelora/core/error.hpp"
#include "moelora/core/tensor.hpp"
#include "moelora/cuda/backend.hpp"
#include "moelora/cuda/check.hpp"
#include "moelora/kernels/quantize.cuh"
#include "moelora/quant/codec.hpp"
#include "moelora/quant/packed.hpp"
#include "moelora/quant/quantizer.hpp"

namespace moelora::quant {

/// The CUDA quantizer: weights, packed blobs and outputs in device memory, work on the caller's
/// stream. It owns a small device scratch (4 bytes per expert) for the amax reduction, allocated
/// on the first call that needs it or by `reserve`; one instance must not run on two streams at
/// once.
template <>
class FormatQuantizer<CudaBackend> : public FormatQuantizerSpec, public AmaxSharing<CudaBackend> {
 public:
  using backend_type = CudaBackend;

  /// Throws ErrorCode::invalid_argument for a spec that `validate` rejects.
  explicit FormatQuantizer(QuantSpec spec = {}) : FormatQuantizerSpec(spec) {}

  /// Sizes the amax scratch for weights of up to `experts` experts, so that later calls allocate nothing.
  void reserve(std::int64_t experts) {
    amax_scratch_.reserve(static_cast<std::size_t>(std::max<std::int64_t>(experts, 1)) * sizeof(std::uint32_t));
  }

  /// Calibrates (max) and quantizes w `[E, out, in]` into `packed` (packed_bytes(E, out, in) bytes).
  void quantize(ConstTensorRef w, void* packed, cudaStream_t stream) {
    dispatch_dtype(w.dtype, [&](auto in) { quantize_tiled<kernels::DefaultQuantTiling, in.value>(w, packed, stream); });
  }

  /// Writes experts [e0, e0 + n) of the packed weight of shape `shape` `[E, out, in]` into out
  /// `[n, out, in]` (any dtype; values rounded once from fp32).
  void dequantize(const void* packed, Shape shape, std::int64_t e0, std::int64_t n, TensorRef out, cudaStream_t stream) {
    dispatch_dtype(out.dtype, [&](auto out_tag) {
      dequantize_tiled<kernels::DefaultQuantTiling, out_tag.value>(packed, shape, e0, n, out, stream);
    });
  }

  /// out = dequantize(quantize(w)) `[E, out, in]`, in one pass (plus the amax reduction); out may
  /// alias w.
  void fake_quantize(ConstTensorRef w, TensorRef out, cudaStream_t stream) {
    dispatch_dtype(w.dtype, [&](auto in) {
      dispatch_dtype(out.dtype, [&](auto out_tag) {
        fake_quantize_tiled<kernels::DefaultQuantTiling, in.value, out_tag.value>(w, out, stream);
      });
    });
  }

  /// quantize, dequantize and fake_quantize with the kernels' `Tiling` (a kernels::QuantTiling)
  /// and the dtypes as compile-time arguments (`In`: w's, `Out`: out's; a tensor of another dtype
  /// is an invalid_argument error): bench/sweep_quant.cu compares tilings through them.
  template <class Tiling, DType In>
  void quantize_tiled(ConstTensorRef w, void* packed, cudaStream_t stream) {
    checks::check_weight(w, "the weight to quantize");
    check_dtype(w.dtype, In, "the weight to quantize");
    MOELORA_REQUIRE(packed != nullptr, ErrorCode::invalid_argument, "quantize: the packed output has no data");
    run<Tiling, kernels::device_t<In>, void>(w, nullptr, packed, stream);
  }
  template <class Tiling, DType Out>
  void dequantize_tiled(const void* packed, Shape shape, std::int64_t e0, std::int64_t n, TensorRef out,
                        cudaStream_t stream) {
    checks::check_dequantize(packed, shape, e0, n, out);
    check_dtype(out.dtype, Out, "the dequantize output");
    if (n == 0) return;
    using OutT = kernels::device_t<Out>;
    const std::int64_t rows = shape[1], in = shape[2];
    const PackedLayout at = layout(shape[0], rows, in);
    const auto* blob = static_cast<const std::uint8_t*>(packed);
    const kernels::PackedSections<const std::uint8_t> sections{
        blob + at.codes.offset, at.scales.present() ? blob + at.scales.offset : nullptr,
        at.amax.present() ? reinterpret_cast<const float*>(blob + at.amax.offset) : nullptr};
    const kernels::QuantGeometry g = geometry(rows, in);
    const bool vec = in % kernels::kQuantChunk == 0 && aligned(packed, 16) && aligned(out.data, 16 * (Out == DType::fp32 ? 2 : 1));
    dispatch_scheme(spec_, [&](auto scheme) {
      const auto kernel = vec ? kernels::dequantize_kernel<scheme.value, true, OutT, Tiling>
                              : kernels::dequantize_kernel<scheme.value, false, OutT, Tiling>;
      const auto [grid, threads] = tile_grid(n * rows, in, 1, Tiling::kDequantizeSlabs, Tiling::kWarps);
      kernel<<<grid, threads, 0, stream>>>(sections, e0 * rows, g, static_cast<OutT*>(out.data));
      MOELORA_CUDA_CHECK(cudaGetLastError());
    });
  }
  template <class Tiling, DType In, DType Out>
  void fake_quantize_tiled(ConstTensorRef w, TensorRef out, cudaStream_t stream) {
    checks::check_fake_quantize(w, out);
    check_dtype(w.dtype, In, "the weight to quantize");
    check_dtype(out.dtype, Out, "the fake_quantize output");
    run<Tiling, kernels::device_t<In>, kernels::device_t<Out>>(w, out.data, nullptr, stream);
  }

 private:
  static bool aligned(const void* p, std::size_t bytes) { return reinterpret_cast<std::uintptr_t>(p) % bytes == 0; }
  static void check_dtype(DType got, DType want, const char* what) {
    MOELORA_REQUIRE(got == want, ErrorCode::invalid_argument, what, " is ", dtype_name(got), ", this call takes ",
                    dtype_name(want));
  }

  kernels::QuantGeometry geometry(std::int64_t rows_per_expert, std::int64_t in) const {
    const std::int64_t block = block_size(spec_.format);
    const std::int64_t groups = block ? (in + block - 1) / block : 1;
    return {rows_per_expert, in, groups, code_bits(spec_.format) == 8 ? in : (in + 1) / 2};
  }

  struct Launch {
    dim3 grid;
    unsigned threads;
  };
  /// Grid (rows, tiles along the row) of the group and dequantize kernels: a thread per 8-element
  /// chunk of each of `slabs` slabs of a tile, the chunks of a row rounded up to whole groups of
  /// `lanes` threads; blocks of 1 to `max_warps` warps, the number that launches the fewest warps
  /// per row (the largest on a tie), e.g. 2 of 4 for rows of 1792 chunks in 4 slabs (7 tiles of
  /// 256 chunks, not 3.5 of 512).
  static Launch tile_grid(std::int64_t rows, std::int64_t in, int lanes, int slabs, int max_warps) {
    const std::int64_t chunks = (in + kernels::kQuantChunk - 1) / kernels::kQuantChunk;
    const std::int64_t per_row = (chunks + lanes - 1) / lanes * lanes;
    const auto tiles = [&](std::int64_t warps) { return (per_row + 32 * warps * slabs - 1) / (32 * warps * slabs); };
    std::int64_t warps = max_warps;
    for (std::int64_t w = warps - 1; w >= 1; --w)
      if (tiles(w) * w < tiles(warps) * warps) warps = w;
    return {dim3(static_cast<unsigned>(rows), static_cast<unsigned>(tiles(warps))), static_cast<unsigned>(32 * warps)};
  }

  /// Reduces the tensor amax of w into the scratch (bits of |x|; slot 0 when shared).
  const std::uint32_t* reduce_amax(const ConstTensorRef& w, cudaStream_t stream) {
    const std::int64_t experts = w.shape[0], per_expert = w.shape[1] * w.shape[2];
    reserve(experts);
    auto* amax = amax_scratch_.as<std::uint32_t>();
    MOELORA_CUDA_CHECK(cudaMemsetAsync(amax, 0, static_cast<std::size_t>(experts) * sizeof(std::uint32_t), stream));
    const bool shared = spec_.amax_scope == AmaxScope::shared;
    const bool vec = per_expert % kernels::kQuantChunk == 0 && aligned(w.data, w.dtype == DType::fp32 ? 32 : 16);
    const std::int64_t per_block = std::int64_t{kernels::kAmaxThreads} * kernels::kQuantChunk * kernels::kAmaxUnroll;
    const std::int64_t blocks = std::clamp<std::int64_t>((per_expert + per_block - 1) / per_block, 1,
                                                         std::max<std::int64_t>(1, 2048 / experts));
    dispatch_dtype(w.dtype, [&](auto tag) {
      using T = kernels::device_t<tag.value>;
      const auto kernel = vec ? kernels::tensor_amax_kernel<true, T> : kernels::tensor_amax_kernel<false, T>;
      kernel<<<dim3(static_cast<unsigned>(blocks), static_cast<unsigned>(experts)), kernels::kAmaxThreads, 0, stream>>>(
          static_cast<const T*>(w.data), per_expert, amax, shared);
      MOELORA_CUDA_CHECK(cudaGetLastError());
    });
    // The max over the ranks that share the amax: bits of |x| order as the non-negative floats do.
    if (amax_sync_) amax_sync_(reinterpret_cast<float*>(amax), shared ? 1 : static_cast<std::size_t>(experts), stream);
    return amax;
  }

  /// Quantizes w (of device type In) into `packed` (Out = void) or fake-quantizes it into `out`
  /// (of device type Out).
  template <class Tiling, class In, class Out>
  void run(const ConstTensorRef& w, void* out, void* packed, cudaStream_t stream) {
    const std::int64_t experts = w.shape[0], rows = w.shape[1], in = w.shape[2];
    const std::uint32_t* tensor_amax = has_tensor_amax(spec_) ? reduce_amax(w, stream) : nullptr;
    const bool shared = spec_.amax_scope == AmaxScope::shared;
    kernels::PackedSections<std::uint8_t> sections{nullptr, nullptr, nullptr};
    if (packed) {
      const PackedLayout at = layout(experts, rows, in);
      auto* blob = static_cast<std::uint8_t*>(packed);
      sections = {blob + at.codes.offset, at.scales.present() ? blob + at.scales.offset : nullptr,
                  at.amax.present() ? reinterpret_cast<float*>(blob + at.amax.offset) : nullptr};
    }
    const kernels::QuantGeometry g = geometry(rows, in);
    const bool vec = in % kernels::kQuantChunk == 0 && aligned(w.data, std::is_same_v<In, float> ? 32 : 16) &&
                     (packed ? aligned(packed, 16) : aligned(out, std::is_same_v<Out, float> ? 32 : 16));
    auto* typed_out = static_cast<Out*>(out);
    dispatch_scheme(spec_, [&](auto scheme) {
      constexpr Scheme kScheme = scheme.value;
      if constexpr (kScheme == Scheme::int8_channel) {
        const auto kernel = vec ? kernels::quantize_channels_kernel<true, In, Out>
                                : kernels::quantize_channels_kernel<false, In, Out>;
        const std::int64_t chunks = (in + kernels::kQuantChunk - 1) / kernels::kQuantChunk;
        const std::int64_t per_thread = (chunks + kernels::kChannelKeep - 1) / kernels::kChannelKeep;
        const auto threads = static_cast<unsigned>(std::min<std::int64_t>(kernels::kChannelThreads, (per_thread + 31) / 32 * 32));
        kernel<<<static_cast<unsigned>(experts * rows), threads, 0, stream>>>(static_cast<const In*>(w.data), typed_out,
                                                                              sections, g);
      } else {
        constexpr int kLanes = kernels::SchemeLayout<kScheme>::kLanes;
        const auto kernel = vec ? kernels::quantize_groups_kernel<kScheme, true, In, Out, Tiling>
                                : kernels::quantize_groups_kernel<kScheme, false, In, Out, Tiling>;
        const auto [grid, threads] =
            tile_grid(experts * rows, in, kLanes, Tiling::template group_slabs<Out>, Tiling::kWarps);
        // After the amax pass: started while that pass ends (it waits for it before the amax).
        cuda_detail::launch_programmatic(tensor_amax != nullptr, kernel, grid, static_cast<int>(threads), 0, stream,
                                         static_cast<const In*>(w.data), typed_out, sections, tensor_amax, shared, g);
      }
      MOELORA_CUDA_CHECK(cudaGetLastError());
    });
  }

  Buffer<CudaBackend> amax_scratch_;
};

static_assert(Quantizer<FormatQuantizer<CudaBackend>>, "FormatQuantizer<CudaBackend> must model Quantizer");

}  // namespace moelora::quant
