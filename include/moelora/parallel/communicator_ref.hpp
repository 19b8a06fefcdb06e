/// \file
/// \brief CommunicatorRef<Backend>: a non-owning, type-erased reference to a Communicator of one
/// backend, so that a layer's type does not depend on the communicator's.
///
/// It forwards the collectives a tensor-parallel layer and its initialisation use (all_reduce,
/// all_gather, broadcast) with the communicator's semantics: every call is queued on the caller's
/// stream. A default-constructed reference is a group of one rank: rank 0, size 1, and every
/// collective a copy (nothing in place).
#pragma once

#include <concepts>
#include <cstddef>

#include "moelora/parallel/communicator.hpp"

namespace moelora::parallel {

/// See the file comment. The referenced communicator must outlive every use of the reference.
template <class Backend>
class CommunicatorRef {
 public:
  using backend_type = Backend;
  using stream_type = typename Backend::stream_type;

  /// A group of one rank.
  CommunicatorRef() = default;

  /// Refers to `comm` (not copied, never destroyed).
  template <Communicator C>
    requires std::same_as<typename C::backend_type, Backend>
  CommunicatorRef(C& comm)  // NOLINT(google-explicit-constructor): a reference converts implicitly
      : self_(&comm), ops_(&kOps<C>) {}

  [[nodiscard]] int rank() const { return ops_ ? ops_->rank(self_) : 0; }
  [[nodiscard]] int size() const { return ops_ ? ops_->size(self_) : 1; }

  /// recv[i] = op over ranks of send[i] (`count` elements; in place when send == recv).
  void all_reduce(const void* send, void* recv, std::size_t count, CommElement type, ReduceOp op,
                  stream_type stream) const {
    if (ops_) ops_->all_reduce(self_, send, recv, count, type, op, stream);
    else copy(recv, send, count, type, stream);
  }
  /// recv `[size · count]` holds rank r's `count` elements at r · count.
  void all_gather(const void* send, void* recv, std::size_t count, CommElement type, stream_type stream) const {
    if (ops_) ops_->all_gather(self_, send, recv, count, type, stream);
    else copy(recv, send, count, type, stream);
  }
  /// recv = root's send (`count` elements; send is read on the root only).
  void broadcast(const void* send, void* recv, std::size_t count, CommElement type, int root, stream_type stream) const {
    if (ops_) ops_->broadcast(self_, send, recv, count, type, root, stream);
    else copy(recv, send, count, type, stream);
  }

 private:
  struct Ops {
    int (*rank)(void*);
    int (*size)(void*);
    void (*all_reduce)(void*, const void*, void*, std::size_t, CommElement, ReduceOp, stream_type);
    void (*all_gather)(void*, const void*, void*, std::size_t, CommElement, stream_type);
    void (*broadcast)(void*, const void*, void*, std::size_t, CommElement, int, stream_type);
  };
  template <class C>
  static constexpr Ops kOps = {
      [](void* c) { return static_cast<C*>(c)->rank(); },
      [](void* c) { return static_cast<C*>(c)->size(); },
      [](void* c, const void* send, void* recv, std::size_t count, CommElement type, ReduceOp op, stream_type s) {
        static_cast<C*>(c)->all_reduce(send, recv, count, type, op, s);
      },
      [](void* c, const void* send, void* recv, std::size_t count, CommElement type, stream_type s) {
        static_cast<C*>(c)->all_gather(send, recv, count, type, s);
      },
      [](void* c, const void* send, void* recv, std::size_t count, CommElement type, int root, stream_type s) {
        static_cast<C*>(c)->broadcast(send, recv, count, type, root, s);
      }};

  static void copy(void* recv, const void* send, std::size_t count, CommElement type, stream_type stream) {
    if (recv != send) Backend::copy(recv, send, count * comm_element_size(type), stream);
  }

  void* self_ = nullptr;
  const Ops* ops_ = nullptr;
};

}  // namespace moelora::parallel
