// ExpertExchange over host-thread ranks: an ep × tp grid of ranks routes its tokens, and the rows
// each rank's local experts receive (their counts, contents and order) and the rows combined back
// are checked against the global routing (tests/cases/exchange_cases.hpp). Argument checks of the
// exchange and of RowChunkMover.
#include <doctest/doctest.h>

#include <mutex>
#include <vector>

#include "cases/exchange_cases.hpp"
#include "moelora/moe/rank_grid.hpp"

using namespace moelora;
using moelora::testing::Rng;

TEST_CASE("ExpertExchange: each rank's local experts get their rows in token order, and combine sums over TP") {
  struct Grid {
    int ep, tp;
  };
  for (const Grid g : {Grid{1, 1}, Grid{2, 1}, Grid{4, 1}, Grid{1, 2}, Grid{2, 2}}) {
    Rng rng;
    INFO("seed " << rng.seed);
    const moelora::testing::ExchangeProblem problem(rng, g.ep, g.tp);
    std::mutex check;
    moe::run_host_grid(g.tp, g.ep, [&](const moe::GridPlace&, parallel::HostThreadCommunicator& ep,
                                       parallel::HostThreadCommunicator& tp) {
      problem.run_rank<HostBackend>(ep, tp, HostStream{}, check);
    });
  }
}

TEST_CASE("ExpertExchange rejects an expert count the EP ranks cannot split, and rows of the wrong size") {
  using Comm = parallel::HostThreadCommunicator;
  CHECK_THROWS_WITH_AS(moe::run_host_grid(1, 3,
                                          [](const moe::GridPlace&, Comm& ep, Comm& tp) {
                                            moe::ExpertExchange<HostBackend, Comm>(ep, tp, 8);
                                          }),
                       doctest::Contains("must split the 8 experts evenly"), Error);
  moe::run_host_grid(1, 1, [](const moe::GridPlace&, Comm& ep, Comm& tp) {
    moe::ExpertExchange<HostBackend, Comm> exchange(ep, tp, 4);
    std::vector<std::int32_t> expert{0, 1, 2, 3};
    std::vector<float> weight(4, 1.0f), rows(4 * 2), local(3 * 2);
    moe::TokenPermuter<HostBackend> permuter;
    exchange.plan(permuter.sort({expert.data(), weight.data(), {4, 4, 1}}, {}), {});
    CHECK_THROWS_WITH_AS(exchange.dispatch(tensor_ref(rows.data(), {4, 2}), tensor_ref(local.data(), {3, 2}), {}),
                         doctest::Contains("local has shape [3, 2] but the exchange plan has 4 rows"), Error);
  });
}

TEST_CASE("RowChunkMover copies row blocks and rejects blocks outside the tensors") {
  std::vector<float> in{0, 1, 2, 3, 4, 5, 6, 7}, out(8, -1.0f);  // 4 rows of 2
  moe::RowChunks chunks;
  chunks.add(2, 0, 2);  // rows 2, 3 → 0, 1
  chunks.add(0, 3, 1);  // row 0 → 3
  chunks.add(1, 2, 0);  // empty: not recorded
  CHECK(chunks.rows.size() == 2);
  CHECK(chunks.total() == 3);
  moe::RowChunkMover<HostBackend>::move(tensor_ref(in.data(), {4, 2}), chunks, tensor_ref(out.data(), {4, 2}), {});
  CHECK(out == std::vector<float>{4, 5, 6, 7, -1, -1, 0, 1});
  chunks.add(3, 3, 2);  // past the end
  CHECK_THROWS_WITH_AS(
      moe::RowChunkMover<HostBackend>::move(tensor_ref(in.data(), {4, 2}), chunks, tensor_ref(out.data(), {4, 2}), {}),
      doctest::Contains("leaves the tensors"), Error);
}
