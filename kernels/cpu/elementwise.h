// Element-wise CPU kernels with numpy broadcasting (f32, f64). Inputs may be
// strided views; outputs are contiguous tensors allocated by the caller.
#pragma once

#include "framework/stream.h"
#include "framework/tensor.h"

namespace loom::cpu {

enum class BinaryOp { add, sub, mul, div };

// out = a (op) b; out has the broadcast shape of a and b and is contiguous.
void binary(Tensor& out, const Tensor& a, const Tensor& b, BinaryOp op, Stream& s);
// out = alpha * x (+ beta, added to every element).
void scale(Tensor& out, const Tensor& x, double alpha, double beta, Stream& s);
// y += alpha * x, in place; y contiguous, x same shape (any strides).
void axpy(Tensor& y, const Tensor& x, double alpha, Stream& s);
// out (shape S) = x (a shape S broadcasts to) summed over the broadcast dims.
void sum_to(Tensor& out, const Tensor& x, Stream& s);

}  // namespace loom::cpu
