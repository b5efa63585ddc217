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

// MoH's head gate (ALGORITHMS.md §8; the row rule in kernels/moh_gate_row.h): p (N, E)
// the routed heads' probabilities, mask (N, E) their top-k selection (a constant),
// z (N, h_s + 2) the shared-router logits (h_s = shared > 1 ? shared : 0) then the two
// mix logits, undefined when shared == 0 -> (N, shared + E):
// [2 softmax(z_a)_0 · g_s, 2 softmax(z_a)_1 · k (p ∘ mask) / Σ (p ∘ mask)].
// One kernel each way instead of a dozen small ops; backward to p and z.
Variable moh_gate(const Variable& p, const Tensor& mask, const Variable& z, int64_t shared, int64_t k);

}  // namespace loom
