// NcclCommunicator: every collective through NCCL, one rank per GPU (one rank on a single-GPU
// machine: NCCL's one-rank collectives are copies, still a full smoke test of every call), and a
// collective captured in a CUDA graph.
#include <doctest/doctest.h>

#include <vector>

#include "cases/communicator_cases.hpp"
#include "moelora/moe/nccl_grid.hpp"

using namespace moelora;
using namespace moelora::parallel;
using namespace moelora::testing;

namespace {

/// Runs `f(NcclCommunicator&, cudaStream_t)` on one thread per visible GPU, over one NCCL
/// communicator of them all (the EP group of a 1 × devices grid, moe::run_nccl_grid); rethrows the
/// first failure.
template <class F>
void run_nccl_ranks(F&& f) {
  int devices = 0;
  MOELORA_CUDA_CHECK(cudaGetDeviceCount(&devices));
  moe::run_nccl_grid(1, devices, [&](const moe::GridPlace&, NcclCommunicator& all, NcclCommunicator&) {
    cudaStream_t stream = nullptr;
    MOELORA_CUDA_CHECK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
    f(all, stream);
    MOELORA_CUDA_CHECK(cudaStreamSynchronize(stream));
    MOELORA_CUDA_CHECK(cudaStreamDestroy(stream));
  });
}

}  // namespace

TEST_CASE("NcclCommunicator: every collective and element type, one rank per GPU") {
  run_nccl_ranks([](NcclCommunicator& comm, cudaStream_t stream) {
    CHECK(comm.rank() >= 0);
    CHECK(comm.rank() < comm.size());
    check_collectives(comm, stream);
    check_reduction_agrees_on_every_rank(comm, stream);
  });
}

TEST_CASE("NcclCommunicator: an all-reduce captured in a CUDA graph replays on new data") {
  run_nccl_ranks([](NcclCommunicator& comm, cudaStream_t stream) {
    constexpr std::size_t kCount = 4096;
    Buffer<CudaBackend> data(kCount * 4);
    std::vector<float> host(kCount);
    cudaGraph_t graph = nullptr;
    MOELORA_CUDA_CHECK(cudaStreamBeginCapture(stream, cudaStreamCaptureModeGlobal));
    comm.all_reduce(data.data(), data.data(), kCount, CommElement::fp32, ReduceOp::sum, stream);
    MOELORA_CUDA_CHECK(cudaStreamEndCapture(stream, &graph));
    cudaGraphExec_t exec = nullptr;
    MOELORA_CUDA_CHECK(cudaGraphInstantiate(&exec, graph, 0));
    for (int replay = 1; replay <= 2; ++replay) {
      for (std::size_t i = 0; i < kCount; ++i) host[i] = static_cast<float>(replay * (comm.rank() + 1) + static_cast<int>(i % 5));
      CudaBackend::copy_from_host(data.data(), host.data(), kCount * 4, stream);
      MOELORA_CUDA_CHECK(cudaGraphLaunch(exec, stream));
      CudaBackend::copy_to_host(host.data(), data.data(), kCount * 4, stream);
      const int n = comm.size();
      for (std::size_t i = 0; i < kCount; i += 511)
        CHECK(host[i] == static_cast<float>(replay * n * (n + 1) / 2 + n * static_cast<int>(i % 5)));
    }
    MOELORA_CUDA_CHECK(cudaGraphExecDestroy(exec));
    MOELORA_CUDA_CHECK(cudaGraphDestroy(graph));
  });
}

TEST_CASE("NcclCommunicator: a null communicator and a bad broadcast root are rejected") {
  CHECK_THROWS_WITH_AS(NcclCommunicator(nullptr), doctest::Contains("needs an NCCL communicator"), Error);
  run_nccl_ranks([](NcclCommunicator& comm, cudaStream_t stream) {
    Buffer<CudaBackend> data(16);
    CHECK_THROWS_WITH_AS(comm.broadcast(data.data(), data.data(), 4, CommElement::fp32, comm.size(), stream),
                         doctest::Contains("broadcast root"), Error);
  });
}
