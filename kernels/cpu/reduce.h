// Sum reductions on CPU: over all elements, or over one dim. Accumulation is
// in double for both f32 and f64, in a fixed order, so results do not depend
// on the thread count.
#pragma once

#include "framework/stream.h"
#include "framework/tensor.h"

namespace loom::cpu {

// out (one element, e.g. shape ()) = sum of all elements of x (contiguous).
void sum_all(Tensor& out, const Tensor& x, Stream& s);
// x contiguous, seen as (outer, n, inner) around `dim`; out contiguous with
// outer * inner elements (x's shape with `dim` dropped or kept as 1) = sum over n.
void sum_dim(Tensor& out, const Tensor& x, int64_t dim, Stream& s);

}  // namespace loom::cpu
