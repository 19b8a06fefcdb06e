/// \file
/// \brief HostThreadCommunicator: N ranks as N threads of one process, over host memory — the
/// Communicator of the CPU backend, of tests on machines without GPUs, and of users without GPUs.
///
/// The ranks of a `HostThreadGroup` meet in each collective: every rank posts its buffers, waits for
/// the others, reads what it needs into a private result, waits until every rank has read, then
/// writes its output (so in-place calls are safe). Reductions run in rank order 0, 1, …, in fp32
/// for 16-bit types (rounded once) and in the integer type for integers, so every rank receives
/// bitwise the same result. A call whose count, type, operation or root differs between ranks
/// throws ErrorCode::invalid_argument on every rank. `run_ranks` runs a function on N threads; if
/// one rank throws, the group is aborted and ranks waiting in a collective throw instead of hanging.
#pragma once

#include <condition_variable>
#include <cstddef>
#include <cstring>
#include <exception>
#include <mutex>
#include <numeric>
#include <span>
#include <string_view>
#include <thread>
#include <vector>

#include "moelora/core/error.hpp"
#include "moelora/host/backend.hpp"
#include "moelora/parallel/communicator.hpp"

namespace moelora::parallel {

/// The shared state of one group of host-thread ranks; it must outlive their communicators.
class HostThreadGroup {
 public:
  explicit HostThreadGroup(int size) : size_(size), posts_(static_cast<std::size_t>(size > 0 ? size : 0)) {
    MOELORA_REQUIRE(size >= 1, ErrorCode::invalid_argument, "a host-thread group needs at least one rank, got ", size);
  }
  HostThreadGroup(const HostThreadGroup&) = delete;
  HostThreadGroup& operator=(const HostThreadGroup&) = delete;

  [[nodiscard]] int size() const { return size_; }

  /// Marks the group failed: ranks waiting in a collective, and every later collective, throw.
  void abort() {
    const std::lock_guard lock(mutex_);
    aborted_ = true;
    cv_.notify_all();
  }

 private:
  friend class HostThreadCommunicator;

  /// What one rank brings to a collective.
  struct Post {
    std::string_view name;  // the collective
    const void* send = nullptr;
    std::size_t count = 0;
    CommElement type = CommElement::byte;
    ReduceOp op = ReduceOp::sum;
    int root = 0;
    std::span<const std::size_t> send_counts{}, recv_counts{};  // all_to_all_v only
  };

  /// Waits until every rank has called it (a reusable barrier); throws once the group is aborted.
  void arrive_and_wait(std::unique_lock<std::mutex>& lock) {
    require_alive();
    const std::uint64_t generation = generation_;
    if (++arrived_ == size_) {
      arrived_ = 0;
      ++generation_;
      cv_.notify_all();
      return;
    }
    cv_.wait(lock, [&] { return generation_ != generation || aborted_; });
    if (generation_ == generation) require_alive();
  }
  void require_alive() const {
    MOELORA_REQUIRE(!aborted_, ErrorCode::invalid_argument,
                    "a rank of the host-thread group failed; the collective was abandoned");
  }

  int size_;
  std::mutex mutex_;
  std::condition_variable cv_;
  int arrived_ = 0;
  std::uint64_t generation_ = 0;
  bool aborted_ = false;
  std::vector<Post> posts_;
};

/// Rank `rank` of a HostThreadGroup (a Communicator on HostBackend).
class HostThreadCommunicator {
 public:
  using backend_type = HostBackend;
  using stream_type = HostStream;

  HostThreadCommunicator(HostThreadGroup& group, int rank) : group_(&group), rank_(rank) {
    MOELORA_REQUIRE(rank >= 0 && rank < group.size(), ErrorCode::invalid_argument, "rank ", rank,
                    " is outside a host-thread group of ", group.size(), " ranks");
  }

  [[nodiscard]] int rank() const { return rank_; }
  [[nodiscard]] int size() const { return group_->size(); }

  void all_reduce(const void* send, void* recv, std::size_t count, CommElement type, ReduceOp op, HostStream) {
    std::vector<std::byte> result(count * comm_element_size(type));
    meet({.name = "all_reduce", .send = send, .count = count, .type = type, .op = op}, [&](std::span<const HostThreadGroup::Post> posts) {
      reduce(posts, 0, count, type, op, result.data());
    });
    std::memcpy(recv, result.data(), result.size());
  }

  void all_gather(const void* send, void* recv, std::size_t count, CommElement type, HostStream) {
    const std::size_t block = count * comm_element_size(type);
    std::vector<std::byte> result(block * static_cast<std::size_t>(size()));
    meet({.name = "all_gather", .send = send, .count = count, .type = type}, [&](std::span<const HostThreadGroup::Post> posts) {
      for (std::size_t r = 0; r < posts.size(); ++r) std::memcpy(result.data() + r * block, posts[r].send, block);
    });
    std::memcpy(recv, result.data(), result.size());
  }

  void reduce_scatter(const void* send, void* recv, std::size_t count, CommElement type, ReduceOp op, HostStream) {
    std::vector<std::byte> result(count * comm_element_size(type));
    meet({.name = "reduce_scatter", .send = send, .count = count, .type = type, .op = op}, [&](std::span<const HostThreadGroup::Post> posts) {
      reduce(posts, static_cast<std::size_t>(rank_) * count, count, type, op, result.data());
    });
    std::memcpy(recv, result.data(), result.size());
  }

  void all_to_all(const void* send, void* recv, std::size_t count, CommElement type, HostStream) {
    const std::size_t block = count * comm_element_size(type);
    std::vector<std::byte> result(block * static_cast<std::size_t>(size()));
    meet({.name = "all_to_all", .send = send, .count = count, .type = type}, [&](std::span<const HostThreadGroup::Post> posts) {
      for (std::size_t p = 0; p < posts.size(); ++p)
        std::memcpy(result.data() + p * block, static_cast<const std::byte*>(posts[p].send) + rank_index() * block,
                    block);
    });
    std::memcpy(recv, result.data(), result.size());
  }

  void all_to_all_v(const void* send, std::span<const std::size_t> send_counts, void* recv,
                    std::span<const std::size_t> recv_counts, CommElement type, HostStream) {
    const auto ranks = static_cast<std::size_t>(size());
    MOELORA_REQUIRE(send_counts.size() == ranks && recv_counts.size() == ranks, ErrorCode::invalid_argument,
                    "all_to_all_v needs ", ranks, " send and receive counts, got ", send_counts.size(), " and ",
                    recv_counts.size());
    const std::size_t element = comm_element_size(type);
    std::vector<std::byte> result(std::accumulate(recv_counts.begin(), recv_counts.end(), std::size_t{0}) * element);
    meet({.name = "all_to_all_v", .send = send, .type = type, .send_counts = send_counts, .recv_counts = recv_counts}, [&](std::span<const HostThreadGroup::Post> posts) {
      std::size_t at = 0;
      for (std::size_t p = 0; p < ranks; ++p) {
        const std::span<const std::size_t> theirs = posts[p].send_counts;
        const std::size_t offset = std::accumulate(theirs.begin(), theirs.begin() + static_cast<std::ptrdiff_t>(rank_index()),
                                                   std::size_t{0});
        std::memcpy(result.data() + at * element, static_cast<const std::byte*>(posts[p].send) + offset * element,
                    recv_counts[p] * element);
        at += recv_counts[p];
      }
    });
    std::memcpy(recv, result.data(), result.size());
  }

  void broadcast(const void* send, void* recv, std::size_t count, CommElement type, int root, HostStream) {
    MOELORA_REQUIRE(root >= 0 && root < size(), ErrorCode::invalid_argument, "broadcast root ", root,
                    " is outside a group of ", size(), " ranks");
    std::vector<std::byte> result(count * comm_element_size(type));
    meet({.name = "broadcast", .send = send, .count = count, .type = type, .root = root}, [&](std::span<const HostThreadGroup::Post> posts) {
      std::memcpy(result.data(), posts[static_cast<std::size_t>(root)].send, result.size());
    });
    std::memcpy(recv, result.data(), result.size());
  }

 private:
  [[nodiscard]] std::size_t rank_index() const { return static_cast<std::size_t>(rank_); }

  /// Posts this rank's part, waits for every rank, checks that all posted the same call, runs
  /// `read(posts)` (which may read every rank's send buffer), and waits until every rank has read;
  /// a disagreement is thrown on every rank after that second meeting.
  template <class Read>
  void meet(const HostThreadGroup::Post& mine, Read&& read) {
    HostThreadGroup& g = *group_;
    std::unique_lock lock(g.mutex_);
    g.posts_[rank_index()] = mine;
    g.arrive_and_wait(lock);
    std::exception_ptr disagreement;  // thrown only after the second meeting, so no rank re-posts early
    try {
      check_agreement(g.posts_);
    } catch (const Error&) {
      disagreement = std::current_exception();
    }
    if (!disagreement) {
      lock.unlock();
      read(std::span<const HostThreadGroup::Post>(g.posts_));
      lock.lock();
    }
    g.arrive_and_wait(lock);
    if (disagreement) std::rethrow_exception(disagreement);
  }

  /// Throws (on every rank alike: all see the same posts) unless every rank posted the same call.
  static void check_agreement(std::span<const HostThreadGroup::Post> posts) {
    const HostThreadGroup::Post& first = posts.front();
    for (std::size_t r = 0; r < posts.size(); ++r) {
      const HostThreadGroup::Post& p = posts[r];
      MOELORA_REQUIRE(p.name == first.name && p.count == first.count && p.type == first.type && p.op == first.op &&
                          p.root == first.root,
                      ErrorCode::invalid_argument, "ranks disagree on a collective: rank 0 called ", first.name, " of ",
                      first.count, " ", comm_element_name(first.type), " elements, rank ", r, " called ", p.name,
                      " of ", p.count, " ", comm_element_name(p.type), " elements (or another operation or root)");
      for (std::size_t q = 0; q < p.send_counts.size(); ++q)  // all_to_all_v: r's sends are q's receives
        MOELORA_REQUIRE(p.send_counts[q] == posts[q].recv_counts[r], ErrorCode::invalid_argument,
                        "all_to_all_v: rank ", r, " sends ", p.send_counts[q], " elements to rank ", q,
                        ", which expects ", posts[q].recv_counts[r]);
    }
  }

  /// out[i] = op over ranks, in rank order, of element `offset + i` of each rank's send buffer.
  static void reduce(std::span<const HostThreadGroup::Post> posts, std::size_t offset, std::size_t count,
                     CommElement type, ReduceOp op, std::byte* out) {
    switch (type) {
      case CommElement::bf16: return reduce_as<bfloat16_t, float>(posts, offset, count, op, out);
      case CommElement::fp16: return reduce_as<half_t, float>(posts, offset, count, op, out);
      case CommElement::fp32: return reduce_as<float, float>(posts, offset, count, op, out);
      case CommElement::int32: return reduce_as<std::int32_t, std::int32_t>(posts, offset, count, op, out);
      case CommElement::int64: return reduce_as<std::int64_t, std::int64_t>(posts, offset, count, op, out);
      case CommElement::byte: return reduce_as<std::uint8_t, std::uint8_t>(posts, offset, count, op, out);
    }
  }
  /// `reduce` with elements stored as `Stored` and combined as `Acc`.
  template <class Stored, class Acc>
  static void reduce_as(std::span<const HostThreadGroup::Post> posts, std::size_t offset, std::size_t count, ReduceOp op,
                        std::byte* out) {
    const auto load = [&](std::size_t r, std::size_t i) {
      Stored s;
      std::memcpy(&s, static_cast<const std::byte*>(posts[r].send) + (offset + i) * sizeof(Stored), sizeof(Stored));
      return static_cast<Acc>(s);
    };
    for (std::size_t i = 0; i < count; ++i) {
      Acc acc = load(0, i);
      for (std::size_t r = 1; r < posts.size(); ++r) {
        const Acc v = load(r, i);
        acc = op == ReduceOp::sum ? static_cast<Acc>(acc + v) : (v > acc ? v : acc);
      }
      const Stored s(acc);
      std::memcpy(out + i * sizeof(Stored), &s, sizeof(Stored));
    }
  }

  HostThreadGroup* group_;
  int rank_;
};

static_assert(Communicator<HostThreadCommunicator>);

/// Runs `f(HostThreadCommunicator&)` on `size` threads, rank r on thread r, over one new group;
/// joins them and rethrows the first exception a rank threw (the others are released from any
/// collective they wait in).
template <class F>
void run_ranks(int size, F&& f) {
  HostThreadGroup group(size);
  std::mutex error_mutex;
  std::exception_ptr first_error;
  std::vector<std::thread> threads;
  threads.reserve(static_cast<std::size_t>(size));
  for (int r = 0; r < size; ++r) {
    threads.emplace_back([&, r] {
      try {
        HostThreadCommunicator comm(group, r);
        f(comm);
      } catch (...) {
        {
          const std::lock_guard lock(error_mutex);
          if (!first_error) first_error = std::current_exception();
        }
        group.abort();
      }
    });
  }
  for (std::thread& t : threads) t.join();
  if (first_error) std::rethrow_exception(first_error);
}

}  // namespace moelora::parallel
