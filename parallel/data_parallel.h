// Data parallelism: every rank holds the same parameters and computes
// gradients on its own shard of the batch; GradReducer averages the gradients
// over the data-parallel group while backward is still running.
//
// Parameters are packed into buckets in reverse registration order (roughly
// the order backward finishes them), each about `bucket_bytes`. A grad-ready
// hook on every parameter marks it ready; once all parameters of a bucket are
// ready, the bucket's gradients are copied into its flat buffer and an
// asynchronous all-reduce starts, overlapping the rest of backward. Buckets
// start strictly in bucket order (a ready bucket waits for earlier ones), so
// every rank issues the same collectives in the same order even when their
// gradients complete in different orders. finish(), called after backward,
// starts whatever has not started (parameters that got no gradient in this
// backward count as zeros, so ranks still agree), waits, and writes the
// reduced values back into each parameter's .grad().
//
// Gradient accumulation: set_sync(false) (or a NoSyncGuard) for all micro-
// batches but the last; their hooks do nothing and gradients accumulate
// locally in .grad(); the last backward runs with sync on and reduces the
// accumulated sums. Usage:
//   GradReducer reducer(model.named_parameters(), mesh.group("dp"));
//   for (...) { { NoSyncGuard guard(reducer); loss(micro_k).backward(); } ... }
//   loss(micro_last).backward(); reducer.finish(); optimizer.step();
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "framework/module.h"
#include "parallel/communicator.h"

namespace loom {

struct GradReducerOptions {
  int64_t bucket_bytes = int64_t{25} << 20;  // target bucket size; a larger parameter gets its own bucket
  // avg: the gradient of the mean loss over the group's batch (each rank's
  // loss is a mean over its shard of equal size); sum where the loss is
  // already normalized by the global token count.
  ReduceOp reduce_op = ReduceOp::avg;
};

namespace detail {
struct GradReducerState;
}

class GradReducer {
 public:
  // Parameters that do not require grad are left out; a Variable listed twice
  // (tied weights) is reduced once. `comm` must outlive the reducer.
  GradReducer(std::vector<Parameter> params, Communicator& comm, GradReducerOptions options = {});
  // Hooks registered on the parameters stay, but do nothing afterwards.
  ~GradReducer();
  GradReducer(const GradReducer&) = delete;
  GradReducer& operator=(const GradReducer&) = delete;

  // Off: hooks do nothing and finish() leaves the local gradients as they are.
  void set_sync(bool sync);
  bool sync() const;

  // After a synchronized backward: starts the remaining buckets, waits for all,
  // writes the reduced gradient into every parameter's .grad() (zeros reduced
  // for those without one) and resets for the next backward. No-op with sync off.
  void finish();

  int num_buckets() const;
  // Parameter names per bucket, in the order buckets start.
  std::vector<std::vector<std::string>> bucket_names() const;
  // Buckets started since the last finish() (grows during backward).
  int launched_buckets() const;

 private:
  std::shared_ptr<detail::GradReducerState> state_;  // hooks hold weak references
};

// Turns gradient synchronization off for its scope (micro-batches before the last).
class NoSyncGuard {
 public:
  explicit NoSyncGuard(GradReducer& reducer) : reducer_(reducer), previous_(reducer.sync()) {
    reducer_.set_sync(false);
  }
  ~NoSyncGuard() { reducer_.set_sync(previous_); }
  NoSyncGuard(const NoSyncGuard&) = delete;
  NoSyncGuard& operator=(const NoSyncGuard&) = delete;

 private:
  GradReducer& reducer_;
  bool previous_;
};

// Copies `root`'s parameter values to every rank of `comm` (start-up, so that
// data-parallel replicas begin identical). All ranks must pass the same
// parameter list (names, shapes, dtypes); a mismatch is an error on every rank.
void broadcast_parameters(const std::vector<Parameter>& params, Communicator& comm, int root = 0);

}  // namespace loom
