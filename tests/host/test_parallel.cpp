// Tensor and expert parallelism on the host backend: N ranks as N threads of one process, each TP
// group a HostThreadGroup (plus one group of every rank, the TP × EP world).
#include <memory>
#include <vector>

#include "cases/parallel_cases.hpp"
#include "moelora/parallel/host_thread_communicator.hpp"

namespace {

using namespace moelora;

struct HostRanks {
  using Harness = testing::HostHarness;
  using Comm = parallel::HostThreadCommunicator;
  static int max_ranks() { return 8; }

  /// Runs f(RankEnv&) on tp · ep threads; rank (e, t) is TP rank t of group e. The first exception a
  /// rank throws aborts every group (so no rank waits forever) and is rethrown.
  template <class F>
  static void run(int tp, int ep, F&& f) {
    std::vector<std::unique_ptr<parallel::HostThreadGroup>> groups;
    for (int e = 0; e < ep; ++e) groups.push_back(std::make_unique<parallel::HostThreadGroup>(tp));
    parallel::HostThreadGroup world(tp * ep);
    testing::run_rank_threads(
        tp, ep,
        [&](int e, int t) {
          Harness h;
          Comm tp_comm(*groups[static_cast<std::size_t>(e)], t), world_comm(world, e * tp + t);
          testing::RankEnv<Harness, Comm> env{h, tp_comm, world_comm, t, e, tp, ep};
          f(env);
        },
        [&] {
          for (auto& g : groups) g->abort();
          world.abort();
        });
  }
};

}  // namespace

MOELORA_PARALLEL_CASES(HostRanks);
