// lightning_attention: validates its inputs (naming the values), makes them
// contiguous, runs the kernel on q's device (kernels/dispatch.h) and records one node. The backward saves
// the inputs (q, k, v, initial_state, decays) and, on CUDA, the state entering
// each segment of the kernel's sequence split (a few per head, not one per
// chunk), so the backward recomputes no forward-order state.
#include "framework/ops_lightning.h"
#include "framework/op_checks.h"

#include <cmath>

#include "framework/stream.h"

namespace loom {

namespace {

}  // namespace

LightningResult lightning_attention(const Variable& q, const Variable& k, const Variable& v,
                                    const Tensor& decay_lambdas, const Variable& initial_state, double out_scale,
                                    int64_t block_size) {
  const char* op = "lightning_attention";
  check_input(q, op, "q");
  check_input(k, op, "k");
  check_input(v, op, "v");
  LOOM_CHECK(q.dim() == 4) << op << ": q shape " << shape_str(q.shape()) << " must be (B, T, H, D)";
  LOOM_CHECK(k.shape() == q.shape() && v.shape() == q.shape())
      << op << ": q " << shape_str(q.shape()) << ", k " << shape_str(k.shape()) << " and v " << shape_str(v.shape())
      << " must all be (B, T, H, D)";
  LOOM_CHECK(q.dtype() == k.dtype() && q.dtype() == v.dtype())
      << op << ": dtypes differ: q " << q.dtype() << ", k " << k.dtype() << ", v " << v.dtype();
  check_device(op, k.data(), "k", q.device());
  check_device(op, v.data(), "v", q.device());
  int64_t B = q.size(0), H = q.size(2), D = q.size(3);
  Shape state_shape{B, H, D, D};
  if (initial_state.defined()) {
    check_input(initial_state, op, "initial_state");
    check_device(op, initial_state.data(), "initial_state", q.device());
    LOOM_CHECK(initial_state.shape() == state_shape)
        << op << ": initial_state shape " << shape_str(initial_state.shape()) << " must be (B, H, D, D) = "
        << shape_str(state_shape) << " for q " << shape_str(q.shape());
    LOOM_CHECK(initial_state.dtype() == stats_dtype(q.dtype()))
        << op << ": initial_state is " << initial_state.dtype() << " but q is " << q.dtype() << " (states are "
        << stats_dtype(q.dtype()) << ")";
  }
  LOOM_CHECK(decay_lambdas.defined()) << op << ": decay_lambdas are undefined";
  LOOM_CHECK(decay_lambdas.dim() == 1 && decay_lambdas.size(0) == H)
      << op << ": decay_lambdas shape " << shape_str(decay_lambdas.shape()) << " must be (H) = " << shape_str({H})
      << " for q " << shape_str(q.shape());
  LOOM_CHECK(is_floating(decay_lambdas.dtype())) << op << ": decay_lambdas must be floating, got "
                                                 << decay_lambdas.dtype();
  LOOM_CHECK(block_size >= 0) << op << ": block_size = " << block_size << " must be >= 0 (0 = recurrent)";
  LOOM_CHECK(std::isfinite(out_scale)) << op << ": out_scale = " << out_scale << " is not finite";

  Tensor qc = q.data().contiguous();  // (B, T, H, D)
  Tensor kc = k.data().contiguous();  // (B, T, H, D)
  Tensor vc = v.data().contiguous();  // (B, T, H, D)
  Tensor s0 = initial_state.defined() ? initial_state.data().contiguous() : Tensor();  // (B, H, D, D) or none
  // (H) f64 on the host, owned (the caller may reuse its buffer); the kernels
  // of every device read the decays on the host (they form the decay powers there).
  Tensor lambdas = decay_lambdas.to(Device::cpu()).to(DType::f64).clone();
  Tensor out = Tensor::empty(q.shape(), q.dtype(), q.device());            // (B, T, H, D)
  Tensor final_state = Tensor::empty(state_shape, stats_dtype(q.dtype()), q.device());  // (B, H, D, D), fp32 for 16-bit q
  Stream& stream = Stream::default_for(qc.device());
  Tensor saved;  // the segments' entering states of the CUDA kernels (bounded, not growing with T), or none
  dispatch::lightning_forward(out, final_state, qc, kc, vc, s0, lambdas, out_scale, block_size, stream, &saved);

  bool want_ds0 = initial_state.defined();
  auto backward = [qc, kc, vc, s0, lambdas, out_scale, block_size, want_ds0,
                   saved](const std::vector<Tensor>& grads) {
    if (!grads[0].defined() && !grads[1].defined()) return std::vector<Tensor>(4);
    Tensor dout = grads[0].defined() ? grads[0].contiguous() : Tensor();  // (B, T, H, D) or none
    Tensor dsf = grads[1].defined() ? grads[1].contiguous() : Tensor();   // (B, H, D, D) or none
    Tensor dq = Tensor::empty(qc.shape(), qc.dtype(), qc.device());  // (B, T, H, D)
    Tensor dk = Tensor::empty(qc.shape(), qc.dtype(), qc.device());  // (B, T, H, D)
    Tensor dv = Tensor::empty(qc.shape(), qc.dtype(), qc.device());  // (B, T, H, D)
    Tensor ds0 = want_ds0 ? Tensor::empty(s0.shape(), s0.dtype(), s0.device()) : Tensor();  // (B, H, D, D) or none
    dispatch::lightning_backward(dq, dk, dv, ds0, dout, dsf, qc, kc, vc, s0, lambdas, out_scale, block_size,
                                 Stream::default_for(qc.device()), saved);
    return std::vector<Tensor>{dq, dk, dv, ds0};
  };
  std::vector<Variable> outputs =
      make_outputs({out, final_state}, {q, k, v, initial_state}, "LightningAttention", std::move(backward));
  return LightningResult{outputs[0], outputs[1]};
}

}  // namespace loom
