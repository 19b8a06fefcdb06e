/// \file
/// \brief ExpertExchange checked on one rank of an ep × tp grid, for any backend and communicator:
/// the rows each rank's local experts receive (counts, contents, order) and the rows combined back,
/// against the global routing. Used by the host-thread test and the NCCL test.
#pragma once

#include <doctest/doctest.h>

#include <algorithm>
#include <mutex>
#include <numeric>
#include <vector>

#include "moelora/moe/exchange.hpp"
#include "support/testing.hpp"

namespace moelora::testing {

/// The global routing of an exchange test: k = 2 distinct experts per token among the first 7 of
/// 8 (expert 7 stays empty), for `ranks` × kTokens tokens.
struct ExchangeProblem {
  static constexpr std::int64_t kExperts = 8, kTopK = 2, kTokens = 24, kWidth = 6;  // kTokens per rank
  int ep, tp;
  std::vector<std::int32_t> expert;

  ExchangeProblem(Rng& rng, int ep_size, int tp_size) : ep(ep_size), tp(tp_size) {
    for (std::int64_t t = 0; t < kTokens * ep * tp; ++t) {
      std::vector<std::int32_t> pool{0, 1, 2, 3, 4, 5, 6};
      std::shuffle(pool.begin(), pool.end(), rng.engine);
      expert.insert(expert.end(), pool.begin(), pool.begin() + kTopK);
    }
  }

  /// Runs the exchange on this rank (EP rank `ep_comm.rank()`, TP rank `tp_comm.rank()`; tokens of
  /// slice q·ep + p) and checks it; `check` serialises the assertions of concurrent ranks.
  template <class Backend, class Comm>
  void run_rank(Comm& ep_comm, Comm& tp_comm, typename Backend::stream_type stream, std::mutex& check) const {
    const int p = ep_comm.rank(), q = tp_comm.rank();
    const std::int64_t first_token = (q * ep + p) * kTokens, local_experts = kExperts / ep;
    const moe::RoutingShape shape{kTokens, kExperts, kTopK};
    const auto to_device = [&](const auto& host) {
      Buffer<Backend> b(std::max<std::size_t>(host.size() * sizeof(host[0]), 1));
      Backend::copy_from_host(b.data(), host.data(), host.size() * sizeof(host[0]), stream);
      return b;
    };
    const auto to_host = [&](const Buffer<Backend>& b, std::int64_t n) {
      std::vector<float> out(static_cast<std::size_t>(n));
      Backend::copy_to_host(out.data(), b.data(), out.size() * sizeof(float), stream);
      return out;
    };
    const Buffer<Backend> routed = to_device(std::vector<std::int32_t>(
        expert.begin() + first_token * kTopK, expert.begin() + (first_token + kTokens) * kTopK));
    const Buffer<Backend> weight = to_device(std::vector<float>(static_cast<std::size_t>(shape.routed()), 0.5f));
    moe::TokenPermuter<Backend> permuter;
    const moe::ExpertOrder& order = permuter.sort({routed.template as<const std::int32_t>(), weight.template as<const float>(), shape},
                                                  stream);
    // Token features: token t's row holds t_global · kWidth + c (exact in fp32).
    std::vector<float> x_host(static_cast<std::size_t>(kTokens * kWidth));
    std::iota(x_host.begin(), x_host.end(), static_cast<float>(first_token * kWidth));
    const Buffer<Backend> x = to_device(x_host);
    Buffer<Backend> rows(static_cast<std::size_t>(shape.routed() * kWidth) * sizeof(float));
    moe::TokenPermuter<Backend>::permute({x.data(), DType::fp32, {kTokens, kWidth}}, order,
                                         {rows.data(), DType::fp32, {shape.routed(), kWidth}}, stream);

    moe::ExpertExchange<Backend, Comm> exchange(ep_comm, tp_comm, kExperts);
    exchange.plan(order, stream);
    const std::int64_t n = exchange.local_rows();
    Buffer<Backend> local(static_cast<std::size_t>(std::max<std::int64_t>(n, 1) * kWidth) * sizeof(float));
    Buffer<Backend> back(rows.bytes());
    exchange.dispatch({rows.data(), DType::fp32, {shape.routed(), kWidth}}, {local.data(), DType::fp32, {n, kWidth}},
                      stream);
    exchange.combine({local.data(), DType::fp32, {n, kWidth}}, {back.data(), DType::fp32, {shape.routed(), kWidth}},
                     stream);

    // Expected: per local expert, every global token routed to it, in token order; back = tp × rows
    // (every TP rank combines the same gathered rows, and the reduce-scatter adds them).
    std::vector<float> expected;
    std::vector<std::int64_t> counts(static_cast<std::size_t>(local_experts), 0);
    for (std::int64_t e = 0; e < local_experts; ++e)
      for (std::size_t r = 0; r < expert.size(); ++r)
        if (expert[r] == p * local_experts + e) {
          ++counts[static_cast<std::size_t>(e)];
          for (std::int64_t c = 0; c < kWidth; ++c)
            expected.push_back(static_cast<float>(static_cast<std::int64_t>(r) / kTopK * kWidth + c));
        }
    std::vector<float> summed = to_host(rows, shape.routed() * kWidth);
    for (float& v : summed) v *= static_cast<float>(tp);
    const std::vector<float> got_local = to_host(local, n * kWidth), got_back = to_host(back, shape.routed() * kWidth);
    std::vector<std::int64_t> got_counts;
    for (std::int64_t e = 0; e < local_experts; ++e) got_counts.push_back(exchange.local_counts().at(e));

    const std::lock_guard lock(check);
    INFO("ep " << ep << " tp " << tp << " rank (tp " << q << ", ep " << p << ")");
    CHECK(exchange.first_expert() == p * local_experts);
    CHECK(exchange.routed_rows() == shape.routed());
    CHECK(got_counts == counts);
    CHECK(got_local == expected);
    CHECK(got_back == summed);
  }
};

}  // namespace moelora::testing
