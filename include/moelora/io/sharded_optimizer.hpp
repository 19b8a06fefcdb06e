/// \file
/// \brief Sharded optimizer state: each rank's AdamW state per global expert, sliced like its
/// factors, in the `optimizer/` folder of a sharded adapter checkpoint; loads into any even TP/EP
/// layout, bit for bit.
///
/// `DIR/optimizer/` is itself a sharded checkpoint (io/sharded.hpp: rank files
/// `adapter-tp{t}-ep{e}.safetensors`, `moelora.slices` records, `adapter.index.json` written last by
/// `write_sharded_optimizer_index`) whose keys are the state fields of the factors' sharded keys
/// (`{factor}{g}` = `{prefix}lora_a_{adapter}.weight{g}` or `…lora_b_…`):
/// - `{factor}{g}.exp_avg`, `{factor}{g}.exp_avg_sq`, and for bf16/fp16 factors `{factor}{g}.master`:
///   F32, the rank's slice of global expert g's moment or master weights, cut exactly as the factor
///   (a replicated factor's state is written by tp_rank 0 only);
/// - in the file of rank (tp 0, ep 0) only: `{factor}.step` (I64 `[]`, the factor's step count, the
///   same on every rank) and the optimizer's counters `{prefix}optimizer.{step, skipped,
///   growth_tracker, loss_scale}` as in io/optimizer_state.hpp.
/// Every rank file also records `moelora.optimizer` (the settings) and `moelora.optimizer.adapters`.
/// Loading is as strict as `load_optimizer`, plus the checks of `load_sharded` on the layout.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <optional>
#include <string>
#include <string_view>
#include <tuple>
#include <vector>

#include <nlohmann/json.hpp>

#include "moelora/io/optimizer_state.hpp"
#include "moelora/io/sharded.hpp"

namespace moelora::io {

/// The folder of the optimizer state inside a sharded checkpoint directory.
inline constexpr std::string_view kOptimizerFolder = "optimizer";

/// The sharded key of field `field` of factor `which` of adapter `name`, global expert `g`.
inline std::string sharded_optimizer_key(std::string_view prefix, char which, std::string_view name, std::int64_t g,
                                         std::string_view field) {
  return optimizer_key(sharded_key(prefix, which, name, g), field);
}

/// Writes this rank's optimizer state for `layer`'s adapters (group `group`) into
/// `dir/optimizer/adapter-tp{t}-ep{e}.safetensors` (atomically; folders created as needed), reading
/// it on `stream`. Call `write_sharded_optimizer_index(dir)` once after every rank has saved.
template <class Optimizer, class Layer>
void save_sharded_optimizer(Optimizer& optimizer, Layer& layer, const ShardLayout& layout,
                            const std::filesystem::path& dir, std::string_view prefix,
                            typename Layer::stream_type stream, int group = 0) {
  using Backend = typename Layer::backend_type;
  using policy::Factor;
  const GlobalSizes sizes = global_sizes(layer, layout);
  const bool first_rank = layout.tp_rank == 0 && layout.ep_rank == 0;
  detail::ShardContents contents;
  nlohmann::ordered_json adapters = nlohmann::ordered_json::array(), entries = nlohmann::ordered_json::array();
  for (const std::string& name : layer.adapter_names()) {
    const AdapterView view = layer.adapter(name);
    adapters.push_back(adapter_settings(name, view.config));
    const std::optional<AdamWAdapterState> state = current_state(optimizer, view, group);
    entries.push_back(optimizer_adapter_entry(view, state.has_value()));
    if (!state) continue;
    for (const auto& [which, f, factor] : {std::tuple{'a', Factor::a, state->a}, std::tuple{'b', Factor::b, state->b}}) {
      if (first_rank) {
        contents.storage.emplace_back(sizeof(std::int64_t));
        Backend::copy_to_host(contents.storage.back().data(), factor.step, sizeof(std::int64_t), stream);
        contents.tensors.push_back({optimizer_key(factor_key(prefix, which, name), kStep), StDType::I64, {}, contents.storage.back()});
      }
      const LocalPart part = local_part(layout, sizes, f, view.config.rank);
      if (part.axis == policy::TpAxis::none && layout.tp_rank != 0) continue;  // replicated: tp_rank 0 writes it
      for (const auto& [field, t] : state_fields(factor)) {
        if (!t.data) continue;
        std::vector<std::byte> all(t.bytes());
        Backend::copy_to_host(all.data(), t.data, all.size(), stream);
        const std::size_t per_expert = all.size() / static_cast<std::size_t>(layer.num_experts());
        for (std::int64_t i = 0; i < layer.num_experts(); ++i) {
          const auto begin = all.begin() + static_cast<std::ptrdiff_t>(static_cast<std::size_t>(i) * per_expert);
          contents.add(sharded_optimizer_key(prefix, which, name, layout.ep_rank * layer.num_experts() + i, field),
                       StDType::F32, global_factor_shape(sizes, f, view.config.rank), part,
                       std::vector<std::byte>(begin, begin + static_cast<std::ptrdiff_t>(per_expert)));
        }
      }
    }
  }
  if (first_rank) add_counters(optimizer.counters(stream), prefix, contents.storage, contents.tensors);
  const std::filesystem::path folder = dir / kOptimizerFolder;
  std::filesystem::create_directories(folder);
  detail::write_shard(folder, layout, sizes, prefix, adapters, contents,
                      {{std::string(kOptimizerSettingsKey), optimizer_settings(optimizer.config()).dump()},
                       {std::string(kOptimizerAdaptersKey), entries.dump()}});
}

/// Writes `dir/optimizer/adapter.index.json` once every rank's `save_sharded_optimizer` returned
/// (`write_sharded_index` on the folder: its checks, its errors).
inline void write_sharded_optimizer_index(const std::filesystem::path& dir) { write_sharded_index(dir / kOptimizerFolder); }

/// Loads the sharded optimizer state of `dir/optimizer` into `optimizer` for `layer`, the rank
/// `layout` of a grid that may differ from the one that saved (state slices cut and reassembled
/// like the factors'), for group `group`; strictly (see the file comment). Copies on `stream`.
template <class Optimizer, class Layer>
void load_sharded_optimizer(Optimizer& optimizer, Layer& layer, const ShardLayout& layout,
                            const std::filesystem::path& dir, std::string_view prefix,
                            typename Layer::stream_type stream, SettingsOnLoad on_settings = SettingsOnLoad::must_match,
                            int group = 0) {
  using policy::Factor;
  layout.validate();
  const std::filesystem::path folder = dir / kOptimizerFolder;
  ShardedCheckpoint checkpoint(folder);
  const GlobalSizes& sizes = checkpoint.sizes();
  std::vector<std::string> problems = split_problems(sizes, layout.grid());
  if (checkpoint.prefix() != prefix)
    problems.push_back("its keys use the prefix \"" + checkpoint.prefix() + "\", not \"" + std::string(prefix) + "\"");
  if (problems.empty() && layer.num_experts() * layout.ep != sizes.experts)
    problems.push_back("the layer holds " + std::to_string(layer.num_experts()) + " experts but rank ep " +
                       std::to_string(layout.ep_rank) + "/" + std::to_string(layout.ep) + " of the checkpoint's " +
                       std::to_string(sizes.experts) + " holds " + std::to_string(sizes.experts / layout.ep));
  require_no_problems(folder.string(), problems);

  // Settings, the adapter list and the scalars live in the file of rank (tp 0, ep 0).
  const SafetensorsFile first(folder / shard_file_name(0, 0));
  const auto scalars = tensors_by_name(first);
  const AdamWConfig config =
      settings_for_load(metadata_json(first, kOptimizerSettingsKey, problems), optimizer.config(), on_settings, problems);
  const nlohmann::json entries = metadata_json(first, kOptimizerAdaptersKey, problems);

  std::vector<std::vector<std::byte>> staging;  // the gathered slices (moving a vector keeps its bytes in place)
  std::vector<std::string> expected;
  const std::vector<LoadedState> loaded = read_states(layer, entries, problems, [&](const AdapterView& view, LoadedState& l) {
    bool complete = true;
    const std::string name(view.name);
    for (const auto& [which, f, factor] : {std::tuple{'a', Factor::a, view.a}, std::tuple{'b', Factor::b, view.b}}) {
      const std::int64_t rank = view.config.rank;
      const LocalPart part = local_part(layout, sizes, f, rank);
      if (part.shape()[0] * part.shape()[1] * layer.num_experts() != factor.numel()) {
        problems.push_back("adapter \"" + name + "\"'s factor " + which + " has " + std::to_string(factor.numel()) +
                           " elements, not the layout's slice of the checkpoint's layer");
        complete = false;
        continue;
      }
      const std::size_t factor_index = f == Factor::a ? 0 : 1;
      expected.push_back(optimizer_key(factor_key(prefix, which, name), kStep));
      const TensorBytes* step = fitting(scalars, expected.back(), StDType::I64, {}, problems);
      const std::optional<std::int64_t> steps = step ? step_count(*step, expected.back(), problems) : std::nullopt;
      if (steps) l.steps[factor_index] = *steps;
      complete &= steps.has_value();
      for (const std::string_view field : {kExpAvg, kExpAvgSq, kMaster}) {
        const std::size_t slot = 3 * factor_index + static_cast<std::size_t>(field == kExpAvg ? 0 : (field == kExpAvgSq ? 1 : 2));
        if (field == kMaster && factor.dtype == DType::fp32) continue;
        std::vector<std::byte>& bytes = staging.emplace_back(static_cast<std::size_t>(factor.numel()) * sizeof(float));
        l.fields[slot] = bytes;
        const std::size_t per_expert = bytes.size() / static_cast<std::size_t>(layer.num_experts());
        for (std::int64_t g = 0; g < sizes.experts; ++g) {
          const std::string key = sharded_optimizer_key(prefix, which, name, g, field);
          expected.push_back(key);
          const std::int64_t e = g - layout.ep_rank * layer.num_experts();
          if (e < 0 || e >= layer.num_experts()) {  // another rank's expert: only its presence is checked
            if (checkpoint.weight_map().count(key) == 0) problems.push_back("missing " + key);
            continue;
          }
          complete &= checkpoint.gather(key, StDType::F32, global_factor_shape(sizes, f, rank), part,
                                        bytes.data() + static_cast<std::size_t>(e) * per_expert, problems);
        }
      }
    }
    return complete;
  });
  const AdamWCounters counters = read_counters(scalars, prefix, expected, problems);
  std::sort(expected.begin(), expected.end());
  for (const auto& [key, files] : checkpoint.weight_map())
    if (!std::binary_search(expected.begin(), expected.end(), key)) problems.push_back("unexpected " + key);
  require_no_problems(folder.string(), problems);
  install_states(optimizer, layer, loaded, config, on_settings, counters, stream, group);
}

/// `save_sharded_optimizer` with a live layer's own layout (`shard_layout(layer)`).
template <class Optimizer, class Layer>
void save_sharded_optimizer(Optimizer& optimizer, Layer& layer, const std::filesystem::path& dir,
                            std::string_view prefix, typename Layer::stream_type stream, int group = 0) {
  save_sharded_optimizer(optimizer, layer, shard_layout(layer), dir, prefix, stream, group);
}

/// `load_sharded_optimizer` into a live layer, with the layer's own layout (`shard_layout(layer)`).
template <class Optimizer, class Layer>
void load_sharded_optimizer(Optimizer& optimizer, Layer& layer, const std::filesystem::path& dir,
                            std::string_view prefix, typename Layer::stream_type stream,
                            SettingsOnLoad on_settings = SettingsOnLoad::must_match, int group = 0) {
  load_sharded_optimizer(optimizer, layer, shard_layout(layer), dir, prefix, stream, on_settings, group);
}

}  // namespace moelora::io
