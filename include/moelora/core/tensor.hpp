/// \file
/// \brief Non-owning views of row-major tensors and of the per-expert row counts.
///
/// A view does not say where its memory lives: the backend that receives it does (host memory for
/// the host backend, device memory for the CUDA backend). Only `ExpertCounts` may be either.
#pragma once

#include <array>
#include <cstdint>
#include <initializer_list>
#include <ostream>
#include <type_traits>

#include "moelora/core/dtype.hpp"

namespace moelora {

/// A shape of rank 1 to 3; row-major (C order), the last extent contiguous.
struct Shape {
  std::array<std::int64_t, 3> extents{};
  int rank = 0;

  Shape() = default;
  Shape(std::initializer_list<std::int64_t> dims) {
    MOELORA_REQUIRE(dims.size() <= extents.size(), ErrorCode::invalid_argument, "a Shape has at most 3 dimensions, got ",
                    dims.size());
    for (auto d : dims) extents[static_cast<std::size_t>(rank++)] = d;
  }
  [[nodiscard]] std::int64_t operator[](int i) const { return extents[static_cast<std::size_t>(i)]; }
  [[nodiscard]] std::int64_t numel() const {
    std::int64_t n = 1;
    for (int i = 0; i < rank; ++i) n *= extents[static_cast<std::size_t>(i)];
    return n;
  }
  friend bool operator==(const Shape& a, const Shape& b) {
    if (a.rank != b.rank) return false;
    for (int i = 0; i < a.rank; ++i)
      if (a[i] != b[i]) return false;
    return true;
  }
  friend std::ostream& operator<<(std::ostream& out, const Shape& s) {
    out << '[';
    for (int i = 0; i < s.rank; ++i) out << (i ? ", " : "") << s[i];
    return out << ']';
  }
};

/// A dense row-major tensor: element pointer, dtype and shape. `Element` is `void` or `const void`.
template <class Element>
struct BasicTensorRef {
  Element* data = nullptr;
  DType dtype = DType::fp32;
  Shape shape;

  /// A read-only view of the same memory.
  template <class Other>
    requires(std::is_same_v<Other, const void> && !std::is_const_v<Element>)
  operator BasicTensorRef<Other>() const {  // NOLINT(google-explicit-constructor)
    return {data, dtype, shape};
  }
  [[nodiscard]] std::int64_t numel() const { return shape.numel(); }
  [[nodiscard]] std::size_t bytes() const { return static_cast<std::size_t>(numel()) * dtype_size(dtype); }
};

using TensorRef = BasicTensorRef<void>;             ///< mutable view
using ConstTensorRef = BasicTensorRef<const void>;  ///< read-only view

/// A view of a typed host array: the dtype is deduced from `T` (bfloat16_t, half_t or float).
template <class T>
TensorRef tensor_ref(T* data, Shape shape) {
  return {data, dtype_of<T>, shape};
}
template <class T>
ConstTensorRef tensor_ref(const T* data, Shape shape) {
  return {data, dtype_of<T>, shape};
}

/// Integer type of a `tokens_per_expert` array.
enum class IndexType : std::uint8_t { int32, int64 };

/// Where a pointer points.
enum class Memory : std::uint8_t { host, device };

/// `tokens_per_expert` `[E]`: rows of expert e in the grouped input, int32 or int64, on the host or
/// (CUDA backend only) on the device. Σ = T. Device counts keep the forward free of host syncs.
///
/// `padded` (opt-in, `with_padding()`): the rows past Σ counts are padding and Σ ≤ T is accepted, so
/// that a step captured in a CUDA graph at T rows replays with fewer routed rows. Padding rows of
/// x, y, dy and dx are neither read nor written (y and dx keep their old values there), with one
/// exception: a quantized base's input quantizer reads all T rows of x, so with a tensor-wide input
/// scale keep the padding rows finite and small (zero).
struct ExpertCounts {
  const void* data = nullptr;
  IndexType index_type = IndexType::int64;
  std::int64_t size = 0;
  Memory memory = Memory::host;
  bool padded = false;  ///< Σ ≤ T; rows past Σ are padding

  [[nodiscard]] std::int64_t at(std::int64_t e) const {  ///< host counts only
    return index_type == IndexType::int32 ? static_cast<const std::int32_t*>(data)[e]
                                          : static_cast<const std::int64_t*>(data)[e];
  }
  /// The same counts, with the rows past their sum taken as padding.
  [[nodiscard]] ExpertCounts with_padding() const {
    ExpertCounts padded_counts = *this;
    padded_counts.padded = true;
    return padded_counts;
  }
};

/// Views of typed count arrays; `memory` says where they live.
inline ExpertCounts expert_counts(const std::int32_t* data, std::int64_t size, Memory memory = Memory::host) {
  return {data, IndexType::int32, size, memory, false};
}
inline ExpertCounts expert_counts(const std::int64_t* data, std::int64_t size, Memory memory = Memory::host) {
  return {data, IndexType::int64, size, memory, false};
}

}  // namespace moelora
