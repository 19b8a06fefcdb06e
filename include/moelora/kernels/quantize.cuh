/// \file
/// \brief Device kernels of the weight quantizers (moelora/cuda/quantize.hpp): tensor amax
/// reduction, quantize / fake-quantize over groups along `in`, per-channel INT8, and dequantize.
///
/// Every thread owns a chunk of 8 consecutive elements of one row (`in` axis), loaded as one
/// 16-byte vector (two for fp32) when rows are 8-aligned, element by element otherwise. A group of
/// G elements (NVFP4 16, MXFP4 32, NF4 64, INT4 128) is G/8 neighbouring lanes of one warp, which
/// reduce the group's amax by shuffles. The per-element arithmetic is moelora/quant/codec.hpp's,
/// the host's, so results are equal bit for bit.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include "moelora/kernels/common.cuh"
#include "moelora/quant/codec.hpp"

namespace moelora::kernels {

/// Elements per thread of the quantizer kernels.
inline constexpr int kQuantChunk = 8;
/// Threads per block of the quantizer kernels (at most).
inline constexpr int kQuantThreads = 256;

/// Rows and groups of a `[E, out, in]` weight seen as E·out rows of `in` elements.
struct QuantGeometry {
  std::int64_t rows_per_expert;  ///< out
  std::int64_t in;               ///< elements per row
  std::int64_t groups_per_row;   ///< entries of the scales section per row (1 per channel, ⌈in/G⌉ per block)
  std::int64_t code_row_bytes;   ///< bytes of codes per row: in (8-bit) or ⌈in/2⌉ (4-bit)
};

/// Device pointers to the sections of a packed blob (absent sections: nullptr).
template <class Byte>
struct PackedSections {
  Byte* codes;
  std::conditional_t<std::is_const_v<Byte>, const void*, void*> scales;
  std::conditional_t<std::is_const_v<Byte>, const float*, float*> amax;
};

/// Max of `value` over the block; every thread gets it. One call per kernel (static shared memory).
__device__ __forceinline__ std::uint32_t block_max_u32(std::uint32_t value) {
  __shared__ std::uint32_t warp_max[kQuantThreads / 32];
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) value = max(value, __shfl_xor_sync(0xffffffffu, value, offset));
  if ((threadIdx.x & 31) == 0) warp_max[threadIdx.x >> 5] = value;
  __syncthreads();
  value = 0;
  for (unsigned w = 0; w < (blockDim.x + 31) / 32; ++w) value = max(value, warp_max[w]);
  return value;
}

/// Loads elements [c0, c0 + 8) of `row` as fp32; columns ≥ in read as 0.
template <bool Vec, class T>
__device__ __forceinline__ void load_chunk(const T* row, std::int64_t c0, std::int64_t in, float (&v)[kQuantChunk]) {
  if constexpr (Vec) {
    const Vec8<T> x = *reinterpret_cast<const Vec8<T>*>(row + c0);
#pragma unroll
    for (int j = 0; j < kQuantChunk; ++j) v[j] = to_float(x.v[j]);
  } else {
#pragma unroll
    for (int j = 0; j < kQuantChunk; ++j) v[j] = c0 + j < in ? to_float(row[c0 + j]) : 0.0f;
  }
}

/// Stores elements [c0, min(c0 + 8, in)) of `row`, each rounded once from fp32.
template <bool Vec, class T>
__device__ __forceinline__ void store_chunk(T* row, std::int64_t c0, std::int64_t in, const float (&v)[kQuantChunk]) {
  if constexpr (Vec) {
    Vec8<T> x;
#pragma unroll
    for (int j = 0; j < kQuantChunk; ++j) x.v[j] = from_float<T>(v[j]);
    *reinterpret_cast<Vec8<T>*>(row + c0) = x;
  } else {
#pragma unroll
    for (int j = 0; j < kQuantChunk; ++j)
      if (c0 + j < in) row[c0 + j] = from_float<T>(v[j]);
  }
}

/// Stores the codes of elements [c0, c0 + 8) of a row whose codes start at `codes` (8-bit: one
/// byte each; 4-bit: two per byte, low nibble first; codes of columns ≥ in are 0).
template <int Bits, bool Vec>
__device__ __forceinline__ void store_codes(std::uint8_t* codes, std::int64_t c0, std::int64_t in,
                                            const std::uint8_t (&c)[kQuantChunk]) {
  if constexpr (Bits == 8) {
    if constexpr (Vec) {
      uint2 packed;
      packed.x = c[0] | (c[1] << 8) | (c[2] << 16) | (static_cast<std::uint32_t>(c[3]) << 24);
      packed.y = c[4] | (c[5] << 8) | (c[6] << 16) | (static_cast<std::uint32_t>(c[7]) << 24);
      *reinterpret_cast<uint2*>(codes + c0) = packed;
    } else {
#pragma unroll
      for (int j = 0; j < kQuantChunk; ++j)
        if (c0 + j < in) codes[c0 + j] = c[j];
    }
  } else {
    if constexpr (Vec) {
      std::uint32_t packed = 0;
#pragma unroll
      for (int j = 0; j < kQuantChunk; ++j) packed |= static_cast<std::uint32_t>(c[j] & 0xfu) << (4 * j);
      *reinterpret_cast<std::uint32_t*>(codes + c0 / 2) = packed;
    } else {
#pragma unroll
      for (int j = 0; j < kQuantChunk; j += 2)
        if (c0 + j < in) codes[(c0 + j) / 2] = static_cast<std::uint8_t>((c[j] & 0xfu) | ((c[j + 1] & 0xfu) << 4));
    }
  }
}

/// Loads the codes of elements [c0, c0 + 8) (columns ≥ in: 0).
template <int Bits, bool Vec>
__device__ __forceinline__ void load_codes(const std::uint8_t* codes, std::int64_t c0, std::int64_t in,
                                           std::uint8_t (&c)[kQuantChunk]) {
  if constexpr (Bits == 8) {
    if constexpr (Vec) {
      const uint2 packed = *reinterpret_cast<const uint2*>(codes + c0);
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        c[j] = static_cast<std::uint8_t>(packed.x >> (8 * j));
        c[j + 4] = static_cast<std::uint8_t>(packed.y >> (8 * j));
      }
    } else {
#pragma unroll
      for (int j = 0; j < kQuantChunk; ++j) c[j] = c0 + j < in ? codes[c0 + j] : 0;
    }
  } else {
    if constexpr (Vec) {
      const std::uint32_t packed = *reinterpret_cast<const std::uint32_t*>(codes + c0 / 2);
#pragma unroll
      for (int j = 0; j < kQuantChunk; ++j) c[j] = static_cast<std::uint8_t>((packed >> (4 * j)) & 0xfu);
    } else {
#pragma unroll
      for (int j = 0; j < kQuantChunk; j += 2) {
        const std::uint8_t b = c0 + j < in ? codes[(c0 + j) / 2] : 0;
        c[j] = b & 0xfu;
        c[j + 1] = b >> 4;
      }
    }
  }
}

/// The NF4 values in shared memory (`table` of 16), for decoding with one shared load; a no-op for
/// other schemes. Every thread of the block must call it (it synchronises the block).
template <quant::Scheme S>
__device__ __forceinline__ void init_decode_table(float* table) {
  if constexpr (S == quant::Scheme::nf4) {
    if (threadIdx.x < 16) table[threadIdx.x] = quant::nf4_value(static_cast<int>(threadIdx.x));
    __syncthreads();
  }
}

/// The value of `code` (what SchemeCodec<S>::decode returns, bit for bit).
template <quant::Scheme S>
__device__ __forceinline__ float decode_value(std::uint8_t code, quant::GroupScale scale, const float* table) {
  if constexpr (S == quant::Scheme::nf4) return table[code & 0xfu] * scale.dec;
  else return quant::SchemeCodec<S>::decode(code, scale);
}

/// Per-expert amax of w `[E, per_expert]` as |x| bits: atomicMax into amax[e] (or amax[0] when
/// `shared`); `amax` is zeroed before. Grid (blocks per expert, E), kQuantThreads threads.
template <bool Vec, class T>
__global__ void __launch_bounds__(kQuantThreads)
    tensor_amax_kernel(const T* w, std::int64_t per_expert, std::uint32_t* amax, bool shared) {
  const std::int64_t e = blockIdx.y;
  const T* x = w + e * per_expert;
  const std::int64_t stride = static_cast<std::int64_t>(gridDim.x) * blockDim.x;
  std::uint32_t m = 0;
  if constexpr (Vec) {
    for (std::int64_t k = blockIdx.x * static_cast<std::int64_t>(blockDim.x) + threadIdx.x; k < per_expert / kQuantChunk;
         k += stride) {
      const Vec8<T> v = reinterpret_cast<const Vec8<T>*>(x)[k];
#pragma unroll
      for (int j = 0; j < kQuantChunk; ++j) m = max(m, quant::abs_bits(to_float(v.v[j])));
    }
  } else {
    for (std::int64_t i = blockIdx.x * static_cast<std::int64_t>(blockDim.x) + threadIdx.x; i < per_expert; i += stride)
      m = max(m, quant::abs_bits(to_float(x[i])));
  }
  m = block_max_u32(m);
  if (threadIdx.x == 0 && m != 0) atomicMax(amax + (shared ? 0 : e), m);
}

/// Quantizes (Out = void: codes, scales and amax into `packed`) or fake-quantizes (into `out` of
/// type Out) w `[rows, in]`, one 8-element chunk per thread, for schemes with kGroup ≥ 0 (groups
/// of G/8 lanes; per-tensor schemes: single chunks). Grid (rows, chunk blocks); `tensor_amax` is
/// the reduced amax bits (index 0 when `shared`, else the expert), unused without a tensor amax.
template <quant::Scheme S, bool Vec, class In, class Out>
__global__ void __launch_bounds__(kQuantThreads)
    quantize_groups_kernel(const In* w, Out* out, PackedSections<std::uint8_t> packed,
                           const std::uint32_t* tensor_amax, bool shared, QuantGeometry g) {
  using Codec = quant::SchemeCodec<S>;
  constexpr int kLanes = Codec::kGroup > 0 ? Codec::kGroup / kQuantChunk : 1;  // threads per group
  __shared__ float table[16];
  init_decode_table<S>(table);
  const std::int64_t row = blockIdx.x;
  const std::int64_t chunk = static_cast<std::int64_t>(blockIdx.y) * blockDim.x + threadIdx.x;
  const std::int64_t c0 = chunk * kQuantChunk;
  const bool active = c0 < g.in;
  const std::int64_t e = row / g.rows_per_expert;

  float v[kQuantChunk];
  if (active) load_chunk<Vec>(w + row * g.in, c0, g.in, v);
  else
#pragma unroll
    for (int j = 0; j < kQuantChunk; ++j) v[j] = 0.0f;
  float amax = 0.0f;
  if constexpr (Codec::kTensorAmax) amax = moelora::detail::bits_float(tensor_amax[shared ? 0 : e]);
  std::uint32_t group_amax = 0;
  if constexpr (Codec::kGroup > 0) {
#pragma unroll
    for (int j = 0; j < kQuantChunk; ++j) group_amax = max(group_amax, quant::abs_bits(v[j]));
#pragma unroll
    for (int offset = 1; offset < kLanes; offset <<= 1)
      group_amax = max(group_amax, __shfl_xor_sync(0xffffffffu, group_amax, offset));
  }
  typename Codec::Stored stored{};
  const quant::GroupScale scale = Codec::make(moelora::detail::bits_float(group_amax), amax, stored);
  if (!active) return;  // after the shuffles, which need every lane

  std::uint8_t codes[kQuantChunk];
#pragma unroll
  for (int j = 0; j < kQuantChunk; ++j) codes[j] = c0 + j < g.in ? Codec::encode(v[j], scale) : 0;
  if constexpr (std::is_void_v<Out>) {
    store_codes<Codec::kBits, Vec>(packed.codes + row * g.code_row_bytes, c0, g.in, codes);
    if constexpr (Codec::kGroup > 0)
      if (chunk % kLanes == 0)
        static_cast<typename Codec::Stored*>(packed.scales)[row * g.groups_per_row + chunk / kLanes] = stored;
    if constexpr (Codec::kTensorAmax)
      if (chunk == 0 && row % g.rows_per_expert == 0) packed.amax[e] = amax;
  } else {
    float y[kQuantChunk];
#pragma unroll
    for (int j = 0; j < kQuantChunk; ++j) y[j] = decode_value<S>(codes[j], scale, table);
    store_chunk<Vec>(out + row * g.in, c0, g.in, y);
  }
}

/// Per-channel INT8: one block per row reduces the row's amax, then quantizes (Out = void) or
/// fake-quantizes the row, re-reading it. Grid (rows).
template <bool Vec, class In, class Out>
__global__ void __launch_bounds__(kQuantThreads)
    quantize_channels_kernel(const In* w, Out* out, PackedSections<std::uint8_t> packed, QuantGeometry g) {
  using Codec = quant::SchemeCodec<quant::Scheme::int8_channel>;
  const std::int64_t row = blockIdx.x;
  const In* x = w + row * g.in;
  const std::int64_t chunks = (g.in + kQuantChunk - 1) / kQuantChunk;
  std::uint32_t row_amax = 0;
  float v[kQuantChunk];
  for (std::int64_t k = threadIdx.x; k < chunks; k += blockDim.x) {
    load_chunk<Vec>(x, k * kQuantChunk, g.in, v);
#pragma unroll
    for (int j = 0; j < kQuantChunk; ++j) row_amax = max(row_amax, quant::abs_bits(v[j]));
  }
  row_amax = block_max_u32(row_amax);  // every read of the row precedes every write (out may alias w)
  float stored = 0.0f;
  const quant::GroupScale scale = Codec::make(moelora::detail::bits_float(row_amax), 0.0f, stored);
  if constexpr (std::is_void_v<Out>)
    if (threadIdx.x == 0) static_cast<float*>(packed.scales)[row] = stored;
  for (std::int64_t k = threadIdx.x; k < chunks; k += blockDim.x) {
    const std::int64_t c0 = k * kQuantChunk;
    load_chunk<Vec>(x, c0, g.in, v);
    std::uint8_t codes[kQuantChunk];
#pragma unroll
    for (int j = 0; j < kQuantChunk; ++j) codes[j] = c0 + j < g.in ? Codec::encode(v[j], scale) : 0;
    if constexpr (std::is_void_v<Out>) {
      store_codes<8, Vec>(packed.codes + row * g.code_row_bytes, c0, g.in, codes);
    } else {
      float y[kQuantChunk];
#pragma unroll
      for (int j = 0; j < kQuantChunk; ++j) y[j] = Codec::decode(codes[j], scale);
      store_chunk<Vec>(out + row * g.in, c0, g.in, y);
    }
  }
}

/// Dequantizes rows [row0, row0 + gridDim.x) of a packed weight into out `[gridDim.x, in]`.
/// Grid (rows, chunk blocks).
template <quant::Scheme S, bool Vec, class Out>
__global__ void __launch_bounds__(kQuantThreads)
    dequantize_kernel(PackedSections<const std::uint8_t> packed, std::int64_t row0, QuantGeometry g, Out* out) {
  using Codec = quant::SchemeCodec<S>;
  __shared__ float table[16];
  init_decode_table<S>(table);
  const std::int64_t row = row0 + blockIdx.x;
  const std::int64_t chunk = static_cast<std::int64_t>(blockIdx.y) * blockDim.x + threadIdx.x;
  const std::int64_t c0 = chunk * kQuantChunk;
  if (c0 >= g.in) return;
  float amax = 0.0f;
  if constexpr (Codec::kTensorAmax) amax = packed.amax[row / g.rows_per_expert];
  typename Codec::Stored stored{};
  const auto* scales = static_cast<const typename Codec::Stored*>(packed.scales);
  if constexpr (Codec::kGroup > 0) stored = scales[row * g.groups_per_row + c0 / Codec::kGroup];
  else if constexpr (Codec::kGroup < 0) stored = scales[row];
  const quant::GroupScale scale = Codec::load(stored, amax);
  std::uint8_t codes[kQuantChunk];
  load_codes<Codec::kBits, Vec>(packed.codes + row * g.code_row_bytes, c0, g.in, codes);
  float y[kQuantChunk];
#pragma unroll
  for (int j = 0; j < kQuantChunk; ++j) y[j] = decode_value<S>(codes[j], scale, table);
  store_chunk<Vec>(out + (row - row0) * g.in, c0, g.in, y);
}

}  // namespace moelora::kernels
