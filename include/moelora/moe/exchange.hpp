/// \file
/// \brief ExpertExchange: the routed rows of an MoE block moved to the ranks that hold their experts
/// (expert parallelism) and gathered over the expert-tensor-parallel group, as Megatron's all-to-all
/// token dispatcher does (PARALLEL.md §1), and back.
///
/// Ranks: a grid of `ep × tp`. The EP group (size ep) holds E experts, E_local = E / ep each, rank
/// p the global experts `[p·E_local, (p+1)·E_local)`; the TP group (size tp) shares those experts,
/// each rank holding a TP shard of them. Every rank routes its own tokens and sorts its routed rows
/// by global expert (TokenPermuter), so the rows for EP rank q's experts are contiguous.
///
/// `plan(order)`, once per forward: the counts `[E]` go through an all-to-all over EP (rank p gets
/// `[ep, E_local]`: rows from each EP source per local expert) and an all-gather over TP (`[tp, ep,
/// E_local]`), then to the host. **This synchronises the stream**: the row exchanges below take
/// host sizes (NCCL's send/recv), as in Megatron. With ep = tp = 1 there is nothing to exchange
/// and no block needs an ExpertExchange.
///
/// `dispatch(rows, local)`: rows `[R, d]` in global-expert order → all_to_all_v over EP (received:
/// EP-source-major, local expert within) → all_gather over TP (each TP rank's block padded to the
/// largest) → regrouped into local-expert order, then TP source, then EP source: `local` `[R_local,
/// d]` with `local_counts()` `[E_local]`, identical on the TP ranks. In that order an expert's rows
/// keep the order of their tokens when tokens are split over ranks TP-major, then EP.
///
/// `combine(local, rows)`: the reverse. `local` `[R_local, d]` (fc2's output, a per-rank partial sum
/// under TP) → regrouped into the padded TP-source-major layout → reduce_scatter over TP (the sum
/// of the partials; each rank keeps its own block) → all_to_all_v over EP back → `rows` `[R, d]` in
/// the order `dispatch` received them. In the backward the two swap roles: the gradient of fc2's
/// output takes the `dispatch` path (arriving full on every TP rank), an input gradient the
/// `combine` path.
#pragma once

#include <algorithm>
#include <cstdint>
#include <span>
#include <tuple>
#include <vector>

#include "moelora/core/buffer.hpp"
#include "moelora/core/error.hpp"
#include "moelora/core/tensor.hpp"
#include "moelora/host/backend.hpp"
#include "moelora/moe/permutation.hpp"
#include "moelora/moe/row_chunks.hpp"
#include "moelora/parallel/communicator.hpp"

namespace moelora::moe {

/// See the file comment. `Comm` models parallel::Communicator on `Backend`; both communicators and
/// the stream belong to the caller.
template <class Backend, parallel::Communicator Comm>
class ExpertExchange {
  static_assert(std::is_same_v<typename Comm::backend_type, Backend>,
                "moelora: an ExpertExchange's communicators must run on its backend");

 public:
  using stream_type = typename Backend::stream_type;

  /// `ep`: the ranks that split the experts; `tp`: the ranks that share them. E must divide by
  /// ep's size.
  ExpertExchange(Comm& ep, Comm& tp, std::int64_t experts) : ep_(ep), tp_(tp), experts_(experts) {
    MOELORA_REQUIRE(experts >= 1 && experts % ep.size() == 0, ErrorCode::invalid_argument, "the ", ep.size(),
                    " expert-parallel ranks must split the ", experts, " experts evenly");
    local_experts_ = experts / ep.size();
    const auto grid = static_cast<std::size_t>(ep.size() * tp.size() * local_experts_);
    counts_ = Buffer<Backend>((static_cast<std::size_t>(experts) + 2 * grid) * sizeof(std::int32_t));
    host_counts_.resize(static_cast<std::size_t>(experts) + grid);
  }

  [[nodiscard]] std::int64_t local_experts() const { return local_experts_; }
  /// The first global expert of this rank.
  [[nodiscard]] std::int64_t first_expert() const { return ep_.rank() * local_experts_; }

  /// Exchanges the counts of `order` (see the file comment); synchronises the stream. Valid for the
  /// following dispatch and combine calls until the next plan.
  void plan(const ExpertOrder& order, stream_type stream) {
    MOELORA_REQUIRE(order.counts != nullptr && order.shape.experts == experts_, ErrorCode::invalid_argument,
                    "ExpertExchange::plan needs the sorted order of a routing over its ", experts_, " experts");
    const int ep = ep_.size(), tp = tp_.size();
    const std::size_t grid = static_cast<std::size_t>(ep * local_experts_);  // [ep, E_local]
    auto* mine = counts_.template as<std::int32_t>();
    auto* received = mine + experts_;
    auto* gathered = received + grid;  // [tp, ep, E_local]
    Backend::copy(mine, order.counts, static_cast<std::size_t>(experts_) * sizeof(std::int32_t), stream);
    ep_.all_to_all(mine, received, static_cast<std::size_t>(local_experts_), parallel::CommElement::int32, stream);
    tp_.all_gather(received, gathered, grid, parallel::CommElement::int32, stream);
    Backend::copy_to_host(host_counts_.data(), mine, static_cast<std::size_t>(experts_) * sizeof(std::int32_t), stream);
    Backend::copy_to_host(host_counts_.data() + experts_, gathered, grid * static_cast<std::size_t>(tp) * sizeof(std::int32_t),
                          stream);
    build_plan();
  }

  /// Rows this rank sends to and receives from each EP rank, and holds after the TP gather.
  [[nodiscard]] std::int64_t routed_rows() const { return sent_total_; }
  [[nodiscard]] std::int64_t local_rows() const { return local_total_; }
  /// Rows of each local expert after `dispatch` (host memory, int64, `[E_local]`).
  [[nodiscard]] ExpertCounts local_counts() const {
    return expert_counts(local_counts_.data(), local_experts_, Memory::host);
  }

  /// Sizes the scratch for `local_rows` gathered rows (padded per TP rank) of width `width` in
  /// `dtype`: later calls of at most that size allocate nothing.
  void reserve(std::int64_t padded_rows, std::int64_t width, DType dtype) {
    scratch_.reserve(static_cast<std::size_t>(padded_rows * width) * dtype_size(dtype));
  }

  /// rows `[routed_rows(), d]` (global-expert order, the plan's) → local `[local_rows(), d]`.
  void dispatch(ConstTensorRef rows, TensorRef local, stream_type stream) {
    check(rows, local, "dispatch");
    const std::int64_t d = rows.shape[1];
    const parallel::CommElement type = parallel::comm_element(rows.dtype);
    void* gathered = gather_buffer(d, rows.dtype);
    // EP: into this rank's TP block of the gathered buffer (the whole buffer when tp = 1).
    void* mine = host::element(gathered, rows.dtype, tp_.rank() * padded_ * d);
    ep_.all_to_all_v(rows.data, elements(send_rows_, d, send_elements_), mine, elements(recv_rows_, d, recv_elements_),
                     type, stream);
    if (tp_.size() > 1)
      tp_.all_gather(mine, gathered, static_cast<std::size_t>(padded_ * d), type, stream);
    mover_.move({gathered, rows.dtype, {tp_.size() * padded_, d}}, to_local_, local, stream);
  }

  /// local `[local_rows(), d]` → rows `[routed_rows(), d]` (summed over TP; global-expert order).
  void combine(ConstTensorRef local, TensorRef rows, stream_type stream) {
    check(rows, local, "combine");
    const std::int64_t d = rows.shape[1];
    const parallel::CommElement type = parallel::comm_element(rows.dtype);
    void* gathered = gather_buffer(d, rows.dtype);
    mover_.move(local, from_local_, {gathered, rows.dtype, {tp_.size() * padded_, d}}, stream);
    void* mine = host::element(gathered, rows.dtype, tp_.rank() * padded_ * d);
    if (tp_.size() > 1)
      tp_.reduce_scatter(gathered, mine, static_cast<std::size_t>(padded_ * d), type, parallel::ReduceOp::sum, stream);
    ep_.all_to_all_v(mine, elements(recv_rows_, d, recv_elements_), rows.data, elements(send_rows_, d, send_elements_),
                     type, stream);
  }

 private:
  /// From the host counts: per-EP-rank send and receive sizes, the padded TP block, the local
  /// counts and the two chunk tables.
  void build_plan() {
    const int ep = ep_.size(), tp = tp_.size();
    const std::int64_t el = local_experts_;
    const std::int32_t* mine = host_counts_.data();
    const std::int32_t* gathered = mine + experts_;  // [tp, ep, E_local]
    const auto count = [&](int q, int s, std::int64_t e) {
      return static_cast<std::int64_t>(gathered[(static_cast<std::int64_t>(q) * ep + s) * el + e]);
    };
    send_rows_.assign(static_cast<std::size_t>(ep), 0);
    recv_rows_.assign(static_cast<std::size_t>(ep), 0);
    sent_total_ = 0;
    for (int p = 0; p < ep; ++p)
      for (std::int64_t e = 0; e < el; ++e) send_rows_[static_cast<std::size_t>(p)] += mine[p * el + e];
    for (const std::size_t n : send_rows_) sent_total_ += static_cast<std::int64_t>(n);
    std::vector<std::int64_t> block_rows(static_cast<std::size_t>(tp), 0);  // rows each TP rank received
    for (int q = 0; q < tp; ++q)
      for (int s = 0; s < ep; ++s)
        for (std::int64_t e = 0; e < el; ++e) block_rows[static_cast<std::size_t>(q)] += count(q, s, e);
    for (int s = 0; s < ep; ++s)
      for (std::int64_t e = 0; e < el; ++e) recv_rows_[static_cast<std::size_t>(s)] += static_cast<std::size_t>(count(tp_.rank(), s, e));
    padded_ = *std::max_element(block_rows.begin(), block_rows.end());
    // Source offsets in the gathered buffer: block q at q·padded, then (EP source, expert) order.
    std::vector<std::int64_t> gathered_at(static_cast<std::size_t>(tp * ep * el));
    for (int q = 0; q < tp; ++q) {
      std::int64_t at = q * padded_;
      for (int s = 0; s < ep; ++s)
        for (std::int64_t e = 0; e < el; ++e) {
          gathered_at[static_cast<std::size_t>((q * ep + s) * el + e)] = at;
          at += count(q, s, e);
        }
    }
    // Local order: expert, then TP source, then EP source.
    to_local_.clear(), from_local_.clear();
    local_counts_.assign(static_cast<std::size_t>(el), 0);
    std::int64_t at = 0;
    for (std::int64_t e = 0; e < el; ++e)
      for (int q = 0; q < tp; ++q)
        for (int s = 0; s < ep; ++s) {
          const std::int64_t n = count(q, s, e), from = gathered_at[static_cast<std::size_t>((q * ep + s) * el + e)];
          to_local_.add(from, at, n);
          from_local_.add(at, from, n);
          local_counts_[static_cast<std::size_t>(e)] += n;
          at += n;
        }
    local_total_ = at;
  }

  /// Element counts of `rows` rows of width d per EP rank, into `out`.
  static std::span<const std::size_t> elements(const std::vector<std::size_t>& rows, std::int64_t d,
                                               std::vector<std::size_t>& out) {
    out.resize(rows.size());
    for (std::size_t i = 0; i < rows.size(); ++i) out[i] = rows[i] * static_cast<std::size_t>(d);
    return out;
  }

  void* gather_buffer(std::int64_t d, DType dtype) {
    scratch_.reserve(static_cast<std::size_t>(tp_.size() * padded_ * d) * dtype_size(dtype));
    return scratch_.data();
  }

  /// Checks `rows` `[routed_rows(), d]` and `local` `[local_rows(), d]` of one dtype against the plan.
  void check(ConstTensorRef rows, ConstTensorRef local, const char* call) const {
    for (const auto& [t, n, name] : {std::tuple{rows, sent_total_, "rows"}, std::tuple{local, local_total_, "local"}}) {
      MOELORA_REQUIRE(t.shape.rank == 2 && t.shape[0] == n, ErrorCode::shape_mismatch, name, " has shape ", t.shape,
                      " but the exchange plan has ", n, " rows");
      MOELORA_REQUIRE(t.data != nullptr || t.numel() == 0, ErrorCode::invalid_argument, name, " has no data");
    }
    MOELORA_REQUIRE(local.dtype == rows.dtype && local.shape[1] == rows.shape[1], ErrorCode::shape_mismatch, call,
                    " needs rows and local of one dtype and width");
  }

  Comm& ep_;
  Comm& tp_;
  std::int64_t experts_, local_experts_ = 0;
  Buffer<Backend> counts_, scratch_;
  std::vector<std::int32_t> host_counts_;
  std::vector<std::size_t> send_rows_, recv_rows_, send_elements_, recv_elements_;
  std::vector<std::int64_t> local_counts_;
  std::int64_t sent_total_ = 0, local_total_ = 0, padded_ = 0;
  RowChunks to_local_, from_local_;
  RowChunkMover<Backend> mover_;
};

}  // namespace moelora::moe
