// The optimizer's cross-rank gradient statistics through NCCL: a step with NormGroups over a
// one-rank NCCL communicator (TP and EP) takes the split path on the GPU — statistics, all_reduce
// of the fp32 sums, the one-block decision, the update — eagerly and captured in a CUDA graph, and
// agrees with the single-rank step. The doctest main (and the no-GPU skip) is in test_gpu.cu.
#include <doctest/doctest.h>
#include <nccl.h>

#include <cmath>
#include <limits>

#include "cases/optim_cases.hpp"
#include "moelora/parallel/nccl_communicator.hpp"
#include "support/cuda_harness.cuh"

using namespace moelora;
using namespace moelora::testing;

TEST_CASE("NormGroups over a one-rank NCCL communicator: the reduced step equals the local one, eager and in a graph") {
  Training<CudaHarness> t;
  INFO("seed " << t.rng.seed);
  const cudaStream_t stream = t.h.stream();
  int device = 0;
  MOELORA_CUDA_CHECK(cudaGetDevice(&device));
  ncclComm_t raw = nullptr;
  MOELORA_NCCL_CHECK(ncclCommInitAll(&raw, 1, &device));
  {
    parallel::NcclCommunicator comm(raw);
    const NormGroups<parallel::NcclCommunicator> groups{&comm, &comm};
    auto local = t.make_layer(), reduced = t.make_layer();
    AdamW<CudaHarness::Layer> local_opt(busy_config()), reduced_opt(busy_config());
    const auto both = [&](int i, bool bad) {
      t.gradients(local, local_opt, i);
      t.gradients(reduced, reduced_opt, i);
      if (bad) {
        t.plant(local, "domain", 3, std::numeric_limits<float>::infinity());
        t.plant(reduced, "domain", 3, std::numeric_limits<float>::infinity());
      }
      local_opt.step(local, stream);
    };
    both(0, false);
    reduced_opt.step({reduced}, stream, groups);  // eager: allocates, uploads

    cudaGraph_t graph = nullptr;
    cudaGraphExec_t exec = nullptr;
    MOELORA_CUDA_CHECK(cudaStreamBeginCapture(stream, cudaStreamCaptureModeGlobal));
    reduced_opt.step({reduced}, stream, groups);
    MOELORA_CUDA_CHECK(cudaStreamEndCapture(stream, &graph));
    MOELORA_CUDA_CHECK(cudaGraphInstantiate(&exec, graph, 0));
    for (int i = 1; i <= 4; ++i) {
      const bool bad = i == 2;
      both(i, bad);
      MOELORA_CUDA_CHECK(cudaGraphLaunch(exec, stream));
      const float local_norm = local_opt.last_norm(stream), reduced_norm = reduced_opt.last_norm(stream);
      if (bad) {
        CHECK(std::isnan(reduced_norm));
      } else {
        CHECK(std::abs(reduced_norm - local_norm) <= 1e-6f * local_norm);  // the sums travel as fp32
      }
      const auto a = t.snapshot(local, local_opt), b = t.snapshot(reduced, reduced_opt);
      CHECK(a.counters == b.counters);
      REQUIRE(a.tensors.size() == b.tensors.size());
      // The split path sums the norm in another order, so the clip coefficient may differ in its
      // last bit: fp32 state moves by ~1e-7 and a bf16 factor may round one unit the other way.
      for (std::size_t k = 0; k < a.tensors.size(); ++k) {
        INFO("tensor " << k);
        if (a.dtypes[k] == DType::bf16)
          CHECK(beyond_one_bf16_ulp(b.tensors[k], a.tensors[k]) == 0);
        else
          CHECK(relative_error(b.tensors[k], a.tensors[k]) < 1e-5);
      }
    }
    CHECK(reduced_opt.counters(stream).skipped == 1);
    MOELORA_CUDA_CHECK(cudaGraphExecDestroy(exec));
    MOELORA_CUDA_CHECK(cudaGraphDestroy(graph));
  }
  MOELORA_NCCL_CHECK(ncclCommDestroy(raw));
}
