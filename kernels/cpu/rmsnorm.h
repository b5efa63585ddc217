// RMSNorm CPU kernels, forward and backward. Rows are the leading dims of x
// flattened: x (N, C) contiguous, weight (C). The forward keeps the per-row
// reciprocal RMS (rstd) so the backward needs no second reduction over x^2.
#pragma once

#include "framework/stream.h"
#include "framework/tensor.h"

namespace loom::cpu {

// y (N, C) = x * rstd * w,  rstd (N) = 1 / sqrt(mean(x^2) + eps).
// x, w: f32 or f64, contiguous, same dtype; y like x; rstd f64 for f64 inputs, else f32.
void rmsnorm_forward(Tensor& y, Tensor& rstd, const Tensor& x, const Tensor& w, double eps, Stream& s);
// dx (N, C), dw (C) from dy (N, C) and the forward's x, w, rstd. dw is overwritten, not accumulated.
void rmsnorm_backward(Tensor& dx, Tensor& dw, const Tensor& dy, const Tensor& x, const Tensor& w, const Tensor& rstd,
                      Stream& s);

// dtype of rstd for inputs of `dtype`: f64 stays f64, everything else keeps f32 statistics.
DType rmsnorm_rstd_dtype(DType dtype);

}  // namespace loom::cpu
