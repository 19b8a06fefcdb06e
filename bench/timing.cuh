/// \file
/// \brief Timing helpers of the GPU benchmarks: the median of CUDA-event-timed runs on a stream, and
/// the device's copy bandwidth (the byte floors' denominator).
#pragma once

#include <cuda_runtime.h>

#include <algorithm>
#include <chrono>
#include <vector>

#include "moelora/core/buffer.hpp"
#include "moelora/cuda/backend.hpp"
#include "moelora/cuda/check.hpp"

namespace moelora::bench {

/// Wall time of the untimed runs before a measurement: the GPU's clocks settle to what they hold
/// under sustained load (on the H200 a GEMM timed first in a sequence read up to 18% faster than the
/// same kernel timed after others; bench/torch_anchors.py warms up alike).
inline constexpr std::chrono::milliseconds kSteadyWarmup{100};

/// Median milliseconds of `iters` timed runs of `f` after at least `warmup` untimed ones lasting at
/// least kSteadyWarmup.
template <class F>
double median_ms(cudaStream_t stream, int iters, F&& f, int warmup = 3) {
  const auto steady = std::chrono::steady_clock::now() + kSteadyWarmup;
  for (int i = 0; i < warmup || std::chrono::steady_clock::now() < steady; ++i) {
    f();
    MOELORA_CUDA_CHECK(cudaStreamSynchronize(stream));
  }
  cudaEvent_t start, stop;
  MOELORA_CUDA_CHECK(cudaEventCreate(&start));
  MOELORA_CUDA_CHECK(cudaEventCreate(&stop));
  std::vector<float> times;
  for (int i = 0; i < iters; ++i) {
    MOELORA_CUDA_CHECK(cudaEventRecord(start, stream));
    f();
    MOELORA_CUDA_CHECK(cudaEventRecord(stop, stream));
    MOELORA_CUDA_CHECK(cudaEventSynchronize(stop));
    float ms = 0.0f;
    MOELORA_CUDA_CHECK(cudaEventElapsedTime(&ms, start, stop));
    times.push_back(ms);
  }
  cudaEventDestroy(start);
  cudaEventDestroy(stop);
  std::nth_element(times.begin(), times.begin() + times.size() / 2, times.end());
  return times[times.size() / 2];
}

/// Device-to-device copy bandwidth in GB/s (bytes read + written), 2 GiB buffers, median of 20.
inline double copy_bandwidth(cudaStream_t stream) {
  const std::size_t bytes = std::size_t{2} << 30;
  Buffer<CudaBackend> a(bytes), b(bytes);
  CudaBackend::fill_zero(a.data(), bytes, stream);
  const double ms = median_ms(stream, 20, [&] { CudaBackend::copy(b.data(), a.data(), bytes, stream); });
  return 2.0 * static_cast<double>(bytes) / (ms * 1e6);
}

}  // namespace moelora::bench
