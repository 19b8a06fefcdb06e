/// \file
/// \brief Device kernels of the weight quantizers (moelora/cuda/quantize.hpp): tensor amax
/// reduction, quantize / fake-quantize over groups along `in`, per-channel INT8, and dequantize.
///
/// Work is cut into chunks of 8 consecutive elements of one row (`in` axis), loaded as one 16-byte
/// vector (two for fp32) when rows are 8-aligned, element by element otherwise. The group and
/// dequantize kernels give each thread a few chunks (slabs, QuantTiling): slab s of a block is blockDim.x
/// consecutive chunks, one per thread, so every load and store of a warp is contiguous. A group of
/// G elements (NVFP4 16, MXFP4 32, NF4 64, INT4 128) is G/8 neighbouring lanes of one warp, which
/// reduce the group's amax by shuffles.
///
/// The arithmetic is moelora/quant/codec.hpp's, the host's, so results are equal bit for bit; only
/// where it is computed moves. Decoding reads precomputed code values: the 256 values under the
/// block's one scale (8-bit schemes: one tensor or one row per block), the 16 unit values times the
/// group's scale (NVFP4, NF4, MXFP4), or the 16 values of an INT4 group, one per lane of the group,
/// fetched by shuffles. NVFP4 and NF4 encode by comparing with the group's code thresholds
/// (SchemeCodec::encode_below), computed once per group by its lanes, instead of a division per
/// element; NF4 and NVFP4 look the candidate code of each element up by its approximate bin and make one
/// comparison (quant::count_below_binned). MXFP4 computes each E2M1 index directly
/// (quant::e2m1_index) and gathers a chunk's sign bits by byte permutes.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include "moelora/kernels/common.cuh"
#include "moelora/quant/codec.hpp"

namespace moelora::kernels {

/// Elements per chunk.
inline constexpr int kQuantChunk = 8;
/// Threads per block of the amax kernel.
inline constexpr int kAmaxThreads = 256;
/// Threads per block (at most) of the per-channel kernel, and chunks each keeps in registers
/// between its two passes over the row (rows up to 512·4·8 = 16384 elements are read once).
inline constexpr int kChannelThreads = 512;
inline constexpr int kChannelKeep = 4;

/// Tiling of the group and dequantize kernels: chunks per thread (slabs) when fake-quantizing,
/// quantizing and dequantizing, and the widest block, in warps (the launcher picks 1 to Warps
/// warps a block, as few idle threads per row as possible). Every slab is one more 16-byte load
/// (or store) a thread has in flight.
template <int FakeSlabs, int QuantizeSlabs, int DequantizeSlabs, int Warps>
struct QuantTiling {
  static_assert(FakeSlabs >= 1 && QuantizeSlabs >= 1 && DequantizeSlabs >= 1, "every thread takes at least one chunk");
  static_assert(Warps >= 1 && Warps <= 32, "a block has 1 to 32 warps");
  static constexpr int kDequantizeSlabs = DequantizeSlabs;
  static constexpr int kWarps = Warps;
  /// Slabs of the group kernel: quantizing (Out = void) or fake-quantizing into Out.
  template <class Out>
  static constexpr int group_slabs = std::is_void_v<Out> ? QuantizeSlabs : FakeSlabs;
};

/// The quantizers' tiling on the H200 (bench/sweep_quant.cu measures the alternatives): 4 slabs
/// when quantizing (the 4-bit encodes are instruction bound and write few bytes: more independent
/// work a thread), 2 when fake-quantizing (32 bytes read and 32 written a thread; more costs
/// registers and occupancy), 4 when dequantizing (a thread reads 4 or 8 bytes of codes per 16
/// bytes it writes: with 2 slabs too few reads were in flight on the H200); blocks of up to 4 warps.
using DefaultQuantTiling = QuantTiling<2, 4, 4, 4>;

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

/// What the kernels need to know of scheme S beyond its codec.
template <quant::Scheme S>
struct SchemeLayout {
  using Codec = quant::SchemeCodec<S>;
  /// Lanes per group (1 without groups along `in`).
  static constexpr int kLanes = Codec::kGroup > 0 ? Codec::kGroup / kQuantChunk : 1;
  /// Whether the scheme encodes by thresholds, and how many per group.
  static constexpr bool kThresholded = requires { Codec::kThresholds; };
  static constexpr int kThresholds = [] {
    if constexpr (kThresholded) return Codec::kThresholds;
    else return 0;
  }();
  /// Whether the scheme encodes by bins (count_below_binned), and its table size (kBins + 1).
  static constexpr bool kBinned = requires { Codec::kBins; };
  static constexpr int kBinTable = [] {
    if constexpr (kBinned) return Codec::kBins + 1;
    else return 1;
  }();
  /// Thresholds each lane of a group computes (k = lane in group + i·kLanes; k ≥ kThresholds: the
  /// spare threshold +∞), and floats per group in the threshold scratch.
  static constexpr int kThresholdsPerLane = (kThresholds + kLanes) / kLanes;
  static constexpr int kThresholdStride = kThresholdsPerLane * kLanes;
  /// Entries of the block's decode table: 256 code values (8-bit), 16 unit values, or none (INT4).
  static constexpr int kTableSize = Codec::kBits == 8 ? 256 : requires { Codec::unit_value(std::uint8_t{}); } ? 16 : 0;
};

/// The compile-time constants of a threshold scheme, in device memory (read once per block): each
/// threshold slot's code boundary (the spare +∞ past kThresholds) and, for binned schemes, the
/// candidate code of each bin, four to a word (bin n in byte n % 4 of word n / 4, little endian).
template <quant::Scheme S>
struct SchemeConstants {
  using Layout = SchemeLayout<S>;
  static constexpr int kBinWords = (Layout::kBinTable + 3) / 4;
  double boundaries[Layout::kThresholdStride];
  std::uint32_t bin_words[kBinWords];
  constexpr SchemeConstants() : boundaries{}, bin_words{} {
    for (int k = 0; k < Layout::kThresholdStride; ++k)
      boundaries[k] = k < Layout::kThresholds ? quant::SchemeCodec<S>::boundary(k) : quant::kSpareBoundary;
    if constexpr (Layout::kBinned)
      for (int n = 0; n < Layout::kBinTable; ++n)
        bin_words[n / 4] |= static_cast<std::uint32_t>(quant::SchemeCodec<S>::bin_code(n)) << (8 * (n % 4));
  }
};
template <quant::Scheme S>
__device__ constexpr SchemeConstants<S> kSchemeConstants{};

/// Shared memory of a group or dequantize kernel block of up to `Warps` warps: the decode table
/// and, for binned schemes, the candidate code of each bin and, for threshold schemes, each warp's
/// group thresholds (one set per slab of the Slabs a thread has).
template <quant::Scheme S, int Slabs, int Warps>
struct QuantShared {
  using Layout = SchemeLayout<S>;
  static constexpr int kGroupsPerWarp = 32 / Layout::kLanes;
  float table[Layout::kTableSize > 0 ? Layout::kTableSize : 1];
  union {
    std::uint8_t bins[Layout::kBinTable];
    std::uint32_t bin_words[SchemeConstants<S>::kBinWords];
  };
  float thresholds[Layout::kThresholded ? Warps : 1][Slabs]
                  [Layout::kThresholded ? kGroupsPerWarp * Layout::kThresholdStride : 1];
};

/// Fills the block's shared constants: the decode table under `scale` (when `Decode`: the 256
/// code values of 8-bit schemes, whose scale is the block's; the 16 unit values otherwise) and the
/// bin table of binned schemes (when `Encode`); then synchronises the block. Every thread must
/// call it.
template <quant::Scheme S, bool Decode, bool Encode, int Slabs, int Warps>
__device__ __forceinline__ void fill_shared(QuantShared<S, Slabs, Warps>& smem, quant::GroupScale scale) {
  using Codec = quant::SchemeCodec<S>;
  using Layout = SchemeLayout<S>;
  constexpr bool kTable = Decode && Layout::kTableSize > 0;
  constexpr bool kBins = Encode && Layout::kBinned;
  if constexpr (kTable) {
    if constexpr (Layout::kTableSize == 256) {
      for (unsigned c = threadIdx.x; c < 256; c += blockDim.x) smem.table[c] = Codec::decode(static_cast<std::uint8_t>(c), scale);
    } else if (threadIdx.x < 16) {
      smem.table[threadIdx.x] = Codec::unit_value(static_cast<std::uint8_t>(threadIdx.x));
    }
  }
  if constexpr (kBins)
    if (threadIdx.x < SchemeConstants<S>::kBinWords) smem.bin_words[threadIdx.x] = kSchemeConstants<S>.bin_words[threadIdx.x];
  if constexpr (kTable || kBins) __syncthreads();
}

/// Decodes the codes of one group: what SchemeCodec<S>::decode returns, bit for bit. Every lane of
/// the warp must construct it and decode the same number of codes (INT4 shuffles).
template <quant::Scheme S>
struct GroupDecoder {
  using Codec = quant::SchemeCodec<S>;
  const float* table;
  quant::GroupScale scale;
  float lane_value = 0.0f;  ///< INT4: the value of code (lane mod 16) in this lane's group

  __device__ __forceinline__ GroupDecoder(const float* table_, quant::GroupScale scale_) : table(table_), scale(scale_) {
    if constexpr (SchemeLayout<S>::kTableSize == 0) {
      static_assert(SchemeLayout<S>::kLanes == 16, "the INT4 value table has one entry per lane of a 16-lane group");
      lane_value = Codec::decode(static_cast<std::uint8_t>(threadIdx.x & 15), scale);
    }
  }
  __device__ __forceinline__ float operator()(std::uint32_t code) const {
    constexpr int kTableSize = SchemeLayout<S>::kTableSize;
    if constexpr (kTableSize == 256) return table[code];
    else if constexpr (kTableSize == 16) return table[code & 0xf] * scale.dec;
    else return __shfl_sync(0xffffffffu, lane_value, code & 0xf, 16);
  }
};

/// This lane's share of its groups' thresholds: boundaries k = lane in group + i·kLanes.
template <quant::Scheme S>
struct LaneBoundaries {
  using Layout = SchemeLayout<S>;
  double at[Layout::kThresholdsPerLane > 0 ? Layout::kThresholdsPerLane : 1];

  __device__ __forceinline__ LaneBoundaries() {
    if constexpr (Layout::kThresholded)
#pragma unroll
      for (int i = 0; i < Layout::kThresholdsPerLane; ++i)
        at[i] = kSchemeConstants<S>.boundaries[static_cast<int>(threadIdx.x % Layout::kLanes) + i * Layout::kLanes];
  }
  /// Writes the thresholds of this lane's group under `scale` into `group` (the group's slots of
  /// the warp's scratch) and synchronises the warp; returns `group`.
  __device__ __forceinline__ const float* fill(float* group, quant::GroupScale scale) const {
    const float divisor = quant::SchemeCodec<S>::divisor(scale);
#pragma unroll
    for (int i = 0; i < Layout::kThresholdsPerLane; ++i)
      group[static_cast<int>(threadIdx.x % Layout::kLanes) + i * Layout::kLanes] = quant::code_threshold(at[i], divisor);
    __syncwarp();
    return group;
  }
};

/// Max of `value` over the block (up to 1024 threads); every thread gets it. One call per kernel
/// (static shared memory).
__device__ __forceinline__ std::uint32_t block_max_u32(std::uint32_t value) {
  __shared__ std::uint32_t warp_max[32];
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
    Vec8<T> x{};  // Vec: the chunk is all in (in % 8 == 0) or all out
    if (c0 < in) x = *reinterpret_cast<const Vec8<T>*>(row + c0);
    if constexpr (std::is_same_v<T, __nv_bfloat16>) {
      // A bf16 is the top half of its fp32: one shift or mask per element of each packed pair.
      const auto& pairs = reinterpret_cast<const std::uint32_t(&)[kQuantChunk / 2]>(x);
#pragma unroll
      for (int j = 0; j < kQuantChunk / 2; ++j) {
        v[2 * j] = moelora::detail::bits_float(pairs[j] << 16);
        v[2 * j + 1] = moelora::detail::bits_float(pairs[j] & 0xffff0000u);
      }
    } else {
#pragma unroll
      for (int j = 0; j < kQuantChunk; ++j) v[j] = to_float(x.v[j]);
    }
  } else {
#pragma unroll
    for (int j = 0; j < kQuantChunk; ++j) v[j] = c0 + j < in ? to_float(row[c0 + j]) : 0.0f;
  }
}

/// Stores elements [c0, min(c0 + 8, in)) of `row`, each rounded once from fp32.
template <bool Vec, class T>
__device__ __forceinline__ void store_chunk(T* row, std::int64_t c0, std::int64_t in, const float (&v)[kQuantChunk]) {
  if constexpr (Vec && std::is_same_v<T, float>) {
    __stwb(reinterpret_cast<float4*>(row + c0), make_float4(v[0], v[1], v[2], v[3]));
    __stwb(reinterpret_cast<float4*>(row + c0 + 4), make_float4(v[4], v[5], v[6], v[7]));
  } else if constexpr (Vec) {
    __stwb(reinterpret_cast<uint4*>(row + c0), pack_rounded8<T>(v));
  } else {
#pragma unroll
    for (int j = 0; j < kQuantChunk; ++j)
      if (c0 + j < in) row[c0 + j] = from_float<T>(v[j]);
  }
}

/// Bit 4j + 3 set where v[j] has its sign bit set, nothing else: the sign bits of a chunk's E2M1
/// nibbles. A byte permute (prmt) whose selector nibble has bit 3 set fills the output byte with
/// the sign of the byte it picks (byte 3 of a float: its sign), so `even` holds 0xff in byte k
/// where v[2k] is negative, `odd` where v[2k + 1] is: 6 permutes and 2 logic ops for 8 elements.
__device__ __forceinline__ std::uint32_t chunk_sign_nibbles(const float (&v)[kQuantChunk]) {
  const auto prmt = [](std::uint32_t a, std::uint32_t b, std::uint32_t selector) {
    std::uint32_t r;
    asm("prmt.b32 %0, %1, %2, %3;" : "=r"(r) : "r"(a), "r"(b), "r"(selector));
    return r;
  };
  const auto f = [&](int k) { return moelora::detail::float_bits(v[k]); };
  const auto signs = [&](int j) {  // bytes 0, 1: signs of v[j], v[j + 2]; bytes 2, 3: v[j + 4], v[j + 6]
    return prmt(prmt(f(j), f(j + 2), 0xfbu), prmt(f(j + 4), f(j + 6), 0xfb00u), 0x7610u);
  };
  const std::uint32_t even = signs(0), odd = signs(1);
  return ((even & 0x0f0f0f0fu) | (odd & 0xf0f0f0f0u)) & 0x88888888u;
}

/// Stores the codes (each below 2^Bits) of elements [c0, c0 + 8) of a row whose codes start at
/// `codes` (8-bit: one byte each; 4-bit: two per byte, low nibble first, or-ed with `extra`, bits
/// of the packed nibbles; codes of columns ≥ in must be 0).
template <int Bits, bool Vec>
__device__ __forceinline__ void store_codes(std::uint8_t* codes, std::int64_t c0, std::int64_t in,
                                            const std::uint32_t (&c)[kQuantChunk], std::uint32_t extra = 0) {
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
      std::uint32_t packed = 0;  // codes below 16: adding them packs them (an IMAD each)
#pragma unroll
      for (int j = 0; j < kQuantChunk; ++j) packed += c[j] << (4 * j);
      *reinterpret_cast<std::uint32_t*>(codes + c0 / 2) = packed | extra;
    } else {
#pragma unroll
      for (int j = 0; j < kQuantChunk; j += 2)
        if (c0 + j < in) codes[(c0 + j) / 2] = static_cast<std::uint8_t>(c[j] | (c[j + 1] << 4) | (extra >> (4 * j)));
    }
  }
}

/// The codes of one chunk as loaded: 8 bytes (8-bit codes) or 4 (4-bit codes, low nibble first),
/// little endian; unpacked by `code_at` when decoded, so that a thread's chunks in flight take one
/// or two registers each.
template <int Bits>
struct PackedChunk {
  std::uint32_t w[Bits == 8 ? 2 : 1] = {};
};

/// Loads the codes of elements [c0, c0 + 8) (columns ≥ in: 0).
template <int Bits, bool Vec>
__device__ __forceinline__ PackedChunk<Bits> load_codes(const std::uint8_t* codes, std::int64_t c0, std::int64_t in) {
  PackedChunk<Bits> p;
  if constexpr (Vec) {
    if constexpr (Bits == 8) {
      const uint2 packed = *reinterpret_cast<const uint2*>(codes + c0);
      p.w[0] = packed.x, p.w[1] = packed.y;
    } else {
      p.w[0] = *reinterpret_cast<const std::uint32_t*>(codes + c0 / 2);
    }
  } else if constexpr (Bits == 8) {
#pragma unroll
    for (int j = 0; j < kQuantChunk; ++j)
      if (c0 + j < in) p.w[j / 4] |= static_cast<std::uint32_t>(codes[c0 + j]) << (8 * (j % 4));
  } else {
#pragma unroll
    for (int j = 0; j < kQuantChunk; j += 2)
      if (c0 + j < in) p.w[0] |= static_cast<std::uint32_t>(codes[(c0 + j) / 2]) << (4 * j);
  }
  return p;
}

/// Code j (< 8) of a loaded chunk.
template <int Bits>
__device__ __forceinline__ std::uint32_t code_at(const PackedChunk<Bits>& p, int j) {
  if constexpr (Bits == 8) return (p.w[j / 4] >> (8 * (j % 4))) & 0xffu;
  else return (p.w[0] >> (4 * j)) & 0xfu;
}

/// Chunk index of slab `s` of this thread along its block's row (grid (rows, chunk tiles of
/// Slabs·blockDim.x chunks)).
template <int Slabs>
__device__ __forceinline__ std::int64_t slab_chunk(int s) {
  return (static_cast<std::int64_t>(blockIdx.y) * Slabs + s) * blockDim.x + threadIdx.x;
}

/// Vector loads each thread of the amax kernel keeps in flight.
inline constexpr int kAmaxUnroll = 4;

/// Per-expert amax of w `[E, per_expert]` as |x| bits: atomicMax into amax[e] (or amax[0] when
/// `shared`); `amax` is zeroed before. Grid (blocks per expert, E), kAmaxThreads threads.
template <bool Vec, class T>
__global__ void __launch_bounds__(kAmaxThreads)
    tensor_amax_kernel(const T* w, std::int64_t per_expert, std::uint32_t* amax, bool shared) {
  const std::int64_t e = blockIdx.y;
  const T* x = w + e * per_expert;
  const std::int64_t stride = static_cast<std::int64_t>(gridDim.x) * blockDim.x;
  allow_dependent_launch();  // the quantize kernel loads w while this pass ends
  std::int64_t k = blockIdx.x * static_cast<std::int64_t>(blockDim.x) + threadIdx.x;
  std::uint32_t m = 0;
  if constexpr (Vec) {
    const auto* vx = reinterpret_cast<const Vec8<T>*>(x);
    const std::int64_t n = per_expert / kQuantChunk;
    for (; k + (kAmaxUnroll - 1) * stride < n; k += kAmaxUnroll * stride) {
      Vec8<T> v[kAmaxUnroll];
#pragma unroll
      for (int u = 0; u < kAmaxUnroll; ++u) v[u] = vx[k + u * stride];
#pragma unroll
      for (int u = 0; u < kAmaxUnroll; ++u)
#pragma unroll
        for (int j = 0; j < kQuantChunk; ++j) m = max(m, quant::abs_bits(to_float(v[u].v[j])));
    }
    for (; k < n; k += stride) {
      const Vec8<T> v = vx[k];
#pragma unroll
      for (int j = 0; j < kQuantChunk; ++j) m = max(m, quant::abs_bits(to_float(v.v[j])));
    }
  } else {
    for (; k < per_expert; k += stride) m = max(m, quant::abs_bits(to_float(x[k])));
  }
  m = block_max_u32(m);
  if (threadIdx.x == 0 && m != 0) atomicMax(amax + (shared ? 0 : e), m);
}

/// Quantizes (Out = void: codes, scales and amax into `packed`) or fake-quantizes (into `out` of
/// type Out) w `[rows, in]`, for schemes with kGroup ≥ 0 (groups of G/8 lanes; per-tensor schemes:
/// single chunks). Grid (rows, chunk tiles of Tiling::group_slabs<Out>·blockDim.x chunks), at most
/// Tiling::kWarps warps; `tensor_amax` is the reduced amax bits (index 0 when `shared`, else the
/// expert), unused without a tensor amax. A thread's loads of w are issued first, so that they are
/// in flight while the block fills its shared constants; with a tensor amax the kernel may run as
/// a programmatic dependent of the amax pass, which it waits for before reading the amax (and so
/// before any store: out may alias w).
template <quant::Scheme S, bool Vec, class In, class Out, class Tiling>
__global__ void __launch_bounds__(Tiling::kWarps * 32)
    quantize_groups_kernel(const In* w, Out* out, PackedSections<std::uint8_t> packed,
                           const std::uint32_t* tensor_amax, bool shared, QuantGeometry g) {
  using Codec = quant::SchemeCodec<S>;
  using Layout = SchemeLayout<S>;
  constexpr bool kFake = !std::is_void_v<Out>;
  constexpr int kSlabs = Tiling::template group_slabs<Out>;
  __shared__ QuantShared<S, kSlabs, Tiling::kWarps> smem;
  const std::int64_t row = blockIdx.x;
  const std::int64_t e = row / g.rows_per_expert;
  const In* x = w + row * g.in;
  float v[kSlabs][kQuantChunk];
#pragma unroll
  for (int s = 0; s < kSlabs; ++s) {
    load_chunk<Vec>(x, slab_chunk<kSlabs>(s) * kQuantChunk, g.in, v[s]);
  }

  float amax = 0.0f;
  if constexpr (Codec::kTensorAmax) {
    wait_for_prerequisites();
    amax = moelora::detail::bits_float(tensor_amax[shared ? 0 : e]);
  }
  fill_shared<S, kFake, true>(smem, Codec::load(typename Codec::Stored{}, amax));  // 8-bit tables: the tensor's scale
  const LaneBoundaries<S> boundaries;

  // This lane's group's thresholds in slab 0 of its warp's scratch; slab s is kThresholdSlab floats on.
  constexpr int kThresholdSlab = sizeof(smem.thresholds[0][0]) / sizeof(float);
  float* const group_thresholds = smem.thresholds[threadIdx.x / 32][0] +
                                  static_cast<int>(threadIdx.x % 32) / Layout::kLanes * Layout::kThresholdStride;

#pragma unroll
  for (int s = 0; s < kSlabs; ++s) {
    const std::int64_t chunk = slab_chunk<kSlabs>(s);
    const std::int64_t c0 = chunk * kQuantChunk;
    const bool active = c0 < g.in;
    std::uint32_t group_amax = 0;
    if constexpr (Codec::kGroup > 0) {
#pragma unroll
      for (int j = 0; j < kQuantChunk; ++j) group_amax = max(group_amax, quant::abs_bits(v[s][j]));
#pragma unroll
      for (int offset = 1; offset < Layout::kLanes; offset <<= 1)
        group_amax = max(group_amax, __shfl_xor_sync(0xffffffffu, group_amax, offset));
    }
    typename Codec::Stored stored{};
    const quant::GroupScale scale = Codec::make(moelora::detail::bits_float(group_amax), amax, stored);

    std::uint32_t codes[kQuantChunk];
    std::uint32_t sign_bits = 0;  // or-ed into the packed codes (quantizing MXFP4: the signs)
    if constexpr (Layout::kThresholded) {
      float* group = group_thresholds + s * kThresholdSlab;
      const float* t = boundaries.fill(group, scale);
      float bin_scale = 0.0f;  // binned schemes: 0 for a divisor out of the bins' range
      if constexpr (Layout::kBinned) bin_scale = Codec::bin_scale(scale, moelora::detail::bits_float(group_amax));
      if (bin_scale != 0.0f) {
        if constexpr (Layout::kBinned)
#pragma unroll
          for (int j = 0; j < kQuantChunk; ++j) codes[j] = Codec::encode_binned(v[s][j], bin_scale, smem.bins, t);
      } else {
#pragma unroll
        for (int j = 0; j < kQuantChunk; ++j) codes[j] = Codec::encode_below(v[s][j], t);
      }
    } else if constexpr (requires { Codec::encode_magnitude(0.0f, scale); }) {
      // MXFP4: Codec::encode codes a NaN as ±0 (index 0, its sign kept); with NaN replaced so,
      // it is the magnitude index plus the sign bit (gathered per chunk when quantizing).
      if (group_amax > 0x7f800000u)
#pragma unroll
        for (int j = 0; j < kQuantChunk; ++j)
          if (v[s][j] != v[s][j])
            v[s][j] = moelora::detail::bits_float(moelora::detail::float_bits(v[s][j]) & 0x80000000u);  // ±0
#pragma unroll
      for (int j = 0; j < kQuantChunk; ++j) codes[j] = Codec::encode_magnitude(v[s][j], scale);
      if constexpr (kFake)
#pragma unroll
        for (int j = 0; j < kQuantChunk; ++j) codes[j] |= (moelora::detail::float_bits(v[s][j]) >> 28) & 0x8u;
      else
        sign_bits = chunk_sign_nibbles(v[s]);
    } else {
#pragma unroll
      for (int j = 0; j < kQuantChunk; ++j) codes[j] = Codec::encode(v[s][j], scale);
    }
    if constexpr (!Vec)
#pragma unroll
      for (int j = 0; j < kQuantChunk; ++j)
        if (c0 + j >= g.in) codes[j] = 0;

    if constexpr (kFake) {
      const GroupDecoder<S> decode(smem.table, scale);
      float y[kQuantChunk];
#pragma unroll
      for (int j = 0; j < kQuantChunk; ++j) y[j] = decode(codes[j]);
      if (active) store_chunk<Vec>(out + row * g.in, c0, g.in, y);
    } else if (active) {
      store_codes<Codec::kBits, Vec>(packed.codes + row * g.code_row_bytes, c0, g.in, codes, sign_bits);
      if constexpr (Codec::kGroup > 0)
        if (chunk % Layout::kLanes == 0)
          static_cast<typename Codec::Stored*>(packed.scales)[row * g.groups_per_row + chunk / Layout::kLanes] = stored;
      if constexpr (Codec::kTensorAmax)
        if (chunk == 0 && row % g.rows_per_expert == 0) packed.amax[e] = amax;
    }
  }
}

/// Per-channel INT8: one block per row reduces the row's amax, then quantizes (Out = void) or
/// fake-quantizes the row. Each thread keeps its first kChannelKeep chunks (k = thread + i·blockDim.x)
/// in registers; chunks beyond are read again. Grid (rows), up to kChannelThreads threads.
template <bool Vec, class In, class Out>
__global__ void __launch_bounds__(kChannelThreads)
    quantize_channels_kernel(const In* w, Out* out, PackedSections<std::uint8_t> packed, QuantGeometry g) {
  constexpr quant::Scheme kScheme = quant::Scheme::int8_channel;
  using Codec = quant::SchemeCodec<kScheme>;
  constexpr bool kFake = !std::is_void_v<Out>;
  __shared__ QuantShared<kScheme, 1, 1> smem;  // no thresholds
  const std::int64_t row = blockIdx.x;
  const In* x = w + row * g.in;
  const std::int64_t chunks = (g.in + kQuantChunk - 1) / kQuantChunk;
  const std::int64_t kept = static_cast<std::int64_t>(kChannelKeep) * blockDim.x;
  std::uint32_t row_amax = 0;
  const auto reduce = [&](const float (&v)[kQuantChunk]) {
#pragma unroll
    for (int j = 0; j < kQuantChunk; ++j) row_amax = max(row_amax, quant::abs_bits(v[j]));
  };
  float v[kChannelKeep][kQuantChunk];
#pragma unroll
  for (int i = 0; i < kChannelKeep; ++i) {
    load_chunk<Vec>(x, (threadIdx.x + static_cast<std::int64_t>(i) * blockDim.x) * kQuantChunk, g.in, v[i]);
    reduce(v[i]);
  }
  for (std::int64_t k = kept + threadIdx.x; k < chunks; k += blockDim.x) {
    float u[kQuantChunk];
    load_chunk<Vec>(x, k * kQuantChunk, g.in, u);
    reduce(u);
  }
  row_amax = block_max_u32(row_amax);  // every read of a kept chunk precedes every write (out may alias w)
  float stored = 0.0f;
  const quant::GroupScale scale = Codec::make(moelora::detail::bits_float(row_amax), 0.0f, stored);
  fill_shared<kScheme, kFake, false>(smem, scale);
  if constexpr (!kFake)
    if (threadIdx.x == 0) static_cast<float*>(packed.scales)[row] = stored;
  const auto code_chunk = [&](std::int64_t c0, const float (&u)[kQuantChunk]) {
    std::uint32_t codes[kQuantChunk];
#pragma unroll
    for (int j = 0; j < kQuantChunk; ++j) codes[j] = Vec || c0 + j < g.in ? Codec::encode(u[j], scale) : 0;
    if constexpr (kFake) {
      float y[kQuantChunk];
#pragma unroll
      for (int j = 0; j < kQuantChunk; ++j) y[j] = smem.table[codes[j]];
      store_chunk<Vec>(out + row * g.in, c0, g.in, y);
    } else {
      store_codes<8, Vec>(packed.codes + row * g.code_row_bytes, c0, g.in, codes);
    }
  };
#pragma unroll
  for (int i = 0; i < kChannelKeep; ++i) {
    const std::int64_t k = threadIdx.x + static_cast<std::int64_t>(i) * blockDim.x;
    if (k < chunks) code_chunk(k * kQuantChunk, v[i]);
  }
  for (std::int64_t k = kept + threadIdx.x; k < chunks; k += blockDim.x) {  // each read by its writer
    float u[kQuantChunk];
    load_chunk<Vec>(x, k * kQuantChunk, g.in, u);
    code_chunk(k * kQuantChunk, u);
  }
}

/// Dequantizes rows [row0, row0 + gridDim.x) of a packed weight into out `[gridDim.x, in]`.
/// Grid (rows, chunk tiles of Tiling::kDequantizeSlabs·blockDim.x chunks), at most Tiling::kWarps
/// warps. A thread's loads of codes and group scales are issued first, so that they are in flight
/// while the block loads its row or tensor scale and fills its decode table.
template <quant::Scheme S, bool Vec, class Out, class Tiling>
__global__ void __launch_bounds__(Tiling::kWarps * 32)
    dequantize_kernel(PackedSections<const std::uint8_t> packed, std::int64_t row0, QuantGeometry g, Out* out) {
  using Codec = quant::SchemeCodec<S>;
  constexpr int kSlabs = Tiling::kDequantizeSlabs;
  __shared__ QuantShared<S, kSlabs, Tiling::kWarps> smem;
  const std::int64_t row = row0 + blockIdx.x;
  const auto* scales = static_cast<const typename Codec::Stored*>(packed.scales);
  const std::uint8_t* codes_row = packed.codes + row * g.code_row_bytes;
  PackedChunk<Codec::kBits> codes[kSlabs];
  typename Codec::Stored stored[kSlabs];
#pragma unroll
  for (int s = 0; s < kSlabs; ++s) {
    const std::int64_t c0 = slab_chunk<kSlabs>(s) * kQuantChunk;
    stored[s] = {};
    if constexpr (Codec::kGroup > 0) {  // also for idle lanes of a group that exists (INT4 shuffles)
      const std::int64_t group = c0 / Codec::kGroup;
      if (group * Codec::kGroup < g.in) stored[s] = scales[row * g.groups_per_row + group];
    }
    if (c0 < g.in) codes[s] = load_codes<Codec::kBits, Vec>(codes_row, c0, g.in);
  }

  float amax = 0.0f;
  if constexpr (Codec::kTensorAmax) amax = packed.amax[row / g.rows_per_expert];
  typename Codec::Stored row_stored{};
  if constexpr (Codec::kGroup < 0) row_stored = scales[row];
  fill_shared<S, true, false>(smem, Codec::load(row_stored, amax));  // 8-bit tables: the tensor's or row's scale

#pragma unroll
  for (int s = 0; s < kSlabs; ++s) {
    const std::int64_t c0 = slab_chunk<kSlabs>(s) * kQuantChunk;
    const GroupDecoder<S> decode(smem.table, Codec::load(Codec::kGroup > 0 ? stored[s] : row_stored, amax));
    float y[kQuantChunk];
#pragma unroll
    for (int j = 0; j < kQuantChunk; ++j) y[j] = decode(code_at(codes[s], j));
    if (c0 < g.in) store_chunk<Vec>(out + (row - row0) * g.in, c0, g.in, y);
  }
}

}  // namespace moelora::kernels
