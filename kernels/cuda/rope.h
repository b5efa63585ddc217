// RoPE CUDA kernels with the CPU twin's contract (kernels/cpu/rope.h):
// rotate-half pairing, explicit positions (T) or (B, T), bf16/f16/f32
// storage. Angles are formed and reduced in double precision, because
// position x frequency in fp32 is off by ~0.06 rad at a million tokens.
#pragma once

#include "framework/stream.h"
#include "framework/tensor.h"

namespace loom::cuda {

// x, y (B, T, H, D), D even; positions i64 or i32 on the same device.
void rope_forward(Tensor& y, const Tensor& x, const Tensor& positions, double theta, Stream& s);
// dx = dy rotated by the negative angle.
void rope_backward(Tensor& dx, const Tensor& dy, const Tensor& positions, double theta, Stream& s);

}  // namespace loom::cuda
