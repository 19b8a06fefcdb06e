/// \file
/// \brief WriteMode: whether an operation adds its result into its output or overwrites it.
#pragma once

#include <cstdint>

namespace moelora {

/// How an operation treats the old contents of an output.
///
/// `accumulate` reads them and adds (gradient accumulation, a delta onto a base output);
/// `overwrite` writes the result without reading them, as if the output had been zeroed first:
/// every element is written, including those no row contributes to (an empty expert's gradient
/// slice is written as zeros). Overwriting saves the zero-fill and the read of the old values.
enum class WriteMode : std::uint8_t {
  accumulate,  ///< out += result
  overwrite,   ///< out = result
};

/// β of a GEMM `C = α·A·B + β·C` that treats C in `mode`: 1 adds, 0 overwrites (BLAS and cuBLAS do
/// not read C when β = 0).
constexpr float gemm_beta(WriteMode mode) { return mode == WriteMode::accumulate ? 1.0f : 0.0f; }

}  // namespace moelora
