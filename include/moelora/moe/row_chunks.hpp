/// \file
/// \brief RowChunks and RowChunkMover<Backend>: block copies of rows between two row-major tensors,
/// the regrouping step of the MoE token exchange (`moe/exchange.hpp`). Host implementation here;
/// the CUDA one (one kernel over every row) in `cuda/moe.hpp`.
#pragma once

#include <cstdint>
#include <cstring>
#include <vector>

#include "moelora/core/tensor.hpp"
#include "moelora/host/backend.hpp"
#include "moelora/host/convert.hpp"

namespace moelora::moe {

/// Row blocks to copy, on the host: block b moves `rows[b]` rows from row `src[b]` of the input to
/// row `dst[b]` of the output. `first[b]` is Σ_{b'<b} rows[b'] (`first` has one more entry: the
/// total).
struct RowChunks {
  std::vector<std::int64_t> src, dst, rows, first{0};

  void add(std::int64_t from, std::int64_t to, std::int64_t count) {
    if (count == 0) return;
    src.push_back(from), dst.push_back(to), rows.push_back(count);
    first.push_back(first.back() + count);
  }
  void clear() { src.clear(), dst.clear(), rows.clear(), first.assign(1, 0); }
  [[nodiscard]] std::int64_t total() const { return first.back(); }
};

/// Copies the row blocks of RowChunks between two row-major tensors of one dtype and width:
/// `move(in, chunks, out, stream)`; rows no block writes keep their values. Specialised per backend
/// (the CUDA one uploads the block table, staged through pageable memory, and copies every row in
/// one kernel).
template <class Backend>
class RowChunkMover;

/// Checks that every block lies inside `in` and `out`, which share a dtype and width.
inline void check_chunks(ConstTensorRef in, const RowChunks& chunks, ConstTensorRef out) {
  MOELORA_REQUIRE(in.shape.rank == 2 && out.shape.rank == 2 && in.shape[1] == out.shape[1] && in.dtype == out.dtype,
                  ErrorCode::shape_mismatch, "row blocks move between tensors of one width and dtype, got ", in.shape,
                  " ", dtype_name(in.dtype), " and ", out.shape, " ", dtype_name(out.dtype));
  for (std::size_t b = 0; b < chunks.rows.size(); ++b)
    MOELORA_REQUIRE(chunks.rows[b] >= 0 && chunks.src[b] >= 0 && chunks.dst[b] >= 0 &&
                        chunks.src[b] + chunks.rows[b] <= in.shape[0] && chunks.dst[b] + chunks.rows[b] <= out.shape[0],
                    ErrorCode::shape_mismatch, "row block ", b, " (", chunks.rows[b], " rows from ", chunks.src[b],
                    " to ", chunks.dst[b], ") leaves the tensors of ", in.shape[0], " and ", out.shape[0], " rows");
}

template <>
class RowChunkMover<HostBackend> {
 public:
  static void move(ConstTensorRef in, const RowChunks& chunks, TensorRef out, HostStream /*stream*/) {
    check_chunks(in, chunks, out);
    const std::size_t row_bytes = static_cast<std::size_t>(in.shape[1]) * dtype_size(in.dtype);
    for (std::size_t b = 0; b < chunks.rows.size(); ++b)
      std::memcpy(host::element(out.data, out.dtype, chunks.dst[b] * out.shape[1]),
                  host::element(in.data, in.dtype, chunks.src[b] * in.shape[1]),
                  static_cast<std::size_t>(chunks.rows[b]) * row_bytes);
  }
};

}  // namespace moelora::moe
