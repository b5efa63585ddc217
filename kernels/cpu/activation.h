// Element-wise activation CPU kernels, forward and backward: sigmoid, SiLU and
// the fused SwiGLU gate silu(gate) * up. All tensors contiguous, same shape and
// dtype (f32 or f64); outputs are allocated by the caller.
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

}  // namespace loom::cpu
