// Element-wise CUDA kernels with their CPU twins' contracts
// (kernels/cpu/elementwise.h, kernels/cpu/activation.h), plus the dtype
// conversion / strided copy and fill behind Tensor::copy_, to and fill_ for
// CUDA tensors. Math runs in fp32 (f64 for f64 tensors) and rounds once to
// the output dtype; contiguous operands move as 16-byte vectors with a scalar
// tail, strided or broadcast operands take an index-walking path.
//
// CUDA dtypes: f32, bf16, f16 and f64 wherever the CPU twin says "f32/f64";
// copy_cast and fill take every dtype. Every tensor must be on the stream's
// device.
#pragma once

#include "framework/stream.h"
#include "framework/tensor.h"
#include "kernels/cpu/elementwise.h"  // BinaryOp

namespace loom::cuda {

using cpu::BinaryOp;

// out = a (op) b; out contiguous with the broadcast shape of a and b (any
// strides, stride 0 included); a, b, out one dtype.
void binary(Tensor& out, const Tensor& a, const Tensor& b, BinaryOp op, Stream& s);
// out = alpha * x + beta; out contiguous with x's shape and dtype, x any
// strides; out may be x itself.
void scale(Tensor& out, const Tensor& x, double alpha, double beta, Stream& s);
// y += alpha * x, in place; y contiguous, x same shape (any strides). On CUDA
// x may have another floating dtype than y (a bf16 gradient added into an
// fp32 buffer); the sum is formed in y's math type and rounded once.
void axpy(Tensor& y, const Tensor& x, double alpha, Stream& s);

// y = 1 / (1 + exp(-x)); all contiguous, one shape and dtype.
void sigmoid_forward(Tensor& y, const Tensor& x, Stream& s);
// dx = dy * y * (1 - y), from the forward's output y.
void sigmoid_backward(Tensor& dx, const Tensor& dy, const Tensor& y, Stream& s);
// y = x * sigmoid(x)
void silu_forward(Tensor& y, const Tensor& x, Stream& s);
// dx = dy * sigmoid(x) * (1 + x * (1 - sigmoid(x)))
void silu_backward(Tensor& dx, const Tensor& dy, const Tensor& x, Stream& s);

// dst = src converted to dst's dtype (rounding as the host's Tensor::copy_:
// 16-bit floats via float, nearest even; others via double). Same shape, both
// on the stream's device, any strides and any dtypes; dst must not overlap src
// unless it is the same view.
void copy_cast(Tensor& dst, const Tensor& src, Stream& s);
// Every element of out (any strides, any dtype) = value converted to its dtype.
void fill(Tensor& out, double value, Stream& s);

}  // namespace loom::cuda
