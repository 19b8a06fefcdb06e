/// \file
/// \brief The benchmark shapes of DESIGN.md §8 and their routed-row counts (the same rule as
/// bench/torch_anchors.py, so both sides time identical problems).
#pragma once

#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

namespace moelora::bench {

struct Shape {
  std::string name;
  std::int64_t experts, in, out, rows;
};

inline const std::vector<Shape> kShapes = {
    {"qwen3_30b_a3b.fc1", 128, 2048, 1536, 65536}, {"qwen3_30b_a3b.fc2", 128, 768, 2048, 65536},
    {"mixtral_8x7b.fc1", 8, 4096, 28672, 16384},   {"mixtral_8x7b.fc2", 8, 14336, 4096, 16384},
    {"nemotron3_nano.fc1", 128, 2688, 1856, 49152}, {"nemotron3_nano.fc2", 128, 1856, 2688, 49152},
    {"deepseek_v3.fc1", 256, 7168, 4096, 65536},    {"deepseek_v3.fc2", 256, 2048, 7168, 65536},
    {"gpt_oss_20b.fc1", 32, 2880, 5760, 32768},     {"gpt_oss_20b.fc2", 32, 2880, 2880, 32768},
};

/// uniform: ⌊T/E⌋ each; zipf: ⌊T · w_e / Σw⌋ with w_e = (e+1)^−1.2. The first experts take the
/// remainder, one row each.
inline std::vector<std::int64_t> routed_counts(const Shape& s, const std::string& kind) {
  std::vector<double> weights(static_cast<std::size_t>(s.experts), 1.0);
  if (kind == "zipf")
    for (std::size_t e = 0; e < weights.size(); ++e) weights[e] = std::pow(static_cast<double>(e + 1), -1.2);
  double total = 0.0;
  for (double w : weights) total += w;
  std::vector<std::int64_t> counts(weights.size());
  std::int64_t given = 0;
  for (std::size_t e = 0; e < counts.size(); ++e) {
    counts[e] = static_cast<std::int64_t>(std::floor(static_cast<double>(s.rows) * weights[e] / total));
    given += counts[e];
  }
  for (std::size_t e = 0; given < s.rows; ++e, ++given) ++counts[e];
  return counts;
}

/// Bytes the LoRA delta forward must move at least (bf16, in-place add, DESIGN.md §8).
inline double forward_floor_bytes(const Shape& s, std::int64_t rank) {
  return 2.0 * static_cast<double>(s.rows * s.in + 2 * s.rows * s.out + s.experts * rank * (s.in + s.out));
}

}  // namespace moelora::bench
