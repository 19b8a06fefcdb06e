/// \file
/// \brief Host conversions between dtype-tagged buffers and fp32 arrays, with optional rounding.
#pragma once

#include <cstddef>
#include <cstdint>

#include "moelora/core/dtype.hpp"

namespace moelora::host {

/// `out[i] = round_to<round>(float(in[i]))` for `n` elements of dtype `dtype`.
inline void load_as_float(const void* in, DType dtype, std::size_t n, float* out, DType round) {
  dispatch_dtype(dtype, [&](auto in_tag) {
    dispatch_dtype(round, [&](auto round_tag) {
      const auto* src = static_cast<const host_type_t<in_tag.value>*>(in);
      for (std::size_t i = 0; i < n; ++i) out[i] = round_to<round_tag.value>(static_cast<float>(src[i]));
    });
  });
}

/// `out[i] = dtype(in[i])` for `n` fp32 values.
inline void store_from_float(const float* in, std::size_t n, void* out, DType dtype) {
  dispatch_dtype(dtype, [&](auto tag) {
    using T = host_type_t<tag.value>;
    auto* dst = static_cast<T*>(out);
    for (std::size_t i = 0; i < n; ++i) dst[i] = T(in[i]);
  });
}

/// Byte offset of element `index` in a buffer of dtype `dtype`.
inline const void* element(const void* base, DType dtype, std::int64_t index) {
  return static_cast<const std::byte*>(base) + static_cast<std::size_t>(index) * dtype_size(dtype);
}
inline void* element(void* base, DType dtype, std::int64_t index) {
  return static_cast<std::byte*>(base) + static_cast<std::size_t>(index) * dtype_size(dtype);
}

}  // namespace moelora::host
