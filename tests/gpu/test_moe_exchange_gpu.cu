// ExpertExchange over NCCL, one rank per GPU: the visible GPUs as EP ranks (one rank on a
// single-GPU machine: NCCL's one-rank collectives are copies, still a full run of the plan, the
// row exchange and the CUDA RowChunkMover), and a 2 × 2 grid where four GPUs are present. The
// doctest main (and the no-GPU skip) is in test_gpu.cu.
#include <doctest/doctest.h>

#include <mutex>
#include <vector>

#include "cases/exchange_cases.hpp"
#include "moelora/cuda/moe.hpp"
#include "moelora/moe/nccl_grid.hpp"

using namespace moelora;
using namespace moelora::testing;

TEST_CASE("ExpertExchange over NCCL: local experts get their rows in token order, combine sums over TP") {
  int devices = 0;
  MOELORA_CUDA_CHECK(cudaGetDeviceCount(&devices));
  struct Grid {
    int ep, tp;
  };
  std::vector<Grid> grids{{devices, 1}};
  if (devices >= 4) grids.push_back({2, 2});
  for (const Grid g : grids) {
    Rng rng;
    INFO("seed " << rng.seed);
    const ExchangeProblem problem(rng, g.ep, g.tp);
    std::mutex check;
    moe::run_nccl_grid(g.tp, g.ep, [&](const moe::GridPlace&, parallel::NcclCommunicator& ep, parallel::NcclCommunicator& tp) {
      cudaStream_t stream = nullptr;
      MOELORA_CUDA_CHECK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
      problem.run_rank<CudaBackend>(ep, tp, stream, check);
      MOELORA_CUDA_CHECK(cudaStreamSynchronize(stream));
      MOELORA_CUDA_CHECK(cudaStreamDestroy(stream));
    });
  }
}
