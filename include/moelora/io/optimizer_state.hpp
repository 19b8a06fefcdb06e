/// \file
/// \brief Optimizer state files: one layer's AdamW state (moments, master weights, step counts) and
/// the optimizer's counters in a safetensors file beside the adapter state dict, loaded strictly.
///
/// Keys, for every adapter that has state (`{factor}` = `{prefix}lora_a_{adapter}.weight` or
/// `{prefix}lora_b_{adapter}.weight`, the state-dict key of the factor):
/// - `{factor}.exp_avg`, `{factor}.exp_avg_sq`: F32, the factor's shape (`[E, r, in]`, `[E, out, r]`);
/// - `{factor}.master`: F32, the factor's shape, for bf16 and fp16 factors only;
/// - `{factor}.step`: I64 `[]`, the factor's step count;
/// and once: `{prefix}optimizer.step`, `{prefix}optimizer.skipped`, `{prefix}optimizer.growth_tracker`
/// (I64 `[]`) and `{prefix}optimizer.loss_scale` (F32 `[]`), the optimizer's counters.
/// Metadata (JSON strings): `format` = `pt`; `moelora.layer` {experts, in, out};
/// `moelora.optimizer`, the settings (`optimizer_settings`); `moelora.optimizer.adapters`, one entry
/// {name, rank, dtype, state} per adapter of the layer, `state` telling whether it has state.
///
/// Loading is strict: the layer must hold exactly the file's adapters with their ranks and dtypes,
/// every tensor of every stated adapter and every counter must be there with its dtype and shape,
/// no other tensor may be, and the settings must equal the optimizer's unless the caller takes the
/// file's (`SettingsOnLoad::from_file`). Every problem is listed in one ErrorCode::invalid_argument,
/// and then neither the layer nor the optimizer has changed. Adapters the file lists without state
/// lose any state they had. Writes are atomic (temporary file + rename).
#pragma once

#include <algorithm>
#include <array>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <map>
#include <optional>
#include <span>
#include <utility>
#include <string>
#include <string_view>
#include <vector>

#include <nlohmann/json.hpp>

#include "moelora/core/dtype.hpp"
#include "moelora/core/error.hpp"
#include "moelora/grouped_lora.hpp"
#include "moelora/io/safetensors.hpp"
#include "moelora/io/state_dict.hpp"
#include "moelora/optim/adamw.hpp"
#include "moelora/optim/adamw_math.hpp"

namespace moelora::io {

/// Metadata keys of the optimizer's settings and of its per-adapter list.
inline constexpr std::string_view kOptimizerSettingsKey = "moelora.optimizer";
inline constexpr std::string_view kOptimizerAdaptersKey = "moelora.optimizer.adapters";

/// Fields of a factor's state.
inline constexpr std::string_view kExpAvg = "exp_avg", kExpAvgSq = "exp_avg_sq", kMaster = "master", kStep = "step";

/// The key of field `field` of the state of the factor whose state-dict key is `factor`.
inline std::string optimizer_key(std::string_view factor, std::string_view field) {
  return std::string(factor) + "." + std::string(field);
}

/// The key of optimizer counter `counter` ("step", "skipped", "growth_tracker", "loss_scale").
inline std::string optimizer_counter_key(std::string_view prefix, std::string_view counter) {
  return std::string(prefix) + "optimizer." + std::string(counter);
}

/// A factor's state tensors with their field names: exp_avg, exp_avg_sq, master (null data for an
/// fp32 factor).
inline std::array<std::pair<std::string_view, TensorRef>, 3> state_fields(const AdamWFactorState& f) {
  return {{{kExpAvg, f.m}, {kExpAvgSq, f.v}, {kMaster, f.master}}};
}

/// What a load does with the file's settings: require them to equal the optimizer's, or take them.
enum class SettingsOnLoad : std::uint8_t { must_match, from_file };

/// The settings of `c` as recorded in `moelora.optimizer`: type, lr, betas, eps, weight decay,
/// max_grad_norm, skip_nonfinite, schedule {kind, warmup_steps, total_steps, min_lr_ratio},
/// loss_scaling {enabled, init_scale, growth_factor, backoff_factor, growth_interval}. Floats are
/// stored exactly (as the doubles they convert to).
inline nlohmann::ordered_json optimizer_settings(const AdamWConfig& c) {
  return {{"type", "adamw"},
          {"lr", c.lr},
          {"beta1", c.beta1},
          {"beta2", c.beta2},
          {"eps", c.eps},
          {"weight_decay", c.weight_decay},
          {"max_grad_norm", c.max_grad_norm},
          {"skip_nonfinite", c.skip_nonfinite},
          {"schedule",
           {{"kind", schedule_kind_name(c.schedule.kind)},
            {"warmup_steps", c.schedule.warmup_steps},
            {"total_steps", c.schedule.total_steps},
            {"min_lr_ratio", c.schedule.min_lr_ratio}}},
          {"loss_scaling",
           {{"enabled", c.loss_scaling.enabled},
            {"init_scale", c.loss_scaling.init_scale},
            {"growth_factor", c.loss_scaling.growth_factor},
            {"backoff_factor", c.loss_scaling.backoff_factor},
            {"growth_interval", c.loss_scaling.growth_interval}}}};
}

/// The settings a load uses: `ours` when the file's (`recorded`, the parsed `moelora.optimizer`)
/// equal them, or the file's with `SettingsOnLoad::from_file`. A difference under `must_match`
/// (naming every differing field with both values), a malformed record or invalid settings are
/// appended to `problems`.
inline AdamWConfig settings_for_load(const nlohmann::json& recorded, const AdamWConfig& ours, SettingsOnLoad on_settings,
                                     std::vector<std::string>& problems) {
  const nlohmann::json want = nlohmann::json(optimizer_settings(ours)).flatten();
  const nlohmann::json got = recorded.is_object() ? recorded.flatten() : nlohmann::json::object();
  std::vector<std::string> differences, malformed;
  for (const auto& [path, value] : want.items()) {
    if (!got.contains(path)) malformed.push_back("has no " + path);
    else if (got.at(path).type() != value.type() && !(got.at(path).is_number() && value.is_number()))
      malformed.push_back("has " + path + " = " + got.at(path).dump() + " of the wrong type");
    else if (got.at(path) != value)
      differences.push_back(path + " = " + got.at(path).dump() + " in the file but " + value.dump() + " in the optimizer");
  }
  for (const auto& [path, value] : got.items())
    if (!want.contains(path)) malformed.push_back("has the unknown setting " + path);
  for (const std::string& m : malformed) problems.push_back("the optimizer settings " + m);
  if (!malformed.empty()) return ours;
  if (on_settings == SettingsOnLoad::must_match) {
    if (!differences.empty()) {
      std::string list;
      for (const std::string& d : differences) list += (list.empty() ? "" : ", ") + d;
      problems.push_back("the file's optimizer settings differ (" + list +
                         "); load with SettingsOnLoad::from_file to take the file's");
    }
    return ours;
  }
  AdamWConfig c;
  try {
    c.lr = recorded.at("lr").get<float>();
    c.beta1 = recorded.at("beta1").get<float>();
    c.beta2 = recorded.at("beta2").get<float>();
    c.eps = recorded.at("eps").get<float>();
    c.weight_decay = recorded.at("weight_decay").get<float>();
    c.max_grad_norm = recorded.at("max_grad_norm").get<float>();
    c.skip_nonfinite = recorded.at("skip_nonfinite").get<bool>();
    const nlohmann::json& s = recorded.at("schedule");
    c.schedule = {parse_schedule_kind(s.at("kind").get<std::string>()), s.at("warmup_steps").get<std::int64_t>(),
                  s.at("total_steps").get<std::int64_t>(), s.at("min_lr_ratio").get<float>()};
    const nlohmann::json& l = recorded.at("loss_scaling");
    c.loss_scaling = {l.at("enabled").get<bool>(), l.at("init_scale").get<float>(), l.at("growth_factor").get<float>(),
                      l.at("backoff_factor").get<float>(), l.at("growth_interval").get<std::int64_t>()};
    validate_adamw_config(c);
  } catch (const Error& e) {
    problems.push_back(std::string("the file's optimizer settings are not valid: ") + e.what());
  } catch (const nlohmann::json::exception& e) {
    problems.push_back(std::string("the file's optimizer settings are malformed: ") + e.what());
  }
  return c;
}

/// The file's tensors by name.
inline std::map<std::string, const TensorBytes*, std::less<>> tensors_by_name(const SafetensorsFile& file) {
  std::map<std::string, const TensorBytes*, std::less<>> map;
  for (const TensorBytes& t : file.tensors()) map.emplace(t.name, &t);
  return map;
}

/// The tensor `key` of `tensors` if it has `dtype` and `shape`; otherwise null and a problem
/// ("missing KEY" or what does not fit).
inline const TensorBytes* fitting(const std::map<std::string, const TensorBytes*, std::less<>>& tensors,
                                  const std::string& key, StDType dtype, const std::vector<std::int64_t>& shape,
                                  std::vector<std::string>& problems, std::string_view who = "the optimizer") {
  const auto it = tensors.find(key);
  if (it == tensors.end()) {
    problems.push_back("missing " + key);
    return nullptr;
  }
  if (it->second->dtype != dtype || it->second->shape != shape) {
    problems.push_back(misfit(*it->second, dtype, shape, who));
    return nullptr;
  }
  return it->second;
}

/// One scalar of a file (a 0-d tensor's bytes) as T.
template <class T>
T scalar_of(const TensorBytes& t) {
  T value;
  std::memcpy(&value, t.bytes.data(), sizeof(T));
  return value;
}

/// One counter as a 0-d tensor: its name (key suffix), dtype (I64, or F32 for the loss scale) and
/// where its value lives.
struct CounterField {
  std::string_view name;
  StDType dtype;
  void* value;
};

/// The fields of `counters`, in file order.
inline std::array<CounterField, 4> counter_fields(AdamWCounters& counters) {
  return {{{"step", StDType::I64, &counters.step},
           {"skipped", StDType::I64, &counters.skipped},
           {"growth_tracker", StDType::I64, &counters.growth_tracker},
           {"loss_scale", StDType::F32, &counters.loss_scale}}};
}

/// Appends `counters` as the 0-d counter tensors to `tensors` (their bytes kept in `storage`).
inline void add_counters(AdamWCounters counters, std::string_view prefix, std::vector<std::vector<std::byte>>& storage,
                         std::vector<TensorBytes>& tensors) {
  for (const CounterField& f : counter_fields(counters)) {
    const auto* bytes = static_cast<const std::byte*>(f.value);
    storage.emplace_back(bytes, bytes + st_dtype_size(f.dtype));
    tensors.push_back({optimizer_counter_key(prefix, f.name), f.dtype, {}, storage.back()});
  }
}

/// The counters recorded in `tensors`, checked (present, 0-d, non-negative, a finite positive loss
/// scale); problems are appended and their expected keys to `expected`.
inline AdamWCounters read_counters(const std::map<std::string, const TensorBytes*, std::less<>>& tensors,
                                   std::string_view prefix, std::vector<std::string>& expected,
                                   std::vector<std::string>& problems) {
  AdamWCounters counters;
  for (const CounterField& f : counter_fields(counters)) {
    const std::string key = optimizer_counter_key(prefix, f.name);
    expected.push_back(key);
    const TensorBytes* t = fitting(tensors, key, f.dtype, {}, problems);
    if (!t) continue;
    std::memcpy(f.value, t->bytes.data(), t->bytes.size());
  }
  if (counters.step < 0 || counters.skipped < 0 || counters.growth_tracker < 0)
    problems.push_back("the optimizer counters hold a negative count");
  if (!(std::isfinite(counters.loss_scale) && counters.loss_scale > 0.0f))
    problems.push_back(optimizer_counter_key(prefix, "loss_scale") + " is not a finite positive scale");
  return counters;
}

/// One adapter's entry in `moelora.optimizer.adapters`.
inline nlohmann::ordered_json optimizer_adapter_entry(const AdapterView& view, bool has_state) {
  return {{"name", view.name}, {"rank", view.config.rank}, {"dtype", dtype_name(view.config.dtype)}, {"state", has_state}};
}

/// The entry of adapter `view` in a `moelora.optimizer.adapters` list, checked against it; nothing
/// (and a problem) when there is none or its rank or dtype differ.
inline std::optional<bool> stated(const nlohmann::json& entries, const AdapterView& view,
                                  std::vector<std::string>& problems) {
  const auto entry = std::find_if(entries.begin(), entries.end(), [&](const nlohmann::json& e) {
    return e.is_object() && e.value("name", "") == view.name;
  });
  const std::string name(view.name);
  if (entry == entries.end()) {
    problems.push_back("no optimizer entry for adapter \"" + name + "\"");
    return std::nullopt;
  }
  if (entry->value("rank", std::int64_t{0}) != view.config.rank || entry->value("dtype", "") != dtype_name(view.config.dtype)) {
    problems.push_back("adapter \"" + name + "\" is " + entry->value("dtype", "?") + " rank " +
                       std::to_string(entry->value("rank", std::int64_t{0})) + " in the file but " +
                       std::string(dtype_name(view.config.dtype)) + " rank " + std::to_string(view.config.rank) +
                       " in the layer");
    return std::nullopt;
  }
  return entry->value("state", false);
}

/// Problems with entries of `entries` whose adapter the layer (`names`) does not hold.
inline void unexpected_adapters(const nlohmann::json& entries, const std::vector<std::string>& names,
                                std::vector<std::string>& problems) {
  for (const nlohmann::json& e : entries)
    if (!e.is_object() || std::find(names.begin(), names.end(), e.value("name", "")) == names.end())
      problems.push_back("unexpected adapter \"" + (e.is_object() ? e.value("name", "") : e.dump()) + "\"");
}

/// The adapter state of `view` in `optimizer` (group `group`) if it belongs to this adapter instance.
template <class Optimizer>
std::optional<AdamWAdapterState> current_state(Optimizer& optimizer, const AdapterView& view, int group) {
  std::optional<AdamWAdapterState> state = optimizer.state(view.name, group);
  if (state && state->adapter_id != view.id) state.reset();  // a stale state the next step drops
  return state;
}

/// Parses metadata entry `key` of `file` as JSON; a problem when it is absent or not JSON.
inline nlohmann::json metadata_json(const SafetensorsFile& file, std::string_view key, std::vector<std::string>& problems) {
  const auto it = file.metadata().find(std::string(key));
  if (it == file.metadata().end()) {
    problems.push_back("no " + std::string(key) + " metadata");
    return nlohmann::json();
  }
  return parse_json_or(it->second, std::string(key) + " metadata", problems);
}

/// The step count `t` holds (key `key`), or nothing and a problem when it is negative.
inline std::optional<std::int64_t> step_count(const TensorBytes& t, const std::string& key,
                                              std::vector<std::string>& problems) {
  const auto steps = scalar_of<std::int64_t>(t);
  if (steps >= 0) return steps;
  problems.push_back(key + " holds a negative step count");
  return std::nullopt;
}

/// One adapter's state as a load found it, to be installed once everything was checked.
struct LoadedState {
  std::string name;
  bool has_state = false;
  std::array<std::span<const std::byte>, 6> fields{};  ///< A: exp_avg, exp_avg_sq, master; then B's (empty: none)
  std::array<std::int64_t, 2> steps{};                 ///< A's and B's step counts
};

/// For every adapter of `layer`: its entry in `entries` (checked by `stated`); for one with state,
/// `read(view, loaded)` fills the fields and step counts and returns false when something was
/// missing (having named it in `problems`). Entries for adapters the layer lacks are problems too.
/// Returns what can be installed once `problems` is empty.
template <class Layer, class Read>
std::vector<LoadedState> read_states(Layer& layer, const nlohmann::json& entries, std::vector<std::string>& problems,
                                     Read&& read) {
  std::vector<LoadedState> loaded;
  if (!entries.is_array()) {
    if (!entries.is_null()) problems.push_back(std::string(kOptimizerAdaptersKey) + " is not a list");
    return loaded;
  }
  const std::vector<std::string> names = layer.adapter_names();
  for (const std::string& name : names) {
    const AdapterView view = layer.adapter(name);
    const std::optional<bool> has_state = stated(entries, view, problems);
    if (!has_state) continue;
    LoadedState l{name, *has_state, {}, {}};
    if (!*has_state || read(view, l)) loaded.push_back(std::move(l));
  }
  unexpected_adapters(entries, names, problems);
  return loaded;
}

/// Installs checked state into `optimizer` for `layer`'s adapters (group `group`): the settings
/// when `on_settings` takes the file's, each adapter's state (or none), the counters; on `stream`.
template <class Optimizer, class Layer>
void install_states(Optimizer& optimizer, Layer& layer, const std::vector<LoadedState>& loaded, const AdamWConfig& config,
                    SettingsOnLoad on_settings, const AdamWCounters& counters,
                    typename Layer::stream_type stream, int group) {
  using Backend = typename Layer::backend_type;
  if (on_settings == SettingsOnLoad::from_file) optimizer.set_config(config);
  for (const LoadedState& l : loaded) {
    if (!l.has_state) {
      optimizer.clear_state(l.name, group);
      continue;
    }
    const AdamWAdapterState state = optimizer.reset_state(layer.adapter(l.name), stream, group);
    std::size_t i = 0, f = 0;
    for (const AdamWFactorState& factor : {state.a, state.b}) {
      for (const TensorRef& dst : {factor.m, factor.v, factor.master}) {
        const std::span<const std::byte> src = l.fields[i++];
        if (dst.data) Backend::copy_from_host(dst.data, src.data(), src.size(), stream);
      }
      Backend::copy_from_host(factor.step, &l.steps[f++], sizeof(std::int64_t), stream);
    }
  }
  optimizer.set_counters(counters, stream);
}

/// Writes the state of `layer`'s adapters in `optimizer` (group `group`) and the optimizer's
/// counters to `path` (atomically), reading them on `stream` (synchronised).
template <class Optimizer, class Layer>
void save_optimizer(Optimizer& optimizer, Layer& layer, const std::filesystem::path& path, std::string_view prefix,
                    typename Layer::stream_type stream, int group = 0) {
  using Backend = typename Layer::backend_type;
  std::vector<std::vector<std::byte>> storage;
  std::vector<TensorBytes> tensors;
  nlohmann::ordered_json adapters = nlohmann::ordered_json::array();
  const auto add = [&](std::string key, StDType dtype, std::vector<std::int64_t> shape, const void* src, std::size_t bytes) {
    storage.emplace_back(bytes);
    Backend::copy_to_host(storage.back().data(), src, bytes, stream);
    tensors.push_back({std::move(key), dtype, std::move(shape), storage.back()});
  };
  for (const std::string& name : layer.adapter_names()) {
    const AdapterView view = layer.adapter(name);
    const std::optional<AdamWAdapterState> state = current_state(optimizer, view, group);
    adapters.push_back(optimizer_adapter_entry(view, state.has_value()));
    if (!state) continue;
    for (const auto& [which, factor] : {std::pair{'a', state->a}, std::pair{'b', state->b}}) {
      const std::string key = factor_key(prefix, which, name);
      for (const auto& [field, t] : state_fields(factor))
        if (t.data) add(optimizer_key(key, field), StDType::F32, st_shape(t.shape), t.data, t.bytes());
      add(optimizer_key(key, kStep), StDType::I64, {}, factor.step, sizeof(std::int64_t));
    }
  }
  add_counters(optimizer.counters(stream), prefix, storage, tensors);
  const nlohmann::ordered_json sizes = {
      {"experts", layer.num_experts()}, {"in", layer.in_features()}, {"out", layer.out_features()}};
  write_safetensors(path, tensors,
                    {{"format", "pt"},
                     {"moelora.layer", sizes.dump()},
                     {std::string(kOptimizerSettingsKey), optimizer_settings(optimizer.config()).dump()},
                     {std::string(kOptimizerAdaptersKey), adapters.dump()}});
}

/// Loads the optimizer state in `path` into `optimizer` for `layer`'s adapters (group `group`):
/// strictly (see the file comment); copies on `stream`. With `SettingsOnLoad::from_file` the
/// optimizer takes the file's settings.
template <class Optimizer, class Layer>
void load_optimizer(Optimizer& optimizer, Layer& layer, const std::filesystem::path& path, std::string_view prefix,
                    typename Layer::stream_type stream, SettingsOnLoad on_settings = SettingsOnLoad::must_match,
                    int group = 0) {
  const SafetensorsFile file(path);
  const auto tensors = tensors_by_name(file);
  std::vector<std::string> problems, expected;
  const nlohmann::json layer_sizes = metadata_json(file, "moelora.layer", problems);
  const nlohmann::json want_sizes = {{"experts", layer.num_experts()}, {"in", layer.in_features()}, {"out", layer.out_features()}};
  if (layer_sizes.is_object() && layer_sizes != want_sizes)
    problems.push_back("the file is for a layer of " + layer_sizes.dump() + " but the layer is " + want_sizes.dump());
  const AdamWConfig config =
      settings_for_load(metadata_json(file, kOptimizerSettingsKey, problems), optimizer.config(), on_settings, problems);
  const nlohmann::json entries = metadata_json(file, kOptimizerAdaptersKey, problems);

  const std::vector<LoadedState> loaded = read_states(layer, entries, problems, [&](const AdapterView& view, LoadedState& l) {
    bool complete = true;
    std::size_t i = 0, f = 0;
    for (const TensorRef& factor : {view.a, view.b}) {
      const std::string key = factor_key(prefix, f == 0 ? 'a' : 'b', view.name);
      for (const std::string_view field : {kExpAvg, kExpAvgSq, kMaster}) {
        const std::size_t slot = i++;
        if (field == kMaster && factor.dtype == DType::fp32) continue;
        expected.push_back(optimizer_key(key, field));
        const TensorBytes* t = fitting(tensors, expected.back(), StDType::F32, st_shape(factor.shape), problems);
        if (t) l.fields[slot] = t->bytes;
        complete &= t != nullptr;
      }
      expected.push_back(optimizer_key(key, kStep));
      const TensorBytes* t = fitting(tensors, expected.back(), StDType::I64, {}, problems);
      const std::optional<std::int64_t> steps = t ? step_count(*t, expected.back(), problems) : std::nullopt;
      if (steps) l.steps[f] = *steps;
      complete &= steps.has_value();
      ++f;
    }
    return complete;
  });
  const AdamWCounters counters = read_counters(tensors, prefix, expected, problems);
  for (const TensorBytes& t : file.tensors())
    if (std::find(expected.begin(), expected.end(), t.name) == expected.end()) problems.push_back("unexpected " + t.name);
  require_no_problems(path.string(), problems);
  install_states(optimizer, layer, loaded, config, on_settings, counters, stream, group);
}

}  // namespace moelora::io
