/// \file
/// \brief GroupedGemm<CudaBackend>: a grouped base's per-expert GEMMs on the GPU over a range of
/// experts, by one of the GemmStrategy paths: the sm90 grouped GEMM (CUTLASS, sizes built on the
/// device, no host synchronisation) or cuBLAS (fp32 compute; one grouped call or one call per
/// non-empty expert).
///
/// cuBLAS takes the per-expert sizes on the host: with device counts it copies the offsets to the
/// host and synchronises the stream on every call, so a step that uses it cannot be captured in a
/// CUDA graph. The sm90 path reads the offsets on the device. The cuBLAS handle belongs to the caller;
/// each cuBLAS call sets its stream.
#pragma once

#if !defined(__CUDACC__)
#error "moelora/cuda/grouped_gemm.hpp needs nvcc"
#endif

#include <cublas_v2.h>

#include <optional>
#include <vector>

#include "moelora/base/grouped_gemm.hpp"
#include "moelora/core/segments.hpp"
#include "moelora/cuda/backend.hpp"
#include "moelora/cuda/cutlass/sm90_grouped_gemm.hpp"

namespace moelora {

/// How the CUDA bases issue their per-expert GEMMs.
enum class GemmStrategy : std::uint8_t {
  automatic,     ///< sm90_grouped where it applies (see `sm90_grouped_applies`), else per_expert for experts
                 ///< of at least kPerExpertMinWeights weights, else grouped
  sm90_grouped,  ///< the sm90 grouped GEMM (CUTLASS): one argument kernel and one persistent kernel, no host sync
  per_expert,    ///< one cublasGemmEx per non-empty expert (host sizes: synchronises with device counts)
  grouped,       ///< one cublasGemmGroupedBatchedEx over the non-empty experts (host sizes: synchronises with
                 ///< device counts)
};

/// Name of a strategy ("automatic", "sm90_grouped", "per_expert", "grouped").
constexpr const char* gemm_strategy_name(GemmStrategy s) {
  switch (s) {
    case GemmStrategy::automatic: return "automatic";
    case GemmStrategy::sm90_grouped: return "sm90_grouped";
    case GemmStrategy::per_expert: return "per_expert";
    case GemmStrategy::grouped: return "grouped";
  }
  return "?";
}

/// Weights per expert (in · out) from which one cuBLAS GEMM per expert beats cuBLAS 13.0's grouped
/// call on an H100 (whose grouped kernel is an sm80 one): measured on the shapes of bench/RESULTS.md,
/// where qwen3 (1.6M, 3.1M) favoured grouped and nemotron3 (5.0M) and larger favoured per_expert.
inline constexpr std::int64_t kPerExpertMinWeights = std::int64_t{4} << 20;

/// Why the sm90 grouped GEMM cannot serve W `[out, in]` of `dtype` on the current device, or null
/// when it can: its kernels must be linked (MOELORA_HAVE_CUTLASS), the device must be sm_90 (the
/// kernels are built for sm_90a only), the dtype 16-bit and in, out multiples of 8.
inline const char* sm90_grouped_unavailable(std::int64_t in, std::int64_t out, DType dtype) {
  if (!sm90::kKernelsLinked) return "this program was built without the CUTLASS kernels (MOELORA_HAVE_CUTLASS)";
  if (dtype == DType::fp32) return "it takes bf16 or fp16 weights, not fp32";
  if (in % 8 || out % 8) return "it needs in and out to be multiples of 8";
  int device = 0, major = 0, minor = 0;
  MOELORA_CUDA_CHECK(cudaGetDevice(&device));
  MOELORA_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
  MOELORA_CUDA_CHECK(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device));
  if (major != 9 || minor != 0) return "the device is not an sm_90 (Hopper) GPU";
  return nullptr;
}

template <>
class GroupedGemm<CudaBackend> {
 public:
  /// GEMMs over up to `groups` experts per call of W `[out, in]` in `dtype`; `strategy` automatic is
  /// resolved here (sm90_grouped where it applies, else by the expert size `in · out`); asking for
  /// sm90_grouped where it does not apply throws ErrorCode::unsupported saying why. The sm90 path
  /// allocates its device arrays and workspace here, never in `run`.
  GroupedGemm(cublasHandle_t handle, [[maybe_unused]] std::int64_t groups, std::int64_t in, std::int64_t out, DType dtype,
              GemmStrategy strategy = GemmStrategy::automatic)
      : handle_(handle), strategy_(strategy), dtype_(dtype) {
    MOELORA_REQUIRE(handle != nullptr, ErrorCode::invalid_argument, "a CUDA grouped base needs a cuBLAS handle");
    const char* unavailable = sm90_grouped_unavailable(in, out, dtype);
    MOELORA_REQUIRE(strategy_ != GemmStrategy::sm90_grouped || !unavailable, ErrorCode::unsupported,
                    "GemmStrategy::sm90_grouped does not apply: ", unavailable ? unavailable : "");
    if (strategy_ == GemmStrategy::automatic)
      strategy_ = !unavailable                         ? GemmStrategy::sm90_grouped
                  : in * out >= kPerExpertMinWeights ? GemmStrategy::per_expert
                                                       : GemmStrategy::grouped;
#if defined(MOELORA_HAVE_CUTLASS)
    if (strategy_ == GemmStrategy::sm90_grouped) sm90_.emplace(sm90::GroupedGemmShape{dtype, groups, out, in});
#endif
    last_strategy_ = strategy_;
  }

  /// The strategy in use (never `automatic`).
  [[nodiscard]] GemmStrategy strategy() const { return strategy_; }
  /// Whether β = 1 costs the GEMM little next to the LoRA kernels reading the output: true for
  /// cuBLAS (measured on the H100), false for the sm90 kernels, whose epilogue then loads C through
  /// the pipeline that stores D (on the H200, qwen3 fc1 forward + input gradient: the layer step
  /// with the base adding took 0.34 ms over base + LoRA branch, the LoRA kernels adding into y and dx
  /// 0.08 ms).
  [[nodiscard]] bool accumulate_is_cheap() const { return strategy_ != GemmStrategy::sm90_grouped; }
  /// Whether a LowRankAddend of `rank` in `dtype` rides on the GEMM for free-ish (the sm90 kernels
  /// run it as extra K tiles; `rank` a multiple of 8, the GEMM's dtype): then GroupedLoRA hands it the
  /// LoRA expand instead of adding it in a pass of its own. (cuBLAS takes addends too, as GEMMs of
  /// their own.)
  [[nodiscard]] bool fuses_low_rank(std::int64_t rank, DType dtype) const {
    return strategy_ == GemmStrategy::sm90_grouped && rank > 0 && rank % 8 == 0 && dtype == dtype_;
  }
  /// The strategy the last `run` used: `strategy()`, or `per_expert` for a call whose pointers were
  /// not 16-byte aligned.
  [[nodiscard]] GemmStrategy last_strategy() const { return last_strategy_; }

  /// out_e = op(W_e) in_e (+ the addend) over the experts of `g`: the sm90 path reads
  /// `g.segments->offsets` on the device; cuBLAS needs host offsets (synchronising `stream` to
  /// fetch device ones) and adds an addend with one more GEMM per expert. A call whose weights,
  /// input, output or addend are not 16-byte aligned runs `per_expert`: the sm90 kernels need the
  /// alignment, and cuBLAS 13.0's grouped call faulted on an output aligned to 2 bytes (H200).
  void run(const GroupedGemmArgs& g, cudaStream_t stream) {
    const sm90::GroupedGemmCall call{g.direction, g.weights, g.segments->offsets, g.first_expert,
                                     g.last_expert - g.first_expert, g.in, g.out, g.mode, g.addend};
    const bool aligned = sm90::aligned_call(call);
    last_strategy_ = aligned ? strategy_ : GemmStrategy::per_expert;
#if defined(MOELORA_HAVE_CUTLASS)
    if (last_strategy_ == GemmStrategy::sm90_grouped) {
      if (g.segments->rows > 0)
        sm90_->run(call, sm90::tile_for(g.segments->rows, g.segments->num_experts, g.m()), stream);
      return;
    }
#endif
    const std::int64_t* offsets = host_offsets(*g.segments, stream);
    run_cublas(g, offsets, stream);
    if (!g.addend.empty()) run_cublas_addend(g, offsets, stream);
  }

 private:
  /// The segments' offsets in host memory: their own when the counts came from the host, else read
  /// back from the device (synchronising `stream`), valid until the next call.
  const std::int64_t* host_offsets(const ExpertSegments& segments, cudaStream_t stream) {
    if (segments.host_offsets) return segments.host_offsets;
    host_offsets_.resize(static_cast<std::size_t>(segments.num_experts) + 1);
    CudaBackend::copy_to_host(host_offsets_.data(), segments.offsets, host_offsets_.size() * sizeof(std::int64_t),
                              stream);
    return host_offsets_.data();
  }

  // Column-major view: out_eᵀ [m, n] += op(F_e) · rows_eᵀ per non-empty expert, F_e stored `[m, r]`
  // row-major (= [r, m] column-major, transposed) for forward, `[r, m]` (= [m, r] column-major) else.
  void run_cublas_addend(const GroupedGemmArgs& g, const std::int64_t* offsets, cudaStream_t stream) {
    const std::size_t elem = dtype_size(g.dtype);
    const std::int64_t m = g.m(), r = g.addend.rank;
    const bool forward = g.direction == GemmDirection::forward;
    const cudaDataType_t type = cuda_type(g.dtype);
    const float one = 1.0f;
    MOELORA_CUBLAS_CHECK(cublasSetStream(handle_, stream));
    for (std::int64_t e = g.first_expert; e < g.last_expert; ++e) {
      const auto n = static_cast<int>(offsets[e + 1] - offsets[e]);
      if (n == 0) continue;
      const auto* factor = static_cast<const std::byte*>(g.addend.factors) + static_cast<std::size_t>(e * m * r) * elem;
      const auto* rows = static_cast<const std::byte*>(g.addend.rows) + static_cast<std::size_t>(offsets[e] * r) * elem;
      auto* out = static_cast<std::byte*>(g.out) + static_cast<std::size_t>(offsets[e] * m) * elem;
      MOELORA_CUBLAS_CHECK(cublasGemmEx(handle_, forward ? CUBLAS_OP_T : CUBLAS_OP_N, CUBLAS_OP_N, static_cast<int>(m), n,
                                        static_cast<int>(r), &one, factor, type, static_cast<int>(forward ? r : m), rows,
                                        type, static_cast<int>(r), &one, out, type, static_cast<int>(m),
                                        CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
    }
  }

  // Column-major view: out_eᵀ [m, n] = op(W_e) · in_eᵀ, W_e stored [in, out] column-major, transposed
  // for forward.
  void run_cublas(const GroupedGemmArgs& g, const std::int64_t* offsets, cudaStream_t stream) {
    const std::size_t elem = dtype_size(g.dtype);
    const std::int64_t m = g.m(), k = g.k();
    const auto* w = static_cast<const std::byte*>(g.weights);
    const auto* x = static_cast<const std::byte*>(g.in);
    auto* y = static_cast<std::byte*>(g.out);
    const auto weight_of = [&](std::int64_t e) {
      return w + static_cast<std::size_t>((e - g.first_expert) * g.out_features * g.in_features) * elem;
    };
    const auto input_of = [&](std::int64_t e) { return x + static_cast<std::size_t>(offsets[e] * k) * elem; };
    const auto output_of = [&](std::int64_t e) { return y + static_cast<std::size_t>(offsets[e] * m) * elem; };
    const auto rows = [&](std::int64_t e) { return offsets[e + 1] - offsets[e]; };
    const cudaDataType_t type = cuda_type(g.dtype);
    const cublasOperation_t op_w = g.direction == GemmDirection::forward ? CUBLAS_OP_T : CUBLAS_OP_N;
    const auto lda = static_cast<int>(g.in_features);
    MOELORA_CUBLAS_CHECK(cublasSetStream(handle_, stream));

    if (last_strategy_ == GemmStrategy::per_expert) {
      const float one = 1.0f, beta = gemm_beta(g.mode);
      for (std::int64_t e = g.first_expert; e < g.last_expert; ++e) {
        const auto n = static_cast<int>(rows(e));
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
      if (rows(e) > 0) ns_.push_back(static_cast<int>(rows(e)));
    const auto groups = static_cast<int>(ns_.size());
    if (groups == 0) return;
    // Device pointer arrays [A | B | C] over the non-empty experts, uploaded from pageable staging
    // (safe to reuse on return).
    pointers_.resize(3 * static_cast<std::size_t>(groups));
    for (std::int64_t e = g.first_expert, i = 0; e < g.last_expert; ++e) {
      if (rows(e) == 0) continue;
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
  GemmStrategy strategy_, last_strategy_;
  DType dtype_;
#if defined(MOELORA_HAVE_CUTLASS)
  std::optional<sm90::Sm90GroupedGemm> sm90_;
#endif
  Buffer<CudaBackend> device_pointers_;
  std::vector<std::int64_t> host_offsets_;
  std::vector<cublasOperation_t> ops_, no_transpose_;
  std::vector<int> ms_, ns_, ks_, ldas_, ldbs_, ldcs_, group_sizes_;
  std::vector<float> alphas_, betas_;
  std::vector<const void*> pointers_;
};

}  // namespace moelora
