// The host-thread communicator: every collective at 1 to 4 ranks, agreement checks, and a failing
// rank that releases the others instead of hanging them.
#include <doctest/doctest.h>

#include <atomic>

#include "cases/communicator_cases.hpp"
#include "moelora/parallel/host_thread_communicator.hpp"

using namespace moelora;
using namespace moelora::parallel;
using namespace moelora::testing;

TEST_CASE("host-thread communicator: every collective and element type at 1 to 4 ranks") {
  for (const int ranks : {1, 2, 3, 4}) {
    CAPTURE(ranks);
    run_ranks(ranks, [](HostThreadCommunicator& comm) {
      check_collectives(comm, HostStream{});
      check_reduction_agrees_on_every_rank(comm, HostStream{});
    });
  }
}

TEST_CASE("host-thread communicator: ranks that call different collectives all get a clear error") {
  std::atomic<int> errors = 0;
  run_ranks(3, [&](HostThreadCommunicator& comm) {
    std::vector<float> data(8, 1.0f);
    const std::size_t count = comm.rank() == 1 ? 4 : 8;  // rank 1 disagrees on the count
    try {
      comm.all_reduce(data.data(), data.data(), count, CommElement::fp32, ReduceOp::sum, HostStream{});
    } catch (const Error& e) {
      CHECK(e.code() == ErrorCode::invalid_argument);
      CHECK(std::string(e.what()).find("ranks disagree on a collective") != std::string::npos);
      ++errors;
    }
    // The group stays usable: a matching call afterwards works.
    comm.all_reduce(data.data(), data.data(), 8, CommElement::fp32, ReduceOp::sum, HostStream{});
    CHECK(data[0] == 3.0f);
  });
  CHECK(errors == 3);
}

TEST_CASE("host-thread communicator: all_to_all_v counts that do not match are an error on every rank") {
  std::atomic<int> errors = 0;
  run_ranks(2, [&](HostThreadCommunicator& comm) {
    std::vector<float> send(4, 1.0f), recv(8, 0.0f);
    const std::vector<std::size_t> send_counts{2, 2};
    const std::vector<std::size_t> recv_counts{2, comm.rank() == 0 ? 3u : 2u};  // rank 0 expects 3 from rank 1
    CHECK_THROWS_WITH_AS(comm.all_to_all_v(send.data(), send_counts, recv.data(), recv_counts, CommElement::fp32,
                                           HostStream{}),
                         doctest::Contains("all_to_all_v: rank 1 sends 2 elements to rank 0, which expects 3"), Error);
    ++errors;
  });
  CHECK(errors == 2);
}

TEST_CASE("host-thread communicator: a rank that throws releases the ranks waiting in a collective") {
  std::atomic<int> released = 0;
  CHECK_THROWS_WITH_AS(run_ranks(3,
                                 [&](HostThreadCommunicator& comm) {
                                   if (comm.rank() == 2) throw std::runtime_error("rank 2 failed on purpose");
                                   float value = 1.0f;
                                   try {
                                     comm.all_reduce(&value, &value, 1, CommElement::fp32, ReduceOp::sum, HostStream{});
                                   } catch (const Error& e) {
                                     CHECK(std::string(e.what()).find("collective was abandoned") != std::string::npos);
                                     ++released;
                                     throw;
                                   }
                                 }),
                       "rank 2 failed on purpose", std::runtime_error);
  CHECK(released == 2);
}

TEST_CASE("host-thread communicator: bad ranks and group sizes are rejected") {
  CHECK_THROWS_AS(HostThreadGroup(0), Error);
  HostThreadGroup group(2);
  CHECK_THROWS_WITH_AS(HostThreadCommunicator(group, 2), doctest::Contains("rank 2 is outside a host-thread group of 2"), Error);
  CHECK_THROWS_AS(HostThreadCommunicator(group, -1), Error);
}
