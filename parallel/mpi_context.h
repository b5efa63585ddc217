// MpiContext: MPI's lifetime for one process (create one in main(), before
// anything that communicates, and let it outlive every communicator and mesh).
// It initializes MPI with MPI_THREAD_FUNNELED (only the main thread calls MPI)
// unless MPI is already initialized, finalizes what it initialized, switches
// MPI_COMM_WORLD to returning errors (so LOOM_MPI_CHECK throws), and finds the
// node-local rank used to pick a GPU. A plain `./binary` without mpirun is a
// world of one rank.
//
// abort_all(message) is for main()'s last-resort catch: it prints the message
// with this rank's number and aborts every rank, so the others do not hang in
// a collective waiting for one that has died.
#pragma once

#include <memory>
#include <string>

#include "parallel/mpi_communicator.h"

namespace loom {

class MpiContext {
 public:
  // argc/argv may be null.
  MpiContext(int* argc, char*** argv);
  // Finalizes MPI, except while an exception unwinds through it: then MPI stays
  // up for abort_all (MPI_Finalize would wait for ranks that may never come).
  ~MpiContext();
  MpiContext(const MpiContext&) = delete;
  MpiContext& operator=(const MpiContext&) = delete;

  int world_rank() const { return world_rank_; }
  int world_size() const { return world_size_; }
  int local_rank() const { return local_rank_; }  // rank among the processes of this node
  int local_size() const { return local_size_; }  // processes on this node
  // A communicator over all ranks (its own duplicate of MPI_COMM_WORLD), named "world".
  MpiCommunicator& world() { return *world_; }

 private:
  int uncaught_at_start_ = 0;
  bool initialized_here_ = false;
  int world_rank_ = 0, world_size_ = 1, local_rank_ = 0, local_size_ = 1;
  std::unique_ptr<MpiCommunicator> world_;
};

// Prints "[rank R/P] message" to stderr and aborts all ranks with `exit_code`
// (MPI_Abort; a plain exit when MPI is not running). For main() only.
[[noreturn]] void abort_all(const std::string& message, int exit_code = 1);

}  // namespace loom
