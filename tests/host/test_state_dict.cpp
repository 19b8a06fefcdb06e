// Adapter state dicts: a saved layer restores bit for bit into another layer, settings included;
// a file that does not fit is rejected with every problem listed, and the layer stays unchanged.
#include <doctest/doctest.h>

#include <filesystem>
#include <random>

#include "moelora/io/state_dict.hpp"
#include "support/harness.hpp"

using namespace moelora;
using namespace moelora::testing;

namespace {

struct TempFile {
  std::filesystem::path path =
      std::filesystem::temp_directory_path() / ("moelora-sd-" + std::to_string(std::random_device{}()) + ".safetensors");
  ~TempFile() { std::filesystem::remove(path); }
};

/// A host layer over fixed base weights with adapters "style" (rank 8, bf16) and "domain" (rank 4, fp32).
HostHarness::Layer make_layer(HostHarness& h, const HostTensor& w, std::uint64_t seed) {
  HostHarness::Layer layer(h.make_base(w));
  AdapterConfig style;
  style.rank = 8;
  style.lora_dtype = "bf16";
  style.seed = seed;
  AdapterConfig domain;
  domain.rank = 4;
  domain.lora_dtype = "fp32";
  domain.seed = seed + 1;
  layer.add_adapter("style", style, {});
  layer.add_adapter("domain", domain, {});
  return layer;
}

}  // namespace

TEST_CASE("state dict: save, then load into another layer, restores factors, settings and output bit for bit") {
  HostHarness h;
  Rng rng;
  INFO("seed " << rng.seed);
  const HostTensor w = random_tensor(rng, DType::bf16, {4, 32, 48}, 0.1f);
  const HostTensor x = random_tensor(rng, DType::bf16, {50, 48});
  const std::vector<std::int64_t> counts = make_counts(rng, 4, 50, Spread::skewed);
  const auto forward = [&](HostHarness::Layer& layer) {
    HostTensor y(DType::bf16, {50, 32});
    const auto xb = x.encode();
    auto yb = y.encode();
    layer.forward({xb.data(), DType::bf16, x.shape}, expert_counts(counts.data(), 4), {yb.data(), DType::bf16, y.shape}, {});
    y.decode(yb);
    return y.values;
  };

  HostHarness::Layer saved = make_layer(h, w, 1);
  for (const char* name : {"style", "domain"}) {
    const AdapterView v = saved.adapter(name);
    h.write(v.b, random_tensor(rng, v.b.dtype, v.b.shape, 0.3f));
  }
  saved.set_scale("style", 0.75);
  saved.set_enabled("domain", false);
  saved.set_trainable("domain", false, {});
  const std::vector<float> expected = forward(saved);
  TempFile file;
  io::save_adapters(saved, file.path, "model.layers.0.mlp.experts.", {});

  HostHarness::Layer loaded = make_layer(h, w, 99);
  CHECK(forward(loaded) != expected);
  io::load_adapters(loaded, file.path, "model.layers.0.mlp.experts.", {});
  for (const char* name : {"style", "domain"}) {
    CHECK(h.download(loaded.adapter(name).a).values == h.download(saved.adapter(name).a).values);
    CHECK(h.download(loaded.adapter(name).b).values == h.download(saved.adapter(name).b).values);
  }
  CHECK(loaded.adapter("style").config.scale == 0.75f);
  CHECK_FALSE(loaded.adapter("domain").config.enabled);
  CHECK_FALSE(loaded.adapter("domain").config.trainable);
  CHECK(forward(loaded) == expected);

  const io::SafetensorsFile st(file.path);
  CHECK(st.tensor("model.layers.0.mlp.experts.lora_a_style.weight").shape == std::vector<std::int64_t>{4, 8, 48});
  CHECK(st.tensor("model.layers.0.mlp.experts.lora_b_domain.weight").dtype == io::StDType::F32);
  CHECK(st.metadata().at("format") == "pt");
}

TEST_CASE("state dict: a file that does not fit lists every problem and changes nothing") {
  HostHarness h;
  Rng rng;
  const HostTensor w = random_tensor(rng, DType::bf16, {4, 32, 48}, 0.1f);
  HostHarness::Layer saved = make_layer(h, w, 1);
  TempFile file;
  io::save_adapters(saved, file.path, "", {});

  HostHarness::Layer other(h.make_base(w));
  AdapterConfig style;  // rank 16 instead of 8
  style.rank = 16;
  style.lora_dtype = "bf16";
  AdapterConfig extra;
  extra.rank = 4;
  other.add_adapter("style", style, {});
  other.add_adapter("extra", extra, {});
  const HostTensor before = h.download(other.adapter("style").a);
  try {
    io::load_adapters(other, file.path, "", {});
    FAIL("a mismatching file was accepted");
  } catch (const Error& e) {
    const std::string what = e.what();
    CHECK(e.code() == ErrorCode::invalid_argument);
    CHECK(what.find("lora_a_style.weight is BF16 [4, 8, 48] but the layer needs BF16 [4, 16, 48]") != std::string::npos);
    CHECK(what.find("missing lora_a_extra.weight") != std::string::npos);
    CHECK(what.find("unexpected lora_a_domain.weight") != std::string::npos);
  }
  CHECK(h.download(other.adapter("style").a).values == before.values);
  CHECK_THROWS_WITH_AS(io::load_adapters(saved, file.path, "wrong.", {}), doctest::Contains("missing wrong.lora_a_style"),
                       Error);
}
