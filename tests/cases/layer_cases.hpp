/// \file
/// \brief Behaviour of GroupedLoRA, written once and run on every backend (host and CUDA) through
/// a harness; results are checked against the fp64 oracle on fresh random data.
#pragma once

#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "support/harness.hpp"

namespace moelora::testing {

/// One random problem on harness H: base weights, grouped input, counts and the layer.
template <class H>
struct Problem {
  H h;
  Rng rng;
  std::int64_t experts, in, out, rows;
  DType io;
  HostTensor w, x;
  std::vector<std::int64_t> counts;
  std::optional<typename H::Layer> layer;
  BackendTensor<typename H::backend> x_dev;

  Problem(std::int64_t e, std::int64_t i, std::int64_t o, std::int64_t t, DType dtype, Spread spread = Spread::skewed)
      : experts(e), in(i), out(o), rows(t), io(dtype) {
    INFO("seed " << rng.seed);
    w = random_tensor(rng, io, {experts, out, in}, 0.1f);
    x = random_tensor(rng, io, {rows, in});
    counts = make_counts(rng, experts, rows, spread);
    layer.emplace(h.make_base(w));
    x_dev = h.upload(x);
  }

  [[nodiscard]] Reference reference() const { return {experts, in, out, &w, offsets_of(counts)}; }
  ExpertCounts device_counts() { return h.counts(counts); }

  /// Adds adapter `name` with random A and B (non-zero) in its dtype; returns the factors.
  std::pair<HostTensor, HostTensor> add_random(const std::string& name, AdapterConfig config) {
    layer->add_adapter(name, config, h.stream());
    const AdapterView view = layer->adapter(name);
    HostTensor a = random_tensor(rng, view.a.dtype, view.a.shape, 0.5f);
    HostTensor b = random_tensor(rng, view.b.dtype, view.b.shape, 0.5f);
    h.write(view.a, a);
    h.write(view.b, b);
    return {std::move(a), std::move(b)};
  }

  /// The layer's forward output, from a NaN-poisoned y.
  HostTensor forward() {
    auto y = h.poisoned(io, {rows, out});
    layer->forward(x_dev.ref(), device_counts(), y.ref(), h.stream());
    return h.download(y.ref());
  }

  /// Runs backward with `dy` (after a forward); returns dx, from a NaN-poisoned buffer.
  HostTensor backward(const HostTensor& dy, WriteMode grads = WriteMode::accumulate) {
    auto dy_dev = h.upload(dy);
    auto dx = h.poisoned(io, {rows, in});
    layer->backward(x_dev.ref(), device_counts(), dy_dev.ref(), dx.ref(), h.stream(), grads);
    return h.download(dx.ref());
  }

  /// Fills the gradients of `adapter` with NaN, so that an element a backward does not write shows.
  void poison_grads(const std::string& adapter) {
    const AdapterView v = layer->adapter(adapter);
    for (const TensorRef& g : {v.grad_a, v.grad_b})
      h.write(g, HostTensor(DType::fp32, g.shape, std::numeric_limits<float>::quiet_NaN()));
  }

  /// Runs backward with `dy` and checks dx and the gradients of `adapter` (the first of `adapters`)
  /// against the fp64 reference: accumulating onto gradients that were zero, or overwriting
  /// NaN-poisoned ones. Returns the reference gradients.
  Reference::Grads check_backward(const Reference& ref, const std::vector<RefAdapter>& adapters, const HostTensor& dy,
                                  const std::string& adapter, double tol, WriteMode grads = WriteMode::accumulate) {
    std::vector<double> dx_ref;
    std::vector<Reference::Grads> grads_ref;
    ref.backward(x, dy, adapters, dx_ref, grads_ref);
    if (grads == WriteMode::overwrite) poison_grads(adapter);
    CHECK(relative_error(backward(dy, grads).values, dx_ref) < tol);
    const AdapterView v = layer->adapter(adapter);
    CHECK(relative_error(h.download(v.grad_a).values, grads_ref[0].a) < tol);
    CHECK(relative_error(h.download(v.grad_b).values, grads_ref[0].b) < tol);
    return grads_ref[0];
  }
};

inline AdapterConfig adapter_config(std::int64_t rank, double scale = 1.0, std::optional<std::string> dtype = {}) {
  AdapterConfig c;
  c.rank = rank;
  c.scale = scale;
  c.lora_dtype = std::move(dtype);
  return c;
}

inline std::vector<double> widen(const std::vector<float>& v) { return {v.begin(), v.end()}; }

/// Shapes for the two kernel paths: tensor-core friendly, and odd sizes that take the generic path.
struct Case {
  std::int64_t experts, in, out, rows, rank;
};
inline const Case kFastCase{5, 64, 48, 300, 16};
inline const Case kOddCase{4, 36, 20, 97, 5};

/// Runs `action`, which must throw moelora::Error with `code` and a message containing `needle`.
template <class F>
void check_error(F&& action, ErrorCode code, const std::string& needle) {
  try {
    action();
    FAIL("no error for: " << needle);
  } catch (const Error& e) {
    CHECK(e.code() == code);
    CHECK_MESSAGE(std::string(e.what()).find(needle) != std::string::npos, e.what());
  }
}

}  // namespace moelora::testing

// Test cases live at global scope (doctest's template registration needs it).
using namespace moelora;          // NOLINT(google-build-using-namespace)
using namespace moelora::testing; // NOLINT(google-build-using-namespace)

TEST_CASE_TEMPLATE_DEFINE("factor shapes, dtypes and normalised lora_dtype", H, factor_shapes) {
  Problem<H> p(3, 24, 16, 10, DType::fp32);
  p.layer->add_adapter("default", {}, p.h.stream());
  AdapterView v = p.layer->adapter("default");
  CHECK(v.a.shape == Shape{3, 64, 24});
  CHECK(v.b.shape == Shape{3, 16, 64});
  CHECK(v.a.dtype == DType::fp32);
  CHECK(v.grad_a.dtype == DType::fp32);
  CHECK(v.grad_b.shape == Shape{3, 16, 64});
  CHECK(v.config.scale == 1.0f);
  CHECK(v.config.init == InitMethod::kaiming_zeros);

  for (const char* spelling : {"bf16", "bfloat16"}) {
    p.layer->add_adapter(spelling, adapter_config(4, 1.0, spelling), p.h.stream());
    CHECK(p.layer->adapter(spelling).a.dtype == DType::bf16);
  }
  CHECK(normalized_lora_dtype(adapter_config(4, 1.0, "half")) == "fp16");
  CHECK(normalized_lora_dtype(adapter_config(4, 1.0, "float")) == "fp32");
  CHECK(p.layer->adapter_names() == std::vector<std::string>{"default", "bf16", "bfloat16"});

  Problem<H> half(2, 16, 8, 4, DType::fp16);
  half.layer->add_adapter("x", adapter_config(8, 1.0, "bf16"), half.h.stream());
  CHECK(half.layer->adapter("x").b.dtype == DType::bf16);
}

TEST_CASE_TEMPLATE_DEFINE("kaiming_zeros: A in the Kaiming bound, B zero, output unchanged bitwise", H, kaiming) {
  for (DType io : kAllDTypes) {
    Problem<H> p(4, 64, 32, 200, io);
    const HostTensor base_only = p.forward();
    AdapterConfig c = adapter_config(16);
    c.seed = 7;
    p.layer->add_adapter("new", c, p.h.stream());
    const HostTensor with_new = p.forward();
    CHECK(with_new.values == base_only.values);  // bitwise: B = 0

    const AdapterView v = p.layer->adapter("new");
    const HostTensor a = p.h.download(v.a);
    const HostTensor b = p.h.download(v.b);
    const float bound = std::sqrt(6.0f / 64.0f);
    float largest = 0.0f, sum = 0.0f;
    for (float value : a.values) largest = std::max(largest, std::fabs(value)), sum += value;
    CHECK(largest <= bound * (1.0f + 1.0f / 256.0f));  // the bound itself may round up by half a bf16 ulp
    CHECK(largest > 0.9f * bound);
    CHECK(std::fabs(sum / static_cast<float>(a.size())) < 0.05f * bound);
    for (float value : b.values) REQUIRE(value == 0.0f);

    // Kaiming A with a non-zero B changes the output.
    HostTensor b_rand = random_tensor(p.rng, v.b.dtype, v.b.shape);
    p.h.write(v.b, b_rand);
    CHECK(p.forward().values != base_only.values);
  }
}

TEST_CASE_TEMPLATE_DEFINE("forward and backward match the fp64 reference", H, against_reference) {
  for (const Case& c : {kFastCase, kOddCase}) {
    for (DType io : kAllDTypes) {
      for (const char* factor : {"bf16", "fp16", "fp32"}) {
        for (Spread spread : {Spread::uniform, Spread::skewed, Spread::one_expert}) {
          Problem<H> p(c.experts, c.in, c.out, c.rows, io, spread);
          INFO("seed " << p.rng.seed << " io " << dtype_name(io) << " factors " << factor << " in " << c.in
                       << " rank " << c.rank << " spread " << static_cast<int>(spread));
          auto [a, b] = p.add_random("ad", adapter_config(c.rank, 0.75, factor));
          const Reference ref = p.reference();
          const std::vector<RefAdapter> adapters{{&a, &b, 0.75f}};
          const double tol = std::max(tolerance(io), tolerance(a.dtype));
          CHECK(relative_error(p.forward().values, ref.forward(p.x, adapters)) < tol);

          const HostTensor dy = random_tensor(p.rng, io, {c.rows, c.out});
          const Reference::Grads grads = p.check_backward(ref, adapters, dy, "ad", tol);

          // A second backward accumulates: the gradients double.
          p.backward(dy);
          const AdapterView v = p.layer->adapter("ad");
          std::vector<double> twice_a = grads.a, twice_b = grads.b;
          for (double& g : twice_a) g *= 2.0;
          for (double& g : twice_b) g *= 2.0;
          CHECK(relative_error(p.h.download(v.grad_a).values, twice_a) < tol);
          CHECK(relative_error(p.h.download(v.grad_b).values, twice_b) < tol);
          p.layer->zero_grad(p.h.stream());
          for (float g : p.h.download(v.grad_a).values) REQUIRE(g == 0.0f);
        }
      }
    }
  }
}

TEST_CASE_TEMPLATE_DEFINE("WriteMode::overwrite: fresh gradients over poison, several adapters, empty experts", H,
                          overwrite_grads) {
  for (const Case& c : {kFastCase, kOddCase}) {
    for (Spread spread : {Spread::uniform, Spread::skewed, Spread::one_expert}) {
      Problem<H> p(c.experts, c.in, c.out, c.rows, DType::bf16, spread);
      INFO("seed " << p.rng.seed << " in " << c.in << " spread " << static_cast<int>(spread));
      auto [a1, b1] = p.add_random("one", adapter_config(c.rank, 0.5));
      auto [a2, b2] = p.add_random("two", adapter_config(c.rank, 2.0));
      const Reference ref = p.reference();
      const std::vector<RefAdapter> adapters{{&a1, &b1, 0.5f}, {&a2, &b2, 2.0f}};
      const double tol = tolerance(DType::bf16);
      CHECK(relative_error(p.forward().values, ref.forward(p.x, adapters)) < tol);
      const HostTensor dy = random_tensor(p.rng, DType::bf16, {c.rows, c.out});
      std::vector<double> dx_ref;
      std::vector<Reference::Grads> grads_ref;
      ref.backward(p.x, dy, adapters, dx_ref, grads_ref);
      const auto check_grads = [&](double factor) {
        for (std::size_t i = 0; i < adapters.size(); ++i) {
          const AdapterView v = p.layer->adapter(i == 0 ? "one" : "two");
          std::vector<double> a = grads_ref[i].a, b = grads_ref[i].b;
          for (double& g : a) g *= factor;
          for (double& g : b) g *= factor;
          CHECK(relative_error(p.h.download(v.grad_a).values, a) < tol);
          CHECK(relative_error(p.h.download(v.grad_b).values, b) < tol);
        }
      };
      p.poison_grads("one");
      p.poison_grads("two");
      CHECK(relative_error(p.backward(dy, WriteMode::overwrite).values, dx_ref) < tol);
      check_grads(1.0);
      p.backward(dy, WriteMode::overwrite);  // over the previous gradients: replaced, not doubled
      check_grads(1.0);
      p.backward(dy);  // then accumulation adds
      check_grads(2.0);
    }
  }
}

/// Hides the WriteMode overloads of `Base`: a plain GroupedLinearBase, which writes y and dx before
/// the adapters add into them.
template <class Base>
struct OverwritingBase {
  using backend_type = typename Base::backend_type;
  using stream_type = typename backend_type::stream_type;
  Base base;
  [[nodiscard]] std::int64_t num_experts() const { return base.num_experts(); }
  [[nodiscard]] std::int64_t in_features() const { return base.in_features(); }
  [[nodiscard]] std::int64_t out_features() const { return base.out_features(); }
  [[nodiscard]] DType dtype() const { return base.dtype(); }
  void forward(ConstTensorRef x, const ExpertSegments& s, TensorRef y, stream_type stream) {
    base.forward(x, s, y, stream);
  }
  void backward_input(ConstTensorRef dy, const ExpertSegments& s, TensorRef dx, stream_type stream) {
    base.backward_input(dy, s, dx, stream);
  }
};

TEST_CASE_TEMPLATE_DEFINE("a base that cannot accumulate: it writes first, the adapters add", H, overwriting_base) {
  static_assert(AccumulatingGroupedLinearBase<typename H::Base>);
  static_assert(!AccumulatingGroupedLinearBase<OverwritingBase<typename H::Base>>);
  Problem<H> p(kFastCase.experts, kFastCase.in, kFastCase.out, kFastCase.rows, DType::bf16);
  GroupedLoRA<OverwritingBase<typename H::Base>> layer(OverwritingBase<typename H::Base>{p.h.make_base(p.w)});
  layer.add_adapter("ad", adapter_config(kFastCase.rank, 0.5), p.h.stream());
  const AdapterView v = layer.adapter("ad");
  const HostTensor a = random_tensor(p.rng, v.a.dtype, v.a.shape, 0.5f), b = random_tensor(p.rng, v.b.dtype, v.b.shape, 0.5f);
  p.h.write(v.a, a);
  p.h.write(v.b, b);
  const Reference ref = p.reference();
  const std::vector<RefAdapter> adapters{{&a, &b, 0.5f}};
  const double tol = tolerance(DType::bf16);

  auto y = p.h.poisoned(DType::bf16, {p.rows, p.out});
  layer.forward(p.x_dev.ref(), p.device_counts(), y.ref(), p.h.stream());
  CHECK(relative_error(p.h.download(y.ref()).values, ref.forward(p.x, adapters)) < tol);

  const HostTensor dy = random_tensor(p.rng, DType::bf16, {p.rows, p.out});
  std::vector<double> dx_ref;
  std::vector<Reference::Grads> grads_ref;
  ref.backward(p.x, dy, adapters, dx_ref, grads_ref);
  auto dy_dev = p.h.upload(dy);
  auto dx = p.h.poisoned(DType::bf16, {p.rows, p.in});
  layer.backward(p.x_dev.ref(), p.device_counts(), dy_dev.ref(), dx.ref(), p.h.stream(), WriteMode::overwrite);
  CHECK(relative_error(p.h.download(dx.ref()).values, dx_ref) < tol);
  CHECK(relative_error(p.h.download(v.grad_a).values, grads_ref[0].a) < tol);
  CHECK(relative_error(p.h.download(v.grad_b).values, grads_ref[0].b) < tol);
}

/// `Base` saying that every adapter of a rank that is a multiple of 8 in its dtype rides on its GEMMs
/// (a LowRankFusingGroupedLinearBase, whatever the backend's GEMM strategy), so that the layer's
/// fused path runs on every backend: the projection alone, u handed over, the GEMM's addend.
/// Counts the calls that carried an addend.
template <class Base>
struct FusingBase : Base {
  using stream_type = typename Base::stream_type;
  std::shared_ptr<int> addends = std::make_shared<int>(0);

  [[nodiscard]] bool fuses_low_rank(std::int64_t rank, DType dtype) const {
    return rank % 8 == 0 && dtype == this->dtype();
  }
  void forward(ConstTensorRef x, const ExpertSegments& s, TensorRef y, stream_type stream,
               WriteMode mode = WriteMode::overwrite, const LowRankAddend& addend = {}) {
    *addends += !addend.empty();
    Base::forward(x, s, y, stream, mode, addend);
  }
  void backward_input(ConstTensorRef dy, const ExpertSegments& s, TensorRef dx, stream_type stream,
                      WriteMode mode = WriteMode::overwrite, const LowRankAddend& addend = {}) {
    *addends += !addend.empty();
    Base::backward_input(dy, s, dx, stream, mode, addend);
  }
};

TEST_CASE_TEMPLATE_DEFINE("a base that takes the expand into its GEMM: fused and apart adapters against fp64", H,
                          fusing_base) {
  static_assert(LowRankFusingGroupedLinearBase<FusingBase<typename H::Base>>);
  for (const Spread spread : {Spread::skewed, Spread::one_expert})
    for (const std::int64_t rows : {std::int64_t{0}, kFastCase.rows}) {
      Problem<H> p(kFastCase.experts, kFastCase.in, kFastCase.out, rows, DType::bf16, spread);
      INFO("seed " << p.rng.seed << " rows " << rows);
      GroupedLoRA<FusingBase<typename H::Base>> layer(FusingBase<typename H::Base>{p.h.make_base(p.w)});
      const std::shared_ptr<int> addends = layer.base().addends;
      // "odd" (rank 12) and "half" (fp16 factors) cannot fuse; "fused" (the first that can) does, and
      // "after" adds apart.
      const std::vector<std::pair<std::string, AdapterConfig>> configs{{"odd", adapter_config(12, 1.5)},
                                                                       {"fused", adapter_config(16, 0.5)},
                                                                       {"half", adapter_config(8, 1.0, "fp16")},
                                                                       {"after", adapter_config(16, 2.0)}};
      std::vector<std::pair<HostTensor, HostTensor>> factors;
      std::vector<RefAdapter> adapters;
      for (const auto& [name, config] : configs) {
        layer.add_adapter(name, config, p.h.stream());
        const AdapterView v = layer.adapter(name);
        factors.emplace_back(random_tensor(p.rng, v.a.dtype, v.a.shape, 0.5f),
                             random_tensor(p.rng, v.b.dtype, v.b.shape, 0.5f));
        p.h.write(v.a, factors.back().first);
        p.h.write(v.b, factors.back().second);
      }
      for (std::size_t i = 0; i < configs.size(); ++i)
        adapters.push_back({&factors[i].first, &factors[i].second, static_cast<float>(configs[i].second.scale)});
      const Reference ref = p.reference();
      const double tol = tolerance(DType::bf16);
      auto y = p.h.poisoned(DType::bf16, {rows, p.out});
      layer.forward(p.x_dev.ref(), p.device_counts(), y.ref(), p.h.stream());
      CHECK(relative_error(p.h.download(y.ref()).values, ref.forward(p.x, adapters)) < tol);

      const HostTensor dy = random_tensor(p.rng, DType::bf16, {rows, p.out});
      std::vector<double> dx_ref;
      std::vector<Reference::Grads> grads_ref;
      ref.backward(p.x, dy, adapters, dx_ref, grads_ref);
      auto dy_dev = p.h.upload(dy);
      for (const WriteMode grads : {WriteMode::overwrite, WriteMode::accumulate}) {
        auto dx = p.h.poisoned(DType::bf16, {rows, p.in});
        layer.backward(p.x_dev.ref(), p.device_counts(), dy_dev.ref(), dx.ref(), p.h.stream(), grads);
        CHECK(relative_error(p.h.download(dx.ref()).values, dx_ref) < tol);
        const double factor = grads == WriteMode::overwrite ? 1.0 : 2.0;
        for (std::size_t i = 0; i < configs.size(); ++i) {
          INFO("adapter " << configs[i].first << " grads " << (grads == WriteMode::overwrite ? "=" : "+="));
          const AdapterView v = layer.adapter(configs[i].first);
          std::vector<double> a = grads_ref[i].a, b = grads_ref[i].b;
          for (double& g : a) g *= factor;
          for (double& g : b) g *= factor;
          CHECK(relative_error(p.h.download(v.grad_a).values, a) < tol);
          CHECK(relative_error(p.h.download(v.grad_b).values, b) < tol);
        }
      }
      CHECK(*addends == (rows > 0 ? 3 : 0));  // the forward and both backwards (none without rows)
    }
}

TEST_CASE_TEMPLATE_DEFINE("edge cases: T = 0, empty experts, every row on one expert", H, edge_cases) {
  SUBCASE("T = 0") {
    Problem<H> p(4, 32, 16, 0, DType::bf16);
    p.add_random("ad", adapter_config(8));
    CHECK(p.forward().size() == 0);
    CHECK(p.backward(HostTensor(DType::bf16, {0, 16})).size() == 0);
    for (float g : p.h.download(p.layer->adapter("ad").grad_a).values) REQUIRE(g == 0.0f);
    p.poison_grads("ad");  // overwriting with no rows writes zero gradients
    p.backward(HostTensor(DType::bf16, {0, 16}), WriteMode::overwrite);
    for (float g : p.h.download(p.layer->adapter("ad").grad_a).values) REQUIRE(g == 0.0f);
    for (float g : p.h.download(p.layer->adapter("ad").grad_b).values) REQUIRE(g == 0.0f);
  }
  SUBCASE("empty experts and one full expert") {
    for (Spread spread : {Spread::one_expert, Spread::skewed}) {
      Problem<H> p(16, 64, 64, 513, DType::bf16, spread);
      auto [a, b] = p.add_random("ad", adapter_config(32));
      const Reference ref = p.reference();
      const std::vector<RefAdapter> adapters{{&a, &b, 1.0f}};
      CHECK(relative_error(p.forward().values, ref.forward(p.x, adapters)) < tolerance(DType::bf16));
      const HostTensor dy = random_tensor(p.rng, DType::bf16, {513, 64});
      std::vector<double> dx_ref;
      std::vector<Reference::Grads> grads_ref;
      ref.backward(p.x, dy, adapters, dx_ref, grads_ref);
      CHECK(relative_error(p.backward(dy).values, dx_ref) < tolerance(DType::bf16));
      // Gradients of experts without rows stay exactly zero.
      const HostTensor grad_a = p.h.download(p.layer->adapter("ad").grad_a);
      const std::int64_t per_expert = 32 * 64;
      for (std::int64_t e = 0; e < 16; ++e)
        if (p.counts[static_cast<std::size_t>(e)] == 0)
          for (std::int64_t i = 0; i < per_expert; ++i) REQUIRE(grad_a[static_cast<std::size_t>(e * per_expert + i)] == 0.0f);
    }
  }
}

TEST_CASE_TEMPLATE_DEFINE("several adapters, enable/disable, scale changes restore bitwise", H, adapters) {
  Problem<H> p(6, 64, 40, 250, DType::bf16);
  const HostTensor base_only = p.forward();
  auto [a1, b1] = p.add_random("one", adapter_config(16, 0.5));
  auto [a2, b2] = p.add_random("two", adapter_config(8, 2.0, "fp32"));
  const Reference ref = p.reference();
  const RefAdapter r1{&a1, &b1, 0.5f}, r2{&a2, &b2, 2.0f};
  const double tol = tolerance(DType::bf16);

  const HostTensor both = p.forward();
  CHECK(relative_error(both.values, ref.forward(p.x, {r1, r2})) < tol);
  p.layer->set_enabled("two", false);
  const HostTensor one_only = p.forward();
  CHECK(relative_error(one_only.values, ref.forward(p.x, {r1})) < tol);
  p.layer->set_enabled("one", false);
  CHECK(p.forward().values == base_only.values);
  p.layer->set_enabled("two", true);
  CHECK(relative_error(p.forward().values, ref.forward(p.x, {r2})) < tol);
  p.layer->set_enabled("one", true);
  CHECK(p.forward().values == both.values);

  p.layer->set_scale("one", 3.0);
  const HostTensor rescaled = p.forward();
  CHECK(rescaled.values != both.values);
  CHECK(relative_error(rescaled.values, ref.forward(p.x, {{&a1, &b1, 3.0f}, r2})) < tol);
  p.layer->set_scale("one", 0.5);
  CHECK(p.forward().values == both.values);

  p.layer->remove_adapter("one");
  CHECK(!p.layer->has_adapter("one"));
  CHECK(relative_error(p.forward().values, ref.forward(p.x, {r2})) < tol);
}

TEST_CASE_TEMPLATE_DEFINE("adapter identity: seeds from names, stable views, optimizer state per instance", H,
                          identity) {
  Problem<H> p(3, 32, 24, 64, DType::bf16);
  p.layer->add_adapter("first", adapter_config(8), p.h.stream());
  const AdapterView first = p.layer->adapter("first");
  p.layer->add_adapter("second", adapter_config(8), p.h.stream());
  CHECK(first.name == "first");  // views survive other adapters coming and going
  CHECK(first.config.rank == 8);
  const HostTensor a1 = p.h.download(first.a);
  CHECK(p.h.download(p.layer->adapter("second").a).values != a1.values);  // different names, different A

  AdamW<typename H::Layer> optimizer({1e-2f});
  p.h.write(first.grad_a, random_tensor(p.rng, DType::fp32, first.grad_a.shape));
  optimizer.step(*p.layer, p.h.stream());
  optimizer.step(*p.layer, p.h.stream());
  CHECK(optimizer.steps("first", p.h.stream()) == 2);
  const std::uint64_t old_id = first.id;
  p.layer->remove_adapter("first");
  p.layer->add_adapter("first", adapter_config(8), p.h.stream());
  CHECK(p.layer->adapter("first").id != old_id);
  CHECK(p.h.download(p.layer->adapter("first").a).values == a1.values);  // same name, same seed, same A
  optimizer.step(*p.layer, p.h.stream());
  CHECK(optimizer.steps("first", p.h.stream()) == 1);  // a new instance starts a new state
}

TEST_CASE_TEMPLATE_DEFINE("frozen factors get no gradient; the base never changes", H, frozen) {
  Problem<H> p(4, 64, 32, 128, DType::bf16);
  auto [a, b] = p.add_random("ad", adapter_config(16));
  const HostTensor w_before = p.h.download(p.layer->base().weight());
  p.layer->set_trainable("ad", false, p.h.stream());
  CHECK(p.layer->adapter("ad").grad_a.data == nullptr);
  p.forward();
  const HostTensor dy = random_tensor(p.rng, DType::bf16, {128, 32});
  std::vector<double> dx_ref;
  std::vector<Reference::Grads> grads_ref;
  p.reference().backward(p.x, dy, {{&a, &b, 1.0f}}, dx_ref, grads_ref);
  CHECK(relative_error(p.backward(dy).values, dx_ref) < tolerance(DType::bf16));  // dx keeps the LoRA part

  p.layer->set_trainable("ad", true, p.h.stream());
  p.backward(dy);
  bool nonzero_a = false, nonzero_b = false;
  for (float g : p.h.download(p.layer->adapter("ad").grad_a).values) nonzero_a |= g != 0.0f;
  for (float g : p.h.download(p.layer->adapter("ad").grad_b).values) nonzero_b |= g != 0.0f;
  CHECK(nonzero_a);
  CHECK(nonzero_b);
  AdamW<typename H::Layer> optimizer({1e-2f});
  for (int i = 0; i < 3; ++i) optimizer.step(*p.layer, p.h.stream());
  CHECK(p.h.download(p.layer->base().weight()).values == w_before.values);
  CHECK(p.h.download(p.layer->adapter("ad").a).values != a.values);
}

TEST_CASE_TEMPLATE_DEFINE("bad input gives a clear error and leaves the layer unchanged", H, bad_input) {
  Problem<H> p(4, 32, 16, 40, DType::bf16);
  auto [a, b] = p.add_random("ad", adapter_config(8));
  const HostTensor before = p.forward();
  auto y = p.h.poisoned(DType::bf16, {40, 16});
  auto& layer = *p.layer;
  auto stream = p.h.stream();

  std::vector<std::int64_t> short_counts(p.counts.begin(), p.counts.end() - 1);
  check_error([&] { layer.forward(p.x_dev.ref(), p.h.counts(short_counts), y.ref(), stream); }, ErrorCode::bad_counts,
              "has 3 entries but the layer has 4 experts");
  std::vector<std::int64_t> negative = p.counts;
  negative[0] -= 50, negative[1] += 50;
  check_error([&] { layer.forward(p.x_dev.ref(), expert_counts(negative.data(), 4), y.ref(), stream); },
              ErrorCode::bad_counts, "is negative");
  std::vector<std::int64_t> wrong_sum = p.counts;
  wrong_sum[2] += 1;
  check_error([&] { layer.forward(p.x_dev.ref(), expert_counts(wrong_sum.data(), 4), y.ref(), stream); },
              ErrorCode::bad_counts, "sums to 41 but x has 40 rows");
  auto y_wide = p.h.poisoned(DType::bf16, {40, 17});
  check_error([&] { layer.forward(p.x_dev.ref(), p.device_counts(), y_wide.ref(), stream); },
              ErrorCode::shape_mismatch, "y has shape [40, 17]");
  auto y_fp32 = p.h.poisoned(DType::fp32, {40, 16});
  check_error([&] { layer.forward(p.x_dev.ref(), p.device_counts(), y_fp32.ref(), stream); },
              ErrorCode::dtype_mismatch, "y has dtype fp32 but the base's dtype is bf16");
  check_error([&] { layer.add_adapter("ad", {}, stream); }, ErrorCode::duplicate_adapter, "\"ad\" already exists");
  check_error([&] { layer.set_enabled("nope", false); }, ErrorCode::unknown_adapter, "no adapter named \"nope\"");
  check_error([&] { layer.remove_adapter("nope"); }, ErrorCode::unknown_adapter, "no adapter named \"nope\"");
  check_error([&] { layer.add_adapter("r0", adapter_config(0), stream); }, ErrorCode::invalid_argument,
              "rank must be >= 1, got 0");
  for (double scale : {0.0, -1.0, std::nan(""), double(INFINITY), 1e300})
    check_error([&] { layer.add_adapter("s", adapter_config(4, scale), stream); }, ErrorCode::invalid_argument,
                "scale must be finite and > 0");
  check_error([&] { layer.set_scale("ad", -2.0); }, ErrorCode::invalid_argument, "scale must be finite and > 0");
  check_error([&] { layer.add_adapter("d", adapter_config(4, 1.0, "int8"), stream); }, ErrorCode::invalid_argument,
              "accepted spellings: bf16, bfloat16, fp16, float16, half, fp32, float32, float");
  check_error([&] { layer.add_adapter("", {}, stream); }, ErrorCode::invalid_argument, "must not be empty");
  auto dy = p.h.poisoned(DType::bf16, {39, 16});
  check_error([&] { layer.backward(p.x_dev.ref(), p.device_counts(), dy.ref(), TensorRef{}, stream); },
              ErrorCode::shape_mismatch, "dy has shape [39, 16]");

  CHECK(layer.adapter_names() == std::vector<std::string>{"ad"});
  CHECK(layer.adapter("ad").config.scale == 1.0f);
  CHECK(p.h.download(layer.adapter("ad").a).values == a.values);
  CHECK(p.forward().values == before.values);
}

TEST_CASE_TEMPLATE_DEFINE("AdamW trains the adapters towards a teacher", H, training) {
  Problem<H> p(4, 64, 32, 256, DType::fp32, Spread::uniform);
  // Teacher: the base plus a fixed random adapter; student: a fresh kaiming_zeros adapter.
  auto [ta, tb] = p.add_random("teacher", adapter_config(8, 1.0));
  const HostTensor target = p.forward();
  p.layer->remove_adapter("teacher");
  p.layer->add_adapter("student", adapter_config(8, 1.0, "bf16"), p.h.stream());
  AdamW<typename H::Layer> optimizer({2e-2f});
  double first = 0.0, last = 0.0;
  for (int step = 0; step < 40; ++step) {
    const HostTensor y = p.forward();
    HostTensor dy(DType::fp32, y.shape);
    double loss = 0.0;
    for (std::size_t i = 0; i < y.size(); ++i) dy[i] = y[i] - target[i], loss += 0.5 * dy[i] * dy[i];
    (step == 0 ? first : last) = loss;
    p.layer->zero_grad(p.h.stream());
    auto dy_dev = p.h.upload(dy);
    p.layer->backward(p.x_dev.ref(), p.device_counts(), dy_dev.ref(), TensorRef{}, p.h.stream());
    optimizer.step(*p.layer, p.h.stream());
  }
  CHECK(optimizer.steps("student", p.h.stream()) == 40);
  CHECK(last < 0.5 * first);
}

TEST_CASE_TEMPLATE_DEFINE("padded counts: rows past the counts' sum are neither read nor written", H, padded) {
  SUBCASE("forward and backward of the routed rows only") {
  for (const Case& c : {Case{5, 64, 48, 300, 16}, kOddCase}) {
    Problem<H> p(c.experts, c.in, c.out, c.rows, DType::bf16);
    const std::int64_t routed = c.rows * 3 / 4;
    p.counts = make_counts(p.rng, c.experts, routed, Spread::skewed);
    auto [a, b] = p.add_random("ad", adapter_config(c.rank));
    const float nan = std::numeric_limits<float>::quiet_NaN();
    // NaN in the padding rows of x and dy: reading any of them would show in the results.
    for (std::int64_t i = routed * c.in; i < c.rows * c.in; ++i) p.x[static_cast<std::size_t>(i)] = nan;
    p.x_dev = p.h.upload(p.x);
    HostTensor dy = random_tensor(p.rng, DType::bf16, {c.rows, c.out});
    for (std::int64_t i = routed * c.out; i < c.rows * c.out; ++i) dy[static_cast<std::size_t>(i)] = nan;
    const Reference ref = p.reference();  // rows [0, routed)
    const std::vector<RefAdapter> adapters{{&a, &b, 1.0f}};
    INFO("seed " << p.rng.seed << " in " << c.in);

    auto y = p.h.poisoned(DType::bf16, {c.rows, c.out});
    p.layer->forward(p.x_dev.ref(), p.device_counts().with_padding(), y.ref(), p.h.stream());
    const HostTensor y_host = p.h.download(y.ref());
    const auto routed_y = static_cast<std::ptrdiff_t>(routed * c.out);
    CHECK(relative_error({y_host.values.begin(), y_host.values.begin() + routed_y}, ref.forward(p.x, adapters)) <
          tolerance(DType::bf16));
    CHECK(std::all_of(y_host.values.begin() + routed_y, y_host.values.end(), [](float v) { return std::isnan(v); }));

    std::vector<double> dx_ref;
    std::vector<Reference::Grads> grads_ref;
    ref.backward(p.x, dy, adapters, dx_ref, grads_ref);
    auto dy_dev = p.h.upload(dy);
    auto dx = p.h.poisoned(DType::bf16, {c.rows, c.in});
    p.poison_grads("ad");
    p.layer->backward(p.x_dev.ref(), p.device_counts().with_padding(), dy_dev.ref(), dx.ref(), p.h.stream(),
                      WriteMode::overwrite);
    const HostTensor dx_host = p.h.download(dx.ref());
    const auto routed_x = static_cast<std::ptrdiff_t>(routed * c.in);
    CHECK(relative_error({dx_host.values.begin(), dx_host.values.begin() + routed_x}, dx_ref) < tolerance(DType::bf16));
    CHECK(std::all_of(dx_host.values.begin() + routed_x, dx_host.values.end(), [](float v) { return std::isnan(v); }));
    CHECK(relative_error(p.h.download(p.layer->adapter("ad").grad_a).values, grads_ref[0].a) < tolerance(DType::bf16));
    CHECK(relative_error(p.h.download(p.layer->adapter("ad").grad_b).values, grads_ref[0].b) < tolerance(DType::bf16));
  }
  }
  SUBCASE("padded counts may not sum to more than the rows") {
    Problem<H> p(3, 16, 8, 10, DType::bf16);
    std::vector<std::int64_t> counts{4, 4, 3};
    auto y = p.h.poisoned(DType::bf16, {10, 8});
    check_error([&] { p.layer->forward(p.x_dev.ref(), expert_counts(counts.data(), 3).with_padding(), y.ref(), p.h.stream()); },
                ErrorCode::bad_counts, "sums to 11 but x has 10 rows (padded counts may sum to at most that)");
  }
}

/// Instantiates every behaviour test for harness H.
#define MOELORA_LAYER_CASES(H)                                       \
  TEST_CASE_TEMPLATE_INVOKE(factor_shapes, H);                       \
  TEST_CASE_TEMPLATE_INVOKE(kaiming, H);                             \
  TEST_CASE_TEMPLATE_INVOKE(against_reference, H);                   \
  TEST_CASE_TEMPLATE_INVOKE(overwrite_grads, H);                     \
  TEST_CASE_TEMPLATE_INVOKE(overwriting_base, H);                    \
  TEST_CASE_TEMPLATE_INVOKE(fusing_base, H);                         \
  TEST_CASE_TEMPLATE_INVOKE(edge_cases, H);                          \
  TEST_CASE_TEMPLATE_INVOKE(adapters, H);                            \
  TEST_CASE_TEMPLATE_INVOKE(identity, H);                            \
  TEST_CASE_TEMPLATE_INVOKE(frozen, H);                              \
  TEST_CASE_TEMPLATE_INVOKE(bad_input, H);                           \
  TEST_CASE_TEMPLATE_INVOKE(padded, H);                              \
  TEST_CASE_TEMPLATE_INVOKE(training, H)
