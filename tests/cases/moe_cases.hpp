/// \file
/// \brief Behaviour of the MoE token path (top-k router, expert-order permutation, combine, SwiGLU),
/// written once and run on every backend through a harness, against fp64 references on fresh
/// random data, with poisoned outputs.
#pragma once

#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>
#include <vector>

#include "support/harness.hpp"

namespace moelora::testing {

/// A typed host array copied into a backend's memory (at least one byte, so empty arrays have an
/// address).
template <class H, class T>
Buffer<typename H::backend> upload_array(H& h, const std::vector<T>& values) {
  Buffer<typename H::backend> b(std::max<std::size_t>(values.size() * sizeof(T), 1));
  H::backend::copy_from_host(b.data(), values.data(), values.size() * sizeof(T), h.stream());
  return b;
}
template <class T, class H>
std::vector<T> download_array(H& h, const void* data, std::int64_t n) {
  std::vector<T> out(static_cast<std::size_t>(n));
  H::backend::copy_to_host(out.data(), data, out.size() * sizeof(T), h.stream());
  return out;
}

/// The oracle of top-k routing: experts by descending logit (NaN last, ties to the lower index);
/// weights from the fp64 softmax over all E, renormalised over the k chosen.
struct RefRouting {
  std::vector<std::int32_t> expert;
  std::vector<double> weight;
};
inline RefRouting reference_routing(const HostTensor& logits, std::int64_t k) {
  const std::int64_t tokens = logits.shape[0], experts = logits.shape[1];
  RefRouting r;
  for (std::int64_t t = 0; t < tokens; ++t) {
    const auto key = [&](std::int64_t e) {
      const double v = logits[static_cast<std::size_t>(t * experts + e)];
      return std::isnan(v) ? -std::numeric_limits<double>::infinity() : v;
    };
    std::vector<std::int32_t> order(static_cast<std::size_t>(experts));
    std::iota(order.begin(), order.end(), 0);
    std::stable_sort(order.begin(), order.end(), [&](std::int32_t a, std::int32_t b) { return key(a) > key(b); });
    double top = key(order[0]), all = 0.0, chosen = 0.0;
    for (std::int64_t e = 0; e < experts; ++e) all += std::exp(key(e) - top);
    for (std::int64_t j = 0; j < k; ++j) chosen += std::exp(key(order[static_cast<std::size_t>(j)]) - top) / all;
    for (std::int64_t j = 0; j < k; ++j) {
      r.expert.push_back(order[static_cast<std::size_t>(j)]);
      r.weight.push_back(std::exp(key(order[static_cast<std::size_t>(j)]) - top) / all / chosen);
    }
  }
  return r;
}

/// A routing on the host: k distinct experts per token (drawn from the first `used` experts, so the
/// others are empty; `one_expert`: expert `used − 1` is every token's first choice) and positive
/// weights that sum to 1 per token.
struct HostRouting {
  moe::RoutingShape shape;
  std::vector<std::int32_t> expert;
  std::vector<float> weight;
};
inline HostRouting random_routing(Rng& rng, moe::RoutingShape s, std::int64_t used, bool one_expert = false) {
  HostRouting r{s, {}, {}};
  for (std::int64_t t = 0; t < s.tokens; ++t) {
    std::vector<std::int32_t> pool(static_cast<std::size_t>(used));
    std::iota(pool.begin(), pool.end(), 0);
    std::shuffle(pool.begin(), pool.end(), rng.engine);
    if (one_expert) std::swap(*std::find(pool.begin(), pool.end(), static_cast<std::int32_t>(used - 1)), pool[0]);
    float sum = 0.0f;
    for (std::int64_t j = 0; j < s.top_k; ++j) {
      r.expert.push_back(pool[static_cast<std::size_t>(j)]);
      r.weight.push_back(static_cast<float>(0.1 + rng.uniform()));
      sum += r.weight.back();
    }
    for (std::int64_t j = 0; j < s.top_k; ++j) r.weight[static_cast<std::size_t>(t * s.top_k + j)] /= sum;
  }
  return r;
}

/// A routing of harness H's backend: the host routing uploaded.
template <class H>
struct DeviceRouting {
  Buffer<typename H::backend> expert, weight;
  moe::RoutingShape shape;
  DeviceRouting(H& h, const HostRouting& r)
      : expert(upload_array(h, r.expert)), weight(upload_array(h, r.weight)), shape(r.shape) {}
  [[nodiscard]] moe::ConstRouting view() const {
    return {expert.template as<const std::int32_t>(), weight.template as<const float>(), shape};
  }
};

/// silu(g) · u in fp64.
inline double swiglu_exact(double g, double u) { return g / (1.0 + std::exp(-g)) * u; }

}  // namespace moelora::testing

// Test cases live at global scope (doctest's template registration needs it).
using namespace moelora;          // NOLINT(google-build-using-namespace)
using namespace moelora::testing; // NOLINT(google-build-using-namespace)

TEST_CASE_TEMPLATE_DEFINE("top-k routing: the fp64 softmax reference, ties to the lower expert, NaN last", H,
                          moe_routing) {
  struct Case {
    std::int64_t tokens, experts, top_k;
    DType dtype;
    bool nan_first;  // logit 0 of every token is NaN
  };
  for (const Case c : {Case{300, 64, 8, DType::bf16, false}, Case{97, 8, 1, DType::fp32, false},
                       Case{50, 5, 5, DType::fp16, false}, Case{0, 16, 2, DType::bf16, false},
                       Case{33, 1, 1, DType::bf16, false}, Case{40, 130, 7, DType::fp32, false},
                       Case{20, 6, 2, DType::bf16, true}}) {
    H h;
    Rng rng;
    INFO("seed " << rng.seed << " T " << c.tokens << " E " << c.experts << " k " << c.top_k);
    HostTensor logits(c.dtype, {c.tokens, c.experts});
    for (float& v : logits.values) v = round_as(c.dtype, std::round(rng.normal() * 4.0f) / 4.0f);  // many ties
    if (c.nan_first)
      for (std::int64_t t = 0; t < c.tokens; ++t)
        logits[static_cast<std::size_t>(t * c.experts)] = std::numeric_limits<float>::quiet_NaN();
    const auto logits_dev = h.upload(logits);
    const moe::RoutingShape shape{c.tokens, c.experts, c.top_k};
    auto expert = upload_array(h, std::vector<std::int32_t>(static_cast<std::size_t>(shape.routed()), -7));
    auto weight = upload_array(h, std::vector<float>(static_cast<std::size_t>(shape.routed()), NAN));
    moe::TopKRouter<typename H::backend>::route(
        logits_dev.ref(), {expert.template as<std::int32_t>(), weight.template as<float>(), shape}, h.stream());
    const RefRouting ref = reference_routing(logits, c.top_k);
    CHECK(download_array<std::int32_t>(h, expert.data(), shape.routed()) == ref.expert);
    const std::vector<float> w = download_array<float>(h, weight.data(), shape.routed());
    double worst = 0.0;
    for (std::size_t i = 0; i < w.size(); ++i) worst = std::max(worst, std::isnan(w[i]) ? 1.0 : std::abs(w[i] - ref.weight[i]));
    CHECK(worst < 2e-6);
  }
}

TEST_CASE_TEMPLATE_DEFINE("top-k routing rejects bad shapes and leaves the routing unchanged", H, moe_routing_errors) {
  H h;
  const auto logits = h.upload(HostTensor(DType::bf16, {4, 8}, 1.0f));
  auto expert = upload_array(h, std::vector<std::int32_t>(40, -7));
  auto weight = upload_array(h, std::vector<float>(40, 3.0f));
  const auto route = [&](moe::RoutingShape s) {
    moe::TopKRouter<typename H::backend>::route(logits.ref(), {expert.template as<std::int32_t>(), weight.template as<float>(), s},
                                                h.stream());
  };
  const auto code_of = [&](moe::RoutingShape s) {
    try {
      route(s);
    } catch (const Error& e) {
      return e.code();
    }
    return ErrorCode::unsupported;  // did not throw
  };
  CHECK(code_of({4, 8, 9}) == ErrorCode::invalid_argument);  // top-k > experts
  CHECK(code_of({4, 8, 0}) == ErrorCode::invalid_argument);
  CHECK(code_of({4, 0, 1}) == ErrorCode::invalid_argument);
  CHECK(code_of({5, 8, 2}) == ErrorCode::shape_mismatch);  // logits hold 4 tokens
  CHECK(code_of({4, 10, 2}) == ErrorCode::shape_mismatch);
  CHECK_THROWS_WITH_AS(route({4, 8, 9}), doctest::Contains("top-k must be in [1, experts = 8], got 9"), Error);
  CHECK(download_array<std::int32_t>(h, expert.data(), 40) == std::vector<std::int32_t>(40, -7));
  CHECK(download_array<float>(h, weight.data(), 40) == std::vector<float>(40, 3.0f));
}

TEST_CASE_TEMPLATE_DEFINE("permutation: stable expert order, exact permute, combine and its backward against fp64", H,
                          moe_permutation) {
  struct Case {
    std::int64_t tokens, experts, top_k, used, width;
    DType dtype;
    bool one_expert;
  };
  for (const Case c : {Case{200, 16, 4, 16, 64, DType::bf16, false}, Case{129, 8, 2, 8, 13, DType::fp32, false},
                       Case{64, 32, 1, 32, 40, DType::fp16, true}, Case{0, 4, 2, 4, 8, DType::bf16, false},
                       Case{50, 12, 3, 9, 24, DType::bf16, false}, Case{3000, 128, 8, 128, 16, DType::bf16, false}}) {
    H h;
    Rng rng;
    INFO("seed " << rng.seed << " T " << c.tokens << " E " << c.experts << " k " << c.top_k << " d " << c.width);
    const moe::RoutingShape shape{c.tokens, c.experts, c.top_k};
    const std::int64_t rows = shape.routed(), k = c.top_k, d = c.width;
    const HostRouting routing = random_routing(rng, shape, c.used, c.one_expert);
    const DeviceRouting<H> dev_routing(h, routing);
    moe::TokenPermuter<typename H::backend> permuter;
    permuter.reserve(shape, h.stream());
    const moe::ExpertOrder& order = permuter.sort(dev_routing.view(), h.stream());

    // The order: counts, a stable sort by expert, and its inverse.
    std::vector<std::int32_t> counts(static_cast<std::size_t>(c.experts), 0), source(static_cast<std::size_t>(rows));
    for (const std::int32_t e : routing.expert) ++counts[static_cast<std::size_t>(e)];
    std::iota(source.begin(), source.end(), 0);
    std::stable_sort(source.begin(), source.end(), [&](std::int32_t a, std::int32_t b) {
      return routing.expert[static_cast<std::size_t>(a)] < routing.expert[static_cast<std::size_t>(b)];
    });
    CHECK(download_array<std::int32_t>(h, order.counts, c.experts) == counts);
    CHECK(download_array<std::int32_t>(h, order.source, rows) == source);
    const std::vector<std::int32_t> position = download_array<std::int32_t>(h, order.position, rows);
    bool inverse = true;
    for (std::int64_t i = 0; i < rows; ++i) inverse = inverse && position[static_cast<std::size_t>(source[static_cast<std::size_t>(i)])] == i;
    CHECK(inverse);
    if (c.one_expert) CHECK(counts[static_cast<std::size_t>(c.used - 1)] == c.tokens);

    using Permuter = moe::TokenPermuter<typename H::backend>;
    // permute: an exact copy of each token's row.
    const HostTensor x = random_tensor(rng, c.dtype, {c.tokens, d});
    const auto x_dev = h.upload(x);
    auto permuted = h.poisoned(c.dtype, {rows, d});
    Permuter::permute(x_dev.ref(), order, permuted.ref(), h.stream());
    std::vector<float> gathered;
    for (const std::int32_t s : source)
      gathered.insert(gathered.end(), x.values.begin() + s / k * d, x.values.begin() + (s / k + 1) * d);
    CHECK(h.download(permuted.ref()).values == gathered);

    // combine with the weights and without, against fp64.
    const HostTensor expert_out = random_tensor(rng, c.dtype, {rows, d});
    const auto expert_out_dev = h.upload(expert_out);
    for (const bool weighted : {true, false}) {
      auto y = h.poisoned(c.dtype, {c.tokens, d});
      Permuter::combine(expert_out_dev.ref(), weighted ? dev_routing.view().weight : nullptr, order, y.ref(), h.stream());
      std::vector<double> ref(static_cast<std::size_t>(c.tokens * d), 0.0);
      for (std::int64_t i = 0; i < rows; ++i) {
        const std::int32_t s = source[static_cast<std::size_t>(i)];
        const double w = weighted ? routing.weight[static_cast<std::size_t>(s)] : 1.0;
        for (std::int64_t col = 0; col < d; ++col)
          ref[static_cast<std::size_t>(s / k * d + col)] += w * expert_out[static_cast<std::size_t>(i * d + col)];
      }
      CHECK(relative_error(h.download(y.ref()).values, ref) < tolerance(c.dtype));
    }

    // combine_backward: d_rows[i] = w[s] · dy[s / k].
    const HostTensor dy = random_tensor(rng, c.dtype, {c.tokens, d});
    const auto dy_dev = h.upload(dy);
    auto d_rows = h.poisoned(c.dtype, {rows, d});
    Permuter::combine_backward(dy_dev.ref(), dev_routing.view(), order, d_rows.ref(), h.stream());
    std::vector<double> ref(static_cast<std::size_t>(rows * d));
    for (std::int64_t i = 0; i < rows; ++i) {
      const std::int32_t s = source[static_cast<std::size_t>(i)];
      for (std::int64_t col = 0; col < d; ++col)
        ref[static_cast<std::size_t>(i * d + col)] =
            double(routing.weight[static_cast<std::size_t>(s)]) * dy[static_cast<std::size_t>(s / k * d + col)];
    }
    CHECK(relative_error(h.download(d_rows.ref()).values, ref) < tolerance(c.dtype));

    // Round trip: weights summing to 1 bring the permuted rows back to the tokens.
    auto back = h.poisoned(c.dtype, {c.tokens, d});
    Permuter::combine(permuted.ref(), dev_routing.view().weight, order, back.ref(), h.stream());
    CHECK(relative_error(h.download(back.ref()).values, x.values) < tolerance(c.dtype));
  }
}

TEST_CASE_TEMPLATE_DEFINE("permutation rejects bad input", H, moe_permutation_errors) {
  H h;
  Rng rng;
  const moe::RoutingShape shape{6, 4, 2};
  const DeviceRouting<H> routing(h, random_routing(rng, shape, 4));
  using Permuter = moe::TokenPermuter<typename H::backend>;
  Permuter permuter;
  const auto x = h.upload(HostTensor(DType::bf16, {6, 8}, 1.0f));
  auto rows = h.poisoned(DType::bf16, {12, 8});
  CHECK_THROWS_WITH_AS(Permuter::permute(x.ref(), moe::ExpertOrder{}, rows.ref(), h.stream()),
                       doctest::Contains("sort the routing first"), Error);
  const moe::ExpertOrder& order = permuter.sort(routing.view(), h.stream());
  auto wrong_rows = h.poisoned(DType::bf16, {11, 8});
  CHECK_THROWS_AS(Permuter::permute(x.ref(), order, wrong_rows.ref(), h.stream()), Error);
  auto wrong_dtype = h.poisoned(DType::fp32, {12, 8});
  CHECK_THROWS_AS(Permuter::permute(x.ref(), order, wrong_dtype.ref(), h.stream()), Error);
  auto wrong_width = h.poisoned(DType::bf16, {12, 9});
  CHECK_THROWS_AS(Permuter::permute(x.ref(), order, wrong_width.ref(), h.stream()), Error);
  const DeviceRouting<H> other(h, random_routing(rng, {6, 4, 1}, 4));
  CHECK_THROWS_WITH_AS(Permuter::combine_backward(x.ref(), other.view(), order, rows.ref(), h.stream()),
                       doctest::Contains("is not the one the order was sorted from"), Error);
  CHECK(std::isnan(h.download(rows.ref()).values[0]));  // nothing was written
  CHECK_THROWS_AS(permuter.sort({routing.view().expert, routing.view().weight, {6, 4, 5}}, h.stream()), Error);
}

TEST_CASE_TEMPLATE_DEFINE("SwiGLU forward and backward on [gate; up] rows against fp64", H, moe_swiglu) {
  struct Case {
    std::int64_t rows, f;
    DType dtype;
  };
  for (const Case c : {Case{100, 64, DType::bf16}, Case{37, 13, DType::fp32}, Case{16, 24, DType::fp16},
                       Case{0, 8, DType::bf16}, Case{5, 1, DType::bf16}}) {
    H h;
    Rng rng;
    INFO("seed " << rng.seed << " rows " << c.rows << " f " << c.f);
    const HostTensor in = random_tensor(rng, c.dtype, {c.rows, 2 * c.f}, 2.0f);
    const HostTensor d_out = random_tensor(rng, c.dtype, {c.rows, c.f});
    const auto in_dev = h.upload(in);
    const auto d_out_dev = h.upload(d_out);
    auto out = h.poisoned(c.dtype, {c.rows, c.f});
    auto d_in = h.poisoned(c.dtype, {c.rows, 2 * c.f});
    moe::SwiGlu<typename H::backend>::forward(in_dev.ref(), out.ref(), h.stream());
    moe::SwiGlu<typename H::backend>::backward(in_dev.ref(), d_out_dev.ref(), d_in.ref(), h.stream());
    std::vector<double> y, dx(static_cast<std::size_t>(c.rows * 2 * c.f));
    for (std::int64_t i = 0; i < c.rows; ++i)
      for (std::int64_t col = 0; col < c.f; ++col) {
        const double g = in[static_cast<std::size_t>(i * 2 * c.f + col)], u = in[static_cast<std::size_t>(i * 2 * c.f + c.f + col)];
        const double d = d_out[static_cast<std::size_t>(i * c.f + col)], sigma = 1.0 / (1.0 + std::exp(-g));
        y.push_back(swiglu_exact(g, u));
        dx[static_cast<std::size_t>(i * 2 * c.f + col)] = d * u * sigma * (1.0 + g * (1.0 - sigma));
        dx[static_cast<std::size_t>(i * 2 * c.f + c.f + col)] = d * g * sigma;
      }
    CHECK(relative_error(h.download(out.ref()).values, y) < tolerance(c.dtype));
    CHECK(relative_error(h.download(d_in.ref()).values, dx) < tolerance(c.dtype));
  }
  H h;
  const auto in = h.upload(HostTensor(DType::bf16, {4, 8}));
  auto out = h.poisoned(DType::bf16, {4, 5});
  CHECK_THROWS_WITH_AS(moe::SwiGlu<typename H::backend>::forward(in.ref(), out.ref(), h.stream()),
                       doctest::Contains("SwiGLU needs in [R, 2f] and out [R, f]"), Error);
  auto out_fp32 = h.poisoned(DType::fp32, {4, 4});
  CHECK_THROWS_AS(moe::SwiGlu<typename H::backend>::forward(in.ref(), out_fp32.ref(), h.stream()), Error);
}

/// Instantiates every MoE token-path case for harness H.
#define MOELORA_MOE_CASES(H)                          \
  TEST_CASE_TEMPLATE_INVOKE(moe_routing, H);          \
  TEST_CASE_TEMPLATE_INVOKE(moe_routing_errors, H);   \
  TEST_CASE_TEMPLATE_INVOKE(moe_permutation, H);      \
  TEST_CASE_TEMPLATE_INVOKE(moe_permutation_errors, H); \
  TEST_CASE_TEMPLATE_INVOKE(moe_swiglu, H)
