/// \file
/// \brief require_agreement: checks that every rank of a group holds the same values (a layer's
/// layout, an adapter's settings) before any collective relies on them.
#pragma once

#include <cstddef>
#include <cstdint>
#include <initializer_list>
#include <string>
#include <string_view>
#include <vector>

#include "moelora/core/buffer.hpp"
#include "moelora/core/error.hpp"
#include "moelora/parallel/communicator_ref.hpp"

namespace moelora::parallel {

/// One named value that every rank must agree on.
struct AgreedValue {
  std::string_view name;
  std::int64_t value;
};

/// Gathers `values` from every rank of `comm` (one all-gather of int64 on `stream`, then a host
/// sync) and throws ErrorCode::invalid_argument on every rank, naming `what`, the first value that
/// differs and the ranks' values, unless all ranks passed the same. A group of one rank agrees.
template <class Backend>
void require_agreement(const CommunicatorRef<Backend>& comm, const std::string& what,
                       std::initializer_list<AgreedValue> values, typename Backend::stream_type stream) {
  const int size = comm.size();
  if (size == 1) return;
  const std::size_t n = values.size();
  std::vector<std::int64_t> mine, all(n * static_cast<std::size_t>(size));
  for (const AgreedValue& v : values) mine.push_back(v.value);
  const Buffer<Backend> send(n * sizeof(std::int64_t)), recv(all.size() * sizeof(std::int64_t));
  Backend::copy_from_host(send.data(), mine.data(), send.bytes(), stream);
  comm.all_gather(send.data(), recv.data(), n, CommElement::int64, stream);
  Backend::copy_to_host(all.data(), recv.data(), recv.bytes(), stream);
  std::size_t i = 0;
  for (const AgreedValue& v : values) {
    for (int r = 1; r < size; ++r) {
      const std::int64_t other = all[static_cast<std::size_t>(r) * n + i];
      MOELORA_REQUIRE(other == all[i], ErrorCode::invalid_argument, what, " differs between the ranks of the tensor-parallel group: ",
                      v.name, " is ", all[i], " on rank 0 but ", other, " on rank ", r);
    }
    ++i;
  }
}

}  // namespace moelora::parallel
