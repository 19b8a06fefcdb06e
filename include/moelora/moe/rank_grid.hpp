/// \file
/// \brief The tp × ep grid of ranks an MoE block runs on (GridPlace), and run_host_grid: those ranks
/// as host threads over HostThreadCommunicator groups, for the CPU backend and for tests.
///
/// Rank (q, p) is TP rank q and EP rank p. It holds the global experts `[p·E/ep, (p+1)·E/ep)` and
/// TP shard q of each, and routes token slice `q·ep + p` of a batch (TP-major, then EP: the order
/// in which ExpertExchange hands an expert its rows). Its EP group is the ranks of TP rank q, its TP
/// group the ranks of EP rank p.
#pragma once

#include <cstdint>
#include <exception>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

#include "moelora/parallel/host_thread_communicator.hpp"

namespace moelora::moe {

/// A rank's place in a tp × ep grid (see the file comment).
struct GridPlace {
  int tp = 1, ep = 1;  ///< the grid
  int q = 0, p = 0;    ///< this rank's TP and EP rank
  [[nodiscard]] bool leader() const { return q == 0 && p == 0; }
  /// The token slice of this rank.
  [[nodiscard]] std::int64_t slice() const { return static_cast<std::int64_t>(q) * ep + p; }
};

/// Calls `f(place, ep, tp)` on tp × ep threads, each with its HostThreadCommunicator of its EP group
/// and of its TP group, and joins them. The first exception is rethrown after every group is
/// aborted (so ranks waiting in a collective throw instead of hanging).
template <class F>
void run_host_grid(int tp, int ep, F&& f) {
  MOELORA_REQUIRE(tp >= 1 && ep >= 1, ErrorCode::invalid_argument, "a rank grid needs tp, ep >= 1, got ", tp, " x ", ep);
  std::vector<std::unique_ptr<parallel::HostThreadGroup>> ep_groups, tp_groups;
  for (int q = 0; q < tp; ++q) ep_groups.push_back(std::make_unique<parallel::HostThreadGroup>(ep));
  for (int p = 0; p < ep; ++p) tp_groups.push_back(std::make_unique<parallel::HostThreadGroup>(tp));
  std::mutex mutex;
  std::exception_ptr failure;
  std::vector<std::thread> threads;
  for (int q = 0; q < tp; ++q)
    for (int p = 0; p < ep; ++p)
      threads.emplace_back([&, p, q] {
        try {
          parallel::HostThreadCommunicator ep_comm(*ep_groups[static_cast<std::size_t>(q)], p);
          parallel::HostThreadCommunicator tp_comm(*tp_groups[static_cast<std::size_t>(p)], q);
          f(GridPlace{tp, ep, q, p}, ep_comm, tp_comm);
        } catch (...) {
          const std::lock_guard lock(mutex);
          if (!failure) failure = std::current_exception();
          for (auto& g : ep_groups) g->abort();
          for (auto& g : tp_groups) g->abort();
        }
      });
  for (std::thread& thread : threads) thread.join();
  if (failure) std::rethrow_exception(failure);
}

}  // namespace moelora::moe
