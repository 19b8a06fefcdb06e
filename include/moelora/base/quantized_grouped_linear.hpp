/// \file
/// \brief QuantizedGroupedLinear<Backend, Q>: a frozen grouped base that owns its expert weights and
/// computes with their quantized form ("quantize, then LoRA"), storing what the format needs.
///
/// Storage per base (E experts of `[out, in]`, weights of dtype D):
/// - the quantizer's packed blob (codes + scales + amax; `packed_bytes()`, see docs/quantization.md:
///   NVFP4 ≈ 0.5625 byte per weight, INT8 ≈ 1, ...);
/// - the source weights W `[E, out, in]` in D, kept for the SVD-based initialisers and for
///   re-quantization until `release_source()` (a base without a quantizer computes with them);
/// - a dequantization scratch of at most `dequant_budget` bytes (default 256 MiB): experts are
///   dequantized into it a chunk at a time, in D, and multiplied by the backend's GroupedGemm. When
///   the whole weight fits, it is dequantized once and stays resident until the weights change
///   (set_weight, set_effective_weight, restore_packed, set_dequant_budget);
/// - with an input quantizer, a `[T, in]` scratch for Q(x).
///
/// `reserve(rows)` sizes both scratches, so that calls of up to `rows` rows allocate nothing. With
/// device counts (and the sync-free sm90 GEMM on the GPU) no call synchronises the host: every chunk
/// is dequantized, since which chunks have rows is known only on the device.
///
/// Forward `y_t = Q(W)_e · Qin(x_t)`; backward_input `dx_t = Q(W)_eᵀ dy_t` (the input quantizer is
/// passed straight through); each overwrites its output or adds into it (`WriteMode`), optionally
/// plus a LowRankAddend in the same accumulator (the expand of the first adapter). The LoRA
/// branch of GroupedLoRA sees the raw x and its own factors.
#pragma once

#include <algorithm>
#include <concepts>
#include <cstdint>
#include <optional>
#include <utility>

#include "moelora/base/grouped_gemm.hpp"
#include "moelora/core/buffer.hpp"
#include "moelora/core/error.hpp"
#include "moelora/core/segments.hpp"
#include "moelora/core/tensor.hpp"
#include "moelora/host/linalg.hpp"
#include "moelora/host/quantize.hpp"
#include "moelora/quant/quantizer.hpp"

namespace moelora {

/// See the file comment. `Q` models quant::Quantizer on `Backend` (the built-in FormatQuantizer, or
/// a user's own). On the GPU include `moelora/cuda/linalg.hpp` and `moelora/cuda/quantize.hpp`.
template <class Backend, class Q = quant::FormatQuantizer<Backend>>
class QuantizedGroupedLinear {
  static_assert(quant::Quantizer<Q>, "moelora: QuantizedGroupedLinear<Backend, Q> needs Q to model quant::Quantizer");
  static_assert(std::is_same_v<typename Q::backend_type, Backend>,
                "moelora: the quantizer of a QuantizedGroupedLinear must run on the base's backend");

 public:
  using backend_type = Backend;
  using stream_type = typename Backend::stream_type;
  using quantizer_type = Q;

  static constexpr std::size_t kDefaultDequantBudget = std::size_t{256} << 20;

  /// E experts of `[out, in]` weights of `dtype`; `weights` (std::nullopt: computes with the
  /// unquantized weights) and `inputs` (std::nullopt: x is used as given) are the quantizers.
  /// `linalg` carries the caller's handles (on the GPU: cuBLAS for the GEMMs, cuSOLVER for the
  /// SVD-based initialisers), which must outlive the base. Set the weights with `set_weight` before
  /// the first forward.
  QuantizedGroupedLinear(Linalg<Backend> linalg, std::int64_t experts, std::int64_t in, std::int64_t out, DType dtype,
                         std::optional<Q> weights, std::optional<Q> inputs = std::nullopt)
      : experts_(checked_experts(experts, in, out)),
        in_(in),
        out_(out),
        dtype_(dtype),
        linalg_(std::move(linalg)),
        weight_quantizer_(std::move(weights)),
        input_quantizer_(std::move(inputs)),
        gemm_(make_gemm()) {
    source_ = Buffer<Backend>(weight_shape().numel() * dtype_size(dtype));
    if (weight_quantizer_) packed_ = Buffer<Backend>(weight_quantizer_->packed_bytes(experts, out, in));
  }

  [[nodiscard]] std::int64_t num_experts() const { return experts_; }
  [[nodiscard]] std::int64_t in_features() const { return in_; }
  [[nodiscard]] std::int64_t out_features() const { return out_; }
  [[nodiscard]] DType dtype() const { return dtype_; }
  [[nodiscard]] Shape weight_shape() const { return {experts_, out_, in_}; }

  [[nodiscard]] bool has_quantizer() const { return weight_quantizer_.has_value(); }
  [[nodiscard]] const std::optional<Q>& weight_quantizer() const { return weight_quantizer_; }
  [[nodiscard]] const std::optional<Q>& input_quantizer() const { return input_quantizer_; }
  [[nodiscard]] Linalg<Backend>& linalg() { return linalg_; }

  /// The quantizer's packed state (codes, scales, amax) in the backend's memory; empty without a
  /// weight quantizer.
  [[nodiscard]] const Buffer<Backend>& packed() const { return packed_; }
  /// Restores the packed state from host memory (`packed().bytes()` bytes, as saved from
  /// `packed()`): the base then computes exactly as the one that saved it. The source weights are
  /// not restored (set_weight does that).
  void restore_packed(const void* host_bytes, std::size_t bytes, stream_type stream) {
    MOELORA_REQUIRE(has_quantizer(), ErrorCode::invalid_argument, "the base has no weight quantizer to restore");
    MOELORA_REQUIRE(bytes == packed_.bytes(), ErrorCode::shape_mismatch, "packed state of ", bytes,
                    " bytes does not fit the base's ", packed_.bytes());
    Backend::copy_from_host(packed_.data(), host_bytes, bytes, stream);
    weights_set_ = true;
    resident_ = false;
  }

  /// Bytes this base holds for its weights: packed state plus source weights (if kept).
  [[nodiscard]] std::size_t weight_bytes() const { return packed_.bytes() + source_.bytes(); }

  /// Copies W `[E, out, in]` (the base's dtype) from host memory and quantizes it.
  void set_weight(ConstTensorRef host_weights, stream_type stream) {
    MOELORA_REQUIRE(host_weights.shape == weight_shape(), ErrorCode::shape_mismatch, "weights of shape ",
                    host_weights.shape, " do not fit a base of shape ", weight_shape());
    MOELORA_REQUIRE(host_weights.dtype == dtype_, ErrorCode::dtype_mismatch, "weights of dtype ",
                    dtype_name(host_weights.dtype), " do not fit a base of dtype ", dtype_name(dtype_));
    if (!source_.data()) source_ = Buffer<Backend>(weight_shape().numel() * dtype_size(dtype_));
    Backend::copy_from_host(source_.data(), host_weights.data, source_.bytes(), stream);
    weights_set_ = true;
    resident_ = false;
    if (weight_quantizer_) weight_quantizer_->quantize(source_weight(), packed_.data(), stream);
  }

  /// The unquantized weights W `[E, out, in]`; throws once released.
  [[nodiscard]] ConstTensorRef source_weight() const {
    require_weights();
    MOELORA_REQUIRE(source_.data() != nullptr, ErrorCode::invalid_argument,
                    "the base's source weights were released; set_weight restores them");
    return {source_.data(), dtype_, weight_shape()};
  }

  /// Frees the source weights of a quantized base (they are needed again only by the SVD-based
  /// initialisers); a base without a weight quantizer computes with them and keeps them.
  void release_source() {
    MOELORA_REQUIRE(has_quantizer(), ErrorCode::invalid_argument,
                    "a base without a weight quantizer computes with its source weights and cannot release them");
    source_ = Buffer<Backend>();
  }

  /// out = Q(w) with the weight quantizer, w and out `[E, out, in]` in the backend's memory.
  void fake_quantize(ConstTensorRef w, TensorRef out, stream_type stream) {
    MOELORA_REQUIRE(has_quantizer(), ErrorCode::invalid_argument, "the base has no weight quantizer");
    weight_quantizer_->fake_quantize(w, out, stream);
  }

  /// From now on the base computes with Q(w) (w `[E, out, in]`, any dtype, backend memory); without
  /// a weight quantizer, w (rounded to the base's dtype) replaces the source weights.
  void set_effective_weight(ConstTensorRef w, stream_type stream) {
    MOELORA_REQUIRE(w.shape == weight_shape(), ErrorCode::shape_mismatch, "weights of shape ", w.shape,
                    " do not fit a base of shape ", weight_shape());
    if (weight_quantizer_) weight_quantizer_->quantize(w, packed_.data(), stream);
    else linalg_.convert(w.data, w.dtype, source_.data(), dtype_, w.numel(), stream);
    weights_set_ = true;
    resident_ = false;
  }

  /// What the base computes with, Q(W) (or W), into out `[E, out, in]` of out's dtype.
  void dequantized_weight(TensorRef out, stream_type stream) {
    require_weights();
    MOELORA_REQUIRE(out.shape == weight_shape(), ErrorCode::shape_mismatch, "out has shape ", out.shape,
                    " but the base's weights are ", weight_shape());
    if (weight_quantizer_) weight_quantizer_->dequantize(packed_.data(), weight_shape(), 0, experts_, out, stream);
    else linalg_.convert(source_.data(), dtype_, out.data, out.dtype, out.numel(), stream);
  }

  /// Whether adding into the output (β = 1) costs the GEMM little (where the backend says: CUDA);
  /// GroupedLoRA lets the adapters write first only then.
  [[nodiscard]] bool accumulate_is_cheap() const
    requires requires(const GroupedGemm<Backend>& gemm) { gemm.accumulate_is_cheap(); }
  {
    return gemm_.accumulate_is_cheap();
  }

  /// Caps the dequantization scratch (at least one expert is always dequantized at a time). Not on
  /// the hot path: it may rebuild the GEMM for the new chunk size.
  void set_dequant_budget(std::size_t bytes) {
    dequant_budget_ = bytes;
    resident_ = false;
    if (gemm_groups() != gemm_groups_) gemm_ = make_gemm();
  }

  /// Sizes the input-quantizer scratch (and the input quantizer's own, where it has `reserve`) and
  /// the dequantization scratch for calls of up to `rows` rows: later calls allocate nothing.
  void reserve(std::int64_t rows) {
    MOELORA_REQUIRE(rows >= 0, ErrorCode::invalid_argument, "reserve(rows) needs rows >= 0, got ", rows);
    if (input_quantizer_) {
      quantized_x_.reserve(static_cast<std::size_t>(rows * in_) * dtype_size(dtype_));
      if constexpr (requires(Q& q) { q.reserve(std::int64_t{1}); }) input_quantizer_->reserve(1);
    }
    if (weight_quantizer_) reserve_dequantized();
  }

  /// Whether a LowRankAddend of `rank` in `dtype` rides on this base's GEMMs (where the backend
  /// says: CUDA's sm90 path); GroupedLoRA then hands them its first adapter's expand.
  [[nodiscard]] bool fuses_low_rank(std::int64_t rank, DType dtype) const
    requires requires(const GroupedGemm<Backend>& gemm) { gemm.fuses_low_rank(rank, dtype); }
  {
    return gemm_.fuses_low_rank(rank, dtype);
  }

  void forward(ConstTensorRef x, const ExpertSegments& segments, TensorRef y, stream_type stream,
               WriteMode mode = WriteMode::overwrite, const LowRankAddend& addend = {}) {
    if (input_quantizer_ && segments.rows > 0) {
      const Shape rows{1, segments.rows, in_};
      quantized_x_.reserve(rows.numel() * dtype_size(dtype_));
      input_quantizer_->fake_quantize({x.data, dtype_, rows}, {quantized_x_.data(), dtype_, rows}, stream);
      x.data = quantized_x_.data();
    }
    run(GemmDirection::forward, x, segments, y, mode, addend, stream);
  }

  void backward_input(ConstTensorRef dy, const ExpertSegments& segments, TensorRef dx, stream_type stream,
                      WriteMode mode = WriteMode::overwrite, const LowRankAddend& addend = {}) {
    run(GemmDirection::backward_input, dy, segments, dx, mode, addend, stream);
  }

 private:
  static std::int64_t checked_experts(std::int64_t experts, std::int64_t in, std::int64_t out) {
    MOELORA_REQUIRE(experts >= 1 && in >= 1 && out >= 1, ErrorCode::invalid_argument,
                    "a grouped linear needs experts, in and out >= 1, got E=", experts, " in=", in, " out=", out);
    return experts;
  }

  void require_weights() const {
    MOELORA_REQUIRE(weights_set_, ErrorCode::invalid_argument, "the quantized base has no weights yet: call set_weight");
  }

  [[nodiscard]] std::size_t expert_bytes() const { return static_cast<std::size_t>(out_ * in_) * dtype_size(dtype_); }
  /// Experts dequantized at a time.
  [[nodiscard]] std::int64_t chunk_experts() const {
    return std::clamp<std::int64_t>(static_cast<std::int64_t>(dequant_budget_ / expert_bytes()), 1, experts_);
  }
  /// Experts of one GEMM call: a chunk, or all of them without a weight quantizer.
  [[nodiscard]] std::int64_t gemm_groups() const { return weight_quantizer_ ? chunk_experts() : experts_; }

  /// Sizes the dequantization scratch for a chunk; a new buffer holds no resident weight.
  void reserve_dequantized() {
    const void* before = dequantized_.data();
    dequantized_.reserve(static_cast<std::size_t>(chunk_experts()) * expert_bytes());
    if (dequantized_.data() != before) resident_ = false;
  }

  GroupedGemm<Backend> make_gemm() {
    gemm_groups_ = gemm_groups();
    if constexpr (std::default_initializable<GroupedGemm<Backend>>) return {};
    else return GroupedGemm<Backend>(linalg_.blas(), gemm_groups_, in_, out_, dtype_);
  }

  void run(GemmDirection direction, ConstTensorRef in, const ExpertSegments& segments, TensorRef out, WriteMode mode,
           const LowRankAddend& addend, stream_type stream) {
    require_weights();
    GroupedGemmArgs args{direction, source_.data(), 0,        experts_, out_, in_, dtype_, &segments,
                         in.data,   out.data,       mode,     addend};
    if (!weight_quantizer_) return gemm_.run(args, stream);
    if (segments.rows == 0) return;  // nothing to dequantize or write
    const std::int64_t chunk = chunk_experts();
    reserve_dequantized();  // before any chunk is queued
    args.weights = dequantized_.data();
    if (chunk == experts_) {  // the whole dequantized weight stays resident
      if (!resident_)
        weight_quantizer_->dequantize(packed_.data(), weight_shape(), 0, experts_,
                                      {dequantized_.data(), dtype_, weight_shape()}, stream);
      resident_ = true;
      return gemm_.run(args, stream);
    }
    // Host counts say which chunks have rows; with device counts every chunk is dequantized.
    const std::int64_t* host_offsets = segments.host_offsets;
    for (std::int64_t first = 0; first < experts_; first += chunk) {
      const std::int64_t last = std::min(experts_, first + chunk);
      if (host_offsets && host_offsets[last] == host_offsets[first]) continue;
      weight_quantizer_->dequantize(packed_.data(), weight_shape(), first, last - first,
                                    {dequantized_.data(), dtype_, {last - first, out_, in_}}, stream);
      args.first_expert = first, args.last_expert = last;
      gemm_.run(args, stream);
    }
  }

  std::int64_t experts_, in_, out_;
  DType dtype_;
  Linalg<Backend> linalg_;
  std::optional<Q> weight_quantizer_, input_quantizer_;
  std::int64_t gemm_groups_ = 0;  // the groups gemm_ was built for
  std::size_t dequant_budget_ = kDefaultDequantBudget;
  GroupedGemm<Backend> gemm_;
  Buffer<Backend> source_, packed_, dequantized_, quantized_x_;
  bool weights_set_ = false;
  bool resident_ = false;  // dequantized_ holds the whole current Q(W)
};

}  // namespace moelora
