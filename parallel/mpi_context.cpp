// MpiContext and abort_all.
#include "parallel/mpi_context.h"

#include <cstdio>
#include <cstdlib>
#include <exception>

#include "parallel/mpi_check.h"

namespace loom {

MpiContext::MpiContext(int* argc, char*** argv) : uncaught_at_start_(std::uncaught_exceptions()) {
  int initialized = 0, finalized = 0;
  LOOM_MPI_CHECK(MPI_Initialized(&initialized));
  LOOM_MPI_CHECK(MPI_Finalized(&finalized));
  LOOM_CHECK(!finalized) << "MpiContext after MPI_Finalize: MPI cannot be initialized twice in one process";
  int provided = MPI_THREAD_SINGLE;
  if (!initialized) {
    // Errors before MPI_Init_thread returns are fatal inside MPI itself.
    LOOM_MPI_CHECK(MPI_Init_thread(argc, argv, MPI_THREAD_FUNNELED, &provided));
    initialized_here_ = true;
  } else {
    LOOM_MPI_CHECK(MPI_Query_thread(&provided));
  }
  LOOM_CHECK(provided >= MPI_THREAD_FUNNELED) << "MPI provides thread level " << provided
                                              << ", loom needs MPI_THREAD_FUNNELED (" << MPI_THREAD_FUNNELED << ")";
  LOOM_MPI_CHECK(MPI_Comm_set_errhandler(MPI_COMM_WORLD, MPI_ERRORS_RETURN));
  LOOM_MPI_CHECK(MPI_Comm_rank(MPI_COMM_WORLD, &world_rank_));
  LOOM_MPI_CHECK(MPI_Comm_size(MPI_COMM_WORLD, &world_size_));
  MPI_Comm node = MPI_COMM_NULL;
  LOOM_MPI_CHECK(MPI_Comm_split_type(MPI_COMM_WORLD, MPI_COMM_TYPE_SHARED, world_rank_, MPI_INFO_NULL, &node))
      << "finding the ranks of this node";
  LOOM_MPI_CHECK(MPI_Comm_rank(node, &local_rank_));
  LOOM_MPI_CHECK(MPI_Comm_size(node, &local_size_));
  LOOM_MPI_CHECK(MPI_Comm_free(&node));
  world_ = std::make_unique<MpiCommunicator>(MPI_COMM_WORLD, "world");
}

MpiContext::~MpiContext() {
  if (std::uncaught_exceptions() > uncaught_at_start_) {
    // Unwinding towards main()'s catch: MPI_Finalize would wait for ranks that
    // may never arrive. Keep MPI up so that abort_all can stop every rank.
    (void)world_.release();
    return;
  }
  world_.reset();  // frees its communicator while MPI is still up
  int finalized = 0;
  MPI_Finalized(&finalized);
  if (initialized_here_ && !finalized) MPI_Finalize();
}

void abort_all(const std::string& message, int exit_code) {
  int initialized = 0, finalized = 0;
  MPI_Initialized(&initialized);
  MPI_Finalized(&finalized);
  const bool running = initialized && !finalized;
  int rank = 0, size = 1;
  if (running) {
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    MPI_Comm_size(MPI_COMM_WORLD, &size);
  }
  std::fprintf(stderr, "[rank %d/%d] fatal: %s\n", rank, size, message.c_str());
  std::fflush(stderr);
  if (running) MPI_Abort(MPI_COMM_WORLD, exit_code);
  std::_Exit(exit_code);
}

}  // namespace loom
