/// \file
/// \brief GroupedLinear<Backend>: the reference frozen grouped base, W `[E, out, in]` per expert.
///
/// `forward`: `y_t = W_e x_t`; `backward_input`: `dx_t = W_eᵀ dy_t` (overwriting); fp32
/// accumulation, outputs rounded once to the weight dtype (bf16, fp16 or fp32). The host
/// specialisation uses OpenBLAS; the CUDA one (in `cuda/grouped_linear.hpp`) cuBLAS.
#pragma once

#include <cstdint>
#include <vector>

#include "moelora/core/buffer.hpp"
#include "moelora/core/error.hpp"
#include "moelora/core/segments.hpp"
#include "moelora/core/tensor.hpp"
#include "moelora/host/backend.hpp"

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

template <class Backend>
class GroupedLinear;

/// The host reference base.
template <>
class GroupedLinear<HostBackend> : public GroupedWeights<HostBackend> {
 public:
  using backend_type = HostBackend;
  using GroupedWeights::GroupedWeights;

  void forward(ConstTensorRef x, const ExpertSegments& segments, TensorRef y, HostStream /*stream*/) const {
    run(x, segments, y, host::Op::t, in_features(), out_features());
  }
  void backward_input(ConstTensorRef dy, const ExpertSegments& segments, TensorRef dx, HostStream /*stream*/) const {
    run(dy, segments, dx, host::Op::n, out_features(), in_features());
  }

 private:
  // out_rows[n, k_out] = in_rows[n, k_in] · op(W_e), W_e `[out, in]`.
  void run(ConstTensorRef in, const ExpertSegments& segments, TensorRef out, host::Op op_w, std::int64_t k_in,
           std::int64_t k_out) const {
    std::vector<float> w, a, c;
    for (std::int64_t e = 0; e < num_experts(); ++e) {
      const std::int64_t row0 = segments.host_offsets[e];
      const std::int64_t n = segments.host_offsets[e + 1] - row0;
      if (n == 0) continue;
      const std::int64_t w_elems = out_features() * in_features();
      w.resize(static_cast<std::size_t>(w_elems));
      a.resize(static_cast<std::size_t>(n * k_in));
      c.resize(static_cast<std::size_t>(n * k_out));
      host::load_as_float(host::element(weight().data, dtype(), e * w_elems), dtype(), w.size(), w.data(), DType::fp32);
      host::load_as_float(host::element(in.data, dtype(), row0 * k_in), dtype(), a.size(), a.data(), DType::fp32);
      host::gemm(host::Op::n, op_w, n, k_out, k_in, 1.0f, a.data(), w.data(), 0.0f, c.data());
      host::store_from_float(c.data(), c.size(), host::element(out.data, dtype(), row0 * k_out), dtype());
    }
  }
};

}  // namespace moelora
