// The `moelora` command: inspect checkpoints, initialise an adapter on a model's quantized expert
// weights, reshard a sharded adapter checkpoint, export adapters to Hugging Face PEFT. Runs on the
// CPU backend. docs/cli.md describes every subcommand; `moelora SUBCOMMAND --help` shows an example.
//
// Exit codes: 0 on success, 1 when the work fails (a missing or damaged file, an unknown format or
// init method, a bad key pattern, ...: one line on stderr), 2 for a malformed command line.
#include <CLI/CLI.hpp>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <exception>
#include <filesystem>
#include <list>
#include <optional>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "moelora/io/expert_weights.hpp"
#include "moelora/io/optimizer_state.hpp"
#include "moelora/io/peft.hpp"
#include "moelora/io/sharded.hpp"
#include "moelora/io/sharded_optimizer.hpp"
#include "moelora/io/state_dict.hpp"
#include "moelora/moelora.hpp"

namespace {

using namespace moelora;
namespace fs = std::filesystem;

using Base = QuantizedGroupedLinear<HostBackend>;
using Layer = GroupedLoRA<Base>;

[[noreturn]] void fail(const std::string& message) { detail::raise(ErrorCode::invalid_argument, message); }

std::string shape_text(const std::vector<std::int64_t>& shape) {
  std::string text = "[";
  for (std::size_t d = 0; d < shape.size(); ++d) text += (d ? ", " : "") + std::to_string(shape[d]);
  return text + "]";
}

/// A metadata value or setting as text; a JSON object or array is parsed and pretty-printed.
std::string pretty(const std::string& value, int indent) {
  const nlohmann::ordered_json parsed = nlohmann::ordered_json::parse(value, nullptr, false);
  if (parsed.is_discarded() || !(parsed.is_object() || parsed.is_array())) return value;
  std::string text = parsed.dump(2), pad(static_cast<std::size_t>(indent), ' ');
  for (std::size_t at = text.find('\n'); at != std::string::npos; at = text.find('\n', at + 1)) text.insert(at + 1, pad);
  return text;
}

/// A JSON metadata entry of `file`, or null when absent or not JSON.
nlohmann::json metadata_json(const io::SafetensorsFile& file, const std::string& key) {
  const auto it = file.metadata().find(key);
  return it == file.metadata().end() ? nlohmann::json() : nlohmann::json::parse(it->second, nullptr, false);
}

// ---- inspect --------------------------------------------------------------------------------------

void print_adapters(const nlohmann::json& adapters) {
  std::printf("  %-16s %6s %8s %6s %-14s %-8s %-9s\n", "adapter", "rank", "scale", "dtype", "init", "enabled", "trainable");
  for (const nlohmann::json& a : adapters) {
    if (!a.is_object()) continue;
    std::printf("  %-16s %6lld %8.4g %6s %-14s %-8s %-9s\n", a.value("name", "?").c_str(),
                static_cast<long long>(a.value("rank", std::int64_t{0})), a.value("scale", 0.0),
                a.value("dtype", "?").c_str(), a.value("init", "?").c_str(), a.value("enabled", true) ? "yes" : "no",
                a.value("trainable", true) ? "yes" : "no");
  }
}

void print_layer(const nlohmann::json& layer, const char* what) {
  if (!layer.is_object()) return;
  std::printf("  %s: %lld experts, in %lld, out %lld\n", what, static_cast<long long>(layer.value("experts", std::int64_t{0})),
              static_cast<long long>(layer.value("in", std::int64_t{0})),
              static_cast<long long>(layer.value("out", std::int64_t{0})));
}

/// The value of the 0-d tensor of `file` whose name ends with `suffix` (null when there is none).
nlohmann::json scalar_ending(const io::SafetensorsFile& file, const std::string& suffix) {
  for (const io::TensorBytes& t : file.tensors()) {
    if (!t.shape.empty() || t.name.size() < suffix.size() || t.name.compare(t.name.size() - suffix.size(), suffix.size(), suffix))
      continue;
    if (t.dtype == io::StDType::I64) return io::scalar_of<std::int64_t>(t);
    if (t.dtype == io::StDType::F32) return io::scalar_of<float>(t);
  }
  return nullptr;
}

/// The optimizer part of an optimizer state file (io/optimizer_state.hpp, io/sharded_optimizer.hpp).
void print_optimizer(const io::SafetensorsFile& file, const nlohmann::json& settings) {
  const nlohmann::json schedule = settings.value("schedule", nlohmann::json::object());
  const nlohmann::json scaling = settings.value("loss_scaling", nlohmann::json::object());
  std::printf("  %s: lr %g, betas (%g, %g), eps %g, weight decay %g\n", settings.value("type", "?").c_str(),
              settings.value("lr", 0.0), settings.value("beta1", 0.0), settings.value("beta2", 0.0),
              settings.value("eps", 0.0), settings.value("weight_decay", 0.0));
  const double clip = settings.value("max_grad_norm", 0.0);
  std::printf("  clip the global gradient norm: %s; skip non-finite steps: %s\n",
              clip > 0.0 ? std::to_string(clip).c_str() : "no", settings.value("skip_nonfinite", false) ? "yes" : "no");
  std::printf("  schedule: %s, warm-up %lld steps, total %lld, floor %g of lr\n", schedule.value("kind", "?").c_str(),
              static_cast<long long>(schedule.value("warmup_steps", std::int64_t{0})),
              static_cast<long long>(schedule.value("total_steps", std::int64_t{0})), schedule.value("min_lr_ratio", 0.0));
  if (scaling.value("enabled", false))
    std::printf("  loss scaling: init %g, growth %g every %lld finite steps, backoff %g\n", scaling.value("init_scale", 0.0),
                scaling.value("growth_factor", 0.0), static_cast<long long>(scaling.value("growth_interval", std::int64_t{0})),
                scaling.value("backoff_factor", 0.0));
  const nlohmann::json step = scalar_ending(file, "optimizer.step");
  if (!step.is_null())
    std::printf("  counters: %s updates, %s skipped, loss scale %s\n", step.dump().c_str(),
                scalar_ending(file, "optimizer.skipped").dump().c_str(), scalar_ending(file, "optimizer.loss_scale").dump().c_str());
  std::printf("  %-16s %6s %6s %-6s %8s %8s\n", "adapter", "rank", "dtype", "state", "steps A", "steps B");
  for (const nlohmann::json& a : metadata_json(file, std::string(io::kOptimizerAdaptersKey))) {
    if (!a.is_object()) continue;
    const std::string name = a.value("name", "?");
    const nlohmann::json steps_a = scalar_ending(file, "lora_a_" + name + ".weight.step");
    const nlohmann::json steps_b = scalar_ending(file, "lora_b_" + name + ".weight.step");
    std::printf("  %-16s %6lld %6s %-6s %8s %8s\n", name.c_str(), static_cast<long long>(a.value("rank", std::int64_t{0})),
                a.value("dtype", "?").c_str(), a.value("state", false) ? "yes" : "no",
                steps_a.is_null() ? "-" : steps_a.dump().c_str(), steps_b.is_null() ? "-" : steps_b.dump().c_str());
  }
}

void inspect_file(const fs::path& path) {
  const io::SafetensorsFile file(path);
  std::uint64_t total = 0;
  std::printf("%s: %zu tensors\n", path.string().c_str(), file.tensors().size());
  std::printf("  %-56s %-8s %-20s %12s\n", "name", "dtype", "shape", "bytes");
  for (const io::TensorBytes& t : file.tensors()) {
    std::printf("  %-56s %-8s %-20s %12zu\n", t.name.c_str(), std::string(io::st_dtype_name(t.dtype)).c_str(),
                shape_text(t.shape).c_str(), t.bytes.size());
    total += t.bytes.size();
  }
  std::printf("  total %llu bytes\n", static_cast<unsigned long long>(total));
  if (!file.metadata().empty()) {
    std::printf("metadata:\n");
    for (const auto& [key, value] : file.metadata()) std::printf("  %s: %s\n", key.c_str(), pretty(value, 4).c_str());
  }
  const nlohmann::json adapters = metadata_json(file, "moelora.adapters");
  const nlohmann::json placement = metadata_json(file, "moelora.layout");
  const nlohmann::json optimizer = metadata_json(file, std::string(io::kOptimizerSettingsKey));
  if (optimizer.is_object()) {
    if (placement.is_object())
      std::printf("kind: one rank file of a sharded optimizer state (tp_rank %lld of %lld, ep_rank %lld of %lld, %s)\n",
                  static_cast<long long>(placement.value("tp_rank", std::int64_t{0})),
                  static_cast<long long>(placement.value("tp", std::int64_t{0})),
                  static_cast<long long>(placement.value("ep_rank", std::int64_t{0})),
                  static_cast<long long>(placement.value("ep", std::int64_t{0})), placement.value("mode", "?").c_str());
    else
      std::printf("kind: moelora optimizer state\n");
    print_layer(metadata_json(file, "moelora.layer"), placement.is_object() ? "global layer" : "layer");
    print_optimizer(file, optimizer);
  } else if (adapters.is_array() && placement.is_object()) {
    std::printf("kind: one rank file of a sharded adapter checkpoint (tp_rank %lld of %lld, ep_rank %lld of %lld, %s)\n",
                static_cast<long long>(placement.value("tp_rank", std::int64_t{0})),
                static_cast<long long>(placement.value("tp", std::int64_t{0})),
                static_cast<long long>(placement.value("ep_rank", std::int64_t{0})),
                static_cast<long long>(placement.value("ep", std::int64_t{0})), placement.value("mode", "?").c_str());
    print_layer(metadata_json(file, "moelora.layer"), "global layer");
    print_adapters(adapters);
  } else if (adapters.is_array()) {
    std::printf("kind: moelora adapter state dict\n");
    print_layer(metadata_json(file, "moelora.layer"), "layer");
    print_adapters(adapters);
    const auto quantizer = file.metadata().find(std::string(io::kBaseQuantizerKey));
    std::printf("  base quantizer state: %s\n", quantizer == file.metadata().end() ? "none" : quantizer->second.c_str());
  } else {
    std::printf("kind: plain safetensors checkpoint\n");
  }
}

void inspect_sharded(const fs::path& dir) {
  const nlohmann::json index = nlohmann::json::parse(io::read_text_file(dir / io::kShardIndexName), nullptr, false);
  if (!index.is_object()) fail((dir / io::kShardIndexName).string() + " is not JSON");
  const io::ShardedCheckpoint checkpoint(dir);
  const io::ShardGrid& grid = checkpoint.grid();
  const bool optimizer_state =
      io::SafetensorsFile(dir / io::shard_file_name(0, 0)).metadata().count(std::string(io::kOptimizerSettingsKey)) > 0;
  std::printf("%s: sharded moelora %s\n", dir.string().c_str(), optimizer_state ? "optimizer state" : "adapter checkpoint");
  std::printf("  layout: tp %lld, ep %lld, %s parallel\n", static_cast<long long>(grid.tp),
              static_cast<long long>(grid.ep), std::string(io::tp_mode_name(grid.mode)).c_str());
  std::printf("  global layer: %lld experts, in %lld, out %lld\n", static_cast<long long>(checkpoint.sizes().experts),
              static_cast<long long>(checkpoint.sizes().in), static_cast<long long>(checkpoint.sizes().out));
  std::printf("  key prefix: \"%s\", %zu keys\n", checkpoint.prefix().c_str(), checkpoint.weight_map().size());
  std::printf("  files:\n");
  for (const nlohmann::json& name : index.value("files", nlohmann::json::array()))
    if (name.is_string())
      std::printf("    %-32s %12llu bytes\n", name.get<std::string>().c_str(),
                  static_cast<unsigned long long>(fs::file_size(dir / name.get<std::string>())));
  print_adapters(checkpoint.adapters());
  if (fs::exists(dir / io::kOptimizerFolder / io::kShardIndexName))
    std::printf("  optimizer state: %s/ (inspect it for the settings and counters)\n", std::string(io::kOptimizerFolder).c_str());
}

void inspect_peft(const fs::path& dir) {
  const fs::path config_path = dir / "adapter_config.json";
  const nlohmann::json config = nlohmann::json::parse(io::read_text_file(config_path), nullptr, false);
  if (!config.is_object()) fail(config_path.string() + " is not a JSON object");
  const auto r = config.value("r", std::int64_t{0});
  const double alpha = config.value("lora_alpha", 0.0);
  std::printf("%s: Hugging Face PEFT adapter\n", dir.string().c_str());
  std::printf("  peft_type %s, r %lld, lora_alpha %g (scale %g)\n", config.value("peft_type", "?").c_str(),
              static_cast<long long>(r), alpha, r > 0 ? alpha / static_cast<double>(r) : 0.0);
  std::printf("  target_parameters:");
  for (const nlohmann::json& p : config.value("target_parameters", nlohmann::json::array()))
    if (p.is_string()) std::printf(" %s", p.get<std::string>().c_str());
  std::printf("\n");
  const fs::path weights = dir / "adapter_model.safetensors";
  if (fs::exists(weights)) inspect_file(weights);
}

int run_inspect(const std::string& target) {
  const fs::path path(target);
  if (!fs::exists(path)) fail("no such file or directory: " + target);
  if (!fs::is_directory(path)) {
    inspect_file(path);
  } else if (fs::exists(path / io::kShardIndexName)) {
    inspect_sharded(path);
  } else if (fs::exists(path / "adapter_config.json")) {
    inspect_peft(path);
  } else {
    std::vector<fs::path> files;
    for (const auto& entry : fs::directory_iterator(path))
      if (entry.path().extension() == ".safetensors") files.push_back(entry.path());
    if (files.empty())
      fail(target + " holds no .safetensors file, adapter.index.json (sharded) or adapter_config.json (PEFT)");
    std::sort(files.begin(), files.end());
    for (const fs::path& file : files) inspect_file(file);
  }
  return 0;
}

// ---- init -----------------------------------------------------------------------------------------

struct InitOptions {
  std::string weights, pattern, format = "nvfp4", method = "svdquant", lora_dtype = "bf16", adapter, output, prefix;
  std::optional<std::int64_t> layer, experts, iterations;
  std::int64_t rank = 32;
  double scale = 1.0;
};

void print_errors(const char* what, const std::vector<double>& errors) {
  const auto [lo, hi] = std::minmax_element(errors.begin(), errors.end());
  std::printf("  %-36s rms %7.3f%%  min %7.3f%%  max %7.3f%%\n", what, 100.0 * init::InitReport::rms(errors),
              100.0 * *lo, 100.0 * *hi);
}

int run_init(const InitOptions& o) {
  const quant::QuantSpec spec = quant::parse_quant_spec(o.format);  // unknown names fail before any reading
  AdapterConfig config;
  config.rank = o.rank;
  config.scale = o.scale;
  config.lora_dtype = o.lora_dtype;
  config.init = parse_init_method(o.method);
  config.init_iterations = o.iterations;
  static_cast<void>(parse_dtype(o.lora_dtype));  // fails before the weights are read, as the above

  io::ExpertWeights w = io::load_expert_weights(o.weights, o.pattern, o.layer, o.experts);
  std::printf("read %lld experts of [%lld, %lld] from %s\n", static_cast<long long>(w.experts),
              static_cast<long long>(w.out), static_cast<long long>(w.in), o.weights.c_str());
  Base base(Linalg<HostBackend>{}, w.experts, w.in, w.out, DType::fp32, quant::FormatQuantizer<HostBackend>(spec));
  base.set_weight({w.values.data(), DType::fp32, {w.experts, w.out, w.in}}, {});
  w.values = {};
  Layer layer(std::move(base));
  const init::InitReport report = layer.add_adapter(o.adapter, config, {});
  std::printf("adapter \"%s\": rank %lld, scale %g, %s factors, init %s on %s weights\n", o.adapter.c_str(),
              static_cast<long long>(o.rank), o.scale, o.lora_dtype.c_str(), o.method.c_str(),
              quant::quant_spec_name(spec).c_str());
  if (!report.init_error.empty()) {
    std::printf("relative weight error per expert, ‖W − Q − scale·BA‖ / ‖W‖:\n");
    print_errors("quantized only (‖W − Q(W)‖ / ‖W‖)", report.quantized_error);
    print_errors(("after " + o.method).c_str(), report.init_error);
    if (config.init == InitMethod::loftq || config.init == InitMethod::svd_first)
      std::printf("  kept iterate %lld\n", static_cast<long long>(report.best_iteration));
  }
  io::save_adapters(layer, o.output, o.prefix, {});
  std::printf("wrote %s (factors and the base's %s quantizer state)\n", o.output.c_str(),
              quant::quant_spec_name(spec).c_str());
  return 0;
}

// ---- reshard --------------------------------------------------------------------------------------

int run_reshard(const std::string& src, const std::string& dst, std::int64_t tp, std::int64_t ep,
                const std::optional<std::string>& mode) {
  if (!fs::exists(fs::path(src) / io::kShardIndexName))
    fail(src + " is not a sharded adapter checkpoint (no " + std::string(io::kShardIndexName) + ")");
  const io::TpMode tp_mode = mode ? io::parse_tp_mode(*mode) : io::ShardedCheckpoint(src).grid().mode;
  io::reshard(src, dst, {tp, ep, tp_mode});
  std::printf("wrote %s: tp %lld, ep %lld, %s parallel\n", dst.c_str(), static_cast<long long>(tp),
              static_cast<long long>(ep), std::string(io::tp_mode_name(tp_mode)).c_str());
  return 0;
}

// ---- export-peft ----------------------------------------------------------------------------------

struct ExportOptions {
  std::vector<std::string> files, parameters;
  std::string out_dir, module;
  std::optional<std::string> adapter;
};

/// A layer holding every adapter of the state dict at `path`, loaded strictly under the key prefix
/// of adapter `name` (the part of its `lora_a_{name}.weight` key before that).
Layer load_state_dict(const fs::path& path, const std::string& name) {
  const io::SafetensorsFile file(path);
  const nlohmann::json adapters = metadata_json(file, "moelora.adapters");
  const nlohmann::json sizes = metadata_json(file, "moelora.layer");
  if (!adapters.is_array() || !sizes.is_object())
    fail(path.string() + " is not a moelora adapter state dict (no moelora.adapters / moelora.layer metadata)");
  const std::string suffix = "lora_a_" + name + ".weight";
  std::optional<std::string> prefix;
  for (const io::TensorBytes& t : file.tensors())
    if (t.name.ends_with(suffix)) prefix = t.name.substr(0, t.name.size() - suffix.size());
  if (!prefix) fail(path.string() + " holds no adapter \"" + name + "\"");

  std::optional<quant::FormatQuantizer<HostBackend>> quantizer;
  const auto spec = file.metadata().find(std::string(io::kBaseQuantizerKey));
  if (spec != file.metadata().end()) quantizer.emplace(quant::parse_quant_spec(spec->second));
  Layer layer(Base(Linalg<HostBackend>{}, sizes.value("experts", std::int64_t{0}), sizes.value("in", std::int64_t{0}),
                   sizes.value("out", std::int64_t{0}), DType::bf16, std::move(quantizer)));
  for (const nlohmann::json& a : adapters) {
    AdapterConfig config;
    config.rank = a.value("rank", std::int64_t{0});
    config.lora_dtype = a.value("dtype", "");
    config.init = InitMethod::kaiming_zeros;  // overwritten by the load
    layer.add_adapter(a.value("name", ""), config, {});
  }
  io::load_adapters(layer, path, *prefix, {});
  return layer;
}

int run_export_peft(const ExportOptions& o) {
  if (o.files.size() != o.parameters.size())
    fail("export-peft pairs each adapter file with one --parameter: got " + std::to_string(o.files.size()) +
         " files and " + std::to_string(o.parameters.size()) + " parameters");
  std::list<Layer> layers;  // stable addresses for the targets
  std::vector<io::PeftTarget<Layer>> targets;
  for (std::size_t i = 0; i < o.files.size(); ++i) {
    std::string name;
    if (o.adapter) {
      name = *o.adapter;
    } else {
      const io::SafetensorsFile file(o.files[i]);
      const nlohmann::json adapters = metadata_json(file, "moelora.adapters");
      if (!adapters.is_array() || adapters.size() != 1 || !adapters[0].is_object())
        fail(o.files[i] + " does not hold exactly one adapter: name the one to export with --adapter");
      name = adapters[0].value("name", "");
    }
    layers.push_back(load_state_dict(o.files[i], name));
    targets.push_back({o.module, o.parameters[i], &layers.back(), name});
  }
  io::save_peft(targets, o.out_dir, {});
  std::printf("wrote %s (adapter_model.safetensors, adapter_config.json): %zu target parameter%s of %s\n",
              o.out_dir.c_str(), targets.size(), targets.size() == 1 ? "" : "s", o.module.c_str());
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"moelora: LoRA adapters on Mixture-of-Experts expert layers (CPU tools)"};
  app.require_subcommand(1);
  app.footer("Run `moelora SUBCOMMAND --help` for a subcommand's options and an example.");

  std::string inspect_target;
  CLI::App* inspect = app.add_subcommand("inspect", "show what a safetensors file or checkpoint directory holds");
  inspect->add_option("path", inspect_target, "a .safetensors file, a sharded adapter checkpoint, a PEFT directory "
                                              "or a directory of .safetensors files")->required();
  inspect->footer("Example:\n  moelora inspect adapter.safetensors");

  InitOptions init_o;
  CLI::App* init = app.add_subcommand("init", "initialise an adapter on a model's quantized expert weights");
  init->add_option("--weights", init_o.weights, "model checkpoint: a .safetensors file or a directory of them")->required();
  init->add_option("--pattern", init_o.pattern, "key of one expert's [out, in] weight, with {e} and optionally {L}; "
                                                "without {e}: one stacked [E, out, in] tensor")->required();
  init->add_option("--layer", init_o.layer, "layer index substituted for {L}");
  init->add_option("--experts", init_o.experts, "number of experts (default: until the first missing index)")
      ->check(CLI::PositiveNumber);
  init->add_option("--format", init_o.format, "weight format: " + std::string(quant::kQuantSpecSpellings))
      ->capture_default_str();
  init->add_option("--method", init_o.method, "init method: svdquant, loftq, svd_first, pissa, kaiming_zeros")
      ->capture_default_str();
  init->add_option("--rank", init_o.rank, "LoRA rank")->check(CLI::PositiveNumber)->capture_default_str();
  init->add_option("--scale", init_o.scale, "LoRA scale (plain multiplier)")->capture_default_str();
  init->add_option("--lora-dtype", init_o.lora_dtype, "factor dtype: bf16, fp16, fp32")->capture_default_str();
  init->add_option("--iterations", init_o.iterations, "loftq steps / svd_first refits (default: 5 / 1)");
  init->add_option("--adapter", init_o.adapter, "adapter name")->required();
  init->add_option("--output", init_o.output, "adapter state dict to write (.safetensors)")->required();
  init->add_option("--prefix", init_o.prefix, "state-dict key prefix (default: none)");
  init->footer("Example:\n  moelora init --weights model.safetensors --pattern "
               "'model.layers.{L}.mlp.experts.{e}.down_proj.weight' --layer 0 --format nvfp4 --method svdquant "
               "--rank 32 --adapter qad --output adapter.safetensors");

  std::string src, dst;
  std::int64_t tp = 1, ep = 1;
  std::optional<std::string> mode;
  CLI::App* reshard = app.add_subcommand("reshard", "rewrite a sharded adapter checkpoint for another TP/EP layout");
  reshard->add_option("src", src, "sharded checkpoint directory (with adapter.index.json)")->required();
  reshard->add_option("dst", dst, "destination directory (created)")->required();
  reshard->add_option("--tp", tp, "tensor-parallel ranks")->check(CLI::PositiveNumber)->required();
  reshard->add_option("--ep", ep, "expert-parallel ranks")->check(CLI::PositiveNumber)->required();
  reshard->add_option("--mode", mode, "tensor-parallel mode: column or row (default: the source's)");
  reshard->footer("Example:\n  moelora reshard ckpt-tp1-ep1 ckpt-tp2-ep4 --tp 2 --ep 4");

  ExportOptions export_o;
  CLI::App* export_peft = app.add_subcommand("export-peft", "write adapter state dicts as a Hugging Face PEFT adapter");
  export_peft->add_option("paths", export_o.files, "ADAPTER_FILE... OUT_DIR: adapter state dicts, one per "
                                                  "--parameter in the same order, then the PEFT output directory")
      ->required()->expected(2, 1 << 20);
  export_peft->add_option("--module", export_o.module, "key prefix of the experts module, "
                                                       "e.g. base_model.model.model.layers.0.mlp.experts")->required();
  export_peft->add_option("--parameter", export_o.parameters, "stacked expert parameter (repeat for several, in the "
                                                              "module's registration order)")->required();
  export_peft->add_option("--adapter", export_o.adapter, "adapter to export (default: the file's only one)");
  export_peft->footer("Example:\n  moelora export-peft adapter.safetensors peft_out --module "
                      "base_model.model.model.layers.0.mlp.experts --parameter down_proj");

  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    const int code = app.exit(e);
    return code == 0 ? 0 : 2;
  }
  try {
    if (inspect->parsed()) return run_inspect(inspect_target);
    if (init->parsed()) return run_init(init_o);
    if (reshard->parsed()) return run_reshard(src, dst, tp, ep, mode);
    export_o.out_dir = export_o.files.back();  // CLI11 fills a vector positional greedily: split it here
    export_o.files.pop_back();
    return run_export_peft(export_o);
  } catch (const Error& e) {
    std::fprintf(stderr, "%s\n", e.what());  // "moelora: ..."
    return 1;
  } catch (const std::exception& e) {  // file system and JSON errors
    std::fprintf(stderr, "moelora: %s\n", e.what());
    return 1;
  }
}
