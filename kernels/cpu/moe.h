// MoE dispatch kernels on CPU: row gather / scatter-add by an index (the
// token <-> expert-slot permutation), row-wise log-sum-exp (router z-loss), and
// top-k selection (router). All deterministic: the scatter-add visits indices
// in order per column block, top-k breaks ties toward the lower index.
#pragma once

#include "framework/stream.h"
#include "framework/tensor.h"

namespace loom::cpu {

// out (M, C) = x (N, C) rows at index (M, i64); every index in [0, N) (checked
// before anything is written; the error names the index and N).
void index_select_rows(Tensor& out, const Tensor& x, const Tensor& index, Stream& s);
// out (N, C) += rows (M, C) added to the rows at index (M, i64); repeated
// indices add up in index-position order.
void index_add_rows(Tensor& out, const Tensor& rows, const Tensor& index, Stream& s);

// lse (N) = log sum_j exp(x (N, K)[i, j]), computed max-shifted.
void logsumexp_forward(Tensor& lse, const Tensor& x, Stream& s);
// grad_x (N, K) = grad_lse (N)[i] * exp(x[i, j] - lse[i]).
void logsumexp_backward(Tensor& grad_x, const Tensor& grad_lse, const Tensor& x, const Tensor& lse, Stream& s);

// indices (N, k, i64) = the k largest entries of each row of scores (N, E),
// in descending order; equal scores go to the lower column first. k <= E.
void topk_rows(Tensor& indices, const Tensor& scores, int64_t k, Stream& s);

}  // namespace loom::cpu
