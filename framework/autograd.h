// Define-by-run autograd. An op returns Variables whose grad_fn is a Node; the
// engine walks the graph from the roots in dependency order (a node runs once
// all gradients for its outputs have arrived), accumulates gradients into leaf
// Variables, fires each leaf's grad-ready hooks as soon as its gradient is
// complete, and releases every node's saved tensors right after it has run.
#pragma once

#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "framework/tensor.h"

namespace loom {

class Node;
struct VariableImpl;

// An input slot of a node: the gradient for output `input_nr` of `node`.
struct Edge {
  std::shared_ptr<Node> node;
  int input_nr = 0;
  bool valid() const { return node != nullptr; }
};

class Node {
 public:
  Node(std::string name, int num_outputs);
  virtual ~Node() = default;
  // Gradients w.r.t. this node's outputs (undefined where none arrived) ->
  // gradients w.r.t. its inputs, one per next edge (undefined = no gradient).
  virtual std::vector<Tensor> apply(std::vector<Tensor>&& grad_outputs) = 0;
  // Drops saved tensors; called by the engine after apply unless the graph is retained.
  virtual void release_saved() {}

  const std::string& name() const { return name_; }
  int num_outputs() const { return num_outputs_; }
  uint64_t sequence_nr() const { return sequence_nr_; }

  std::vector<Edge> next_edges;   // one per input of the op
  std::vector<Shape> input_shapes;  // expected gradient shape per input
  // The dtype of each input: the engine hands every node gradients in its
  // inputs' dtypes (a gradient in another dtype is converted on the way), except
  // that an fp32 gradient for a 16-bit leaf stays fp32 (see accumulate_grad).
  std::vector<DType> input_dtypes;

 protected:
  uint64_t sequence_nr_;  // creation order: later nodes run first when both are ready

 private:
  std::string name_;
  int num_outputs_;
};

using BackwardFn = std::function<std::vector<Tensor>(const std::vector<Tensor>& grad_outputs)>;

// A node whose backward is a closure; whatever the closure captured (the saved
// tensors) is released with it.
class FunctionNode : public Node {
 public:
  FunctionNode(std::string name, int num_outputs, BackwardFn fn) : Node(std::move(name), num_outputs), fn_(std::move(fn)) {}
  std::vector<Tensor> apply(std::vector<Tensor>&& grad_outputs) override;
  void release_saved() override { fn_ = nullptr; }

 private:
  BackwardFn fn_;
};

using GradHook = std::function<void(const Tensor& grad)>;

class Variable {
 public:
  Variable() = default;
  explicit Variable(Tensor data, bool requires_grad = false);

  bool defined() const { return impl_ != nullptr; }
  const Tensor& data() const;
  // In-place replacement of the value (optimizers, loading); never recorded.
  void set_data(Tensor data);
  bool requires_grad() const;
  void set_requires_grad(bool requires_grad);  // leaves only
  bool is_leaf() const;
  const Tensor& grad() const;  // undefined until a backward reaches this leaf
  void set_grad(Tensor grad);
  void zero_grad();  // drops the gradient (undefined again)
  const std::shared_ptr<Node>& grad_fn() const;
  int output_nr() const;

  // Same value, no history, does not require grad.
  Variable detach() const;
  // Back-propagates from this Variable; `grad` defaults to 1 for one-element outputs.
  void backward(Tensor grad = {}, bool retain_graph = false) const;
  // Fires after this leaf's gradient for the current backward is complete
  // (hooks run in registration order; used to start gradient reduction).
  void register_grad_ready_hook(GradHook hook);

  // Shortcuts to the data.
  const Shape& shape() const { return data().shape(); }
  int64_t size(int64_t d) const { return data().size(d); }
  int64_t dim() const { return data().dim(); }
  DType dtype() const { return data().dtype(); }
  Device device() const { return data().device(); }
  int64_t numel() const { return data().numel(); }
  double item() const { return data().item(); }

  const std::shared_ptr<VariableImpl>& impl() const { return impl_; }
  // The edge through which a gradient reaches this Variable (leaf: its accumulator).
  Edge gradient_edge() const;

 private:
  friend std::vector<Variable> make_outputs(std::vector<Tensor>, const std::vector<Variable>&, const std::string&,
                                            BackwardFn);
  std::shared_ptr<VariableImpl> impl_;
};

// Records an op: wraps `outputs` into Variables with a FunctionNode connected to
// `inputs`, unless grad mode is off or no input requires grad (then `backward`
// and everything it captured is dropped immediately).
std::vector<Variable> make_outputs(std::vector<Tensor> outputs, const std::vector<Variable>& inputs,
                                   const std::string& name, BackwardFn backward);
Variable make_output(Tensor output, const std::vector<Variable>& inputs, const std::string& name, BackwardFn backward);

// Runs backward from several roots at once.
void run_backward(const std::vector<Variable>& roots, const std::vector<Tensor>& root_grads, bool retain_graph = false);

// Grad mode (thread-local): ops record history only while it is enabled.
bool grad_mode_enabled();
class NoGradGuard {
 public:
  NoGradGuard();
  ~NoGradGuard();
  NoGradGuard(const NoGradGuard&) = delete;
  NoGradGuard& operator=(const NoGradGuard&) = delete;

 private:
  bool previous_;
};
class EnableGradGuard {
 public:
  EnableGradGuard();
  ~EnableGradGuard();
  EnableGradGuard(const EnableGradGuard&) = delete;
  EnableGradGuard& operator=(const EnableGradGuard&) = delete;

 private:
  bool previous_;
};

// Activation checkpointing: runs `fn` without recording (no activations kept),
// and during backward re-runs it with recording and back-propagates through the
// recomputation. `fn` must be deterministic given its inputs (and the
// parameters it captures). Gradients equal those without checkpointing.
using CheckpointFn = std::function<std::vector<Variable>(const std::vector<Variable>&)>;
std::vector<Variable> checkpoint(const CheckpointFn& fn, const std::vector<Variable>& inputs);

// Adds `grad` into `accumulator` (defining it on first use); both same shape,
// same device. The sum is kept in the accumulator's dtype (the grad is
// converted first where they differ).
void accumulate_grad(Tensor& accumulator, const Tensor& grad);

// The dtype of a leaf's gradient buffer for data of `dtype`: f32 for 16-bit
// floats (mixed precision keeps fp32 gradients for bf16 compute weights,
// DESIGN.md §3), else the data's dtype.
DType grad_buffer_dtype(DType dtype);

}  // namespace loom
