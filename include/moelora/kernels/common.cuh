/// \file
/// \brief Device building blocks shared by the LoRA kernels: element types, conversions, cp.async,
/// tile loaders and the per-expert row-tile schedule.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <type_traits>

#include "moelora/core/dtype.hpp"

namespace moelora::kernels {

/// The device storage type of each DType.
template <DType D> struct DeviceTypeOf;
template <> struct DeviceTypeOf<DType::bf16> { using type = __nv_bfloat16; };
template <> struct DeviceTypeOf<DType::fp16> { using type = __half; };
template <> struct DeviceTypeOf<DType::fp32> { using type = float; };
template <DType D> using device_t = typename DeviceTypeOf<D>::type;

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }

/// Round-to-nearest-even conversion from fp32.
template <class T>
__device__ __forceinline__ T from_float(float v) {
  if constexpr (std::is_same_v<T, float>) return v;
  else if constexpr (std::is_same_v<T, __nv_bfloat16>) return __float2bfloat16_rn(v);
  else return __float2half_rn(v);
}

/// The bits of a 16-bit value.
__device__ __forceinline__ std::uint32_t bits16(__nv_bfloat16 v) { return __bfloat16_as_ushort(v); }
__device__ __forceinline__ std::uint32_t bits16(__half v) { return __half_as_ushort(v); }

/// v[0..7], each rounded once to the 16-bit type T (from_float), as the 16 bytes of 8 consecutive
/// T. Stored through a vector-store instruction (`__stwb`, `store_shared_16`): nvcc splits the
/// store of a Vec8<T> or uint4 assembled element by element into 2- or 4-byte stores.
template <class T>
__device__ __forceinline__ uint4 pack_rounded8(const float (&v)[8]) {
  static_assert(sizeof(T) == 2, "packs 16-bit elements");
  const auto pair = [&](int j) { return bits16(from_float<T>(v[2 * j])) | (bits16(from_float<T>(v[2 * j + 1])) << 16); };
  return make_uint4(pair(0), pair(1), pair(2), pair(3));
}

/// Where the tiles of one call are: offsets `[E+1]` (int64 rows) and tile_offsets `[E+1]` (int32,
/// exclusive scan of ceil(count_e / tile rows)), both in device memory.
struct TileSchedule {
  const std::int64_t* offsets;
  const std::int32_t* tile_offsets;
  std::int32_t experts;
};

/// The rows of one tile: expert, first row, number of rows (0 for a grid slot past the last tile).
struct RowTile {
  std::int32_t expert;
  std::int64_t row0;
  std::int32_t rows;
};

/// Maps tile index `tile` (a grid slot; slots past the last tile get rows = 0) of a schedule of
/// `TileRows`-row tiles to its expert and rows. Every lane of the calling warp must call it with
/// the same `tile`. The expert is the number of experts whose tiles end at or before `tile`,
/// counted by the whole warp at once (each lane reads every 32nd entry, the loads all in flight
/// together): two dependent rounds of loads, where a binary search takes log2(E) + 2 of them.
template <int TileRows>
__device__ __forceinline__ RowTile locate_tile(const TileSchedule& s, std::int64_t tile) {
  const int lane = static_cast<int>(threadIdx.x) % 32;
  unsigned before = 0;  // experts e (of this lane's) with tile_offsets[e + 1] <= tile
  for (std::int32_t e = lane; e < s.experts; e += 32) before += s.tile_offsets[e + 1] <= tile;
  const auto expert = static_cast<std::int32_t>(__reduce_add_sync(0xffffffffu, before));
  if (expert >= s.experts) return {0, 0, 0};  // tile_offsets[expert] <= tile < tile_offsets[expert + 1]
  const std::int64_t row0 = s.offsets[expert] + (tile - s.tile_offsets[expert]) * TileRows;
  const std::int64_t end = s.offsets[expert + 1];
  return {expert, row0, static_cast<std::int32_t>(end - row0 < TileRows ? end - row0 : TileRows)};
}

/// Upper bound of the number of `tile_rows`-row tiles of a call with `rows` rows over `experts` experts.
inline std::int64_t max_tiles(std::int64_t rows, std::int64_t experts, std::int64_t tile_rows) {
  return (rows + tile_rows - 1) / tile_rows + experts;
}

// ---- residency and launch order (sm_90) -------------------------------------------------------

inline constexpr int kSmemPerSm = 228 * 1024;       ///< shared memory an SM gives its blocks
inline constexpr int kSmemReservedPerBlock = 1024;  ///< shared memory the system keeps per block
inline constexpr int kThreadsPerSm = 2048;
inline constexpr int kBlocksPerSm = 32;

/// Blocks of `threads` threads and `smem` bytes of shared memory an SM holds at once, registers
/// permitting (kernels that rely on it say so in their `__launch_bounds__`).
constexpr int resident_blocks(int smem, int threads) {
  const int by_smem = kSmemPerSm / (smem + kSmemReservedPerBlock);
  const int by_threads = kThreadsPerSm / threads;
  const int n = by_smem < by_threads ? by_smem : by_threads;
  return n < kBlocksPerSm ? n : kBlocksPerSm;
}

/// Programmatic dependent launch: lets the kernel queued after this one on the stream, when it is
/// launched as a programmatic dependent, start before this one finishes. No effect otherwise.
__device__ __forceinline__ void allow_dependent_launch() { asm volatile("griddepcontrol.launch_dependents;\n" ::); }
/// Waits until the kernels this one depends on programmatically have finished and their writes are
/// visible; returns at once when the kernel was launched normally (stream order already holds).
__device__ __forceinline__ void wait_for_prerequisites() { asm volatile("griddepcontrol.wait;\n" ::: "memory"); }

// ---- asynchronous copies -------------------------------------------------------------------------

__device__ __forceinline__ std::uint32_t smem_address(const void* p) {
  return static_cast<std::uint32_t>(__cvta_generic_to_shared(p));
}
/// 16-byte global → shared copy; `valid == false` writes zeros and reads nothing.
__device__ __forceinline__ void cp_async_16(void* smem, const void* gmem, bool valid) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_address(smem)), "l"(gmem),
               "r"(valid ? 16 : 0));
}
/// One 16-byte shared-memory store (`st.shared.v4`).
__device__ __forceinline__ void store_shared_16(void* smem, uint4 v) {
  asm volatile("st.shared.v4.b32 [%0], {%1, %2, %3, %4};\n" ::"r"(smem_address(smem)), "r"(v.x), "r"(v.y), "r"(v.z),
               "r"(v.w)
               : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int Pending>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(Pending));
}

/// A `Stages`-deep cp.async ring over `steps` steps; `load(step)` issues one step's copies into
/// stage `step % Stages`. `ring_fill` issues the first `Stages − 1` steps; `ring_next(step, ...)`
/// waits until step `step` has landed, makes it visible to the block (so stage `step − 1` is free
/// everywhere) and issues step `step + Stages − 1`. Every call commits one group, empty or not.
template <int Stages, class Load>
__device__ __forceinline__ void ring_fill(int steps, Load&& load) {
  for (int s = 0; s < Stages - 1; ++s) {
    if (s < steps) load(s);
    cp_async_commit();
  }
}
template <int Stages, class Load>
__device__ __forceinline__ void ring_next(int step, int steps, Load&& load) {
  cp_async_wait<Stages - 2>();
  __syncthreads();
  if (step + Stages - 1 < steps) load(step + Stages - 1);
  cp_async_commit();
}

/// 8 consecutive elements of T as one aligned vector (16 bytes for 16-bit T, 32 for fp32).
template <class T>
struct alignas(sizeof(T) * 8) Vec8 {
  T v[8];
};

/// Loads a `[Rows, Cols]` tile of a row-major global matrix `src` (row stride `ld` elements) into
/// shared memory `dst` (row stride `dst_ld`) as `Dst` (16-bit, or fp32 from fp32), with `Threads` threads. Rows ≥ `rows` and
/// columns ≥ `cols` read as zero. Same type and `Async`: 16-byte cp.async copies (the caller
/// commits and waits; `cols` a multiple of 16 bytes' worth); otherwise 8 elements at a time
/// through registers, converted (`cols` a multiple of 8).
template <int Rows, int Cols, int Threads, bool Async = true, class Dst, class Src>
__device__ __forceinline__ void load_tile(Dst* dst, int dst_ld, const Src* src, std::int64_t ld, int rows,
                                          std::int64_t cols) {
  constexpr bool kCopy = Async && std::is_same_v<Dst, Src>;
  constexpr int kVector = kCopy ? 16 / static_cast<int>(sizeof(Dst)) : 8;
  constexpr int kChunksPerRow = Cols / kVector;
  constexpr int kChunks = Rows * kChunksPerRow;
  static_assert(Cols % kVector == 0, "tile columns must be a whole number of vectors");
#pragma unroll
  for (int i = 0; i < (kChunks + Threads - 1) / Threads; ++i) {
    const int chunk = i * Threads + static_cast<int>(threadIdx.x);
    if (kChunks % Threads != 0 && chunk >= kChunks) break;
    const int r = chunk / kChunksPerRow;
    const int c = (chunk % kChunksPerRow) * kVector;
    const bool valid = r < rows && c < cols;
    const Src* from = valid ? src + r * ld + c : src;
    Dst* to = dst + r * dst_ld + c;
    if constexpr (kCopy) {
      cp_async_16(to, from, valid);
    } else {
      float v[8] = {};
      if (valid) {
        const Vec8<Src> in = *reinterpret_cast<const Vec8<Src>*>(from);
#pragma unroll
        for (int j = 0; j < 8; ++j) v[j] = to_float(in.v[j]);
      }
      if constexpr (sizeof(Dst) == 2) {
        store_shared_16(to, pack_rounded8<Dst>(v));
      } else {
        reinterpret_cast<float4*>(to)[0] = make_float4(v[0], v[1], v[2], v[3]);
        reinterpret_cast<float4*>(to)[1] = make_float4(v[4], v[5], v[6], v[7]);
      }
    }
  }
}

}  // namespace moelora::kernels
