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
// Designed for ZeRO-1 later: a sharded variant lays the parameters out as one
// flattened space, gives each dp rank a contiguous slice [begin, end), keeps
// moments and master only for that slice, calls the same flat-span kernel on
// the pieces of each parameter inside the slice (weight decay per piece), and
// all-gathers the updated compute weights. Its state_dict keeps these names
// (gathered, or with the slice recorded) so checkpoints stay rank-count free.
#pragma once

#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "framework/module.h"
#include "framework/stream.h"

namespace loom {

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
  AdamW(std::vector<Parameter> params, const AdamWConfig& config);

  // One update with learning rate `lr` (from the schedule). Parameters whose
  // gradient is undefined (unused this step, frozen) are skipped: their
  // weights and moments stay as they are, while the step count (and so the
  // bias correction of the others) still advances.
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
  // it has no separate master.
  const Tensor& master(const std::string& name) const;
  const Tensor& exp_avg(const std::string& name) const;
  const Tensor& exp_avg_sq(const std::string& name) const;
  bool has_separate_master(const std::string& name) const;

 private:
  struct Slot {
    Tensor master;  // undefined when the parameter is its own master
    Tensor exp_avg;
    Tensor exp_avg_sq;
    DType param_dtype;  // to catch a parameter converted after construction
  };
  const Slot& slot(const std::string& name) const;
  size_t index_of(const std::string& name) const;

  std::vector<Parameter> params_;
  std::vector<Slot> slots_;  // parallel to params_
  std::map<std::string, size_t> index_;
  AdamWConfig config_;
  int64_t step_ = 0;
};

// The dtype of the optimizer state for a parameter dtype: f64 for f64, else f32.
DType optimizer_state_dtype(DType param_dtype);

}  // namespace loom
