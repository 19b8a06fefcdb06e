/// \file
/// \brief The SVD-based initialisers (svdquant, loftq, svd_first, pissa), generic over the backend
/// through the base's `Linalg`, and the `SvdInitBase` concept a base meets to support them.
///
/// Quality is measured per expert as `‖W − Q − scale·B A‖_F / ‖W‖_F`, where Q is what the base
/// computes with afterwards (its dequantized weights) and B, A are the factors as stored (rounded to
/// the adapter's dtype). Every intermediate is fp32 in the backend's memory; the host SVD runs in
/// fp64 (LAPACK), the GPU SVD in fp32 (cuSOLVER).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <numeric>
#include <sstream>
#include <string_view>
#include <utility>
#include <vector>

#include "moelora/concepts.hpp"
#include "moelora/core/buffer.hpp"
#include "moelora/core/config.hpp"
#include "moelora/core/warnings.hpp"
#include "moelora/init/linalg.hpp"

namespace moelora::init {

/// What the SVD-based initialisers read and change: weights W `[E, out, in]` that the holder owns.
/// - `num_experts()`, `in_features()`, `out_features()`, `dtype()`: as for a GroupedLinearBase;
/// - `linalg()`: the backend's Linalg (holding the caller's handles on the GPU);
/// - `source_weight()`: the unquantized weights W `[E, out, in]` (the base's dtype);
/// - `has_quantizer()`: whether the base quantizes its weights;
/// - `fake_quantize(w, out, stream)`: out = Q(w) for w `[E, out, in]` (any dtype) into out (fp32);
/// - `set_effective_weight(w, stream)`: from now on the base computes with Q(w) (with a quantizer),
///   or with w itself, which then also becomes its source weights (without one);
/// - `dequantized_weight(out, stream)`: what the base computes with, into out `[E, out, in]`.
/// (parallel::GatheredBase models it for the whole weights of a tensor-parallel group.)
template <class B>
concept SvdInitSource = Backend<typename B::backend_type> &&
                        requires(B& base, const B& cbase, ConstTensorRef w, TensorRef out,
                                 typename B::backend_type::stream_type stream) {
                          { cbase.num_experts() } -> std::convertible_to<std::int64_t>;
                          { cbase.in_features() } -> std::convertible_to<std::int64_t>;
                          { cbase.out_features() } -> std::convertible_to<std::int64_t>;
                          { cbase.dtype() } -> std::same_as<DType>;
                          requires Linalg<std::remove_cvref_t<decltype(base.linalg())>>;
                          { cbase.source_weight() } -> std::same_as<ConstTensorRef>;
                          { cbase.has_quantizer() } -> std::convertible_to<bool>;
                          base.fake_quantize(w, out, stream);
                          base.set_effective_weight(w, stream);
                          base.dequantized_weight(out, stream);
                        };

/// A base that owns its weights and so supports the SVD-based initialisers (QuantizedGroupedLinear).
template <class B>
concept SvdInitBase = GroupedLinearBase<B> && SvdInitSource<B>;

/// What an initialiser is asked for: one adapter's settings and its factor buffers.
struct SvdInitArgs {
  InitMethod method = InitMethod::svdquant;
  std::int64_t rank = 0;
  float scale = 1.0f;
  DType dtype = DType::fp32;      ///< the adapter's factor dtype
  std::int64_t iterations = 0;    ///< loftq steps / svd_first refits
  void* a = nullptr;              ///< `[E, r, in]`, factor dtype, written
  void* b = nullptr;              ///< `[E, out, r]`, factor dtype, written
  std::string_view adapter;       ///< for warnings
};

/// Per-expert relative errors of an initialisation (all empty for kaiming_zeros).
struct InitReport {
  std::vector<double> quantized_error;  ///< ‖W − Q(W)‖ / ‖W‖ before the init (0 without a quantizer)
  std::vector<double> init_error;       ///< ‖W − Q − scale·BA‖ / ‖W‖ after it
  std::int64_t best_iteration = 0;      ///< loftq / svd_first: the iterate kept (0 = the first)

  /// Root-mean-square over experts of one of the error vectors.
  static double rms(const std::vector<double>& errors) {
    if (errors.empty()) return 0.0;
    double sum = 0.0;
    for (const double e : errors) sum += e * e;
    return std::sqrt(sum / static_cast<double>(errors.size()));
  }
};

namespace detail {

/// The fp32 working set of one initialisation of a base of `[E, out, in]` weights at rank r.
template <SvdInitSource Base>
class SvdInitRun {
  using Backend = typename Base::backend_type;
  using Stream = typename Backend::stream_type;

 public:
  SvdInitRun(Base& base, const SvdInitArgs& args, Stream stream)
      : base_(base),
        la_(base.linalg()),
        args_(args),
        stream_(stream),
        experts_(base.num_experts()),
        out_(base.out_features()),
        in_(base.in_features()),
        k_(std::min({args.rank, base.out_features(), base.in_features()})),
        w_(floats(experts_ * out_ * in_)),
        residual_(floats(experts_ * out_ * in_)),
        scratch_(floats(experts_ * out_ * in_)),
        u_(floats(experts_ * out_ * k_)),
        s_(floats(experts_ * k_)),
        vt_(floats(experts_ * k_ * in_)),
        a_(floats(experts_ * args.rank * in_)),
        b_(floats(experts_ * out_ * args.rank)) {
    la_.convert(base.source_weight().data, base.dtype(), w(), DType::fp32, weights(), stream_);
    w_norms_ = la_.sq_norms(w(), experts_, out_ * in_, stream_);
  }

  [[nodiscard]] std::int64_t weights() const { return experts_ * out_ * in_; }
  [[nodiscard]] float* w() const { return w_.template as<float>(); }
  [[nodiscard]] float* residual() const { return residual_.template as<float>(); }
  [[nodiscard]] float* scratch() const { return scratch_.template as<float>(); }

  /// Relative per-expert norms of an `[E, out, in]` fp32 array against ‖W_e‖.
  std::vector<double> relative(const float* m) {
    std::vector<double> norms = la_.sq_norms(m, experts_, out_ * in_, stream_);
    for (std::size_t e = 0; e < norms.size(); ++e)
      norms[e] = w_norms_[e] > 0.0 ? std::sqrt(norms[e] / w_norms_[e]) : std::sqrt(norms[e]);
    return norms;
  }

  /// residual = W − Q(source), Q from the base's quantizer.
  void quantize_residual(ConstTensorRef source) {
    base_.fake_quantize(source, full(scratch()), stream_);
    la_.subtract(w(), scratch(), residual(), weights(), stream_);
  }

  /// The factors (rounded to the adapter's dtype) from the rank-k SVD of m.
  void fit(const float* m, bool balanced) {
    const SvdShape shape{experts_, out_, in_, k_};
    la_.svd(m, shape, u_.template as<float>(), s_.template as<float>(), vt_.template as<float>(), stream_);
    la_.make_factors(u_.template as<float>(), s_.template as<float>(), vt_.template as<float>(), shape,
                     {args_.rank, balanced, 1.0f / args_.scale, args_.dtype}, b_.template as<float>(),
                     a_.template as<float>(), stream_);
  }

  /// out = m − scale·B A (out may be m).
  void subtract_delta(const float* m, float* out) {
    if (out != m) Backend::copy(out, m, static_cast<std::size_t>(weights()) * sizeof(float), stream_);
    la_.add_product(out, b_.template as<float>(), a_.template as<float>(), -args_.scale,
                    {experts_, out_, in_, args_.rank}, stream_);
  }

  /// Σ over experts of ‖m − scale·BA‖² (through the scratch).
  double total_error(const float* m) {
    subtract_delta(m, scratch());
    const std::vector<double> norms = la_.sq_norms(scratch(), experts_, out_ * in_, stream_);
    return std::accumulate(norms.begin(), norms.end(), 0.0);
  }

  /// Copies the factors into (`save`) or out of a kept pair of buffers.
  void keep_factors(Buffer<Backend>& kept_a, Buffer<Backend>& kept_b, bool save) {
    const auto move = [&](Buffer<Backend>& kept, Buffer<Backend>& live) {
      if (!kept.data()) kept = Buffer<Backend>(live.bytes());
      if (save) Backend::copy(kept.data(), live.data(), live.bytes(), stream_);
      else Backend::copy(live.data(), kept.data(), live.bytes(), stream_);
    };
    move(kept_a, a_), move(kept_b, b_);
  }

  /// Writes the factors into the adapter and measures what the base now computes with.
  InitReport finish(std::vector<double> quantized_error, std::int64_t best_iteration) {
    la_.convert(a_.data(), DType::fp32, args_.a, args_.dtype, experts_ * args_.rank * in_, stream_);
    la_.convert(b_.data(), DType::fp32, args_.b, args_.dtype, experts_ * out_ * args_.rank, stream_);
    base_.dequantized_weight(full(scratch()), stream_);
    la_.subtract(w(), scratch(), residual(), weights(), stream_);
    subtract_delta(residual(), residual());
    return {std::move(quantized_error), relative(residual()), best_iteration};
  }

  [[nodiscard]] Shape shape() const { return {experts_, out_, in_}; }
  [[nodiscard]] TensorRef full(float* data) const { return {data, DType::fp32, shape()}; }

 private:
  static Buffer<Backend> floats(std::int64_t count) {
    return Buffer<Backend>(static_cast<std::size_t>(count) * sizeof(float));
  }

  Base& base_;
  decltype(std::declval<Base&>().linalg()) la_;
  SvdInitArgs args_;
  Stream stream_;
  std::int64_t experts_, out_, in_, k_;
  Buffer<Backend> w_, residual_, scratch_, u_, s_, vt_, a_, b_;
  std::vector<double> w_norms_;
};

}  // namespace detail

/// Initialises one adapter's factors with `args.method` (not kaiming_zeros) from `base`, updating
/// the base's quantized weights where the method says so; warnings go to `warn`. Synchronises the
/// stream (the SVD checks its status and the errors are returned on the host).
template <SvdInitSource Base>
InitReport svd_init(Base& base, const SvdInitArgs& args, const WarningSink& warn,
                    typename Base::backend_type::stream_type stream) {
  using Backend = typename Base::backend_type;
  const std::int64_t min_dim = std::min(base.out_features(), base.in_features());
  const auto say = [&](auto... parts) {
    std::ostringstream message;
    message << "adapter \"" << args.adapter << "\": ";
    (message << ... << parts);
    warn(message.str());
  };
  const bool needs_quantizer = args.method != InitMethod::pissa;
  if (needs_quantizer && !base.has_quantizer()) {
    say(init_method_name(args.method), " needs a base with an enabled weight quantizer; A and B are zero");
    const std::size_t a_bytes = static_cast<std::size_t>(base.num_experts() * args.rank * base.in_features());
    const std::size_t b_bytes = static_cast<std::size_t>(base.num_experts() * base.out_features() * args.rank);
    Backend::fill_zero(args.a, a_bytes * dtype_size(args.dtype), stream);
    Backend::fill_zero(args.b, b_bytes * dtype_size(args.dtype), stream);
    // The base computes with W itself and the delta is zero: both errors are 0.
    const std::vector<double> zero(static_cast<std::size_t>(base.num_experts()), 0.0);
    return {zero, zero, 0};
  }
  if (args.rank > min_dim)
    say("rank ", args.rank, " exceeds min(out, in) = ", min_dim, "; factors beyond rank ", min_dim, " are zero");

  detail::SvdInitRun<Base> run(base, args, stream);
  std::vector<double> quantized_error(static_cast<std::size_t>(base.num_experts()), 0.0);
  if (base.has_quantizer()) {
    run.quantize_residual(base.source_weight());
    quantized_error = run.relative(run.residual());
  }

  switch (args.method) {
    case InitMethod::svdquant:
      run.fit(run.residual(), false);
      return run.finish(std::move(quantized_error), 0);

    case InitMethod::pissa: {
      run.fit(run.w(), true);
      run.subtract_delta(run.w(), run.residual());
      base.set_effective_weight({run.residual(), DType::fp32, run.shape()}, stream);
      return run.finish(std::move(quantized_error), 0);
    }

    case InitMethod::loftq:
    case InitMethod::svd_first: {
      // Iterate t pairs factors with Q_t = Q(target_t): loftq starts from target_0 = W (so t = 0 is
      // svdquant), svd_first from target_0 = W − scale·SVD_r(W). Each step refits the factors to
      // W − Q_t; the iterate of least total error is kept and the base quantizes its target.
      Buffer<Backend> target(static_cast<std::size_t>(run.weights()) * sizeof(float));
      auto* t = target.template as<float>();
      if (args.method == InitMethod::loftq) {
        Backend::copy(t, run.w(), target.bytes(), stream);
      } else {
        run.fit(run.w(), false);
        run.subtract_delta(run.w(), t);
      }
      const std::int64_t steps = args.method == InitMethod::loftq ? args.iterations : args.iterations + 1;
      Buffer<Backend> best_a, best_b, best_target;
      double best = INFINITY;
      std::int64_t best_step = 0;
      for (std::int64_t step = 0; step < steps; ++step) {
        // loftq's first target is W, whose residual was computed above for quantized_error.
        if (args.method != InitMethod::loftq || step > 0) run.quantize_residual({t, DType::fp32, run.shape()});
        // svd_first's first candidate is the SVD of W itself, paired with Q(W − scale·BA).
        if (args.method == InitMethod::loftq || step > 0) run.fit(run.residual(), false);
        const double error = run.total_error(run.residual());
        if (error < best) {
          best = error, best_step = step;
          run.keep_factors(best_a, best_b, true);
          if (!best_target.data()) best_target = Buffer<Backend>(target.bytes());
          Backend::copy(best_target.data(), t, target.bytes(), stream);
        }
        if (step + 1 < steps) run.subtract_delta(run.w(), t);
      }
      run.keep_factors(best_a, best_b, false);
      base.set_effective_weight({best_target.data(), DType::fp32, run.shape()}, stream);
      return run.finish(std::move(quantized_error), best_step);
    }

    case InitMethod::kaiming_zeros: break;
  }
  moelora::detail::raise(ErrorCode::invalid_argument, "svd_init: ", init_method_name(args.method), " is not an SVD init");
}

}  // namespace moelora::init
