// PEFT export and import: the exported tensors follow the documented index formulas (lora_A
// [E·r, in] row e·r + k = A[e, k, :], lora_B [out, r·E] column k·E + e = B[e, :, k]) element by
// element, a round trip is bitwise, lora_alpha = scale · r, two parameters of one module get the
// nested `.base_layer.` keys, and a directory that does not fit is rejected with the layers unchanged.
#include <doctest/doctest.h>

#include <filesystem>
#include <random>

#include "moelora/io/peft.hpp"
#include "support/harness.hpp"

using namespace moelora;
using namespace moelora::testing;

namespace {

constexpr std::int64_t kE = 3, kHidden = 16, kInter = 12, kRank = 4;
const std::string kModule = "base_model.model.model.layers.0.mlp.experts";

struct TempDir {
  std::filesystem::path path =
      std::filesystem::temp_directory_path() / ("moelora-peft-" + std::to_string(std::random_device{}()));
  ~TempDir() { std::filesystem::remove_all(path); }
};

/// An experts module's two projections: gate_up (hidden → 2·inter) and down (inter → hidden),
/// each with adapter "default" of `dtype`, random A and B, scale 0.75.
struct Experts {
  HostHarness h;
  Rng rng;
  HostHarness::Layer gate_up = layer(2 * kInter, kHidden, 1);
  HostHarness::Layer down = layer(kHidden, kInter, 2);

  HostHarness::Layer layer(std::int64_t out, std::int64_t in, std::uint64_t seed, DType dtype = DType::bf16) {
    HostHarness::Layer l(h.make_base(random_tensor(rng, DType::bf16, {kE, out, in}, 0.1f)));
    AdapterConfig c;
    c.rank = kRank;
    c.lora_dtype = std::string(dtype_name(dtype));
    c.seed = seed;
    l.add_adapter("default", c, {});
    return l;
  }
  void randomize(HostHarness::Layer& l, float scale = 0.75f) {
    const AdapterView v = l.adapter("default");
    h.write(v.a, random_tensor(rng, v.a.dtype, v.a.shape));
    h.write(v.b, random_tensor(rng, v.b.dtype, v.b.shape));
    l.set_scale("default", scale);
  }
  std::vector<io::PeftTarget<HostHarness::Layer>> targets() {
    return {{kModule, "gate_up_proj", &gate_up, "default"}, {kModule, "down_proj", &down, "default"}};
  }
};

HostTensor read(const io::SafetensorsFile& f, const std::string& key, DType dtype) {
  const io::TensorBytes& t = f.tensor(key);
  HostTensor out(dtype, {t.shape[0], t.shape[1]});
  out.decode(std::vector<std::byte>(t.bytes.begin(), t.bytes.end()));
  return out;
}

}  // namespace

TEST_CASE("peft: exported tensors follow the index formulas, keys nest, alpha = scale * r, and load back bitwise") {
  Experts src;
  INFO("seed " << src.rng.seed);
  src.randomize(src.gate_up);
  src.randomize(src.down);
  TempDir dir;
  io::save_peft(src.targets(), dir.path, {});

  const nlohmann::json config = nlohmann::json::parse(io::read_text_file(dir.path / "adapter_config.json"));
  CHECK(config["peft_type"] == "LORA");
  CHECK(config["r"] == kRank);
  CHECK(config["lora_alpha"].get<double>() == 0.75 * kRank);
  CHECK(config["target_modules"] == nlohmann::json::array());
  CHECK(config["target_parameters"] ==
        nlohmann::json{"model.layers.0.mlp.experts.gate_up_proj", "model.layers.0.mlp.experts.down_proj"});

  const io::SafetensorsFile file(dir.path / "adapter_model.safetensors");
  CHECK(file.tensors().size() == 4);
  // gate_up_proj is registered first: PEFT wraps it innermost, so its keys gain ".base_layer".
  for (const auto& [layer, prefix] : {std::pair{&src.gate_up, kModule + ".base_layer"}, std::pair{&src.down, kModule}}) {
    const AdapterView v = layer->adapter("default");
    const HostTensor a = src.h.download(v.a), b = src.h.download(v.b);
    const std::int64_t in = v.a.shape[2], out = v.b.shape[1], r = kRank, E = kE;
    const HostTensor pa = read(file, prefix + ".lora_A.weight", DType::bf16);
    const HostTensor pb = read(file, prefix + ".lora_B.weight", DType::bf16);
    CHECK(pa.shape == Shape{E * r, in});
    CHECK(pb.shape == Shape{out, r * E});
    bool all = true;
    for (std::int64_t e = 0; e < E; ++e)
      for (std::int64_t k = 0; k < r; ++k) {
        for (std::int64_t i = 0; i < in; ++i)  // lora_A row e·r + k = A[e, k, :]
          all &= pa[static_cast<std::size_t>((e * r + k) * in + i)] == a[static_cast<std::size_t>((e * r + k) * in + i)];
        for (std::int64_t n = 0; n < out; ++n)  // lora_B column k·E + e = B[e, :, k]
          all &= pb[static_cast<std::size_t>(n * r * E + k * E + e)] == b[static_cast<std::size_t>((e * out + n) * r + k)];
      }
    CHECK(all);
  }

  Experts dst;
  io::load_peft(dst.targets(), dir.path, {});
  for (auto [from, to] : {std::pair{&src.gate_up, &dst.gate_up}, std::pair{&src.down, &dst.down}}) {
    CHECK(dst.h.download(to->adapter("default").a).values == src.h.download(from->adapter("default").a).values);
    CHECK(dst.h.download(to->adapter("default").b).values == src.h.download(from->adapter("default").b).values);
    CHECK(to->adapter("default").config.scale == 0.75f);
  }
}

TEST_CASE("peft: one target has no .base_layer, and every factor dtype round-trips") {
  for (const DType dtype : kAllDTypes) {
    Experts src;
    HostHarness::Layer l = src.layer(20, kHidden, 3, dtype);
    src.randomize(l, 2.0f);
    TempDir dir;
    io::save_peft<HostHarness::Layer>({{kModule, "down_proj", &l, "default"}}, dir.path, {});
    const io::SafetensorsFile file(dir.path / "adapter_model.safetensors");
    CHECK(file.tensor(kModule + ".lora_A.weight").dtype == io::st_dtype_of(dtype));
    // lora_A [E·r, in], lora_B [out, r·E].
    CHECK(file.tensor(kModule + ".lora_A.weight").shape == std::vector<std::int64_t>{kE * kRank, kHidden});
    CHECK(file.tensor(kModule + ".lora_B.weight").shape == std::vector<std::int64_t>{20, kRank * kE});
    HostHarness::Layer back = src.layer(20, kHidden, 4, dtype);
    io::load_peft<HostHarness::Layer>({{kModule, "down_proj", &back, "default"}}, dir.path, {});
    CHECK(src.h.download(back.adapter("default").a).values == src.h.download(l.adapter("default").a).values);
    CHECK(src.h.download(back.adapter("default").b).values == src.h.download(l.adapter("default").b).values);
    CHECK(back.adapter("default").config.scale == 2.0f);
  }
}

TEST_CASE("peft: exports and directories that do not fit are rejected with every problem, layers unchanged") {
  Experts src;
  src.randomize(src.gate_up);
  src.randomize(src.down, 0.5f);
  TempDir dir;
  CHECK_THROWS_WITH_AS(io::save_peft(src.targets(), dir.path, {}),
                       doctest::Contains("one adapter_config holds one r and lora_alpha"), Error);
  CHECK_THROWS_WITH_AS(io::save_peft<HostHarness::Layer>({{"model.layers.0.mlp.experts", "down_proj", &src.down, "default"}},
                                                         dir.path, {}),
                       doctest::Contains("does not start with \"base_model.model.\""), Error);
  src.down.set_scale("default", 0.75);
  io::save_peft(src.targets(), dir.path, {});

  Experts other;
  other.down.remove_adapter("default");
  AdapterConfig c;
  c.rank = 8;
  other.down.add_adapter("default", c, {});
  const HostTensor before = other.h.download(other.gate_up.adapter("default").a);
  std::vector<io::PeftTarget<HostHarness::Layer>> targets = other.targets();
  targets.push_back({kModule, "extra_proj", &other.gate_up, "missing"});
  try {
    io::load_peft(targets, dir.path, {});
    FAIL("a directory that does not fit was accepted");
  } catch (const Error& e) {
    const std::string what = e.what();
    CHECK(e.code() == ErrorCode::invalid_argument);
    CHECK_MESSAGE(what.find("r = 4 but adapter \"default\" for model.layers.0.mlp.experts.down_proj has rank 8") != std::string::npos, what);
    // With the third target, down_proj's keys gain ".base_layer": they hold gate_up's lora_A [E·4, 16],
    // but down_proj at rank 8 needs [E·8, 12].
    CHECK_MESSAGE(what.find(kModule + ".base_layer.lora_A.weight is BF16 [12, 16] but adapter \"default\" needs BF16 [24, 12]") != std::string::npos, what);
    CHECK_MESSAGE(what.find("target_parameters does not list model.layers.0.mlp.experts.extra_proj") != std::string::npos, what);
    CHECK_MESSAGE(what.find("no adapter \"missing\"") != std::string::npos, what);
    CHECK_MESSAGE(what.find("missing " + kModule + ".base_layer.base_layer.lora_A.weight") != std::string::npos, what);
  }
  CHECK(other.h.download(other.gate_up.adapter("default").a).values == before.values);

  Experts one;
  const std::string unexpected = "unexpected " + kModule + ".base_layer.lora_A.weight";
  CHECK_THROWS_WITH_AS(io::load_peft<HostHarness::Layer>({{kModule, "down_proj", &one.down, "default"}}, dir.path, {}),
                       doctest::Contains(unexpected.c_str()), Error);

  nlohmann::json config = nlohmann::json::parse(io::read_text_file(dir.path / "adapter_config.json"));
  config["peft_type"] = "IA3";
  io::write_text_file(dir.path / "adapter_config.json", config.dump());
  Experts fresh;
  CHECK_THROWS_WITH_AS(io::load_peft(fresh.targets(), dir.path, {}),
                       doctest::Contains("peft_type is not LORA"), Error);
}
