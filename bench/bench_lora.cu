// The GPU benchmark of issues #2 and #12: for every shape of DESIGN.md §8, rank 16 and 64, uniform
// and Zipf counts, all with device counts: the base's forward and input-gradient GEMMs (each sm90
// tile configuration too), the LoRA delta forward alone (in-place add) against its byte floor, the
// LoRA branch's forward + backward (fresh outputs, and accumulating into existing ones), the whole
// layer's forward and forward + backward against the base's (and, on the sm90 GEMM, against the same
// layer with the LoRA expand in a pass of its own instead of riding on the GEMM), and the training step (forward,
// backward, AdamW) run eagerly and replayed from a CUDA graph. Writes JSON for bench/report.py,
// which joins it with bench/torch_anchors.py. Run: bench/run.sh
#include <CLI/CLI.hpp>

#include <algorithm>
#include <cstdio>
#include <fstream>
#include <string>
#include <vector>

#include "moelora/moelora.hpp"
#include "device_data.cuh"
#include "shapes.hpp"
#include "timing.cuh"

namespace moelora::bench {

/// A base whose output the caller already holds (a fused or precomputed base): forward and
/// backward_input leave y and dx as they are, so GroupedLoRA<PrecomputedBase> times the LoRA
/// branch alone, device-count scan included.
struct PrecomputedBase {
  using backend_type = CudaBackend;
  std::int64_t experts, in, out;
  std::int64_t num_experts() const { return experts; }
  std::int64_t in_features() const { return in; }
  std::int64_t out_features() const { return out; }
  DType dtype() const { return DType::bf16; }
  void forward(ConstTensorRef, const ExpertSegments&, TensorRef, cudaStream_t) const {}
  void backward_input(ConstTensorRef, const ExpertSegments&, TensorRef, cudaStream_t) const {}
};

/// A base whose output is zero, modelling AccumulatingGroupedLinearBase: GroupedLoRA<ZeroBase>
/// computes the LoRA branch alone into fresh outputs (y = delta, dx = its input gradient), the work
/// of torch's `(grouped_mm(grouped_mm(x, Aᵀ), Bᵀ) * scale).backward(dy)`.
struct ZeroBase : PrecomputedBase {
  void forward(ConstTensorRef, const ExpertSegments&, TensorRef y, cudaStream_t stream, WriteMode mode) const {
    if (mode == WriteMode::overwrite) CudaBackend::fill_zero(y.data, y.bytes(), stream);
  }
  void backward_input(ConstTensorRef, const ExpertSegments&, TensorRef dx, cudaStream_t stream, WriteMode mode) const {
    if (mode == WriteMode::overwrite) CudaBackend::fill_zero(dx.data, dx.bytes(), stream);
  }
  using PrecomputedBase::backward_input, PrecomputedBase::forward;
};

}  // namespace moelora::bench

namespace {

using namespace moelora;
using moelora::bench::copy_bandwidth;
using moelora::bench::fill;
using moelora::bench::median_ms;
using bench::PrecomputedBase;
using bench::ZeroBase;

/// A time for the JSON: null when not measured (≤ 0).
std::string json_ms(double ms) { return ms > 0 ? std::to_string(ms) : "null"; }

struct Record {
  std::string shape, counts;
  std::int64_t rank;
  double base_fwd, lora_fwd, floor_fwd, lora_fwdbwd, base_fwdbwd;
  double branch_fwdbwd;        // LoRA branch into fresh y, dx and gradients (torch's branch semantics)
  double branch_accum_fwdbwd;  // LoRA branch added into existing y, dx and gradients
  double base_dgrad;           // the base's input gradient alone
  double layer_fwd;            // the whole layer's forward (on the sm90 GEMM: the expand riding on it)
  double step, graph_step;     // forward + backward (fresh gradients) + AdamW: eager, and one graph replay
  std::string gemm;            // the base's GEMM strategy
  // The sm90 grouped GEMM per tile configuration (−1: not measured): forward and input gradient.
  double fwd_cooperative = -1, fwd_pingpong = -1, dgrad_cooperative = -1, dgrad_pingpong = -1;
  // The same GEMMs on the tile the base picks, with a rank-r LowRankAddend in the K loop (−1: not measured).
  double fwd_addend = -1, dgrad_addend = -1;
  // The layer with the expand in a pass of its own over the same sm90 base (−1: not measured):
  // forward, and forward + backward (fresh gradients).
  double apart_fwd = -1, apart_fwdbwd = -1;
};

/// Median ms of replaying a CUDA graph of `f` (captured once, global mode).
template <class F>
double graph_median_ms(cudaStream_t stream, int iters, F&& f) {
  cudaGraph_t graph = nullptr;
  cudaGraphExec_t exec = nullptr;
  MOELORA_CUDA_CHECK(cudaStreamBeginCapture(stream, cudaStreamCaptureModeGlobal));
  f();
  MOELORA_CUDA_CHECK(cudaStreamEndCapture(stream, &graph));
  MOELORA_CUDA_CHECK(cudaGraphInstantiate(&exec, graph, 0));
  const double ms = median_ms(stream, iters, [&] { MOELORA_CUDA_CHECK(cudaGraphLaunch(exec, stream)); });
  cudaGraphExecDestroy(exec);
  cudaGraphDestroy(graph);
  return ms;
}

/// The CUDA base that never takes the expand into its GEMM: the layer adds it in a pass of its own.
struct ExpandApartBase : GroupedLinear<CudaBackend> {
  [[nodiscard]] bool fuses_low_rank(std::int64_t, DType) const { return false; }
};

Record measure(const bench::Shape& s, std::int64_t rank, const std::string& kind, double copy_gbps, int iters,
               GemmStrategy strategy, cublasHandle_t handle, cudaStream_t stream) {
  const std::vector<std::int64_t> counts = bench::routed_counts(s, kind);
  Buffer<CudaBackend> device_counts(counts.size() * sizeof(std::int64_t));
  CudaBackend::copy_from_host(device_counts.data(), counts.data(), device_counts.bytes(), stream);
  const ExpertCounts dev_counts = expert_counts(device_counts.as<const std::int64_t>(), s.experts, Memory::device);

  const auto tensor = [&](Shape shape, std::uint64_t seed, float scale) {
    Buffer<CudaBackend> b(static_cast<std::size_t>(shape.numel()) * 2);
    fill(b.data(), shape.numel(), seed, scale, stream);
    return b;
  };
  Buffer<CudaBackend> x = tensor({s.rows, s.in}, 11, 1.0f), y = tensor({s.rows, s.out}, 12, 1.0f);
  Buffer<CudaBackend> dy = tensor({s.rows, s.out}, 13, 1.0f), dx = tensor({s.rows, s.in}, 14, 1.0f);
  const ConstTensorRef xr{x.data(), DType::bf16, {s.rows, s.in}}, dyr{dy.data(), DType::bf16, {s.rows, s.out}};
  const TensorRef yr{y.data(), DType::bf16, {s.rows, s.out}}, dxr{dx.data(), DType::bf16, {s.rows, s.in}};

  AdapterConfig config;
  config.rank = rank;
  const auto randomize_b = [&](auto& layer) {
    const AdapterView v = layer.adapter("bench");
    fill(v.b.data, v.b.numel(), 21, 0.02f, stream);  // never time on zeros
  };

  Record r{s.name, kind, rank, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, ""};
  {
    GroupedLoRA<PrecomputedBase> delta(PrecomputedBase{s.experts, s.in, s.out});
    delta.add_adapter("bench", config, stream);
    randomize_b(delta);
    delta.reserve(s.rows);
    r.lora_fwd = median_ms(stream, iters, [&] { delta.forward(xr, dev_counts, yr, stream); });
    r.branch_accum_fwdbwd = median_ms(stream, iters, [&] {
      delta.forward(xr, dev_counts, yr, stream);
      delta.backward(xr, dev_counts, dyr, dxr, stream);
    });
    delta.workspace().check_counts(stream);
  }
  {
    GroupedLoRA<ZeroBase> branch(ZeroBase{{s.experts, s.in, s.out}});
    branch.add_adapter("bench", config, stream);
    randomize_b(branch);
    branch.reserve(s.rows);
    r.branch_fwdbwd = median_ms(stream, iters, [&] {
      branch.forward(xr, dev_counts, yr, stream);
      branch.backward(xr, dev_counts, dyr, dxr, stream, WriteMode::overwrite);
    });
    branch.workspace().check_counts(stream);
  }
  r.floor_fwd = bench::forward_floor_bytes(s, rank) / (copy_gbps * 1e6);
  {
    using Layer = GroupedLoRA<GroupedLinear<CudaBackend>>;
    GroupedLinear<CudaBackend> base(handle, s.experts, s.in, s.out, DType::bf16, strategy);
    fill(base.weight().data, base.weight().numel(), 31, 0.02f, stream);
    r.gemm = gemm_strategy_name(base.strategy());
    Layer layer(std::move(base));
    {
      CudaBackend::Workspace ws;
      const ExpertSegments& seg = ws.prepare_segments(dev_counts, s.rows, stream);
      r.base_fwd = median_ms(stream, iters, [&] { layer.base().forward(xr, seg, yr, stream); });
      r.base_dgrad = median_ms(stream, iters, [&] { layer.base().backward_input(dyr, seg, dxr, stream); });
      r.base_fwdbwd = median_ms(stream, iters, [&] {
        layer.base().forward(xr, seg, yr, stream);
        layer.base().backward_input(dyr, seg, dxr, stream);
      });
#if defined(MOELORA_HAVE_CUTLASS)
      if (layer.base().strategy() == GemmStrategy::sm90_grouped) {
        sm90::Sm90GroupedGemm gemm({DType::bf16, s.experts, s.out, s.in});
        const void* w = layer.base().weight().data;
        Buffer<CudaBackend> h = tensor({s.rows, rank}, 41, 1.0f), b = tensor({s.experts, s.out, rank}, 42, 0.02f);
        Buffer<CudaBackend> a = tensor({s.experts, rank, s.in}, 43, 0.02f);
        r.fwd_addend = median_ms(stream, iters, [&] {
          gemm.run({GemmDirection::forward, w, seg.offsets, 0, s.experts, x.data(), y.data(), WriteMode::overwrite,
                    {h.data(), b.data(), rank}},
                   sm90::tile_for(s.rows, s.experts, s.out), stream);
        });
        r.dgrad_addend = median_ms(stream, iters, [&] {
          gemm.run({GemmDirection::backward_input, w, seg.offsets, 0, s.experts, dy.data(), dx.data(),
                    WriteMode::overwrite, {h.data(), a.data(), rank}},
                   sm90::tile_for(s.rows, s.experts, s.in), stream);
        });
        for (const sm90::GemmTile tile : {sm90::GemmTile::cooperative, sm90::GemmTile::pingpong}) {
          const bool coop = tile == sm90::GemmTile::cooperative;
          (coop ? r.fwd_cooperative : r.fwd_pingpong) = median_ms(stream, iters, [&] {
            gemm.run({GemmDirection::forward, w, seg.offsets, 0, s.experts, x.data(), y.data(), WriteMode::overwrite, {}},
                     tile, stream);
          });
          (coop ? r.dgrad_cooperative : r.dgrad_pingpong) = median_ms(stream, iters, [&] {
            gemm.run({GemmDirection::backward_input, w, seg.offsets, 0, s.experts, dy.data(), dx.data(),
                      WriteMode::overwrite, {}},
                     tile, stream);
          });
        }
      }
#endif
    }
    layer.add_adapter("bench", config, stream);
    randomize_b(layer);
    layer.reserve(s.rows);
    r.layer_fwd = median_ms(stream, iters, [&] { layer.forward(xr, dev_counts, yr, stream); });
    r.lora_fwdbwd = median_ms(stream, iters, [&] {  // fresh gradients, as torch's step (grads set to None)
      layer.forward(xr, dev_counts, yr, stream);
      layer.backward(xr, dev_counts, dyr, dxr, stream, WriteMode::overwrite);
    });
    AdamW<Layer> optimizer;
    const auto step = [&] {
      layer.forward(xr, dev_counts, yr, stream);
      layer.backward(xr, dev_counts, dyr, dxr, stream, WriteMode::overwrite);
      optimizer.step(layer, stream);
    };
    r.step = median_ms(stream, iters, step);  // its warm-up creates the optimizer state
    // A host-synchronising base (cuBLAS with device counts) cannot be captured.
    if (layer.base().strategy() == GemmStrategy::sm90_grouped) r.graph_step = graph_median_ms(stream, iters, step);
    layer.workspace().check_counts(stream);
    if (layer.base().strategy() == GemmStrategy::sm90_grouped) {
      const AdapterView fused = layer.adapter("bench");
      GroupedLoRA<ExpandApartBase> apart(ExpandApartBase{std::move(layer.base())});
      apart.add_adapter("bench", config, stream);
      const AdapterView v = apart.adapter("bench");
      CudaBackend::copy(v.a.data, fused.a.data, v.a.bytes(), stream);
      CudaBackend::copy(v.b.data, fused.b.data, v.b.bytes(), stream);
      apart.reserve(s.rows);
      r.apart_fwd = median_ms(stream, iters, [&] { apart.forward(xr, dev_counts, yr, stream); });
      r.apart_fwdbwd = median_ms(stream, iters, [&] {
        apart.forward(xr, dev_counts, yr, stream);
        apart.backward(xr, dev_counts, dyr, dxr, stream, WriteMode::overwrite);
      });
    }
  }
  return r;
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"moelora LoRA benchmark (bf16): delta forward vs byte floor, layer forward+backward vs base"};
  std::string out_path = "bench_lora.json";
  std::vector<std::string> wanted, count_kinds{"uniform", "zipf"};
  std::vector<std::int64_t> ranks{16, 64};
  int iters = 20;
  std::string gemm = "auto";
  app.add_option("--out", out_path, "JSON output file");
  app.add_option("--shapes", wanted, "comma-separated shape names (default: all)")->delimiter(',');
  app.add_option("--ranks", ranks, "comma-separated ranks")->delimiter(',');
  app.add_option("--counts", count_kinds, "comma-separated count kinds: uniform, zipf")->delimiter(',');
  app.add_option("--iters", iters, "timed iterations per measurement (median)");
  app.add_option("--gemm", gemm, "base GEMM strategy: auto, sm90_grouped, per_expert, grouped")
      ->check(CLI::IsMember({"auto", "sm90_grouped", "per_expert", "grouped"}));
  CLI11_PARSE(app, argc, argv);
  const GemmStrategy strategy = gemm == "grouped"        ? GemmStrategy::grouped
                                : gemm == "per_expert"   ? GemmStrategy::per_expert
                                : gemm == "sm90_grouped" ? GemmStrategy::sm90_grouped
                                                         : GemmStrategy::automatic;

  int devices = 0;
  if (cudaGetDeviceCount(&devices) != cudaSuccess || devices == 0) {
    std::fprintf(stderr, "bench_lora: no CUDA device\n");
    return 1;
  }
  cudaDeviceProp prop{};
  MOELORA_CUDA_CHECK(cudaGetDeviceProperties(&prop, 0));
  cudaStream_t stream;
  cublasHandle_t handle;
  MOELORA_CUDA_CHECK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  MOELORA_CUBLAS_CHECK(cublasCreate(&handle));
  const double copy_gbps = copy_bandwidth(stream);
  std::fprintf(stderr, "%s: copy bandwidth %.0f GB/s\n", prop.name, copy_gbps);

  std::vector<Record> records;
  std::printf("%-20s %3s %-7s %9s %9s %9s %9s %6s %10s %10s %10s %10s %8s %9s %9s\n", "shape", "r", "counts",
              "base fwd", "base dx", "LoRA fwd", "floor", "%floor", "LoRA f+b", "f+b (+=)", "base f+b", "layer f+b",
              "overhead", "step", "graph");
  for (const auto& s : bench::kShapes) {
    if (!wanted.empty() && std::find(wanted.begin(), wanted.end(), s.name) == wanted.end()) continue;
    for (const std::int64_t rank : ranks)
      for (const std::string& kind : count_kinds) {
        const Record r = measure(s, rank, kind, copy_gbps, iters, strategy, handle, stream);
        records.push_back(r);
        std::printf("%-20s %3lld %-7s %9.3f %9.3f %9.3f %9.3f %5.0f%% %10.3f %10.3f %10.3f %10.3f %7.0f%% %9.3f %9.3f\n",
                    r.shape.c_str(), static_cast<long long>(r.rank), r.counts.c_str(), r.base_fwd, r.base_dgrad,
                    r.lora_fwd, r.floor_fwd, 100.0 * r.floor_fwd / r.lora_fwd, r.branch_fwdbwd,
                    r.branch_accum_fwdbwd, r.base_fwdbwd, r.lora_fwdbwd,
                    100.0 * (r.lora_fwdbwd - r.base_fwdbwd) / r.base_fwdbwd, r.step, r.graph_step);
        if (r.fwd_cooperative > 0)
          std::printf("    sm90 tiles: fwd cooperative %.3f pingpong %.3f | dx cooperative %.3f pingpong %.3f | "
                      "with the rank-r addend: fwd %.3f dx %.3f\n",
                      r.fwd_cooperative, r.fwd_pingpong, r.dgrad_cooperative, r.dgrad_pingpong, r.fwd_addend,
                      r.dgrad_addend);
        if (r.apart_fwd > 0)
          std::printf("    layer fwd %.3f (expand apart %.3f) | layer f+b %.3f (expand apart %.3f)\n", r.layer_fwd,
                      r.apart_fwd, r.lora_fwdbwd, r.apart_fwdbwd);
        std::fflush(stdout);
      }
  }

  std::ofstream out(out_path);
  out << "{\"device\": \"" << prop.name << "\", \"copy_GBps\": " << copy_gbps << ", \"records\": [\n";
  for (std::size_t i = 0; i < records.size(); ++i) {
    const Record& r = records[i];
    const auto& s = *std::find_if(bench::kShapes.begin(), bench::kShapes.end(), [&](auto& x) { return x.name == r.shape; });
    out << "  {\"shape\": \"" << r.shape << "\", \"E\": " << s.experts << ", \"in\": " << s.in << ", \"out\": " << s.out
        << ", \"T\": " << s.rows << ", \"rank\": " << r.rank << ", \"counts\": \"" << r.counts
        << "\", \"base_fwd_ms\": " << r.base_fwd << ", \"lora_fwd_ms\": " << r.lora_fwd
        << ", \"floor_fwd_ms\": " << r.floor_fwd << ", \"lora_fwdbwd_ms\": " << r.lora_fwdbwd
        << ", \"base_fwdbwd_ms\": " << r.base_fwdbwd << ", \"branch_fwdbwd_ms\": " << r.branch_fwdbwd
        << ", \"branch_accum_fwdbwd_ms\": " << r.branch_accum_fwdbwd << ", \"base_dgrad_ms\": " << r.base_dgrad
        << ", \"layer_fwd_ms\": " << r.layer_fwd << ", \"step_ms\": " << r.step
        << ", \"graph_step_ms\": " << json_ms(r.graph_step) << ", \"gemm\": \"" << r.gemm
        << "\", \"fwd_cooperative_ms\": " << json_ms(r.fwd_cooperative) << ", \"fwd_pingpong_ms\": "
        << json_ms(r.fwd_pingpong) << ", \"dgrad_cooperative_ms\": " << json_ms(r.dgrad_cooperative)
        << ", \"dgrad_pingpong_ms\": " << json_ms(r.dgrad_pingpong) << ", \"apart_fwd_ms\": " << json_ms(r.apart_fwd)
        << ", \"apart_fwdbwd_ms\": " << json_ms(r.apart_fwdbwd) << ", \"fwd_addend_ms\": " << json_ms(r.fwd_addend)
        << ", \"dgrad_addend_ms\": " << json_ms(r.dgrad_addend) << "}" << (i + 1 < records.size() ? ",\n" : "\n");
  }
  out << "]}\n";
  cublasDestroy(handle);
  cudaStreamDestroy(stream);
  return 0;
}
