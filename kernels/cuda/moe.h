// MoE dispatch kernels on CUDA with the CPU twin's contract (kernels/cpu/moe.h,
// kernels/cpu/rows.h): row gather and deterministic scatter-add by an index,
// row log-sum-exp (router z-loss), top-k selection (router) and the grouped
// per-expert linear (one cuBLASLt GEMM per non-empty expert through
// kernels/cuda/gemm.h). Storage bf16 or f32 with fp32 math; lse is f32.
#pragma once

#include <vector>

#include "framework/stream.h"
#include "framework/tensor.h"

namespace loom::cuda {

// out (M, C) = x (N, C) rows at index (M, i64 on the device). Indices outside
// [0, N) are an error naming the first one (checked on the device; one host sync).
void index_select_rows(Tensor& out, const Tensor& x, const Tensor& index, Stream& s);
// out (N, C) += rows (M, C) at index (M, i64). Deterministic: positions are
// stably sorted by index and each target row sums its rows in position order
// (in fp32), then adds the sum once. Same index check as above.
void index_add_rows(Tensor& out, const Tensor& rows, const Tensor& index, Stream& s);

// lse (N) f32 = log sum_j exp(x (N, K)[i, j]), max-shifted; a row whose max is
// infinite gets that max.
void logsumexp_forward(Tensor& lse, const Tensor& x, Stream& s);
// grad_x (N, K, like x) = grad_lse (N, f32)[i] * exp(x[i, j] - lse[i]) (0 where lse is infinite).
void logsumexp_backward(Tensor& grad_x, const Tensor& grad_lse, const Tensor& x, const Tensor& lse, Stream& s);

// y (S, Out, like x) rows [offsets[e], offsets[e+1]) = x rows @ w[e]^T, w (E, Out, In).
// offsets (E + 1) live on the host (the routing plan), non-decreasing, 0 .. S.
void grouped_linear_forward(Tensor& y, const Tensor& x, const Tensor& w, const std::vector<int64_t>& offsets,
                            Stream& s);
// grad_x (S, In) = grad_y rows @ w[e]; grad_w (E, Out, In)[e] = grad_y rows^T @ x rows
// (zero for empty experts). Either may be undefined; each is f32 or x's dtype.
void grouped_linear_backward(Tensor& grad_x, Tensor& grad_w, const Tensor& grad_y, const Tensor& x, const Tensor& w,
                             const std::vector<int64_t>& offsets, Stream& s);

// indices (N, k, i64) = the k largest entries of each row of scores (N, E) in
// descending order, equal scores to the lower column first; k in [1, E]. A NaN
// score is an error naming its (row, column) (one host sync reads the flag).
void topk_rows(Tensor& indices, const Tensor& scores, int64_t k, Stream& s);

// mask (N, E, scores' dtype) = 1 at the k largest entries of each row of
// scores (N, E), 0 elsewhere; equal scores go to the lower column, and a NaN
// ranks after every number (it is picked only when fewer than k numbers remain;
// no error and no host sync: the caller's loss carries the NaN). k in [1, E].
void topk_mask_rows(Tensor& mask, const Tensor& scores, int64_t k, Stream& s);

// MoH's head gate per row and its backward (the CPU twins' contract, kernels/cpu/moe.h):
// a thread per row, f32 or f64.
void moh_gate_rows(Tensor& gate, const Tensor& p, const Tensor& mask, const Tensor& z, int64_t shared, int64_t k,
                   Stream& s);
void moh_gate_rows_backward(Tensor& dp, Tensor& dz, const Tensor& dgate, const Tensor& p, const Tensor& mask,
                            const Tensor& z, int64_t shared, int64_t k, Stream& s);

}  // namespace loom::cuda
