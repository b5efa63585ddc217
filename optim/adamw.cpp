// AdamW: per-parameter state by name, the loop over parameters, device
// dispatch of the fused update, and checkpoint state in/out (see adamw.h).
#include "optim/adamw.h"

#include <cmath>
#include <sstream>

#include "kernels/dispatch.h"

namespace loom {

namespace {

std::string join(const std::vector<std::string>& items) {
  std::ostringstream os;
  for (size_t i = 0; i < items.size(); ++i) os << (i ? ", " : "") << items[i];
  return os.str();
}

bool is_16bit(DType dtype) { return dtype == DType::bf16 || dtype == DType::f16; }

// Flat view of a contiguous tensor (the kernel works on spans).
Tensor flat(const Tensor& t) { return t.view({t.numel()}); }


const char* kExpAvg = ".exp_avg";
const char* kExpAvgSq = ".exp_avg_sq";
const char* kMaster = ".master";
const char* kStep = "step";

}  // namespace

DType optimizer_state_dtype(DType param_dtype) { return param_dtype == DType::f64 ? DType::f64 : DType::f32; }

void AdamWConfig::validate() const {
  LOOM_CHECK(beta1 >= 0.0 && beta1 < 1.0) << "AdamW: beta1 " << beta1 << " must lie in [0, 1)";
  LOOM_CHECK(beta2 >= 0.0 && beta2 < 1.0) << "AdamW: beta2 " << beta2 << " must lie in [0, 1)";
  LOOM_CHECK(eps > 0.0) << "AdamW: eps " << eps << " must be > 0";
  LOOM_CHECK(weight_decay >= 0.0) << "AdamW: weight_decay " << weight_decay << " must be >= 0";
}

AdamW::AdamW(std::vector<Parameter> params, const AdamWConfig& config) : params_(std::move(params)), config_(config) {
  config_.validate();
  std::map<const VariableImpl*, std::string> seen;
  slots_.reserve(params_.size());
  for (size_t i = 0; i < params_.size(); ++i) {
    const Parameter& p = params_[i];
    LOOM_CHECK(p.var.defined()) << "AdamW: parameter '" << p.name << "' has an undefined Variable";
    LOOM_CHECK(index_.emplace(p.name, i).second) << "AdamW: parameter name '" << p.name << "' appears twice";
    auto [it, fresh] = seen.emplace(p.var.impl().get(), p.name);
    LOOM_CHECK(fresh) << "AdamW: parameters '" << it->second << "' and '" << p.name
                      << "' are the same Variable (pass tied weights once)";
    const Tensor& data = p.var.data();
    LOOM_CHECK(is_floating(data.dtype())) << "AdamW: parameter '" << p.name << "' has dtype " << data.dtype();
    LOOM_CHECK(data.is_contiguous()) << "AdamW: parameter '" << p.name << "' " << shape_str(data.shape())
                                     << " must be contiguous (updated in place)";
    DType state_dtype = optimizer_state_dtype(data.dtype());
    Slot s;
    s.param_dtype = data.dtype();
    s.exp_avg = Tensor::zeros(data.shape(), state_dtype, data.device());
    s.exp_avg_sq = Tensor::zeros(data.shape(), state_dtype, data.device());
    if (is_16bit(data.dtype())) s.master = data.to(DType::f32);
    slots_.push_back(std::move(s));
  }
}

void AdamW::step(double lr) {
  Device device = params_.empty() ? Device::cpu() : params_.front().var.device();
  step(lr, Stream::default_for(device));
}

void AdamW::step(double lr, Stream& stream) {
  LOOM_CHECK(std::isfinite(lr) && lr >= 0.0) << "AdamW::step: lr " << lr << " must be finite and >= 0";
  dispatch::AdamWScalars scalars;
  scalars.lr = lr;
  scalars.beta1 = config_.beta1;
  scalars.beta2 = config_.beta2;
  scalars.eps = config_.eps;
  scalars.step = step_ + 1;
  std::vector<dispatch::AdamWSpan> spans;
  for (size_t i = 0; i < params_.size(); ++i) {
    const Parameter& p = params_[i];
    Slot& s = slots_[i];
    // No gradient reached this parameter (unused in this step, or frozen):
    // skip it entirely rather than decaying it or feeding the moments zeros.
    const Tensor& grad = p.var.grad();
    if (!grad.defined()) continue;
    Tensor data = p.var.data();
    LOOM_CHECK(data.dtype() == s.param_dtype && data.device() == s.exp_avg.device())
        << "AdamW::step: parameter '" << p.name << "' is now " << data.dtype() << " on " << data.device()
        << " but the optimizer was built for " << s.param_dtype << " on " << s.exp_avg.device()
        << " (build the optimizer after converting the model)";
    LOOM_CHECK(data.is_contiguous()) << "AdamW::step: parameter '" << p.name << "' must be contiguous";
    LOOM_CHECK(grad.shape() == data.shape()) << "AdamW::step: gradient of '" << p.name << "' has shape "
                                             << shape_str(grad.shape()) << ", the parameter "
                                             << shape_str(data.shape());
    LOOM_CHECK(grad.device() == data.device()) << "AdamW::step: gradient of '" << p.name << "' is on "
                                               << grad.device() << ", the parameter on " << data.device();
    // One span per parameter; `compute` is undefined when the parameter is its
    // own master, else the kernel writes the rounded compute copy (bf16 on
    // CUDA) in the same pass as the update of the fp32 master.
    dispatch::AdamWSpan span;
    span.weight_decay = p.attrs.weight_decay ? config_.weight_decay : 0.0;
    span.grad = flat(grad.contiguous());
    span.exp_avg = flat(s.exp_avg);
    span.exp_avg_sq = flat(s.exp_avg_sq);
    span.param = s.master.defined() ? flat(s.master) : flat(data);
    if (s.master.defined()) span.compute = flat(data);
    spans.push_back(std::move(span));
  }
  // The fused update of every parameter on their device (kernels/dispatch.h):
  // one launch per dtype combination on CUDA, one kernel call per span on CPU.
  dispatch::adamw_step_many(spans, scalars, stream);
  ++step_;
}

void AdamW::zero_grad() {
  for (auto& p : params_) p.var.zero_grad();
}

StateDict AdamW::state_dict() const {
  StateDict state;
  for (size_t i = 0; i < params_.size(); ++i) {
    const std::string& name = params_[i].name;
    state[name + kExpAvg] = slots_[i].exp_avg;
    state[name + kExpAvgSq] = slots_[i].exp_avg_sq;
    if (slots_[i].master.defined()) state[name + kMaster] = slots_[i].master;
  }
  state[kStep] = Tensor::scalar(static_cast<double>(step_), DType::i64);
  return state;
}

void AdamW::load_state_dict(const StateDict& state) {
  // Expected key -> the tensor it loads into.
  std::map<std::string, Tensor> targets;
  for (size_t i = 0; i < params_.size(); ++i) {
    const std::string& name = params_[i].name;
    targets[name + kExpAvg] = slots_[i].exp_avg;
    targets[name + kExpAvgSq] = slots_[i].exp_avg_sq;
    if (slots_[i].master.defined()) targets[name + kMaster] = slots_[i].master;
  }
  std::vector<std::string> missing, unexpected, misshaped;
  for (const auto& [key, target] : targets) {
    auto it = state.find(key);
    if (it == state.end()) {
      missing.push_back(key);
    } else if (!it->second.defined() || it->second.shape() != target.shape()) {
      misshaped.push_back(key + " (checkpoint " +
                          (it->second.defined() ? shape_str(it->second.shape()) : std::string("undefined")) +
                          ", expected " + shape_str(target.shape()) + ")");
    }
  }
  auto step_it = state.find(kStep);
  if (step_it == state.end()) {
    missing.push_back(kStep);
  } else if (!step_it->second.defined() || step_it->second.numel() != 1) {
    misshaped.push_back(std::string(kStep) + " (checkpoint " +
                        (step_it->second.defined() ? shape_str(step_it->second.shape()) : std::string("undefined")) +
                        ", expected one element)");
  }
  for (const auto& [key, tensor] : state)
    if (key != kStep && !targets.count(key)) unexpected.push_back(key);
  bool bad = !missing.empty() || !unexpected.empty() || !misshaped.empty();
  LOOM_CHECK(!bad) << "AdamW::load_state_dict:" << (missing.empty() ? "" : " missing [" + join(missing) + "]")
                   << (unexpected.empty() ? "" : " unexpected [" + join(unexpected) + "]")
                   << (misshaped.empty() ? "" : " wrong shape [" + join(misshaped) + "]");
  double step = step_it->second.item();
  LOOM_CHECK(step >= 0.0 && step == std::floor(step) && step < 9.0e15)
      << "AdamW::load_state_dict: step " << step << " is not a non-negative integer";
  for (auto& [key, target] : targets) target.copy_(state.at(key));
  step_ = static_cast<int64_t>(step);
  // The master is the source of truth: refresh the compute weights from it.
  for (size_t i = 0; i < params_.size(); ++i) {
    if (!slots_[i].master.defined()) continue;
    Tensor data = params_[i].var.data();
    data.copy_(slots_[i].master);
  }
}

void AdamW::reload_masters_from_params() {
  for (size_t i = 0; i < params_.size(); ++i)
    if (slots_[i].master.defined()) slots_[i].master.copy_(params_[i].var.data());
}

size_t AdamW::index_of(const std::string& name) const {
  auto it = index_.find(name);
  LOOM_CHECK(it != index_.end()) << "AdamW: no parameter named '" << name << "'";
  return it->second;
}

const AdamW::Slot& AdamW::slot(const std::string& name) const { return slots_[index_of(name)]; }

const Tensor& AdamW::master(const std::string& name) const {
  size_t i = index_of(name);
  return slots_[i].master.defined() ? slots_[i].master : params_[i].var.data();
}
const Tensor& AdamW::exp_avg(const std::string& name) const { return slot(name).exp_avg; }
const Tensor& AdamW::exp_avg_sq(const std::string& name) const { return slot(name).exp_avg_sq; }
bool AdamW::has_separate_master(const std::string& name) const { return slot(name).master.defined(); }

}  // namespace loom
