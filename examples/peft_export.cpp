// Exports random adapters of one experts module in the Hugging Face PEFT format, with the delta each
// should add to its parameter, for scripts/peft_check.py (which loads the export with PEFT and
// compares). Runs on the host backend.
//
//   peft_export --out DIR --experts 4 --rank 4 --scale 0.5
//               --param gate_up_proj:64:96 --param down_proj:48:64
//
// Each --param is NAME:IN:OUT, IN and OUT being the module's semantic in and out features (however
// the model stores the parameter, [E, out, in] or [E, in, out]: the PEFT layout is the same), in
// the experts module's parameter registration order. Writes DIR/adapter_model.safetensors,
// DIR/adapter_config.json and DIR/expected_delta.safetensors, which holds per parameter NAME an F32
// tensor [E, out, in]: scale · B_e A_e computed in fp64 from the stored factor values (transpose it
// to compare with the delta of a parameter stored [E, in, out]).
#include <CLI/CLI.hpp>

#include <cstdio>
#include <random>
#include <string>
#include <vector>

#include "moelora/io/peft.hpp"
#include "moelora/moelora.hpp"

using namespace moelora;
using Layer = GroupedLoRA<GroupedLinear<HostBackend>>;

namespace {

struct Param {
  std::string name;
  std::int64_t in = 0, out = 0;
};

Param parse_param(const std::string& spec) {
  std::vector<std::string> parts;
  std::size_t start = 0;
  for (std::size_t colon; (colon = spec.find(':', start)) != std::string::npos; start = colon + 1)
    parts.push_back(spec.substr(start, colon - start));
  parts.push_back(spec.substr(start));
  MOELORA_REQUIRE(parts.size() == 3, ErrorCode::invalid_argument, "--param ", spec, " is not NAME:IN:OUT");
  return {parts[0], std::stoll(parts[1]), std::stoll(parts[2])};
}

/// Reads a host factor as floats.
std::vector<float> values(ConstTensorRef t) {
  std::vector<float> out(static_cast<std::size_t>(t.numel()));
  dispatch_dtype(t.dtype, [&](auto tag) {
    const auto* p = static_cast<const host_type_t<tag.value>*>(t.data);
    for (std::size_t i = 0; i < out.size(); ++i) out[i] = static_cast<float>(p[i]);
  });
  return out;
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"Export random moelora adapters in the PEFT format, with their expected deltas"};
  std::string out_dir, prefix = "base_model.model.model.layers.0.mlp.experts", dtype = "bf16";
  std::int64_t experts = 4, rank = 4;
  double scale = 0.5;
  std::uint64_t seed = 1;
  std::vector<std::string> specs;
  app.add_option("--out", out_dir, "output directory")->required();
  app.add_option("--prefix", prefix, "key prefix of the experts module");
  app.add_option("--experts", experts, "experts E");
  app.add_option("--rank", rank, "rank r");
  app.add_option("--scale", scale, "scale (lora_alpha = scale * r)");
  app.add_option("--dtype", dtype, "factor dtype");
  app.add_option("--seed", seed, "random seed");
  app.add_option("--param", specs, "NAME:IN:OUT (semantic in/out features), in registration order")->required();
  CLI11_PARSE(app, argc, argv);

  try {
    std::mt19937_64 engine(seed);
    std::normal_distribution<float> normal(0.0f, 0.5f);
    std::vector<Param> params;
    std::vector<Layer> layers;
    for (const std::string& spec : specs) params.push_back(parse_param(spec));
    layers.reserve(params.size());
    std::vector<io::PeftTarget<Layer>> targets;
    std::vector<std::vector<float>> deltas;
    std::vector<io::TensorBytes> expected;
    for (const Param& p : params) {
      GroupedLinear<HostBackend> base(experts, p.in, p.out, DType::bf16);
      std::vector<bfloat16_t> zeros(static_cast<std::size_t>(experts * p.out * p.in), bfloat16_t(0.0f));
      base.set_weight(tensor_ref(std::as_const(zeros).data(), {experts, p.out, p.in}), {});
      Layer& layer = layers.emplace_back(std::move(base));
      AdapterConfig config;
      config.rank = rank;
      config.scale = scale;
      config.lora_dtype = dtype;
      layer.add_adapter("default", config, {});
      const AdapterView v = layer.adapter("default");
      for (const TensorRef& factor : {v.a, v.b})  // random A and B, stored in the factor dtype
        dispatch_dtype(factor.dtype, [&](auto tag) {
          auto* data = static_cast<host_type_t<tag.value>*>(factor.data);
          for (std::int64_t i = 0; i < factor.numel(); ++i) data[i] = host_type_t<tag.value>(normal(engine));
        });
      const std::vector<float> a = values(v.a), b = values(v.b);
      std::vector<float>& delta = deltas.emplace_back(static_cast<std::size_t>(experts * p.out * p.in));
      for (std::int64_t e = 0; e < experts; ++e)
        for (std::int64_t o = 0; o < p.out; ++o)
          for (std::int64_t i = 0; i < p.in; ++i) {
            double acc = 0.0;
            for (std::int64_t k = 0; k < rank; ++k)
              acc += double(b[static_cast<std::size_t>((e * p.out + o) * rank + k)]) *
                     double(a[static_cast<std::size_t>((e * rank + k) * p.in + i)]);
            delta[static_cast<std::size_t>((e * p.out + o) * p.in + i)] = static_cast<float>(v.config.scale * acc);
          }
      targets.push_back({prefix, p.name, &layer, "default"});
    }
    for (std::size_t t = 0; t < params.size(); ++t)
      expected.push_back({params[t].name, io::StDType::F32, {experts, params[t].out, params[t].in},
                          std::as_bytes(std::span<const float>(deltas[t]))});
    io::save_peft(targets, out_dir, {});
    io::write_safetensors(std::filesystem::path(out_dir) / "expected_delta.safetensors", expected, {{"format", "pt"}});
    std::printf("wrote %s: %zu parameters, E=%lld r=%lld scale=%g\n", out_dir.c_str(), params.size(),
                static_cast<long long>(experts), static_cast<long long>(rank), scale);
  } catch (const Error& e) {
    std::fprintf(stderr, "%s\n", e.what());
    return 1;
  }
}
