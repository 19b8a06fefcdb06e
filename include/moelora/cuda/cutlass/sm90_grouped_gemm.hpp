/// \file
/// \brief Sm90GroupedGemm: the Hopper grouped GEMM of the CUDA bases (CUTLASS 3 pointer-array,
/// TMA, warp-specialised kernels), declared without including CUTLASS.
///
/// Per expert e of a call, with rows `[offsets[e], offsets[e+1])` of the grouped input:
/// forward `out_e = in_e · W_eᵀ` (W_e `[out, in]` row-major is the K-major B operand) or
/// backward_input `out_e = in_e · W_e` (W_e the N-major B operand); bf16 or fp16 operands, fp32
/// accumulation, out rounded once; `out = product` (β = 0, out not read) or `out += product`
/// (β = 1, C = D in place); optionally plus a low-rank product in the same accumulator (a
/// LowRankAddend: `y_e += B_e h_e` forward, `dx_e += A_eᵀ u_e` backward_input). Problem sizes and pointers are built on the device from the device
/// offsets by an argument kernel, so a call never synchronises the host and can be captured in a
/// CUDA graph.
///
/// The definitions are in `sm90_grouped_gemm.cuh`: exactly one translation unit of a program
/// compiles them (nvcc, `-gencode=arch=compute_90a,code=sm_90a --expt-relaxed-constexpr`), and
/// every translation unit that uses the CUDA bases defines `MOELORA_HAVE_CUTLASS` so that they use
/// it (the Meson build does both: the `moelora_cutlass` library). Without it the bases use cuBLAS.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <memory>

#include "moelora/core/dtype.hpp"
#include "moelora/core/gemm_direction.hpp"
#include "moelora/core/low_rank_addend.hpp"
#include "moelora/core/write_mode.hpp"

namespace moelora::sm90 {

/// Whether this program links the sm90 kernels (`MOELORA_HAVE_CUTLASS`).
#if defined(MOELORA_HAVE_CUTLASS)
inline constexpr bool kKernelsLinked = true;
#else
inline constexpr bool kKernelsLinked = false;
#endif

/// The kernel configurations (tile M×N×K, cluster 2×1×1): the two PyTorch's grouped_mm uses on sm90.
enum class GemmTile : std::uint8_t {
  cooperative,  ///< KernelPtrArrayTmaWarpSpecializedCooperative, tile 128×256×64
  pingpong,     ///< KernelPtrArrayTmaWarpSpecializedPingpong, tile 64×128×128
};

/// The tile for a call of `rows` rows over `groups` experts with `n` output columns: pingpong when the
/// mean rows per expert are at most 128 or n ≤ 128 (PyTorch's rule on sm90), else cooperative.
constexpr GemmTile tile_for(std::int64_t rows, std::int64_t groups, std::int64_t n) {
  return rows <= 128 * groups || n <= 128 ? GemmTile::pingpong : GemmTile::cooperative;
}

/// What is fixed for one Sm90GroupedGemm: W_e `[out_features, in_features]` of `dtype`, up to
/// `groups` experts per call.
struct GroupedGemmShape {
  DType dtype = DType::bf16;
  std::int64_t groups = 0;
  std::int64_t out_features = 0, in_features = 0;
};

/// Whether the kernels serve a shape: a 16-bit dtype and `in`, `out` multiples of 8 (rows of 16
/// bytes for TMA). The pointers of each call must also be 16-byte aligned (`aligned_call`).
constexpr bool supports(const GroupedGemmShape& s) {
  return s.dtype != DType::fp32 && s.groups >= 1 && s.in_features % 8 == 0 && s.out_features % 8 == 0 &&
         s.in_features > 0 && s.out_features > 0;
}

/// One call. The experts of the call are `[first_expert, first_expert + experts)` (experts ≤ the
/// shape's groups; the remaining groups are empty).
struct GroupedGemmCall {
  GemmDirection direction = GemmDirection::forward;
  const void* weights = nullptr;           ///< `[experts, out, in]` (device), W of `first_expert` first
  const std::int64_t* offsets = nullptr;   ///< `[E+1]` row offsets of the whole input (device)
  std::int64_t first_expert = 0;
  std::int64_t experts = 0;
  const void* in = nullptr;                ///< all rows: `[T, in]` (forward) or `[T, out]` (device)
  void* out = nullptr;                     ///< all rows: `[T, out]` (forward) or `[T, in]` (device)
  WriteMode mode = WriteMode::overwrite;   ///< accumulate: β = 1
  LowRankAddend addend;                    ///< added in the K loop (rank 0: none); the shape's dtype
};

/// Whether a call's pointers suit the kernels: 16-byte aligned weights, in and out, and an addend
/// of a rank that is a multiple of 8 (rows of 16 bytes) with 16-byte aligned rows and factors.
inline bool aligned_call(const GroupedGemmCall& c) {
  const auto aligned = [](const void* p) { return reinterpret_cast<std::uintptr_t>(p) % 16 == 0; };
  const LowRankAddend& a = c.addend;
  return aligned(c.weights) && aligned(c.in) && aligned(c.out) &&
         (a.empty() || (a.rank > 0 && a.rank % 8 == 0 && aligned(a.rows) && aligned(a.factors)));
}

/// The sm90 grouped GEMM of one shape, both directions, both tiles, β = 0 and 1. Construction
/// allocates the per-group device arrays (problem sizes, pointers, strides) and the kernels' workspace
/// (per-SM TMA descriptors) and initialises the kernel parameters, which hold only array
/// addresses; `run` then launches the argument kernel and the GEMM on the caller's stream, without
/// host synchronisation or allocation. One object must not run on two streams at once.
class Sm90GroupedGemm {
 public:
  /// Throws ErrorCode::unsupported unless `supports(shape)`; uses the current device.
  explicit Sm90GroupedGemm(const GroupedGemmShape& shape);
  ~Sm90GroupedGemm();
  Sm90GroupedGemm(Sm90GroupedGemm&&) noexcept;
  Sm90GroupedGemm& operator=(Sm90GroupedGemm&&) noexcept;

  [[nodiscard]] const GroupedGemmShape& shape() const;

  /// Queues the call on `stream` with kernel configuration `tile`. `call` must be `aligned_call`.
  void run(const GroupedGemmCall& call, GemmTile tile, cudaStream_t stream);

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace moelora::sm90
