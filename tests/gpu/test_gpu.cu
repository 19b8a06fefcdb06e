// The CUDA backend: every behaviour test with host and with device counts, plus what only the GPU
// has (sync-free device counts and their validation, bit-identical init, AdamW against the host).
// Exits 77 (Meson: SKIP) when no GPU is present.
#define DOCTEST_CONFIG_IMPLEMENT
#include <doctest/doctest.h>

#include <cstdio>

#include "cases/layer_cases.hpp"
#include "support/cuda_harness.cuh"

using namespace moelora;
using namespace moelora::testing;

MOELORA_LAYER_CASES(CudaHarness);
MOELORA_LAYER_CASES(CudaDeviceCountsHarness);

TEST_CASE("kaiming_zeros init is bit-identical on the GPU and the host") {
  for (const char* dtype : {"bf16", "fp16", "fp32"}) {
    CudaHarness gpu;
    HostHarness host;
    Rng rng;
    const HostTensor w = random_tensor(rng, DType::bf16, {3, 40, 72});
    CudaHarness::Layer gpu_layer(gpu.make_base(w));
    HostHarness::Layer host_layer(host.make_base(w));
    AdapterConfig c;
    c.rank = 12;
    c.lora_dtype = dtype;
    c.seed = 1234567;
    gpu_layer.add_adapter("a", c, gpu.stream());
    host_layer.add_adapter("a", c, host.stream());
    CHECK(gpu.download(gpu_layer.adapter("a").a).values == host.download(host_layer.adapter("a").a).values);
    CHECK(gpu.download(gpu_layer.adapter("a").b).values == host.download(host_layer.adapter("a").b).values);
  }
}

namespace {

/// One adapter (scale 0.5) of the tensor-core kernels: its rank, counts and dtypes.
struct Sized {
  std::int64_t rank;
  Spread spread;
  DType io;
  const char* factor;
};

/// The forward (twice, the same bits) against fp64, then the backward accumulating and overwriting,
/// of adapter `c` on `experts` experts of `in` → `out` with `rows` rows.
void check_sized(const Sized& c, std::int64_t experts, std::int64_t in, std::int64_t out, std::int64_t rows) {
  Problem<CudaHarness> p(experts, in, out, rows, c.io, c.spread);
  INFO("seed " << p.rng.seed << " rank " << c.rank << " spread " << static_cast<int>(c.spread));
  auto [a, b] = p.add_random("ad", adapter_config(c.rank, 0.5, c.factor));
  const Reference ref = p.reference();
  const std::vector<RefAdapter> adapters{{&a, &b, 0.5f}};
  const double tol = std::max(tolerance(c.io), tolerance(a.dtype));
  const HostTensor y = p.forward();
  CHECK(relative_error(y.values, ref.forward(p.x, adapters)) < tol);
  CHECK(p.forward().values == y.values);  // K slices (at most two) add in either order to the same sum

  const HostTensor dy = random_tensor(p.rng, c.io, {p.rows, p.out});
  p.check_backward(ref, adapters, dy, "ad", tol);
  p.check_backward(ref, adapters, dy, "ad", tol, WriteMode::overwrite);
}

}  // namespace

TEST_CASE("tensor-core kernels at sizes that slice K and share an expert across row groups") {
  // K ≥ 1024 with few row tiles: the forward and the backward's u projection run in K slices; one
  // expert with more than kGroupRows rows: its backward row groups add their gradients atomically
  // (onto zeros written first when overwriting).
  for (const Sized& c : {Sized{32, Spread::uniform, DType::bf16, "bf16"}, Sized{64, Spread::one_expert, DType::bf16, "bf16"},
                         Sized{128, Spread::skewed, DType::fp16, "fp16"}})
    check_sized(c, 3, 1088, 1056, 1100);
}

TEST_CASE("the backward's pass over dy: u and dB in one grid at row counts that fill the GPU") {
  // Enough 64-row half tiles (≥ 2 an SM on up to 160 SMs) that the u projection needs no K slices:
  // at rank tiles below 64 u and dB run as one grid (lora_dy_pass_kernel). out = 264: a partial last
  // dB slice; skewed counts: empty experts and experts of several row groups (atomic dB, over zeros
  // when overwriting); fp16 factors on bf16 activations: the unfused layer (dx from the x pass).
  for (const Sized& c : {Sized{8, Spread::skewed, DType::bf16, "bf16"}, Sized{16, Spread::uniform, DType::fp16, "fp16"},
                         Sized{32, Spread::one_expert, DType::bf16, "bf16"}, Sized{24, Spread::skewed, DType::bf16, "fp16"}})
    check_sized(c, 6, 72, 264, 21000);
}

TEST_CASE("the tensor-core forward captured in a CUDA graph replays the stream's result bit for bit") {
  // The expand kernel is a programmatic dependent of the projection; with few row tiles and
  // K ≥ 1024 the projection also runs in two K slices (zeroing, atomics, rounding pass).
  struct Sized {
    std::int64_t experts, in, out, rows, rank;
  };
  for (const Sized& c : {Sized{5, 64, 48, 300, 16}, Sized{3, 1088, 1056, 1100, 32}, Sized{4, 1024, 520, 700, 64}}) {
    CudaDeviceCountsHarness h;
    Rng rng;
    INFO("seed " << rng.seed << " rank " << c.rank << " in " << c.in);
    const auto x = h.upload(random_tensor(rng, DType::bf16, {c.rows, c.in}));
    const auto a = h.upload(random_tensor(rng, DType::bf16, {c.experts, c.rank, c.in}, 0.5f));
    const auto b = h.upload(random_tensor(rng, DType::bf16, {c.experts, c.out, c.rank}, 0.5f));
    const ExpertCounts counts = h.counts(make_counts(rng, c.experts, c.rows, Spread::skewed));
    auto h_stream = h.poisoned(DType::bf16, {c.rows, c.rank}), y_stream = h.poisoned(DType::bf16, {c.rows, c.out});
    auto h_graph = h.poisoned(DType::bf16, {c.rows, c.rank}), y_graph = h.poisoned(DType::bf16, {c.rows, c.out});
    CudaBackend::Workspace workspace;
    workspace.reserve(c.rows, c.experts, c.rank);
    const auto forward = [&](void* saved_h, void* y) {
      workspace.prepare_segments(counts, c.rows, h.stream());
      CudaBackend::lora_forward({{c.experts, c.in, c.out, c.rows, DType::bf16},
                                 {a.ref().data, b.ref().data, DType::bf16, c.rank, 0.5f},
                                 x.ref().data,
                                 y,
                                 saved_h,
                                 WriteMode::overwrite},
                                workspace, h.stream());
    };
    forward(h_stream.ref().data, y_stream.ref().data);

    cudaGraph_t graph = nullptr;
    cudaGraphExec_t exec = nullptr;
    MOELORA_CUDA_CHECK(cudaStreamBeginCapture(h.stream(), cudaStreamCaptureModeThreadLocal));
    forward(h_graph.ref().data, y_graph.ref().data);
    MOELORA_CUDA_CHECK(cudaStreamEndCapture(h.stream(), &graph));
    MOELORA_CUDA_CHECK(cudaGraphInstantiate(&exec, graph, 0));
    for (int replay = 0; replay < 2; ++replay) {  // y is overwritten: every replay gives the same y
      MOELORA_CUDA_CHECK(cudaGraphLaunch(exec, h.stream()));
      CHECK(h.download(h_graph.ref()).values == h.download(h_stream.ref()).values);
      CHECK(h.download(y_graph.ref()).values == h.download(y_stream.ref()).values);
    }
    cudaGraphExecDestroy(exec);
    cudaGraphDestroy(graph);
    CHECK_NOTHROW(workspace.check_counts(h.stream()));
  }
}

TEST_CASE("device counts: bad counts are reported by check_counts and nothing is touched out of bounds") {
  Problem<CudaDeviceCountsHarness> p(4, 64, 32, 100, DType::bf16);
  p.add_random("ad", adapter_config(16));
  p.forward();
  CHECK_NOTHROW(p.layer->workspace().check_counts(p.h.stream()));
  std::vector<std::int64_t> bad = p.counts;
  bad[0] += 1000;  // Σ ≠ T: a naive kernel would run past x and y
  auto y = p.h.poisoned(DType::bf16, {100, 32});
  // The scan records the bad counts and leaves an empty schedule (all offsets zero): neither the
  // base (its GEMM sizes come from the offsets) nor the LoRA kernels touch a row, and check_counts
  // says why.
  p.layer->forward(p.x_dev.ref(), p.h.counts(bad), y.ref(), p.h.stream());
  CHECK_THROWS_WITH_AS(p.layer->workspace().check_counts(p.h.stream()),
                       doctest::Contains("did not sum to the number of rows"), Error);
  bad = p.counts;
  bad[1] = -bad[1] - 1, bad[2] += 2 * p.counts[1] + 1;
  p.layer->forward(p.x_dev.ref(), p.h.counts(bad), y.ref(), p.h.stream());
  CHECK_THROWS_WITH_AS(p.layer->workspace().check_counts(p.h.stream()), doctest::Contains("negative entry"), Error);
  CHECK_NOTHROW(p.layer->workspace().check_counts(p.h.stream()));  // the status was reset
}

TEST_CASE("AdamW on the GPU follows the host within fp32 rounding") {
  CudaHarness gpu;
  HostHarness host;
  Rng rng;
  const HostTensor w = random_tensor(rng, DType::fp32, {2, 32, 64}, 0.1f);
  CudaHarness::Layer gpu_layer(gpu.make_base(w));
  HostHarness::Layer host_layer(host.make_base(w));
  AdapterConfig c;
  c.rank = 8;
  c.lora_dtype = "bf16";
  gpu_layer.add_adapter("a", c, gpu.stream());
  host_layer.add_adapter("a", c, host.stream());
  const HostTensor ga = random_tensor(rng, DType::fp32, {2, 8, 64});
  const HostTensor gb = random_tensor(rng, DType::fp32, {2, 32, 8});
  AdamW<CudaHarness::Layer> gpu_opt({1e-2f, 0.9f, 0.999f, 1e-8f, 0.1f});
  AdamW<HostHarness::Layer> host_opt(gpu_opt.config());
  for (int step = 0; step < 5; ++step) {
    gpu.write(gpu_layer.adapter("a").grad_a, ga), gpu.write(gpu_layer.adapter("a").grad_b, gb);
    host.write(host_layer.adapter("a").grad_a, ga), host.write(host_layer.adapter("a").grad_b, gb);
    gpu_opt.step(gpu_layer, gpu.stream());
    host_opt.step(host_layer, host.stream());
  }
  CHECK(relative_error(gpu.download(gpu_layer.adapter("a").a).values, host.download(host_layer.adapter("a").a).values) < 1e-2);
  CHECK(relative_error(gpu.download(gpu_layer.adapter("a").b).values, host.download(host_layer.adapter("a").b).values) < 1e-2);
}

int main(int argc, char** argv) {
  int devices = 0;
  if (cudaGetDeviceCount(&devices) != cudaSuccess || devices == 0) {
    std::puts("moelora_gpu_tests: no CUDA device, skipping");
    return 77;
  }
  doctest::Context context(argc, argv);
  return context.run();
}
