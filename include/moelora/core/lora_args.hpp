/// \file
/// \brief The argument bundles that GroupedLoRA hands to a backend's LoRA operations.
///
/// Pointers are in the backend's memory. Layouts (row-major): x `[T, in]`, y `[T, out]`,
/// A `[E, r, in]`, B `[E, out, r]`, h `[T, r]`; x, y, dy and dx are in the base's dtype (`io_dtype`),
/// A, B and h in the adapter's factor dtype, gradients in fp32.
#pragma once

#include <cstddef>
#include <cstdint>

#include "moelora/core/dtype.hpp"
#include "moelora/core/half_types.hpp"
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

/// A sum all-reduce, in place, of `count` fp32 values in the backend's memory over the ranks of a
/// tensor-parallel group, queued on the stream of the backend call it is handed to (the layer binds
/// the communicator and the stream into `context`). Empty (`fn` null): there is nothing to reduce.
struct SumAllReduce {
  void (*fn)(const void* context, float* data, std::size_t count) = nullptr;
  const void* context = nullptr;

  explicit operator bool() const { return fn != nullptr; }
  void operator()(float* data, std::size_t count) const { fn(context, data, count); }
};

/// `h_t = round(A_e x_t)`, `y_t += scale · B_e h_t` (or `=`, by `y_mode`). Numerics: x is rounded
/// to the factor dtype, products accumulate in fp32, h is rounded to the factor dtype, y is rounded
/// to its own dtype once.
///
/// With y null only the projection runs, and h holds `round(scale · A_e x_t)`: the caller adds
/// `B_e h_t` itself (a base GEMM that takes it as a LowRankAddend).
struct LoraForwardArgs {
  LoraShape shape;
  FactorsRef factors;
  const void* x = nullptr;  ///< `[T, in]`
  void* y = nullptr;        ///< `[T, out]`; null: the projection alone (h scaled)
  void* h = nullptr;        ///< `[T, r]`, written; saved for the backward pass
  WriteMode y_mode = WriteMode::accumulate;
  /// `[T, r]` fp32, or null. Non-null (a row-parallel layer): also written with the unrounded fp32
  /// sums `A_e x_t`, this rank's partial sum of h, which the layer reduces for the backward's dB.
  float* h_sums = nullptr;
};

/// `u_t = round(scale · B_eᵀ dy_t)`, `dB_e += scale · Σ dy_t h_tᵀ`, `dA_e += Σ u_t x_tᵀ`,
/// `dx_t += A_eᵀ u_t`, each `+=` or `=` by its mode. dy and x are rounded to the factor dtype first;
/// sums accumulate in fp32.
///
/// Tensor parallelism (docs/parallel.md): with `reduce_u` (a column-parallel layer) the fp32 sums
/// `B_eᵀ dy_t` are this rank's partial sums; dx uses `round(scale · partial)`, then `reduce_u` sums
/// them over the group in place and dA uses `round(scale · Σ)` (`reduce_u` is called once, only when
/// dA is wanted, between the u projection and the dA/dx pass). With `h_sums` (a row-parallel layer)
/// dB uses `round(h_sums)`, the full fp32 h reduced by the layer, instead of `h`.
///
/// With `u` non-null (and dx null) the backend writes `round(scale · B_eᵀ dy_t)` there (with
/// `reduce_u`: this rank's partial u, the one dx uses) and leaves the dx part to the caller (a base
/// GEMM that adds `A_eᵀ u_t` as a LowRankAddend). `h_scaled` (after a forward with y null): dB is
/// `Σ dy_t round(scale · h_t)ᵀ`, from h as saved (`round(scale · A_e x_t)`), or from `h_sums`.
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
  SumAllReduce reduce_u;        ///< column-parallel: sums u over the group before dA
  const float* h_sums = nullptr;  ///< `[T, r]` fp32; row-parallel: the reduced h that dB uses
  /// Sum each expert's rows into its gradients in a fixed order, so that the bits are the same on
  /// every run and every rank (a tensor-parallel layer's replicated factor). The host backend and
  /// the CUDA generic kernels always do; the CUDA tensor-core kernels otherwise add the partial
  /// sums of an expert's row groups with atomics, in any order.
  bool ordered_grads = false;
  void* u = nullptr;            ///< `[T, r]` factor dtype; non-null: receives round(scale · B_eᵀ dy) (dx must be null)
  bool h_scaled = false;        ///< the forward had y null: h is `round(scale · A_e x)`, dB uses scaled h

  /// The factor of `h_sums` before dB rounds them (scale when `h_scaled`, else 1) and dB's own
  /// factor on `Σ dy hᵀ` (1 when `h_scaled`, else scale): dB is scale · Σ dy hᵀ either way.
  [[nodiscard]] float h_sums_scale() const { return h_scaled ? factors.scale : 1.0f; }
  [[nodiscard]] float grad_b_scale() const { return h_scaled ? 1.0f : factors.scale; }
};

/// Kaiming-uniform A (bound √(6/fan_in), counter-based RNG keyed by seed) and zero B.
///
/// The value of A's element (expert i, row j, column k) is keyed by its place in the global
/// (unsharded) adapter `[E_global, r, in_global]`: flat index `((expert0 + i)·r + j)·in_global +
/// col0 + k`, so every tensor/expert-parallel shard holds exactly the slice of the single-device
/// adapter (with the defaults, expert0 = col0 = 0 and in_global = in, the local index).
struct KaimingInitArgs {
  void* a = nullptr;  ///< `[experts, rank, in]`
  void* b = nullptr;  ///< `[experts, out, rank]`
  DType dtype = DType::fp32;
  std::int64_t experts = 0, rank = 0, in = 0, out = 0;
  std::uint64_t seed = 0;
  std::int64_t expert0 = 0;    ///< global index of the first local expert
  std::int64_t in_global = 0;  ///< columns of the global A (fan_in); 0: `in`
  std::int64_t col0 = 0;       ///< global column of local column 0

  [[nodiscard]] MOELORA_HOST_DEVICE std::int64_t fan_in() const { return in_global > 0 ? in_global : in; }
  /// The global flat index of local flat index `i` of A.
  [[nodiscard]] MOELORA_HOST_DEVICE std::uint64_t global_index(std::int64_t i) const {
    const std::int64_t k = i % in, row = i / in;  // row = local expert · rank + j
    const std::int64_t expert = row / rank, j = row % rank;
    return static_cast<std::uint64_t>(((expert0 + expert) * rank + j) * fan_in() + col0 + k);
  }
};

}  // namespace moelora
