// Module: a named tree of parameters and submodules. Parameters are registered
// by name with attributes (weight decay, expert, sharding, how to initialize);
// checkpoints, optimizers, export and tests address them by their dotted full
// name ("blocks.3.mixer.q_proj.weight"), never by position.
#pragma once

#include <map>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "framework/autograd.h"

namespace loom {

// How a parameter is initialized (applied by Module::initialize, keyed by name).
struct InitSpec {
  enum class Kind { normal, scaled_normal, zeros, ones };
  Kind kind = Kind::normal;
  // normal: N(0, std^2); scaled_normal: N(0, (std / sqrt(2 * num_layers))^2)
  // (for projections that write into the residual stream). 0 = the model's default std.
  double std = 0.0;
};

// How a parameter is laid out across ranks (replicated until tensor/expert
// parallelism shards it).
enum class Sharding { replicated, expert };

struct ParamAttrs {
  bool weight_decay = true;  // false for norms, biases, embeddings by default
  bool expert = false;       // belongs to an MoE expert (reduced over the dp x ep group)
  Sharding sharding = Sharding::replicated;
  InitSpec init;
};

struct Parameter {
  std::string name;  // full dotted name
  Variable var;
  ParamAttrs attrs;
};

using StateDict = std::map<std::string, Tensor>;

class Module {
 public:
  Module() = default;
  virtual ~Module() = default;
  Module(const Module&) = delete;
  Module& operator=(const Module&) = delete;

  // All parameters of this module and its submodules, in registration order,
  // with full dotted names.
  std::vector<Parameter> named_parameters() const;
  std::vector<std::pair<std::string, std::shared_ptr<Module>>> named_children() const { return children_; }
  int64_t num_parameters() const;  // elements
  // name -> tensor (the parameters' current values, sharing storage).
  StateDict state_dict() const;
  // Copies values by name (dtype converted). Missing, unexpected and
  // mis-shaped names are all reported in one error; nothing is copied then.
  void load_state_dict(const StateDict& state, bool strict = true);
  void zero_grad();
  // Initializes every parameter from its InitSpec with a per-name seed, so the
  // result does not depend on creation order or on how ranks split the model.
  void initialize(uint64_t seed, double default_std, int64_t num_layers);
  // Moves every parameter to `device` / converts every floating parameter to
  // `dtype` (values kept, rounded when narrowing). The Variables stay the same
  // objects (an optimizer or hook holding them sees the new data); gradients
  // are dropped, since they describe the old placement. Build optimizers after
  // this (their state lives beside the parameters). For CUDA mixed precision:
  // initialize in f32, then to(Device::cuda(i)) and to(DType::bf16); AdamW
  // keeps f32 masters of the bf16 compute weights.
  void to(Device device);
  void to(DType dtype);

 protected:
  Variable register_parameter(const std::string& name, Tensor value, ParamAttrs attrs = {});
  template <typename M>
  std::shared_ptr<M> register_module(const std::string& name, std::shared_ptr<M> module) {
    check_new_name(name);
    children_.emplace_back(name, module);
    return module;
  }

 private:
  void check_new_name(const std::string& name) const;
  void collect(const std::string& prefix, std::vector<Parameter>& out) const;
  std::vector<Parameter> params_;  // local names
  std::vector<std::pair<std::string, std::shared_ptr<Module>>> children_;
};

// An ordered list of submodules named "0", "1", ... (so "blocks.3.mixer...").
class ModuleList : public Module {
 public:
  template <typename M>
  std::shared_ptr<M> append(std::shared_ptr<M> module) {
    return register_module(std::to_string(size_++), std::move(module));
  }
  int64_t size() const { return size_; }

 private:
  int64_t size_ = 0;
};

// A deterministic 64-bit seed for (base seed, parameter name).
uint64_t name_seed(uint64_t base, const std::string& name);

// ---- building blocks ----

// y = x W^T (+ b); weight (Out, In).
class Linear : public Module {
 public:
  Linear(int64_t in_features, int64_t out_features, bool bias = false, InitSpec init = {},
         DType dtype = DType::f32);
  Variable forward(const Variable& x) const;
  const Variable& weight() const { return weight_; }
  const Variable& bias() const { return bias_; }
  int64_t in_features() const { return weight_.size(1); }
  int64_t out_features() const { return weight_.size(0); }

 private:
  Variable weight_, bias_;
};

// ids (...) -> (..., C); weight (V, C), no weight decay by default.
class Embedding : public Module {
 public:
  Embedding(int64_t num_embeddings, int64_t dim, InitSpec init = {}, DType dtype = DType::f32);
  Variable forward(const Tensor& ids) const;
  const Variable& weight() const { return weight_; }

 private:
  Variable weight_;
};

// y = x * rsqrt(mean(x^2) + eps) * w; weight initialized to ones, no weight decay.
class RMSNorm : public Module {
 public:
  explicit RMSNorm(int64_t dim, double eps = 1e-6, DType dtype = DType::f32);
  Variable forward(const Variable& x) const;
  const Variable& weight() const { return weight_; }
  double eps() const { return eps_; }

 private:
  Variable weight_;
  double eps_;
};

}  // namespace loom
