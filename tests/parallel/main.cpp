// main() of loom_parallel_tests: MPI up, every rank runs every test, MPI down.
// Rank 0 prints gtest's usual output; the other ranks print only their
// failures, prefixed with their rank. Every rank exits non-zero when any rank
// failed, so mpirun (and ctest) report the failure whichever rank saw it.
#include <gtest/gtest.h>

#include <cstdio>

#include "parallel/mpi_context.h"
#include "tests/parallel/parallel_testing.h"

namespace loom::testing {

namespace {
MpiContext* g_mpi_context = nullptr;

// Failures of a non-root rank, with the rank in front.
class RankFailurePrinter : public ::testing::EmptyTestEventListener {
 public:
  explicit RankFailurePrinter(int rank) : rank_(rank) {}
  void OnTestPartResult(const ::testing::TestPartResult& result) override {
    if (!result.failed()) return;
    std::fprintf(stderr, "[rank %d] %s:%d: Failure\n%s\n", rank_, result.file_name() ? result.file_name() : "?",
                 result.line_number(), result.message());
  }
  void OnTestEnd(const ::testing::TestInfo& info) override {
    if (info.result()->Failed()) std::fprintf(stderr, "[rank %d] FAILED %s.%s\n", rank_, info.test_suite_name(), info.name());
  }

 private:
  int rank_;
};
}  // namespace

MpiContext& mpi_context() {
  LOOM_CHECK(g_mpi_context != nullptr) << "mpi_context() before main() created it";
  return *g_mpi_context;
}

}  // namespace loom::testing

int main(int argc, char** argv) {
  try {
    loom::MpiContext context(&argc, &argv);
    loom::testing::g_mpi_context = &context;
    ::testing::InitGoogleTest(&argc, argv);
    const int rank = context.world_rank();
    if (rank != 0) {
      ::testing::TestEventListeners& listeners = ::testing::UnitTest::GetInstance()->listeners();
      delete listeners.Release(listeners.default_result_printer());
      listeners.Append(new loom::testing::RankFailurePrinter(rank));
    }
    const int local = RUN_ALL_TESTS();
    loom::Tensor any = loom::Tensor::from_vector<int32_t>({local != 0 ? 1 : 0}, {1});
    context.world().all_reduce(any, loom::ReduceOp::max, loom::testing::cpu_stream());
    const bool failed_somewhere = any.item() != 0;
    if (rank == 0 && failed_somewhere && local == 0) {
      std::fprintf(stderr, "tests failed on other ranks (see the [rank N] lines above)\n");
    }
    loom::testing::g_mpi_context = nullptr;
    return failed_somewhere ? 1 : 0;
  } catch (const std::exception& e) {
    loom::abort_all(e.what());
  }
}
