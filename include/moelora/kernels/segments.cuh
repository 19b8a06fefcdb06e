/// \file
/// \brief Scan of `tokens_per_expert` on the device: row offsets, the row-tile schedule and a
/// validity flag, in one single-block kernel (CUB BlockScan), without a host synchronisation.
#pragma once

#include <cub/block/block_scan.cuh>

#include <cstdint>

#include "moelora/kernels/common.cuh"

namespace moelora::kernels {

/// Bits of the status word written by the scan.
enum CountStatus : std::uint32_t { kCountsOk = 0, kNegativeCount = 1, kWrongSum = 2 };

inline constexpr int kScanThreads = 256;

struct RowsAndTiles {
  std::int64_t rows;
  std::int64_t tiles;   // row tiles of TileRows rows
  std::int64_t groups;  // row groups of GroupRows rows
};
struct SumRowsAndTiles {
  __device__ RowsAndTiles operator()(const RowsAndTiles& a, const RowsAndTiles& b) const {
    return {a.rows + b.rows, a.tiles + b.tiles, a.groups + b.groups};
  }
};

/// offsets `[E+1]` (int64), tile_offsets and group_offsets `[E+1]` (int32; schedules of row tiles of
/// TileRows rows and of row groups of GroupRows rows) from counts `[E]` (Index = int32 or int64).
/// With `padded`, Σ ≤ rows is valid (rows past Σ are padding, covered by no offset or tile). Invalid
/// counts (a negative entry, or Σ ≠ rows; Σ > rows with `padded`) set `*status` and yield an empty schedule
/// (all offsets zero), so that no later kernel touches memory out of bounds. `*status` accumulates
/// (bitwise or) until the caller resets it.
template <class Index, int TileRows, int GroupRows>
__global__ void __launch_bounds__(kScanThreads)
    scan_counts_kernel(const Index* counts, std::int32_t experts, std::int64_t rows, bool padded, std::int64_t* offsets,
                       std::int32_t* tile_offsets, std::int32_t* group_offsets, std::uint32_t* status) {
  using Scan = cub::BlockScan<RowsAndTiles, kScanThreads>;
  __shared__ typename Scan::TempStorage temp;
  __shared__ int negative;
  __shared__ RowsAndTiles carry;
  if (threadIdx.x == 0) negative = 0, carry = {0, 0, 0};
  __syncthreads();

  for (std::int32_t base = 0; base < experts; base += kScanThreads) {
    const std::int32_t e = base + static_cast<std::int32_t>(threadIdx.x);
    const std::int64_t count = e < experts ? static_cast<std::int64_t>(counts[e]) : 0;
    if (count < 0) negative = 1;
    const std::int64_t positive = count > 0 ? count : 0;
    const RowsAndTiles item{count, (positive + TileRows - 1) / TileRows, (positive + GroupRows - 1) / GroupRows};
    RowsAndTiles prefix, total;
    Scan(temp).ExclusiveScan(item, prefix, RowsAndTiles{0, 0, 0}, SumRowsAndTiles{}, total);
    if (e < experts) {
      offsets[e] = carry.rows + prefix.rows;
      tile_offsets[e] = static_cast<std::int32_t>(carry.tiles + prefix.tiles);
      group_offsets[e] = static_cast<std::int32_t>(carry.groups + prefix.groups);
    }
    __syncthreads();  // everyone has read carry and temp
    if (threadIdx.x == 0) carry = SumRowsAndTiles{}(carry, total);
    __syncthreads();
  }
  const bool wrong_sum = padded ? carry.rows > rows : carry.rows != rows;
  const bool bad = negative || wrong_sum;
  if (threadIdx.x == 0) {
    offsets[experts] = bad ? 0 : carry.rows;
    tile_offsets[experts] = bad ? 0 : static_cast<std::int32_t>(carry.tiles);
    group_offsets[experts] = bad ? 0 : static_cast<std::int32_t>(carry.groups);
    if (bad) atomicOr(status, (negative ? kNegativeCount : 0u) | (wrong_sum ? kWrongSum : 0u));
  }
  if (bad)
    for (std::int32_t e = static_cast<std::int32_t>(threadIdx.x); e < experts; e += kScanThreads)
      offsets[e] = 0, tile_offsets[e] = 0, group_offsets[e] = 0;
}

}  // namespace moelora::kernels
