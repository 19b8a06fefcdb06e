// The MoE token path on the CUDA backend: every shared case (router, permutation, combine, SwiGLU
// against fp64), and the sync-free property: the whole path captured in a CUDA graph and replayed on
// new data equals eager runs. The doctest main (and the no-GPU skip) is in test_gpu.cu.
#include <doctest/doctest.h>

#include "cases/moe_cases.hpp"
#include "support/cuda_harness.cuh"

using namespace moelora;
using namespace moelora::testing;

MOELORA_MOE_CASES(CudaHarness);

namespace {

/// Every tensor the token path writes, for one run.
struct TokenPathOutputs {
  BackendTensor<CudaBackend> rows, combined, d_rows, act, d_act;
  Buffer<CudaBackend> expert, weight;
};

/// route → sort → permute → SwiGLU → combine → combine_backward → SwiGLU backward on `stream`;
/// returns the order (the permuter's).
const moe::ExpertOrder& token_path(CudaHarness& h, moe::TokenPermuter<CudaBackend>& permuter, const moe::RoutingShape& shape,
                ConstTensorRef logits, ConstTensorRef x, ConstTensorRef fc1_out, ConstTensorRef dy,
                TokenPathOutputs& o) {
  const moe::Routing routing{o.expert.as<std::int32_t>(), o.weight.as<float>(), shape};
  moe::TopKRouter<CudaBackend>::route(logits, routing, h.stream());
  const moe::ExpertOrder& order = permuter.sort(routing, h.stream());
  moe::TokenPermuter<CudaBackend>::permute(x, order, o.rows.ref(), h.stream());
  moe::SwiGlu<CudaBackend>::forward(fc1_out, o.act.ref(), h.stream());
  moe::TokenPermuter<CudaBackend>::combine(o.rows.ref(), routing.weight, order, o.combined.ref(), h.stream());
  moe::TokenPermuter<CudaBackend>::combine_backward(dy, routing, order, o.d_rows.ref(), h.stream());
  moe::SwiGlu<CudaBackend>::backward(fc1_out, o.d_rows.ref(), o.d_act.ref(), h.stream());
  return order;
}

}  // namespace

TEST_CASE("the MoE token path is captured in a CUDA graph and replays on new data as eager runs") {
  CudaHarness h;
  Rng rng;
  INFO("seed " << rng.seed);
  const moe::RoutingShape shape{1024, 64, 8};
  const std::int64_t rows = shape.routed(), width = 96;  // SwiGLU f = width: fc1_out [R, 2·width]
  const auto outputs = [&] {
    return TokenPathOutputs{h.poisoned(DType::bf16, {rows, width}), h.poisoned(DType::bf16, {shape.tokens, width}),
                            h.poisoned(DType::bf16, {rows, width}), h.poisoned(DType::bf16, {rows, width}),
                            h.poisoned(DType::bf16, {rows, 2 * width}), Buffer<CudaBackend>(rows * 4),
                            Buffer<CudaBackend>(rows * 4)};
  };
  auto logits = h.upload(random_tensor(rng, DType::bf16, {shape.tokens, shape.experts}));
  auto x = h.upload(random_tensor(rng, DType::bf16, {shape.tokens, width}));
  auto fc1_out = h.upload(random_tensor(rng, DType::bf16, {rows, 2 * width}));
  auto dy = h.upload(random_tensor(rng, DType::bf16, {shape.tokens, width}));

  moe::TokenPermuter<CudaBackend> graph_permuter;
  graph_permuter.reserve(shape, h.stream());
  TokenPathOutputs captured = outputs();
  cudaGraph_t graph = nullptr;
  MOELORA_CUDA_CHECK(cudaStreamBeginCapture(h.stream(), cudaStreamCaptureModeThreadLocal));
  const moe::ExpertOrder& captured_order =
      token_path(h, graph_permuter, shape, logits.ref(), x.ref(), fc1_out.ref(), dy.ref(), captured);
  MOELORA_CUDA_CHECK(cudaStreamEndCapture(h.stream(), &graph));
  cudaGraphExec_t exec = nullptr;
  MOELORA_CUDA_CHECK(cudaGraphInstantiate(&exec, graph, 0));

  for (int replay = 0; replay < 2; ++replay) {
    // New logits (so new expert counts) and activations in the same buffers.
    h.write(logits.ref(), random_tensor(rng, DType::bf16, {shape.tokens, shape.experts}));
    h.write(x.ref(), random_tensor(rng, DType::bf16, {shape.tokens, width}));
    h.write(dy.ref(), random_tensor(rng, DType::bf16, {shape.tokens, width}));
    MOELORA_CUDA_CHECK(cudaGraphLaunch(exec, h.stream()));
    moe::TokenPermuter<CudaBackend> eager_permuter;
    TokenPathOutputs eager = outputs();
    const moe::ExpertOrder& eager_order =
        token_path(h, eager_permuter, shape, logits.ref(), x.ref(), fc1_out.ref(), dy.ref(), eager);
    for (auto member : {&TokenPathOutputs::rows, &TokenPathOutputs::combined, &TokenPathOutputs::d_rows,
                        &TokenPathOutputs::act, &TokenPathOutputs::d_act})
      CHECK(h.download((captured.*member).ref()).values == h.download((eager.*member).ref()).values);
    CHECK(download_array<std::int32_t>(h, captured.expert.data(), rows) ==
          download_array<std::int32_t>(h, eager.expert.data(), rows));
    CHECK(download_array<std::int32_t>(h, captured_order.counts, shape.experts) ==
          download_array<std::int32_t>(h, eager_order.counts, shape.experts));
    CHECK(download_array<std::int32_t>(h, captured_order.source, rows) ==
          download_array<std::int32_t>(h, eager_order.source, rows));
  }
  cudaGraphExecDestroy(exec);
  cudaGraphDestroy(graph);
}
