/// \file
/// \brief ExpertSegments: the grouped rows of one call, split by expert, as the base receives them.
#pragma once

#include <cstdint>

namespace moelora {

/// Rows `[offsets[e], offsets[e+1])` of the grouped input belong to expert e.
///
/// `offsets` `[E+1]` int64 lives in the backend's memory (device memory for the CUDA backend), the
/// exclusive scan of `tokens_per_expert`, so `offsets[E] == rows`. `host_offsets` is the same array
/// in host memory when the counts were given on the host, and null when they stayed on the device
/// (a base that needs sizes on the host must then fetch them itself, and say so).
struct ExpertSegments {
  const std::int64_t* offsets = nullptr;
  const std::int64_t* host_offsets = nullptr;
  std::int64_t num_experts = 0;
  std::int64_t rows = 0;
};

}  // namespace moelora
