// The optimizer step and its checkpoints on the host backend: every shared case (resume, clipping,
// non-finite skips, loss scaling, schedule, bad files), plus what needs no second backend: the
// schedule's formula, settings validation, layers of several types in one step, the MSE loss
// against fp64, sharded optimizer state across TP/EP layouts, and the norm over TP x EP ranks.
#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <limits>

#include "cases/optim_cases.hpp"
#include "cases/parallel_cases.hpp"
#include "moelora/io/sharded_optimizer.hpp"
#include "moelora/moe/rank_grid.hpp"
#include "moelora/parallel/host_thread_communicator.hpp"

using namespace moelora;
using namespace moelora::testing;

MOELORA_OPTIM_CASES(HostHarness);

TEST_CASE("schedule: warm-up, then constant, linear or cosine decay to the floor") {
  const float lr = 0.1f;
  CHECK(scheduled_lr({}, lr, 1) == lr);
  CHECK(scheduled_lr({}, lr, 1000) == lr);
  const LrSchedule warm_constant{ScheduleKind::constant, 4, 0, 0.0f};
  for (std::int64_t t = 1; t <= 4; ++t)
    CHECK(scheduled_lr(warm_constant, lr, t) == static_cast<float>(static_cast<double>(lr) * static_cast<double>(t) / 4.0));
  CHECK(scheduled_lr(warm_constant, lr, 5) == lr);
  const LrSchedule linear{ScheduleKind::linear, 2, 12, 0.2f};
  const LrSchedule cosine{ScheduleKind::cosine, 2, 12, 0.2f};
  for (std::int64_t t = 2; t <= 14; ++t) {
    const double p = std::min(1.0, static_cast<double>(t - 2) / 10.0);
    const double floor = static_cast<double>(0.2f);
    CHECK(scheduled_lr(linear, lr, t) == static_cast<float>(static_cast<double>(lr) * (floor + (1 - floor) * (1 - p))));
    CHECK(scheduled_lr(cosine, lr, t) ==
          static_cast<float>(static_cast<double>(lr) * (floor + (1 - floor) * 0.5 * (1 + std::cos(M_PI * p)))));
  }
  CHECK(scheduled_lr(cosine, lr, 12) == static_cast<float>(static_cast<double>(lr) * static_cast<double>(0.2f)));
  CHECK(scheduled_lr(cosine, lr, 100) == scheduled_lr(cosine, lr, 12));
  CHECK(parse_schedule_kind("cosine") == ScheduleKind::cosine);
  check_error([] { parse_schedule_kind("exponential"); }, ErrorCode::invalid_argument, "accepted: constant, linear, cosine");
}

TEST_CASE("AdamW settings are validated, naming the field") {
  using Opt = AdamW<HostHarness::Layer>;
  const auto bad = [](auto change, const std::string& needle) {
    AdamWConfig c;
    change(c);
    check_error([&] { Opt{c}; }, ErrorCode::invalid_argument, needle);
  };
  bad([](AdamWConfig& c) { c.lr = 0.0f; }, "lr must be finite and > 0");
  bad([](AdamWConfig& c) { c.lr = std::nanf(""); }, "lr must be finite and > 0");
  bad([](AdamWConfig& c) { c.beta2 = 1.0f; }, "betas must be in [0, 1)");
  bad([](AdamWConfig& c) { c.eps = -1.0f; }, "eps must be >= 0");
  bad([](AdamWConfig& c) { c.weight_decay = -0.1f; }, "weight_decay must be >= 0");
  bad([](AdamWConfig& c) { c.max_grad_norm = -1.0f; }, "max_grad_norm must be finite and >= 0");
  bad([](AdamWConfig& c) { c.schedule = {ScheduleKind::cosine, 10, 10, 0.0f}; }, "needs total_steps > warmup_steps");
  bad([](AdamWConfig& c) { c.schedule.min_lr_ratio = 2.0f; }, "min_lr_ratio must be in [0, 1]");
  bad([](AdamWConfig& c) { c.schedule.warmup_steps = -1; }, "warmup_steps must be >= 0");
  bad([](AdamWConfig& c) { c.loss_scaling = {true, 0.0f}; }, "init_scale must be finite and > 0");
  bad([](AdamWConfig& c) { c.loss_scaling = {true, 1.0f, 1.0f}; }, "growth_factor must be > 1");
  bad([](AdamWConfig& c) { c.loss_scaling = {true, 1.0f, 2.0f, 1.0f}; }, "backoff_factor must be in (0, 1)");
  bad([](AdamWConfig& c) { c.loss_scaling = {true, 1.0f, 2.0f, 0.5f, 0}; }, "growth_interval must be >= 1");
  bad([](AdamWConfig& c) { c.loss_scaling.enabled = true, c.skip_nonfinite = false; }, "loss scaling needs skip_nonfinite");
  Opt ok{AdamWConfig{}};
  check_error([&] { ok.set_lr(-1.0f); }, ErrorCode::invalid_argument, "lr must be finite and > 0");
  CHECK(ok.config().lr == 1e-3f);
}

TEST_CASE("one step over layers of different types clips by their joint norm") {
  HostHarness h;
  Rng rng;
  INFO("seed " << rng.seed);
  const HostTensor w = random_tensor(rng, DType::bf16, {3, 24, 32}, 0.1f);
  HostHarness::Layer plain(h.make_base(w));
  HostHarness::QuantizedLayer quantized(h.make_quantized_base(w, quant::parse_quant_spec("nvfp4")));
  plain.add_adapter("p", adapter_config(4, 1.0, "bf16"), {});
  quantized.add_adapter("q", adapter_config(8, 1.0, "fp16"), {});
  double sum = 0.0;
  for (const AdapterView& v : {plain.adapter("p"), quantized.adapter("q")})
    for (const TensorRef& g : {v.grad_a, v.grad_b}) {
      const HostTensor values = random_tensor(rng, DType::fp32, g.shape);
      h.write(g, values);
      for (float x : values.values) sum += double(x) * x;
    }
  AdamWConfig c;
  c.max_grad_norm = 1.0f;
  AdamW<HostHarness::Layer> optimizer(c);
  const float* norm = optimizer.step({plain, quantized}, {});
  CHECK(std::abs(*norm - std::sqrt(sum)) <= 1e-6 * std::sqrt(sum));
  CHECK(optimizer.steps("p", {}, 0) == 1);
  CHECK(optimizer.steps("q", {}, 1) == 1);
  CHECK(optimizer.steps("q", {}, 0) == 0);  // group 0 is the plain layer
}

TEST_CASE("MSE loss: the loss in fp64 and dy = round(2 · weight · scale · (y − t)), empty and odd sizes") {
  HostHarness h;
  Rng rng;
  INFO("seed " << rng.seed);
  for (const DType dtype : kAllDTypes) {
    for (const std::int64_t count : {std::int64_t{0}, std::int64_t{1}, std::int64_t{1027}}) {
      const HostTensor y = random_tensor(rng, dtype, {count}), target = random_tensor(rng, dtype, {count});
      HostTensor dy(dtype, {count}, std::numeric_limits<float>::quiet_NaN());
      const float scale = 8.0f, weight = 1.0f / 3.0f;
      double loss = 0.5;
      std::vector<std::byte> yb = y.encode(), tb = target.encode(), db = dy.encode();
      loss::mse_loss({yb.data(), tb.data(), db.data(), dtype, count, weight, &scale, &loss}, {});
      dy.decode(db);
      double expected = 0.0;
      for (std::int64_t i = 0; i < count; ++i) {
        const double d = double(y[i]) - target[i];
        expected += d * d;
        CHECK(dy[i] == round_as(dtype, (2.0f * weight * scale) * (y[i] - target[i])));
      }
      CHECK(std::abs(loss - 0.5 - weight * expected) <= 1e-12 * (1.0 + expected));
    }
  }
  check_error([] { loss::mse_loss({nullptr, nullptr, nullptr, DType::bf16, 4}, {}); }, ErrorCode::invalid_argument,
              "need data for 4 elements");
}

namespace {

constexpr std::int64_t kE = 4, kIn = 48, kOut = 32;

/// A host layer of `experts` × `in` → `out` with a bf16 and an fp32 adapter, and trained state.
struct RankModel {
  HostHarness h;
  HostHarness::Layer layer;
  AdamW<HostHarness::Layer> optimizer;

  RankModel(std::int64_t experts, std::int64_t in, std::int64_t out, const AdamWConfig& config)
      : layer(h.make_base(HostTensor(DType::bf16, {experts, out, in}, 0.01f))), optimizer(config) {
    layer.add_adapter("style", adapter_config(8, 1.0, "bf16"), {});
    layer.add_adapter("domain", adapter_config(4, 1.0, "fp32"), {});
  }
};

/// Rows `[r0, r0 + nr)` and columns `[c0, c0 + nc)` of every expert of an `[E, R, C]` tensor, for
/// experts `[e0, e0 + ne)`.
std::vector<float> cut(const HostTensor& t, std::int64_t e0, std::int64_t ne, std::int64_t r0, std::int64_t nr,
                       std::int64_t c0, std::int64_t nc) {
  std::vector<float> out;
  for (std::int64_t e = e0; e < e0 + ne; ++e)
    for (std::int64_t r = r0; r < r0 + nr; ++r)
      for (std::int64_t c = c0; c < c0 + nc; ++c) out.push_back(t[static_cast<std::size_t>((e * t.shape[1] + r) * t.shape[2] + c)]);
  return out;
}

}  // namespace

TEST_CASE("sharded optimizer state: saved by one layout, loaded bit for bit by others; strict") {
  Rng rng;
  INFO("seed " << rng.seed);
  AdamWConfig config;
  config.max_grad_norm = 1.0f;
  RankModel full(kE, kIn, kOut, config);
  for (int step = 0; step < 3; ++step) {
    for (const char* name : {"style", "domain"}) {
      const AdapterView v = full.layer.adapter(name);
      full.h.write(v.grad_a, random_tensor(rng, DType::fp32, v.grad_a.shape));
      full.h.write(v.grad_b, random_tensor(rng, DType::fp32, v.grad_b.shape));
    }
    full.optimizer.step(full.layer, {});
  }
  full.layer.add_adapter("fresh", adapter_config(4, 1.0, "bf16"), {});  // no state yet
  TempPath dir, resaved;
  io::save_sharded_optimizer(full.optimizer, full.layer, io::ShardLayout{}, dir.path, "m.", {});
  io::write_sharded_optimizer_index(dir.path);

  for (const io::ShardGrid grid : {io::ShardGrid{2, 2, io::TpMode::column}, io::ShardGrid{4, 1, io::TpMode::row},
                                   io::ShardGrid{1, 4, io::TpMode::column}}) {
    for (std::int64_t e = 0; e < grid.ep; ++e)
      for (std::int64_t t = 0; t < grid.tp; ++t) {
        const io::ShardLayout layout{grid.tp, t, grid.ep, e, grid.mode};
        INFO("tp " << t << "/" << grid.tp << " ep " << e << "/" << grid.ep << " " << io::tp_mode_name(grid.mode));
        const bool column = grid.mode == io::TpMode::column;
        const std::int64_t ne = kE / grid.ep, nin = column ? kIn : kIn / grid.tp, nout = column ? kOut / grid.tp : kOut;
        RankModel rank(ne, nin, nout, config);
        rank.layer.add_adapter("fresh", adapter_config(4, 1.0, "bf16"), {});
        io::load_sharded_optimizer(rank.optimizer, rank.layer, layout, dir.path, "m.", {});
        if (grid.tp == 2 && grid.ep == 2)  // and back: the 2 x 2 ranks save what they loaded
          io::save_sharded_optimizer(rank.optimizer, rank.layer, layout, resaved.path, "m.", {});
        CHECK(rank.optimizer.counters({}) == full.optimizer.counters({}));
        CHECK_FALSE(rank.optimizer.state("fresh"));
        for (const char* name : {"style", "domain"}) {
          const auto mine = *rank.optimizer.state(name);
          const auto all = *full.optimizer.state(name);
          CHECK(*mine.a.step == 3);
          CHECK(*mine.b.step == 3);
          const std::int64_t r = full.layer.adapter(name).config.rank;
          for (const auto& [local, global] : {std::pair{mine.a.m, all.a.m}, std::pair{mine.a.v, all.a.v},
                                              std::pair{mine.a.master, all.a.master}}) {
            if (!global.data) continue;
            CHECK(full.h.download(local).values == cut(full.h.download(global), e * ne, ne, 0, r, column ? 0 : t * nin, nin));
          }
          for (const auto& [local, global] : {std::pair{mine.b.m, all.b.m}, std::pair{mine.b.v, all.b.v},
                                              std::pair{mine.b.master, all.b.master}}) {
            if (!global.data) continue;
            CHECK(full.h.download(local).values == cut(full.h.download(global), e * ne, ne, column ? t * nout : 0, nout, 0, r));
          }
        }
      }
  }

  io::write_sharded_optimizer_index(resaved.path);
  RankModel whole(kE, kIn, kOut, config);
  whole.layer.add_adapter("fresh", adapter_config(4, 1.0, "bf16"), {});
  io::load_sharded_optimizer(whole.optimizer, whole.layer, io::ShardLayout{}, resaved.path, "m.", {});
  for (const char* name : {"style", "domain"}) {
    const AdamWAdapterState mine = *whole.optimizer.state(name), all = *full.optimizer.state(name);
    for (const auto& [local, global] : {std::pair{mine.a.m, all.a.m}, std::pair{mine.a.v, all.a.v},
                                        std::pair{mine.b.m, all.b.m}, std::pair{mine.b.master, all.b.master}})
      if (global.data) CHECK(full.h.download(local).values == full.h.download(global).values);
  }

  // Strict: another prefix, another adapter set, a layer of the wrong size.
  RankModel other(kE, kIn, kOut, config);
  check_error([&] { io::load_sharded_optimizer(other.optimizer, other.layer, io::ShardLayout{}, dir.path, "x.", {}); },
              ErrorCode::invalid_argument, "its keys use the prefix \"m.\", not \"x.\"");
  check_error([&] { io::load_sharded_optimizer(other.optimizer, other.layer, io::ShardLayout{}, dir.path, "m.", {}); },
              ErrorCode::invalid_argument, "unexpected adapter \"fresh\"");
  other.layer.add_adapter("fresh", adapter_config(4, 1.0, "bf16"), {});
  const io::ShardLayout half{1, 0, 2, 1, io::TpMode::column};
  check_error([&] { io::load_sharded_optimizer(other.optimizer, other.layer, half, dir.path, "m.", {}); },
              ErrorCode::invalid_argument, "the layer holds 4 experts but rank ep 1/2 of the checkpoint's 4 holds 2");
  CHECK_FALSE(other.optimizer.state("style"));
}

namespace {

/// A rank's single fp32 adapter under tensor-parallel mode `Mode`, without a base: the smallest
/// TrainableLayer (the optimizer needs nothing else).
template <class Mode>
struct RankAdapters {
  using backend_type = HostBackend;
  struct policies {
    using parallel_mode = Mode;
  };
  ResolvedAdapterConfig config{4, 1.0f, true, DType::fp32, InitMethod::kaiming_zeros, true, 0, 0};
  HostTensor a, b, grad_a, grad_b;

  [[nodiscard]] std::vector<std::string> adapter_names() const { return {"ad"}; }
  AdapterView adapter(std::string_view /*name*/) {
    const auto ref = [](HostTensor& t) { return TensorRef{t.values.data(), DType::fp32, t.shape}; };
    return {"ad", 0, config, ref(a), ref(b), ref(grad_a), ref(grad_b)};
  }
};

}  // namespace

TEST_CASE("TP x EP: every rank clips by the norm of the whole layer and skips the same steps") {
  Rng rng;
  INFO("seed " << rng.seed);
  constexpr std::int64_t kExperts = 4, kRank = 4, kInF = 16, kOutF = 12, kTp = 2, kEp = 2;
  RankAdapters<policy::NoTensorParallel> whole;
  whole.a = random_tensor(rng, DType::fp32, {kExperts, kRank, kInF}, 0.3f);
  whole.b = random_tensor(rng, DType::fp32, {kExperts, kOutF, kRank}, 0.3f);
  whole.grad_a = random_tensor(rng, DType::fp32, whole.a.shape);
  whole.grad_b = random_tensor(rng, DType::fp32, whole.b.shape);
  double sum = 0.0;
  for (const HostTensor* g : {&whole.grad_a, &whole.grad_b})
    for (float x : g->values) sum += double(x) * x;
  AdamWConfig config;
  config.lr = 1e-2f;
  config.max_grad_norm = static_cast<float>(std::sqrt(sum) / 3);

  // Column mode: A replicated, B's rows split over TP; experts split over EP.
  const auto slice = [](const HostTensor& t, std::int64_t e0, std::int64_t ne, std::int64_t r0, std::int64_t nr) {
    HostTensor out(DType::fp32, {ne, nr, t.shape[2]});
    out.values = cut(t, e0, ne, r0, nr, 0, t.shape[2]);
    return out;
  };
  std::vector<RankAdapters<policy::ColumnParallel>> ranks(kTp * kEp);
  for (std::int64_t e = 0; e < kEp; ++e)
    for (std::int64_t t = 0; t < kTp; ++t) {
      auto& r = ranks[static_cast<std::size_t>(e * kTp + t)];
      const std::int64_t ne = kExperts / kEp, nout = kOutF / kTp;
      r.a = slice(whole.a, e * ne, ne, 0, kRank), r.grad_a = slice(whole.grad_a, e * ne, ne, 0, kRank);
      r.b = slice(whole.b, e * ne, ne, t * nout, nout), r.grad_b = slice(whole.grad_b, e * ne, ne, t * nout, nout);
    }

  AdamW<RankAdapters<policy::NoTensorParallel>> reference(config);
  reference.step(whole, {});
  const float reference_norm = reference.last_norm({});
  CHECK(std::abs(reference_norm - std::sqrt(sum)) <= 1e-6 * std::sqrt(sum));

  std::vector<float> norms(ranks.size());
  std::vector<AdamWCounters> counters(ranks.size());
  std::vector<std::vector<float>> moments(ranks.size() * 2);  // each rank's m of A and of B after the first step
  std::vector<int> skipped_unchanged(ranks.size(), 0);
  moe::run_host_grid(kTp, kEp, [&](const moe::GridPlace& place, parallel::HostThreadCommunicator& ep,
                                   parallel::HostThreadCommunicator& tp) {
    const auto r = static_cast<std::size_t>(place.p * kTp + place.q);
    auto& mine = ranks[r];
    AdamW<RankAdapters<policy::ColumnParallel>> optimizer(config);
    const NormGroups<parallel::HostThreadCommunicator> groups{&tp, &ep};
    norms[r] = *optimizer.step({mine}, {}, groups);
    const auto state = *optimizer.state("ad");
    const auto* m_a = static_cast<const float*>(state.a.m.data);
    const auto* m_b = static_cast<const float*>(state.b.m.data);
    moments[2 * r].assign(m_a, m_a + state.a.m.numel());
    moments[2 * r + 1].assign(m_b, m_b + state.b.m.numel());
    const std::vector<float> a_before = mine.a.values, b_before = mine.b.values;
    if (r == 3) mine.grad_b[5] = std::numeric_limits<float>::infinity();  // one rank overflows
    optimizer.step({mine}, {}, groups);
    skipped_unchanged[r] = mine.a.values == a_before && mine.b.values == b_before;
    counters[r] = optimizer.counters({});
  });
  const auto whole_state = *reference.state("ad");
  HostTensor m_a(DType::fp32, whole.a.shape), m_b(DType::fp32, whole.b.shape);
  std::copy_n(static_cast<const float*>(whole_state.a.m.data), m_a.size(), m_a.values.begin());
  std::copy_n(static_cast<const float*>(whole_state.b.m.data), m_b.size(), m_b.values.begin());
  for (std::size_t r = 0; r < ranks.size(); ++r) {
    INFO("rank " << r);
    const std::int64_t e = static_cast<std::int64_t>(r) / kTp, t = static_cast<std::int64_t>(r) % kTp;
    const std::int64_t ne = kExperts / kEp, nout = kOutF / kTp;
    CHECK(std::abs(norms[r] - reference_norm) <= 1e-6 * reference_norm);
    CHECK(counters[r].step == 1);
    CHECK(counters[r].skipped == 1);
    CHECK(skipped_unchanged[r]);
    // The clip coefficient of the whole layer: the moments are the single rank's slices.
    CHECK(relative_error(moments[2 * r], slice(m_a, e * ne, ne, 0, kRank).values) < 1e-5);
    CHECK(relative_error(moments[2 * r + 1], slice(m_b, e * ne, ne, t * nout, nout).values) < 1e-5);
    CHECK(relative_error(ranks[r].a.values, slice(whole.a, e * ne, ne, 0, kRank).values) < 1e-6);
    CHECK(relative_error(ranks[r].b.values, slice(whole.b, e * ne, ne, t * nout, nout).values) < 1e-6);
    CHECK(ranks[r].a.values == ranks[static_cast<std::size_t>(e * kTp)].a.values);  // replicas stay identical
  }
}

TEST_CASE("resume across a reshard: saved at TP 2 x EP 2, resumed on one device, within tolerance of the "
          "uninterrupted TP 2 x EP 2 run") {
  constexpr int kTp = 2, kEp = 2, kFirst = 3, kSteps = 6;
  GlobalProblem g(4, 64, 64, 8, 90, DType::bf16);
  INFO("seed " << g.rng.seed);
  std::vector<HostTensor> xs, dys;
  for (int s = 0; s < kSteps; ++s) {
    xs.push_back(random_tensor(g.rng, g.dtype, {g.rows, g.in}));
    dys.push_back(random_tensor(g.rng, g.dtype, {g.rows, g.out}));
  }
  AdamWConfig config;
  config.lr = 1e-2f;
  config.weight_decay = 0.01f;
  config.max_grad_norm = 0.5f;
  config.schedule = {ScheduleKind::cosine, 1, kSteps, 0.1f};
  const Layout<policy::ColumnParallel> layout{kTp, kEp, 1};
  TempPath dir;

  // Trains steps [0, steps) at TP x EP; returns each rank's master weights of A and B (a TP x EP
  // checkpoint of adapters and optimizer state is written when `save`).
  const auto run_parallel = [&](int steps, bool save) {
    std::vector<HostTensor> masters(2 * kTp * kEp);
    moe::run_host_grid(kTp, kEp, [&](const moe::GridPlace& place, parallel::HostThreadCommunicator& ep,
                                     parallel::HostThreadCommunicator& tp) {
      HostHarness h;
      RankEnv<HostHarness, parallel::HostThreadCommunicator> env{h, tp, place.q, place.p, kTp, kEp};
      const EpPart part(g, kEp, place.p);
      auto layer = rank_layer(env, layout, g, h.make_base(cut_factor(g.w, part.e0, part.experts, layout.w_axis(), kTp, place.q)));
      layer.add_adapter("ad", g.config(), {});
      const AdapterView v = layer.adapter("ad");
      h.write(v.a, cut_factor(g.a, part.e0, part.experts, layout.a_axis(), kTp, place.q));
      h.write(v.b, cut_factor(g.b, part.e0, part.experts, layout.b_axis(), kTp, place.q));
      AdamW<std::remove_cvref_t<decltype(layer)>> optimizer(config);
      auto y = h.poisoned(g.dtype, {part.rows, layer.out_features()});
      for (int s = 0; s < steps; ++s) {
        const auto x = h.upload(cut_rows(xs[static_cast<std::size_t>(s)], part.r0, part.rows, layout.x_axis(), kTp, place.q));
        const auto dy = h.upload(cut_rows(dys[static_cast<std::size_t>(s)], part.r0, part.rows, layout.y_axis(), kTp, place.q));
        layer.forward(x.ref(), h.counts(part.counts), y.ref(), {});
        layer.backward(x.ref(), h.counts(part.counts), dy.ref(), TensorRef{}, {}, WriteMode::overwrite);
        optimizer.step({layer}, {}, NormGroups<parallel::HostThreadCommunicator>{&tp, &ep});
      }
      if (save) {
        io::save_sharded(layer, dir.path, "x.", {});
        io::save_sharded_optimizer(optimizer, layer, dir.path, "x.", {});
      }
      const AdamWAdapterState state = *optimizer.state("ad");
      const std::size_t r = static_cast<std::size_t>(place.p * kTp + place.q);
      masters[2 * r] = h.download(state.a.master), masters[2 * r + 1] = h.download(state.b.master);
    });
    if (save) {
      io::write_sharded_index(dir.path);
      io::write_sharded_optimizer_index(dir.path);
    }
    return masters;
  };
  const std::vector<HostTensor> straight = run_parallel(kSteps, false);
  run_parallel(kFirst, true);

  HostHarness h;
  HostHarness::Layer layer(h.make_base(g.w));
  layer.add_adapter("ad", g.config(), {});
  io::load_sharded(layer, dir.path, "x.", {});
  AdamW<HostHarness::Layer> optimizer(config);
  io::load_sharded_optimizer(optimizer, layer, dir.path, "x.", {});
  CHECK(optimizer.counters({}).step == kFirst);
  auto y = h.poisoned(g.dtype, {g.rows, g.out});
  for (int s = kFirst; s < kSteps; ++s) {
    const auto x = h.upload(xs[static_cast<std::size_t>(s)]), dy = h.upload(dys[static_cast<std::size_t>(s)]);
    layer.forward(x.ref(), h.counts(g.counts), y.ref(), {});
    layer.backward(x.ref(), h.counts(g.counts), dy.ref(), TensorRef{}, {}, WriteMode::overwrite);
    optimizer.step(layer, {});
  }
  // The resumed run's updates (master weights minus the start) against each rank's: within 2e-2
  // (the layouts' gradients differ by bf16 roundings in another order, docs/parallel.md §1).
  const AdamWAdapterState state = *optimizer.state("ad");
  const HostTensor a = h.download(state.a.master), b = h.download(state.b.master);
  const auto delta = [](const HostTensor& t, const HostTensor& start) {
    std::vector<float> d(t.size());
    for (std::size_t i = 0; i < d.size(); ++i) d[i] = t[i] - start[i];
    return d;
  };
  // Whether the run trained is asked of the whole layer: a rank whose experts all drew no rows
  // moves by weight decay alone.
  double moved_a_squares = 0.0, moved_b_squares = 0.0;
  const auto squares = [](const std::vector<float>& d) {
    double sum = 0.0;
    for (const float x : d) sum += static_cast<double>(x) * x;
    return sum;
  };
  for (int e = 0; e < kEp; ++e)
    for (int t = 0; t < kTp; ++t) {
      INFO("tp rank " << t << " ep rank " << e);
      const EpPart part(g, kEp, e);
      const std::size_t r = static_cast<std::size_t>(e * kTp + t);
      const HostTensor a0 = cut_factor(g.a, part.e0, part.experts, layout.a_axis(), kTp, t);
      const HostTensor b0 = cut_factor(g.b, part.e0, part.experts, layout.b_axis(), kTp, t);
      const HostTensor a_resumed = cut_factor(a, part.e0, part.experts, layout.a_axis(), kTp, t);
      const HostTensor b_resumed = cut_factor(b, part.e0, part.experts, layout.b_axis(), kTp, t);
      const std::vector<float> moved_a = delta(straight[2 * r], a0), moved_b = delta(straight[2 * r + 1], b0);
      moved_a_squares += squares(moved_a);
      moved_b_squares += squares(moved_b);
      const double error_a = relative_error(delta(a_resumed, a0), moved_a);
      const double error_b = relative_error(delta(b_resumed, b0), moved_b);
      CHECK(error_a < 2e-2);
      CHECK(error_b < 2e-2);
    }
  CHECK(std::sqrt(moved_a_squares) > 1e-2);  // they trained
  CHECK(std::sqrt(moved_b_squares) > 1e-2);
}
