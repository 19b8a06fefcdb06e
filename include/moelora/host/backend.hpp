/// \file
/// \brief HostBackend: the CPU reference backend. The same math as the CUDA backend, on the host,
/// with OpenBLAS GEMMs; the test oracle and the backend of machines without a GPU.
///
/// Streams are a tag: every operation completes before it returns.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdlib>
#include <cstring>
#include <new>
#include <vector>

#include "moelora/core/error.hpp"
#include "moelora/core/lora_args.hpp"
#include "moelora/core/random.hpp"
#include "moelora/core/segments.hpp"
#include "moelora/core/tensor.hpp"
#include "moelora/host/convert.hpp"
#include "moelora/host/gemm.hpp"
#include "moelora/host/optim.hpp"
#include "moelora/optim/multi_tensor.hpp"

namespace moelora {

/// The host "stream": work on the host backend is synchronous.
struct HostStream {};

/// The CPU reference backend.
struct HostBackend {
  using stream_type = HostStream;
  static constexpr Memory memory = Memory::host;

  static void* allocate(std::size_t bytes) { return ::operator new(bytes, std::align_val_t{64}); }
  static void deallocate(void* data) noexcept { ::operator delete(data, std::align_val_t{64}); }
  static void copy(void* dst, const void* src, std::size_t bytes, HostStream /*stream*/) {
    if (bytes) std::memcpy(dst, src, bytes);
  }
  /// `height` rows of `width` bytes from `src` (rows `src_pitch` bytes apart) to `dst` (`dst_pitch` apart).
  static void copy_2d(void* dst, std::size_t dst_pitch, const void* src, std::size_t src_pitch, std::size_t width,
                      std::size_t height, HostStream /*stream*/) {
    for (std::size_t i = 0; i < height && width; ++i)
      std::memcpy(static_cast<std::byte*>(dst) + i * dst_pitch, static_cast<const std::byte*>(src) + i * src_pitch, width);
  }
  static void copy_to_host(void* host_dst, const void* src, std::size_t bytes, HostStream stream) {
    copy(host_dst, src, bytes, stream);
  }
  static void copy_from_host(void* dst, const void* host_src, std::size_t bytes, HostStream stream) {
    copy(dst, host_src, bytes, stream);
  }
  static void fill_zero(void* data, std::size_t bytes, HostStream /*stream*/) {
    if (bytes) std::memset(data, 0, bytes);
  }
  static void synchronize(HostStream /*stream*/) {}

  /// Per-layer scratch state: the offsets of the current call.
  class Workspace {
   public:
    /// Scans host counts into offsets; the counts were validated by the caller.
    const ExpertSegments& prepare_segments(const ExpertCounts& counts, std::int64_t rows, HostStream /*stream*/) {
      MOELORA_REQUIRE(counts.memory == Memory::host, ErrorCode::invalid_argument,
                      "the host backend needs tokens_per_expert in host memory");
      offsets_.assign(static_cast<std::size_t>(counts.size) + 1, 0);
      for (std::int64_t e = 0; e < counts.size; ++e)
        offsets_[static_cast<std::size_t>(e) + 1] = offsets_[static_cast<std::size_t>(e)] + counts.at(e);
      segments_ = {offsets_.data(), offsets_.data(), counts.size, rows};
      return segments_;
    }
    [[nodiscard]] const ExpertSegments& segments() const { return segments_; }

    /// Sizes the offsets for `experts` experts (the host backend needs no other scratch).
    void reserve(std::int64_t /*rows*/, std::int64_t experts, std::int64_t /*max_rank*/) {
      offsets_.reserve(static_cast<std::size_t>(experts) + 1);
    }

   private:
    std::vector<std::int64_t> offsets_;
    ExpertSegments segments_;
  };

  static void lora_forward(const LoraForwardArgs& args, Workspace& workspace, HostStream /*stream*/) {
    const LoraShape& s = args.shape;
    const FactorsRef& f = args.factors;
    const std::int64_t r = f.rank;
    std::vector<float> a, b, x, h, delta;
    for (std::int64_t e = 0; e < s.experts; ++e) {
      const auto [row0, n] = expert_rows(workspace.segments(), e);
      if (n == 0) continue;
      load_factors(f, s, e, a, b);
      load(host::element(args.x, s.io_dtype, row0 * s.in), s.io_dtype, n * s.in, f.dtype, x);
      h.resize(static_cast<std::size_t>(n * r));
      host::gemm(host::Op::n, host::Op::t, n, r, s.in, 1.0f, x.data(), a.data(), 0.0f, h.data());
      if (args.h_sums) std::copy(h.begin(), h.end(), args.h_sums + row0 * r);
      if (!args.y) {  // the projection alone: h = round(scale · A x)
        scale_round(h.data(), n * r, f.scale, f.dtype, delta);
        host::store_from_float(delta.data(), delta.size(), host::element(args.h, f.dtype, row0 * r), f.dtype);
        continue;
      }
      round_in_place(h, f.dtype);
      host::store_from_float(h.data(), h.size(), host::element(args.h, f.dtype, row0 * r), f.dtype);
      void* y = host::element(args.y, s.io_dtype, row0 * s.out);
      load_output(y, s.io_dtype, n * s.out, args.y_mode, delta);
      host::gemm(host::Op::n, host::Op::t, n, s.out, r, f.scale, h.data(), b.data(), gemm_beta(args.y_mode),
                 delta.data());
      host::store_from_float(delta.data(), delta.size(), y, s.io_dtype);
    }
  }

  static void lora_backward(const LoraBackwardArgs& args, Workspace& workspace, HostStream /*stream*/) {
    const LoraShape& s = args.shape;
    const FactorsRef& f = args.factors;
    const std::int64_t r = f.rank;
    const ExpertSegments& segments = workspace.segments();
    const float grad_beta = gemm_beta(args.grad_mode);
    MOELORA_REQUIRE(!args.u || !args.dx, ErrorCode::invalid_argument,
                    "a LoRA backward that hands u to the caller leaves dx to it: pass dx null");
    // u = B_eᵀ round(dy) [T, r] in fp32 (unscaled) for every row first, so that a column-parallel
    // layer can sum it over the group between this pass and the dA pass.
    std::vector<float> a, b, x, dy, h, u_sums, u, u_grad_a, dx;
    if (args.grad_a || args.dx || args.u) {
      u_sums.resize(static_cast<std::size_t>(s.rows * r));
      for (std::int64_t e = 0; e < s.experts; ++e) {
        const auto [row0, n] = expert_rows(segments, e);
        if (n == 0) continue;
        load(host::element(f.b, f.dtype, e * s.out * r), f.dtype, s.out * r, f.dtype, b);
        load(host::element(args.dy, s.io_dtype, row0 * s.out), s.io_dtype, n * s.out, f.dtype, dy);
        host::gemm(host::Op::n, host::Op::n, n, r, s.out, 1.0f, dy.data(), b.data(), 0.0f, u_sums.data() + row0 * r);
      }
    }
    const bool reduce = args.reduce_u && args.grad_a;
    for (std::int64_t e = 0; e < s.experts; ++e) {
      const auto [row0, n] = expert_rows(segments, e);
      if (n == 0) {  // no rows: the gradients are zero, written as such when overwriting
        if (grad_beta == 0.0f && args.grad_a) std::fill_n(args.grad_a + e * r * s.in, r * s.in, 0.0f);
        if (grad_beta == 0.0f && args.grad_b) std::fill_n(args.grad_b + e * s.out * r, s.out * r, 0.0f);
        continue;
      }
      if (args.grad_b) {
        load(host::element(args.dy, s.io_dtype, row0 * s.out), s.io_dtype, n * s.out, f.dtype, dy);
        if (args.h_sums) scale_round(args.h_sums + row0 * r, n * r, args.h_sums_scale(), f.dtype, h);
        else load(host::element(args.h, f.dtype, row0 * r), f.dtype, n * r, f.dtype, h);
        host::gemm(host::Op::t, host::Op::n, s.out, r, n, args.grad_b_scale(), dy.data(), h.data(), grad_beta,
                   args.grad_b + e * s.out * r);
      }
      if (!args.grad_a && !args.dx && !args.u) continue;
      // ũ = round(scale · u): of this rank's partial u for dx (and for dA unless it is reduced below).
      scale_round(u_sums.data() + row0 * r, n * r, f.scale, f.dtype, u);
      if (args.u) host::store_from_float(u.data(), u.size(), host::element(args.u, f.dtype, row0 * r), f.dtype);
      if (args.dx) {
        load(host::element(f.a, f.dtype, e * r * s.in), f.dtype, r * s.in, f.dtype, a);
        void* dx_rows = host::element(args.dx, s.io_dtype, row0 * s.in);
        load_output(dx_rows, s.io_dtype, n * s.in, args.dx_mode, dx);
        host::gemm(host::Op::n, host::Op::n, n, s.in, r, 1.0f, u.data(), a.data(), gemm_beta(args.dx_mode), dx.data());
        host::store_from_float(dx.data(), dx.size(), dx_rows, s.io_dtype);
      }
    }
    if (!args.grad_a) return;
    if (reduce) args.reduce_u(u_sums.data(), u_sums.size());
    for (std::int64_t e = 0; e < s.experts; ++e) {
      const auto [row0, n] = expert_rows(segments, e);
      if (n == 0) continue;
      scale_round(u_sums.data() + row0 * r, n * r, f.scale, f.dtype, u_grad_a);
      load(host::element(args.x, s.io_dtype, row0 * s.in), s.io_dtype, n * s.in, f.dtype, x);
      host::gemm(host::Op::t, host::Op::n, r, s.in, n, 1.0f, u_grad_a.data(), x.data(), grad_beta,
                 args.grad_a + e * r * s.in);
    }
  }

  static void kaiming_init(const KaimingInitArgs& args, HostStream stream) {
    const float bound = std::sqrt(6.0f / static_cast<float>(args.fan_in()));
    const auto count_a = static_cast<std::size_t>(args.experts * args.rank * args.in);
    std::vector<float> a(count_a);
    for (std::size_t i = 0; i < count_a; ++i)
      a[i] = (2.0f * uniform01(args.seed, 0, args.global_index(static_cast<std::int64_t>(i))) - 1.0f) * bound;
    host::store_from_float(a.data(), count_a, args.a, args.dtype);
    fill_zero(args.b, static_cast<std::size_t>(args.experts * args.out * args.rank) * dtype_size(args.dtype), stream);
  }

  /// The optimizer's passes (optim/multi_tensor.hpp), in host/optim.hpp.
  static void optim_grad_stats(const OptimBatch& batch, HostStream /*stream*/) { host::optim_grad_stats(batch); }
  static void optim_finish_stats(const OptimBatch& batch, HostStream /*stream*/) { host::optim_finish_stats(batch); }
  static void optim_update(const OptimBatch& batch, HostStream /*stream*/) { host::optim_update(batch); }

 private:
  struct Rows {
    std::int64_t first, count;
  };
  static Rows expert_rows(const ExpertSegments& segments, std::int64_t e) {
    return {segments.host_offsets[e], segments.host_offsets[e + 1] - segments.host_offsets[e]};
  }
  static void load(const void* data, DType dtype, std::int64_t n, DType round, std::vector<float>& out) {
    out.resize(static_cast<std::size_t>(n));
    host::load_as_float(data, dtype, out.size(), out.data(), round);
  }
  /// Sizes `out` for n output elements and, when accumulating, loads their old values as fp32 (an
  /// overwriting GEMM, β = 0, does not read them).
  static void load_output(const void* data, DType dtype, std::int64_t n, WriteMode mode, std::vector<float>& out) {
    if (mode == WriteMode::accumulate) load(data, dtype, n, DType::fp32, out);
    else out.resize(static_cast<std::size_t>(n));
  }
  static void load_factors(const FactorsRef& f, const LoraShape& s, std::int64_t e, std::vector<float>& a,
                           std::vector<float>& b) {
    load(host::element(f.a, f.dtype, e * f.rank * s.in), f.dtype, f.rank * s.in, f.dtype, a);
    load(host::element(f.b, f.dtype, e * s.out * f.rank), f.dtype, s.out * f.rank, f.dtype, b);
  }
  /// out = round_F(scale · in[0, n)).
  static void scale_round(const float* in, std::int64_t n, float scale, DType dtype, std::vector<float>& out) {
    out.assign(in, in + n);
    for (float& v : out) v *= scale;
    round_in_place(out, dtype);
  }
  static void round_in_place(std::vector<float>& values, DType dtype) {
    dispatch_dtype(dtype, [&](auto tag) {
      for (float& v : values) v = round_to<tag.value>(v);
    });
  }
};

}  // namespace moelora
