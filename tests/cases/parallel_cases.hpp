/// \file
/// \brief Tensor and expert parallelism of GroupedLoRA, written once and run through a ranks harness
/// (host threads over HostThreadCommunicator; one thread per GPU over NcclCommunicator). Every TP × EP
/// layout is compared with the single-device layer on the same global data.
///
/// A ranks harness `P` provides `Harness` (the per-rank backend harness), `Comm` (its communicator),
/// `max_ranks()` and `run(tp, ep, f)`, which calls `f(RankEnv&)` on tp · ep ranks at once (one TP
/// group of tp ranks per EP rank) and rethrows the first exception of a rank. Ranks only compute and record; the checks run on the calling thread.
#pragma once

#include <doctest/doctest.h>

#include <algorithm>
#include <filesystem>
#include <random>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "moelora/io/sharded.hpp"
#include "moelora/parallel/amax_sync.hpp"
#include "support/harness.hpp"

namespace moelora::testing {

/// What one rank sees: its harness, its TP group and its place.
template <class H, class C>
struct RankEnv {
  H& h;
  C& tp;
  int tp_rank, ep_rank, tp_size, ep_size;
  [[nodiscard]] int index() const { return ep_rank * tp_size + tp_rank; }
};

/// Which axis of a tensor a layout cuts over TP.
enum class Cut { none, rows, cols };

/// The global index of local index `i` of an extent cut over tp (rank t) in `blocks` blocks, written
/// from docs/parallel.md independently of the library: block b of the local extent is rows
/// `[b · G/blocks + t · L/blocks, +L/blocks)` of the global extent G.
inline std::int64_t global_of(std::int64_t i, std::int64_t local, std::int64_t global, int t, std::int64_t blocks) {
  const std::int64_t lb = local / blocks, gb = global / blocks;
  return (i / lb) * gb + t * lb + i % lb;
}

/// Rank t's part of experts [e0, e0 + ne) of a global `[E, R, C]` tensor.
inline HostTensor cut_factor(const HostTensor& g, std::int64_t e0, std::int64_t ne, Cut axis, int tp, int t,
                             std::int64_t blocks = 1) {
  const std::int64_t R = g.shape[1], C = g.shape[2];
  const std::int64_t rows = axis == Cut::rows ? R / tp : R, cols = axis == Cut::cols ? C / tp : C;
  HostTensor out(g.dtype, {ne, rows, cols});
  for (std::int64_t e = 0; e < ne; ++e)
    for (std::int64_t i = 0; i < rows; ++i)
      for (std::int64_t j = 0; j < cols; ++j) {
        const std::int64_t gi = axis == Cut::rows ? global_of(i, rows, R, t, blocks) : i;
        const std::int64_t gj = axis == Cut::cols ? global_of(j, cols, C, t, 1) : j;
        out[static_cast<std::size_t>((e * rows + i) * cols + j)] = g[static_cast<std::size_t>(((e0 + e) * R + gi) * C + gj)];
      }
  return out;
}

/// Rows [r0, r0 + n) of a global `[T, C]` activation, its columns cut (Cut::cols) over tp by `blocks`.
inline HostTensor cut_rows(const HostTensor& g, std::int64_t r0, std::int64_t n, Cut axis, int tp, int t,
                           std::int64_t blocks = 1) {
  const std::int64_t C = g.shape[1], cols = axis == Cut::cols ? C / tp : C;
  HostTensor out(g.dtype, {n, cols});
  for (std::int64_t i = 0; i < n; ++i)
    for (std::int64_t j = 0; j < cols; ++j)
      out[static_cast<std::size_t>(i * cols + j)] =
          g[static_cast<std::size_t>((r0 + i) * C + (axis == Cut::cols ? global_of(j, cols, C, t, blocks) : j))];
  return out;
}

/// Σ over the given tensors in fp64 (a caller's reduction of partial outputs).
inline std::vector<double> sum_of(const std::vector<const HostTensor*>& parts) {
  std::vector<double> sum(parts.front()->size(), 0.0);
  for (const HostTensor* p : parts)
    for (std::size_t i = 0; i < sum.size(); ++i) sum[i] += (*p)[i];
  return sum;
}

inline std::vector<double> as_doubles(const HostTensor& t) { return {t.values.begin(), t.values.end()}; }

/// The global problem and what the single-device layer computes on it.
struct GlobalProblem {
  Rng rng;
  std::int64_t experts, in, out, rank, rows;
  DType dtype;
  float scale = 0.75f;
  HostTensor w, x, a, b, dy;  // W [E, out, in], x [T, in], A [E, r, in], B [E, out, r], dy [T, out]
  std::vector<std::int64_t> counts, offsets;
  HostTensor a0, y, dx, grad_a, grad_b;  // the reference's Kaiming A, y, dx and gradients

  GlobalProblem(std::int64_t e, std::int64_t i, std::int64_t o, std::int64_t r, std::int64_t t, DType d,
                Spread spread = Spread::skewed)
      : experts(e), in(i), out(o), rank(r), rows(t), dtype(d) {
    w = random_tensor(rng, dtype, {experts, out, in}, 0.1f);
    x = random_tensor(rng, dtype, {rows, in});
    a = random_tensor(rng, dtype, {experts, rank, in}, 0.3f);
    b = random_tensor(rng, dtype, {experts, out, rank}, 0.3f);
    dy = random_tensor(rng, dtype, {rows, out});
    counts = make_counts(rng, experts, rows, spread);
    offsets = offsets_of(counts);
  }

  [[nodiscard]] AdapterConfig config() const {
    AdapterConfig c;
    c.rank = rank;
    c.scale = scale;
    c.lora_dtype = std::string(dtype_name(dtype));
    c.seed = 424242;
    return c;
  }

  /// Runs the single-device layer of harness H on the whole problem.
  template <class H>
  void run_reference() {
    H h;
    typename H::Layer layer(h.make_base(w));
    layer.add_adapter("ad", config(), h.stream());
    const AdapterView v = layer.adapter("ad");
    a0 = h.download(v.a);
    h.write(v.a, a), h.write(v.b, b);
    const auto x_dev = h.upload(x), dy_dev = h.upload(dy);
    auto y_dev = h.poisoned(dtype, {rows, out}), dx_dev = h.poisoned(dtype, {rows, in});
    const ExpertCounts c = h.counts(counts);
    layer.forward(x_dev.ref(), c, y_dev.ref(), h.stream());
    layer.backward(x_dev.ref(), c, dy_dev.ref(), dx_dev.ref(), h.stream(), WriteMode::overwrite);
    y = h.download(y_dev.ref()), dx = h.download(dx_dev.ref());
    grad_a = h.download(v.grad_a), grad_b = h.download(v.grad_b);
  }
};

/// A TP × EP layout of one mode and the cuts it implies.
template <class Mode>
struct Layout {
  static constexpr bool kColumn = std::is_same_v<Mode, policy::ColumnParallel>;
  int tp, ep;
  std::int64_t blocks;  // column: B's (and W's) row blocks

  [[nodiscard]] Cut w_axis() const { return kColumn ? Cut::rows : Cut::cols; }
  [[nodiscard]] Cut a_axis() const { return kColumn ? Cut::none : Cut::cols; }
  [[nodiscard]] Cut b_axis() const { return kColumn ? Cut::rows : Cut::none; }
  [[nodiscard]] Cut x_axis() const { return kColumn ? Cut::none : Cut::cols; }   // x and dx
  [[nodiscard]] Cut y_axis() const { return kColumn ? Cut::cols : Cut::none; }   // y and dy
  [[nodiscard]] parallel::Placement placement(const GlobalProblem& g, int ep_rank) const {
    return {ep_rank, ep, tp, g.in, g.out, blocks};
  }
};

/// The part of the global problem an EP rank holds: experts [e0, e0 + experts), rows [r0, r0 + rows).
struct EpPart {
  std::int64_t e0, experts, r0, rows;
  std::vector<std::int64_t> counts;
  EpPart(const GlobalProblem& g, int ep, int ep_rank)
      : e0(ep_rank * (g.experts / ep)),
        experts(g.experts / ep),
        r0(g.offsets[static_cast<std::size_t>(e0)]),
        rows(g.offsets[static_cast<std::size_t>(e0 + experts)] - r0),
        counts(g.counts.begin() + e0, g.counts.begin() + e0 + experts) {}
};

/// What a rank computed.
struct RankResult {
  HostTensor a0, b0, y, dx, grad_a, grad_b;
};

/// Builds rank `env`'s layer of layout `l` over its slice of g's weights (base made by `make_base`).
template <class Mode, class Env, class Base>
GroupedLoRA<Base, Mode> rank_layer(Env& env, const Layout<Mode>& l, const GlobalProblem& g, Base base) {
  GroupedLoRA<Base, Mode> layer(std::move(base), env.tp, l.placement(g, env.ep_rank), env.h.stream());
  return layer;
}

/// Runs layout `l` of the problem: every rank initialises the adapter, takes its slices of the
/// global factors, runs forward and backward (overwriting NaN-poisoned gradients); returns what
/// each rank computed, indexed by ep_rank · tp + tp_rank.
template <class P, class Mode>
std::vector<RankResult> run_layout(const GlobalProblem& g, const Layout<Mode>& l) {
  std::vector<RankResult> results(static_cast<std::size_t>(l.tp * l.ep));
  P::run(l.tp, l.ep, [&](auto& env) {
    const int t = env.tp_rank;
    const EpPart part(g, l.ep, env.ep_rank);
    auto& h = env.h;
    auto layer = rank_layer(env, l, g, h.make_base(cut_factor(g.w, part.e0, part.experts, l.w_axis(), l.tp, t, l.blocks)));
    layer.add_adapter("ad", g.config(), h.stream());
    const AdapterView v = layer.adapter("ad");
    RankResult& r = results[static_cast<std::size_t>(env.index())];
    r.a0 = h.download(v.a), r.b0 = h.download(v.b);
    h.write(v.a, cut_factor(g.a, part.e0, part.experts, l.a_axis(), l.tp, t));
    h.write(v.b, cut_factor(g.b, part.e0, part.experts, l.b_axis(), l.tp, t, l.blocks));
    const auto x = h.upload(cut_rows(g.x, part.r0, part.rows, l.x_axis(), l.tp, t));
    const auto dy = h.upload(cut_rows(g.dy, part.r0, part.rows, l.y_axis(), l.tp, t, l.blocks));
    auto y = h.poisoned(g.dtype, {part.rows, layer.out_features()});
    auto dx = h.poisoned(g.dtype, {part.rows, layer.in_features()});
    for (const TensorRef& grad : {v.grad_a, v.grad_b})
      h.write(grad, HostTensor(DType::fp32, grad.shape, std::numeric_limits<float>::quiet_NaN()));
    const ExpertCounts counts = h.counts(part.counts);
    layer.forward(x.ref(), counts, y.ref(), h.stream());
    layer.backward(x.ref(), counts, dy.ref(), dx.ref(), h.stream(), WriteMode::overwrite);
    r.y = h.download(y.ref()), r.dx = h.download(dx.ref());
    r.grad_a = h.download(v.grad_a), r.grad_b = h.download(v.grad_b);
  });
  return results;
}

/// Checks layout `l`'s results against the single-device layer's on the same global data: the Kaiming
/// init bitwise, the reduced forward output and dx, and every factor gradient within the dtype's
/// tolerance (bitwise at TP = EP = 1), the replicated factor's gradient bitwise equal on all ranks.
template <class Mode>
void check_layout(const GlobalProblem& g, const Layout<Mode>& l, const std::vector<RankResult>& results) {
  const double tol = tolerance(g.dtype);
  const bool exact = l.tp == 1 && l.ep == 1;
  for (int e = 0; e < l.ep; ++e) {
    const EpPart part(g, l.ep, e);
    INFO("ep_rank " << e);
    std::vector<const HostTensor*> ys, dxs;
    for (int t = 0; t < l.tp; ++t) {
      INFO("tp_rank " << t);
      const RankResult& r = results[static_cast<std::size_t>(e * l.tp + t)];
      const RankResult& first = results[static_cast<std::size_t>(e * l.tp)];
      CHECK(r.a0.values == cut_factor(g.a0, part.e0, part.experts, l.a_axis(), l.tp, t).values);
      CHECK(std::all_of(r.b0.values.begin(), r.b0.values.end(), [](float v) { return v == 0.0f; }));
      const HostTensor grad_a = cut_factor(g.grad_a, part.e0, part.experts, l.a_axis(), l.tp, t);
      const HostTensor grad_b = cut_factor(g.grad_b, part.e0, part.experts, l.b_axis(), l.tp, t, l.blocks);
      CHECK(relative_error(r.grad_a.values, grad_a.values) < tol);
      CHECK(relative_error(r.grad_b.values, grad_b.values) < tol);
      if (Layout<Mode>::kColumn) {
        CHECK(r.grad_a.values == first.grad_a.values);  // the replicated A's gradient, bitwise on every rank
        CHECK(relative_error(r.y.values, cut_rows(g.y, part.r0, part.rows, Cut::cols, l.tp, t, l.blocks).values) < tol);
      } else {
        CHECK(r.grad_b.values == first.grad_b.values);  // the replicated B's gradient, bitwise on every rank
        CHECK(relative_error(r.dx.values, cut_rows(g.dx, part.r0, part.rows, Cut::cols, l.tp, t).values) < tol);
      }
      if (exact) {
        CHECK(r.y.values == g.y.values);
        CHECK(r.dx.values == g.dx.values);
        CHECK(r.grad_a.values == g.grad_a.values);
        CHECK(r.grad_b.values == g.grad_b.values);
      }
      ys.push_back(&r.y), dxs.push_back(&r.dx);
    }
    // The partial sums the layer leaves to its caller: the column layer's dx, the row layer's y.
    const std::vector<double> whole = sum_of(Layout<Mode>::kColumn ? dxs : ys);
    const HostTensor& ref = Layout<Mode>::kColumn ? g.dx : g.y;
    CHECK(relative_error(std::vector<float>(whole.begin(), whole.end()),
                         as_doubles(cut_rows(ref, part.r0, part.rows, Cut::none, 1, 0))) < tol);
  }
}

/// Every TP × EP layout of mode `Mode` that the harness has ranks for, bf16 and fp32.
template <class P, class Mode>
void check_all_layouts() {
  for (const DType dtype : {DType::bf16, DType::fp32}) {
    GlobalProblem g(4, 64, 64, 8, 90, dtype);
    g.template run_reference<typename P::Harness>();
    for (const int tp : {1, 2, 4}) {
      for (const int ep : {1, 2}) {
        if (tp * ep > P::max_ranks()) continue;
        const Layout<Mode> l{tp, ep, Layout<Mode>::kColumn && dtype == DType::bf16 ? 2 : 1};
        INFO("seed " << g.rng.seed << " mode " << Mode::name << " dtype " << dtype_name(dtype) << " tp " << tp << " ep "
                     << ep << " blocks " << l.blocks);
        check_layout(g, l, run_layout<P>(g, l));
      }
    }
  }
}

/// Runs `action`, which must throw moelora::Error with a message containing `needle`; returns the message.
template <class F>
std::string error_of(F&& action) {
  try {
    action();
  } catch (const Error& e) {
    return e.what();
  }
  return "(no error)";
}

}  // namespace moelora::testing

using namespace moelora;          // NOLINT(google-build-using-namespace)
using namespace moelora::testing; // NOLINT(google-build-using-namespace)

TEST_CASE_TEMPLATE_DEFINE("column-parallel layouts (TP × EP, gated B) match the single-device layer", P, column_layouts) {
  check_all_layouts<P, policy::ColumnParallel>();
}

TEST_CASE_TEMPLATE_DEFINE("row-parallel layouts (TP × EP) match the single-device layer", P, row_layouts) {
  check_all_layouts<P, policy::RowParallel>();
}

TEST_CASE_TEMPLATE_DEFINE("AdamW keeps the replicated factor bitwise identical on every rank for 20 steps", P, adamw_replicas) {
  const int tp = std::min(4, P::max_ranks());
  for (const bool column : {true, false}) {
    GlobalProblem g(4, 64, 64, 8, 90, DType::bf16);
    INFO("seed " << g.rng.seed << " column " << column);
    constexpr int kSteps = 20;
    std::vector<HostTensor> xs, dys;
    for (int s = 0; s < kSteps; ++s) {
      xs.push_back(random_tensor(g.rng, g.dtype, {g.rows, g.in}));
      dys.push_back(random_tensor(g.rng, g.dtype, {g.rows, g.out}));
    }
    std::vector<HostTensor> replicated(static_cast<std::size_t>(tp)), first(static_cast<std::size_t>(tp));
    const auto train = [&](auto mode) {
      using Mode = decltype(mode);
      const Layout<Mode> l{tp, 1, 1};
      P::run(tp, 1, [&](auto& env) {
        const int t = env.tp_rank;
        auto& h = env.h;
        auto layer = rank_layer(env, l, g, h.make_base(cut_factor(g.w, 0, g.experts, l.w_axis(), tp, t)));
        layer.add_adapter("ad", g.config(), h.stream());
        const AdapterView v = layer.adapter("ad");
        h.write(v.b, cut_factor(g.b, 0, g.experts, l.b_axis(), tp, t));  // B ≠ 0, so that dA is not zero
        AdamW<std::remove_cvref_t<decltype(layer)>> adamw({.lr = 1e-2f});
        auto y = h.poisoned(g.dtype, {g.rows, layer.out_features()});
        auto dx = h.poisoned(g.dtype, {g.rows, layer.in_features()});
        const ExpertCounts counts = h.counts(g.counts);
        const TensorRef& rep = Layout<Mode>::kColumn ? v.a : v.b;
        first[static_cast<std::size_t>(t)] = h.download(rep);
        for (int s = 0; s < kSteps; ++s) {
          const auto x = h.upload(cut_rows(xs[static_cast<std::size_t>(s)], 0, g.rows, l.x_axis(), tp, t));
          const auto dy = h.upload(cut_rows(dys[static_cast<std::size_t>(s)], 0, g.rows, l.y_axis(), tp, t));
          layer.forward(x.ref(), counts, y.ref(), h.stream());
          layer.backward(x.ref(), counts, dy.ref(), dx.ref(), h.stream(), WriteMode::overwrite);
          adamw.step(layer, h.stream());
        }
        replicated[static_cast<std::size_t>(t)] = h.download(rep);
      });
    };
    if (column) train(policy::ColumnParallel{});
    else train(policy::RowParallel{});
    CHECK(replicated[0].values != first[0].values);  // trained
    for (int t = 1; t < tp; ++t) CHECK(replicated[static_cast<std::size_t>(t)].values == replicated[0].values);
  }
}

TEST_CASE_TEMPLATE_DEFINE("SVD inits under TP equal the single-device init's slices; the quantized base too", P, svd_init_tp) {
  using H = typename P::Harness;
  using Backend = typename H::backend;
  using QBase = QuantizedGroupedLinear<Backend>;
  const int tp = std::min(2, P::max_ranks());
  const quant::QuantSpec spec = quant::parse_quant_spec("nvfp4");  // a tensor amax shared by the experts
  for (const InitMethod method : {InitMethod::svdquant, InitMethod::loftq}) {
    for (const bool column : {true, false}) {
      GlobalProblem g(2, 64, 64, 8, 16, DType::bf16);
      INFO("seed " << g.rng.seed << " method " << init_method_name(method) << " column " << column);
      AdapterConfig config = g.config();
      config.init = method;
      config.init_iterations = 2;
      // The single-device layer.
      HostTensor ref_a, ref_b, ref_w;
      {
        H h;
        GroupedLoRA<QBase> layer(h.make_quantized_base(g.w, spec));
        layer.add_adapter("ad", config, h.stream());
        ref_a = h.download(layer.adapter("ad").a), ref_b = h.download(layer.adapter("ad").b);
        auto w = h.poisoned(DType::fp32, {g.experts, g.out, g.in});
        layer.base().dequantized_weight(w.ref(), h.stream());
        ref_w = h.download(w.ref());
      }
      std::vector<HostTensor> as(static_cast<std::size_t>(tp)), bs(as.size()), ws(as.size());
      const auto run = [&](auto mode) {
        using Mode = decltype(mode);
        const Layout<Mode> l{tp, 1, Layout<Mode>::kColumn ? 2 : 1};
        P::run(tp, 1, [&](auto& env) {
          const int t = env.tp_rank;
          auto& h = env.h;
          const HostTensor w = cut_factor(g.w, 0, g.experts, l.w_axis(), tp, t, l.blocks);
          quant::FormatQuantizer<Backend> quantizer(spec);
          quantizer.set_amax_sync(parallel::amax_sync(env.tp));  // the ranks that share the amax (EP = 1)
          QBase base(h.linalg(), g.experts, w.shape[2], w.shape[1], g.dtype, std::move(quantizer));
          const std::vector<std::byte> bytes = w.encode();
          base.set_weight({bytes.data(), w.dtype, w.shape}, h.stream());
          auto layer = rank_layer(env, l, g, std::move(base));
          layer.add_adapter("ad", config, h.stream());
          as[static_cast<std::size_t>(t)] = h.download(layer.adapter("ad").a);
          bs[static_cast<std::size_t>(t)] = h.download(layer.adapter("ad").b);
          auto dq = h.poisoned(DType::fp32, w.shape);
          layer.base().dequantized_weight(dq.ref(), h.stream());
          ws[static_cast<std::size_t>(t)] = h.download(dq.ref());
        });
        for (int t = 0; t < tp; ++t) {
          INFO("tp_rank " << t);
          CHECK(as[static_cast<std::size_t>(t)].values == cut_factor(ref_a, 0, g.experts, l.a_axis(), tp, t).values);
          CHECK(bs[static_cast<std::size_t>(t)].values == cut_factor(ref_b, 0, g.experts, l.b_axis(), tp, t, l.blocks).values);
          CHECK(ws[static_cast<std::size_t>(t)].values == cut_factor(ref_w, 0, g.experts, l.w_axis(), tp, t, l.blocks).values);
        }
      };
      if (column) run(policy::ColumnParallel{});
      else run(policy::RowParallel{});
    }
  }
}

TEST_CASE_TEMPLATE_DEFINE("sharded checkpoints from live TP × EP layers load into other live layouts", P, live_checkpoints) {
  using H = typename P::Harness;
  const std::filesystem::path dir =
      std::filesystem::temp_directory_path() / ("moelora-parallel-" + std::to_string(std::random_device{}()));
  GlobalProblem g(4, 64, 64, 8, 8, DType::bf16);
  INFO("seed " << g.rng.seed);
  const auto save = [&](auto mode, int tp, int ep, std::int64_t blocks) {
    using Mode = decltype(mode);
    const Layout<Mode> l{tp, ep, blocks};
    P::run(tp, ep, [&](auto& env) {
      const EpPart part(g, ep, env.ep_rank);
      auto layer = rank_layer(env, l, g, env.h.make_base(cut_factor(g.w, part.e0, part.experts, l.w_axis(), tp, env.tp_rank, blocks)));
      layer.add_adapter("ad", g.config(), env.h.stream());
      const AdapterView v = layer.adapter("ad");
      env.h.write(v.a, cut_factor(g.a, part.e0, part.experts, l.a_axis(), tp, env.tp_rank));
      env.h.write(v.b, cut_factor(g.b, part.e0, part.experts, l.b_axis(), tp, env.tp_rank, blocks));
      io::save_sharded(layer, dir, "experts.", env.h.stream());
    });
    io::write_sharded_index(dir);
  };
  const auto load_and_check = [&](auto mode, int tp, int ep, std::int64_t blocks) {
    using Mode = decltype(mode);
    const Layout<Mode> l{tp, ep, blocks};
    std::vector<HostTensor> as(static_cast<std::size_t>(tp * ep)), bs(as.size());
    P::run(tp, ep, [&](auto& env) {
      const EpPart part(g, ep, env.ep_rank);
      auto layer = rank_layer(env, l, g, env.h.make_base(cut_factor(g.w, part.e0, part.experts, l.w_axis(), tp, env.tp_rank, blocks)));
      layer.add_adapter("ad", g.config(), env.h.stream());
      io::load_sharded(layer, dir, "experts.", env.h.stream());
      as[static_cast<std::size_t>(env.index())] = env.h.download(layer.adapter("ad").a);
      bs[static_cast<std::size_t>(env.index())] = env.h.download(layer.adapter("ad").b);
    });
    for (int e = 0; e < ep; ++e)
      for (int t = 0; t < tp; ++t) {
        INFO("load tp " << tp << " ep " << ep << " rank " << t << "/" << e);
        const EpPart part(g, ep, e);
        CHECK(as[static_cast<std::size_t>(e * tp + t)].values == cut_factor(g.a, part.e0, part.experts, l.a_axis(), tp, t).values);
        CHECK(bs[static_cast<std::size_t>(e * tp + t)].values ==
              cut_factor(g.b, part.e0, part.experts, l.b_axis(), tp, t, blocks).values);
      }
  };
  const auto load_single_device = [&] {
    H h;
    typename H::Layer layer(h.make_base(g.w));
    layer.add_adapter("ad", g.config(), h.stream());
    io::load_sharded(layer, dir, "experts.", h.stream());
    CHECK(h.download(layer.adapter("ad").a).values == g.a.values);
    CHECK(h.download(layer.adapter("ad").b).values == g.b.values);
  };
  const int n = P::max_ranks();
  // A gated fc1 (B rows [gate; up] sharded block by block) and an fc2.
  save(policy::ColumnParallel{}, std::min(2, n), n >= 4 ? 2 : 1, 2);
  load_single_device();
  load_and_check(policy::ColumnParallel{}, std::min(4, n), 1, 2);
  std::filesystem::remove_all(dir);
  save(policy::RowParallel{}, std::min(2, n), n >= 4 ? 2 : 1, 1);
  load_single_device();
  load_and_check(policy::RowParallel{}, std::min(4, n), 1, 1);
  std::filesystem::remove_all(dir);
}

TEST_CASE_TEMPLATE_DEFINE("bad parallel input: a clear error before any collective, nothing changed", P, parallel_bad_input) {
  using H = typename P::Harness;
  using Base = typename H::Base;
  GlobalProblem g(4, 64, 64, 8, 8, DType::bf16);
  const int tp = std::min(4, P::max_ranks());
  const auto errors_of = [&](int ranks, auto&& body) {
    std::vector<std::string> messages(static_cast<std::size_t>(ranks));
    P::run(ranks, 1, [&](auto& env) { messages[static_cast<std::size_t>(env.tp_rank)] = error_of([&] { body(env); }); });
    return messages;
  };
  const auto all_contain = [](const std::vector<std::string>& messages, const std::string& needle) {
    for (const std::string& m : messages) CHECK_MESSAGE(m.find(needle) != std::string::npos, m);
  };
  const auto base_of = [&](auto& env, std::int64_t out, std::int64_t in) {
    return env.h.make_base(random_tensor(g.rng, g.dtype, {g.experts, out, in}));
  };
  if (tp >= 2) {
    // The group does not divide the global sizes (column: out; row: in), or is not the size stated.
    all_contain(errors_of(tp, [&](auto& env) {
                  GroupedLoRA<Base, policy::ColumnParallel> layer(base_of(env, 6, 8), env.tp, {.global_out = 6 * tp + 2},
                                                                  env.h.stream());
                }),
                "does not divide out = ");
    all_contain(errors_of(tp, [&](auto& env) {
                  GroupedLoRA<Base, policy::RowParallel> layer(base_of(env, 8, 6), env.tp, {.global_in = 6 * tp + 1},
                                                               env.h.stream());
                }),
                "does not divide in = ");
    all_contain(errors_of(tp, [&](auto& env) {
                  GroupedLoRA<Base, policy::RowParallel> layer(base_of(env, 8, 8), env.tp, {.tp_size = tp + 1}, env.h.stream());
                }),
                "tensor-parallel communicator has");
    all_contain(errors_of(tp, [&](auto& env) {
                  GroupedLoRA<Base, policy::ColumnParallel> layer(base_of(env, 6, 8), env.tp, {.out_blocks = 4}, env.h.stream());
                }),
                "does not split into out_blocks");
    // Ranks that build different layers (rank 1 another EP rank; another base size) all throw.
    all_contain(errors_of(tp, [&](auto& env) {
                  GroupedLoRA<Base, policy::ColumnParallel> layer(base_of(env, 8, 8), env.tp,
                                                                  {.ep_rank = env.tp_rank == 1 ? 1 : 0, .ep_size = 2},
                                                                  env.h.stream());
                }),
                "ep_rank is 0 on rank 0 but 1 on rank 1");
    all_contain(errors_of(tp, [&](auto& env) {
                  GroupedLoRA<Base, policy::RowParallel> layer(base_of(env, 8, env.tp_rank == 1 ? 16 : 8), env.tp, {},
                                                               env.h.stream());
                }),
                "differs between the ranks of the tensor-parallel group: in is");
    // An adapter whose settings differ between ranks is rejected everywhere and not added.
    std::vector<int> added(static_cast<std::size_t>(tp), -1);
    all_contain(errors_of(tp, [&](auto& env) {
                  GroupedLoRA<Base, policy::ColumnParallel> layer(base_of(env, 8, 8), env.tp, {}, env.h.stream());
                  AdapterConfig c = g.config();
                  if (env.tp_rank == 1) c.rank = 16;
                  const std::string message = error_of([&] { layer.add_adapter("ad", c, env.h.stream()); });
                  added[static_cast<std::size_t>(env.tp_rank)] = layer.has_adapter("ad") ? 1 : 0;
                  detail::raise(ErrorCode::invalid_argument, message);
                }),
                "adapter \"ad\" differs between the ranks of the tensor-parallel group: rank is 8 on rank 0 but 16 on rank 1");
    for (const int a : added) CHECK(a == 0);
  }
  // A layout that does not fit the base, checked on the host before anything else.
  all_contain(errors_of(1, [&](auto& env) {
                GroupedLoRA<Base, policy::ColumnParallel> layer(base_of(env, 8, 8), env.tp, {.global_out = 24},
                                                                env.h.stream());
              }),
              "is not out = 24");
  all_contain(errors_of(1, [&](auto& env) {
                GroupedLoRA<Base, policy::RowParallel> layer(base_of(env, 8, 8), env.tp, {.out_blocks = 2}, env.h.stream());
              }),
              "out_blocks = 2 applies to column-parallel layers only");
  all_contain(errors_of(1, [&](auto& env) {
                GroupedLoRA<Base, policy::ColumnParallel> layer(base_of(env, 8, 8), env.tp, {.ep_rank = 2, .ep_size = 2},
                                                                env.h.stream());
              }),
              "expert-parallel rank 2 of 2 is not valid");
}

#define MOELORA_PARALLEL_CASES(P)                  \
  TEST_CASE_TEMPLATE_INVOKE(column_layouts, P);    \
  TEST_CASE_TEMPLATE_INVOKE(row_layouts, P);       \
  TEST_CASE_TEMPLATE_INVOKE(adamw_replicas, P);    \
  TEST_CASE_TEMPLATE_INVOKE(svd_init_tp, P);       \
  TEST_CASE_TEMPLATE_INVOKE(live_checkpoints, P);  \
  TEST_CASE_TEMPLATE_INVOKE(parallel_bad_input, P)
