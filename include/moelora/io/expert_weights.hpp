/// \file
/// \brief Reading a model's expert weights from safetensors checkpoints by key pattern.
///
/// A pattern names one expert's 2-D weight `[out, in]` with `{e}` for the expert index and
/// optionally `{L}` for the layer, e.g. `model.layers.{L}.mlp.experts.{e}.down_proj.weight`; a
/// pattern without `{e}` names one stacked 3-D tensor `[E, out, in]`. The checkpoint is one
/// `.safetensors` file or a directory of them (a Hugging Face sharded checkpoint: every
/// `*.safetensors` file in it is searched). BF16, F16 and F32 tensors are read.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "moelora/core/dtype.hpp"
#include "moelora/core/error.hpp"
#include "moelora/io/safetensors.hpp"

namespace moelora::io {

/// Stacked expert weights `[experts, out, in]` as fp32 values (exact for BF16/F16 sources).
struct ExpertWeights {
  std::int64_t experts = 0, out = 0, in = 0;
  std::vector<float> values;
};

/// `pattern` with `{L}` replaced by `layer` and `{e}` by `expert` (when given); any other `{...}`
/// placeholder, or a `{L}` without a layer, throws ErrorCode::invalid_argument.
inline std::string expand_key_pattern(std::string_view pattern, std::optional<std::int64_t> layer,
                                      std::optional<std::int64_t> expert) {
  std::string key;
  for (std::size_t i = 0; i < pattern.size(); ++i) {
    if (pattern[i] != '{') {
      key += pattern[i];
      continue;
    }
    const std::size_t close = pattern.find('}', i);
    const std::string_view name = pattern.substr(i + 1, close == std::string_view::npos ? close : close - i - 1);
    MOELORA_REQUIRE(close != std::string_view::npos && (name == "e" || name == "L"), ErrorCode::invalid_argument,
                    "key pattern \"", pattern, "\" has an unknown placeholder at position ", i,
                    "; use {e} for the expert and {L} for the layer");
    if (name == "L") {
      MOELORA_REQUIRE(layer.has_value(), ErrorCode::invalid_argument, "key pattern \"", pattern,
                      "\" has {L}: give the layer index");
      key += std::to_string(*layer);
    } else {
      MOELORA_REQUIRE(expert.has_value(), ErrorCode::invalid_argument, "key pattern \"", pattern, "\" misplaces {e}");
      key += std::to_string(*expert);
    }
    i = close;
  }
  return key;
}

/// The open safetensors files of a checkpoint and a lookup of tensors by name across them.
class Checkpoint {
 public:
  explicit Checkpoint(const std::filesystem::path& path) {
    std::error_code error;
    if (std::filesystem::is_directory(path, error)) {
      std::vector<std::filesystem::path> files;
      for (const auto& entry : std::filesystem::directory_iterator(path))
        if (entry.path().extension() == ".safetensors") files.push_back(entry.path());
      std::sort(files.begin(), files.end());
      MOELORA_REQUIRE(!files.empty(), ErrorCode::io, "no .safetensors file in directory ", path.string());
      for (const auto& file : files) files_.push_back(std::make_unique<SafetensorsFile>(file));
    } else {
      MOELORA_REQUIRE(std::filesystem::exists(path, error), ErrorCode::io, "no such file or directory: ",
                      path.string());
      files_.push_back(std::make_unique<SafetensorsFile>(path));
    }
  }

  /// The tensor named `name`, or null.
  [[nodiscard]] const TensorBytes* find(std::string_view name) const {
    for (const auto& file : files_)
      for (const TensorBytes& t : file->tensors())
        if (t.name == name) return &t;
    return nullptr;
  }

 private:
  std::vector<std::unique_ptr<SafetensorsFile>> files_;
};

namespace expert_weights_detail {

/// Appends the values of a BF16, F16 or F32 tensor as fp32.
inline void append_as_float(const TensorBytes& t, std::vector<float>& out) {
  const auto append = [&](auto type_tag) {
    using T = decltype(type_tag);
    const std::size_t n = t.bytes.size() / sizeof(T);
    for (std::size_t i = 0; i < n; ++i) {
      T v;
      std::memcpy(&v, t.bytes.data() + i * sizeof(T), sizeof(T));
      out.push_back(static_cast<float>(v));
    }
  };
  switch (t.dtype) {
    case StDType::BF16: return append(bfloat16_t{});
    case StDType::F16: return append(half_t{});
    case StDType::F32: return append(float{});
    default: break;
  }
  moelora::detail::raise(ErrorCode::unsupported, "tensor ", t.name, " is ", st_dtype_name(t.dtype),
                         "; expert weights must be BF16, F16 or F32");
}

}  // namespace expert_weights_detail

/// Reads the experts named by `pattern` (see the file comment) from `checkpoint`. With `{e}`:
/// experts 0, 1, ... up to `experts` (or, when not given, until the first missing index); every
/// expert must be 2-D of the same shape.
inline ExpertWeights load_expert_weights(const std::filesystem::path& checkpoint, std::string_view pattern,
                                         std::optional<std::int64_t> layer = std::nullopt,
                                         std::optional<std::int64_t> experts = std::nullopt) {
  const Checkpoint files(checkpoint);
  ExpertWeights w;
  if (pattern.find("{e}") == std::string_view::npos) {
    const std::string key = expand_key_pattern(pattern, layer, std::nullopt);
    const TensorBytes* t = files.find(key);
    MOELORA_REQUIRE(t != nullptr, ErrorCode::invalid_argument, "no tensor named ", key, " in ", checkpoint.string());
    MOELORA_REQUIRE(t->shape.size() == 3, ErrorCode::shape_mismatch, "stacked expert weight ", key,
                    " must be [E, out, in]");
    w = {t->shape[0], t->shape[1], t->shape[2], {}};
    MOELORA_REQUIRE(!experts || *experts == w.experts, ErrorCode::shape_mismatch, key, " holds ", w.experts,
                    " experts, not ", *experts);
    expert_weights_detail::append_as_float(*t, w.values);
    return w;
  }
  for (std::int64_t e = 0; !experts || e < *experts; ++e) {
    const std::string key = expand_key_pattern(pattern, layer, e);
    const TensorBytes* t = files.find(key);
    if (t == nullptr && !experts && e > 0) break;
    MOELORA_REQUIRE(t != nullptr, ErrorCode::invalid_argument, "no tensor named ", key, " in ", checkpoint.string());
    MOELORA_REQUIRE(t->shape.size() == 2, ErrorCode::shape_mismatch, "expert weight ", key, " must be [out, in]");
    MOELORA_REQUIRE(e == 0 || (t->shape[0] == w.out && t->shape[1] == w.in), ErrorCode::shape_mismatch,
                    "expert weight ", key, " is [", t->shape[0], ", ", t->shape[1], "] but expert 0 is [", w.out, ", ",
                    w.in, "]");
    w.out = t->shape[0], w.in = t->shape[1];
    expert_weights_detail::append_as_float(*t, w.values);
    w.experts = e + 1;
  }
  return w;
}

}  // namespace moelora::io
