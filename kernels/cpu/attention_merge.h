// Exact merge of partial softmax-attention results (ALGORITHMS.md §1): the
// step that lets ring and all-gather attention (parallel/) attend a query
// against several key blocks one at a time and still equal one device's
// attention. A partial is (out, lse) of some rows against one key block; the
// merge folds it into a running (out_acc, lse_acc) in place. Its CUDA twin is
// kernels/cuda/attention_merge.h. lse = -inf marks "no visible key", so a row
// that no block has reached yet, or a block that reaches no key of a row,
// never meets inf - inf; +inf is never used as a marker.
#pragma once

#include "framework/stream.h"
#include "framework/tensor.h"

namespace loom::cpu {

// out_acc (B, N, H, D) and lse_acc (B, H, N): the running merge (a row with
// lse_acc = -inf holds no key yet; its out_acc is ignored and overwritten).
// part_out (B, n, H, D) and part_lse (B, H, n): the partial of rows
// [row_start, row_start + n) of the accumulator. Per row:
//   part lse = -inf:  unchanged;
//   acc lse = -inf:   takes the partial as it is;
//   otherwise:        lse = max(la, lp) + log1p(exp(-|la - lp|)),
//                     out = exp(la - lse) * out_acc + exp(lp - lse) * part_out.
// All contiguous, one dtype (f32 or f64); rows outside the range are untouched.
void attention_merge(Tensor& out_acc, Tensor& lse_acc, const Tensor& part_out, const Tensor& part_lse,
                     int64_t row_start, Stream& s);

}  // namespace loom::cpu
