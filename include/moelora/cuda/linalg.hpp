/// \file
/// \brief Linalg<CudaBackend>: the initialisers' batched linear algebra on the GPU. SVDs with
/// cuSOLVER's `gesvdaStridedBatched` (fp32, the k leading triplets of every matrix in one call),
/// products with cuBLAS strided-batched SGEMM (fp32 compute, no TF32), the rest in small kernels.
///
/// The cuBLAS and cuSOLVER handles belong to the caller and must outlive the object; each call
/// sets their stream. `svd` and `sq_norms` synchronise the stream (to check cuSOLVER's per-matrix
/// status and to return norms on the host); initialisation is not on the training hot path.
#pragma once

#if !defined(__CUDACC__)
#error "moelora/cuda/linalg.hpp needs nvcc"
#endif

#include <cublas_v2.h>
#include <cusolverDn.h>

#include <algorithm>
#include <vector>

#include "moelora/core/buffer.hpp"
#include "moelora/cuda/backend.hpp"
#include "moelora/cuda/check.hpp"
#include "moelora/init/linalg.hpp"
#include "moelora/kernels/linalg.cuh"

namespace moelora {

template <class Backend>
class Linalg;

template <>
class Linalg<CudaBackend> {
 public:
  using stream_type = cudaStream_t;

  Linalg(cublasHandle_t blas, cusolverDnHandle_t solver) : blas_(blas), solver_(solver) {
    MOELORA_REQUIRE(blas != nullptr && solver != nullptr, ErrorCode::invalid_argument,
                    "Linalg<CudaBackend> needs a cuBLAS and a cuSOLVER handle");
  }

  [[nodiscard]] cublasHandle_t blas() const { return blas_; }

  /// gesvda needs a tall matrix (m >= n) in column-major order. Row-major M `[rows, cols]` is the
  /// column-major `cols × rows` matrix Mᵀ: with cols >= rows that is the input (Mᵀ = U' S V'ᵀ, so
  /// Vᵀ = U'ᵀ, whose column-major storage is vt row-major, and U = V'); else M is transposed first
  /// (M = U' S V'ᵀ, U = U', and V'ᵀ stored column-major is vt row-major). Either way vt is written in
  /// place and the other factor goes through a `[rows, k]` column-major scratch into u.
  void svd(const float* m, const init::SvdShape& shape, float* u, float* s, float* vt, cudaStream_t stream) {
    const std::int64_t rows = shape.rows, cols = shape.cols, k = shape.k, batch = shape.batch;
    MOELORA_REQUIRE(k >= 1 && k <= std::min(rows, cols), ErrorCode::invalid_argument, "svd: k = ", k,
                    " is not in [1, ", std::min(rows, cols), "]");
    const bool wide = cols >= rows;
    const float* tall = m;
    if (!wide) {
      transposed_.reserve(static_cast<std::size_t>(batch * rows * cols) * sizeof(float));
      transpose(m, transposed_.as<float>(), batch, rows, cols, stream);
      tall = transposed_.as<float>();
    }
    const int tm = static_cast<int>(wide ? cols : rows), tn = static_cast<int>(wide ? rows : cols);
    const int kk = static_cast<int>(k), nb = static_cast<int>(batch);
    left_.reserve(static_cast<std::size_t>(batch * rows * k) * sizeof(float));
    // gesvda's U' is tm × k (ldu = tm), V' is tn × k (ldv = tn).
    float* d_u = wide ? vt : left_.as<float>();
    float* d_v = wide ? left_.as<float>() : vt;
    const long long stride_u = static_cast<long long>(tm) * k, stride_v = static_cast<long long>(tn) * k;
    MOELORA_CUSOLVER_CHECK(cusolverDnSetStream(solver_, stream));
    int lwork = 0;
    MOELORA_CUSOLVER_CHECK(cusolverDnSgesvdaStridedBatched_bufferSize(
        solver_, CUSOLVER_EIG_MODE_VECTOR, kk, tm, tn, tall, tm, static_cast<long long>(tm) * tn, s, k, d_u, tm,
        stride_u, d_v, tn, stride_v, &lwork, nb));
    work_.reserve(static_cast<std::size_t>(std::max(lwork, 1)) * sizeof(float));
    info_.reserve(static_cast<std::size_t>(batch) * sizeof(int));
    residual_norms_.resize(static_cast<std::size_t>(batch));
    MOELORA_CUSOLVER_CHECK(cusolverDnSgesvdaStridedBatched(
        solver_, CUSOLVER_EIG_MODE_VECTOR, kk, tm, tn, tall, tm, static_cast<long long>(tm) * tn, s, k, d_u, tm,
        stride_u, d_v, tn, stride_v, work_.as<float>(), lwork, info_.as<int>(), residual_norms_.data(), nb));
    // The scratch holds U column-major [rows × k], i.e. row-major [k, rows]: transpose into u.
    transpose(left_.as<float>(), u, batch, k, rows, stream);
    std::vector<int> info(static_cast<std::size_t>(batch));
    CudaBackend::copy_to_host(info.data(), info_.data(), info.size() * sizeof(int), stream);
    for (std::size_t b = 0; b < info.size(); ++b)
      MOELORA_REQUIRE(info[b] == 0, ErrorCode::cusolver, "cusolverDnSgesvdaStridedBatched failed on matrix ", b,
                      " (info ", info[b], ")");
  }

  void make_factors(const float* u, const float* s, const float* vt, const init::SvdShape& shape,
                    const init::FactorSplit& split, float* b, float* a, cudaStream_t stream) const {
    dispatch_dtype(split.round, [&](auto tag) {
      using Round = kernels::device_t<tag.value>;
      cuda_detail::launch(kernels::factor_b_kernel<Round>,
                          cuda_detail::elementwise_grid(shape.batch * shape.rows * split.rank), 256, 0, stream, u, s,
                          shape, split, b);
      cuda_detail::launch(kernels::factor_a_kernel<Round>,
                          cuda_detail::elementwise_grid(shape.batch * split.rank * shape.cols), 256, 0, stream, s, vt,
                          shape, split, a);
    });
  }

  /// Row-major c `[rows, cols]` += alpha · b `[rows, k]` a `[k, cols]` is column-major
  /// cᵀ += alpha · aᵀ bᵀ.
  void add_product(float* c, const float* b, const float* a, float alpha, const init::SvdShape& shape,
                   cudaStream_t stream) const {
    if (shape.batch == 0 || shape.rows == 0 || shape.cols == 0) return;
    const float one = 1.0f;
    const int m = static_cast<int>(shape.cols), n = static_cast<int>(shape.rows), k = static_cast<int>(shape.k);
    MOELORA_CUBLAS_CHECK(cublasSetStream(blas_, stream));
    MOELORA_CUBLAS_CHECK(cublasSgemmStridedBatched(blas_, CUBLAS_OP_N, CUBLAS_OP_N, m, n, k, &alpha, a, m,
                                                   static_cast<long long>(k) * m, b, k, static_cast<long long>(n) * k,
                                                   &one, c, m, static_cast<long long>(n) * m,
                                                   static_cast<int>(shape.batch)));
  }

  void subtract(const float* x, const float* y, float* out, std::int64_t n, cudaStream_t stream) const {
    cuda_detail::launch(kernels::subtract_kernel<float>, cuda_detail::elementwise_grid(n), 256, 0, stream, x, y, out, n);
  }

  void convert(const void* in, DType in_dtype, void* out, DType out_dtype, std::int64_t n, cudaStream_t stream) const {
    cuda_detail::dispatch_io_and_factor(in_dtype, out_dtype, [&](auto in_tag, auto out_tag) {
      using In = kernels::device_t<in_tag.value>;
      using Out = kernels::device_t<out_tag.value>;
      cuda_detail::launch(kernels::convert_kernel<In, Out>, cuda_detail::elementwise_grid(n), 256, 0, stream,
                          static_cast<const In*>(in), static_cast<Out*>(out), n);
    });
  }

  std::vector<double> sq_norms(const float* m, std::int64_t batch, std::int64_t n, cudaStream_t stream) {
    std::vector<double> norms(static_cast<std::size_t>(batch));
    if (batch == 0) return norms;
    norms_.reserve(norms.size() * sizeof(double));
    cuda_detail::launch(kernels::sq_norms_kernel<float>, dim3(static_cast<unsigned>(batch)), 256, 0, stream, m, n,
                        norms_.as<double>());
    CudaBackend::copy_to_host(norms.data(), norms_.data(), norms.size() * sizeof(double), stream);
    return norms;
  }

 private:
  /// out `[batch, cols, rows]` = transpose of in `[batch, rows, cols]`.
  static void transpose(const float* in, float* out, std::int64_t batch, std::int64_t rows, std::int64_t cols,
                        cudaStream_t stream) {
    const dim3 grid(static_cast<unsigned>((cols + kernels::kTransposeTile - 1) / kernels::kTransposeTile),
                    static_cast<unsigned>((rows + kernels::kTransposeTile - 1) / kernels::kTransposeTile),
                    static_cast<unsigned>(batch));
    kernels::transpose_kernel<float><<<grid, dim3(kernels::kTransposeTile, 8), 0, stream>>>(in, out, rows, cols);
    MOELORA_CUDA_CHECK(cudaGetLastError());
  }

  cublasHandle_t blas_;
  cusolverDnHandle_t solver_;
  Buffer<CudaBackend> transposed_, left_, work_, info_, norms_;
  std::vector<double> residual_norms_;
};

}  // namespace moelora
