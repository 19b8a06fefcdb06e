/// \file
/// \brief Packed storage of a quantized weight `[E, out, in]`: one contiguous byte blob per tensor,
/// made of named sections (codes, scales, amax) that a checkpoint can store as separate tensors.
///
/// Sections, in storage order, each starting at a multiple of kPackedAlignment (256) bytes:
///
/// | format | codes | scales | amax |
/// |---|---|---|---|
/// | int8 (per tensor) | I8 `[E, out, in]` | – | F32 `[E]` |
/// | int8_channel | I8 `[E, out, in]` | F32 `[E, out]`: s = 127 / amax_row | – |
/// | int4 | U8 `[E, out, ⌈in/2⌉]` | F32 `[E, out, ⌈in/128⌉]`: s = 7 / amax_block | – |
/// | fp8_e4m3 | F8_E4M3 `[E, out, in]` | – | F32 `[E]` |
/// | nvfp4 | U8 `[E, out, ⌈in/2⌉]` (E2M1) | F8_E4M3 `[E, out, ⌈in/16⌉]` | F32 `[E]` |
/// | nf4 | U8 `[E, out, ⌈in/2⌉]` (code index) | F32 `[E, out, ⌈in/64⌉]`: absmax | – |
/// | mxfp4 | U8 `[E, out, ⌈in/2⌉]` (E2M1) | F8_E8M0 `[E, out, ⌈in/32⌉]` | – |
///
/// 4-bit codes hold two elements per byte: the low nibble is the even column, the high nibble the
/// odd one; a trailing odd column leaves its byte's high nibble 0. INT codes are two's complement
/// (an INT4 nibble too); E2M1 nibbles are sign (bit 3) and magnitude index (bits 0–2) of
/// {0, 0.5, 1, 1.5, 2, 3, 4, 6}; NF4 nibbles index the 16 NF4 values in increasing order (7 = 0).
/// `amax` is the calibrated tensor amax of each expert (all equal under AmaxScope::shared).
/// An INT or FP8 group whose amax is below 2^-24 stores s = 1 and zero codes.
///
/// Bytes per expert of 768 × 2048 (bf16: 3 145 728): int8 1 572 864 + 4; int8_channel
/// 1 572 864 + 3 072; int4 786 432 + 49 152; fp8_e4m3 1 572 864 + 4; nvfp4 786 432 + 98 304 + 4;
/// nf4 786 432 + 98 304; mxfp4 786 432 + 49 152 (plus at most 255 bytes of alignment per section
/// in the whole blob). `docs/quantization.md` has the same table with the formulas.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string_view>
#include <vector>

#include "moelora/core/error.hpp"
#include "moelora/core/tensor.hpp"
#include "moelora/quant/format.hpp"

namespace moelora::quant {

/// Alignment in bytes of every section's offset within a packed blob.
inline constexpr std::size_t kPackedAlignment = 256;

/// One section of a packed blob. Absent sections have `bytes == 0` and an empty shape.
struct PackedSection {
  std::string_view name;   ///< "codes", "scales" or "amax"
  std::size_t offset = 0;  ///< bytes from the start of the blob (a multiple of kPackedAlignment)
  std::size_t bytes = 0;   ///< size in bytes
  std::string_view dtype;  ///< safetensors dtype of one element: "U8", "I8", "F32", "F8_E4M3", "F8_E8M0"
  Shape shape;             ///< element shape, row-major

  [[nodiscard]] bool present() const { return bytes != 0; }
};

/// Where each section of one packed `[E, out, in]` weight lies.
struct PackedLayout {
  PackedSection codes, scales, amax;
  std::size_t total_bytes = 0;  ///< end of the last present section

  /// The present sections in storage order.
  [[nodiscard]] std::vector<PackedSection> sections() const {
    std::vector<PackedSection> out;
    for (const PackedSection* s : {&codes, &scales, &amax})
      if (s->present()) out.push_back(*s);
    return out;
  }
};

/// Validates the extents of a weight to be quantized (each ≥ 1).
inline void check_weight_extents(std::int64_t experts, std::int64_t out, std::int64_t in) {
  MOELORA_REQUIRE(experts >= 1 && out >= 1 && in >= 1, ErrorCode::shape_mismatch,
                  "a quantized weight needs experts, out and in >= 1, got [", experts, ", ", out, ", ", in, "]");
}

/// The layout of the packed form of a `[experts, out, in]` weight quantized as `spec`.
inline PackedLayout packed_layout(const QuantSpec& spec, std::int64_t experts, std::int64_t out, std::int64_t in) {
  validate(spec);
  check_weight_extents(experts, out, in);
  PackedLayout layout;
  std::size_t end = 0;
  const auto place = [&](PackedSection& s, std::string_view name, std::string_view dtype, std::size_t element_bytes,
                         Shape shape) {
    end = (end + kPackedAlignment - 1) / kPackedAlignment * kPackedAlignment;
    s = {name, end, static_cast<std::size_t>(shape.numel()) * element_bytes, dtype, shape};
    end += s.bytes;
  };
  const Format f = spec.format;
  if (code_bits(f) == 8) place(layout.codes, "codes", f == Format::int8 ? "I8" : "F8_E4M3", 1, {experts, out, in});
  else place(layout.codes, "codes", "U8", 1, {experts, out, (in + 1) / 2});
  const std::int64_t block = block_size(f);
  const std::int64_t blocks = block ? (in + block - 1) / block : 0;
  if (f == Format::int8 && spec.granularity == Granularity::per_channel)
    place(layout.scales, "scales", "F32", 4, {experts, out});
  else if (f == Format::int4 || f == Format::nf4) place(layout.scales, "scales", "F32", 4, {experts, out, blocks});
  else if (f == Format::nvfp4) place(layout.scales, "scales", "F8_E4M3", 1, {experts, out, blocks});
  else if (f == Format::mxfp4) place(layout.scales, "scales", "F8_E8M0", 1, {experts, out, blocks});
  if (has_tensor_amax(spec)) place(layout.amax, "amax", "F32", 4, {experts});
  layout.total_bytes = end;
  return layout;
}

}  // namespace moelora::quant
