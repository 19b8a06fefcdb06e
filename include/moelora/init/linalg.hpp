/// \file
/// \brief The `Linalg` concept: the batched fp32 linear algebra that the SVD-based initialisers run
/// on, and the factor layout they produce.
///
/// Every array is fp32, row-major, in the backend's memory, and batched: `batch` matrices stored
/// back to back. Operations are queued on the stream; `sq_norms` returns values on the host (and so
/// synchronises the stream).
#pragma once

#include <cmath>
#include <concepts>
#include <cstdint>
#include <vector>

#include "moelora/core/dtype.hpp"

namespace moelora::init {

/// Sizes of a batch of `rows × cols` matrices and the number `k` of singular triplets kept.
struct SvdShape {
  std::int64_t batch = 0, rows = 0, cols = 0, k = 0;
};

/// How `make_factors` splits `U_k S_k V_kᵀ` into B `[batch, rows, rank]` and A `[batch, rank, cols]`.
struct FactorSplit {
  std::int64_t rank = 0;      ///< r >= k; rows k.. of A and columns k.. of B are zero
  bool balanced = false;      ///< false: B = U S, A = Vᵀ; true: B = U S^½, A = S^½ Vᵀ
  float b_multiplier = 1.0f;  ///< B is multiplied by this (1 / scale)
  DType round = DType::fp32;  ///< both factors are rounded to this dtype (kept as fp32 values)
};

/// Batched fp32 linear algebra for the initialisers (`host/linalg.hpp`, `cuda/linalg.hpp`).
///
/// - `svd(m, shape, u, s, vt, stream)`: the k leading singular triplets of each `m [rows, cols]`:
///   u `[batch, rows, k]`, s `[batch, k]` (descending), vt `[batch, k, cols]`; m is not modified.
/// - `make_factors(u, s, vt, shape, split, b, a, stream)`: B and A from an SVD (see FactorSplit).
/// - `add_product(c, b, a, alpha, shape, stream)`: `c += alpha · b a` per batch, b `[rows, k]`,
///   a `[k, cols]`, c `[rows, cols]`.
/// - `subtract(x, y, out, n, stream)`: `out = x − y` over n elements (out may alias x or y).
/// - `convert(in, in_dtype, out, out_dtype, n, stream)`: element-wise dtype conversion, rounding once.
/// - `sq_norms(m, batch, n, stream)`: `Σ m²` of each of `batch` arrays of n elements, in fp64, on the host.
template <class L>
concept Linalg = requires(L& la, const float* cf, float* f, const void* cv, void* v, DType d, const SvdShape& shape,
                          const FactorSplit& split, std::int64_t n, typename L::stream_type stream) {
  la.svd(cf, shape, f, f, f, stream);
  la.make_factors(cf, cf, cf, shape, split, f, f, stream);
  la.add_product(f, cf, cf, 1.0f, shape, stream);
  la.subtract(cf, cf, f, n, stream);
  la.convert(cv, d, v, d, n, stream);
  { la.sq_norms(cf, n, n, stream) } -> std::same_as<std::vector<double>>;
};

/// What multiplies column j of U (into B) and row j of Vᵀ (into A) for singular value `sigma`.
struct FactorScales {
  float b, a;
};
MOELORA_HOST_DEVICE inline FactorScales factor_scales(float sigma, bool balanced, float b_multiplier) {
  const float root = sqrtf(sigma);
  return {(balanced ? root : sigma) * b_multiplier, balanced ? root : 1.0f};
}

}  // namespace moelora::init
