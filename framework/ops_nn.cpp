// Differentiable NN ops: RMSNorm, activations (sigmoid, SiLU, fused SwiGLU),
// softmax over any dim, RoPE, reference softmax attention, fused cross-entropy.
// Each op validates its inputs (device, dtype, shapes, naming the values),
// makes them contiguous, runs the forward kernel on the inputs' device
// (kernels/dispatch.h) and records one node whose backward runs the matching
// backward kernel on the tensors it saved. Index tensors (positions, targets)
// may come from the host; they are moved to the data's device. With 16-bit
// data, statistics (RMSNorm rstd, attention lse, the loss) are fp32.
// Attention is one node with two outputs (out and lse), so a caller that merges
// partial results (ring attention) back-propagates through lse too; its
// backward needs only q, k, v, out and lse. Index tensors (positions, targets)
// are saved as owned copies: the caller may reuse its buffers before backward.
// The S2 block mask (AttentionOptions::s2) is one more visibility rule inside
// the same kernels, so dense behaviour is unchanged when it is off.
#include <cmath>

#include "framework/ops_nn.h"
#include "framework/op_checks.h"
#include "framework/stream.h"
#include "kernels/cpu/rmsnorm.h"  // rmsnorm_rstd_dtype

namespace loom {

namespace {

void check_same_dtype(const Variable& a, const Variable& b, const char* op, const char* name_a, const char* name_b) {
  LOOM_CHECK(a.dtype() == b.dtype()) << op << ": " << name_a << " is " << a.dtype() << " but " << name_b << " is "
                                     << b.dtype();
  check_device(op, b.data(), name_b, a.device());
}

void check_positions(const Tensor& positions, const char* op, const char* name) {
  LOOM_CHECK(positions.defined()) << op << ": " << name << " are undefined";
  LOOM_CHECK(positions.dtype() == DType::i64 || positions.dtype() == DType::i32)
      << op << ": " << name << " must be i64 or i32, got " << positions.dtype();
}

// Global positions of `n` tokens as an owned contiguous i64 (n) on the host:
// the given ones, or 0..n-1.
Tensor resolve_positions(const Tensor& given, int64_t n, const char* name) {
  if (!given.defined()) return Tensor::arange(n, DType::i64);
  check_positions(given, "attention", name);
  LOOM_CHECK(given.dim() == 1 && given.size(0) == n)
      << "attention: " << name << " shape " << shape_str(given.shape()) << " must be " << shape_str({n});
  Tensor owned = Tensor::empty({n}, DType::i64);
  owned.copy_(given);
  return owned;
}

// An owned copy of an index tensor on `device` (the caller may reuse its buffer before backward).
Tensor owned_index(const Tensor& index, Device device) {
  return index.device() == device ? index.clone() : index_on(index, device);
}

Stream& stream_of(const Tensor& t) { return Stream::default_for(t.device()); }

}  // namespace

Variable rms_norm(const Variable& x, const Variable& weight, double eps) {
  const char* op = "rms_norm";
  check_input(x, op, "x");
  LOOM_CHECK(weight.defined()) << op << ": input weight is undefined";
  LOOM_CHECK(x.dtype() == weight.dtype()) << op << ": x is " << x.dtype() << " but weight is " << weight.dtype();
  Tensor w_on = operand_on(op, weight, "weight", x.device());  // a host constant weight (unit norm) is uploaded
  check_float(op, w_on, "weight");
  LOOM_CHECK(x.dim() >= 1 && weight.dim() == 1 && weight.size(0) == x.size(-1))
      << op << ": weight shape " << shape_str(weight.shape()) << " must be (C) with C the last dim of x "
      << shape_str(x.shape());
  LOOM_CHECK(eps >= 0.0) << op << ": eps = " << eps << " must be >= 0";
  Tensor xc = x.data().contiguous();       // (..., C)
  Tensor wc = w_on.contiguous();           // (C)
  int64_t cols = x.size(-1), rows = cols == 0 ? 0 : x.numel() / cols;
  Tensor y = Tensor::empty(x.shape(), x.dtype(), x.device());  // (..., C)
  DType rstd_dtype = x.device().is_cpu() ? cpu::rmsnorm_rstd_dtype(x.dtype()) : DType::f32;
  Tensor rstd = Tensor::empty({rows}, rstd_dtype, x.device());  // (N) rows = leading dims flattened
  dispatch::rmsnorm_forward(y, rstd, xc, wc, eps, stream_of(xc));
  return make_output(y, {x, weight}, "RmsNorm", [xc, wc, rstd](const std::vector<Tensor>& grads) {
    if (!grads[0].defined()) return std::vector<Tensor>{Tensor(), Tensor()};
    Tensor dy = grads[0].contiguous();
    Tensor dx = Tensor::empty(xc.shape(), xc.dtype(), xc.device());  // (..., C)
    // CUDA sums dw over rows in fp32 and can hand it out as fp32 (fp32 gradient buffers).
    DType dw_dtype = wc.device().is_cuda() ? DType::f32 : wc.dtype();
    Tensor dw = Tensor::empty(wc.shape(), dw_dtype, wc.device());  // (C)
    dispatch::rmsnorm_backward(dx, dw, dy, xc, wc, rstd, stream_of(dy));
    return std::vector<Tensor>{dx, dw};
  });
}

Variable sigmoid(const Variable& x) {
  check_input(x, "sigmoid", "x");
  Tensor xc = x.data().contiguous();
  Tensor y = Tensor::empty(x.shape(), x.dtype(), x.device());  // like x
  dispatch::sigmoid_forward(y, xc, stream_of(xc));
  return make_output(y, {x}, "Sigmoid", [y](const std::vector<Tensor>& grads) {
    if (!grads[0].defined()) return std::vector<Tensor>{Tensor()};
    Tensor dx = Tensor::empty(y.shape(), y.dtype(), y.device());
    dispatch::sigmoid_backward(dx, grads[0].contiguous(), y, stream_of(y));
    return std::vector<Tensor>{dx};
  });
}

Variable silu(const Variable& x) {
  check_input(x, "silu", "x");
  Tensor xc = x.data().contiguous();
  Tensor y = Tensor::empty(x.shape(), x.dtype(), x.device());  // like x
  dispatch::silu_forward(y, xc, stream_of(xc));
  return make_output(y, {x}, "Silu", [xc](const std::vector<Tensor>& grads) {
    if (!grads[0].defined()) return std::vector<Tensor>{Tensor()};
    Tensor dx = Tensor::empty(xc.shape(), xc.dtype(), xc.device());
    dispatch::silu_backward(dx, grads[0].contiguous(), xc, stream_of(xc));
    return std::vector<Tensor>{dx};
  });
}

Variable swiglu(const Variable& gate, const Variable& up) {
  const char* op = "swiglu";
  check_input(gate, op, "gate");
  check_input(up, op, "up");
  check_same_dtype(gate, up, op, "gate", "up");
  LOOM_CHECK(gate.shape() == up.shape()) << op << ": gate shape " << shape_str(gate.shape()) << " differs from up "
                                         << shape_str(up.shape());
  Tensor gc = gate.data().contiguous();  // (..., F)
  Tensor uc = up.data().contiguous();    // (..., F)
  Tensor out = Tensor::empty(gate.shape(), gate.dtype(), gate.device());  // (..., F)
  dispatch::swiglu_forward(out, gc, uc, stream_of(gc));
  return make_output(out, {gate, up}, "SwiGLU", [gc, uc](const std::vector<Tensor>& grads) {
    if (!grads[0].defined()) return std::vector<Tensor>{Tensor(), Tensor()};
    Tensor dgate = Tensor::empty(gc.shape(), gc.dtype(), gc.device());
    Tensor dup = Tensor::empty(uc.shape(), uc.dtype(), uc.device());
    dispatch::swiglu_backward(dgate, dup, grads[0].contiguous(), gc, uc, stream_of(gc));
    return std::vector<Tensor>{dgate, dup};
  });
}

Variable sigmoid_gate(const Variable& x, const Variable& z) {
  const char* op = "sigmoid_gate";
  check_input(x, op, "x");
  check_input(z, op, "z");
  check_same_dtype(x, z, op, "x", "z");
  const bool per_row = z.shape() != x.shape();
  LOOM_CHECK(!per_row || (x.dim() >= 1 && z.shape() == Shape(x.shape().begin(), x.shape().end() - 1)))
      << op << ": z shape " << shape_str(z.shape()) << " is neither x's " << shape_str(x.shape())
      << " nor x's without its last dim";
  const int64_t span = per_row ? x.shape().back() : 1;  // elements of x per element of z
  Tensor xc = x.data().contiguous();  // (..., D)
  Tensor zc = z.data().contiguous();  // (..., D) or (...)
  Tensor y = Tensor::empty(xc.shape(), xc.dtype(), xc.device());
  dispatch::sigmoid_gate_forward(y, xc, zc, span, stream_of(xc));
  return make_output(y, {x, z}, "SigmoidGate", [xc, zc, span](const std::vector<Tensor>& grads) {
    if (!grads[0].defined()) return std::vector<Tensor>{Tensor(), Tensor()};
    Tensor dx = Tensor::empty(xc.shape(), xc.dtype(), xc.device());
    Tensor dz = Tensor::empty(zc.shape(), zc.dtype(), zc.device());
    dispatch::sigmoid_gate_backward(dx, dz, grads[0].contiguous(), xc, zc, span, stream_of(xc));
    return std::vector<Tensor>{dx, dz};
  });
}

Variable softmax(const Variable& x, int64_t dim) {
  const char* op = "softmax";
  check_input(x, op, "x");
  LOOM_CHECK(x.dim() >= 1 && dim >= -x.dim() && dim < x.dim())
      << op << ": dim " << dim << " is out of range for x of shape " << shape_str(x.shape());
  int64_t d = dim < 0 ? dim + x.dim() : dim, last = x.dim() - 1;
  // The kernel reduces over the last dim: swap `d` there (a contiguous copy) and back afterwards.
  bool moved = d != last;
  Tensor xt = moved ? x.data().transpose(d, last).contiguous() : x.data().contiguous();  // x with dims d, last swapped
  Tensor yt = Tensor::empty(xt.shape(), xt.dtype(), xt.device());                        // like xt
  dispatch::softmax_forward(yt, xt, stream_of(xt));
  Tensor y = moved ? yt.transpose(d, last).contiguous() : yt;  // like x
  return make_output(y, {x}, "Softmax", [yt, d, last, moved](const std::vector<Tensor>& grads) {
    if (!grads[0].defined()) return std::vector<Tensor>{Tensor()};
    Tensor gt = moved ? grads[0].transpose(d, last).contiguous() : grads[0].contiguous();
    Tensor dxt = Tensor::empty(yt.shape(), yt.dtype(), yt.device());
    dispatch::softmax_backward(dxt, gt, yt, stream_of(yt));
    return std::vector<Tensor>{moved ? dxt.transpose(d, last).contiguous() : dxt};
  });
}

Variable rope(const Variable& x, const Tensor& positions, double theta) {
  const char* op = "rope";
  check_input(x, op, "x");
  check_positions(positions, op, "positions");
  LOOM_CHECK(x.dim() == 4) << op << ": x must be (B, T, H, D), got shape " << shape_str(x.shape());
  int64_t B = x.size(0), T = x.size(1), D = x.size(3);
  LOOM_CHECK(D % 2 == 0) << op << ": head dim D = " << D << " must be even (channel i pairs with i + D/2)";
  LOOM_CHECK((positions.dim() == 1 && positions.size(0) == T) ||
             (positions.dim() == 2 && positions.size(0) == B && positions.size(1) == T))
      << op << ": positions shape " << shape_str(positions.shape()) << " must be (T) with T = " << T << ", or (B, T) = "
      << shape_str({B, T}) << " for x " << shape_str(x.shape());
  LOOM_CHECK(theta > 0.0) << op << ": theta = " << theta << " must be positive";
  Tensor xc = x.data().contiguous();  // (B, T, H, D)
  Tensor pc = owned_index(positions, x.device());  // (T) or (B, T), owned, on x's device
  Tensor y = Tensor::empty(x.shape(), x.dtype(), x.device());  // (B, T, H, D)
  dispatch::rope_forward(y, xc, pc, theta, stream_of(xc));
  return make_output(y, {x}, "Rope", [pc, theta](const std::vector<Tensor>& grads) {
    if (!grads[0].defined()) return std::vector<Tensor>{Tensor()};
    Tensor dy = grads[0].contiguous();
    Tensor dx = Tensor::empty(dy.shape(), dy.dtype(), dy.device());  // (B, T, H, D)
    dispatch::rope_backward(dx, dy, pc, theta, stream_of(dy));
    return std::vector<Tensor>{dx};
  });
}

namespace {

// attention's operands checked, contiguous, with the positions on the data's device and the mask
// form (for a fixed-diagonal backend, cuDNN).
struct AttentionCall {
  Tensor qc, kc, vc, q_pos, k_pos;
  double scale;
  bool causal;
  S2Pattern s2;
  cpu::MaskForm form;
};

AttentionCall prepare_attention(const Variable& q, const Variable& k, const Variable& v,
                                const AttentionOptions& options, const char* op) {
  check_input(q, op, "q");
  check_input(k, op, "k");
  check_input(v, op, "v");
  LOOM_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4)
      << op << ": q " << shape_str(q.shape()) << " must be (B, T, H, D), k " << shape_str(k.shape()) << " and v "
      << shape_str(v.shape()) << " (B, S, Hkv, D)";
  LOOM_CHECK(k.shape() == v.shape()) << op << ": k shape " << shape_str(k.shape()) << " differs from v "
                                     << shape_str(v.shape());
  LOOM_CHECK(k.size(0) == q.size(0) && k.size(3) == q.size(3))
      << op << ": k " << shape_str(k.shape()) << " does not match q " << shape_str(q.shape())
      << " in batch B or head dim D";
  int64_t T = q.size(1), H = q.size(2), D = q.size(3), S = k.size(1), Hkv = k.size(2);
  LOOM_CHECK(Hkv > 0 && H % Hkv == 0) << op << ": H = " << H << " query heads is not a multiple of Hkv = " << Hkv
                                      << " kv heads";
  LOOM_CHECK(q.dtype() == k.dtype() && q.dtype() == v.dtype())
      << op << ": dtypes differ: q " << q.dtype() << ", k " << k.dtype() << ", v " << v.dtype();
  check_device(op, k.data(), "k", q.device());
  check_device(op, v.data(), "v", q.device());
  double scale = options.scale != 0.0 ? options.scale : 1.0 / std::sqrt(static_cast<double>(D));
  LOOM_CHECK(std::isfinite(scale)) << op << ": scale = " << scale << " (D = " << D << ") is not finite";
  bool causal = options.causal;
  Tensor q_pos = resolve_positions(options.q_positions, T, "q_positions");  // (T) i64
  Tensor k_pos = resolve_positions(options.k_positions, S, "k_positions");  // (S) i64
  S2Pattern s2 = options.s2;
  LOOM_CHECK(s2.block >= 0) << op << ": S2 block = " << s2.block << " must be >= 0 (0 = dense)";
  if (s2.enabled()) {
    LOOM_CHECK(causal) << op << ": S2 block sparsity (block = " << s2.block << ") needs causal attention";
    LOOM_CHECK(s2.local_blocks >= 1 && s2.vert_stride >= 1)
        << op << ": S2 local_blocks = " << s2.local_blocks << " and vert_stride = " << s2.vert_stride
        << " must be >= 1";
    for (const Tensor* pos : {&q_pos, &k_pos}) {
      const int64_t* p = pos->data<int64_t>();
      for (int64_t i = 0; i < pos->numel(); ++i)
        LOOM_CHECK(p[i] >= 0) << op << ": S2 needs non-negative positions, got " << p[i] << " at index " << i;
    }
  }

  // What the host positions say about the mask (a fixed-diagonal backend, cuDNN, needs to know).
  const cpu::MaskForm form = s2.enabled() ? cpu::MaskForm::positions()
                                          : cpu::mask_form(q_pos.data<int64_t>(), T, k_pos.data<int64_t>(), S, causal);
  q_pos = index_on(q_pos, q.device());  // owned host copies above; moved once to the data's device
  k_pos = index_on(k_pos, q.device());
  return AttentionCall{q.data().contiguous(),  // (B, T, H, D)
                       k.data().contiguous(),  // (B, S, Hkv, D)
                       v.data().contiguous(),  // (B, S, Hkv, D)
                       q_pos, k_pos, scale, causal, s2, form};
}

}  // namespace
AttentionResult attention(const Variable& q, const Variable& k, const Variable& v, const AttentionOptions& options) {
  const AttentionCall c = prepare_attention(q, k, v, options, "attention");
  const Tensor& qc = c.qc;
  Tensor out = Tensor::empty(qc.shape(), qc.dtype(), qc.device());                                      // (B, T, H, D)
  Tensor lse = Tensor::empty({qc.size(0), qc.size(2), qc.size(1)}, stats_dtype(qc.dtype()), qc.device());  // (B, H, T)
  dispatch::attention_forward(out, lse, qc, c.kc, c.vc, c.q_pos, c.k_pos, c.scale, c.causal, c.s2, stream_of(qc),
                              c.form);

  auto backward = [c, out, lse](const std::vector<Tensor>& grads) {
    if (!grads[0].defined() && !grads[1].defined()) return std::vector<Tensor>{Tensor(), Tensor(), Tensor()};
    Tensor dout = grads[0].defined() ? grads[0].contiguous() : Tensor();  // (B, T, H, D) or none
    Tensor dlse = grads[1].defined() ? grads[1].contiguous() : Tensor();  // (B, H, T) or none
    Tensor dq = Tensor::empty(c.qc.shape(), c.qc.dtype(), c.qc.device());  // (B, T, H, D)
    Tensor dk = Tensor::empty(c.kc.shape(), c.kc.dtype(), c.kc.device());  // (B, S, Hkv, D)
    Tensor dv = Tensor::empty(c.vc.shape(), c.vc.dtype(), c.vc.device());  // (B, S, Hkv, D)
    dispatch::attention_backward(dq, dk, dv, dout, dlse, c.qc, c.kc, c.vc, out, lse, c.q_pos, c.k_pos, c.scale,
                                 c.causal, c.s2, stream_of(c.qc), c.form);
    return std::vector<Tensor>{dq, dk, dv};
  };
  std::vector<Variable> outputs = make_outputs({out, lse}, {q, k, v}, "Attention", std::move(backward));
  return AttentionResult{outputs[0], outputs[1]};
}

AttentionResult gated_attention(const Variable& q, const Variable& k, const Variable& v,
                                const AttentionOutputGate& gate, const AttentionOptions& options) {
  const char* op = "gated_attention";
  const AttentionCall c = prepare_attention(q, k, v, options, op);
  const Tensor& qc = c.qc;
  const int64_t B = qc.size(0), T = qc.size(1), H = qc.size(2), D = qc.size(3);
  const bool has_z = gate.z.defined(), has_w = gate.w.defined();
  LOOM_CHECK(has_z || has_w) << op << ": the gate has neither z nor w (use attention)";
  cpu::OutputGate g;
  if (has_z) {
    check_input(gate.z, op, "gate z");
    check_device(op, gate.z.data(), "gate z", q.device());
    LOOM_CHECK(gate.z.dtype() == q.dtype()) << op << ": gate z dtype " << gate.z.dtype() << " differs from q's "
                                            << q.dtype();
    LOOM_CHECK(gate.z.shape() == Shape({B, T, H}) || gate.z.shape() == qc.shape())
        << op << ": gate z shape " << shape_str(gate.z.shape()) << " must be " << shape_str({B, T, H})
        << " (headwise) or " << shape_str(qc.shape()) << " (elementwise)";
    g.z = gate.z.data().contiguous();
  }
  if (has_w) {
    check_input(gate.w, op, "gate w");
    check_device(op, gate.w.data(), "gate w", q.device());
    LOOM_CHECK(gate.w.dtype() == q.dtype()) << op << ": gate w dtype " << gate.w.dtype() << " differs from q's "
                                            << q.dtype();
    LOOM_CHECK(gate.w.shape() == Shape({B, T, H}))
        << op << ": gate w shape " << shape_str(gate.w.shape()) << " must be " << shape_str({B, T, H});
    g.w = gate.w.data().contiguous();
  }
  Tensor out = Tensor::empty({B, T, H, D}, qc.dtype(), qc.device());             // (B, T, H, D)
  Tensor lse = Tensor::empty({B, H, T}, stats_dtype(qc.dtype()), qc.device());   // (B, H, T)
  Tensor ungated;  // o, where the backward needs it
  dispatch::attention_forward_gated(out, ungated, lse, qc, c.kc, c.vc, g, c.q_pos, c.k_pos, c.scale, c.causal, c.s2,
                                    stream_of(qc), c.form);

  std::vector<Variable> inputs{q, k, v};
  if (has_z) inputs.push_back(gate.z);
  if (has_w) inputs.push_back(gate.w);
  auto backward = [c, g, out, ungated, lse, has_z, has_w](const std::vector<Tensor>& grads) {
    std::vector<Tensor> result(3 + has_z + has_w);
    if (!grads[0].defined() && !grads[1].defined()) return result;
    const Tensor& qc = c.qc;
    Tensor dlse = grads[1].defined() ? grads[1].contiguous() : Tensor();  // (B, H, T) or none
    Tensor dq = Tensor::empty(qc.shape(), qc.dtype(), qc.device());        // (B, T, H, D)
    Tensor dk = Tensor::empty(c.kc.shape(), c.kc.dtype(), c.kc.device());  // (B, S, Hkv, D)
    Tensor dv = Tensor::empty(c.vc.shape(), c.vc.dtype(), c.vc.device());  // (B, S, Hkv, D)
    Tensor dz, dw;
    if (!grads[0].defined()) {  // lse only: the plain backward (out is not read); the gate gets nothing
      dispatch::attention_backward(dq, dk, dv, Tensor(), dlse, qc, c.kc, c.vc, out, lse, c.q_pos, c.k_pos, c.scale,
                                   c.causal, c.s2, stream_of(qc), c.form);
    } else {
      if (has_z) dz = Tensor::empty(g.z.shape(), g.z.dtype(), g.z.device());
      if (has_w) dw = Tensor::empty(g.w.shape(), g.w.dtype(), g.w.device());
      dispatch::attention_backward_gated(dq, dk, dv, dz, dw, grads[0].contiguous(), dlse, qc, c.kc, c.vc, out,
                                         ungated, lse, g, c.q_pos, c.k_pos, c.scale, c.causal, c.s2, stream_of(qc),
                                         c.form);
    }
    result[0] = dq, result[1] = dk, result[2] = dv;
    if (has_z) result[3] = dz;
    if (has_w) result[3 + has_z] = dw;
    return result;
  };
  std::vector<Variable> outputs = make_outputs({out, lse}, inputs, "GatedAttention", std::move(backward));
  return AttentionResult{outputs[0], outputs[1]};
}

Variable cross_entropy(const Variable& logits, const Tensor& targets, int64_t ignore_index, Reduction reduction) {
  const char* op = "cross_entropy";
  check_input(logits, op, "logits");
  LOOM_CHECK(logits.dim() == 2) << op << ": logits must be (N, V), got shape " << shape_str(logits.shape());
  LOOM_CHECK(targets.defined()) << op << ": targets are undefined";
  LOOM_CHECK(targets.dtype() == DType::i64 || targets.dtype() == DType::i32)
      << op << ": targets must be i64 or i32, got " << targets.dtype();
  LOOM_CHECK(targets.dim() == 1 && targets.size(0) == logits.size(0))
      << op << ": targets shape " << shape_str(targets.shape()) << " must be (N) = " << shape_str({logits.size(0)})
      << " for logits " << shape_str(logits.shape());
  bool mean = reduction == Reduction::mean;
  Tensor lc = logits.data().contiguous();  // (N, V)
  Tensor tc = owned_index(targets, lc.device());  // (N), owned: the caller may reuse its buffer before backward
  Tensor loss = Tensor::empty({}, stats_dtype(lc.dtype()), lc.device());           // (), fp32 for 16-bit logits
  Tensor lse = Tensor::empty({lc.size(0)}, stats_dtype(lc.dtype()), lc.device());  // (N)
  dispatch::cross_entropy_forward(loss, lse, lc, tc, ignore_index, mean, stream_of(lc));
  return make_output(loss, {logits}, "CrossEntropy",
                     [lc, tc, lse, ignore_index, mean](const std::vector<Tensor>& grads) {
                       if (!grads[0].defined()) return std::vector<Tensor>{Tensor()};
                       Tensor dlogits = Tensor::empty(lc.shape(), lc.dtype(), lc.device());  // (N, V)
                       dispatch::cross_entropy_backward(dlogits, grads[0].contiguous(), lc, tc, lse, ignore_index,
                                                        mean, stream_of(lc));
                       return std::vector<Tensor>{dlogits};
                     });
}

}  // namespace loom
