// Cross-entropy CPU kernels: log-softmax and negative log-likelihood fused, so
// the (N, V) log-probabilities are never materialized; only the per-row
// log-sum-exp is kept for the backward.
#pragma once

#include "framework/stream.h"
#include "framework/tensor.h"

namespace loom::cpu {

// logits (N, V) contiguous f32/f64; targets (N) contiguous i64 or i32. Rows
// whose target equals ignore_index contribute nothing; any other target
// outside [0, V) is an error naming it.
// loss () = sum over counted rows of (lse_n - logits[n, target_n]), divided by
// the number of counted rows when `mean` (0 when there are none);
// lse (N) = log-sum-exp of each row (max-subtracted); both in the logits dtype.
void cross_entropy_forward(Tensor& loss, Tensor& lse, const Tensor& logits, const Tensor& targets,
                           int64_t ignore_index, bool mean, Stream& s);
// dlogits (N, V) = (softmax(logits) - onehot(target)) * dloss (/ count when
// `mean`); zero rows for ignored targets. dloss has shape ().
void cross_entropy_backward(Tensor& dlogits, const Tensor& dloss, const Tensor& logits, const Tensor& targets,
                            const Tensor& lse, int64_t ignore_index, bool mean, Stream& s);

}  // namespace loom::cpu
