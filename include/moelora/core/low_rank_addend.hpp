/// \file
/// \brief LowRankAddend: a low-rank product that a grouped GEMM adds to its own in the same pass
/// (the LoRA expand riding on the base GEMM).
#pragma once

#include <cstdint>

namespace moelora {

/// `out_t += F_e r_t` for every row t of expert e, summed with the GEMM's product in one fp32
/// accumulator: rows r `[T, rank]` (grouped by expert like the GEMM's input) and per expert a
/// factor F_e, both in the GEMM's dtype and memory. Forward (`out = x Wᵀ`): F = B `[E, out, rank]`,
/// so `y_t += B_e h_t`; backward_input (`out = dy W`): F = A `[E, rank, in]`, so `dx_t += A_eᵀ u_t`.
/// F is indexed by the layer's expert (not relative to a call's first expert). rank 0: none.
struct LowRankAddend {
  const void* rows = nullptr;     ///< `[T, rank]`
  const void* factors = nullptr;  ///< forward `[E, out, rank]`, backward_input `[E, rank, in]`
  std::int64_t rank = 0;

  [[nodiscard]] bool empty() const { return rank == 0; }
};

}  // namespace moelora
