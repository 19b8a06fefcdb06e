// The MoE token path (router, permutation, combine, SwiGLU) on the host reference backend, and the
// SwiGLU gradient formula against finite differences.
#include <doctest/doctest.h>

#include <cmath>

#include "cases/moe_cases.hpp"

MOELORA_MOE_CASES(moelora::testing::HostHarness);

TEST_CASE("swiglu_grad matches central differences of swiglu") {
  moelora::testing::Rng rng;
  INFO("seed " << rng.seed);
  for (int i = 0; i < 200; ++i) {
    const double g = 4.0 * rng.normal(), u = rng.normal(), d = rng.normal(), step = 1e-4;
    using moelora::testing::swiglu_exact;
    const double d_gate = d * (swiglu_exact(g + step, u) - swiglu_exact(g - step, u)) / (2 * step);
    const double d_up = d * (swiglu_exact(g, u + step) - swiglu_exact(g, u - step)) / (2 * step);
    const moelora::moe::SwiGluGrad grad = moelora::moe::swiglu_grad(static_cast<float>(g), static_cast<float>(u), static_cast<float>(d));
    CHECK(grad.gate == doctest::Approx(d_gate).epsilon(1e-4).scale(1.0));
    CHECK(grad.up == doctest::Approx(d_up).epsilon(1e-4).scale(1.0));
  }
}
