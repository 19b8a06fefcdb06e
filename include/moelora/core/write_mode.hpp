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

}  // namespace moelora
