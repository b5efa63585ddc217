// SwiGLU CUDA kernels with the CPU twin's contract (kernels/cpu/activation.h),
// for bf16/f16/f32 storage with fp32 math; 16-byte vector access over the
// aligned body and a scalar tail.
#pragma once

#include "framework/stream.h"
#include "framework/tensor.h"

namespace loom::cuda {

// out = silu(gate) * up
void swiglu_forward(Tensor& out, const Tensor& gate, const Tensor& up, Stream& s);
// dgate = dout * up * silu'(gate),  dup = dout * silu(gate)
void swiglu_backward(Tensor& dgate, Tensor& dup, const Tensor& dout, const Tensor& gate, const Tensor& up, Stream& s);

}  // namespace loom::cuda
