/// \file
/// \brief Adapter state dicts: every adapter's factors and settings in one safetensors file.
///
/// Keys: `{prefix}lora_a_{adapter}.weight` `[E, r, in]` and `{prefix}lora_b_{adapter}.weight`
/// `[E, out, r]`, in the adapter's dtype (BF16, F16 or F32). Metadata: `format` = `pt`, and
/// `moelora.layer` / `moelora.adapters`, JSON strings with the layer's sizes and each adapter's
/// settings (rank, scale, dtype, init, enabled, trainable, seed, init_iterations). Loading is
/// strict: the layer must hold exactly the file's adapters with the same shapes and dtypes; every
/// mismatch is listed in one ErrorCode::invalid_argument, and then nothing in the layer has changed.
///
/// A layer whose base holds quantized weights (QuantizedStateBase, e.g. QuantizedGroupedLinear
/// with a weight quantizer) also stores the base's packed state, one tensor per present section of
/// `quant::packed_layout(spec, E, out, in)`: `{prefix}base.weight_quantizer.codes`, `.scales`,
/// `.amax`, each of its section's dtype and shape, and the spec in metadata `moelora.base_quantizer`
/// (`quant_spec_name`). Loading restores it with `restore_packed`, so that the base computes bit for
/// bit as the one that saved (after loftq / svd_first changed it, too); these tensors and the spec
/// are checked as strictly as the factors.
#pragma once

#include <algorithm>
#include <cmath>
#include <concepts>
#include <cstring>
#include <filesystem>
#include <optional>
#include <span>
#include <sstream>
#include <string>
#include <string_view>
#include <vector>

#include <nlohmann/json.hpp>

#include "moelora/core/config.hpp"
#include "moelora/core/dtype.hpp"
#include "moelora/core/error.hpp"
#include "moelora/grouped_lora.hpp"
#include "moelora/io/safetensors.hpp"
#include "moelora/quant/packed.hpp"

namespace moelora::io {

/// The safetensors dtype of a factor dtype.
constexpr StDType st_dtype_of(DType d) {
  return d == DType::bf16 ? StDType::BF16 : (d == DType::fp16 ? StDType::F16 : StDType::F32);
}

/// The state-dict key of factor `which` ('a' or 'b') of adapter `name`.
inline std::string factor_key(std::string_view prefix, char which, std::string_view name) {
  return std::string(prefix) + "lora_" + which + "_" + std::string(name) + ".weight";
}

/// One adapter's settings as checkpoints record them: name, rank, scale, dtype, init, enabled,
/// trainable, seed, init_iterations.
inline nlohmann::ordered_json adapter_settings(std::string_view name, const ResolvedAdapterConfig& c) {
  return {{"name", name},
          {"rank", c.rank},
          {"scale", c.scale},
          {"dtype", dtype_name(c.dtype)},
          {"init", init_method_name(c.init)},
          {"enabled", c.enabled},
          {"trainable", c.trainable},
          {"seed", c.seed},
          {"init_iterations", c.init_iterations}};
}

/// The settings a load restores on an existing adapter.
struct RestoredSettings {
  double scale = 1.0;
  bool enabled = true;
  bool trainable = true;
};

/// The entry of adapter `name` in a `moelora.adapters` list, checked; a problem is appended to
/// `problems` (and nothing returned) when there is none or its scale is invalid.
inline std::optional<RestoredSettings> find_settings(const nlohmann::json& adapters, std::string_view name,
                                                     std::vector<std::string>& problems) {
  const auto entry = std::find_if(adapters.begin(), adapters.end(), [&](const nlohmann::json& s) {
    return s.is_object() && s.value("name", "") == name;
  });
  if (entry == adapters.end()) {
    problems.push_back("no settings for adapter \"" + std::string(name) + "\"");
    return std::nullopt;
  }
  RestoredSettings s{entry->value("scale", 1.0), entry->value("enabled", true), entry->value("trainable", true)};
  if (!(std::isfinite(s.scale) && s.scale > 0.0)) {
    problems.push_back("adapter \"" + std::string(name) + "\" has the invalid scale " + std::to_string(s.scale));
    return std::nullopt;
  }
  return s;
}

/// Parses the JSON string `text` of what (a metadata entry or a file); a problem when it is not JSON.
inline nlohmann::json parse_json_or(std::string_view text, std::string_view what, std::vector<std::string>& problems) {
  try {
    return nlohmann::json::parse(text);
  } catch (const nlohmann::json::exception&) {
    problems.push_back(std::string(what) + " is not JSON");
    return nlohmann::json::array();
  }
}

/// "KEY is F32 [4, 8] but ... needs BF16 [4, 16]": a tensor that does not fit.
inline std::string misfit(const TensorBytes& got, StDType want_dtype, const std::vector<std::int64_t>& want_shape,
                          std::string_view who = "the layer") {
  std::ostringstream why;
  const auto dims = [&](const std::vector<std::int64_t>& shape) {
    why << '[';
    for (std::size_t d = 0; d < shape.size(); ++d) why << (d ? ", " : "") << shape[d];
    why << ']';
  };
  why << got.name << " is " << st_dtype_name(got.dtype) << ' ';
  dims(got.shape);
  why << " but " << who << " needs " << st_dtype_name(want_dtype) << ' ';
  dims(want_shape);
  return why.str();
}

/// Throws one ErrorCode::invalid_argument "cannot ACTION WHAT: p1; p2; ..." when `problems` is not empty.
inline void require_no_problems(std::string_view what, const std::vector<std::string>& problems,
                                std::string_view action = "load") {
  if (problems.empty()) return;
  std::string message;
  for (const std::string& p : problems) message += (message.empty() ? "" : "; ") + p;
  moelora::detail::raise(ErrorCode::invalid_argument, "cannot ", action, " ", what, ": ", message);
}

/// Applies restored settings to adapter `name` of `layer`.
template <class Layer>
void restore_settings(Layer& layer, std::string_view name, const RestoredSettings& s,
                      typename Layer::stream_type stream) {
  layer.set_scale(name, s.scale);
  layer.set_enabled(name, s.enabled);
  layer.set_trainable(name, s.trainable, stream);
}

/// A base whose quantized weights a state dict stores: its packed blob (`packed()`, laid out by
/// `quant::packed_layout` of its weight quantizer's `spec()`), restorable with `restore_packed`.
/// Its weight quantizer is optional at run time; a base without one stores nothing.
template <class B>
concept QuantizedStateBase =
    requires(B& base, const B& cbase, const void* bytes, std::size_t n, typename B::backend_type::stream_type stream) {
      { cbase.packed().data() } -> std::convertible_to<const void*>;
      { cbase.packed().bytes() } -> std::convertible_to<std::size_t>;
      { static_cast<bool>(cbase.weight_quantizer()) };
      { cbase.weight_quantizer()->spec() } -> std::convertible_to<quant::QuantSpec>;
      base.restore_packed(bytes, n, stream);
    };

/// The metadata key of a quantized base's spec.
inline constexpr std::string_view kBaseQuantizerKey = "moelora.base_quantizer";

/// The state-dict key of section `section` ("codes", "scales", "amax") of the base's weight quantizer.
inline std::string quantizer_key(std::string_view prefix, std::string_view section) {
  return std::string(prefix) + "base.weight_quantizer." + std::string(section);
}

/// The spec of `layer`'s base weight quantizer, or nothing (a plain base, or no weight quantizer).
template <class Layer>
std::optional<quant::QuantSpec> base_quant_spec(const Layer& layer) {
  if constexpr (QuantizedStateBase<typename Layer::base_type>) {
    if (layer.base().weight_quantizer()) return layer.base().weight_quantizer()->spec();
  }
  return std::nullopt;
}

/// The extents of `shape` as a safetensors shape.
inline std::vector<std::int64_t> st_shape(const Shape& shape) {
  return {shape.extents.begin(), shape.extents.begin() + shape.rank};
}

/// The packed layout of `layer`'s base under `spec`.
template <class Layer>
quant::PackedLayout base_packed_layout(const Layer& layer, const quant::QuantSpec& spec) {
  return quant::packed_layout(spec, layer.num_experts(), layer.out_features(), layer.in_features());
}

/// Writes every adapter of `layer` to `path` (atomically), reading the factors on `stream`.
template <class Layer>
void save_adapters(Layer& layer, const std::filesystem::path& path, std::string_view prefix,
                   typename Layer::stream_type stream) {
  using Backend = typename Layer::backend_type;
  std::vector<std::vector<std::byte>> storage;
  std::vector<TensorBytes> tensors;
  nlohmann::ordered_json adapters = nlohmann::ordered_json::array();
  for (const std::string& name : layer.adapter_names()) {
    const AdapterView view = layer.adapter(name);
    for (const auto& [which, factor] : {std::pair{'a', view.a}, std::pair{'b', view.b}}) {
      storage.emplace_back(factor.bytes());
      Backend::copy_to_host(storage.back().data(), factor.data, factor.bytes(), stream);
      tensors.push_back({factor_key(prefix, which, name), st_dtype_of(factor.dtype),
                         {factor.shape[0], factor.shape[1], factor.shape[2]}, storage.back()});
    }
    adapters.push_back(adapter_settings(name, view.config));
  }
  const nlohmann::ordered_json sizes = {
      {"experts", layer.num_experts()}, {"in", layer.in_features()}, {"out", layer.out_features()}};
  Metadata metadata{{"format", "pt"}, {"moelora.layer", sizes.dump()}, {"moelora.adapters", adapters.dump()}};
  if constexpr (QuantizedStateBase<typename Layer::base_type>) {
    if (const std::optional<quant::QuantSpec> spec = base_quant_spec(layer)) {
      const auto& packed = layer.base().packed();
      storage.emplace_back(packed.bytes());
      Backend::copy_to_host(storage.back().data(), packed.data(), packed.bytes(), stream);
      for (const quant::PackedSection& section : base_packed_layout(layer, *spec).sections())
        tensors.push_back({quantizer_key(prefix, section.name), parse_st_dtype(section.dtype), st_shape(section.shape),
                           std::span<const std::byte>(storage.back()).subspan(section.offset, section.bytes)});
      metadata[std::string(kBaseQuantizerKey)] = quant::quant_spec_name(*spec);
    }
  }
  write_safetensors(path, tensors, metadata);
}

/// Loads `path` into `layer`'s adapters (factors and settings), strictly; see the file comment.
template <class Layer>
void load_adapters(Layer& layer, const std::filesystem::path& path, std::string_view prefix,
                   typename Layer::stream_type stream) {
  using Backend = typename Layer::backend_type;
  const SafetensorsFile file(path);
  std::vector<std::string> problems;
  nlohmann::json settings = nlohmann::json::array();
  const auto meta = file.metadata().find("moelora.adapters");
  if (meta == file.metadata().end())
    problems.push_back("no moelora.adapters metadata");
  else
    settings = parse_json_or(meta->second, "moelora.adapters metadata", problems);

  struct Pending {
    std::string name;
    const TensorBytes* a;
    const TensorBytes* b;
    RestoredSettings settings;
  };
  std::vector<Pending> pending;
  std::vector<std::string> expected_keys;
  const auto find = [&](const std::string& key) -> const TensorBytes* {
    for (const TensorBytes& t : file.tensors())
      if (t.name == key) return &t;
    return nullptr;
  };
  for (const std::string& name : layer.adapter_names()) {
    const AdapterView view = layer.adapter(name);
    const TensorBytes* factors[2] = {nullptr, nullptr};
    for (int i = 0; i < 2; ++i) {
      const TensorRef& want = i == 0 ? view.a : view.b;
      const std::string key = factor_key(prefix, i == 0 ? 'a' : 'b', name);
      expected_keys.push_back(key);
      const TensorBytes* got = find(key);
      if (!got) {
        problems.push_back("missing " + key);
        continue;
      }
      const std::vector<std::int64_t> shape{want.shape[0], want.shape[1], want.shape[2]};
      if (got->shape != shape || got->dtype != st_dtype_of(want.dtype)) {
        problems.push_back(misfit(*got, st_dtype_of(want.dtype), shape));
        continue;
      }
      factors[i] = got;
    }
    const std::optional<RestoredSettings> restored = find_settings(settings, name, problems);
    if (restored && factors[0] && factors[1]) pending.push_back({name, factors[0], factors[1], *restored});
  }

  // The base's quantizer state: the same spec, and every section present and fitting.
  const std::optional<quant::QuantSpec> spec = base_quant_spec(layer);
  const auto saved_spec = file.metadata().find(std::string(kBaseQuantizerKey));
  const std::string want_spec = spec ? quant::quant_spec_name(*spec) : "none";
  const std::string got_spec = saved_spec == file.metadata().end() ? "none" : saved_spec->second;
  if (got_spec != want_spec)
    problems.push_back("the file's base quantizer is " + got_spec + " but the layer's is " + want_spec);
  std::vector<std::byte> packed;  // the blob to restore, assembled from the sections
  if (spec) {
    const quant::PackedLayout layout = base_packed_layout(layer, *spec);
    packed.resize(layout.total_bytes);
    for (const quant::PackedSection& section : layout.sections()) {
      const std::string key = quantizer_key(prefix, section.name);
      expected_keys.push_back(key);
      const TensorBytes* got = find(key);
      const std::vector<std::int64_t> shape = st_shape(section.shape);
      if (!got) problems.push_back("missing " + key);
      else if (got->shape != shape || got->dtype != parse_st_dtype(section.dtype))
        problems.push_back(misfit(*got, parse_st_dtype(section.dtype), shape, "the base"));
      else std::memcpy(packed.data() + section.offset, got->bytes.data(), section.bytes);
    }
  }
  for (const TensorBytes& t : file.tensors())
    if (std::find(expected_keys.begin(), expected_keys.end(), t.name) == expected_keys.end())
      problems.push_back("unexpected " + t.name);

  require_no_problems(path.string(), problems);
  for (const Pending& p : pending) {
    const AdapterView view = layer.adapter(p.name);
    Backend::copy_from_host(view.a.data, p.a->bytes.data(), p.a->bytes.size(), stream);
    Backend::copy_from_host(view.b.data, p.b->bytes.data(), p.b->bytes.size(), stream);
    restore_settings(layer, p.name, p.settings, stream);
  }
  if constexpr (QuantizedStateBase<typename Layer::base_type>)
    if (spec) layer.base().restore_packed(packed.data(), packed.size(), stream);
}

}  // namespace moelora::io
