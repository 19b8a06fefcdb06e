/// \file
/// \brief CUDA test harnesses: the CUDA backend with counts on the host, and with counts on the device.
#pragma once

#include <cublas_v2.h>
#include <cuda_runtime.h>
#include <cusolverDn.h>

#include "support/harness.hpp"

namespace moelora::testing {

/// Owns a cuBLAS handle, a cuSOLVER handle and a non-default stream.
struct CudaResources {
  cublasHandle_t handle = nullptr;
  cusolverDnHandle_t solver = nullptr;
  cudaStream_t stream_ = nullptr;
  CudaResources() {
    MOELORA_CUDA_CHECK(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking));
    MOELORA_CUBLAS_CHECK(cublasCreate(&handle));
    MOELORA_CUSOLVER_CHECK(cusolverDnCreate(&solver));
  }
  ~CudaResources() {
    cusolverDnDestroy(solver);
    cublasDestroy(handle);
    cudaStreamDestroy(stream_);
  }
  [[nodiscard]] Linalg<CudaBackend> linalg() const { return {handle, solver}; }
  CudaResources(const CudaResources&) = delete;
  CudaResources& operator=(const CudaResources&) = delete;
};

/// CUDA backend; tokens_per_expert on the host.
struct CudaHarness : CudaResources, HarnessBase<CudaHarness, CudaBackend> {
  using Base = GroupedLinear<CudaBackend>;
  using Layer = GroupedLoRA<Base>;

  Base make_base(const HostTensor& w) {
    Base base(handle, w.shape[0], w.shape[2], w.shape[1], w.dtype);
    const std::vector<std::byte> bytes = w.encode();
    base.set_weight({bytes.data(), w.dtype, w.shape}, stream_);
    return base;
  }
};

/// CUDA backend; tokens_per_expert uploaded to the device as int32 (the sync-free LoRA path).
struct CudaDeviceCountsHarness : CudaHarness {
  std::vector<Buffer<CudaBackend>> uploaded;  // kept alive for the stream's pending work

  ExpertCounts counts(const std::vector<std::int64_t>& host) {
    std::vector<std::int32_t> narrow(host.begin(), host.end());
    uploaded.emplace_back(std::max<std::size_t>(narrow.size() * 4, 4));
    CudaBackend::copy_from_host(uploaded.back().data(), narrow.data(), narrow.size() * 4, stream_);
    return expert_counts(uploaded.back().as<const std::int32_t>(), static_cast<std::int64_t>(host.size()), Memory::device);
  }
};

}  // namespace moelora::testing
