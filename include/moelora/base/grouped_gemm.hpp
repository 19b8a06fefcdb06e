/// \file
/// \brief GroupedGemm<Backend>: the per-expert GEMMs of a grouped base over a range of experts, and
/// its host specialisation (OpenBLAS). The CUDA one (cuBLAS) is in `cuda/grouped_gemm.hpp`.
///
/// A base computes, for each expert e of `[first_expert, last_expert)` with rows
/// `[offsets[e], offsets[e+1])`: forward `out_t = W_e in_t` (in `[T, in]`, out `[T, out]`) or
/// backward_input `out_t = W_eᵀ in_t` (in `[T, out]`, out `[T, in]`), overwriting out or adding
/// into it (`mode`); fp32 accumulation, out rounded once to `dtype`. The weights of the range may live in a scratch (a
/// dequantized chunk), so they are passed per call. A call may carry a LowRankAddend, summed into
/// the same accumulator (forward `out_t += B_e r_t`, backward_input `out_t += A_eᵀ r_t`).
#pragma once

#include <cstdint>
#include <vector>

#include "moelora/core/dtype.hpp"
#include "moelora/core/gemm_direction.hpp"
#include "moelora/core/low_rank_addend.hpp"
#include "moelora/core/segments.hpp"
#include "moelora/core/write_mode.hpp"
#include "moelora/host/backend.hpp"
#include "moelora/host/convert.hpp"
#include "moelora/host/gemm.hpp"

namespace moelora {

/// One GroupedGemm call.
struct GroupedGemmArgs {
  GemmDirection direction = GemmDirection::forward;
  const void* weights = nullptr;        ///< `[last_expert − first_expert, out_features, in_features]`
  std::int64_t first_expert = 0;        ///< the expert of `weights[0]`
  std::int64_t last_expert = 0;         ///< one past the last expert of `weights`
  std::int64_t out_features = 0, in_features = 0;
  DType dtype = DType::fp32;            ///< of weights, in and out
  const ExpertSegments* segments = nullptr;  ///< row offsets of all experts (backend memory; host copy if any)
  const void* in = nullptr;             ///< all T rows (the range's rows are read)
  void* out = nullptr;                  ///< all T rows (the range's rows are written)
  WriteMode mode = WriteMode::overwrite;  ///< accumulate: out_t += product (β = 1)
  LowRankAddend addend;                 ///< in `dtype`; rank 0: none

  /// Features of an input row and of an output row.
  [[nodiscard]] std::int64_t k() const { return direction == GemmDirection::forward ? in_features : out_features; }
  [[nodiscard]] std::int64_t m() const { return direction == GemmDirection::forward ? out_features : in_features; }
};

template <class Backend>
class GroupedGemm;

/// Host GEMMs: one OpenBLAS sgemm per non-empty expert on fp32 copies.
template <>
class GroupedGemm<HostBackend> {
 public:
  void run(const GroupedGemmArgs& g, HostStream /*stream*/) {
    const std::int64_t w_elems = g.out_features * g.in_features, k = g.k(), m = g.m();
    const std::int64_t* offsets = g.segments->host_offsets;  // host segments always carry them
    for (std::int64_t e = g.first_expert; e < g.last_expert; ++e) {
      const std::int64_t n = offsets[e + 1] - offsets[e];
      if (n == 0) continue;
      w_.resize(static_cast<std::size_t>(w_elems));
      a_.resize(static_cast<std::size_t>(n * k));
      c_.resize(static_cast<std::size_t>(n * m));
      host::load_as_float(host::element(g.weights, g.dtype, (e - g.first_expert) * w_elems), g.dtype, w_.size(),
                          w_.data(), DType::fp32);
      host::load_as_float(host::element(g.in, g.dtype, offsets[e] * k), g.dtype, a_.size(), a_.data(), DType::fp32);
      void* out = host::element(g.out, g.dtype, offsets[e] * m);
      if (g.mode == WriteMode::accumulate) host::load_as_float(out, g.dtype, c_.size(), c_.data(), DType::fp32);
      // c [n, m] (+)= a [n, k] · op(W_e), W_e `[out, in]`: transposed for forward.
      const host::Op op = g.direction == GemmDirection::forward ? host::Op::t : host::Op::n;
      host::gemm(host::Op::n, op, n, m, k, 1.0f, a_.data(), w_.data(), gemm_beta(g.mode), c_.data());
      if (const std::int64_t r = g.addend.rank) {  // c += rows [n, r] · op(F_e): F_e `[m, r]` forward, `[r, m]` else
        w_.resize(static_cast<std::size_t>(m * r));
        a_.resize(static_cast<std::size_t>(n * r));
        host::load_as_float(host::element(g.addend.factors, g.dtype, e * m * r), g.dtype, w_.size(), w_.data(),
                            DType::fp32);
        host::load_as_float(host::element(g.addend.rows, g.dtype, offsets[e] * r), g.dtype, a_.size(), a_.data(),
                            DType::fp32);
        host::gemm(host::Op::n, op, n, m, r, 1.0f, a_.data(), w_.data(), 1.0f, c_.data());
      }
      host::store_from_float(c_.data(), c_.size(), out, g.dtype);
    }
  }

 private:
  std::vector<float> w_, a_, c_;  // fp32 staging, reused across calls
};

}  // namespace moelora
