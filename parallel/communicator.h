// Communicator: one interface for collectives over a group of ranks, with an
// MPI backend for CPU tensors (parallel/mpi_communicator.*) and, with the CUDA
// backend, an NCCL backend for CUDA tensors. Every distributed algorithm in
// loom is written against this interface, so it runs and is tested on CPU
// ranks under mpirun.
//
// Conventions: tensors are contiguous; collectives are called by every rank of
// the group in the same order; `stream` orders the work on CUDA (ignored by
// MPI, which completes before returning). Sizes and dtypes must agree across
// ranks; a mismatch is an error, not a hang, wherever the backend can tell.
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "framework/stream.h"
#include "framework/tensor.h"

namespace loom {

enum class ReduceOp { sum, avg, max, min };

class Communicator {
 public:
  virtual ~Communicator() = default;

  virtual int rank() const = 0;  // rank within this group
  virtual int size() const = 0;  // ranks in this group
  virtual const std::string& name() const = 0;  // group name ("world", "dp", "cp", ...)

  // In place: every rank ends with the reduction of all ranks' `tensor`.
  virtual void all_reduce(Tensor& tensor, ReduceOp op, Stream& stream) = 0;
  // out (P * N, ...) = concat over ranks of in (N, ...), in rank order.
  virtual void all_gather(Tensor& out, const Tensor& in, Stream& stream) = 0;
  // out (N, ...) = rank r's slice of the reduction of in (P * N, ...).
  virtual void reduce_scatter(Tensor& out, const Tensor& in, ReduceOp op, Stream& stream) = 0;
  // In place: every rank ends with `root`'s tensor.
  virtual void broadcast(Tensor& tensor, int root, Stream& stream) = 0;
  // Point to point (blocking for MPI; stream-ordered for NCCL). Ranks are group ranks.
  virtual void send(const Tensor& tensor, int dst, Stream& stream) = 0;
  virtual void recv(Tensor& tensor, int src, Stream& stream) = 0;
  // Simultaneous send to `dst` and receive from `src` (a ring step): deadlock-free.
  virtual void send_recv(const Tensor& send_tensor, int dst, Tensor& recv_tensor, int src, Stream& stream) = 0;
  // out (P * N, ...) : block r of `in` goes to rank r; block r of `out` came from rank r.
  virtual void all_to_all(Tensor& out, const Tensor& in, Stream& stream) = 0;
  virtual void barrier() = 0;
};

}  // namespace loom
