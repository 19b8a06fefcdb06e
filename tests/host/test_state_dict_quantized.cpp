// Adapter state dicts of layers on quantized bases: the base's packed quantizer state (codes,
// scales, amax) travels with the factors, a fresh layer on other weights computes bit for bit as
// the saved one after loading, and a file whose quantizer state does not fit is rejected with every
// problem listed and nothing changed.
#include <doctest/doctest.h>

#include <cstring>
#include <filesystem>
#include <random>
#include <string>
#include <vector>

#include "moelora/io/state_dict.hpp"
#include "support/harness.hpp"

using namespace moelora;
using namespace moelora::testing;

namespace {

using Layer = HostHarness::QuantizedLayer;

struct TempFile {
  std::filesystem::path path =
      std::filesystem::temp_directory_path() / ("moelora-sdq-" + std::to_string(std::random_device{}()) + ".safetensors");
  ~TempFile() { std::filesystem::remove(path); }
};

constexpr std::int64_t kExperts = 3, kOut = 24, kIn = 40, kRows = 30;

/// A layer on `w` quantized as `spec` with adapter "q" of rank 4 (bf16), initialised by `init`.
Layer make_layer(HostHarness& h, const HostTensor& w, std::optional<quant::QuantSpec> spec, const char* init) {
  Layer layer(h.make_quantized_base(w, spec));
  layer.set_warning_sink([](std::string_view) {});
  AdapterConfig config;
  config.rank = 4;
  config.lora_dtype = "bf16";
  config.init = parse_init_method(init);
  if (config.init == InitMethod::loftq) config.init_iterations = 2;
  layer.add_adapter("q", config, {});
  return layer;
}

/// The bytes of every present section of the base's packed state (not the alignment gaps between them).
std::vector<std::byte> packed_bytes(const Layer& layer) {
  const auto* p = static_cast<const std::byte*>(layer.base().packed().data());
  std::vector<std::byte> bytes;
  if (!layer.base().weight_quantizer()) return bytes;
  const quant::QuantSpec spec = layer.base().weight_quantizer()->spec();
  for (const quant::PackedSection& s : quant::packed_layout(spec, kExperts, kOut, kIn).sections())
    bytes.insert(bytes.end(), p + s.offset, p + s.offset + s.bytes);
  return bytes;
}

/// The layer's bf16 output bytes on fixed inputs.
std::vector<std::byte> forward(HostHarness& h, Layer& layer, const HostTensor& x, const std::vector<std::int64_t>& counts) {
  BackendTensor<HostBackend> xb = h.upload(x);
  BackendTensor<HostBackend> y = h.poisoned(DType::bf16, {kRows, kOut});
  layer.forward(xb.ref(), h.counts(counts), y.ref(), {});
  const auto* p = static_cast<const std::byte*>(y.buffer.data());
  return {p, p + y.buffer.bytes()};
}

/// Rewrites `path` with `edit` applied to its tensor list (storage kept alive by `keep`).
template <class Edit>
void rewrite(const std::filesystem::path& path, Edit edit) {
  std::vector<io::TensorBytes> tensors;
  io::Metadata metadata;
  std::vector<std::vector<std::byte>> keep;
  {
    const io::SafetensorsFile file(path);
    metadata = file.metadata();
    for (const io::TensorBytes& t : file.tensors()) {
      keep.emplace_back(t.bytes.begin(), t.bytes.end());
      tensors.push_back({t.name, t.dtype, t.shape, keep.back()});
    }
    edit(tensors, metadata, keep);
  }
  io::write_safetensors(path, tensors, metadata);
}

}  // namespace

TEST_CASE("quantized state dict: every format restores the base's packed state and the output bit for bit") {
  HostHarness h;
  Rng rng;
  INFO("seed " << rng.seed);
  const HostTensor w1 = random_tensor(rng, DType::bf16, {kExperts, kOut, kIn}, 0.05f);
  const HostTensor w2 = random_tensor(rng, DType::bf16, {kExperts, kOut, kIn}, 0.05f);
  const HostTensor x = random_tensor(rng, DType::bf16, {kRows, kIn});
  const std::vector<std::int64_t> counts = make_counts(rng, kExperts, kRows, Spread::skewed);
  std::vector<quant::QuantSpec> specs(quant::kAllQuantSpecs.begin(), quant::kAllQuantSpecs.end());
  specs.push_back(quant::parse_quant_spec("nvfp4_per_expert"));
  for (const quant::QuantSpec& spec : specs) {
    for (const char* init : {"svdquant", "loftq"}) {
      CAPTURE(quant::quant_spec_name(spec));
      CAPTURE(std::string(init));
      Layer saved = make_layer(h, w1, spec, init);
      const std::vector<std::byte> expected = forward(h, saved, x, counts);
      TempFile file;
      io::save_adapters(saved, file.path, "experts.", {});

      Layer loaded = make_layer(h, w2, spec, "kaiming_zeros");
      REQUIRE(packed_bytes(loaded) != packed_bytes(saved));
      io::load_adapters(loaded, file.path, "experts.", {});
      CHECK(packed_bytes(loaded) == packed_bytes(saved));
      CHECK(forward(h, loaded, x, counts) == expected);

      const io::SafetensorsFile st(file.path);
      CHECK(st.metadata().at("moelora.base_quantizer") == quant::quant_spec_name(spec));
      const quant::PackedLayout layout = quant::packed_layout(spec, kExperts, kOut, kIn);
      for (const quant::PackedSection& section : layout.sections()) {
        const io::TensorBytes& t = st.tensor("experts.base.weight_quantizer." + std::string(section.name));
        CHECK(io::st_dtype_name(t.dtype) == section.dtype);
        CHECK(t.shape == io::st_shape(section.shape));
      }
      CHECK(st.tensors().size() == 2 + layout.sections().size());
    }
  }
}

TEST_CASE("quantized state dict: MXFP4 scales are stored as F8_E8M0") {
  HostHarness h;
  Rng rng;
  Layer saved = make_layer(h, random_tensor(rng, DType::bf16, {kExperts, kOut, kIn}, 0.05f),
                           quant::parse_quant_spec("mxfp4"), "svdquant");
  TempFile file;
  io::save_adapters(saved, file.path, "", {});
  const io::SafetensorsFile st(file.path);
  CHECK(st.tensor("base.weight_quantizer.scales").dtype == io::StDType::F8_E8M0);
  CHECK(st.tensor("base.weight_quantizer.scales").shape == std::vector<std::int64_t>{kExperts, kOut, 2});
}

TEST_CASE("quantized state dict: a base without a weight quantizer stores factors only") {
  HostHarness h;
  Rng rng;
  const HostTensor w = random_tensor(rng, DType::bf16, {kExperts, kOut, kIn}, 0.05f);
  Layer saved = make_layer(h, w, std::nullopt, "kaiming_zeros");
  TempFile file;
  io::save_adapters(saved, file.path, "", {});
  const io::SafetensorsFile st(file.path);
  CHECK(st.tensors().size() == 2);
  CHECK(st.metadata().count("moelora.base_quantizer") == 0);
  Layer loaded = make_layer(h, w, std::nullopt, "kaiming_zeros");
  io::load_adapters(loaded, file.path, "", {});
  CHECK(h.download(loaded.adapter("q").a).values == h.download(saved.adapter("q").a).values);
}

TEST_CASE("quantized state dict: quantizer state that does not fit lists every problem and changes nothing") {
  HostHarness h;
  Rng rng;
  const HostTensor w1 = random_tensor(rng, DType::bf16, {kExperts, kOut, kIn}, 0.05f);
  const HostTensor w2 = random_tensor(rng, DType::bf16, {kExperts, kOut, kIn}, 0.05f);
  const quant::QuantSpec nvfp4 = quant::parse_quant_spec("nvfp4");
  Layer saved = make_layer(h, w1, nvfp4, "loftq");
  TempFile file;
  io::save_adapters(saved, file.path, "", {});

  const auto rejects = [&](Layer& target, const std::vector<std::string>& reasons) {
    const std::vector<std::byte> packed = packed_bytes(target);
    const HostTensor a = h.download(target.adapter("q").a);
    try {
      io::load_adapters(target, file.path, "", {});
      FAIL("a file that does not fit was accepted");
    } catch (const Error& e) {
      CHECK(e.code() == ErrorCode::invalid_argument);
      for (const std::string& reason : reasons) CHECK_MESSAGE(std::string(e.what()).find(reason) != std::string::npos, e.what());
    }
    CHECK(packed_bytes(target) == packed);
    CHECK(h.download(target.adapter("q").a).values == a.values);
  };

  SUBCASE("another spec") {
    Layer int4 = make_layer(h, w2, quant::parse_quant_spec("int4"), "kaiming_zeros");
    rejects(int4, {"the file's base quantizer is nvfp4 but the layer's is int4",
                   "base.weight_quantizer.scales is F8_E4M3 [3, 24, 3] but the base needs F32 [3, 24, 1]",
                   "unexpected base.weight_quantizer.amax"});
    Layer per_expert = make_layer(h, w2, quant::parse_quant_spec("nvfp4_per_expert"), "kaiming_zeros");
    rejects(per_expert, {"the file's base quantizer is nvfp4 but the layer's is nvfp4_per_expert"});
  }
  SUBCASE("a base without a quantizer") {
    Layer plain = make_layer(h, w2, std::nullopt, "kaiming_zeros");
    rejects(plain, {"the file's base quantizer is nvfp4 but the layer's is none", "unexpected base.weight_quantizer.codes",
                    "unexpected base.weight_quantizer.scales", "unexpected base.weight_quantizer.amax"});
  }
  SUBCASE("missing, misshaped and mistyped sections") {
    rewrite(file.path, [](std::vector<io::TensorBytes>& tensors, io::Metadata&, std::vector<std::vector<std::byte>>& keep) {
      std::erase_if(tensors, [](const io::TensorBytes& t) { return t.name == "base.weight_quantizer.amax"; });
      for (io::TensorBytes& t : tensors) {
        if (t.name == "base.weight_quantizer.codes") t.shape = {kExperts, kOut / 2, kIn};  // same bytes
        if (t.name == "base.weight_quantizer.scales") {
          keep.emplace_back(t.bytes.size() * 4);
          t.dtype = io::StDType::F32;
          t.bytes = keep.back();
        }
      }
    });
    Layer target = make_layer(h, w2, nvfp4, "kaiming_zeros");
    rejects(target, {"missing base.weight_quantizer.amax",
                     "base.weight_quantizer.codes is U8 [3, 12, 40] but the base needs U8 [3, 24, 20]",
                     "base.weight_quantizer.scales is F32 [3, 24, 3] but the base needs F8_E4M3 [3, 24, 3]"});
  }
  SUBCASE("a file without quantizer state") {
    rewrite(file.path, [](std::vector<io::TensorBytes>& tensors, io::Metadata& metadata, auto&) {
      std::erase_if(tensors, [](const io::TensorBytes& t) { return t.name.starts_with("base."); });
      metadata.erase("moelora.base_quantizer");
    });
    Layer target = make_layer(h, w2, nvfp4, "kaiming_zeros");
    rejects(target, {"the file's base quantizer is none but the layer's is nvfp4", "missing base.weight_quantizer.codes"});
  }
}
