/// \file
/// \brief SwiGLU of a gated expert MLP: fc1's output row `[gate; up]` → `silu(gate) · up`, and its
/// backward; SwiGlu<Backend> with the host implementation (the CUDA one is in `cuda/moe.hpp`).
///
/// Layout: `in` `[R, 2·f]` (row i = gate `[f]` then up `[f]`, fc1's `[gate; up]` output; under
/// tensor parallelism rank k's fc1 holds `[gate_k; up_k]`, the same layout at f/t), `out` `[R, f]`.
/// Forward `out = silu(g) · u` with `silu(g) = g · σ(g)`; backward from `d_out`:
/// `d_g = d · u · σ(g) · (1 + g · (1 − σ(g)))`, `d_u = d · silu(g)`, written to `d_in` `[R, 2·f]`
/// in the same `[gate; up]` layout. Computed in fp32 from the stored values, each output rounded
/// once to its dtype (all three tensors share one dtype).
#pragma once

#include <cmath>
#include <cstdint>

#include "moelora/core/error.hpp"
#include "moelora/core/half_types.hpp"
#include "moelora/core/tensor.hpp"
#include "moelora/host/backend.hpp"

namespace moelora::moe {

/// `silu(g) · u`.
MOELORA_HOST_DEVICE inline float swiglu(float g, float u) { return g / (1.0f + expf(-g)) * u; }

/// The gradients `(d_g, d_u)` of `swiglu(g, u)` for an output gradient `d`.
struct SwiGluGrad {
  float gate, up;
};
MOELORA_HOST_DEVICE inline SwiGluGrad swiglu_grad(float g, float u, float d) {
  const float sigma = 1.0f / (1.0f + expf(-g));
  return {d * u * sigma * (1.0f + g * (1.0f - sigma)), d * g * sigma};
}

/// Checks `in` `[R, 2·f]` against `out` `[R, f]` (and the rows' dtype).
inline void check_swiglu(ConstTensorRef in, ConstTensorRef out, const char* in_name, const char* out_name) {
  MOELORA_REQUIRE(in.shape.rank == 2 && out.shape.rank == 2 && in.shape[0] == out.shape[0] &&
                      in.shape[1] == 2 * out.shape[1],
                  ErrorCode::shape_mismatch, "SwiGLU needs ", in_name, " [R, 2f] and ", out_name, " [R, f], got ",
                  in.shape, " and ", out.shape);
  MOELORA_REQUIRE(in.dtype == out.dtype, ErrorCode::dtype_mismatch, "SwiGLU needs ", in_name, " and ", out_name,
                  " of one dtype, got ", dtype_name(in.dtype), " and ", dtype_name(out.dtype));
  MOELORA_REQUIRE((in.data && out.data) || out.numel() == 0, ErrorCode::invalid_argument, "SwiGLU: ", in_name, " or ",
                  out_name, " has no data");
}

/// SwiGLU on a backend: `forward(in, out, stream)` and `backward(in, d_out, d_in, stream)`, shapes
/// and layout as in the file comment. Specialised per backend.
template <class Backend>
struct SwiGlu;

/// The host implementation (the reference).
template <>
struct SwiGlu<HostBackend> {
  static void forward(ConstTensorRef in, TensorRef out, HostStream /*stream*/) {
    check_swiglu(in, out, "in", "out");
    const std::int64_t rows = out.shape[0], f = out.shape[1];
    dispatch_dtype(in.dtype, [&](auto tag) {
      using T = host_type_t<tag.value>;
      const auto* x = static_cast<const T*>(in.data);
      auto* y = static_cast<T*>(out.data);
      for (std::int64_t i = 0; i < rows; ++i)
        for (std::int64_t c = 0; c < f; ++c)
          y[i * f + c] = T(swiglu(static_cast<float>(x[i * 2 * f + c]), static_cast<float>(x[i * 2 * f + f + c])));
    });
  }

  static void backward(ConstTensorRef in, ConstTensorRef d_out, TensorRef d_in, HostStream /*stream*/) {
    check_swiglu(in, d_out, "in", "d_out");
    check_swiglu(d_in, d_out, "d_in", "d_out");
    const std::int64_t rows = d_out.shape[0], f = d_out.shape[1];
    dispatch_dtype(in.dtype, [&](auto tag) {
      using T = host_type_t<tag.value>;
      const auto* x = static_cast<const T*>(in.data);
      const auto* dy = static_cast<const T*>(d_out.data);
      auto* dx = static_cast<T*>(d_in.data);
      for (std::int64_t i = 0; i < rows; ++i)
        for (std::int64_t c = 0; c < f; ++c) {
          const SwiGluGrad g = swiglu_grad(static_cast<float>(x[i * 2 * f + c]), static_cast<float>(x[i * 2 * f + f + c]),
                                           static_cast<float>(dy[i * f + c]));
          dx[i * 2 * f + c] = T(g.gate);
          dx[i * 2 * f + f + c] = T(g.up);
        }
    });
  }
};

}  // namespace moelora::moe
