/// \file
/// \brief The fast LoRA backward on tensor cores, after the projection `u = round(scale · B_eᵀ dy)`
/// (lora_project_kernel, in the factor dtype), in two kernels over row groups (up to kGroupRows rows of one expert) and
/// 64-column slices:
///   dB pass: `dB_e += scale · Σ dy_t h_tᵀ`;
///   x pass:  `dx_t += A_eᵀ u_t` and `dA_e += Σ u_t x_tᵀ`.
/// A block keeps its factor-gradient slice in registers while it streams the group's rows through
/// a cp.async ring, then adds it to global memory once: a plain read-modify-write (or a store, when
/// overwriting) when the group is its expert's only one, fp32 vector atomics otherwise. When
/// overwriting, `zero_unowned_grads_kernel` first zeroes the slices of experts that have no rows or
/// several groups. With a GradOrder the several groups of an expert add in row order instead
/// (deterministic bits: the replicated factor of a tensor-parallel layer).
#pragma once

#include <cuda/atomic>

#include "moelora/kernels/lora_forward.cuh"

namespace moelora::kernels {

inline constexpr int kWarps = 4;                 ///< warps of one role (row-wise result or gradient)
inline constexpr int kSubTile = 64;              ///< rows a backward block processes at a time
inline constexpr int kGroupRows = 16 * kSubTile;  ///< rows of one backward row group (schedule granularity)
inline constexpr int kBackwardStages = 4;        ///< depth of the cp.async ring of row tiles

/// Shared-memory carve-out: byte offsets of consecutive 128-byte aligned regions.
struct SmemLayout {
  int used = 0;
  constexpr int take(int bytes) {
    const int at = used;
    used += (bytes + 127) / 128 * 128;
    return at;
  }
};

/// How a block's gradient slice reaches global memory.
enum class TileUpdate {
  store,        ///< dst = src: the block owns the elements and overwrites them
  add,          ///< dst += src: the block owns the elements
  atomic_add,   ///< dst += src with vector atomics: other blocks add to the same elements
  ordered_add,  ///< dst += src, reading dst from L2: blocks add one after another (GradOrder)
};

/// Ordered gradient adds. Blocks take their (column slice, row-group slot) work from `ticket` in
/// the order they start, so every block a block waits for has started (as in CUB's decoupled
/// look-back); the row groups of one expert then add their slice to the gradient one after another,
/// in row order: a fixed fp32 summation order, the same bits on every run and on every rank of a
/// tensor-parallel group. Null `ticket`: blockIdx order and atomic adds.
struct GradOrder {
  unsigned* ticket;  // [1], zero at launch
  unsigned* turns;   // [E × gridDim.x], zero at launch: row groups of (expert, slice) that have added
};

/// The block's work (x: column slice, y: row-group slot): blockIdx, or the next ticket.
__device__ __forceinline__ uint2 block_work(const GradOrder& order) {
  if (!order.ticket) return make_uint2(blockIdx.x, blockIdx.y);
  __shared__ unsigned work;
  if (threadIdx.x == 0) work = atomicAdd(order.ticket, 1u);
  __syncthreads();
  return make_uint2(work % gridDim.x, work / gridDim.x);
}

/// The update of a group's gradient slice: atomic when other row groups share the group's expert,
/// else a store when overwriting and an add when accumulating.
__device__ __forceinline__ TileUpdate gradient_update(const TileSchedule& s, const RowTile& group, bool add_grads) {
  if (s.offsets[group.expert + 1] - s.offsets[group.expert] != group.rows) return TileUpdate::atomic_add;
  return add_grads ? TileUpdate::add : TileUpdate::store;
}

/// Writes the `[Rows, Cols]` fp32 tile `src` (row stride `src_ld`) times `scale` into the row-major
/// global matrix `dst` (row stride `ld`), rows < `rows`, columns < `cols` (multiples of 4).
template <int Rows, int Cols, int Threads>
__device__ __forceinline__ void update_tile(float* dst, std::int64_t ld, const float* src, int src_ld, int rows,
                                            int cols, float scale, TileUpdate update) {
  for (int i = static_cast<int>(threadIdx.x); i < Rows * Cols / 4; i += Threads) {
    const int r = i / (Cols / 4), c = (i % (Cols / 4)) * 4;
    if (r >= rows || c >= cols) continue;
    const float* s = src + r * src_ld + c;
    const float4 v = make_float4(scale * s[0], scale * s[1], scale * s[2], scale * s[3]);
    float4* to = reinterpret_cast<float4*>(dst + r * ld + c);
    if (update == TileUpdate::atomic_add) {
      atomicAdd(to, v);
    } else if (update == TileUpdate::ordered_add) {
      const float4 old = __ldcg(to);
      *to = make_float4(old.x + v.x, old.y + v.y, old.z + v.z, old.w + v.w);
    } else if (update == TileUpdate::add) {
      const float4 old = *to;
      *to = make_float4(old.x + v.x, old.y + v.y, old.z + v.z, old.w + v.w);
    } else {
      *to = v;
    }
  }
}

/// update_tile of row group `group`'s slice `slice` (of gridDim.x); with `order.turns` an expert's
/// several groups add in row order (each waits for its predecessor's turn, then passes it on).
template <int Rows, int Cols, int Threads>
__device__ __forceinline__ void update_group_tile(const GradOrder& order, const TileSchedule& s, const RowTile& group,
                                                  unsigned slice, float* dst, std::int64_t ld, const float* src,
                                                  int src_ld, int rows, int cols, float scale, bool add_grads) {
  const TileUpdate update = gradient_update(s, group, add_grads);
  if (update != TileUpdate::atomic_add || !order.turns) {
    update_tile<Rows, Cols, Threads>(dst, ld, src, src_ld, rows, cols, scale, update);
    return;
  }
  cuda::atomic_ref<unsigned, cuda::thread_scope_device> turn(
      order.turns[static_cast<std::int64_t>(group.expert) * gridDim.x + slice]);
  const auto index = static_cast<unsigned>((group.row0 - s.offsets[group.expert]) / kGroupRows);
  if (threadIdx.x == 0)
    while (turn.load(cuda::memory_order_acquire) != index) __nanosleep(64);
  __syncthreads();
  update_tile<Rows, Cols, Threads>(dst, ld, src, src_ld, rows, cols, scale, TileUpdate::ordered_add);
  __threadfence();
  __syncthreads();
  if (threadIdx.x == 0) turn.fetch_add(1u, cuda::memory_order_release);
}

/// Before overwriting gradients: zeroes the gradient slices (`[E, slice_a]` and `[E, slice_b]`
/// fp32, either pointer may be null) of the experts whose row groups will not store them: those
/// with no rows and those with more than `GroupRows` rows (several groups, which add atomically).
/// Grid (⌈max slice / 1024⌉, E), 256 threads of one float4 each; slices are multiples of 4 floats.
template <int GroupRows>
__global__ void zero_unowned_grads_kernel(float* grad_a, std::int64_t slice_a, float* grad_b, std::int64_t slice_b,
                                          const std::int64_t* offsets) {
  const std::int64_t e = blockIdx.y, count = offsets[e + 1] - offsets[e];
  if (count > 0 && count <= GroupRows) return;
  const std::int64_t i = (static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) * 4;
  const float4 zero = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
  if (grad_a && i < slice_a) *reinterpret_cast<float4*>(grad_a + e * slice_a + i) = zero;
  if (grad_b && i < slice_b) *reinterpret_cast<float4*>(grad_b + e * slice_b + i) = zero;
}

// ---- dB ------------------------------------------------------------------------------------------

struct GradBParams {
  const void* dy;  // [T, out]
  const void* h;   // [T, r]
  float* grad_b;   // [E, out, r] fp32
  TileSchedule groups;
  std::int64_t out;
  std::int32_t rank;
  float scale;
  bool add_grads;  // dB += (else dB =)
  GradOrder order;
};

inline constexpr int kGradBCols = 128;  ///< dB rows (out columns) of one dB block
inline constexpr int kGradBThreads = kGradBCols / 16 * 32;

template <int NFrag>
struct GradBLayout {
  static constexpr int kN = kRankTile<NFrag>, kLdN = kN + kPad, kLdC = kGradBCols + kPad;
  static constexpr int kDy = kSubTile * kLdC, kH = kSubTile * kLdN;  // elements per stage
  int ring, bytes;
  constexpr GradBLayout() {
    SmemLayout s;
    ring = s.take(kBackwardStages * (kDy + kH) * 2);  // [stages] × (dy tile [64][136], h tile [64][kLdN])
    const int stage_out = kGradBCols * (kN + 4) * 4;  // dB slice [128][kN + 4] fp32, after the ring
    bytes = s.used > stage_out ? s.used : stage_out;
  }
};

/// One dB block: column slice `work.x` (128 dB rows) of row-group slot `work.y`; kGradBThreads
/// threads, `smem` of GradBLayout<NFrag>::bytes. Warp w owns dB rows [n0 + 16w, +16) of the slice
/// (all rank columns, in registers) and adds dy tileᵀ · h tile for every sub-tile of the group.
template <class IoT, class FT, int NFrag>
__device__ __forceinline__ void grad_b_block(const GradBParams& p, uint2 work, unsigned char* smem) {
  using L = GradBLayout<NFrag>;
  constexpr int kN = L::kN, kLdN = L::kLdN, kLdC = L::kLdC, kOutLd = kN + 4;
  constexpr L kLayout{};
  FT* ring = reinterpret_cast<FT*>(smem + kLayout.ring);

  const RowTile group = locate_tile<kGroupRows>(p.groups, work.y);
  if (group.rows == 0) return;
  const std::int64_t n0 = static_cast<std::int64_t>(work.x) * kGradBCols;
  const int n_valid = static_cast<int>(min(static_cast<std::int64_t>(kGradBCols), p.out - n0));
  const int tiles = (group.rows + kSubTile - 1) / kSubTile;
  const int warp = static_cast<int>(threadIdx.x) / 32;
  const IoT* dy = static_cast<const IoT*>(p.dy) + group.row0 * p.out + n0;
  const FT* h = static_cast<const FT*>(p.h) + group.row0 * p.rank;

  const auto load = [&](int t) {  // sub-tile t's dy slice and h rows, into stage t % kBackwardStages
    FT* stage = ring + (t % kBackwardStages) * (L::kDy + L::kH);
    const int rows = group.rows - t * kSubTile;
    load_tile<kSubTile, kGradBCols, kGradBThreads>(stage, kLdC, dy + static_cast<std::int64_t>(t) * kSubTile * p.out,
                                                   p.out, rows, n_valid);
    load_tile<kSubTile, kN, kGradBThreads>(stage + L::kDy, kLdN, h + static_cast<std::int64_t>(t) * kSubTile * p.rank,
                                           p.rank, rows, p.rank);
  };
  ring_fill<kBackwardStages>(tiles, load);
  Acc acc[2 * NFrag];  // 8-column tiles of the warp's 16 dB rows
  for (int t = 0; t < tiles; ++t) {
    ring_next<kBackwardStages>(t, tiles, load);
    const FT* dys = ring + (t % kBackwardStages) * (L::kDy + L::kH);
    const FT* hs = dys + L::kDy;
#pragma unroll
    for (int m = 0; m < kSubTile; m += 16) {
      Frag a;  // dyᵀ rows [16w, +16), rows m.. of the sub-tile
      load_a_trans(a, dys + m * kLdC + warp * 16, kLdC);
#pragma unroll
      for (int f = 0; f < NFrag; ++f) {
        Frag b;
        load_b_kn(b, hs + m * kLdN + f * 16, kLdN);
        mma<FT>(acc[2 * f], a, b, 0);
        mma<FT>(acc[2 * f + 1], a, b, 1);
      }
    }
  }
  cp_async_wait<0>();
  __syncthreads();  // the ring becomes the output stage
  float* stage_out = reinterpret_cast<float*>(smem);
#pragma unroll
  for (int j = 0; j < 2 * NFrag; ++j) store_acc(stage_out, kOutLd, warp * 16, j * 8, acc[j]);
  __syncthreads();
  update_group_tile<kGradBCols, kN, kGradBThreads>(
      p.order, p.groups, group, work.x, p.grad_b + (static_cast<std::int64_t>(group.expert) * p.out + n0) * p.rank,
      p.rank, stage_out, kOutLd, n_valid, p.rank, p.scale, p.add_grads);
}

/// Grid (ceil(out / 128), row-group slots): the slices of one group run together and share its h
/// rows in L2 (128-column slices halve the h traffic from L2 of 64-column ones).
template <class IoT, class FT, int NFrag>
__global__ void __launch_bounds__(kGradBThreads) lora_grad_b_kernel(GradBParams p) {
  extern __shared__ __align__(128) unsigned char smem[];
  grad_b_block<IoT, FT, NFrag>(p, block_work(p.order), smem);
}

// ---- the pass over dy: u and dB together -----------------------------------------------------------

/// Whether the pass over dy pays for dy rows of `out` columns at a rank tile: below rank tile 64
/// (bench_lora on the H200: the LoRA branch's forward + backward 3–8% faster at rank 16; at rank
/// 64, where the u projection wants 32-row warps, 1–4% slower) and up to 8192 columns (at 28672,
/// mixtral fc1, the u blocks' long rows finish after the dB blocks: 5–6% slower).
template <int NFrag>
constexpr bool dy_pass_pays(std::int64_t out) {
  return NFrag < 4 && out <= 8192;
}

/// The u projection's tiling in the pass over dy: whole 128-row tiles, the dB blocks' 256 threads.
using DyPassProjectTiling = ProjectTiling<kForwardRows, 3>;
static_assert(DyPassProjectTiling::kThreads == kGradBThreads, "the two roles of the dy pass share a block size");

/// u projection blocks per row group in the pass over dy.
inline constexpr int kDyPassProjectBlocks = kGroupRows / kForwardRows;

/// Shared memory of the pass over dy: the larger of its two roles'.
template <int NFrag>
constexpr int dy_pass_smem_bytes() {
  const int project = DyPassProjectTiling::smem_bytes<NFrag, true>(), grad_b = GradBLayout<NFrag>{}.bytes;
  return project > grad_b ? project : grad_b;
}

/// The backward's two passes over dy in one grid: the projection `u = round(scale · B_eᵀ dy)`
/// (`u`: one K slice, factor-dtype out) and dB (`grad_b`, atomic adds between an expert's groups),
/// their blocks interleaved by row group (group-major: kDyPassProjectBlocks u blocks, one per
/// 128 rows, then ceil(out / 128) dB blocks), so that both read a group's dy rows at about the same
/// time and one of the two reads comes from L2. Each block computes what it would in its own
/// kernel: the same bits.
template <class IoT, class FT, int NFrag>
__global__ void __launch_bounds__(kGradBThreads) lora_dy_pass_kernel(ProjectParams u, GradBParams grad_b) {
  extern __shared__ __align__(128) unsigned char smem[];
  const auto out_slices = static_cast<unsigned>((grad_b.out + kGradBCols - 1) / kGradBCols);
  const unsigned per_group = kDyPassProjectBlocks + out_slices;
  const unsigned slot = blockIdx.x / per_group, role = blockIdx.x % per_group;
  if (role >= kDyPassProjectBlocks) {
    grad_b_block<IoT, FT, NFrag>(grad_b, make_uint2(role - kDyPassProjectBlocks, slot), smem);
    return;
  }
  RowTile tile = locate_tile<kGroupRows>(grad_b.groups, slot);
  tile.row0 += static_cast<std::int64_t>(role) * kForwardRows;
  tile.rows -= static_cast<std::int32_t>(role) * kForwardRows;
  if (tile.rows <= 0) return;
  project_block<IoT, FT, NFrag, true, FT, DyPassProjectTiling>(u, tile, 0, smem);
}

// ---- dx and dA -----------------------------------------------------------------------------------

struct BackwardXParams {
  const void* x;         // [T, in]
  const void* a;         // [E, r, in]
  const void* u;         // [T, r] round(scale · B_eᵀ dy_t), factor dtype
  const void* u_grad_a;  // [T, r]: the u of dA where it differs from dx's (SplitU kernels only)
  void* dx;              // [T, in]; null: not needed
  float* grad_a;   // [E, r, in] fp32; null: A frozen
  TileSchedule groups;
  std::int64_t in;
  std::int32_t rank;
  bool add_dx;     // dx += (else dx =: the dx tile starts at zero, nothing is read)
  bool add_grads;  // dA += (else dA =)
  GradOrder order;
};

inline constexpr int kBackwardThreads = 2 * kWarps * 32;  ///< warps 0–3: dx; warps 4–7: dA


/// Ring depth of the x pass (three tiles a stage).
inline constexpr int kXStages = 3;

/// SplitU: a second u tile per stage, the u of dA (a column-parallel layer's reduced u).
template <int NFrag, class IoT, bool SplitU = false>
struct BackwardXLayout {
  static constexpr int kN = kRankTile<NFrag>, kLdN = kN + kPad, kLdC = kChunk + kPad;
  static constexpr int kXBytes = kSubTile * kLdC * 2, kUBytes = kSubTile * kLdN * 2;
  static constexpr int kDxBytes = kSubTile * kLdC * static_cast<int>(sizeof(IoT));
  static constexpr int kUTiles = SplitU ? 2 : 1;
  static constexpr int kStageBytes = kXBytes + kUTiles * kUBytes + kDxBytes;
  int a, ring, bytes;
  constexpr BackwardXLayout() {
    SmemLayout s;
    a = s.take(kN * kLdC * 2);                         // A slice [kN][72]
    ring = s.take(kXStages * kStageBytes);             // [stages] × (x [64][72], u [64][kLdN] (×2), dx [64][72])
    const int da_stage = kN * (kChunk + 4) * 4;        // dA slice [kN][68] fp32, after the ring
    bytes = s.used > da_stage ? s.used : da_stage;
  }
};

/// Grid (ceil(in / 64), row-group slots): the slices of one group run together and share its u
/// rows in L2. Per sub-tile of the group, whose x, u and dx tiles arrive through a cp.async ring:
/// warps 0–3 add u · A slice to their 16 rows of the dx tile (in fp32, rounding once) and store
/// them; warps 4–7 accumulate dA columns
/// [k0 + 16 (w − 4), +16) (all rank rows, in registers) += uᵀ · x tile. SplitU: dA's u rows come
/// from `p.u_grad_a`, a second tile of the ring.
template <class IoT, class FT, int NFrag, bool SplitU = false>
__global__ void __launch_bounds__(kBackwardThreads, 2) lora_backward_x_kernel(BackwardXParams p) {
  using L = BackwardXLayout<NFrag, IoT, SplitU>;
  constexpr int kN = L::kN, kLdN = L::kLdN, kLdC = L::kLdC, kStageLd = kChunk + 4;
  constexpr int kDxVectors = 16 * (kChunk / 8) / 32;  // per lane
  constexpr L kLayout{};
  extern __shared__ __align__(128) unsigned char smem[];
  FT* as = reinterpret_cast<FT*>(smem + kLayout.a);
  unsigned char* ring = smem + kLayout.ring;

  const uint2 work = block_work(p.order);
  const RowTile group = locate_tile<kGroupRows>(p.groups, work.y);
  if (group.rows == 0) return;
  const std::int64_t k0 = static_cast<std::int64_t>(work.x) * kChunk;
  const int k_valid = static_cast<int>(min(static_cast<std::int64_t>(kChunk), p.in - k0));
  const int tiles = (group.rows + kSubTile - 1) / kSubTile;
  const int warp = static_cast<int>(threadIdx.x) / 32, lane = static_cast<int>(threadIdx.x) % 32;
  const IoT* x = static_cast<const IoT*>(p.x) + group.row0 * p.in + k0;
  IoT* dx = p.dx ? static_cast<IoT*>(p.dx) + group.row0 * p.in + k0 : nullptr;
  const FT* u = static_cast<const FT*>(p.u) + group.row0 * p.rank;
  const FT* u_grad_a = SplitU ? static_cast<const FT*>(p.u_grad_a) + group.row0 * p.rank : u;
  const auto x_tile = [&](int t) { return reinterpret_cast<FT*>(ring + (t % kXStages) * L::kStageBytes); };
  const auto u_tile = [&](int t, int which) {
    return reinterpret_cast<FT*>(ring + (t % kXStages) * L::kStageBytes + L::kXBytes + which * L::kUBytes);
  };
  const auto dx_tile = [&](int t) {
    return reinterpret_cast<IoT*>(ring + (t % kXStages) * L::kStageBytes + L::kXBytes + L::kUTiles * L::kUBytes);
  };

  load_tile<kN, kChunk, kBackwardThreads>(
      as, kLdC, static_cast<const FT*>(p.a) + static_cast<std::int64_t>(group.expert) * p.rank * p.in + k0, p.in,
      p.rank, k_valid);
  const auto load = [&](int t) {  // sub-tile t's x slice, u rows and dx slice
    const int rows = group.rows - t * kSubTile;
    const std::int64_t row0 = static_cast<std::int64_t>(t) * kSubTile;
    if (p.grad_a) load_tile<kSubTile, kChunk, kBackwardThreads>(x_tile(t), kLdC, x + row0 * p.in, p.in, rows, k_valid);
    load_tile<kSubTile, kN, kBackwardThreads>(u_tile(t, 0), kLdN, u + row0 * p.rank, p.rank, rows, p.rank);
    if (SplitU && p.grad_a)
      load_tile<kSubTile, kN, kBackwardThreads>(u_tile(t, 1), kLdN, u_grad_a + row0 * p.rank, p.rank, rows, p.rank);
    if (dx)
      load_tile<kSubTile, kChunk, kBackwardThreads>(dx_tile(t), kLdC, dx + row0 * p.in, p.in, p.add_dx ? rows : 0,
                                                    k_valid);
  };
  ring_fill<kXStages>(tiles, load);  // the A slice travels with the first group

  Acc da[NFrag][2];  // dA rank rows [16f, +16) × the warp's 16 columns (two 8-column tiles)
  for (int t = 0; t < tiles; ++t) {
    ring_next<kXStages>(t, tiles, load);
    const FT* xs = x_tile(t);
    const FT* us = u_tile(t, 0);

    if (warp < kWarps) {
      if (!dx) continue;
      Acc acc[kChunk / 8];
#pragma unroll
      for (int k = 0; k < kN; k += 16) {
        Frag a;
        load_a(a, us + warp * 16 * kLdN + k, kLdN);
#pragma unroll
        for (int f = 0; f < kChunk / 16; ++f) {
          Frag b;
          load_b_kn(b, as + k * kLdC + f * 16, kLdC);
          mma<FT>(acc[2 * f], a, b, 0);
          mma<FT>(acc[2 * f + 1], a, b, 1);
        }
      }
      IoT* my_dx = dx_tile(t) + (warp * 16 + lane / 4) * kLdC + (lane % 4) * 2;  // (row g, column 2c)
#pragma unroll
      for (int j = 0; j < kChunk / 8; ++j)
#pragma unroll
        for (int h = 0; h < 2; ++h) {  // rows g and g + 8
          auto* pair = reinterpret_cast<Pair<IoT>*>(my_dx + h * 8 * kLdC + j * 8);
          Pair<IoT> v = *pair;
          v.v[0] = from_float<IoT>(to_float(v.v[0]) + acc[j].c[2 * h]);
          v.v[1] = from_float<IoT>(to_float(v.v[1]) + acc[j].c[2 * h + 1]);
          *pair = v;
        }
      __syncwarp();
      const IoT* dx_new = dx_tile(t) + warp * 16 * kLdC;
      const int dx_row0 = t * kSubTile + warp * 16;
#pragma unroll
      for (int i = 0; i < kDxVectors; ++i) {
        const int v = i * 32 + lane, r = v / (kChunk / 8), col = (v % (kChunk / 8)) * 8;
        if (dx_row0 + r < group.rows && col < k_valid)
          *reinterpret_cast<Vec8<IoT>*>(dx + static_cast<std::int64_t>(dx_row0 + r) * p.in + col) =
              *reinterpret_cast<const Vec8<IoT>*>(dx_new + r * kLdC + col);
      }
    } else if (p.grad_a) {
      const int wn = warp - kWarps;
#pragma unroll
      for (int m = 0; m < kSubTile; m += 16) {
        Frag b;  // x rows m.., columns [16 wn, +16)
        load_b_kn(b, xs + m * kLdC + wn * 16, kLdC);
#pragma unroll
        for (int f = 0; f < NFrag; ++f) {
          Frag a;  // uᵀ rows [16 f, +16)
          load_a_trans(a, u_tile(t, SplitU ? 1 : 0) + m * kLdN + f * 16, kLdN);
          mma<FT>(da[f][0], a, b, 0);
          mma<FT>(da[f][1], a, b, 1);
        }
      }
    }
  }
  if (!p.grad_a) return;
  cp_async_wait<0>();
  __syncthreads();  // the ring becomes dA's stage [kN][68]
  float* da_stage = reinterpret_cast<float*>(ring);
  if (warp >= kWarps) {
#pragma unroll
    for (int f = 0; f < NFrag; ++f)
#pragma unroll
      for (int j = 0; j < 2; ++j) store_acc(da_stage, kStageLd, f * 16, (warp - kWarps) * 16 + j * 8, da[f][j]);
  }
  __syncthreads();
  update_group_tile<kN, kChunk, kBackwardThreads>(
      p.order, p.groups, group, work.x, p.grad_a + static_cast<std::int64_t>(group.expert) * p.rank * p.in + k0, p.in,
      da_stage, kStageLd, p.rank, k_valid, 1.0f, p.add_grads);
}

}  // namespace moelora::kernels
