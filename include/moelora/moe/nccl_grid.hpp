/// \file
/// \brief run_nccl_grid: the ranks of a tp × ep grid (moe/rank_grid.hpp) as one thread per GPU of
/// this process, each with NCCL communicators of its EP and TP groups. Needs nvcc and libnccl.
#pragma once

#if !defined(__CUDACC__)
#error "moelora/moe/nccl_grid.hpp belongs to the CUDA backend: compile this translation unit with nvcc"
#endif

#include <cuda_runtime.h>
#include <nccl.h>

#include <cstddef>
#include <exception>
#include <mutex>
#include <thread>
#include <utility>
#include <vector>

#include "moelora/cuda/check.hpp"
#include "moelora/moe/rank_grid.hpp"
#include "moelora/parallel/nccl_check.hpp"
#include "moelora/parallel/nccl_communicator.hpp"

namespace moelora::moe {

/// Calls `f(place, ep, tp)` on a tp × ep grid of threads, rank (q, p) on GPU q·ep + p, each with
/// the NcclCommunicator of its EP group and of its TP group (created here from unique ids shared in
/// memory, since the ranks are threads of one process, and destroyed after `f` returns), and joins
/// them. A rank that throws, in `f` or while its communicators are made, calls
/// `on_failure(place, std::current_exception())` on its thread. NCCL cannot abort a peer waiting in
/// a collective, so a handler that returns may leave the other ranks waiting; one that ends the
/// process does not (examples/moe_block).
template <class F, class OnFailure>
void run_nccl_grid(int tp, int ep, F&& f, OnFailure&& on_failure) {
  MOELORA_REQUIRE(tp >= 1 && ep >= 1, ErrorCode::invalid_argument, "a rank grid needs tp, ep >= 1, got ", tp, " x ", ep);
  std::vector<ncclUniqueId> ep_ids(static_cast<std::size_t>(tp)), tp_ids(static_cast<std::size_t>(ep));
  for (ncclUniqueId& id : ep_ids) MOELORA_NCCL_CHECK(ncclGetUniqueId(&id));
  for (ncclUniqueId& id : tp_ids) MOELORA_NCCL_CHECK(ncclGetUniqueId(&id));
  std::vector<std::thread> threads;
  for (int q = 0; q < tp; ++q)
    for (int p = 0; p < ep; ++p)
      threads.emplace_back([&, p, q] {
        const GridPlace place{tp, ep, q, p};
        try {
          MOELORA_CUDA_CHECK(cudaSetDevice(q * ep + p));
          ncclComm_t ep_raw = nullptr, tp_raw = nullptr;
          MOELORA_NCCL_CHECK(ncclCommInitRank(&ep_raw, ep, ep_ids[static_cast<std::size_t>(q)], p));
          MOELORA_NCCL_CHECK(ncclCommInitRank(&tp_raw, tp, tp_ids[static_cast<std::size_t>(p)], q));
          {
            parallel::NcclCommunicator ep_comm(ep_raw), tp_comm(tp_raw);
            f(place, ep_comm, tp_comm);
          }
          MOELORA_NCCL_CHECK(ncclCommDestroy(tp_raw));
          MOELORA_NCCL_CHECK(ncclCommDestroy(ep_raw));
        } catch (...) {
          on_failure(place, std::current_exception());
        }
      });
  for (std::thread& thread : threads) thread.join();
}

/// run_nccl_grid that rethrows the first failure once every rank has returned.
template <class F>
void run_nccl_grid(int tp, int ep, F&& f) {
  std::mutex mutex;
  std::exception_ptr first;
  run_nccl_grid(tp, ep, std::forward<F>(f), [&](const GridPlace&, std::exception_ptr failure) {
    const std::lock_guard lock(mutex);
    if (!first) first = failure;
  });
  if (first) std::rethrow_exception(first);
}

}  // namespace moelora::moe
