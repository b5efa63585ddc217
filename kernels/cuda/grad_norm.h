// CUDA kernels behind gradient clipping, with the CPU twins' contracts
// (kernels/cpu/grad_norm.h): the sum of squares in f64 (for the global L2
// norm), an in-place scale, and a non-finite count, each also over many
// tensors in one launch per dtype (multi_tensor.cuh). The sums are
// deterministic: every tensor is cut into fixed chunks whose f64 partials are
// added in a fixed order, so a result depends only on the data, never on
// scheduling. Results stay on the device (no host synchronization here).
//
// CUDA dtypes: x f32, bf16, f16 or f64; contiguous, on the stream's device.
#pragma once

#include <vector>

#include "framework/stream.h"
#include "framework/tensor.h"

namespace loom::cuda {

// out (one element, f64) = sum_i x_i^2, accumulated in f64.
void sum_squares(Tensor& out, const Tensor& x, Stream& s);
// x *= alpha, in place (computed in f32 for 16-bit dtypes, else in x's dtype).
void scale_inplace(Tensor& x, double alpha, Stream& s);
// out (one element, i64) = number of NaN or +-Inf elements of x.
void count_nonfinite(Tensor& out, const Tensor& x, Stream& s);

// out (len(xs), f64)[i] = sum of squares of xs[i]. A caller forming a global
// norm adds these in its own (fixed) order, as it does on the CPU.
void sum_squares_many(Tensor& out, const std::vector<Tensor>& xs, Stream& s);
// Every xs[i] *= alpha, in place.
void scale_inplace_many(const std::vector<Tensor>& xs, double alpha, Stream& s);
// out (len(xs), i64)[i] = number of NaN or +-Inf elements of xs[i].
void count_nonfinite_many(Tensor& out, const std::vector<Tensor>& xs, Stream& s);

}  // namespace loom::cuda
