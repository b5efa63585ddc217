// Sum reductions on CUDA with the CPU twins' contracts (kernels/cpu/reduce.h,
// and sum_to from kernels/cpu/elementwise.h). Accumulation is in double, as
// on the CPU, and deterministic: no atomics; every partial sum covers a range
// fixed by the shapes alone and partials are added in a fixed order, so a
// result is bitwise reproducible run to run.
//
// CUDA dtypes: x f64, f32, bf16 or f16; out x's dtype, or f32/f64 (an fp32
// sum of a bf16 tensor). Every tensor must be on the stream's device.
#pragma once

#include "framework/stream.h"
#include "framework/tensor.h"

namespace loom::cuda {

// out (one element, e.g. shape ()) = sum of all elements of x (contiguous).
void sum_all(Tensor& out, const Tensor& x, Stream& s);
// x contiguous, seen as (outer, n, inner) around `dim`; out contiguous with
// outer * inner elements (x's shape with `dim` dropped or kept as 1) = sum over n.
void sum_dim(Tensor& out, const Tensor& x, int64_t dim, Stream& s);
// out (shape S, contiguous) = x (a shape S broadcasts to, any strides) summed
// over the broadcast dims.
void sum_to(Tensor& out, const Tensor& x, Stream& s);

}  // namespace loom::cuda
