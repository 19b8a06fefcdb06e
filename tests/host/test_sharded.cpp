// Sharded checkpoints: ranks of a TP × EP grid (simulated as separate host layers holding their
// slices) save per-global-expert shards; any other layout loads them back bit for bit, a file-level
// reshard gives the same result, and a checkpoint that does not fit is rejected with every problem
// listed while the layer stays unchanged.
#include <doctest/doctest.h>

#include <filesystem>
#include <random>

#include "moelora/io/sharded.hpp"
#include "support/harness.hpp"

using namespace moelora;
using namespace moelora::testing;

namespace {

constexpr std::int64_t kE = 4, kIn = 48, kOut = 32, kRows = 60;
const char* const kPrefix = "model.layers.0.mlp.experts.";

struct TempDir {
  std::filesystem::path path =
      std::filesystem::temp_directory_path() / ("moelora-shard-" + std::to_string(std::random_device{}()));
  ~TempDir() { std::filesystem::remove_all(path); }
};

/// Three adapters, one per factor dtype.
struct AdapterSpec {
  const char* name;
  std::int64_t rank;
  const char* dtype;
};
constexpr AdapterSpec kAdapters[] = {{"style", 8, "bf16"}, {"tone", 4, "fp16"}, {"domain", 4, "fp32"}};

HostHarness::Layer make_layer(HostHarness& h, const HostTensor& w, std::uint64_t seed) {
  HostHarness::Layer layer(h.make_base(w));
  for (const AdapterSpec& spec : kAdapters) {
    AdapterConfig c;
    c.rank = spec.rank;
    c.lora_dtype = spec.dtype;
    c.seed = seed++;
    layer.add_adapter(spec.name, c, {});
  }
  return layer;
}

/// Block `[e0, e0+ne) × [r0, r0+nr) × [c0, c0+nc)` of a `[E, R, C]` tensor.
HostTensor block(const HostTensor& t, std::int64_t e0, std::int64_t ne, std::int64_t r0, std::int64_t nr,
                 std::int64_t c0, std::int64_t nc) {
  HostTensor out(t.dtype, {ne, nr, nc});
  for (std::int64_t e = 0; e < ne; ++e)
    for (std::int64_t r = 0; r < nr; ++r)
      for (std::int64_t c = 0; c < nc; ++c)
        out[static_cast<std::size_t>((e * nr + r) * nc + c)] =
            t[static_cast<std::size_t>(((e0 + e) * t.shape[1] + r0 + r) * t.shape[2] + c0 + c)];
  return out;
}

/// What rank `l` holds of the full layer, written out from the table in parallel_mode.hpp.
struct Cut {
  std::int64_t e0, ne, out0, nout, in0, nin;
};
Cut cut_of(const io::ShardLayout& l) {
  const bool column = l.mode == io::TpMode::column;
  const std::int64_t ne = kE / l.ep, nout = column ? kOut / l.tp : kOut, nin = column ? kIn : kIn / l.tp;
  return {l.ep_rank * ne, ne, column ? l.tp_rank * nout : 0, nout, column ? 0 : l.tp_rank * nin, nin};
}
HostTensor a_slice(const HostTensor& a, const Cut& c) { return block(a, c.e0, c.ne, 0, a.shape[1], c.in0, c.nin); }
HostTensor b_slice(const HostTensor& b, const Cut& c) { return block(b, c.e0, c.ne, c.out0, c.nout, 0, b.shape[2]); }

std::vector<io::ShardLayout> ranks_of(const io::ShardGrid& g) {
  std::vector<io::ShardLayout> ranks;
  for (std::int64_t e = 0; e < g.ep; ++e)
    for (std::int64_t t = 0; t < g.tp; ++t) ranks.push_back({g.tp, t, g.ep, e, g.mode});
  return ranks;
}

/// The full model: random non-zero A and B for every adapter, non-default settings.
struct Model {
  HostHarness h;
  Rng rng;
  HostTensor w = random_tensor(rng, DType::bf16, {kE, kOut, kIn}, 0.1f);
  HostTensor x = random_tensor(rng, DType::bf16, {kRows, kIn});
  std::vector<std::int64_t> counts = make_counts(rng, kE, kRows, Spread::uniform);
  HostHarness::Layer full = make_layer(h, w, 1);

  Model() {
    for (const AdapterSpec& spec : kAdapters) {
      const AdapterView v = full.adapter(spec.name);
      h.write(v.a, random_tensor(rng, v.a.dtype, v.a.shape, 0.2f));
      h.write(v.b, random_tensor(rng, v.b.dtype, v.b.shape, 0.3f));
    }
    full.set_scale("style", 0.75);
    full.set_trainable("domain", false, {});
  }

  HostTensor factor(const char* name, char which) {
    const AdapterView v = full.adapter(name);
    return h.download(which == 'a' ? v.a : v.b);
  }

  /// Rank `l`'s layer: its base slice and adapters with other (seeded) factors.
  HostHarness::Layer rank_layer(const io::ShardLayout& l, std::uint64_t seed) {
    const Cut c = cut_of(l);
    return make_layer(h, block(w, c.e0, c.ne, c.out0, c.nout, c.in0, c.nin), seed);
  }

  /// Rank `l`'s layer holding its slices of the full model's factors and its settings.
  HostHarness::Layer sliced(const io::ShardLayout& l) {
    HostHarness::Layer layer = rank_layer(l, 50);
    const Cut c = cut_of(l);
    for (const AdapterSpec& spec : kAdapters) {
      const AdapterView v = layer.adapter(spec.name);
      h.write(v.a, a_slice(factor(spec.name, 'a'), c));
      h.write(v.b, b_slice(factor(spec.name, 'b'), c));
      const AdapterView src = full.adapter(spec.name);
      io::restore_settings(layer, spec.name, {src.config.scale, src.config.enabled, src.config.trainable}, {});
    }
    return layer;
  }

  /// y `[T, out]` of a layer that holds rank `l`'s slice, on rank `l`'s rows and input columns.
  std::vector<float> rank_forward(HostHarness::Layer& layer, const io::ShardLayout& l) {
    const Cut c = cut_of(l);
    const std::vector<std::int64_t> offsets = offsets_of(counts);
    const std::int64_t row0 = offsets[static_cast<std::size_t>(c.e0)], rows = offsets[static_cast<std::size_t>(c.e0 + c.ne)] - row0;
    HostTensor xs(DType::bf16, {rows, c.nin});
    for (std::int64_t t = 0; t < rows; ++t)
      for (std::int64_t k = 0; k < c.nin; ++k)
        xs[static_cast<std::size_t>(t * c.nin + k)] = x[static_cast<std::size_t>((row0 + t) * kIn + c.in0 + k)];
    HostTensor y(DType::bf16, {rows, c.nout});
    const auto xb = xs.encode();
    auto yb = y.encode();
    layer.forward({xb.data(), DType::bf16, xs.shape}, expert_counts(counts.data() + c.e0, c.ne),
                  {yb.data(), DType::bf16, y.shape}, {});
    y.decode(yb);
    return y.values;
  }

  /// The full output assembled from every rank of `g` the way the base's reduction would: column
  /// ranks concatenate their output columns, row ranks' partial outputs are summed (in fp64).
  std::vector<float> assembled_forward(std::vector<HostHarness::Layer>& layers, const io::ShardGrid& g) {
    std::vector<double> y(static_cast<std::size_t>(kRows * kOut), 0.0);
    const std::vector<std::int64_t> offsets = offsets_of(counts);
    const std::vector<io::ShardLayout> ranks = ranks_of(g);
    for (std::size_t i = 0; i < ranks.size(); ++i) {
      const Cut c = cut_of(ranks[i]);
      const std::vector<float> part = rank_forward(layers[i], ranks[i]);
      const std::int64_t row0 = offsets[static_cast<std::size_t>(c.e0)];
      for (std::size_t j = 0; j < part.size(); ++j) {
        const auto t = static_cast<std::int64_t>(j) / c.nout, n = static_cast<std::int64_t>(j) % c.nout;
        y[static_cast<std::size_t>((row0 + t) * kOut + c.out0 + n)] += part[j];
      }
    }
    return {y.begin(), y.end()};
  }

  void save(const std::filesystem::path& dir, const io::ShardGrid& g) {
    for (const io::ShardLayout& l : ranks_of(g)) {
      HostHarness::Layer layer = sliced(l);
      io::save_sharded(layer, l, dir, kPrefix, {});
    }
    io::write_sharded_index(dir);
  }

  /// Loads every rank of `g` from `dir` and checks its factors and settings bit for bit.
  std::vector<HostHarness::Layer> load_and_check(const std::filesystem::path& dir, const io::ShardGrid& g) {
    std::vector<HostHarness::Layer> layers;
    for (const io::ShardLayout& l : ranks_of(g)) {
      INFO("rank tp " << l.tp_rank << "/" << l.tp << " ep " << l.ep_rank << "/" << l.ep);
      HostHarness::Layer layer = rank_layer(l, 99);
      io::load_sharded(layer, l, dir, kPrefix, {});
      const Cut c = cut_of(l);
      for (const AdapterSpec& spec : kAdapters) {
        const AdapterView v = layer.adapter(spec.name), src = full.adapter(spec.name);
        CHECK(h.download(v.a).values == a_slice(factor(spec.name, 'a'), c).values);
        CHECK(h.download(v.b).values == b_slice(factor(spec.name, 'b'), c).values);
        CHECK(v.config.scale == src.config.scale);
        CHECK(v.config.enabled == src.config.enabled);
        CHECK(v.config.trainable == src.config.trainable);
      }
      layers.push_back(std::move(layer));
    }
    return layers;
  }
};

}  // namespace

TEST_CASE("sharded: a 2x2 checkpoint loads bit for bit into 1x1, 4x1, 1x4, 2x2 and the other mode") {
  for (const io::TpMode mode : {io::TpMode::column, io::TpMode::row}) {
    CAPTURE(io::tp_mode_name(mode));
    Model m;
    INFO("seed " << m.rng.seed);
    const io::ShardLayout whole{1, 0, 1, 0, mode};
    const std::vector<float> expected = m.rank_forward(m.full, whole);
    HostHarness::Layer base_only(m.h.make_base(m.w));
    CHECK(m.rank_forward(base_only, whole) != expected);

    TempDir dir;
    m.save(dir.path, {2, 2, mode});
    const io::ShardedCheckpoint checkpoint(dir.path);
    CHECK(checkpoint.sizes().experts == kE);
    CHECK(checkpoint.sizes().out == kOut);
    // A replicated factor is written once (by tp_rank 0), a sharded one by every tp rank.
    const std::string replicated = mode == io::TpMode::column ? "lora_a_style.weight3" : "lora_b_style.weight3";
    const std::string sharded = mode == io::TpMode::column ? "lora_b_style.weight3" : "lora_a_style.weight3";
    CHECK(checkpoint.weight_map().at(kPrefix + replicated) == std::vector<std::string>{"adapter-tp0-ep1.safetensors"});
    CHECK(checkpoint.weight_map().at(kPrefix + sharded) ==
          std::vector<std::string>{"adapter-tp0-ep1.safetensors", "adapter-tp1-ep1.safetensors"});

    {
      std::vector<HostHarness::Layer> loaded = m.load_and_check(dir.path, {1, 1, mode});
      CHECK(m.rank_forward(loaded[0], whole) == expected);
    }
    const io::TpMode other = mode == io::TpMode::column ? io::TpMode::row : io::TpMode::column;
    for (const io::ShardGrid g : {io::ShardGrid{4, 1, mode}, io::ShardGrid{1, 4, mode}, io::ShardGrid{2, 2, mode},
                                  io::ShardGrid{4, 2, other}}) {
      CAPTURE(g.tp);
      CAPTURE(g.ep);
      std::vector<HostHarness::Layer> loaded = m.load_and_check(dir.path, g);
      // Column ranks round their own output columns, row ranks their partial sums: compare the
      // assembled output with the bf16 output tolerance (the factors above are checked bitwise).
      CHECK(relative_error(m.assembled_forward(loaded, g), expected) < tolerance(DType::bf16));
    }
  }
}

TEST_CASE("sharded: reshard rewrites a checkpoint for another grid that loads identically") {
  Model m;
  INFO("seed " << m.rng.seed);
  TempDir src, dst, bad;
  m.save(src.path, {2, 2, io::TpMode::column});
  io::reshard(src.path, dst.path, {4, 1, io::TpMode::row});
  const io::ShardedCheckpoint resharded(dst.path);
  CHECK(resharded.grid().tp == 4);
  CHECK(resharded.grid().mode == io::TpMode::row);
  CHECK(std::filesystem::exists(dst.path / "adapter-tp3-ep0.safetensors"));
  m.load_and_check(dst.path, {4, 1, io::TpMode::row});
  m.load_and_check(dst.path, {1, 2, io::TpMode::column});

  CHECK_THROWS_WITH_AS(io::reshard(src.path, bad.path, {3, 1, io::TpMode::column}),
                       doctest::Contains("out = 32 does not split evenly over tp = 3"), Error);
  CHECK_FALSE(std::filesystem::exists(bad.path / "adapter.index.json"));
}

TEST_CASE("sharded: a checkpoint that does not fit lists every problem and leaves the layer unchanged") {
  Model m;
  TempDir dir;
  m.save(dir.path, {2, 2, io::TpMode::column});
  const io::ShardLayout whole{1, 0, 1, 0, io::TpMode::column};
  HostHarness::Layer layer = m.rank_layer(whole, 7);
  const HostTensor before = m.h.download(layer.adapter("style").b);
  const auto expect_error = [&](HostHarness::Layer& target, const io::ShardLayout& l, std::vector<std::string> parts) {
    try {
      io::load_sharded(target, l, dir.path, kPrefix, {});
      FAIL("a checkpoint that does not fit was accepted");
    } catch (const Error& e) {
      CHECK(e.code() == ErrorCode::invalid_argument);
      for (const std::string& part : parts) CHECK_MESSAGE(std::string(e.what()).find(part) != std::string::npos, std::string(e.what()));
    }
    CHECK(m.h.download(layer.adapter("style").b).values == before.values);
  };

  SUBCASE("incompatible layouts") {
    expect_error(layer, {3, 0, 3, 0, io::TpMode::column},
                 {"the 4 experts do not split evenly over ep = 3", "out = 32 does not split evenly over tp = 3"});
    expect_error(layer, {2, 0, 2, 0, io::TpMode::column}, {"the layer holds E=4 in=48 out=32 but rank tp 0/2, ep 0/2"});
  }
  SUBCASE("adapters that do not match") {
    layer.remove_adapter("tone");
    AdapterConfig c;
    c.rank = 16;
    layer.add_adapter("extra", c, {});
    layer.remove_adapter("domain");
    c.lora_dtype = "fp32";
    layer.add_adapter("domain", c, {});
    expect_error(layer, whole,
                 {"missing adapter \"extra\"", "unexpected adapter \"tone\"", "unexpected " + std::string(kPrefix) + "lora_a_tone.weight0",
                  "adapter \"domain\" is fp32 rank 4 in the checkpoint but fp32 rank 16 in the layer"});
  }
  SUBCASE("a missing shard file") {
    std::filesystem::remove(dir.path / "adapter-tp1-ep0.safetensors");
    expect_error(layer, whole, {"cannot open", "adapter-tp1-ep0.safetensors"});
  }
  SUBCASE("missing and unexpected keys in the index") {
    const std::filesystem::path index = dir.path / "adapter.index.json";
    nlohmann::json json = nlohmann::json::parse(io::read_text_file(index));
    json["weight_map"].erase(std::string(kPrefix) + "lora_a_style.weight2");
    json["weight_map"][std::string(kPrefix) + "lora_c_style.weight0"] = "adapter-tp0-ep0.safetensors";
    io::write_text_file(index, json.dump());
    expect_error(layer, whole,
                 {"missing " + std::string(kPrefix) + "lora_a_style.weight2", "unexpected " + std::string(kPrefix) + "lora_c_style.weight0"});
  }
  SUBCASE("a slice of the wrong shape") {
    const std::filesystem::path file = dir.path / "adapter-tp1-ep1.safetensors";
    const std::string key = std::string(kPrefix) + "lora_b_style.weight3";
    std::vector<std::byte> copy;
    {
      const io::SafetensorsFile st(file);
      std::vector<io::TensorBytes> tensors = st.tensors();
      for (io::TensorBytes& t : tensors)
        if (t.name == key) t.shape = {8, 16}, copy.assign(t.bytes.begin(), t.bytes.end()), t.bytes = copy;
      io::write_safetensors(file.string() + ".new", tensors, st.metadata());
    }
    std::filesystem::rename(file.string() + ".new", file);
    expect_error(layer, whole, {key + " is BF16 [8, 16] but a slice at offset 16 of the checkpoint's layer needs BF16 [8, 8]"});
  }
  SUBCASE("another prefix") { CHECK_THROWS_WITH_AS(io::load_sharded(layer, whole, dir.path, "wrong.", {}), doctest::Contains("not \"wrong.\""), Error); }
}
