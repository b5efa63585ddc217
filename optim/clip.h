// Global-norm gradient clipping. The norm is the L2 norm over every defined
// parameter gradient, accumulated in f64. Gradients of parameters sharded
// across ranks (expert parameters now, ZeRO shards later) hold only this
// rank's part of the full gradient, so their squared norms are summed over
// `comm_for_sharded`; replicated parameters (identical on every rank after the
// data-parallel reduction) are counted once.
//
// Collective contract: when a communicator is given, every rank of its group
// must call these functions in the same order (they all-reduce one f64 value
// each time, even on a rank that holds no sharded gradient). Without one, the
// sharded gradients are taken to be complete on this rank (single rank).
//
// Returning the norm is a host synchronization on CUDA; it is needed because
// the trainer logs the norm and skips steps whose norm is not finite.
#pragma once

#include <vector>

#include "framework/module.h"
#include "parallel/communicator.h"

namespace loom {

// Whether a parameter's gradient is split across ranks (summed over the comm).
bool is_sharded(const ParamAttrs& attrs);

// The global gradient norm, without clipping.
double grad_norm(const std::vector<Parameter>& params, Communicator* comm_for_sharded = nullptr);

// Scales every gradient by max_norm / (norm + 1e-6) when norm > max_norm and
// returns the norm before clipping. max_norm <= 0 disables clipping (the norm
// is still returned). A NaN or Inf norm is returned as is and nothing is
// scaled (the trainer skips such a step).
double clip_grad_norm(const std::vector<Parameter>& params, double max_norm, Communicator* comm_for_sharded = nullptr);

// True when every defined gradient is finite. With `comm`, the answer is the
// same on every rank (non-finite counts are summed over the group).
bool grads_finite(const std::vector<Parameter>& params, Communicator* comm = nullptr);

}  // namespace loom
