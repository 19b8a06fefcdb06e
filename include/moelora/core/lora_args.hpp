/// \file
/// \brief The argument bundles that GroupedLoRA hands to a backend's LoRA operations.
///
/// Pointers are in the backend's memory. Layouts (row-major): x `[T, in]`, y `[T, out]`,
/// A `[E, r, in]`, B `[E, out, r]`, h `[T, r]`; x, y, dy and dx are in the base's dtype (`io_dtype`),
/// A, B and h in the adapter's factor dtype, gradients in fp32.
#pragma once

#include <cstdint>

#include "moelora/core/dtype.hpp"
#include "moelora/core/write_mode.hpp"

namespace moelora {

/// Problem sizes shared by every operation of one call.
struct LoraShape {
  std::int64_t experts = 0;  ///< E
  std::int64_t in = 0;       ///< in_features
  std::int64_t out = 0;      ///< out_features
  std::int64_t rows = 0;     ///< T, routed rows of this call
  DType io_dtype = DType::fp32;
};

/// One adapter's factors.
struct FactorsRef {
  const void* a = nullptr;  ///< `[E, r, in]`
  const void* b = nullptr;  ///< `[E, out, r]`
  DType dtype = DType::fp32;
  std::int64_t rank = 0;
  float scale = 1.0f;
};

/// `h_t = round(A_e x_t)`, `y_t += scale · B_e h_t` (or `=`, by `y_mode`). Numerics: x is rounded
/// to the factor dtype, products accumulate in fp32, h is rounded to the factor dtype, y is rounded
/// to its own dtype once.
struct LoraForwardArgs {
  LoraShape shape;
  FactorsRef factors;
  const void* x = nullptr;  ///< `[T, in]`
  void* y = nullptr;        ///< `[T, out]`
  void* h = nullptr;        ///< `[T, r]`, written; saved for the backward pass
  WriteMode y_mode = WriteMode::accumulate;
};

/// `u_t = round(scale · B_eᵀ dy_t)`, `dB_e += scale · Σ dy_t h_tᵀ`, `dA_e += Σ u_t x_tᵀ`,
/// `dx_t += A_eᵀ u_t`, each `+=` or `=` by its mode. dy and x are rounded to the factor dtype first;
/// sums accumulate in fp32.
struct LoraBackwardArgs {
  LoraShape shape;
  FactorsRef factors;
  const void* x = nullptr;      ///< `[T, in]`
  const void* dy = nullptr;     ///< `[T, out]`
  const void* h = nullptr;      ///< `[T, r]`, as the forward saved it
  void* dx = nullptr;           ///< `[T, in]`; null: no input gradient
  float* grad_a = nullptr;      ///< `[E, r, in]` fp32; null: A frozen
  float* grad_b = nullptr;      ///< `[E, out, r]` fp32; null: B frozen
  WriteMode dx_mode = WriteMode::accumulate;
  WriteMode grad_mode = WriteMode::accumulate;  ///< of both gradients
};

/// Kaiming-uniform A (bound √(6/in), counter-based RNG keyed by seed) and zero B.
struct KaimingInitArgs {
  void* a = nullptr;
  void* b = nullptr;
  DType dtype = DType::fp32;
  std::int64_t experts = 0, rank = 0, in = 0, out = 0;
  std::uint64_t seed = 0;
};

}  // namespace moelora
