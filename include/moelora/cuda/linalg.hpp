/// \file
/// \brief Linalg<CudaBackend>: the initialisers' batched linear algebra on the GPU. SVDs through the
/// fp64 Gram matrix of each matrix's short side (cuBLAS DGEMM) and its k leading eigenpairs (block
/// subspace iteration with Rayleigh–Ritz steps by cuSOLVER's `XsyevBatched`, or `XsyevBatched` on
/// the whole Gram matrix), the other side by one SGEMM; products with cuBLAS strided-batched SGEMM
/// (fp32 compute, no TF32), the rest in small kernels.
///
/// The cuBLAS and cuSOLVER handles belong to the caller and must outlive the object; each call
/// sets their stream. `svd` and `sq_norms` synchronise the stream (to follow the iteration, check
/// cuSOLVER's per-matrix status and return norms on the host); initialisation is not on the
/// training hot path.
#pragma once

#if !defined(__CUDACC__)
#error "moelora/cuda/linalg.hpp needs nvcc"
#endif

#include <cublas_v2.h>
#include <cusolverDn.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <memory>
#include <utility>
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
    cusolverDnParams_t params = nullptr;
    MOELORA_CUSOLVER_CHECK(cusolverDnCreateParams(&params));
    params_.reset(params);
  }

  [[nodiscard]] cublasHandle_t blas() const { return blas_; }

  /// The k leading singular triplets through the Gram matrix of the short side, as on the host
  /// (host/linalg.hpp); n = min(rows, cols).
  /// 1. G = M Mᵀ (rows <= cols) or MᵀM, n × n, in fp64: the fp32 input is widened exactly (at most
  ///    kGramChunkBytes of it at a time), so products are exact and sums fp64. Then G += μI with
  ///    μ = kRelativeShift · trace(G) / n (1 for G = 0): the eigenvectors stay, and cond(G + μI)
  ///    <= 100·n + 1 keeps the Cholesky QR of step 2 accurate.
  /// 2. Its k leading eigenpairs. Where p = min(n, kBlockPerTriplet · k) < n: block subspace
  ///    iteration on p vectors (Y = G Q, Q = Cholesky-QR(Y)) with a Rayleigh–Ritz step every
  ///    kCheckInterval steps, until for every matrix the Ritz energy E = Σ_{j<k} λ_j, extrapolated
  ///    from its last two increments as a geometric series, is within kTolerance · (trace(G) − E)
  ///    of its limit, i.e. ‖M − U_k S_k V_kᵀ‖²_F within 10⁻⁶ (relative) of Σ_{i>k} σ_i². Otherwise
  ///    (p = n, no convergence within kMaxIterations steps, a failed Cholesky factorisation):
  ///    cuSOLVER's XsyevBatched on G itself (exact, but ~150 ms for 128 of 768 × 768 on an H100,
  ///    where the whole SVD by iteration takes ~46 ms and matches the host's residual energy to 1e−7).
  /// 3. σ = √max(λ − μ, 0); the eigenvectors are U (rows <= cols) or V, the other side follows by one
  ///    SGEMM as Vᵀ = S⁻¹ Uᵀ M or U = M V S⁻¹, zero where σ = 0 (as on the host, where a σ at the
  ///    rounding level still divides).
  /// Scratch, kept between calls: 8·n² bytes per matrix for G, 16·n·p for the iteration, at most
  /// kGramChunkBytes of widened input, and XsyevBatched's workspace.
  void svd(const float* m, const init::SvdShape& shape, float* u, float* s, float* vt, cudaStream_t stream) {
    const std::int64_t rows = shape.rows, cols = shape.cols, k = shape.k, batch = shape.batch;
    const bool wide = rows <= cols;
    const std::int64_t n = wide ? rows : cols, long_side = wide ? cols : rows;
    MOELORA_REQUIRE(k >= 1 && k <= n, ErrorCode::invalid_argument, "svd: k = ", k, " is not in [1, ", n, "]");
    if (batch == 0) return;
    MOELORA_CUBLAS_CHECK(cublasSetStream(blas_, stream));
    MOELORA_CUSOLVER_CHECK(cusolverDnSetStream(solver_, stream));
    shifted_gram(m, shape, stream);
    // The k leading eigenvectors, ascending, as column-major n × k matrices `vector_stride` apart,
    // and the eigenvalues, ascending, `value_stride` per matrix in values_.
    const std::int64_t p = std::min(n, kBlockPerTriplet * k);
    const double* vectors = p < n ? iterate(n, p, k, batch, stream) : nullptr;
    std::int64_t vector_stride = n * k, value_stride = p;
    if (vectors == nullptr) {
      eigen(gram_.as<double>(), n, batch, stream);
      vectors = gram_.as<double>() + n * (n - k);
      vector_stride = n * n;
      value_stride = n;
    }
    const double* values = values_.as<double>();
    const double* trace_shift = trace_shift_.as<double>();
    float* short_vectors = wide ? u : vt;
    cuda_detail::launch(kernels::short_side_kernel<double>, cuda_detail::elementwise_grid(batch * n * k), 256, 0,
                        stream, vectors, vector_stride, n, k, batch, wide ? k : std::int64_t{1}, wide ? std::int64_t{1} : n,
                        short_vectors);
    cuda_detail::launch(kernels::singular_values_kernel<double>, cuda_detail::elementwise_grid(batch * k), 256, 0,
                        stream, values, value_stride, trace_shift, batch, k, s);
    // M is the column-major cols × rows matrix X. rows <= cols: vt (column-major cols × k) = X U,
    // with U = u read as the transpose of its column-major k × rows storage; else u (column-major
    // k × rows) = Vᵀ X, with V = vt read as column-major cols × k.
    const float one = 1.0f, zero = 0.0f;
    const int ic = static_cast<int>(cols), ir = static_cast<int>(rows), ik = static_cast<int>(k);
    const long long size = static_cast<long long>(rows) * cols;
    if (wide)
      MOELORA_CUBLAS_CHECK(cublasSgemmStridedBatched(blas_, CUBLAS_OP_N, CUBLAS_OP_T, ic, ik, ir, &one, m, ic, size, u,
                                                     ik, static_cast<long long>(rows) * k, &zero, vt, ic,
                                                     static_cast<long long>(k) * cols, static_cast<int>(batch)));
    else
      MOELORA_CUBLAS_CHECK(cublasSgemmStridedBatched(blas_, CUBLAS_OP_T, CUBLAS_OP_N, ik, ir, ic, &one, vt, ic,
                                                     static_cast<long long>(k) * cols, m, ic, size, &zero, u, ik,
                                                     static_cast<long long>(rows) * k, static_cast<int>(batch)));
    // Triplet j of vt [k, cols] is row j (j = t / cols); of u [rows, k], column j (j = t mod k).
    cuda_detail::launch(kernels::divide_by_sigma_kernel<double>, cuda_detail::elementwise_grid(batch * long_side * k), 256,
                        0, stream, wide ? vt : u, long_side * k, wide ? cols : std::int64_t{1}, k, batch, values,
                        value_stride, trace_shift);
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
  struct ParamsDeleter {
    void operator()(cusolverDnParams_t params) const noexcept { cusolverDnDestroyParams(params); }
  };

  /// p = min(n, kBlockPerTriplet · k) vectors are iterated for k triplets.
  static constexpr std::int64_t kBlockPerTriplet = 3;
  /// Steps between Rayleigh–Ritz steps (and convergence checks).
  static constexpr std::int64_t kCheckInterval = 4;
  /// Steps before falling back to the direct eigensolver.
  static constexpr std::int64_t kMaxIterations = 160;
  /// Relative error allowed on the residual energy Σ_{i>k} σ_i² (see svd).
  static constexpr double kTolerance = 1e-6;
  /// μ / (trace(G) / n), the shift that keeps the Cholesky QR well conditioned.
  static constexpr double kRelativeShift = 1e-2;
  /// Bytes of fp64 copies of the input per Gram chunk.
  static constexpr std::int64_t kGramChunkBytes = std::int64_t{256} << 20;
  /// Seed of the start block (fixed: the same input gives the same factors).
  static constexpr std::uint64_t kStartSeed = 0x5eed;

  /// gram_ = the shifted Gram matrices of m (see svd, step 1), column-major n × n (symmetric);
  /// trace_shift_ [batch, 2] = (trace(G), μ).
  void shifted_gram(const float* m, const init::SvdShape& shape, cudaStream_t stream) {
    const std::int64_t rows = shape.rows, cols = shape.cols, batch = shape.batch;
    const bool wide = rows <= cols;
    const std::int64_t n = std::min(rows, cols), size = rows * cols;
    const std::int64_t chunk =
        std::clamp<std::int64_t>(kGramChunkBytes / (size * static_cast<std::int64_t>(sizeof(double))), 1, batch);
    widened_.reserve(static_cast<std::size_t>(chunk * size) * sizeof(double));
    gram_.reserve(static_cast<std::size_t>(batch * n * n) * sizeof(double));
    trace_shift_.reserve(static_cast<std::size_t>(2 * batch) * sizeof(double));
    double* x = widened_.as<double>();
    const double one = 1.0, zero = 0.0;
    for (std::int64_t b0 = 0; b0 < batch; b0 += chunk) {
      const std::int64_t count = std::min(chunk, batch - b0);
      cuda_detail::launch(kernels::widen_kernel<float, double>, cuda_detail::elementwise_grid(count * size), 256, 0,
                          stream, m + b0 * size, x, count * size);
      // M is the column-major cols × rows matrix X: G = XᵀX (rows <= cols) or X Xᵀ.
      MOELORA_CUBLAS_CHECK(cublasDgemmStridedBatched(
          blas_, wide ? CUBLAS_OP_T : CUBLAS_OP_N, wide ? CUBLAS_OP_N : CUBLAS_OP_T, static_cast<int>(n),
          static_cast<int>(n), static_cast<int>(wide ? cols : rows), &one, x, static_cast<int>(cols), size, x,
          static_cast<int>(cols), size, &zero, gram_.as<double>() + b0 * n * n, static_cast<int>(n), n * n,
          static_cast<int>(count)));
    }
    cuda_detail::launch(kernels::shift_gram_kernel<double>, dim3(static_cast<unsigned>(batch)), 256, 0, stream,
                        gram_.as<double>(), n, kRelativeShift, trace_shift_.as<double>());
  }

  /// Block subspace iteration on gram_ (see svd, step 2). Returns the k leading Ritz vectors,
  /// ascending, as column-major n × k matrices n·k apart (values_ holds the p Ritz values per matrix,
  /// ascending), or nullptr where the direct solver must take over. The Cholesky factorisations of
  /// the single passes between Rayleigh–Ritz steps need only keep the span; the two passes before
  /// each Rayleigh–Ritz step are checked.
  const double* iterate(std::int64_t n, std::int64_t p, std::int64_t k, std::int64_t batch, cudaStream_t stream) {
    const auto block_bytes = static_cast<std::size_t>(batch * n * p) * sizeof(double);
    basis_.reserve(block_bytes);
    image_.reserve(block_bytes);
    small_.reserve(static_cast<std::size_t>(batch * p * p) * sizeof(double));
    cholesky_info_.reserve(static_cast<std::size_t>(2 * batch) * sizeof(int));
    double* q = basis_.as<double>();
    double* y = image_.as<double>();
    double* h = small_.as<double>();
    const double* g = gram_.as<double>();
    // Per-matrix pointers for the pointer-array routines: [h | q | y].
    std::vector<double*> pointers(static_cast<std::size_t>(3 * batch));
    for (std::int64_t b = 0; b < batch; ++b) {
      pointers[static_cast<std::size_t>(b)] = h + b * p * p;
      pointers[static_cast<std::size_t>(batch + b)] = q + b * n * p;
      pointers[static_cast<std::size_t>(2 * batch + b)] = y + b * n * p;
    }
    pointers_.reserve(pointers.size() * sizeof(double*));
    CudaBackend::copy_from_host(pointers_.data(), pointers.data(), pointers.size() * sizeof(double*), stream);
    double** h_pointers = pointers_.as<double*>();
    double** q_pointers = h_pointers + batch;
    double** y_pointers = h_pointers + 2 * batch;
    std::vector<double> trace_shift(static_cast<std::size_t>(2 * batch));
    CudaBackend::copy_to_host(trace_shift.data(), trace_shift_.data(), trace_shift.size() * sizeof(double), stream);

    const int in = static_cast<int>(n), ip = static_cast<int>(p), ib = static_cast<int>(batch);
    const long long np = static_cast<long long>(n) * p, pp = static_cast<long long>(p) * p;
    const double one = 1.0, zero = 0.0;
    const auto multiply = [&](const double* from, double* to) {  // to = G from
      MOELORA_CUBLAS_CHECK(cublasDgemmStridedBatched(blas_, CUBLAS_OP_N, CUBLAS_OP_N, in, ip, in, &one, g, in,
                                                     static_cast<long long>(n) * n, from, in, np, &zero, to, in, np, ib));
    };
    const auto inner = [&](const double* a, const double* b) {  // h = aᵀ b
      MOELORA_CUBLAS_CHECK(cublasDgemmStridedBatched(blas_, CUBLAS_OP_T, CUBLAS_OP_N, ip, ip, in, &one, a, in, np, b,
                                                     in, np, &zero, h, ip, pp, ib));
    };
    const auto orthonormalize = [&](double* x, double** x_pointers, int* info) {  // x = x L⁻ᵀ, xᵀx = L Lᵀ
      inner(x, x);
      MOELORA_CUSOLVER_CHECK(cusolverDnDpotrfBatched(solver_, CUBLAS_FILL_MODE_LOWER, ip, h_pointers, ip, info, ib));
      MOELORA_CUBLAS_CHECK(cublasDtrsmBatched(blas_, CUBLAS_SIDE_RIGHT, CUBLAS_FILL_MODE_LOWER, CUBLAS_OP_T,
                                              CUBLAS_DIAG_NON_UNIT, in, ip, &one, h_pointers, ip, x_pointers, in, ib));
    };

    cuda_detail::launch(kernels::random_block_kernel<double>, cuda_detail::elementwise_grid(batch * n * p), 256, 0,
                        stream, q, batch * n * p, kStartSeed);
    int* info = cholesky_info_.as<int>();
    std::vector<int> info_host(static_cast<std::size_t>(2 * batch));
    std::vector<double> values(static_cast<std::size_t>(batch * p));
    std::vector<double> energy(static_cast<std::size_t>(batch)), increment(static_cast<std::size_t>(batch));
    bool have_image = false;  // y = G q already, from the last Rayleigh–Ritz step
    for (std::int64_t check = 0; check * kCheckInterval < kMaxIterations; ++check) {
      for (std::int64_t step = 0; step < kCheckInterval; ++step) {
        if (!have_image) multiply(q, y);
        have_image = false;
        orthonormalize(y, y_pointers, info);
        if (step == kCheckInterval - 1) orthonormalize(y, y_pointers, info + batch);
        std::swap(q, y);
        std::swap(q_pointers, y_pointers);
      }
      // Rayleigh–Ritz: H = Qᵀ G Q; y = G q is also the next step's product.
      multiply(q, y);
      have_image = true;
      inner(q, y);
      eigen(h, p, batch, stream);
      CudaBackend::copy_to_host(info_host.data(), info, info_host.size() * sizeof(int), stream);
      CudaBackend::copy_to_host(values.data(), values_.data(), values.size() * sizeof(double), stream);
      bool converged = true;
      for (std::int64_t b = 0; b < batch; ++b) {
        const auto e = static_cast<std::size_t>(b);
        if (info_host[e] != 0 || info_host[e + static_cast<std::size_t>(batch)] != 0) return nullptr;
        const double trace = trace_shift[2 * e], shift = trace_shift[2 * e + 1];
        double ritz_energy = 0.0;
        for (std::int64_t j = 0; j < k; ++j) ritz_energy += values[static_cast<std::size_t>(b * p + p - 1 - j)] - shift;
        if (!std::isfinite(ritz_energy)) return nullptr;
        const double gain = ritz_energy - energy[e];
        const double allowed = kTolerance * std::max(trace - ritz_energy, kTolerance * trace);
        // Converged: a gain at the rounding level, or two gains whose geometric continuation
        // gain·r / (1 − r), r = gain / previous gain, is within the allowance.
        const bool done = trace == 0.0 || (check >= 2 && std::abs(gain) <= allowed &&
                                           (gain <= 0.0 || (increment[e] > gain &&
                                                            gain * gain <= allowed * (increment[e] - gain))));
        converged = converged && done;
        increment[e] = gain;
        energy[e] = ritz_energy;
      }
      if (converged) {
        // Ritz vectors of the k largest Ritz values: y = q H[:, p − k:].
        MOELORA_CUBLAS_CHECK(cublasDgemmStridedBatched(blas_, CUBLAS_OP_N, CUBLAS_OP_N, in, static_cast<int>(k), ip,
                                                       &one, q, in, np, h + p * (p - k), ip, pp, &zero, y, in,
                                                       static_cast<long long>(n) * k, ib));
        return y;
      }
    }
    return nullptr;
  }

  /// Eigen-decomposes `batch` symmetric d × d fp64 matrices a (column-major, d² apart; the lower
  /// triangle is read) with cuSOLVER's XsyevBatched: a's columns become the eigenvectors and values_
  /// `[batch, d]` the eigenvalues, ascending. Throws ErrorCode::cusolver if a matrix fails.
  void eigen(double* a, std::int64_t d, std::int64_t batch, cudaStream_t stream) {
    values_.reserve(static_cast<std::size_t>(batch * d) * sizeof(double));
    eigen_info_.reserve(static_cast<std::size_t>(batch) * sizeof(int));
    // XsyevBatched takes at most INT32_MAX elements of matrices per call.
    const std::int64_t per_call = std::max<std::int64_t>(1, std::numeric_limits<std::int32_t>::max() / (d * d));
    for (std::int64_t b0 = 0; b0 < batch; b0 += per_call) {
      const std::int64_t count = std::min(per_call, batch - b0);
      double* matrices = a + b0 * d * d;
      double* w = values_.as<double>() + b0 * d;
      std::size_t device_bytes = 0, host_bytes = 0;
      MOELORA_CUSOLVER_CHECK(cusolverDnXsyevBatched_bufferSize(
          solver_, params_.get(), CUSOLVER_EIG_MODE_VECTOR, CUBLAS_FILL_MODE_LOWER, d, CUDA_R_64F, matrices, d,
          CUDA_R_64F, w, CUDA_R_64F, &device_bytes, &host_bytes, count));
      eigen_work_.reserve(std::max<std::size_t>(device_bytes, 1));
      eigen_host_work_.resize(host_bytes);
      MOELORA_CUSOLVER_CHECK(cusolverDnXsyevBatched(solver_, params_.get(), CUSOLVER_EIG_MODE_VECTOR,
                                                    CUBLAS_FILL_MODE_LOWER, d, CUDA_R_64F, matrices, d, CUDA_R_64F, w,
                                                    CUDA_R_64F, eigen_work_.data(), device_bytes,
                                                    eigen_host_work_.data(), host_bytes, eigen_info_.as<int>() + b0,
                                                    count));
    }
    std::vector<int> info(static_cast<std::size_t>(batch));
    CudaBackend::copy_to_host(info.data(), eigen_info_.data(), info.size() * sizeof(int), stream);
    for (std::size_t b = 0; b < info.size(); ++b)
      MOELORA_REQUIRE(info[b] == 0, ErrorCode::cusolver, "cusolverDnXsyevBatched failed on matrix ", b, " of ", d,
                      " x ", d, " (info ", info[b], ")");
  }

  cublasHandle_t blas_;
  cusolverDnHandle_t solver_;
  std::unique_ptr<cusolverDnParams, ParamsDeleter> params_;
  Buffer<CudaBackend> widened_, gram_, trace_shift_, basis_, image_, small_, values_, pointers_, cholesky_info_,
      eigen_info_, eigen_work_, norms_;
  std::vector<char> eigen_host_work_;
};

}  // namespace moelora
