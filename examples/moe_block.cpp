// A Qwen3-MoE-like block with LoRA on both expert projections, trained to match a teacher block:
// the second example, and the code to copy into a trainer.
//
// The block, per token: router logits from a fixed gate `[E, hidden]` → softmax top-k with
// renormalised weights → routed rows permuted into expert order on the device (CUB radix sort and
// histogram; the expert counts never leave the device) → fc1 (`[gate; up]`, hidden → 2·ffn, a
// column-parallel GroupedLoRA) → SwiGLU → fc2 (ffn → hidden, a row-parallel GroupedLoRA) → the rows
// combined back per token with the router weights. The backward runs the same path in reverse for
// the LoRA gradients of both projections (the base and the router are frozen, and the block's input
// is data, so neither the router's gradient nor fc1's input gradient is computed).
//
// Training: a teacher block with the same router and base weights plus hidden low-rank updates on
// both projections (or, with --format, the unquantized teacher of a quantized student) produces the
// targets; the student's adapters (kaiming_zeros, rank --rank) learn them on an MSE loss computed on
// the device, with one AdamW over both projections whose gradient statistics (the global norm of
// --clip, the finite check) span the TP and EP groups. Prints a progress bar with the loss and
// tokens/s, then the held-out loss before and after training and how a profiled step's time splits
// between router/permute, base GEMMs, LoRA and the rest.
//
// --tp N --ep M runs the block on N × M ranks: host threads over HostThreadCommunicator on the CPU,
// one thread per GPU over NCCL on GPUs. Each rank routes its own share of the tokens (TP-major, then
// EP); moe::ExpertExchange moves the routed rows to the EP rank holding their expert (counts first,
// then an all-to-all of variable sizes) and gathers them over the TP ranks, which hold fc1 by
// output rows (`[gate_k; up_k]`: a ColumnParallel layer with out_blocks = 2) and fc2 by input
// columns (RowParallel); fc2's partial outputs are summed by the exchange's reduce-scatter on the
// way back (PARALLEL.md §1). The layers reduce what their replicated factors' gradients need (fc1's
// u, fc2's h, over TP) themselves, so every TP rank steps those factors identically. Weights and
// tokens are keyed by global index, the layers initialise their adapters by global index, and a
// quantized base's amax is shared by the ranks holding the same weights, so every layout trains the
// same block; the program then trains it again on one rank and checks that the losses agree
// (tolerance in `kLayoutTolerance`).
//
// Runs on the GPU when built with nvcc and a GPU is present (else, or with --cpu, on the CPU).
// --bench times the training step instead (median of 20, CUDA events) and prints tokens/s.
#include <CLI/CLI.hpp>

#include <algorithm>
#include <array>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <functional>
#include <optional>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "moelora/moe/exchange.hpp"
#include "moelora/moe/rank_grid.hpp"
#include "moelora/moelora.hpp"

#if defined(__CUDACC__)
#include <cub/block/block_reduce.cuh>

#include "moelora/moe/nccl_grid.hpp"
#include "moelora/parallel/nccl_communicator.hpp"
#endif

namespace {

using namespace moelora;

struct Options {
  std::int64_t hidden = 256, ffn = 128, experts = 16, top_k = 4, tokens = 512, rank = 8, steps = 150, batches = 32;
  std::string format = "none";
  int tp = 1, ep = 1;
  float lr = 8e-3f, clip = 0.0f;
  std::uint64_t seed = 2026;
  bool cpu = false, gpu = false, bench = false;
  std::string graph = "off", json;
  int bench_iters = 20;
};

/// Why the options cannot run (empty when they can): the program exits with code 2.
std::string invalid(const Options& o) {
  const auto positive = [](std::int64_t v) { return v >= 1; };
  if (!positive(o.hidden) || !positive(o.ffn) || !positive(o.experts) || !positive(o.tokens))
    return "--hidden, --ffn, --experts and --tokens must be >= 1";
  if (o.top_k < 1 || o.top_k > o.experts)
    return "--top-k must be in [1, --experts = " + std::to_string(o.experts) + "], got " + std::to_string(o.top_k);
  if (o.rank < 1) return "--rank must be >= 1, got " + std::to_string(o.rank);
  if (o.tp < 1 || o.ep < 1) return "--tp and --ep must be >= 1";
  if (o.ffn % o.tp != 0)
    return "--tp " + std::to_string(o.tp) + " must divide --ffn " + std::to_string(o.ffn) + " (fc1 and fc2 are split by it)";
  if (o.experts % o.ep != 0)
    return "--ep " + std::to_string(o.ep) + " must divide --experts " + std::to_string(o.experts);
  if (o.tokens % (o.tp * o.ep) != 0)
    return "--tp × --ep = " + std::to_string(o.tp * o.ep) + " ranks must divide --tokens " + std::to_string(o.tokens);
  if (o.steps < 0 || o.batches < 1) return "--steps must be >= 0 and --batches >= 1";
  if (!(o.lr > 0.0f && std::isfinite(o.lr))) return "--lr must be finite and > 0";
  if (!(o.clip >= 0.0f && std::isfinite(o.clip))) return "--clip must be finite and >= 0";
  if (o.tokens * o.top_k > moe::kMaxRoutedRows) return "--tokens × --top-k must stay below 2^31";
  if (o.graph != "off" && o.graph != "auto" && o.graph != "require")
    return "--graph must be off, auto or require, got " + o.graph;
  if (o.bench_iters < 1) return "--bench-iters must be >= 1";
  if (o.format != "none") try {
      quant::parse_quant_spec(o.format);
    } catch (const Error& e) {
      return e.what();
    }
  return {};
}

// ---- the block's weights and data, generated from the seed by global index -------------------

/// A value of std. dev. `stddev` (uniform) keyed by (seed, stream, global index): every layout and
/// backend generates the same numbers for the same global element.
float synthetic(std::uint64_t seed, std::uint64_t stream, std::uint64_t index, float stddev) {
  return (2.0f * uniform01(seed, stream, index) - 1.0f) * 1.7320508f * stddev;
}

/// Streams of `synthetic`, one per tensor; kAdapterFc1 and kAdapterFc2 salt the seeds of the
/// adapters' initialisation.
enum Stream : std::uint64_t { kGate = 1, kFc1, kFc2, kFc1A, kFc1B, kFc2A, kFc2B, kTokens, kAdapterFc1, kAdapterFc2 };

/// A rank's place in the tp × ep grid (`moe/rank_grid.hpp`): TP rank q, EP rank p, holding the
/// experts `[p·E/ep, (p+1)·E/ep)`, fc1's rows `[gate_q; up_q]` and fc2's columns q of them, and the
/// tokens of slice `q·ep + p` of the batch.
using Place = moe::GridPlace;

/// A rank's communicators (owned by the rank's harness): its EP group and its TP group.
template <class Comm>
struct RankGroups {
  Comm& ep;
  Comm& tp;

  /// The amax sync of a quantized base (`parallel::amax_sync`), so that every layout quantizes the
  /// whole weights alike: over the TP group for an amax per expert, over the whole grid (the max
  /// over TP, then over EP) for one shared by all experts. `*this` must outlive the quantizer.
  quant::AmaxSync<typename Comm::backend_type> amax_sync(quant::AmaxScope scope) {
    if (scope == quant::AmaxScope::per_expert) return parallel::amax_sync(tp);
    return {[](void* self, float* amax, std::size_t count, typename Comm::stream_type stream) {
              auto& groups = *static_cast<RankGroups*>(self);
              parallel::amax_sync(groups.tp)(amax, count, stream);
              parallel::amax_sync(groups.ep)(amax, count, stream);
            },
            this};
  }
};

/// The rank of the teacher's hidden update and its size relative to the base's output.
constexpr std::int64_t kHiddenRank = 4;
constexpr float kHiddenUpdate = 0.5f;

/// This rank's slice of expert projection `which` (kFc1: `[E/ep, 2·ffn/tp, hidden]`, rows `[gate_q;
/// up_q]`; kFc2: `[E/ep, hidden, ffn/tp]`, columns q), bf16. Values of std. dev. 1/√in keyed by
/// their global index, plus (teacher) the hidden low-rank update B* A* (rank kHiddenRank, keyed
/// likewise; (B* A* x) has std. dev. kHiddenUpdate · (W x)'s).
std::vector<bfloat16_t> expert_weights(const Options& o, Stream which, const Place& at, bool teacher) {
  const bool fc1 = which == kFc1;
  const std::int64_t experts = o.experts / at.ep, part = o.ffn / at.tp;
  const std::int64_t out = fc1 ? 2 * o.ffn : o.hidden, in = fc1 ? o.hidden : o.ffn;  // global shape
  const std::int64_t rows = fc1 ? 2 * part : o.hidden, cols = fc1 ? o.hidden : part;  // local shape
  const float stddev = 1.0f / std::sqrt(static_cast<float>(in));
  const float b_stddev = kHiddenUpdate / std::sqrt(static_cast<float>(kHiddenRank));
  const Stream a_stream = fc1 ? kFc1A : kFc2A, b_stream = fc1 ? kFc1B : kFc2B;
  std::vector<bfloat16_t> w(static_cast<std::size_t>(experts * rows * cols));
  for (std::int64_t i = 0; i < experts; ++i)
    for (std::int64_t r = 0; r < rows; ++r)
      for (std::int64_t c = 0; c < cols; ++c) {
        const std::int64_t g = at.p * experts + i;
        const std::int64_t row = fc1 ? (r < part ? at.q * part + r : o.ffn + at.q * part + (r - part)) : r;
        const std::int64_t col = fc1 ? c : at.q * part + c;
        float v = synthetic(o.seed, which, static_cast<std::uint64_t>((g * out + row) * in + col), stddev);
        if (teacher)
          for (std::int64_t k = 0; k < kHiddenRank; ++k)
            v += synthetic(o.seed, b_stream, static_cast<std::uint64_t>((g * out + row) * kHiddenRank + k), b_stddev) *
                 synthetic(o.seed, a_stream, static_cast<std::uint64_t>((g * kHiddenRank + k) * in + col), stddev);
        w[static_cast<std::size_t>((i * rows + r) * cols + c)] = bfloat16_t(v);
      }
  return w;
}

/// The router's gate `[E, hidden]`: logits of std. dev. ~1.5, so routing is neither uniform nor
/// collapsed.
std::vector<bfloat16_t> gate_weights(const Options& o) {
  std::vector<bfloat16_t> g(static_cast<std::size_t>(o.experts * o.hidden));
  const float stddev = 1.5f / std::sqrt(static_cast<float>(o.hidden));
  for (std::size_t i = 0; i < g.size(); ++i) g[i] = bfloat16_t(synthetic(o.seed, kGate, i, stddev));
  return g;
}

/// Batch `b`'s tokens `[T, hidden]` (std. dev. 1).
std::vector<bfloat16_t> tokens(const Options& o, std::int64_t b) {
  std::vector<bfloat16_t> x(static_cast<std::size_t>(o.tokens * o.hidden));
  const auto base = static_cast<std::uint64_t>(b * o.tokens * o.hidden);
  for (std::size_t i = 0; i < x.size(); ++i) x[i] = bfloat16_t(synthetic(o.seed, kTokens, base + i, 1.0f));
  return x;
}

// ---- one backend: stream, handles, bases -------------------------------------------------------

/// A backend's stream and library handles, and the block's bases built on them.
template <class Backend>
struct Device;

template <>
struct Device<HostBackend> {
  explicit Device(int /*device*/) {}
  HostStream stream{};
  [[nodiscard]] static std::string name() { return "host (CPU reference)"; }
  [[nodiscard]] static Linalg<HostBackend> linalg() { return {}; }
  /// The router's gate as a one-expert grouped linear `[E, hidden]`.
  [[nodiscard]] static GroupedLinear<HostBackend> gate(std::int64_t experts, std::int64_t hidden) {
    return {1, hidden, experts, DType::bf16};
  }
};

#if defined(__CUDACC__)
template <>
struct Device<CudaBackend> {
  cudaStream_t stream = nullptr;
  cublasHandle_t blas = nullptr;
  cusolverDnHandle_t solver = nullptr;

  /// On GPU `device` (made current for the calling thread).
  explicit Device(int device) {
    MOELORA_CUDA_CHECK(cudaSetDevice(device));
    MOELORA_CUDA_CHECK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
    MOELORA_CUBLAS_CHECK(cublasCreate(&blas));
    MOELORA_CUSOLVER_CHECK(cusolverDnCreate(&solver));
  }
  ~Device() {
    cusolverDnDestroy(solver);
    cublasDestroy(blas);
    cudaStreamDestroy(stream);
  }
  Device(const Device&) = delete;
  Device& operator=(const Device&) = delete;

  /// The backend and GPU 0's name.
  [[nodiscard]] static std::string name() {
    cudaDeviceProp prop{};
    MOELORA_CUDA_CHECK(cudaGetDeviceProperties(&prop, 0));
    return std::string("cuda (") + prop.name + ")";
  }
  [[nodiscard]] Linalg<CudaBackend> linalg() const { return {blas, solver}; }
  /// One cuBLAS GEMM per call (host sizes: no synchronisation, capturable).
  [[nodiscard]] GroupedLinear<CudaBackend> gate(std::int64_t experts, std::int64_t hidden) const {
    return {blas, 1, hidden, experts, DType::bf16, GemmStrategy::per_expert};
  }
};
#endif

/// The expert bases of the block: computing with W (format none) or with Q(W).
template <class Backend>
using ExpertBase = QuantizedGroupedLinear<Backend>;

/// `w`: this rank's slice; a quantized base's amax is shared with the ranks of `groups` that hold the
/// other slices of the same weights.
template <class Backend, class Comm>
ExpertBase<Backend> expert_base(Device<Backend>& dev, RankGroups<Comm>& groups, std::int64_t experts, std::int64_t in,
                                std::int64_t out, const std::vector<bfloat16_t>& w, const std::string& format) {
  std::optional<quant::FormatQuantizer<Backend>> quantizer;
  if (format != "none") {
    quantizer.emplace(quant::parse_quant_spec(format));
    quantizer->set_amax_sync(groups.amax_sync(quantizer->spec().amax_scope));
  }
  ExpertBase<Backend> base(dev.linalg(), experts, in, out, DType::bf16, std::move(quantizer));
  base.set_weight({w.data(), DType::bf16, {experts, out, in}}, dev.stream);
  return base;
}

/// Host bf16 values in a new buffer of the backend's memory.
template <class Backend>
Buffer<Backend> upload(const std::vector<bfloat16_t>& host, typename Backend::stream_type stream) {
  Buffer<Backend> b(std::max<std::size_t>(host.size() * sizeof(bfloat16_t), 1));
  Backend::copy_from_host(b.data(), host.data(), host.size() * sizeof(bfloat16_t), stream);
  return b;
}

/// A bf16 `[rows, cols]` view of a buffer.
template <class Backend>
TensorRef rows_of(const Buffer<Backend>& b, std::int64_t rows, std::int64_t cols) {
  return {b.data(), DType::bf16, {rows, cols}};
}

// ---- timing ------------------------------------------------------------------------------------

/// Where a step's time goes.
enum class Phase : int { router, exchange, experts, rest };
constexpr std::size_t kPhases = 4;

/// Marks phase boundaries on a backend's stream (CUDA events, or the host clock, whose work is
/// synchronous) and sums the time of each phase.
template <class Backend>
class Timeline;

template <>
class Timeline<HostBackend> {
 public:
  explicit Timeline(HostStream /*stream*/) {}
  void start() { last_ = std::chrono::steady_clock::now(); }
  void mark(Phase phase) {
    const auto now = std::chrono::steady_clock::now();
    ms_[static_cast<std::size_t>(phase)] += std::chrono::duration<double, std::milli>(now - last_).count();
    last_ = now;
  }
  std::array<double, kPhases> totals() { return ms_; }

 private:
  std::chrono::steady_clock::time_point last_;
  std::array<double, kPhases> ms_{};
};

#if defined(__CUDACC__)
template <>
class Timeline<CudaBackend> {
 public:
  explicit Timeline(cudaStream_t stream) : stream_(stream) {}
  ~Timeline() {
    for (cudaEvent_t e : events_) cudaEventDestroy(e);
  }
  Timeline(const Timeline&) = delete;
  Timeline& operator=(const Timeline&) = delete;

  void start() { record(); }
  void mark(Phase phase) {
    phases_.push_back(phase);
    record();
  }
  /// Synchronises with the last mark.
  std::array<double, kPhases> totals() {
    std::array<double, kPhases> ms{};
    if (events_.empty()) return ms;
    MOELORA_CUDA_CHECK(cudaEventSynchronize(events_.back()));
    for (std::size_t i = 0; i < phases_.size(); ++i) {
      float elapsed = 0.0f;
      MOELORA_CUDA_CHECK(cudaEventElapsedTime(&elapsed, events_[i], events_[i + 1]));
      ms[static_cast<std::size_t>(phases_[i])] += elapsed;
    }
    return ms;
  }

 private:
  void record() {
    cudaEvent_t e;
    MOELORA_CUDA_CHECK(cudaEventCreate(&e));
    events_.push_back(e);
    MOELORA_CUDA_CHECK(cudaEventRecord(e, stream_));
  }
  cudaStream_t stream_;
  std::vector<cudaEvent_t> events_;
  std::vector<Phase> phases_;
};
#endif

/// Marks `phase` on `timeline` when the step is profiled.
template <class Backend>
void mark(Timeline<Backend>* timeline, Phase phase) {
  if (timeline) timeline->mark(phase);
}

// ---- the loss ----------------------------------------------------------------------------------

/// The training loss is kLossScale · MSE, so that gradients stay far above AdamW's eps.
constexpr double kLossScale = 1e4;

/// `*loss = kLossScale · Σ (y − target)² / n` and `dy = kLossScale · 2 (y − target) / n` over the
/// rows of y (bf16), n the element count of the whole batch (all ranks).
void mse(ConstTensorRef y, const void* target, TensorRef dy, double n, float* loss, HostStream /*stream*/) {
  const auto* a = static_cast<const bfloat16_t*>(y.data);
  const auto* b = static_cast<const bfloat16_t*>(target);
  auto* grad = static_cast<bfloat16_t*>(dy.data);
  double sum = 0.0;
  for (std::int64_t i = 0; i < y.numel(); ++i) {
    const double d = double(static_cast<float>(a[i])) - static_cast<float>(b[i]);
    sum += d * d;
    if (grad) grad[i] = bfloat16_t(static_cast<float>(kLossScale * 2.0 * d / n));
  }
  *loss = static_cast<float>(kLossScale * sum / n);
}

#if defined(__CUDACC__)
constexpr int kLossThreads = 256, kLossBlocks = 264;  // kLossBlocks partial sums fit train()'s scratch

/// Per-block partial sums of (y − target)² (fixed grid: deterministic) and dy.
__global__ void __launch_bounds__(kLossThreads)
    mse_kernel(const __nv_bfloat16* y, const __nv_bfloat16* target, __nv_bfloat16* dy, std::int64_t count,
               float grad_scale, float* partials) {
  float sum = 0.0f;
  for (std::int64_t i = blockIdx.x * std::int64_t{kLossThreads} + threadIdx.x; i < count;
       i += std::int64_t{kLossBlocks} * kLossThreads) {
    const float d = __bfloat162float(y[i]) - __bfloat162float(target[i]);
    sum += d * d;
    if (dy) dy[i] = __float2bfloat16_rn(grad_scale * d);
  }
  using Reduce = cub::BlockReduce<float, kLossThreads>;
  __shared__ typename Reduce::TempStorage temp;
  const float block = Reduce(temp).Sum(sum);
  if (threadIdx.x == 0) partials[blockIdx.x] = block;
}

/// `*loss = scale · Σ partials`, in a fixed order.
__global__ void mse_finish_kernel(const float* partials, float scale, float* loss) {
  using Reduce = cub::BlockReduce<float, kLossThreads>;
  __shared__ typename Reduce::TempStorage temp;
  float v = 0.0f;
  for (int i = static_cast<int>(threadIdx.x); i < kLossBlocks; i += kLossThreads) v += partials[i];
  const float total = Reduce(temp).Sum(v);
  if (threadIdx.x == 0) *loss = scale * total;
}

/// The CUDA form of `mse` (`partials`: kLossBlocks floats of scratch); queued on `stream`.
void mse(ConstTensorRef y, const void* target, TensorRef dy, double n, float* loss, float* partials,
         cudaStream_t stream) {
  mse_kernel<<<kLossBlocks, kLossThreads, 0, stream>>>(
      static_cast<const __nv_bfloat16*>(y.data), static_cast<const __nv_bfloat16*>(target),
      static_cast<__nv_bfloat16*>(dy.data), y.numel(), static_cast<float>(kLossScale * 2.0 / n), partials);
  mse_finish_kernel<<<1, kLossThreads, 0, stream>>>(partials, static_cast<float>(kLossScale / n), loss);
  MOELORA_CUDA_CHECK(cudaGetLastError());
}
#endif

// ---- the block ---------------------------------------------------------------------------------

/// The MoE block on one rank: router, permutation, the exchange with the other ranks (none on one
/// rank), the two expert layers — one rank of a tensor-parallel fc1 (column parallel, rows
/// `[gate_q; up_q]`) and fc2 (row parallel) — and the activations the backward needs. `Base` is
/// the expert layers' base; one forward/backward in flight at a time.
template <class Backend, class Base, class Comm>
class Block {
 public:
  using Fc1 = GroupedLoRA<Base, policy::ColumnParallel>;
  using Fc2 = GroupedLoRA<Base, policy::RowParallel>;
  using Stream = typename Backend::stream_type;
  using Exchange = moe::ExpertExchange<Backend, Comm>;

  /// `routing`: this rank's tokens, E and k; `ffn`: this rank's width of fc1's gate (and up) half;
  /// `capacity`: the most rows the local experts can receive (all the ranks' routed rows);
  /// `exchange`: null on one rank.
  Block(GroupedLinear<Backend> gate, Fc1 fc1, Fc2 fc2, moe::RoutingShape routing, std::int64_t hidden,
        std::int64_t ffn, std::int64_t capacity, std::unique_ptr<Exchange> exchange, Stream stream)
      : gate_(std::move(gate)),
        fc1_(std::move(fc1)),
        fc2_(std::move(fc2)),
        exchange_(std::move(exchange)),
        routing_(routing),
        hidden_(hidden),
        ffn_(ffn) {
    const std::int64_t t = routing.tokens, rows = routing.routed();
    const auto bf16 = [](std::int64_t n) { return Buffer<Backend>(static_cast<std::size_t>(std::max<std::int64_t>(n, 1)) * 2); };
    logits_ = bf16(t * routing.experts);
    expert_ = Buffer<Backend>(static_cast<std::size_t>(std::max<std::int64_t>(rows, 1)) * sizeof(std::int32_t));
    weight_ = Buffer<Backend>(static_cast<std::size_t>(std::max<std::int64_t>(rows, 1)) * sizeof(float));
    x_rows_ = bf16(rows * hidden);
    h1_ = bf16(capacity * 2 * ffn);
    act_ = bf16(capacity * ffn);
    out_local_ = bf16(capacity * hidden);
    d_act_ = bf16(capacity * ffn);
    d_h1_ = bf16(capacity * 2 * ffn);
    if (exchange_) {
      x_local_ = bf16(capacity * hidden);
      out_rows_ = bf16(rows * hidden);
      exchange_->reserve(capacity, hidden, DType::bf16);
    }
    // The gate is one "expert" holding every token: its segments [0, T] live on both sides.
    gate_offsets_ = {0, t};
    gate_offsets_dev_ = Buffer<Backend>(2 * sizeof(std::int64_t));
    Backend::copy_from_host(gate_offsets_dev_.data(), gate_offsets_.data(), 2 * sizeof(std::int64_t), stream);
    permuter_.reserve(routing, stream);
    fc1_.reserve(capacity);
    fc2_.reserve(capacity);
  }

  [[nodiscard]] Fc1& fc1() { return fc1_; }
  [[nodiscard]] Fc2& fc2() { return fc2_; }

  /// y `[T, hidden]` = the block applied to x `[T, hidden]` (both bf16, the backend's memory).
  void forward(ConstTensorRef x, TensorRef y, Stream stream, Timeline<Backend>* timeline = nullptr) {
    const std::int64_t t = routing_.tokens, rows = routing_.routed();
    const ExpertSegments gate_segments{gate_offsets_dev_.template as<std::int64_t>(), gate_offsets_.data(), 1, t};
    gate_.forward(x, gate_segments, rows_of(logits_, t, routing_.experts), stream);
    const moe::Routing routing{expert_.template as<std::int32_t>(), weight_.template as<float>(), routing_};
    moe::TopKRouter<Backend>::route(rows_of(logits_, t, routing_.experts), routing, stream);
    order_ = &permuter_.sort(routing, stream);
    moe::TokenPermuter<Backend>::permute(x, *order_, rows_of(x_rows_, rows, hidden_), stream);
    mark(timeline, Phase::router);
    if (exchange_) {  // counts first (the host learns the sizes), then the rows
      exchange_->plan(*order_, stream);
      exchange_->dispatch(rows_of(x_rows_, rows, hidden_), local(x_local_, hidden_), stream);
      mark(timeline, Phase::exchange);
    }
    fc1_.forward(local(exchange_ ? x_local_ : x_rows_, hidden_), counts(), local(h1_, 2 * ffn_), stream);
    mark(timeline, Phase::experts);
    moe::SwiGlu<Backend>::forward(local(h1_, 2 * ffn_), local(act_, ffn_), stream);
    mark(timeline, Phase::rest);
    fc2_.forward(local(act_, ffn_), counts(), local(out_local_, hidden_), stream);
    mark(timeline, Phase::experts);
    if (exchange_) {  // fc2's partial sums are added over TP on the way back
      exchange_->combine(local(out_local_, hidden_), rows_of(out_rows_, rows, hidden_), stream);
      mark(timeline, Phase::exchange);
    }
    moe::TokenPermuter<Backend>::combine(rows_of(exchange_ ? out_rows_ : out_local_, rows, hidden_),
                                         weight_.template as<float>(), *order_, y, stream);
    mark(timeline, Phase::router);
  }

  /// The LoRA gradients of both projections (written, not accumulated) from dy `[T, hidden]`, for
  /// the last forward. Under TP the layers reduce over their group what the replicated factors'
  /// gradients need (fc2's h, fc1's u); fc1's input gradient, a partial sum the caller would add
  /// over TP, is not formed.
  void backward(ConstTensorRef dy, Stream stream, Timeline<Backend>* timeline = nullptr) {
    const std::int64_t rows = routing_.routed();
    const moe::ConstRouting routing{expert_.template as<const std::int32_t>(), weight_.template as<const float>(),
                                    routing_};
    // The gradient of the expert outputs reuses their buffers (the forward's values are spent).
    Buffer<Backend>& d_rows = exchange_ ? out_rows_ : out_local_;
    moe::TokenPermuter<Backend>::combine_backward(dy, routing, *order_, rows_of(d_rows, rows, hidden_), stream);
    mark(timeline, Phase::router);
    if (exchange_) {  // full on every TP rank, as fc2's row-parallel backward wants it
      exchange_->dispatch(rows_of(out_rows_, rows, hidden_), local(out_local_, hidden_), stream);
      mark(timeline, Phase::exchange);
    }
    fc2_.backward(local(act_, ffn_), counts(), local(out_local_, hidden_), local(d_act_, ffn_), stream,
                  WriteMode::overwrite);
    mark(timeline, Phase::experts);
    moe::SwiGlu<Backend>::backward(local(h1_, 2 * ffn_), local(d_act_, ffn_), local(d_h1_, 2 * ffn_), stream);
    mark(timeline, Phase::rest);
    fc1_.backward(local(exchange_ ? x_local_ : x_rows_, hidden_), counts(), local(d_h1_, 2 * ffn_), TensorRef{},
                  stream, WriteMode::overwrite);
    mark(timeline, Phase::experts);
  }

 private:
  [[nodiscard]] std::int64_t local_rows() const { return exchange_ ? exchange_->local_rows() : routing_.routed(); }
  [[nodiscard]] TensorRef local(const Buffer<Backend>& b, std::int64_t cols) const { return rows_of(b, local_rows(), cols); }
  /// The local experts' counts: on the device (one rank: the sort's), or on the host (from the
  /// exchange, which had to bring them there).
  [[nodiscard]] ExpertCounts counts() const {
    return exchange_ ? exchange_->local_counts() : order_->tokens_per_expert(Backend::memory);
  }

  GroupedLinear<Backend> gate_;
  Fc1 fc1_;
  Fc2 fc2_;
  std::unique_ptr<Exchange> exchange_;
  moe::RoutingShape routing_;
  std::int64_t hidden_, ffn_;
  moe::TokenPermuter<Backend> permuter_;
  const moe::ExpertOrder* order_ = nullptr;
  std::vector<std::int64_t> gate_offsets_;
  Buffer<Backend> gate_offsets_dev_, logits_, expert_, weight_, x_rows_, x_local_, h1_, act_, out_local_, out_rows_,
      d_act_, d_h1_;
};

/// This rank's block: the gate, its slices of the expert weights (with `teacher`: the teacher's) in
/// expert layers over the TP group, and the exchange over the EP and TP groups when there are
/// several ranks.
template <class Backend, class Comm>
Block<Backend, ExpertBase<Backend>, Comm> make_block(const Options& o, Device<Backend>& dev, const Place& at,
                                                     RankGroups<Comm>& groups, bool teacher, const std::string& format) {
  using Result = Block<Backend, ExpertBase<Backend>, Comm>;
  GroupedLinear<Backend> gate = dev.gate(o.experts, o.hidden);
  const std::vector<bfloat16_t> gate_host = gate_weights(o);
  gate.set_weight({gate_host.data(), DType::bf16, {1, o.experts, o.hidden}}, dev.stream);
  const std::int64_t experts = o.experts / at.ep, ffn = o.ffn / at.tp, tokens = o.tokens / (at.tp * at.ep);
  std::unique_ptr<moe::ExpertExchange<Backend, Comm>> exchange;
  if (at.tp * at.ep > 1) exchange = std::make_unique<moe::ExpertExchange<Backend, Comm>>(groups.ep, groups.tp, o.experts);
  // fc1's rows are two blocks, gate and up, each split over TP; fc2's columns are split over TP.
  const parallel::Placement fc1_place{
      .ep_rank = at.p, .ep_size = at.ep, .tp_size = at.tp, .global_in = o.hidden, .global_out = 2 * o.ffn, .out_blocks = 2};
  const parallel::Placement fc2_place{
      .ep_rank = at.p, .ep_size = at.ep, .tp_size = at.tp, .global_in = o.ffn, .global_out = o.hidden};
  return {std::move(gate),
          typename Result::Fc1(
              expert_base(dev, groups, experts, o.hidden, 2 * ffn, expert_weights(o, kFc1, at, teacher), format),
              groups.tp, fc1_place, dev.stream),
          typename Result::Fc2(
              expert_base(dev, groups, experts, ffn, o.hidden, expert_weights(o, kFc2, at, teacher), format),
              groups.tp, fc2_place, dev.stream),
          {tokens, o.experts, o.top_k},
          o.hidden,
          ffn,
          o.tokens * o.top_k,
          std::move(exchange),
          dev.stream};
}

#if defined(__CUDACC__)
/// CUDA graphs of the training step (forward, loss, backward and the AdamW step), one per batch.
class StepGraphs {
 public:
  StepGraphs() = default;
  StepGraphs(const StepGraphs&) = delete;
  StepGraphs& operator=(const StepGraphs&) = delete;
  ~StepGraphs() {
    for (cudaGraphExec_t exec : execs_) cudaGraphExecDestroy(exec);
  }

  /// Captures what `record()` queues on `stream` as the next graph. Returns false, with the reason
  /// in `why`, when the work cannot be captured (a call that synchronises the host, such as a base
  /// that reads device counts back); the stream is usable again afterwards.
  template <class F>
  bool capture(cudaStream_t stream, F&& record, std::string& why) {
    cudaGraph_t graph = nullptr;
    MOELORA_CUDA_CHECK(cudaStreamBeginCapture(stream, cudaStreamCaptureModeThreadLocal));
    try {
      record();
    } catch (const Error& e) {
      why = e.what();
    }
    const cudaError_t ended = cudaStreamEndCapture(stream, &graph);
    if (why.empty() && ended != cudaSuccess) why = cudaGetErrorString(ended);
    if (!why.empty()) {
      if (graph) cudaGraphDestroy(graph);
      static_cast<void>(cudaGetLastError());  // the capture's error is reported through `why`
      return false;
    }
    cudaGraphExec_t exec = nullptr;
    const cudaError_t instantiated = cudaGraphInstantiate(&exec, graph, 0);
    cudaGraphDestroy(graph);
    MOELORA_CUDA_CHECK(instantiated);
    execs_.push_back(exec);
    return true;
  }
  [[nodiscard]] std::size_t size() const { return execs_.size(); }
  void launch(std::size_t i, cudaStream_t stream) const { MOELORA_CUDA_CHECK(cudaGraphLaunch(execs_[i], stream)); }

 private:
  std::vector<cudaGraphExec_t> execs_;
};
#endif

/// Exit status of --graph require when the step cannot be captured (Meson: skipped).
constexpr int kSkipped = 77;

// ---- training ----------------------------------------------------------------------------------

/// The batches (tokens and the teacher's outputs, bf16 `[T, hidden]` each, all the ranks' tokens) on
/// the host; the last one is held out for evaluation.
struct Data {
  std::vector<std::vector<bfloat16_t>> x, target;
};

/// What a training run measured (the leader rank's view; losses are over all ranks).
struct Report {
  std::vector<float> losses;  ///< the training loss of every step
  float eval_before = 0.0f, eval_after = 0.0f;
  double seconds = 0.0;                   ///< wall time of the training loop
  std::array<double, kPhases> profile{};  ///< a profiled step's time per Phase, ms
  double base_ms = 0.0;                   ///< of Phase::experts, the base GEMMs' part (adapters disabled)
  double step_ms = 0.0;                   ///< --bench: median step time
  bool graphed = false;                   ///< the steps ran as CUDA graphs
  std::string not_graphed;                ///< why the step could not be captured
};

void progress(std::int64_t step, std::int64_t steps, float loss, double tokens_per_second) {
  constexpr int kWidth = 30;
  const int done = static_cast<int>(kWidth * (step + 1) / std::max<std::int64_t>(steps, 1));
  std::printf("\r  [%s%s] step %4lld/%lld  loss %.4e  %9.0f tokens/s",
              std::string(static_cast<std::size_t>(done), '#').c_str(),
              std::string(static_cast<std::size_t>(kWidth - done), '.').c_str(), static_cast<long long>(step + 1),
              static_cast<long long>(steps), static_cast<double>(loss), tokens_per_second);
  std::fflush(stdout);
}

/// Seconds on the host clock since `start`.
double seconds_since(std::chrono::steady_clock::time_point start) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
}

/// One rank's training of the student's adapters on its tokens of `data` (or, --bench, the timing
/// of its training step), with the other ranks of its groups.
template <class Backend, class Comm>
Report train(const Options& o, Device<Backend>& dev, const Data& data, const Place& at, RankGroups<Comm>& groups) {
  const auto stream = dev.stream;
  Comm &ep = groups.ep, &tp = groups.tp;
  auto block = make_block(o, dev, at, groups, false, o.format);
  // The layers draw their Kaiming A by global expert and column: every layout starts from the
  // slices of the one-rank adapters.
  AdapterConfig config;
  config.rank = o.rank;
  config.seed = o.seed ^ kAdapterFc1;
  block.fc1().add_adapter("lora", config, stream);
  config.seed = o.seed ^ kAdapterFc2;
  block.fc2().add_adapter("lora", config, stream);
  // One AdamW steps both projections (groups 0 and 1); its norm and finite check sum over the TP
  // group (sharded factors; the replicated ones counted once) and the EP group.
  AdamW<typename decltype(block)::Fc1> optimizer(AdamWConfig{.lr = o.lr, .max_grad_norm = o.clip});
  const NormGroups<Comm> norm_groups{&tp, &ep};

  // This rank's tokens of every batch, and the teacher's outputs for them.
  const std::int64_t t = o.tokens / (at.tp * at.ep);
  const auto slice = [&](const std::vector<bfloat16_t>& batch) {
    const auto first = batch.begin() + at.slice() * t * o.hidden;
    return upload<Backend>(std::vector<bfloat16_t>(first, first + t * o.hidden), stream);
  };
  std::vector<Buffer<Backend>> x, target;
  for (std::size_t b = 0; b < data.x.size(); ++b) {
    x.push_back(slice(data.x[b]));
    target.push_back(slice(data.target[b]));
  }
  const double elements = static_cast<double>(o.tokens * o.hidden);  // of the whole batch
  Buffer<Backend> y(static_cast<std::size_t>(t * o.hidden) * sizeof(bfloat16_t)), dy(y.bytes());
  // Floats on the device: this rank's part of every step's loss, then of the two evaluation
  // losses (`slots`); the same summed over the ranks (`slots`); the loss kernels' scratch
  // (kScratch); the graphs' loss slot (1).
  constexpr std::int64_t kScratch = 512;
  const std::int64_t slots = o.steps + 2;
  Buffer<Backend> losses(static_cast<std::size_t>(2 * slots + kScratch + 1) * sizeof(float));
  float* const loss_at = losses.template as<float>();
  float* const total_at = loss_at + slots;
  [[maybe_unused]] float* const scratch_at = total_at + slots;
  const auto loss = [&](std::size_t b, float* slot, bool grad) {
    const TensorRef d = grad ? rows_of(dy, t, o.hidden) : TensorRef{};
#if defined(__CUDACC__)
    static_assert(kLossBlocks <= kScratch, "the loss kernels' partial sums must fit the scratch");
    if constexpr (std::is_same_v<Backend, CudaBackend>)
      return mse(rows_of(y, t, o.hidden), target[b].data(), d, elements, slot, scratch_at, stream);
    else
#endif
      return mse(rows_of(y, t, o.hidden), target[b].data(), d, elements, slot, stream);
  };
  /// The sum over all ranks of `count` losses from `first`, on the host.
  const auto total = [&](std::int64_t first, std::int64_t count) {
    ep.all_reduce(loss_at + first, total_at + first, static_cast<std::size_t>(count), parallel::CommElement::fp32,
                  parallel::ReduceOp::sum, stream);
    tp.all_reduce(total_at + first, total_at + first, static_cast<std::size_t>(count), parallel::CommElement::fp32,
                  parallel::ReduceOp::sum, stream);
    std::vector<float> host(static_cast<std::size_t>(count));
    Backend::copy_to_host(host.data(), total_at + first, host.size() * sizeof(float), stream);
    return host;
  };

  /// Queues the training step on batch `b` (its loss into `slot`): forward, loss, backward, AdamW.
  const auto training_step = [&](std::size_t b, float* slot, Timeline<Backend>* timeline) {
    if (timeline) timeline->start();
    block.forward(rows_of(x[b], t, o.hidden), rows_of(y, t, o.hidden), stream, timeline);
    loss(b, slot, true);
    mark(timeline, Phase::rest);
    block.backward(rows_of(dy, t, o.hidden), stream, timeline);
    optimizer.step({block.fc1(), block.fc2()}, stream, norm_groups);
    mark(timeline, Phase::rest);
  };
#if defined(__CUDACC__)
  StepGraphs graphs;
#endif
  Report report;
  // --graph: after one eager step (which sizes every buffer and creates the optimizer's state),
  // capture the whole step of each batch — forward, loss, backward and the AdamW step, whose
  // decisions and bias corrections stay on the device; the loss goes to a fixed slot, copied out
  // after each replay.
  std::function<void(std::size_t, float*)> step = [&](std::size_t b, float* slot) { training_step(b, slot, nullptr); };
  /// Runs step `b` eagerly (into `slot`) and, with --graph, captures the steps; false when
  /// --graph require cannot be met.
  const auto first_step = [&](std::size_t b, float* slot) {
    training_step(b, slot, nullptr);
    if (o.graph == "off") return true;
    if (at.tp * at.ep > 1)
      report.not_graphed = "the expert exchange reads the expert counts on the host (the sizes of its all-to-all)";
#if defined(__CUDACC__)
    if constexpr (std::is_same_v<Backend, CudaBackend>) {
      float* const graph_slot = scratch_at + kScratch;
      for (std::size_t i = 0; i < x.size() && report.not_graphed.empty(); ++i)
        graphs.capture(stream, [&] { training_step(i, graph_slot, nullptr); }, report.not_graphed);
      report.graphed = report.not_graphed.empty();
      if (report.graphed)
        step = [&, graph_slot](std::size_t i, float* into) {
          graphs.launch(i, stream);
          Backend::copy(into, graph_slot, sizeof(float), stream);
        };
    }
#endif
    if (!report.graphed && report.not_graphed.empty()) report.not_graphed = "CUDA graphs need the GPU backend";
    return report.graphed || o.graph != "require";
  };
  const auto evaluate = [&](float* slot) {
    const std::size_t held_out = x.size() - 1;
    block.forward(rows_of(x[held_out], t, o.hidden), rows_of(y, t, o.hidden), stream);
    loss(held_out, slot, false);
  };

  if (o.bench) {
    if (!first_step(0, loss_at)) return report;
    std::vector<double> ms;
    for (int i = 0; i < 3 + o.bench_iters; ++i) {  // each step bracketed by two marks
      Timeline<Backend> timeline(stream);
      timeline.start();
      step(static_cast<std::size_t>(i) % x.size(), loss_at);
      timeline.mark(Phase::rest);
      if (i >= 3) ms.push_back(timeline.totals()[static_cast<std::size_t>(Phase::rest)]);
    }
    std::nth_element(ms.begin(), ms.begin() + static_cast<std::ptrdiff_t>(ms.size() / 2), ms.end());
    report.step_ms = ms[ms.size() / 2];
  } else {
    evaluate(loss_at + o.steps);
    const std::int64_t every = std::max<std::int64_t>(1, o.steps / 40);
    const auto start = std::chrono::steady_clock::now();
    for (std::int64_t s = 0; s < o.steps; ++s) {
      if (s == 0 && !first_step(0, loss_at)) return report;
      if (s > 0) step(static_cast<std::size_t>(s % o.batches), loss_at + s);
      if ((s + 1) % every == 0 || s + 1 == o.steps) {  // every rank joins the sum
        const float now = total(s, 1)[0];
        if (at.leader()) progress(s, o.steps, now, static_cast<double>((s + 1) * o.tokens) / seconds_since(start));
      }
    }
    Backend::synchronize(stream);
    report.seconds = seconds_since(start);
    evaluate(loss_at + o.steps + 1);
    report.losses = total(0, slots);
    report.eval_before = report.losses[static_cast<std::size_t>(o.steps)];
    report.eval_after = report.losses[static_cast<std::size_t>(o.steps + 1)];
    report.losses.resize(static_cast<std::size_t>(o.steps));
  }

  // One profiled step, then the same with the adapters disabled: the expert layers' time is then
  // the base GEMMs' alone.
  Timeline<Backend> profiled(stream);
  training_step(0, loss_at, &profiled);
  report.profile = profiled.totals();
  block.fc1().set_enabled("lora", false);
  block.fc2().set_enabled("lora", false);
  Timeline<Backend> base_only(stream);
  training_step(0, loss_at, &base_only);
  report.base_ms = base_only.totals()[static_cast<std::size_t>(Phase::experts)];
  return report;
}

// ---- ranks ---------------------------------------------------------------------------------------

/// Calls `f(place, ep, tp)` on every rank of a tp × ep grid of host threads and returns the
/// leader's result; the first failure is rethrown.
template <class F>
auto on_host_ranks(int tp, int ep, F&& f) {
  using Comm = parallel::HostThreadCommunicator;
  decltype(f(Place{}, std::declval<Comm&>(), std::declval<Comm&>())) leader{};
  moe::run_host_grid(tp, ep, [&](const Place& at, Comm& ep_comm, Comm& tp_comm) {
    auto result = f(at, ep_comm, tp_comm);
    if (at.leader()) leader = std::move(result);
  });
  return leader;
}

#if defined(__CUDACC__)
/// Calls `f(place, ep, tp)` on a tp × ep grid of threads, one per GPU, over NCCL communicators
/// (moe::run_nccl_grid), and returns the leader's result. NCCL cannot abort a peer waiting in a
/// collective, so a failing rank ends the process (exit status 1) after printing its error.
template <class F>
auto on_gpu_ranks(int tp, int ep, F&& f) {
  using Comm = parallel::NcclCommunicator;
  decltype(f(Place{}, std::declval<Comm&>(), std::declval<Comm&>())) leader{};
  moe::run_nccl_grid(
      tp, ep,
      [&](const Place& at, Comm& ep_comm, Comm& tp_comm) {
        auto result = f(at, ep_comm, tp_comm);
        if (at.leader()) leader = std::move(result);
      },
      [](const Place& at, std::exception_ptr failure) {
        try {
          std::rethrow_exception(failure);
        } catch (const std::exception& e) {
          std::fprintf(stderr, "\nrank (tp %d, ep %d): %s\n", at.q, at.p, e.what());
        } catch (...) {
          std::fprintf(stderr, "\nrank (tp %d, ep %d): an exception that is not a std::exception\n", at.q, at.p);
        }
        std::fflush(stderr);
        std::_Exit(1);
      });
  return leader;
}
#endif

/// Calls `f(place, device, groups)` on every rank of a tp × ep grid of the backend's ranks (host
/// threads, or one thread per GPU), each with its Device and RankGroups, and returns the leader's
/// result.
template <class Backend, class F>
auto on_ranks(int tp, int ep, F&& f) {
  const auto rank = [&]<class Comm>(const Place& at, Comm& ep_comm, Comm& tp_comm) {
    Device<Backend> dev(at.q * at.ep + at.p);
    RankGroups<Comm> groups{ep_comm, tp_comm};
    return f(at, dev, groups);
  };
#if defined(__CUDACC__)
  if constexpr (std::is_same_v<Backend, CudaBackend>) return on_gpu_ranks(tp, ep, rank);
  else
#endif
    return on_host_ranks(tp, ep, rank);
}

/// The teacher's outputs on every batch, computed on one rank by the block with the teacher's
/// weights (unquantized, no adapters). --bench: one batch and any target.
template <class Backend>
Data make_data(const Options& o) {
  Data data;
  for (std::int64_t b = 0; b <= (o.bench ? 1 : o.batches); ++b) data.x.push_back(tokens(o, b));
  if (o.bench) {
    data.target = data.x;
    std::rotate(data.target.begin(), data.target.begin() + 1, data.target.end());
    return data;
  }
  data.target = on_ranks<Backend>(1, 1, [&](const Place& at, Device<Backend>& dev, auto& groups) {
    auto teacher = make_block(o, dev, at, groups, o.format == "none", "none");
    Buffer<Backend> y(static_cast<std::size_t>(o.tokens * o.hidden) * sizeof(bfloat16_t));
    std::vector<std::vector<bfloat16_t>> targets;
    for (const auto& x : data.x) {
      const Buffer<Backend> x_dev = upload<Backend>(x, dev.stream);
      teacher.forward(rows_of(x_dev, o.tokens, o.hidden), rows_of(y, o.tokens, o.hidden), dev.stream);
      std::vector<bfloat16_t>& target = targets.emplace_back(x.size());
      Backend::copy_to_host(target.data(), y.data(), y.bytes(), dev.stream);
    }
    return targets;
  });
  return data;
}

/// Trains on a tp × ep grid of the backend's ranks.
template <class Backend>
Report train_on(const Options& o, const Data& data, int tp, int ep) {
  Options layout = o;
  layout.tp = tp, layout.ep = ep;
  return on_ranks<Backend>(tp, ep, [&](const Place& at, Device<Backend>& dev, auto& groups) {
    return train(layout, dev, data, at, groups);
  });
}

// ---- reports -------------------------------------------------------------------------------------

/// How far the losses of a tp × ep run may be from the one-rank run's, as a fraction of the loss
/// before training (the scale of the problem): fc2's bf16 partial sums added over TP round
/// differently from one rank's fp32 sum, and as training converges those differences grow
/// relative to the remaining loss, not to its scale. Expert parallelism alone changes only the order
/// in which the loss itself is summed.
constexpr double kLayoutTolerance = 1e-2;

/// Prints the run's results; the exit status (0: training halved the held-out loss, or lowered it
/// for a quantized student; --bench: 0).
int print_report(const Options& o, const Report& r) {
  if (o.graph != "off" && !r.graphed) {
    std::printf("\nthe training step cannot be captured in a CUDA graph: %s\n(a step is capturable on one rank "
                "with an expert base that keeps the expert counts on the device)\n",
                r.not_graphed.c_str());
    if (o.graph == "require") return kSkipped;
  }
  if (r.graphed) std::printf("\nsteps ran as CUDA graphs (forward, loss, backward, AdamW)\n");
  const std::array<double, kPhases>& p = r.profile;
  double total = 0.0;
  for (double ms : p) total += ms;
  const double experts = p[static_cast<std::size_t>(Phase::experts)];
  if (!o.bench) {
    std::printf("\n  %.2f s (%.1f ms per step, %.0f tokens/s)\n\n", r.seconds,
                1e3 * r.seconds / double(std::max<std::int64_t>(o.steps, 1)),
                static_cast<double>(o.steps * o.tokens) / std::max(r.seconds, 1e-9));
    std::printf("held-out loss (%.0e x MSE against the teacher)\n", kLossScale);
    std::printf("  %-16s %.4e\n", "before training", static_cast<double>(r.eval_before));
    std::printf("  %-16s %.4e   (%.3f of before)\n\n", "after training", static_cast<double>(r.eval_after),
                static_cast<double>(r.eval_after / r.eval_before));
  }
  std::printf("step time of a profiled training step (forward + backward + AdamW)%s\n",
              o.tp * o.ep > 1 ? ", rank 0" : "");
  const auto row = [&](const char* name, double ms) {
    std::printf("  %-28s %8.3f ms  %5.1f%%\n", name, ms, 100.0 * ms / std::max(total, 1e-12));
  };
  row("router / permute / combine", p[static_cast<std::size_t>(Phase::router)]);
  if (o.tp * o.ep > 1) row("token exchange (EP, TP)", p[static_cast<std::size_t>(Phase::exchange)]);
  row("base GEMMs", std::min(r.base_ms, experts));
  row(o.tp > 1 ? "LoRA (+ its TP all-reduces)" : "LoRA (both projections)", std::max(experts - r.base_ms, 0.0));
  row("rest (SwiGLU, loss, AdamW)", p[static_cast<std::size_t>(Phase::rest)]);
  row("total", total);
  // Success: the hidden low-rank updates are learnable, so the loss must at least halve; a
  // quantization residual is full-rank, so a rank-r adapter must only lower it.
  if (!o.bench) return r.eval_after < (o.format == "none" ? 0.5f : 1.0f) * r.eval_before ? 0 : 1;

  const double tokens_per_second = static_cast<double>(o.tokens) / (r.step_ms * 1e-3);
  std::printf("\nbench: hidden %lld, ffn %lld, %lld experts, top-%lld, %lld tokens, rank %lld%s: "
              "%.3f ms per step (median of %d), %.0f tokens/s\n",
              static_cast<long long>(o.hidden), static_cast<long long>(o.ffn), static_cast<long long>(o.experts),
              static_cast<long long>(o.top_k), static_cast<long long>(o.tokens), static_cast<long long>(o.rank),
              r.graphed ? ", CUDA graphs" : "", r.step_ms, o.bench_iters, tokens_per_second);
  if (o.json.empty()) return 0;
  std::FILE* f = std::fopen(o.json.c_str(), "w");
  if (!f) {
    std::fprintf(stderr, "cannot write %s\n", o.json.c_str());
    return 1;
  }
  std::fprintf(f,
               "{\"hidden\": %lld, \"ffn\": %lld, \"experts\": %lld, \"top_k\": %lld, \"tokens\": %lld, \"rank\": %lld, "
               "\"format\": \"%s\", \"tp\": %d, \"ep\": %d, \"graphed\": %s, \"step_ms\": %.6f, \"tokens_per_s\": %.1f, "
               "\"router_ms\": %.6f, \"exchange_ms\": %.6f, \"base_ms\": %.6f, \"lora_ms\": %.6f, \"rest_ms\": %.6f}\n",
               static_cast<long long>(o.hidden), static_cast<long long>(o.ffn), static_cast<long long>(o.experts),
               static_cast<long long>(o.top_k), static_cast<long long>(o.tokens), static_cast<long long>(o.rank),
               o.format.c_str(), o.tp, o.ep, r.graphed ? "true" : "false", r.step_ms, tokens_per_second,
               p[static_cast<std::size_t>(Phase::router)], p[static_cast<std::size_t>(Phase::exchange)],
               std::min(r.base_ms, experts), std::max(experts - r.base_ms, 0.0), p[static_cast<std::size_t>(Phase::rest)]);
  std::fclose(f);
  return 0;
}

/// Compares a tp × ep run with the one-rank run of the same block and data; the exit status (0:
/// every loss within kLayoutTolerance of the loss before training).
int print_layout_check(const Options& o, const Report& parallel, const Report& single) {
  const double scale = std::max(static_cast<double>(single.eval_before), 1e-30);
  const auto gap = [&](float a, float b) { return std::abs(static_cast<double>(a) - b) / scale; };
  double worst_step = 0.0;
  for (std::size_t s = 0; s < single.losses.size(); ++s)
    worst_step = std::max(worst_step, gap(parallel.losses[s], single.losses[s]));
  const double before = gap(parallel.eval_before, single.eval_before), after = gap(parallel.eval_after, single.eval_after);
  const bool agree = std::max({worst_step, before, after}) <= kLayoutTolerance;
  std::printf("\nlayout check: tp %d x ep %d against the same training on one rank\n", o.tp, o.ep);
  std::printf("  (differences as a fraction of the held-out loss before training)\n");
  std::printf("  %-28s %.4e vs %.4e   %.1e\n", "held-out loss before", static_cast<double>(parallel.eval_before),
              static_cast<double>(single.eval_before), before);
  std::printf("  %-28s %.4e vs %.4e   %.1e\n", "held-out loss after", static_cast<double>(parallel.eval_after),
              static_cast<double>(single.eval_after), after);
  std::printf("  %-28s %.1e\n", "training loss, worst step", worst_step);
  std::printf("  the losses %s the one-rank losses within %.0e\n", agree ? "equal" : "DIFFER FROM", kLayoutTolerance);
  return agree ? 0 : 1;
}

template <class Backend>
int run(const Options& o) {
  std::printf("backend: %s", Device<Backend>::name().c_str());
  if (o.tp * o.ep > 1)
    std::printf(", %d ranks (tp %d x ep %d) as %s", o.tp * o.ep, o.tp, o.ep,
                std::is_same_v<Backend, HostBackend> ? "host threads" : "one thread per GPU over NCCL");
  std::printf("\nblock: hidden %lld, ffn %lld, %lld experts, top-%lld, %lld tokens per batch; LoRA rank %lld on fc1 "
              "and fc2; base %s\n",
              static_cast<long long>(o.hidden), static_cast<long long>(o.ffn), static_cast<long long>(o.experts),
              static_cast<long long>(o.top_k), static_cast<long long>(o.tokens), static_cast<long long>(o.rank),
              o.format == "none" ? "bf16 (teacher: plus hidden rank-4 updates)" : (o.format + " (teacher: bf16)").c_str());
  const Data data = make_data<Backend>(o);
  if (!o.bench) {
    std::printf("training %lld steps on %lld batches (AdamW, lr %.1e, ", static_cast<long long>(o.steps),
                static_cast<long long>(o.batches), static_cast<double>(o.lr));
    if (o.clip > 0.0f) std::printf("gradient norm clipped to %g)\n", static_cast<double>(o.clip));
    else std::printf("no clipping)\n");
  }
  const Report report = train_on<Backend>(o, data, o.tp, o.ep);
  int status = print_report(o, report);
  if (o.bench || o.tp * o.ep == 1 || status == kSkipped) return status;
  std::printf("\ntraining again on one rank\n");
  const Report single = train_on<Backend>(o, data, 1, 1);
  std::printf("\n");
  return std::max(status, print_layout_check(o, report, single));
}

}  // namespace

int main(int argc, char** argv) {
  Options o;
  CLI::App app{"A Qwen3-MoE-like block with LoRA on both expert projections, trained to match a teacher"};
  app.add_option("--hidden", o.hidden, "hidden size (fc1's input, fc2's output)");
  app.add_option("--ffn", o.ffn, "expert FFN size (fc1's output is 2·ffn: [gate; up])");
  app.add_option("--experts", o.experts, "experts");
  app.add_option("--top-k", o.top_k, "experts per token");
  app.add_option("--tokens", o.tokens, "tokens per batch");
  app.add_option("--rank", o.rank, "LoRA rank of both projections");
  app.add_option("--steps", o.steps, "AdamW steps");
  app.add_option("--batches", o.batches, "distinct training batches (cycled); one more is held out");
  app.add_option("--lr", o.lr, "AdamW learning rate");
  app.add_option("--clip", o.clip, "clip the global gradient norm (over all ranks) to this; 0: off");
  app.add_option("--tp", o.tp, "tensor-parallel ranks (they split ffn)");
  app.add_option("--ep", o.ep, "expert-parallel ranks (they split the experts)");
  app.add_option("--format", o.format, "quantized base: none, int8, int8_channel, int4, fp8, nvfp4, nf4, mxfp4");
  app.add_option("--seed", o.seed, "seed of the synthetic weights and tokens");
  app.add_flag("--cpu", o.cpu, "run on the CPU even when a GPU is present");
  app.add_flag("--gpu", o.gpu, "run on the GPUs, or exit 77 (a skipped test) when there are fewer than --tp x --ep");
  app.add_flag("--bench", o.bench, "time the training step (median of --bench-iters) instead of training");
  app.add_option("--bench-iters", o.bench_iters, "timed steps of --bench");
  app.add_option("--json", o.json, "--bench: also write the result as JSON to this file");
  app.add_option("--graph", o.graph,
                 "off, auto (run the steps as CUDA graphs when they can be captured) or require (exit 77 when "
                 "they cannot)");
  try {
    app.parse(argc, argv);
  } catch (const CLI::CallForHelp& e) {
    return app.exit(e);
  } catch (const CLI::ParseError& e) {
    app.exit(e);
    return 2;
  }
  if (o.cpu && o.gpu) {
    std::fprintf(stderr, "moe_block: --cpu and --gpu exclude each other\n");
    return 2;
  }
  if (const std::string problem = invalid(o); !problem.empty()) {
    std::fprintf(stderr, "moe_block: %s\n", problem.c_str());
    return 2;
  }
  try {
    int devices = 0;
#if defined(__CUDACC__)
    if (o.cpu || cudaGetDeviceCount(&devices) != cudaSuccess) devices = 0;
#endif
    if (o.gpu && devices < o.tp * o.ep) {
      std::printf("moe_block --gpu: %d GPU(s) usable by this build, %d needed: skipped\n", devices, o.tp * o.ep);
      return kSkipped;
    }
#if defined(__CUDACC__)
    if (devices > 0) {
      if (o.tp * o.ep > devices) {
        std::fprintf(stderr, "moe_block: --tp %d x --ep %d needs %d GPUs, %d present (--cpu runs the ranks as host threads)\n",
                     o.tp, o.ep, o.tp * o.ep, devices);
        return 2;
      }
      return run<CudaBackend>(o);
    }
#endif
    return run<HostBackend>(o);
  } catch (const moelora::Error& e) {
    std::fprintf(stderr, "\n%s\n", e.what());
    return 1;
  }
}
