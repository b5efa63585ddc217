// MoE dispatch kernels on CPU: row gather / scatter-add by an index (the
// token <-> expert-slot permutation), the grouped per-expert GEMM, row-wise log-sum-exp (router z-loss), and
// top-k selection (router). All deterministic: the scatter-add visits indices
// in order per column block, top-k breaks ties toward the lower index.
#pragma once

#include <vector>

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

// Grouped linear (one GEMM per expert over its contiguous rows): rows
// [offsets[e], offsets[e+1]) of x (S, In) go through w[e] (E, Out, In):
// y (S, Out) = x_rows @ w[e]^T. offsets (E + 1), non-decreasing, 0 .. S. All contiguous.
void grouped_linear_forward(Tensor& y, const Tensor& x, const Tensor& w, const std::vector<int64_t>& offsets,
                            Stream& s);
// grad_x (S, In) = grad_y_rows @ w[e]; grad_w (E, Out, In)[e] = grad_y_rows^T @ x_rows
// (zero for empty groups). Either output may be undefined (not computed).
void grouped_linear_backward(Tensor& grad_x, Tensor& grad_w, const Tensor& grad_y, const Tensor& x, const Tensor& w,
                             const std::vector<int64_t>& offsets, Stream& s);

// indices (N, k, i64) = the k largest entries of each row of scores (N, E),
// in descending order; equal scores go to the lower column first. k <= E.
void topk_rows(Tensor& indices, const Tensor& scores, int64_t k, Stream& s);

// mask (N, E, scores' dtype) = 1 at the k largest entries of each row of
// scores (N, E), 0 elsewhere; equal scores go to the lower column, and a NaN
// ranks after every number (it is picked only when fewer than k numbers remain;
// no error: the caller's loss carries the NaN). k in [1, E].
void topk_mask_rows(Tensor& mask, const Tensor& scores, int64_t k, Stream& s);

// MoH's head gate per row (kernels/moh_gate_row.h): gate (N, shared + E) from the routed
// probabilities p (N, E), their top-k mask and z (N, h_s + 2: shared-router then mix
// logits; unused when shared == 0); f32 or f64.
void moh_gate_rows(Tensor& gate, const Tensor& p, const Tensor& mask, const Tensor& z, int64_t shared, int64_t k,
                   Stream& s);
// Its backward: dp (N, E) and dz (like z; untouched when shared == 0) from dgate (N, shared + E).
void moh_gate_rows_backward(Tensor& dp, Tensor& dz, const Tensor& dgate, const Tensor& p, const Tensor& mask,
                            const Tensor& z, int64_t shared, int64_t k, Stream& s);

}  // namespace loom::cpu
