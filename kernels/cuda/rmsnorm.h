// RMSNorm CUDA kernels: the CPU twin's contract (kernels/cpu/rmsnorm.h) for
// bf16/f16/f32 storage with fp32 statistics. Forward: one block per row,
// 16-byte loads where the width allows. Backward: dx per row; dw summed over
// rows in fixed chunks and then over chunks in order, so it is deterministic.
#pragma once

#include "framework/stream.h"
#include "framework/tensor.h"

namespace loom::cuda {

// y (N, C) = x * rstd * w,  rstd (N) f32 = 1 / sqrt(mean(x^2) + eps); x, w, y one dtype.
void rmsnorm_forward(Tensor& y, Tensor& rstd, const Tensor& x, const Tensor& w, double eps, Stream& s);
// dx (N, C) like x, dw (C) f32 or like w (overwritten) from dy, x, w, rstd.
void rmsnorm_backward(Tensor& dx, Tensor& dw, const Tensor& dy, const Tensor& x, const Tensor& w, const Tensor& rstd,
                      Stream& s);

}  // namespace loom::cuda
