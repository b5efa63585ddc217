// The autograd engine: graph recording, dependency-counted backward, leaf
// accumulation with grad-ready hooks, grad mode, activation checkpointing.
#include "framework/autograd.h"

#include <atomic>
#include <queue>
#include <unordered_map>
#include <unordered_set>

#include "framework/stream.h"
#include "kernels/dispatch.h"

namespace loom {

struct VariableImpl {
  Tensor data;
  Tensor grad;
  bool requires_grad = false;
  std::shared_ptr<Node> grad_fn;  // null for leaves
  int output_nr = 0;
  std::weak_ptr<Node> accumulator;  // leaves: the AccumulateGrad node, created on first use
  std::vector<GradHook> hooks;
};

namespace {

std::atomic<uint64_t> next_sequence_nr{0};
thread_local bool grad_mode = true;

// Leaf sink: adds the incoming gradient into the leaf's .grad and fires its hooks.
class AccumulateGrad : public Node {
 public:
  explicit AccumulateGrad(std::shared_ptr<VariableImpl> leaf) : Node("AccumulateGrad", 1), leaf_(std::move(leaf)) {
    sequence_nr_ = UINT64_MAX;  // run as soon as ready: hooks fire early, reduction overlaps
  }
  std::vector<Tensor> apply(std::vector<Tensor>&& grads) override {
    if (grads[0].defined()) {
      if (!leaf_->grad.defined()) {
        // First gradient of this backward: an owned buffer in the leaf's gradient dtype.
        leaf_->grad = grads[0].to(grad_buffer_dtype(leaf_->data.dtype()));
        if (leaf_->grad.shares_storage(grads[0])) leaf_->grad = grads[0].clone();
      } else {
        accumulate_grad(leaf_->grad, grads[0]);
      }
      for (auto& hook : leaf_->hooks) hook(leaf_->grad);
    }
    return {};
  }

 private:
  std::shared_ptr<VariableImpl> leaf_;
};

}  // namespace

Node::Node(std::string name, int num_outputs)
    : sequence_nr_(next_sequence_nr.fetch_add(1)), name_(std::move(name)), num_outputs_(num_outputs) {}

std::vector<Tensor> FunctionNode::apply(std::vector<Tensor>&& grad_outputs) {
  LOOM_CHECK(fn_ != nullptr) << name() << ": backward called twice (its saved tensors were released); pass "
                             << "retain_graph=true to the first backward";
  return fn_(grad_outputs);
}

DType grad_buffer_dtype(DType dtype) { return dtype == DType::bf16 || dtype == DType::f16 ? DType::f32 : dtype; }

void accumulate_grad(Tensor& accumulator, const Tensor& grad) {
  if (!accumulator.defined()) {
    accumulator = grad.clone();  // own buffer: later accumulation is in place
    return;
  }
  check_same_shape(accumulator, grad, "gradient accumulation");
  LOOM_CHECK(accumulator.device() == grad.device()) << "gradient accumulation: buffer on " << accumulator.device()
                                                    << ", gradient on " << grad.device();
  Tensor addend = grad.dtype() == accumulator.dtype() ? grad : grad.to(accumulator.dtype());
  dispatch::axpy(accumulator, addend, 1.0, Stream::default_for(accumulator.device()));
}

// ---- Variable ----
Variable::Variable(Tensor data, bool requires_grad) : impl_(std::make_shared<VariableImpl>()) {
  impl_->data = std::move(data);
  if (requires_grad) set_requires_grad(true);
}

const Tensor& Variable::data() const {
  LOOM_CHECK(defined()) << "use of an undefined Variable";
  return impl_->data;
}
void Variable::set_data(Tensor data) {
  LOOM_CHECK(defined()) << "set_data on an undefined Variable";
  impl_->data = std::move(data);
}
bool Variable::requires_grad() const { return defined() && impl_->requires_grad; }
void Variable::set_requires_grad(bool requires_grad) {
  LOOM_CHECK(is_leaf()) << "set_requires_grad on a non-leaf Variable (output of " << impl_->grad_fn->name() << ")";
  LOOM_CHECK(!requires_grad || is_floating(impl_->data.dtype()))
      << "only floating tensors can require grad, got " << impl_->data.dtype();
  impl_->requires_grad = requires_grad;
}
bool Variable::is_leaf() const { return defined() && impl_->grad_fn == nullptr; }
const Tensor& Variable::grad() const {
  LOOM_CHECK(defined()) << "grad() of an undefined Variable";
  return impl_->grad;
}
void Variable::set_grad(Tensor grad) {
  if (grad.defined()) check_same_shape(data(), grad, "set_grad");
  impl_->grad = std::move(grad);
}
void Variable::zero_grad() { impl_->grad = Tensor(); }
const std::shared_ptr<Node>& Variable::grad_fn() const {
  LOOM_CHECK(defined()) << "grad_fn() of an undefined Variable";
  return impl_->grad_fn;
}
int Variable::output_nr() const { return impl_->output_nr; }

Variable Variable::detach() const { return Variable(data(), false); }

void Variable::register_grad_ready_hook(GradHook hook) {
  LOOM_CHECK(is_leaf() && requires_grad()) << "grad-ready hooks go on leaves that require grad";
  impl_->hooks.push_back(std::move(hook));
}

Edge Variable::gradient_edge() const {
  if (!requires_grad()) return {};
  if (impl_->grad_fn) return {impl_->grad_fn, impl_->output_nr};
  std::shared_ptr<Node> acc = impl_->accumulator.lock();
  if (!acc) {
    acc = std::make_shared<AccumulateGrad>(impl_);
    acc->input_shapes = {impl_->data.shape()};
    acc->input_dtypes = {impl_->data.dtype()};
    impl_->accumulator = acc;
  }
  return {acc, 0};
}

void Variable::backward(Tensor grad, bool retain_graph) const {
  run_backward({*this}, {std::move(grad)}, retain_graph);
}

// ---- recording ----
std::vector<Variable> make_outputs(std::vector<Tensor> outputs, const std::vector<Variable>& inputs,
                                   const std::string& name, BackwardFn backward) {
  bool record = false;
  if (grad_mode) {
    for (const Variable& v : inputs) record = record || v.requires_grad();
  }
  std::shared_ptr<FunctionNode> node;
  if (record) {
    node = std::make_shared<FunctionNode>(name, static_cast<int>(outputs.size()), std::move(backward));
    for (const Variable& v : inputs) {
      node->next_edges.push_back(v.defined() ? v.gradient_edge() : Edge{});
      node->input_shapes.push_back(v.defined() ? v.shape() : Shape{});
      node->input_dtypes.push_back(v.defined() ? v.dtype() : DType::f32);
    }
  }
  std::vector<Variable> result;
  result.reserve(outputs.size());
  for (size_t i = 0; i < outputs.size(); ++i) {
    Variable v(std::move(outputs[i]), false);
    if (node && is_floating(v.dtype())) {
      v.impl_->requires_grad = true;
      v.impl_->grad_fn = node;
      v.impl_->output_nr = static_cast<int>(i);
    }
    result.push_back(std::move(v));
  }
  return result;
}

Variable make_output(Tensor output, const std::vector<Variable>& inputs, const std::string& name,
                     BackwardFn backward) {
  return make_outputs({std::move(output)}, inputs, name, std::move(backward))[0];
}

// ---- engine ----
namespace {
// The gradient for input i of `node` in that input's dtype; an fp32 (or wider)
// gradient heading into a 16-bit leaf's accumulator stays as it is.
Tensor in_input_dtype(const Tensor& grad, const Node& node, size_t i, const Node& target) {
  if (i >= node.input_dtypes.size()) return grad;  // a node built without dtypes (custom Node subclasses)
  DType want = node.input_dtypes[i];
  if (grad.dtype() == want) return grad;
  if (dynamic_cast<const AccumulateGrad*>(&target) != nullptr && grad.dtype() == grad_buffer_dtype(want))
    return grad;
  return grad.to(want);
}
}  // namespace

void run_backward(const std::vector<Variable>& roots, const std::vector<Tensor>& root_grads, bool retain_graph) {
  LOOM_CHECK(roots.size() == root_grads.size()) << "run_backward: " << roots.size() << " roots, " << root_grads.size()
                                                << " gradients";
  // Backward itself is not recorded (no higher-order gradients).
  NoGradGuard no_grad;

  std::unordered_map<Node*, std::vector<Tensor>> buffers;
  auto add_to_buffer = [&](Node* node, int slot, const Tensor& grad) {
    auto& buffer = buffers[node];
    if (buffer.empty()) buffer.resize(node->num_outputs());
    LOOM_CHECK(slot < node->num_outputs()) << node->name() << ": gradient for output " << slot;
    if (!buffer[slot].defined()) buffer[slot] = grad;
    else {
      Tensor sum = buffer[slot].clone();
      accumulate_grad(sum, grad);
      buffer[slot] = sum;
    }
  };

  std::vector<std::shared_ptr<Node>> root_nodes;
  for (size_t i = 0; i < roots.size(); ++i) {
    const Variable& root = roots[i];
    LOOM_CHECK(root.requires_grad()) << "backward from a Variable that does not require grad";
    Tensor grad = root_grads[i];
    if (!grad.defined()) {
      LOOM_CHECK(root.numel() == 1) << "backward without a gradient needs a one-element output, got shape "
                                    << shape_str(root.shape());
      grad = Tensor::ones(root.shape(), root.dtype(), root.device());
    }
    check_same_shape(root.data(), grad, "backward root gradient");
    Edge edge = root.gradient_edge();
    add_to_buffer(edge.node.get(), edge.input_nr, grad);
    root_nodes.push_back(edge.node);
  }

  // Dependencies: how many edges point at each node within the reachable graph.
  std::unordered_map<Node*, int> dependencies;
  std::unordered_set<Node*> seen;
  std::vector<Node*> stack;
  for (auto& n : root_nodes)
    if (seen.insert(n.get()).second) stack.push_back(n.get());
  while (!stack.empty()) {
    Node* node = stack.back();
    stack.pop_back();
    for (const Edge& e : node->next_edges) {
      if (!e.valid()) continue;
      dependencies[e.node.get()] += 1;
      if (seen.insert(e.node.get()).second) stack.push_back(e.node.get());
    }
  }

  auto later_first = [](const std::shared_ptr<Node>& a, const std::shared_ptr<Node>& b) {
    return a->sequence_nr() < b->sequence_nr();
  };
  std::priority_queue<std::shared_ptr<Node>, std::vector<std::shared_ptr<Node>>, decltype(later_first)> ready(
      later_first);
  std::unordered_set<Node*> queued;
  for (auto& n : root_nodes)
    if (dependencies[n.get()] == 0 && queued.insert(n.get()).second) ready.push(n);

  while (!ready.empty()) {
    std::shared_ptr<Node> node = ready.top();
    ready.pop();
    std::vector<Tensor> grads_out;
    auto it = buffers.find(node.get());
    if (it != buffers.end()) {
      grads_out = std::move(it->second);
      buffers.erase(it);
    }
    grads_out.resize(node->num_outputs());
    std::vector<Tensor> grads_in = node->apply(std::move(grads_out));
    if (!retain_graph) node->release_saved();
    LOOM_CHECK(grads_in.size() == node->next_edges.size() || node->next_edges.empty())
        << node->name() << ": backward returned " << grads_in.size() << " gradients for "
        << node->next_edges.size() << " inputs";
    for (size_t i = 0; i < node->next_edges.size(); ++i) {
      const Edge& e = node->next_edges[i];
      if (!e.valid()) continue;
      if (grads_in[i].defined()) {
        LOOM_CHECK(grads_in[i].shape() == node->input_shapes[i])
            << node->name() << ": gradient for input " << i << " has shape " << shape_str(grads_in[i].shape())
            << ", input has shape " << shape_str(node->input_shapes[i]);
        add_to_buffer(e.node.get(), e.input_nr, in_input_dtype(grads_in[i], *node, i, *e.node));
      }
      if (--dependencies[e.node.get()] == 0) ready.push(e.node);
    }
  }
}

// ---- grad mode ----
bool grad_mode_enabled() { return grad_mode; }
NoGradGuard::NoGradGuard() : previous_(grad_mode) { grad_mode = false; }
NoGradGuard::~NoGradGuard() { grad_mode = previous_; }
EnableGradGuard::EnableGradGuard() : previous_(grad_mode) { grad_mode = true; }
EnableGradGuard::~EnableGradGuard() { grad_mode = previous_; }

// ---- activation checkpointing ----
std::vector<Variable> checkpoint(const CheckpointFn& fn, const std::vector<Variable>& inputs) {
  std::vector<Variable> outputs;
  {
    NoGradGuard no_grad;  // nothing inside is recorded, so no activation is kept
    std::vector<Variable> detached;
    for (const Variable& v : inputs) detached.push_back(v.defined() ? v.detach() : Variable());
    outputs = fn(detached);
  }
  std::vector<Tensor> values;
  for (const Variable& v : outputs) values.push_back(v.data());
  std::vector<Tensor> saved_inputs;
  std::vector<bool> input_requires_grad;
  for (const Variable& v : inputs) {
    saved_inputs.push_back(v.defined() ? v.data() : Tensor());
    input_requires_grad.push_back(v.requires_grad());
  }
  BackwardFn backward = [fn, saved_inputs, input_requires_grad](const std::vector<Tensor>& grads) {
    EnableGradGuard enable;  // recompute with recording, even inside the (no-grad) engine
    std::vector<Variable> fresh;
    for (size_t i = 0; i < saved_inputs.size(); ++i)
      fresh.push_back(saved_inputs[i].defined() ? Variable(saved_inputs[i], input_requires_grad[i]) : Variable());
    std::vector<Variable> recomputed = fn(fresh);
    LOOM_CHECK(recomputed.size() == grads.size()) << "checkpoint: recomputation returned " << recomputed.size()
                                                  << " outputs, first run " << grads.size();
    std::vector<Variable> roots;
    std::vector<Tensor> root_grads;
    for (size_t i = 0; i < recomputed.size(); ++i) {
      if (grads[i].defined() && recomputed[i].requires_grad()) {
        roots.push_back(recomputed[i]);
        root_grads.push_back(grads[i]);
      }
    }
    if (!roots.empty()) run_backward(roots, root_grads);
    std::vector<Tensor> input_grads;
    for (const Variable& v : fresh) input_grads.push_back(v.defined() ? v.grad() : Tensor());
    return input_grads;
  };
  return make_outputs(values, inputs, "Checkpoint", std::move(backward));
}

}  // namespace loom
