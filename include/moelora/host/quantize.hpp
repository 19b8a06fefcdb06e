/// \file
/// \brief FormatQuantizer<HostBackend>: the reference quantizer of DESIGN.md §5 on the host, the
/// oracle of the CUDA one (which equals it bit for bit).
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "moelora/core/buffer.hpp"
#include "moelora/core/error.hpp"
#include "moelora/core/tensor.hpp"
#include "moelora/host/backend.hpp"
#include "moelora/host/convert.hpp"
#include "moelora/quant/codec.hpp"
#include "moelora/quant/packed.hpp"
#include "moelora/quant/quantizer.hpp"

namespace moelora::quant {

/// The host quantizer: weights, packed blobs and outputs in host memory; every call completes
/// before it returns. Not thread-safe per instance (it keeps no state besides the spec, but shares
/// nothing either: one instance per thread is cheap).
template <>
class FormatQuantizer<HostBackend> : public FormatQuantizerSpec, public AmaxSharing<HostBackend> {
 public:
  using backend_type = HostBackend;

  /// Throws ErrorCode::invalid_argument for a spec that `validate` rejects.
  explicit FormatQuantizer(QuantSpec spec = {}) : FormatQuantizerSpec(spec) {}

  /// Calibrates (max) and quantizes w `[E, out, in]` into `packed` (packed_bytes(E, out, in) bytes).
  void quantize(ConstTensorRef w, void* packed, HostStream stream = {}) const {
    checks::check_weight(w, "the weight to quantize");
    MOELORA_REQUIRE(packed != nullptr, ErrorCode::invalid_argument, "quantize: the packed output has no data");
    const std::int64_t experts = w.shape[0], out = w.shape[1], in = w.shape[2];
    const PackedLayout packed_at = layout(experts, out, in);
    std::vector<float> values(static_cast<std::size_t>(w.numel()));
    host::load_as_float(w.data, w.dtype, values.size(), values.data(), DType::fp32);

    // Tensor amax per expert (max calibration), shared across experts unless asked otherwise.
    std::vector<float> tensor_amax(static_cast<std::size_t>(experts), 0.0f);
    if (has_tensor_amax(spec_)) {
      std::uint32_t shared = 0;
      for (std::int64_t e = 0; e < experts; ++e) {
        std::uint32_t bits = 0;
        for (std::int64_t i = e * out * in; i < (e + 1) * out * in; ++i)
          bits = std::max(bits, abs_bits(values[static_cast<std::size_t>(i)]));
        tensor_amax[static_cast<std::size_t>(e)] = detail::bits_float(bits);
        shared = std::max(shared, bits);
      }
      if (spec_.amax_scope == AmaxScope::shared) std::fill(tensor_amax.begin(), tensor_amax.end(), detail::bits_float(shared));
      if (amax_sync_) {  // the max over the ranks that share it (the shared value is every entry)
        amax_sync_(tensor_amax.data(), spec_.amax_scope == AmaxScope::shared ? 1 : tensor_amax.size(), stream);
        if (spec_.amax_scope == AmaxScope::shared) std::fill(tensor_amax.begin(), tensor_amax.end(), tensor_amax.front());
      }
    }

    auto* blob = static_cast<std::byte*>(packed);
    std::memset(blob + packed_at.codes.offset, 0, packed_at.codes.bytes);
    dispatch_scheme(spec_, [&](auto scheme) {
      using Codec = SchemeCodec<scheme.value>;
      const Grouping g = grouping<Codec>(in);
      for (std::int64_t row = 0; row < experts * out; ++row) {
        const float* x = values.data() + row * in;
        const float amax = tensor_amax[static_cast<std::size_t>(row / out)];
        for (std::int64_t group = 0; group < g.groups; ++group) {
          const std::int64_t c0 = group * g.size, c1 = std::min(in, c0 + g.size);
          std::uint32_t group_amax = 0;
          for (std::int64_t c = c0; c < c1; ++c) group_amax = std::max(group_amax, abs_bits(x[c]));
          typename Codec::Stored stored{};
          const GroupScale scale = Codec::make(detail::bits_float(group_amax), amax, stored);
          if constexpr (Codec::kGroup != 0)
            std::memcpy(blob + packed_at.scales.offset + static_cast<std::size_t>(row * g.groups + group) * sizeof stored,
                        &stored, sizeof stored);
          for (std::int64_t c = c0; c < c1; ++c) put_code<Codec::kBits>(blob + packed_at.codes.offset, row, in, c, Codec::encode(x[c], scale));
        }
      }
    });
    if (packed_at.amax.present())
      std::memcpy(blob + packed_at.amax.offset, tensor_amax.data(), packed_at.amax.bytes);
  }

  /// Writes experts [e0, e0 + n) of the packed weight of shape `shape` `[E, out, in]` into out
  /// `[n, out, in]` (any dtype; values rounded once from fp32).
  void dequantize(const void* packed, Shape shape, std::int64_t e0, std::int64_t n, TensorRef out,
                  HostStream /*stream*/ = {}) const {
    checks::check_dequantize(packed, shape, e0, n, out);
    const std::int64_t rows = shape[1], in = shape[2];
    const PackedLayout packed_at = layout(shape[0], rows, in);
    const auto* blob = static_cast<const std::byte*>(packed);
    std::vector<float> values(static_cast<std::size_t>(n * rows * in));
    dispatch_scheme(spec_, [&](auto scheme) {
      using Codec = SchemeCodec<scheme.value>;
      const Grouping g = grouping<Codec>(in);
      for (std::int64_t row = e0 * rows; row < (e0 + n) * rows; ++row) {
        float amax = 0.0f;
        if (packed_at.amax.present())
          std::memcpy(&amax, blob + packed_at.amax.offset + static_cast<std::size_t>(row / rows) * sizeof amax, sizeof amax);
        float* y = values.data() + (row - e0 * rows) * in;
        for (std::int64_t group = 0; group < g.groups; ++group) {
          typename Codec::Stored stored{};
          if constexpr (Codec::kGroup != 0)
            std::memcpy(&stored, blob + packed_at.scales.offset + static_cast<std::size_t>(row * g.groups + group) * sizeof stored,
                        sizeof stored);
          const GroupScale scale = Codec::load(stored, amax);
          for (std::int64_t c = group * g.size; c < std::min(in, (group + 1) * g.size); ++c)
            y[c] = Codec::decode(get_code<Codec::kBits>(blob + packed_at.codes.offset, row, in, c), scale);
        }
      }
    });
    host::store_from_float(values.data(), values.size(), out.data, out.dtype);
  }

  /// out = dequantize(quantize(w)) `[E, out, in]`, through a temporary packed blob; out may alias w.
  void fake_quantize(ConstTensorRef w, TensorRef out, HostStream stream = {}) const {
    checks::check_fake_quantize(w, out);
    const Buffer<HostBackend> packed(packed_bytes(w.shape[0], w.shape[1], w.shape[2]));
    quantize(w, packed.data(), stream);
    dequantize(packed.data(), w.shape, 0, w.shape[0], out, stream);
  }

 private:
  /// Elements per group along `in` (the whole row for per-tensor and per-channel schemes) and
  /// groups per row.
  struct Grouping {
    std::int64_t size, groups;
  };
  template <class Codec>
  static Grouping grouping(std::int64_t in) {
    const std::int64_t size = Codec::kGroup > 0 ? Codec::kGroup : in;
    return {size, (in + size - 1) / size};
  }

  /// Code of column `c` of row `row` (rows of `in` codes; 4-bit codes two per byte, low nibble first).
  template <int Bits>
  static void put_code(std::byte* codes, std::int64_t row, std::int64_t in, std::int64_t c, std::uint8_t code) {
    if constexpr (Bits == 8) {
      codes[row * in + c] = static_cast<std::byte>(code);
    } else {
      std::byte& b = codes[row * ((in + 1) / 2) + c / 2];
      b |= static_cast<std::byte>((code & 0xfu) << (4 * (c & 1)));
    }
  }
  template <int Bits>
  static std::uint8_t get_code(const std::byte* codes, std::int64_t row, std::int64_t in, std::int64_t c) {
    if constexpr (Bits == 8) return static_cast<std::uint8_t>(codes[row * in + c]);
    else return static_cast<std::uint8_t>((static_cast<unsigned>(codes[row * ((in + 1) / 2) + c / 2]) >> (4 * (c & 1))) & 0xfu);
  }

};

static_assert(Quantizer<FormatQuantizer<HostBackend>>, "FormatQuantizer<HostBackend> must model Quantizer");

}  // namespace moelora::quant
