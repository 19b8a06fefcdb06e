// Finite-difference check of the backward pass on the host backend, in fp64 arithmetic on an fp32
// layer: the layer is linear in each of A, B and x, so central differences are exact up to the
// fp32 rounding of y.
#include <doctest/doctest.h>

#include "support/harness.hpp"

using namespace moelora;
using namespace moelora::testing;

TEST_CASE("backward equals central finite differences of the forward (fp64 loss, fp32 layer)") {
  HostHarness h;
  Rng rng;
  INFO("seed " << rng.seed);
  const std::int64_t experts = 3, in = 12, out = 10, rows = 17, rank = 4;
  const HostTensor w = random_tensor(rng, DType::fp32, {experts, out, in}, 0.3f);
  HostTensor x = random_tensor(rng, DType::fp32, {rows, in});
  const std::vector<std::int64_t> counts = make_counts(rng, experts, rows, Spread::skewed);
  const HostTensor g = random_tensor(rng, DType::fp32, {rows, out});  // loss = Σ g ⊙ y
  HostHarness::Layer layer(h.make_base(w));
  AdapterConfig config;
  config.rank = rank;
  config.scale = 0.7;
  layer.add_adapter("ad", config, {});
  AdapterView v = layer.adapter("ad");
  h.write(v.b, random_tensor(rng, DType::fp32, v.b.shape));
  const ExpertCounts c = expert_counts(counts.data(), experts);

  const auto loss = [&] {
    HostTensor y(DType::fp32, {rows, out});
    layer.forward(tensor_ref(static_cast<const float*>(x.values.data()), x.shape), c, tensor_ref(y.values.data(), y.shape), {});
    double sum = 0.0;
    for (std::size_t i = 0; i < y.size(); ++i) sum += double(g[i]) * y[i];
    return sum;
  };
  loss();
  HostTensor dx(DType::fp32, {rows, in});
  layer.backward(tensor_ref(static_cast<const float*>(x.values.data()), x.shape), c,
                 tensor_ref(static_cast<const float*>(g.values.data()), g.shape), tensor_ref(dx.values.data(), dx.shape), {});

  const auto check = [&](float* values, std::size_t count, const float* analytic, const char* what) {
    const float eps = 1e-2f;
    for (std::size_t i = 0; i < count; i += 1 + count / 40) {
      const float saved = values[i];
      values[i] = saved + eps;
      const double plus = loss();
      values[i] = saved - eps;
      const double minus = loss();
      values[i] = saved;
      const double numeric = (plus - minus) / (2.0 * eps);
      INFO(what << "[" << i << "] analytic " << analytic[i] << " numeric " << numeric);
      CHECK(std::fabs(numeric - analytic[i]) <= 2e-3 * (1.0 + std::fabs(numeric)));
    }
  };
  check(static_cast<float*>(v.a.data), static_cast<std::size_t>(v.a.numel()), static_cast<const float*>(v.grad_a.data), "dA");
  check(static_cast<float*>(v.b.data), static_cast<std::size_t>(v.b.numel()), static_cast<const float*>(v.grad_b.data), "dB");
  check(x.values.data(), x.size(), dx.values.data(), "dx");
}
