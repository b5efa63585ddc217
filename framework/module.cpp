// Module tree, state dicts, name-keyed initialization, and the basic layers.
#include "framework/module.h"

#include <cmath>
#include <sstream>

#include "framework/ops.h"
#include "framework/random.h"

namespace loom {

uint64_t name_seed(uint64_t base, const std::string& name) {
  uint64_t h = 1469598103934665603ull;  // FNV-1a over the name
  for (unsigned char c : name) {
    h ^= c;
    h *= 1099511628211ull;
  }
  uint64_t z = h ^ (base + 0x9E3779B97F4A7C15ull);  // splitmix64 finalizer
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

void Module::check_new_name(const std::string& name) const {
  LOOM_CHECK(!name.empty() && name.find('.') == std::string::npos)
      << "bad parameter/module name '" << name << "' (non-empty, no dots)";
  for (const auto& p : params_) LOOM_CHECK(p.name != name) << "name '" << name << "' registered twice";
  for (const auto& c : children_) LOOM_CHECK(c.first != name) << "name '" << name << "' registered twice";
}

Variable Module::register_parameter(const std::string& name, Tensor value, ParamAttrs attrs) {
  check_new_name(name);
  Variable v(std::move(value), true);
  params_.push_back({name, v, attrs});
  return v;
}

void Module::collect(const std::string& prefix, std::vector<Parameter>& out) const {
  for (const auto& p : params_) out.push_back({prefix + p.name, p.var, p.attrs});
  for (const auto& [name, child] : children_) child->collect(prefix + name + ".", out);
}

std::vector<Parameter> Module::named_parameters() const {
  std::vector<Parameter> out;
  collect("", out);
  return out;
}

int64_t Module::num_parameters() const {
  int64_t n = 0;
  for (const auto& p : named_parameters()) n += p.var.numel();
  return n;
}

StateDict Module::state_dict() const {
  StateDict state;
  for (const auto& p : named_parameters()) state[p.name] = p.var.data();
  return state;
}

void Module::load_state_dict(const StateDict& state, bool strict) {
  std::vector<Parameter> params = named_parameters();
  std::vector<std::string> missing, unexpected, misshaped;
  std::map<std::string, const Parameter*> by_name;
  for (const auto& p : params) {
    by_name[p.name] = &p;
    auto it = state.find(p.name);
    if (it == state.end()) missing.push_back(p.name);
    else if (it->second.shape() != p.var.shape())
      misshaped.push_back(p.name + " (checkpoint " + shape_str(it->second.shape()) + ", model " +
                          shape_str(p.var.shape()) + ")");
  }
  for (const auto& [name, tensor] : state)
    if (!by_name.count(name)) unexpected.push_back(name);
  auto join = [](const std::vector<std::string>& names) {
    std::ostringstream os;
    for (size_t i = 0; i < names.size(); ++i) os << (i ? ", " : "") << names[i];
    return os.str();
  };
  bool bad = !misshaped.empty() || (strict && (!missing.empty() || !unexpected.empty()));
  LOOM_CHECK(!bad) << "load_state_dict:" << (missing.empty() || !strict ? "" : " missing [" + join(missing) + "]")
                   << (unexpected.empty() || !strict ? "" : " unexpected [" + join(unexpected) + "]")
                   << (misshaped.empty() ? "" : " wrong shape [" + join(misshaped) + "]");
  for (const auto& p : params) {
    auto it = state.find(p.name);
    if (it == state.end()) continue;
    Tensor dst = p.var.data();
    dst.copy_(it->second);
  }
}

void Module::zero_grad() {
  for (auto& p : named_parameters()) p.var.zero_grad();
}

void Module::initialize(uint64_t seed, double default_std, int64_t num_layers) {
  LOOM_CHECK(default_std > 0 && num_layers > 0) << "initialize: std " << default_std << ", layers " << num_layers;
  for (auto& p : named_parameters()) {
    Tensor t = p.var.data();
    double std = p.attrs.init.std > 0 ? p.attrs.init.std : default_std;
    switch (p.attrs.init.kind) {
      case InitSpec::Kind::normal: fill_normal(t, 0.0, std, name_seed(seed, p.name), 0); break;
      case InitSpec::Kind::scaled_normal:
        fill_normal(t, 0.0, std / std::sqrt(2.0 * static_cast<double>(num_layers)), name_seed(seed, p.name), 0);
        break;
      case InitSpec::Kind::zeros: t.fill_(0.0); break;
      case InitSpec::Kind::ones: t.fill_(1.0); break;
    }
  }
}

void Module::to(Device device) {
  for (auto& p : named_parameters()) {
    if (p.var.device() == device) continue;
    p.var.set_data(p.var.data().to(device));
    p.var.zero_grad();
  }
}
void Module::to(DType dtype) {
  LOOM_CHECK(is_floating(dtype)) << "Module::to(" << dtype << "): parameters convert only to a floating dtype";
  for (auto& p : named_parameters()) {
    if (p.var.dtype() == dtype || !is_floating(p.var.dtype())) continue;
    p.var.set_data(p.var.data().to(dtype));
    p.var.zero_grad();
  }
}

// ---- layers ----
Linear::Linear(int64_t in_features, int64_t out_features, bool bias, InitSpec init, DType dtype) {
  LOOM_CHECK(in_features > 0 && out_features > 0) << "Linear(" << in_features << ", " << out_features << ")";
  ParamAttrs w;
  w.init = init;
  weight_ = register_parameter("weight", Tensor::zeros({out_features, in_features}, dtype), w);  // (Out, In)
  if (bias) {
    ParamAttrs b;
    b.weight_decay = false;
    b.init.kind = InitSpec::Kind::zeros;
    bias_ = register_parameter("bias", Tensor::zeros({out_features}, dtype), b);  // (Out)
  }
}

Variable Linear::forward(const Variable& x) const { return linear(x, weight_, bias_); }

Embedding::Embedding(int64_t num_embeddings, int64_t dim, InitSpec init, DType dtype) {
  LOOM_CHECK(num_embeddings > 0 && dim > 0) << "Embedding(" << num_embeddings << ", " << dim << ")";
  ParamAttrs a;
  a.weight_decay = false;
  a.init = init;
  weight_ = register_parameter("weight", Tensor::zeros({num_embeddings, dim}, dtype), a);  // (V, C)
}

Variable Embedding::forward(const Tensor& ids) const { return embedding(weight_, ids); }

RMSNorm::RMSNorm(int64_t dim, double eps, DType dtype) : eps_(eps) {
  LOOM_CHECK(dim > 0 && eps > 0) << "RMSNorm(" << dim << ", eps " << eps << ")";
  ParamAttrs a;
  a.weight_decay = false;
  a.init.kind = InitSpec::Kind::ones;
  weight_ = register_parameter("weight", Tensor::ones({dim}, dtype), a);  // (C)
}

Variable RMSNorm::forward(const Variable& x) const { return rms_norm(x, weight_, eps_); }

}  // namespace loom
