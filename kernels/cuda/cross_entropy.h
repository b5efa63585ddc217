// Fused cross-entropy CUDA kernels with the CPU twin's contract
// (kernels/cpu/cross_entropy.h): log-softmax and negative log-likelihood in
// one read of each logits row (online max + sum), so neither the (N, V)
// probabilities nor an fp32 copy of the logits is ever written; the backward
// reads the row once more and writes dlogits in the logits dtype. Only the
// per-row log-sum-exp (fp32) is kept between the two.
//
// CUDA dtypes: logits and dlogits f32, bf16 or f16; lse f32 (fp32 statistics;
// for f32 logits that is the CPU twin's "logits dtype"); loss and dloss f32
// or the logits dtype. targets i64 or i32. Every tensor contiguous on the
// stream's device. The loss is summed over rows in a fixed order
// (deterministic). Targets are range-checked on the device; each call reads
// one flag back (a host synchronization) so that a bad target throws here,
// naming the row and the value, like the CPU twin.
#pragma once

#include "framework/stream.h"
#include "framework/tensor.h"

namespace loom::cuda {

// logits (N, V); targets (N). Rows whose target equals ignore_index
// contribute nothing; any other target outside [0, V) is an error naming it.
// loss () = sum over counted rows of (lse_n - logits[n, target_n]), divided by
// the number of counted rows when `mean` (0 when there are none);
// lse (N) = log-sum-exp of each row.
void cross_entropy_forward(Tensor& loss, Tensor& lse, const Tensor& logits, const Tensor& targets,
                           int64_t ignore_index, bool mean, Stream& s);
// dlogits (N, V) = (softmax(logits) - onehot(target)) * dloss (/ count when
// `mean`); zero rows for ignored targets. dloss has shape () (read on the device).
void cross_entropy_backward(Tensor& dlogits, const Tensor& dloss, const Tensor& logits, const Tensor& targets,
                            const Tensor& lse, int64_t ignore_index, bool mean, Stream& s);

}  // namespace loom::cuda
