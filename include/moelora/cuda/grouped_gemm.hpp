/// \file
/// \brief GroupedGemm<CudaBackend>: a grouped base's per-expert GEMMs with cuBLAS (fp32 compute) over
/// the non-empty experts of a range: one grouped call (`cublasGemmGroupedBatchedEx`) or one call each.
///
/// cuBLAS takes the per-expert sizes on the host: `host_offsets` copies device offsets to the host
/// and synchronises the stream (the LoRA branch itself never does). The cuBLAS handle belongs to
/// the caller; each call sets its stream.
#pragma once

#if !defined(__CUDACC__)
#error "moelora/cuda/grouped_gemm.hpp needs nvcc"
#endif

#include <cublas_v2.h>

#include <vector>

#include "moelora/base/grouped_gemm.hpp"
#include "moelora/core/segments.hpp"
#include "moelora/cuda/backend.hpp"

namespace moelora {

/// How the CUDA base issues its per-expert GEMMs.
enum class GemmStrategy : std::uint8_t {
  automatic,   ///< per_expert for experts of at least kPerExpertMinWeights weights, else grouped
  per_expert,  ///< one cublasGemmEx per non-empty expert
  grouped,     ///< one cublasGemmGroupedBatchedEx over the non-empty experts
};

/// Weights per expert (in · out) from which one GEMM per expert beats cuBLAS 13.0's grouped call on
/// an H100 (whose grouped kernel is an sm80 one): measured on the shapes of bench/RESULTS.md, where
/// qwen3 (1.6M, 3.1M) favoured grouped and nemotron3 (5.0M) and larger favoured per_expert.
inline constexpr std::int64_t kPerExpertMinWeights = std::int64_t{4} << 20;

template <>
class GroupedGemm<CudaBackend> {
 public:
  /// `strategy` automatic is resolved from the expert size `in · out`.
  GroupedGemm(cublasHandle_t handle, std::int64_t in, std::int64_t out, GemmStrategy strategy = GemmStrategy::automatic)
      : handle_(handle), strategy_(strategy) {
    MOELORA_REQUIRE(handle != nullptr, ErrorCode::invalid_argument, "a CUDA grouped base needs a cuBLAS handle");
    if (strategy_ == GemmStrategy::automatic)
      strategy_ = in * out >= kPerExpertMinWeights ? GemmStrategy::per_expert : GemmStrategy::grouped;
  }

  /// The strategy in use (never `automatic`).
  [[nodiscard]] GemmStrategy strategy() const { return strategy_; }

  /// The segments' offsets in host memory: their own when the counts came from the host, else read
  /// back from the device (synchronising `stream`), valid until the next call.
  const std::int64_t* host_offsets(const ExpertSegments& segments, cudaStream_t stream) {
    if (segments.host_offsets) return segments.host_offsets;
    host_offsets_.resize(static_cast<std::size_t>(segments.num_experts) + 1);
    CudaBackend::copy_to_host(host_offsets_.data(), segments.offsets, host_offsets_.size() * sizeof(std::int64_t),
                              stream);
    return host_offsets_.data();
  }

  // Column-major view: out_eᵀ [m, n] = op(W_e) · in_eᵀ, W_e stored [in, out] column-major, transposed
  // for forward.
  void run(const GroupedGemmArgs& g, cudaStream_t stream) {
    const std::size_t elem = dtype_size(g.dtype);
    const std::int64_t m = g.m(), k = g.k();
    const auto* w = static_cast<const std::byte*>(g.weights);
    const auto* x = static_cast<const std::byte*>(g.in);
    auto* y = static_cast<std::byte*>(g.out);
    const auto weight_of = [&](std::int64_t e) {
      return w + static_cast<std::size_t>((e - g.first_expert) * g.out_features * g.in_features) * elem;
    };
    const auto input_of = [&](std::int64_t e) { return x + static_cast<std::size_t>(g.offsets[e] * k) * elem; };
    const auto output_of = [&](std::int64_t e) { return y + static_cast<std::size_t>(g.offsets[e] * m) * elem; };
    const cudaDataType_t type = cuda_type(g.dtype);
    const cublasOperation_t op_w = g.direction == GemmDirection::forward ? CUBLAS_OP_T : CUBLAS_OP_N;
    const auto lda = static_cast<int>(g.in_features);
    MOELORA_CUBLAS_CHECK(cublasSetStream(handle_, stream));

    if (strategy_ == GemmStrategy::per_expert) {
      const float one = 1.0f, beta = gemm_beta(g.mode);
      for (std::int64_t e = g.first_expert; e < g.last_expert; ++e) {
        const auto n = static_cast<int>(g.rows(e));
        if (n == 0) continue;
        MOELORA_CUBLAS_CHECK(cublasGemmEx(handle_, op_w, CUBLAS_OP_N, static_cast<int>(m), n, static_cast<int>(k), &one,
                                          weight_of(e), type, lda, input_of(e), type, static_cast<int>(k), &beta,
                                          output_of(e), type, static_cast<int>(m), CUBLAS_COMPUTE_32F,
                                          CUBLAS_GEMM_DEFAULT));
      }
      return;
    }

    ns_.clear();
    for (std::int64_t e = g.first_expert; e < g.last_expert; ++e)
      if (g.rows(e) > 0) ns_.push_back(static_cast<int>(g.rows(e)));
    const auto groups = static_cast<int>(ns_.size());
    if (groups == 0) return;
    // Device pointer arrays [A | B | C] over the non-empty experts, uploaded from pageable staging
    // (safe to reuse on return).
    pointers_.resize(3 * static_cast<std::size_t>(groups));
    for (std::int64_t e = g.first_expert, i = 0; e < g.last_expert; ++e) {
      if (g.rows(e) == 0) continue;
      pointers_[static_cast<std::size_t>(i)] = weight_of(e);
      pointers_[static_cast<std::size_t>(groups + i)] = input_of(e);
      pointers_[static_cast<std::size_t>(2 * groups + i)] = output_of(e);
      ++i;
    }
    device_pointers_.reserve(pointers_.size() * sizeof(void*));
    MOELORA_CUDA_CHECK(cudaMemcpyAsync(device_pointers_.data(), pointers_.data(), pointers_.size() * sizeof(void*),
                                       cudaMemcpyHostToDevice, stream));
    const auto* device = device_pointers_.as<const void*>();
    const auto per_group = [&](auto& values, auto value) { values.assign(static_cast<std::size_t>(groups), value); };
    per_group(ops_, op_w), per_group(no_transpose_, CUBLAS_OP_N);
    per_group(ms_, static_cast<int>(m)), per_group(ks_, static_cast<int>(k)), per_group(ldas_, lda);
    per_group(ldbs_, static_cast<int>(k)), per_group(ldcs_, static_cast<int>(m)), per_group(group_sizes_, 1);
    per_group(alphas_, 1.0f), per_group(betas_, gemm_beta(g.mode));
    MOELORA_CUBLAS_CHECK(cublasGemmGroupedBatchedEx(
        handle_, ops_.data(), no_transpose_.data(), ms_.data(), ns_.data(), ks_.data(), alphas_.data(), device, type,
        ldas_.data(), device + groups, type, ldbs_.data(), betas_.data(),
        const_cast<void* const*>(reinterpret_cast<const void* const*>(device + 2 * groups)), type, ldcs_.data(), groups,
        group_sizes_.data(), CUBLAS_COMPUTE_32F));
  }

 private:
  static cudaDataType_t cuda_type(DType d) {
    return d == DType::bf16 ? CUDA_R_16BF : (d == DType::fp16 ? CUDA_R_16F : CUDA_R_32F);
  }

  cublasHandle_t handle_;
  GemmStrategy strategy_;
  Buffer<CudaBackend> device_pointers_;
  std::vector<std::int64_t> host_offsets_;
  std::vector<cublasOperation_t> ops_, no_transpose_;
  std::vector<int> ms_, ns_, ks_, ldas_, ldbs_, ldcs_, group_sizes_;
  std::vector<float> alphas_, betas_;
  std::vector<const void*> pointers_;
};

}  // namespace moelora
