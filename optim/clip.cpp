// Global gradient norm, clipping and the finiteness check (see clip.h). Each
// gradient contributes one f64 sum of squares from the CPU kernel; the
// per-parameter sums are added in parameter order, so the norm is
// deterministic.
#include "optim/clip.h"

#include <cmath>

#include "kernels/cpu/grad_norm.h"

namespace loom {

namespace {

constexpr double kClipEps = 1e-6;  // keeps the clip factor finite and slightly below max_norm / norm

// Device of the parameters (where the all-reduced scalar lives: CPU for MPI, CUDA for NCCL).
Device params_device(const std::vector<Parameter>& params) {
  return params.empty() ? Device::cpu() : params.front().var.device();
}

void check_cpu(const Tensor& grad, const std::string& name, const char* op) {
  LOOM_CHECK(grad.device().is_cpu()) << op << ": no CUDA kernel yet (gradient of '" << name << "' on "
                                     << grad.device() << ")";
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
  Tensor partial = Tensor::zeros({}, DType::f64);
  for (const auto& p : params) {
    const Tensor& grad = p.var.grad();
    if (!grad.defined()) continue;
    check_cpu(grad, p.name, "grad_norm");
    Stream& stream = Stream::default_for(grad.device());
    cpu::sum_squares(partial, grad.contiguous(), stream);
    (is_sharded(p.attrs) ? sharded : replicated) += *partial.data<double>();
  }
  // Called on every rank, whether or not it holds sharded gradients (collective).
  if (comm_for_sharded != nullptr) sharded = all_reduce_sum(sharded, *comm_for_sharded, params_device(params));
  return std::sqrt(replicated + sharded);
}

double clip_grad_norm(const std::vector<Parameter>& params, double max_norm, Communicator* comm_for_sharded) {
  double norm = grad_norm(params, comm_for_sharded);
  if (!std::isfinite(norm) || max_norm <= 0.0 || norm <= max_norm) return norm;
  double factor = max_norm / (norm + kClipEps);
  for (const auto& p : params) {
    Tensor grad = p.var.grad();  // shares storage: scaled in place
    if (!grad.defined()) continue;
    Stream& stream = Stream::default_for(grad.device());
    if (grad.is_contiguous()) {
      cpu::scale_inplace(grad, factor, stream);
    } else {
      Tensor dense = grad.contiguous();
      cpu::scale_inplace(dense, factor, stream);
      grad.copy_(dense);
    }
  }
  return norm;
}

bool grads_finite(const std::vector<Parameter>& params, Communicator* comm) {
  double nonfinite = 0.0;
  Tensor count = Tensor::zeros({}, DType::i64);
  for (const auto& p : params) {
    const Tensor& grad = p.var.grad();
    if (!grad.defined()) continue;
    check_cpu(grad, p.name, "grads_finite");
    cpu::count_nonfinite(count, grad.contiguous(), Stream::default_for(grad.device()));
    nonfinite += static_cast<double>(*count.data<int64_t>());
  }
  if (comm != nullptr) nonfinite = all_reduce_sum(nonfinite, *comm, params_device(params));
  return nonfinite == 0.0;
}

}  // namespace loom
