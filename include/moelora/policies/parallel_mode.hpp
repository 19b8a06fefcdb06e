/// \file
/// \brief Tensor-parallel mode policies and their `factor_tp_axis` traits.
///
/// `factor_tp_axis` is the axis of one expert's 2-D factor slice (A_e `[r, in]`, B_e `[out, r]`)
/// that tensor parallelism shards, or `TpAxis::none` where the factor is replicated.
///
/// | mode   | base W local    | A_e local        | B_e local          |
/// |--------|-----------------|------------------|--------------------|
/// | none   | `[out, in]`     | `[r, in]`        | `[out, r]`         |
/// | column | `[out/tp, in]`  | `[r, in]`, none  | `[out/tp, r]`, 0   |
/// | row    | `[out, in/tp]`  | `[r, in/tp]`, 1  | `[out, r]`, none   |
#pragma once

#include <concepts>
#include <cstdint>
#include <string_view>

namespace moelora::policy {

struct ParallelModeCategory {};

/// Axis of a 2-D factor slice sharded by tensor parallelism.
enum class TpAxis : std::int8_t { none = -1, rows = 0, cols = 1 };

/// No tensor parallelism: every rank (or the only one) holds whole factors.
struct NoTensorParallel {
  using category = ParallelModeCategory;
  static constexpr std::string_view name = "none";
  static constexpr TpAxis a_axis = TpAxis::none;
  static constexpr TpAxis b_axis = TpAxis::none;
};

/// Column parallel base (W sharded along out): B_e sharded along its rows, A_e replicated.
struct ColumnParallel {
  using category = ParallelModeCategory;
  static constexpr std::string_view name = "column";
  static constexpr TpAxis a_axis = TpAxis::none;
  static constexpr TpAxis b_axis = TpAxis::rows;
};

/// Row parallel base (W sharded along in): A_e sharded along its columns, B_e replicated.
struct RowParallel {
  using category = ParallelModeCategory;
  static constexpr std::string_view name = "row";
  static constexpr TpAxis a_axis = TpAxis::cols;
  static constexpr TpAxis b_axis = TpAxis::none;
};

template <class P>
concept ParallelModePolicy = std::same_as<typename P::category, ParallelModeCategory> && requires {
  { P::a_axis } -> std::convertible_to<TpAxis>;
  { P::b_axis } -> std::convertible_to<TpAxis>;
};

/// Which factor of an adapter.
enum class Factor : std::uint8_t { a, b };

/// `factor_tp_axis` of `P` for factor `f`.
template <ParallelModePolicy P>
constexpr TpAxis factor_tp_axis(Factor f) {
  return f == Factor::a ? P::a_axis : P::b_axis;
}

}  // namespace moelora::policy
