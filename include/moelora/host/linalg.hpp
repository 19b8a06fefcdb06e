/// \file
/// \brief Linalg<HostBackend>: the initialisers' batched linear algebra on the host; SVDs in fp64
/// through the Gram matrix and LAPACK's `dsyevr`, products through OpenBLAS.
#pragma once

#include <lapacke.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "moelora/core/error.hpp"
#include "moelora/host/backend.hpp"
#include "moelora/host/convert.hpp"
#include "moelora/host/gemm.hpp"
#include "moelora/init/linalg.hpp"

namespace moelora {

template <class Backend>
class Linalg;

/// Host linear algebra; holds no handles.
template <>
class Linalg<HostBackend> {
 public:
  using stream_type = HostStream;

  /// Through the Gram matrix of the short side in fp64: G = M Mᵀ (rows <= cols) or MᵀM, its k
  /// leading eigenpairs (LAPACK dsyevr) give U or V and σ = √λ, and the other side follows as
  /// Vᵀ = S⁻¹ Uᵀ M or U = M V S⁻¹ (zero where σ = 0). fp64 keeps the singular values to ≈ 1e−15·σ₁²/σ
  /// (exact to fp32 on the flat spectra of quantization residuals) at a fraction of dgesdd's cost.
  void svd(const float* m, const init::SvdShape& shape, float* u, float* s, float* vt, HostStream /*stream*/) {
    const std::int64_t rows = shape.rows, cols = shape.cols, k = shape.k;
    const bool wide = rows <= cols;
    const std::int64_t n = wide ? rows : cols;  // Gram size
    MOELORA_REQUIRE(k >= 1 && k <= n, ErrorCode::invalid_argument, "svd: k = ", k, " is not in [1, ", n, "]");
    matrix_.resize(static_cast<std::size_t>(rows * cols));
    gram_.resize(static_cast<std::size_t>(n * n));
    lambda_.resize(static_cast<std::size_t>(n));
    vectors_.resize(static_cast<std::size_t>(n * k));
    other_.resize(static_cast<std::size_t>((wide ? cols : rows) * k));
    support_.resize(static_cast<std::size_t>(2 * k));
    for (std::int64_t b = 0; b < shape.batch; ++b) {
      const float* mb = m + b * rows * cols;
      std::copy(mb, mb + rows * cols, matrix_.begin());
      const auto ld = static_cast<blasint>(cols);
      cblas_dsyrk(CblasRowMajor, CblasUpper, wide ? CblasNoTrans : CblasTrans, static_cast<blasint>(n),
                  static_cast<blasint>(wide ? cols : rows), 1.0, matrix_.data(), ld, 0.0, gram_.data(),
                  static_cast<blasint>(n));
      lapack_int found = 0;
      const lapack_int info = LAPACKE_dsyevr(
          LAPACK_ROW_MAJOR, 'V', 'I', 'U', static_cast<lapack_int>(n), gram_.data(), static_cast<lapack_int>(n), 0.0,
          0.0, static_cast<lapack_int>(n - k + 1), static_cast<lapack_int>(n), 0.0, &found, lambda_.data(),
          vectors_.data(), static_cast<lapack_int>(k), support_.data());
      MOELORA_REQUIRE(info == 0 && found == k, ErrorCode::invalid_argument, "LAPACK dsyevr failed on matrix ", b,
                      " (info ", info, ")");
      // Eigenvalues come ascending: triplet j is eigenpair k − 1 − j. other [long side, k] = M(ᵀ) vectors.
      cblas_dgemm(CblasRowMajor, wide ? CblasTrans : CblasNoTrans, CblasNoTrans, static_cast<blasint>(wide ? cols : rows),
                  static_cast<blasint>(k), static_cast<blasint>(n), 1.0, matrix_.data(), ld, vectors_.data(),
                  static_cast<blasint>(k), 0.0, other_.data(), static_cast<blasint>(k));
      const std::int64_t long_side = wide ? cols : rows;
      for (std::int64_t j = 0; j < k; ++j) {
        const std::int64_t src = k - 1 - j;
        const double sigma = std::sqrt(std::max(lambda_[static_cast<std::size_t>(src)], 0.0));
        const double inverse = sigma > 0.0 ? 1.0 / sigma : 0.0;
        s[b * k + j] = static_cast<float>(sigma);
        for (std::int64_t i = 0; i < n; ++i) {
          const auto value = static_cast<float>(vectors_[static_cast<std::size_t>(i * k + src)]);
          if (wide) u[(b * rows + i) * k + j] = value;
          else vt[(b * k + j) * cols + i] = value;
        }
        for (std::int64_t i = 0; i < long_side; ++i) {
          const auto value = static_cast<float>(other_[static_cast<std::size_t>(i * k + src)] * inverse);
          if (wide) vt[(b * k + j) * cols + i] = value;
          else u[(b * rows + i) * k + j] = value;
        }
      }
    }
  }

  void make_factors(const float* u, const float* s, const float* vt, const init::SvdShape& shape,
                    const init::FactorSplit& split, float* b, float* a, HostStream /*stream*/) const {
    const std::int64_t rows = shape.rows, cols = shape.cols, k = shape.k, r = split.rank;
    dispatch_dtype(split.round, [&](auto tag) {
      for (std::int64_t e = 0; e < shape.batch; ++e) {
        for (std::int64_t j = 0; j < r; ++j) {
          const init::FactorScales f = init::factor_scales(j < k ? s[e * k + j] : 0.0f, split.balanced, split.b_multiplier);
          for (std::int64_t i = 0; i < rows; ++i)
            b[(e * rows + i) * r + j] = j < k ? round_to<tag.value>(u[(e * rows + i) * k + j] * f.b) : 0.0f;
          for (std::int64_t c = 0; c < cols; ++c)
            a[(e * r + j) * cols + c] = j < k ? round_to<tag.value>(vt[(e * k + j) * cols + c] * f.a) : 0.0f;
        }
      }
    });
  }

  void add_product(float* c, const float* b, const float* a, float alpha, const init::SvdShape& shape,
                   HostStream /*stream*/) const {
    for (std::int64_t e = 0; e < shape.batch; ++e)
      host::gemm(host::Op::n, host::Op::n, shape.rows, shape.cols, shape.k, alpha, b + e * shape.rows * shape.k,
                 a + e * shape.k * shape.cols, 1.0f, c + e * shape.rows * shape.cols);
  }

  void subtract(const float* x, const float* y, float* out, std::int64_t n, HostStream /*stream*/) const {
    for (std::int64_t i = 0; i < n; ++i) out[i] = x[i] - y[i];
  }

  void convert(const void* in, DType in_dtype, void* out, DType out_dtype, std::int64_t n, HostStream /*stream*/) {
    staging_.resize(static_cast<std::size_t>(n));
    host::load_as_float(in, in_dtype, staging_.size(), staging_.data(), DType::fp32);
    host::store_from_float(staging_.data(), staging_.size(), out, out_dtype);
  }

  std::vector<double> sq_norms(const float* m, std::int64_t batch, std::int64_t n, HostStream /*stream*/) const {
    std::vector<double> norms(static_cast<std::size_t>(batch), 0.0);
    for (std::int64_t e = 0; e < batch; ++e)
      for (std::int64_t i = 0; i < n; ++i) norms[static_cast<std::size_t>(e)] += double{m[e * n + i]} * m[e * n + i];
    return norms;
  }

 private:
  std::vector<double> matrix_, gram_, lambda_, vectors_, other_;
  std::vector<lapack_int> support_;
  std::vector<float> staging_;
};

}  // namespace moelora
