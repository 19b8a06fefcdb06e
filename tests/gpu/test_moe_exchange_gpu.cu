// ExpertExchange over NCCL, one rank per GPU: the visible GPUs as EP ranks (one rank on a
// single-GPU machine: NCCL's one-rank collectives are copies, still a full run of the plan, the
// row exchange and the CUDA RowChunkMover), and a 2 × 2 grid where four GPUs are present. The
// doctest main (and the no-GPU skip) is in test_gpu.cu.
#include <doctest/doctest.h>
#include <nccl.h>

#include <exception>
#include <mutex>
#include <thread>
#include <vector>

#include "cases/exchange_cases.hpp"
#include "moelora/cuda/moe.hpp"
#include "moelora/parallel/nccl_communicator.hpp"

using namespace moelora;
using namespace moelora::testing;

namespace {

/// Runs `f(ep, tp, stream)` on an ep × tp grid of threads, rank (q, p) on GPU q·ep + p, over NCCL
/// communicators created here (one EP communicator per TP rank, one TP communicator per EP rank);
/// rethrows the first failure.
template <class F>
void run_nccl_grid(int ep, int tp, F&& f) {
  std::vector<ncclUniqueId> ep_ids(static_cast<std::size_t>(tp)), tp_ids(static_cast<std::size_t>(ep));
  for (ncclUniqueId& id : ep_ids) MOELORA_NCCL_CHECK(ncclGetUniqueId(&id));
  for (ncclUniqueId& id : tp_ids) MOELORA_NCCL_CHECK(ncclGetUniqueId(&id));
  std::mutex error_mutex;
  std::exception_ptr first_error;
  std::vector<std::thread> threads;
  for (int q = 0; q < tp; ++q)
    for (int p = 0; p < ep; ++p)
      threads.emplace_back([&, p, q] {
        try {
          MOELORA_CUDA_CHECK(cudaSetDevice(q * ep + p));
          cudaStream_t stream = nullptr;
          MOELORA_CUDA_CHECK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
          ncclComm_t ep_raw = nullptr, tp_raw = nullptr;
          MOELORA_NCCL_CHECK(ncclCommInitRank(&ep_raw, ep, ep_ids[static_cast<std::size_t>(q)], p));
          MOELORA_NCCL_CHECK(ncclCommInitRank(&tp_raw, tp, tp_ids[static_cast<std::size_t>(p)], q));
          {
            parallel::NcclCommunicator ep_comm(ep_raw), tp_comm(tp_raw);
            f(ep_comm, tp_comm, stream);
          }
          MOELORA_CUDA_CHECK(cudaStreamSynchronize(stream));
          MOELORA_NCCL_CHECK(ncclCommDestroy(tp_raw));
          MOELORA_NCCL_CHECK(ncclCommDestroy(ep_raw));
          MOELORA_CUDA_CHECK(cudaStreamDestroy(stream));
        } catch (...) {
          const std::lock_guard lock(error_mutex);
          if (!first_error) first_error = std::current_exception();
        }
      });
  for (std::thread& t : threads) t.join();
  if (first_error) std::rethrow_exception(first_error);
}

}  // namespace

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
    run_nccl_grid(g.ep, g.tp, [&](parallel::NcclCommunicator& ep, parallel::NcclCommunicator& tp, cudaStream_t stream) {
      problem.run_rank<CudaBackend>(ep, tp, stream, check);
    });
  }
}
