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
// Dim 0 is the block dimension of every collective that splits or concatenates.
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "framework/stream.h"
#include "framework/tensor.h"

namespace loom {

enum class ReduceOp { sum, avg, max, min };
const char* reduce_op_name(ReduceOp op);  // "sum", "avg", "max", "min"

// A non-blocking collective in flight. Its tensors stay alive (the Work holds
// them) and must not be touched until wait() returns. Destroying a Work that
// was never waited for waits for it (a buffer cannot be freed under a transfer).
class Work {
 public:
  virtual ~Work() = default;
  // Blocks until the result is in place (MPI), or until it is ordered on the
  // stream (stream-ordered backends). Calling it again is a no-op.
  virtual void wait() = 0;
  // Never blocks; true once wait() would return at once. Calling it also lets
  // backends without a progress thread (MPI) advance the transfer.
  virtual bool is_completed() = 0;
};

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

  // ---- with default implementations (backends override with native calls) ----

  // Starts an all_reduce of `tensor` in place and returns at once; the result is
  // there after wait(). Default: the blocking all_reduce and a completed Work.
  virtual std::unique_ptr<Work> all_reduce_async(Tensor& tensor, ReduceOp op, Stream& stream);
  // All-to-all with per-rank row counts along dim 0 (expert dispatch):
  // in (sum(in_splits), ...): rows [sum(in_splits[:r]), +in_splits[r]) go to rank r;
  // out (sum(out_splits), ...): rows [sum(out_splits[:r]), +out_splits[r]) came from rank r.
  // out_splits[r] on this rank must equal in_splits[this rank] on rank r.
  // Default: P - 1 send_recv rounds (round s sends to rank + s, receives from rank - s).
  virtual void all_to_all_v(Tensor& out, const std::vector<int64_t>& out_splits, const Tensor& in,
                            const std::vector<int64_t>& in_splits, Stream& stream);
};

}  // namespace loom
