// AdamW with decoupled weight decay, bias-corrected moments, and fp32 master
// weights. The optimizer holds, per parameter (by NAME, never by position):
//   exp_avg, exp_avg_sq : first and second moments, f32 (f64 for f64 params);
//   master              : an f32 copy of the weights, only when the parameter's
//                         dtype is 16-bit (bf16 compute weights on CUDA). The
//                         update runs on the master and the compute copy is
//                         rewritten from it (rounded) in the same fused pass.
//                         f32 and f64 parameters are their own master (no copy).
// Weight decay is applied only to parameters whose attrs.weight_decay is true
// (norms, biases and embeddings opt out in module.h). Each parameter is one
// call of the fused kernel (kernels/cpu/adamw.h) on flat spans.
//
// Gradient accumulation over micro-batches needs nothing here: the trainer
// scales each micro-batch loss by 1 / grad_accum and calls backward on it;
// autograd sums the gradients into the leaf grads, so after the last
// micro-batch they equal the gradient of the mean loss over the whole batch.
// Then: clip_grad_norm (clip.h), step(lr), zero_grad(). step() sees only the
// accumulated grads and counts one step per call.
//
// ZeRO-1 (shard_group with more than one rank): the parameters are laid out
// as one flattened space in their order, split into equal contiguous slices
// (the last padded), and each rank of the group keeps moments and masters for
// its slice only: the optimizer state per rank is 1/P of the unsharded one.
// Every rank still holds the full, reduced gradients (the data-parallel
// reducer all-reduces them; clipping sees the global norm unchanged); step()
// updates the pieces of the parameters inside this rank's slice with the same
// fused kernel on the same values (so the result is bitwise the unsharded
// one) and all-gathers the updated compute weights over the group. Sharding
// needs every parameter to share one dtype and device. state_dict() gathers
// the state back into the unsharded names and shapes (so checkpoints do not
// depend on the rank count or on sharding), which makes it a collective of the
// group; load_state_dict() takes unsharded state and keeps this rank's slice.
#pragma once

#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "framework/module.h"
#include "framework/stream.h"

namespace loom {

class Communicator;  // parallel/communicator.h

struct AdamWConfig {
  double beta1 = 0.9;
  double beta2 = 0.95;
  double eps = 1e-8;
  double weight_decay = 0.1;  // decoupled: p -= lr * weight_decay * p (decayed params only)
  void validate() const;      // throws naming the offending value
};

class AdamW {
 public:
  // Takes the parameters (names must be unique, and no Variable may appear
  // twice: tied weights are one parameter). Allocates zero moments and, for
  // 16-bit parameters, the f32 master copied from the current values, on each
  // parameter's device.
  // shard_group (optional, outliving the optimizer): ZeRO-1 over its ranks
  // (see the top; a group of one rank is the unsharded optimizer).
  AdamW(std::vector<Parameter> params, const AdamWConfig& config, Communicator* shard_group = nullptr);

  // One update with learning rate `lr` (from the schedule). Parameters whose
  // gradient is undefined (unused this step, frozen) are skipped: their
  // weights and moments stay as they are, while the step count (and so the
  // bias correction of the others) still advances. Sharded: a collective of
  // the group (the all-gather of the updated weights).
  void step(double lr, Stream& stream);
  // Same, on the default stream of the parameters' device.
  void step(double lr);
  // Drops every parameter's gradient (undefined again).
  void zero_grad();

  int64_t step_count() const { return step_; }  // completed steps (t of the last update)
  const AdamWConfig& config() const { return config_; }
  const std::vector<Parameter>& parameters() const { return params_; }

  // Checkpoint state by parameter name: "<name>.exp_avg", "<name>.exp_avg_sq",
  // "<name>.master" (only for parameters with a separate master) and a scalar
  // i64 "step". The tensors are the live state (shared storage, like
  // Module::state_dict); clone them to keep a snapshot while training goes on.
  // Sharded: gathered copies in the same names and shapes, in host memory,
  // and a collective of the group (every rank calls it).
  StateDict state_dict() const;
  // Copies state by name (dtype converted). Missing, unexpected and mis-shaped
  // keys are all reported in one error and nothing is copied then. Loaded
  // masters are also written into the compute weights (rounded), so the
  // master stays the source of truth whatever order model and optimizer load.
  void load_state_dict(const StateDict& state);
  // Re-copies the masters from the current compute weights. Call this after
  // loading model weights into 16-bit parameters WITHOUT optimizer state
  // (e.g. fine-tuning from a checkpoint); otherwise the first step would
  // continue from the masters made at construction.
  void reload_masters_from_params();

  // Introspection (tests, logging). `master` is the parameter's own data when
  // it has no separate master. Sharded: exp_avg, exp_avg_sq and a separate
  // master are this rank's piece of the parameter (1-D, possibly empty:
  // undefined), `master` without a separate one the whole parameter.
  const Tensor& master(const std::string& name) const;
  const Tensor& exp_avg(const std::string& name) const;
  const Tensor& exp_avg_sq(const std::string& name) const;
  bool has_separate_master(const std::string& name) const;
  // ZeRO-1 state: whether the state is sharded, and the number of optimizer
  // state elements (moments and masters) this rank holds.
  bool sharded() const { return shard_ != nullptr; }
  int64_t state_elements() const;
  // Sharded: the updated weights are all-gathered in rounds of at most this
  // many elements per rank (default 4M), so the buffers stay bounded.
  void set_gather_chunk(int64_t elements);

 private:
  struct Slot {
    Tensor master;  // undefined when the parameter is its own master
    Tensor exp_avg;
    Tensor exp_avg_sq;
    DType param_dtype;  // to catch a parameter converted after construction
    bool separate_master = false;
    // The part of the flattened parameter this rank updates: all of it
    // unsharded; sharded, [piece_begin, piece_begin + piece_len) (maybe empty).
    int64_t piece_begin = 0, piece_len = 0;
  };
  void shard_state();  // lays out the flattened space and this rank's slice
  // The flat (1-D) shard buffer of one kind gathered over the group: (P * slice).
  Tensor gather_flat(const Tensor& local, Stream& stream) const;
  // Flattened parameter space [begin, begin + buf.numel()) <-> buf (to_buf: parameters -> buf); the
  // part past the last parameter is left alone.
  void copy_flat_range(int64_t begin, Tensor& buf, bool to_buf) const;
  const Slot& slot(const std::string& name) const;
  size_t index_of(const std::string& name) const;

  std::vector<Parameter> params_;
  std::vector<Slot> slots_;  // parallel to params_
  std::map<std::string, size_t> index_;
  AdamWConfig config_;
  int64_t step_ = 0;
  // ZeRO-1 (shard_ non-null): offsets of the parameters in the flattened
  // space, its size, this rank's slice [slice_begin_, + slice_len_) (the slice
  // length is equal on all ranks, the last slice padded), and the flat
  // buffers of the slice that the slots' state tensors are views of.
  Communicator* shard_ = nullptr;
  std::vector<int64_t> offsets_;
  int64_t total_ = 0, slice_begin_ = 0, slice_len_ = 0;
  Tensor flat_avg_, flat_avg_sq_, flat_master_;
  int64_t gather_chunk_ = int64_t{1} << 22;
  Tensor send_, gathered_;  // (min(chunk, slice)) and (P x that): one round of the weights' all-gather
};

// The dtype of the optimizer state for a parameter dtype: f64 for f64, else f32.
DType optimizer_state_dtype(DType param_dtype);

}  // namespace loom
