/// \file
/// \brief GroupedLinear<Backend>: the reference frozen grouped base, W `[E, out, in]` per expert.
///
/// `forward`: `y_t = W_e x_t`; `backward_input`: `dx_t = W_eᵀ dy_t` (overwriting, or adding with
/// `WriteMode::accumulate`: an AccumulatingGroupedLinearBase), each optionally plus a LowRankAddend
/// in the same accumulator (a LowRankFusingGroupedLinearBase where the backend's GEMM has
/// `fuses_low_rank`); fp32 accumulation, outputs rounded once to the weight dtype (bf16, fp16 or fp32). The GEMMs are the backend's GroupedGemm: OpenBLAS on
/// the host; on the GPU the sm90 grouped GEMM (CUTLASS, no host sync) or cuBLAS (`cuda/grouped_gemm.hpp`).
#pragma once

#include <concepts>
#include <cstdint>
#include <utility>

#include "moelora/base/grouped_gemm.hpp"
#include "moelora/core/buffer.hpp"
#include "moelora/core/error.hpp"
#include "moelora/core/segments.hpp"
#include "moelora/core/tensor.hpp"

namespace moelora {

/// The weights of a grouped linear layer in `Backend`'s memory: W `[E, out, in]` of one dtype.
template <class Backend>
class GroupedWeights {
 public:
  GroupedWeights(std::int64_t experts, std::int64_t in, std::int64_t out, DType dtype)
      : experts_(experts), in_(in), out_(out), dtype_(dtype) {
    MOELORA_REQUIRE(experts >= 1 && in >= 1 && out >= 1, ErrorCode::invalid_argument,
                    "a grouped linear needs experts, in and out >= 1, got E=", experts, " in=", in, " out=", out);
    weights_ = Buffer<Backend>(static_cast<std::size_t>(experts * out * in) * dtype_size(dtype));
  }

  [[nodiscard]] std::int64_t num_experts() const { return experts_; }
  [[nodiscard]] std::int64_t in_features() const { return in_; }
  [[nodiscard]] std::int64_t out_features() const { return out_; }
  [[nodiscard]] DType dtype() const { return dtype_; }

  /// W `[E, out, in]` in the backend's memory.
  [[nodiscard]] TensorRef weight() const { return {weights_.data(), dtype_, {experts_, out_, in_}}; }

  /// Copies W from host memory; `host_weights` must match `weight()` in shape and dtype.
  void set_weight(ConstTensorRef host_weights, typename Backend::stream_type stream) {
    MOELORA_REQUIRE(host_weights.shape == weight().shape, ErrorCode::shape_mismatch, "weights of shape ",
                    host_weights.shape, " do not fit a layer of shape ", weight().shape);
    MOELORA_REQUIRE(host_weights.dtype == dtype_, ErrorCode::dtype_mismatch, "weights of dtype ",
                    dtype_name(host_weights.dtype), " do not fit a layer of dtype ", dtype_name(dtype_));
    Backend::copy_from_host(weights_.data(), host_weights.data, weights_.bytes(), stream);
  }

 private:
  std::int64_t experts_, in_, out_;
  DType dtype_;
  Buffer<Backend> weights_;
};

/// The reference base: GroupedWeights applied through the backend's GroupedGemm.
template <class Backend>
class GroupedLinear : public GroupedWeights<Backend> {
 public:
  using backend_type = Backend;
  using stream_type = typename Backend::stream_type;

  /// A base whose GEMMs need no handle (the host).
  GroupedLinear(std::int64_t experts, std::int64_t in, std::int64_t out, DType dtype)
    requires std::default_initializable<GroupedGemm<Backend>>
      : GroupedWeights<Backend>(experts, in, out, dtype) {}

  /// A base whose GEMMs take a caller-owned handle (the GPU: a cuBLAS handle, then optionally a
  /// GemmStrategy); the handle must outlive the base.
  template <class Handle, class... GemmOptions>
  GroupedLinear(Handle handle, std::int64_t experts, std::int64_t in, std::int64_t out, DType dtype,
                GemmOptions... options)
      : GroupedWeights<Backend>(experts, in, out, dtype), gemm_(handle, experts, in, out, dtype, options...) {}

  /// The GEMM strategy in use, where the backend has a choice (CUDA: never `automatic`).
  [[nodiscard]] auto strategy() const
    requires requires(const GroupedGemm<Backend>& gemm) { gemm.strategy(); }
  {
    return gemm_.strategy();
  }
  /// Whether adding into the output (β = 1) costs the GEMM little (where the backend says: CUDA);
  /// GroupedLoRA lets the adapters write first only then.
  [[nodiscard]] bool accumulate_is_cheap() const
    requires requires(const GroupedGemm<Backend>& gemm) { gemm.accumulate_is_cheap(); }
  {
    return gemm_.accumulate_is_cheap();
  }
  /// The GEMM strategy of the last call (CUDA: the cuBLAS one when the sm90 path's pointers were not
  /// 16-byte aligned).
  [[nodiscard]] auto last_strategy() const
    requires requires(const GroupedGemm<Backend>& gemm) { gemm.last_strategy(); }
  {
    return gemm_.last_strategy();
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
    gemm_.run(gemm_args(GemmDirection::forward, x, segments, y, mode, addend), stream);
  }
  void backward_input(ConstTensorRef dy, const ExpertSegments& segments, TensorRef dx, stream_type stream,
                      WriteMode mode = WriteMode::overwrite, const LowRankAddend& addend = {}) {
    gemm_.run(gemm_args(GemmDirection::backward_input, dy, segments, dx, mode, addend), stream);
  }

 private:
  GroupedGemmArgs gemm_args(GemmDirection direction, ConstTensorRef in, const ExpertSegments& segments, TensorRef out,
                            WriteMode mode, const LowRankAddend& addend) const {
    return {direction, this->weight().data, 0,        this->num_experts(), this->out_features(), this->in_features(),
            this->dtype(), &segments,       in.data,  out.data,            mode,                 addend};
  }

  GroupedGemm<Backend> gemm_;
};

}  // namespace moelora
