// Global gradient norm, clipping and the finiteness check (see clip.h). Each
// gradient contributes one f64 sum of squares (kernels/dispatch.h: CPU or
// CUDA) into its own slot of one f64 vector on the gradients' device; the
// vector is read back once and the slots are added in parameter order, so the
// norm is deterministic and a CUDA run waits for the device once per call.
#include "optim/clip.h"

#include <cmath>
#include <utility>

#include "kernels/dispatch.h"

namespace loom {

namespace {

constexpr double kClipEps = 1e-6;  // keeps the clip factor finite and slightly below max_norm / norm

// Device of the parameters (where the all-reduced scalar lives: CPU for MPI, CUDA for NCCL).
Device params_device(const std::vector<Parameter>& params) {
  return params.empty() ? Device::cpu() : params.front().var.device();
}

// The parameters with a defined gradient, all on `device`.
std::vector<const Parameter*> with_grads(const std::vector<Parameter>& params, Device device, const char* op) {
  std::vector<const Parameter*> out;
  for (const auto& p : params) {
    const Tensor& grad = p.var.grad();
    if (!grad.defined()) continue;
    LOOM_CHECK(grad.device() == device) << op << ": gradient of '" << p.name << "' is on " << grad.device()
                                        << ", the first parameter on " << device;
    out.push_back(&p);
  }
  return out;
}

// One value per parameter with a gradient, from `kernel(values, grads, stream)`
// filling a (P) `dtype` vector on `device` (one launch per dtype on CUDA). On
// CUDA, reading the vector is the one host synchronization of the call: the
// caller needs the numbers on the host (the norm decides clipping and is
// logged; a non-finite gradient skips the step).
template <typename Kernel>
std::vector<double> per_parameter(const std::vector<const Parameter*>& params, Device device, DType dtype,
                                  Kernel&& kernel) {
  if (params.empty()) return {};
  std::vector<Tensor> grads;
  for (const Parameter* p : params) grads.push_back(p->var.grad().contiguous());
  Tensor values = Tensor::zeros({static_cast<int64_t>(params.size())}, dtype, device);  // (P)
  kernel(values, grads, Stream::default_for(device));
  return values.to_vector<double>();
}

// Sums `value` over the group in f64.
double all_reduce_sum(double value, Communicator& comm, Device device) {
  Stream& stream = Stream::default_for(device);
  Tensor t = Tensor::scalar(value, DType::f64, device);
  comm.all_reduce(t, ReduceOp::sum, stream);
  return t.item();
}

}  // namespace

bool is_sharded(const ParamAttrs& attrs) { return attrs.sharding == Sharding::expert; }

double grad_norm(const std::vector<Parameter>& params, Communicator* comm_for_sharded) {
  double replicated = 0.0, sharded = 0.0;
  Device device = params_device(params);
  std::vector<const Parameter*> with = with_grads(params, device, "grad_norm");
  std::vector<double> squares = per_parameter(
      with, device, DType::f64,
      [](Tensor& out, const std::vector<Tensor>& grads, Stream& s) { dispatch::sum_squares_many(out, grads, s); });
  for (size_t i = 0; i < with.size(); ++i) (is_sharded(with[i]->attrs) ? sharded : replicated) += squares[i];
  // Called on every rank, whether or not it holds sharded gradients (collective).
  if (comm_for_sharded != nullptr) sharded = all_reduce_sum(sharded, *comm_for_sharded, device);
  return std::sqrt(replicated + sharded);
}

double clip_grad_norm(const std::vector<Parameter>& params, double max_norm, Communicator* comm_for_sharded) {
  double norm = grad_norm(params, comm_for_sharded);
  if (!std::isfinite(norm) || max_norm <= 0.0 || norm <= max_norm) return norm;
  double factor = max_norm / (norm + kClipEps);
  std::vector<Tensor> contiguous_grads;  // scaled in place together (one launch per dtype on CUDA)
  std::vector<std::pair<Tensor, Tensor>> strided;  // (grad, dense copy): copied back after scaling
  for (const auto& p : params) {
    Tensor grad = p.var.grad();  // shares storage: scaled in place
    if (!grad.defined()) continue;
    if (grad.is_contiguous()) {
      contiguous_grads.push_back(grad);
    } else {
      strided.emplace_back(grad, grad.contiguous());
      contiguous_grads.push_back(strided.back().second);
    }
  }
  dispatch::scale_inplace_many(contiguous_grads, factor, Stream::default_for(params_device(params)));
  for (auto& [grad, dense] : strided) grad.copy_(dense);
  return norm;
}

bool grads_finite(const std::vector<Parameter>& params, Communicator* comm) {
  double nonfinite = 0.0;
  Device device = params_device(params);
  std::vector<const Parameter*> with = with_grads(params, device, "grads_finite");
  std::vector<double> counts = per_parameter(
      with, device, DType::i64,
      [](Tensor& out, const std::vector<Tensor>& grads, Stream& s) { dispatch::count_nonfinite_many(out, grads, s); });
  for (double c : counts) nonfinite += c;
  if (comm != nullptr) nonfinite = all_reduce_sum(nonfinite, *comm, device);
  return nonfinite == 0.0;
}

}  // namespace loom
