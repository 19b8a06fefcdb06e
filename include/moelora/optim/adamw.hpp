/// \file
/// \brief AdamW over the trainable adapters of one or several layers, with fp32 master weights for
/// 16-bit factors, global-norm gradient clipping, skipping of non-finite steps, dynamic loss
/// scaling and a learning-rate schedule; every decision is taken in backend memory, so a step never
/// synchronises the host (optim/multi_tensor.hpp).
#pragma once

#include <algorithm>
#include <concepts>
#include <cstddef>
#include <cstdint>
#include <initializer_list>
#include <map>
#include <optional>
#include <string>
#include <string_view>
#include <type_traits>
#include <utility>
#include <vector>

#include "moelora/core/buffer.hpp"
#include "moelora/core/tensor.hpp"
#include "moelora/optim/adamw_math.hpp"
#include "moelora/optim/layer_ref.hpp"
#include "moelora/optim/multi_tensor.hpp"
#include "moelora/optim/norm_groups.hpp"
#include "moelora/parallel/communicator.hpp"

namespace moelora {

/// One factor's AdamW state, as views into backend memory.
struct AdamWFactorState {
  TensorRef m;         ///< first moment, fp32, the factor's shape
  TensorRef v;         ///< second moment, fp32, the factor's shape
  TensorRef master;    ///< fp32 master weights of a 16-bit factor; null data for an fp32 factor
  std::int64_t* step;  ///< the factor's step count (one int64)
};

/// One adapter's AdamW state: the adapter instance (`AdapterView::id`) it belongs to and its factors'.
struct AdamWAdapterState {
  std::uint64_t adapter_id;
  AdamWFactorState a, b;
};

/// The optimizer-wide counters of AdamW.
struct AdamWCounters {
  std::int64_t step = 0;            ///< updates applied (the schedule's step)
  std::int64_t skipped = 0;         ///< steps skipped because a gradient was not finite
  std::int64_t growth_tracker = 0;  ///< finite steps since the loss scale last changed
  float loss_scale = 1.0f;          ///< the dynamic loss scale (1 without loss scaling)
  friend bool operator==(const AdamWCounters&, const AdamWCounters&) = default;
};

/// AdamW for the adapters of one or several layers on `Layer`'s backend (layers of other types on
/// that backend are stepped through `LayerRef`). A step covers every trainable, enabled adapter of
/// the layers it is given; frozen or disabled adapters keep their state and are not stepped.
///
/// State per adapter and factor, in backend memory: fp32 moments m, v; fp32 master weights for
/// bf16/fp16 factors (read from the factor at the factor's first step; 16-bit factors are written
/// as round(master) each step); the factor's step count (its bias corrections). State is created at
/// an adapter's first step, keyed by the layer's position in the step's list (its *group*: 0 for
/// `step(layer, stream)`) and the adapter name, belongs to one adapter instance (a removed and
/// re-added adapter starts fresh) and is dropped at the first step that no longer finds it.
/// Optimizer-wide state, also in backend memory: the number of applied updates (the schedule's
/// step), of skipped steps, and the loss scale with its growth tracker (`Counters`).
template <class Layer>
class AdamW {
 public:
  using backend_type = typename Layer::backend_type;
  using stream_type = typename backend_type::stream_type;
  using layer_ref = LayerRef<backend_type>;

  using FactorState = AdamWFactorState;
  using AdapterState = AdamWAdapterState;
  using Counters = AdamWCounters;

  /// Throws ErrorCode::invalid_argument for invalid settings (validate_adamw_config).
  explicit AdamW(AdamWConfig config = {}) : config_(validate_adamw_config(config)) {}

  [[nodiscard]] const AdamWConfig& config() const { return config_; }
  /// Changes the base learning rate (the schedule scales it); the other settings stay.
  void set_lr(float lr) {
    AdamWConfig changed = config_;
    changed.lr = lr;
    config_ = validate_adamw_config(changed);
  }
  /// Replaces every setting (validated); the state and counters stay (a checkpoint load uses it).
  void set_config(const AdamWConfig& config) { config_ = validate_adamw_config(config); }

  /// One step of every trainable, enabled adapter of `layer` (group 0) from its fp32 gradients, on
  /// `stream`; see `step(layers, stream)`.
  const float* step(Layer& layer, stream_type stream) { return step({layer_ref(layer)}, stream); }

  /// One step of every trainable, enabled adapter of `layers` (group i = the i-th layer), queued on
  /// `stream` as two passes over all their gradients (one when clipping, the finite check and loss
  /// scaling are all off): the statistics — the global L2 norm over all of them and whether any
  /// element is NaN or Inf — and the update. A non-finite step (with `skip_nonfinite`) changes no
  /// factor, moment, master weight or step count and counts as skipped; otherwise every gradient is
  /// multiplied by 1/loss scale and by PyTorch's clip coefficient min(1, max_grad_norm / (norm +
  /// 1e-6)) inside the update (the gradient buffers are not modified). Returns the step's norm (of
  /// the unscaled gradients; NaN when not finite or not computed) in backend memory, valid until
  /// the next step; `last_norm` reads it.
  ///
  /// Allocation and synchronisation happen only at an adapter's first step (its state) and when the
  /// set of stepped tensors changed since the last step (a table uploaded to backend memory); a
  /// step after one with the same adapters does neither, and can be captured in a CUDA graph.
  const float* step(std::initializer_list<layer_ref> layers, stream_type stream) { return run(layers, stream, nullptr); }

  /// One step of adapters sharded over ranks: as `step(layers, stream)`, with the gradient
  /// statistics summed over `groups` (see NormGroups) before the decision, so that every rank
  /// clips by the same global norm and skips the same steps. Every rank of a group must call it
  /// with the same settings, in the same order as its other collectives.
  template <parallel::Communicator Comm>
    requires std::same_as<typename Comm::backend_type, backend_type>
  const float* step(std::initializer_list<layer_ref> layers, stream_type stream, const NormGroups<Comm>& groups) {
    return run(layers, stream, [&](float* sums) {
      using parallel::CommElement, parallel::ReduceOp;
      if (groups.tp) groups.tp->all_reduce(sums, sums, 1, CommElement::fp32, ReduceOp::sum, stream);
      if (groups.ep) groups.ep->all_reduce(sums, sums, 2, CommElement::fp32, ReduceOp::sum, stream);
    });
  }

  /// Reads the counters (synchronises the stream).
  [[nodiscard]] Counters counters(stream_type stream) {
    const StepControl c = read_control(stream);
    return {c.step, c.skipped, c.growth_tracker, c.loss_scale};
  }
  /// Sets the counters (a checkpoint load uses it; synchronises the stream).
  void set_counters(const Counters& counters, stream_type stream) {
    StepControl c = read_control(stream);
    c.step = counters.step, c.skipped = counters.skipped, c.growth_tracker = counters.growth_tracker;
    c.loss_scale = counters.loss_scale;
    backend_type::copy_from_host(control_.data(), &c, sizeof(c), stream);
  }
  /// The last step's global gradient norm (synchronises the stream).
  [[nodiscard]] float last_norm(stream_type stream) { return read_control(stream).norm; }
  /// The current loss scale in backend memory (one fp32; 1 without loss scaling), for the loss
  /// kernel to multiply the loss gradient by; a step updates it after its own gradients were used.
  [[nodiscard]] const float* loss_scale_data(stream_type stream) {
    ensure_control(stream);
    return &control()->loss_scale;
  }
  /// Steps taken by adapter `name` of `group` (0 without state; synchronises the stream).
  [[nodiscard]] std::int64_t steps(std::string_view name, stream_type stream, int group = 0) const {
    const auto it = states_.find(Key{group, std::string(name)});
    if (it == states_.end()) return 0;
    std::int64_t value = 0;
    backend_type::copy_to_host(&value, it->second.steps.data(), sizeof(value), stream);
    return value;
  }

  /// The state of adapter `name` of `group`, if it has one.
  [[nodiscard]] std::optional<AdapterState> state(std::string_view name, int group = 0) {
    const auto it = states_.find(Key{group, std::string(name)});
    if (it == states_.end()) return std::nullopt;
    return it->second.views();
  }
  /// A fresh state (zero moments and step counts) for `adapter` of `group`, replacing any it had;
  /// a checkpoint load fills it.
  AdapterState reset_state(const AdapterView& adapter, stream_type stream, int group = 0) {
    State& s = states_.insert_or_assign(Key{group, std::string(adapter.name)}, State(adapter, stream)).first->second;
    return s.views();
  }
  /// Drops the state of adapter `name` of `group` (if any).
  void clear_state(std::string_view name, int group = 0) { states_.erase(Key{group, std::string(name)}); }

 private:
  using Key = std::pair<int, std::string>;

  /// One factor's buffers.
  struct Moments {
    Buffer<backend_type> m, v, master;  // fp32; master only for 16-bit factors
    Shape shape;

    Moments(const TensorRef& param, stream_type stream)
        : m(bytes(param)), v(bytes(param)), master(param.dtype == DType::fp32 ? 0 : bytes(param)), shape(param.shape) {
      backend_type::fill_zero(m.data(), m.bytes(), stream);
      backend_type::fill_zero(v.data(), v.bytes(), stream);
    }
    static std::size_t bytes(const TensorRef& param) { return static_cast<std::size_t>(param.numel()) * sizeof(float); }
    [[nodiscard]] FactorState views(std::int64_t* step) const {
      return {{m.data(), DType::fp32, shape}, {v.data(), DType::fp32, shape}, {master.data(), DType::fp32, shape}, step};
    }
  };

  struct State {
    std::uint64_t adapter_id = 0;
    Moments a, b;
    Buffer<backend_type> steps;  // int64 [2]: the step counts of A and B

    State(const AdapterView& view, stream_type stream)
        : adapter_id(view.id), a(view.a, stream), b(view.b, stream), steps(2 * sizeof(std::int64_t)) {
      backend_type::fill_zero(steps.data(), steps.bytes(), stream);
    }
    [[nodiscard]] AdapterState views() const {
      return {adapter_id, a.views(steps.template as<std::int64_t>()), b.views(steps.template as<std::int64_t>() + 1)};
    }
  };

  StepControl* control() const { return control_.template as<StepControl>(); }

  void ensure_control(stream_type stream) {
    if (control_.data()) return;
    control_ = Buffer<backend_type>(sizeof(StepControl));
    partials_ = Buffer<backend_type>(2 * kOptimBlocks * sizeof(double));
    StepControl initial;
    if (config_.loss_scaling.enabled) initial.loss_scale = config_.loss_scaling.init_scale;
    backend_type::copy_from_host(control_.data(), &initial, sizeof(initial), stream);
  }

  StepControl read_control(stream_type stream) {
    ensure_control(stream);
    StepControl c;
    backend_type::copy_to_host(&c, control_.data(), sizeof(c), stream);
    return c;
  }

  static bool aligned(const void* p) { return reinterpret_cast<std::uintptr_t>(p) % 16 == 0; }

  /// The table entry of factor `f` of `view` with state `s`.
  static OptimTensor describe(const AdapterView& view, policy::Factor f, const AdapterState& s, bool sharded,
                              std::int64_t first_chunk) {
    const bool is_a = f == policy::Factor::a;
    const TensorRef& param = is_a ? view.a : view.b;
    const FactorState& state = is_a ? s.a : s.b;
    OptimTensor t;
    t.param = param.data;
    t.master = static_cast<float*>(state.master.data);
    t.grad = static_cast<const float*>((is_a ? view.grad_a : view.grad_b).data);
    t.m = static_cast<float*>(state.m.data);
    t.v = static_cast<float*>(state.v.data);
    t.step = state.step;
    t.count = param.numel();
    t.first_chunk = first_chunk;
    t.dtype = param.dtype;
    t.sharded = sharded;
    t.vectorized = aligned(t.param) && aligned(t.master) && aligned(t.grad) && aligned(t.m) && aligned(t.v);
    return t;
  }

  /// Drops the states of `group` whose adapter is gone or was re-created.
  void drop_stale(const layer_ref& layer, int group, const std::vector<std::string>& names) {
    std::erase_if(states_, [&](const auto& entry) {
      if (entry.first.first != group) return false;
      if (std::find(names.begin(), names.end(), entry.first.second) == names.end()) return true;
      return layer.adapter(entry.first.second).id != entry.second.adapter_id;
    });
  }

  /// The step; `reduce(sums, stream)` (or nullptr: none) sums the statistics across ranks.
  template <class Reduce>
  const float* run(std::initializer_list<layer_ref> layers, stream_type stream, Reduce&& reduce) {
    constexpr bool kReduced = !std::is_same_v<std::remove_cvref_t<Reduce>, std::nullptr_t>;
    ensure_control(stream);
    std::vector<OptimTensor> table;
    std::int64_t chunks = 0;
    int group = 0;
    for (const layer_ref& layer : layers) {
      const std::vector<std::string> names = layer.adapter_names();
      drop_stale(layer, group, names);
      for (const std::string& name : names) {
        const AdapterView view = layer.adapter(name);
        if (!view.config.trainable || !view.config.enabled) continue;
        auto it = states_.find(Key{group, name});
        if (it == states_.end()) it = states_.emplace(Key{group, name}, State(view, stream)).first;
        const AdapterState s = it->second.views();
        for (const policy::Factor f : {policy::Factor::a, policy::Factor::b}) {
          table.push_back(describe(view, f, s, layer.sharded(f), chunks));
          chunks += optim_chunks(table.back().count);
        }
      }
      ++group;
    }
    if (table.empty() && !kReduced) return &control()->norm;
    if (table != uploaded_ && !table.empty()) {
      table_.reserve(table.size() * sizeof(OptimTensor));
      backend_type::copy_from_host(table_.data(), table.data(), table.size() * sizeof(OptimTensor), stream);
      uploaded_ = table;
    }
    OptimBatch batch;
    batch.tensors = table_.template as<const OptimTensor>();
    batch.tensor_count = static_cast<std::int32_t>(table.size());
    batch.chunk_count = chunks;
    batch.control = control();
    batch.partials = partials_.template as<double>();
    batch.config = config_;
    batch.use_stats = config_.needs_grad_stats();
    batch.finish_in_stats = !kReduced;
    if (batch.use_stats) {
      // A rank with nothing to step still takes part in the reduction, with zero sums.
      if (table.empty()) backend_type::fill_zero(control()->reduced, sizeof(control()->reduced), stream);
      else backend_type::optim_grad_stats(batch, stream);
      if constexpr (kReduced) {
        reduce(control()->reduced);
        backend_type::optim_finish_stats(batch, stream);
      }
    }
    if (!table.empty()) backend_type::optim_update(batch, stream);
    return &control()->norm;
  }

  AdamWConfig config_;
  std::map<Key, State> states_;
  Buffer<backend_type> control_;   // one StepControl
  Buffer<backend_type> partials_;  // 2 · kOptimBlocks doubles
  Buffer<backend_type> table_;     // the uploaded OptimTensor table
  std::vector<OptimTensor> uploaded_;
};

}  // namespace moelora
