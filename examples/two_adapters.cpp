// The main example: a small MoE expert layer (8 experts, 256 → 128) with two LoRA adapters.
// Forward, backward and a few AdamW steps that fit the adapters to a teacher, printing what
// happens. Runs on the GPU when this binary was built with nvcc and a GPU is present, else on the
// CPU reference backend. Usage: two_adapters [--cpu]
#include <cmath>
#include <cstdio>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "moelora/moelora.hpp"

namespace {

using namespace moelora;

constexpr std::int64_t kExperts = 8, kIn = 256, kOut = 128, kRows = 2048;

/// Random bf16 values on the host.
std::vector<bfloat16_t> random_bf16(std::mt19937& rng, std::size_t n, float stddev) {
  std::normal_distribution<float> normal(0.0f, stddev);
  std::vector<bfloat16_t> v(n);
  for (auto& x : v) x = bfloat16_t(normal(rng));
  return v;
}

/// Skewed routing: expert e gets a share ∝ 1/(e+1), expert 5 gets none.
std::vector<std::int64_t> routed_counts() {
  std::vector<double> w(kExperts);
  for (std::int64_t e = 0; e < kExperts; ++e) w[static_cast<std::size_t>(e)] = e == 5 ? 0.0 : 1.0 / double(e + 1);
  double total = 0.0;
  for (double x : w) total += x;
  std::vector<std::int64_t> counts(kExperts);
  std::int64_t given = 0;
  for (std::size_t e = 0; e < counts.size(); ++e) given += counts[e] = std::int64_t(double(kRows) * w[e] / total);
  counts[0] += kRows - given;
  return counts;
}

/// Everything in one backend's memory: upload/download helpers and the training loop.
template <class Backend, class Base>
int train(Base base, typename Backend::stream_type stream) {
  using Layer = GroupedLoRA<Base>;
  std::mt19937 rng(2026);
  const auto counts = routed_counts();
  const ExpertCounts tokens_per_expert = expert_counts(counts.data(), kExperts);
  const auto upload = [&](const std::vector<bfloat16_t>& host) {
    Buffer<Backend> b(host.size() * sizeof(bfloat16_t));
    Backend::copy_from_host(b.data(), host.data(), b.bytes(), stream);
    return b;
  };
  const auto download = [&](const Buffer<Backend>& b) {
    std::vector<bfloat16_t> host(b.bytes() / sizeof(bfloat16_t));
    Backend::copy_to_host(host.data(), b.data(), b.bytes(), stream);
    return host;
  };
  const auto ref = [](const Buffer<Backend>& b, std::int64_t cols) {
    return TensorRef{b.data(), DType::bf16, {kRows, cols}};
  };

  Layer layer(std::move(base));
  Buffer<Backend> x = upload(random_bf16(rng, kRows * kIn, 1.0f));
  Buffer<Backend> y(kRows * kOut * sizeof(bfloat16_t)), dy(kRows * kOut * sizeof(bfloat16_t)), dx(kRows * kIn * sizeof(bfloat16_t));

  // The teacher's output: the base plus a hidden low-rank update per expert.
  AdapterConfig hidden;
  hidden.rank = 8;
  layer.add_adapter("hidden", hidden, stream);
  Backend::copy_from_host(layer.adapter("hidden").b.data, random_bf16(rng, kExperts * kOut * 8, 0.05f).data(),
                          kExperts * kOut * 8 * sizeof(bfloat16_t), stream);
  layer.forward(ref(x, kIn), tokens_per_expert, ref(y, kOut), stream);
  const std::vector<bfloat16_t> target = download(y);
  layer.remove_adapter("hidden");

  // Two student adapters: "style" (rank 16, bf16) and "domain" (rank 4, fp32 factors, scale 2).
  AdapterConfig style;
  style.rank = 16;
  AdapterConfig domain;
  domain.rank = 4;
  domain.scale = 2.0;
  domain.lora_dtype = "float32";
  layer.add_adapter("style", style, stream);
  layer.add_adapter("domain", domain, stream);
  for (const auto& name : layer.adapter_names()) {
    const AdapterView v = layer.adapter(name);
    std::printf("adapter %-7s rank %2lld  dtype %s  scale %.1f  A %lldx%lldx%lld  B %lldx%lldx%lld\n", name.c_str(),
                static_cast<long long>(v.config.rank), std::string(dtype_name(v.config.dtype)).c_str(), v.config.scale,
                static_cast<long long>(v.a.shape[0]), static_cast<long long>(v.a.shape[1]),
                static_cast<long long>(v.a.shape[2]), static_cast<long long>(v.b.shape[0]),
                static_cast<long long>(v.b.shape[1]), static_cast<long long>(v.b.shape[2]));
  }

  AdamW<Layer> optimizer({3e-3f});
  double first_loss = 0.0, loss = 0.0;
  for (int step = 0; step <= 60; ++step) {
    layer.forward(ref(x, kIn), tokens_per_expert, ref(y, kOut), stream);
    const std::vector<bfloat16_t> out = download(y);
    std::vector<bfloat16_t> grad(out.size());
    loss = 0.0;
    for (std::size_t i = 0; i < out.size(); ++i) {
      const float d = static_cast<float>(out[i]) - static_cast<float>(target[i]);
      loss += 0.5 * double(d) * d / double(kRows);
      grad[i] = bfloat16_t(d / float(kRows));
    }
    if (step == 0) first_loss = loss;
    if (step % 10 == 0) std::printf("step %2d  loss %.5f\n", step, loss);
    if (step == 60) break;
    Backend::copy_from_host(dy.data(), grad.data(), dy.bytes(), stream);
    layer.backward(ref(x, kIn), tokens_per_expert, ref(dy, kOut), ref(dx, kIn), stream,
                   WriteMode::overwrite);  // fresh gradients: no zero_grad before it
    optimizer.step(layer, stream);
  }
  layer.set_enabled("domain", false);
  layer.forward(ref(x, kIn), tokens_per_expert, ref(y, kOut), stream);
  std::printf("trained %lld steps: loss %.5f -> %.5f (%.1f%% of the start)\n",
              static_cast<long long>(optimizer.steps("style", stream)), first_loss, loss, 100.0 * loss / first_loss);
  std::printf("\"domain\" disabled: the layer now adds only \"style\"\n");
  return loss < first_loss ? 0 : 1;
}

std::vector<bfloat16_t> base_weights() {
  std::mt19937 rng(7);
  return random_bf16(rng, kExperts * kOut * kIn, 0.05f);
}

int run_on_cpu() {
  std::puts("backend: host (CPU reference)");
  GroupedLinear<HostBackend> base(kExperts, kIn, kOut, DType::bf16);
  const auto w = base_weights();
  base.set_weight({w.data(), DType::bf16, {kExperts, kOut, kIn}}, {});
  return train<HostBackend>(std::move(base), HostStream{});
}

#if defined(__CUDACC__)
int run_on_gpu() {
  cudaDeviceProp prop{};
  MOELORA_CUDA_CHECK(cudaGetDeviceProperties(&prop, 0));
  std::printf("backend: cuda (%s)\n", prop.name);
  cudaStream_t stream;
  cublasHandle_t handle;
  MOELORA_CUDA_CHECK(cudaStreamCreate(&stream));
  MOELORA_CUBLAS_CHECK(cublasCreate(&handle));
  int status;
  {
    GroupedLinear<CudaBackend> base(handle, kExperts, kIn, kOut, DType::bf16);
    const auto w = base_weights();
    base.set_weight({w.data(), DType::bf16, {kExperts, kOut, kIn}}, stream);
    status = train<CudaBackend>(std::move(base), stream);
  }
  cublasDestroy(handle);
  cudaStreamDestroy(stream);
  return status;
}
#endif

}  // namespace

int main(int argc, char** argv) {
  const bool force_cpu = argc > 1 && std::strcmp(argv[1], "--cpu") == 0;
  try {
#if defined(__CUDACC__)
    int devices = 0;
    if (!force_cpu && cudaGetDeviceCount(&devices) == cudaSuccess && devices > 0) return run_on_gpu();
#endif
    (void)force_cpu;
    return run_on_cpu();
  } catch (const moelora::Error& e) {
    std::fprintf(stderr, "%s\n", e.what());
    return 1;
  }
}
