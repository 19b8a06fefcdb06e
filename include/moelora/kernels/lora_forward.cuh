/// \file
/// \brief The fast LoRA forward on tensor cores (mma.sync, fp32 accumulation), two kernels per adapter:
/// the projection `h = round(A_e x)` `[T, r]` (shrink), then expand `y += scale · B_e h` `[T, out]`.
/// The projection kernel also serves the backward's `u = B_eᵀ dy`.
///
/// Requirements of this path (the host adapter checks them and falls back to the generic kernels
/// otherwise): 16-bit factors, rank ≤ 128 and a multiple of 8, `in % 8 == 0`, `out % 8 == 0`,
/// 16-byte aligned tensors (32-byte for fp32 activations).
#pragma once

#include "moelora/kernels/common.cuh"
#include "moelora/kernels/mma.cuh"

namespace moelora::kernels {

inline constexpr int kForwardRows = 128;      ///< rows of a forward tile (schedule granularity)
inline constexpr int kChunk = 64;             ///< columns per pipelined K chunk
inline constexpr int kPad = 8;                ///< shared-memory row padding, 16-bit elements
inline constexpr int kStages = 3;             ///< cp.async pipeline depth

/// Rank columns a kernel instance covers: NFrag fragments of 16.
template <int NFrag>
inline constexpr int kRankTile = NFrag * 16;

/// A grouped projection onto the rank: `out[t, j] = round(scale · Σ_k in[t, k] · F_e(k, j))` over K
/// columns, with F_e either A_e `[r, K]` (rank-major; the forward shrink, K = in, scale 1) or B_e
/// `[K, r]` (K-major; the backward's `u = round(scale · B_eᵀ dy)`, K = out). With several K slices
/// (grid.y > 1) the fp32 sums are added atomically into fp32 `out` instead, and rounded afterwards
/// by `round_scaled_kernel`.
struct ProjectParams {
  const void* in;      // [T, K], io dtype
  const void* factor;  // [E, r, K] (rank-major) or [E, K, r] (K-major), factor dtype
  void* out;           // [T, r]: round(scale · Σ) in the factor dtype, or the fp32 Σ added atomically
  TileSchedule schedule;
  std::int64_t k;      // K
  std::int64_t split;  // K columns per grid.y slice (a multiple of kChunk)
  std::int32_t rank;
  float scale;         // factor-dtype out only
};

/// Rows per projection block: a whole forward tile for large ranks (the factor chunk is re-read
/// per block, so more rows amortise it), else half a tile (more, smaller blocks per SM).
template <int NFrag>
inline constexpr int kProjectRows = NFrag >= 4 ? kForwardRows : kForwardRows / 2;
template <int NFrag>
inline constexpr int kProjectThreads = kProjectRows<NFrag> / 16 * 32;

/// Shared memory of the projection kernel: kStages × (in chunk [rows][72] + factor chunk), reused
/// as the fp32 output stage [rows][RankTile + 4].
template <int NFrag, bool FactorKMajor>
constexpr int project_smem_bytes() {
  constexpr int factor_chunk = FactorKMajor ? kChunk * (kRankTile<NFrag> + kPad) : kRankTile<NFrag> * (kChunk + kPad);
  const int stages = kStages * (kProjectRows<NFrag> * (kChunk + kPad) + factor_chunk) * 2;
  const int stage_out = kProjectRows<NFrag> * (kRankTile<NFrag> + 4) * 4;
  return stages > stage_out ? stages : stage_out;
}

/// Grid (128-row tile slots, K slices, kForwardRows / kProjectRows parts of the tile's rows). Warp
/// w owns rows [16w, 16w + 16) of its part and all RankTile columns; K is streamed in 64-column
/// chunks through a kStages-deep cp.async ring.
template <class IoT, class FT, int NFrag, bool FactorKMajor, class OutT>
__global__ void __launch_bounds__(kProjectThreads<NFrag>) lora_project_kernel(ProjectParams p) {
  constexpr int kRows = kProjectRows<NFrag>;
  constexpr int kBlockThreads = kProjectThreads<NFrag>;
  constexpr int kLd = kChunk + kPad;
  constexpr int kN = kRankTile<NFrag>;
  constexpr int kLdN = kN + kPad;
  constexpr int kFactorChunk = FactorKMajor ? kChunk * kLdN : kN * kLd;
  extern __shared__ __align__(128) unsigned char smem[];
  FT* xs = reinterpret_cast<FT*>(smem);        // [kStages][kRows][kLd]
  FT* fs = xs + kStages * kRows * kLd;  // [kStages][kFactorChunk]

  RowTile tile = locate_tile<kForwardRows>(p.schedule, blockIdx.x);
  tile.row0 += static_cast<std::int64_t>(blockIdx.z) * kRows;
  tile.rows -= static_cast<std::int32_t>(blockIdx.z) * kRows;
  if (tile.rows <= 0) return;
  const std::int64_t k_begin = static_cast<std::int64_t>(blockIdx.y) * p.split;
  const std::int64_t k_end = min(p.k, k_begin + p.split);
  const IoT* in = static_cast<const IoT*>(p.in) + tile.row0 * p.k;
  const FT* factor = static_cast<const FT*>(p.factor) + static_cast<std::int64_t>(tile.expert) * p.rank * p.k;
  const int warp = static_cast<int>(threadIdx.x) / 32;
  const auto chunks = static_cast<int>((k_end - k_begin + kChunk - 1) / kChunk);

  const auto load_chunk = [&](int chunk) {  // into stage chunk % kStages
    const int stage = chunk % kStages;
    const std::int64_t k0 = k_begin + static_cast<std::int64_t>(chunk) * kChunk;
    load_tile<kRows, kChunk, kBlockThreads>(xs + stage * kRows * kLd, kLd, in + k0, p.k, tile.rows,
                                                     k_end - k0);
    if constexpr (FactorKMajor)
      load_tile<kChunk, kN, kBlockThreads>(fs + stage * kFactorChunk, kLdN, factor + k0 * p.rank, p.rank,
                                             static_cast<int>(min(static_cast<std::int64_t>(kChunk), k_end - k0)), p.rank);
    else
      load_tile<kN, kChunk, kBlockThreads>(fs + stage * kFactorChunk, kLd, factor + k0, p.k, p.rank, k_end - k0);
  };

  Acc acc[2 * NFrag];  // 8-column tiles of the warp's 16 rows

  ring_fill<kStages>(chunks, load_chunk);
  for (int chunk = 0; chunk < chunks; ++chunk) {
    ring_next<kStages>(chunk, chunks, load_chunk);
    const FT* xt = xs + (chunk % kStages) * kRows * kLd + warp * 16 * kLd;
    const FT* ft = fs + (chunk % kStages) * kFactorChunk;
#pragma unroll
    for (int k = 0; k < kChunk; k += 16) {
      Frag a;
      load_a(a, xt + k, kLd);
#pragma unroll
      for (int f = 0; f < NFrag; ++f) {
        Frag b;
        if constexpr (FactorKMajor) load_b_kn(b, ft + k * kLdN + f * 16, kLdN);
        else load_b_nk(b, ft + f * 16 * kLd + k, kLd);
        mma<FT>(acc[2 * f], a, b, 0);
        mma<FT>(acc[2 * f + 1], a, b, 1);
      }
    }
  }
  cp_async_wait<0>();
  __syncthreads();

  constexpr int kOutLd = kN + 4;
  float* stage_out = reinterpret_cast<float*>(smem);  // [kRows][kOutLd]
#pragma unroll
  for (int j = 0; j < 2 * NFrag; ++j) store_acc(stage_out, kOutLd, warp * 16, j * 8, acc[j]);
  __syncthreads();
  OutT* out = static_cast<OutT*>(p.out) + tile.row0 * p.rank;
  for (int i = static_cast<int>(threadIdx.x); i < kRows * kN; i += kBlockThreads) {
    const int r = i / kN, c = i % kN;
    if (r >= tile.rows || c >= p.rank) continue;
    OutT* to = out + static_cast<std::int64_t>(r) * p.rank + c;
    if constexpr (std::is_same_v<OutT, float>) atomicAdd(to, stage_out[r * kOutLd + c]);
    else *to = from_float<OutT>(p.scale * stage_out[r * kOutLd + c]);
  }
}

/// out[i] = round(scale · in[i]) in the factor dtype: finishes a projection computed in K slices.
template <class FT>
__global__ void round_scaled_kernel(const float* in, FT* out, std::int64_t count, float scale) {
  for (std::int64_t i = blockIdx.x * static_cast<std::int64_t>(blockDim.x) + threadIdx.x; i < count;
       i += static_cast<std::int64_t>(gridDim.x) * blockDim.x)
    out[i] = from_float<FT>(scale * in[i]);
}

struct ExpandParams {
  const void* h;  // [T, r]
  const void* b;  // [E, out, r]
  void* y;        // [T, out]
  TileSchedule schedule;
  std::int64_t out;
  std::int32_t rank;
  float scale;
  bool add_y;     // y += delta (else y = delta: the y tile starts at zero, nothing is read)
};

inline constexpr int kExpandCols = 128;  ///< output columns per expand block
inline constexpr int kExpandRows = kForwardRows;  ///< rows per expand block: a forward tile
inline constexpr int kExpandWarps = kExpandRows / 16;
inline constexpr int kExpandThreads = kExpandWarps * 32;
inline constexpr int kExpandHalf = kExpandCols / 2;  ///< columns a warp multiplies at a time

/// Shared memory of the expand kernel: h tile [128][RankTile+8], B tile [128][RankTile+8] (factor
/// dtype) and the y tile [128][128+8] (io dtype).
template <int NFrag, class IoT>
constexpr int expand_smem_bytes() {
  const int factors = (kExpandRows + kExpandCols) * (kRankTile<NFrag> + kPad) * 2;
  return factors + kExpandRows * (kExpandCols + kPad) * static_cast<int>(sizeof(IoT));
}

/// Two neighbouring elements, accessed as one aligned word.
template <class T>
struct alignas(2 * sizeof(T)) Pair {
  T v[2];
};

/// Grid (128-row tile slots, ceil(out / 128)); rank ≤ RankTile, a multiple of 8. The y tile (zeros
/// when overwriting), h and the B slice arrive by cp.async (no registers hold data in flight, so three blocks fit an SM);
/// warp w multiplies rows [16w, 16w + 16) on tensor cores, 64 columns at a time, adds the products
/// to its rows of the y tile in fp32, rounding once, and finally stores its rows with 16-byte
/// vectors.
template <class IoT, class FT, int NFrag>
__global__ void __launch_bounds__(kExpandThreads, 3) lora_expand_kernel(ExpandParams p) {
  constexpr int kN = kRankTile<NFrag>;
  constexpr int kLd = kN + kPad;
  constexpr int kLdY = kExpandCols + kPad;
  constexpr int kVectorsPerRow = kExpandCols / 8;
  constexpr int kVectors = 16 * kVectorsPerRow / 32;  // per lane
  extern __shared__ __align__(128) unsigned char smem[];
  FT* hs = reinterpret_cast<FT*>(smem);                          // [kExpandRows][kLd]
  FT* bs = hs + kExpandRows * kLd;                               // [kExpandCols][kLd]
  IoT* ys = reinterpret_cast<IoT*>(bs + kExpandCols * kLd);      // [kExpandRows][kLdY]

  const RowTile tile = locate_tile<kForwardRows>(p.schedule, blockIdx.x);
  if (tile.rows == 0) return;
  const std::int64_t n0 = static_cast<std::int64_t>(blockIdx.y) * kExpandCols;
  const int n_valid = static_cast<int>(min(static_cast<std::int64_t>(kExpandCols), p.out - n0));
  const int warp = static_cast<int>(threadIdx.x) / 32, lane = static_cast<int>(threadIdx.x) % 32;
  IoT* y = static_cast<IoT*>(p.y) + tile.row0 * p.out + n0;

  load_tile<kExpandRows, kExpandCols, kExpandThreads>(ys, kLdY, static_cast<const IoT*>(y), p.out,
                                                      p.add_y ? tile.rows : 0, n_valid);
  load_tile<kExpandRows, kN, kExpandThreads>(hs, kLd, static_cast<const FT*>(p.h) + tile.row0 * p.rank, p.rank,
                                             tile.rows, p.rank);
  load_tile<kExpandCols, kN, kExpandThreads>(
      bs, kLd, static_cast<const FT*>(p.b) + (static_cast<std::int64_t>(tile.expert) * p.out + n0) * p.rank, p.rank,
      n_valid, p.rank);
  cp_async_commit();
  cp_async_wait<0>();
  __syncthreads();

  IoT* my_y = ys + (warp * 16 + lane / 4) * kLdY + (lane % 4) * 2;  // (row g, column 2c) of the warp's rows
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    Acc acc[kExpandHalf / 8];
#pragma unroll
    for (int k = 0; k < kN; k += 16) {
      Frag a;
      load_a(a, hs + warp * 16 * kLd + k, kLd);
#pragma unroll
      for (int f = 0; f < kExpandHalf / 16; ++f) {
        Frag b;
        load_b_nk(b, bs + (half * kExpandHalf + f * 16) * kLd + k, kLd);
        mma<FT>(acc[2 * f], a, b, 0);
        mma<FT>(acc[2 * f + 1], a, b, 1);
      }
    }
#pragma unroll
    for (int j = 0; j < kExpandHalf / 8; ++j)
#pragma unroll
      for (int h = 0; h < 2; ++h) {  // rows g and g + 8
        auto* pair = reinterpret_cast<Pair<IoT>*>(my_y + h * 8 * kLdY + half * kExpandHalf + j * 8);
        Pair<IoT> v = *pair;
        v.v[0] = from_float<IoT>(to_float(v.v[0]) + p.scale * acc[j].c[2 * h]);
        v.v[1] = from_float<IoT>(to_float(v.v[1]) + p.scale * acc[j].c[2 * h + 1]);
        *pair = v;
      }
  }
  __syncwarp();
#pragma unroll
  for (int i = 0; i < kVectors; ++i) {
    const int v = i * 32 + lane, r = warp * 16 + v / kVectorsPerRow, c = (v % kVectorsPerRow) * 8;
    if (r < tile.rows && c < n_valid)
      *reinterpret_cast<Vec8<IoT>*>(y + r * p.out + c) = *reinterpret_cast<const Vec8<IoT>*>(ys + r * kLdY + c);
  }
}

}  // namespace moelora::kernels
