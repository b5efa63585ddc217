// AdamW: per-parameter state by name, the loop over parameters, device
// dispatch of the fused update, and checkpoint state in/out (see adamw.h).
#include "optim/adamw.h"

#include <algorithm>
#include <cmath>
#include <sstream>

#include "kernels/dispatch.h"
#include "parallel/communicator.h"

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

AdamW::AdamW(std::vector<Parameter> params, const AdamWConfig& config, Communicator* shard_group)
    : params_(std::move(params)), config_(config) {
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
    Slot s;
    s.param_dtype = data.dtype();
    s.separate_master = is_16bit(data.dtype());
    s.piece_len = data.numel();
    slots_.push_back(std::move(s));
  }
  if (shard_group != nullptr && shard_group->size() > 1) {
    shard_ = shard_group;
    shard_state();
    return;
  }
  for (size_t i = 0; i < params_.size(); ++i) {
    const Tensor& data = params_[i].var.data();
    Slot& s = slots_[i];
    const DType state_dtype = optimizer_state_dtype(data.dtype());
    s.exp_avg = Tensor::zeros(data.shape(), state_dtype, data.device());
    s.exp_avg_sq = Tensor::zeros(data.shape(), state_dtype, data.device());
    if (s.separate_master) s.master = data.to(DType::f32);
  }
}

void AdamW::shard_state() {
  LOOM_CHECK(!params_.empty()) << "AdamW: ZeRO-1 over group '" << shard_->name() << "' needs parameters";
  const Tensor& first = params_.front().var.data();
  for (const Parameter& p : params_)
    LOOM_CHECK(p.var.data().dtype() == first.dtype() && p.var.data().device() == first.device())
        << "AdamW: ZeRO-1 needs one dtype and device for all parameters: '" << p.name << "' is "
        << p.var.data().dtype() << " on " << p.var.data().device() << ", '" << params_.front().name << "' "
        << first.dtype() << " on " << first.device();
  offsets_.clear();
  total_ = 0;
  for (const Parameter& p : params_) {
    offsets_.push_back(total_);
    total_ += p.var.data().numel();
  }
  const int64_t ranks = shard_->size();
  slice_len_ = std::max<int64_t>(1, (total_ + ranks - 1) / ranks);
  slice_begin_ = shard_->rank() * slice_len_;
  const int64_t slice_end = std::min(total_, slice_begin_ + slice_len_);
  const DType state_dtype = optimizer_state_dtype(first.dtype());
  flat_avg_ = Tensor::zeros({slice_len_}, state_dtype, first.device());
  flat_avg_sq_ = Tensor::zeros({slice_len_}, state_dtype, first.device());
  const bool masters = is_16bit(first.dtype());
  if (masters) flat_master_ = Tensor::zeros({slice_len_}, DType::f32, first.device());
  set_gather_chunk(gather_chunk_);
  for (size_t i = 0; i < params_.size(); ++i) {
    Slot& s = slots_[i];
    const int64_t begin = std::max(slice_begin_, offsets_[i]);
    const int64_t end = std::min(slice_end, offsets_[i] + params_[i].var.data().numel());
    s.piece_begin = begin - offsets_[i];
    s.piece_len = std::max<int64_t>(0, end - begin);
    if (s.piece_len == 0) continue;
    const int64_t at = begin - slice_begin_;
    s.exp_avg = flat_avg_.narrow(0, at, s.piece_len);
    s.exp_avg_sq = flat_avg_sq_.narrow(0, at, s.piece_len);
    if (masters) {
      s.master = flat_master_.narrow(0, at, s.piece_len);
      s.master.copy_(flat(params_[i].var.data()).narrow(0, s.piece_begin, s.piece_len));
    }
  }
}

void AdamW::set_gather_chunk(int64_t elements) {
  LOOM_CHECK(elements > 0) << "AdamW: gather chunk " << elements << " must be > 0";
  gather_chunk_ = elements;
  if (shard_ == nullptr) return;
  const Tensor& first = params_.front().var.data();
  const int64_t chunk = std::min(gather_chunk_, slice_len_);
  send_ = Tensor::zeros({chunk}, first.dtype(), first.device());
  gathered_ = Tensor::zeros({shard_->size() * chunk}, first.dtype(), first.device());
}

void AdamW::copy_flat_range(int64_t begin, Tensor& buf, bool to_buf) const {
  const int64_t end = begin + buf.numel();
  // The first parameter ending after `begin` (offsets ascend).
  size_t i = static_cast<size_t>(std::upper_bound(offsets_.begin(), offsets_.end(), begin) - offsets_.begin());
  i = i == 0 ? 0 : i - 1;
  for (; i < params_.size() && offsets_[i] < end; ++i) {
    const Tensor& data = params_[i].var.data();
    const int64_t lo = std::max(begin, offsets_[i]), hi = std::min(end, offsets_[i] + data.numel());
    if (hi <= lo) continue;
    Tensor param_part = flat(data).narrow(0, lo - offsets_[i], hi - lo);
    Tensor buf_part = buf.narrow(0, lo - begin, hi - lo);
    if (to_buf) buf_part.copy_(param_part);
    else param_part.copy_(buf_part);
  }
}

Tensor AdamW::gather_flat(const Tensor& local, Stream& stream) const {
  Tensor out = Tensor::empty({shard_->size() * slice_len_}, local.dtype(), local.device());
  shard_->all_gather(out, local, stream);
  return out;
}

int64_t AdamW::state_elements() const {
  if (shard_ != nullptr) return slice_len_ * (flat_master_.defined() ? 3 : 2);
  int64_t n = 0;
  for (const Slot& s : slots_)
    n += s.exp_avg.numel() + s.exp_avg_sq.numel() + (s.master.defined() ? s.master.numel() : 0);
  return n;
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
    if (s.piece_len == 0) continue;  // sharded: no piece of it on this rank
    // One span per parameter (its piece when sharded); `compute` is undefined
    // when the parameter is its own master, else the kernel writes the rounded
    // compute copy (bf16 on CUDA) in the same pass as the update of the fp32 master.
    auto piece = [&](const Tensor& t) { return flat(t).narrow(0, s.piece_begin, s.piece_len); };
    dispatch::AdamWSpan span;
    span.weight_decay = p.attrs.weight_decay ? config_.weight_decay : 0.0;
    span.grad = piece(grad.contiguous());
    span.exp_avg = flat(s.exp_avg);
    span.exp_avg_sq = flat(s.exp_avg_sq);
    span.param = s.master.defined() ? flat(s.master) : piece(data);
    if (s.master.defined()) span.compute = piece(data);
    spans.push_back(std::move(span));
  }
  // The fused update of every parameter on their device (kernels/dispatch.h):
  // one launch per dtype combination on CUDA, one kernel call per span on CPU.
  dispatch::adamw_step_many(spans, scalars, stream);
  ++step_;
  if (shard_ == nullptr) return;
  // ZeRO-1: every rank's updated slice of the compute weights to every rank, in
  // rounds of at most gather_chunk_ elements per rank (bounded buffers).
  const int64_t ranks = shard_->size();
  for (int64_t j0 = 0; j0 < slice_len_; j0 += send_.numel()) {
    const int64_t c = std::min(send_.numel(), slice_len_ - j0);
    Tensor send = send_.narrow(0, 0, c), out = gathered_.narrow(0, 0, ranks * c);
    copy_flat_range(slice_begin_ + j0, send, true);  // past the last parameter: whatever the buffer holds
    shard_->all_gather(out, send, stream);
    for (int64_t q = 0; q < ranks; ++q) {
      Tensor part = out.narrow(0, q * c, c);
      copy_flat_range(q * slice_len_ + j0, part, false);
    }
  }
}

void AdamW::zero_grad() {
  for (auto& p : params_) p.var.zero_grad();
}

StateDict AdamW::state_dict() const {
  StateDict state;
  if (shard_ != nullptr) {
    // Gathered over the group into the unsharded names and shapes, in host
    // memory (the whole state would not fit beside the model on a device).
    Stream& stream = Stream::default_for(Device::cpu());
    auto host = [](const Tensor& t) { return t.device().is_cpu() ? t : t.to(Device::cpu()); };
    const Tensor avg = gather_flat(host(flat_avg_), stream), avg_sq = gather_flat(host(flat_avg_sq_), stream);
    const Tensor masters = flat_master_.defined() ? gather_flat(host(flat_master_), stream) : Tensor();
    for (size_t i = 0; i < params_.size(); ++i) {
      const std::string& name = params_[i].name;
      const Shape& shape = params_[i].var.data().shape();
      const int64_t n = params_[i].var.data().numel();
      state[name + kExpAvg] = avg.narrow(0, offsets_[i], n).view(shape).clone();
      state[name + kExpAvgSq] = avg_sq.narrow(0, offsets_[i], n).view(shape).clone();
      if (masters.defined()) state[name + kMaster] = masters.narrow(0, offsets_[i], n).view(shape).clone();
    }
  } else {
    for (size_t i = 0; i < params_.size(); ++i) {
      const std::string& name = params_[i].name;
      state[name + kExpAvg] = slots_[i].exp_avg;
      state[name + kExpAvgSq] = slots_[i].exp_avg_sq;
      if (slots_[i].master.defined()) state[name + kMaster] = slots_[i].master;
    }
  }
  state[kStep] = Tensor::scalar(static_cast<double>(step_), DType::i64);
  return state;
}

void AdamW::load_state_dict(const StateDict& state) {
  // Expected key -> (parameter index, its state tensor here: whole, or this rank's piece when sharded).
  struct Target {
    size_t param;
    Tensor tensor;  // undefined: sharded with no piece on this rank
  };
  std::map<std::string, Target> targets;
  for (size_t i = 0; i < params_.size(); ++i) {
    const std::string& name = params_[i].name;
    targets[name + kExpAvg] = {i, slots_[i].exp_avg};
    targets[name + kExpAvgSq] = {i, slots_[i].exp_avg_sq};
    if (slots_[i].separate_master) targets[name + kMaster] = {i, slots_[i].master};
  }
  std::vector<std::string> missing, unexpected, misshaped;
  for (const auto& [key, target] : targets) {
    auto it = state.find(key);
    const Shape& expected = params_[target.param].var.data().shape();
    if (it == state.end()) {
      missing.push_back(key);
    } else if (!it->second.defined() || it->second.shape() != expected) {
      misshaped.push_back(key + " (checkpoint " +
                          (it->second.defined() ? shape_str(it->second.shape()) : std::string("undefined")) +
                          ", expected " + shape_str(expected) + ")");
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
  for (auto& [key, target] : targets) {
    if (!target.tensor.defined()) continue;
    const Slot& s = slots_[target.param];
    const Tensor& src = state.at(key);
    if (shard_ == nullptr) target.tensor.copy_(src);
    else target.tensor.copy_(flat(src.contiguous()).narrow(0, s.piece_begin, s.piece_len));
  }
  step_ = static_cast<int64_t>(step);
  // The master is the source of truth: refresh the compute weights from it
  // (sharded: every rank from the whole master it was given).
  for (size_t i = 0; i < params_.size(); ++i) {
    if (!slots_[i].separate_master) continue;
    Tensor data = params_[i].var.data();
    data.copy_(shard_ == nullptr ? slots_[i].master : state.at(params_[i].name + kMaster).to(DType::f32));
  }
}

void AdamW::reload_masters_from_params() {
  for (size_t i = 0; i < params_.size(); ++i) {
    const Slot& s = slots_[i];
    if (!s.master.defined()) continue;
    Tensor master = s.master;
    if (shard_ == nullptr) master.copy_(params_[i].var.data());
    else master.copy_(flat(params_[i].var.data()).narrow(0, s.piece_begin, s.piece_len));
  }
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
bool AdamW::has_separate_master(const std::string& name) const { return slot(name).separate_master; }

}  // namespace loom
