// Tensor and expert parallelism on the host backend: N ranks as N threads of one process
// (moe::run_host_grid: a HostThreadGroup per TP group and per EP group).
#include "cases/parallel_cases.hpp"
#include "moelora/moe/rank_grid.hpp"

namespace {

using namespace moelora;

struct HostRanks {
  using Harness = testing::HostHarness;
  using Comm = parallel::HostThreadCommunicator;
  static int max_ranks() { return 8; }

  /// Runs f(RankEnv&) on tp · ep threads; a rank that throws aborts every group and is rethrown.
  template <class F>
  static void run(int tp, int ep, F&& f) {
    moe::run_host_grid(tp, ep, [&](const moe::GridPlace& place, Comm& /*ep_comm*/, Comm& tp_comm) {
      Harness h;
      testing::RankEnv<Harness, Comm> env{h, tp_comm, place.q, place.p, tp, ep};
      f(env);
    });
  }
};

}  // namespace

MOELORA_PARALLEL_CASES(HostRanks);
