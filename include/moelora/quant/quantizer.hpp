/// \file
/// \brief The Quantizer concept (plug your own weight quantizer into a quantized base) and the
/// built-in FormatQuantizer<Backend>, specialised for the host (moelora/host/quantize.hpp) and
/// CUDA (moelora/cuda/quantize.hpp).
#pragma once

#include <concepts>
#include <cstddef>
#include <cstdint>
#include <string>

#include "moelora/concepts.hpp"
#include "moelora/core/error.hpp"
#include "moelora/core/tensor.hpp"
#include "moelora/quant/format.hpp"
#include "moelora/quant/packed.hpp"

namespace moelora::quant {

/// A weight quantizer over `[E, out, in]` expert weights in `backend_type`'s memory.
///
/// - `name()`: a readable name (the built-in one: `quant_spec_name`).
/// - `packed_bytes(experts, out, in)`: bytes of the packed form of such a weight.
/// - `quantize(w, packed, stream)`: calibrates and quantizes w `[E, out, in]` (bf16, fp16 or fp32)
///   into the packed blob `packed` (packed_bytes(E, out, in) bytes).
/// - `dequantize(packed, shape, e0, n, out, stream)`: from the packed form of a weight of `shape`
///   `[E, out, in]`, writes experts [e0, e0 + n) into `out` `[n, out, in]`, each value computed in
///   fp32 and rounded once to `out.dtype`.
/// - `fake_quantize(w, out, stream)`: `out = Q(w)` `[E, out, in]`, equal bit for bit to
///   dequantize(quantize(w)) of every expert; `out.dtype` may differ from `w.dtype`, and out may
///   alias w (same pointer, same dtype).
template <class Q>
concept Quantizer =
    Backend<typename Q::backend_type> &&
    requires(Q& q, const Q& cq, ConstTensorRef w, TensorRef out, void* packed, const void* cpacked, std::int64_t e0,
             std::int64_t n, typename Q::backend_type::stream_type s) {
      { cq.name() } -> std::convertible_to<std::string>;
      { cq.packed_bytes(std::int64_t{}, std::int64_t{}, std::int64_t{}) } -> std::same_as<std::size_t>;
      q.quantize(w, packed, s);
      q.dequantize(cpacked, Shape{}, e0, n, out, s);
      q.fake_quantize(w, out, s);
    };

/// How the ranks that hold slices of one weight share its tensor amax (INT8 per tensor, FP8,
/// NVFP4's global scale): a max all-reduce, in place, of `count` non-negative fp32 values in the
/// backend's memory, queued on `stream`, over the group that shares the amax (the TP group; the
/// TP × EP group when the amax is shared by all experts). `parallel::amax_sync(comm)` makes one.
/// Empty (the default): a rank's amax is its own.
template <class Backend>
struct AmaxSync {
  void (*fn)(void* context, float* amax, std::size_t count, typename Backend::stream_type stream) = nullptr;
  void* context = nullptr;

  explicit operator bool() const { return fn != nullptr; }
  void operator()(float* amax, std::size_t count, typename Backend::stream_type stream) const {
    fn(context, amax, count, stream);
  }
};

/// The amax synchronisation of a FormatQuantizer: with one set, every quantization (and fake
/// quantization) is collective over its group, and every rank must make the same calls.
template <class Backend>
class AmaxSharing {
 public:
  /// From now on the tensor amax is `sync`'s reduction over its group (see AmaxSync).
  void set_amax_sync(AmaxSync<Backend> sync) { amax_sync_ = sync; }
  [[nodiscard]] const AmaxSync<Backend>& amax_sync() const { return amax_sync_; }

 protected:
  AmaxSync<Backend> amax_sync_;
};

/// The built-in quantizer of DESIGN.md §5 for one QuantSpec, on `Backend`'s memory; include
/// moelora/host/quantize.hpp (HostBackend) or moelora/cuda/quantize.hpp (CudaBackend, nvcc).
/// Packed layout: `packed_layout` (moelora/quant/packed.hpp).
template <class Backend>
class FormatQuantizer;

/// What every FormatQuantizer specialisation shares: its validated spec and the packed layout
/// that follows from it.
class FormatQuantizerSpec {
 public:
  /// Throws ErrorCode::invalid_argument for a spec that `validate` rejects.
  explicit FormatQuantizerSpec(QuantSpec spec) : spec_(spec) { validate(spec_); }

  [[nodiscard]] const QuantSpec& spec() const { return spec_; }
  [[nodiscard]] std::string name() const { return quant_spec_name(spec_); }
  /// Layout of the packed form of a `[experts, out, in]` weight.
  [[nodiscard]] PackedLayout layout(std::int64_t experts, std::int64_t out, std::int64_t in) const {
    return packed_layout(spec_, experts, out, in);
  }
  [[nodiscard]] std::size_t packed_bytes(std::int64_t experts, std::int64_t out, std::int64_t in) const {
    return layout(experts, out, in).total_bytes;
  }

 protected:
  QuantSpec spec_;
};

/// Host-side checks of the arguments of quantizer calls, shared by the FormatQuantizer specialisations.
namespace checks {

/// A weight `[E, out, in]` with every extent ≥ 1 and data.
inline void check_weight(const ConstTensorRef& w, const char* what) {
  MOELORA_REQUIRE(w.shape.rank == 3, ErrorCode::shape_mismatch, what, " must be [E, out, in], got ", w.shape);
  check_weight_extents(w.shape[0], w.shape[1], w.shape[2]);
  MOELORA_REQUIRE(w.data != nullptr, ErrorCode::invalid_argument, what, " has no data");
}

/// fake_quantize: a valid weight and an output of its shape (in place only with the same dtype).
inline void check_fake_quantize(const ConstTensorRef& w, const TensorRef& out) {
  check_weight(w, "the weight to quantize");
  MOELORA_REQUIRE(out.shape == w.shape, ErrorCode::shape_mismatch, "fake_quantize output shape ", out.shape,
                  " differs from the weight's ", w.shape);
  MOELORA_REQUIRE(out.data != nullptr, ErrorCode::invalid_argument, "fake_quantize output has no data");
  MOELORA_REQUIRE(out.data != w.data || out.dtype == w.dtype, ErrorCode::dtype_mismatch,
                  "fake_quantize in place needs the output dtype to equal the weight's (", dtype_name(w.dtype),
                  "), got ", dtype_name(out.dtype));
}

/// dequantize: a valid packed shape, experts [e0, e0 + n) within it, an output `[n, out, in]`.
inline void check_dequantize(const void* packed, const Shape& shape, std::int64_t e0, std::int64_t n,
                             const TensorRef& out) {
  MOELORA_REQUIRE(shape.rank == 3, ErrorCode::shape_mismatch, "dequantize needs the packed weight's shape [E, out, in], got ",
                  shape);
  check_weight_extents(shape[0], shape[1], shape[2]);
  MOELORA_REQUIRE(packed != nullptr, ErrorCode::invalid_argument, "dequantize: the packed weight has no data");
  MOELORA_REQUIRE(e0 >= 0 && n >= 0 && e0 + n <= shape[0], ErrorCode::invalid_argument, "dequantize: experts [", e0,
                  ", ", e0 + n, ") are not within the ", shape[0], " experts of the packed weight");
  const Shape expected{n, shape[1], shape[2]};
  MOELORA_REQUIRE(out.shape == expected, ErrorCode::shape_mismatch, "dequantize output must be ", expected, ", got ",
                  out.shape);
  MOELORA_REQUIRE(n == 0 || out.data != nullptr, ErrorCode::invalid_argument, "dequantize output has no data");
}

}  // namespace checks

}  // namespace moelora::quant
