/// \file
/// \brief Sharded adapter checkpoints: one safetensors file per (TP, EP) rank, one key per global
/// expert, an index written last; a checkpoint loads into any TP/EP layout whose splits are even.
///
/// A rank of a `ShardLayout` {tp, tp_rank, ep, ep_rank, mode} holds `E_local = E / ep` experts, the
/// global expert of local expert i being `g = ep_rank · E_local + i`, and per adapter the factors
/// A `[E_local, r, in_local]`, B `[E_local, out_local, r]` (row-major), where by `factor_tp_axis`
/// (policies/parallel_mode.hpp):
///
/// | mode   | A_e (global `[r, in]`)              | B_e (global `[out, r]`)              |
/// |--------|-------------------------------------|--------------------------------------|
/// | column | replicated: `[r, in]`               | rows `[t·out/tp, (t+1)·out/tp)`, axis 0 |
/// | row    | cols `[t·in/tp, (t+1)·in/tp)`, axis 1 | replicated: `[out, r]`               |
///
/// Column mode with `blocks = n` (a gated fc1, `[gate; up]`: n = 2): B_e's rows are n blocks of
/// out/n, each sharded on its own; rank t holds rows `[b·out/n + t·out/(n·tp), +out/(n·tp))` of
/// every block b, stacked (parallel/placement.hpp). A live layer's layout comes from the layer
/// (`shard_layout`, and the `save_sharded` / `load_sharded` overloads without a layout).
///
/// Files in the checkpoint directory:
/// - `adapter-tp{t}-ep{e}.safetensors` for every rank: keys `{prefix}lora_a_{adapter}.weight{g}` and
///   `{prefix}lora_b_{adapter}.weight{g}`, 2-D, the rank's slice of expert g's factor in the factor
///   dtype. A replicated factor is written by tp_rank 0 only. Metadata (JSON strings): `format` = `pt`;
///   `moelora.layout` {tp, tp_rank, ep, ep_rank, mode}; `moelora.layer` {experts, in, out} (global);
///   `moelora.prefix`; `moelora.adapters` (settings, as in state dicts); `moelora.slices`, mapping
///   every key of the file to {"global_shape": [R, C], "axis": -1 | 0 | 1, "offset": o}: the tensor
///   is rows (axis 0) or columns (axis 1) `[o, o + extent)` of the global `[R, C]` factor, or all of
///   it (axis -1); with `"blocks": n` (absent: 1) the tensor is n equal blocks along the axis, block b
///   being `[b·G/n + o, +extent/n)` of the global extent G.
/// - `adapter.index.json`, written last: {"format": "moelora.sharded", "version": 1, "layout": {tp,
///   ep, mode}, "layer": {experts, in, out}, "prefix", "adapters": [settings...], "files": [names],
///   "weight_map": {key: file}}; a key whose slices lie in several files maps to the array of those
///   files in tp_rank order.
///
/// Loading is strict: the layer must hold exactly the checkpoint's adapters with the same ranks and
/// dtypes, every key of every global expert must be present and its slices must tile the global
/// factor, and the target layout must split the global sizes evenly (E by ep; out by tp in column
/// mode, in by tp in row mode). Every problem is listed in one ErrorCode::invalid_argument, and
/// then nothing in the layer has changed. All writes are atomic (temporary file + rename).
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include <nlohmann/json.hpp>

#include "moelora/core/dtype.hpp"
#include "moelora/core/error.hpp"
#include "moelora/io/safetensors.hpp"
#include "moelora/io/state_dict.hpp"
#include "moelora/io/text_file.hpp"
#include "moelora/parallel/placement.hpp"
#include "moelora/policies/parallel_mode.hpp"

namespace moelora::io {

/// The tensor-parallel mode of the base a rank's factors belong to.
enum class TpMode : std::uint8_t { column, row };

constexpr std::string_view tp_mode_name(TpMode mode) { return mode == TpMode::column ? "column" : "row"; }

/// "column" or "row"; anything else throws ErrorCode::invalid_argument.
inline TpMode parse_tp_mode(std::string_view name) {
  if (name == "column") return TpMode::column;
  if (name == "row") return TpMode::row;
  moelora::detail::raise(ErrorCode::invalid_argument, "tensor-parallel mode \"", name, "\" is not known; accepted: column, row");
}

/// `factor_tp_axis` of factor `f` under `mode` (the ColumnParallel / RowParallel policy tables).
constexpr policy::TpAxis factor_axis(TpMode mode, policy::Factor f) {
  return mode == TpMode::column ? policy::factor_tp_axis<policy::ColumnParallel>(f)
                                : policy::factor_tp_axis<policy::RowParallel>(f);
}

/// A grid of ranks: tp × ep ranks of one mode; in column mode B's rows are `blocks` blocks, each
/// sharded over tp on its own (2 for a gated fc1 `[gate; up]`).
struct ShardGrid {
  std::int64_t tp = 1;
  std::int64_t ep = 1;
  TpMode mode = TpMode::column;
  std::int64_t blocks = 1;
};

/// What one rank holds: its place in a tp × ep grid of `mode` (and, column mode, B's row blocks).
struct ShardLayout {
  std::int64_t tp = 1;
  std::int64_t tp_rank = 0;
  std::int64_t ep = 1;
  std::int64_t ep_rank = 0;
  TpMode mode = TpMode::column;
  std::int64_t blocks = 1;

  [[nodiscard]] ShardGrid grid() const { return {tp, ep, mode, blocks}; }
  /// Throws ErrorCode::invalid_argument unless tp, ep >= 1, 0 <= tp_rank < tp, 0 <= ep_rank < ep
  /// and blocks >= 1 (and 1 in row mode).
  void validate() const {
    MOELORA_REQUIRE(tp >= 1 && ep >= 1 && tp_rank >= 0 && tp_rank < tp && ep_rank >= 0 && ep_rank < ep,
                    ErrorCode::invalid_argument, "shard layout tp=", tp, " tp_rank=", tp_rank, " ep=", ep,
                    " ep_rank=", ep_rank, " is not valid (need tp, ep >= 1 and 0 <= rank < size)");
    MOELORA_REQUIRE(blocks >= 1 && (blocks == 1 || mode == TpMode::column), ErrorCode::invalid_argument,
                    "shard layout blocks=", blocks, " is not valid (need blocks >= 1, and 1 in row mode)");
  }
};

/// The layout of a live layer (GroupedLoRA): its TP and EP ranks, mode and B blocks. A
/// NoTensorParallel layer is a column layout with tp = 1.
template <class Layer>
ShardLayout shard_layout(const Layer& layer) {
  const parallel::Shard& s = layer.shard();
  return {s.tp_size, s.tp_rank, s.ep_size, s.ep_rank, s.row() ? TpMode::row : TpMode::column, s.out_blocks};
}

/// The sizes of the whole (unsharded) layer.
struct GlobalSizes {
  std::int64_t experts = 0;
  std::int64_t in = 0;
  std::int64_t out = 0;
};

/// A block `[row0, row0 + rows) × [col0, col0 + cols)` of a 2-D factor.
struct Region {
  std::int64_t row0 = 0, rows = 0, col0 = 0, cols = 0;
};

/// A rank's part of one expert factor: `blocks` regions of the global factor, stacked in order
/// (rows, for B's row blocks) into the local tensor; `axis` and `offset` as the slice records say.
struct LocalPart {
  std::vector<Region> regions;
  policy::TpAxis axis = policy::TpAxis::none;
  std::int64_t offset = 0;  ///< start along the axis within each block
  std::int64_t blocks = 1;
  [[nodiscard]] std::vector<std::int64_t> shape() const {
    std::int64_t rows = 0;
    for (const Region& r : regions) rows += r.rows;
    return {rows, regions.front().cols};
  }
};

/// The global `[R, C]` shape of one expert's factor `f` of rank `rank`: A `[r, in]`, B `[out, r]`.
inline std::vector<std::int64_t> global_factor_shape(const GlobalSizes& sizes, policy::Factor f, std::int64_t rank) {
  return f == policy::Factor::a ? std::vector<std::int64_t>{rank, sizes.in} : std::vector<std::int64_t>{sizes.out, rank};
}

/// The part of expert factor `f` that rank `layout` holds (sizes must split evenly).
inline LocalPart local_part(const ShardLayout& layout, const GlobalSizes& sizes, policy::Factor f, std::int64_t rank) {
  const std::vector<std::int64_t> global = global_factor_shape(sizes, f, rank);
  LocalPart part{{}, factor_axis(layout.mode, f), 0, 1};
  switch (part.axis) {
    case policy::TpAxis::rows: {
      part.blocks = layout.blocks;
      const std::int64_t block = global[0] / layout.blocks, rows = block / layout.tp;
      part.offset = layout.tp_rank * rows;
      for (std::int64_t b = 0; b < layout.blocks; ++b) part.regions.push_back({b * block + part.offset, rows, 0, global[1]});
      break;
    }
    case policy::TpAxis::cols:
      part.offset = layout.tp_rank * (global[1] / layout.tp);
      part.regions.push_back({0, global[0], part.offset, global[1] / layout.tp});
      break;
    case policy::TpAxis::none: part.regions.push_back({0, global[0], 0, global[1]}); break;
  }
  return part;
}

/// Problems with splitting `sizes` over `grid` (an empty list when every split is even).
inline std::vector<std::string> split_problems(const GlobalSizes& sizes, const ShardGrid& grid) {
  std::vector<std::string> problems;
  if (sizes.experts % grid.ep != 0)
    problems.push_back("the " + std::to_string(sizes.experts) + " experts do not split evenly over ep = " +
                       std::to_string(grid.ep) + " (E must be divisible by ep)");
  if (grid.mode == TpMode::column && sizes.out % (grid.tp * grid.blocks) != 0)
    problems.push_back("out = " + std::to_string(sizes.out) + " does not split evenly over tp = " + std::to_string(grid.tp) +
                       (grid.blocks > 1 ? " in each of its " + std::to_string(grid.blocks) + " blocks" : std::string()) +
                       " (column mode needs out divisible by tp" + (grid.blocks > 1 ? " · blocks)" : ")"));
  if (grid.mode == TpMode::row && sizes.in % grid.tp != 0)
    problems.push_back("in = " + std::to_string(sizes.in) + " does not split evenly over tp = " +
                       std::to_string(grid.tp) + " (row mode needs in divisible by tp)");
  return problems;
}

/// The sharded key of factor `which` ('a' or 'b') of adapter `name` for global expert `g`.
inline std::string sharded_key(std::string_view prefix, char which, std::string_view name, std::int64_t g) {
  return factor_key(prefix, which, name) + std::to_string(g);
}

inline constexpr std::string_view kShardIndexName = "adapter.index.json";

/// The file name of rank (tp_rank, ep_rank): `adapter-tp{t}-ep{e}.safetensors`.
inline std::string shard_file_name(std::int64_t tp_rank, std::int64_t ep_rank) {
  return "adapter-tp" + std::to_string(tp_rank) + "-ep" + std::to_string(ep_rank) + ".safetensors";
}

namespace detail {

inline nlohmann::ordered_json sizes_json(const GlobalSizes& s) {
  return {{"experts", s.experts}, {"in", s.in}, {"out", s.out}};
}

/// The tensors of one rank file and their slice records.
struct ShardContents {
  std::vector<std::vector<std::byte>> storage;
  std::vector<TensorBytes> tensors;
  nlohmann::ordered_json slices = nlohmann::ordered_json::object();

  /// Adds `bytes` as tensor `key`, the part `part` of the global `global` factor of `dtype`.
  void add(std::string key, StDType dtype, const std::vector<std::int64_t>& global, const LocalPart& part,
           std::vector<std::byte> bytes) {
    storage.push_back(std::move(bytes));
    slices[key] = {{"global_shape", global}, {"axis", static_cast<int>(part.axis)}, {"offset", part.offset}};
    if (part.blocks != 1) slices[key]["blocks"] = part.blocks;
    tensors.push_back({std::move(key), dtype, part.shape(), storage.back()});
  }
};

/// The `moelora.layout` record of a rank (`blocks` only when not 1, as files without it read).
inline nlohmann::ordered_json placement_json(const ShardLayout& layout) {
  nlohmann::ordered_json placement = {{"tp", layout.tp},
                                      {"tp_rank", layout.tp_rank},
                                      {"ep", layout.ep},
                                      {"ep_rank", layout.ep_rank},
                                      {"mode", tp_mode_name(layout.mode)}};
  if (layout.blocks != 1) placement["blocks"] = layout.blocks;
  return placement;
}

inline void write_shard(const std::filesystem::path& dir, const ShardLayout& layout, const GlobalSizes& sizes,
                        std::string_view prefix, const nlohmann::ordered_json& adapters, const ShardContents& contents) {
  const nlohmann::ordered_json placement = placement_json(layout);
  write_safetensors(dir / shard_file_name(layout.tp_rank, layout.ep_rank), contents.tensors,
                    {{"format", "pt"},
                     {"moelora.layout", placement.dump()},
                     {"moelora.layer", sizes_json(sizes).dump()},
                     {"moelora.prefix", std::string(prefix)},
                     {"moelora.adapters", adapters.dump()},
                     {"moelora.slices", contents.slices.dump()}});
}

/// One stored run of a global factor along an axis: `extent` rows (axis 0) or columns (axis 1, or
/// the whole factor for axis -1) starting at global `start`, read from the tensor at `src`.
struct Piece {
  const TensorBytes* tensor;
  policy::TpAxis axis;
  std::int64_t start, extent, src;
};

}  // namespace detail

/// A sharded checkpoint directory opened for reading: its index, and its rank files opened (and
/// validated) on first use. Problems are collected, not thrown, so that a load can list them all.
class ShardedCheckpoint {
 public:
  /// Reads `dir/adapter.index.json`; a missing or malformed index throws ErrorCode::invalid_argument.
  explicit ShardedCheckpoint(std::filesystem::path dir) : dir_(std::move(dir)) {
    std::vector<std::string> problems;
    try {
      const nlohmann::json index = nlohmann::json::parse(read_text_file(dir_ / kShardIndexName));
      if (index.value("format", "") != "moelora.sharded") problems.push_back("the index's format is not moelora.sharded");
      const nlohmann::json& layout = index.at("layout");
      grid_ = {layout.at("tp").get<std::int64_t>(), layout.at("ep").get<std::int64_t>(),
               parse_tp_mode(layout.at("mode").get<std::string>()), layout.value("blocks", std::int64_t{1})};
      const nlohmann::json& layer = index.at("layer");
      sizes_ = {layer.at("experts").get<std::int64_t>(), layer.at("in").get<std::int64_t>(),
                layer.at("out").get<std::int64_t>()};
      prefix_ = index.at("prefix").get<std::string>();
      adapters_ = index.at("adapters");
      for (const auto& [key, files] : index.at("weight_map").items())
        weight_map_[key] = files.is_string() ? std::vector<std::string>{files.get<std::string>()}
                                             : files.get<std::vector<std::string>>();
      if (!adapters_.is_array()) problems.push_back("the index's adapters are not a list");
      if (grid_.tp < 1 || grid_.ep < 1 || grid_.blocks < 1) problems.push_back("the index's layout has tp, ep or blocks < 1");
    } catch (const Error& e) {
      problems.push_back(e.what());
    } catch (const nlohmann::json::exception& e) {
      problems.push_back(std::string(kShardIndexName) + " is malformed (" + e.what() + ")");
    }
    require_no_problems(dir_.string(), problems);
  }

  [[nodiscard]] const std::filesystem::path& dir() const { return dir_; }
  [[nodiscard]] const ShardGrid& grid() const { return grid_; }
  [[nodiscard]] const GlobalSizes& sizes() const { return sizes_; }
  [[nodiscard]] const std::string& prefix() const { return prefix_; }
  /// The adapters' settings, as `adapter_settings` writes them.
  [[nodiscard]] const nlohmann::json& adapters() const { return adapters_; }
  [[nodiscard]] const std::map<std::string, std::vector<std::string>>& weight_map() const { return weight_map_; }

  /// Copies the part `part` of the global factor `key` (global shape `global`, dtype `dtype`) into
  /// `dst` (its regions stacked, each row-major `[rows, cols]`). On any problem (key not in the
  /// index, a file that cannot be read or lacks the key, slices that disagree with `global`/`dtype`
  /// or do not tile it) appends it to `problems` and returns false.
  bool gather(const std::string& key, StDType dtype, const std::vector<std::int64_t>& global, const LocalPart& part,
              std::byte* dst, std::vector<std::string>& problems) {
    const auto entry = weight_map_.find(key);
    if (entry == weight_map_.end()) {
      problems.push_back("missing " + key);
      return false;
    }
    std::vector<detail::Piece> pieces;
    for (const std::string& name : entry->second) {
      const Shard* shard = open(name, problems);
      if (!shard) return false;
      const auto tensor = std::find_if(shard->file->tensors().begin(), shard->file->tensors().end(),
                                       [&](const TensorBytes& t) { return t.name == key; });
      const auto slice = shard->slices.find(key);
      if (tensor == shard->file->tensors().end() || slice == shard->slices.end()) {
        problems.push_back(name + " lacks " + key + " (or its moelora.slices record)");
        return false;
      }
      try {
        const auto record_global = slice->at("global_shape").get<std::vector<std::int64_t>>();
        const int axis = slice->at("axis").get<int>();
        const auto offset = slice->at("offset").get<std::int64_t>();
        const auto blocks = slice->value("blocks", std::int64_t{1});
        if (record_global != global || axis < -1 || axis > 1 || blocks < 1 || (axis == -1 && blocks != 1)) {
          problems.push_back(name + ": " + key + " is recorded as a slice of a factor of another global shape or axis");
          return false;
        }
        if (tensor->dtype != dtype || tensor->shape.size() != 2) {
          problems.push_back(misfit(*tensor, dtype, global, "the checkpoint's layer"));
          return false;
        }
        if (axis == -1) {
          pieces.push_back({&*tensor, policy::TpAxis::none, 0, global[0], 0});
          continue;
        }
        const std::size_t along = axis == 1 ? 1 : 0;
        const std::int64_t stored = tensor->shape[along], run = stored / blocks, block = global[along] / blocks;
        if (stored % blocks != 0 || global[along] % blocks != 0 || offset < 0 || offset + run > block) {
          problems.push_back(name + ": " + key + " does not fit its " + std::to_string(blocks) +
                             " block(s) of the global shape at offset " + std::to_string(offset));
          return false;
        }
        for (std::int64_t b = 0; b < blocks; ++b)
          pieces.push_back({&*tensor, static_cast<policy::TpAxis>(axis), b * block + offset, run, b * run});
      } catch (const nlohmann::json::exception&) {
        problems.push_back(name + ": the moelora.slices record of " + key + " is malformed");
        return false;
      }
    }
    if (!tiles(key, dtype, global, pieces, problems)) return false;

    const std::size_t element = st_dtype_size(dtype);
    for (const Region& region : part.regions) {
      for (const detail::Piece& p : pieces) {
        const bool by_cols = p.axis == policy::TpAxis::cols;
        const std::int64_t prow0 = by_cols ? 0 : p.start, prows = by_cols ? global[0] : p.extent;
        const std::int64_t pcol0 = by_cols ? p.start : 0, pcols = by_cols ? p.extent : global[1];
        const std::int64_t r0 = std::max(region.row0, prow0), r1 = std::min(region.row0 + region.rows, prow0 + prows);
        const std::int64_t c0 = std::max(region.col0, pcol0), c1 = std::min(region.col0 + region.cols, pcol0 + pcols);
        const std::int64_t src_row = by_cols ? 0 : p.src - p.start, src_col = by_cols ? p.src - p.start : 0;
        for (std::int64_t r = r0; r < r1 && c0 < c1; ++r)
          std::memcpy(dst + static_cast<std::size_t>((r - region.row0) * region.cols + (c0 - region.col0)) * element,
                      p.tensor->bytes.data() +
                          static_cast<std::size_t>((r + src_row) * p.tensor->shape[1] + c0 + src_col) * element,
                      static_cast<std::size_t>(c1 - c0) * element);
      }
      dst += static_cast<std::size_t>(region.rows * region.cols) * element;
    }
    return true;
  }

 private:
  struct Shard {
    std::unique_ptr<SafetensorsFile> file;
    nlohmann::json slices;
  };

  /// The rank file `name`, opened once; null (and a problem, reported once) when it cannot be used.
  const Shard* open(const std::string& name, std::vector<std::string>& problems) {
    const auto known = shards_.find(name);
    if (known != shards_.end()) return known->second.file ? &known->second : nullptr;
    Shard& shard = shards_[name];
    try {
      auto file = std::make_unique<SafetensorsFile>(dir_ / name);
      const auto meta = file->metadata().find("moelora.slices");
      if (meta == file->metadata().end()) {
        problems.push_back(name + " has no moelora.slices metadata");
        return nullptr;
      }
      shard.slices = nlohmann::json::parse(meta->second);
      shard.file = std::move(file);
    } catch (const Error& e) {
      problems.push_back(e.what());
      return nullptr;
    } catch (const nlohmann::json::exception&) {
      problems.push_back(name + ": moelora.slices metadata is not JSON");
      return nullptr;
    }
    return &shard;
  }

  /// Whether `pieces` tile the global factor exactly: one whole piece (axis -1), or runs along one
  /// axis, contiguous from 0 to the global extent, each spanning the other axis.
  static bool tiles(const std::string& key, StDType dtype, const std::vector<std::int64_t>& global,
                    std::vector<detail::Piece>& pieces, std::vector<std::string>& problems) {
    const policy::TpAxis axis = pieces.front().axis;
    const std::size_t along = axis == policy::TpAxis::cols ? 1 : 0, other = 1 - along;
    std::sort(pieces.begin(), pieces.end(), [](const detail::Piece& a, const detail::Piece& b) { return a.start < b.start; });
    std::int64_t next = 0;
    for (const detail::Piece& p : pieces) {
      std::vector<std::int64_t> expected = global;
      if (axis != policy::TpAxis::none) expected[along] = p.tensor->shape[along];
      const bool fits = axis == policy::TpAxis::none ? p.tensor->shape == global : p.tensor->shape[other] == global[other];
      if (p.axis != axis || p.start != next || !fits) {
        problems.push_back(misfit(*p.tensor, dtype, expected, "a slice at offset " + std::to_string(next) + " of the checkpoint's layer"));
        return false;
      }
      next += p.extent;
    }
    if (next != global[along] || (axis == policy::TpAxis::none && pieces.size() != 1)) {
      problems.push_back("the slices of " + key + " do not cover its global shape exactly");
      return false;
    }
    return true;
  }

  std::filesystem::path dir_;
  ShardGrid grid_;
  GlobalSizes sizes_;
  std::string prefix_;
  nlohmann::json adapters_;
  std::map<std::string, std::vector<std::string>> weight_map_;
  std::map<std::string, Shard> shards_;
};

/// Writes `dir/adapter.index.json` (atomically) for the rank files of the grid that
/// `dir/adapter-tp0-ep0.safetensors` records. Call it once, after every rank's `save_sharded` has
/// returned (the caller's barrier). Checks that every rank file exists and agrees with the first
/// (grid, sizes, prefix, adapters) and that each file's place matches its name; otherwise throws
/// one ErrorCode::invalid_argument listing the problems, and no index is written.
inline void write_sharded_index(const std::filesystem::path& dir) {
  std::vector<std::string> problems;
  const auto meta_json = [&](const SafetensorsFile& f, const char* key) {
    const auto it = f.metadata().find(key);
    if (it == f.metadata().end()) {
      problems.push_back(f.path().filename().string() + " has no " + key + " metadata");
      return nlohmann::json();
    }
    return parse_json_or(it->second, f.path().filename().string() + " " + key + " metadata", problems);
  };
  const SafetensorsFile first(dir / shard_file_name(0, 0));
  const nlohmann::json layout = meta_json(first, "moelora.layout"), layer = meta_json(first, "moelora.layer"),
                       adapters = meta_json(first, "moelora.adapters");
  const auto prefix = first.metadata().find("moelora.prefix");
  require_no_problems(dir.string(), problems);
  if (prefix == first.metadata().end() || !layout.is_object()) problems.push_back("adapter-tp0-ep0 lacks its layout or prefix");
  require_no_problems(dir.string(), problems);
  const std::int64_t tp = layout.value("tp", std::int64_t{0}), ep = layout.value("ep", std::int64_t{0});
  const ShardGrid grid{tp, ep, layout.value("mode", "") == "row" ? TpMode::row : TpMode::column,
                       layout.value("blocks", std::int64_t{1})};

  nlohmann::ordered_json files = nlohmann::ordered_json::array();
  std::map<std::string, std::vector<std::string>> weight_map;
  for (std::int64_t e = 0; e < ep; ++e) {
    for (std::int64_t t = 0; t < tp; ++t) {
      const std::string name = shard_file_name(t, e);
      files.push_back(name);
      try {
        const SafetensorsFile shard(dir / name);
        nlohmann::json placement = meta_json(shard, "moelora.layout");
        nlohmann::json expected_placement = detail::placement_json({tp, t, ep, e, grid.mode, grid.blocks});
        expected_placement["mode"] = layout.value("mode", "");
        if (placement != expected_placement) problems.push_back(name + " records the layout " + placement.dump() + ", not " + expected_placement.dump());
        if (meta_json(shard, "moelora.layer") != layer || meta_json(shard, "moelora.adapters") != adapters ||
            shard.metadata().count("moelora.prefix") == 0 || shard.metadata().at("moelora.prefix") != prefix->second)
          problems.push_back(name + " records other layer sizes, adapters or prefix than " + shard_file_name(0, 0));
        for (const TensorBytes& tensor : shard.tensors()) weight_map[tensor.name].push_back(name);
      } catch (const Error& e) {
        problems.push_back(e.what());
      }
    }
  }
  require_no_problems(dir.string(), problems);
  nlohmann::ordered_json map = nlohmann::ordered_json::object();
  for (const auto& [key, holders] : weight_map)
    map[key] = holders.size() == 1 ? nlohmann::ordered_json(holders.front()) : nlohmann::ordered_json(holders);
  nlohmann::ordered_json index_layout = {{"tp", tp}, {"ep", ep}, {"mode", layout.value("mode", "")}};
  if (grid.blocks != 1) index_layout["blocks"] = grid.blocks;
  const nlohmann::ordered_json index = {{"format", "moelora.sharded"},
                                        {"version", 1},
                                        {"layout", index_layout},
                                        {"layer", layer},
                                        {"prefix", prefix->second},
                                        {"adapters", adapters},
                                        {"files", files},
                                        {"weight_map", map}};
  write_text_file(dir / kShardIndexName, index.dump(2) + "\n");
}

/// Writes this rank's file `dir/adapter-tp{t}-ep{e}.safetensors` (atomically; `dir` is created if
/// needed): every adapter of `layer`, whose base and factors have the rank's local shapes (see the
/// file comment), read on `stream`. The index is written separately by `write_sharded_index`.
template <class Layer>
void save_sharded(Layer& layer, const ShardLayout& layout, const std::filesystem::path& dir, std::string_view prefix,
                  typename Layer::stream_type stream) {
  using Backend = typename Layer::backend_type;
  using policy::Factor;
  layout.validate();
  MOELORA_REQUIRE(layout.mode == TpMode::row || layer.out_features() % layout.blocks == 0, ErrorCode::invalid_argument,
                  "the layer's out = ", layer.out_features(), " does not split into the layout's ", layout.blocks, " blocks");
  const GlobalSizes sizes{layer.num_experts() * layout.ep,
                          layer.in_features() * (layout.mode == TpMode::row ? layout.tp : 1),
                          layer.out_features() * (layout.mode == TpMode::column ? layout.tp : 1)};
  detail::ShardContents contents;
  nlohmann::ordered_json adapters = nlohmann::ordered_json::array();
  for (const std::string& name : layer.adapter_names()) {
    const AdapterView view = layer.adapter(name);
    adapters.push_back(adapter_settings(name, view.config));
    for (const auto& [which, f, factor] : {std::tuple{'a', Factor::a, view.a}, std::tuple{'b', Factor::b, view.b}}) {
      const LocalPart part = local_part(layout, sizes, f, view.config.rank);
      if (part.axis == policy::TpAxis::none && layout.tp_rank != 0) continue;  // replicated: tp_rank 0 writes it
      std::vector<std::byte> all(factor.bytes());
      Backend::copy_to_host(all.data(), factor.data, all.size(), stream);
      const std::size_t per_expert = all.size() / static_cast<std::size_t>(layer.num_experts());
      for (std::int64_t i = 0; i < layer.num_experts(); ++i) {
        const auto begin = all.begin() + static_cast<std::ptrdiff_t>(static_cast<std::size_t>(i) * per_expert);
        contents.add(sharded_key(prefix, which, name, layout.ep_rank * layer.num_experts() + i), st_dtype_of(factor.dtype),
                     global_factor_shape(sizes, f, view.config.rank), part,
                     std::vector<std::byte>(begin, begin + static_cast<std::ptrdiff_t>(per_expert)));
      }
    }
  }
  std::filesystem::create_directories(dir);
  detail::write_shard(dir, layout, sizes, prefix, adapters, contents);
}

/// Loads the sharded checkpoint in `dir` into `layer`, the rank `layout` of a grid that may differ
/// from the one that saved (factors re-stacked into `[E_local, …]`, TP slices reassembled or cut),
/// restoring scale, enabled and trainable; strict (see the file comment). Copies on `stream`.
template <class Layer>
void load_sharded(Layer& layer, const ShardLayout& layout, const std::filesystem::path& dir, std::string_view prefix,
                  typename Layer::stream_type stream) {
  using Backend = typename Layer::backend_type;
  using policy::Factor;
  layout.validate();
  ShardedCheckpoint checkpoint(dir);
  const GlobalSizes& sizes = checkpoint.sizes();
  std::vector<std::string> problems = split_problems(sizes, layout.grid());
  if (problems.empty()) {
    const std::int64_t experts = sizes.experts / layout.ep;
    const std::int64_t in = layout.mode == TpMode::row ? sizes.in / layout.tp : sizes.in;
    const std::int64_t out = layout.mode == TpMode::column ? sizes.out / layout.tp : sizes.out;
    if (layer.num_experts() != experts || layer.in_features() != in || layer.out_features() != out)
      problems.push_back("the layer holds E=" + std::to_string(layer.num_experts()) + " in=" +
                         std::to_string(layer.in_features()) + " out=" + std::to_string(layer.out_features()) +
                         " but rank tp " + std::to_string(layout.tp_rank) + "/" + std::to_string(layout.tp) + ", ep " +
                         std::to_string(layout.ep_rank) + "/" + std::to_string(layout.ep) + " (" +
                         std::string(tp_mode_name(layout.mode)) + ") of the checkpoint's E=" +
                         std::to_string(sizes.experts) + " in=" + std::to_string(sizes.in) + " out=" +
                         std::to_string(sizes.out) + " holds E=" + std::to_string(experts) + " in=" +
                         std::to_string(in) + " out=" + std::to_string(out));
  }
  if (checkpoint.prefix() != prefix)
    problems.push_back("its keys use the prefix \"" + checkpoint.prefix() + "\", not \"" + std::string(prefix) + "\"");
  if (layout.mode == TpMode::column && layout.tp > 1 && checkpoint.grid().mode == TpMode::column &&
      checkpoint.grid().blocks != layout.blocks)
    problems.push_back("its B rows are " + std::to_string(checkpoint.grid().blocks) + " block(s) but the layer shards " +
                       std::to_string(layout.blocks) + " over tp");
  require_no_problems(dir.string(), problems);

  struct Pending {
    std::string name;
    std::vector<std::byte> a, b;
    RestoredSettings settings;
  };
  std::vector<Pending> pending;
  std::vector<std::string> expected_keys;
  for (const std::string& name : layer.adapter_names()) {
    const AdapterView view = layer.adapter(name);
    const std::int64_t rank = view.config.rank;
    for (std::int64_t g = 0; g < sizes.experts; ++g)
      for (const char which : {'a', 'b'}) expected_keys.push_back(sharded_key(prefix, which, name, g));
    const auto entry = std::find_if(checkpoint.adapters().begin(), checkpoint.adapters().end(),
                                    [&](const nlohmann::json& s) { return s.is_object() && s.value("name", "") == name; });
    if (entry == checkpoint.adapters().end()) {
      problems.push_back("missing adapter \"" + name + "\"");
      continue;
    }
    if (entry->value("rank", std::int64_t{0}) != rank || entry->value("dtype", "") != dtype_name(view.config.dtype)) {
      problems.push_back("adapter \"" + name + "\" is " + entry->value("dtype", "?") + " rank " +
                         std::to_string(entry->value("rank", std::int64_t{0})) + " in the checkpoint but " +
                         std::string(dtype_name(view.config.dtype)) + " rank " + std::to_string(rank) + " in the layer");
      continue;
    }
    const std::optional<RestoredSettings> restored = find_settings(checkpoint.adapters(), name, problems);
    Pending p{name, std::vector<std::byte>(view.a.bytes()), std::vector<std::byte>(view.b.bytes()),
              restored.value_or(RestoredSettings{})};
    bool complete = restored.has_value();
    for (std::int64_t g = 0; g < sizes.experts; ++g) {
      for (const auto& [which, f, factor] : {std::tuple{'a', Factor::a, view.a}, std::tuple{'b', Factor::b, view.b}}) {
        const std::string key = sharded_key(prefix, which, name, g);
        const std::int64_t i = g - layout.ep_rank * layer.num_experts();
        if (i < 0 || i >= layer.num_experts()) {  // another rank's expert: only its presence is checked
          if (checkpoint.weight_map().count(key) == 0) problems.push_back("missing " + key);
          continue;
        }
        std::vector<std::byte>& staging = f == Factor::a ? p.a : p.b;
        const std::size_t per_expert = staging.size() / static_cast<std::size_t>(layer.num_experts());
        complete &= checkpoint.gather(key, st_dtype_of(factor.dtype), global_factor_shape(sizes, f, rank),
                                      local_part(layout, sizes, f, rank),
                                      staging.data() + static_cast<std::size_t>(i) * per_expert, problems);
      }
    }
    if (complete) pending.push_back(std::move(p));
  }
  for (const nlohmann::json& s : checkpoint.adapters())
    if (s.is_object() && !layer.has_adapter(s.value("name", ""))) problems.push_back("unexpected adapter \"" + s.value("name", "") + "\"");
  std::sort(expected_keys.begin(), expected_keys.end());
  for (const auto& [key, files] : checkpoint.weight_map())
    if (!std::binary_search(expected_keys.begin(), expected_keys.end(), key)) problems.push_back("unexpected " + key);

  require_no_problems(dir.string(), problems);
  for (const Pending& p : pending) {
    const AdapterView view = layer.adapter(p.name);
    Backend::copy_from_host(view.a.data, p.a.data(), p.a.size(), stream);
    Backend::copy_from_host(view.b.data, p.b.data(), p.b.size(), stream);
    restore_settings(layer, p.name, p.settings, stream);
  }
}

/// `save_sharded` of a live layer, with the layer's own layout (`shard_layout(layer)`): call it on
/// every rank (replicated factors are written by TP rank 0 only), then `write_sharded_index` once.
template <class Layer>
void save_sharded(Layer& layer, const std::filesystem::path& dir, std::string_view prefix,
                  typename Layer::stream_type stream) {
  save_sharded(layer, shard_layout(layer), dir, prefix, stream);
}

/// `load_sharded` into a live layer, with the layer's own layout (`shard_layout(layer)`): every
/// rank loads its part, whatever the layout that saved.
template <class Layer>
void load_sharded(Layer& layer, const std::filesystem::path& dir, std::string_view prefix,
                  typename Layer::stream_type stream) {
  load_sharded(layer, shard_layout(layer), dir, prefix, stream);
}

/// Rewrites the sharded checkpoint in `src` for the grid `grid` into `dst` (another directory,
/// created if needed): every rank file of the new grid, then the index. Pure file work, bitwise:
/// the factors are re-cut, never converted. Uneven splits and a damaged `src` throw one
/// ErrorCode::invalid_argument listing the problems (before anything is written).
inline void reshard(const std::filesystem::path& src, const std::filesystem::path& dst, const ShardGrid& grid) {
  using policy::Factor;
  ShardLayout{grid.tp, 0, grid.ep, 0, grid.mode, grid.blocks}.validate();
  std::error_code same_error;
  MOELORA_REQUIRE(!std::filesystem::equivalent(src, dst, same_error), ErrorCode::invalid_argument,
                  "reshard needs a destination other than its source ", src.string());
  ShardedCheckpoint checkpoint(src);
  const GlobalSizes& sizes = checkpoint.sizes();
  std::vector<std::string> problems = split_problems(sizes, grid);
  require_no_problems(src.string() + " into tp=" + std::to_string(grid.tp) + " ep=" + std::to_string(grid.ep) +
                          " (" + std::string(tp_mode_name(grid.mode)) + ")",
                      problems);

  std::vector<std::pair<ShardLayout, detail::ShardContents>> ranks;
  const std::int64_t experts = sizes.experts / grid.ep;
  for (std::int64_t e = 0; e < grid.ep; ++e) {
    for (std::int64_t t = 0; t < grid.tp; ++t) {
      const ShardLayout layout{grid.tp, t, grid.ep, e, grid.mode, grid.blocks};
      detail::ShardContents contents;
      for (const nlohmann::json& s : checkpoint.adapters()) {
        const std::string name = s.value("name", "");
        const std::int64_t rank = s.value("rank", std::int64_t{0});
        DType dtype = DType::fp32;
        try {
          dtype = parse_dtype(s.value("dtype", ""));
        } catch (const Error& error) {
          problems.push_back("adapter \"" + name + "\": " + error.what());
          continue;
        }
        for (std::int64_t i = 0; i < experts; ++i) {
          for (const auto& [which, f] : {std::pair{'a', Factor::a}, std::pair{'b', Factor::b}}) {
            const LocalPart part = local_part(layout, sizes, f, rank);
            if (part.axis == policy::TpAxis::none && t != 0) continue;
            const std::vector<std::int64_t> shape = part.shape();
            std::vector<std::byte> bytes(static_cast<std::size_t>(shape[0] * shape[1]) * dtype_size(dtype));
            const std::string key = sharded_key(checkpoint.prefix(), which, name, e * experts + i);
            const std::vector<std::int64_t> global = global_factor_shape(sizes, f, rank);
            if (checkpoint.gather(key, st_dtype_of(dtype), global, part, bytes.data(), problems))
              contents.add(key, st_dtype_of(dtype), global, part, std::move(bytes));
          }
        }
      }
      ranks.emplace_back(layout, std::move(contents));
    }
  }
  require_no_problems(src.string(), problems);
  std::filesystem::create_directories(dst);
  const nlohmann::ordered_json adapters = checkpoint.adapters();
  for (const auto& [layout, contents] : ranks) detail::write_shard(dst, layout, sizes, checkpoint.prefix(), adapters, contents);
  write_sharded_index(dst);
}

}  // namespace moelora::io
