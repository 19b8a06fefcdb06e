/// \file
/// \brief Test harnesses: one per backend, giving the same test bodies a base, a stream and
/// transfers between host tensors and the backend's memory.
#pragma once

#include <cstring>
#include <limits>
#include <optional>
#include <vector>

#include "moelora/moelora.hpp"
#include "support/testing.hpp"

namespace moelora::testing {

/// A tensor in a backend's memory.
template <class Backend>
struct BackendTensor {
  Buffer<Backend> buffer;
  DType dtype = DType::fp32;
  Shape shape;
  [[nodiscard]] TensorRef ref() const { return {buffer.data(), dtype, shape}; }
};

/// Transfers shared by every harness; `Derived` provides `stream()` and `make_base(w)`.
template <class Derived, class BackendT>
struct HarnessBase {
  using backend = BackendT;

  auto stream() { return static_cast<Derived*>(this)->stream_; }

  BackendTensor<backend> upload(const HostTensor& t) {
    BackendTensor<backend> out{Buffer<backend>(std::max<std::size_t>(t.size() * dtype_size(t.dtype), 1)), t.dtype, t.shape};
    write(out.ref(), t);
    return out;
  }
  /// A tensor of `shape` filled with NaN, so unwritten elements show.
  BackendTensor<backend> poisoned(DType dtype, Shape shape) {
    return upload(HostTensor(dtype, shape, std::numeric_limits<float>::quiet_NaN()));
  }
  void write(TensorRef dst, const HostTensor& src) {
    REQUIRE(dst.shape == src.shape);
    REQUIRE(dst.dtype == src.dtype);
    const std::vector<std::byte> bytes = src.encode();
    backend::copy_from_host(dst.data, bytes.data(), bytes.size(), stream());
  }
  HostTensor download(ConstTensorRef src) {
    HostTensor out(src.dtype, src.shape);
    std::vector<std::byte> bytes(src.bytes());
    backend::copy_to_host(bytes.data(), src.data, bytes.size(), stream());
    out.decode(bytes);
    return out;
  }
  /// Counts in the memory the harness prefers (host, or device for `DeviceCounts` harnesses).
  ExpertCounts counts(const std::vector<std::int64_t>& host) {
    return expert_counts(host.data(), static_cast<std::int64_t>(host.size()));
  }

  using QuantizedBase = QuantizedGroupedLinear<backend>;
  using QuantizedLayer = GroupedLoRA<QuantizedBase>;

  /// A quantized base holding `w` `[E, out, in]`, quantized with `spec` (none: unquantized).
  QuantizedBase make_quantized_base(const HostTensor& w, std::optional<quant::QuantSpec> spec) {
    std::optional<quant::FormatQuantizer<backend>> quantizer;
    if (spec) quantizer.emplace(*spec);
    QuantizedBase base(static_cast<Derived*>(this)->linalg(), w.shape[0], w.shape[2], w.shape[1], w.dtype,
                       std::move(quantizer));
    const std::vector<std::byte> bytes = w.encode();
    base.set_weight({bytes.data(), w.dtype, w.shape}, stream());
    return base;
  }
};

/// The host reference backend.
struct HostHarness : HarnessBase<HostHarness, HostBackend> {
  using Base = GroupedLinear<HostBackend>;
  using Layer = GroupedLoRA<Base>;
  HostStream stream_{};

  static Linalg<HostBackend> linalg() { return {}; }

  Base make_base(const HostTensor& w) {
    Base base(w.shape[0], w.shape[2], w.shape[1], w.dtype);
    const std::vector<std::byte> bytes = w.encode();
    base.set_weight({bytes.data(), w.dtype, w.shape}, stream_);
    return base;
  }
};

}  // namespace moelora::testing
