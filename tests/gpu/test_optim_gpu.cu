// The optimizer step on the CUDA backend: every shared case (resume bit for bit, clipping, non-finite
// skips, loss scaling, schedule, bad files), agreement with the host backend, the MSE loss kernel
// bit for bit against the host, and a step with clipping and the finite check captured in a CUDA
// graph and replayed (finite and skipped steps). The doctest main (and the no-GPU skip) is in test_gpu.cu.
#include <doctest/doctest.h>

#include <cmath>
#include <limits>

#include "cases/optim_cases.hpp"
#include "support/cuda_harness.cuh"

using namespace moelora;
using namespace moelora::testing;

MOELORA_OPTIM_CASES(CudaHarness);

TEST_CASE("optimizer: the GPU follows the host within fp32 rounding (clipping, schedule, weight decay, a skipped step)") {
  Training<CudaHarness> gpu;
  Training<HostHarness> host;
  INFO("seed " << gpu.rng.seed);
  auto gpu_layer = gpu.make_layer();
  auto host_layer = host.make_layer();
  for (const char* name : {"style", "domain"}) {  // the same starting factors on both
    host.h.write(host_layer.adapter(name).a, gpu.h.download(gpu_layer.adapter(name).a));
    host.h.write(host_layer.adapter(name).b, gpu.h.download(gpu_layer.adapter(name).b));
  }
  AdamW<CudaHarness::Layer> gpu_opt(busy_config());
  AdamW<HostHarness::Layer> host_opt(busy_config());
  Rng rng;
  for (int step = 0; step < 6; ++step) {
    for (const char* name : {"style", "domain"}) {
      const AdapterView g = gpu_layer.adapter(name), h = host_layer.adapter(name);
      for (const auto& [gt, ht] : {std::pair{g.grad_a, h.grad_a}, std::pair{g.grad_b, h.grad_b}}) {
        HostTensor values = random_tensor(rng, DType::fp32, gt.shape, 0.1f);
        if (step == 3 && std::string(name) == "domain") values[1] = std::numeric_limits<float>::quiet_NaN();
        gpu.h.write(gt, values);
        host.h.write(ht, values);
      }
    }
    gpu_opt.step(gpu_layer, gpu.h.stream());
    host_opt.step(host_layer, host.h.stream());
    const float gpu_norm = gpu_opt.last_norm(gpu.h.stream()), host_norm = host_opt.last_norm(host.h.stream());
    if (step == 3) {
      CHECK(std::isnan(gpu_norm));
      CHECK(std::isnan(host_norm));
    } else {
      CHECK(std::abs(gpu_norm - host_norm) <= 1e-6f * host_norm);
    }
  }
  CHECK(gpu_opt.counters(gpu.h.stream()) == host_opt.counters(host.h.stream()));
  for (const char* name : {"style", "domain"}) {
    CHECK(relative_error(gpu.h.download(gpu_layer.adapter(name).a).values, host.h.download(host_layer.adapter(name).a).values) < 1e-2);
    CHECK(relative_error(gpu.h.download(gpu_layer.adapter(name).b).values, host.h.download(host_layer.adapter(name).b).values) < 1e-2);
    const AdamWAdapterState gs = *gpu_opt.state(name), hs = *host_opt.state(name);
    CHECK(relative_error(gpu.h.download(gs.a.m).values, host.h.download(hs.a.m).values) < 1e-5);
    CHECK(relative_error(gpu.h.download(gs.b.v).values, host.h.download(hs.b.v).values) < 1e-5);
  }
}

TEST_CASE("MSE loss on the GPU: dy bit for bit the host's, the loss within fp64 rounding") {
  CudaHarness gpu;
  Rng rng;
  INFO("seed " << rng.seed);
  for (const DType dtype : kAllDTypes) {
    for (const std::int64_t count : {std::int64_t{1}, std::int64_t{4099}, std::int64_t{1} << 20}) {
      const HostTensor y = random_tensor(rng, dtype, {count}), target = random_tensor(rng, dtype, {count});
      const float scale = 4096.0f;
      auto y_dev = gpu.upload(y), t_dev = gpu.upload(target), dy_dev = gpu.poisoned(dtype, {count});
      auto scale_dev = gpu.upload(HostTensor(DType::fp32, {1}, scale));
      Buffer<CudaBackend> sum_dev(sizeof(double));
      CudaBackend::fill_zero(sum_dev.data(), sizeof(double), gpu.stream());
      loss::mse_loss({y_dev.ref().data, t_dev.ref().data, dy_dev.ref().data, dtype, count, 1.0f / static_cast<float>(count),
                      static_cast<const float*>(scale_dev.ref().data), sum_dev.as<double>()},
                     gpu.stream());
      HostTensor dy(dtype, {count});
      double host_sum = 0.0, gpu_sum = 0.0;
      std::vector<std::byte> yb = y.encode(), tb = target.encode(), db = dy.encode();
      loss::mse_loss({yb.data(), tb.data(), db.data(), dtype, count, 1.0f / static_cast<float>(count), &scale, &host_sum}, HostStream{});
      dy.decode(db);
      CHECK(gpu.download(dy_dev.ref()).values == dy.values);
      CudaBackend::copy_to_host(&gpu_sum, sum_dev.data(), sizeof(double), gpu.stream());
      CHECK(std::abs(gpu_sum - host_sum) <= 1e-12 * host_sum);
    }
  }
}

TEST_CASE("CUDA graph: a step with clipping and the finite check, captured once, replays like eager steps; a "
          "replay on a NaN gradient skips") {
  Training<CudaHarness> t;
  INFO("seed " << t.rng.seed);
  const cudaStream_t stream = t.h.stream();
  auto eager = t.make_layer(), graphed = t.make_layer();
  AdamW<CudaHarness::Layer> eager_opt(busy_config()), graphed_opt(busy_config());
  t.step(eager, eager_opt, 0);
  t.step(graphed, graphed_opt, 0);  // the first step allocates the state and uploads the tensor table

  cudaGraph_t graph = nullptr;
  cudaGraphExec_t exec = nullptr;
  MOELORA_CUDA_CHECK(cudaStreamBeginCapture(stream, cudaStreamCaptureModeGlobal));
  graphed_opt.step(graphed, stream);
  MOELORA_CUDA_CHECK(cudaStreamEndCapture(stream, &graph));
  MOELORA_CUDA_CHECK(cudaGraphInstantiate(&exec, graph, 0));
  for (int i = 1; i <= 5; ++i) {
    const bool bad = i == 3;
    t.step(eager, eager_opt, i, bad);
    t.gradients(graphed, graphed_opt, i);
    if (bad) t.plant(graphed, "style", 2 * 8 * Training<CudaHarness>::kIn + 5, std::numeric_limits<float>::quiet_NaN());
    MOELORA_CUDA_CHECK(cudaGraphLaunch(exec, stream));
    const float graphed_norm = graphed_opt.last_norm(stream), eager_norm = eager_opt.last_norm(stream);
    CHECK((bad ? std::isnan(graphed_norm) && std::isnan(eager_norm) : graphed_norm == eager_norm));
    CHECK(t.snapshot(graphed, graphed_opt) == t.snapshot(eager, eager_opt));
  }
  CHECK(graphed_opt.counters(stream).skipped == 1);
  CHECK(graphed_opt.counters(stream).step == 5);
  MOELORA_CUDA_CHECK(cudaGraphExecDestroy(exec));
  MOELORA_CUDA_CHECK(cudaGraphDestroy(graph));
}
