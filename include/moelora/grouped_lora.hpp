/// \file
/// \brief GroupedLoRA<Base, Policies...>: named LoRA adapters on the experts of a grouped linear base,
/// on one device or as one rank of a tensor/expert-parallel layer (policy::ColumnParallel,
/// policy::RowParallel; docs/parallel.md).
///
/// Layouts (row-major, local to the rank): x `[T, in]`, y `[T, out]` grouped by expert per
/// `tokens_per_expert` `[E]`; per adapter A `[E, r, in]`, B `[E, out, r]` in the adapter's dtype,
/// gradients fp32 of the same shapes; E, in and out are the base's. Forward:
/// `y = base(x) + Σ_enabled scale · B_e A_e x_t`. Backward: `dA`, `dB` `+=` (gradient accumulation)
/// or `=` (the first micro-batch), and `dx = baseᵀ(dy) + Σ_enabled A_eᵀ u_t`. All work, collectives
/// included, is queued on the caller's stream.
#pragma once

#include <algorithm>
#include <concepts>
#include <cstdint>
#include <cstring>
#include <list>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "moelora/concepts.hpp"
#include "moelora/core/buffer.hpp"
#include "moelora/core/config.hpp"
#include "moelora/core/error.hpp"
#include "moelora/core/tensor.hpp"
#include "moelora/core/warnings.hpp"
#include "moelora/init/svd_init.hpp"
#include "moelora/parallel/agreement.hpp"
#include "moelora/parallel/communicator_ref.hpp"
#include "moelora/parallel/placement.hpp"
#include "moelora/parallel/sharded_init.hpp"
#include "moelora/policies/policy_set.hpp"

namespace moelora {

/// One adapter as the caller sees it: its settings and views of its factors and gradients (in the
/// backend's memory). The views stay valid until the adapter is removed (gradient views: until it
/// is frozen).
struct AdapterView {
  std::string_view name;
  std::uint64_t id;  ///< unique per adapter instance of the layer (a re-added name gets a new id)
  const ResolvedAdapterConfig& config;
  TensorRef a;       ///< `[E, r, in]`, factor dtype (this rank's slice)
  TensorRef b;       ///< `[E, out, r]`, factor dtype (this rank's slice)
  TensorRef grad_a;  ///< `[E, r, in]` fp32; null data while the adapter is frozen
  TensorRef grad_b;  ///< `[E, out, r]` fp32; null data while the adapter is frozen
};

/// LoRA adapters on a frozen grouped base. Move-only; owns the base, the factors, their gradients
/// and the activations saved by the last forward (one forward/backward pair in flight at a time).
///
/// The parallel-mode policy decides the tensor-parallel contract (docs/parallel.md):
/// - `policy::NoTensorParallel` (default): whole factors; optionally an expert-parallel placement.
/// - `policy::ColumnParallel` (fc1: W `[out/tp, in]`): A replicated, B sharded by rows. x is full
///   and identical on every rank, y `[T, out/tp]` local, dx **partial** (the caller sums it, as it
///   does the base's). The backward all-reduces u `[T, r]` (fp32) over the TP group for dA.
/// - `policy::RowParallel` (fc2: W `[out, in/tp]`): A sharded by columns, B replicated. x
///   `[T, in/tp]` local, y **partial** (the caller sums it), dy full and identical on every rank,
///   dx local. The backward all-reduces the forward's fp32 partial h `[T, r]` for dB.
/// Every rank of the TP group calls every method in the same order with the same T, counts and
/// adapter settings; the replicated factor's gradient is then bitwise equal on every rank.
template <GroupedLinearBase Base, class... Policies>
class GroupedLoRA {
 public:
  using base_type = Base;
  using backend_type = typename Base::backend_type;
  using stream_type = typename backend_type::stream_type;
  using policies = policy::PolicySet<Policies...>;
  using parallel_mode = typename policies::parallel_mode;
  /// Whether the layer is one rank of a tensor-parallel group (ColumnParallel or RowParallel).
  static constexpr bool kTensorParallel = !std::is_same_v<parallel_mode, policy::NoTensorParallel>;

  /// A single-device layer (NoTensorParallel) over `base`, optionally holding experts
  /// `[ep_rank · E, (ep_rank + 1) · E)` of an expert-parallel layer (only `ep_rank`, `ep_size` of
  /// the placement apply; they key the initialisation and the sharded checkpoints).
  explicit GroupedLoRA(Base base, const parallel::Placement& placement = {})
    requires(!kTensorParallel)
      : base_(std::move(base)) {
    check_base();
    shard_ = parallel::resolve_shard<parallel_mode>(placement, num_experts(), in_features(), out_features(), 0, 1);
  }

  /// One rank of a tensor-parallel layer: `base` holds this rank's weights (column:
  /// `[E, out/tp, in]`, row: `[E, out, in/tp]`), `tp` is the expert-tensor-parallel group (a
  /// Communicator of this backend, owned by the caller and outliving the layer), `placement` the
  /// expert-parallel place, the expected sizes and (column) the out blocks. Validates the placement
  /// on the host, then checks on `stream` (one all-gather and a host sync) that every rank of `tp`
  /// builds the same layer; throws on every rank otherwise.
  template <parallel::Communicator C>
    requires(kTensorParallel && std::same_as<typename C::backend_type, backend_type>)
  GroupedLoRA(Base base, C& tp, const parallel::Placement& placement, stream_type stream)
      : base_(std::move(base)), tp_(tp) {
    check_base();
    shard_ = parallel::resolve_shard<parallel_mode>(placement, num_experts(), in_features(), out_features(), tp_.rank(),
                                                    tp_.size());
    const parallel::Shard& s = shard_;
    parallel::require_agreement(tp_, "layer",
                                {{"mode", s.column() ? 1 : 2},
                                 {"tp_size", s.tp_size},
                                 {"ep_rank", s.ep_rank},
                                 {"ep_size", s.ep_size},
                                 {"experts", s.experts},
                                 {"in", s.global_in()},
                                 {"out", s.global_out()},
                                 {"out_blocks", s.out_blocks},
                                 {"dtype", static_cast<std::int64_t>(dtype())}},
                                stream);
  }

  GroupedLoRA(GroupedLoRA&&) noexcept = default;
  GroupedLoRA& operator=(GroupedLoRA&&) noexcept = default;

  [[nodiscard]] Base& base() { return base_; }
  [[nodiscard]] const Base& base() const { return base_; }
  /// Local sizes (the base's): E_local, in and out of this rank.
  [[nodiscard]] std::int64_t num_experts() const { return base_.num_experts(); }
  [[nodiscard]] std::int64_t in_features() const { return base_.in_features(); }
  [[nodiscard]] std::int64_t out_features() const { return base_.out_features(); }
  [[nodiscard]] DType dtype() const { return base_.dtype(); }
  /// This rank's place: TP and EP ranks, local and global sizes, the maps between them.
  [[nodiscard]] const parallel::Shard& shard() const { return shard_; }
  /// The tensor-parallel group (a group of one rank for NoTensorParallel).
  [[nodiscard]] const parallel::CommunicatorRef<backend_type>& tp_communicator() const { return tp_; }

  // ---- adapters -------------------------------------------------------------------------------

  /// Adds adapter `name` (unique, non-empty) and initialises its factors on `stream`. The SVD-based
  /// methods need a base modelling init::SvdInitBase (QuantizedGroupedLinear), synchronise the
  /// stream, may update the base's quantized weights (loftq, svd_first, pissa), and report their
  /// per-expert errors; kaiming_zeros reports nothing.
  init::InitReport add_adapter(std::string name, const AdapterConfig& config, stream_type stream) {
    MOELORA_REQUIRE(!name.empty(), ErrorCode::invalid_argument, "an adapter name must not be empty");
    MOELORA_REQUIRE(find(name) == nullptr, ErrorCode::duplicate_adapter, "adapter \"", name, "\" already exists");
    ResolvedAdapterConfig resolved = resolve(config, constraints());
    MOELORA_REQUIRE(!is_svd_init(resolved.init) || init::SvdInitBase<Base>, ErrorCode::unsupported, "init method ",
                    init_method_name(resolved.init),
                    " needs a base that owns its weights (init::SvdInitBase, e.g. QuantizedGroupedLinear)");
    if (!config.seed) resolved.seed = name_seed(name);
    if (tp_.size() > 1) {
      std::uint32_t scale_bits = 0;
      const float scale = resolved.scale;
      std::memcpy(&scale_bits, &scale, sizeof scale_bits);
      parallel::require_agreement(tp_, "adapter \"" + name + "\"",
                                  {{"name", static_cast<std::int64_t>(name_seed(name))},
                                   {"rank", resolved.rank},
                                   {"dtype", static_cast<std::int64_t>(resolved.dtype)},
                                   {"scale", scale_bits},
                                   {"init", static_cast<std::int64_t>(resolved.init)},
                                   {"init_iterations", resolved.init_iterations},
                                   {"seed", static_cast<std::int64_t>(resolved.seed)},
                                   {"enabled", resolved.enabled},
                                   {"trainable", resolved.trainable}},
                                  stream);
    }
    Slot slot{std::move(name), next_id_, resolved, Buffer<backend_type>(factor_bytes(resolved, Factor::a)),
              Buffer<backend_type>(factor_bytes(resolved, Factor::b)), {}, {}, {}, false, {}, false, false};
    if (resolved.trainable) allocate_grads(slot, stream);
    init::InitReport report = initialize(slot, stream);
    slots_.push_back(std::move(slot));
    ++next_id_;
    return report;
  }

  /// Where warnings go (default: log_warning, on std::clog).
  void set_warning_sink(WarningSink sink) { warn_ = std::move(sink); }

  /// Removes adapter `name` with its factors, gradients and saved activations.
  void remove_adapter(std::string_view name) {
    get(name);  // throws for an unknown name
    slots_.remove_if([&](const Slot& s) { return s.name == name; });
  }

  [[nodiscard]] bool has_adapter(std::string_view name) const { return find(name) != nullptr; }

  /// Adapter names in insertion order (the order in which deltas are summed).
  [[nodiscard]] std::vector<std::string> adapter_names() const {
    std::vector<std::string> names;
    for (const Slot& slot : slots_) names.push_back(slot.name);
    return names;
  }

  [[nodiscard]] AdapterView adapter(std::string_view name) { return view(get(name)); }

  /// A disabled adapter adds nothing to the output and receives no gradient.
  void set_enabled(std::string_view name, bool enabled) { get(name).config.enabled = enabled; }

  /// Changes an adapter's scale (finite, > 0); takes effect from the next forward. (Under tensor
  /// parallelism this and the other setters must be called alike on every rank of the group.)
  void set_scale(std::string_view name, double scale) {
    Slot& slot = get(name);
    slot.config.scale = validate_scale(scale);
  }

  /// Freezes (no dA, dB; gradients released) or unfreezes (zeroed gradients allocated) an adapter.
  void set_trainable(std::string_view name, bool trainable, stream_type stream) {
    Slot& slot = get(name);
    if (trainable && !slot.config.trainable) allocate_grads(slot, stream);
    if (!trainable) slot.grad_a = {}, slot.grad_b = {};
    slot.config.trainable = trainable;
  }

  /// Zeroes the gradients of every trainable adapter. (A backward with `WriteMode::overwrite`
  /// needs no zero_grad before it.)
  void zero_grad(stream_type stream) {
    for (Slot& slot : slots_) zero_grads(slot, stream);
  }

  /// Sizes the saved activations of every adapter, the backend's workspace and the base's scratch
  /// (a base with a `reserve(rows)` member, e.g. QuantizedGroupedLinear) for calls of up to `rows`
  /// rows, so that later calls of at most that size (with the adapters present now) allocate nothing.
  void reserve(std::int64_t rows) {
    MOELORA_REQUIRE(rows >= 0, ErrorCode::invalid_argument, "reserve(rows) needs rows >= 0, got ", rows);
    reserved_rows_ = std::max(reserved_rows_, rows);
    std::int64_t max_rank = 0;
    for (Slot& slot : slots_) {
      reserve_saved(slot, reserved_rows_);
      max_rank = std::max(max_rank, slot.config.rank);
      fused_u_.reserve(saved_bytes(slot, reserved_rows_));
    }
    workspace_.reserve(reserved_rows_, num_experts(), max_rank);
    if constexpr (requires(Base& b) { b.reserve(std::int64_t{}); }) base_.reserve(reserved_rows_);
  }

  // ---- compute --------------------------------------------------------------------------------

  /// `y = base(x) + Σ_enabled scale · B_e A_e x_t`. x `[T, in]`, y `[T, out]` (overwritten), both of
  /// the base's dtype; `counts` `[E]` on the host or (CUDA) the device, Σ = T. Saves `h = A x` of
  /// each enabled adapter for `backward`. With a LowRankFusingGroupedLinearBase that takes the first
  /// enabled adapter (`fuses_low_rank`), that adapter's projection writes
  /// `h = round(scale · A_e x_t)` and the base's GEMM adds `B_e h_t` in its own accumulator while it
  /// writes y. Otherwise, with an AccumulatingGroupedLinearBase the first enabled adapter writes y and
  /// the base adds into it, or the base writes y; the other adapters add.
  /// RowParallel: y is this rank's partial output (the LoRA part adds `scale · h_k Bᵀ` with this
  /// rank's partial h_k; the caller's sum over ranks yields the whole delta); no collective.
  void forward(ConstTensorRef x, const ExpertCounts& counts, TensorRef y, stream_type stream) {
    check_rows("x", x, in_features());
    const std::int64_t rows = x.shape[0];
    check_rows("y", y, out_features(), rows);
    check_counts(counts, rows);
    for (Slot& slot : slots_)
      if (slot.config.enabled) reserve_saved(slot, std::max(rows, reserved_rows_));

    const ExpertSegments& segments = workspace_.prepare_segments(counts, rows, stream);
    saved_rows_ = rows;
    for (Slot& slot : slots_) {
      slot.h_saved = slot.config.enabled;
      slot.h_reduced = false;
      slot.h_scaled = false;
    }
    Slot* fused = fused_slot(rows);
    const bool lora_first = !fused && lora_writes_first(rows);
    if (fused) {
      fused_forward(*fused, x, segments, y, stream);
    } else if (!lora_first) {
      base_.forward(x, segments, y, stream);
    }
    WriteMode y_mode = lora_first ? WriteMode::overwrite : WriteMode::accumulate;
    for (Slot& slot : slots_) {
      if (!slot.config.enabled || rows == 0 || &slot == fused) continue;
      LoraForwardArgs args{shape(rows),       factors(slot), x.data, y.data, slot.saved_h.data(), y_mode,
                           slot.h_sums.template as<float>()};
      backend_type::lora_forward(args, workspace_, stream);
      y_mode = WriteMode::accumulate;
    }
    if constexpr (AccumulatingGroupedLinearBase<Base>)
      if (lora_first) base_.forward(x, segments, y, stream, WriteMode::accumulate);
  }

  /// Backward of the last `forward` (same x and counts): `dA`, `dB` of trainable enabled adapters
  /// `+=` (`grads = accumulate`, gradient accumulation) or `=` (`grads = overwrite`: no zero_grad
  /// needed, the old values are not read; experts without rows get zeros); if `dx.data` is
  /// non-null, `dx = baseᵀ(dy) + Σ_enabled A_eᵀ u_t` (overwritten; as in forward, a
  /// LowRankFusingGroupedLinearBase adds the first enabled adapter's `A_eᵀ u_t` in its GEMM, from
  /// `u = round(scale · B_eᵀ dy)` that the adapter's backward hands it).
  /// ColumnParallel: dy `[T, out/tp]` is this rank's shard; dx is partial (the LoRA part from this
  /// rank's unreduced u_k, summed by the caller like the base's); dA uses u summed over the group
  /// (an fp32 all-reduce of `[T, r]` per trainable adapter). RowParallel: dy is full; dB uses h
  /// summed over the group (an fp32 all-reduce of the saved `[T, r]`, once per forward).
  void backward(ConstTensorRef x, const ExpertCounts& counts, ConstTensorRef dy, TensorRef dx, stream_type stream,
                WriteMode grads = WriteMode::accumulate) {
    check_rows("x", x, in_features());
    const std::int64_t rows = x.shape[0];
    check_rows("dy", dy, out_features(), rows);
    if (dx.data) check_rows("dx", dx, in_features(), rows);
    check_counts(counts, rows);
    MOELORA_REQUIRE(saved_rows_ == rows, ErrorCode::invalid_argument, "backward needs the forward of the same ",
                    rows, " rows first (the last forward saw ", saved_rows_, ")");
    for (const Slot& slot : slots_)
      MOELORA_REQUIRE(!slot.config.enabled || slot.h_saved, ErrorCode::invalid_argument, "adapter \"", slot.name,
                      "\" was enabled after the last forward; run forward again before backward");

    const ExpertSegments& segments = workspace_.prepare_segments(counts, rows, stream);
    Slot* fused = dx.data ? fused_slot(rows) : nullptr;
    const bool lora_first = dx.data && !fused && lora_writes_first(rows);
    const TpReduction reduction{&tp_, stream};
    if (fused) {
      fused_backward(*fused, x, segments, dy, dx, grads, reduction, stream);
    } else if (dx.data && !lora_first) {
      base_.backward_input(dy, segments, dx, stream);
    }
    WriteMode dx_mode = lora_first ? WriteMode::overwrite : WriteMode::accumulate;
    for (Slot& slot : slots_) {
      const bool wants_grads = slot.config.trainable;
      if (!slot.config.enabled || (!wants_grads && !dx.data) || &slot == fused) continue;
      if (rows == 0) {  // no rows: zero gradients, written only when overwriting
        if (wants_grads && grads == WriteMode::overwrite) zero_grads(slot, stream);
        continue;
      }
      backward_slot(slot, x, dy, {dx.data, nullptr, dx_mode}, grads, reduction, stream);
      dx_mode = WriteMode::accumulate;
    }
    if constexpr (AccumulatingGroupedLinearBase<Base>)
      if (lora_first) base_.backward_input(dy, segments, dx, stream, WriteMode::accumulate);
  }

  /// The backend's scratch state (the CUDA backend records there whether device counts were valid).
  [[nodiscard]] typename backend_type::Workspace& workspace() { return workspace_; }

 private:
  using Factor = policy::Factor;

  struct Slot {
    std::string name;
    std::uint64_t id;
    ResolvedAdapterConfig config;
    Buffer<backend_type> a, b;            // factors
    Buffer<backend_type> grad_a, grad_b;  // fp32 gradients, empty while frozen
    Buffer<backend_type> saved_h;         // [T, r] factor dtype
    bool h_saved = false;                 // whether the last forward wrote saved_h
    Buffer<backend_type> h_sums;          // [T, r] fp32: a row-parallel rank's partial h (empty otherwise)
    bool h_reduced = false;               // whether h_sums holds the group's sum already
    bool h_scaled = false;                // whether saved_h is round(scale · A x) (the base fused the expand)
  };

  /// Where an adapter's backward puts its input-gradient part: added into dx by `dx_mode`, or (dx
  /// null) as `u = round(scale · B_eᵀ dy)` `[T, r]` into `u` for the base's GEMM.
  struct InputGradient {
    void* dx;
    void* u;
    WriteMode dx_mode;
  };

  /// The tensor-parallel sum all-reduce of fp32 partial sums, bound to one call's stream.
  struct TpReduction {
    const parallel::CommunicatorRef<backend_type>* comm;
    stream_type stream;
    void sum(float* data, std::size_t count) const {
      comm->all_reduce(data, data, count, parallel::CommElement::fp32, parallel::ReduceOp::sum, stream);
    }
    /// This reduction as a backend's SumAllReduce hook (valid while `*this` lives).
    [[nodiscard]] SumAllReduce hook() const {
      return {[](const void* self, float* data, std::size_t count) { static_cast<const TpReduction*>(self)->sum(data, count); },
              this};
    }
  };

  /// One adapter's backward (rows > 0): dA, dB by `grads` where trainable, and its input-gradient
  /// part.
  void backward_slot(Slot& slot, ConstTensorRef x, ConstTensorRef dy, const InputGradient& input, WriteMode grads,
                     const TpReduction& reduction, stream_type stream) {
    const std::int64_t rows = x.shape[0];
    const bool wants_grads = slot.config.trainable;
    const bool reduce_h = wants_grads && slot.h_sums.data();  // row-parallel: dB needs Σ_k h_k
    if (reduce_h && !slot.h_reduced) {
      reduction.sum(slot.h_sums.template as<float>(), static_cast<std::size_t>(rows * slot.config.rank));
      slot.h_reduced = true;
    }
    LoraBackwardArgs args{shape(rows),
                          factors(slot),
                          x.data,
                          dy.data,
                          slot.saved_h.data(),
                          input.dx,
                          wants_grads ? slot.grad_a.template as<float>() : nullptr,
                          wants_grads ? slot.grad_b.template as<float>() : nullptr,
                          input.dx_mode,
                          grads,
                          {},
                          reduce_h ? slot.h_sums.template as<float>() : nullptr};
    if (partial_u()) args.reduce_u = reduction.hook();
    args.ordered_grads = kTensorParallel;  // the replicated factor's gradient: the same bits on every rank
    args.u = input.u;
    args.h_scaled = slot.h_scaled;
    backend_type::lora_backward(args, workspace_, stream);
  }

  /// The adapter whose expand rides on the base's GEMMs: the first enabled one the base takes as a
  /// LowRankAddend (`fuses_low_rank`), when there are rows. (Row-parallel: the base's GEMM adds
  /// `B h_k` of this rank's partial h_k to its partial output, as the adapter's expand would.)
  Slot* fused_slot(std::int64_t rows) {
    if constexpr (LowRankFusingGroupedLinearBase<Base>) {
      if (rows == 0) return nullptr;
      for (Slot& slot : slots_)
        if (slot.config.enabled && base_.fuses_low_rank(slot.config.rank, slot.config.dtype)) return &slot;
    }
    return nullptr;
  }

  /// The fused adapter's forward (a `fused_slot`): its projection alone saves `h = round(scale · A x)`,
  /// then the base writes y with `B_e h_t` in its GEMM.
  void fused_forward(Slot& slot, ConstTensorRef x, const ExpertSegments& segments, TensorRef y, stream_type stream) {
    if constexpr (LowRankFusingGroupedLinearBase<Base>) {
      slot.h_scaled = true;
      backend_type::lora_forward({shape(x.shape[0]), factors(slot), x.data, nullptr, slot.saved_h.data(),
                                  WriteMode::overwrite, slot.h_sums.template as<float>()},
                                 workspace_, stream);
      base_.forward(x, segments, y, stream, WriteMode::overwrite, {slot.saved_h.data(), slot.b.data(), slot.config.rank});
    }
  }

  /// The fused adapter's backward: dA, dB and `u = round(scale · B_eᵀ dy)` into fused_u_, then the
  /// base writes dx with `A_eᵀ u_t` in its GEMM.
  void fused_backward(Slot& slot, ConstTensorRef x, const ExpertSegments& segments, ConstTensorRef dy, TensorRef dx,
                      WriteMode grads, const TpReduction& reduction, stream_type stream) {
    if constexpr (LowRankFusingGroupedLinearBase<Base>) {
      fused_u_.reserve(saved_bytes(slot, x.shape[0]));
      backward_slot(slot, x, dy, {nullptr, fused_u_.data(), WriteMode::overwrite}, grads, reduction, stream);
      base_.backward_input(dy, segments, dx, stream, WriteMode::overwrite,
                           {fused_u_.data(), slot.a.data(), slot.config.rank});
    }
  }

  /// Column-parallel: u is a partial sum (reduced for dA). Row-parallel: h is a partial sum (saved
  /// in fp32, reduced for dB). Also with one rank, where the reduction is a no-op and the results
  /// equal a NoTensorParallel layer's bit for bit, so that one GPU runs every tensor-parallel path.
  [[nodiscard]] bool partial_u() const { return shard_.column(); }
  [[nodiscard]] bool partial_h() const { return shard_.row(); }

  void check_base() const {
    constexpr std::int64_t kStatic = policies::expert_count::value;
    if constexpr (kStatic != policy::kDynamicExperts) {
      MOELORA_REQUIRE(base_.num_experts() == kStatic, ErrorCode::shape_mismatch, "the base holds ",
                      base_.num_experts(), " experts but the layer's StaticExperts policy says ", kStatic);
    }
    MOELORA_REQUIRE(base_.num_experts() >= 1 && base_.in_features() >= 1 && base_.out_features() >= 1,
                    ErrorCode::shape_mismatch, "the base must have at least one expert, input and output feature");
  }

  /// Sizes the activations a forward of `rows` rows saves for `slot`.
  void reserve_saved(Slot& slot, std::int64_t rows) const {
    slot.saved_h.reserve(saved_bytes(slot, rows));
    if (partial_h()) slot.h_sums.reserve(static_cast<std::size_t>(rows * slot.config.rank) * sizeof(float));
  }

  /// Whether this call's adapters write y (or dx) first and the base then adds into it: the base
  /// can accumulate cheaply (an AccumulatingGroupedLinearBase whose `accumulate_is_cheap()`, where
  /// it has one, is true) and some enabled adapter has rows to write.
  [[nodiscard]] bool lora_writes_first(std::int64_t rows) const {
    if constexpr (AccumulatingGroupedLinearBase<Base>) {
      if constexpr (requires(const Base& b) { { b.accumulate_is_cheap() } -> std::convertible_to<bool>; })
        if (!base_.accumulate_is_cheap()) return false;
      return rows > 0 && std::any_of(slots_.begin(), slots_.end(), [](const Slot& s) { return s.config.enabled; });
    } else {
      return false;
    }
  }

  static void zero_grads(Slot& slot, stream_type stream) {
    if (slot.grad_a.data()) backend_type::fill_zero(slot.grad_a.data(), slot.grad_a.bytes(), stream);
    if (slot.grad_b.data()) backend_type::fill_zero(slot.grad_b.data(), slot.grad_b.bytes(), stream);
  }

  [[nodiscard]] ConfigConstraints constraints() const {
    using P = policies;
    return {dtype(), P::factor_dtype::pinned, P::init_method::method, P::init_method::pinned};
  }

  [[nodiscard]] Shape factor_shape(const ResolvedAdapterConfig& c, Factor f) const {
    return f == Factor::a ? Shape{num_experts(), c.rank, in_features()} : Shape{num_experts(), out_features(), c.rank};
  }
  [[nodiscard]] std::size_t factor_bytes(const ResolvedAdapterConfig& c, Factor f) const {
    return static_cast<std::size_t>(factor_shape(c, f).numel()) * dtype_size(c.dtype);
  }
  static std::size_t saved_bytes(const Slot& slot, std::int64_t rows) {
    return static_cast<std::size_t>(rows * slot.config.rank) * dtype_size(slot.config.dtype);
  }

  void allocate_grads(Slot& slot, stream_type stream) const {
    const auto fp32_bytes = [&](Factor f) {
      return static_cast<std::size_t>(factor_shape(slot.config, f).numel()) * sizeof(float);
    };
    slot.grad_a = Buffer<backend_type>(fp32_bytes(Factor::a));
    slot.grad_b = Buffer<backend_type>(fp32_bytes(Factor::b));
    backend_type::fill_zero(slot.grad_a.data(), slot.grad_a.bytes(), stream);
    backend_type::fill_zero(slot.grad_b.data(), slot.grad_b.bytes(), stream);
  }

  init::InitReport initialize(Slot& slot, stream_type stream) {
    const ResolvedAdapterConfig& c = slot.config;
    if (c.init == InitMethod::kaiming_zeros) {
      backend_type::kaiming_init({slot.a.data(), slot.b.data(), c.dtype, num_experts(), c.rank, in_features(),
                                  out_features(), c.seed, shard_.global_expert(0), shard_.global_in(), shard_.col0()},
                                 stream);
      return {};
    }
    if constexpr (init::SvdInitBase<Base>) {
      const init::SvdInitArgs args{c.init, c.rank, c.scale, c.dtype, c.init_iterations, slot.a.data(), slot.b.data(), slot.name};
      if (tp_.size() > 1) return parallel::sharded_svd_init(base_, tp_, shard_, args, warn_, stream);
      return init::svd_init(base_, args, warn_, stream);
    } else {
      return {};  // rejected by add_adapter
    }
  }

  [[nodiscard]] AdapterView view(Slot& slot) const {
    const auto grad = [&](Buffer<backend_type>& buffer, Factor f) {
      return TensorRef{buffer.data(), DType::fp32, factor_shape(slot.config, f)};
    };
    return {slot.name,
            slot.id,
            slot.config,
            {slot.a.data(), slot.config.dtype, factor_shape(slot.config, Factor::a)},
            {slot.b.data(), slot.config.dtype, factor_shape(slot.config, Factor::b)},
            grad(slot.grad_a, Factor::a),
            grad(slot.grad_b, Factor::b)};
  }

  [[nodiscard]] LoraShape shape(std::int64_t rows) const {
    return {num_experts(), in_features(), out_features(), rows, dtype()};
  }
  static FactorsRef factors(const Slot& slot) {
    return {slot.a.data(), slot.b.data(), slot.config.dtype, slot.config.rank, slot.config.scale};
  }

  /// The initialiser seed of an adapter whose config names none: FNV-1a of its name, so adapters
  /// of the same shape start different, and the same on every backend.
  static std::uint64_t name_seed(std::string_view name) {
    std::uint64_t hash = 0xcbf29ce484222325ull;
    for (const char c : name) hash = (hash ^ static_cast<unsigned char>(c)) * 0x100000001b3ull;
    return hash;
  }

  [[nodiscard]] const Slot* find(std::string_view name) const {
    const auto it = std::find_if(slots_.begin(), slots_.end(), [&](const Slot& s) { return s.name == name; });
    return it == slots_.end() ? nullptr : &*it;
  }
  Slot& get(std::string_view name) {
    const Slot* slot = find(name);
    MOELORA_REQUIRE(slot != nullptr, ErrorCode::unknown_adapter, "no adapter named \"", name, "\"");
    return const_cast<Slot&>(*slot);
  }

  /// A tensor of shape `[rows, features]` (rows = -1: any) and the base's dtype.
  void check_rows(const char* what, ConstTensorRef t, std::int64_t features, std::int64_t rows = -1) const {
    MOELORA_REQUIRE(t.shape.rank == 2 && t.shape[1] == features && (rows < 0 || t.shape[0] == rows),
                    ErrorCode::shape_mismatch, what, " has shape ", t.shape, " but the layer needs [",
                    rows < 0 ? std::string("T") : std::to_string(rows), ", ", features, "]");
    MOELORA_REQUIRE(t.dtype == dtype(), ErrorCode::dtype_mismatch, what, " has dtype ", dtype_name(t.dtype),
                    " but the base's dtype is ", dtype_name(dtype()));
    MOELORA_REQUIRE(t.data != nullptr || t.shape[0] == 0, ErrorCode::invalid_argument, what, " has no data");
  }

  /// Length E; host counts are checked here (non-negative, Σ = rows, or Σ ≤ rows when padded);
  /// device counts are checked by the backend without a host sync.
  void check_counts(const ExpertCounts& counts, std::int64_t rows) const {
    MOELORA_REQUIRE(counts.size == num_experts(), ErrorCode::bad_counts, "tokens_per_expert has ", counts.size,
                    " entries but the layer has ", num_experts(), " experts");
    MOELORA_REQUIRE(counts.data != nullptr, ErrorCode::bad_counts, "tokens_per_expert has no data");
    MOELORA_REQUIRE(counts.memory == Memory::host || backend_type::memory == Memory::device,
                    ErrorCode::bad_counts, "tokens_per_expert is in device memory but the backend runs on the host");
    if (counts.memory != Memory::host) return;
    std::int64_t sum = 0;
    for (std::int64_t e = 0; e < counts.size; ++e) {
      const std::int64_t c = counts.at(e);
      MOELORA_REQUIRE(c >= 0, ErrorCode::bad_counts, "tokens_per_expert[", e, "] is negative (", c, ")");
      sum += c;
    }
    MOELORA_REQUIRE(counts.padded ? sum <= rows : sum == rows, ErrorCode::bad_counts, "tokens_per_expert sums to ", sum,
                    " but x has ", rows, " rows", counts.padded ? " (padded counts may sum to at most that)" : "");
  }

  Base base_;
  parallel::CommunicatorRef<backend_type> tp_;  // the TP group; one rank for NoTensorParallel
  parallel::Shard shard_;
  WarningSink warn_ = log_warning;
  std::list<Slot> slots_;  // stable addresses: AdapterView refers into it
  std::uint64_t next_id_ = 0;
  typename backend_type::Workspace workspace_;
  Buffer<backend_type> fused_u_;  // [T, r] factor dtype: the fused adapter's u for the base's backward GEMM
  std::int64_t reserved_rows_ = 0;
  std::int64_t saved_rows_ = -1;
};

}  // namespace moelora
