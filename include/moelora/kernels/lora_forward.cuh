/// \file
/// \brief The fast LoRA forward on tensor cores (mma.sync, fp32 accumulation), two kernels per adapter:
/// the projection `h = round(A_e x)` `[T, r]` (shrink), then expand `y += scale · B_e h` `[T, out]`.
/// The projection kernel also serves the backward's `u = B_eᵀ dy`.
///
/// Requirements of this path (the host adapter checks them and falls back to the generic kernels
/// otherwise): 16-bit factors, rank ≤ 128 and a multiple of 8, `in % 8 == 0`, `out % 8 == 0`,
/// 16-byte aligned tensors (32-byte for fp32 activations).
#pragma once

#include <concepts>

#include "moelora/kernels/common.cuh"
#include "moelora/kernels/mma.cuh"

namespace moelora::kernels {

inline constexpr int kForwardRows = 128;      ///< rows of a forward tile (schedule granularity)
inline constexpr int kChunk = 64;             ///< columns per pipelined K chunk (projection default, backward x pass)
inline constexpr int kPad = 8;                ///< shared-memory row padding, 16-bit elements

/// Rank columns a kernel instance covers: NFrag fragments of 16.
template <int NFrag>
inline constexpr int kRankTile = NFrag * 16;

/// Tiling of the projection kernel: blocks of `Rows` rows (a whole forward tile or half of one;
/// warp w owns rows [WarpRows·w, + WarpRows) and all rank columns), K streamed in `Cols`-column
/// chunks through a `Stages`-deep cp.async ring, so `Stages − 1` chunks of `Rows × Cols`
/// activations are in flight per block while one is multiplied. 32-row warps read each factor
/// fragment from shared memory once for two row fragments (half the factor reads of 16-row warps).
template <int Rows, int Stages, int Cols = kChunk, int WarpRows = 16>
struct ProjectTiling {
  static_assert(Rows == kForwardRows || Rows == kForwardRows / 2, "a projection block covers a whole or half forward tile");
  static_assert(Stages >= 2, "the cp.async ring needs at least two stages");
  static_assert(Cols % 16 == 0, "a K chunk is a whole number of mma steps of 16");
  static_assert(WarpRows == 16 || WarpRows == 32, "a warp owns one or two 16-row fragments");
  static constexpr int kRows = Rows;
  static constexpr int kStages = Stages;
  static constexpr int kCols = Cols;
  static constexpr int kWarpRows = WarpRows;
  static constexpr int kThreads = Rows / WarpRows * 32;
  static constexpr int kParts = kForwardRows / Rows;  ///< blocks per forward tile (grid.z)
  static constexpr int kLd = Cols + kPad;             ///< row stride of the in chunk (and of a rank-major factor chunk)

  /// Elements of one factor chunk: `[Cols][RankTile + 8]` (K-major) or `[RankTile][Cols + 8]`.
  template <int NFrag, bool FactorKMajor>
  static constexpr int factor_chunk = FactorKMajor ? Cols * (kRankTile<NFrag> + kPad) : kRankTile<NFrag> * kLd;
  /// Shared memory: kStages × (in chunk [Rows][Cols + 8] + factor chunk), reused as the fp32
  /// output stage [Rows][RankTile + 4].
  template <int NFrag, bool FactorKMajor>
  static constexpr int smem_bytes() {
    const int stages = Stages * (Rows * kLd + factor_chunk<NFrag, FactorKMajor>) * 2;
    const int stage_out = Rows * (kRankTile<NFrag> + 4) * 4;
    return stages > stage_out ? stages : stage_out;
  }
  /// Blocks an SM holds (the kernel's `__launch_bounds__` keeps registers from lowering it).
  template <int NFrag, bool FactorKMajor>
  static constexpr int blocks_per_sm = resident_blocks(smem_bytes<NFrag, FactorKMajor>(), kThreads);
};

/// Blocks of a projection tiling an SM holds (`__launch_bounds__` wants a plain constant).
template <class Tiling, int NFrag, bool FactorKMajor>
inline constexpr int project_blocks_per_sm = Tiling::template blocks_per_sm<NFrag, FactorKMajor>;

/// The projection tiling of the backward's u projection: half tiles below rank tile 64 (more,
/// smaller blocks an SM), whole tiles of 32-row warps from 64 on (the factor chunk, re-read per
/// block, amortised over more rows; each factor fragment read from shared memory once for two row
/// fragments); a 3-stage ring.
template <int NFrag>
using UProjectionTiling = ProjectTiling<NFrag >= 4 ? kForwardRows : kForwardRows / 2, 3, kChunk, NFrag >= 4 ? 32 : 16>;

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
  std::int64_t split;  // K columns per grid.y slice (a multiple of the tiling's chunk)
  std::int32_t rank;
  float scale;         // factor-dtype out only
};

/// One projection block: rows `[tile.row0, + min(tile.rows, Tiling::kRows))` of expert
/// `tile.expert` (tile.rows > 0), K columns `[slice · p.split, + p.split)`; Tiling::kThreads
/// threads, `smem` of Tiling::smem_bytes.
template <class IoT, class FT, int NFrag, bool FactorKMajor, class OutT, class Tiling>
__device__ __forceinline__ void project_block(const ProjectParams& p, RowTile tile, std::int64_t slice,
                                              unsigned char* smem) {
  constexpr int kRows = Tiling::kRows;
  constexpr int kStages = Tiling::kStages;
  constexpr int kCols = Tiling::kCols;
  constexpr int kBlockThreads = Tiling::kThreads;
  constexpr int kLd = Tiling::kLd;
  constexpr int kN = kRankTile<NFrag>;
  constexpr int kLdN = kN + kPad;
  constexpr int kFactorChunk = Tiling::template factor_chunk<NFrag, FactorKMajor>;
  FT* xs = reinterpret_cast<FT*>(smem);  // [kStages][kRows][kLd]
  FT* fs = xs + kStages * kRows * kLd;   // [kStages][kFactorChunk]

  const std::int64_t k_begin = slice * p.split;
  const std::int64_t k_end = min(p.k, k_begin + p.split);
  const IoT* in = static_cast<const IoT*>(p.in) + tile.row0 * p.k;
  const FT* factor = static_cast<const FT*>(p.factor) + static_cast<std::int64_t>(tile.expert) * p.rank * p.k;
  const int warp = static_cast<int>(threadIdx.x) / 32;
  const auto chunks = static_cast<int>((k_end - k_begin + kCols - 1) / kCols);

  const auto load_chunk = [&](int chunk) {  // into stage chunk % kStages
    const int stage = chunk % kStages;
    const std::int64_t k0 = k_begin + static_cast<std::int64_t>(chunk) * kCols;
    load_tile<kRows, kCols, kBlockThreads>(xs + stage * kRows * kLd, kLd, in + k0, p.k, tile.rows, k_end - k0);
    if constexpr (FactorKMajor)
      load_tile<kCols, kN, kBlockThreads>(fs + stage * kFactorChunk, kLdN, factor + k0 * p.rank, p.rank,
                                          static_cast<int>(min(static_cast<std::int64_t>(kCols), k_end - k0)), p.rank);
    else
      load_tile<kN, kCols, kBlockThreads>(fs + stage * kFactorChunk, kLd, factor + k0, p.k, p.rank, k_end - k0);
  };

  constexpr int kMFrags = Tiling::kWarpRows / 16;
  Acc acc[kMFrags][2 * NFrag];  // 8-column tiles of the warp's 16-row fragments

  ring_fill<kStages>(chunks, load_chunk);
  for (int chunk = 0; chunk < chunks; ++chunk) {
    ring_next<kStages>(chunk, chunks, load_chunk);
    const FT* xt = xs + (chunk % kStages) * kRows * kLd + warp * Tiling::kWarpRows * kLd;
    const FT* ft = fs + (chunk % kStages) * kFactorChunk;
#pragma unroll
    for (int k = 0; k < kCols; k += 16) {
      Frag a[kMFrags];
#pragma unroll
      for (int m = 0; m < kMFrags; ++m) load_a(a[m], xt + m * 16 * kLd + k, kLd);
#pragma unroll
      for (int f = 0; f < NFrag; ++f) {
        Frag b;
        if constexpr (FactorKMajor) load_b_kn(b, ft + k * kLdN + f * 16, kLdN);
        else load_b_nk(b, ft + f * 16 * kLd + k, kLd);
#pragma unroll
        for (int m = 0; m < kMFrags; ++m) {
          mma<FT>(acc[m][2 * f], a[m], b, 0);
          mma<FT>(acc[m][2 * f + 1], a[m], b, 1);
        }
      }
    }
  }
  cp_async_wait<0>();
  __syncthreads();

  constexpr int kOutLd = kN + 4;
  float* stage_out = reinterpret_cast<float*>(smem);  // [kRows][kOutLd]
#pragma unroll
  for (int m = 0; m < kMFrags; ++m)
#pragma unroll
    for (int j = 0; j < 2 * NFrag; ++j) store_acc(stage_out, kOutLd, warp * Tiling::kWarpRows + m * 16, j * 8, acc[m][j]);
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

/// Grid (128-row tile slots, K slices, Tiling::kParts parts of the tile's rows), Tiling::kThreads
/// threads, Tiling::smem_bytes of dynamic shared memory. Lets a programmatic dependent (the expand
/// kernel) launch as soon as every block has started.
template <class IoT, class FT, int NFrag, bool FactorKMajor, class OutT, class Tiling>
__global__ void __launch_bounds__(Tiling::kThreads, (project_blocks_per_sm<Tiling, NFrag, FactorKMajor>))
    lora_project_kernel(ProjectParams p) {
  extern __shared__ __align__(128) unsigned char smem[];
  allow_dependent_launch();
  RowTile tile = locate_tile<kForwardRows>(p.schedule, blockIdx.x);
  tile.row0 += static_cast<std::int64_t>(blockIdx.z) * Tiling::kRows;
  tile.rows -= static_cast<std::int32_t>(blockIdx.z) * Tiling::kRows;
  if (tile.rows <= 0) return;
  project_block<IoT, FT, NFrag, FactorKMajor, OutT, Tiling>(p, tile, blockIdx.y, smem);
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

/// Tiling of the expand kernel: up to `MinBlocks` resident blocks an SM (registers capped so that
/// as many fit, where shared memory lets them), and the launch order of its blocks: the column
/// blocks of one row tile one after the other (`ColumnsFirst`: the blocks running together read
/// whole rows of y and share the tile's h rows in L2) or the row tiles of one column block.
template <int MinBlocks, bool ColumnsFirst>
struct ExpandTiling {
  static_assert(MinBlocks >= 1, "at least one block an SM");
  static constexpr bool kColumnsFirst = ColumnsFirst;
  /// Resident blocks the kernel's `__launch_bounds__` asks for: MinBlocks, or fewer where shared
  /// memory holds fewer (asking more would only cost registers).
  template <int NFrag, class IoT>
  static constexpr int min_blocks = MinBlocks < resident_blocks(expand_smem_bytes<NFrag, IoT>(), kExpandThreads)
                                        ? MinBlocks
                                        : resident_blocks(expand_smem_bytes<NFrag, IoT>(), kExpandThreads);
};

/// Resident blocks the expand kernel's `__launch_bounds__` asks for (a plain constant).
template <class Tiling, int NFrag, class IoT>
inline constexpr int expand_min_blocks = Tiling::template min_blocks<NFrag, IoT>;

/// Two neighbouring elements, accessed as one aligned word.
template <class T>
struct alignas(2 * sizeof(T)) Pair {
  T v[2];
};

/// Grid: (128-row tile slots × ceil(out / 128) column blocks) in Tiling's order, one dimension;
/// rank ≤ RankTile, a multiple of 8. The y tile (zeros when overwriting), the B slice and h arrive
/// by cp.async (no registers hold data in flight); y and B are requested before the kernel waits
/// for its prerequisites (as a programmatic dependent of the projection, whose output h is, they
/// load while the projection finishes). Warp w multiplies rows [16w, 16w + 16) on tensor cores,
/// 64 columns at a time, adds the products to its rows of the y tile in fp32, rounding once, and
/// finally stores its rows with 16-byte vectors.
template <class IoT, class FT, int NFrag, class Tiling>
__global__ void __launch_bounds__(kExpandThreads, (expand_min_blocks<Tiling, NFrag, IoT>))
    lora_expand_kernel(ExpandParams p) {
  constexpr int kN = kRankTile<NFrag>;
  constexpr int kLd = kN + kPad;
  constexpr int kLdY = kExpandCols + kPad;
  constexpr int kVectorsPerRow = kExpandCols / 8;
  constexpr int kVectors = 16 * kVectorsPerRow / 32;  // per lane
  extern __shared__ __align__(128) unsigned char smem[];
  FT* hs = reinterpret_cast<FT*>(smem);                          // [kExpandRows][kLd]
  FT* bs = hs + kExpandRows * kLd;                               // [kExpandCols][kLd]
  IoT* ys = reinterpret_cast<IoT*>(bs + kExpandCols * kLd);      // [kExpandRows][kLdY]

  const auto columns = static_cast<unsigned>((p.out + kExpandCols - 1) / kExpandCols);
  const unsigned slots = gridDim.x / columns;
  const unsigned slot = Tiling::kColumnsFirst ? blockIdx.x / columns : blockIdx.x % slots;
  const unsigned column = Tiling::kColumnsFirst ? blockIdx.x % columns : blockIdx.x / slots;
  const RowTile tile = locate_tile<kForwardRows>(p.schedule, slot);
  if (tile.rows == 0) return;
  const std::int64_t n0 = static_cast<std::int64_t>(column) * kExpandCols;
  const int n_valid = static_cast<int>(min(static_cast<std::int64_t>(kExpandCols), p.out - n0));
  const int warp = static_cast<int>(threadIdx.x) / 32, lane = static_cast<int>(threadIdx.x) % 32;
  IoT* y = static_cast<IoT*>(p.y) + tile.row0 * p.out + n0;

  load_tile<kExpandRows, kExpandCols, kExpandThreads>(ys, kLdY, static_cast<const IoT*>(y), p.out,
                                                      p.add_y ? tile.rows : 0, n_valid);
  load_tile<kExpandCols, kN, kExpandThreads>(
      bs, kLd, static_cast<const FT*>(p.b) + (static_cast<std::int64_t>(tile.expert) * p.out + n0) * p.rank, p.rank,
      n_valid, p.rank);
  wait_for_prerequisites();
  load_tile<kExpandRows, kN, kExpandThreads>(hs, kLd, static_cast<const FT*>(p.h) + tile.row0 * p.rank, p.rank,
                                             tile.rows, p.rank);
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

/// The forward's kernel tunings: `project<NFrag>` and `expand<NFrag>` (a ProjectTiling and an
/// ExpandTiling per rank tile), `kFillWave` (split K in the projection while the split grid still
/// fits one wave of resident blocks, at most two slices; else only below two blocks an SM) and
/// `kOverlap` (launch the expand kernel as a programmatic dependent of the projection).
template <class T>
concept ForwardTuning = requires {
  typename T::template project<1>;
  typename T::template expand<1>;
  { T::kFillWave } -> std::convertible_to<bool>;
  { T::kOverlap } -> std::convertible_to<bool>;
};

/// The forward's tuning on the H200 (bench/sweep_lora.cu measures the alternatives). Projection:
/// 4-stage rings (3 chunks in flight a block: rank tile ≤ 32, 64-row blocks, 4 an SM, 96 KiB in
/// flight an SM; rank tile 64, 128-row blocks, 2 an SM, 96 KiB), 3 stages at rank tile 128 (where
/// 4 would leave one block an SM); from rank tile 64 on 32-row warps (at 16 rows a warp, the
/// factor fragments every warp reads made shared memory, not HBM, the limit); K split to fill a
/// wave. Expand: four blocks an SM where shared memory allows it (rank tile ≤ 32), column blocks
/// first; launched to overlap the projection's last wave.
struct DefaultForwardTuning {
  template <int NFrag>
  using project = ProjectTiling<NFrag >= 4 ? kForwardRows : kForwardRows / 2, NFrag >= 8 ? 3 : 4, kChunk,
                                NFrag >= 4 ? 32 : 16>;
  template <int NFrag>
  using expand = ExpandTiling<4, true>;
  static constexpr bool kFillWave = true;
  static constexpr bool kOverlap = true;
};
static_assert(ForwardTuning<DefaultForwardTuning>, "DefaultForwardTuning must model ForwardTuning");

}  // namespace moelora::kernels
