/// \file
/// \brief Behaviour of the optimizer step (clipping, non-finite skips, loss scaling, schedule) and of
/// its checkpoints (resume equivalence, strict loading), written once and run on every backend.
#pragma once

#include <doctest/doctest.h>

#include <cmath>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <limits>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include "cases/layer_cases.hpp"
#include "moelora/io/optimizer_state.hpp"
#include "moelora/io/state_dict.hpp"
#include "support/harness.hpp"

namespace moelora::testing {

/// A path under the temporary directory, removed (recursively) at the end of the scope.
struct TempPath {
  std::filesystem::path path =
      std::filesystem::temp_directory_path() / ("moelora-optim-" + std::to_string(std::random_device{}()));
  ~TempPath() { std::filesystem::remove_all(path); }
};

/// A file's bytes.
inline std::vector<char> file_bytes(const std::filesystem::path& path) {
  std::ifstream in(path, std::ios::binary);
  return {std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
}

/// A small training problem on harness H: fixed base weights, two batches with targets, and fresh
/// layers that start identical: adapters "style" (bf16, rank 8) and "domain" (fp32, rank 4) with
/// non-zero B. A step is forward, MSE loss and dy on the backend (loss::mse_loss), backward
/// (overwriting the gradients), then the optimizer; sizes keep the GPU's backward deterministic.
template <class H>
struct Training {
  using Layer = typename H::Layer;
  using Optimizer = AdamW<Layer>;
  static constexpr std::int64_t kExperts = 4, kIn = 48, kOut = 32, kRows = 96;

  H h;
  Rng rng;
  HostTensor w = random_tensor(rng, DType::bf16, {kExperts, kOut, kIn}, 0.1f);
  std::vector<std::int64_t> counts = make_counts(rng, kExperts, kRows, Spread::skewed);
  std::vector<BackendTensor<typename H::backend>> x, target;
  HostTensor b_style = random_tensor(rng, DType::bf16, {kExperts, kOut, 8}, 0.2f);
  HostTensor b_domain = random_tensor(rng, DType::fp32, {kExperts, kOut, 4}, 0.2f);

  Training() {
    for (int batch = 0; batch < 2; ++batch) {
      x.push_back(h.upload(random_tensor(rng, DType::bf16, {kRows, kIn})));
      target.push_back(h.upload(random_tensor(rng, DType::bf16, {kRows, kOut}, 0.5f)));
    }
  }

  Layer make_layer() {
    Layer layer(h.make_base(w));
    layer.add_adapter("style", adapter_config(8, 1.0, "bf16"), h.stream());
    layer.add_adapter("domain", adapter_config(4, 0.5, "fp32"), h.stream());
    h.write(layer.adapter("style").b, b_style);
    h.write(layer.adapter("domain").b, b_domain);
    return layer;
  }

  /// Forward, loss, backward on batch `iteration % 2`: fresh gradients in `layer`.
  void gradients(Layer& layer, Optimizer& optimizer, int iteration) {
    const auto& xb = x[static_cast<std::size_t>(iteration % 2)];
    const auto& tb = target[static_cast<std::size_t>(iteration % 2)];
    auto y = h.poisoned(DType::bf16, {kRows, kOut});
    auto dy = h.poisoned(DType::bf16, {kRows, kOut});
    layer.forward(xb.ref(), h.counts(counts), y.ref(), h.stream());
    loss::mse_loss({y.ref().data, tb.ref().data, dy.ref().data, DType::bf16, kRows * kOut, 100.0f / (kRows * kOut),
                    optimizer.loss_scale_data(h.stream()), nullptr},
                   h.stream());
    layer.backward(xb.ref(), h.counts(counts), dy.ref(), TensorRef{}, h.stream(), WriteMode::overwrite);
  }

  /// Sets element `index` of `adapter`'s dA to `value` (planting a NaN or Inf in one expert).
  void plant(Layer& layer, const std::string& adapter, std::int64_t index, float value) {
    const AdapterView v = layer.adapter(adapter);
    HostTensor g = h.download(v.grad_a);
    g[static_cast<std::size_t>(index)] = value;
    h.write(v.grad_a, g);
  }

  /// One training step; `bad` plants a NaN in expert 2 of "style"'s dA first.
  void step(Layer& layer, Optimizer& optimizer, int iteration, bool bad = false) {
    gradients(layer, optimizer, iteration);
    if (bad) plant(layer, "style", 2 * 8 * kIn + 5, std::numeric_limits<float>::quiet_NaN());
    optimizer.step(layer, h.stream());
  }

  /// Everything a step may change: factors, moments, master weights, step counts, counters.
  struct Snapshot {
    std::vector<std::vector<float>> tensors;
    std::vector<DType> dtypes;  // of tensors
    std::vector<std::int64_t> steps;
    typename Optimizer::Counters counters;
    bool operator==(const Snapshot&) const = default;
    void add(HostTensor t) {
      tensors.push_back(std::move(t.values));
      dtypes.push_back(t.dtype);
    }
  };
  Snapshot snapshot(Layer& layer, Optimizer& optimizer) {
    Snapshot s;
    for (const std::string& name : layer.adapter_names()) {
      const AdapterView v = layer.adapter(name);
      for (const TensorRef& t : {v.a, v.b}) s.add(h.download(t));
      const std::optional<AdamWAdapterState> state = optimizer.state(name);
      if (!state) continue;
      for (const AdamWFactorState& f : {state->a, state->b}) {
        for (const TensorRef& t : {f.m, f.v, f.master})
          if (t.data) s.add(h.download(t));
        std::int64_t steps = 0;
        H::backend::copy_to_host(&steps, f.step, sizeof(steps), h.stream());
        s.steps.push_back(steps);
      }
    }
    s.counters = optimizer.counters(h.stream());
    return s;
  }
};

/// Settings with every feature of the step in play: clipping that bites, warm-up and cosine decay,
/// weight decay.
inline AdamWConfig busy_config() {
  AdamWConfig c;
  c.lr = 2e-2f;
  c.weight_decay = 0.01f;
  c.max_grad_norm = 0.05f;
  c.schedule = {ScheduleKind::cosine, 2, 10, 0.1f};
  return c;
}

TEST_CASE_TEMPLATE_DEFINE("resume: N steps, save, load into a fresh layer and optimizer, M more equal N + M bit for bit",
                          H, resume) {
  Training<H> t;
  INFO("seed " << t.rng.seed);
  constexpr int kN = 4, kM = 5;
  const auto bad = [](int iteration) { return iteration == 1 || iteration == 6; };  // one skip before the save, one after

  auto straight = t.make_layer();
  typename Training<H>::Optimizer straight_opt(busy_config());
  for (int i = 0; i < kN + kM; ++i) t.step(straight, straight_opt, i, bad(i));
  CHECK(straight_opt.counters(t.h.stream()).skipped == 2);
  CHECK(straight_opt.counters(t.h.stream()).step == kN + kM - 2);

  TempPath dir;
  std::filesystem::create_directories(dir.path);
  {
    auto first = t.make_layer();
    typename Training<H>::Optimizer first_opt(busy_config());
    for (int i = 0; i < kN; ++i) t.step(first, first_opt, i, bad(i));
    io::save_adapters(first, dir.path / "adapter.safetensors", "", t.h.stream());
    io::save_optimizer(first_opt, first, dir.path / "optimizer.safetensors", "", t.h.stream());
  }
  auto resumed = t.make_layer();
  typename Training<H>::Optimizer resumed_opt(busy_config());
  io::load_adapters(resumed, dir.path / "adapter.safetensors", "", t.h.stream());
  io::load_optimizer(resumed_opt, resumed, dir.path / "optimizer.safetensors", "", t.h.stream());
  CHECK(resumed_opt.counters(t.h.stream()).step == kN - 1);
  CHECK(resumed_opt.steps("style", t.h.stream()) == kN - 1);
  for (int i = kN; i < kN + kM; ++i) t.step(resumed, resumed_opt, i, bad(i));
  CHECK(t.snapshot(resumed, resumed_opt) == t.snapshot(straight, straight_opt));
}

TEST_CASE_TEMPLATE_DEFINE("clipping: the global norm over several layers is the fp64 one; the update is AdamW's on "
                          "the clipped gradients; below the threshold nothing changes",
                          H, clipping) {
  Training<H> t;
  INFO("seed " << t.rng.seed);
  using Layer = typename Training<H>::Layer;
  // Two layers; in each, "style" and "domain" are stepped, a frozen and a disabled adapter are not.
  const auto make_layers = [&] {
    std::vector<Layer> layers;
    for (int l = 0; l < 2; ++l) {
      layers.push_back(t.make_layer());
      layers.back().add_adapter("frozen", adapter_config(4, 1.0, "bf16"), t.h.stream());
      layers.back().set_trainable("frozen", false, t.h.stream());
      layers.back().add_adapter("off", adapter_config(4, 1.0, "bf16"), t.h.stream());
      layers.back().set_enabled("off", false);
    }
    return layers;
  };
  std::vector<Layer> layers = make_layers();
  double sum = 0.0;
  std::vector<std::vector<HostTensor>> grads(2);
  for (int l = 0; l < 2; ++l) {
    for (const char* name : {"style", "domain", "off"}) {
      const AdapterView v = layers[static_cast<std::size_t>(l)].adapter(name);
      for (const TensorRef& g : {v.grad_a, v.grad_b}) {
        HostTensor values = random_tensor(t.rng, DType::fp32, g.shape, 0.3f);
        t.h.write(g, values);
        if (std::string(name) != "off")
          for (float x : values.values) sum += double(x) * x;
        grads[static_cast<std::size_t>(l)].push_back(std::move(values));
      }
    }
  }
  const double norm = std::sqrt(sum);

  // Reference: an optimizer without the statistics pass on gradients scaled by the clip coefficient.
  const auto run = [&](AdamWConfig config, float prescale) {
    std::vector<Layer> copies = make_layers();
    for (int l = 0; l < 2; ++l) {
      std::size_t k = 0;
      for (const char* name : {"style", "domain", "off"}) {
        const AdapterView v = copies[static_cast<std::size_t>(l)].adapter(name);
        for (const TensorRef& g : {v.grad_a, v.grad_b}) {
          HostTensor values = grads[static_cast<std::size_t>(l)][k++];
          for (float& x : values.values) x *= prescale;
          t.h.write(g, values);
        }
      }
    }
    typename Training<H>::Optimizer optimizer(config);
    const float* reported = optimizer.step({copies[0], copies[1]}, t.h.stream());
    CHECK(reported != nullptr);
    // Factors and moments (Adam's update is nearly scale-invariant; its moments are not).
    std::vector<std::vector<float>> results;
    for (int l = 0; l < 2; ++l)
      for (const char* name : {"style", "domain", "frozen", "off"}) {
        results.push_back(t.h.download(copies[static_cast<std::size_t>(l)].adapter(name).a).values);
        results.push_back(t.h.download(copies[static_cast<std::size_t>(l)].adapter(name).b).values);
        if (const std::optional<AdamWAdapterState> state = optimizer.state(name, l))
          for (const TensorRef& m : {state->a.m, state->b.m, state->a.v, state->b.v}) results.push_back(t.h.download(m).values);
      }
    return std::pair{results, optimizer.last_norm(t.h.stream())};
  };
  AdamWConfig plain;
  plain.lr = 1e-2f;
  plain.skip_nonfinite = false;  // no statistics pass at all
  AdamWConfig clipped = plain;
  clipped.max_grad_norm = static_cast<float>(norm / 4);
  clipped.skip_nonfinite = true;
  const auto [clipped_factors, clipped_norm] = run(clipped, 1.0f);
  CHECK(std::abs(clipped_norm - norm) <= 1e-6 * norm);
  const float coefficient = static_cast<float>(clipped.max_grad_norm / (norm + 1e-6));
  const auto [reference, unused] = run(plain, coefficient);
  CHECK(std::isnan(unused));  // no statistics pass: no norm
  REQUIRE(clipped_factors.size() == reference.size());
  for (std::size_t i = 0; i < reference.size(); ++i) CHECK(relative_error(clipped_factors[i], reference[i]) < 1e-5);

  AdamWConfig loose = clipped;
  loose.max_grad_norm = static_cast<float>(10 * norm);
  const auto [loose_factors, loose_norm] = run(loose, 1.0f);
  CHECK(std::abs(loose_norm - norm) <= 1e-6 * norm);
  CHECK(loose_factors == run(plain, 1.0f).first);  // coefficient 1: bit for bit the plain step
}

TEST_CASE_TEMPLATE_DEFINE("non-finite gradients: a NaN or Inf in one expert skips the step for every adapter", H,
                          nonfinite) {
  for (const float poison : {std::numeric_limits<float>::quiet_NaN(), std::numeric_limits<float>::infinity()}) {
    Training<H> t;
    INFO("seed " << t.rng.seed << " poison " << poison);
    auto layer = t.make_layer(), reference = t.make_layer();
    typename Training<H>::Optimizer optimizer(busy_config()), reference_opt(busy_config());
    for (int i = 0; i < 2; ++i) t.step(layer, optimizer, i), t.step(reference, reference_opt, i);
    auto expected = t.snapshot(layer, optimizer);
    ++expected.counters.skipped;

    t.gradients(layer, optimizer, 2);
    t.plant(layer, "style", 2 * 8 * Training<H>::kIn + 7, poison);
    optimizer.step(layer, t.h.stream());
    CHECK(std::isnan(optimizer.last_norm(t.h.stream())));
    CHECK(t.snapshot(layer, optimizer) == expected);  // no factor, moment, master or step count moved

    // The next finite step continues as if the bad batch had never come.
    t.step(layer, optimizer, 3);
    t.step(reference, reference_opt, 3);
    auto resumed = t.snapshot(layer, optimizer);
    --resumed.counters.skipped;
    CHECK(resumed == t.snapshot(reference, reference_opt));
  }
}

TEST_CASE_TEMPLATE_DEFINE("loss scaling: scaled gradients give the unscaled update; the scale backs off on overflow and "
                          "grows after growth_interval finite steps",
                          H, loss_scaling) {
  Training<H> t;
  INFO("seed " << t.rng.seed);
  AdamWConfig scaled = busy_config();
  scaled.loss_scaling = {true, 1024.0f, 2.0f, 0.5f, 3};
  auto layer = t.make_layer(), reference = t.make_layer();
  typename Training<H>::Optimizer optimizer(scaled), reference_opt(busy_config());
  const auto scale_now = [&] {
    float scale = 0.0f;
    H::backend::copy_to_host(&scale, optimizer.loss_scale_data(t.h.stream()), sizeof(scale), t.h.stream());
    return scale;
  };
  CHECK(scale_now() == 1024.0f);
  // The loss kernel multiplies dy by the scale, so every gradient is exactly 2^k times the
  // reference's; the optimizer divides it out exactly.
  const float expected_scales[] = {1024.0f, 1024.0f, 2048.0f, 2048.0f};
  const std::int64_t expected_trackers[] = {1, 2, 0, 1};
  for (int i = 0; i < 4; ++i) {
    t.step(layer, optimizer, i);
    t.step(reference, reference_opt, i);
    const auto counters = optimizer.counters(t.h.stream());
    CHECK(counters.loss_scale == expected_scales[i]);
    CHECK(counters.growth_tracker == expected_trackers[i]);
    CHECK(scale_now() == expected_scales[i]);
    const auto a = t.snapshot(layer, optimizer), b = t.snapshot(reference, reference_opt);
    CHECK(a.tensors == b.tensors);
    CHECK(a.steps == b.steps);
  }
  auto expected = t.snapshot(layer, optimizer);
  t.gradients(layer, optimizer, 4);
  t.plant(layer, "domain", 3, std::numeric_limits<float>::infinity());  // an overflowed gradient
  optimizer.step(layer, t.h.stream());
  expected.counters.skipped = 1, expected.counters.loss_scale = 1024.0f, expected.counters.growth_tracker = 0;
  CHECK(t.snapshot(layer, optimizer) == expected);
}

TEST_CASE_TEMPLATE_DEFINE("schedule: with a constant gradient each step moves a weight by the scheduled rate", H,
                          schedule) {
  Training<H> t;
  INFO("seed " << t.rng.seed);
  auto layer = t.make_layer();
  AdamWConfig c;
  c.lr = 1e-2f;
  c.eps = 1e-20f;
  c.schedule = {ScheduleKind::cosine, 2, 6, 0.1f};
  typename Training<H>::Optimizer optimizer(c);
  const AdapterView v = layer.adapter("domain");  // fp32: the factor is the master copy
  // Adam's bias-corrected step on a constant gradient g is lr_t · g / (|g| + eps): each weight
  // moves by exactly the scheduled rate.
  t.h.write(v.grad_a, HostTensor(DType::fp32, v.grad_a.shape, 0.75f));
  t.h.write(v.grad_b, HostTensor(DType::fp32, v.grad_b.shape, -2.0f));
  for (std::int64_t step = 1; step <= 8; ++step) {
    const HostTensor before = t.h.download(v.a);
    optimizer.step(layer, t.h.stream());
    const HostTensor after = t.h.download(v.a);
    const double lr = scheduled_lr(c.schedule, c.lr, step);
    for (std::size_t i = 0; i < before.size(); ++i)
      REQUIRE(std::abs((before[i] - after[i]) - lr) <= 2e-4 * lr + 1e-7);
  }
}

TEST_CASE_TEMPLATE_DEFINE("optimizer state files that do not fit are rejected naming every problem; layer, optimizer "
                          "and file stay unchanged",
                          H, bad_files) {
  Training<H> t;
  INFO("seed " << t.rng.seed);
  TempPath dir;
  std::filesystem::create_directories(dir.path);
  const auto save_from = [&](auto& layer, const char* file, AdamWConfig config = busy_config()) {
    typename Training<H>::Optimizer optimizer(config);
    t.step(layer, optimizer, 0);
    io::save_optimizer(optimizer, layer, dir.path / file, "", t.h.stream());
  };
  auto layer = t.make_layer();
  typename Training<H>::Optimizer optimizer(busy_config());
  for (int i = 0; i < 3; ++i) t.step(layer, optimizer, i);
  io::save_optimizer(optimizer, layer, dir.path / "good.safetensors", "", t.h.stream());

  typename Training<H>::Layer wide(t.h.make_base(random_tensor(t.rng, DType::bf16, {4, 40, 48}, 0.1f)));
  wide.add_adapter("style", adapter_config(8, 1.0, "bf16"), t.h.stream());
  wide.add_adapter("domain", adapter_config(4, 0.5, "fp32"), t.h.stream());
  {
    typename Training<H>::Optimizer o(busy_config());
    o.step(wide, t.h.stream());
    io::save_optimizer(o, wide, dir.path / "wide.safetensors", "", t.h.stream());
  }
  auto extra = t.make_layer();
  extra.add_adapter("extra", adapter_config(4, 1.0, "bf16"), t.h.stream());
  save_from(extra, "extra.safetensors");
  auto fewer = t.make_layer();
  fewer.remove_adapter("domain");
  save_from(fewer, "fewer.safetensors");
  AdamWConfig other = busy_config();
  other.lr = 3e-2f;
  other.schedule.warmup_steps = 3;
  save_from(layer, "settings.safetensors", other);
  {
    std::vector<char> bytes = file_bytes(dir.path / "good.safetensors");
    bytes.resize(bytes.size() - 100);
    std::ofstream(dir.path / "truncated.safetensors", std::ios::binary).write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
  }

  const auto before = t.snapshot(layer, optimizer);
  const auto rejected = [&](const char* file, ErrorCode code, const std::string& needle) {
    INFO(file);
    const std::vector<char> bytes = file_bytes(dir.path / file);
    check_error([&] { io::load_optimizer(optimizer, layer, dir.path / file, "", t.h.stream()); }, code, needle);
    CHECK(t.snapshot(layer, optimizer) == before);
    CHECK(optimizer.config() == busy_config());
    CHECK(file_bytes(dir.path / file) == bytes);
  };
  rejected("wide.safetensors", ErrorCode::invalid_argument, "the file is for a layer of");
  rejected("wide.safetensors", ErrorCode::invalid_argument, "lora_b_style.weight.exp_avg is F32 [4, 40, 8] but the optimizer needs F32 [4, 32, 8]");
  rejected("extra.safetensors", ErrorCode::invalid_argument, "unexpected adapter \"extra\"");
  rejected("extra.safetensors", ErrorCode::invalid_argument, "unexpected lora_a_extra.weight.exp_avg");
  rejected("fewer.safetensors", ErrorCode::invalid_argument, "no optimizer entry for adapter \"domain\"");
  rejected("settings.safetensors", ErrorCode::invalid_argument, "/lr = 0.029999999329447746 in the file but 0.019999999552965164");
  rejected("settings.safetensors", ErrorCode::invalid_argument, "/schedule/warmup_steps = 3 in the file but 2");
  rejected("truncated.safetensors", ErrorCode::bad_file, "truncated.safetensors");
  rejected("missing.safetensors", ErrorCode::io, "missing.safetensors");

  // Taking the file's settings is a choice the caller makes.
  io::load_optimizer(optimizer, layer, dir.path / "settings.safetensors", "", t.h.stream(), io::SettingsOnLoad::from_file);
  CHECK(optimizer.config() == other);
  CHECK(optimizer.counters(t.h.stream()).step == 1);
}

/// Instantiates every optimizer behaviour test for harness H.
#define MOELORA_OPTIM_CASES(H)             \
  TEST_CASE_TEMPLATE_INVOKE(resume, H);    \
  TEST_CASE_TEMPLATE_INVOKE(clipping, H);  \
  TEST_CASE_TEMPLATE_INVOKE(nonfinite, H); \
  TEST_CASE_TEMPLATE_INVOKE(loss_scaling, H); \
  TEST_CASE_TEMPLATE_INVOKE(schedule, H);  \
  TEST_CASE_TEMPLATE_INVOKE(bad_files, H)

}  // namespace moelora::testing
