// Element-wise activation CPU kernels, forward and backward: sigmoid, SiLU,
// the fused SwiGLU gate silu(gate) * up and the fused sigmoid output gate
// x * sigmoid(z). All tensors contiguous, one dtype (f32 or f64), the same shape
// except the gate's z; outputs are allocated by the caller.
#pragma once

#include "framework/stream.h"
#include "framework/tensor.h"

namespace loom::cpu {

// y = 1 / (1 + exp(-x))
void sigmoid_forward(Tensor& y, const Tensor& x, Stream& s);
// dx = dy * y * (1 - y), from the forward's output y.
void sigmoid_backward(Tensor& dx, const Tensor& dy, const Tensor& y, Stream& s);

// y = x * sigmoid(x)
void silu_forward(Tensor& y, const Tensor& x, Stream& s);
// dx = dy * sigmoid(x) * (1 + x * (1 - sigmoid(x)))
void silu_backward(Tensor& dx, const Tensor& dy, const Tensor& x, Stream& s);

// out = silu(gate) * up
void swiglu_forward(Tensor& out, const Tensor& gate, const Tensor& up, Stream& s);
// dgate = dout * up * silu'(gate),  dup = dout * silu(gate)
void swiglu_backward(Tensor& dgate, Tensor& dup, const Tensor& dout, const Tensor& gate, const Tensor& up, Stream& s);

// Sigmoid output gate (ALGORITHMS.md §9): y = x * sigmoid(z), each z element gating `span`
// consecutive elements of x (z has x.numel() / span elements): span 1 is the element-wise gate,
// span D the per-head gate of (B, T, H, D) by (B, T, H).
void sigmoid_gate_forward(Tensor& y, const Tensor& x, const Tensor& z, int64_t span, Stream& s);
// dx = dy * sigmoid(z),  dz = sigmoid(z) (1 - sigmoid(z)) * (sum over the span of dy * x)
void sigmoid_gate_backward(Tensor& dx, Tensor& dz, const Tensor& dy, const Tensor& x, const Tensor& z, int64_t span,
                           Stream& s);

}  // namespace loom::cpu
