// Writes the small files the CLI test (test_cli.sh) runs on into the directory given:
// - model.safetensors: a plain model checkpoint with bf16 expert weights
//   `model.layers.{L}.mlp.experts.{e}.down_proj.weight` [32, 64] for L = 0, 1 and e = 0 … 3, N(0, 0.02²);
// - sharded/: a sharded adapter checkpoint (tp 1, ep 1, column) of a 4-expert [32, 64] layer with
//   adapter "a" (rank 4, bf16), and in sharded/optimizer/ its optimizer state after one AdamW step
//   (clipping at 1, cosine schedule);
// - optimizer.safetensors: the same optimizer state as one file.
#include <cstdio>
#include <filesystem>
#include <random>
#include <string>
#include <vector>

#include "moelora/io/optimizer_state.hpp"
#include "moelora/io/sharded.hpp"
#include "moelora/io/sharded_optimizer.hpp"
#include "moelora/moelora.hpp"

int main(int argc, char** argv) {
  using namespace moelora;
  if (argc != 2) {
    std::fprintf(stderr, "usage: %s DIR\n", argv[0]);
    return 2;
  }
  const std::filesystem::path dir = argv[1];
  constexpr std::int64_t kExperts = 4, kOut = 32, kIn = 64;
  std::mt19937 rng(7);
  std::normal_distribution<float> normal(0.0f, 0.02f);
  std::vector<std::vector<bfloat16_t>> storage;
  std::vector<io::TensorBytes> tensors;
  for (int layer = 0; layer < 2; ++layer)
    for (std::int64_t e = 0; e < kExperts; ++e) {
      std::vector<bfloat16_t>& w = storage.emplace_back(kOut * kIn);
      for (bfloat16_t& v : w) v = bfloat16_t(normal(rng));
      tensors.push_back({"model.layers." + std::to_string(layer) + ".mlp.experts." + std::to_string(e) +
                             ".down_proj.weight",
                         io::StDType::BF16, {kOut, kIn}, std::as_bytes(std::span(w))});
    }
  std::filesystem::create_directories(dir);
  io::write_safetensors(dir / "model.safetensors", tensors, {{"format", "pt"}});

  GroupedLinear<HostBackend> base(kExperts, kIn, kOut, DType::bf16);
  const std::vector<bfloat16_t>& first = storage.front();
  std::vector<bfloat16_t> w(static_cast<std::size_t>(kExperts) * first.size());
  for (std::size_t i = 0; i < w.size(); ++i) w[i] = storage[i / first.size()][i % first.size()];
  base.set_weight({w.data(), DType::bf16, {kExperts, kOut, kIn}}, {});
  GroupedLoRA<GroupedLinear<HostBackend>> layer(std::move(base));
  AdapterConfig config;
  config.rank = 4;
  config.lora_dtype = "bf16";
  layer.add_adapter("a", config, {});
  io::save_sharded(layer, io::ShardLayout{}, dir / "sharded", "", {});
  io::write_sharded_index(dir / "sharded");

  AdamWConfig settings;
  settings.max_grad_norm = 1.0f;
  settings.schedule = {ScheduleKind::cosine, 10, 100, 0.1f};
  AdamW<decltype(layer)> optimizer(settings);
  optimizer.step(layer, {});
  io::save_optimizer(optimizer, layer, dir / "optimizer.safetensors", "", {});
  io::save_sharded_optimizer(optimizer, layer, io::ShardLayout{}, dir / "sharded", "", {});
  io::write_sharded_optimizer_index(dir / "sharded");
  return 0;
}
