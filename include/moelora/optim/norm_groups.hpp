/// \file
/// \brief NormGroups: the communicators over which an optimizer step sums its gradient statistics
/// when the adapters are sharded over tensor- and expert-parallel ranks.
#pragma once

namespace moelora {

/// Where the global gradient norm of a step spans several ranks (either communicator may be null):
/// - `tp`, the expert-TP group: each rank's Σg² over its TP-sharded factors (policy
///   `factor_tp_axis` ≠ none) is summed over the group; the replicated factors' gradients, identical
///   on every TP rank, are counted once;
/// - `ep`, the expert-parallel group: everything is summed over the group (each rank holds other
///   experts).
/// The sums travel as fp32 (one all_reduce of one value over `tp`, one of two values over `ep`); a
/// NaN or Inf on any rank makes them NaN, so every rank skips the same steps.
template <class Comm>
struct NormGroups {
  Comm* tp = nullptr;
  Comm* ep = nullptr;
};

}  // namespace moelora
