/// \file
/// \brief Communicator behaviour, shared by every model: each collective and element type against
/// values every rank can compute, in place and out of place, with bitwise-equal results on all ranks.
/// The bodies run on every rank's thread at once, so they use plain blocks, not doctest SUBCASEs.
#pragma once

#include <doctest/doctest.h>

#include <cstdint>
#include <cstring>
#include <numeric>
#include <span>
#include <vector>

#include "moelora/core/buffer.hpp"
#include "moelora/core/half_types.hpp"
#include "moelora/parallel/communicator.hpp"

namespace moelora::testing {

/// Element i of rank r's input: a small integer (exact in every type, sums exact in bf16).
inline int comm_value(int rank, std::size_t i) { return static_cast<int>((i * 7 + static_cast<std::size_t>(rank) * 3) % 11) - 5; }

/// Host values of `type` from ints, and back.
template <class T>
std::vector<std::byte> comm_encode(const std::vector<int>& values) {
  std::vector<std::byte> bytes(values.size() * sizeof(T));
  for (std::size_t i = 0; i < values.size(); ++i) {
    const T v(static_cast<float>(values[i]));
    std::memcpy(bytes.data() + i * sizeof(T), &v, sizeof(T));
  }
  return bytes;
}
template <class T>
std::vector<int> comm_decode(const std::vector<std::byte>& bytes) {
  std::vector<int> values(bytes.size() / sizeof(T));
  for (std::size_t i = 0; i < values.size(); ++i) {
    T v;
    std::memcpy(&v, bytes.data() + i * sizeof(T), sizeof(T));
    values[i] = static_cast<int>(static_cast<float>(v));
  }
  return values;
}

/// Moves int vectors as `T` elements between the host and `Comm`'s backend memory.
template <class Comm, class T>
struct CommBuffers {
  using Backend = typename Comm::backend_type;
  typename Comm::stream_type stream;

  Buffer<Backend> upload(const std::vector<int>& values) {
    Buffer<Backend> buffer(std::max<std::size_t>(values.size() * sizeof(T), sizeof(T)));
    const std::vector<std::byte> bytes = comm_encode<T>(values);
    Backend::copy_from_host(buffer.data(), bytes.data(), bytes.size(), stream);
    return buffer;
  }
  std::vector<int> download(const Buffer<Backend>& buffer, std::size_t count) {
    std::vector<std::byte> bytes(count * sizeof(T));
    Backend::copy_to_host(bytes.data(), buffer.data(), bytes.size(), stream);
    return comm_decode<T>(bytes);
  }
};

/// Every collective of `comm` on elements of `T` (`type`), checked on this rank.
template <class T, class Comm>
void check_collectives_of(Comm& comm, parallel::CommElement type, typename Comm::stream_type stream) {
  using parallel::ReduceOp;
  const int n = comm.size(), me = comm.rank();
  const auto ranks = static_cast<std::size_t>(n);
  constexpr std::size_t kCount = 37;
  CommBuffers<Comm, T> io{stream};
  const auto input = [&](int rank, std::size_t count, std::size_t first = 0) {
    std::vector<int> v(count);
    for (std::size_t i = 0; i < count; ++i) v[i] = comm_value(rank, first + i);
    return v;
  };

  {  // all_reduce sum and max, out of place and in place
    for (const ReduceOp op : {ReduceOp::sum, ReduceOp::max}) {
      std::vector<int> expected = input(0, kCount);
      for (int r = 1; r < n; ++r)
        for (std::size_t i = 0; i < kCount; ++i)
          expected[i] = op == ReduceOp::sum ? expected[i] + comm_value(r, i) : std::max(expected[i], comm_value(r, i));
      Buffer send = io.upload(input(me, kCount));
      Buffer recv = io.upload(std::vector<int>(kCount, 99));
      comm.all_reduce(send.data(), recv.data(), kCount, type, op, stream);
      CHECK(io.download(recv, kCount) == expected);
      comm.all_reduce(send.data(), send.data(), kCount, type, op, stream);
      CHECK(io.download(send, kCount) == expected);
    }
  }
  {  // all_gather places rank r's block at r · count
    std::vector<int> expected;
    for (int r = 0; r < n; ++r) {
      const std::vector<int> block = input(r, kCount);
      expected.insert(expected.end(), block.begin(), block.end());
    }
    Buffer send = io.upload(input(me, kCount));
    Buffer recv = io.upload(std::vector<int>(kCount * ranks, 99));
    comm.all_gather(send.data(), recv.data(), kCount, type, stream);
    CHECK(io.download(recv, kCount * ranks) == expected);
  }
  {  // reduce_scatter gives rank r the sum of every rank's block r
    std::vector<int> expected(kCount, 0);
    for (int r = 0; r < n; ++r)
      for (std::size_t i = 0; i < kCount; ++i) expected[i] += comm_value(r, static_cast<std::size_t>(me) * kCount + i);
    Buffer send = io.upload(input(me, kCount * ranks));
    Buffer recv = io.upload(std::vector<int>(kCount, 99));
    comm.reduce_scatter(send.data(), recv.data(), kCount, type, ReduceOp::sum, stream);
    CHECK(io.download(recv, kCount) == expected);
  }
  {  // all_to_all sends block p to rank p
    std::vector<int> expected;
    for (int p = 0; p < n; ++p) {
      const std::vector<int> block = input(p, kCount, static_cast<std::size_t>(me) * kCount);
      expected.insert(expected.end(), block.begin(), block.end());
    }
    Buffer send = io.upload(input(me, kCount * ranks));
    Buffer recv = io.upload(std::vector<int>(kCount * ranks, 99));
    comm.all_to_all(send.data(), recv.data(), kCount, type, stream);
    CHECK(io.download(recv, kCount * ranks) == expected);
  }
  {  // all_to_all_v with uneven and empty blocks
    // Rank p sends (p + 2q) % 3 · 5 elements to rank q, the values it would hold at those offsets.
    const auto sent = [](int p, int q) { return static_cast<std::size_t>((p + 2 * q) % 3) * 5; };
    std::vector<std::size_t> send_counts(ranks), recv_counts(ranks);
    std::vector<int> expected;
    for (int q = 0; q < n; ++q) send_counts[static_cast<std::size_t>(q)] = sent(me, q);
    for (int p = 0; p < n; ++p) {
      recv_counts[static_cast<std::size_t>(p)] = sent(p, me);
      std::size_t offset = 0;
      for (int q = 0; q < me; ++q) offset += sent(p, q);
      const std::vector<int> block = input(p, sent(p, me), offset);
      expected.insert(expected.end(), block.begin(), block.end());
    }
    const std::size_t total_send = std::accumulate(send_counts.begin(), send_counts.end(), std::size_t{0});
    Buffer send = io.upload(input(me, total_send));
    Buffer recv = io.upload(std::vector<int>(expected.size(), 99));
    comm.all_to_all_v(send.data(), std::span<const std::size_t>(send_counts), recv.data(),
                      std::span<const std::size_t>(recv_counts), type, stream);
    CHECK(io.download(recv, expected.size()) == expected);
  }
  {  // broadcast from the last rank
    Buffer send = io.upload(input(me, kCount));
    Buffer recv = io.upload(std::vector<int>(kCount, 99));
    comm.broadcast(send.data(), recv.data(), kCount, type, n - 1, stream);
    CHECK(io.download(recv, kCount) == input(n - 1, kCount));
  }
}

/// Every collective for every element type.
template <class Comm>
void check_collectives(Comm& comm, typename Comm::stream_type stream) {
  using parallel::CommElement;
  check_collectives_of<float>(comm, CommElement::fp32, stream);
  check_collectives_of<bfloat16_t>(comm, CommElement::bf16, stream);
  check_collectives_of<half_t>(comm, CommElement::fp16, stream);
  check_collectives_of<std::int32_t>(comm, CommElement::int32, stream);
  check_collectives_of<std::int64_t>(comm, CommElement::int64, stream);
}

/// fp32 sums of inexact values reach every rank bitwise equal (each rank gathers all results).
template <class Comm>
void check_reduction_agrees_on_every_rank(Comm& comm, typename Comm::stream_type stream) {
  using Backend = typename Comm::backend_type;
  constexpr std::size_t kCount = 1000;
  std::vector<float> mine(kCount);
  for (std::size_t i = 0; i < kCount; ++i) mine[i] = 1.0f / static_cast<float>(i + 3 + 17 * static_cast<std::size_t>(comm.rank()));
  Buffer<Backend> values(kCount * 4), gathered(kCount * 4 * static_cast<std::size_t>(comm.size()));
  Backend::copy_from_host(values.data(), mine.data(), kCount * 4, stream);
  comm.all_reduce(values.data(), values.data(), kCount, parallel::CommElement::fp32, parallel::ReduceOp::sum, stream);
  comm.all_gather(values.data(), gathered.data(), kCount, parallel::CommElement::fp32, stream);
  std::vector<float> all(kCount * static_cast<std::size_t>(comm.size()));
  Backend::copy_to_host(all.data(), gathered.data(), all.size() * 4, stream);
  for (int r = 1; r < comm.size(); ++r)
    CHECK(std::memcmp(all.data(), all.data() + static_cast<std::size_t>(r) * kCount, kCount * 4) == 0);
}

}  // namespace moelora::testing
