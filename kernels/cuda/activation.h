// SwiGLU and sigmoid-gate CUDA kernels with the CPU twins' contract
// (kernels/cpu/activation.h), for bf16/f16/f32 storage with fp32 math; 16-byte
// vector access over the aligned body and a scalar tail.
#pragma once

#include "framework/stream.h"
#include "framework/tensor.h"

namespace loom::cuda {

// out = silu(gate) * up
void swiglu_forward(Tensor& out, const Tensor& gate, const Tensor& up, Stream& s);
// dgate = dout * up * silu'(gate),  dup = dout * silu(gate)
void swiglu_backward(Tensor& dgate, Tensor& dup, const Tensor& dout, const Tensor& gate, const Tensor& up, Stream& s);

// y = x * sigmoid(z), each z element gating `span` consecutive elements of x
void sigmoid_gate_forward(Tensor& y, const Tensor& x, const Tensor& z, int64_t span, Stream& s);
// dx = dy * sigmoid(z),  dz = sigmoid'(z) * (sum over the span of dy * x), summed in fp32
void sigmoid_gate_backward(Tensor& dx, Tensor& dz, const Tensor& dy, const Tensor& x, const Tensor& z, int64_t span,
                           Stream& s);

}  // namespace loom::cuda
