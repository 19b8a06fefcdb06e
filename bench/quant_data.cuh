/// \file
/// \brief Data of the quantizer benchmarks: the weight shapes, bell-shaped bf16 weights and the
/// bytes each quantizer operation moves at least.
#pragma once

#include <cuda_bf16.h>

#include <cstdint>

#include "moelora/core/random.hpp"
#include "moelora/quant/format.hpp"

namespace moelora::bench {

/// A weight shape `[experts, out, in]` of the benchmark.
struct QuantShape {
  const char* name;
  std::int64_t experts, out, in;
};

/// Qwen3-30B-A3B fc2 and Mixtral 8x7B fc1.
inline constexpr QuantShape kQuantShapes[] = {{"qwen3_30b_a3b.fc2", 128, 768, 2048}, {"mixtral_8x7b", 8, 4096, 14336}};

/// Sum of 3 uniforms times 0.02: a bell shape, with the occasional larger value a real weight has.
template <class T>
__global__ void fill_normalish_kernel(T* data, std::int64_t n, std::uint64_t seed) {
  for (std::int64_t i = blockIdx.x * static_cast<std::int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<std::int64_t>(gridDim.x) * blockDim.x) {
    const float u = uniform01(seed, 0, static_cast<std::uint64_t>(i)) + uniform01(seed, 1, static_cast<std::uint64_t>(i)) +
                    uniform01(seed, 2, static_cast<std::uint64_t>(i)) - 1.5f;
    data[i] = __float2bfloat16(u * 0.02f);
  }
}

/// Bytes each operation on a bf16 weight of `numel` elements must move: fake_quantize reads w
/// (twice with a tensor amax: the amax pass and the quantize pass) and writes out (bf16); quantize
/// reads w the same and writes the packed blob; dequantize reads the blob and writes out.
struct QuantBytes {
  double fake, quantize, dequantize;
};
inline QuantBytes quant_bytes(const quant::QuantSpec& spec, std::int64_t numel, std::size_t packed_bytes) {
  const double weight = static_cast<double>(numel) * 2.0;
  const double reads = weight * (quant::has_tensor_amax(spec) ? 2.0 : 1.0);
  const auto packed = static_cast<double>(packed_bytes);
  return {reads + weight, reads + packed, packed + weight};
}

}  // namespace moelora::bench
