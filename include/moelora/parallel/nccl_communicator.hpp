/// \file
/// \brief NcclCommunicator: the Communicator of the CUDA backend, over a caller-owned ncclComm_t.
///
/// It never creates or destroys the NCCL communicator; rank and size are read from it once. Every
/// collective is queued on the caller's stream (so it can be captured in a CUDA graph), and every
/// ncclResult_t is checked (ErrorCode::nccl, naming the call). A communicator of one rank is valid:
/// NCCL turns its collectives into copies. Needs nvcc (the backend) and libnccl.
#pragma once

#if !defined(__CUDACC__)
#error "moelora/parallel/nccl_communicator.hpp belongs to the CUDA backend: compile this translation unit with nvcc"
#endif

#include <nccl.h>

#include <cstddef>
#include <span>

#include "moelora/cuda/backend.hpp"
#include "moelora/parallel/communicator.hpp"
#include "moelora/parallel/nccl_check.hpp"

namespace moelora::parallel {

/// A Communicator on CudaBackend wrapping `ncclComm_t` (borrowed: it must outlive this object).
class NcclCommunicator {
 public:
  using backend_type = CudaBackend;
  using stream_type = cudaStream_t;

  explicit NcclCommunicator(ncclComm_t comm) : comm_(comm) {
    MOELORA_REQUIRE(comm != nullptr, ErrorCode::invalid_argument, "NcclCommunicator needs an NCCL communicator");
    MOELORA_NCCL_CHECK(ncclCommUserRank(comm_, &rank_));
    MOELORA_NCCL_CHECK(ncclCommCount(comm_, &size_));
  }

  [[nodiscard]] int rank() const { return rank_; }
  [[nodiscard]] int size() const { return size_; }
  /// The wrapped NCCL communicator.
  [[nodiscard]] ncclComm_t get() const { return comm_; }

  void all_reduce(const void* send, void* recv, std::size_t count, CommElement type, ReduceOp op, cudaStream_t stream) {
    MOELORA_NCCL_CHECK(ncclAllReduce(send, recv, count, nccl_type(type), nccl_op(op), comm_, stream));
  }

  void all_gather(const void* send, void* recv, std::size_t count, CommElement type, cudaStream_t stream) {
    MOELORA_NCCL_CHECK(ncclAllGather(send, recv, count, nccl_type(type), comm_, stream));
  }

  void reduce_scatter(const void* send, void* recv, std::size_t count, CommElement type, ReduceOp op,
                      cudaStream_t stream) {
    MOELORA_NCCL_CHECK(ncclReduceScatter(send, recv, count, nccl_type(type), nccl_op(op), comm_, stream));
  }

  void all_to_all(const void* send, void* recv, std::size_t count, CommElement type, cudaStream_t stream) {
    const std::size_t block = count * comm_element_size(type);
    exchange(type, stream, [&](int peer) {
      const auto at = static_cast<std::size_t>(peer) * block;
      return Blocks{static_cast<const std::byte*>(send) + at, count, static_cast<std::byte*>(recv) + at, count};
    });
  }

  void all_to_all_v(const void* send, std::span<const std::size_t> send_counts, void* recv,
                    std::span<const std::size_t> recv_counts, CommElement type, cudaStream_t stream) {
    MOELORA_REQUIRE(send_counts.size() == static_cast<std::size_t>(size_) &&
                        recv_counts.size() == static_cast<std::size_t>(size_),
                    ErrorCode::invalid_argument, "all_to_all_v needs ", size_, " send and receive counts, got ",
                    send_counts.size(), " and ", recv_counts.size());
    const std::size_t element = comm_element_size(type);
    std::size_t send_at = 0, recv_at = 0;
    exchange(type, stream, [&](int peer) {
      const auto p = static_cast<std::size_t>(peer);
      const Blocks blocks{static_cast<const std::byte*>(send) + send_at * element, send_counts[p],
                          static_cast<std::byte*>(recv) + recv_at * element, recv_counts[p]};
      send_at += send_counts[p], recv_at += recv_counts[p];
      return blocks;
    });
  }

  void broadcast(const void* send, void* recv, std::size_t count, CommElement type, int root, cudaStream_t stream) {
    MOELORA_REQUIRE(root >= 0 && root < size_, ErrorCode::invalid_argument, "broadcast root ", root,
                    " is outside a communicator of ", size_, " ranks");
    MOELORA_NCCL_CHECK(ncclBroadcast(send, recv, count, nccl_type(type), root, comm_, stream));
  }

 private:
  /// What this rank sends to and receives from one peer.
  struct Blocks {
    const std::byte* send;
    std::size_t send_count;
    std::byte* recv;
    std::size_t recv_count;
  };

  /// One grouped round of point-to-point calls, peers in rank order; `blocks_of(peer)` says what.
  template <class BlocksOf>
  void exchange(CommElement type, cudaStream_t stream, BlocksOf&& blocks_of) {
    MOELORA_NCCL_CHECK(ncclGroupStart());
    try {
      for (int peer = 0; peer < size_; ++peer) {
        const Blocks b = blocks_of(peer);
        if (b.send_count) MOELORA_NCCL_CHECK(ncclSend(b.send, b.send_count, nccl_type(type), peer, comm_, stream));
        if (b.recv_count) MOELORA_NCCL_CHECK(ncclRecv(b.recv, b.recv_count, nccl_type(type), peer, comm_, stream));
      }
    } catch (...) {
      ncclGroupEnd();  // leave NCCL's group state balanced; the first error is the one reported
      throw;
    }
    MOELORA_NCCL_CHECK(ncclGroupEnd());
  }

  static ncclDataType_t nccl_type(CommElement type) {
    switch (type) {
      case CommElement::bf16: return ncclBfloat16;
      case CommElement::fp16: return ncclFloat16;
      case CommElement::fp32: return ncclFloat32;
      case CommElement::int32: return ncclInt32;
      case CommElement::int64: return ncclInt64;
      case CommElement::byte: break;
    }
    return ncclUint8;
  }
  static ncclRedOp_t nccl_op(ReduceOp op) { return op == ReduceOp::sum ? ncclSum : ncclMax; }

  ncclComm_t comm_;
  int rank_ = 0;
  int size_ = 1;
};

static_assert(Communicator<NcclCommunicator>);

}  // namespace moelora::parallel
