/// \file
/// \brief The fast LoRA forward on tensor cores (WMMA, fp32 accumulation), two kernels per adapter:
/// shrink `h = round(A_e x)` `[T, r]`, then expand `y += scale · B_e h` `[T, out]`.
///
/// Requirements of this path (the host adapter checks them and falls back to the generic kernels
/// otherwise): 16-bit factors, `in % 8 == 0`, `out % 8 == 0`, 16-byte aligned tensors.
#pragma once

#include <mma.h>

#include "moelora/kernels/common.cuh"

namespace moelora::kernels {

inline constexpr int kWarps = 4;              ///< warps of a backward role (row-wise or gradient)
inline constexpr int kForwardRows = 128;      ///< rows of a forward tile (schedule granularity)
inline constexpr int kForwardWarps = kForwardRows / 16;
inline constexpr int kForwardThreads = kForwardWarps * 32;
inline constexpr int kChunk = 64;             ///< columns per pipelined K chunk
inline constexpr int kPad = 8;                ///< shared-memory row padding, 16-bit elements
inline constexpr int kStages = 3;             ///< cp.async pipeline depth

/// Rank columns a kernel instance covers: NFrag fragments of 16.
template <int NFrag>
inline constexpr int kRankTile = NFrag * 16;

template <class T>
using FragA = nvcuda::wmma::fragment<nvcuda::wmma::matrix_a, 16, 16, 16, T, nvcuda::wmma::row_major>;
template <class T>
using FragAT = nvcuda::wmma::fragment<nvcuda::wmma::matrix_a, 16, 16, 16, T, nvcuda::wmma::col_major>;
template <class T>
using FragB = nvcuda::wmma::fragment<nvcuda::wmma::matrix_b, 16, 16, 16, T, nvcuda::wmma::row_major>;
template <class T>
using FragBT = nvcuda::wmma::fragment<nvcuda::wmma::matrix_b, 16, 16, 16, T, nvcuda::wmma::col_major>;
using FragAcc = nvcuda::wmma::fragment<nvcuda::wmma::accumulator, 16, 16, 16, float>;

struct ShrinkParams {
  const void* x;  // [T, in]
  const void* a;  // [E, r, in]
  void* h;        // [T, r]
  TileSchedule schedule;
  std::int64_t in;
  std::int32_t rank;
};

/// Shared memory of the shrink kernel: kStages × (x chunk [128][72] + A chunk [RankTile][72]),
/// reused as the fp32 output stage [128][RankTile + 4].
template <int NFrag>
constexpr int shrink_smem_bytes() {
  const int stages = kStages * (kForwardRows + kRankTile<NFrag>) * (kChunk + kPad) * 2;
  const int stage_out = kForwardRows * (kRankTile<NFrag> + 4) * 4;
  return stages > stage_out ? stages : stage_out;
}

/// Grid (128-row tile slots). Warp w owns rows [16w, 16w + 16) of its tile and all RankTile
/// columns; K (= in) is streamed in 64-column chunks through a kStages-deep cp.async ring.
template <class IoT, class FT, int NFrag>
__global__ void __launch_bounds__(kForwardThreads) lora_shrink_kernel(ShrinkParams p) {
  constexpr int kLd = kChunk + kPad;
  constexpr int kN = kRankTile<NFrag>;
  extern __shared__ __align__(128) unsigned char smem[];
  FT* xs = reinterpret_cast<FT*>(smem);                // [kStages][kForwardRows][kLd]
  FT* as = xs + kStages * kForwardRows * kLd;          // [kStages][kN][kLd]

  const RowTile tile = locate_tile<kForwardRows>(p.schedule, blockIdx.x);
  if (tile.rows == 0) return;
  const IoT* x = static_cast<const IoT*>(p.x) + tile.row0 * p.in;
  const FT* a = static_cast<const FT*>(p.a) + static_cast<std::int64_t>(tile.expert) * p.rank * p.in;
  const int warp = static_cast<int>(threadIdx.x) / 32;
  const auto chunks = static_cast<int>((p.in + kChunk - 1) / kChunk);

  const auto load_chunk = [&](int chunk, int stage) {
    const std::int64_t k0 = static_cast<std::int64_t>(chunk) * kChunk;
    load_tile<kForwardRows, kChunk, kForwardThreads>(xs + stage * kForwardRows * kLd, kLd, x + k0, p.in, tile.rows,
                                                     p.in - k0);
    load_tile<kN, kChunk, kForwardThreads>(as + stage * kN * kLd, kLd, a + k0, p.in, p.rank, p.in - k0);
  };

  FragAcc acc[NFrag];
#pragma unroll
  for (int f = 0; f < NFrag; ++f) nvcuda::wmma::fill_fragment(acc[f], 0.0f);

#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) {
    if (s < chunks) load_chunk(s, s);
    cp_async_commit();
  }
  for (int chunk = 0; chunk < chunks; ++chunk) {
    cp_async_wait<kStages - 2>();
    __syncthreads();
    if (chunk + kStages - 1 < chunks) load_chunk(chunk + kStages - 1, (chunk + kStages - 1) % kStages);
    cp_async_commit();
    const FT* xt = xs + (chunk % kStages) * kForwardRows * kLd + warp * 16 * kLd;
    const FT* at = as + (chunk % kStages) * kN * kLd;
#pragma unroll
    for (int k = 0; k < kChunk; k += 16) {
      FragA<FT> fa;
      nvcuda::wmma::load_matrix_sync(fa, xt + k, kLd);
#pragma unroll
      for (int f = 0; f < NFrag; ++f) {
        FragBT<FT> fb;
        nvcuda::wmma::load_matrix_sync(fb, at + f * 16 * kLd + k, kLd);
        nvcuda::wmma::mma_sync(acc[f], fa, fb, acc[f]);
      }
    }
  }
  cp_async_wait<0>();
  __syncthreads();

  constexpr int kOutLd = kN + 4;
  float* stage_out = reinterpret_cast<float*>(smem);  // [kForwardRows][kOutLd]
#pragma unroll
  for (int f = 0; f < NFrag; ++f)
    nvcuda::wmma::store_matrix_sync(stage_out + warp * 16 * kOutLd + f * 16, acc[f], kOutLd, nvcuda::wmma::mem_row_major);
  __syncthreads();
  FT* h = static_cast<FT*>(p.h) + tile.row0 * p.rank;
  for (int i = static_cast<int>(threadIdx.x); i < kForwardRows * kN; i += kForwardThreads) {
    const int r = i / kN, c = i % kN;
    if (r < tile.rows && c < p.rank) h[static_cast<std::int64_t>(r) * p.rank + c] = from_float<FT>(stage_out[r * kOutLd + c]);
  }
}

struct ExpandParams {
  const void* h;  // [T, r]
  const void* b;  // [E, out, r]
  void* y;        // [T, out]
  TileSchedule schedule;
  std::int64_t out;
  std::int32_t rank;
  float scale;
};

inline constexpr int kExpandCols = 128;  ///< output columns per expand block

/// Shared memory of the expand kernel: h tile [128][RankTile+8] and B tile [128][RankTile+8],
/// reused as the fp32 output stage [128][132].
template <int NFrag>
constexpr int expand_smem_bytes() {
  const int tiles = (kForwardRows + kExpandCols) * (kRankTile<NFrag> + kPad) * 2;
  const int stage_out = kForwardRows * (kExpandCols + 4) * 4;
  return tiles > stage_out ? tiles : stage_out;
}

/// Grid (128-row tile slots, ceil(out / 128)); rank ≤ RankTile, a multiple of 8. Each thread first
/// issues the loads of its 8 y vectors (warp w owns rows [16w, 16w + 16)), the h and B tiles arrive
/// by cp.async, the warp's tensor-core product lands in shared memory and is added to y in fp32 and
/// rounded once.
template <class IoT, class FT, int NFrag>
__global__ void __launch_bounds__(kForwardThreads) lora_expand_kernel(ExpandParams p) {
  constexpr int kN = kRankTile<NFrag>;
  constexpr int kLd = kN + kPad;
  constexpr int kOutLd = kExpandCols + 4;
  constexpr int kVectorsPerRow = kExpandCols / 8;
  constexpr int kVectors = 16 * kVectorsPerRow / 32;  // per thread
  extern __shared__ __align__(128) unsigned char smem[];
  FT* hs = reinterpret_cast<FT*>(smem);  // [kForwardRows][kLd]
  FT* bs = hs + kForwardRows * kLd;      // [kExpandCols][kLd]

  const RowTile tile = locate_tile<kForwardRows>(p.schedule, blockIdx.x);
  if (tile.rows == 0) return;
  const std::int64_t n0 = static_cast<std::int64_t>(blockIdx.y) * kExpandCols;
  const int n_valid = static_cast<int>(min(static_cast<std::int64_t>(kExpandCols), p.out - n0));
  const int warp = static_cast<int>(threadIdx.x) / 32, lane = static_cast<int>(threadIdx.x) % 32;
  IoT* y = static_cast<IoT*>(p.y) + tile.row0 * p.out + n0;

  load_tile<kForwardRows, kN, kForwardThreads>(hs, kLd, static_cast<const FT*>(p.h) + tile.row0 * p.rank, p.rank,
                                               tile.rows, p.rank);
  load_tile<kExpandCols, kN, kForwardThreads>(
      bs, kLd, static_cast<const FT*>(p.b) + (static_cast<std::int64_t>(tile.expert) * p.out + n0) * p.rank, p.rank,
      n_valid, p.rank);
  cp_async_commit();

  Vec8<IoT> y_old[kVectors];
#pragma unroll
  for (int i = 0; i < kVectors; ++i) {
    const int v = i * 32 + lane;
    const int r = warp * 16 + v / kVectorsPerRow, c = (v % kVectorsPerRow) * 8;
    if (r < tile.rows && c < n_valid) y_old[i] = *reinterpret_cast<const Vec8<IoT>*>(y + r * p.out + c);
  }
  cp_async_wait<0>();
  __syncthreads();

  FragAcc acc[kExpandCols / 16];
#pragma unroll
  for (int f = 0; f < kExpandCols / 16; ++f) nvcuda::wmma::fill_fragment(acc[f], 0.0f);
#pragma unroll
  for (int k = 0; k < kN; k += 16) {
    FragA<FT> fa;
    nvcuda::wmma::load_matrix_sync(fa, hs + warp * 16 * kLd + k, kLd);
#pragma unroll
    for (int f = 0; f < kExpandCols / 16; ++f) {
      FragBT<FT> fb;
      nvcuda::wmma::load_matrix_sync(fb, bs + f * 16 * kLd + k, kLd);
      nvcuda::wmma::mma_sync(acc[f], fa, fb, acc[f]);
    }
  }
  __syncthreads();  // the output stage overwrites hs and bs

  float* stage_out = reinterpret_cast<float*>(smem) + warp * 16 * kOutLd;
#pragma unroll
  for (int f = 0; f < kExpandCols / 16; ++f)
    nvcuda::wmma::store_matrix_sync(stage_out + f * 16, acc[f], kOutLd, nvcuda::wmma::mem_row_major);
  __syncwarp();
#pragma unroll
  for (int i = 0; i < kVectors; ++i) {
    const int v = i * 32 + lane;
    const int r = v / kVectorsPerRow, c = (v % kVectorsPerRow) * 8;
    if (warp * 16 + r >= tile.rows || c >= n_valid) continue;
    Vec8<IoT> y_new;
#pragma unroll
    for (int j = 0; j < 8; ++j)
      y_new.v[j] = from_float<IoT>(to_float(y_old[i].v[j]) + p.scale * stage_out[r * kOutLd + c + j]);
    *reinterpret_cast<Vec8<IoT>*>(y + (warp * 16 + r) * p.out + c) = y_new;
  }
}

}  // namespace moelora::kernels
