/// \file
/// \brief GroupedLinear<CudaBackend>: the reference base on the GPU, cuBLAS GEMMs (fp32 compute)
/// over the non-empty experts: one grouped call (`cublasGemmGroupedBatchedEx`) or one call each.
///
/// cuBLAS takes the per-expert sizes on the host: with device counts this base copies the offsets
/// to the host and synchronises the stream (the LoRA branch itself never does). The cuBLAS handle
/// belongs to the caller; the base sets its stream on each call.
#pragma once

#if !defined(__CUDACC__)
#error "moelora/cuda/grouped_linear.hpp needs nvcc"
#endif

#include <cublas_v2.h>

#include <vector>

#include "moelora/base/grouped_linear.hpp"
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
class GroupedLinear<CudaBackend> : public GroupedWeights<CudaBackend> {
 public:
  using backend_type = CudaBackend;

  GroupedLinear(cublasHandle_t handle, std::int64_t experts, std::int64_t in, std::int64_t out, DType dtype,
                GemmStrategy strategy = GemmStrategy::automatic)
      : GroupedWeights(experts, in, out, dtype), handle_(handle), strategy_(strategy) {
    MOELORA_REQUIRE(handle != nullptr, ErrorCode::invalid_argument, "GroupedLinear needs a cuBLAS handle");
    if (strategy_ == GemmStrategy::automatic)
      strategy_ = in * out >= kPerExpertMinWeights ? GemmStrategy::per_expert : GemmStrategy::grouped;
  }

  /// The strategy in use (never `automatic`).
  [[nodiscard]] GemmStrategy strategy() const { return strategy_; }

  /// y_t = W_e x_t: column-major y_eᵀ [out, n] = W_e (stored [in, out] column-major, transposed) · x_eᵀ.
  void forward(ConstTensorRef x, const ExpertSegments& segments, TensorRef y, cudaStream_t stream) {
    run(x.data, segments, y.data, CUBLAS_OP_T, out_features(), in_features(), stream);
  }
  /// dx_t = W_eᵀ dy_t: column-major dx_eᵀ [in, n] = W_e (stored [in, out] column-major) · dy_eᵀ.
  void backward_input(ConstTensorRef dy, const ExpertSegments& segments, TensorRef dx, cudaStream_t stream) {
    run(dy.data, segments, dx.data, CUBLAS_OP_N, in_features(), out_features(), stream);
  }

 private:
  static cudaDataType_t cuda_type(DType d) {
    return d == DType::bf16 ? CUDA_R_16BF : (d == DType::fp16 ? CUDA_R_16F : CUDA_R_32F);
  }

  // out rows [n, m] = in rows [n, k] · op(W_e)ᵀ in row-major terms; m = output features, k = input features.
  void run(const void* in, const ExpertSegments& segments, void* out, cublasOperation_t op_w, std::int64_t m,
           std::int64_t k, cudaStream_t stream) {
    const std::int64_t experts = num_experts();
    const std::int64_t* offsets = segments.host_offsets;
    if (!offsets) {  // device counts: cuBLAS needs the sizes on the host
      host_offsets_.resize(static_cast<std::size_t>(experts) + 1);
      CudaBackend::copy_to_host(host_offsets_.data(), segments.offsets, host_offsets_.size() * sizeof(std::int64_t),
                                stream);
      offsets = host_offsets_.data();
    }
    const std::size_t elem = dtype_size(dtype());
    const auto* w = static_cast<const std::byte*>(weight().data);
    const auto* x = static_cast<const std::byte*>(in);
    auto* y = static_cast<std::byte*>(out);
    const auto weight_of = [&](std::int64_t e) { return w + static_cast<std::size_t>(e * out_features() * in_features()) * elem; };
    const auto input_of = [&](std::int64_t e) { return x + static_cast<std::size_t>(offsets[e] * k) * elem; };
    const auto output_of = [&](std::int64_t e) { return y + static_cast<std::size_t>(offsets[e] * m) * elem; };
    const cudaDataType_t type = cuda_type(dtype());
    const auto lda = static_cast<int>(in_features());
    MOELORA_CUBLAS_CHECK(cublasSetStream(handle_, stream));

    if (strategy_ == GemmStrategy::per_expert) {
      const float one = 1.0f, zero = 0.0f;
      for (std::int64_t e = 0; e < experts; ++e) {
        const auto n = static_cast<int>(offsets[e + 1] - offsets[e]);
        if (n == 0) continue;
        MOELORA_CUBLAS_CHECK(cublasGemmEx(handle_, op_w, CUBLAS_OP_N, static_cast<int>(m), n, static_cast<int>(k), &one,
                                          weight_of(e), type, lda, input_of(e), type, static_cast<int>(k), &zero,
                                          output_of(e), type, static_cast<int>(m), CUBLAS_COMPUTE_32F,
                                          CUBLAS_GEMM_DEFAULT));
      }
      return;
    }

    ns_.clear();
    for (std::int64_t e = 0; e < experts; ++e)
      if (offsets[e + 1] > offsets[e]) ns_.push_back(static_cast<int>(offsets[e + 1] - offsets[e]));
    const auto groups = static_cast<int>(ns_.size());
    if (groups == 0) return;
    // Device pointer arrays [A | B | C] over the non-empty experts, uploaded from pageable staging
    // (safe to reuse on return).
    pointers_.resize(3 * static_cast<std::size_t>(groups));
    for (std::int64_t e = 0, g = 0; e < experts; ++e) {
      if (offsets[e + 1] == offsets[e]) continue;
      pointers_[static_cast<std::size_t>(g)] = weight_of(e);
      pointers_[static_cast<std::size_t>(groups + g)] = input_of(e);
      pointers_[static_cast<std::size_t>(2 * groups + g)] = output_of(e);
      ++g;
    }
    device_pointers_.reserve(pointers_.size() * sizeof(void*));
    MOELORA_CUDA_CHECK(cudaMemcpyAsync(device_pointers_.data(), pointers_.data(), pointers_.size() * sizeof(void*),
                                       cudaMemcpyHostToDevice, stream));
    const auto* device = device_pointers_.as<const void*>();
    const auto per_group = [&](auto& values, auto value) { values.assign(static_cast<std::size_t>(groups), value); };
    per_group(ops_, op_w), per_group(no_transpose_, CUBLAS_OP_N);
    per_group(ms_, static_cast<int>(m)), per_group(ks_, static_cast<int>(k)), per_group(ldas_, lda);
    per_group(ldbs_, static_cast<int>(k)), per_group(ldcs_, static_cast<int>(m)), per_group(group_sizes_, 1);
    per_group(alphas_, 1.0f), per_group(betas_, 0.0f);
    MOELORA_CUBLAS_CHECK(cublasGemmGroupedBatchedEx(
        handle_, ops_.data(), no_transpose_.data(), ms_.data(), ns_.data(), ks_.data(), alphas_.data(), device, type,
        ldas_.data(), device + groups, type, ldbs_.data(), betas_.data(),
        const_cast<void* const*>(reinterpret_cast<const void* const*>(device + 2 * groups)), type, ldcs_.data(), groups,
        group_sizes_.data(), CUBLAS_COMPUTE_32F));
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
