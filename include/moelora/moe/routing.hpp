/// \file
/// \brief Top-k routing of an MoE block: the routing layout (chosen experts and their weights per
/// token), its validation, and TopKRouter<Backend>, the softmax top-k over router logits with
/// renormalised weights (host implementation here; the CUDA one in `cuda/moe.hpp`).
///
/// Math (Qwen3-MoE / Mixtral with `norm_topk_prob`): for token t with logits l `[E]`, the k experts
/// with the largest logits are chosen, by descending logit (ties: the lower expert index first), and
/// weighted by the softmax over all E renormalised over the k chosen, which equals the softmax over
/// the k chosen logits: `w_j = exp(l_{e_j} − l_{e_0}) / Σ_{i<k} exp(l_{e_i} − l_{e_0})`. Selecting by
/// the logits themselves (softmax is monotonic) makes the choice exact and the same on every
/// backend; the weights are computed in fp32.
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "moelora/core/error.hpp"
#include "moelora/core/tensor.hpp"
#include "moelora/host/backend.hpp"
#include "moelora/host/convert.hpp"

namespace moelora::moe {

/// T tokens routed to k of E experts each; R = T·k routed rows.
struct RoutingShape {
  std::int64_t tokens = 0;
  std::int64_t experts = 0;
  std::int64_t top_k = 0;

  [[nodiscard]] std::int64_t routed() const { return tokens * top_k; }  ///< R = T·k
};

/// Largest routed-row count R = T·k: rows are indexed with int32 on the device.
inline constexpr std::int64_t kMaxRoutedRows = std::numeric_limits<std::int32_t>::max();

/// Throws ErrorCode::invalid_argument unless E ≥ 1, 1 ≤ k ≤ E, T ≥ 0 and T·k ≤ kMaxRoutedRows.
inline void validate(const RoutingShape& s) {
  MOELORA_REQUIRE(s.experts >= 1, ErrorCode::invalid_argument, "an MoE block needs at least one expert, got ",
                  s.experts);
  MOELORA_REQUIRE(s.top_k >= 1 && s.top_k <= s.experts, ErrorCode::invalid_argument, "top-k must be in [1, experts = ",
                  s.experts, "], got ", s.top_k);
  MOELORA_REQUIRE(s.tokens >= 0 && s.tokens <= kMaxRoutedRows / s.top_k, ErrorCode::invalid_argument,
                  "tokens must be in [0, ", kMaxRoutedRows / s.top_k, "] at top-k ", s.top_k, ", got ", s.tokens);
}

/// The routing of T tokens, in the backend's memory (row-major):
/// - `expert` `[T, k]` int32: token t's experts by descending logit (ties: lower index first);
/// - `weight` `[T, k]` fp32: their renormalised softmax weights (each row sums to 1).
/// Routed row `t·k + j` is token t's j-th choice.
struct Routing {
  std::int32_t* expert = nullptr;
  float* weight = nullptr;
  RoutingShape shape;
};

/// The read-only view of a Routing.
struct ConstRouting {
  const std::int32_t* expert = nullptr;
  const float* weight = nullptr;
  RoutingShape shape;

  ConstRouting() = default;
  ConstRouting(const std::int32_t* e, const float* w, RoutingShape s) : expert(e), weight(w), shape(s) {}
  ConstRouting(const Routing& r) : expert(r.expert), weight(r.weight), shape(r.shape) {}  // NOLINT(google-explicit-constructor)
};

/// Checks router logits `[T, E]` against the routing they fill.
inline void check_logits(ConstTensorRef logits, const RoutingShape& s) {
  validate(s);
  MOELORA_REQUIRE(logits.shape.rank == 2 && logits.shape[0] == s.tokens && logits.shape[1] == s.experts,
                  ErrorCode::shape_mismatch, "router logits have shape ", logits.shape, " but the routing needs [",
                  s.tokens, ", ", s.experts, "]");
  MOELORA_REQUIRE(logits.data != nullptr || s.tokens == 0, ErrorCode::invalid_argument, "router logits have no data");
}

/// The weights of one token from its k chosen logits `w` (descending, in place): `w_j = exp(w_j −
/// w_0) / Σ_i exp(w_i − w_0)`. Shared by the backends (the CUDA kernel calls it per token). A NaN
/// logit among the chosen gives NaN weights.
MOELORA_HOST_DEVICE inline void normalise_top_k(float* w, std::int64_t k) {
  const float top = w[0];
  float sum = 0.0f;
  for (std::int64_t j = 0; j < k; ++j) sum += (w[j] = expf(w[j] - top));
  for (std::int64_t j = 0; j < k; ++j) w[j] /= sum;
}

/// Whether logit `a` of expert `ea` ranks before logit `b` of expert `eb`: larger first, NaN as
/// −∞, ties by the lower index. Shared by the backends.
MOELORA_HOST_DEVICE inline bool ranks_before(float a, std::int32_t ea, float b, std::int32_t eb) {
  const float ka = a != a ? -INFINITY : a, kb = b != b ? -INFINITY : b;
  return ka > kb || (ka == kb && ea < eb);
}

/// Softmax top-k routing on a backend: `route(logits, routing, stream)` fills `routing` from logits
/// `[T, E]` (bf16, fp16 or fp32, the backend's memory). Specialised per backend.
template <class Backend>
struct TopKRouter;

/// The host implementation (the reference).
template <>
struct TopKRouter<HostBackend> {
  static void route(ConstTensorRef logits, const Routing& routing, HostStream /*stream*/) {
    const RoutingShape& s = routing.shape;
    check_logits(logits, s);
    std::vector<float> row(static_cast<std::size_t>(s.experts));
    std::vector<bool> taken(row.size());
    for (std::int64_t t = 0; t < s.tokens; ++t) {
      host::load_as_float(host::element(logits.data, logits.dtype, t * s.experts), logits.dtype, row.size(), row.data(),
                          DType::fp32);
      taken.assign(row.size(), false);
      std::int32_t* experts = routing.expert + t * s.top_k;
      float* weights = routing.weight + t * s.top_k;
      for (std::int64_t j = 0; j < s.top_k; ++j) {
        std::int32_t best = -1;
        for (std::int32_t e = 0; e < static_cast<std::int32_t>(s.experts); ++e)
          if (!taken[static_cast<std::size_t>(e)] &&
              (best < 0 || ranks_before(row[static_cast<std::size_t>(e)], e, row[static_cast<std::size_t>(best)], best)))
            best = e;
        taken[static_cast<std::size_t>(best)] = true;
        experts[j] = best;
        weights[j] = row[static_cast<std::size_t>(best)];
      }
      normalise_top_k(weights, s.top_k);
    }
  }
};

}  // namespace moelora::moe
