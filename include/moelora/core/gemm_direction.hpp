/// \file
/// \brief GemmDirection: which product of a grouped base's weights a GEMM computes.
#pragma once

#include <cstdint>

namespace moelora {

/// Which product a grouped base GEMM computes, W_e `[out, in]` per expert.
enum class GemmDirection : std::uint8_t {
  forward,         ///< out_t = W_e in_t (in `[T, in]`, out `[T, out]`)
  backward_input,  ///< out_t = W_eᵀ in_t (in `[T, out]`, out `[T, in]`)
};

}  // namespace moelora
