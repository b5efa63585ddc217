// Differentiable tensor ops: arithmetic with broadcasting, matrix products,
// reductions, shape ops, embedding. Each op records one autograd node whose
// backward is written next to its forward (framework/ops_tensor*.cpp); the
// numeric work is done by kernels/cpu (OpenBLAS for matrix products).
// Errors (mismatched shapes, wrong dtype, out-of-range index) throw loom::Error
// naming the offending values.
#pragma once

#include <vector>

#include "framework/autograd.h"

namespace loom {

// ---- arithmetic (numpy broadcasting; same dtype required) ----
Variable add(const Variable& a, const Variable& b);
Variable sub(const Variable& a, const Variable& b);
Variable mul(const Variable& a, const Variable& b);
Variable div(const Variable& a, const Variable& b);
Variable scale(const Variable& x, double alpha);  // alpha * x
Variable operator+(const Variable& a, const Variable& b);
Variable operator-(const Variable& a, const Variable& b);
Variable operator*(const Variable& a, const Variable& b);

// ---- matrix products ----
// a (..., M, K) @ b (..., K, N) -> (..., M, N); batch dims broadcast (b may be 2-D).
Variable matmul(const Variable& a, const Variable& b);
// x (..., In) @ weight (Out, In)^T + bias (Out) -> (..., Out); bias may be undefined.
Variable linear(const Variable& x, const Variable& weight, const Variable& bias = {});
// x (..., In) @ weight (Out, In)^T -> (..., Out) in weight's dtype (f32 or f64), bias-free:
// the routers' logits. For 16-bit x on CUDA with an f32 weight the product runs on x's
// dtype (the weight rounded to it: exact when it is a cast of a 16-bit parameter) with
// fp32 accumulation and output, so x is never widened; the backward rounds the f32
// gradient to x's dtype for its two products (dx in x's dtype, dweight in f32).
// Otherwise it is linear(cast(x, weight's dtype), weight).
Variable linear_wide_out(const Variable& x, const Variable& weight);

// ---- reductions ----
Variable sum(const Variable& x);                                     // all elements -> shape ()
Variable sum(const Variable& x, int64_t dim, bool keepdim = false);
Variable mean(const Variable& x);
Variable mean(const Variable& x, int64_t dim, bool keepdim = false);

// ---- shape ops (outputs are contiguous copies or views; gradients flow back) ----
Variable reshape(const Variable& x, const Shape& shape);
Variable transpose(const Variable& x, int64_t dim0, int64_t dim1);
Variable permute(const Variable& x, const std::vector<int64_t>& order);
Variable slice(const Variable& x, int64_t dim, int64_t start, int64_t end, int64_t step = 1);
Variable narrow(const Variable& x, int64_t dim, int64_t start, int64_t length);
Variable concat(const std::vector<Variable>& xs, int64_t dim);
Variable contiguous(const Variable& x);

// ---- dtype ----
// x converted to `dtype` (floating; rounded when narrowing); the gradient
// comes back in x's dtype. Same dtype: x itself.
Variable cast(const Variable& x, DType dtype);

// ---- embedding ----
// weight (V, C), ids integer (...) -> (..., C); ids outside [0, V) are an error naming the id and V.
Variable embedding(const Variable& weight, const Tensor& ids);

}  // namespace loom
