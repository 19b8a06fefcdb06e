/// \file
/// \brief The SVD-based initialisers on a tensor-parallel layer: `GatheredBase` (the whole
/// per-expert weights of a TP group, seen through one rank's base) and `sharded_svd_init`.
///
/// Every rank of the group gathers the whole weights `[E_local, out, in]` (one all-gather), runs
/// the initialiser on them exactly as a single-device layer would (so the SVD is of the whole
/// residual), and keeps its slice of the factors; the factors are broadcast from TP rank 0 first,
/// so the replicated factor is bitwise identical on every rank and the sharded one is the exact
/// slice. loftq, svd_first and pissa then set each rank's slice of the new base weights. A shared
/// amax stays the TP = 1 one when the quantizer's amax is synchronised over the group
/// (quant::AmaxSync, parallel::amax_sync); docs/parallel.md.
///
/// Memory: the gathered weights and fp32 working set of the initialiser are those of the whole
/// layer's E_local experts (as at TP = 1), for the duration of the call.
#pragma once

#include <cstddef>
#include <cstdint>
#include <tuple>

#include "moelora/core/buffer.hpp"
#include "moelora/core/config.hpp"
#include "moelora/core/tensor.hpp"
#include "moelora/core/warnings.hpp"
#include "moelora/init/svd_init.hpp"
#include "moelora/parallel/communicator_ref.hpp"
#include "moelora/parallel/placement.hpp"

namespace moelora::parallel {

/// The whole weights `[E, out, in]` of a tensor-parallel group as an init::SvdInitSource, through
/// the local base of one rank. Every call is collective: all ranks of the group make the same
/// calls in the same order. The local base must outlive it.
template <init::SvdInitSource Base>
class GatheredBase {
 public:
  using backend_type = typename Base::backend_type;
  using stream_type = typename backend_type::stream_type;

  /// Gathers the base's source weights of every rank of `tp` (placed by `shard`) on `stream`.
  GatheredBase(Base& base, CommunicatorRef<backend_type> tp, const Shard& shard, stream_type stream)
      : base_(base), tp_(tp), shard_(shard), source_(weight_geometry(shard_, dtype_size(base.dtype())).global_bytes()) {
    const ConstTensorRef local = base_.source_weight();
    gather(local.data, source_.data(), local.dtype, stream);
  }

  [[nodiscard]] std::int64_t num_experts() const { return shard_.experts; }
  [[nodiscard]] std::int64_t in_features() const { return shard_.global_in(); }
  [[nodiscard]] std::int64_t out_features() const { return shard_.global_out(); }
  [[nodiscard]] DType dtype() const { return base_.dtype(); }
  [[nodiscard]] decltype(auto) linalg() { return base_.linalg(); }
  [[nodiscard]] bool has_quantizer() const { return base_.has_quantizer(); }
  [[nodiscard]] ConstTensorRef source_weight() const { return {source_.data(), dtype(), shape()}; }

  /// out = Q(w) of whole weights, by the local base's quantizer.
  void fake_quantize(ConstTensorRef w, TensorRef out, stream_type stream) { base_.fake_quantize(w, out, stream); }

  /// Each rank's base computes from now on with its slice of TP rank 0's `w` `[E, out, in]`.
  void set_effective_weight(ConstTensorRef w, stream_type stream) {
    const std::size_t es = dtype_size(w.dtype);
    const SliceGeometry g = weight_geometry(shard_, es);
    Buffer<backend_type> whole(g.global_bytes()), local(g.local_bytes());
    backend_type::copy(whole.data(), w.data, whole.bytes(), stream);
    tp_.broadcast(whole.data(), whole.data(), whole.bytes() / es, comm_element(w.dtype), 0, stream);
    copy_slice<backend_type>(g, shard_.tp_rank, SliceCopy::from_global, whole.data(), local.data(), stream);
    base_.set_effective_weight({local.data(), w.dtype, {shard_.experts, shard_.out, shard_.in}}, stream);
  }

  /// What the group computes with, the whole `[E, out, in]`, into out (out's dtype).
  void dequantized_weight(TensorRef out, stream_type stream) {
    Buffer<backend_type> local(weight_geometry(shard_, dtype_size(out.dtype)).local_bytes());
    base_.dequantized_weight({local.data(), out.dtype, {shard_.experts, shard_.out, shard_.in}}, stream);
    gather(local.data(), out.data, out.dtype, stream);
  }

 private:
  [[nodiscard]] Shape shape() const { return {shard_.experts, shard_.global_out(), shard_.global_in()}; }

  /// whole `[E, out, in]` ← every rank's local slice (dtype `dtype`).
  void gather(const void* local, void* whole, DType dtype, stream_type stream) {
    const SliceGeometry g = weight_geometry(shard_, dtype_size(dtype));
    const Buffer<backend_type> all(g.local_bytes() * static_cast<std::size_t>(shard_.tp_size));
    tp_.all_gather(local, all.data(), g.local_bytes() / g.element, comm_element(dtype), stream);
    for (int t = 0; t < shard_.tp_size; ++t)
      copy_slice<backend_type>(g, t, SliceCopy::to_global, static_cast<const std::byte*>(all.data()) + t * g.local_bytes(),
                               whole, stream);
  }

  Base& base_;
  CommunicatorRef<backend_type> tp_;
  Shard shard_;
  Buffer<backend_type> source_;
};

/// init::svd_init of one adapter of a tensor-parallel layer (placed by `shard`, group `tp`): the
/// initialiser runs on the whole weights (GatheredBase) into whole factors, which are broadcast
/// from TP rank 0 and cut into `args.a` `[E, r, in_local]` and `args.b` `[E, out_local, r]`.
/// Collective; returns the per-expert errors of the whole weights (the same on every rank).
template <init::SvdInitSource Base>
init::InitReport sharded_svd_init(Base& base, const CommunicatorRef<typename Base::backend_type>& tp, const Shard& shard,
                                  const init::SvdInitArgs& args, const WarningSink& warn,
                                  typename Base::backend_type::stream_type stream) {
  using Backend = typename Base::backend_type;
  GatheredBase<Base> whole(base, tp, shard, stream);
  const std::size_t es = dtype_size(args.dtype);
  const SliceGeometry ga = factor_geometry(shard, policy::Factor::a, args.rank, es);
  const SliceGeometry gb = factor_geometry(shard, policy::Factor::b, args.rank, es);
  Buffer<Backend> a(ga.global_bytes()), b(gb.global_bytes());
  init::SvdInitArgs whole_args = args;
  whole_args.a = a.data(), whole_args.b = b.data();
  init::InitReport report = init::svd_init(whole, whole_args, warn, stream);
  for (const auto& [g, buffer, local] : {std::tuple{ga, a.data(), args.a}, std::tuple{gb, b.data(), args.b}}) {
    tp.broadcast(buffer, buffer, g.global_bytes() / es, comm_element(args.dtype), 0, stream);
    copy_slice<Backend>(g, shard.tp_rank, SliceCopy::from_global, buffer, local, stream);
  }
  return report;
}

}  // namespace moelora::parallel
