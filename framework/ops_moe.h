// Differentiable ops of the MoE FFN dispatch (ALGORITHMS.md §10): gather rows
// by an index (tokens -> expert-sorted slots), scatter-add rows back (slots ->
// tokens), the grouped per-expert GEMM, row-wise log-sum-exp (router z-loss), and the non-differentiable
// top-k selection. Kernels in kernels/cpu/moe; each op is one autograd node and
// the two row ops are each other's backward.
#pragma once

#include <vector>

#include "framework/autograd.h"

namespace loom {

// x (N, C) any strides, index (M) i64 with entries in [0, N) -> (M, C): row i is x[index[i]].
// Backward: index_add of the output gradient.
Variable index_select_rows(const Variable& x, const Tensor& index);

// rows (M, C) any strides, index (M) i64 in [0, n) -> (n, C): out[index[i]] += rows[i],
// zeros elsewhere (repeated indices add up). Backward: index_select of the output gradient.
Variable index_add_rows(const Variable& rows, const Tensor& index, int64_t n);

// Grouped per-expert linear: x (S, In) whose rows [offsets[e], offsets[e+1])
// belong to expert e, weight (E, Out, In) -> (S, Out), row-wise x @ weight[e]^T.
// offsets (E + 1) from 0 to S, non-decreasing (empty groups allowed).
// Backward: grad_x = grad @ weight[e] per group, grad_weight[e] = grad^T @ x rows.
Variable grouped_linear(const Variable& x, const Variable& weight, const std::vector<int64_t>& offsets);

// x (..., K) -> (...): log sum_j exp(x[..., j]) over the last dim.
// Backward: grad * softmax(x).
Variable logsumexp(const Variable& x);

// scores (N, E) floating -> (N, k) i64: columns of the k largest scores per row,
// descending, ties to the lower column. Not differentiable (selection only).
Tensor topk_indices(const Tensor& scores, int64_t k);

// scores (N, E) floating -> (N, E) in scores' dtype: 1 at the k largest scores of
// each row (ties to the lower column; NaN ranks after every number), 0 elsewhere.
// Stays on the scores' device (no host sync on CUDA). Not differentiable.
Tensor topk_mask(const Tensor& scores, int64_t k);

}  // namespace loom
