/// \file
/// \brief The fast LoRA backward on tensor cores, after the projection `u = B_eᵀ dy` (fp32, by
/// lora_project_kernel), in two kernels over row groups (up to kGroupRows rows of one expert):
///   dB pass: `dB_e += scale · Σ dy_t h_tᵀ`;
///   x pass:  `dx_t += A_eᵀ round(scale · u_t)` and `dA_e += Σ round(scale · u_t) x_tᵀ`.
/// A block owns one row group and one column slice and accumulates its factor-gradient slice over
/// the whole group in shared memory; it then adds it to global memory once: a plain
/// read-modify-write when the group is the expert's only one, fp32 vector atomics otherwise.
#pragma once

#include "moelora/kernels/lora_forward.cuh"

namespace moelora::kernels {

inline constexpr int kSubTile = 64;              ///< rows a backward block processes at a time
inline constexpr int kGroupRows = 8 * kSubTile;  ///< rows of one backward row group (schedule granularity)
inline constexpr int kBackwardStages = 3;        ///< depth of the cp.async ring of dy / x chunks

/// Columns of the slice a backward block owns, by rank tile (two or more blocks fit an SM).
template <int NFrag>
inline constexpr int kSliceCols = NFrag <= 2 ? 256 : (NFrag == 4 ? 128 : 64);

/// Shared-memory carve-out: byte offsets of consecutive 128-byte aligned regions.
struct SmemLayout {
  int used = 0;
  constexpr int take(int bytes) {
    const int at = used;
    used += (bytes + 127) / 128 * 128;
    return at;
  }
};

/// Adds the `[Rows, Cols]` fp32 tile `src` (row stride `src_ld`) times `scale` into the row-major
/// global matrix `dst` (row stride `ld`), rows < `rows`, columns < `cols` (multiples of 4): with
/// vector atomics when other blocks add to the same elements (`shared`), else read-modify-write.
template <int Rows, int Cols, int Threads>
__device__ __forceinline__ void add_tile(float* dst, std::int64_t ld, const float* src, int src_ld, int rows, int cols,
                                         float scale, bool shared) {
  for (int i = static_cast<int>(threadIdx.x); i < Rows * Cols / 4; i += Threads) {
    const int r = i / (Cols / 4), c = (i % (Cols / 4)) * 4;
    if (r >= rows || c >= cols) continue;
    const float* s = src + r * src_ld + c;
    const float4 v = make_float4(scale * s[0], scale * s[1], scale * s[2], scale * s[3]);
    float4* to = reinterpret_cast<float4*>(dst + r * ld + c);
    if (shared) {
      atomicAdd(to, v);
    } else {
      const float4 old = *to;
      *to = make_float4(old.x + v.x, old.y + v.y, old.z + v.z, old.w + v.w);
    }
  }
}

/// Whether other row groups share the group's expert (so its gradient slice needs atomics).
__device__ __forceinline__ bool expert_is_shared(const TileSchedule& s, const RowTile& group) {
  return s.offsets[group.expert + 1] - s.offsets[group.expert] != group.rows;
}

struct GradBParams {
  const void* dy;  // [T, out]
  const void* h;   // [T, r]
  float* grad_b;   // [E, out, r] fp32
  TileSchedule groups;
  std::int64_t out;
  std::int32_t rank;
  float scale;
};

inline constexpr int kGradBThreads = kWarps * 32;

template <int NFrag>
struct GradBLayout {
  static constexpr int kN = kRankTile<NFrag>, kLdN = kN + kPad, kSlice = kSliceCols<NFrag>;
  static constexpr int kLdC = kChunk + kPad;
  int db, dy, h, bytes;
  constexpr GradBLayout() {
    SmemLayout s;
    db = s.take(kSlice * (kN + 4) * 4);                  // dB accumulator [kSlice][kN + 4] fp32
    dy = s.take(kBackwardStages * kSubTile * kLdC * 2);  // dy chunk ring [stages][64][72]
    h = s.take(kSubTile * kLdN * 2);                     // h tile [64][kLdN]
    bytes = s.used;
  }
};

/// Grid (row-group slots, ceil(out / kSliceCols)). Warp w owns rows [16w, 16w + 16) of every
/// 64-column chunk of the slice: dB rows += dy chunkᵀ · h.
template <class IoT, class FT, int NFrag>
__global__ void __launch_bounds__(kGradBThreads) lora_grad_b_kernel(GradBParams p) {
  using L = GradBLayout<NFrag>;
  constexpr int kN = L::kN, kLdN = L::kLdN, kLdC = L::kLdC, kDbLd = kN + 4;
  constexpr int kStagesB = kBackwardStages;
  constexpr L kLayout{};
  extern __shared__ __align__(128) unsigned char smem[];
  float* db = reinterpret_cast<float*>(smem + kLayout.db);
  FT* dys = reinterpret_cast<FT*>(smem + kLayout.dy);
  FT* hs = reinterpret_cast<FT*>(smem + kLayout.h);

  const RowTile group = locate_tile<kGroupRows>(p.groups, blockIdx.x);
  if (group.rows == 0) return;
  const std::int64_t n0 = static_cast<std::int64_t>(blockIdx.y) * L::kSlice;
  const int n_valid = static_cast<int>(min(static_cast<std::int64_t>(L::kSlice), p.out - n0));
  const int chunks = (n_valid + kChunk - 1) / kChunk;
  const int tiles = (group.rows + kSubTile - 1) / kSubTile;
  const int warp = static_cast<int>(threadIdx.x) / 32;
  const IoT* dy = static_cast<const IoT*>(p.dy) + group.row0 * p.out + n0;
  const FT* h = static_cast<const FT*>(p.h) + group.row0 * p.rank;

  for (int i = static_cast<int>(threadIdx.x); i < L::kSlice * kDbLd; i += kGradBThreads) db[i] = 0.0f;
  const int iterations = tiles * chunks;
  const auto load_dy = [&](int it) {  // chunk c of sub-tile t, into stage it % kStagesB
    if (it >= iterations) return;
    const int t = it / chunks, c = it % chunks;
    load_tile<kSubTile, kChunk, kGradBThreads>(dys + (it % kStagesB) * kSubTile * kLdC, kLdC,
                                               dy + static_cast<std::int64_t>(t) * kSubTile * p.out + c * kChunk, p.out,
                                               group.rows - t * kSubTile, n_valid - c * kChunk);
  };
  for (int s = 0; s < kStagesB - 1; ++s) {
    load_dy(s);
    cp_async_commit();
  }
  for (int it = 0; it < iterations; ++it) {
    const int t = it / chunks, c = it % chunks;
    cp_async_wait<kStagesB - 2>();
    __syncthreads();  // chunk `it` has landed; iteration it − 1 is done everywhere
    load_dy(it + kStagesB - 1);
    cp_async_commit();
    if (c == 0) {  // a new sub-tile: its h
      load_tile<kSubTile, kN, kGradBThreads, false>(hs, kLdN, h + static_cast<std::int64_t>(t) * kSubTile * p.rank,
                                                    p.rank, group.rows - t * kSubTile, p.rank);
      __syncthreads();
    }
    const FT* dyt = dys + (it % kStagesB) * kSubTile * kLdC;
#pragma unroll
    for (int f = 0; f < NFrag; ++f) {
      float* acc_at = db + (c * kChunk + warp * 16) * kDbLd + f * 16;
      FragAcc acc;
      nvcuda::wmma::load_matrix_sync(acc, acc_at, kDbLd, nvcuda::wmma::mem_row_major);
#pragma unroll
      for (int m = 0; m < kSubTile; m += 16) {
        FragAT<FT> fa;
        nvcuda::wmma::load_matrix_sync(fa, dyt + m * kLdC + warp * 16, kLdC);
        FragB<FT> fb;
        nvcuda::wmma::load_matrix_sync(fb, hs + m * kLdN + f * 16, kLdN);
        nvcuda::wmma::mma_sync(acc, fa, fb, acc);
      }
      nvcuda::wmma::store_matrix_sync(acc_at, acc, kDbLd, nvcuda::wmma::mem_row_major);
    }
  }
  __syncthreads();
  add_tile<L::kSlice, kN, kGradBThreads>(p.grad_b + (static_cast<std::int64_t>(group.expert) * p.out + n0) * p.rank,
                                         p.rank, db, kDbLd, n_valid, p.rank, p.scale,
                                         expert_is_shared(p.groups, group));
}

struct BackwardXParams {
  const void* x;   // [T, in]
  const void* a;   // [E, r, in]
  const float* u;  // [T, r] fp32, B_eᵀ dy_t without the scale
  void* dx;        // [T, in]; null: not needed
  float* grad_a;   // [E, r, in] fp32; null: A frozen
  TileSchedule groups;
  std::int64_t in;
  std::int32_t rank;
  float scale;
};

template <int NFrag>
struct BackwardXLayout {
  static constexpr int kN = kRankTile<NFrag>, kLdN = kN + kPad, kSlice = kSliceCols<NFrag>;
  static constexpr int kLdC = kChunk + kPad, kLdS = kSlice + kPad;
  int a, da, x, u, dx, bytes;
  constexpr BackwardXLayout() {
    SmemLayout s;
    a = s.take(kN * kLdS * 2);               // A slice [kN][kSlice + 8]
    da = s.take(kN * (kSlice + 4) * 4);      // dA accumulator [kN][kSlice + 4] fp32
    x = s.take(kBackwardStages * kSubTile * kLdC * 2);  // x chunk ring [stages][64][72]
    u = s.take(kSubTile * kLdN * 2);         // round(scale · u) tile [64][kLdN]
    dx = s.take(kWarps * 16 * (kChunk + 4) * 4);  // per-warp dx stage [4][16][68] fp32
    bytes = s.used;
  }
};

inline constexpr int kBackwardThreads = 2 * kWarps * 32;  ///< warps 0–3: dx; warps 4–7: dA

/// Grid (row-group slots, ceil(in / kSliceCols)).
template <class IoT, class FT, int NFrag>
__global__ void __launch_bounds__(kBackwardThreads, 2) lora_backward_x_kernel(BackwardXParams p) {
  using L = BackwardXLayout<NFrag>;
  constexpr int kN = L::kN, kLdN = L::kLdN, kLdC = L::kLdC, kLdS = L::kLdS, kDaLd = L::kSlice + 4;
  constexpr int kDxLd = kChunk + 4;
  constexpr int kDxVectors = 16 * (kChunk / 8) / 32;  // per lane
  constexpr L kLayout{};
  extern __shared__ __align__(128) unsigned char smem[];
  FT* as = reinterpret_cast<FT*>(smem + kLayout.a);
  float* da = reinterpret_cast<float*>(smem + kLayout.da);
  FT* xs = reinterpret_cast<FT*>(smem + kLayout.x);
  FT* us = reinterpret_cast<FT*>(smem + kLayout.u);

  const RowTile group = locate_tile<kGroupRows>(p.groups, blockIdx.x);
  if (group.rows == 0) return;
  const std::int64_t k0 = static_cast<std::int64_t>(blockIdx.y) * L::kSlice;
  const int k_valid = static_cast<int>(min(static_cast<std::int64_t>(L::kSlice), p.in - k0));
  const int chunks = (k_valid + kChunk - 1) / kChunk;
  const int tiles = (group.rows + kSubTile - 1) / kSubTile;
  const int warp = static_cast<int>(threadIdx.x) / 32, lane = static_cast<int>(threadIdx.x) % 32;
  const IoT* x = static_cast<const IoT*>(p.x) + group.row0 * p.in + k0;
  IoT* dx = p.dx ? static_cast<IoT*>(p.dx) + group.row0 * p.in + k0 : nullptr;

  load_tile<kN, L::kSlice, kBackwardThreads>(
      as, kLdS, static_cast<const FT*>(p.a) + static_cast<std::int64_t>(group.expert) * p.rank * p.in + k0, p.in,
      p.rank, k_valid);
  for (int i = static_cast<int>(threadIdx.x); i < kN * kDaLd; i += kBackwardThreads) da[i] = 0.0f;
  constexpr int kStagesB = kBackwardStages;
  const int iterations = tiles * chunks;
  const auto load_x = [&](int it) {  // chunk c of sub-tile t, into stage it % kStagesB
    if (!p.grad_a || it >= iterations) return;
    const int t = it / chunks, c = it % chunks;
    load_tile<kSubTile, kChunk, kBackwardThreads>(xs + (it % kStagesB) * kSubTile * kLdC, kLdC,
                                                  x + static_cast<std::int64_t>(t) * kSubTile * p.in + c * kChunk, p.in,
                                                  group.rows - t * kSubTile, k_valid - c * kChunk);
  };
  for (int s = 0; s < kStagesB - 1; ++s) {  // the A slice travels with the first group
    load_x(s);
    cp_async_commit();
  }

  for (int it = 0; it < iterations; ++it) {
    const int t = it / chunks, c = it % chunks;
    // dx rows [16 warp, +16), columns [c·64, +64): issue the loads before waiting
    Vec8<IoT> dx_old[kDxVectors];
    const int dx_row0 = t * kSubTile + warp * 16;
    if (warp < kWarps && dx) {
#pragma unroll
      for (int i = 0; i < kDxVectors; ++i) {
        const int v = i * 32 + lane, r = v / (kChunk / 8), col = c * kChunk + (v % (kChunk / 8)) * 8;
        if (dx_row0 + r < group.rows && col < k_valid)
          dx_old[i] = *reinterpret_cast<const Vec8<IoT>*>(dx + static_cast<std::int64_t>(dx_row0 + r) * p.in + col);
      }
    }
    cp_async_wait<kStagesB - 2>();
    __syncthreads();  // chunk `it` has landed; iteration it − 1 is done everywhere
    load_x(it + kStagesB - 1);
    cp_async_commit();
    if (c == 0) {  // a new sub-tile: its round(scale · u), zero past the tile and the rank
      const int tile_rows = group.rows - t * kSubTile;
      const float* u = p.u + (group.row0 + static_cast<std::int64_t>(t) * kSubTile) * p.rank;
      for (int i = static_cast<int>(threadIdx.x); i < kSubTile * kN; i += kBackwardThreads) {
        const int r = i / kN, j = i % kN;
        us[r * kLdN + j] = from_float<FT>(r < tile_rows && j < p.rank ? p.scale * u[r * p.rank + j] : 0.0f);
      }
      __syncthreads();
    }

    if (warp < kWarps) {
      if (dx) {
        FragAcc acc[kChunk / 16];
#pragma unroll
        for (int f = 0; f < kChunk / 16; ++f) nvcuda::wmma::fill_fragment(acc[f], 0.0f);
#pragma unroll
        for (int k = 0; k < kN; k += 16) {
          FragA<FT> fa;
          nvcuda::wmma::load_matrix_sync(fa, us + warp * 16 * kLdN + k, kLdN);
#pragma unroll
          for (int f = 0; f < kChunk / 16; ++f) {
            FragB<FT> fb;
            nvcuda::wmma::load_matrix_sync(fb, as + k * kLdS + c * kChunk + f * 16, kLdS);
            nvcuda::wmma::mma_sync(acc[f], fa, fb, acc[f]);
          }
        }
        float* stage = reinterpret_cast<float*>(smem + kLayout.dx) + warp * 16 * kDxLd;
#pragma unroll
        for (int f = 0; f < kChunk / 16; ++f)
          nvcuda::wmma::store_matrix_sync(stage + f * 16, acc[f], kDxLd, nvcuda::wmma::mem_row_major);
        __syncwarp();
#pragma unroll
        for (int i = 0; i < kDxVectors; ++i) {
          const int v = i * 32 + lane, r = v / (kChunk / 8), cc = (v % (kChunk / 8)) * 8;
          const int col = c * kChunk + cc;
          if (dx_row0 + r >= group.rows || col >= k_valid) continue;
          Vec8<IoT> out;
#pragma unroll
          for (int j = 0; j < 8; ++j) out.v[j] = from_float<IoT>(to_float(dx_old[i].v[j]) + stage[r * kDxLd + cc + j]);
          *reinterpret_cast<Vec8<IoT>*>(dx + static_cast<std::int64_t>(dx_row0 + r) * p.in + col) = out;
        }
      }
    } else if (p.grad_a) {  // dA columns [c·64 + 16 (warp−4), +16) += round(scale·u)ᵀ · x chunk
      const int wn = warp - kWarps;
      const FT* xt = xs + (it % kStagesB) * kSubTile * kLdC;
#pragma unroll
      for (int f = 0; f < NFrag; ++f) {
        float* acc_at = da + f * 16 * kDaLd + c * kChunk + wn * 16;
        FragAcc acc;
        nvcuda::wmma::load_matrix_sync(acc, acc_at, kDaLd, nvcuda::wmma::mem_row_major);
#pragma unroll
        for (int m = 0; m < kSubTile; m += 16) {
          FragAT<FT> fa;
          nvcuda::wmma::load_matrix_sync(fa, us + m * kLdN + f * 16, kLdN);
          FragB<FT> fb;
          nvcuda::wmma::load_matrix_sync(fb, xt + m * kLdC + wn * 16, kLdC);
          nvcuda::wmma::mma_sync(acc, fa, fb, acc);
        }
        nvcuda::wmma::store_matrix_sync(acc_at, acc, kDaLd, nvcuda::wmma::mem_row_major);
      }
    }
  }
  __syncthreads();
  if (p.grad_a)
    add_tile<kN, L::kSlice, kBackwardThreads>(p.grad_a + static_cast<std::int64_t>(group.expert) * p.rank * p.in + k0,
                                              p.in, da, kDaLd, p.rank, k_valid, 1.0f, expert_is_shared(p.groups, group));
}

}  // namespace moelora::kernels
