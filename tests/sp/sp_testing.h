// Helpers for the sequence-parallel tests (loom_sp_tests, run under mpirun at
// 1..4 ranks): a group of the first n world ranks (the others sit the test
// out), and the gradient of a leaf as a tensor. Every rank inside a group must
// take the same collective path; decisions depend only on sizes.
#pragma once

#include <gtest/gtest.h>

#include <memory>
#include <string>

#include "parallel/mpi_communicator.h"
#include "tests/parallel/parallel_testing.h"

namespace loom::testing {

// World ranks [0, n) as one group named `name`; nullptr on the other ranks.
// Collective over the world (every rank calls it).
inline std::unique_ptr<MpiCommunicator> first_ranks(int n, const std::string& name = "cp") {
  MpiCommunicator& world = mpi_context().world();
  const bool member = world.rank() < n;
  std::unique_ptr<MpiCommunicator> group = world.split(member ? 0 : 1, world.rank(), name);
  if (!member) group.reset();
  return group;
}

}  // namespace loom::testing

// Skips the test (on every rank alike, with the reason) when the world has
// fewer than n ranks.
#define LOOM_SKIP_UNLESS_RANKS(n)                                                                               \
  do {                                                                                                          \
    if (::loom::testing::mpi_context().world().size() < (n))                                                    \
      GTEST_SKIP() << "needs " << (n) << " ranks, the world has " << ::loom::testing::mpi_context().world().size() \
                   << " (run under mpirun -np " << (n) << ")";                                                  \
  } while (0)

// Declares `var`, the group of the first n ranks; skips the test when the world
// is smaller (with the reason) and on ranks outside the group.
#define LOOM_SP_GROUP(var, n)                                                   \
  LOOM_SKIP_UNLESS_RANKS(n);                                                    \
  std::unique_ptr<::loom::MpiCommunicator> var = ::loom::testing::first_ranks(n); \
  if (!var) return
