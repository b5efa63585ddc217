// Embedding lookup on CPU: forward gathers rows of the table, backward
// scatter-adds output gradients into a gradient table in a fixed order, so the
// result is bitwise reproducible (repeated ids add up in id-position order).
#pragma once

#include "framework/stream.h"
#include "framework/tensor.h"

namespace loom::cpu {

// out (N, C) = weight (V, C) rows at ids (N, i64 or i32); every id must lie in
// [0, V) (checked before anything is written; the error names the id and V).
void embedding_forward(Tensor& out, const Tensor& weight, const Tensor& ids, Stream& s);
// grad_weight (V, C) += grad_out (N, C) scattered to the rows at ids (N).
void embedding_backward(Tensor& grad_weight, const Tensor& grad_out, const Tensor& ids, Stream& s);

}  // namespace loom::cpu
