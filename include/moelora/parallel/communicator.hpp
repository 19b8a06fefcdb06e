/// \file
/// \brief The Communicator concept: a caller-owned group of ranks and the collectives moelora issues
/// on it (the tensor-parallel layer, the SVD initialisers under TP, and the MoE token path).
///
/// Every operation is queued on the caller's stream (`cudaStream_t` for CudaBackend; the host
/// backend's stream is a tag and its operations complete before returning). Counts are in
/// elements of `CommElement` type; buffers live in the backend's memory. A communicator of size 1
/// turns every collective into a copy (or nothing, when it runs in place).
#pragma once

#include <concepts>
#include <cstddef>
#include <cstdint>
#include <span>
#include <string_view>

#include "moelora/core/dtype.hpp"

namespace moelora::parallel {

/// The reduction of `all_reduce` and `reduce_scatter`.
enum class ReduceOp : std::uint8_t { sum, max };

/// Element type of a collective's buffers: the floating-point dtypes and the integers of counts
/// and indices.
enum class CommElement : std::uint8_t { bf16, fp16, fp32, int32, int64, byte };

/// The CommElement of a floating-point DType.
constexpr CommElement comm_element(DType dtype) {
  switch (dtype) {
    case DType::bf16: return CommElement::bf16;
    case DType::fp16: return CommElement::fp16;
    case DType::fp32: break;
  }
  return CommElement::fp32;
}

/// Bytes per element.
constexpr std::size_t comm_element_size(CommElement type) {
  switch (type) {
    case CommElement::bf16:
    case CommElement::fp16: return 2;
    case CommElement::fp32:
    case CommElement::int32: return 4;
    case CommElement::int64: return 8;
    case CommElement::byte: break;
  }
  return 1;
}

constexpr std::string_view comm_element_name(CommElement type) {
  switch (type) {
    case CommElement::bf16: return "bf16";
    case CommElement::fp16: return "fp16";
    case CommElement::fp32: return "fp32";
    case CommElement::int32: return "int32";
    case CommElement::int64: return "int64";
    case CommElement::byte: break;
  }
  return "byte";
}

/// A group of `size()` ranks, this object being rank `rank()`, and its collectives:
///
/// - `all_reduce(send, recv, count, type, op, stream)`: `recv[i] = op_r send_r[i]`; in place when
///   `send == recv`; every rank receives bitwise the same result.
/// - `all_gather(send, recv, count, type, stream)`: recv `[size · count]`, rank r's block at `r·count`.
/// - `reduce_scatter(send, recv, count, type, op, stream)`: send `[size · count]`; rank r receives
///   `count` elements, the reduction over ranks of block r.
/// - `all_to_all(send, recv, count, type, stream)`: send block p (`count` elements at `p·count`)
///   goes to rank p; recv block p came from rank p.
/// - `all_to_all_v(send, send_counts, recv, recv_counts, type, stream)`: the same with blocks of
///   `send_counts[p]` / `recv_counts[p]` elements (host spans of `size()` entries), contiguous in
///   rank order; rank p's `send_counts[r]` must equal rank r's `recv_counts[p]`.
/// - `broadcast(send, recv, count, type, root, stream)`: recv = root's send on every rank.
///
/// Every rank of the group must issue the same collectives in the same order with matching
/// counts and types. The communicator is the caller's: moelora never creates or destroys one.
template <class C>
concept Communicator = requires(C& c, const C& cc, const void* send, void* recv, std::size_t count, CommElement type,
                                ReduceOp op, int root, std::span<const std::size_t> counts,
                                typename C::stream_type stream) {
  typename C::backend_type;
  requires std::same_as<typename C::stream_type, typename C::backend_type::stream_type>;
  { cc.rank() } -> std::same_as<int>;
  { cc.size() } -> std::same_as<int>;
  c.all_reduce(send, recv, count, type, op, stream);
  c.all_gather(send, recv, count, type, stream);
  c.reduce_scatter(send, recv, count, type, op, stream);
  c.all_to_all(send, recv, count, type, stream);
  c.all_to_all_v(send, counts, recv, counts, type, stream);
  c.broadcast(send, recv, count, type, root, stream);
};

}  // namespace moelora::parallel
