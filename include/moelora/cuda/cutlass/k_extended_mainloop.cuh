/// \file
/// \brief KExtendedMainloop: CUTLASS 3's sm90 pointer-array mainloop (TMA, warp-specialised GMMA)
/// with each group's K loop extended by a second operand pair, so that one grouped GEMM computes
/// `D_e = A_e B_eᵀ + A2_e B2_eᵀ` (+ β C) in one accumulator: the base GEMM with a low-rank product
/// riding on it (`[x | h] · [W | B]ᵀ`: the LoRA expand folded into the base).
///
/// Per group: A `[M, K]`, B `[N, K]` (the base; K is the GEMM's `k_first`, the same for every
/// group), A2 `[M, K2]`, B2 `[N, K2]` in the layouts of A and B (K2 ≥ 0, the low rank; 0: a plain
/// GEMM). The problem shape of a group carries `K = ceil(k_first / TileK) · TileK + K2`, so the
/// kernel runs `ceil(k_first / TileK) + ceil(K2 / TileK)` K tiles: the first from A and B, the rest
/// from A2 and B2. TMA fills the columns past `k_first` and past K2 of a tile with zeros, so the
/// padding adds nothing. A2 and B2 load through descriptors made from A's and B's (same element,
/// box and swizzle; address, sizes and strides replaced per group like theirs), two more per SM in
/// the workspace and in shared memory. The consumer runs CUTLASS's GMMA pipeline, except that the
/// last K tile of an extended group issues only the MMA k-blocks that hold A2/B2 columns: a rank-16
/// addend costs one k-block of MMAs, not a whole K tile.
#pragma once

#if !defined(__CUDACC__)
#error "moelora/cuda/cutlass/k_extended_mainloop.cuh holds device code: compile it with nvcc"
#endif

// Included from sm90_grouped_gemm.cuh after CUTLASS (with NDEBUG, warnings silenced).

namespace moelora::sm90 {

/// Shared memory KExtendedMainloop adds to the builder's mainloop (its stage count carve-out): the
/// A2 and B2 descriptors.
inline constexpr int kKExtensionSmemBytes = 2 * static_cast<int>(sizeof(cute::TmaDescriptor));

/// `Mainloop`: the CollectiveMma the CUTLASS builder made for a pointer-array grouped GEMM
/// (MainloopSm90ArrayTmaGmmaWarpSpecialized). Kernels see this type in its place.
template <class Mainloop>
struct KExtendedMainloop : Mainloop {
  using typename Mainloop::ElementA;
  using typename Mainloop::ElementB;
  using typename Mainloop::InternalElementA;
  using typename Mainloop::InternalElementB;
  using typename Mainloop::InternalStrideA;
  using typename Mainloop::InternalStrideB;
  using typename Mainloop::MainloopPipeline;
  using typename Mainloop::PipelineState;
  using typename Mainloop::StrideA;
  using typename Mainloop::StrideB;
  using typename Mainloop::TensorStorage;
  using typename Mainloop::TileShape;
  static_assert(Mainloop::IsGroupedGemmKernel, "KExtendedMainloop extends the grouped (per-group shape) mainloop");

  /// Tiles of `k` columns.
  CUTLASS_HOST_DEVICE static int k_tiles(int k) {
    constexpr int kTileK = cute::size<2>(TileShape{});
    return (k + kTileK - 1) / kTileK;
  }

  struct Arguments : Mainloop::Arguments {
    ElementA const** ptr_A2;  ///< per group: A2 `[M, K2]`
    StrideA dA2;
    ElementB const** ptr_B2;  ///< per group: B2 `[N, K2]`
    StrideB dB2;
    int k_first;              ///< K of A and B (every group)
    int const* k_second;      ///< K2 of the groups that have one (the call's rank), in device memory
  };

  struct Params : Mainloop::Params {
    InternalElementA const** ptr_A2;
    StrideA dA2;
    InternalElementB const** ptr_B2;
    StrideB dB2;
    int k_first;
    int const* k_second;
  };

  /// A, B, A2, B2 descriptors in shared memory (the producer warp edits them per group).
  struct TensorMapStorage : cute::aligned_struct<128, cute::_0> {
    cute::TmaDescriptor smem_tensormap_A;
    cute::TmaDescriptor smem_tensormap_B;
    cute::TmaDescriptor smem_tensormap_A2;
    cute::TmaDescriptor smem_tensormap_B2;
  };

  template <class ProblemShape>
  static Params to_underlying_arguments(ProblemShape problem_shapes, Arguments const& args, void* workspace) {
    return {Mainloop::to_underlying_arguments(problem_shapes, args, workspace),
            reinterpret_cast<InternalElementA const**>(args.ptr_A2), args.dA2,
            reinterpret_cast<InternalElementB const**>(args.ptr_B2), args.dB2, args.k_first, args.k_second};
  }

  /// Four descriptors per SM: A, B, A2, B2 copies.
  template <class ProblemShape>
  static size_t get_workspace_size(ProblemShape const&, Arguments const&, int sm_count) {
    return 4 * sizeof(cute::TmaDescriptor) * static_cast<size_t>(sm_count);
  }

  /// (gA_mkl, gB_nkl) over the extended K (the kernel counts K tiles from gA_mkl), then the tiled
  /// A2 `(BLK_M, BLK_K, m, k2, l)` and B2 `(BLK_N, BLK_K, n, k2, l)`.
  template <class ProblemShape_MNKL>
  CUTLASS_DEVICE auto load_init(ProblemShape_MNKL const& problem_shape_MNKL, Params const& params) const {
    using X = cute::Underscore;
    const auto [M, N, K, L] = problem_shape_MNKL;
    const int k2 = K - k_tiles(params.k_first) * cute::size<2>(TileShape{});
    auto base = Mainloop::load_init(problem_shape_MNKL, params);
    cute::Tensor mA2 = params.tma_load_a.get_tma_tensor(cute::make_shape(M, k2, 1));  // (m, k2, l)
    cute::Tensor mB2 = params.tma_load_b.get_tma_tensor(cute::make_shape(N, k2, 1));  // (n, k2, l)
    cute::Tensor gA2 = cute::local_tile(mA2, TileShape{}, cute::make_coord(cute::_, cute::_, cute::_),
                                        cute::Step<cute::_1, X, cute::_1>{});
    cute::Tensor gB2 = cute::local_tile(mB2, TileShape{}, cute::make_coord(cute::_, cute::_, cute::_),
                                        cute::Step<X, cute::_1, cute::_1>{});
    return cute::make_tuple(cute::get<0>(base), cute::get<1>(base), gA2, gB2);
  }

  /// Producer: K tiles `[0, ceil(k_first / TileK))` from A and B, the rest from A2 and B2.
  template <class LoadInputs, class TensorMaps, class KTileIterator, class BlockCoord>
  CUTLASS_DEVICE void load(Params const& params, MainloopPipeline pipeline, PipelineState smem_pipe_write,
                           LoadInputs const& load_inputs, TensorMaps const& tensormaps, BlockCoord const& blk_coord,
                           KTileIterator /*k_tile_iter: the group scheduler starts every tile at k = 0*/,
                           int k_tile_count, int /*thread_idx*/, uint32_t block_rank_in_cluster,
                           TensorStorage& shared_tensors) {
    using namespace cute;
    if (!elect_one_sync()) return;
    Tensor sA = make_tensor(make_smem_ptr(shared_tensors.smem_A.data()), typename Mainloop::SmemLayoutA{});
    Tensor sB = make_tensor(make_smem_ptr(shared_tensors.smem_B.data()), typename Mainloop::SmemLayoutB{});
    using ClusterShape = typename Mainloop::DispatchPolicy::ClusterShape;
    constexpr uint32_t cluster_x = get<0>(ClusterShape{});
    const uint2 block_id = {block_rank_in_cluster % cluster_x, block_rank_in_cluster / cluster_x};
    auto tma_a = params.tma_load_a.get_slice(block_id.y);
    auto tma_b = params.tma_load_b.get_slice(block_id.x);
    const auto [m, n, k, l] = blk_coord;
    // (TMA, TMA_M|N, TMA_K, k) sources and (TMA, TMA_M|N, TMA_K, PIPE) destinations
    Tensor tAgA = tma_a.partition_S(get<0>(load_inputs)(_, _, m, _, l));
    Tensor tBgB = tma_b.partition_S(get<1>(load_inputs)(_, _, n, _, l));
    Tensor tAgA2 = tma_a.partition_S(get<2>(load_inputs)(_, _, m, _, l));
    Tensor tBgB2 = tma_b.partition_S(get<3>(load_inputs)(_, _, n, _, l));
    Tensor tAsA = tma_a.partition_D(sA);
    Tensor tBsB = tma_b.partition_D(sB);

    // Multicast: A to the blocks of this block's cluster row, B to those of its cluster column.
    uint16_t mcast_a = 0, mcast_b = 0;
    auto block_layout = Layout<ClusterShape>{};  // (m, n) -> block id
    if constexpr (is_same_v<typename Mainloop::GmemTiledCopyA, SM90_TMA_LOAD_MULTICAST>)
      for (int i = 0; i < size<1>(block_layout); ++i) mcast_a |= uint16_t(1) << block_layout(block_id.x, i, Int<0>{});
    if constexpr (is_same_v<typename Mainloop::GmemTiledCopyB, SM90_TMA_LOAD_MULTICAST>)
      for (int i = 0; i < size<0>(block_layout); ++i) mcast_b |= uint16_t(1) << block_layout(i, block_id.y, Int<0>{});

    const int first_tiles = k_tiles(params.k_first);
    CUTLASS_PRAGMA_NO_UNROLL
    for (int tile = 0; tile < k_tile_count; ++tile) {
      pipeline.producer_acquire(smem_pipe_write);
      auto* barrier = pipeline.producer_get_barrier(smem_pipe_write);
      const int stage = smem_pipe_write.index();
      if (tile < first_tiles) {
        copy(params.tma_load_a.with(get<0>(tensormaps), *barrier, mcast_a), tAgA(_, _, _, tile), tAsA(_, _, _, stage));
        copy(params.tma_load_b.with(get<1>(tensormaps), *barrier, mcast_b), tBgB(_, _, _, tile), tBsB(_, _, _, stage));
      } else {
        const int tile2 = tile - first_tiles;
        copy(params.tma_load_a.with(get<2>(tensormaps), *barrier, mcast_a), tAgA2(_, _, _, tile2), tAsA(_, _, _, stage));
        copy(params.tma_load_b.with(get<3>(tensormaps), *barrier, mcast_b), tBgB2(_, _, _, tile2), tBsB(_, _, _, stage));
      }
      ++smem_pipe_write;
    }
  }

  /// Consumer: CUTLASS's GMMA pipeline (a batch of MMAs per K tile, `K_PIPE_MMAS` batches in
  /// flight, a stage released once the batch after it is issued), except that the last tile of an
  /// extended group issues only the k-blocks that hold A2/B2 columns (the rest are TMA's zeros).
  template <class FrgTensorC>
  CUTLASS_DEVICE void mma(MainloopPipeline pipeline, PipelineState smem_pipe_read, FrgTensorC& accum, int k_tile_count,
                          int thread_idx, TensorStorage& shared_tensors, Params const& params) {
    using namespace cute;
    using TiledMma = typename Mainloop::TiledMma;
    constexpr int kPipeMmas = Mainloop::K_PIPE_MMAS;
    Tensor sA = make_tensor(make_smem_ptr(shared_tensors.smem_A.data()), typename Mainloop::SmemLayoutA{});  // (BLK_M, BLK_K, PIPE)
    Tensor sB = make_tensor(make_smem_ptr(shared_tensors.smem_B.data()), typename Mainloop::SmemLayoutB{});  // (BLK_N, BLK_K, PIPE)
    TiledMma tiled_mma;
    const int warp_group = __shfl_sync(0xffffffffu, thread_idx / cutlass::NumThreadsPerWarpGroup, 0);
    auto thread_mma = tiled_mma.get_slice(warp_group * cutlass::NumThreadsPerWarpGroup);
    Tensor tCrA = thread_mma.make_fragment_A(thread_mma.partition_A(sA));  // (MMA, MMA_M, MMA_K, PIPE) descriptors
    Tensor tCrB = thread_mma.make_fragment_B(thread_mma.partition_B(sB));  // (MMA, MMA_N, MMA_K, PIPE) descriptors
    constexpr int kBlocks = decltype(size<2>(tCrA))::value;              // MMA k-blocks of a K tile
    constexpr int kTileK = size<2>(TileShape{});

    int last_blocks = kBlocks;  // k-blocks of the last tile that hold data
    if (k_tile_count > k_tiles(params.k_first)) {
      const int tail = *params.k_second % kTileK;  // A2/B2 columns in the last tile (0: all)
      if (tail) last_blocks = (tail + kTileK / kBlocks - 1) / (kTileK / kBlocks);
    }
    // One batch: the MMAs of the first `blocks` k-blocks of `stage` (the very first zeroes the
    // accumulators), straight-line between its arrive and its commit.
    const auto issue = [&](auto blocks, int stage) {
      warpgroup_arrive();
      CUTLASS_PRAGMA_UNROLL
      for (int k_block = 0; k_block < decltype(blocks)::value; ++k_block) {
        cute::gemm(tiled_mma, tCrA(_, _, k_block, stage), tCrB(_, _, k_block, stage), accum);  // (V,M,K) x (V,N,K) => (V,M,N)
        tiled_mma.accumulate_ = GMMA::ScaleOut::One;
      }
      warpgroup_commit_batch();
    };
    PipelineState smem_pipe_release = smem_pipe_read;
    tiled_mma.accumulate_ = GMMA::ScaleOut::Zero;
    warpgroup_fence_operand(accum);
    CUTLASS_PRAGMA_NO_UNROLL
    for (int tile = 0; tile < k_tile_count; ++tile) {
      pipeline.consumer_wait(smem_pipe_read, pipeline.consumer_try_wait(smem_pipe_read));
      const int stage = smem_pipe_read.index();
      warpgroup_fence_operand(accum);
      if (tile + 1 < k_tile_count || last_blocks == kBlocks) issue(Int<kBlocks>{}, stage);
      else with_blocks<kBlocks - 1>(last_blocks, [&](auto blocks) { issue(blocks, stage); });
      warpgroup_wait<kPipeMmas>();  // the stage kPipeMmas tiles back is consumed
      warpgroup_fence_operand(accum);
      if (tile >= kPipeMmas) {
        pipeline.consumer_release(smem_pipe_release);
        ++smem_pipe_release;
      }
      ++smem_pipe_read;
    }
    warpgroup_fence_operand(accum);  // mma_tail releases the last min(kPipeMmas, k_tile_count) stages
  }

  /// Calls `f(Int<blocks>{})` for a runtime `blocks` in [1, N].
  template <int N, class F>
  CUTLASS_DEVICE static void with_blocks(int blocks, F&& f) {
    if constexpr (N > 1) {
      if (blocks < N) return with_blocks<N - 1>(blocks, f);
    }
    f(cute::Int<N>{});
  }

  /// Copies the parameters' A and B descriptors into shared memory (A2 and B2 start as copies of
  /// them); returns the SM's four global descriptors.
  CUTLASS_DEVICE auto tensormaps_init(Params const& params, TensorMapStorage& smem, int32_t sm_count, int32_t sm_idx) {
    auto* gmem = reinterpret_cast<cute::TmaDescriptor*>(params.tensormaps);
    if (cute::elect_one_sync()) {
      const auto copy_descriptor = [](cute::TmaDescriptor const* from, cute::TmaDescriptor& to) {
        cute::Tensor src = cute::make_tensor(from, cute::Int<1>{}, cute::Int<1>{});
        cute::Tensor dst = cute::make_tensor(cute::make_smem_ptr(&to), cute::Int<1>{}, cute::Int<1>{});
        cute::copy(cute::recast<cute::uint128_t>(src), cute::recast<cute::uint128_t>(dst));
      };
      copy_descriptor(params.tma_load_a.get_tma_descriptor(), smem.smem_tensormap_A);
      copy_descriptor(params.tma_load_b.get_tma_descriptor(), smem.smem_tensormap_B);
      copy_descriptor(params.tma_load_a.get_tma_descriptor(), smem.smem_tensormap_A2);
      copy_descriptor(params.tma_load_b.get_tma_descriptor(), smem.smem_tensormap_B2);
    }
    __syncwarp();
    return cute::make_tuple(&gmem[sm_idx], &gmem[sm_idx + sm_count], &gmem[sm_idx + 2 * sm_count],
                            &gmem[sm_idx + 3 * sm_count]);
  }

  /// Points the shared descriptors at group `next_group`: addresses, sizes (A, B: k_first; A2,
  /// B2: the group's K2, left alone when it is 0) and strides.
  template <class TensorMaps, class ProblemShape_MNKL>
  CUTLASS_DEVICE void tensormaps_perform_update(TensorMapStorage& smem, Params const& params, TensorMaps const&,
                                                ProblemShape_MNKL problem_shape_mnkl, int32_t next_group) {
    if (!cute::elect_one_sync()) return;
    const auto M = static_cast<uint32_t>(cute::get<0>(problem_shape_mnkl));
    const auto N = static_cast<uint32_t>(cute::get<1>(problem_shape_mnkl));
    const int k2 = static_cast<int>(cute::get<2>(problem_shape_mnkl)) -
                   k_tiles(params.k_first) * cute::size<2>(TileShape{});
    const auto k1 = static_cast<uint32_t>(params.k_first);
    cute::tma_descriptor_replace_addr_in_shared_mem(smem.smem_tensormap_A, params.ptr_A[next_group]);
    cute::tma_descriptor_replace_addr_in_shared_mem(smem.smem_tensormap_B, params.ptr_B[next_group]);
    replace_sizes<InternalElementA>(smem.smem_tensormap_A, params.tma_load_a, M, k1, params.dA[next_group]);
    replace_sizes<InternalElementB>(smem.smem_tensormap_B, params.tma_load_b, N, k1, params.dB[next_group]);
    if (k2 <= 0) return;
    cute::tma_descriptor_replace_addr_in_shared_mem(smem.smem_tensormap_A2, params.ptr_A2[next_group]);
    cute::tma_descriptor_replace_addr_in_shared_mem(smem.smem_tensormap_B2, params.ptr_B2[next_group]);
    replace_sizes<InternalElementA>(smem.smem_tensormap_A2, params.tma_load_a, M, static_cast<uint32_t>(k2),
                                    params.dA2[next_group]);
    replace_sizes<InternalElementB>(smem.smem_tensormap_B2, params.tma_load_b, N, static_cast<uint32_t>(k2),
                                    params.dB2[next_group]);
  }

  /// Publishes the edited shared descriptors to the SM's global ones (the whole warp).
  template <class TensorMaps>
  CUTLASS_DEVICE void tensormaps_cp_fence_release(TensorMapStorage& smem, TensorMaps const& tensormaps) {
    if (cute::elect_one_sync()) {
      cute::tma_desc_commit_group();
      cute::tma_desc_wait_group();
    }
    __syncwarp();  // the elected lane's edits (tensormaps_perform_update) before every lane reads them
    cute::tma_descriptor_cp_fence_release(cute::get<0>(tensormaps), smem.smem_tensormap_A);
    cute::tma_descriptor_cp_fence_release(cute::get<1>(tensormaps), smem.smem_tensormap_B);
    cute::tma_descriptor_cp_fence_release(cute::get<2>(tensormaps), smem.smem_tensormap_A2);
    cute::tma_descriptor_cp_fence_release(cute::get<3>(tensormaps), smem.smem_tensormap_B2);
    __syncwarp();  // every lane's reads before the elected lane's edits for the next group
  }

  /// Makes the published descriptors visible to this warp's TMA loads (the whole warp).
  template <class TensorMaps>
  CUTLASS_DEVICE void tensormaps_fence_acquire(TensorMaps const& tensormaps) {
    cute::tma_descriptor_fence_acquire(cute::get<0>(tensormaps));
    cute::tma_descriptor_fence_acquire(cute::get<1>(tensormaps));
    cute::tma_descriptor_fence_acquire(cute::get<2>(tensormaps));
    cute::tma_descriptor_fence_acquire(cute::get<3>(tensormaps));
  }

 private:
  /// Sets the sizes `(rows, k)` and strides of a shared descriptor made by `tma`, for an operand
  /// `[rows, k]` with the per-group stride `stride` (elements).
  template <class Element, class Tma, class Stride>
  CUTLASS_DEVICE static void replace_sizes(cute::TmaDescriptor& descriptor, Tma const& tma, uint32_t rows, uint32_t k,
                                           Stride const& stride) {
    cute::array<uint32_t, 5> shape = {1, 1, 1, 1, 1};
    cute::array<uint64_t, 5> strides = {0, 0, 0, 0, 0};
    cute::Tensor tensor = cute::make_tensor(static_cast<Element const*>(nullptr),
                                            cute::make_shape(rows, k, cute::Int<1>{}), stride);
    cute::detail::fill_tma_gmem_shape_stride(tma, tensor, shape, strides);
    for (uint64_t& s : strides) s = s * cute::sizeof_bits_v<Element> / 8;  // bytes
    cute::tma_descriptor_replace_dims_strides_in_shared_mem(descriptor, shape, strides);
  }
};

}  // namespace moelora::sm90
