// Softmax CPU kernels over the last dim of a contiguous (N, V) layout; the op
// layer moves any other dim last first. f32 or f64.
#pragma once

#include "framework/stream.h"
#include "framework/tensor.h"

namespace loom::cpu {

// y (N, V) = exp(x - max) / sum(exp(x - max)) per row; x, y contiguous with V = last dim.
void softmax_forward(Tensor& y, const Tensor& x, Stream& s);
// dx = y * (dy - sum(dy * y)) per row, from the forward's output y.
void softmax_backward(Tensor& dx, const Tensor& dy, const Tensor& y, Stream& s);

}  // namespace loom::cpu
