/// \file
/// \brief Where a layer's shard sits in the TP × EP grid: `Placement` (what the caller states) and
/// `Shard` (the resolved local and global sizes and the maps between local and global coordinates).
///
/// A rank holds `E_local` experts, global experts `[ep_rank · E_local, (ep_rank + 1) · E_local)`,
/// and per expert the slices of the `factor_tp_axis` table (policies/parallel_mode.hpp):
///
/// | mode   | W_e local       | A_e local                      | B_e local                         |
/// |--------|-----------------|--------------------------------|-----------------------------------|
/// | none   | `[out, in]`     | `[r, in]`                      | `[out, r]`                        |
/// | column | `[out/tp, in]`  | `[r, in]`, replicated          | `[out/tp, r]`, rows (by blocks)   |
/// | row    | `[out, in/tp]`  | `[r, in/tp]`, columns          | `[out, r]`, replicated            |
///
/// Column mode with `out_blocks = n`: the global rows of W_e and B_e are n equal blocks (a gated
/// fc1's `[gate; up]`: n = 2), each sharded over TP on its own; rank t holds rows
/// `[b · out/n + t · out/(n·tp), +out/(n·tp))` of every block b, stacked in block order
/// (`[gate_t; up_t]`).
#pragma once

#include <cstddef>
#include <cstdint>

#include "moelora/core/error.hpp"
#include "moelora/policies/parallel_mode.hpp"

namespace moelora::parallel {

/// What the caller states about a layer's place (all fields optional; the defaults are one rank).
struct Placement {
  int ep_rank = 0;               ///< index of this rank in the expert-parallel group
  int ep_size = 1;               ///< ranks that split the experts: E_global = ep_size · E_local
  int tp_size = 0;               ///< the tensor-parallel size the caller expects (checked); 0: the communicator's
  std::int64_t global_in = 0;    ///< in_features of the unsharded layer (checked); 0: derived
  std::int64_t global_out = 0;   ///< out_features of the unsharded layer (checked); 0: derived
  std::int64_t out_blocks = 1;   ///< column mode: W's and B's rows are this many blocks sharded separately
};

/// A layer's resolved place: its mode's sharded axes, its ranks, and local sizes.
struct Shard {
  policy::TpAxis a_axis = policy::TpAxis::none;  ///< A_e `[r, in]`: none or cols
  policy::TpAxis b_axis = policy::TpAxis::none;  ///< B_e `[out, r]`: none or rows
  int tp_rank = 0, tp_size = 1, ep_rank = 0, ep_size = 1;
  std::int64_t out_blocks = 1;
  std::int64_t experts = 0, in = 0, out = 0;  ///< local sizes (the base's)

  [[nodiscard]] bool column() const { return b_axis == policy::TpAxis::rows; }
  [[nodiscard]] bool row() const { return a_axis == policy::TpAxis::cols; }
  [[nodiscard]] std::int64_t global_experts() const { return experts * ep_size; }
  [[nodiscard]] std::int64_t global_in() const { return row() ? in * tp_size : in; }
  [[nodiscard]] std::int64_t global_out() const { return column() ? out * tp_size : out; }
  /// Global index of local expert i.
  [[nodiscard]] std::int64_t global_expert(std::int64_t i) const { return ep_rank * experts + i; }
  /// Global column of A's (and, row mode, W's) local column 0.
  [[nodiscard]] std::int64_t col0() const { return row() ? tp_rank * in : 0; }
};

/// Resolves and validates the place of a layer of mode `P` over a base of E experts `[out, in]`
/// on TP rank `tp_rank` of `tp_size`. Throws ErrorCode::invalid_argument (a bad placement) or
/// ErrorCode::shape_mismatch (sizes that do not split) naming the problem.
template <policy::ParallelModePolicy P>
Shard resolve_shard(const Placement& p, std::int64_t experts, std::int64_t in, std::int64_t out, int tp_rank,
                    int tp_size) {
  MOELORA_REQUIRE(p.ep_size >= 1 && p.ep_rank >= 0 && p.ep_rank < p.ep_size, ErrorCode::invalid_argument,
                  "expert-parallel rank ", p.ep_rank, " of ", p.ep_size, " is not valid (need 0 <= ep_rank < ep_size)");
  MOELORA_REQUIRE(p.tp_size == 0 || p.tp_size == tp_size, ErrorCode::invalid_argument, "the placement says tp_size = ",
                  p.tp_size, " but the tensor-parallel communicator has ", tp_size, " ranks");
  MOELORA_REQUIRE(p.out_blocks >= 1, ErrorCode::invalid_argument, "out_blocks must be >= 1, got ", p.out_blocks);
  Shard s{P::a_axis, P::b_axis, tp_rank, tp_size, p.ep_rank, p.ep_size, p.out_blocks, experts, in, out};
  MOELORA_REQUIRE(s.column() || p.out_blocks == 1, ErrorCode::invalid_argument,
                  "out_blocks = ", p.out_blocks, " applies to column-parallel layers only (this one is ", P::name, ")");
  if (p.global_out > 0) {
    MOELORA_REQUIRE(!s.column() || p.global_out % (tp_size * p.out_blocks) == 0, ErrorCode::shape_mismatch,
                    "a tensor-parallel group of ", tp_size, " ranks does not divide out = ", p.global_out,
                    p.out_blocks > 1 ? " into equal slices of its blocks" : "", " (column mode needs out divisible by tp",
                    p.out_blocks > 1 ? " · out_blocks)" : ")");
    MOELORA_REQUIRE(p.global_out == s.global_out(), ErrorCode::shape_mismatch, "the base's out = ", out, " is not out = ",
                    p.global_out, s.column() ? " split over tp" : "", " (", P::name, " mode)");
  }
  if (p.global_in > 0) {
    MOELORA_REQUIRE(!s.row() || p.global_in % tp_size == 0, ErrorCode::shape_mismatch, "a tensor-parallel group of ",
                    tp_size, " ranks does not divide in = ", p.global_in, " (row mode needs in divisible by tp)");
    MOELORA_REQUIRE(p.global_in == s.global_in(), ErrorCode::shape_mismatch, "the base's in = ", in, " is not in = ",
                    p.global_in, s.row() ? " split over tp" : "", " (", P::name, " mode)");
  }
  MOELORA_REQUIRE(out % p.out_blocks == 0, ErrorCode::shape_mismatch, "the base's out = ", out,
                  " does not split into out_blocks = ", p.out_blocks, " equal blocks");
  return s;
}

/// One `[E, R, C]` tensor (row-major, `element` bytes an element) sharded along `axis` over
/// `tp_size` ranks: rank t holds `[E, rows, cols]` (rows = R/tp along TpAxis::rows, by `blocks`
/// blocks; cols = C/tp along TpAxis::cols; the whole tensor along TpAxis::none).
struct SliceGeometry {
  policy::TpAxis axis = policy::TpAxis::none;
  std::int64_t experts = 0, rows = 0, cols = 0;  ///< local extents
  int tp_size = 1;
  std::int64_t blocks = 1;
  std::size_t element = 0;

  [[nodiscard]] std::int64_t global_rows() const { return axis == policy::TpAxis::rows ? rows * tp_size : rows; }
  [[nodiscard]] std::int64_t global_cols() const { return axis == policy::TpAxis::cols ? cols * tp_size : cols; }
  [[nodiscard]] std::size_t local_bytes() const { return static_cast<std::size_t>(experts * rows * cols) * element; }
  [[nodiscard]] std::size_t global_bytes() const {
    return static_cast<std::size_t>(experts * global_rows() * global_cols()) * element;
  }
};

/// The geometry of factor `f` (A `[E, r, in]`, B `[E, out, r]`) of rank `rank` and `element`-byte
/// elements on shard `s`.
inline SliceGeometry factor_geometry(const Shard& s, policy::Factor f, std::int64_t rank, std::size_t element) {
  if (f == policy::Factor::a) return {s.a_axis, s.experts, rank, s.in, s.tp_size, 1, element};
  return {s.b_axis, s.experts, s.out, rank, s.tp_size, s.out_blocks, element};
}

/// The geometry of the base weights W `[E, out, in]` on shard `s` (sharded like B in column mode,
/// like A in row mode).
inline SliceGeometry weight_geometry(const Shard& s, std::size_t element) {
  const policy::TpAxis axis = s.column() ? policy::TpAxis::rows : (s.row() ? policy::TpAxis::cols : policy::TpAxis::none);
  return {axis, s.experts, s.out, s.in, s.tp_size, s.out_blocks, element};
}

/// Which way `copy_slice` copies.
enum class SliceCopy : std::uint8_t {
  from_global,  ///< local `[E, rows, cols]` ← rank t's slice of the global tensor
  to_global,    ///< rank t's slice of the global tensor ← local
};

/// Copies rank `tp_rank`'s slice between a global tensor and a local one (Backend::copy_2d, on
/// `stream`): `from_global` writes `local` from `global`, `to_global` writes `global` from `local`.
template <class Backend>
void copy_slice(const SliceGeometry& g, int tp_rank, SliceCopy direction, const void* src, void* dst,
                typename Backend::stream_type stream) {
  const std::size_t es = g.element;
  const auto run = [&](std::size_t local_offset, std::size_t local_pitch, std::size_t global_offset,
                       std::size_t global_pitch, std::size_t width, std::size_t height) {
    if (direction == SliceCopy::from_global)
      Backend::copy_2d(static_cast<std::byte*>(dst) + local_offset, local_pitch,
                       static_cast<const std::byte*>(src) + global_offset, global_pitch, width, height, stream);
    else
      Backend::copy_2d(static_cast<std::byte*>(dst) + global_offset, global_pitch,
                       static_cast<const std::byte*>(src) + local_offset, local_pitch, width, height, stream);
  };
  const auto bytes = [&](std::int64_t n) { return static_cast<std::size_t>(n) * es; };
  switch (g.axis) {
    case policy::TpAxis::none:
      run(0, g.local_bytes(), 0, g.local_bytes(), g.local_bytes(), 1);
      break;
    case policy::TpAxis::cols:  // E·R rows of `cols` elements at column tp_rank · cols
      run(0, bytes(g.cols), bytes(tp_rank * g.cols), bytes(g.global_cols()), bytes(g.cols), static_cast<std::size_t>(g.experts * g.rows));
      break;
    case policy::TpAxis::rows: {  // per block: E runs of rows/blocks rows
      const std::int64_t local_block = g.rows / g.blocks, global_block = g.global_rows() / g.blocks;
      for (std::int64_t b = 0; b < g.blocks; ++b)
        run(bytes(b * local_block * g.cols), bytes(g.rows * g.cols),
            bytes((b * global_block + tp_rank * local_block) * g.cols), bytes(g.global_rows() * g.cols),
            bytes(local_block * g.cols), static_cast<std::size_t>(g.experts));
      break;
    }
  }
}

}  // namespace moelora::parallel
