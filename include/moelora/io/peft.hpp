/// \file
/// \brief Export to and import from the Hugging Face PEFT adapter format (PEFT >= 0.19.1, LoRA on
/// stacked 3-D expert parameters through `target_parameters`, i.e. PEFT's `ParamWrapper`).
///
/// A directory holds `adapter_model.safetensors` and `adapter_config.json`. For every target (one
/// stacked expert parameter such as `gate_up_proj` of the experts module at key prefix
/// `base_model.model.model.layers.0.mlp.experts`), with moelora's A `[E, r, in]`, B `[E, out, r]`
/// in the module's semantic in/out features, the layout is that of DESIGN.md §7:
///
/// - `lora_A.weight` `[E·r, in]`, row `e·r + k` = `A[e, k, :]` (A's bytes as they are);
/// - `lora_B.weight` `[out, r·E]`, column `k·E + e` = `B[e, :, k]` (rank-major, expert-minor).
///
/// PEFT's ParamWrapper (PEFT >= 0.19; checked by scripts/peft_check.py with PEFT 0.21.0 and
/// transformers 5.17.0) adds `ΔW[e] = scaling · B_e A_e` `[out, in]` with this one layout whether the
/// model stores the parameter `[E, out, in]` (as nn.Linear, e.g. Qwen3-MoE, Mixtral) or
/// `[E, in, out]` (e.g. GPT-OSS); for the latter it transposes ΔW[e] itself.
///
/// Keys: `{prefix}.lora_A.weight`, `{prefix}.lora_B.weight`. When n parameters of one module are
/// targeted, PEFT nests one ParamWrapper per parameter in the module's parameter registration
/// order, the first-registered innermost: the k-th registered (k = 0 … n−1) gets `.base_layer`
/// inserted n−1−k times (for gate_up_proj then down_proj: gate_up_proj's keys are
/// `{prefix}.base_layer.lora_A.weight`, down_proj's `{prefix}.lora_A.weight`). Targets of one module
/// must be given in that registration order.
///
/// `adapter_config.json`: `peft_type` LORA, `r`, `lora_alpha = scale · r` (PEFT's scaling is
/// `lora_alpha / r`), `target_modules: []`, `target_parameters` (`{module path}.{parameter}`, the
/// prefix without `base_model.model.`), `lora_dropout` 0, `bias` none, `use_rslora`/`use_dora`/
/// `fan_in_fan_out` false. PEFT keeps one r and one alpha per config here, so every target must
/// have the same rank and scale. Tensors keep the factor dtype. Import is strict like state dicts:
/// every problem in one ErrorCode::invalid_argument, and then no layer has changed. Import restores
/// the factors and the scale (`lora_alpha / r`, or `/ √r` with `use_rslora`), not enabled/trainable.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstring>
#include <filesystem>
#include <map>
#include <string>
#include <string_view>
#include <vector>

#include <nlohmann/json.hpp>

#include "moelora/core/error.hpp"
#include "moelora/io/safetensors.hpp"
#include "moelora/io/state_dict.hpp"
#include "moelora/io/text_file.hpp"

namespace moelora::io {

/// One targeted parameter: the experts module's key prefix (`base_model.model.` + its module path),
/// the parameter's name in that module, and the layer and adapter that hold its factors (in/out are
/// the module's semantic features, however the model stores the parameter).
template <class Layer>
struct PeftTarget {
  std::string module;
  std::string parameter;
  Layer* layer = nullptr;
  std::string adapter;
};

inline constexpr std::string_view kPeftModelPrefix = "base_model.model.";

namespace detail {

/// `lora_A`/`lora_B` key prefixes of every target: `.base_layer` once per later target of its module.
template <class Layer>
std::vector<std::string> peft_key_prefixes(const std::vector<PeftTarget<Layer>>& targets) {
  std::vector<std::string> prefixes;
  for (std::size_t i = 0; i < targets.size(); ++i) {
    std::string prefix = targets[i].module;
    for (std::size_t j = i + 1; j < targets.size(); ++j)
      if (targets[j].module == targets[i].module) prefix += ".base_layer";
    prefixes.push_back(prefix);
  }
  return prefixes;
}

/// PEFT's `lora_B` `[out, r·E]` (column `k·E + e` = `B[e, :, k]`) from moelora's B `[E, out, r]`
/// when `to_peft`, else back; `lora_A` is A's bytes unchanged.
inline void peft_permute_b(bool to_peft, std::int64_t experts, std::int64_t rank, std::int64_t out,
                           std::size_t element, const std::byte* src, std::byte* dst) {
  for (std::int64_t e = 0; e < experts; ++e)
    for (std::int64_t o = 0; o < out; ++o)
      for (std::int64_t k = 0; k < rank; ++k) {
        const auto ours = static_cast<std::size_t>((e * out + o) * rank + k);
        const auto theirs = static_cast<std::size_t>(o * rank * experts + k * experts + e);
        std::memcpy(dst + (to_peft ? theirs : ours) * element, src + (to_peft ? ours : theirs) * element, element);
      }
}

/// The shapes of PEFT's lora_A `[E·r, in]` and lora_B `[out, r·E]` for a target.
inline std::pair<std::vector<std::int64_t>, std::vector<std::int64_t>> peft_shapes(std::int64_t experts, std::int64_t rank,
                                                                                 std::int64_t in, std::int64_t out) {
  return {{experts * rank, in}, {out, rank * experts}};
}

/// The module path of a key prefix (without `base_model.model.`); a problem if it has no such start.
inline std::string peft_module_path(const std::string& module, std::vector<std::string>& problems) {
  if (module.rfind(kPeftModelPrefix, 0) != 0 || module.size() == kPeftModelPrefix.size()) {
    problems.push_back("the key prefix \"" + module + "\" does not start with \"" + std::string(kPeftModelPrefix) +
                       "\" followed by a module path");
    return module;
  }
  return module.substr(kPeftModelPrefix.size());
}

}  // namespace detail

/// Writes `dir/adapter_model.safetensors` and then `dir/adapter_config.json` (each atomically; `dir`
/// is created if needed) for `targets`, reading the factors on `stream`. Throws
/// ErrorCode::invalid_argument when the targets disagree in rank or scale, repeat a parameter, name
/// an unknown adapter or a key prefix not starting with `base_model.model.`.
template <class Layer>
void save_peft(const std::vector<PeftTarget<Layer>>& targets, const std::filesystem::path& dir,
               typename Layer::stream_type stream) {
  using Backend = typename Layer::backend_type;
  std::vector<std::string> problems;
  MOELORA_REQUIRE(!targets.empty(), ErrorCode::invalid_argument, "a PEFT export needs at least one target");
  const std::vector<std::string> prefixes = detail::peft_key_prefixes(targets);
  std::vector<std::vector<std::byte>> storage;
  storage.reserve(2 * targets.size());  // references into it stay valid below
  std::vector<TensorBytes> tensors;
  nlohmann::ordered_json target_parameters = nlohmann::ordered_json::array();
  std::int64_t rank = 0;
  double scale = 0.0;
  for (std::size_t t = 0; t < targets.size(); ++t) {
    const PeftTarget<Layer>& target = targets[t];
    const std::string path = detail::peft_module_path(target.module, problems) + "." + target.parameter;
    if (std::find(target_parameters.begin(), target_parameters.end(), path) != target_parameters.end())
      problems.push_back("the parameter " + path + " is targeted twice");
    target_parameters.push_back(path);
    if (!target.layer || !target.layer->has_adapter(target.adapter)) {
      problems.push_back("no adapter \"" + target.adapter + "\" for " + path);
      continue;
    }
    const AdapterView view = target.layer->adapter(target.adapter);
    if (t == 0) rank = view.config.rank, scale = view.config.scale;
    if (view.config.rank != rank || view.config.scale != scale)
      problems.push_back(path + " has rank " + std::to_string(view.config.rank) + " and scale " +
                         std::to_string(view.config.scale) + " but the first target rank " + std::to_string(rank) +
                         " and scale " + std::to_string(scale) + " (one adapter_config holds one r and lora_alpha)");
    // lora_A is A as it is; lora_B is B permuted (the buffers outlive `tensors`, which views them).
    std::vector<std::byte>& a = storage.emplace_back(view.a.bytes());
    Backend::copy_to_host(a.data(), view.a.data, a.size(), stream);
    std::vector<std::byte> b(view.b.bytes());
    Backend::copy_to_host(b.data(), view.b.data, b.size(), stream);
    std::vector<std::byte>& peft_b = storage.emplace_back(b.size());
    detail::peft_permute_b(true, view.b.shape[0], view.config.rank, view.b.shape[1], dtype_size(view.config.dtype),
                           b.data(), peft_b.data());
    const auto [shape_a, shape_b] =
        detail::peft_shapes(view.a.shape[0], view.config.rank, view.a.shape[2], view.b.shape[1]);
    const StDType dtype = st_dtype_of(view.config.dtype);
    tensors.push_back({prefixes[t] + ".lora_A.weight", dtype, shape_a, {a.data(), a.size()}});
    tensors.push_back({prefixes[t] + ".lora_B.weight", dtype, shape_b, {peft_b.data(), peft_b.size()}});
  }
  require_no_problems(dir.string(), problems, "export to");
  const nlohmann::ordered_json config = {{"peft_type", "LORA"},
                                         {"r", rank},
                                         {"lora_alpha", scale * static_cast<double>(rank)},
                                         {"target_modules", nlohmann::ordered_json::array()},
                                         {"target_parameters", target_parameters},
                                         {"lora_dropout", 0.0},
                                         {"bias", "none"},
                                         {"fan_in_fan_out", false},
                                         {"use_rslora", false},
                                         {"use_dora", false},
                                         {"init_lora_weights", true},
                                         {"inference_mode", true},
                                         {"modules_to_save", nullptr},
                                         {"task_type", nullptr}};
  std::filesystem::create_directories(dir);
  write_safetensors(dir / "adapter_model.safetensors", tensors, {{"format", "pt"}});
  write_text_file(dir / "adapter_config.json", config.dump(2) + "\n");
}

/// Reads a PEFT directory written for `targets` (see the file comment) into their layers' adapters:
/// factors and scale, copied on `stream`. Strict: a wrong peft_type, a missing target parameter, an
/// r that differs from an adapter's rank, a missing, unexpected or misshaped tensor are all listed
/// in one ErrorCode::invalid_argument, and then no layer has changed.
template <class Layer>
void load_peft(const std::vector<PeftTarget<Layer>>& targets, const std::filesystem::path& dir,
               typename Layer::stream_type stream) {
  using Backend = typename Layer::backend_type;
  std::vector<std::string> problems;
  nlohmann::json config = nlohmann::json::object();
  try {
    config = parse_json_or(read_text_file(dir / "adapter_config.json"), "adapter_config.json", problems);
  } catch (const Error& e) {
    problems.push_back(e.what());
  }
  const SafetensorsFile file(dir / "adapter_model.safetensors");
  if (!config.is_object()) config = nlohmann::json::object();
  if (config.value("peft_type", "") != "LORA") problems.push_back("peft_type is not LORA");
  const std::int64_t r = config.value("r", std::int64_t{0});
  const double alpha = config.value("lora_alpha", 0.0);
  const double scale = config.value("use_rslora", false) ? alpha / std::sqrt(static_cast<double>(r)) : alpha / static_cast<double>(r);
  if (r < 1 || !(std::isfinite(scale) && scale > 0.0))
    problems.push_back("r = " + std::to_string(r) + " and lora_alpha = " + std::to_string(alpha) + " give no valid scale");
  const std::vector<std::string> listed = config.value("target_parameters", std::vector<std::string>{});

  struct Pending {
    const PeftTarget<Layer>* target;
    std::vector<std::byte> a, b;
  };
  std::vector<Pending> pending;
  std::vector<std::string> expected_keys;
  const std::vector<std::string> prefixes = detail::peft_key_prefixes(targets);
  for (std::size_t t = 0; t < targets.size(); ++t) {
    const PeftTarget<Layer>& target = targets[t];
    const std::string path = detail::peft_module_path(target.module, problems) + "." + target.parameter;
    if (std::find(listed.begin(), listed.end(), path) == listed.end())
      problems.push_back("target_parameters does not list " + path);
    const std::string key_a = prefixes[t] + ".lora_A.weight", key_b = prefixes[t] + ".lora_B.weight";
    expected_keys.push_back(key_a);
    expected_keys.push_back(key_b);
    if (!target.layer || !target.layer->has_adapter(target.adapter)) {
      problems.push_back("no adapter \"" + target.adapter + "\" for " + path);
      continue;
    }
    const AdapterView view = target.layer->adapter(target.adapter);
    if (view.config.rank != r)
      problems.push_back("r = " + std::to_string(r) + " but adapter \"" + target.adapter + "\" for " + path +
                         " has rank " + std::to_string(view.config.rank));
    const auto [shape_a, shape_b] =
        detail::peft_shapes(view.a.shape[0], view.config.rank, view.a.shape[2], view.b.shape[1]);
    const TensorBytes* found[2] = {nullptr, nullptr};
    for (int i = 0; i < 2; ++i) {
      const std::string& key = i == 0 ? key_a : key_b;
      const auto& shape = i == 0 ? shape_a : shape_b;
      const auto it = std::find_if(file.tensors().begin(), file.tensors().end(), [&](const TensorBytes& x) { return x.name == key; });
      if (it == file.tensors().end())
        problems.push_back("missing " + key);
      else if (it->shape != shape || it->dtype != st_dtype_of(view.config.dtype))
        problems.push_back(misfit(*it, st_dtype_of(view.config.dtype), shape, "adapter \"" + target.adapter + "\""));
      else
        found[i] = &*it;
    }
    if (!found[0] || !found[1]) continue;
    Pending p{&target, std::vector<std::byte>(found[0]->bytes.begin(), found[0]->bytes.end()),
              std::vector<std::byte>(view.b.bytes())};
    detail::peft_permute_b(false, view.b.shape[0], view.config.rank, view.b.shape[1], dtype_size(view.config.dtype),
                           found[1]->bytes.data(), p.b.data());
    pending.push_back(std::move(p));
  }
  for (const TensorBytes& t : file.tensors())
    if (std::find(expected_keys.begin(), expected_keys.end(), t.name) == expected_keys.end())
      problems.push_back("unexpected " + t.name);

  require_no_problems(dir.string(), problems);
  for (const Pending& p : pending) {
    const AdapterView view = p.target->layer->adapter(p.target->adapter);
    Backend::copy_from_host(view.a.data, p.a.data(), p.a.size(), stream);
    Backend::copy_from_host(view.b.data, p.b.data(), p.b.size(), stream);
    p.target->layer->set_scale(p.target->adapter, scale);
  }
}

}  // namespace moelora::io
