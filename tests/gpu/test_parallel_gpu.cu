// Tensor and expert parallelism on the CUDA backend through NcclCommunicator: one thread and one NCCL
// rank per GPU (a TP × EP grid needs tp · ep GPUs; a single-GPU machine runs the one-rank layouts,
// whose collectives NCCL turns into copies, through every tensor-parallel code path), and a TP
// layer's forward and backward captured in a CUDA graph.
#include <doctest/doctest.h>

#include <vector>

#include "cases/parallel_cases.hpp"
#include "moelora/moe/nccl_grid.hpp"
#include "support/cuda_harness.cuh"

namespace {

using namespace moelora;

/// One thread per GPU over NCCL (moe::run_nccl_grid): rank (TP t, EP e) runs in the TP group of EP
/// rank e. A rank that fails may leave the others waiting in NCCL; the test's timeout ends such a
/// run.
struct NcclRanks {
  using Harness = testing::CudaHarness;
  using Comm = parallel::NcclCommunicator;

  static int max_ranks() {
    int devices = 0;
    MOELORA_CUDA_CHECK(cudaGetDeviceCount(&devices));
    return devices;
  }

  template <class F>
  static void run(int tp, int ep, F&& f) {
    REQUIRE(tp * ep <= max_ranks());
    moe::run_nccl_grid(tp, ep, [&](const moe::GridPlace& at, Comm&, Comm& tp_comm) {
      Harness h;
      testing::RankEnv<Harness, Comm> env{h, tp_comm, at.q, at.p, tp, ep};
      f(env);
      CudaBackend::synchronize(h.stream());
    });
  }
};

/// A base that contributes zeros (y = 0, dx = 0) and needs no host sizes: the LoRA branch alone,
/// capturable in a CUDA graph (the cuBLAS reference base reads device counts on the host).
struct ZeroBase {
  using backend_type = CudaBackend;
  std::int64_t experts, in, out;
  DType type;
  [[nodiscard]] std::int64_t num_experts() const { return experts; }
  [[nodiscard]] std::int64_t in_features() const { return in; }
  [[nodiscard]] std::int64_t out_features() const { return out; }
  [[nodiscard]] DType dtype() const { return type; }
  void forward(ConstTensorRef, const ExpertSegments&, TensorRef y, cudaStream_t stream) {
    CudaBackend::fill_zero(y.data, y.bytes(), stream);
  }
  void backward_input(ConstTensorRef, const ExpertSegments&, TensorRef dx, cudaStream_t stream) {
    CudaBackend::fill_zero(dx.data, dx.bytes(), stream);
  }
};

}  // namespace

MOELORA_PARALLEL_CASES(NcclRanks);

TEST_CASE_TEMPLATE("a tensor-parallel layer's forward and backward replay from a CUDA graph bit for bit", Mode,
                   policy::ColumnParallel, policy::RowParallel) {
  using namespace moelora::testing;
  const int tp = NcclRanks::max_ranks();
  constexpr bool kColumn = std::is_same_v<Mode, policy::ColumnParallel>;
  GlobalProblem g(4, 256, 256, 16, 600, DType::bf16);
  INFO("seed " << g.rng.seed << " tp " << tp);
  const Layout<Mode> l{tp, 1, kColumn ? 2 : 1};
  std::vector<std::string> failures(static_cast<std::size_t>(tp));
  NcclRanks::run(tp, 1, [&](auto& env) {
    const int t = env.tp_rank;
    CudaDeviceCountsHarness h;  // device counts: the step has no host sync
    const std::int64_t in = kColumn ? g.in : g.in / tp, out = kColumn ? g.out / tp : g.out;
    GroupedLoRA<ZeroBase, Mode> layer(ZeroBase{g.experts, in, out, g.dtype}, env.tp, l.placement(g, 0), h.stream());
    layer.add_adapter("ad", g.config(), h.stream());
    const AdapterView v = layer.adapter("ad");
    h.write(v.a, cut_factor(g.a, 0, g.experts, l.a_axis(), tp, t));
    h.write(v.b, cut_factor(g.b, 0, g.experts, l.b_axis(), tp, t, l.blocks));
    const auto x = h.upload(cut_rows(g.x, 0, g.rows, l.x_axis(), tp, t));
    const auto dy = h.upload(cut_rows(g.dy, 0, g.rows, l.y_axis(), tp, t, l.blocks));
    auto y = h.poisoned(g.dtype, {g.rows, out}), dx = h.poisoned(g.dtype, {g.rows, in});
    const ExpertCounts counts = h.counts(g.counts);
    const auto step = [&] {
      layer.forward(x.ref(), counts, y.ref(), h.stream());
      layer.backward(x.ref(), counts, dy.ref(), dx.ref(), h.stream(), WriteMode::overwrite);
    };
    layer.reserve(g.rows);
    step();  // sizes the workspace; the captured step allocates nothing
    const HostTensor y0 = h.download(y.ref()), dx0 = h.download(dx.ref());
    const HostTensor ga0 = h.download(v.grad_a), gb0 = h.download(v.grad_b);

    cudaGraph_t graph = nullptr;
    cudaGraphExec_t exec = nullptr;
    MOELORA_CUDA_CHECK(cudaStreamBeginCapture(h.stream(), cudaStreamCaptureModeThreadLocal));
    step();
    MOELORA_CUDA_CHECK(cudaStreamEndCapture(h.stream(), &graph));
    MOELORA_CUDA_CHECK(cudaGraphInstantiate(&exec, graph, 0));
    std::string& failure = failures[static_cast<std::size_t>(t)];
    for (int replay = 0; replay < 2; ++replay) {
      for (const TensorRef& grad : {v.grad_a, v.grad_b})
        h.write(grad, HostTensor(DType::fp32, grad.shape, std::numeric_limits<float>::quiet_NaN()));
      h.write(y.ref(), HostTensor(g.dtype, y.shape, std::numeric_limits<float>::quiet_NaN()));
      MOELORA_CUDA_CHECK(cudaGraphLaunch(exec, h.stream()));
      if (h.download(y.ref()).values != y0.values) failure += " y";
      if (h.download(dx.ref()).values != dx0.values) failure += " dx";
      if (h.download(v.grad_a).values != ga0.values) failure += " dA";
      if (h.download(v.grad_b).values != gb0.values) failure += " dB";
    }
    MOELORA_CUDA_CHECK(cudaGraphExecDestroy(exec));
    MOELORA_CUDA_CHECK(cudaGraphDestroy(graph));
  });
  for (const std::string& f : failures) CHECK_MESSAGE(f.empty(), "replays differ from the eager step in:" << f);
}

TEST_CASE_TEMPLATE("ordered gradient adds: an expert of several row groups gives the same bits every run", Mode,
                   policy::ColumnParallel, policy::RowParallel) {
  using namespace moelora::testing;
  // 3000 rows on one expert: three row groups of the backward add into the same gradient slices.
  GlobalProblem g(2, 256, 256, 16, 3000, DType::bf16, Spread::one_expert);
  g.run_reference<CudaHarness>();
  const int tp = std::min(2, NcclRanks::max_ranks());
  INFO("seed " << g.rng.seed << " tp " << tp);
  const Layout<Mode> l{tp, 1, 1};
  const std::vector<RankResult> first = run_layout<NcclRanks>(g, l), second = run_layout<NcclRanks>(g, l);
  for (int t = 0; t < tp; ++t) {
    const RankResult& a = first[static_cast<std::size_t>(t)];
    const RankResult& b = second[static_cast<std::size_t>(t)];
    CHECK(a.grad_a.values == b.grad_a.values);
    CHECK(a.grad_b.values == b.grad_b.values);
    CHECK(relative_error(a.grad_a.values, cut_factor(g.grad_a, 0, g.experts, l.a_axis(), tp, t).values) < 1e-2);
    CHECK(relative_error(a.grad_b.values, cut_factor(g.grad_b, 0, g.experts, l.b_axis(), tp, t).values) < 1e-2);
  }
}
