// The optimizer benchmark of issue 13: one AdamW step over an adapter's factors (bf16 A [E, r, in]
// and B [E, out, r], fp32 gradients, moments and master weights) at the shapes of DESIGN.md §8:
// the plain step (no statistics pass) and the step with global-norm clipping and the finite check,
// each against its byte floor, and their ratio (target: at most 1.3). Median of --iters runs.
//
// Byte floor per factor element (N of them): the plain step reads the gradient, m, v and the master
// weight and writes m, v, the master weight and the bf16 factor: 4 + 8 + 8 + 8 + 2 = 30 bytes; the
// guarded step reads the gradient once more for the statistics: 34 bytes.
#include <CLI/CLI.hpp>

#include <algorithm>
#include <cstdio>
#include <string>
#include <vector>

#include "moelora/moelora.hpp"
#include "device_data.cuh"
#include "shapes.hpp"
#include "timing.cuh"

namespace {

using namespace moelora;

/// One bf16 adapter's factors and fp32 gradients in device memory, without a base: all the
/// optimizer needs of a layer (TrainableLayer).
struct Adapters {
  using backend_type = CudaBackend;
  ResolvedAdapterConfig config;
  Buffer<CudaBackend> a, b, grad_a, grad_b;
  Shape a_shape, b_shape;

  Adapters(const bench::Shape& s, std::int64_t rank, cudaStream_t stream)
      : config{rank, 1.0f, true, DType::bf16, InitMethod::kaiming_zeros, true, 0, 0},
        a(static_cast<std::size_t>(s.experts * rank * s.in) * 2),
        b(static_cast<std::size_t>(s.experts * s.out * rank) * 2),
        grad_a(a.bytes() * 2),
        grad_b(b.bytes() * 2),
        a_shape{s.experts, rank, s.in},
        b_shape{s.experts, s.out, rank} {
    CudaBackend::fill_zero(a.data(), a.bytes(), stream);
    CudaBackend::fill_zero(b.data(), b.bytes(), stream);
    for (const auto& [g, seed] : {std::pair{&grad_a, 5}, std::pair{&grad_b, 6}}) {
      bench::fill_uniform_kernel<float><<<1024, 256, 0, stream>>>(g->as<float>(), static_cast<std::int64_t>(g->bytes() / 4), seed, 1e-2f);
      MOELORA_CUDA_CHECK(cudaGetLastError());
    }
  }
  [[nodiscard]] std::vector<std::string> adapter_names() const { return {"bench"}; }
  AdapterView adapter(std::string_view /*name*/) {
    return {"bench", 0, config, {a.data(), DType::bf16, a_shape}, {b.data(), DType::bf16, b_shape},
            {grad_a.data(), DType::fp32, a_shape}, {grad_b.data(), DType::fp32, b_shape}};
  }
  [[nodiscard]] std::int64_t elements() const { return a_shape.numel() + b_shape.numel(); }
};

/// Median milliseconds of one step of `config` over `adapters` (after the step that allocates).
double time_step(Adapters& adapters, const AdamWConfig& config, int iters, cudaStream_t stream) {
  AdamW<Adapters> optimizer(config);
  optimizer.step(adapters, stream);
  return bench::median_ms(stream, iters, [&] { optimizer.step(adapters, stream); });
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"moelora optimizer benchmark: AdamW step, plain and with clipping + finite check, vs byte floors"};
  std::vector<std::string> wanted;
  std::vector<std::int64_t> ranks{16, 64};
  int iters = 20;
  app.add_option("--shapes", wanted, "comma-separated shape names (default: all)")->delimiter(',');
  app.add_option("--ranks", ranks, "comma-separated ranks")->delimiter(',');
  app.add_option("--iters", iters, "timed iterations per measurement (median)")->check(CLI::PositiveNumber);
  CLI11_PARSE(app, argc, argv);
  int devices = 0;
  if (cudaGetDeviceCount(&devices) != cudaSuccess || devices == 0) {
    std::fprintf(stderr, "bench_optim: no CUDA device\n");
    return 1;
  }
  cudaDeviceProp prop{};
  MOELORA_CUDA_CHECK(cudaGetDeviceProperties(&prop, 0));
  cudaStream_t stream;
  MOELORA_CUDA_CHECK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  const double copy_gbps = bench::copy_bandwidth(stream);
  std::printf("%s: copy bandwidth %.0f GB/s; median of %d steps\n", prop.name, copy_gbps, iters);
  std::printf("%-20s %3s %11s %9s %9s %6s %11s %9s %6s %7s\n", "shape", "r", "elements", "plain", "floor", "%floor",
              "clip+check", "floor", "%floor", "ratio");

  AdamWConfig plain;
  plain.skip_nonfinite = false;  // no statistics pass
  AdamWConfig guarded;
  guarded.max_grad_norm = 1.0f;  // clips: the random gradients' norm is larger
  for (const bench::Shape& s : bench::kShapes) {
    if (!wanted.empty() && std::find(wanted.begin(), wanted.end(), s.name) == wanted.end()) continue;
    for (const std::int64_t rank : ranks) {
      Adapters adapters(s, rank, stream);
      const double n = static_cast<double>(adapters.elements());
      const double plain_ms = time_step(adapters, plain, iters, stream);
      const double guarded_ms = time_step(adapters, guarded, iters, stream);
      const double plain_floor = 30.0 * n / (copy_gbps * 1e6), guarded_floor = 34.0 * n / (copy_gbps * 1e6);
      std::printf("%-20s %3lld %11.0f %9.3f %9.3f %5.0f%% %11.3f %9.3f %5.0f%% %7.2f\n", s.name.c_str(),
                  static_cast<long long>(rank), n, plain_ms, plain_floor, 100.0 * plain_floor / plain_ms, guarded_ms,
                  guarded_floor, 100.0 * guarded_floor / guarded_ms, guarded_ms / plain_ms);
      std::fflush(stdout);
    }
  }
  cudaStreamDestroy(stream);
  return 0;
}
