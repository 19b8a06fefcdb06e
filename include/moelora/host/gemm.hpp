/// \file
/// \brief Row-major fp32 GEMM on the host through OpenBLAS (CBLAS).
#pragma once

#include <cblas.h>

#include <cstdint>

namespace moelora::host {

/// Transpose flag of a GEMM operand.
enum class Op : bool { n, t };

/// `C[m, n] = alpha · op(A) · op(B) + beta · C`, all row-major fp32. `op(A)` is `[m, k]` (A stored
/// `[m, k]` for Op::n, `[k, m]` for Op::t), likewise `op(B)` `[k, n]`. Empty sizes do nothing.
inline void gemm(Op op_a, Op op_b, std::int64_t m, std::int64_t n, std::int64_t k, float alpha, const float* a,
                 const float* b, float beta, float* c) {
  if (m == 0 || n == 0) return;
  const auto lda = static_cast<blasint>(op_a == Op::n ? k : m);
  const auto ldb = static_cast<blasint>(op_b == Op::n ? n : k);
  cblas_sgemm(CblasRowMajor, op_a == Op::n ? CblasNoTrans : CblasTrans, op_b == Op::n ? CblasNoTrans : CblasTrans,
              static_cast<blasint>(m), static_cast<blasint>(n), static_cast<blasint>(k), alpha, a, lda, b, ldb,
              beta, c, static_cast<blasint>(n));
}

}  // namespace moelora::host
