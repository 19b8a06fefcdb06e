// The CUDA bases' GEMMs and the sync-free layer step: the sm90 grouped GEMM (both tiles, both
// directions, bf16 and fp16, β = 0 on poisoned and β = 1 on known outputs, empty experts, T = 0,
// one expert with every row, counts that are no multiple of a tile; with and without a low-rank
// addend in its K loop) against an fp64 reference; every strategy with an addend; the
// cuBLAS fallback where the sm90 path does not apply; GroupedLinear and QuantizedGroupedLinear with
// device counts; and the whole layer step (forward, backward with fresh gradients, AdamW) captured
// in one CUDA graph in global capture mode (any host sync or allocation fails the capture) and
// replayed with new data and new counts, bitwise equal to eager execution. Linked into
// moelora_gpu_tests (main in test_gpu.cu).
#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "support/cuda_harness.cuh"

using namespace moelora;
using namespace moelora::testing;

namespace {

/// Whether the sm90 grouped GEMM serves bf16 weights of 64 × 64 here (kernels linked, sm_90 device).
bool sm90_here() { return sm90_grouped_unavailable(64, 64, DType::bf16) == nullptr; }

/// out_t (+)= op(W_e) in_t over rows [0, offsets.back()) in fp64: forward W_e x_t, else W_eᵀ dy_t.
std::vector<double> reference_gemm(GemmDirection direction, const HostTensor& w, const HostTensor& in,
                                   const std::vector<std::int64_t>& offsets, const HostTensor* c) {
  const std::int64_t out = w.shape[1], inf = w.shape[2];
  const bool fwd = direction == GemmDirection::forward;
  const std::int64_t k = fwd ? inf : out, m = fwd ? out : inf;
  const std::int64_t rows = offsets.back();
  std::vector<double> result(static_cast<std::size_t>(rows * m), 0.0);
  for (std::size_t e = 0; e + 1 < offsets.size(); ++e)
    for (std::int64_t t = offsets[e]; t < offsets[e + 1]; ++t)
      for (std::int64_t j = 0; j < m; ++j) {
        double acc = c ? double((*c)[static_cast<std::size_t>(t * m + j)]) : 0.0;
        for (std::int64_t i = 0; i < k; ++i) {
          const std::int64_t widx = fwd ? (static_cast<std::int64_t>(e) * out + j) * inf + i
                                         : (static_cast<std::int64_t>(e) * out + i) * inf + j;
          acc += double(w[static_cast<std::size_t>(widx)]) * in[static_cast<std::size_t>(t * k + i)];
        }
        result[static_cast<std::size_t>(t * m + j)] = acc;
      }
  return result;
}

/// Adds a LowRankAddend's product in fp64: out_t += F_e r_t, F = `[E, m, rank]` forward (B),
/// `[E, rank, m]` backward_input (A, so F_eᵀ r_t); `first` is the expert of `offsets[0]`'s rows.
void add_reference_addend(GemmDirection direction, const HostTensor& factors, const HostTensor& rows,
                          const std::vector<std::int64_t>& offsets, std::vector<double>& out) {
  const bool fwd = direction == GemmDirection::forward;
  const std::int64_t rank = rows.shape[1], m = fwd ? factors.shape[1] : factors.shape[2];
  for (std::size_t e = 0; e + 1 < offsets.size(); ++e)
    for (std::int64_t t = offsets[e]; t < offsets[e + 1]; ++t)
      for (std::int64_t j = 0; j < m; ++j)
        for (std::int64_t q = 0; q < rank; ++q) {
          const std::int64_t fidx = fwd ? (static_cast<std::int64_t>(e) * m + j) * rank + q
                                        : (static_cast<std::int64_t>(e) * rank + q) * m + j;
          out[static_cast<std::size_t>(t * m + j)] +=
              double(factors[static_cast<std::size_t>(fidx)]) * rows[static_cast<std::size_t>(t * rank + q)];
        }
}

/// Runs a base's forward and backward_input from poisoned outputs and checks both against fp64 with
/// the weights `w` it computes with.
template <class Base>
void check_base(CudaHarness& h, Base& base, const ExpertSegments& seg, const HostTensor& w, const HostTensor& x,
                const HostTensor& dy, const std::vector<std::int64_t>& counts) {
  const std::int64_t rows = x.shape[0], in = x.shape[1], out = dy.shape[1];
  const auto x_dev = h.upload(x), dy_dev = h.upload(dy);
  auto y = h.poisoned(w.dtype, {rows, out});
  auto dx = h.poisoned(w.dtype, {rows, in});
  base.forward(x_dev.ref(), seg, y.ref(), h.stream());
  base.backward_input(dy_dev.ref(), seg, dx.ref(), h.stream());
  const auto offsets = offsets_of(counts);
  CHECK(relative_error(h.download(y.ref()).values, reference_gemm(GemmDirection::forward, w, x, offsets, nullptr)) <
        tolerance(w.dtype));
  CHECK(relative_error(h.download(dx.ref()).values,
                       reference_gemm(GemmDirection::backward_input, w, dy, offsets, nullptr)) < tolerance(w.dtype));
}

/// Counts uploaded to the device as int32, kept alive with their view.
struct DeviceCounts {
  Buffer<CudaBackend> buffer;
  ExpertCounts view;
  DeviceCounts(const std::vector<std::int64_t>& counts, cudaStream_t stream)
      : buffer(std::max<std::size_t>(counts.size() * 4, 4)) {
    const std::vector<std::int32_t> narrow(counts.begin(), counts.end());
    CudaBackend::copy_from_host(buffer.data(), narrow.data(), narrow.size() * 4, stream);
    view = expert_counts(buffer.as<const std::int32_t>(), static_cast<std::int64_t>(counts.size()), Memory::device);
  }
};

AdapterConfig adapter(std::int64_t rank, double scale, std::optional<std::string> dtype = {}) {
  AdapterConfig c;
  c.rank = rank;
  c.scale = scale;
  c.lora_dtype = std::move(dtype);
  return c;
}

/// A fixed set of device buffers of one layer step (so a captured graph can be replayed on new data).
struct StepBuffers {
  BackendTensor<CudaBackend> x, y, dy, dx;
  Buffer<CudaBackend> counts;  // int32 [E]
  std::int64_t experts;
};

}  // namespace

#if defined(MOELORA_HAVE_CUTLASS)
TEST_CASE("sm90 grouped GEMM: both tiles and directions against fp64, β = 0 and 1, ragged and empty experts, "
          "with and without a low-rank addend in its K loop") {
  if (!sm90_here()) return;  // kernels built for sm_90a only
  CudaHarness h;
  struct Shape3 {
    std::int64_t experts, in, out;
  };
  // in = 136 and out = 200: the base's last K tile is partial (zero-filled), also before an addend's
  // tiles; the addend's last K tile issues only the MMA k-blocks that hold its columns: rank 8 one,
  // rank 64 all four of the cooperative kernel's 64-column tile and four of the pingpong's 128, rank 72
  // two tiles of the cooperative kernel (the second with one k-block); rank 0: no addend.
  for (const DType dtype : {DType::bf16, DType::fp16})
    for (const Shape3 s : {Shape3{7, 136, 200}, Shape3{3, 64, 392}})
      for (const std::int64_t rank : {0, 8, 64, 72})
        for (const Spread spread : {Spread::uniform, Spread::skewed, Spread::one_expert})
          for (const std::int64_t rows : {std::int64_t{0}, std::int64_t{1}, std::int64_t{333}}) {
            Rng rng;
            INFO("seed " << rng.seed << " dtype " << dtype_name(dtype) << " E " << s.experts << " rank " << rank
                         << " rows " << rows);
            const HostTensor w = random_tensor(rng, dtype, {s.experts, s.out, s.in}, 0.1f);
            const std::vector<std::int64_t> counts = make_counts(rng, s.experts, rows, spread);
            const std::vector<std::int64_t> offsets = offsets_of(counts);
            CudaBackend::Workspace workspace;
            const DeviceCounts device_counts(counts, h.stream());
            const ExpertSegments& segments = workspace.prepare_segments(device_counts.view, rows, h.stream());
            const auto w_dev = h.upload(w);
            sm90::Sm90GroupedGemm gemm({dtype, s.experts, s.out, s.in});
            for (const GemmDirection direction : {GemmDirection::forward, GemmDirection::backward_input}) {
              const bool fwd = direction == GemmDirection::forward;
              const std::int64_t k = fwd ? s.in : s.out, m = fwd ? s.out : s.in;
              const HostTensor in = random_tensor(rng, dtype, {rows, k});
              const HostTensor c = random_tensor(rng, dtype, {rows, m});
              const HostTensor low_rows = random_tensor(rng, dtype, {rows, rank});
              const HostTensor factors =
                  random_tensor(rng, dtype, fwd ? Shape{s.experts, m, rank} : Shape{s.experts, rank, m}, 0.2f);
              const auto in_dev = h.upload(in), rows_dev = h.upload(low_rows), factors_dev = h.upload(factors);
              const LowRankAddend addend{rank ? rows_dev.ref().data : nullptr, rank ? factors_dev.ref().data : nullptr,
                                         rank};
              for (const sm90::GemmTile tile : {sm90::GemmTile::cooperative, sm90::GemmTile::pingpong})
                for (const WriteMode mode : {WriteMode::overwrite, WriteMode::accumulate}) {
                  auto out = mode == WriteMode::overwrite ? h.poisoned(dtype, {rows, m}) : h.upload(c);
                  gemm.run({direction, w_dev.ref().data, segments.offsets, 0, s.experts, in_dev.ref().data,
                            out.ref().data, mode, addend},
                           tile, h.stream());
                  std::vector<double> ref =
                      reference_gemm(direction, w, in, offsets, mode == WriteMode::accumulate ? &c : nullptr);
                  add_reference_addend(direction, factors, low_rows, offsets, ref);
                  CHECK(relative_error(h.download(out.ref()).values, ref) < tolerance(dtype));
                }
            }
          }
}

TEST_CASE("sm90 grouped GEMM: a range of experts (a dequantized chunk) leaves the other rows alone") {
  if (!sm90_here()) return;
  CudaHarness h;
  Rng rng;
  INFO("seed " << rng.seed);
  const std::int64_t experts = 6, in = 64, out = 48, rows = 500, first = 2, chunk = 3;
  const HostTensor w = random_tensor(rng, DType::bf16, {experts, out, in}, 0.1f);
  const std::vector<std::int64_t> counts = make_counts(rng, experts, rows, Spread::uniform);
  const std::vector<std::int64_t> offsets = offsets_of(counts);
  const DeviceCounts device_counts(counts, h.stream());
  CudaBackend::Workspace workspace;
  const ExpertSegments& segments = workspace.prepare_segments(device_counts.view, rows, h.stream());
  // The chunk's weights alone, as the quantized base's dequantization scratch holds them; 4 groups
  // for a chunk of 3 (the last is empty).
  HostTensor w_chunk(DType::bf16, {chunk, out, in});
  std::copy_n(w.values.begin() + first * out * in, chunk * out * in, w_chunk.values.begin());
  const auto w_dev = h.upload(w_chunk);
  const HostTensor x = random_tensor(rng, DType::bf16, {rows, in});
  const auto x_dev = h.upload(x);
  auto y = h.poisoned(DType::bf16, {rows, out});
  sm90::Sm90GroupedGemm gemm({DType::bf16, chunk + 1, out, in});
  gemm.run({GemmDirection::forward, w_dev.ref().data, segments.offsets, first, chunk, x_dev.ref().data, y.ref().data,
            WriteMode::overwrite, {}},
           sm90::GemmTile::pingpong, h.stream());
  const HostTensor y_host = h.download(y.ref());
  const std::vector<double> ref = reference_gemm(GemmDirection::forward, w, x, offsets, nullptr);
  for (std::int64_t t = 0; t < rows; ++t) {
    const bool in_chunk = t >= offsets[first] && t < offsets[first + chunk];
    for (std::int64_t j = 0; j < out; ++j) {
      const float v = y_host[static_cast<std::size_t>(t * out + j)];
      if (!in_chunk) REQUIRE(std::isnan(v));
      else REQUIRE(std::abs(v - ref[static_cast<std::size_t>(t * out + j)]) <= 0.02 * (1.0 + std::abs(ref[static_cast<std::size_t>(t * out + j)])));
    }
  }
}
#endif

TEST_CASE("GroupedLinear<CudaBackend>: strategies, device counts, and the cuBLAS fallback") {
  CudaHarness h;
  Rng rng;
  INFO("seed " << rng.seed);
  SUBCASE("automatic picks sm90_grouped where it applies; asking for it elsewhere says why") {
    const GroupedLinear<CudaBackend> fast(h.handle, 4, 64, 32, DType::bf16);
    CHECK(fast.strategy() == (sm90_here() ? GemmStrategy::sm90_grouped : GemmStrategy::grouped));
    const GroupedLinear<CudaBackend> odd(h.handle, 4, 36, 32, DType::bf16);
    CHECK(odd.strategy() == GemmStrategy::grouped);
    if (sm90_here()) {
      CHECK_THROWS_WITH_AS(GroupedLinear<CudaBackend>(h.handle, 4, 36, 32, DType::bf16, GemmStrategy::sm90_grouped),
                           doctest::Contains("in and out to be multiples of 8"), Error);
      CHECK_THROWS_WITH_AS(GroupedLinear<CudaBackend>(h.handle, 4, 64, 32, DType::fp32, GemmStrategy::sm90_grouped),
                           doctest::Contains("not fp32"), Error);
    }
  }
  SUBCASE("every strategy and shape, host and device counts, against fp64") {
    struct Setup {
      std::int64_t in, out;
      GemmStrategy strategy;
    };
    std::vector<Setup> setups{{64, 48, GemmStrategy::per_expert}, {64, 48, GemmStrategy::grouped},
                              {36, 20, GemmStrategy::automatic}};
    if (sm90_here()) setups.push_back({64, 48, GemmStrategy::sm90_grouped});
    for (const Setup& s : setups)
      for (const bool device : {false, true}) {
        const std::int64_t experts = 5, rows = 301;
        const HostTensor w = random_tensor(rng, DType::bf16, {experts, s.out, s.in}, 0.1f);
        GroupedLinear<CudaBackend> base(h.handle, experts, s.in, s.out, DType::bf16, s.strategy);
        base.set_weight({w.encode().data(), DType::bf16, w.shape}, h.stream());
        const std::vector<std::int64_t> counts = make_counts(rng, experts, rows, Spread::skewed);
        const DeviceCounts device_counts(counts, h.stream());
        CudaBackend::Workspace workspace;
        const ExpertSegments& seg = workspace.prepare_segments(
            device ? device_counts.view : expert_counts(counts.data(), experts), rows, h.stream());
        check_base(h, base, seg, w, random_tensor(rng, DType::bf16, {rows, s.in}),
                   random_tensor(rng, DType::bf16, {rows, s.out}), counts);
        CHECK(base.last_strategy() == base.strategy());
      }
  }
  SUBCASE("a low-rank addend in every strategy, host and device counts, against fp64") {
    std::vector<GemmStrategy> strategies{GemmStrategy::per_expert, GemmStrategy::grouped};
    if (sm90_here()) strategies.push_back(GemmStrategy::sm90_grouped);
    const std::int64_t experts = 5, in = 64, out = 48, rows = 301, rank = 16;
    for (const GemmStrategy strategy : strategies)
      for (const bool device : {false, true}) {
        INFO("strategy " << gemm_strategy_name(strategy) << " device counts " << device);
        const HostTensor w = random_tensor(rng, DType::bf16, {experts, out, in}, 0.1f);
        GroupedLinear<CudaBackend> base(h.handle, experts, in, out, DType::bf16, strategy);
        base.set_weight({w.encode().data(), DType::bf16, w.shape}, h.stream());
        CHECK(base.fuses_low_rank(rank, DType::bf16) == (strategy == GemmStrategy::sm90_grouped));
        CHECK_FALSE(base.fuses_low_rank(12, DType::bf16));
        CHECK_FALSE(base.fuses_low_rank(rank, DType::fp32));
        const std::vector<std::int64_t> counts = make_counts(rng, experts, rows, Spread::skewed);
        const std::vector<std::int64_t> offsets = offsets_of(counts);
        const DeviceCounts device_counts(counts, h.stream());
        CudaBackend::Workspace workspace;
        const ExpertSegments& seg = workspace.prepare_segments(
            device ? device_counts.view : expert_counts(counts.data(), experts), rows, h.stream());
        const HostTensor x = random_tensor(rng, DType::bf16, {rows, in}), dy = random_tensor(rng, DType::bf16, {rows, out});
        const HostTensor h_rows = random_tensor(rng, DType::bf16, {rows, rank}), u_rows = random_tensor(rng, DType::bf16, {rows, rank});
        const HostTensor b = random_tensor(rng, DType::bf16, {experts, out, rank}, 0.2f);
        const HostTensor a = random_tensor(rng, DType::bf16, {experts, rank, in}, 0.2f);
        const auto x_dev = h.upload(x), dy_dev = h.upload(dy), h_dev = h.upload(h_rows), u_dev = h.upload(u_rows);
        const auto a_dev = h.upload(a), b_dev = h.upload(b);
        auto y = h.poisoned(DType::bf16, {rows, out});
        auto dx = h.poisoned(DType::bf16, {rows, in});
        base.forward(x_dev.ref(), seg, y.ref(), h.stream(), WriteMode::overwrite,
                     {h_dev.ref().data, b_dev.ref().data, rank});
        base.backward_input(dy_dev.ref(), seg, dx.ref(), h.stream(), WriteMode::overwrite,
                            {u_dev.ref().data, a_dev.ref().data, rank});
        std::vector<double> y_ref = reference_gemm(GemmDirection::forward, w, x, offsets, nullptr);
        add_reference_addend(GemmDirection::forward, b, h_rows, offsets, y_ref);
        std::vector<double> dx_ref = reference_gemm(GemmDirection::backward_input, w, dy, offsets, nullptr);
        add_reference_addend(GemmDirection::backward_input, a, u_rows, offsets, dx_ref);
        CHECK(relative_error(h.download(y.ref()).values, y_ref) < tolerance(DType::bf16));
        CHECK(relative_error(h.download(dx.ref()).values, dx_ref) < tolerance(DType::bf16));
      }
  }
  SUBCASE("a misaligned output falls back to one cuBLAS GEMM per expert for that call") {
    const std::int64_t experts = 3, in = 64, out = 48, rows = 90;
    const HostTensor w = random_tensor(rng, DType::bf16, {experts, out, in}, 0.1f);
    GroupedLinear<CudaBackend> base(h.handle, experts, in, out, DType::bf16);
    base.set_weight({w.encode().data(), DType::bf16, w.shape}, h.stream());
    const std::vector<std::int64_t> counts = make_counts(rng, experts, rows, Spread::uniform);
    const DeviceCounts device_counts(counts, h.stream());
    CudaBackend::Workspace workspace;
    const ExpertSegments& seg = workspace.prepare_segments(device_counts.view, rows, h.stream());
    const HostTensor x = random_tensor(rng, DType::bf16, {rows, in});
    const auto x_dev = h.upload(x);
    auto y = h.poisoned(DType::bf16, {rows * out + 1});  // y starts one element (2 bytes) in
    TensorRef y_view{static_cast<std::byte*>(y.ref().data) + 2, DType::bf16, {rows, out}};
    base.forward(x_dev.ref(), seg, y_view, h.stream());
    CHECK(base.last_strategy() == GemmStrategy::per_expert);
    const HostTensor y_all = h.download(y.ref());
    const std::vector<float> y_host(y_all.values.begin() + 1, y_all.values.end());
    CHECK(relative_error(y_host, reference_gemm(GemmDirection::forward, w, x, offsets_of(counts), nullptr)) <
          tolerance(DType::bf16));
    auto y_aligned = h.poisoned(DType::bf16, {rows, out});
    base.forward(x_dev.ref(), seg, y_aligned.ref(), h.stream());
    CHECK(base.last_strategy() == base.strategy());
    // cuBLAS and the grouped GEMM may add the fp32 products in another order.
    CHECK(beyond_one_bf16_ulp(h.download(y_aligned.ref()).values, y_host) == 0);
  }
}

TEST_CASE("QuantizedGroupedLinear<CudaBackend> with device counts: resident and chunked dequantization") {
  CudaHarness h;
  Rng rng;
  INFO("seed " << rng.seed);
  const std::int64_t experts = 7, in = 128, out = 64, rows = 400;
  const HostTensor w = random_tensor(rng, DType::bf16, {experts, out, in}, 0.1f);
  for (const std::size_t budget : {std::size_t{256} << 20, 3 * static_cast<std::size_t>(out * in) * 2}) {
    auto base = h.make_quantized_base(w, quant::QuantSpec{});  // NVFP4
    base.set_dequant_budget(budget);
    base.reserve(rows);
    BackendTensor<CudaBackend> q{Buffer<CudaBackend>(w.size() * 2), DType::bf16, w.shape};
    base.dequantized_weight(q.ref(), h.stream());
    const HostTensor qw = h.download(q.ref());
    const std::vector<std::int64_t> counts = make_counts(rng, experts, rows, Spread::skewed);
    const DeviceCounts device_counts(counts, h.stream());
    CudaBackend::Workspace workspace;
    const ExpertSegments& seg = workspace.prepare_segments(device_counts.view, rows, h.stream());
    const HostTensor x = random_tensor(rng, DType::bf16, {rows, in});
    const HostTensor dy = random_tensor(rng, DType::bf16, {rows, out});
    for (int call = 0; call < 2; ++call) check_base(h, base, seg, qw, x, dy, counts);  // then from the resident weight
    // New weights replace a resident dequantized copy.
    const HostTensor w2 = random_tensor(rng, DType::bf16, w.shape, 0.1f);
    base.set_weight({w2.encode().data(), DType::bf16, w.shape}, h.stream());
    base.dequantized_weight(q.ref(), h.stream());
    check_base(h, base, seg, h.download(q.ref()), x, dy, counts);
  }
}

namespace {

/// The layer step under test: forward, backward with fresh gradients (WriteMode::overwrite), AdamW.
template <class Layer>
void layer_step(Layer& layer, AdamW<Layer>& optimizer, StepBuffers& b, bool padded, cudaStream_t stream) {
  ExpertCounts counts = expert_counts(b.counts.as<const std::int32_t>(), b.experts, Memory::device);
  if (padded) counts = counts.with_padding();
  layer.forward(b.x.ref(), counts, b.y.ref(), stream);
  layer.backward(b.x.ref(), counts, b.dy.ref(), b.dx.ref(), stream, WriteMode::overwrite);
  optimizer.step(layer, stream);
}

/// Bytes of a device tensor.
std::vector<std::byte> bytes_of(ConstTensorRef t, cudaStream_t stream) {
  std::vector<std::byte> out(t.bytes());
  CudaBackend::copy_to_host(out.data(), t.data, out.size(), stream);
  return out;
}

/// Two identical layers (same base, same adapters); one runs eagerly, the other is captured once in
/// a CUDA graph (global mode) and replayed; after every step the outputs, gradients and factors
/// must match bit for bit. `padded`: the graph is captured at `rows` rows and replayed with counts
/// summing to fewer; rows past the sum keep the NaN they were given.
template <class Layer, class MakeBase>
void check_graph_replay(CudaHarness& h, MakeBase&& make_base, std::int64_t experts, std::int64_t in, std::int64_t out,
                        std::int64_t rows, bool padded) {
  Rng rng;
  INFO("seed " << rng.seed << " padded " << padded);
  Layer eager(make_base()), graphed(make_base());
  for (Layer* layer : {&eager, &graphed}) {
    layer->add_adapter("a", adapter(16, 0.5), h.stream());
    layer->add_adapter("b", adapter(32, 1.0, "fp16"), h.stream());
    layer->reserve(rows);
  }
  for (const char* name : {"a", "b"}) {  // random B (kaiming_zeros starts it at zero): both adapters matter
    const AdapterView v = eager.adapter(name);
    const HostTensor bf = random_tensor(rng, v.b.dtype, v.b.shape, 0.1f);
    h.write(v.b, bf);
    h.write(graphed.adapter(name).b, bf);
  }
  AdamW<Layer> eager_opt({1e-3f, 0.9f, 0.999f, 1e-8f, 0.01f}), graphed_opt(eager_opt.config());
  const auto make_buffers = [&] {
    return StepBuffers{h.poisoned(DType::bf16, {rows, in}), h.poisoned(DType::bf16, {rows, out}),
                       h.poisoned(DType::bf16, {rows, out}), h.poisoned(DType::bf16, {rows, in}),
                       Buffer<CudaBackend>(static_cast<std::size_t>(experts) * 4), experts};
  };
  StepBuffers eb = make_buffers(), gb = make_buffers();
  // New data and counts in place (outside the graph): per expert at most 1024 rows and out ≤ 512,
  // so no kernel adds with atomics and the step is deterministic.
  const auto new_data = [&](std::int64_t routed, Spread spread) {
    HostTensor x = random_tensor(rng, DType::bf16, {rows, in});
    HostTensor dy = random_tensor(rng, DType::bf16, {rows, out}, 0.05f);
    for (std::int64_t i = routed * in; i < rows * in; ++i) x[static_cast<std::size_t>(i)] = 0.0f;
    for (std::int64_t i = routed * out; i < rows * out; ++i) dy[static_cast<std::size_t>(i)] = 0.0f;
    const std::vector<std::int64_t> counts = make_counts(rng, experts, routed, spread);
    const std::vector<std::int32_t> narrow(counts.begin(), counts.end());
    for (StepBuffers* b : {&eb, &gb}) {
      h.write(b->x.ref(), x), h.write(b->dy.ref(), dy);
      h.write(b->y.ref(), HostTensor(DType::bf16, {rows, out}, std::numeric_limits<float>::quiet_NaN()));
      h.write(b->dx.ref(), HostTensor(DType::bf16, {rows, in}, std::numeric_limits<float>::quiet_NaN()));
      CudaBackend::copy_from_host(b->counts.data(), narrow.data(), narrow.size() * 4, h.stream());
    }
  };
  const auto compare = [&](std::int64_t routed) {
    CHECK(bytes_of(eb.y.ref(), h.stream()) == bytes_of(gb.y.ref(), h.stream()));
    CHECK(bytes_of(eb.dx.ref(), h.stream()) == bytes_of(gb.dx.ref(), h.stream()));
    for (const char* name : {"a", "b"}) {
      const AdapterView e = eager.adapter(name), g = graphed.adapter(name);
      for (auto [et, gt] : {std::pair{e.a, g.a}, std::pair{e.b, g.b}, std::pair{e.grad_a, g.grad_a}, std::pair{e.grad_b, g.grad_b}})
        CHECK(bytes_of(et, h.stream()) == bytes_of(gt, h.stream()));
    }
    const HostTensor y = h.download(gb.y.ref());
    CHECK(std::all_of(y.values.begin(), y.values.begin() + routed * out, [](float v) { return std::isfinite(v); }));
    CHECK(std::all_of(y.values.begin() + routed * out, y.values.end(), [](float v) { return std::isnan(v); }));
  };

  // One eager step each creates the optimizer state; then the graph is captured.
  const std::int64_t first_routed = padded ? rows - 37 : rows;
  new_data(first_routed, Spread::uniform);
  layer_step(eager, eager_opt, eb, padded, h.stream());
  layer_step(graphed, graphed_opt, gb, padded, h.stream());
  compare(first_routed);
  CHECK_NOTHROW(graphed.workspace().check_counts(h.stream()));

  cudaGraph_t graph = nullptr;
  cudaGraphExec_t exec = nullptr;
  MOELORA_CUDA_CHECK(cudaStreamBeginCapture(h.stream(), cudaStreamCaptureModeGlobal));
  layer_step(graphed, graphed_opt, gb, padded, h.stream());
  MOELORA_CUDA_CHECK(cudaStreamEndCapture(h.stream(), &graph));
  MOELORA_CUDA_CHECK(cudaGraphInstantiate(&exec, graph, 0));
  MOELORA_CUDA_CHECK(cudaGraphDestroy(graph));

  int steps = 1;
  for (const Spread spread : {Spread::skewed, Spread::one_expert, Spread::uniform, Spread::skewed}) {
    const std::int64_t routed = padded ? rows - rng.integer(1, rows / 2) : rows;
    new_data(routed, spread);
    layer_step(eager, eager_opt, eb, padded, h.stream());
    MOELORA_CUDA_CHECK(cudaGraphLaunch(exec, h.stream()));
    ++steps;
    compare(routed);
  }
  MOELORA_CUDA_CHECK(cudaGraphExecDestroy(exec));
  CHECK_NOTHROW(graphed.workspace().check_counts(h.stream()));
  CHECK(graphed_opt.steps("a", h.stream()) == steps);
  CHECK(eager_opt.steps("a", h.stream()) == steps);
}

}  // namespace

TEST_CASE("the layer step (forward, backward, AdamW) with device counts replays from one CUDA graph bitwise") {
  CudaHarness h;
  const std::int64_t experts = 8, in = 256, out = 192, rows = 1000;
  SUBCASE("GroupedLinear base") {
    for (const bool padded : {false, true})
      check_graph_replay<GroupedLoRA<GroupedLinear<CudaBackend>>>(
          h,
          [&] {
            Rng rng(7);
            return h.make_base(random_tensor(rng, DType::bf16, {experts, out, in}, 0.1f));
          },
          experts, in, out, rows, padded);
  }
  SUBCASE("QuantizedGroupedLinear NVFP4 base, resident and chunked dequantization") {
    for (const std::size_t budget : {std::size_t{256} << 20, 3 * static_cast<std::size_t>(out * in) * 2})
      for (const bool padded : {false, true})
        check_graph_replay<GroupedLoRA<QuantizedGroupedLinear<CudaBackend>>>(
            h,
            [&] {
              Rng rng(11);
              auto base = h.make_quantized_base(random_tensor(rng, DType::bf16, {experts, out, in}, 0.1f),
                                                quant::QuantSpec{});
              base.set_dequant_budget(budget);
              return base;
            },
            experts, in, out, rows, padded);
  }
}

TEST_CASE("the LoRA expand riding on the sm90 GEMM: the layer matches the same layer on cuBLAS, which adds it apart") {
  if (!sm90_here()) return;
  CudaHarness h;
  const std::int64_t experts = 6, in = 136, out = 200;
  for (const Spread spread : {Spread::uniform, Spread::skewed, Spread::one_expert})
    for (const std::int64_t rows : {std::int64_t{0}, std::int64_t{1}, std::int64_t{517}}) {
      Rng rng;
      INFO("seed " << rng.seed << " rows " << rows);
      const HostTensor w = random_tensor(rng, DType::bf16, {experts, out, in}, 0.1f);
      // Fused: the sm90 base takes adapter "a" (bf16, rank 16, scale 2); "b" (rank 12: no multiple
      // of 8) and "c" (fp16 factors) add apart in both layers.
      std::vector<HostTensor> results[2];
      for (const int fused : {0, 1}) {
        Rng same(rng.seed);  // both layers see the same factors and data
        GroupedLinear<CudaBackend> base(h.handle, experts, in, out, DType::bf16,
                                        fused ? GemmStrategy::sm90_grouped : GemmStrategy::per_expert);
        base.set_weight({w.encode().data(), DType::bf16, w.shape}, h.stream());
        GroupedLoRA<GroupedLinear<CudaBackend>> layer(std::move(base));
        layer.add_adapter("a", adapter(16, 2.0), h.stream());
        layer.add_adapter("b", adapter(12, 0.5), h.stream());
        layer.add_adapter("c", adapter(16, 1.0, "fp16"), h.stream());
        for (const char* name : {"a", "b", "c"}) {
          const AdapterView v = layer.adapter(name);
          h.write(v.b, random_tensor(same, v.b.dtype, v.b.shape, 0.1f));
        }
        const std::vector<std::int64_t> counts = make_counts(same, experts, rows, spread);
        const DeviceCounts device_counts(counts, h.stream());
        const HostTensor x = random_tensor(same, DType::bf16, {rows, in});
        const HostTensor dy = random_tensor(same, DType::bf16, {rows, out}, 0.05f);
        const auto x_dev = h.upload(x), dy_dev = h.upload(dy);
        auto y = h.poisoned(DType::bf16, {rows, out});
        auto dx = h.poisoned(DType::bf16, {rows, in});
        layer.forward(x_dev.ref(), device_counts.view, y.ref(), h.stream());
        layer.backward(x_dev.ref(), device_counts.view, dy_dev.ref(), dx.ref(), h.stream(), WriteMode::overwrite);
        results[fused].push_back(h.download(y.ref()));
        results[fused].push_back(h.download(dx.ref()));
        for (const char* name : {"a", "b", "c"}) {
          const AdapterView v = layer.adapter(name);
          results[fused].push_back(h.download(v.grad_a));
          results[fused].push_back(h.download(v.grad_b));
        }
      }
      // The fused layer rounds h · scale (not h) and its GEMM sums the product with the base in
      // one accumulator: within bf16 rounding of the unfused layer.
      for (std::size_t i = 0; i < results[0].size(); ++i) {
        INFO("result " << i << " (y, dx, then dA, dB of a, b, c)");
        CHECK(relative_error(results[1][i].values, results[0][i].values) < 2 * tolerance(DType::bf16));
      }
    }
}
