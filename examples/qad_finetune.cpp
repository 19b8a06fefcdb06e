// QAD (quantization-aware distillation) of one MoE expert layer with a LoRA sidecar: the main
// example. The teacher is a bf16 expert layer; the student computes with the teacher's weights
// quantized (NVFP4 by default) plus a bf16 LoRA initialised from the quantization residual
// (svdquant by default), and the LoRA is trained with AdamW to match the teacher's output on routed
// batches. Prints a progress bar with the loss, then the student's relative output error when
// quantized only, after the init and after training, and writes the trained adapter.
//
// Teacher weights: synthetic (below) or a user's checkpoint: --teacher PATH --pattern KEY_PATTERN
// [--layer L], e.g. --pattern 'model.layers.{L}.mlp.experts.{e}.down_proj.weight'.
//
// Synthetic data, made to look like a real MoE layer's:
// - weights: N(0, 0.02²) per expert, with 1% of the input channels scaled ×10 (outlier channels);
// - activations: x = P z + μ_e + 0.2·ε, where P `[in, 32]` spans a random 32-dimensional subspace
//   with a decaying spectrum (column j scaled by (1 + j)^-½) that holds most of the energy, z and ε
//   are standard normal, μ_e is a small per-expert offset (the router sends similar tokens to the
//   same expert), and 8 activation channels are scaled ×20 (activation outliers);
// - routing: Zipf-like skew, expert e (in a random order) getting ∝ 1/(1+e)^1.1 of each batch.
//
// Runs on the GPU when built with nvcc and a GPU is present (else, or with --cpu, on the CPU).
#include <CLI/CLI.hpp>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <numeric>
#include <optional>
#include <random>
#include <string>
#include <vector>

#include "moelora/io/expert_weights.hpp"
#include "moelora/io/state_dict.hpp"
#include "moelora/moelora.hpp"

namespace {

using namespace moelora;

struct Options {
  std::int64_t experts = 8, in = 1024, out = 512, rank = 16, rows = 2048, steps = 120, batches = 8;
  std::string format = "nvfp4", init = "svdquant", lora_dtype = "bf16", output = "qad_adapter.safetensors";
  std::string teacher, pattern;
  std::optional<std::int64_t> layer;
  float lr = 2e-3f;
  std::uint64_t seed = 2026;
  bool cpu = false;
};

/// One routed batch on the host: rows grouped by expert, and its tokens_per_expert.
struct Batch {
  std::vector<bfloat16_t> x;  // [rows, in]
  std::vector<std::int64_t> counts;
};

/// The synthetic activation generator of the file comment.
class ActivationSource {
 public:
  ActivationSource(const Options& o, std::mt19937_64& rng) : o_(o), basis_(static_cast<std::size_t>(o.in * kDims)) {
    std::normal_distribution<float> normal;
    for (std::int64_t i = 0; i < o.in; ++i)
      for (std::int64_t j = 0; j < kDims; ++j)
        basis_[static_cast<std::size_t>(i * kDims + j)] = normal(rng) / std::sqrt(float(1 + j));
    means_.resize(static_cast<std::size_t>(o.experts * o.in));
    for (float& m : means_) m = 0.2f * normal(rng);
    std::vector<std::int64_t> channels(static_cast<std::size_t>(o.in));
    std::iota(channels.begin(), channels.end(), 0);
    std::shuffle(channels.begin(), channels.end(), rng);
    outliers_.assign(channels.begin(), channels.begin() + std::min<std::int64_t>(8, o.in));
    shares_.resize(static_cast<std::size_t>(o.experts));
    for (std::size_t e = 0; e < shares_.size(); ++e) shares_[e] = 1.0 / std::pow(double(e + 1), 1.1);
    std::shuffle(shares_.begin(), shares_.end(), rng);
  }

  Batch next(std::mt19937_64& rng) const {
    std::normal_distribution<float> normal;
    Batch b{std::vector<bfloat16_t>(static_cast<std::size_t>(o_.rows * o_.in)), routed(rng)};
    std::vector<float> z(kDims), row(static_cast<std::size_t>(o_.in));
    for (std::int64_t e = 0, t = 0; e < o_.experts; ++e)
      for (std::int64_t n = 0; n < b.counts[static_cast<std::size_t>(e)]; ++n, ++t) {
        for (float& v : z) v = normal(rng);
        for (std::int64_t i = 0; i < o_.in; ++i) {
          float v = means_[static_cast<std::size_t>(e * o_.in + i)] + 0.2f * normal(rng);
          for (std::int64_t j = 0; j < kDims; ++j) v += basis_[static_cast<std::size_t>(i * kDims + j)] * z[j];
          row[static_cast<std::size_t>(i)] = v;
        }
        for (const std::int64_t c : outliers_) row[static_cast<std::size_t>(c)] *= 20.0f;
        for (std::int64_t i = 0; i < o_.in; ++i)
          b.x[static_cast<std::size_t>(t * o_.in + i)] = bfloat16_t(row[static_cast<std::size_t>(i)]);
      }
    return b;
  }

 private:
  static constexpr std::int64_t kDims = 32;

  std::vector<std::int64_t> routed(std::mt19937_64& rng) const {
    std::vector<std::int64_t> counts(shares_.size());
    std::discrete_distribution<std::size_t> pick(shares_.begin(), shares_.end());
    for (std::int64_t t = 0; t < o_.rows; ++t) ++counts[pick(rng)];
    return counts;
  }

  const Options& o_;
  std::vector<float> basis_, means_, shares_;
  std::vector<std::int64_t> outliers_;
};

/// Teacher weights `[E, out, in]` in bf16: synthetic, or read from the user's checkpoint.
std::vector<bfloat16_t> teacher_weights(Options& o, std::mt19937_64& rng) {
  std::vector<float> w;
  if (!o.teacher.empty()) {
    io::ExpertWeights loaded = io::load_expert_weights(o.teacher, o.pattern, o.layer);
    std::printf("teacher: %lld experts of [%lld, %lld] from %s\n", static_cast<long long>(loaded.experts),
                static_cast<long long>(loaded.out), static_cast<long long>(loaded.in), o.teacher.c_str());
    o.experts = loaded.experts, o.out = loaded.out, o.in = loaded.in;
    w = std::move(loaded.values);
  } else {
    std::normal_distribution<float> normal(0.0f, 0.02f);
    w.resize(static_cast<std::size_t>(o.experts * o.out * o.in));
    for (float& v : w) v = normal(rng);
    for (std::int64_t c = 0; c < o.in; ++c)
      if (c % 100 == 37)  // 1% of the input channels
        for (std::int64_t row = 0; row < o.experts * o.out; ++row) w[static_cast<std::size_t>(row * o.in + c)] *= 10.0f;
  }
  return {w.begin(), w.end()};
}

/// The training loss is kLossScale · MSE, so that gradients stay far above AdamW's eps.
constexpr double kLossScale = 1e4;

/// `‖a − b‖ / ‖b‖` over bf16 arrays; optionally the MSE and the loss gradient into `dy`.
double compare(const std::vector<bfloat16_t>& a, const std::vector<bfloat16_t>& b, std::vector<bfloat16_t>* dy,
               double* mse) {
  double diff = 0.0, norm = 0.0;
  const double n = static_cast<double>(a.size());
  for (std::size_t i = 0; i < a.size(); ++i) {
    const double d = double(static_cast<float>(a[i])) - static_cast<float>(b[i]);
    diff += d * d, norm += double(static_cast<float>(b[i])) * static_cast<float>(b[i]);
    if (dy) (*dy)[i] = bfloat16_t(static_cast<float>(kLossScale * 2.0 * d / n));
  }
  if (mse) *mse = diff / n;
  return std::sqrt(diff / norm);
}

void progress(std::int64_t step, std::int64_t steps, double mse) {
  constexpr int kWidth = 30;
  const int done = static_cast<int>(kWidth * (step + 1) / steps);
  std::printf("\r  [%s%s] step %4lld/%lld  loss %.3e", std::string(static_cast<std::size_t>(done), '#').c_str(),
              std::string(static_cast<std::size_t>(kWidth - done), '.').c_str(), static_cast<long long>(step + 1),
              static_cast<long long>(steps), mse);
  std::fflush(stdout);
}

/// The QAD run on one backend; `Teacher` and `Student` are bases in its memory.
template <class Backend, class Teacher, class Student>
int distill(const Options& o, Teacher teacher, Student student, const ActivationSource& source, std::mt19937_64& rng,
            typename Backend::stream_type stream) {
  using Layer = GroupedLoRA<Student>;
  const auto upload = [&](const auto& host) {
    Buffer<Backend> b(host.size() * sizeof(host[0]));
    Backend::copy_from_host(b.data(), host.data(), b.bytes(), stream);
    return b;
  };
  const auto download = [&](const Buffer<Backend>& b) {
    std::vector<bfloat16_t> host(b.bytes() / sizeof(bfloat16_t));
    Backend::copy_to_host(host.data(), b.data(), b.bytes(), stream);
    return host;
  };
  const auto rows_of = [&](const Buffer<Backend>& b, std::int64_t cols) {
    return TensorRef{b.data(), DType::bf16, {o.rows, cols}};
  };

  // Fixed training batches, a held-out evaluation batch, and the teacher's outputs for each.
  struct Prepared {
    Buffer<Backend> x;
    std::vector<std::int64_t> counts;
    std::vector<bfloat16_t> y_teacher;
  };
  Buffer<Backend> y(static_cast<std::size_t>(o.rows * o.out) * sizeof(bfloat16_t));
  GroupedLoRA<Teacher> teacher_layer(std::move(teacher));  // no adapters: the teacher's own output
  const auto prepare = [&](Batch b) {
    Prepared p{upload(b.x), std::move(b.counts), {}};
    teacher_layer.forward(rows_of(p.x, o.in), expert_counts(p.counts.data(), o.experts), rows_of(y, o.out), stream);
    p.y_teacher = download(y);
    return p;
  };
  std::vector<Prepared> batches;
  for (std::int64_t i = 0; i < o.batches; ++i) batches.push_back(prepare(source.next(rng)));
  const Prepared eval = prepare(source.next(rng));

  Layer layer(std::move(student));
  const auto error_on = [&](const Prepared& p) {
    layer.forward(rows_of(p.x, o.in), expert_counts(p.counts.data(), o.experts), rows_of(y, o.out), stream);
    return compare(download(y), p.y_teacher, nullptr, nullptr);
  };
  AdapterConfig config;
  config.rank = o.rank;
  config.lora_dtype = o.lora_dtype;
  config.init = parse_init_method(o.init);
  const auto start = std::chrono::steady_clock::now();
  const init::InitReport report = layer.add_adapter("qad", config, stream);
  const double init_seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  if (!report.init_error.empty())
    std::printf("init %s, rank %lld: weight error %.2f%% -> %.2f%% (rms over experts) in %.2f s\n", o.init.c_str(),
                static_cast<long long>(o.rank), 100.0 * init::InitReport::rms(report.quantized_error),
                100.0 * init::InitReport::rms(report.init_error), init_seconds);
  layer.set_enabled("qad", false);
  const double quantized_only = error_on(eval);
  layer.set_enabled("qad", true);
  const double after_init = error_on(eval);

  AdamW<Layer> optimizer(AdamWConfig{o.lr});
  std::vector<bfloat16_t> dy_host(static_cast<std::size_t>(o.rows * o.out));
  Buffer<Backend> dy(dy_host.size() * sizeof(bfloat16_t));
  std::printf("training %lld steps on %lld routed batches of %lld rows (AdamW, lr %.1e)\n",
              static_cast<long long>(o.steps), static_cast<long long>(o.batches), static_cast<long long>(o.rows),
              static_cast<double>(o.lr));
  const auto train_start = std::chrono::steady_clock::now();
  for (std::int64_t step = 0; step < o.steps; ++step) {
    const Prepared& b = batches[static_cast<std::size_t>(step % o.batches)];
    const ExpertCounts counts = expert_counts(b.counts.data(), o.experts);
    layer.forward(rows_of(b.x, o.in), counts, rows_of(y, o.out), stream);
    double mse = 0.0;
    compare(download(y), b.y_teacher, &dy_host, &mse);
    Backend::copy_from_host(dy.data(), dy_host.data(), dy.bytes(), stream);
    // One micro-batch per step: the backward writes fresh gradients (no zero_grad needed).
    layer.backward(rows_of(b.x, o.in), counts, rows_of(dy, o.out), TensorRef{}, stream, WriteMode::overwrite);
    optimizer.step(layer, stream);
    progress(step, o.steps, mse);
  }
  const double train_seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - train_start).count();
  const double after_training = error_on(eval);
  std::printf("\n  %.2f s (%.1f ms per step)\n\n", train_seconds, 1e3 * train_seconds / double(std::max<std::int64_t>(o.steps, 1)));

  std::printf("relative output error on a held-out batch (‖y − y_teacher‖ / ‖y_teacher‖)\n");
  std::printf("  %-28s %7.3f%%\n", ("quantized only (" + o.format + ")").c_str(), 100.0 * quantized_only);
  std::printf("  %-28s %7.3f%%\n", ("after init (" + o.init + ")").c_str(), 100.0 * after_init);
  std::printf("  %-28s %7.3f%%   (%.2f of quantized only)\n", "after training", 100.0 * after_training,
              after_training / quantized_only);
  io::save_adapters(layer, o.output, "", stream);
  std::printf("wrote the trained adapter to %s\n", o.output.c_str());
  return after_training < quantized_only ? 0 : 1;
}

int run_on_cpu(Options& o) {
  std::puts("backend: host (CPU reference)");
  std::mt19937_64 rng(o.seed);
  const std::vector<bfloat16_t> w = teacher_weights(o, rng);
  const ActivationSource source(o, rng);
  const ConstTensorRef weights{w.data(), DType::bf16, {o.experts, o.out, o.in}};
  GroupedLinear<HostBackend> teacher(o.experts, o.in, o.out, DType::bf16);
  teacher.set_weight(weights, {});
  QuantizedGroupedLinear<HostBackend> student(Linalg<HostBackend>{}, o.experts, o.in, o.out, DType::bf16,
                                              quant::FormatQuantizer<HostBackend>(quant::parse_quant_spec(o.format)));
  student.set_weight(weights, {});
  return distill<HostBackend>(o, std::move(teacher), std::move(student), source, rng, HostStream{});
}

#if defined(__CUDACC__)
int run_on_gpu(Options& o) {
  cudaDeviceProp prop{};
  MOELORA_CUDA_CHECK(cudaGetDeviceProperties(&prop, 0));
  std::printf("backend: cuda (%s)\n", prop.name);
  cudaStream_t stream;
  cublasHandle_t blas;
  cusolverDnHandle_t solver;
  MOELORA_CUDA_CHECK(cudaStreamCreate(&stream));
  MOELORA_CUBLAS_CHECK(cublasCreate(&blas));
  MOELORA_CUSOLVER_CHECK(cusolverDnCreate(&solver));
  int status;
  {
    std::mt19937_64 rng(o.seed);
    const std::vector<bfloat16_t> w = teacher_weights(o, rng);
    const ActivationSource source(o, rng);
    const ConstTensorRef weights{w.data(), DType::bf16, {o.experts, o.out, o.in}};
    GroupedLinear<CudaBackend> teacher(blas, o.experts, o.in, o.out, DType::bf16);
    teacher.set_weight(weights, stream);
    QuantizedGroupedLinear<CudaBackend> student(Linalg<CudaBackend>(blas, solver), o.experts, o.in, o.out, DType::bf16,
                                                quant::FormatQuantizer<CudaBackend>(quant::parse_quant_spec(o.format)));
    student.set_weight(weights, stream);
    status = distill<CudaBackend>(o, std::move(teacher), std::move(student), source, rng, stream);
  }
  cusolverDnDestroy(solver);
  cublasDestroy(blas);
  cudaStreamDestroy(stream);
  return status;
}
#endif

}  // namespace

int main(int argc, char** argv) {
  Options o;
  CLI::App app{"QAD of one MoE expert layer: quantized base + LoRA trained to match a bf16 teacher"};
  app.add_option("--experts", o.experts, "experts of the synthetic layer")->check(CLI::PositiveNumber);
  app.add_option("--in", o.in, "input features of the synthetic layer")->check(CLI::PositiveNumber);
  app.add_option("--out", o.out, "output features of the synthetic layer")->check(CLI::PositiveNumber);
  app.add_option("--rank", o.rank, "LoRA rank")->check(CLI::PositiveNumber);
  app.add_option("--rows", o.rows, "routed rows per batch")->check(CLI::PositiveNumber);
  app.add_option("--steps", o.steps, "AdamW steps")->check(CLI::NonNegativeNumber);
  app.add_option("--batches", o.batches, "distinct training batches (cycled)")->check(CLI::PositiveNumber);
  app.add_option("--lr", o.lr, "AdamW learning rate")->check(CLI::PositiveNumber);
  app.add_option("--format", o.format, "weight format: int8, int8_channel, int4, fp8, nvfp4, nf4, mxfp4");
  app.add_option("--init", o.init, "adapter init: kaiming_zeros, svdquant, loftq, svd_first, pissa");
  app.add_option("--lora-dtype", o.lora_dtype, "factor dtype: bf16, fp16, fp32");
  app.add_option("--teacher", o.teacher, "teacher checkpoint (.safetensors file or directory)");
  app.add_option("--pattern", o.pattern, "key pattern of one expert's weight, with {e} (and {L})");
  app.add_option("--layer", o.layer, "layer index substituted for {L}");
  app.add_option("--output", o.output, "where to write the trained adapter");
  app.add_option("--seed", o.seed, "random seed of the synthetic data");
  app.add_flag("--cpu", o.cpu, "run on the CPU even when a GPU is present");
  CLI11_PARSE(app, argc, argv);
  if (!o.teacher.empty() && o.pattern.empty()) {
    std::fprintf(stderr, "--teacher needs --pattern (e.g. 'model.layers.{L}.mlp.experts.{e}.down_proj.weight')\n");
    return 2;
  }
  try {
#if defined(__CUDACC__)
    int devices = 0;
    if (!o.cpu && cudaGetDeviceCount(&devices) == cudaSuccess && devices > 0) return run_on_gpu(o);
#endif
    return run_on_cpu(o);
  } catch (const moelora::Error& e) {
    std::fprintf(stderr, "\n%s\n", e.what());
    return 1;
  }
}
