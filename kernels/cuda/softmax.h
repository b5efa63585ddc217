// Softmax CUDA kernels with the CPU twin's contract (kernels/cpu/softmax.h),
// over the last dim of a contiguous (N, V) layout. Statistics (max, exp-sum,
// the backward's row dot product) are fp32 or better whatever the storage
// dtype; each row is read once for its statistics (online max + sum) and once
// more for the output. (The row log-sum-exp of the MoE router lives with the
// MoE kernels, kernels/cuda/moe.h.)
//
// CUDA dtypes: x, y, dy, dx f32, bf16 or f16 (one dtype per call). Every
// tensor on the stream's device, contiguous.
#pragma once

#include "framework/stream.h"
#include "framework/tensor.h"

namespace loom::cuda {

// y (N, V) = exp(x - max) / sum(exp(x - max)) per row (a row of all -inf gives NaN, as on the CPU).
void softmax_forward(Tensor& y, const Tensor& x, Stream& s);
// dx = y * (dy - sum(dy * y)) per row, from the forward's output y.
void softmax_backward(Tensor& dx, const Tensor& dy, const Tensor& y, Stream& s);

}  // namespace loom::cuda
