/// \file
/// \brief The token permutation of an MoE block: routed rows sorted into expert order (the grouped
/// input of the expert layers, with its tokens_per_expert), gathered from the tokens, and combined
/// back per token with the router weights. ExpertOrder is the layout; TokenPermuter<Backend> owns
/// it and runs the steps (host implementation here; the CUDA one, on CUB, in `cuda/moe.hpp`).
///
/// Routed row `s = t·k + j` is token t's j-th choice (see `moe/routing.hpp`). Sorting is stable:
/// rows of one expert keep the order of s, hence of their tokens. With R = T·k and a row width d:
/// - `permute`: `rows[i] = x[source[i] / k]`, x `[T, d]` → rows `[R, d]` (a copy);
/// - `combine`: `y[t] = Σ_j w[t, j] · rows[position[t·k + j]]`, rows `[R, d]` → y `[T, d]`, summed in
///   fp32 in the order j = 0..k−1 and rounded once (no weights: a plain sum, the backward of
///   `permute`);
/// - `combine_backward`: `d_rows[i] = w[source[i]] · dy[source[i] / k]`, rounded once (the rows'
///   gradient; the weights' gradient is not computed: the router is not trained through).
/// All tensors of one call share a dtype (bf16, fp16 or fp32) and live in the backend's memory.
#pragma once

#include <cstdint>
#include <vector>

#include "moelora/core/buffer.hpp"
#include "moelora/core/error.hpp"
#include "moelora/core/tensor.hpp"
#include "moelora/host/backend.hpp"
#include "moelora/moe/routing.hpp"

namespace moelora::moe {

/// The routed rows in expert order, in the backend's memory:
/// - `counts` `[E]` int32: rows per expert, the expert layers' `tokens_per_expert` (Σ = R);
/// - `source` `[R]` int32: the routed row `t·k + j` at sorted position i;
/// - `position` `[R]` int32: its inverse, the sorted position of routed row `t·k + j`.
struct ExpertOrder {
  const std::int32_t* counts = nullptr;
  const std::int32_t* source = nullptr;
  const std::int32_t* position = nullptr;
  RoutingShape shape;

  /// `counts` as the expert layers take them (`Memory` of the backend).
  [[nodiscard]] ExpertCounts tokens_per_expert(Memory memory) const {
    return expert_counts(counts, shape.experts, memory);
  }
};

namespace detail {

/// Checks a `[rows, d]` tensor of the call's dtype.
inline void check_rows(ConstTensorRef t, const char* name, std::int64_t rows, std::int64_t width, DType dtype) {
  MOELORA_REQUIRE(t.shape.rank == 2 && t.shape[0] == rows && (width < 0 || t.shape[1] == width),
                  ErrorCode::shape_mismatch, name, " has shape ", t.shape, " but needs [", rows, ", ",
                  width < 0 ? std::string("d") : std::to_string(width), "]");
  MOELORA_REQUIRE(t.dtype == dtype, ErrorCode::dtype_mismatch, name, " has dtype ", dtype_name(t.dtype), " but needs ",
                  dtype_name(dtype));
  MOELORA_REQUIRE(t.data != nullptr || t.numel() == 0, ErrorCode::invalid_argument, name, " has no data");
}

/// Checks the tensors of permute (`tokens` `[T, d]`, `rows` `[R, d]`) against the order.
inline void check_permute(ConstTensorRef tokens, const char* tokens_name, ConstTensorRef rows, const char* rows_name,
                          const ExpertOrder& order) {
  MOELORA_REQUIRE(order.counts != nullptr, ErrorCode::invalid_argument,
                  "the expert order is empty: sort the routing first");
  check_rows(tokens, tokens_name, order.shape.tokens, -1, tokens.dtype);
  check_rows(rows, rows_name, order.shape.routed(), tokens.shape[1], tokens.dtype);
}

/// Checks that the routing is the one the order was sorted from (its shape).
inline void check_same_routing(const ConstRouting& routing, const ExpertOrder& order) {
  MOELORA_REQUIRE(routing.shape.tokens == order.shape.tokens && routing.shape.top_k == order.shape.top_k &&
                      routing.shape.experts == order.shape.experts,
                  ErrorCode::shape_mismatch, "the routing of ", routing.shape.tokens, " tokens, top-",
                  routing.shape.top_k, " of ", routing.shape.experts, " is not the one the order was sorted from (",
                  order.shape.tokens, " tokens, top-", order.shape.top_k, " of ", order.shape.experts, ")");
}

}  // namespace detail

/// Sorts routings into expert order and moves rows between token and expert order (see the file
/// comment). Owns the ExpertOrder of the last `sort`, valid until the next one. Specialised per
/// backend; each specialisation has:
/// - `reserve(RoutingShape, stream)`: sizes every buffer (and the CUDA sort's scratch) for routings
///   of up to that many tokens at that E and k: later calls allocate nothing;
/// - `const ExpertOrder& sort(ConstRouting, stream)`;
/// - `permute(x, order, rows, stream)`, `combine(rows, weights, order, y, stream)` (weights: the
///   routing, or `nullptr` for a plain sum), `combine_backward(dy, routing, order, d_rows, stream)`.
template <class Backend>
class TokenPermuter;

/// The host implementation (the reference): a counting sort.
template <>
class TokenPermuter<HostBackend> {
 public:
  void reserve(const RoutingShape& max, HostStream /*stream*/) {
    validate(max);
    counts_.reserve(static_cast<std::size_t>(max.experts));
    source_.reserve(static_cast<std::size_t>(max.routed()));
    position_.reserve(static_cast<std::size_t>(max.routed()));
  }

  const ExpertOrder& sort(const ConstRouting& routing, HostStream /*stream*/) {
    const RoutingShape& s = routing.shape;
    validate(s);
    MOELORA_REQUIRE(routing.expert != nullptr || s.tokens == 0, ErrorCode::invalid_argument, "the routing has no data");
    const std::int64_t rows = s.routed();
    for (std::int64_t r = 0; r < rows; ++r)
      MOELORA_REQUIRE(routing.expert[r] >= 0 && routing.expert[r] < s.experts, ErrorCode::invalid_argument,
                      "routed row ", r, " names expert ", routing.expert[r], " of ", s.experts);
    counts_.assign(static_cast<std::size_t>(s.experts), 0);
    for (std::int64_t r = 0; r < rows; ++r) ++counts_[static_cast<std::size_t>(routing.expert[r])];
    std::vector<std::int32_t> next(counts_.size(), 0);
    for (std::size_t e = 1; e < next.size(); ++e) next[e] = next[e - 1] + counts_[e - 1];
    source_.resize(static_cast<std::size_t>(rows));
    position_.resize(static_cast<std::size_t>(rows));
    for (std::int64_t r = 0; r < rows; ++r) {
      const std::int32_t i = next[static_cast<std::size_t>(routing.expert[r])]++;
      source_[static_cast<std::size_t>(i)] = static_cast<std::int32_t>(r);
      position_[static_cast<std::size_t>(r)] = i;
    }
    order_ = {counts_.data(), source_.data(), position_.data(), s};
    return order_;
  }

  static void permute(ConstTensorRef x, const ExpertOrder& order, TensorRef rows, HostStream /*stream*/) {
    detail::check_permute(x, "x", rows, "rows", order);
    const std::size_t row_bytes = static_cast<std::size_t>(x.shape[1]) * dtype_size(x.dtype);
    for (std::int64_t i = 0; i < order.shape.routed(); ++i)
      HostBackend::copy(host::element(rows.data, rows.dtype, i * x.shape[1]),
                        host::element(x.data, x.dtype, order.source[i] / order.shape.top_k * x.shape[1]), row_bytes, {});
  }

  static void combine(ConstTensorRef rows, const float* weights, const ExpertOrder& order, TensorRef y,
                      HostStream /*stream*/) {
    detail::check_permute(y, "y", rows, "rows", order);
    const std::int64_t d = y.shape[1], k = order.shape.top_k;
    std::vector<float> row(static_cast<std::size_t>(d)), sum(row.size());
    for (std::int64_t t = 0; t < order.shape.tokens; ++t) {
      std::fill(sum.begin(), sum.end(), 0.0f);
      for (std::int64_t j = 0; j < k; ++j) {
        const float w = weights ? weights[t * k + j] : 1.0f;
        host::load_as_float(host::element(rows.data, rows.dtype, order.position[t * k + j] * d), rows.dtype, row.size(),
                            row.data(), DType::fp32);
        for (std::size_t c = 0; c < row.size(); ++c) sum[c] += w * row[c];
      }
      host::store_from_float(sum.data(), sum.size(), host::element(y.data, y.dtype, t * d), y.dtype);
    }
  }

  static void combine_backward(ConstTensorRef dy, const ConstRouting& routing, const ExpertOrder& order,
                               TensorRef d_rows, HostStream /*stream*/) {
    detail::check_permute(dy, "dy", d_rows, "d_rows", order);
    detail::check_same_routing(routing, order);
    const std::int64_t d = dy.shape[1];
    std::vector<float> row(static_cast<std::size_t>(d));
    for (std::int64_t i = 0; i < order.shape.routed(); ++i) {
      const std::int32_t s = order.source[i];
      host::load_as_float(host::element(dy.data, dy.dtype, s / order.shape.top_k * d), dy.dtype, row.size(), row.data(),
                          DType::fp32);
      for (float& v : row) v *= routing.weight[s];
      host::store_from_float(row.data(), row.size(), host::element(d_rows.data, d_rows.dtype, i * d), d_rows.dtype);
    }
  }

 private:
  std::vector<std::int32_t> counts_, source_, position_;
  ExpertOrder order_;
};

}  // namespace moelora::moe
