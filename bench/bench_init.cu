// Init time of the SVD-based adapter initialisers on the GPU (issue #3): E experts of [out, in]
// bf16 weights, N(0, 0.02²), quantized with a chosen format; times `add_adapter` (everything: the
// fake quantization, the batched SVD, the factors, the error report) and, separately, the batched
// SVD alone, as medians over repeats, and checks that SVD against the host's fp64 one on the first
// two experts. Default: 128 experts of 768×2048, NVFP4, r = 32, svdquant.
// Usage: bench_init [--experts E --out O --in I --rank R --format F --method M --repeats N]
#include <CLI/CLI.hpp>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <random>
#include <string>
#include <vector>

#include "moelora/moelora.hpp"

namespace {

using namespace moelora;

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

template <class F>
double time_ms(F&& f, cudaStream_t stream) {
  MOELORA_CUDA_CHECK(cudaStreamSynchronize(stream));
  const auto start = std::chrono::steady_clock::now();
  f();
  MOELORA_CUDA_CHECK(cudaStreamSynchronize(stream));
  return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start).count();
}

}  // namespace

int main(int argc, char** argv) {
  std::int64_t experts = 128, out = 768, in = 2048, rank = 32, repeats = 5;
  std::string format = "nvfp4", method = "svdquant";
  CLI::App app{"Init time of the SVD-based adapter initialisers on the GPU"};
  app.add_option("--experts", experts)->check(CLI::PositiveNumber);
  app.add_option("--out", out)->check(CLI::PositiveNumber);
  app.add_option("--in", in)->check(CLI::PositiveNumber);
  app.add_option("--rank", rank)->check(CLI::PositiveNumber);
  app.add_option("--format", format);
  app.add_option("--method", method);
  app.add_option("--repeats", repeats)->check(CLI::PositiveNumber);
  CLI11_PARSE(app, argc, argv);

  cudaStream_t stream;
  cublasHandle_t blas;
  cusolverDnHandle_t solver;
  MOELORA_CUDA_CHECK(cudaStreamCreate(&stream));
  MOELORA_CUBLAS_CHECK(cublasCreate(&blas));
  MOELORA_CUSOLVER_CHECK(cusolverDnCreate(&solver));
  {
    std::mt19937_64 rng(7);
    std::normal_distribution<float> normal(0.0f, 0.02f);
    std::vector<bfloat16_t> w(static_cast<std::size_t>(experts * out * in));
    for (auto& v : w) v = bfloat16_t(normal(rng));
    using Base = QuantizedGroupedLinear<CudaBackend>;
    Base base(Linalg<CudaBackend>(blas, solver), experts, in, out, DType::bf16,
              quant::FormatQuantizer<CudaBackend>(quant::parse_quant_spec(format)));
    base.set_weight({w.data(), DType::bf16, {experts, out, in}}, stream);
    GroupedLoRA<Base> layer(std::move(base));

    AdapterConfig config;
    config.rank = rank;
    config.lora_dtype = "bf16";
    config.init = parse_init_method(method);
    std::vector<double> init_ms;
    init::InitReport report;
    for (std::int64_t i = 0; i <= repeats; ++i) {  // the first run (allocations, cuSOLVER setup) is not counted
      const double ms = time_ms([&] { report = layer.add_adapter("a", config, stream); }, stream);
      if (i > 0) init_ms.push_back(ms);
      layer.remove_adapter("a");
    }

    // The batched SVD alone, on the same sizes.
    const std::int64_t k = std::min({rank, out, in});
    Buffer<CudaBackend> m(static_cast<std::size_t>(experts * out * in) * 4), u(static_cast<std::size_t>(experts * out * k) * 4),
        s(static_cast<std::size_t>(experts * k) * 4), vt(static_cast<std::size_t>(experts * k * in) * 4);
    Linalg<CudaBackend> la(blas, solver);
    la.convert(layer.base().source_weight().data, DType::bf16, m.data(), DType::fp32, experts * out * in, stream);
    std::vector<double> svd_ms;
    for (std::int64_t i = 0; i <= repeats; ++i) {
      const double ms = time_ms(
          [&] { la.svd(m.as<float>(), {experts, out, in, k}, u.as<float>(), s.as<float>(), vt.as<float>(), stream); },
          stream);
      if (i > 0) svd_ms.push_back(ms);
    }

    // The residual energy Σ_{i>k} σ_i² = ‖M‖² − Σ_{i<=k} σ_i² against the host's fp64 SVD (Gram
    // matrix and LAPACK dsyevr) on the first experts.
    const std::int64_t checked = std::min<std::int64_t>(experts, 2);
    std::vector<float> m_host(static_cast<std::size_t>(checked * out * in)), s_gpu(static_cast<std::size_t>(checked * k)),
        u_host(static_cast<std::size_t>(checked * out * k)), s_host(static_cast<std::size_t>(checked * k)),
        vt_host(static_cast<std::size_t>(checked * k * in));
    CudaBackend::copy_to_host(m_host.data(), m.data(), m_host.size() * sizeof(float), stream);
    CudaBackend::copy_to_host(s_gpu.data(), s.data(), s_gpu.size() * sizeof(float), stream);
    Linalg<HostBackend>{}.svd(m_host.data(), {checked, out, in, k}, u_host.data(), s_host.data(), vt_host.data(),
                              HostStream{});
    double worst_tail = 0.0, worst_sigma = 0.0;
    for (std::int64_t e = 0; e < checked; ++e) {
      double norm = 0.0, kept_host = 0.0, kept_gpu = 0.0;
      for (std::int64_t i = 0; i < out * in; ++i) norm += double{m_host[e * out * in + i]} * m_host[e * out * in + i];
      for (std::int64_t j = 0; j < k; ++j) {
        const double sh = s_host[e * k + j], sg = s_gpu[e * k + j];
        kept_host += sh * sh;
        kept_gpu += sg * sg;
        worst_sigma = std::max(worst_sigma, std::abs(sg - sh) / s_host[e * k]);
      }
      worst_tail = std::max(worst_tail, std::abs(kept_gpu - kept_host) / (norm - kept_host));
    }

    std::printf("%s init, %lld experts of [%lld, %lld], %s, rank %lld: %.1f ms (batched SVD alone %.1f ms); "
                "weight error %.3f%% -> %.3f%% (rms over experts)\n",
                method.c_str(), static_cast<long long>(experts), static_cast<long long>(out),
                static_cast<long long>(in), format.c_str(), static_cast<long long>(rank), median(init_ms),
                median(svd_ms), 100.0 * init::InitReport::rms(report.quantized_error),
                100.0 * init::InitReport::rms(report.init_error));
    std::printf("batched SVD against the host's fp64 SVD on %lld experts: residual energy within %.2e (relative), "
                "sigma within %.2e of sigma_1\n",
                static_cast<long long>(checked), worst_tail, worst_sigma);
  }
  cusolverDnDestroy(solver);
  cublasDestroy(blas);
  cudaStreamDestroy(stream);
  return 0;
}
