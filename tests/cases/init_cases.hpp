/// \file
/// \brief The SVD-based initialisers on a quantized base, written once and run on every backend:
/// the residual SVD against exact singular values (fp64 LAPACK on the host), fallbacks and
/// warnings, LoftQ / SVD-first / PiSSA against their defining properties, and bad input.
#pragma once

#include <doctest/doctest.h>
#include <lapacke.h>

#include <optional>
#include <string>
#include <vector>

#include "support/harness.hpp"

namespace moelora::testing {

/// Singular values (descending) of a row-major `[rows, cols]` fp64 matrix, by LAPACK dgesdd.
inline std::vector<double> singular_values(std::vector<double> m, std::int64_t rows, std::int64_t cols) {
  std::vector<double> s(static_cast<std::size_t>(std::min(rows, cols)));
  REQUIRE(LAPACKE_dgesdd(LAPACK_ROW_MAJOR, 'N', static_cast<lapack_int>(rows), static_cast<lapack_int>(cols), m.data(),
                         static_cast<lapack_int>(cols), s.data(), nullptr, static_cast<lapack_int>(rows), nullptr,
                         static_cast<lapack_int>(cols)) == 0);
  return s;
}

/// An initialised adapter on a fresh quantized base, and everything measured about it (fp64).
template <class H>
struct InitProblem {
  H h;
  Rng rng;
  std::int64_t experts, out, in;
  HostTensor w;                       // [E, out, in], the source weights
  std::optional<typename H::QuantizedLayer> layer;
  std::vector<std::string> warnings;
  init::InitReport report;

  InitProblem(std::int64_t e, std::int64_t o, std::int64_t i, DType dtype = DType::fp32)
      : experts(e), out(o), in(i), w(random_tensor(rng, dtype, {e, o, i}, 0.02f)) {
    INFO("seed " << rng.seed);
  }
  /// Scales input channels `channels` of every expert by `factor` (outlier channels).
  void scale_channels(const std::vector<std::int64_t>& channels, float factor) {
    for (std::int64_t row = 0; row < experts * out; ++row)
      for (const std::int64_t c : channels) w[row * in + c] = round_as(w.dtype, w[row * in + c] * factor);
  }

  void init(std::optional<quant::QuantSpec> spec, AdapterConfig config) {
    layer.emplace(h.make_quantized_base(w, spec));
    layer->set_warning_sink([this](std::string_view m) { warnings.emplace_back(m); });
    report = layer->add_adapter("ad", config, h.stream());
  }

  [[nodiscard]] HostTensor factor(char which) {
    const AdapterView v = layer->adapter("ad");
    return h.download(which == 'a' ? v.a : v.b);
  }
  /// What the base computes with, as exact fp32 values.
  [[nodiscard]] HostTensor effective_weight() {
    auto d = h.poisoned(DType::fp32, {experts, out, in});
    layer->base().dequantized_weight(d.ref(), h.stream());
    return h.download(d.ref());
  }
  /// Per expert: W_e − Q_e − scale·B_e A_e (or W_e − Q_e with `with_delta` false), fp64.
  [[nodiscard]] std::vector<std::vector<double>> residuals(bool with_delta, float scale) {
    const HostTensor q = effective_weight(), a = factor('a'), b = factor('b');
    const std::int64_t r = a.shape[1];
    std::vector<std::vector<double>> out_residuals;
    for (std::int64_t e = 0; e < experts; ++e) {
      std::vector<double> res(static_cast<std::size_t>(out * in));
      for (std::int64_t o = 0; o < out; ++o)
        for (std::int64_t i = 0; i < in; ++i) {
          double delta = 0.0;
          if (with_delta)
            for (std::int64_t j = 0; j < r; ++j) delta += double(b[(e * out + o) * r + j]) * a[(e * r + j) * in + i];
          const std::size_t at = static_cast<std::size_t>((e * out + o) * in + i);
          res[static_cast<std::size_t>(o * in + i)] = double(w[at]) - q[at] - double(scale) * delta;
        }
      out_residuals.push_back(std::move(res));
    }
    return out_residuals;
  }
  [[nodiscard]] double weight_norm(std::int64_t e) const {
    double sum = 0.0;
    for (std::int64_t i = 0; i < out * in; ++i) sum += double(w[e * out * in + i]) * w[e * out * in + i];
    return std::sqrt(sum);
  }
  /// Σ_e ‖W_e − Q_e − scale·B_e A_e‖².
  [[nodiscard]] double total_error(float scale) {
    double total = 0.0;
    for (const auto& res : residuals(true, scale))
      for (const double v : res) total += v * v;
    return total;
  }
};

inline double norm(const std::vector<double>& v) {
  double s = 0.0;
  for (const double x : v) s += x * x;
  return std::sqrt(s);
}

inline AdapterConfig init_config(InitMethod method, std::int64_t rank, double scale, const char* dtype = "fp32") {
  AdapterConfig c;
  c.rank = rank;
  c.scale = scale;
  c.init = method;
  c.lora_dtype = dtype;
  return c;
}

}  // namespace moelora::testing

// clang-format off
#define MOELORA_INIT_CASES(H)                                                                                     \
TEST_CASE(#H ": svdquant is the exact rank-r SVD of the quantization residual") {                                \
  using namespace moelora; using namespace moelora::testing;                                                      \
  struct Case { quant::QuantSpec spec; std::int64_t e, out, in; };                                                \
  const Case cases[] = {{quant::parse_quant_spec("nvfp4"), 3, 48, 80}, {quant::parse_quant_spec("int4"), 2, 40, 136}, \
                        {quant::parse_quant_spec("nf4"), 2, 96, 40}, {quant::parse_quant_spec("int8_channel"), 1, 33, 70}}; \
  for (const Case& c : cases) {                                                                                   \
    CAPTURE(quant::quant_spec_name(c.spec));                                                                      \
    InitProblem<H> p(c.e, c.out, c.in);                                                                           \
    const std::int64_t rank = 8; const float scale = 2.0f;                                                        \
    p.init(c.spec, init_config(InitMethod::svdquant, rank, scale));                                               \
    CHECK(p.warnings.empty());                                                                                    \
    const auto before = p.residuals(false, scale), after = p.residuals(true, scale);                             \
    for (std::int64_t e = 0; e < c.e; ++e) {                                                                      \
      const std::vector<double> s = singular_values(before[e], c.out, c.in);                                     \
      double tail = 0.0;                                                                                          \
      for (std::size_t i = rank; i < s.size(); ++i) tail += s[i] * s[i];                                          \
      tail = std::sqrt(tail);                                                                                     \
      CHECK(norm(after[e]) == doctest::Approx(tail).epsilon(2e-4));                                               \
      CHECK(norm(after[e]) < norm(before[e]));                                                                    \
      CHECK(p.report.init_error[e] == doctest::Approx(norm(after[e]) / p.weight_norm(e)).epsilon(1e-4));         \
      CHECK(p.report.quantized_error[e] == doctest::Approx(norm(before[e]) / p.weight_norm(e)).epsilon(1e-4));   \
    }                                                                                                             \
    for (const char which : {'a', 'b'}) {                                                                         \
      const HostTensor f = p.factor(which);                                                                       \
      CHECK(std::any_of(f.values.begin(), f.values.end(), [](float v) { return v != 0.0f; }));                   \
    }                                                                                                             \
  }                                                                                                               \
}                                                                                                                 \
TEST_CASE(#H ": SVD inits that need a quantizer give zeros and a warning without one") {                         \
  using namespace moelora; using namespace moelora::testing;                                                      \
  for (const InitMethod m : {InitMethod::svdquant, InitMethod::loftq, InitMethod::svd_first}) {                   \
    CAPTURE(init_method_name(m));                                                                                 \
    InitProblem<H> p(2, 24, 40);                                                                                  \
    p.init(std::nullopt, init_config(m, 4, 1.0));                                                                 \
    REQUIRE(p.warnings.size() == 1);                                                                              \
    CHECK(p.warnings[0].find("needs a base with an enabled weight quantizer") != std::string::npos);             \
    for (const char which : {'a', 'b'}) {                                                                         \
      const HostTensor f = p.factor(which);                                                                       \
      CHECK(std::all_of(f.values.begin(), f.values.end(), [](float v) { return v == 0.0f; }));                   \
    }                                                                                                             \
    CHECK(p.effective_weight().values == p.w.values);                                                             \
  }                                                                                                               \
}                                                                                                                 \
TEST_CASE(#H ": a rank above min(out, in) is zero-padded with a warning") {                                      \
  using namespace moelora; using namespace moelora::testing;                                                      \
  InitProblem<H> p(2, 12, 20);                                                                                    \
  const std::int64_t rank = 16;                                                                                   \
  p.init(quant::parse_quant_spec("nvfp4"), init_config(InitMethod::svdquant, rank, 1.0));                         \
  REQUIRE(p.warnings.size() == 1);                                                                                \
  CHECK(p.warnings[0].find("exceeds min(out, in) = 12") != std::string::npos);                                   \
  const HostTensor a = p.factor('a'), b = p.factor('b');                                                          \
  for (std::int64_t e = 0; e < 2; ++e)                                                                            \
    for (std::int64_t j = 12; j < rank; ++j) {                                                                    \
      for (std::int64_t i = 0; i < 20; ++i) CHECK(a[(e * rank + j) * 20 + i] == 0.0f);                            \
      for (std::int64_t o = 0; o < 12; ++o) CHECK(b[(e * 12 + o) * rank + j] == 0.0f);                            \
    }                                                                                                             \
  const auto before = p.residuals(false, 1.0f), after = p.residuals(true, 1.0f);                                 \
  for (std::int64_t e = 0; e < 2; ++e) CHECK(norm(after[e]) < 1e-4 * norm(before[e]));                           \
}                                                                                                                 \
TEST_CASE(#H ": loftq is no worse than svdquant and requantizes the base") {                                     \
  using namespace moelora; using namespace moelora::testing;                                                      \
  InitProblem<H> svd(2, 64, 128);                                                                                 \
  InitProblem<H> loftq(2, 64, 128);                                                                               \
  loftq.w = svd.w;                                                                                                \
  const auto spec = quant::parse_quant_spec("nvfp4");                                                             \
  svd.init(spec, init_config(InitMethod::svdquant, 8, 1.5));                                                      \
  AdapterConfig c = init_config(InitMethod::loftq, 8, 1.5);                                                       \
  c.init_iterations = 4;                                                                                          \
  loftq.init(spec, c);                                                                                            \
  const double e_svd = svd.total_error(1.5f), e_loftq = loftq.total_error(1.5f);                                  \
  CHECK(e_loftq <= e_svd * (1.0 + 1e-6));                                                                         \
  CHECK(loftq.report.best_iteration >= 0);                                                                        \
  if (loftq.report.best_iteration > 0) CHECK(loftq.effective_weight().values != svd.effective_weight().values);  \
  /* The layer computes Q_new(W) x + scale·B A x: check its forward against the oracle. */                       \
  const HostTensor q = loftq.effective_weight();                                                                  \
  HostTensor q_io(DType::fp32, q.shape); q_io.values = q.values;                                                  \
  const HostTensor x = random_tensor(loftq.rng, DType::fp32, {40, 128});                                          \
  const std::vector<std::int64_t> counts = {15, 25};                                                              \
  const HostTensor a = loftq.factor('a'), b = loftq.factor('b');                                                  \
  const Reference ref{2, 128, 64, &q_io, offsets_of(counts)};                                                     \
  const std::vector<double> want = ref.forward(x, {{&a, &b, 1.5f}});                                              \
  auto x_dev = loftq.h.upload(x); auto y = loftq.h.poisoned(DType::fp32, {40, 64});                               \
  loftq.layer->forward(x_dev.ref(), loftq.h.counts(counts), y.ref(), loftq.h.stream());                           \
  CHECK(relative_error(loftq.h.download(y.ref()).values, want) < tolerance(DType::fp32));                        \
}                                                                                                                 \
TEST_CASE(#H ": svd_first beats svdquant on weights with outlier input channels") {                              \
  using namespace moelora; using namespace moelora::testing;                                                      \
  InitProblem<H> svd(2, 64, 256);                                                                                 \
  svd.scale_channels({3, 77, 200}, 10.0f);                                                                        \
  InitProblem<H> first(2, 64, 256);                                                                               \
  first.w = svd.w;                                                                                                \
  const auto spec = quant::parse_quant_spec("nvfp4");                                                             \
  svd.init(spec, init_config(InitMethod::svdquant, 8, 1.0));                                                      \
  first.init(spec, init_config(InitMethod::svd_first, 8, 1.0));                                                   \
  CHECK(first.total_error(1.0f) < 0.9 * svd.total_error(1.0f));                                                   \
  for (std::int64_t e = 0; e < 2; ++e) CHECK(first.report.init_error[e] < svd.report.init_error[e]);            \
}                                                                                                                 \
TEST_CASE(#H ": pissa takes the principal part of an unquantized base and keeps its output") {                   \
  using namespace moelora; using namespace moelora::testing;                                                      \
  InitProblem<H> p(2, 40, 72);                                                                                    \
  const HostTensor w = p.w;                                                                                       \
  p.init(std::nullopt, init_config(InitMethod::pissa, 6, 0.5));                                                   \
  CHECK(p.warnings.empty());                                                                                      \
  const auto after = p.residuals(true, 0.5f);                                                                     \
  for (std::int64_t e = 0; e < 2; ++e) CHECK(norm(after[e]) < 1e-5 * p.weight_norm(e));                          \
  /* The base now holds W − scale·BA: ‖W − scale·BA‖ is the tail of W's singular values. */                     \
  const HostTensor rest = p.effective_weight();                                                                   \
  for (std::int64_t e = 0; e < 2; ++e) {                                                                          \
    std::vector<double> we(w.values.begin() + e * 40 * 72, w.values.begin() + (e + 1) * 40 * 72);                 \
    std::vector<double> re(rest.values.begin() + e * 40 * 72, rest.values.begin() + (e + 1) * 40 * 72);           \
    const std::vector<double> s = singular_values(we, 40, 72);                                                    \
    double tail = 0.0;                                                                                            \
    for (std::size_t i = 6; i < s.size(); ++i) tail += s[i] * s[i];                                               \
    CHECK(norm(re) == doctest::Approx(std::sqrt(tail)).epsilon(1e-4));                                            \
  }                                                                                                               \
  /* Balanced split: A Aᵀ = diag(σ) and Bᵀ B = diag(σ) / scale², σ descending. */                                 \
  const HostTensor a = p.factor('a');                                                                             \
  double g01 = 0.0, g00 = 0.0, g11 = 0.0;                                                                         \
  for (std::int64_t i = 0; i < 72; ++i) g00 += double(a[i]) * a[i], g11 += double(a[72 + i]) * a[72 + i], g01 += double(a[i]) * a[72 + i]; \
  CHECK(std::abs(g01) < 1e-4 * g00);                                                                              \
  CHECK(g00 >= g11);                                                                                              \
}                                                                                                                 \
TEST_CASE(#H ": SVD inits write the pinned lora_dtype") {                                                        \
  using namespace moelora; using namespace moelora::testing;                                                      \
  InitProblem<H> p16(2, 48, 64, DType::fp16);                                                                     \
  InitProblem<H> p32(2, 48, 64, DType::fp16);                                                                     \
  p32.w = p16.w;                                                                                                  \
  p16.init(quant::parse_quant_spec("nvfp4"), init_config(InitMethod::svdquant, 8, 1.0, "bfloat16"));              \
  p32.init(quant::parse_quant_spec("nvfp4"), init_config(InitMethod::svdquant, 8, 1.0, "fp32"));                  \
  CHECK(p16.layer->adapter("ad").a.dtype == DType::bf16);                                                         \
  CHECK(p16.layer->adapter("ad").b.dtype == DType::bf16);                                                         \
  for (std::int64_t e = 0; e < 2; ++e)                                                                            \
    CHECK(p16.report.init_error[e] == doctest::Approx(p32.report.init_error[e]).epsilon(2e-2));                  \
}                                                                                                                 \
TEST_CASE(#H ": bad init requests are rejected and leave the layer unchanged") {                                 \
  using namespace moelora; using namespace moelora::testing;                                                      \
  InitProblem<H> p(2, 16, 24);                                                                                    \
  p.init(quant::parse_quant_spec("int4"), init_config(InitMethod::kaiming_zeros, 4, 1.0));                        \
  const HostTensor q = p.effective_weight();                                                                      \
  AdapterConfig c = init_config(InitMethod::loftq, 4, 1.0);                                                       \
  c.init_iterations = 0;                                                                                          \
  CHECK_THROWS_WITH_AS(p.layer->add_adapter("bad", c, p.h.stream()), doctest::Contains("init_iterations must be >= 1"), Error); \
  CHECK_FALSE(p.layer->has_adapter("bad"));                                                                       \
  CHECK(p.effective_weight().values == q.values);                                                                 \
  typename H::Layer plain(p.h.make_base(p.w));                                                                    \
  CHECK_THROWS_WITH_AS(plain.add_adapter("svd", init_config(InitMethod::svdquant, 4, 1.0), p.h.stream()),        \
                       doctest::Contains("needs a base that owns its weights"), Error);                           \
  CHECK(plain.adapter_names().empty());                                                                           \
}
// clang-format on
