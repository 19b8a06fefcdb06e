/// \file
/// \brief amax_sync(comm): a quantizer's tensor amax shared by the ranks of a communicator, so that a
/// tensor-parallel (or expert-parallel) base quantizes its slice exactly as the whole weight would be.
#pragma once

#include <cstddef>

#include "moelora/parallel/communicator.hpp"
#include "moelora/quant/quantizer.hpp"

namespace moelora::parallel {

/// A quant::AmaxSync that max-reduces the amax over `comm` (caller-owned; it must outlive every
/// quantizer that uses the result). Give it to a FormatQuantizer with `set_amax_sync` before the
/// base quantizes: `comm` is the TP group for an amax per expert, the TP × EP group for an amax
/// shared by all experts (the default scope). Every rank of `comm` then quantizes in lockstep.
template <Communicator C>
quant::AmaxSync<typename C::backend_type> amax_sync(C& comm) {
  return {[](void* context, float* amax, std::size_t count, typename C::backend_type::stream_type stream) {
            static_cast<C*>(context)->all_reduce(amax, amax, count, CommElement::fp32, ReduceOp::max, stream);
          },
          &comm};
}

}  // namespace moelora::parallel
