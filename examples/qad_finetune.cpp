// QAD (quantization-aware distillation) of one MoE expert layer with a LoRA sidecar: the main
// example. The teacher is a bf16 expert layer; the student computes with the teacher's weights
// quantized (NVFP4 by default) plus a bf16 LoRA initialised from the quantization residual
// (svdquant by default), and the LoRA is trained with AdamW to match the teacher's output on routed
// batches. Prints a progress bar with the loss, then the student's relative output error when
// quantized only, after the init and after training, and writes the trained adapter.
//
// A training step runs where the layer runs and never waits for the host: forward, the MSE loss
// and its gradient (loss::mse_loss, one kernel; the loss is read back only when the progress bar
// is drawn, every --log-every steps), backward, and the AdamW step, which clips the gradients by
// their global norm (--clip), skips a step whose gradients are not finite and follows a warm-up +
// cosine learning-rate schedule, all decided on the device. The teacher's outputs are computed
// once per batch, up front.
//
// Checkpoints: --save-every N writes CHECKPOINT/step-NNNNNN/ (adapter.safetensors, the adapter
// state dict with the base's quantizer state; optimizer.safetensors, the optimizer state; and
// trainer.json, the iteration, written last); --resume CHECKPOINT/step-NNNNNN continues that run
// and ends bit for bit where the uninterrupted run ends (the batches are a function of the
// iteration). --profile times the training step against the layer's own forward + backward +
// AdamW after training, e.g. at the size of Qwen3-30B-A3B's fc1:
//   qad_finetune --experts 128 --in 2048 --out 1536 --rows 65536 --rank 16 --batches 2 --steps 10 --profile
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
#include <filesystem>
#include <limits>
#include <numeric>
#include <optional>
#include <random>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "moelora/io/expert_weights.hpp"
#include "moelora/io/optimizer_state.hpp"
#include "moelora/io/state_dict.hpp"
#include "moelora/io/text_file.hpp"
#include "moelora/moelora.hpp"

namespace {

using namespace moelora;

struct Options {
  std::int64_t experts = 8, in = 1024, out = 512, rank = 16, rows = 2048, steps = 120, batches = 8;
  std::string format = "nvfp4", init = "svdquant", lora_dtype = "bf16", output = "qad_adapter.safetensors";
  std::string teacher, pattern;
  std::optional<std::int64_t> layer;
  float lr = 2e-3f, clip = 0.0f, min_lr_ratio = 0.1f;
  std::string schedule = "cosine";
  std::int64_t warmup = 0, log_every = 0, save_every = 0, profile_steps = 20;
  std::string checkpoint = "qad_checkpoint", resume;
  std::vector<std::int64_t> inject_nan;
  bool loss_scaling = false, profile = false;
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

/// `‖a − b‖ / ‖b‖` over bf16 arrays.
double relative_error(const std::vector<bfloat16_t>& a, const std::vector<bfloat16_t>& b) {
  double diff = 0.0, norm = 0.0;
  for (std::size_t i = 0; i < a.size(); ++i) {
    const double d = double(static_cast<float>(a[i])) - static_cast<float>(b[i]);
    diff += d * d, norm += double(static_cast<float>(b[i])) * static_cast<float>(b[i]);
  }
  return std::sqrt(diff / norm);
}

void progress(std::int64_t step, std::int64_t steps, double mse) {
  constexpr int kWidth = 30;
  const int done = static_cast<int>(kWidth * step / std::max<std::int64_t>(steps, 1));
  std::printf("\r  [%s%s] step %4lld/%lld  loss %.3e", std::string(static_cast<std::size_t>(done), '#').c_str(),
              std::string(static_cast<std::size_t>(kWidth - done), '.').c_str(), static_cast<long long>(step),
              static_cast<long long>(steps), mse);
  std::fflush(stdout);
}

/// The optimizer settings of the run (recorded in its checkpoints: a resume must use the same).
AdamWConfig optimizer_config(const Options& o) {
  AdamWConfig c;
  c.lr = o.lr;
  c.max_grad_norm = o.clip;
  c.schedule = {parse_schedule_kind(o.schedule), o.warmup, o.steps, o.min_lr_ratio};
  if (c.schedule.kind != ScheduleKind::constant && c.schedule.total_steps <= c.schedule.warmup_steps)
    c.schedule.kind = ScheduleKind::constant;  // nothing left to decay over
  c.loss_scaling.enabled = o.loss_scaling;
  return c;
}

/// The checkpoint directory of iteration `iteration`: CHECKPOINT/step-NNNNNN.
std::filesystem::path checkpoint_dir(const Options& o, std::int64_t iteration) {
  char name[32];
  std::snprintf(name, sizeof(name), "step-%06lld", static_cast<long long>(iteration));
  return std::filesystem::path(o.checkpoint) / name;
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
  const std::size_t output_bytes = static_cast<std::size_t>(o.rows * o.out) * sizeof(bfloat16_t);

  // Fixed training batches, a held-out evaluation batch, and the teacher's outputs for each (on
  // the device: the training loop never moves them).
  struct Prepared {
    Buffer<Backend> x;
    std::vector<std::int64_t> counts;
    Buffer<Backend> y_teacher;
  };
  GroupedLoRA<Teacher> teacher_layer(std::move(teacher));  // no adapters: the teacher's own output
  const auto prepare = [&](Batch b) {
    Prepared p{upload(b.x), std::move(b.counts), Buffer<Backend>(output_bytes)};
    teacher_layer.forward(rows_of(p.x, o.in), expert_counts(p.counts.data(), o.experts), rows_of(p.y_teacher, o.out),
                          stream);
    return p;
  };
  std::vector<Prepared> batches;
  for (std::int64_t i = 0; i < o.batches; ++i) batches.push_back(prepare(source.next(rng)));
  const Prepared eval = prepare(source.next(rng));

  Layer layer(std::move(student));
  Buffer<Backend> y(output_bytes), dy(output_bytes);
  const auto error_on = [&](const Prepared& p) {
    layer.forward(rows_of(p.x, o.in), expert_counts(p.counts.data(), o.experts), rows_of(y, o.out), stream);
    return relative_error(download(y), download(p.y_teacher));
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

  AdamW<Layer> optimizer(optimizer_config(o));
  std::int64_t first = 0;
  if (!o.resume.empty()) {
    const std::filesystem::path dir(o.resume);
    const nlohmann::json trainer = nlohmann::json::parse(io::read_text_file(dir / "trainer.json"), nullptr, false);
    if (!trainer.is_object() || !trainer.contains("iteration") || !trainer["iteration"].is_number_integer())
      detail::raise(ErrorCode::bad_file, (dir / "trainer.json").string(), " has no iteration");
    first = trainer["iteration"].get<std::int64_t>();
    if (first < 0 || first > o.steps)
      detail::raise(ErrorCode::invalid_argument, "cannot resume at iteration ", first, " of a run of ", o.steps, " steps");
    io::load_adapters(layer, dir / "adapter.safetensors", "", stream);
    io::load_optimizer(optimizer, layer, dir / "optimizer.safetensors", "", stream);  // settings must match
    std::printf("resumed from %s at step %lld\n", o.resume.c_str(), static_cast<long long>(first));
  }
  const auto save_checkpoint = [&](std::int64_t iteration) {
    const std::filesystem::path dir = checkpoint_dir(o, iteration);
    std::filesystem::create_directories(dir);
    io::save_adapters(layer, dir / "adapter.safetensors", "", stream);
    io::save_optimizer(optimizer, layer, dir / "optimizer.safetensors", "", stream);
    io::write_text_file(dir / "trainer.json", nlohmann::json{{"iteration", iteration}, {"steps", o.steps}}.dump() + "\n");
  };

  const std::int64_t log_every = o.log_every > 0 ? o.log_every : std::max<std::int64_t>(1, o.steps / 50);
  const float* loss_scale = optimizer.loss_scale_data(stream);
  Buffer<Backend> loss_sum(sizeof(double));
  Backend::fill_zero(loss_sum.data(), loss_sum.bytes(), stream);
  const auto train_step = [&](const Prepared& b, std::int64_t iteration) {
    const ExpertCounts counts = expert_counts(b.counts.data(), o.experts);
    layer.forward(rows_of(b.x, o.in), counts, rows_of(y, o.out), stream);
    loss::mse_loss({y.data(), b.y_teacher.data(), dy.data(), DType::bf16, o.rows * o.out,
                    static_cast<float>(kLossScale / static_cast<double>(o.rows * o.out)), loss_scale,
                    loss_sum.template as<double>()},
                   stream);
    if (std::find(o.inject_nan.begin(), o.inject_nan.end(), iteration) != o.inject_nan.end()) {
      const bfloat16_t nan(std::numeric_limits<float>::quiet_NaN());  // a bad batch: the step must be skipped
      Backend::copy_from_host(dy.data(), &nan, sizeof(nan), stream);
    }
    // One micro-batch per step: the backward writes fresh gradients (no zero_grad needed).
    layer.backward(rows_of(b.x, o.in), counts, rows_of(dy, o.out), TensorRef{}, stream, WriteMode::overwrite);
    optimizer.step(layer, stream);
  };
  std::printf("training %lld steps on %lld routed batches of %lld rows (AdamW, lr %.1e, %s schedule, clip %s)\n",
              static_cast<long long>(o.steps), static_cast<long long>(o.batches), static_cast<long long>(o.rows),
              static_cast<double>(o.lr), o.schedule.c_str(), o.clip > 0.0f ? std::to_string(o.clip).c_str() : "off");
  const auto train_start = std::chrono::steady_clock::now();
  std::int64_t window = 0;
  for (std::int64_t iteration = first; iteration < o.steps; ++iteration) {
    train_step(batches[static_cast<std::size_t>(iteration % o.batches)], iteration);
    ++window;
    if ((iteration + 1) % log_every == 0 || iteration + 1 == o.steps) {  // the loss is read back here only
      double sum = 0.0;
      Backend::copy_to_host(&sum, loss_sum.data(), sizeof(sum), stream);
      Backend::fill_zero(loss_sum.data(), loss_sum.bytes(), stream);
      progress(iteration + 1, o.steps, sum / kLossScale / static_cast<double>(window));
      window = 0;
    }
    if (o.save_every > 0 && (iteration + 1) % o.save_every == 0) save_checkpoint(iteration + 1);
  }
  Backend::synchronize(stream);
  const double train_seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - train_start).count();
  const typename AdamW<Layer>::Counters counters = optimizer.counters(stream);
  std::printf("\n  %.2f s (%.1f ms per step); %lld updates, %lld steps skipped (non-finite gradients)\n\n",
              train_seconds, 1e3 * train_seconds / double(std::max<std::int64_t>(o.steps - first, 1)),
              static_cast<long long>(counters.step), static_cast<long long>(counters.skipped));

  if (o.profile) {
    // The training step against the layer's own work on the same batch (both keep training).
    const Prepared& b = batches.front();
    const ExpertCounts counts = expert_counts(b.counts.data(), o.experts);
    const auto per_step_ms = [&](const auto& body) {
      for (int i = 0; i < 3; ++i) body();
      Backend::synchronize(stream);
      const auto t0 = std::chrono::steady_clock::now();
      for (std::int64_t i = 0; i < o.profile_steps; ++i) body();
      Backend::synchronize(stream);
      return 1e3 * std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count() /
             static_cast<double>(o.profile_steps);
    };
    const auto forward_backward = [&] {
      layer.forward(rows_of(b.x, o.in), counts, rows_of(y, o.out), stream);
      layer.backward(rows_of(b.x, o.in), counts, rows_of(dy, o.out), TensorRef{}, stream, WriteMode::overwrite);
    };
    const double step_ms = per_step_ms([&] { train_step(b, -1); });
    const double layer_ms = per_step_ms([&] {
      forward_backward();
      optimizer.step(layer, stream);
    });
    const double fwd_bwd_ms = per_step_ms(forward_backward);
    std::printf("profile (E %lld, in %lld, out %lld, rows %lld, rank %lld, %s; mean of %lld steps):\n",
                static_cast<long long>(o.experts), static_cast<long long>(o.in), static_cast<long long>(o.out),
                static_cast<long long>(o.rows), static_cast<long long>(o.rank), o.format.c_str(),
                static_cast<long long>(o.profile_steps));
    std::printf("  training step (forward, loss, backward, AdamW)  %9.3f ms\n", step_ms);
    std::printf("  layer forward + backward + AdamW                %9.3f ms   (step / this: %.2f)\n", layer_ms,
                step_ms / layer_ms);
    std::printf("  layer forward + backward                        %9.3f ms\n\n", fwd_bwd_ms);
  }

  const double after_training = error_on(eval);
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
  app.add_option("--steps", o.steps, "training steps (the schedule's length)")->check(CLI::NonNegativeNumber);
  app.add_option("--batches", o.batches, "distinct training batches (cycled)")->check(CLI::PositiveNumber);
  app.add_option("--lr", o.lr, "AdamW learning rate")->check(CLI::PositiveNumber);
  app.add_option("--clip", o.clip, "clip the global gradient norm to this (0: off)")->check(CLI::NonNegativeNumber);
  app.add_option("--schedule", o.schedule, "learning-rate decay after the warm-up: constant, linear, cosine");
  app.add_option("--warmup", o.warmup, "linear warm-up steps")->check(CLI::NonNegativeNumber);
  app.add_option("--min-lr-ratio", o.min_lr_ratio, "where the decay ends, as a fraction of --lr")->check(CLI::Range(0.0, 1.0));
  app.add_flag("--loss-scaling", o.loss_scaling, "dynamic loss scaling (as for fp16 training)");
  app.add_option("--log-every", o.log_every, "read the loss back every N steps (default: steps / 50)")
      ->check(CLI::NonNegativeNumber);
  app.add_option("--save-every", o.save_every, "write a checkpoint every N steps (0: never)")->check(CLI::NonNegativeNumber);
  app.add_option("--checkpoint", o.checkpoint, "where checkpoints go: CHECKPOINT/step-NNNNNN/");
  app.add_option("--resume", o.resume, "continue the run saved in this checkpoint directory (CHECKPOINT/step-NNNNNN)");
  app.add_option("--inject-nan", o.inject_nan, "plant a NaN in the loss gradient at these steps (0-based), to see them skipped")
      ->delimiter(',');
  app.add_flag("--profile", o.profile, "after training, time the training step against the layer's forward + backward + AdamW");
  app.add_option("--profile-steps", o.profile_steps, "steps timed by --profile")->check(CLI::PositiveNumber);
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
