/// \file
/// \brief The concepts a user's types must satisfy to plug into moelora: Backend, GroupedLinearBase and
/// its refinements AccumulatingGroupedLinearBase and LowRankFusingGroupedLinearBase.
#pragma once

#include <concepts>
#include <cstddef>
#include <cstdint>

#include "moelora/core/dtype.hpp"
#include "moelora/core/lora_args.hpp"
#include "moelora/core/low_rank_addend.hpp"
#include "moelora/core/segments.hpp"
#include "moelora/core/tensor.hpp"
#include "moelora/core/write_mode.hpp"
#include "moelora/optim/multi_tensor.hpp"

namespace moelora {

/// Where the layer's memory lives and who runs its math: `HostBackend` or `CudaBackend`.
template <class B>
concept Backend = requires(void* p, const void* cp, std::size_t n, typename B::stream_type stream,
                           typename B::Workspace& workspace, const ExpertCounts& counts,
                           const LoraForwardArgs& fwd, const LoraBackwardArgs& bwd, const KaimingInitArgs& init,
                           const OptimBatch& optim) {
  typename B::stream_type;
  { B::memory } -> std::convertible_to<Memory>;
  { B::allocate(n) } -> std::same_as<void*>;
  B::deallocate(p);
  B::copy(p, cp, n, stream);
  B::copy_2d(p, n, cp, n, n, n, stream);
  B::copy_to_host(p, cp, n, stream);
  B::copy_from_host(p, cp, n, stream);
  B::fill_zero(p, n, stream);
  B::synchronize(stream);
  { workspace.prepare_segments(counts, std::int64_t{}, stream) } -> std::same_as<const ExpertSegments&>;
  B::lora_forward(fwd, workspace, stream);
  B::lora_backward(bwd, workspace, stream);
  B::kaiming_init(init, stream);
  B::optim_grad_stats(optim, stream);
  B::optim_finish_stats(optim, stream);
  B::optim_update(optim, stream);
  workspace.reserve(std::int64_t{}, std::int64_t{}, std::int64_t{});
};

/// A frozen grouped linear layer: per-expert weights W `[E, out, in]` applied to rows grouped by
/// expert. This is what GroupedLoRA wraps; write your own (a fused or quantized GEMM) to this shape.
///
/// - `forward(x, segments, y, stream)`: `y_t = W_e x_t`, overwriting y `[T, out]`.
/// - `backward_input(dy, segments, dx, stream)`: `dx_t = W_eᵀ dy_t`, overwriting dx `[T, in]`.
///   No weight gradient: the base is frozen.
/// x, y, dy and dx have dtype `dtype()` and live in `backend_type`'s memory.
template <class L>
concept GroupedLinearBase =
    Backend<typename L::backend_type> &&
    requires(L& base, const L& cbase, ConstTensorRef in, TensorRef out, const ExpertSegments& segments,
             typename L::backend_type::stream_type stream) {
      { cbase.num_experts() } -> std::convertible_to<std::int64_t>;
      { cbase.in_features() } -> std::convertible_to<std::int64_t>;
      { cbase.out_features() } -> std::convertible_to<std::int64_t>;
      { cbase.dtype() } -> std::same_as<DType>;
      base.forward(in, segments, out, stream);
      base.backward_input(in, segments, out, stream);
    };

/// A GroupedLinearBase that can also add its products into its output:
/// `forward(x, segments, y, stream, mode)` and `backward_input(dy, segments, dx, stream, mode)` with
/// `WriteMode::accumulate` compute `y_t += W_e x_t` and `dx_t += W_eᵀ dy_t` (a GEMM with β = 1).
/// GroupedLoRA then runs the LoRA branch first, writing y and dx without reading them, and lets the
/// base add its products: the memory-bound LoRA kernels skip a read of y and of dx, which the
/// compute-bound base GEMM's epilogue absorbs. A base whose adding costs more than that read
/// says so with a member `bool accumulate_is_cheap() const` returning false: the layer then lets it
/// write y and dx first and the adapters add into them.
template <class L>
concept AccumulatingGroupedLinearBase =
    GroupedLinearBase<L> && requires(L& base, ConstTensorRef in, TensorRef out, const ExpertSegments& segments,
                                     typename L::backend_type::stream_type stream, WriteMode mode) {
      base.forward(in, segments, out, stream, mode);
      base.backward_input(in, segments, out, stream, mode);
    };

/// A base whose GEMMs can add a low-rank product in their own accumulator (a LowRankAddend: the
/// LoRA expand `B_e h` in forward, `A_eᵀ u` in backward_input) where `fuses_low_rank(rank, dtype)`
/// says so. GroupedLoRA then writes y and dx in the base's one pass: no separate expand over y and
/// no read of y or dx to add into them.
template <class L>
concept LowRankFusingGroupedLinearBase =
    AccumulatingGroupedLinearBase<L> &&
    requires(L& base, const L& cbase, ConstTensorRef in, TensorRef out, const ExpertSegments& segments,
             typename L::backend_type::stream_type stream, WriteMode mode, const LowRankAddend& addend,
             std::int64_t rank, DType dtype) {
      base.forward(in, segments, out, stream, mode, addend);
      base.backward_input(in, segments, out, stream, mode, addend);
      { cbase.fuses_low_rank(rank, dtype) } -> std::convertible_to<bool>;
    };

}  // namespace moelora
