// CPU kernels behind gradient clipping: the sum of squares in f64 (for the
// global L2 norm), an in-place scale, and a non-finite count. All take
// contiguous tensors of any floating dtype (bf16/f16 included) and treat them
// as flat spans. The sum is deterministic: fixed-size blocks are summed in
// parallel and the block partials are added in order, so the result does not
// depend on the number of threads.
#pragma once

#include "framework/stream.h"
#include "framework/tensor.h"

namespace loom::cpu {

// out (shape (), f64) = sum_i x_i^2, accumulated in f64.
void sum_squares(Tensor& out, const Tensor& x, Stream& s);
// x *= alpha, in place (computed in f32 for 16-bit dtypes, else in x's dtype).
void scale_inplace(Tensor& x, double alpha, Stream& s);
// out (shape (), i64) = number of NaN or +-Inf elements of x.
void count_nonfinite(Tensor& out, const Tensor& x, Stream& s);

}  // namespace loom::cpu
